//! The Duplex cluster transport: how every CPU talks to every other, and how each learns that
//! another is gone.
//!
//! - `wire`: the frame layout and protocol versions, shared by everything below.
//! - `detector`: failure detection as a sans-IO state machine (keep-alives, main/failsafe paths).
//! - `transport`: the `Transport` trait, its events and errors.
//! - `core`: the sans-IO core both implementations share (limits, requests, streams, paths,
//!   hellos, the event queue), so the twin cannot drift from the real thing.
//! - `sim`: the simulated twin, a seeded in-memory network with a virtual clock.
//! - `quic`: the real implementation on quinn with mutual TLS, reconnects and fault injection.
//! - `certs`: the cluster CA, node and client certificates, and who may claim which endpoint.

pub mod addr;
pub mod certs;
pub mod core;
pub mod detector;
pub mod quic;
pub mod sim;
pub mod transport;
pub mod wire;

pub use addr::{CLIENT_NODE, EndpointId, Path, PeerAddrs};
pub use core::Limits;
pub use detector::{DetectorConfig, FailureDetector, PeerEvent, PeerStatus};
pub use quic::{FaultInjector, QuicConfig, QuicError, QuicTransport};
pub use sim::{SimConfig, SimConfigError, SimNetwork, SimTransport};
pub use transport::{Event, RequestId, Transport, TransportError};
pub use wire::{Frame, FrameDecoder, FrameError, Hello, Lane, PROTOCOL_VERSION, StreamId};
