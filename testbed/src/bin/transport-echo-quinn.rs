//! The benchmark's baseline: bare quinn with the cluster's mutual TLS and nothing of Duplex on
//! top (no frames, no detector). Runs on a current-thread runtime like `transport-peer`.
//!
//! Each connection opens one bidirectional stream whose first 9 bytes say what to do with the
//! rest: mode (0 = echo every message, 1 = answer every message with 8 bytes) and message size
//! (u64 LE). That header is sent once per stream, never per message. The first line of stdout
//! is the listening address. It exits when its stdin closes (as `transport-peer` does), so a
//! benchmark that dies or is aborted never leaves an echo server behind.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use duplex_transport::certs::{NodeCredentials, QuicTiming, quinn_configs};
use tokio::io::AsyncReadExt;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    node: u16,
    #[arg(long)]
    certs: PathBuf,
    #[arg(long, default_value_t = 1200)]
    idle_timeout_ms: u64,
    #[arg(long, default_value_t = 50)]
    keep_alive_interval_ms: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let creds = NodeCredentials::load(&args.certs, args.node)?;
    let timing = QuicTiming {
        idle_timeout_ms: args.idle_timeout_ms,
        keep_alive_interval_ms: Some(args.keep_alive_interval_ms),
    };
    let (server_config, _) = quinn_configs(&creds, timing)?;
    let endpoint = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse()?)?;
    let mut out = std::io::stdout();
    writeln!(
        out,
        "{}",
        serde_json::json!({ "main": endpoint.local_addr()? })
    )?;
    out.flush()?;
    let accept = async {
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                if let Err(e) = serve(incoming).await {
                    eprintln!("transport-echo-quinn: connection ended: {e:#}");
                }
            });
        }
    };
    let parent_gone = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 256];
        while stdin.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    };
    tokio::select! {
        _ = accept => {}
        _ = parent_gone => {}
    }
    Ok(())
}

async fn serve(incoming: quinn::Incoming) -> Result<()> {
    let conn = incoming.await?;
    loop {
        let (mut send, mut recv) = conn.accept_bi().await?;
        tokio::spawn(async move {
            let served: Result<()> = async {
                let mut header = [0u8; 9];
                recv.read_exact(&mut header).await?;
                let mut size = [0u8; 8];
                size.copy_from_slice(&header[1..]);
                let size_bytes = u64::from_le_bytes(size).min(16 << 20) as usize;
                let mut buf = vec![0u8; size_bytes];
                loop {
                    recv.read_exact(&mut buf).await?;
                    if header[0] == 0 {
                        send.write_all(&buf).await?;
                    } else {
                        send.write_all(&buf[..8.min(size_bytes)]).await?;
                    }
                }
            }
            .await;
            if let Err(e) = served {
                eprintln!("transport-echo-quinn: stream ended: {e:#}");
            }
        });
    }
}
