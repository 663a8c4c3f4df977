//! picloud-supervisor: claims due picloud outbox rows and runs their handlers.
//! All policy (retries, backoff, dead letters, leases) lives in the database;
//! this program only claims, runs and reports.
//!
//! Modules depend one way: `supervise` (the orchestrator) starts `dispatch`, `lane` and
//! `endpoint`; those hand claims to `executor`; everything shares `state`, `pool`, `db`,
//! `metrics` and `handlers`, which depend on none of the services.

mod allow;
mod backoff;
mod config;
mod db;
mod dispatch;
mod endpoint;
mod executor;
mod handlers;
mod health;
mod http_lane;
mod idle;
mod lane;
mod logging;
mod metrics;
mod pool;
mod ready;
mod schema;
mod state;
mod summary;
mod supervise;
mod tls;
mod wake;

use std::process::ExitCode;
use std::time::Duration;

/// Exit status for invalid configuration (also used by `supervise::run` when the
/// --metrics-listen address cannot be bound or the database's certificate does not verify).
pub const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = match config::parse_args(std::env::args_os()) {
        Ok(cli) => cli,
        // --help and --version (exit 0) or a usage error (exit 2), printed by clap.
        Err(e) => e.exit(),
    };
    let config = match cli.into_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("picloud-supervisor: {e}");
            eprintln!("Run picloud-supervisor --help for the list of options.");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    logging::init(config.log_level, config.log_format);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "could not start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(supervise::run(config));
    // A DNS lookup stuck in a blocking thread must not hold up the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    ExitCode::from(code)
}
