//! Crash points for tests: `REWIND_FAILPOINTS=schema.before-decision,...` makes the process abort
//! (as a `kill -9` would, without unwinding or flushing) when it reaches a named point, so a test
//! can crash a coordinator or an agent exactly at a protocol's phase boundary and check recovery.
//! Unset (always, outside tests), every point is one relaxed load of a cached empty list.

use std::sync::OnceLock;

fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("REWIND_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(str::to_string)
            .collect()
    })
}

/// Aborts the process if `point` is armed.
pub fn crash_if_armed(point: &str) {
    if armed().iter().any(|name| name == point) {
        eprintln!("failpoint {point}: aborting as REWIND_FAILPOINTS asked");
        std::process::abort();
    }
}
