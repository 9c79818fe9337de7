//! The optional steps against a real directory tree, real processes and a real HTTP server.

use std::collections::VecDeque;
use std::fs;
use std::sync::{Arc, Mutex};

use rewind_proto::v1::{StepCommand, step_command::Action};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::config::RawConfig;
use crate::steps::Executor;

/// The agent config for one service at `root`, with `sections` appended to its table.
fn service_from_toml(root: &Path, sections: &str) -> Result<ServiceConfig, Vec<String>> {
    let text = format!(
        r#"
host-id = "h1"
coordinators = ["127.0.0.1:1"]
data-dir = "/tmp/unused"
[tls]
ca = "ca.pem"
cert = "c.pem"
key = "k.pem"
[[service]]
name = "web"
root = "{root}"
restart-command = ["true"]
{sections}
"#,
        root = root.display()
    );
    let raw: RawConfig = rewind_shared::config::parse_toml(Path::new("agent.toml"), &text)
        .unwrap()
        .value;
    raw.validate().map(|config| config.services[0].clone())
}

fn executor_for(service: ServiceConfig) -> (Executor, tempfile::TempDir) {
    let data = tempfile::tempdir().unwrap();
    let store = Store::open(&data.path().join("store")).unwrap();
    let executor = Executor::new(store, vec![service], Arc::new(crate::host::LocalHost));
    (executor, data)
}

async fn run_step(executor: &Executor, id: &str, action: Action) -> rewind_proto::v1::StepResult {
    executor
        .execute(StepCommand {
            step_id: id.into(),
            term: 1,
            service: "web".into(),
            timeout_ms: 30_000,
            cluster_id: "rw-test".into(),
            traceparent: String::new(),
            action: Some(action),
        })
        .await
        .expect("not already running")
}

/// An HTTP server on loopback answering each request with the next scripted status (200 once
/// the script is used up), recording each request's method, path and headers.
struct ScriptedServer {
    url: String,
    seen: Arc<Mutex<Vec<String>>>,
}

async fn scripted_server(statuses: &[u16], body: &'static str) -> ScriptedServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let script = Arc::new(Mutex::new(
        statuses.iter().copied().collect::<VecDeque<_>>(),
    ));
    let recorded = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && socket.read(&mut byte).await.unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            recorded
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&head).into_owned());
            let status = script.lock().unwrap().pop_front().unwrap_or(200);
            let answer = format!(
                "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(answer.as_bytes()).await;
        }
    });
    ScriptedServer { url, seen }
}

#[test]
fn every_problem_in_the_catalogue_sections_is_reported_at_once() {
    let root = tempfile::tempdir().unwrap();
    let sections = format!(
        r#"
reload-command = ["{root}/current/bin/reload"]
[[service.command]]
name = "warm"
argv = ["/usr/bin/warm", "{{region}}", "{{zone}}"]
args = {{ region = "[a-z", unused = "x" }}
[[service.command]]
name = "warm"
argv = ["releases/v1/migrate.sh"]
[service.jobs]
pause = {{ command = ["/usr/bin/jobs", "pause"] }}
checkpoint-file = "../outside"
[[service.purge]]
url = "ftp://cdn"
method = "PATCH"
headers = {{ "bad header" = "x" }}
attempts = 0
[[service.purge]]
url = "https://cdn.example/purge"
method = "BAN"
body = "x"
ca-file = "/no/such/ca.pem"
[[service.purge]]
url = "https://cdn.example/purge"
ca-file = "relative/ca.pem"
[service.scale-up]
command = ["/usr/bin/capacity"]
stages = [50, 25, 200]
[[service.check]]
name = "cart"
url = "http://127.0.0.1:1/cart"
body = "x"
"#,
        root = root.path().display()
    );
    let problems = service_from_toml(root.path(), &sections).unwrap_err();
    let joined = problems.join("\n");
    for expected in [
        "service.web.reload-command: ",
        "runs or reads something from inside a release",
        "service.web.command[0].args.region: \"[a-z\" is not a valid pattern",
        "service.web.command[0].argv: uses {zone}, which args does not declare",
        "service.web.command[0].args.unused: is declared but argv never uses it",
        "service.web.command[1]: \"warm\" is declared twice",
        "service.web.command[1].argv: \"releases/v1/migrate.sh\" runs or reads",
        "service.web.jobs.resume: is required",
        "service.web.jobs.checkpoint-file",
        "service.web.purge[0].url: \"ftp://cdn\" must be an http:// or https:// URL",
        "service.web.purge[0].method: \"PATCH\" must be PURGE, BAN, POST, PUT or DELETE",
        "service.web.purge[1].body: only a POST, PUT or DELETE sends a body",
        "service.web.purge[1].ca-file: cannot read /no/such/ca.pem",
        "service.web.purge[2].ca-file: relative/ca.pem must be an absolute path",
        "service.web.purge[0].headers.bad header",
        "service.web.purge[0].attempts: is 0",
        "service.web.scale-up.command: must use {percent}",
        "service.web.scale-up.stages: [50, 25, 200]",
        "service.web.check[0].body: only a POST sends a body",
    ] {
        assert!(
            joined.contains(expected),
            "{expected} missing from:\n{joined}"
        );
    }
}

#[tokio::test]
async fn only_allow_listed_commands_run_and_only_with_arguments_their_patterns_accept() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("warmed");
    let sections = format!(
        r#"
[[service.command]]
name = "warm-cache"
argv = ["sh", "-c", "echo $0 >> {out}", "{{region}}"]
args = {{ region = "[a-z]+-[a-z]+" }}
"#,
        out = out.display()
    );
    let service = service_from_toml(root.path(), &sections).unwrap();
    let (executor, _data) = executor_for(service);
    let run = |id: &'static str, name: &'static str, args: &[(&str, &str)]| {
        let action = Action::Run(rewind_proto::v1::RunCommand {
            name: name.into(),
            args: args
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
        });
        run_step(&executor, id, action)
    };

    let refused = [
        (
            "rb-1/web/run-1/h",
            "rm",
            vec![("region", "eu-west")],
            "not in the allow-list",
        ),
        (
            "rb-2/web/run-1/h",
            "warm-cache",
            vec![],
            "needs argument region",
        ),
        (
            "rb-3/web/run-1/h",
            "warm-cache",
            vec![("region", "eu-west; rm -rf /")],
            "does not match",
        ),
        (
            "rb-4/web/run-1/h",
            "warm-cache",
            vec![("region", "-rf")],
            "does not match",
        ),
        (
            "rb-5/web/run-1/h",
            "warm-cache",
            vec![("region", "eu-west"), ("path", "/")],
            "takes no argument \"path\"",
        ),
    ];
    for (id, name, args, why) in refused {
        let result = run(id, name, &args).await;
        assert!(!result.ok, "{id} ran");
        assert!(result.detail.contains(why), "{id}: {}", result.detail);
    }
    assert!(!out.exists(), "nothing refused may run");

    let ran = run("rb-6/web/run-1/h", "warm-cache", &[("region", "eu-west")]).await;
    assert!(ran.ok, "{}", ran.detail);
    assert_eq!(fs::read_to_string(&out).unwrap(), "eu-west\n");
}

#[tokio::test]
async fn resume_puts_back_the_checkpoint_a_restore_rolled_back_so_no_work_is_replayed() {
    let root = tempfile::tempdir().unwrap();
    fs::create_dir_all(root.path().join("shared")).unwrap();
    let checkpoint = root.path().join("shared/jobs.checkpoint");
    let log = root.path().join("jobs.log");
    let sections = format!(
        r#"
[service.jobs]
pause = {{ command = ["sh", "-c", "echo pause >> {log}"] }}
resume = {{ command = ["sh", "-c", "echo resume-from-$(cat {checkpoint}) >> {log}"] }}
checkpoint-file = "shared/jobs.checkpoint"
"#,
        log = log.display(),
        checkpoint = checkpoint.display()
    );
    let service = service_from_toml(root.path(), &sections).unwrap();
    let (executor, _data) = executor_for(service);
    fs::write(&checkpoint, "job-42").unwrap();

    let paused = run_step(
        &executor,
        "rb-1/web/pause-jobs/h",
        Action::PauseJobs(Default::default()),
    )
    .await;
    assert!(paused.ok, "{}", paused.detail);
    assert!(
        paused.detail.contains("kept checkpoint"),
        "{}",
        paused.detail
    );
    // The restore puts back the file as captured before the change: an older checkpoint.
    fs::write(&checkpoint, "job-17").unwrap();

    let resumed = run_step(
        &executor,
        "rb-1/web/resume-jobs/h",
        Action::ResumeJobs(Default::default()),
    )
    .await;
    assert!(resumed.ok, "{}", resumed.detail);
    assert!(
        resumed.detail.contains("put back the checkpoint"),
        "{}",
        resumed.detail
    );
    assert_eq!(fs::read_to_string(&checkpoint).unwrap(), "job-42");
    assert_eq!(
        fs::read_to_string(&log).unwrap(),
        "pause\nresume-from-job-42\n"
    );

    // Redelivered, the resume answers from the journal and does not resume twice.
    let again = run_step(
        &executor,
        "rb-1/web/resume-jobs/h",
        Action::ResumeJobs(Default::default()),
    )
    .await;
    assert!(again.replayed);
    assert_eq!(fs::read_to_string(&log).unwrap().lines().count(), 2);
}

#[tokio::test]
async fn purges_are_retried_up_to_their_attempts_and_send_the_configured_method_and_headers() {
    let flaky = scripted_server(&[503], "").await;
    let down = scripted_server(&[503, 503, 503], "").await;
    let root = tempfile::tempdir().unwrap();
    let sections = format!(
        r#"
[[service.purge]]
url = "{flaky}/"
method = "BAN"
headers = {{ "X-Ban-Url" = "^/api/" }}
attempts = 2
"#,
        flaky = flaky.url
    );
    let service = service_from_toml(root.path(), &sections).unwrap();
    let (executor, _data) = executor_for(service);
    let purged = run_step(
        &executor,
        "rb-1/web/purge-cache/h",
        Action::PurgeCache(Default::default()),
    )
    .await;
    assert!(purged.ok, "{}", purged.detail);
    let seen = flaky.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "one failure, one retry");
    assert!(seen[1].starts_with("BAN / HTTP/1.1"), "{}", seen[1]);
    assert!(
        seen[1].to_lowercase().contains("x-ban-url: ^/api/"),
        "{}",
        seen[1]
    );

    let sections = format!("[[service.purge]]\nurl = \"{}/\"\nattempts = 3\n", down.url);
    let service = service_from_toml(root.path(), &sections).unwrap();
    let (executor, _data) = executor_for(service);
    let failed = run_step(
        &executor,
        "rb-2/web/purge-cache/h",
        Action::PurgeCache(Default::default()),
    )
    .await;
    assert!(!failed.ok);
    assert!(
        failed.detail.contains("answered 503") && failed.detail.contains("attempt 3 of 3"),
        "{}",
        failed.detail
    );
    assert_eq!(
        down.seen.lock().unwrap().len(),
        3,
        "bounded: three attempts, no more"
    );
}

#[tokio::test]
async fn scale_up_goes_stage_by_stage_and_stops_at_the_first_unhealthy_stage() {
    let root = tempfile::tempdir().unwrap();
    let capacity = root.path().join("capacity");
    let healthy = root.path().join("healthy");
    let sections = format!(
        r#"
[[service.probe]]
name = "up"
command = ["test", "-f", "{healthy}"]
[service.scale-up]
command = ["sh", "-c", "echo $0 >> {capacity}", "{{percent}}"]
stages = [25, 50, 100]
wait-ms = 10
"#,
        healthy = healthy.display(),
        capacity = capacity.display()
    );
    let service = service_from_toml(root.path(), &sections).unwrap();
    let (executor, _data) = executor_for(service);

    let stopped = run_step(
        &executor,
        "rb-1/web/scale-up/h",
        Action::ScaleUp(Default::default()),
    )
    .await;
    assert!(!stopped.ok);
    assert!(
        stopped.detail.contains("stopped at 25%"),
        "{}",
        stopped.detail
    );
    assert_eq!(fs::read_to_string(&capacity).unwrap(), "25\n");

    fs::write(&healthy, "").unwrap();
    fs::remove_file(&capacity).unwrap();
    let scaled = run_step(
        &executor,
        "rb-2/web/scale-up/h",
        Action::ScaleUp(Default::default()),
    )
    .await;
    assert!(scaled.ok, "{}", scaled.detail);
    assert_eq!(fs::read_to_string(&capacity).unwrap(), "25\n50\n100\n");
}

#[tokio::test]
async fn checks_and_reload_name_what_failed_or_what_is_missing() {
    let server = scripted_server(&[], "{\"items\": []}").await;
    let root = tempfile::tempdir().unwrap();
    let sections = format!(
        r#"
[[service.check]]
name = "cart"
url = "{url}/cart"
body-contains = "items"
[[service.check]]
name = "login"
url = "{url}/login"
method = "POST"
body = "{{}}"
body-contains = "token"
attempts = 1
"#,
        url = server.url
    );
    let service = service_from_toml(root.path(), &sections).unwrap();
    let (executor, _data) = executor_for(service);
    let checked = run_step(
        &executor,
        "rb-1/web/check/h",
        Action::Checks(Default::default()),
    )
    .await;
    assert!(!checked.ok);
    assert!(
        checked.detail.contains("login: the body lacks \"token\"")
            && !checked.detail.contains("cart:"),
        "{}",
        checked.detail
    );
    let seen = server.seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|request| request.starts_with("POST /login"))
    );

    let reload = run_step(
        &executor,
        "rb-1/web/reload/h",
        Action::Reload(Default::default()),
    )
    .await;
    assert!(!reload.ok);
    assert!(
        reload.detail.contains("no reload-command"),
        "{}",
        reload.detail
    );
}

#[test]
fn substitution_is_one_pass_and_patterns_cannot_escape_their_anchors() {
    let values = HashMap::from([
        ("a".to_string(), "{b}".to_string()),
        ("b".to_string(), "x".to_string()),
    ]);
    assert_eq!(
        substitute(&["--{a}={b}".into(), "{c}".into()], &values),
        ["--{b}=x", "{c}"],
        "a value is never expanded again; unknown placeholders stay"
    );
    let root = tempfile::tempdir().unwrap();
    let problems = service_from_toml(
        root.path(),
        "[[service.command]]\nname = \"x\"\nargv = [\"/bin/echo\", \"{v}\"]\nargs = { v = \"a)|(.*\" }\n\
         [[service.command]]\nname = \"y\"\nargv = [\"{prog}\"]\nargs = { prog = \".*\" }\n\
         [[service.command]]\nname = \"z\"\nargv = [\"bash\", \"/srv/x\", \"--script=ROOT/current/run.sh\"]\n"
            .replace("ROOT", &root.path().display().to_string())
            .as_str(),
    )
    .unwrap_err()
    .join("\n");
    for expected in [
        "service.web.command[0].args.v: \"a)|(.*\" is not a valid pattern",
        "service.web.command[1].argv: \"{prog}\": the program itself cannot be a placeholder",
        "service.web.command[2].argv: \"bash /srv/x --script=",
    ] {
        assert!(
            problems.contains(expected),
            "{expected} missing from:\n{problems}"
        );
    }
}

#[test]
fn a_self_revert_policy_without_probes_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let problems = service_from_toml(
        root.path(),
        "[service.self-revert]\noffline-for-s = 100000\n",
    )
    .unwrap_err()
    .join("\n");
    for expected in [
        "service.web.self-revert.offline-for-s: is 100000, must be within 1..=86400",
        "service.web.self-revert: needs at least one probe",
    ] {
        assert!(
            problems.contains(expected),
            "{expected} missing from:\n{problems}"
        );
    }
}

/// A drain waits for the service's own count of active sessions (a command here, reading a
/// file another task empties) instead of a fixed grace, and goes on, saying so, when they
/// outlast it.
#[tokio::test]
async fn a_drain_waits_for_the_sessions_to_end_within_its_grace() {
    let root = tempfile::tempdir().unwrap();
    let count = root.path().join("sessions");
    fs::write(&count, "3\n").unwrap();
    let sections = format!(
        r#"[service.drain]
command = ["true"]
grace-ms = 5000
sessions = {{ command = ["cat", "{count}"], poll-ms = 50 }}
"#,
        count = count.display()
    );
    let service = service_from_toml(root.path(), &sections).unwrap();
    let (executor, _data) = executor_for(service);
    let ends = {
        let count = count.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            fs::write(&count, "0\n").unwrap();
        })
    };
    let drained = run_step(
        &executor,
        "rb-1/web/drain/h1",
        Action::Drain(Default::default()),
    )
    .await;
    ends.await.unwrap();
    assert!(drained.ok, "{}", drained.detail);
    assert!(
        drained.detail.contains("ran true; sessions 3 -> 0 in "),
        "{}",
        drained.detail
    );

    // Sessions that outlast the grace: the drain goes on and says so.
    fs::write(&count, "2\n").unwrap();
    let sections = sections.replace("grace-ms = 5000", "grace-ms = 200");
    let (executor, _data) = executor_for(service_from_toml(root.path(), &sections).unwrap());
    let drained = run_step(
        &executor,
        "rb-2/web/drain/h1",
        Action::Drain(Default::default()),
    )
    .await;
    assert!(drained.ok, "{}", drained.detail);
    assert!(
        drained.detail.contains("sessions 2 -> still 2 after"),
        "{}",
        drained.detail
    );
}

#[test]
fn sessions_are_read_from_a_gauge_summed_over_its_series() {
    let page = "# TYPE active_sessions gauge\nactive_sessions{pool=\"a\"} 2\n\
                active_sessions{pool=\"b\"} 1.5\nother 9\n";
    assert_eq!(sessions_on_page(page, "active_sessions"), Ok(4));
    assert_eq!(
        sessions_on_page(page, "missing"),
        Err("no missing on the page".to_string())
    );
    assert_eq!(
        sessions_on_page("# TYPE served counter\nserved 3\n", "served"),
        Err("served is not a gauge: it cannot count open sessions".to_string())
    );
    let problems = service_from_toml(
        Path::new("/srv/web"),
        "[service.drain]\ncommand = [\"true\"]\nsessions = { metric = \"active_sessions\" }\n\
         [service.undrain]\ncommand = [\"true\"]\n\
         sessions = { url = \"http://127.0.0.1:1/m\", metric = \"s\" }\n",
    )
    .unwrap_err();
    for expected in [
        "service.web.drain.sessions: set url and metric",
        "service.web.undrain.sessions: only a drain waits for sessions to end",
    ] {
        assert!(
            problems.iter().any(|problem| problem.contains(expected)),
            "{expected}: {problems:?}"
        );
    }
    let problems = service_from_toml(
        Path::new("/srv/web"),
        "[service.drain]\ncommand = [\"true\"]\ngrace-ms = 100\n\
         sessions = { command = [\"/srv/web/current/bin/count\"], poll-ms = 500 }\n",
    )
    .unwrap_err();
    for expected in [
        "service.web.drain.sessions.poll-ms: is 500 ms, longer than grace-ms (100)",
        "service.web.drain.sessions.command: ",
    ] {
        assert!(
            problems.iter().any(|problem| problem.contains(expected)),
            "{expected}: {problems:?}"
        );
    }
}

#[tokio::test]
async fn a_client_cache_window_opens_with_its_step_and_closes_once_past_its_end() {
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("switch.log");
    let hook = |word: &str| {
        format!(
            "{{ command = [\"sh\", \"-c\", \"echo {word} >> {}\"] }}",
            log.display()
        )
    };
    let refused = service_from_toml(
        root.path(),
        "[service.client-cache]\non = { command = [\"true\"] }\nwindow-s = 0\n",
    )
    .unwrap_err()
    .join("\n");
    assert!(
        refused.contains("client-cache.off: is required")
            && refused.contains("client-cache.window-s: is 0, must be within 1..=86400"),
        "{refused}"
    );
    let service = service_from_toml(
        root.path(),
        &format!(
            "[service.client-cache]\non = {}\noff = {}\nwindow-s = 60\n",
            hook("on"),
            hook("off")
        ),
    )
    .unwrap();
    let (executor, _data) = executor_for(service.clone());
    let opened = run_step(
        &executor,
        "rb-1/web/clear-client-caches/h1",
        Action::ClearClientCaches(Default::default()),
    )
    .await;
    assert!(opened.ok, "{}", opened.detail);
    let store = executor.store();
    let due = store
        .client_cache_off("web")
        .unwrap()
        .expect("a window is open");
    // A later, shorter window does not end it sooner.
    store.put_client_cache_off("web", due - 30_000).unwrap();
    assert_eq!(store.client_cache_off("web").unwrap(), Some(due));
    // Closing a window whose end moved on does nothing; closing the one recorded runs `off`.
    let host = crate::host::LocalHost;
    let moved = close_client_cache_window(&host, executor.prober(), store, &service, due - 1)
        .await
        .unwrap();
    assert_eq!(moved, None);
    let closed = close_client_cache_window(&host, executor.prober(), store, &service, due)
        .await
        .unwrap();
    assert!(closed.is_some());
    assert_eq!(store.client_cache_off("web").unwrap(), None);
    assert_eq!(fs::read_to_string(&log).unwrap(), "on\noff\n");
}

#[test]
fn drift_ignore_names_the_services_own_files_and_reconcile_needs_a_hook() {
    let root = tempfile::tempdir().unwrap();
    let refused = service_from_toml(
        root.path(),
        "config-files = [\"app.toml\"]\ndrift-ignore = [\"cursor\"]\n[service.reconcile]\ntimeout-ms = 1000\n",
    )
    .unwrap_err()
    .join("\n");
    assert!(
        refused.contains(
            "drift-ignore: \"cursor\" is not one of the service's config-files or env-files"
        ),
        "{refused}"
    );
    assert!(refused.contains("reconcile"), "{refused}");
    let service = service_from_toml(
        root.path(),
        "config-files = [\"app.toml\", \"cursor\"]\ndrift-ignore = [\"cursor\"]\n",
    )
    .unwrap();
    assert_eq!(service.drift_ignore, vec!["cursor"]);
}
