//! picloud-supervisor: claims due picloud outbox rows and runs their handlers.
//! All policy (retries, backoff, dead letters, leases) lives in the database;
//! this program only claims, runs and reports.

mod allow;
mod backoff;
mod config;
mod db;
mod dispatch;
mod executor;
mod handlers;
mod health;
mod idle;
mod lane;
mod log;
mod metrics;
mod metrics_server;
mod random;
mod summary;
mod supervise;
mod wake;

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use config::{ConfigError, Parsed};

/// Exit status for invalid configuration (also used by `supervise::run` when the
/// --metrics-listen address cannot be bound).
pub const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let config = match read_config() {
        Ok(Parsed::Run(config)) => config,
        Ok(Parsed::Help) => return print_stdout(&config::help_text()),
        Ok(Parsed::Version) => {
            return print_stdout(&format!(
                "picloud-supervisor {}\n",
                env!("CARGO_PKG_VERSION")
            ))
        }
        Err(e) => {
            eprintln!("picloud-supervisor: {e}");
            eprintln!("Run picloud-supervisor --help for the list of options.");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    log::set_level(config.log_level);
    log::set_format(config.log_format);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            log::error(
                "could not start the runtime",
                &[("error", e.to_string().into())],
            );
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(supervise::run(*config));
    // A DNS lookup stuck in a blocking thread must not hold up the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    ExitCode::from(code)
}

fn read_config() -> Result<Parsed, ConfigError> {
    let mut args = Vec::new();
    for arg in std::env::args_os().skip(1) {
        let arg = arg
            .into_string()
            .map_err(|arg| ConfigError(format!("argument {arg:?} is not valid UTF-8")))?;
        args.push(arg);
    }
    config::parse(&args, &config::process_env()?)
}

fn print_stdout(text: &str) -> ExitCode {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}
