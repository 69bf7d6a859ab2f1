//! `scripts/bench recovery [--quick]`: how fast an LSG comes back, against the machine's own
//! limit in the same run (real files; page cache dropped for the files before each measure).
//!
//! - cold recovery of a trail (1 GiB; 64 MiB with `--quick`) of two-update transactions: read
//!   every record, decode it, plan redo and undo (`plan_recovery`), apply the redo to the volume
//!   — against a plain sequential read of the same segment files;
//! - a warm backup's adoption of an LSG whose volume holds 1 GiB (64 MiB) against a fresh open
//!   that rebuilds the volume's index by scanning it, and adoption of a small volume, to show
//!   takeover time does not grow with the volume's size.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use duplex_audit_pair::recovery::{TrailRecord, plan_recovery};
use duplex_lsg::{LogStorageGroup, LsgConfig, LsgId, Lsn, OpenMode, OwnerEpoch, RecordFlags};
use duplex_pair::{AuditBody, MessageTableLimits, TxEnd, TxId, Update};
use duplex_testbed::{Better, Comparison, print_comparisons};

const VALUE_BYTES: usize = 100;

fn config() -> LsgConfig {
    LsgConfig {
        audit_segment_bytes: 64 << 20,
        volume_segment_bytes: 64 << 20,
        ..LsgConfig::default()
    }
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let trail_bytes: u64 = if quick { 64 << 20 } else { 1 << 30 };
    let volume_bytes: u64 = if quick { 64 << 20 } else { 1 << 30 };
    let root = PathBuf::from("target/bench-recovery");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    println!(
        "recovery benchmarks ({}) in {}",
        if quick { "quick" } else { "full" },
        root.display()
    );
    let mut out = Vec::new();

    let dir = root.join("trail");
    let records = write_trail(&dir, trail_bytes)?;
    let (read_s, read_bytes) = plain_read(&dir.join("audit"), trail_bytes)?;
    let (recover_s, redone) = cold_recovery(&dir)?;
    println!(
        "cold recovery of {records} records ({:.0} MiB): {recover_s:.2} s ({:.0} records/s, {redone} redone) | plain read of {:.0} MiB: {read_s:.2} s ({:.0} records/s)",
        trail_bytes as f64 / (1 << 20) as f64,
        records as f64 / recover_s,
        read_bytes as f64 / (1 << 20) as f64,
        records as f64 / read_s,
    );
    out.push(Comparison::new(
        "recovery_redo_records_per_s",
        records as f64 / recover_s,
        records as f64 / read_s,
        "records/s",
        Better::Higher,
    ));

    let small = root.join("small-volume");
    let big = root.join("big-volume");
    build_volume(&small, 1 << 20)?;
    build_volume(&big, volume_bytes)?;
    let small_adopt = adoption(&small)?;
    let big_adopt = adoption(&big)?;
    let big_open = fresh_open(&big)?;
    println!(
        "takeover of a {:.0} MiB volume: adoption by a warm backup {:.1} ms, fresh open {:.1} ms | adoption of a 1 MiB volume {:.1} ms",
        volume_bytes as f64 / (1 << 20) as f64,
        big_adopt * 1e3,
        big_open * 1e3,
        small_adopt * 1e3
    );
    out.push(Comparison::new(
        "takeover_big_volume_adoption_vs_fresh_open_ms",
        big_adopt * 1e3,
        big_open * 1e3,
        "ms",
        Better::Lower,
    ));
    out.push(Comparison::new(
        "takeover_adoption_big_vs_small_volume_ms",
        big_adopt * 1e3,
        small_adopt * 1e3,
        "ms",
        Better::Lower,
    ));
    let _ = std::fs::remove_dir_all(&root);
    print_comparisons(&out);
    Ok(())
}

/// Asks the kernel to drop the file's cached pages, so a measure reads from the disk.
fn drop_cache(path: &Path) -> Result<()> {
    for entry in walk(path)? {
        let f = File::open(&entry)?;
        f.sync_all()?;
        if let Err(e) = nix::fcntl::posix_fadvise(
            f.as_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        ) {
            eprintln!("posix_fadvise on {}: {e}", entry.display());
        }
    }
    Ok(())
}

fn walk(path: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if path.is_file() {
        out.push(path.to_path_buf());
        return Ok(out);
    }
    for entry in std::fs::read_dir(path)? {
        let p = entry?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Writes two-update transactions until the trail holds `bytes`; the volume stays at
/// checkpoint 0, so recovery redoes everything. Returns the number of records.
fn write_trail(dir: &Path, bytes: u64) -> Result<u64> {
    let mut lsg = LogStorageGroup::create(dir, LsgId(1), config())?;
    lsg.create_volume("accounts")?;
    let mut records = 0u64;
    let mut written = 0u64;
    let mut n = 0u64;
    while written < bytes {
        n += 1;
        let tx = TxId {
            epoch: OwnerEpoch(1),
            number: n,
        };
        for k in 0..2u64 {
            let body = AuditBody::Update(Update {
                tx,
                volume: "accounts".into(),
                key: format!("acct{:07}", (n * 2 + k) % 1_000_000).into_bytes(),
                before: Some(vec![1; VALUE_BYTES]),
                after: Some(vec![2; VALUE_BYTES]),
            });
            let payload = body.encode(usize::MAX)?;
            written += payload.len() as u64 + 24;
            lsg.audit()
                .append(body.record_type(), RecordFlags::NONE, &payload)?;
            records += 1;
        }
        let body = AuditBody::Commit(TxEnd {
            tx,
            epoch: OwnerEpoch(1),
            request: None,
        });
        let payload = body.encode(usize::MAX)?;
        written += payload.len() as u64 + 24;
        lsg.audit()
            .append(body.record_type(), RecordFlags::NONE, &payload)?;
        records += 1;
    }
    lsg.audit().flush()?;
    drop(lsg);
    drop_cache(dir)?;
    Ok(records)
}

/// Reads the audit segment files in order until `bytes` are read (the trail's records, not the
/// zeros of the segment made ahead of need); returns (seconds, bytes).
fn plain_read(dir: &Path, bytes: u64) -> Result<(f64, u64)> {
    drop_cache(dir)?;
    let start = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    'files: for path in walk(dir)? {
        let mut f = File::open(&path)?;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total >= bytes {
                break 'files;
            }
        }
    }
    Ok((start.elapsed().as_secs_f64(), total))
}

/// Opens the LSG as a cold takeover does and recovers it: read, decode, plan, redo.
fn cold_recovery(dir: &Path) -> Result<(f64, usize)> {
    drop_cache(dir)?;
    let start = Instant::now();
    let lsg = LogStorageGroup::open(dir, config(), OpenMode::Write)?;
    let opened = start.elapsed();
    let mut decoded = Vec::new();
    for r in lsg.audit().reader(lsg.audit().first_lsn())? {
        let r = r?;
        decoded.push(TrailRecord {
            lsn: r.lsn,
            flags: r.flags,
            body: AuditBody::decode(r.lsn, r.record_type, &r.payload)?,
        });
    }
    let volume = lsg.volume("accounts")?;
    let checkpoints = BTreeMap::from([("accounts".to_string(), volume.checkpoint_lsn())]);
    let read = start.elapsed();
    let plan = plan_recovery(decoded, &checkpoints, MessageTableLimits::default())
        .context("plan recovery")?;
    let planned = start.elapsed();
    let mut redone = 0;
    for chunk in plan.redo.chunks(4096) {
        redone += volume.apply_redo(
            chunk
                .iter()
                .map(|r| (r.key.as_slice(), r.value.as_deref(), r.lsn)),
        )?;
    }
    let total = start.elapsed();
    println!(
        "  cold recovery phases: open {:.0} ms, read and decode {:.0} ms, plan {:.0} ms, redo {:.0} ms",
        opened.as_secs_f64() * 1e3,
        (read - opened).as_secs_f64() * 1e3,
        (planned - read).as_secs_f64() * 1e3,
        (total - planned).as_secs_f64() * 1e3
    );
    Ok((total.as_secs_f64(), redone))
}

/// An LSG whose volume holds about `bytes` of checkpointed records (and a few after).
fn build_volume(dir: &Path, bytes: u64) -> Result<()> {
    let mut lsg = LogStorageGroup::create(dir, LsgId(1), config())?;
    let volume = lsg.create_volume("accounts")?;
    let value = vec![7u8; 1000];
    let per_record = value.len() as u64 + 40;
    let count = (bytes / per_record).max(1);
    let mut batch = Vec::with_capacity(4096);
    for i in 0..count {
        let lsn = lsg
            .audit()
            .append(duplex_lsg::RecordType::Update, RecordFlags::NONE, b"u")?;
        batch.push((format!("key{i:09}").into_bytes(), Some(value.clone()), lsn));
        if batch.len() == 4096 {
            volume.apply_redo(batch.drain(..))?;
        }
    }
    volume.apply_redo(batch.drain(..))?;
    let last = Lsn(lsg.audit().next_lsn().0 - 1);
    volume.flush(last)?;
    for i in 0..100u64 {
        let lsn = lsg
            .audit()
            .append(duplex_lsg::RecordType::Update, RecordFlags::NONE, b"u")?;
        volume.put(format!("new{i:05}").as_bytes(), &value, lsn)?;
    }
    lsg.audit().flush()?;
    drop(volume);
    drop(lsg);
    Ok(())
}

/// A warm backup opened the LSG read-only earlier (off the takeover path); the takeover adopts
/// it for writing. Returns the adoption's seconds.
fn adoption(dir: &Path) -> Result<f64> {
    let mut view = LogStorageGroup::open(dir, config(), OpenMode::ReadOnly)?;
    view.catch_up()?;
    drop_cache(dir)?;
    let start = Instant::now();
    view.adopt_for_write(OpenMode::Write)?;
    Ok(start.elapsed().as_secs_f64())
}

/// A fresh open for writing, which scans every volume to rebuild its index.
fn fresh_open(dir: &Path) -> Result<f64> {
    drop_cache(dir)?;
    let start = Instant::now();
    let lsg = LogStorageGroup::open(dir, config(), OpenMode::Write)?;
    let elapsed = start.elapsed().as_secs_f64();
    drop(lsg);
    Ok(elapsed)
}
