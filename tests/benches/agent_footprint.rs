//! The agent's footprint, measured from `/proc` on a real release `rewind-agent` connected to a
//! real dev coordinator over mutual TLS, reporting every 5 s (probing one service and reading
//! host metrics each time):
//!
//! The agent is the one shipped: built with the workspace's `agent` profile (opt-level "s",
//! fat LTO, one codegen unit, symbols stripped), as the .deb is.
//!
//! 1. Idle, over `REWIND_BENCH_IDLE_S` seconds (default 60) after a 30 s warm-up: what it holds
//!    of the host's memory (`/proc/PID/smaps_rollup`: private dirty memory, the pages only it
//!    has and has written; PSS, its share of every page it maps; RSS), its threads, and the
//!    CPU time (utime + stime) per report and per second.
//! 2. During a change: peak RSS while the agent captures a snapshot and activates a release,
//!    and the CPU it spent on that; then, 20 s later, its memory and threads by name.
//!
//! Run: `cargo bench -p rewind-tests --bench agent_footprint`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rewind_proto::v1 as pb;
use rewind_tests::*;

/// (resident KiB, CPU ticks so far) of a process.
fn sample(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the agent runs");
    let rss_kib = kib_field(&status, "VmRSS:");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the agent runs");
    // Fields after the command name (which may hold spaces) start at field 3; utime and stime
    // are fields 14 and 15.
    let after_name = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<u64> = after_name
        .split_whitespace()
        .map(|field| field.parse().unwrap_or(0))
        .collect();
    (rss_kib, fields[11] + fields[12])
}

/// A `Name:   123 kB` line's number.
fn kib_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} in {text}"))
}

/// What the process holds of the host's memory, from `smaps_rollup`.
struct Memory {
    rss: u64,
    pss: u64,
    /// Pages only it has and has written (`Private_Dirty`: heap, stacks, relocated data): what
    /// the kernel cannot take back without swap.
    private: u64,
    /// Its share of the binary's and libraries' pages: page cache, reclaimable.
    file: u64,
}

fn memory(pid: u32) -> Memory {
    let rollup =
        std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).expect("the agent runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the agent runs");
    Memory {
        rss: kib_field(&rollup, "Rss:"),
        pss: kib_field(&rollup, "Pss:"),
        private: kib_field(&rollup, "Private_Dirty:"),
        file: kib_field(&status, "RssFile:"),
    }
}

fn print_memory(memory: &Memory) {
    println!(
        "  private (dirty) {:.1} MiB, PSS {:.1} MiB, RSS {:.1} MiB (of which {:.1} MiB the binary's \
         and libraries' pages)",
        mib(memory.private),
        mib(memory.pss),
        mib(memory.rss),
        mib(memory.file)
    );
}

/// Its threads by name, counted: "tokio-runtime-w x2, sled-io-0 x1".
fn threads(pid: u32) -> String {
    let mut names = std::collections::BTreeMap::<String, u32>::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("the agent runs") {
        let comm = std::fs::read_to_string(task.unwrap().path().join("comm")).unwrap_or_default();
        // sled numbers its IO threads: count them as one kind.
        let name = comm.trim().trim_end_matches(|c: char| c.is_ascii_digit());
        *names.entry(name.to_string()).or_default() += 1;
    }
    let total: u32 = names.values().sum();
    let each: Vec<String> = names
        .iter()
        .map(|(name, count)| format!("{name} x{count}"))
        .collect();
    format!("{total} ({})", each.join(", "))
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The agent as shipped: built with the `agent` profile (size-optimised, LTO), which the .deb
/// uses too.
fn shipped_agent() -> std::path::PathBuf {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = std::process::Command::new(env!("CARGO"))
        .current_dir(&workspace)
        .args([
            "build",
            "--quiet",
            "--profile",
            "agent",
            "-p",
            "rewind-agent",
            "--bin",
            "rewind-agent",
        ])
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build --profile agent failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    target.join("agent").join("rewind-agent")
}

/// The report interval the coordinator asks of the agent.
const REPORT_EVERY_S: u64 = 5;

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[tokio::main]
async fn main() {
    let idle_s: u64 = std::env::var("REWIND_BENCH_IDLE_S")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(60);
    let ticks = clock_ticks_per_second();
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start_with(
        &dir.path().join("coordinator"),
        &format!("[health]\nreport-interval-ms = {}\n", REPORT_EVERY_S * 1000),
    );
    let mut host = TestHost::must_prepare(dir.path(), "web-1", &coordinator);
    let agent = shipped_agent();
    let spawned = Instant::now();
    host.must_start_agent_from(&agent);
    let pid = host.agent.as_ref().expect("started").child.id();
    let mut client = coordinator.must_client().await;
    must_agents_connected(&client, 1).await;
    must_register_web(&mut client, &host, false).await;

    tokio::time::sleep_until((spawned + Duration::from_secs(30)).into()).await;
    let (_, cpu_before) = sample(pid);
    let started = Instant::now();
    let mut rss = Vec::new();
    while started.elapsed() < Duration::from_secs(idle_s) {
        rss.push(sample(pid).0);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (_, cpu_after) = sample(pid);
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_s = (cpu_after - cpu_before) as f64 / ticks;
    rss.sort_unstable();
    let binary = std::fs::metadata(&agent).unwrap().len();
    println!(
        "Agent footprint, idle, {REPORT_EVERY_S} s reports, over {idle_s} s after a 30 s warm-up (binary {:.1} MiB):",
        binary as f64 / 1024.0 / 1024.0
    );
    print_memory(&memory(pid));
    println!(
        "  RSS over the window: median {:.1} MiB, max {:.1} MiB; threads {}",
        mib(rss[rss.len() / 2]),
        mib(*rss.last().unwrap()),
        threads(pid)
    );
    println!(
        "  CPU: {:.3} % of one core, {:.1} ms per report",
        cpu_s / elapsed * 100.0,
        cpu_s * 1000.0 / (elapsed / REPORT_EVERY_S as f64)
    );

    // A change: capture then activate, resident memory watched every 20 ms.
    let (_, cpu_before) = sample(pid);
    let peak = Arc::new(AtomicU64::new(0));
    let watched = Arc::clone(&peak);
    let watch = tokio::spawn(async move {
        loop {
            watched.fetch_max(sample(pid).0, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let started = Instant::now();
    let change = must_change(&mut client, "v1").await;
    must_change_where(&client, &change, "the change to deploy", |change| {
        change.state == pb::ChangeState::Deployed as i32
    })
    .await;
    let took = started.elapsed();
    watch.abort();
    let (_, cpu_after) = sample(pid);
    println!("During a change (capture + activate, {took:.1?} end to end):");
    println!(
        "  RSS peak: {:.1} MiB; CPU spent: {:.0} ms",
        mib(peak.load(Ordering::Relaxed)),
        (cpu_after - cpu_before) as f64 / ticks * 1000.0
    );
    tokio::time::sleep(Duration::from_secs(20)).await;
    println!("20 s after the change:");
    print_memory(&memory(pid));
    println!("  threads {}", threads(pid));
}
