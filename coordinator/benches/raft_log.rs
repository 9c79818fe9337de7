//! The Raft log's storage alone, sled (as `RaftStore` kept it until the log moved) against
//! TiKV's `raft-engine` (as `RaftStore` keeps it now), in one run: what a member pays to make
//! appended entries durable before it acknowledges them. Each append writes the entries and the
//! hard state (its commit index moves) and then waits for the disk: for sled, a batch into the
//! `raft-log` tree (removing any conflicting suffix), the hard state into `raft-meta` and a
//! `Db::flush`, the code `RaftStore` ran before; for raft-engine, `RaftStore::persist` (one
//! `LogBatch`, written with `sync`). Entries are 256 bytes of data, as in the replicated-writes
//! benchmark, random so that raft-engine's compression of large batches gains nothing; appends
//! of 1 entry (one client at a time) and of 64 (a batch under load). Reported: latency per
//! append (p50, p99), entries per second, CPU time of the process per append (user + system,
//! from getrusage, so the engines' own threads count), and the threads each engine keeps.
//!
//! Run: `cargo bench -p rewind-coordinator --bench raft_log`
//! (`REWIND_BENCH_APPENDS` sets the appends per run, default 5,000.)

use std::path::Path;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState};
use rewind_coordinator::storage::RaftStore;

const ENTRY_BYTES: usize = 256;

/// One way to keep the log: appends `entries` and the hard state, durable on return.
trait Log {
    fn append_durably(&mut self, entries: &[Entry], hard_state: &HardState);
}

/// The log as `RaftStore` kept it in sled before it moved to raft-engine.
struct Sled {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
}

impl Sled {
    fn open(dir: &Path) -> Self {
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(None)
            .open()
            .expect("open sled");
        let log = db.open_tree("raft-log").expect("sled tree");
        let meta = db.open_tree("raft-meta").expect("sled tree");
        Self { db, log, meta }
    }
}

impl Log for Sled {
    fn append_durably(&mut self, entries: &[Entry], hard_state: &HardState) {
        let mut batch = sled::Batch::default();
        for key in self.log.range(entries[0].index.to_be_bytes()..).keys() {
            batch.remove(key.expect("sled read"));
        }
        for entry in entries {
            let bytes = entry.write_to_bytes().expect("encode entry");
            batch.insert(&entry.index.to_be_bytes(), bytes);
        }
        self.log.apply_batch(batch).expect("sled append");
        let bytes = hard_state.write_to_bytes().expect("encode hard state");
        self.meta
            .insert(b"hard-state", bytes)
            .expect("sled hard state");
        self.db.flush().expect("sled flush");
    }
}

struct RaftEngine(RaftStore);

impl Log for RaftEngine {
    fn append_durably(&mut self, entries: &[Entry], hard_state: &HardState) {
        self.0
            .persist(entries, Some(hard_state), true)
            .expect("raft-engine append");
    }
}

struct Figures {
    p50: Duration,
    p99: Duration,
    entries_per_s: f64,
    cpu_per_append: Duration,
}

fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF covers all threads.
    let usage = unsafe {
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()), 0);
        usage.assume_init()
    };
    let of = |time: libc::timeval| {
        Duration::from_secs(time.tv_sec as u64) + Duration::from_micros(time.tv_usec as u64)
    };
    of(usage.ru_utime) + of(usage.ru_stime)
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count)
}

/// `count` entries from index `first`, each with its own random data: nothing a compressor
/// (raft-engine compresses batches over 8 KiB with LZ4) could shrink, as real commands would
/// partly be (the data is xorshift output).
fn entries(first: u64, count: usize, seed: &mut u64) -> Vec<Entry> {
    (0..count)
        .map(|offset| {
            let data: Vec<u8> = (0..ENTRY_BYTES / 8)
                .flat_map(|_| {
                    *seed ^= *seed << 13;
                    *seed ^= *seed >> 7;
                    *seed ^= *seed << 17;
                    seed.to_le_bytes()
                })
                .collect();
            Entry {
                index: first + offset as u64,
                term: 1,
                data: data.into(),
                ..Default::default()
            }
        })
        .collect()
}

/// `appends` appends of `per_append` entries each, from index `first`. The entries are made
/// before the clock and the CPU count start.
fn run(log: &mut dyn Log, first: u64, appends: usize, per_append: usize) -> Figures {
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64 ^ first;
    let batches: Vec<Vec<Entry>> = (0..appends)
        .map(|number| entries(first + (number * per_append) as u64, per_append, &mut seed))
        .collect();
    let mut latencies = Vec::with_capacity(appends);
    let cpu_before = cpu_time();
    let started = Instant::now();
    for batch in &batches {
        let hard_state = HardState {
            term: 1,
            commit: batch.last().map_or(0, |entry| entry.index),
            ..Default::default()
        };
        let begun = Instant::now();
        log.append_durably(batch, &hard_state);
        latencies.push(begun.elapsed());
    }
    let elapsed = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_before);
    latencies.sort();
    let at = |share: f64| latencies[((latencies.len() as f64 * share) as usize).min(appends - 1)];
    Figures {
        p50: at(0.5),
        p99: at(0.99),
        entries_per_s: (appends * per_append) as f64 / elapsed.as_secs_f64(),
        cpu_per_append: cpu / appends as u32,
    }
}

/// Which engine this process measures, when it is one of the runs (see `main`).
const ENGINE_VARIABLE: &str = "REWIND_BENCH_RAFT_LOG_ENGINE";

fn main() {
    let appends: usize = match std::env::var("REWIND_BENCH_APPENDS") {
        Err(_) => 5_000,
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            panic!("REWIND_BENCH_APPENDS={text:?} is not a count (a whole number)")
        }),
    };
    if let Ok(engine) = std::env::var(ENGINE_VARIABLE) {
        measure_one(&engine, appends);
        return;
    }
    println!(
        "{appends} appends per run, {ENTRY_BYTES}-byte entries, each append durable before the next"
    );
    println!(
        "| engine | entries per append | p50 | p99 | entries/s | CPU per append | threads |\n| --- | --- | --- | --- | --- | --- | --- |"
    );
    // Each engine in a process of its own (sled keeps its IO threads for the process's life),
    // each first once so neither always has the warmer disk: sled, raft-engine, raft-engine, sled.
    let this = std::env::current_exe().expect("this benchmark's path");
    for engine in ["sled", "raft-engine", "raft-engine", "sled"] {
        let status = std::process::Command::new(&this)
            .env(ENGINE_VARIABLE, engine)
            .status()
            .expect("run one engine's pass");
        assert!(status.success(), "the {engine} pass failed");
    }
}

/// One engine's rows, in a fresh directory.
fn measure_one(engine: &str, appends: usize) {
    // Under target/, not /tmp: a tmpfs would make every sync free.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a temp dir");
    let threads_before = threads();
    let mut log: Box<dyn Log> = match engine {
        "sled" => Box::new(Sled::open(dir.path())),
        "raft-engine" => Box::new(RaftEngine(
            RaftStore::open(dir.path()).expect("open the Raft store"),
        )),
        other => panic!("{ENGINE_VARIABLE}={other:?}: sled or raft-engine"),
    };
    let mut first = 1;
    for per_append in [1, 64] {
        let figures = run(log.as_mut(), first, appends, per_append);
        first += (appends * per_append) as u64;
        println!(
            "| {engine} | {per_append} | {:.3} ms | {:.3} ms | {:.0} | {:.3} ms | {} |",
            figures.p50.as_secs_f64() * 1000.0,
            figures.p99.as_secs_f64() * 1000.0,
            figures.entries_per_s,
            figures.cpu_per_append.as_secs_f64() * 1000.0,
            threads() - threads_before,
        );
    }
}
