//! The runtime state every service of the supervisor shares (configuration, connection pool,
//! executor slots, metrics) and the lifecycle phase they all follow. The orchestrator
//! (`supervise`) builds it; the services (`dispatch`, `lane`, `executor`) only use it, so
//! dependencies run one way.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{watch, Notify, Semaphore};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::db::{Claim, ConnectError};
use crate::handlers::http::HttpClient;
use crate::metrics::{Connection, Metrics};
use crate::pool::Pool;
use crate::ready::Ready;
use crate::schema::Schema;
use crate::wake::{self, Listen, WakeConnection, WakeFor};

/// Lifecycle phase, broadcast to the dispatcher, the lanes and every executor task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Shutdown requested: no more claims; running handlers may finish.
    Draining,
    /// Grace period over: abandon handlers and release their rows.
    Aborting,
}

/// How long every sql lane must have been in its current batch before claims take sql events
/// too. A lane batch of fast handlers takes tens of milliseconds.
const LANES_HELD: Duration = Duration::from_millis(500);

/// State shared by the dispatcher, the lanes and the executors.
pub struct Shared {
    pub config: Config,
    pub pool: Pool,
    /// The one http client (connection pool, TLS configuration) every http handler uses.
    pub http: HttpClient,
    /// One permit per executor slot (`concurrency` in total).
    pub slots: Arc<Semaphore>,
    pub metrics: Arc<Metrics>,
    /// Signalled when an event this supervisor ran was rescheduled for a retry.
    pub rescheduled: Notify,
    /// Signalled whenever an event this supervisor ran has finished, whatever the outcome: a
    /// claim that came back empty because of the per-app cap, or because the next event of an
    /// ordering key waited for this one, may take something now. Nothing else announces that.
    pub finished: Notify,
    /// Wakes the sql lanes that do not listen for notifications: lane 0 listens, and calls
    /// the others when it finds a full batch (one wake-up per event would wake them all).
    pub lanes_wake: Notify,
    /// The same for the http lanes: lane 0 listens and calls the others in on a full batch.
    pub http_lanes_wake: Notify,
    /// What each sql lane is doing, for the dispatcher.
    pub lane_batches: LaneBatches,
    /// Events whose http or command handler succeeded, waiting to be reported together.
    pub completions: Completions,
    /// Claimed events waiting for a slot, and what runs per app.
    pub ready: Ready,
}

impl Shared {
    /// Whether the sql lanes run the first attempts of sql events now, so that claims (and
    /// the dispatcher's wake-ups) leave those to them: some lane is connected, and not every
    /// lane has been in one batch for long (slow handlers hold them until their timeout; then
    /// claims take those events too, fairly between apps).
    pub fn sql_lanes_serve(&self) -> bool {
        self.metrics.lanes_connected.load(Ordering::Relaxed) > 0
            && !self.lane_batches.all_held_longer_than(LANES_HELD)
    }

    /// The same for http events: http lanes never hold a batch for long (see http_lane.rs).
    pub fn http_lanes_serve(&self) -> bool {
        self.metrics.http_lanes_connected.load(Ordering::Relaxed) > 0
    }
}

/// An event whose http or command handler succeeded, not yet reported.
pub struct Completion {
    pub claim: Claim,
    /// The handler's reply, for a synchronous caller's inbox.
    pub result: Option<Value>,
    pub started: Instant,
}

/// Successful events of external handlers wait here for the dispatcher, which reports them all
/// in one statement just before its next claim on the same connection: one commit for many
/// events instead of one each, and the claim's count of this supervisor's events per app
/// (`--max-running-per-app`) no longer holds them. The executor slot is free as soon as the
/// handler has answered. When the dispatcher stops the queue closes, and an executor reports
/// its own event.
pub struct Completions {
    /// None once closed; with when the oldest queued one was queued.
    queue: Mutex<Option<(Vec<Completion>, Option<Instant>)>>,
}

impl Completions {
    pub fn new() -> Completions {
        Completions {
            queue: Mutex::new(Some((Vec::new(), None))),
        }
    }

    /// Queues `done`, or hands it back if the queue is closed.
    pub fn push(&self, done: Completion) -> Result<(), Box<Completion>> {
        match self
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            Some((queue, oldest)) => {
                queue.push(done);
                oldest.get_or_insert_with(Instant::now);
                Ok(())
            }
            None => Err(Box::new(done)),
        }
    }

    /// Everything queued so far.
    pub fn take(&self) -> Vec<Completion> {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
            .map(|(queue, oldest)| {
                *oldest = None;
                std::mem::take(queue)
            })
            .unwrap_or_default()
    }

    /// When the oldest completion still queued was queued.
    pub fn oldest(&self) -> Option<Instant> {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .and_then(|(_, oldest)| *oldest)
    }

    /// Closes the queue for good and returns what is left in it.
    pub fn close(&self) -> Vec<Completion> {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .map(|(queue, _)| queue)
            .unwrap_or_default()
    }
}

/// What each sql lane is doing: disconnected, idle, or in a batch since when. When every lane
/// has been in a batch for long (slow handlers of one app hold them until their timeout), the
/// dispatcher claims sql events too, so other apps' events do not wait for those batches.
pub struct LaneBatches {
    since: Instant,
    /// Per lane: DISCONNECTED, IDLE, or BATCH_BASE + milliseconds since `since` at batch start.
    lanes: Vec<AtomicU64>,
}

const DISCONNECTED: u64 = 0;
const IDLE: u64 = 1;
const BATCH_BASE: u64 = 2;

impl LaneBatches {
    pub fn new(lanes: usize) -> LaneBatches {
        LaneBatches {
            since: Instant::now(),
            lanes: (0..lanes).map(|_| AtomicU64::new(DISCONNECTED)).collect(),
        }
    }

    fn set(&self, lane: usize, state: u64) {
        if let Some(slot) = self.lanes.get(lane) {
            slot.store(state, Ordering::Relaxed);
        }
    }

    pub fn connected(&self, lane: usize) {
        self.set(lane, IDLE);
    }

    pub fn disconnected(&self, lane: usize) {
        self.set(lane, DISCONNECTED);
    }

    pub fn batch_started(&self, lane: usize) {
        let now = self.since.elapsed().as_millis() as u64;
        self.set(lane, BATCH_BASE + now);
    }

    pub fn batch_ended(&self, lane: usize) {
        self.set(lane, IDLE);
    }

    /// Some lane is connected and no connected lane is idle or in a batch younger than `held`.
    pub fn all_held_longer_than(&self, held: Duration) -> bool {
        let now = self.since.elapsed().as_millis() as u64;
        let held = held.as_millis() as u64;
        let mut connected = false;
        for lane in &self.lanes {
            match lane.load(Ordering::Relaxed) {
                DISCONNECTED => {}
                IDLE => return false,
                started => {
                    connected = true;
                    if now.saturating_sub(started - BATCH_BASE) < held {
                        return false;
                    }
                }
            }
        }
        connected
    }
}

/// Resolves once shutdown has been requested.
pub async fn stopping(phase: &mut watch::Receiver<Phase>) {
    if phase.wait_for(|p| *p != Phase::Running).await.is_err() {
        // The sender lives for the whole run; once it is gone no change can come.
        std::future::pending::<()>().await;
    }
}

/// Resolves once running handlers must be abandoned.
pub async fn aborted(phase: &mut watch::Receiver<Phase>) {
    if phase.wait_for(|p| *p == Phase::Aborting).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Sleeps for `delay`; returns true if shutdown was requested meanwhile.
pub async fn sleep_unless_stopping(delay: Duration, phase: &mut watch::Receiver<Phase>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => *phase.borrow() != Phase::Running,
        _ = stopping(phase) => true,
    }
}

/// Between a connection of the dispatcher or a lane (`who`) that failed (`Some(error)`) or
/// found only a standby (`None`: `Database` says that once for every connection) and the
/// next attempt: counts the reconnect, logs it, and waits the next backoff step. True if the
/// supervisor began stopping meanwhile.
pub async fn pause_before_reconnect(
    shared: &Shared,
    connection: Connection,
    who: &str,
    failure: Option<String>,
    backoff: &mut Backoff,
    phase: &mut watch::Receiver<Phase>,
) -> bool {
    shared.metrics.reconnect(connection);
    let delay = backoff.next_delay();
    let retry_in_ms = delay.as_millis() as u64;
    match failure {
        Some(error) => tracing::warn!(error, retry_in_ms, "{who} reconnecting"),
        None => tracing::debug!(retry_in_ms, "{who} found a standby; reconnecting"),
    }
    sleep_unless_stopping(delay, phase).await
}

/// Connects lane `index` (`name`: "sql lane", "http lane") on a connection of its own,
/// listening for the wake-ups of lanes of `listen`'s kind if given, retrying with backoff. None
/// once shutdown has begun, or at once when the database's schema has no such lanes (`offered`
/// says).
pub async fn connect_lane(
    shared: &Shared,
    name: &str,
    index: usize,
    listen: Option<WakeFor>,
    offered: fn(&Schema) -> bool,
    backoff: &mut Backoff,
    phase: &mut watch::Receiver<Phase>,
) -> Option<WakeConnection> {
    loop {
        if *phase.borrow() != Phase::Running {
            return None;
        }
        let failure = match wake::connect(
            shared.pool.database(),
            listen.map_or(Listen::No, Listen::lane),
        )
        .await
        {
            Ok(_) if !offered(&shared.pool.database().schema()) => {
                tracing::warn!(
                    lane = index,
                    "the database's picloud schema has no {name}s (run ALTER EXTENSION picloud \
                     UPDATE); their events run through claims"
                );
                return None;
            }
            Ok(connection) => {
                tracing::info!(lane = index, "{name} connected");
                return Some(connection);
            }
            Err(ConnectError::Standby) => None,
            Err(e) => Some(format!("{name} could not connect: {e}")),
        };
        if lane_lost(shared, name, index, failure, backoff, phase).await {
            return None;
        }
    }
}

/// After lane `index` lost its connection or could not open one (`failure`; None: it found a
/// standby): see `pause_before_reconnect`. True if the supervisor began stopping meanwhile.
pub async fn lane_lost(
    shared: &Shared,
    name: &str,
    index: usize,
    failure: Option<String>,
    backoff: &mut Backoff,
    phase: &mut watch::Receiver<Phase>,
) -> bool {
    let who = format!("{name} {index}");
    pause_before_reconnect(shared, Connection::Lane, &who, failure, backoff, phase).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::test_claim;
    use uuid::Uuid;

    fn completion() -> Completion {
        Completion {
            claim: test_claim(Uuid::nil()),
            result: None,
            started: Instant::now(),
        }
    }

    #[test]
    fn completions_are_taken_once_and_handed_back_after_closing() {
        let queue = Completions::new();
        let first = completion();
        let id = first.claim.event_id;
        assert!(queue.oldest().is_none());
        assert!(queue.push(first).is_ok());
        assert!(queue.push(completion()).is_ok());
        assert!(queue.oldest().is_some());
        let taken = queue.take();
        assert!(queue.oldest().is_none());
        assert_eq!(taken.len(), 2);
        assert_eq!(taken[0].claim.event_id, id);
        assert!(queue.take().is_empty(), "taken once");
        assert!(queue.push(completion()).is_ok());
        assert_eq!(queue.close().len(), 1, "what is left comes out at closing");
        let late = completion();
        let late_id = late.claim.event_id;
        match queue.push(late) {
            Err(back) => assert_eq!(back.claim.event_id, late_id),
            Ok(()) => panic!("a closed queue took a completion"),
        }
        assert!(queue.take().is_empty() && queue.close().is_empty());
    }

    #[test]
    fn lanes_are_held_only_when_every_connected_lane_is_in_an_old_batch() {
        let lanes = LaneBatches::new(2);
        let held = Duration::from_millis(30);
        assert!(!lanes.all_held_longer_than(held), "no lane connected");
        lanes.connected(0);
        lanes.connected(1);
        lanes.batch_started(0);
        std::thread::sleep(Duration::from_millis(40));
        assert!(!lanes.all_held_longer_than(held), "lane 1 is idle");
        lanes.batch_started(1);
        assert!(!lanes.all_held_longer_than(held), "lane 1's batch is young");
        std::thread::sleep(Duration::from_millis(40));
        assert!(lanes.all_held_longer_than(held));
        lanes.disconnected(1);
        assert!(
            lanes.all_held_longer_than(held),
            "the connected lane is held"
        );
        lanes.batch_ended(0);
        assert!(!lanes.all_held_longer_than(held));
    }
}
