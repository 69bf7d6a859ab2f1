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
//! (`add_peer`), or, with `QuicConfig::accept_clients`, any client endpoint `0.k` holding a
//! client certificate, up to `QuicConfig::max_clients` at once (`accept_client`); so there is
//! never more than one connection per pair and path. A newer
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
//! Trust: the acceptor binds the hello's claimed node to the client certificate
//! (`certs::verify_claimed_node`): node N ≥ 1 needs `node-N.duplex`, a client endpoint `0.k` a
//! client certificate (`client.duplex`) naming no node; so a cluster certificate of node 3
//! cannot pose as node 2, a client cannot pose as a CPU, nor a CPU as a client; and a response
//! is taken only from the peer the request went to.
//!
//! Clients accepted without being listed (`accept_clients`): the peer entry and the detector's
//! watch are made when the client's first link registers, so the application gets `Up` and
//! `Down` for it and `send`, `respond` and requests reach it over the accepted connection (a
//! client is never dialled). Such an entry is forgotten (entry, detector state, stream numbers)
//! once the client is down and has no link left, so entries stay within `max_clients` however
//! many clients come and go; a client that comes back is a new peer (`Up` again).
//!
//! The code is split by job: `links` (dialling, accepting, hellos, each link's readers),
//! `send` (send queues, the writer task, routing), `events` (the event queue and the detector's
//! timer), `fault` (fault injection); this file holds the endpoint's state and its public API.

mod events;
mod fault;
mod links;
mod send;

pub use fault::FaultInjector;
use send::{SendQueue, write_loop};

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
    CertError, Credentials, Identity, QuicTiming, node_server_name, quinn_configs,
    verify_claimed_node,
};
use crate::core::{
    CallWaiter, EventQueue, HelloRefusal, Limits, LinkTerms, QueueFull, Received, RequestTable,
    ResponseOutcome, StreamNumbers, Waiter, accept_hello, admit_client, choose_path, received,
};
use crate::detector::{DetectorAction, DetectorConfig, FailureDetector, PeerEvent, PeerStatus};
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
/// Default of `QuicConfig::max_clients`: client endpoints accepted without being in the
/// cluster list, at once. Each costs a peer entry and, while connected, a link (see
/// `docs/transport.md`, Memory ceilings).
pub const MAX_CLIENTS: usize = 1024;

#[derive(Debug, Clone)]
pub struct QuicConfig {
    pub local: EndpointId,
    pub main_bind: SocketAddr,
    pub failsafe_bind: Option<SocketAddr>,
    /// The endpoint's certificate and key: a node's for a CPU `N.k`, a client's for a client
    /// endpoint `0.k` (`bind` refuses any other pairing).
    pub credentials: Credentials,
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
    /// Accept client endpoints `0.k` that are not in the cluster list (their certificate must
    /// be a client certificate), adding each as a peer when its link comes up. Default false:
    /// only listed endpoints are accepted.
    pub accept_clients: bool,
    /// Most client endpoints accepted that way at once (`MAX_CLIENTS` by default); beyond it a
    /// new client is refused (`HANDSHAKE_FAILED`, "already serves N clients"). Clients in the
    /// cluster list do not count.
    pub max_clients: usize,
}

impl QuicConfig {
    pub fn new(local: EndpointId, main_bind: SocketAddr, credentials: Credentials) -> Self {
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
            accept_clients: false,
            max_clients: MAX_CLIENTS,
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
    #[error(
        "endpoint {local} cannot use the credentials of {identity}: a CPU N.k needs node N's \
         certificate, a client endpoint 0.k a client certificate"
    )]
    WrongIdentity {
        local: EndpointId,
        identity: Identity,
    },
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
    /// A client endpoint accepted without being in the cluster list (`accept_clients`): it
    /// counts against `max_clients` and is forgotten once down without a link.
    accepted_client: bool,
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
fn incarnation_stable_keys(credentials: &Credentials, local: EndpointId) -> (ring::hmac::Key, u64) {
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
        if !config.credentials.identity.may_claim(config.local.node) {
            return Err(QuicError::WrongIdentity {
                local: config.local,
                identity: config.credentials.identity.clone(),
            });
        }
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

    /// Puts `peer` in the cluster list (only listed endpoints are accepted, and with
    /// `accept_clients` client endpoints) at `addrs`. If our id is the lower, we dial it on each
    /// of its paths we also have; a later call with new addresses (the peer restarted
    /// elsewhere) is used at the next redial. A client endpoint dials the CPUs it uses this way.
    pub fn add_peer(&self, peer: EndpointId, addrs: PeerAddrs) {
        let start_dial = {
            let mut peers = lock(&self.inner.peers);
            let entry = peers.entries.entry(peer).or_default();
            entry.addrs = Some(addrs);
            // Listed from now on: no longer counted against `max_clients` nor forgotten.
            entry.accepted_client = false;
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
