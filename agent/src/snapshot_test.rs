use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::*;

struct Fixture {
    root: tempfile::TempDir,
    _store_dir: tempfile::TempDir,
    store: Store,
    service: ServiceConfig,
}

fn fixture() -> Fixture {
    let root = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    for version in ["v1", "v2"] {
        let release = root.path().join("releases").join(version);
        fs::create_dir_all(release.join("bin")).unwrap();
        fs::write(release.join("bin/app"), format!("app {version}")).unwrap();
        fs::write(release.join("VERSION"), version).unwrap();
    }
    fs::create_dir_all(root.path().join("shared/config")).unwrap();
    fs::write(root.path().join("shared/config/app.toml"), b"threads = 4\n").unwrap();
    fs::set_permissions(
        root.path().join("shared/config/app.toml"),
        fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    switch_link(root.path(), "releases/v1").unwrap();
    let service = ServiceConfig {
        config_files: vec![
            "shared/config/app.toml".into(),
            "shared/config/extra.toml".into(),
        ],
        ..ServiceConfig::bare("web", root.path())
    };
    let store = Store::open(&store_dir.path().join("store")).unwrap();
    Fixture {
        root,
        _store_dir: store_dir,
        store,
        service,
    }
}

#[test]
fn restore_puts_back_exact_bytes_modes_link_and_absence() {
    let fixture = fixture();
    let root = fixture.root.path();
    let snapshot = capture(&fixture.store, &fixture.service, vec![], 1).unwrap();

    switch_link(root, "releases/v2").unwrap();
    fs::write(root.join("shared/config/app.toml"), b"threads = 64\n").unwrap();
    fs::set_permissions(
        root.join("shared/config/app.toml"),
        fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    fs::write(root.join("shared/config/extra.toml"), b"new = true\n").unwrap();

    restore(&fixture.store, &fixture.service, &snapshot.id).unwrap();
    assert_eq!(
        fs::read_link(root.join("current")).unwrap().to_str(),
        Some("releases/v1")
    );
    assert_eq!(
        fs::read(root.join("shared/config/app.toml")).unwrap(),
        b"threads = 4\n"
    );
    let mode = fs::metadata(root.join("shared/config/app.toml"))
        .unwrap()
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o640);
    assert!(
        !root.join("shared/config/extra.toml").exists(),
        "a file absent at capture is absent after restore"
    );
    assert_eq!(
        live_manifest(&fixture.service, None).unwrap(),
        snapshot.manifest
    );
}

#[test]
fn the_release_tree_digest_is_captured_and_rehashed_only_where_files_changed() {
    let fixture = fixture();
    let root = fixture.root.path();
    let first = capture(&fixture.store, &fixture.service, vec![], 1).unwrap();
    assert_eq!(
        first.manifest.release_digest.as_deref(),
        Some(
            rewind_shared::digest::tree_digest(&root.join("releases/v1"))
                .unwrap()
                .as_str()
        ),
        "the digest `release register --from-dir` computes"
    );
    assert_eq!((first.release_files, first.hashed_files), (2, 2));
    // Hashed in the same clock tick as they were written, the files are hashed again (a change
    // within that tick would not show); after that, their cached hashes hold.
    std::thread::sleep(std::time::Duration::from_millis(150));
    capture(&fixture.store, &fixture.service, vec![], 2).unwrap();
    let again = capture(&fixture.store, &fixture.service, vec![], 2).unwrap();
    assert_eq!(
        (again.release_files, again.hashed_files),
        (2, 0),
        "nothing changed"
    );
    // A changed file (new content, so new size) is read again, and changes the digest.
    fs::write(root.join("releases/v1/VERSION"), "v1-patched").unwrap();
    let patched = capture(&fixture.store, &fixture.service, vec![], 3).unwrap();
    assert_eq!(patched.hashed_files, 1);
    assert_ne!(
        patched.manifest.release_digest,
        first.manifest.release_digest
    );
    assert!(
        diff(&first.manifest, &patched.manifest)
            .iter()
            .any(|line| line.starts_with("releases/v1: digest sha256:")),
        "{:?}",
        diff(&first.manifest, &patched.manifest)
    );
}

#[test]
fn a_file_rewritten_in_place_with_its_mtime_reset_is_hashed_again() {
    let fixture = fixture();
    let root = fixture.root.path();
    std::thread::sleep(std::time::Duration::from_millis(150));
    let first = capture(&fixture.store, &fixture.service, vec![], 1).unwrap();
    let file = root.join("releases/v1/VERSION");
    let before = fs::metadata(&file).unwrap();
    let original = fs::read(&file).unwrap();
    // Same size, same inode, mtime put back: only ctime tells.
    let tampered: Vec<u8> = original.iter().map(|byte| byte ^ 0x20).collect();
    fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .write_all(&tampered)
        .unwrap();
    let mtime = fs::File::open(&file).unwrap();
    mtime.set_modified(before.modified().unwrap()).unwrap();
    let after = fs::metadata(&file).unwrap();
    assert_eq!(
        (after.len(), after.ino(), after.modified().unwrap()),
        (before.len(), before.ino(), before.modified().unwrap())
    );
    let second = capture(&fixture.store, &fixture.service, vec![], 2).unwrap();
    assert_eq!(second.hashed_files, 1, "the tampered file was read again");
    assert_ne!(
        second.manifest.release_digest,
        first.manifest.release_digest
    );
}

#[test]
fn a_release_modified_since_capture_is_never_restored() {
    let fixture = fixture();
    let root = fixture.root.path();
    let snapshot = capture(&fixture.store, &fixture.service, vec![], 1).unwrap();
    switch_link(root, "releases/v2").unwrap();
    fs::write(
        root.join("shared/config/app.toml"),
        b"threads = 64
",
    )
    .unwrap();
    fs::write(root.join("releases/v1/bin/app"), "tampered").unwrap();
    let error = restore(&fixture.store, &fixture.service, &snapshot.id).unwrap_err();
    assert!(
        matches!(error, AgentError::DigestMismatch { .. })
            && error.to_string().contains("as captured"),
        "{error}"
    );
    // Nothing was written.
    assert_eq!(
        fs::read_link(root.join("current")).unwrap().to_str(),
        Some("releases/v2")
    );
    assert_eq!(
        fs::read(root.join("shared/config/app.toml")).unwrap(),
        b"threads = 64\n"
    );
}

#[test]
fn capturing_unchanged_state_is_deduplicated() {
    let fixture = fixture();
    let first = capture(&fixture.store, &fixture.service, vec![], 1).unwrap();
    let second = capture(&fixture.store, &fixture.service, vec![], 2).unwrap();
    assert_eq!(first.id, second.id);
    assert!(first.new_bytes > 0);
    assert_eq!(second.new_bytes, 0);
}

#[test]
fn a_tampered_manifest_with_a_path_escape_restores_nothing() {
    let fixture = fixture();
    let root = fixture.root.path();
    let mut snapshot = capture(&fixture.store, &fixture.service, vec![], 1).unwrap();
    switch_link(root, "releases/v2").unwrap();
    for bad in ["../outside.toml", "/etc/rewind-test"] {
        snapshot.manifest.files[0].path = bad.into();
        fixture.store.put_snapshot(&snapshot).unwrap();
        let error = restore(&fixture.store, &fixture.service, &snapshot.id).unwrap_err();
        assert!(
            matches!(error, AgentError::UnsafePath { .. }),
            "{bad}: {error}"
        );
    }
    assert_eq!(
        fs::read_link(root.join("current")).unwrap().to_str(),
        Some("releases/v2"),
        "nothing was restored"
    );
}

#[test]
fn a_config_dir_swapped_for_a_symlink_out_of_the_root_is_refused() {
    let fixture = fixture();
    let root = fixture.root.path();
    let outside = tempfile::tempdir().unwrap();
    let snapshot = capture(&fixture.store, &fixture.service, vec![], 1).unwrap();
    fs::remove_dir_all(root.join("shared/config")).unwrap();
    std::os::unix::fs::symlink(outside.path(), root.join("shared/config")).unwrap();
    let error = restore(&fixture.store, &fixture.service, &snapshot.id)
        .unwrap_err()
        .to_string();
    assert!(error.contains("outside the service root"), "{error}");
    assert!(
        fs::read_dir(outside.path()).unwrap().next().is_none(),
        "nothing was written outside"
    );
}

#[test]
fn a_config_dir_swapped_for_a_link_while_the_release_is_hashed_gets_nothing_written_outside() {
    let fixture = fixture();
    let root = fixture.root.path().to_path_buf();
    // A release large enough that hashing it leaves a window between the checks and the writes.
    for index in 0..400 {
        fs::write(
            root.join(format!("releases/v1/bin/part-{index}")),
            [index as u8; 4096],
        )
        .unwrap();
    }
    let snapshot = capture(&fixture.store, &fixture.service, vec![], 1).unwrap();
    fs::write(root.join("shared/config/app.toml"), b"changed").unwrap();
    let outside = tempfile::tempdir().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (root, outside, stop) = (root.clone(), outside.path().to_path_buf(), stop.clone());
        std::thread::spawn(move || {
            let config = root.join("shared/config");
            let real = root.join("shared/config.real");
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                fs::rename(&config, &real).unwrap();
                // A restore may make the directory again in the moment it is gone: then there
                // is no room for the link this round.
                if std::os::unix::fs::symlink(&outside, &config).is_ok() {
                    std::thread::sleep(std::time::Duration::from_micros(300));
                    fs::remove_file(&config).unwrap();
                }
                // Whatever a restore made meanwhile goes; the real directory comes back.
                let _ = fs::remove_dir_all(&config);
                fs::rename(&real, &config).unwrap();
                std::thread::sleep(std::time::Duration::from_micros(300));
            }
        })
    };
    let (mut restored, mut refused) = (0, 0);
    for _ in 0..40 {
        match restore(&fixture.store, &fixture.service, &snapshot.id) {
            Ok(_) => restored += 1,
            Err(_) => refused += 1,
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    swapper.join().unwrap();
    assert_eq!(restored + refused, 40);
    assert!(
        fs::read_dir(outside.path()).unwrap().next().is_none(),
        "nothing was ever written through the link"
    );
}

#[test]
fn a_link_to_a_missing_release_is_refused_before_anything_changes() {
    let fixture = fixture();
    let root = fixture.root.path();
    let snapshot = capture(&fixture.store, &fixture.service, vec![], 1).unwrap();
    fs::write(root.join("shared/config/app.toml"), b"changed").unwrap();
    fs::remove_dir_all(root.join("releases/v1")).unwrap();
    let error = restore(&fixture.store, &fixture.service, &snapshot.id).unwrap_err();
    assert!(
        matches!(error, AgentError::MissingRelease { .. }),
        "{error}"
    );
    assert_eq!(
        fs::read(root.join("shared/config/app.toml")).unwrap(),
        b"changed"
    );
}

#[test]
fn a_current_that_is_not_a_link_or_points_outside_releases_is_refused() {
    let fixture = fixture();
    let root = fixture.root.path();
    switch_link(root, "../elsewhere").unwrap();
    assert!(matches!(
        capture(&fixture.store, &fixture.service, vec![], 1),
        Err(AgentError::UnsafePath { .. })
    ));
    fs::remove_file(root.join("current")).unwrap();
    fs::create_dir(root.join("current")).unwrap();
    assert!(matches!(
        capture(&fixture.store, &fixture.service, vec![], 1),
        Err(AgentError::UnsafePath { .. })
    ));
}

#[test]
fn diff_names_what_changed() {
    let fixture = fixture();
    let root = fixture.root.path();
    let before = capture(&fixture.store, &fixture.service, vec![], 1)
        .unwrap()
        .manifest;
    switch_link(root, "releases/v2").unwrap();
    fs::write(root.join("shared/config/app.toml"), b"x").unwrap();
    let lines = diff(&before, &live_manifest(&fixture.service, None).unwrap());
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].contains("releases/v1 -> releases/v2"));
    assert!(lines[1].starts_with("shared/config/app.toml:"));
}

mod round_trip {
    use proptest::prelude::*;

    use super::*;

    /// One managed file: where (a small namespace, so files share directories), whether it
    /// exists, its bytes and mode.
    #[derive(Clone, Debug)]
    struct GeneratedFile {
        path: String,
        content: Option<Vec<u8>>,
        mode: u32,
    }

    fn generated_file() -> impl Strategy<Value = GeneratedFile> {
        (
            prop::collection::vec(prop::sample::select(vec!["etc", "conf.d", "a", "b"]), 0..3),
            prop::sample::select(vec!["app.toml", "env", "flags.json", ".hidden", "x y"]),
            prop::option::weighted(0.8, prop::collection::vec(any::<u8>(), 0..2048)),
            prop::sample::select(vec![0o600, 0o640, 0o644, 0o755]),
        )
            .prop_map(|(dirs, name, content, mode)| {
                let mut path = dirs.join("/");
                if !path.is_empty() {
                    path.push('/');
                }
                path.push_str(name);
                GeneratedFile {
                    path,
                    content,
                    mode,
                }
            })
    }

    fn lay_out(root: &Path, files: &[GeneratedFile]) {
        for file in files {
            let path = root.join(&file.path);
            match &file.content {
                Some(bytes) => {
                    fs::create_dir_all(path.parent().unwrap()).unwrap();
                    fs::write(&path, bytes).unwrap();
                    fs::set_permissions(&path, fs::Permissions::from_mode(file.mode)).unwrap();
                }
                None => {
                    let _ = fs::remove_file(&path);
                }
            }
        }
    }

    /// Each path with its bytes and mode, or `None` when absent.
    type Observed = Vec<(String, Option<(Vec<u8>, u32)>)>;

    fn observed(root: &Path, paths: &[String]) -> Observed {
        paths
            .iter()
            .map(|path| {
                let full = root.join(path);
                let state = fs::read(&full).ok().map(|bytes| {
                    let mode = fs::metadata(&full).unwrap().permissions().mode() & 0o7777;
                    (bytes, mode)
                });
                (path.clone(), state)
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Whatever the tree held at capture, and whatever happened to it after, a restore
        /// puts back every managed file byte for byte with its mode (or its absence) and the
        /// release link.
        #[test]
        fn capture_then_restore_round_trips_byte_for_byte(
            before in prop::collection::vec(generated_file(), 1..12),
            after in prop::collection::vec(generated_file(), 0..12),
            switch in any::<bool>(),
        ) {
            let root = tempfile::tempdir().unwrap();
            let store_dir = tempfile::tempdir().unwrap();
            for version in ["v1", "v2"] {
                fs::create_dir_all(root.path().join("releases").join(version)).unwrap();
            }
            switch_link(root.path(), "releases/v1").unwrap();
            let mut paths: Vec<String> = before.iter().map(|file| file.path.clone()).collect();
            paths.sort();
            paths.dedup();
            // A later entry for the same path wins, as in a real tree.
            lay_out(root.path(), &before);
            let service = ServiceConfig {
                config_files: paths.clone(),
                ..ServiceConfig::bare("web", root.path())
            };
            let store = Store::open(&store_dir.path().join("store")).unwrap();
            let expected = observed(root.path(), &paths);
            let snapshot = capture(&store, &service, vec![], 1).unwrap();

            lay_out(root.path(), &after);
            if switch {
                switch_link(root.path(), "releases/v2").unwrap();
            }
            restore(&store, &service, &snapshot.id).unwrap();

            prop_assert_eq!(observed(root.path(), &paths), expected);
            prop_assert_eq!(
                fs::read_link(root.path().join("current")).unwrap(),
                std::path::PathBuf::from("releases/v1")
            );
        }
    }
}

/// Whether `needle` appears in any file under `dir`.
fn found_under(dir: &Path, needle: &[u8]) -> bool {
    fs::read_dir(dir).unwrap().any(|entry| {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found_under(&path, needle)
        } else {
            fs::read(&path)
                .unwrap()
                .windows(needle.len())
                .any(|window| window == needle)
        }
    })
}

#[test]
fn env_files_are_kept_encrypted_and_restored_exactly() {
    let fixture = fixture();
    let root = fixture.root.path();
    let secret = b"DB_PASSWORD=s3cret-that-must-not-be-at-rest\n";
    let config_marker = b"threads = 4";
    fs::write(root.join("shared/config/env"), secret).unwrap();
    let service = ServiceConfig {
        env_files: vec!["shared/config/env".into()],
        ..fixture.service.clone()
    };
    let snapshot = capture(&fixture.store, &service, vec![], 1).unwrap();
    let data_dir = fixture._store_dir.path();
    assert!(
        found_under(data_dir, config_marker),
        "the search would find plain bytes"
    );
    assert!(
        !found_under(data_dir, b"s3cret-that-must-not-be-at-rest"),
        "the env file is not stored in plain text"
    );
    let key = fs::metadata(data_dir.join("store.key")).unwrap();
    assert_eq!((key.len(), key.permissions().mode() & 0o777), (32, 0o600));
    fs::write(root.join("shared/config/env"), b"DB_PASSWORD=changed\n").unwrap();
    restore(&fixture.store, &service, &snapshot.id).unwrap();
    assert_eq!(fs::read(root.join("shared/config/env")).unwrap(), secret);
}

#[test]
fn env_files_are_their_own_category_and_diffs_never_show_their_hash() {
    let fixture = fixture();
    let root = fixture.root.path();
    fs::write(root.join("shared/config/env"), b"DB_PASSWORD=hunter2\n").unwrap();
    let service = ServiceConfig {
        env_files: vec!["shared/config/env".into()],
        ..fixture.service.clone()
    };
    let before = capture(&fixture.store, &service, vec![], 1).unwrap();
    let env = before.manifest.files.iter().find(|file| file.env).unwrap();
    assert_eq!(env.path, "shared/config/env");
    assert!(before.manifest.files.iter().filter(|file| file.env).count() == 1);

    fs::write(
        root.join("shared/config/env"),
        b"DB_PASSWORD=correct-horse\n",
    )
    .unwrap();
    let after = live_manifest(&service, Some(&fixture.store)).unwrap();
    let lines = diff(&before.manifest, &after);
    assert_eq!(
        lines,
        ["env shared/config/env: 20 bytes -> 26 bytes (content changed)"]
    );
    restore(&fixture.store, &service, &before.id).unwrap();
    assert_eq!(
        fs::read(root.join("shared/config/env")).unwrap(),
        b"DB_PASSWORD=hunter2\n"
    );
    // A service without env files keeps the snapshot id it always had: `env` is left out.
    let plain = capture(&fixture.store, &fixture.service, vec![], 2).unwrap();
    let json = serde_json::to_string(&plain.manifest).unwrap();
    assert!(!json.contains("\"env\""), "{json}");
}
