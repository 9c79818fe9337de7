//! Helpers for the integration tests: real `rewind-coordinator` and `rewind-agent` processes on
//! `127.0.0.1:0`, real mutual TLS from a dev CA, real sled directories.
//!
//! Helpers that panic on failure are named `must_*`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use rewind_proto::v1::control_service_client::ControlServiceClient;
use rewind_shared::dev_ca::{self, DevCa, Subject};
use rewind_shared::identity::Kind;
use rewind_shared::tls::TlsFiles;
use tonic::transport::{Channel, Endpoint};

pub mod browser;
pub mod clients;
pub mod https;
pub mod netns;
pub mod pg;
pub mod proxy;
pub mod shards;
pub mod sim;
pub use browser::Browser;
pub use netns::PrivateNet;
pub use pg::Postgres;

mod alertmanager;
mod cluster;
mod coordinator;
mod flows;
mod hosts;
mod process;

pub use alertmanager::*;
pub use cluster::*;
pub use coordinator::*;
pub use flows::*;
pub use hosts::*;
pub use process::*;
