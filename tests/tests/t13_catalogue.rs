//! A service's own rollback recipe end to end: `rewindctl service set --rollback-step` names
//! steps of the agent's catalogue, and a real agent runs them in that order with what its own
//! config allows: job processors paused and resumed from the checkpoint kept at pause (not the
//! older one the restore put back), a reload instead of a restart, a BAN sent to a cache, a
//! synthetic check, a stepped scale-up and an allow-listed command with a validated argument.

use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, Method, Uri};
use rewind_proto::v1 as pb;
use rewind_tests::*;

/// A cache and an application endpoint on loopback; records every request as `METHOD path`
/// with its `x-ban-url` header when one is sent.
async fn start_cache_and_app() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = seen.clone();
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap| {
        let recorded = recorded.clone();
        async move {
            let ban = headers
                .get("x-ban-url")
                .and_then(|value| value.to_str().ok())
                .map(|value| format!(" x-ban-url={value}"))
                .unwrap_or_default();
            recorded
                .lock()
                .unwrap()
                .push(format!("{method} {}{ban}", uri.path()));
            "cart: 3 items"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

/// Sets web's recipe (and no automatic rollback) with `rewindctl service set`.
fn must_set_recipe(coordinator: &Coordinator, recipe: &[&str]) {
    let mut args = vec!["service", "set", "web", "--no-auto-rollback"];
    for step in recipe {
        args.extend(["--rollback-step", step]);
    }
    let set = coordinator.rewindctl(&args);
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_services_recipe_runs_each_catalogue_step_in_order_with_what_the_host_allows() {
    let (endpoint, requests) = start_cache_and_app().await;
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    let mut host = TestHost::must_prepare(dir.path(), "web-1", &coordinator);
    let root = host.root.display().to_string();
    // The job checkpoint is a config file, so the restore puts back the one captured before v2.
    std::fs::write(host.root.join("config/jobs.checkpoint"), "job-1").unwrap();
    let config = std::fs::read_to_string(&host.config_path)
        .unwrap()
        .replace(
            "config-files = [\"config/app.toml\"]",
            "config-files = [\"config/app.toml\", \"config/jobs.checkpoint\"]",
        )
        .replace(
            "restart-command = [",
            &format!("reload-command = [\"sh\", \"-c\", \"echo reload >> {root}/steps.log\"]\nrestart-command = ["),
        );
    let catalogue = format!(
        r#"
[[service.command]]
name = "warm-cache"
argv = ["sh", "-c", "echo warm-cache $0 >> {root}/steps.log", "{{region}}"]
args = {{ region = "[a-z]+-[a-z]+" }}
[service.jobs]
pause = {{ command = ["sh", "-c", "echo pause-jobs >> {root}/steps.log"] }}
resume = {{ command = ["sh", "-c", "echo resume-jobs-from-$(cat {root}/config/jobs.checkpoint) >> {root}/steps.log"] }}
checkpoint-file = "config/jobs.checkpoint"
[service.reconcile]
command = ["sh", "-c", "echo reconcile >> {root}/steps.log"]
[service.client-cache]
on = {{ command = ["sh", "-c", "echo client-cache-on >> {root}/steps.log"] }}
off = {{ command = ["sh", "-c", "echo client-cache-off >> {root}/steps.log"] }}
window-s = 1
[[service.purge]]
url = "{endpoint}/"
method = "BAN"
headers = {{ "X-Ban-Url" = "^/api/" }}
[service.scale-up]
command = ["sh", "-c", "echo scale-up $0 >> {root}/steps.log", "{{percent}}"]
stages = [50, 100]
wait-ms = 50
[[service.check]]
name = "cart"
url = "{endpoint}/api/cart"
body-contains = "items"
"#
    );
    std::fs::write(&host.config_path, config + &catalogue).unwrap();
    host.must_start_agent();
    let mut client = coordinator.must_client().await;
    must_agents_connected(&client, 1).await;
    must_deploy_v1_then_v2(&mut client, std::slice::from_ref(&host)).await;
    // Jobs processed under v2 moved the checkpoint on.
    std::fs::write(host.root.join("config/jobs.checkpoint"), "job-9").unwrap();

    let recipe = [
        "pause-jobs",
        "drain",
        "restore",
        "reload",
        "reconcile",
        "verify",
        "purge-cache",
        "clear-client-caches",
        "check",
        "scale-up",
        "run:warm-cache region=eu-west",
        "undrain",
        "resume-jobs",
    ];
    must_set_recipe(&coordinator, &recipe);

    let plan = coordinator.rewindctl(&["rollback", "plan", "--change", "ch-2"]);
    let shown = String::from_utf8_lossy(&plan.stdout);
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    assert!(
        shown.contains(
            "steps per host of web: pause-jobs -> drain -> restore -> reload -> reconcile -> \
             verify -> purge-cache -> clear-client-caches -> check -> scale-up -> \
             run:warm-cache region=eu-west -> undrain -> resume-jobs"
        ),
        "{shown}"
    );

    let rollback_id = must_start_rollback_of_v2(&mut client).await;
    let rollback = must_rollback_end(&client, &rollback_id).await;
    assert_eq!(
        rollback.state,
        pb::RollbackState::Succeeded as i32,
        "{rollback:?}"
    );
    assert_eq!(host.current_link(), "releases/v1");
    assert_eq!(
        host.restarts(),
        2,
        "two activations; the rollback reloaded instead"
    );
    // The client-cache window (1 s) closes on the agent's own timer, whenever it ends.
    let steps_log = must_wait(
        std::time::Duration::from_secs(30),
        "the client-cache window to close",
        || {
            let log = std::fs::read_to_string(host.root.join("steps.log")).unwrap();
            log.contains("client-cache-off").then_some(log)
        },
    );
    let position = |line: &str| steps_log.lines().position(|logged| logged == line);
    assert!(
        position("client-cache-off") > position("client-cache-on"),
        "{steps_log}"
    );
    assert_eq!(
        steps_log
            .lines()
            .filter(|line| *line != "client-cache-off")
            .collect::<Vec<_>>(),
        [
            "pause-jobs",
            "reload",
            "reconcile",
            "client-cache-on",
            "scale-up 50",
            "scale-up 100",
            "warm-cache eu-west",
            "resume-jobs-from-job-9",
        ],
        "in the recipe's order; jobs resume from the checkpoint kept at pause, not job-1"
    );
    let requests = requests.lock().unwrap().clone();
    assert_eq!(
        requests,
        ["BAN / x-ban-url=^/api/", "GET /api/cart"],
        "the purge before the check"
    );
    let rotation = std::fs::read_to_string(host.root.join("rotation")).unwrap();
    assert_eq!(rotation.lines().collect::<Vec<_>>(), ["drain", "undrain"]);

    // The agent journaled each step once, under the recipe's step names.
    let journal = host.must_stop_and_read_journal();
    let rollback_steps: Vec<String> = journal
        .iter()
        .filter_map(|record| record["step_id"].as_str())
        .filter(|id| id.starts_with(&format!("{rollback_id}/")))
        .map(|id| id.split('/').nth(2).unwrap_or_default().to_string())
        .collect();
    for name in [
        "pause-jobs",
        "drain",
        "restore",
        "reload",
        "purge-cache",
        "check",
        "scale-up",
        "run-1",
        "undrain",
        "resume-jobs",
    ] {
        assert_eq!(
            rollback_steps.iter().filter(|step| *step == name).count(),
            1,
            "{name} in {rollback_steps:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recipe_that_cannot_roll_back_safely_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    for (steps, reason) in [
        (vec!["drain", "restart"], "must restore"),
        (vec!["drain", "restore", "restart"], "drain needs undrain"),
        (
            vec!["restore", "restart", "reboot"],
            "\"reboot\" is not a rollback step",
        ),
        (
            vec!["restore", "restart", "run:warm-cache region"],
            "must be ARG=VALUE",
        ),
    ] {
        let mut args = vec!["service", "set", "web"];
        for step in &steps {
            args.extend(["--rollback-step", step]);
        }
        let output = coordinator.rewindctl(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{steps:?} was accepted");
        assert!(
            stderr.contains("service.rollback_steps") && stderr.contains(reason),
            "{steps:?}: {stderr}"
        );
    }
}

/// A CDN's purge API and a synthetic check over HTTPS with mutual TLS: the endpoint's
/// certificate comes from a CA of its own and it asks for a client certificate of another. The
/// purge names its own (`ca-file`, `client-cert-file`, `client-key-file`), the check relies on
/// the agent's `[https]`; the purge POSTs its JSON body with its authorization header, the check
/// sends its header, and the rollback that runs them succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn a_cdn_purge_and_a_check_over_https_carry_their_body_and_headers() {
    rewind_shared::tls::install_crypto_provider();
    let client_ca = rewind_shared::dev_ca::DevCa::generate("clients of the endpoint").unwrap();
    let endpoint = rewind_tests::https::HttpsRecorder::must_start_asking(
        &["authorization", "content-type", "x-check"],
        "cart: 3 items",
        Some(client_ca.cert_pem()),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("endpoint-ca.pem");
    std::fs::write(&ca_file, &endpoint.ca_pem).unwrap();
    let subject =
        rewind_shared::dev_ca::Subject::new(rewind_shared::identity::Kind::Agent, "web-1");
    let (client_cert, client_key) = client_ca.issue(&subject, &[]).unwrap();
    let (cert_file, key_file) = (dir.path().join("client.pem"), dir.path().join("client.key"));
    std::fs::write(&cert_file, client_cert).unwrap();
    std::fs::write(&key_file, client_key).unwrap();
    let coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    let mut host = TestHost::must_prepare(dir.path(), "web-1", &coordinator);
    let catalogue = format!(
        r#"
[[service.purge]]
url = "{url}/v1/zones/web/purge"
method = "POST"
headers = {{ "Authorization" = "Bearer cdn-token", "Content-Type" = "application/json" }}
body = '{{"tags": ["web-assets"]}}'
ca-file = "{ca}"
client-cert-file = "{cert}"
client-key-file = "{key}"
[[service.check]]
name = "cart"
url = "{url}/api/cart"
headers = {{ "X-Check" = "rewind" }}
body-contains = "items"

[https]
ca-file = "{ca}"
client-cert-file = "{cert}"
client-key-file = "{key}"
"#,
        url = endpoint.url,
        ca = ca_file.display(),
        cert = cert_file.display(),
        key = key_file.display(),
    );
    let config = std::fs::read_to_string(&host.config_path).unwrap() + &catalogue;
    std::fs::write(&host.config_path, config).unwrap();
    host.must_start_agent();
    let mut client = coordinator.must_client().await;
    must_agents_connected(&client, 1).await;
    must_deploy_v1_then_v2(&mut client, std::slice::from_ref(&host)).await;
    must_set_recipe(
        &coordinator,
        &[
            "drain",
            "restore",
            "restart",
            "verify",
            "purge-cache",
            "check",
            "undrain",
        ],
    );
    let rollback_id = must_start_rollback_of_v2(&mut client).await;
    let rollback = must_rollback_end(&client, &rollback_id).await;
    assert_eq!(
        rollback.state,
        pb::RollbackState::Succeeded as i32,
        "{rollback:?}"
    );
    let received = endpoint.received();
    let purge = received
        .iter()
        .find(|request| request.path == "/v1/zones/web/purge")
        .unwrap_or_else(|| panic!("no purge: {received:?}"));
    assert_eq!(purge.method, "POST");
    assert_eq!(purge.body, r#"{"tags": ["web-assets"]}"#);
    assert_eq!(
        purge.headers,
        [
            "authorization: Bearer cdn-token",
            "content-type: application/json"
        ]
    );
    let check = received
        .iter()
        .find(|request| request.path == "/api/cart")
        .unwrap_or_else(|| panic!("no check: {received:?}"));
    assert_eq!(
        (check.method.as_str(), &check.headers[..]),
        ("GET", &["x-check: rewind".to_string()][..])
    );
    // The token went to the CDN, and nowhere into the rollback's record.
    assert!(
        !format!("{rollback:?}").contains("cdn-token"),
        "{rollback:?}"
    );
    // The purge ran before the check, as the recipe says.
    let position = |path: &str| received.iter().position(|request| request.path == path);
    assert!(
        position("/v1/zones/web/purge") < position("/api/cart"),
        "{received:?}"
    );
}
