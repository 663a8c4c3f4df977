//! Priorities and per-handler concurrency limits, with real supervisors: a high-priority event
//! behind a backlog of 10,000 starts within about one batch (through the sql lanes and through
//! claims); within an app lower priorities wait while higher ones are due (the documented
//! starvation), but another app's raised priority never holds an app back; a handler limited to
//! 3 never has more than 3 events running across 3 supervisors, while its app's other handlers
//! keep running.

use picloud_tests::*;
use postgres::Client;
use std::time::Duration;
use uuid::Uuid;

/// A sql handler that records when it started and ended (clock time, inside its transaction)
/// and sleeps `sleep_ms` in between. Returns the app and the handler.
fn timed_app(c: &mut Client, name: &str, sleep_ms: u32) -> (Uuid, Uuid) {
    c.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS runs (seq bigserial PRIMARY KEY, handler text NOT NULL, payload jsonb,
                                          started timestamptz NOT NULL, ended timestamptz NOT NULL);
         CREATE FUNCTION {name}(e jsonb) RETURNS void LANGUAGE plpgsql AS $$
         DECLARE t0 timestamptz := clock_timestamp();
         BEGIN
             PERFORM pg_sleep({sleep_ms} / 1000.0);
             INSERT INTO runs (handler, payload, started, ended)
             VALUES ('{name}', e->'payload', t0, clock_timestamp());
         END $$;"
    ))
    .expect("handler");
    let app: Uuid = c
        .query_one("SELECT picloud_create_app($1)", &[&name])
        .expect("app")
        .get(0);
    let script: Uuid = c
        .query_one(
            "SELECT picloud_create_script($1, $2, 'sql', $2)",
            &[&app, &name],
        )
        .expect("script")
        .get(0);
    (app, script)
}

fn bulk(c: &mut Client, app: Uuid, script: Uuid, n: i32, tag: &str, priority: i16) {
    c.execute(
        "SELECT count(*) FROM picloud_enqueue_bulk($1, 'queue', 'x',
             ARRAY(SELECT jsonb_build_object('tag', $4::text, 'i', g) FROM generate_series(1, $3) g),
             $2, p_priority => $5)",
        &[&app, &script, &n, &tag, &priority],
    )
    .expect("bulk enqueue");
}

/// A backlog of 10,000 events of priority 10 is draining; one event of priority -10 enqueued
/// then runs after at most about one batch of the backlog (a lane batch in flight in each lane
/// plus the next claim), where without priorities it would wait for the rest of the backlog.
fn high_priority_overtakes_a_backlog(tag: &str, args: &[&str], bound: i64) {
    let (db, mut c) = fresh_db(tag);
    let (app, script) = timed_app(&mut c, "slow", 1);
    bulk(&mut c, app, script, 10_000, "low", 10);
    let _sup = Supervisor::start(&db, args);
    assert!(
        eventually(Duration::from_secs(60), || count(
            &mut c,
            "SELECT count(*) FROM runs"
        ) >= 300),
        "the backlog starts draining"
    );
    let enqueued_at: String = c
        .query_one(
            "SELECT picloud_enqueue($1, 'queue', 'x', '{\"tag\": \"high\"}', $2, p_priority => -10::smallint)::text,
                    clock_timestamp()::text",
            &[&app, &script],
        )
        .expect("high-priority enqueue")
        .get(1);
    assert!(
        eventually(Duration::from_secs(60), || count(
            &mut c,
            "SELECT count(*) FROM runs WHERE payload->>'tag' = 'high'"
        ) == 1),
        "the high-priority event ran"
    );
    let overtaken = count(
        &mut c,
        &format!(
            "SELECT count(*) FROM runs
             WHERE payload->>'tag' = 'low' AND started > '{enqueued_at}'
               AND started < (SELECT started FROM runs WHERE payload->>'tag' = 'high')"
        ),
    );
    let left = count(&mut c, "SELECT count(*) FROM picloud.outbox");
    assert!(
        overtaken <= bound,
        "{overtaken} low-priority events started between the enqueue and the high-priority event (at most {bound})"
    );
    assert!(
        left > 1_000,
        "the backlog was still there when the high-priority event ran ({left} left)"
    );
}

#[test]
fn a_high_priority_event_overtakes_a_backlog_in_the_sql_lanes() {
    // Two lanes of 100-event batches: each finishes the batch it holds (or locked as the
    // enqueue committed), then the next batch runs it first.
    high_priority_overtakes_a_backlog("prio_lanes", &["--sql-lane-batch", "100"], 2 * 100 + 16);
}

#[test]
fn a_high_priority_event_overtakes_a_backlog_through_claims() {
    // Claims of 16 rows: the claims in flight finish, the next one takes it.
    high_priority_overtakes_a_backlog(
        "prio_claims",
        &["--sql-lanes", "0", "--prefetch", "0"],
        3 * 16,
    );
    // Claiming ahead (128 by default): the events claimed before it was enqueued may start
    // first; once claimed it starts before its app's waiting events.
    high_priority_overtakes_a_backlog("prio_claims_ahead", &["--sql-lanes", "0"], 3 * 16 + 128);
}

/// With one executor, an app's events run strictly by priority, then due time: events of
/// priority 5 enqueued first wait behind every event of priority -5 enqueued after them (the
/// starvation within an app that the README describes), and equal priorities keep due order.
#[test]
fn within_an_app_lower_priorities_wait_for_higher_ones() {
    let (db, mut c) = fresh_db("prio_strict");
    let (app, script) = timed_app(&mut c, "quick", 0);
    bulk(&mut c, app, script, 40, "low", 5);
    bulk(&mut c, app, script, 40, "high", -5);
    let _sup = Supervisor::start(&db, &["--sql-lanes", "0", "--concurrency", "1"]);
    assert!(
        eventually(Duration::from_secs(60), || count(
            &mut c,
            "SELECT count(*) FROM runs"
        ) == 80),
        "every event ran"
    );
    let order: Vec<(String, i32)> = c
        .query(
            "SELECT payload->>'tag', (payload->>'i')::int FROM runs ORDER BY seq",
            &[],
        )
        .expect("runs")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected: Vec<(String, i32)> = (1..=40)
        .map(|i| ("high".to_string(), i))
        .chain((1..=40).map(|i| ("low".to_string(), i)))
        .collect();
    assert_eq!(order, expected);
}

/// App A floods events of priority -100; app B's events of the default priority, enqueued
/// after, still run while A's backlog is far from drained: priority orders events within an
/// app, never between apps.
#[test]
fn another_apps_raised_priority_does_not_hold_an_app_back() {
    for (tag, args) in [
        ("prio_fair_lanes", &["--sql-lane-batch", "50"][..]),
        ("prio_fair_claims", &["--sql-lanes", "0"][..]),
    ] {
        let (db, mut c) = fresh_db(tag);
        let (a, a_script) = timed_app(&mut c, "flood", 2);
        let b: Uuid = c
            .query_one("SELECT picloud_create_app('b')", &[])
            .expect("app b")
            .get(0);
        let b_script: Uuid = c
            .query_one(
                "SELECT picloud_create_script($1, 'quiet', 'sql', 'flood')",
                &[&b],
            )
            .expect("b script")
            .get(0);
        bulk(&mut c, a, a_script, 3_000, "a", -100);
        bulk(&mut c, b, b_script, 50, "b", 0);
        let _sup = Supervisor::start(&db, args);
        assert!(
            eventually(Duration::from_secs(60), || count(
                &mut c,
                "SELECT count(*) FROM runs WHERE payload->>'tag' = 'b'"
            ) == 50),
            "{tag}: app B's events ran"
        );
        let a_left = count(
            &mut c,
            &format!("SELECT count(*) FROM picloud.outbox WHERE app_id = '{a}'"),
        );
        assert!(
            a_left > 1_000,
            "{tag}: app B waited for app A's backlog ({a_left} of A's events left)"
        );
    }
}

/// The most intervals of `handler` that overlap at any one moment.
fn most_at_once(c: &mut Client, handler: &str) -> i64 {
    count(
        c,
        &format!(
            "SELECT coalesce(max(n), 0) FROM (
                 SELECT sum(d) OVER (ORDER BY t, d) AS n
                 FROM (SELECT started AS t, 1 AS d FROM runs WHERE handler = '{handler}'
                       UNION ALL
                       SELECT ended, -1 FROM runs WHERE handler = '{handler}') e) s"
        ),
    )
}

/// A handler limited to 3 never has more than 3 events running at once across 3 supervisors
/// (sampled by the handler itself: its start and end times), and reaches 3; the app's other
/// handler, enqueued after the limited backlog, is not held back by it. The limit and its state
/// show in picloud.limited_handlers; a bad limit is refused and changes nothing.
#[test]
fn a_limited_handler_never_runs_more_than_its_limit_across_supervisors() {
    let (db, mut c) = fresh_db("limits");
    let (app, limited) = timed_app(&mut c, "limited", 100);
    c.batch_execute(
        "CREATE FUNCTION free(e jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO runs (handler, payload, started, ended)
             VALUES ('free', e->'payload', clock_timestamp(), clock_timestamp());
         END $$;",
    )
    .expect("free handler");
    let free: Uuid = c
        .query_one(
            "SELECT picloud_create_script($1, 'free', 'sql', 'free')",
            &[&app],
        )
        .expect("free script")
        .get(0);
    assert_eq!(
        sqlstate(c.execute(
            "SELECT picloud_set_handler_max_concurrency($1, $2, 0)",
            &[&app, &limited]
        )),
        "22023"
    );
    assert_eq!(
        sqlstate(c.execute(
            "SELECT picloud_set_handler_max_concurrency($1, $2, 3)",
            &[&app, &Uuid::new_v4()]
        )),
        "P0002"
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM picloud.handler_limits"),
        0
    );
    c.execute(
        "SELECT picloud_set_handler_max_concurrency($1, $2, 3)",
        &[&app, &limited],
    )
    .expect("limit");
    bulk(&mut c, app, limited, 60, "limited", 0);
    bulk(&mut c, app, free, 200, "free", 0);

    let _sups: Vec<Supervisor> = (0..3).map(|_| Supervisor::start(&db, &[])).collect();
    assert!(
        eventually(Duration::from_secs(60), || count(
            &mut c,
            "SELECT count(*) FROM runs WHERE handler = 'free'"
        ) == 200),
        "the unlimited handler's events ran"
    );
    let limited_left = count(
        &mut c,
        &format!("SELECT count(*) FROM picloud.outbox WHERE script_id = '{limited}'"),
    );
    assert!(
        limited_left > 20,
        "the free handler waited for the limited one ({limited_left} limited events left)"
    );
    let row = c
        .query_one(
            "SELECT max_concurrency, running, waiting FROM picloud.limited_handlers",
            &[],
        )
        .expect("limited_handlers");
    let (max, running): (i32, i64) = (row.get(0), row.get(1));
    assert_eq!(max, 3);
    assert!(running <= 3, "limited_handlers shows {running} running");
    assert!(
        eventually(Duration::from_secs(60), || count(
            &mut c,
            "SELECT count(*) FROM runs WHERE handler = 'limited'"
        ) == 60),
        "every limited event ran"
    );
    assert_eq!(most_at_once(&mut c, "limited"), 3);

    // Lifting the limit lets the handler's events run beside each other again.
    c.execute(
        "SELECT picloud_set_handler_max_concurrency($1, $2, NULL)",
        &[&app, &limited],
    )
    .expect("no limit");
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM picloud.handler_limits"),
        0
    );
}
