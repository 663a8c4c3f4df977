//! The cases, one module each.

pub mod b1;
pub mod cron;
pub mod e1;
pub mod e2;
pub mod f1;
pub mod g1;
pub mod l1;
pub mod m1;
pub mod o1;
pub mod p1;
pub mod p1_http;

/// Which side goes first in a run: picloud (0) first in odd runs, the baseline (1) in even.
pub fn order(run: usize) -> [usize; 2] {
    if run.is_multiple_of(2) {
        [0, 1]
    } else {
        [1, 0]
    }
}
