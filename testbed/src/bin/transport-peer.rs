//! A Duplex transport endpoint in its own process, for the transport tests and benchmark.
//!
//! It answers every request with the request's payload, acknowledges every one-way message with
//! an 8-byte message, and echoes every stream frame back on the same stream. It prints its
//! addresses as the first line of stdout (JSON), then one line per peer event, and obeys fault
//! commands on stdin: `partition|heal N.C main|failsafe|all`, `delay N.C MS`, `drop N.C P`,
//! `peer N.C MAIN [FAILSAFE]`. Only endpoints in its cluster list are accepted: `--peer
//! N.C=MAIN[,FAILSAFE]` at start, or the `peer` command.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use duplex_transport::certs::NodeCredentials;
use duplex_transport::{
    DetectorConfig, EndpointId, Event, Path, PeerAddrs, QuicConfig, QuicTransport, Transport,
};
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    node: u16,
    #[arg(long, default_value_t = 0)]
    cpu: u16,
    #[arg(long)]
    certs: PathBuf,
    #[arg(long, default_value_t = 300)]
    detection_time_ms: u64,
    /// The main path's address (a restarted peer passes its predecessor's).
    #[arg(long, default_value = "127.0.0.1:0")]
    main_bind: std::net::SocketAddr,
    /// Also listen on a failsafe path.
    #[arg(long)]
    failsafe: bool,
    /// Announce this protocol version instead of the build's own.
    #[arg(long)]
    protocol_version: Option<u16>,
    /// A member of the cluster list: `N.C=MAIN[,FAILSAFE]` (repeatable).
    #[arg(long = "peer")]
    peers: Vec<String>,
}

/// `N.C=MAIN[,FAILSAFE]` into an endpoint and its addresses.
fn parse_member(s: &str) -> Result<(EndpointId, PeerAddrs)> {
    let (id, addrs) = s.split_once('=').context("a peer is N.C=MAIN[,FAILSAFE]")?;
    let (main, failsafe) = match addrs.split_once(',') {
        Some((main, failsafe)) => (main, Some(failsafe.parse::<SocketAddr>()?)),
        None => (addrs, None),
    };
    Ok((
        parse_id(id)?,
        PeerAddrs {
            main: main.parse()?,
            failsafe,
        },
    ))
}

fn parse_id(s: &str) -> Result<EndpointId> {
    let (n, c) = s.split_once('.').context("endpoint id is NODE.CPU")?;
    Ok(EndpointId::new(n.parse()?, c.parse()?))
}

fn parse_paths(s: Option<&str>) -> Result<Vec<Path>> {
    Ok(match s {
        Some("main") => vec![Path::Main],
        Some("failsafe") => vec![Path::Failsafe],
        Some("all") | None => Path::ALL.to_vec(),
        Some(other) => bail!("unknown path {other}"),
    })
}

fn command(t: &QuicTransport, line: &str) -> Result<()> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["partition", id, rest @ ..] => t
            .faults()
            .partition(parse_id(id)?, &parse_paths(rest.first().copied())?),
        ["heal", id, rest @ ..] => t
            .faults()
            .heal(parse_id(id)?, &parse_paths(rest.first().copied())?),
        ["delay", id, ms] => t.faults().set_delay_ms(parse_id(id)?, ms.parse()?),
        ["drop", id, p] => t
            .faults()
            .set_drop_probability(parse_id(id)?, p.parse()?, 1),
        ["peer", id, main, rest @ ..] => {
            let failsafe = rest.first().map(|a| a.parse::<SocketAddr>()).transpose()?;
            t.add_peer(
                parse_id(id)?,
                PeerAddrs {
                    main: main.parse()?,
                    failsafe,
                },
            );
        }
        [] => {}
        _ => bail!("unknown command {line:?}"),
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let creds = NodeCredentials::load(&args.certs, args.node)?;
    let local = EndpointId::new(args.node, args.cpu);
    let mut config = QuicConfig::new(local, args.main_bind, creds);
    if args.failsafe {
        config.failsafe_bind = Some("127.0.0.1:0".parse()?);
    }
    config.detector = DetectorConfig::with_detection_time_ms(args.detection_time_ms);
    if let Some(v) = args.protocol_version {
        config.protocol_version = v;
    }
    let t = QuicTransport::bind(config).await?;
    for member in &args.peers {
        let (id, addrs) = parse_member(member)?;
        t.add_peer(id, addrs);
    }
    let addrs = t.local_addrs()?;
    let mut out = std::io::stdout();
    writeln!(
        out,
        "{}",
        serde_json::json!({"main": addrs.main, "failsafe": addrs.failsafe})
    )?;
    out.flush()?;
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = stdin.next_line() => match line? {
                Some(line) => if let Err(e) = command(&t, &line) { eprintln!("transport-peer: {e:#}") },
                None => return Ok(()),
            },
            event = t.next_event() => match event {
                Some(Event::Request { from, id, payload, .. }) => { let _ = t.respond(from, id, payload); }
                Some(Event::Message { from, payload, .. }) => {
                    let ack = Bytes::copy_from_slice(&payload[..payload.len().min(8)]);
                    let _ = t.send(from, ack);
                }
                Some(Event::Stream { from, stream, payload, .. }) => { let _ = t.stream_send(from, stream, payload); }
                Some(Event::Peer(e)) => {
                    writeln!(out, "{}", serde_json::json!({"event": format!("{e:?}")}))?;
                    out.flush()?;
                }
                Some(Event::LocalStall { stalled_ms }) => {
                    writeln!(out, "{}", serde_json::json!({"local_stall_ms": stalled_ms}))?;
                    out.flush()?;
                }
                Some(_) => {}
                None => return Ok(()),
            },
        }
    }
}
