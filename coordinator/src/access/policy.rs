//! The access policy: bindings of identities and groups to roles over scopes, per-environment
//! rules, and a deny list. Replicated; decided purely, so every member decides alike.
//!
//! A policy file (TOML):
//!
//! ```toml
//! deny = ["user:mallory"]
//!
//! [groups]
//! sre = ["user:alice", "user:bob"]
//!
//! [[binding]]
//! name = "sre-admins"
//! role = "admin"
//! groups = ["sre"]
//! scopes = ["*"]
//!
//! [[binding]]
//! name = "payments-staging"
//! role = "operator"
//! identities = ["user:carol", "automation:ci"]
//! scopes = ["staging/*", "prod/payments"]
//!
//! [environment.prod]
//! approvals = 2
//!
//! [[hosts]]
//! names = ["web-*"]
//! services = ["web", "web-static"]
//! ```
//!
//! Kept in one file (over 700 lines): parsing, validation and the decision of one policy format, so
//! a review of an access change reads one file.

use std::collections::BTreeMap;

use rewind_shared::identity::{Kind, validate_group};
use rewind_shared::names::validate_name;
use serde::{Deserialize, Serialize};

/// Largest policy file accepted.
pub const MAX_POLICY_BYTES: usize = 256 * 1024;
/// Most bindings, groups, members of a group, identities or scopes of a binding, deny entries.
pub const MAX_POLICY_ITEMS: usize = 1000;
/// Most approvals an environment may require.
pub const MAX_APPROVALS: u32 = 10;
/// Longest a request for approval may wait, and its default.
pub const MAX_REQUEST_TTL_S: u32 = 7 * 24 * 3600;
pub const DEFAULT_REQUEST_TTL_S: u32 = 3600;

/// What a role lets its holder do, from least to most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    /// Look: lists, details, plans, health, the audit log.
    Read,
    /// Change: deploys, rollbacks and their controls, flags, releases.
    Operate,
    /// Approve someone else's request.
    Approve,
    /// Policy, cluster membership and leadership, breakers, by-hand resolutions.
    Administer,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Operate => "operate",
            Self::Approve => "approve",
            Self::Administer => "administer",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Viewer,
    Operator,
    Approver,
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Operator, Role::Approver, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Approver => "approver",
            Self::Admin => "admin",
        }
    }

    /// Whether this role grants `level`. An admin does not approve: approving is a duty kept
    /// apart from changing, so nobody approves by holding the keys.
    pub fn grants(self, level: Level) -> bool {
        match self {
            Self::Viewer => level == Level::Read,
            Self::Operator => matches!(level, Level::Read | Level::Operate),
            Self::Approver => matches!(level, Level::Read | Level::Approve),
            Self::Admin => matches!(level, Level::Read | Level::Operate | Level::Administer),
        }
    }
}

/// `environment/service`, either part `*`; `*` alone is `*/*`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ScopePattern {
    pub environment: String,
    pub service: String,
}

impl ScopePattern {
    pub const ANY: &'static str = "*";

    pub fn everything() -> Self {
        Self {
            environment: Self::ANY.into(),
            service: Self::ANY.into(),
        }
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let (environment, service) = match text.split_once('/') {
            Some(parts) => parts,
            None if text == Self::ANY => (Self::ANY, Self::ANY),
            None => {
                return Err(format!(
                    "scope {text:?} must be \"*\" or ENVIRONMENT/SERVICE (either may be \"*\")"
                ));
            }
        };
        for (field, part) in [("environment", environment), ("service", service)] {
            if part != Self::ANY {
                validate_name(field, part).map_err(|error| format!("scope {text:?}: {error}"))?;
            }
        }
        Ok(Self {
            environment: environment.into(),
            service: service.into(),
        })
    }

    fn covers_environment(&self, environment: &str) -> bool {
        self.environment == Self::ANY || self.environment == environment
    }

    fn covers_service(&self, service: &str) -> bool {
        self.service == Self::ANY || self.service == service
    }

    /// Whether this pattern covers `target`.
    pub fn covers(&self, target: &Target, level: Level) -> bool {
        match target {
            Target::Cluster => self.environment == Self::ANY && self.service == Self::ANY,
            // Service definitions and releases are shared by every environment: seeing them
            // needs the service somewhere, changing them needs it everywhere.
            Target::Service(service) => {
                self.covers_service(service)
                    && (level == Level::Read || self.environment == Self::ANY)
            }
            Target::In {
                environment,
                service,
            } => self.covers_environment(environment) && self.covers_service(service),
            Target::Anywhere => true,
        }
    }
}

impl std::fmt::Display for ScopePattern {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}/{}", self.environment, self.service)
    }
}

impl Serialize for ScopePattern {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ScopePattern {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// What a call acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The whole cluster: its policy, members, audit log, breaker.
    Cluster,
    /// A service's definition or releases, shared by every environment.
    Service(String),
    /// A service in an environment: its changes, rollbacks, flags, hosts.
    In {
        environment: String,
        service: String,
    },
    /// Nothing in particular: what any binding of the level allows (lists filtered item by item).
    Anywhere,
}

impl Target {
    pub fn scoped(environment: &str, service: &str) -> Self {
        Self::In {
            environment: environment.into(),
            service: service.into(),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cluster => formatter.write_str("the cluster"),
            Self::Service(service) => write!(formatter, "service {service} (every environment)"),
            Self::In {
                environment,
                service,
            } => write!(formatter, "{environment}/{service}"),
            Self::Anywhere => formatter.write_str("any scope"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Binding {
    pub name: String,
    pub role: Role,
    /// `kind:name` of the identities it binds, e.g. `user:alice`, `automation:ci`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// Groups it binds: a certificate's O or OU, or a group listed in the policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    pub scopes: Vec<ScopePattern>,
}

/// When an environment's automatic rollbacks start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AutomaticRollbacks {
    /// At once, recorded as approved by the policy: mitigation does not wait for a meeting.
    #[default]
    AtOnce,
    /// As a request, like a person's.
    AwaitApproval,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct EnvironmentRules {
    /// Distinct approvers, none of them the requester, a change or rollback here needs.
    #[serde(default)]
    pub approvals: u32,
    #[serde(default)]
    pub automatic_rollbacks: AutomaticRollbacks,
    /// Whether an operator may run without approvals (`--break-glass --reason`).
    #[serde(default = "yes")]
    pub break_glass: bool,
    /// How long a request waits for its approvals.
    #[serde(default = "default_request_ttl_s")]
    pub request_ttl_s: u32,
    /// Whether rollback fire drills may deploy a known-bad release here (cluster version 11).
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub drills: bool,
}

impl Default for EnvironmentRules {
    fn default() -> Self {
        Self {
            approvals: 0,
            automatic_rollbacks: AutomaticRollbacks::AtOnce,
            break_glass: true,
            request_ttl_s: DEFAULT_REQUEST_TTL_S,
            drills: true,
        }
    }
}

fn yes() -> bool {
    true
}

fn is_yes(value: &bool) -> bool {
    *value
}

fn default_request_ttl_s() -> u32 {
    DEFAULT_REQUEST_TTL_S
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Policy {
    /// Revoked identities (`kind:name`): refused on every call, whatever binds them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// Groups listed here, by name: their members as `kind:name`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<String, Vec<String>>,
    #[serde(default, rename = "binding", skip_serializing_if = "Vec::is_empty")]
    pub bindings: Vec<Binding>,
    #[serde(
        default,
        rename = "environment",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub environments: BTreeMap<String, EnvironmentRules>,
    /// Which services which hosts may run. None: any host may run any service.
    #[serde(default, rename = "hosts", skip_serializing_if = "Vec::is_empty")]
    pub host_rules: Vec<HostRule>,
}

/// Hosts whose ids match one of `names` may run (register, and report for) the services that
/// match one of `services`. Patterns are names or prefixes ending in `*`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HostRule {
    pub names: Vec<String>,
    pub services: Vec<String>,
}

impl Policy {
    /// Whether host `host` may run `service`: always when the policy has no host rules (then a
    /// host keeps the services it registered with, judged at `Register`), else only as a rule
    /// assigns them.
    pub fn may_run(&self, host: &str, service: &str) -> bool {
        use rewind_shared::names::matches_pattern;
        self.host_rules.is_empty()
            || self.host_rules.iter().any(|rule| {
                rule.names
                    .iter()
                    .any(|pattern| matches_pattern(pattern, host))
                    && rule
                        .services
                        .iter()
                        .any(|pattern| matches_pattern(pattern, service))
            })
    }
}

/// Who asks, as the policy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub kind: Kind,
    pub name: String,
    /// The certificate's O and OU values.
    pub groups: Vec<String>,
}

impl Principal {
    pub fn new(kind: Kind, name: &str) -> Self {
        Self {
            kind,
            name: name.into(),
            groups: Vec::new(),
        }
    }

    /// `kind:name`.
    pub fn id(&self) -> String {
        format!("{}:{}", self.kind, self.name)
    }

    /// Parses `kind:name`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (kind, name) = text
            .split_once(':')
            .ok_or_else(|| format!("identity {text:?} must be KIND:NAME, e.g. user:alice"))?;
        let kind = Kind::parse(kind).map_err(|error| format!("identity {text:?}: {error}"))?;
        validate_name("identity", name).map_err(|error| format!("identity {text:?}: {error}"))?;
        Ok(Self::new(kind, name))
    }
}

/// The answer to "may this principal do this?", and what decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The binding that allowed it.
    pub binding: Option<String>,
    /// Why, in a sentence: which binding allowed it, or why none did.
    pub reason: String,
}

impl Policy {
    /// Reads a policy file, refusing unknown keys (a misspelt rule must not pass silently), and
    /// checks it.
    pub fn from_toml(text: &str) -> Result<Self, Vec<String>> {
        if text.len() > MAX_POLICY_BYTES {
            return Err(vec![format!(
                "the policy is {} bytes, at most {MAX_POLICY_BYTES} are allowed",
                text.len()
            )]);
        }
        let policy: Self = toml::from_str(text).map_err(|error| vec![error.to_string()])?;
        policy.validate()?;
        Ok(policy)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|error| format!("# cannot render: {error}\n"))
    }

    /// sha256 of the policy's canonical JSON (fields in declaration order, maps sorted), which
    /// `apply()` compares: it must not depend on how a TOML library lays a file out.
    pub fn hash(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        rewind_shared::digest::sha256_hex(&json)
    }

    /// Every problem at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let mut bound = |what: &str, count: usize| {
            if count > MAX_POLICY_ITEMS {
                problems.push(format!("{what}: {count}, at most {MAX_POLICY_ITEMS}"));
            }
        };
        bound("deny", self.deny.len());
        bound("groups", self.groups.len());
        bound("bindings", self.bindings.len());
        bound("environments", self.environments.len());
        bound("hosts", self.host_rules.len());
        for (index, rule) in self.host_rules.iter().enumerate() {
            let at = format!("hosts {}", index + 1);
            for (what, patterns) in [("names", &rule.names), ("services", &rule.services)] {
                if patterns.is_empty() {
                    problems.push(format!("{at}: {what} is empty (\"*\" for any)"));
                }
                if patterns.len() > MAX_POLICY_ITEMS {
                    problems.push(format!("{at}: {what}: more than {MAX_POLICY_ITEMS}"));
                }
                for pattern in patterns.iter() {
                    if let Err(error) = rewind_shared::names::validate_pattern(what, pattern) {
                        problems.push(format!("{at}: {error}"));
                    }
                }
            }
        }
        for identity in &self.deny {
            if let Err(problem) = Principal::parse(identity) {
                problems.push(format!("deny: {problem}"));
            }
        }
        for (group, members) in &self.groups {
            if let Err(error) = validate_group(group) {
                problems.push(format!("groups.{group}: {error}"));
            }
            if members.len() > MAX_POLICY_ITEMS {
                problems.push(format!(
                    "groups.{group}: more than {MAX_POLICY_ITEMS} members"
                ));
            }
            for member in members {
                if let Err(problem) = Principal::parse(member) {
                    problems.push(format!("groups.{group}: {problem}"));
                }
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (index, binding) in self.bindings.iter().enumerate() {
            let at = format!("binding {} ({:?})", index + 1, binding.name);
            if let Err(error) = validate_name("name", &binding.name) {
                problems.push(format!("{at}: {error}"));
            }
            if !names.insert(binding.name.as_str()) {
                problems.push(format!("{at}: another binding has this name"));
            }
            if binding.identities.is_empty() && binding.groups.is_empty() {
                problems.push(format!("{at}: binds nobody (no identities, no groups)"));
            }
            if binding.scopes.is_empty() {
                problems.push(format!("{at}: has no scopes (use \"*\" for everything)"));
            }
            for (what, count) in [
                ("identities", binding.identities.len()),
                ("groups", binding.groups.len()),
                ("scopes", binding.scopes.len()),
            ] {
                if count > MAX_POLICY_ITEMS {
                    problems.push(format!("{at}: {what}: more than {MAX_POLICY_ITEMS}"));
                }
            }
            for identity in &binding.identities {
                match Principal::parse(identity) {
                    Ok(principal) if matches!(principal.kind, Kind::Member | Kind::Agent) => {
                        problems.push(format!(
                            "{at}: {identity}: members and agents are never bound to roles"
                        ))
                    }
                    Ok(_) => {}
                    Err(problem) => problems.push(format!("{at}: {problem}")),
                }
            }
            for group in &binding.groups {
                if let Err(error) = validate_group(group) {
                    problems.push(format!("{at}: {error}"));
                }
            }
        }
        for (environment, rules) in &self.environments {
            if let Err(error) = validate_name("environment", environment) {
                problems.push(format!("environment.{environment}: {error}"));
            }
            if rules.approvals > MAX_APPROVALS {
                problems.push(format!(
                    "environment.{environment}.approvals: {}, at most {MAX_APPROVALS}",
                    rules.approvals
                ));
            }
            if rules.request_ttl_s == 0 || rules.request_ttl_s > MAX_REQUEST_TTL_S {
                problems.push(format!(
                    "environment.{environment}.request-ttl-s: {}, must be 1 to {MAX_REQUEST_TTL_S}",
                    rules.request_ttl_s
                ));
            }
        }
        if self.administrators().is_empty() {
            problems.push(
                "no binding gives anyone admin on \"*\": the cluster could never be administered again"
                    .into(),
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The bindings that give admin over the whole cluster to someone who is certainly there:
    /// an identity not denied, or a group listed in the policy with a member not denied. A
    /// group only certificates carry does not count: nothing shows anyone holds one.
    pub fn administrators(&self) -> Vec<&Binding> {
        let present = |identity: &String| !self.deny.contains(identity);
        self.bindings
            .iter()
            .filter(|binding| {
                binding.role == Role::Admin
                    && binding
                        .scopes
                        .iter()
                        .any(|scope| scope.covers(&Target::Cluster, Level::Administer))
                    && (binding.identities.iter().any(present)
                        || binding.groups.iter().any(|group| {
                            self.groups
                                .get(group)
                                .is_some_and(|members| members.iter().any(present))
                        }))
            })
            .collect()
    }

    pub fn is_denied(&self, principal: &Principal) -> bool {
        let id = principal.id();
        self.deny.contains(&id)
    }

    /// Whether `binding` names `principal`, directly or through one of its groups.
    fn binds(&self, binding: &Binding, principal: &Principal, id: &str) -> bool {
        binding.identities.iter().any(|identity| identity == id)
            || binding.groups.iter().any(|group| {
                principal.groups.contains(group)
                    || self
                        .groups
                        .get(group)
                        .is_some_and(|members| members.iter().any(|member| member == id))
            })
    }

    /// May `principal` act at `level` on `target`? Default deny: only a binding allows.
    pub fn decide(&self, principal: &Principal, level: Level, target: &Target) -> Decision {
        let id = principal.id();
        let denied = |reason: String| Decision {
            allowed: false,
            binding: None,
            reason,
        };
        if self.is_denied(principal) {
            return denied(format!("{id} is on the policy's deny list"));
        }
        if !matches!(principal.kind, Kind::User | Kind::Automation) {
            return denied(format!(
                "{id} is a {} identity: only users and automation are bound to roles",
                principal.kind
            ));
        }
        if level == Level::Approve && principal.kind != Kind::User {
            return denied(format!("{id} is automation: only people approve"));
        }
        let allowing = self.bindings.iter().find(|binding| {
            binding.role.grants(level)
                && self.binds(binding, principal, &id)
                && binding
                    .scopes
                    .iter()
                    .any(|scope| scope.covers(target, level))
        });
        match allowing {
            Some(binding) => Decision {
                allowed: true,
                binding: Some(binding.name.clone()),
                reason: format!(
                    "binding {:?} gives {id} role {} on {}",
                    binding.name,
                    binding.role.as_str(),
                    binding
                        .scopes
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
            None => denied(format!(
                "no binding allows {id} to {} {target}",
                level.as_str()
            )),
        }
    }

    /// The rules of `environment` (defaults where the policy names none).
    pub fn environment(&self, environment: &str) -> EnvironmentRules {
        self.environments
            .get(environment)
            .cloned()
            .unwrap_or_default()
    }

    /// `--dev`'s policy: `principal` administers everything, and the webhook receivers'
    /// default automation identities may roll back anything.
    pub fn dev(principal: &str) -> Self {
        let binding = |name: &str, role, identities: &[&str]| Binding {
            name: name.into(),
            role,
            identities: identities
                .iter()
                .map(|identity| identity.to_string())
                .collect(),
            groups: Vec::new(),
            scopes: vec![ScopePattern::everything()],
        };
        Self {
            bindings: vec![
                binding("dev-admin", Role::Admin, &[principal]),
                binding(
                    "dev-monitoring",
                    Role::Operator,
                    &["automation:alertmanager", "automation:webhook"],
                ),
            ],
            ..Self::default()
        }
    }
}

/// What changed from `before` to `after`, in one line for the audit log: bindings, groups and
/// environments added, removed or changed (by name), and deny entries added or removed.
pub fn summarize_change(before: &Policy, after: &Policy) -> String {
    fn named<'a, T: PartialEq>(
        what: &str,
        before: &BTreeMap<&'a str, &'a T>,
        after: &BTreeMap<&'a str, &'a T>,
        parts: &mut Vec<String>,
    ) {
        let added: Vec<&str> = after
            .keys()
            .filter(|name| !before.contains_key(*name))
            .copied()
            .collect();
        let removed: Vec<&str> = before
            .keys()
            .filter(|name| !after.contains_key(*name))
            .copied()
            .collect();
        let changed: Vec<&str> = after
            .iter()
            .filter(|(name, value)| before.get(*name).is_some_and(|old| old != *value))
            .map(|(name, _)| *name)
            .collect();
        for (verb, names) in [("added", added), ("removed", removed), ("changed", changed)] {
            if !names.is_empty() {
                parts.push(format!("{what} {verb}: {}", names.join(", ")));
            }
        }
    }
    fn bindings(policy: &Policy) -> BTreeMap<&str, &Binding> {
        policy
            .bindings
            .iter()
            .map(|binding| (binding.name.as_str(), binding))
            .collect()
    }
    fn groups(policy: &Policy) -> BTreeMap<&str, &Vec<String>> {
        policy
            .groups
            .iter()
            .map(|(name, members)| (name.as_str(), members))
            .collect()
    }
    fn environments(policy: &Policy) -> BTreeMap<&str, &EnvironmentRules> {
        policy
            .environments
            .iter()
            .map(|(name, rules)| (name.as_str(), rules))
            .collect()
    }
    fn deny(policy: &Policy) -> BTreeMap<&str, &String> {
        policy
            .deny
            .iter()
            .map(|identity| (identity.as_str(), identity))
            .collect()
    }
    let mut parts = Vec::new();
    named("bindings", &bindings(before), &bindings(after), &mut parts);
    named("groups", &groups(before), &groups(after), &mut parts);
    named(
        "environments",
        &environments(before),
        &environments(after),
        &mut parts,
    );
    named("deny", &deny(before), &deny(after), &mut parts);
    if parts.is_empty() {
        return "no change".into();
    }
    let summary = parts.join("; ");
    rewind_shared::names::truncate(&summary, 2048).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
deny = ["user:mallory"]

[groups]
sre = ["user:alice", "user:bob"]

[[binding]]
name = "sre-admins"
role = "admin"
groups = ["sre"]
scopes = ["*"]

[[binding]]
name = "payments"
role = "operator"
identities = ["user:carol", "automation:ci", "user:mallory"]
scopes = ["staging/*", "prod/payments"]

[[binding]]
name = "prod-viewers"
role = "viewer"
groups = ["Example Corp"]
scopes = ["prod/*"]

[[binding]]
name = "approvers"
role = "approver"
identities = ["user:dave", "automation:ci"]
scopes = ["prod/*"]

[environment.prod]
approvals = 2
"#;

    fn policy() -> Policy {
        Policy::from_toml(EXAMPLE).unwrap()
    }

    fn user(name: &str) -> Principal {
        Principal::new(Kind::User, name)
    }

    #[test]
    fn host_rules_assign_services_to_hosts_and_none_leave_it_to_the_agents() {
        assert!(policy().may_run("anything", "payments"), "no rules: open");
        let ruled = Policy::from_toml(&format!(
            "{EXAMPLE}\n[[hosts]]\nnames = [\"web-*\", \"edge-1\"]\nservices = [\"web\", \"web-*\"]\n\
             [[hosts]]\nnames = [\"*\"]\nservices = [\"node-exporter\"]\n"
        ))
        .unwrap();
        assert!(ruled.may_run("web-7", "web"));
        assert!(ruled.may_run("edge-1", "web-static"));
        assert!(ruled.may_run("db-1", "node-exporter"));
        assert!(!ruled.may_run("web-7", "payments"));
        assert!(!ruled.may_run("edge-2", "web"));
        assert_eq!(
            ruled.hash(),
            Policy::from_toml(&ruled.to_toml()).unwrap().hash()
        );
        // Without rules the hash is what it was before host rules existed.
        assert!(!policy().to_toml().contains("hosts"));
        let problems = Policy::from_toml(&format!(
            "{EXAMPLE}\n[[hosts]]\nnames = []\nservices = [\"Web!\"]\n"
        ))
        .unwrap_err()
        .join("; ");
        assert!(
            problems.contains("hosts 1: names is empty") && problems.contains("hosts 1: services"),
            "{problems}"
        );
    }

    #[test]
    fn bindings_allow_within_their_scopes_and_nothing_else() {
        let policy = policy();
        let carol = user("carol");
        let staging = Target::scoped("staging", "web");
        let decision = policy.decide(&carol, Level::Operate, &staging);
        assert!(decision.allowed, "{decision:?}");
        assert_eq!(decision.binding.as_deref(), Some("payments"));
        assert!(
            policy
                .decide(&carol, Level::Operate, &Target::scoped("prod", "payments"))
                .allowed
        );
        let refused = policy.decide(&carol, Level::Operate, &Target::scoped("prod", "web"));
        assert!(!refused.allowed);
        assert_eq!(
            refused.reason,
            "no binding allows user:carol to operate prod/web"
        );
        assert!(
            !policy
                .decide(&carol, Level::Administer, &Target::Cluster)
                .allowed
        );
        assert!(
            !policy
                .decide(&user("nobody"), Level::Read, &Target::Anywhere)
                .allowed
        );
    }

    #[test]
    fn groups_come_from_the_certificate_or_the_policy() {
        let policy = policy();
        assert!(
            policy
                .decide(&user("alice"), Level::Administer, &Target::Cluster)
                .allowed
        );
        let mut erin = user("erin");
        assert!(
            !policy
                .decide(&erin, Level::Read, &Target::scoped("prod", "web"))
                .allowed
        );
        erin.groups = vec!["Example Corp".into()];
        assert!(
            policy
                .decide(&erin, Level::Read, &Target::scoped("prod", "web"))
                .allowed
        );
        assert!(
            !policy
                .decide(&erin, Level::Read, &Target::scoped("staging", "web"))
                .allowed
        );
    }

    #[test]
    fn shared_objects_need_every_environment_to_change_and_one_to_see() {
        let policy = policy();
        let carol = user("carol");
        let payments = Target::Service("payments".into());
        assert!(policy.decide(&carol, Level::Read, &payments).allowed);
        assert!(!policy.decide(&carol, Level::Operate, &payments).allowed);
        assert!(
            policy
                .decide(&user("alice"), Level::Operate, &payments)
                .allowed
        );
    }

    #[test]
    fn the_deny_list_wins_admins_do_not_approve_and_automation_never_approves() {
        let policy = policy();
        let mallory = policy.decide(&user("mallory"), Level::Read, &Target::Anywhere);
        assert_eq!(mallory.reason, "user:mallory is on the policy's deny list");
        let prod = Target::scoped("prod", "web");
        assert!(!policy.decide(&user("alice"), Level::Approve, &prod).allowed);
        assert!(policy.decide(&user("dave"), Level::Approve, &prod).allowed);
        let ci = Principal::new(Kind::Automation, "ci");
        assert!(!policy.decide(&ci, Level::Approve, &prod).allowed);
        let agent = Principal::new(Kind::Agent, "web-1");
        assert!(
            !policy
                .decide(&agent, Level::Read, &Target::Anywhere)
                .allowed
        );
    }

    #[test]
    fn a_policy_that_leaves_no_admin_or_misspells_a_key_is_refused() {
        let no_admin = EXAMPLE.replace("role = \"admin\"", "role = \"viewer\"");
        let problems = Policy::from_toml(&no_admin).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|problem| problem.contains("no binding gives anyone admin"))
        );
        // Admins only through a group whose every member is denied, or one nobody lists.
        let denied_group = EXAMPLE.replace(
            "deny = [\"user:mallory\"]",
            "deny = [\"user:mallory\", \"user:alice\", \"user:bob\"]",
        );
        assert!(Policy::from_toml(&denied_group).is_err());
        let unlisted_group = EXAMPLE.replace("groups = [\"sre\"]", "groups = [\"sres\"]");
        assert!(Policy::from_toml(&unlisted_group).is_err());
        let misspelt = EXAMPLE.replace("scopes = [\"*\"]", "scope = [\"*\"]");
        let problems = Policy::from_toml(&misspelt).unwrap_err();
        assert!(problems[0].contains("scope"), "{problems:?}");
        let bound_agent = EXAMPLE.replace("\"automation:ci\", \"user:mallory\"", "\"agent:web-1\"");
        let problems = Policy::from_toml(&bound_agent).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|problem| problem.contains("never bound")),
            "{problems:?}"
        );
        let bad_scope = EXAMPLE.replace("\"prod/payments\"", "\"prod\"");
        assert!(Policy::from_toml(&bad_scope).is_err());
    }

    #[test]
    fn a_change_is_summarized_by_name() {
        let before = policy();
        let mut after = before.clone();
        after.bindings.retain(|binding| binding.name != "approvers");
        after.bindings[1].scopes.push(ScopePattern::everything());
        after.deny.push("user:eve".into());
        assert_eq!(
            summarize_change(&before, &after),
            "bindings removed: approvers; bindings changed: payments; deny added: user:eve"
        );
        assert_eq!(summarize_change(&before, &before), "no change");
    }

    #[test]
    fn a_policy_survives_its_own_rendering() {
        let policy = policy();
        assert_eq!(Policy::from_toml(&policy.to_toml()).unwrap(), policy);
        assert_eq!(policy.environment("prod").approvals, 2);
        assert_eq!(policy.environment("staging").approvals, 0);
    }
}
