//! Disks that fail under a coordinator member: a real ext4 filesystem on a loop device mounted
//! as the member's data directory, then filled (ENOSPC), shut down (every write and fsync fails
//! with EIO, as a dying disk's do), or frozen (every write blocks, as a stalled disk's do).
//!
//! What must hold: a member whose disk fails exits (status 74) rather than retry or serve on;
//! the others keep acknowledging writes; nothing acknowledged is lost; and once the disk is
//! healthy again the member, started again, catches up to the same state. A stalled disk on one
//! member does not stall the others. An agent whose store's disk fills exits the same way and
//! finishes its steps once there is room. Needs root (loop devices, mount), as CI has.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rewind_proto::v1 as pb;
use rewind_tests::{ClusterHarness, plain_service};

/// Size of a member's filesystem: room for a small cluster's log, small enough to fill at once.
const DISK_MIB: u64 = 64;
/// Longest a member may take to notice its failed disk and exit.
const EXIT_WITHIN: Duration = Duration::from_secs(60);
/// Longest one write may take through the members that still stand.
const WRITE_WITHIN: Duration = Duration::from_secs(30);
/// Longest a restarted member may take to reach the leader's state.
const CATCH_UP_WITHIN: Duration = Duration::from_secs(60);

/// The tools a disk needs, each with the package that has it.
const TOOLS: [(&str, &str); 5] = [
    ("losetup", "mount"),
    ("mkfs.ext4", "e2fsprogs"),
    ("e2fsck", "e2fsprogs"),
    ("fsfreeze", "util-linux"),
    ("fallocate", "util-linux"),
];

/// Fails with one line naming a missing tool and its package.
pub fn must_have_tools() {
    for (tool, package) in TOOLS {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|output| output.status.success());
        assert!(found, "{tool} is needed: apt-get install {package}");
    }
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// An ext4 filesystem on a loop device, mounted at `mount`. Dropped: thawed, unmounted, gone.
pub struct Disk {
    image: PathBuf,
    device: String,
    pub mount: PathBuf,
    frozen: bool,
}

impl Disk {
    pub fn create(image: &Path, mount: &Path) -> anyhow::Result<Self> {
        std::fs::File::create(image)?.set_len(DISK_MIB << 20)?;
        let device = run(
            "losetup",
            &["--find", "--show", image.to_str().context("image path")?],
        )?;
        let disk = Self {
            image: image.to_path_buf(),
            device,
            mount: mount.to_path_buf(),
            frozen: false,
        };
        // No blocks reserved for root (the member runs as root here), journal and tables
        // written now rather than lazily behind the test's back.
        run(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-m",
                "0",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                &disk.device,
            ],
        )?;
        std::fs::create_dir_all(mount)?;
        disk.mount_it()?;
        Ok(disk)
    }

    fn mount_it(&self) -> anyhow::Result<()> {
        run(
            "mount",
            &[
                "-t",
                "ext4",
                "-o",
                "errors=continue",
                &self.device,
                self.mount.to_str().context("mount path")?,
            ],
        )
        .map(drop)
    }

    fn ballast(&self) -> PathBuf {
        self.mount.join("ballast")
    }

    /// Takes every free block: the next write that needs one fails with ENOSPC. The bulk is
    /// allocated at once; the last blocks (fallocate needs room for its own extent tree) are
    /// written until the filesystem refuses.
    pub fn fill(&self) -> anyhow::Result<()> {
        use std::io::Write;
        let free = rustix_free_bytes(&self.mount)?;
        let bulk = free.saturating_sub(2 << 20);
        run(
            "fallocate",
            &[
                "-l",
                &bulk.to_string(),
                self.ballast().to_str().context("ballast path")?,
            ],
        )?;
        let mut rest = std::fs::File::create(self.mount.join("ballast-rest"))?;
        let block = vec![0u8; 4096];
        loop {
            match rest.write_all(&block).and_then(|()| rest.sync_data()) {
                Ok(()) => continue,
                Err(error) if error.raw_os_error() == Some(libc::ENOSPC) => return Ok(()),
                Err(error) => return Err(error).context("fill the last blocks"),
            }
        }
    }

    pub fn free(&self) -> anyhow::Result<()> {
        std::fs::remove_file(self.ballast()).context("remove the ballast")?;
        std::fs::remove_file(self.mount.join("ballast-rest")).context("remove the ballast")
    }

    /// What a dying disk does: from now on every write and fsync on it fails with EIO.
    pub fn shut_down(&self) -> anyhow::Result<()> {
        /// `EXT4_IOC_SHUTDOWN`, `_IOR('X', 125, __u32)`.
        const EXT4_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587d;
        /// Do not flush the journal first: the disk is gone.
        const EXT4_GOING_FLAGS_NOLOGFLUSH: u32 = 2;
        let dir = std::fs::File::open(&self.mount)?;
        let flags = EXT4_GOING_FLAGS_NOLOGFLUSH;
        // SAFETY: the ioctl reads one u32 from the pointer, which lives across the call.
        let result = unsafe { libc::ioctl(dir.as_raw_fd(), EXT4_IOC_SHUTDOWN as _, &flags) };
        if result != 0 {
            bail!(
                "shut down {}: {}",
                self.mount.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// After a shutdown: unmounted, checked and repaired, mounted again.
    pub fn repair(&self) -> anyhow::Result<()> {
        run("umount", &[self.mount.to_str().context("mount path")?])?;
        // 1: errors corrected, which is what a shutdown leaves.
        let checked = Command::new("e2fsck")
            .args(["-fy", &self.device])
            .output()?;
        if !matches!(checked.status.code(), Some(0 | 1)) {
            bail!(
                "e2fsck {}: {}",
                self.device,
                String::from_utf8_lossy(&checked.stdout)
            );
        }
        self.mount_it()
    }

    /// What a stalled disk does: every write to it blocks until [`Disk::thaw`].
    pub fn freeze(&mut self) -> anyhow::Result<()> {
        run(
            "fsfreeze",
            &["--freeze", self.mount.to_str().context("mount path")?],
        )?;
        self.frozen = true;
        Ok(())
    }

    pub fn thaw(&mut self) -> anyhow::Result<()> {
        if self.frozen {
            run(
                "fsfreeze",
                &["--unfreeze", self.mount.to_str().context("mount path")?],
            )?;
            self.frozen = false;
        }
        Ok(())
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        // A process blocked on a frozen disk cannot even be killed until it thaws.
        let _ = self.thaw();
        let mount = self.mount.to_string_lossy().into_owned();
        let _ = run("umount", &["-l", &mount]);
        let _ = run("losetup", &["-d", &self.device]);
        let _ = std::fs::remove_file(&self.image);
    }
}

fn rustix_free_bytes(path: &Path) -> anyhow::Result<u64> {
    let stat = rustix::fs::statvfs(path).context("statvfs")?;
    Ok(stat.f_bavail * stat.f_frsize)
}

/// Writes one service through whichever member leads, retrying on the others (a member that
/// exits or loses leadership answers an error, never a false success); returns once one
/// acknowledged it. The request id makes a retry of a write that did land act once.
async fn must_write(cluster: &ClusterHarness, name: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    while started.elapsed() < WRITE_WITHIN {
        for address in &cluster.addresses {
            let Ok(mut client) = cluster.client_for(address).await else {
                continue;
            };
            let written = tokio::time::timeout(
                Duration::from_secs(5),
                client.put_service(pb::PutServiceRequest {
                    request_id: format!("write-{name}"),
                    service: Some(plain_service(name)),
                }),
            )
            .await;
            if let Ok(Ok(_)) = written {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("no member acknowledged {name} within {WRITE_WITHIN:?}")
}

/// Every service acknowledged so far is in the leader's state.
async fn must_hold_every_write(cluster: &ClusterHarness, written: &[String]) -> anyhow::Result<()> {
    let (_, mut client) = cluster.must_leader().await;
    let services = client
        .list_services(pb::ListServicesRequest {})
        .await?
        .into_inner()
        .services;
    for name in written {
        if !services.iter().any(|service| &service.name == name) {
            bail!("acknowledged write {name} is missing after recovery");
        }
    }
    Ok(())
}

/// Writes until `member` exits (it must, with status 74), counting what was acknowledged.
async fn write_until_it_exits(
    cluster: &mut ClusterHarness,
    member: u64,
    written: &mut Vec<String>,
    label: &str,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut round = 0;
    loop {
        if let Some(status) = cluster.exited(member) {
            if status.code() != Some(i32::from(rewind_shared::config::EXIT_STORAGE_FAILED)) {
                bail!("{label}: member {member} exited with {status}, not 74");
            }
            return Ok(());
        }
        if started.elapsed() > EXIT_WITHIN {
            bail!("{label}: member {member} did not exit within {EXIT_WITHIN:?}");
        }
        let name = format!("{label}-{round}");
        must_write(cluster, &name).await?;
        written.push(name);
        round += 1;
    }
}

/// Starts `member` again, as its supervisor would, and waits for it to reach the leader's state.
async fn restart_and_catch_up(cluster: &mut ClusterHarness, member: u64) -> anyhow::Result<()> {
    cluster.must_start_member(member);
    let (leader, _) = cluster.must_leader().await;
    cluster
        .catch_up(member, leader, CATCH_UP_WITHIN, true)
        .await
        .map(drop)
        .map_err(anyhow::Error::msg)
}

/// One run: `member` (chosen by the seed) gets its own disk; it is filled, then shut down, and
/// each time the member must exit, the others carry on, and it recovers once the disk does.
pub async fn disk_fills_then_fails(seed: u64, dir: &Path) -> anyhow::Result<u64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let member = rng.random_range(1..=3u64);
    let before = rng.random_range(5..=20usize);
    let created = Disk::create(
        &dir.join("member.img"),
        &dir.join(format!("member-{member}")),
    )?;
    let mut cluster = ClusterHarness::must_start(dir, 3);
    let disk = created;
    let mut written = Vec::new();
    for index in 0..before {
        let name = format!("before-{index}");
        must_write(&cluster, &name).await?;
        written.push(name);
    }

    // A full disk: the member exits; the others serve; it comes back once there is room.
    disk.fill()?;
    write_until_it_exits(&mut cluster, member, &mut written, "full").await?;
    disk.free()?;
    restart_and_catch_up(&mut cluster, member).await?;

    // A dying disk: every write and fsync fails with EIO.
    disk.shut_down()?;
    write_until_it_exits(&mut cluster, member, &mut written, "failed").await?;
    disk.repair()?;
    restart_and_catch_up(&mut cluster, member).await?;
    must_hold_every_write(&cluster, &written).await?;
    Ok(member)
}

/// One run: a follower's disk stalls (frozen) while writes go on, then the leader's does; the
/// cluster keeps acknowledging writes through the others, and each catches up once thawed.
pub async fn disk_stalls(seed: u64, dir: &Path) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let stall = Duration::from_millis(rng.random_range(2_000..=6_000));
    let mut created = Vec::new();
    for id in 1..=3u64 {
        created.push(Disk::create(
            &dir.join(format!("member-{id}.img")),
            &dir.join(format!("member-{id}")),
        )?);
    }
    let cluster = ClusterHarness::must_start(dir, 3);
    // Declared after the cluster so they drop (thaw) first: a process blocked on a frozen disk
    // cannot be killed until it thaws.
    let mut disks = created;
    let mut written = Vec::new();
    for index in 0..5 {
        let name = format!("before-{index}");
        must_write(&cluster, &name).await?;
        written.push(name);
    }
    for round in ["follower", "leader"] {
        let (leader, _) = cluster.must_leader().await;
        let stalled = if round == "leader" {
            leader
        } else {
            (1..=3).find(|&id| id != leader).unwrap_or(1)
        };
        disks[stalled as usize - 1].freeze()?;
        let frozen_at = Instant::now();
        let mut index = 0;
        while frozen_at.elapsed() < stall || index < 5 {
            let name = format!("{round}-stalled-{index}");
            must_write(&cluster, &name).await?;
            written.push(name);
            index += 1;
        }
        disks[stalled as usize - 1].thaw()?;
        let (leader, _) = cluster.must_leader().await;
        cluster
            .catch_up(stalled, leader, CATCH_UP_WITHIN, true)
            .await
            .map_err(anyhow::Error::msg)?;
    }
    must_hold_every_write(&cluster, &written).await?;
    Ok(())
}

/// One run: a host's agent keeps its store on a disk that fills in the middle of a rollback.
/// The agent must exit (74) rather than act on what it could not journal, the rollback must not
/// record that host's step as done, and once the space returns the agent, started again,
/// finishes the rollback (only the step interrupted began twice, from the journal's counts).
pub async fn agent_disk_fills(dir: &Path) -> anyhow::Result<()> {
    use rewind_tests::{
        Coordinator, must_deploy_v1_then_v2, must_rollback_end, must_start_hosts, must_wait_async,
    };
    let created = Disk::create(&dir.join("agent.img"), &dir.join("web-1").join("agent"))?;
    // A step with no result is sent again after 5 s: the restarted agent gets it soon.
    let coordinator =
        Coordinator::must_start_with(&dir.join("coordinator"), "[engine]\nstep-timeout-s = 5\n");
    let (mut hosts, mut client) = must_start_hosts(dir, &coordinator, &["web-1"]).await;
    let disk = created;
    must_deploy_v1_then_v2(&mut client, &hosts).await;
    let change = client
        .list_changes(pb::ListChangesRequest {
            service: "web".into(),
            page_size: 1,
            ..Default::default()
        })
        .await?
        .into_inner()
        .changes
        .into_iter()
        .next()
        .context("the v2 change")?;

    disk.fill()?;
    let rollback = client
        .start_rollback(pb::StartRollbackRequest {
            request_id: "rb-disk-full".into(),
            change_id: change.change_id.clone(),
            reason: "the agent's disk fills".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .rollback
        .context("a rollback")?;
    let host = &mut hosts[0];
    let status = must_wait_async(EXIT_WITHIN, "the agent to exit on its full disk", || {
        let exited = host
            .agent
            .as_mut()
            .and_then(|agent| agent.child.try_wait().ok().flatten());
        async move { exited }
    })
    .await;
    if status.code() != Some(i32::from(rewind_shared::config::EXIT_STORAGE_FAILED)) {
        bail!("the agent exited with {status}, not 74");
    }
    let during = client
        .get_rollback(pb::GetRollbackRequest {
            rollback_id: rollback.rollback_id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .rollback
        .context("the rollback")?;
    if during.state == pb::RollbackState::Succeeded as i32 {
        bail!("the rollback succeeded while its host could not write its journal");
    }

    disk.free()?;
    host.must_start_agent();
    let ended = must_rollback_end(&client, &rollback.rollback_id).await;
    if ended.state != pb::RollbackState::Succeeded as i32 {
        bail!(
            "the rollback ended {:?} after the disk recovered",
            ended.state
        );
    }
    host.must_be_restored_to_v1();
    // Only the step in flight when the store failed may have begun twice (its outcome could
    // not be journalled; steps are idempotent): every other ran once.
    let journal = host.must_stop_and_read_journal();
    let again: Vec<&serde_json::Value> = journal
        .iter()
        .filter(|entry| entry["runs"].as_u64().unwrap_or(1) > 1)
        .collect();
    if again.len() > 1 || again.iter().any(|entry| entry["runs"].as_u64() > Some(2)) {
        bail!("steps began more than once beyond the one interrupted: {again:?}");
    }
    drop(hosts);
    drop(coordinator);
    drop(disk);
    Ok(())
}
