//! The QUIC transport in one process: two endpoints on loopback (and a raw quinn client where a
//! test needs a misbehaving peer). Covers what does not need separate OS processes: who may
//! claim which endpoint, whose responses count, a slow consumer, injected delay, stream
//! numbering on refusal, unbounded timeouts, the pending-request bound, the dialer's version
//! refusal and close. Each test forces the bug it guards against (they fail on the code before
//! the fixes). The cross-process behaviours live in `testbed/tests/transport_quic.rs`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use duplex_transport::certs::{Credentials, QuicTiming, node_server_name, quinn_configs};
use duplex_transport::quic::close_code;
use duplex_transport::wire::{Frame, FrameDecoder, Hello, StreamId};
use duplex_transport::{
    EndpointId, Event, Path, PeerAddrs, PeerEvent, QuicConfig, QuicTransport, Transport,
    TransportError,
};

mod common;
use common::{DETECTION_MS, certs_dir, encode, endpoint, nowhere, read_frame};

const A: EndpointId = EndpointId::new(1, 0);
const B: EndpointId = EndpointId::new(2, 0);

/// Waits for the first event matching `want`, at most `limit`.
async fn wait_event(
    t: &QuicTransport,
    limit: Duration,
    mut want: impl FnMut(&Event) -> bool,
) -> Option<Event> {
    let start = Instant::now();
    loop {
        let left = limit.checked_sub(start.elapsed())?;
        match tokio::time::timeout(left, t.next_event()).await {
            Ok(Some(e)) if want(&e) => return Some(e),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return None,
        }
    }
}

fn drain(t: &QuicTransport) -> Vec<Event> {
    std::iter::from_fn(|| t.try_next_event()).collect()
}

/// B's application: answers every request with its payload and records its peer events.
fn serve_echo(b: QuicTransport) -> Arc<Mutex<Vec<PeerEvent>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Some(event) = b.next_event().await {
            match event {
                Event::Request {
                    from, id, payload, ..
                } => {
                    let _ = b.respond(from, id, payload);
                }
                Event::Peer(e) => record.lock().unwrap_or_else(|p| p.into_inner()).push(e),
                _ => {}
            }
        }
    });
    seen
}

/// A (1.0, the dialer) and B (2.0), both up; neither side's events drained.
async fn pair(
    tweak_a: impl FnOnce(&mut QuicConfig),
) -> (tempfile::TempDir, QuicTransport, QuicTransport) {
    pair_with(tweak_a, |_| {}).await
}

/// `pair` with both configurations tweaked.
async fn pair_with(
    tweak_a: impl FnOnce(&mut QuicConfig),
    tweak_b: impl FnOnce(&mut QuicConfig),
) -> (tempfile::TempDir, QuicTransport, QuicTransport) {
    let certs = certs_dir();
    let a = endpoint(certs.path(), A, tweak_a).await;
    let b = endpoint(certs.path(), B, tweak_b).await;
    a.add_peer(B, b.local_addrs().expect("addrs"));
    b.add_peer(A, a.local_addrs().expect("addrs"));
    let up = wait_event(&a, Duration::from_secs(10), |e| {
        matches!(e, Event::Peer(PeerEvent::Up { peer: B, .. }))
    })
    .await;
    assert!(up.is_some(), "B came up at A");
    (certs, a, b)
}

/// A raw quinn client holding node `node`'s cluster certificate, with one stream open.
async fn raw_client(
    certs: &std::path::Path,
    node: u16,
    server: SocketAddr,
    server_node: u16,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
) {
    let creds = Credentials::load_node(certs, node).expect("credentials");
    let (_, client_config) = quinn_configs(
        &creds,
        QuicTiming {
            idle_timeout_ms: 5000,
            keep_alive_interval_ms: None,
        },
    )
    .expect("client config");
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
    endpoint.set_default_client_config(client_config);
    let conn = endpoint
        .connect(server, &node_server_name(server_node))
        .expect("connect")
        .await
        .expect("TLS handshake");
    let (send, recv) = conn.open_bi().await.expect("stream");
    (endpoint, conn, send, recv)
}

fn hello(from: EndpointId) -> Frame {
    Frame::Hello(Hello {
        version: duplex_transport::PROTOCOL_VERSION,
        from,
        path: Path::Main,
        incarnation: 1,
    })
}

/// A raw peer claiming `claimed` with node `claimed.node`'s certificate, both lanes open and
/// hellos exchanged: (endpoint, connection, control lane, bulk lane).
async fn raw_link(
    certs: &std::path::Path,
    claimed: EndpointId,
    server: SocketAddr,
    server_node: u16,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    (quinn::SendStream, quinn::RecvStream),
    (quinn::SendStream, quinn::RecvStream),
) {
    let (endpoint, conn, mut send, mut recv) =
        raw_client(certs, claimed.node, server, server_node).await;
    let mut decoder = FrameDecoder::new(1 << 20);
    send.write_all(&encode(&[hello(claimed)]))
        .await
        .expect("write");
    assert!(matches!(
        read_frame(&mut recv, &mut decoder).await,
        Frame::Hello(_)
    ));
    let (mut bulk_send, mut bulk_recv) = conn.open_bi().await.expect("bulk lane");
    bulk_send
        .write_all(&encode(&[hello(claimed)]))
        .await
        .expect("write");
    assert!(matches!(
        read_frame(&mut bulk_recv, &mut decoder).await,
        Frame::Hello(_)
    ));
    (endpoint, conn, (send, recv), (bulk_send, bulk_recv))
}

#[tokio::test]
async fn a_certificate_of_node_3_cannot_claim_node_2_and_the_real_link_stays() {
    let (certs, a, b) = pair(|_| {}).await;
    let _b_events = serve_echo(b.clone());
    let server = a.local_addrs().expect("addrs").main;

    let (_ep, conn, mut send, _recv) = raw_client(certs.path(), 3, server, A.node).await;
    send.write_all(&encode(&[hello(B)])).await.expect("write");
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("the impostor is closed");
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason).to_string();
            println!("impostor closed: code {} reason {reason:?}", c.error_code);
            assert_eq!(
                c.error_code,
                quinn::VarInt::from_u32(close_code::HANDSHAKE_FAILED)
            );
            assert!(
                reason.contains("claims endpoint 2.0") && reason.contains("node-2.duplex"),
                "{reason}"
            );
        }
        other => panic!("impostor closed by {other}"),
    }
    // The real link to 2.0 was not replaced: calls still reach the real B.
    let answer = a
        .call(B, Bytes::from_static(b"real"), Duration::from_secs(2))
        .await
        .expect("call over the real link");
    assert_eq!(&answer[..], b"real");

    // A node may claim any CPU of its own node that is in the cluster list: 3.1 with node 3's
    // certificate is answered.
    a.add_peer(EndpointId::new(3, 1), nowhere());
    let (_ep, _conn, mut send, mut recv) = raw_client(certs.path(), 3, server, A.node).await;
    send.write_all(&encode(&[hello(EndpointId::new(3, 1))]))
        .await
        .expect("write");
    let mut decoder = FrameDecoder::new(1 << 20);
    let answer = read_frame(&mut recv, &mut decoder).await;
    assert!(
        matches!(answer, Frame::Hello(Hello { from, .. }) if from == A),
        "{answer:?}"
    );
}

#[tokio::test]
async fn an_endpoint_not_in_the_cluster_list_is_refused() {
    let (certs, a, b) = pair(|_| {}).await;
    let _b_events = serve_echo(b.clone());
    let server = a.local_addrs().expect("addrs").main;
    // Node 3's certificate is valid, but 3.2 was never added to A's cluster list.
    let (_ep, conn, mut send, _recv) = raw_client(certs.path(), 3, server, A.node).await;
    send.write_all(&encode(&[hello(EndpointId::new(3, 2))]))
        .await
        .expect("write");
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("the stranger is closed");
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason).to_string();
            println!("stranger closed: code {} reason {reason:?}", c.error_code);
            assert_eq!(
                c.error_code,
                quinn::VarInt::from_u32(close_code::HANDSHAKE_FAILED)
            );
            assert!(
                reason.contains("3.2 is not in the cluster list"),
                "{reason}"
            );
        }
        other => panic!("stranger closed by {other}"),
    }
    let answer = a
        .call(B, Bytes::from_static(b"member"), Duration::from_secs(2))
        .await
        .expect("members still talk");
    assert_eq!(&answer[..], b"member");
}

#[tokio::test]
async fn a_response_from_a_peer_the_request_did_not_go_to_is_ignored() {
    let (certs, a, _b) = pair(|_| {}).await;
    // Requests to B are lost, so only a forged response could answer this one.
    a.faults().partition(B, &Path::ALL);
    let id = a
        .request(B, Bytes::from_static(b"q"), Duration::from_secs(30))
        .expect("request");
    let server = a.local_addrs().expect("addrs").main;
    let forger = EndpointId::new(3, 0);
    a.add_peer(forger, nowhere());
    let (_ep, _conn, (mut send, _recv), _bulk) =
        raw_link(certs.path(), forger, server, A.node).await;
    send.write_all(&encode(&[
        Frame::Response {
            id: id.id,
            payload: Bytes::from_static(b"forged"),
        },
        Frame::Message {
            payload: Bytes::from_static(b"after"),
        },
    ]))
    .await
    .expect("write");
    // The message follows the forged response on one stream: once it is here, the response
    // has been handled.
    let mut responses = Vec::new();
    let marker = wait_event(&a, Duration::from_secs(5), |e| {
        if matches!(e, Event::Response { .. }) {
            responses.push(e.clone());
        }
        matches!(e, Event::Message { from, .. } if *from == forger)
    })
    .await;
    assert!(marker.is_some(), "the forger's message arrived");
    assert_eq!(responses, vec![], "a forged response was delivered");
}

#[tokio::test]
async fn a_slow_consumer_causes_no_down_on_either_side() {
    let (_certs, a, b) = pair(|c| c.limits.event_queue_events = 16).await;
    let b_events = serve_echo(b.clone());
    const MESSAGES: u32 = 3000;
    for i in 0..MESSAGES {
        b.send(A, Bytes::from(i.to_le_bytes().to_vec()))
            .expect("send");
    }
    // A's application stops draining for several detection times while B's messages wait.
    let stalled = Duration::from_millis(4 * DETECTION_MS);
    tokio::time::sleep(stalled).await;
    assert_eq!(
        a.peer_status(B).map(|s| s.up),
        Some(true),
        "A still hears B"
    );
    let mut got = 0u32;
    let mut a_peer_events = Vec::new();
    while got < MESSAGES {
        match tokio::time::timeout(Duration::from_secs(10), a.next_event()).await {
            Ok(Some(Event::Message { from, payload, .. })) => {
                assert_eq!(from, B);
                assert_eq!(payload[..], got.to_le_bytes()[..], "in order");
                got += 1;
            }
            Ok(Some(Event::Peer(e))) => a_peer_events.push(e),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("only {got} of {MESSAGES} messages arrived"),
        }
    }
    let b_seen = b_events.lock().unwrap_or_else(|p| p.into_inner()).clone();
    println!("A's peer events {a_peer_events:?}, B's {b_seen:?}");
    assert!(
        !a_peer_events
            .iter()
            .any(|e| matches!(e, PeerEvent::Down { .. } | PeerEvent::LinkDown { .. })),
        "A reported B down: {a_peer_events:?}"
    );
    assert!(
        !b_seen
            .iter()
            .any(|e| matches!(e, PeerEvent::Down { .. } | PeerEvent::LinkDown { .. })),
        "B reported A down: {b_seen:?}"
    );
}

#[tokio::test]
async fn injected_delay_is_latency_not_a_pause_per_frame() {
    let (_certs, a, b) = pair(|_| {}).await;
    drain(&a);
    const DELAY_MS: u64 = 100;
    const MESSAGES: u64 = 10;
    a.faults().set_delay_ms(B, DELAY_MS);
    let start = Instant::now();
    for i in 0..MESSAGES {
        b.send(A, Bytes::from(i.to_le_bytes().to_vec()))
            .expect("send");
    }
    let mut got = 0u64;
    while got < MESSAGES {
        match wait_event(&a, Duration::from_secs(5), |e| {
            matches!(e, Event::Message { .. })
        })
        .await
        {
            Some(Event::Message { payload, .. }) => {
                assert_eq!(payload[..], got.to_le_bytes()[..], "delay keeps the order");
                got += 1;
            }
            other => panic!("after {got} messages: {other:?}"),
        }
    }
    let took = start.elapsed();
    println!("{MESSAGES} messages with {DELAY_MS} ms delay took {took:?}");
    assert!(
        took >= Duration::from_millis(DELAY_MS),
        "not delayed: {took:?}"
    );
    assert!(
        took < Duration::from_millis(3 * DELAY_MS),
        "delays accumulated: {took:?}"
    );
}

#[tokio::test]
async fn a_refused_stream_frame_consumes_no_sequence_number() {
    let (_certs, a, _b) = pair(|c| c.limits.max_frame_bytes = 1024).await;
    let s = StreamId(7);
    assert_eq!(a.stream_send(B, s, Bytes::from_static(b"zero")), Ok(0));
    let err = a
        .stream_send(B, s, Bytes::from(vec![0u8; 4096]))
        .expect_err("too large");
    assert!(matches!(err, TransportError::TooLarge { .. }), "{err}");
    assert_eq!(
        a.stream_send(B, s, Bytes::from_static(b"one")),
        Ok(1),
        "no gap"
    );
}

#[tokio::test]
async fn an_unbounded_timeout_does_not_overflow() {
    let (_certs, a, b) = pair(|_| {}).await;
    let _b_events = serve_echo(b.clone());
    let id = a
        .request(B, Bytes::from_static(b"forever"), Duration::MAX)
        .expect("request");
    let got = wait_event(&a, Duration::from_secs(5), |e| {
        matches!(e, Event::Response { .. } | Event::RequestFailed { .. })
    })
    .await;
    assert_eq!(
        got,
        Some(Event::Response {
            from: B,
            incarnation: b.incarnation(),
            id,
            payload: Bytes::from_static(b"forever")
        })
    );
    let answer = a
        .call(B, Bytes::from_static(b"call"), Duration::MAX)
        .await
        .expect("call");
    assert_eq!(&answer[..], b"call");
}

#[tokio::test]
async fn close_ends_next_event_and_fails_waiting_calls_at_once() {
    let (_certs, a, _b) = pair(|_| {}).await;
    drain(&a);
    a.faults().partition(B, &Path::ALL);
    let call = a.call(
        B,
        Bytes::from_static(b"never answered"),
        Duration::from_secs(60),
    );
    tokio::pin!(call);
    let next = a.next_event();
    tokio::pin!(next);
    // Poll each once: the call is registered and waiting, next_event is waiting.
    let first = std::future::poll_fn(|cx| {
        Poll::Ready((call.as_mut().poll(cx).is_pending(), next.as_mut().poll(cx)))
    })
    .await;
    assert!(first.0, "the call is waiting");
    assert_eq!(first.1, Poll::Pending, "no event yet");
    a.close();
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), async { (call.await, next.await) })
        .await
        .expect("close wakes both");
    println!("woken {:?} after close", started.elapsed());
    assert_eq!(ended.0, Err(TransportError::Closed { local: A }));
    assert_eq!(ended.1, None);
    assert_eq!(a.next_event().await, None, "and stays closed");
    assert_eq!(
        a.send(B, Bytes::new()),
        Err(TransportError::Closed { local: A })
    );
}

#[tokio::test]
async fn requests_beyond_the_pending_bound_fail_with_a_clear_error() {
    let (_certs, a, _b) = pair(|c| c.limits.max_pending_requests = 2).await;
    // Nothing is answered while B is cut off, so both requests stay pending.
    a.faults().partition(B, &Path::ALL);
    for _ in 0..2 {
        a.request(B, Bytes::from_static(b"q"), Duration::from_secs(60))
            .expect("within the bound");
    }
    let err = a
        .request(B, Bytes::from_static(b"q"), Duration::from_secs(60))
        .expect_err("beyond the bound");
    assert_eq!(err, TransportError::TooManyRequests { local: A, limit: 2 });
    assert!(err.to_string().contains("2 requests waiting"), "{err}");
    let err = a
        .call(B, Bytes::from_static(b"c"), Duration::from_secs(60))
        .await
        .expect_err("calls share the bound");
    assert_eq!(err, TransportError::TooManyRequests { local: A, limit: 2 });
}

#[tokio::test]
async fn the_dialer_refuses_an_unknown_version_with_version_refused() {
    let certs = certs_dir();
    // A raw acceptor with node 2's certificate that answers every hello with version 9.
    let creds = Credentials::load_node(certs.path(), B.node).expect("credentials");
    let (server_config, _) = quinn_configs(
        &creds,
        QuicTiming {
            idle_timeout_ms: 5000,
            keep_alive_interval_ms: None,
        },
    )
    .expect("server config");
    let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().expect("addr"))
        .expect("server endpoint");
    let server_addr = server.local_addr().expect("addr");
    let a = endpoint(certs.path(), A, |_| {}).await;
    a.add_peer(
        B,
        PeerAddrs {
            main: server_addr,
            failsafe: None,
        },
    );
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        let incoming = server.accept().await.expect("A dials");
        let conn = incoming.await.expect("TLS handshake");
        let (mut send, mut recv) = conn.accept_bi().await.expect("A's stream");
        let mut buf = [0u8; 64];
        recv.read(&mut buf).await.expect("A's hello");
        let mut answer = BytesMut::new();
        Frame::Hello(Hello {
            version: 9,
            from: B,
            path: Path::Main,
            incarnation: 1,
        })
        .encode(&mut answer);
        send.write_all(&answer).await.expect("write");
        conn.closed().await
    })
    .await
    .expect("the dialer closes");
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason).to_string();
            println!("dialer closed: code {} reason {reason:?}", c.error_code);
            assert_eq!(
                c.error_code,
                quinn::VarInt::from_u32(close_code::VERSION_REFUSED)
            );
            assert!(reason.contains("protocol version 9"), "{reason}");
        }
        other => panic!("closed by {other}"),
    }
    a.close();
}

#[tokio::test]
async fn a_large_frame_arriving_slower_than_the_detection_time_keeps_its_peer_up() {
    let (certs, a, _b) = pair(|_| {}).await;
    drain(&a);
    let slow = EndpointId::new(3, 0);
    a.add_peer(slow, nowhere());
    let server = a.local_addrs().expect("addrs").main;
    let (_ep, _conn, _control, (mut bulk, _bulk_recv)) =
        raw_link(certs.path(), slow, server, A.node).await;
    let up = wait_event(
        &a,
        Duration::from_secs(5),
        |e| matches!(e, Event::Peer(PeerEvent::Up { peer, .. }) if *peer == slow),
    )
    .await;
    assert!(up.is_some(), "the slow peer came up");
    // One 1 MiB message, dripped over five detection times, and nothing else: no keep-alive,
    // no QUIC ping. Only the frame's own bytes say the peer is alive.
    const PIECES: usize = 16;
    let payload = Bytes::from(vec![7u8; 1 << 20]);
    let mut frame = BytesMut::new();
    Frame::Message {
        payload: payload.clone(),
    }
    .encode(&mut frame);
    let piece = frame.len().div_ceil(PIECES);
    let pause = Duration::from_millis(5 * DETECTION_MS / PIECES as u64);
    let sender = tokio::spawn(async move {
        for chunk in frame.chunks(piece) {
            bulk.write_all(chunk).await.expect("write a piece");
            tokio::time::sleep(pause).await;
        }
        bulk
    });
    let mut downs = Vec::new();
    let got = wait_event(&a, Duration::from_secs(10), |e| {
        if let Event::Peer(p @ PeerEvent::Down { .. }) = e {
            downs.push(*p);
        }
        matches!(e, Event::Message { from, .. } if *from == slow)
    })
    .await;
    let _bulk = sender.await.expect("sender");
    assert_eq!(
        downs,
        vec![],
        "a peer still sending its frame was declared down"
    );
    assert_eq!(
        got,
        Some(Event::Message {
            from: slow,
            incarnation: 1,
            payload
        })
    );
}

#[tokio::test]
async fn small_calls_pass_large_messages_stuck_on_the_same_link() {
    // B's application stops draining: A's 1 MiB messages fill B's event queue, B's bulk reader
    // waits, QUIC flow control stops A's bulk lane in the middle of a frame.
    // A sends until its bulk lane is full (default limits), so its own queue refuses more
    // large messages too.
    let (_certs, a, b) = pair_with(|_| {}, |c| c.limits.event_queue_bytes = 2 << 20).await;
    let _a_events = serve_echo(a.clone());
    let large = Bytes::from(vec![1u8; 1 << 20]);
    let (mut sent, mut refused_in_a_row) = (0, 0);
    // Full for good once 25 attempts in a row (50 ms) are refused: nothing drains any more.
    let full = wait_until(Duration::from_secs(10), || match a.send(B, large.clone()) {
        Ok(()) => {
            sent += 1;
            refused_in_a_row = 0;
            assert!(sent < 64, "the bulk lane never filled");
            false
        }
        Err(TransportError::QueueFull { .. }) => {
            refused_in_a_row += 1;
            refused_in_a_row >= 25
        }
        Err(e) => panic!("send: {e}"),
    })
    .await;
    assert!(full, "A's bulk lane filled up");
    println!(
        "{sent} large messages sent; A's queue holds {} bytes",
        a.send_queue_bytes(B)
    );
    let messages = sent;
    // B calls A: the request and A's answer travel on the control lanes, past the stuck frames.
    for i in 0..10u32 {
        let answer = b
            .call(
                A,
                Bytes::from(i.to_le_bytes().to_vec()),
                Duration::from_secs(2),
            )
            .await
            .expect("a small call is not stuck behind large frames");
        assert_eq!(answer[..], i.to_le_bytes()[..]);
    }
    assert!(
        a.send_queue_bytes(B) > 0,
        "the large messages were still stuck"
    );
    let mut got = 0;
    while got < messages {
        match wait_event(&b, Duration::from_secs(10), |e| {
            matches!(e, Event::Message { .. })
        })
        .await
        {
            Some(Event::Message { payload, .. }) => {
                assert_eq!(payload, large);
                got += 1;
            }
            other => panic!("after {got} large messages: {other:?}"),
        }
    }
}

/// Waits until `done()` holds, checking every few milliseconds, at most `limit`.
async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    done()
}

#[tokio::test]
async fn queues_stay_within_their_byte_bounds_with_maximum_size_frames() {
    const MAX_PAYLOAD: usize = 1 << 20;
    const SEND_QUEUE: usize = 4 << 20;
    const EVENT_QUEUE: usize = 4 << 20;
    let frame = MAX_PAYLOAD + duplex_transport::wire::FRAME_HEADER_MAX_BYTES;
    let (_certs, a, b) = pair_with(
        |c| {
            c.limits.max_frame_bytes = frame;
            c.limits.bulk_queue_bytes = SEND_QUEUE;
        },
        |c| {
            c.limits.max_frame_bytes = frame;
            c.limits.event_queue_bytes = EVENT_QUEUE;
        },
    )
    .await;
    // B's application does not drain; A sends maximum-size messages until its queue refuses.
    let payload = Bytes::from(vec![9u8; MAX_PAYLOAD]);
    let (mut sent, mut refused) = (0usize, 0usize);
    for _ in 0..256 {
        match a.send(B, payload.clone()) {
            Ok(()) => sent += 1,
            Err(TransportError::QueueFull { limit_bytes, .. }) => {
                assert_eq!(limit_bytes, SEND_QUEUE);
                refused += 1;
                if refused >= 20 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => panic!("send: {e}"),
        }
        assert!(
            a.send_queue_bytes(B) <= SEND_QUEUE,
            "send queue holds {} bytes",
            a.send_queue_bytes(B)
        );
        assert!(
            b.event_queue_bytes() <= EVENT_QUEUE,
            "event queue holds {} bytes",
            b.event_queue_bytes()
        );
    }
    println!(
        "sent {sent}, refused {refused}; A queues {} bytes, B holds {} bytes of events",
        a.send_queue_bytes(B),
        b.event_queue_bytes()
    );
    assert!(refused >= 20, "the sender met the bound ({sent} sent)");
    assert!(sent < 64, "{sent} maximum-size frames accepted");
    let mut got = 0;
    while got < sent {
        match wait_event(&b, Duration::from_secs(10), |e| {
            matches!(e, Event::Message { .. })
        })
        .await
        {
            Some(_) => got += 1,
            None => panic!("only {got} of {sent} accepted messages arrived"),
        }
    }
}

#[tokio::test]
async fn a_peer_cannot_open_more_streams_than_the_two_lanes() {
    let (certs, a, _b) = pair(|_| {}).await;
    let greedy = EndpointId::new(3, 0);
    a.add_peer(greedy, nowhere());
    let server = a.local_addrs().expect("addrs").main;
    let (_ep, conn, _control, _bulk) = raw_link(certs.path(), greedy, server, A.node).await;
    let third = tokio::time::timeout(Duration::from_millis(3 * DETECTION_MS), conn.open_bi()).await;
    assert!(
        third.is_err(),
        "a third stream was granted: streams a peer never uses could grow our memory"
    );
}

#[tokio::test]
async fn handshakes_in_progress_are_bounded_and_silent_connections_closed() {
    let (certs, a, b) = pair(|c| {
        c.max_incoming_handshakes = 2;
        c.handshake_timeout_ms = 1000;
    })
    .await;
    let _b_events = serve_echo(b.clone());
    let server = a.local_addrs().expect("addrs").main;
    // Two connections finish TLS and never say hello: they hold both handshake slots.
    let silent = [
        raw_client(certs.path(), 3, server, A.node).await,
        raw_client(certs.path(), 3, server, A.node).await,
    ];
    let creds = Credentials::load_node(certs.path(), 3).expect("credentials");
    let (_, client_config) = quinn_configs(
        &creds,
        QuicTiming {
            idle_timeout_ms: 5000,
            keep_alive_interval_ms: None,
        },
    )
    .expect("client config");
    let mut extra =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
    extra.set_default_client_config(client_config);
    let third = tokio::time::timeout(
        Duration::from_secs(5),
        extra
            .connect(server, &node_server_name(A.node))
            .expect("connect"),
    )
    .await
    .expect("answered in time");
    assert!(third.is_err(), "a third handshake was taken up: {third:?}");
    for (_ep, conn, _send, _recv) in &silent {
        let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        assert!(closed.is_ok(), "a connection without hello was kept");
    }
    // The slots are free again, and the cluster's own link never noticed.
    let (_ep, _conn, _send, _recv) = raw_client(certs.path(), 3, server, A.node).await;
    let answer = a
        .call(B, Bytes::from_static(b"fine"), Duration::from_secs(2))
        .await
        .expect("call");
    assert_eq!(&answer[..], b"fine");
}
