//! Non-cryptographic randomness for backoff jitter and the default worker name.
//!
//! The standard library's `RandomState` is seeded from the operating system, so
//! hashing nothing with a fresh one yields an unpredictable value without
//! pulling in a random-number crate. Nothing here needs cryptographic quality.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

pub fn u64() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(u64::from(std::process::id()));
    hasher.finish()
}
