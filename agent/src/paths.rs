//! Confinement: every path the agent reads or writes must stay inside the service's root.
//!
//! A declared path must be relative, without `..`, and is reached through [`ServiceRoot`]:
//! one component at a time from the root's open directory, never through a symlink.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::AgentError;
use crate::config::ServiceConfig;

/// Checks a declared relative path's shape: relative, no `..`, not empty.
pub fn check_relative(service: &str, relative: &str) -> Result<(), AgentError> {
    let unsafe_path = |reason: &str| AgentError::UnsafePath {
        service: service.to_string(),
        path: relative.to_string(),
        reason: reason.to_string(),
    };
    let path = Path::new(relative);
    if relative.is_empty() {
        return Err(unsafe_path("is empty"));
    }
    if path.is_absolute() {
        return Err(unsafe_path(
            "is absolute; paths are relative to the service root",
        ));
    }
    for component in path.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err(unsafe_path("contains '..'")),
            Component::RootDir | Component::Prefix(_) => return Err(unsafe_path("is absolute")),
        }
    }
    Ok(())
}

/// A service's root directory, opened once: every file the agent reads, writes, links or
/// removes for the service is reached from this handle one component at a time, each opened
/// relative to the last without following a symlink (`O_NOFOLLOW`, as `openat2`'s
/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` would). A directory swapped for a link at any moment,
/// even between a check and a write, makes the operation fail by name instead of leading it
/// outside the root. Only the root itself is followed if it is a link, when it is opened.
pub struct ServiceRoot {
    service: String,
    root: PathBuf,
    dir: OwnedFd,
}

/// A release directory opened beneath its service's root, for hashing.
pub struct OpenRelease {
    pub dir: OwnedFd,
    /// How errors name it.
    pub shown: PathBuf,
}

/// Permissions of directories a restore creates (a config directory removed since capture).
const CREATED_DIR_MODE: u32 = 0o755;
/// Largest config, env or flags file rewind captures or reads: config, not data.
pub const MAX_SERVICE_FILE_BYTES: u64 = 16 << 20;

impl ServiceRoot {
    pub fn open(service: &ServiceConfig) -> Result<Self, AgentError> {
        Self::open_at(&service.name, &service.root)
    }

    pub fn open_at(service: &str, root: &Path) -> Result<Self, AgentError> {
        let dir = rustix::fs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|errno| AgentError::Io {
            action: "open",
            path: root.to_path_buf(),
            source: errno.into(),
        })?;
        Ok(Self {
            service: service.to_string(),
            root: root.to_path_buf(),
            dir,
        })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    fn unsafe_path(&self, relative: &str, reason: impl Into<String>) -> AgentError {
        AgentError::UnsafePath {
            service: self.service.clone(),
            path: relative.to_string(),
            reason: reason.into(),
        }
    }

    fn io(&self, action: &'static str, relative: &str, errno: rustix::io::Errno) -> AgentError {
        AgentError::Io {
            action,
            path: self.root.join(relative),
            source: errno.into(),
        }
    }

    /// Opens the directory `components` lead to, creating what is missing when `create`;
    /// `None` when something is missing and `create` is off.
    fn open_dir(
        &self,
        relative: &str,
        components: &[&OsStr],
        create: bool,
    ) -> Result<Option<OwnedFd>, AgentError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut current = rustix::io::dup(&self.dir).map_err(|e| self.io("open", "", e))?;
        for (depth, name) in components.iter().enumerate() {
            let opened = match rustix::fs::openat(&current, *name, flags, Mode::empty()) {
                Err(Errno::NOENT) if create => {
                    match rustix::fs::mkdirat(
                        &current,
                        *name,
                        Mode::from_raw_mode(CREATED_DIR_MODE),
                    ) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(errno) => return Err(self.io("create", relative, errno)),
                    }
                    // The agent's own umask (077) narrowed the mode: the service must be able
                    // to read what is restored into it.
                    rustix::fs::openat(&current, *name, flags, Mode::empty()).and_then(|created| {
                        rustix::fs::fchmod(&created, Mode::from_raw_mode(CREATED_DIR_MODE))?;
                        Ok(created)
                    })
                }
                other => other,
            };
            current = match opened {
                Ok(fd) => fd,
                Err(Errno::NOENT) => return Ok(None),
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    let at: PathBuf = components[..=depth].iter().collect();
                    return Err(self.unsafe_path(
                        relative,
                        format!(
                            "{} is a symbolic link or not a directory: paths are followed \
                             only through real directories, never outside the service root",
                            at.display()
                        ),
                    ));
                }
                Err(errno) => return Err(self.io("open", relative, errno)),
            };
        }
        Ok(Some(current))
    }

    /// The directory holding `relative` (opened, created if `create`) and its last component.
    fn parent_of<'r>(
        &self,
        relative: &'r str,
        create: bool,
    ) -> Result<Option<(OwnedFd, &'r OsStr)>, AgentError> {
        check_relative(&self.service, relative)?;
        let components: Vec<&OsStr> = Path::new(relative)
            .components()
            .filter_map(|component| match component {
                Component::Normal(name) => Some(name),
                _ => None,
            })
            .collect();
        let Some((name, parents)) = components.split_last() else {
            return Err(self.unsafe_path(relative, "names no file"));
        };
        Ok(self
            .open_dir(relative, parents, create)?
            .map(|dir| (dir, *name)))
    }

    /// A release directory (`releases/<version>`, checked by the caller) opened for hashing;
    /// `MissingRelease` when it is not there (or is not a real directory).
    pub fn open_release(&self, target: &str) -> Result<OpenRelease, AgentError> {
        let missing = || AgentError::MissingRelease {
            service: self.service.clone(),
            version: Path::new(target).file_name().map_or_else(
                || target.to_string(),
                |name| name.to_string_lossy().into_owned(),
            ),
            path: self.root.join(target),
        };
        let (parent, name) = self.parent_of(target, false)?.ok_or_else(missing)?;
        match rustix::fs::openat(
            &parent,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(dir) => Ok(OpenRelease {
                dir,
                shown: self.root.join(target),
            }),
            Err(Errno::NOENT) => Err(missing()),
            Err(Errno::LOOP | Errno::NOTDIR) => Err(self.unsafe_path(
                target,
                "is a symbolic link or not a directory: a release is a real directory",
            )),
            Err(errno) => Err(self.io("open", target, errno)),
        }
    }

    /// Whether `target` is a real directory beneath the root.
    pub fn release_exists(&self, target: &str) -> bool {
        self.open_release(target).is_ok()
    }

    /// Reads a regular file of at most `max_bytes`, taking the content and the metadata from the
    /// same open file; `None` when it (or a directory above it) does not exist. A link, FIFO,
    /// socket or device is refused without being opened for long or read, and so is a file
    /// larger than `max_bytes` (it is never read into memory).
    pub fn read_regular(
        &self,
        relative: &str,
        max_bytes: u64,
    ) -> Result<Option<(Vec<u8>, fs::Metadata)>, AgentError> {
        let Some((parent, name)) = self.parent_of(relative, false)? else {
            return Ok(None);
        };
        let shown = self.root.join(relative);
        let (mut file, _) = match rewind_shared::digest::open_regular_at(&parent, name, &shown) {
            Ok(opened) => opened,
            Err(rewind_shared::SharedError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(None);
            }
            Err(rewind_shared::SharedError::Read { source, .. })
                if source.raw_os_error() == Some(libc::ELOOP)
                    || source.kind() == std::io::ErrorKind::InvalidInput =>
            {
                return Err(self.unsafe_path(
                    relative,
                    "is not a regular file (a symlink, directory, FIFO or device is never read)",
                ));
            }
            Err(error) => return Err(AgentError::invalid("path", error.to_string())),
        };
        let metadata = file.metadata().map_err(AgentError::io("inspect", &shown))?;
        if metadata.len() > max_bytes {
            return Err(AgentError::refused(
                "file",
                format!(
                    "{} is {} bytes, more than the {max_bytes} rewind reads",
                    shown.display(),
                    metadata.len()
                ),
            ));
        }
        let mut bytes = Vec::with_capacity(metadata.len() as usize);
        // Bounded again while reading: the file may grow under us.
        (&mut file)
            .take(max_bytes + 1)
            .read_to_end(&mut bytes)
            .map_err(AgentError::io("read", &shown))?;
        if bytes.len() as u64 > max_bytes {
            return Err(AgentError::refused(
                "file",
                format!(
                    "{} grew past {max_bytes} bytes while it was read",
                    shown.display()
                ),
            ));
        }
        Ok(Some((bytes, metadata)))
    }

    /// Writes `bytes` to `relative` through a staging file created exclusively in the same
    /// (opened) directory, then renames it over the target and syncs the directory. Missing
    /// directories are created. Owner and group are set when given.
    pub fn write_atomically(
        &self,
        relative: &str,
        bytes: &[u8],
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<(), AgentError> {
        let (dir, name) = self
            .parent_of(relative, true)?
            .expect("created directories exist");
        let mut staging = OsString::from(".");
        staging.push(name);
        staging.push(".rewind-new");
        let shown = self.root.join(relative);
        let io = |action| AgentError::io(action, &shown);
        match rustix::fs::unlinkat(&dir, &staging, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(errno) => return Err(io("remove")(errno.into())),
        }
        let fd = rustix::fs::openat(
            &dir,
            &staging,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|errno| io("create")(errno.into()))?;
        let mut file = fs::File::from(fd);
        file.write_all(bytes).map_err(io("write"))?;
        if let Some((uid, gid)) = owner {
            let metadata = file.metadata().map_err(io("inspect"))?;
            if (metadata.uid(), metadata.gid()) != (uid, gid) {
                std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(io("chown"))?;
            }
        }
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io("chmod"))?;
        file.sync_all().map_err(io("sync"))?;
        rustix::fs::renameat(&dir, &staging, &dir, name)
            .map_err(|errno| io("replace")(errno.into()))?;
        rustix::fs::fsync(&dir).map_err(|errno| io("sync")(errno.into()))
    }

    /// Removes the file (or link) `relative`; nothing to do if it is not there.
    pub fn remove_file(&self, relative: &str) -> Result<(), AgentError> {
        let Some((dir, name)) = self.parent_of(relative, false)? else {
            return Ok(());
        };
        match rustix::fs::unlinkat(&dir, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(errno) => Err(self.io("remove", relative, errno)),
        }
    }

    /// Points the link `name` (directly in the root) at `target` atomically: a new link renamed
    /// over the old one, then the root synced.
    pub fn switch_link(&self, name: &str, target: &str) -> Result<(), AgentError> {
        let staging = format!(".{name}.rewind-new");
        match rustix::fs::unlinkat(&self.dir, staging.as_str(), AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(errno) => return Err(self.io("remove", &staging, errno)),
        }
        rustix::fs::symlinkat(target, &self.dir, staging.as_str())
            .map_err(|errno| self.io("create link", &staging, errno))?;
        rustix::fs::renameat(&self.dir, staging.as_str(), &self.dir, name)
            .map_err(|errno| self.io("replace link", name, errno))?;
        rustix::fs::fsync(&self.dir).map_err(|errno| self.io("sync", "", errno))
    }

    /// Removes a whole directory tree beneath the root (a release being pruned), without ever
    /// following a link inside it.
    pub fn remove_tree(&self, relative: &str) -> Result<(), AgentError> {
        let Some((parent, name)) = self.parent_of(relative, false)? else {
            return Ok(());
        };
        self.remove_entry(&parent, name, relative)
    }

    fn remove_entry(&self, dir: &OwnedFd, name: &OsStr, shown: &str) -> Result<(), AgentError> {
        let stat = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::NOENT) => return Ok(()),
            Err(errno) => return Err(self.io("inspect", shown, errno)),
        };
        if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
            let child = rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|errno| self.io("open", shown, errno))?;
            let names = rewind_shared::digest::list_names(&child)
                .map_err(|errno| self.io("list", shown, errno))?;
            for entry_name in names {
                self.remove_entry(&child, &entry_name, shown)?;
            }
            rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
                .map_err(|errno| self.io("remove", shown, errno))
        } else {
            rustix::fs::unlinkat(dir, name, AtFlags::empty())
                .map_err(|errno| self.io("remove", shown, errno))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversal_absolute_and_symlink_escapes_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("config")).unwrap();
        std::fs::create_dir(root.path().join("real")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("not-yet"), root.path().join("dangling"))
            .unwrap();
        // Even a link that stays inside is not followed: only real directories are.
        std::os::unix::fs::symlink(root.path().join("real"), root.path().join("inside")).unwrap();
        let service = ServiceRoot::open_at("web", root.path()).unwrap();

        service
            .write_atomically("config/app.toml", b"a", 0o640, None)
            .unwrap();
        service
            .write_atomically("new/dir/app.toml", b"b", 0o640, None)
            .unwrap();
        assert_eq!(
            std::fs::read(root.path().join("new/dir/app.toml")).unwrap(),
            b"b"
        );
        for (path, why) in [
            ("../etc/passwd", "'..'"),
            ("config/../../x", "'..'"),
            ("/etc/passwd", "absolute"),
            ("", "empty"),
            ("escape/app.toml", "escape is a symbolic link"),
            ("escape/new/app.toml", "escape is a symbolic link"),
            ("dangling/app.toml", "dangling is a symbolic link"),
            ("inside/app.toml", "inside is a symbolic link"),
            (
                "config/app.toml/x",
                "config/app.toml is a symbolic link or not a directory",
            ),
        ] {
            let error = service
                .write_atomically(path, b"x", 0o600, None)
                .unwrap_err()
                .to_string();
            assert!(error.contains(why), "{path}: {error}");
        }
        assert!(
            std::fs::read_dir(outside.path()).unwrap().next().is_none(),
            "nothing was written outside"
        );
        // Reading is confined the same way.
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        assert!(
            service
                .read_regular("escape/secret", MAX_SERVICE_FILE_BYTES)
                .is_err()
        );
        std::os::unix::fs::symlink(
            outside.path().join("secret"),
            root.path().join("config/link"),
        )
        .unwrap();
        let refused = service
            .read_regular("config/link", MAX_SERVICE_FILE_BYTES)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("not a regular file"), "{refused}");
    }

    #[test]
    fn a_directory_swapped_for_a_link_after_the_root_is_opened_is_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("config")).unwrap();
        let service = ServiceRoot::open_at("web", root.path()).unwrap();
        // What a check-then-write-by-path could not see: the swap comes after any check.
        std::fs::rename(root.path().join("config"), root.path().join("config.old")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("config")).unwrap();
        assert!(
            service
                .write_atomically("config/app.toml", b"x", 0o600, None)
                .is_err()
        );
        assert!(
            service.remove_tree("config").is_ok(),
            "the link itself goes"
        );
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    }

    #[test]
    fn pruning_a_tree_never_follows_links_inside_it() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"k").unwrap();
        let release = root.path().join("releases/v1");
        std::fs::create_dir_all(release.join("bin")).unwrap();
        std::fs::write(release.join("bin/app"), b"v1").unwrap();
        std::os::unix::fs::symlink(outside.path(), release.join("data")).unwrap();
        let service = ServiceRoot::open_at("web", root.path()).unwrap();
        service.remove_tree("releases/v1").unwrap();
        assert!(!release.exists());
        assert!(outside.path().join("keep").exists());
    }
}
