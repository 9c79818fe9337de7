//! Who may do what: identities from certificates, the replicated policy, and the gate every
//! call passes before a handler runs.
//!
//! The request path: TLS checks the certificate chains to the cluster's CA; the gate
//! (`api::gate`, a tower layer around every service) looks the method up in [`permissions`], reads the
//! caller's kind and name from the certificate, refuses a kind the method is not for, an
//! identity on the deny list, and a person no binding allows at the method's level anywhere
//! (or, for whole-cluster methods, on the cluster); it then hands the handler a [`Caller`].
//! Handlers of scoped methods find the target (a rollback's environments and services, a
//! flag's) and ask [`Caller::authorize`]; list handlers keep only what the caller may see.
//!
//! # Layout
//! - [`policy`]: the policy file, roles, scopes, and the pure decision.
//! - [`permissions`]: the table of every RPC's permission.
//! - [`bootstrap`]: the first leader puts its configured policy in force.

pub mod bootstrap;
pub mod permissions;
pub mod policy;

use std::sync::Arc;

pub use permissions::{Permission, Reach};
pub use policy::{Decision, Level, Policy, Principal, Target};

/// The replicated access state: the policy in force and how many times it was applied.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AccessState {
    /// `None` until the bootstrap policy is applied: until then every person is refused.
    pub policy: Option<Arc<Policy>>,
    pub version: u64,
}

/// A caller the gate let through, and what its method needs.
#[derive(Clone, Debug)]
pub struct Caller {
    pub principal: Principal,
    pub permission: &'static Permission,
    /// The policy as the gate read it, so one call is judged by one policy.
    pub policy: Option<Arc<Policy>>,
}

/// A refused call: what is named in `PERMISSION_DENIED` and in the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub identity: String,
    pub action: &'static str,
    pub target: String,
    pub reason: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "{} may not {} on {}: {}",
            self.identity, self.action, self.target, self.reason
        )
    }
}

impl Caller {
    /// `kind:name`, as commands and the audit log record it.
    pub fn id(&self) -> String {
        self.principal.id()
    }

    /// Decides this call's action on `target`.
    pub fn decide(&self, target: &Target) -> Decision {
        decide(
            self.policy.as_deref(),
            &self.principal,
            self.permission.level,
            target,
        )
    }

    /// Allows this call's action on `target`, or says why not.
    pub fn authorize(&self, target: &Target) -> Result<(), Refusal> {
        let decision = self.decide(target);
        if decision.allowed {
            Ok(())
        } else {
            Err(Refusal {
                identity: self.id(),
                action: self.permission.action,
                target: target.to_string(),
                reason: decision.reason,
            })
        }
    }

    /// Allows it on every target, or names the first refused.
    pub fn authorize_all(&self, targets: &[Target]) -> Result<(), Refusal> {
        targets.iter().try_for_each(|target| self.authorize(target))
    }

    /// Whether a list may show an item with these targets (all of them).
    pub fn may_see(&self, targets: &[Target]) -> bool {
        targets.iter().all(|target| self.decide(target).allowed)
    }
}

/// [`Policy::decide`], refusing everyone while the cluster has no policy.
pub fn decide(
    policy: Option<&Policy>,
    principal: &Principal,
    level: Level,
    target: &Target,
) -> Decision {
    match policy {
        Some(policy) => policy.decide(principal, level, target),
        None => Decision {
            allowed: false,
            binding: None,
            reason: "the cluster has no access policy yet: start a member with \
                     access.bootstrap-policy-file"
                .into(),
        },
    }
}
