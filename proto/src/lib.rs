//! The `rewind.v1` gRPC protocol, generated from `proto/rewind/v1/*.proto`.
//!
//! Every message also has protobuf-JSON serde impls (enums as their names), which `rewindctl
//! --output json` prints directly.
//!
//! # Layout
//! - `v1`: generated messages, clients and servers.
//! - [`names`]: readable short names for the protocol's enums.

pub mod names;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("rewind.v1");
    include!(concat!(env!("OUT_DIR"), "/rewind.v1.serde.rs"));
}

/// The encoded `FileDescriptorSet` of the protocol: every service and method, for checks that
/// must cover all of them.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/rewind_descriptor.bin"));

/// Every method of every service of the protocol, as gRPC paths (`/rewind.v1.ControlService/
/// StartRollback`), read from [`FILE_DESCRIPTOR_SET`]: what a check that must cover every RPC
/// walks, so a new RPC is covered without anyone listing it.
pub fn methods() -> Vec<String> {
    methods_in(FILE_DESCRIPTOR_SET)
}

/// Every method of every service in an encoded `FileDescriptorSet`, as gRPC paths.
///
/// # Panics
/// If `descriptor_set` does not decode: it is one built into a binary, never input.
pub fn methods_in(descriptor_set: &[u8]) -> Vec<String> {
    use prost::Message as _;
    let set = prost_types::FileDescriptorSet::decode(descriptor_set)
        .expect("a descriptor set built into the binary decodes");
    let mut methods = Vec::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                methods.push(format!(
                    "/{}.{}/{}",
                    file.package(),
                    service.name(),
                    method.name()
                ));
            }
        }
    }
    methods
}

/// Largest gRPC message either side accepts; larger ones fail with a clear status.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Largest batch of Raft messages between members: a single log entry holds a command of up to
/// [`MAX_MESSAGE_BYTES`] plus its encoding, so peers accept more than clients may send.
pub const MAX_RAFT_BATCH_BYTES: usize = 4 * MAX_MESSAGE_BYTES;
/// Data bytes in one `SnapshotChunk`.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;
/// Largest state snapshot a member sends or accepts (its encoded, compressed data).
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 30;
