//! Cron triggers against the real cluster, its housekeeper and real supervisors: ticks made
//! exactly once through supervisor kills, two supervisors and a Postgres crash; catch-up
//! policies; daylight-saving changes; schedules checked against an independent cron
//! implementation; errors.
//!
//! Ticks are made by the housekeeper of the database named by picloud.database, so every test
//! here works in that database (worker_db), each with an app of its own. The tests run one at a
//! time: one of them restarts the cluster.

use chrono::{DateTime, TimeZone, Utc};
use picloud_tests::*;
use postgres::Client;
use proptest::prelude::*;
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use uuid::Uuid;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An app with a sql handler that records each tick it runs in `<tag>_ticks`.
fn tick_app(c: &mut Client, tag: &str) -> (Uuid, Uuid, String) {
    let table = format!("{tag}_ticks");
    c.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table};
         CREATE TABLE {table} (trigger_id uuid, scheduled_for timestamptz, payload jsonb,
                               source text, ran_at timestamptz DEFAULT clock_timestamp());
         CREATE OR REPLACE FUNCTION {table}_handler(e jsonb) RETURNS void LANGUAGE sql AS $$
             INSERT INTO {table} (trigger_id, scheduled_for, payload, source)
             VALUES ((e->'payload'->>'trigger_id')::uuid, (e->'payload'->>'scheduled_for')::timestamptz,
                     e->'payload'->'payload', e->>'source') $$;"
    ))
    .unwrap();
    let app: Uuid = c
        .query_one(
            &format!("SELECT picloud_create_app('{tag}-{}')", Uuid::new_v4()),
            &[],
        )
        .unwrap()
        .get(0);
    let script: Uuid = c
        .query_one(
            &format!("SELECT picloud_create_script($1, 'ticks', 'sql', '{table}_handler')"),
            &[&app],
        )
        .unwrap()
        .get(0);
    (app, script, table)
}

fn seconds_between(ticks: &[DateTime<Utc>]) -> Vec<i64> {
    ticks
        .windows(2)
        .map(|w| (w[1] - w[0]).num_milliseconds())
        .collect()
}

fn scheduled(c: &mut Client, sql: &str, trigger: Uuid) -> Vec<DateTime<Utc>> {
    c.query(sql, &[&trigger])
        .unwrap()
        .iter()
        .map(|r| {
            let text: String = r.get(0);
            DateTime::parse_from_rfc3339(&text)
                .expect("rfc3339")
                .with_timezone(&Utc)
        })
        .collect()
}

/// The scheduled times a trigger's ledger recorded, in order (duplicates kept).
fn ran_ticks(c: &mut Client, table: &str, trigger: Uuid) -> Vec<DateTime<Utc>> {
    scheduled(
        c,
        &format!(
            "SELECT to_char(scheduled_for AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
             FROM {table} WHERE trigger_id = $1 ORDER BY scheduled_for"
        ),
        trigger,
    )
}

/// The scheduled times of a trigger's events waiting in the outbox, in order.
fn queued_ticks(c: &mut Client, trigger: Uuid) -> Vec<DateTime<Utc>> {
    scheduled(
        c,
        "SELECT payload->>'scheduled_for' FROM picloud.outbox WHERE trigger_id = $1
         ORDER BY (payload->>'scheduled_for')::timestamptz",
        trigger,
    )
}

fn fired_count(c: &mut Client, app: Uuid, trigger: Uuid) -> (i64, i64) {
    let row = c
        .query_one(
            "SELECT fired_count, skipped_count FROM picloud_list_cron_triggers($1) WHERE trigger_id = $2",
            &[&app, &trigger],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

#[test]
fn every_second_ticks_run_exactly_once_through_supervisor_kills() {
    let _s = serial();
    let db = worker_db();
    let mut c = connect(&db);
    let (app, script, table) = tick_app(&mut c, "cron_kill");
    let args = ["--lease-ms", "2000", "--poll-interval-ms", "200"];
    let mut first = Supervisor::start(&db, &args);
    let mut second = Supervisor::start(&db, &args);
    let trigger: Uuid = c
        .query_one(
            "SELECT picloud_create_cron_trigger($1, 'every 1 second', $2, p_payload => '{\"job\":\"kill\"}')",
            &[&app, &script],
        )
        .unwrap()
        .get(0);
    let started = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    first.kill();
    std::thread::sleep(Duration::from_secs(2));
    let third = Supervisor::start(&db, &args);
    std::thread::sleep(Duration::from_secs(2));
    second.kill();
    std::thread::sleep(Duration::from_secs(3));
    c.execute("SELECT picloud_disable_trigger($1, $2)", &[&app, &trigger])
        .unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    // Every tick's event runs, those a killed supervisor held after their lease.
    assert!(
        eventually(Duration::from_secs(30), || count(
            &mut c,
            &format!("SELECT count(*) FROM picloud.outbox WHERE app_id = '{app}'")
        ) == 0),
        "ticks left in the outbox"
    );
    let ran = ran_ticks(&mut c, &table, trigger);
    let (fired, skipped) = fired_count(&mut c, app, trigger);
    let gaps = seconds_between(&ran);
    println!(
        "cron every second for {elapsed:.1} s, two supervisors, two kills: fired {fired}, ran {}, skipped {skipped}",
        ran.len()
    );
    assert_eq!(ran.len() as i64, fired, "each fired tick ran once");
    assert!(
        gaps.iter().all(|&ms| ms == 1000),
        "ticks one second apart, none twice, none missing: {gaps:?}"
    );
    // N ticks in N seconds (the first tick is up to a second after creation).
    assert!(
        (fired as f64 - elapsed).abs() <= 1.5,
        "fired {fired} in {elapsed:.1} s"
    );
    assert_eq!(skipped, 0);
    let sources: i64 = count(
        &mut c,
        &format!("SELECT count(*) FROM {table} WHERE source = 'cron' AND payload = '{{\"job\":\"kill\"}}'"),
    );
    assert_eq!(
        sources, fired,
        "every event has source cron and the trigger's payload"
    );
    drop(third);
    c.execute("SELECT picloud_drop_app($1)", &[&app]).unwrap();
}

fn pg_ctl(args: &[&str]) {
    let data = std::env::var("PICLOUD_TEST_DATA")
        .expect("PICLOUD_TEST_DATA names the test cluster's data directory");
    let status = std::process::Command::new("runuser")
        .args([
            "-u",
            "postgres",
            "--",
            "/usr/lib/postgresql/15/bin/pg_ctl",
            "-D",
            &data,
            "-w",
            "-t",
            "60",
        ])
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run pg_ctl");
    assert!(status.success(), "pg_ctl {args:?}");
}

#[test]
fn a_postgres_crash_loses_no_tick_under_all_and_fires_once_under_last() {
    let _s = serial();
    let db = worker_db();
    let mut c = connect(&db);
    let (app, script, _table) = tick_app(&mut c, "cron_crash");
    let mut trigger = |catch_up: &str| -> Uuid {
        c.query_one(
            "SELECT picloud_create_cron_trigger($1, 'every 1 second', $2, p_catch_up => $3)",
            &[&app, &script, &catch_up],
        )
        .unwrap()
        .get(0)
    };
    let all = trigger("all");
    let last = trigger("last");
    let none = trigger("none");
    // No supervisor: the ticks stay in the outbox, where they are counted.
    std::thread::sleep(Duration::from_secs(3));
    drop(c);
    let port = port().to_string();
    pg_ctl(&["-m", "immediate", "stop"]);
    std::thread::sleep(Duration::from_secs(4));
    pg_ctl(&["-o", &format!("-p {port}"), "start"]);
    let mut c = connect(&db);
    // The first housekeeper after a start checks the database, then the next one fires.
    std::thread::sleep(Duration::from_secs(4));
    for t in [all, last, none] {
        c.execute("SELECT picloud_disable_trigger($1, $2)", &[&app, &t])
            .unwrap();
    }
    let all_ticks = queued_ticks(&mut c, all);
    let last_ticks = queued_ticks(&mut c, last);
    let none_ticks = queued_ticks(&mut c, none);
    let (all_fired, all_skipped) = fired_count(&mut c, app, all);
    let (last_fired, last_skipped) = fired_count(&mut c, app, last);
    let (_, none_skipped) = fired_count(&mut c, app, none);
    println!(
        "cron across an immediate restart (about 4 s down): all fired {all_fired} (skipped {all_skipped}), \
         last fired {last_fired} (skipped {last_skipped}), none skipped {none_skipped}"
    );
    let all_gaps = seconds_between(&all_ticks);
    assert!(
        all_gaps.iter().all(|&ms| ms == 1000),
        "catch_up all: every tick once, none missing: {all_gaps:?}"
    );
    assert_eq!((all_ticks.len() as i64, all_skipped), (all_fired, 0));
    // 'last': the ticks missed while the server was down fire once, as the latest of them.
    let last_gaps = seconds_between(&last_ticks);
    let long: Vec<i64> = last_gaps.iter().copied().filter(|&ms| ms != 1000).collect();
    assert_eq!(
        long.len(),
        1,
        "one catch-up tick for the outage: {last_gaps:?}"
    );
    assert!(long[0] >= 3000, "{last_gaps:?}");
    assert_eq!(last_skipped, long[0] / 1000 - 1, "{last_gaps:?}");
    assert_eq!(last_ticks.len() as i64, last_fired);
    // 'none': the outage (about 4 s) is within its 10 s grace, so it fires the latest missed
    // tick like 'last' and skips the others; catch_up_none_skips_ticks_older_than_its_grace
    // shows the other case.
    let none_gaps = seconds_between(&none_ticks);
    assert!(
        none_gaps.iter().filter(|&&ms| ms != 1000).count() <= 1,
        "{none_gaps:?}"
    );
    let dupes = count(
        &mut c,
        &format!(
            "SELECT count(*) - count(DISTINCT (trigger_id, payload->>'scheduled_for'))
             FROM picloud.outbox WHERE app_id = '{app}'"
        ),
    );
    assert_eq!(dupes, 0, "no tick enqueued twice");
    c.execute("SELECT picloud_drop_app($1)", &[&app]).unwrap();
}

#[test]
fn catch_up_none_skips_ticks_older_than_its_grace() {
    let _s = serial();
    let db = worker_db();
    let mut c = connect(&db);
    let (app, script, _table) = tick_app(&mut c, "cron_none");
    let mut trigger = |catch_up: &str| -> Uuid {
        c.query_one(
            "SELECT picloud_create_cron_trigger($1, 'every 1 minute', $2, p_catch_up => $3, p_catch_up_limit => 5)",
            &[&app, &script, &catch_up],
        )
        .unwrap()
        .get(0)
    };
    let none = trigger("none");
    let all = trigger("all");
    let last = trigger("last");
    // As if the housekeeper had been away for an hour: the next tick an hour ago.
    c.execute(
        "UPDATE picloud.cron_trigger_details SET next_fire_at = date_trunc('minute', now()) - interval '60 minutes'
         WHERE app_id = $1",
        &[&app],
    )
    .unwrap();
    c.execute("SELECT picloud._wake_housekeeper_at_commit()", &[])
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || {
        count(
            &mut c,
            &format!("SELECT count(*) FROM picloud.cron_trigger_details WHERE app_id = '{app}' AND next_fire_at < now()"),
        ) == 0
    }));
    let (none_fired, none_skipped) = fired_count(&mut c, app, none);
    let (all_fired, all_skipped) = fired_count(&mut c, app, all);
    let (last_fired, last_skipped) = fired_count(&mut c, app, last);
    // 61 ticks were due (an hour ago up to this minute), unless the minute turned meanwhile.
    assert!(
        (0..=1).contains(&none_fired) && none_fired + none_skipped >= 61,
        "none: {none_fired} fired, {none_skipped} skipped"
    );
    assert_eq!(all_fired, 5, "all: the latest catch_up_limit ticks");
    assert_eq!(all_fired + all_skipped, none_fired + none_skipped);
    assert_eq!(last_fired, 1);
    assert_eq!(last_fired + last_skipped, none_fired + none_skipped);
    let all_ticks = queued_ticks(&mut c, all);
    assert_eq!(
        seconds_between(&all_ticks),
        [60_000, 60_000, 60_000, 60_000],
        "the five latest ticks, in order"
    );
    c.execute("SELECT picloud_drop_app($1)", &[&app]).unwrap();
}

#[test]
fn skip_if_running_fires_no_tick_while_the_last_one_is_pending() {
    let _s = serial();
    let db = worker_db();
    let mut c = connect(&db);
    let (app, script, _table) = tick_app(&mut c, "cron_skip");
    let skip: Uuid = c
        .query_one(
            "SELECT picloud_create_cron_trigger($1, 'every 1 second', $2, p_skip_if_running => true)",
            &[&app, &script],
        )
        .unwrap()
        .get(0);
    let overlap: Uuid = c
        .query_one(
            "SELECT picloud_create_cron_trigger($1, 'every 1 second', $2)",
            &[&app, &script],
        )
        .unwrap()
        .get(0);
    // No supervisor runs: the first tick stays pending.
    std::thread::sleep(Duration::from_millis(3500));
    for t in [skip, overlap] {
        c.execute("SELECT picloud_disable_trigger($1, $2)", &[&app, &t])
            .unwrap();
    }
    let (skip_fired, skip_skipped) = fired_count(&mut c, app, skip);
    let (overlap_fired, _) = fired_count(&mut c, app, overlap);
    let pending: bool = c
        .query_one(
            "SELECT last_event_pending FROM picloud_list_cron_triggers($1) WHERE trigger_id = $2",
            &[&app, &skip],
        )
        .unwrap()
        .get(0);
    assert_eq!(skip_fired, 1, "one tick, then skipped while it is pending");
    assert!(skip_skipped >= 2, "skipped {skip_skipped}");
    assert!(pending);
    assert!(
        overlap_fired >= 3,
        "without the option every tick fires: {overlap_fired}"
    );
    c.execute("SELECT picloud_drop_app($1)", &[&app]).unwrap();
}

fn next_ticks(c: &mut Client, schedule: &str, zone: &str, from: &str, n: i32) -> Vec<String> {
    c.query(
        "SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') FROM picloud_cron_next($1, $2, $3::text::timestamptz, $4) t",
        &[&schedule, &zone, &from, &n],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Daylight-saving changes in 2026, as Vixie cron handles them: a fixed time skipped by the
/// spring change fires once at the first valid time after it; a fixed time that occurs twice
/// in autumn fires once, at its first occurrence; `*` and step schedules keep their rhythm in
/// real time (every real hour, both passes of the repeated hour included). Times in UTC.
#[test]
fn daylight_saving_changes_fire_as_cron_does() {
    let _s = serial();
    let mut c = connect(&worker_db());
    let table: [(&str, &str, &str, &[&str]); 8] = [
        // Berlin: 2026-03-29 02:00 CET -> 03:00 CEST (01:00 UTC).
        (
            "30 2 * * *",
            "Europe/Berlin",
            "2026-03-28 00:00+01",
            &["2026-03-28 01:30", "2026-03-29 01:00", "2026-03-30 00:30"],
        ),
        (
            "0 * * * *",
            "Europe/Berlin",
            "2026-03-28 23:30+00",
            &["2026-03-29 00:00", "2026-03-29 01:00", "2026-03-29 02:00"],
        ),
        // Berlin: 2026-10-25 03:00 CEST -> 02:00 CET (01:00 UTC); 02:30 occurs twice.
        (
            "30 2 * * *",
            "Europe/Berlin",
            "2026-10-24 00:00+02",
            &["2026-10-24 00:30", "2026-10-25 00:30", "2026-10-26 01:30"],
        ),
        (
            "0 * * * *",
            "Europe/Berlin",
            "2026-10-24 23:30+00",
            &["2026-10-25 00:00", "2026-10-25 01:00", "2026-10-25 02:00"],
        ),
        // New York: 2026-03-08 02:00 EST -> 03:00 EDT (07:00 UTC).
        (
            "30 2 * * *",
            "America/New_York",
            "2026-03-07 00:00-05",
            &["2026-03-07 07:30", "2026-03-08 07:00", "2026-03-09 06:30"],
        ),
        (
            "*/30 * * * *",
            "America/New_York",
            "2026-03-08 06:15+00",
            &["2026-03-08 06:30", "2026-03-08 07:00", "2026-03-08 07:30"],
        ),
        // New York: 2026-11-01 02:00 EDT -> 01:00 EST (06:00 UTC); 01:30 occurs twice.
        (
            "30 1 * * *",
            "America/New_York",
            "2026-10-31 00:00-04",
            &["2026-10-31 05:30", "2026-11-01 05:30", "2026-11-02 06:30"],
        ),
        (
            "0 * * * *",
            "America/New_York",
            "2026-11-01 04:30+00",
            &["2026-11-01 05:00", "2026-11-01 06:00", "2026-11-01 07:00"],
        ),
    ];
    for (schedule, zone, from, expected) in table {
        let got = next_ticks(&mut c, schedule, zone, from, expected.len() as i32);
        assert_eq!(got, expected, "{schedule} in {zone} from {from}");
    }
}

/// Five-field expressions (ranges, lists, steps, names) whose day-of-month or day-of-week is
/// `*`: the `cron` crate, an independent implementation, reads those as Vixie cron does.
fn expression() -> impl Strategy<Value = String> {
    fn field(lo: u32, hi: u32) -> impl Strategy<Value = String> {
        prop_oneof![
            Just("*".to_owned()),
            (lo..=hi).prop_map(|n| n.to_string()),
            (lo..=hi, lo..=hi).prop_map(|(a, b)| format!("{}-{}", a.min(b), a.max(b))),
            (1..=hi.max(2) / 2).prop_map(|s| format!("*/{s}")),
            (lo..=hi, lo..=hi, 1u32..=5).prop_map(|(a, b, s)| format!(
                "{}-{}/{s}",
                a.min(b),
                a.max(b)
            )),
            (lo..=hi, lo..=hi).prop_map(|(a, b)| if a == b {
                a.to_string()
            } else {
                format!("{},{}", a.min(b), a.max(b))
            }),
        ]
    }
    let month = prop_oneof![
        field(1, 12),
        Just("JAN-JUN".to_owned()),
        Just("MAR,SEP,DEC".to_owned())
    ];
    let weekday = prop_oneof![
        Just("MON-FRI".to_owned()),
        Just("SUN".to_owned()),
        Just("MON,WED,FRI".to_owned()),
        Just("SAT,SUN".to_owned())
    ];
    let days = prop_oneof![
        field(1, 28).prop_map(|dom| (dom, "*".to_owned())),
        weekday.prop_map(|dow| ("*".to_owned(), dow)),
    ];
    (field(0, 59), field(0, 23), days, month).prop_map(|(minute, hour, (dom, dow), month)| {
        format!("{minute} {hour} {dom} {month} {dow}")
    })
}

#[test]
fn schedules_agree_with_an_independent_cron_implementation() {
    let _s = serial();
    let c = std::cell::RefCell::new(connect(&worker_db()));
    let config = ProptestConfig {
        cases: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(expr in expression(), start in 1_767_225_600i64..1_798_761_600i64)| {
        let from = Utc.timestamp_opt(start, 0).single().expect("time");
        let theirs: Vec<String> = cron::Schedule::from_str(&format!("0 {expr}"))
            .expect("the cron crate parses it")
            .after(&from)
            .take(5)
            .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
            .collect();
        let ours = next_ticks(&mut c.borrow_mut(), &expr, "UTC", &from.to_rfc3339(), 5);
        prop_assert_eq!(ours, theirs, "{} from {}", expr, from);
    });
}

#[test]
fn bad_schedules_zones_and_options_are_refused_and_register_nothing() {
    let _s = serial();
    let db = worker_db();
    let mut c = connect(&db);
    let (app, script, _table) = tick_app(&mut c, "cron_bad");
    let cases: [(&str, &str, &str, &str); 9] = [
        ("61 * * * *", "UTC", "22023", "at position 1"),
        ("* 24 * * *", "UTC", "22023", "at position 3"),
        ("* * * * * *", "UTC", "22023", "at position 11"),
        ("every 0 seconds", "UTC", "22023", "at position 7"),
        ("every 2 days", "UTC", "22023", "at position 9"),
        ("@often", "UTC", "22023", "at position 1"),
        ("0 0 30 2 *", "UTC", "22023", "never fires"),
        ("* * * * *", "Mars/Olympus", "22023", "unknown time zone"),
        ("", "UTC", "22023", "empty"),
    ];
    for (schedule, zone, code, message) in cases {
        let result = c.query_one(
            "SELECT picloud_create_cron_trigger($1, $2, $3, p_timezone => $4)",
            &[&app, &schedule, &script, &zone],
        );
        let text = error_message(c.query_one(
            "SELECT picloud_create_cron_trigger($1, $2, $3, p_timezone => $4)",
            &[&app, &schedule, &script, &zone],
        ));
        assert_eq!(sqlstate(result), code, "{schedule:?} in {zone}");
        assert!(text.contains(message), "{schedule:?}: {text}");
    }
    let options = [
        ("p_catch_up => 'sometimes'", "22023"),
        ("p_catch_up_limit => 0", "22023"),
        ("p_timezone => NULL", "22004"),
        ("p_payload => NULL", "22004"),
    ];
    for (option, code) in options {
        let result = c.query_one(
            &format!("SELECT picloud_create_cron_trigger($1, '@hourly', $2, {option})"),
            &[&app, &script],
        );
        assert_eq!(sqlstate(result), code, "{option}");
    }
    let preview = [
        ("SELECT picloud_cron_next(NULL)", "22004"),
        (
            "SELECT picloud_cron_next('@daily', 'UTC', now(), 0)",
            "22023",
        ),
        (
            "SELECT picloud_cron_next('@daily', 'UTC', 'infinity')",
            "22023",
        ),
    ];
    for (sql, code) in preview {
        assert_eq!(sqlstate(c.query(sql, &[])), code, "{sql}");
    }
    assert_eq!(
        count(
            &mut c,
            &format!("SELECT count(*) FROM picloud.triggers WHERE app_id = '{app}'")
        ),
        0,
        "nothing registered"
    );
    // Altering: a bad value changes nothing; a trigger of another app is not found.
    let trigger: Uuid = c
        .query_one(
            "SELECT picloud_create_cron_trigger($1, '@daily', $2)",
            &[&app, &script],
        )
        .unwrap()
        .get(0);
    let before = count(
        &mut c,
        &format!("SELECT extract(epoch FROM next_fire_at)::bigint FROM picloud.cron_trigger_details WHERE trigger_id = '{trigger}'"),
    );
    assert_eq!(
        sqlstate(c.execute(
            "SELECT picloud_alter_cron_trigger($1, $2, p_schedule => '* * *')",
            &[&app, &trigger]
        )),
        "22023"
    );
    assert_eq!(
        sqlstate(c.execute(
            "SELECT picloud_alter_cron_trigger($1, $2, p_schedule => '@hourly')",
            &[&app, &Uuid::new_v4()]
        )),
        "P0002"
    );
    let after = count(
        &mut c,
        &format!("SELECT extract(epoch FROM next_fire_at)::bigint FROM picloud.cron_trigger_details WHERE trigger_id = '{trigger}'"),
    );
    assert_eq!(before, after);
    // A good alteration starts the new schedule from now.
    c.execute(
        "SELECT picloud_alter_cron_trigger($1, $2, p_schedule => 'every 5 minutes', p_payload => '{\"v\":2}')",
        &[&app, &trigger],
    )
    .unwrap();
    let row = c
        .query_one(
            "SELECT schedule, payload::text, next_fire_at > now() AND next_fire_at <= now() + interval '5 minutes',
                    (extract(epoch FROM next_fire_at)::bigint % 300) = 0
             FROM picloud_list_cron_triggers($1) WHERE trigger_id = $2",
            &[&app, &trigger],
        )
        .unwrap();
    let shown: (String, String, bool, bool) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        shown,
        (
            "every 5 minutes".to_owned(),
            "{\"v\": 2}".to_owned(),
            true,
            true
        )
    );
    c.execute("SELECT picloud_drop_app($1)", &[&app]).unwrap();
}

#[test]
fn terminating_the_housekeeper_loses_and_repeats_no_tick() {
    let _s = serial();
    let db = worker_db();
    let mut c = connect(&db);
    let (app, script, _table) = tick_app(&mut c, "cron_term");
    let trigger: Uuid = c
        .query_one(
            "SELECT picloud_create_cron_trigger($1, 'every 1 second', $2, p_catch_up => 'all')",
            &[&app, &script],
        )
        .unwrap()
        .get(0);
    // No supervisor: the ticks stay in the outbox. The housekeeper is terminated five times
    // (it comes back a second later each time) while ticks fall due.
    let mut terminated = 0;
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(1300));
        terminated += count(
            &mut c,
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE backend_type = 'picloud housekeeper') t",
        );
    }
    std::thread::sleep(Duration::from_secs(3));
    c.execute("SELECT picloud_disable_trigger($1, $2)", &[&app, &trigger])
        .unwrap();
    let ticks = queued_ticks(&mut c, trigger);
    let (fired, skipped) = fired_count(&mut c, app, trigger);
    println!(
        "cron with the housekeeper terminated {terminated} times: fired {fired}, queued {}",
        ticks.len()
    );
    assert!(terminated >= 4, "terminated {terminated} times");
    assert_eq!((ticks.len() as i64, skipped), (fired, 0));
    let gaps = seconds_between(&ticks);
    assert!(
        gaps.iter().all(|&ms| ms == 1000),
        "every tick once, none missing: {gaps:?}"
    );
    assert!(fired >= 8, "fired {fired}");
    c.execute("SELECT picloud_drop_app($1)", &[&app]).unwrap();
}

/// A cron event is an event like any other: its failures are retried, it ends as a dead letter
/// with source cron, a dead-letter trigger filtered on cron fires for it, and the stats count it.
#[test]
fn a_failing_cron_handler_retries_and_dead_letters_like_any_event() {
    let _s = serial();
    let db = worker_db();
    let mut c = connect(&db);
    c.batch_execute(&format!(
        "ALTER DATABASE {db} SET picloud.retry_max_attempts = 2;
         ALTER DATABASE {db} SET picloud.retry_base_delay = '50ms';
         DROP TABLE IF EXISTS cron_dead;
         CREATE TABLE cron_dead (source text, op text, trigger_id uuid, attempts int);
         CREATE OR REPLACE FUNCTION cron_fails(e jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'cron job failed on purpose'; END $$;
         CREATE OR REPLACE FUNCTION cron_dead_handler(e jsonb) RETURNS void LANGUAGE sql AS $$
             INSERT INTO cron_dead VALUES (e->'payload'->>'source', e->'payload'->>'op',
                 (e->'payload'->>'trigger_id')::uuid, (e->'payload'->>'attempt_count')::int) $$;"
    ))
    .unwrap();
    let app: Uuid = c
        .query_one(
            &format!("SELECT picloud_create_app('cron-dead-{}')", Uuid::new_v4()),
            &[],
        )
        .unwrap()
        .get(0);
    let fails: Uuid = c
        .query_one(
            "SELECT picloud_create_script($1, 'fails', 'sql', 'cron_fails')",
            &[&app],
        )
        .unwrap()
        .get(0);
    let dead: Uuid = c
        .query_one(
            "SELECT picloud_create_script($1, 'dead', 'sql', 'cron_dead_handler')",
            &[&app],
        )
        .unwrap()
        .get(0);
    c.execute(
        "SELECT picloud_create_dead_letter_trigger($1, $2, p_source_filter => 'cron')",
        &[&app, &dead],
    )
    .unwrap();
    let sup = Supervisor::start(&db, &["--poll-interval-ms", "200"]);
    let trigger: Uuid = c
        .query_one(
            "SELECT picloud_create_cron_trigger($1, 'every 1 second', $2)",
            &[&app, &fails],
        )
        .unwrap()
        .get(0);
    let reached = eventually(Duration::from_secs(20), || {
        count(&mut c, "SELECT count(*) FROM cron_dead") >= 1
    });
    c.execute("SELECT picloud_disable_trigger($1, $2)", &[&app, &trigger])
        .unwrap();
    c.batch_execute(&format!(
        "ALTER DATABASE {db} RESET picloud.retry_max_attempts;
         ALTER DATABASE {db} RESET picloud.retry_base_delay;"
    ))
    .unwrap();
    assert!(reached, "a dead-letter trigger ran; log: {}", sup.log());
    let row = c
        .query_one(
            "SELECT source, op, trigger_id, attempts FROM cron_dead LIMIT 1",
            &[],
        )
        .unwrap();
    let seen: (String, String, Uuid, i32) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(seen, ("cron".to_owned(), "tick".to_owned(), trigger, 2));
    let letter = c
        .query_one(
            "SELECT source, last_error FROM picloud.dead_letters WHERE app_id = $1 AND trigger_id = $2 LIMIT 1",
            &[&app, &trigger],
        )
        .unwrap();
    let (source, error): (String, String) = (letter.get(0), letter.get(1));
    assert_eq!(source, "cron");
    assert!(error.contains("cron job failed on purpose"), "{error}");
    let stats = c
        .query_one(
            "SELECT coalesce(sum(failed), 0)::bigint, coalesce(sum(dead_lettered), 0)::bigint
             FROM picloud_stats() WHERE app_id = $1 AND source = 'cron'",
            &[&app],
        )
        .unwrap();
    let (failed, dead_lettered): (i64, i64) = (stats.get(0), stats.get(1));
    assert!(
        failed >= 2 && dead_lettered >= 1,
        "stats: {failed} failed, {dead_lettered} dead-lettered"
    );
    drop(sup);
    c.execute("SELECT picloud_drop_app($1)", &[&app]).unwrap();
}
