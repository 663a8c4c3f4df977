//! How long an idle claimer - the dispatcher or a lane - sleeps before it looks again: until
//! the next retry or scheduled event is due (no notification announces those), at most the poll
//! interval, and longer and longer while events are due that it cannot take.

use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::db;
use crate::schema::Schema;
use crate::state::{stopping, Phase};

/// After an empty claim (by the dispatcher or a lane) the extension starts sending wake-ups
/// for this worker; an event enqueued just before that would get none, so claim once more
/// shortly after to close that window. The window is one commit's WAL flush, so a few
/// milliseconds cover it.
pub const RECHECK_DELAY: Duration = Duration::from_millis(3);

/// Shortest idle wait when an unclaimed event is already due but the claim found none (another
/// claimer holds its row lock for a moment): short, but not a busy loop.
pub const DUE_BUT_LOCKED_WAIT: Duration = Duration::from_millis(5);

/// How long an idle claimer (the dispatcher or a sql lane) sleeps (a wake-up ends it sooner): until the next retry or
/// scheduled event is due - no notification announces those - and at most the poll interval.
pub async fn idle_wait(
    client: &tokio_postgres::Client,
    poll_interval: Duration,
    schema: Schema,
) -> Result<Duration, tokio_postgres::Error> {
    // A schema without picloud_next_due_at: retries and scheduled events may start up to one
    // poll interval late.
    if !schema.next_due_at() {
        return Ok(poll_interval);
    }
    let next_due = db::next_due_in_ms(client).await?;
    Ok(wait_for(next_due, poll_interval))
}

fn wait_for(next_due_in_ms: Option<f64>, poll_interval: Duration) -> Duration {
    match next_due_in_ms {
        None => poll_interval,
        Some(ms) if ms <= 0.0 || !ms.is_finite() => DUE_BUT_LOCKED_WAIT.min(poll_interval),
        // Rounded up: waking a little early would find nothing due yet.
        Some(ms) => Duration::from_millis(ms.ceil() as u64).min(poll_interval),
    }
}

/// The wait while events are due but none can be taken (sql lanes or other claimers hold them):
/// each look costs a query, so it starts at `first` and doubles up to the poll interval. New
/// work (a wake-up, a rescheduled event, a non-empty claim) starts it over.
pub struct DueWait {
    first: Duration,
    next: Duration,
    poll_interval: Duration,
}

impl DueWait {
    pub fn new(first: Duration, poll_interval: Duration) -> DueWait {
        DueWait {
            first,
            next: first,
            poll_interval,
        }
    }

    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// `wait` as `idle_wait` computed it, or the growing wait if that said "due already".
    pub fn stretch(&mut self, wait: Duration) -> Duration {
        if wait > DUE_BUT_LOCKED_WAIT {
            return wait;
        }
        let stretched = self.next.min(self.poll_interval);
        self.next = (self.next * 2).min(self.poll_interval);
        stretched
    }
}

/// How a lane (sql or http) waits between batches. After a full batch it looks again at once;
/// after a short batch (it caught up) or the first empty one, shortly (`RECHECK_DELAY`); after
/// an empty recheck it goes to the idle wait, which grows from `first_due_wait` while events
/// are due that are not for it (each look may scan past them). A wake-up ends any wait.
pub struct LaneWait {
    rechecked: bool,
    others_due: DueWait,
    poll_interval: Duration,
    schema: Schema,
}

impl LaneWait {
    pub fn new(first_due_wait: Duration, poll_interval: Duration, schema: Schema) -> LaneWait {
        LaneWait {
            rechecked: false,
            others_due: DueWait::new(first_due_wait, poll_interval),
            poll_interval,
            schema,
        }
    }

    /// Waits after a batch that locked `locked` events (`full`: as many as it could take).
    /// `wakes` end the wait early. Returns false if the supervisor began stopping meanwhile.
    pub async fn after_batch(
        &mut self,
        locked: usize,
        full: bool,
        client: &tokio_postgres::Client,
        wakes: [Option<&Notify>; 2],
        phase: &mut watch::Receiver<Phase>,
    ) -> Result<bool, tokio_postgres::Error> {
        if full || locked > 0 {
            self.others_due.reset();
        }
        if full {
            self.rechecked = false;
            return Ok(true);
        }
        let wait = if locked > 0 || !self.rechecked {
            self.rechecked = locked == 0;
            RECHECK_DELAY
        } else {
            self.rechecked = false;
            let wait = idle_wait(client, self.poll_interval, self.schema).await?;
            self.others_due.stretch(wait)
        };
        tokio::select! {
            _ = woken(wakes[0]) => self.others_due.reset(),
            _ = woken(wakes[1]) => self.others_due.reset(),
            _ = tokio::time::sleep(wait) => {}
            _ = stopping(phase) => return Ok(false),
        }
        Ok(true)
    }
}

/// Resolves when `notify` is signalled; never without one.
async fn woken(notify: Option<&Notify>) {
    match notify {
        Some(notify) => notify.notified().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_wait_follows_the_next_due_event_within_the_poll_interval() {
        let poll = Duration::from_millis(5000);
        assert_eq!(wait_for(None, poll), poll);
        assert_eq!(wait_for(Some(120.2), poll), Duration::from_millis(121));
        assert_eq!(wait_for(Some(60_000.0), poll), poll);
        assert_eq!(wait_for(Some(-3.0), poll), DUE_BUT_LOCKED_WAIT);
        assert_eq!(wait_for(Some(0.0), poll), DUE_BUT_LOCKED_WAIT);
        assert_eq!(wait_for(Some(f64::NAN), poll), DUE_BUT_LOCKED_WAIT);
        assert_eq!(
            wait_for(Some(-1.0), Duration::from_millis(2)),
            Duration::from_millis(2)
        );
    }

    #[test]
    fn due_wait_doubles_while_nothing_can_be_taken_and_starts_over() {
        let poll = Duration::from_millis(100);
        let mut due = DueWait::new(Duration::from_millis(20), poll);
        assert_eq!(
            due.stretch(Duration::from_millis(50)),
            Duration::from_millis(50)
        );
        assert_eq!(due.stretch(DUE_BUT_LOCKED_WAIT), Duration::from_millis(20));
        assert_eq!(due.stretch(DUE_BUT_LOCKED_WAIT), Duration::from_millis(40));
        assert_eq!(due.stretch(DUE_BUT_LOCKED_WAIT), Duration::from_millis(80));
        assert_eq!(due.stretch(DUE_BUT_LOCKED_WAIT), poll);
        assert_eq!(due.stretch(DUE_BUT_LOCKED_WAIT), poll);
        due.reset();
        assert_eq!(due.stretch(DUE_BUT_LOCKED_WAIT), Duration::from_millis(20));
    }
}
