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

/// Largest gRPC message either side accepts; larger ones fail with a clear status.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
