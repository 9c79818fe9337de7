//! Tracing set-up shared by every binary.
//!
//! `REWIND_LOG` takes an `EnvFilter` directive (default `info`); `REWIND_LOG_FORMAT=json` switches
//! to one JSON object per line. Logs go to stderr so command output on stdout stays clean.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init(default_filter: &str) {
    let filter =
        EnvFilter::try_from_env("REWIND_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json =
        std::env::var("REWIND_LOG_FORMAT").is_ok_and(|format| format.eq_ignore_ascii_case("json"));
    // Colours only on a terminal: under systemd, journald would keep the escape codes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second init (tests start several components in one process) keeps the first subscriber.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// A slog drain that forwards into tracing, so raft-rs (which logs through slog) lands in the
/// same place, filter and format as everything else. Key-values become one `kv` field.
pub struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(
        &self,
        record: &slog::Record<'_>,
        values: &slog::OwnedKVList,
    ) -> Result<(), slog::Never> {
        // raft-rs logs several debug records per message; formatting them only to have the
        // filter drop them cost more than the rest of the Raft thread's work per message.
        let enabled = match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::enabled!(target: "raft", tracing::Level::ERROR)
            }
            slog::Level::Warning => tracing::enabled!(target: "raft", tracing::Level::WARN),
            slog::Level::Info => tracing::enabled!(target: "raft", tracing::Level::INFO),
            slog::Level::Debug => tracing::enabled!(target: "raft", tracing::Level::DEBUG),
            slog::Level::Trace => tracing::enabled!(target: "raft", tracing::Level::TRACE),
        };
        if !enabled {
            return Ok(());
        }
        let mut kv = KeyValues(String::new());
        let _ = slog::KV::serialize(&record.kv(), record, &mut kv);
        let _ = slog::KV::serialize(values, record, &mut kv);
        let message = record.msg().to_string();
        let kv = kv.0;
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", kv, "{message}")
            }
            slog::Level::Warning => tracing::warn!(target: "raft", kv, "{message}"),
            slog::Level::Info => tracing::info!(target: "raft", kv, "{message}"),
            slog::Level::Debug => tracing::debug!(target: "raft", kv, "{message}"),
            slog::Level::Trace => tracing::trace!(target: "raft", kv, "{message}"),
        }
        Ok(())
    }
}

/// A slog logger that writes through [`TracingDrain`].
pub fn slog_logger() -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!())
}

struct KeyValues(String);

impl slog::Serializer for KeyValues {
    fn emit_arguments(&mut self, key: slog::Key, value: &std::fmt::Arguments<'_>) -> slog::Result {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        self.0.push_str(&format!("{key}={value}"));
        Ok(())
    }
}
