//! The chaos runs CI makes: a fresh seed each run (printed; `REWIND_CHAOS_SEED` replays it) and
//! `REWIND_CHAOS_ROUNDS` rounds (default 30), plus the seeds that once failed, by name. Members
//! run in network namespaces so the leader can be partitioned: this needs root (CI has it).

use rewind_chaos::rollback_faults::{self, Network};
use rewind_chaos::{FaultOutcome, seed_from_env};

fn rounds() -> usize {
    std::env::var("REWIND_CHAOS_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(30)
}

#[tokio::test(flavor = "multi_thread")]
async fn members_crash_or_the_leader_is_partitioned_during_rollbacks_with_a_fresh_seed() {
    rewind_shared::logging::init("warn");
    rewind_shared::tls::install_crypto_provider();
    let seed = seed_from_env();
    eprintln!("chaos seed {seed}: replay with REWIND_CHAOS_SEED={seed}");
    let dir = tempfile::tempdir().unwrap();
    let report = rollback_faults::run(seed, rounds(), dir.path(), Network::Private)
        .await
        .unwrap_or_else(|error| panic!("seed {seed}: {error:#}"));
    let installed = report
        .faults
        .iter()
        .filter(|(_, outcome)| *outcome == FaultOutcome::Installed)
        .count();
    eprintln!(
        "seed {seed}: {installed} of {} faults landed during a rollback: {:?}",
        report.rounds, report.faults
    );
}

// Seeds that once found a bug go here, one named test each, so they are replayed forever:
// #[tokio::test(flavor = "multi_thread")]
// async fn seed_<seed>_<what_it_found>() { ... rollback_faults::run(<seed>, <rounds>, ...) ... }
