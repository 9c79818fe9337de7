//! The rewind host agent: captures a service's state before a change into a local
//! content-addressed store, executes reversion steps exactly once (journaled), reports health,
//! and keeps one outbound session to a coordinator, reconnecting with backoff.
//!
//! # Layout
//! - [`config`]: the agent's TOML config and its validation.
//! - [`errors`]: the crate's error type.
//! - [`paths`]: confinement of every path to a service's declared root.
//! - [`store`]: blobs (by sha256), snapshots, the step journal and fences, over [`kv`] (SQLite).
//! - [`snapshot`]: capture and exact restore of a service's state.
//! - [`host`]: the [`host::Host`] trait for running commands; [`host::LocalHost`] is the real one.
//! - [`steps`]: executes step commands idempotently: fence, journal, act, journal.
//! - [`catalogue`]: the optional steps (reload, named commands, jobs, purges, scale-up, checks).
//! - [`inspect`]: describing services for `rewindctl host diff` and `host drift`.
//! - [`migrate`]: applying and reverting schema migrations, recorded in the history table.
//! - [`shard`]: this host's steps of a schema transaction across shards (check, prepare, resolve,
//!   verify), one protocol over a PostgreSQL and an SQLite engine.
//! - [`schema`]: the schema version of a service's database, from its schema history table.
//! - [`facts`]: unit state, package versions and container image, recorded in snapshots.
//! - [`probes`]: HTTP, TCP and command health probes.
//! - [`retention`]: which releases a service root keeps (`keep-releases`), and pruning.
//! - [`app_metrics`]: the service's own Prometheus figures (requests, errors, latency).
//! - [`host_metrics`]: CPU, memory, load and disk from sysinfo.
//! - [`offline`]: the summary of the health history kept while no coordinator answered.
//! - [`self_revert`]: reverting a failing service's latest change while no coordinator answers.
//! - [`connection`]: the session with the coordinator and the reconnect loop.

pub mod app_metrics;
pub mod catalogue;
pub mod config;
pub mod connection;
pub mod container;
pub mod drift;
pub mod enroll;
pub mod errors;
pub mod facts;
pub mod host;
pub mod host_metrics;
pub mod inspect;
pub mod kv;
pub mod migrate;
pub mod offline;
pub mod paths;
pub mod probes;
pub mod retention;
pub mod schema;
pub mod self_revert;
pub mod shard;
pub mod snapshot;
pub mod steps;
pub mod store;

pub use errors::AgentError;
