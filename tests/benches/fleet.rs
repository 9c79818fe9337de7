//! Fleet-scale figures with simulated agents (real gRPC sessions over real mutual TLS against a
//! release `rewind-coordinator`; the agents answer every step at once and report healthy probes,
//! at their interval and whenever a verify asks):
//!
//! 1. Plan and execute the rollback of one change on `REWIND_BENCH_HOSTS` hosts (default 1,000)
//!    over four regions, `max_parallel` 100, each host going through drain, restore, restart,
//!    verify and undrain, with a 1 s health gate per wave: how long rewind itself takes.
//! 2. Kill-switch propagation: `REWIND_BENCH_AGENTS` connected agents (default 2,000); the time
//!    from the `flag kill` call until each agent has the update, over five kills.
//!
//! Run: `cargo bench -p rewind-tests --bench fleet`

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rewind_proto::v1 as pb;
use rewind_proto::v1::control_service_client::ControlServiceClient;
use rewind_tests::sim::{FlagLog, SimAgent};
use rewind_tests::{Coordinator, must_wait_async};
use tokio::task::JoinSet;
use tonic::transport::Channel;

const REGIONS: [&str; 4] = ["eu-west", "eu-central", "us-east", "ap-south"];
const SETTLE_S: u32 = 1;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// Connects agents `from..to`, 32 handshakes at a time.
async fn connect(
    coordinator: &Coordinator,
    range: std::ops::Range<usize>,
    report_every: Duration,
    flags: &FlagLog,
) -> Vec<SimAgent> {
    let ca = Arc::new(coordinator.ca());
    let tls_dir = coordinator.tls_dir();
    let mut agents = Vec::with_capacity(range.len());
    let mut pending = JoinSet::new();
    for number in range {
        if pending.len() >= 32 {
            agents.push(pending.join_next().await.unwrap().unwrap());
        }
        let (ca, tls_dir, address, flags) = (
            Arc::clone(&ca),
            tls_dir.clone(),
            coordinator.address.clone(),
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
                report_every,
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

async fn rollback_of_a_fleet(
    client: &mut ControlServiceClient<Channel>,
    hosts: usize,
    parallel: u32,
) {
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
            host_ids: vec![],
            reason: "bench".into(),
            flags_on: vec![],
            migrations: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .change
        .unwrap();
    let change = rewind_tests::must_change_where(
        client,
        &change.change_id,
        "the change to deploy",
        |change| change.state == pb::ChangeState::Deployed as i32,
    )
    .await;
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

    let begun = Instant::now();
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
    // What a person watching pays: the bytes of a watch asking for changes only, beside those
    // the same updates would have cost as whole rollbacks (the watch before changes_only),
    // counted on the merged rollback rather than asked of the coordinator, whose encoding of
    // 1.5 GB would slow the rollback being measured.
    let watcher = {
        let mut client = client.clone();
        let rollback_id = rollback.rollback_id.clone();
        tokio::spawn(async move {
            let mut stream = client
                .watch_rollback(pb::GetRollbackRequest {
                    rollback_id,
                    changes_only: true,
                })
                .await
                .unwrap()
                .into_inner();
            let (mut updates, mut bytes, mut whole_bytes) = (0usize, 0usize, 0usize);
            let mut merged = pb::Rollback::default();
            while let Some(Ok(update)) = tokio_stream::StreamExt::next(&mut stream).await {
                updates += 1;
                bytes += prost::Message::encoded_len(&update);
                let changes = update.rollback.unwrap_or_default();
                if !update.changes_only {
                    merged = changes;
                } else {
                    for step in &changes.steps {
                        match merged.steps.iter_mut().find(|s| s.step_id == step.step_id) {
                            Some(known) => *known = step.clone(),
                            None => merged.steps.push(step.clone()),
                        }
                    }
                    let (steps, waves) = (std::mem::take(&mut merged.steps), merged.waves.clone());
                    merged = pb::Rollback {
                        steps,
                        waves: if changes.waves.is_empty() {
                            waves
                        } else {
                            changes.waves.clone()
                        },
                        ..changes
                    };
                }
                whole_bytes += prost::Message::encoded_len(&pb::GetRollbackResponse {
                    rollback: Some(merged.clone()),
                    changes_only: false,
                });
            }
            (updates, bytes, whole_bytes)
        })
    };
    let done = must_wait_async(Duration::from_secs(1800), "the rollback to end", || {
        let mut client = client.clone();
        let rollback_id = rollback.rollback_id.clone();
        async move {
            let rollback = client
                .get_rollback(pb::GetRollbackRequest {
                    rollback_id,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner()
                .rollback?;
            (rollback.finished_at_ms != 0).then_some(rollback)
        }
    })
    .await;
    let total = begun.elapsed();
    assert_eq!(
        done.state,
        pb::RollbackState::Succeeded as i32,
        "{}",
        done.outcome_detail
    );
    let gates = Duration::from_secs(u64::from(SETTLE_S) * plan.waves.len() as u64);
    let steps = done.steps.len();
    let (updates, bytes, whole_bytes) = watcher.await.unwrap();
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
    let hosts = env_number("REWIND_BENCH_HOSTS", 1000);
    let agents = env_number("REWIND_BENCH_AGENTS", 2000).max(hosts);
    let parallel = env_number("REWIND_BENCH_PARALLEL", 100) as u32;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start_with(
        &dir.path().join("coordinator"),
        "[engine]\ntick-ms = 50\nstep-timeout-s = 120\nverify-timeout-s = 120\n[health]\nreport-interval-ms = 500\n",
    );
    runtime.block_on(async {
        let flags: FlagLog = Arc::new(Mutex::new(Vec::new()));
        let mut client = coordinator.must_client().await;
        let begun = Instant::now();
        let mut fleet = connect(&coordinator, 0..hosts, Duration::from_millis(500), &flags).await;
        must_connected(&client, hosts).await;
        println!(
            "{hosts} agents connected and registered in {:.1} s",
            begun.elapsed().as_secs_f64()
        );
        rollback_of_a_fleet(&mut client, hosts, parallel).await;
        // The rest only listen for flags; they report rarely, like idle hosts.
        fleet.extend(connect(&coordinator, hosts..agents, Duration::from_secs(10), &flags).await);
        must_connected(&client, agents).await;
        kill_switch(&mut client, agents, &flags).await;
        drop(fleet);
    });
}
