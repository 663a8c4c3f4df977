//! The dispatcher: claims due rows on its own connection, only as many as
//! there are free executor slots, and hands each to an executor task at once.
//! Claimed rows never wait in a local queue.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{watch, OwnedSemaphorePermit};

use crate::backoff::Backoff;
use crate::db::{self, Claim};
use crate::executor;
use crate::log;
use crate::metrics::{Connection, Kind};
use crate::supervise::{sleep_unless_stopping, stopping, Phase, Shared};
use crate::wake::{self, WakeConnection};

/// After an empty claim the extension starts sending wake-ups for this worker;
/// an event enqueued just before that would get none, so claim once more
/// shortly after to close that window. The window is one commit's WAL flush, so a few
/// milliseconds cover it.
const RECHECK_DELAY: Duration = Duration::from_millis(3);

/// Shortest idle wait when an unclaimed event is already due but the claim found none (another
/// claimer holds its row lock for a moment): short, but not a busy loop.
pub(crate) const DUE_BUT_LOCKED_WAIT: Duration = Duration::from_millis(5);

/// Runs until shutdown is requested, reconnecting with backoff whenever the
/// connection or a claim fails.
pub async fn run(shared: Arc<Shared>, mut phase: watch::Receiver<Phase>) {
    let mut backoff = Backoff::new();
    let state = &shared.metrics.dispatcher;
    loop {
        if *phase.borrow() != Phase::Running {
            return;
        }
        let failure = match wake::connect(&shared.config.db).await {
            Ok(connection) => {
                state.set_connected(true);
                log::info(
                    "dispatcher connected",
                    &[("channel", wake::WAKE_CHANNEL.into())],
                );
                match claim_loop(&shared, &connection, &mut phase, &mut backoff).await {
                    Ok(()) => return,
                    Err(e) => format!("dispatcher connection failed: {}", db::error_text(&e)),
                }
            }
            Err(e) => format!("dispatcher could not connect: {}", db::error_text(&e)),
        };
        state.set_connected(false);
        shared.metrics.reconnect(Connection::Dispatcher);
        let delay = backoff.next_delay();
        log::warn(
            "dispatcher reconnecting",
            &[
                ("error", failure.into()),
                ("retry_in_ms", json!(delay.as_millis() as u64)),
            ],
        );
        if sleep_unless_stopping(delay, &mut phase).await {
            return;
        }
    }
}

/// Claims and dispatches until shutdown (`Ok`) or a database error (`Err`).
async fn claim_loop(
    shared: &Arc<Shared>,
    connection: &WakeConnection,
    phase: &mut watch::Receiver<Phase>,
    backoff: &mut Backoff,
) -> Result<(), tokio_postgres::Error> {
    let config = &shared.config;
    let metrics = &shared.metrics;
    let claim_statements = db::ClaimStatements::prepare(&connection.client).await?;
    let mut rechecked = false;
    // While events are due but none is claimable (sql lanes hold them, or another claimer),
    // each look costs a claim: wait longer and longer, up to the poll interval.
    let mut due_wait = DUE_BUT_LOCKED_WAIT;
    // Cleared for good if the database's picloud schema predates picloud_next_due_at.
    let mut next_due_known = true;
    loop {
        // Wait for a free executor slot before claiming anything. Not claiming then is
        // by design, which /health must know.
        let saturated = shared.slots.available_permits() == 0;
        if saturated {
            metrics.dispatcher.set_waiting_for_slot(true);
        }
        let first = tokio::select! {
            permit = Arc::clone(&shared.slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed; if it were, nothing could run.
                Err(_) => return Ok(()),
            },
            _ = stopping(phase) => return Ok(()),
        };
        if saturated {
            metrics.dispatcher.set_waiting_for_slot(false);
        }
        if *phase.borrow() != Phase::Running {
            return Ok(());
        }
        let mut permits: Vec<OwnedSemaphorePermit> = vec![first];
        while permits.len() < config.batch_size {
            match Arc::clone(&shared.slots).try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }

        // While a sql lane is connected, it runs the first attempts of sql events.
        let leave_sql_lane = metrics.lanes_connected.load(Ordering::Relaxed) > 0;
        let rows = db::claim(
            &connection.client,
            &claim_statements,
            &config.worker_name,
            permits.len() as i32,
            config.lease_ms,
            leave_sql_lane,
        )
        .await?;
        backoff.reset();
        metrics.dispatcher.claimed();
        let claimed = rows.len();
        metrics.claim_batch_size.observe(claimed as u64);
        let mut claims = Vec::with_capacity(rows.len());
        for row in rows {
            match row {
                Ok(claim) => {
                    metrics
                        .claimed
                        .add(Kind::of(claim.handler_kind.as_deref()), 1);
                    claims.push(claim);
                }
                Err(e) => {
                    // Counted as unreported too: no outcome will ever be reported for it.
                    metrics.claimed.add(Kind::Unknown, 1);
                    metrics.unreported.add(Kind::Unknown, 1);
                    log::error(
                        "claimed row could not be read; its lease will expire",
                        &[("error", e.into())],
                    );
                }
            }
        }
        // Runnable sql events share transactions in groups of up to --sql-batch; the rest
        // (and a group of one) run one per task.
        let (batchable, single): (Vec<Claim>, Vec<Claim>) = claims.into_iter().partition(|c| {
            config.sql_batch > 1
                && c.handler_kind.as_deref() == Some("sql")
                && c.principal_error.is_none()
        });
        let mut groups: Vec<Vec<Claim>> = Vec::new();
        let mut batchable = batchable.into_iter().peekable();
        while batchable.peek().is_some() {
            groups.push(batchable.by_ref().take(config.sql_batch).collect());
        }
        for group in groups {
            let mut group_permits = Vec::with_capacity(group.len());
            for _ in 0..group.len() {
                match take_permit(shared, &mut permits).await {
                    Some(permit) => group_permits.push(permit),
                    None => return Ok(()),
                }
            }
            if group.len() == 1 {
                if let (Some(claim), Some(permit)) = (group.into_iter().next(), group_permits.pop())
                {
                    tokio::spawn(executor::run_event(
                        Arc::clone(shared),
                        claim,
                        permit,
                        phase.clone(),
                    ));
                }
            } else {
                tokio::spawn(executor::run_sql_batch(
                    Arc::clone(shared),
                    group,
                    group_permits,
                    phase.clone(),
                ));
            }
        }
        for claim in single {
            let Some(permit) = take_permit(shared, &mut permits).await else {
                return Ok(());
            };
            tokio::spawn(executor::run_event(
                Arc::clone(shared),
                claim,
                permit,
                phase.clone(),
            ));
        }
        // Unused permits go back here, before any waiting.
        drop(permits);

        if claimed > 0 {
            rechecked = false;
            due_wait = DUE_BUT_LOCKED_WAIT;
            continue;
        }
        if !rechecked {
            rechecked = true;
            // A wake-up during the recheck delay ends it at once: an event enqueued right
            // after the supervisor went idle must not wait out the delay.
            tokio::select! {
                _ = connection.wake.notified() => {}
                _ = tokio::time::sleep(RECHECK_DELAY) => {}
                _ = stopping(phase) => return Ok(()),
            }
            continue;
        }
        rechecked = false;
        let mut wait = idle_wait(
            &connection.client,
            config.poll_interval,
            &mut next_due_known,
        )
        .await?;
        if wait <= DUE_BUT_LOCKED_WAIT {
            wait = due_wait.min(config.poll_interval);
            due_wait = (due_wait * 2).min(config.poll_interval);
        }
        tokio::select! {
            _ = connection.wake.notified() => due_wait = DUE_BUT_LOCKED_WAIT,
            _ = shared.rescheduled.notified() => due_wait = DUE_BUT_LOCKED_WAIT,
            _ = tokio::time::sleep(wait) => {}
            _ = stopping(phase) => return Ok(()),
        }
    }
}

/// How long an idle dispatcher sleeps (a wake-up ends it sooner): until the next retry or
/// scheduled event is due - no notification announces those - and at most the poll interval.
pub(crate) async fn idle_wait(
    client: &tokio_postgres::Client,
    poll_interval: Duration,
    next_due_known: &mut bool,
) -> Result<Duration, tokio_postgres::Error> {
    if !*next_due_known {
        return Ok(poll_interval);
    }
    match db::next_due_in_ms(client).await {
        Ok(next_due) => Ok(wait_for(next_due, poll_interval)),
        Err(e) if db::is_undefined_function(&e) => {
            *next_due_known = false;
            log::warn(
                "picloud_next_due_at is missing (run ALTER EXTENSION picloud UPDATE); \
                 retries and scheduled events may start up to one poll interval late",
                &[],
            );
            Ok(poll_interval)
        }
        Err(e) => Err(e),
    }
}

fn wait_for(next_due_in_ms: Option<f64>, poll_interval: Duration) -> Duration {
    match next_due_in_ms {
        None => poll_interval,
        Some(ms) if ms <= 0.0 || !ms.is_finite() => DUE_BUT_LOCKED_WAIT.min(poll_interval),
        // Rounded up: waking a little early would find nothing due yet.
        Some(ms) => Duration::from_millis(ms.ceil() as u64).min(poll_interval),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_wait_follows_the_next_due_event_within_the_poll_interval() {
        let poll = Duration::from_millis(5000);
        assert_eq!(wait_for(None, poll), poll);
        assert_eq!(wait_for(Some(120.2), poll), Duration::from_millis(121));
        assert_eq!(wait_for(Some(60_000.0), poll), poll);
        assert_eq!(wait_for(Some(-3.0), poll), DUE_BUT_LOCKED_WAIT);
        assert_eq!(wait_for(Some(0.0), poll), DUE_BUT_LOCKED_WAIT);
        assert_eq!(wait_for(Some(f64::NAN), poll), DUE_BUT_LOCKED_WAIT);
        assert_eq!(
            wait_for(Some(-1.0), Duration::from_millis(2)),
            Duration::from_millis(2)
        );
    }
}

/// One of the permits taken for this claim or, if the database returned more rows than were
/// asked for, a permit waited for now: those rows then run as slots free up. None only if the
/// semaphore was closed, which never happens while the supervisor runs.
async fn take_permit(
    shared: &Arc<Shared>,
    permits: &mut Vec<OwnedSemaphorePermit>,
) -> Option<OwnedSemaphorePermit> {
    if let Some(permit) = permits.pop() {
        return Some(permit);
    }
    log::warn("claim returned more rows than requested", &[]);
    Arc::clone(&shared.slots).acquire_owned().await.ok()
}
