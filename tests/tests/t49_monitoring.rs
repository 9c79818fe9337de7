//! The monitoring that ships in deploy/: the Prometheus rules pass `promtool check` and their
//! unit tests (`promtool test rules`), the scrape config is valid, and a real Prometheus scraping
//! a real coordinator with those rules loaded evaluates every query of the Grafana dashboard
//! (deploy/grafana/rewind.json) and the recording rules to what the coordinator says.
//! (That every metric they name is exported is checked against the coordinator's own rendering,
//! `coordinator/src/http/metrics.rs`.)

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rewind_tests::clients::workspace;
use rewind_tests::*;
use serde_json::Value;

const INSTALL: &str = "apt-get install prometheus (tests/run-all does)";

/// Runs `promtool ARGS` in `dir`; panics with its output unless it succeeds.
fn must_promtool(dir: &Path, args: &[&str]) {
    let output = Command::new("promtool")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("promtool is missing ({error}): {INSTALL}"));
    assert!(
        output.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// One instant query's result, or `None` while Prometheus cannot answer yet.
async fn query(prometheus: &str, expr: &str) -> Option<Value> {
    let text = reqwest::Client::new()
        .get(format!("http://{prometheus}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    serde_json::from_str(&text).ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn shipped_rules_pass_their_tests_and_a_real_prometheus_evaluates_the_dashboard() {
    let deploy = workspace().join("deploy/prometheus");
    must_promtool(&deploy, &["check", "rules", "rewind.rules.yml"]);
    must_promtool(&deploy, &["check", "config", "prometheus.yml"]);
    must_promtool(&deploy, &["test", "rules", "rewind.rules.test.yml"]);

    // A real coordinator, scraped every second by a real Prometheus with the shipped rules.
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start_with(
        &dir.path().join("coordinator"),
        "[http]\nlisten = \"127.0.0.1:0\"\n",
    );
    let prometheus_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&prometheus_dir).unwrap();
    std::fs::copy(
        deploy.join("rewind.rules.yml"),
        prometheus_dir.join("rewind.rules.yml"),
    )
    .unwrap();
    let shipped = std::fs::read_to_string(deploy.join("prometheus.yml")).unwrap();
    let targets_at = shipped.find("      - targets:").unwrap();
    let config = format!(
        "{}      - targets: ['{}']\n",
        shipped[..targets_at]
            .replace("scrape_interval: 15s", "scrape_interval: 1s")
            .replace("evaluation_interval: 15s", "evaluation_interval: 1s"),
        coordinator.http_address
    );
    std::fs::write(prometheus_dir.join("prometheus.yml"), config).unwrap();
    let listen = {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap().to_string()
    };
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .current_dir(&prometheus_dir)
        .arg("--config.file=prometheus.yml")
        .arg(format!(
            "--storage.tsdb.path={}",
            prometheus_dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={listen}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|error| panic!("prometheus is missing ({error}): {INSTALL}"));
    let _prometheus = Process::adopt(child, dir.path().join("prometheus.log"));

    // The recording rules see the one member lead and its chain verified.
    must_wait_async(
        Duration::from_secs(60),
        "the rules to see a leader",
        || async {
            let answer = query(&listen, "rewind:leaders:count").await?;
            let value = answer["data"]["result"][0]["value"][1]
                .as_str()?
                .to_string();
            (value == "1").then_some(())
        },
    )
    .await;
    let chain = query(&listen, r#"min(rewind_audit_chain_ok{job="rewind"})"#)
        .await
        .unwrap();
    assert_eq!(chain["data"]["result"][0]["value"][1], "1", "{chain}");
    let alerts = query(&listen, "ALERTS{alertstate=\"firing\"}")
        .await
        .unwrap();
    assert_eq!(alerts["data"]["result"], Value::Array(vec![]), "{alerts}");

    // Every query of the dashboard is valid PromQL over what is scraped.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(workspace().join("deploy/grafana/rewind.json")).unwrap(),
    )
    .unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap().replace("$job", "rewind");
            let answer = query(&listen, &expr).await.unwrap();
            assert_eq!(
                answer["status"], "success",
                "{}: {expr}: {answer}",
                panel["title"]
            );
        }
    }
}
