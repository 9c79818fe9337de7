//! Capture and exact restore of a service's state.
//!
//! A snapshot holds the target of the service's `current` link and the tree digest of the release
//! it points at, the bytes and mode of each declared config file (as blobs in the store; a file
//! that did not exist is recorded as absent), and the probe results at capture time. Its id is
//! derived from its content, so capturing an unchanged service twice yields the same id and
//! stores nothing new. The release tree is not copied (releases are immutable artifacts kept on
//! the host); its digest is, and a restore refuses to point `current` at a release that no
//! longer matches it. Hashing the tree is incremental: a file whose size, mtime and inode are
//! those it had when last hashed is not read again.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::AgentError;
use crate::config::ServiceConfig;
use crate::paths::{ServiceRoot, check_relative};
use crate::store::{CachedHash, Store, TreeHashes};

/// Name of the release link inside a service root (the Capistrano layout).
pub const CURRENT_LINK: &str = "current";
/// Directory of releases inside a service root.
pub const RELEASES_DIR: &str = "releases";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    /// Relative to the service root.
    pub path: String,
    /// sha256 hex of the content, `None` when the file did not exist.
    pub blob: Option<String>,
    pub mode: u32,
    pub size: u64,
    /// Owner and group, restored too (0 for an absent file).
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    /// An environment file (`env-files`): often holds secrets, so diffs never show a hash of it.
    /// Left out of the JSON when false, so snapshot ids of config-only services are unchanged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub env: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeState {
    pub probe: String,
    pub ok: bool,
}

/// What is restored. Hashing it gives the snapshot id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub service: String,
    /// Target of `current`, relative to the root (`releases/v1`), `None` when there was no link.
    pub release_link: Option<String>,
    /// `sha256:` tree digest of that release directory (as `rewindctl release register` computes
    /// it); `None` without a link, or in snapshots taken before digests were captured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_digest: Option<String>,
    pub files: Vec<FileState>,
    /// A managed container (`manage-container`): its image id and spec. Left out of the JSON
    /// for other services, so their snapshot ids are unchanged; `None` for a managed service
    /// whose container did not exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<crate::container::ContainerState>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: String,
    pub captured_at_ms: u64,
    pub manifest: Manifest,
    /// Probe results at capture time: informative, not restored.
    pub probes: Vec<ProbeState>,
    /// Bytes newly stored by this capture (0 when every blob was already there).
    pub new_bytes: u64,
    pub capture_ms: u64,
    /// Unit state, package versions, container image at capture: informative, not restored.
    #[serde(default)]
    pub facts: crate::facts::ServiceFacts,
    /// The release tree: its files and bytes, and how many of them this capture had to read.
    #[serde(default)]
    pub release_files: u64,
    #[serde(default)]
    pub release_bytes: u64,
    #[serde(default)]
    pub hashed_files: u64,
}

impl Manifest {
    pub fn id(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("snap-{}", &rewind_shared::digest::sha256_hex(&json)[..24])
    }
}

/// Captures the service's current state into the store and returns the snapshot.
pub fn capture(
    store: &Store,
    service: &ServiceConfig,
    probes: Vec<ProbeState>,
    now_ms: u64,
) -> Result<SnapshotRecord, AgentError> {
    let started = std::time::Instant::now();
    let facts = crate::facts::collect(service);
    let mut new_bytes = 0u64;
    let (manifest, tree) = read_manifest(service, Some(store), |bytes, env| {
        let (hash, inserted) = store.put_blob(bytes, env)?;
        if inserted {
            new_bytes += bytes.len() as u64;
        }
        Ok(hash)
    })?;
    let record = SnapshotRecord {
        id: manifest.id(),
        captured_at_ms: now_ms,
        manifest,
        probes,
        new_bytes,
        capture_ms: started.elapsed().as_millis() as u64,
        facts,
        release_files: tree.files,
        release_bytes: tree.bytes,
        hashed_files: tree.hashed_files,
    };
    store.put_snapshot(&record)?;
    Ok(record)
}

/// The manifest of the service's live state, storing nothing but, with a store, the release
/// tree's file hashes for the next time.
pub fn live_manifest(
    service: &ServiceConfig,
    store: Option<&Store>,
) -> Result<Manifest, AgentError> {
    let (manifest, _) = read_manifest(service, store, |bytes, _| {
        Ok(rewind_shared::digest::sha256_hex(bytes))
    })?;
    Ok(manifest)
}

/// What hashing a release tree read.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TreeStats {
    pub files: u64,
    pub bytes: u64,
    /// Files whose content was read (the rest came from the cache).
    pub hashed_files: u64,
}

/// Tree digest of `<root>/<target>` (a release directory), reusing and then replacing the
/// store's cached hashes for it when a store is given.
pub fn release_digest(
    service: &ServiceConfig,
    target: &str,
    store: Option<&Store>,
) -> Result<(String, TreeStats), AgentError> {
    check_release_target(&service.name, target)?;
    let release = ServiceRoot::open(service)?.open_release(target)?;
    let key = format!("{}/{target}", service.name);
    let cached = match store {
        Some(store) => store.tree_hashes(&key)?,
        None => TreeHashes::default(),
    };
    let mut fresh = TreeHashes::default();
    let mut stats = TreeStats::default();
    let digest = rewind_shared::digest::tree_digest_at(
        release.dir,
        &release.shown,
        &mut |relative, facts, file| {
            let relative = relative.to_string_lossy().into_owned();
            stats.files += 1;
            stats.bytes += facts.size;
            let (sha256, hashed_at_ns) = match cached.files.get(&relative) {
                Some(known) if known.holds_for(facts) => (known.sha256.clone(), known.hashed_at_ns),
                _ => {
                    stats.hashed_files += 1;
                    let hashed_at_ns = now_ns();
                    (rewind_shared::digest::file_sha256_of(file)?, hashed_at_ns)
                }
            };
            fresh.files.insert(
                relative,
                CachedHash {
                    size: facts.size,
                    mtime_ns: facts.mtime_ns,
                    inode: facts.inode,
                    ctime_ns: facts.ctime_ns,
                    device: facts.device,
                    hashed_at_ns,
                    sha256: sha256.clone(),
                },
            );
            Ok(sha256)
        },
    )?;
    // Unchanged (a drift check of a release nobody touched): nothing to write.
    if let Some(store) = store.filter(|_| fresh != cached) {
        store.put_tree_hashes(&key, &fresh)?;
    }
    Ok((digest, stats))
}

/// The wall clock in nanoseconds, as file times are kept.
fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as i64)
}

/// Reads the link, the release's digest and every declared file; `keep` turns each file's
/// bytes (and whether it is an env file) into its blob hash.
fn read_manifest(
    service: &ServiceConfig,
    store: Option<&Store>,
    mut keep: impl FnMut(&[u8], bool) -> Result<String, AgentError>,
) -> Result<(Manifest, TreeStats), AgentError> {
    let root = ServiceRoot::open(service)?;
    let release_link = read_release_link(service)?;
    // A link to a release that is not there (or not a release) has no digest to record.
    let (release_digest, tree) = match &release_link {
        Some(target) if check_release_target(&service.name, target).is_ok() => {
            match root.open_release(target) {
                Ok(_) => {
                    let (digest, stats) = release_digest(service, target, store)?;
                    (Some(digest), stats)
                }
                // A link to a release that is not on the host: nothing to record.
                Err(AgentError::MissingRelease { .. }) => (None, TreeStats::default()),
                // A link, or not a directory: a restore could never point `current` at it.
                Err(error) => return Err(error),
            }
        }
        _ => (None, TreeStats::default()),
    };
    let mut files = Vec::with_capacity(service.config_files.len() + service.env_files.len());
    let declared = (service.config_files.iter().map(|path| (path, false)))
        .chain(service.env_files.iter().map(|path| (path, true)));
    for (relative, env) in declared {
        let Some((bytes, metadata)) =
            root.read_regular(relative, crate::paths::MAX_SERVICE_FILE_BYTES)?
        else {
            files.push(FileState {
                path: relative.clone(),
                blob: None,
                mode: 0,
                size: 0,
                uid: 0,
                gid: 0,
                env,
            });
            continue;
        };
        files.push(FileState {
            path: relative.clone(),
            blob: Some(keep(&bytes, env)?),
            mode: metadata.permissions().mode() & 0o7777,
            size: bytes.len() as u64,
            uid: metadata.uid(),
            gid: metadata.gid(),
            env,
        });
    }
    // A managed service always has its container: one that is not there is refused here
    // rather than recorded as "none" (which a restore would have to delete).
    let container = if service.manage_container {
        let Some((mut state, spec)) = crate::container::inspect(service)? else {
            return Err(AgentError::Refused {
                field: "container".into(),
                message: format!(
                    "{} manages container {} and there is none: create it once (docker create \
                     or run)",
                    service.name,
                    service.container.as_deref().unwrap_or_default()
                ),
            });
        };
        // Its environment often holds secrets: kept like an env file.
        state.spec = keep(&spec, true)?;
        Some(state)
    } else {
        None
    };
    Ok((
        Manifest {
            service: service.name.clone(),
            release_link,
            release_digest,
            files,
            container,
        },
        tree,
    ))
}

fn read_release_link(service: &ServiceConfig) -> Result<Option<String>, AgentError> {
    let link = service.root.join(CURRENT_LINK);
    match fs::symlink_metadata(&link) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(AgentError::Io {
            action: "inspect",
            path: link,
            source: error,
        }),
        Ok(metadata) if !metadata.is_symlink() => Err(AgentError::UnsafePath {
            service: service.name.clone(),
            path: CURRENT_LINK.into(),
            reason: "is not a symlink; rewind manages `current` as a link to releases/<version>"
                .into(),
        }),
        Ok(_) => {
            let target = fs::read_link(&link).map_err(AgentError::io("read link", &link))?;
            let target = target.to_string_lossy().into_owned();
            // Absolute links into our own root are normalised to relative ones.
            let relative = Path::new(&target)
                .strip_prefix(&service.root)
                .map(|path| path.to_string_lossy().into_owned())
                .unwrap_or(target);
            check_release_target(&service.name, &relative)?;
            Ok(Some(relative))
        }
    }
}

/// Most release names reported per service; a root holding more is reported truncated.
const MAX_RETAINED_REPORTED: usize = 256;

/// The release directories under `<root>/releases` (real directories: a link is never
/// followed, so it cannot be rolled back to), sorted: what a rollback can still point `current` at. `None` when the directory
/// cannot be read or holds more than 256 entries: the coordinator then assumes nothing.
pub fn retained_releases(root: &Path) -> Option<Vec<String>> {
    let releases = root.join(RELEASES_DIR);
    let mut versions = Vec::new();
    for entry in std::fs::read_dir(&releases).ok()? {
        let entry = entry.ok()?;
        if versions.len() == MAX_RETAINED_REPORTED {
            return None;
        }
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            versions.push(entry.file_name().into_string().ok()?);
        }
    }
    versions.sort();
    Some(versions)
}

/// A release link must point at `releases/<name>` inside the root.
fn check_release_target(service: &str, target: &str) -> Result<(), AgentError> {
    check_relative(service, target)?;
    let mut parts = Path::new(target).components();
    let is_release = parts
        .next()
        .is_some_and(|first| first.as_os_str() == RELEASES_DIR)
        && parts.next().is_some()
        && parts.next().is_none();
    if !is_release {
        return Err(AgentError::UnsafePath {
            service: service.to_string(),
            path: target.to_string(),
            reason: format!("a release link must point at {RELEASES_DIR}/<version>"),
        });
    }
    Ok(())
}

/// Puts back exactly the snapshot's files and link, then checks that it took.
pub fn restore(
    store: &Store,
    service: &ServiceConfig,
    snapshot_id: &str,
) -> Result<SnapshotRecord, AgentError> {
    let record = store.snapshot(snapshot_id)?;
    let manifest = &record.manifest;
    if manifest.service != service.name {
        return Err(AgentError::invalid(
            "snapshot_id",
            format!(
                "snapshot {snapshot_id} belongs to service {}, not {}",
                manifest.service, service.name
            ),
        ));
    }
    // Check everything before writing anything: a bad manifest must not leave a half-restored
    // host. Every write goes through the root opened once, so a directory swapped for a link
    // while the release is hashed below cannot redirect it.
    let root = ServiceRoot::open(service)?;
    let mut writes = Vec::with_capacity(manifest.files.len());
    for file in &manifest.files {
        check_relative(&service.name, &file.path)?;
        let content = file
            .blob
            .as_deref()
            .map(|hash| store.blob(hash))
            .transpose()?;
        writes.push((file.path.as_str(), content, file.mode, (file.uid, file.gid)));
    }
    if let Some(target) = &manifest.release_link {
        check_release_target(&service.name, target)?;
        // Missing (or not a real directory): refused by name.
        drop(root.open_release(target)?);
        // The release must still be the one captured: never point `current` at a tree that was
        // modified (or replaced) since.
        if let Some(expected) = &manifest.release_digest {
            let (actual, _) = release_digest(service, target, Some(store))?;
            if &actual != expected {
                return Err(AgentError::DigestMismatch {
                    service: service.name.clone(),
                    version: target.clone(),
                    expected: format!("{expected} as captured before the change"),
                    actual,
                });
            }
        }
    }
    // A managed container comes back from the captured image id, never a tag: the image and
    // the spec must be here before anything is written.
    let container = match (&manifest.container, service.manage_container) {
        (Some(state), true) => {
            crate::container::require_image(service, &state.image)?;
            Some((state, store.blob(&state.spec)?))
        }
        (None, false) => None,
        (None, true) => {
            return Err(AgentError::Refused {
                field: "container".into(),
                message: format!(
                    "snapshot {snapshot_id} holds no container (taken before {} managed one): \
                     restoring it would not put the container back",
                    service.name
                ),
            });
        }
        (Some(_), false) => {
            return Err(AgentError::Refused {
                field: "container".into(),
                message: format!(
                    "snapshot {snapshot_id} holds a container, and {} no longer manages one \
                     (manage-container)",
                    service.name
                ),
            });
        }
    };
    for (relative, content, mode, owner) in writes {
        match content {
            Some(bytes) => root.write_atomically(relative, &bytes, mode, Some(owner))?,
            None => root.remove_file(relative)?,
        }
    }
    match &manifest.release_link {
        Some(target) => root.switch_link(CURRENT_LINK, target)?,
        None => root.remove_file(CURRENT_LINK)?,
    }
    if let Some((state, spec)) = &container {
        crate::container::recreate(service, &state.image, spec, state.running)?;
    }
    let after = live_manifest(service, Some(store))?;
    if after != *manifest {
        return Err(AgentError::RestoreMismatch {
            service: service.name.clone(),
            detail: format!(
                "expected {}, found {} after writing",
                manifest.id(),
                after.id()
            ),
        });
    }
    Ok(record)
}

/// Points `<root>/current` at `target` atomically (a new link renamed over the old one).
pub fn switch_link(root: &Path, target: &str) -> Result<(), AgentError> {
    ServiceRoot::open_at("", root)?.switch_link(CURRENT_LINK, target)
}

/// Lines describing how two manifests differ; empty when equal.
pub fn diff(before: &Manifest, after: &Manifest) -> Vec<String> {
    let mut lines = Vec::new();
    if before.container != after.container {
        let show = |state: &Option<crate::container::ContainerState>| match state {
            None => "no container".to_string(),
            Some(state) => format!(
                "{} image {} spec sha256:{}{}",
                state.name,
                state.image,
                &state.spec[..12.min(state.spec.len())],
                if state.running { "" } else { " (stopped)" }
            ),
        };
        lines.push(format!(
            "container: {} -> {}",
            show(&before.container),
            show(&after.container)
        ));
    }
    if before.release_link != after.release_link {
        lines.push(format!(
            "current: {} -> {}",
            show(&before.release_link),
            show(&after.release_link)
        ));
    } else if before.release_digest != after.release_digest {
        lines.push(format!(
            "{}: digest {} -> {}",
            show(&before.release_link),
            show(&before.release_digest),
            show(&after.release_digest)
        ));
    }
    // Env files often hold secrets: their changes are named, never hashed on screen.
    let describe = |file: &FileState| match file.blob.as_deref() {
        None => "absent".to_string(),
        Some(_) if file.env => format!("{} bytes", file.size),
        Some(hash) => format!("{} bytes sha256:{}", file.size, &hash[..12]),
    };
    for file in &before.files {
        let label = if file.env {
            format!("env {}", file.path)
        } else {
            file.path.clone()
        };
        match after.files.iter().find(|other| other.path == file.path) {
            None => lines.push(format!("{label}: not tracked in the second snapshot")),
            Some(other) if other.blob != file.blob => lines.push(format!(
                "{label}: {} -> {}{}",
                describe(file),
                describe(other),
                if file.env && file.blob.is_some() && other.blob.is_some() {
                    " (content changed)"
                } else {
                    ""
                }
            )),
            Some(other) if other.mode != file.mode => {
                lines.push(format!("{label}: mode {:o} -> {:o}", file.mode, other.mode))
            }
            Some(_) => {}
        }
    }
    for file in after
        .files
        .iter()
        .filter(|file| !before.files.iter().any(|other| other.path == file.path))
    {
        lines.push(format!(
            "{}: only tracked in the second snapshot",
            file.path
        ));
    }
    lines
}

fn show(link: &Option<String>) -> String {
    link.clone().unwrap_or_else(|| "(no link)".into())
}

#[cfg(test)]
#[path = "snapshot_test.rs"]
mod tests;
