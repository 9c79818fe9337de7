//! W3C Trace Context (`traceparent`): what a caller's tracing system sends so rewind's log lines
//! for its request carry the same trace id (https://www.w3.org/TR/trace-context/).
//!
//! `traceparent: 00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`. A header that does not
//! parse is ignored (a request is never refused for it); an all-zero id is invalid; a version
//! other than `00` is read for its first four fields, as the spec asks, unless it is `ff`.

/// Longest `traceparent` read: version 00 is 55 bytes; later versions may add fields.
pub const MAX_TRACEPARENT_BYTES: usize = 256;

/// The `sampled` flag: the caller records this trace.
const SAMPLED: u8 = 1;

/// The operation a step belongs to (`rb-3` of `rb-3/web/restore/web-1`), and the name of the
/// log field that carries it: `rollback_id`, `change_id` or `schema_txn_id`.
pub fn operation_of_step(step_id: &str) -> (&str, Option<&'static str>) {
    let operation = step_id.split('/').next().unwrap_or_default();
    let field = match operation.split_once('-') {
        Some(("rb", _)) => Some("rollback_id"),
        Some(("ch", _)) => Some("change_id"),
        Some(("st", _)) => Some("schema_txn_id"),
        _ => None,
    };
    (operation, field)
}

/// The trace a step runs in: its operation's (see [`TraceParent::of_operation`]); `step_id`
/// may also be the operation's own id (`rb-3`).
pub fn of_step(cluster_id: &str, step_id: &str) -> TraceParent {
    TraceParent::of_operation(cluster_id, operation_of_step(step_id).0)
}

/// The span a step's lines are made in, on the coordinator and on the agent: the step's
/// id, its operation's id (`rollback_id`, `change_id` or `schema_txn_id`) and the trace id, so
/// one rollback's lines on every member and host are found by either id. Given an operation's
/// own id (`rb-3`: a rollback's stall), the span names the operation only. At WARN, like
/// calls' spans: present whenever warnings are logged. `term` is for the agent to record.
pub fn step_span(step_id: &str, trace: &TraceParent) -> tracing::Span {
    let step_id = crate::names::truncate(step_id, 256);
    let span = tracing::warn_span!(
        "step",
        step_id = tracing::field::Empty,
        rollback_id = tracing::field::Empty,
        change_id = tracing::field::Empty,
        schema_txn_id = tracing::field::Empty,
        term = tracing::field::Empty,
        trace_id = %trace.trace_id_hex()
    );
    let (operation, field) = operation_of_step(step_id);
    if operation != step_id {
        span.record("step_id", step_id);
    }
    if let Some(field) = field {
        span.record(field, operation);
    }
    trace.adopt(&span);
    span
}

/// A parsed `traceparent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// The header's value, or `None` when it is not a valid `traceparent`.
    pub fn parse(header: &str) -> Option<Self> {
        if header.len() > MAX_TRACEPARENT_BYTES {
            return None;
        }
        let mut parts = header.trim().split('-');
        let version = hex_bytes::<1>(parts.next()?)?[0];
        let trace_id = hex_bytes::<16>(parts.next()?)?;
        let parent_id = hex_bytes::<8>(parts.next()?)?;
        let flags = hex_bytes::<1>(parts.next()?)?[0];
        // Version 00 has exactly four fields; a later one may have more, never 0xff.
        let more = parts.next().is_some();
        if version == 0xff || (version == 0 && more) {
            return None;
        }
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// A new trace, for a request that came without one. Sampled: rewind records the traces
    /// it starts (its parent id stands for the caller, which sent none, and is not exported).
    pub fn new_random() -> Self {
        let mut trace_id: [u8; 16] = rand::random();
        let mut parent_id: [u8; 8] = rand::random();
        // All-zero ids are invalid; a random one is all-zero once in 2^128, but never is.
        trace_id[15] |= 1;
        parent_id[7] |= 1;
        Self {
            trace_id,
            parent_id,
            flags: SAMPLED,
        }
    }

    /// The request's `traceparent` header, or a new trace when it has none, more than one, or
    /// one that does not parse (a request is never refused for it).
    pub fn of_request(headers: &http::HeaderMap) -> Self {
        let mut values = headers.get_all("traceparent").iter();
        match (values.next(), values.next()) {
            (Some(value), None) => value.to_str().ok().and_then(Self::parse),
            _ => None,
        }
        .unwrap_or_else(Self::new_random)
    }

    /// The trace of a change, rollback or schema transaction (`ch-3`, `rb-3`, `st-3`): derived
    /// from the cluster's id and the operation's, so every member and every agent names the
    /// same trace for it, after a change of leader too, with nothing replicated for it. The
    /// parent id stands for the operation as a whole; it is sampled, so an agent that exports
    /// spans records its steps.
    pub fn of_operation(cluster_id: &str, operation: &str) -> Self {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new()
            .chain_update(b"rewind operation trace\0")
            .chain_update(cluster_id.as_bytes())
            .chain_update([0])
            .chain_update(operation.as_bytes())
            .finalize();
        let mut trace_id: [u8; 16] = digest[..16].try_into().expect("16 of 32 bytes");
        let mut parent_id: [u8; 8] = digest[16..24].try_into().expect("8 of 32 bytes");
        // All-zero ids are invalid (once in 2^128 from a digest, but never is).
        trace_id[15] |= 1;
        parent_id[7] |= 1;
        Self {
            trace_id,
            parent_id,
            flags: SAMPLED,
        }
    }

    /// The same trace with `span` as the parent a callee sees: the span's own OpenTelemetry id
    /// and sampling decision when spans are exported (so the callee's spans hang under it, and
    /// are recorded only if it was), else this one unchanged.
    pub fn with_parent_span(self, span: &tracing::Span) -> Self {
        #[cfg(feature = "otlp")]
        {
            use opentelemetry::trace::TraceContextExt;
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let context = span.context();
            let own = context.span().span_context().clone();
            if own.is_valid() && own.trace_id().to_bytes() == self.trace_id {
                return Self {
                    parent_id: own.span_id().to_bytes(),
                    flags: own.trace_flags().to_u8(),
                    ..self
                };
            }
        }
        let _ = span;
        self
    }

    /// Makes `span` part of this trace in exported spans (OpenTelemetry), as a child of the
    /// parent id; the log lines name the trace by their `trace_id` field either way. Nothing to
    /// do when spans are not exported.
    pub fn adopt(&self, span: &tracing::Span) {
        #[cfg(feature = "otlp")]
        if crate::logging::exporting_spans() {
            use opentelemetry::trace::{
                SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
            };
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let remote = SpanContext::new(
                TraceId::from_bytes(self.trace_id),
                SpanId::from_bytes(self.parent_id),
                TraceFlags::new(self.flags),
                true,
                TraceState::default(),
            );
            // Refused only when the span was already entered: it then keeps its own trace.
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
        }
        let _ = span;
    }

    /// The trace id as 32 lower-case hex digits, as logs and tracing systems show it.
    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.parent_id),
            self.flags
        )
    }
}

/// Exactly `N` bytes from `2N` lower-case hex digits (the spec allows no upper case).
fn hex_bytes<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N
        || !text
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
    {
        return None;
    }
    let mut bytes = [0u8; N];
    hex::decode_to_slice(text, &mut bytes).ok()?;
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specs_example_parses_and_prints_back() {
        let parent = TraceParent::parse(EXAMPLE).unwrap();
        assert_eq!(parent.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parent.flags, 1);
        assert_eq!(parent.to_string(), EXAMPLE);
        // A later version's extra fields are ignored.
        assert!(TraceParent::parse(&format!("01{}-extra", &EXAMPLE[2..])).is_some());
    }

    #[test]
    fn invalid_headers_are_refused_by_field() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        assert_eq!(
            TraceParent::parse(&"0".repeat(MAX_TRACEPARENT_BYTES + 1)),
            None
        );
    }

    #[test]
    fn a_request_with_two_traceparents_starts_a_new_trace() {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", EXAMPLE.parse().unwrap());
        assert_eq!(
            TraceParent::of_request(&headers).trace_id_hex(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        headers.append("traceparent", EXAMPLE.parse().unwrap());
        assert_ne!(
            TraceParent::of_request(&headers).trace_id_hex(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[test]
    fn an_operations_trace_is_the_same_everywhere_and_its_own() {
        let rollback = TraceParent::of_operation("rw-1", "rb-3");
        assert_eq!(rollback, TraceParent::of_operation("rw-1", "rb-3"));
        assert_ne!(
            rollback.trace_id,
            TraceParent::of_operation("rw-1", "rb-4").trace_id
        );
        assert_ne!(
            rollback.trace_id,
            TraceParent::of_operation("rw-2", "rb-3").trace_id
        );
        assert_eq!(TraceParent::parse(&rollback.to_string()), Some(rollback));
        assert_eq!(rollback.flags, SAMPLED);
    }

    #[test]
    fn a_steps_operation_is_named_by_its_kind() {
        assert_eq!(
            operation_of_step("rb-3/web/restore/web-1"),
            ("rb-3", Some("rollback_id"))
        );
        assert_eq!(
            operation_of_step("rb-3/gate/0"),
            ("rb-3", Some("rollback_id"))
        );
        assert_eq!(
            operation_of_step("ch-2/capture/web-1"),
            ("ch-2", Some("change_id"))
        );
        assert_eq!(
            operation_of_step("st-1/prepare/db-1"),
            ("st-1", Some("schema_txn_id"))
        );
        assert_eq!(operation_of_step("self-revert/x"), ("self-revert", None));
    }

    #[test]
    fn a_new_trace_is_valid_and_prints_as_a_header() {
        let new = TraceParent::new_random();
        assert_eq!(TraceParent::parse(&new.to_string()), Some(new));
    }
}
