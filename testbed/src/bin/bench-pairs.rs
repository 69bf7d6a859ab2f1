//! `scripts/bench pairs [--quick]`: an LSG's process pairs as real processes (`lsg-cpu`), real
//! files and QUIC on loopback, against the machine's own limits measured in the same run.
//!
//! - Commits: transactions of two updates (begin, two puts, commit: four client round trips)
//!   with 1, 8 and 32 in flight (one client session each), in normal state (CPUs 1.0 owner, 1.1
//!   same-node half, 2.0 backup node; a commit is acknowledged when both backups hold it) and
//!   primary-only (no backup node: every commit flushed first). Baseline: the same number of
//!   bare transport round trips (`transport-peer`, the Duplex transport with nothing above it),
//!   five in normal state (four requests, plus the commit's checkpoint to the backups), four
//!   plus one raw 4 KiB `pwrite` + `fdatasync` in primary-only, with the same number in flight.
//!   Latencies at one in flight; throughput at each.
//! - Takeover: SIGKILL of the primary CPU while one session runs transactions, to the first
//!   commit answered by the new primary (its same-node half); baseline: SIGKILL to the client's
//!   failure detector reporting the killed CPU down (what a takeover driven by the detector
//!   would wait for at least). The killed CPU is restarted as a backup and the pair back in
//!   normal state with its same-node half counting before the next round.
//!
//! Prints what it measured, then one JSON line per comparison.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path as FsPath, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use clap::Parser;
use duplex_host::{ClientEndpoint, ClientOptions, Session};
use duplex_owner::{ClientReply, Op};
use duplex_pair::{ClientId, Reply};
use duplex_testbed::bank::{LSG, MARKERS};
use duplex_testbed::cluster::{Cluster, ClusterOptions, KillOnDrop, is_event, is_state};
use duplex_testbed::{Better, Comparison, percentiles, print_comparisons};
use duplex_transport::{EndpointId, PeerAddrs, QuicConfig, QuicTransport, Transport};

const HOME: EndpointId = EndpointId::new(1, 0);
const HOME_BACKUP: EndpointId = EndpointId::new(1, 1);
const REMOTE: EndpointId = EndpointId::new(2, 0);
const ECHO: EndpointId = EndpointId::new(2, 9);
/// Client endpoints of the baseline runs: 0.40 and up (the echo lists them).
const BASELINE_CLIENTS: u16 = 40;
const IN_FLIGHT: [usize; 3] = [1, 8, 32];
const VALUE_BYTES: usize = 100;
const WAIT: Duration = Duration::from_secs(20);

#[derive(Parser, Debug)]
struct Args {
    /// A shorter run (under a minute in all).
    #[arg(long)]
    quick: bool,
}

#[derive(Debug, Clone, Copy)]
struct Sizes {
    warmup: Duration,
    measure: Duration,
    takeover_rounds: usize,
}

/// One finished transaction.
#[derive(Debug, Clone, Copy)]
struct Sample {
    done: Instant,
    latency_us: f64,
    /// The CPU that answered the commit.
    by: EndpointId,
}

/// What a load run's sessions do.
#[derive(Debug, Clone)]
enum Work {
    /// Two-update transactions against the LSG.
    Pairs { cpus: Vec<(EndpointId, PeerAddrs)> },
    /// `round_trips` echo round trips, then (if given) a 4 KiB write and fdatasync to the file.
    Baseline {
        echo: SocketAddr,
        round_trips: usize,
        sync_to: Option<Arc<File>>,
    },
}

/// Sessions running on a thread of their own (with their own runtime) until stopped.
struct LoadRun {
    stop: Arc<AtomicBool>,
    samples: mpsc::Receiver<Sample>,
    endpoint: Option<ClientEndpoint>,
    thread: Option<JoinHandle<Result<Vec<Sample>>>>,
}

impl LoadRun {
    fn start(certs: PathBuf, endpoint: EndpointId, sessions: usize, work: Work) -> Result<LoadRun> {
        let stop = Arc::new(AtomicBool::new(false));
        let (sample_tx, samples) = mpsc::channel();
        let (ep_tx, ep_rx) = mpsc::channel();
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("load".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(run_load(
                    certs, endpoint, sessions, work, flag, sample_tx, ep_tx,
                ))
            })?;
        let endpoint = ep_rx.recv_timeout(WAIT).ok().flatten();
        Ok(LoadRun {
            stop,
            samples,
            endpoint,
            thread: Some(thread),
        })
    }

    fn finish(mut self) -> Result<Vec<Sample>> {
        self.stop.store(true, Ordering::Release);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => bail!("the load thread panicked"),
            None => bail!("finished twice"),
        }
    }
}

impl Drop for LoadRun {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

async fn run_load(
    certs: PathBuf,
    local: EndpointId,
    sessions: usize,
    work: Work,
    stop: Arc<AtomicBool>,
    samples: mpsc::Sender<Sample>,
    endpoint_out: mpsc::Sender<Option<ClientEndpoint>>,
) -> Result<Vec<Sample>> {
    let creds = duplex_testbed::cluster::credentials(&certs, local)?;
    let config = QuicConfig::new(local, "127.0.0.1:0".parse()?, creds);
    let mut tasks = Vec::new();
    match work {
        Work::Pairs { cpus } => {
            let endpoint =
                ClientEndpoint::bind(config, LSG, &cpus, ClientOptions::default()).await?;
            let _ = endpoint_out.send(Some(endpoint.clone()));
            endpoint
                .wait_for_primary(WAIT)
                .await
                .context("no primary announced itself")?;
            for i in 0..sessions {
                let id = ClientId(u64::from(local.cpu) * 10_000 + i as u64);
                let session = endpoint.session(id);
                let (stop, samples) = (Arc::clone(&stop), samples.clone());
                tasks.push(tokio::spawn(pair_session(session, stop, samples)));
            }
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await??);
            }
            endpoint.close();
            Ok(all)
        }
        Work::Baseline {
            echo,
            round_trips,
            sync_to,
        } => {
            let _ = endpoint_out.send(None);
            let transport = QuicTransport::bind(config).await?;
            transport.add_peer(
                ECHO,
                PeerAddrs {
                    main: echo,
                    failsafe: None,
                },
            );
            let mut tasks = Vec::new();
            for i in 0..sessions {
                let (t, stop, samples) = (transport.clone(), Arc::clone(&stop), samples.clone());
                let sync_to = sync_to.clone();
                tasks.push(tokio::spawn(async move {
                    baseline_session(t, i, round_trips, sync_to, stop, samples).await
                }));
            }
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await??);
            }
            transport.close();
            Ok(all)
        }
    }
}

async fn pair_session(
    session: Session,
    stop: Arc<AtomicBool>,
    samples: mpsc::Sender<Sample>,
) -> Result<Vec<Sample>> {
    let keys = [
        format!("s{}a", session.id().0).into_bytes(),
        format!("s{}b", session.id().0).into_bytes(),
    ];
    let value = vec![7u8; VALUE_BYTES];
    let mut all = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let t0 = Instant::now();
        // Until it commits: a takeover may lose the transaction (begun again).
        let by = loop {
            if stop.load(Ordering::Acquire) {
                return Ok(all);
            }
            let began = session.request(None, Op::Begin).await?;
            let ClientReply::Began(tx) = began.reply else {
                continue;
            };
            let mut written = true;
            for key in &keys {
                let a = session
                    .request(
                        Some(tx),
                        Op::Put {
                            volume: MARKERS.into(),
                            key: key.clone(),
                            value: value.clone(),
                        },
                    )
                    .await?;
                written &= a.reply == ClientReply::Written;
            }
            if !written {
                let _ = session.request(Some(tx), Op::Abort).await;
                continue;
            }
            let a = session.request(Some(tx), Op::Commit).await?;
            if matches!(a.reply, ClientReply::Outcome(Reply::Committed(_))) {
                break a.from;
            }
        };
        let s = Sample {
            done: Instant::now(),
            latency_us: t0.elapsed().as_secs_f64() * 1e6,
            by,
        };
        let _ = samples.send(s);
        all.push(s);
    }
    Ok(all)
}

async fn baseline_session(
    t: QuicTransport,
    slot: usize,
    round_trips: usize,
    sync_to: Option<Arc<File>>,
    stop: Arc<AtomicBool>,
    samples: mpsc::Sender<Sample>,
) -> Result<Vec<Sample>> {
    let msg = Bytes::from(vec![7u8; VALUE_BYTES + 40]);
    let block = Arc::new(vec![9u8; 4096]);
    // Wait for the link: the first call fails while the peer is not up yet.
    let deadline = Instant::now() + WAIT;
    while t
        .call(ECHO, msg.clone(), Duration::from_secs(1))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("the echo peer never answered");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut all = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let t0 = Instant::now();
        for _ in 0..round_trips {
            t.call(ECHO, msg.clone(), Duration::from_secs(5)).await?;
        }
        if let Some(file) = &sync_to {
            let (file, block) = (Arc::clone(file), Arc::clone(&block));
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                file.write_all_at(&block, (slot * 4096) as u64)?;
                file.sync_data()
            })
            .await??;
        }
        let s = Sample {
            done: Instant::now(),
            latency_us: t0.elapsed().as_secs_f64() * 1e6,
            by: ECHO,
        };
        let _ = samples.send(s);
        all.push(s);
    }
    Ok(all)
}

/// Runs `sessions` sessions of `work` for warm-up plus the measured window; returns the
/// transactions per second and the latencies (us) of those finished inside the window.
fn measure(
    certs: &FsPath,
    endpoint: EndpointId,
    sessions: usize,
    work: Work,
    sizes: Sizes,
) -> Result<(f64, Vec<f64>)> {
    let run = LoadRun::start(certs.to_path_buf(), endpoint, sessions, work)?;
    // The window is timed: these sleeps are what is measured, not waits for an event.
    std::thread::sleep(sizes.warmup);
    let from = Instant::now();
    std::thread::sleep(sizes.measure);
    let to = Instant::now();
    let samples = run.finish()?;
    let window: Vec<f64> = samples
        .iter()
        .filter(|s| s.done >= from && s.done <= to)
        .map(|s| s.latency_us)
        .collect();
    let rate = window.len() as f64 / (to - from).as_secs_f64();
    Ok((rate, window))
}

/// A `transport-peer` echo (endpoint 2.9) that accepts the baseline clients.
fn spawn_echo(certs: &FsPath) -> Result<(KillOnDrop, SocketAddr)> {
    let exe = std::env::current_exe()?.with_file_name("transport-peer");
    let mut cmd = Command::new(&exe);
    cmd.args([
        "--node",
        &ECHO.node.to_string(),
        "--cpu",
        &ECHO.cpu.to_string(),
    ])
    .arg("--certs")
    .arg(certs);
    for c in BASELINE_CLIENTS..BASELINE_CLIENTS + 20 {
        // The echo only accepts (its id is higher): the address is never dialled.
        cmd.args(["--peer", &format!("0.{c}=127.0.0.1:9")]);
    }
    let mut child = KillOnDrop(
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {}", exe.display()))?,
    );
    let stdout = child.0.stdout.take().context("piped stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(first)) = lines.next() {
            let _ = tx.send(first);
        }
        for _ in lines {}
    });
    let first = rx
        .recv_timeout(WAIT)
        .context("the echo printed no address")?;
    let v: serde_json::Value = serde_json::from_str(&first)?;
    let addr = v["main"].as_str().context("no main address")?.parse()?;
    Ok((child, addr))
}

struct Bench {
    sizes: Sizes,
    bin: PathBuf,
    comparisons: Vec<Comparison>,
    next_client: u16,
    next_baseline: u16,
}

impl Bench {
    fn client_id(&mut self) -> EndpointId {
        self.next_client += 1;
        EndpointId::new(0, self.next_client)
    }

    fn baseline_id(&mut self) -> EndpointId {
        self.next_baseline += 1;
        EndpointId::new(0, BASELINE_CLIENTS + self.next_baseline - 1)
    }

    fn cluster(&self, cpus: Vec<EndpointId>) -> Result<Cluster> {
        let mut c = Cluster::new(ClusterOptions {
            bin: self.bin.clone(),
            cpus: cpus.clone(),
            accounts: 0,
            paranoid: false,
            echo: std::env::var_os("BENCH_ECHO").is_some(),
        })?;
        c.spawn(HOME, "create-and-own")?;
        for id in cpus.iter().filter(|c| **c != HOME) {
            c.spawn(*id, "backup")?;
        }
        Ok(c)
    }

    /// Commits with 1, 8 and 32 in flight against the baseline of `round_trips` echoes (and
    /// a sync when `sync_to`), alternating.
    fn commits(
        &mut self,
        label: &str,
        cluster: &Cluster,
        echo: SocketAddr,
        round_trips: usize,
        sync_to: Option<Arc<File>>,
    ) -> Result<()> {
        for k in IN_FLIGHT {
            let base_id = self.baseline_id();
            let (base_rate, mut base_lat) = measure(
                &cluster.certs,
                base_id,
                k,
                Work::Baseline {
                    echo,
                    round_trips,
                    sync_to: sync_to.clone(),
                },
                self.sizes,
            )?;
            let our_id = self.client_id();
            let (our_rate, mut our_lat) = measure(
                &cluster.certs,
                our_id,
                k,
                Work::Pairs {
                    cpus: cluster.cpu_addrs(),
                },
                self.sizes,
            )?;
            let (bp50, bp99) = percentiles(&mut base_lat);
            let (op50, op99) = percentiles(&mut our_lat);
            println!(
                "{label}, {k} in flight: duplex {our_rate:.0} commits/s (p50 {op50:.0} us, p99 {op99:.0} us); baseline {base_rate:.0}/s (p50 {bp50:.0} us, p99 {bp99:.0} us)"
            );
            self.comparisons.push(Comparison::new(
                &format!("pairs_{label}_2upd_{k}x_commits_per_s"),
                our_rate,
                base_rate,
                "commits/s",
                Better::Higher,
            ));
            if k == 1 {
                self.comparisons.push(Comparison::new(
                    &format!("pairs_{label}_2upd_p50"),
                    op50,
                    bp50,
                    "us",
                    Better::Lower,
                ));
                self.comparisons.push(Comparison::new(
                    &format!("pairs_{label}_2upd_p99"),
                    op99,
                    bp99,
                    "us",
                    Better::Lower,
                ));
            }
        }
        Ok(())
    }

    /// SIGKILL of the primary CPU to the first commit its same-node half answers, against
    /// SIGKILL to the client's detector reporting it down.
    fn takeovers(&mut self, cluster: &mut Cluster) -> Result<()> {
        let id = self.client_id();
        let run = LoadRun::start(
            cluster.certs.clone(),
            id,
            1,
            Work::Pairs {
                cpus: cluster.cpu_addrs(),
            },
        )?;
        let endpoint = run
            .endpoint
            .clone()
            .context("the load run has no client endpoint")?;
        run.samples
            .recv_timeout(WAIT)
            .context("no commit before the first kill")?;
        // Two checkpoint intervals of this load first, so what the backups retain (and a
        // takeover replays) is this workload's, not the heavier runs' before it.
        let settle = Instant::now() + Duration::from_millis(1200);
        while Instant::now() < settle {
            let _ = run.samples.recv_timeout(Duration::from_millis(100));
        }
        let (mut ours, mut detector) = (Vec::new(), Vec::new());
        let mut primary = HOME;
        for round in 0..self.sizes.takeover_rounds {
            let taker = if primary == HOME { HOME_BACKUP } else { HOME };
            let killed_at = cluster.kill(primary)?;
            let owner = cluster
                .proc(taker)?
                .wait_for("takeover", WAIT, |v| is_event(v, "owner"))?;
            let first = loop {
                let s = run
                    .samples
                    .recv_timeout(WAIT)
                    .map_err(|_| anyhow!("round {round}: no commit after the takeover"))?;
                if s.by == taker && s.done > killed_at {
                    break s.done;
                }
            };
            ours.push((first - killed_at).as_secs_f64() * 1e3);
            // The detector's report: bounded by the detection time (300 ms) plus scheduling.
            let deadline = Instant::now() + Duration::from_secs(5);
            let down = loop {
                if let Some((at, _)) = endpoint
                    .downs()
                    .into_iter()
                    .find(|(at, peer)| *peer == primary && *at > killed_at)
                {
                    break at;
                }
                if Instant::now() > deadline {
                    bail!("round {round}: the client never heard {primary} was down");
                }
                std::thread::sleep(Duration::from_millis(2));
            };
            detector.push((down - killed_at).as_secs_f64() * 1e3);
            eprintln!(
                "takeover {round}: {primary} killed, {taker} owner ({}) after {:.1} ms, first commit after {:.1} ms, detector {:.1} ms",
                owner["start"],
                owner["takeover_ms"].as_f64().unwrap_or(0.0),
                ours[round],
                detector[round]
            );
            cluster.spawn(primary, "backup")?;
            cluster
                .proc(taker)?
                .wait_for("normal state with the same-node half", WAIT, |v| {
                    is_state(v, "Normal", true)
                })?;
            // And the client connected to the restarted CPU again, as a client that has run
            // for a while is: the next owner tells it so at once.
            let deadline = Instant::now() + WAIT;
            while !endpoint
                .transport()
                .peer_status(primary)
                .is_some_and(|s| s.up)
            {
                if Instant::now() > deadline {
                    bail!("round {round}: the client never reconnected to {primary}");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            primary = taker;
        }
        drop(run.finish()?);
        let (op50, op99) = percentiles(&mut ours);
        let (dp50, dp99) = percentiles(&mut detector);
        println!(
            "takeover of a SIGKILLed primary CPU ({} rounds): first commit on the new primary p50 {op50:.1} ms p99 {op99:.1} ms; SIGKILL to the detector's down p50 {dp50:.1} ms p99 {dp99:.1} ms",
            self.sizes.takeover_rounds
        );
        self.comparisons.push(Comparison::new(
            "pairs_takeover_kill_cpu_to_commit_p50",
            op50,
            dp50,
            "ms",
            Better::Lower,
        ));
        self.comparisons.push(Comparison::new(
            "pairs_takeover_kill_cpu_to_commit_p99",
            op99,
            dp99,
            "ms",
            Better::Lower,
        ));
        Ok(())
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let sizes = if args.quick {
        Sizes {
            warmup: Duration::from_millis(300),
            measure: Duration::from_millis(1500),
            takeover_rounds: 5,
        }
    } else {
        Sizes {
            warmup: Duration::from_millis(500),
            measure: Duration::from_secs(5),
            takeover_rounds: 20,
        }
    };
    let mut bench = Bench {
        sizes,
        bin: std::env::current_exe()?.with_file_name("lsg-cpu"),
        comparisons: Vec::new(),
        next_client: 0,
        next_baseline: 0,
    };

    let mut normal = bench.cluster(vec![HOME, HOME_BACKUP, REMOTE])?;
    normal
        .proc(HOME)?
        .wait_for("normal state", WAIT, |v| is_state(v, "Normal", true))?;
    // The echo trusts the cluster's CA: one per cluster directory.
    let (echo, echo_addr) = spawn_echo(&normal.certs)?;
    let mut rtt = measure(
        &normal.certs,
        bench.baseline_id(),
        1,
        Work::Baseline {
            echo: echo_addr,
            round_trips: 1,
            sync_to: None,
        },
        sizes,
    )?
    .1;
    let (rtt50, rtt99) = percentiles(&mut rtt);
    println!("bare transport round trip: p50 {rtt50:.1} us, p99 {rtt99:.1} us");
    bench.commits("normal", &normal, echo_addr, 5, None)?;
    bench.takeovers(&mut normal)?;
    drop(echo);
    drop(normal);

    let primary_only = bench.cluster(vec![HOME, HOME_BACKUP])?;
    primary_only
        .proc(HOME)?
        .wait_for("primary-only state", WAIT, |v| {
            is_state(v, "PrimaryOnly", true)
        })?;
    let (_echo, echo_addr) = spawn_echo(&primary_only.certs)?;
    let sync_file = {
        let path = primary_only.data.join("baseline-sync");
        let f = File::create(&path)?;
        // Preallocated and synced, so the measured syncs write data, not metadata.
        f.write_all_at(&vec![0u8; 4096 * 64], 0)?;
        f.sync_all()?;
        Arc::new(f)
    };
    let mut sync = measure(
        &primary_only.certs,
        bench.baseline_id(),
        1,
        Work::Baseline {
            echo: echo_addr,
            round_trips: 0,
            sync_to: Some(Arc::clone(&sync_file)),
        },
        sizes,
    )?
    .1;
    let (s50, s99) = percentiles(&mut sync);
    println!("raw 4 KiB pwrite + fdatasync: p50 {s50:.1} us, p99 {s99:.1} us");
    bench.commits("primary_only", &primary_only, echo_addr, 4, Some(sync_file))?;
    drop(primary_only);

    print_comparisons(&bench.comparisons);
    Ok(())
}
