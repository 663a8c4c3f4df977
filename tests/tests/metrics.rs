//! The supervisor's --metrics-listen endpoint, end to end: real picloud-supervisor processes
//! scraped over plain TCP while they run events against a real cluster.

use picloud_tests::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// Sends `request` as is and reads the answer until the server closes the connection.
fn send(port: u16, request: &[u8]) -> std::io::Result<Answer> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    Ok(Answer {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

fn get(port: u16, path: &str) -> Answer {
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    send(port, request.as_bytes()).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// One /metrics scrape, checked for status and content type (OpenMetrics text 1.0).
fn scrape(port: u16) -> String {
    let answer = get(port, "/metrics");
    assert_eq!(answer.status, 200, "{}", answer.head);
    assert!(
        answer
            .head
            .contains("Content-Type: application/openmetrics-text; version=1.0.0"),
        "{}",
        answer.head
    );
    assert!(answer.body.ends_with("# EOF\n"), "{}", answer.body);
    answer.body
}

/// A series as Prometheus sees it: its name and its labels, whatever their order, with `le`
/// compared as a number (`0` and `0.0` are the same bucket).
fn series_key(series: &str) -> (String, Vec<(String, String)>) {
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, rest.trim_end_matches('}')),
        None => (series, ""),
    };
    let mut labels: Vec<(String, String)> = labels
        .split(',')
        .filter_map(|label| {
            let (key, value) = label.split_once('=')?;
            let value = value.trim_matches('"');
            let value = match value.parse::<f64>() {
                Ok(number) if key == "le" => number.to_string(),
                _ => value.to_string(),
            };
            Some((key.to_string(), value))
        })
        .collect();
    labels.sort();
    (name.to_string(), labels)
}

/// The value of one series, e.g. `picloud_events_completed_total{kind="sql"}`.
fn value(scraped: &str, series: &str) -> f64 {
    let wanted = series_key(series);
    scraped
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (series_key(name) == wanted)
                .then(|| value.parse().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no series {series} in:\n{scraped}"))
}

fn sql(scraped: &str, family: &str) -> f64 {
    value(scraped, &format!("{family}{{kind=\"sql\"}}"))
}

/// Starts a supervisor serving metrics on a free port and waits until /health answers 200.
fn start_with_metrics(db: &str, extra: &[&str]) -> (Supervisor, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = extra.to_vec();
    args.extend(["--metrics-listen", &listen]);
    let sup = Supervisor::start(db, &args);
    assert!(
        eventually(Duration::from_secs(20), || send(
            port,
            b"GET /health HTTP/1.1\r\n\r\n"
        )
        .is_ok_and(|a| a.status == 200)),
        "log: {}",
        sup.log()
    );
    (sup, port)
}

#[test]
fn metrics_count_a_run_of_successes_and_failures() {
    let (db, mut c) = fresh_db("metrics");
    let (app, script) = ledger_app(&mut c);
    // Failing events dead-letter after two quick attempts.
    c.batch_execute(&format!(
        "ALTER DATABASE {db} SET picloud.retry_max_attempts = 2;
         ALTER DATABASE {db} SET picloud.retry_base_delay = '50ms';
         ALTER DATABASE {db} SET picloud.retry_max_delay = '200ms';"
    ))
    .unwrap();
    let (sup, port) = start_with_metrics(&db, &["--poll-interval-ms", "500"]);

    const WAVES: i32 = 4;
    const PER_WAVE: i32 = 150;
    let mut succeeding = 0i64;
    let mut failing = 0i64;
    let mut previous_claimed = 0.0;
    let mut previous_completed = 0.0;
    for wave in 0..WAVES {
        let first = wave * PER_WAVE;
        let last = first + PER_WAVE - 1;
        // One event in ten fails on every attempt.
        c.execute(
            "SELECT picloud_enqueue($1, 'queue', 'x',
                 CASE WHEN i % 10 = 0 THEN '{\"fail\": \"always\"}'::jsonb
                      ELSE jsonb_build_object('i', i) END, $2)
             FROM generate_series($3::int, $4::int) AS i",
            &[&app, &script, &first, &last],
        )
        .unwrap();
        failing += (first..=last).filter(|i| i % 10 == 0).count() as i64;
        succeeding += (first..=last).filter(|i| i % 10 != 0).count() as i64;

        // Mid-wave: the endpoint answers while events run, and totals never go down.
        let during = scrape(port);
        assert!(sql(&during, "picloud_events_claimed_total") >= previous_claimed);
        assert!(sql(&during, "picloud_events_completed_total") >= previous_completed);

        assert!(
            eventually(Duration::from_secs(30), || count(
                &mut c,
                "SELECT count(*) FROM ledger"
            ) == succeeding),
            "log: {}",
            sup.log()
        );
        // The supervisor counts a batch once it has read the COMMIT's answer, which can be a
        // moment after the ledger rows became visible here.
        let (mut claimed, mut completed) = (previous_claimed, previous_completed);
        let counted = eventually(Duration::from_secs(5), || {
            let after = scrape(port);
            claimed = sql(&after, "picloud_events_claimed_total");
            completed = sql(&after, "picloud_events_completed_total");
            claimed > previous_claimed && completed > previous_completed
        });
        assert!(
            counted,
            "wave {wave}: claimed {claimed} after {previous_claimed}, completed {completed} after {previous_completed}"
        );
        previous_claimed = claimed;
        previous_completed = completed;
    }

    // Everything settles: the failing events are dead letters after their attempts.
    assert!(
        eventually(Duration::from_secs(30), || count(
            &mut c,
            "SELECT count(*) FROM picloud.dead_letters"
        ) == failing
            && count(&mut c, "SELECT count(*) FROM picloud.outbox") == 0),
        "log: {}",
        sup.log()
    );
    let attempts_failed = count(
        &mut c,
        "SELECT coalesce(sum(attempt_count), 0)::int8 FROM picloud.dead_letters",
    );
    assert_eq!(attempts_failed, failing * 2);
    let ledger = count(&mut c, "SELECT count(*) FROM ledger");
    assert_eq!(ledger, succeeding);

    // The counters are bumped just after each commit; give the last ones a moment.
    let mut last = String::new();
    let settled = eventually(Duration::from_secs(10), || {
        last = scrape(port);
        sql(&last, "picloud_events_completed_total") == ledger as f64
            && sql(&last, "picloud_events_failed_total") == attempts_failed as f64
            && value(&last, "picloud_executors_busy") == 0.0
    });
    assert!(settled, "final scrape:\n{last}");
    let completed = sql(&last, "picloud_events_completed_total");
    let failed = sql(&last, "picloud_events_failed_total");
    assert!(failed > 0.0);
    assert_eq!(
        sql(&last, "picloud_events_dead_lettered_total"),
        failing as f64
    );
    // Nothing was released, lost or left unreported, so every claim ended in one of the two.
    assert_eq!(
        sql(&last, "picloud_events_claimed_total"),
        completed + failed
    );
    assert_eq!(
        sql(&last, "picloud_handler_duration_seconds_count"),
        completed + failed
    );
    assert_eq!(
        value(
            &last,
            "picloud_handler_duration_seconds_bucket{kind=\"sql\",le=\"+Inf\"}"
        ),
        completed + failed
    );
    assert!(sql(&last, "picloud_handler_duration_seconds_sum") > 0.0);
    let sql_kind = ("kind".to_string(), "sql".to_string());
    let buckets: Vec<f64> = last
        .lines()
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            let (name, labels) = series_key(series);
            name == "picloud_handler_duration_seconds_bucket" && labels.contains(&sql_kind)
        })
        .filter_map(|(_, value)| value.parse().ok())
        .collect();
    assert!(buckets.len() > 2);
    assert!(
        buckets.windows(2).all(|w| w[0] <= w[1]),
        "buckets not cumulative: {buckets:?}"
    );
    for kind in ["http", "command"] {
        let series = format!("picloud_events_claimed_total{{kind=\"{kind}\"}}");
        assert_eq!(value(&last, &series), 0.0);
    }
    assert_eq!(value(&last, "picloud_lease_lost_total"), 0.0);
    assert_eq!(
        value(
            &last,
            "picloud_db_reconnects_total{connection=\"dispatcher\"}"
        ),
        0.0
    );
    assert_eq!(value(&last, "picloud_db_connected"), 1.0);
    assert_eq!(value(&last, "picloud_up"), 1.0);
    // The first claim, before any event, came back empty.
    assert!(value(&last, "picloud_claim_batch_size_bucket{le=\"0\"}") >= 1.0);
    // Events reach handlers three ways: dispatcher claims, sql lane batches (first attempts,
    // set-based) and, for events of a lane batch that failed, claims by id. Retries always go
    // through the dispatcher: each failing event's second attempt at least.
    assert!(value(&last, "picloud_claim_batch_size_sum") >= failing as f64);
    assert!(
        value(&last, "picloud_sql_lane_batches_total") >= 1.0,
        "{last}"
    );
    assert!(
        value(&last, "picloud_sql_lane_fallbacks_total") >= failing as f64,
        "{last}"
    );
    for family in [
        "picloud_events_claimed_total",
        "picloud_events_completed_total",
        "picloud_events_failed_total",
        "picloud_handler_duration_seconds",
        "picloud_claim_batch_size",
        "picloud_lease_renewals_total",
        "picloud_lease_lost_total",
        "picloud_db_reconnects_total",
        "picloud_executors_busy",
        "picloud_up",
        "picloud_build_info",
    ] {
        // OpenMetrics names a counter's family without the `_total` of its series.
        let family = family.strip_suffix("_total").unwrap_or(family);
        let lines = format!("\n{last}");
        assert!(
            lines.contains(&format!("\n# HELP {family} ")),
            "no HELP for {family}"
        );
        assert!(
            lines.contains(&format!("\n# TYPE {family} ")),
            "no TYPE for {family}"
        );
    }

    // Health while connected, and the other answers.
    let health = get(port, "/health");
    assert_eq!(health.status, 200, "{}", health.body);
    let body: serde_json::Value = serde_json::from_str(health.body.trim()).unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(get(port, "/healthz").status, 200);
    assert_eq!(get(port, "/nope").status, 404);
    let post = send(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").unwrap();
    assert_eq!(post.status, 405);
    assert!(post.head.contains("Allow: GET"), "{}", post.head);
    assert_eq!(send(port, b"hello\r\n\r\n").unwrap().status, 400);
    // A head without its end within the server's 8 KiB limit. Exactly 8 KiB, so that the
    // server has read all of it when it answers (unread bytes would make the close a reset).
    let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    huge.resize(8 * 1024, b'a');
    assert_eq!(send(port, &huge).unwrap().status, 431);
}

/// A connection that never finishes its request is closed after the server's 5 s read
/// timeout (hyper closes it without an answer), and does not stop others from being served
/// meanwhile.
#[test]
fn a_silent_client_does_not_hold_up_the_endpoint() {
    let (db, _c) = fresh_db("metrics_slow");
    let (_sup, port) = start_with_metrics(&db, &[]);
    let mut silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    silent.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // Others are answered while the silent one waits.
    assert_eq!(get(port, "/health").status, 200);
    assert!(scrape(port).contains("picloud_up 1"));
    // The server gives up on it by itself (the client would wait 20 s).
    let mut answer = Vec::new();
    silent.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408 "),
        "{answer}"
    );
}

/// The supervisor does not exit when the database cannot be reached at startup: it keeps
/// retrying, and /health says so with a 503 until the database answers.
#[test]
fn health_is_503_while_the_database_is_unreachable_and_200_once_it_answers() {
    let (db, _c) = fresh_db("metrics_down");
    let database_port = free_port();
    let port = free_port();
    let log_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/it-logs");
    std::fs::create_dir_all(&log_dir).unwrap();
    let log_path = log_dir.join(format!("supervisor-{db}-unreachable.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(supervisor_bin())
        .args([
            "--database-url",
            &format!(
                "host=127.0.0.1 port={database_port} user=postgres dbname={db} connect_timeout=2"
            ),
            "--metrics-listen",
            &format!("127.0.0.1:{port}"),
            "--log-format",
            "text",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start picloud-supervisor (build it first: cargo build -p picloud-supervisor)");
    let mut sup = Supervisor { child, log_path };

    let mut health = None;
    assert!(
        eventually(Duration::from_secs(20), || {
            health = send(port, b"GET /health HTTP/1.1\r\n\r\n").ok();
            health.is_some()
        }),
        "log: {}",
        sup.log()
    );
    let health = health.unwrap();
    assert_eq!(health.status, 503, "{}", health.body);
    let body: serde_json::Value = serde_json::from_str(health.body.trim()).unwrap();
    assert_eq!(body["status"], "unavailable");
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("database unreachable")),
        "{body}"
    );
    assert!(
        eventually(Duration::from_secs(10), || value(
            &scrape(port),
            "picloud_db_reconnects_total{connection=\"dispatcher\"}"
        ) >= 2.0),
        "log: {}",
        sup.log()
    );
    let scraped = scrape(port);
    assert_eq!(value(&scraped, "picloud_db_connected"), 0.0);
    assert_eq!(value(&scraped, "picloud_up"), 1.0);
    assert_eq!(get(port, "/health").status, 503);
    assert!(
        sup.child.try_wait().unwrap().is_none(),
        "the supervisor exited: {}",
        sup.log()
    );
    // --log-format text: no JSON lines, and the retries are readable.
    let log = sup.log();
    assert!(log.lines().all(|l| !l.starts_with('{')), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains(" warn  dispatcher reconnecting error=")),
        "{log}"
    );

    // The database comes back (a forwarder to the cluster on the port it was given):
    // health turns 200 once the dispatcher has reconnected.
    let forwarder = TcpListener::bind(("127.0.0.1", database_port))
        .expect("the database port was taken meanwhile");
    std::thread::spawn(move || forward(forwarder, picloud_tests::port()));
    assert!(
        eventually(Duration::from_secs(30), || get(port, "/health").status
            == 200),
        "log: {}",
        sup.log()
    );
    assert_eq!(value(&scrape(port), "picloud_db_connected"), 1.0);
    sup.kill();
}

/// Forwards every connection to the cluster, until the test process ends.
fn forward(listener: TcpListener, to_port: u16) {
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let Ok(server) = TcpStream::connect(("127.0.0.1", to_port)) else {
            continue;
        };
        let (Ok(mut client_read), Ok(mut server_read)) = (client.try_clone(), server.try_clone())
        else {
            continue;
        };
        let (mut client_write, mut server_write) = (client, server);
        std::thread::spawn(move || {
            std::io::copy(&mut client_read, &mut server_write).ok();
            server_write.shutdown(std::net::Shutdown::Both).ok();
        });
        std::thread::spawn(move || {
            std::io::copy(&mut server_read, &mut client_write).ok();
            client_write.shutdown(std::net::Shutdown::Both).ok();
        });
    }
}

#[test]
fn a_metrics_address_in_use_stops_the_supervisor_at_startup() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let mut sup = Supervisor::start(&worker_db(), &["--metrics-listen", &listen]);
    let mut status = None;
    assert!(eventually(Duration::from_secs(10), || {
        status = sup.child.try_wait().ok().flatten();
        status.is_some()
    }));
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{}", sup.log());
    let log = sup.log();
    assert!(
        log.contains("could not listen on the --metrics-listen address") && log.contains(&listen),
        "{log}"
    );
    drop(taken);
}

/// An enqueue on an idle queue names, in its wake-up, the lane that takes its event, and only
/// that lane looks for work: while a sql lane serves, the dispatcher makes no claim for sql
/// events (its looks competed with the lane for the cores). The dispatcher acts on the same
/// wake-ups when no sql lane runs (`--sql-lanes 0`), and is woken for the events of a handler
/// with a concurrency limit, which only claims run: the events start at once in every case,
/// long before the poll interval. Each event that is alone in its transaction and for a sql
/// lane is named in its wake-up, and the lane locks it by its key
/// (picloud_lock_sql_lane_event_for_run, counted by track_functions).
#[test]
fn wake_ups_for_a_lane_leave_the_dispatcher_idle() {
    let (db, mut c) = fresh_db("wake_for_lane");
    c.batch_execute(&format!("ALTER DATABASE {db} SET track_functions = 'all'"))
        .unwrap();
    let (app, script) = ledger_app(&mut c);
    const EVENTS: i64 = 10;
    let lone_locks = |c: &mut postgres::Client| {
        count(
            c,
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_user_functions
             WHERE funcname = 'picloud_lock_sql_lane_event_for_run'",
        )
    };
    // (sql lanes, the handler's concurrency limit (None: none), whether the dispatcher claims)
    for (lanes, limit, dispatcher_claims) in
        [("1", None, false), ("0", None, true), ("1", Some(5), true)]
    {
        c.batch_execute("TRUNCATE ledger").unwrap();
        c.execute(
            "SELECT picloud_set_handler_max_concurrency($1, $2, $3)",
            &[&app, &script, &limit],
        )
        .unwrap();
        let (sup, port) =
            start_with_metrics(&db, &["--poll-interval-ms", "60000", "--sql-lanes", lanes]);
        let claims = || value(&scrape(port), "picloud_claim_batch_size_count");
        // Idle: the first claims came back empty and the recheck after them is done.
        assert!(goes_idle(&mut c), "log: {}", sup.log());
        std::thread::sleep(Duration::from_millis(300));
        let before = claims();
        let lone_before = lone_locks(&mut c);
        for i in 1..=EVENTS {
            c.execute(
                "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2)",
                &[&app, &script],
            )
            .unwrap();
            assert!(
                eventually(Duration::from_secs(5), || count(
                    &mut c,
                    "SELECT count(*) FROM ledger"
                ) == i),
                "event {i} did not start on its wake-up (--sql-lanes {lanes}, limit {limit:?}); log: {}",
                sup.log()
            );
            // Idle again before the next one, so that it is announced too.
            std::thread::sleep(Duration::from_millis(100));
        }
        let made = claims() - before;
        if dispatcher_claims {
            assert!(
                made >= EVENTS as f64,
                "the dispatcher claimed only {made} times for {EVENTS} events (--sql-lanes {lanes}, limit {limit:?})"
            );
        } else {
            assert!(
                made < 2.0,
                "the dispatcher claimed {made} times for {EVENTS} sql lane events"
            );
        }
        let log = sup.log();
        // Its connections' function counts reach the statistics when they end.
        drop(sup);
        if lanes == "1" && limit.is_none() {
            assert!(
                eventually(Duration::from_secs(10), || lone_locks(&mut c)
                    >= lone_before + EVENTS),
                "the lane locked {} named events of {EVENTS}; log: {log}",
                lone_locks(&mut c) - lone_before
            );
        }
    }
}
