//! Audit retention on a real coordinator: nothing is dropped before an export covering it is
//! confirmed, a confirmation that does not match the cluster's chain is refused, a crash
//! between the confirmation and the pruning loses nothing, and after pruning the archive and
//! the cluster's entries verify as one chain. An entry is redacted in the cluster too.

use std::path::Path;
use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_tests::{Coordinator, must_verify_audit, plain_service};

use rewind_tests::output_text as text;

fn must_ctl(coordinator: &Coordinator, args: &[&str]) -> String {
    let output = coordinator.rewindctl(args);
    assert!(output.status.success(), "{args:?}: {}", text(&output));
    text(&output)
}

fn manifest(file: &Path) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(format!("{}.manifest.json", file.display())).unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn archived_entries_alone_leave_and_the_chain_verifies_across_the_gap() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = Coordinator::must_start_with(
        &dir.path().join("coordinator"),
        "[audit]\nretain-entries = 3\n",
    );
    let mut client = coordinator.must_client().await;
    for number in 0..10 {
        client
            .put_service(pb::PutServiceRequest {
                request_id: format!("svc-{number}"),
                service: Some(plain_service(&format!("svc-{number}"))),
            })
            .await
            .unwrap();
    }
    // Retention is on, but nothing is archived: everything stays.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(must_verify_audit(&client).await.first_index, 1);

    let archive = dir.path().join("archive.jsonl");
    must_ctl(
        &coordinator,
        &["audit", "export", "--out", archive.to_str().unwrap()],
    );
    let archived = manifest(&archive);
    let through = archived["last_index"].as_u64().unwrap();
    let hash = archived["manifest_hash"].as_str().unwrap().to_string();

    // A hash that is not this export's, and one past what exists, are refused.
    let confirm = |coordinator: &Coordinator, through: u64, hash: &str| {
        let through = through.to_string();
        coordinator.rewindctl(&[
            "audit",
            "archived",
            "--through",
            &through,
            "--manifest-hash",
            hash,
            "--reason",
            "s3://audit/2026",
        ])
    };
    for (through, hash) in [(through, "ab".repeat(32)), (through + 100, hash.clone())] {
        let output = confirm(&coordinator, through, &hash);
        assert!(!output.status.success(), "{}", text(&output));
        assert!(text(&output).contains("manifest hash"), "{}", text(&output));
    }
    assert_eq!(must_verify_audit(&client).await.archived_through, 0);

    // Confirmed with a crash point armed before the pruning: the coordinator dies there.
    coordinator.must_restart_with_failpoints("coordinator.before-audit-prune");
    // The engine may reach its crash point before the answer is sent: the answer is not what
    // this checks, the confirmation's survival is.
    let _ = confirm(&coordinator, through, &hash);
    coordinator.must_exit_within(Duration::from_secs(60));
    // Back up: the confirmation held, and the pruning happens now.
    coordinator.must_restart();
    client = coordinator.must_client().await;
    let mut verification = must_verify_audit(&client).await;
    for _ in 0..60 {
        verification = must_verify_audit(&client).await;
        if verification.first_index > 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        verification.first_index > 1,
        "never pruned: {verification:?}"
    );
    assert_eq!(verification.archived_through, through);
    // Only archived entries went, and the cluster goes on from the archive's hash there.
    let pruned_through = verification.first_index - 1;
    assert!(pruned_through <= through, "{verification:?}");
    let archive_lines: Vec<serde_json::Value> = std::fs::read_to_string(&archive)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(
        archive_lines[pruned_through as usize - 1]["hash"],
        verification.anchor_hash.as_str()
    );
    let shown = must_ctl(&coordinator, &["audit", "verify"]);
    assert!(shown.contains("archived and dropped"), "{shown}");
    // A listing from the start says where the archived entries went and starts where the
    // cluster's do.
    let listed = coordinator.rewindctl(&["audit", "list", "--page-size", "1"]);
    let said = text(&listed);
    assert!(listed.status.success(), "{said}");
    assert!(
        said.contains(&format!(
            "entries 1..{pruned_through} were archived and pruned from the cluster"
        )),
        "{said}"
    );
    assert!(
        said.contains(&format!("│ {}", pruned_through + 1)),
        "{said}"
    );

    // The archive and an export of what the cluster holds after it verify as one chain.
    let rest = dir.path().join("rest.jsonl");
    must_ctl(
        &coordinator,
        &[
            "audit",
            "export",
            "--out",
            rest.to_str().unwrap(),
            "--after",
            &through.to_string(),
        ],
    );
    let output = rewind_tests::rewindctl_offline(&[
        "audit",
        "verify",
        "--file",
        archive.to_str().unwrap(),
        "--file",
        rest.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", text(&output));
    // The archive against the hash the cluster confirmed; another hash does not pass.
    let against = |hash: &str| {
        let file = archive.to_str().unwrap();
        rewind_tests::rewindctl_offline(&[
            "audit",
            "verify",
            "--manifest-hash",
            hash,
            "--file",
            file,
        ])
    };
    let confirmed = against(&hash);
    assert!(confirmed.status.success(), "{}", text(&confirmed));
    let other = against(&"cd".repeat(32));
    assert!(
        !other.status.success() && text(&other).contains("not the export the cluster confirmed"),
        "{}",
        text(&other)
    );
    // An export from the start now begins where the cluster does, from the archive's hash.
    let held = dir.path().join("held.jsonl");
    must_ctl(
        &coordinator,
        &["audit", "export", "--out", held.to_str().unwrap()],
    );
    assert_eq!(manifest(&held)["first_index"], verification.first_index);
    assert_eq!(
        manifest(&held)["anchor_hash"],
        verification.anchor_hash.as_str()
    );

    // A GDPR erasure in the cluster: the entry keeps only the salted hashes, and the chain
    // still verifies.
    let newest = rewind_tests::must_list_audit(&client).await;
    let entry = newest
        .iter()
        .rev()
        .find(|entry| entry.format == 2 && !entry.identity.is_empty())
        .expect("a salted entry")
        .clone();
    let said = must_ctl(
        &coordinator,
        &[
            "audit",
            "redact",
            &entry.index.to_string(),
            "--fields",
            "identity,reason",
            "--reason",
            "erasure request 77",
        ],
    );
    assert!(said.contains("identity, reason"), "{said}");
    let after = rewind_tests::must_list_audit(&client).await;
    let redacted = after
        .iter()
        .find(|listed| listed.index == entry.index)
        .unwrap();
    assert!(
        redacted.identity.is_empty() && redacted.reason.is_empty(),
        "{redacted:?}"
    );
    assert_eq!(redacted.hash, entry.hash);
    must_verify_audit(&client).await;
    // Refused: an entry the cluster no longer holds.
    let output = coordinator.rewindctl(&[
        "audit",
        "redact",
        "1",
        "--fields",
        "identity",
        "--reason",
        "erasure request 78",
    ]);
    assert!(
        !output.status.success() && text(&output).contains("not 1"),
        "{}",
        text(&output)
    );
}
