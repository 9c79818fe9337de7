//! `rewindctl migration register` and `list` against a dev coordinator: scripts from files,
//! checksums computed by the coordinator, refusals that say why.

use rewind_tests::*;

#[tokio::test(flavor = "multi_thread")]
async fn migrations_register_from_files_and_bad_ones_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    let script = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let up = script("up.sql", "ALTER TABLE orders ADD COLUMN note text;");
    let down = script("down.sql", "ALTER TABLE orders DROP COLUMN note;");
    let empty = script("empty.sql", "\n");
    let other = script("other.sql", "DROP TABLE orders;");
    let run = |args: &[&str]| {
        let output = coordinator.rewindctl(args);
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let register = |version: &str, down: &str| {
        run(&[
            "migration",
            "register",
            "orders",
            version,
            "--class",
            "expand",
            "--up",
            &up,
            "--down",
            down,
        ])
    };

    let (ok, shown, stderr) = register("0001", &down);
    assert!(ok, "{stderr}");
    assert!(
        shown.contains("orders") && shown.contains("sha256:"),
        "{shown}"
    );
    let (ok, _, _) = register("0001", &down);
    assert!(ok, "registering the same migration again is a no-op");

    for (version, down, why) in [
        ("0001", other.as_str(), "orders@0001 is already registered"),
        ("0002", empty.as_str(), "has no down script"),
        ("bad version!", down.as_str(), "migration.version"),
    ] {
        let (ok, _, stderr) = register(version, down);
        assert!(!ok, "{version} was accepted");
        assert!(stderr.contains(why), "{version}: {stderr}");
    }
    let (ok, _, stderr) = run(&[
        "migration",
        "register",
        "orders",
        "0003",
        "--class",
        "expand",
        "--up",
        &up,
        "--down",
        "/no/such/file",
    ]);
    assert!(!ok && stderr.contains("read /no/such/file"), "{stderr}");

    let (ok, listed, _) = run(&[
        "--output",
        "json",
        "migration",
        "list",
        "--database",
        "orders",
        "--with-scripts",
    ]);
    assert!(ok);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let migrations = listed["migrations"].as_array().unwrap();
    assert_eq!(migrations.len(), 1, "{listed}");
    assert_eq!(
        migrations[0]["downSql"],
        "ALTER TABLE orders DROP COLUMN note;"
    );
    assert_eq!(migrations[0]["registeredBy"], "user:operator");
}
