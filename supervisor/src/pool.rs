//! The executor connection pool. At most `concurrency` connections are ever in use, because
//! each running event holds one executor slot and at most one connection.

use std::sync::{Arc, Mutex, PoisonError};

use tokio_postgres::Client;

use crate::db::{ConnectError, Database};
use crate::metrics::{Connection, Metrics};

pub struct Pool {
    database: Database,
    idle: Mutex<Vec<Client>>,
    metrics: Arc<Metrics>,
}

impl Pool {
    pub fn new(database: Database, metrics: Arc<Metrics>) -> Pool {
        Pool {
            database,
            idle: Mutex::new(Vec::new()),
            metrics,
        }
    }

    pub fn database(&self) -> &Database {
        &self.database
    }

    /// An idle connection, or a new one. Broken idle connections are dropped
    /// here, which is how they get replaced.
    pub async fn get(&self) -> Result<Client, ConnectError> {
        while let Some(client) = self.pop_idle() {
            if !client.is_closed() {
                return Ok(client);
            }
            self.metrics.reconnect(Connection::Executor);
            tracing::warn!("executor connection lost; replacing it");
        }
        let client = self.database.connect().await?;
        tracing::info!("executor connection opened");
        Ok(client)
    }

    /// Opens up to `count` connections ahead of the first events, so that the first handlers
    /// after start-up do not pay for connecting. A failure only logs: `get` connects on demand.
    pub async fn warm(&self, count: usize) {
        for _ in 0..count {
            match self.database.connect().await {
                Ok(client) => self.put(client),
                // Said once for every connection by `Database`.
                Err(ConnectError::Standby) => return,
                Err(e) => {
                    self.metrics.reconnect(Connection::Executor);
                    tracing::warn!(
                        error = %e,
                        "could not open an executor connection ahead of time"
                    );
                    return;
                }
            }
        }
        tracing::info!(count, "executor connections opened");
    }

    fn pop_idle(&self) -> Option<Client> {
        // A panic elsewhere while holding the lock leaves a plain Vec behind,
        // which is still perfectly usable.
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
    }

    pub fn put(&self, client: Client) {
        if client.is_closed() {
            return;
        }
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(client);
    }
}
