//! Hardening of the QUIC transport after the review of the `transport` merge: a stale
//! incarnation cannot displace the live one, a replaced link never speaks for a dead
//! incarnation, a live peer whose reader waits beside others stays up, steady local lateness
//! still reports a dead peer in bounded time and a local stall reaches the application, and
//! nothing is buffered in megabytes before both hellos are in. Each test failed on the merged
//! code.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use duplex_transport::certs::{Credentials, QuicTiming, node_server_name, quinn_configs};
use duplex_transport::detector::DetectorAction;
use duplex_transport::quic::close_code;
use duplex_transport::wire::{Frame, FrameDecoder, Hello};
use duplex_transport::{
    DetectorConfig, EndpointId, Event, FailureDetector, Path, PeerEvent, QuicTransport, Transport,
};

mod common;
use common::{DETECTION_MS, certs_dir, encode, endpoint, nowhere, read_frame};

const A: EndpointId = EndpointId::new(1, 0);
const P: EndpointId = EndpointId::new(3, 0);

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn hello(from: EndpointId, incarnation: u64) -> Frame {
    Frame::Hello(Hello {
        version: duplex_transport::PROTOCOL_VERSION,
        from,
        path: Path::Main,
        incarnation,
    })
}

type Lane = (quinn::SendStream, quinn::RecvStream);

/// A raw peer claiming `claimed` with boot id `incarnation`, both lanes open, hellos exchanged.
async fn raw_link(
    certs: &std::path::Path,
    claimed: EndpointId,
    incarnation: u64,
    server: SocketAddr,
) -> (quinn::Endpoint, quinn::Connection, Lane, Lane) {
    let creds = Credentials::load_node(certs, claimed.node).expect("credentials");
    let (_, client_config) = quinn_configs(
        &creds,
        QuicTiming {
            idle_timeout_ms: 10_000,
            keep_alive_interval_ms: None,
        },
    )
    .expect("client config");
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
    endpoint.set_default_client_config(client_config);
    let conn = endpoint
        .connect(server, &node_server_name(A.node))
        .expect("connect")
        .await
        .expect("TLS handshake");
    let mut lanes = Vec::new();
    for _ in 0..2 {
        let (mut send, mut recv) = conn.open_bi().await.expect("lane");
        send.write_all(&encode(&[hello(claimed, incarnation)]))
            .await
            .expect("write hello");
        let mut decoder = FrameDecoder::new(1 << 20);
        assert!(matches!(
            read_frame(&mut recv, &mut decoder).await,
            Frame::Hello(_)
        ));
        lanes.push((send, recv));
    }
    let bulk = lanes.pop().expect("bulk");
    let control = lanes.pop().expect("control");
    (endpoint, conn, control, bulk)
}

/// Peer events at `t` for `limit` (data events are popped too and returned separately).
async fn collect(t: &QuicTransport, limit: Duration) -> (Vec<PeerEvent>, Vec<Event>) {
    let (mut peer, mut data) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while let Some(left) = limit.checked_sub(start.elapsed()) {
        match tokio::time::timeout(left, t.next_event()).await {
            Ok(Some(Event::Peer(e))) => peer.push(e),
            Ok(Some(other)) => data.push(other),
            Ok(None) | Err(_) => break,
        }
    }
    (peer, data)
}

async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        tokio::time::sleep(ms(2)).await;
    }
    done()
}

/// Keep-alives on a raw control lane every `every` until the stream fails.
fn keep_alive(mut send: quinn::SendStream, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let ka = encode(&[Frame::KeepAlive]);
        while send.write_all(&ka).await.is_ok() {
            tokio::time::sleep(every).await;
        }
    })
}

/// Finding: `run_link` replaces the link on a path whatever the new hello's incarnation, so a
/// stale process of the peer (a paused VM that resumes, a hung process that wakes up) with a
/// LOWER boot id closes the live process's connection as REPLACED; the live incarnation then
/// goes silent and is reported Down, and the detector, seeing a down peer, accepts the stale
/// incarnation and reports it Up.
#[tokio::test]
async fn a_lower_incarnation_cannot_displace_the_live_one() {
    let certs = certs_dir();
    let a = endpoint(certs.path(), A, |_| {}).await;
    a.add_peer(P, nowhere());
    let server = a.local_addrs().expect("addrs").main;
    let (_ep5, live, (live_ctl, _r5), _bulk5) = raw_link(certs.path(), P, 5, server).await;
    let _ka5 = keep_alive(live_ctl, ms(50));
    let (up, _) = collect(&a, ms(500)).await;
    assert!(
        up.contains(&PeerEvent::Up {
            peer: P,
            incarnation: 5
        }),
        "{up:?}"
    );
    // A zombie of the previous life (boot id 4) wakes up and redials: refused at its hello.
    let (_ep4, zombie) = raw_conn(certs.path(), P.node, server).await;
    let (mut zombie_ctl, _r4) = zombie.open_bi().await.expect("lane");
    zombie_ctl
        .write_all(&encode(&[hello(P, 4)]))
        .await
        .expect("hello");
    let refused = tokio::time::timeout(ms(2000), zombie.closed())
        .await
        .expect("the zombie's connection is closed");
    assert!(
        matches!(&refused, quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == quinn::VarInt::from_u32(close_code::STALE_INCARNATION)),
        "{refused:?}"
    );
    let (events, _) = collect(&a, ms(3 * DETECTION_MS)).await;
    let reason = live.close_reason();
    println!("live connection close reason: {reason:?}; A's peer events: {events:?}");
    assert!(
        reason.is_none(),
        "the live incarnation's connection was closed by a stale one: {reason:?}"
    );
    assert!(
        !events.contains(&PeerEvent::Up {
            peer: P,
            incarnation: 4
        }),
        "the stale incarnation was reported up: {events:?}"
    );
}

/// Finding: a link whose two readers wait for room in the event queue does not notice that
/// its connection was closed (replaced by the peer's next incarnation). When the application
/// drains, the dead link's reader delivers its frame and calls `heard` with the dead
/// incarnation: if the current incarnation is down by then, the detector reports the dead
/// incarnation Up. (Each such link also holds up to one frame per lane plus its decoders, with
/// no bound on how many replaced links wait like this.)
#[tokio::test]
async fn a_replaced_link_waiting_for_the_application_never_speaks_for_a_dead_incarnation() {
    let certs = certs_dir();
    let a = endpoint(certs.path(), A, |c| c.limits.event_queue_events = 1).await;
    a.add_peer(P, nowhere());
    let server = a.local_addrs().expect("addrs").main;
    let (_ep1, old, (mut ctl1, _r1), (mut bulk1, _br1)) =
        raw_link(certs.path(), P, 1, server).await;
    let (up, _) = collect(&a, ms(300)).await;
    assert!(up.contains(&PeerEvent::Up {
        peer: P,
        incarnation: 1
    }));
    // Incarnation 1 sends: m1 fills A's event queue; m2 and b1 make both its readers wait.
    ctl1.write_all(&encode(&[
        Frame::Message {
            payload: Bytes::from_static(b"m1"),
        },
        Frame::Message {
            payload: Bytes::from_static(b"m2"),
        },
    ]))
    .await
    .expect("write");
    bulk1
        .write_all(&encode(&[Frame::Message {
            payload: Bytes::from_static(b"b1"),
        }]))
        .await
        .expect("write");
    assert!(wait_until(ms(2000), || a.queued_events() >= 1).await);
    assert!(
        wait_until(ms(2000), || a.readers_waiting() == 2).await,
        "both of incarnation 1's readers wait for room"
    );
    // The peer restarts: incarnation 2 connects, incarnation 1's link is replaced and closed.
    let (_ep2, _new, _ctl2, _bulk2) = raw_link(certs.path(), P, 2, server).await;
    let closed = tokio::time::timeout(ms(2000), old.closed()).await;
    assert!(closed.is_ok(), "incarnation 1's connection was replaced");
    assert!(
        wait_until(ms(2000), || a.readers_waiting() == 0).await,
        "the replaced link's readers stopped waiting: {} still wait",
        a.readers_waiting()
    );
    // Incarnation 2 then dies silently (it sends nothing more): A's detector loses it.
    assert!(
        wait_until(ms(3000), || a
            .peer_status(P)
            .is_some_and(|s| !s.up && s.incarnation == Some(2)))
        .await,
        "incarnation 2 went down at A"
    );
    // A's application drains now.
    let (events, data) = collect(&a, ms(DETECTION_MS)).await;
    println!("A's peer events {events:?}; data {data:?}");
    // (Incarnation 1 may go down and up before the restart: it is silent while the test sets
    // up. What must never happen is incarnation 1 coming back after incarnation 2 came up.)
    let up2 = PeerEvent::Up {
        peer: P,
        incarnation: 2,
    };
    let after: Vec<&PeerEvent> = events.iter().skip_while(|e| **e != up2).collect();
    assert!(!after.is_empty(), "incarnation 2 came up: {events:?}");
    assert!(
        !after.contains(&&PeerEvent::Up {
            peer: P,
            incarnation: 1
        }),
        "a closed link of a dead incarnation brought it back up: {events:?}"
    );
    assert!(
        !data
            .iter()
            .any(|e| matches!(e, Event::Message { payload, .. } if &payload[..] != b"m1")),
        "only m1, queued before the restart, is delivered: {data:?}"
    );
}

/// Finding: a reader waiting for room heard its peer only when a `sleep(interval)` recreated at
/// every wake-up ran out, and every event the application read woke every waiting reader. With
/// an application reading faster than the keep-alive interval, a peer whose event does not fit
/// was never heard while it waited, though its keep-alives kept arriving: a false `Down`.
/// Here Q's small messages keep A's queue nearly full, the application reads one event every
/// 20 ms (never emptying the queue), and P's 15 KiB message can never fit.
#[tokio::test]
async fn a_live_peer_stays_up_while_its_reader_waits_beside_others() {
    const Q: EndpointId = EndpointId::new(3, 1);
    let certs = certs_dir();
    let a = endpoint(certs.path(), A, |c| c.limits.event_queue_bytes = 16 << 10).await;
    a.add_peer(P, nowhere());
    a.add_peer(Q, nowhere());
    let server = a.local_addrs().expect("addrs").main;
    let (_ep_p, _p, (mut ctl_p, _rp), _bulk_p) = raw_link(certs.path(), P, 1, server).await;
    let (_ep_q, _q, (mut ctl_q, _rq), _bulk_q) = raw_link(certs.path(), Q, 1, server).await;
    let small: Vec<Frame> = (0..2000)
        .map(|_| Frame::Message {
            payload: Bytes::from(vec![1u8; 100]),
        })
        .collect();
    ctl_q.write_all(&encode(&small)).await.expect("write");
    let _ka_q = keep_alive(ctl_q, ms(50));
    assert!(
        wait_until(ms(2000), || a.readers_waiting() == 1
            && a.queued_events() > 50)
        .await,
        "Q's reader waits on a nearly full queue"
    );
    ctl_p
        .write_all(&encode(&[Frame::Message {
            payload: Bytes::from(vec![2u8; 15 << 10]),
        }]))
        .await
        .expect("write");
    let _ka_p = keep_alive(ctl_p, ms(50));
    assert!(
        wait_until(ms(2000), || a.readers_waiting() == 2).await,
        "P's reader waits too"
    );
    // The application reads one event every 20 ms, never the last one.
    let mut peer_events = Vec::new();
    let start = Instant::now();
    while start.elapsed() < ms(5 * DETECTION_MS) {
        tokio::time::sleep(ms(20)).await;
        if a.queued_events() >= 2
            && let Some(Event::Peer(e)) = a.try_next_event()
        {
            peer_events.push(e);
        }
    }
    println!("A's peer events while P waited: {peer_events:?}");
    assert!(
        a.peer_status(P).is_some_and(|s| s.up),
        "P stayed up: {peer_events:?}"
    );
    assert!(
        !peer_events
            .iter()
            .any(|e| matches!(e, PeerEvent::Down { peer, .. } if *peer == P)),
        "a live peer whose reader waits was reported down: {peer_events:?}"
    );
}

/// Finding: the local-stall rule forgives `gap - interval` at every late tick, so a process
/// whose ticks are steadily late (a busy or repeatedly blocked runtime thread) reports a peer
/// that really died only after `detection / interval` ticks: 6 × the tick gap with the
/// defaults, without bound as the gap grows.
#[test]
fn a_steadily_late_runtime_still_reports_a_dead_peer_within_a_bounded_time() {
    let mut d = FailureDetector::new(DetectorConfig::default());
    d.add_peer(P, &[Path::Main]);
    for t in (0..=1000).step_by(50) {
        d.on_heard(P, Path::Main, 1, ms(t));
        d.on_tick(ms(t));
    }
    while d.poll_action().is_some() {}
    // The peer dies at 1000 ms; this process now ticks every 400 ms.
    let gap = 400;
    let mut t = 1000;
    let mut down_after = None;
    while t < 60_000 {
        t += gap;
        d.on_tick(ms(t));
        while let Some(a) = d.poll_action() {
            if matches!(a, DetectorAction::Report(PeerEvent::Down { .. })) {
                down_after = Some(t - 1000);
            }
        }
        if down_after.is_some() {
            break;
        }
    }
    println!("dead peer reported down {down_after:?} ms after it died (ticks every {gap} ms)");
    let bound = 2 * DetectorConfig::default().detection_time_ms + gap;
    assert!(
        down_after.is_some_and(|d| d <= bound),
        "reported after {down_after:?} ms, more than {bound} ms"
    );
}

/// Finding: a local stall was only logged; the application (the pair layer, which must fence
/// itself when its peers may have declared it down) never heard of it.
#[tokio::test]
async fn a_local_stall_reaches_the_application_as_an_event() {
    let certs = certs_dir();
    let a = endpoint(certs.path(), A, |_| {}).await;
    // Let the detector tick once, then block this (current-thread) runtime: nothing runs.
    tokio::time::sleep(ms(2 * DETECTION_MS / 6)).await;
    std::thread::sleep(ms(400));
    let (_, events) = collect(&a, ms(DETECTION_MS)).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::LocalStall { stalled_ms } if *stalled_ms >= 300)),
        "{events:?}"
    );
}

/// A raw TLS connection to `server` with node `node`'s certificate; no stream opened.
async fn raw_conn(
    certs: &std::path::Path,
    node: u16,
    server: SocketAddr,
) -> (quinn::Endpoint, quinn::Connection) {
    let creds = Credentials::load_node(certs, node).expect("credentials");
    let (_, client_config) = quinn_configs(
        &creds,
        QuicTiming {
            idle_timeout_ms: 10_000,
            keep_alive_interval_ms: None,
        },
    )
    .expect("client config");
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
    endpoint.set_default_client_config(client_config);
    let conn = endpoint
        .connect(server, &node_server_name(A.node))
        .expect("connect")
        .await
        .expect("TLS handshake");
    (endpoint, conn)
}

/// Writes 1 MiB pieces until the peer stops granting credit (300 ms without progress) or
/// `cap` bytes went out; returns the bytes written.
async fn write_until_blocked(send: &mut quinn::SendStream, cap: usize) -> usize {
    let piece = vec![0u8; 1 << 20];
    let mut sent = 0;
    while sent < cap {
        match tokio::time::timeout(ms(300), send.write_all(&piece)).await {
            Ok(Ok(())) => sent += piece.len(),
            _ => break,
        }
    }
    sent
}

/// Finding: docs/transport.md bounds a connection before its hellos at 64 KiB
/// (`incoming_buffer_size`), but that only covers the time before the `Incoming` is accepted.
/// Once TLS is done, quinn grants the full stream window to a second stream the acceptor has
/// not even accepted yet, so any holder of a cluster certificate, listed or not, parks
/// `STREAM_WINDOW_BYTES` (up to `CONNECTION_WINDOW_BYTES`) per handshake slot.
#[tokio::test]
async fn a_connection_that_never_says_hello_buffers_at_most_64_kib() {
    let certs = certs_dir();
    let a = endpoint(certs.path(), A, |_| {}).await;
    let server = a.local_addrs().expect("addrs").main;
    let (_ep, conn) = raw_conn(certs.path(), 3, server).await;
    let (mut control, _r0) = conn.open_bi().await.expect("stream 0");
    control
        .write_all(&[0u8; 3])
        .await
        .expect("3 bytes, never a hello");
    let (mut second, _r1) = conn.open_bi().await.expect("stream 4");
    let sent = write_until_blocked(&mut second, 32 << 20).await;
    println!(
        "{} KiB accepted from a connection that never said hello",
        sent >> 10
    );
    assert!(
        sent <= 64 << 10,
        "{} KiB buffered before any hello",
        sent >> 10
    );
}

/// Finding: the acceptor reads the bulk lane's hello with a decoder bounded by
/// `max_frame_bytes` (16 MiB), and the decoder reserves the announced body at once, so a
/// handshake in progress holds up to 16 MiB more than the documented 64 KiB.
#[tokio::test]
async fn a_bulk_lane_hello_is_refused_before_megabytes_are_buffered() {
    let certs = certs_dir();
    let a = endpoint(certs.path(), A, |_| {}).await;
    a.add_peer(P, nowhere());
    let server = a.local_addrs().expect("addrs").main;
    let (_ep, conn) = raw_conn(certs.path(), 3, server).await;
    let (mut control, mut control_recv) = conn.open_bi().await.expect("control");
    control
        .write_all(&encode(&[hello(P, 1)]))
        .await
        .expect("hello");
    let mut decoder = FrameDecoder::new(1 << 20);
    assert!(matches!(
        read_frame(&mut control_recv, &mut decoder).await,
        Frame::Hello(_)
    ));
    let (mut bulk, _bulk_recv) = conn.open_bi().await.expect("bulk");
    // A "hello" announcing a 16 MiB body, then the body, slowly enough to fit the 2 s timeout.
    let mut prefix = Vec::new();
    prefix.extend_from_slice(&((16u32 << 20) + 13).to_le_bytes());
    prefix.push(0x01);
    bulk.write_all(&prefix).await.expect("prefix");
    let sent = write_until_blocked(&mut bulk, 15 << 20).await;
    println!("{} KiB of a 'hello' taken during the handshake", sent >> 10);
    assert!(
        sent <= 64 << 10,
        "{} KiB taken for a bulk-lane hello (a hello is 24 bytes)",
        sent >> 10
    );
}
