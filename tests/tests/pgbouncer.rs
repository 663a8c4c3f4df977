//! PgBouncer in transaction pooling mode (the Debian package, started here): producers
//! enqueue through it with the simple query protocol while a supervisor connected directly
//! runs every event exactly once; a supervisor whose LISTEN connection goes through the pooler
//! says so at start-up.

use picloud_tests::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const PGBOUNCER: &str = "/usr/sbin/pgbouncer";

struct PgBouncer {
    child: Child,
    dir: std::path::PathBuf,
    port: u16,
}

impl Drop for PgBouncer {
    /// Stops PgBouncer itself (by its pidfile: killing `runuser` would leave it running).
    fn drop(&mut self) {
        match std::fs::read_to_string(self.dir.join("pgbouncer.pid")) {
            // runuser exits once PgBouncer has, and reaps it.
            Ok(pid) => Command::new("kill").arg(pid.trim()).status().ok(),
            Err(_) => self.child.kill().ok().map(|_| Default::default()),
        };
        self.child.wait().ok();
    }
}

impl PgBouncer {
    /// Starts PgBouncer (as the postgres OS user: it refuses to run as root) in front of the
    /// test cluster: transaction pooling, 4 server connections per database and user. On a
    /// port free a moment before; if something took it meanwhile, on another.
    fn start() -> PgBouncer {
        let mut failures = Vec::new();
        for _ in 0..3 {
            match PgBouncer::start_on(free_port()) {
                Ok(bouncer) => return bouncer,
                Err(log) => failures.push(log),
            }
        }
        panic!("pgbouncer did not start: {failures:#?}");
    }

    /// Err: PgBouncer's log, when it did not listen on `port` within 10 s.
    fn start_on(port: u16) -> Result<PgBouncer, String> {
        assert!(
            std::path::Path::new(PGBOUNCER).exists(),
            "{PGBOUNCER} is missing: run scripts/setup.sh (it installs Debian's pgbouncer)"
        );
        let dir = scratch_dir(&format!("pgbouncer-{port}"));
        let ini = dir.join("pgbouncer.ini");
        std::fs::write(dir.join("userlist.txt"), "\"postgres\" \"\"\n").unwrap();
        std::fs::write(
            &ini,
            format!(
                "[databases]\n* = host=127.0.0.1 port={cluster}\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {dir}/userlist.txt\n\
                 pool_mode = transaction\ndefault_pool_size = 4\nmax_client_conn = 200\n\
                 ignore_startup_parameters = extra_float_digits,options\n\
                 logfile = {dir}/pgbouncer.log\npidfile = {dir}/pgbouncer.pid\n",
                cluster = picloud_tests::port(),
                dir = dir.display()
            ),
        )
        .unwrap();
        Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .unwrap();
        let child = Command::new("runuser")
            .args(["-u", "postgres", "--", PGBOUNCER])
            .arg(&ini)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer (run scripts/setup.sh)");
        let bouncer = PgBouncer { child, dir, port };
        let listening = eventually(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if !listening {
            return Err(
                std::fs::read_to_string(bouncer.dir.join("pgbouncer.log")).unwrap_or_default()
            );
        }
        Ok(bouncer)
    }

    fn url(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db}",
            self.port
        )
    }
}

#[test]
fn producers_through_transaction_pooling_and_a_direct_supervisor_run_every_event_once() {
    const PRODUCERS: usize = 4;
    const PER_PRODUCER: usize = 2_500;
    const PER_TRANSACTION: usize = 10;
    let bouncer = PgBouncer::start();
    let (db, mut c) = fresh_db("pgbouncer");
    let (app, script) = ledger_app(&mut c);
    let sup = Supervisor::start(&db, &["--poll-interval-ms", "500"]);

    let producers: Vec<_> = (0..PRODUCERS)
        .map(|producer| {
            let url = bouncer.url(&db);
            std::thread::spawn(move || {
                let mut client = postgres::Client::connect(&url, postgres::NoTls)
                    .expect("connect through pgbouncer");
                // The simple protocol only: no named prepared statement, which PgBouncer
                // before 1.21 cannot keep across transactions in this mode.
                for batch in 0..PER_PRODUCER / PER_TRANSACTION {
                    let mut sql = String::from("BEGIN;");
                    for i in 0..PER_TRANSACTION {
                        let n = batch * PER_TRANSACTION + i;
                        sql.push_str(&format!(
                            "SELECT picloud.picloud_enqueue('{app}', 'queue', 'x', \
                             '{{\"producer\": {producer}, \"n\": {n}}}', '{script}');"
                        ));
                    }
                    sql.push_str("COMMIT;");
                    client
                        .batch_execute(&sql)
                        .expect("enqueue through pgbouncer");
                }
            })
        })
        .collect();
    for producer in producers {
        producer.join().expect("producer");
    }
    let total = (PRODUCERS * PER_PRODUCER) as i64;
    assert_eq!(
        count(
            &mut c,
            "SELECT (SELECT count(*) FROM picloud.outbox) + (SELECT count(*) FROM ledger)"
        ),
        total,
        "every event written"
    );
    assert!(
        eventually(Duration::from_secs(120), || count(
            &mut c,
            "SELECT count(*) FROM ledger"
        ) >= total
            && count(&mut c, "SELECT count(*) FROM picloud.outbox") == 0),
        "log: {}",
        sup.log()
    );
    // Exactly once: no event twice, every (producer, n) once.
    assert_eq!(count(&mut c, "SELECT count(*) FROM ledger"), total);
    assert_eq!(
        count(&mut c, "SELECT count(DISTINCT event_id) FROM ledger"),
        total
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(DISTINCT (payload->>'producer', payload->>'n')) FROM ledger"
        ),
        total
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM picloud.dead_letters"),
        0
    );
}

#[test]
fn a_supervisor_listening_through_transaction_pooling_says_so() {
    let bouncer = PgBouncer::start();
    let (db, _c) = fresh_db("pgbouncer_listen");
    let sup = Supervisor::start_url(&bouncer.url(&db), "pgbouncer-listen", &[]);
    assert!(
        eventually(Duration::from_secs(20), || sup
            .log()
            .contains("does not receive notifications")),
        "log: {}",
        sup.log()
    );
    assert!(sup.log().contains("transaction pooler"), "{}", sup.log());
}
