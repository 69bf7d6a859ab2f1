//! Fuzzes the frame decoder with proptest: arbitrary bytes never panic and never make it buffer
//! past its bound, and every valid frame survives any split into pushes. Case counts follow
//! PROPTEST_CASES, so a long run is `PROPTEST_CASES=1000000 cargo test --release --test frame_fuzz`.

use bytes::{Bytes, BytesMut};
use duplex_transport::wire::{Frame, FrameDecoder, Hello, LENGTH_PREFIX_BYTES, StreamId};
use duplex_transport::{EndpointId, Path};
use proptest::prelude::*;

const MAX_FRAME_BYTES: usize = 4096;

fn arb_frame() -> impl Strategy<Value = Frame> {
    let payload = proptest::collection::vec(any::<u8>(), 0..512).prop_map(Bytes::from);
    prop_oneof![
        (
            any::<u16>(),
            any::<u16>(),
            any::<u16>(),
            any::<bool>(),
            any::<u64>()
        )
            .prop_map(|(version, node, cpu, f, incarnation)| {
                Frame::Hello(Hello {
                    version,
                    from: EndpointId::new(node, cpu),
                    path: if f { Path::Failsafe } else { Path::Main },
                    incarnation,
                })
            }),
        Just(Frame::KeepAlive),
        payload
            .clone()
            .prop_map(|payload| Frame::Message { payload }),
        (any::<u64>(), any::<u32>(), payload.clone()).prop_map(|(id, timeout_ms, payload)| {
            Frame::Request {
                id,
                timeout_ms,
                payload,
            }
        }),
        (any::<u64>(), payload.clone()).prop_map(|(id, payload)| Frame::Response { id, payload }),
        (any::<u32>(), any::<u64>(), payload).prop_map(|(s, seq, payload)| Frame::Stream {
            stream: StreamId(s),
            seq,
            payload
        }),
    ]
}

/// Bytes that look like frames: small length prefixes, a kind byte (known or not) and a body of
/// usually the announced length, so the fuzz reaches every kind's body decoder and not only the
/// length check that uniformly random prefixes (almost always huge) stop at.
fn framed_noise() -> impl Strategy<Value = Vec<u8>> {
    let piece = (
        0u32..48,
        0u8..9,
        proptest::collection::vec(any::<u8>(), 0..64),
        any::<bool>(),
    )
        .prop_map(|(len, kind, body, exact)| {
            let mut out = len.to_le_bytes().to_vec();
            out.push(kind);
            let want = (len as usize).saturating_sub(1);
            let take = if exact {
                want.min(body.len())
            } else {
                body.len()
            };
            out.extend_from_slice(&body[..take]);
            out
        });
    proptest::collection::vec(piece, 0..64).prop_map(|pieces| pieces.concat())
}

fn arbitrary_or_framed() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..8192),
        framed_noise(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_and_stay_bounded(
        bytes in arbitrary_or_framed(),
        chunk in 1usize..700,
    ) {
        let mut dec = FrameDecoder::new(MAX_FRAME_BYTES);
        let mut frames = 0usize;
        'feed: for piece in bytes.chunks(chunk) {
            dec.push(piece);
            loop {
                match dec.next_frame() {
                    Ok(Some(_)) => frames += 1,
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
            prop_assert!(dec.buffered_bytes() <= LENGTH_PREFIX_BYTES + MAX_FRAME_BYTES + chunk);
        }
        prop_assert!(frames <= bytes.len() / (LENGTH_PREFIX_BYTES + 1));
    }

    #[test]
    fn valid_frames_roundtrip_across_any_split(
        frames in proptest::collection::vec(arb_frame(), 1..16),
        chunk in 1usize..300,
    ) {
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        let mut dec = FrameDecoder::new(MAX_FRAME_BYTES);
        let mut out = Vec::new();
        for piece in wire.chunks(chunk) {
            dec.push(piece);
            while let Some(f) = dec.next_frame().map_err(|e| TestCaseError::fail(e.to_string()))? {
                out.push(f);
            }
        }
        prop_assert_eq!(out, frames);
        prop_assert_eq!(dec.buffered_bytes(), 0);
    }

    #[test]
    fn corrupting_one_byte_never_panics(
        frame in arb_frame(),
        at in any::<prop::sample::Index>(),
        value in any::<u8>(),
    ) {
        let mut wire = BytesMut::new();
        frame.encode(&mut wire);
        let i = at.index(wire.len());
        wire[i] = value;
        let mut dec = FrameDecoder::new(MAX_FRAME_BYTES);
        dec.push(&wire);
        let _ = dec.next_frame();
    }
}
