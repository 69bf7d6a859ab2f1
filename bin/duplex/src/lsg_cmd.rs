//! `duplex lsg …`: create, inspect and crash-drill a log storage group.
//!
//! The drill is the storage layer's acceptance test in a form an operator can run: a child
//! process (`duplex lsg write`) appends records and reports each LSN it was told is durable; the
//! drill SIGKILLs it at a random point, reopens the LSG as the next owner would, and checks that
//! every reported record is there, intact and in order, and that nothing else is.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use duplex_lsg::{LogStorageGroup, LsgConfig, LsgId, Lsn, OpenMode, RecordFlags, RecordType};
use rand::{Rng, SeedableRng};

#[derive(Debug, Subcommand)]
pub enum LsgCommand {
    /// Create an empty LSG in a directory.
    Create {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 1)]
        id: u64,
    },
    /// Print what an LSG holds and verify its whole audit trail, without taking ownership.
    Inspect {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Kill a writer process at random points and check what recovery finds after each kill.
    Drill {
        #[arg(long)]
        dir: PathBuf,
        /// How many times to SIGKILL the writer.
        #[arg(long, default_value_t = 20)]
        kills: u32,
        /// Seed of the kill points; a random one is chosen (and printed) if absent.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// (Drill child) append records forever, printing `durable LSN` after each group flush.
    #[command(hide = true)]
    Write {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        seed: u64,
    },
    /// (Drill child) take ownership, print `owned EPOCH`, hold it until stdin closes.
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        dir: PathBuf,
        /// Block until the current owner lets go instead of failing.
        #[arg(long)]
        wait: bool,
    },
}

/// The configuration of drill LSGs: small segments so a drill crosses many of them.
pub fn drill_config() -> LsgConfig {
    LsgConfig {
        audit_segment_bytes: 4 << 20,
        volume_segment_bytes: 4 << 20,
        max_batch_bytes: 1 << 20,
        max_record_bytes: 64 << 10,
        max_key_bytes: 1 << 10,
        max_value_bytes: 32 << 10,
    }
}

/// The payload the drill writes at `lsn`: its length and bytes follow from the LSN alone, so the
/// checker needs nothing but the LSN to know what must be there.
pub fn drill_payload(lsn: u64) -> Vec<u8> {
    let len = 8 + (lsn.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 52) as usize;
    let mut p = lsn.to_le_bytes().to_vec();
    p.extend((0..len - 8).map(|i| (lsn as usize).wrapping_mul(31).wrapping_add(i) as u8));
    p
}

pub fn run(command: LsgCommand) -> Result<()> {
    match command {
        LsgCommand::Create { dir, id } => {
            let lsg = LogStorageGroup::create(&dir, LsgId(id), drill_config())
                .with_context(|| format!("creating an LSG in {}", dir.display()))?;
            println!(
                "created LSG {} in {} (owner epoch {})",
                lsg.lsg_id(),
                dir.display(),
                lsg.owner_epoch()
            );
            Ok(())
        }
        LsgCommand::Inspect { dir } => inspect(&dir),
        LsgCommand::Drill { dir, kills, seed } => drill(&dir, kills, seed),
        LsgCommand::Write { dir, seed } => write_forever(&dir, seed),
        LsgCommand::Hold { dir, wait } => hold(&dir, wait),
    }
}

fn inspect(dir: &Path) -> Result<()> {
    let lsg = LogStorageGroup::open(dir, drill_config(), OpenMode::ReadOnly)
        .with_context(|| format!("opening {} read-only", dir.display()))?;
    let audit = lsg.audit();
    println!("LSG {} at {}", lsg.lsg_id(), dir.display());
    println!("  owner epoch     {}", lsg.owner_epoch());
    println!("  boot sequence   {}", lsg.boot_sequence());
    println!("  first LSN       {}", audit.first_lsn());
    println!("  next LSN        {}", audit.next_lsn());
    let started = Instant::now();
    let mut records = 0u64;
    let mut bytes = 0u64;
    audit
        .scan(audit.first_lsn(), |v| {
            records += 1;
            bytes += v.encoded_len() as u64;
            std::ops::ControlFlow::Continue(())
        })
        .context("verifying the audit trail")?;
    println!(
        "  audit trail     {records} records, {bytes} bytes, all checksums valid ({:.1} ms)",
        started.elapsed().as_secs_f64() * 1e3
    );
    for name in lsg.volume_names() {
        let v = lsg.volume(&name)?;
        println!(
            "  volume {name:<10} {} keys, checkpoint LSN {}",
            v.len(),
            v.checkpoint_lsn()
        );
    }
    Ok(())
}

fn write_forever(dir: &Path, seed: u64) -> Result<()> {
    let lsg = LogStorageGroup::open(dir, drill_config(), OpenMode::WriteWaiting)
        .with_context(|| format!("opening {}", dir.display()))?;
    let audit = lsg.audit();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {} {}", lsg.owner_epoch(), audit.next_lsn())?;
    out.flush()?;
    // Bounded: a drill kills it long before; alone it stops after this many group flushes.
    for _ in 0..1_000_000u32 {
        let n = rng.random_range(1..=32u32);
        let mut last = Lsn(0);
        for _ in 0..n {
            let lsn = audit.next_lsn();
            last = audit.append(RecordType::Update, RecordFlags::NONE, &drill_payload(lsn.0))?;
            if last != lsn {
                bail!("appended at LSN {last}, expected {lsn}: another writer?");
            }
        }
        audit.wait_durable(last)?;
        writeln!(out, "durable {last}")?;
        out.flush()?;
    }
    Ok(())
}

fn hold(dir: &Path, wait: bool) -> Result<()> {
    let mode = if wait {
        OpenMode::WriteWaiting
    } else {
        OpenMode::Write
    };
    if wait {
        println!("waiting");
    }
    let lsg = LogStorageGroup::open(dir, drill_config(), mode)
        .with_context(|| format!("opening {}", dir.display()))?;
    println!("owned {}", lsg.owner_epoch());
    std::io::stdout().flush()?;
    let mut sink = String::new();
    while std::io::stdin().read_line(&mut sink)? > 0 {
        sink.clear();
    }
    Ok(())
}

/// A child process killed (SIGKILL) and reaped when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads a child's stdout lines on a thread so the drill can wait with a deadline.
fn line_reader(child: &mut Child) -> Result<mpsc::Receiver<String>> {
    let stdout = child.stdout.take().context("child stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

fn drill(dir: &Path, kills: u32, seed: Option<u64>) -> Result<()> {
    let seed = seed.unwrap_or_else(rand::random);
    println!(
        "drill: {kills} kills, seed {seed}, LSG in {}",
        dir.display()
    );
    if !dir.join("MANIFEST").exists() {
        LogStorageGroup::create(dir, LsgId(1), drill_config())
            .with_context(|| format!("creating an LSG in {}", dir.display()))?;
    }
    let exe = std::env::current_exe().context("finding the duplex executable")?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut total_acked = 0u64;
    for round in 0..kills {
        let acks_before_kill = rng.random_range(1..=40u32);
        let delay_us = rng.random_range(0..3000u64);
        let mut child = Killed(
            Command::new(&exe)
                .args(["lsg", "write", "--seed"])
                .arg((seed ^ round as u64).to_string())
                .arg("--dir")
                .arg(dir)
                .stdout(Stdio::piped())
                .stdin(Stdio::null())
                .spawn()
                .context("spawning the writer")?,
        );
        let lines = line_reader(&mut child.0)?;
        let mut acked = Lsn(0);
        let mut acks = 0;
        while acks < acks_before_kill {
            let line = lines
                .recv_timeout(Duration::from_secs(30))
                .context("the writer went silent")?;
            if let Some(lsn) = line.strip_prefix("durable ") {
                acked = Lsn(lsn.parse().context("bad durable line")?);
                acks += 1;
            }
        }
        std::thread::sleep(Duration::from_micros(delay_us));
        drop(child);
        // The writer may have printed more acks before it died.
        while let Ok(line) = lines.try_recv() {
            if let Some(lsn) = line.strip_prefix("durable ") {
                acked = Lsn(lsn.parse().context("bad durable line")?);
            }
        }
        let report = verify(dir, acked)?;
        total_acked = acked.0;
        println!(
            "round {:>3}: killed after {} acks (+{} us); acknowledged up to LSN {}, recovered {} records, {} unacknowledged kept; owner epoch now {}",
            round + 1,
            acks_before_kill,
            delay_us,
            acked,
            report.records,
            report.records - acked.0.min(report.records),
            report.epoch
        );
    }
    println!(
        "drill passed: {kills} kill points, every acknowledged record (LSN 1..={total_acked}) recovered intact and in order"
    );
    Ok(())
}

struct VerifyReport {
    records: u64,
    epoch: u64,
}

/// Opens the LSG as its next owner and checks every record against [`drill_payload`].
fn verify(dir: &Path, acked: Lsn) -> Result<VerifyReport> {
    let lsg = LogStorageGroup::open(dir, drill_config(), OpenMode::Write)
        .with_context(|| format!("recovering {}", dir.display()))?;
    let mut expected = 1u64;
    for record in lsg.audit().reader(Lsn(1))? {
        let record = record.context("reading the recovered audit trail")?;
        if record.lsn.0 != expected {
            bail!("LSN {} found where {expected} was expected", record.lsn);
        }
        if record.payload != drill_payload(record.lsn.0) {
            bail!("record at LSN {} has the wrong payload", record.lsn);
        }
        expected += 1;
    }
    let records = expected - 1;
    if records < acked.0 {
        bail!(
            "acknowledged records lost: durable up to LSN {acked} was reported, only {records} recovered"
        );
    }
    Ok(VerifyReport {
        records,
        epoch: lsg.owner_epoch().0,
    })
}
