//! The QUIC transport between real OS processes: request/response, messages and streams;
//! SIGKILL, partitions and a cut main link seen by failure detection; and bad input (malformed,
//! oversized and unknown frames, unknown versions, foreign certificates) closing only the
//! offending connection.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use duplex_transport::certs::{
    ClusterCa, NodeCredentials, QuicTiming, ensure_cluster_certs, node_server_name, quinn_configs,
};
use duplex_transport::quic::close_code;
use duplex_transport::wire::{Frame, Hello, StreamId};
use duplex_transport::{
    DetectorConfig, EndpointId, Event, Path, PeerAddrs, PeerEvent, QuicConfig, QuicTransport,
    Transport,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const LOCAL: EndpointId = EndpointId::new(1, 0);
const PEER: EndpointId = EndpointId::new(2, 0);
const DETECTION_MS: u64 = 300;

/// A child process that is SIGKILLed when the guard drops, whatever the test did.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `transport-peer` process, killed when dropped (through its `KillOnDrop`).
struct PeerProcess {
    child: KillOnDrop,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    addrs: PeerAddrs,
}

impl PeerProcess {
    /// A peer process with `local` (the test's endpoint) in its cluster list.
    fn spawn(certs: &std::path::Path, node: u16, local: PeerAddrs, extra: &[&str]) -> PeerProcess {
        let member = match local.failsafe {
            Some(f) => format!("{LOCAL}={},{f}", local.main),
            None => format!("{LOCAL}={}", local.main),
        };
        // The guard exists from the moment the process does, so no failed expect below can
        // leave it running.
        let mut child = KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_transport-peer"))
                .args(["--node", &node.to_string(), "--certs"])
                .arg(certs)
                .args(["--detection-time-ms", &DETECTION_MS.to_string()])
                .args(["--peer", &member])
                .args(extra)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn transport-peer"),
        );
        let stdin = child.0.stdin.take().expect("piped stdin");
        let stdout = child.0.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let first = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("peer prints its addresses");
        let v: serde_json::Value = serde_json::from_str(&first).expect("addresses are JSON");
        let addr = |k: &str| {
            v[k].as_str()
                .map(|s| s.parse::<SocketAddr>().expect("socket address"))
        };
        let addrs = PeerAddrs {
            main: addr("main").expect("main address"),
            failsafe: addr("failsafe"),
        };
        PeerProcess {
            child,
            stdin,
            lines,
            addrs,
        }
    }

    fn command(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write command");
        self.stdin.flush().expect("flush command");
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.0.id() as i32)
    }
}

fn certs_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    ensure_cluster_certs(dir.path(), &[1, 2, 3]).expect("cluster certs");
    dir
}

async fn local(certs: &std::path::Path, failsafe: bool) -> QuicTransport {
    let creds = NodeCredentials::load(certs, LOCAL.node).expect("credentials");
    let mut config = QuicConfig::new(LOCAL, "127.0.0.1:0".parse().expect("addr"), creds);
    config.detector = DetectorConfig::with_detection_time_ms(DETECTION_MS);
    if failsafe {
        config.failsafe_bind = Some("127.0.0.1:0".parse().expect("addr"));
    }
    QuicTransport::bind(config).await.expect("bind")
}

/// Waits for the first event matching `want`, returning it with the time it took.
async fn wait_event(
    t: &QuicTransport,
    limit: Duration,
    want: impl Fn(&Event) -> bool,
) -> Option<(Event, Duration)> {
    let start = Instant::now();
    loop {
        let left = limit.checked_sub(start.elapsed())?;
        match tokio::time::timeout(left, t.next_event()).await {
            Ok(Some(e)) if want(&e) => return Some((e, start.elapsed())),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return None,
        }
    }
}

async fn connected_pair(failsafe: bool) -> (tempfile::TempDir, QuicTransport, PeerProcess) {
    let certs = certs_dir();
    let t = local(certs.path(), failsafe).await;
    let peer = PeerProcess::spawn(
        certs.path(),
        PEER.node,
        t.local_addrs().expect("addrs"),
        if failsafe { &["--failsafe"] } else { &[] },
    );
    t.add_peer(PEER, peer.addrs);
    let up = wait_event(&t, Duration::from_secs(10), |e| {
        matches!(e, Event::Peer(PeerEvent::Up { peer: PEER, .. }))
    })
    .await;
    assert!(up.is_some(), "peer came up");
    (certs, t, peer)
}

/// Calls the peer (an echo) and checks the answer.
async fn assert_echoed(t: &QuicTransport, message: &'static [u8]) {
    let answer = t
        .call(PEER, Bytes::from_static(message), Duration::from_secs(2))
        .await
        .expect("call");
    assert_eq!(&answer[..], message);
}

#[tokio::test]
async fn request_response_messages_and_streams_between_processes() {
    let (_certs, t, _peer) = connected_pair(false).await;
    for i in 0..200u32 {
        let payload = Bytes::from(i.to_le_bytes().repeat(25));
        let answer = t
            .call(PEER, payload.clone(), Duration::from_secs(2))
            .await
            .expect("call");
        assert_eq!(answer, payload);
    }
    let id = t
        .request(
            PEER,
            Bytes::from_static(b"via event"),
            Duration::from_secs(2),
        )
        .expect("request");
    let got = wait_event(&t, Duration::from_secs(5), |e| {
        matches!(e, Event::Response { .. })
    })
    .await;
    assert_eq!(
        got.map(|g| g.0),
        Some(Event::Response {
            from: PEER,
            incarnation: t
                .peer_status(PEER)
                .and_then(|s| s.incarnation)
                .expect("the peer was heard"),
            id,
            payload: Bytes::from_static(b"via event")
        })
    );

    for i in 0..100u64 {
        t.stream_send(PEER, StreamId(3), Bytes::from(i.to_le_bytes().to_vec()))
            .expect("stream");
        t.send(PEER, Bytes::from(i.to_le_bytes().to_vec()))
            .expect("send");
    }
    let mut stream_seen = Vec::new();
    let mut acks = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while (stream_seen.len() < 100 || acks < 100) && Instant::now() < deadline {
        match wait_event(&t, Duration::from_secs(5), |_| true).await {
            Some((
                Event::Stream {
                    from,
                    stream,
                    seq,
                    payload,
                    ..
                },
                _,
            )) => {
                assert_eq!((from, stream), (PEER, StreamId(3)));
                assert_eq!(payload[..], seq.to_le_bytes()[..], "echoed in order");
                stream_seen.push(seq);
            }
            Some((Event::Message { from, .. }, _)) if from == PEER => acks += 1,
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(stream_seen, (0..100).collect::<Vec<u64>>());
    assert_eq!(acks, 100);
}

#[tokio::test]
async fn sigkilled_peer_is_reported_down_within_detection_time() {
    let (_certs, t, peer) = connected_pair(false).await;
    kill(peer.pid(), Signal::SIGKILL).expect("kill -9");
    let down = wait_event(&t, Duration::from_secs(3), |e| {
        matches!(e, Event::Peer(PeerEvent::Down { peer: PEER, .. }))
    })
    .await;
    let (_, took) = down.expect("down reported");
    println!("down {took:?} after SIGKILL");
    // Silence since the last frame heard (at most one keep-alive interval before the kill).
    assert!(
        took <= Duration::from_millis(DETECTION_MS + 150),
        "down after {took:?}"
    );
    assert!(
        took >= Duration::from_millis(DETECTION_MS - DETECTION_MS / 6 - 5),
        "down too early: {took:?}"
    );
}

/// A peer SIGKILLed and restarted on its address is met as its new incarnation well before
/// quinn's idle timeout (`max(4 x detection time, 1 s)`) would close the old connection: the
/// restarted process resets that connection (its stateless-reset key is derived from the node
/// key, the same in every incarnation), and this side redials at once.
#[tokio::test]
async fn a_peer_sigkilled_and_restarted_on_its_address_is_met_as_its_new_incarnation_at_once() {
    let (certs, t, peer) = connected_pair(false).await;
    let old = t.peer_status(PEER).and_then(|s| s.incarnation);
    let addr = peer.addrs.main.to_string();
    kill(peer.pid(), Signal::SIGKILL).expect("kill -9");
    let killed = Instant::now();
    drop(peer);
    let _restarted = PeerProcess::spawn(
        certs.path(),
        PEER.node,
        t.local_addrs().expect("addrs"),
        &["--main-bind", &addr],
    );
    let up = wait_event(&t, Duration::from_secs(5), |e| {
        matches!(e, Event::Peer(PeerEvent::Up { peer: PEER, incarnation }) if Some(*incarnation) != old)
    })
    .await;
    assert!(up.is_some(), "the restarted peer never came up");
    let took = killed.elapsed();
    println!("new incarnation up {took:?} after SIGKILL");
    let idle_timeout = Duration::from_millis((4 * DETECTION_MS).max(1000));
    assert!(
        took < idle_timeout,
        "new incarnation up only after {took:?}: the old connection waited for the idle timeout"
    );
}

#[tokio::test]
async fn a_local_stall_longer_than_the_detection_time_reports_no_peer_down() {
    let (_certs, t, _peer) = connected_pair(false).await;
    assert_echoed(&t, b"before").await;
    // A long synchronous call (an fsync, a page-fault storm) blocks this process's only
    // runtime thread for three detection times; the peer keeps sending keep-alives.
    std::thread::sleep(Duration::from_millis(3 * DETECTION_MS));
    let down = wait_event(&t, Duration::from_millis(2 * DETECTION_MS), |e| {
        matches!(e, Event::Peer(PeerEvent::Down { .. }))
    })
    .await;
    assert_eq!(
        down.map(|d| d.0),
        None,
        "a local stall was taken for a dead peer"
    );
    assert_eq!(t.peer_status(PEER).map(|s| s.up), Some(true));
    assert_echoed(&t, b"after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_injected_and_healed_is_reported_down_then_up() {
    let (_certs, t, mut peer) = connected_pair(false).await;
    t.faults().partition(PEER, &Path::ALL);
    let down = wait_event(&t, Duration::from_secs(3), |e| {
        matches!(e, Event::Peer(PeerEvent::Down { peer: PEER, .. }))
    })
    .await;
    assert!(down.is_some(), "partition reported down");
    let peer_saw_down = tokio::task::block_in_place(|| {
        let deadline = Instant::now() + Duration::from_secs(3);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match peer.lines.recv_timeout(left) {
                Ok(line) if line.contains("Down") => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    });
    assert!(
        peer_saw_down,
        "the partitioned peer reports the local endpoint down too"
    );
    t.faults().heal(PEER, &Path::ALL);
    let up = wait_event(&t, Duration::from_secs(3), |e| {
        matches!(e, Event::Peer(PeerEvent::Up { peer: PEER, .. }))
    })
    .await;
    assert!(up.is_some(), "heal reported up");
    assert_echoed(&t, b"after heal").await;
    // The peer process can inject faults too (testbed drills do it at run time).
    peer.command("partition 1.0 all");
    let down = wait_event(&t, Duration::from_secs(3), |e| {
        matches!(e, Event::Peer(PeerEvent::Down { peer: PEER, .. }))
    })
    .await;
    assert!(
        down.is_some(),
        "partition injected in the peer process reported down"
    );
}

#[tokio::test]
async fn main_link_cut_with_failsafe_alive_is_a_link_failure() {
    let (_certs, t, _peer) = connected_pair(true).await;
    // Either path may connect first; wait for the other one's LinkUp.
    let both_up = wait_event(&t, Duration::from_secs(3), |e| {
        matches!(e, Event::Peer(PeerEvent::LinkUp { .. }))
    })
    .await;
    assert!(both_up.is_some(), "both links came up");
    assert_eq!(t.peer_status(PEER).map(|s| s.paths_up.len()), Some(2));
    t.faults().partition(PEER, &[Path::Main]);
    let link_down = wait_event(&t, Duration::from_secs(3), |e| matches!(e, Event::Peer(_))).await;
    let link_down = link_down.map(|e| e.0);
    assert!(
        matches!(
            link_down,
            Some(Event::Peer(PeerEvent::LinkDown {
                peer: PEER,
                path: Path::Main,
                ..
            }))
        ),
        "{link_down:?}"
    );
    assert_echoed(&t, b"over failsafe").await;
    let more = wait_event(&t, Duration::from_millis(3 * DETECTION_MS), |e| {
        matches!(e, Event::Peer(_))
    })
    .await;
    assert_eq!(more, None, "the peer itself is never reported down");
    assert_eq!(t.peer_status(PEER).map(|s| s.up), Some(true));
}

#[tokio::test]
async fn adjacent_protocol_version_talks() {
    let certs = certs_dir();
    let t = local(certs.path(), false).await;
    let next = (duplex_transport::PROTOCOL_VERSION + 1).to_string();
    let peer = PeerProcess::spawn(
        certs.path(),
        PEER.node,
        t.local_addrs().expect("addrs"),
        &["--protocol-version", &next],
    );
    t.add_peer(PEER, peer.addrs);
    let up = wait_event(&t, Duration::from_secs(10), |e| {
        matches!(e, Event::Peer(PeerEvent::Up { peer: PEER, .. }))
    })
    .await;
    assert!(up.is_some(), "adjacent versions talk");
    assert_eq!(
        t.link_version(PEER, Path::Main),
        Some(duplex_transport::PROTOCOL_VERSION),
        "the link speaks the lower version"
    );
    assert_echoed(&t, b"v2").await;
}

/// A raw quinn client that holds a cluster certificate but speaks whatever bytes we give it on
/// the control lane, then opens the bulk lane with a well-formed hello from `from`.
async fn raw_session(
    creds: &NodeCredentials,
    server: SocketAddr,
    server_node: u16,
    from: EndpointId,
    bytes: Bytes,
) -> Result<quinn::ConnectionError, String> {
    let (_, client_config) = quinn_configs(
        creds,
        QuicTiming {
            idle_timeout_ms: 5000,
            keep_alive_interval_ms: None,
        },
    )
    .map_err(|e| e.to_string())?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().map_err(|e| format!("{e}"))?)
        .map_err(|e| e.to_string())?;
    endpoint.set_default_client_config(client_config);
    let conn = endpoint
        .connect(server, &node_server_name(server_node))
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut send, _recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(&bytes).await.map_err(|e| e.to_string())?;
    let (mut bulk, _bulk_recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    // The bulk hello may meet a connection already closed for the control lane's bytes.
    let _ = bulk
        .write_all(&hello(duplex_transport::PROTOCOL_VERSION, from))
        .await;
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .map_err(|_| "not closed".to_string())?;
    Ok(closed)
}

fn hello(version: u16, from: EndpointId) -> BytesMut {
    let mut out = BytesMut::new();
    Frame::Hello(Hello {
        version,
        from,
        path: Path::Main,
        incarnation: 1,
    })
    .encode(&mut out);
    out
}

#[tokio::test]
async fn bad_frames_and_versions_close_only_that_connection() {
    let (certs, t, _peer) = connected_pair(false).await;
    let intruder = EndpointId::new(3, 0);
    let creds = NodeCredentials::load(certs.path(), intruder.node).expect("credentials");
    let server = t.local_addrs().expect("addrs").main;
    // In the cluster list, so its hellos pass and its bad frames are what gets it closed.
    t.add_peer(
        intruder,
        PeerAddrs {
            main: "127.0.0.1:9".parse().expect("addr"),
            failsafe: None,
        },
    );
    let v = duplex_transport::PROTOCOL_VERSION;
    let mut unknown_kind = hello(v, intruder);
    unknown_kind.put_slice(&[1, 0, 0, 0, 0x7f]);
    let mut oversized = hello(v, intruder);
    oversized.put_u32_le(64 << 20);
    let mut malformed = hello(v, intruder);
    malformed.put_slice(&[3, 0, 0, 0, 0x04, 1, 2]);
    let mut second_hello = hello(v, intruder);
    second_hello.put_slice(&hello(v, intruder));
    let cases: [(&str, BytesMut, u32, &str); 5] = [
        (
            "unknown kind",
            unknown_kind,
            close_code::BAD_FRAME,
            "unknown message kind 0x7f",
        ),
        (
            "oversized",
            oversized,
            close_code::BAD_FRAME,
            "exceeds the maximum",
        ),
        (
            "malformed",
            malformed,
            close_code::BAD_FRAME,
            "expected at least 13",
        ),
        (
            "unknown version",
            hello(9, intruder),
            close_code::VERSION_REFUSED,
            "protocol version 9",
        ),
        (
            "second hello",
            second_hello,
            close_code::HANDSHAKE_FAILED,
            "second hello on an established link",
        ),
    ];
    for (name, bytes, code, reason) in cases {
        let closed = raw_session(&creds, server, LOCAL.node, intruder, bytes.freeze())
            .await
            .expect(name);
        match closed {
            quinn::ConnectionError::ApplicationClosed(c) => {
                let text = String::from_utf8_lossy(&c.reason).to_string();
                println!("{name}: closed with code {} reason {text:?}", c.error_code);
                assert_eq!(c.error_code, quinn::VarInt::from_u32(code), "{name}");
                assert!(text.contains(reason), "{name}: {text}");
            }
            other => panic!("{name}: closed by {other}"),
        }
        let answer = t
            .call(
                PEER,
                Bytes::from_static(b"still here"),
                Duration::from_secs(2),
            )
            .await
            .expect(name);
        assert_eq!(
            &answer[..],
            b"still here",
            "{name}: other connections keep working"
        );
    }

    // A client that trusts the cluster CA (so it accepts the server) but presents a certificate
    // of another CA: the server must refuse it.
    let foreign = ClusterCa::generate().expect("foreign CA");
    let cert = foreign.issue_node(3).expect("foreign node cert");
    let foreign_only =
        NodeCredentials::from_pem(3, &foreign.cert_pem, &cert).expect("foreign credentials");
    let foreign_creds = NodeCredentials {
        ca: creds.ca.clone(),
        ..foreign_only
    };
    let refused = raw_session(
        &foreign_creds,
        server,
        LOCAL.node,
        intruder,
        hello(v, intruder).freeze(),
    )
    .await;
    // The client accepted the server, so the close can only come from the server (the peer),
    // with TLS alert 48 (unknown CA) and rustls's reason.
    let err = match refused {
        Ok(quinn::ConnectionError::ConnectionClosed(c)) => format!("closed by peer: {c}"),
        Ok(other) => panic!("foreign certificate: ended by {other:?}, not by the server"),
        Err(e) => e,
    };
    println!("foreign certificate: {err}");
    assert!(
        err.contains("closed by peer") && err.contains("error 48") && err.contains("UnknownIssuer"),
        "the server refuses the client certificate as of an unknown issuer: {err}"
    );
    assert_echoed(&t, b"still here").await;
}
