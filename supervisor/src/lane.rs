//! The sql lanes (see sql/035_sql_lane.sql): first attempts of sql-handler events run
//! set-based, a batch per transaction, without claims. Each lane owns one connection; lane 0
//! LISTENs for wake-ups like the dispatcher and calls the other lanes in when it finds a full
//! batch, so a single new event does not wake every lane. Events whose handler fails by itself
//! are left out of the batch by the database (a savepoint each, only once a group's statement
//! failed); a batch that fails as a whole - its statement timeout, a broken connection - is
//! rolled back. Either way those events then leave the lanes (picloud_leave_sql_lane marks
//! them) for the dispatcher's claims, which run each the ordinary way (attempt counted, retried
//! or dead-lettered) and share executors fairly between apps (the per-app cap). So a handler
//! that fails, hangs or even crashes its backend leaves the lane after one try. On a schema
//! from before 0.4.0 the lane claims those events itself and hands them to the executors.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::db::{self, Claim};
use crate::executor::{self, accept_claimed};
use crate::idle::LaneWait;
use crate::metrics::{Kind, LaneConnected};
use crate::schema::Schema;
use crate::state::{connect_lane, lane_lost, Phase, Shared};
use crate::wake::{WakeConnection, WakeFor};

/// First idle wait while events are due but none is for a lane: the dispatcher is working
/// through them, and each look scans past them (see `idle::DueWait`).
const OTHERS_DUE_WAIT: Duration = Duration::from_millis(20);

/// Events that must leave the lane: those of a batch that did not commit, or those a committed
/// batch left out because their handlers failed.
struct Locked {
    app_ids: Vec<Uuid>,
    event_ids: Vec<Uuid>,
}

enum BatchError {
    /// The database refused the batch (handler error, timeout): the connection is usable.
    Refused(String),
    /// The connection broke.
    Broken(String),
}

/// Runs lane `index` until shutdown, reconnecting with backoff.
pub async fn run(shared: Arc<Shared>, index: usize, mut phase: watch::Receiver<Phase>) {
    const NAME: &str = "sql lane";
    let mut backoff = Backoff::new();
    // Events of a batch whose connection broke; sent to the claim path once connected again.
    let mut stranded: Option<Locked> = None;
    let listens = index == 0;
    loop {
        let offered = Schema::sql_lanes;
        let Some(connection) = connect_lane(
            &shared,
            NAME,
            index,
            listens.then_some(WakeFor::SqlLane),
            offered,
            &mut backoff,
            &mut phase,
        )
        .await
        else {
            return;
        };
        // Counted while this lane runs: dropped when it returns, fails or panics.
        let connected = LaneConnected::new(&shared.metrics.lanes_connected);
        shared.lane_batches.connected(index);
        let result = lane_loop(
            &shared,
            index,
            &connection,
            listens,
            &mut phase,
            &mut backoff,
            &mut stranded,
        )
        .await;
        drop(connected);
        shared.lane_batches.disconnected(index);
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
    index: usize,
    connection: &WakeConnection,
    listens: bool,
    phase: &mut watch::Receiver<Phase>,
    backoff: &mut Backoff,
    stranded: &mut Option<Locked>,
) -> Result<(), String> {
    let client = &connection.client;
    let batch = shared.config.sql_lane_batch;
    let schema = shared.pool.database().schema();
    let statements = Statements::prepare(client, schema)
        .await
        .map_err(|e| db::error_text(&e))?;
    let mut wait = LaneWait::new(OTHERS_DUE_WAIT, shared.config.poll_interval, schema);
    loop {
        if let Some(locked) = stranded.take() {
            leave_lane(shared, client, &statements, locked, phase)
                .await
                .map_err(|e| db::error_text(&e))?;
        }
        if *phase.borrow() != Phase::Running {
            return Ok(());
        }
        shared.lane_batches.batch_started(index);
        // A wake-up that named its one event: lock that event by its key (see wake.rs).
        let lone = connection
            .take_lone()
            .filter(|_| statements.lock_event.is_some());
        let ran = run_batch(shared, client, &statements, batch, lone).await;
        shared.lane_batches.batch_ended(index);
        let locked = match ran {
            Ok(Ran { locked, left }) => {
                if !left.event_ids.is_empty() {
                    tracing::debug!(
                        events = left.event_ids.len(),
                        "sql lane left events to the ordinary path"
                    );
                    leave_lane(shared, client, &statements, left, phase)
                        .await
                        .map_err(|e| db::error_text(&e))?;
                }
                locked
            }
            Err((locked, BatchError::Refused(error))) => {
                tracing::warn!(
                    events = locked.event_ids.len(),
                    error = %error,
                    "sql lane batch rolled back; its events run the ordinary way"
                );
                leave_lane(shared, client, &statements, locked, phase)
                    .await
                    .map_err(|e| db::error_text(&e))?;
                continue;
            }
            Err((locked, BatchError::Broken(e))) => {
                if !locked.event_ids.is_empty() {
                    *stranded = Some(locked);
                }
                return Err(e);
            }
        };
        backoff.reset();
        let full = locked == batch;
        if full && listens {
            // A full batch: more are probably waiting; the other lanes help.
            shared.lanes_wake.notify_waiters();
        }
        let others = (!listens).then_some(&shared.lanes_wake);
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

/// The lane's two statements, prepared once per connection: a prepared statement goes out as
/// soon as it is asked for, which is what lets the lane send a whole batch at once.
struct Statements {
    lock: Statement,
    /// picloud_lock_sql_lane_event_for_run; None on a schema without it.
    lock_event: Option<Statement>,
    run: Statement,
    /// picloud_leave_sql_lane; None on a schema from before 0.4.0.
    leave: Option<Statement>,
}

impl Statements {
    async fn prepare(client: &Client, schema: Schema) -> Result<Statements, tokio_postgres::Error> {
        Ok(Statements {
            lock: client
                .prepare("SELECT app_id, event_id FROM picloud.picloud_lock_sql_lane_for_run($1)")
                .await?,
            // Prepared where it exists: 0.4.0 schemas made before it was added lack it, and
            // only their extension's wake-ups would name an event.
            lock_event: client
                .prepare(
                    "SELECT app_id, event_id \
                     FROM picloud.picloud_lock_sql_lane_event_for_run($1, $2)",
                )
                .await
                .ok(),
            run: client
                .prepare(
                    "SELECT ran, left_app_ids, left_event_ids \
                     FROM picloud.picloud_run_sql_lane_locked()",
                )
                .await?,
            leave: if schema.leave_sql_lane() {
                Some(
                    client
                        .prepare("SELECT picloud.picloud_leave_sql_lane($1, $2)")
                        .await?,
                )
            } else {
                None
            },
        })
    }
}

/// Locks, runs and commits one batch - of the `lone` event (app id, event id) alone when
/// given; returns how many events ran. On failure returns the events it had locked (rolled
/// back, so unlocked again) with what went wrong.
async fn run_batch(
    shared: &Arc<Shared>,
    client: &Client,
    statements: &Statements,
    batch: usize,
    lone: Option<(Uuid, Uuid)>,
) -> Result<Ran, (Locked, BatchError)> {
    let nothing = || Locked {
        app_ids: Vec::new(),
        event_ids: Vec::new(),
    };
    let started = Instant::now();
    // One round trip: BEGIN, lock, run and COMMIT are sent together and answered in order
    // (prepared statements and simple queries go out when first polled, and join! polls them
    // in this order). The lock arms the run: it remembers the batch and sets the statement
    // timeout for the rest of the transaction to the shortest timeout among the batch's
    // handlers, so the whole batch must finish within it and no handler runs longer than its
    // own timeout allows; a batch that needs more is rolled back and its events run one by one,
    // each under its own timeout. If anything fails, the statements after it find the
    // transaction aborted and the COMMIT ends it as a rollback.
    let batch_size = batch as i32;
    let (lone_app, lone_event) = lone.unzip();
    let (lock, lock_params): (_, Vec<&(dyn ToSql + Sync)>) =
        match (&statements.lock_event, &lone_app, &lone_event) {
            (Some(lock_event), Some(app), Some(event)) => (lock_event, vec![app, event]),
            _ => (&statements.lock, vec![&batch_size]),
        };
    let no_params: [&(dyn ToSql + Sync); 0] = [];
    let (begun, lock, run, committed) = tokio::join!(
        client.batch_execute("BEGIN"),
        client.query(lock, &lock_params),
        client.query_one(&statements.run, &no_params),
        client.batch_execute("COMMIT")
    );
    let rows = match (begun, lock) {
        (Ok(()), Ok(rows)) => rows,
        (Err(e), _) | (_, Err(e)) => return Err((nothing(), rollback(client, &e).await)),
    };
    // What the batch locked: if it did not commit, these go the ordinary way. A row that cannot
    // be read is left out here; its event either ran and was deleted, or stays in the queue for
    // the next batch or claim.
    let mut locked = Locked {
        app_ids: Vec::with_capacity(rows.len()),
        event_ids: Vec::with_capacity(rows.len()),
    };
    for row in &rows {
        if let (Ok(app), Ok(event)) = (row.try_get::<_, Uuid>(0), row.try_get::<_, Uuid>(1)) {
            locked.app_ids.push(app);
            locked.event_ids.push(event);
        }
    }
    let row = match (run, committed) {
        (Ok(row), Ok(())) => row,
        (Err(e), _) | (_, Err(e)) => {
            let error = rollback(client, &e).await;
            return Err((locked, error));
        }
    };
    if rows.is_empty() {
        return Ok(Ran {
            locked: 0,
            left: nothing(),
        });
    }
    let (ran, left) = match (
        row.try_get::<_, i32>(0),
        row.try_get::<_, Vec<Uuid>>(1),
        row.try_get::<_, Vec<Uuid>>(2),
    ) {
        (Ok(ran), Ok(app_ids), Ok(event_ids)) => {
            (ran.max(0) as usize, Locked { app_ids, event_ids })
        }
        // Committed, but the answer is unreadable: whatever did not run is still in the
        // queue, unclaimed, and the next batch or claim takes it.
        _ => (
            0,
            Locked {
                app_ids: Vec::new(),
                event_ids: Vec::new(),
            },
        ),
    };
    let metrics = &shared.metrics;
    metrics.lane_batches.inc();
    metrics.claimed.add(Kind::Sql, ran as u64);
    metrics.completed.add(Kind::Sql, ran as u64);
    let elapsed = started.elapsed();
    for _ in 0..ran {
        metrics.observe_duration(Kind::Sql, elapsed);
    }
    Ok(Ran {
        locked: locked.event_ids.len(),
        left,
    })
}

/// What a committed batch did.
struct Ran {
    /// Events the batch locked (those that ran were completed and counted).
    locked: usize,
    /// Events whose handlers failed by themselves (or may not run): for the ordinary path.
    left: Locked,
}

/// Rolls back after `e` and says whether the connection is still usable.
async fn rollback(client: &Client, e: &tokio_postgres::Error) -> BatchError {
    if client.is_closed() {
        return classify(client, e);
    }
    match client.batch_execute("ROLLBACK").await {
        Ok(()) => BatchError::Refused(db::error_text(e)),
        Err(broken) => BatchError::Broken(db::error_text(&broken)),
    }
}

fn classify(client: &Client, e: &tokio_postgres::Error) -> BatchError {
    if client.is_closed() {
        BatchError::Broken(db::error_text(e))
    } else {
        BatchError::Refused(db::error_text(e))
    }
}

/// Takes the events of a failed batch (those still unclaimed) out of the lanes: the
/// dispatcher's claims run them the ordinary way, in turn with other apps' events. A lane that
/// handed them to executors itself would let one app's failing events fill every executor.
async fn leave_lane(
    shared: &Arc<Shared>,
    client: &Client,
    statements: &Statements,
    locked: Locked,
    phase: &mut watch::Receiver<Phase>,
) -> Result<(), tokio_postgres::Error> {
    if let Some(leave) = &statements.leave {
        let row = client
            .query_one(leave, &[&locked.app_ids, &locked.event_ids])
            .await?;
        let left: i32 = row.try_get(0).unwrap_or(0);
        shared.metrics.lane_fallbacks.inc_by(left.max(0) as u64);
        return Ok(());
    }
    claim_and_run(shared, client, locked, phase).await
}

/// Before 0.4.0: claims the events of a failed batch (those still unclaimed) and hands each to
/// an executor, which runs it the ordinary way. Waits for executor slots like the dispatcher.
async fn claim_and_run(
    shared: &Arc<Shared>,
    client: &Client,
    locked: Locked,
    phase: &mut watch::Receiver<Phase>,
) -> Result<(), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT * FROM picloud.picloud_claim_events($1, $2, $3, $4)",
            &[
                &shared.config.worker_name,
                &locked.app_ids,
                &locked.event_ids,
                &shared.config.lease_ms,
            ],
        )
        .await?;
    shared.metrics.lane_fallbacks.inc_by(rows.len() as u64);
    let claims = accept_claimed(&shared.metrics, rows.iter().map(Claim::from_row).collect());
    // They start as slots free up, as the dispatcher's claims do.
    shared.ready.push(claims);
    executor::start_waiting(shared, phase);
    Ok(())
}
