//! What people expect of a command line, with the real `rewindctl`: shell completion that bash
//! really completes with, man pages man renders, `--output yaml|wide`, named contexts instead
//! of connection flags, and `change start --watch` / `rollback start --watch` with a progress
//! line on a terminal.

use std::path::Path;
use std::process::{Command, Output};

use rewind_tests::*;

fn rewindctl(contexts: &Path, args: &[&str]) -> Output {
    Command::new(must_binary("rewindctl"))
        .args(args)
        .env("REWIND_CONTEXTS_FILE", contexts)
        .env_remove("REWIND_TLS_DIR")
        .env_remove("REWIND_COORDINATOR")
        .output()
        .expect("run rewindctl")
}

fn must_succeed(output: Output, what: &str) -> String {
    assert!(output.status.success(), "{what}: {}", output_text(&output));
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn bash_completes_commands_and_man_renders_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("rewindctl.bash");
    let completion = must_succeed(
        rewindctl(
            Path::new("/nonexistent/rewind-contexts.toml"),
            &["completion", "bash"],
        ),
        "completion bash",
    );
    std::fs::write(&script, completion).unwrap();
    // Bash itself completes, as it would at a prompt.
    let complete = |words: &str| {
        let line = format!(
            "source {script}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             COMP_LINE=\"{words}\"; COMP_POINT=${{#COMP_LINE}}; \
             _rewindctl rewindctl \"${{COMP_WORDS[-1]}}\" \"${{COMP_WORDS[-2]}}\"; \
             echo \"${{COMPREPLY[@]}}\"",
            script = script.display()
        );
        let output = Command::new("bash").args(["-c", &line]).output().unwrap();
        String::from_utf8(output.stdout).unwrap()
    };
    assert_eq!(complete("rewindctl rollb").trim(), "rollback");
    assert!(
        complete("rewindctl rollback st")
            .split_whitespace()
            .any(|word| word == "start")
    );
    assert_eq!(complete("rewindctl config use").trim(), "use-context");
    for shell in ["zsh", "fish"] {
        let script = must_succeed(
            rewindctl(
                Path::new("/nonexistent/rewind-contexts.toml"),
                &["completion", shell],
            ),
            shell,
        );
        assert!(
            script.contains("rollback") && script.contains("use-context"),
            "{shell}"
        );
    }

    let pages = dir.path().join("man");
    must_succeed(
        rewindctl(
            Path::new("/nonexistent/rewind-contexts.toml"),
            &["man", "--out-dir", pages.to_str().unwrap()],
        ),
        "man",
    );
    let rendered = Command::new("man")
        .env("MANWIDTH", "100")
        .arg("-l")
        .arg(pages.join("rewindctl-rollback-start.1"))
        .output()
        .expect("man is missing: apt-get install man-db");
    let text = String::from_utf8_lossy(&rendered.stdout);
    assert!(
        text.contains("--max-parallel") && text.contains("--watch"),
        "{text}"
    );
    let count = std::fs::read_dir(&pages).unwrap().count();
    assert!(count > 100, "{count} man pages");
}

#[tokio::test(flavor = "multi_thread")]
async fn contexts_output_formats_and_watches_with_progress() {
    let dir = tempfile::tempdir().unwrap();
    let contexts = dir.path().join("contexts.toml");
    let coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    let tls = coordinator.tls_dir().display().to_string();

    // Without a context and without flags, the default address answers nothing here.
    let lost = rewindctl(&contexts, &["cluster", "list"]);
    assert!(!lost.status.success());
    let saved = rewindctl(
        &contexts,
        &[
            "config",
            "set-context",
            "test",
            "--coordinator",
            &coordinator.address,
            "--tls-dir",
            &tls,
            "--use",
        ],
    );
    must_succeed(saved, "set-context");
    assert!(
        must_succeed(rewindctl(&contexts, &["cluster", "list"]), "cluster list").contains("leader")
    );
    assert_eq!(
        must_succeed(
            rewindctl(&contexts, &["config", "current-context"]),
            "current"
        )
        .trim(),
        "test"
    );
    // A flag on the command line wins over the context.
    let overridden = rewindctl(
        &contexts,
        &["--coordinator", "127.0.0.1:9", "cluster", "list"],
    );
    assert!(!overridden.status.success(), "{}", output_text(&overridden));
    let missing = rewindctl(&contexts, &["--context", "nope", "cluster", "list"]);
    assert!(
        output_text(&missing).contains("no context \"nope\""),
        "{}",
        output_text(&missing)
    );

    // YAML parses and says what JSON says; wide adds columns.
    let yaml = must_succeed(
        rewindctl(&contexts, &["-o", "yaml", "cluster", "list"]),
        "yaml",
    );
    let parsed: serde_json::Value = yaml_serde::from_str(&yaml).unwrap();
    let json = must_succeed(
        rewindctl(&contexts, &["-o", "json", "cluster", "list"]),
        "json",
    );
    assert_eq!(
        parsed,
        serde_json::from_str::<serde_json::Value>(&json).unwrap()
    );

    let mut host = TestHost::must_prepare(dir.path(), "web-1", &coordinator);
    host.must_start_agent();
    let mut client = coordinator.must_client().await;
    must_agents_connected(&client, 1).await;
    must_register_web(&mut client, &host, false).await;
    let wide = must_succeed(
        rewindctl(&contexts, &["-o", "wide", "host", "list"]),
        "wide",
    );
    assert!(
        wide.contains("AGENT VERSION") && wide.contains("IDENTITY"),
        "{wide}"
    );
    let narrow = must_succeed(rewindctl(&contexts, &["host", "list"]), "table");
    assert!(!narrow.contains("AGENT VERSION"), "{narrow}");

    // change start --watch follows the change to the end; on a terminal (`script`), with the
    // progress line.
    for version in ["v1", "v2"] {
        let said = must_succeed(
            rewindctl(
                &contexts,
                &[
                    "change", "start", "web", version, "--reason", "deploy", "--watch",
                ],
            ),
            "change start --watch",
        );
        assert!(said.contains("activate succeeded"), "{said}");
    }
    let command = format!(
        "{} rollback start ch-2 --reason test --watch",
        must_binary("rewindctl").display()
    );
    let on_terminal = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("REWIND_CONTEXTS_FILE", &contexts)
        .env("COLUMNS", "200")
        .output()
        .expect("script (bsdutils) runs a command on a terminal");
    let shown = String::from_utf8_lossy(&on_terminal.stdout);
    assert!(on_terminal.status.success(), "{shown}");
    assert!(
        shown.contains("wave 1/1") && shown.contains("hosts done"),
        "{shown}"
    );
    assert!(shown.contains("succeeded"), "{shown}");
}
