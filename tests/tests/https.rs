//! https handlers against a local TLS server (Python's http.server with a certificate from a
//! CA made in the test, trusted through --http-ca-file): delivery, Standard Webhooks
//! signatures checked by an independent implementation (Python's hmac), secret rotation,
//! redirects, Retry-After, and the allow list.

use picloud_tests::*;
use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use uuid::Uuid;

/// /ok records each request (path, headers and body) as a JSON line and answers 200; /slow
/// records it on arrival and answers 200 two seconds later; /redirect answers 302 to
/// elsewhere; /busy answers 503 with Retry-After: 30.
const SERVER: &str = r#"
import http.server, json, ssl, sys, time
cert, key, port_file, log_file = sys.argv[1:5]
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path == "/redirect":
            self.answer(302, b"", [("Location", "https://elsewhere.example/next")])
        elif self.path == "/busy":
            self.answer(503, b"busy", [("Retry-After", "30")])
        else:
            with open(log_file, "a") as log:
                log.write(json.dumps({"path": self.path,
                                      "headers": {k.lower(): v for k, v in self.headers.items()},
                                      "body": body.decode()}) + "\n")
            if self.path == "/slow":
                time.sleep(2)
            self.answer(200, b'{"ok": true}', [("Content-Type", "application/json")])
    def answer(self, status, body, headers):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
with open(port_file, "w") as f:
    f.write(str(server.server_address[1]))
server.serve_forever()
"#;

/// Standard Webhooks verification, written from the specification: every `v1,` signature in
/// the header must be the HMAC-SHA256 of `id.timestamp.body` under one of the secrets; prints
/// how many verified.
const VERIFY: &str = r#"
import base64, hashlib, hmac, json, sys
d = json.load(sys.stdin)
signed = f"{d['id']}.{d['timestamp']}.{d['body']}".encode()
keys = [base64.b64decode(s.removeprefix("whsec_")) for s in d["secrets"]]
expected = {base64.b64encode(hmac.new(k, signed, hashlib.sha256).digest()).decode() for k in keys}
sigs = [s.split(",", 1) for s in d["signature"].split(" ")]
assert all(v == "v1" for v, _ in sigs), sigs
verified = sum(1 for _, s in sigs if s in expected)
assert verified == len(sigs), (sigs, expected)
print(verified)
"#;

struct Server {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
    /// The test CA, for --http-ca-file.
    ca_file: String,
}

impl Server {
    /// A supervisor for `db` that may reach `allow` and trusts the server's CA.
    fn supervisor(&self, db: &str, allow: &str) -> Supervisor {
        let args = ["--poll-interval-ms", "500", "--http-allow", allow];
        Supervisor::start(
            db,
            &[&args[..], &["--http-ca-file", &self.ca_file]].concat(),
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// Starts the server in a directory of its own, with a certificate from a CA made for it.
fn start_server(tag: &str) -> Server {
    let dir = scratch_dir(tag);
    let ca = TestCa::new("picloud https test CA");
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let (cert, key) = ca.server_cert(&["localhost", "127.0.0.1"]);
    std::fs::write(dir.join("server.crt"), cert).unwrap();
    std::fs::write(dir.join("server.key"), key).unwrap();
    let port_file = dir.join("port");
    let log = dir.join("requests.jsonl");
    let child = Command::new("python3")
        .arg("-c")
        .arg(SERVER)
        .arg(dir.join("server.crt"))
        .arg(dir.join("server.key"))
        .arg(&port_file)
        .arg(&log)
        .stdin(Stdio::null())
        .spawn()
        .expect("python3 (run scripts/setup.sh)");
    let mut port = 0;
    assert!(eventually(Duration::from_secs(10), || {
        port = std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0);
        port != 0
    }));
    Server {
        child,
        port,
        log,
        ca_file: ca_file.to_string_lossy().into_owned(),
    }
}

/// Waits for the `n`th request /ok receives and returns it.
fn nth_request(server: &Server, n: usize, sup: &Supervisor) -> Value {
    let arrived = eventually(Duration::from_secs(20), || received(server).len() >= n);
    assert!(arrived, "log: {}", sup.log());
    received(server).swap_remove(n - 1)
}

/// Waits for the dead letter of `script`'s event and returns its error.
fn dead_letter_error(c: &mut postgres::Client, script: Uuid, sup: &Supervisor) -> String {
    let mut error = None;
    let arrived = eventually(Duration::from_secs(20), || {
        error = c
            .query_opt(
                "SELECT last_error FROM picloud.dead_letters WHERE script_id = $1",
                &[&script],
            )
            .unwrap()
            .map(|r| r.get(0));
        error.is_some()
    });
    assert!(arrived, "log: {}", sup.log());
    error.unwrap_or_default()
}

/// The requests /ok received so far.
fn received(server: &Server) -> Vec<Value> {
    std::fs::read_to_string(&server.log)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Checks a request's Standard Webhooks headers with the Python implementation; returns how
/// many signatures it carried.
fn verified_signatures(request: &Value, secrets: &[String]) -> usize {
    let headers = &request["headers"];
    let input = serde_json::json!({
        "id": headers["webhook-id"],
        "timestamp": headers["webhook-timestamp"],
        "body": request["body"],
        "signature": headers["webhook-signature"],
        "secrets": secrets,
    });
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(VERIFY)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "signature check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn script(c: &mut postgres::Client, app: Uuid, name: &str, url: &str) -> Uuid {
    c.query_one(
        "SELECT picloud_create_script($1, $2, 'http', $3, 5000)",
        &[&app, &name, &url],
    )
    .unwrap()
    .get(0)
}

/// A handler posting to `url`, with one event enqueued for it; returns the handler.
fn handler_with_event(c: &mut postgres::Client, app: Uuid, name: &str, url: &str) -> Uuid {
    let handler = script(c, app, name, url);
    enqueue(c, app, handler, "{}");
    handler
}

fn enqueue(c: &mut postgres::Client, app: Uuid, script: Uuid, payload: &str) -> Uuid {
    c.query_one(
        "SELECT picloud_enqueue($1, 'queue', 'x', $2::text::jsonb, $3)",
        &[&app, &payload, &script],
    )
    .unwrap()
    .get(0)
}

#[test]
fn https_deliveries_are_signed_checked_and_never_redirected() {
    let server = start_server("https");
    let port = server.port;
    let (db, mut c) = fresh_db("https");
    let (app, _) = ledger_app(&mut c);
    c.batch_execute(&format!(
        "ALTER DATABASE {db} SET picloud.retry_max_attempts = 1;"
    ))
    .unwrap();
    let url = |host: &str, port: u16, path: &str| format!("https://{host}:{port}/{path}");
    let hook = script(&mut c, app, "hook", &format!("https://127.0.0.1:{port}/ok"));
    let secret: String = c
        .query_one("SELECT picloud_set_handler_secret($1, $2)", &[&app, &hook])
        .unwrap()
        .get(0);
    assert!(secret.starts_with("whsec_"), "{secret}");

    let allow = format!("127.0.0.1:{port}");
    let sup = server.supervisor(&db, &allow);

    // One secret: delivered over TLS with one signature that verifies.
    let first = enqueue(&mut c, app, hook, r#"{"n": 1}"#);
    let request = &nth_request(&server, 1, &sup);
    assert_eq!(request["headers"]["webhook-id"], first.to_string());
    assert_eq!(request["headers"]["picloud-event-id"], first.to_string());
    let body: Value = serde_json::from_str(request["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["event_id"], first.to_string());
    assert_eq!(
        verified_signatures(request, std::slice::from_ref(&secret)),
        1
    );
    assert!(eventually(Duration::from_secs(10), || count(
        &mut c,
        "SELECT count(*) FROM picloud.outbox"
    ) == 0));
    drop(sup);

    // Rotated: the new secret and the previous one (still valid) both sign.
    let rotated: String = c
        .query_one("SELECT picloud_set_handler_secret($1, $2)", &[&app, &hook])
        .unwrap()
        .get(0);
    assert_ne!(rotated, secret);
    let sup = server.supervisor(&db, &allow);
    let second = enqueue(&mut c, app, hook, r#"{"n": 2}"#);
    let request = &nth_request(&server, 2, &sup);
    assert_eq!(request["headers"]["webhook-id"], second.to_string());
    assert_eq!(
        verified_signatures(request, &[rotated.clone(), secret.clone()]),
        2
    );
    // The old secret alone does not verify the new signature.
    assert_eq!(
        request["headers"]["webhook-signature"]
            .as_str()
            .unwrap()
            .split(' ')
            .count(),
        2
    );

    // A redirect is a failure naming the location; nothing follows it.
    let redirect = handler_with_event(&mut c, app, "redirect", &url("127.0.0.1", port, "redirect"));
    // Refused before any connection: an IP literal not listed, and a listed name that
    // resolves to loopback.
    let unlisted = handler_with_event(&mut c, app, "unlisted", &url("127.0.0.2", port, "ok"));
    let other_port = port.wrapping_add(1).max(1);
    let named = handler_with_event(&mut c, app, "named", &url("localhost", other_port, "ok"));
    let redirected = dead_letter_error(&mut c, redirect, &sup);
    assert!(
        redirected.contains("302") && redirected.contains("https://elsewhere.example/next"),
        "{redirected}"
    );
    let refused = dead_letter_error(&mut c, unlisted, &sup);
    assert!(refused.starts_with("http target not allowed"), "{refused}");
    let refused = dead_letter_error(&mut c, named, &sup);
    assert!(refused.contains("not in --http-allow"), "{refused}");
    assert_eq!(
        received(&server).len(),
        2,
        "nothing else reached the server"
    );
    drop(sup);

    // A listed name that resolves to loopback is refused unless the address is listed too.
    let sup = server.supervisor(&db, &format!("localhost:{port}"));
    let loopback = handler_with_event(&mut c, app, "loopback", &url("localhost", port, "ok"));
    let refused = dead_letter_error(&mut c, loopback, &sup);
    assert!(
        refused.contains("resolves to loopback address 127.0.0.1"),
        "{refused}"
    );
    assert_eq!(received(&server).len(), 2);
}

#[test]
fn retry_after_reschedules_no_earlier_than_asked() {
    let server = start_server("https-busy");
    let (db, mut c) = fresh_db("https_busy");
    let (app, _) = ledger_app(&mut c);
    // A short base delay: without Retry-After the retry would come within a second.
    c.batch_execute(&format!(
        "ALTER DATABASE {db} SET picloud.retry_max_attempts = 5;
         ALTER DATABASE {db} SET picloud.retry_base_delay = '100ms';"
    ))
    .unwrap();
    let busy = script(
        &mut c,
        app,
        "busy",
        &format!("https://127.0.0.1:{}/busy", server.port),
    );
    let sup = server.supervisor(&db, &format!("127.0.0.1:{}", server.port));
    let event = enqueue(&mut c, app, busy, "{}");
    let mut row: Option<(i32, Option<String>, Option<f64>)> = None;
    assert!(
        eventually(Duration::from_secs(20), || {
            row = c
                .query_opt(
                    "SELECT attempt_count, last_error,
                            extract(epoch FROM due_at - last_attempt_at)::float8
                     FROM picloud.outbox WHERE event_id = $1",
                    &[&event],
                )
                .unwrap()
                .map(|r| (r.get(0), r.get(1), r.get(2)));
            row.as_ref()
                .is_some_and(|(attempts, error, _)| *attempts == 1 && error.is_some())
        }),
        "log: {}",
        sup.log()
    );
    let (_, error, due_in) = row.unwrap();
    let (error, due_in) = (error.unwrap_or_default(), due_in.unwrap_or_default());
    assert!(error.starts_with("http 503"), "{error}");
    // Due no earlier than the server asked (30 s after the attempt).
    assert!(
        due_in >= 30.0,
        "due {due_in} s after the attempt; log: {}",
        sup.log()
    );
}

/// Http lanes deliver first attempts without claiming them (the outbox row is never updated:
/// locked, delivered, deleted), each once, as attempt 1; a delivery still running when its lane
/// stops waiting (500 ms) is claimed under a lease, goes on, and is completed when it ends.
#[test]
fn http_lanes_deliver_without_claims_and_hand_slow_deliveries_to_a_lease() {
    let server = start_server("https-lanes");
    let (db, mut c) = fresh_db("https_lanes");
    let (app, _) = ledger_app(&mut c);
    let url = |path: &str| format!("https://127.0.0.1:{}/{path}", server.port);
    let ok = script(&mut c, app, "ok", &url("ok"));
    let slow = script(&mut c, app, "slow", &url("slow"));
    let sup = server.supervisor(&db, &format!("127.0.0.1:{}", server.port));
    // Its connections, the http lanes among them, are up once it has gone idle and a moment
    // has passed: before that a claim may take the lanes' events, as it rightly does while no
    // http lane is connected (a race at start-up that four lanes made likelier).
    assert!(goes_idle(&mut c), "log: {}", sup.log());
    std::thread::sleep(Duration::from_millis(500));
    let updates_and_deletes = |c: &mut postgres::Client| -> (i64, i64) {
        let row = c
            .query_one(
                "SELECT n_tup_upd, n_tup_del FROM pg_stat_user_tables
                 WHERE schemaname = 'picloud' AND relname = 'outbox'",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    let before = updates_and_deletes(&mut c);
    let events: Vec<Uuid> = (0..30)
        .map(|i| enqueue(&mut c, app, ok, &format!("{{\"n\": {i}}}")))
        .collect();
    // Statistics reach pg_stat_user_tables within a few seconds of each transaction.
    let mut after = before;
    assert!(
        eventually(Duration::from_secs(20), || {
            after = updates_and_deletes(&mut c);
            after.1 - before.1 >= 30
        }),
        "deletes {after:?}; log: {}",
        sup.log()
    );
    assert_eq!(after.0, before.0, "an outbox row was updated (claimed)");
    let bodies: Vec<Value> = received(&server)
        .iter()
        .map(|r| serde_json::from_str(r["body"].as_str().unwrap_or("")).unwrap())
        .collect();
    let mut ids: Vec<String> = bodies
        .iter()
        .map(|body| body["event_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    ids.sort();
    let mut expected: Vec<String> = events.iter().map(Uuid::to_string).collect();
    expected.sort();
    assert_eq!(ids, expected, "each event delivered once");
    assert!(bodies.iter().all(|body| body["attempt"] == 1), "{bodies:?}");

    let event = enqueue(&mut c, app, slow, "{}");
    assert!(eventually(Duration::from_secs(10), || received(&server)
        .iter()
        .any(|r| r["path"] == "/slow")));
    let row = |c: &mut postgres::Client| -> Option<(Option<String>, i32)> {
        c.query_opt(
            "SELECT claimed_by, attempt_count FROM picloud.outbox WHERE event_id = $1",
            &[&event],
        )
        .unwrap()
        .map(|r| (r.get(0), r.get(1)))
    };
    // Being delivered: unclaimed, not tried, and locked by the lane's transaction.
    assert_eq!(row(&mut c), Some((None, 0)));
    let locked = c
        .query(
            "SELECT 1 FROM picloud.outbox WHERE event_id = $1 FOR UPDATE SKIP LOCKED",
            &[&event],
        )
        .unwrap();
    assert!(locked.is_empty(), "the lane holds the row");
    // Past the lane's wait: claimed under a lease, the attempt counted, still running.
    let mut seen = None;
    assert!(
        eventually(Duration::from_millis(1500), || {
            seen = row(&mut c);
            seen.as_ref().is_some_and(|(worker, _)| worker.is_some())
        }),
        "{seen:?}; log: {}",
        sup.log()
    );
    assert_eq!(seen.map(|(_, attempts)| attempts), Some(1));
    assert!(
        eventually(Duration::from_secs(10), || row(&mut c).is_none()),
        "log: {}",
        sup.log()
    );
    let dead: i64 = c
        .query_one("SELECT count(*) FROM picloud.dead_letters", &[])
        .unwrap()
        .get(0);
    assert_eq!(dead, 0, "log: {}", sup.log());
    let slow_requests = received(&server)
        .iter()
        .filter(|r| r["path"] == "/slow")
        .count();
    assert_eq!(slow_requests, 1, "delivered once");
}

/// An http lane whose connection is killed in the middle of its batches loses nothing: its
/// transaction rolls back, its events are unlocked untouched, and every event is still
/// delivered (at least once) with no dead letter.
#[test]
fn http_lanes_whose_backends_are_killed_lose_no_event() {
    let server = start_server("https-lane-kills");
    let (db, mut c) = fresh_db("https_lane_kills");
    let (app, _) = ledger_app(&mut c);
    let ok = script(
        &mut c,
        app,
        "ok",
        &format!("https://127.0.0.1:{}/ok", server.port),
    );
    let events: Vec<Uuid> = (0..300)
        .map(|i| enqueue(&mut c, app, ok, &format!("{{\"n\": {i}}}")))
        .collect();
    let sup = server.supervisor(&db, &format!("127.0.0.1:{}", server.port));
    let mut killed = 0;
    let remaining = |c: &mut postgres::Client| -> i64 {
        c.query_one("SELECT count(*) FROM picloud.outbox", &[])
            .unwrap()
            .get(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while remaining(&mut c) > 0 && std::time::Instant::now() < deadline {
        killed += c
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()
                   AND query LIKE '%picloud_lock_http_lane%'",
                &[],
            )
            .unwrap()
            .len();
        std::thread::sleep(Duration::from_millis(150));
    }
    assert_eq!(remaining(&mut c), 0, "log: {}", sup.log());
    assert!(killed > 0, "no lane backend was killed");
    let delivered: std::collections::HashSet<String> = received(&server)
        .iter()
        .filter_map(|r| serde_json::from_str::<Value>(r["body"].as_str()?).ok())
        .filter_map(|body| body["event_id"].as_str().map(str::to_owned))
        .collect();
    let missing: Vec<&Uuid> = events
        .iter()
        .filter(|id| !delivered.contains(&id.to_string()))
        .collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    let dead: i64 = c
        .query_one("SELECT count(*) FROM picloud.dead_letters", &[])
        .unwrap()
        .get(0);
    assert_eq!(dead, 0, "log: {}", sup.log());
    println!("http lane backends killed: {killed}");
}

/// One app's slow http events cannot take every executor slot through the http lanes: the cap
/// per app (--max-running-per-app) counts lane deliveries, also those handed to a lease, so
/// another app's event starts while the flood runs.
#[test]
fn an_app_flooding_slow_http_events_leaves_room_for_another_app() {
    let server = start_server("https-lane-flood");
    let (db, mut c) = fresh_db("https_lane_flood");
    let app = |c: &mut postgres::Client, name: &str| -> Uuid {
        c.query_one("SELECT picloud_create_app($1)", &[&name])
            .unwrap()
            .get(0)
    };
    let (a, b) = (app(&mut c, "flood_a"), app(&mut c, "flood_b"));
    let url = |path: &str| format!("https://127.0.0.1:{}/{path}", server.port);
    let slow = script(&mut c, a, "slow", &url("slow"));
    let ok = script(&mut c, b, "ok", &url("ok"));
    for i in 0..40 {
        enqueue(&mut c, a, slow, &format!("{{\"n\": {i}}}"));
    }
    let allow = format!("127.0.0.1:{}", server.port);
    let args = [
        "--poll-interval-ms",
        "500",
        "--http-allow",
        &allow,
        "--http-ca-file",
        &server.ca_file,
        "--concurrency",
        "4",
        "--max-running-per-app",
        "3",
    ];
    let sup = Supervisor::start(&db, &args);
    // The flood is running: four of its deliveries could fill every slot.
    assert!(eventually(Duration::from_secs(10), || received(&server)
        .iter()
        .filter(|r| r["path"] == "/slow")
        .count()
        >= 3));
    let mut waits = Vec::new();
    for i in 0..3 {
        let started = std::time::Instant::now();
        let event = enqueue(&mut c, b, ok, &format!("{{\"b\": {i}}}"));
        let arrived = eventually(Duration::from_secs(10), || {
            received(&server)
                .iter()
                .filter_map(|r| serde_json::from_str::<Value>(r["body"].as_str()?).ok())
                .any(|body| body["event_id"] == event.to_string())
        });
        assert!(arrived, "log: {}", sup.log());
        waits.push(started.elapsed());
    }
    // A slot stays free for B: its events do not wait for A's two-second deliveries.
    let worst = waits.iter().max().copied().unwrap_or_default();
    assert!(
        worst < Duration::from_millis(1500),
        "B waited {worst:?}; log: {}",
        sup.log()
    );
    let most_slow_at_once: i64 = c
        .query_one(
            "SELECT count(*) FROM picloud.outbox WHERE app_id = $1 AND claimed_by IS NOT NULL",
            &[&a],
        )
        .unwrap()
        .get(0);
    assert!(
        most_slow_at_once <= 3,
        "{most_slow_at_once} of A's events claimed"
    );
}
