//! The Kubernetes manifests (deploy/kubernetes): valid against the Kubernetes OpenAPI schemas
//! (`kubernetes-validate --strict`, from PyPI), and what they hand rewind is what rewind takes:
//! every member's config and the agent's pass their `check-config`, and the probes ask the
//! plaintext health port the configs open, for services it knows.

use std::process::Command;

use rewind_tests::clients::workspace;
use rewind_tests::*;
use serde_json::Value;

/// Every document of a manifest file.
fn documents(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(workspace().join("deploy/kubernetes").join(name)).unwrap();
    text.split("\n---\n")
        .map(|document| yaml_serde::from_str(document).unwrap())
        .collect()
}

fn of_kind<'a>(documents: &'a [Value], kind: &str) -> &'a Value {
    documents
        .iter()
        .find(|document| document["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

#[test]
fn manifests_validate_and_carry_configs_rewind_accepts() {
    let venv = workspace().join("target/python-venv/bin/kubernetes-validate");
    let manifests: Vec<_> = ["coordinator.yaml", "agent.yaml"]
        .iter()
        .map(|name| workspace().join("deploy/kubernetes").join(name))
        .collect();
    let validated = Command::new(&venv)
        .arg("--strict")
        .args(&manifests)
        .output()
        .unwrap_or_else(|error| {
            panic!(
                "{} is missing ({error}): target/python-venv/bin/pip install -r \
                 tests/python/requirements.txt (tests/run-all does)",
                venv.display()
            )
        });
    let said = String::from_utf8_lossy(&validated.stdout).to_string()
        + &String::from_utf8_lossy(&validated.stderr);
    assert!(validated.status.success(), "{said}");
    assert_eq!(said.matches("passed for resource").count(), 7, "{said}");

    // Each member's config, with the files it names put where this test can read them.
    let dir = tempfile::tempdir().unwrap();
    let issued = Command::new(must_binary("rewind-coordinator"))
        .args(["issue-issuing-ca", "--data-dir"])
        .arg(dir.path())
        .arg("--create-ca")
        .output()
        .unwrap();
    assert!(issued.status.success(), "{}", output_text(&issued));
    let coordinator = documents("coordinator.yaml");
    let configs = &of_kind(&coordinator, "ConfigMap")["data"];
    let statefulset = of_kind(&coordinator, "StatefulSet");
    let replicas = statefulset["spec"]["replicas"].as_u64().unwrap();
    for ordinal in 0..replicas {
        let name = format!("rewind-coordinator-{ordinal}.toml");
        let config = configs[&name]
            .as_str()
            .unwrap_or_else(|| panic!("no {name}"));
        assert!(
            config.contains(&format!("member-id = {}", ordinal + 1)),
            "{name}"
        );
        assert!(config.contains("probe-listen = \"0.0.0.0:7444\""), "{name}");
        let local = config
            .replace(
                "/etc/rewind/policy/policy.toml",
                workspace().join("deploy/policy.toml").to_str().unwrap(),
            )
            .replace(
                "/etc/rewind/tls/issuer",
                dir.path().join("tls/issuer").to_str().unwrap(),
            );
        let path = dir.path().join(&name);
        std::fs::write(&path, local).unwrap();
        let checked = Command::new(must_binary("rewind-coordinator"))
            .args(["check-config", "--no-files"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            checked.status.success(),
            "{name}: {}",
            output_text(&checked)
        );
    }
    // The probes: the plaintext health port, for services the coordinator reports.
    let container = &statefulset["spec"]["template"]["spec"]["containers"][0];
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let grpc = &container[probe]["grpc"];
        assert_eq!(grpc["port"], 7444, "{probe}");
        let service = grpc["service"].as_str().unwrap_or("");
        assert!(
            ["", "rewind.v1.RaftService"].contains(&service),
            "{probe} asks for {service:?}"
        );
    }
    assert_eq!(
        container["args"][1], "/etc/rewind/config/$(POD_NAME).toml",
        "each pod reads its own member's config"
    );

    // The agent's config, named after the node.
    let agent = documents("agent.yaml");
    let config = of_kind(&agent, "ConfigMap")["data"]["agent.toml"]
        .as_str()
        .unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config).unwrap();
    let checked = Command::new(must_binary("rewind-agent"))
        .arg("--config")
        .arg(&path)
        .args(["check-config", "--no-files"])
        .env("REWIND_HOST_ID", "node-1")
        .output()
        .unwrap();
    assert!(checked.status.success(), "{}", output_text(&checked));
}
