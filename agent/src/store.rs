//! The agent's local store, in SQLite under `<data-dir>/store` (see [`crate::kv`]; until this
//! release in sled there, copied in at the first start).
//!
//! Trees:
//! - `blobs`: sha256 hex -> bytes. Identical content is stored once, across snapshots. The
//!   bytes of env files (secrets, often) are kept encrypted with the host's store key
//!   (`<data-dir>/store.key`, 32 random bytes made at first start, mode 0600):
//!   ChaCha20-Poly1305, a random nonce each, the content hash as associated data.
//! - `snapshots`: snapshot id -> JSON [`SnapshotRecord`].
//! - `journal`: step id -> JSON [`JournalRecord`]: written (durably) before a step acts and
//!   after it ends, so a redelivered step answers from here instead of acting twice.
//! - `fences`: owner (change or rollback id) -> highest term seen.
//! - `tree-hashes`: release tree -> JSON [`TreeHashes`], the file hashes capture reuses.
//! - `schema`: per schema transaction of this host's database, the report of its prepared
//!   transaction (written before `PREPARE TRANSACTION`, so a prepare redelivered after a crash
//!   answers with it) and whether it was resolved (a resolved transaction is never prepared).
//!
//! Rows exported before a down migration destroys them are files under `<data-dir>/exports`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::self_revert::SelfRevertRecord;

use crate::AgentError;
use crate::kv::{Kv, Tree};
use crate::snapshot::SnapshotRecord;

#[derive(Clone)]
pub struct Store {
    /// The trees: blobs, snapshots, journal, fences, tree hashes, job checkpoints kept at
    /// pause, self-reverts not yet recorded, schema transactions' reports, each service's
    /// desired state, client-cache windows, and container images per release.
    kv: Kv,
    /// `<data-dir>/exports`.
    exports_dir: std::path::PathBuf,
    /// Encrypts the bytes of env files at rest.
    secrets: ring::aead::LessSafeKey,
}

/// How an encrypted blob begins: then a 12-byte nonce, then ciphertext and tag.
const ENCRYPTED_BLOB: &[u8] = b"rewind-enc1:";
/// The store key's file, beside the store.
const STORE_KEY_FILE: &str = "store.key";

/// The host's store key, made (with 32 random bytes, mode 0600, never replaced) on first use:
/// written to a file of its own, synced, then linked into place, so a crash leaves either no key
/// or a whole one.
fn store_key(data_dir: &Path) -> Result<ring::aead::LessSafeKey, AgentError> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(STORE_KEY_FILE);
    let mut bytes = [0u8; 32];
    if !path.exists() {
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| AgentError::Store("no randomness for the store key".into()))?;
        let staged = data_dir.join(format!(".store-key-{}", std::process::id()));
        let _ = std::fs::remove_file(&staged);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staged)
            .map_err(AgentError::io("create", &staged))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(AgentError::io("write", &staged))?;
        // A link never replaces: a key another process made meanwhile stays.
        let linked = std::fs::hard_link(&staged, &path);
        let _ = std::fs::remove_file(&staged);
        match linked {
            Ok(()) => {
                if let Ok(dir) = std::fs::File::open(data_dir) {
                    let _ = dir.sync_all();
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(AgentError::io("create", &path)(error)),
        }
    }
    let mut file = std::fs::File::open(&path).map_err(AgentError::io("open", &path))?;
    let mut read = Vec::with_capacity(33);
    std::io::Read::by_ref(&mut file)
        .take(33)
        .read_to_end(&mut read)
        .map_err(AgentError::io("read", &path))?;
    if read.len() != bytes.len() {
        return Err(AgentError::Store(format!(
            "{} holds {} bytes, not the 32 of a store key",
            path.display(),
            read.len()
        )));
    }
    bytes.copy_from_slice(&read);
    let key = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, &bytes)
        .map_err(|_| AgentError::Store("the store key is not a ChaCha20 key".into()))?;
    Ok(ring::aead::LessSafeKey::new(key))
}

/// What rewind last put on a service here: the manifest after an activation, or the snapshot a
/// restore brought back. Whatever differs from it later was changed by something else (a hotfix
/// by hand, a config tool): that is drift.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    pub manifest: crate::snapshot::Manifest,
    /// Unit state, packages, container image as they were then.
    #[serde(default)]
    pub facts: crate::facts::ServiceFacts,
    pub set_at_ms: u64,
    /// The step that set it (`ch-3/activate/web-1`, `rb-2/web/restore/web-1`).
    pub set_by: String,
}

/// A step's journal entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JournalRecord {
    pub step_id: String,
    pub term: u64,
    pub started_at_ms: u64,
    /// Set once the step ended.
    pub outcome: Option<StepOutcome>,
    /// How many times the step began acting on this host: 1, unless the agent stopped mid-step
    /// and ran it again after a restart (steps are idempotent). Evidence for "nothing ran twice".
    #[serde(default = "one")]
    pub runs: u32,
}

/// A client-cache window's end as stored (big-endian milliseconds).
fn due_of(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn one() -> u32 {
    1
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepOutcome {
    pub ok: bool,
    pub detail: String,
    pub snapshot_id: String,
    pub finished_at_ms: u64,
    /// What a schema step found on its shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<rewind_proto::v1::ShardReport>,
}

/// Where a service's pending container is kept beside its `service/version` entries (a
/// service name never starts with a NUL).
fn pending_key(service: &str) -> String {
    format!("\0pending/{service}")
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, AgentError> {
        Ok(Self {
            kv: Kv::open(dir)?,
            exports_dir: dir
                .parent()
                .map_or_else(|| dir.join("exports"), |data_dir| data_dir.join("exports")),
            secrets: store_key(dir.parent().unwrap_or(dir))?,
        })
    }

    /// Stores `bytes` under their sha256 unless already present, encrypted if `secret`;
    /// returns (hash, newly stored). Not synced: durable with the snapshot record that names
    /// it, which is.
    pub fn put_blob(&self, bytes: &[u8], secret: bool) -> Result<(String, bool), AgentError> {
        let hash = rewind_shared::digest::sha256_hex(bytes);
        if let Some(stored) = self.kv.get(Tree::Blobs, hash.as_bytes())? {
            // Kept in the clear before env files were encrypted (or as a config file of the
            // same content): encrypted from now on.
            if secret && !stored.starts_with(ENCRYPTED_BLOB) {
                self.kv.insert_unsynced(
                    Tree::Blobs,
                    hash.as_bytes(),
                    &self.encrypt(&hash, bytes)?,
                )?;
            }
            return Ok((hash, false));
        }
        let stored = if secret {
            self.encrypt(&hash, bytes)?
        } else {
            bytes.to_vec()
        };
        let inserted = self.kv.insert_new(Tree::Blobs, hash.as_bytes(), &stored)?;
        Ok((hash, inserted))
    }

    fn encrypt(&self, hash: &str, bytes: &[u8]) -> Result<Vec<u8>, AgentError> {
        let mut nonce = [0u8; ring::aead::NONCE_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| AgentError::Store("no randomness for a nonce".into()))?;
        let mut sealed = bytes.to_vec();
        self.secrets
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(hash.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| AgentError::Store(format!("cannot encrypt blob {hash}")))?;
        Ok([ENCRYPTED_BLOB, &nonce[..], &sealed].concat())
    }

    fn decrypt(&self, hash: &str, stored: &[u8]) -> Result<Vec<u8>, AgentError> {
        let unreadable = || {
            AgentError::Store(format!(
                "blob {hash} does not decrypt with this host's store key ({STORE_KEY_FILE} \
                 replaced or the blob damaged)"
            ))
        };
        let rest = &stored[ENCRYPTED_BLOB.len()..];
        if rest.len() < ring::aead::NONCE_LEN {
            return Err(unreadable());
        }
        let (nonce, sealed) = rest.split_at(ring::aead::NONCE_LEN);
        let nonce =
            ring::aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| unreadable())?;
        let mut opened = sealed.to_vec();
        let plain = self
            .secrets
            .open_in_place(nonce, ring::aead::Aad::from(hash.as_bytes()), &mut opened)
            .map_err(|_| unreadable())?;
        Ok(plain.to_vec())
    }

    pub fn blob(&self, hash: &str) -> Result<Vec<u8>, AgentError> {
        let stored = self
            .kv
            .get(Tree::Blobs, hash.as_bytes())?
            .ok_or_else(|| AgentError::Store(format!("blob {hash} is missing")))?;
        let bytes = if stored.starts_with(ENCRYPTED_BLOB) {
            self.decrypt(hash, &stored)?
        } else {
            stored
        };
        // Content addressing lets us catch a corrupted store before it is restored onto a host.
        let actual = rewind_shared::digest::sha256_hex(&bytes);
        if actual != hash {
            return Err(AgentError::Store(format!(
                "blob {hash} is corrupt: its content hashes to {actual}"
            )));
        }
        Ok(bytes)
    }

    pub fn put_snapshot(&self, record: &SnapshotRecord) -> Result<(), AgentError> {
        self.kv
            .insert(Tree::Snapshots, record.id.as_bytes(), &to_json(record)?)
    }

    pub fn snapshot(&self, id: &str) -> Result<SnapshotRecord, AgentError> {
        let bytes = self
            .kv
            .get(Tree::Snapshots, id.as_bytes())?
            .ok_or_else(|| AgentError::UnknownSnapshot(id.to_string()))?;
        from_json(&bytes)
    }

    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>, AgentError> {
        values(self.kv.entries(Tree::Snapshots)?)
    }

    pub fn journal(&self, key: &str) -> Result<Option<JournalRecord>, AgentError> {
        self.kv
            .get(Tree::Journal, key.as_bytes())?
            .map(|bytes| from_json(&bytes))
            .transpose()
    }

    /// Writes a journal record durably: the record is on disk before the caller acts.
    pub fn put_journal(&self, key: &str, record: &JournalRecord) -> Result<(), AgentError> {
        self.kv
            .insert(Tree::Journal, key.as_bytes(), &to_json(record)?)
    }

    pub fn journal_entries(&self) -> Result<Vec<JournalRecord>, AgentError> {
        values(self.kv.entries(Tree::Journal)?)
    }

    /// Journal records with their keys (`cluster/step_id`).
    pub fn journal_with_keys(&self) -> Result<Vec<(String, JournalRecord)>, AgentError> {
        self.kv
            .entries(Tree::Journal)?
            .into_iter()
            .map(|(key, bytes)| {
                Ok((
                    String::from_utf8_lossy(&key).into_owned(),
                    from_json(&bytes)?,
                ))
            })
            .collect()
    }

    /// The highest term seen for `owner` (0 when none; `u64::MAX` once a restore closed it).
    pub fn fence(&self, owner: &str) -> Result<u64, AgentError> {
        Ok(self
            .kv
            .get(Tree::Fences, owner.as_bytes())?
            .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
            .map_or(0, u64::from_be_bytes))
    }

    pub fn put_self_revert(&self, record: &SelfRevertRecord) -> Result<(), AgentError> {
        self.kv
            .insert(Tree::SelfReverts, record.id.as_bytes(), &to_json(record)?)
    }

    /// Self-reverts no coordinator has recorded yet, oldest first.
    pub fn self_reverts(&self) -> Result<Vec<SelfRevertRecord>, AgentError> {
        let mut records: Vec<SelfRevertRecord> = values(self.kv.entries(Tree::SelfReverts)?)?;
        records.sort_by_key(|record| record.at_ms);
        Ok(records)
    }

    /// A coordinator recorded the self-revert: it need not be reported again.
    pub fn forget_self_revert(&self, id: &str) -> Result<(), AgentError> {
        self.kv.remove(Tree::SelfReverts, id.as_bytes())
    }

    /// Records what rewind just put on `service` (durably: it is what drift is judged by).
    pub fn put_desired(&self, service: &str, desired: &DesiredState) -> Result<(), AgentError> {
        self.kv
            .insert(Tree::Desired, service.as_bytes(), &to_json(desired)?)
    }

    /// Remembers that `service`'s client-cache window ends at `due_ms`; a window already open
    /// that ends later keeps its end.
    pub fn put_client_cache_off(&self, service: &str, due_ms: u64) -> Result<(), AgentError> {
        self.kv
            .update(Tree::ClientCacheOff, service.as_bytes(), |old| {
                let old = old.and_then(due_of).unwrap_or(0);
                old.max(due_ms).to_be_bytes().to_vec()
            })?;
        Ok(())
    }

    /// Each service with a client-cache window open, with when it ends (`None`: an entry that
    /// does not read as a time).
    pub fn client_cache_offs(&self) -> Result<Vec<(String, Option<u64>)>, AgentError> {
        Ok(self
            .kv
            .entries(Tree::ClientCacheOff)?
            .into_iter()
            .map(|(service, due)| (String::from_utf8_lossy(&service).into_owned(), due_of(&due)))
            .collect())
    }

    /// When `service`'s client-cache window ends, if one is open.
    pub fn client_cache_off(&self, service: &str) -> Result<Option<u64>, AgentError> {
        Ok(self
            .kv
            .get(Tree::ClientCacheOff, service.as_bytes())?
            .and_then(|due| due_of(&due)))
    }

    /// Forgets `service`'s window once its `off` hook ran, unless a later step moved it on.
    pub fn clear_client_cache_off(&self, service: &str, due_ms: u64) -> Result<(), AgentError> {
        self.kv.remove_if(
            Tree::ClientCacheOff,
            service.as_bytes(),
            &due_ms.to_be_bytes(),
        )
    }

    /// Forgets `service`'s window whatever it holds (unreadable, or nothing can close it).
    pub fn remove_client_cache_off(&self, service: &str) -> Result<(), AgentError> {
        self.kv.remove(Tree::ClientCacheOff, service.as_bytes())
    }

    /// Remembers that `service`'s release `version` is the image `image` (a managed container
    /// activated from it), so the agent can say which releases it still holds.
    pub fn put_container_version(
        &self,
        service: &str,
        version: &str,
        image: &str,
    ) -> Result<(), AgentError> {
        let key = format!("{service}/{version}");
        self.kv
            .insert(Tree::ContainerVersions, key.as_bytes(), image.as_bytes())
    }

    /// Keeps what an activation is about to create `service`'s container from (the image and
    /// spec), until it runs: a run cut off between removing the old container and creating the
    /// new one finishes from it.
    pub fn put_container_pending(
        &self,
        service: &str,
        image: &str,
        spec: &[u8],
    ) -> Result<(), AgentError> {
        let value = to_json(&(image, hex::encode(spec)))?;
        self.kv.insert(
            Tree::ContainerVersions,
            pending_key(service).as_bytes(),
            &value,
        )
    }

    /// What an activation of `service`'s container was creating it from, if one was cut off.
    pub fn container_pending(
        &self,
        service: &str,
    ) -> Result<Option<(String, Vec<u8>)>, AgentError> {
        let Some(bytes) = self
            .kv
            .get(Tree::ContainerVersions, pending_key(service).as_bytes())?
        else {
            return Ok(None);
        };
        let (image, spec): (String, String) = from_json(&bytes)?;
        let spec = hex::decode(spec).map_err(|error| AgentError::Store(error.to_string()))?;
        Ok(Some((image, spec)))
    }

    /// Forgets `service`'s pending container once it runs.
    pub fn clear_container_pending(&self, service: &str) -> Result<(), AgentError> {
        self.kv
            .remove(Tree::ContainerVersions, pending_key(service).as_bytes())
    }

    /// `service`'s releases activated here as containers: (version, image id), by version.
    pub fn container_versions(&self, service: &str) -> Result<Vec<(String, String)>, AgentError> {
        let prefix = format!("{service}/");
        Ok(self
            .kv
            .entries_with_prefix(Tree::ContainerVersions, prefix.as_bytes())?
            .into_iter()
            .map(|(key, image)| {
                let key = String::from_utf8_lossy(&key);
                (
                    key[prefix.len()..].to_string(),
                    String::from_utf8_lossy(&image).into_owned(),
                )
            })
            .collect())
    }

    /// What rewind last put on `service`, if it has since this agent recorded it.
    pub fn desired(&self, service: &str) -> Result<Option<DesiredState>, AgentError> {
        self.kv
            .get(Tree::Desired, service.as_bytes())?
            .map(|bytes| from_json(&bytes))
            .transpose()
    }

    /// The file hashes last computed for a release tree (`service/releases/v1`); empty if none.
    pub fn tree_hashes(&self, tree: &str) -> Result<TreeHashes, AgentError> {
        self.kv
            .get(Tree::TreeHashes, tree.as_bytes())?
            .map_or(Ok(TreeHashes::default()), |bytes| from_json(&bytes))
    }

    /// Replaces a tree's file hashes (so entries of deleted files go with it). Not synced: a
    /// lost cache only costs a re-hash.
    pub fn put_tree_hashes(&self, tree: &str, hashes: &TreeHashes) -> Result<(), AgentError> {
        self.kv
            .insert_unsynced(Tree::TreeHashes, tree.as_bytes(), &to_json(hashes)?)
    }

    /// Keeps a service's job checkpoint as it was when `owner` (a rollback) paused its
    /// processors (`None`: there was no checkpoint file yet).
    pub fn put_checkpoint(
        &self,
        service: &str,
        owner: &str,
        kept: Option<&KeptFile>,
    ) -> Result<(), AgentError> {
        self.kv.insert(
            Tree::Checkpoints,
            &checkpoint_key(service, owner),
            &to_json(&kept)?,
        )
    }

    /// The checkpoint `owner` kept at pause: `None` when it paused nothing, `Some(None)` when
    /// the file did not exist at pause.
    pub fn checkpoint(
        &self,
        service: &str,
        owner: &str,
    ) -> Result<Option<Option<KeptFile>>, AgentError> {
        self.kv
            .get(Tree::Checkpoints, &checkpoint_key(service, owner))?
            .map(|stored| from_json(&stored))
            .transpose()
    }

    pub fn remove_checkpoint(&self, service: &str, owner: &str) -> Result<(), AgentError> {
        self.kv
            .remove(Tree::Checkpoints, &checkpoint_key(service, owner))
    }

    /// Where rows a down migration would destroy are exported: `<data-dir>/exports`.
    pub fn exports_dir(&self) -> &Path {
        &self.exports_dir
    }

    /// Keeps (durably) the report of a transaction about to be prepared.
    pub fn put_prepared_report(
        &self,
        key: &str,
        report: &rewind_proto::v1::ShardReport,
    ) -> Result<(), AgentError> {
        self.kv.insert(
            Tree::Schema,
            format!("prepared/{key}").as_bytes(),
            &to_json(report)?,
        )
    }

    pub fn prepared_report(
        &self,
        key: &str,
    ) -> Result<Option<rewind_proto::v1::ShardReport>, AgentError> {
        match self
            .kv
            .get(Tree::Schema, format!("prepared/{key}").as_bytes())?
        {
            Some(bytes) => Ok(Some(from_json(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Marks a transaction resolved (durably): it is never prepared again.
    pub fn mark_resolved(&self, key: &str) -> Result<(), AgentError> {
        self.kv
            .insert(Tree::Schema, format!("resolved/{key}").as_bytes(), &[1u8])
    }

    pub fn is_resolved(&self, key: &str) -> Result<bool, AgentError> {
        self.kv
            .contains(Tree::Schema, format!("resolved/{key}").as_bytes())
    }

    /// Records `term` for `owner` unless a higher one was seen; returns the highest seen.
    pub fn raise_fence(&self, owner: &str, term: u64) -> Result<u64, AgentError> {
        let updated = self.kv.update(Tree::Fences, owner.as_bytes(), |old| {
            let seen = old
                .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
                .map_or(0, u64::from_be_bytes);
            seen.max(term).to_be_bytes().to_vec()
        })?;
        Ok(<[u8; 8]>::try_from(updated.as_slice()).map_or(term, u64::from_be_bytes))
    }
}

/// Content hashes of a release tree's files, with the size, mtime and inode each had when it
/// was hashed: a file still matching all three is not read again.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TreeHashes {
    pub files: std::collections::BTreeMap<String, CachedHash>,
}

/// A file's content hash and what its open file said of it when hashed. The hash is reused only
/// while all of it is unchanged, ctime included (the kernel sets it on every change and nothing
/// can set it back), and only if the file had not changed within 100 ms before being hashed (a
/// change in the same timestamp tick, which the kernel's coarse clock makes up to a jiffy,
/// would leave every field as it was).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CachedHash {
    pub size: u64,
    pub mtime_ns: i64,
    pub inode: u64,
    /// Entries written before ctime was kept have 0 here, which no file matches: re-hashed.
    #[serde(default)]
    pub ctime_ns: i64,
    #[serde(default)]
    pub device: u64,
    #[serde(default)]
    pub hashed_at_ns: i64,
    pub sha256: String,
}

impl CachedHash {
    /// Whether this hash still holds for a file whose open file says `facts`.
    pub fn holds_for(&self, facts: &rewind_shared::digest::FileFacts) -> bool {
        const SAME_TICK_NS: i64 = 100_000_000;
        (
            self.size,
            self.mtime_ns,
            self.ctime_ns,
            self.inode,
            self.device,
        ) == (
            facts.size,
            facts.mtime_ns,
            facts.ctime_ns,
            facts.inode,
            facts.device,
        ) && facts.ctime_ns < self.hashed_at_ns.saturating_sub(SAME_TICK_NS)
    }
}

/// A file's bytes with the mode and owner it had, to be written back exactly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptFile {
    #[serde(with = "hex_bytes")]
    pub bytes: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

mod hex_bytes {
    pub fn serialize<S: serde::Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u8>, D::Error> {
        let text: String = serde::Deserialize::deserialize(deserializer)?;
        hex::decode(text).map_err(serde::de::Error::custom)
    }
}

fn checkpoint_key(service: &str, owner: &str) -> Vec<u8> {
    format!("{service}/{owner}").into_bytes()
}

/// The values of `entries`, decoded.
fn values<T: serde::de::DeserializeOwned>(
    entries: crate::kv::Entries,
) -> Result<Vec<T>, AgentError> {
    entries
        .into_iter()
        .map(|(_, bytes)| from_json(&bytes))
        .collect()
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, AgentError> {
    serde_json::to_vec(value).map_err(|error| AgentError::Store(format!("encode: {error}")))
}

fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, AgentError> {
    serde_json::from_slice(bytes).map_err(|error| AgentError::Store(format!("decode: {error}")))
}
