//! raft-rs [`Storage`]: the Raft log and hard state in TiKV's raft-engine, the rest in sled.
//!
//! raft-engine (directory `raft-engine/`, one Raft group) holds the log and the hard state: a
//! `Ready`'s entries and hard state are one write and one `fdatasync`. It was chosen over sled
//! by measurement (`coordinator/benches/raft_log.rs`, docs/ARCHITECTURE.md §9). sled keeps the
//! tree `raft-meta` (`conf-state`, `snapshot`, `cluster-id`: protobuf messages and bytes) and
//! `audit`/`archive` (the audit entries from cluster version 7, see [`super::SledAuditStore`]).
//! The snapshot's data, the replicated state at its index (encoded by
//! [`super::snapshot_codec`]), is a file of its own in `state-snapshots/` (written, fsynced and
//! renamed before the record naming it is stored).
//!
//! Two stores need an order where one transaction used to do: a snapshot's record (and the
//! audit entries it covers) reach disk in sled before the log below it is dropped, and at open
//! the log is repaired against the snapshot record (entries at or below it dropped, a log that
//! does not follow it cleared, a commit index below it raised). Stores written before the move
//! keep the log in sled's `raft-log` tree: copied into raft-engine once, at open.
//!
//! Kept in one file (over 700 lines): the storage invariants (log, hard state, snapshot, and the
//! order they reach disk) are checked by reading them together.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use raft_engine::{Command, LogBatch, MessageExt, ReadableSize};
use sled::Transactional as _;
use sled::transaction::ConflictableTransactionError;
use tracing::info;

use crate::errors::CoordinatorError;

const HARD_STATE_KEY: &[u8] = b"hard-state";
const CONF_STATE_KEY: &[u8] = b"conf-state";
const SNAPSHOT_KEY: &[u8] = b"snapshot";
const CLUSTER_ID_KEY: &[u8] = b"cluster-id";
/// The sled tree that held the log before it moved to raft-engine (converted at open).
const SLED_LOG_TREE: &[u8] = b"raft-log";
/// raft-engine keeps many Raft groups; a member is one.
const RAFT_GROUP: u64 = 1;
/// What sled's `hard-state` key holds once the log has moved: bytes no protobuf decoder accepts
/// (field 0, wire type 7), so a previous release started on a converted directory refuses to
/// start instead of reading an empty log and a blank term and vote.
const MOVED_HARD_STATE: &[u8] = &[0x07];
/// Entries copied per write when an old store's log is converted.
const CONVERT_CHUNK: usize = 1024;

/// How raft-engine finds an entry's index.
#[derive(Clone)]
struct EntryIndexOf;

impl MessageExt for EntryIndexOf {
    type Entry = Entry;

    fn index(entry: &Entry) -> u64 {
        entry.index
    }
}

/// The terms of the entries the log holds, from `first` on, in memory: raft-rs asks for terms
/// on every append and acknowledgement, and raft-engine would read (and decompress) a block of
/// its file for each. Changed only together with the log, under its lock, so it never
/// disagrees with it. At most the entries between two snapshots (`storage.snapshot-every`).
#[derive(Default)]
struct LogTerms {
    first: u64,
    terms: VecDeque<u64>,
}

impl LogTerms {
    fn get(&self, index: u64) -> Option<u64> {
        let offset = index.checked_sub(self.first)?;
        self.terms.get(usize::try_from(offset).ok()?).copied()
    }

    fn span(&self) -> Option<(u64, u64)> {
        (!self.terms.is_empty()).then(|| (self.first, self.first + self.terms.len() as u64 - 1))
    }

    /// As raft-engine appends: a suffix from the first new index is replaced.
    fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        if self.terms.is_empty() {
            self.first = first.index;
        } else {
            self.terms.truncate((first.index - self.first) as usize);
        }
        self.terms.extend(entries.iter().map(|entry| entry.term));
    }

    /// Drops the entries below `index`.
    fn compact_to(&mut self, index: u64) {
        if index <= self.first {
            return;
        }
        let dropped = ((index - self.first) as usize).min(self.terms.len());
        self.terms.drain(..dropped);
        self.first = index;
    }
}

type LogEngine = raft_engine::Engine;

#[derive(Clone)]
pub struct RaftStore {
    db: sled::Db,
    meta: sled::Tree,
    /// The log and the hard state. Writes go through [`Self::write_log`], under `terms`' lock.
    log: Arc<LogEngine>,
    terms: Arc<Mutex<LogTerms>>,
    /// Set by the first failed write to the log, on any thread: a failed fsync is never
    /// retried or followed by another (the kernel reports a lost page to one fsync only), so
    /// every later write fails too and the member stops.
    log_failed: Arc<std::sync::atomic::AtomicBool>,
    audit: super::SledAuditStore,
    /// The latest snapshot's index and term, kept in memory: raft-rs asks for the first index
    /// and terms constantly, and decoding the whole snapshot (the state) each time made commits
    /// slow once a snapshot existed.
    snapshot_metadata: Arc<Mutex<SnapshotMetadata>>,
    /// Held while a snapshot is written: the Raft thread installs received snapshots while a
    /// snapshot of its own may be written on another thread, and the newer one must win.
    snapshot_writes: Arc<Mutex<()>>,
    /// Where snapshots' data lives: `<index>.state`, the current one only.
    snapshot_dir: PathBuf,
}

impl RaftStore {
    pub fn open(dir: &Path) -> Result<Self, CoordinatorError> {
        // Flushed only when asked, after each record that must be durable: sled's own flusher
        // (every 500 ms) would report a failed fsync only in its log, and could take the
        // kernel's one report of it from the next flush.
        let open = || sled::Config::new().path(dir).flush_every_ms(None).open();
        let db = match open() {
            // A snapshot sled left half written (a full disk) reads as corruption: without it,
            // sled recovers from its log.
            Err(sled::Error::Corruption { .. })
                if rewind_shared::config::remove_unfinished_sled_snapshots(dir)
                    .map_err(|error| storage_error("clean", dir.display(), error))? =>
            {
                open()
            }
            opened => opened,
        }
        .map_err(|error| storage_error("open", dir.display(), error))?;
        let meta = db
            .open_tree("raft-meta")
            .map_err(|error| storage_error("open tree", "raft-meta", error))?;
        let audit = super::SledAuditStore::open(&db)
            .map_err(|error| storage_error("open tree", "audit", error))?;
        let log_dir = dir.join("raft-engine");
        let log = LogEngine::open(raft_engine::Config {
            dir: log_dir.display().to_string(),
            // Files are purged once the log is compacted below them and all of them pass
            // `purge_threshold`: about 32 MiB of log files at most, beyond the live log.
            target_file_size: ReadableSize::mb(8),
            purge_threshold: ReadableSize::mb(32),
            // Purged files are deleted, not kept for reuse (they would hold disk for nothing
            // on a member that writes little).
            enable_log_recycle: false,
            ..raft_engine::Config::default()
        })
        .map_err(|error| storage_error("open", log_dir.display(), error))?;
        let mut store = Self {
            db,
            meta,
            log: Arc::new(log),
            terms: Arc::default(),
            log_failed: Arc::default(),
            audit,
            snapshot_metadata: Arc::default(),
            snapshot_writes: Arc::default(),
            snapshot_dir: dir.join("state-snapshots"),
        };
        std::fs::create_dir_all(&store.snapshot_dir)
            .map_err(|error| storage_error("create", store.snapshot_dir.display(), error))?;
        // Snapshots that were being received when the member stopped are of no use now.
        let incoming = store.incoming_snapshot_dir();
        if incoming.exists() {
            std::fs::remove_dir_all(&incoming)
                .map_err(|error| storage_error("empty", incoming.display(), error))?;
        }
        std::fs::create_dir_all(&incoming)
            .map_err(|error| storage_error("create", incoming.display(), error))?;
        let metadata = store
            .get::<Snapshot>(SNAPSHOT_KEY)?
            .unwrap_or_default()
            .take_metadata();
        let current = metadata.index;
        store.snapshot_metadata = Arc::new(Mutex::new(metadata));
        store.convert_sled_log()?;
        store.load_terms()?;
        store.repair_log()?;
        if store.is_initialized()? {
            // Partial files of writes a crash interrupted.
            let has_current = store.snapshot_file(current).exists();
            if has_current {
                store.remove_other_snapshot_files(current, true);
            }
        }
        Ok(store)
    }

    /// A store written before the log moved to raft-engine keeps it in sled's `raft-log` tree
    /// and the hard state in `raft-meta`: both are copied into raft-engine (synced), then the
    /// tree is dropped and the old hard state replaced by [`MOVED_HARD_STATE`], flushed. A
    /// crash before the tree is gone repeats the copy from a cleared log (with the hard state
    /// already copied when sled's is gone); after it, the marker is written if missing.
    fn convert_sled_log(&self) -> Result<(), CoordinatorError> {
        let has_sled_log = self
            .db
            .tree_names()
            .iter()
            .any(|name| name.as_ref() == SLED_LOG_TREE);
        let sled_hard_state = self
            .meta
            .get(HARD_STATE_KEY)
            .map_err(|error| storage_error("read", "hard-state", error))?;
        let moved = sled_hard_state.as_deref() == Some(MOVED_HARD_STATE);
        if has_sled_log {
            let hard_state = match &sled_hard_state {
                Some(bytes) if !moved => HardState::parse_from_bytes(bytes)
                    .map_err(|error| storage_error("decode", "hard-state", error))?,
                _ => self.hard_state()?,
            };
            let old = self
                .db
                .open_tree(SLED_LOG_TREE)
                .map_err(|error| storage_error("open tree", "raft-log", error))?;
            let mut batch = LogBatch::default();
            batch.add_command(RAFT_GROUP, Command::Clean);
            let mut chunk = Vec::with_capacity(CONVERT_CHUNK);
            let mut copied = 0usize;
            for item in old.iter().values() {
                let bytes = item.map_err(|error| storage_error("read", "raft-log", error))?;
                chunk.push(
                    Entry::parse_from_bytes(&bytes)
                        .map_err(|error| storage_error("decode", "an entry of raft-log", error))?,
                );
                if chunk.len() == CONVERT_CHUNK {
                    copied += chunk.len();
                    add_entries(&mut batch, &chunk)?;
                    self.write_batch(&mut batch, false)?;
                    chunk.clear();
                }
            }
            copied += chunk.len();
            add_entries(&mut batch, &chunk)?;
            put_hard_state(&mut batch, &hard_state)?;
            self.write_batch(&mut batch, true)?;
            drop(old);
            self.db
                .drop_tree(SLED_LOG_TREE)
                .map_err(|error| storage_error("drop tree", "raft-log", error))?;
            info!(
                entries = copied,
                "Moved the Raft log from sled to raft-engine."
            );
        }
        if has_sled_log || (sled_hard_state.is_some() && !moved) {
            self.meta
                .insert(HARD_STATE_KEY, MOVED_HARD_STATE)
                .map_err(|error| storage_error("write", "hard-state", error))?;
            self.flush_sled()?;
        }
        Ok(())
    }

    /// Reads the terms of the log's entries into memory (once, at open).
    fn load_terms(&self) -> Result<(), CoordinatorError> {
        let mut terms = self.lock_terms();
        *terms = LogTerms::default();
        let (Some(first), Some(last)) = (
            self.log.first_index(RAFT_GROUP),
            self.log.last_index(RAFT_GROUP),
        ) else {
            return Ok(());
        };
        let mut index = first;
        while index <= last {
            let mut entries = Vec::new();
            let end = (last + 1).min(index + CONVERT_CHUNK as u64);
            self.log
                .fetch_entries_to::<EntryIndexOf>(RAFT_GROUP, index, end, None, &mut entries)
                .map_err(|error| storage_error("read", "the Raft log", error))?;
            terms.append(&entries);
            index = end;
        }
        Ok(())
    }

    /// Brings the log in line with the snapshot record after a crash between their writes:
    /// entries at or below the snapshot go (a compaction the crash cut short); a log that does
    /// not hold the snapshot's own entry with its term is cleared (an installed snapshot
    /// replaces the log whole); and the commit index is at least the snapshot's. A log that
    /// starts after the snapshot has lost entries: refused, never guessed at.
    fn repair_log(&self) -> Result<(), CoordinatorError> {
        let snapshot = self.snapshot_metadata()?;
        let mut terms = self.lock_terms();
        let mut batch = LogBatch::default();
        let mut repaired = LogTerms::default();
        let mut changed = false;
        if let Some((first, last)) = terms.span() {
            if first > snapshot.index + 1 {
                return Err(storage_error(
                    "open",
                    "the Raft log",
                    format!(
                        "it starts at index {first} but the snapshot is at {}: entries {} to {} \
                         are missing",
                        snapshot.index,
                        snapshot.index + 1,
                        first - 1
                    ),
                ));
            }
            if first <= snapshot.index {
                changed = true;
                if last >= snapshot.index && terms.get(snapshot.index) == Some(snapshot.term) {
                    batch.add_command(
                        RAFT_GROUP,
                        Command::Compact {
                            index: snapshot.index + 1,
                        },
                    );
                    repaired = std::mem::take(&mut *terms);
                    repaired.compact_to(snapshot.index + 1);
                } else {
                    batch.add_command(RAFT_GROUP, Command::Clean);
                }
            } else {
                repaired = std::mem::take(&mut *terms);
            }
        }
        let mut hard_state = self.hard_state()?;
        if hard_state.commit < snapshot.index {
            hard_state.commit = snapshot.index;
            hard_state.term = hard_state.term.max(snapshot.term);
            changed = true;
        }
        if changed {
            // A `Clean` takes the hard state with the log: it is written again after it.
            put_hard_state(&mut batch, &hard_state)?;
            self.write_batch(&mut batch, true)?;
            info!(
                snapshot = snapshot.index,
                log = ?repaired.span(),
                "Repaired the Raft log against the snapshot after a crash."
            );
        }
        *terms = repaired;
        Ok(())
    }

    /// Where snapshots streamed from the leader are written while they arrive (the transport's;
    /// emptied at every open).
    pub fn incoming_snapshot_dir(&self) -> PathBuf {
        self.snapshot_dir.with_file_name("incoming-snapshots")
    }

    /// True once the store holds a membership (bootstrapped, or received from a leader).
    pub fn is_initialized(&self) -> Result<bool, CoordinatorError> {
        Ok(!self.conf_state()?.voters.is_empty() || self.snapshot_metadata()?.index > 0)
    }

    /// Starts a new cluster with these voters and this initial state (the founding member
    /// registry). Only for a store that was never initialized; every founding member writes the
    /// same. The state is kept as the snapshot at index 0, so a restart reads it back like any
    /// snapshot; Raft never ships it (members that join later get a snapshot taken after the
    /// conf change that added them).
    pub fn bootstrap(
        &self,
        voters: &[u64],
        initial_state: Vec<u8>,
    ) -> Result<(), CoordinatorError> {
        let conf_state = ConfState {
            voters: voters.to_vec(),
            ..ConfState::default()
        };
        let mut snapshot = Snapshot::default();
        snapshot.set_data(initial_state.into());
        snapshot.mut_metadata().set_conf_state(conf_state.clone());
        self.put_snapshot(&snapshot)?;
        self.set_conf_state(&conf_state)?;
        self.flush()
    }

    /// The cluster's id: the stored one, which a configured id must match, else the configured
    /// one, else a new one (dev clusters). Agents journal steps per cluster id.
    pub fn cluster_id(&self, configured: Option<&str>) -> Result<String, CoordinatorError> {
        let stored = self
            .meta
            .get(CLUSTER_ID_KEY)
            .map_err(|error| storage_error("read", "cluster id", error))?;
        if let Some(stored) = stored.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()) {
            return match configured {
                Some(configured) if configured != stored => Err(CoordinatorError::invalid(
                    "cluster.id",
                    format!(
                        "{configured:?} does not match {stored:?}, the id this member's data belongs to"
                    ),
                )),
                _ => Ok(stored),
            };
        }
        let id = match configured {
            Some(configured) => configured.to_string(),
            None => {
                // Unique enough without a random source: the moment, the process and the place.
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|elapsed| elapsed.as_nanos())
                    .unwrap_or(0);
                let seed = format!("{nanos}/{}/{:?}", std::process::id(), self.db.generate_id());
                format!(
                    "rw-{}",
                    &rewind_shared::digest::sha256_hex(seed.as_bytes())[..16]
                )
            }
        };
        self.meta
            .insert(CLUSTER_ID_KEY, id.as_bytes())
            .map_err(|error| storage_error("write", "cluster id", error))?;
        self.flush()?;
        Ok(id)
    }

    /// Makes everything written so far durable: sled's trees and the log.
    pub fn flush(&self) -> Result<(), CoordinatorError> {
        self.flush_sled()?;
        self.persist(&[], None, true)
    }

    fn flush_sled(&self) -> Result<(), CoordinatorError> {
        self.db.flush().map(|_| ()).map_err(|error| {
            storage_error(
                "flush",
                format!(
                    "the Raft store in {}",
                    self.snapshot_dir
                        .parent()
                        .unwrap_or(&self.snapshot_dir)
                        .display()
                ),
                error,
            )
        })
    }

    /// Appends entries, replacing any conflicting suffix. Not durable until [`Self::flush`].
    pub fn append(&self, entries: &[Entry]) -> Result<(), CoordinatorError> {
        self.persist(entries, None, false)
    }

    /// Not durable until [`Self::flush`] (or a later synced write).
    pub fn set_hard_state(&self, hard_state: &HardState) -> Result<(), CoordinatorError> {
        self.persist(&[], Some(hard_state), false)
    }

    /// One `Ready`'s entries and hard state as one write to the log, durable on return when
    /// `sync` (one `fdatasync`, covering earlier unsynced writes too). Entries replace any
    /// conflicting suffix; entries that would leave a hole or rewrite the snapshot's part of
    /// the log are refused (raft-rs never asks for either).
    pub fn persist(
        &self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
        sync: bool,
    ) -> Result<(), CoordinatorError> {
        let mut terms = self.lock_terms();
        let mut batch = LogBatch::default();
        if let Some(first) = entries.first() {
            let snapshot = self.snapshot_metadata()?.index;
            let next = terms.span().map_or(snapshot + 1, |(_, last)| last + 1);
            if first.index <= snapshot || first.index > next {
                return Err(storage_error(
                    "append",
                    format!("entries from index {}", first.index),
                    format!(
                        "the log holds entries after the snapshot at {snapshot} up to {}",
                        next - 1
                    ),
                ));
            }
            add_entries(&mut batch, entries)?;
        }
        match hard_state {
            Some(hard_state) => put_hard_state(&mut batch, hard_state)?,
            // raft-engine syncs only with a write: the hard state written again is the
            // smallest one.
            None if sync => put_hard_state(&mut batch, &self.hard_state()?)?,
            None if entries.is_empty() => return Ok(()),
            None => {}
        }
        self.write_batch(&mut batch, sync)?;
        terms.append(entries);
        Ok(())
    }

    /// Writes a batch to the log.
    fn write_batch(&self, batch: &mut LogBatch, sync: bool) -> Result<(), CoordinatorError> {
        self.guarded("write", || self.log.write(batch, sync).map(drop))
    }

    /// Runs one raft-engine operation that writes. raft-engine panics when an `fdatasync`
    /// fails (it will not retry one, as the kernel may have dropped the pages, and rotating or
    /// purging files syncs too): that is a storage failure like any other here, so the member
    /// stops with the status its supervisor knows. After one failure every later write fails.
    fn guarded(
        &self,
        action: &str,
        operation: impl FnOnce() -> raft_engine::Result<()>,
    ) -> Result<(), CoordinatorError> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.log_failed.load(SeqCst) {
            return Err(storage_error(
                action,
                "the Raft log",
                "an earlier write to it failed; the member must restart",
            ));
        }
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(operation));
        let error = match outcome {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(error)) => error.to_string(),
            Err(panic) => panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
                .unwrap_or_else(|| "raft-engine panicked".into()),
        };
        self.log_failed.store(true, SeqCst);
        Err(storage_error(action, "the Raft log", error))
    }

    fn lock_terms(&self) -> MutexGuard<'_, LogTerms> {
        self.terms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn set_conf_state(&self, conf_state: &ConfState) -> Result<(), CoordinatorError> {
        self.put(CONF_STATE_KEY, conf_state)
    }

    /// Installs a snapshot received from the leader: it replaces the whole log. The data goes
    /// to its own file first (nothing names it yet); then the snapshot record, membership and
    /// (with a bundle, from cluster version 7) the audit and archive trees are one sled
    /// transaction, flushed; then the log is cleared and the commit index set to the
    /// snapshot's, synced. A crash between the last two is finished by [`Self::repair_log`]
    /// at open, so a restart finds the old store or the new one, never a commit index past
    /// the log.
    pub fn apply_snapshot(
        &self,
        snapshot: &Snapshot,
        bundled: Option<&super::snapshot_codec::Bundled>,
    ) -> Result<(), CoordinatorError> {
        self.record_installed_snapshot(snapshot, bundled)?;
        rewind_shared::crash_point!("coordinator.snapshot-recorded");
        let metadata = snapshot.get_metadata();
        let mut hard_state = self.hard_state()?;
        hard_state.term = hard_state.term.max(metadata.term);
        hard_state.commit = metadata.index;
        let mut terms = self.lock_terms();
        let mut batch = LogBatch::default();
        batch.add_command(RAFT_GROUP, Command::Clean);
        put_hard_state(&mut batch, &hard_state)?;
        self.write_batch(&mut batch, true)?;
        *terms = LogTerms::default();
        Ok(())
    }

    /// The sled half of [`Self::apply_snapshot`]: the data's file, then record, membership,
    /// audit and archive in one transaction, flushed.
    fn record_installed_snapshot(
        &self,
        snapshot: &Snapshot,
        bundled: Option<&super::snapshot_codec::Bundled>,
    ) -> Result<(), CoordinatorError> {
        let metadata = snapshot.get_metadata();
        self.write_snapshot_file(metadata.index, snapshot.get_data())?;
        let _writing = self
            .snapshot_writes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let record = encode(SNAPSHOT_KEY, &metadata_only(snapshot))?;
        let conf_state = encode(CONF_STATE_KEY, metadata.get_conf_state())?;
        let trees = self
            .audit
            .trees()
            .map_err(|error| storage_error("install", "a snapshot", error))?;
        let keys_of = |tree: &sled::Tree, name: &str| {
            tree.iter()
                .keys()
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| storage_error("read", name, error))
        };
        let audit_keys = keys_of(&trees.audit, "audit")?;
        let archive_keys = keys_of(&trees.archive, "archive")?;
        let (entries, archive) = bundled.map_or((&[][..], &[][..]), |bundled| {
            (&bundled.entries[..], &bundled.archive[..])
        });
        let audit_entries = entries
            .iter()
            .map(|entry| {
                super::audit_tree::encoded(entry).map(|(key, bytes)| (key.to_vec(), bytes))
            })
            .chain(archive.iter().map(|record| {
                super::audit_tree::encoded_archived(record)
                    .map(|(key, bytes)| (key.to_vec(), bytes))
            }))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| storage_error("install", "the audit entries and archive", error))?;
        let (audit_entries, archived) = audit_entries.split_at(entries.len());
        (&self.meta, &trees.audit, &trees.archive)
            .transaction(|(meta, audit, archive)| {
                for key in &audit_keys {
                    audit.remove(key.clone())?;
                }
                for key in &archive_keys {
                    archive.remove(key.clone())?;
                }
                for (key, bytes) in audit_entries {
                    audit.insert(&key[..], bytes.clone())?;
                }
                for (key, bytes) in archived {
                    archive.insert(&key[..], bytes.clone())?;
                }
                meta.insert(SNAPSHOT_KEY, record.clone())?;
                meta.insert(CONF_STATE_KEY, conf_state.clone())?;
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|error| storage_error("install", "a snapshot", format!("{error:?}")))?;
        self.flush_sled()?;
        self.remember_snapshot(metadata);
        Ok(())
    }

    /// Records a snapshot of the applied state at `index` and drops the log up to it. May run
    /// on another thread than the Raft thread: the data is written to its file first, without
    /// the lock; a snapshot no newer than the stored one (a leader's snapshot installed
    /// meanwhile) is then dropped.
    pub fn compact(
        &self,
        index: u64,
        conf_state: &ConfState,
        data: Vec<u8>,
    ) -> Result<(), CoordinatorError> {
        if index <= self.snapshot_metadata()?.index {
            return Ok(());
        }
        self.write_snapshot_file(index, &data)?;
        let _writing = self
            .snapshot_writes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let current = self.snapshot_metadata()?.index;
        if index <= current {
            // The file just written is older than the stored snapshot: not needed.
            let _ = std::fs::remove_file(self.snapshot_file(index));
            return Ok(());
        }
        let term = self
            .term(index)
            .map_err(|error| storage_error("read term of", index, error))?;
        let mut metadata = SnapshotMetadata {
            index,
            term,
            ..SnapshotMetadata::default()
        };
        metadata.set_conf_state(conf_state.clone());
        let mut record = Snapshot::default();
        record.set_metadata(metadata.clone());
        self.put(SNAPSHOT_KEY, &record)?;
        // The record and the audit entries the dropped entries wrote reach disk first.
        self.flush_sled()?;
        self.remember_snapshot(&metadata);
        {
            let mut terms = self.lock_terms();
            let mut batch = LogBatch::default();
            batch.add_command(RAFT_GROUP, Command::Compact { index: index + 1 });
            // Not synced: a compaction lost in a crash is done again at open.
            self.write_batch(&mut batch, false)?;
            terms.compact_to(index + 1);
        }
        // Removes the files wholly below the log; cheap until they pass `purge_threshold`.
        self.guarded("purge old files of", || {
            self.log.purge_expired_files().map(drop)
        })
    }

    /// The latest snapshot, with its data, or an empty one. Record and file are read under the
    /// snapshot lock, so a snapshot written meanwhile cannot delete the file between the two.
    pub fn latest_snapshot(&self) -> Result<Snapshot, CoordinatorError> {
        let _reading = self
            .snapshot_writes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(mut snapshot) = self.get::<Snapshot>(SNAPSHOT_KEY)? else {
            return Ok(Snapshot::default());
        };
        if snapshot.get_data().is_empty() {
            let index = snapshot.get_metadata().index;
            let mut data = Vec::new();
            self.snapshot_files()
                .open_state(index)
                .and_then(|mut file| std::io::Read::read_to_end(&mut file, &mut data))
                .map_err(|error| storage_error("read the snapshot at", index, error))?;
            snapshot.set_data(data.into());
        }
        Ok(snapshot)
    }

    fn snapshot_file(&self, index: u64) -> PathBuf {
        self.snapshot_dir.join(format!("{index:020}.state"))
    }

    /// Opens stored snapshots' data by index, off the Raft thread (the transport streams it).
    pub fn snapshot_files(&self) -> SnapshotFiles {
        SnapshotFiles {
            dir: self.snapshot_dir.clone(),
            audit: self.audit.clone(),
        }
    }

    /// The audit entries' store (cluster version 7 on).
    pub fn audit_store(&self) -> super::SledAuditStore {
        self.audit.clone()
    }

    /// Writes a snapshot's data to its file durably: a partial file, fsynced, renamed, and the
    /// directory fsynced, so a crash leaves the old file or the whole new one.
    fn write_snapshot_file(&self, index: u64, data: &[u8]) -> Result<(), CoordinatorError> {
        use std::io::Write as _;
        let path = self.snapshot_file(index);
        let partial = path.with_extension("partial");
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&partial)?;
            file.write_all(data)?;
            file.sync_all()?;
            std::fs::rename(&partial, &path)?;
            std::fs::File::open(&self.snapshot_dir)?.sync_all()
        };
        write().map_err(|error| storage_error("write", path.display(), error))
    }

    /// Removes the files of snapshots older than the current one (best effort: a leftover only
    /// costs disk until the next snapshot). Only older ones: a newer file may be a snapshot
    /// being installed whose record is not written yet. At open (`at_open`), every file but
    /// the current one's goes, partial writes and newer orphans of a crash included.
    fn remove_other_snapshot_files(&self, keep: u64, at_open: bool) {
        let Ok(files) = std::fs::read_dir(&self.snapshot_dir) else {
            return;
        };
        for file in files.flatten() {
            let path = file.path();
            let partial = path
                .extension()
                .is_some_and(|extension| extension == "partial");
            let index = path
                .file_stem()
                .and_then(|stem| stem.to_str())
                .and_then(|stem| stem.parse::<u64>().ok());
            let older = index.is_some_and(|index| index < keep);
            let current = index == Some(keep) && !partial;
            if (at_open && !current) || (older && !partial) {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    pub fn hard_state(&self) -> Result<HardState, CoordinatorError> {
        self.log
            .get_message::<HardState>(RAFT_GROUP, HARD_STATE_KEY)
            .map(Option::unwrap_or_default)
            .map_err(|error| storage_error("read", "the hard state", error))
    }

    pub fn conf_state(&self) -> Result<ConfState, CoordinatorError> {
        self.get(CONF_STATE_KEY).map(Option::unwrap_or_default)
    }

    fn snapshot_metadata(&self) -> Result<SnapshotMetadata, CoordinatorError> {
        Ok(self
            .snapshot_metadata
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone())
    }

    /// Stores a snapshot (its data in its file, then its record in sled, flushed). Bootstrap
    /// only: nothing else runs yet.
    fn put_snapshot(&self, snapshot: &Snapshot) -> Result<(), CoordinatorError> {
        let metadata = snapshot.get_metadata();
        self.write_snapshot_file(metadata.index, snapshot.get_data())?;
        self.put(SNAPSHOT_KEY, &metadata_only(snapshot))?;
        self.flush()?;
        self.remember_snapshot(metadata);
        Ok(())
    }

    /// Caches the stored snapshot's metadata and removes the files of older snapshots. Call
    /// with the snapshot lock held, after the record is flushed.
    fn remember_snapshot(&self, metadata: &SnapshotMetadata) {
        *self
            .snapshot_metadata
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = metadata.clone();
        self.remove_other_snapshot_files(metadata.index, false);
    }

    fn put(&self, key: &[u8], message: &impl protobuf::Message) -> Result<(), CoordinatorError> {
        let bytes = encode(key, message)?;
        self.meta
            .insert(key, bytes)
            .map(|_| ())
            .map_err(|error| storage_error("write", String::from_utf8_lossy(key), error))
    }

    fn get<M: protobuf::Message>(&self, key: &[u8]) -> Result<Option<M>, CoordinatorError> {
        let Some(bytes) = self
            .meta
            .get(key)
            .map_err(|error| storage_error("read", String::from_utf8_lossy(key), error))?
        else {
            return Ok(None);
        };
        M::parse_from_bytes(&bytes)
            .map(Some)
            .map_err(|error| storage_error("decode", String::from_utf8_lossy(key), error))
    }
}

impl Storage for RaftStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state().map_err(raft_error)?,
            self.conf_state().map_err(raft_error)?,
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first_index()? {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        let max_size = max_size.into();
        let mut entries = Vec::with_capacity((high - low).min(1024) as usize);
        let fetched = self.log.fetch_entries_to::<EntryIndexOf>(
            RAFT_GROUP,
            low,
            high,
            max_size.map(|bytes| usize::try_from(bytes).unwrap_or(usize::MAX)),
            &mut entries,
        );
        match fetched {
            Ok(_) => {}
            // A snapshot taken on its own thread may have compacted the range meanwhile.
            Err(raft_engine::Error::EntryCompacted) => {
                return Err(raft::Error::Store(StorageError::Compacted));
            }
            Err(raft_engine::Error::EntryNotFound) if low < self.first_index()? => {
                return Err(raft::Error::Store(StorageError::Compacted));
            }
            Err(raft_engine::Error::EntryNotFound) => {
                return Err(raft::Error::Store(StorageError::Unavailable));
            }
            Err(error) => {
                return Err(raft_error(storage_error("read", "the Raft log", error)));
            }
        }
        raft::util::limit_size(&mut entries, max_size);
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        let snapshot = self.snapshot_metadata().map_err(raft_error)?;
        if index == snapshot.index {
            return Ok(snapshot.term);
        }
        if index < snapshot.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        match self.lock_terms().get(index) {
            Some(term) => Ok(term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.snapshot_metadata().map_err(raft_error)?.index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        let snapshot_index = self.snapshot_metadata().map_err(raft_error)?.index;
        Ok(self
            .lock_terms()
            .span()
            .map_or(snapshot_index, |(_, last)| last)
            .max(snapshot_index))
    }

    /// The latest snapshot's metadata only: its data stays in its file, which the transport
    /// streams to the peer off the Raft thread (see `SnapshotFiles`).
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // raft-rs treats any other error here as fatal.
        let metadata = self
            .snapshot_metadata()
            .map_err(|_| raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))?;
        let mut snapshot = Snapshot::default();
        snapshot.set_metadata(metadata);
        if snapshot.get_metadata().index < request_index {
            // The leader compacts only at its own snapshots, so this is a follower far behind
            // asking before the next one is taken.
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(snapshot)
    }
}

/// Opens the data of stored snapshots, by index: cheap to clone, for use off the Raft thread.
#[derive(Clone)]
pub struct SnapshotFiles {
    dir: PathBuf,
    audit: super::SledAuditStore,
}

impl SnapshotFiles {
    /// The data of the snapshot at `index`, in its current name or, for a snapshot an earlier
    /// version wrote, its JSON. An open file stays readable after a newer snapshot removes it.
    pub fn open(&self, index: u64) -> std::io::Result<std::fs::File> {
        let file = self.open_state(index)?;
        // A closed or failing store fails the send (it is retried), never sends the state alone.
        if self.audit.is_empty().map_err(std::io::Error::other)? {
            return Ok(file);
        }
        self.bundle(file)
    }

    /// The snapshot's state with the audit entries and archive held now, as a bundle in an unnamed
    /// file (see `snapshot_codec`): the member it goes to is behind, and from cluster version
    /// 7 the state alone does not carry the history. Entries newer than the snapshot may be
    /// in it too; the member writes them again, the same, as it applies the log after it.
    fn bundle(&self, mut state: std::fs::File) -> std::io::Result<std::fs::File> {
        use std::io::{Read as _, Seek as _, Write as _};
        let mut state_data = Vec::new();
        (&mut state)
            .take(rewind_proto::MAX_SNAPSHOT_BYTES + 1)
            .read_to_end(&mut state_data)?;
        // Entries the snapshot has pruned may still be here (they go at this member's next
        // snapshot); the receiver's next snapshot drops them too.
        let entries = crate::state_machine::AuditStore::range(&self.audit, 0, u64::MAX, usize::MAX)
            .map_err(std::io::Error::other)?;
        // Records archived after the snapshot may be here too: the member archives them again,
        // the same, as it applies the log after it.
        let archive = self.audit.all_archived().map_err(std::io::Error::other)?;
        let bundle = super::snapshot_codec::encode_bundle(&state_data, &entries, &archive)
            .map_err(std::io::Error::other)?;
        let mut file = tempfile::tempfile_in(&self.dir)?;
        file.write_all(&bundle)?;
        file.rewind()?;
        Ok(file)
    }

    /// The state's data of the snapshot at `index` alone, as this member keeps it.
    pub fn open_state(&self, index: u64) -> std::io::Result<std::fs::File> {
        match std::fs::File::open(self.dir.join(format!("{index:020}.state"))) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                std::fs::File::open(self.dir.join(format!("{index:020}.json")))
            }
            opened => opened,
        }
    }
}

/// A snapshot's record: its metadata, its data being in its file.
fn metadata_only(snapshot: &Snapshot) -> Snapshot {
    let mut record = Snapshot::default();
    record.set_metadata(snapshot.get_metadata().clone());
    record
}

fn add_entries(batch: &mut LogBatch, entries: &[Entry]) -> Result<(), CoordinatorError> {
    batch
        .add_entries::<EntryIndexOf>(RAFT_GROUP, entries)
        .map_err(|error| storage_error("encode", "entries for the Raft log", error))
}

fn put_hard_state(batch: &mut LogBatch, hard_state: &HardState) -> Result<(), CoordinatorError> {
    batch
        .put_message(RAFT_GROUP, HARD_STATE_KEY.to_vec(), hard_state)
        .map_err(|error| storage_error("encode", "the hard state", error))
}

fn encode(key: &[u8], message: &impl protobuf::Message) -> Result<Vec<u8>, CoordinatorError> {
    message
        .write_to_bytes()
        .map_err(|error| storage_error("encode", String::from_utf8_lossy(key), error))
}

fn raft_error(error: CoordinatorError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(error)))
}

fn storage_error(
    action: &str,
    what: impl std::fmt::Display,
    error: impl std::fmt::Display,
) -> CoordinatorError {
    CoordinatorError::Storage(format!("{action} {what}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens the store, waiting out sled's file lock: a dropped store's background threads
    /// release it a moment later (a real restart is a new process, which never waits).
    fn reopen(dir: &std::path::Path) -> RaftStore {
        for _ in 0..100 {
            match RaftStore::open(dir) {
                Ok(store) => return store,
                Err(error) if error.to_string().contains("could not acquire lock") => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(error) => panic!("open {}: {error}", dir.display()),
            }
        }
        panic!("{} stayed locked for 2 s", dir.display())
    }

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("e{index}").into_bytes().into(),
            ..Entry::default()
        }
    }

    #[test]
    fn the_log_appends_truncates_conflicts_compacts_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = reopen(dir.path());
            assert!(!store.is_initialized().unwrap());
            store.bootstrap(&[1, 2, 3], Vec::new()).unwrap();
            store
                .append(&(1..=5).map(|index| entry(index, 1)).collect::<Vec<_>>())
                .unwrap();
            // A new leader overwrites a conflicting suffix.
            store.append(&[entry(4, 2)]).unwrap();
            store
                .set_hard_state(&HardState {
                    term: 2,
                    vote: 1,
                    commit: 4,
                    ..HardState::default()
                })
                .unwrap();
            store.flush().unwrap();
        }
        let store = reopen(dir.path());
        assert!(store.is_initialized().unwrap());
        assert_eq!(
            (store.first_index().unwrap(), store.last_index().unwrap()),
            (1, 4)
        );
        assert_eq!(store.term(4).unwrap(), 2);
        assert_eq!(store.initial_state().unwrap().hard_state.commit, 4);
        let entries = store
            .entries(2, 5, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(
            entries.iter().map(|entry| entry.index).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );

        store
            .compact(3, &store.conf_state().unwrap(), b"state".to_vec())
            .unwrap();
        assert_eq!(
            (store.first_index().unwrap(), store.last_index().unwrap()),
            (4, 4)
        );
        assert_eq!(
            store.term(3).unwrap(),
            1,
            "the snapshot keeps the term of its index"
        );
        assert!(matches!(
            store.term(2),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        let sent = store.snapshot(3, 2).unwrap();
        assert_eq!(sent.get_metadata().index, 3);
        assert!(
            sent.get_data().is_empty(),
            "raft-rs is given the metadata only"
        );
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut store.snapshot_files().open(3).unwrap(), &mut data)
            .unwrap();
        assert_eq!(data, b"state");

        let generated = store.cluster_id(None).unwrap();
        assert!(generated.starts_with("rw-"));
        assert_eq!(store.cluster_id(None).unwrap(), generated, "kept");
        assert!(
            store.cluster_id(Some("other")).is_err(),
            "a different configured id is refused"
        );
    }

    /// Writes a store as releases before raft-engine kept it: log and hard state in sled.
    fn write_sled_store(dir: &std::path::Path, entries: &[Entry], hard_state: &HardState) {
        let db = sled::open(dir).unwrap();
        let log = db.open_tree(SLED_LOG_TREE).unwrap();
        for entry in entries {
            log.insert(entry.index.to_be_bytes(), entry.write_to_bytes().unwrap())
                .unwrap();
        }
        let meta = db.open_tree("raft-meta").unwrap();
        meta.insert(HARD_STATE_KEY, hard_state.write_to_bytes().unwrap())
            .unwrap();
        let conf_state = ConfState {
            voters: vec![1],
            ..ConfState::default()
        };
        meta.insert(CONF_STATE_KEY, conf_state.write_to_bytes().unwrap())
            .unwrap();
        db.flush().unwrap();
    }

    #[test]
    fn a_store_from_before_raft_engine_is_converted_once_and_again_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let entries: Vec<Entry> = (1..=2_500)
            .map(|index| entry(index, 1 + index / 1000))
            .collect();
        let hard_state = HardState {
            term: 3,
            vote: 2,
            commit: 2_400,
            ..HardState::default()
        };
        write_sled_store(dir.path(), &entries, &hard_state);
        let converted = |store: &RaftStore| {
            assert_eq!(store.hard_state().unwrap(), hard_state);
            assert_eq!(
                (store.first_index().unwrap(), store.last_index().unwrap()),
                (1, 2_500)
            );
            assert_eq!(store.term(2_500).unwrap(), 3);
            assert_eq!(
                store
                    .entries(1, 2_501, None, GetEntriesContext::empty(false))
                    .unwrap(),
                entries
            );
            assert!(
                !store
                    .db
                    .tree_names()
                    .iter()
                    .any(|name| name.as_ref() == SLED_LOG_TREE),
                "the old tree is gone"
            );
            assert_eq!(
                store.meta.get(HARD_STATE_KEY).unwrap().as_deref(),
                Some(MOVED_HARD_STATE),
                "an earlier release cannot read the old hard state"
            );
            assert!(HardState::parse_from_bytes(MOVED_HARD_STATE).is_err());
        };
        let store = reopen(dir.path());
        converted(&store);
        drop(store);
        // A crash after the copy but before the old tree was dropped: the copy is repeated
        // over what raft-engine already holds (here, with one entry fewer), the same.
        write_sled_store(dir.path(), &entries[..2_499], &hard_state);
        let store = reopen(dir.path());
        assert_eq!(store.last_index().unwrap(), 2_499, "the copy starts over");
        store.append(&entries[2_499..]).unwrap();
        store.flush().unwrap();
        drop(store);
        converted(&reopen(dir.path()));
        // A crash after the marker reached disk but before the tree's drop did: the hard state
        // copied is the one raft-engine already holds.
        write_sled_store(dir.path(), &entries, &HardState::default());
        {
            let db = sled::open(dir.path()).unwrap();
            let meta = db.open_tree("raft-meta").unwrap();
            meta.insert(HARD_STATE_KEY, MOVED_HARD_STATE).unwrap();
            db.flush().unwrap();
        }
        converted(&reopen(dir.path()));
    }

    #[test]
    fn a_crash_between_the_snapshot_record_and_the_log_is_repaired_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = reopen(dir.path());
        store.bootstrap(&[1], b"founding".to_vec()).unwrap();
        store
            .append(&(1..=10).map(|index| entry(index, 1)).collect::<Vec<_>>())
            .unwrap();
        store
            .set_hard_state(&HardState {
                term: 1,
                commit: 8,
                ..HardState::default()
            })
            .unwrap();
        store.flush().unwrap();
        // A compaction at 6 whose log half never ran: the record is newer than the log.
        let mut record = Snapshot::default();
        record.mut_metadata().index = 6;
        record.mut_metadata().term = 1;
        record
            .mut_metadata()
            .set_conf_state(store.conf_state().unwrap());
        record.set_data(b"state@6".to_vec().into());
        store.record_installed_snapshot(&record, None).unwrap();
        drop(store);
        let store = reopen(dir.path());
        assert_eq!(
            (store.first_index().unwrap(), store.last_index().unwrap()),
            (7, 10),
            "the log follows the snapshot: only the part below it goes"
        );
        assert_eq!(store.log.first_index(RAFT_GROUP), Some(7));
        assert_eq!(store.hard_state().unwrap().commit, 8);

        // An installed snapshot from a leader, at 20 in term 3, whose log half never ran: the
        // log does not hold its entry, so it is cleared and the commit index raised to it.
        let mut received = Snapshot::default();
        received.set_data(b"state@20".to_vec().into());
        received.mut_metadata().index = 20;
        received.mut_metadata().term = 3;
        received
            .mut_metadata()
            .set_conf_state(store.conf_state().unwrap());
        store.record_installed_snapshot(&received, None).unwrap();
        drop(store);
        let store = reopen(dir.path());
        assert_eq!(
            (store.first_index().unwrap(), store.last_index().unwrap()),
            (21, 20)
        );
        assert_eq!(store.log.first_index(RAFT_GROUP), None);
        let hard_state = store.hard_state().unwrap();
        assert_eq!((hard_state.term, hard_state.commit), (3, 20));
        store.append(&[entry(21, 3)]).unwrap();
        assert!(
            store.append(&[entry(23, 3)]).is_err(),
            "a hole in the log is refused"
        );
        assert!(
            store.append(&[entry(20, 3)]).is_err(),
            "the snapshot's part of the log is never rewritten"
        );
        store.flush().unwrap();
        drop(store);

        // A log that starts after the snapshot has lost entries: the member refuses to start.
        let store = reopen(dir.path());
        let mut batch = LogBatch::default();
        batch.add_command(RAFT_GROUP, Command::Clean);
        add_entries(&mut batch, &[entry(25, 3)]).unwrap();
        put_hard_state(&mut batch, &store.hard_state().unwrap()).unwrap();
        store.write_batch(&mut batch, true).unwrap();
        drop(store);
        let error = RaftStore::open(dir.path()).err().expect("refused");
        assert!(
            error.to_string().contains("entries 21 to 24 are missing"),
            "{error}"
        );
    }

    #[test]
    fn snapshots_live_in_one_file_and_an_installed_one_replaces_the_log_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = reopen(dir.path());
        store.bootstrap(&[1], b"founding".to_vec()).unwrap();
        store
            .append(&(1..=10).map(|index| entry(index, 1)).collect::<Vec<_>>())
            .unwrap();
        let conf_state = store.conf_state().unwrap();
        store.compact(5, &conf_state, b"state@5".to_vec()).unwrap();
        // An older snapshot arriving late (written on another thread) changes nothing.
        store.compact(3, &conf_state, b"state@3".to_vec()).unwrap();
        let files = |store: &RaftStore| std::fs::read_dir(&store.snapshot_dir).unwrap().count();
        assert_eq!(files(&store), 1);
        drop(store);

        let store = reopen(dir.path());
        assert_eq!(store.first_index().unwrap(), 6);
        assert_eq!(store.latest_snapshot().unwrap().get_data(), b"state@5");

        // A leader's snapshot past the whole log: log gone, commit at its index, one file.
        let mut received = Snapshot::default();
        received.set_data(b"state@20".to_vec().into());
        received.mut_metadata().index = 20;
        received.mut_metadata().term = 3;
        received.mut_metadata().set_conf_state(conf_state);
        store.apply_snapshot(&received, None).unwrap();
        drop(store);
        let store = reopen(dir.path());
        assert_eq!(
            (store.first_index().unwrap(), store.last_index().unwrap()),
            (21, 20)
        );
        assert_eq!(store.hard_state().unwrap().commit, 20);
        assert_eq!(store.latest_snapshot().unwrap().get_data(), b"state@20");
        assert_eq!(files(&store), 1);
    }

    #[test]
    fn an_installed_bundle_replaces_the_archive_and_a_sent_one_carries_it() {
        use crate::state_machine::AuditStore as _;
        use crate::state_machine::archive::{ArchiveKind, ArchivedChange, ArchivedRecord};
        let dir = tempfile::tempdir().unwrap();
        let store = reopen(dir.path());
        store.bootstrap(&[1], b"founding".to_vec()).unwrap();
        let mut fleet = crate::test_fleet::Fleet::with_web();
        let first = fleet.deploy_web("v1");
        let second = fleet.deploy_web("v2");
        let archived = |number: u64| {
            ArchivedRecord::Change(Box::new(ArchivedChange {
                archived_at_ms: 7,
                change: fleet.state.changes[&number].clone(),
            }))
        };
        let archive = store.audit_store();
        archive.put_archived(&archived(first)).unwrap();
        let mut received = Snapshot::default();
        received.set_data(b"state@20".to_vec().into());
        received.mut_metadata().index = 20;
        received.mut_metadata().term = 3;
        received
            .mut_metadata()
            .set_conf_state(store.conf_state().unwrap());
        let bundled = super::super::snapshot_codec::Bundled {
            entries: Vec::new(),
            archive: vec![archived(second)],
        };
        store.apply_snapshot(&received, Some(&bundled)).unwrap();
        drop((archive, store));
        let store = reopen(dir.path());
        let archive = store.audit_store();
        assert_eq!(archive.archived(ArchiveKind::Change, first).unwrap(), None);
        assert_eq!(
            archive.archived(ArchiveKind::Change, second).unwrap(),
            Some(archived(second))
        );
        // What this member sends on is a bundle of version 4, with the archive.
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut store.snapshot_files().open(20).unwrap(), &mut data)
            .unwrap();
        assert!(data.starts_with(b"RWSNAP\x04"));
        let (_, carried) = super::super::snapshot_codec::split_bundle(&data).unwrap();
        assert_eq!(carried.unwrap().archive, [archived(second)]);
    }
}
