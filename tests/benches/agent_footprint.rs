//! The agent's footprint, measured from `/proc` on a real release `rewind-agent` connected to a
//! real dev coordinator over mutual TLS, reporting every 5 s (probing one service and reading
//! host metrics each time):
//!
//! The agent is the one shipped: built with the workspace's `agent` profile (opt-level "s",
//! fat LTO, one codegen unit, symbols stripped), as the .deb is.
//!
//! 1. Idle: resident memory (VmRSS, sampled every second) and CPU time (utime + stime) over
//!    `REWIND_BENCH_IDLE_S` seconds (default 60) after a 30 s warm-up, that is after the agent's
//!    first release of the code pages it no longer runs (see `agent/src/resident.rs`); the
//!    resident memory before that release is shown too.
//! 2. During a change: peak resident memory while the agent captures a snapshot and activates
//!    a release, and the CPU it spent on that.
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
    let rss_kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
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
        "[health]\nreport-interval-ms = 5000\n",
    );
    let mut host = TestHost::must_prepare(dir.path(), "web-1", &coordinator);
    let agent = shipped_agent();
    let spawned = Instant::now();
    host.must_start_agent_from(&agent);
    let pid = host.agent.as_ref().expect("started").child.id();
    let mut client = coordinator.must_client().await;
    must_agents_connected(&client, 1).await;
    must_register_web(&mut client, &host, false).await;

    // The agent hands back the code pages it no longer runs 20 s after it starts, then every
    // 5 min (`code-release-interval-s`, resident.rs): sample before and measure after.
    tokio::time::sleep_until((spawned + Duration::from_secs(15)).into()).await;
    let before_release = sample(pid).0;
    let sampled_in_time = spawned.elapsed() < rewind_agent::resident::FIRST_RELEASE_AFTER;
    tokio::time::sleep_until((spawned + Duration::from_secs(30)).into()).await;
    let (_, cpu_before) = sample(pid);
    let started = Instant::now();
    let mut rss = Vec::new();
    while started.elapsed() < Duration::from_secs(idle_s) {
        rss.push(sample(pid).0);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (_, cpu_after) = sample(pid);
    let cpu_percent =
        (cpu_after - cpu_before) as f64 / ticks / started.elapsed().as_secs_f64() * 100.0;
    rss.sort_unstable();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map_or(String::from("?"), |value| value.trim().to_string())
    };
    if sampled_in_time {
        println!(
            "Agent footprint, 15 s after it started, before its first code release: {:.1} MiB",
            mib(before_release)
        );
    } else {
        println!("(registering took too long: no figure from before the first code release)");
    }
    println!("Agent footprint, idle, 5 s reports, over {idle_s} s after the first release:");
    println!(
        "  now: heap and other anonymous memory {}, mapped files (the binary's pages) {}, {} threads",
        field("RssAnon:"),
        field("RssFile:"),
        field("Threads:")
    );
    println!(
        "  resident memory: median {:.1} MiB, max {:.1} MiB",
        mib(rss[rss.len() / 2]),
        mib(*rss.last().unwrap())
    );
    println!("  CPU: {cpu_percent:.3} % of one core");

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
        "  resident memory peak: {:.1} MiB; CPU spent: {:.0} ms",
        mib(peak.load(Ordering::Relaxed)),
        (cpu_after - cpu_before) as f64 / ticks * 1000.0
    );
}
