//! Content digests: `sha256:<hex>` of bytes, and of a whole directory tree.
//!
//! A release's artifact digest is the tree digest of `releases/<version>/`: it covers every
//! file's relative path, executable bit and content, and every symlink's target, in sorted
//! order, so the same tree always hashes the same wherever it is unpacked.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

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
    tree_digest_with(root, &mut |path, _| file_sha256(path))
}

/// Hashes a regular file of a tree: its path and metadata, to its content's sha256 hex.
pub type FileHasher<'a> = dyn FnMut(&Path, &fs::Metadata) -> Result<String, SharedError> + 'a;

/// [`tree_digest`] with the files' content hashes from `file_hash`, which may answer from a
/// cache (the agent skips files whose size and mtime are unchanged). Same result for the same
/// content.
pub fn tree_digest_with(
    root: &Path,
    file_hash: &mut FileHasher<'_>,
) -> Result<String, SharedError> {
    let mut listing = Sha256::new();
    hash_dir(root, root, &mut listing, file_hash)?;
    Ok(format!("sha256:{}", hex::encode(listing.finalize())))
}

fn hash_dir(
    root: &Path,
    dir: &Path,
    listing: &mut Sha256,
    file_hash: &mut FileHasher<'_>,
) -> Result<(), SharedError> {
    let read_error = |source| SharedError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries = fs::read_dir(dir)
        .map_err(read_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_error)?;
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let path = entry.path();
        let relative = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .to_string_lossy()
            .into_owned();
        let metadata = fs::symlink_metadata(&path).map_err(|source| SharedError::Read {
            path: path.clone(),
            source,
        })?;
        if metadata.is_symlink() {
            let target = fs::read_link(&path).map_err(|source| SharedError::Read {
                path: path.clone(),
                source,
            })?;
            listing.update(format!("L {relative} {}\n", target.to_string_lossy()));
        } else if metadata.is_dir() {
            listing.update(format!("D {relative}\n"));
            hash_dir(root, &path, listing, file_hash)?;
        } else {
            let executable = metadata.permissions().mode() & 0o111 != 0;
            let content = file_hash(&path, &metadata)?;
            listing.update(format!(
                "F {relative} {} {content}\n",
                if executable { "x" } else { "-" }
            ));
        }
    }
    Ok(())
}

/// Streams a file through sha256, so large artifacts never sit in memory whole.
pub fn file_sha256(path: &Path) -> Result<String, SharedError> {
    let read_error = |source| SharedError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::File::open(path).map_err(read_error)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = file.read(&mut buffer).map_err(read_error)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
