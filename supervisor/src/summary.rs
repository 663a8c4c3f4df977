//! The periodic summary log line: what happened since the previous one, computed from
//! the metrics' running totals, so the log and /metrics count the same things once.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::metrics::Metrics;

pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

const NAMES: [&str; 7] = [
    "claimed",
    "completed",
    "failed",
    "dead_lettered",
    "released",
    "lease_lost",
    "unreported",
];

type Totals = [u64; NAMES.len()];

fn totals(metrics: &Metrics) -> Totals {
    [
        metrics.claimed.total(),
        metrics.completed.total(),
        metrics.failed.total(),
        metrics.dead_lettered.total(),
        metrics.released.total(),
        metrics.lease_lost.get(),
        metrics.unreported.total(),
    ]
}

/// Remembers the totals at the previous summary.
pub struct Summary {
    metrics: Arc<Metrics>,
    previous: Mutex<Totals>,
}

impl Summary {
    pub fn new(metrics: Arc<Metrics>) -> Summary {
        Summary {
            metrics,
            previous: Mutex::new([0; NAMES.len()]),
        }
    }

    /// The counts since the previous call, by name.
    fn take(&self) -> Vec<(&'static str, u64)> {
        let now = totals(&self.metrics);
        // A panic while holding the lock leaves a plain array behind, still usable.
        let mut previous = self.previous.lock().unwrap_or_else(PoisonError::into_inner);
        let deltas = NAMES
            .iter()
            .zip(now.iter().zip(previous.iter()))
            .map(|(name, (now, before))| (*name, now.saturating_sub(*before)))
            .collect();
        *previous = now;
        deltas
    }

    /// Logs the counts since the last summary, if anything happened.
    pub fn log(&self) {
        let counts = self.take();
        if counts.iter().all(|(_, n)| *n == 0) {
            return;
        }
        let count = |name: &str| {
            counts
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(0, |(_, count)| *count)
        };
        tracing::info!(
            claimed = count("claimed"),
            completed = count("completed"),
            failed = count("failed"),
            dead_lettered = count("dead_lettered"),
            released = count("released"),
            lease_lost = count("lease_lost"),
            unreported = count("unreported"),
            "summary"
        );
    }
}

/// Writes a summary every `SUMMARY_INTERVAL` until the task is aborted.
pub async fn report_periodically(summary: Arc<Summary>) {
    let start = tokio::time::Instant::now() + SUMMARY_INTERVAL;
    let mut ticker = tokio::time::interval_at(start, SUMMARY_INTERVAL);
    loop {
        ticker.tick().await;
        summary.log();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Kind;

    #[test]
    fn each_summary_counts_what_happened_since_the_previous_one() {
        let metrics = Arc::new(Metrics::new(2));
        let summary = Summary::new(Arc::clone(&metrics));
        metrics.claimed.add(Kind::Sql, 5);
        metrics.claimed.add(Kind::Http, 1);
        metrics.completed.add(Kind::Sql, 4);
        let first = summary.take();
        assert!(first.contains(&("claimed", 6)));
        assert!(first.contains(&("completed", 4)));
        assert!(first.contains(&("failed", 0)));
        metrics.failed.add(Kind::Sql, 1);
        metrics.lease_lost.inc();
        let second = summary.take();
        assert!(second.contains(&("claimed", 0)));
        assert!(second.contains(&("failed", 1)));
        assert!(second.contains(&("lease_lost", 1)));
        assert!(summary.take().iter().all(|(_, n)| *n == 0));
        // The totals themselves never go down: /metrics keeps counting.
        assert_eq!(metrics.claimed.total(), 6);
    }
}
