//! A sharded database for tests and benchmarks: a dev coordinator, and per shard a real
//! PostgreSQL server and a host whose agent runs service `orders-db` as a shard of it
//! (`[service.database]`). Changes and rollbacks go through the coordinator's API.

use rewind_proto::v1 as pb;
use rewind_proto::v1::control_service_client::ControlServiceClient;
use tonic::transport::Channel;

use crate::*;

pub const DB: &str = "orders-db";

/// Every shard starts with this schema and data.
pub const BASE_SCHEMA: &str = "CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL); \
    CREATE TABLE orders (id int PRIMARY KEY, customer_id int REFERENCES customers (id), \
    total numeric(10, 2)); \
    INSERT INTO customers VALUES (1, 'ada'), (2, 'bob'); \
    INSERT INTO orders VALUES (1, 1, 10.50), (2, 2, 20.00);";

/// (version, class, up, down, verify)
pub type Migration = (
    &'static str,
    pb::MigrationClass,
    &'static str,
    &'static str,
    &'static str,
);

/// A coordinator, and a shard host per PostgreSQL server running service `orders-db`.
pub struct Shards {
    pub dir: tempfile::TempDir,
    pub coordinator: Coordinator,
    pub servers: Vec<Postgres>,
    pub hosts: Vec<TestHost>,
    pub client: ControlServiceClient<Channel>,
    /// Hosts changes run on; empty: every host of orders-db.
    pub change_hosts: Vec<String>,
}

impl Shards {
    /// A coordinator and `count` shards, with orders-db, its releases and `migrations`
    /// registered.
    pub async fn must_start(count: usize, migrations: &[Migration]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let coordinator = Coordinator::must_start(&dir.path().join("coordinator"));
        let client = coordinator.must_client().await;
        let mut shards = Self {
            dir,
            coordinator,
            servers: Vec::new(),
            hosts: Vec::new(),
            client,
            change_hosts: Vec::new(),
        };
        for _ in 0..count {
            shards.must_add_shard("");
        }
        must_agents_connected(&shards.client, count).await;
        must_register(&mut shards.client, &shards.hosts[0], migrations).await;
        shards
    }

    /// Another shard host `db-<n>`, with its own PostgreSQL server holding the base schema, in
    /// `environment` (empty: none, the default one).
    pub fn must_add_shard(&mut self, environment: &str) {
        let n = self.hosts.len() + 1;
        let server = Postgres::must_start(&self.dir.path().join(format!("pg-{n}")));
        server.must_sql(BASE_SCHEMA);
        let mut host = TestHost::must_prepare_services(
            self.dir.path(),
            &format!("db-{n}"),
            &self.coordinator.ca(),
            &self.coordinator.tls_dir(),
            std::slice::from_ref(&self.coordinator.address),
            "test-1",
            &[DB],
        );
        if !environment.is_empty() {
            let config = std::fs::read_to_string(&host.config_path).unwrap().replace(
                "[labels]\n",
                &format!("[labels]\nenvironment = \"{environment}\"\n"),
            );
            std::fs::write(&host.config_path, config).unwrap();
        }
        host.must_be_shard_of(&server);
        host.must_start_agent();
        self.servers.push(server);
        self.hosts.push(host);
    }

    /// Starts a change of orders-db to `version` applying `migrations` and waits for `done`.
    pub async fn must_change(&mut self, version: &str, migrations: &[&str]) -> pb::Change {
        let change_id = self
            .client
            .start_change(pb::StartChangeRequest {
                request_id: String::new(),
                service: DB.into(),
                version: version.into(),
                host_ids: self.change_hosts.clone(),
                reason: "test".into(),
                flags_on: vec![],
                break_glass: false,
                migrations: migrations
                    .iter()
                    .map(|version| format!("{DB}@{version}"))
                    .collect(),
            })
            .await
            .unwrap()
            .into_inner()
            .change
            .unwrap()
            .change_id;
        must_change_where(&self.client, &change_id, "the change to end", |change| {
            change.state == pb::ChangeState::Deployed as i32
                || change.state == pb::ChangeState::Failed as i32
        })
        .await
    }

    pub async fn must_start_rollback(
        &mut self,
        change_id: &str,
        options: pb::PlanOptions,
    ) -> String {
        self.client
            .start_rollback(pb::StartRollbackRequest {
                change_id: change_id.into(),
                reason: "bad release".into(),
                options: Some(pb::PlanOptions {
                    max_parallel: 4,
                    max_unavailable: 4,
                    ..options
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .rollback
            .unwrap()
            .rollback_id
    }

    pub async fn must_rollback_where(
        &self,
        rollback_id: &str,
        what: &str,
        done: impl Fn(&pb::Rollback) -> bool,
    ) -> pb::Rollback {
        crate::must_rollback_where(&self.client, rollback_id, what, done).await
    }

    pub async fn must_pause(&self, rollback_id: &str) -> pb::Rollback {
        self.must_rollback_where(rollback_id, "the rollback to pause", |rollback| {
            rollback.state == pb::RollbackState::Paused as i32
        })
        .await
    }

    pub async fn must_succeed(&self, rollback_id: &str) -> pb::Rollback {
        let rollback = must_rollback_end(&self.client, rollback_id).await;
        assert_eq!(
            rollback.state,
            pb::RollbackState::Succeeded as i32,
            "{rollback:#?}\n{}",
            self.rewindctl(&["schema", "list"])
        );
        rollback
    }

    pub async fn must_control(&mut self, rollback_id: &str, action: &str) {
        let request = pb::RollbackActionRequest {
            rollback_id: rollback_id.into(),
            reason: format!("test {action}"),
            ..Default::default()
        };
        let result = match action {
            "resume" => self.client.resume_rollback(request).await,
            _ => self.client.abort_rollback(request).await,
        };
        result.unwrap_or_else(|status| panic!("{action} {rollback_id}: {status}"));
    }

    /// Every schema transaction, newest first.
    pub async fn must_schema_txns(&mut self) -> Vec<pb::SchemaTxn> {
        self.client
            .list_schema_txns(pb::ListSchemaTxnsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .txns
    }

    pub async fn must_schema_txn(&mut self, txn_id: &str) -> pb::SchemaTxn {
        self.client
            .list_schema_txns(pb::ListSchemaTxnsRequest {
                txn_id: txn_id.into(),
                detailed: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .txns
            .remove(0)
    }

    pub fn rewindctl(&self, args: &[&str]) -> String {
        let output = self.coordinator.rewindctl(args);
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    /// Every shard's orders columns, as one string per shard.
    pub fn columns(&self) -> Vec<String> {
        self.servers
            .iter()
            .map(|server| {
                server.must_sql(
                    "SELECT string_agg(column_name, ',' ORDER BY column_name) FROM \
                     information_schema.columns WHERE table_name = 'orders'",
                )
            })
            .collect()
    }

    /// Asserts no shard holds a prepared transaction (none is left holding locks).
    pub fn must_have_nothing_prepared(&self) {
        for (n, server) in self.servers.iter().enumerate() {
            assert_eq!(
                server.must_sql("SELECT count(*) FROM pg_prepared_xacts"),
                "0",
                "db-{} holds a prepared transaction",
                n + 1
            );
        }
    }

    pub fn history(&self, shard: usize, version: &str) -> String {
        self.servers[shard].must_sql(&format!(
            "SELECT CASE WHEN reverted_at IS NULL THEN 'applied' ELSE 'reverted' END \
             FROM rewind_schema_history WHERE version = '{version}'"
        ))
    }
}

pub async fn must_register(
    client: &mut ControlServiceClient<Channel>,
    host: &TestHost,
    migrations: &[Migration],
) {
    client
        .put_service(pb::PutServiceRequest {
            request_id: String::new(),
            service: Some(pb::Service {
                name: DB.into(),
                policy: Some(pb::HealthPolicy {
                    max_probe_failure_ratio: 0.5,
                    for_s: 1,
                    watch_s: 120,
                    auto_rollback: false,
                    conditions: vec![],
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    for version in ["v1", "v2"] {
        let artifact_digest =
            rewind_shared::digest::tree_digest(&host.root.join("releases").join(version)).unwrap();
        client
            .register_release(pb::RegisterReleaseRequest {
                request_id: String::new(),
                release: Some(pb::Release {
                    service: DB.into(),
                    version: version.into(),
                    artifact_digest,
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }
    for &(version, class, up, down, verify) in migrations {
        client
            .register_migration(pb::RegisterMigrationRequest {
                request_id: String::new(),
                migration: Some(pb::Migration {
                    database: DB.into(),
                    version: version.into(),
                    class: class.into(),
                    up_sql: up.into(),
                    down_sql: down.into(),
                    verify_sql: verify.into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }
}
