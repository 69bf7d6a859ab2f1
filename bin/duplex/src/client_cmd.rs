//! The client commands: `put`, `get`, `delete`, `scan`, `status`, `kill`, `bank`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use clap::Args;
use duplex_client::bank::{self, Progress};
use duplex_client::{Cluster, ConnectOptions};
use duplex_host::node::{Ended, end_local_cpu};
use duplex_host::{ClientOptions, CpuStatus, LsgStatus};
use duplex_node::ClusterConfig;
use duplex_transport::EndpointId;

#[derive(Debug, Args, Clone)]
pub struct ClusterArgs {
    /// The cluster config file.
    #[arg(long, default_value = "duplex-local/cluster.toml")]
    pub config: PathBuf,
    /// The cluster's certificate directory (default: `certs` beside the config file).
    #[arg(long)]
    pub certs: Option<PathBuf>,
    /// The client certificate to use (`client-NAME.pem` in the cert directory; `duplex local
    /// up` issues `local`, `duplex certs client` others).
    #[arg(long, default_value = "local")]
    pub client: String,
}

impl ClusterArgs {
    fn certs(&self) -> PathBuf {
        self.certs
            .clone()
            .unwrap_or_else(|| self.config.parent().unwrap_or(Path::new(".")).join("certs"))
    }
}

pub fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(f)
}

pub async fn connect(args: &ClusterArgs) -> Result<Cluster> {
    let config = ClusterConfig::load(&args.config)?;
    let options = ConnectOptions {
        certs: args.certs(),
        client_name: args.client.clone(),
        timeouts: ClientOptions::default(),
    };
    Ok(Cluster::connect(config, options).await?)
}

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub async fn put(args: &ClusterArgs, key: &str, value: &str) -> Result<()> {
    let cluster = connect(args).await?;
    let session = cluster.session();
    let mut t = session.transaction();
    t.put(key.as_bytes(), value.as_bytes()).await?;
    let c = t.commit().await?;
    match (c.lsg, c.receipt) {
        (Some(lsg), Some(r)) => println!(
            "committed in LSG {lsg} at LSN {} (epoch {}, acknowledged {:?}: {})",
            r.commit_lsn,
            r.epoch,
            r.state,
            if r.state.out_of_communication() {
                "flushed to disk"
            } else {
                "held in memory on two nodes"
            }
        ),
        _ => println!("committed"),
    }
    cluster.close();
    Ok(())
}

pub async fn get(args: &ClusterArgs, key: &str) -> Result<()> {
    let cluster = connect(args).await?;
    let session = cluster.session();
    let mut t = session.transaction();
    let value = t.get(key.as_bytes()).await?;
    t.commit().await?;
    match value {
        Some(v) => println!("{}", show(&v)),
        None => bail!("no value for key {key:?}"),
    }
    cluster.close();
    Ok(())
}

pub async fn delete(args: &ClusterArgs, key: &str) -> Result<()> {
    let cluster = connect(args).await?;
    let session = cluster.session();
    let mut t = session.transaction();
    t.delete(key.as_bytes()).await?;
    t.commit().await?;
    println!("deleted");
    cluster.close();
    Ok(())
}

pub async fn scan(args: &ClusterArgs, start: &str, end: Option<&str>, limit: u32) -> Result<()> {
    let cluster = connect(args).await?;
    let session = cluster.session();
    let mut t = session.transaction();
    let rows = t
        .scan(start.as_bytes(), end.map(str::as_bytes), limit)
        .await?;
    t.commit().await?;
    for (k, v) in rows {
        println!("{}\t{}", show(&k), show(&v));
    }
    cluster.close();
    Ok(())
}

fn ms_since(t0: u64, t: u64) -> String {
    format!("+{} ms", t.saturating_sub(t0))
}

/// Prints one line per LSG (home, backup, primary, state, epoch, lag, checkpoint) and the
/// takeovers the CPUs remember.
pub fn print_status(
    config: &ClusterConfig,
    statuses: &[(EndpointId, Result<CpuStatus, duplex_client::ClientError>)],
) {
    println!(
        "{:<4} {:<5} {:<7} {:<8} {:<12} {:<6} {:<10} {:<12} {:<8}",
        "LSG", "home", "backup", "primary", "state", "epoch", "lag(rec)", "checkpoint", "active"
    );
    for lsg in config.lsgs() {
        let owner: Option<(EndpointId, &LsgStatus)> = statuses
            .iter()
            .filter_map(|(cpu, s)| s.as_ref().ok().map(|s| (*cpu, s)))
            .flat_map(|(cpu, s)| s.lsgs.iter().map(move |l| (cpu, l)))
            .filter(|(_, l)| l.lsg == lsg.id && l.role == "owner")
            .max_by_key(|(_, l)| l.epoch);
        match owner {
            Some((cpu, l)) => println!(
                "{:<4} {:<5} {:<7} {:<8} {:<12} {:<6} {:<10} {:<12} {:<8}",
                lsg.id.0,
                lsg.home,
                lsg.backup,
                cpu.to_string(),
                l.state.clone().unwrap_or_default(),
                l.epoch.0,
                l.lag_records.map_or("-".into(), |n| n.to_string()),
                l.last_checkpoint_lsn,
                l.active_transactions
            ),
            None => println!(
                "{:<4} {:<5} {:<7} {:<8} {:<12}",
                lsg.id.0, lsg.home, lsg.backup, "-", "no primary"
            ),
        }
    }
    let down: Vec<String> = statuses
        .iter()
        .filter(|(_, s)| s.is_err())
        .map(|(cpu, _)| cpu.to_string())
        .collect();
    if !down.is_empty() {
        println!("CPUs not answering: {}", down.join(", "));
    }
    for (cpu, s) in statuses {
        let Ok(s) = s else { continue };
        for l in &s.lsgs {
            for t in &l.takeovers {
                println!(
                    "takeover of LSG {} by {cpu} (epoch {}, from {}, {}): detected {}, fenced {}, recovered {}, ready {}",
                    l.lsg.0,
                    t.epoch.0,
                    t.from.map_or("?".into(), |f| f.to_string()),
                    t.start.clone().unwrap_or_else(|| "running".into()),
                    humantime_ms(t.detected_unix_ms),
                    ms_since(t.detected_unix_ms, t.fenced_unix_ms),
                    t.recovered_unix_ms
                        .map_or("-".into(), |r| ms_since(t.detected_unix_ms, r)),
                    t.ready_unix_ms
                        .map_or("-".into(), |r| ms_since(t.detected_unix_ms, r)),
                );
            }
        }
    }
}

/// A wall-clock time as seconds since the Unix epoch with milliseconds.
fn humantime_ms(unix_ms: u64) -> String {
    format!("{}.{:03}", unix_ms / 1000, unix_ms % 1000)
}

pub fn run_status(args: &ClusterArgs, json: bool) -> Result<()> {
    block_on(async {
        let cluster = connect(args).await?;
        // Let the endpoint's links come up before asking.
        let _ = cluster.wait_ready(Duration::from_secs(2)).await;
        let statuses = cluster.status(Duration::from_secs(2)).await;
        if json {
            for (cpu, s) in &statuses {
                match s {
                    Ok(s) => println!("{}", serde_json::to_string(s)?),
                    Err(e) => println!(
                        "{}",
                        serde_json::json!({"cpu": cpu.to_string(), "error": e.to_string()})
                    ),
                }
            }
        } else {
            print_status(cluster.config(), &statuses);
        }
        cluster.close();
        Ok(())
    })
}

/// SIGKILLs CPUs through their pid files (one host only).
pub fn kill(args: &ClusterArgs, node: Option<u16>, cpu: Option<&str>) -> Result<()> {
    let config = ClusterConfig::load(&args.config)?;
    let targets: Vec<EndpointId> = match (node, cpu) {
        (Some(n), None) => config
            .node(n)
            .with_context(|| format!("no node {n}"))?
            .endpoints()
            .collect(),
        (None, Some(c)) => vec![c.parse::<EndpointId>().map_err(anyhow::Error::msg)?],
        _ => bail!("give --node N or --cpu N.K"),
    };
    for cpu in targets {
        let node = config
            .node(cpu.node)
            .with_context(|| format!("no node {}", cpu.node))?;
        match end_local_cpu(&node.data_dir, cpu).map_err(anyhow::Error::msg)? {
            Ended::Killed { pid } => println!("killed CPU {cpu} (pid {pid})"),
            Ended::NotRunning => println!("CPU {cpu} was not running"),
        }
    }
    Ok(())
}

#[derive(Debug, Args, Clone)]
pub struct BankArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[arg(long, default_value_t = 10_000)]
    pub accounts: usize,
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Seeds the transfers (printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// One JSON line with the results instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs the bank and checks it; prints a live progress line on stderr.
pub async fn bank_on(
    cluster: &Cluster,
    args: &BankArgs,
    stop: Arc<AtomicBool>,
    quiet: bool,
) -> Result<serde_json::Value> {
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    if bank::init(cluster, args.accounts).await? && !quiet {
        eprintln!("created {} accounts", args.accounts);
    }
    if !quiet {
        eprintln!(
            "bank: {} clients, {} s, seed {seed}",
            args.clients, args.seconds
        );
    }
    let progress = Arc::new(Progress::default());
    let ticker = {
        let progress = Arc::clone(&progress);
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let t0 = Instant::now();
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = progress.committed.load(Ordering::Relaxed);
                if !quiet {
                    eprint!(
                        "\r{:>5.1} s  {:>8} committed  {:>6}/s  {:>6} retries  normal {} flushed {}   ",
                        t0.elapsed().as_secs_f64(),
                        now,
                        now - last,
                        progress.retries.load(Ordering::Relaxed),
                        progress.normal.load(Ordering::Relaxed),
                        progress.flushed.load(Ordering::Relaxed),
                    );
                }
                last = now;
            }
        })
    };
    let run = bank::run(
        cluster,
        args.accounts,
        args.clients,
        Duration::from_secs(args.seconds),
        seed,
        Arc::clone(&stop),
        progress,
    )
    .await?;
    stop.store(true, Ordering::Relaxed);
    let _ = ticker.await;
    if !quiet {
        eprintln!();
    }
    let check = bank::check(cluster, args.accounts, &run.acknowledged)
        .await
        .map_err(|e| anyhow::anyhow!("the bank's check failed: {e}"))?;
    let secs = run.elapsed.as_secs_f64().max(1e-9);
    Ok(serde_json::json!({
        "clients": args.clients,
        "accounts": args.accounts,
        "seed": seed,
        "committed": run.committed,
        "retries": run.retries,
        "unknown_outcome": run.unknown,
        "commits_per_s": run.committed as f64 / secs,
        "p50_us": run.latency_us.value_at_quantile(0.5),
        "p99_us": run.latency_us.value_at_quantile(0.99),
        "max_us": run.latency_us.max(),
        "check": {
            "total": check.total,
            "markers": check.markers,
            "acknowledged_present": check.acknowledged,
        },
    }))
}

pub fn bank_cmd(args: &BankArgs) -> Result<()> {
    block_on(async {
        let cluster = connect(&args.cluster).await?;
        cluster.wait_ready(Duration::from_secs(10)).await?;
        let result = bank_on(&cluster, args, Arc::new(AtomicBool::new(false)), args.json).await?;
        if args.json {
            println!("{result}");
        } else {
            println!(
                "{} transfers committed ({:.0}/s, p50 {} µs, p99 {} µs), {} retries; check passed: total {} unchanged, every acknowledged transfer present once",
                result["committed"],
                result["commits_per_s"].as_f64().unwrap_or(0.0),
                result["p50_us"],
                result["p99_us"],
                result["retries"],
                result["check"]["total"]
            );
        }
        cluster.close();
        Ok(())
    })
}
