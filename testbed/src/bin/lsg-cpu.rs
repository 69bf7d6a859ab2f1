//! One CPU of an LSG's process pairs in its own process: `duplex_host::Host` with real files
//! and the QUIC transport, for the process tests and the pairs benchmark.
//!
//! The LSG lives in `DATA/lsg` (shared storage: every CPU of every node opens the same
//! directory) and the node's pid files in `DATA/node-N`. Roles: `create-and-own` creates the
//! LSG (a bank of `--accounts` accounts when given) and owns it; `backup` joins whichever owner
//! announces itself and takes over as the driver decides; `recover` is fresh pairs after every
//! CPU was lost: it takes the LSG over at once from the trail.
//!
//! Prints one JSON line per report of the driver (the first is `ready`), and obeys
//! `partition N.C` / `heal N.C` on stdin (the transport's fault injector, both paths). Exits 3
//! when the owner stops (fenced, storage failed) so that a backup takes over.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use duplex_host::{Cpu, Exit, HostConfig, Report, Timing};
use duplex_testbed::bank;
use duplex_transport::certs::NodeCredentials;
use duplex_transport::{DetectorConfig, EndpointId, PeerAddrs, QuicConfig, QuicTransport};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    CreateAndOwn,
    Backup,
    Recover,
}

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    node: u16,
    #[arg(long)]
    cpu: u16,
    #[arg(long, value_enum)]
    role: Role,
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long)]
    certs: PathBuf,
    /// This CPU's address (a restarted CPU passes its predecessor's).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Another CPU of the LSG: `N.C=ADDR` (repeatable).
    #[arg(long = "peer")]
    peers: Vec<String>,
    /// Client endpoints 0.0 .. 0.(K-1) may connect.
    #[arg(long, default_value_t = 64)]
    clients: u16,
    /// Flush before every acknowledgement, in every state.
    #[arg(long)]
    paranoid: bool,
    /// With `create-and-own`: the bank's accounts.
    #[arg(long, default_value_t = 16)]
    accounts: usize,
    #[arg(long, default_value_t = 300)]
    detection_time_ms: u64,
}

fn parse_peer(s: &str) -> Result<(EndpointId, SocketAddr)> {
    let (id, addr) = s.split_once('=').context("a peer is N.C=ADDR")?;
    Ok((id.parse().map_err(anyhow::Error::msg)?, addr.parse()?))
}

fn print(value: &impl serde::Serialize) {
    let mut out = std::io::stdout().lock();
    if let Ok(line) = serde_json::to_string(value) {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let code = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(args)))
    {
        Ok(Exit::Closed) => 0,
        Ok(Exit::Stopped(reason)) => {
            eprintln!("lsg-cpu: stopped: {reason}");
            3
        }
        Err(e) => {
            eprintln!("lsg-cpu: {e:#}");
            1
        }
    };
    // Threads may still wait for the LSG's lock: end the process without waiting for them.
    std::process::exit(code);
}

async fn run(args: Args) -> Result<Exit> {
    let local = EndpointId::new(args.node, args.cpu);
    let creds = NodeCredentials::load(&args.certs, args.node)?;
    let mut quic = QuicConfig::new(local, args.listen, creds);
    quic.detector = DetectorConfig::with_detection_time_ms(args.detection_time_ms);
    let transport = QuicTransport::bind(quic).await?;
    let mut cpus = vec![local];
    for p in &args.peers {
        let (id, main) = parse_peer(p)?;
        if id == local {
            bail!("--peer names this CPU {id}");
        }
        transport.add_peer(
            id,
            PeerAddrs {
                main,
                failsafe: None,
            },
        );
        cpus.push(id);
    }
    // Clients dial us (their ids are lower); the address is never used.
    let unused: SocketAddr = "127.0.0.1:9".parse()?;
    let clients: Vec<EndpointId> = (0..args.clients).map(|c| EndpointId::new(0, c)).collect();
    for c in &clients {
        transport.add_peer(
            *c,
            PeerAddrs {
                main: unused,
                failsafe: None,
            },
        );
    }
    cpus.sort();
    let config = HostConfig {
        local,
        lsg_id: bank::LSG,
        lsg_dir: args.data_dir.join("lsg"),
        run_dir: args.data_dir.join(format!("node-{}", args.node)),
        lsg_config: HostConfig::small_lsg_config(),
        paranoid: args.paranoid,
        cpus,
        timing: Timing::default(),
        key_ranges: Vec::new(),
    };
    print(&serde_json::json!({"event": "bound", "main": transport.local_addrs()?.main}));
    duplex_host::faults::obey_fault_lines_on_stdin(transport.clone());
    let report: Box<dyn FnMut(Report)> = Box::new(|r: Report| print(&r));
    let mut cpu = Cpu::new(transport, &config.run_dir)?;
    match args.role {
        Role::CreateAndOwn => {
            let (volumes, rows) = bank::initial_rows(args.accounts);
            cpu.add_created(config, volumes, rows, report).await?;
        }
        Role::Backup => cpu.add_backup(config, false, report)?,
        Role::Recover => cpu.add_recover(config, report)?,
    }
    let exit = cpu.run().await?;
    // Let the last lines and replies leave before the process ends.
    tokio::time::sleep(Duration::from_millis(1)).await;
    Ok(exit)
}
