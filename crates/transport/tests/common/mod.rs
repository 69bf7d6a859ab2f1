//! Helpers shared by the QUIC test files: a cluster's certificates, an endpoint on loopback,
//! and raw frames for tests that speak the wire format themselves.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use duplex_transport::certs::{ClientName, Credentials, ensure_client_cert, ensure_cluster_certs};
use duplex_transport::wire::{Frame, FrameDecoder};
use duplex_transport::{DetectorConfig, EndpointId, PeerAddrs, QuicConfig, QuicTransport};

pub const DETECTION_MS: u64 = 300;

/// The client whose certificate `certs_dir` issues; client endpoints `0.k` use it.
pub const CLIENT: &str = "app";

pub fn client_name() -> ClientName {
    ClientName::new(CLIENT).expect("client name")
}

/// A cert directory with nodes 1 to 3 and client `CLIENT`.
pub fn certs_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    ensure_cluster_certs(dir.path(), &[1, 2, 3]).expect("cluster certs");
    ensure_client_cert(dir.path(), &client_name()).expect("client cert");
    dir
}

/// The credentials of endpoint `id`: its node's, or for a client endpoint client `CLIENT`'s.
pub fn credentials(certs: &std::path::Path, id: EndpointId) -> Credentials {
    if id.is_client() {
        Credentials::load_client(certs, &client_name()).expect("client credentials")
    } else {
        Credentials::load_node(certs, id.node).expect("node credentials")
    }
}

pub async fn endpoint(
    certs: &std::path::Path,
    id: EndpointId,
    tweak: impl FnOnce(&mut QuicConfig),
) -> QuicTransport {
    let creds = credentials(certs, id);
    let mut config = QuicConfig::new(id, "127.0.0.1:0".parse().expect("addr"), creds);
    config.detector = DetectorConfig::with_detection_time_ms(DETECTION_MS);
    tweak(&mut config);
    QuicTransport::bind(config).await.expect("bind")
}

/// An address where nothing answers: the cluster list needs one for every peer.
pub fn nowhere() -> PeerAddrs {
    PeerAddrs {
        main: "127.0.0.1:9".parse().expect("addr"),
        failsafe: None,
    }
}

pub fn encode(frames: &[Frame]) -> Bytes {
    let mut out = BytesMut::new();
    for f in frames {
        f.encode(&mut out);
    }
    out.freeze()
}

/// Reads frames from `recv` until one decodes, at most 5 s.
pub async fn read_frame(recv: &mut quinn::RecvStream, decoder: &mut FrameDecoder) -> Frame {
    loop {
        if let Some(frame) = decoder.next_frame().expect("valid frame") {
            return frame;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(5), recv.read_chunk(4096, true))
            .await
            .expect("a frame in time")
            .expect("read")
            .expect("not finished");
        decoder.push(&chunk.bytes);
    }
}
