//! Snapshot capture of a large service: a release tree of `REWIND_BENCH_FILES` files (default
//! 10,000) totalling `REWIND_BENCH_MB` MB (default 200) in 100 directories, plus a config file.
//! Reports the first capture (every file hashed), an unchanged capture (nothing re-read), and a
//! capture after 10 files changed; each with its time, what it read and what it stored.
//!
//! Run: `cargo bench -p rewind-agent --bench capture`

use std::time::{Duration, Instant};

use rewind_agent::config::ServiceConfig;
use rewind_agent::snapshot::{SnapshotRecord, capture, switch_link};
use rewind_agent::store::Store;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn report(label: &str, record: &SnapshotRecord, took: Duration) {
    println!(
        "{label:<28} {:>8.0} ms  {:>6} of {} files read ({:.0} MB tree)  {:>7} bytes stored",
        took.as_secs_f64() * 1000.0,
        record.hashed_files,
        record.release_files,
        record.release_bytes as f64 / 1e6,
        record.new_bytes
    );
}

fn main() {
    let files = env_number("REWIND_BENCH_FILES", 10_000);
    let total_bytes = env_number("REWIND_BENCH_MB", 200) * 1_000_000;
    let file_bytes = (total_bytes / files.max(1)) as usize;
    let root = tempfile::tempdir().unwrap();
    let release = root.path().join("releases/v1");
    for number in 0..files {
        let dir = release.join(format!("lib/d{:03}", number % 100));
        std::fs::create_dir_all(&dir).unwrap();
        // Distinct content per file, so nothing is deduplicated by accident.
        let mut content = vec![(number % 251) as u8; file_bytes];
        content[..8].copy_from_slice(&number.to_le_bytes());
        std::fs::write(dir.join(format!("f{number:05}.bin")), content).unwrap();
    }
    std::fs::create_dir_all(root.path().join("config")).unwrap();
    std::fs::write(root.path().join("config/app.toml"), "threads = 4\n").unwrap();
    switch_link(root.path(), "releases/v1").unwrap();
    let service = ServiceConfig {
        config_files: vec!["config/app.toml".into()],
        ..ServiceConfig::bare("web", root.path())
    };
    let store_dir = tempfile::tempdir().unwrap();
    let store = Store::open(&store_dir.path().join("store")).unwrap();
    // A release's files are written long before it is captured; the hash cache distrusts a file
    // changed within 100 ms of being hashed (see `CachedHash::holds_for`), so without this wait
    // the files written last would be read again by the next capture, as many as the store's
    // open left time for.
    std::thread::sleep(std::time::Duration::from_millis(200));
    println!(
        "Capturing a service whose release holds {files} files, {} MB (files in the page cache):",
        total_bytes / 1_000_000
    );
    let started = Instant::now();
    let first = capture(&store, &service, vec![], 1).unwrap();
    report("first capture", &first, started.elapsed());
    let started = Instant::now();
    let unchanged = capture(&store, &service, vec![], 2).unwrap();
    report("unchanged (incremental)", &unchanged, started.elapsed());
    assert_eq!(unchanged.id, first.id);
    for number in 0..10u64 {
        let path = release.join(format!("lib/d{:03}/f{number:05}.bin", number % 100));
        std::fs::write(path, vec![7u8; file_bytes + 1]).unwrap();
    }
    let started = Instant::now();
    let changed = capture(&store, &service, vec![], 3).unwrap();
    report("after 10 files changed", &changed, started.elapsed());
    assert_ne!(changed.id, first.id);
}
