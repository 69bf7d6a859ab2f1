//! The real transport: QUIC on quinn with mutual TLS, one connection per peer pair and path,
//! one long-lived bidirectional stream per connection carrying every frame.
//!
//! Why this shape: on 2-vCPU machines every thread hand-off costs tens of microseconds, and
//! opening a stream per message costs far more than reusing one. So each link has exactly one
//! stream, one writer task that batches whatever is queued into one `write_all_chunks`, and one
//! reader task that decodes frames and hands them straight to the caller's event queue or the
//! waiting `call`. Run it on a current-thread runtime and every hop stays on one thread.
//!
//! Who dials: for each pair, the endpoint with the lower id dials (and redials with backoff),
//! the other accepts; so there is never more than one connection per pair and path. A newer
//! connection from the same peer and path replaces the older one (the peer restarted).
//!
//! Failure detection is the sans-IO `FailureDetector`, fed by the frames the readers see (once
//! per received chunk) and ticked by one timer task; keep-alives are ordinary frames on the
//! same stream, so a stalled stream looks exactly like a dead peer.
//!
//! The detector never waits on the application: peer events and request failures go to a
//! small control queue that never blocks (peer events coalesce per peer when it is full), and
//! `next_event` serves it before data. A reader blocked because the application stopped
//! draining data events keeps the peer alive in the detector from the connection's received
//! packets, so a slow consumer never turns into a false `Down` on either side.
//!
//! Trust: the acceptor binds the hello's claimed node to the client certificate (its SAN must
//! be `node-N.duplex` of the claimed node), so a cluster certificate of node 3 cannot pose as
//! node 2; and a response is taken only from the peer the request went to.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn::{Connection, RecvStream, SendStream, VarInt};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use thiserror::Error;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::addr::{EndpointId, Path, PeerAddrs};
use crate::certs::{
    CertError, NodeCredentials, QuicTiming, node_server_name, quinn_configs,
    verify_node_certificate,
};
use crate::detector::{DetectorAction, DetectorConfig, FailureDetector, PeerStatus};
use crate::transport::{Event, RequestId, Transport, TransportError};
use crate::wire::{
    self, DEFAULT_MAX_FRAME_BYTES, Frame, FrameDecoder, FrameError, Hello, PROTOCOL_VERSION,
    StreamId, negotiate_version,
};

/// Application close codes, so the other side's log says why its connection ended.
pub mod close_code {
    pub const SHUTDOWN: u32 = 0;
    pub const BAD_FRAME: u32 = 1;
    pub const VERSION_REFUSED: u32 = 2;
    pub const HANDSHAKE_FAILED: u32 = 3;
    pub const REPLACED: u32 = 4;
}

/// Largest header after the kind byte, plus the kind byte.
const FRAME_OVERHEAD_BYTES: usize = 13;

/// Peer events held for an application that is not draining; beyond this, older events of the
/// same peer are coalesced away (its latest state always stays queued).
const PEER_EVENTS_QUEUED_MAX: usize = 1024;

/// Longest request deadline: the wire carries `timeout_ms` as u32 (about 49 days).
const REQUEST_TIMEOUT_MAX: Duration = Duration::from_millis(u32::MAX as u64);

/// Longest injected delay; larger values are capped, so release times never overflow.
const FAULT_DELAY_MAX_MS: u64 = 3_600_000;

#[derive(Debug, Clone)]
pub struct QuicConfig {
    pub local: EndpointId,
    pub main_bind: SocketAddr,
    pub failsafe_bind: Option<SocketAddr>,
    pub credentials: NodeCredentials,
    pub detector: DetectorConfig,
    pub max_frame_bytes: usize,
    /// Frames queued per link before `send` fails with `QueueFull`.
    pub send_queue_frames: usize,
    /// Events queued before readers stop reading (QUIC flow control then slows the sender).
    pub event_queue_events: usize,
    /// Requests (`request` and `call`) waiting for a response before new ones fail with
    /// `TooManyRequests`.
    pub max_pending_requests: usize,
    pub reconnect_backoff_min_ms: u64,
    pub reconnect_backoff_max_ms: u64,
    /// Time allowed for TLS plus the hello exchange.
    pub handshake_timeout_ms: u64,
    /// The version this endpoint announces; other than `PROTOCOL_VERSION` only in upgrade tests.
    pub protocol_version: u16,
}

impl QuicConfig {
    pub fn new(local: EndpointId, main_bind: SocketAddr, credentials: NodeCredentials) -> Self {
        QuicConfig {
            local,
            main_bind,
            failsafe_bind: None,
            credentials,
            detector: DetectorConfig::default(),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            send_queue_frames: 4096,
            event_queue_events: 4096,
            max_pending_requests: 65_536,
            reconnect_backoff_min_ms: 20,
            reconnect_backoff_max_ms: 1000,
            handshake_timeout_ms: 2000,
            protocol_version: PROTOCOL_VERSION,
        }
    }
}

#[derive(Debug, Error)]
pub enum QuicError {
    #[error("binding the {path} path of {local} to {addr}: {source}")]
    Bind {
        local: EndpointId,
        path: Path,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cert(#[from] CertError),
}

/// Why a link's session ended; logged with the peer and path.
#[derive(Debug, Error)]
enum LinkError {
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Version(#[from] crate::wire::VersionError),
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("stream closed by peer")]
    Finished,
}

/// Faults injected by tests and drills: everything to and from a peer can be dropped (per
/// path), delayed, or dropped at random. Applied to every frame, keep-alives included.
#[derive(Debug, Clone, Default)]
pub struct FaultInjector {
    active: Arc<AtomicBool>,
    state: Arc<Mutex<FaultState>>,
}

#[derive(Debug, Default)]
struct FaultState {
    cut: BTreeMap<(EndpointId, Path), ()>,
    delay_ms: BTreeMap<EndpointId, u64>,
    drop_probability: BTreeMap<EndpointId, f64>,
    rng: Option<ChaCha8Rng>,
}

impl FaultInjector {
    fn lock(&self) -> MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refresh(&self, s: &FaultState) {
        let any = !s.cut.is_empty() || !s.delay_ms.is_empty() || !s.drop_probability.is_empty();
        self.active.store(any, Ordering::Release);
    }

    /// Drops every frame to and from `peer` on `paths`.
    pub fn partition(&self, peer: EndpointId, paths: &[Path]) {
        let mut s = self.lock();
        for &p in paths {
            s.cut.insert((peer, p), ());
        }
        self.refresh(&s);
        info!(%peer, ?paths, "fault: partition");
    }

    pub fn heal(&self, peer: EndpointId, paths: &[Path]) {
        let mut s = self.lock();
        for &p in paths {
            s.cut.remove(&(peer, p));
        }
        self.refresh(&s);
        info!(%peer, ?paths, "fault: heal");
    }

    /// Delays every frame heard from `peer` by `delay_ms` (0 removes the delay; capped at an
    /// hour). Each frame is stamped on arrival and released at arrival + delay, in order, so
    /// the delay is added latency, not a per-frame pause.
    pub fn set_delay_ms(&self, peer: EndpointId, delay_ms: u64) {
        let delay_ms = delay_ms.min(FAULT_DELAY_MAX_MS);
        let mut s = self.lock();
        if delay_ms == 0 {
            s.delay_ms.remove(&peer);
        } else {
            s.delay_ms.insert(peer, delay_ms);
        }
        self.refresh(&s);
        info!(%peer, delay_ms, "fault: delay");
    }

    /// Drops this fraction of frames to and from `peer` (0 removes the fault).
    pub fn set_drop_probability(&self, peer: EndpointId, probability: f64, seed: u64) {
        let mut s = self.lock();
        if probability <= 0.0 {
            s.drop_probability.remove(&peer);
        } else {
            s.drop_probability.insert(peer, probability.min(1.0));
            s.rng = Some(ChaCha8Rng::seed_from_u64(seed));
        }
        self.refresh(&s);
        info!(%peer, probability, "fault: random drop");
    }

    pub fn clear(&self) {
        let mut s = self.lock();
        *s = FaultState::default();
        self.refresh(&s);
    }

    /// Whether this frame is lost; the fast path is one atomic load.
    fn drops(&self, peer: EndpointId, path: Path) -> bool {
        if !self.active.load(Ordering::Acquire) {
            return false;
        }
        let mut s = self.lock();
        if s.cut.contains_key(&(peer, path)) {
            return true;
        }
        match (s.drop_probability.get(&peer).copied(), s.rng.as_mut()) {
            (Some(p), Some(rng)) => rng.random_bool(p),
            _ => false,
        }
    }

    /// Whether every frame on this path is cut (no randomness consumed).
    fn is_cut(&self, peer: EndpointId, path: Path) -> bool {
        self.active.load(Ordering::Acquire) && self.lock().cut.contains_key(&(peer, path))
    }

    fn delay(&self, peer: EndpointId) -> Option<Duration> {
        if !self.active.load(Ordering::Acquire) {
            return None;
        }
        self.lock()
            .delay_ms
            .get(&peer)
            .map(|ms| Duration::from_millis(*ms))
    }
}

/// Payloads up to this size are copied into the writer's batch buffer next to their header:
/// one copy is cheaper than one more chunk per frame; larger payloads go out without a copy.
const COPY_PAYLOAD_MAX_BYTES: usize = 1024;

#[derive(Debug, Clone)]
struct Link {
    conn: Connection,
    tx: mpsc::Sender<Frame>,
    /// Tells a replaced link apart from its successor when it ends.
    generation: u64,
    /// The protocol version this link speaks: the lower of the two announced.
    version: u16,
}

#[derive(Debug, Default)]
struct PeerEntry {
    addrs: Option<PeerAddrs>,
    links: BTreeMap<Path, Link>,
    stream_next_seq: BTreeMap<StreamId, u64>,
    dialing: bool,
}

#[derive(Debug)]
enum Waiter {
    Event {
        to: EndpointId,
        deadline: Duration,
        timeout_ms: u64,
    },
    Call {
        to: EndpointId,
        tx: oneshot::Sender<Result<Bytes, TransportError>>,
    },
}

impl Waiter {
    /// The peer the request went to: the only one whose response is accepted.
    fn peer(&self) -> EndpointId {
        match self {
            Waiter::Event { to, .. } | Waiter::Call { to, .. } => *to,
        }
    }
}

#[derive(Debug)]
struct Inner {
    config: QuicConfig,
    endpoints: BTreeMap<Path, quinn::Endpoint>,
    client_config: quinn::ClientConfig,
    epoch: Instant,
    peers: Mutex<BTreeMap<EndpointId, PeerEntry>>,
    detector: Mutex<FailureDetector>,
    detector_wake: Notify,
    events_tx: mpsc::Sender<Event>,
    events_rx: tokio::sync::Mutex<mpsc::Receiver<Event>>,
    /// Peer events and request failures: never blocks its producers, served before data.
    control: Mutex<VecDeque<Event>>,
    control_wake: Notify,
    /// Flips to true once, at `close`; wakes every `next_event`.
    closed_tx: watch::Sender<bool>,
    pending: Mutex<BTreeMap<u64, Waiter>>,
    next_request_id: AtomicU64,
    next_generation: AtomicU64,
    faults: FaultInjector,
    closed: AtomicBool,
    shutdown: Notify,
}

/// An endpoint of the QUIC transport. Cheap to clone; all clones share the endpoint.
#[derive(Debug, Clone)]
pub struct QuicTransport {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing holding these locks can leave the data half-updated on panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn local(&self) -> EndpointId {
        self.config.local
    }

    fn max_payload_bytes(&self) -> usize {
        self.config
            .max_frame_bytes
            .saturating_sub(FRAME_OVERHEAD_BYTES)
    }

    /// Whether data should prefer the main path: yes unless the detector hears the peer only
    /// on the failsafe path.
    fn main_preferred(&self, to: EndpointId) -> bool {
        let d = lock(&self.detector);
        !(d.path_up(to, Path::Main) == Some(false) && d.path_up(to, Path::Failsafe) == Some(true))
    }

    /// The link data should use: main while the detector hears the peer there, else failsafe.
    /// Called under the peers lock; it takes the detector lock only when there is a choice
    /// (lock order: peers, then detector; nothing takes them the other way round).
    fn choose_link<'a>(&self, to: EndpointId, entry: &'a PeerEntry) -> Option<(Path, &'a Link)> {
        if entry.links.len() == 1 {
            return entry.links.iter().next().map(|(p, l)| (*p, l));
        }
        let order = if self.main_preferred(to) {
            [Path::Main, Path::Failsafe]
        } else {
            [Path::Failsafe, Path::Main]
        };
        order
            .iter()
            .find_map(|p| entry.links.get(p).map(|l| (*p, l)))
    }

    /// Queues a frame for the link's writer, which encodes it (no allocation per frame here).
    fn enqueue(
        &self,
        to: EndpointId,
        link: &Link,
        path: Path,
        frame: Frame,
    ) -> Result<(), TransportError> {
        if self.faults.drops(to, path) {
            debug!(peer = %to, %path, "fault: frame dropped on send");
            return Ok(());
        }
        link.tx.try_send(frame).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => TransportError::QueueFull {
                peer: to,
                limit: self.config.send_queue_frames,
            },
            mpsc::error::TrySendError::Closed(_) => TransportError::Unreachable { peer: to },
        })
    }

    /// Refuses early what can never be sent: a closed endpoint or an oversized payload.
    fn check_sendable(&self, to: EndpointId, size: usize) -> Result<(), TransportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed {
                local: self.local(),
            });
        }
        if size > self.max_payload_bytes() {
            return Err(TransportError::TooLarge {
                peer: to,
                size_bytes: size,
                max_bytes: self.max_payload_bytes(),
            });
        }
        Ok(())
    }

    fn unknown_peer(&self, peer: EndpointId) -> TransportError {
        TransportError::UnknownPeer {
            local: self.local(),
            peer,
        }
    }

    fn send_frame(&self, to: EndpointId, frame: Frame) -> Result<(), TransportError> {
        self.check_sendable(to, frame.payload().len())?;
        // Queued under the peers lock: one lock per send, no clone of the link.
        let peers = lock(&self.peers);
        let entry = peers.get(&to).ok_or_else(|| self.unknown_peer(to))?;
        let (path, link) = self
            .choose_link(to, entry)
            .ok_or(TransportError::Unreachable { peer: to })?;
        self.enqueue(to, link, path, frame)
    }

    /// Numbers and queues a stream frame in one critical section (the peers lock), so numbers
    /// follow queue order and a refused frame consumes no number.
    fn stream_send(
        &self,
        to: EndpointId,
        stream: StreamId,
        payload: Bytes,
    ) -> Result<u64, TransportError> {
        self.check_sendable(to, payload.len())?;
        let mut peers = lock(&self.peers);
        let entry = peers.get_mut(&to).ok_or_else(|| self.unknown_peer(to))?;
        let seq = entry.stream_next_seq.get(&stream).copied().unwrap_or(0);
        let (path, link) = self
            .choose_link(to, entry)
            .ok_or(TransportError::Unreachable { peer: to })?;
        self.enqueue(
            to,
            link,
            path,
            Frame::Stream {
                stream,
                seq,
                payload,
            },
        )?;
        entry.stream_next_seq.insert(stream, seq + 1);
        Ok(seq)
    }

    /// Registers a waiter for request `id`, within `max_pending_requests`.
    /// Sends request `id`, whose waiter is registered; forgets the waiter if it cannot be sent.
    fn send_request(
        &self,
        to: EndpointId,
        id: u64,
        timeout_ms: u32,
        payload: Bytes,
    ) -> Result<(), TransportError> {
        let sent = self.send_frame(
            to,
            Frame::Request {
                id,
                timeout_ms,
                payload,
            },
        );
        if sent.is_err() {
            lock(&self.pending).remove(&id);
        }
        sent
    }

    fn add_waiter(&self, id: u64, waiter: Waiter) -> Result<(), TransportError> {
        let mut pending = lock(&self.pending);
        if pending.len() >= self.config.max_pending_requests {
            return Err(TransportError::TooManyRequests {
                local: self.local(),
                limit: self.config.max_pending_requests,
            });
        }
        pending.insert(id, waiter);
        Ok(())
    }

    /// Queues a peer event or a request failure; never waits. Request failures are bounded by
    /// `max_pending_requests`; peer events beyond `PEER_EVENTS_QUEUED_MAX` replace the oldest
    /// queued event of the same peer, so its latest state is never lost.
    fn push_control(&self, event: Event) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut q = lock(&self.control);
        if let Event::Peer(new) = event {
            let queued = q.iter().filter(|e| matches!(e, Event::Peer(_))).count();
            if queued >= PEER_EVENTS_QUEUED_MAX
                && let Some(pos) = q
                    .iter()
                    .position(|e| matches!(e, Event::Peer(old) if old.peer() == new.peer()))
            {
                let old = q.remove(pos);
                warn!(local = %self.local(), ?old, ?new, "application not draining events: peer event coalesced");
            }
        }
        q.push_back(event);
        drop(q);
        self.control_wake.notify_one();
    }

    fn pop_control(&self) -> Option<Event> {
        lock(&self.control).pop_front()
    }

    /// Hands a data event to the application, waiting while its queue is full (the reader then
    /// stops reading and QUIC flow control slows the sender). While waiting, packets still
    /// arriving on the connection prove the peer alive, so the detector keeps hearing it.
    /// Returns whether it had to wait.
    async fn push_data_event(
        &self,
        peer: EndpointId,
        path: Path,
        conn: &Connection,
        event: Event,
    ) -> bool {
        let event = match self.events_tx.try_send(event) {
            Ok(()) => return false,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                debug!(local = %self.local(), "event dropped: endpoint closed");
                return false;
            }
            Err(mpsc::error::TrySendError::Full(event)) => event,
        };
        debug!(local = %self.local(), %peer, %path, "event queue full: reader waits for the application");
        let interval = Duration::from_millis(self.config.detector.keepalive_interval_ms.max(1));
        let mut seen = conn.stats().udp_rx.datagrams;
        let send = self.events_tx.send(event);
        tokio::pin!(send);
        loop {
            tokio::select! {
                sent = &mut send => {
                    if sent.is_err() {
                        debug!(local = %self.local(), "event dropped: endpoint closed");
                    }
                    return true;
                }
                _ = tokio::time::sleep(interval) => {
                    let now_seen = conn.stats().udp_rx.datagrams;
                    if now_seen != seen && !self.faults.is_cut(peer, path) {
                        self.heard(peer, path);
                    }
                    seen = now_seen;
                }
            }
        }
    }

    /// Tells the detector `peer` was heard on `path` and carries out what that changed.
    fn heard(&self, peer: EndpointId, path: Path) {
        let changed = {
            let mut d = lock(&self.detector);
            let was_up = d.path_up(peer, path);
            d.on_heard(peer, path, self.now());
            was_up != Some(true)
        };
        if changed {
            self.run_detector_actions();
        }
    }

    /// Carries out what the detector asked for: keep-alives out, events to the control queue.
    /// Never waits: keep-alives use `try_send`, events go to the control queue.
    fn run_detector_actions(&self) {
        loop {
            let action = lock(&self.detector).poll_action();
            let Some(action) = action else { break };
            match action {
                DetectorAction::SendKeepAlive { peer, path } => {
                    let peers = lock(&self.peers);
                    let link = peers.get(&peer).and_then(|e| e.links.get(&path));
                    if let Some(link) = link
                        && let Err(e) = self.enqueue(peer, link, path, Frame::KeepAlive)
                    {
                        debug!(%peer, %path, "keep-alive not queued: {e}");
                    }
                }
                DetectorAction::Report(event) => {
                    info!(local = %self.local(), ?event, "peer event");
                    self.push_control(Event::Peer(event));
                }
            }
        }
    }

    async fn detector_loop(self: Arc<Self>) {
        loop {
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            let now = self.now();
            lock(&self.detector).on_tick(now);
            self.run_detector_actions();
            self.expire_requests(now);
            let next = lock(&self.detector).next_deadline();
            let next_request = lock(&self.pending)
                .values()
                .filter_map(|w| {
                    if let Waiter::Event { deadline, .. } = w {
                        Some(*deadline)
                    } else {
                        None
                    }
                })
                .min();
            let wake_at = [next, next_request].into_iter().flatten().min();
            let sleep = wake_at.map_or(
                Duration::from_millis(self.config.detector.keepalive_interval_ms),
                |t| t.saturating_sub(self.now()),
            );
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.detector_wake.notified() => {}
                _ = self.shutdown.notified() => return,
            }
        }
    }

    fn expire_requests(&self, now: Duration) {
        let expired: Vec<Event> = {
            let mut pending = lock(&self.pending);
            let ids: Vec<u64> = pending
                .iter()
                .filter(|(_, w)| matches!(w, Waiter::Event { deadline, .. } if *deadline <= now))
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| match pending.remove(&id) {
                    Some(Waiter::Event { to, timeout_ms, .. }) => Some(Event::RequestFailed {
                        to,
                        id: RequestId(id),
                        error: TransportError::Timeout {
                            peer: to,
                            id,
                            timeout_ms,
                        },
                    }),
                    _ => None,
                })
                .collect()
        };
        for e in expired {
            self.push_control(e);
        }
    }

    fn hello(&self, path: Path) -> Bytes {
        let mut out = BytesMut::new();
        Frame::Hello(Hello {
            version: self.config.protocol_version,
            from: self.local(),
            path,
        })
        .encode(&mut out);
        out.freeze()
    }

    /// Reads frames until the peer's hello and negotiates the version; leftover bytes stay in
    /// the decoder. Returns the hello and the version the link will speak.
    async fn read_hello(
        &self,
        recv: &mut RecvStream,
        decoder: &mut FrameDecoder,
    ) -> Result<(Hello, u16), LinkError> {
        loop {
            match decoder.next_frame()? {
                Some(Frame::Hello(h)) => {
                    let version = negotiate_version(self.config.protocol_version, h.version)?;
                    return Ok((h, version));
                }
                Some(other) => {
                    return Err(LinkError::Handshake(format!(
                        "expected hello, found {other:?}"
                    )));
                }
                None => {}
            }
            match recv.read_chunk(64 * 1024, true).await? {
                Some(chunk) => decoder.push(&chunk.bytes),
                None => return Err(LinkError::Finished),
            }
        }
    }

    /// Closes `conn` with the close code that says why, when the error is one we detected
    /// (bad frame, version, handshake), and logs it; other errors only end the link.
    fn close_for(&self, conn: &Connection, peer: Option<EndpointId>, path: Path, e: &LinkError) {
        let code = match e {
            LinkError::Frame(_) => close_code::BAD_FRAME,
            LinkError::Version(_) => close_code::VERSION_REFUSED,
            LinkError::Handshake(_) => close_code::HANDSHAKE_FAILED,
            _ => {
                info!(local = %self.local(), ?peer, %path, "link ended: {e}");
                return;
            }
        };
        warn!(local = %self.local(), ?peer, %path, code, "closing connection: {e}");
        conn.close(VarInt::from_u32(code), e.to_string().as_bytes());
    }

    /// Registers a ready link and runs it until it ends.
    #[allow(clippy::too_many_arguments)]
    async fn run_link(
        self: &Arc<Self>,
        peer: EndpointId,
        path: Path,
        version: u16,
        conn: Connection,
        send: SendStream,
        mut recv: RecvStream,
        mut decoder: FrameDecoder,
    ) -> Result<(), LinkError> {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.config.send_queue_frames);
        let link = Link {
            conn: conn.clone(),
            tx,
            generation,
            version,
        };
        let replaced = {
            let mut peers = lock(&self.peers);
            peers.entry(peer).or_default().links.insert(path, link)
        };
        if let Some(old) = replaced {
            old.conn.close(
                VarInt::from_u32(close_code::REPLACED),
                b"replaced by a newer connection",
            );
        }
        info!(local = %self.local(), %peer, %path, version, "link established");
        // The peer's hello was the first frame heard on this link.
        self.heard(peer, path);
        self.detector_wake.notify_one();
        let writer =
            tokio::spawn(write_loop(send, rx).instrument(info_span!("writer", %peer, %path)));
        let result = self
            .read_loop(peer, path, &conn, &mut recv, &mut decoder)
            .await;
        writer.abort();
        {
            let mut peers = lock(&self.peers);
            if let Some(entry) = peers.get_mut(&peer)
                && entry
                    .links
                    .get(&path)
                    .is_some_and(|l| l.generation == generation)
            {
                entry.links.remove(&path);
            }
        }
        if let Err(e) = &result {
            self.close_for(&conn, Some(peer), path, e);
        }
        result
    }

    async fn read_loop(
        self: &Arc<Self>,
        peer: EndpointId,
        path: Path,
        conn: &Connection,
        recv: &mut RecvStream,
        decoder: &mut FrameDecoder,
    ) -> Result<(), LinkError> {
        // Created at the first delayed frame; from then on every frame of the link goes
        // through it, so delayed and undelayed frames keep their order.
        let mut delayed: Option<mpsc::Sender<(tokio::time::Instant, Frame)>> = None;
        loop {
            // Frames of one chunk arrived together: the detector hears them once, before the
            // first event may wait for room, and again after any such wait.
            let mut heard = false;
            while let Some(frame) = decoder.next_frame()? {
                if self.faults.drops(peer, path) {
                    debug!(%peer, %path, "fault: frame dropped on receive");
                    continue;
                }
                let delay = self.faults.delay(peer);
                if delay.is_none() && delayed.is_none() {
                    if !heard {
                        self.heard(peer, path);
                        heard = true;
                    }
                    if self.on_frame(peer, path, conn, frame).await? {
                        heard = false;
                    }
                    continue;
                }
                let release = tokio::time::Instant::now() + delay.unwrap_or_default();
                let queue =
                    delayed.get_or_insert_with(|| self.spawn_delay_queue(peer, path, conn.clone()));
                if queue.send((release, frame)).await.is_err() {
                    // The delay queue only stops after closing the connection for a bad frame.
                    return Err(LinkError::Connection(conn.closed().await));
                }
            }
            match recv.read_chunk(256 * 1024, true).await? {
                Some(chunk) => decoder.push(&chunk.bytes),
                None => return Err(LinkError::Finished),
            }
        }
    }

    /// The injected-delay queue of one link: frames stamped with their release time on arrival
    /// are handled in arrival order, each at its release time, so a delay adds latency once
    /// instead of accumulating per frame.
    fn spawn_delay_queue(
        self: &Arc<Self>,
        peer: EndpointId,
        path: Path,
        conn: Connection,
    ) -> mpsc::Sender<(tokio::time::Instant, Frame)> {
        let (tx, mut rx) =
            mpsc::channel::<(tokio::time::Instant, Frame)>(self.config.event_queue_events.max(1));
        let this = Arc::clone(self);
        tokio::spawn(
            async move {
                while let Some((release, frame)) = rx.recv().await {
                    tokio::time::sleep_until(release).await;
                    this.heard(peer, path);
                    if let Err(e) = this.on_frame(peer, path, &conn, frame).await {
                        this.close_for(&conn, Some(peer), path, &e);
                        return;
                    }
                }
            }
            .instrument(info_span!("delay", %peer, %path)),
        );
        tx
    }

    /// Handles one frame the detector has already heard (liveness comes before anything that
    /// may wait on the application). Returns whether it waited for room in the event queue.
    async fn on_frame(
        &self,
        from: EndpointId,
        path: Path,
        conn: &Connection,
        frame: Frame,
    ) -> Result<bool, LinkError> {
        let event = match frame {
            Frame::KeepAlive => None,
            Frame::Hello(_) => {
                return Err(LinkError::Handshake(
                    "second hello on an established link".into(),
                ));
            }
            Frame::Message { payload } => Some(Event::Message { from, payload }),
            Frame::Request { id, payload, .. } => Some(Event::Request {
                from,
                id: RequestId(id),
                payload,
            }),
            Frame::Response { id, payload } => {
                let mut pending = lock(&self.pending);
                match pending.get(&id).map(Waiter::peer) {
                    Some(to) if to != from => {
                        warn!(local = %self.local(), peer = %from, id, expected = %to,
                            "response from a peer the request did not go to: ignored");
                        None
                    }
                    Some(_) => match pending.remove(&id) {
                        Some(Waiter::Call { tx, .. }) => {
                            let _ = tx.send(Ok(payload));
                            None
                        }
                        Some(Waiter::Event { .. }) => Some(Event::Response {
                            from,
                            id: RequestId(id),
                            payload,
                        }),
                        None => None,
                    },
                    None => {
                        debug!(peer = %from, id, "late response dropped");
                        None
                    }
                }
            }
            Frame::Stream {
                stream,
                seq,
                payload,
            } => Some(Event::Stream {
                from,
                stream,
                seq,
                payload,
            }),
        };
        Ok(match event {
            Some(event) => self.push_data_event(from, path, conn, event).await,
            None => false,
        })
    }

    async fn accept_loop(self: Arc<Self>, path: Path, endpoint: quinn::Endpoint) {
        loop {
            let incoming = tokio::select! {
                i = endpoint.accept() => i,
                _ = self.shutdown.notified() => return,
            };
            let Some(incoming) = incoming else { return };
            let this = Arc::clone(&self);
            let remote = incoming.remote_address();
            tokio::spawn(
                async move {
                    if let Err(e) = this.accept_one(path, incoming).await {
                        warn!(local = %this.local(), %path, %remote, "refused incoming connection: {e}");
                    }
                }
                .instrument(info_span!("accept", %path, %remote)),
            );
        }
    }

    /// The hello's claimed endpoint must belong to the node named by the client certificate
    /// that authenticated the connection: a node may claim any of its own CPUs, no other node.
    fn check_claim(conn: &Connection, claimed: EndpointId) -> Result<(), LinkError> {
        let refuse = |why: String| {
            LinkError::Handshake(format!("hello claims endpoint {claimed}, refused: {why}"))
        };
        let identity = conn
            .peer_identity()
            .ok_or_else(|| refuse("no client certificate".into()))?;
        let chain = identity
            .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
            .map_err(|_| refuse("peer identity is not a certificate chain".into()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| refuse("empty client certificate chain".into()))?;
        verify_node_certificate(leaf, claimed.node).map_err(refuse)
    }

    async fn accept_one(
        self: &Arc<Self>,
        path: Path,
        incoming: quinn::Incoming,
    ) -> Result<(), LinkError> {
        let timeout = Duration::from_millis(self.config.handshake_timeout_ms);
        let handshake = async {
            let conn = incoming.await?;
            let (mut send, mut recv) = conn.accept_bi().await?;
            let mut decoder = FrameDecoder::new(self.config.max_frame_bytes);
            let checked = match self.read_hello(&mut recv, &mut decoder).await {
                Ok((hello, version)) => {
                    Self::check_claim(&conn, hello.from).map(|()| (hello, version))
                }
                Err(e) => Err(e),
            };
            let (hello, version) = match checked {
                Ok(v) => v,
                Err(e) => {
                    self.close_for(&conn, None, path, &e);
                    return Err(e);
                }
            };
            send.write_all(&self.hello(hello.path)).await?;
            Ok::<_, LinkError>((conn, send, recv, decoder, hello, version))
        };
        let (conn, send, recv, decoder, hello, version) = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| {
                LinkError::Handshake(format!("no hello within {} ms", timeout.as_millis()))
            })??;
        if hello.path != path {
            debug!(peer = %hello.from, said = %hello.path, %path, "hello names another path; using the socket's");
        }
        self.run_link(hello.from, path, version, conn, send, recv, decoder)
            .await
    }

    async fn connect_once(
        self: &Arc<Self>,
        peer: EndpointId,
        path: Path,
        addr: SocketAddr,
    ) -> Result<(), LinkError> {
        let endpoint = self
            .endpoints
            .get(&path)
            .or_else(|| self.endpoints.get(&Path::Main));
        let Some(endpoint) = endpoint else {
            return Err(LinkError::Handshake("no local endpoint".into()));
        };
        let timeout = Duration::from_millis(self.config.handshake_timeout_ms);
        let handshake = async {
            let conn = endpoint
                .connect_with(
                    self.client_config.clone(),
                    addr,
                    &node_server_name(peer.node),
                )?
                .await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&self.hello(path)).await?;
            let mut decoder = FrameDecoder::new(self.config.max_frame_bytes);
            let checked = match self.read_hello(&mut recv, &mut decoder).await {
                Ok((hello, _)) if hello.from != peer => Err(LinkError::Handshake(format!(
                    "dialled {peer} at {addr}, found {}",
                    hello.from
                ))),
                other => other,
            };
            let version = match checked {
                Ok((_, version)) => version,
                Err(e) => {
                    self.close_for(&conn, Some(peer), path, &e);
                    return Err(e);
                }
            };
            Ok::<_, LinkError>((conn, send, recv, decoder, version))
        };
        let (conn, send, recv, decoder, version) = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| {
                LinkError::Handshake(format!("no hello within {} ms", timeout.as_millis()))
            })??;
        self.run_link(peer, path, version, conn, send, recv, decoder)
            .await
    }

    /// Keeps one connection to `peer` on `path` alive: dial, run, redial with capped backoff.
    async fn dial_loop(self: Arc<Self>, peer: EndpointId, path: Path, addr: SocketAddr) {
        let min = self.config.reconnect_backoff_min_ms.max(1);
        let max = self.config.reconnect_backoff_max_ms.max(min);
        let mut backoff_ms = min;
        loop {
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            let started = Instant::now();
            // Refusals we detect (version, handshake, bad frame) were logged at warn when the
            // connection was closed; the rest (peer not there yet) is routine while redialling.
            if let Err(e) = self.connect_once(peer, path, addr).await {
                debug!(local = %self.local(), %peer, %path, %addr, "dial failed: {e}");
            }
            // A session that lasted a while was a success: start the backoff again from the bottom.
            if started.elapsed() > Duration::from_millis(max) {
                backoff_ms = min;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(backoff_ms)) => {}
                _ = self.shutdown.notified() => return,
            }
            backoff_ms = (backoff_ms * 2).min(max);
        }
    }
}
/// Writes whatever is queued in one batch: one wake-up per batch, not per frame. Headers and
/// small payloads are encoded back to back into one buffer (one allocation per batch).
async fn write_loop(mut send: SendStream, mut rx: mpsc::Receiver<Frame>) {
    const BATCH_FRAMES_MAX: usize = 64;
    let mut batch = Vec::with_capacity(BATCH_FRAMES_MAX);
    let mut chunks: Vec<Bytes> = Vec::with_capacity(BATCH_FRAMES_MAX * 2);
    while rx.recv_many(&mut batch, BATCH_FRAMES_MAX).await > 0 {
        let size: usize = batch
            .iter()
            .map(|f| match f.payload().len() {
                n if n <= COPY_PAYLOAD_MAX_BYTES => f.encoded_len(),
                _ => FRAME_OVERHEAD_BYTES + wire::LENGTH_PREFIX_BYTES,
            })
            .sum();
        let mut buf = BytesMut::with_capacity(size);
        for frame in batch.drain(..) {
            let payload = frame.payload();
            if payload.len() <= COPY_PAYLOAD_MAX_BYTES {
                frame.encode(&mut buf);
                continue;
            }
            frame.encode_header(&mut buf);
            chunks.push(buf.split().freeze());
            chunks.push(frame.into_payload());
        }
        if !buf.is_empty() {
            chunks.push(buf.freeze());
        }
        if let Err(e) = send.write_all_chunks(&mut chunks).await {
            debug!("writer stopped: {e}");
            return;
        }
        chunks.clear();
    }
}

impl QuicTransport {
    /// Binds the endpoint's sockets and starts accepting, detecting and dialling.
    /// Must run inside a tokio runtime.
    pub async fn bind(config: QuicConfig) -> Result<Self, QuicError> {
        let timing = QuicTiming {
            idle_timeout_ms: (config.detector.detection_time_ms * 4).max(1000),
            keep_alive_interval_ms: Some(config.detector.keepalive_interval_ms.max(1)),
        };
        let (server_config, client_config) = quinn_configs(&config.credentials, timing)?;
        let mut endpoints = BTreeMap::new();
        let binds = [
            (Path::Main, Some(config.main_bind)),
            (Path::Failsafe, config.failsafe_bind),
        ];
        for (path, addr) in binds {
            let Some(addr) = addr else { continue };
            let endpoint =
                quinn::Endpoint::server(server_config.clone(), addr).map_err(|source| {
                    QuicError::Bind {
                        local: config.local,
                        path,
                        addr,
                        source,
                    }
                })?;
            endpoints.insert(path, endpoint);
        }
        let (events_tx, events_rx) = mpsc::channel(config.event_queue_events.max(1));
        let inner = Arc::new(Inner {
            detector: Mutex::new(FailureDetector::new(config.detector)),
            config,
            endpoints,
            client_config,
            epoch: Instant::now(),
            peers: Mutex::new(BTreeMap::new()),
            detector_wake: Notify::new(),
            events_tx,
            events_rx: tokio::sync::Mutex::new(events_rx),
            control: Mutex::new(VecDeque::new()),
            control_wake: Notify::new(),
            closed_tx: watch::Sender::new(false),
            pending: Mutex::new(BTreeMap::new()),
            next_request_id: AtomicU64::new(1),
            next_generation: AtomicU64::new(0),
            faults: FaultInjector::default(),
            closed: AtomicBool::new(false),
            shutdown: Notify::new(),
        });
        for (path, endpoint) in &inner.endpoints {
            tokio::spawn(Arc::clone(&inner).accept_loop(*path, endpoint.clone()));
        }
        let local = inner.local();
        tokio::spawn(
            Arc::clone(&inner)
                .detector_loop()
                .instrument(info_span!("detector", %local)),
        );
        Ok(QuicTransport { inner })
    }

    /// The addresses this endpoint listens on (useful when bound to port 0).
    pub fn local_addrs(&self) -> Result<PeerAddrs, std::io::Error> {
        let addr = |p: Path| {
            self.inner
                .endpoints
                .get(&p)
                .map(|e| e.local_addr())
                .transpose()
        };
        let main = addr(Path::Main)?.ok_or_else(|| std::io::Error::other("no main endpoint"))?;
        Ok(PeerAddrs {
            main,
            failsafe: addr(Path::Failsafe)?,
        })
    }

    /// Makes `peer` known. If our id is the lower, we dial it on each of its paths we also have.
    pub fn add_peer(&self, peer: EndpointId, addrs: PeerAddrs) {
        let start_dial = {
            let mut peers = lock(&self.inner.peers);
            let entry = peers.entry(peer).or_default();
            entry.addrs = Some(addrs);
            let dial = self.inner.local() < peer && !entry.dialing;
            entry.dialing |= dial;
            dial
        };
        let paths: Vec<Path> = Path::ALL
            .into_iter()
            .filter(|p| addrs.get(*p).is_some() && self.inner.endpoints.contains_key(p))
            .collect();
        lock(&self.inner.detector).add_peer(peer, &paths);
        self.inner.detector_wake.notify_one();
        if start_dial {
            for path in paths {
                if let Some(addr) = addrs.get(path) {
                    let span = info_span!("dial", local = %self.inner.local(), %peer, %path);
                    tokio::spawn(
                        Arc::clone(&self.inner)
                            .dial_loop(peer, path, addr)
                            .instrument(span),
                    );
                }
            }
        }
    }

    pub fn faults(&self) -> &FaultInjector {
        &self.inner.faults
    }

    pub fn peer_status(&self, peer: EndpointId) -> Option<PeerStatus> {
        lock(&self.inner.detector).status(peer)
    }

    /// The protocol version the link to `peer` on `path` speaks (the lower of the two sides'),
    /// if that link is up.
    pub fn link_version(&self, peer: EndpointId, path: Path) -> Option<u16> {
        lock(&self.inner.peers)
            .get(&peer)
            .and_then(|e| e.links.get(&path))
            .map(|l| l.version)
    }

    /// Waits for the next event; `None` once the endpoint is closed (events still queued then
    /// are discarded). Peer events and request failures come before queued data events.
    pub async fn next_event(&self) -> Option<Event> {
        // An event already queued is taken without registering any wake-up.
        if let Some(event) = Transport::try_next_event(self) {
            return Some(event);
        }
        let mut closed = self.inner.closed_tx.subscribe();
        let mut rx = tokio::select! {
            rx = self.inner.events_rx.lock() => rx,
            _ = closed.wait_for(|c| *c) => return None,
        };
        loop {
            if *closed.borrow_and_update() {
                return None;
            }
            if let Some(event) = self.inner.pop_control() {
                return Some(event);
            }
            tokio::select! {
                biased;
                _ = closed.wait_for(|c| *c) => return None,
                _ = self.inner.control_wake.notified() => {}
                event = rx.recv() => return event,
            }
        }
    }

    /// Request and wait for the response, at most `timeout`.
    pub async fn call(
        &self,
        to: EndpointId,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        let span = info_span!("call", local = %self.inner.local(), peer = %to);
        async {
            let id = self.inner.next_request_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            self.inner.add_waiter(id, Waiter::Call { to, tx })?;
            let (timeout, timeout_ms) = wire_timeout(timeout);
            self.inner.send_request(to, id, timeout_ms, payload)?;
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err(TransportError::Closed {
                    local: self.inner.local(),
                }),
                Err(_) => {
                    lock(&self.inner.pending).remove(&id);
                    Err(TransportError::Timeout {
                        peer: to,
                        id,
                        timeout_ms: u64::from(timeout_ms),
                    })
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Closes every connection and stops the endpoint's tasks. Every `next_event` returns
    /// `None` from now on, and every `call` still waiting fails with `Closed` at once.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.closed_tx.send_replace(true);
        self.inner.shutdown.notify_waiters();
        let waiters = std::mem::take(&mut *lock(&self.inner.pending));
        let local = self.inner.local();
        for waiter in waiters.into_values() {
            if let Waiter::Call { tx, .. } = waiter {
                let _ = tx.send(Err(TransportError::Closed { local }));
            }
        }
        lock(&self.inner.control).clear();
        for endpoint in self.inner.endpoints.values() {
            endpoint.close(VarInt::from_u32(close_code::SHUTDOWN), b"endpoint closed");
        }
    }
}

/// A request timeout as waited for and as carried on the wire (milliseconds, at most `u32`).
fn wire_timeout(timeout: Duration) -> (Duration, u32) {
    let timeout = timeout.min(REQUEST_TIMEOUT_MAX);
    (
        timeout,
        timeout.as_millis().min(u128::from(u32::MAX)) as u32,
    )
}

impl Transport for QuicTransport {
    fn local_id(&self) -> EndpointId {
        self.inner.local()
    }

    fn send(&self, to: EndpointId, payload: Bytes) -> Result<(), TransportError> {
        self.inner.send_frame(to, Frame::Message { payload })
    }

    fn request(
        &self,
        to: EndpointId,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<RequestId, TransportError> {
        let id = self.inner.next_request_id.fetch_add(1, Ordering::Relaxed);
        let (timeout, timeout_ms) = wire_timeout(timeout);
        let now = self.inner.now();
        let deadline = now.checked_add(timeout).unwrap_or(Duration::MAX);
        self.inner.add_waiter(
            id,
            Waiter::Event {
                to,
                deadline,
                timeout_ms: u64::from(timeout_ms),
            },
        )?;
        self.inner.detector_wake.notify_one();
        self.inner.send_request(to, id, timeout_ms, payload)?;
        Ok(RequestId(id))
    }

    fn respond(&self, to: EndpointId, id: RequestId, payload: Bytes) -> Result<(), TransportError> {
        self.inner
            .send_frame(to, Frame::Response { id: id.0, payload })
    }

    fn stream_send(
        &self,
        to: EndpointId,
        stream: StreamId,
        payload: Bytes,
    ) -> Result<u64, TransportError> {
        self.inner.stream_send(to, stream, payload)
    }

    fn try_next_event(&self) -> Option<Event> {
        if self.inner.closed.load(Ordering::Acquire) {
            return None;
        }
        if let Some(event) = self.inner.pop_control() {
            return Some(event);
        }
        self.inner
            .events_rx
            .try_lock()
            .ok()
            .and_then(|mut rx| rx.try_recv().ok())
    }
}
