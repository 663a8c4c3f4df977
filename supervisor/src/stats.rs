//! Counters for the periodic summary line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::log;

pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Stats {
    pub claimed: AtomicU64,
    pub completed: AtomicU64,
    /// Failures reported with picloud_fail, whatever the database decided.
    pub failed: AtomicU64,
    /// The subset of `failed` that the database dead-lettered.
    pub dead_lettered: AtomicU64,
    pub released: AtomicU64,
    pub lease_lost: AtomicU64,
    /// Events whose outcome could not be reported; their leases expire.
    pub unreported: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Logs the counts since the last summary, if anything happened, and resets them.
    pub fn log_summary(&self) {
        let take = |counter: &AtomicU64| counter.swap(0, Ordering::Relaxed);
        let counts = [
            ("claimed", take(&self.claimed)),
            ("completed", take(&self.completed)),
            ("failed", take(&self.failed)),
            ("dead_lettered", take(&self.dead_lettered)),
            ("released", take(&self.released)),
            ("lease_lost", take(&self.lease_lost)),
            ("unreported", take(&self.unreported)),
        ];
        if counts.iter().all(|(_, n)| *n == 0) {
            return;
        }
        let fields: Vec<(&str, serde_json::Value)> =
            counts.iter().map(|(name, n)| (*name, json!(n))).collect();
        log::info("summary", &fields);
    }
}

/// Writes a summary every `SUMMARY_INTERVAL` until the task is aborted.
pub async fn report_periodically(stats: Arc<Stats>) {
    let start = tokio::time::Instant::now() + SUMMARY_INTERVAL;
    let mut ticker = tokio::time::interval_at(start, SUMMARY_INTERVAL);
    loop {
        ticker.tick().await;
        stats.log_summary();
    }
}
