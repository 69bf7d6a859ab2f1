//! One conformance suite for both implementations of `Transport`: every clause below runs
//! against the QUIC transport (two endpoints on loopback, real time) and against the simulated
//! twin (virtual time, seeded), so the twin cannot drift from the real thing. A `World` hides
//! only how time passes and how a peer crashes and restarts; the clauses see the `Transport`
//! trait alone. B always answers requests with their payload and records everything else.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use duplex_transport::certs::{Credentials, ensure_cluster_certs};
use duplex_transport::{
    DetectorConfig, EndpointId, Event, Limits, PROTOCOL_VERSION, Path, PeerEvent, QuicConfig,
    QuicTransport, SimConfig, SimNetwork, SimTransport, StreamId, Transport, TransportError,
};

const A: EndpointId = EndpointId::new(1, 0);
const B: EndpointId = EndpointId::new(2, 0);
const DETECTION_MS: u64 = 300;
const SEED: u64 = 0xc0f0_0001;

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// How a clause wants its world.
#[derive(Debug, Clone, Copy)]
struct Setup {
    limits: Limits,
    b_version: u16,
    /// Whether to wait for A and B to hear each other before the clause starts.
    expect_up: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            limits: Limits::default(),
            b_version: PROTOCOL_VERSION,
            expect_up: true,
        }
    }
}

/// Two endpoints, A (1.0) and B (2.0), and the passing of time.
trait World: Sized {
    type T: Transport;
    async fn start(setup: Setup) -> Self;
    fn a(&self) -> &Self::T;
    fn b(&self) -> &Self::T;
    /// Everything B heard except requests (which it answered).
    fn b_seen(&self) -> Vec<Event>;
    fn clear_b_seen(&self);
    /// Lets time pass until `done()` holds, at most `limit`; whether it held.
    async fn run_until(&self, limit: Duration, done: impl FnMut() -> bool) -> bool;
    /// Lets time pass until `future` is ready, at most `limit`.
    async fn block_on<F: Future>(&self, future: F, limit: Duration) -> Option<F::Output>;
    /// Cuts every path between A and B, both ways.
    fn partition(&self);
    /// B's process dies without a word.
    async fn crash_b(&mut self);
    /// B's process starts again (a new incarnation).
    async fn restart_b(&mut self);

    /// Waits until A and B see each other up, then forgets what either heard so far.
    async fn settle(&self) {
        let up = self
            .run_until(Duration::from_secs(10), || {
                self.a().peer_status(B).is_some_and(|s| s.up)
                    && self.b().peer_status(A).is_some_and(|s| s.up)
            })
            .await;
        assert!(up, "A and B came up");
        while self.a().try_next_event().is_some() {}
        self.clear_b_seen();
    }

    /// The next event at A within `limit`.
    async fn next_a(&self, limit: Duration) -> Option<Event> {
        let mut got = None;
        self.run_until(limit, || {
            got = self.a().try_next_event();
            got.is_some()
        })
        .await;
        got
    }
}

// ---- QUIC: two endpoints on loopback in this process ----

struct QuicWorld {
    certs: tempfile::TempDir,
    setup: Setup,
    a: QuicTransport,
    b: QuicTransport,
    b_seen: Arc<Mutex<Vec<Event>>>,
    b_server: tokio::task::JoinHandle<()>,
}

async fn quic_endpoint(
    certs: &std::path::Path,
    id: EndpointId,
    setup: &Setup,
    version: u16,
    incarnation: u64,
) -> QuicTransport {
    let creds = Credentials::load_node(certs, id.node).expect("credentials");
    let mut config = QuicConfig::new(id, "127.0.0.1:0".parse().expect("addr"), creds);
    config.detector = DetectorConfig::with_detection_time_ms(DETECTION_MS);
    config.limits = setup.limits;
    config.protocol_version = version;
    config.incarnation = incarnation;
    QuicTransport::bind(config).await.expect("bind")
}

fn serve(b: QuicTransport, seen: Arc<Mutex<Vec<Event>>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(event) = b.next_event().await {
            match event {
                Event::Request {
                    from, id, payload, ..
                } => {
                    let _ = b.respond(from, id, payload);
                }
                other => seen.lock().unwrap_or_else(|p| p.into_inner()).push(other),
            }
        }
    })
}

impl World for QuicWorld {
    type T = QuicTransport;

    async fn start(setup: Setup) -> Self {
        let certs = tempfile::tempdir().expect("tempdir");
        ensure_cluster_certs(certs.path(), &[1, 2]).expect("cluster certs");
        let a = quic_endpoint(certs.path(), A, &setup, PROTOCOL_VERSION, 1).await;
        let b = quic_endpoint(certs.path(), B, &setup, setup.b_version, 1).await;
        a.add_peer(B, b.local_addrs().expect("addrs"));
        b.add_peer(A, a.local_addrs().expect("addrs"));
        let b_seen = Arc::new(Mutex::new(Vec::new()));
        let b_server = serve(b.clone(), Arc::clone(&b_seen));
        let world = QuicWorld {
            certs,
            setup,
            a,
            b,
            b_seen,
            b_server,
        };
        if setup.expect_up {
            world.settle().await;
        }
        world
    }

    fn a(&self) -> &QuicTransport {
        &self.a
    }

    fn b(&self) -> &QuicTransport {
        &self.b
    }

    fn b_seen(&self) -> Vec<Event> {
        self.b_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn clear_b_seen(&self) {
        self.b_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    async fn run_until(&self, limit: Duration, mut done: impl FnMut() -> bool) -> bool {
        let start = Instant::now();
        loop {
            if done() {
                return true;
            }
            if start.elapsed() >= limit {
                return false;
            }
            tokio::time::sleep(ms(2)).await;
        }
    }

    async fn block_on<F: Future>(&self, future: F, limit: Duration) -> Option<F::Output> {
        tokio::time::timeout(limit, future).await.ok()
    }

    fn partition(&self) {
        self.a.faults().partition(B, &Path::ALL);
        self.b.faults().partition(A, &Path::ALL);
    }

    async fn crash_b(&mut self) {
        self.b_server.abort();
        self.b.close();
    }

    async fn restart_b(&mut self) {
        let incarnation = self.b.incarnation() + 1;
        let b = quic_endpoint(
            self.certs.path(),
            B,
            &self.setup,
            self.setup.b_version,
            incarnation,
        )
        .await;
        b.add_peer(A, self.a.local_addrs().expect("addrs"));
        self.a.add_peer(B, b.local_addrs().expect("addrs"));
        self.b_server = serve(b.clone(), Arc::clone(&self.b_seen));
        self.b = b;
    }
}

// ---- The simulated twin ----

struct SimWorld {
    net: SimNetwork,
    a: SimTransport,
    b: SimTransport,
    b_seen: Mutex<Vec<Event>>,
}

impl SimWorld {
    /// One step of virtual time, then B's application runs.
    fn step(&self) {
        self.net.run_for(Duration::from_micros(100));
        while let Some(event) = self.b.try_next_event() {
            match event {
                Event::Request {
                    from, id, payload, ..
                } => {
                    let _ = self.b.respond(from, id, payload);
                }
                other => self
                    .b_seen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(other),
            }
        }
    }
}

impl World for SimWorld {
    type T = SimTransport;

    async fn start(setup: Setup) -> Self {
        println!("seed {SEED}");
        let config = SimConfig {
            detector: DetectorConfig::with_detection_time_ms(DETECTION_MS),
            limits: setup.limits,
            ..SimConfig::default()
        };
        let net = SimNetwork::new(SEED, config).expect("valid sim config");
        let a = net.add_endpoint(A, &[Path::Main]);
        let b = net.add_endpoint_with_version(B, &[Path::Main], setup.b_version);
        let world = SimWorld {
            net,
            a,
            b,
            b_seen: Mutex::new(Vec::new()),
        };
        if setup.expect_up {
            world.settle().await;
        }
        world
    }

    fn a(&self) -> &SimTransport {
        &self.a
    }

    fn b(&self) -> &SimTransport {
        &self.b
    }

    fn b_seen(&self) -> Vec<Event> {
        self.b_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn clear_b_seen(&self) {
        self.b_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    async fn run_until(&self, limit: Duration, mut done: impl FnMut() -> bool) -> bool {
        let deadline = self.net.now() + limit;
        loop {
            if done() {
                return true;
            }
            if self.net.now() >= deadline {
                return false;
            }
            self.step();
        }
    }

    async fn block_on<F: Future>(&self, future: F, limit: Duration) -> Option<F::Output> {
        let mut future = std::pin::pin!(future);
        let deadline = self.net.now() + limit;
        loop {
            let polled = std::future::poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await;
            if let Poll::Ready(out) = polled {
                return Some(out);
            }
            if self.net.now() >= deadline {
                return None;
            }
            self.step();
        }
    }

    fn partition(&self) {
        self.net.partition(A, B, &Path::ALL);
    }

    async fn crash_b(&mut self) {
        self.net.crash(B);
    }

    async fn restart_b(&mut self) {
        self.net.restart(B);
    }
}

// ---- The clauses ----

/// Polls `future` once (so a `call` registers its request), then drops it.
async fn poll_once_and_drop<F: Future>(future: F) {
    let mut future = std::pin::pin!(future);
    let first = std::future::poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx).is_pending())).await;
    assert!(first, "the call waits for its answer");
}

async fn calls_requests_messages_and_ordered_streams<W: World>() {
    let w = W::start(Setup::default()).await;
    let answer = w
        .block_on(
            w.a().call(B, Bytes::from_static(b"ping"), ms(2000)),
            ms(3000),
        )
        .await;
    assert_eq!(answer, Some(Ok(Bytes::from_static(b"ping"))));
    let id = w
        .a()
        .request(B, Bytes::from_static(b"event"), ms(2000))
        .expect("request");
    assert_eq!(
        w.next_a(ms(3000)).await,
        Some(Event::Response {
            from: B,
            incarnation: w.b().incarnation(),
            id,
            payload: Bytes::from_static(b"event")
        })
    );
    w.a().send(B, Bytes::from_static(b"note")).expect("send");
    for i in 0..20u8 {
        assert_eq!(
            w.a().stream_send(B, StreamId(4), Bytes::from(vec![i])),
            Ok(u64::from(i))
        );
    }
    let all_in = w
        .run_until(ms(3000), || {
            let seen = w.b_seen();
            seen.iter()
                .filter(|e| matches!(e, Event::Stream { .. }))
                .count()
                == 20
                && seen.iter().any(|e| matches!(e, Event::Message { .. }))
        })
        .await;
    assert!(all_in, "B heard {:?}", w.b_seen());
    let seqs: Vec<u64> = w
        .b_seen()
        .iter()
        .filter_map(|e| match e {
            Event::Stream { seq, payload, .. } => {
                assert_eq!(u64::from(payload[0]), *seq);
                Some(*seq)
            }
            _ => None,
        })
        .collect();
    assert_eq!(seqs, (0..20).collect::<Vec<u64>>());
}

async fn a_request_to_a_silent_peer_fails_once_with_a_timeout<W: World>() {
    let w = W::start(Setup::default()).await;
    w.partition();
    let id = w
        .a()
        .request(B, Bytes::from_static(b"lost"), ms(100))
        .expect("the peer is still up");
    let failed = w.next_a(ms(2000)).await;
    assert_eq!(
        failed,
        Some(Event::RequestFailed {
            to: B,
            id,
            error: TransportError::Timeout {
                peer: B,
                id: id.id,
                timeout_ms: 100
            }
        })
    );
    let more = w
        .next_a(ms(DETECTION_MS * 2))
        .await
        .filter(|e| !matches!(e, Event::Peer(_)));
    assert_eq!(more, None, "exactly one answer per request");
}

async fn a_peer_reported_down_is_unreachable_at_once<W: World>() {
    let mut w = W::start(Setup::default()).await;
    let incarnation = w.b().incarnation();
    w.crash_b().await;
    let down = w.next_a(ms(2000)).await;
    assert_eq!(
        down,
        Some(Event::Peer(PeerEvent::Down {
            peer: B,
            incarnation
        }))
    );
    let unreachable = Err(TransportError::Unreachable { peer: B });
    assert_eq!(w.a().send(B, Bytes::from_static(b"m")), unreachable);
    assert_eq!(
        w.a()
            .request(B, Bytes::from_static(b"r"), ms(100))
            .map(|_| ()),
        unreachable
    );
    assert_eq!(
        w.a()
            .stream_send(B, StreamId(1), Bytes::from_static(b"s"))
            .map(|_| ()),
        unreachable
    );
    let call = w
        .block_on(w.a().call(B, Bytes::from_static(b"c"), ms(100)), ms(1000))
        .await;
    assert_eq!(call.map(|c| c.map(|_| ())), Some(unreachable));
}

async fn a_dropped_call_frees_its_pending_slot<W: World>() {
    let limits = Limits {
        max_pending_requests: 2,
        ..Limits::default()
    };
    let w = W::start(Setup {
        limits,
        ..Setup::default()
    })
    .await;
    // Nothing is answered while B is cut off, so a call only ends by timeout or by drop.
    w.partition();
    for _ in 0..5 {
        poll_once_and_drop(w.a().call(B, Bytes::from_static(b"c"), ms(60_000))).await;
    }
    for _ in 0..2 {
        w.a()
            .request(B, Bytes::from_static(b"r"), ms(60_000))
            .expect("the dropped calls left their slots free");
    }
    assert_eq!(
        w.a()
            .request(B, Bytes::from_static(b"r"), ms(60_000))
            .map(|_| ()),
        Err(TransportError::TooManyRequests { local: A, limit: 2 }),
        "the bound still holds"
    );
}

async fn a_quick_restart_is_reported_as_a_new_incarnation<W: World>() {
    let mut w = W::start(Setup::default()).await;
    let old = w.b().incarnation();
    w.crash_b().await;
    w.restart_b().await;
    let new = w.b().incarnation();
    assert!(new > old, "incarnations rise: {old} then {new}");
    let mut events = Vec::new();
    let came_back = w
        .run_until(ms(DETECTION_MS / 2 + 200), || {
            if let Some(e) = w.a().try_next_event() {
                events.push(e);
            }
            events.len() == 2
        })
        .await;
    assert!(came_back, "A heard only {events:?}");
    assert_eq!(
        events,
        vec![
            Event::Peer(PeerEvent::Down {
                peer: B,
                incarnation: old
            }),
            Event::Peer(PeerEvent::Up {
                peer: B,
                incarnation: new
            })
        ],
        "the restart is seen before the detection time, as a new incarnation"
    );
    let answer = w
        .block_on(
            w.a().call(B, Bytes::from_static(b"new"), ms(2000)),
            ms(3000),
        )
        .await;
    assert_eq!(answer, Some(Ok(Bytes::from_static(b"new"))));
}

async fn peer_events_come_before_data_queued_earlier<W: World>() {
    let w = W::start(Setup::default()).await;
    for i in 0..5u8 {
        w.b().send(A, Bytes::from(vec![i])).expect("send");
    }
    let queued = w.run_until(ms(2000), || w.a().queued_events() == 5).await;
    assert!(queued, "A queued B's messages");
    w.partition();
    let down = w
        .run_until(ms(2000), || w.a().peer_status(B).is_some_and(|s| !s.up))
        .await;
    assert!(down, "A's detector lost B");
    let first = w.a().try_next_event();
    assert!(
        matches!(first, Some(Event::Peer(PeerEvent::Down { peer: B, .. }))),
        "{first:?}"
    );
    let rest: Vec<Event> = std::iter::from_fn(|| w.a().try_next_event()).collect();
    assert_eq!(rest.len(), 5, "{rest:?}");
    assert!(rest.iter().all(|e| matches!(e, Event::Message { .. })));
}

async fn payloads_beyond_the_limit_are_refused_alike<W: World>() {
    let limits = Limits {
        max_frame_bytes: 1024 + duplex_transport::wire::FRAME_HEADER_MAX_BYTES,
        ..Limits::default()
    };
    let w = W::start(Setup {
        limits,
        ..Setup::default()
    })
    .await;
    let too_large = Err(TransportError::TooLarge {
        peer: B,
        size_bytes: 1025,
        max_bytes: 1024,
    });
    let big = Bytes::from(vec![0u8; 1025]);
    assert_eq!(w.a().send(B, big.clone()), too_large);
    assert_eq!(
        w.a().request(B, big.clone(), ms(100)).map(|_| ()),
        too_large
    );
    assert_eq!(
        w.a().stream_send(B, StreamId(2), big.clone()).map(|_| ()),
        too_large
    );
    let call = w.block_on(w.a().call(B, big, ms(100)), ms(1000)).await;
    assert_eq!(call.map(|c| c.map(|_| ())), Some(too_large));
    assert_eq!(
        w.a()
            .stream_send(B, StreamId(2), Bytes::from(vec![0u8; 1024])),
        Ok(0),
        "a refused frame consumed no number"
    );
}

async fn adjacent_versions_talk_at_the_lower_and_others_never_meet<W: World>() {
    let w = W::start(Setup {
        b_version: PROTOCOL_VERSION + 1,
        ..Setup::default()
    })
    .await;
    assert_eq!(w.a().link_version(B, Path::Main), Some(PROTOCOL_VERSION));
    assert_eq!(w.b().link_version(A, Path::Main), Some(PROTOCOL_VERSION));
    let w = W::start(Setup {
        b_version: PROTOCOL_VERSION + 2,
        expect_up: false,
        ..Setup::default()
    })
    .await;
    let met = w
        .run_until(ms(3 * DETECTION_MS), || {
            w.a().peer_status(B).is_some_and(|s| s.up) || w.b().peer_status(A).is_some_and(|s| s.up)
        })
        .await;
    assert!(!met, "versions two apart never come up");
    assert_eq!(w.a().link_version(B, Path::Main), None);
}

/// Review finding: request ids restart at 1 in every incarnation and a response is matched by
/// (peer, id) only, so a late answer to the previous incarnation's request answers the new
/// incarnation's request that reuses its id.
async fn a_late_answer_to_the_previous_incarnation_never_answers_a_new_request<W: World>() {
    let mut w = W::start(Setup::default()).await;
    let old_id = w
        .b()
        .request(A, Bytes::from_static(b"old question"), ms(10_000))
        .expect("request");
    let asked = w.next_a(ms(2000)).await;
    let Some(Event::Request {
        from: B,
        id: heard,
        incarnation: asked_by,
        ..
    }) = asked
    else {
        panic!("A heard {asked:?}");
    };
    assert_eq!(
        asked_by,
        w.b().incarnation(),
        "a data event names its sender's incarnation"
    );
    w.crash_b().await;
    w.restart_b().await;
    let new_inc = w.b().incarnation();
    let back = w
        .run_until(ms(5000), || {
            while w.a().try_next_event().is_some() {}
            w.a()
                .peer_status(B)
                .is_some_and(|s| s.up && s.incarnation == Some(new_inc))
                && w.b().peer_status(A).is_some_and(|s| s.up)
        })
        .await;
    assert!(back, "B came back");
    let new_id = w
        .b()
        .request(A, Bytes::from_static(b"new question"), ms(10_000))
        .expect("request");
    // A's application was slow: it answers the old question only now.
    w.a()
        .respond(B, heard, Bytes::from_static(b"answer to the OLD question"))
        .expect("respond");
    w.run_until(ms(1000), || {
        w.b_seen()
            .iter()
            .any(|e| matches!(e, Event::Response { .. }))
    })
    .await;
    let responses: Vec<Event> = w
        .b_seen()
        .into_iter()
        .filter(|e| matches!(e, Event::Response { .. }))
        .collect();
    assert!(
        !responses
            .iter()
            .any(|e| matches!(e, Event::Response { id, payload, .. }
            if *id == new_id && &payload[..] == b"answer to the OLD question")),
        "old id {old_id:?}, new id {new_id:?}: the new incarnation's request got its predecessor's answer: {responses:?}"
    );
}

/// Review finding: where QUIC makes the reader wait for room, the twin drops the frame; for a
/// response to a `request` that breaks "exactly one Response or RequestFailed per request".
async fn a_request_is_answered_exactly_once_even_when_the_event_queue_is_full<W: World>() {
    let limits = Limits {
        event_queue_events: 1,
        ..Limits::default()
    };
    let w = W::start(Setup {
        limits,
        ..Setup::default()
    })
    .await;
    w.b()
        .send(A, Bytes::from_static(b"fills A's queue"))
        .expect("send");
    assert!(w.run_until(ms(2000), || w.a().queued_events() >= 1).await);
    let id = w
        .a()
        .request(B, Bytes::from_static(b"q"), ms(500))
        .expect("request");
    // A's application is busy for a while; B answers at once.
    w.run_until(ms(300), || false).await;
    let mut answers = Vec::new();
    w.run_until(ms(1500), || {
        while let Some(e) = w.a().try_next_event() {
            if matches!(&e, Event::Response { id: r, .. } | Event::RequestFailed { id: r, .. } if *r == id)
            {
                answers.push(e);
            }
        }
        false
    })
    .await;
    assert_eq!(answers.len(), 1, "request {id:?} got {answers:?}");
}

macro_rules! conformance {
    ($($clause:ident),* $(,)?) => {
        mod quic {
            $(#[tokio::test] async fn $clause() { super::$clause::<super::QuicWorld>().await })*
        }
        mod sim {
            $(#[tokio::test] async fn $clause() { super::$clause::<super::SimWorld>().await })*
        }
    };
}

conformance!(
    calls_requests_messages_and_ordered_streams,
    a_request_to_a_silent_peer_fails_once_with_a_timeout,
    a_peer_reported_down_is_unreachable_at_once,
    a_dropped_call_frees_its_pending_slot,
    a_quick_restart_is_reported_as_a_new_incarnation,
    peer_events_come_before_data_queued_earlier,
    payloads_beyond_the_limit_are_refused_alike,
    adjacent_versions_talk_at_the_lower_and_others_never_meet,
    a_late_answer_to_the_previous_incarnation_never_answers_a_new_request,
    a_request_is_answered_exactly_once_even_when_the_event_queue_is_full,
);
