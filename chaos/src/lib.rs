//! Fault-injection runs against real rewind clusters: real coordinator and agent processes (on
//! loopback, or each member in its own network namespace), faults injected at seeded moments, invariants checked at the end. Every run prints
//! its seed; the same seed replays the same schedule of faults (the processes' own timing still
//! varies, which is the point).
//!
//! # Layout
//! - [`rollback_faults`]: kill -9 the leader, a follower or every member, or partition the
//!   leader, while a rollback runs.
//! - [`disk_faults`]: a member's disk fills, fails (EIO) or stalls.
//! - [`invariants`]: the checks every scenario ends with.

pub mod disk_faults;
pub mod invariants;
pub mod rollback_faults;

/// How a fault ended: installed, skipped (the moment had passed), or indeterminate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    Installed,
    Skipped,
    Indeterminate,
}

/// A seed from `REWIND_CHAOS_SEED`, or a fresh one from the clock.
pub fn seed_from_env() -> u64 {
    std::env::var("REWIND_CHAOS_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|elapsed| elapsed.as_nanos() as u64)
                .unwrap_or(1)
        })
}
