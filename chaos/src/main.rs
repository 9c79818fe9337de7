//! `rewind-chaos`: runs a fault-injection scenario against real processes.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rewind-chaos",
    about = "Fault injection against real rewind clusters"
)]
struct Cli {
    /// Replays a run (default: from REWIND_CHAOS_SEED, else the clock).
    #[arg(long)]
    seed: Option<u64>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// kill -9 the leader, a follower or every member, or partition the leader (unless
    /// --loopback), during rollbacks.
    RollbackFaults {
        #[arg(long, default_value_t = 30)]
        rounds: usize,
        /// Run members on loopback (no root needed; no partitions).
        #[arg(long)]
        loopback: bool,
        /// Grow the state until the leader's snapshot is over 16 MiB before the faults, and
        /// bring killed members back behind a compaction (they catch up by snapshot).
        #[arg(long)]
        large_state: bool,
    },
}

fn main() -> ExitCode {
    rewind_shared::logging::init("info,raft=warn");
    rewind_shared::tls::install_crypto_provider();
    let cli = Cli::parse();
    let seed = cli.seed.unwrap_or_else(rewind_chaos::seed_from_env);
    println!("seed {seed} (replay with --seed {seed})");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let Scenario::RollbackFaults {
        rounds,
        loopback,
        large_state,
    } = cli.scenario;
    let size = if large_state {
        rewind_chaos::rollback_faults::StateSize::Large
    } else {
        rewind_chaos::rollback_faults::StateSize::Small
    };
    let network = if loopback {
        rewind_chaos::rollback_faults::Network::Loopback
    } else {
        rewind_chaos::rollback_faults::Network::Private
    };
    let result = runtime.block_on(async {
        let dir = tempfile::tempdir()?;
        rewind_chaos::rollback_faults::run(seed, rounds, dir.path(), network, size).await
    });
    match result {
        Ok(report) => {
            println!("ok: {report:?}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("FAILED with seed {seed}: {error:#}");
            ExitCode::FAILURE
        }
    }
}
