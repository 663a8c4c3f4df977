//! The http lanes (see sql/036_http_lane.sql): first attempts of http-handler events delivered
//! without claims. While an executor slot is free, a lane locks a batch of one app's events in
//! a transaction and delivers them as slots come free: one slot per delivery, so
//! `--concurrency` still bounds everything running at once, and each delivery counts toward its
//! app's `--max-running-per-app` with the app's claimed events. Then, in the same transaction,
//! it deletes those delivered and claims the rest that were tried - the failed ones, and those
//! still running when the lane stops waiting (`HOLD`) - and commits; events no slot came free
//! for stay in the queue untouched. The claimed ones go the ordinary way: a failure is reported
//! with picloud_fail (retry or dead letter), a delivery still running goes on under a lease and
//! is reported when it ends (`executor::finish_delivery`). So the database writes nothing for a
//! delivered event but its delete, and no lane transaction stays open much longer than `HOLD`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::db::{self, Claim, Handler, CLAIM_COLUMNS};
use crate::executor::{self, accept_claimed};
use crate::handlers::{self, Failure, HandlerResult};
use crate::idle::LaneWait;
use crate::metrics::{Kind, LaneConnected};
use crate::schema::Schema;
use crate::state::{connect_lane, lane_lost, stopping, Phase, Shared};
use crate::wake::{WakeConnection, WakeFor};

/// The longest a lane waits for its batch's deliveries before it hands those still running to
/// the claim path and commits: the transaction (and the app's lane lock) is held no longer.
const HOLD: Duration = Duration::from_millis(500);

/// How often a lane looks for a free executor slot while none is.
const SLOT_POLL: Duration = Duration::from_millis(1);

/// First idle wait while events are due but none is for a lane (see `idle::DueWait`).
const OTHERS_DUE_WAIT: Duration = Duration::from_millis(20);

/// Runs http lane `index` until shutdown, reconnecting with backoff.
pub async fn run(shared: Arc<Shared>, index: usize, mut phase: watch::Receiver<Phase>) {
    const NAME: &str = "http lane";
    let mut backoff = Backoff::new();
    // Only lane 0 is woken by notifications, as for the sql lanes: every woken lane looks for
    // work at once, and on 2 cores each extra one delays the handler that was enqueued.
    let listens = index == 0;
    loop {
        let offered = Schema::http_lanes;
        let Some(connection) = connect_lane(
            &shared,
            NAME,
            index,
            listens.then_some(WakeFor::HttpLane),
            offered,
            &mut backoff,
            &mut phase,
        )
        .await
        else {
            return;
        };
        let connected = LaneConnected::new(&shared.metrics.http_lanes_connected);
        let result = lane_loop(&shared, &connection, listens, &mut phase, &mut backoff).await;
        drop(connected);
        let Err(e) = result else {
            return;
        };
        let failure = Some(format!("{NAME} connection failed: {e}"));
        if lane_lost(&shared, NAME, index, failure, &mut backoff, &mut phase).await {
            return;
        }
    }
}

async fn lane_loop(
    shared: &Arc<Shared>,
    connection: &WakeConnection,
    listens: bool,
    phase: &mut watch::Receiver<Phase>,
    backoff: &mut Backoff,
) -> Result<(), String> {
    let client = &connection.client;
    let schema = shared.pool.database().schema();
    let statements = Statements::prepare(client)
        .await
        .map_err(|e| db::error_text(&e))?;
    let batch = batch_size(shared.config.concurrency);
    let mut wait = LaneWait::new(OTHERS_DUE_WAIT, shared.config.poll_interval, schema);
    loop {
        // A batch is locked only while an executor slot is free to start delivering it. (The
        // lane never queues for a slot: a queued waiter would be handed every slot that comes
        // free, ahead of the executors.)
        while shared.slots.available_permits() == 0 {
            tokio::select! {
                _ = tokio::time::sleep(SLOT_POLL) => {}
                _ = stopping(phase) => return Ok(()),
            }
        }
        let locked = run_batch(shared, client, &statements, batch, phase)
            .await
            .map_err(|e| db::error_text(&e))?;
        backoff.reset();
        if *phase.borrow() != Phase::Running {
            return Ok(());
        }
        let full = locked == batch;
        if full && listens {
            // A full batch: more are probably waiting; the other lanes help.
            shared.http_lanes_wake.notify_waiters();
        }
        let others = (!listens).then_some(&shared.http_lanes_wake);
        let wakes = [Some(connection.wake.as_ref()), others];
        let go_on = wait
            .after_batch(locked, full, client, wakes, phase)
            .await
            .map_err(|e| db::error_text(&e))?;
        if !go_on {
            return Ok(());
        }
    }
}

/// Most events one batch locks: as many as the executors can deliver a few times over, so that
/// a batch's fixed cost (its lock, its commit) is spread over many deliveries.
fn batch_size(concurrency: usize) -> usize {
    (concurrency * 8).clamp(1, 10_000)
}

/// The lane's statements, prepared once per connection so that each goes out without a
/// round trip of its own.
struct Statements {
    lock: Statement,
    complete: Statement,
    claim: Statement,
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Statements, tokio_postgres::Error> {
        Ok(Statements {
            lock: client
                .prepare(&format!(
                    "SELECT {CLAIM_COLUMNS} FROM picloud.picloud_lock_http_lane($1)"
                ))
                .await?,
            complete: client
                .prepare("SELECT picloud.picloud_complete_lane($1, $2)")
                .await?,
            claim: client
                .prepare(&format!(
                    "SELECT {CLAIM_COLUMNS} FROM picloud.picloud_claim_events($1, $2, $3, $4)"
                ))
                .await?,
        })
    }
}

/// How one locked event's delivery stands when the lane stops waiting.
enum Delivery {
    /// Not started (no slot came free in time): left in the queue untouched.
    Waiting,
    Running(JoinHandle<HandlerResult>),
    Delivered,
    Failed(Failure),
}

/// Locks up to `batch` events of one app, delivers them as executor slots come free - at most
/// `--max-running-per-app` at once - and commits
/// (see the module comment); returns how many it locked. An error means the connection is
/// unusable: nothing was committed, and the batch's events are unlocked untouched (delivered
/// again later).
async fn run_batch(
    shared: &Arc<Shared>,
    client: &Client,
    statements: &Statements,
    batch: usize,
    phase: &watch::Receiver<Phase>,
) -> Result<usize, tokio_postgres::Error> {
    let asked = batch as i32;
    let lock_params: [&(dyn ToSql + Sync); 1] = [&asked];
    let (begun, rows) = tokio::join!(
        client.batch_execute("BEGIN"),
        client.query(&statements.lock, &lock_params)
    );
    let rows = match (begun, rows) {
        (Ok(()), Ok(rows)) => rows,
        (Err(e), _) | (_, Err(e)) => return Err(abandon(client, e).await),
    };
    if rows.is_empty() {
        client.batch_execute("COMMIT").await?;
        return Ok(0);
    }
    let locked = rows.len();
    let claims = accept_claimed(&shared.metrics, rows.iter().map(Claim::from_row).collect());
    let started = Instant::now();
    let deliveries = deliver(shared, &claims, phase).await;
    settle(
        shared, client, statements, &claims, deliveries, started, phase,
    )
    .await?;
    Ok(locked)
}

/// Delivers `claims` in order, each once an executor slot is free and its app is under its
/// cap (`Ready::try_start_outside`: the cap counts claimed and lane events together), until
/// all have ended or `HOLD` has passed.
async fn deliver(
    shared: &Arc<Shared>,
    claims: &[Claim],
    phase: &watch::Receiver<Phase>,
) -> Vec<Delivery> {
    let hold_until = tokio::time::Instant::now() + HOLD;
    let mut deliveries: Vec<Delivery> = claims.iter().map(|_| Delivery::Waiting).collect();
    let mut next = 0;
    loop {
        while next < claims.len() && *phase.borrow() == Phase::Running {
            let Ok(slot) = Arc::clone(&shared.slots).try_acquire_owned() else {
                break;
            };
            let app_id = claims[next].app_id;
            if !shared.ready.try_start_outside(app_id) {
                break;
            }
            let running = Running {
                shared: Arc::clone(shared),
                app_id,
                phase: phase.clone(),
            };
            deliveries[next] = start(shared, &claims[next], (slot, running));
            next += 1;
        }
        let running = deliveries[..next]
            .iter()
            .any(|d| matches!(d, Delivery::Running(_)));
        let more = next < claims.len() && *phase.borrow() == Phase::Running;
        if !running && !more {
            return deliveries;
        }
        // A slot or the app's cap may come free through other events too: look again shortly.
        let ended = tokio::select! {
            ended = one_ended(&mut deliveries[..next]) => Some(ended),
            _ = tokio::time::sleep(SLOT_POLL), if more => None,
            _ = tokio::time::sleep_until(hold_until) => return deliveries,
        };
        if let Some((index, result)) = ended {
            deliveries[index] = match result {
                Ok(_) => Delivery::Delivered,
                Err(failure) => Delivery::Failed(failure),
            };
        }
    }
}

/// Waits for one of the running `deliveries` to end and returns its index and result; never
/// resolves while none runs. (Each delivery's task is polled here, so no end can be missed: a
/// signal sent by the task before it returns could be seen before the task had finished.)
async fn one_ended(deliveries: &mut [Delivery]) -> (usize, HandlerResult) {
    std::future::poll_fn(|cx| {
        for (index, delivery) in deliveries.iter_mut().enumerate() {
            let Delivery::Running(handle) = delivery else {
                continue;
            };
            if let Poll::Ready(joined) = Pin::new(handle).poll(cx) {
                let result =
                    joined.unwrap_or_else(|e| Err(format!("http delivery ended: {e}").into()));
                return Poll::Ready((index, result));
            }
        }
        Poll::Pending
    })
    .await
}

/// Ends the batch's transaction in one round trip: the delivered events deleted, the failed
/// and still running ones claimed (those that never started stay as they were), COMMIT. Then
/// reports the failed ones and hands the running ones to the claim path.
async fn settle(
    shared: &Arc<Shared>,
    client: &Client,
    statements: &Statements,
    claims: &[Claim],
    deliveries: Vec<Delivery>,
    started: Instant,
    phase: &watch::Receiver<Phase>,
) -> Result<(), tokio_postgres::Error> {
    let (mut done_apps, mut done_ids, mut rest_apps, mut rest_ids) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (claim, delivery) in claims.iter().zip(&deliveries) {
        let (apps, ids) = match delivery {
            Delivery::Waiting => continue,
            Delivery::Delivered => (&mut done_apps, &mut done_ids),
            Delivery::Running(_) | Delivery::Failed(_) => (&mut rest_apps, &mut rest_ids),
        };
        apps.push(claim.app_id);
        ids.push(claim.event_id);
    }
    let config = &shared.config;
    let complete_params: [&(dyn ToSql + Sync); 2] = [&done_apps, &done_ids];
    let claim_params: [&(dyn ToSql + Sync); 4] =
        [&config.worker_name, &rest_apps, &rest_ids, &config.lease_ms];
    // (A statement with nothing to do is not sent: each costs a call.)
    let (completed, claimed, committed) = tokio::join!(
        async {
            match done_ids.is_empty() {
                true => Ok(()),
                false => client
                    .query_one(&statements.complete, &complete_params)
                    .await
                    .map(drop),
            }
        },
        async {
            match rest_ids.is_empty() {
                true => Ok(Vec::new()),
                false => client.query(&statements.claim, &claim_params).await,
            }
        },
        client.batch_execute("COMMIT")
    );
    let claimed = match (completed, claimed, committed) {
        (Ok(()), Ok(claimed), Ok(())) => claimed,
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            // Rolled back: every event is unlocked untouched and will be delivered again.
            for delivery in deliveries {
                if let Delivery::Running(handle) = delivery {
                    handle.abort();
                }
            }
            return Err(abandon(client, e).await);
        }
    };
    shared.metrics.http_lane_batches.inc();
    // Locked but never started: back in the queue as they were (counted like events given back).
    let untouched = deliveries
        .iter()
        .filter(|d| matches!(d, Delivery::Waiting))
        .count();
    shared.metrics.released.add(Kind::Http, untouched as u64);
    let mut claimed: HashMap<Uuid, Claim> = claimed
        .iter()
        .filter_map(|row| Claim::from_row(row).ok())
        .map(|claim| (claim.event_id, claim))
        .collect();
    for (claim, delivery) in claims.iter().zip(deliveries) {
        match delivery {
            Delivery::Waiting => continue,
            Delivery::Delivered => {
                executor::record_completed(shared, claim, started);
                continue;
            }
            Delivery::Running(_) | Delivery::Failed(_) => {}
        }
        // Claimed by the commit above: held by this worker under a lease.
        let Some(claimed) = claimed.remove(&claim.event_id) else {
            tracing::error!(
                event_id = %claim.event_id,
                "an http lane event could not be claimed; it will be delivered again"
            );
            if let Delivery::Running(handle) = delivery {
                handle.abort();
            }
            continue;
        };
        match delivery {
            Delivery::Failed(failure) => {
                executor::fail_and_record(shared, client, &claimed, &failure, started).await;
            }
            Delivery::Running(handle) => {
                tokio::spawn(executor::finish_delivery(
                    Arc::clone(shared),
                    claimed,
                    handle,
                    started,
                    phase.clone(),
                ));
            }
            Delivery::Waiting | Delivery::Delivered => {}
        }
    }
    Ok(())
}

/// Starts delivering `claim` in a task of its own that holds `slots` (the executor slot and its
/// place among the app's running events) until the delivery ends. An event that cannot be
/// delivered at all fails at once; the signing secrets are read in the task.
fn start(shared: &Arc<Shared>, claim: &Claim, slots: (OwnedSemaphorePermit, Running)) -> Delivery {
    if let Some(refused) = executor::refusal(claim) {
        return Delivery::Failed(refused);
    }
    let Handler::Http { url } = &claim.handler else {
        return Delivery::Failed("not an http handler".to_owned().into());
    };
    let (shared, url) = (Arc::clone(shared), url.clone());
    let handler = (claim.app_id, claim.script_id);
    let body = handlers::event_body(claim);
    let event_id = claim.event_id;
    // Every handler has a timeout; a non-positive one would mean "none".
    let timeout = Duration::from_millis(claim.timeout_ms.max(1) as u64);
    Delivery::Running(tokio::spawn(async move {
        let _busy = shared.metrics.busy(1);
        let result = match executor::signing_secrets(&shared, None, handler).await {
            Ok(secrets) => {
                shared
                    .http
                    .post(&url, event_id, body, &secrets, timeout)
                    .await
            }
            Err(failure) => Err(failure),
        };
        drop(slots);
        result
    }))
}

/// A lane delivery counted among its app's running events (`Ready`) until dropped; then
/// claimed events of the app that waited for the cap may start on the free slots (started
/// here: the dispatcher is not woken for each lane delivery).
struct Running {
    shared: Arc<Shared>,
    app_id: Uuid,
    phase: watch::Receiver<Phase>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shared.ready.ended_outside(self.app_id);
        executor::start_waiting(&self.shared, &self.phase);
    }
}

/// Ends the lane's transaction after `e` (a rollback; if even that fails the connection is
/// gone) and returns `e` for the reconnect.
async fn abandon(client: &Client, e: tokio_postgres::Error) -> tokio_postgres::Error {
    if !client.is_closed() {
        if let Err(rollback) = client.batch_execute("ROLLBACK").await {
            // The connection is then gone too; the caller reconnects either way.
            tracing::debug!(error = %db::error_text(&rollback), "http lane could not roll back");
        }
    }
    e
}
