//! Audit exports with the real `rewindctl` against a real coordinator: export, offline verify,
//! tamper detection that names the line, consecutive exports that chain, and a redacted export
//! that keeps no name or reason and still verifies.

use std::path::{Path, PathBuf};

use rewind_proto::v1 as pb;
use rewind_tests::{Coordinator, plain_service};

use rewind_tests::output_text as text;

/// `rewindctl audit verify --file ...` with no cluster at all.
fn verify_offline(files: &[&Path]) -> std::process::Output {
    let mut args = vec!["audit", "verify"];
    for file in files {
        args.extend(["--file", file.to_str().unwrap()]);
    }
    rewind_tests::rewindctl_offline(&args)
}

fn must_export(coordinator: &Coordinator, out: &Path, extra: &[&str]) -> String {
    let mut args = vec!["audit", "export", "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let output = coordinator.rewindctl(&args);
    assert!(output.status.success(), "export: {}", text(&output));
    text(&output)
}

/// A copy of `file` (and its manifest) with its lines edited.
fn tampered(file: &Path, name: &str, edit: impl FnOnce(&mut Vec<String>)) -> PathBuf {
    let copy = file.with_file_name(name);
    let mut lines: Vec<String> = std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    edit(&mut lines);
    let body: String = lines.iter().map(|line| format!("{line}\n")).collect();
    std::fs::write(&copy, body).unwrap();
    let manifest = |path: &Path| PathBuf::from(format!("{}.manifest.json", path.display()));
    std::fs::copy(manifest(file), manifest(&copy)).unwrap();
    copy
}

#[tokio::test(flavor = "multi_thread")]
async fn exports_verify_offline_chain_and_name_the_first_tampered_line() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    let mut client = coordinator.must_client().await;
    for number in 0..12 {
        client
            .put_service(pb::PutServiceRequest {
                request_id: format!("svc-{number}"),
                service: Some(plain_service(&format!("svc-{number}"))),
            })
            .await
            .unwrap();
    }
    let all = dir.path().join("all.jsonl");
    let said = must_export(&coordinator, &all, &[]);
    assert!(
        said.contains("next: rewindctl audit export --after"),
        "{said}"
    );
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{}.manifest.json", all.display())).unwrap(),
    )
    .unwrap();
    let last = manifest["last_index"].as_u64().unwrap();
    assert!(last >= 12, "{manifest}");
    assert_eq!(manifest["first_index"], 1);
    assert_eq!(
        manifest["anchor_hash"],
        rewind_shared::audit::GENESIS_HASH,
        "{manifest}"
    );
    // The export ends at the cluster's head as the cluster verifies it.
    let head = client
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(head.ok && head.entries == last, "{head:?}");
    assert_eq!(manifest["last_hash"], head.head_hash.as_str());

    let output = verify_offline(&[&all]);
    assert!(output.status.success(), "verify: {}", text(&output));
    assert!(text(&output).contains("intact"), "{}", text(&output));

    // Each kind of tampering is found, and the line named.
    type Case = (&'static str, fn(&mut Vec<String>), &'static str);
    let cases: [Case; 5] = [
        (
            "changed",
            |lines| lines[4] = lines[4].replace("svc-", "svx-"),
            "line 5:",
        ),
        ("removed", |lines| drop(lines.remove(6)), "line 7:"),
        ("reordered", |lines| lines.swap(2, 3), "line 3:"),
        (
            "inserted",
            |lines| {
                let copy = lines[1].clone();
                lines.insert(8, copy)
            },
            "line 9:",
        ),
        ("cut short", |lines| lines.truncate(10), "line 11:"),
    ];
    for (name, edit, line) in cases {
        let copy = tampered(&all, &format!("{}.jsonl", name.replace(' ', "-")), edit);
        let output = verify_offline(&[&copy]);
        let said = text(&output);
        assert!(!output.status.success(), "{name} went unnoticed: {said}");
        assert!(
            said.contains("BROKEN") && said.contains(line),
            "{name}: {said}"
        );
    }

    // Two consecutive exports chain into each other; out of order, they do not.
    let first = dir.path().join("first.jsonl");
    let second = dir.path().join("second.jsonl");
    must_export(&coordinator, &first, &["--until", "2099-01-01T00:00:00Z"]);
    client
        .put_service(pb::PutServiceRequest {
            request_id: "svc-late".into(),
            service: Some(plain_service("svc-late")),
        })
        .await
        .unwrap();
    let first_last = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(format!("{}.manifest.json", first.display())).unwrap(),
    )
    .unwrap()["last_index"]
        .as_u64()
        .unwrap();
    must_export(&coordinator, &second, &["--after", &first_last.to_string()]);
    let output = verify_offline(&[&first, &second]);
    assert!(output.status.success(), "chained: {}", text(&output));
    assert!(
        text(&output).contains("2 exports chain"),
        "{}",
        text(&output)
    );
    let output = verify_offline(&[&second, &first]);
    assert!(
        !output.status.success() && text(&output).contains("an export is missing"),
        "{}",
        text(&output)
    );

    // An export never overwrites, and a range with nothing in it writes nothing.
    let output = coordinator.rewindctl(&["audit", "export", "--out", all.to_str().unwrap()]);
    assert!(
        !output.status.success() && text(&output).contains("exists"),
        "{}",
        text(&output)
    );
    let empty = dir.path().join("empty.jsonl");
    let output = coordinator.rewindctl(&[
        "audit",
        "export",
        "--out",
        empty.to_str().unwrap(),
        "--after",
        "100000",
    ]);
    assert!(
        !output.status.success() && text(&output).contains("no audit entries"),
        "{}",
        text(&output)
    );
    assert!(!empty.exists());

    // A cluster of this release salts its entries: an export can erase who and why, and
    // still verifies against the same chain.
    client
        .set_flag(pb::SetFlagRequest {
            request_id: "flag".into(),
            service: "svc-0".into(),
            name: "new-checkout".into(),
            enabled: true,
            reason: "Ada Lovelace said so, INC-1815".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let entries = rewind_tests::must_list_audit(&client).await;
    let reset = entries.last().unwrap();
    assert_eq!(reset.format, 2, "{reset:?}");
    assert_eq!(reset.reason, "Ada Lovelace said so, INC-1815");
    assert!(!reset.outcome.contains("Lovelace"), "{reset:?}");
    let listed = text(&coordinator.rewindctl(&["audit", "list", "--page-size", "1000"]));
    assert!(listed.contains("Ada Lovelace said so"), "{listed}");

    let redacted = dir.path().join("redacted.jsonl");
    let plain_before = entries
        .iter()
        .filter(|entry| entry.format != 2)
        .map(|entry| entry.index)
        .max()
        .unwrap_or(0);
    must_export(
        &coordinator,
        &redacted,
        &[
            "--after",
            &plain_before.to_string(),
            "--redact",
            "identities,reasons",
        ],
    );
    let body = std::fs::read_to_string(&redacted).unwrap();
    assert!(
        !body.contains("Lovelace") && !body.contains("INC-1815"),
        "{body}"
    );
    let identity = &reset.identity;
    assert!(!body.contains(identity.as_str()), "{identity} in {body}");
    let output = verify_offline(&[&redacted]);
    assert!(output.status.success(), "redacted: {}", text(&output));
    let manifest =
        std::fs::read_to_string(format!("{}.manifest.json", redacted.display())).unwrap();
    let manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    assert_eq!(manifest["last_hash"], reset.hash.as_str(), "{manifest}");
    assert!(
        manifest["redacted_entries"].as_u64().unwrap() > 0,
        "{manifest}"
    );
    // A redacted line whose commitment is changed does not verify.
    let forged = tampered(&redacted, "forged.jsonl", |lines| {
        let last = lines.len() - 1;
        let mut entry: serde_json::Value = serde_json::from_str(&lines[last]).unwrap();
        entry["redacted"]["reason"] = serde_json::Value::String("00".repeat(32));
        lines[last] = entry.to_string();
    });
    let output = verify_offline(&[&forged]);
    assert!(!output.status.success(), "{}", text(&output));

    let refused = dir.path().join("refused.jsonl");
    let output = coordinator.rewindctl(&[
        "audit",
        "export",
        "--out",
        refused.to_str().unwrap(),
        "--redact",
        "salaries",
    ]);
    assert!(
        !output.status.success() && text(&output).contains("salaries"),
        "{}",
        text(&output)
    );
}
