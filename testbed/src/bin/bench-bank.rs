//! `scripts/bench bank`: bank transfers against a local cluster (`duplex local up`, 3 nodes x 2
//! CPUs, release binaries) with 1, 8 and 32 concurrent clients, in default durability and
//! flush-always (paranoid); the same workload against PostgreSQL with a synchronous standby
//! on this machine when it is installed (`scripts/pg-standby`, `bench-bank-pg`); and takeover
//! as the client sees it: SIGKILL of the bank LSG's primary CPU, or of its whole node, to the
//! first commit acknowledged by the new primary (a receipt with a higher owner epoch).
//!
//! Each transfer (`duplex_client::bank`) is seven requests on one session, each a round trip
//! from the client process to the primary's process: begin, two reads, three writes (two
//! balances and a marker), commit. The commit waits for the backups' acknowledgement (normal)
//! or the trail's flush (paranoid); PostgreSQL's transaction makes the same round trips.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use duplex_client::Cluster;
use duplex_client::bank::{self, Progress};
use duplex_lsg::LsgId;
use duplex_testbed::local::{LocalCluster, LocalOptions, wait_owner};
use duplex_testbed::{Better, Comparison, percentiles, print_comparisons};
use duplex_transport::EndpointId;
use serde_json::Value;

const BANK: LsgId = LsgId(1);
const WAIT: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
struct Args {
    /// A short run (under a minute): fewer seconds per point and fewer takeover trials.
    #[arg(long)]
    quick: bool,
    #[arg(long, default_value_t = 10_000)]
    accounts: usize,
    /// Seconds per client count (default 10, quick 2).
    #[arg(long)]
    seconds: Option<u64>,
    /// Takeover trials of each kind (default 10, quick 3).
    #[arg(long)]
    trials: Option<usize>,
    /// Skip the PostgreSQL baseline.
    #[arg(long)]
    no_postgres: bool,
}

#[derive(Debug, Clone, Copy)]
struct Point {
    commits_per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

const CLIENTS: [usize; 3] = [1, 8, 32];

async fn wait_normal(cluster: &Cluster) -> Result<(EndpointId, u64)> {
    let (owner, status) = wait_owner(cluster, BANK, WAIT, |_, l| {
        l.state.as_deref() == Some("Normal") && l.home_counts
    })
    .await?;
    Ok((owner, status.epoch.0))
}

async fn bank_point(
    cluster: &Cluster,
    accounts: usize,
    clients: usize,
    seconds: u64,
) -> Result<Point> {
    let run = bank::run(
        cluster,
        accounts,
        clients,
        Duration::from_secs(seconds),
        clients as u64,
        Arc::new(AtomicBool::new(false)),
        Arc::new(Progress::default()),
    )
    .await?;
    let secs = run.elapsed.as_secs_f64().max(1e-9);
    Ok(Point {
        commits_per_s: run.committed as f64 / secs,
        p50_us: run.latency_us.value_at_quantile(0.5) as f64,
        p99_us: run.latency_us.value_at_quantile(0.99) as f64,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kill {
    Cpu,
    Node,
}

/// One takeover as the client sees it: a session commits one-key transactions back to back;
/// the primary (or its node) is SIGKILLed; the time until the first commit whose receipt
/// carries a higher owner epoch. The killed CPUs are restarted and the LSG brought back to
/// normal before the next trial.
async fn takeover_trial(
    local: &LocalCluster,
    cluster: &Cluster,
    kill: Kill,
    trial: usize,
) -> Result<f64> {
    let (primary, epoch) = wait_normal(cluster).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let first_new = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let writer = {
        let (cluster, stop, first_new) =
            (cluster.clone(), Arc::clone(&stop), Arc::clone(&first_new));
        tokio::spawn(async move {
            let session = cluster.session();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let key = format!("bank/t/takeover/{trial:03}/{n:08}");
                let mut t = session.transaction();
                let result = async {
                    t.put(key.as_bytes(), b"x").await?;
                    t.commit().await
                }
                .await;
                if let Ok(c) = result
                    && c.receipt.is_some_and(|r| r.epoch.0 > epoch)
                {
                    if let Ok(mut f) = first_new.lock() {
                        f.get_or_insert_with(Instant::now);
                    }
                    return;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpus: Vec<EndpointId> = match kill {
        Kill::Cpu => vec![primary],
        Kill::Node => local
            .config
            .node(primary.node)
            .context("the primary's node")?
            .endpoints()
            .collect(),
    };
    let killed_wall = std::time::SystemTime::now();
    let killed_at = local.kill_now(&cpus)?;
    let deadline = Instant::now() + WAIT;
    let took = loop {
        if let Some(at) = first_new.lock().ok().and_then(|f| *f) {
            break at.duration_since(killed_at);
        }
        if Instant::now() > deadline {
            stop.store(true, Ordering::Relaxed);
            bail!("no commit on a new primary within {WAIT:?} after killing {cpus:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    stop.store(true, Ordering::Relaxed);
    let _ = writer.await;
    // Where the time went, from the new owner's timeline (wall clock, this host).
    let (owner, status) = wait_owner(cluster, BANK, WAIT, |c, _| !cpus.contains(&c)).await?;
    if let Some(t) = status.takeovers.last() {
        let killed_ms = killed_wall
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let at = |ms: u64| ms.saturating_sub(killed_ms);
        eprintln!(
            "  {owner} took over: detected +{} ms, fenced +{} ms, recovered +{} ms, ready +{} ms ({})",
            at(t.detected_unix_ms),
            at(t.fenced_unix_ms),
            t.recovered_unix_ms.map_or(0, at),
            t.ready_unix_ms.map_or(0, at),
            t.start.as_deref().unwrap_or("?")
        );
    }
    local.start_missing()?;
    Ok(took.as_secs_f64() * 1e3)
}

/// The PostgreSQL baseline: `scripts/pg-standby` and `bench-bank-pg`, if the server is here.
fn postgres(args: &Args, seconds: u64) -> Result<Option<Vec<Value>>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = root.join("scripts/pg-standby");
    // Empty, and handed to the unprivileged server user by the script.
    let dir = tempfile::Builder::new().prefix("duplex-pg-").tempdir()?;
    let pg_dir = dir.path().to_path_buf();
    let (primary_port, standby_port) = (55432u16, 55433u16);
    let started = Command::new(&script)
        .arg("start")
        .arg(&pg_dir)
        .args([primary_port.to_string(), standby_port.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .context("running scripts/pg-standby")?;
    if started.code() == Some(3) {
        eprintln!("PostgreSQL server not installed: no baseline (apt-get install postgresql)");
        return Ok(None);
    }
    let result = (|| {
        if !started.success() {
            bail!("scripts/pg-standby start failed");
        }
        let exe = std::env::current_exe()?;
        let pg_bench = exe.with_file_name("bench-bank-pg");
        let clients: Vec<String> = CLIENTS.iter().map(|c| c.to_string()).collect();
        let out = Command::new(pg_bench)
            .args(["--host", "127.0.0.1", "--port", &primary_port.to_string()])
            .args(["--user", "bench"])
            .args(["--accounts", &args.accounts.to_string()])
            .args(["--clients", &clients.join(",")])
            .args(["--seconds", &seconds.to_string(), "--seed", "1"])
            .output()
            .context("running bench-bank-pg")?;
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            bail!("bench-bank-pg failed");
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["system"] == "postgresql")
            .collect())
    })();
    let _ = Command::new(&script).arg("stop").arg(&pg_dir).status();
    result.map(Some)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let seconds = args.seconds.unwrap_or(if args.quick { 2 } else { 10 });
    let trials = args.trials.unwrap_or(if args.quick { 3 } else { 10 });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut duplex: Vec<(bool, usize, Point)> = Vec::new();
    let mut cpu_ms = Vec::new();
    let mut node_ms = Vec::new();
    for paranoid in [false, true] {
        let mode = if paranoid { "paranoid" } else { "normal" };
        let local = LocalCluster::up(LocalOptions {
            paranoid,
            ..LocalOptions::default()
        })?;
        let result: Result<()> = runtime.block_on(async {
            let cluster = local.connect().await?;
            bank::init(&cluster, args.accounts).await?;
            wait_normal(&cluster).await?;
            for clients in CLIENTS {
                let p = bank_point(&cluster, args.accounts, clients, seconds).await?;
                eprintln!(
                    "duplex {mode:<8} {clients:>2} clients: {:>8.0} commits/s  p50 {:>7.0} µs  p99 {:>7.0} µs",
                    p.commits_per_s, p.p50_us, p.p99_us
                );
                duplex.push((paranoid, clients, p));
            }
            if !paranoid {
                for (kind, samples) in [(Kill::Cpu, &mut cpu_ms), (Kill::Node, &mut node_ms)] {
                    for trial in 0..trials {
                        let ms = takeover_trial(&local, &cluster, kind, trial).await?;
                        eprintln!("takeover after a {kind:?} kill, trial {trial}: {ms:.1} ms");
                        samples.push(ms);
                    }
                }
            }
            cluster.close();
            Ok(())
        });
        if let Err(e) = result {
            eprintln!("{}", local.logs());
            return Err(e);
        }
    }
    let pg = if args.no_postgres {
        None
    } else {
        postgres(&args, seconds)?
    };
    let mut comparisons = Vec::new();
    for (paranoid, clients, p) in &duplex {
        let mode = if *paranoid { "paranoid" } else { "normal" };
        let base = pg.as_ref().and_then(|rows| {
            rows.iter()
                .find(|r| r["clients"].as_u64() == Some(*clients as u64))
                .cloned()
        });
        let (base_cps, base_p99) = base.map_or((0.0, 0.0), |b| {
            (
                b["commits_per_s"].as_f64().unwrap_or(0.0),
                b["p99_us"].as_f64().unwrap_or(0.0),
            )
        });
        comparisons.push(Comparison::new(
            &format!("bank_{mode}_{clients}c_commits_vs_postgres_sync_standby"),
            p.commits_per_s,
            base_cps,
            "commits/s",
            Better::Higher,
        ));
        comparisons.push(Comparison::new(
            &format!("bank_{mode}_{clients}c_p99_vs_postgres_sync_standby"),
            p.p99_us,
            base_p99,
            "us",
            Better::Lower,
        ));
    }
    // Takeover: against the aims (20 ms CPU, 100 ms node on one host); no other system here
    // takes over a process pair.
    let (cpu_p50, cpu_p99) = percentiles(&mut cpu_ms);
    let (node_p50, node_p99) = percentiles(&mut node_ms);
    eprintln!(
        "CPU kill to first commit on the new primary: p50 {cpu_p50:.1} ms, p99 {cpu_p99:.1} ms ({trials} trials)"
    );
    eprintln!(
        "node kill to first commit on the new primary: p50 {node_p50:.1} ms, p99 {node_p99:.1} ms ({trials} trials)"
    );
    comparisons.push(Comparison::new(
        "takeover_cpu_kill_p99_vs_aim_20ms",
        cpu_p99,
        20.0,
        "ms",
        Better::Lower,
    ));
    comparisons.push(Comparison::new(
        "takeover_node_kill_p99_vs_aim_100ms",
        node_p99,
        100.0,
        "ms",
        Better::Lower,
    ));
    print_comparisons(&comparisons);
    Ok(())
}
