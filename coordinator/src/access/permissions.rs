//! The one table of what every RPC needs: which kind of certificate may call it, and for the
//! control service, the action it is audited as, the level it needs, and what it acts on.
//!
//! A call whose method is not in the table is refused before any handler runs, and a test walks
//! every method of the generated descriptors against it, so a new RPC cannot be served without a
//! permission.

use rewind_shared::identity::Kind;

use super::policy::Level;

/// What a method acts on, and so how its target is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// The whole cluster: decided at the gate.
    Cluster,
    /// A service shared by every environment: the handler names it.
    Service,
    /// A service in an environment: the handler finds which (a change's, a rollback's, a flag's).
    Scoped,
    /// A list: allowed to anyone with the level somewhere; the handler keeps what they may see.
    Listed,
}

/// What one RPC needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permission {
    /// `/rewind.v1.ControlService/StartRollback`.
    pub method: &'static str,
    /// Which kind of certificate may call it.
    pub kind: CallerKind,
    /// How it is audited and named in refusals, e.g. `rollback.start`.
    pub action: &'static str,
    pub level: Level,
    pub reach: Reach,
}

/// Which certificates may call a method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallerKind {
    /// Coordinator members (the Raft and member services).
    Member,
    /// Agents, each as its own host.
    Agent,
    /// People and automation, as the policy allows.
    Person,
    /// Agents, people and automation, each about its own certificate (renewal).
    Holder,
    /// Anyone, with or without a certificate: the request itself carries the credential (a
    /// join token).
    Anyone,
    /// Anyone, with or without a certificate, on any member: health checks, which load
    /// balancers and probes make without a client certificate.
    Prober,
    /// Any certificate of this cluster, with a kind, on any member: server reflection.
    Certified,
}

impl CallerKind {
    pub fn admits(self, kind: Kind) -> bool {
        match self {
            Self::Member => kind == Kind::Member,
            Self::Agent => kind == Kind::Agent,
            Self::Person => matches!(kind, Kind::User | Kind::Automation),
            Self::Holder => matches!(kind, Kind::Agent | Kind::User | Kind::Automation),
            Self::Anyone | Self::Prober | Self::Certified => true,
        }
    }

    /// Whether only the leader serves it (agents and people are sent there); members, probes
    /// and reflection are answered by every member.
    pub fn leader_only(self) -> bool {
        !matches!(self, Self::Member | Self::Prober | Self::Certified)
    }

    /// Whether it is called without a certificate (the gate reads none).
    pub fn needs_no_certificate(self) -> bool {
        matches!(self, Self::Anyone | Self::Prober)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Member => "member certificates",
            Self::Agent => "agent certificates",
            Self::Person => "user and automation certificates",
            Self::Holder => "agent, user and automation certificates",
            Self::Anyone => "anyone",
            Self::Prober => "anyone, on any member",
            Self::Certified => "certificates of every kind",
        }
    }
}

const fn control(
    name: &'static str,
    action: &'static str,
    level: Level,
    reach: Reach,
) -> Permission {
    Permission {
        method: name,
        kind: CallerKind::Person,
        action,
        level,
        reach,
    }
}

const fn peer(name: &'static str, kind: CallerKind, action: &'static str) -> Permission {
    Permission {
        method: name,
        kind,
        action,
        // Members and agents are not bound to roles: their kind is their permission.
        level: Level::Operate,
        reach: Reach::Cluster,
    }
}

/// A standard service's method: reading only, open to its kind of caller.
const fn probe(name: &'static str, kind: CallerKind, action: &'static str) -> Permission {
    Permission {
        method: name,
        kind,
        action,
        level: Level::Read,
        reach: Reach::Cluster,
    }
}

const C: &str = "/rewind.v1.ControlService/";

macro_rules! control_table {
    ($(($method:literal, $action:literal, $level:ident, $reach:ident)),* $(,)?) => {
        &[$(control(concat!("/rewind.v1.ControlService/", $method), $action, Level::$level, Reach::$reach)),*]
    };
}

const CONTROL: &[Permission] = control_table![
    ("ListHosts", "host.list", Read, Listed),
    ("InspectHost", "host.inspect", Read, Scoped),
    ("AdoptHostState", "host.adopt", Operate, Scoped),
    ("ForgetHost", "host.forget", Administer, Cluster),
    ("PutService", "service.put", Operate, Service),
    ("ListServices", "service.list", Read, Listed),
    ("GetServiceHealth", "service.health", Read, Service),
    ("RegisterRelease", "release.register", Operate, Service),
    ("ListReleases", "release.list", Read, Service),
    ("RegisterMigration", "migration.register", Operate, Cluster),
    ("ListMigrations", "migration.list", Read, Cluster),
    ("ListSchemaTxns", "schema-txn.list", Read, Listed),
    (
        "ResolvedByHand",
        "schema-txn.resolved-by-hand",
        Administer,
        Cluster
    ),
    ("StartDrill", "drill.start", Operate, Scoped),
    ("GetDrill", "drill.get", Read, Scoped),
    ("StartRollbackDrill", "drill.rollback", Operate, Scoped),
    ("GetRollbackDrill", "drill.show", Read, Scoped),
    ("ListRollbackDrills", "drill.list", Read, Listed),
    ("AbortRollbackDrill", "drill.abort", Operate, Scoped),
    ("StartChange", "change.start", Operate, Scoped),
    ("GetChange", "change.get", Read, Scoped),
    ("ListChanges", "change.list", Read, Listed),
    ("PlanRollback", "rollback.plan", Read, Scoped),
    ("StartRollback", "rollback.start", Operate, Scoped),
    ("GetRollback", "rollback.get", Read, Scoped),
    ("ListRollbacks", "rollback.list", Read, Listed),
    ("WatchRollback", "rollback.watch", Read, Scoped),
    ("ExplainRollback", "rollback.explain", Read, Scoped),
    ("PauseRollback", "rollback.pause", Operate, Scoped),
    ("ResumeRollback", "rollback.resume", Operate, Scoped),
    ("AbortRollback", "rollback.abort", Operate, Scoped),
    ("SkipHost", "rollback.skip-host", Operate, Scoped),
    ("IsolateService", "rollback.isolate", Operate, Scoped),
    ("ListTriggers", "trigger.list", Read, Listed),
    ("ResetBreaker", "breaker.reset", Administer, Cluster),
    ("SetFlag", "flag.set", Operate, Scoped),
    ("ListFlags", "flag.list", Read, Listed),
    ("ListAudit", "audit.list", Read, Cluster),
    ("VerifyAudit", "audit.verify", Read, Cluster),
    ("ExportAudit", "audit.export", Read, Cluster),
    ("ListIncidents", "incident.list", Read, Listed),
    ("GetIncident", "incident.show", Read, Scoped),
    ("NoteIncident", "incident.note", Operate, Scoped),
    ("CloseIncident", "incident.close", Operate, Scoped),
    ("GetRunbook", "runbook.show", Read, Service),
    ("ConfirmAuditArchive", "audit.archived", Administer, Cluster),
    ("RedactAudit", "audit.redact", Administer, Cluster),
    ("ListMembers", "cluster.list", Read, Cluster),
    (
        "TransferLeader",
        "cluster.transfer-leader",
        Administer,
        Cluster
    ),
    ("AddMember", "cluster.add", Administer, Cluster),
    ("RemoveMember", "cluster.remove", Administer, Cluster),
    ("GetClusterVersion", "cluster.version", Read, Cluster),
    (
        "FinalizeUpgrade",
        "cluster.upgrade-finalize",
        Administer,
        Cluster
    ),
    ("GetPolicy", "policy.show", Read, Cluster),
    ("ApplyPolicy", "policy.apply", Administer, Cluster),
    ("CheckAccess", "policy.check", Read, Cluster),
    ("ListRequests", "request.list", Read, Listed),
    ("GetRequest", "request.show", Read, Scoped),
    ("ApproveRequest", "request.approve", Approve, Scoped),
    ("DenyRequest", "request.deny", Approve, Scoped),
    ("ReviewRequest", "request.review", Approve, Scoped),
    ("CreateJoinToken", "join-token.create", Administer, Cluster),
    ("ListJoinTokens", "join-token.list", Administer, Cluster),
    ("RevokeJoinToken", "join-token.revoke", Administer, Cluster),
];

const PEERS: &[Permission] = &[
    peer(
        "/rewind.v1.AgentService/Session",
        CallerKind::Agent,
        "agent.session",
    ),
    peer(
        "/rewind.v1.RaftService/Deliver",
        CallerKind::Member,
        "raft.deliver",
    ),
    peer(
        "/rewind.v1.RaftService/DeliverStream",
        CallerKind::Member,
        "raft.deliver-stream",
    ),
    peer(
        "/rewind.v1.RaftService/SendSnapshot",
        CallerKind::Member,
        "raft.send-snapshot",
    ),
    peer(
        "/rewind.v1.MemberService/GetMemberStatus",
        CallerKind::Member,
        "member.status",
    ),
    // The token in the request is the credential: a joining host has no certificate yet.
    peer("/rewind.v1.JoinService/Join", CallerKind::Anyone, "join"),
    peer(
        "/rewind.v1.JoinService/Renew",
        CallerKind::Holder,
        "certificate.renew",
    ),
    // The standard services (`api::probes`): read-only, and served by every member.
    probe(
        "/grpc.health.v1.Health/Check",
        CallerKind::Prober,
        "health.check",
    ),
    probe(
        "/grpc.health.v1.Health/Watch",
        CallerKind::Prober,
        "health.watch",
    ),
    probe(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        CallerKind::Certified,
        "reflection.info",
    ),
    probe(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        CallerKind::Certified,
        "reflection.info-v1alpha",
    ),
];

/// What `method` (a gRPC path) needs, or `None` for a method nobody may call.
pub fn permission(method: &str) -> Option<&'static Permission> {
    if method.starts_with(C) {
        CONTROL
            .iter()
            .find(|permission| permission.method == method)
    } else {
        PEERS.iter().find(|permission| permission.method == method)
    }
}

/// Every permission, for the test that checks the table against the protocol.
pub fn all() -> impl Iterator<Item = &'static Permission> {
    CONTROL.iter().chain(PEERS)
}

/// Every control action's name, in table order.
pub fn actions() -> impl Iterator<Item = &'static str> {
    CONTROL.iter().map(|permission| permission.action)
}

/// The permission of a control action (`rollback.start`), for `access check`.
pub fn by_action(action: &str) -> Option<&'static Permission> {
    CONTROL
        .iter()
        .find(|permission| permission.action == action)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn every_method_served_has_exactly_one_permission() {
        let methods: Vec<String> = crate::api::probes::DESCRIPTOR_SETS
            .iter()
            .flat_map(|set| rewind_proto::methods_in(set))
            .collect();
        assert!(methods.len() > 40, "read {} methods", methods.len());
        for standard in [
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(
                methods.iter().any(|method| method == standard),
                "{standard}"
            );
        }
        for method in &methods {
            let found = all()
                .filter(|permission| permission.method == method)
                .count();
            assert_eq!(found, 1, "{method} has {found} permissions in the table");
        }
        for permission in all() {
            assert!(
                methods.contains(&permission.method.to_string()),
                "{} is in the table but not in the protocol",
                permission.method
            );
        }
        let mut actions: Vec<_> = all().map(|permission| permission.action).collect();
        actions.sort();
        let before = actions.len();
        actions.dedup();
        assert_eq!(actions.len(), before, "two methods share an action name");
    }
}
