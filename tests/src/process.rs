//! Processes the tests start: the workspace binaries, built once; children killed when dropped,
//! their logs shown on failure; waiting for a condition, bounded.

use crate::*;

static BUILD: Once = Once::new();

/// Path of a workspace binary, built (once per test run) with the test profile.
pub fn must_binary(name: &str) -> PathBuf {
    let test_exe = std::env::current_exe().expect("current exe");
    // Tests run from target/<profile>/deps, the chaos binary from target/<profile>.
    let exe_dir = test_exe.parent().expect("target/<profile>");
    let profile_dir = if exe_dir.ends_with("deps") {
        exe_dir.parent().expect("target/<profile>")
    } else {
        exe_dir
    };
    let release = profile_dir.ends_with("release");
    // `cargo bench` runs a benchmark with `--bench`: it measures the binaries as shipped.
    let benchmark = std::env::args().any(|arg| arg == "--bench");
    BUILD.call_once(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut build = Command::new(env!("CARGO"));
        build.current_dir(&workspace).args([
            "build",
            "--quiet",
            "--bin",
            "rewind-coordinator",
            "--bin",
            "rewind-agent",
            "--bin",
            "rewindctl",
        ]);
        if release {
            build.arg("--release");
        }
        if !benchmark {
            // Tests build them with the crash points the recovery tests arm.
            build.args(["--features", rewind_shared::failpoint::BUILD_FEATURES]);
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "cargo build of the binaries failed");
    });
    let path = profile_dir.join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A child process killed (SIGKILL) when dropped. Dropped while its test panics, it prints the
/// tail of its log: the temporary directory holding the log goes with the test, and a failure
/// seen once in CI must be explainable from CI's output alone.
pub struct Process {
    pub child: Child,
    log: PathBuf,
}

impl Process {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How many of a process's last log lines a failing test prints.
const LOG_TAIL_ON_FAILURE: usize = 60;

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_ON_FAILURE)..];
            eprintln!(
                "--- last {} lines of {} ---\n{}",
                tail.len(),
                self.log.display(),
                tail.join("\n")
            );
        }
    }
}

pub(crate) fn spawn(binary: &Path, args: &[&str], log: &Path) -> Process {
    spawn_in(None, binary, args, log)
}

pub(crate) fn spawn_in(
    namespace: Option<&str>,
    binary: &Path,
    args: &[&str],
    log: &Path,
) -> Process {
    spawn_with(namespace, binary, args, log, "")
}

/// How a process is started: directly, inside a network namespace, or under an open-files limit.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) enum Launch<'a> {
    #[default]
    Direct,
    InNamespace(&'a str),
    /// `prlimit --nofile=N:N`: soft and hard limit both, so the process cannot raise it.
    WithOpenFiles(u64),
}

/// Starts `binary`, inside network namespace `namespace` when given (`ip netns exec` execs it,
/// so the child's pid is the binary's and a kill reaches it), with `REWIND_FAILPOINTS` set to
/// `failpoints` (crash points, see `rewind_shared::failpoint`). The log is appended to, so a
/// restarted process's log follows the one before.
pub(crate) fn spawn_with(
    namespace: Option<&str>,
    binary: &Path,
    args: &[&str],
    log: &Path,
    failpoints: &str,
) -> Process {
    let launch = namespace.map_or(Launch::Direct, Launch::InNamespace);
    spawn_launched(launch, binary, args, log, failpoints)
}

pub(crate) fn spawn_launched(
    launch: Launch<'_>,
    binary: &Path,
    args: &[&str],
    log: &Path,
    failpoints: &str,
) -> Process {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("create log");
    let mut command = match launch {
        Launch::InNamespace(namespace) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", namespace]).arg(binary);
            command
        }
        Launch::WithOpenFiles(limit) => {
            let mut command = Command::new("prlimit");
            command
                .arg(format!("--nofile={limit}:{limit}"))
                .arg("--")
                .arg(binary);
            command
        }
        Launch::Direct => Command::new(binary),
    };
    let child = command
        .args(args)
        .env("REWIND_LOG", "info,sled=warn")
        .env("REWIND_FAILPOINTS", failpoints)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|error| panic!("start {}: {error}", binary.display()));
    Process {
        child,
        log: log.to_path_buf(),
    }
}

/// A free loopback port (bound then released: another process could take it in between, which
/// on a test machine does not happen in practice).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The stdout of a `rewindctl` run that must have succeeded.
pub fn run_ok(output: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "rewindctl failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Polls `check` every 100 ms until it returns a value; panics after `limit`.
pub fn must_wait<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Async form of [`must_wait`].
pub async fn must_wait_async<T, F>(limit: Duration, what: &str, mut check: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
