//! Configuration from command-line flags and `PICLOUD_*` environment variables.
//!
//! A flag always wins over its environment variable. For the repeatable
//! options (--http-allow, --command) flags replace the variable entirely
//! rather than adding to it, so the command line alone says what runs.
//! Empty environment variables count as unset.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use crate::allow::AllowList;
use crate::handlers::command::{self, Commands};
use crate::log::{Format, Level};
use crate::random;

pub struct Config {
    pub db: tokio_postgres::Config,
    pub worker_name: String,
    pub concurrency: usize,
    pub batch_size: usize,
    pub sql_batch: usize,
    pub sql_lanes: usize,
    pub sql_lane_batch: usize,
    pub poll_interval: Duration,
    pub lease_ms: i32,
    pub shutdown_grace: Duration,
    pub http_allow: AllowList,
    pub commands: Commands,
    pub log_level: Level,
    pub log_format: Format,
    pub max_reply_bytes: usize,
    /// Where to serve /metrics and /health; None serves nothing.
    pub metrics_listen: Option<SocketAddr>,
}

pub enum Parsed {
    Run(Box<Config>),
    Help,
    Version,
}

#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

struct Opt {
    flag: &'static str,
    env: &'static str,
    value: &'static str,
    default: &'static str,
    repeatable: bool,
    help: &'static str,
}

const MAX_CONCURRENCY: usize = 1024;
const MAX_SQL_LANES: usize = 64;
const MIN_POLL_INTERVAL_MS: u64 = 50;
/// The range picloud_claim accepts.
const MIN_LEASE_MS: i32 = 100;
const MAX_LEASE_MS: i32 = 86_400_000;
const MAX_REPLY_BYTES_LIMIT: usize = 64 * 1024 * 1024;
const MAX_WORKER_NAME_CHARS: usize = 200;
/// Applied when the connection string sets no connect_timeout, so a
/// silent network cannot hang a (re)connect forever.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

const OPTIONS: &[Opt] = &[
    Opt {
        flag: "database-url",
        env: "PICLOUD_DATABASE_URL",
        value: "URL",
        default: "(required)",
        repeatable: false,
        help: "PostgreSQL connection string: a postgres:// URL or key=value pairs. \
               Connections are not encrypted: TLS (sslmode=require) is not supported.",
    },
    Opt {
        flag: "worker-name",
        env: "PICLOUD_WORKER_NAME",
        value: "NAME",
        default: "<hostname>-<pid>-<4 random hex digits>",
        repeatable: false,
        help: "Name rows are claimed under; must differ between running supervisors.",
    },
    Opt {
        flag: "concurrency",
        env: "PICLOUD_CONCURRENCY",
        value: "N",
        default: "16",
        repeatable: false,
        help: "Handlers running at the same time (1-1024); also the number of executor \
               database connections.",
    },
    Opt {
        flag: "batch-size",
        env: "PICLOUD_BATCH_SIZE",
        value: "N",
        default: "same as --concurrency",
        repeatable: false,
        help: "Most rows claimed at once (1 to --concurrency). A claim never asks for \
               more rows than there are free executor slots.",
    },
    Opt {
        flag: "poll-interval-ms",
        env: "PICLOUD_POLL_INTERVAL_MS",
        value: "MS",
        default: "5000",
        repeatable: false,
        help: "Longest idle wait before claiming again when no picloud_wake notification \
               arrives (at least 50).",
    },
    Opt {
        flag: "lease-ms",
        env: "PICLOUD_LEASE_MS",
        value: "MS",
        default: "30000",
        repeatable: false,
        help: "Lease taken on claimed rows (100 to 86400000); renewed every lease/3 while an \
               http or command handler runs.",
    },
    Opt {
        flag: "sql-batch",
        env: "PICLOUD_SQL_BATCH",
        value: "N",
        default: "8",
        repeatable: false,
        help: "Most sql-handler events run in one transaction (1-1000), each in its own \
               savepoint, so that they share one commit; 1 runs every event in a transaction \
               of its own. If a batch fails as a whole (statement timeout), its events run \
               again one by one.",
    },
    Opt {
        flag: "sql-lanes",
        env: "PICLOUD_SQL_LANES",
        value: "N",
        default: "2",
        repeatable: false,
        help: "Connections (0-64) that run first attempts of sql-handler events set-based, \
               a batch per transaction without claiming them; 0 runs every event through \
               claims. A batch that fails is rolled back and its events run the ordinary way.",
    },
    Opt {
        flag: "sql-lane-batch",
        env: "PICLOUD_SQL_LANE_BATCH",
        value: "N",
        default: "500",
        repeatable: false,
        help: "Most events a sql lane runs in one transaction (1-10000).",
    },
    Opt {
        flag: "shutdown-grace-ms",
        env: "PICLOUD_SHUTDOWN_GRACE_MS",
        value: "MS",
        default: "10000",
        repeatable: false,
        help: "On SIGTERM/SIGINT, how long running handlers may finish before their rows \
               are released back to the queue.",
    },
    Opt {
        flag: "http-allow",
        env: "PICLOUD_HTTP_ALLOW",
        value: "HOST[:PORT][,...]",
        default: "none (every http handler is refused)",
        repeatable: true,
        help: "Hosts http handlers may call; repeatable and comma-separated (IPv6 as \
               [addr]:port). Loopback, private, link-local, unspecified and metadata \
               addresses are refused unless that IP address itself is listed (a listed name that resolves to one is refused). Only plain \
               http:// targets work: https is not supported.",
    },
    Opt {
        flag: "command",
        env: "PICLOUD_COMMANDS",
        value: "'NAME=PROGRAM [ARG...]'",
        default: "none",
        repeatable: true,
        help: "Program run for command handlers targeting NAME, without a shell; \
               arguments are split on whitespace, and words after the value up to the \
               next --option are added as arguments. Repeatable; in PICLOUD_COMMANDS \
               separate entries with ';'.",
    },
    Opt {
        flag: "log-level",
        env: "PICLOUD_LOG_LEVEL",
        value: "LEVEL",
        default: "info",
        repeatable: false,
        help: "error, warn, info or debug. Logs go to stderr, one line per entry \
               (see --log-format).",
    },
    Opt {
        flag: "log-format",
        env: "PICLOUD_LOG_FORMAT",
        value: "FORMAT",
        default: "json",
        repeatable: false,
        help: "json: one JSON object per line (ts, level, msg, then the fields); \
               text: 'ts level msg key=value ...' for reading by eye.",
    },
    Opt {
        flag: "max-reply-bytes",
        env: "PICLOUD_MAX_REPLY_BYTES",
        value: "BYTES",
        default: "1048576",
        repeatable: false,
        help: "Largest http response body or command stdout accepted as a result; more \
               fails the event. Error texts are always cut to 4096 bytes.",
    },
    Opt {
        flag: "metrics-listen",
        env: "PICLOUD_METRICS_LISTEN",
        value: "IP:PORT",
        default: "off",
        repeatable: false,
        help: "Serve Prometheus metrics (GET /metrics) and a health check (GET /health) over \
               plain HTTP on this address, e.g. 127.0.0.1:9187 or [::]:9187. No \
               authentication: choose an address only trusted clients reach. If it cannot be \
               bound the supervisor exits with status 2.",
    },
];

pub fn help_text() -> String {
    let mut text = String::from(
        "picloud-supervisor: runs picloud outbox handlers (sql, http, command)\n\n\
         USAGE:\n    picloud-supervisor --database-url URL [OPTIONS]\n\n\
         Every option can also be set with its environment variable; a flag wins.\n\n\
         OPTIONS:\n",
    );
    for opt in OPTIONS {
        text.push_str(&format!("    --{} {}\n", opt.flag, opt.value));
        text.push_str(&format!(
            "        env {}, default: {}\n",
            opt.env, opt.default
        ));
        text.push_str(&format!("        {}\n\n", opt.help));
    }
    text.push_str("    -h, --help       Print this help and exit.\n");
    text.push_str("    -V, --version    Print the version and exit.\n\n");
    text.push_str(
        "Exit status: 0 after a clean shutdown, 1 when the supervisor failed while running, \
         2 for invalid configuration (including a --metrics-listen address that cannot be \
         bound).\n",
    );
    text
}

/// The `PICLOUD_*` environment variables of this process.
pub fn process_env() -> Result<HashMap<String, String>, ConfigError> {
    let mut env = HashMap::new();
    for (key, value) in std::env::vars_os() {
        let Some(key) = key.to_str().filter(|k| k.starts_with("PICLOUD_")) else {
            continue;
        };
        let value = value
            .into_string()
            .map_err(|_| ConfigError(format!("{key} is not valid UTF-8")))?;
        env.insert(key.to_owned(), value);
    }
    Ok(env)
}

/// Where a value came from, for error messages.
struct Value {
    origin: String,
    text: String,
}

/// Parses arguments (without the program name) and environment variables.
pub fn parse(args: &[String], env: &HashMap<String, String>) -> Result<Parsed, ConfigError> {
    let flags = match collect_flags(args)? {
        Flags::Values(flags) => flags,
        Flags::Help => return Ok(Parsed::Help),
        Flags::Version => return Ok(Parsed::Version),
    };
    let lookup = |flag: &str| -> Vec<Value> { values(flag, &flags, env) };
    let single = |flag: &str| -> Option<Value> { lookup(flag).pop() };

    let url = single("database-url").ok_or_else(|| {
        ConfigError("missing --database-url (or PICLOUD_DATABASE_URL)".to_owned())
    })?;
    let db = parse_database_url(&url)?;

    let worker_name = match single("worker-name") {
        Some(v) => check_worker_name(&v)?,
        None => default_worker_name(),
    };
    let concurrency: usize = match single("concurrency") {
        Some(v) => number(&v, 1, MAX_CONCURRENCY)?,
        None => 16,
    };
    let batch_size: usize = match single("batch-size") {
        Some(v) => number(&v, 1, concurrency)?,
        None => concurrency,
    };
    let sql_batch: usize = match single("sql-batch") {
        Some(v) => number(&v, 1, 1000)?,
        None => 8,
    };
    let sql_lanes: usize = match single("sql-lanes") {
        Some(v) => number(&v, 0, MAX_SQL_LANES)?,
        None => 2,
    };
    let sql_lane_batch: usize = match single("sql-lane-batch") {
        Some(v) => number(&v, 1, 10_000)?,
        None => 500,
    };
    let poll_interval_ms: u64 = match single("poll-interval-ms") {
        Some(v) => number(&v, MIN_POLL_INTERVAL_MS, u64::from(u32::MAX))?,
        None => 5000,
    };
    let lease_ms: i32 = match single("lease-ms") {
        Some(v) => number(&v, MIN_LEASE_MS, MAX_LEASE_MS)?,
        None => 30_000,
    };
    let shutdown_grace_ms: u64 = match single("shutdown-grace-ms") {
        Some(v) => number(&v, 0, u64::from(u32::MAX))?,
        None => 10_000,
    };
    let allow_values = lookup("http-allow");
    let http_allow =
        AllowList::parse(&texts(&allow_values)).map_err(|e| invalid(&allow_values, &e))?;
    let command_values = lookup("command");
    let commands =
        command::parse_specs(&texts(&command_values)).map_err(|e| invalid(&command_values, &e))?;
    let log_level = match single("log-level") {
        Some(v) => Level::parse(&v.text).ok_or_else(|| {
            ConfigError(format!(
                "invalid {}: '{}' (expected error, warn, info or debug)",
                v.origin, v.text
            ))
        })?,
        None => Level::Info,
    };
    let log_format = match single("log-format") {
        Some(v) => Format::parse(&v.text).ok_or_else(|| {
            ConfigError(format!(
                "invalid {}: '{}' (expected json or text)",
                v.origin, v.text
            ))
        })?,
        None => Format::Json,
    };
    let max_reply_bytes: usize = match single("max-reply-bytes") {
        Some(v) => number(&v, 1, MAX_REPLY_BYTES_LIMIT)?,
        None => 1024 * 1024,
    };
    let metrics_listen = match single("metrics-listen") {
        Some(v) => Some(listen_address(&v)?),
        None => None,
    };

    Ok(Parsed::Run(Box::new(Config {
        db,
        worker_name,
        concurrency,
        batch_size,
        sql_batch,
        sql_lanes,
        sql_lane_batch,
        poll_interval: Duration::from_millis(poll_interval_ms),
        lease_ms,
        shutdown_grace: Duration::from_millis(shutdown_grace_ms),
        http_allow,
        commands,
        log_level,
        log_format,
        max_reply_bytes,
        metrics_listen,
    })))
}

enum Flags {
    Values(HashMap<&'static str, Vec<String>>),
    Help,
    Version,
}

fn collect_flags(args: &[String]) -> Result<Flags, ConfigError> {
    let mut flags: HashMap<&'static str, Vec<String>> = HashMap::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        match arg.as_str() {
            "-h" | "--help" => return Ok(Flags::Help),
            "-V" | "--version" => return Ok(Flags::Version),
            _ => {}
        }
        let Some(body) = arg.strip_prefix("--") else {
            return Err(ConfigError(format!(
                "unexpected argument '{arg}' (quote --command values that contain arguments)"
            )));
        };
        let (name, inline) = match body.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None => (body, None),
        };
        let opt = OPTIONS
            .iter()
            .find(|opt| opt.flag == name)
            .ok_or_else(|| ConfigError(format!("unknown option --{name}")))?;
        let mut value = match inline {
            Some(value) => value,
            None => match args.get(i) {
                Some(next) if !next.starts_with("--") => {
                    i += 1;
                    next.clone()
                }
                _ => return Err(ConfigError(format!("--{name} needs a value"))),
            },
        };
        if opt.flag == "command" {
            // `--command NAME=PROGRAM ARG ARG`: the words up to the next
            // option are the program's arguments.
            while let Some(next) = args.get(i).filter(|next| !next.starts_with("--")) {
                value.push(' ');
                value.push_str(next);
                i += 1;
            }
        }
        let given = flags.entry(opt.flag).or_default();
        if !opt.repeatable && !given.is_empty() {
            return Err(ConfigError(format!("--{name} given more than once")));
        }
        given.push(value);
    }
    Ok(Flags::Values(flags))
}

/// The values for an option: its flags if any were given, else its
/// environment variable (split into entries for repeatable options).
fn values(
    flag: &str,
    flags: &HashMap<&'static str, Vec<String>>,
    env: &HashMap<String, String>,
) -> Vec<Value> {
    let Some(opt) = OPTIONS.iter().find(|opt| opt.flag == flag) else {
        return Vec::new();
    };
    if let Some(given) = flags.get(opt.flag) {
        return given
            .iter()
            .map(|text| Value {
                origin: format!("--{}", opt.flag),
                text: text.clone(),
            })
            .collect();
    }
    let Some(text) = env.get(opt.env).filter(|text| !text.trim().is_empty()) else {
        return Vec::new();
    };
    let entries: Vec<&str> = match opt.flag {
        "command" => text.split(';').collect(),
        _ => vec![text.as_str()],
    };
    entries
        .into_iter()
        .map(|entry| Value {
            origin: opt.env.to_owned(),
            text: entry.to_owned(),
        })
        .collect()
}

fn texts(values: &[Value]) -> Vec<String> {
    values.iter().map(|v| v.text.clone()).collect()
}

fn invalid(values: &[Value], error: &str) -> ConfigError {
    let origin = values.first().map_or("option", |v| v.origin.as_str());
    ConfigError(format!("invalid {origin}: {error}"))
}

fn number<T>(value: &Value, min: T, max: T) -> Result<T, ConfigError>
where
    T: FromStr + PartialOrd + fmt::Display + Copy,
{
    match value.text.trim().parse::<T>() {
        Ok(n) if n >= min && n <= max => Ok(n),
        _ => Err(ConfigError(format!(
            "invalid {}: '{}' (expected a whole number from {min} to {max})",
            value.origin, value.text
        ))),
    }
}

fn parse_database_url(value: &Value) -> Result<tokio_postgres::Config, ConfigError> {
    // The string is never echoed back: it may hold a password.
    let mut db: tokio_postgres::Config = value
        .text
        .parse()
        .map_err(|e| ConfigError(format!("invalid {}: {e}", value.origin)))?;
    if db.get_hosts().is_empty() && db.get_hostaddrs().is_empty() {
        return Err(ConfigError(format!(
            "invalid {}: no host given",
            value.origin
        )));
    }
    if db.get_application_name().is_none() {
        db.application_name("picloud-supervisor");
    }
    if db.get_connect_timeout().is_none() {
        db.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
    }
    Ok(db)
}

/// An IP address and a port. Host names are refused rather than resolved: which
/// interface the endpoint is exposed on should be plain from the configuration.
fn listen_address(value: &Value) -> Result<SocketAddr, ConfigError> {
    let text = value.text.trim();
    let address: SocketAddr = text.parse().map_err(|_| {
        ConfigError(format!(
            "invalid {}: '{text}' (expected IP:PORT, e.g. 127.0.0.1:9187 or [::1]:9187)",
            value.origin
        ))
    })?;
    if address.port() == 0 {
        return Err(ConfigError(format!(
            "invalid {}: '{text}' (the port must be from 1 to 65535)",
            value.origin
        )));
    }
    Ok(address)
}

fn check_worker_name(value: &Value) -> Result<String, ConfigError> {
    let name = value.text.trim();
    if name.is_empty()
        || name.chars().count() > MAX_WORKER_NAME_CHARS
        || name.chars().any(char::is_control)
    {
        return Err(ConfigError(format!(
            "invalid {}: expected 1 to {MAX_WORKER_NAME_CHARS} printable characters",
            value.origin
        )));
    }
    Ok(name.to_owned())
}

fn default_worker_name() -> String {
    format!(
        "{}-{}-{:04x}",
        hostname(),
        std::process::id(),
        random::u64() & 0xffff
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

    const URL: &str = "postgres://picloud@localhost:5432/app";

    fn args(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn env(items: &[(&str, &str)]) -> HashMap<String, String> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn config(cli: &[&str], vars: &[(&str, &str)]) -> Config {
        match parse(&args(cli), &env(vars)) {
            Ok(Parsed::Run(config)) => *config,
            Ok(_) => panic!("expected a configuration, got help/version"),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    fn error(cli: &[&str], vars: &[(&str, &str)]) -> String {
        match parse(&args(cli), &env(vars)) {
            Err(e) => e.0,
            Ok(_) => panic!("expected an error for {cli:?} {vars:?}"),
        }
    }

    #[test]
    fn defaults() {
        let c = config(&["--database-url", URL], &[]);
        assert_eq!(c.concurrency, 16);
        assert_eq!(c.batch_size, 16);
        assert_eq!(c.sql_batch, 8);
        assert_eq!(c.sql_lanes, 2);
        assert_eq!(c.sql_lane_batch, 500);
        assert_eq!(c.poll_interval, Duration::from_millis(5000));
        assert_eq!(c.lease_ms, 30_000);
        assert_eq!(c.shutdown_grace, Duration::from_millis(10_000));
        assert_eq!(c.log_level, Level::Info);
        assert_eq!(c.log_format, Format::Json);
        assert_eq!(c.max_reply_bytes, 1024 * 1024);
        assert_eq!(c.metrics_listen, None);
        assert!(c.http_allow.entries.is_empty());
        assert!(c.commands.is_empty());
        assert_eq!(c.db.get_application_name(), Some("picloud-supervisor"));
        let parts: Vec<&str> = c.worker_name.rsplitn(3, '-').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0].len(), 4);
        assert!(parts[0].chars().all(|ch| ch.is_ascii_hexdigit()));
        assert_eq!(parts[1], std::process::id().to_string());
    }

    #[test]
    fn environment_is_used() {
        let c = config(
            &[],
            &[
                (
                    "PICLOUD_DATABASE_URL",
                    "host=localhost user=picloud dbname=app",
                ),
                ("PICLOUD_CONCURRENCY", "4"),
                ("PICLOUD_WORKER_NAME", "w1"),
                ("PICLOUD_HTTP_ALLOW", "example.com,127.0.0.1:8080"),
                ("PICLOUD_COMMANDS", "echo=/bin/echo hi;cat=/bin/cat"),
                ("PICLOUD_LOG_LEVEL", "debug"),
                ("PICLOUD_BATCH_SIZE", ""),
            ],
        );
        assert_eq!(c.concurrency, 4);
        assert_eq!(c.batch_size, 4);
        assert_eq!(c.worker_name, "w1");
        assert_eq!(c.http_allow.entries.len(), 2);
        assert_eq!(c.commands.len(), 2);
        assert_eq!(
            c.commands.get("echo").map(|s| s.args.clone()),
            Some(vec!["hi".to_owned()])
        );
        assert_eq!(c.log_level, Level::Debug);
    }

    #[test]
    fn flags_beat_environment() {
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
        assert_eq!(c.concurrency, 2);
        assert_eq!(c.batch_size, 2);
        assert_eq!(c.worker_name, "from-flag");
        assert_eq!(c.lease_ms, 5000);
        let allowed: Vec<String> = c.http_allow.entries.iter().map(|e| e.to_string()).collect();
        assert_eq!(allowed, ["a.example", "b.example:81", "c.example"]);
        assert_eq!(c.commands.keys().collect::<Vec<_>>(), ["x"]);
    }

    #[test]
    fn command_words_after_the_value_are_arguments() {
        let c = config(
            &[
                "--command",
                "resize=/usr/bin/convert",
                "-resize",
                "50%",
                "--database-url",
                URL,
            ],
            &[],
        );
        let spec = c
            .commands
            .get("resize")
            .cloned()
            .unwrap_or_else(|| panic!("missing command"));
        assert_eq!(spec.program, "/usr/bin/convert");
        assert_eq!(spec.args, ["-resize", "50%"]);
        let c = config(
            &["--database-url", URL, "--command", "q=/bin/echo a  b"],
            &[],
        );
        assert_eq!(c.commands.get("q").map(|s| s.args.len()), Some(2));
    }

    #[test]
    fn errors() {
        assert!(error(&[], &[]).contains("missing --database-url"));
        assert!(error(&["--database-url", "postgres://"], &[]).contains("no host"));
        assert!(
            error(&["--database-url", URL, "--concurrency", "0"], &[]).contains("--concurrency")
        );
        assert!(error(&["--database-url", URL, "--concurrency", "x"], &[]).contains("'x'"));
        assert!(
            error(&["--database-url", URL], &[("PICLOUD_CONCURRENCY", "-1")])
                .contains("PICLOUD_CONCURRENCY")
        );
        assert!(error(
            &[
                "--database-url",
                URL,
                "--concurrency",
                "4",
                "--batch-size",
                "5"
            ],
            &[]
        )
        .contains("--batch-size"));
        assert!(
            error(&["--database-url", URL, "--poll-interval-ms", "1"], &[])
                .contains("--poll-interval-ms")
        );
        assert!(
            error(&["--database-url", URL, "--lease-ms", "99999999999"], &[])
                .contains("--lease-ms")
        );
        assert!(
            error(&["--database-url", URL, "--log-level", "trace"], &[]).contains("--log-level")
        );
        assert!(
            error(&["--database-url", URL, "--nope", "1"], &[]).contains("unknown option --nope")
        );
        assert!(error(&["--database-url", URL, "stray"], &[]).contains("unexpected argument"));
        assert!(error(&["--database-url"], &[]).contains("needs a value"));
        assert!(error(&["--database-url", "--concurrency", "3"], &[]).contains("needs a value"));
        assert!(
            error(&["--database-url", URL, "--database-url", URL], &[]).contains("more than once")
        );
        assert!(error(
            &["--database-url", URL, "--http-allow", "*.example.com"],
            &[]
        )
        .contains("--http-allow"));
        assert!(error(
            &["--database-url", URL],
            &[("PICLOUD_HTTP_ALLOW", "http://x/")]
        )
        .contains("PICLOUD_HTTP_ALLOW"));
        assert!(error(
            &["--database-url", URL, "--command", "bad name=/bin/true"],
            &[]
        )
        .contains("invalid command name"));
        assert!(error(
            &[
                "--database-url",
                URL,
                "--command",
                "a=/bin/true",
                "--command",
                "a=/bin/false"
            ],
            &[]
        )
        .contains("more than once"));
        assert!(
            error(&["--database-url", URL, "--command", "noprogram="], &[]).contains("no program")
        );
        assert!(
            error(&["--database-url", URL, "--worker-name", " "], &[]).contains("--worker-name")
        );
        assert!(
            error(&["--database-url", URL, "--max-reply-bytes", "0"], &[])
                .contains("--max-reply-bytes")
        );
    }

    #[test]
    fn metrics_listen_and_log_format() {
        let c = config(
            &[
                "--database-url",
                URL,
                "--metrics-listen",
                "127.0.0.1:9187",
                "--log-format",
                "text",
            ],
            &[
                ("PICLOUD_METRICS_LISTEN", "0.0.0.0:1"),
                ("PICLOUD_LOG_FORMAT", "json"),
            ],
        );
        assert_eq!(c.metrics_listen, "127.0.0.1:9187".parse().ok());
        assert_eq!(c.log_format, Format::Text);
        let c = config(
            &["--database-url", URL],
            &[
                ("PICLOUD_METRICS_LISTEN", " [::1]:9187 "),
                ("PICLOUD_LOG_FORMAT", "TEXT"),
            ],
        );
        assert_eq!(c.metrics_listen, "[::1]:9187".parse().ok());
        assert_eq!(c.log_format, Format::Text);
        let c = config(&["--database-url", URL], &[("PICLOUD_METRICS_LISTEN", "")]);
        assert_eq!(c.metrics_listen, None);

        for bad in [
            "9187",
            ":9187",
            "localhost:9187",
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "::1:9187",
            "http://127.0.0.1:9187",
        ] {
            let message = error(&["--database-url", URL, "--metrics-listen", bad], &[]);
            assert!(
                message.starts_with("invalid --metrics-listen:") && message.contains(bad),
                "{bad}: {message}"
            );
        }
        assert!(
            error(&["--database-url", URL], &[("PICLOUD_METRICS_LISTEN", "x")])
                .contains("PICLOUD_METRICS_LISTEN")
        );
        assert!(
            error(&["--database-url", URL, "--log-format", "logfmt"], &[])
                .contains("invalid --log-format: 'logfmt' (expected json or text)")
        );
    }

    #[test]
    fn database_url_errors_do_not_echo_the_url() {
        let message = error(
            &["--database-url", "postgres://u:s3cret@host:notaport/db"],
            &[],
        );
        assert!(message.contains("--database-url"));
        assert!(!message.contains("s3cret"));
    }

    #[test]
    fn help_and_version() {
        assert!(matches!(
            parse(&args(&["--help"]), &env(&[])),
            Ok(Parsed::Help)
        ));
        assert!(matches!(
            parse(&args(&["--concurrency", "x", "-h"]), &env(&[])),
            Ok(Parsed::Help)
        ));
        assert!(matches!(
            parse(&args(&["--version"]), &env(&[])),
            Ok(Parsed::Version)
        ));
        let help = help_text();
        for opt in OPTIONS {
            assert!(
                help.contains(&format!("--{}", opt.flag)),
                "{} missing from help",
                opt.flag
            );
            assert!(help.contains(opt.env), "{} missing from help", opt.env);
        }
        assert!(help.contains("https is not supported"));
    }
}
