//! Real PostgreSQL instances for tests: each its own data directory and loopback port, run as
//! the `postgres` user (PostgreSQL refuses to run as root), with prepared transactions enabled
//! for two-phase commit. `.ci/run` installs Debian's `postgresql` package.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// One running PostgreSQL server; stopped (immediate mode) when dropped.
pub struct Postgres {
    pub port: u16,
    dir: PathBuf,
    data_dir: PathBuf,
    bin_dir: PathBuf,
}

/// Where Debian's server binaries are (`/usr/lib/postgresql/<major>/bin`), newest first.
fn server_bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: apt-get install postgresql (tests/run-all does)")
        .filter_map(|entry| entry.ok().map(|entry| entry.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no /usr/lib/postgresql/<version>/bin/initdb: apt-get install postgresql")
}

/// Runs a server binary as the `postgres` user when we are root, as ourselves otherwise.
fn as_postgres(program: &Path) -> Command {
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|uids| uids.split_whitespace().next().map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

impl Postgres {
    /// Initialises and starts a server in `dir` (created, and handed to `postgres` when root)
    /// on a free loopback port, trusting local connections as user `postgres`.
    pub fn must_start(dir: &Path) -> Self {
        Self::must_start_with(dir, "")
    }

    /// [`Postgres::must_start`] with more server options (`-c name=value ...`).
    pub fn must_start_with(dir: &Path, extra_options: &str) -> Self {
        let bin_dir = server_bin_dir();
        std::fs::create_dir_all(dir).unwrap();
        if running_as_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown {} to postgres", dir.display());
        }
        let data_dir = dir.join("data");
        let output = as_postgres(&bin_dir.join("initdb"))
            .args(["--auth=trust", "--username=postgres", "--no-sync", "-D"])
            .arg(&data_dir)
            .output()
            .expect("run initdb");
        assert!(
            output.status.success(),
            "initdb {}: {}",
            data_dir.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let port = crate::free_port();
        // The guard exists before the server starts, so a start that times out is stopped too.
        let server = Self {
            port,
            dir: dir.to_path_buf(),
            data_dir,
            bin_dir,
        };
        server.must_run(extra_options);
        server
    }

    /// Stops the server and starts it again on the same data and port with `extra_options`
    /// (e.g. `-c max_prepared_transactions=0`); prepared transactions survive, as in a crash.
    pub fn must_restart_with(&self, extra_options: &str) {
        self.must_stop();
        self.must_run(extra_options);
    }

    /// Stops the server (a database host that went away); [`Self::must_start_again`] brings it
    /// back on the same data and port.
    pub fn must_stop(&self) {
        let output = as_postgres(&self.bin_dir.join("pg_ctl"))
            .args(["-w", "-D"])
            .arg(&self.data_dir)
            .args(["-m", "fast", "stop"])
            .output()
            .expect("run pg_ctl stop");
        assert!(output.status.success(), "pg_ctl stop: {output:?}");
    }

    pub fn must_start_again(&self) {
        self.must_run("");
    }

    fn must_run(&self, extra_options: &str) {
        let (dir, port, bin_dir, data_dir) = (&self.dir, self.port, &self.bin_dir, &self.data_dir);
        let options = format!(
            "-p {port} -k '{socket}' -c listen_addresses=127.0.0.1 -c max_prepared_transactions=16 \
             -c fsync=off -c shared_buffers=16MB {extra_options}",
            socket = dir.display()
        );
        let output = as_postgres(&bin_dir.join("pg_ctl"))
            .args(["-w", "-t", "60", "-D"])
            .arg(data_dir)
            .args(["-l"])
            .arg(dir.join("postgres.log"))
            .args(["-o", &options, "start"])
            .output()
            .expect("run pg_ctl start");
        assert!(
            output.status.success(),
            "pg_ctl start on port {port}: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default()
        );
        crate::must_wait(
            Duration::from_secs(30),
            "PostgreSQL to accept connections",
            || std::net::TcpStream::connect(("127.0.0.1", port)).ok(),
        );
    }

    /// Runs `sql` with psql (stopping at the first error) and returns its unaligned output.
    pub fn must_sql(&self, sql: &str) -> String {
        let output = Command::new("psql")
            .arg(self.url())
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-A", "-t", "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            output.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// A libpq connection string for database `postgres` as user `postgres`.
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin_dir.join("pg_ctl"))
            .args(["-D"])
            .arg(&self.data_dir)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}
