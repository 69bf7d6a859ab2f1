//! The simulated twin of the QUIC transport: an in-memory network driven by a seeded scheduler
//! and a virtual clock, so a cluster test can replay a run exactly from its seed.
//!
//! Everything lives in one `SimState` behind a mutex: a queue of scheduled deliveries and timers
//! ordered by (virtual time, insertion number), one ChaCha RNG seeded from the test's seed, and
//! `BTreeMap`s for every collection that is ever iterated. Nothing reads the wall clock. Each
//! endpoint runs the same `FailureDetector` as the QUIC transport, fed by keep-alive frames that
//! cross the simulated links, so partitions are detected the way they are on real sockets.
//! Every decision (send, drop, deliver, timer) appends one line to the trace, which is how tests
//! check that one seed gives one run, byte for byte.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

use crate::addr::{EndpointId, Path};
use crate::detector::{DetectorAction, DetectorConfig, FailureDetector};
use crate::transport::{Event, RequestId, Transport, TransportError};
use crate::wire::{DEFAULT_MAX_FRAME_BYTES, Frame, StreamId};

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
    pub max_frame_bytes: usize,
    /// Bound on undelivered events per endpoint; beyond it frames are dropped and traced.
    pub inbox_limit: usize,
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
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            inbox_limit: 65_536,
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
        incarnation: u64,
        frame: Frame,
    },
    Timer {
        endpoint: EndpointId,
    },
}

#[derive(Debug)]
struct SimNode {
    alive: bool,
    /// Rises at each restart, so frames addressed to an earlier life are dropped.
    incarnation: u64,
    paths: Vec<Path>,
    detector: FailureDetector,
    inbox: VecDeque<Event>,
    next_request_id: u64,
    pending: BTreeMap<u64, (EndpointId, Duration, u64)>,
    stream_next_seq: BTreeMap<(EndpointId, StreamId), u64>,
    timer_at: Option<Duration>,
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
        let request_deadline = node.pending.values().map(|(_, d, _)| *d).min();
        let at = match (deadline, request_deadline) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => match a.or(b) {
                Some(t) => t,
                None => return,
            },
        }
        .max(self.now);
        if node.timer_at == Some(at) {
            return;
        }
        if let Some(node) = self.nodes.get_mut(&endpoint) {
            node.timer_at = Some(at);
        }
        self.schedule(at, Scheduled::Timer { endpoint });
    }

    /// Data goes on the main path while the sender hears the peer there, else on the failsafe.
    fn data_path(&self, from: EndpointId, to: EndpointId) -> Path {
        let Some(node) = self.nodes.get(&from) else {
            return Path::Main;
        };
        match node.detector.status(to) {
            Some(s)
                if !s.paths_up.contains(&Path::Main) && s.paths_up.contains(&Path::Failsafe) =>
            {
                Path::Failsafe
            }
            _ => Path::Main,
        }
    }

    fn transmit(&mut self, from: EndpointId, to: EndpointId, path: Path, frame: Frame) {
        let label = frame_label(&frame);
        let Some(target) = self.nodes.get(&to) else {
            self.trace(format_args!(
                "{from}->{to} {path} {label} drop: no such endpoint"
            ));
            return;
        };
        let incarnation = target.incarnation;
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
                    incarnation,
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
                    self.push_event(endpoint, Event::Peer(event));
                }
            }
        }
        self.schedule_timer(endpoint);
    }

    fn push_event(&mut self, endpoint: EndpointId, event: Event) {
        let limit = self.config.inbox_limit;
        let full = match self.nodes.get_mut(&endpoint) {
            Some(node) if node.inbox.len() < limit => {
                node.inbox.push_back(event);
                false
            }
            Some(_) => true,
            None => false,
        };
        if full {
            self.trace(format_args!("{endpoint} drop: inbox full ({limit} events)"));
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
                let expired: Vec<u64> = node
                    .pending
                    .iter()
                    .filter(|(_, (_, d, _))| *d <= at)
                    .map(|(id, _)| *id)
                    .collect();
                let mut failed = Vec::new();
                for id in expired {
                    if let Some((to, _, timeout_ms)) = node.pending.remove(&id) {
                        failed.push(Event::RequestFailed {
                            to,
                            id: RequestId(id),
                            error: TransportError::Timeout {
                                peer: to,
                                id,
                                timeout_ms,
                            },
                        });
                    }
                }
                for event in failed {
                    self.trace(format_args!("{endpoint} event {event:?}"));
                    self.push_event(endpoint, event);
                }
                self.drain_detector(endpoint);
            }
            Scheduled::Deliver {
                from,
                to,
                path,
                incarnation,
                frame,
            } => {
                let label = frame_label(&frame);
                let Some(node) = self.nodes.get_mut(&to) else {
                    return true;
                };
                if !node.alive || node.incarnation != incarnation {
                    self.trace(format_args!(
                        "{from}->{to} {path} {label} drop: receiver down"
                    ));
                    return true;
                }
                node.detector.on_heard(from, path, at);
                let event = match frame {
                    Frame::Hello(_) | Frame::KeepAlive => None,
                    Frame::Message { payload } => Some(Event::Message { from, payload }),
                    Frame::Request { id, payload, .. } => Some(Event::Request {
                        from,
                        id: RequestId(id),
                        payload,
                    }),
                    Frame::Response { id, payload } => match node.pending.remove(&id) {
                        Some(_) => Some(Event::Response {
                            from,
                            id: RequestId(id),
                            payload,
                        }),
                        None => {
                            self.trace(format_args!(
                                "{from}->{to} {path} {label} drop: no pending request"
                            ));
                            None
                        }
                    },
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
                    self.trace(format_args!("{from}->{to} {path} {label} deliver"));
                    self.push_event(to, event);
                }
                self.drain_detector(to);
            }
        }
        true
    }

    fn check_payload(&self, peer: EndpointId, payload: &Bytes) -> Result<(), TransportError> {
        // 13 bytes: the largest header after the kind byte plus the kind byte.
        let max_bytes = self.config.max_frame_bytes.saturating_sub(13);
        if payload.len() > max_bytes {
            return Err(TransportError::TooLarge {
                peer,
                size_bytes: payload.len(),
                max_bytes,
            });
        }
        Ok(())
    }

    fn sender(&self, local: EndpointId, to: EndpointId) -> Result<(), TransportError> {
        match self.nodes.get(&local) {
            Some(n) if n.alive => {}
            _ => return Err(TransportError::Closed { local }),
        }
        if !self.nodes.contains_key(&to) {
            return Err(TransportError::UnknownPeer { local, peer: to });
        }
        Ok(())
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

    /// Adds an endpoint reachable on `paths`; every endpoint watches every other on the
    /// paths both have.
    pub fn add_endpoint(&self, id: EndpointId, paths: &[Path]) -> SimTransport {
        let mut s = self.lock();
        let mut detector = FailureDetector::new(s.config.detector);
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
            detector.add_peer(*other, &common);
            if let Some(n) = s.nodes.get_mut(other) {
                n.detector.add_peer(id, &common);
            }
        }
        s.nodes.insert(
            id,
            SimNode {
                alive: true,
                incarnation: 0,
                paths: paths.to_vec(),
                detector,
                inbox: VecDeque::new(),
                next_request_id: 1,
                pending: BTreeMap::new(),
                stream_next_seq: BTreeMap::new(),
                timer_at: None,
            },
        );
        s.trace(format_args!("{id} added paths={paths:?}"));
        let ids: Vec<EndpointId> = s.nodes.keys().copied().collect();
        for e in ids {
            s.schedule_timer(e);
        }
        SimTransport {
            id,
            state: Arc::clone(&self.state),
        }
    }

    /// The process dies: its queued events, pending requests and frames in flight to it vanish.
    pub fn crash(&self, id: EndpointId) {
        let mut s = self.lock();
        if let Some(n) = s.nodes.get_mut(&id) {
            n.alive = false;
            n.inbox.clear();
            n.pending.clear();
            n.timer_at = None;
        }
        s.trace(format_args!("{id} crash"));
    }

    /// The process starts again with fresh state and a new incarnation.
    pub fn restart(&self, id: EndpointId) {
        let mut s = self.lock();
        let config = s.config.detector;
        let peers: Vec<(EndpointId, Vec<Path>)> = s
            .nodes
            .iter()
            .filter(|(p, _)| **p != id)
            .map(|(p, n)| (*p, n.paths.clone()))
            .collect();
        if let Some(n) = s.nodes.get_mut(&id) {
            n.alive = true;
            n.incarnation += 1;
            n.detector = FailureDetector::new(config);
            for (peer, paths) in peers {
                let common: Vec<Path> = n
                    .paths
                    .iter()
                    .copied()
                    .filter(|p| paths.contains(p))
                    .collect();
                n.detector.add_peer(peer, &common);
            }
            n.stream_next_seq.clear();
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

    fn transmit_data(&self, to: EndpointId, frame: Frame) {
        let mut s = self.lock();
        let path = s.data_path(self.id, to);
        s.transmit(self.id, to, path, frame);
    }
}

impl Transport for SimTransport {
    fn local_id(&self) -> EndpointId {
        self.id
    }

    fn send(&self, to: EndpointId, payload: Bytes) -> Result<(), TransportError> {
        {
            let s = self.lock();
            s.sender(self.id, to)?;
            s.check_payload(to, &payload)?;
        }
        self.transmit_data(to, Frame::Message { payload });
        Ok(())
    }

    fn request(
        &self,
        to: EndpointId,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<RequestId, TransportError> {
        let id = {
            let mut s = self.lock();
            s.sender(self.id, to)?;
            s.check_payload(to, &payload)?;
            let now = s.now;
            let Some(node) = s.nodes.get_mut(&self.id) else {
                return Err(TransportError::Closed { local: self.id });
            };
            let id = node.next_request_id;
            node.next_request_id += 1;
            // The wire carries u32 milliseconds; a longer timeout is capped, never overflows.
            let timeout = timeout.min(Duration::from_millis(u64::from(u32::MAX)));
            let timeout_ms = timeout.as_millis() as u64;
            let deadline = now.checked_add(timeout).unwrap_or(Duration::MAX);
            node.pending.insert(id, (to, deadline, timeout_ms));
            s.schedule_timer(self.id);
            id
        };
        let timeout_ms = timeout.as_millis().min(u128::from(u32::MAX)) as u32;
        self.transmit_data(
            to,
            Frame::Request {
                id,
                timeout_ms,
                payload,
            },
        );
        Ok(RequestId(id))
    }

    fn respond(&self, to: EndpointId, id: RequestId, payload: Bytes) -> Result<(), TransportError> {
        {
            let s = self.lock();
            s.sender(self.id, to)?;
            s.check_payload(to, &payload)?;
        }
        self.transmit_data(to, Frame::Response { id: id.0, payload });
        Ok(())
    }

    fn stream_send(
        &self,
        to: EndpointId,
        stream: StreamId,
        payload: Bytes,
    ) -> Result<u64, TransportError> {
        let seq = {
            let mut s = self.lock();
            s.sender(self.id, to)?;
            s.check_payload(to, &payload)?;
            let Some(node) = s.nodes.get_mut(&self.id) else {
                return Err(TransportError::Closed { local: self.id });
            };
            let next = node.stream_next_seq.entry((to, stream)).or_insert(0);
            let seq = *next;
            *next += 1;
            seq
        };
        self.transmit_data(
            to,
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
        s.nodes
            .get_mut(&self.id)
            .and_then(|n| if n.alive { n.inbox.pop_front() } else { None })
    }
}
