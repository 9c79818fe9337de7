//! The worked examples of `docs/FORMATS.md`, recomputed by rewind's own code from the document
//! itself: the document and the code cannot drift apart.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rewind_shared::audit::{AuditEntry, ChainCheck, Field};

/// The fenced block that follows `<!-- worked-example: NAME -->` in docs/FORMATS.md.
fn worked_example(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/FORMATS.md");
    let text = std::fs::read_to_string(path).unwrap();
    let marker = format!("<!-- worked-example: {name} -->");
    let after = &text[text.find(&marker).unwrap_or_else(|| panic!("no {marker}"))..];
    let block = after
        .split("```")
        .nth(1)
        .expect("a fenced block after the marker");
    // Drop the info string (`json`) on the opening fence's line.
    block
        .split_once('\n')
        .expect("a block of lines")
        .1
        .to_string()
}

#[test]
fn the_tree_digest_worked_example_holds() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rel");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::write(root.join("bin/app"), "#!/bin/sh\necho v1\n").unwrap();
    std::fs::set_permissions(root.join("bin/app"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(root.join("config.toml"), "port = 8080\n").unwrap();
    std::fs::set_permissions(
        root.join("config.toml"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::os::unix::fs::symlink("bin/app", root.join("run")).unwrap();

    let lines = worked_example("tree-lines");
    assert_eq!(
        rewind_shared::digest::sha256_digest(lines.as_bytes()),
        worked_example("tree-digest").trim(),
        "the lines shown hash to the digest shown"
    );
    assert_eq!(
        rewind_shared::digest::tree_digest(&root).unwrap(),
        worked_example("tree-digest").trim(),
        "rewind digests the example tree as shown"
    );
}

#[test]
fn the_audit_worked_example_holds_and_survives_a_redaction() {
    let entries: Vec<AuditEntry> = worked_example("audit-entries")
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(entries.len(), 2);
    let mut chain = ChainCheck::from_genesis();
    for entry in &entries {
        assert_eq!(entry.compute_hash(), entry.hash, "entry {}", entry.index);
        chain.next(entry).unwrap();
    }
    // As an export writes them: the lines are byte for byte rewind's own.
    for (line, entry) in worked_example("audit-entries").lines().zip(&entries) {
        assert_eq!(serde_json::to_string(entry).unwrap(), line);
    }
    let mut redacted = entries[1].clone();
    redacted.redact(Field::Identity).unwrap();
    assert_eq!(redacted.compute_hash(), entries[1].hash);
    assert_eq!(
        redacted.redacted[&Field::Identity],
        "2b40fec386e697df85923c7d91d7d259fa084b9ef15d7408f499c902585ba44d",
        "the identity's commitment in the table"
    );
}
