//! End to end: real picloud-supervisor processes against a real cluster.

use picloud_tests::postgres::fallible_iterator::FallibleIterator;
use picloud_tests::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::Duration;
use uuid::Uuid;

const FAST: &[&str] = &["--poll-interval-ms", "500", "--log-level", "debug"];

fn retry_quickly(c: &mut postgres::Client, db: &str, attempts: i32) {
    // Retry policy lives in the database: every supervisor session sees these.
    c.batch_execute(&format!(
        "ALTER DATABASE {db} SET picloud.retry_max_attempts = {attempts};
         ALTER DATABASE {db} SET picloud.retry_base_delay = '50ms';
         ALTER DATABASE {db} SET picloud.retry_max_delay = '200ms';"
    ))
    .unwrap();
}

#[test]
fn sql_handler_runs_once_and_the_row_is_gone() {
    let (db, mut c) = fresh_db("e2e_sql");
    let (app, script) = ledger_app(&mut c);
    let sup = Supervisor::start(&db, FAST);
    let mut ids = Vec::new();
    for i in 0..200 {
        let id: Uuid = c
            .query_one(
                "SELECT picloud_enqueue($1, 'queue', 'x', jsonb_build_object('i', $2::int), $3)",
                &[&app, &i, &script],
            )
            .unwrap()
            .get(0);
        ids.push(id);
    }
    assert!(
        eventually(Duration::from_secs(30), || count(
            &mut c,
            "SELECT count(*) FROM ledger"
        ) >= 200),
        "log: {}",
        sup.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(count(&mut c, "SELECT count(*) FROM ledger"), 200);
    assert_eq!(
        count(&mut c, "SELECT count(DISTINCT event_id) FROM ledger"),
        200
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 0);
    let first: Uuid = c
        .query_one("SELECT event_id FROM ledger WHERE payload->>'i' = '0'", &[])
        .unwrap()
        .get(0);
    assert_eq!(first, ids[0]);
}

#[test]
fn failing_handler_retries_then_dead_letters_and_replay_runs_again() {
    let (db, mut c) = fresh_db("e2e_fail");
    let (app, script) = ledger_app(&mut c);
    retry_quickly(&mut c, &db, 3);
    let _sup = Supervisor::start(&db, FAST);
    let id: Uuid = c
        .query_one(
            "SELECT picloud_enqueue($1, 'queue', 'x', '{\"fail\": \"always\"}', $2)",
            &[&app, &script],
        )
        .unwrap()
        .get(0);
    assert!(eventually(Duration::from_secs(30), || count(
        &mut c,
        "SELECT count(*) FROM picloud.dead_letters"
    ) == 1));
    let dl = c
        .query_one("SELECT dead_letter_id, original_event_id, attempt_count, last_error FROM picloud.dead_letters", &[])
        .unwrap();
    assert_eq!(dl.get::<_, Uuid>(1), id);
    assert_eq!(dl.get::<_, i32>(2), 3);
    assert!(
        dl.get::<_, String>(3).contains("handler failed on purpose"),
        "{}",
        dl.get::<_, String>(3)
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM ledger"), 0);
    // Fix the handler, replay: it runs again.
    c.batch_execute(
        "CREATE OR REPLACE FUNCTION ledger_handler(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO ledger (event_id, payload) VALUES ((e->>'event_id')::uuid, e->'payload'); RETURN NULL; END $$",
    )
    .unwrap();
    let dead_letter_id: Uuid = dl.get(0);
    c.query_one(
        "SELECT picloud_replay_dead_letter($1, $2)",
        &[&app, &dead_letter_id],
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(15), || count(
        &mut c,
        "SELECT count(*) FROM ledger"
    ) == 1));
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 0);
}

#[test]
fn http_handler_receives_the_event_and_its_id() {
    let (db, mut c) = fresh_db("e2e_http");
    let (app, _) = ledger_app(&mut c);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request_line = String::new();
        reader.read_line(&mut request_line).unwrap();
        let mut headers = Vec::new();
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let line = line.trim_end().to_string();
            if line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            headers.push(line);
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body).unwrap();
        stream
            .write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nConnection: close\r\n\r\n{\"ok\":true}",
            )
            .unwrap();
        (request_line, headers, body)
    });
    let url = format!("http://127.0.0.1:{port}/hook");
    let script: Uuid = c
        .query_one(
            "SELECT picloud_create_script($1, 'hook', 'http', $2, 5000)",
            &[&app, &url],
        )
        .unwrap()
        .get(0);
    let allow = format!("127.0.0.1:{port}");
    let _sup = Supervisor::start(&db, &["--poll-interval-ms", "500", "--http-allow", &allow]);
    let id: Uuid = c
        .query_one(
            "SELECT picloud_enqueue($1, 'queue', 'notify', '{\"to\": \"ops\"}', $2)",
            &[&app, &script],
        )
        .unwrap()
        .get(0);
    let (request_line, headers, body) = server.join().unwrap();
    assert!(request_line.starts_with("POST /hook "), "{request_line}");
    let header = headers
        .iter()
        .find_map(|h| {
            h.strip_prefix("Picloud-Event-Id: ")
                .or_else(|| h.strip_prefix("picloud-event-id: "))
        })
        .map(str::to_string);
    assert_eq!(header, Some(id.to_string()), "{headers:?}");
    let event: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(event["event_id"], json!(id.to_string()));
    assert_eq!(event["payload"], json!({"to": "ops"}));
    assert_eq!(event["op"], json!("notify"));
    assert!(eventually(Duration::from_secs(10), || count(
        &mut c,
        "SELECT count(*) FROM picloud.outbox"
    ) == 0));
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM picloud.dead_letters"),
        0
    );
}

#[test]
fn http_to_loopback_is_refused_unless_allowed() {
    let (db, mut c) = fresh_db("e2e_ssrf");
    let (app, _) = ledger_app(&mut c);
    retry_quickly(&mut c, &db, 1);
    for (name, url) in [
        ("loop", "http://127.0.0.1:9/x"),
        ("meta", "http://169.254.169.254/latest/meta-data"),
    ] {
        c.query_one(
            "SELECT picloud_create_script($1, $2, 'http', $3, 2000)",
            &[&app, &name, &url],
        )
        .unwrap();
    }
    // Even the name being listed does not open the address it resolves to.
    let _sup = Supervisor::start(
        &db,
        &["--poll-interval-ms", "500", "--http-allow", "localhost:9"],
    );
    c.batch_execute(&format!(
        "SELECT picloud_enqueue('{app}', 'queue', 'x', '{{}}', script_id) FROM picloud.scripts WHERE kind = 'http'"
    ))
    .unwrap();
    assert!(eventually(Duration::from_secs(15), || count(
        &mut c,
        "SELECT count(*) FROM picloud.dead_letters"
    ) == 2));
    let errors: Vec<String> = c
        .query("SELECT last_error FROM picloud.dead_letters", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for e in &errors {
        assert!(e.contains("not allowed"), "{errors:?}");
    }
}

#[test]
fn command_handler_gets_stdin_and_unknown_commands_never_run() {
    let (db, mut c) = fresh_db("e2e_cmd");
    let (app, _) = ledger_app(&mut c);
    retry_quickly(&mut c, &db, 1);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../target/it-cmd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("event.json");
    let marker = dir.join("ran");
    std::fs::remove_file(&out).ok();
    std::fs::remove_file(&marker).ok();
    let script = dir.join("capture.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\ncat > \"$1\"\necho '{\"stored\": true}'\n",
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    let configured = format!("capture={} {}", script.display(), out.display());
    let forbidden = format!("touch-marker=/usr/bin/touch {}", marker.display());
    let capture: Uuid = c
        .query_one(
            "SELECT picloud_create_script($1, 'capture', 'command', 'capture', 5000)",
            &[&app],
        )
        .unwrap()
        .get(0);
    let unknown: Uuid = c
        .query_one(
            "SELECT picloud_create_script($1, 'unknown', 'command', 'not-configured', 5000)",
            &[&app],
        )
        .unwrap()
        .get(0);
    let _sup = Supervisor::start(
        &db,
        &[
            "--poll-interval-ms",
            "500",
            "--command",
            &configured,
            "--command",
            &forbidden,
        ],
    );
    let id: Uuid = c
        .query_one(
            "SELECT picloud_enqueue($1, 'queue', 'resize', '{\"w\": 64}', $2)",
            &[&app, &capture],
        )
        .unwrap()
        .get(0);
    c.query_one(
        "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2)",
        &[&app, &unknown],
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(15), || out.exists()
        && std::fs::read_to_string(&out)
            .map(|s| s.ends_with('}'))
            .unwrap_or(false)));
    let event: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(event["event_id"], json!(id.to_string()));
    assert_eq!(event["payload"], json!({"w": 64}));
    assert!(eventually(Duration::from_secs(15), || count(
        &mut c,
        "SELECT count(*) FROM picloud.dead_letters"
    ) == 1));
    let error: String = c
        .query_one("SELECT last_error FROM picloud.dead_letters", &[])
        .unwrap()
        .get(0);
    assert!(error.contains("not configured"), "{error}");
    assert!(!marker.exists(), "no other configured command ran");
    // The first event's completion is reported once its command has exited, which may be a
    // moment after the command wrote its output.
    assert!(eventually(Duration::from_secs(10), || count(
        &mut c,
        "SELECT count(*) FROM picloud.outbox"
    ) == 0));
}

#[test]
fn sql_handler_has_exactly_the_principals_rights() {
    let (db, mut c) = fresh_db("e2e_principal");
    let (app, _) = ledger_app(&mut c);
    retry_quickly(&mut c, &db, 1);
    let role = format!("tenant_e2e_{}", std::process::id());
    c.batch_execute(&format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN;
         CREATE SCHEMA t AUTHORIZATION {role};
         CREATE TABLE secret (x int); REVOKE ALL ON secret FROM PUBLIC;
         SELECT picloud_grant_app_role('{app}', '{role}', 'admin');"
    ))
    .unwrap();
    let mut t = connect_as(&db, &role);
    t.batch_execute(
        "CREATE TABLE t.mine (event_id uuid);
         CREATE FUNCTION t.write_mine(e jsonb) RETURNS void LANGUAGE sql AS $$ INSERT INTO t.mine VALUES ((e->>'event_id')::uuid) $$;
         CREATE FUNCTION t.write_secret(e jsonb) RETURNS void LANGUAGE sql AS $$ INSERT INTO public.secret VALUES (1) $$;",
    )
    .unwrap();
    let ok: Uuid = t
        .query_one(
            "SELECT picloud_create_script($1, 'mine', 'sql', 't.write_mine')",
            &[&app],
        )
        .unwrap()
        .get(0);
    let bad: Uuid = t
        .query_one(
            "SELECT picloud_create_script($1, 'secret', 'sql', 't.write_secret')",
            &[&app],
        )
        .unwrap()
        .get(0);
    let _sup = Supervisor::start(&db, FAST);
    t.query_one(
        "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2)",
        &[&app, &ok],
    )
    .unwrap();
    t.query_one(
        "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2)",
        &[&app, &bad],
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(15), || count(
        &mut c,
        "SELECT count(*) FROM t.mine"
    ) == 1
        && count(&mut c, "SELECT count(*) FROM picloud.dead_letters")
            == 1));
    let error: String = c
        .query_one("SELECT last_error FROM picloud.dead_letters", &[])
        .unwrap()
        .get(0);
    assert!(
        error.contains("permission denied for table secret"),
        "{error}"
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM secret"), 0);
    drop(t);
}

/// Opens an inbox, listens on it, enqueues `payload` for `script` with the inbox as reply_to
/// and waits up to 15 s for the answer. Returns the inbox, the event id and the answer, if one
/// came.
fn call_synchronously(
    caller: &mut postgres::Client,
    app: Uuid,
    script: Uuid,
    payload: Value,
) -> (String, Uuid, Option<Value>) {
    let inbox: String = caller
        .query_one("SELECT picloud_open_inbox($1)", &[&app])
        .unwrap()
        .get(0);
    caller
        .batch_execute(&format!("LISTEN \"{inbox}\""))
        .unwrap();
    let id: Uuid = caller
        .query_one(
            "SELECT picloud_enqueue($1, 'queue', 'ask', $2, $3, p_reply_to => $4)",
            &[&app, &payload, &script, &inbox],
        )
        .unwrap()
        .get(0);
    let mut notes = caller.notifications();
    let mut it = notes.timeout_iter(Duration::from_secs(15));
    let answer = it
        .next()
        .unwrap()
        .map(|n| serde_json::from_str::<Value>(n.payload()).unwrap());
    (inbox, id, answer)
}

#[test]
fn synchronous_call_gets_its_answer_and_a_gone_caller_is_recorded() {
    let (db, mut c) = fresh_db("e2e_sync");
    let (app, script) = ledger_app(&mut c);
    let _sup = Supervisor::start(&db, FAST);
    let mut caller = connect(&db);
    let (inbox, id, answer) = call_synchronously(&mut caller, app, script, json!({"q": 42}));
    let answer = answer.expect("an answer within 15 s");
    assert_eq!(answer["event_id"], json!(id.to_string()));
    assert_eq!(answer["ok"], json!(true));
    assert_eq!(answer["result"], json!({"echo": {"q": 42}}));

    // A caller that goes away before its answer: the execution is recorded as abandoned.
    c.batch_execute(
        "CREATE OR REPLACE FUNCTION slow_handler(e jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT pg_sleep(1.5); SELECT '{\"late\": true}'::jsonb $$",
    )
    .unwrap();
    let slow: Uuid = c
        .query_one(
            "SELECT picloud_create_script($1, 'slow', 'sql', 'slow_handler')",
            &[&app],
        )
        .unwrap()
        .get(0);
    let id: Uuid = caller
        .query_one(
            "SELECT picloud_enqueue($1, 'queue', 'ask', '{}', $2, p_reply_to => $3)",
            &[&app, &slow, &inbox],
        )
        .unwrap()
        .get(0);
    drop(caller);
    assert!(eventually(Duration::from_secs(15), || count(
        &mut c,
        "SELECT count(*) FROM picloud.abandoned_executions"
    ) == 1));
    let row = c
        .query_one(
            "SELECT event_id, reason FROM picloud.abandoned_executions",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, Uuid>(0), id);
    assert_eq!(row.get::<_, String>(1), "caller disconnected");
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 0);
}

/// The supervisor's log as JSON objects, one per line.
fn log_lines(sup: &Supervisor) -> Vec<Value> {
    sup.log()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// The ids of the per-event log lines with this outcome (debug level).
fn events_with_outcome(lines: &[Value], outcome: &str) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = lines
        .iter()
        .filter(|l| l["msg"] == "event" && l["outcome"] == outcome)
        .map(|l| l["event_id"].as_str().unwrap().parse().unwrap())
        .collect();
    ids.sort();
    ids
}

/// The sum of one count over every summary line.
fn summary_total(lines: &[Value], name: &str) -> u64 {
    lines
        .iter()
        .filter(|l| l["msg"] == "summary")
        .map(|l| l[name].as_u64().unwrap())
        .sum()
}

/// Event ids written, one event document per line, by the paced command below.
fn command_ids(path: &std::path::Path) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let event: Value = serde_json::from_str(l).unwrap();
            event["event_id"].as_str().unwrap().parse().unwrap()
        })
        .collect();
    ids.sort();
    ids
}

/// SIGTERM with handlers in flight: no more claims; handlers that finish within the grace
/// period complete (drain); sql and command handlers still running at its end are cancelled
/// or killed and their rows released (unclaimed, the attempt not counted); the process exits
/// 0. A second supervisor then runs the released events, and every event has run exactly once.
#[test]
fn sigterm_drains_then_releases_running_handlers_and_each_event_runs_once() {
    let (db, mut c) = fresh_db("e2e_term");
    let (app, fast) = ledger_app(&mut c);
    // Handlers are slow while `pace` says so; they read it when they start.
    c.batch_execute(
        "CREATE TABLE pace (slow boolean NOT NULL);
         INSERT INTO pace VALUES (true);
         CREATE FUNCTION paced(e jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             IF (SELECT slow FROM pace) THEN
                 PERFORM pg_sleep((e->'payload'->>'secs')::float8);
             END IF;
             INSERT INTO ledger (event_id, payload) VALUES ((e->>'event_id')::uuid, e->'payload');
         END $$;",
    )
    .unwrap();
    let paced_sql: Uuid = c
        .query_one(
            "SELECT picloud_create_script($1, 'paced', 'sql', 'paced', 120000)",
            &[&app],
        )
        .unwrap()
        .get(0);
    // The command writes its event to `started`, its pid to `pids`, waits `pace` tenths of a
    // second and only then writes the event to `done`: killed before, it leaves no trace there.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../target/it-term-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    let (started, done, pids, pace) = (
        dir.join("started"),
        dir.join("done"),
        dir.join("pids"),
        dir.join("pace"),
    );
    std::fs::write(&pace, "600").unwrap();
    let program = dir.join("paced.sh");
    std::fs::write(
        &program,
        "#!/bin/sh\nevent=$(cat)\necho \"$event\" >> \"$1/started\"\necho $$ >> \"$1/pids\"\n\
         i=0\nn=$(cat \"$1/pace\")\nwhile [ \"$i\" -lt \"$n\" ]; do sleep 0.1; i=$((i+1)); done\n\
         echo \"$event\" >> \"$1/done\"\necho '{}'\n",
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&program)
        .status()
        .unwrap();
    let paced_cmd: Uuid = c
        .query_one(
            "SELECT picloud_create_script($1, 'paced-cmd', 'command', 'paced', 120000)",
            &[&app],
        )
        .unwrap()
        .get(0);
    let command = format!("paced={} {}", program.display(), dir.display());
    // No lanes: every sql event runs on its own claim, the path that cancels and releases at
    // shutdown.
    let args = [
        "--poll-interval-ms",
        "500",
        "--log-level",
        "debug",
        "--sql-lanes",
        "0",
        "--shutdown-grace-ms",
        "8000",
        "--command",
        &command,
    ];
    let mut first = Supervisor::start(&db, &args);
    let enqueue = |c: &mut postgres::Client, script: Uuid, payload: Value| -> Uuid {
        c.query_one(
            "SELECT picloud_enqueue($1, 'queue', 'x', $2, $3)",
            &[&app, &payload, &script],
        )
        .unwrap()
        .get(0)
    };

    // Quick events finish long before the signal.
    let mut quick: Vec<Uuid> = (0..10)
        .map(|i| enqueue(&mut c, fast, json!({ "i": i })))
        .collect();
    quick.sort();
    assert!(
        eventually(Duration::from_secs(20), || count(
            &mut c,
            "SELECT count(*) FROM ledger"
        ) == 10),
        "log: {}",
        first.log()
    );

    // In flight at the signal: two sql handlers that end within the grace period, three that
    // would sleep a minute and three commands that would run a minute.
    let mut medium: Vec<Uuid> = (0..2)
        .map(|_| enqueue(&mut c, paced_sql, json!({ "secs": 4 })))
        .collect();
    let slow_sql: Vec<Uuid> = (0..3)
        .map(|_| enqueue(&mut c, paced_sql, json!({ "secs": 60 })))
        .collect();
    let slow_cmd: Vec<Uuid> = (0..3)
        .map(|_| enqueue(&mut c, paced_cmd, json!({})))
        .collect();
    medium.sort();
    let mut slow: Vec<Uuid> = slow_sql.iter().chain(&slow_cmd).copied().collect();
    slow.sort();
    let sleeping = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND wait_event = 'PgSleep'"
    );
    assert!(
        eventually(Duration::from_secs(20), || count(&mut c, &sleeping) == 5
            && command_ids(&started).len() == 3),
        "handlers in flight: {} sql, {} commands; log: {}",
        count(&mut c, &sleeping),
        command_ids(&started).len(),
        first.log()
    );
    let command_pids: Vec<u32> = std::fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .map(|p| p.trim().parse().unwrap())
        .collect();
    assert_eq!(command_pids.len(), 3);
    let signalled_at: std::time::SystemTime =
        c.query_one("SELECT clock_timestamp()", &[]).unwrap().get(0);

    let status = first
        .terminate(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("exits within the grace period; log: {}", first.log()));
    assert!(
        status.success(),
        "exit status {status:?}; log: {}",
        first.log()
    );

    // What the first supervisor says it did: stopped claiming, let the two short handlers
    // finish, released the six others (each once, none lost or unreported).
    let lines = log_lines(&first);
    assert!(
        lines
            .iter()
            .any(|l| l["msg"] == "shutdown requested; no more claims"
                && l["signal"] == "SIGTERM"
                && l["grace_ms"] == 8000),
        "log: {}",
        first.log()
    );
    let releasing: Vec<&Value> = lines
        .iter()
        .filter(|l| l["msg"] == "releasing unfinished events")
        .collect();
    assert_eq!(releasing.len(), 1, "log: {}", first.log());
    assert_eq!(releasing[0]["in_flight"], 6, "log: {}", first.log());
    assert_eq!(events_with_outcome(&lines, "released"), slow);
    let completed = events_with_outcome(&lines, "completed");
    let mut expected: Vec<Uuid> = quick.iter().chain(&medium).copied().collect();
    expected.sort();
    assert_eq!(completed, expected);
    assert_eq!(summary_total(&lines, "released"), 6);
    assert_eq!(summary_total(&lines, "completed"), 12);
    assert_eq!(summary_total(&lines, "lease_lost"), 0);
    assert_eq!(summary_total(&lines, "unreported"), 0);
    assert!(
        !first.log().contains("exiting with events unreported"),
        "{}",
        first.log()
    );
    assert!(lines.iter().any(|l| l["msg"] == "stopped"));

    // What the database holds: the short handlers committed after the signal (they were
    // drained, not cut off); the released rows are back in the queue unclaimed, with no
    // attempt counted and nothing of their handlers committed.
    let drained: Vec<(Uuid, std::time::SystemTime)> = c
        .query(
            "SELECT event_id, at FROM ledger WHERE payload ? 'secs' ORDER BY event_id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        drained.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        medium
    );
    assert!(
        drained.iter().all(|(_, at)| *at > signalled_at),
        "the short handlers finished during the grace period"
    );
    let queued: Vec<(Uuid, Option<String>, bool, i32)> = c
        .query(
            "SELECT event_id, claimed_by, lease_expires_at IS NULL, attempt_count
             FROM picloud.outbox ORDER BY event_id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        queued,
        slow.iter()
            .map(|id| (*id, None, true, 0))
            .collect::<Vec<_>>()
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM ledger"), 12);
    assert_eq!(
        count(&mut c, &sleeping),
        0,
        "the sql handlers were cancelled"
    );
    assert!(command_ids(&done).is_empty(), "no command ran to its end");
    let gone = |pid: &u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.split_whitespace().nth(2) == Some("Z"))
            .unwrap_or(true)
    };
    assert!(
        eventually(Duration::from_secs(5), || command_pids.iter().all(gone)),
        "the commands were killed"
    );

    // A second supervisor, with the handlers fast again, runs the released events.
    c.batch_execute("UPDATE pace SET slow = false").unwrap();
    std::fs::write(&pace, "0").unwrap();
    let second = Supervisor::start(&db, &args);
    assert!(
        eventually(Duration::from_secs(30), || count(
            &mut c,
            "SELECT count(*) FROM picloud.outbox"
        ) == 0),
        "log: {}",
        second.log()
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM picloud.dead_letters"),
        0
    );
    // Each event ran to its end exactly once over both supervisors.
    let mut all_sql: Vec<Uuid> = quick
        .iter()
        .chain(&medium)
        .chain(&slow_sql)
        .copied()
        .collect();
    all_sql.sort();
    let ledger: Vec<Uuid> = c
        .query("SELECT event_id FROM ledger ORDER BY event_id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ledger, all_sql);
    let mut slow_cmd_sorted = slow_cmd.clone();
    slow_cmd_sorted.sort();
    assert!(eventually(Duration::from_secs(5), || command_ids(&done)
        == slow_cmd_sorted));
    // The second supervisor ran just the released events, each as its first attempt.
    let lines = log_lines(&second);
    assert_eq!(events_with_outcome(&lines, "completed"), slow);
    assert!(events_with_outcome(&lines, "released").is_empty());
    assert!(lines
        .iter()
        .filter(|l| l["msg"] == "event")
        .all(|l| l["attempt"] == 1));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn supervisor_needs_no_superuser() {
    let (db, mut c) = fresh_db("e2e_role");
    let (app, script) = ledger_app(&mut c);
    let tenant = format!("tenant_sup_{}", std::process::id());
    // The operator lets the supervisor role log in; tenants' handlers still run as tenants.
    c.batch_execute(&format!(
        "ALTER ROLE picloud_supervisor LOGIN;
         DROP ROLE IF EXISTS {tenant}; CREATE ROLE {tenant} LOGIN;
         SELECT picloud_grant_app_role('{app}', '{tenant}', 'admin');
         GRANT INSERT ON ledger TO {tenant};
         GRANT EXECUTE ON FUNCTION ledger_handler(jsonb) TO {tenant};"
    ))
    .unwrap();
    let mut t = connect_as(&db, &tenant);
    let own: Uuid = t
        .query_one(
            "SELECT picloud_create_script($1, 'own', 'sql', 'ledger_handler')",
            &[&app],
        )
        .unwrap()
        .get(0);
    let _sup = Supervisor::start_as(&db, "picloud_supervisor", FAST);
    for s in [script, own] {
        c.query_one(
            "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2)",
            &[&app, &s],
        )
        .unwrap();
    }
    assert!(eventually(Duration::from_secs(15), || count(
        &mut c,
        "SELECT count(*) FROM ledger"
    ) == 2));
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 0);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM picloud.dead_letters"),
        0
    );

    // Synchronous calls work too, although pg_stat_activity hides the callers' sessions from
    // picloud_supervisor: one caller logged in as the tenant, one that acts as it by SET ROLE.
    for set_role in [false, true] {
        let mut caller = if set_role {
            let mut caller = connect(&db);
            caller.batch_execute(&format!("SET ROLE {tenant}")).unwrap();
            caller
        } else {
            connect_as(&db, &tenant)
        };
        let (_, id, answer) = call_synchronously(&mut caller, app, own, json!({"q": 7}));
        let answer = answer.unwrap_or_else(|| {
            panic!(
                "no answer (set_role={set_role}); abandoned: {:?}",
                c.query("SELECT reason FROM picloud.abandoned_executions", &[])
                    .unwrap()
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect::<Vec<_>>()
            )
        });
        assert_eq!(answer["event_id"], json!(id.to_string()));
        assert_eq!(answer["result"], json!({"echo": {"q": 7}}));
    }
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM picloud.abandoned_executions"),
        0
    );
    drop(t);
    c.batch_execute(&format!("DROP OWNED BY {tenant}; DROP ROLE {tenant}"))
        .ok();
}

#[test]
fn claimed_sql_handlers_keep_failures_and_timeouts_to_themselves() {
    failures_and_timeouts_stay_with_their_events("0");
}

/// The same load through sql lanes: the batch with the slow handler exceeds that handler's
/// timeout as a whole and is rolled back; the failing handlers are found event by event. Each
/// of those events then runs the ordinary way, so the outcome is the same as without lanes.
#[test]
fn sql_lanes_keep_failures_and_timeouts_to_themselves() {
    failures_and_timeouts_stay_with_their_events("2");
}

fn failures_and_timeouts_stay_with_their_events(lanes: &str) {
    let (db, mut c) = fresh_db(&format!("e2e_batch_lanes{lanes}"));
    let (app, script) = ledger_app(&mut c);
    retry_quickly(&mut c, &db, 1);
    c.batch_execute(
        "CREATE FUNCTION slow_or_not(e jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             IF e->'payload'->>'slow' = 'yes' THEN PERFORM pg_sleep(3); END IF;
             INSERT INTO ledger (event_id, payload) VALUES ((e->>'event_id')::uuid, e->'payload');
         END $$;",
    )
    .unwrap();
    let slow: Uuid = c
        .query_one(
            "SELECT picloud_create_script($1, 'slow', 'sql', 'slow_or_not', 300)",
            &[&app],
        )
        .unwrap()
        .get(0);
    let start = || {
        Supervisor::start(
            &db,
            &[
                "--poll-interval-ms",
                "500",
                "--sql-lanes",
                lanes,
                "--log-level",
                "debug",
            ],
        )
    };
    // Without lanes the events are enqueued before the supervisor starts and its claims take
    // them, each sql event in a transaction of its own under its handler's 300 ms. With lanes
    // the supervisor runs first (so the lanes are connected before any claim) and all events
    // arrive in one transaction, so one lane batch takes them all; its statement timeout is
    // the slow handler's 300 ms.
    let early = (lanes != "0").then(|| {
        let sup = start();
        assert!(eventually(Duration::from_secs(15), || sup
            .log()
            .matches("sql lane connected")
            .count()
            == 2));
        sup
    });
    c.batch_execute("BEGIN").unwrap();
    for i in 0..8 {
        let payload = if i == 3 {
            json!({"slow": "yes"})
        } else {
            json!({"slow": "no"})
        };
        c.query_one(
            "SELECT picloud_enqueue($1, 'queue', 'x', $2, $3)",
            &[&app, &payload, &slow],
        )
        .unwrap();
    }
    for i in 0..40 {
        let payload = if i % 5 == 0 {
            json!({"fail": "always", "i": i})
        } else {
            json!({"i": i})
        };
        c.query_one(
            "SELECT picloud_enqueue($1, 'queue', 'x', $2, $3)",
            &[&app, &payload, &script],
        )
        .unwrap();
    }
    c.batch_execute("COMMIT").unwrap();
    let sup = match early {
        Some(sup) => sup,
        None => start(),
    };
    assert!(
        eventually(Duration::from_secs(30), || count(
            &mut c,
            "SELECT count(*) FROM picloud.outbox"
        ) == 0),
        "log: {}",
        sup.log()
    );
    // 32 of the 40 succeeded exactly once; the 8 failing ones each left one dead letter.
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM ledger WHERE payload ? 'i'"),
        32
    );
    assert_eq!(
        count(&mut c, "SELECT count(DISTINCT event_id) FROM ledger"),
        count(&mut c, "SELECT count(*) FROM ledger")
    );
    let failed = count(&mut c, "SELECT count(*) FROM picloud.dead_letters WHERE last_error LIKE '%handler failed on purpose%'");
    assert_eq!(failed, 8);
    // The slow one timed out alone; the seven others of its handler ran.
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM ledger WHERE payload->>'slow' = 'no'"
        ),
        7
    );
    let timed_out = count(
        &mut c,
        "SELECT count(*) FROM picloud.dead_letters WHERE last_error LIKE '%statement timeout%'",
    );
    assert_eq!(timed_out, 1, "log: {}", sup.log());
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM picloud.dead_letters"),
        9
    );
    if lanes != "0" {
        assert!(
            sup.log().contains("sql lane batch rolled back"),
            "the lane batch should have hit the slow handler's timeout; log: {}",
            sup.log()
        );
    }
}

/// No notification announces a retry or a run_at event coming due: the idle supervisor sleeps
/// until the next due time instead of a whole poll interval (10 s here).
#[test]
fn scheduled_events_and_retries_start_on_time_without_polling() {
    let (db, mut c) = fresh_db("e2e_on_time");
    c.batch_execute(&format!(
        "ALTER DATABASE {db} SET picloud.retry_max_attempts = 3;
         ALTER DATABASE {db} SET picloud.retry_base_delay = '300ms';
         ALTER DATABASE {db} SET picloud.retry_max_delay = '300ms';"
    ))
    .unwrap();
    let (app, script) = ledger_app(&mut c);
    let sup = Supervisor::start(&db, &["--poll-interval-ms", "10000"]);
    // Let the supervisor go idle (its first claims come back empty).
    std::thread::sleep(Duration::from_millis(500));

    let scheduled: Uuid = c
        .query_one(
            "SELECT picloud_enqueue($1, 'queue', 'later', '{}', $2, p_run_at => clock_timestamp() + interval '1.5 seconds')",
            &[&app, &script],
        )
        .unwrap()
        .get(0);
    let failing: Uuid = c
        .query_one(
            "SELECT picloud_enqueue($1, 'queue', 'x', '{\"fail\": \"always\"}', $2)",
            &[&app, &script],
        )
        .unwrap()
        .get(0);
    assert!(
        eventually(Duration::from_secs(8), || count(
            &mut c,
            &format!("SELECT count(*) FROM ledger WHERE event_id = '{scheduled}'")
        ) == 1),
        "scheduled event (due after 1.5 s) did not run within 8 s; log: {}",
        sup.log()
    );
    // Three attempts 300 ms apart end in a dead letter well before one poll interval.
    assert!(
        eventually(Duration::from_secs(5), || {
            count(
            &mut c,
            &format!("SELECT count(*) FROM picloud.dead_letters WHERE original_event_id = '{failing}' AND attempt_count = 3")
        ) == 1
        }),
        "retries waited for the poll; log: {}",
        sup.log()
    );
}

/// A sql lane whose backend is killed again and again while events flow: the lane stops
/// counting as connected when it dies (so the dispatcher stops leaving it lane events), comes
/// back, and no event waits longer than the poll interval.
#[test]
fn killed_lanes_leave_no_event_waiting_longer_than_the_poll_interval() {
    const POLL_MS: i64 = 2000;
    let (db, mut c) = fresh_db("lane_kills");
    let (app, script) = ledger_app(&mut c);
    let sup = Supervisor::start(&db, &["--poll-interval-ms", "2000", "--sql-lanes", "2"]);
    assert!(eventually(Duration::from_secs(20), || sup
        .log()
        .contains("sql lane connected")));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A lane's backend is seen by its statements (its batches, and the COMMIT or ROLLBACK it
    // sends alone, which no other supervisor connection does); watched every 25 ms, one of
    // those seen is killed every 300 ms, whatever it is doing then.
    let killer = {
        let stop = std::sync::Arc::clone(&stop);
        let db = db.clone();
        std::thread::spawn(move || {
            let mut k = connect(&db);
            let mut lanes = std::collections::BTreeSet::<i32>::new();
            let mut killed = std::collections::BTreeSet::<i32>::new();
            let mut tick = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let seen = k
                    .query(
                        "SELECT pid FROM pg_stat_activity
                         WHERE datname = current_database() AND application_name = 'picloud-supervisor'
                           AND (query IN ('COMMIT', 'ROLLBACK') OR query LIKE '%sql_lane%')",
                        &[],
                    )
                    .unwrap();
                lanes.extend(seen.iter().map(|r| r.get::<_, i32>(0)));
                tick += 1;
                if tick % 12 == 0 {
                    if let Some(pid) = lanes.difference(&killed).next().copied() {
                        let done: bool = k
                            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
                            .unwrap()
                            .get(0);
                        killed.insert(pid);
                        if !done {
                            lanes.remove(&pid);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            killed.iter().filter(|pid| lanes.contains(pid)).count()
        })
    };
    let mut enqueued = 0i64;
    for _ in 0..40 {
        c.execute(
            "SELECT picloud_enqueue($1, 'queue', 'x', jsonb_build_object('at', clock_timestamp()), $2)
             FROM generate_series(1, 25)",
            &[&app, &script],
        )
        .unwrap();
        enqueued += 25;
        std::thread::sleep(Duration::from_millis(150));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let kills = killer.join().unwrap();
    assert!(kills >= 5, "only {kills} lane backends killed");
    assert!(
        eventually(Duration::from_secs(30), || count(
            &mut c,
            "SELECT count(*) FROM ledger"
        ) == enqueued),
        "log: {}",
        sup.log()
    );
    assert_eq!(
        count(&mut c, "SELECT count(DISTINCT event_id) FROM ledger"),
        enqueued
    );
    let slowest_ms = count(
        &mut c,
        "SELECT max(extract(epoch FROM at - (payload->>'at')::timestamptz) * 1000)::int8 FROM ledger",
    );
    assert!(
        slowest_ms < POLL_MS,
        "an event waited {slowest_ms} ms (poll interval {POLL_MS} ms); log: {}",
        sup.log()
    );
}

/// Claiming ahead (`--prefetch`): once events finish quickly the dispatcher claims more than
/// its free slots, and the extra events wait for a slot; one that waits longer than a third of
/// its lease is given back to the queue (unclaimed, the attempt not counted) instead of letting
/// its lease run out in the supervisor. Every event still runs once, on its first attempt.
#[test]
fn events_claimed_ahead_are_given_back_before_their_lease_runs_out() {
    let (db, mut c) = fresh_db("e2e_ahead");
    c.batch_execute(
        "CREATE TABLE runs (event_id uuid NOT NULL, attempt int NOT NULL);
         CREATE FUNCTION paced(e jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM pg_sleep((e->'payload'->>'secs')::float8);
             INSERT INTO runs VALUES ((e->>'event_id')::uuid, (e->>'attempt')::int);
         END $$;",
    )
    .unwrap();
    let app: Uuid = c
        .query_one("SELECT picloud_create_app('ahead')", &[])
        .unwrap()
        .get(0);
    let script: Uuid = c
        .query_one(
            "SELECT picloud_create_script($1, 'paced', 'sql', 'paced')",
            &[&app],
        )
        .unwrap()
        .get(0);
    let enqueue = |c: &mut postgres::Client, n: i32, secs: f64| {
        c.execute(
            "SELECT count(*) FROM picloud_enqueue_bulk($1, 'queue', 'x',
                 ARRAY(SELECT jsonb_build_object('secs', $3::float8) FROM generate_series(1, $2)), $4)",
            &[&app, &n, &secs, &script],
        )
        .unwrap();
    };
    // Two slots, up to 8 claimed ahead, leases of 1.5 s: an event waiting for a slot is given
    // back after 0.5 s, while a slow one runs for 2 s.
    let sup = Supervisor::start(
        &db,
        &[
            "--poll-interval-ms",
            "300",
            "--log-level",
            "debug",
            "--sql-lanes",
            "0",
            "--concurrency",
            "2",
            "--max-running-per-app",
            "2",
            "--prefetch",
            "8",
            "--lease-ms",
            "1500",
        ],
    );
    // Quick events first: as they finish, claims take more than the free slots, and so the
    // slow events behind them are claimed ahead and wait.
    enqueue(&mut c, 30, 0.0);
    enqueue(&mut c, 10, 2.0);
    let held = |c: &mut postgres::Client| {
        count(
            c,
            "SELECT count(*) FROM picloud.outbox WHERE claimed_by IS NOT NULL",
        )
    };
    let mut most_held = 0;
    let given_back = |sup: &Supervisor| {
        log_lines(sup)
            .iter()
            .filter(|l| l["outcome"] == "released")
            .count()
    };
    assert!(
        eventually(Duration::from_secs(20), || {
            most_held = most_held.max(held(&mut c));
            given_back(&sup) > 0
        }),
        "an event waiting for a slot was given back: {}",
        sup.log()
    );
    assert!(most_held > 2, "more claimed than slots ({most_held})");
    assert!(
        eventually(Duration::from_secs(60), || count(
            &mut c,
            "SELECT count(*) FROM runs"
        ) == 40),
        "every event ran: {}",
        sup.log()
    );
    assert_eq!(
        count(&mut c, "SELECT count(DISTINCT event_id) FROM runs"),
        40
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM runs WHERE attempt <> 1"),
        0,
        "each ran on its first attempt: giving back does not count one"
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 0);
}

/// Claims leave first attempts of sql events to the sql lanes, and a lane picks an app by a due
/// lane event among the app's newest 1,000 rows. 1,200 events scheduled for an hour later,
/// enqueued first, must not hide the 20 due events enqueued after them: all 20 run at once (an
/// app that looked only at its oldest 1,000 rows found nothing to take for an hour).
#[test]
fn events_scheduled_for_later_do_not_hide_due_ones_from_the_lanes() {
    let (db, mut c) = fresh_db("lane_window");
    c.batch_execute(
        "CREATE TABLE ran (i integer NOT NULL);
         CREATE FUNCTION note(e jsonb) RETURNS void LANGUAGE sql
             AS $$ INSERT INTO ran VALUES ((e->'payload'->>'i')::integer) $$;",
    )
    .expect("handler");
    let app: Uuid = c
        .query_one("SELECT picloud_create_app('window')", &[])
        .expect("app")
        .get(0);
    let script: Uuid = c
        .query_one(
            "SELECT picloud_create_script($1, 'note', 'sql', 'note')",
            &[&app],
        )
        .expect("script")
        .get(0);
    c.execute(
        "SELECT count(*) FROM picloud_enqueue_bulk($1, 'queue', 'x',
             ARRAY(SELECT jsonb_build_object('i', -g) FROM generate_series(1, 1200) g), $2,
             p_run_at => now() + interval '1 hour')",
        &[&app, &script],
    )
    .expect("events for later");
    c.execute(
        "SELECT count(*) FROM picloud_enqueue_bulk($1, 'queue', 'x',
             ARRAY(SELECT jsonb_build_object('i', g) FROM generate_series(1, 20) g), $2)",
        &[&app, &script],
    )
    .expect("due events");
    let _sup = Supervisor::start(&db, FAST);
    assert!(
        eventually(Duration::from_secs(30), || count(
            &mut c,
            "SELECT count(*) FROM ran"
        ) == 20),
        "the 20 due events ran ({} did)",
        count(&mut c, "SELECT count(*) FROM ran")
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM ran WHERE i < 0"),
        0,
        "no event scheduled for later ran"
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM picloud.outbox WHERE due_at > now() + interval '50 minutes'"
        ),
        1200,
        "the events for later wait"
    );
}
