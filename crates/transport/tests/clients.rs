//! Clients on the QUIC transport, on loopback: a client endpoint `0.k` holds a client
//! certificate (`client.duplex`), a CPU with `accept_clients` takes it without listing it first,
//! and the acceptor binds every hello's claim to the certificate's identity: a client cannot
//! claim a CPU, a CPU (node certificate) cannot claim a client, a peer without a certificate
//! does not get past TLS, and clients beyond `max_clients` are refused. Every wait is bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use duplex_transport::certs::{ALPN, Credentials, QuicTiming, node_server_name, quinn_configs};
use duplex_transport::quic::close_code;
use duplex_transport::wire::{Frame, FrameDecoder, Hello};
use duplex_transport::{EndpointId, Event, Path, PeerEvent, QuicTransport, Transport};
use tokio::sync::mpsc;

mod common;
use common::{certs_dir, credentials, encode, endpoint, nowhere, read_frame};

/// The CPU under test.
const CPU: EndpointId = EndpointId::new(1, 0);
/// Another CPU, in the cluster list of `CPU`.
const OTHER_CPU: EndpointId = EndpointId::new(2, 0);

/// How long any one thing may take before a test fails.
const WAIT: Duration = Duration::from_secs(10);

/// Runs `t`'s application: answers every request with its payload prefixed by `tag`, and sends
/// every peer event to the returned channel.
fn serve(t: QuicTransport, tag: &'static [u8]) -> mpsc::UnboundedReceiver<PeerEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(event) = t.next_event().await {
            match event {
                Event::Request {
                    from, id, payload, ..
                } => {
                    let answer = [tag, &payload[..]].concat();
                    let _ = t.respond(from, id, Bytes::from(answer));
                }
                Event::Peer(e) => {
                    let _ = tx.send(e);
                }
                _ => {}
            }
        }
    });
    rx
}

/// The next peer event matching `want`, within `WAIT`.
async fn peer_event(
    events: &mut mpsc::UnboundedReceiver<PeerEvent>,
    what: &str,
    mut want: impl FnMut(&PeerEvent) -> bool,
) -> PeerEvent {
    let found = tokio::time::timeout(WAIT, async {
        while let Some(e) = events.recv().await {
            if want(&e) {
                return Some(e);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(e)) => e,
        Ok(None) => panic!("{what}: the application's event loop ended"),
        Err(_) => panic!("{what}: not within {WAIT:?}"),
    }
}

/// Polls `done` until it holds, at most `WAIT`.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A CPU endpoint that accepts clients, with at most `max_clients` of them.
async fn cpu(certs: &std::path::Path, max_clients: usize) -> QuicTransport {
    endpoint(certs, CPU, |c| {
        c.accept_clients = true;
        c.max_clients = max_clients;
    })
    .await
}

/// A client endpoint `0.k` that dials `cpu`.
async fn client(certs: &std::path::Path, k: u16, cpu: &QuicTransport) -> QuicTransport {
    let c = endpoint(certs, EndpointId::new(0, k), |_| {}).await;
    c.add_peer(CPU, cpu.local_addrs().expect("addrs"));
    c
}

/// A raw quinn connection to `server` (which must be `CPU` or `OTHER_CPU`'s node) presenting
/// `credentials`' certificate, or none.
async fn raw_connect(
    credentials: Option<&Credentials>,
    trust: &Credentials,
    server: SocketAddr,
    server_node: u16,
) -> (
    quinn::Endpoint,
    Result<quinn::Connection, quinn::ConnectionError>,
) {
    let timing = QuicTiming {
        idle_timeout_ms: 5000,
        keep_alive_interval_ms: None,
    };
    let client_config = match credentials {
        Some(creds) => quinn_configs(creds, timing).expect("client config").1,
        None => {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut roots = rustls::RootCertStore::empty();
            roots.add(trust.ca.clone()).expect("CA as root");
            let mut tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3")
                .with_root_certificates(roots)
                .with_no_client_auth();
            tls.alpn_protocols = vec![ALPN.to_vec()];
            let crypto =
                quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS config");
            quinn::ClientConfig::new(Arc::new(crypto))
        }
    };
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
    endpoint.set_default_client_config(client_config);
    let connecting = endpoint
        .connect(server, &node_server_name(server_node))
        .expect("connect");
    let conn = tokio::time::timeout(WAIT, connecting)
        .await
        .expect("the TLS handshake ends in time");
    (endpoint, conn)
}

fn hello(from: EndpointId) -> Frame {
    Frame::Hello(Hello {
        version: duplex_transport::PROTOCOL_VERSION,
        from,
        path: Path::Main,
        incarnation: 1,
    })
}

/// Sends a hello claiming `claimed` on a new lane of `conn` and returns how the connection was
/// closed: (close code, reason). Panics if it is answered instead.
async fn refused_claim(conn: &quinn::Connection, claimed: EndpointId) -> (u32, String) {
    let (mut send, _recv) = conn.open_bi().await.expect("lane");
    send.write_all(&encode(&[hello(claimed)]))
        .await
        .expect("write hello");
    let closed = tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("the claim is refused in time");
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let code = u32::try_from(c.error_code.into_inner()).expect("a close code");
            let reason = String::from_utf8_lossy(&c.reason).into_owned();
            println!("claim of {claimed} closed: code {code}, reason {reason:?}");
            (code, reason)
        }
        other => panic!("claim of {claimed}: closed by {other}, not refused by the acceptor"),
    }
}

/// Sends a hello claiming `claimed` on both lanes of `conn`, as a dialer does, and returns the
/// acceptor's answer on the control lane.
async fn answered_claim(conn: &quinn::Connection, claimed: EndpointId) -> Frame {
    let (mut send, mut recv) = conn.open_bi().await.expect("control lane");
    send.write_all(&encode(&[hello(claimed)]))
        .await
        .expect("write hello");
    let mut decoder = FrameDecoder::new(1 << 20);
    read_frame(&mut recv, &mut decoder).await
}

#[tokio::test]
async fn a_client_with_a_client_certificate_talks_to_a_cpu_that_never_listed_it() {
    let certs = certs_dir();
    let cpu = cpu(certs.path(), 16).await;
    let mut cpu_events = serve(cpu.clone(), b"cpu:");
    let client_id = EndpointId::new(0, 5);
    let client = client(certs.path(), 5, &cpu).await;
    let mut client_events = serve(client.clone(), b"client:");

    let up = peer_event(
        &mut cpu_events,
        "the client up at the CPU",
        |e| matches!(e, PeerEvent::Up { peer, .. } if *peer == client_id),
    )
    .await;
    assert_eq!(up.incarnation(), client.incarnation());
    peer_event(&mut client_events, "the CPU up at the client", |e| {
        matches!(e, PeerEvent::Up { peer: CPU, .. })
    })
    .await;

    // Client to CPU and CPU to client, each over the one connection the client dialled.
    let answer = client
        .call(CPU, Bytes::from_static(b"ping"), WAIT)
        .await
        .expect("the client's call");
    assert_eq!(&answer[..], b"cpu:ping");
    let answer = cpu
        .call(client_id, Bytes::from_static(b"push"), WAIT)
        .await
        .expect("the CPU's call to the client");
    assert_eq!(&answer[..], b"client:push");
    cpu.send(client_id, Bytes::from_static(b"one way"))
        .expect("a message to the client");
    assert!(
        cpu.link_version(client_id, Path::Main).is_some(),
        "a link to the client"
    );

    // The client leaves: the CPU reports it down and then forgets it.
    client.close();
    peer_event(
        &mut cpu_events,
        "the client down at the CPU",
        |e| matches!(e, PeerEvent::Down { peer, .. } if *peer == client_id),
    )
    .await;
    eventually("the CPU forgets the client", || {
        cpu.peer_status(client_id).is_none()
    })
    .await;
    assert!(
        cpu.send(client_id, Bytes::from_static(b"gone")).is_err(),
        "a forgotten client is not a peer"
    );
}

#[tokio::test]
async fn a_client_without_a_certificate_fails_the_tls_handshake() {
    let certs = certs_dir();
    let cpu = cpu(certs.path(), 16).await;
    let mut cpu_events = serve(cpu.clone(), b"cpu:");
    let server = cpu.local_addrs().expect("addrs").main;
    let trust = credentials(certs.path(), CPU);

    let (_endpoint, connected) = raw_connect(None, &trust, server, CPU.node).await;
    // TLS 1.3: the client may finish its side before the server has checked for a
    // certificate; either way the connection ends, closed by the server's TLS alert.
    let error = match connected {
        Err(e) => e,
        Ok(conn) => tokio::time::timeout(WAIT, conn.closed())
            .await
            .expect("the server closes the connection"),
    };
    println!("client without a certificate: {error}");
    match &error {
        quinn::ConnectionError::ConnectionClosed(close) => {
            // A TLS alert is carried as crypto error 0x100 + alert; 116 is
            // `certificate_required`.
            assert_eq!(
                u64::from(close.error_code),
                0x100 + 116,
                "certificate_required: {error}"
            );
            assert!(
                error.to_string().contains("certificate"),
                "the error says a certificate is missing: {error}"
            );
        }
        other => panic!("expected the server's TLS alert, got {other}"),
    }
    assert_eq!(
        cpu.peer_status(EndpointId::new(0, 0)),
        None,
        "nothing is added for a peer that never authenticated"
    );

    // The CPU keeps serving: a client with a certificate comes up.
    let client = client(certs.path(), 1, &cpu).await;
    peer_event(
        &mut cpu_events,
        "a certified client up",
        |e| matches!(e, PeerEvent::Up { peer, .. } if *peer == client.local_id()),
    )
    .await;
}

#[tokio::test]
async fn a_client_certificate_cannot_claim_a_cpu_endpoint() {
    let certs = certs_dir();
    let cpu = cpu(certs.path(), 16).await;
    let other = endpoint(certs.path(), OTHER_CPU, |_| {}).await;
    let _other_events = serve(other.clone(), b"other:");
    let mut cpu_events = serve(cpu.clone(), b"cpu:");
    cpu.add_peer(OTHER_CPU, other.local_addrs().expect("addrs"));
    other.add_peer(CPU, cpu.local_addrs().expect("addrs"));
    peer_event(&mut cpu_events, "the other CPU up", |e| {
        matches!(
            e,
            PeerEvent::Up {
                peer: OTHER_CPU,
                ..
            }
        )
    })
    .await;
    let server = other.local_addrs().expect("addrs").main;
    let client_creds = credentials(certs.path(), EndpointId::new(0, 1));

    // To the other CPU, claiming to be the CPU it is linked with.
    let (_endpoint, conn) = raw_connect(Some(&client_creds), &client_creds, server, 2).await;
    let conn = conn.expect("TLS accepts a client certificate");
    let (code, reason) = refused_claim(&conn, CPU).await;
    assert_eq!(code, close_code::HANDSHAKE_FAILED);
    assert!(
        reason.contains("claims endpoint 1.0")
            && reason.contains("not valid for node-1.duplex")
            && reason.contains("client.duplex"),
        "the reason names the claim and what the certificate is valid for: {reason}"
    );

    // The real link between the CPUs stays.
    let answer = cpu
        .call(OTHER_CPU, Bytes::from_static(b"still"), WAIT)
        .await
        .expect("the CPUs still talk");
    assert_eq!(&answer[..], b"other:still");
    assert!(
        cpu_events.try_recv().is_err(),
        "no peer event at the CPU from the impostor"
    );
}

#[tokio::test]
async fn a_node_certificate_cannot_claim_a_client_endpoint() {
    let certs = certs_dir();
    let cpu = cpu(certs.path(), 16).await;
    let _cpu_events = serve(cpu.clone(), b"cpu:");
    let server = cpu.local_addrs().expect("addrs").main;
    let node_3 = credentials(certs.path(), EndpointId::new(3, 0));
    let impostor = EndpointId::new(0, 5);

    // Unlisted, taken as a client would be.
    let (_endpoint, conn) = raw_connect(Some(&node_3), &node_3, server, CPU.node).await;
    let (code, reason) = refused_claim(&conn.expect("TLS"), impostor).await;
    assert_eq!(code, close_code::HANDSHAKE_FAILED);
    assert!(
        reason.contains("claims endpoint 0.5")
            && reason.contains("needs a client certificate (client.duplex)")
            && reason.contains("valid for node-3.duplex"),
        "{reason}"
    );
    assert_eq!(
        cpu.peer_status(impostor),
        None,
        "the impostor was not added"
    );

    // Listed (as a testbed CPU lists its clients): refused all the same.
    cpu.add_peer(impostor, nowhere());
    let (_endpoint, conn) = raw_connect(Some(&node_3), &node_3, server, CPU.node).await;
    let (code, reason) = refused_claim(&conn.expect("TLS"), impostor).await;
    assert_eq!(code, close_code::HANDSHAKE_FAILED);
    assert!(reason.contains("claims endpoint 0.5"), "{reason}");

    // The listed client endpoint with the client certificate is answered.
    let client_creds = credentials(certs.path(), impostor);
    let (_endpoint, conn) = raw_connect(Some(&client_creds), &node_3, server, CPU.node).await;
    let answer = answered_claim(&conn.expect("TLS"), impostor).await;
    assert!(
        matches!(answer, Frame::Hello(Hello { from, .. }) if from == CPU),
        "{answer:?}"
    );
}

#[tokio::test]
async fn an_endpoint_that_does_not_accept_clients_refuses_unlisted_ones() {
    let certs = certs_dir();
    let cpu = endpoint(certs.path(), CPU, |_| {}).await;
    let server = cpu.local_addrs().expect("addrs").main;
    let client_creds = credentials(certs.path(), EndpointId::new(0, 1));
    let (_endpoint, conn) = raw_connect(Some(&client_creds), &client_creds, server, 1).await;
    let (code, reason) = refused_claim(&conn.expect("TLS"), EndpointId::new(0, 1)).await;
    assert_eq!(code, close_code::HANDSHAKE_FAILED);
    assert!(
        reason.contains("0.1 is not in the cluster list of 1.0"),
        "{reason}"
    );
}

#[tokio::test]
async fn clients_beyond_max_clients_are_refused_until_one_leaves() {
    let certs = certs_dir();
    let cpu = cpu(certs.path(), 2).await;
    let mut cpu_events = serve(cpu.clone(), b"cpu:");
    let first = client(certs.path(), 1, &cpu).await;
    let second = client(certs.path(), 2, &cpu).await;
    for c in [&first, &second] {
        let id = c.local_id();
        peer_event(
            &mut cpu_events,
            "a client up",
            |e| matches!(e, PeerEvent::Up { peer, .. } if *peer == id),
        )
        .await;
    }

    let third = EndpointId::new(0, 3);
    let server = cpu.local_addrs().expect("addrs").main;
    let client_creds = credentials(certs.path(), third);
    let (_endpoint, conn) = raw_connect(Some(&client_creds), &client_creds, server, 1).await;
    let (code, reason) = refused_claim(&conn.expect("TLS"), third).await;
    assert_eq!(code, close_code::HANDSHAKE_FAILED);
    assert!(
        reason.contains("0.3 refused by 1.0") && reason.contains("already serves 2 clients"),
        "{reason}"
    );
    assert_eq!(cpu.peer_status(third), None);

    // The first client leaves: once the CPU has it down and forgotten, a slot is free.
    first.close();
    peer_event(
        &mut cpu_events,
        "the first client down",
        |e| matches!(e, PeerEvent::Down { peer, .. } if *peer == EndpointId::new(0, 1)),
    )
    .await;
    eventually("the first client forgotten", || {
        cpu.peer_status(EndpointId::new(0, 1)).is_none()
    })
    .await;
    let third_client = client(certs.path(), 3, &cpu).await;
    let mut third_events = serve(third_client.clone(), b"third:");
    peer_event(
        &mut cpu_events,
        "the third client up",
        |e| matches!(e, PeerEvent::Up { peer, .. } if *peer == third),
    )
    .await;
    peer_event(&mut third_events, "the CPU up at the third client", |e| {
        matches!(e, PeerEvent::Up { peer: CPU, .. })
    })
    .await;
    let answer = third_client
        .call(CPU, Bytes::from_static(b"in"), WAIT)
        .await
        .expect("the third client's call");
    assert_eq!(&answer[..], b"cpu:in");
    drop(second);
}

#[tokio::test]
async fn an_endpoint_refuses_credentials_of_another_identity() {
    let certs = certs_dir();
    let node_1 = credentials(certs.path(), CPU);
    let client_creds = credentials(certs.path(), EndpointId::new(0, 1));
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    for (local, creds) in [(EndpointId::new(0, 1), node_1), (CPU, client_creds)] {
        let config = duplex_transport::QuicConfig::new(local, addr, creds);
        match QuicTransport::bind(config).await {
            Err(e @ duplex_transport::QuicError::WrongIdentity { .. }) => println!("{e}"),
            Err(other) => panic!("{local}: {other}"),
            Ok(_) => panic!("{local} bound with the credentials of another identity"),
        }
    }
}
