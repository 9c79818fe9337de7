//! Files a config names that cannot be used (TLS files missing, a directory, garbage, a key not
//! for its certificate; a data directory that is a file) are named with their path and problem
//! by `check-config` and by a start, which exits 64 before creating or binding anything; and
//! `issue-cert` never silently replaces an identity or the CA's own files.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rewind_tests::{Coordinator, TestHost, must_binary, must_wait};

const EXIT_BAD_CONFIG: i32 = 64;

fn coordinator(args: &[&str]) -> Output {
    Command::new(must_binary("rewind-coordinator"))
        .args(args)
        .env("REWIND_LOG", "warn")
        .output()
        .unwrap()
}

fn agent(config: &Path, command: &str) -> Output {
    Command::new(must_binary("rewind-agent"))
        .args(["--config", config.to_str().unwrap(), command])
        .env("REWIND_LOG", "warn")
        .output()
        .unwrap()
}

fn issue(data_dir: &Path, kind: &str, name: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "issue-cert",
        "--create-ca",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--kind",
        kind,
        "--name",
        name,
    ];
    args.extend_from_slice(extra);
    coordinator(&args)
}

/// A dev PKI with a member and an agent identity, and the paths of garbage and a directory.
struct Files {
    _dir: tempfile::TempDir,
    root: PathBuf,
    tls: PathBuf,
}

fn files() -> Files {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let pki = root.join("pki");
    let out = issue(
        &pki,
        "member",
        "coordinator-1",
        &["--member-id", "1", "--san", "127.0.0.1"],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(issue(&pki, "agent", "web-1", &[]).status.success());
    std::fs::write(root.join("garbage.pem"), "not a certificate").unwrap();
    std::fs::create_dir(root.join("a-directory")).unwrap();
    std::fs::write(root.join("a-file"), "").unwrap();
    Files {
        tls: pki.join("tls"),
        _dir: dir,
        root,
    }
}

fn coordinator_config(files: &Files, cert: &Path, key: &Path, data_dir: &Path) -> PathBuf {
    let path = files.root.join("coordinator.toml");
    std::fs::write(
        &path,
        format!(
            r#"listen = "127.0.0.1:0"
data-dir = "{data}"
[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[cluster]
member-id = 1
[[cluster.member]]
id = 1
address = "127.0.0.1:1"
"#,
            data = data_dir.display(),
            ca = files.tls.join("ca.pem").display(),
            cert = cert.display(),
            key = key.display(),
        ),
    )
    .unwrap();
    path
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_coordinator_names_each_unusable_file_and_exits_64_before_starting() {
    let files = files();
    let cert = files.tls.join("coordinator-1.pem");
    let key = files.tls.join("coordinator-1.key");
    let data = files.root.join("data");
    let garbage = files.root.join("garbage.pem");
    let directory = files.root.join("a-directory");
    let cases = [
        (
            files.root.join("missing.pem"),
            key.clone(),
            data.clone(),
            "tls.cert: ",
            "missing.pem: does not exist",
        ),
        (
            directory.clone(),
            key.clone(),
            data.clone(),
            "tls.cert: ",
            "a-directory: is a directory",
        ),
        (
            garbage.clone(),
            key.clone(),
            data.clone(),
            "tls.cert: ",
            "garbage.pem: holds no PEM certificate",
        ),
        (
            cert.clone(),
            garbage.clone(),
            data.clone(),
            "tls.key: ",
            "garbage.pem: holds no PEM private key",
        ),
        (
            cert.clone(),
            files.tls.join("web-1.key"),
            data.clone(),
            "tls.key: ",
            "not the key of",
        ),
        (
            cert.clone(),
            key.clone(),
            files.root.join("a-file"),
            "data-dir: ",
            "a-file: is not a directory",
        ),
    ];
    for (cert, key, data_dir, field, problem) in cases {
        let config = coordinator_config(&files, &cert, &key, &data_dir);
        let checked = coordinator(&["check-config", config.to_str().unwrap()]);
        assert_eq!(checked.status.code(), Some(EXIT_BAD_CONFIG), "{problem}");
        assert!(
            stderr(&checked).contains(field) && stderr(&checked).contains(problem),
            "check-config: {problem}: {}",
            stderr(&checked)
        );
        let addr_file = files.root.join("addr");
        let started = coordinator(&[
            "--config",
            config.to_str().unwrap(),
            "--addr-file",
            addr_file.to_str().unwrap(),
        ]);
        assert_eq!(started.status.code(), Some(EXIT_BAD_CONFIG), "{problem}");
        assert!(
            stderr(&started).contains(problem),
            "run: {problem}: {}",
            stderr(&started)
        );
        assert!(!addr_file.exists(), "{problem}: nothing was served");
        assert!(!data.exists(), "{problem}: nothing was created");
    }
    // --no-files checks the config alone (one written before its files are installed).
    let unbuilt = coordinator_config(&files, &files.root.join("later.pem"), &key, &data);
    let checked = coordinator(&["check-config", "--no-files", unbuilt.to_str().unwrap()]);
    assert!(checked.status.success(), "{}", stderr(&checked));
    // And the good files pass.
    let config = coordinator_config(&files, &cert, &key, &data);
    let checked = coordinator(&["check-config", config.to_str().unwrap()]);
    assert!(checked.status.success(), "{}", stderr(&checked));
}

#[test]
fn an_agent_names_each_unusable_file_and_exits_64() {
    let files = files();
    let written = std::cell::Cell::new(0);
    let write = |cert: &Path, key: &Path, data_dir: &Path, token: Option<&Path>| -> PathBuf {
        written.set(written.get() + 1);
        let path = files.root.join(format!("agent-{}.toml", written.get()));
        let token = token.map_or(String::new(), |token| {
            format!("join-token-file = \"{}\"\n", token.display())
        });
        std::fs::write(
            &path,
            format!(
                "host-id = \"web-1\"\ncoordinators = [\"127.0.0.1:1\"]\ndata-dir = \"{}\"\n{token}\
                 [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                data_dir.display(),
                files.tls.join("ca.pem").display(),
                cert.display(),
                key.display(),
            ),
        )
        .unwrap();
        path
    };
    let cert = files.tls.join("web-1.pem");
    let key = files.tls.join("web-1.key");
    let data = files.root.join("agent-data");
    let missing_key = files.root.join("missing.key");
    for (config, problem) in [
        (
            write(&cert, &missing_key, &data, None),
            "missing.key: does not exist",
        ),
        (
            write(&files.root.join("a-directory"), &key, &data, None),
            "a-directory: is a directory",
        ),
        (
            write(&cert, &files.tls.join("coordinator-1.key"), &data, None),
            "not the key of",
        ),
        (
            write(&cert, &key, &files.root.join("a-file"), None),
            "data-dir: ",
        ),
    ] {
        for command in ["check-config", "run"] {
            let output = agent(&config, command);
            assert_eq!(
                output.status.code(),
                Some(EXIT_BAD_CONFIG),
                "{command}: {problem}: {}",
                stderr(&output)
            );
            assert!(
                stderr(&output).contains(problem),
                "{command}: {}",
                stderr(&output)
            );
        }
    }
    // With a join token to hand, a missing certificate is what joining is for: only the CA
    // must be usable.
    let token = files.root.join("token");
    std::fs::write(&token, "rwj_x").unwrap();
    let joining = write(
        &files.root.join("none.pem"),
        &missing_key,
        &data,
        Some(&token),
    );
    let checked = agent(&joining, "check-config");
    assert!(checked.status.success(), "{}", stderr(&checked));
}

#[test]
fn issue_cert_never_silently_replaces_an_identity_or_the_ca() {
    let files = files();
    let pki = files.root.join("pki");
    let again = issue(&pki, "agent", "web-1", &[]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("web-1.pem") && stderr(&again).contains("--force"),
        "{}",
        stderr(&again)
    );
    let key = files.tls.join("web-1.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let before = std::fs::read(&key).unwrap();
    let forced = issue(&pki, "agent", "web-1", &["--force"]);
    assert!(forced.status.success(), "{}", stderr(&forced));
    assert_ne!(std::fs::read(&key).unwrap(), before, "a new key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o600,
        "a key is written 0600 whatever the old file's mode"
    );
    for reserved in ["ca", "issuer"] {
        let refused = issue(&pki, "agent", reserved, &["--force"]);
        assert!(!refused.status.success(), "{reserved}");
        assert!(
            stderr(&refused).contains("the dev CA's own files"),
            "{}",
            stderr(&refused)
        );
    }
}

/// Every file (but a certificate) under `dir` that others than its owner may read or enter,
/// with its mode.
fn not_private(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let metadata = entry.metadata().unwrap();
        let mode = metadata.permissions().mode() & 0o777;
        if metadata.is_dir() {
            if mode != 0o700 {
                found.push(format!("{} {mode:o}", entry.path().display()));
            }
            found.extend(not_private(&entry.path()));
        } else if mode & 0o077 != 0
            // Certificates are public; their keys, the stores and everything else are not.
            && entry.path().extension().is_none_or(|extension| extension != "pem")
        {
            found.push(format!("{} {mode:o}", entry.path().display()));
        }
    }
    found
}

#[test]
fn data_directories_are_private_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    // A data directory made before this rule, open to all.
    let agent_data = dir.path().join("web-1").join("agent");
    std::fs::create_dir_all(&agent_data).unwrap();
    std::fs::set_permissions(&agent_data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(agent_data.join("left-over"), "x").unwrap();
    std::fs::set_permissions(
        agent_data.join("left-over"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    // SAFETY: umask only swaps this process's mask; the children started below inherit it.
    let previous = unsafe { libc_umask(0o002) };
    let coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    let mut host = TestHost::must_prepare(dir.path(), "web-1", &coordinator);
    host.must_start_agent();
    unsafe { libc_umask(previous) };
    must_wait(
        std::time::Duration::from_secs(20),
        "the agent's store",
        || agent_data.join("store.key").exists().then_some(()),
    );
    let data_mode = std::fs::metadata(&agent_data).unwrap().permissions().mode() & 0o777;
    assert_eq!(data_mode, 0o700);
    assert_eq!(not_private(&agent_data), Vec::<String>::new());
    assert_eq!(
        not_private(&dir.path().join("coordinator").join("data")),
        Vec::<String>::new()
    );
}

unsafe extern "C" {
    #[link_name = "umask"]
    fn libc_umask(mask: u32) -> u32;
}

/// A FIFO in a release: the real agent's activation fails at once naming it (it hung a change
/// for over 40 s before), and `release register --from-dir` refuses it instead of hanging.
#[tokio::test(flavor = "multi_thread")]
async fn a_fifo_in_a_release_fails_the_step_by_name_instead_of_hanging() {
    use rewind_proto::v1 as pb;
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
    let (hosts, mut client) =
        rewind_tests::must_start_hosts(dir.path(), &coordinator, &["web-1"]).await;
    rewind_tests::must_register_web(&mut client, &hosts[0], false).await;
    let release = hosts[0].root.join("releases").join("v2");
    let fifo = release.join("pipe");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(
        made.success(),
        "mkfifo is needed: apt-get install coreutils"
    );

    let change = rewind_tests::must_change(&mut client, "v2").await;
    let failed =
        rewind_tests::must_change_where(&client, &change, "the change to fail", |change| {
            change.state == pb::ChangeState::Failed as i32
        })
        .await;
    assert_eq!(failed.hosts[0].activate, pb::StepState::Failed as i32);
    let log = std::fs::read_to_string(hosts[0].config_path.with_file_name("agent.log")).unwrap();
    assert!(
        log.contains("pipe") && log.contains("is a FIFO"),
        "the agent names the FIFO:\n{log}"
    );
    assert_ne!(
        hosts[0].current_link(),
        "releases/v2",
        "nothing was activated"
    );

    let mut register = Command::new(must_binary("rewindctl"))
        .args(["--coordinator", &coordinator.address])
        .args(["release", "register", "web", "v9", "--from-dir"])
        .arg(&release)
        .env("REWIND_TLS_DIR", coordinator.tls_dir())
        .env("REWIND_SERVER_NAME", "localhost")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = must_wait(
        std::time::Duration::from_secs(30),
        "release register to end",
        || register.try_wait().unwrap(),
    );
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(register.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("is a FIFO"), "{stderr}");
}
