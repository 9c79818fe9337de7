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
    /// A child started elsewhere (a third-party server a test runs), killed when dropped; its
    /// `log` tail is printed if the test fails.
    pub fn adopt(child: Child, log: PathBuf) -> Self {
        Self { child, log }
    }

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
    /// Directly, with these environment variables besides the usual ones.
    WithEnvironment(&'a [(&'a str, &'a str)]),
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
        Launch::WithEnvironment(_) => Command::new(binary),
        Launch::Direct => Command::new(binary),
    };
    let child = command
        .args(args)
        .env("REWIND_LOG", "info,sled=warn")
        .env("REWIND_FAILPOINTS", failpoints)
        // Last: they may set REWIND_LOG too.
        .envs(
            match launch {
                Launch::WithEnvironment(variables) => variables,
                _ => &[],
            }
            .iter()
            .copied(),
        )
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

/// Whether a program of that name is on PATH.
pub fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|output| output.status.success())
}

/// A free loopback port for a process that may be restarted on it. Taken below the kernel's
/// ephemeral range (32768-60999 by default), from which every outgoing connection gets its
/// local port: a port from that range, released while its process is down, can be taken by any
/// other test's connection, and the restart then fails with "address in use" (seen in CI).
/// Ports are handed out in turn from an offset of this process's own, each checked free.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = std::process::id().wrapping_mul(7_919);
    for _ in 0..COUNT {
        let port = FIRST + (offset.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % COUNT);
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + COUNT)
}

/// A free loopback `host:port` (see [`free_port`]).
pub fn free_address() -> String {
    format!("127.0.0.1:{}", free_port())
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

/// What a finished command printed, stdout then stderr, for assertions and failure messages.
pub fn output_text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `rewindctl` with no cluster to talk to (an address nothing listens on): for what it does
/// offline, such as `audit verify --file`.
pub fn rewindctl_offline(args: &[&str]) -> std::process::Output {
    std::process::Command::new(must_binary("rewindctl"))
        .args(["--coordinator", "127.0.0.1:9"])
        .args(args)
        .output()
        .expect("run rewindctl")
}
