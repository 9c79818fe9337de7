//! The standard gRPC services, through clients that are not rewind's: grpcio's own health
//! checking and reflection packages (Python), and the repository's client examples in Python
//! and Go (`docs/clients/`) with stubs generated from `proto/`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_tests::clients::{
    must_build_go_client, must_generate_python_stubs, must_python, run_python, workspace,
};
use rewind_tests::*;
use serde_json::Value;

const PROBE: &str = "tests/python/standard_grpc.py";
const CONTROL: &str = "rewind.v1.ControlService";

/// The one JSON line `standard_grpc.py` prints for a call.
fn probe(python: &std::path::Path, stubs: &std::path::Path, args: &[&str]) -> Value {
    let output = run_python(python, stubs, PROBE, args);
    assert!(
        output.status.success(),
        "{PROBE} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    serde_json::from_str(stdout.trim()).unwrap_or_else(|error| panic!("{stdout:?}: {error}"))
}

/// A `Watch` held open by grpcio, its answers read line by line.
struct Watcher {
    child: Child,
    lines: std::sync::mpsc::Receiver<Value>,
}

impl Watcher {
    fn start(python: &std::path::Path, address: &str, tls: &str, service: &str) -> Self {
        let mut child = Command::new(python)
            .arg(workspace().join(PROBE))
            .args([address, tls, "watch", service])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the watch");
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = sender.send(serde_json::from_str(&line).unwrap());
            }
        });
        Self { child, lines }
    }

    fn must_next(&self, what: &str) -> Value {
        self.lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no answer on the watch: {what}"))
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_reflection_answer_standard_clients_and_follow_the_leader() {
    let python = must_python();
    let dir = tempfile::tempdir().unwrap();
    let stubs = dir.path().join("stubs");
    must_generate_python_stubs(&python, &stubs);
    let go_client = must_build_go_client(&dir.path().join("go"));
    let mut cluster = ClusterHarness::must_start(dir.path(), 3);
    let tls = cluster.tls_dir.display().to_string();
    let (leader, mut client) = cluster.must_leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let address = |id: u64| cluster.addresses[id as usize - 1].clone();
    let check = |id: u64, service: &str| {
        probe(&python, &stubs, &[&address(id), &tls, "check", service])["status"].clone()
    };

    // Every member is serving; only the leader serves people and agents. A follower learns
    // its leader within an election or two.
    must_wait(
        Duration::from_secs(30),
        "the follower to know its leader",
        || (check(follower, "") == "SERVING").then_some(()),
    );
    assert_eq!(check(leader, ""), "SERVING");
    assert_eq!(check(leader, CONTROL), "SERVING");
    assert_eq!(check(follower, CONTROL), "NOT_SERVING");
    assert_eq!(check(follower, "rewind.v1.RaftService"), "SERVING");
    let unknown = probe(
        &python,
        &stubs,
        &[&address(leader), &tls, "check", "rewind.v1.Nothing"],
    );
    assert_eq!(unknown["error"], "NOT_FOUND");
    // A load balancer's probe needs no client certificate.
    let anonymous = probe(
        &python,
        &stubs,
        &[&address(leader), &tls, "check", CONTROL, "--no-certificate"],
    );
    assert_eq!(anonymous["status"], "SERVING");

    // Reflection, both versions, on a follower too: every service and ControlService's methods.
    let output = run_python(
        &python,
        &stubs,
        PROBE,
        &[&address(follower), &tls, "reflect"],
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let answers: Vec<Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(answers.len(), 2, "{stdout}");
    for answer in &answers {
        let services: Vec<&str> = answer["services"]
            .as_array()
            .unwrap_or_else(|| panic!("{answer}"))
            .iter()
            .map(|service| service.as_str().unwrap())
            .collect();
        for expected in [
            CONTROL,
            "rewind.v1.AgentService",
            "rewind.v1.RaftService",
            "rewind.v1.MemberService",
            "rewind.v1.JoinService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(
                services.contains(&expected),
                "{}: {services:?}",
                answer["version"]
            );
        }
        let methods = answer["control_methods"].as_array().unwrap();
        assert!(
            methods.iter().any(|method| method == "StartRollback"),
            "{answer}"
        );
    }

    // The client examples, pointed at a follower: each follows the leader's address, and reads
    // a real rollback and the audit chain.
    let mut hosts = cluster.must_prepare_hosts(dir.path(), &["web-1"]);
    hosts[0].must_start_agent();
    must_agents_connected(&client, 1).await;
    must_deploy_v1_then_v2(&mut client, &hosts).await;
    let rollback_id = must_start_rollback_of_v2(&mut client).await;
    must_rollback_end(&client, &rollback_id).await;
    let python_run = run_python(
        &python,
        &stubs,
        "docs/clients/python/rewind_status.py",
        &["--coordinator", &address(follower), "--tls-dir", &tls],
    );
    let go_run = Command::new(&go_client)
        .args(["-coordinator", &address(follower), "-tls-dir", &tls])
        .output()
        .unwrap();
    for (language, output) in [("Python", python_run), ("Go", go_run)] {
        assert!(
            output.status.success(),
            "the {language} client example: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report: Value = serde_json::from_slice(&output.stdout).unwrap();
        let said = format!("{language}: {report}");
        assert_eq!(report["health"], "SERVING", "{said}");
        assert_eq!(report["control_service"], "NOT_SERVING", "{said}");
        let services = report["services"].as_array().unwrap();
        assert!(services.iter().any(|service| service == CONTROL), "{said}");
        assert_eq!(report["leader"], address(leader), "{said}");
        assert_eq!(report["members"].as_array().unwrap().len(), 3, "{said}");
        let rollbacks = report["rollbacks"].as_array().unwrap();
        assert_eq!(rollbacks[0]["rollback_id"], rollback_id.as_str(), "{said}");
        assert_eq!(rollbacks[0]["state"], "ROLLBACK_STATE_SUCCEEDED", "{said}");
        assert_eq!(report["audit"]["ok"], true, "{said}");
    }

    // A watcher of ControlService on the leader hears leadership move away.
    let watcher = Watcher::start(&python, &address(leader), &tls, CONTROL);
    assert_eq!(watcher.must_next("the first status")["status"], "SERVING");
    client
        .transfer_leader(pb::TransferLeaderRequest {
            request_id: "move".into(),
            member_id: follower,
            reason: "health watch test".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        watcher.must_next("leadership moved")["status"],
        "NOT_SERVING"
    );
    let (new_leader, _) = cluster.must_leader().await;
    assert_eq!(new_leader, follower);
    assert_eq!(check(follower, CONTROL), "SERVING");

    // A member stopping with a Watch open ends the watch rather than waiting on it.
    cluster
        .terminate(leader, Duration::from_secs(30))
        .await
        .expect("the member stops with a watch open");
    // Told it stopped serving, then the stream ended by the member (not cut off).
    let mut end = watcher.must_next("the member stopped");
    if end["status"] == "NOT_SERVING" {
        end = watcher.must_next("the stream to end");
    }
    assert_eq!(end["end"], "OK", "{end}");
}

/// Kubernetes' gRPC probes speak plaintext: `health.probe-listen` serves the health service
/// alone there, with the same statuses, and nothing else.
#[tokio::test(flavor = "multi_thread")]
async fn the_plaintext_probe_port_serves_health_and_nothing_else() {
    let python = must_python();
    let dir = tempfile::tempdir().unwrap();
    let stubs = dir.path().join("stubs");
    must_generate_python_stubs(&python, &stubs);
    let probes = format!("127.0.0.1:{}", free_port());
    let coordinator = Coordinator::must_start_with(
        &dir.path().join("coordinator"),
        &format!("[health]\nprobe-listen = \"{probes}\"\n"),
    );
    coordinator.must_client().await;
    let check = |service: &str| probe(&python, &stubs, &[&probes, "-", "check", service]);
    // The one member of a dev cluster leads.
    assert_eq!(check("")["status"], "SERVING");
    assert_eq!(check("rewind.v1.RaftService")["status"], "SERVING");
    assert_eq!(check(CONTROL)["status"], "SERVING");
    assert_eq!(check("rewind.v1.Nothing")["error"], "NOT_FOUND");
    let output = run_python(&python, &stubs, PROBE, &[&probes, "-", "reflect"]);
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 2, "both versions asked: {stdout}");
    for line in stdout.lines() {
        let answer: Value = serde_json::from_str(line).unwrap();
        assert_eq!(answer["error"], "UNIMPLEMENTED", "{stdout}");
    }

    // Its bounds: one address holds at most 4 connections (a fifth is closed at once), which
    // does not keep the kubelet's probes from another address out; each connection ends
    // after 30 s however idle.
    let from_other_address = || async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        socket.connect(probes.parse().unwrap()).await.unwrap()
    };
    let opened = std::time::Instant::now();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(from_other_address().await);
    }
    let mut fifth = from_other_address().await;
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut fifth, &mut byte),
    )
    .await
    .expect("the fifth connection from one address closed at once");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert_eq!(
        check("")["status"],
        "SERVING",
        "a probe from elsewhere still answered"
    );
    let log = dir.path().join("coordinator").join("coordinator.log");
    must_wait(
        Duration::from_secs(10),
        "the closed connection logged",
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("Closed a connection to the health probe port")
                .then_some(())
        },
    );
    // Served, they got the server's HTTP/2 settings; then nothing until they end.
    for mut idle in held {
        let ended = tokio::time::timeout(
            Duration::from_secs(40).saturating_sub(opened.elapsed()),
            async {
                let mut buffer = [0u8; 1024];
                while let Ok(read @ 1..) =
                    tokio::io::AsyncReadExt::read(&mut idle, &mut buffer).await
                {
                    let _ = read;
                }
            },
        )
        .await;
        assert!(
            ended.is_ok(),
            "an idle probe connection still open after 40 s"
        );
        assert!(opened.elapsed() >= Duration::from_secs(25), "ended early");
    }
}
