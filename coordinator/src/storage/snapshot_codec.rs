//! How a snapshot of the replicated state is encoded: on disk and on the wire to a member that
//! needs one.
//!
//! Version 1: the magic `RWSNAP`, a version byte, then one zstd frame of the state in
//! MessagePack with named fields (self-describing, so fields added with `#[serde(default)]` still
//! decode, as with JSON). Snapshots written before it were the state's JSON; those still decode,
//! so a member restarts on the snapshot an older binary left.
//!
//! Version 2 is the same encoding of a state at cluster version 2 or later: a binary of the
//! release before cluster versions refuses it by name (it reads version 1 only) rather than load
//! a state whose log it would then skip. Before decoding a state, its cluster version is read
//! on its own, so a state from a newer release stops this member (`CannotApply`) rather than
//! fail as a disk error.
//!
//! Version 3 is a snapshot **bundle**, sent to a member that is behind once the audit entries
//! live in their own store (cluster version 7): the magic, 3, the length of the state's data
//! (8 bytes, big-endian), the state's data (version 2), then one zstd frame of the audit entries
//! in MessagePack. Only the wire carries bundles: the receiver writes the entries to its store
//! and keeps the state's data alone as its snapshot, so snapshots on disk stay the size of the
//! state.
//!
//! Version 4 is a bundle that carries the archive too (cluster version 8, once anything was
//! archived): as version 3, but its zstd frame holds the audit entries and the archived changes
//! and rollbacks. A member sends version 3 while its archive is empty, so a member of the
//! previous release still reads what it gets until the cluster runs version 8.
//!
//! Measured by `cargo bench -p rewind-coordinator --bench snapshot` (numbers in the README):
//! on a state of 60,000 commands it is 5x smaller than the JSON, at about the same encode and
//! decode time.

use std::io::Read as _;

use crate::errors::CoordinatorError;
use crate::state_machine::archive::{ArchiveKind, ArchivedRecord};
use crate::state_machine::{AuditEntry, State, version};

/// A state's cluster version alone (every other field ignored).
#[derive(serde::Deserialize)]
struct VersionProbe {
    #[serde(default)]
    cluster_version: u32,
}

const MAGIC: &[u8; 6] = b"RWSNAP";
/// Written for states at cluster version 1 (what the release before versions reads).
const VERSION_LEGACY: u8 = 1;
/// Written for states at cluster version 2 or later.
const VERSION: u8 = 2;
/// A state's data followed by the audit entries (to a member that is behind).
const VERSION_BUNDLE: u8 = 3;
/// A state's data followed by the audit entries and the archive.
const VERSION_BUNDLE_ARCHIVE: u8 = 4;
/// Most bytes a bundle's audit entries may decode to.
pub const MAX_DECODED_AUDIT_BYTES: u64 = 4 << 30;
/// zstd's fastest level: on the benchmark's state it was also smaller than level 3 (the
/// state's digests and hashes do not compress, the rest compresses well at any level).
const ZSTD_LEVEL: i32 = 1;
/// Most bytes a snapshot may decode to (a state this large needs several times as much memory
/// on every member): more is refused rather than allowed to exhaust memory, since a zstd frame
/// of a few KiB can decompress to gigabytes.
pub const MAX_DECODED_STATE_BYTES: u64 = 4 << 30;

/// The state as snapshot data, in the current encoding.
pub fn encode(state: &State) -> Result<Vec<u8>, CoordinatorError> {
    let mut data = Vec::with_capacity(1 << 20);
    data.extend_from_slice(MAGIC);
    data.push(if state.cluster_version() > version::LEGACY {
        VERSION
    } else {
        VERSION_LEGACY
    });
    append_frame(data, state, "the state")
}

/// `data` followed by one zstd frame of `value` in MessagePack with named fields.
fn append_frame(
    data: Vec<u8>,
    value: &impl serde::Serialize,
    what: &str,
) -> Result<Vec<u8>, CoordinatorError> {
    let encoder = zstd::Encoder::new(data, ZSTD_LEVEL)
        .map_err(|error| encoding_error(&format!("start compressing {what}"), error))?;
    // MessagePack writes many small pieces; zstd is much faster fed in large ones.
    let mut buffered = std::io::BufWriter::with_capacity(1 << 20, encoder);
    rmp_serde::encode::write_named(&mut buffered, value)
        .map_err(|error| encoding_error(&format!("encode {what}"), error))?;
    buffered
        .into_inner()
        .map_err(|error| encoding_error(&format!("compress {what}"), error.error()))?
        .finish()
        .map_err(|error| encoding_error(&format!("compress {what}"), error))
}

/// What a bundle carries beside the state: the audit entries, and (version 4) the archive.
#[derive(Debug, Default, PartialEq, serde::Deserialize)]
pub struct Bundled {
    pub entries: Vec<AuditEntry>,
    pub archive: Vec<ArchivedRecord>,
}

/// How version 4 writes [`Bundled`], without copying the records.
#[derive(serde::Serialize)]
struct BundledRef<'a> {
    entries: &'a [AuditEntry],
    archive: &'a [ArchivedRecord],
}

/// A bundle of a state's snapshot data (`state_data`, as [`encode`] wrote it), the audit
/// entries it continues from and the archive: version 3 while the archive is empty.
pub fn encode_bundle(
    state_data: &[u8],
    entries: &[AuditEntry],
    archive: &[ArchivedRecord],
) -> Result<Vec<u8>, CoordinatorError> {
    let mut data = Vec::with_capacity(state_data.len() + 64 + entries.len() * 256);
    data.extend_from_slice(MAGIC);
    data.push(if archive.is_empty() {
        VERSION_BUNDLE
    } else {
        VERSION_BUNDLE_ARCHIVE
    });
    data.extend_from_slice(&(state_data.len() as u64).to_be_bytes());
    data.extend_from_slice(state_data);
    if archive.is_empty() {
        append_frame(data, &entries, "the audit entries")
    } else {
        append_frame(
            data,
            &BundledRef { entries, archive },
            "the audit entries and archive",
        )
    }
}

/// A bundle's version, state data and compressed frame, undecoded.
type BundleParts<'a> = (u8, &'a [u8], &'a [u8]);

/// A bundle's parts; None if `data` is no bundle.
fn bundle_parts(data: &[u8]) -> Result<Option<BundleParts<'_>>, CoordinatorError> {
    let Some((&version, rest)) = data
        .strip_prefix(MAGIC)
        .and_then(|rest| rest.split_first())
        .filter(|(version, _)| [VERSION_BUNDLE, VERSION_BUNDLE_ARCHIVE].contains(version))
    else {
        return Ok(None);
    };
    let Some((length, rest)) = rest.split_first_chunk::<8>() else {
        return Err(decoding_error("the bundle ends before its state's length"));
    };
    let length = usize::try_from(u64::from_be_bytes(*length)).unwrap_or(usize::MAX);
    if length > rest.len() {
        return Err(decoding_error(format!(
            "the bundle's state is {length} bytes, but only {} follow",
            rest.len()
        )));
    }
    let (state_data, frame) = rest.split_at(length);
    Ok(Some((version, state_data, frame)))
}

/// Snapshot data split into the state's data and, for a bundle, what it carries beside it.
pub fn split_bundle(data: &[u8]) -> Result<(&[u8], Option<Bundled>), CoordinatorError> {
    let Some((version, state_data, frame)) = bundle_parts(data)? else {
        return Ok((data, None));
    };
    if bundle_parts(state_data)?.is_some() {
        return Err(decoding_error("a bundle holds another bundle, not a state"));
    }
    let what = if version == VERSION_BUNDLE {
        "the audit entries"
    } else {
        "the audit entries and archive"
    };
    let plain = decompress(frame, MAX_DECODED_AUDIT_BYTES, what)?;
    let decoded = if version == VERSION_BUNDLE {
        rmp_serde::from_slice(&plain).map(|entries| Bundled {
            entries,
            archive: Vec::new(),
        })
    } else {
        rmp_serde::from_slice(&plain)
    };
    let bundled = decoded.map_err(|error| decoding_error(format!("decode {what}: {error}")))?;
    Ok((state_data, Some(bundled)))
}

/// Checks snapshot data received from a member, whole: its state decodes, a bundle's entries
/// and archive decode too, a state whose audit entries are in their store (cluster version 7)
/// comes with them, and one that archived records (version 8) with at least those, since
/// installing it replaces this member's.
pub fn check_received(data: &[u8]) -> Result<(), CoordinatorError> {
    let (state_data, bundled) = split_bundle(data)?;
    let state = decode(state_data)?;
    let audit = &state.audit;
    let Some(bundled) = bundled else {
        if audit.is_stored() && !audit.is_empty() {
            return Err(decoding_error(
                "its state keeps the audit entries in their store, but they did not come with it",
            ));
        }
        if !state.archived.is_empty() {
            return Err(decoding_error(
                "its state archived changes and rollbacks, but the archive did not come with it",
            ));
        }
        return Ok(());
    };
    for kind in [ArchiveKind::Change, ArchiveKind::Rollback] {
        let carried = bundled
            .archive
            .iter()
            .filter(|record| record.kind() == kind)
            .count() as u64;
        if carried < state.archived.of(kind) {
            return Err(decoding_error(format!(
                "its state archived {} {kind:?} records, but only {carried} came with it",
                state.archived.of(kind)
            )));
        }
    }
    if audit.is_stored() {
        // Sent while the sender dropped entries a newer snapshot pruned: refused, and sent
        // again from that newer snapshot, rather than installed with a hole.
        let expected = audit.first_index()..audit.next_index();
        let held = bundled
            .entries
            .iter()
            .map(|entry| entry.index)
            .filter(|index| expected.contains(index));
        if held.ne(expected.clone()) {
            return Err(decoding_error(format!(
                "its audit entries do not run whole from {} to {}",
                expected.start,
                expected.end.saturating_sub(1)
            )));
        }
    }
    Ok(())
}

/// Decodes snapshot data in any encoding this binary knows (the current one, and the JSON of
/// earlier versions), naming what is wrong with data it cannot read. A bundle's state only
/// (a bundle inside a bundle is refused as an unknown version).
pub fn decode(data: &[u8]) -> Result<State, CoordinatorError> {
    if let Some((_, state_data, _)) = bundle_parts(data)? {
        return decode_state(state_data);
    }
    decode_state(data)
}

fn decode_state(data: &[u8]) -> Result<State, CoordinatorError> {
    if let Some(rest) = data.strip_prefix(MAGIC) {
        let Some((&version, frame)) = rest.split_first() else {
            return Err(decoding_error("it ends after its magic"));
        };
        if version != VERSION && version != VERSION_LEGACY {
            return Err(decoding_error(format!(
                "it is encoded as version {version}; this binary reads versions \
                 {VERSION_LEGACY} and {VERSION} (upgrade it to the version that wrote the snapshot)"
            )));
        }
        let plain = decompress(frame, MAX_DECODED_STATE_BYTES, "the state")?;
        return checked(rmp_serde::from_slice(&plain), || {
            rmp_serde::from_slice::<VersionProbe>(&plain).ok()
        });
    }
    if data.first() == Some(&b'{') {
        return checked(serde_json::from_slice(data), || {
            serde_json::from_slice::<VersionProbe>(data).ok()
        });
    }
    Err(decoding_error(
        "it starts with neither the snapshot magic nor JSON",
    ))
}

/// One zstd frame decompressed, refused past `max` bytes (a frame of a few KiB can expand to
/// gigabytes).
fn decompress(frame: &[u8], max: u64, what: &str) -> Result<Vec<u8>, CoordinatorError> {
    let mut plain = Vec::new();
    zstd::Decoder::new(frame)
        .map_err(|error| decoding_error(format!("start decompressing {what}: {error}")))?
        .take(max + 1)
        .read_to_end(&mut plain)
        .map_err(|error| decoding_error(format!("decompress {what}: {error}")))?;
    if plain.len() as u64 > max {
        return Err(decoding_error(format!(
            "{what} decompresses to more than {max} bytes"
        )));
    }
    Ok(plain)
}

/// A decoded state, if its cluster version is one this binary applies; a state that does not
/// decode is probed for its version alone, so one from a newer release is named as such.
fn checked<E: std::fmt::Display>(
    decoded: Result<State, E>,
    probe: impl FnOnce() -> Option<VersionProbe>,
) -> Result<State, CoordinatorError> {
    match decoded {
        Ok(state) => {
            version::check_snapshot_version(state.cluster_version())?;
            Ok(state)
        }
        Err(error) => {
            if let Some(probe) = probe() {
                version::check_snapshot_version(probe.cluster_version)?;
            }
            Err(decoding_error(format!("decode the state: {error}")))
        }
    }
}

fn encoding_error(action: &str, error: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Storage(format!("{action}: {error}"))
}

fn decoding_error(message: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Storage(format!("snapshot data does not decode: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::MemberRecord;

    fn sample_state() -> State {
        let mut state = State {
            applied_index: 42,
            ..State::default()
        };
        state.members.insert(
            1,
            MemberRecord {
                id: 1,
                address: "10.0.0.1:7443".into(),
                region: "eu".into(),
                name: "coordinator-1".into(),
            },
        );
        state
    }

    #[test]
    fn the_state_round_trips_and_the_data_says_its_encoding() {
        let state = sample_state();
        let data = encode(&state).unwrap();
        assert!(data.starts_with(b"RWSNAP\x01"));
        assert_eq!(decode(&data).unwrap(), state);
    }

    #[test]
    fn a_bundle_carries_the_state_and_its_audit_entries() {
        let state = sample_state();
        let state_data = encode(&state).unwrap();
        let record = rewind_shared::audit::Record {
            at_ms: 5,
            identity: "user:ada",
            action: "flag.set",
            target: "web",
            outcome: "ok",
            reason: "INC-1",
        };
        let entries: Vec<_> = (1..=3)
            .map(|index| rewind_shared::audit::AuditEntry::salted(index, "00", &record, &[1; 32]))
            .collect();
        let bundle = encode_bundle(&state_data, &entries, &[]).unwrap();
        assert!(bundle.starts_with(b"RWSNAP\x03"));
        assert_eq!(decode(&bundle).unwrap(), state);
        let (inner, carried) = split_bundle(&bundle).unwrap();
        assert_eq!(inner, &state_data[..]);
        assert_eq!(carried.unwrap().entries, entries);
        // Not a bundle: the data whole, no entries.
        let (whole, none) = split_bundle(&state_data).unwrap();
        assert_eq!((whole.len(), none), (state_data.len(), None));
        // Cut short, or lying about its state's length: refused by name.
        let error = split_bundle(&bundle[..bundle.len() - 3])
            .unwrap_err()
            .to_string();
        assert!(error.contains("audit"), "{error}");
        let mut lying = bundle.clone();
        lying[7..15].copy_from_slice(&u64::MAX.to_be_bytes());
        let error = split_bundle(&lying).unwrap_err().to_string();
        assert!(error.contains("only"), "{error}");
        // A bundle inside a bundle is no state.
        let nested = encode_bundle(&bundle, &entries, &[]).unwrap();
        let error = decode(&nested).unwrap_err().to_string();
        assert!(error.contains("version 3"), "{error}");
        // A stored state that arrives without its entries is refused; with them it is not.
        let mut stored = sample_state();
        stored.audit.move_to_store();
        stored.audit.append(&record, Some(&[1; 32]));
        let alone = encode(&stored).unwrap();
        let error = check_received(&alone).unwrap_err().to_string();
        assert!(error.contains("did not come with it"), "{error}");
        let entries = stored.audit.entries();
        let entries: Vec<_> = entries.iter().map(|entry| (**entry).clone()).collect();
        check_received(&encode_bundle(&alone, &entries, &[]).unwrap()).unwrap();
        // With a hole where a newer snapshot's pruning took entries away: refused.
        let mut more = stored.clone();
        more.audit.append(&record, Some(&[2; 32]));
        more.audit.append(&record, Some(&[3; 32]));
        let all = more.audit.entries();
        let holed: Vec<_> = [&all[0], &all[2]]
            .iter()
            .map(|entry| (***entry).clone())
            .collect();
        let error = check_received(&encode_bundle(&encode(&more).unwrap(), &holed, &[]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(error.contains("do not run whole from 1 to 3"), "{error}");
        // A bundle inside a bundle, whichever way it is read.
        let error = check_received(&nested).unwrap_err().to_string();
        assert!(error.contains("another bundle"), "{error}");
    }

    #[test]
    fn a_bundle_carries_the_archive_its_state_counts() {
        use crate::state_machine::archive::{ArchiveCounts, ArchivedChange};
        let mut state = sample_state();
        state.audit.move_to_store();
        state.archived = ArchiveCounts {
            changes: 1,
            rollbacks: 0,
        };
        let mut fleet = crate::test_fleet::Fleet::with_web();
        let number = fleet.deploy_web("v1");
        let change = fleet.state.changes[&number].clone();
        let archive = [ArchivedRecord::Change(Box::new(ArchivedChange {
            archived_at_ms: 9,
            change,
        }))];
        let state_data = encode(&state).unwrap();
        let bundle = encode_bundle(&state_data, &[], &archive).unwrap();
        assert!(bundle.starts_with(b"RWSNAP\x04"));
        assert_eq!(decode(&bundle).unwrap(), state);
        let (_, carried) = split_bundle(&bundle).unwrap();
        assert_eq!(carried.unwrap().archive, archive);
        check_received(&bundle).unwrap();
        // Without the archive its state counts: refused, alone or in a version 3 bundle.
        let error = check_received(&state_data).unwrap_err().to_string();
        assert!(error.contains("archive did not come with it"), "{error}");
        let error = check_received(&encode_bundle(&state_data, &[], &[]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(error.contains("only 0 came with it"), "{error}");
    }

    #[test]
    fn json_snapshots_of_earlier_versions_still_decode() {
        let state = sample_state();
        let json = serde_json::to_vec(&state).unwrap();
        assert_eq!(decode(&json).unwrap(), state);
    }

    #[test]
    fn unknown_or_damaged_data_is_refused_with_the_reason() {
        let mut newer = encode(&sample_state()).unwrap();
        newer[MAGIC.len()] = 9;
        let error = decode(&newer).unwrap_err().to_string();
        assert!(error.contains("version 9"), "{error}");

        let mut truncated = encode(&sample_state()).unwrap();
        truncated.truncate(truncated.len() - 4);
        let error = decode(&truncated).unwrap_err().to_string();
        assert!(
            error.contains("decompress") || error.contains("decode"),
            "{error}"
        );

        let error = decode(b"\x00garbage").unwrap_err().to_string();
        assert!(error.contains("neither"), "{error}");
        assert!(decode(b"RWSNAP").unwrap_err().to_string().contains("magic"));
    }
}
