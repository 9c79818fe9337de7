//! Fleet-scale figures with simulated agents (real gRPC sessions over real mutual TLS against a
//! cluster of release `rewind-coordinator` processes, three members by default; the agents
//! answer every step at once, report healthy probes every 5 s, and at once when a verify asks):
//!
//! 1. Connect and register `REWIND_BENCH_AGENTS` agents (default 2,000) to the leader.
//! 2. Steady state: the leader's CPU (over 20 s) and resident memory with every agent
//!    connected and reporting, beside the same before any connected, per 1,000 agents.
//! 3. Deploy a change to, then roll back, `REWIND_BENCH_HOSTS` of them (default 1,000) over four
//!    regions, `max_parallel` `REWIND_BENCH_PARALLEL` (default 100), each host going through
//!    drain, restore, restart, verify and undrain, with a 1 s health gate per wave: how long
//!    rewind itself takes, and whether any step had to be sent twice (its result lost).
//! 4. Kill-switch propagation to every agent: the time from the `flag kill` call until each
//!    agent has the update, over five kills.
//! 5. The leader's newest state snapshot: its size with this many hosts and this history.
//!
//! Run: `cargo bench -p rewind-tests --bench fleet` (`REWIND_BENCH_MEMBERS=1` for one member).

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rewind_proto::v1 as pb;
use rewind_proto::v1::control_service_client::ControlServiceClient;
use rewind_shared::dev_ca::DevCa;
use rewind_tests::sim::{FlagLog, STEPS_RECEIVED, STEPS_RECEIVED_AGAIN, SimAgent};
use rewind_tests::{ClusterHarness, ClusterOptions, must_wait_async};
use tokio::task::JoinSet;
use tonic::transport::Channel;

const REGIONS: [&str; 4] = ["eu-west", "eu-central", "us-east", "ap-south"];
const SETTLE_S: u32 = 1;
/// How often every simulated agent reports, as the coordinator's default asks.
const REPORT_EVERY: Duration = Duration::from_secs(5);
/// How long the steady state is watched.
const STEADY_FOR: Duration = Duration::from_secs(20);

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// A process's CPU time so far and its resident memory, from /proc.
fn process_figures(pid: u32) -> (Duration, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the leader's stat");
    // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    // SAFETY: sysconf only reads a constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let cpu_ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the leader's status");
    let rss_kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    (Duration::from_millis(cpu_ticks * 1000 / ticks), rss_kib)
}

/// The leader's share of one core and its resident memory (MiB) over `STEADY_FOR`.
async fn steady_state(pid: u32) -> (f64, f64) {
    let (cpu_before, _) = process_figures(pid);
    let begun = Instant::now();
    tokio::time::sleep(STEADY_FOR).await;
    let (cpu_after, rss_kib) = process_figures(pid);
    (
        (cpu_after - cpu_before).as_secs_f64() / begun.elapsed().as_secs_f64() * 100.0,
        rss_kib as f64 / 1024.0,
    )
}

/// Connects agents `from..to` to `address`, 32 handshakes at a time.
async fn connect(
    ca: &Arc<DevCa>,
    tls_dir: &std::path::Path,
    address: &str,
    range: std::ops::Range<usize>,
    flags: &FlagLog,
) -> Vec<SimAgent> {
    let mut agents = Vec::with_capacity(range.len());
    let mut pending = JoinSet::new();
    for number in range {
        if pending.len() >= 32 {
            agents.push(pending.join_next().await.unwrap().unwrap());
        }
        let (ca, tls_dir, address, flags) = (
            Arc::clone(ca),
            tls_dir.to_path_buf(),
            address.to_string(),
            Arc::clone(flags),
        );
        pending.spawn(async move {
            let host_id = format!("sim-{number:05}");
            // 127.1.0.1, 127.1.0.2, ...: every simulated host from an address of its own, all
            // inside 127.0.0.0/8 (Linux answers on all of it) for up to 16 million hosts.
            let from = std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x7F01_0001 + number as u32));
            let region = REGIONS[number % REGIONS.len()];
            SimAgent::connect(
                &ca,
                &tls_dir,
                &address,
                &host_id,
                from,
                "web",
                region,
                REPORT_EVERY,
                flags,
            )
            .await
            .unwrap_or_else(|error| panic!("{error}"))
        });
    }
    while let Some(agent) = pending.join_next().await {
        agents.push(agent.unwrap());
    }
    agents
}

async fn must_connected(client: &ControlServiceClient<Channel>, count: usize) {
    must_wait_async(Duration::from_secs(300), "the agents to register", || {
        let mut client = client.clone();
        async move {
            // Hosts come a page at a time (at most 1,000).
            let (mut connected, mut page_token) = (0, String::new());
            loop {
                let page = client
                    .list_hosts(pb::ListHostsRequest {
                        page_token,
                        page_size: 1000,
                    })
                    .await
                    .ok()?
                    .into_inner();
                connected += page.hosts.iter().filter(|host| host.connected).count();
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            (connected >= count).then_some(())
        }
    })
    .await;
}

/// Waits for the change to deploy, saying what it waits on: a failing read once (a 10,000-host
/// change is a large message), and the steps done every 30 s.
async fn must_deploy(client: &ControlServiceClient<Channel>, change_id: &str) -> pb::Change {
    let begun = Instant::now();
    let mut said_error = false;
    let mut said_at = Instant::now();
    loop {
        assert!(
            begun.elapsed() < Duration::from_secs(1800),
            "the change did not deploy in 30 minutes"
        );
        let read = client
            .clone()
            .get_change(pb::GetChangeRequest {
                change_id: change_id.to_string(),
            })
            .await;
        match read.map(|response| response.into_inner().change) {
            Ok(Some(change)) if change.state == pb::ChangeState::Deployed as i32 => return change,
            Ok(Some(change)) if said_at.elapsed() > Duration::from_secs(30) => {
                said_at = Instant::now();
                let succeeded = pb::StepState::Succeeded as i32;
                let count = |state: fn(&pb::ChangeHost) -> i32| {
                    change
                        .hosts
                        .iter()
                        .filter(|host| state(host) == succeeded)
                        .count()
                };
                println!(
                    "  deploying: of {} hosts, {} captured, {} activated",
                    change.hosts.len(),
                    count(|host| host.capture),
                    count(|host| host.activate)
                );
            }
            // The agents are connected to this member only: the run cannot go on.
            Err(status) if status.message().contains("not the leader") => {
                panic!("the leader lost its leadership during the deploy: {status}")
            }
            Err(status) if !said_error => {
                said_error = true;
                println!("  reading the change failed (retrying): {status}");
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Deploys a change to the first `hosts` agents and rolls it back; prints what it took.
async fn rollback_of_a_fleet(
    client: &mut ControlServiceClient<Channel>,
    hosts: usize,
    agents: usize,
    parallel: u32,
) {
    // All of them, or the first `hosts` by name.
    let host_ids = if hosts >= agents {
        vec![]
    } else {
        (0..hosts)
            .map(|number| format!("sim-{number:05}"))
            .collect()
    };
    client
        .put_service(pb::PutServiceRequest {
            request_id: "svc".into(),
            service: Some(pb::Service {
                rto_s: 0,
                freeze_windows: vec![],
                drift_policy: String::new(),
                isolate_after_failures: 0,
                name: "web".into(),
                depends_on: vec![],
                policy: Some(pb::HealthPolicy {
                    max_probe_failure_ratio: 0.5,
                    for_s: 10,
                    watch_s: 600,
                    auto_rollback: false,
                    ..Default::default()
                }),
                synthetics: vec![],
                rollback_steps: Vec::new(),
            }),
        })
        .await
        .unwrap();
    for (version, digit) in [("v1", '1'), ("v2", '2')] {
        client
            .register_release(pb::RegisterReleaseRequest {
                request_id: format!("rel-{version}"),
                release: Some(pb::Release {
                    service: "web".into(),
                    version: version.into(),
                    artifact_digest: format!("sha256:{}", digit.to_string().repeat(64)),
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }
    let started = Instant::now();
    let change = client
        .start_change(pb::StartChangeRequest {
            break_glass: false,
            request_id: "change".into(),
            service: "web".into(),
            version: "v2".into(),
            host_ids,
            reason: "bench".into(),
            flags_on: vec![],
            migrations: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .change
        .unwrap();
    let change = must_deploy(client, &change.change_id).await;
    let deploy = started.elapsed();

    let selection = pb::RollbackSelection {
        change_ids: vec![change.change_id.clone()],
        services: vec![],
    };
    let options = pb::PlanOptions {
        max_parallel: parallel,
        max_unavailable: parallel,
        gate: Some(pb::GateOptions {
            settle_s: SETTLE_S,
            timeout_s: 60,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut plan_times = Vec::new();
    let mut plan = None;
    for _ in 0..20 {
        let begun = Instant::now();
        plan = Some(
            client
                .plan_rollback(pb::PlanRollbackRequest {
                    selection: Some(selection.clone()),
                    options: Some(options.clone()),
                })
                .await
                .unwrap()
                .into_inner()
                .plan
                .unwrap(),
        );
        plan_times.push(begun.elapsed());
    }
    plan_times.sort();
    let plan = plan.unwrap();
    // For comparison: the cheapest read that also passes the ReadIndex barrier.
    let mut read_times = Vec::new();
    for _ in 0..20 {
        let begun = Instant::now();
        client
            .list_services(pb::ListServicesRequest {})
            .await
            .unwrap();
        read_times.push(begun.elapsed());
    }
    read_times.sort();

    let begun_ms = rewind_shared::time::now_ms();
    let rollback = client
        .start_rollback(pb::StartRollbackRequest {
            request_id: "rollback".into(),
            reason: "bench".into(),
            selection: Some(selection),
            options: Some(options),
            plan_hash: plan.plan_hash.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rollback
        .unwrap();
    // Followed as a person would, with `rollback watch`: the watch ends with the rollback.
    // What it pays is counted: the bytes asking for changes only, beside those the same
    // updates would have cost as whole rollbacks (counted on the merged rollback rather than
    // asked of the coordinator, whose encoding of them would slow the rollback measured).
    let mut stream = client
        .watch_rollback(pb::GetRollbackRequest {
            rollback_id: rollback.rollback_id.clone(),
            changes_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (mut updates, mut bytes, mut whole_bytes) = (0usize, 0usize, 0usize);
    let mut done = pb::Rollback::default();
    let mut position: HashMap<String, usize> = HashMap::new();
    let watched = tokio::time::timeout(Duration::from_secs(1800), async {
        while let Some(update) = tokio_stream::StreamExt::next(&mut stream).await {
            let update = update.expect("the watch of the rollback");
            updates += usize::from(!update.more_follows);
            bytes += prost::Message::encoded_len(&update);
            let mut changes = update.rollback.unwrap_or_default();
            for step in std::mem::take(&mut changes.steps) {
                match position.get(&step.step_id) {
                    Some(&index) => done.steps[index] = step,
                    None => {
                        position.insert(step.step_id.clone(), done.steps.len());
                        done.steps.push(step);
                    }
                }
            }
            if update.more_follows {
                // Steps alone: the update's last message holds the rest of the rollback.
                continue;
            }
            if changes.waves.is_empty() {
                changes.waves = std::mem::take(&mut done.waves);
            }
            changes.steps = std::mem::take(&mut done.steps);
            done = changes;
            // The whole rollback in a response: its length with the field's tag and prefix.
            let length = prost::Message::encoded_len(&done);
            whole_bytes += 1 + prost::encoding::encoded_len_varint(length as u64) + length;
        }
    })
    .await;
    assert!(watched.is_ok(), "the rollback did not end in 30 minutes");
    // By the coordinator's clock, which stamps the rollback's end (one machine: one clock).
    let total = Duration::from_millis(done.finished_at_ms.saturating_sub(begun_ms));
    assert_eq!(
        done.state,
        pb::RollbackState::Succeeded as i32,
        "{}",
        done.outcome_detail
    );
    assert_eq!(done.steps.len(), done.steps_total as usize);
    let gates = Duration::from_secs(u64::from(SETTLE_S) * plan.waves.len() as u64);
    let steps = done.steps.len();
    println!(
        "fleet rollback: {hosts} hosts in {} waves, max_parallel {parallel}",
        plan.waves.len()
    );
    println!(
        "  deploy (capture + activate on every host): {:.1} s",
        deploy.as_secs_f64()
    );
    println!(
        "  plan: p50 {:.1} ms, max {:.1} ms (a one-service ListServices read: p50 {:.1} ms)",
        plan_times[plan_times.len() / 2].as_secs_f64() * 1e3,
        plan_times[plan_times.len() - 1].as_secs_f64() * 1e3,
        read_times[read_times.len() / 2].as_secs_f64() * 1e3
    );
    println!(
        "  rollback: {:.1} s for {steps} steps ({:.0} steps/s); of which health gates {:.0} s",
        total.as_secs_f64(),
        steps as f64 / total.as_secs_f64(),
        gates.as_secs_f64()
    );
    println!(
        "  rollback watch: {updates} updates, {:.2} MB with changes_only, {:.1} MB as whole \
         rollbacks",
        bytes as f64 / 1e6,
        whole_bytes as f64 / 1e6
    );
    println!(
        "  rewind itself (total minus the gates' settle time): {:.1} s",
        total.saturating_sub(gates).as_secs_f64()
    );
}

async fn kill_switch(client: &mut ControlServiceClient<Channel>, agents: usize, flags: &FlagLog) {
    let mut per_kill = Vec::new();
    let mut all = Vec::new();
    for round in 0..5 {
        for (enabled, kill) in [(true, false), (false, true)] {
            flags.lock().unwrap().clear();
            let begun = Instant::now();
            client
                .set_flag(pb::SetFlagRequest {
                    request_id: format!("flag-{round}-{enabled}"),
                    environment: "bench".into(),
                    service: "web".into(),
                    name: "checkout".into(),
                    enabled,
                    kill,
                    reason: "bench".into(),
                })
                .await
                .unwrap();
            let arrivals = must_wait_async(
                Duration::from_secs(120),
                "every agent to get the flag",
                || {
                    let flags = Arc::clone(flags);
                    async move {
                        let log = flags.lock().unwrap();
                        let arrived: Vec<Duration> = log
                            .iter()
                            .filter(|(_, flag, on, _)| flag == "checkout" && *on == enabled)
                            .map(|(_, _, _, at)| at.duration_since(begun))
                            .collect();
                        (arrived.len() >= agents).then_some(arrived)
                    }
                },
            )
            .await;
            if kill {
                per_kill.push(*arrivals.iter().max().unwrap());
                all.extend(arrivals);
            }
        }
    }
    all.sort();
    per_kill.sort();
    let ms = |duration: Duration| duration.as_secs_f64() * 1e3;
    println!("kill switch to {agents} connected agents (5 kills):");
    println!(
        "  per agent: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(all[all.len() / 2]),
        ms(all[all.len() * 99 / 100]),
        ms(all[all.len() - 1])
    );
    println!(
        "  until the last agent has it: best {:.1} ms, median {:.1} ms, worst {:.1} ms",
        ms(per_kill[0]),
        ms(per_kill[per_kill.len() / 2]),
        ms(per_kill[per_kill.len() - 1])
    );
}

fn main() {
    let members = env_number("REWIND_BENCH_MEMBERS", 3) as u64;
    let hosts = env_number("REWIND_BENCH_HOSTS", 1000);
    let agents = env_number("REWIND_BENCH_AGENTS", 2000).max(hosts);
    let parallel = env_number("REWIND_BENCH_PARALLEL", 100) as u32;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let options = ClusterOptions {
        snapshot_every: 10_000,
        engine_and_health: "[engine]\ntick-ms = 50\nstep-timeout-s = 120\nverify-timeout-s = 120\n\
                            [health]\nreport-interval-ms = 5000\nwindow-s = 30"
            .into(),
        // The default Raft tick, so elections time out as in production (1-2 s), not as in
        // the tests (0.5-1 s).
        cluster_tick_ms: 100,
        ..ClusterOptions::default()
    };
    let cluster = ClusterHarness::must_start_with_options(dir.path(), members, options);
    runtime.block_on(async {
        let flags: FlagLog = Arc::new(Mutex::new(Vec::new()));
        let (leader, mut client) = cluster.must_leader().await;
        let pid = cluster.pid(leader).unwrap();
        let address = cluster.addresses[leader as usize - 1].clone();
        let ca = Arc::new(DevCa::load(&cluster.tls_dir).expect("the cluster's CA"));
        println!("{members}-member cluster, member {leader} leads");
        let (idle_cpu, idle_rss) = steady_state(pid).await;

        let begun = Instant::now();
        let fleet = connect(&ca, &cluster.tls_dir, &address, 0..agents, &flags).await;
        must_connected(&client, agents).await;
        println!(
            "{agents} agents connected and registered in {:.1} s",
            begun.elapsed().as_secs_f64()
        );
        let (cpu, rss) = steady_state(pid).await;
        let per_thousand = 1000.0 / agents as f64;
        println!(
            "steady state, reports every {} s: the leader at {cpu:.1} % of a core and {rss:.0} MiB \
             resident (before any agent: {idle_cpu:.1} %, {idle_rss:.0} MiB); per 1,000 agents \
             {:.1} % of a core and {:.1} MiB",
            REPORT_EVERY.as_secs(),
            (cpu - idle_cpu) * per_thousand,
            (rss - idle_rss) * per_thousand
        );
        rollback_of_a_fleet(&mut client, hosts, agents, parallel).await;
        println!(
            "  steps received by agents: {}, of them a second time: {}",
            STEPS_RECEIVED.load(Relaxed),
            STEPS_RECEIVED_AGAIN.load(Relaxed)
        );
        kill_switch(&mut client, agents, &flags).await;
        let (_, rss_after) = process_figures(pid);
        println!(
            "the leader after the rollback: {:.0} MiB resident",
            rss_after as f64 / 1024.0
        );
        if let Some((index, bytes)) = cluster.latest_snapshot(leader) {
            println!(
                "the leader's newest snapshot: {:.0} KB at index {index}",
                bytes as f64 / 1e3
            );
        }
        drop(fleet);
    });
}
