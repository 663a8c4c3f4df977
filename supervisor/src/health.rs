//! The dispatcher's state as `/health` reports it: is its connection to the database up,
//! and is it still claiming. The dispatcher updates it with plain atomic stores, so a
//! health check never waits on claiming and never slows it down.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

/// Marks a timestamp that was never set.
const NEVER: u64 = u64::MAX;

pub struct DispatcherState {
    /// Origin of the millisecond timestamps below. Monotonic, so a wall-clock jump cannot
    /// make a working supervisor look stale.
    epoch: Instant,
    connected: AtomicBool,
    /// Every executor slot is busy: the dispatcher is not claiming, by design, until one frees.
    waiting_for_slot: AtomicBool,
    stopping: AtomicBool,
    /// Last sign of life of the claim loop: connected, a claim answered (even empty), or a
    /// free slot obtained after waiting for one.
    last_progress_ms: AtomicU64,
    last_claim_ms: AtomicU64,
}

/// What `/health` answers.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Healthy {
        waiting_for_slot: bool,
        last_claim_ms_ago: Option<u64>,
    },
    Unhealthy {
        reason: String,
    },
}

impl Verdict {
    pub fn is_healthy(&self) -> bool {
        matches!(self, Verdict::Healthy { .. })
    }

    /// The JSON body of the health response.
    pub fn body(&self) -> String {
        let value = match self {
            Verdict::Healthy {
                waiting_for_slot,
                last_claim_ms_ago,
            } => json!({
                "status": "ok",
                "waiting_for_executor_slot": waiting_for_slot,
                "last_claim_ms_ago": last_claim_ms_ago,
            }),
            Verdict::Unhealthy { reason } => json!({
                "status": "unavailable",
                "reason": reason,
            }),
        };
        value.to_string()
    }
}

impl DispatcherState {
    pub fn new() -> DispatcherState {
        DispatcherState {
            epoch: Instant::now(),
            connected: AtomicBool::new(false),
            waiting_for_slot: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            last_progress_ms: AtomicU64::new(NEVER),
            last_claim_ms: AtomicU64::new(NEVER),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn set_connected(&self, connected: bool) {
        if connected {
            self.last_progress_ms
                .store(self.now_ms(), Ordering::Relaxed);
        }
        self.connected.store(connected, Ordering::Relaxed);
    }

    /// A claim returned, with or without rows.
    pub fn claimed(&self) {
        let now = self.now_ms();
        self.last_claim_ms.store(now, Ordering::Relaxed);
        self.last_progress_ms.store(now, Ordering::Relaxed);
    }

    pub fn set_waiting_for_slot(&self, waiting: bool) {
        if !waiting {
            // The wait may have been long; the claim that follows needs its own time.
            self.last_progress_ms
                .store(self.now_ms(), Ordering::Relaxed);
        }
        self.waiting_for_slot.store(waiting, Ordering::Relaxed);
    }

    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub fn verdict(&self, stale_after: Duration) -> Verdict {
        self.verdict_at(Instant::now(), stale_after)
    }

    fn verdict_at(&self, now: Instant, stale_after: Duration) -> Verdict {
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let ago = |stamp: u64| (stamp != NEVER).then(|| now_ms.saturating_sub(stamp));
        if self.stopping.load(Ordering::Relaxed) {
            return Verdict::Unhealthy {
                reason: "shutting down".to_owned(),
            };
        }
        if !self.connected.load(Ordering::Relaxed) {
            return Verdict::Unhealthy {
                reason: "database unreachable: the dispatcher is connecting".to_owned(),
            };
        }
        let last_claim_ms_ago = ago(self.last_claim_ms.load(Ordering::Relaxed));
        if self.waiting_for_slot.load(Ordering::Relaxed) {
            return Verdict::Healthy {
                waiting_for_slot: true,
                last_claim_ms_ago,
            };
        }
        let limit_ms = stale_after.as_millis() as u64;
        match ago(self.last_progress_ms.load(Ordering::Relaxed)) {
            Some(progress_ago) if progress_ago <= limit_ms => Verdict::Healthy {
                waiting_for_slot: false,
                last_claim_ms_ago,
            },
            _ => Verdict::Unhealthy {
                reason: format!("no claim for more than {limit_ms} ms"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALE: Duration = Duration::from_secs(15);

    fn reason(verdict: Verdict) -> String {
        match verdict {
            Verdict::Unhealthy { reason } => reason,
            Verdict::Healthy { .. } => panic!("expected unhealthy"),
        }
    }

    #[test]
    fn unhealthy_until_connected_and_claiming() {
        let state = DispatcherState::new();
        assert!(reason(state.verdict(STALE)).contains("database unreachable"));
        state.set_connected(true);
        assert_eq!(
            state.verdict(STALE),
            Verdict::Healthy {
                waiting_for_slot: false,
                last_claim_ms_ago: None
            }
        );
        state.claimed();
        assert!(state.verdict(STALE).is_healthy());
        state.set_connected(false);
        assert!(reason(state.verdict(STALE)).contains("database unreachable"));
    }

    #[test]
    fn a_claim_loop_that_stopped_claiming_goes_stale() {
        let state = DispatcherState::new();
        state.set_connected(true);
        state.claimed();
        let later = Instant::now() + STALE + Duration::from_secs(1);
        assert_eq!(
            reason(state.verdict_at(later, STALE)),
            "no claim for more than 15000 ms"
        );
        // Waiting for a free executor slot is not claiming, on purpose: still healthy.
        state.set_waiting_for_slot(true);
        assert!(state.verdict_at(later, STALE).is_healthy());
    }

    #[test]
    fn stopping_wins() {
        let state = DispatcherState::new();
        state.set_connected(true);
        state.claimed();
        state.set_stopping();
        assert_eq!(reason(state.verdict(STALE)), "shutting down");
    }

    #[test]
    fn bodies_are_json() {
        let ok: serde_json::Value = serde_json::from_str(
            &Verdict::Healthy {
                waiting_for_slot: false,
                last_claim_ms_ago: Some(12),
            }
            .body(),
        )
        .unwrap_or_default();
        assert_eq!(ok["status"], "ok");
        assert_eq!(ok["last_claim_ms_ago"], 12);
        let bad: serde_json::Value = serde_json::from_str(
            &Verdict::Unhealthy {
                reason: "x \"y\"".to_owned(),
            }
            .body(),
        )
        .unwrap_or_default();
        assert_eq!(bad["status"], "unavailable");
        assert_eq!(bad["reason"], "x \"y\"");
    }
}
