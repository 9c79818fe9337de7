//! Tests of rollback planning: ordering by the dependency graph, regions and batches,
//! compatibility refusals, and the plan hash. Graph ordering is also checked on generated graphs.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use crate::errors::CoordinatorError;
use crate::plan::{self, revert_order};
use crate::state_machine::archive::ArchivedRecord;
use crate::state_machine::*;
use crate::test_fleet::Fleet;

/// web -> api -> db, each on its own hosts, all deployed v1 then v2.
fn three_tier() -> (Fleet, [u64; 3]) {
    let mut fleet = Fleet::new();
    fleet.service("db", &[]);
    fleet.service("api", &["db"]);
    fleet.service("web", &["api"]);
    for (host, service) in [("db-1", "db"), ("api-1", "api"), ("web-1", "web")] {
        fleet.host(host, "eu", &[service]);
    }
    for service in ["db", "api", "web"] {
        fleet.release(service, "v1", 1, &[]);
        fleet.release(service, "v2", 2, &[]);
        fleet.deploy(service, "v1");
    }
    let changes = ["db", "api", "web"].map(|service| fleet.deploy(service, "v2"));
    (fleet, changes)
}

#[test]
fn consumers_are_reverted_before_their_providers() {
    let (fleet, [db, api, web]) = three_tier();
    let plan = fleet
        .plan(&[db, web, api], &PlanOptions::default())
        .unwrap();
    assert_eq!(plan.services, vec!["web", "api", "db"]);
    assert_eq!(plan.changes, vec![web, api, db]);
    let waves: Vec<&str> = plan
        .waves
        .iter()
        .map(|wave| wave.service.as_str())
        .collect();
    assert_eq!(waves, vec!["web", "api", "db"]);
}

#[test]
fn ordering_follows_dependencies_through_services_outside_the_plan() {
    let graph: BTreeMap<String, Vec<String>> = [
        ("web", vec!["gateway"]),
        ("gateway", vec!["auth"]),
        ("auth", vec![]),
        ("batch", vec![]),
    ]
    .into_iter()
    .map(|(name, deps)| {
        (
            name.to_string(),
            deps.into_iter().map(String::from).collect(),
        )
    })
    .collect();
    let planned = ["auth", "batch", "web"].map(String::from);
    assert_eq!(
        revert_order(&graph, &planned).unwrap(),
        vec!["batch", "web", "auth"],
        "web reaches auth through gateway; batch is independent and first by name"
    );
}

#[test]
fn a_cycle_is_refused_with_the_cycle_named() {
    let graph: BTreeMap<String, Vec<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(name, deps)| {
        (
            name.to_string(),
            deps.into_iter().map(String::from).collect(),
        )
    })
    .collect();
    let cycle = revert_order(&graph, &["d".to_string()]).unwrap_err();
    assert_eq!(cycle, vec!["a", "b", "c", "a"]);
}

fn regional_fleet() -> (Fleet, u64) {
    let mut fleet = Fleet::new();
    fleet.service("web", &[]);
    for (host, region) in [
        ("eu-1", "eu"),
        ("eu-2", "eu"),
        ("eu-3", "eu"),
        ("us-1", "us"),
        ("ap-1", "ap"),
        ("ap-2", "ap"),
    ] {
        fleet.host(host, region, &["web"]);
    }
    fleet.release("web", "v1", 0, &[]);
    fleet.release("web", "v2", 0, &[]);
    fleet.deploy("web", "v1");
    let change = fleet.deploy("web", "v2");
    (fleet, change)
}

#[test]
fn regions_go_one_by_one_with_the_smallest_as_canary_and_hosts_in_batches() {
    let (fleet, change) = regional_fleet();
    let options = PlanOptions {
        max_parallel: 5,
        max_unavailable: 2,
        ..PlanOptions::default()
    };
    let plan = fleet.plan(&[change], &options).unwrap();
    let waves: Vec<(&str, bool, Vec<Vec<String>>)> = plan
        .waves
        .iter()
        .map(|wave| (wave.region.as_str(), wave.canary, wave.batches.clone()))
        .collect();
    let batch = |hosts: &[&str]| {
        hosts
            .iter()
            .map(|host| host.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        waves,
        vec![
            ("us", true, vec![batch(&["us-1"])]),
            ("ap", false, vec![batch(&["ap-1", "ap-2"])]),
            (
                "eu",
                false,
                vec![batch(&["eu-1", "eu-2"]), batch(&["eu-3"])]
            ),
        ],
        "batches are bounded by the smaller of max_parallel and max_unavailable"
    );
}

#[test]
fn a_chosen_canary_region_goes_first_and_an_unknown_one_is_refused() {
    let (fleet, change) = regional_fleet();
    let options = PlanOptions {
        canary_region: "eu".into(),
        ..PlanOptions::default()
    };
    let plan = fleet.plan(&[change], &options).unwrap();
    assert_eq!(plan.waves[0].region, "eu");
    assert!(plan.waves[0].canary);
    let error = fleet
        .plan(
            &[change],
            &PlanOptions {
                canary_region: "mars".into(),
                ..PlanOptions::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert_eq!(
        error,
        "canary_region: no host of the plan is in region mars: its regions are ap, eu, us"
    );
}

/// `web` v2 needs `api` API 2; both were deployed v1 then v2.
fn api_consumer() -> (Fleet, u64, u64) {
    let mut fleet = Fleet::new();
    fleet.service("api", &[]);
    fleet.service("web", &["api"]);
    fleet.host("api-1", "eu", &["api"]);
    fleet.host("web-1", "eu", &["web"]);
    fleet.release("api", "v1", 1, &[]);
    fleet.release("api", "v2", 2, &[]);
    fleet.release("web", "v1", 0, &[("api", 1)]);
    fleet.release("web", "v2", 0, &[("api", 2)]);
    fleet.deploy("api", "v1");
    fleet.deploy("web", "v1");
    let api = fleet.deploy("api", "v2");
    let web = fleet.deploy("web", "v2");
    (fleet, api, web)
}

#[test]
fn reverting_a_provider_under_a_consumer_that_stays_is_refused_unless_forced() {
    let (mut fleet, api, web) = api_consumer();
    let plan = fleet.plan(&[api], &PlanOptions::default()).unwrap();
    assert_eq!(plan.incompatibilities.len(), 1);
    assert_eq!(
        plan.incompatibilities[0].detail,
        "reverting api to v1 (API 1) breaks web v2, which needs api API 2 or later: \
         add web's change to the plan, or force it"
    );
    let start = |options: PlanOptions| {
        CommandKind::StartRollback(StartRollback {
            changes: vec![api],
            options,
            plan_hash: String::new(),
            reason: "r".into(),
            trigger: Trigger::Manual,
            break_glass: false,
            planned: None,
        })
    };
    let error = fleet
        .apply_at(0, start(PlanOptions::default()))
        .unwrap_err();
    assert!(
        matches!(error, CoordinatorError::Incompatible { .. }),
        "{error}"
    );

    let together = fleet.plan(&[api, web], &PlanOptions::default()).unwrap();
    assert!(
        together.incompatibilities.is_empty(),
        "{:?}",
        together.incompatibilities
    );
    assert_eq!(together.services, vec!["web", "api"]);

    fleet.apply(start(PlanOptions {
        force: true,
        ..PlanOptions::default()
    }));
    let rollback = &fleet.state.rollbacks[&1];
    assert_eq!(rollback.forced.len(), 1);
    let audit = fleet
        .state
        .audit
        .entries()
        .last()
        .unwrap()
        .readable_outcome();
    assert!(audit.contains("forced past: reverting api"), "{audit}");
}

#[test]
fn two_changes_of_one_service_and_superseded_changes_are_refused() {
    let (mut fleet, change) = regional_fleet();
    let older = change - 1;
    let error = fleet.plan(&[older, change], &PlanOptions::default());
    assert!(error.is_err());
    let newest = fleet.deploy("web", "v1");
    let error = fleet.plan(&[change], &PlanOptions::default()).unwrap_err();
    assert!(
        matches!(error, CoordinatorError::NotLatestChange { .. }),
        "{error}"
    );
    assert!(fleet.plan(&[newest], &PlanOptions::default()).is_ok());
}

#[test]
fn the_hash_covers_what_the_plan_does_and_nothing_else() {
    let (fleet, change) = regional_fleet();
    let options = PlanOptions::default();
    let first = fleet.plan(&[change], &options).unwrap();
    let again = fleet.plan(&[change], &options).unwrap();
    assert_eq!(first.hash, again.hash);
    assert!(first.hash.starts_with("sha256:"));
    let wider = fleet
        .plan(
            &[change],
            &PlanOptions {
                max_parallel: 3,
                max_unavailable: 3,
                ..options
            },
        )
        .unwrap();
    assert_ne!(first.hash, wider.hash);
}

#[test]
fn readiness_names_disconnected_hosts_and_estimates_the_duration() {
    let (fleet, change) = regional_fleet();
    let plan = fleet.plan(&[change], &PlanOptions::default()).unwrap();
    struct View;
    impl plan::HostView for View {
        fn connected(&self, host: &str) -> bool {
            host != "eu-2"
        }
        fn retained(&self, host: &str, _service: &str) -> Option<Vec<String>> {
            match host {
                // Pruned v1: its restore would point at nothing.
                "eu-1" => Some(vec!["v2".into()]),
                "eu-2" => None,
                _ => Some(vec!["v1".into(), "v2".into()]),
            }
        }
        fn drift(&self, host: &str, _service: &str) -> Vec<String> {
            match host {
                "eu-1" => vec!["config/app.toml: content differs".into()],
                _ => Vec::new(),
            }
        }
    }
    let readiness = plan::readiness(&fleet.state, &plan, &View);
    assert_eq!(readiness.disconnected_hosts, vec!["eu-2"]);
    assert_eq!(
        readiness.drifted_hosts,
        vec!["eu-1: web: config/app.toml: content differs"]
    );
    assert!(readiness.missing_releases.is_empty());
    assert_eq!(
        readiness.missing_artifacts,
        vec!["eu-1: web release v1 is gone"]
    );
    // 6 batches of one host at the default 20 s per host, plus 3 gates of 5 s.
    assert_eq!(readiness.expected_duration_ms, 6 * 20_000 + 3 * 5_000);
}

/// A random acyclic graph over `n` services: edges only go from a lower to a higher index.
fn acyclic_graph() -> impl Strategy<Value = (BTreeMap<String, Vec<String>>, Vec<String>)> {
    (2usize..12).prop_flat_map(|n| {
        let edges = proptest::collection::vec((0..n, 0..n), 0..(n * 2));
        let planned = proptest::collection::btree_set(0..n, 1..=n);
        (Just(n), edges, planned).prop_map(|(n, edges, planned)| {
            let mut graph: BTreeMap<String, Vec<String>> =
                (0..n).map(|i| (format!("s{i:02}"), Vec::new())).collect();
            for (from, to) in edges {
                if from < to {
                    graph
                        .get_mut(&format!("s{from:02}"))
                        .unwrap()
                        .push(format!("s{to:02}"));
                }
            }
            let planned = planned.into_iter().map(|i| format!("s{i:02}")).collect();
            (graph, planned)
        })
    })
}

fn depends_on(graph: &BTreeMap<String, Vec<String>>, from: &str, to: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut stack = vec![from.to_string()];
    while let Some(service) = stack.pop() {
        for next in &graph[&service] {
            if next == to {
                return true;
            }
            if seen.insert(next.clone()) {
                stack.push(next.clone());
            }
        }
    }
    false
}

proptest! {
    #[test]
    fn every_consumer_comes_before_every_provider_it_reaches((graph, planned) in acyclic_graph()) {
        let order = revert_order(&graph, &planned).expect("acyclic");
        let sorted: BTreeSet<&String> = order.iter().collect();
        prop_assert_eq!(sorted, planned.iter().collect::<BTreeSet<_>>());
        for (i, earlier) in order.iter().enumerate() {
            for later in &order[i + 1..] {
                prop_assert!(
                    !depends_on(&graph, later, earlier),
                    "{} depends on {} but comes after it: {:?}", later, earlier, order
                );
            }
        }
    }

    #[test]
    fn a_reported_cycle_is_made_of_real_edges(
        (mut graph, planned) in acyclic_graph(),
        back in (0usize..12, 0usize..12),
    ) {
        // Add one edge that may close a cycle.
        let n = graph.len();
        let (from, to) = (format!("s{:02}", back.0 % n), format!("s{:02}", back.1 % n));
        graph.get_mut(&from).unwrap().push(to);
        match revert_order(&graph, &planned) {
            Ok(order) => prop_assert_eq!(order.len(), planned.len()),
            Err(cycle) => {
                prop_assert!(cycle.len() >= 2);
                prop_assert_eq!(cycle.first(), cycle.last());
                for pair in cycle.windows(2) {
                    prop_assert!(graph[&pair[0]].contains(&pair[1]), "{:?}", cycle);
                }
            }
        }
    }
}

#[test]
fn hosts_without_a_usable_snapshot_are_named_and_left_out() {
    let mut fleet = Fleet::new();
    fleet.service("web", &[]);
    fleet.host("web-1", "eu", &["web"]);
    fleet.host("web-2", "eu", &["web"]);
    fleet.release("web", "v1", 0, &[]);
    let Outcome::Change(change) = fleet.apply(CommandKind::StartChange(StartChange {
        break_glass: false,
        service: "web".into(),
        version: "v1".into(),
        host_ids: vec![],
        reason: String::new(),
        baseline: HealthAggregate::default(),
        flags_on: vec![],
        migrations: vec![],
    })) else {
        panic!("a change")
    };
    // web-2's capture finishes without a snapshot id.
    fleet.capture_and_activate(change, &[("web-1", "snap-1"), ("web-2", "")]);
    let plan = fleet.plan(&[change], &PlanOptions::default()).unwrap();
    assert_eq!(plan.waves[0].hosts(), vec!["web-1"]);
    assert!(
        plan.notes
            .iter()
            .any(|note| note.contains("no usable snapshot on 1 host") && note.ends_with("web-2")),
        "{:?}",
        plan.notes
    );
}

/// Records that `change` applied `versions` on orders-db in schema transaction `txn`, committed,
/// as if its stage had run (the transaction's phases are tested in schema_test).
fn applied_on_orders_db(fleet: &mut Fleet, change: u64, txn: u64, versions: &[&str]) {
    applied_on(fleet, "orders-db", change, txn, versions);
}

fn applied_on(fleet: &mut Fleet, database: &str, change: u64, txn: u64, versions: &[&str]) {
    applied_at(fleet, database, (change, true), txn, versions);
}

/// As [`applied_on`], by a stage that ran after activation (contract and data migrations) or
/// before it (expand ones).
fn applied_at(
    fleet: &mut Fleet,
    database: &str,
    (change, after_activation): (u64, bool),
    txn: u64,
    versions: &[&str],
) {
    let record = fleet.state.changes.get_mut(&change).unwrap();
    record.schema.push(SchemaStage {
        database: database.into(),
        change,
        service: record.service.clone(),
        environment: "default".into(),
        versions: versions.iter().map(|version| version.to_string()).collect(),
        down: false,
        after_activation,
        txn,
        expected_fingerprint: String::new(),
    });
    fleet.state.schema_txns.insert(
        txn,
        SchemaTxnRecord {
            number: txn,
            database: database.into(),
            environment: "default".into(),
            down: false,
            migrations: versions.iter().map(|version| version.to_string()).collect(),
            owner: SchemaOwner::Change { change, stage: 0 },
            by: String::new(),
            accept_data_loss: String::new(),
            expected_fingerprint: String::new(),
            status: SchemaTxnStatus::Done,
            decision: Some(SchemaDecision {
                commit: true,
                at_ms: 0,
                reason: String::new(),
            }),
            shards: Vec::new(),
            fingerprint_before: format!("sha256:before-st-{txn}"),
            started_at_ms: 0,
            finished_at_ms: 0,
            committed: true,
            verified: true,
            accepted: false,
            escalated: false,
            detail: String::new(),
        },
    );
}

/// orders and billing, each deployed v1 then v2 (orders' change first).
fn two_services() -> (Fleet, u64, u64) {
    let mut fleet = Fleet::new();
    for service in ["orders", "billing"] {
        fleet.service(service, &[]);
        fleet.host(&format!("{service}-1"), "eu", &[service]);
        fleet.release(service, "v1", 1, &[]);
        fleet.release(service, "v2", 1, &[]);
        fleet.deploy(service, "v1");
    }
    let orders = fleet.deploy("orders", "v2");
    let billing = fleet.deploy("billing", "v2");
    (fleet, orders, billing)
}

fn schema_order(plan: plan::Plan) -> Vec<(u64, String, Vec<String>)> {
    plan.schema
        .into_iter()
        .map(|stage| (stage.change, stage.database, stage.versions))
        .collect()
}

#[test]
fn migrations_applied_in_change_order_are_reverted_newest_change_first_as_always() {
    let (mut fleet, orders, billing) = two_services();
    applied_on(&mut fleet, "a-db", orders, 1, &["a1"]);
    applied_on(&mut fleet, "b-db", orders, 2, &["b1"]);
    applied_on(&mut fleet, "b-db", billing, 3, &["b2"]);
    applied_on(&mut fleet, "a-db", billing, 4, &["a2"]);
    let plan = fleet
        .plan(&[orders, billing], &PlanOptions::default())
        .unwrap();
    let stage = |change: u64, database: &str, version: &str| {
        (change, database.to_string(), vec![version.to_string()])
    };
    // The newer change first, each change's databases in the order it used them.
    assert_eq!(
        schema_order(plan),
        vec![
            stage(billing, "b-db", "b2"),
            stage(billing, "a-db", "a2"),
            stage(orders, "a-db", "a1"),
            stage(orders, "b-db", "b1"),
        ]
    );
    // An older change whose migration ran after the newer one's is reverted first.
    let (mut fleet, orders, billing) = two_services();
    applied_on(&mut fleet, "a-db", billing, 1, &["a2"]);
    applied_on(&mut fleet, "a-db", orders, 2, &["a1"]);
    let plan = fleet
        .plan(&[orders, billing], &PlanOptions::default())
        .unwrap();
    assert_eq!(
        schema_order(plan),
        vec![stage(orders, "a-db", "a1"), stage(billing, "a-db", "a2")]
    );
}

#[test]
fn interleaved_migrations_of_two_changes_are_reverted_newest_first() {
    let (mut fleet, orders, billing) = two_services();
    // orders' expand ran, then billing's migration, then orders' contract.
    applied_on_orders_db(&mut fleet, orders, 1, &["0001"]);
    applied_on_orders_db(&mut fleet, billing, 2, &["0002"]);
    applied_on_orders_db(&mut fleet, orders, 3, &["0003"]);
    let options = PlanOptions {
        revert_expand: true,
        ..PlanOptions::default()
    };
    let stages = |plan: plan::Plan| -> Vec<(u64, Vec<String>, String)> {
        plan.schema
            .into_iter()
            .map(|stage| (stage.change, stage.versions, stage.expected_fingerprint))
            .collect()
    };
    let both = stages(fleet.plan(&[orders, billing], &options).unwrap());
    let expect = |change: u64, versions: &[&str], txn: u64| {
        (
            change,
            versions.iter().map(|version| version.to_string()).collect(),
            format!("sha256:before-st-{txn}"),
        )
    };
    assert_eq!(
        both,
        vec![
            expect(orders, &["0003"], 3),
            expect(billing, &["0002"], 2),
            expect(orders, &["0001"], 1),
        ],
        "each revert undoes exactly one transaction, the last applied first"
    );
    // Alone, a change's migrations on a database are reverted in one transaction; billing's,
    // which ran between them, stays, and the plan warns that every shard will refuse that.
    let alone = fleet.plan(&[orders], &options).unwrap();
    assert!(
        alone.notes.iter().any(|note| note
            == &format!(
                "0002 (st-2) of orders-db was applied after {}'s 0003, 0001 and stays: every \
                 shard will refuse that revert until it is reverted first",
                change_id(orders)
            )),
        "{:?}",
        alone.notes
    );
    assert_eq!(stages(alone), vec![expect(orders, &["0003", "0001"], 1)]);
    // Rolled back with billing, nothing is left in the way: no warning.
    let both = fleet.plan(&[orders, billing], &options).unwrap();
    assert!(
        !both.notes.iter().any(|note| note.contains("will refuse")),
        "{:?}",
        both.notes
    );
}

/// Registers `version` of `database` with `class` (scripts do not matter to a plan).
fn registered(fleet: &mut Fleet, database: &str, version: &str, class: MigrationClass) {
    fleet
        .state
        .migrations
        .entry(database.into())
        .or_default()
        .insert(
            version.into(),
            std::sync::Arc::new(MigrationRecord {
                database: database.into(),
                version: version.into(),
                class,
                up_sql: String::new(),
                down_sql: String::new(),
                verify_sql: String::new(),
                checksum: String::new(),
                registered_at_ms: 0,
                registered_by: String::new(),
            }),
        );
}

/// (versions, before the app waves) of each schema revert, in the order they run.
fn placed(plan: &plan::Plan) -> Vec<(Vec<String>, bool)> {
    plan.schema
        .iter()
        .map(|stage| (stage.versions.clone(), !stage.after_activation))
        .collect()
}

#[test]
fn contract_reverts_run_before_the_app_waves_and_expand_ones_after() {
    let (mut fleet, orders, _) = two_services();
    registered(&mut fleet, "orders-db", "e1", MigrationClass::Expand);
    registered(&mut fleet, "orders-db", "c1", MigrationClass::Contract);
    registered(&mut fleet, "orders-db", "d1", MigrationClass::Data);
    applied_at(&mut fleet, "orders-db", (orders, false), 1, &["e1"]);
    applied_at(&mut fleet, "orders-db", (orders, true), 2, &["c1", "d1"]);
    let options = PlanOptions {
        revert_expand: true,
        ..PlanOptions::default()
    };
    let versions = |versions: &[&str]| -> Vec<String> {
        versions.iter().map(|version| version.to_string()).collect()
    };
    let plan = fleet.plan(&[orders], &options).unwrap();
    assert_eq!(
        placed(&plan),
        vec![(versions(&["d1", "c1"]), true), (versions(&["e1"]), false)],
        "the contract and data ones first, in a transaction of their own; the expand one after"
    );
    // Each expects the fingerprint from before the transaction it undoes.
    let expected: Vec<&str> = plan
        .schema
        .iter()
        .map(|stage| stage.expected_fingerprint.as_str())
        .collect();
    assert_eq!(expected, ["sha256:before-st-2", "sha256:before-st-1"]);
    // Below cluster version 9 every revert runs after the waves, in one transaction.
    fleet.state.cluster_version = version::SCHEMA_ORDER_BY_CLASS - 1;
    let plan = fleet.plan(&[orders], &options).unwrap();
    assert_eq!(placed(&plan), vec![(versions(&["d1", "c1", "e1"]), false)]);
}

/// orders' contract c1 ran on orders-db, then billing's expand e2 and contract c2.
fn contract_then_expand_and_contract() -> (Fleet, u64, u64) {
    let (mut fleet, orders, billing) = two_services();
    registered(&mut fleet, "orders-db", "c1", MigrationClass::Contract);
    registered(&mut fleet, "orders-db", "e2", MigrationClass::Expand);
    registered(&mut fleet, "orders-db", "c2", MigrationClass::Contract);
    applied_at(&mut fleet, "orders-db", (orders, true), 1, &["c1"]);
    applied_at(&mut fleet, "orders-db", (billing, false), 2, &["e2"]);
    applied_at(&mut fleet, "orders-db", (billing, true), 3, &["c2"]);
    (fleet, orders, billing)
}

/// A contract revert every shard will refuse (an expand migration applied after it stays) would
/// stop the rollback before any host: it waits after the waves. `--schema-after-waves` puts every
/// revert there.
#[test]
fn a_revert_the_shards_will_refuse_and_one_asked_later_wait_after_the_waves() {
    let (fleet, orders, billing) = contract_then_expand_and_contract();
    // e2 is kept (no --revert-expand): c1's revert would be refused at check.
    let plan = fleet
        .plan(&[orders, billing], &PlanOptions::default())
        .unwrap();
    let one = |version: &str, before: bool| (vec![version.to_string()], before);
    assert_eq!(placed(&plan), vec![one("c2", true), one("c1", false)]);
    assert!(
        plan.notes
            .iter()
            .any(|note| note.contains("every shard will refuse")),
        "{:?}",
        plan.notes
    );
    let later = PlanOptions {
        schema_after_waves: true,
        ..PlanOptions::default()
    };
    let plan = fleet.plan(&[orders, billing], &later).unwrap();
    assert_eq!(placed(&plan), vec![one("c2", false), one("c1", false)]);
}

#[test]
fn a_contract_revert_older_than_an_expand_revert_waits_for_it_after_the_waves() {
    let (fleet, orders, billing) = contract_then_expand_and_contract();
    let options = PlanOptions {
        revert_expand: true,
        ..PlanOptions::default()
    };
    let plan = fleet.plan(&[orders, billing], &options).unwrap();
    let one = |version: &str, before: bool| (vec![version.to_string()], before);
    assert_eq!(
        placed(&plan),
        vec![one("c2", true), one("e2", false), one("c1", false)],
        "c1 cannot be reverted while e2, applied after it, is still there"
    );
    assert!(
        plan.notes.iter().any(|note| note
            == &format!(
                "c1 of orders-db ({}) is reverted after the app waves, not before them as a \
                 contract or data migration would be: e2, applied after it, is reverted first, \
                 and only after the waves",
                change_id(orders)
            )),
        "{:?}",
        plan.notes
    );
}

#[test]
fn the_estimate_says_whether_the_rto_fits_and_what_max_parallel_would() {
    let (mut fleet, change) = regional_fleet();
    let plan = fleet.plan(&[change], &PlanOptions::default()).unwrap();
    let estimate = |fleet: &Fleet, rto_s: u64| {
        let mut state = fleet.state.clone();
        state.services.get_mut("web").unwrap().rto_s = rto_s;
        plan::readiness(&state, &plan, &AllConnected).estimate
    };
    // Nothing in the history: 20 s a host, 5 s a gate; 6 hosts one at a time in 3 regions.
    let none = estimate(&fleet, 0);
    assert_eq!((none.p50_ms, none.p90_ms), (135_000, 135_000));
    assert_eq!(none.verdict, "no RTO declared for its services");
    assert!(
        none.basis
            .iter()
            .any(|line| line == "web restore: p50 2s, p90 2s (assumed)")
    );
    let fits = estimate(&fleet, 200);
    assert!(fits.fits() && fits.verdict.starts_with("fits web's RTO of 3m 20s"));
    // Two at a time: eu in 2 batches, us and ap in 1: 4 x 20 s + 3 x 5 s = 95 s.
    let tight = estimate(&fleet, 100);
    assert!(!tight.fits());
    assert_eq!(tight.suggested_max_parallel, 2, "{}", tight.verdict);
    assert!(
        tight
            .verdict
            .contains("--max-parallel 2 --max-unavailable 2 would (p90 1m 35s)"),
        "{}",
        tight.verdict
    );
    let impossible = estimate(&fleet, 30);
    assert_eq!(impossible.suggested_max_parallel, 0);
    assert!(
        impossible
            .verdict
            .contains("not even with every host of a wave at once (p90 1m 15s)")
    );

    // A rollback that ran: web's own step and gate times (a second each here) replace the
    // assumptions.
    let rollback = fleet.must_start_rollback(change, Trigger::Manual);
    let record = fleet.state.rollbacks[&rollback].clone();
    for step in &record.steps {
        fleet.finish(
            StepTarget::Rollback {
                rollback,
                service: step.service.clone(),
                host_id: step.host_id.clone(),
                kind: step.kind,
            },
            true,
        );
    }
    for wave in 0..record.waves.len() as u32 {
        fleet.finish(StepTarget::Gate { rollback, wave }, true);
    }
    let learned = estimate(&fleet, 0);
    assert!(
        learned
            .basis
            .iter()
            .any(|line| line == "web restore: p50 1s, p90 1s (its own, 6 runs)"),
        "{:?}",
        learned.basis
    );
    assert!(learned.p50_ms < none.p50_ms);

    // Archived (cluster version 8), the rollback still counts.
    let record = fleet.state.rollbacks.remove(&rollback).unwrap();
    fleet
        .state
        .audit
        .archive(&ArchivedRecord::Rollback(Box::new(
            crate::state_machine::archive::ArchivedRollback {
                archived_at_ms: 1,
                rollback: record,
                incident: None,
            },
        )));
    fleet.state.archived.rollbacks += 1;
    assert_eq!(estimate(&fleet, 0), learned);
}

struct AllConnected;

impl plan::HostView for AllConnected {
    fn connected(&self, _host: &str) -> bool {
        true
    }
    fn retained(&self, _host: &str, _service: &str) -> Option<Vec<String>> {
        None
    }
    fn drift(&self, _host: &str, _service: &str) -> Vec<String> {
        Vec::new()
    }
}

#[test]
fn hosts_left_out_are_named_in_the_notes_and_must_be_the_changes_own() {
    let (fleet, change) = regional_fleet();
    let leave_out = |hosts: &[&str]| PlanOptions {
        exclude_hosts: hosts.iter().map(|host| host.to_string()).collect(),
        ..PlanOptions::default()
    };
    let plan = fleet
        .plan(&[change], &leave_out(&["us-1", "eu-2"]))
        .unwrap();
    let planned: Vec<String> = plan
        .waves
        .iter()
        .flat_map(plan::PlannedWave::hosts)
        .collect();
    assert!(!planned.iter().any(|host| host == "us-1" || host == "eu-2"));
    assert_eq!(planned.len(), 4);
    assert!(
        !plan.waves.iter().any(|wave| wave.region == "us"),
        "a region left with no host has no wave"
    );
    assert!(
        plan.notes
            .iter()
            .any(|note| note.contains("2 hosts left out as asked") && note.contains("eu-2, us-1")),
        "{:?}",
        plan.notes
    );
    let unknown = fleet
        .plan(&[change], &leave_out(&["db-9"]))
        .unwrap_err()
        .to_string();
    assert!(
        unknown.contains("db-9 is not among the hosts this plan would revert")
            && unknown.contains("eu-1"),
        "{unknown}"
    );
    let everyone = ["eu-1", "eu-2", "eu-3", "us-1", "ap-1", "ap-2"];
    let nothing = fleet
        .plan(&[change], &leave_out(&everyone))
        .unwrap_err()
        .to_string();
    assert!(
        nothing.contains("leaves no host of ch-2 (web) to revert"),
        "{nothing}"
    );
}

#[test]
fn a_consumer_is_not_left_reading_less_than_a_producer_writes_to_a_topic() {
    let mut fleet = Fleet::new();
    fleet.service("api", &[]);
    fleet.service("web", &["api"]);
    fleet.host("api-1", "eu", &["api"]);
    fleet.host("web-1", "eu", &["web"]);
    for (version, schema) in [("v1", 1), ("v2", 2)] {
        for (service, produces, consumes) in [("api", true, false), ("web", false, true)] {
            let topics = || [("orders.created".to_string(), schema)].into();
            fleet.apply(CommandKind::RegisterRelease {
                release: ReleaseRecord {
                    service: service.into(),
                    produces: if produces {
                        topics()
                    } else {
                        Default::default()
                    },
                    consumes: if consumes {
                        topics()
                    } else {
                        Default::default()
                    },
                    ..crate::test_fleet::release(version, 'a')
                },
            });
        }
    }
    for version in ["v1", "v2"] {
        fleet.deploy("api", version);
    }
    fleet.deploy("web", "v1");
    let web = fleet.deploy("web", "v2");
    // web alone back to v1: it reads schema 1, api v2 stays and writes 2.
    let plan = fleet.plan(&[web], &PlanOptions::default()).unwrap();
    assert_eq!(plan.incompatibilities.len(), 1, "{plan:?}");
    assert!(
        plan.incompatibilities[0].detail.contains(
            "topic orders.created: web v1 reads message schema up to 1, but api v2 writes 2"
        ),
        "{}",
        plan.incompatibilities[0].detail
    );
    // Both back: compatible, with a word on what api v2 may have queued.
    let api = fleet
        .state
        .changes
        .values()
        .rev()
        .find(|change| change.service == "api")
        .unwrap()
        .number;
    let plan = fleet.plan(&[web, api], &PlanOptions::default()).unwrap();
    assert!(plan.incompatibilities.is_empty(), "{plan:?}");
    assert!(
        plan.notes.iter().any(|note| note
            .contains("topic orders.created: messages api v2 already queued may carry schema 2")),
        "{:?}",
        plan.notes
    );
}

#[test]
fn hosts_are_not_left_out_of_a_plan_that_reverts_their_changes_schema() {
    let mut fleet = Fleet::new();
    fleet.service("orders", &[]);
    for host in ["orders-1", "orders-2"] {
        fleet.host(host, "eu", &["orders"]);
    }
    fleet.release("orders", "v1", 1, &[]);
    fleet.release("orders", "v2", 1, &[]);
    fleet.deploy("orders", "v1");
    let orders = fleet.deploy("orders", "v2");
    let leave_out = PlanOptions {
        exclude_hosts: vec!["orders-2".into()],
        ..PlanOptions::default()
    };
    // No schema: orders-2 may stay on v2.
    fleet.plan(&[orders], &leave_out).unwrap();
    applied_on(&mut fleet, "a-db", orders, 1, &["a1"]);
    let refused = fleet.plan(&[orders], &leave_out).unwrap_err().to_string();
    assert!(
        refused.contains("reverts a1 of a-db, and the hosts left out would keep running orders"),
        "{refused}"
    );
    fleet.plan(&[orders], &PlanOptions::default()).unwrap();
}
