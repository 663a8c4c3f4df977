//! Configuration: command-line flags and `PICLOUD_*` environment variables, declared once
//! with clap (each default is written in one place, `--help` is generated from it).
//!
//! A flag always wins over its environment variable. For the repeatable options
//! (--http-allow, --command) flags replace the variable entirely rather than adding to it,
//! so the command line alone says what runs. Empty environment variables count as unset.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use rustls::pki_types::CertificateDer;
use tokio_postgres::config::TargetSessionAttrs;

use crate::allow::AllowList;
use crate::db::Database;
use crate::handlers::command::{self, Commands};
use crate::logging::{LogFormat, LogLevel};
use crate::tls;

/// Applied when the connection string sets no connect_timeout, so a
/// silent network cannot hang a (re)connect forever.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_WORKER_NAME_CHARS: usize = 200;

/// picloud-supervisor: runs picloud outbox handlers (sql, http, command).
///
/// Every option can also be set with its environment variable; a flag wins.
#[derive(Parser, Debug)]
#[command(
    name = "picloud-supervisor",
    version,
    after_help = "Exit status: 0 after a clean shutdown, 1 when the supervisor failed while \
                  running, 2 for invalid configuration (including a --metrics-listen address \
                  that cannot be bound, and a database certificate that does not verify)."
)]
pub struct Cli {
    /// PostgreSQL connection string: a postgres:// URL or key=value pairs. sslmode (disable,
    /// prefer [default], require, verify-ca, verify-full) and sslrootcert work as in libpq.
    #[arg(
        long,
        env = "PICLOUD_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Name rows are claimed under; must differ between running supervisors
    /// [default: <hostname>-<pid>-<4 random hex digits>].
    #[arg(long, env = "PICLOUD_WORKER_NAME", value_name = "NAME")]
    pub worker_name: Option<String>,

    /// Handlers running at the same time; also the number of executor database connections.
    #[arg(long, env = "PICLOUD_CONCURRENCY", value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub concurrency: u16,

    /// Most rows a claim takes for free executor slots (1 to --concurrency) [default:
    /// --concurrency]; what it claims ahead (--prefetch) comes on top.
    #[arg(long, env = "PICLOUD_BATCH_SIZE", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub batch_size: Option<u16>,

    /// Most events of one app this supervisor runs at once (1 to --concurrency), so that one
    /// app's slow handlers cannot take every executor [default: --concurrency less an eighth,
    /// at least one slot kept for other apps when --concurrency is 2 or more].
    #[arg(long, env = "PICLOUD_MAX_RUNNING_PER_APP", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub max_running_per_app: Option<u16>,

    /// Most events claimed ahead of free executor slots: when handlers finish quickly, a claim
    /// takes up to twice as many more as finished since the previous claim; they start as
    /// slots free up, and one waiting longer than a third of its lease is given back. 0 claims
    /// only for free slots [default: 8 x --concurrency].
    #[arg(long, env = "PICLOUD_PREFETCH", value_name = "N",
          value_parser = clap::value_parser!(u16).range(0..=10000))]
    pub prefetch: Option<u16>,

    /// Deprecated and ignored (a claimed sql-handler event always runs in a transaction of its
    /// own; the sql lanes batch first attempts); accepted for this release only.
    #[arg(long, env = "PICLOUD_SQL_BATCH", value_name = "N", hide = true,
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub sql_batch: Option<u16>,

    /// Connections that run first attempts of sql-handler events set-based, without claims;
    /// 0 runs every event through claims.
    #[arg(long, env = "PICLOUD_SQL_LANES", value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u8).range(0..=64))]
    pub sql_lanes: u8,

    /// Connections that deliver first attempts of http-handler events without claims, each a
    /// batch at a time in one transaction; 0 delivers every event through claims. (Four, so
    /// that while some lanes lock or settle a batch in the database others deliver.)
    #[arg(long, env = "PICLOUD_HTTP_LANES", value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u8).range(0..=64))]
    pub http_lanes: u8,

    /// Most events a sql lane runs in one transaction.
    #[arg(long, env = "PICLOUD_SQL_LANE_BATCH", value_name = "N", default_value_t = 500,
          value_parser = clap::value_parser!(u16).range(1..=10000))]
    pub sql_lane_batch: u16,

    /// Longest idle wait before claiming again when no picloud_wake notification arrives.
    #[arg(long, env = "PICLOUD_POLL_INTERVAL_MS", value_name = "MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u32).range(50..))]
    pub poll_interval_ms: u32,

    /// Lease taken on claimed rows; renewed every lease/3 while an http or command handler runs.
    #[arg(long, env = "PICLOUD_LEASE_MS", value_name = "MS", default_value_t = 30000,
          value_parser = clap::value_parser!(i32).range(100..=86_400_000))]
    pub lease_ms: i32,

    /// On SIGTERM/SIGINT, how long running handlers may finish before their rows are released.
    #[arg(
        long,
        env = "PICLOUD_SHUTDOWN_GRACE_MS",
        value_name = "MS",
        default_value_t = 10000
    )]
    pub shutdown_grace_ms: u32,

    /// Hosts http handlers may call; repeatable and comma-separated (IPv6 as [addr]:port).
    /// Loopback, private, link-local, unspecified and metadata addresses are refused unless
    /// that IP address itself is listed (a listed name that resolves to one is refused).
    #[arg(
        long = "http-allow",
        env = "PICLOUD_HTTP_ALLOW",
        value_name = "HOST[:PORT][,...]"
    )]
    pub http_allow: Vec<String>,

    /// PEM file of extra root certificates for https handlers (a private CA), trusted besides
    /// the system's roots.
    #[arg(long, env = "PICLOUD_HTTP_CA_FILE", value_name = "FILE")]
    pub http_ca_file: Option<PathBuf>,

    /// Program run for command handlers targeting NAME, without a shell; arguments are split on
    /// whitespace, and words after the value up to the next --option are added as arguments.
    /// Repeatable; in PICLOUD_COMMANDS separate entries with ';'.
    #[arg(
        long = "command",
        env = "PICLOUD_COMMANDS",
        value_name = "'NAME=PROGRAM [ARG...]'",
        value_delimiter = ';'
    )]
    pub commands: Vec<String>,

    /// Largest http response body or command stdout accepted as a result; more fails the event.
    #[arg(long, env = "PICLOUD_MAX_REPLY_BYTES", value_name = "BYTES", default_value_t = 1_048_576,
          value_parser = clap::value_parser!(u32).range(1..=64 * 1024 * 1024))]
    pub max_reply_bytes: u32,

    /// Logs go to stderr, one line per entry: error, warn, info (a summary every 10 s) or debug
    /// (a line per event).
    #[arg(long, env = "PICLOUD_LOG_LEVEL", value_name = "LEVEL", value_enum, ignore_case = true,
          default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,

    /// json: one JSON object per line (ts, level, msg, then the fields); text: 'ts level msg
    /// key=value ...' for reading by eye.
    #[arg(long, env = "PICLOUD_LOG_FORMAT", value_name = "FORMAT", value_enum, ignore_case = true,
          default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// Serve metrics (GET /metrics) and a health check (GET /health) over plain HTTP on this
    /// address, e.g. 127.0.0.1:9187; no authentication. Off when unset.
    #[arg(long, env = "PICLOUD_METRICS_LISTEN", value_name = "IP:PORT", value_parser = listen_address)]
    pub metrics_listen: Option<SocketAddr>,
}

pub struct Config {
    pub database: Database,
    /// How the database connection is encrypted, for the start-up log.
    pub sslmode: tls::SslMode,
    pub worker_name: String,
    pub concurrency: usize,
    pub batch_size: usize,
    pub max_running_per_app: usize,
    pub prefetch: usize,
    /// What the configuration asked for that this release no longer does, said at start-up.
    pub deprecated: Vec<&'static str>,
    pub sql_lanes: usize,
    pub sql_lane_batch: usize,
    pub http_lanes: usize,
    pub poll_interval: Duration,
    pub lease_ms: i32,
    pub shutdown_grace: Duration,
    pub http_allow: AllowList,
    pub http_roots: Vec<CertificateDer<'static>>,
    pub commands: Commands,
    pub log_level: LogLevel,
    pub log_format: LogFormat,
    pub max_reply_bytes: usize,
    /// Where to serve /metrics and /health; None serves nothing.
    pub metrics_listen: Option<SocketAddr>,
}

/// The per-app cap when none is given: an eighth of the executors (at least one) kept for
/// other apps, so a single app loses little and another app always finds a free executor.
fn default_max_running_per_app(concurrency: usize) -> usize {
    if concurrency < 2 {
        return concurrency;
    }
    concurrency - (concurrency / 8).max(1)
}

/// Reads the process's arguments and environment. `Err` is clap's own: a usage error (exit 2)
/// or the --help/--version text (exit 0).
pub fn parse_args<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    forget_empty_variables();
    Cli::try_parse_from(join_command_words(
        args.into_iter().map(Into::into).collect(),
    ))
}

/// Empty (or blank) PICLOUD_* variables count as unset, as they always have: clap would read
/// them as an empty value.
fn forget_empty_variables() {
    for (key, value) in std::env::vars_os() {
        let is_ours = key.to_str().is_some_and(|k| k.starts_with("PICLOUD_"));
        if is_ours && value.to_str().is_some_and(|v| v.trim().is_empty()) {
            std::env::remove_var(key);
        }
    }
}

/// `--command NAME=PROGRAM ARG ARG`: the words after the value, up to the next `--option`,
/// are the program's arguments (even when they start with a single '-').
fn join_command_words(args: Vec<OsString>) -> Vec<OsString> {
    let mut joined: Vec<OsString> = Vec::with_capacity(args.len());
    // The last argument pushed is the value of a --command.
    let mut in_command = false;
    let mut expect_value = false;
    for arg in args {
        let text = arg.to_str();
        let is_option = text.is_some_and(|t| t.starts_with("--"));
        if expect_value {
            expect_value = false;
            in_command = !is_option;
            joined.push(arg);
            continue;
        }
        if in_command && !is_option {
            if let (Some(last), Some(word)) = (joined.last_mut(), text) {
                last.push(" ");
                last.push(word);
                continue;
            }
        }
        in_command = text.is_some_and(|t| t.starts_with("--command="));
        expect_value = text == Some("--command");
        joined.push(arg);
    }
    joined
}

impl Cli {
    /// Checks what clap cannot (values that depend on each other, the allow list, the command
    /// table, the connection string) and builds the configuration.
    pub fn into_config(self) -> Result<Config, String> {
        let concurrency = usize::from(self.concurrency);
        let batch_size = match self.batch_size {
            Some(n) if usize::from(n) > concurrency => {
                return Err(format!(
                    "invalid --batch-size: '{n}' (expected a whole number from 1 to --concurrency {concurrency})"
                ))
            }
            Some(n) => usize::from(n),
            None => concurrency,
        };
        let max_running_per_app = match self.max_running_per_app {
            Some(n) if usize::from(n) > concurrency => {
                return Err(format!(
                    "invalid --max-running-per-app: '{n}' (expected a whole number from 1 to --concurrency {concurrency})"
                ))
            }
            Some(n) => usize::from(n),
            None => default_max_running_per_app(concurrency),
        };
        let worker_name = match self.worker_name {
            Some(name) => check_worker_name(&name)?,
            None => default_worker_name(),
        };
        let http_allow =
            AllowList::parse(&self.http_allow).map_err(|e| format!("invalid --http-allow: {e}"))?;
        let commands =
            command::parse_specs(&self.commands).map_err(|e| format!("invalid --command: {e}"))?;
        let http_roots = match &self.http_ca_file {
            Some(path) => tls::load_pem_certificates(path)
                .map_err(|e| format!("invalid --http-ca-file: {e}"))?,
            None => Vec::new(),
        };
        let (database, sslmode) = database(&self.database_url)?;
        Ok(Config {
            database,
            sslmode,
            worker_name,
            concurrency,
            batch_size,
            max_running_per_app,
            prefetch: self.prefetch.map_or(concurrency * 8, usize::from),
            deprecated: self
                .sql_batch
                .map(|_| {
                    "--sql-batch (PICLOUD_SQL_BATCH) is deprecated and ignored: a claimed sql \
                     event runs in a transaction of its own; it will be refused in the next release"
                })
                .into_iter()
                .collect(),
            sql_lanes: usize::from(self.sql_lanes),
            sql_lane_batch: usize::from(self.sql_lane_batch),
            http_lanes: usize::from(self.http_lanes),
            poll_interval: Duration::from_millis(u64::from(self.poll_interval_ms)),
            lease_ms: self.lease_ms,
            shutdown_grace: Duration::from_millis(u64::from(self.shutdown_grace_ms)),
            http_allow,
            http_roots,
            commands,
            log_level: self.log_level,
            log_format: self.log_format,
            max_reply_bytes: self.max_reply_bytes as usize,
            metrics_listen: self.metrics_listen,
        })
    }
}

/// The connection settings and TLS connector. The string is never echoed back: it may hold a
/// password.
fn database(text: &str) -> Result<(Database, tls::SslMode), String> {
    let invalid = |e: String| format!("invalid --database-url: {e}");
    let split = tls::split_connection_string(text).map_err(invalid)?;
    let mut config: tokio_postgres::Config = split
        .rest
        .parse()
        .map_err(|e: tokio_postgres::Error| invalid(e.to_string()))?;
    if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
        return Err(invalid("no host given".to_owned()));
    }
    if config.get_application_name().is_none() {
        config.application_name("picloud-supervisor");
    }
    // Several hosts (a primary and its standbys) are only useful if the connection skips those
    // that cannot take writes: libpq's default, any, would settle on the first host that
    // answers, standby or not, and stay there. target_session_attrs=any written out is kept.
    let hosts = config.get_hosts().len().max(config.get_hostaddrs().len());
    let ports = config.get_ports().len();
    if ports > 1 && ports != hosts {
        return Err(invalid(format!(
            "{hosts} hosts but {ports} ports (give one port for all hosts, or one per host)"
        )));
    }
    if hosts > 1 && !split.rest.contains("target_session_attrs") {
        config.target_session_attrs(TargetSessionAttrs::ReadWrite);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
    }
    config.ssl_mode(split.mode.negotiation());
    let client_config =
        tls::client_config(split.mode, split.root_cert.as_deref()).map_err(invalid)?;
    Ok((
        Database::new(
            config,
            tokio_postgres_rustls::MakeRustlsConnect::new(client_config),
        ),
        split.mode,
    ))
}

/// An IP address and a port. Host names are refused rather than resolved: which
/// interface the endpoint is exposed on should be plain from the configuration.
fn listen_address(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    let address: SocketAddr = text
        .parse()
        .map_err(|_| format!("'{text}' (expected IP:PORT, e.g. 127.0.0.1:9187 or [::1]:9187)"))?;
    if address.port() == 0 {
        return Err(format!("'{text}' (the port must be from 1 to 65535)"));
    }
    Ok(address)
}

fn check_worker_name(name: &str) -> Result<String, String> {
    let name = name.trim();
    if name.is_empty()
        || name.chars().count() > MAX_WORKER_NAME_CHARS
        || name.chars().any(char::is_control)
    {
        return Err(format!(
            "invalid --worker-name: expected 1 to {MAX_WORKER_NAME_CHARS} printable characters"
        ));
    }
    Ok(name.to_owned())
}

fn default_worker_name() -> String {
    format!(
        "{}-{}-{:04x}",
        hostname(),
        std::process::id(),
        rand::random::<u16>()
    )
}

fn hostname() -> String {
    let from_kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    let from_env = || std::env::var("HOSTNAME").ok();
    from_kernel
        .or_else(from_env)
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Mutex, PoisonError};

    const URL: &str = "postgres://picloud@localhost:5432/app";

    /// The environment is the process's: tests that set it take turns.
    static ENV: Mutex<()> = Mutex::new(());

    fn parse(cli: &[&str], vars: &[(&str, &str)]) -> Result<Config, String> {
        let _turn = ENV.lock().unwrap_or_else(PoisonError::into_inner);
        let ours: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
        ours.iter()
            .filter(|k| k.starts_with("PICLOUD_"))
            .for_each(|k| std::env::remove_var(k));
        vars.iter().for_each(|(k, v)| std::env::set_var(k, v));
        let parsed = parse_args(std::iter::once("picloud-supervisor").chain(cli.iter().copied()));
        vars.iter().for_each(|(k, _)| std::env::remove_var(k));
        parsed.map_err(|e| e.to_string())?.into_config()
    }

    fn config(cli: &[&str], vars: &[(&str, &str)]) -> Config {
        parse(cli, vars).unwrap_or_else(|e| panic!("unexpected error: {e}"))
    }

    #[test]
    fn sql_batch_is_accepted_for_one_release_and_said_to_be_ignored() {
        for c in [
            config(&["--database-url", URL, "--sql-batch", "4"], &[]),
            config(&["--database-url", URL], &[("PICLOUD_SQL_BATCH", "1")]),
        ] {
            assert_eq!(c.deprecated.len(), 1);
            assert!(
                c.deprecated[0].contains("--sql-batch"),
                "{:?}",
                c.deprecated
            );
        }
        assert!(parse(&["--database-url", URL, "--sql-batch", "0"], &[]).is_err());
    }

    #[test]
    fn defaults() {
        let c = config(&["--database-url", URL], &[]);
        let numbers = [
            c.concurrency,
            c.batch_size,
            c.sql_lanes,
            c.sql_lane_batch,
            c.http_lanes,
            c.prefetch,
        ];
        assert_eq!(numbers, [16, 16, 2, 500, 4, 128]);
        assert!(c.deprecated.is_empty());
        assert_eq!(c.max_running_per_app, 14);
        assert_eq!(c.poll_interval, Duration::from_millis(5000));
        assert_eq!((c.lease_ms, c.max_reply_bytes), (30_000, 1024 * 1024));
        assert_eq!(c.shutdown_grace, Duration::from_millis(10_000));
        assert_eq!(
            (c.log_level, c.log_format),
            (LogLevel::Info, LogFormat::Json)
        );
        assert_eq!((c.metrics_listen, c.sslmode), (None, tls::SslMode::Prefer));
        assert!(c.http_allow.entries.is_empty() && c.commands.is_empty());
        let app_name = c.database.config.get_application_name();
        assert_eq!(app_name, Some("picloud-supervisor"));
        let parts: Vec<&str> = c.worker_name.rsplitn(3, '-').collect();
        assert_eq!(parts.len(), 3);
        assert!(parts[0].len() == 4 && parts[0].chars().all(|ch| ch.is_ascii_hexdigit()));
        assert_eq!(parts[1], std::process::id().to_string());
    }

    #[test]
    fn environment_is_used_and_empty_variables_are_unset() {
        let c = config(
            &[],
            &[
                (
                    "PICLOUD_DATABASE_URL",
                    "host=db user=picloud sslmode=require",
                ),
                ("PICLOUD_CONCURRENCY", "4"),
                ("PICLOUD_WORKER_NAME", "w1"),
                ("PICLOUD_HTTP_ALLOW", "example.com,127.0.0.1:8080"),
                ("PICLOUD_COMMANDS", "echo=/bin/echo hi;cat=/bin/cat"),
                ("PICLOUD_LOG_LEVEL", "DEBUG"),
                ("PICLOUD_BATCH_SIZE", ""),
                ("PICLOUD_METRICS_LISTEN", " "),
            ],
        );
        assert_eq!(
            (c.concurrency, c.batch_size, c.worker_name.as_str()),
            (4, 4, "w1")
        );
        assert_eq!(c.max_running_per_app, 3);
        assert_eq!((c.http_allow.entries.len(), c.commands.len()), (2, 2));
        let echo = c.commands.get("echo").map(|s| s.args.clone());
        assert_eq!(echo, Some(vec!["hi".to_owned()]));
        assert_eq!((c.log_level, c.metrics_listen), (LogLevel::Debug, None));
        assert_eq!(c.sslmode, tls::SslMode::Require);
    }

    #[test]
    fn flags_beat_environment_and_replace_repeatable_lists() {
        let c = config(
            &[
                "--database-url",
                URL,
                "--concurrency=2",
                "--worker-name",
                "from-flag",
                "--http-allow",
                "a.example",
                "--http-allow",
                "b.example:81,c.example",
                "--command",
                "x=/bin/cat",
                "--lease-ms",
                "5000",
            ],
            &[
                ("PICLOUD_DATABASE_URL", "not even a url ==="),
                ("PICLOUD_CONCURRENCY", "64"),
                ("PICLOUD_WORKER_NAME", "from-env"),
                ("PICLOUD_HTTP_ALLOW", "env.example"),
                ("PICLOUD_COMMANDS", "y=/bin/true"),
                ("PICLOUD_LEASE_MS", "bogus"),
            ],
        );
        assert_eq!((c.concurrency, c.batch_size, c.lease_ms), (2, 2, 5000));
        assert_eq!(c.max_running_per_app, 1);
        assert_eq!(c.worker_name, "from-flag");
        let allowed: Vec<String> = c.http_allow.entries.iter().map(|e| e.to_string()).collect();
        assert_eq!(allowed, ["a.example", "b.example:81", "c.example"]);
        assert_eq!(c.commands.keys().collect::<Vec<_>>(), ["x"]);
    }

    #[test]
    fn the_per_app_cap_keeps_an_eighth_for_other_apps() {
        let caps: Vec<usize> = [1, 2, 7, 8, 16, 64, 1024]
            .into_iter()
            .map(default_max_running_per_app)
            .collect();
        assert_eq!(caps, [1, 1, 6, 7, 14, 56, 896]);
    }

    #[test]
    fn command_words_after_the_value_are_arguments() {
        let cli = [
            "--command",
            "resize=/usr/bin/convert",
            "-resize",
            "50%",
            "--database-url",
            URL,
        ];
        let c = config(&cli, &[]);
        let spec = c.commands.get("resize").cloned();
        assert_eq!(
            spec.as_ref().map(|s| s.program.as_str()),
            Some("/usr/bin/convert")
        );
        assert_eq!(
            spec.map(|s| s.args),
            Some(vec!["-resize".into(), "50%".into()])
        );
        let c = config(
            &["--database-url", URL, "--command", "q=/bin/echo a  b"],
            &[],
        );
        assert_eq!(c.commands.get("q").map(|s| s.args.len()), Some(2));
    }

    #[test]
    fn multi_host_urls_look_for_the_primary() {
        let cases = [
            (
                "host=a,b port=5432,5433 dbname=app sslmode=require",
                "a:5432,b:5433",
                TargetSessionAttrs::ReadWrite,
            ),
            (
                "postgres://u@a:5432,b:5433/app?target_session_attrs=read-write&sslmode=disable",
                "a:5432,b:5433",
                TargetSessionAttrs::ReadWrite,
            ),
            (
                "postgresql://u@a,b:6000/app?sslmode=prefer",
                "a:5432,b:6000",
                TargetSessionAttrs::ReadWrite,
            ),
            // Written out, any is kept (and the supervisor drops standbys it lands on itself).
            (
                "host=a,b target_session_attrs=any",
                "a:5432,b:5432",
                TargetSessionAttrs::Any,
            ),
            ("host=a port=6000", "a:6000", TargetSessionAttrs::Any),
        ];
        for (url, hosts, attrs) in cases {
            let c = config(&["--database-url", url], &[]);
            assert_eq!(c.database.hosts(), hosts, "{url}");
            assert_eq!(c.database.config.get_target_session_attrs(), attrs, "{url}");
        }
        let c = config(
            &["--database-url", "postgres://u@a:1,b:2/app?sslmode=require"],
            &[],
        );
        assert_eq!(c.sslmode, tls::SslMode::Require);
        for bad in [
            "host=a,b port=1,2,3",
            "postgres://u@a:1,b:x/app",
            "host=a,b target_session_attrs=primary",
        ] {
            let error = parse(&["--database-url", bad], &[])
                .err()
                .unwrap_or_default();
            assert!(error.contains("--database-url"), "{bad}: {error}");
        }
    }

    #[test]
    fn errors_name_the_option_and_never_echo_the_url() {
        // (flags, environment, what the error must name)
        type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            (&[], &[], "--database-url"),
            (&["--database-url", "postgres://"], &[], "no host"),
            (&["--concurrency", "0"], &[], "--concurrency"),
            (&["--concurrency", "x"], &[], "'x'"),
            (&[], &[("PICLOUD_CONCURRENCY", "-1")], "--concurrency"),
            (
                &["--concurrency", "4", "--batch-size", "5"],
                &[],
                "--batch-size",
            ),
            (
                &["--concurrency", "4", "--max-running-per-app", "5"],
                &[],
                "--max-running-per-app",
            ),
            (
                &["--max-running-per-app", "0"],
                &[],
                "--max-running-per-app",
            ),
            (&["--poll-interval-ms", "1"], &[], "--poll-interval-ms"),
            (&["--lease-ms", "99999999999"], &[], "--lease-ms"),
            (&["--log-level", "trace"], &[], "--log-level"),
            (&["--log-format", "logfmt"], &[], "--log-format"),
            (&["--nope", "1"], &[], "--nope"),
            (&["stray"], &[], "stray"),
            (
                &["--database-url", URL, "--database-url", URL],
                &[],
                "--database-url",
            ),
            (&["--http-allow", "*.example.com"], &[], "--http-allow"),
            (&[], &[("PICLOUD_HTTP_ALLOW", "http://x/")], "--http-allow"),
            (
                &["--command", "bad name=/bin/true"],
                &[],
                "invalid command name",
            ),
            (
                &["--command", "a=/bin/true", "--command", "a=/bin/false"],
                &[],
                "more than once",
            ),
            (&["--command", "noprogram="], &[], "no program"),
            (&["--worker-name", " "], &[], "--worker-name"),
            (&["--max-reply-bytes", "0"], &[], "--max-reply-bytes"),
            (
                &["--http-ca-file", "/nonexistent.pem"],
                &[],
                "--http-ca-file",
            ),
            (
                &[
                    "--database-url",
                    "host=db sslmode=verify-full sslrootcert=/no.pem",
                ],
                &[],
                "/no.pem",
            ),
            (
                &["--database-url", "postgres://u:s3cret@host:notaport/db"],
                &[],
                "--database-url",
            ),
        ];
        for (cli, vars, needle) in cases {
            let mut args = cli.to_vec();
            if !cli.contains(&"--database-url") && !cli.is_empty() {
                args.extend(["--database-url", URL]);
            }
            let error = parse(&args, vars).err().unwrap_or_default();
            assert!(error.contains(needle), "{cli:?}: {error}");
            assert!(!error.contains("s3cret"), "{error}");
        }
    }

    #[test]
    fn metrics_listen_and_log_format() {
        let cli = [
            "--database-url",
            URL,
            "--metrics-listen",
            "127.0.0.1:9187",
            "--log-format",
            "text",
        ];
        let env = [
            ("PICLOUD_METRICS_LISTEN", "0.0.0.0:1"),
            ("PICLOUD_LOG_FORMAT", "json"),
        ];
        let c = config(&cli, &env);
        assert_eq!(
            (c.metrics_listen, c.log_format),
            ("127.0.0.1:9187".parse().ok(), LogFormat::Text)
        );
        let env = [
            ("PICLOUD_METRICS_LISTEN", " [::1]:9187 "),
            ("PICLOUD_LOG_FORMAT", "TEXT"),
        ];
        let c = config(&["--database-url", URL], &env);
        assert_eq!(
            (c.metrics_listen, c.log_format),
            ("[::1]:9187".parse().ok(), LogFormat::Text)
        );
        for bad in [
            "9187",
            ":9187",
            "localhost:9187",
            "127.0.0.1",
            "127.0.0.1:0",
            "::1:9187",
        ] {
            let error = parse(&["--database-url", URL, "--metrics-listen", bad], &[]);
            let error = error.err().unwrap_or_default();
            assert!(
                error.contains("--metrics-listen") && error.contains(bad),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn help_and_version() {
        let help = parse(&["--help"], &[]).err().unwrap_or_default();
        for name in [
            "--database-url",
            "PICLOUD_DATABASE_URL",
            "PICLOUD_HTTP_CA_FILE",
            "[default: 16]",
        ] {
            assert!(help.contains(name), "{name} missing from help:\n{help}");
        }
        let version = parse(&["--version"], &[]).err().unwrap_or_default();
        assert!(version.contains(env!("CARGO_PKG_VERSION")));
    }
}
