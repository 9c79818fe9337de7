//! The chaos runs CI makes: a fresh seed each run (printed; `REWIND_CHAOS_SEED` replays it) and
//! `REWIND_CHAOS_ROUNDS` rounds (default 30), plus the seeds that once failed, by name. At least
//! two thirds of the faults must land while a rollback runs. Members
//! run in network namespaces so the leader can be partitioned: this needs root (CI has it).

use rewind_chaos::rollback_faults::{self, Network, StateSize};
use rewind_chaos::{FaultOutcome, seed_from_env};

/// The two runs take turns: each keeps two cores busy on its own, and at once they would
/// measure the machine rather than rewind (their bounds are in seconds).
static ONE_RUN_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rounds(variable: &str, default: usize) -> usize {
    std::env::var(variable)
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread")]
async fn members_crash_or_the_leader_is_partitioned_during_rollbacks_with_a_fresh_seed() {
    let _turn = ONE_RUN_AT_A_TIME.lock().await;
    rewind_shared::logging::init("warn");
    rewind_shared::tls::install_crypto_provider();
    let seed = seed_from_env();
    eprintln!("chaos seed {seed}: replay with REWIND_CHAOS_SEED={seed}");
    let dir = tempfile::tempdir().unwrap();
    let rounds = rounds("REWIND_CHAOS_ROUNDS", 30);
    let report = rollback_faults::run(seed, rounds, dir.path(), Network::Private, StateSize::Small)
        .await
        .unwrap_or_else(|error| panic!("seed {seed}: {error:#}"));
    must_have_landed_most_faults(&report);
}

/// A fault lands 0-300 ms into a rollback that takes seconds: a run where more than a third of
/// them found the rollback already over, or could not tell (indeterminate counts as not landed),
/// did not test what it says.
fn must_have_landed_most_faults(report: &rollback_faults::Report) {
    let installed = report
        .faults
        .iter()
        .filter(|(_, outcome)| *outcome == FaultOutcome::Installed)
        .count();
    eprintln!(
        "seed {}: {installed} of {} faults landed during a rollback: {:?}",
        report.seed, report.rounds, report.faults
    );
    assert!(
        installed * 3 >= report.rounds * 2,
        "seed {}: only {installed} of {} faults landed while a rollback ran (at least two thirds must)",
        report.seed,
        report.rounds
    );
}

/// The large-state mode: the leader's snapshot is over 16 MiB before the faults, and every
/// member killed comes back behind a compaction, so it must be sent that snapshot and reach the
/// leader's applied index within a minute (the run fails otherwise). `REWIND_CHAOS_LARGE_ROUNDS`
/// rounds (default 4: each grows and ships a snapshot of over 16 MiB).
#[tokio::test(flavor = "multi_thread")]
async fn members_crash_with_a_large_state_and_catch_up_by_snapshot_with_a_fresh_seed() {
    let _turn = ONE_RUN_AT_A_TIME.lock().await;
    rewind_shared::logging::init("warn");
    rewind_shared::tls::install_crypto_provider();
    let seed = seed_from_env();
    eprintln!("large-state chaos seed {seed}: replay with REWIND_CHAOS_SEED={seed}");
    let dir = tempfile::tempdir().unwrap();
    let rounds = rounds("REWIND_CHAOS_LARGE_ROUNDS", 4);
    let report = rollback_faults::run(seed, rounds, dir.path(), Network::Private, StateSize::Large)
        .await
        .unwrap_or_else(|error| panic!("seed {seed}: {error:#}"));
    eprintln!(
        "seed {seed}: {} snapshots installed over {} rounds: {:?}",
        report.snapshots_installed, report.rounds, report.faults
    );
    let restarts = report
        .faults
        .iter()
        .filter(|(fault, _)| {
            matches!(
                fault,
                rollback_faults::Fault::KillLeader | rollback_faults::Fault::KillFollower
            )
        })
        .count();
    must_have_landed_most_faults(&report);
    assert!(
        restarts == 0 || report.snapshots_installed > 0,
        "seed {seed}: a member was brought back behind a compaction {restarts} times, yet none installed a snapshot"
    );
}

// Seeds that once found a bug go here, one named test each, so they are replayed forever:
// #[tokio::test(flavor = "multi_thread")]
// async fn seed_<seed>_<what_it_found>() { ... rollback_faults::run(<seed>, <rounds>, ...) ... }
