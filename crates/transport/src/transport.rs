//! The one boundary every other crate talks through. Both implementations (QUIC and the
//! simulated twin) honour the same contract, checked by the same behavioural tests:
//!
//! - `send`: one-way, at most once per call in QUIC; the simulated network may also lose,
//!   duplicate and reorder them, so callers that need delivery use requests and retry.
//! - `request`: exactly one `Response` or `RequestFailed` event per request id, never both.
//! - `stream_send`: numbered by a per (peer, stream) `seq` that advances only when the frame
//!   was queued, so a refused frame (`TooLarge`, `QueueFull`, `Unreachable`, ...) leaves no gap.
//!   Queued frames travel in `seq` order on one path, without duplicates. They may still be
//!   lost (a link that dies with frames in flight, an injected fault) and a switch between the
//!   main and failsafe paths can reorder frames in flight, so receivers check `seq`: a gap or
//!   a step back means resync.
//! - `call`: a request whose answer goes straight to the caller's future; dropping the future
//!   forgets the request at once (its pending slot is free again).
//! - events arrive through `try_next_event`: peer events, request failures and local stalls
//!   before any data event queued earlier; a peer event names the peer's incarnation.
//! - a peer the detector hears on no path is `Unreachable`: sends and requests fail at once.
//!
//! Methods never block: they queue, bounded, and fail with `QueueFull` instead of waiting.
//! The conformance suite (`tests/conformance.rs`) runs every clause against both.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;

use crate::addr::{EndpointId, Path};
use crate::detector::{PeerEvent, PeerStatus};
use crate::wire::StreamId;

/// Names one request: the id its requester gave it (unique for the life of that process) and
/// the requester's incarnation. `respond` sends an answer only to that incarnation, so a late
/// answer never reaches a later incarnation of the requester that reused the id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId {
    pub id: u64,
    pub requester_incarnation: u64,
}

/// Everything an endpoint hears. Data events name the sender's incarnation (from the hello of
/// the link they came on): control events come first, so a message of a peer's previous
/// incarnation may be read after its `Down` and the `Up` of the next one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Message {
        from: EndpointId,
        incarnation: u64,
        payload: Bytes,
    },
    Request {
        from: EndpointId,
        incarnation: u64,
        id: RequestId,
        payload: Bytes,
    },
    Response {
        from: EndpointId,
        incarnation: u64,
        id: RequestId,
        payload: Bytes,
    },
    /// No response within the request's deadline.
    RequestFailed {
        to: EndpointId,
        id: RequestId,
        error: TransportError,
    },
    Stream {
        from: EndpointId,
        incarnation: u64,
        stream: StreamId,
        seq: u64,
        payload: Bytes,
    },
    Peer(PeerEvent),
    /// This process did not run for `stalled_ms` (a long synchronous call, a paused VM, a
    /// blocked runtime): the detector did not count that silence against any peer, and the
    /// peers may have declared this process down meanwhile, so a pair layer should check
    /// whether it is still the primary before acting. Stalls queued and not yet read merge
    /// into one event (their durations add up).
    LocalStall {
        stalled_ms: u64,
    },
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TransportError {
    #[error(
        "peer {peer} is not known to endpoint {local}: no address configured and never connected"
    )]
    UnknownPeer { local: EndpointId, peer: EndpointId },
    #[error(
        "payload of {size_bytes} bytes to {peer} exceeds the maximum frame body of {max_bytes} bytes"
    )]
    TooLarge {
        peer: EndpointId,
        size_bytes: usize,
        max_bytes: usize,
    },
    #[error("send queue to {peer} is full ({limit_bytes} bytes)")]
    QueueFull {
        peer: EndpointId,
        limit_bytes: usize,
    },
    #[error("request {id} to {peer} got no response within {timeout_ms} ms")]
    Timeout {
        peer: EndpointId,
        id: u64,
        timeout_ms: u64,
    },
    #[error("response to request {id} from {peer} arrived but was lost: {reason}")]
    ResponseLost {
        peer: EndpointId,
        id: u64,
        reason: &'static str,
    },
    #[error("peer {peer} is unreachable on every path")]
    Unreachable { peer: EndpointId },
    #[error("endpoint {local} already has {limit} requests waiting for a response")]
    TooManyRequests { local: EndpointId, limit: usize },
    #[error("endpoint {local} is closed")]
    Closed { local: EndpointId },
}

/// The cluster transport seen by its users.
pub trait Transport {
    fn local_id(&self) -> EndpointId;
    /// This endpoint's boot id, carried in its hellos and in its peers' events about it.
    fn incarnation(&self) -> u64;
    /// One-way message.
    fn send(&self, to: EndpointId, payload: Bytes) -> Result<(), TransportError>;
    /// Request with a deadline; the answer comes as `Event::Response` or `Event::RequestFailed`.
    fn request(
        &self,
        to: EndpointId,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<RequestId, TransportError>;
    /// Request and wait for the response, at most `timeout`. Dropping the future before the
    /// answer forgets the request.
    fn call(
        &self,
        to: EndpointId,
        payload: Bytes,
        timeout: Duration,
    ) -> impl Future<Output = Result<Bytes, TransportError>> + Send;
    /// Answers a request heard as `Event::Request`. An answer to an incarnation of the
    /// requester that is gone (the link to `to` now speaks for a later one) is dropped: it
    /// could only answer a new request that reused the id.
    fn respond(&self, to: EndpointId, id: RequestId, payload: Bytes) -> Result<(), TransportError>;
    /// Appends to an ordered stream; returns the frame's sequence number on that stream.
    /// Numbering and queueing are one step: concurrent callers get increasing numbers in queue
    /// order, and an error consumes no number. Order holds on one path only (see module docs).
    fn stream_send(
        &self,
        to: EndpointId,
        stream: StreamId,
        payload: Bytes,
    ) -> Result<u64, TransportError>;
    /// The next event, if one is ready.
    fn try_next_event(&self) -> Option<Event>;
    /// Events waiting for the application (control and data).
    fn queued_events(&self) -> usize;
    /// What the failure detector knows of `peer`.
    fn peer_status(&self, peer: EndpointId) -> Option<PeerStatus>;
    /// The protocol version the link to `peer` on `path` speaks (the lower of the two sides'),
    /// if that link is up.
    fn link_version(&self, peer: EndpointId, path: Path) -> Option<u16>;
}
