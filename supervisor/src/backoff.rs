//! Exponential reconnect backoff: 100 ms doubling to 10 s, with jitter so that
//! many supervisors losing the same database do not reconnect in lockstep.

use std::time::Duration;

use rand::Rng;

const INITIAL: Duration = Duration::from_millis(100);
const MAX: Duration = Duration::from_secs(10);

pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub fn new() -> Backoff {
        Backoff { next: INITIAL }
    }

    /// Called after a success, so the next failure starts again at 100 ms.
    pub fn reset(&mut self) {
        self.next = INITIAL;
    }

    /// The delay to wait before the next attempt: between half and all of the
    /// current step, after which the step doubles (up to 10 s).
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (step * 2).min(MAX);
        let half = step.as_millis() as u64 / 2;
        Duration::from_millis(half + rand::rng().random_range(0..=half))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter() {
        let mut backoff = Backoff::new();
        let first = backoff.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= INITIAL);
        for _ in 0..20 {
            let delay = backoff.next_delay();
            assert!(delay <= MAX);
        }
        let late = backoff.next_delay();
        assert!(late >= MAX / 2);
        backoff.reset();
        assert!(backoff.next_delay() <= INITIAL);
    }
}
