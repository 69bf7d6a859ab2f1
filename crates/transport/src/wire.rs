//! The wire format: one module owns every byte layout, so the QUIC transport, the simulated twin
//! and the fuzz tests all agree on it.
//!
//! A frame is `body_len: u32 LE` followed by `body_len` bytes of body; the body starts with a
//! kind byte and a kind-specific header, and ends with the payload. The length comes first so
//! a receiver can refuse an oversized frame before buffering it. QUIC already authenticates and
//! checksums every packet, so frames carry no checksum of their own.
//!
//! | kind | name       | header after the kind byte                                          |
//! |------|------------|---------------------------------------------------------------------|
//! | 0x01 | hello      | magic `DPLX`, version u16, node u16, cpu u16, path u8, incarnation u64 |
//! | 0x02 | keep-alive | none                                                                |
//! | 0x03 | message    | none; payload follows                                               |
//! | 0x04 | request    | request id u64, timeout_ms u32; payload follows                     |
//! | 0x05 | response   | request id u64; payload follows                                     |
//! | 0x06 | stream     | stream id u32, sequence u64; payload follows                        |
//!
//! All integers are little-endian. Versions: each side says its version in `hello`; two
//! versions may talk when they differ by at most one, and then both speak the lower one.
//!
//! Lanes: every QUIC connection carries two streams, each starting with a hello. The control
//! lane carries keep-alives and messages, requests and responses of at most
//! `CONTROL_PAYLOAD_MAX_BYTES`; the bulk lane carries every ordered-stream frame and every larger
//! payload, so a large frame never delays a keep-alive or a small request (`Frame::lane`).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::addr::{EndpointId, Path};

/// The protocol version this build speaks. Version 2 added the incarnation to the hello and the
/// bulk lane; version 1 was never released, so its 11-byte hello is refused as malformed.
pub const PROTOCOL_VERSION: u16 = 2;
/// Bytes of the length prefix in front of every frame body.
pub const LENGTH_PREFIX_BYTES: usize = 4;
/// The largest fixed part of a body: the kind byte and the longest kind header (request, stream).
pub const FRAME_HEADER_MAX_BYTES: usize = 13;
/// Default bound on a user payload: a 16 MiB checkpoint message fits in one frame.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 16 << 20;
/// Default bound on a frame body: the default payload bound plus the largest header.
pub const DEFAULT_MAX_FRAME_BYTES: usize = DEFAULT_MAX_PAYLOAD_BYTES + FRAME_HEADER_MAX_BYTES;
/// Hard upper bound for the configurable frame size.
pub const MAX_FRAME_BYTES_LIMIT: usize = (64 << 20) + FRAME_HEADER_MAX_BYTES;
/// Largest payload carried on the control lane; larger ones and ordered-stream frames go bulk.
pub const CONTROL_PAYLOAD_MAX_BYTES: usize = 64 << 10;
/// Bound on a control-lane frame body, checked by the control lane's decoder.
pub const CONTROL_FRAME_MAX_BYTES: usize = CONTROL_PAYLOAD_MAX_BYTES + FRAME_HEADER_MAX_BYTES;
/// Bytes of a hello body: kind, magic, version, node, cpu, path, incarnation. A lane's hello
/// is read with a decoder bounded to this, so a handshake never buffers more than one hello.
pub const HELLO_BODY_BYTES: usize = 1 + 4 + 2 + 2 + 2 + 1 + 8;
/// Bytes of a whole hello frame, length prefix included.
pub const HELLO_FRAME_BYTES: usize = LENGTH_PREFIX_BYTES + HELLO_BODY_BYTES;

const HELLO_MAGIC: [u8; 4] = *b"DPLX";

const KIND_HELLO: u8 = 0x01;
const KIND_KEEP_ALIVE: u8 = 0x02;
const KIND_MESSAGE: u8 = 0x03;
const KIND_REQUEST: u8 = 0x04;
const KIND_RESPONSE: u8 = 0x05;
const KIND_STREAM: u8 = 0x06;

/// An ordered stream between two endpoints (for example the checkpoint stream of one LSG).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(pub u32);

/// The first frame on every stream, in both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub from: EndpointId,
    pub path: Path,
    /// The sender's boot id: rises at every restart of the process.
    pub incarnation: u64,
}

/// Which stream of a connection a frame travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lane {
    /// Hello, keep-alives, and messages, requests and responses up to
    /// `CONTROL_PAYLOAD_MAX_BYTES`: never behind a large frame.
    Control,
    /// Ordered-stream frames (so one stream keeps its order) and larger payloads.
    Bulk,
}

/// One decoded frame. Payloads are postcard-encoded user messages (see `encode_payload`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    KeepAlive,
    Message {
        payload: Bytes,
    },
    Request {
        id: u64,
        timeout_ms: u32,
        payload: Bytes,
    },
    Response {
        id: u64,
        payload: Bytes,
    },
    Stream {
        stream: StreamId,
        seq: u64,
        payload: Bytes,
    },
}

/// Why a byte sequence is not a valid frame. `offset` counts bytes from the start of the
/// connection's stream, so a log line points at the exact frame.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error(
        "frame at offset {offset}: body of {size_bytes} bytes exceeds the maximum of {max_bytes}"
    )]
    Oversized {
        offset: u64,
        size_bytes: usize,
        max_bytes: usize,
    },
    #[error("frame at offset {offset}: empty body, expected at least the kind byte")]
    Empty { offset: u64 },
    #[error("frame at offset {offset}: unknown message kind 0x{found:02x}")]
    UnknownKind { offset: u64, found: u8 },
    #[error(
        "frame at offset {offset} (kind 0x{kind:02x}): body of {found} bytes, expected {expected}"
    )]
    BadLength {
        offset: u64,
        kind: u8,
        expected: String,
        found: usize,
    },
    #[error("hello at offset {offset}: magic {found:?}, expected {HELLO_MAGIC:?}")]
    BadMagic { offset: u64, found: [u8; 4] },
    #[error("hello at offset {offset}: unknown path byte {found}")]
    BadPath { offset: u64, found: u8 },
}

/// Whether a peer speaking `peer` may talk to us, and which version the session then uses.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error(
    "peer speaks protocol version {found}; this endpoint speaks {ours} and accepts {min}..={max}"
)]
pub struct VersionError {
    pub found: u16,
    pub ours: u16,
    pub min: u16,
    pub max: u16,
}

/// The adjacent-version rule of a rolling upgrade: versions `ours - 1 ..= ours + 1` may talk,
/// and the session speaks the lower of the two.
pub fn negotiate_version(ours: u16, peer: u16) -> Result<u16, VersionError> {
    let min = ours.saturating_sub(1).max(1);
    let max = ours.saturating_add(1);
    if peer < min || peer > max {
        return Err(VersionError {
            found: peer,
            ours,
            min,
            max,
        });
    }
    Ok(ours.min(peer))
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Hello(_) => KIND_HELLO,
            Frame::KeepAlive => KIND_KEEP_ALIVE,
            Frame::Message { .. } => KIND_MESSAGE,
            Frame::Request { .. } => KIND_REQUEST,
            Frame::Response { .. } => KIND_RESPONSE,
            Frame::Stream { .. } => KIND_STREAM,
        }
    }

    /// The payload carried by the frame, empty for control frames.
    pub fn payload(&self) -> &[u8] {
        match self {
            Frame::Hello(_) | Frame::KeepAlive => &[],
            Frame::Message { payload }
            | Frame::Request { payload, .. }
            | Frame::Response { payload, .. }
            | Frame::Stream { payload, .. } => payload,
        }
    }

    /// The payload as shared bytes (no copy), empty for control frames.
    pub fn into_payload(self) -> Bytes {
        match self {
            Frame::Hello(_) | Frame::KeepAlive => Bytes::new(),
            Frame::Message { payload }
            | Frame::Request { payload, .. }
            | Frame::Response { payload, .. }
            | Frame::Stream { payload, .. } => payload,
        }
    }

    /// The lane this frame travels on.
    pub fn lane(&self) -> Lane {
        match self {
            Frame::Stream { .. } => Lane::Bulk,
            other if other.payload().len() > CONTROL_PAYLOAD_MAX_BYTES => Lane::Bulk,
            _ => Lane::Control,
        }
    }

    /// Bytes of the body's fixed part: the kind byte and the kind's header.
    fn header_bytes(&self) -> usize {
        1 + match self {
            Frame::Hello(_) => HELLO_BODY_BYTES - 1,
            Frame::KeepAlive | Frame::Message { .. } => 0,
            Frame::Request { .. } => 8 + 4,
            Frame::Response { .. } => 8,
            Frame::Stream { .. } => 4 + 8,
        }
    }

    /// Bytes this frame takes on the wire, length prefix included.
    pub fn encoded_len(&self) -> usize {
        LENGTH_PREFIX_BYTES + self.header_bytes() + self.payload().len()
    }

    /// Writes the length prefix and the body's fixed part, leaving the payload to the caller
    /// (so a sender can hand the payload to the socket without copying it).
    pub fn encode_header(&self, out: &mut BytesMut) {
        let body_len = self.header_bytes() + self.payload().len();
        out.reserve(LENGTH_PREFIX_BYTES + self.header_bytes());
        out.put_u32_le(u32::try_from(body_len).unwrap_or(u32::MAX));
        out.put_u8(self.kind());
        match self {
            Frame::Hello(h) => {
                out.put_slice(&HELLO_MAGIC);
                out.put_u16_le(h.version);
                out.put_u16_le(h.from.node);
                out.put_u16_le(h.from.cpu);
                out.put_u8(h.path.to_byte());
                out.put_u64_le(h.incarnation);
            }
            Frame::KeepAlive | Frame::Message { .. } => {}
            Frame::Request { id, timeout_ms, .. } => {
                out.put_u64_le(*id);
                out.put_u32_le(*timeout_ms);
            }
            Frame::Response { id, .. } => out.put_u64_le(*id),
            Frame::Stream { stream, seq, .. } => {
                out.put_u32_le(stream.0);
                out.put_u64_le(*seq);
            }
        }
    }

    /// Appends the whole frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        self.encode_header(out);
        out.put_slice(self.payload());
    }

    /// Decodes one complete body (the bytes after the length prefix).
    fn decode_body(offset: u64, mut body: Bytes) -> Result<Frame, FrameError> {
        let total = body.len();
        if total == 0 {
            return Err(FrameError::Empty { offset });
        }
        let kind = body.get_u8();
        let need = |n: usize, body: &Bytes, exact: bool| -> Result<(), FrameError> {
            let ok = if exact {
                body.len() == n
            } else {
                body.len() >= n
            };
            if ok {
                Ok(())
            } else {
                Err(FrameError::BadLength {
                    offset,
                    kind,
                    expected: if exact {
                        format!("{}", n + 1)
                    } else {
                        format!("at least {}", n + 1)
                    },
                    found: total,
                })
            }
        };
        match kind {
            KIND_HELLO => {
                need(HELLO_BODY_BYTES - 1, &body, true)?;
                let mut magic = [0u8; 4];
                body.copy_to_slice(&mut magic);
                if magic != HELLO_MAGIC {
                    return Err(FrameError::BadMagic {
                        offset,
                        found: magic,
                    });
                }
                let version = body.get_u16_le();
                let node = body.get_u16_le();
                let cpu = body.get_u16_le();
                let path_byte = body.get_u8();
                let path = Path::from_byte(path_byte).ok_or(FrameError::BadPath {
                    offset,
                    found: path_byte,
                })?;
                let incarnation = body.get_u64_le();
                Ok(Frame::Hello(Hello {
                    version,
                    from: EndpointId { node, cpu },
                    path,
                    incarnation,
                }))
            }
            KIND_KEEP_ALIVE => {
                need(0, &body, true)?;
                Ok(Frame::KeepAlive)
            }
            KIND_MESSAGE => Ok(Frame::Message { payload: body }),
            KIND_REQUEST => {
                need(12, &body, false)?;
                let id = body.get_u64_le();
                let timeout_ms = body.get_u32_le();
                Ok(Frame::Request {
                    id,
                    timeout_ms,
                    payload: body,
                })
            }
            KIND_RESPONSE => {
                need(8, &body, false)?;
                let id = body.get_u64_le();
                Ok(Frame::Response { id, payload: body })
            }
            KIND_STREAM => {
                need(12, &body, false)?;
                let stream = StreamId(body.get_u32_le());
                let seq = body.get_u64_le();
                Ok(Frame::Stream {
                    stream,
                    seq,
                    payload: body,
                })
            }
            found => Err(FrameError::UnknownKind { offset, found }),
        }
    }
}

/// Incremental decoder for one byte stream: push bytes as they arrive, pull whole frames.
/// It never buffers more than one maximal frame plus what one push adds. Every decoded body is
/// copied into its own allocation, so a queued frame holds exactly its own bytes and never pins
/// the decoder's buffer (memory accounting counts payload bytes).
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_frame_bytes: usize,
    /// Stream offset of `buf[0]`.
    offset: u64,
}

impl FrameDecoder {
    pub fn new(max_frame_bytes: usize) -> Self {
        FrameDecoder {
            buf: BytesMut::new(),
            max_frame_bytes: max_frame_bytes.min(MAX_FRAME_BYTES_LIMIT),
            offset: 0,
        }
    }

    /// Changes the bound on frame bodies for the frames still to come (a lane's decoder reads
    /// the hello bounded to `HELLO_BODY_BYTES`, then the lane's frames with the lane's bound).
    pub fn set_max_frame_bytes(&mut self, max_frame_bytes: usize) {
        self.max_frame_bytes = max_frame_bytes.min(MAX_FRAME_BYTES_LIMIT);
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, `None` if more bytes are needed. After an error the stream is
    /// unusable: the caller closes it.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < LENGTH_PREFIX_BYTES {
            return Ok(None);
        }
        let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
        prefix.copy_from_slice(&self.buf[..LENGTH_PREFIX_BYTES]);
        let body_len = u32::from_le_bytes(prefix) as usize;
        if body_len > self.max_frame_bytes {
            return Err(FrameError::Oversized {
                offset: self.offset,
                size_bytes: body_len,
                max_bytes: self.max_frame_bytes,
            });
        }
        if self.buf.len() < LENGTH_PREFIX_BYTES + body_len {
            // Room for the whole frame at once: a large body is not copied at every doubling.
            self.buf
                .reserve(LENGTH_PREFIX_BYTES + body_len - self.buf.len());
            return Ok(None);
        }
        let frame_offset = self.offset;
        self.buf.advance(LENGTH_PREFIX_BYTES);
        let body = Bytes::copy_from_slice(&self.buf[..body_len]);
        self.buf.advance(body_len);
        self.offset += (LENGTH_PREFIX_BYTES + body_len) as u64;
        Frame::decode_body(frame_offset, body).map(Some)
    }
}

/// Encodes a user message as a frame payload (postcard).
pub fn encode_payload<T: serde::Serialize>(value: &T) -> Result<Bytes, postcard::Error> {
    postcard::to_stdvec(value).map(Bytes::from)
}

/// Decodes a frame payload into a user message (postcard).
pub fn decode_payload<T: serde::de::DeserializeOwned>(
    payload: &[u8],
) -> Result<T, postcard::Error> {
    postcard::from_bytes(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(frame: Frame) {
        let mut out = BytesMut::new();
        frame.encode(&mut out);
        assert_eq!(out.len(), frame.encoded_len());
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
        dec.push(&out);
        assert_eq!(dec.next_frame(), Ok(Some(frame)));
        assert_eq!(dec.next_frame(), Ok(None));
    }

    #[test]
    fn every_kind_roundtrips() {
        roundtrip(Frame::Hello(Hello {
            version: 7,
            from: EndpointId::new(3, 1),
            path: Path::Failsafe,
            incarnation: u64::MAX - 1,
        }));
        roundtrip(Frame::KeepAlive);
        roundtrip(Frame::Message {
            payload: Bytes::from_static(b"abc"),
        });
        roundtrip(Frame::Request {
            id: 9,
            timeout_ms: 250,
            payload: Bytes::new(),
        });
        roundtrip(Frame::Response {
            id: u64::MAX,
            payload: Bytes::from_static(b"x"),
        });
        roundtrip(Frame::Stream {
            stream: StreamId(4),
            seq: 77,
            payload: Bytes::from_static(b"yz"),
        });
    }

    #[test]
    fn hello_layout_is_byte_exact() {
        let mut out = BytesMut::new();
        Frame::Hello(Hello {
            version: 2,
            from: EndpointId::new(2, 1),
            path: Path::Main,
            incarnation: 0x0102,
        })
        .encode(&mut out);
        assert_eq!(
            &out[..],
            &[
                20, 0, 0, 0, 0x01, b'D', b'P', b'L', b'X', 2, 0, 2, 0, 1, 0, 0, 2, 1, 0, 0, 0, 0,
                0, 0
            ]
        );
    }

    #[test]
    fn oversized_frame_is_refused_before_buffering() {
        let mut dec = FrameDecoder::new(16);
        dec.push(&17u32.to_le_bytes());
        assert_eq!(
            dec.next_frame(),
            Err(FrameError::Oversized {
                offset: 0,
                size_bytes: 17,
                max_bytes: 16
            })
        );
    }

    #[test]
    fn unknown_kind_reports_offset() {
        let mut dec = FrameDecoder::new(64);
        let mut out = BytesMut::new();
        Frame::KeepAlive.encode(&mut out);
        out.put_slice(&[1, 0, 0, 0, 0x7f]);
        dec.push(&out);
        assert_eq!(dec.next_frame(), Ok(Some(Frame::KeepAlive)));
        assert_eq!(
            dec.next_frame(),
            Err(FrameError::UnknownKind {
                offset: 5,
                found: 0x7f
            })
        );
    }

    #[test]
    fn short_request_header_is_malformed() {
        let mut dec = FrameDecoder::new(64);
        dec.push(&[3, 0, 0, 0, KIND_REQUEST, 1, 2]);
        assert!(matches!(
            dec.next_frame(),
            Err(FrameError::BadLength {
                offset: 0,
                kind: 4,
                found: 3,
                ..
            })
        ));
    }

    #[test]
    fn large_payloads_and_ordered_streams_go_bulk() {
        let small = Bytes::from(vec![0u8; CONTROL_PAYLOAD_MAX_BYTES]);
        let large = Bytes::from(vec![0u8; CONTROL_PAYLOAD_MAX_BYTES + 1]);
        assert_eq!(Frame::KeepAlive.lane(), Lane::Control);
        assert_eq!(
            Frame::Message {
                payload: small.clone()
            }
            .lane(),
            Lane::Control
        );
        assert_eq!(
            Frame::Message {
                payload: large.clone()
            }
            .lane(),
            Lane::Bulk
        );
        assert_eq!(
            Frame::Response {
                id: 1,
                payload: large
            }
            .lane(),
            Lane::Bulk
        );
        let stream = Frame::Stream {
            stream: StreamId(1),
            seq: 0,
            payload: Bytes::new(),
        };
        assert_eq!(stream.lane(), Lane::Bulk);
    }

    #[test]
    fn adjacent_versions_talk_and_others_are_refused() {
        assert_eq!(negotiate_version(2, 1), Ok(1));
        assert_eq!(negotiate_version(2, 3), Ok(2));
        assert_eq!(negotiate_version(2, 2), Ok(2));
        assert_eq!(negotiate_version(1, 2), Ok(1));
        assert!(negotiate_version(1, 3).is_err());
        assert!(negotiate_version(3, 1).is_err());
        assert!(negotiate_version(1, 0).is_err());
    }
}
