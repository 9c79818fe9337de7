//! A service that is a Docker container, managed by image digest, on a real Docker engine with
//! images built here `FROM scratch`: a change re-creates the container from the release's image
//! id (keeping the container's own settings), a rollback re-creates it from the id captured
//! before the change even when no tag names that image any more, readiness says when the image
//! is gone, and a restore is then refused before anything changes.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_shared::dev_ca::Subject;
use rewind_shared::identity::Kind;
use rewind_tests::{
    Coordinator, TestHost, must_agents_connected, must_change, must_change_where, must_deploy_web,
    must_rollback_end, must_wait_async,
};

/// Runs docker; its stdout, trimmed. Fails naming docker when it is not there.
fn docker(args: &[&str]) -> String {
    let output = Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|error| {
            panic!("docker is needed ({error}): apt-get install docker.io, with its daemon running")
        });
    assert!(
        output.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Removes what the test made on the engine, however it ends.
struct Leftovers {
    container: String,
    tags: Vec<String>,
    images: Vec<String>,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.container])
            .output();
        for image in self.tags.iter().chain(&self.images) {
            let _ = Command::new("docker").args(["rmi", "-f", image]).output();
        }
    }
}

/// Builds a `FROM scratch` image holding a static program that sleeps, tagged `tag`, with
/// `RELEASE=<release>` in its environment; returns its id.
fn must_build_image(dir: &Path, tag: &str, release: &str) -> String {
    let context = dir.join(format!("image-{release}"));
    std::fs::create_dir_all(&context).unwrap();
    let source = context.join("sleeper.c");
    std::fs::write(
        &source,
        "#include <unistd.h>\nint main(void){for(;;)pause();}\n",
    )
    .unwrap();
    let compiled = Command::new("gcc")
        .args(["-static", "-Os", "-o"])
        .arg(context.join("sleeper"))
        .arg(&source)
        .output()
        .unwrap_or_else(|error| panic!("gcc is needed ({error}): apt-get install gcc libc6-dev"));
    assert!(
        compiled.status.success(),
        "gcc -static: {} (apt-get install libc6-dev)",
        String::from_utf8_lossy(&compiled.stderr)
    );
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM scratch\nCOPY sleeper /sleeper\nENV RELEASE={release}\nCMD [\"/sleeper\"]\n"),
    )
    .unwrap();
    docker(&["build", "-q", "-t", tag, context.to_str().unwrap()]);
    docker(&["image", "inspect", "--format", "{{.Id}}", tag])
}

fn inspect(container: &str, format: &str) -> String {
    docker(&["inspect", "--format", format, container])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_is_deployed_and_rolled_back_by_image_digest_never_a_tag() {
    let dir = tempfile::tempdir().unwrap();
    let run = std::process::id();
    let container = format!("rewind-t45-{run}");
    let (tag_v1, tag_v2) = (
        format!("rewind-t45-{run}:v1"),
        format!("rewind-t45-{run}:v2"),
    );
    let mut leftovers = Leftovers {
        container: container.clone(),
        tags: vec![tag_v1.clone(), tag_v2.clone()],
        images: Vec::new(),
    };
    let image_v1 = must_build_image(dir.path(), &tag_v1, "v1");
    let image_v2 = must_build_image(dir.path(), &tag_v2, "v2");
    leftovers.images = vec![image_v1.clone(), image_v2.clone()];
    assert_ne!(image_v1, image_v2);
    // The container as someone first ran it: its own settings must survive every re-creation.
    docker(&[
        "run",
        "-d",
        "--name",
        &container,
        "-e",
        "EXTRA=kept",
        "--label",
        "team=payments",
        "--restart",
        "unless-stopped",
        &tag_v1,
    ]);

    let coordinator = Coordinator::must_start(dir.path());
    let host_id = "box-1";
    let root = dir.path().join(host_id).join("srv").join("web");
    std::fs::create_dir_all(root.join("config")).unwrap();
    std::fs::write(root.join("config/app.toml"), "workers = 4\n").unwrap();
    let tls = coordinator.tls_dir();
    coordinator
        .ca()
        .write_identity(&tls, &Subject::new(Kind::Agent, host_id), &[])
        .unwrap();
    let config_path = dir.path().join(host_id).join("agent.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"host-id = "{host_id}"
coordinators = ["{address}"]
data-dir = "{data}"
health-interval-ms = 300
[tls]
ca = "{tls}/ca.pem"
cert = "{tls}/{host_id}.pem"
key = "{tls}/{host_id}.key"
[[service]]
name = "web"
root = "{root}"
config-files = ["config/app.toml"]
container = "{container}"
manage-container = true
restart-command = ["true"]
[[service.probe]]
name = "running"
command = ["sh", "-c", "docker inspect --format '{{{{.State.Running}}}}' {container} | grep -q true"]
timeout-ms = 5000
"#,
            address = coordinator.address,
            data = dir.path().join(host_id).join("agent").display(),
            tls = tls.display(),
            root = root.display(),
        ),
    )
    .unwrap();
    let mut host = TestHost {
        id: host_id.into(),
        root: root.clone(),
        config_path,
        agent: None,
    };
    host.must_start_agent();
    let mut client = coordinator.must_client().await;
    must_agents_connected(&client, 1).await;
    client
        .put_service(pb::PutServiceRequest {
            request_id: "web".into(),
            service: Some(rewind_tests::plain_service("web")),
        })
        .await
        .unwrap();
    for (version, image) in [("v1", &image_v1), ("v2", &image_v2)] {
        client
            .register_release(pb::RegisterReleaseRequest {
                request_id: format!("release-{version}"),
                release: Some(pb::Release {
                    service: "web".into(),
                    version: version.into(),
                    artifact_digest: image.clone(),
                    commit: "c0ffee".into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }
    for version in ["v1", "v2"] {
        let change = must_change(&mut client, version).await;
        must_change_where(&client, &change, "the change deployed", |change| {
            change.state == pb::ChangeState::Deployed as i32
        })
        .await;
    }
    assert_eq!(
        inspect(&container, "{{.Image}}"),
        image_v2,
        "runs v2's image"
    );
    assert_eq!(
        inspect(&container, "{{.Config.Image}}"),
        image_v2,
        "named by digest"
    );
    let env = inspect(&container, "{{range .Config.Env}}{{.}} {{end}}");
    assert!(
        env.contains("EXTRA=kept") && env.contains("RELEASE=v2"),
        "{env}"
    );
    assert_eq!(
        inspect(&container, "{{index .Config.Labels \"team\"}}"),
        "payments"
    );
    assert_eq!(
        inspect(&container, "{{.HostConfig.RestartPolicy.Name}}"),
        "unless-stopped"
    );
    assert_eq!(inspect(&container, "{{.State.Running}}"), "true");

    // No tag names v1's image any more (another tag keeps it on the host): the rollback
    // re-creates the container from the id it captured.
    let kept = format!("rewind-t45-{run}:kept");
    leftovers.tags.push(kept.clone());
    docker(&["tag", &image_v1, &kept]);
    docker(&["rmi", &tag_v1]);
    // v2 crashed: a container that stopped is health, not a hand-made change, so it does not
    // hold its own rollback up.
    docker(&["kill", &container]);
    let plan = client
        .plan_rollback(pb::PlanRollbackRequest {
            selection: Some(pb::RollbackSelection {
                change_ids: vec!["ch-2".into()],
                ..Default::default()
            }),
            options: None,
        })
        .await
        .unwrap()
        .into_inner()
        .plan
        .unwrap();
    assert!(plan.missing_artifacts.is_empty(), "{plan:?}");
    let rollback_id = client
        .start_rollback(pb::StartRollbackRequest {
            request_id: "rb".into(),
            change_id: "ch-2".into(),
            reason: "v2 is bad".into(),
            max_parallel: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rollback
        .unwrap()
        .rollback_id;
    let ended = must_rollback_end(&client, &rollback_id).await;
    assert_eq!(
        ended.state,
        pb::RollbackState::Succeeded as i32,
        "{ended:?}"
    );
    assert_eq!(
        inspect(&container, "{{.Image}}"),
        image_v1,
        "back on v1's image"
    );
    assert_eq!(inspect(&container, "{{.Config.Image}}"), image_v1);
    let env = inspect(&container, "{{range .Config.Env}}{{.}} {{end}}");
    assert!(
        env.contains("EXTRA=kept") && env.contains("RELEASE=v1"),
        "{env}"
    );
    assert_eq!(inspect(&container, "{{.State.Running}}"), "true");

    // v2 again, then v1's image leaves the host: readiness says so and the restore is refused
    // before the container is touched.
    let change = must_deploy_web(&client, "v2", &[]).await;
    docker(&["rmi", &kept]);
    let gone = must_wait_async(
        // The agent asks the engine which images are left every 30 s.
        Duration::from_secs(120),
        "readiness to miss v1's image",
        || {
            let mut client = client.clone();
            let change = change.clone();
            async move {
                let plan = client
                    .plan_rollback(pb::PlanRollbackRequest {
                        selection: Some(pb::RollbackSelection {
                            change_ids: vec![change],
                            ..Default::default()
                        }),
                        options: None,
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .plan?;
                (!plan.missing_artifacts.is_empty()).then_some(plan.missing_artifacts)
            }
        },
    )
    .await;
    assert!(
        gone[0].contains("box-1") && gone[0].contains("v1"),
        "{gone:?}"
    );
    let refused = client
        .start_rollback(pb::StartRollbackRequest {
            request_id: "rb-gone".into(),
            change_id: change.clone(),
            reason: "v2 is bad again".into(),
            max_parallel: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rollback
        .unwrap();
    let paused = rewind_tests::must_rollback_where(
        &client,
        &refused.rollback_id,
        "the restore refused",
        |rollback| rollback.state == pb::RollbackState::Paused as i32,
    )
    .await;
    let restore = paused
        .steps
        .iter()
        .find(|step| step.kind == "restore")
        .unwrap();
    assert!(
        restore.detail.contains("is no longer on this host"),
        "{restore:?}"
    );
    assert_eq!(
        inspect(&container, "{{.Image}}"),
        image_v2,
        "left untouched"
    );
    assert_eq!(inspect(&container, "{{.State.Running}}"), "true");
}
