//! Executors: each claimed row runs in its own task, on a connection taken
//! from a pool of executor connections, and its outcome is reported exactly
//! once (or not at all when the connection broke: the lease then expires and
//! the database hands the row out again).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_postgres::Client;
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::db::{self, Claim, ConnectError, Decision, Handler, ReportError};
use crate::handlers::http::HandlerKey;
use crate::handlers::sql::SqlOutcome;
use crate::handlers::{self, bounded_error, Failure, HandlerResult};
use crate::metrics::{Connection, Kind, Metrics};
use crate::state::{aborted, Completion, Phase, Shared};

/// Counts the claimed rows and keeps those that could be read. An unreadable row is counted
/// as unreported too: no outcome will ever be reported for it, and its lease will expire.
pub fn accept_claimed(metrics: &Metrics, rows: Vec<Result<Claim, String>>) -> Vec<Claim> {
    let mut claims = Vec::with_capacity(rows.len());
    for row in rows {
        match row {
            Ok(claim) => {
                metrics.claimed.add(claim.handler.kind(), 1);
                claims.push(claim);
            }
            Err(e) => {
                metrics.claimed.add(Kind::Unknown, 1);
                metrics.unreported.add(Kind::Unknown, 1);
                tracing::error!(error = %e, "claimed row could not be read; its lease will expire");
            }
        }
    }
    claims
}

/// What became of one claimed event.
#[derive(Debug)]
enum Outcome {
    Completed,
    /// Handed to the dispatcher, which reports it with others (`report_completed`).
    Queued,
    /// Reported with picloud_fail; `decision` is the database's.
    Failed {
        decision: Decision,
        error: String,
        next_due_at: Option<DateTime<Utc>>,
        dead_letter_id: Option<Uuid>,
    },
    Released,
    LeaseLost(String),
    /// The connection broke; nothing (more) was reported. The lease expires.
    Unreported(String),
    /// The database refused the report for a reason other than the lease.
    ReportRejected(String),
}

/// Starts waiting events (`Shared::ready`) on the free executor slots.
pub fn start_waiting(shared: &Arc<Shared>, phase: &watch::Receiver<Phase>) {
    while shared.ready.waiting() > 0 {
        let Ok(permit) = Arc::clone(&shared.slots).try_acquire_owned() else {
            return;
        };
        // None: no waiting event may start now; the permit goes back.
        let Some((claim, claimed_at)) = shared.ready.next() else {
            return;
        };
        tokio::spawn(run_event(
            Arc::clone(shared),
            claim,
            claimed_at,
            permit,
            phase.clone(),
        ));
    }
}

/// Counts an event as ended in `Shared::ready` when dropped, however its task ends.
struct Running<'a> {
    shared: &'a Shared,
    app_id: Uuid,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.shared.ready.ended(self.app_id);
    }
}

/// Runs one claimed event (counted running by `Ready::next`) to its end, then the next waiting
/// event while there is one and the supervisor runs. The permit is the executor slot; it is
/// held until the last outcome is reported so the dispatcher never over-claims.
async fn run_event(
    shared: Arc<Shared>,
    mut claim: Claim,
    mut claimed_at: Instant,
    permit: OwnedSemaphorePermit,
    mut phase: watch::Receiver<Phase>,
) {
    loop {
        let started = Instant::now();
        let outcome = {
            let _running = Running {
                shared: &shared,
                app_id: claim.app_id,
            };
            run_one(&shared, &claim, claimed_at, started, &mut phase).await
        };
        match outcome {
            // The dispatcher is told by `finished` and records it once reported.
            Outcome::Queued => shared.finished.notify_one(),
            outcome => record(&shared, &claim, &outcome, started),
        }
        if *phase.borrow() != Phase::Running {
            break;
        }
        match shared.ready.next() {
            Some((next, at)) => (claim, claimed_at) = (next, at),
            None => break,
        }
    }
    drop(permit);
    shared.finished.notify_one();
}

async fn run_one(
    shared: &Shared,
    claim: &Claim,
    claimed_at: Instant,
    started: Instant,
    phase: &mut watch::Receiver<Phase>,
) -> Outcome {
    let _busy = shared.metrics.busy(1);
    match connection(shared, claimed_at, phase).await {
        Some(mut client) => {
            let (outcome, reusable) = process(shared, &mut client, claim, started, phase).await;
            if reusable {
                shared.pool.put(client);
            } else {
                // Dropped; the pool opens a new one when next needed.
                shared.metrics.reconnect(Connection::Executor);
            }
            outcome
        }
        None => Outcome::Unreported("no executor connection".to_owned()),
    }
}

/// Reports the queued successes of external handlers in one statement (`statement`: the
/// dispatcher's prepared `picloud_complete_many`, pipelined before its claim), then counts and
/// logs each outcome.
pub async fn report_completed(
    shared: &Shared,
    client: &Client,
    statement: Option<&tokio_postgres::Statement>,
    done: Vec<Completion>,
) {
    if done.is_empty() {
        return;
    }
    let worker = shared.config.worker_name.as_str();
    let events: Vec<(&Claim, Option<&Value>)> =
        done.iter().map(|d| (&d.claim, d.result.as_ref())).collect();
    let reported = db::complete_many(client, statement, worker, &events).await;
    for d in &done {
        let outcome = match &reported {
            Ok(completed) if completed.contains(&d.claim.event_id) => Outcome::Completed,
            Ok(_) => Outcome::LeaseLost(
                "picloud_complete_many: this worker no longer held the event".to_owned(),
            ),
            Err(e) => report_error_outcome(e.clone()),
        };
        record(shared, &d.claim, &outcome, d.started);
    }
}

/// Gives events claimed ahead that never started back to the queue (`picloud_release`, the
/// attempt not counted) and records each.
pub async fn give_back(shared: &Shared, client: &Client, claims: Vec<Claim>) {
    let worker = shared.config.worker_name.as_str();
    for claim in claims {
        let started = Instant::now();
        let outcome = release(client, &claim, worker).await;
        record(shared, &claim, &outcome, started);
    }
}

/// Counts an event's outcome in the metrics and logs it.
fn record(shared: &Shared, claim: &Claim, outcome: &Outcome, started: Instant) {
    count_and_log(shared, claim, outcome, started);
    if matches!(
        outcome,
        Outcome::Failed {
            decision: Decision::Retry,
            ..
        }
    ) {
        // The retry comes due soon and nothing announces it: let the dispatcher, which may
        // have gone idle before the event failed, recompute when to claim next.
        shared.rescheduled.notify_one();
    }
    shared.finished.notify_one();
}

/// Gets an executor connection, retrying with backoff until half the lease has passed since
/// the claim (`claimed_at`); after that the row is left to its lease. (A handler started by
/// then renews the lease a third of it later, before it runs out.)
async fn connection(
    shared: &Shared,
    claimed_at: Instant,
    phase: &mut watch::Receiver<Phase>,
) -> Option<Client> {
    let give_up_at = claimed_at + lease_duration(shared) / 2;
    let mut backoff = Backoff::new();
    loop {
        match shared.pool.get().await {
            Ok(client) => return Some(client),
            Err(e) => {
                shared.metrics.reconnect(Connection::Executor);
                let delay = backoff.next_delay();
                let retry_in_ms = delay.as_millis() as u64;
                match e {
                    // Said once for every connection by `Database`.
                    ConnectError::Standby => {
                        tracing::debug!(retry_in_ms, "executor found a standby")
                    }
                    ConnectError::Failed(_) | ConnectError::NoExtension => tracing::warn!(
                        error = %e,
                        retry_in_ms,
                        "executor could not connect"
                    ),
                }
                if Instant::now() + delay > give_up_at {
                    return None;
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = aborted(phase) => return None,
                }
            }
        }
    }
}

fn lease_duration(shared: &Shared) -> Duration {
    Duration::from_millis(shared.config.lease_ms.max(1) as u64)
}

/// Handles the event on `client`. Returns the outcome and whether the
/// connection is in a known state and may go back to the pool.
async fn process(
    shared: &Shared,
    client: &mut Client,
    claim: &Claim,
    started: Instant,
    phase: &mut watch::Receiver<Phase>,
) -> (Outcome, bool) {
    let worker = shared.config.worker_name.as_str();
    // Claimed but not started when shutdown began: give it back untouched.
    if *phase.borrow() != Phase::Running {
        return (release(client, claim, worker).await, true);
    }
    if let Some(refused) = refusal(claim) {
        return (report_failure(client, claim, worker, &refused).await, true);
    }
    // Every handler has a timeout; a non-positive one would mean "none".
    let timeout_ms = claim.timeout_ms.max(1) as u32;
    match &claim.handler {
        Handler::Sql => run_sql(shared, client, claim, timeout_ms, phase).await,
        _ => (
            run_external(shared, client, claim, timeout_ms, started, phase).await,
            true,
        ),
    }
}

/// Why `claim` cannot run at all: its principal may not run it, or its handler is gone or of
/// a kind this supervisor does not run. None when it can run.
pub fn refusal(claim: &Claim) -> Option<Failure> {
    if let Some(error) = &claim.principal_error {
        return Some(error.clone().into());
    }
    match &claim.handler {
        Handler::Sql | Handler::Http { .. } | Handler::Command { .. } => None,
        Handler::Unrunnable(reason) => Some(reason.clone().into()),
        Handler::Missing => Some(Failure::from(
            "the event's handler script no longer exists".to_owned(),
        )),
    }
}

/// The signing secrets of an http handler (none on a schema without them), read when not cached
/// on `client` - or, without one, on an executor connection of the pool (an http lane never
/// reads on its own: a failed query there would abort its batch's transaction).
pub async fn signing_secrets(
    shared: &Shared,
    client: Option<&Client>,
    handler: HandlerKey,
) -> Result<Arc<Vec<String>>, Failure> {
    if !shared.pool.database().schema().signing_secrets() {
        return Ok(Arc::new(Vec::new()));
    }
    let unreadable = |e: String| Failure::from(format!("signing secrets could not be read: {e}"));
    let (app_id, script_id) = handler;
    let read = || async move {
        let secrets = match client {
            Some(client) => db::signing_secrets(client, app_id, script_id).await,
            None => {
                let pooled = shared
                    .pool
                    .get()
                    .await
                    .map_err(|e| unreadable(e.to_string()))?;
                let secrets = db::signing_secrets(&pooled, app_id, script_id).await;
                shared.pool.put(pooled);
                secrets
            }
        };
        secrets.map_err(|e| unreadable(db::error_text(&e)))
    };
    shared.http.secrets(handler, read).await
}

/// SQL handlers hold the row locked in their own transaction, so no lease
/// renewal is needed. On shutdown abort the running statement is cancelled
/// and the row released instead of failed.
async fn run_sql(
    shared: &Shared,
    client: &mut Client,
    claim: &Claim,
    timeout_ms: u32,
    phase: &mut watch::Receiver<Phase>,
) -> (Outcome, bool) {
    let worker = shared.config.worker_name.as_str();
    let cancel = client.cancel_token();
    let (sql_outcome, was_aborted) = {
        let running = handlers::sql::run(client, claim, worker, timeout_ms);
        tokio::pin!(running);
        let first = tokio::select! {
            outcome = &mut running => Some(outcome),
            _ = aborted(phase) => None,
        };
        match first {
            Some(outcome) => (outcome, false),
            None => {
                if let Err(e) = cancel
                    .cancel_query(shared.pool.database().tls.clone())
                    .await
                {
                    tracing::warn!(
                        event_id = %claim.event_id,
                        error = %db::error_text(&e),
                        "could not cancel sql handler"
                    );
                }
                // Wait for the rollback so the row is unlocked before release.
                (running.await, true)
            }
        }
    };
    match sql_outcome {
        SqlOutcome::Completed => (Outcome::Completed, true),
        SqlOutcome::Failed(_) if was_aborted => (release(client, claim, worker).await, true),
        SqlOutcome::Failed(error) => (
            report_failure(client, claim, worker, &error.into()).await,
            true,
        ),
        SqlOutcome::LeaseLost(error) => (Outcome::LeaseLost(error), true),
        SqlOutcome::Broken(error) => (Outcome::Unreported(error), false),
    }
}

/// How an http or command handler run ended.
enum External {
    Finished(HandlerResult),
    LeaseLost,
    Aborted,
}

async fn run_external(
    shared: &Shared,
    client: &Client,
    claim: &Claim,
    timeout_ms: u32,
    started: Instant,
    phase: &mut watch::Receiver<Phase>,
) -> Outcome {
    let config = &shared.config;
    let worker = config.worker_name.as_str();
    let timeout = Duration::from_millis(u64::from(timeout_ms));
    let input = handlers::event_body(claim);
    let handler = async {
        match &claim.handler {
            Handler::Http { url } => {
                let handler = (claim.app_id, claim.script_id);
                let secrets = signing_secrets(shared, Some(client), handler).await?;
                shared
                    .http
                    .post(url, claim.event_id, input, &secrets, timeout)
                    .await
            }
            Handler::Command { name } => handlers::command::run(
                &config.commands,
                config.max_reply_bytes,
                name,
                &input,
                timeout,
            )
            .await
            .map_err(Failure::from),
            _ => Err(Failure::from("not an external handler".to_owned())),
        }
    };
    // Dropping the handler future (lease lost, abort) drops its connection or
    // kills its process.
    let ended = tokio::select! {
        ended = with_lease(&shared.metrics, client, claim, worker, config.lease_ms, handler) => ended,
        _ = aborted(phase) => External::Aborted,
    };
    settle_external(shared, client, claim, started, ended).await
}

/// Reports how an http or command handler run ended.
async fn settle_external(
    shared: &Shared,
    client: &Client,
    claim: &Claim,
    started: Instant,
    ended: External,
) -> Outcome {
    let worker = shared.config.worker_name.as_str();
    match ended {
        External::Finished(Ok(result)) => {
            if !shared.pool.database().schema().complete_many() {
                return report_success(client, claim, worker, result.as_ref()).await;
            }
            let done = Completion {
                claim: claim.clone(),
                result,
                started,
            };
            match shared.completions.push(done) {
                Ok(()) => Outcome::Queued,
                Err(done) => report_success(client, claim, worker, done.result.as_ref()).await,
            }
        }
        External::Finished(Err(failure)) => report_failure(client, claim, worker, &failure).await,
        External::LeaseLost => {
            Outcome::LeaseLost("picloud_extend_lease reported the lease lost".to_owned())
        }
        External::Aborted => release(client, claim, worker).await,
    }
}

/// Finishes an http delivery that an http lane started and then handed to the claim path
/// (`claim`: the event as claimed since): renews the lease while the delivery runs, then
/// reports its outcome as an executor would. The delivery is cut off if the supervisor aborts
/// or the lease is lost.
pub async fn finish_delivery(
    shared: Arc<Shared>,
    claim: Claim,
    delivery: JoinHandle<HandlerResult>,
    started: Instant,
    mut phase: watch::Receiver<Phase>,
) {
    let cut_off = AbortOnDrop(delivery.abort_handle());
    let handler = async move {
        let _cut_off = cut_off;
        delivery
            .await
            .unwrap_or_else(|e| Err(Failure::from(format!("http delivery ended: {e}"))))
    };
    let outcome = match connection(&shared, Instant::now(), &mut phase).await {
        Some(client) => {
            let worker = shared.config.worker_name.as_str();
            let lease_ms = shared.config.lease_ms;
            let ended = tokio::select! {
                ended = with_lease(&shared.metrics, &client, &claim, worker, lease_ms, handler) => ended,
                _ = aborted(&mut phase) => External::Aborted,
            };
            let outcome = settle_external(&shared, &client, &claim, started, ended).await;
            shared.pool.put(client);
            outcome
        }
        None => Outcome::Unreported("no executor connection".to_owned()),
    };
    match outcome {
        Outcome::Queued => shared.finished.notify_one(),
        outcome => record(&shared, &claim, &outcome, started),
    }
}

/// Aborts a task when dropped (a finished task is not affected).
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counts and logs an event an http lane delivered and completed.
/// (The dispatcher is not told, as `record` tells it: what a claim may take does not depend on
/// lane events, and a lane that completes an event of an ordering key wakes claimers through
/// the database, as picloud_complete_many does.)
pub fn record_completed(shared: &Shared, claim: &Claim, started: Instant) {
    count_and_log(shared, claim, &Outcome::Completed, started);
}

fn count_and_log(shared: &Shared, claim: &Claim, outcome: &Outcome, started: Instant) {
    let elapsed = started.elapsed();
    count(&shared.metrics, claim, outcome, elapsed);
    log_outcome(claim, outcome, elapsed);
}

/// Reports the failure of an event (claimed) with picloud_fail, then counts and logs it.
pub async fn fail_and_record(
    shared: &Shared,
    client: &Client,
    claim: &Claim,
    failure: &Failure,
    started: Instant,
) {
    let worker = shared.config.worker_name.as_str();
    let outcome = report_failure(client, claim, worker, failure).await;
    record(shared, claim, &outcome, started);
}

/// Runs `handler` while renewing the lease every lease/3. If the database
/// says the lease is gone, the handler is abandoned: another worker may
/// already run the row, and completing it would be refused anyway.
async fn with_lease<F>(
    metrics: &Metrics,
    client: &Client,
    claim: &Claim,
    worker: &str,
    lease_ms: i32,
    handler: F,
) -> External
where
    F: std::future::Future<Output = HandlerResult>,
{
    let period = Duration::from_millis((lease_ms / 3).max(10) as u64);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(handler);
    loop {
        tokio::select! {
            result = &mut handler => return External::Finished(result),
            _ = ticker.tick() => match db::extend_lease(client, claim, worker, lease_ms).await {
                Ok(true) => {
                    metrics.lease_renewals.inc();
                }
                Ok(false) => return External::LeaseLost,
                // Keep going: the handler may still finish, and if the
                // connection is gone the report will say so.
                Err(e) => tracing::warn!(
                    event_id = %claim.event_id,
                    error = %db::error_text(&e),
                    "could not extend lease"
                ),
            },
        }
    }
}

async fn report_success(
    client: &Client,
    claim: &Claim,
    worker: &str,
    result: Option<&Value>,
) -> Outcome {
    match db::complete(client, claim, worker, result).await {
        Ok(()) => Outcome::Completed,
        Err(e) => report_error_outcome(e),
    }
}

async fn report_failure(
    client: &Client,
    claim: &Claim,
    worker: &str,
    failure: &Failure,
) -> Outcome {
    let error = bounded_error(&failure.error);
    match db::fail(client, claim, worker, &error, failure.retry_at).await {
        Ok(decision) => Outcome::Failed {
            decision: decision.decision,
            error,
            next_due_at: decision.next_due_at,
            dead_letter_id: decision.dead_letter_id,
        },
        Err(e) => report_error_outcome(e),
    }
}

async fn release(client: &Client, claim: &Claim, worker: &str) -> Outcome {
    match db::release(client, claim, worker).await {
        Ok(true) => Outcome::Released,
        Ok(false) => Outcome::LeaseLost("picloud_release: the row was no longer held".to_owned()),
        Err(e) => report_error_outcome(e),
    }
}

fn report_error_outcome(e: ReportError) -> Outcome {
    match e {
        ReportError::LeaseLost(text) => Outcome::LeaseLost(text),
        ReportError::Connection(text) => Outcome::Unreported(text),
        ReportError::Rejected(text) => Outcome::ReportRejected(text),
    }
}

/// Only completions and failures are timed: a released, abandoned or unreported event did
/// not run to an end, and its time would say nothing about the handler.
fn count(metrics: &Metrics, claim: &Claim, outcome: &Outcome, elapsed: Duration) {
    let kind = claim.handler.kind();
    match outcome {
        Outcome::Completed => {
            metrics.completed.add(kind, 1);
            metrics.observe_duration(kind, elapsed);
        }
        Outcome::Failed { decision, .. } => {
            metrics.failed.add(kind, 1);
            if *decision == Decision::DeadLetter {
                metrics.dead_lettered.add(kind, 1);
            }
            metrics.observe_duration(kind, elapsed);
        }
        Outcome::Released => metrics.released.add(kind, 1),
        Outcome::Queued => {}
        Outcome::LeaseLost(_) => {
            metrics.lease_lost.inc();
        }
        Outcome::Unreported(_) | Outcome::ReportRejected(_) => metrics.unreported.add(kind, 1),
    }
}

/// One line per event. Routine outcomes are debug; a retry is info; what
/// needs attention (dead letters, lost leases, unreported outcomes) is louder.
fn log_outcome(claim: &Claim, outcome: &Outcome, elapsed: Duration) {
    let (name, error, next_due_at, dead_letter_id) = match outcome {
        Outcome::Completed => ("completed", None, None, None),
        Outcome::Queued => return,
        Outcome::Failed {
            decision,
            error,
            next_due_at,
            dead_letter_id,
        } => (
            decision.as_str(),
            Some(error.as_str()),
            next_due_at.map(|at| at.to_rfc3339()),
            dead_letter_id.map(|id| id.to_string()),
        ),
        Outcome::Released => ("released", None, None, None),
        Outcome::LeaseLost(reason) => ("lease_lost", Some(reason.as_str()), None, None),
        Outcome::Unreported(reason) => ("unreported", Some(reason.as_str()), None, None),
        Outcome::ReportRejected(reason) => ("report_rejected", Some(reason.as_str()), None, None),
    };
    macro_rules! event {
        ($level:ident) => {
            tracing::$level!(
                event_id = %claim.event_id,
                app_id = %claim.app_id,
                kind = claim.handler.kind().label(),
                target = claim.handler.target(),
                principal = claim.principal.as_deref(),
                attempt = claim.attempt_count,
                depth = claim.depth,
                error,
                next_due_at,
                dead_letter_id,
                outcome = name,
                ms = elapsed.as_millis() as u64,
                "event"
            )
        };
    }
    match outcome {
        Outcome::Completed | Outcome::Released => event!(debug),
        Outcome::Failed {
            decision: Decision::Retry,
            ..
        } => event!(info),
        Outcome::ReportRejected(_) => event!(error),
        _ => event!(warn),
    }
}
