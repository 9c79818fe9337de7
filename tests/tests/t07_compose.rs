//! The docker-compose deployment (`deploy/docker-compose.yml`, brought up by
//! `deploy/docker/up.sh` from a locally built image): three coordinator containers and two agent
//! containers on a private network. The agents join with one-time tokens; a rollback runs, the
//! leader's container is killed, and the rollback finishes under the new leader with every host
//! restored once.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_proto::v1::control_service_client::ControlServiceClient;
use rewind_tests::{
    TestHost, must_agents_connected, must_deploy_v1_then_v2, must_have_rolled_back_v2_once,
    must_start_rollback_of_v2, must_wait_async, operator_channel,
};
use tonic::transport::Channel;

/// Host ports the compose file publishes the members on, by member id - 1.
const MEMBER_PORTS: [u16; 3] = [17441, 17442, 17443];
const LONG: Duration = Duration::from_secs(90);

/// A compose project, taken down (containers and network) when dropped.
struct Compose {
    dir: PathBuf,
    project: String,
    stopped: Vec<u64>,
}

impl Compose {
    fn must_up(dir: &Path) -> Self {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let project = format!("rewind-test-{}", std::process::id());
        let compose = Self {
            dir: dir.to_path_buf(),
            project,
            stopped: Vec::new(),
        };
        let output = Command::new(workspace.join("deploy/docker/up.sh"))
            .arg(dir)
            .arg("debug")
            .env("REWIND_COMPOSE_PROJECT", &compose.project)
            .output()
            .expect("run deploy/docker/up.sh (is docker installed?)");
        assert!(
            output.status.success(),
            "deploy/docker/up.sh failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        compose
    }

    /// Runs compose (the v1 binary, else the `docker compose` plugin) on this project.
    fn docker_compose(&self, args: &[&str]) -> Result<std::process::Output, String> {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/docker-compose.yml");
        let mut command = compose_command().ok_or(
            "docker-compose is needed: apt-get install docker-compose (or the docker compose plugin)",
        )?;
        command
            .arg("-f")
            .arg(file)
            .args(["-p", &self.project])
            .args(args)
            .env("REWIND_COMPOSE_DIR", &self.dir)
            .output()
            .map_err(|error| format!("run compose: {error}"))
    }

    /// SIGKILL to a member's container.
    fn kill_member(&mut self, id: u64) {
        let service = format!("coordinator-{id}");
        let output = self.docker_compose(&["kill", &service]);
        assert!(
            output.as_ref().is_ok_and(|output| output.status.success()),
            "{output:?}"
        );
        self.stopped.push(id);
    }

    async fn client(&self, id: u64) -> Result<ControlServiceClient<Channel>, String> {
        let address = format!("127.0.0.1:{}", MEMBER_PORTS[id as usize - 1]);
        Ok(ControlServiceClient::new(
            operator_channel(&self.dir.join("tls"), &address).await?,
        ))
    }

    /// The running member that serves, and a client to it.
    async fn must_leader(&self) -> (u64, ControlServiceClient<Channel>) {
        must_wait_async(LONG, "a leader among the containers", || async {
            for id in (1..=3).filter(|id| !self.stopped.contains(id)) {
                let Ok(mut client) = self.client(id).await else {
                    continue;
                };
                if client
                    .list_services(pb::ListServicesRequest {})
                    .await
                    .is_ok()
                {
                    return Some((id, client));
                }
            }
            None
        })
        .await
    }
}

/// Clean-up never panics (a panic inside the test's panic would abort the whole test binary):
/// what fails is said and left.
impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() {
            match self.docker_compose(&["logs", "--no-color", "--tail", "40"]) {
                Ok(logs) => eprintln!("{}", String::from_utf8_lossy(&logs.stdout)),
                Err(error) => eprintln!("no container logs: {error}"),
            }
        }
        if let Err(error) = self.docker_compose(&["down", "--timeout", "1"]) {
            eprintln!(
                "could not take the compose project {} down: {error}",
                self.project
            );
        }
    }
}

/// The compose v1 binary if it is here, else `docker compose` if the plugin is.
fn compose_command() -> Option<Command> {
    let answers = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .is_ok_and(|output| output.status.success())
    };
    if answers("docker-compose", &["--version"]) {
        Some(Command::new("docker-compose"))
    } else if answers("docker", &["compose", "version"]) {
        let mut command = Command::new("docker");
        command.arg("compose");
        Some(command)
    } else {
        None
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_finishes_after_the_leader_container_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let mut compose = Compose::must_up(dir.path());
    let (_, mut client) = compose.must_leader().await;
    let hosts: Vec<TestHost> = ["web-1", "web-2"]
        .iter()
        .map(|id| TestHost {
            id: id.to_string(),
            root: dir.path().join(id).join("srv/web"),
            config_path: dir.path().join(id).join("agent.toml"),
            agent: None,
        })
        .collect();
    must_agents_connected(&client, 2).await;
    // The agents joined with their tokens: keys made in their containers, certificates signed
    // by the members' issuing CA; none was issued beside the CA.
    for id in ["web-1", "web-2"] {
        assert!(!dir.path().join("tls").join(format!("{id}.pem")).exists());
        let chain = rewind_shared::member_tls::pem_certificates(
            &dir.path().join(id).join("tls").join(format!("{id}.pem")),
        )
        .unwrap();
        assert_eq!(chain.len(), 2, "{id}: the leaf and the issuing CA");
        let identity = rewind_shared::identity::certificate_identity(chain[0].as_ref()).unwrap();
        assert_eq!(identity.principal(), format!("agent:{id}"));
    }
    must_deploy_v1_then_v2(&mut client, &hosts).await;
    let rollback_id = must_start_rollback_of_v2(&mut client).await;
    let (old_leader, _) = compose.must_leader().await;
    compose.kill_member(old_leader);

    let (new_leader, mut client) = compose.must_leader().await;
    assert_ne!(new_leader, old_leader);
    must_have_rolled_back_v2_once(&mut client, &rollback_id, &hosts).await;
}
