//! What a person does to a rollback in flight, on real agents: pause it, leave one host
//! unreverted (`skip-host`), follow it to its end with `rollback watch`; and on the next one,
//! take the service out of rotation instead of reverting it (`isolate`, the circuit breaker).

use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_proto::v1::control_service_client::ControlServiceClient;
use rewind_tests::{
    Coordinator, TestHost, must_deploy_v1_then_v2, must_list_audit, must_rollback_end,
    must_start_hosts, must_wait_async,
};
use tonic::transport::Channel;

const HOSTS: [&str; 3] = ["web-1", "web-2", "web-3"];

/// Starts a rollback of `change` one host at a time and pauses it at once; returns it paused.
async fn must_start_paused(
    client: &mut ControlServiceClient<Channel>,
    change: &str,
    tag: &str,
) -> pb::Rollback {
    let rollback = client
        .start_rollback(pb::StartRollbackRequest {
            request_id: format!("rollback-{tag}"),
            change_id: change.into(),
            reason: format!("test {tag}"),
            max_parallel: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rollback
        .unwrap();
    client
        .pause_rollback(action(&rollback.rollback_id, &format!("pause-{tag}")))
        .await
        .unwrap();
    must_wait_async(Duration::from_secs(60), "the rollback to pause", || {
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
            let quiet = rollback
                .steps
                .iter()
                .all(|step| step.state != pb::StepState::Running as i32);
            (rollback.state == pb::RollbackState::Paused as i32 && quiet).then_some(rollback)
        }
    })
    .await
}

fn action(rollback_id: &str, request_id: &str) -> pb::RollbackActionRequest {
    pb::RollbackActionRequest {
        request_id: request_id.into(),
        rollback_id: rollback_id.into(),
        reason: "the on-call engineer decides".into(),
        ..Default::default()
    }
}

/// The hosts none of whose steps has begun (of `candidates`), in the plan's order.
fn untouched_hosts(rollback: &pb::Rollback, candidates: &[&str]) -> Vec<String> {
    let untouched: Vec<String> = candidates
        .iter()
        .filter(|host| {
            rollback
                .steps
                .iter()
                .filter(|step| step.host_id == **host)
                .all(|step| step.state == pb::StepState::Pending as i32)
        })
        .map(|host| host.to_string())
        .collect();
    assert!(
        !untouched.is_empty(),
        "every host began before the pause: {rollback:?}"
    );
    untouched
}

fn rotation(host: &TestHost) -> Vec<String> {
    std::fs::read_to_string(host.root.join("rotation"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_person_skips_a_host_watches_the_rollback_end_and_isolates_a_service() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    let (hosts, mut client) = must_start_hosts(dir.path(), &coordinator, &HOSTS).await;
    must_deploy_v1_then_v2(&mut client, &hosts).await;

    // Skip a host that has not begun; resume; watch the rollback to its end.
    let paused = must_start_paused(&mut client, "ch-2", "skip").await;
    let skipped = untouched_hosts(&paused, &HOSTS).pop().unwrap();
    client
        .skip_host(pb::RollbackActionRequest {
            host_id: skipped.clone(),
            ..action(&paused.rollback_id, "skip")
        })
        .await
        .unwrap();
    // Watch from before the resume: it shows the pause, then follows the rollback to its end.
    let watch = tokio::process::Command::new(rewind_tests::must_binary("rewindctl"))
        .args([
            "--coordinator",
            &coordinator.address,
            "rollback",
            "watch",
            &paused.rollback_id,
        ])
        .env("REWIND_TLS_DIR", coordinator.tls_dir())
        .env("REWIND_SERVER_NAME", "localhost")
        .kill_on_drop(true)
        .output();
    let watch = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(180), watch)
            .await
            .expect("rollback watch ends when the rollback does")
            .expect("run rewindctl rollback watch")
    });
    // And through the API, asking for changes only; once more with pages of two steps, as a
    // rollback of more steps than one message holds arrives.
    let watch_changes = |steps_page_size| {
        let mut client = client.clone();
        let rollback_id = paused.rollback_id.clone();
        tokio::spawn(async move {
            let mut changes = client
                .watch_rollback(pb::GetRollbackRequest {
                    rollback_id,
                    changes_only: true,
                    steps_page_size,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let mut updates = Vec::new();
            while let Some(update) = tokio_stream::StreamExt::next(&mut changes).await {
                updates.push(update.unwrap());
            }
            updates
        })
    };
    let changes = watch_changes(0);
    let paged_changes = watch_changes(2);
    // A watch of whole rollbacks sends each in one message (pages are for changes_only).
    let mut whole = client
        .watch_rollback(pb::GetRollbackRequest {
            rollback_id: paused.rollback_id.clone(),
            steps_page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let whole_first = tokio_stream::StreamExt::next(&mut whole)
        .await
        .unwrap()
        .unwrap();
    let whole_first = whole_first.rollback.unwrap();
    assert_eq!(whole_first.steps.len(), whole_first.steps_total as usize);
    assert!(whole_first.steps.len() > 2, "{whole_first:?}");
    drop(whole);
    tokio::time::sleep(Duration::from_secs(1)).await;
    client
        .resume_rollback(action(&paused.rollback_id, "resume"))
        .await
        .unwrap();
    let watched = watch.await.unwrap();
    let watch_output = String::from_utf8_lossy(&watched.stdout);
    assert!(
        watched.status.success(),
        "rollback watch exits 0 when the rollback succeeds:\n{watch_output}\n{}",
        String::from_utf8_lossy(&watched.stderr)
    );
    for host in HOSTS {
        assert!(watch_output.contains(host), "{host} in:\n{watch_output}");
    }
    assert!(
        watch_output.contains("PAUSED:") && watch_output.to_lowercase().contains("succeeded"),
        "the watch saw the pause and the end:\n{watch_output}"
    );
    let ended = must_rollback_end(&client, &paused.rollback_id).await;
    assert_eq!(
        ended.state,
        pb::RollbackState::Succeeded as i32,
        "{ended:?}"
    );
    // The first update is the whole rollback; each later one only the steps that changed, and
    // the waves only when one did; applied in order they give the rollback as it ended.
    let updates = changes.await.unwrap();
    assert!(updates.len() > 3, "{updates:?}");
    let first = updates[0].rollback.clone().unwrap();
    assert!(!updates[0].changes_only);
    assert_eq!(first.steps.len(), ended.steps.len());
    must_add_up_to(&updates, &ended);
    // In pages of two: the first update comes as messages of two steps alone, its last one
    // holding the rest of the rollback and saying how many steps there are.
    let paged = paged_changes.await.unwrap();
    let first_page = paged[0].rollback.clone().unwrap();
    assert!(!paged[0].changes_only && paged[0].more_follows);
    assert_eq!(first_page.steps.len(), 2, "{first_page:?}");
    let first_update = paged
        .iter()
        .position(|message| !message.more_follows)
        .unwrap();
    assert!(
        paged[..=first_update]
            .iter()
            .all(|message| !message.changes_only)
    );
    let last_of_first = paged[first_update].rollback.clone().unwrap();
    assert_eq!(last_of_first.steps_total as usize, ended.steps.len());
    let first_steps: usize = (paged[..=first_update].iter())
        .map(|message| message.rollback.as_ref().unwrap().steps.len())
        .sum();
    assert_eq!(first_steps, ended.steps.len());
    assert!(
        paged
            .iter()
            .all(|update| update.rollback.as_ref().unwrap().steps.len() <= 2)
    );
    must_add_up_to(&paged, &ended);
    must_read_in_pages(&client, &ended).await;
    // An explanation holds the page size it is asked for, and no later page.
    let explained = client
        .clone()
        .explain_rollback(pb::GetRollbackRequest {
            rollback_id: ended.rollback_id.clone(),
            steps_page_size: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rollback
        .unwrap();
    assert_eq!(explained.steps, ended.steps[..3]);
    let refused = client
        .clone()
        .explain_rollback(pb::GetRollbackRequest {
            rollback_id: ended.rollback_id.clone(),
            steps_page_token: "3".into(),
            ..Default::default()
        })
        .await
        .expect_err("a token is for GetRollback");
    assert!(
        refused.message().contains("steps_page_token"),
        "{refused:?}"
    );
    for host in &hosts {
        if host.id == skipped {
            assert_eq!(
                host.current_link(),
                "releases/v2",
                "{} was skipped",
                host.id
            );
            assert!(
                ended
                    .steps
                    .iter()
                    .filter(|step| step.host_id == skipped)
                    .all(|step| step.state == pb::StepState::Skipped as i32),
                "{ended:?}"
            );
            assert!(
                rotation(host).last().is_none_or(|last| last == "undrain"),
                "{} left in rotation",
                host.id
            );
        } else {
            host.must_be_restored_to_v1();
        }
    }
    let audit = must_list_audit(&client).await;
    assert!(
        audit
            .iter()
            .any(|entry| entry.action == "rollback.skip-host"
                && format!("{entry:?}").contains(&skipped)),
        "the skip is audited"
    );

    // Isolate: web stops being reverted; nothing failed, so the person names the region to
    // take out: hosts the rollback had begun stay out, and max_unavailable (1) more is drained
    // through its hook; the others keep serving.
    let change = rewind_tests::must_deploy_web(&client, "v2", &[]).await;
    // Hosts whose state before this change is v1: a revert would put them back on v1.
    let paused = must_start_paused(&mut client, &change, "isolate").await;
    let reverts_to_v1: Vec<&str> = HOSTS
        .iter()
        .copied()
        .filter(|host| *host != skipped)
        .collect();
    let untouched = untouched_hosts(&paused, &reverts_to_v1);
    let restarts_before: Vec<usize> = hosts.iter().map(TestHost::restarts).collect();
    // Hosts the rollback began and had not finished when it paused stay out.
    let begun: Vec<String> = HOSTS
        .iter()
        .filter(|host| {
            let steps = || paused.steps.iter().filter(|step| step.host_id == **host);
            steps().any(|step| step.attempts > 0)
                && steps().any(|step| {
                    step.state == pb::StepState::Pending as i32
                        || step.state == pb::StepState::Running as i32
                })
        })
        .map(|host| host.to_string())
        .collect();
    client
        .isolate_service(pb::RollbackActionRequest {
            service: "web".into(),
            region: "test-1".into(),
            ..action(&paused.rollback_id, "isolate")
        })
        .await
        .unwrap();
    // Isolating goes on by itself with what is left (here, nothing).
    let ended = must_rollback_end(&client, &paused.rollback_id).await;
    assert_eq!(
        ended.state,
        pb::RollbackState::Succeeded as i32,
        "{ended:?}"
    );
    let isolation = ended
        .waves
        .iter()
        .find(|wave| wave.isolation)
        .expect("an isolation wave");
    assert_eq!(isolation.region, "test-1");
    let fresh = HOSTS.len() - begun.len();
    assert!(
        begun.iter().all(|host| isolation.hosts.contains(host))
            && isolation.hosts.len() == begun.len() + fresh.min(1),
        "begun {begun:?} stay out, and max_unavailable more: {isolation:?}"
    );
    for host in hosts
        .iter()
        .filter(|host| isolation.hosts.contains(&host.id))
    {
        must_wait_async(Duration::from_secs(60), "the drain hook", || async {
            (rotation(host).last().map(String::as_str) == Some("drain")).then_some(())
        })
        .await;
    }
    for host in hosts
        .iter()
        .filter(|host| !isolation.hosts.contains(&host.id))
    {
        assert_ne!(
            rotation(host).last().map(String::as_str),
            Some("drain"),
            "{} keeps serving",
            host.id
        );
    }
    for (host, restarts) in hosts.iter().zip(restarts_before) {
        if !untouched.contains(&host.id) {
            continue;
        }
        assert_eq!(
            host.current_link(),
            "releases/v2",
            "{}: an isolated service is not reverted further: {ended:?}",
            host.id
        );
        assert_eq!(host.restarts(), restarts, "{} was not restarted", host.id);
        assert!(
            ended
                .steps
                .iter()
                .filter(|step| step.host_id == host.id && step.kind == "restore")
                .all(|step| step.state != pb::StepState::Succeeded as i32),
            "{}: no restore: {ended:?}",
            host.id
        );
    }
}

/// Applied in order, a watch's updates give the rollback as it ended: after the first, each
/// holds only steps that changed, and the waves only when one did. An update of more steps
/// than a message holds comes as pages of steps alone (`more_follows`), then its last message.
fn must_add_up_to(messages: &[pb::GetRollbackResponse], ended: &pb::Rollback) {
    let mut updates: Vec<(bool, pb::Rollback)> = Vec::new();
    let mut pending = Vec::new();
    for message in messages {
        let rollback = message.rollback.clone().unwrap();
        if message.more_follows {
            let steps_alone = pb::Rollback {
                rollback_id: rollback.rollback_id.clone(),
                steps: rollback.steps.clone(),
                ..Default::default()
            };
            assert_eq!(rollback, steps_alone, "a page holds steps alone");
            pending.extend(rollback.steps);
            continue;
        }
        let steps = [std::mem::take(&mut pending), rollback.steps.clone()].concat();
        updates.push((message.changes_only, pb::Rollback { steps, ..rollback }));
    }
    assert!(pending.is_empty(), "the last message ends its update");
    let (first_is_changes, first) = updates[0].clone();
    assert!(!first_is_changes);
    assert_eq!(first.steps.len(), ended.steps.len());
    let mut steps: std::collections::HashMap<String, pb::RollbackStep> = first
        .steps
        .into_iter()
        .map(|step| (step.step_id.clone(), step))
        .collect();
    let mut waves = first.waves;
    for (changes_only, changed) in &updates[1..] {
        assert!(changes_only, "{changed:?}");
        assert!(
            changed.steps.len() < ended.steps.len(),
            "an update carries what changed, not every step: {changed:?}"
        );
        for step in changed.steps.iter().cloned() {
            assert_ne!(steps.get(&step.step_id), Some(&step), "unchanged: {step:?}");
            steps.insert(step.step_id.clone(), step);
        }
        if !changed.waves.is_empty() {
            waves = changed.waves.clone();
        }
    }
    let last = &updates.last().unwrap().1;
    assert_eq!(last.state, ended.state);
    assert_eq!(waves, ended.waves);
    assert_eq!(steps.len(), ended.steps.len());
    for step in &ended.steps {
        assert_eq!(steps.get(&step.step_id), Some(step));
    }
}

/// GetRollback a page at a time: pages of two add up to every step, in order, each naming the
/// next; a token from nowhere and an oversized page are refused naming their field.
async fn must_read_in_pages(client: &ControlServiceClient<Channel>, ended: &pb::Rollback) {
    assert_eq!(ended.steps_total as usize, ended.steps.len());
    let mut steps = Vec::new();
    let mut steps_page_token = String::new();
    loop {
        let page = client
            .clone()
            .get_rollback(pb::GetRollbackRequest {
                rollback_id: ended.rollback_id.clone(),
                steps_page_size: 2,
                steps_page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let rollback = page.rollback.unwrap();
        assert!(rollback.steps.len() <= 2, "{rollback:?}");
        steps.extend(rollback.steps);
        if page.next_steps_page_token.is_empty() {
            break;
        }
        steps_page_token = page.next_steps_page_token;
    }
    assert_eq!(steps, ended.steps);
    for (steps_page_size, steps_page_token, field) in [
        (0, "most", "steps_page_token"),
        (0, "999", "steps_page_token"),
        (10_001, "", "steps_page_size"),
    ] {
        let refused = client
            .clone()
            .get_rollback(pb::GetRollbackRequest {
                rollback_id: ended.rollback_id.clone(),
                steps_page_size,
                steps_page_token: steps_page_token.into(),
                ..Default::default()
            })
            .await
            .expect_err(field);
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains(field), "{refused:?}");
    }
}
