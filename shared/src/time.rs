//! Wall-clock time in milliseconds since the Unix epoch.
//!
//! Only the edges read the clock: the coordinator stamps a command with `now_ms()` before it is
//! proposed, so `apply()` stays deterministic.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

/// Wall-clock seconds since the Unix epoch.
pub fn now_s() -> i64 {
    i64::try_from(now_ms() / 1000).unwrap_or(i64::MAX)
}
