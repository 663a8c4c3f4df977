//! M1: trigger matching at scale.

use super::order;
use crate::config::{pg_err, progress, Cfg, Res};
use crate::db::{connect, count, ensure_db, exec, pgbench, settle, supervisor_idle};
use crate::report::Row;
use crate::stats::median_ratio;
use uuid::Uuid;

pub fn app_uuid(n: i64) -> Uuid {
    Uuid::parse_str(&format!("00000000-0000-0000-0000-{n:012}")).expect("uuid")
}

/// A database with `apps` apps of `per_app` KV triggers each, inserted directly. Patterns
/// alternate exact `cN` (even N) and prefix `pN:*` (odd N), no `*`: collection 'c10' matches
/// exactly one trigger per app.
pub fn setup_m1_db(cfg: &Cfg, db: &str, apps: i64, per_app: i64) -> Res<()> {
    let mut c = ensure_db(cfg, db)?;
    let have = count(&mut c, "SELECT count(*) FROM picloud.triggers")?;
    if have != apps * per_app {
        exec(&mut c, "TRUNCATE picloud.outbox; DELETE FROM picloud.apps; CREATE OR REPLACE FUNCTION noop(e jsonb) RETURNS void LANGUAGE sql AS ''")?;
        c.execute(
            "INSERT INTO picloud.apps (app_id, name)
             SELECT ('00000000-0000-0000-0000-' || lpad(g::text, 12, '0'))::uuid, 'app' || g FROM generate_series(1, $1::bigint) g",
            &[&apps],
        )
        .map_err(pg_err("insert apps"))?;
        exec(
            &mut c,
            "INSERT INTO picloud.scripts (app_id, script_id, name, kind, target, sql_function)
             SELECT app_id, app_id, 'noop', 'sql', 'noop', 'noop(jsonb)'::regprocedure FROM picloud.apps",
        )?;
        c.execute(
            "INSERT INTO picloud.triggers (app_id, trigger_id, kind, script_id)
             SELECT a.app_id, gen_random_uuid(), 'kv', a.app_id FROM picloud.apps a, generate_series(1, $1::bigint)",
            &[&per_app],
        )
        .map_err(pg_err("insert triggers"))?;
        exec(
            &mut c,
            "INSERT INTO picloud.kv_trigger_details (app_id, trigger_id, collection_pattern, match_key, ops)
             SELECT t.app_id, t.trigger_id, p.pattern, picloud._pattern_match_key(p.pattern), ARRAY['set']
             FROM (SELECT app_id, trigger_id, row_number() OVER (PARTITION BY app_id ORDER BY trigger_id) AS n
                   FROM picloud.triggers) t
             CROSS JOIN LATERAL (SELECT CASE WHEN t.n % 2 = 0 THEN 'c' || t.n ELSE 'p' || t.n || ':*' END AS pattern) p",
        )?;
    }
    exec(&mut c, "VACUUM ANALYZE picloud.apps, picloud.scripts, picloud.triggers, picloud.kv_trigger_details")?;
    Ok(())
}

pub fn bench_m1(cfg: &Cfg, notes: &mut Vec<String>) -> Res<Vec<Row>> {
    let small = format!("{}_m10", cfg.db);
    let big = format!("{}_m100k", cfg.db);
    progress("M1: registering 10 and 100,000 triggers");
    setup_m1_db(cfg, &small, 1, 10)?;
    setup_m1_db(cfg, &big, 1000, 100)?;
    let cases = [(small.as_str(), app_uuid(1)), (big.as_str(), app_uuid(500))];
    let mut clients = vec![];
    for (db, app) in cases {
        let mut c = connect(cfg, db)?;
        let matched = count(
            &mut c,
            &format!(
                "SELECT count(*) FROM picloud.picloud_match_kv_triggers('{app}', 'c10', 'set')"
            ),
        )?;
        let total = count(&mut c, "SELECT count(*) FROM picloud.triggers")?;
        if matched != 1 {
            return Err(format!(
                "M1: {db}: 'c10' matches {matched} triggers, expected 1"
            ));
        }
        progress(&format!(
            "M1: {db}: {total} triggers, 'c10' matches {matched}"
        ));
        clients.push(c);
    }
    notes.push(format!(
        "M1: wake-up flag (picloud_supervisor_idle) at start = {}; when true every emit also sends a NOTIFY at commit.",
        supervisor_idle(&mut clients[0])
    ));
    let (mut ten, mut hundred_k) = (vec![], vec![]);
    for run in 0..cfg.runs {
        for side in order(run) {
            let (db, app) = cases[side];
            let c = &mut clients[side];
            exec(c, "TRUNCATE picloud.outbox")?;
            settle(c)?;
            let script = format!("SELECT picloud.picloud_emit_kv('{app}'::uuid, 'c10', 'set', 'k', '{{}}'::jsonb);\n");
            let r = pgbench(
                cfg,
                db,
                &format!("m1_{side}"),
                &script,
                4,
                2,
                cfg.m1_secs,
                "simple",
            )?;
            let rows = count(c, "SELECT count(*) FROM picloud.outbox")?;
            if rows != r.txns || r.failed > 0 {
                notes.push(format!(
                    "M1 run {} {db}: {} transactions enqueued {rows} events, {} failed",
                    run + 1,
                    r.txns,
                    r.failed
                ));
            }
            progress(&format!(
                "M1 run {} {}: {:.0} tps",
                run + 1,
                if side == 0 {
                    "10 triggers"
                } else {
                    "100k triggers"
                },
                r.tps
            ));
            if side == 0 {
                ten.push(r.tps)
            } else {
                hundred_k.push(r.tps)
            }
        }
    }
    for c in clients.iter_mut() {
        exec(c, "TRUNCATE picloud.outbox")?;
    }
    Ok(vec![Row::new(
        "M1",
        "emit_kv matching 1 trigger, 100k triggers/1k apps",
        "tx/s",
    )
    .value(&hundred_k)
    .baseline("10 triggers", &ten, "tx/s")
    .ratio_of(&hundred_k, &ten)
    .target(
        "≥ 0.80× 10 trig.",
        median_ratio(&hundred_k, &ten) >= 0.8,
    )])
}
