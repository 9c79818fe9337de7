//! Clusters of coordinator processes: start, kill, upgrade, partition, compare members.

use crate::*;

/// How a [`ClusterHarness`] is set up.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// `storage.snapshot-every` of every member.
    pub snapshot_every: u64,
    /// A member that listens apart from the address the others dial (a proxy the test runs in
    /// front of it). Loopback clusters only.
    pub listen_apart: Option<ListenApart>,
    /// The coordinator binary members start from (another release's); this build's if None.
    pub coordinator_binary: Option<PathBuf>,
    /// `storage.initial-cluster-version` (0: not written, the binary's own).
    pub initial_cluster_version: u32,
    /// Appended to every member's config: whole tables (`[audit]\nretain-entries = 3\n`).
    pub extra_config: String,
    /// Every member's `[engine]` and `[health]` tables (tests' short timeouts by default).
    pub engine_and_health: String,
    /// `cluster.tick-ms`: 50 in tests, so elections are quick (the default is 100).
    pub cluster_tick_ms: u64,
    /// Each member's region (id - 1); `region-<id>` when not given.
    pub member_regions: Vec<String>,
    /// Namespaces on a partitionable cluster's network beyond the members', for agents the
    /// test cuts off with members ([`ClusterHarness::spare_namespace`]).
    pub spare_namespaces: u64,
}

#[derive(Clone, Debug)]
pub struct ListenApart {
    pub member: u64,
    /// Where it listens.
    pub listen: String,
    /// What peers, agents and clients dial.
    pub advertised: String,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            // Small, so snapshots, compaction and snapshot installs happen in every test run.
            snapshot_every: 50,
            listen_apart: None,
            coordinator_binary: None,
            initial_cluster_version: 0,
            extra_config: String::new(),
            engine_and_health:
                "[engine]\nstep-timeout-s = 5\nverify-timeout-s = 20\ntick-ms = 100\n\
                                [health]\nreport-interval-ms = 300\nwindow-s = 3"
                    .into(),
            cluster_tick_ms: 50,
            member_regions: Vec::new(),
            spare_namespaces: 0,
        }
    }
}

/// A multi-member coordinator cluster of real processes on loopback, with its own CA.
pub struct ClusterHarness {
    pub dir: PathBuf,
    pub tls_dir: PathBuf,
    pub ca: DevCa,
    /// What peers, agents and clients dial, by member (id - 1).
    pub addresses: Vec<String>,
    /// Where each member listens: its address, unless the test put something in between.
    listens: Vec<String>,
    /// Each member's `/metrics` and webhooks (plain HTTP).
    pub http_addresses: Vec<String>,
    members: Vec<Option<Process>>,
    /// Members run in their own network namespaces here, when the cluster can be partitioned.
    network: Option<PrivateNet>,
    /// Members cut off from the network right now.
    cut: Vec<u64>,
    /// `storage.snapshot-every` of every member: small in tests so snapshots happen.
    snapshot_every: u64,
    /// `storage.initial-cluster-version` (0: not written).
    initial_cluster_version: u32,
    extra_config: String,
    engine_and_health: String,
    cluster_tick_ms: u64,
    member_regions: Vec<String>,
    /// The binary each member (id - 1) starts from.
    binaries: Vec<PathBuf>,
}

impl ClusterHarness {
    /// Starts `size` members (ids 1..=size) that bootstrap one cluster, on loopback.
    pub fn must_start(dir: &Path, size: u64) -> Self {
        Self::must_start_with(dir, size, None, ClusterOptions::default())
    }

    /// Like [`ClusterHarness::must_start`], with these options.
    pub fn must_start_with_options(dir: &Path, size: u64, options: ClusterOptions) -> Self {
        Self::must_start_with(dir, size, None, options)
    }

    /// Like [`ClusterHarness::must_start`], each member in its own network namespace on a
    /// private network, so [`ClusterHarness::cut`] can partition it. Needs root.
    pub fn must_start_partitionable(dir: &Path, size: u64) -> Self {
        Self::must_start_partitionable_with(dir, size, ClusterOptions::default())
    }

    /// Like [`ClusterHarness::must_start_partitionable`], with these options.
    pub fn must_start_partitionable_with(dir: &Path, size: u64, options: ClusterOptions) -> Self {
        let network = PrivateNet::create(size + options.spare_namespaces)
            .unwrap_or_else(|error| panic!("build a private network: {error}"));
        Self::must_start_with(dir, size, Some(network), options)
    }

    /// The `index`th (from 1) namespace beyond the members', for processes the test starts in
    /// it (agents); [`ClusterHarness::cut_spare`] cuts it off.
    pub fn spare_namespace(&self, index: u64) -> String {
        let network = self.network.as_ref().expect("a partitionable cluster");
        network.namespace(self.members.len() as u64 + index)
    }

    /// Cuts the `index`th spare namespace off the network (every process in it).
    pub fn cut_spare(&self, index: u64) {
        let network = self.network.as_ref().expect("a partitionable cluster");
        network.cut(self.members.len() as u64 + index).unwrap();
    }

    /// Plugs the `index`th spare namespace back in.
    pub fn heal_spare(&self, index: u64) {
        let network = self.network.as_ref().expect("a partitionable cluster");
        network.heal(self.members.len() as u64 + index).unwrap();
    }

    /// Like [`ClusterHarness::must_start`] with the production snapshot interval, for
    /// benchmarks.
    /// Founded at `cluster_version` (0: the binary's own).
    pub fn must_start_for_benchmark(dir: &Path, size: u64, cluster_version: u32) -> Self {
        let options = ClusterOptions {
            snapshot_every: 10_000,
            initial_cluster_version: cluster_version,
            ..ClusterOptions::default()
        };
        Self::must_start_with(dir, size, None, options)
    }

    fn must_start_with(
        dir: &Path,
        size: u64,
        network: Option<PrivateNet>,
        options: ClusterOptions,
    ) -> Self {
        let tls_dir = dir.join("tls");
        std::fs::create_dir_all(&tls_dir).unwrap();
        let ca = DevCa::generate("test cluster CA").unwrap();
        ca.save(&tls_dir).unwrap();
        ca.write_identity(&tls_dir, &Subject::new(Kind::User, dev_ca::OPERATOR), &[])
            .unwrap();
        // The operator administers the cluster, as `--dev` makes it.
        let policy = format!(
            "[[binding]]\nname = \"operator-admin\"\nrole = \"admin\"\nidentities = [\"user:{}\"]\nscopes = [\"*\"]\n\n\
             [[binding]]\nname = \"monitoring\"\nrole = \"operator\"\n\
             identities = [\"automation:alertmanager\", \"automation:webhook\"]\nscopes = [\"*\"]\n",
            dev_ca::OPERATOR
        );
        std::fs::write(dir.join("policy.toml"), policy).unwrap();
        let addresses: Vec<String> = match &network {
            Some(network) => (1..=size)
                .map(|id| format!("{}:7443", network.address(id)))
                .collect(),
            None => {
                // Distinct free ports, outside the range outgoing connections take theirs from.
                (0..size).map(|_| free_address()).collect()
            }
        };
        let mut listens = addresses.clone();
        let mut addresses = addresses;
        if let Some(apart) = options.listen_apart {
            addresses[apart.member as usize - 1] = apart.advertised;
            listens[apart.member as usize - 1] = apart.listen;
        }
        let http_addresses = listens
            .iter()
            .map(|listen| {
                let host = listen
                    .rsplit_once(':')
                    .map_or("127.0.0.1", |(host, _)| host);
                format!("{host}:{}", free_port())
            })
            .collect();
        let mut harness = Self {
            dir: dir.to_path_buf(),
            tls_dir,
            ca,
            addresses,
            listens,
            http_addresses,
            members: Vec::new(),
            network,
            cut: Vec::new(),
            snapshot_every: options.snapshot_every,
            initial_cluster_version: options.initial_cluster_version,
            extra_config: options.extra_config,
            engine_and_health: options.engine_and_health,
            cluster_tick_ms: options.cluster_tick_ms,
            member_regions: options.member_regions,
            binaries: Vec::new(),
        };
        let binary = options
            .coordinator_binary
            .unwrap_or_else(|| must_binary("rewind-coordinator"));
        for id in 1..=size {
            harness.must_write_identity(id);
            harness.write_config(id, false);
            harness.members.push(None);
            harness.binaries.push(binary.clone());
            harness.must_start_member(id);
        }
        harness
    }

    /// Member `id`'s certificate: its CN, and the host of its address as a SAN.
    fn must_write_identity(&self, id: u64) {
        let host = self.addresses[id as usize - 1]
            .rsplit_once(':')
            .map(|(host, _)| host.to_string())
            .unwrap();
        self.ca
            .write_identity(
                &self.tls_dir,
                &Subject::member(id, &format!("coordinator-{id}")),
                &["localhost", "127.0.0.1", &host],
            )
            .unwrap();
    }

    /// Prepares a host for each of `ids` whose agent dials this cluster's members (not started).
    pub fn must_prepare_hosts(&self, dir: &Path, ids: &[&str]) -> Vec<TestHost> {
        ids.iter()
            .map(|id| TestHost::must_prepare_for(dir, id, &self.ca, &self.tls_dir, &self.addresses))
            .collect()
    }

    /// Cuts member `id` off from every peer, agent and client (needs a partitionable cluster).
    pub fn cut(&mut self, id: u64) {
        let network = self.network.as_ref().expect("a partitionable cluster");
        network.cut(id).unwrap();
        self.cut.push(id);
    }

    /// Reconnects member `id`.
    pub fn heal(&mut self, id: u64) {
        let network = self.network.as_ref().expect("a partitionable cluster");
        network.heal(id).unwrap();
        self.cut.retain(|&cut| cut != id);
    }

    /// Members cut off right now.
    pub fn cut_members(&self) -> &[u64] {
        &self.cut
    }

    fn config_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("member-{id}.toml"))
    }

    /// Starts one more member (the next id) that joins the running cluster: its config sets
    /// `cluster.join` and lists every member so far. Returns its id; the cluster still has to add
    /// it (`rewindctl cluster add`).
    pub fn must_start_joining(&mut self) -> u64 {
        self.must_start_joining_from(&must_binary("rewind-coordinator"))
    }

    /// Like [`ClusterHarness::must_start_joining`], from `binary` (another release's).
    pub fn must_start_joining_from(&mut self, binary: &Path) -> u64 {
        assert!(
            self.network.is_none(),
            "a joining member runs on loopback only"
        );
        let address = free_address();
        self.addresses.push(address.clone());
        self.listens.push(address);
        self.http_addresses
            .push(format!("127.0.0.1:{}", free_port()));
        let id = self.addresses.len() as u64;
        self.must_write_identity(id);
        self.write_config(id, true);
        self.members.push(None);
        self.binaries.push(binary.to_path_buf());
        self.must_start_member(id);
        id
    }

    /// Runs `rewindctl` as the operator against member `id`, and returns what it printed.
    pub fn rewindctl(&self, id: u64, args: &[&str]) -> std::process::Output {
        std::process::Command::new(must_binary("rewindctl"))
            .args(["--coordinator", &self.addresses[id as usize - 1]])
            .args(args)
            .env("REWIND_TLS_DIR", &self.tls_dir)
            .env("REWIND_SERVER_NAME", "localhost")
            // Never the contexts of whoever runs the tests.
            .env("REWIND_CONTEXTS_FILE", "/nonexistent/rewind-contexts.toml")
            .output()
            .expect("run rewindctl")
    }

    fn write_config(&self, id: u64, join: bool) {
        let members: String = self
            .addresses
            .iter()
            .enumerate()
            .map(|(index, address)| {
                let region = self
                    .member_regions
                    .get(index)
                    .cloned()
                    .unwrap_or_else(|| format!("region-{}", index + 1));
                format!(
                    "[[cluster.member]]\nid = {}\naddress = \"{address}\"\nregion = \"{region}\"\n",
                    index + 1
                )
            })
            .collect();
        let tls = self.tls_dir.display();
        let config = format!(
            r#"listen = "{listen}"
data-dir = "{data}"
[tls]
ca = "{tls}/ca.pem"
cert = "{tls}/coordinator-{id}.pem"
key = "{tls}/coordinator-{id}.key"
{engine_and_health}
[storage]
snapshot-every = {snapshot_every}
{initial_version}
[http]
listen = "{http}"
[access]
bootstrap-policy-file = "{policy}"
[cluster]
id = "test-cluster"
member-id = {id}
tick-ms = {cluster_tick_ms}
join = {join}
{members}{extra}"#,
            listen = self.listens[id as usize - 1],
            http = self.http_addresses[id as usize - 1],
            snapshot_every = self.snapshot_every,
            engine_and_health = self.engine_and_health,
            cluster_tick_ms = self.cluster_tick_ms,
            initial_version = match self.initial_cluster_version {
                0 => String::new(),
                version => format!("initial-cluster-version = {version}"),
            },
            data = self.dir.join(format!("member-{id}")).display(),
            policy = self.dir.join("policy.toml").display(),
            extra = self.extra_config,
        );
        std::fs::write(self.config_path(id), config).unwrap();
    }

    pub fn must_start_member(&mut self, id: u64) {
        self.must_start_member_with_failpoints(id, "");
    }

    /// Starts member `id` with crash points armed (`REWIND_FAILPOINTS`, see
    /// `rewind_shared::failpoint`): it exits at the first one it reaches ([`Self::exited`]).
    pub fn must_start_member_with_failpoints(&mut self, id: u64, failpoints: &str) {
        let config = self.config_path(id);
        let log = self.dir.join(format!("member-{id}.log"));
        let namespace = self.network.as_ref().map(|network| network.namespace(id));
        let process = spawn_with(
            namespace.as_deref(),
            &self.binaries[id as usize - 1],
            &["--config", config.to_str().unwrap()],
            &log,
            failpoints,
        );
        self.members[id as usize - 1] = Some(process);
    }

    /// Starts member `id` from `binary` (another release's), as it will be started from now on:
    /// an upgrade in place when it ran another binary on the same data directory.
    pub fn must_start_member_from(&mut self, id: u64, binary: &Path) {
        self.binaries[id as usize - 1] = binary.to_path_buf();
        self.must_start_member(id);
    }

    /// If member `id` exited on its own: its status (and it counts as stopped from now on).
    pub fn exited(&mut self, id: u64) -> Option<std::process::ExitStatus> {
        let slot = &mut self.members[id as usize - 1];
        let status = slot.as_mut()?.child.try_wait().ok().flatten()?;
        *slot = None;
        Some(status)
    }

    /// SIGTERM, as a service manager stops a member; waits up to `limit` for it to exit, and
    /// kills it if it has not.
    pub async fn terminate(
        &mut self,
        id: u64,
        limit: Duration,
    ) -> Result<std::process::ExitStatus, String> {
        let Some(mut process) = self.members[id as usize - 1].take() else {
            return Err(format!("member {id} is not running"));
        };
        let pid = process.child.id() as libc::pid_t;
        // SAFETY: kill(2) with a pid this harness started and has not reaped yet.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(format!(
                "SIGTERM to member {id}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let started = std::time::Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(status)) = process.child.try_wait() {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        process.kill();
        Err(format!(
            "member {id} did not stop within {} s of SIGTERM",
            limit.as_secs()
        ))
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut process) = self.members[id as usize - 1].take() {
            process.kill();
        }
    }

    pub async fn client_for(&self, address: &str) -> Result<ControlServiceClient<Channel>, String> {
        Ok(ControlServiceClient::new(self.channel_for(address).await?))
    }

    /// A channel to one member, authenticated as the operator.
    pub async fn channel_for(&self, address: &str) -> Result<Channel, String> {
        operator_channel(&self.tls_dir, address).await
    }

    /// A channel to one member with member 1's certificate: only members call
    /// `MemberService` and `RaftService`.
    pub async fn member_channel_for(&self, address: &str) -> Result<Channel, String> {
        tls_channel(&TlsFiles::in_dir(&self.tls_dir, "coordinator-1"), address).await
    }

    /// A counter or gauge from member `id`'s `/metrics` (0 when the series is not there yet).
    pub async fn metric(&self, id: u64, series: &str) -> f64 {
        let url = format!("http://{}/metrics", self.http_addresses[id as usize - 1]);
        let text = reqwest::get(&url)
            .await
            .and_then(reqwest::Response::error_for_status)
            .unwrap_or_else(|error| panic!("scrape {url}: {error}"))
            .text()
            .await
            .unwrap_or_else(|error| panic!("read {url}: {error}"));
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Ids of the members currently running.
    pub fn live_members(&self) -> Vec<u64> {
        (1..=self.members.len() as u64)
            .filter(|&id| self.members[id as usize - 1].is_some())
            .collect()
    }

    /// Member `id`'s process id, while it runs (for benchmarks reading its /proc figures).
    pub fn pid(&self, id: u64) -> Option<u32> {
        Some(self.members[id as usize - 1].as_ref()?.child.id())
    }

    /// Member `id`'s latest state snapshot on disk: the index it covers and its size in bytes.
    pub fn latest_snapshot(&self, id: u64) -> Option<(u64, u64)> {
        let dir = self
            .dir
            .join(format!("member-{id}"))
            .join("raft")
            .join("state-snapshots");
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .filter_map(|file| {
                let name = file.file_name().into_string().ok()?;
                let index = name.strip_suffix(".state")?.parse().ok()?;
                Some((index, file.metadata().ok()?.len()))
            })
            .max()
    }

    /// What member `id` holds (`MemberService`; `brief` leaves out the state digest and the
    /// audit check), or why it did not say.
    pub async fn member_status(
        &self,
        id: u64,
        brief: bool,
    ) -> Result<rewind_proto::v1::MemberStatus, String> {
        use rewind_proto::v1::member_service_client::MemberServiceClient;
        let channel = self
            .member_channel_for(&self.addresses[id as usize - 1])
            .await?;
        MemberServiceClient::new(channel)
            .get_member_status(rewind_proto::v1::GetMemberStatusRequest { brief })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| status.to_string())
    }

    /// Waits up to `limit` until member `id` has applied at least what member `leader` had
    /// applied when asked; with `same_state`, until both are at one index with one state
    /// digest. Returns the index reached, or says how far it got.
    pub async fn catch_up(
        &self,
        id: u64,
        leader: u64,
        limit: Duration,
        same_state: bool,
    ) -> Result<u64, String> {
        let started = Instant::now();
        let target = self
            .member_status(leader, true)
            .await
            .map_err(|error| format!("ask the leader, member {leader}: {error}"))?
            .applied_index;
        let mut reached = 0;
        while started.elapsed() < limit {
            if let Ok(behind) = self.member_status(id, !same_state).await {
                reached = behind.applied_index;
                let agrees = || async {
                    let ahead = self.member_status(leader, false).await.ok()?;
                    (ahead.applied_index == behind.applied_index
                        && ahead.state_digest == behind.state_digest
                        // A release before the audit digest reports none, nor one before
                        // the archive's.
                        && (ahead.audit_digest == behind.audit_digest
                            || ahead.audit_digest.is_empty()
                            || behind.audit_digest.is_empty())
                        && ahead.archive_digest == behind.archive_digest)
                        .then_some(())
                };
                if reached >= target && (!same_state || agrees().await.is_some()) {
                    return Ok(reached);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(format!(
            "member {id} reached index {reached} within {} s, not the leader's {target}{}",
            limit.as_secs(),
            if same_state {
                " with the leader's state"
            } else {
                ""
            }
        ))
    }

    /// [`ClusterHarness::catch_up`] to the leader's index and state, or panics.
    pub async fn must_catch_up(&self, id: u64, leader: u64, limit: Duration) -> u64 {
        self.catch_up(id, leader, limit, true)
            .await
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// The live member that serves (the caught-up leader), and a client to it.
    pub async fn must_leader(&self) -> (u64, ControlServiceClient<Channel>) {
        must_wait_async(Duration::from_secs(30), "a leader", || async {
            for (index, member) in self.members.iter().enumerate() {
                if member.is_none() || self.cut.contains(&(index as u64 + 1)) {
                    continue;
                }
                let Ok(mut client) = self.client_for(&self.addresses[index]).await else {
                    continue;
                };
                let request = rewind_proto::v1::ListServicesRequest {};
                if client.list_services(request).await.is_ok() {
                    return Some((index as u64 + 1, client));
                }
            }
            None
        })
        .await
    }
}

/// Grows the replicated state until the leader's latest snapshot file is larger than `bytes`:
/// registers releases of a service `big` whose `requires` name 256 providers each, 120
/// random-looking characters a name (about 30 KiB a write, which compresses little), four
/// writers at once, through whichever member leads. Returns the number of writes.
pub async fn must_grow_state_past(cluster: &ClusterHarness, bytes: u64) -> u64 {
    use rewind_proto::v1 as pb;
    let service = plain_service("big");
    let started = Instant::now();
    let mut writes: u64 = 0;
    loop {
        let (leader, client) = cluster.must_leader().await;
        if cluster
            .latest_snapshot(leader)
            .is_some_and(|(_, size)| size > bytes)
        {
            return writes;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the leader's snapshot stayed under {bytes} bytes after {writes} writes"
        );
        let mut batch = tokio::task::JoinSet::new();
        // Numbered across calls, so a later call adds releases rather than repeating them.
        let first_of_batch = NEXT_LARGE_RELEASE.fetch_add(100, std::sync::atomic::Ordering::SeqCst);
        for writer in 0..4 {
            let mut client = client.clone();
            let first = first_of_batch + writer * 25;
            let service = service.clone();
            batch.spawn(async move {
                let put = pb::PutServiceRequest {
                    request_id: "big".into(),
                    service: Some(service),
                };
                client.put_service(put).await?;
                for number in first..first + 25 {
                    let release = pb::Release {
                        service: "big".into(),
                        version: format!("big-{number}"),
                        artifact_digest: format!(
                            "sha256:{}",
                            rewind_shared::digest::sha256_hex(&number.to_be_bytes())
                        ),
                        commit: "c0ffee".into(),
                        requires: (0..256)
                            .map(|provider| (random_name(number, provider), 1))
                            .collect(),
                        ..Default::default()
                    };
                    client
                        .register_release(pb::RegisterReleaseRequest {
                            request_id: format!("big-{number}"),
                            release: Some(release),
                        })
                        .await?;
                }
                Ok::<(), tonic::Status>(())
            });
        }
        while let Some(done) = batch.join_next().await {
            match done.expect("a writer") {
                Ok(()) => {}
                // Leadership moved: the next round writes through the new leader.
                Err(status) if status.code() == tonic::Code::Unavailable => {}
                Err(status) => panic!("register a large release: {status}"),
            }
        }
        writes += 100;
    }
}

pub(crate) static NEXT_LARGE_RELEASE: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// 120 characters of `[a-z0-9]` that depend on both numbers and repeat nothing: a provider
/// name that compresses about as little as a name can.
pub(crate) fn random_name(release: u64, provider: u64) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0u64..4)
        .flat_map(|part| {
            let seed = [release, provider, part].map(u64::to_be_bytes).concat();
            hex::decode(rewind_shared::digest::sha256_hex(&seed)).unwrap_or_default()
        })
        .take(120)
        .map(|byte| ALPHABET[usize::from(byte) % ALPHABET.len()] as char)
        .collect()
}
