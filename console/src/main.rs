//! picloud-console: the admin API and dashboard. A binary of its own so the supervisor's
//! handler loop never depends on a web server (README, Console).

mod api;
mod config;
mod db;
mod error;
mod inputs;
mod pages;
/// TLS to Postgres: the supervisor's own rules for libpq's sslmode, compiled in from its
/// source so both binaries read a connection string the same way.
#[path = "../../supervisor/src/tls.rs"]
#[allow(dead_code)]
mod pg_tls;
mod probe;
mod queries;
mod server;
mod session;
mod signin;
mod tls;
mod views;

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = config::Config::parse();
    let filter = match config.log.as_str() {
        "error" => tracing::Level::ERROR,
        "warn" => tracing::Level::WARN,
        "debug" => tracing::Level::DEBUG,
        _ => tracing::Level::INFO,
    };
    tracing_subscriber::fmt()
        .with_max_level(filter)
        .with_writer(std::io::stderr)
        .init();
    match server::run(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("picloud-console: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
