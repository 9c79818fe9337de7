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
use std::io::Read;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::AgentError;
use crate::config::ServiceConfig;
use crate::paths::{check_relative, confined};
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
    let (manifest, tree) = read_manifest(service, Some(store), |bytes| {
        let (hash, inserted) = store.put_blob(bytes)?;
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
    store.flush()?;
    Ok(record)
}

/// The manifest of the service's live state, storing nothing but, with a store, the release
/// tree's file hashes for the next time.
pub fn live_manifest(
    service: &ServiceConfig,
    store: Option<&Store>,
) -> Result<Manifest, AgentError> {
    let (manifest, _) = read_manifest(service, store, |bytes| {
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
    let dir = confined(&service.name, &service.root, target)?;
    let key = format!("{}/{target}", service.name);
    let cached = match store {
        Some(store) => store.tree_hashes(&key)?,
        None => TreeHashes::default(),
    };
    let mut fresh = TreeHashes::default();
    let mut stats = TreeStats::default();
    let digest = rewind_shared::digest::tree_digest_with(&dir, &mut |path, metadata| {
        let relative = path
            .strip_prefix(&dir)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned();
        stats.files += 1;
        stats.bytes += metadata.len();
        let now = CachedHash {
            size: metadata.len(),
            mtime_ns: metadata.mtime() * 1_000_000_000 + metadata.mtime_nsec(),
            inode: metadata.ino(),
            sha256: String::new(),
        };
        let sha256 = match cached.files.get(&relative) {
            Some(known)
                if (known.size, known.mtime_ns, known.inode)
                    == (now.size, now.mtime_ns, now.inode) =>
            {
                known.sha256.clone()
            }
            _ => {
                stats.hashed_files += 1;
                rewind_shared::digest::file_sha256(path)?
            }
        };
        fresh.files.insert(
            relative,
            CachedHash {
                sha256: sha256.clone(),
                ..now
            },
        );
        Ok(sha256)
    })?;
    if let Some(store) = store {
        store.put_tree_hashes(&key, &fresh)?;
    }
    Ok((digest, stats))
}

/// Reads the link, the release's digest and every declared file; `keep` turns each file's
/// bytes into its blob hash.
fn read_manifest(
    service: &ServiceConfig,
    store: Option<&Store>,
    mut keep: impl FnMut(&[u8]) -> Result<String, AgentError>,
) -> Result<(Manifest, TreeStats), AgentError> {
    let release_link = read_release_link(service)?;
    // A link to a release that is not there (or not a release) has no digest to record.
    let (release_digest, tree) = match &release_link {
        Some(target)
            if check_release_target(&service.name, target).is_ok()
                && confined(&service.name, &service.root, target).is_ok_and(|dir| dir.is_dir()) =>
        {
            let (digest, stats) = release_digest(service, target, store)?;
            (Some(digest), stats)
        }
        _ => (None, TreeStats::default()),
    };
    let mut files = Vec::with_capacity(service.config_files.len() + service.env_files.len());
    let declared = (service.config_files.iter().map(|path| (path, false)))
        .chain(service.env_files.iter().map(|path| (path, true)));
    for (relative, env) in declared {
        let path = confined(&service.name, &service.root, relative)?;
        let Some((bytes, metadata)) = read_config_file(&service.name, relative, &path)? else {
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
            blob: Some(keep(&bytes)?),
            mode: metadata.permissions().mode() & 0o7777,
            size: bytes.len() as u64,
            uid: metadata.uid(),
            gid: metadata.gid(),
            env,
        });
    }
    Ok((
        Manifest {
            service: service.name.clone(),
            release_link,
            release_digest,
            files,
        },
        tree,
    ))
}

/// Reads a config file without following a symlink in its last component, taking the content
/// and the metadata from the same open file. `None` when it does not exist.
pub(crate) fn read_config_file(
    service: &str,
    relative: &str,
    path: &Path,
) -> Result<Option<(Vec<u8>, fs::Metadata)>, AgentError> {
    let not_regular = || AgentError::UnsafePath {
        service: service.to_string(),
        path: relative.to_string(),
        reason: "is not a regular file (a symlink or directory is never captured as config)".into(),
    };
    let mut file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) if error.raw_os_error() == Some(libc::ELOOP) => return Err(not_regular()),
        Err(error) => {
            return Err(AgentError::Io {
                action: "open",
                path: path.to_path_buf(),
                source: error,
            });
        }
    };
    let metadata = file.metadata().map_err(AgentError::io("inspect", path))?;
    if !metadata.is_file() {
        return Err(not_regular());
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.read_to_end(&mut bytes)
        .map_err(AgentError::io("read", path))?;
    Ok(Some((bytes, metadata)))
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

/// The release directories under `<root>/releases` (a link to a directory counts, as restore
/// follows it), sorted: what a rollback can still point `current` at. `None` when the directory
/// cannot be read or holds more than 256 entries: the coordinator then assumes nothing.
pub fn retained_releases(root: &Path) -> Option<Vec<String>> {
    let releases = root.join(RELEASES_DIR);
    let mut versions = Vec::new();
    for entry in std::fs::read_dir(&releases).ok()? {
        let entry = entry.ok()?;
        if versions.len() == MAX_RETAINED_REPORTED {
            return None;
        }
        if fs::metadata(entry.path()).is_ok_and(|metadata| metadata.is_dir()) {
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
        return Err(AgentError::Invalid(format!(
            "snapshot {snapshot_id} belongs to service {}, not {}",
            manifest.service, service.name
        )));
    }
    // Check everything before writing anything: a bad manifest must not leave a half-restored host.
    let mut writes = Vec::with_capacity(manifest.files.len());
    for file in &manifest.files {
        let path = confined(&service.name, &service.root, &file.path)?;
        let content = file
            .blob
            .as_deref()
            .map(|hash| store.blob(hash))
            .transpose()?;
        writes.push((path, content, file.mode, (file.uid, file.gid)));
    }
    if let Some(target) = &manifest.release_link {
        check_release_target(&service.name, target)?;
        let release_dir = confined(&service.name, &service.root, target)?;
        if !release_dir.is_dir() {
            return Err(AgentError::MissingRelease {
                service: service.name.clone(),
                version: target.clone(),
                path: release_dir,
            });
        }
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
    for (path, content, mode, owner) in writes {
        match content {
            Some(bytes) => write_atomically(&path, &bytes, mode, Some(owner))?,
            None => remove_if_present(&path)?,
        }
    }
    match &manifest.release_link {
        Some(target) => switch_link(&service.root, target)?,
        None => remove_if_present(&service.root.join(CURRENT_LINK))?,
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
    let link = root.join(CURRENT_LINK);
    let staging = root.join(format!(".{CURRENT_LINK}.rewind-new"));
    remove_if_present(&staging)?;
    std::os::unix::fs::symlink(target, &staging)
        .map_err(AgentError::io("create link", &staging))?;
    fs::rename(&staging, &link).map_err(AgentError::io("replace link", &link))?;
    sync_dir(root)
}

/// Writes `bytes` to `path` through a staging file in the same directory, then renames it over
/// the target. The staging file is created exclusively (`O_EXCL`), so a symlink planted under its
/// name makes the write fail instead of redirecting it. Owner and group are set when given.
pub(crate) fn write_atomically(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), AgentError> {
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    // The directory may be gone since capture (or never have existed): put it back. Its path
    // was confined to the service root by the caller.
    fs::create_dir_all(&dir).map_err(AgentError::io("create", &dir))?;
    let staging = dir.join(format!(
        ".{}.rewind-new",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    remove_if_present(&staging)?;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staging)
        .map_err(AgentError::io("create", &staging))?;
    file.write_all(bytes)
        .map_err(AgentError::io("write", &staging))?;
    if let Some((uid, gid)) = owner {
        let metadata = file
            .metadata()
            .map_err(AgentError::io("inspect", &staging))?;
        if (metadata.uid(), metadata.gid()) != (uid, gid) {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                .map_err(AgentError::io("chown", &staging))?;
        }
    }
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(AgentError::io("chmod", &staging))?;
    file.sync_all().map_err(AgentError::io("sync", &staging))?;
    fs::rename(&staging, path).map_err(AgentError::io("replace", path))?;
    sync_dir(&dir)
}

fn remove_if_present(path: &Path) -> Result<(), AgentError> {
    match fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(AgentError::Io {
            action: "remove",
            path: path.into(),
            source: error,
        }),
        _ => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> Result<(), AgentError> {
    fs::File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(AgentError::io("sync", dir))
}

/// Lines describing how two manifests differ; empty when equal.
pub fn diff(before: &Manifest, after: &Manifest) -> Vec<String> {
    let mut lines = Vec::new();
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
