//! The sans-IO core the QUIC transport and its simulated twin share, so the twin cannot drift
//! from the real thing: the limits and what they refuse, request tracking and expiry (for
//! `request` and `call` alike), ordered-stream numbering, the choice of path, the hello's terms
//! (version, incarnation, cluster membership, the bound on clients) and the endpoint's event queue with its byte
//! bounds. Plain data structures: `now` is passed in, nothing reads a clock, spawns a task or
//! iterates a `HashMap`; the drivers add the waiting and the IO.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;

use crate::addr::{EndpointId, Path};
use crate::detector::PeerEvent;
use crate::transport::{Event, RequestId, TransportError};
use crate::wire::{
    DEFAULT_MAX_FRAME_BYTES, FRAME_HEADER_MAX_BYTES, Frame, Hello, LENGTH_PREFIX_BYTES,
    MAX_FRAME_BYTES_LIMIT, StreamId, VersionError, negotiate_version,
};

/// Longest request deadline: the wire carries `timeout_ms` as u32 (about 49 days).
pub const REQUEST_TIMEOUT_MAX: Duration = Duration::from_millis(u32::MAX as u64);

/// Peer events held for an application that is not draining; beyond this, older events of the
/// same peer are coalesced away (its latest state always stays queued).
pub const PEER_EVENTS_QUEUED_MAX: usize = 1024;

/// Every bound of an endpoint. Each queue is bounded in bytes (and, where items have no
/// payload, in count, which bounds their bytes); `docs/transport.md` turns them into the memory
/// ceiling per link and per endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame body (header and payload); payloads up to this minus
    /// `FRAME_HEADER_MAX_BYTES` are accepted. Capped at `MAX_FRAME_BYTES_LIMIT`.
    pub max_frame_bytes: usize,
    /// Encoded bytes queued per link on the control lane before sends fail with `QueueFull`;
    /// a budget of its own, so a full bulk lane never refuses a keep-alive or a small request.
    pub control_queue_bytes: usize,
    /// Encoded bytes queued per link on the bulk lane before sends fail with `QueueFull`. A
    /// frame always fits an empty lane, so one maximal frame can always be sent.
    pub bulk_queue_bytes: usize,
    /// Payload bytes of undelivered data events per endpoint before readers stop reading (QUIC)
    /// or frames are dropped (simulation). An event always fits an empty queue.
    pub event_queue_bytes: usize,
    /// Undelivered data events per endpoint, whatever their size.
    pub event_queue_events: usize,
    /// Bytes of frames held by an injected delay, per lane; the reader waits beyond it.
    pub delay_queue_bytes: usize,
    /// Requests waiting for an answer, plus request failures not yet read, before new requests
    /// fail with `TooManyRequests`. Also bounds the control queue's request failures.
    pub max_pending_requests: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            control_queue_bytes: 4 << 20,
            // Two maximal frames with their length prefixes: one can queue behind one in flight.
            bulk_queue_bytes: 2 * (DEFAULT_MAX_FRAME_BYTES + LENGTH_PREFIX_BYTES),
            event_queue_bytes: 64 << 20,
            event_queue_events: 4096,
            delay_queue_bytes: 32 << 20,
            max_pending_requests: 65_536,
        }
    }
}

impl Limits {
    /// Largest frame body actually accepted.
    pub fn frame_bytes(&self) -> usize {
        self.max_frame_bytes.min(MAX_FRAME_BYTES_LIMIT)
    }

    /// Largest user payload.
    pub fn max_payload_bytes(&self) -> usize {
        self.frame_bytes().saturating_sub(FRAME_HEADER_MAX_BYTES)
    }

    /// Refuses a payload that can never be sent.
    pub fn check_payload(&self, peer: EndpointId, size_bytes: usize) -> Result<(), TransportError> {
        let max_bytes = self.max_payload_bytes();
        if size_bytes > max_bytes {
            return Err(TransportError::TooLarge {
                peer,
                size_bytes,
                max_bytes,
            });
        }
        Ok(())
    }
}

/// Memory an event takes while queued: its payload and the event itself.
pub fn event_bytes(event: &Event) -> usize {
    let payload = match event {
        Event::Message { payload, .. }
        | Event::Request { payload, .. }
        | Event::Response { payload, .. }
        | Event::Stream { payload, .. } => payload.len(),
        Event::RequestFailed { .. } | Event::Peer(_) | Event::LocalStall { .. } => 0,
    };
    std::mem::size_of::<Event>() + payload
}

/// The data path to `peer`: main while the detector hears the peer there, else failsafe;
/// `None` (the peer is unreachable) when the detector hears it on no path that has a link.
pub fn choose_path(paths_up: &[Path], has_link: impl Fn(Path) -> bool) -> Option<Path> {
    [Path::Main, Path::Failsafe]
        .into_iter()
        .find(|p| paths_up.contains(p) && has_link(*p))
}

/// Why a hello is refused; each maps to a close code.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HelloRefusal {
    #[error(transparent)]
    Version(#[from] VersionError),
    #[error("endpoint {peer} is not in the cluster list of {local}")]
    NotInCluster { local: EndpointId, peer: EndpointId },
    #[error(
        "client endpoint {peer} refused by {local}: it already serves {limit} clients \
         (max_clients)"
    )]
    TooManyClients {
        local: EndpointId,
        peer: EndpointId,
        limit: usize,
    },
}

/// Admits one more client endpoint that was not in the cluster list, when `clients` such
/// clients are known already and at most `max_clients` may be.
pub fn admit_client(
    local: EndpointId,
    peer: EndpointId,
    clients: usize,
    max_clients: usize,
) -> Result<(), HelloRefusal> {
    if clients >= max_clients {
        return Err(HelloRefusal::TooManyClients {
            local,
            peer,
            limit: max_clients,
        });
    }
    Ok(())
}

/// What a link speaks once both hellos are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkTerms {
    /// The lower of the two announced versions.
    pub version: u16,
    /// The peer's boot id, which every frame of the link is heard with.
    pub incarnation: u64,
}

/// The terms of a link from the peer's hello: its version must be adjacent to ours and the
/// peer must be in our cluster list (`in_cluster`).
pub fn accept_hello(
    local: EndpointId,
    our_version: u16,
    hello: &Hello,
    in_cluster: bool,
) -> Result<LinkTerms, HelloRefusal> {
    if !in_cluster {
        return Err(HelloRefusal::NotInCluster {
            local,
            peer: hello.from,
        });
    }
    let version = negotiate_version(our_version, hello.version)?;
    Ok(LinkTerms {
        version,
        incarnation: hello.incarnation,
    })
}

/// Numbers of the ordered streams an endpoint sends on, per (peer, stream).
#[derive(Debug, Default)]
pub struct StreamNumbers {
    next: BTreeMap<(EndpointId, StreamId), u64>,
}

impl StreamNumbers {
    /// Numbers a frame and queues it with `queue` in one step: the number is consumed only if
    /// `queue` succeeds, so a refused frame leaves no gap.
    pub fn send<E>(
        &mut self,
        peer: EndpointId,
        stream: StreamId,
        queue: impl FnOnce(u64) -> Result<(), E>,
    ) -> Result<u64, E> {
        let seq = self.next.get(&(peer, stream)).copied().unwrap_or(0);
        queue(seq)?;
        self.next.insert((peer, stream), seq + 1);
        Ok(seq)
    }

    /// Forgets `peer`'s streams: numbering to it starts again at 0, as to a restarted peer.
    pub fn forget_peer(&mut self, peer: EndpointId) {
        self.next.retain(|(p, _), _| *p != peer);
    }
}

/// Where the answer to a request goes.
#[derive(Debug)]
pub enum Waiter<C> {
    /// As `Event::Response` or `Event::RequestFailed` on the event queue (`request`).
    Event,
    /// Straight to the caller (`call`).
    Call(C),
}

/// How a driver hands an answer to a waiting `call`.
pub trait CallWaiter {
    fn complete(self, answer: Result<Bytes, TransportError>);
}

#[derive(Debug)]
struct PendingRequest<C> {
    to: EndpointId,
    deadline: Duration,
    timeout_ms: u64,
    waiter: Waiter<C>,
}

/// A request that was registered and may now be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartedRequest {
    pub id: u64,
    /// The timeout as the wire carries it.
    pub timeout_ms: u32,
    /// The timeout as waited for (capped at `REQUEST_TIMEOUT_MAX`).
    pub timeout: Duration,
}

/// What a data frame received from `from` (speaking as `incarnation`) is for the application.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// Nothing but a sign of life (already heard by the detector).
    KeepAlive,
    /// A hello on a link that already had one.
    Hello,
    /// An answer: for the request table to match.
    Response { id: u64, payload: Bytes },
    /// A message, request or stream frame, as the event to queue.
    Deliver(Event),
}

/// Turns a received frame into what both transports do with it, so they cannot drift.
pub fn received(from: EndpointId, incarnation: u64, frame: Frame) -> Received {
    match frame {
        Frame::KeepAlive => Received::KeepAlive,
        Frame::Hello(_) => Received::Hello,
        Frame::Response { id, payload } => Received::Response { id, payload },
        Frame::Message { payload } => Received::Deliver(Event::Message {
            from,
            incarnation,
            payload,
        }),
        Frame::Request { id, payload, .. } => Received::Deliver(Event::Request {
            from,
            incarnation,
            id: RequestId {
                id,
                requester_incarnation: incarnation,
            },
            payload,
        }),
        Frame::Stream {
            stream,
            seq,
            payload,
        } => Received::Deliver(Event::Stream {
            from,
            incarnation,
            stream,
            seq,
            payload,
        }),
    }
}

/// What a response turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum ResponseOutcome {
    /// For a `request`: queue this event.
    Deliver(Event),
    /// Handed to the waiting `call`.
    Completed,
    /// From a peer the request did not go to: ignored.
    WrongPeer { expected: EndpointId },
    /// No such request is waiting (answered, expired, forgotten): ignored.
    NotPending,
}

/// Requests waiting for an answer, each with its deadline, and request failures not yet read.
///
/// Request ids start at a random value per incarnation (`first_id`, from the OS in QUIC and
/// from the seeded RNG in the simulation) and count up from there, wrapping. A response is
/// matched by (peer, id); what keeps a late answer to a previous incarnation's request from
/// matching a new request under the same id is the responder (`respond` answers only the
/// incarnation that asked, `RequestId::requester_incarnation`); the random start keeps two
/// incarnations' ids apart in logs and traces.
#[derive(Debug)]
pub struct RequestTable<C> {
    local: EndpointId,
    /// This process's incarnation, which every `RequestId` it hands out names.
    incarnation: u64,
    max_pending: usize,
    next_id: u64,
    pending: BTreeMap<u64, PendingRequest<C>>,
    by_deadline: BTreeSet<(Duration, u64)>,
    /// `RequestFailed` events queued and not yet read; they count against `max_pending`.
    unread_failures: usize,
}

impl<C: CallWaiter> RequestTable<C> {
    /// The table of incarnation `incarnation` of `local`, whose first request gets id
    /// `first_id` (random per incarnation, see above).
    pub fn new(local: EndpointId, incarnation: u64, max_pending: usize, first_id: u64) -> Self {
        RequestTable {
            local,
            incarnation,
            max_pending,
            next_id: first_id,
            pending: BTreeMap::new(),
            by_deadline: BTreeSet::new(),
            unread_failures: 0,
        }
    }

    /// How the application names request `id` of this process.
    pub fn request_id(&self, id: u64) -> RequestId {
        RequestId {
            id,
            requester_incarnation: self.incarnation,
        }
    }

    /// Requests waiting for an answer.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Registers a request to `to` with its deadline, within the bound.
    pub fn start(
        &mut self,
        to: EndpointId,
        timeout: Duration,
        now: Duration,
        waiter: Waiter<C>,
    ) -> Result<StartedRequest, TransportError> {
        if self.pending.len() + self.unread_failures >= self.max_pending {
            return Err(TransportError::TooManyRequests {
                local: self.local,
                limit: self.max_pending,
            });
        }
        let timeout = timeout.min(REQUEST_TIMEOUT_MAX);
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let deadline = now.checked_add(timeout).unwrap_or(Duration::MAX);
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.pending.insert(
            id,
            PendingRequest {
                to,
                deadline,
                timeout_ms: u64::from(timeout_ms),
                waiter,
            },
        );
        self.by_deadline.insert((deadline, id));
        Ok(StartedRequest {
            id,
            timeout_ms,
            timeout,
        })
    }

    fn take(&mut self, id: u64) -> Option<PendingRequest<C>> {
        let p = self.pending.remove(&id)?;
        self.by_deadline.remove(&(p.deadline, id));
        Some(p)
    }

    /// Drops request `id` without an answer: it could not be sent, or its `call` was dropped.
    pub fn forget(&mut self, id: u64) {
        self.take(id);
    }

    /// A response to request `id` arrived from incarnation `incarnation` of `from`.
    pub fn on_response(
        &mut self,
        from: EndpointId,
        incarnation: u64,
        id: u64,
        payload: Bytes,
    ) -> ResponseOutcome {
        match self.pending.get(&id).map(|p| p.to) {
            None => ResponseOutcome::NotPending,
            Some(expected) if expected != from => ResponseOutcome::WrongPeer { expected },
            Some(_) => match self.take(id).map(|p| p.waiter) {
                Some(Waiter::Call(c)) => {
                    c.complete(Ok(payload));
                    ResponseOutcome::Completed
                }
                Some(Waiter::Event) => ResponseOutcome::Deliver(Event::Response {
                    from,
                    incarnation,
                    id: self.request_id(id),
                    payload,
                }),
                None => ResponseOutcome::NotPending,
            },
        }
    }

    /// Fails every request whose deadline is at or before `now`: a `call` gets `Timeout`, a
    /// `request` a `RequestFailed` event (returned; it counts as unread until `failure_read`).
    pub fn expire(&mut self, now: Duration) -> Vec<Event> {
        let mut failed = Vec::new();
        while let Some(&(deadline, id)) = self.by_deadline.first() {
            if deadline > now {
                break;
            }
            let Some(p) = self.take(id) else { continue };
            let error = TransportError::Timeout {
                peer: p.to,
                id,
                timeout_ms: p.timeout_ms,
            };
            match p.waiter {
                Waiter::Call(c) => c.complete(Err(error)),
                Waiter::Event => {
                    self.unread_failures += 1;
                    failed.push(Event::RequestFailed {
                        to: p.to,
                        id: self.request_id(id),
                        error,
                    });
                }
            }
        }
        failed
    }

    /// A response that `on_response` took out of the table could not be queued for the
    /// application (the event queue was full in the simulation, its link died while the QUIC
    /// reader waited for room): the request fails instead, so it still gets exactly one answer.
    /// The failure counts as unread until `failure_read`.
    pub fn response_lost(
        &mut self,
        from: EndpointId,
        id: RequestId,
        reason: &'static str,
    ) -> Event {
        self.unread_failures += 1;
        Event::RequestFailed {
            to: from,
            id,
            error: TransportError::ResponseLost {
                peer: from,
                id: id.id,
                reason,
            },
        }
    }

    /// The application read a `RequestFailed` event (or it was discarded): its slot is free.
    pub fn failure_read(&mut self) {
        self.unread_failures = self.unread_failures.saturating_sub(1);
    }

    /// The earliest deadline of a waiting request.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.by_deadline.first().map(|(d, _)| *d)
    }

    /// The endpoint closed: every `call` fails with `Closed`, every `request` is dropped.
    pub fn close(&mut self) {
        let local = self.local;
        self.by_deadline.clear();
        self.unread_failures = 0;
        for p in std::mem::take(&mut self.pending).into_values() {
            if let Waiter::Call(c) = p.waiter {
                c.complete(Err(TransportError::Closed { local }));
            }
        }
    }
}

/// What `EventQueue::push_data` says when the queue is full: the event comes back.
#[derive(Debug)]
pub struct QueueFull(pub Event);

/// An endpoint's events: control events (peer events, request failures), which never wait and
/// are served first, and data events, bounded in bytes and count. Control events are bounded
/// too: peer events by `PEER_EVENTS_QUEUED_MAX` (coalescing per peer), request failures by
/// `Limits::max_pending_requests` (`RequestTable` counts them until read).
#[derive(Debug)]
pub struct EventQueue {
    control: VecDeque<Event>,
    peer_events: usize,
    data: VecDeque<Event>,
    data_bytes: usize,
    max_bytes: usize,
    max_events: usize,
}

impl EventQueue {
    pub fn new(limits: &Limits) -> Self {
        EventQueue {
            control: VecDeque::new(),
            peer_events: 0,
            data: VecDeque::new(),
            data_bytes: 0,
            max_bytes: limits.event_queue_bytes,
            max_events: limits.event_queue_events.max(1),
        }
    }

    /// Queues a peer event, a request failure or a local stall; never refuses. Returns a peer
    /// event that was coalesced away when peer events were at their bound: the oldest queued
    /// event of the same peer that is not a `Down` (and, when that is an `Up`, the `Down` of
    /// the same incarnation with it, since the application never saw that incarnation up). So a
    /// `Down` the application needs (its `Up` was read) is never dropped while a later `Up` is
    /// kept; at most one such `Down` per peer can hold the queue above its bound. Local stalls
    /// merge into the one already queued (their durations add up).
    pub fn push_control(&mut self, event: Event) -> Option<PeerEvent> {
        let mut coalesced = None;
        match event {
            Event::Peer(new) => {
                if self.peer_events >= PEER_EVENTS_QUEUED_MAX
                    && let Some(pos) = self.control.iter().position(|e| {
                        matches!(e, Event::Peer(old) if old.peer() == new.peer()
                            && !matches!(old, PeerEvent::Down { .. }))
                    })
                    && let Some(Event::Peer(old)) = self.control.remove(pos)
                {
                    self.peer_events -= 1;
                    if let PeerEvent::Up { peer, incarnation } = old {
                        let down = Event::Peer(PeerEvent::Down { peer, incarnation });
                        if let Some(pos) = self.control.iter().position(|e| *e == down) {
                            self.control.remove(pos);
                            self.peer_events -= 1;
                        }
                    }
                    coalesced = Some(old);
                }
                self.peer_events += 1;
            }
            Event::LocalStall { stalled_ms } => {
                let queued = self.control.iter_mut().find_map(|e| match e {
                    Event::LocalStall { stalled_ms } => Some(stalled_ms),
                    _ => None,
                });
                if let Some(queued) = queued {
                    *queued = queued.saturating_add(stalled_ms);
                    return None;
                }
            }
            _ => {}
        }
        self.control.push_back(event);
        coalesced
    }

    /// Queues a data event within the bounds; a full queue gives it back. An event always fits
    /// an empty queue.
    pub fn push_data(&mut self, event: Event) -> Result<(), QueueFull> {
        let size = event_bytes(&event);
        let fits = self.data.is_empty()
            || (self.data.len() < self.max_events && self.data_bytes + size <= self.max_bytes);
        if !fits {
            return Err(QueueFull(event));
        }
        self.data_bytes += size;
        self.data.push_back(event);
        Ok(())
    }

    /// The next event: control events first.
    pub fn pop(&mut self) -> Option<Event> {
        if let Some(event) = self.control.pop_front() {
            if matches!(event, Event::Peer(_)) {
                self.peer_events -= 1;
            }
            return Some(event);
        }
        let event = self.data.pop_front()?;
        self.data_bytes -= event_bytes(&event);
        Some(event)
    }

    /// Bytes of queued data events.
    pub fn data_bytes(&self) -> usize {
        self.data_bytes
    }

    /// Queued events of both kinds.
    pub fn len(&self) -> usize {
        self.control.len() + self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        self.control.clear();
        self.peer_events = 0;
        self.data.clear();
        self.data_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: EndpointId = EndpointId::new(1, 0);
    const B: EndpointId = EndpointId::new(2, 0);

    #[derive(Debug)]
    struct Slot(std::rc::Rc<std::cell::RefCell<Option<Result<Bytes, TransportError>>>>);

    impl CallWaiter for Slot {
        fn complete(self, answer: Result<Bytes, TransportError>) {
            *self.0.borrow_mut() = Some(answer);
        }
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn requests_expire_in_deadline_order_and_count_until_read() {
        let mut t: RequestTable<Slot> = RequestTable::new(A, 1, 2, 1);
        let late = t.start(B, ms(200), ms(0), Waiter::Event).expect("first");
        let early = t.start(B, ms(100), ms(0), Waiter::Event).expect("second");
        assert!(matches!(
            t.start(B, ms(1), ms(0), Waiter::Event),
            Err(TransportError::TooManyRequests { limit: 2, .. })
        ));
        assert_eq!(t.next_deadline(), Some(ms(100)));
        let failed = t.expire(ms(150));
        assert!(
            matches!(failed.as_slice(), [Event::RequestFailed { id, .. }] if id.id == early.id)
        );
        // The unread failure still holds its slot: the control queue stays bounded.
        assert!(t.start(B, ms(1), ms(150), Waiter::Event).is_err());
        t.failure_read();
        t.start(B, ms(1), ms(150), Waiter::Event)
            .expect("slot freed");
        assert_eq!(
            t.on_response(A, 1, late.id, Bytes::new()),
            ResponseOutcome::WrongPeer { expected: B }
        );
        assert!(matches!(
            t.on_response(B, 1, late.id, Bytes::new()),
            ResponseOutcome::Deliver(Event::Response { .. })
        ));
        assert_eq!(
            t.on_response(B, 1, late.id, Bytes::new()),
            ResponseOutcome::NotPending
        );
    }

    #[test]
    fn a_forgotten_call_frees_its_slot_and_a_timed_out_call_is_told() {
        let mut t: RequestTable<Slot> = RequestTable::new(A, 1, 1, 1);
        let answer = std::rc::Rc::new(std::cell::RefCell::new(None));
        let r = t
            .start(B, ms(10), ms(0), Waiter::Call(Slot(answer.clone())))
            .expect("call");
        t.forget(r.id);
        let r = t
            .start(B, ms(10), ms(0), Waiter::Call(Slot(answer.clone())))
            .expect("slot freed");
        assert_eq!(t.expire(ms(10)), vec![]);
        assert_eq!(
            answer.borrow_mut().take(),
            Some(Err(TransportError::Timeout {
                peer: B,
                id: r.id,
                timeout_ms: 10
            }))
        );
        assert!(t.is_empty());
    }

    #[test]
    fn unbounded_timeouts_are_capped_not_overflowed() {
        let mut t: RequestTable<Slot> = RequestTable::new(A, 1, 4, 1);
        let r = t
            .start(B, Duration::MAX, Duration::MAX / 2, Waiter::Event)
            .expect("start");
        assert_eq!(r.timeout_ms, u32::MAX);
        assert_eq!(r.timeout, REQUEST_TIMEOUT_MAX);
    }

    #[test]
    fn events_are_bounded_in_bytes_and_control_comes_first() {
        let limits = Limits {
            event_queue_bytes: 3 << 20,
            ..Limits::default()
        };
        let mut q = EventQueue::new(&limits);
        let big = |n: u8| Event::Message {
            from: B,
            incarnation: 1,
            payload: Bytes::from(vec![n; 1 << 20]),
        };
        let mut accepted = 0;
        while q.push_data(big(accepted)).is_ok() {
            accepted += 1;
            assert!(accepted < 10, "bounded");
        }
        assert_eq!(accepted, 2, "two 1 MiB events and their overhead fit 3 MiB");
        assert!(q.data_bytes() <= limits.event_queue_bytes);
        let up = Event::Peer(PeerEvent::Up {
            peer: B,
            incarnation: 1,
        });
        assert_eq!(q.push_control(up.clone()), None);
        assert_eq!(q.pop(), Some(up), "control events come before queued data");
        assert!(matches!(q.pop(), Some(Event::Message { .. })));
        assert!(matches!(q.pop(), Some(Event::Message { .. })));
        assert_eq!(q.data_bytes(), 0);
        let huge = Event::Message {
            from: B,
            incarnation: 1,
            payload: Bytes::from(vec![0u8; 8 << 20]),
        };
        assert!(
            q.push_data(huge).is_ok(),
            "one event always fits an empty queue"
        );
    }

    #[test]
    fn peer_events_coalesce_per_peer_at_their_bound() {
        let mut q = EventQueue::new(&Limits::default());
        for n in 0..PEER_EVENTS_QUEUED_MAX as u16 {
            let peer = EndpointId::new(n, 0);
            assert_eq!(
                q.push_control(Event::Peer(PeerEvent::Up {
                    peer,
                    incarnation: 1
                })),
                None
            );
        }
        let p0 = EndpointId::new(0, 0);
        let old = q.push_control(Event::Peer(PeerEvent::Down {
            peer: p0,
            incarnation: 1,
        }));
        assert_eq!(
            old,
            Some(PeerEvent::Up {
                peer: p0,
                incarnation: 1
            })
        );
        assert_eq!(q.len(), PEER_EVENTS_QUEUED_MAX);
    }

    #[test]
    fn coalescing_never_drops_a_down_the_application_needs() {
        let mut q = EventQueue::new(&Limits::default());
        let p0 = EndpointId::new(0, 0);
        let peer = |peer, n: u16| {
            Event::Peer(PeerEvent::LinkUp {
                peer,
                path: Path::Failsafe,
                incarnation: u64::from(n),
            })
        };
        // The application read Up{p0, 1}; Down{p0, 1} is queued first, then other peers fill up.
        q.push_control(Event::Peer(PeerEvent::Down {
            peer: p0,
            incarnation: 1,
        }));
        for n in 1..PEER_EVENTS_QUEUED_MAX as u16 {
            q.push_control(peer(EndpointId::new(n, 0), n));
        }
        q.push_control(Event::Peer(PeerEvent::Up {
            peer: p0,
            incarnation: 2,
        }));
        let p0_events: Vec<Event> = std::iter::from_fn(|| q.pop())
            .filter(|e| matches!(e, Event::Peer(p) if p.peer() == p0))
            .collect();
        assert_eq!(
            p0_events,
            vec![
                Event::Peer(PeerEvent::Down {
                    peer: p0,
                    incarnation: 1
                }),
                Event::Peer(PeerEvent::Up {
                    peer: p0,
                    incarnation: 2
                })
            ]
        );
    }

    #[test]
    fn local_stalls_merge_into_one_queued_event() {
        let mut q = EventQueue::new(&Limits::default());
        q.push_control(Event::LocalStall { stalled_ms: 150 });
        q.push_control(Event::LocalStall { stalled_ms: 200 });
        assert_eq!(q.pop(), Some(Event::LocalStall { stalled_ms: 350 }));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn request_ids_start_where_told_and_wrap() {
        let mut t: RequestTable<Slot> = RequestTable::new(A, 1, 4, u64::MAX);
        let first = t.start(B, ms(10), ms(0), Waiter::Event).expect("first");
        let second = t.start(B, ms(10), ms(0), Waiter::Event).expect("second");
        assert_eq!((first.id, second.id), (u64::MAX, 0));
    }

    #[test]
    fn path_choice_prefers_main_and_needs_a_link() {
        let all = |_: Path| true;
        assert_eq!(
            choose_path(&[Path::Main, Path::Failsafe], all),
            Some(Path::Main)
        );
        assert_eq!(choose_path(&[Path::Failsafe], all), Some(Path::Failsafe));
        assert_eq!(choose_path(&[], all), None, "a down peer is unreachable");
        assert_eq!(choose_path(&[Path::Main], |p| p == Path::Failsafe), None);
    }

    #[test]
    fn a_hello_from_outside_the_cluster_or_two_versions_away_is_refused() {
        let hello = Hello {
            version: 4,
            from: B,
            path: Path::Main,
            incarnation: 9,
        };
        assert_eq!(
            accept_hello(A, 3, &hello, true),
            Ok(LinkTerms {
                version: 3,
                incarnation: 9
            })
        );
        assert!(matches!(
            accept_hello(A, 2, &hello, true),
            Err(HelloRefusal::Version(_))
        ));
        let refused = accept_hello(A, 4, &hello, false).expect_err("not in the list");
        assert_eq!(
            refused.to_string(),
            "endpoint 2.0 is not in the cluster list of 1.0"
        );
    }

    #[test]
    fn a_refused_stream_frame_consumes_no_number() {
        let mut n = StreamNumbers::default();
        let s = StreamId(3);
        assert_eq!(n.send(B, s, |_| Ok::<_, ()>(())), Ok(0));
        assert_eq!(n.send(B, s, |_| Err(())), Err(()));
        assert_eq!(n.send(B, s, |_| Ok::<_, ()>(())), Ok(1));
        assert_eq!(n.send(A, s, |_| Ok::<_, ()>(())), Ok(0));
    }
}
