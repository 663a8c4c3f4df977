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

async fn run_transaction(
    client: &mut Client,
    claim: &Claim,
    worker: &str,
    timeout_ms: u32,
) -> SqlOutcome {
    let transaction = match client.transaction().await {
        Ok(transaction) => transaction,
        Err(e) => return classify(&e, true),
    };
    let work = async {
        // timeout_ms is a number, never user text, so formatting it in is safe;
        // SET does not take bind parameters.
        transaction
            .batch_execute(&format!("SET LOCAL statement_timeout = {timeout_ms}"))
            .await?;
        transaction
            .execute(
                "SELECT picloud.picloud_run_sql_handler($1::uuid, $2::uuid, $3::text)",
                &[&claim.app_id, &claim.event_id, &worker],
            )
            .await
    }
    .await;
    match work {
        // A failed COMMIT ends the transaction too, so it is handled like any failure.
        Ok(_) => match transaction.commit().await {
            Ok(()) => SqlOutcome::Completed,
            Err(e) => classify(&e, true),
        },
        Err(e) => {
            let rolled_back = transaction.rollback().await.is_ok();
            classify(&e, rolled_back)
        }
    }
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
