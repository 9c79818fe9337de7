//! Config loading helpers.
//!
//! Unknown keys warn instead of failing: an older binary must still start with a newer config
//! during a rollback. `check` commands reject them through [`LoadedToml::unknown_keys`].

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::SharedError;

/// A parsed TOML file and the keys in it that the type does not know.
pub struct LoadedToml<T> {
    pub value: T,
    pub unknown_keys: Vec<String>,
}

/// Reads and parses `path`, collecting unknown keys rather than rejecting them.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<LoadedToml<T>, SharedError> {
    let text = std::fs::read_to_string(path).map_err(|source| SharedError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_toml(path, &text)
}

/// Parses TOML `text`; `path` only names the source in errors.
pub fn parse_toml<T: DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<LoadedToml<T>, SharedError> {
    let deserializer = toml::Deserializer::parse(text).map_err(|error| SharedError::Parse {
        path: path.to_path_buf(),
        message: error.to_string(),
    })?;
    let mut unknown_keys = Vec::new();
    let value = serde_ignored::deserialize(deserializer, |key| unknown_keys.push(key.to_string()))
        .map_err(|error| SharedError::Parse {
            path: path.to_path_buf(),
            message: error.to_string(),
        })?;
    Ok(LoadedToml {
        value,
        unknown_keys,
    })
}

/// Collects every validation problem so a config is reported whole, not one error per run.
#[derive(Debug, Default)]
pub struct Problems(Vec<String>);

impl Problems {
    pub fn add(&mut self, field: impl AsRef<str>, message: impl AsRef<str>) {
        self.0
            .push(format!("{}: {}", field.as_ref(), message.as_ref()));
    }

    /// Records a `SharedError::Invalid` (or any error) under its own text.
    pub fn add_error(&mut self, error: impl std::fmt::Display) {
        self.0.push(error.to_string());
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_result(self) -> Result<(), Vec<String>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }
}

/// Why `path` cannot be a data directory (it exists and is not a directory, or its nearest
/// existing ancestor is not a directory), naming the setting and the path; `None` if it can.
pub fn data_dir_problem(field: &str, path: &std::path::Path) -> Option<String> {
    let mut existing = path;
    loop {
        match std::fs::metadata(existing) {
            Ok(metadata) if metadata.is_dir() => return None,
            Ok(_) if existing == path => {
                return Some(format!("{field}: {}: is not a directory", path.display()));
            }
            Ok(_) => {
                return Some(format!(
                    "{field}: {}: cannot be created, {} is not a directory",
                    path.display(),
                    existing.display()
                ));
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => match existing.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => existing = parent,
                _ => return None,
            },
            Err(error) => {
                return Some(format!(
                    "{field}: {}: cannot be inspected ({error})",
                    existing.display()
                ));
            }
        }
    }
}

/// Makes this process create its files private to its user whatever umask it was started with
/// (0700 directories, 0600 files): the data directories hold keys, snapshots of env files and
/// the replicated log. Programs it starts get the usual 022 back (see [`usual_umask`]).
pub fn private_umask() {
    // SAFETY: umask only swaps the process's file mode creation mask.
    unsafe {
        libc::umask(0o077);
    }
}

/// For a child process about to exec a program that is not ours (a restart command, a hook):
/// the umask a program expects, rather than the agent's own private one.
pub fn usual_umask() {
    // SAFETY: as in private_umask; async-signal-safe, so callable between fork and exec.
    unsafe {
        libc::umask(0o022);
    }
}

/// Creates `dir` if needed and makes it and everything in it, to `depth` levels, private to
/// this user (0700 directories, 0600 files): data directories created before this rule, or
/// under another umask, are tightened at start. Links are left alone.
pub fn make_private(dir: &std::path::Path, depth: usize) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let metadata = std::fs::metadata(dir)?;
    // Never tighten a directory others share (`/tmp`, a parent given by mistake).
    // SAFETY: geteuid only reads this process's effective user id.
    let user = unsafe { libc::geteuid() };
    if metadata.mode() & 0o1000 != 0 || metadata.uid() != user {
        return Err(std::io::Error::other(format!(
            "{} is shared (sticky, or owned by uid {}, not {user}): give the data a directory \
             of its own",
            dir.display(),
            metadata.uid()
        )));
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    if depth == 0 {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            make_private(&entry.path(), depth - 1)?;
        } else if kind.is_file() {
            let mode = entry.metadata()?.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                std::fs::set_permissions(
                    entry.path(),
                    std::fs::Permissions::from_mode(mode & 0o700),
                )?;
            }
        }
    }
    Ok(())
}

/// Removes the snapshot files sled was still writing when its disk filled or the process died
/// (`snap.<lsn>.generating`): sled 0.34 reads one as its latest snapshot at the next open and
/// refuses to start (sled issue 1527), though its log holds everything it needs. Call it only
/// after sled refused to open as corrupt (it then holds no lock, and nobody is writing them);
/// whether it removed any.
pub fn remove_unfinished_sled_snapshots(dir: &std::path::Path) -> std::io::Result<bool> {
    let mut removed = false;
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(error) => return Err(error),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            std::fs::remove_file(entry.path())?;
            removed = true;
        }
    }
    Ok(removed)
}

/// The exit status of a process whose store failed to write (`EX_IOERR`): it stopped rather
/// than carry on after a failed write or fsync, and recovers from what its disk holds when
/// started again.
pub const EXIT_STORAGE_FAILED: u8 = 74;

/// The exit status of a coordinator member that met a log entry its binary cannot apply
/// (`EX_PROTOCOL`): written at a newer cluster version. Run a newer release on it.
pub const EXIT_CANNOT_APPLY: u8 = 76;
