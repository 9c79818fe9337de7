//! Describing a host's services for the coordinator: the latest snapshot, the live state, or
//! the drift since rewind last put them there (`rewindctl host diff` and `rewindctl host
//! drift`; see `drift`).

use rewind_proto::v1::{self as pb, InspectMode};

use crate::AgentError;
use crate::config::ServiceConfig;
use crate::facts::ServiceFacts;
use crate::snapshot::{self, Manifest, SnapshotRecord};
use crate::store::Store;

/// Who set a desired state adopted by hand; an ADOPT answer says it in `drift_against` (an
/// agent of an earlier release answers ADOPT as a CAPTURED, without it).
pub const ADOPTED: &str = "host adopt";

/// Describes `service` (empty: every service) in `mode`. Reads files and runs the fact
/// commands, so callers run it on the blocking pool.
pub fn inspect(
    store: &Store,
    services: &[ServiceConfig],
    service: &str,
    mode: InspectMode,
    env_key: &[u8],
) -> Result<Vec<pb::ServiceState>, AgentError> {
    let random_key: [u8; 32];
    let env_key = if env_key.is_empty() {
        random_key = rand::random();
        &random_key[..]
    } else {
        env_key
    };
    let chosen: Vec<&ServiceConfig> = services
        .iter()
        .filter(|candidate| service.is_empty() || candidate.name == service)
        .collect();
    if chosen.is_empty() {
        return Err(AgentError::UnknownService {
            service: rewind_shared::names::truncate(service, 128).to_string(),
            known: services
                .iter()
                .map(|service| service.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let snapshots = store.snapshots()?;
    let latest = |service: &ServiceConfig| {
        snapshots
            .iter()
            .filter(|record| record.manifest.service == service.name)
            .max_by_key(|record| record.captured_at_ms)
    };
    if mode == InspectMode::InspectAdopt {
        return adopt(store, &chosen, latest, env_key);
    }
    chosen
        .into_iter()
        .map(|service| describe(store, service, latest(service), mode, env_key))
        .collect()
}

/// A person accepted what changed by hand: every service measured first (a failure adopts
/// nothing), then each recorded as its desired state; the caller holds their step locks. The
/// answer names what was accepted, for the coordinator's audit entry.
fn adopt<'a>(
    store: &Store,
    chosen: &[&ServiceConfig],
    latest: impl Fn(&ServiceConfig) -> Option<&'a SnapshotRecord>,
    env_key: &[u8],
) -> Result<Vec<pb::ServiceState>, AgentError> {
    let accepted: Vec<Vec<String>> = chosen
        .iter()
        .map(|service| {
            Ok(
                crate::drift::measure(store, service, || Ok(latest(service).cloned()))?
                    .map(|measured| measured.lines)
                    .unwrap_or_default(),
            )
        })
        .collect::<Result<_, AgentError>>()?;
    let now_ms = rewind_shared::time::now_ms();
    chosen
        .iter()
        .zip(accepted)
        .map(|(service, accepted)| {
            crate::drift::record_desired(store, service, ADOPTED, now_ms)?;
            let manifest = snapshot::live_manifest(service, Some(store))?;
            let mut state = state_of(
                &service.name,
                &manifest,
                &crate::facts::collect(service),
                env_key,
            );
            state.drift = accepted;
            state.drift_against = ADOPTED.into();
            state.drift_against_at_ms = now_ms;
            Ok(state)
        })
        .collect()
}

fn describe(
    store: &Store,
    service: &ServiceConfig,
    latest: Option<&SnapshotRecord>,
    mode: InspectMode,
    env_key: &[u8],
) -> Result<pb::ServiceState, AgentError> {
    let no_snapshot = || pb::ServiceState {
        service: service.name.clone(),
        note: "no snapshot captured yet: nothing to compare with".into(),
        ..Default::default()
    };
    match mode {
        InspectMode::InspectCaptured => Ok(latest.map_or_else(no_snapshot, |record| {
            let mut state = state_of(&service.name, &record.manifest, &record.facts, env_key);
            state.snapshot_id = record.id.clone();
            state.captured_at_ms = record.captured_at_ms;
            state
        })),
        InspectMode::InspectLive => {
            let manifest = snapshot::live_manifest(service, Some(store))?;
            Ok(state_of(
                &service.name,
                &manifest,
                &crate::facts::collect(service),
                env_key,
            ))
        }
        // Answered by `adopt` before this is reached.
        InspectMode::InspectAdopt => Err(AgentError::invalid(
            "mode",
            "an adoption reached the describe path",
        )),
        InspectMode::InspectDrift => {
            let Some(measured) = crate::drift::measure(store, service, || Ok(latest.cloned()))?
            else {
                return Ok(no_snapshot());
            };
            let baseline = measured.baseline;
            let mut state = state_of(&service.name, &measured.live, &measured.live_facts, env_key);
            if let Some(id) = baseline.snapshot_id {
                state.snapshot_id = id;
                state.captured_at_ms = baseline.at_ms;
            }
            state.drift = measured.lines;
            state.drift_against = baseline.described;
            state.drift_against_at_ms = baseline.at_ms;
            Ok(state)
        }
    }
}

fn state_of(
    service: &str,
    manifest: &Manifest,
    facts: &ServiceFacts,
    env_key: &[u8],
) -> pb::ServiceState {
    pb::ServiceState {
        service: service.to_string(),
        release_link: manifest.release_link.clone().unwrap_or_default(),
        release_digest: manifest.release_digest.clone().unwrap_or_default(),
        files: manifest
            .files
            .iter()
            .map(|file| pb::ManagedFile {
                path: file.path.clone(),
                sha256: match (&file.blob, file.env) {
                    (None, _) => String::new(),
                    (Some(hash), false) => hash.clone(),
                    (Some(hash), true) => keyed_digest(env_key, hash),
                },
                mode: file.mode,
                uid: file.uid,
                gid: file.gid,
                size: file.size,
                env: file.env,
            })
            .collect(),
        facts: fact_lines(facts),
        ..Default::default()
    }
}

/// An environment file's digest as it leaves the host: HMAC-SHA256 under the request's key of
/// its content hash, so two hosts asked with one key compare, and nobody can test guesses of a
/// secret against it without the key.
fn keyed_digest(key: &[u8], content_hash: &str) -> String {
    use hmac::Mac;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(content_hash.as_bytes());
    format!("hmac:{}", hex::encode(mac.finalize().into_bytes()))
}

/// Facts as `key: value` lines, so two hosts' can be compared by key.
fn fact_lines(facts: &ServiceFacts) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(unit) = &facts.unit {
        lines.push(format!(
            "unit {}: {}, {}",
            unit.name, unit.active, unit.enabled
        ));
    }
    for (package, version) in &facts.packages {
        lines.push(format!("package {package}: {version}"));
    }
    if let Some(image) = &facts.container_image {
        lines.push(format!("container image: {image}"));
    }
    if let Some(version) = &facts.schema_version {
        lines.push(format!("schema version: {version}"));
    }
    if let Some(flags) = &facts.flags {
        lines.push(format!("flags: {flags}"));
    }
    lines
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn adopting_accepts_what_changed_and_files_the_service_writes_are_never_drift() {
        let root = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("releases/v1")).unwrap();
        fs::write(root.path().join("app.toml"), "workers = 4").unwrap();
        fs::write(root.path().join("cursor"), "1").unwrap();
        snapshot::switch_link(root.path(), "releases/v1").unwrap();
        let service = ServiceConfig {
            config_files: vec!["app.toml".into(), "cursor".into()],
            drift_ignore: vec!["cursor".into()],
            ..ServiceConfig::bare("web", root.path())
        };
        let store = Store::open(&data.path().join("store")).unwrap();
        crate::drift::record_desired(&store, &service, "ch-1/activate/h", 1).unwrap();
        let services = [service.clone()];
        let ask = |mode| inspect(&store, &services, "web", mode, b"k").unwrap()[0].clone();

        // The service moves its own cursor on: no drift, and nothing a restore would wipe.
        fs::write(root.path().join("cursor"), "2").unwrap();
        assert!(ask(InspectMode::InspectDrift).drift.is_empty());
        assert!(
            crate::drift::since_desired(&store, &service)
                .unwrap()
                .is_empty()
        );

        // A hand edit is drift until adopted; adopting names what it accepted.
        fs::write(root.path().join("app.toml"), "workers = 1").unwrap();
        assert_eq!(
            crate::drift::since_desired(&store, &service).unwrap().len(),
            1
        );
        let adopted = ask(InspectMode::InspectAdopt);
        assert_eq!(adopted.drift_against, ADOPTED);
        assert!(
            adopted.drift.len() == 1 && adopted.drift[0].contains("app.toml"),
            "{:?}",
            adopted.drift
        );
        let after = ask(InspectMode::InspectDrift);
        assert!(after.drift.is_empty(), "{:?}", after.drift);
        assert!(
            after.drift_against.contains(ADOPTED),
            "{}",
            after.drift_against
        );
        assert!(
            crate::drift::since_desired(&store, &service)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn drift_names_what_changed_since_rewind_last_set_the_service() {
        let root = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        for version in ["v1", "v2"] {
            fs::create_dir_all(root.path().join("releases").join(version)).unwrap();
        }
        fs::write(root.path().join("app.toml"), "workers = 4").unwrap();
        snapshot::switch_link(root.path(), "releases/v1").unwrap();
        let service = ServiceConfig {
            config_files: vec!["app.toml".into(), "flags.json".into()],
            flags_file: Some("flags.json".into()),
            ..ServiceConfig::bare("web", root.path())
        };
        let store = Store::open(&data.path().join("store")).unwrap();
        let services = [service.clone()];
        let drift = |store: &Store| {
            inspect(store, &services, "web", InspectMode::InspectDrift, b"k").unwrap()[0].clone()
        };
        assert!(drift(&store).note.contains("no snapshot captured yet"));

        let record = snapshot::capture(&store, &service, vec![], 1_000).unwrap();
        let clean = drift(&store);
        assert_eq!(clean.snapshot_id, record.id);
        assert!(clean.drift.is_empty(), "{:?}", clean.drift);

        fs::write(root.path().join("app.toml"), "workers = 64").unwrap();
        snapshot::switch_link(root.path(), "releases/v2").unwrap();
        let drifted = drift(&store);
        let joined = drifted.drift.join("\n");
        assert!(
            joined.contains("releases/v1") && joined.contains("releases/v2"),
            "{joined}"
        );
        assert!(joined.contains("app.toml"), "{joined}");

        let captured = inspect(&store, &services, "", InspectMode::InspectCaptured, b"k").unwrap();
        assert_eq!(captured[0].release_link, "releases/v1");
        let live = inspect(&store, &services, "", InspectMode::InspectLive, b"k").unwrap();
        assert_eq!(live[0].release_link, "releases/v2");
        assert_ne!(captured[0].files[0].sha256, live[0].files[0].sha256);

        // An activation records what it put there: from then on only what changed since is
        // drift, and the flags file (rewind's own) never is.
        crate::drift::record_desired(&store, &service, "ch-2/activate/web-1", 2_000).unwrap();
        let settled = drift(&store);
        assert!(settled.drift.is_empty(), "{:?}", settled.drift);
        assert_eq!(
            settled.drift_against,
            "the state rewind last set (ch-2/activate/web-1)"
        );
        assert_eq!(settled.drift_against_at_ms, 2_000);
        fs::write(root.path().join("app.toml"), "workers = 8").unwrap();
        fs::write(root.path().join("flags.json"), "{\"new\": true}").unwrap();
        let hotfixed = drift(&store);
        assert_eq!(hotfixed.drift.len(), 1, "{:?}", hotfixed.drift);
        assert!(
            hotfixed.drift[0].starts_with("app.toml: "),
            "{:?}",
            hotfixed.drift
        );
        let reported = crate::drift::summary(&store, &service, 3_000);
        assert_eq!(reported.changes, hotfixed.drift);
        assert_eq!(reported.checked_at_ms, 3_000);

        let unknown =
            inspect(&store, &services, "api", InspectMode::InspectLive, b"k").unwrap_err();
        assert!(
            unknown.to_string().contains("managed services are web"),
            "{unknown}"
        );
    }
}
