//! The supervisor's counters, gauges and histograms, and their rendering in the
//! Prometheus text exposition format (version 0.0.4).
//!
//! Every value is an atomic that the code paths bump as things happen; rendering only
//! loads them, so a scrape takes no lock that claiming or handlers could wait on. The
//! counters are totals since start; the periodic summary log line (`summary`) reports
//! their differences.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::health::DispatcherState;

/// Handler kinds, the `kind` label. `unknown` is an event whose script no longer exists
/// (or has a kind this supervisor does not run), or a claimed row that could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Sql,
    Http,
    Command,
    Unknown,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Sql, Kind::Http, Kind::Command, Kind::Unknown];

    pub fn of(handler_kind: Option<&str>) -> Kind {
        match handler_kind {
            Some("sql") => Kind::Sql,
            Some("http") => Kind::Http,
            Some("command") => Kind::Command,
            _ => Kind::Unknown,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Sql => "sql",
            Kind::Http => "http",
            Kind::Command => "command",
            Kind::Unknown => "unknown",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Which database connection a reconnect was for, the `connection` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connection {
    /// The dispatcher's claim-and-LISTEN connection.
    Dispatcher,
    /// One of the executor pool's connections.
    Executor,
    /// A sql lane's connection.
    Lane,
}

impl Connection {
    const ALL: [Connection; 3] = [
        Connection::Dispatcher,
        Connection::Executor,
        Connection::Lane,
    ];

    fn label(self) -> &'static str {
        match self {
            Connection::Dispatcher => "dispatcher",
            Connection::Executor => "executor",
            Connection::Lane => "lane",
        }
    }
}

/// A monotonic count. Relaxed ordering: each value stands alone, nothing is published
/// through it.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One counter per handler kind.
#[derive(Default)]
pub struct PerKind([Counter; 4]);

impl PerKind {
    pub fn add(&self, kind: Kind, n: u64) {
        self.0[kind.index()].add(n);
    }

    pub fn get(&self, kind: Kind) -> u64 {
        self.0[kind.index()].get()
    }

    /// Summed over kinds.
    pub fn total(&self) -> u64 {
        self.0.iter().map(Counter::get).sum()
    }
}

/// Upper bounds of the handler duration buckets, in microseconds (1 ms to 30 s).
const DURATION_BOUNDS_US: [u64; 14] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000, 30_000_000,
];
const MICROS_PER_SECOND: f64 = 1_000_000.0;

/// Upper bounds of the claim batch size buckets, in rows. 0 counts the empty claims;
/// 1024 is the largest batch --concurrency allows.
const BATCH_BOUNDS: [u64; 12] = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

/// A histogram over whole-number observations (`units`), shown divided by `scale`
/// (microseconds shown as seconds, say). Buckets are kept per bucket and made
/// cumulative when rendered, so one observation is a single increment.
pub struct Histogram {
    bounds: &'static [u64],
    scale: f64,
    /// One per bound, plus the last one for everything above the largest bound (+Inf).
    buckets: Vec<AtomicU64>,
    sum: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [u64], scale: f64) -> Histogram {
        Histogram {
            bounds,
            scale,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, units: u64) {
        let index = self
            .bounds
            .iter()
            .position(|bound| units <= *bound)
            .unwrap_or(self.bounds.len());
        if let Some(bucket) = self.buckets.get(index) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.sum.fetch_add(units, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, elapsed: Duration) {
        self.observe(elapsed.as_micros().min(u128::from(u64::MAX)) as u64);
    }

    /// The cumulative counts, one per bound and then +Inf. The last one is the count,
    /// so `_count` always equals the +Inf bucket, even while observations come in.
    fn cumulative(&self) -> Vec<u64> {
        let mut running = 0;
        self.buckets
            .iter()
            .map(|bucket| {
                running += bucket.load(Ordering::Relaxed);
                running
            })
            .collect()
    }
}

pub struct Metrics {
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
    dispatcher_reconnects: Counter,
    executor_reconnects: Counter,
    lane_reconnects: Counter,
    /// sql lane transactions that committed.
    pub lane_batches: Counter,
    /// Events of rolled-back sql lane batches, sent back to the ordinary claim path.
    pub lane_fallbacks: Counter,
    /// sql lane connections up now (the dispatcher leaves lane events to them while > 0).
    pub lanes_connected: AtomicU64,
    /// Events running now (each holds one executor slot).
    busy: AtomicU64,
    executor_slots: u64,
    handler_duration: [Histogram; 4],
    pub claim_batch_size: Histogram,
    pub dispatcher: DispatcherState,
}

/// Counts an event as running for as long as it lives.
pub struct Busy<'a> {
    metrics: &'a Metrics,
    events: u64,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.metrics.busy.fetch_sub(self.events, Ordering::Relaxed);
    }
}

impl Metrics {
    pub fn new(executor_slots: usize) -> Metrics {
        let duration = || Histogram::new(&DURATION_BOUNDS_US, MICROS_PER_SECOND);
        Metrics {
            claimed: PerKind::default(),
            completed: PerKind::default(),
            failed: PerKind::default(),
            dead_lettered: PerKind::default(),
            released: PerKind::default(),
            unreported: PerKind::default(),
            lease_renewals: Counter::default(),
            lease_lost: Counter::default(),
            dispatcher_reconnects: Counter::default(),
            executor_reconnects: Counter::default(),
            lane_reconnects: Counter::default(),
            lane_batches: Counter::default(),
            lane_fallbacks: Counter::default(),
            lanes_connected: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            executor_slots: executor_slots as u64,
            handler_duration: [duration(), duration(), duration(), duration()],
            claim_batch_size: Histogram::new(&BATCH_BOUNDS, 1.0),
            dispatcher: DispatcherState::new(),
        }
    }

    pub fn reconnect(&self, connection: Connection) {
        match connection {
            Connection::Dispatcher => self.dispatcher_reconnects.add(1),
            Connection::Executor => self.executor_reconnects.add(1),
            Connection::Lane => self.lane_reconnects.add(1),
        }
    }

    fn reconnects(&self, connection: Connection) -> u64 {
        match connection {
            Connection::Dispatcher => self.dispatcher_reconnects.get(),
            Connection::Executor => self.executor_reconnects.get(),
            Connection::Lane => self.lane_reconnects.get(),
        }
    }

    /// Marks `events` events as running until the returned guard is dropped.
    pub fn busy(&self, events: usize) -> Busy<'_> {
        let events = events as u64;
        self.busy.fetch_add(events, Ordering::Relaxed);
        Busy {
            metrics: self,
            events,
        }
    }

    pub fn handler_duration(&self, kind: Kind) -> &Histogram {
        &self.handler_duration[kind.index()]
    }

    /// The whole exposition, in the text format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let kinds = |out: &mut String, name: &str, values: &PerKind| {
            for kind in Kind::ALL {
                sample(out, name, &[("kind", kind.label())], values.get(kind));
            }
        };

        family(
            &mut out,
            "picloud_up",
            "gauge",
            "1 while the supervisor runs.",
        );
        sample(&mut out, "picloud_up", &[], 1);
        family(
            &mut out,
            "picloud_build_info",
            "gauge",
            "Always 1; the version label says which supervisor this is.",
        );
        sample(
            &mut out,
            "picloud_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1,
        );

        let per_kind = [
            (
                "picloud_events_claimed_total",
                "Outbox rows claimed, by handler kind.",
                &self.claimed,
            ),
            (
                "picloud_events_completed_total",
                "Events completed (reported with picloud_complete or committed by a sql handler).",
                &self.completed,
            ),
            (
                "picloud_events_failed_total",
                "Handler failures reported with picloud_fail, retried or dead-lettered.",
                &self.failed,
            ),
            (
                "picloud_events_dead_lettered_total",
                "Failures the database turned into dead letters (a subset of failed).",
                &self.dead_lettered,
            ),
            (
                "picloud_events_released_total",
                "Events given back to the queue at shutdown without counting an attempt.",
                &self.released,
            ),
            (
                "picloud_events_unreported_total",
                "Events whose outcome could not be reported; their leases expire and they run again.",
                &self.unreported,
            ),
        ];
        for (name, help, values) in per_kind {
            family(&mut out, name, "counter", help);
            kinds(&mut out, name, values);
        }

        for (name, help, value) in [
            (
                "picloud_sql_lane_batches_total",
                "sql lane transactions that committed (their events count as claimed and completed).",
                self.lane_batches.get(),
            ),
            (
                "picloud_sql_lane_fallbacks_total",
                "Events of rolled-back sql lane batches, run again through ordinary claims.",
                self.lane_fallbacks.get(),
            ),
        ] {
            family(&mut out, name, "counter", help);
            sample(&mut out, name, &[], value);
        }

        family(
            &mut out,
            "picloud_lease_renewals_total",
            "counter",
            "Leases extended while an http or command handler ran.",
        );
        sample(
            &mut out,
            "picloud_lease_renewals_total",
            &[],
            self.lease_renewals.get(),
        );
        family(
            &mut out,
            "picloud_lease_lost_total",
            "counter",
            "Events abandoned because another worker held their lease by then.",
        );
        sample(
            &mut out,
            "picloud_lease_lost_total",
            &[],
            self.lease_lost.get(),
        );
        family(
            &mut out,
            "picloud_db_reconnects_total",
            "counter",
            "Database connections lost or that could not be opened, each followed by a new attempt.",
        );
        for connection in Connection::ALL {
            sample(
                &mut out,
                "picloud_db_reconnects_total",
                &[("connection", connection.label())],
                self.reconnects(connection),
            );
        }
        family(
            &mut out,
            "picloud_db_connected",
            "gauge",
            "1 while the dispatcher's claim connection is up.",
        );
        sample(
            &mut out,
            "picloud_db_connected",
            &[],
            u8::from(self.dispatcher.is_connected()),
        );
        family(
            &mut out,
            "picloud_executors_busy",
            "gauge",
            "Events running now; at most picloud_executor_slots.",
        );
        sample(
            &mut out,
            "picloud_executors_busy",
            &[],
            self.busy.load(Ordering::Relaxed),
        );
        family(
            &mut out,
            "picloud_executor_slots",
            "gauge",
            "Events that may run at once (--concurrency).",
        );
        sample(&mut out, "picloud_executor_slots", &[], self.executor_slots);

        let name = "picloud_handler_duration_seconds";
        family(
            &mut out,
            name,
            "histogram",
            "Time from the start of an event's execution to its reported completion or failure. \
             Events run together in one sql batch each count the batch's time.",
        );
        for kind in Kind::ALL {
            histogram(
                &mut out,
                name,
                &[("kind", kind.label())],
                self.handler_duration(kind),
            );
        }
        let name = "picloud_claim_batch_size";
        family(
            &mut out,
            name,
            "histogram",
            "Rows returned per claim, empty claims included.",
        );
        histogram(&mut out, name, &[], &self.claim_batch_size);
        out
    }
}

/// The HELP and TYPE lines that open a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    // HELP text escapes only backslash and newline (format 0.0.4).
    let help = help.replace('\\', r"\\").replace('\n', r"\n");
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (key, value)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(key);
            out.push_str("=\"");
            push_label_value(out, value);
            out.push('"');
        }
        out.push('}');
    }
    // Writing to a String cannot fail.
    let _ = writeln!(out, " {value}");
}

/// Label values escape backslash, double quote and newline.
fn push_label_value(out: &mut String, value: &str) {
    for ch in value.chars() {
        match ch {
            '\\' => out.push_str(r"\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str(r"\n"),
            _ => out.push(ch),
        }
    }
}

fn histogram(out: &mut String, name: &str, labels: &[(&str, &str)], histogram: &Histogram) {
    let cumulative = histogram.cumulative();
    let bucket_name = format!("{name}_bucket");
    for (i, count) in cumulative.iter().enumerate() {
        let le = match histogram.bounds.get(i) {
            Some(bound) => (*bound as f64 / histogram.scale).to_string(),
            None => "+Inf".to_owned(),
        };
        let mut with_le = labels.to_vec();
        with_le.push(("le", &le));
        sample(out, &bucket_name, &with_le, count);
    }
    let sum = histogram.sum.load(Ordering::Relaxed) as f64 / histogram.scale;
    sample(out, &format!("{name}_sum"), labels, sum);
    let count = cumulative.last().copied().unwrap_or(0);
    sample(out, &format!("{name}_count"), labels, count);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_the_count() {
        let h = Histogram::new(&BATCH_BOUNDS, 1.0);
        for rows in [0, 0, 1, 3, 16, 5000] {
            h.observe(rows);
        }
        let mut out = String::new();
        histogram(&mut out, "b", &[], &h);
        let buckets = lines_of(&out, "b_bucket");
        assert_eq!(buckets.len(), BATCH_BOUNDS.len() + 1);
        assert_eq!(buckets[0], "b_bucket{le=\"0\"} 2");
        assert_eq!(buckets[1], "b_bucket{le=\"1\"} 3");
        assert_eq!(buckets[2], "b_bucket{le=\"2\"} 3");
        assert_eq!(buckets[3], "b_bucket{le=\"4\"} 4");
        assert_eq!(buckets[5], "b_bucket{le=\"16\"} 5");
        assert_eq!(buckets[11], "b_bucket{le=\"1024\"} 5");
        assert_eq!(buckets[12], "b_bucket{le=\"+Inf\"} 6");
        assert!(out.contains("\nb_sum 5020\n"));
        assert!(out.ends_with("b_count 6\n"));
        let counts: Vec<u64> = buckets
            .iter()
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn durations_are_shown_in_seconds() {
        let h = Histogram::new(&DURATION_BOUNDS_US, MICROS_PER_SECOND);
        h.observe_duration(Duration::from_micros(1_000));
        h.observe_duration(Duration::from_millis(1_500));
        h.observe_duration(Duration::from_secs(60));
        let mut out = String::new();
        histogram(&mut out, "d", &[("kind", "sql")], &h);
        assert!(out.starts_with("d_bucket{kind=\"sql\",le=\"0.001\"} 1\n"));
        assert!(out.contains("d_bucket{kind=\"sql\",le=\"0.0025\"} 1\n"));
        assert!(out.contains("d_bucket{kind=\"sql\",le=\"1\"} 1\n"));
        assert!(out.contains("d_bucket{kind=\"sql\",le=\"2.5\"} 2\n"));
        assert!(out.contains("d_bucket{kind=\"sql\",le=\"30\"} 2\n"));
        assert!(out.contains("d_bucket{kind=\"sql\",le=\"+Inf\"} 3\n"));
        assert!(out.contains("d_sum{kind=\"sql\"} 61.501\n"));
        assert!(out.contains("d_count{kind=\"sql\"} 3\n"));
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut out = String::new();
        sample(&mut out, "m", &[("a", "x\\y\"z\nw"), ("b", "plain")], 7);
        assert_eq!(out, "m{a=\"x\\\\y\\\"z\\nw\",b=\"plain\"} 7\n");
        let mut out = String::new();
        family(&mut out, "m", "counter", "back\\slash \"quotes\"\nline");
        assert_eq!(
            out,
            "# HELP m back\\\\slash \"quotes\"\\nline\n# TYPE m counter\n"
        );
    }

    #[test]
    fn every_family_has_help_and_type_and_its_samples() {
        let metrics = Metrics::new(4);
        metrics.claimed.add(Kind::Sql, 3);
        metrics.completed.add(Kind::Sql, 2);
        metrics.failed.add(Kind::Http, 1);
        metrics.reconnect(Connection::Dispatcher);
        metrics
            .handler_duration(Kind::Sql)
            .observe_duration(Duration::from_millis(3));
        metrics.claim_batch_size.observe(3);
        let busy = metrics.busy(2);
        let text = metrics.render();
        drop(busy);
        for name in [
            "picloud_up",
            "picloud_build_info",
            "picloud_events_claimed_total",
            "picloud_events_completed_total",
            "picloud_events_failed_total",
            "picloud_lease_renewals_total",
            "picloud_lease_lost_total",
            "picloud_db_reconnects_total",
            "picloud_executors_busy",
            "picloud_handler_duration_seconds",
            "picloud_claim_batch_size",
        ] {
            assert_eq!(
                lines_of(&text, &format!("# HELP {name} ")).len(),
                1,
                "{name}"
            );
            assert_eq!(
                lines_of(&text, &format!("# TYPE {name} ")).len(),
                1,
                "{name}"
            );
        }
        assert!(text.contains("\npicloud_events_claimed_total{kind=\"sql\"} 3\n"));
        assert!(text.contains("\npicloud_events_claimed_total{kind=\"http\"} 0\n"));
        assert!(text.contains("\npicloud_events_completed_total{kind=\"sql\"} 2\n"));
        assert!(text.contains("\npicloud_events_failed_total{kind=\"http\"} 1\n"));
        assert!(text.contains("\npicloud_db_reconnects_total{connection=\"dispatcher\"} 1\n"));
        assert!(text.contains("\npicloud_executors_busy 2\n"));
        assert!(text.contains("\npicloud_executor_slots 4\n"));
        assert!(text.contains("\npicloud_handler_duration_seconds_count{kind=\"sql\"} 1\n"));
        assert!(text.contains("\npicloud_claim_batch_size_count 1\n"));
        assert!(text.contains(&format!(
            "\npicloud_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(text.contains("# TYPE picloud_handler_duration_seconds histogram\n"));
        assert!(text.ends_with('\n'));
        assert!(metrics.render().contains("\npicloud_executors_busy 0\n"));
    }
}
