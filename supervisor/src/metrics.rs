//! The supervisor's counters, gauges and histograms, kept in a prometheus-client registry and
//! exposed at `/metrics` in the OpenMetrics text format (see `endpoint`). The counters are
//! totals since start; the periodic summary log line (`summary`) reports their differences.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

use crate::health::DispatcherState;

/// Handler kinds, the `kind` label. `unknown` is an event whose script no longer exists
/// (or has a kind this supervisor does not run), or a claimed row that could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Sql,
    Http,
    Command,
    Unknown,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Sql, Kind::Http, Kind::Command, Kind::Unknown];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Sql => "sql",
            Kind::Http => "http",
            Kind::Command => "command",
            Kind::Unknown => "unknown",
        }
    }
}

/// Which database connection a reconnect was for, the `connection` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Connection {
    /// The dispatcher's claim-and-LISTEN connection.
    Dispatcher,
    /// One of the executor pool's connections.
    Executor,
    /// A sql lane's connection.
    Lane,
}

impl EncodeLabelValue for Kind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.label())
    }
}

impl EncodeLabelValue for Connection {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let label = match self {
            Connection::Dispatcher => "dispatcher",
            Connection::Executor => "executor",
            Connection::Lane => "lane",
        };
        std::fmt::Write::write_str(encoder, label)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabel {
    kind: Kind,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ConnectionLabel {
    connection: Connection,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

/// The series of a family, one per handler kind, created at start (so every series exists
/// from the first scrape, at 0, and rates work at once) and kept at hand: counting an event
/// then takes no lock.
fn per_kind<M: Clone, C: prometheus_client::metrics::family::MetricConstructor<M>>(
    family: &Family<KindLabel, M, C>,
) -> [M; 4] {
    Kind::ALL.map(|kind| family.get_or_create(&KindLabel { kind }).clone())
}

/// One counter per handler kind.
pub struct PerKind([Counter; 4]);

impl PerKind {
    fn register(registry: &mut Registry, name: &str, help: &str) -> PerKind {
        let family = Family::<KindLabel, Counter>::default();
        let counters = per_kind(&family);
        registry.register(name, help, family);
        PerKind(counters)
    }

    pub fn add(&self, kind: Kind, n: u64) {
        self.0[kind as usize].inc_by(n);
    }

    pub fn get(&self, kind: Kind) -> u64 {
        self.0[kind as usize].get()
    }

    /// Summed over kinds.
    pub fn total(&self) -> u64 {
        Kind::ALL.iter().map(|kind| self.get(*kind)).sum()
    }
}

/// Handler duration buckets, in seconds (1 ms to 30 s).
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Claim batch size buckets, in rows. 0 counts the empty claims; 1024 is the largest batch
/// --concurrency allows.
const BATCH_BUCKETS: [f64; 12] = [
    0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Registers `metric` and returns a handle to it (handles share the registered value).
fn registered<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

pub struct Metrics {
    registry: Registry,
    pub claimed: PerKind,
    pub completed: PerKind,
    /// Failures reported with picloud_fail, whatever the database decided (retry or dead letter).
    pub failed: PerKind,
    /// The subset of `failed` that the database dead-lettered.
    pub dead_lettered: PerKind,
    /// Given back to the queue at shutdown without counting an attempt.
    pub released: PerKind,
    /// Outcome not reported (connection broke) or the report refused; their leases expire.
    pub unreported: PerKind,
    pub lease_renewals: Counter,
    /// Events abandoned because this worker no longer held their lease.
    pub lease_lost: Counter,
    reconnects: [Counter; 3],
    /// sql lane transactions that committed.
    pub lane_batches: Counter,
    /// Events of rolled-back sql lane batches, sent back to the ordinary claim path.
    pub lane_fallbacks: Counter,
    /// http lane transactions that committed.
    pub http_lane_batches: Counter,
    /// sql lane connections up now (the dispatcher leaves lane events to them while > 0).
    pub lanes_connected: AtomicU64,
    /// The same for the http lanes.
    pub http_lanes_connected: AtomicU64,
    /// Events running now (each holds one executor slot).
    busy: Gauge,
    db_connected: Gauge,
    handler_duration: [Histogram; 4],
    pub claim_batch_size: Histogram,
    pub dispatcher: DispatcherState,
}

/// Counts an event as running for as long as it lives.
pub struct Busy<'a> {
    metrics: &'a Metrics,
    events: i64,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.metrics.busy.dec_by(self.events);
    }
}

impl Metrics {
    pub fn new(executor_slots: usize) -> Metrics {
        let mut registry = Registry::default();
        let r = &mut registry;
        let version = VersionLabel {
            version: env!("CARGO_PKG_VERSION"),
        };
        let build_info = Family::<VersionLabel, Gauge>::default();
        build_info.get_or_create(&version).set(1);
        r.register(
            "picloud_build_info",
            "Always 1; the version label says which supervisor this is",
            build_info,
        );
        let up: Gauge = registered(
            r,
            "picloud_up",
            "1 while the supervisor runs",
            Gauge::default(),
        );
        up.set(1);
        let slots = "Events that may run at once (--concurrency)";
        let slots: Gauge = registered(r, "picloud_executor_slots", slots, Gauge::default());
        slots.set(executor_slots as i64);
        let reconnects = Family::<ConnectionLabel, Counter>::default();
        let per_connection = [
            Connection::Dispatcher,
            Connection::Executor,
            Connection::Lane,
        ]
        .map(|connection| {
            reconnects
                .get_or_create(&ConnectionLabel { connection })
                .clone()
        });
        r.register(
            "picloud_db_reconnects",
            "Database connections lost or that could not be opened, each followed by a new attempt",
            reconnects,
        );
        let durations: Family<KindLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS));
        let handler_duration = per_kind(&durations);
        r.register(
            "picloud_handler_duration_seconds",
            "Time from the start of an event's execution to its reported completion or failure; \
             events run together in one sql batch each count the batch's time",
            durations,
        );
        Metrics {
            claimed: PerKind::register(r, "picloud_events_claimed", "Outbox rows claimed"),
            completed: PerKind::register(
                r,
                "picloud_events_completed",
                "Events completed (reported with picloud_complete or committed by a sql handler)",
            ),
            failed: PerKind::register(
                r,
                "picloud_events_failed",
                "Handler failures reported with picloud_fail, retried or dead-lettered",
            ),
            dead_lettered: PerKind::register(
                r,
                "picloud_events_dead_lettered",
                "Failures the database turned into dead letters (a subset of failed)",
            ),
            released: PerKind::register(
                r,
                "picloud_events_released",
                "Events given back to the queue at shutdown without counting an attempt",
            ),
            unreported: PerKind::register(
                r,
                "picloud_events_unreported",
                "Events whose outcome could not be reported; their leases expire and they run again",
            ),
            lease_renewals: registered(
                r,
                "picloud_lease_renewals",
                "Leases extended while an http or command handler ran",
                Counter::default(),
            ),
            lease_lost: registered(
                r,
                "picloud_lease_lost",
                "Events abandoned because another worker held their lease by then",
                Counter::default(),
            ),
            reconnects: per_connection,
            lane_batches: registered(
                r,
                "picloud_sql_lane_batches",
                "sql lane transactions that committed (their events count as claimed and completed)",
                Counter::default(),
            ),
            lane_fallbacks: registered(
                r,
                "picloud_sql_lane_fallbacks",
                "Events of rolled-back sql lane batches, run again through ordinary claims",
                Counter::default(),
            ),
            http_lane_batches: registered(
                r,
                "picloud_http_lane_batches",
                "http lane transactions that committed (their events count as claimed, and as completed once delivered)",
                Counter::default(),
            ),
            lanes_connected: AtomicU64::new(0),
            http_lanes_connected: AtomicU64::new(0),
            busy: registered(
                r,
                "picloud_executors_busy",
                "Events running now; at most picloud_executor_slots",
                Gauge::default(),
            ),
            db_connected: registered(
                r,
                "picloud_db_connected",
                "1 while the dispatcher's claim connection is up",
                Gauge::default(),
            ),
            handler_duration,
            claim_batch_size: registered(
                r,
                "picloud_claim_batch_size",
                "Rows returned per claim, empty claims included",
                Histogram::new(BATCH_BUCKETS),
            ),
            dispatcher: DispatcherState::new(),
            registry,
        }
    }

    pub fn reconnect(&self, connection: Connection) {
        self.reconnects[connection as usize].inc();
    }

    /// The dispatcher's connection came up or went down: for /health and /metrics alike.
    pub fn set_db_connected(&self, connected: bool) {
        self.dispatcher.set_connected(connected);
        self.db_connected.set(i64::from(connected));
    }

    /// Marks `events` events as running until the returned guard is dropped.
    pub fn busy(&self, events: usize) -> Busy<'_> {
        let events = events as i64;
        self.busy.inc_by(events);
        Busy {
            metrics: self,
            events,
        }
    }

    pub fn observe_duration(&self, kind: Kind, elapsed: Duration) {
        self.handler_duration[kind as usize].observe(elapsed.as_secs_f64());
    }

    /// The whole exposition, in the OpenMetrics text format.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(8 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Counts a lane as connected (in `lanes_connected` or `http_lanes_connected`) for as long as
/// it lives: a lane that ends, by an error or a panic, stops counting even if nothing else runs
/// after it.
pub struct LaneConnected<'a>(&'a AtomicU64);

impl<'a> LaneConnected<'a> {
    pub fn new(count: &'a AtomicU64) -> LaneConnected<'a> {
        count.fetch_add(1, Ordering::Relaxed);
        LaneConnected(count)
    }
}

impl Drop for LaneConnected<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_exists_from_the_start() {
        let metrics = Metrics::new(4);
        let text = metrics.render().unwrap_or_default();
        for series in [
            "picloud_up 1",
            "picloud_events_claimed_total{kind=\"sql\"} 0",
            "picloud_events_claimed_total{kind=\"unknown\"} 0",
            "picloud_db_reconnects_total{connection=\"lane\"} 0",
            "picloud_executor_slots 4",
            "picloud_handler_duration_seconds_bucket{le=\"+Inf\",kind=\"http\"} 0",
            "picloud_claim_batch_size_bucket{le=\"0.0\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
    }

    #[test]
    fn counts_and_busy_guard() {
        let metrics = Metrics::new(2);
        metrics.claimed.add(Kind::Http, 3);
        metrics.claimed.add(Kind::Sql, 1);
        assert_eq!(metrics.claimed.total(), 4);
        {
            let _busy = metrics.busy(2);
            assert!(metrics
                .render()
                .unwrap_or_default()
                .contains("picloud_executors_busy 2"));
        }
        assert!(metrics
            .render()
            .unwrap_or_default()
            .contains("picloud_executors_busy 0"));
        {
            let _lane = LaneConnected::new(&metrics.lanes_connected);
            assert_eq!(metrics.lanes_connected.load(Ordering::Relaxed), 1);
        }
        assert_eq!(metrics.lanes_connected.load(Ordering::Relaxed), 0);
    }
}
