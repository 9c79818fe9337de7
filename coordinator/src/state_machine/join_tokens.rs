//! One-time join tokens: how a host or person gets its first certificate without the CA's key.
//!
//! An admin creates a token scoped to a kind, a name pattern and (for agents) an environment,
//! good for a short time and a number of uses. Only the sha256 of its secret is replicated; the
//! secret is shown once. A join presents the secret with a CSR; `apply()` decides whether the
//! token allows that identity and counts the use, so every member agrees on what was used. A
//! host that joined for an environment may only register in it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::command::Outcome;
use super::state::State;
use crate::errors::CoordinatorError;

/// Tokens kept: past it, the oldest finished ones (used up, expired, revoked) are dropped, and
/// a create is refused if every kept token is still usable.
pub const MAX_JOIN_TOKENS: usize = 1000;
/// Longest a token may be good for.
pub const MAX_TOKEN_TTL_MS: u64 = 24 * 3600 * 1000;
/// Default life of a token.
pub const DEFAULT_TOKEN_TTL_MS: u64 = 15 * 60 * 1000;
/// Most joins one token allows.
pub const MAX_TOKEN_USES: u32 = 1000;
/// Hosts whose joined-for environment is remembered.
pub const MAX_ENROLLMENTS: usize = 100_000;

/// `jt-<n>`.
pub fn join_token_id(number: u64) -> String {
    format!("jt-{number}")
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    pub number: u64,
    /// sha256 of the secret, hex.
    pub secret_sha256: String,
    /// `agent`, `user`, `automation` or `member`.
    pub kind: String,
    /// Exact name, or a prefix ending in `*`.
    pub name_pattern: String,
    /// Agents: the environment a host that joins must report; empty: any.
    pub environment: String,
    /// Groups the certificates issued carry (users and automation).
    pub groups: Vec<String>,
    pub created_by: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub uses: u32,
    /// Principals that joined with it, in order.
    pub used_by: Vec<String>,
    /// The sha256 of the key each joined with, in the same order: the same key asking again
    /// (its answer was lost) is answered again without another use.
    #[serde(default)]
    pub used_keys: Vec<String>,
    pub revoked: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenStatus {
    Usable,
    Used,
    Expired,
    Revoked,
}

impl TokenStatus {
    pub fn name(self) -> &'static str {
        match self {
            Self::Usable => "usable",
            Self::Used => "used",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
        }
    }
}

impl JoinTokenRecord {
    pub fn id(&self) -> String {
        join_token_id(self.number)
    }

    pub fn status(&self, now_ms: u64) -> TokenStatus {
        if self.revoked {
            TokenStatus::Revoked
        } else if self.used_by.len() >= self.uses as usize {
            TokenStatus::Used
        } else if now_ms >= self.expires_at_ms {
            TokenStatus::Expired
        } else {
            TokenStatus::Usable
        }
    }

    pub fn allows_name(&self, name: &str) -> bool {
        rewind_shared::names::matches_pattern(&self.name_pattern, name)
    }
}

/// A host that joined, and the environment its token named (empty: any).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Enrollment {
    pub environment: String,
    pub token: u64,
    pub at_ms: u64,
}

/// What a new token allows; the handler has validated each field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenScope {
    pub kind: String,
    pub name_pattern: String,
    pub environment: String,
    pub groups: Vec<String>,
    pub ttl_ms: u64,
    pub uses: u32,
}

pub fn create(
    state: &mut State,
    identity: &str,
    secret_sha256: &str,
    scope: &TokenScope,
    reason: &str,
    at_ms: u64,
) -> Result<(Outcome, String, String), CoordinatorError> {
    if scope.ttl_ms == 0 || scope.ttl_ms > MAX_TOKEN_TTL_MS {
        return Err(CoordinatorError::invalid(
            "ttl_s",
            format!("must be 1 to {} seconds", MAX_TOKEN_TTL_MS / 1000),
        ));
    }
    if scope.uses == 0 || scope.uses > MAX_TOKEN_USES {
        return Err(CoordinatorError::invalid(
            "uses",
            format!("must be 1 to {MAX_TOKEN_USES}"),
        ));
    }
    let usable = state
        .join_tokens
        .values()
        .filter(|token| token.status(at_ms) == TokenStatus::Usable)
        .count();
    if usable >= MAX_JOIN_TOKENS {
        return Err(CoordinatorError::invalid(
            "token",
            format!("{MAX_JOIN_TOKENS} join tokens are usable already; revoke some first"),
        ));
    }
    prune(state, at_ms);
    state.next_join_token += 1;
    let number = state.next_join_token;
    let record = JoinTokenRecord {
        number,
        secret_sha256: secret_sha256.to_string(),
        kind: scope.kind.clone(),
        name_pattern: scope.name_pattern.clone(),
        environment: scope.environment.clone(),
        groups: scope.groups.clone(),
        created_by: identity.to_string(),
        created_at_ms: at_ms,
        expires_at_ms: at_ms.saturating_add(scope.ttl_ms),
        uses: scope.uses,
        used_by: Vec::new(),
        used_keys: Vec::new(),
        revoked: false,
    };
    let summary = format!(
        "ok: {} {}{} for {} use(s) until {} ms: {reason}",
        record.kind,
        record.name_pattern,
        if record.environment.is_empty() {
            String::new()
        } else {
            format!(" in {}", record.environment)
        },
        record.uses,
        record.expires_at_ms
    );
    state.join_tokens.insert(number, record);
    Ok((Outcome::JoinToken(number), join_token_id(number), summary))
}

/// Drops the oldest finished tokens once more than [`MAX_JOIN_TOKENS`] are kept.
fn prune(state: &mut State, now_ms: u64) {
    let excess = (state.join_tokens.len() + 1).saturating_sub(MAX_JOIN_TOKENS);
    let finished: Vec<u64> = state
        .join_tokens
        .values()
        .filter(|token| token.status(now_ms) != TokenStatus::Usable)
        .map(|token| token.number)
        .take(excess)
        .collect();
    for number in finished {
        state.join_tokens.remove(&number);
    }
}

/// A join as [`judge_use`] found it.
#[derive(Clone, Debug, PartialEq)]
pub struct Admission {
    /// The same key asked before: answer again, count nothing.
    pub repeat: bool,
    /// Groups the certificate carries.
    pub groups: Vec<String>,
    /// The environment an agent joining with it is enrolled for, if the token names one.
    pub environment: String,
}

/// Whether token `number` admits `kind:name` with the key hashing to `key_sha256` at `at_ms`;
/// changes nothing (the API asks before proposing, `apply()` asks again). A name an agent
/// already holds (registered or enrolled) is taken only by a token for exactly that name, so a
/// token for `web-*` cannot take over `web-1`.
pub fn judge_use(
    state: &State,
    number: u64,
    secret_sha256: &str,
    kind: &str,
    name: &str,
    key_sha256: &str,
    at_ms: u64,
) -> Result<Admission, CoordinatorError> {
    let refused = |why: String| CoordinatorError::JoinRefused {
        token_id: join_token_id(number),
        why,
    };
    if kind == "member" {
        return Err(refused(
            "members are not enrolled with join tokens: issue their certificates from your PKI"
                .into(),
        ));
    }
    let principal = format!("{kind}:{name}");
    // An unknown token and a wrong secret answer alike, so tokens cannot be probed.
    let token = state
        .join_tokens
        .get(&number)
        .filter(|token| token.secret_sha256 == secret_sha256)
        .ok_or_else(|| refused("no such token, or the secret does not match".into()))?;
    let admission = Admission {
        repeat: false,
        groups: token.groups.clone(),
        environment: if kind == "agent" {
            token.environment.clone()
        } else {
            String::new()
        },
    };
    // A repeat is the same name with the same key, while the token lives (uses recorded before
    // keys were, with no key beside them, never match).
    let repeat = !key_sha256.is_empty()
        && token.used_keys.len() == token.used_by.len()
        && token
            .used_by
            .iter()
            .zip(&token.used_keys)
            .any(|(used_by, key)| used_by == &principal && key == key_sha256);
    if repeat && !token.revoked && at_ms < token.expires_at_ms {
        return Ok(Admission {
            repeat: true,
            ..admission
        });
    }
    match token.status(at_ms) {
        TokenStatus::Usable => {}
        status => return Err(refused(format!("the token is {}", status.name()))),
    }
    if token.kind != kind {
        return Err(refused(format!(
            "the token is for {} certificates, not {kind}",
            token.kind
        )));
    }
    if !token.allows_name(name) {
        return Err(refused(format!(
            "the token allows names {:?}, not {name:?}",
            token.name_pattern
        )));
    }
    let held =
        kind == "agent" && (state.hosts.contains_key(name) || state.enrollments.contains_key(name));
    if held && token.name_pattern != name {
        return Err(refused(format!(
            "agent {name} exists already: only a token for exactly {name:?} re-enrols it"
        )));
    }
    if kind == "agent"
        && state.enrollments.len() >= MAX_ENROLLMENTS
        && !state.enrollments.contains_key(name)
    {
        return Err(refused(format!(
            "{MAX_ENROLLMENTS} hosts are enrolled already"
        )));
    }
    Ok(admission)
}

/// Counts one use of token `number` by `kind:name`, if [`judge_use`] admits it; answers the
/// groups the certificate is to carry.
pub fn use_token(
    state: &mut State,
    number: u64,
    secret_sha256: &str,
    kind: &str,
    name: &str,
    key_sha256: &str,
    at_ms: u64,
) -> Result<(Outcome, String, String), CoordinatorError> {
    let admission = judge_use(state, number, secret_sha256, kind, name, key_sha256, at_ms)?;
    let principal = format!("{kind}:{name}");
    let Admission {
        repeat,
        groups,
        environment,
    } = admission;
    if repeat {
        return Ok((
            Outcome::Joined { groups },
            join_token_id(number),
            format!("ok: {principal} asked again with the same key (not another use)"),
        ));
    }
    if let Some(token) = state.join_tokens.get_mut(&number) {
        token.used_by.push(principal.clone());
        token.used_keys.push(key_sha256.to_string());
    }
    if kind == "agent" {
        // A token without an environment keeps the one the host was pinned to.
        let environment = match state.enrollments.get(name) {
            Some(pinned) if environment.is_empty() => pinned.environment.clone(),
            _ => environment.clone(),
        };
        state.enrollments.insert(
            name.to_string(),
            Enrollment {
                environment,
                token: number,
                at_ms,
            },
        );
    }
    Ok((
        Outcome::Joined { groups },
        join_token_id(number),
        format!(
            "ok: {principal} joined{}",
            if environment.is_empty() {
                String::new()
            } else {
                format!(" for {environment}")
            }
        ),
    ))
}

pub fn revoke(
    state: &mut State,
    number: u64,
    reason: &str,
) -> Result<(Outcome, String, String), CoordinatorError> {
    let token =
        state
            .join_tokens
            .get_mut(&number)
            .ok_or_else(|| CoordinatorError::UnknownJoinToken {
                token_id: join_token_id(number),
            })?;
    token.revoked = true;
    Ok((
        Outcome::JoinToken(number),
        join_token_id(number),
        format!("ok: revoked: {reason}"),
    ))
}

/// Refuses a host that joined for one environment registering in another.
pub fn check_enrollment(
    enrollments: &BTreeMap<String, Enrollment>,
    host_id: &str,
    environment: &str,
) -> Result<(), CoordinatorError> {
    match enrollments.get(host_id) {
        Some(enrollment)
            if !enrollment.environment.is_empty() && enrollment.environment != environment =>
        {
            Err(CoordinatorError::invalid(
                "labels.environment",
                format!(
                    "host {host_id} joined for environment {:?} (token {}), and reports {environment:?}",
                    enrollment.environment,
                    join_token_id(enrollment.token)
                ),
            ))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(kind: &str, pattern: &str, environment: &str) -> TokenScope {
        TokenScope {
            kind: kind.into(),
            name_pattern: pattern.into(),
            environment: environment.into(),
            groups: Vec::new(),
            ttl_ms: 60_000,
            uses: 1,
        }
    }

    #[test]
    fn a_token_admits_its_kind_and_names_once_before_it_expires() {
        let mut state = State::default();
        create(
            &mut state,
            "user:ada",
            "h",
            &scope("agent", "web-*", "prod"),
            "r",
            1_000,
        )
        .unwrap();
        let before = state.clone();
        for (secret, kind, name, at, why) in [
            ("x", "agent", "web-1", 2_000, "secret does not match"),
            ("h", "user", "web-1", 2_000, "not user"),
            ("h", "agent", "db-1", 2_000, "not \"db-1\""),
            ("h", "agent", "web-1", 61_000, "expired"),
        ] {
            let error = use_token(&mut state, 1, secret, kind, name, "k1", at).unwrap_err();
            assert!(error.to_string().contains(why), "{error}");
            assert_eq!(state, before, "a refused join changes nothing");
        }
        use_token(&mut state, 1, "h", "agent", "web-1", "k1", 2_000).unwrap();
        // The same key asking again (its answer lost) is answered without another use.
        use_token(&mut state, 1, "h", "agent", "web-1", "k1", 2_500).unwrap();
        assert_eq!(state.join_tokens[&1].used_by, ["agent:web-1"]);
        assert_eq!(state.enrollments["web-1"].environment, "prod");
        let error = use_token(&mut state, 1, "h", "agent", "web-2", "k2", 2_000).unwrap_err();
        assert!(error.to_string().contains("the token is used"), "{error}");
        assert!(check_enrollment(&state.enrollments, "web-1", "prod").is_ok());
        assert!(check_enrollment(&state.enrollments, "web-9", "staging").is_ok());
        let error = check_enrollment(&state.enrollments, "web-1", "staging").unwrap_err();
        assert!(error.to_string().contains("jt-1"), "{error}");

        // After the token's life the same key is not answered again.
        let error = use_token(&mut state, 1, "h", "agent", "web-1", "k1", 61_000).unwrap_err();
        assert!(error.to_string().contains("the token is used"), "{error}");
        // Re-enrolled with a token for exactly web-1 naming no environment: still pinned.
        create(
            &mut state,
            "user:ada",
            "h2",
            &scope("agent", "web-1", ""),
            "r",
            70_000,
        )
        .unwrap();
        use_token(&mut state, 2, "h2", "agent", "web-1", "k3", 70_001).unwrap();
        assert_eq!(state.enrollments["web-1"].environment, "prod");
        // Member tokens (made before they were refused at creation) admit nobody.
        create(
            &mut state,
            "user:ada",
            "h3",
            &scope("member", "4", ""),
            "r",
            70_000,
        )
        .unwrap();
        let error = use_token(&mut state, 3, "h3", "member", "4", "k4", 70_001).unwrap_err();
        assert!(
            error.to_string().contains("members are not enrolled"),
            "{error}"
        );
    }

    #[test]
    fn finished_tokens_make_room_and_usable_ones_are_never_dropped() {
        let mut state = State::default();
        for _ in 0..MAX_JOIN_TOKENS {
            create(&mut state, "user:ada", "h", &scope("user", "a", ""), "r", 0).unwrap();
        }
        let error = create(&mut state, "user:ada", "h", &scope("user", "a", ""), "r", 0);
        assert!(error.is_err(), "every kept token is usable");
        revoke(&mut state, 7, "r").unwrap();
        create(&mut state, "user:ada", "h", &scope("user", "a", ""), "r", 0).unwrap();
        assert!(!state.join_tokens.contains_key(&7));
        assert_eq!(state.join_tokens.len(), MAX_JOIN_TOKENS);
    }
}
