//! Configuration from the environment, the error type and progress output.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct Cfg {
    pub quick: bool,
    pub runs: usize,
    pub port: u16,
    pub db: String,
    pub supervisor: String,
    pub out: PathBuf,
    pub e1_secs: u32,
    pub e2_events: i64,
    pub p1_events: i64,
    pub p1_http_events: i64,
    pub l1_samples: usize,
    pub m1_secs: u32,
    pub g1_rows: i64,
    pub b1_events: i64,
    pub b1_wait: Duration,
    pub drain_timeout: Duration,
    /// Cases to run (BENCH_ONLY=E1,L1); all when empty.
    pub only: Vec<String>,
    /// Gap between L1 samples (BENCH_L1_GAP_MS, default 20).
    pub l1_gap_ms: u64,
    /// Extra supervisor flags for every case (BENCH_SUPERVISOR_ARGS, space-separated), for
    /// trying settings; the published figures use the defaults.
    pub supervisor_args: Vec<String>,
}

impl Cfg {
    pub fn from_env() -> Cfg {
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
            // BENCH_P1_EVENTS and BENCH_P1_HTTP_EVENTS: longer drains, to watch with perf or top.
            p1_events: env("BENCH_P1_EVENTS")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| pick(quick, 5_000, 200_000)),
            p1_http_events: env("BENCH_P1_HTTP_EVENTS")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| pick(quick, 2_000, 20_000)),
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

    pub fn wants(&self, id: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o.eq_ignore_ascii_case(id))
    }

    pub fn url(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db} application_name=picloud-bench",
            self.port
        )
    }
}

pub type Res<T> = Result<T, String>;

pub fn err<E: std::fmt::Display>(context: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{context}: {e}")
}

pub fn pg_err(context: &str) -> impl FnOnce(postgres::Error) -> String + '_ {
    move |e| match e.as_db_error() {
        Some(d) => format!("{context}: {} ({})", d.message(), d.code().code()),
        None => format!("{context}: {e}"),
    }
}

pub fn progress(msg: &str) {
    eprintln!("[bench] {msg}");
}
