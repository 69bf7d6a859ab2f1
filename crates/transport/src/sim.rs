//! The simulated twin of the QUIC transport: an in-memory network driven by a seeded scheduler
//! and a virtual clock, so a cluster test can replay a run exactly from its seed.
//!
//! Everything lives in one `SimState` behind a mutex: a queue of scheduled deliveries and timers
//! ordered by (virtual time, insertion number), one ChaCha RNG seeded from the test's seed, and
//! `BTreeMap`s for every collection that is ever iterated. Nothing reads the wall clock. Each
//! endpoint runs the same `FailureDetector` as the QUIC transport, fed by keep-alive frames that
//! cross the simulated links, so partitions are detected the way they are on real sockets; and
//! the same `core` (limits, request table, stream numbers, path choice, hello terms, event
//! queue), so the two cannot drift. Every frame carries its sender's version and incarnation as
//! a hello would; versions more than one apart never talk.
//! Every decision (send, drop, deliver, timer) appends one line to the trace, which is how tests
//! check that one seed gives one run, byte for byte.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

use crate::addr::{EndpointId, Path};
use crate::core::{
    CallWaiter, EventQueue, Limits, QueueFull, Received, RequestTable, ResponseOutcome,
    StreamNumbers, Waiter, accept_hello, choose_path, received,
};
use crate::detector::{DetectorAction, DetectorConfig, FailureDetector, PeerStatus};
use crate::transport::{Event, RequestId, Transport, TransportError};
use crate::wire::{Frame, Hello, PROTOCOL_VERSION, StreamId};

/// Faults and timing of the simulated network.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimConfig {
    pub latency_min_us: u64,
    pub latency_max_us: u64,
    /// Probability that a message, request or response frame is lost.
    pub loss_probability: f64,
    /// Probability that a message, request or response frame is delivered twice.
    pub duplicate_probability: f64,
    pub detector: DetectorConfig,
    /// The same limits as the QUIC transport; where QUIC makes a reader wait for room in the
    /// event queue, the simulation drops the frame and traces it.
    pub limits: Limits,
    /// Bound on the trace, so a runaway test cannot eat the machine's memory.
    pub trace_limit_bytes: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            latency_min_us: 50,
            latency_max_us: 500,
            loss_probability: 0.0,
            duplicate_probability: 0.0,
            detector: DetectorConfig::default(),
            limits: Limits::default(),
            trace_limit_bytes: 64 << 20,
        }
    }
}

/// A `SimConfig` the network cannot run with.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum SimConfigError {
    #[error("{field} is {value}; a probability must be a number in 0.0..=1.0")]
    Probability { field: &'static str, value: f64 },
}

impl SimConfig {
    /// Checks what would otherwise fail deep inside a run (a probability outside 0..=1 or NaN).
    pub fn validate(&self) -> Result<(), SimConfigError> {
        for (field, value) in [
            ("loss_probability", self.loss_probability),
            ("duplicate_probability", self.duplicate_probability),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(SimConfigError::Probability { field, value });
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
enum Scheduled {
    Deliver {
        from: EndpointId,
        to: EndpointId,
        path: Path,
        /// The sender's version and incarnation, as its hello would say them.
        hello: Hello,
        /// The receiver's incarnation when sent: frames to an earlier life are dropped.
        to_incarnation: u64,
        frame: Frame,
    },
    Timer {
        endpoint: EndpointId,
    },
}

/// Where a simulated `call` finds its answer.
#[derive(Debug, Default)]
struct CallSlot {
    answer: Option<Result<Bytes, TransportError>>,
    waker: Option<Waker>,
}

#[derive(Debug)]
struct SimCallTx(Arc<Mutex<CallSlot>>);

impl CallWaiter for SimCallTx {
    fn complete(self, answer: Result<Bytes, TransportError>) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        slot.answer = Some(answer);
        if let Some(w) = slot.waker.take() {
            w.wake();
        }
    }
}

#[derive(Debug)]
struct SimNode {
    alive: bool,
    /// Rises at each restart, so frames addressed to an earlier life are dropped.
    incarnation: u64,
    protocol_version: u16,
    paths: Vec<Path>,
    detector: FailureDetector,
    events: EventQueue,
    requests: RequestTable<SimCallTx>,
    streams: StreamNumbers,
    timer_at: Option<Duration>,
}

impl SimNode {
    /// Incarnation `incarnation` of a process; its request ids start at `first_request_id`
    /// (drawn from the network's seeded RNG at every start, as QUIC draws it from the OS).
    fn new(
        config: &SimConfig,
        id: EndpointId,
        paths: &[Path],
        protocol_version: u16,
        incarnation: u64,
        first_request_id: u64,
    ) -> Self {
        SimNode {
            alive: true,
            incarnation,
            protocol_version,
            paths: paths.to_vec(),
            detector: FailureDetector::new(config.detector),
            events: EventQueue::new(&config.limits),
            requests: RequestTable::new(
                id,
                incarnation,
                config.limits.max_pending_requests,
                first_request_id,
            ),
            streams: StreamNumbers::default(),
            timer_at: None,
        }
    }
}

#[derive(Debug)]
struct SimState {
    config: SimConfig,
    seed: u64,
    now: Duration,
    rng: ChaCha8Rng,
    next_seq: u64,
    queue: BTreeMap<(Duration, u64), Scheduled>,
    nodes: BTreeMap<EndpointId, SimNode>,
    /// Directional cuts: frames from .0 to .1 on path .2 are dropped.
    cuts: BTreeSet<(EndpointId, EndpointId, Path)>,
    extra_delay_us: BTreeMap<(EndpointId, EndpointId), u64>,
    /// Arrival time of the last frame of each ordered stream, which later frames may not pass.
    stream_tail: BTreeMap<(EndpointId, EndpointId, StreamId), Duration>,
    trace: String,
}

/// A handle to the simulated network. Clones share the network.
#[derive(Debug, Clone)]
pub struct SimNetwork {
    state: Arc<Mutex<SimState>>,
}

/// One endpoint on the simulated network.
#[derive(Debug, Clone)]
pub struct SimTransport {
    id: EndpointId,
    state: Arc<Mutex<SimState>>,
}

/// A simulated `call`: ready once the network, stepped by whoever drives it, delivers the
/// answer or expires the request; poll it between steps. Dropping it forgets the request.
#[derive(Debug)]
pub struct SimCall {
    state: Arc<Mutex<SimState>>,
    local: EndpointId,
    slot: Arc<Mutex<CallSlot>>,
    /// The request while it waits; `Err` when it could not even be sent.
    request: Result<Option<u64>, Option<TransportError>>,
}

impl Future for SimCall {
    type Output = Result<Bytes, TransportError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Err(e) = &mut self.request {
            return match e.take() {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            };
        }
        let answer = {
            let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
            match slot.answer.take() {
                Some(a) => a,
                None => {
                    slot.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        };
        self.request = Ok(None);
        Poll::Ready(answer)
    }
}

impl Drop for SimCall {
    fn drop(&mut self) {
        if let Ok(Some(id)) = self.request {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(node) = s.nodes.get_mut(&self.local) {
                node.requests.forget(id);
            }
        }
    }
}

fn frame_label(frame: &Frame) -> String {
    match frame {
        Frame::Hello(_) => "hello".to_string(),
        Frame::KeepAlive => "keepalive".to_string(),
        Frame::Message { payload } => format!("message len={}", payload.len()),
        Frame::Request { id, payload, .. } => format!("request id={id} len={}", payload.len()),
        Frame::Response { id, payload } => format!("response id={id} len={}", payload.len()),
        Frame::Stream {
            stream,
            seq,
            payload,
        } => {
            format!("stream={} seq={seq} len={}", stream.0, payload.len())
        }
    }
}

impl SimState {
    fn trace(&mut self, line: std::fmt::Arguments<'_>) {
        if self.trace.len() >= self.config.trace_limit_bytes {
            return;
        }
        let _ = write!(self.trace, "{:>10}us ", self.now.as_micros());
        let _ = self.trace.write_fmt(line);
        self.trace.push('\n');
    }

    fn schedule(&mut self, at: Duration, item: Scheduled) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.insert((at, seq), item);
    }

    fn schedule_timer(&mut self, endpoint: EndpointId) {
        let Some(node) = self.nodes.get(&endpoint) else {
            return;
        };
        let deadline = node.detector.next_deadline();
        let request_deadline = node.requests.next_deadline();
        let Some(at) = [deadline, request_deadline].into_iter().flatten().min() else {
            return;
        };
        let at = at.max(self.now);
        if node.timer_at == Some(at) {
            return;
        }
        if let Some(node) = self.nodes.get_mut(&endpoint) {
            node.timer_at = Some(at);
        }
        self.schedule(at, Scheduled::Timer { endpoint });
    }

    /// The path data from `from` to `to` takes (`core::choose_path`): `Unreachable` while
    /// the sender's detector hears the peer on no path both have.
    fn data_path(&self, from: EndpointId, to: EndpointId) -> Result<Path, TransportError> {
        let (Some(node), Some(peer)) = (self.nodes.get(&from), self.nodes.get(&to)) else {
            return Err(TransportError::UnknownPeer {
                local: from,
                peer: to,
            });
        };
        let paths_up = node
            .detector
            .status(to)
            .map(|s| s.paths_up)
            .unwrap_or_default();
        choose_path(&paths_up, |p| {
            node.paths.contains(&p) && peer.paths.contains(&p)
        })
        .ok_or(TransportError::Unreachable { peer: to })
    }

    fn transmit(&mut self, from: EndpointId, to: EndpointId, path: Path, frame: Frame) {
        let label = frame_label(&frame);
        let Some(sender) = self.nodes.get(&from) else {
            return;
        };
        let hello = Hello {
            version: sender.protocol_version,
            from,
            path,
            incarnation: sender.incarnation,
        };
        let Some(target) = self.nodes.get(&to) else {
            self.trace(format_args!(
                "{from}->{to} {path} {label} drop: no such endpoint"
            ));
            return;
        };
        let to_incarnation = target.incarnation;
        if !target.paths.contains(&path) {
            self.trace(format_args!(
                "{from}->{to} {path} {label} drop: no such path"
            ));
            return;
        }
        if self.cuts.contains(&(from, to, path)) {
            self.trace(format_args!("{from}->{to} {path} {label} drop: partition"));
            return;
        }
        let lossy = matches!(
            frame,
            Frame::Message { .. } | Frame::Request { .. } | Frame::Response { .. }
        );
        if lossy
            && self.config.loss_probability > 0.0
            && self.rng.random_bool(self.config.loss_probability)
        {
            self.trace(format_args!("{from}->{to} {path} {label} drop: loss"));
            return;
        }
        let copies = if lossy
            && self.config.duplicate_probability > 0.0
            && self.rng.random_bool(self.config.duplicate_probability)
        {
            2
        } else {
            1
        };
        for copy in 0..copies {
            let latency_us = self.rng.random_range(
                self.config.latency_min_us
                    ..=self.config.latency_max_us.max(self.config.latency_min_us),
            ) + self.extra_delay_us.get(&(from, to)).copied().unwrap_or(0);
            let mut at = self.now + Duration::from_micros(latency_us);
            if let Frame::Stream { stream, .. } = &frame {
                let tail = self.stream_tail.entry((from, to, *stream)).or_insert(at);
                at = at.max(*tail);
                *tail = at;
            }
            self.trace(format_args!(
                "{from}->{to} {path} {label} send arrive={}us{}",
                at.as_micros(),
                if copy == 1 { " duplicate" } else { "" }
            ));
            self.schedule(
                at,
                Scheduled::Deliver {
                    from,
                    to,
                    path,
                    hello,
                    to_incarnation,
                    frame: frame.clone(),
                },
            );
        }
    }

    fn drain_detector(&mut self, endpoint: EndpointId) {
        loop {
            let Some(node) = self.nodes.get_mut(&endpoint) else {
                return;
            };
            let Some(action) = node.detector.poll_action() else {
                break;
            };
            match action {
                DetectorAction::SendKeepAlive { peer, path } => {
                    if self
                        .nodes
                        .get(&peer)
                        .is_some_and(|p| p.paths.contains(&path))
                    {
                        self.transmit(endpoint, peer, path, Frame::KeepAlive);
                    }
                }
                DetectorAction::Report(event) => {
                    self.trace(format_args!("{endpoint} event {event:?}"));
                    self.push_control(endpoint, Event::Peer(event));
                }
                DetectorAction::LocalStall { stalled } => {
                    self.trace(format_args!("{endpoint} local stall {stalled:?}"));
                    let stalled_ms = u64::try_from(stalled.as_millis()).unwrap_or(u64::MAX);
                    self.push_control(endpoint, Event::LocalStall { stalled_ms });
                }
            }
        }
        self.schedule_timer(endpoint);
    }

    fn push_control(&mut self, endpoint: EndpointId, event: Event) {
        let coalesced = self
            .nodes
            .get_mut(&endpoint)
            .and_then(|n| n.events.push_control(event));
        if let Some(old) = coalesced {
            self.trace(format_args!("{endpoint} coalesced {old:?}"));
        }
    }

    /// Queues a data event; where QUIC's reader would wait for room, the frame is dropped. A
    /// dropped response fails its request instead (`on_response` already took it out of the
    /// table), so every request still gets exactly one answer.
    fn push_data(&mut self, endpoint: EndpointId, event: Event) {
        let limits = self.config.limits;
        let Some(node) = self.nodes.get_mut(&endpoint) else {
            return;
        };
        let Err(QueueFull(event)) = node.events.push_data(event) else {
            return;
        };
        let failed = match event {
            Event::Response { from, id, .. } => {
                Some(node.requests.response_lost(from, id, "event queue full"))
            }
            _ => None,
        };
        self.trace(format_args!(
            "{endpoint} drop: event queue full ({} bytes, {} events)",
            limits.event_queue_bytes, limits.event_queue_events
        ));
        if let Some(failed) = failed {
            self.trace(format_args!("{endpoint} event {failed:?}"));
            self.push_control(endpoint, failed);
        }
    }

    fn step(&mut self) -> bool {
        let Some(((at, _), item)) = self.queue.pop_first() else {
            return false;
        };
        self.now = at;
        match item {
            Scheduled::Timer { endpoint } => {
                let Some(node) = self.nodes.get_mut(&endpoint) else {
                    return true;
                };
                if !node.alive || node.timer_at != Some(at) {
                    return true;
                }
                node.timer_at = None;
                node.detector.on_tick(at);
                let failed = node.requests.expire(at);
                for event in failed {
                    self.trace(format_args!("{endpoint} event {event:?}"));
                    self.push_control(endpoint, event);
                }
                self.drain_detector(endpoint);
            }
            Scheduled::Deliver {
                from,
                to,
                path,
                hello,
                to_incarnation,
                frame,
            } => self.deliver(from, to, path, hello, to_incarnation, frame),
        }
        true
    }

    fn deliver(
        &mut self,
        from: EndpointId,
        to: EndpointId,
        path: Path,
        hello: Hello,
        to_incarnation: u64,
        frame: Frame,
    ) {
        let label = frame_label(&frame);
        let now = self.now;
        let Some(node) = self.nodes.get_mut(&to) else {
            return;
        };
        if !node.alive || node.incarnation != to_incarnation {
            self.trace(format_args!(
                "{from}->{to} {path} {label} drop: receiver down"
            ));
            return;
        }
        let terms = match accept_hello(to, node.protocol_version, &hello, true) {
            Ok(terms) => terms,
            Err(refused) => {
                self.trace(format_args!("{from}->{to} {path} {label} drop: {refused}"));
                return;
            }
        };
        let incarnation = terms.incarnation;
        node.detector.on_heard(from, path, incarnation, now);
        let event = match received(from, incarnation, frame) {
            Received::Hello | Received::KeepAlive => None,
            Received::Deliver(event) => Some(event),
            Received::Response { id, payload } => {
                match node.requests.on_response(from, incarnation, id, payload) {
                    ResponseOutcome::Deliver(event) => Some(event),
                    ResponseOutcome::Completed => {
                        self.trace(format_args!("{from}->{to} {path} {label} deliver to call"));
                        None
                    }
                    ResponseOutcome::WrongPeer { expected } => {
                        self.trace(format_args!(
                            "{from}->{to} {path} {label} drop: request went to {expected}"
                        ));
                        None
                    }
                    ResponseOutcome::NotPending => {
                        self.trace(format_args!(
                            "{from}->{to} {path} {label} drop: no pending request"
                        ));
                        None
                    }
                }
            }
        };
        if let Some(event) = event {
            self.trace(format_args!("{from}->{to} {path} {label} deliver"));
            self.push_data(to, event);
        }
        self.drain_detector(to);
    }

    /// The sending endpoint must be alive, the payload within the limits and the peer known
    /// and heard on some path; returns the path data takes.
    fn sender(
        &self,
        local: EndpointId,
        to: EndpointId,
        payload: &Bytes,
    ) -> Result<Path, TransportError> {
        match self.nodes.get(&local) {
            Some(n) if n.alive => {}
            _ => return Err(TransportError::Closed { local }),
        }
        self.config.limits.check_payload(to, payload.len())?;
        self.data_path(local, to)
    }
}

impl SimNetwork {
    /// A network replaying the run of `seed`; refuses an invalid `config`.
    pub fn new(seed: u64, config: SimConfig) -> Result<Self, SimConfigError> {
        config.validate()?;
        let mut state = SimState {
            config,
            seed,
            now: Duration::ZERO,
            rng: ChaCha8Rng::seed_from_u64(seed),
            next_seq: 0,
            queue: BTreeMap::new(),
            nodes: BTreeMap::new(),
            cuts: BTreeSet::new(),
            extra_delay_us: BTreeMap::new(),
            stream_tail: BTreeMap::new(),
            trace: String::new(),
        };
        state.trace(format_args!("seed {seed} config {config:?}"));
        Ok(SimNetwork {
            state: Arc::new(Mutex::new(state)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panic while holding the lock already failed the test; keep its state readable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn seed(&self) -> u64 {
        self.lock().seed
    }

    /// Virtual time since the start of the run.
    pub fn now(&self) -> Duration {
        self.lock().now
    }

    /// Adds an endpoint reachable on `paths`, speaking this build's protocol version; every
    /// endpoint watches every other on the paths both have.
    pub fn add_endpoint(&self, id: EndpointId, paths: &[Path]) -> SimTransport {
        self.add_endpoint_with_version(id, paths, PROTOCOL_VERSION)
    }

    /// Adds an endpoint that announces `protocol_version` (rolling-upgrade tests).
    pub fn add_endpoint_with_version(
        &self,
        id: EndpointId,
        paths: &[Path],
        protocol_version: u16,
    ) -> SimTransport {
        let mut s = self.lock();
        let first_request_id = s.rng.random();
        let mut node = SimNode::new(&s.config, id, paths, protocol_version, 1, first_request_id);
        let others: Vec<(EndpointId, Vec<Path>)> = s
            .nodes
            .iter()
            .map(|(id, n)| (*id, n.paths.clone()))
            .collect();
        for (other, other_paths) in &others {
            let common: Vec<Path> = paths
                .iter()
                .copied()
                .filter(|p| other_paths.contains(p))
                .collect();
            node.detector.add_peer(*other, &common);
            if let Some(n) = s.nodes.get_mut(other) {
                n.detector.add_peer(id, &common);
            }
        }
        s.nodes.insert(id, node);
        s.trace(format_args!(
            "{id} added paths={paths:?} version={protocol_version}"
        ));
        let ids: Vec<EndpointId> = s.nodes.keys().copied().collect();
        for e in ids {
            s.schedule_timer(e);
        }
        SimTransport {
            id,
            state: Arc::clone(&self.state),
        }
    }

    /// The process dies: its queued events, pending requests (a waiting `call` fails with
    /// `Closed`) and frames in flight to it vanish.
    pub fn crash(&self, id: EndpointId) {
        let mut s = self.lock();
        if let Some(n) = s.nodes.get_mut(&id) {
            n.alive = false;
            n.events.clear();
            n.requests.close();
            n.timer_at = None;
        }
        s.trace(format_args!("{id} crash"));
    }

    /// The process starts again with fresh state and the next incarnation.
    pub fn restart(&self, id: EndpointId) {
        let mut s = self.lock();
        let config = s.config;
        let first_request_id = s.rng.random();
        let peers: Vec<(EndpointId, Vec<Path>)> = s
            .nodes
            .iter()
            .filter(|(p, _)| **p != id)
            .map(|(p, n)| (*p, n.paths.clone()))
            .collect();
        if let Some(n) = s.nodes.get_mut(&id) {
            let mut fresh = SimNode::new(
                &config,
                id,
                &n.paths,
                n.protocol_version,
                n.incarnation + 1,
                first_request_id,
            );
            for (peer, paths) in peers {
                let common: Vec<Path> = fresh
                    .paths
                    .iter()
                    .copied()
                    .filter(|p| paths.contains(p))
                    .collect();
                fresh.detector.add_peer(peer, &common);
            }
            *n = fresh;
        }
        s.trace(format_args!("{id} restart"));
        s.schedule_timer(id);
    }

    /// Cuts `paths` between `a` and `b` in both directions.
    pub fn partition(&self, a: EndpointId, b: EndpointId, paths: &[Path]) {
        let mut s = self.lock();
        for &p in paths {
            s.cuts.insert((a, b, p));
            s.cuts.insert((b, a, p));
        }
        s.trace(format_args!("partition {a}<->{b} {paths:?}"));
    }

    pub fn heal(&self, a: EndpointId, b: EndpointId, paths: &[Path]) {
        let mut s = self.lock();
        for &p in paths {
            s.cuts.remove(&(a, b, p));
            s.cuts.remove(&(b, a, p));
        }
        s.trace(format_args!("heal {a}<->{b} {paths:?}"));
    }

    /// Adds latency to every frame from `from` to `to`.
    pub fn set_extra_delay(&self, from: EndpointId, to: EndpointId, delay_us: u64) {
        let mut s = self.lock();
        s.extra_delay_us.insert((from, to), delay_us);
        s.trace(format_args!("delay {from}->{to} {delay_us}us"));
    }

    /// Runs the next scheduled item; false when nothing is left.
    pub fn step(&self) -> bool {
        self.lock().step()
    }

    /// Runs everything scheduled up to `deadline`, then sets the clock to it.
    pub fn run_until(&self, deadline: Duration) {
        let mut s = self.lock();
        while s
            .queue
            .first_key_value()
            .is_some_and(|((at, _), _)| *at <= deadline)
        {
            s.step();
        }
        s.now = s.now.max(deadline);
    }

    pub fn run_for(&self, duration: Duration) {
        let deadline = self.now() + duration;
        self.run_until(deadline);
    }

    /// Every decision of the run so far, one per line.
    pub fn trace(&self) -> String {
        self.lock().trace.clone()
    }
}

impl SimTransport {
    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a request with `waiter` and sends it.
    fn start_request(
        &self,
        to: EndpointId,
        payload: Bytes,
        timeout: Duration,
        waiter: Waiter<SimCallTx>,
    ) -> Result<u64, TransportError> {
        let mut s = self.lock();
        let path = s.sender(self.id, to, &payload)?;
        let now = s.now;
        let Some(node) = s.nodes.get_mut(&self.id) else {
            return Err(TransportError::Closed { local: self.id });
        };
        let started = node.requests.start(to, timeout, now, waiter)?;
        s.schedule_timer(self.id);
        s.transmit(
            self.id,
            to,
            path,
            Frame::Request {
                id: started.id,
                timeout_ms: started.timeout_ms,
                payload,
            },
        );
        Ok(started.id)
    }
}

impl Transport for SimTransport {
    fn local_id(&self) -> EndpointId {
        self.id
    }

    fn incarnation(&self) -> u64 {
        self.lock().nodes.get(&self.id).map_or(0, |n| n.incarnation)
    }

    fn send(&self, to: EndpointId, payload: Bytes) -> Result<(), TransportError> {
        let mut s = self.lock();
        let path = s.sender(self.id, to, &payload)?;
        s.transmit(self.id, to, path, Frame::Message { payload });
        Ok(())
    }

    fn request(
        &self,
        to: EndpointId,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<RequestId, TransportError> {
        let id = self.start_request(to, payload, timeout, Waiter::Event)?;
        let s = self.lock();
        let node = s
            .nodes
            .get(&self.id)
            .ok_or(TransportError::Closed { local: self.id })?;
        Ok(node.requests.request_id(id))
    }

    fn call(
        &self,
        to: EndpointId,
        payload: Bytes,
        timeout: Duration,
    ) -> impl Future<Output = Result<Bytes, TransportError>> + Send {
        let slot = Arc::new(Mutex::new(CallSlot::default()));
        let request = self
            .start_request(
                to,
                payload,
                timeout,
                Waiter::Call(SimCallTx(Arc::clone(&slot))),
            )
            .map(Some)
            .map_err(Some);
        SimCall {
            state: Arc::clone(&self.state),
            local: self.id,
            slot,
            request,
        }
    }

    fn respond(&self, to: EndpointId, id: RequestId, payload: Bytes) -> Result<(), TransportError> {
        let mut s = self.lock();
        let path = s.sender(self.id, to, &payload)?;
        let now = s.nodes.get(&to).map(|n| n.incarnation);
        if now != Some(id.requester_incarnation) {
            // As on QUIC, where the link to the requester speaks for its new incarnation.
            s.trace(format_args!(
                "{}->{to} {path} response id={} drop: requester restarted",
                self.id, id.id
            ));
            return Ok(());
        }
        s.transmit(self.id, to, path, Frame::Response { id: id.id, payload });
        Ok(())
    }

    fn stream_send(
        &self,
        to: EndpointId,
        stream: StreamId,
        payload: Bytes,
    ) -> Result<u64, TransportError> {
        let mut s = self.lock();
        let path = s.sender(self.id, to, &payload)?;
        let Some(node) = s.nodes.get_mut(&self.id) else {
            return Err(TransportError::Closed { local: self.id });
        };
        let seq = node
            .streams
            .send(to, stream, |_| Ok::<_, TransportError>(()))?;
        s.transmit(
            self.id,
            to,
            path,
            Frame::Stream {
                stream,
                seq,
                payload,
            },
        );
        Ok(seq)
    }

    fn try_next_event(&self) -> Option<Event> {
        let mut s = self.lock();
        let node = s.nodes.get_mut(&self.id).filter(|n| n.alive)?;
        let event = node.events.pop()?;
        if matches!(event, Event::RequestFailed { .. }) {
            node.requests.failure_read();
        }
        Some(event)
    }

    fn queued_events(&self) -> usize {
        self.lock()
            .nodes
            .get(&self.id)
            .map_or(0, |n| n.events.len())
    }

    fn peer_status(&self, peer: EndpointId) -> Option<PeerStatus> {
        self.lock()
            .nodes
            .get(&self.id)
            .and_then(|n| n.detector.status(peer))
    }

    fn link_version(&self, peer: EndpointId, path: Path) -> Option<u16> {
        let s = self.lock();
        let node = s.nodes.get(&self.id)?;
        let other = s.nodes.get(&peer)?;
        let up = node
            .detector
            .status(peer)
            .is_some_and(|st| st.paths_up.contains(&path));
        let hello = Hello {
            version: other.protocol_version,
            from: peer,
            path,
            incarnation: other.incarnation,
        };
        let terms = accept_hello(self.id, node.protocol_version, &hello, true).ok()?;
        up.then_some(terms.version)
    }
}
