//! Tracing set-up shared by every binary.
//!
//! `REWIND_LOG` takes an `EnvFilter` directive (default `info`); `REWIND_LOG_FORMAT=json` switches
//! to one JSON object per line. Logs go to stderr so command output on stdout stays clean.

use tracing_subscriber::EnvFilter;

pub fn init(default_filter: &str) {
    let filter =
        EnvFilter::try_from_env("REWIND_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json =
        std::env::var("REWIND_LOG_FORMAT").is_ok_and(|format| format.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests start several components in one process) keeps the first subscriber.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
