//! Waking supervisors without paying for NOTIFY on every enqueue.
//!
//! A NOTIFY takes a cluster-wide lock at commit that serialises committing writers. A
//! supervisor that is busy claiming does not need it: it will claim again anyway. So shared
//! memory records, per database, since when the last claim there came back empty (some
//! supervisor is about to sleep), and an enqueueing transaction sends the generic
//! `picloud_wake` notification at commit only while that mark is up and fresh. The mark is
//! read in the pre-commit callback, as late as possible, so that a supervisor that went idle
//! while the transaction ran still gets woken. The small remaining window (mark raised between
//! our pre-commit and our commit becoming visible) is closed by the supervisor re-claiming once
//! shortly after going idle, and in the worst case by its poll interval.
//!
//! An idle supervisor claims again at every poll interval, which refreshes the mark; a mark
//! older than `IDLE_MARK_TTL_MS` belongs to a supervisor that has gone away, and is ignored, so
//! a stopped supervisor does not leave every enqueue paying for a notification nobody hears.
//!
//! The payload says which claimer the events are for (`WAKE_PAYLOADS`): "sql" when a sql lane
//! takes every one of them, "http" when an http lane does, empty for anything else. Every
//! listening connection receives every notification, but a supervisor only sends the claimer
//! named to look for work: on an idle machine the looks of the others (a claim, an http lane's
//! lock) competed for the cores with the lane that runs the handler, and made the handler start
//! about 0.8 ms later (L1, docs/benchmarks.md). A transaction that enqueues for several
//! claimers sends one notification for each.
//!
//! A transaction whose only sql-lane event is unordered names it: "sql <app id> <event id>".
//! The woken lane locks that event by its key (picloud_lock_sql_lane_event_for_run) instead of
//! walking the queue's apps for a batch, which was the larger part of the time between the
//! wake-up and the handler's start. Older supervisors read any payload they do not know as the
//! empty one. Only idle supervisors are notified at all, so naming events costs a busy queue
//! nothing, and a transaction names at most one.

use pgrx::prelude::*;
use pgrx::{
    pg_shmem_init, register_xact_callback, PGRXSharedMemory, PgAtomic, PgXactCallbackEvent,
};
use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};

/// The channel supervisors LISTEN on. Postgres coalesces duplicate notifications (the same
/// payload) within a transaction, so a transaction sends at most one per payload.
pub const WAKE_CHANNEL: &str = "picloud_wake";

/// Whom a transaction's enqueues are for, as a set of bits: the wake-up payloads it sends at
/// commit. Anything not known to be for a lane is `ANY`, which wakes every claimer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct WakeFor(u8);

impl WakeFor {
    pub const ANY: WakeFor = WakeFor(1);
    pub const SQL_LANE: WakeFor = WakeFor(2);
    pub const HTTP_LANE: WakeFor = WakeFor(4);
}

/// Each wake-up target and its payload; supervisor/src/wake.rs reads the same words (a unit
/// test there checks them against this list), and treats any other payload as empty.
pub const WAKE_PAYLOADS: [(WakeFor, &str); 3] = [
    (WakeFor::ANY, ""),
    (WakeFor::SQL_LANE, "sql"),
    (WakeFor::HTTP_LANE, "http"),
];

/// The payloads to send for the targets in `pending`: the empty one alone when `ANY` is among
/// them (it wakes every claimer), else one per lane kind; the sql lane's names `lone` when
/// that is the transaction's one sql-lane event.
fn payloads(pending: u8, lone: Lone) -> impl Iterator<Item = String> {
    let any = pending & WakeFor::ANY.0 != 0;
    WAKE_PAYLOADS
        .iter()
        .filter(move |(target, _)| pending & target.0 != 0 && (!any || *target == WakeFor::ANY))
        .map(move |(target, payload)| match (*target, lone) {
            (WakeFor::SQL_LANE, Lone::One(app, event)) => format!("{payload} {app} {event}"),
            _ => (*payload).to_owned(),
        })
}

/// The sql-lane events of the current transaction: none yet, exactly one that a lane may lock
/// by its key (app id, event id), or more (or one that must be found the usual way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lone {
    None,
    One(pgrx::Uuid, pgrx::Uuid),
    Many,
}

impl Lone {
    /// After one more sql-lane event (`event` when a lane may lock it by its key).
    fn and(self, event: Option<(pgrx::Uuid, pgrx::Uuid)>) -> Lone {
        match (self, event) {
            (Lone::None, Some((app, event))) => Lone::One(app, event),
            _ => Lone::Many,
        }
    }
}

/// Databases tracked at once; a database that finds every slot taken by a fresh idle mark is
/// untracked, and its enqueues always notify (see `IdleBoard::slot`).
const DATABASE_SLOTS: usize = 64;

/// How long an idle mark stays valid without being refreshed by another empty claim. Longer
/// than any sensible poll interval.
const IDLE_MARK_TTL_MS: i64 = 60_000;

/// Per database: its oid (0 = free slot) and since when its supervisors are idle, in ms on
/// Postgres' clock (0 = busy).
pub struct IdleBoard {
    database: [AtomicU32; DATABASE_SLOTS],
    idle_since_ms: [AtomicI64; DATABASE_SLOTS],
}

// SAFETY: only atomics, no pointers: valid in shared memory and across processes.
unsafe impl PGRXSharedMemory for IdleBoard {}

impl IdleBoard {
    const fn new() -> IdleBoard {
        IdleBoard {
            database: [const { AtomicU32::new(0) }; DATABASE_SLOTS],
            idle_since_ms: [const { AtomicI64::new(0) }; DATABASE_SLOTS],
        }
    }

    /// The slot of a database; with `create`, takes a free slot for it if it has none, or
    /// else one that holds no fresh idle mark. Slots are never given back (a database may be
    /// dropped while its supervisors are busy), so without taking over, a cluster that has
    /// seen more than `DATABASE_SLOTS` databases would leave every newer one untracked. The
    /// database that loses its slot is untracked until its next claim takes one again, and an
    /// untracked database's enqueues always notify: safe, only a little slower.
    fn slot(&self, database: u32, create: bool) -> Option<usize> {
        if let Some(slot) = self
            .database
            .iter()
            .position(|d| d.load(Ordering::Acquire) == database)
        {
            return Some(slot);
        }
        if !create {
            return None;
        }
        for (slot, d) in self.database.iter().enumerate() {
            match d.compare_exchange(0, database, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(slot),
                // Another backend took this slot for the same database meanwhile.
                Err(current) if current == database => return Some(slot),
                Err(_) => {}
            }
        }
        let now = now_ms();
        for (slot, d) in self.database.iter().enumerate() {
            let since = self.idle_since_ms[slot].load(Ordering::Acquire);
            if since != 0 && now - since < IDLE_MARK_TTL_MS {
                continue;
            }
            let holder = d.load(Ordering::Acquire);
            if d.compare_exchange(holder, database, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Some(slot);
            }
        }
        None
    }
}

// SAFETY: the name is unique to picloud within this cluster's shared memory.
static IDLE_BOARD: PgAtomic<IdleBoard> = unsafe { PgAtomic::new(c"picloud_idle_board") };

thread_local! {
    /// Local transaction id for which the pre-commit check is already registered, so that a
    /// transaction enqueueing many events registers it once.
    static REGISTERED_FOR: Cell<u32> = const { Cell::new(0) };
    /// The `WakeFor` bits of that transaction's enqueues so far.
    static PENDING: Cell<u8> = const { Cell::new(0) };
    /// Its sql-lane events so far.
    static LONE: Cell<Lone> = const { Cell::new(Lone::None) };
}

pub fn init_shared_memory() {
    pg_shmem_init!(IDLE_BOARD = IdleBoard::new());
}

fn current_local_xid() -> u32 {
    // SAFETY: MyProc is set for every backend before any SQL function can run.
    unsafe { (*pg_sys::MyProc).lxid }
}

fn current_database() -> u32 {
    // SAFETY: MyDatabaseId is set once the backend has connected to a database.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

fn now_ms() -> i64 {
    // SAFETY: reads the system clock as a Postgres timestamp (microseconds).
    let micros = unsafe { pg_sys::GetCurrentTimestamp() };
    micros / 1000
}

/// Is some supervisor of the current database idle, by a mark fresh enough to trust? (An
/// enqueue also asks before it spends a lookup on naming the lane its event is for.)
pub fn supervisor_idle_here() -> bool {
    let board = IDLE_BOARD.get();
    match board.slot(current_database(), false) {
        Some(slot) => {
            let since = board.idle_since_ms[slot].load(Ordering::Acquire);
            since != 0 && now_ms() - since < IDLE_MARK_TTL_MS
        }
        // Untracked because every slot is taken: notify, correctness first.
        None => board
            .database
            .iter()
            .all(|d| d.load(Ordering::Acquire) != 0),
    }
}

fn notify_supervisors(payload: String) {
    let channel = WAKE_CHANNEL.into_datum();
    let payload = payload.into_datum();
    if let (Some(channel), Some(payload)) = (channel, payload) {
        // SAFETY: pg_notify takes two non-null text arguments, which we pass; it only queues the
        // notification, which Postgres delivers once this transaction has committed.
        unsafe {
            pgrx::direct_function_call_as_datum(pg_sys::pg_notify, &[Some(channel), Some(payload)]);
        }
    }
}

/// Arranges for supervisors to be woken when the current transaction commits, if any of them
/// is idle at that moment (internal; called by every enqueue path). Returns true: it returns a
/// value only so that PL/pgSQL can call it as a cheap expression instead of a query.
#[pg_extern(volatile, parallel_unsafe, name = "_wake_at_commit")]
pub fn picloud_wake_at_commit() -> bool {
    wake_at_commit(WakeFor::ANY);
    true
}

/// `_wake_at_commit` for events known to be for `target`.
pub fn wake_at_commit(target: WakeFor) {
    wake_at_commit_for(target, None);
}

/// `wake_at_commit` for one event for `target`; `event` (app id, event id) when it is for a sql
/// lane that may lock it by its key: an unordered event due now.
pub fn wake_at_commit_for(target: WakeFor, event: Option<(pgrx::Uuid, pgrx::Uuid)>) {
    let lxid = current_local_xid();
    if REGISTERED_FOR.with(|registered| registered.replace(lxid)) != lxid {
        PENDING.with(|pending| pending.set(0));
        LONE.with(|lone| lone.set(Lone::None));
        register_xact_callback(PgXactCallbackEvent::PreCommit, || {
            let pending = PENDING.with(|pending| pending.replace(0));
            let lone = LONE.with(|lone| lone.replace(Lone::None));
            if supervisor_idle_here() {
                payloads(pending, lone).for_each(notify_supervisors);
            }
        });
    }
    PENDING.with(|pending| pending.set(pending.get() | target.0));
    if target == WakeFor::SQL_LANE {
        LONE.with(|lone| lone.set(lone.get().and(event)));
    }
}

/// Records the outcome of a claim in the current database: an empty claim means its
/// supervisor is about to wait for a notification (internal; called by `picloud_claim`).
#[pg_extern(volatile, parallel_unsafe, name = "_note_claim")]
pub fn picloud_note_claim(claimed: i32) {
    let board = IDLE_BOARD.get();
    if let Some(slot) = board.slot(current_database(), true) {
        let since = if claimed == 0 { now_ms().max(1) } else { 0 };
        board.idle_since_ms[slot].store(since, Ordering::Release);
    }
}

/// Whether enqueues in this database currently send a wake-up notification (some
/// supervisor here is idle).
#[pg_extern(volatile, parallel_safe)]
pub fn picloud_supervisor_idle() -> bool {
    supervisor_idle_here()
}

#[cfg(test)]
mod payload_tests {
    use super::*;

    #[test]
    fn one_payload_per_lane_kind_and_the_empty_one_alone_for_anything_else() {
        let sent = |targets: &[WakeFor]| -> Vec<String> {
            payloads(targets.iter().fold(0, |bits, t| bits | t.0), Lone::None).collect()
        };
        assert_eq!(sent(&[]), Vec::<String>::new());
        assert_eq!(sent(&[WakeFor::SQL_LANE]), ["sql"]);
        assert_eq!(sent(&[WakeFor::HTTP_LANE]), ["http"]);
        assert_eq!(
            sent(&[WakeFor::SQL_LANE, WakeFor::HTTP_LANE]),
            ["sql", "http"]
        );
        assert_eq!(sent(&[WakeFor::SQL_LANE, WakeFor::ANY]), [""]);
        assert_eq!(sent(&[WakeFor::ANY]), [""]);
    }

    #[test]
    fn a_lone_sql_lane_event_is_named_and_only_in_the_sql_lanes_payload() {
        let app = pgrx::Uuid::from_bytes([1; 16]);
        let event = pgrx::Uuid::from_bytes([2; 16]);
        let lone = Lone::None.and(Some((app, event)));
        assert_eq!(lone, Lone::One(app, event));
        let bits = WakeFor::SQL_LANE.0 | WakeFor::HTTP_LANE.0;
        assert_eq!(
            payloads(bits, lone).collect::<Vec<_>>(),
            [
                "sql 01010101-0101-0101-0101-010101010101 02020202-0202-0202-0202-020202020202",
                "http"
            ]
        );
        // A second sql-lane event, or one that must be found the usual way: no name.
        assert_eq!(lone.and(Some((app, event))), Lone::Many);
        assert_eq!(Lone::None.and(None), Lone::Many);
        assert_eq!(Lone::Many.and(Some((app, event))), Lone::Many);
        let any = bits | WakeFor::ANY.0;
        assert_eq!(payloads(any, lone).collect::<Vec<_>>(), [""]);
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;
    use std::sync::atomic::Ordering;

    /// One test for the shared board, so that its steps never interleave with each other (the
    /// pgrx tests share one database, hence one slot).
    #[pg_test]
    fn the_idle_board() {
        // Claims raise and lower the idle flag. Other tests claim in this database at the same
        // time and move the same flag, so each step is tried until no claim came in between.
        let flag_after = |claimed: i32| -> Option<bool> {
            Spi::run(&format!("SELECT picloud._note_claim({claimed})")).expect("note a claim");
            Spi::get_one::<bool>("SELECT picloud.picloud_supervisor_idle()")
                .ok()
                .flatten()
        };
        let settles = |claimed: i32, idle: bool| (0..50).any(|_| flag_after(claimed) == Some(idle));
        assert!(settles(0, true), "an empty claim raises the flag");
        assert!(settles(5, false), "a busy claim lowers it");

        // _wake_at_commit may be called many times in one transaction.
        Spi::run("SELECT picloud._wake_at_commit() FROM generate_series(1, 1000)").expect("wake");
        assert!(settles(0, true), "and it stays usable");

        // A full board gives this database a slot, taken from one without a fresh idle mark:
        // every slot held by other (made-up) databases, busy but for one freshly idle.
        let board = super::IDLE_BOARD.get();
        let saved: Vec<(u32, i64)> = board
            .database
            .iter()
            .zip(board.idle_since_ms.iter())
            .map(|(d, since)| (d.load(Ordering::Acquire), since.load(Ordering::Acquire)))
            .collect();
        for (i, (d, since)) in board
            .database
            .iter()
            .zip(board.idle_since_ms.iter())
            .enumerate()
        {
            d.store(4_000_000_000 - i as u32, Ordering::Release);
            since.store(if i == 0 { super::now_ms() } else { 0 }, Ordering::Release);
        }
        let here = super::current_database();
        assert_eq!(board.slot(here, false), None);
        let slot = board.slot(here, true);
        assert!(slot.is_some_and(|slot| slot != 0), "{slot:?}");
        assert_eq!(
            board.slot(4_000_000_000, false),
            Some(0),
            "the fresh mark stays"
        );
        assert!(settles(0, true), "the slot taken serves this database");
        for ((d, since), (database, idle)) in board
            .database
            .iter()
            .zip(board.idle_since_ms.iter())
            .zip(saved)
        {
            d.store(database, Ordering::Release);
            since.store(idle, Ordering::Release);
        }
    }
}
