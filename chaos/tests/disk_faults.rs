//! Disks that fail under a member, for real (ext4 on a loop device as its data directory), with
//! a fresh seed each run (printed; `REWIND_CHAOS_SEED` replays it). Needs root, as CI has.

use rewind_chaos::disk_faults;
use rewind_chaos::seed_from_env;

/// Each run starts a cluster of its own; at once they would measure the machine.
static ONE_RUN_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread")]
async fn a_member_whose_disk_fills_or_fails_exits_and_recovers_with_nothing_lost() {
    let _turn = ONE_RUN_AT_A_TIME.lock().await;
    rewind_shared::tls::install_crypto_provider();
    disk_faults::must_have_tools();
    let seed = seed_from_env();
    eprintln!("disk chaos seed {seed}: replay with REWIND_CHAOS_SEED={seed}");
    let dir = tempfile::tempdir().unwrap();
    let member = disk_faults::disk_fills_then_fails(seed, dir.path())
        .await
        .unwrap_or_else(|error| panic!("seed {seed}: {error:#}"));
    eprintln!("seed {seed}: member {member}'s disk filled, then failed; it recovered both times");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_disk_on_one_member_does_not_stall_the_cluster() {
    let _turn = ONE_RUN_AT_A_TIME.lock().await;
    rewind_shared::tls::install_crypto_provider();
    disk_faults::must_have_tools();
    let seed = seed_from_env();
    eprintln!("disk stall seed {seed}: replay with REWIND_CHAOS_SEED={seed}");
    let dir = tempfile::tempdir().unwrap();
    disk_faults::disk_stalls(seed, dir.path())
        .await
        .unwrap_or_else(|error| panic!("seed {seed}: {error:#}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_whose_disk_fills_mid_rollback_exits_and_finishes_it_once_there_is_room() {
    let _turn = ONE_RUN_AT_A_TIME.lock().await;
    rewind_shared::tls::install_crypto_provider();
    disk_faults::must_have_tools();
    let dir = tempfile::tempdir().unwrap();
    disk_faults::agent_disk_fills(dir.path())
        .await
        .unwrap_or_else(|error| panic!("{error:#}"));
}
