//! Tracing set-up shared by every binary.
//!
//! `REWIND_LOG` takes an `EnvFilter` directive (default `info`); `REWIND_LOG_FORMAT=json` switches
//! to one JSON object per line. Logs go to stderr so command output on stdout stays clean.
//!
//! `REWIND_OTLP_ENDPOINT` (`http://collector:4317`; the coordinator and the agent) also exports
//! rewind's own spans (calls, requests, steps; not the libraries' beneath them) over OTLP/gRPC,
//! each in the trace its log lines name. [`shutdown`] sends what is still queued.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The environment variable naming the OTLP/gRPC collector spans are exported to.
pub const OTLP_ENDPOINT_VARIABLE: &str = "REWIND_OTLP_ENDPOINT";

pub fn init(default_filter: &str) {
    let filter =
        EnvFilter::try_from_env("REWIND_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json =
        std::env::var("REWIND_LOG_FORMAT").is_ok_and(|format| format.eq_ignore_ascii_case("json"));
    // Colours only on a terminal: under systemd, journald would keep the escape codes.
    let lines = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let lines = if json {
        lines.json().boxed()
    } else {
        lines.boxed()
    };
    let registry = tracing_subscriber::registry().with(lines.with_filter(filter));
    // Exported spans' events are the log lines: filtered alike.
    #[cfg(feature = "otlp")]
    let registry = registry.with(otlp::layer_from_environment(
        EnvFilter::try_from_env("REWIND_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter)),
    ));
    // A second init (tests start several components in one process) keeps the first subscriber.
    let _ = registry.try_init();
}

/// Whether spans are exported (OTLP): only then do spans need OpenTelemetry parents.
pub fn exporting_spans() -> bool {
    #[cfg(feature = "otlp")]
    return otlp::PROVIDER.get().is_some();
    #[cfg(not(feature = "otlp"))]
    false
}

/// Sends the spans still queued for export, waiting a few seconds at most; call it once as the
/// process ends. Nothing to do when spans are not exported.
pub fn shutdown() {
    #[cfg(feature = "otlp")]
    if let Some(provider) = otlp::PROVIDER.get()
        && let Err(error) = provider.shutdown()
    {
        tracing::warn!(%error, "Spans still queued for export are lost.");
    }
}

#[cfg(feature = "otlp")]
mod otlp {
    use std::sync::OnceLock;
    use std::time::Duration;

    use opentelemetry::trace::TracerProvider;
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::{LevelFilter, Targets};

    pub(super) static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

    /// Longest endpoint accepted.
    const MAX_ENDPOINT_BYTES: usize = 2048;
    /// Longest one export may take before it is given up (the batch is then dropped).
    const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
    /// Most spans queued for export; beyond it new spans are dropped (the collector is slow or
    /// gone), so export never holds more memory than this.
    pub const MAX_QUEUED_SPANS: usize = 2048;
    /// How a process stops on a bad endpoint, as on any bad configuration.
    const EXIT_BAD_CONFIG: i32 = 64;

    /// The export layer when `REWIND_OTLP_ENDPOINT` is set (once per process); a process
    /// started with one that is not an `http://host:port` URL stops at once, naming it.
    pub(super) fn layer_from_environment<S>(
        log_filter: tracing_subscriber::EnvFilter,
    ) -> Option<impl Layer<S>>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        use tracing_subscriber::filter::FilterExt;
        let endpoint = std::env::var(super::OTLP_ENDPOINT_VARIABLE).ok()?;
        // A second init (tests in one process) keeps the first subscriber: no second exporter.
        if PROVIDER.get().is_some() {
            return None;
        }
        let provider = match provider(&endpoint) {
            Ok(provider) => provider,
            Err(error) => {
                eprintln!("{}: {error}", super::OTLP_ENDPOINT_VARIABLE);
                std::process::exit(EXIT_BAD_CONFIG);
            }
        };
        let tracer = provider.tracer("rewind");
        let _ = PROVIDER.set(provider);
        // rewind's own spans only: h2's, hyper's and tonic's would bury them, and the export's
        // own gRPC calls would be exported in turn.
        let ours = Targets::new()
            .with_target("rewind", LevelFilter::TRACE)
            .with_default(LevelFilter::OFF);
        Some(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(ours.and(log_filter)),
        )
    }

    /// Checks the endpoint: `http://` (the usual collector beside the process, or on its
    /// network), a host, a port.
    pub(crate) fn check_endpoint(endpoint: &str) -> Result<http::Uri, String> {
        if endpoint.len() > MAX_ENDPOINT_BYTES {
            return Err(format!("longer than {MAX_ENDPOINT_BYTES} bytes"));
        }
        let uri: http::Uri = endpoint
            .parse()
            .map_err(|error| format!("{endpoint:?} is not a URL: {error}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "{endpoint:?}: only http:// is supported (a collector on the host or its \
                 private network, as OpenTelemetry deploys one)"
            ));
        }
        if uri.host().is_none_or(str::is_empty) || uri.port_u16().is_none() {
            return Err(format!("{endpoint:?} names no host and port"));
        }
        Ok(uri)
    }

    fn provider(endpoint: &str) -> Result<SdkTracerProvider, String> {
        check_endpoint(endpoint)?;
        let endpoint = endpoint.to_string();
        // The gRPC channel's connection task needs a Tokio runtime, and logging starts before
        // the process builds its own: it gets a small one on a thread of its own, which also
        // keeps export off the runtimes that serve calls. The batch processor exports from its
        // own thread, handing each request to that task.
        let (built, exporter) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = built.send(Err(format!("cannot start its runtime: {error}")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let exporter = opentelemetry_otlp::SpanExporter::builder()
                        .with_tonic()
                        .with_endpoint(endpoint)
                        .with_timeout(EXPORT_TIMEOUT)
                        .build()
                        .map_err(|error| error.to_string());
                    let _ = built.send(exporter);
                    std::future::pending::<()>().await
                })
            })
            .map_err(|error| format!("cannot start its thread: {error}"))?;
        let exporter = exporter
            .recv()
            .map_err(|_| "its thread ended".to_string())??;
        let service = std::env::current_exe()
            .ok()
            .and_then(|path| path.file_name()?.to_str().map(str::to_string))
            .unwrap_or_else(|| "rewind".to_string());
        let batches = opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                opentelemetry_sdk::trace::BatchConfigBuilder::default()
                    .with_max_queue_size(MAX_QUEUED_SPANS)
                    .build(),
            )
            .build();
        Ok(SdkTracerProvider::builder()
            .with_span_processor(batches)
            // Every span, but a caller's trace it chose not to sample: what to keep is the
            // collector's to decide.
            .with_sampler(opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(
                opentelemetry_sdk::trace::Sampler::AlwaysOn,
            )))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service)
                    .build(),
            )
            .build())
    }

    #[cfg(test)]
    mod tests {
        use super::check_endpoint;

        #[test]
        fn endpoints_are_checked_by_what_is_wrong() {
            assert!(check_endpoint("http://127.0.0.1:4317").is_ok());
            assert!(
                check_endpoint("https://collector:4317")
                    .unwrap_err()
                    .contains("http://")
            );
            assert!(
                check_endpoint("http://collector")
                    .unwrap_err()
                    .contains("port")
            );
            assert!(
                check_endpoint("not a url")
                    .unwrap_err()
                    .contains("not a URL")
            );
            assert!(
                check_endpoint(&"h".repeat(3000))
                    .unwrap_err()
                    .contains("longer")
            );
        }
    }
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
