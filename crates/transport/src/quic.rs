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
//! Failure detection is the sans-IO `FailureDetector`, fed by every frame the readers see and
//! ticked by one timer task; keep-alives are ordinary frames on the same stream, so a stalled
//! stream looks exactly like a dead peer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn::{Connection, RecvStream, SendStream, VarInt};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use thiserror::Error;
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::addr::{EndpointId, Path, PeerAddrs};
use crate::certs::{CertError, NodeCredentials, QuicTiming, node_server_name, quinn_configs};
use crate::detector::{DetectorAction, DetectorConfig, FailureDetector, PeerStatus};
use crate::transport::{Event, RequestId, Transport, TransportError};
use crate::wire::{
    DEFAULT_MAX_FRAME_BYTES, Frame, FrameDecoder, FrameError, Hello, PROTOCOL_VERSION, StreamId,
    negotiate_version,
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

    /// Delays every frame heard from `peer` by `delay_ms` (0 removes the delay).
    pub fn set_delay_ms(&self, peer: EndpointId, delay_ms: u64) {
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

/// A frame ready to write: its header and its payload, written without copying the payload.
#[derive(Debug)]
struct Outgoing {
    header: Bytes,
    payload: Bytes,
}

#[derive(Debug, Clone)]
struct Link {
    conn: Connection,
    tx: mpsc::Sender<Outgoing>,
    /// Tells a replaced link apart from its successor when it ends.
    generation: u64,
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
    Call(oneshot::Sender<Bytes>),
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

    /// The link data should use: main while the detector hears the peer there, else failsafe.
    fn pick_link(&self, to: EndpointId) -> Result<(Path, Link), TransportError> {
        let main_up = {
            let d = lock(&self.detector);
            let failsafe_only = d.path_up(to, Path::Main) == Some(false)
                && d.path_up(to, Path::Failsafe) == Some(true);
            !failsafe_only
        };
        let peers = lock(&self.peers);
        let Some(entry) = peers.get(&to) else {
            return Err(TransportError::UnknownPeer {
                local: self.local(),
                peer: to,
            });
        };
        let order = if main_up {
            [Path::Main, Path::Failsafe]
        } else {
            [Path::Failsafe, Path::Main]
        };
        order
            .iter()
            .find_map(|p| entry.links.get(p).map(|l| (*p, l.clone())))
            .ok_or(TransportError::Unreachable { peer: to })
    }

    fn enqueue(
        &self,
        to: EndpointId,
        link: &Link,
        path: Path,
        frame: &Frame,
    ) -> Result<(), TransportError> {
        if self.faults.drops(to, path) {
            debug!(peer = %to, %path, "fault: frame dropped on send");
            return Ok(());
        }
        let mut header = BytesMut::with_capacity(24);
        frame.encode_header(&mut header);
        let out = Outgoing {
            header: header.freeze(),
            payload: frame_payload(frame),
        };
        link.tx.try_send(out).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => TransportError::QueueFull {
                peer: to,
                limit: self.config.send_queue_frames,
            },
            mpsc::error::TrySendError::Closed(_) => TransportError::Unreachable { peer: to },
        })
    }

    fn send_frame(&self, to: EndpointId, frame: Frame) -> Result<(), TransportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed {
                local: self.local(),
            });
        }
        let size = frame.payload().len();
        if size > self.max_payload_bytes() {
            return Err(TransportError::TooLarge {
                peer: to,
                size_bytes: size,
                max_bytes: self.max_payload_bytes(),
            });
        }
        let (path, link) = self.pick_link(to)?;
        self.enqueue(to, &link, path, &frame)
    }

    async fn push_event(&self, event: Event) {
        if self.events_tx.send(event).await.is_err() {
            debug!(local = %self.local(), "event dropped: endpoint closed");
        }
    }

    /// Carries out what the detector asked for: keep-alives out, events to the user.
    async fn run_detector_actions(&self) {
        loop {
            let action = lock(&self.detector).poll_action();
            let Some(action) = action else { break };
            match action {
                DetectorAction::SendKeepAlive { peer, path } => {
                    let link = lock(&self.peers)
                        .get(&peer)
                        .and_then(|e| e.links.get(&path).cloned());
                    if let Some(link) = link
                        && let Err(e) = self.enqueue(peer, &link, path, &Frame::KeepAlive)
                    {
                        debug!(%peer, %path, "keep-alive not queued: {e}");
                    }
                }
                DetectorAction::Report(event) => {
                    info!(local = %self.local(), ?event, "peer event");
                    self.push_event(Event::Peer(event)).await;
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
            self.run_detector_actions().await;
            self.expire_requests(now).await;
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

    async fn expire_requests(&self, now: Duration) {
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
            self.push_event(e).await;
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

    /// Reads frames until the peer's hello; leftover bytes stay in the decoder.
    async fn read_hello(
        &self,
        recv: &mut RecvStream,
        decoder: &mut FrameDecoder,
    ) -> Result<Hello, LinkError> {
        loop {
            match decoder.next_frame()? {
                Some(Frame::Hello(h)) => {
                    negotiate_version(self.config.protocol_version, h.version)?;
                    return Ok(h);
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

    /// Registers a ready link and runs it until it ends.
    async fn run_link(
        self: &Arc<Self>,
        peer: EndpointId,
        path: Path,
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
        // The peer's hello was the first frame heard on this link.
        lock(&self.detector).on_heard(peer, path, self.now());
        self.detector_wake.notify_one();
        info!(local = %self.local(), %peer, %path, "link established");
        self.run_detector_actions().await;
        let writer =
            tokio::spawn(write_loop(send, rx).instrument(info_span!("writer", %peer, %path)));
        let result = self.read_loop(peer, path, &mut recv, &mut decoder).await;
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
        match &result {
            Err(LinkError::Frame(e)) => {
                warn!(local = %self.local(), %peer, %path, "closing connection: bad frame: {e}");
                conn.close(
                    VarInt::from_u32(close_code::BAD_FRAME),
                    e.to_string().as_bytes(),
                );
            }
            Err(e) => info!(local = %self.local(), %peer, %path, "link ended: {e}"),
            Ok(()) => {}
        }
        result
    }

    async fn read_loop(
        &self,
        peer: EndpointId,
        path: Path,
        recv: &mut RecvStream,
        decoder: &mut FrameDecoder,
    ) -> Result<(), LinkError> {
        loop {
            while let Some(frame) = decoder.next_frame()? {
                self.on_frame(peer, path, frame).await?;
            }
            match recv.read_chunk(256 * 1024, true).await? {
                Some(chunk) => decoder.push(&chunk.bytes),
                None => return Err(LinkError::Finished),
            }
        }
    }

    async fn on_frame(&self, from: EndpointId, path: Path, frame: Frame) -> Result<(), LinkError> {
        if self.faults.drops(from, path) {
            debug!(peer = %from, %path, "fault: frame dropped on receive");
            return Ok(());
        }
        if let Some(delay) = self.faults.delay(from) {
            tokio::time::sleep(delay).await;
        }
        let reported = {
            let mut d = lock(&self.detector);
            let was_up = d.path_up(from, path);
            d.on_heard(from, path, self.now());
            was_up != Some(true)
        };
        if reported {
            self.run_detector_actions().await;
        }
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
                let waiter = lock(&self.pending).remove(&id);
                match waiter {
                    Some(Waiter::Call(tx)) => {
                        let _ = tx.send(payload);
                        None
                    }
                    Some(Waiter::Event { .. }) => Some(Event::Response {
                        from,
                        id: RequestId(id),
                        payload,
                    }),
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
        if let Some(event) = event {
            self.push_event(event).await;
        }
        Ok(())
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
            let hello = match self.read_hello(&mut recv, &mut decoder).await {
                Ok(h) => h,
                Err(e) => {
                    let code = if matches!(e, LinkError::Version(_)) {
                        close_code::VERSION_REFUSED
                    } else {
                        close_code::HANDSHAKE_FAILED
                    };
                    conn.close(VarInt::from_u32(code), e.to_string().as_bytes());
                    return Err(e);
                }
            };
            send.write_all(&self.hello(hello.path)).await?;
            Ok::<_, LinkError>((conn, send, recv, decoder, hello))
        };
        let (conn, send, recv, decoder, hello) = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| {
            LinkError::Handshake(format!("no hello within {} ms", timeout.as_millis()))
        })??;
        if hello.path != path {
            debug!(peer = %hello.from, said = %hello.path, %path, "hello names another path; using the socket's");
        }
        self.run_link(hello.from, path, conn, send, recv, decoder)
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
            let hello = match self.read_hello(&mut recv, &mut decoder).await {
                Ok(h) => h,
                Err(e) => {
                    conn.close(
                        VarInt::from_u32(close_code::HANDSHAKE_FAILED),
                        e.to_string().as_bytes(),
                    );
                    return Err(e);
                }
            };
            if hello.from != peer {
                conn.close(
                    VarInt::from_u32(close_code::HANDSHAKE_FAILED),
                    b"unexpected endpoint",
                );
                return Err(LinkError::Handshake(format!(
                    "dialled {peer} at {addr}, found {}",
                    hello.from
                )));
            }
            Ok::<_, LinkError>((conn, send, recv, decoder))
        };
        let (conn, send, recv, decoder) =
            tokio::time::timeout(timeout, handshake)
                .await
                .map_err(|_| {
                    LinkError::Handshake(format!("no hello within {} ms", timeout.as_millis()))
                })??;
        self.run_link(peer, path, conn, send, recv, decoder).await
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
            match self.connect_once(peer, path, addr).await {
                Ok(()) => {}
                Err(e) => debug!(local = %self.local(), %peer, %path, %addr, "dial failed: {e}"),
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

fn frame_payload(frame: &Frame) -> Bytes {
    match frame {
        Frame::Hello(_) | Frame::KeepAlive => Bytes::new(),
        Frame::Message { payload }
        | Frame::Request { payload, .. }
        | Frame::Response { payload, .. }
        | Frame::Stream { payload, .. } => payload.clone(),
    }
}

/// Writes whatever is queued in one batch: one wake-up per batch, not per frame.
async fn write_loop(mut send: SendStream, mut rx: mpsc::Receiver<Outgoing>) {
    const BATCH_FRAMES_MAX: usize = 64;
    let mut batch = Vec::with_capacity(BATCH_FRAMES_MAX);
    let mut chunks: Vec<Bytes> = Vec::with_capacity(BATCH_FRAMES_MAX * 2);
    while rx.recv_many(&mut batch, BATCH_FRAMES_MAX).await > 0 {
        for out in batch.drain(..) {
            chunks.push(out.header);
            if !out.payload.is_empty() {
                chunks.push(out.payload);
            }
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

    /// Waits for the next event; `None` once the endpoint is closed.
    pub async fn next_event(&self) -> Option<Event> {
        self.inner.events_rx.lock().await.recv().await
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
            lock(&self.inner.pending).insert(id, Waiter::Call(tx));
            let timeout_ms = timeout.as_millis().min(u128::from(u32::MAX)) as u32;
            if let Err(e) = self.inner.send_frame(
                to,
                Frame::Request {
                    id,
                    timeout_ms,
                    payload,
                },
            ) {
                lock(&self.inner.pending).remove(&id);
                return Err(e);
            }
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(payload)) => Ok(payload),
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

    /// Closes every connection and stops the endpoint's tasks.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.shutdown.notify_waiters();
        for endpoint in self.inner.endpoints.values() {
            endpoint.close(VarInt::from_u32(close_code::SHUTDOWN), b"endpoint closed");
        }
    }
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
        let timeout_ms = timeout.as_millis().min(u128::from(u32::MAX)) as u32;
        let deadline = self.inner.now() + timeout;
        lock(&self.inner.pending).insert(
            id,
            Waiter::Event {
                to,
                deadline,
                timeout_ms: u64::from(timeout_ms),
            },
        );
        self.inner.detector_wake.notify_one();
        if let Err(e) = self.inner.send_frame(
            to,
            Frame::Request {
                id,
                timeout_ms,
                payload,
            },
        ) {
            lock(&self.inner.pending).remove(&id);
            return Err(e);
        }
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
        let seq = {
            let mut peers = lock(&self.inner.peers);
            let Some(entry) = peers.get_mut(&to) else {
                return Err(TransportError::UnknownPeer {
                    local: self.inner.local(),
                    peer: to,
                });
            };
            let next = entry.stream_next_seq.entry(stream).or_insert(0);
            let seq = *next;
            *next += 1;
            seq
        };
        self.inner.send_frame(
            to,
            Frame::Stream {
                stream,
                seq,
                payload,
            },
        )?;
        Ok(seq)
    }

    fn try_next_event(&self) -> Option<Event> {
        self.inner
            .events_rx
            .try_lock()
            .ok()
            .and_then(|mut rx| rx.try_recv().ok())
    }
}
