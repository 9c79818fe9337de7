//! What every rewind binary shares, and nothing that serves: identifiers and their validation,
//! TLS identities (loading, the dev CA, reading a peer's name), tracing set-up, config helpers
//! and content digests. Depends on no server crate, so `rewindctl` stays small.
//!
//! # Layout
//! - [`audit`]: the audit chain's entries, hashes, verification, redaction and export manifest.
//! - [`backoff`]: the one retry policy (capped exponential backoff, with jitter).
//! - [`errors`]: the crate's error type.
//! - [`names`]: validation of ids, names and versions, with the field named in every error.
//! - [`tls`]: PEM files to tonic TLS configs; the caller's identity from its certificate.
//! - [`identity`]: who a caller is: its kind, name and groups, read from its certificate.
//! - [`member_tls`]: dialling coordinator members over TLS that accepts only a member's certificate.
//! - [`pki`]: certificates the cluster issues itself: CSRs, the members' issuing CA, lifetimes.
//! - [`enroll`]: getting a certificate from the cluster with a join token, and renewing it.
//! - [`dev_ca`]: a throw-away CA and certificates for `--dev` and tests (rcgen).
//! - [`digest`]: sha256 of bytes and of a directory tree (release artifacts).
//! - [`histogram`]: cumulative histograms: merging different bucket layouts, quantiles.
//! - `http_check` (feature `http-check`): one HTTP check, for the agent's checks and the
//!   coordinator's synthetics.
//! - `outbound` (feature `http-check`): HTTPS clients for every endpoint rewind calls: the
//!   system's and a configured CA bundle, client certificates, no redirects.
//! - [`config`]: TOML loading that warns about unknown keys, and an error collector.
//! - [`logging`]: `REWIND_LOG` / `REWIND_LOG_FORMAT` tracing set-up, and the slog bridge raft-rs logs through.
//! - [`signals`]: shutdown on SIGINT / SIGTERM.
//! - [`time`]: wall-clock milliseconds, for stamping commands outside the state machine.
//! - [`sql`]: splitting PostgreSQL scripts into statements; finding transaction control.
//! - [`failpoint`]: `REWIND_FAILPOINTS` crash points for recovery tests.

pub mod audit;
pub mod backoff;
pub mod bounds;
pub mod config;
pub mod dev_ca;
pub mod digest;
pub mod enroll;
pub mod errors;
pub mod failpoint;
pub mod freeze;
pub mod histogram;
#[cfg(feature = "http-check")]
pub mod http_check;
pub mod identity;
pub mod logging;
pub mod member_tls;
pub mod names;
#[cfg(feature = "http-check")]
pub mod outbound;
pub mod pagerduty;
pub mod pki;
pub mod signals;
pub mod sql;
pub mod time;
pub mod tls;
pub mod trace;

pub use errors::SharedError;

/// gRPC metadata key in which a member that is not the leader names the leader's address.
pub const LEADER_METADATA_KEY: &str = "rewind-leader";
