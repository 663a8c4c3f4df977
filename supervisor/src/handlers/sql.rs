//! SQL handlers run inside the database: one transaction with a local
//! statement timeout, in which picloud_run_sql_handler runs the handler as the
//! principal and completes the row. Nothing to report afterwards on success.

use std::time::Duration;

use tokio_postgres::Client;

use crate::db::{self, Claim};

/// Extra time the client waits beyond the server-side statement timeout
/// before it gives up on the connection altogether.
const CLIENT_MARGIN: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub enum SqlOutcome {
    /// Committed; the row is completed.
    Completed,
    /// Rolled back; the error text is to be reported with picloud_fail.
    Failed(String),
    /// Rolled back because this worker no longer holds the lease.
    LeaseLost(String),
    /// The connection broke or stopped answering: the outcome is unknown and
    /// the connection must not be reused. The row is left to its lease.
    Broken(String),
}

pub async fn run(client: &mut Client, claim: &Claim, worker: &str, timeout_ms: u32) -> SqlOutcome {
    let limit = Duration::from_millis(u64::from(timeout_ms)) + CLIENT_MARGIN;
    match tokio::time::timeout(limit, run_transaction(client, claim, worker, timeout_ms)).await {
        Ok(outcome) => outcome,
        Err(_) => SqlOutcome::Broken(format!(
            "no answer from the database within {} ms",
            limit.as_millis()
        )),
    }
}

/// Runs the whole transaction as one simple-query round trip: on the success path the
/// handler, the completion and the commit cost the supervisor a single exchange with the
/// database. On an error Postgres skips the rest of the batch and leaves the transaction
/// aborted, so it is rolled back explicitly.
async fn run_transaction(
    client: &mut Client,
    claim: &Claim,
    worker: &str,
    timeout_ms: u32,
) -> SqlOutcome {
    // The uuids and the number print as plain literals; the worker name is operator text and
    // is quoted as a string literal (standard_conforming_strings is on in every supported
    // Postgres, so doubling quotes is the whole escape).
    let batch = format!(
        "BEGIN; SET LOCAL statement_timeout = {timeout_ms}; \
         SELECT picloud.picloud_run_sql_handler('{}'::uuid, '{}'::uuid, {}); COMMIT;",
        claim.app_id,
        claim.event_id,
        quote_literal(worker)
    );
    match client.batch_execute(&batch).await {
        Ok(()) => SqlOutcome::Completed,
        Err(e) => {
            let rolled_back = roll_back_after(client, &e).await;
            classify(&e, rolled_back)
        }
    }
}

/// After a failed transaction: Postgres skipped the rest of it and left the transaction
/// aborted. Rolls it back when the server answered with an error; true if the connection is
/// now back in a known state (false for a broken connection).
async fn roll_back_after(client: &Client, e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some() && client.batch_execute("ROLLBACK").await.is_ok()
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn classify(e: &tokio_postgres::Error, rolled_back: bool) -> SqlOutcome {
    let text = db::error_text(e);
    if !rolled_back || e.as_db_error().is_none() {
        SqlOutcome::Broken(text)
    } else if db::is_lease_lost(e) {
        SqlOutcome::LeaseLost(text)
    } else {
        SqlOutcome::Failed(text)
    }
}

#[cfg(test)]
mod tests {
    use super::quote_literal;

    #[test]
    fn worker_names_are_quoted_as_literals() {
        assert_eq!(quote_literal("host-1"), "'host-1'");
        assert_eq!(quote_literal("o'brien"), "'o''brien'");
        assert_eq!(
            quote_literal("x'); DROP TABLE t; --"),
            "'x''); DROP TABLE t; --'"
        );
    }
}
