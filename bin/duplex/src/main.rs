//! `duplex`: the command-line client and admin tool of a Duplex cluster.
//!
//! Until the cluster exists it drives log storage groups directly: create and inspect one, and
//! run a crash drill that kills a writer process at random points and checks what recovery finds.
//! It also makes and shows a cluster's certificates.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod certs_cmd;
mod lsg_cmd;

#[derive(Debug, Parser)]
#[command(
    name = "duplex",
    version,
    about = "Duplex command-line client and admin tool"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work with a log storage group (LSG) on this machine's disk.
    Lsg {
        #[command(subcommand)]
        command: lsg_cmd::LsgCommand,
    },
    /// Create, show and renew a cluster's certificates (CA, nodes, clients) in a cert directory.
    Certs {
        #[command(subcommand)]
        command: certs_cmd::CertsCommand,
    },
}

/// Errors are printed as one line of causes, not a backtrace: they are for operators.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Lsg { command } => lsg_cmd::run(command),
        Command::Certs { command } => certs_cmd::run(command),
    }
}
