//! `duplexd`: one CPU of a Duplex node.
//!
//! `duplexd --config C --node N --cpu K` reads the cluster config, binds the CPU's transport
//! endpoint, and runs the CPU's role of every LSG whose home or backup node is N (see
//! `duplex_node::ClusterConfig::lsg_cpus` for how the halves spread over a node's CPUs):
//!
//! - the first CPU of an LSG's list creates the LSG when its directory holds none, and owns it;
//! - every other role starts as a backup, joins whichever owner announces itself, and takes
//!   over as `duplex_host` decides (same-node half on the kernel's release of the LSG lock,
//!   backup node on the release of the home node's liveness file); when the whole cluster was
//!   down, nobody announces a primary and the first CPU of the list recovers the LSG from its
//!   trail (`Timing::cold_start_wait`).
//!
//! Clients connect with a client certificate of the cluster CA. Reports (ready, owner, takeover,
//! state changes) go to stdout as JSON lines with the LSG; logs go to stderr (`RUST_LOG`,
//! `--log-format json` for structured logs). With `--faults-on-stdin`, `partition N.C` and
//! `heal N.C` lines cut and mend this CPU's paths to another (drills and tests only). SIGTERM
//! stops the CPU after making every owner's trail durable (exit 0), so a stopped cluster keeps
//! every commit it acknowledged; SIGKILL is a crash. Exits 3 when an owner stops (fenced, or its
//! storage failed): the CPU halts, its LSGs are taken over by their backups.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use duplex_host::{Cpu, Exit, Report};
use duplex_lsg::MANIFEST_NAME;
use duplex_node::ClusterConfig;
use duplex_transport::certs::Credentials;
use duplex_transport::{EndpointId, QuicConfig, QuicTransport};
use tracing::info;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Parser, Debug)]
#[command(version, about = "One CPU of a Duplex node")]
struct Args {
    /// The cluster config file (TOML; docs/config.md).
    #[arg(long)]
    config: PathBuf,
    /// This CPU's node.
    #[arg(long)]
    node: u16,
    /// This CPU's id within its node.
    #[arg(long)]
    cpu: u16,
    /// The cluster's certificate directory (default: `certs` beside the config file).
    #[arg(long)]
    certs: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Obey `partition N.C` / `heal N.C` lines on stdin (fault injection for drills and tests).
    #[arg(long)]
    faults_on_stdin: bool,
}

fn main() {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("duplexd: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(run(args)) {
        Ok(Exit::Closed) => 0,
        Ok(Exit::Stopped(reason)) => {
            eprintln!("duplexd: an owner stopped, the CPU halts: {reason}");
            3
        }
        Err(e) => {
            eprintln!("duplexd: {e:#}");
            1
        }
    };
    // Threads may still wait for an LSG's lock: end the process without waiting for them.
    std::process::exit(code);
}

fn print(value: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

async fn run(args: Args) -> Result<Exit> {
    let config = ClusterConfig::load(&args.config)?;
    let local = EndpointId::new(args.node, args.cpu);
    let node = config
        .node(args.node)
        .with_context(|| format!("node {} is not in {}", args.node, args.config.display()))?;
    let cpu = node
        .cpus
        .iter()
        .find(|c| c.id == args.cpu)
        .with_context(|| format!("node {} has no CPU {}", args.node, args.cpu))?;
    let certs = match &args.certs {
        Some(dir) => dir.clone(),
        None => args.config.parent().unwrap_or(Path::new(".")).join("certs"),
    };
    let credentials = Credentials::load_node(&certs, args.node)
        .with_context(|| format!("loading node {}'s certificates", args.node))?;
    let mut quic = QuicConfig::new(local, cpu.main, credentials);
    quic.failsafe_bind = cpu.failsafe;
    quic.detector = config.detector_config();
    // Clients dial in with a client certificate of the cluster CA; nobody lists them.
    quic.accept_clients = true;
    let transport = QuicTransport::bind(quic)
        .await
        .with_context(|| format!("binding CPU {local} at {}", cpu.main))?;
    for (peer, addrs) in config.peers() {
        if peer != local {
            transport.add_peer(peer, addrs);
        }
    }
    if let Some(addr) = cpu.metrics {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("serving metrics at {addr}"))?;
        info!(%addr, "metrics in Prometheus text format");
    }
    if args.faults_on_stdin {
        duplex_host::faults::obey_fault_lines_on_stdin(transport.clone());
    }
    let mut cpu_loop = Cpu::new(transport, &node.data_dir)?;
    let mut roles = 0;
    for lsg in config.lsgs() {
        let Some(host) = config.host_config(lsg.id, local) else {
            continue;
        };
        roles += 1;
        let other = if lsg.home == args.node {
            lsg.backup
        } else {
            lsg.home
        };
        if let Some(other_node) = config.node(other) {
            cpu_loop.watch_node(other, other_node.data_dir.clone())?;
        }
        let id = lsg.id;
        let report: Box<dyn FnMut(Report)> = Box::new(move |r: Report| {
            let mut v = serde_json::to_value(&r).unwrap_or_default();
            if let Some(map) = v.as_object_mut() {
                map.insert("lsg".into(), serde_json::json!(id.0));
                map.insert("cpu".into(), serde_json::json!(local.to_string()));
            }
            print(&v);
        });
        let creator = host.cpus.first() == Some(&local);
        if creator && !host.lsg_dir.join(MANIFEST_NAME).exists() {
            let volumes = lsg.volumes.iter().map(|v| v.name.clone()).collect();
            info!(lsg = %id, dir = %host.lsg_dir.display(), "creating the LSG");
            cpu_loop
                .add_created(host, volumes, Vec::new(), report)
                .await
                .with_context(|| format!("creating LSG {id}"))?;
        } else {
            cpu_loop.add_backup(host, true, report)?;
        }
    }
    if roles == 0 {
        bail!(
            "CPU {local} runs no role: node {} is no LSG's home or backup node",
            args.node
        );
    }
    info!(cpu = %local, roles, "running");
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    let exit = cpu_loop
        .run_until(async move {
            terminate.recv().await;
        })
        .await?;
    // Let the last lines and replies leave before the process ends.
    tokio::time::sleep(Duration::from_millis(1)).await;
    Ok(exit)
}
