//! Content digests: `sha256:<hex>` of bytes, and of a whole directory tree.
//!
//! A release's artifact digest is the tree digest of `releases/<version>/`: it covers every
//! file's relative path, executable bit and content, and every symlink's target, in sorted
//! order, so the same tree always hashes the same wherever it is unpacked.

use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};

use sha2::{Digest, Sha256};

use crate::SharedError;

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Lower-case hex sha256 of `bytes`, without a prefix.
/// The checksum the schema history records for a migration: sha256 over the three scripts,
/// each preceded by its length, so no script's end can be moved into the next. Computed by the
/// coordinator at registration and again by the agent before it runs them.
pub fn migration_checksum(up_sql: &str, down_sql: &str, verify_sql: &str) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    for script in [up_sql, down_sql, verify_sql] {
        hasher.update((script.len() as u64).to_be_bytes());
        hasher.update(script.as_bytes());
    }
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `sha256:<hex>` over the tree rooted at `root` (see the module docs).
pub fn tree_digest(root: &Path) -> Result<String, SharedError> {
    tree_digest_with(root, &mut |_, _, file| file_sha256_of(file))
}

/// What the walk read of a regular file, from the file it opened (`fstat`), for a cache to
/// decide whether the content can have changed since it was last hashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileFacts {
    pub size: u64,
    pub mtime_ns: i64,
    /// Set by the kernel on every change, content or metadata; cannot be set back.
    pub ctime_ns: i64,
    pub inode: u64,
    pub device: u64,
    pub mode: u32,
}

/// Hashes a regular file of a tree, given its path relative to the root, what its open file
/// says of it, and the open file itself: to its content's sha256 hex.
pub type FileHasher<'a> =
    dyn FnMut(&Path, &FileFacts, &mut fs::File) -> Result<String, SharedError> + 'a;

/// [`tree_digest`] with the files' content hashes from `file_hash`, which may answer from a
/// cache (the agent skips files it knows unchanged). Same result for the same content.
///
/// The walk never follows a symlink below `root` and opens every directory and file relative
/// to its parent's open directory without following links (`O_NOFOLLOW`), so swapping a
/// directory for a link while the tree is hashed cannot lead it outside. Anything but a regular
/// file, a directory or a symlink (a FIFO, a socket, a device) is refused by path: reading one
/// could block for ever or never end. `root` itself is followed if it is a link.
pub fn tree_digest_with(
    root: &Path,
    file_hash: &mut FileHasher<'_>,
) -> Result<String, SharedError> {
    let dir = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|errno| read_error(root, errno))?;
    tree_digest_at(dir, root, file_hash)
}

/// [`tree_digest_with`] over an already open directory; `shown_as` names it in errors.
pub fn tree_digest_at(
    dir: OwnedFd,
    shown_as: &Path,
    file_hash: &mut FileHasher<'_>,
) -> Result<String, SharedError> {
    let mut listing = Sha256::new();
    let mut walk = Walk {
        root: shown_as,
        listing: &mut listing,
        file_hash,
    };
    walk.dir(dir, Path::new(""))?;
    Ok(format!("sha256:{}", hex::encode(listing.finalize())))
}

struct Walk<'a, 'b> {
    root: &'a Path,
    listing: &'a mut Sha256,
    file_hash: &'a mut FileHasher<'b>,
}

impl Walk<'_, '_> {
    fn shown(&self, relative: &Path) -> PathBuf {
        self.root.join(relative)
    }

    fn dir(&mut self, dir: OwnedFd, relative_dir: &Path) -> Result<(), SharedError> {
        let shown = self.shown(relative_dir);
        let mut names = list_names(&dir).map_err(|errno| read_error(&shown, errno))?;
        names.sort();
        for name in names {
            let relative = relative_dir.join(&name);
            let shown = self.shown(&relative);
            let text = relative.to_string_lossy().into_owned();
            let stat = rustix::fs::statat(&dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|errno| read_error(&shown, errno))?;
            match FileType::from_raw_mode(stat.st_mode) {
                FileType::Symlink => {
                    let target = rustix::fs::readlinkat(&dir, name.as_os_str(), Vec::new())
                        .map_err(|errno| read_error(&shown, errno))?;
                    let target = OsStr::from_bytes(target.to_bytes()).to_string_lossy();
                    self.listing.update(format!("L {text} {target}\n"));
                }
                FileType::Directory => {
                    self.listing.update(format!("D {text}\n"));
                    let child = rustix::fs::openat(
                        &dir,
                        name.as_os_str(),
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|errno| read_error(&shown, errno))?;
                    self.dir(child, &relative)?;
                }
                FileType::RegularFile => {
                    let (mut file, facts) = open_regular_at(&dir, name.as_os_str(), &shown)?;
                    let executable = facts.mode & 0o111 != 0;
                    let content = (self.file_hash)(&relative, &facts, &mut file)?;
                    self.listing.update(format!(
                        "F {text} {} {content}\n",
                        if executable { "x" } else { "-" }
                    ));
                }
                other => return Err(special_file(&shown, other)),
            }
        }
        Ok(())
    }
}

/// The names in the open directory `dir` (without `.` and `..`), in no order. The listing is
/// closed when this returns, so a walk that descends holds one descriptor per level.
pub fn list_names(dir: &OwnedFd) -> Result<Vec<std::ffi::OsString>, rustix::io::Errno> {
    let mut names = Vec::new();
    for entry in Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(names)
}

/// Opens `name` in `dir` for reading if, and only if, it is a regular file: never following a
/// link, never blocking on a FIFO or device, never becoming a controlling terminal. The facts
/// come from the open file, so they describe what is read.
pub fn open_regular_at(
    dir: impl AsFd,
    name: &OsStr,
    shown: &Path,
) -> Result<(fs::File, FileFacts), SharedError> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|errno| read_error(shown, errno))?;
    let stat = rustix::fs::fstat(&fd).map_err(|errno| read_error(shown, errno))?;
    let kind = FileType::from_raw_mode(stat.st_mode);
    if kind != FileType::RegularFile {
        return Err(special_file(shown, kind));
    }
    let facts = FileFacts {
        size: stat.st_size as u64,
        mtime_ns: stat.st_mtime as i64 * 1_000_000_000 + stat.st_mtime_nsec as i64,
        ctime_ns: stat.st_ctime as i64 * 1_000_000_000 + stat.st_ctime_nsec as i64,
        inode: stat.st_ino as u64,
        device: stat.st_dev as u64,
        mode: stat.st_mode as u32 & 0o7777,
    };
    Ok((fs::File::from(fd), facts))
}

fn special_file(path: &Path, kind: FileType) -> SharedError {
    SharedError::Read {
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "is a {}: a release holds only regular files, directories and symlinks",
                match kind {
                    FileType::Fifo => "FIFO",
                    FileType::Socket => "socket",
                    FileType::CharacterDevice => "character device",
                    FileType::BlockDevice => "block device",
                    FileType::Directory => "directory",
                    FileType::Symlink => "symlink",
                    _ => "special file",
                }
            ),
        ),
    }
}

fn read_error(path: &Path, errno: rustix::io::Errno) -> SharedError {
    SharedError::Read {
        path: path.to_path_buf(),
        source: errno.into(),
    }
}

/// Streams a file through sha256, so large artifacts never sit in memory whole. Refuses
/// anything but a regular file (see [`open_regular_at`]).
pub fn file_sha256(path: &Path) -> Result<String, SharedError> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let dir = rustix::fs::open(
        parent,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|errno| read_error(parent, errno))?;
    let name = path.file_name().unwrap_or_default();
    let (mut file, _) = open_regular_at(&dir, name, path)?;
    file_sha256_of(&mut file).map_err(|error| match error {
        SharedError::Read { source, .. } => SharedError::Read {
            path: path.to_path_buf(),
            source,
        },
        other => other,
    })
}

/// Streams an open file through sha256 from where it stands.
pub fn file_sha256_of(file: &mut fs::File) -> Result<String, SharedError> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = file.read(&mut buffer).map_err(|source| SharedError::Read {
            path: PathBuf::from("(open file)"),
            source,
        })?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn special_files_are_refused_by_path_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("app"), b"v1").unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("pipe"),
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        // Opening a FIFO for reading blocks until a writer comes: this would hang without
        // O_NONBLOCK and the type check.
        let refused = tree_digest(root).unwrap_err().to_string();
        assert!(
            refused.contains("pipe") && refused.contains("is a FIFO"),
            "{refused}"
        );
        let refused = file_sha256(&root.join("pipe")).unwrap_err().to_string();
        assert!(refused.contains("is a FIFO"), "{refused}");
    }

    #[test]
    fn a_symlinked_directory_below_the_root_is_listed_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), b"s").unwrap();
        let root = dir.path();
        std::os::unix::fs::symlink(outside.path(), root.join("lib")).unwrap();
        let linked = tree_digest(root).unwrap();
        fs::write(outside.path().join("secret"), b"changed").unwrap();
        assert_eq!(
            linked,
            tree_digest(root).unwrap(),
            "the link's target is not read"
        );
    }

    #[test]
    fn tree_digest_is_stable_and_sees_every_kind_of_change() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("bin")).unwrap();
        fs::write(root.join("bin/app"), b"v1").unwrap();
        fs::write(root.join("README"), b"hello").unwrap();
        let first = tree_digest(root).unwrap();
        assert_eq!(first, tree_digest(root).unwrap());

        fs::write(root.join("bin/app"), b"v2").unwrap();
        let content_changed = tree_digest(root).unwrap();
        assert_ne!(first, content_changed);

        fs::set_permissions(root.join("bin/app"), fs::Permissions::from_mode(0o755)).unwrap();
        let mode_changed = tree_digest(root).unwrap();
        assert_ne!(content_changed, mode_changed);

        std::os::unix::fs::symlink("bin/app", root.join("link")).unwrap();
        assert_ne!(mode_changed, tree_digest(root).unwrap());
    }
}
