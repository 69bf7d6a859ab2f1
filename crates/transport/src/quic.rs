//! The real transport: QUIC on quinn with mutual TLS, one connection per peer pair and path,
//! two long-lived bidirectional streams (lanes) per connection.
//!
//! Why this shape: on 2-vCPU machines every thread hand-off costs tens of microseconds, and
//! opening a stream per message costs far more than reusing one. So each link has two streams:
//! the control lane (keep-alives, small messages, requests and responses, sent at a higher
//! QUIC priority) and the bulk lane (ordered-stream frames and payloads above
//! `CONTROL_PAYLOAD_MAX_BYTES`), so a 16 MiB message never delays a keep-alive or a small
//! request. Each lane has one writer task that batches whatever is queued into one
//! `write_all_chunks`, and one reader that decodes frames and hands them straight to the event
//! queue or the waiting `call`. Run it on a current-thread runtime and every hop stays on one
//! thread.
//!
//! Who dials: for each pair, the endpoint with the lower id dials (and redials with backoff,
//! to the peer's current address), the other accepts, and only endpoints in its cluster list
//! (`add_peer`); so there is never more than one connection per pair and path. A newer
//! connection from the same peer and path replaces the older one (the peer restarted), unless
//! its hello names an older incarnation than the live one (`STALE_INCARNATION`). A replaced
//! link stops at once, even with readers waiting for the application, and never feeds the
//! detector again.
//!
//! Failure detection is the sans-IO `FailureDetector`, fed by every chunk the readers receive
//! (a frame still arriving is a sign of life) with the incarnation from the link's hello, and
//! ticked by one timer task. Request tracking, stream numbering, path choice, limits, hello
//! terms and the event queue are the sans-IO `core`, shared with the simulated twin.
//!
//! Memory: every queue is bounded in bytes (`Limits`), and quinn's own limits are set
//! explicitly (`quinn_transport`): two streams per connection, receive windows that let a
//! stalled bulk lane never block the control lane, no datagrams, a bound on handshakes in
//! progress. `docs/transport.md` adds them up per link and per endpoint.
//!
//! The detector never waits on the application: peer events and request failures go to the
//! control part of the event queue, which never blocks, and `next_event` serves it before data.
//! A reader blocked because the application stopped draining data events keeps the peer alive
//! in the detector from the connection's received packets, so a slow consumer never turns into
//! a false `Down` on either side.
//!
//! Trust: the acceptor binds the hello's claimed node to the client certificate (its SAN must
//! be `node-N.duplex` of the claimed node), so a cluster certificate of node 3 cannot pose as
//! node 2; and a response is taken only from the peer the request went to.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use quinn::{Connection, RecvStream, SendStream, VarInt};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use thiserror::Error;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::addr::{EndpointId, Path, PeerAddrs};
use crate::certs::{
    CertError, NodeCredentials, QuicTiming, node_server_name, quinn_configs,
    verify_node_certificate,
};
use crate::core::{
    CallWaiter, EventQueue, HelloRefusal, Limits, LinkTerms, QueueFull, Received, RequestTable,
    ResponseOutcome, StreamNumbers, Waiter, accept_hello, choose_path, received,
};
use crate::detector::{DetectorAction, DetectorConfig, FailureDetector, PeerStatus};
use crate::transport::{Event, RequestId, Transport, TransportError};
use crate::wire::{
    self, CONTROL_FRAME_MAX_BYTES, FRAME_HEADER_MAX_BYTES, Frame, FrameDecoder, FrameError, Hello,
    Lane, PROTOCOL_VERSION, StreamId,
};

/// Application close codes, so the other side's log says why its connection ended.
pub mod close_code {
    pub const SHUTDOWN: u32 = 0;
    pub const BAD_FRAME: u32 = 1;
    pub const VERSION_REFUSED: u32 = 2;
    pub const HANDSHAKE_FAILED: u32 = 3;
    pub const REPLACED: u32 = 4;
    /// The link's hello names an older incarnation than the one this endpoint lives with
    /// (a paused or hung process of the peer's previous life woke up).
    pub const STALE_INCARNATION: u32 = 5;
    /// A lane of the link failed (a write error, a lane finished by the peer).
    pub const LANE_FAILED: u32 = 6;
}

/// Longest injected delay; larger values are capped, so release times never overflow.
const FAULT_DELAY_MAX_MS: u64 = 3_600_000;

/// quinn's per-stream receive window: what one lane may have in flight towards us.
pub const STREAM_WINDOW_BYTES: u32 = 4 << 20;
/// quinn's connection receive window once both hellos are in: room for both lanes' windows, so
/// a bulk lane stalled by a slow consumer never takes the control lane's credit.
pub const CONNECTION_WINDOW_BYTES: u32 = 2 * STREAM_WINDOW_BYTES;
/// quinn's connection receive window until both hellos are in: what a connection that has
/// not said who it is may make us buffer, on all its streams together. Raised to
/// `CONNECTION_WINDOW_BYTES` (`Connection::set_receive_window`) once the link's terms are known.
pub const HANDSHAKE_WINDOW_BYTES: u32 = 64 << 10;
/// quinn's send buffer per connection: bytes written by the writers and not yet acknowledged.
pub const SEND_WINDOW_BYTES: u64 = 8 << 20;
/// Streams a peer may open towards us: the two lanes.
pub const STREAMS_PER_CONNECTION: u32 = 2;
/// Largest chunk one read takes from a lane.
const READ_CHUNK_BYTES: usize = 256 << 10;
/// How often at most a lane's received chunks are told to the detector.
const HEAR_EVERY: Duration = Duration::from_millis(1);
/// Local stalls are logged at warn at most this often (the rest at debug); each is an event.
const STALL_WARN_EVERY_MS: u64 = 1000;

#[derive(Debug, Clone)]
pub struct QuicConfig {
    pub local: EndpointId,
    pub main_bind: SocketAddr,
    pub failsafe_bind: Option<SocketAddr>,
    pub credentials: NodeCredentials,
    pub detector: DetectorConfig,
    pub limits: Limits,
    pub reconnect_backoff_min_ms: u64,
    pub reconnect_backoff_max_ms: u64,
    /// Time allowed for TLS plus the hello exchange on both lanes.
    pub handshake_timeout_ms: u64,
    /// Incoming connections between their first packet and their hellos; beyond it, new
    /// connection attempts are refused at once.
    pub max_incoming_handshakes: usize,
    /// The version this endpoint announces; other than `PROTOCOL_VERSION` only in upgrade tests.
    pub protocol_version: u16,
    /// This process's boot id, carried in every hello. It must rise across restarts of the
    /// endpoint; the default is the wall-clock time at `new` in nanoseconds.
    pub incarnation: u64,
}

impl QuicConfig {
    pub fn new(local: EndpointId, main_bind: SocketAddr, credentials: NodeCredentials) -> Self {
        let boot = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        QuicConfig {
            local,
            main_bind,
            failsafe_bind: None,
            credentials,
            detector: DetectorConfig::default(),
            limits: Limits::default(),
            reconnect_backoff_min_ms: 20,
            reconnect_backoff_max_ms: 1000,
            handshake_timeout_ms: 2000,
            max_incoming_handshakes: 64,
            protocol_version: PROTOCOL_VERSION,
            incarnation: boot,
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
    #[error("quinn transport limits of {local}: {reason}")]
    Limits { local: EndpointId, reason: String },
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
    Refused(#[from] HelloRefusal),
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("stream closed by peer")]
    Finished,
    #[error("incarnation {incarnation} is older than the live incarnation {live}")]
    Stale { incarnation: u64, live: u64 },
    #[error("replaced by a newer connection")]
    Replaced,
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

/// Frames one writer takes per batch.
const BATCH_FRAMES_MAX: usize = 64;

/// A link's send queue: one deque and one byte budget per lane, so a full bulk lane never
/// refuses a control frame. Bytes count from `push` until the writer has handed them to quinn,
/// so a lane's queue and the batch being written together never exceed its budget (one frame
/// always fits an empty lane).
#[derive(Debug)]
struct SendQueue {
    state: Mutex<SendQueueState>,
    control_ready: Notify,
    bulk_ready: Notify,
}

#[derive(Debug)]
struct LaneQueue {
    frames: VecDeque<Frame>,
    queued_bytes: usize,
    max_bytes: usize,
}

impl LaneQueue {
    fn new(max_bytes: usize) -> Self {
        LaneQueue {
            frames: VecDeque::new(),
            queued_bytes: 0,
            max_bytes,
        }
    }
}

#[derive(Debug)]
struct SendQueueState {
    control: LaneQueue,
    bulk: LaneQueue,
    closed: bool,
}

impl SendQueueState {
    fn lane(&mut self, lane: Lane) -> &mut LaneQueue {
        match lane {
            Lane::Control => &mut self.control,
            Lane::Bulk => &mut self.bulk,
        }
    }
}

/// Why a frame was not queued.
#[derive(Debug)]
enum PushError {
    Full { limit_bytes: usize },
    Closed,
}

impl SendQueue {
    fn new(limits: &Limits) -> Self {
        SendQueue {
            state: Mutex::new(SendQueueState {
                control: LaneQueue::new(limits.control_queue_bytes),
                bulk: LaneQueue::new(limits.bulk_queue_bytes),
                closed: false,
            }),
            control_ready: Notify::new(),
            bulk_ready: Notify::new(),
        }
    }

    fn ready(&self, lane: Lane) -> &Notify {
        match lane {
            Lane::Control => &self.control_ready,
            Lane::Bulk => &self.bulk_ready,
        }
    }

    fn push(&self, frame: Frame) -> Result<(), PushError> {
        let lane = frame.lane();
        let size = frame.encoded_len();
        {
            let mut s = lock(&self.state);
            if s.closed {
                return Err(PushError::Closed);
            }
            let q = s.lane(lane);
            if q.queued_bytes > 0 && q.queued_bytes + size > q.max_bytes {
                return Err(PushError::Full {
                    limit_bytes: q.max_bytes,
                });
            }
            q.queued_bytes += size;
            q.frames.push_back(frame);
        }
        self.ready(lane).notify_one();
        Ok(())
    }

    /// Moves up to `BATCH_FRAMES_MAX` frames of `lane` into `batch`, waiting for one; `false`
    /// once the link is closed.
    async fn take_batch(&self, lane: Lane, batch: &mut Vec<Frame>) -> bool {
        loop {
            {
                let mut s = lock(&self.state);
                if s.closed {
                    return false;
                }
                let q = s.lane(lane);
                let n = q.frames.len().min(BATCH_FRAMES_MAX);
                if n > 0 {
                    batch.extend(q.frames.drain(..n));
                    return true;
                }
            }
            self.ready(lane).notified().await;
        }
    }

    /// The writer of `lane` handed `bytes` to quinn: they leave the lane's budget.
    fn written(&self, lane: Lane, bytes: usize) {
        let mut s = lock(&self.state);
        let q = s.lane(lane);
        q.queued_bytes = q.queued_bytes.saturating_sub(bytes);
    }

    fn close(&self) {
        {
            let mut s = lock(&self.state);
            s.closed = true;
            for lane in [Lane::Control, Lane::Bulk] {
                let q = s.lane(lane);
                q.frames.clear();
                q.queued_bytes = 0;
            }
        }
        self.control_ready.notify_one();
        self.bulk_ready.notify_one();
    }

    /// Bytes queued on both lanes.
    fn queued_bytes(&self) -> usize {
        let s = lock(&self.state);
        s.control.queued_bytes + s.bulk.queued_bytes
    }
}

#[derive(Debug, Clone)]
struct Link {
    conn: Connection,
    queue: Arc<SendQueue>,
    /// Tells a replaced link apart from its successor when it ends.
    generation: u64,
    terms: LinkTerms,
    /// True while the link is registered in its peer's entry; set false (under the detector
    /// lock) when it is replaced or ends, after which its readers never feed the detector.
    current: Arc<AtomicBool>,
}

/// What a lane's reader knows of its link.
#[derive(Debug, Clone)]
struct LinkReader {
    peer: EndpointId,
    path: Path,
    terms: LinkTerms,
    conn: Connection,
    current: Arc<AtomicBool>,
}

/// Counts a reader waiting for room in the event queue for as long as it waits, even if its
/// task is aborted meanwhile.
struct WaitingReader<'a>(&'a AtomicUsize);

impl<'a> WaitingReader<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        WaitingReader(count)
    }
}

impl Drop for WaitingReader<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Default)]
struct PeerEntry {
    addrs: Option<PeerAddrs>,
    links: BTreeMap<Path, Link>,
    /// Paths the detector hears the peer on, copied at every change it reports.
    paths_up: Vec<Path>,
    dialing: bool,
}

#[derive(Debug, Default)]
struct Peers {
    entries: BTreeMap<EndpointId, PeerEntry>,
    streams: StreamNumbers,
}

/// How a QUIC `call` waits for its answer.
type CallTx = oneshot::Sender<Result<Bytes, TransportError>>;

impl CallWaiter for CallTx {
    fn complete(self, answer: Result<Bytes, TransportError>) {
        let _ = self.send(answer);
    }
}

#[derive(Debug)]
struct Inner {
    config: QuicConfig,
    endpoints: BTreeMap<Path, quinn::Endpoint>,
    client_config: quinn::ClientConfig,
    epoch: Instant,
    peers: Mutex<Peers>,
    detector: Mutex<FailureDetector>,
    /// Held while detector actions are drained and carried out, so peer events reach the
    /// event queue in the order the detector produced them, whichever thread drains.
    report_order: Mutex<()>,
    /// When a local stall was last logged at warn (ms since `epoch`; `u64::MAX`: never).
    last_stall_warn_ms: AtomicU64,
    detector_wake: Notify,
    events: Mutex<EventQueue>,
    /// An event was queued.
    event_ready: Notify,
    /// Room was made in the data part of the event queue; readers waiting for it count here.
    event_room: Notify,
    readers_waiting: AtomicUsize,
    /// Flips to true once, at `close`; wakes every `next_event`.
    closed_tx: watch::Sender<bool>,
    requests: Mutex<RequestTable<CallTx>>,
    next_generation: AtomicU64,
    faults: FaultInjector,
    closed: AtomicBool,
    shutdown: Notify,
    handshakes: Arc<Semaphore>,
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

/// Forgets a `call`'s request when its future is dropped before the answer, so a cancelled
/// call frees its pending slot at once.
struct ForgetOnDrop<'a> {
    inner: &'a Inner,
    id: Option<u64>,
}

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            lock(&self.inner.requests).forget(id);
        }
    }
}

/// A lane's frames handed to the delay queue, each with its release time and its share of the
/// queue's byte budget.
type Delayed = (tokio::time::Instant, Frame, OwnedSemaphorePermit);

impl Inner {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn local(&self) -> EndpointId {
        self.config.local
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
        link.queue.push(frame).map_err(|e| match e {
            PushError::Full { limit_bytes } => TransportError::QueueFull {
                peer: to,
                limit_bytes,
            },
            PushError::Closed => TransportError::Unreachable { peer: to },
        })
    }

    /// Refuses early what can never be sent: a closed endpoint or an oversized payload.
    fn check_sendable(&self, to: EndpointId, size: usize) -> Result<(), TransportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed {
                local: self.local(),
            });
        }
        self.config.limits.check_payload(to, size)
    }

    fn unknown_peer(&self, peer: EndpointId) -> TransportError {
        TransportError::UnknownPeer {
            local: self.local(),
            peer,
        }
    }

    /// The path and link data to `to` takes (`core::choose_path`).
    fn route<'a>(
        &self,
        to: EndpointId,
        entry: &'a PeerEntry,
    ) -> Result<(Path, &'a Link), TransportError> {
        choose_path(&entry.paths_up, |p| entry.links.contains_key(&p))
            .and_then(|p| entry.links.get(&p).map(|l| (p, l)))
            .ok_or(TransportError::Unreachable { peer: to })
    }

    fn send_frame(&self, to: EndpointId, frame: Frame) -> Result<(), TransportError> {
        self.check_sendable(to, frame.payload().len())?;
        // Queued under the peers lock: one lock per send, no clone of the link.
        let peers = lock(&self.peers);
        let entry = peers
            .entries
            .get(&to)
            .ok_or_else(|| self.unknown_peer(to))?;
        let (path, link) = self.route(to, entry)?;
        self.enqueue(to, link, path, frame)
    }

    /// Queues an answer on the link to the requester's incarnation; drops it if the link speaks
    /// for another incarnation (the requester restarted: the answer could only meet a new
    /// request that reused the id).
    fn respond(&self, to: EndpointId, id: RequestId, payload: Bytes) -> Result<(), TransportError> {
        self.check_sendable(to, payload.len())?;
        let peers = lock(&self.peers);
        let entry = peers
            .entries
            .get(&to)
            .ok_or_else(|| self.unknown_peer(to))?;
        let (path, link) = self.route(to, entry)?;
        if link.terms.incarnation != id.requester_incarnation {
            debug!(local = %self.local(), peer = %to, id = id.id,
                asked_by = id.requester_incarnation, now = link.terms.incarnation,
                "response dropped: the requester restarted");
            return Ok(());
        }
        self.enqueue(to, link, path, Frame::Response { id: id.id, payload })
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
        let Peers { entries, streams } = &mut *peers;
        let entry = entries.get(&to).ok_or_else(|| self.unknown_peer(to))?;
        let (path, link) = self.route(to, entry)?;
        streams.send(to, stream, |seq| {
            self.enqueue(
                to,
                link,
                path,
                Frame::Stream {
                    stream,
                    seq,
                    payload,
                },
            )
        })
    }

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
            lock(&self.requests).forget(id);
        }
        sent
    }

    /// Queues a peer event or a request failure; never waits.
    fn push_control(&self, event: Event) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let coalesced = lock(&self.events).push_control(event);
        if let Some(old) = coalesced {
            warn!(local = %self.local(), ?old, "application not draining events: peer event coalesced");
        }
        self.event_ready.notify_one();
    }

    /// The next queued event; a read request failure frees its request slot, a data event
    /// makes room for a waiting reader.
    fn pop_event(&self) -> Option<Event> {
        let event = lock(&self.events).pop()?;
        match &event {
            Event::RequestFailed { .. } => lock(&self.requests).failure_read(),
            Event::Peer(_) | Event::LocalStall { .. } => {}
            // One event's room for one waiting reader: waking them all for every event would
            // restart their waits at every pop.
            _ if self.readers_waiting.load(Ordering::Acquire) > 0 => {
                self.event_room.notify_one();
            }
            _ => {}
        }
        Some(event)
    }

    /// Hands a data event to the application, waiting while its queue is full (the reader then
    /// stops reading and QUIC flow control slows the sender). While waiting, packets still
    /// arriving on the connection prove the peer alive, so the detector keeps hearing it (every
    /// keep-alive interval, on one timer that room for other readers does not restart). A link
    /// that is replaced or whose connection closes meanwhile drops the event and ends: a dead
    /// incarnation's frames are never delivered after its successor took over (a dropped
    /// response fails its request instead). Returns whether it had to wait.
    async fn push_data_event(&self, link: &LinkReader, event: Event) -> Result<bool, LinkError> {
        let mut event = match lock(&self.events).push_data(event) {
            Ok(()) => {
                self.event_ready.notify_one();
                return Ok(false);
            }
            Err(QueueFull(event)) => event,
        };
        let (peer, path) = (link.peer, link.path);
        debug!(local = %self.local(), %peer, %path, "event queue full: reader waits for the application");
        let interval = Duration::from_millis(self.config.detector.keepalive_interval_ms.max(1));
        let mut sign_of_life =
            tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        sign_of_life.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen = link.conn.stats().udp_rx.datagrams;
        let _waiting = WaitingReader::new(&self.readers_waiting);
        loop {
            let room = self.event_room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if self.closed.load(Ordering::Acquire) {
                debug!(local = %self.local(), "event dropped: endpoint closed");
                return Ok(true);
            }
            if !link.current.load(Ordering::Acquire) {
                self.event_lost(event, "its link was replaced while it waited");
                return Err(LinkError::Replaced);
            }
            match lock(&self.events).push_data(event) {
                Ok(()) => {
                    self.event_ready.notify_one();
                    return Ok(true);
                }
                Err(QueueFull(back)) => event = back,
            }
            tokio::select! {
                _ = room => {}
                _ = sign_of_life.tick() => {
                    let now_seen = link.conn.stats().udp_rx.datagrams;
                    if now_seen != seen && !self.faults.is_cut(peer, path) {
                        self.heard_on(link);
                    }
                    seen = now_seen;
                }
                reason = link.conn.closed() => {
                    self.event_lost(event, "its connection closed while it waited");
                    return Err(LinkError::Connection(reason));
                }
            }
        }
    }

    /// A data event a dead link's reader held is dropped; a response fails its request.
    fn event_lost(&self, event: Event, reason: &'static str) {
        debug!(local = %self.local(), ?event, "event dropped: {reason}");
        if let Event::Response { from, id, .. } = event {
            let failed = lock(&self.requests).response_lost(from, id, reason);
            self.push_control(failed);
        }
    }

    /// Tells the detector bytes arrived on a link, if the link is still the registered one (a
    /// replaced link never speaks for its incarnation again), and carries out what that changed.
    fn heard_on(&self, link: &LinkReader) {
        let changed = {
            let mut d = lock(&self.detector);
            if !link.current.load(Ordering::Acquire) {
                return;
            }
            d.on_heard(link.peer, link.path, link.terms.incarnation, self.now());
            d.has_actions()
        };
        if changed {
            self.run_detector_actions();
        }
    }

    /// Carries out what the detector asked for: keep-alives out, events to the control queue,
    /// the paths a reported peer is heard on to its entry. Never waits.
    fn run_detector_actions(&self) {
        let _order = lock(&self.report_order);
        loop {
            let action = lock(&self.detector).poll_action();
            let Some(action) = action else { break };
            match action {
                DetectorAction::SendKeepAlive { peer, path } => {
                    let peers = lock(&self.peers);
                    let link = peers.entries.get(&peer).and_then(|e| e.links.get(&path));
                    if let Some(link) = link
                        && let Err(e) = self.enqueue(peer, link, path, Frame::KeepAlive)
                    {
                        debug!(%peer, %path, "keep-alive not queued: {e}");
                    }
                }
                DetectorAction::Report(event) => {
                    info!(local = %self.local(), ?event, "peer event");
                    let peer = event.peer();
                    {
                        // Lock order: peers, then detector; nothing takes them the other way.
                        let mut peers = lock(&self.peers);
                        let paths_up = lock(&self.detector)
                            .status(peer)
                            .map(|s| s.paths_up)
                            .unwrap_or_default();
                        peers.entries.entry(peer).or_default().paths_up = paths_up;
                    }
                    self.push_control(Event::Peer(event));
                }
                DetectorAction::LocalStall { stalled } => {
                    let stalled_ms = u64::try_from(stalled.as_millis()).unwrap_or(u64::MAX);
                    let now_ms = u64::try_from(self.now().as_millis()).unwrap_or(u64::MAX);
                    let last = self.last_stall_warn_ms.load(Ordering::Acquire);
                    if last == u64::MAX || now_ms.saturating_sub(last) >= STALL_WARN_EVERY_MS {
                        self.last_stall_warn_ms.store(now_ms, Ordering::Release);
                        warn!(local = %self.local(), stalled_ms,
                            "this process did not run for a while: silence not counted against peers");
                    } else {
                        debug!(local = %self.local(), stalled_ms, "local stall");
                    }
                    self.push_control(Event::LocalStall { stalled_ms });
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
            let expired = lock(&self.requests).expire(now);
            for e in expired {
                self.push_control(e);
            }
            let next = lock(&self.detector).next_deadline();
            let next_request = lock(&self.requests).next_deadline();
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

    fn hello_frame(&self, path: Path) -> Bytes {
        let mut out = BytesMut::new();
        Frame::Hello(Hello {
            version: self.config.protocol_version,
            from: self.local(),
            path,
            incarnation: self.config.incarnation,
        })
        .encode(&mut out);
        out.freeze()
    }

    /// Reads a lane's first frame, which must be the peer's hello. The decoder is bounded to a
    /// hello and each read asks for no more than the hello's bytes still missing, so a peer
    /// that announces anything else is refused at its length prefix and nothing beyond the
    /// hello is buffered; the caller then gives the decoder the lane's bound.
    async fn read_hello(recv: &mut RecvStream) -> Result<(Hello, FrameDecoder), LinkError> {
        let mut decoder = FrameDecoder::new(wire::HELLO_BODY_BYTES);
        loop {
            match decoder.next_frame()? {
                Some(Frame::Hello(h)) => return Ok((h, decoder)),
                Some(other) => {
                    return Err(LinkError::Handshake(format!(
                        "expected hello, found {other:?}"
                    )));
                }
                None => {}
            }
            let missing = wire::HELLO_FRAME_BYTES.saturating_sub(decoder.buffered_bytes());
            match recv.read_chunk(missing.max(1), true).await? {
                Some(chunk) => decoder.push(&chunk.bytes),
                None => return Err(LinkError::Finished),
            }
        }
    }

    /// The two lanes' hellos must agree on who is speaking, in which version and incarnation.
    fn same_speaker(control: &Hello, bulk: &Hello) -> Result<(), LinkError> {
        let id = |h: &Hello| (h.from, h.version, h.incarnation);
        if id(control) != id(bulk) {
            return Err(LinkError::Handshake(format!(
                "bulk lane hello from {} (version {}, incarnation {}), control lane from {} ({}, {})",
                bulk.from,
                bulk.version,
                bulk.incarnation,
                control.from,
                control.version,
                control.incarnation
            )));
        }
        Ok(())
    }

    /// Whether `peer` is in this endpoint's cluster list (was given to `add_peer`).
    fn in_cluster(&self, peer: EndpointId) -> bool {
        lock(&self.peers)
            .entries
            .get(&peer)
            .is_some_and(|e| e.addrs.is_some())
    }

    /// Closes `conn` with the close code that says why, when the error is one we detected
    /// (bad frame, version, handshake, stale incarnation, a failed lane), and logs it; an
    /// error of the connection itself only ends the link.
    fn close_for(&self, conn: &Connection, peer: Option<EndpointId>, path: Path, e: &LinkError) {
        let code = match e {
            LinkError::Frame(_) => close_code::BAD_FRAME,
            LinkError::Refused(HelloRefusal::Version(_)) => close_code::VERSION_REFUSED,
            LinkError::Refused(HelloRefusal::NotInCluster { .. }) | LinkError::Handshake(_) => {
                close_code::HANDSHAKE_FAILED
            }
            LinkError::Stale { .. } => close_code::STALE_INCARNATION,
            LinkError::Write(_) | LinkError::Read(_) | LinkError::Finished => {
                info!(local = %self.local(), ?peer, %path, "link ended: {e}");
                conn.close(
                    VarInt::from_u32(close_code::LANE_FAILED),
                    e.to_string().as_bytes(),
                );
                return;
            }
            LinkError::Connection(_) | LinkError::Connect(_) | LinkError::Replaced => {
                info!(local = %self.local(), ?peer, %path, "link ended: {e}");
                return;
            }
        };
        warn!(local = %self.local(), ?peer, %path, code, "closing connection: {e}");
        conn.close(VarInt::from_u32(code), e.to_string().as_bytes());
    }

    /// Refuses `incarnation` of a peer that lives with a newer one: a newer live link on any
    /// path (one whose connection is not closed yet) or the incarnation the detector has the
    /// peer up with (`up_with`).
    fn check_not_stale(
        entry: Option<&PeerEntry>,
        up_with: Option<u64>,
        incarnation: u64,
    ) -> Result<(), LinkError> {
        let live = entry
            .into_iter()
            .flat_map(|e| e.links.values())
            .filter(|l| l.conn.close_reason().is_none())
            .map(|l| l.terms.incarnation)
            .chain(up_with)
            .max();
        match live {
            Some(live) if live > incarnation => Err(LinkError::Stale { incarnation, live }),
            _ => Ok(()),
        }
    }

    /// The incarnation the detector has `peer` up with, if it is up.
    fn up_with(detector: &FailureDetector, peer: EndpointId) -> Option<u64> {
        detector
            .status(peer)
            .filter(|s| s.up)
            .and_then(|s| s.incarnation)
    }

    /// Whether a hello's incarnation is stale, checked before answering it (`register_link`
    /// checks again, atomically with registering).
    fn refuse_stale(&self, hello: &Hello) -> Result<(), LinkError> {
        let peers = lock(&self.peers);
        let up_with = Self::up_with(&lock(&self.detector), hello.from);
        Self::check_not_stale(peers.entries.get(&hello.from), up_with, hello.incarnation)
    }

    /// Registers a link unless the peer lives with a newer incarnation (`check_not_stale`).
    /// Returns the links it replaces, or the refusal.
    fn register_link(
        &self,
        peer: EndpointId,
        path: Path,
        link: Link,
    ) -> Result<Vec<Link>, LinkError> {
        let incarnation = link.terms.incarnation;
        let mut peers = lock(&self.peers);
        // Lock order: peers, then detector; nothing takes them the other way.
        let detector = lock(&self.detector);
        let entry = peers.entries.entry(peer).or_default();
        Self::check_not_stale(Some(entry), Self::up_with(&detector, peer), incarnation)?;
        link.current.store(true, Ordering::Release);
        let mut stale: Vec<Link> = entry.links.insert(path, link).into_iter().collect();
        // Links of an older incarnation on other paths belong to a process that is gone.
        let older: Vec<Path> = entry
            .links
            .iter()
            .filter(|(_, l)| l.terms.incarnation < incarnation)
            .map(|(p, _)| *p)
            .collect();
        stale.extend(older.iter().filter_map(|p| entry.links.remove(p)));
        for old in &stale {
            // Under the detector lock: none of its readers is telling the detector anything now.
            old.current.store(false, Ordering::Release);
        }
        drop(detector);
        Ok(stale)
    }

    /// Registers a ready link and runs it until a lane ends, a writer stops or it is replaced.
    async fn run_link(
        self: &Arc<Self>,
        peer: EndpointId,
        path: Path,
        lanes: Lanes,
    ) -> Result<(), LinkError> {
        let Lanes {
            conn,
            terms,
            control,
            bulk,
        } = lanes;
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let queue = Arc::new(SendQueue::new(&self.config.limits));
        let current = Arc::new(AtomicBool::new(false));
        let link = Link {
            conn: conn.clone(),
            queue: Arc::clone(&queue),
            generation,
            terms,
            current: Arc::clone(&current),
        };
        let stale = match self.register_link(peer, path, link) {
            Ok(stale) => stale,
            Err(e) => {
                self.close_for(&conn, Some(peer), path, &e);
                return Err(e);
            }
        };
        for old in stale {
            old.queue.close();
            old.conn.close(
                VarInt::from_u32(close_code::REPLACED),
                b"replaced by a newer connection",
            );
        }
        info!(local = %self.local(), %peer, %path, version = terms.version, incarnation = terms.incarnation, "link established");
        let reader = LinkReader {
            peer,
            path,
            terms,
            conn: conn.clone(),
            current: Arc::clone(&current),
        };
        // The peer's hello was the first frame heard on this link.
        self.heard_on(&reader);
        self.detector_wake.notify_one();
        let span = |lane: &'static str| info_span!("writer", %peer, %path, lane);
        let mut control_writer = tokio::spawn(
            write_loop(control.0, Arc::clone(&queue), Lane::Control).instrument(span("control")),
        );
        let mut bulk_writer = tokio::spawn(
            write_loop(bulk.0, Arc::clone(&queue), Lane::Bulk).instrument(span("bulk")),
        );
        let this = Arc::clone(self);
        let bulk_link = reader.clone();
        let (mut bulk_recv, mut bulk_decoder) = (bulk.1, bulk.2);
        let mut bulk_reader = tokio::spawn(
            async move {
                this.read_loop(&bulk_link, &mut bulk_recv, &mut bulk_decoder)
                    .await
            }
            .instrument(info_span!("reader", %peer, %path, lane = "bulk")),
        );
        let (mut control_recv, mut control_decoder) = (control.1, control.2);
        // A writer ends when its stream fails, or with `Ok` once the queue is closed (the link
        // was replaced); either way the link is over.
        let ended = |r: Result<Result<(), LinkError>, tokio::task::JoinError>| {
            r.unwrap_or(Err(LinkError::Finished))
        };
        let result = tokio::select! {
            r = self.read_loop(&reader, &mut control_recv, &mut control_decoder) => r,
            r = &mut bulk_reader => ended(r),
            r = &mut control_writer => ended(r),
            r = &mut bulk_writer => ended(r),
        };
        bulk_reader.abort();
        control_writer.abort();
        bulk_writer.abort();
        queue.close();
        {
            let mut peers = lock(&self.peers);
            let _detector = lock(&self.detector);
            current.store(false, Ordering::Release);
            if let Some(entry) = peers.entries.get_mut(&peer)
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

    /// Reads one lane: every chunk received is a sign of life (a large frame still arriving
    /// keeps its peer up), then its whole frames are handled in order, as long as the link is
    /// still the registered one.
    async fn read_loop(
        self: &Arc<Self>,
        link: &LinkReader,
        recv: &mut RecvStream,
        decoder: &mut FrameDecoder,
    ) -> Result<(), LinkError> {
        let (peer, path) = (link.peer, link.path);
        // Created at the first delayed frame; from then on every frame of the lane goes
        // through it, so delayed and undelayed frames keep their order, and liveness is heard
        // when frames are released.
        let mut delayed: Option<(mpsc::UnboundedSender<Delayed>, Arc<Semaphore>)> = None;
        // A large frame arrives in thousands of packet-sized chunks: the detector hears the
        // lane at most once per `HEAR_EVERY`, which is far below any detection time.
        let mut last_heard: Option<Instant> = None;
        loop {
            while let Some(frame) = decoder.next_frame()? {
                if !link.current.load(Ordering::Acquire) {
                    return Err(LinkError::Replaced);
                }
                if self.faults.drops(peer, path) {
                    debug!(%peer, %path, "fault: frame dropped on receive");
                    continue;
                }
                let delay = self.faults.delay(peer);
                if delay.is_none() && delayed.is_none() {
                    if self.on_frame(link, frame).await? {
                        // It waited for the application: the frames after it are news again.
                        self.heard_on(link);
                    }
                    continue;
                }
                let release = tokio::time::Instant::now() + delay.unwrap_or_default();
                let (queue, budget) =
                    delayed.get_or_insert_with(|| self.spawn_delay_queue(link.clone()));
                let limit = self
                    .config
                    .limits
                    .delay_queue_bytes
                    .clamp(1, u32::MAX as usize);
                let size = u32::try_from(frame.encoded_len().min(limit)).unwrap_or(u32::MAX);
                let Ok(permit) = Arc::clone(budget).acquire_many_owned(size).await else {
                    return Err(LinkError::Finished);
                };
                if queue.send((release, frame, permit)).is_err() {
                    // The delay queue only stops once its link is over.
                    return Err(LinkError::Connection(link.conn.closed().await));
                }
            }
            match recv.read_chunk(READ_CHUNK_BYTES, true).await? {
                Some(chunk) => {
                    let delaying = delayed.is_some() || self.faults.delay(peer).is_some();
                    let due = last_heard.is_none_or(|t| t.elapsed() >= HEAR_EVERY);
                    if due && !delaying && !self.faults.is_cut(peer, path) {
                        self.heard_on(link);
                        last_heard = Some(Instant::now());
                    }
                    decoder.push(&chunk.bytes);
                }
                None => return Err(LinkError::Finished),
            }
        }
    }

    /// The injected-delay queue of one lane: frames stamped with their release time on arrival
    /// are handled in arrival order, each at its release time, so a delay adds latency once
    /// instead of accumulating per frame. Bounded by `Limits::delay_queue_bytes`: the reader
    /// waits for budget, which a frame returns once handled.
    fn spawn_delay_queue(
        self: &Arc<Self>,
        link: LinkReader,
    ) -> (mpsc::UnboundedSender<Delayed>, Arc<Semaphore>) {
        let budget = Arc::new(Semaphore::new(
            self.config
                .limits
                .delay_queue_bytes
                .clamp(1, Semaphore::MAX_PERMITS),
        ));
        let (tx, mut rx) = mpsc::unbounded_channel::<Delayed>();
        let this = Arc::clone(self);
        let span = info_span!("delay", peer = %link.peer, path = %link.path);
        tokio::spawn(
            async move {
                while let Some((release, frame, permit)) = rx.recv().await {
                    tokio::time::sleep_until(release).await;
                    if !link.current.load(Ordering::Acquire) {
                        return;
                    }
                    this.heard_on(&link);
                    let handled = this.on_frame(&link, frame).await;
                    drop(permit);
                    if let Err(e) = handled {
                        this.close_for(&link.conn, Some(link.peer), link.path, &e);
                        return;
                    }
                }
            }
            .instrument(span),
        );
        (tx, budget)
    }

    /// Handles one frame the detector has already heard (liveness comes before anything that
    /// may wait on the application). Returns whether it waited for room in the event queue.
    async fn on_frame(&self, link: &LinkReader, frame: Frame) -> Result<bool, LinkError> {
        let from = link.peer;
        let incarnation = link.terms.incarnation;
        let event = match received(from, incarnation, frame) {
            Received::KeepAlive => None,
            Received::Hello => {
                return Err(LinkError::Handshake(
                    "second hello on an established link".into(),
                ));
            }
            Received::Deliver(event) => Some(event),
            Received::Response { id, payload } => {
                match lock(&self.requests).on_response(from, incarnation, id, payload) {
                    ResponseOutcome::Deliver(event) => Some(event),
                    ResponseOutcome::Completed => None,
                    ResponseOutcome::WrongPeer { expected } => {
                        warn!(local = %self.local(), peer = %from, id, %expected,
                            "response from a peer the request did not go to: ignored");
                        None
                    }
                    ResponseOutcome::NotPending => {
                        debug!(peer = %from, id, "late response dropped");
                        None
                    }
                }
            }
        };
        match event {
            Some(event) => self.push_data_event(link, event).await,
            None => Ok(false),
        }
    }

    async fn accept_loop(self: Arc<Self>, path: Path, endpoint: quinn::Endpoint) {
        loop {
            let incoming = tokio::select! {
                i = endpoint.accept() => i,
                _ = self.shutdown.notified() => return,
            };
            let Some(incoming) = incoming else { return };
            let remote = incoming.remote_address();
            let Ok(permit) = Arc::clone(&self.handshakes).try_acquire_owned() else {
                warn!(local = %self.local(), %path, %remote,
                    limit = self.config.max_incoming_handshakes,
                    "refused incoming connection: too many handshakes in progress");
                incoming.refuse();
                continue;
            };
            let this = Arc::clone(&self);
            tokio::spawn(
                async move {
                    let accepted = this.accept_handshake(path, incoming).await;
                    drop(permit);
                    match accepted {
                        // How the link ended was logged when it ended (`close_for`).
                        Ok((peer, lanes)) => {
                            let _ = this.run_link(peer, path, lanes).await;
                        }
                        Err(e) => {
                            warn!(local = %this.local(), %path, %remote, "refused incoming connection: {e}");
                        }
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

    /// The acceptor's side of a handshake: TLS, then on each lane the dialer's hello and ours.
    async fn accept_handshake(
        self: &Arc<Self>,
        path: Path,
        incoming: quinn::Incoming,
    ) -> Result<(EndpointId, Lanes), LinkError> {
        let timeout = Duration::from_millis(self.config.handshake_timeout_ms);
        let handshake = async {
            let conn = incoming.await?;
            let checked = async {
                let (send, mut recv) = conn.accept_bi().await?;
                let (hello, mut decoder) = Self::read_hello(&mut recv).await?;
                decoder.set_max_frame_bytes(CONTROL_FRAME_MAX_BYTES);
                let terms = accept_hello(
                    self.local(),
                    self.config.protocol_version,
                    &hello,
                    self.in_cluster(hello.from),
                )?;
                Self::check_claim(&conn, hello.from)?;
                self.refuse_stale(&hello)?;
                let mut control = (send, recv, decoder);
                control.0.write_all(&self.hello_frame(path)).await?;
                let (mut send, mut recv) = conn.accept_bi().await?;
                let (bulk_hello, mut decoder) = Self::read_hello(&mut recv).await?;
                Self::same_speaker(&hello, &bulk_hello)?;
                decoder.set_max_frame_bytes(self.config.limits.frame_bytes());
                send.write_all(&self.hello_frame(path)).await?;
                // Both hellos are in: the link may now use its full receive window.
                conn.set_receive_window(VarInt::from_u32(CONNECTION_WINDOW_BYTES));
                if hello.path != path {
                    debug!(peer = %hello.from, said = %hello.path, %path, "hello names another path; using the socket's");
                }
                Ok((
                    hello.from,
                    terms,
                    control,
                    (send, recv, decoder),
                ))
            }
            .await;
            match checked {
                Ok((peer, terms, control, bulk)) => Ok((
                    peer,
                    Lanes {
                        conn,
                        terms,
                        control,
                        bulk,
                    },
                )),
                Err(e) => {
                    self.close_for(&conn, None, path, &e);
                    Err(e)
                }
            }
        };
        tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| {
                LinkError::Handshake(format!("no hello within {} ms", timeout.as_millis()))
            })?
    }

    /// The dialer's side of a handshake: TLS, then on each lane our hello and the acceptor's.
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
            let lanes = async {
                let mut terms = None;
                let mut hellos: Vec<Hello> = Vec::with_capacity(2);
                let mut lanes = Vec::with_capacity(2);
                for (lane, max_frame) in [
                    (Lane::Control, CONTROL_FRAME_MAX_BYTES),
                    (Lane::Bulk, self.config.limits.frame_bytes()),
                ] {
                    let (mut send, mut recv) = conn.open_bi().await?;
                    send.write_all(&self.hello_frame(path)).await?;
                    let (hello, mut decoder) = Self::read_hello(&mut recv).await?;
                    decoder.set_max_frame_bytes(max_frame);
                    if hello.from != peer {
                        return Err(LinkError::Handshake(format!(
                            "dialled {peer} at {addr}, found {} on the {lane:?} lane",
                            hello.from
                        )));
                    }
                    // Refused on the lane that shows it, before another lane is opened.
                    terms = Some(accept_hello(
                        self.local(),
                        self.config.protocol_version,
                        &hello,
                        true,
                    )?);
                    if let Some(first) = hellos.first() {
                        Self::same_speaker(first, &hello)?;
                    }
                    hellos.push(hello);
                    lanes.push((send, recv, decoder));
                }
                let bulk = lanes.pop();
                let control = lanes.pop();
                let (Some(terms), Some(control), Some(bulk)) = (terms, control, bulk) else {
                    return Err(LinkError::Handshake("lanes not opened".into()));
                };
                // Both hellos are in: the link may now use its full receive window.
                conn.set_receive_window(VarInt::from_u32(CONNECTION_WINDOW_BYTES));
                Ok((terms, control, bulk))
            }
            .await;
            match lanes {
                Ok((terms, control, bulk)) => Ok(Lanes {
                    conn,
                    terms,
                    control,
                    bulk,
                }),
                Err(e) => {
                    self.close_for(&conn, Some(peer), path, &e);
                    Err(e)
                }
            }
        };
        let lanes = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| {
                LinkError::Handshake(format!("no hello within {} ms", timeout.as_millis()))
            })??;
        self.run_link(peer, path, lanes).await
    }

    /// Keeps one connection to `peer` on `path` alive: dial its current address, run, redial
    /// with capped backoff.
    async fn dial_loop(self: Arc<Self>, peer: EndpointId, path: Path) {
        let min = self.config.reconnect_backoff_min_ms.max(1);
        let max = self.config.reconnect_backoff_max_ms.max(min);
        let mut backoff_ms = min;
        loop {
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            let addr = lock(&self.peers)
                .entries
                .get(&peer)
                .and_then(|e| e.addrs)
                .and_then(|a| a.get(path));
            let started = Instant::now();
            // Refusals we detect (version, handshake, bad frame) were logged at warn when the
            // connection was closed; the rest (peer not there yet) is routine while redialling.
            if let Some(addr) = addr
                && let Err(e) = self.connect_once(peer, path, addr).await
            {
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

/// One lane's send stream, receive stream and decoder.
type LaneStreams = (SendStream, RecvStream, FrameDecoder);

/// A connection whose hellos were exchanged on both lanes.
#[derive(Debug)]
struct Lanes {
    conn: Connection,
    terms: LinkTerms,
    control: LaneStreams,
    bulk: LaneStreams,
}

/// Writes whatever is queued on one lane in one batch: one wake-up per batch, not per frame.
/// Headers and small payloads are encoded back to back into one buffer (one allocation per
/// batch). The control lane goes before the bulk lane in quinn's scheduling. Ends with `Ok`
/// once the queue is closed, with the error once the stream fails (which ends the link).
async fn write_loop(
    mut send: SendStream,
    queue: Arc<SendQueue>,
    lane: Lane,
) -> Result<(), LinkError> {
    let priority = match lane {
        Lane::Control => 1,
        Lane::Bulk => 0,
    };
    send.set_priority(priority)
        .map_err(|e| LinkError::Write(e.into()))?;
    let mut batch = Vec::with_capacity(BATCH_FRAMES_MAX);
    let mut chunks: Vec<Bytes> = Vec::with_capacity(BATCH_FRAMES_MAX * 2);
    while queue.take_batch(lane, &mut batch).await {
        let mut bytes = 0;
        let size: usize = batch
            .iter()
            .map(|f| match f.payload().len() {
                n if n <= COPY_PAYLOAD_MAX_BYTES => f.encoded_len(),
                _ => FRAME_HEADER_MAX_BYTES + wire::LENGTH_PREFIX_BYTES,
            })
            .sum();
        let mut buf = BytesMut::with_capacity(size);
        for frame in batch.drain(..) {
            bytes += frame.encoded_len();
            if frame.payload().len() <= COPY_PAYLOAD_MAX_BYTES {
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
        let written = send.write_all_chunks(&mut chunks).await;
        queue.written(lane, bytes);
        written?;
        chunks.clear();
    }
    Ok(())
}

/// quinn's limits, all explicit (see the module docs and `docs/transport.md`).
fn quinn_transport(config: &QuicConfig) -> Result<quinn::TransportConfig, QuicError> {
    let invalid = |reason: String| QuicError::Limits {
        local: config.local,
        reason,
    };
    let idle_ms = (config.detector.detection_time_ms * 4).max(1000);
    let idle = quinn::IdleTimeout::try_from(Duration::from_millis(idle_ms))
        .map_err(|e| invalid(format!("idle timeout {idle_ms} ms: {e}")))?;
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(Duration::from_millis(
            config.detector.keepalive_interval_ms.max(1),
        )))
        .max_concurrent_bidi_streams(VarInt::from_u32(STREAMS_PER_CONNECTION))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW_BYTES))
        // Raised to CONNECTION_WINDOW_BYTES once both hellos are in.
        .receive_window(VarInt::from_u32(HANDSHAKE_WINDOW_BYTES))
        .send_window(SEND_WINDOW_BYTES)
        .datagram_receive_buffer_size(None);
    Ok(t)
}

/// Keys that stay the same in every incarnation of this endpoint, derived from the node's private
/// key and the endpoint: the stateless-reset key, and the key that makes its connection ids
/// recognisable. A process restarted on the same address then recognises the connection ids its
/// predecessor gave out and resets those connections, so their dialers redial at once and meet
/// the new incarnation instead of waiting for quinn's idle timeout (at least a second). Only
/// holders of the node key can derive them, so nobody else can reset a connection.
fn incarnation_stable_keys(
    credentials: &NodeCredentials,
    local: EndpointId,
) -> (ring::hmac::Key, u64) {
    let node_key =
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, credentials.key.secret_pkcs8_der());
    let derive =
        |what: &str| ring::hmac::sign(&node_key, format!("duplex {what} v1 {local}").as_bytes());
    let reset = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        derive("stateless reset key").as_ref(),
    );
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&derive("connection id key").as_ref()[..8]);
    (reset, u64::from_le_bytes(cid_key))
}

impl QuicTransport {
    /// Binds the endpoint's sockets and starts accepting, detecting and dialling.
    /// Must run inside a tokio runtime.
    pub async fn bind(config: QuicConfig) -> Result<Self, QuicError> {
        let timing = QuicTiming {
            idle_timeout_ms: (config.detector.detection_time_ms * 4).max(1000),
            keep_alive_interval_ms: Some(config.detector.keepalive_interval_ms.max(1)),
        };
        let (mut server_config, mut client_config) = quinn_configs(&config.credentials, timing)?;
        let transport = Arc::new(quinn_transport(&config)?);
        server_config
            .transport_config(Arc::clone(&transport))
            .max_incoming(config.max_incoming_handshakes.max(1))
            .incoming_buffer_size(INCOMING_BUFFER_BYTES)
            .incoming_buffer_size_total(
                INCOMING_BUFFER_BYTES * config.max_incoming_handshakes.max(1) as u64,
            );
        client_config.transport_config(transport);
        let (reset_key, cid_key) = incarnation_stable_keys(&config.credentials, config.local);
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let runtime = quinn::default_runtime().ok_or_else(|| QuicError::Bind {
            local: config.local,
            path: Path::Main,
            addr: config.main_bind,
            source: std::io::Error::other("no async runtime found"),
        })?;
        let mut endpoints = BTreeMap::new();
        let binds = [
            (Path::Main, Some(config.main_bind)),
            (Path::Failsafe, config.failsafe_bind),
        ];
        for (path, addr) in binds {
            let Some(addr) = addr else { continue };
            let bind_error = |source| QuicError::Bind {
                local: config.local,
                path,
                addr,
                source,
            };
            let socket = std::net::UdpSocket::bind(addr).map_err(bind_error)?;
            let endpoint = quinn::Endpoint::new(
                endpoint_config.clone(),
                Some(server_config.clone()),
                socket,
                Arc::clone(&runtime),
            )
            .map_err(bind_error)?;
            endpoints.insert(path, endpoint);
        }
        let inner = Arc::new(Inner {
            detector: Mutex::new(FailureDetector::new(config.detector)),
            events: Mutex::new(EventQueue::new(&config.limits)),
            // Request ids start at a random value per incarnation (OS-seeded RNG), so a late
            // answer to the previous incarnation's request never matches a new one.
            requests: Mutex::new(RequestTable::new(
                config.local,
                config.incarnation,
                config.limits.max_pending_requests,
                rand::random(),
            )),
            handshakes: Arc::new(Semaphore::new(config.max_incoming_handshakes.max(1))),
            config,
            endpoints,
            client_config,
            epoch: Instant::now(),
            peers: Mutex::new(Peers::default()),
            report_order: Mutex::new(()),
            last_stall_warn_ms: AtomicU64::new(u64::MAX),
            detector_wake: Notify::new(),
            event_ready: Notify::new(),
            event_room: Notify::new(),
            readers_waiting: AtomicUsize::new(0),
            closed_tx: watch::Sender::new(false),
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

    /// Puts `peer` in the cluster list (only listed endpoints are accepted) at `addrs`. If our
    /// id is the lower, we dial it on each of its paths we also have; a later call with new
    /// addresses (the peer restarted elsewhere) is used at the next redial.
    pub fn add_peer(&self, peer: EndpointId, addrs: PeerAddrs) {
        let start_dial = {
            let mut peers = lock(&self.inner.peers);
            let entry = peers.entries.entry(peer).or_default();
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
                let span = info_span!("dial", local = %self.inner.local(), %peer, %path);
                tokio::spawn(
                    Arc::clone(&self.inner)
                        .dial_loop(peer, path)
                        .instrument(span),
                );
            }
        }
    }

    pub fn faults(&self) -> &FaultInjector {
        &self.inner.faults
    }

    /// This endpoint's boot id, as its hellos carry it.
    pub fn incarnation(&self) -> u64 {
        self.inner.config.incarnation
    }

    /// Bytes queued to `peer` on all its links and not yet handed to quinn.
    pub fn send_queue_bytes(&self, peer: EndpointId) -> usize {
        lock(&self.inner.peers).entries.get(&peer).map_or(0, |e| {
            e.links.values().map(|l| l.queue.queued_bytes()).sum()
        })
    }

    /// Readers waiting for room in the event queue (each holds one decoded frame meanwhile).
    pub fn readers_waiting(&self) -> usize {
        self.inner.readers_waiting.load(Ordering::Acquire)
    }

    /// Bytes of data events waiting for the application.
    pub fn event_queue_bytes(&self) -> usize {
        lock(&self.inner.events).data_bytes()
    }

    /// Requests waiting for an answer (`request` and `call`).
    pub fn pending_requests(&self) -> usize {
        lock(&self.inner.requests).len()
    }

    /// Connections of this endpoint's sockets, handshaking or established.
    pub fn open_connections(&self) -> usize {
        self.inner
            .endpoints
            .values()
            .map(quinn::Endpoint::open_connections)
            .sum()
    }

    /// Waits for the next event; `None` once the endpoint is closed (events still queued then
    /// are discarded). Peer events and request failures come before queued data events.
    pub async fn next_event(&self) -> Option<Event> {
        // An event already queued is taken without registering any wake-up.
        if let Some(event) = Transport::try_next_event(self) {
            return Some(event);
        }
        let mut closed = self.inner.closed_tx.subscribe();
        loop {
            let ready = self.inner.event_ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            if *closed.borrow_and_update() {
                return None;
            }
            if let Some(event) = self.inner.pop_event() {
                return Some(event);
            }
            tokio::select! {
                biased;
                _ = closed.wait_for(|c| *c) => return None,
                _ = ready => {}
            }
        }
    }

    /// Closes every connection and stops the endpoint's tasks. Every `next_event` returns
    /// `None` from now on, and every `call` still waiting fails with `Closed` at once.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.closed_tx.send_replace(true);
        self.inner.shutdown.notify_waiters();
        lock(&self.inner.requests).close();
        lock(&self.inner.events).clear();
        self.inner.event_room.notify_waiters();
        for endpoint in self.inner.endpoints.values() {
            endpoint.close(VarInt::from_u32(close_code::SHUTDOWN), b"endpoint closed");
        }
    }
}

/// Bytes quinn buffers for one connection attempt before its handshake is taken up.
const INCOMING_BUFFER_BYTES: u64 = 64 << 10;

impl Transport for QuicTransport {
    fn local_id(&self) -> EndpointId {
        self.inner.local()
    }

    fn incarnation(&self) -> u64 {
        self.inner.config.incarnation
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
        self.inner.check_sendable(to, payload.len())?;
        let started =
            lock(&self.inner.requests).start(to, timeout, self.inner.now(), Waiter::Event)?;
        self.inner.detector_wake.notify_one();
        self.inner
            .send_request(to, started.id, started.timeout_ms, payload)?;
        Ok(lock(&self.inner.requests).request_id(started.id))
    }

    fn call(
        &self,
        to: EndpointId,
        payload: Bytes,
        timeout: Duration,
    ) -> impl Future<Output = Result<Bytes, TransportError>> + Send {
        let span = info_span!("call", local = %self.inner.local(), peer = %to);
        async move {
            let inner = &*self.inner;
            inner.check_sendable(to, payload.len())?;
            let (tx, rx) = oneshot::channel();
            let started =
                lock(&inner.requests).start(to, timeout, inner.now(), Waiter::Call(tx))?;
            let mut forget = ForgetOnDrop {
                inner,
                id: Some(started.id),
            };
            inner.send_request(to, started.id, started.timeout_ms, payload)?;
            let answer = match tokio::time::timeout(started.timeout, rx).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err(TransportError::Closed {
                    local: inner.local(),
                }),
                Err(_) => Err(TransportError::Timeout {
                    peer: to,
                    id: started.id,
                    timeout_ms: u64::from(started.timeout_ms),
                }),
            };
            if answer.is_ok() {
                // The response took the request out of the table already.
                forget.id = None;
            }
            answer
        }
        .instrument(span)
    }

    fn respond(&self, to: EndpointId, id: RequestId, payload: Bytes) -> Result<(), TransportError> {
        self.inner.respond(to, id, payload)
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
        self.inner.pop_event()
    }

    fn queued_events(&self) -> usize {
        lock(&self.inner.events).len()
    }

    fn peer_status(&self, peer: EndpointId) -> Option<PeerStatus> {
        lock(&self.inner.detector).status(peer)
    }

    fn link_version(&self, peer: EndpointId, path: Path) -> Option<u16> {
        lock(&self.inner.peers)
            .entries
            .get(&peer)
            .and_then(|e| e.links.get(&path))
            .map(|l| l.terms.version)
    }
}
