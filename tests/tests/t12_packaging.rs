//! Packaging: the agent's .deb (built by cargo-deb from the test build's binary) holds what an
//! install needs, its unit passes `systemd-analyze verify`, its binary runs from the unpacked
//! tree and checks configs, and the Ansible role renders a config that agent accepts.
//! `tests/run-all` installs cargo-deb, ansible-core and systemd-analyze; without one, the test
//! fails with the line that installs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rewind_tests::must_binary;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(command: &mut Command, what: &str) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("{what}: cannot run it ({error})"));
    assert!(
        output.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Builds the .deb from the already built test binary and unpacks it into `<dir>/root`.
fn must_build_and_unpack_deb(dir: &Path) -> PathBuf {
    must_binary("rewind-agent");
    let deb = dir.join("rewind-agent.deb");
    let cargo_deb = Command::new(env!("CARGO"))
        .current_dir(workspace())
        .args(["deb", "--version"])
        .output();
    assert!(
        cargo_deb.is_ok_and(|output| output.status.success()),
        "cargo-deb is needed: cargo install cargo-deb --version 3.8.0 --locked"
    );
    run(
        Command::new(env!("CARGO"))
            .current_dir(workspace())
            .args([
                "deb",
                "-p",
                "rewind-agent",
                "--no-build",
                "--profile",
                "dev",
            ])
            // Stripped (as a release package is) and lightly compressed: the test build's
            // debug info would make it 150 MB to compress while other tests run.
            .args(["--fast", "--output"])
            .arg(&deb),
        "cargo deb",
    );
    let root = dir.join("root");
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
        "dpkg-deb -x",
    );
    run(
        Command::new("dpkg-deb")
            .arg("-e")
            .arg(&deb)
            .arg(dir.join("control")),
        "dpkg-deb -e",
    );
    root
}

#[test]
fn the_deb_holds_a_hardened_unit_a_working_binary_and_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let root = must_build_and_unpack_deb(dir.path());
    for file in [
        "usr/bin/rewind-agent",
        "usr/lib/systemd/system/rewind-agent.service",
        "etc/rewind/agent.toml",
        "etc/polkit-1/rules.d/50-rewind-agent.rules",
        "usr/share/doc/rewind-agent/README.md",
    ] {
        assert!(root.join(file).exists(), "{file} is not in the package");
    }
    let control = dir.path().join("control");
    let read = |name: &str| std::fs::read_to_string(control.join(name)).unwrap();
    let conffiles = read("conffiles");
    assert!(
        conffiles.contains("/etc/rewind/agent.toml"),
        "the config must survive upgrades as a conffile: {conffiles}"
    );
    assert!(
        read("control").contains("Depends: adduser"),
        "{}",
        read("control")
    );
    let postinst = read("postinst");
    assert!(
        postinst.contains("adduser --system")
            && postinst.contains("deb-systemd-helper enable rewind-agent.service"),
        "{postinst}"
    );
    assert!(read("postrm").contains("rm -rf /var/lib/rewind"));

    // The unit: hardened, running the packaged binary as its own user.
    let unit =
        std::fs::read_to_string(root.join("usr/lib/systemd/system/rewind-agent.service")).unwrap();
    for setting in [
        "User=rewind",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "Restart=on-failure",
        "StateDirectory=rewind",
    ] {
        assert!(unit.contains(setting), "{setting} missing from the unit");
    }

    // The packaged binary runs from the unpacked tree and accepts the packaged config...
    let binary = root.join("usr/bin/rewind-agent");
    let config = root.join("etc/rewind/agent.toml");
    let output = run(
        Command::new(&binary)
            .arg("--config")
            .arg(&config)
            // Its TLS files and data directory come with enrolment, not the package.
            .args(["check-config", "--no-files"]),
        "check-config of the packaged config",
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("ok (1 services)"));
    // ...and names every problem of a broken one at once.
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        "host-id = \"Bad Id\"\ncoordinators = [\"nowhere\"]\n[[service]]\nname = \"web\"\nroot = \"relative\"\n",
    )
    .unwrap();
    let output = Command::new(&binary)
        .arg("--config")
        .arg(&broken)
        .arg("check-config")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let errors = String::from_utf8_lossy(&output.stderr);
    for problem in [
        "host-id",
        "coordinators",
        "data-dir",
        "tls",
        "service.web.root",
        "service.web.restart-command",
    ] {
        assert!(
            errors.contains(problem),
            "{problem} not reported:\n{errors}"
        );
    }

    // systemd's own check on the unit pointed at the unpacked binary (it checks that
    // ExecStart is executable).
    assert!(
        Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .is_ok_and(|output| output.status.success()),
        "systemd-analyze is needed to verify the unit: apt-get install systemd"
    );
    let checked = dir.path().join("rewind-agent.service");
    std::fs::write(
        &checked,
        unit.replace("/usr/bin/rewind-agent", binary.to_str().unwrap()),
    )
    .unwrap();
    let output = run(
        Command::new("systemd-analyze").arg("verify").arg(&checked),
        "systemd-analyze verify",
    );
    let warnings = String::from_utf8_lossy(&output.stderr);
    assert!(warnings.trim().is_empty(), "systemd-analyze: {warnings}");
}

#[test]
fn the_ansible_role_parses_and_renders_a_config_the_agent_accepts() {
    let ansible = workspace().join("deploy/ansible");
    let found = Command::new("ansible-playbook").arg("--version").output();
    assert!(
        found.is_ok_and(|output| output.status.success()),
        "ansible-playbook is needed: apt-get install ansible-core"
    );
    run(
        Command::new("ansible-playbook")
            .current_dir(&ansible)
            .args(["--syntax-check", "-i", "inventory.example.yml", "site.yml"]),
        "ansible-playbook --syntax-check",
    );
    // Render every host's config with the role's own defaults (render.yml touches no host).
    let dir = tempfile::tempdir().unwrap();
    run(
        Command::new("ansible-playbook")
            .current_dir(&ansible)
            .env("ANSIBLE_LOCALHOST_WARNING", "false")
            .args(["-i", "inventory.example.yml", "render.yml", "-e"])
            .arg(format!("rewind_agent_render_dir={}", dir.path().display())),
        "ansible-playbook render.yml",
    );
    let rendered = dir.path().join("web-1.toml");
    let output = run(
        Command::new(must_binary("rewind-agent"))
            .arg("--config")
            .arg(&rendered)
            // Rendered for other hosts: the files it names are theirs.
            .args(["check-config", "--no-files"]),
        "check-config of the rendered config",
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("ok (1 services)"));
    let config = std::fs::read_to_string(&rendered).unwrap();
    assert!(
        config.contains("host-id = \"web-1\"")
            && config.contains("region = \"eu-west\"")
            && config.contains("[service.metrics]")
            && config.contains("join-token-file = \"/etc/rewind/join-token\""),
        "{config}"
    );
}
