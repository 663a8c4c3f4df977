//! SQL-facing functions implemented in Rust. The rest of the SQL API is in `sql/`.

pub mod access;
pub mod admission;
pub mod backends;
pub mod budget;
pub mod cron;
pub mod enqueue;
pub mod event_json;
pub mod matching;
pub mod outbox;
pub mod principal;
pub mod raw;
mod sql_api_tests;
pub mod wake;
