//! Crash points for recovery tests, on tikv's `fail` crate: a binary built with the `failpoints`
//! feature and started with `REWIND_FAILPOINTS=coordinator.before-decision,...` aborts (as a
//! `kill -9` would, without unwinding or flushing) when it reaches a named point, so a test can
//! crash a coordinator or an agent exactly at a protocol's phase boundary and check recovery.
//! Without the feature (every release build) [`crash_point!`] compiles to nothing, and
//! [`setup`] refuses a `REWIND_FAILPOINTS` it could not honour rather than run without crashing.

#[doc(hidden)]
pub use fail;

/// The variable naming the points to crash at, comma-separated.
pub const VARIABLE: &str = "REWIND_FAILPOINTS";

/// The cargo features that compile the crash points into the binaries. Debug builds of the
/// binaries (the tests', the demo's) all carry them, so the two never rebuild each other's.
pub const BUILD_FEATURES: &str = "rewind-coordinator/failpoints,rewind-agent/failpoints";

/// Arms the points `REWIND_FAILPOINTS` names. Call once, first thing in `main`.
pub fn setup() -> Result<(), String> {
    arm(&std::env::var(VARIABLE).unwrap_or_default())
}

/// Arms the points named in `names`, comma-separated.
fn arm(names: &str) -> Result<(), String> {
    let names: Vec<&str> = names
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    if !fail::has_failpoints() {
        return Err(format!(
            "{VARIABLE} is set, but this binary was built without crash points: build it with \
             `--features {BUILD_FEATURES}`"
        ));
    }
    for name in names {
        // `return` runs the closure given at the point, which aborts.
        fail::cfg(name, "return").map_err(|error| format!("{VARIABLE}: {name}: {error}"))?;
    }
    Ok(())
}

/// Aborts the process at the crash point `name`.
#[doc(hidden)]
pub fn crash(name: &str) -> ! {
    eprintln!("failpoint {name}: aborting as {VARIABLE} asked");
    std::process::abort()
}

/// A crash point: aborts the process here when `REWIND_FAILPOINTS` names it, in a binary built
/// with the `failpoints` feature; nothing at all otherwise.
#[macro_export]
macro_rules! crash_point {
    ($name:literal) => {
        $crate::failpoint::fail::fail_point!($name, |_| $crate::failpoint::crash($name))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_named_arms_nothing() {
        assert_eq!(arm(" , "), Ok(()));
    }

    #[cfg(not(feature = "failpoints"))]
    #[test]
    fn a_build_without_crash_points_refuses_to_be_asked_for_one() {
        let error = arm("coordinator.before-decision").unwrap_err();
        assert!(error.contains("built without crash points"), "{error}");
    }

    #[cfg(feature = "failpoints")]
    #[test]
    fn a_build_with_crash_points_arms_each_named_one() {
        arm("test.one, test.two").unwrap();
        let armed: Vec<String> = fail::list().into_iter().map(|(name, _)| name).collect();
        assert!(armed.contains(&"test.one".to_string()), "{armed:?}");
        assert!(armed.contains(&"test.two".to_string()), "{armed:?}");
    }
}
