//! `rewindctl`: the command line SREs drive rewind with. Noun-verb commands
//! (`rewindctl rollback start ch-12`), tables by default, `--output json` everywhere, and an
//! exit code of 0 only when the operation succeeded.

#[macro_use]
mod output;
mod access;
mod client;
mod cmd;
mod commands;
mod contexts;
mod demo;
mod fire_drills;
mod flags;
mod hosts;
mod join;
mod migrations;
mod plans;
mod requests;
mod upgrade;
mod watch;

use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _};

use crate::commands::Cli;

fn main() -> ExitCode {
    rewind_shared::logging::init("warn");
    rewind_shared::tls::install_crypto_provider();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    // Which connection flags the command line set: a context fills in only the others.
    let given = contexts::Given::from_matches(&matches);
    let typed = contexts::Given::typed(&matches);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            say_err!("error: start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli, given, typed)) {
        Ok(code) => code,
        Err(error) => {
            say_err!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
