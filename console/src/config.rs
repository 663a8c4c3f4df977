//! Command-line flags and `PICLOUD_*` environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// picloud's console: a JSON admin API and a web dashboard for an app's dead letters, outbox,
/// triggers and stats. People sign in with a Postgres role and password; every query of their
/// session runs as that role.
#[derive(Parser, Debug, Clone)]
#[command(name = "picloud-console", version)]
pub struct Config {
    /// The database to serve, as a libpq connection string or URL (host, port, dbname,
    /// sslmode, sslrootcert). A user or password in it is ignored: each session connects as
    /// the role that signed in.
    #[arg(long, env = "PICLOUD_DATABASE_URL")]
    pub database_url: String,

    /// Where the console listens. Anything but a loopback address is refused when the
    /// database accepts a wrong password (see --probe-role).
    #[arg(
        long,
        env = "PICLOUD_CONSOLE_LISTEN",
        default_value = "127.0.0.1:55435"
    )]
    pub listen: SocketAddr,

    /// The role whose sign-in is tried with a wrong password at start-up: if the database
    /// lets it in, passwords are not checked (trust) and the console stays on loopback.
    /// Defaults to the user of --database-url, else postgres.
    #[arg(long, env = "PICLOUD_CONSOLE_PROBE_ROLE")]
    pub probe_role: Option<String>,

    /// Certificate chain (PEM) to serve https with; needs --console-tls-key.
    #[arg(long, env = "PICLOUD_CONSOLE_TLS_CERT", requires = "console_tls_key")]
    pub console_tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --console-tls-cert.
    #[arg(long, env = "PICLOUD_CONSOLE_TLS_KEY", requires = "console_tls_cert")]
    pub console_tls_key: Option<PathBuf>,

    /// How long a session lasts after sign-in, in minutes.
    #[arg(long, env = "PICLOUD_CONSOLE_SESSION_MINUTES", default_value_t = 480,
          value_parser = clap::value_parser!(u64).range(1..=10080))]
    pub session_minutes: u64,

    /// At most this many open sessions (each holds one database connection).
    #[arg(long, env = "PICLOUD_CONSOLE_MAX_SESSIONS", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=10000))]
    pub max_sessions: u64,

    /// Sign-in attempts allowed per client address and minute.
    #[arg(long, env = "PICLOUD_CONSOLE_LOGIN_PER_MINUTE", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub login_per_minute: u32,

    /// Log level: error, warn, info, debug.
    #[arg(long, env = "PICLOUD_LOG", default_value = "info")]
    pub log: String,
}
