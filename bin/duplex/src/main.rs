//! `duplex`: the command-line client and admin tool of a Duplex cluster.
//!
//! `duplex demo` is the place to start: a local cluster, bank transfers, a node killed mid-run,
//! the takeover shown as it happens. `duplex local up|down|status` runs a local cluster;
//! `put`, `get`, `delete`, `scan`, `status`, `kill` and `bank` work on any cluster given its
//! config. `lsg` drives a log storage group directly on this machine's disk (create, inspect,
//! crash drill); `certs` makes and shows a cluster's certificates.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod certs_cmd;
mod client_cmd;
mod demo_cmd;
mod local_cmd;
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
    /// Start a local cluster, run bank transfers, kill a node mid-run, show the takeover,
    /// check the bank, stop (under a minute).
    Demo(demo_cmd::DemoArgs),
    /// Run a cluster on this machine: `up`, `down`, `status`.
    Local {
        #[command(subcommand)]
        command: local_cmd::LocalCommand,
    },
    /// Write one key (a transaction of its own); prints the commit's receipt.
    Put {
        #[command(flatten)]
        cluster: client_cmd::ClusterArgs,
        key: String,
        value: String,
    },
    /// Read one key.
    Get {
        #[command(flatten)]
        cluster: client_cmd::ClusterArgs,
        key: String,
    },
    /// Delete one key.
    Delete {
        #[command(flatten)]
        cluster: client_cmd::ClusterArgs,
        key: String,
    },
    /// Rows with keys in [START, END), in key order.
    Scan {
        #[command(flatten)]
        cluster: client_cmd::ClusterArgs,
        start: String,
        end: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Each LSG's home and backup node, primary CPU, state, owner epoch, replication lag and
    /// last checkpoint, and the takeovers the CPUs remember.
    Status {
        #[command(flatten)]
        cluster: client_cmd::ClusterArgs,
        /// One JSON line per CPU.
        #[arg(long)]
        json: bool,
    },
    /// SIGKILL a node's CPUs or one CPU (drills; the cluster's processes on this host).
    Kill {
        #[command(flatten)]
        cluster: client_cmd::ClusterArgs,
        #[arg(long)]
        node: Option<u16>,
        /// N.K
        #[arg(long)]
        cpu: Option<String>,
    },
    /// Bank transfers with a live progress line, then a check that the total is unchanged and
    /// every acknowledged transfer is present once.
    Bank(client_cmd::BankArgs),
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
        Command::Demo(args) => demo_cmd::run(&args),
        Command::Local { command } => local_cmd::run(command),
        Command::Put {
            cluster,
            key,
            value,
        } => client_cmd::block_on(client_cmd::put(&cluster, &key, &value)),
        Command::Get { cluster, key } => client_cmd::block_on(client_cmd::get(&cluster, &key)),
        Command::Delete { cluster, key } => {
            client_cmd::block_on(client_cmd::delete(&cluster, &key))
        }
        Command::Scan {
            cluster,
            start,
            end,
            limit,
        } => client_cmd::block_on(client_cmd::scan(&cluster, &start, end.as_deref(), limit)),
        Command::Status { cluster, json } => client_cmd::run_status(&cluster, json),
        Command::Kill { cluster, node, cpu } => client_cmd::kill(&cluster, node, cpu.as_deref()),
        Command::Bank(args) => client_cmd::bank_cmd(&args),
        Command::Lsg { command } => lsg_cmd::run(command),
        Command::Certs { command } => certs_cmd::run(command),
    }
}
