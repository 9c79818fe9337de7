//! Joining and renewing: certificates signed by the members' issuing CA for keys that never
//! leave their holders; and the admin's one-time join tokens.
//!
//! A join is judged in two parts: the handler checks what it can alone (the token's form, the
//! CSR's signature and the identity it asks for, that this member can sign at all), then
//! `UseJoinToken` goes through the log, where `apply()` checks the secret, the token's scope,
//! life and uses, and counts the use, so a token is used once however many members are asked.
//! Only then is the CSR signed.

use rewind_proto::v1 as pb;
use rewind_shared::identity::Kind;
use rewind_shared::pki::{self, Grant, Subject};
use sha2::Digest;
use tonic::Status;

use super::Context;
use super::status::{invalid, to_status};
use super::validate::{PageRequest, one_page, parse_id, required_reason};
use crate::access::Caller;
use crate::errors::CoordinatorError;
use crate::state_machine::join_tokens::{DEFAULT_TOKEN_TTL_MS, MAX_TOKEN_TTL_MS, MAX_TOKEN_USES};
use crate::state_machine::{CommandKind, JoinTokenRecord, Outcome, TokenScope, join_token_id};

/// Bytes of randomness in a token's secret.
const SECRET_BYTES: usize = 32;

/// sha256 of a token's secret, hex: what the log keeps.
fn secret_hash(secret: &str) -> String {
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

/// `jt-3.<64 hex digits>` into the token's number and secret.
fn parse_token(token: &str) -> Result<(u64, &str), Status> {
    let malformed = || {
        invalid(
            "token",
            "must be <token id>.<secret> as `rewindctl join-token create` printed it",
        )
    };
    let (id, secret) = token.split_once('.').ok_or_else(malformed)?;
    let valid_secret = secret.len() == SECRET_BYTES * 2
        && secret
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
    if !valid_secret {
        return Err(malformed());
    }
    let number = parse_id("token", "jt", id).map_err(|_| malformed())?;
    Ok((number, secret))
}

fn read_csr(csr_pem: &str) -> Result<pki::CsrRequest, Status> {
    pki::read_csr(csr_pem).map_err(|error| invalid("csr_pem", error.to_string()))
}

fn issuer(context: &Context) -> Result<&crate::config::IssuerConfig, Status> {
    context.issuer.as_ref().ok_or_else(|| {
        Status::failed_precondition(
            "this member holds no issuing CA, so it cannot sign certificates: give every member \
             one ([issuer] cert and key in its config)",
        )
    })
}

fn issued(
    context: &Context,
    principal: String,
    certificate: pki::Issued,
) -> Result<pb::IssuedCertificate, Status> {
    let ca_pem = std::fs::read_to_string(&context.tls.ca)
        .map_err(|error| Status::internal(format!("read the cluster's CA: {error}")))?;
    Ok(pb::IssuedCertificate {
        certificate_chain_pem: certificate.chain_pem,
        ca_pem,
        identity: principal,
        not_after_s: certificate.not_after_s,
    })
}

fn sign(
    context: &Context,
    request: &pki::CsrRequest,
    subject: Subject,
    sans: Vec<String>,
) -> Result<pki::Issued, Status> {
    let issuer = issuer(context)?;
    let grant = Grant {
        lifetime_s: issuer.lifetimes.of(request.kind),
        subject,
        sans,
    };
    issuer
        .issuing
        .sign(request, &grant, rewind_shared::time::now_s())
        .map_err(|error| Status::internal(format!("sign the certificate: {error}")))
}

/// Joins: the token and CSR checked here first (a wrong secret or a token that cannot admit the
/// CSR is refused without touching the log, and audited at a bounded rate per address), then
/// judged and counted by `apply()`, then signed.
pub async fn join(
    context: &Context,
    remote: Option<std::net::SocketAddr>,
    request: pb::JoinRequest,
) -> Result<pb::IssuedCertificate, Status> {
    let (number, secret) = parse_token(&request.token)?;
    let csr = read_csr(&request.csr_pem)?;
    issuer(context)?;
    let principal = format!("{}:{}", csr.kind, csr.name);
    let kind = CommandKind::UseJoinToken {
        token: number,
        secret_sha256: secret_hash(secret),
        kind: csr.kind.as_str().to_string(),
        name: csr.name.clone(),
        key_sha256: csr.key_sha256(),
    };
    // The judgement apply() makes, asked first: a refusal needs no log entry.
    let precheck = context.node.read(|state| {
        crate::state_machine::join_tokens::judge_use(
            state,
            number,
            &secret_hash(secret),
            csr.kind.as_str(),
            &csr.name,
            &csr.key_sha256(),
            rewind_shared::time::now_ms(),
        )
    });
    if let Err(error) = precheck {
        // Counted per address, not per name asked for: the caller chooses names.
        let refusal = crate::access::Refusal {
            identity: format!(
                "anonymous@{}",
                remote.map_or_else(|| "?".to_string(), |remote| remote.ip().to_string())
            ),
            action: "join",
            target: join_token_id(number),
            reason: format!("as {principal}: {error}"),
        };
        context.gate.audit(refusal);
        return Err(to_status(error));
    }
    let outcome = context.propose(&principal, "", kind).await?;
    let Outcome::Joined { groups } = outcome else {
        return Err(Status::internal(format!("a join answered {outcome:?}")));
    };
    let subject = Subject {
        kind: Some(csr.kind),
        name: csr.name.clone(),
        common_name: csr.name.clone(),
        groups,
    };
    let certificate = sign(context, &csr, subject, Vec::new())?;
    tracing::info!(
        identity = principal,
        token = join_token_id(number),
        not_after_s = certificate.not_after_s,
        "Issued a certificate to a joining holder."
    );
    issued(context, principal, certificate)
}

/// Renews the caller's own certificate: the CSR must name the caller; the groups it had are
/// kept. Audited.
pub async fn renew(
    context: &Context,
    caller: &Caller,
    request: pb::RenewRequest,
) -> Result<pb::IssuedCertificate, Status> {
    let csr = read_csr(&request.csr_pem)?;
    let principal = &caller.principal;
    if csr.kind != principal.kind || csr.name != principal.name {
        return Err(Status::permission_denied(format!(
            "{} may renew only its own certificate, not {}:{}",
            principal.id(),
            csr.kind,
            csr.name
        )));
    }
    issuer(context)?;
    let subject = Subject {
        kind: Some(principal.kind),
        name: principal.name.clone(),
        common_name: principal.name.clone(),
        groups: principal.groups.iter().take(2).cloned().collect(),
    };
    let certificate = sign(context, &csr, subject, Vec::new())?;
    context
        .propose(
            &principal.id(),
            "",
            CommandKind::CertificateRenewed {
                not_after_s: certificate.not_after_s,
            },
        )
        .await?;
    issued(context, principal.id(), certificate)
}

pub fn converted(token: &JoinTokenRecord, now_ms: u64) -> pb::JoinToken {
    pb::JoinToken {
        token_id: token.id(),
        kind: token.kind.clone(),
        name_pattern: token.name_pattern.clone(),
        environment: token.environment.clone(),
        groups: token.groups.clone(),
        created_by: token.created_by.clone(),
        created_at_ms: token.created_at_ms,
        expires_at_ms: token.expires_at_ms,
        uses: token.uses,
        used_by: token.used_by.clone(),
        revoked: token.revoked,
        status: token.status(now_ms).name().into(),
    }
}

/// The scope of a new token from its request, every field checked.
fn scope(request: &pb::CreateJoinTokenRequest) -> Result<TokenScope, Status> {
    let kind = Kind::parse(&request.kind).map_err(|error| invalid("kind", error.to_string()))?;
    let prefix = request
        .name_pattern
        .strip_suffix('*')
        .unwrap_or(&request.name_pattern);
    if request.name_pattern.is_empty() {
        return Err(invalid(
            "name_pattern",
            "name the holders it is for: a name, or a prefix ending in '*' (\"web-*\")",
        ));
    }
    if kind == Kind::Member {
        return Err(invalid(
            "kind",
            "members are not enrolled with join tokens: issue a member's certificate from your \
             PKI (it names the member's id and its address), and add it with `cluster add`",
        ));
    }
    if request.name_pattern.ends_with('*') && kind != Kind::Agent {
        return Err(invalid(
            "name_pattern",
            "a person's or a tool's token names exactly one identity (a pattern would let its \
             holder pick any matching name, an admin's too)",
        ));
    }
    if !prefix.is_empty() {
        rewind_shared::names::validate_name("name_pattern", prefix)
            .map_err(|error| to_status(error.into()))?;
    }
    if !request.environment.is_empty() {
        if kind != Kind::Agent {
            return Err(invalid(
                "environment",
                "only an agent's token names an environment (the one its host must report)",
            ));
        }
        rewind_shared::names::validate_name("environment", &request.environment)
            .map_err(|error| to_status(error.into()))?;
    }
    if !request.groups.is_empty() {
        if !matches!(kind, Kind::User | Kind::Automation) {
            return Err(invalid(
                "groups",
                "only user and automation certificates carry groups",
            ));
        }
        if request.groups.len() > 2 {
            return Err(invalid("groups", "at most two (written as O and OU)"));
        }
        for group in &request.groups {
            rewind_shared::identity::validate_group(group)
                .map_err(|error| invalid("groups", error.to_string()))?;
        }
    }
    let ttl_ms = match request.ttl_s {
        0 => DEFAULT_TOKEN_TTL_MS,
        seconds => seconds.saturating_mul(1000),
    };
    if ttl_ms > MAX_TOKEN_TTL_MS {
        return Err(invalid(
            "ttl_s",
            format!(
                "is {} s, at most {} s",
                request.ttl_s,
                MAX_TOKEN_TTL_MS / 1000
            ),
        ));
    }
    let uses = match request.uses {
        0 => 1,
        uses => uses,
    };
    if uses > MAX_TOKEN_USES {
        return Err(invalid(
            "uses",
            format!("is {uses}, at most {MAX_TOKEN_USES}"),
        ));
    }
    Ok(TokenScope {
        kind: kind.as_str().into(),
        name_pattern: request.name_pattern.clone(),
        environment: request.environment.clone(),
        groups: request.groups.clone(),
        ttl_ms,
        uses,
    })
}

pub async fn create_token(
    context: &Context,
    caller: &Caller,
    request: pb::CreateJoinTokenRequest,
) -> Result<pb::CreateJoinTokenResponse, Status> {
    let scope = scope(&request)?;
    required_reason(
        &request.reason,
        "say what the token is for: it goes into the token and the audit log",
    )?;
    let mut secret = [0u8; SECRET_BYTES];
    rand::fill(&mut secret);
    let secret = hex::encode(secret);
    let reason = request.reason;
    let request_id_shown = request.request_id.clone();
    let kind = CommandKind::CreateJoinToken {
        secret_sha256: secret_hash(&secret),
        scope,
        reason,
    };
    let outcome = context
        .propose(&caller.id(), &request.request_id, kind)
        .await?;
    let Outcome::JoinToken(number) = outcome else {
        return Err(Status::internal(format!(
            "creating a join token answered {outcome:?}"
        )));
    };
    let hash = secret_hash(&secret);
    let details = context
        .node
        .read(|state| {
            state
                .join_tokens
                .get(&number)
                .filter(|token| token.secret_sha256 == hash)
                .map(|token| converted(token, rewind_shared::time::now_ms()))
        })
        .ok_or_else(|| {
            Status::already_exists(format!(
                "request {:?} created {} before, whose secret was in that answer only: create \
                 another token with a new request id",
                request_id_shown,
                join_token_id(number)
            ))
        })?;
    Ok(pb::CreateJoinTokenResponse {
        token: format!("{}.{secret}", join_token_id(number)),
        details: Some(details),
    })
}

/// Join tokens, newest first, a page at a time.
pub async fn list_tokens(
    context: &Context,
    request: pb::ListJoinTokensRequest,
) -> Result<pb::ListJoinTokensResponse, Status> {
    let page = PageRequest::new(request.page_size, &request.page_token);
    let (size, before) = (page.size()?, page.before("jt")?);
    context.current().await?;
    let now = rewind_shared::time::now_ms();
    let (tokens, next_page_token) = context.node.read(|state| {
        let tokens = state.join_tokens.range(..before).rev();
        let tokens = tokens.map(|(_, token)| converted(token, now));
        one_page(size, tokens, |token| token.token_id.clone())
    });
    Ok(pb::ListJoinTokensResponse {
        tokens,
        next_page_token,
    })
}

pub async fn revoke_token(
    context: &Context,
    caller: &Caller,
    request: pb::RevokeJoinTokenRequest,
) -> Result<pb::JoinToken, Status> {
    let number = parse_id("token_id", "jt", &request.token_id)?;
    required_reason(
        &request.reason,
        "say why the token is revoked: it goes into the audit log",
    )?;
    let reason = request.reason;
    context
        .propose(
            &caller.id(),
            &request.request_id,
            CommandKind::RevokeJoinToken {
                token: number,
                reason,
            },
        )
        .await?;
    context
        .node
        .read(|state| {
            state
                .join_tokens
                .get(&number)
                .map(|token| converted(token, rewind_shared::time::now_ms()))
        })
        .ok_or_else(|| {
            to_status(CoordinatorError::UnknownJoinToken {
                token_id: join_token_id(number),
            })
        })
}

/// `JoinService` over [`join`] and [`renew`].
pub struct Joins {
    pub context: Context,
}

#[tonic::async_trait]
impl pb::join_service_server::JoinService for Joins {
    async fn join(
        &self,
        request: tonic::Request<pb::JoinRequest>,
    ) -> Result<tonic::Response<pb::IssuedCertificate>, Status> {
        let remote = request
            .extensions()
            .get::<super::listener::PeerInfo>()
            .and_then(|info| info.remote);
        join(&self.context, remote, request.into_inner())
            .await
            .map(tonic::Response::new)
    }

    async fn renew(
        &self,
        request: tonic::Request<pb::RenewRequest>,
    ) -> Result<tonic::Response<pb::IssuedCertificate>, Status> {
        let caller = super::gate::caller(&request)?;
        renew(&self.context, &caller, request.into_inner())
            .await
            .map(tonic::Response::new)
    }
}
