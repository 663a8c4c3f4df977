//! Connections to Postgres as the role that signed in: the console has no role of its own.

use std::time::Duration;

use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::pg_tls;

/// The database every session connects to, with the TLS the connection string asks for.
#[derive(Clone)]
pub struct Target {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    /// The connection string's own user, the default role of the start-up probe.
    pub default_user: Option<String>,
    pub description: String,
}

impl Target {
    /// Parses a libpq connection string or URL (sslmode and sslrootcert as libpq reads them).
    pub fn parse(text: &str) -> Result<Target, String> {
        let split = pg_tls::split_connection_string(text)?;
        let mut config: tokio_postgres::Config = split
            .rest
            .parse()
            .map_err(|e| format!("--database-url: {e}"))?;
        config.ssl_mode(split.mode.negotiation());
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config.application_name("picloud-console");
        // No page or API call may hold a backend for long (the whole-app groups of a huge
        // app come closest); a statement past this fails with 57014, answered as 503. JIT
        // off: the console's statements are short, and the badge query's estimate (a row per
        // app times a capped count) made Postgres spend 150 ms compiling it at 1,000,000
        // dead letters for an 8 ms run.
        config.options("-c statement_timeout=30000 -c jit=off");
        let client_config = pg_tls::client_config(split.mode, split.root_cert.as_deref())?;
        let default_user = config.get_user().map(str::to_string);
        // Never the password: this string is logged.
        let description = format!(
            "{} port {} database {} sslmode {}",
            config
                .get_hosts()
                .iter()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(name) => name.clone(),
                    tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            config.get_ports().first().copied().unwrap_or(5432),
            config.get_dbname().unwrap_or("(the role's name)"),
            split.mode.as_str()
        );
        Ok(Target {
            config,
            tls: MakeRustlsConnect::new(client_config),
            default_user,
            description,
        })
    }

    /// Connects as `role` with `password`; the connection runs until the client is dropped.
    pub async fn connect_as(
        &self,
        role: &str,
        password: &str,
    ) -> Result<Client, tokio_postgres::Error> {
        let mut config = self.config.clone();
        config.user(role).password(password);
        let (client, connection) = config.connect(self.tls.clone()).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "a session's database connection ended");
            }
        });
        Ok(client)
    }
}
