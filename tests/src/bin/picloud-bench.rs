//! picloud-bench: measures picloud against plain-SQL baselines on a running cluster.
//!
//! Run it through scripts/bench.sh, which builds everything, starts a throwaway cluster and
//! passes its coordinates in the environment:
//!   PICLOUD_BENCH_PORT        cluster port (default 55450)
//!   PICLOUD_BENCH_DB          database with CREATE EXTENSION picloud done (default picloud_bench)
//!   PICLOUD_BENCH_SUPERVISOR  picloud-supervisor binary (default target/release/picloud-supervisor)
//!   BENCH_QUICK=1             short smoke run (seconds per case, fewer events)
//!   BENCH_RUNS                runs per case (default 3); every figure is the median with min–max
//!   BENCH_OUT                 output directory (default target/bench)
//!   BENCH_ONLY=E1,L1          run only these cases (for diagnosis)
//!   BENCH_SUPERVISOR_ARGS='--sql-lanes 3'  extra supervisor flags (for trying settings)
//!   BENCH_L1_GAP_MS           gap between L1 samples (default 20)
//!   BENCH_B1_WAIT_S           longest wait for autovacuum in B1 (default 60, quick 20)
//!
//! Each picloud case runs side by side with its baseline in the same run (the order of the
//! two alternates between runs). Output: one table on stdout, results.md and results.json in
//! BENCH_OUT. Progress goes to stderr.

use postgres::{Client, NoTls};
use rustls::pki_types::pem::PemObject;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

// Configuration ---------------------------------------------------------------------------------

struct Cfg {
    quick: bool,
    runs: usize,
    port: u16,
    db: String,
    supervisor: String,
    out: PathBuf,
    e1_secs: u32,
    e2_events: i64,
    p1_events: i64,
    p1_http_events: i64,
    l1_samples: usize,
    m1_secs: u32,
    g1_rows: i64,
    b1_events: i64,
    b1_wait: Duration,
    drain_timeout: Duration,
    /// Cases to run (BENCH_ONLY=E1,L1); all when empty.
    only: Vec<String>,
    /// Gap between L1 samples (BENCH_L1_GAP_MS, default 20).
    l1_gap_ms: u64,
    /// Extra supervisor flags for every case (BENCH_SUPERVISOR_ARGS, space-separated), for
    /// trying settings; the published figures use the defaults.
    supervisor_args: Vec<String>,
}

impl Cfg {
    fn from_env() -> Cfg {
        fn pick<T>(quick: bool, quick_value: T, full_value: T) -> T {
            if quick {
                quick_value
            } else {
                full_value
            }
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let quick = env("BENCH_QUICK").map(|v| v != "0").unwrap_or(false);
        Cfg {
            quick,
            runs: env("BENCH_RUNS")
                .and_then(|v| v.parse().ok())
                .unwrap_or(3)
                .max(1),
            port: env("PICLOUD_BENCH_PORT")
                .and_then(|v| v.parse().ok())
                .unwrap_or(55450),
            db: env("PICLOUD_BENCH_DB").unwrap_or_else(|| "picloud_bench".into()),
            supervisor: env("PICLOUD_BENCH_SUPERVISOR").unwrap_or_else(|| {
                root.join("target/release/picloud-supervisor")
                    .to_string_lossy()
                    .into_owned()
            }),
            out: env("BENCH_OUT")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target/bench")),
            e1_secs: pick(quick, 3, 20),
            e2_events: pick(quick, 20_000, 100_000),
            p1_events: pick(quick, 5_000, 50_000),
            p1_http_events: pick(quick, 2_000, 20_000),
            l1_samples: pick(quick, 60, 200),
            m1_secs: pick(quick, 3, 10),
            g1_rows: pick(quick, 100_000, 1_000_000),
            b1_events: pick(quick, 20_000, 200_000),
            b1_wait: Duration::from_secs(
                env("BENCH_B1_WAIT_S")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(pick(quick, 20, 60)),
            ),
            drain_timeout: Duration::from_secs(pick(quick, 180, 900)),
            only: env("BENCH_ONLY")
                .map(|v| {
                    v.split(',')
                        .map(|s| s.trim().to_ascii_uppercase())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            supervisor_args: env("BENCH_SUPERVISOR_ARGS")
                .map(|v| v.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
            l1_gap_ms: env("BENCH_L1_GAP_MS")
                .and_then(|v| v.parse().ok())
                .unwrap_or(20)
                .max(1),
        }
    }

    fn wants(&self, id: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o.eq_ignore_ascii_case(id))
    }

    fn url(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db} application_name=picloud-bench",
            self.port
        )
    }
}

type Res<T> = Result<T, String>;

fn err<E: std::fmt::Display>(context: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{context}: {e}")
}

fn pg_err(context: &str) -> impl FnOnce(postgres::Error) -> String + '_ {
    move |e| match e.as_db_error() {
        Some(d) => format!("{context}: {} ({})", d.message(), d.code().code()),
        None => format!("{context}: {e}"),
    }
}

fn progress(msg: &str) {
    eprintln!("[bench] {msg}");
}

// Statistics and the result table -----------------------------------------------------------------

#[derive(Clone, Debug)]
struct Stat {
    values: Vec<f64>,
    median: f64,
    min: f64,
    max: f64,
}

/// Per-run ratios: each run measures both sides one right after the other, so a ratio of the
/// same run cancels most of the machine's drift between runs. Targets on ratios are judged on
/// their median, the figure the table shows.
fn ratios(num: &[f64], den: &[f64]) -> Vec<f64> {
    num.iter().zip(den).map(|(a, b)| a / b).collect()
}

fn median_ratio(num: &[f64], den: &[f64]) -> f64 {
    stat(&ratios(num, den)).median
}

fn stat(values: &[f64]) -> Stat {
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = v.len();
    let median = if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Stat {
        values: values.to_vec(),
        median,
        min: v.first().copied().unwrap_or(f64::NAN),
        max: v.last().copied().unwrap_or(f64::NAN),
    }
}

/// Nearest-rank percentile of unsorted samples.
fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    let abs = x.abs();
    if abs >= 1000.0 {
        let s = format!("{:.0}", x.abs());
        let mut out = String::new();
        for (i, ch) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(ch);
        }
        if x < 0.0 {
            out.insert(0, '-');
        }
        out
    } else if abs >= 100.0 {
        format!("{x:.0}")
    } else if abs >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn fmt_stat(s: &Option<Stat>, unit: &str) -> String {
    let unit = if unit.is_empty() {
        String::new()
    } else {
        format!(" {unit}")
    };
    match s {
        None => "—".into(),
        Some(s) if s.values.len() == 1 => format!("{}{unit}", fmt_num(s.median)),
        Some(s) => format!(
            "{}{unit} ({}–{})",
            fmt_num(s.median),
            fmt_num(s.min),
            fmt_num(s.max)
        ),
    }
}

fn fmt_ratio(s: &Option<Stat>) -> String {
    match s {
        None => "—".into(),
        Some(s) if s.values.len() == 1 => format!("{:.2}×", s.median),
        Some(s) => format!("{:.2}× ({:.2}–{:.2})", s.median, s.min, s.max),
    }
}

#[derive(Clone, Debug)]
struct Row {
    id: String,
    measure: String,
    unit: String,
    picloud: Option<Stat>,
    baseline_label: String,
    baseline: Option<Stat>,
    baseline_unit: String,
    ratio: Option<Stat>,
    target: String,
    pass: Option<bool>,
    error: Option<String>,
}

impl Row {
    fn new(id: &str, measure: &str, unit: &str) -> Row {
        Row {
            id: id.into(),
            measure: measure.into(),
            unit: unit.into(),
            picloud: None,
            baseline_label: String::new(),
            baseline: None,
            baseline_unit: String::new(),
            ratio: None,
            target: "—".into(),
            pass: None,
            error: None,
        }
    }

    fn value(mut self, values: &[f64]) -> Row {
        self.picloud = Some(stat(values));
        self
    }

    fn baseline(mut self, label: &str, values: &[f64], unit: &str) -> Row {
        self.baseline_label = label.into();
        self.baseline = Some(stat(values));
        self.baseline_unit = unit.into();
        self
    }

    /// Per-run ratio picloud / baseline, so each ratio compares figures of the same run.
    fn ratio_of(mut self, num: &[f64], den: &[f64]) -> Row {
        self.ratio = Some(stat(&ratios(num, den)));
        self
    }

    fn target(mut self, text: &str, pass: bool) -> Row {
        self.target = text.into();
        self.pass = Some(pass);
        self
    }

    fn failed(id: &str, measure: &str, error: String) -> Row {
        let mut row = Row::new(id, measure, "");
        row.error = Some(error);
        row
    }

    fn result(&self) -> &'static str {
        if self.error.is_some() {
            return "ERROR";
        }
        match self.pass {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "",
        }
    }

    fn cells(&self) -> Vec<String> {
        let baseline = match &self.baseline {
            None => "—".into(),
            Some(_) => format!(
                "{}: {}",
                self.baseline_label,
                fmt_stat(&self.baseline, &self.baseline_unit)
            ),
        };
        let picloud = match &self.error {
            Some(e) => format!("ERROR: {}", e.chars().take(100).collect::<String>()),
            None => fmt_stat(&self.picloud, &self.unit),
        };
        vec![
            self.id.clone(),
            self.measure.clone(),
            picloud,
            baseline,
            fmt_ratio(&self.ratio),
            self.target.clone(),
            self.result().into(),
        ]
    }

    fn to_json(&self) -> Value {
        let s = |s: &Option<Stat>| match s {
            None => Value::Null,
            Some(s) => json!({"median": num(s.median), "min": num(s.min), "max": num(s.max),
                              "runs": s.values.iter().map(|v| num(*v)).collect::<Vec<_>>()}),
        };
        json!({
            "id": self.id, "measure": self.measure, "unit": self.unit,
            "picloud": s(&self.picloud),
            "baseline_label": self.baseline_label, "baseline": s(&self.baseline), "baseline_unit": self.baseline_unit,
            "ratio": s(&self.ratio), "target": self.target, "result": self.result(), "error": self.error,
        })
    }
}

fn num(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    }
}

const HEADERS: [&str; 7] = [
    "ID",
    "Measure",
    "picloud (median, min–max)",
    "baseline",
    "ratio",
    "target",
    "result",
];

fn text_table(rows: &[Row]) -> String {
    let cells: Vec<Vec<String>> = rows.iter().map(Row::cells).collect();
    let mut widths: Vec<usize> = HEADERS.iter().map(|h| h.chars().count()).collect();
    for r in &cells {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |r: &[String]| {
        let parts: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c}{}", " ".repeat(widths[i] - c.chars().count())))
            .collect();
        format!("| {} |", parts.join(" | "))
    };
    let sep = format!(
        "|{}|",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("|")
    );
    let mut out = vec![sep.clone(), line(&HEADERS.map(String::from)), sep.clone()];
    let mut last_group = String::new();
    for (row, r) in rows.iter().zip(&cells) {
        let group: String = row.id.chars().take(2).collect();
        if !last_group.is_empty() && group != last_group {
            out.push(sep.clone());
        }
        last_group = group;
        out.push(line(r));
    }
    out.push(sep);
    out.join("\n")
}

fn markdown_table(rows: &[Row]) -> String {
    let mut out = vec![
        format!("| {} |", HEADERS.join(" | ")),
        format!(
            "|{}|",
            HEADERS.iter().map(|_| "---").collect::<Vec<_>>().join("|")
        ),
    ];
    for r in rows {
        let cells: Vec<String> = r.cells().iter().map(|c| c.replace('|', "\\|")).collect();
        out.push(format!("| {} |", cells.join(" | ")));
    }
    out.join("\n")
}

// Database helpers --------------------------------------------------------------------------------

fn connect(cfg: &Cfg, db: &str) -> Res<Client> {
    let mut c =
        Client::connect(&cfg.url(db), NoTls).map_err(pg_err(&format!("connect to {db}")))?;
    c.batch_execute("SET search_path = public, picloud")
        .map_err(pg_err("set search_path"))?;
    Ok(c)
}

fn exec(c: &mut Client, sql: &str) -> Res<()> {
    c.batch_execute(sql)
        .map_err(pg_err(sql.lines().next().unwrap_or(sql)))
}

fn count(c: &mut Client, sql: &str) -> Res<i64> {
    Ok(c.query_one(sql, &[]).map_err(pg_err(sql))?.get::<_, i64>(0))
}

/// Creates `db` with the extension unless it exists.
fn ensure_db(cfg: &Cfg, db: &str) -> Res<Client> {
    let mut admin = connect(cfg, "postgres")?;
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
        .map_err(pg_err("look up database"))?
        .is_some();
    if !exists {
        exec(&mut admin, &format!("CREATE DATABASE \"{db}\""))?;
    }
    let mut c = connect(cfg, db)?;
    exec(&mut c, "CREATE EXTENSION IF NOT EXISTS picloud")?;
    Ok(c)
}

/// Before every measured step: a checkpoint, so neither side pays for the other's dirty
/// buffers and full-page writes.
/// Starts a case from a quiet disk: a checkpoint, then the kernel's dirty pages written out
/// (an earlier case's writes, flushed in the background, would otherwise compete with this
/// case's commits for the disk, which shows in commit latency).
fn settle(c: &mut Client) -> Res<()> {
    exec(c, "CHECKPOINT")?;
    let start = Instant::now();
    loop {
        // sync(1) flushes every dirty page of the machine and waits for it.
        let _ = Command::new("sync").status();
        if dirty_kib() < 4096 || start.elapsed() > Duration::from_secs(30) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The kernel's dirty and under-writeback memory, in KiB (0 if /proc/meminfo is unreadable).
fn dirty_kib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .filter(|l| l.starts_with("Dirty:") || l.starts_with("Writeback:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

fn supervisor_idle(c: &mut Client) -> bool {
    c.query_one("SELECT picloud.picloud_supervisor_idle()", &[])
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false)
}

struct Pgbench {
    tps: f64,
    txns: i64,
    failed: i64,
}

fn pgbench(
    cfg: &Cfg,
    db: &str,
    name: &str,
    script: &str,
    clients: u32,
    jobs: u32,
    secs: u32,
) -> Res<Pgbench> {
    let dir = cfg.out.join("tmp");
    std::fs::create_dir_all(&dir).map_err(err("create tmp dir"))?;
    let path = dir.join(format!("{name}.sql"));
    std::fs::write(&path, script).map_err(err("write pgbench script"))?;
    let out = Command::new("pgbench")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &cfg.port.to_string(),
            "-U",
            "postgres",
            "-n",
        ])
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            &jobs.to_string(),
            "-T",
            &secs.to_string(),
        ])
        .arg("-f")
        .arg(&path)
        .arg(db)
        .output()
        .map_err(err("run pgbench"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(format!(
            "pgbench {name} failed ({}): {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        ));
    }
    let field = |prefix: &str| -> Option<f64> {
        stdout.lines().find_map(|l| {
            l.trim()
                .strip_prefix(prefix)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
    };
    let tps =
        field("tps = ").ok_or_else(|| format!("pgbench {name}: no tps in output: {stdout}"))?;
    Ok(Pgbench {
        tps,
        txns: field("number of transactions actually processed:").unwrap_or(f64::NAN) as i64,
        failed: field("number of failed transactions:").unwrap_or(0.0) as i64,
    })
}

// The supervisor process ---------------------------------------------------------------------------

struct Supervisor {
    child: Child,
    log: PathBuf,
}

static SUPERVISOR_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Supervisor {
    fn start(cfg: &Cfg, db: &str, tag: &str, extra: &[String]) -> Res<Supervisor> {
        let dir = cfg.out.join("logs");
        std::fs::create_dir_all(&dir).map_err(err("create log dir"))?;
        let n = SUPERVISOR_COUNTER.fetch_add(1, Ordering::SeqCst);
        let log = dir.join(format!("supervisor-{n:02}-{tag}.log"));
        let file = std::fs::File::create(&log).map_err(err("create supervisor log"))?;
        let child = Command::new(&cfg.supervisor)
            .args(["--database-url", &cfg.url(db)])
            // Supervisor defaults (--concurrency 16, --sql-batch 8) but for the poll interval.
            .args(["--poll-interval-ms", "5000"])
            .args(["--worker-name", &format!("bench-{tag}-{n}")])
            .args(&cfg.supervisor_args)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .map_err(err(&format!("start {}", cfg.supervisor)))?;
        Ok(Supervisor { child, log })
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "supervisor exited early ({status}); log {}: {}",
                self.log.display(),
                self.tail()
            )),
            _ => None,
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited after 15 s.
    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(3).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" / ")
    }

    /// Warning and error lines of its log.
    fn problems(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"level\":\"error\"") || l.contains("\"level\":\"warn\""))
            .map(String::from)
            .collect()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `SELECT count(*) FROM table` every 50 ms until it is 0. Fails if the supervisor
/// exits, or nothing moves for 60 s, or the overall timeout passes.
/// Waits until `table` is empty. Emptiness is checked every 5 ms with a query that stops at
/// the first row (so the wait adds at most a few ms to a timed drain and little load); the
/// row count, for noticing a stalled supervisor, about once a second.
fn wait_empty(c: &mut Client, table: &str, sup: &mut Supervisor, timeout: Duration) -> Res<()> {
    let any = format!("SELECT count(*) FROM (SELECT 1 FROM {table} LIMIT 1) AS first");
    let all = format!("SELECT count(*) FROM {table}");
    let start = Instant::now();
    let mut last = i64::MAX;
    let mut last_change = Instant::now();
    let mut last_count = Instant::now();
    loop {
        if count(c, &any)? == 0 {
            return Ok(());
        }
        if let Some(e) = sup.exited() {
            return Err(e);
        }
        if last_count.elapsed() > Duration::from_secs(1) {
            last_count = Instant::now();
            let n = count(c, &all)?;
            if n != last {
                last = n;
                last_change = Instant::now();
            }
            if last_change.elapsed() > Duration::from_secs(60) || start.elapsed() > timeout {
                return Err(format!(
                    "{table} still holds {n} rows after {:.0} s; supervisor log {}: {}",
                    start.elapsed().as_secs_f64(),
                    sup.log.display(),
                    sup.tail()
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

// The no-op HTTP(S) server ---------------------------------------------------------------------------

/// A keep-alive no-op server on hyper (HTTP/1.1, and HTTP/2 where TLS negotiates it): every
/// request is answered 200 with an empty body once its body is read. It listens twice: plain
/// on `port`, TLS on `tls_port` with a certificate for 127.0.0.1 from a CA made here
/// (`ca_file`, for --http-ca-file).
struct NoopServer {
    port: u16,
    tls_port: u16,
    hits: Arc<AtomicU64>,
    ca_file: PathBuf,
    runtime: tokio::runtime::Runtime,
}

fn start_http_server(out: &Path) -> Res<NoopServer> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(err("server runtime"))?;
    let hits = Arc::new(AtomicU64::new(0));
    let ca = picloud_tests::TestCa::new("picloud bench CA");
    let ca_file = out.join("bench-ca.pem");
    std::fs::write(&ca_file, ca.pem()).map_err(err("write bench CA"))?;
    let (cert, key) = ca.server_cert(&["127.0.0.1"]);
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(err("server certificate"))?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes())
        .map_err(err("server key"))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        #[allow(deprecated)]
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(err("tls versions"))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(err("server TLS"))?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let (plain, secure) = runtime
        .block_on(async {
            Ok::<_, std::io::Error>((
                tokio::net::TcpListener::bind("127.0.0.1:0").await?,
                tokio::net::TcpListener::bind("127.0.0.1:0").await?,
            ))
        })
        .map_err(err("bind the no-op server"))?;
    let port = plain.local_addr().map_err(err("address"))?.port();
    let tls_port = secure.local_addr().map_err(err("address"))?.port();
    let service = {
        let hits = Arc::clone(&hits);
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let hits = Arc::clone(&hits);
            async move {
                use http_body_util::BodyExt;
                let read = request.into_body().collect().await.is_ok();
                if read {
                    hits.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                    hyper::body::Bytes::new(),
                )))
            }
        })
    };
    let served = service.clone();
    runtime.spawn(async move {
        while let Ok((stream, _)) = plain.accept().await {
            let _ = stream.set_nodelay(true);
            let service = served.clone();
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    runtime.spawn(async move {
        while let Ok((stream, _)) = secure.accept().await {
            let _ = stream.set_nodelay(true);
            let (service, acceptor) = (service.clone(), acceptor.clone());
            tokio::spawn(async move {
                if let Ok(stream) = acceptor.accept(stream).await {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            });
        }
    });
    Ok(NoopServer {
        port,
        tls_port,
        hits,
        ca_file,
        runtime,
    })
}

/// The baseline of P1-http: a plain reqwest client (one keep-alive pool) POSTing `n` event
/// documents of the supervisor's shape to the same server, `concurrency` at a time. Events/s.
fn plain_client_posts(server: &NoopServer, n: u64, concurrency: usize) -> Res<f64> {
    let url = format!("http://127.0.0.1:{}/hook", server.port);
    server.runtime.block_on(async move {
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .build()
            .map_err(err("reqwest client"))?;
        let next = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let (client, next, url) = (client.clone(), Arc::clone(&next), url.clone());
                tokio::spawn(async move {
                    while next.fetch_add(1, Ordering::Relaxed) < n {
                        let id = Uuid::new_v4();
                        let body =
                            json!({"event_id": id.to_string(), "app_id": Uuid::nil().to_string(),
                            "source": "queue", "op": "bench", "payload": {"i": 1}, "depth": 0,
                            "attempt": 1, "trigger_id": null, "script_id": Uuid::nil().to_string()})
                            .to_string();
                        let response = client
                            .post(&url)
                            .header("content-type", "application/json")
                            .header("picloud-event-id", id.to_string())
                            .body(body)
                            .send()
                            .await
                            .map_err(|e| e.to_string())?;
                        response.bytes().await.map_err(|e| e.to_string())?;
                    }
                    Ok::<(), String>(())
                })
            })
            .collect();
        for task in tasks {
            task.await.map_err(err("client task"))??;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    })
}

// The benchmark database ----------------------------------------------------------------------------

struct Main {
    app: Uuid,
    noop: Uuid,
    stamp: Uuid,
    http: Uuid,
    https: Uuid,
    server: NoopServer,
}

fn setup_main(cfg: &Cfg) -> Res<Main> {
    let mut c = ensure_db(cfg, &cfg.db)?;
    let server = start_http_server(&cfg.out)?;
    exec(
        &mut c,
        "DROP TABLE IF EXISTS bench_plain_outbox, lat, lat_sent;
         CREATE TABLE bench_plain_outbox (
             id uuid DEFAULT gen_random_uuid() PRIMARY KEY,
             app_id uuid, source text, op text, payload jsonb,
             due_at timestamptz DEFAULT now(),
             created_at timestamptz DEFAULT now());
         -- The one partial index on due rows, the counterpart of picloud's outbox_due_idx
         -- (the plain table has no claim column, so its predicate holds for every row).
         CREATE INDEX bench_plain_outbox_due_idx ON bench_plain_outbox (due_at) WHERE due_at IS NOT NULL;
         CREATE TABLE lat (event_id uuid PRIMARY KEY, started timestamptz NOT NULL);
         CREATE TABLE lat_sent (event_id uuid PRIMARY KEY, sent timestamptz NOT NULL);
         CREATE OR REPLACE FUNCTION noop(e jsonb) RETURNS void LANGUAGE sql AS '';
         CREATE OR REPLACE FUNCTION stamp(e jsonb) RETURNS void LANGUAGE sql AS $$
             INSERT INTO lat(event_id, started) VALUES ((e->>'event_id')::uuid, clock_timestamp()) $$;
         DELETE FROM picloud.outbox;
         DELETE FROM picloud.apps WHERE name = 'bench';",
    )?;
    let app: Uuid = c
        .query_one("SELECT picloud.picloud_create_app('bench')", &[])
        .map_err(pg_err("create app"))?
        .get(0);
    let script = |c: &mut Client, name: &str, kind: &str, target: &str| -> Res<Uuid> {
        Ok(c.query_one(
            "SELECT picloud.picloud_create_script($1, $2, $3, $4)",
            &[&app, &name, &kind, &target],
        )
        .map_err(pg_err(&format!("create script {name}")))?
        .get(0))
    };
    let noop = script(&mut c, "noop", "sql", "noop")?;
    let stamp = script(&mut c, "stamp", "sql", "stamp")?;
    let http = script(
        &mut c,
        "http-noop",
        "http",
        &format!("http://127.0.0.1:{}/hook", server.port),
    )?;
    let https = script(
        &mut c,
        "https-noop",
        "http",
        &format!("https://127.0.0.1:{}/hook", server.tls_port),
    )?;
    Ok(Main {
        app,
        noop,
        stamp,
        http,
        https,
        server,
    })
}

fn reset_queues(c: &mut Client) -> Res<()> {
    exec(c, "TRUNCATE picloud.outbox; TRUNCATE bench_plain_outbox")
}

/// Enqueues `n` events for `script` with picloud_enqueue_bulk, 10,000 per statement.
fn bulk_enqueue(c: &mut Client, app: Uuid, script: Uuid, n: i64) -> Res<()> {
    let mut done = 0i64;
    while done < n {
        let k = (n - done).min(10_000);
        c.execute(
            "SELECT count(*) FROM picloud.picloud_enqueue_bulk($1, 'queue', 'x',
                 ARRAY(SELECT jsonb_build_object('i', g) FROM generate_series($2::bigint + 1, $2::bigint + $3::bigint) g), $4)",
            &[&app, &done, &k, &script],
        )
        .map_err(pg_err("enqueue_bulk"))?;
        done += k;
    }
    Ok(())
}

fn plain_fill(c: &mut Client, app: Uuid, n: i64) -> Res<()> {
    c.execute(
        "INSERT INTO bench_plain_outbox (app_id, source, op, payload)
         SELECT $1, 'queue', 'x', jsonb_build_object('i', g) FROM generate_series(1, $2::bigint) g",
        &[&app, &n],
    )
    .map_err(pg_err("fill plain outbox"))?;
    Ok(())
}

// E1 -------------------------------------------------------------------------------------------------

fn bench_e1(cfg: &Cfg, m: &Main, notes: &mut Vec<String>) -> Res<Vec<Row>> {
    let mut c = connect(cfg, &cfg.db)?;
    let picloud_script = format!(
        "SELECT picloud.picloud_enqueue('{}'::uuid, 'queue', 'x', '{{\"n\":1}}'::jsonb, '{}'::uuid);\n",
        m.app, m.noop
    );
    let plain_script = format!(
        "INSERT INTO bench_plain_outbox (app_id, source, op, payload) VALUES ('{}'::uuid, 'queue', 'x', '{{\"n\":1}}'::jsonb);\n",
        m.app
    );
    notes.push(format!(
        "E1: wake-up flag (picloud_supervisor_idle) at start = {}; when true every enqueue also sends a NOTIFY at commit.",
        supervisor_idle(&mut c)
    ));
    // Untimed warm-up of both sides: a fresh cluster creates its WAL segment files as the
    // first writes need them (later runs recycle them), and caches start cold; without it the
    // side that runs first pays for that (in each of three E1 measurements without it, the
    // first run's ratio was the lowest of its three).
    let warm_up_secs = (cfg.e1_secs / 4).max(1);
    for (name, script) in [
        ("e1_warm_up_picloud", &picloud_script),
        ("e1_warm_up_plain", &plain_script),
    ] {
        reset_queues(&mut c)?;
        pgbench(cfg, &cfg.db, name, script, 4, 2, warm_up_secs)?;
    }
    notes.push(format!(
        "E1: both sides warmed up first, untimed ({warm_up_secs} s each)."
    ));
    let (mut p, mut b) = (vec![], vec![]);
    for run in 0..cfg.runs {
        for side in order(run) {
            reset_queues(&mut c)?;
            settle(&mut c)?;
            let (name, script) = if side == 0 {
                ("e1_picloud", &picloud_script)
            } else {
                ("e1_plain", &plain_script)
            };
            let r = pgbench(cfg, &cfg.db, name, script, 4, 2, cfg.e1_secs)?;
            if r.failed > 0 {
                notes.push(format!(
                    "E1 run {}: {name}: {} failed transactions",
                    run + 1,
                    r.failed
                ));
            }
            progress(&format!(
                "E1 run {} {name}: {:.0} tps ({} txns)",
                run + 1,
                r.tps,
                r.txns
            ));
            if side == 0 {
                p.push(r.tps)
            } else {
                b.push(r.tps)
            }
        }
    }
    reset_queues(&mut c)?;
    Ok(vec![Row::new("E1", "enqueue, 1 per tx, 4 clients", "tx/s")
        .value(&p)
        .baseline("plain INSERT", &b, "tx/s")
        .ratio_of(&p, &b)
        .target("≥ 0.90× plain", median_ratio(&p, &b) >= 0.9)])
}

// C1, C2: cron -------------------------------------------------------------------------------------

/// An app of its own for the cron cases (dropped and made afresh).
fn cron_app(c: &mut Client, name: &str, handler: &str) -> Res<(Uuid, Uuid)> {
    exec(
        c,
        &format!("SELECT picloud.picloud_drop_app(app_id) FROM picloud.apps WHERE name = '{name}'"),
    )?;
    let app: Uuid = c
        .query_one("SELECT picloud.picloud_create_app($1)", &[&name])
        .map_err(pg_err("create cron app"))?
        .get(0);
    let script: Uuid = c
        .query_one(
            "SELECT picloud.picloud_create_script($1, 'cron', 'sql', $2)",
            &[&app, &handler],
        )
        .map_err(pg_err("create cron script"))?
        .get(0);
    Ok((app, script))
}

/// C1: how late cron ticks start on an idle system: 100 triggers every second, lateness =
/// the handler's start (clock_timestamp() in the handler) minus the tick's scheduled_for.
fn bench_c1(cfg: &Cfg, notes: &mut Vec<String>) -> Res<Vec<Row>> {
    let mut c = connect(cfg, &cfg.db)?;
    exec(
        &mut c,
        "DROP TABLE IF EXISTS cron_late;
         CREATE TABLE cron_late (ms double precision NOT NULL);
         CREATE OR REPLACE FUNCTION cron_late(e jsonb) RETURNS void LANGUAGE sql AS $$
             INSERT INTO cron_late VALUES (extract(epoch FROM clock_timestamp()
                 - (e->'payload'->>'scheduled_for')::timestamptz) * 1000) $$;",
    )?;
    reset_queues(&mut c)?;
    let mut sup = Supervisor::start(cfg, &cfg.db, "c1", &[])?;
    let (app, script) = cron_app(&mut c, "bench-cron", "cron_late")?;
    c.execute(
        "SELECT picloud.picloud_create_cron_trigger($1, 'every 1 second', $2) FROM generate_series(1, 100)",
        &[&app, &script],
    )
    .map_err(pg_err("create 100 cron triggers"))?;
    // The first ticks of new triggers wait for the supervisor's first claims: measure after.
    std::thread::sleep(Duration::from_secs(2));
    exec(&mut c, "TRUNCATE cron_late")?;
    let secs: u64 = if cfg.quick { 10 } else { 60 };
    progress(&format!("C1: 100 cron triggers every second for {secs} s"));
    std::thread::sleep(Duration::from_secs(secs));
    exec(&mut c, &format!("SELECT picloud.picloud_drop_app('{app}')"))?;
    if let Some(e) = sup.exited() {
        return Err(e);
    }
    sup.stop();
    let samples: Vec<f64> = c
        .query("SELECT ms FROM cron_late", &[])
        .map_err(pg_err("read lateness"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if samples.is_empty() {
        return Err("no cron tick ran".into());
    }
    let (p50, p99) = (percentile(&samples, 50.0), percentile(&samples, 99.0));
    notes.push(format!(
        "C1: {} ticks of 100 every-second cron triggers in {secs} s, one window (not 3 runs); lateness = handler start - scheduled_for.",
        samples.len()
    ));
    Ok(vec![
        Row::new("C1", "cron tick lateness p50, 100 triggers/s", "ms").value(&[p50]),
        Row::new("C1", "cron tick lateness p99, 100 triggers/s", "ms")
            .value(&[p99])
            .target("p99 < 50 ms", p99 < 50.0),
    ])
}

/// C2: E1 with 10,000 idle cron triggers in the database against E1 without them.
fn bench_c2(cfg: &Cfg, m: &Main) -> Res<Vec<Row>> {
    let mut c = connect(cfg, &cfg.db)?;
    exec(
        &mut c,
        "CREATE OR REPLACE FUNCTION cron_idle(e jsonb) RETURNS void LANGUAGE sql AS ''",
    )?;
    let script = format!(
        "SELECT picloud.picloud_enqueue('{}'::uuid, 'queue', 'x', '{{\"n\":1}}'::jsonb, '{}'::uuid);\n",
        m.app, m.noop
    );
    let (mut with, mut without) = (vec![], vec![]);
    for run in 0..cfg.runs {
        for side in order(run) {
            reset_queues(&mut c)?;
            if side == 0 {
                let (app, cron) = cron_app(&mut c, "bench-cron-idle", "cron_idle")?;
                // Yearly: present and armed, not firing during the run.
                c.execute(
                    "SELECT picloud.picloud_create_cron_trigger($1, '0 0 1 1 *', $2) FROM generate_series(1, 10000)",
                    &[&app, &cron],
                )
                .map_err(pg_err("create 10,000 cron triggers"))?;
            } else {
                exec(
                    &mut c,
                    "SELECT picloud.picloud_drop_app(app_id) FROM picloud.apps WHERE name = 'bench-cron-idle'",
                )?;
            }
            settle(&mut c)?;
            let name = if side == 0 { "c2_with" } else { "c2_without" };
            let r = pgbench(cfg, &cfg.db, name, &script, 4, 2, cfg.e1_secs)?;
            progress(&format!("C2 run {} {name}: {:.0} tps", run + 1, r.tps));
            if side == 0 {
                with.push(r.tps)
            } else {
                without.push(r.tps)
            }
        }
    }
    exec(
        &mut c,
        "SELECT picloud.picloud_drop_app(app_id) FROM picloud.apps WHERE name = 'bench-cron-idle'",
    )?;
    reset_queues(&mut c)?;
    Ok(vec![Row::new("C2", "E1 with 10,000 cron triggers", "tx/s")
        .value(&with)
        .baseline("E1 without", &without, "tx/s")
        .ratio_of(&with, &without)
        .target("≥ 0.97×", median_ratio(&with, &without) >= 0.97)])
}

/// Which side goes first in a run: picloud (0) first in odd runs, the baseline (1) in even.
fn order(run: usize) -> [usize; 2] {
    if run.is_multiple_of(2) {
        [0, 1]
    } else {
        [1, 0]
    }
}

// E2 -------------------------------------------------------------------------------------------------

fn bench_e2(cfg: &Cfg, m: &Main) -> Res<Vec<Row>> {
    let mut c = connect(cfg, &cfg.db)?;
    let n = cfg.e2_events;
    let (mut p, mut b) = (vec![], vec![]);
    for run in 0..cfg.runs {
        for side in order(run) {
            reset_queues(&mut c)?;
            settle(&mut c)?;
            let start = Instant::now();
            let inserted: i64 = if side == 0 {
                c.query_one(
                    "SELECT count(*) FROM picloud.picloud_enqueue_bulk($1, 'queue', 'x',
                         ARRAY(SELECT jsonb_build_object('i', g) FROM generate_series(1, $2::bigint) g), $3)",
                    &[&m.app, &n, &m.noop],
                )
                .map_err(pg_err("enqueue_bulk"))?
                .get(0)
            } else {
                c.execute(
                    "INSERT INTO bench_plain_outbox (app_id, source, op, payload)
                     SELECT $1, 'queue', 'x', jsonb_build_object('i', g) FROM generate_series(1, $2::bigint) g",
                    &[&m.app, &n],
                )
                .map_err(pg_err("plain bulk insert"))? as i64
            };
            let rate = inserted as f64 / start.elapsed().as_secs_f64();
            if inserted != n {
                return Err(format!("E2: inserted {inserted} of {n}"));
            }
            progress(&format!(
                "E2 run {} {}: {:.0} events/s",
                run + 1,
                if side == 0 { "picloud" } else { "plain" },
                rate
            ));
            if side == 0 {
                p.push(rate)
            } else {
                b.push(rate)
            }
        }
    }
    reset_queues(&mut c)?;
    Ok(vec![Row::new(
        "E2",
        &format!("bulk enqueue, {} events in 1 call", fmt_num(n as f64)),
        "ev/s",
    )
    .value(&p)
    .baseline("INSERT…SELECT", &b, "ev/s")
    .ratio_of(&p, &b)
    .target("≥ 0.80× plain", median_ratio(&p, &b) >= 0.8)])
}

// P1 -------------------------------------------------------------------------------------------------

/// Drains `n` pre-enqueued events through a fresh supervisor; returns events/s.
fn drain_with_supervisor(
    cfg: &Cfg,
    c: &mut Client,
    tag: &str,
    n: i64,
    extra: &[String],
    notes: &mut Vec<String>,
) -> Res<f64> {
    let start = Instant::now();
    let mut sup = Supervisor::start(cfg, &cfg.db, tag, extra)?;
    wait_empty(c, "picloud.outbox", &mut sup, cfg.drain_timeout)?;
    let elapsed = start.elapsed().as_secs_f64();
    sup.stop();
    let problems = sup.problems();
    if !problems.is_empty() {
        notes.push(format!(
            "{tag}: supervisor logged {} warning/error lines, e.g. {}",
            problems.len(),
            problems[0]
        ));
    }
    Ok(n as f64 / elapsed)
}

fn plain_drain(cfg: &Cfg, clients: usize, batch: i64) -> Res<()> {
    let barrier = Arc::new(Barrier::new(clients));
    let mut handles = vec![];
    for _ in 0..clients {
        let mut c = connect(cfg, &cfg.db)?;
        let barrier = Arc::clone(&barrier);
        handles.push(std::thread::spawn(move || -> Res<()> {
            let sql = format!(
                "DELETE FROM bench_plain_outbox WHERE id IN (
                     SELECT id FROM bench_plain_outbox WHERE due_at <= now()
                     ORDER BY due_at LIMIT {batch} FOR UPDATE SKIP LOCKED)"
            );
            barrier.wait();
            loop {
                let n = c.execute(&sql, &[]).map_err(pg_err("plain delete"))?;
                if n == 0 && count(&mut c, "SELECT count(*) FROM bench_plain_outbox")? == 0 {
                    return Ok(());
                }
            }
        }));
    }
    for h in handles {
        h.join()
            .map_err(|_| "plain drain thread panicked".to_string())??;
    }
    Ok(())
}

fn bench_p1(cfg: &Cfg, m: &Main, notes: &mut Vec<String>, chart: &mut Value) -> Res<Vec<Row>> {
    let mut c = connect(cfg, &cfg.db)?;
    let http_allow = vec![
        "--http-allow".to_string(),
        format!("127.0.0.1:{}", m.server.port),
    ];
    let (mut sql, mut http, mut plain, mut plain_single) = (vec![], vec![], vec![], vec![]);
    for run in 0..cfg.runs {
        // picloud SQL, picloud HTTP and plain, rotating which goes first.
        for k in 0..3 {
            let side = (k + run) % 3;
            reset_queues(&mut c)?;
            match side {
                0 => {
                    bulk_enqueue(&mut c, m.app, m.noop, cfg.p1_events)?;
                    exec(&mut c, "ANALYZE picloud.outbox")?;
                    settle(&mut c)?;
                    let rate =
                        drain_with_supervisor(cfg, &mut c, "p1-sql", cfg.p1_events, &[], notes)?;
                    progress(&format!(
                        "P1 run {} picloud sql: {rate:.0} events/s",
                        run + 1
                    ));
                    sql.push(rate);
                }
                1 => {
                    bulk_enqueue(&mut c, m.app, m.http, cfg.p1_http_events)?;
                    exec(&mut c, "ANALYZE picloud.outbox")?;
                    settle(&mut c)?;
                    let before = m.server.hits.load(Ordering::Relaxed);
                    let rate = drain_with_supervisor(
                        cfg,
                        &mut c,
                        "p1-http",
                        cfg.p1_http_events,
                        &http_allow,
                        notes,
                    )?;
                    let hits = m.server.hits.load(Ordering::Relaxed) - before;
                    let dead = count(
                        &mut c,
                        &format!(
                            "SELECT count(*) FROM picloud.dead_letters WHERE script_id = '{}'",
                            m.http
                        ),
                    )?;
                    if hits as i64 != cfg.p1_http_events || dead > 0 {
                        notes.push(format!("P1 http run {}: server saw {hits} requests for {} events; {dead} dead letters",
                            run + 1, cfg.p1_http_events));
                    }
                    progress(&format!(
                        "P1 run {} picloud http: {rate:.0} events/s",
                        run + 1
                    ));
                    http.push(rate);
                }
                _ => {
                    plain_fill(&mut c, m.app, cfg.p1_events)?;
                    exec(&mut c, "ANALYZE bench_plain_outbox")?;
                    settle(&mut c)?;
                    let start = Instant::now();
                    plain_drain(cfg, 4, 100)?;
                    let rate = cfg.p1_events as f64 / start.elapsed().as_secs_f64();
                    progress(&format!("P1 run {} plain: {rate:.0} events/s", run + 1));
                    plain.push(rate);
                    // For reference only: the same drain one row per transaction from 8
                    // clients, i.e. picloud's transaction shape without picloud.
                    plain_fill(&mut c, m.app, cfg.p1_events)?;
                    exec(&mut c, "ANALYZE bench_plain_outbox")?;
                    settle(&mut c)?;
                    let start = Instant::now();
                    plain_drain(cfg, 8, 1)?;
                    let rate = cfg.p1_events as f64 / start.elapsed().as_secs_f64();
                    progress(&format!(
                        "P1 run {} plain, 1 row per tx, 8 clients: {rate:.0} events/s",
                        run + 1
                    ));
                    plain_single.push(rate);
                }
            }
        }
    }
    let dead = count(&mut c, "SELECT count(*) FROM picloud.dead_letters")?;
    if dead > 0 {
        notes.push(format!("P1: {dead} events ended in the dead letters"));
    }
    reset_queues(&mut c)?;
    notes.push(format!(
        "P1 reference (not a target): the plain drain deleting 1 row per transaction from 8 clients (picloud's \
         transaction shape) runs at {} ev/s (median); picloud sql reaches {:.2}× of that.",
        fmt_num(stat(&plain_single).median), stat(&sql).median / stat(&plain_single).median
    ));
    chart["p1"] = json!({"picloud_sql": stat_json(&sql), "picloud_http": stat_json(&http), "plain": stat_json(&plain)});
    Ok(vec![
        Row::new(
            "P1",
            &format!(
                "process {} ev, sql no-op handler, defaults",
                fmt_num(cfg.p1_events as f64)
            ),
            "ev/s",
        )
        .value(&sql)
        .baseline("plain DELETE×100, 4 cl.", &plain, "ev/s")
        .ratio_of(&sql, &plain)
        .target("≥ 0.50× plain", median_ratio(&sql, &plain) >= 0.5),
        Row::new(
            "P1",
            &format!(
                "process {} ev, http no-op handler, defaults",
                fmt_num(cfg.p1_http_events as f64)
            ),
            "ev/s",
        )
        .value(&http)
        .baseline("plain DELETE×100, 4 cl.", &plain, "ev/s")
        .ratio_of(&http, &plain),
    ])
}

// P1-http ---------------------------------------------------------------------------------------------

/// Drains `n` events of `script` through a fresh supervisor allowed to reach the no-op server;
/// notes any request the server missed or any dead letter. Events/s.
fn drain_http(
    cfg: &Cfg,
    m: &Main,
    c: &mut Client,
    script: Uuid,
    tag: &str,
    extra: &[String],
    notes: &mut Vec<String>,
) -> Res<f64> {
    let n = cfg.p1_http_events;
    reset_queues(c)?;
    exec(c, "DELETE FROM picloud.dead_letters")?;
    bulk_enqueue(c, m.app, script, n)?;
    exec(c, "ANALYZE picloud.outbox")?;
    settle(c)?;
    let before = m.server.hits.load(Ordering::Relaxed);
    let rate = drain_with_supervisor(cfg, c, tag, n, extra, notes)?;
    let hits = m.server.hits.load(Ordering::Relaxed) - before;
    let dead = count(c, "SELECT count(*) FROM picloud.dead_letters")?;
    if hits as i64 != n || dead > 0 {
        notes.push(format!(
            "{tag}: server saw {hits} requests for {n} events; {dead} dead letters"
        ));
    }
    Ok(rate)
}

/// P1-http: http no-op handler against the keep-alive server, beside a plain reqwest client
/// posting the same number of event documents with the supervisor's concurrency (16) in the
/// same run; P1-https: the same over TLS, as a ratio to P1-http.
fn bench_p1_http(cfg: &Cfg, m: &Main, notes: &mut Vec<String>) -> Res<Vec<Row>> {
    const OLD_RATE: f64 = 2_262.0;
    let mut c = connect(cfg, &cfg.db)?;
    let allow = |port: u16| vec!["--http-allow".to_string(), format!("127.0.0.1:{port}")];
    let mut https_args = allow(m.server.tls_port);
    https_args.extend([
        "--http-ca-file".to_string(),
        m.server.ca_file.display().to_string(),
    ]);
    let (mut http, mut https, mut plain) = (vec![], vec![], vec![]);
    for run in 0..cfg.runs {
        for k in 0..3 {
            match (k + run) % 3 {
                0 => {
                    let rate = drain_http(
                        cfg,
                        m,
                        &mut c,
                        m.http,
                        "p1-http",
                        &allow(m.server.port),
                        notes,
                    )?;
                    progress(&format!(
                        "P1-http run {} picloud http: {rate:.0} events/s",
                        run + 1
                    ));
                    http.push(rate);
                }
                1 => {
                    let rate = drain_http(cfg, m, &mut c, m.https, "p1-https", &https_args, notes)?;
                    progress(&format!(
                        "P1-http run {} picloud https: {rate:.0} events/s",
                        run + 1
                    ));
                    https.push(rate);
                }
                _ => {
                    let rate = plain_client_posts(&m.server, cfg.p1_http_events as u64, 16)?;
                    progress(&format!(
                        "P1-http run {} plain reqwest client: {rate:.0} events/s",
                        run + 1
                    ));
                    plain.push(rate);
                }
            }
        }
    }
    reset_queues(&mut c)?;
    let n = fmt_num(cfg.p1_http_events as f64);
    let http_median = stat(&http).median;
    Ok(vec![
        Row::new(
            "P1-http",
            &format!("process {n} ev, http no-op, keep-alive server"),
            "ev/s",
        )
        .value(&http)
        .baseline("reqwest client, 16 at once", &plain, "ev/s")
        .ratio_of(&http, &plain)
        .target(
            "≥ 5× 2,262 ev/s and ≥ 0.50× client",
            http_median >= 5.0 * OLD_RATE && median_ratio(&http, &plain) >= 0.5,
        ),
        Row::new(
            "P1-https",
            &format!("process {n} ev, https no-op (TLS)"),
            "ev/s",
        )
        .value(&https)
        .baseline("P1-http, same run", &http, "ev/s")
        .ratio_of(&https, &http),
    ])
}

fn stat_json(v: &[f64]) -> Value {
    let s = stat(v);
    json!({"median": num(s.median), "min": num(s.min), "max": num(s.max)})
}

// L1 -------------------------------------------------------------------------------------------------

fn epoch_ms(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(f64::NAN)
}

/// Waits (up to a minute) until no autovacuum worker runs anywhere in the cluster, so that a
/// latency measurement sees an idle machine rather than the clean-up after earlier cases.
fn wait_for_quiet(c: &mut Client) -> Res<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let busy = count(
            c,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'",
        )?;
        if busy == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

fn bench_l1(cfg: &Cfg, m: &Main, notes: &mut Vec<String>, chart: &mut Value) -> Res<Vec<Row>> {
    let mut c = connect(cfg, &cfg.db)?;
    exec(&mut c, "VACUUM")?;
    wait_for_quiet(&mut c)?;
    let (mut p50, mut p99, mut post50, mut post99, mut over20) =
        (vec![], vec![], vec![], vec![], vec![]);
    for run in 0..cfg.runs {
        reset_queues(&mut c)?;
        exec(&mut c, "TRUNCATE lat, lat_sent")?;
        settle(&mut c)?;
        let mut sup = Supervisor::start(cfg, &cfg.db, "l1", &[])?;
        // Wait until it has gone idle (its claims come back empty) and past its re-check.
        let start = Instant::now();
        while !supervisor_idle(&mut c) && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(500));
        if let Some(e) = sup.exited() {
            return Err(e);
        }
        let mut client_commit: Vec<(Uuid, f64)> = Vec::with_capacity(cfg.l1_samples);
        let t0 = Instant::now();
        for i in 0..cfg.l1_samples {
            let due = t0 + Duration::from_millis(cfg.l1_gap_ms * i as u64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let mut tx = c.transaction().map_err(pg_err("begin"))?;
            let id: Uuid = tx
                .query_one(
                    "SELECT picloud.picloud_enqueue($1, 'queue', 'lat', '{}'::jsonb, $2)",
                    &[&m.app, &m.stamp],
                )
                .map_err(pg_err("enqueue"))?
                .get(0);
            tx.execute(
                "INSERT INTO lat_sent (event_id, sent) VALUES ($1, clock_timestamp())",
                &[&id],
            )
            .map_err(pg_err("record send time"))?;
            tx.commit().map_err(pg_err("commit"))?;
            client_commit.push((id, epoch_ms(SystemTime::now())));
        }
        let done = Instant::now();
        let n = cfg.l1_samples as i64;
        while count(&mut c, "SELECT count(*) FROM lat")? < n
            && done.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        sup.stop();
        let rows = c
            .query(
                "SELECT s.event_id, extract(epoch FROM l.started - s.sent)::float8 * 1000,
                        extract(epoch FROM l.started)::float8 * 1000
                 FROM lat_sent s JOIN lat l USING (event_id)",
                &[],
            )
            .map_err(pg_err("read latencies"))?;
        if (rows.len() as i64) < n {
            notes.push(format!(
                "L1 run {}: only {} of {n} events were handled within 30 s",
                run + 1,
                rows.len()
            ));
        }
        let commit_by_id: std::collections::HashMap<Uuid, f64> =
            client_commit.into_iter().collect();
        let pre: Vec<f64> = rows.iter().map(|r| r.get::<_, f64>(1)).collect();
        let post: Vec<f64> = rows
            .iter()
            .filter_map(|r| {
                commit_by_id
                    .get(&r.get::<_, Uuid>(0))
                    .map(|t| r.get::<_, f64>(2) - t)
            })
            .collect();
        let slow =
            pre.iter().filter(|x| **x > 20.0).count() as f64 * 100.0 / pre.len().max(1) as f64;
        progress(&format!(
            "L1 run {}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({slow:.0}% over 20 ms)",
            run + 1,
            percentile(&pre, 50.0),
            percentile(&pre, 99.0),
            percentile(&pre, 100.0)
        ));
        p50.push(percentile(&pre, 50.0));
        p99.push(percentile(&pre, 99.0));
        post50.push(percentile(&post, 50.0));
        post99.push(percentile(&post, 99.0));
        over20.push(slow);
        for problem in sup.problems().iter().take(1) {
            notes.push(format!("L1 run {}: supervisor logged: {problem}", run + 1));
        }
    }
    notes.push(format!(
        "L1: measured from clock_timestamp() taken as the last statement before COMMIT (so the commit's WAL flush is included). \
         Measured instead from the client's clock right after COMMIT returned: p50 {} ms, p99 {} ms. \
         Share of samples over 20 ms: {}%.",
        fmt_num(stat(&post50).median), fmt_num(stat(&post99).median), fmt_num(stat(&over20).median)
    ));
    reset_queues(&mut c)?;
    chart["l1"] = json!({"p50": stat_json(&p50), "p99": stat_json(&p99)});
    let samples = format!("{} samples {} ms apart", cfg.l1_samples, cfg.l1_gap_ms);
    Ok(vec![
        Row::new("L1", &format!("wake-up latency p50, {samples}"), "ms")
            .value(&p50)
            .target("≤ 2.0 ms", stat(&p50).median <= 2.0),
        Row::new("L1", &format!("wake-up latency p99, {samples}"), "ms")
            .value(&p99)
            .target("≤ 3.5 ms", stat(&p99).median <= 3.5),
    ])
}

// M1 -------------------------------------------------------------------------------------------------

fn app_uuid(n: i64) -> Uuid {
    Uuid::parse_str(&format!("00000000-0000-0000-0000-{n:012}")).expect("uuid")
}

/// A database with `apps` apps of `per_app` KV triggers each, inserted directly. Patterns
/// alternate exact `cN` (even N) and prefix `pN:*` (odd N), no `*`: collection 'c10' matches
/// exactly one trigger per app.
fn setup_m1_db(cfg: &Cfg, db: &str, apps: i64, per_app: i64) -> Res<()> {
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

fn bench_m1(cfg: &Cfg, notes: &mut Vec<String>) -> Res<Vec<Row>> {
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
            let r = pgbench(cfg, db, &format!("m1_{side}"), &script, 4, 2, cfg.m1_secs)?;
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

// G1 -------------------------------------------------------------------------------------------------

struct ClaimSample {
    at_ms: f64,
    took_ms: f64,
}

/// Loops picloud_claim(10) on its own connection until `stop`, completing what it claims and
/// enqueueing as many new events so the outbox never runs dry.
fn claimer(
    mut c: Client,
    app: Uuid,
    script: Uuid,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> Res<Vec<ClaimSample>> {
    let mut samples = vec![];
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let rows = c
            .query(
                "SELECT app_id, event_id FROM picloud.picloud_claim('bench-claimer', 10, 30000)",
                &[],
            )
            .map_err(pg_err("claim"))?;
        let took = start.elapsed();
        samples.push(ClaimSample {
            at_ms: start.duration_since(t0).as_secs_f64() * 1000.0,
            took_ms: took.as_secs_f64() * 1000.0,
        });
        let mut tx = c.transaction().map_err(pg_err("begin"))?;
        for r in &rows {
            let (a, e): (Uuid, Uuid) = (r.get(0), r.get(1));
            tx.execute(
                "SELECT picloud.picloud_complete($1, $2, 'bench-claimer')",
                &[&a, &e],
            )
            .map_err(pg_err("complete"))?;
        }
        let k = rows.len().max(1) as i64;
        tx.execute(
            "SELECT count(*) FROM picloud.picloud_enqueue_bulk($1, 'queue', 'x',
                 ARRAY(SELECT jsonb_build_object('i', g) FROM generate_series(1, $2::bigint) g), $3)",
            &[&app, &k, &script],
        )
        .map_err(pg_err("refill"))?;
        tx.commit().map_err(pg_err("commit"))?;
    }
    Ok(samples)
}

fn bench_g1(cfg: &Cfg, notes: &mut Vec<String>) -> Res<Vec<Row>> {
    let db = format!("{}_gc", cfg.db);
    let mut c = ensure_db(cfg, &db)?;
    exec(&mut c, "CREATE OR REPLACE FUNCTION noop(e jsonb) RETURNS void LANGUAGE sql AS ''; DELETE FROM picloud.apps")?;
    let app: Uuid = c
        .query_one("SELECT picloud.picloud_create_app('gc')", &[])
        .map_err(pg_err("create app"))?
        .get(0);
    let script: Uuid = c
        .query_one(
            "SELECT picloud.picloud_create_script($1, 'noop', 'sql', 'noop')",
            &[&app],
        )
        .map_err(pg_err("create script"))?
        .get(0);
    let batch: i64 = 10_000;
    let n = cfg.g1_rows;
    let (mut rates, mut worst, mut batch_med, mut worst_before) = (vec![], vec![], vec![], vec![]);
    let mut pass_runs = 0;
    for run in 0..cfg.runs {
        exec(&mut c, "TRUNCATE picloud.dead_letters, picloud.outbox")?;
        c.execute(
            "INSERT INTO picloud.dead_letters (app_id, dead_letter_id, original_event_id, source, op, script_id, payload,
                 depth, attempt_count, first_attempt_at, last_attempt_at, last_error, created_at,
                 resolved_at, resolved_by, resolution)
             SELECT $1, gen_random_uuid(), gen_random_uuid(), 'queue', 'x', $2, jsonb_build_object('i', g),
                 0, 5, now() - interval '40 days', now() - interval '40 days', 'handler failed',
                 now() - interval '40 days' - g * interval '1 ms',
                 now() - interval '39 days', 'postgres', 'ignored'
             FROM generate_series(1, $3::bigint) g",
            &[&app, &script, &n],
        )
        .map_err(pg_err("insert dead letters"))?;
        exec(&mut c, "VACUUM ANALYZE picloud.dead_letters")?;
        bulk_enqueue(&mut c, app, script, 100)?;
        settle(&mut c)?;

        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let claim_client = connect(cfg, &db)?;
        let stop2 = Arc::clone(&stop);
        let handle = std::thread::spawn(move || claimer(claim_client, app, script, t0, stop2));
        std::thread::sleep(Duration::from_secs(1));
        let gc_start = t0.elapsed().as_secs_f64() * 1000.0;
        let mut batches = vec![];
        let mut total = 0i64;
        let start = Instant::now();
        loop {
            let b0 = Instant::now();
            let done: i64 = c
                .query_one("SELECT picloud._gc_dead_letters($1)", &[&(batch as i32)])
                .map_err(pg_err("_gc_dead_letters"))?
                .get(0);
            batches.push(b0.elapsed().as_secs_f64() * 1000.0);
            total += done;
            if done < batch {
                break;
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        let gc_end = t0.elapsed().as_secs_f64() * 1000.0;
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        let samples = handle
            .join()
            .map_err(|_| "claimer panicked".to_string())??;
        if total != n {
            notes.push(format!(
                "G1 run {}: GC removed {total} of {n} dead letters",
                run + 1
            ));
        }
        let during: Vec<f64> = samples
            .iter()
            .filter(|s| s.at_ms + s.took_ms >= gc_start && s.at_ms <= gc_end)
            .map(|s| s.took_ms)
            .collect();
        let before: Vec<f64> = samples
            .iter()
            .filter(|s| s.at_ms + s.took_ms < gc_start)
            .map(|s| s.took_ms)
            .collect();
        let w = during.iter().cloned().fold(0.0, f64::max);
        let med = stat(&batches).median;
        progress(&format!(
            "G1 run {}: {:.0} rows/s in {} batches (median batch {:.1} ms); {} claims during GC, worst {:.2} ms (before GC: worst {:.2} ms)",
            run + 1, total as f64 / elapsed, batches.len(), med, during.len(), w,
            before.iter().cloned().fold(0.0, f64::max)
        ));
        if w <= med {
            pass_runs += 1;
        }
        rates.push(total as f64 / elapsed);
        worst.push(w);
        batch_med.push(med);
        worst_before.push(before.iter().cloned().fold(0.0, f64::max));
    }
    notes.push(format!(
        "G1: worst claim in the second before GC started (no GC running): median {} ms.",
        fmt_num(stat(&worst_before).median)
    ));
    exec(&mut c, "TRUNCATE picloud.dead_letters, picloud.outbox")?;
    let rate = stat(&rates).median;
    Ok(vec![
        Row::new(
            "G1",
            &format!(
                "GC of {} resolved dead letters, batches of 10k",
                fmt_num(n as f64)
            ),
            "rows/s",
        )
        .value(&rates)
        .target("≥ 100,000 rows/s", rate >= 100_000.0),
        Row::new("G1", "worst picloud_claim(10) wait during GC", "ms")
            .value(&worst)
            .baseline("GC batch (median)", &batch_med, "ms")
            .ratio_of(&worst, &batch_med)
            .target(
                "≤ 1 GC batch",
                stat(&worst).median <= stat(&batch_med).median && pass_runs * 2 > cfg.runs,
            ),
    ])
}

// B1 -------------------------------------------------------------------------------------------------

struct OutboxSize {
    total_kb: f64,
    heap_kb: f64,
    /// Heap with its free-space and visibility maps (pg_table_size): what autovacuum gives
    /// back. Indexes keep their emptied pages for reuse and are reported apart.
    table_kb: f64,
    dead: i64,
    autovacuums: i64,
}

fn outbox_size(c: &mut Client) -> Res<OutboxSize> {
    exec(c, "SELECT pg_stat_clear_snapshot()")?;
    let r = c
        .query_one(
            "SELECT pg_total_relation_size('picloud.outbox')::float8 / 1024, pg_relation_size('picloud.outbox')::float8 / 1024,
                    coalesce(s.n_dead_tup, 0), coalesce(s.autovacuum_count, 0),
                    pg_table_size('picloud.outbox')::float8 / 1024
             FROM pg_stat_user_tables s WHERE s.relid = 'picloud.outbox'::regclass",
            &[],
        )
        .map_err(pg_err("outbox size"))?;
    Ok(OutboxSize {
        total_kb: r.get(0),
        heap_kb: r.get(1),
        dead: r.get(2),
        autovacuums: r.get(3),
        table_kb: r.get(4),
    })
}

fn bench_b1(cfg: &Cfg, m: &Main, notes: &mut Vec<String>) -> Res<Vec<Row>> {
    let mut c = connect(cfg, &cfg.db)?;
    let (mut before, mut after, mut settled, mut waited) = (vec![], vec![], vec![], vec![]);
    let (mut dead_before, mut dead_after, mut dead_settled, mut heap_settled) =
        (vec![], vec![], vec![], vec![]);
    let mut ratios = vec![];
    let mut total_settled = vec![];
    let mut pass_runs = 0;
    for run in 0..cfg.runs {
        reset_queues(&mut c)?;
        std::thread::sleep(Duration::from_millis(1500)); // let the statistics catch up
        let b = outbox_size(&mut c)?;
        bulk_enqueue(&mut c, m.app, m.noop, cfg.b1_events)?;
        settle(&mut c)?;
        let mut sup = Supervisor::start(cfg, &cfg.db, "b1", &[])?;
        wait_empty(&mut c, "picloud.outbox", &mut sup, cfg.drain_timeout)?;
        sup.stop();
        std::thread::sleep(Duration::from_millis(1500)); // supervisor backends flush their statistics on exit
        let a = outbox_size(&mut c)?;
        // Poll until the size is back within 2x, or autovacuum has processed the outbox since
        // the run ended and the size has stopped changing, or the wait is over.
        let start = Instant::now();
        // The table (heap) must come back within 2x its starting size; an emptied table
        // starts at a few pages, so the bound has a floor of 64 kB.
        let limit = (2.0 * b.table_kb).max(64.0);
        let mut s = outbox_size(&mut c)?;
        let mut vacuumed_at: Option<f64> = None;
        while s.table_kb > limit && start.elapsed() < cfg.b1_wait {
            if vacuumed_at.is_none() && s.autovacuums > a.autovacuums {
                vacuumed_at = Some(start.elapsed().as_secs_f64());
            }
            if vacuumed_at.is_some_and(|t| start.elapsed().as_secs_f64() > t + 3.0) {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
            s = outbox_size(&mut c)?;
        }
        let wait = start.elapsed().as_secs_f64();
        progress(&format!(
            "B1 run {}: size {:.0} kB -> {:.0} kB after {} events (n_dead_tup {} -> {}) -> {:.0} kB (heap {:.0} kB, n_dead_tup {}) after {:.1} s; autovacuum of the outbox after the run: {}",
            run + 1, b.total_kb, a.total_kb, cfg.b1_events, b.dead, a.dead, s.total_kb, s.heap_kb, s.dead, wait,
            match vacuumed_at { Some(t) => format!("seen after {t:.1} s"), None if s.autovacuums > a.autovacuums => "yes".into(), None => "none".into() }
        ));
        if s.autovacuums == a.autovacuums {
            notes.push(format!("B1 run {}: autovacuum did not process picloud.outbox within {:.0} s after the run (autovacuum_naptime applies)", run + 1, wait));
        }
        if s.table_kb <= limit {
            pass_runs += 1;
        }
        before.push(b.table_kb);
        after.push(a.table_kb);
        settled.push(s.table_kb);
        total_settled.push(s.total_kb);
        heap_settled.push(s.heap_kb);
        waited.push(wait);
        dead_before.push(b.dead as f64);
        dead_after.push(a.dead as f64);
        dead_settled.push(s.dead as f64);
        ratios.push(s.table_kb / b.table_kb.max(32.0));
    }
    reset_queues(&mut c)?;
    let ev = fmt_num(cfg.b1_events as f64);
    let mut settled_row = Row::new("B1", "outbox table size after autovacuum", "kB")
        .value(&settled)
        .baseline("before", &before, "kB")
        .target(
            &format!(
                "≤ 2× before, floor 64 kB (waited ≤ {} s)",
                cfg.b1_wait.as_secs()
            ),
            pass_runs * 2 > cfg.runs,
        );
    settled_row.ratio = Some(stat(&ratios));
    Ok(vec![
        Row::new(
            "B1",
            &format!("outbox table size right after {ev} events"),
            "kB",
        )
        .value(&after)
        .baseline("before", &before, "kB"),
        Row::new(
            "B1",
            &format!("outbox n_dead_tup right after {ev} events"),
            "",
        )
        .value(&dead_after)
        .baseline("before", &dead_before, ""),
        settled_row,
        Row::new("B1", "  of which heap, after autovacuum", "kB").value(&heap_settled),
        Row::new(
            "B1",
            "  with indexes (pages kept for reuse), after autovacuum",
            "kB",
        )
        .value(&total_settled),
        Row::new("B1", "outbox n_dead_tup after autovacuum", "").value(&dead_settled),
        Row::new("B1", "waited (size back, or autovacuum done)", "s").value(&waited),
    ])
}

// Environment ------------------------------------------------------------------------------------------

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "memory_gib": (mem_kb / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "loadavg_at_start": load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    })
}

/// The commit the benchmark ran on, and whether the working tree had changes.
fn source_state() -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let changed = git(&["status", "--porcelain", "--untracked-files=no"])
        .map(|s| s.lines().count())
        .unwrap_or(0);
    json!({"commit": commit, "modified_files": changed})
}

fn settings(cfg: &Cfg) -> Res<Value> {
    let mut c = connect(cfg, &cfg.db)?;
    let rows = c
        .query(
            "SELECT name, setting || coalesce(' ' || unit, '') FROM pg_settings
             WHERE name IN ('server_version', 'shared_buffers', 'synchronous_commit', 'fsync', 'max_connections',
                            'wal_level', 'max_wal_size', 'autovacuum', 'autovacuum_naptime', 'work_mem')
                OR name LIKE 'picloud.%'
             ORDER BY name",
            &[],
        )
        .map_err(pg_err("read settings"))?;
    let mut map = serde_json::Map::new();
    for r in rows {
        map.insert(r.get::<_, String>(0), Value::String(r.get::<_, String>(1)));
    }
    let flags = if cfg.supervisor_args.is_empty() {
        "defaults, --poll-interval-ms 5000".to_owned()
    } else {
        format!(
            "defaults, --poll-interval-ms 5000 {}",
            cfg.supervisor_args.join(" ")
        )
    };
    map.insert("supervisor flags".to_owned(), Value::String(flags));
    Ok(Value::Object(map))
}

// Main ---------------------------------------------------------------------------------------------------

fn main() {
    let cfg = Cfg::from_env();
    if let Err(e) = std::fs::create_dir_all(&cfg.out) {
        eprintln!("cannot create {}: {e}", cfg.out.display());
        std::process::exit(1);
    }
    if !Path::new(&cfg.supervisor).exists() {
        eprintln!("supervisor binary {} not found (build it: cargo build --release -p picloud-supervisor)", cfg.supervisor);
        std::process::exit(1);
    }
    let started = SystemTime::now();
    let source = source_state();
    let main_db = match setup_main(&cfg) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("setup failed: {e}");
            std::process::exit(1);
        }
    };
    let settings = settings(&cfg).unwrap_or(Value::Null);
    progress(&format!(
        "{} mode, {} runs per case, cluster port {}, database {}",
        if cfg.quick { "QUICK" } else { "full" },
        cfg.runs,
        cfg.port,
        cfg.db
    ));

    let mut rows: Vec<Row> = vec![];
    let mut notes: Vec<String> = vec![];
    let mut chart = json!({});
    let record = |id: &str, what: &str, result: Res<Vec<Row>>, rows: &mut Vec<Row>| match result {
        Ok(r) => rows.extend(r),
        Err(e) => {
            progress(&format!("{id} FAILED: {e}"));
            rows.push(Row::failed(id, what, e));
        }
    };
    // Cases without a supervisor run first, while no supervisor has ever marked itself idle
    // (an idle supervisor makes every enqueue send a NOTIFY at commit).
    if cfg.wants("E1") {
        record(
            "E1",
            "enqueue",
            bench_e1(&cfg, &main_db, &mut notes),
            &mut rows,
        );
    }
    if cfg.wants("E2") {
        record("E2", "bulk enqueue", bench_e2(&cfg, &main_db), &mut rows);
    }
    if cfg.wants("M1") {
        record("M1", "matching", bench_m1(&cfg, &mut notes), &mut rows);
    }
    if cfg.wants("G1") {
        record("G1", "gc", bench_g1(&cfg, &mut notes), &mut rows);
    }
    if cfg.wants("P1") {
        record(
            "P1",
            "processing",
            bench_p1(&cfg, &main_db, &mut notes, &mut chart),
            &mut rows,
        );
    }
    if cfg.wants("P1-http") {
        record(
            "P1-http",
            "http handlers",
            bench_p1_http(&cfg, &main_db, &mut notes),
            &mut rows,
        );
    }
    if cfg.wants("L1") {
        record(
            "L1",
            "latency",
            bench_l1(&cfg, &main_db, &mut notes, &mut chart),
            &mut rows,
        );
    }
    if cfg.wants("C2") {
        record(
            "C2",
            "cron triggers and enqueue",
            bench_c2(&cfg, &main_db),
            &mut rows,
        );
    }
    if cfg.wants("C1") {
        record("C1", "cron lateness", bench_c1(&cfg, &mut notes), &mut rows);
    }
    if cfg.wants("B1") {
        record(
            "B1",
            "bloat",
            bench_b1(&cfg, &main_db, &mut notes),
            &mut rows,
        );
    }

    // The table in the order of the cases' ids as documented: E1 E2 P1 L1 M1 G1 B1.
    let rank = |id: &str| {
        ["E1", "E2", "P1", "L1", "M1", "G1", "B1", "C1", "C2"]
            .iter()
            .position(|x| *x == id)
            .unwrap_or(99)
    };
    rows.sort_by_key(|r| rank(&r.id));
    notes.insert(
        0,
        format!(
            "Every figure: median of {} runs (min–max); ratio = picloud / baseline per run, and a target on a ratio is judged on the median ratio shown. {}",
            cfg.runs,
            if cfg.quick {
                "QUICK smoke run: short durations and fewer events; figures are indicative only."
            } else {
                ""
            }
        ),
    );
    notes.push("P1 baseline adds WHERE due_at <= now() to the DELETE's sub-select so the partial index on due rows (predicate due_at IS NOT NULL) can serve it, as picloud's claim does.".into());

    let table = text_table(&rows);
    println!("{table}");
    for n in &notes {
        println!("  * {n}");
    }

    let elapsed = started.elapsed().map(|d| d.as_secs()).unwrap_or(0);
    let meta = json!({
        "quick": cfg.quick, "runs": cfg.runs, "port": cfg.port, "database": cfg.db,
        "started_unix": started.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "duration_s": elapsed, "machine": machine(), "settings": settings, "source": source,
        "parameters": {
            "e1_secs": cfg.e1_secs, "e2_events": cfg.e2_events, "p1_events": cfg.p1_events,
            "p1_http_events": cfg.p1_http_events, "l1_samples": cfg.l1_samples, "m1_secs": cfg.m1_secs,
            "g1_rows": cfg.g1_rows, "b1_events": cfg.b1_events, "b1_wait_s": cfg.b1_wait.as_secs(),
            "l1_gap_ms": cfg.l1_gap_ms, "only": cfg.only,
        },
    });
    let doc = json!({
        "meta": meta,
        "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
        "notes": notes,
        "chart": chart,
    });
    let json_path = cfg.out.join("results.json");
    let md_path = cfg.out.join("results.md");
    let mut md = String::new();
    md.push_str(&format!(
        "# picloud benchmark{}\n\n",
        if cfg.quick { " (quick run)" } else { "" }
    ));
    let m = &meta["machine"];
    md.push_str(&format!(
        "Machine: {} CPUs, {}, {} GiB RAM, load at start {}. Duration {} s.\n\n",
        m["nproc"],
        m["cpu_model"].as_str().unwrap_or("?"),
        m["memory_gib"],
        m["loadavg_at_start"].as_str().unwrap_or("?"),
        elapsed
    ));
    md.push_str(&format!(
        "Source: commit {} with {} modified tracked file(s) at start.\n\n",
        meta["source"]["commit"].as_str().unwrap_or("?"),
        meta["source"]["modified_files"]
    ));
    if let Value::Object(s) = &meta["settings"] {
        let list: Vec<String> = s
            .iter()
            .map(|(k, v)| format!("`{k}={}`", v.as_str().unwrap_or("")))
            .collect();
        md.push_str(&format!("Settings: {}\n\n", list.join(", ")));
    }
    md.push_str(&markdown_table(&rows));
    md.push_str("\n\n");
    for n in &notes {
        md.push_str(&format!("- {n}\n"));
    }
    let wrote = std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&doc).unwrap_or_default(),
    )
    .and_then(|_| std::fs::write(&md_path, md));
    match wrote {
        Ok(()) => progress(&format!(
            "wrote {} and {}",
            md_path.display(),
            json_path.display()
        )),
        Err(e) => {
            eprintln!("cannot write results: {e}");
            std::process::exit(1);
        }
    }
    if rows.iter().any(|r| r.error.is_some()) {
        std::process::exit(3);
    }
}
