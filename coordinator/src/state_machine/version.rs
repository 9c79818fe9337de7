//! Cluster versions and how log entries are encoded: what lets members of two releases share a
//! log during a rolling upgrade without their states drifting apart.
//!
//! How `apply()` treats a command may change only behind a cluster version: the cluster runs at
//! the version every member supports until an admin raises it (`rewindctl cluster
//! upgrade-finalize`, refused while any member runs an older binary), and `apply()` asks
//! [`State::cluster_version`] before doing anything a member of an older release would not.
//! Entries written at a version carry it, so a member that meets one it cannot read stops with
//! an error that names both versions instead of guessing. The golden logs in
//! `coordinator/tests/golden/` pin how every released version replays.

use serde::{Deserialize, Serialize};

use super::command::Command;
use super::state::State;
use crate::errors::CoordinatorError;

/// The version of clusters that ran before versions existed (releases up to issue 17): entries
/// are bare JSON commands, and a member skips one it cannot decode.
pub const LEGACY: u32 = 1;

/// The highest cluster version this binary can apply.
pub const CURRENT: u32 = 2;

/// What each version brought, for `rewindctl cluster version` and the README.
pub const CHANGES: &[(u32, &str)] = &[
    (1, "the log as released before cluster versions"),
    (
        2,
        "versioned log entries (a member stops on one it cannot read); host.forget; [[hosts]] \
         rules in the access policy; a request log that forgets the busiest identity's ids first",
    ),
];

/// A log entry's bytes from version 2 on: the command inside an envelope naming the encoding.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    /// The cluster version the entry was written at.
    v: u32,
    #[serde(borrow)]
    command: &'a serde_json::value::RawValue,
}

/// Encodes `command` as a log entry for a cluster at `cluster_version`: bare JSON at the legacy
/// version (members of the older release read only that), an envelope after.
pub fn encode_entry(command: &Command, cluster_version: u32) -> Result<Vec<u8>, CoordinatorError> {
    let encode_error = |error: serde_json::Error| {
        CoordinatorError::Storage(format!("encode the command: {error}"))
    };
    let command = serde_json::to_vec(command).map_err(encode_error)?;
    if cluster_version <= LEGACY {
        return Ok(command);
    }
    let command =
        serde_json::from_slice::<&serde_json::value::RawValue>(&command).map_err(encode_error)?;
    serde_json::to_vec(&Envelope {
        v: cluster_version,
        command,
    })
    .map_err(encode_error)
}

/// What a member makes of a committed entry's bytes.
#[derive(Debug)]
pub enum Decoded {
    Command(Box<Command>),
    /// A legacy entry that does not decode: every member of the legacy release skipped it, so
    /// this one does too (replaying old logs the same way).
    SkipLegacy(String),
}

/// Decodes a committed entry. An entry written at a version above [`CURRENT`], or a versioned
/// entry whose command this binary does not know, is an error: the member must stop.
pub fn decode_entry(index: u64, data: &[u8]) -> Result<Decoded, CoordinatorError> {
    if let Ok(envelope) = serde_json::from_slice::<Envelope>(data) {
        if envelope.v > CURRENT {
            return Err(CoordinatorError::CannotApply {
                index,
                why: format!(
                    "it was written at cluster version {}, and this binary applies versions up to \
                     {CURRENT}: run a release that supports version {} on this member",
                    envelope.v, envelope.v
                ),
            });
        }
        return serde_json::from_str::<Command>(envelope.command.get())
            .map(|command| Decoded::Command(Box::new(command)))
            .map_err(|error| CoordinatorError::CannotApply {
                index,
                why: format!(
                    "its command (cluster version {}) does not decode here: {error}",
                    envelope.v
                ),
            });
    }
    Ok(match serde_json::from_slice::<Command>(data) {
        Ok(command) => Decoded::Command(Box::new(command)),
        Err(error) => Decoded::SkipLegacy(error.to_string()),
    })
}

/// Refuses a command that raises the cluster above what this binary applies: the member must
/// stop before it, not carry on at a version it does not know.
pub fn check_command(command: &Command, index: u64) -> Result<(), CoordinatorError> {
    match command.kind {
        super::CommandKind::SetClusterVersion { version, .. } if version > CURRENT => {
            Err(CoordinatorError::CannotApply {
                index,
                why: format!(
                    "it raises the cluster to version {version}, and this binary applies \
                     versions up to {CURRENT}: run a release that supports it on this member"
                ),
            })
        }
        _ => Ok(()),
    }
}

/// Refuses a state (a snapshot at `index`) whose cluster version is above [`CURRENT`].
pub fn check_state(state: &State, index: u64) -> Result<(), CoordinatorError> {
    if state.cluster_version() <= CURRENT {
        return Ok(());
    }
    Err(CoordinatorError::CannotApply {
        index,
        why: format!(
            "the snapshot is at cluster version {}, and this binary applies versions up to \
             {CURRENT}: run a release that supports it on this member",
            state.cluster_version()
        ),
    })
}

/// Refuses `what` while the cluster runs below `needed`, naming how to raise it.
pub fn require(state: &State, needed: u32, what: &str) -> Result<(), CoordinatorError> {
    let running = state.cluster_version();
    if running >= needed {
        return Ok(());
    }
    Err(CoordinatorError::NeedsClusterVersion {
        what: what.to_string(),
        needed,
        running,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::CommandKind;

    fn command() -> Command {
        Command {
            at_ms: 7,
            identity: "user:ada".into(),
            request_id: "r-1".into(),
            kind: CommandKind::ResetBreaker {
                reason: "test".into(),
            },
        }
    }

    #[test]
    fn legacy_entries_stay_bare_json_and_versioned_ones_carry_their_version() {
        let legacy = encode_entry(&command(), LEGACY).unwrap();
        assert_eq!(legacy, serde_json::to_vec(&command()).unwrap());
        let versioned = encode_entry(&command(), CURRENT).unwrap();
        let text = String::from_utf8(versioned.clone()).unwrap();
        assert!(text.starts_with(&format!("{{\"v\":{CURRENT},")), "{text}");
        for bytes in [legacy, versioned] {
            let Decoded::Command(decoded) = decode_entry(1, &bytes).unwrap() else {
                panic!("decodes")
            };
            assert_eq!(*decoded, command());
        }
    }

    #[test]
    fn an_entry_from_a_newer_version_or_an_unknown_command_stops_the_member() {
        let newer = format!(
            "{{\"v\":{},\"command\":{}}}",
            CURRENT + 1,
            serde_json::to_string(&command()).unwrap()
        );
        let error = decode_entry(9, newer.as_bytes()).unwrap_err().to_string();
        assert!(
            error.contains("entry 9")
                && error.contains(&format!("applies versions up to {CURRENT}")),
            "{error}"
        );
        let unknown = format!(
            "{{\"v\":{CURRENT},\"command\":{{\"at_ms\":1,\"identity\":\"x\",\"request_id\":\"\",\"kind\":{{\"FutureThing\":{{}}}}}}}}"
        );
        let error = decode_entry(10, unknown.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(error.contains("does not decode here"), "{error}");
        // A bare entry that does not decode is skipped, as the legacy release did.
        assert!(matches!(
            decode_entry(11, b"{\"kind\":{\"FutureThing\":{}}}").unwrap(),
            Decoded::SkipLegacy(_)
        ));
    }
}
