//! Predicates over outbox rows that the planner must take as opaque.

use crate::api::raw::finfo_v1;
use pgrx::pg_sys;

finfo_v1!(pg_finfo_picloud_unclaimed);

/// `picloud._unclaimed(claimed_by text) RETURNS boolean` (internal, declared in
/// sql/001_schema.sql): whether an outbox row waits for a claim.
///
/// It says what `claimed_by IS NULL` says, but the planner cannot see through it, and that is
/// why it exists. For `claimed_by IS NULL` the planner takes the fraction of NULLs that the last
/// ANALYZE of the outbox saw, and in a queue that fraction is a snapshot of one moment: taken
/// while a drain held most rows claimed it is close to 0, and every plan that touches waiting
/// rows is then made for a handful of them (a claim that sorted the whole backlog, or joined it
/// by hash, 20-130 ms a call beside 50,000 waiting events, F1 in docs/benchmarks.md). An
/// opaque function gets a fixed estimate (a third of the rows) instead. The outbox's partial
/// indexes are declared with it, so the claims' and lanes' queries must say it the same way to
/// use them.
///
/// Every write of an outbox row and every row a claim or lane looks at evaluates it, so it is a
/// bare C function: it reads only whether its argument is NULL, which no declaration can make
/// unsafe, and cannot fail. (Through `#[pg_extern]` - the text converted, pgrx's guard - it cost
/// about 0.3 us a call.)
///
/// # Safety
/// Called by Postgres' function manager with a valid `fcinfo`.
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn picloud_unclaimed(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: fcinfo is valid; `args` holds `nargs` entries.
    let unclaimed = unsafe { (*fcinfo).nargs < 1 || (*fcinfo).args.as_slice(1)[0].isnull };
    pg_sys::Datum::from(unclaimed)
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// The rows EXPLAIN expects `SELECT … FROM picloud.outbox o WHERE <waiting>` to return.
    fn estimated_rows(waiting: &str) -> f64 {
        let plan = Spi::get_one::<pgrx::Json>(&format!(
            "EXPLAIN (FORMAT JSON) SELECT o.event_id FROM picloud.outbox o WHERE {waiting}"
        ))
        .expect("explain")
        .expect("a plan");
        plan.0[0]["Plan"]["Plan Rows"].as_f64().expect("Plan Rows")
    }

    #[pg_test]
    fn waiting_rows_are_estimated_whatever_the_last_analyze_saw() {
        // 3,000 rows, every one claimed when ANALYZE looks, all waiting again afterwards: what
        // the statistics say of a queue table a drain was analyzed in.
        Spi::run(
            "INSERT INTO picloud.outbox (app_id, source, op, script_id, payload, claimed_by,
                                         lease_expires_at)
             SELECT gen_random_uuid(), 'queue', 'estimate', gen_random_uuid(), '{}', 'w',
                    now() + interval '1 hour'
             FROM generate_series(1, 3000)",
        )
        .expect("rows");
        Spi::run("ANALYZE picloud.outbox").expect("analyze");
        Spi::run("UPDATE picloud.outbox SET claimed_by = NULL, lease_expires_at = NULL")
            .expect("unclaim");
        let by_statistics = estimated_rows("o.claimed_by IS NULL");
        let opaque = estimated_rows("picloud._unclaimed(o.claimed_by)");
        assert!(
            by_statistics < 10.0,
            "the planner takes claimed_by IS NULL from the snapshot: {by_statistics} rows"
        );
        assert!(
            opaque >= 750.0,
            "picloud._unclaimed gets a fixed share of the rows, not the snapshot: {opaque} rows"
        );
        // The next due time (picloud_next_due_at) is the first entry of the partial index.
        let plan: Vec<String> = Spi::connect(|client| {
            client
                .select(
                    "EXPLAIN SELECT min(o.due_at) FROM picloud.outbox o
                     WHERE picloud._unclaimed(o.claimed_by)",
                    None,
                    &[],
                )
                .expect("explain")
                .map(|row| row.get::<String>(1).ok().flatten().unwrap_or_default())
                .collect()
        });
        assert!(
            plan.iter().any(|line| line.contains("outbox_due_idx")),
            "min(due_at) of the waiting rows reads outbox_due_idx: {plan:?}"
        );
        assert_eq!(
            Spi::get_one::<bool>("SELECT picloud._unclaimed(NULL)"),
            Ok(Some(true))
        );
        assert_eq!(
            Spi::get_one::<bool>("SELECT picloud._unclaimed('w')"),
            Ok(Some(false))
        );
    }
}
