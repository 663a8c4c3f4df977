//! The dispatcher: claims due rows on its own connection, as many as there are free executor
//! slots and, when handlers finish fast, some ahead of them (`crate::ready`), and starts an
//! executor task on each free slot.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::backoff::Backoff;
use crate::db::{self, ConnectError};
use crate::executor::{self, accept_claimed};
use crate::idle::{idle_wait, DueWait, DUE_BUT_LOCKED_WAIT, RECHECK_DELAY};
use crate::metrics::Connection;
use crate::state::{pause_before_reconnect, stopping, Phase, Shared};
use crate::wake::{self, Listen, WakeConnection, WakeFor};

/// How the dispatcher ended.
pub enum Ended {
    /// Shutdown was requested.
    Stopped,
    /// The configuration cannot work (the database's certificate does not verify): retrying
    /// would not help.
    Misconfigured(String),
}

/// Runs until shutdown is requested, reconnecting with backoff whenever the
/// connection or a claim fails; then reports the successes still queued.
pub async fn run(shared: Arc<Shared>, phase: watch::Receiver<Phase>) -> Ended {
    let ended = serve(&shared, phase).await;
    let waiting = shared.ready.close();
    if !waiting.is_empty() {
        match shared.pool.get().await {
            Ok(client) => {
                executor::give_back(&shared, &client, waiting).await;
                shared.pool.put(client);
            }
            Err(e) => tracing::warn!(
                error = %e,
                events = waiting.len(),
                "events claimed ahead could not be given back; their leases will expire"
            ),
        }
    }
    let left = shared.completions.close();
    if !left.is_empty() {
        match shared.pool.get().await {
            Ok(client) => {
                executor::report_completed(&shared, &client, None, left).await;
                shared.pool.put(client);
            }
            // Unreported: their leases expire and the events run again.
            Err(e) => tracing::warn!(
                error = %e,
                events = left.len(),
                "finished events could not be reported; their leases will expire"
            ),
        }
    }
    ended
}

async fn serve(shared: &Arc<Shared>, mut phase: watch::Receiver<Phase>) -> Ended {
    let mut backoff = Backoff::new();
    let mut ever_connected = false;
    loop {
        if *phase.borrow() != Phase::Running {
            return Ended::Stopped;
        }
        // None: only a standby answered, which `Database` has said once for every connection.
        let failure = match wake::connect(shared.pool.database(), dispatcher_wakes(shared)).await {
            Ok(connection) => {
                shared.metrics.set_db_connected(true);
                tracing::info!(channel = wake::WAKE_CHANNEL, "dispatcher connected");
                if !ever_connected {
                    ever_connected = true;
                    wake::warn_if_pooled(shared.pool.database(), &connection).await;
                }
                match claim_loop(shared, &connection, &mut phase, &mut backoff).await {
                    Ok(()) => return Ended::Stopped,
                    Err(e) => Some(format!(
                        "dispatcher connection failed: {}",
                        db::error_text(&e)
                    )),
                }
            }
            Err(e) if !ever_connected && e.is_certificate_error() => {
                return Ended::Misconfigured(format!(
                    "the database server's certificate does not verify (sslmode={}): {e}",
                    shared.config.sslmode.as_str(),
                ));
            }
            Err(ConnectError::Standby) => None,
            Err(e) => Some(format!("dispatcher could not connect: {e}")),
        };
        shared.metrics.set_db_connected(false);
        if pause_before_reconnect(
            shared,
            Connection::Dispatcher,
            "dispatcher",
            failure,
            &mut backoff,
            &mut phase,
        )
        .await
        {
            return Ended::Stopped;
        }
    }
}

/// The dispatcher acts on wake-ups for any claimer, and on those for a kind of lane while no
/// lane of that kind serves (its claims take those events then).
fn dispatcher_wakes(shared: &Arc<Shared>) -> Listen {
    let shared = Arc::clone(shared);
    Listen::For(Box::new(move |wake| match wake {
        WakeFor::Any => true,
        WakeFor::SqlLane => !shared.sql_lanes_serve(),
        WakeFor::HttpLane => !shared.http_lanes_serve(),
    }))
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
    let schema = shared.pool.database().schema();
    let claim_statements = db::ClaimStatements::prepare(&connection.client, schema).await?;
    let mut rechecked = false;
    // While events are due but none is claimable (sql lanes hold them, or another claimer),
    // each look costs a claim: wait longer and longer, up to the poll interval.
    let mut due_wait = DueWait::new(DUE_BUT_LOCKED_WAIT, config.poll_interval);
    loop {
        let Some((batch, ahead)) = wait_for_room(
            shared,
            &connection.client,
            claim_statements.complete_many.as_ref(),
            phase,
        )
        .await?
        else {
            return Ok(());
        };
        let request = db::ClaimRequest {
            worker: &config.worker_name,
            batch: batch as i32,
            lease_ms: config.lease_ms,
            leave_sql_lane: shared.sql_lanes_serve(),
            leave_http_lane: shared.http_lanes_serve(),
            // What an app may have claimed by this supervisor: what it may run, and what is
            // claimed ahead. The running cap itself is kept by `Shared::ready`.
            app_cap: (config.max_running_per_app + ahead) as i32,
        };
        shared.ready.claiming();
        // The successes queued since the last claim are reported first, in the same round
        // trip: their rows are gone before the claim counts what each app has claimed.
        let done = shared.completions.take();
        let (_, rows) = tokio::join!(
            executor::report_completed(
                shared,
                &connection.client,
                claim_statements.complete_many.as_ref(),
                done
            ),
            db::claim(&connection.client, &claim_statements, &request),
        );
        let rows = rows?;
        backoff.reset();
        metrics.dispatcher.claimed();
        let claimed = rows.len();
        metrics.claim_batch_size.observe(claimed as f64);
        shared.ready.push(accept_claimed(metrics, rows));
        executor::start_waiting(shared, phase);

        if claimed > 0 {
            rechecked = false;
            due_wait.reset();
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
        let wait = idle_wait(&connection.client, config.poll_interval, schema).await?;
        let mut wait = due_wait.stretch(wait);
        if shared.ready.waiting() > 0 || shared.completions.oldest().is_some() {
            wait = wait.min(stale_check(config.lease_ms)).min(REPORT_WITHIN);
        }
        tokio::select! {
            _ = connection.wake.notified() => due_wait.reset(),
            _ = shared.rescheduled.notified() => due_wait.reset(),
            _ = shared.finished.notified() => due_wait.reset(),
            _ = tokio::time::sleep(wait) => {}
            _ = stopping(phase) => return Ok(()),
        }
    }
}

/// Waits until a claim is worth making and returns how many events it may take and how many of
/// those are claimed ahead of free slots (`Ready::room`); None once shutdown is requested.
///
/// With most executor slots busy, a claim now would take only the one or two events that just
/// finished, and the next claim the rest a moment later: every claim costs about the same
/// however many events it takes, so such a stream of small claims halves what a busy
/// supervisor runs. So with room for less than a batch it waits, up to `GATHER`, for more to
/// finish. Meanwhile it gives back events that waited too long for a slot (before their lease
/// could run out here), and reports successes that waited `REPORT_WITHIN` for a claim to ride
/// with (`complete_many`: the dispatcher's prepared statement).
async fn wait_for_room(
    shared: &Arc<Shared>,
    client: &Client,
    complete_many: Option<&tokio_postgres::Statement>,
    phase: &mut watch::Receiver<Phase>,
) -> Result<Option<(usize, usize)>, tokio_postgres::Error> {
    let config = &shared.config;
    let mut gather_until = None;
    loop {
        executor::start_waiting(shared, phase);
        executor::give_back(shared, client, shared.ready.take_stale()).await;
        let report_at = shared.completions.oldest().map(|at| at + REPORT_WITHIN);
        if report_at.is_some_and(|at| at <= std::time::Instant::now()) {
            let done = shared.completions.take();
            executor::report_completed(shared, client, complete_many, done).await;
            continue;
        }
        if *phase.borrow() != Phase::Running {
            return Ok(None);
        }
        let room = shared.ready.room(config.concurrency, config.prefetch);
        let ahead = room.ahead;
        let batch = room.take.min(config.batch_size + ahead);
        let now = tokio::time::Instant::now();
        // Claims follow one another as long as each can take half of what may be held (the
        // slots and what is claimed ahead): the connection stays busy with claims that are
        // large enough to be worth their fixed cost.
        let half = (config.concurrency + ahead) / 2;
        if room.take >= config.batch_size.max(half).max(1) {
            shared.metrics.dispatcher.set_waiting_for_slot(false);
            return Ok(Some((batch, ahead)));
        }
        // Less than that, and nothing waiting could start: claim after a short gathering.
        if room.take > 0 && room.runnable == 0 {
            let until = *gather_until.get_or_insert(now + GATHER);
            if now >= until {
                shared.metrics.dispatcher.set_waiting_for_slot(false);
                return Ok(Some((batch, ahead)));
            }
        }
        // Waiting for a free executor slot is not claiming, by design, which /health must know.
        shared
            .metrics
            .dispatcher
            .set_waiting_for_slot(room.take == 0);
        let mut wake_at = gather_until.unwrap_or(now + stale_check(config.lease_ms));
        if let Some(at) = report_at {
            wake_at = wake_at.min(tokio::time::Instant::from_std(at));
        }
        tokio::select! {
            _ = shared.finished.notified() => {}
            _ = tokio::time::sleep_until(wake_at) => {}
            _ = stopping(phase) => return Ok(None),
        }
    }
}

/// How often events waiting for a slot are looked at for their age.
fn stale_check(lease_ms: i32) -> Duration {
    Duration::from_millis((lease_ms as u64 / 6).max(10))
}

/// The longest `wait_for_room` gathers: about what one claim costs.
const GATHER: Duration = Duration::from_millis(2);

/// The longest a success waits to be reported with a claim before it is reported alone (a
/// synchronous caller waits for it, and its lease runs).
const REPORT_WITHIN: Duration = Duration::from_millis(10);
