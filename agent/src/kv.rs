//! The agent store's key-value table, in SQLite: one database file, `agent.sqlite3` in the
//! store's directory, one table of (tree, key, value) rows, keys compared as bytes (sled's
//! order, which the store had until this release).
//!
//! Why SQLite and not sled: the agent already links SQLite (the schema steps' SQLite engine),
//! it runs no thread of its own, and what it keeps resident is a page cache bounded here.
//! sled 0.34 started seven IO threads at the agent's first background write and kept them for
//! the agent's life, each waking every second (see the README's agent footprint). A write
//! commits durably (WAL, `synchronous = FULL`: the journal must be on disk before a step acts),
//! except those [`Kv::insert_unsynced`] makes: a blob before the snapshot naming it, a cache.
//! The log is appended in order, so the next durable commit makes them durable too.
//!
//! The agent holds the database's lock from open to exit (`locking_mode = EXCLUSIVE`, as sled
//! locked its directory): a second process on the same data dir fails to open it, by name.
//!
//! A store that sled wrote is copied in once, in one transaction that also marks it done; then
//! sled's files are removed and its `conf` replaced by one that sled refuses to read, so an
//! agent of an earlier release started on the directory stops instead of starting an empty store
//! (no journal, fences or snapshots). The move is one way.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};

use crate::AgentError;

/// The database's file in the store's directory.
pub const DATABASE_FILE: &str = "agent.sqlite3";
/// SQLite's page cache for the store, in KiB (its default is 2,000): the agent reads a blob
/// once per restore, and the journal and fences are a few rows.
const CACHE_KIB: i64 = 512;
/// How long opening waits for another process holding the database (a second agent on the
/// same data dir, or `rewind-agent journal list` beside a running one) before it fails.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// The row that says a sled store was copied in (in the `meta` tree).
const MIGRATED_FROM_SLED: &[u8] = b"migrated-from-sled";
/// What the store's directory holds as sled's `conf` once moved: no `segment_size`, so sled
/// 0.34 fails to open it (as corrupt) and an older agent stops; this first line says why to
/// whoever looks.
const MOVED_CONF: &str = "moved: this agent store is in agent.sqlite3 since rewind-agent 0.2; an \
                          earlier release must not open it (it would start empty)\n";
/// The largest the write-ahead log is left at after a checkpoint (bytes): a large migration
/// or capture does not leave it that large.
const WAL_SIZE_LIMIT: u64 = 4 << 20;

/// The store's trees, named as sled named them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tree {
    Blobs,
    Snapshots,
    Journal,
    Fences,
    TreeHashes,
    Checkpoints,
    SelfReverts,
    Schema,
    Desired,
    ClientCacheOff,
    ContainerVersions,
    /// The store's own facts (the sled migration).
    Meta,
}

impl Tree {
    /// Every tree sled held, copied by the migration.
    const FROM_SLED: [Tree; 11] = [
        Tree::Blobs,
        Tree::Snapshots,
        Tree::Journal,
        Tree::Fences,
        Tree::TreeHashes,
        Tree::Checkpoints,
        Tree::SelfReverts,
        Tree::Schema,
        Tree::Desired,
        Tree::ClientCacheOff,
        Tree::ContainerVersions,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Tree::Blobs => "blobs",
            Tree::Snapshots => "snapshots",
            Tree::Journal => "journal",
            Tree::Fences => "fences",
            Tree::TreeHashes => "tree-hashes",
            Tree::Checkpoints => "checkpoints",
            Tree::SelfReverts => "self-reverts",
            Tree::Schema => "schema",
            Tree::Desired => "desired",
            Tree::ClientCacheOff => "client_cache_off",
            Tree::ContainerVersions => "container_versions",
            Tree::Meta => "meta",
        }
    }
}

/// (key, value) rows of a tree, by key.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// One connection, shared by the agent's tasks (a step's few writes are short).
#[derive(Clone)]
pub struct Kv {
    db: Arc<Mutex<Db>>,
    path: std::path::PathBuf,
}

struct Db {
    connection: Connection,
    /// Commits since the last checkpoint (see [`CHECKPOINT_EVERY`]).
    writes: u32,
}

/// How many commits go by between checkpoints (copying the write-ahead log into the database).
/// The store checkpoints itself rather than leave it to SQLite's automatic one, which discards
/// a checkpoint's error: a failed fsync there, of frames an unsynced write left, would go
/// unseen (the kernel reports it once) while the next commit's fsync reported success.
const CHECKPOINT_EVERY: u32 = 256;

impl Kv {
    /// Opens (creating) the database in `dir`, copying in a sled store found there.
    pub fn open(dir: &Path) -> Result<Self, AgentError> {
        std::fs::create_dir_all(dir).map_err(AgentError::io("create", dir))?;
        let path = dir.join(DATABASE_FILE);
        let connection = Connection::open(&path).map_err(failed(&path, "open"))?;
        connection
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(failed(&path, "configure"))?;
        connection
            .execute_batch(&format!(
                "PRAGMA locking_mode = EXCLUSIVE;
                 PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 PRAGMA wal_autocheckpoint = 0;
                 PRAGMA cache_size = -{CACHE_KIB};
                 PRAGMA journal_size_limit = {WAL_SIZE_LIMIT};
                 CREATE TABLE IF NOT EXISTS kv (
                     tree TEXT NOT NULL,
                     key BLOB NOT NULL,
                     value BLOB NOT NULL,
                     PRIMARY KEY (tree, key)
                 ) WITHOUT ROWID;
                 BEGIN EXCLUSIVE;
                 COMMIT;"
            ))
            .map_err(failed(&path, "set up"))?;
        let kv = Self {
            db: Arc::new(Mutex::new(Db {
                connection,
                writes: 0,
            })),
            path,
        };
        kv.checkpoint()?;
        kv.migrate_from_sled(dir)?;
        Ok(kv)
    }

    fn lock(&self) -> MutexGuard<'_, Db> {
        // A panic while holding it left no transaction open (each is one statement, or a
        // transaction rolled back when dropped): the connection is still sound.
        self.db
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Copies the write-ahead log into the database and shrinks it, failing (an I/O error:
    /// exiting) as a commit would.
    fn checkpoint(&self) -> Result<(), AgentError> {
        let mut db = self.lock();
        db.connection
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .map_err(failed(&self.path, "checkpoint"))?;
        db.writes = 0;
        Ok(())
    }

    /// Runs one write (`durable`: its commit waits for the disk; otherwise it is durable with
    /// the next that does, the log being appended in order) and checkpoints every
    /// [`CHECKPOINT_EVERY`] writes.
    fn write<T>(
        &self,
        durable: bool,
        write: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, AgentError> {
        let mut db = self.lock();
        if !durable {
            db.connection
                .execute_batch("PRAGMA synchronous = NORMAL")
                .map_err(failed(&self.path, "configure"))?;
        }
        let written = write(&mut db.connection).map_err(failed(&self.path, "write"));
        if !durable && let Err(error) = db.connection.execute_batch("PRAGMA synchronous = FULL") {
            // Every later commit would skip its fsync and still report success.
            storage_failed(&self.path, &error);
        }
        let written = written?;
        db.writes += 1;
        if db.writes >= CHECKPOINT_EVERY {
            db.connection
                .execute_batch("PRAGMA wal_checkpoint(PASSIVE)")
                .map_err(failed(&self.path, "checkpoint"))?;
            db.writes = 0;
        }
        Ok(written)
    }

    pub fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, AgentError> {
        self.lock()
            .connection
            .prepare_cached("SELECT value FROM kv WHERE tree = ?1 AND key = ?2")
            .and_then(|mut statement| {
                statement
                    .query_row(params![tree.name(), key], |row| row.get(0))
                    .optional()
            })
            .map_err(failed(&self.path, "read"))
    }

    pub fn contains(&self, tree: Tree, key: &[u8]) -> Result<bool, AgentError> {
        Ok(self.get(tree, key)?.is_some())
    }

    /// Sets `key` to `value`, durably.
    pub fn insert(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), AgentError> {
        self.write(true, |connection| put(connection, tree, key, value))
    }

    /// Sets `key` to `value` without waiting for the disk: durable with the next durable write,
    /// or lost with a crash before it. For what a later write refers to (a blob before its
    /// snapshot) or what costs only a recomputation (a cache).
    pub fn insert_unsynced(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), AgentError> {
        self.write(false, |connection| put(connection, tree, key, value))
    }

    /// Sets `key` to `value` unless it holds something; whether it was set.
    /// Without waiting for the disk, as [`Kv::insert_unsynced`].
    pub fn insert_new(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<bool, AgentError> {
        let inserted = self.write(false, |connection| {
            connection
                .prepare_cached("INSERT OR IGNORE INTO kv (tree, key, value) VALUES (?1, ?2, ?3)")?
                .execute(params![tree.name(), key, value])
        })?;
        Ok(inserted == 1)
    }

    pub fn remove(&self, tree: Tree, key: &[u8]) -> Result<(), AgentError> {
        self.write(true, |connection| {
            connection
                .prepare_cached("DELETE FROM kv WHERE tree = ?1 AND key = ?2")?
                .execute(params![tree.name(), key])
                .map(drop)
        })
    }

    /// Removes `key` only while it holds `value`.
    pub fn remove_if(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), AgentError> {
        self.write(true, |connection| {
            connection
                .prepare_cached("DELETE FROM kv WHERE tree = ?1 AND key = ?2 AND value = ?3")?
                .execute(params![tree.name(), key, value])
                .map(drop)
        })
    }

    /// Sets `key` to what `change` makes of its value (`None`: absent), in one transaction;
    /// returns the new value.
    pub fn update(
        &self,
        tree: Tree,
        key: &[u8],
        change: impl FnOnce(Option<&[u8]>) -> Vec<u8>,
    ) -> Result<Vec<u8>, AgentError> {
        self.write(true, |connection| {
            let transaction =
                connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let old: Option<Vec<u8>> = transaction
                .query_row(
                    "SELECT value FROM kv WHERE tree = ?1 AND key = ?2",
                    params![tree.name(), key],
                    |row| row.get(0),
                )
                .optional()?;
            let new = change(old.as_deref());
            put(&transaction, tree, key, &new)?;
            transaction.commit()?;
            Ok(new)
        })
    }

    /// Every row of `tree` whose key starts with `prefix`, by key.
    pub fn entries_with_prefix(&self, tree: Tree, prefix: &[u8]) -> Result<Entries, AgentError> {
        let db = self.lock();
        let mut statement = db
            .connection
            .prepare_cached("SELECT key, value FROM kv WHERE tree = ?1 AND key >= ?2 ORDER BY key")
            .map_err(failed(&self.path, "read"))?;
        let rows = statement
            .query_map(params![tree.name(), prefix], |row| {
                Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, Vec<u8>>(1)?))
            })
            .map_err(failed(&self.path, "read"))?;
        let mut entries = Vec::new();
        for row in rows {
            let (key, value) = row.map_err(failed(&self.path, "read"))?;
            // Keys are in byte order: the first past the prefix ends it.
            if !key.starts_with(prefix) {
                break;
            }
            entries.push((key, value));
        }
        Ok(entries)
    }

    /// Every row of `tree`, by key.
    pub fn entries(&self, tree: Tree) -> Result<Entries, AgentError> {
        self.entries_with_prefix(tree, b"")
    }

    /// Copies a store sled wrote in `dir` into the table, once, and marks the directory moved.
    ///
    /// The copy is one transaction with the row that marks it done, so a crash midway copies
    /// again from the start, and none copies again over later writes. Straight after it (and
    /// in a store this release made) sled's `conf` becomes [`MOVED_CONF`], which sled refuses:
    /// from then on no earlier release writes here, and nothing is copied again. Then what is
    /// left of sled's files goes, at this start or, after a crash, the next.
    fn migrate_from_sled(&self, dir: &Path) -> Result<(), AgentError> {
        let conf = dir.join("conf");
        let moved =
            std::fs::read(&conf).is_ok_and(|bytes| bytes.starts_with(MOVED_CONF.as_bytes()));
        if !moved {
            let sled_there = conf.exists() || dir.join("db").exists();
            if sled_there && self.get(Tree::Meta, MIGRATED_FROM_SLED)?.is_none() {
                let copied = self.copy_from_sled(dir)?;
                tracing::info!(
                    rows = copied,
                    dir = %dir.display(),
                    "Moved the agent's store from sled to SQLite."
                );
            }
            rewind_shared::pki::write_replacing(&conf, MOVED_CONF, 0o600)
                .map_err(|error| AgentError::Store(error.to_string()))?;
            // The copy went through the log in one transaction: into the database, and the
            // log back to its bound.
            self.checkpoint()?;
        }
        for entry in std::fs::read_dir(dir).map_err(AgentError::io("read", dir))? {
            let entry = entry.map_err(AgentError::io("read", dir))?;
            if entry.file_name().to_string_lossy().starts_with("snap.") {
                std::fs::remove_file(entry.path())
                    .map_err(AgentError::io("remove", entry.path()))?;
            }
        }
        let gone = |removed: std::io::Result<()>, path: &Path| match removed {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(AgentError::io("remove", path)(error))
            }
            _ => Ok(()),
        };
        let (blobs, db) = (dir.join("blobs"), dir.join("db"));
        gone(std::fs::remove_dir_all(&blobs), &blobs)?;
        gone(std::fs::remove_file(&db), &db)
    }

    fn copy_from_sled(&self, dir: &Path) -> Result<usize, AgentError> {
        // As the store of earlier releases opened it: a small cache (sled caps its own only
        // under cgroup v1) and no background flusher.
        let open = || {
            sled::Config::new()
                .path(dir)
                .cache_capacity(4 << 20)
                .flush_every_ms(None)
                .open()
        };
        let sled_store = match open() {
            // A snapshot sled left half written (a full disk) reads as corruption: without it,
            // sled recovers from its log.
            Err(sled::Error::Corruption { .. })
                if rewind_shared::config::remove_unfinished_sled_snapshots(dir)
                    .map_err(AgentError::io("clean", dir))? =>
            {
                open()
            }
            opened => opened,
        }
        .map_err(|error| {
            AgentError::Store(format!("open the sled store {}: {error}", dir.display()))
        })?;
        let sled_failed = |error: sled::Error| {
            AgentError::Store(format!("read the sled store {}: {error}", dir.display()))
        };
        // Row by row inside the transaction (a sled error rolls it back): the store is not held
        // in memory whole.
        let copied = self.write(true, |connection| {
            let transaction =
                connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut copied = 0usize;
            for tree in Tree::FROM_SLED {
                let sled_tree = match sled_store.open_tree(tree.name()) {
                    Ok(sled_tree) => sled_tree,
                    Err(error) => return Ok(Err(sled_failed(error))),
                };
                for entry in sled_tree.iter() {
                    let (key, value) = match entry {
                        Ok(entry) => entry,
                        Err(error) => return Ok(Err(sled_failed(error))),
                    };
                    put(&transaction, tree, &key, &value)?;
                    copied += 1;
                }
            }
            put(
                &transaction,
                Tree::Meta,
                MIGRATED_FROM_SLED,
                copied.to_string().as_bytes(),
            )?;
            transaction.commit()?;
            Ok(Ok(copied))
        })??;
        Ok(copied)
    }
}

/// Sets `key` to `value` in `tree` (within the caller's transaction, if any).
fn put(connection: &Connection, tree: Tree, key: &[u8], value: &[u8]) -> rusqlite::Result<()> {
    connection
        .prepare_cached("INSERT OR REPLACE INTO kv (tree, key, value) VALUES (?1, ?2, ?3)")?
        .execute(params![tree.name(), key, value])
        .map(drop)
}

/// The store's error for `action` on `path`. A failed read or write of the disk (I/O, a full
/// disk) stops the agent: a write it could not make durable must not be acted
/// on, and a retried fsync may report success for pages the kernel dropped. Its supervisor
/// starts it again, from what the disk holds.
fn failed<'a>(path: &'a Path, action: &'a str) -> impl Fn(rusqlite::Error) -> AgentError + 'a {
    move |error| {
        let code = error.sqlite_error_code();
        if matches!(
            code,
            Some(rusqlite::ErrorCode::SystemIoFailure | rusqlite::ErrorCode::DiskFull)
        ) {
            storage_failed(path, &error);
        }
        if code == Some(rusqlite::ErrorCode::DatabaseBusy) {
            return AgentError::Store(format!(
                "{action} {}: held by another process for over {} s (a rewind-agent running \
                 on this data dir?)",
                path.display(),
                BUSY_TIMEOUT.as_secs()
            ));
        }
        AgentError::Store(format!("{action} {}: {error}", path.display()))
    }
}

/// Stops the agent on a failure of its store's disk: a write it could not make durable must
/// not be acted on. Its supervisor starts it again, from what the disk holds.
fn storage_failed(path: &Path, error: &rusqlite::Error) -> ! {
    tracing::error!(
        %error,
        store = %path.display(),
        "The agent's store failed (a read or write of its disk); exiting ({}). It recovers from what the disk holds when started again.",
        rewind_shared::config::EXIT_STORAGE_FAILED
    );
    std::process::exit(i32::from(rewind_shared::config::EXIT_STORAGE_FAILED));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `rows` as the sled store of earlier releases held them.
    fn write_sled_store(dir: &Path, rows: &[(&str, &[u8], &[u8])]) {
        let sled_store = sled::open(dir).unwrap();
        for (tree, key, value) in rows {
            sled_store
                .open_tree(tree)
                .unwrap()
                .insert(key, *value)
                .unwrap();
        }
        sled_store.flush().unwrap();
    }

    #[test]
    fn a_sled_store_is_copied_in_once_and_its_files_removed() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("store");
        let fence = |term: u64| term.to_be_bytes().to_vec();
        write_sled_store(
            &dir,
            &[
                ("journal", b"c1/ch-1/capture/web-1", b"{\"step\":1}"),
                ("fences", b"ch-1", &fence(7)),
                ("blobs", b"ab12", b"config bytes"),
                ("container_versions", b"web/v1", b"sha256:1"),
                ("container_versions", b"web/v2", b"sha256:2"),
                ("container_versions", b"webhooks/v1", b"sha256:3"),
            ],
        );
        let kv = Kv::open(&dir).unwrap();
        assert_eq!(
            kv.get(Tree::Journal, b"c1/ch-1/capture/web-1").unwrap(),
            Some(b"{\"step\":1}".to_vec())
        );
        assert_eq!(kv.get(Tree::Fences, b"ch-1").unwrap(), Some(fence(7)));
        assert_eq!(
            kv.get(Tree::Blobs, b"ab12").unwrap(),
            Some(b"config bytes".to_vec())
        );
        let keys: Vec<Vec<u8>> = kv
            .entries_with_prefix(Tree::ContainerVersions, b"web/")
            .unwrap()
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        assert_eq!(keys, [b"web/v1".to_vec(), b"web/v2".to_vec()]);
        for gone in ["db", "blobs"] {
            assert!(!dir.join(gone).exists(), "sled's {gone} is removed");
        }
        let conf = std::fs::read_to_string(dir.join("conf")).unwrap();
        assert!(conf.contains("agent.sqlite3"), "{conf}");
        kv.insert(Tree::Fences, b"ch-1", &fence(9)).unwrap();
        drop(kv);
        assert!(
            sled::Config::new().path(&dir).open().is_err(),
            "an earlier release (sled) refuses the moved store instead of starting it empty"
        );

        // A crash after the copy, before sled's files went: they are there again, older.
        for leftover in ["db", "blobs"] {
            let _ = std::fs::remove_dir_all(dir.join(leftover));
            let _ = std::fs::remove_file(dir.join(leftover));
        }
        std::fs::remove_file(dir.join("conf")).unwrap();
        write_sled_store(&dir, &[("fences", b"ch-1", &fence(7))]);
        std::fs::write(dir.join("snap.0000000000000001"), b"sled's").unwrap();
        let kv = Kv::open(&dir).unwrap();
        assert_eq!(
            kv.get(Tree::Fences, b"ch-1").unwrap(),
            Some(fence(9)),
            "copied once: a later write is not overwritten"
        );
        assert!(!dir.join("db").exists() && !dir.join("snap.0000000000000001").exists());
        drop(kv);
        // Opened again: nothing of sled's is left to move.
        let kv = Kv::open(&dir).unwrap();
        assert_eq!(kv.get(Tree::Fences, b"ch-1").unwrap(), Some(fence(9)));
    }

    #[test]
    fn a_store_this_release_made_is_refused_by_sled_too() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("store");
        let kv = Kv::open(&dir).unwrap();
        kv.insert(Tree::Fences, b"ch-1", &[1]).unwrap();
        drop(kv);
        assert!(
            sled::Config::new().path(&dir).open().is_err(),
            "an earlier release refuses it instead of starting an empty journal beside it"
        );
        // What that refusal left (sled makes `blobs/` before reading its conf) is cleared.
        let kv = Kv::open(&dir).unwrap();
        assert!(!dir.join("blobs").exists());
        assert_eq!(kv.get(Tree::Fences, b"ch-1").unwrap(), Some(vec![1]));
    }

    #[test]
    fn the_store_checkpoints_its_log_itself() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("store");
        let kv = Kv::open(&dir).unwrap();
        let value = vec![7u8; 4096];
        for number in 0u32..2_000 {
            kv.insert_unsynced(Tree::Blobs, &number.to_be_bytes(), &value)
                .unwrap();
        }
        // 8 MB written; SQLite's own checkpoint is off, so without the store's the log would
        // hold all of it.
        let log = std::fs::metadata(dir.join(format!("{DATABASE_FILE}-wal")))
            .map_or(0, |metadata| metadata.len());
        assert!(log < 2 * WAL_SIZE_LIMIT, "the log is {log} bytes");
        assert_eq!(kv.entries(Tree::Blobs).unwrap().len(), 2_000);
        // And SQLite's own, whose errors nobody would see, stays off.
        let automatic: i64 = kv
            .lock()
            .connection
            .query_row("PRAGMA wal_autocheckpoint", [], |row| row.get(0))
            .unwrap();
        assert_eq!(automatic, 0);
    }

    #[test]
    fn a_second_process_on_the_same_store_is_refused_by_name() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("store");
        let _held = Kv::open(&dir).unwrap();
        let refused = Kv::open(&dir).err().expect("the store is held").to_string();
        assert!(
            refused.contains("held by another process") && refused.contains(DATABASE_FILE),
            "{refused}"
        );
    }

    #[test]
    fn updates_and_compare_and_set_act_on_what_is_stored_and_keys_sort_as_bytes() {
        let data = tempfile::tempdir().unwrap();
        let kv = Kv::open(&data.path().join("store")).unwrap();
        let raised = |old: Option<&[u8]>| {
            let seen = old.map_or(0, |bytes| bytes[0]);
            vec![seen.max(3)]
        };
        assert_eq!(kv.update(Tree::Fences, b"rb-1", raised).unwrap(), [3]);
        kv.insert(Tree::Fences, b"rb-1", &[5]).unwrap();
        assert_eq!(kv.update(Tree::Fences, b"rb-1", raised).unwrap(), [5]);
        assert!(kv.insert_new(Tree::Blobs, b"x", b"1").unwrap());
        assert!(!kv.insert_new(Tree::Blobs, b"x", b"2").unwrap());
        kv.remove_if(Tree::Blobs, b"x", b"2").unwrap();
        assert_eq!(kv.get(Tree::Blobs, b"x").unwrap(), Some(b"1".to_vec()));
        kv.remove_if(Tree::Blobs, b"x", b"1").unwrap();
        assert!(!kv.contains(Tree::Blobs, b"x").unwrap());
        for key in [&b"b"[..], b"a\xff", b"a", b"a\x00"] {
            kv.insert(Tree::Journal, key, b"v").unwrap();
        }
        let keys: Vec<Vec<u8>> = kv
            .entries(Tree::Journal)
            .unwrap()
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        assert_eq!(
            keys,
            [
                b"a".to_vec(),
                b"a\x00".to_vec(),
                b"a\xff".to_vec(),
                b"b".to_vec()
            ]
        );
    }
}
