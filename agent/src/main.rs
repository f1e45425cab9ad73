//! `tapir`: the command line. Parses flags and wires the library's stages together.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

/// Tapir: every HTTP exchange on this host as OpenTelemetry traces and metrics, with no
/// code changes. eBPF programs watch socket syscalls of unmodified processes.
#[derive(Parser)]
#[command(name = "tapir", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: capture HTTP exchanges on this host (needs root).
    Run(cmd::run::RunArgs),
    /// Live view of captured HTTP exchanges, one line (or JSON object) each (needs root).
    Watch(cmd::watch::WatchArgs),
    /// Check what this host's kernel supports and what would not work without it.
    Doctor,
}

fn main() -> ExitCode {
    tapir::heap::configure();
    let cli = Cli::parse();
    cmd::init_logging();
    let result = match cli.command {
        Command::Run(args) => cmd::run::run(args),
        Command::Watch(args) => cmd::watch::run(args),
        Command::Doctor => cmd::doctor::run(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tapir: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
