//! The formats of docs/FORMATS.md reproduced by an implementation written from the document
//! alone (`tests/python/formats.py`, Python's standard library): its worked examples, a real
//! release directory's digest as rewind registered it, and a real audit export with a redacted
//! entry, verified as a chain to the manifest's last hash.

use std::path::Path;
use std::process::Command;

use rewind_proto::v1 as pb;
use rewind_tests::clients::workspace;
use rewind_tests::*;
use serde_json::Value;

/// `formats.py COMMAND ARGUMENT`'s output, which must succeed.
fn formats(command: &str, argument: &Path) -> String {
    let output = Command::new("python3")
        .arg(workspace().join("tests/python/formats.py"))
        .arg(command)
        .arg(argument)
        .output()
        .expect("python3 is missing: apt-get install python3");
    assert!(
        output.status.success(),
        "formats.py {command} {}: {}",
        argument.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// The fenced block after `<!-- worked-example: NAME -->` in docs/FORMATS.md.
fn worked_example(name: &str) -> String {
    let text = std::fs::read_to_string(workspace().join("docs/FORMATS.md")).unwrap();
    let marker = format!("<!-- worked-example: {name} -->");
    let after = &text[text.find(&marker).unwrap()..];
    let block = after.split("```").nth(1).unwrap();
    block.split_once('\n').unwrap().1.to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_written_from_the_document_reproduces_digests_and_audit_hashes() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();

    // The worked examples.
    let example = dir.path().join("rel");
    std::fs::create_dir_all(example.join("bin")).unwrap();
    std::fs::write(example.join("bin/app"), "#!/bin/sh\necho v1\n").unwrap();
    let executable = std::fs::Permissions::from_mode(0o755);
    std::fs::set_permissions(example.join("bin/app"), executable).unwrap();
    std::fs::write(example.join("config.toml"), "port = 8080\n").unwrap();
    std::os::unix::fs::symlink("bin/app", example.join("run")).unwrap();
    assert_eq!(
        formats("tree", &example),
        worked_example("tree-digest").trim()
    );
    let lines = dir.path().join("example.jsonl");
    std::fs::write(&lines, worked_example("audit-entries")).unwrap();
    let verified: Value = serde_json::from_str(&formats("audit", &lines)).unwrap();
    assert_eq!(verified["entries"], 2);

    // A real release: what rewind registered is what the document's walk gives.
    let coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    let host = TestHost::must_prepare(dir.path(), "web-1", &coordinator);
    let mut client = coordinator.must_client().await;
    must_register_web(&mut client, &host, false).await;
    let releases = client
        .list_releases(pb::ListReleasesRequest {
            service: "web".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .releases;
    assert_eq!(releases.len(), 2);
    for release in &releases {
        let tree = host.root.join("releases").join(&release.version);
        assert_eq!(
            formats("tree", &tree),
            release.artifact_digest,
            "{}",
            release.version
        );
    }

    // A real audit export, one entry's identity redacted: the chain verifies to the end.
    let redacted = client
        .redact_audit(pb::RedactAuditRequest {
            request_id: "erase".into(),
            index: 2,
            fields: vec!["identity".into()],
            reason: "erasure request".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(redacted.redacted.contains_key("identity"), "{redacted:?}");
    let export = dir.path().join("audit.jsonl");
    let output = coordinator.rewindctl(&["audit", "export", "--out", export.to_str().unwrap()]);
    assert!(output.status.success(), "{}", output_text(&output));
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(format!("{}.manifest.json", export.display())).unwrap(),
    )
    .unwrap();
    let verified: Value = serde_json::from_str(&formats("audit", &export)).unwrap();
    assert_eq!(verified["entries"], manifest["entries"]);
    assert_eq!(verified["last_hash"], manifest["last_hash"]);
    assert!(verified["entries"].as_u64().unwrap() > 3);
}
