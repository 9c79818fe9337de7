//! Confinement: every path the agent writes must stay inside the service's root.
//!
//! A declared path must be relative, without `..`, and after resolving the symlinks of its
//! parent directories it must still be inside the root: a restore never writes through a link
//! that points elsewhere.

use std::path::{Component, Path, PathBuf};

use crate::AgentError;

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

/// Resolves `relative` under `root`, refusing anything whose parent directory resolves outside
/// the root. The final component itself may be a symlink: writes replace it, never follow it.
/// Directories that do not exist yet are resolved through their nearest existing ancestor (a
/// file may be declared, and captured as absent, before its directory exists).
pub fn confined(service: &str, root: &Path, relative: &str) -> Result<PathBuf, AgentError> {
    check_relative(service, relative)?;
    let canonical_root = root
        .canonicalize()
        .map_err(AgentError::io("resolve", root))?;
    let joined = canonical_root.join(relative);
    let parent = joined.parent().unwrap_or(&canonical_root);
    let mut existing = parent.to_path_buf();
    let mut missing = Vec::new();
    let resolved_parent = loop {
        match existing.canonicalize() {
            Ok(resolved) => {
                break missing
                    .iter()
                    .rev()
                    .fold(resolved, |path, name| path.join(name));
            }
            Err(error)
                if error.kind() == std::io::ErrorKind::NotFound && existing != canonical_root =>
            {
                // Missing, or a dangling link (which would lead wherever it points once its
                // target appears): only a truly absent directory is resolved through its parent.
                if existing.symlink_metadata().is_ok() {
                    return Err(AgentError::UnsafePath {
                        service: service.to_string(),
                        path: relative.to_string(),
                        reason: format!("{} is a dangling symbolic link", existing.display()),
                    });
                }
                missing.push(existing.file_name().unwrap_or_default().to_os_string());
                existing.pop();
            }
            Err(error) => return Err(AgentError::io("resolve", parent)(error)),
        }
    };
    if !resolved_parent.starts_with(&canonical_root) {
        return Err(AgentError::UnsafePath {
            service: service.to_string(),
            path: relative.to_string(),
            reason: format!(
                "resolves to {} outside the service root {}",
                resolved_parent.display(),
                canonical_root.display()
            ),
        });
    }
    Ok(resolved_parent.join(joined.file_name().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversal_absolute_and_symlink_escapes_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("config")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("not-yet"), root.path().join("dangling"))
            .unwrap();

        assert!(confined("web", root.path(), "config/app.toml").is_ok());
        let not_yet = confined("web", root.path(), "new/dir/app.toml").unwrap();
        assert!(not_yet.starts_with(root.path().canonicalize().unwrap()));
        for (path, why) in [
            ("../etc/passwd", "'..'"),
            ("config/../../x", "'..'"),
            ("/etc/passwd", "absolute"),
            ("", "empty"),
            ("escape/app.toml", "outside the service root"),
            ("escape/new/app.toml", "outside the service root"),
            ("dangling/app.toml", "dangling symbolic link"),
        ] {
            let error = confined("web", root.path(), path).unwrap_err().to_string();
            assert!(error.contains(why), "{path}: {error}");
        }
    }
}
