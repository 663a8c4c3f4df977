//! TLS to Postgres: a cluster of its own with `ssl = on` and a server certificate signed by a
//! CA made in the test, and real supervisors connecting with libpq's sslmodes.

use picloud_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The cluster's port (55450-55459 are this suite's).
const PORT: u16 = 55451;
const DB: &str = "picloud_tls";

/// A running cluster with TLS, stopped when dropped.
struct TlsCluster {
    data: PathBuf,
    dir: PathBuf,
}

impl TlsCluster {
    /// Initialises and starts the cluster with a server certificate for `localhost` only (so
    /// connecting to 127.0.0.1 is a name mismatch under verify-full).
    fn start(ca: &TestCa) -> TlsCluster {
        let dir = scratch_dir("tls");
        let data = dir.join("data");
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let script = root.join("scripts/cluster.sh");
        let cluster = |args: &[&str]| {
            let status = Command::new("bash")
                .arg(&script)
                .args(args)
                .status()
                .expect("run scripts/cluster.sh");
            assert!(status.success(), "scripts/cluster.sh {args:?} failed");
        };
        let data_text = data.to_string_lossy().into_owned();
        let (cert, key) = ca.server_cert(&["localhost"]);
        cluster(&["start", &data_text, &PORT.to_string(), DB]);
        std::fs::write(data.join("server.crt"), cert).unwrap();
        std::fs::write(data.join("server.key"), key).unwrap();
        for file in ["server.crt", "server.key"] {
            let path = data.join(file);
            Command::new("chown")
                .arg("postgres:postgres")
                .arg(&path)
                .status()
                .unwrap();
            Command::new("chmod")
                .arg("600")
                .arg(&path)
                .status()
                .unwrap();
        }
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        use std::io::Write;
        writeln!(
            conf,
            "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'"
        )
        .unwrap();
        let status = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(format!("{}/pg_ctl", pg_bindir()))
            .args(["-D", &data_text, "-w", "-l"])
            .arg(data.join("server.log"))
            .arg("restart")
            .status()
            .unwrap();
        assert!(status.success(), "pg_ctl restart failed");
        let cluster = TlsCluster { data, dir };
        cluster
            .client()
            .batch_execute("CREATE EXTENSION IF NOT EXISTS picloud")
            .unwrap();
        cluster
    }

    fn client(&self) -> postgres::Client {
        let mut client = postgres::Client::connect(
            &format!("host=127.0.0.1 port={PORT} user=postgres dbname={DB}"),
            postgres::NoTls,
        )
        .expect("connect to the TLS cluster without TLS");
        client
            .batch_execute("SET search_path = public, picloud")
            .unwrap();
        client
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        Command::new("bash")
            .arg(root.join("scripts/cluster.sh"))
            .arg("stop")
            .arg(&self.data)
            .status()
            .ok();
    }
}

fn pg_bindir() -> String {
    let out = Command::new("/usr/bin/pg_config")
        .arg("--bindir")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn database_url(host: &str, tls: &str) -> String {
    format!("host={host} port={PORT} user=postgres dbname={DB} connect_timeout=5 {tls}")
}

/// The ledger app of the TLS cluster and how many events it has run so far.
struct Ledger {
    app: uuid::Uuid,
    script: uuid::Uuid,
    ran: i64,
}

/// Runs `n` events through a supervisor on `url` and checks they all ran, over TLS.
fn events_run_end_to_end(cluster: &TlsCluster, ledger: &mut Ledger, url: &str, tag: &str, n: i64) {
    let mut c = cluster.client();
    let sup = Supervisor::start_url(url, tag, &["--poll-interval-ms", "500"]);
    c.execute(
        "SELECT picloud_enqueue($1, 'queue', 'tls', jsonb_build_object('i', i), $2) FROM generate_series(1, $3::int8) AS i",
        &[&ledger.app, &ledger.script, &n],
    )
    .unwrap();
    ledger.ran += n;
    assert!(
        eventually(Duration::from_secs(30), || count(
            &mut c,
            "SELECT count(*) FROM ledger"
        ) == ledger.ran
            && count(&mut c, "SELECT count(*) FROM picloud.outbox") == 0),
        "log: {}",
        sup.log()
    );
    // Every connection the supervisor holds is encrypted.
    let connections = |c: &mut postgres::Client, ssl: bool| {
        count(
            c,
            &format!(
                "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                 WHERE a.application_name = 'picloud-supervisor' AND s.ssl = {ssl}"
            ),
        )
    };
    assert_eq!(connections(&mut c, false), 0, "log: {}", sup.log());
    assert!(connections(&mut c, true) >= 1);
}

fn exits_with_2_naming_the_certificate(url: &str, tag: &str) {
    let mut sup = Supervisor::start_url(url, tag, &[]);
    let status = sup.exited_within(Duration::from_secs(30));
    assert_eq!(status.and_then(|s| s.code()), Some(2), "log: {}", sup.log());
    let log = sup.log();
    assert!(
        log.contains("certificate does not verify") && log.contains("sslmode=verify-full"),
        "{log}"
    );
}

#[test]
fn tls_modes_against_a_cluster_with_a_test_ca() {
    let ca = TestCa::new("picloud test CA");
    let cluster = TlsCluster::start(&ca);
    let root = cluster.write("root.pem", &ca.pem());
    let wrong = cluster.write("wrong.pem", &TestCa::new("another CA").pem());
    let (app, script) = ledger_app(&mut cluster.client());
    let ledger = &mut Ledger {
        app,
        script,
        ran: 0,
    };

    // verify-full with the right root and the certificate's name: events run over TLS.
    let full = database_url(
        "localhost",
        &format!("sslmode=verify-full sslrootcert={root}"),
    );
    events_run_end_to_end(&cluster, ledger, &full, "tls-full", 200);

    // The URL form works the same.
    let url =
        format!("postgres://postgres@localhost:{PORT}/{DB}?sslmode=verify-full&sslrootcert={root}");
    events_run_end_to_end(&cluster, ledger, &url, "tls-url", 20);

    // A root that did not sign the server's certificate: a clear start-up error, exit 2.
    let wrong_root = database_url(
        "localhost",
        &format!("sslmode=verify-full sslrootcert={wrong}"),
    );
    exits_with_2_naming_the_certificate(&wrong_root, "tls-wrong-root");

    // The right root, but a host the certificate does not name: verify-full refuses ...
    let other_name = database_url(
        "127.0.0.1",
        &format!("sslmode=verify-full sslrootcert={root}"),
    );
    exits_with_2_naming_the_certificate(&other_name, "tls-wrong-name");
    // ... verify-ca checks only the chain.
    let chain_only = database_url(
        "127.0.0.1",
        &format!("sslmode=verify-ca sslrootcert={root}"),
    );
    events_run_end_to_end(&cluster, ledger, &chain_only, "tls-ca", 20);

    // require: encrypted, no certificate check.
    events_run_end_to_end(
        &cluster,
        ledger,
        &database_url("127.0.0.1", "sslmode=require"),
        "tls-require",
        20,
    );
}
