//! What a state snapshot costs: its size and the time to encode and decode it, in the encoding
//! the coordinator uses (MessagePack + zstd, `storage::snapshot_codec`) beside the JSON it
//! replaced, in one run. The state is what a busy cluster builds: releases registered (each
//! with its audit entry) and hosts registered, as `apply()` records them.
//!
//! Run: `cargo bench -p rewind-coordinator --bench snapshot` (`REWIND_BENCH_COMMANDS` sets the
//! number of commands, 60,000 by default).

use std::time::{Duration, Instant};

use rewind_coordinator::state_machine::{
    AuditLog, Command, CommandKind, HealthPolicy, Labels, ReleaseRecord, ServiceRecord, State,
    apply,
};
use rewind_coordinator::storage::snapshot_codec;

fn command(index: u64) -> Command {
    let kind = if index.is_multiple_of(10) {
        CommandKind::RegisterHost {
            host_id: format!("host-{}", index % 10_000),
            labels: Labels::default(),
            services: vec!["web".into()],
            agent_version: "bench".into(),
        }
    } else {
        // Digests and commits are random-looking, as real ones are: they do not compress.
        let digest = rewind_shared::digest::sha256_hex(&index.to_be_bytes());
        CommandKind::RegisterRelease {
            release: ReleaseRecord {
                service: format!("service-{}", index % 50),
                version: format!("v{index}"),
                artifact_digest: format!("sha256:{digest}"),
                commit: digest[..40].to_string(),
                registered_at_ms: 0,
                api_version: 3,
                requires: [("db".to_string(), 2)].into_iter().collect(),
                produces: Default::default(),
                consumes: Default::default(),
            },
        }
    };
    Command {
        at_ms: 1_764_000_000_000 + index * 7,
        identity: "operator".into(),
        request_id: format!("req-{index}"),
        audit_seed: String::new(),
        kind,
    }
}

fn best_of<T>(runs: usize, mut work: impl FnMut() -> T) -> (T, Duration) {
    let mut best = Duration::MAX;
    let mut result = None;
    for _ in 0..runs {
        let started = Instant::now();
        result = Some(work());
        best = best.min(started.elapsed());
    }
    (result.expect("at least one run"), best)
}

fn main() {
    let commands: u64 = std::env::var("REWIND_BENCH_COMMANDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(60_000);
    let mut state = State::default();
    for service in 0..50 {
        let put = Command {
            at_ms: 1_764_000_000_000,
            identity: "operator".into(),
            request_id: String::new(),
            audit_seed: String::new(),
            kind: CommandKind::PutService {
                service: ServiceRecord {
                    name: format!("service-{service}"),
                    depends_on: Vec::new(),
                    policy: HealthPolicy::default(),
                    synthetics: Vec::new(),
                    rollback_steps: Vec::new(),
                    rto_s: 0,
                    freeze: Vec::new(),
                    drift_policy: Default::default(),
                    isolate_after_failures: 0,
                },
            },
        };
        apply(&mut state, service + 1, &put).expect("register a service");
    }
    for index in 51..=commands {
        apply(&mut state, index, &command(index)).expect("apply a command");
    }
    println!("state after {commands} commands (best of 3 runs each):");
    let (json, json_encode) = best_of(3, || serde_json::to_vec(&state).unwrap());
    let (_, json_decode) = best_of(3, || serde_json::from_slice::<State>(&json).unwrap());
    let (packed, packed_encode) = best_of(3, || snapshot_codec::encode(&state).unwrap());
    let (decoded, packed_decode) = best_of(3, || snapshot_codec::decode(&packed).unwrap());
    assert_eq!(decoded, state, "the snapshot round-trips");
    let mib = |bytes: usize| bytes as f64 / (1024.0 * 1024.0);
    let ms = |duration: Duration| duration.as_secs_f64() * 1000.0;
    println!(
        "  JSON (before):          {:7.2} MiB, encode {:7.1} ms, decode {:7.1} ms",
        mib(json.len()),
        ms(json_encode),
        ms(json_decode)
    );
    println!(
        "  MessagePack + zstd (now): {:5.2} MiB, encode {:7.1} ms, decode {:7.1} ms",
        mib(packed.len()),
        ms(packed_encode),
        ms(packed_decode)
    );
    println!(
        "  {:.1}x smaller; encode {:.2}x, decode {:.2}x the time of JSON",
        json.len() as f64 / packed.len() as f64,
        packed_encode.as_secs_f64() / json_encode.as_secs_f64(),
        packed_decode.as_secs_f64() / json_decode.as_secs_f64(),
    );
    // What the audit log's entries cost every snapshot: the same state without them, as a
    // snapshot would be once the log lives in a store of its own.
    let mut without_audit = state.clone();
    without_audit.audit = AuditLog::default();
    let (lean, lean_encode) = best_of(3, || snapshot_codec::encode(&without_audit).unwrap());
    let (_, lean_decode) = best_of(3, || snapshot_codec::decode(&lean).unwrap());
    println!(
        "  without the {} audit entries: {:5.2} MiB, encode {:7.1} ms, decode {:7.1} ms \
         (the entries are {:.0}% of the snapshot)",
        state.audit.len(),
        mib(lean.len()),
        ms(lean_encode),
        ms(lean_decode),
        100.0 * (packed.len() - lean.len()) as f64 / packed.len() as f64
    );
}
