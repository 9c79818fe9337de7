//! The web view, in a real browser: headless Chromium signs in with a viewer token, opens a
//! rollback while it runs, and watches it move to succeeded with no reload (server-sent
//! events); the page shows its waves, every host's steps, the gate and its evidence, the
//! explanation, the timeline and the audit chain's status. A wrong token, no token, and a
//! viewer whose scope does not reach the rollback are refused by the access policy as the API
//! refuses them. The screenshots the README shows are taken here.

use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_tests::clients::workspace;
use rewind_tests::*;
use sha2::{Digest, Sha256};

/// Bound to the `auditors` group, which the policy lets read everything.
const AUDITOR_TOKEN: &str = "auditor-0123456789abcdef0123456789abcdef";
/// Stan may read `staging/*` only.
const STAN_TOKEN: &str = "stan-0123456789abcdef0123456789abcdef0123";
/// Vic is bound to `watchers`, a binding the test takes away while Vic watches.
const VIC_TOKEN: &str = "vic-0123456789abcdef0123456789abcdef01234";

const POLICY: &str = r#"
[[binding]]
name = "operator-admin"
role = "admin"
identities = ["user:operator"]
scopes = ["*"]

[[binding]]
name = "auditors"
role = "viewer"
groups = ["auditors"]
scopes = ["*"]

[[binding]]
name = "staging-viewers"
role = "viewer"
identities = ["user:stan"]
scopes = ["staging/*"]
"#;

const WATCHERS: &str = r#"
[[binding]]
name = "watchers"
role = "viewer"
groups = ["watchers"]
scopes = ["*"]
"#;

fn viewer(name: &str, groups: &str, token: &str) -> String {
    format!(
        "[[viewer]]\nname = \"{name}\"\ngroups = [{groups}]\ntoken-sha256 = \"{}\"\n",
        hex::encode(Sha256::digest(token.as_bytes()))
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_browser_watches_a_rollback_run_to_success_live() {
    let dir = tempfile::tempdir().unwrap();
    let viewers = dir.path().join("viewers.toml");
    std::fs::write(
        &viewers,
        viewer("ann", "\"auditors\"", AUDITOR_TOKEN)
            + &viewer("stan", "", STAN_TOKEN)
            + &viewer("vic", "\"watchers\"", VIC_TOKEN),
    )
    .unwrap();
    let coordinator = Coordinator::must_start_with(
        &dir.path().join("coordinator"),
        &format!(
            "[http]\nlisten = \"127.0.0.1:0\"\nviewer-tokens-file = \"{}\"\n\n[audit]\nverify-every-s = 10\n",
            viewers.display()
        ),
    );
    let base = format!("http://{}", coordinator.http_address);
    let (hosts, mut client) = must_start_hosts(dir.path(), &coordinator, &["web-1", "web-2"]).await;
    client
        .apply_policy(pb::ApplyPolicyRequest {
            toml: format!("{POLICY}{WATCHERS}"),
            reason: "the test's roles".into(),
            ..Default::default()
        })
        .await
        .expect("apply the test policy");
    must_deploy_v1_then_v2(&mut client, &hosts).await;

    // Signed out, a page sends the browser to sign in; a wrong token is refused there.
    let mut browser = Browser::must_start();
    browser.must_open(&format!("{base}/ui"));
    assert_eq!(browser.evaluate("location.pathname"), "/ui/sign-in");
    let sign_in_with = |token: &str| {
        format!(
            "document.getElementById('token').value = {token:?}; \
             document.querySelector('form[action=\"/ui/sign-in\"]').submit(); true"
        )
    };
    browser.evaluate(&sign_in_with(&"x".repeat(40)));
    browser.must_wait_for(
        Duration::from_secs(10),
        "the wrong token refused",
        "document.getElementById('problem') !== null && \
         document.getElementById('problem').textContent.includes('not one of this cluster')",
    );
    browser.evaluate(&sign_in_with(AUDITOR_TOKEN));
    browser.must_wait_for(
        Duration::from_secs(10),
        "the overview after signing in",
        "location.pathname === '/ui' && document.querySelector('.viewer') !== null",
    );
    assert!(
        browser
            .evaluate("document.querySelector('.viewer').textContent")
            .as_str()
            .unwrap()
            .contains("user:ann")
    );

    // A rollback whose gate settles long enough to be seen running; its reason holds markup,
    // which must reach the page as text.
    let reason = "bad release <script>window.injected = true</script>";
    let started = client
        .start_rollback(pb::StartRollbackRequest {
            request_id: "rb".into(),
            change_id: "ch-2".into(),
            reason: reason.into(),
            options: Some(pb::PlanOptions {
                gate: Some(pb::GateOptions {
                    settle_s: 5,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let rollback_id = started.rollback.unwrap().rollback_id;
    browser.must_open(&format!("{base}/ui/rollbacks/{rollback_id}"));
    browser.must_wait_for(
        Duration::from_secs(20),
        "the page to show the rollback running, live",
        "document.getElementById('state').dataset.state === 'running' && \
         document.getElementById('stream-status').textContent.startsWith('live')",
    );
    // Set once: a reload would lose it.
    browser.evaluate("window.loadedOnce = true");
    let screenshots = workspace().join("target").join("screenshots");
    browser.must_screenshot(&screenshots.join("web-view-running.png"));

    // Paused, so what follows happens while it runs, however slow the machine: the page
    // follows the pause live.
    client
        .pause_rollback(pb::RollbackActionRequest {
            request_id: "pause".into(),
            rollback_id: rollback_id.clone(),
            reason: "a look before it goes on".into(),
            ..Default::default()
        })
        .await
        .expect("pause the rollback");
    browser.must_wait_for(
        Duration::from_secs(20),
        "the page to show the rollback paused",
        "document.getElementById('state').dataset.state === 'paused'",
    );

    // Vic watches too, without a browser, until the policy stops binding Vic's group: the
    // live view is judged again at its next update and ends, saying why.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let live = format!("{base}/ui/rollbacks/{rollback_id}/live");
    let mut vic = http.get(&live).bearer_auth(VIC_TOKEN).send().await.unwrap();
    assert_eq!(vic.status(), 200);
    assert_eq!(vic.headers()["content-type"], "text/event-stream");
    let seen = must_read_until(&mut vic, "event: live").await;
    assert!(seen.contains("data-state=\"paused\""), "{seen}");
    client
        .apply_policy(pb::ApplyPolicyRequest {
            toml: POLICY.into(),
            reason: "vic no longer watches".into(),
            ..Default::default()
        })
        .await
        .expect("apply the policy without watchers");
    let ended = must_read_until(&mut vic, "event: problem").await;
    assert!(ended.contains("user:vic may not"), "{ended}");

    // A browser session's live view ends when it signs out, at the next update.
    let host = coordinator.http_address.clone();
    let cookie = must_sign_in(&http, &base, &host, AUDITOR_TOKEN).await;
    let mut signed_in = http
        .get(&live)
        .header("cookie", cookie.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status(), 200);
    must_read_until(&mut signed_in, "event: live").await;
    let signed_out = http
        .post(format!("{base}/ui/sign-out"))
        .header("cookie", cookie.clone())
        .header("origin", format!("http://{host}"))
        .send()
        .await
        .unwrap();
    assert_eq!(signed_out.status(), 303);
    client
        .resume_rollback(pb::RollbackActionRequest {
            request_id: "resume".into(),
            rollback_id: rollback_id.clone(),
            reason: "looked".into(),
            ..Default::default()
        })
        .await
        .expect("resume the rollback");
    let ended = must_read_until(&mut signed_in, "event: problem").await;
    assert!(ended.contains("signed out"), "{ended}");

    // Up to the gate's own timeout (120 s) and more: a loaded machine reports health late.
    let succeeded = browser.wait_for(
        Duration::from_secs(180),
        "document.getElementById('state').dataset.state === 'succeeded'",
    );
    if let Err(shown) = succeeded {
        let log =
            std::fs::read_to_string(coordinator.dir.join("coordinator.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        panic!(
            "the page did not show the rollback succeeded; it showed:\n{shown}\n\
             the coordinator's last lines:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    assert_eq!(
        browser.evaluate("window.loadedOnce === true"),
        true,
        "the page reloaded"
    );
    browser.must_wait_for(
        Duration::from_secs(10),
        "the stream to end",
        "document.getElementById('stream-status').textContent === 'ended'",
    );
    let text = browser
        .evaluate("document.body.innerText")
        .as_str()
        .unwrap()
        .to_string();
    for expected in [
        "Wave 0: web",
        "web-1",
        "web-2",
        "Health gate: succeeded",
        "healthy",
        "Explanation",
        "Timeline",
        "started by user:operator",
        reason,
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} not on the page:\n{text}"
        );
    }
    // Every host's every step shows, succeeded.
    let steps = browser
        .evaluate("Array.from(document.querySelectorAll('td.step')).map(cell => cell.className)");
    let steps = steps.as_array().unwrap();
    assert!(steps.len() >= 6, "{steps:?}");
    assert!(
        steps.iter().all(|class| class == "step succeeded"),
        "{steps:?}"
    );
    // The reason's markup stayed text: the page runs its own script only.
    assert_eq!(browser.evaluate("window.injected === undefined"), true);
    assert_eq!(browser.evaluate("document.scripts.length"), 1);
    // The audit chain as this member last checked it (every 10 s here): the viewer may verify it.
    let page = format!("{base}/ui/rollbacks/{rollback_id}");
    must_wait(Duration::from_secs(30), "the audit chain verified", || {
        browser.must_open(&page);
        (browser.evaluate("document.getElementById('audit').dataset.intact") == "yes").then_some(())
    });
    browser.must_screenshot(&screenshots.join("web-view-succeeded.png"));
    browser.must_open(&format!("{base}/ui"));
    assert!(
        browser
            .evaluate("document.getElementById('rollbacks').innerText")
            .as_str()
            .unwrap()
            .contains(&rollback_id)
    );
    browser.must_screenshot(&screenshots.join("web-view-overview.png"));

    // Without a browser: no token, a wrong one, and a viewer the policy keeps out.
    let answer = http.get(&live).send().await.unwrap();
    assert_eq!(answer.status(), 401);
    assert_eq!(
        answer.headers()["www-authenticate"],
        "Bearer realm=\"rewind\""
    );
    let answer = http
        .post(format!("{base}/ui/sign-in"))
        .form(&[("token", "y".repeat(40))])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 401);
    for url in [format!("{base}/ui/rollbacks/{rollback_id}"), live] {
        let answer = http.get(&url).bearer_auth(STAN_TOKEN).send().await.unwrap();
        assert_eq!(answer.status(), 403, "{url}");
        let page = answer.text().await.unwrap();
        assert!(page.contains("user:stan may not"), "{page}");
    }
    // Stan may list (nothing of production) but not verify the audit chain: no status shown.
    let overview = |token: &'static str| {
        let http = http.clone();
        let base = base.clone();
        async move {
            let answer = http
                .get(format!("{base}/ui"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 200);
            answer.text().await.unwrap()
        }
    };
    assert!(!overview(STAN_TOKEN).await.contains("id=\"audit\""));
    assert!(overview(AUDITOR_TOKEN).await.contains("id=\"audit\""));

    // Every answer forbids framing, caching and any script but the view's own.
    let form = http.get(format!("{base}/ui/sign-in")).send().await.unwrap();
    let policy = form.headers()["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("script-src 'self'") && policy.contains("frame-ancestors 'none'"));
    assert_eq!(form.headers()["x-frame-options"], "DENY");
    assert_eq!(form.headers()["cache-control"], "no-store");

    // A sign-in posted from another site is refused.
    let elsewhere = http
        .post(format!("{base}/ui/sign-in"))
        .header("origin", "http://attacker.example")
        .form(&[("token", AUDITOR_TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(elsewhere.status(), 403);

    // Signing in gives a session, not the token; signing out ends it on the server, so a
    // copy of the cookie is refused after.
    let signed_in = http
        .post(format!("{base}/ui/sign-in"))
        .header("origin", format!("http://{host}"))
        .form(&[("token", AUDITOR_TOKEN), ("next", "/ui/changes/ch-2")])
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status(), 303);
    assert_eq!(signed_in.headers()["location"], "/ui/changes/ch-2");
    let set_cookie = signed_in.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_string();
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/ui", "Max-Age=43200"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    assert!(!set_cookie.contains(AUDITOR_TOKEN), "{set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let with_cookie = || {
        http.get(format!("{base}/ui/changes/ch-2"))
            .header("cookie", cookie.clone())
            .send()
    };
    assert_eq!(with_cookie().await.unwrap().status(), 200);
    let from_elsewhere = http
        .post(format!("{base}/ui/sign-out"))
        .header("cookie", cookie.clone())
        .header("origin", "http://attacker.example")
        .send()
        .await
        .unwrap();
    assert_eq!(from_elsewhere.status(), 403);
    assert_eq!(with_cookie().await.unwrap().status(), 200);
    http.post(format!("{base}/ui/sign-out"))
        .header("cookie", cookie.clone())
        .header("origin", format!("http://{host}"))
        .send()
        .await
        .unwrap();
    let after = with_cookie().await.unwrap();
    assert_eq!(after.status(), 303);
    assert_eq!(
        after.headers()["location"],
        "/ui/sign-in?next=/ui/changes/ch-2"
    );

    // The refusal is audited like a refused call.
    must_wait_async(Duration::from_secs(10), "stan's refusal audited", || {
        let client = client.clone();
        async move {
            let entries = must_list_audit(&client).await;
            entries
                .iter()
                .any(|entry| entry.identity == "user:stan")
                .then_some(())
        }
    })
    .await;
}

/// Reads a live view's events until `needle` shows, within 30 s; everything read so far.
async fn must_read_until(stream: &mut reqwest::Response, needle: &str) -> String {
    let mut seen = String::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while !seen.contains(needle) {
            match stream.chunk().await.unwrap() {
                Some(chunk) => seen += &String::from_utf8_lossy(&chunk),
                None => panic!("the stream ended before {needle:?}:\n{seen}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {needle:?} within 30 s:\n{seen}"));
    seen
}

/// Signs in as a browser would; the session cookie (`name=value`).
async fn must_sign_in(http: &reqwest::Client, base: &str, host: &str, token: &str) -> String {
    let answer = http
        .post(format!("{base}/ui/sign-in"))
        .header("origin", format!("http://{host}"))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 303);
    let set_cookie = answer.headers()["set-cookie"].to_str().unwrap();
    set_cookie.split(';').next().unwrap().to_string()
}
