//! `scripts/bench transport [--quick]`: the Duplex transport against bare quinn, side by side in
//! one run, both between two OS processes on loopback with the same TLS and the same runtime
//! layout (a current-thread tokio runtime in each process).
//!
//! Measures: request/response round trips (sequential), pipelined one-way throughput with 64
//! messages in flight (the receiver answers each with 8 bytes), the time from SIGKILL of a
//! peer to its down event (baseline: bare quinn's idle timeout set to the same detection time),
//! and a 100-byte round trip while 16 MiB messages stream on the same link, one always in
//! flight (baseline: the same round trip on the idle link, measured in alternating blocks).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path as FsPath;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use duplex_testbed::{Better, Comparison, percentiles, print_comparisons};
use duplex_transport::certs::{
    NodeCredentials, QuicTiming, ensure_cluster_certs, node_server_name, quinn_configs,
};
use duplex_transport::{
    DetectorConfig, EndpointId, Event, PeerAddrs, PeerEvent, QuicConfig, QuicTransport, Transport,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::Rng;

const LOCAL: EndpointId = EndpointId::new(1, 0);
const ECHO_NODE: u16 = 2;
const WINDOW: usize = 64;
const DETECTION_MS: u64 = 300;
const KILL_ROUNDS: u16 = 20;
const RTT_BLOCK: usize = 500;
const THROUGHPUT_BLOCKS: usize = 5;

#[derive(Parser, Debug)]
struct Args {
    /// A shorter run (under a minute in all).
    #[arg(long)]
    quick: bool,
}

/// A child process killed when dropped.
struct Guard {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(bin: &str, args: &[String]) -> Result<Guard> {
    let exe = std::env::current_exe()?.with_file_name(bin);
    let mut child = Command::new(&exe)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawning {}", exe.display()))?;
    let stdout = child.stdout.take().context("piped stdout")?;
    let mut guard = Guard {
        child,
        addr: "0.0.0.0:0".parse()?,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        // Keep draining so the child never blocks on a full pipe.
        let mut sink = String::new();
        while reader.read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(10))
        .context("child printed no address")?;
    let v: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("child said {line:?}"))?;
    guard.addr = v["main"].as_str().context("no main address")?.parse()?;
    Ok(guard)
}

/// Arguments of a `transport-peer` of `node` with `local` (ours) in its cluster list.
fn peer_args(certs: &FsPath, node: u16, local: SocketAddr) -> Vec<String> {
    vec![
        "--node".into(),
        node.to_string(),
        "--certs".into(),
        certs.display().to_string(),
        "--detection-time-ms".into(),
        DETECTION_MS.to_string(),
        "--peer".into(),
        format!("{LOCAL}={local}"),
    ]
}

struct Sizes {
    rtt_calls: usize,
    throughput_messages: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

fn mb_per_s(msgs_per_s: f64, size_bytes: usize) -> f64 {
    msgs_per_s * size_bytes as f64 / 1e6
}

async fn run(args: Args) -> Result<()> {
    let certs = tempfile::tempdir()?;
    let kill_nodes: Vec<u16> = (0..KILL_ROUNDS).map(|i| 100 + i).collect();
    let mut nodes = vec![LOCAL.node, ECHO_NODE];
    nodes.extend(&kill_nodes);
    ensure_cluster_certs(certs.path(), &nodes)?;
    let creds = NodeCredentials::load(certs.path(), LOCAL.node)?;

    let echo = spawn(
        "transport-echo-quinn",
        &[
            "--node".into(),
            ECHO_NODE.to_string(),
            "--certs".into(),
            certs.path().display().to_string(),
        ],
    )?;
    let mut config = QuicConfig::new(LOCAL, "127.0.0.1:0".parse()?, creds.clone());
    config.detector = DetectorConfig::with_detection_time_ms(DETECTION_MS);
    let ours = QuicTransport::bind(config).await?;
    let local_addr = ours.local_addrs()?.main;
    let peer = spawn(
        "transport-peer",
        &peer_args(certs.path(), ECHO_NODE, local_addr),
    )?;

    let (_, client_config) = quinn_configs(
        &creds,
        QuicTiming {
            idle_timeout_ms: 1200,
            keep_alive_interval_ms: Some(50),
        },
    )?;
    let mut bare = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    bare.set_default_client_config(client_config);
    let conn = bare
        .connect(echo.addr, &node_server_name(ECHO_NODE))?
        .await?;

    let peer_id = EndpointId::new(ECHO_NODE, 0);
    ours.add_peer(
        peer_id,
        PeerAddrs {
            main: peer.addr,
            failsafe: None,
        },
    );
    wait_for(
        &ours,
        Duration::from_secs(10),
        |e| matches!(e, Event::Peer(PeerEvent::Up { peer, .. }) if *peer == peer_id),
    )
    .await?;

    let sizes = if args.quick {
        Sizes {
            rtt_calls: 5_000,
            throughput_messages: 30_000,
        }
    } else {
        Sizes {
            rtt_calls: 20_000,
            throughput_messages: 200_000,
        }
    };
    let mut comparisons = Vec::new();
    for (size_bytes, label) in [(100usize, "100B"), (4096, "4KiB")] {
        // Warm up both paths so neither pays connection or allocation start-up.
        bare_rtt(&conn, size_bytes, 500).await?;
        ours_rtt(&ours, peer_id, size_bytes, 500).await?;
        // Alternate blocks so both sides see the same background load.
        let (mut bare_samples, mut our_samples) = (Vec::new(), Vec::new());
        for _ in 0..sizes.rtt_calls / RTT_BLOCK {
            bare_samples.extend(bare_rtt(&conn, size_bytes, RTT_BLOCK).await?);
            our_samples.extend(ours_rtt(&ours, peer_id, size_bytes, RTT_BLOCK).await?);
        }
        let (bp50, bp99) = percentiles(&mut bare_samples);
        let (op50, op99) = percentiles(&mut our_samples);
        println!(
            "round trip {label}: duplex p50 {op50:.1} us p99 {op99:.1} us; bare quinn p50 {bp50:.1} us p99 {bp99:.1} us ({} calls)",
            sizes.rtt_calls
        );
        comparisons.push(Comparison::new(
            &format!("transport_rtt_{label}_p50"),
            op50,
            bp50,
            "us",
            Better::Lower,
        ));
        comparisons.push(Comparison::new(
            &format!("transport_rtt_{label}_p99"),
            op99,
            bp99,
            "us",
            Better::Lower,
        ));

        let n = if size_bytes > 1000 {
            sizes.throughput_messages / 2
        } else {
            sizes.throughput_messages
        };
        let (mut bare_s, mut ours_s) = (0.0, 0.0);
        for _ in 0..THROUGHPUT_BLOCKS {
            bare_s += bare_throughput(&conn, size_bytes, n / THROUGHPUT_BLOCKS).await?;
            ours_s += ours_throughput(&ours, peer_id, size_bytes, n / THROUGHPUT_BLOCKS).await?;
        }
        let done = (n / THROUGHPUT_BLOCKS * THROUGHPUT_BLOCKS) as f64;
        let (bare_rate, our_rate) = (done / bare_s, done / ours_s);
        println!(
            "pipelined one-way {label}, {WINDOW} in flight: duplex {our_rate:.0} msgs/s ({:.1} MB/s); bare quinn {bare_rate:.0} msgs/s ({:.1} MB/s) ({n} messages)",
            mb_per_s(our_rate, size_bytes),
            mb_per_s(bare_rate, size_bytes)
        );
        comparisons.push(Comparison::new(
            &format!("transport_oneway_{label}_msgs_per_s"),
            our_rate,
            bare_rate,
            "msgs/s",
            Better::Higher,
        ));
        comparisons.push(Comparison::new(
            &format!("transport_oneway_{label}_mb_per_s"),
            mb_per_s(our_rate, size_bytes),
            mb_per_s(bare_rate, size_bytes),
            "MB/s",
            Better::Higher,
        ));
    }
    conn.close(0u32.into(), b"done");

    let calls = sizes.rtt_calls / 5;
    let (with_bulk, idle) = rtt_beside_bulk(&ours, peer_id, calls).await?;
    let (mut with_bulk, mut idle) = (with_bulk, idle);
    let (wp50, wp99) = percentiles(&mut with_bulk);
    let (ip50, ip99) = percentiles(&mut idle);
    println!(
        "round trip 100B beside 16 MiB messages: p50 {wp50:.1} us p99 {wp99:.1} us; idle link p50 {ip50:.1} us p99 {ip99:.1} us ({calls} calls each)"
    );
    comparisons.push(Comparison::new(
        "transport_rtt_100B_beside_16MiB_p50",
        wp50,
        ip50,
        "us",
        Better::Lower,
    ));
    comparisons.push(Comparison::new(
        "transport_rtt_100B_beside_16MiB_p99",
        wp99,
        ip99,
        "us",
        Better::Lower,
    ));

    let mut our_kill = Vec::new();
    let mut bare_kill = Vec::new();
    for &node in &kill_nodes {
        our_kill.push(ours_kill_to_down(&ours, certs.path(), node, local_addr).await?);
        bare_kill.push(bare_kill_to_close(&bare, certs.path(), node).await?);
    }
    let (op50, op99) = percentiles(&mut our_kill);
    let (bp50, bp99) = percentiles(&mut bare_kill);
    println!(
        "SIGKILL to down ({DETECTION_MS} ms detection, {KILL_ROUNDS} kills): duplex p50 {:.1} ms p99 {:.1} ms; bare quinn idle timeout p50 {:.1} ms p99 {:.1} ms",
        op50 / 1e3,
        op99 / 1e3,
        bp50 / 1e3,
        bp99 / 1e3
    );
    comparisons.push(Comparison::new(
        "transport_kill_to_down_p50",
        op50 / 1e3,
        bp50 / 1e3,
        "ms",
        Better::Lower,
    ));
    comparisons.push(Comparison::new(
        "transport_kill_to_down_p99",
        op99 / 1e3,
        bp99 / 1e3,
        "ms",
        Better::Lower,
    ));
    ours.close();
    drop(peer);
    drop(echo);
    print_comparisons(&comparisons);
    Ok(())
}

async fn wait_for(
    t: &QuicTransport,
    limit: Duration,
    want: impl Fn(&Event) -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let left = limit
            .checked_sub(start.elapsed())
            .context("timed out waiting for an event")?;
        match tokio::time::timeout(left, t.next_event()).await {
            Ok(Some(e)) if want(&e) => return Ok(start.elapsed()),
            Ok(Some(_)) => {}
            Ok(None) => bail!("endpoint closed"),
            Err(_) => bail!("timed out waiting for an event"),
        }
    }
}

async fn open_bare_stream(
    conn: &quinn::Connection,
    mode: u8,
    size_bytes: usize,
) -> Result<(quinn::SendStream, quinn::RecvStream)> {
    let (mut send, recv) = conn.open_bi().await?;
    let mut header = vec![mode];
    header.extend_from_slice(&(size_bytes as u64).to_le_bytes());
    send.write_all(&header).await?;
    Ok((send, recv))
}

async fn bare_rtt(conn: &quinn::Connection, size_bytes: usize, calls: usize) -> Result<Vec<f64>> {
    let (mut send, mut recv) = open_bare_stream(conn, 0, size_bytes).await?;
    let msg = vec![7u8; size_bytes];
    let mut buf = vec![0u8; size_bytes];
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t0 = Instant::now();
        send.write_all(&msg).await?;
        recv.read_exact(&mut buf).await?;
        samples.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    if buf != msg {
        bail!("bare echo returned different bytes");
    }
    Ok(samples)
}

async fn ours_rtt(
    t: &QuicTransport,
    peer: EndpointId,
    size_bytes: usize,
    calls: usize,
) -> Result<Vec<f64>> {
    let msg = Bytes::from(vec![7u8; size_bytes]);
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t0 = Instant::now();
        let answer = t.call(peer, msg.clone(), Duration::from_secs(5)).await?;
        samples.push(t0.elapsed().as_secs_f64() * 1e6);
        if answer.len() != size_bytes {
            bail!(
                "duplex echo returned {} bytes, expected {size_bytes}",
                answer.len()
            );
        }
    }
    Ok(samples)
}

/// 100-byte round trips in alternating blocks: while 16 MiB messages stream to the peer on
/// the same link (the next one sent when the peer acknowledges the last, so one is always in
/// flight), and on the idle link. Returns (beside the messages, idle) in microseconds.
async fn rtt_beside_bulk(
    t: &QuicTransport,
    peer: EndpointId,
    calls: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    const BULK_BYTES: usize = 16 << 20;
    let bulk = Bytes::from(vec![3u8; BULK_BYTES]);
    let (mut beside, mut idle) = (Vec::new(), Vec::new());
    let blocks = (calls / RTT_BLOCK).max(1);
    for _ in 0..blocks {
        idle.extend(ours_rtt(t, peer, 100, RTT_BLOCK).await?);
        t.send(peer, bulk.clone())?;
        let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
        let pump = {
            let t = t.clone();
            let bulk = bulk.clone();
            tokio::spawn(async move {
                let mut sent = 1u64;
                loop {
                    tokio::select! {
                        _ = &mut done_rx => return Ok(sent),
                        event = tokio::time::timeout(Duration::from_secs(10), t.next_event()) => match event {
                            Ok(Some(Event::Message { from, .. })) if from == peer => {
                                t.send(peer, bulk.clone())?;
                                sent += 1;
                            }
                            Ok(Some(_)) => {}
                            Ok(None) => bail!("endpoint closed"),
                            Err(_) => bail!("no acknowledgement of a 16 MiB message within 10 s"),
                        },
                    }
                }
            })
        };
        beside.extend(ours_rtt(t, peer, 100, RTT_BLOCK).await?);
        let _ = done_tx.send(());
        let sent = pump.await??;
        // Let the last message's acknowledgement arrive before the next idle block.
        wait_for(
            t,
            Duration::from_secs(10),
            |e| matches!(e, Event::Message { from, .. } if *from == peer),
        )
        .await?;
        if sent == 0 {
            bail!("no 16 MiB message was in flight");
        }
    }
    Ok((beside, idle))
}

/// Seconds to move `messages` messages with `WINDOW` in flight.
async fn bare_throughput(
    conn: &quinn::Connection,
    size_bytes: usize,
    messages: usize,
) -> Result<f64> {
    let (mut send, mut recv) = open_bare_stream(conn, 1, size_bytes).await?;
    let msg = vec![7u8; size_bytes];
    let mut ack = [0u8; 8];
    let (mut sent, mut acked) = (0usize, 0usize);
    let t0 = Instant::now();
    while acked < messages {
        while sent < messages && sent - acked < WINDOW {
            send.write_all(&msg).await?;
            sent += 1;
        }
        recv.read_exact(&mut ack).await?;
        acked += 1;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Seconds to move `messages` messages with `WINDOW` in flight.
async fn ours_throughput(
    t: &QuicTransport,
    peer: EndpointId,
    size_bytes: usize,
    messages: usize,
) -> Result<f64> {
    let msg = Bytes::from(vec![7u8; size_bytes]);
    let (mut sent, mut acked) = (0usize, 0usize);
    let t0 = Instant::now();
    while acked < messages {
        while sent < messages && sent - acked < WINDOW {
            t.send(peer, msg.clone())?;
            sent += 1;
        }
        match tokio::time::timeout(Duration::from_secs(5), t.next_event()).await {
            Ok(Some(Event::Message { from, .. })) if from == peer => acked += 1,
            Ok(Some(_)) => {}
            Ok(None) => bail!("endpoint closed"),
            Err(_) => bail!("no ack within 5 s ({acked} of {messages})"),
        }
    }
    Ok(t0.elapsed().as_secs_f64())
}

async fn ours_kill_to_down(
    t: &QuicTransport,
    certs: &FsPath,
    node: u16,
    local: SocketAddr,
) -> Result<f64> {
    let victim = spawn("transport-peer", &peer_args(certs, node, local))?;
    let id = EndpointId::new(node, 0);
    t.add_peer(
        id,
        PeerAddrs {
            main: victim.addr,
            failsafe: None,
        },
    );
    wait_for(
        t,
        Duration::from_secs(10),
        |e| matches!(e, Event::Peer(PeerEvent::Up { peer, .. }) if *peer == id),
    )
    .await?;
    steady_state_pause().await;
    let t0 = Instant::now();
    kill(Pid::from_raw(victim.child.id() as i32), Signal::SIGKILL)?;
    wait_for(
        t,
        Duration::from_secs(5),
        |e| matches!(e, Event::Peer(PeerEvent::Down { peer, .. }) if *peer == id),
    )
    .await?;
    Ok(t0.elapsed().as_secs_f64() * 1e6)
}

/// Lets keep-alives flow for a while, and kills at a random point of the keep-alive interval
/// so the measurement does not line up with the keep-alive timer.
async fn steady_state_pause() {
    let jitter_ms = rand::rng().random_range(0..DETECTION_MS / 6);
    tokio::time::sleep(Duration::from_millis(100 + jitter_ms)).await;
}

async fn bare_kill_to_close(bare: &quinn::Endpoint, certs: &FsPath, node: u16) -> Result<f64> {
    let timing = [
        "--idle-timeout-ms".to_string(),
        DETECTION_MS.to_string(),
        "--keep-alive-interval-ms".into(),
        (DETECTION_MS / 6).to_string(),
    ];
    let mut args = vec![
        "--node".to_string(),
        node.to_string(),
        "--certs".into(),
        certs.display().to_string(),
    ];
    args.extend(timing);
    let victim = spawn("transport-echo-quinn", &args)?;
    let creds = NodeCredentials::load(certs, LOCAL.node)?;
    let (_, client_config) = quinn_configs(
        &creds,
        QuicTiming {
            idle_timeout_ms: DETECTION_MS,
            keep_alive_interval_ms: Some(DETECTION_MS / 6),
        },
    )?;
    let conn = bare
        .connect_with(client_config, victim.addr, &node_server_name(node))?
        .await?;
    let (mut send, mut recv) = open_bare_stream(&conn, 0, 8).await?;
    send.write_all(&[1u8; 8]).await?;
    let mut buf = [0u8; 8];
    recv.read_exact(&mut buf).await?;
    steady_state_pause().await;
    let t0 = Instant::now();
    kill(Pid::from_raw(victim.child.id() as i32), Signal::SIGKILL)?;
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .context("bare quinn never noticed")?;
    let took = t0.elapsed().as_secs_f64() * 1e6;
    if !matches!(closed, quinn::ConnectionError::TimedOut) {
        bail!("bare quinn connection ended by {closed}, expected an idle timeout");
    }
    Ok(took)
}
