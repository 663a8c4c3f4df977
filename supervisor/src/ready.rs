//! Claimed events waiting for an executor slot. Every claim costs about the same whatever it
//! takes (a claim of 128 events costs what a claim of 14 does), so when handlers finish fast the
//! dispatcher claims ahead: as many more events as finished since its previous claim, up to
//! `--prefetch`. They wait here, and an executor that finishes an event takes the next one at
//! once, without waiting for the dispatcher.
//!
//! The per-app cap (`--max-running-per-app`) is kept here, on what runs: an event whose app is
//! at its cap waits while later events of other apps start. A slow app's events finish seldom,
//! so few of them are ever claimed ahead, and the claim's cap in the database stays near the
//! running cap for it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::db::Claim;

/// What a claim may take now (`Ready::room`).
#[derive(Debug, PartialEq, Eq)]
pub struct Room {
    /// Most events the claim may take.
    pub take: usize,
    /// How many of them are claimed ahead of free slots.
    pub ahead: usize,
    /// Waiting events that could start now (their app is under its cap).
    pub runnable: usize,
}

pub struct Ready {
    /// Most events of one app running at once.
    cap: usize,
    /// How long an event may wait here. Older ones no longer start (`next`); the dispatcher
    /// gives them back (`take_stale`), well before their lease could run out here.
    stale_after: Duration,
    inner: Mutex<Inner>,
}

struct Inner {
    /// False once closed: nothing more starts.
    open: bool,
    waiting: VecDeque<(Claim, Instant)>,
    running: HashMap<Uuid, usize>,
    running_total: usize,
    /// Events that ended since the last claim began.
    finished: usize,
}

impl Inner {
    /// One running event of `app_id` ended, claimed or not.
    fn stop_running(&mut self, app_id: Uuid) {
        if let Some(n) = self.running.get_mut(&app_id) {
            *n -= 1;
            if *n == 0 {
                self.running.remove(&app_id);
            }
            self.running_total -= 1;
        }
    }
}

impl Ready {
    pub fn new(cap: usize, stale_after: Duration) -> Ready {
        Ready {
            cap: cap.max(1),
            stale_after,
            inner: Mutex::new(Inner {
                open: true,
                waiting: VecDeque::new(),
                running: HashMap::new(),
                running_total: 0,
                finished: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds what a claim returned, in the claim's order (each app's head first).
    pub fn push(&self, claims: Vec<Claim>) {
        let now = Instant::now();
        self.lock()
            .waiting
            .extend(claims.into_iter().map(|claim| (claim, now)));
    }

    /// The next event to start, counted as running from now: of the first waiting event's app
    /// that is under its cap, that app's waiting event of the best priority (the first of
    /// equals). Apps take turns in claim order; priority orders an app's events, never apps.
    /// None when there is none or the queue is closed. Returns the event with when it was
    /// claimed, which its lease counts from; an event that waited too long is not handed out.
    pub fn next(&self) -> Option<(Claim, Instant)> {
        let mut inner = self.lock();
        if !inner.open {
            return None;
        }
        let cap = self.cap;
        let fresh = |since: &Instant| since.elapsed() < self.stale_after;
        let running = &inner.running;
        let first = inner.waiting.iter().position(|(claim, since)| {
            fresh(since) && running.get(&claim.app_id).copied().unwrap_or(0) < cap
        })?;
        let app_id = inner.waiting[first].0.app_id;
        let mut at = first;
        for (i, (claim, since)) in inner.waiting.iter().enumerate().skip(first + 1) {
            if claim.app_id == app_id
                && claim.priority < inner.waiting[at].0.priority
                && fresh(since)
            {
                at = i;
            }
        }
        let (claim, since) = inner.waiting.remove(at)?;
        *inner.running.entry(claim.app_id).or_insert(0) += 1;
        inner.running_total += 1;
        Some((claim, since))
    }

    /// An event of `app_id` ended (whatever its outcome).
    pub fn ended(&self, app_id: Uuid) {
        let mut inner = self.lock();
        inner.stop_running(app_id);
        inner.finished += 1;
    }

    /// An event delivered outside the claims (by an http lane) starts if its app is under its
    /// cap, and then counts as running like a claimed one, so the cap holds for both together.
    /// False when the app is at its cap or the queue is closed.
    pub fn try_start_outside(&self, app_id: Uuid) -> bool {
        let mut inner = self.lock();
        if !inner.open || inner.running.get(&app_id).copied().unwrap_or(0) >= self.cap {
            return false;
        }
        *inner.running.entry(app_id).or_insert(0) += 1;
        inner.running_total += 1;
        true
    }

    /// An event started with `try_start_outside` ended. It is not counted as finished: what a
    /// claim takes ahead follows the claimed events only.
    pub fn ended_outside(&self, app_id: Uuid) {
        self.lock().stop_running(app_id);
    }

    /// What a claim may take now (`Room`): the free slots less the events already waiting,
    /// plus twice as many as finished since the previous claim, up to `prefetch`. (Twice: when
    /// the events of a claim all finish before the next claim returns, the slots wait for it,
    /// and the next claim must take more than finished for claims to catch up.) At least the
    /// slots that are free with nothing to start: the events waiting for them may all be of
    /// apps at their cap, whose handlers may be slow, and other apps' events must still come.
    pub fn room(&self, concurrency: usize, prefetch: usize) -> Room {
        let inner = self.lock();
        let ahead = (2 * inner.finished).min(prefetch);
        let held = inner.running_total + inner.waiting.len();
        let runnable = inner
            .waiting
            .iter()
            .filter(|(claim, _)| inner.running.get(&claim.app_id).copied().unwrap_or(0) < self.cap)
            .count();
        let idle = concurrency
            .saturating_sub(inner.running_total)
            .saturating_sub(runnable);
        Room {
            take: (concurrency + ahead).saturating_sub(held).max(idle),
            ahead,
            runnable,
        }
    }

    /// A claim begins: the count of finished events starts again.
    pub fn claiming(&self) {
        self.lock().finished = 0;
    }

    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Takes out the events that have waited too long to start (their leases must not run out
    /// here: the caller gives them back to the queue).
    pub fn take_stale(&self) -> Vec<Claim> {
        let limit = self.stale_after;
        let mut inner = self.lock();
        let mut stale = Vec::new();
        let mut kept = VecDeque::with_capacity(inner.waiting.len());
        for (claim, since) in inner.waiting.drain(..) {
            if since.elapsed() > limit {
                stale.push(claim);
            } else {
                kept.push_back((claim, since));
            }
        }
        inner.waiting = kept;
        stale
    }

    /// Closes the queue for good and returns the events that never started.
    pub fn close(&self) -> Vec<Claim> {
        let mut inner = self.lock();
        inner.open = false;
        inner.waiting.drain(..).map(|(claim, _)| claim).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::test_claim;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn an_app_at_its_cap_waits_while_other_apps_start() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let ready = Ready::new(2, MINUTE);
        ready.push(vec![
            test_claim(a),
            test_claim(a),
            test_claim(a),
            test_claim(b),
        ]);
        assert_eq!(ready.next().map(|(c, _)| c.app_id), Some(a));
        assert_eq!(ready.next().map(|(c, _)| c.app_id), Some(a));
        assert_eq!(
            ready.next().map(|(c, _)| c.app_id),
            Some(b),
            "a is at its cap"
        );
        assert!(
            ready.next().is_none(),
            "a's third waits for one of a's to end"
        );
        ready.ended(a);
        assert_eq!(ready.next().map(|(c, _)| c.app_id), Some(a));
        assert_eq!(ready.waiting(), 0);
    }

    #[test]
    fn an_apps_best_priority_starts_first_and_apps_keep_their_places() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let with = |app, priority| Claim {
            priority,
            ..test_claim(app)
        };
        let ready = Ready::new(10, MINUTE);
        ready.push(vec![with(a, 5), with(b, 0), with(a, 5)]);
        // A later claim brings a more urgent event of a, and one of b more urgent still.
        let urgent = with(a, -5);
        let urgent_id = urgent.event_id;
        ready.push(vec![urgent, with(b, -100)]);
        let (first, _) = ready
            .next()
            .expect("a's turn: its first event waits longest");
        assert_eq!((first.app_id, first.event_id), (a, urgent_id));
        let order: Vec<(Uuid, i16)> = std::iter::from_fn(|| ready.next())
            .map(|(c, _)| (c.app_id, c.priority))
            .collect();
        assert_eq!(order, vec![(a, 5), (b, -100), (b, 0), (a, 5)]);
    }

    #[test]
    fn a_claim_takes_ahead_what_finished_since_the_last_one() {
        let a = Uuid::from_u128(1);
        let ready = Ready::new(14, MINUTE);
        let room = |ready: &Ready, prefetch| {
            let r = ready.room(16, prefetch);
            (r.take, r.ahead)
        };
        assert_eq!(room(&ready, 64), (16, 0), "idle: the free slots");
        ready.push((0..14).map(|_| test_claim(a)).collect());
        while ready.next().is_some() {}
        assert_eq!(room(&ready, 64), (2, 0));
        for _ in 0..14 {
            ready.ended(a);
        }
        assert_eq!(room(&ready, 64), (44, 28), "14 finished: 28 ahead");
        assert_eq!(room(&ready, 8), (24, 8), "no more than the prefetch");
        ready.claiming();
        assert_eq!(room(&ready, 64), (16, 0));
    }

    #[test]
    fn events_of_an_app_at_its_cap_leave_the_free_slots_to_claims() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let ready = Ready::new(14, MINUTE);
        ready.push((0..40).map(|_| test_claim(a)).collect());
        while ready.next().is_some() {}
        // 14 of a's run (its cap), 26 wait: more than the slots, yet two slots are free.
        assert_eq!(
            ready.room(16, 128),
            Room {
                take: 2,
                ahead: 0,
                runnable: 0
            }
        );
        ready.push(vec![test_claim(b)]);
        assert_eq!(
            ready.room(16, 128),
            Room {
                take: 1,
                ahead: 0,
                runnable: 1
            }
        );
    }

    #[test]
    fn deliveries_outside_the_claims_count_toward_the_cap() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let ready = Ready::new(2, Duration::from_secs(60));
        assert!(ready.try_start_outside(a));
        assert!(ready.try_start_outside(a));
        assert!(!ready.try_start_outside(a), "a is at its cap");
        ready.push(vec![test_claim(a), test_claim(b)]);
        let started = ready.next().map(|(claim, _)| claim.app_id);
        assert_eq!(started, Some(b), "a's claimed event waits, b's starts");
        assert!(ready.next().is_none());
        ready.ended_outside(a);
        assert_eq!(ready.next().map(|(claim, _)| claim.app_id), Some(a));
        // Ending outside is not finishing: nothing more is claimed ahead for it.
        assert_eq!(ready.room(4, 8).ahead, 0);
        ready.close();
        assert!(!ready.try_start_outside(b), "closed");
    }

    #[test]
    fn stale_events_do_not_start_and_closing_takes_the_rest() {
        let a = Uuid::from_u128(1);
        let ready = Ready::new(5, Duration::from_millis(50));
        ready.push(vec![test_claim(a), test_claim(a)]);
        assert!(ready.take_stale().is_empty());
        std::thread::sleep(Duration::from_millis(60));
        ready.push(vec![test_claim(a)]);
        assert!(ready.next().is_some(), "the fresh one starts");
        assert!(ready.next().is_none(), "the two old ones do not");
        assert_eq!(ready.take_stale().len(), 2);
        ready.push(vec![test_claim(a)]);
        assert_eq!(ready.close().len(), 1);
        ready.push(vec![test_claim(a)]);
        assert!(ready.next().is_none(), "closed: nothing starts");
    }
}
