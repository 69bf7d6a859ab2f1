//! `scripts/bench storage [--quick]`: the LSG manager against the machine's own limits, measured
//! side by side in one run (figures on these VMs move 3-4x between days; only same-run
//! comparisons mean anything).
//!
//! - group-committed appends (append + wait durable per record) vs a plain `pwrite` + `fdatasync`
//!   loop writing the same bytes per sync (the group size the trail achieved) to a preallocated file
//! - latency of one 100-byte append + wait durable vs one raw 4 KiB `pwrite` + `fdatasync`
//! - recovery scan of the audit trail vs CRC32C over the same bytes in memory
//! - ownership takeover after SIGKILL (to a fully opened LSG) vs a bare `flock` waiter
//! - the durable-path design choice: `pwrite` + `fdatasync` vs map + `msync`, 64 KiB per sync

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use duplex_lsg::{LogStorageGroup, LsgConfig, LsgId, Lsn, OpenMode, RecordFlags, RecordType};
use duplex_testbed::{Better, Comparison, percentiles, print_comparisons};

struct Plan {
    run: Duration,
    latency_samples: usize,
    scan_bytes: u64,
    takeover_rounds: usize,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        return child(&args[2..]);
    }
    let quick = args.iter().any(|a| a == "--quick");
    // `--only AREA` (append, latency, scan, takeover, design) runs one part, for iterating.
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let part = |area: &str| only.as_deref().is_none_or(|o| o == area);
    let plan = if quick {
        Plan {
            run: Duration::from_millis(1500),
            latency_samples: 2000,
            scan_bytes: 256 << 20,
            takeover_rounds: 10,
        }
    } else {
        Plan {
            run: Duration::from_secs(5),
            latency_samples: 10_000,
            scan_bytes: 1 << 30,
            takeover_rounds: 20,
        }
    };
    let root = PathBuf::from("target/bench-storage");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    let mut out = Vec::new();
    println!(
        "storage benchmarks ({}) in {}",
        if quick { "quick" } else { "full" },
        root.display()
    );

    if part("append") {
        for (size, appenders) in [(100usize, 1usize), (100, 16), (4096, 1), (4096, 16)] {
            let dir = root.join(format!("append-{size}-{appenders}"));
            let (ours, raw, group_bytes) = group_append_vs_raw(&dir, size, appenders, plan.run)?;
            let raw_mbps = raw.syncs_per_s * group_bytes as f64 / 1e6;
            let ours_mbps = ours.records_per_s * size as f64 / 1e6;
            let ours_wire_mbps = ours.bytes_flushed as f64 / ours.elapsed_s / 1e6;
            println!(
                "append {size:>4} B x {appenders:>2}: {:>9.0} records/s {ours_mbps:>7.1} MB/s payload ({ours_wire_mbps:.1} MB/s written), {:.1} records/flush | raw {group_bytes} B write+fdatasync: {:.0}/s {raw_mbps:.1} MB/s",
                ours.records_per_s,
                ours.records as f64 / ours.flushes.max(1) as f64,
                raw.syncs_per_s,
            );
            out.push(Comparison::new(
                &format!("append_{size}b_{appenders}x_throughput"),
                ours_wire_mbps,
                raw_mbps,
                "MB/s",
                Better::Higher,
            ));
            out.push(Comparison::new(
                &format!("append_{size}b_{appenders}x_records"),
                ours.records_per_s,
                raw.syncs_per_s
                    * (group_bytes as f64 / duplex_lsg::record::encoded_len(size) as f64),
                "records/s",
                Better::Higher,
            ));
        }
    }
    if part("latency") {
        let ((ours_p50, ours_p99), (raw_p50, raw_p99)) =
            latency_vs_raw(&root.join("latency"), plan.latency_samples)?;
        println!(
            "append+wait 100 B: p50 {ours_p50:.1} us p99 {ours_p99:.1} us | raw 4 KiB write+fdatasync: p50 {raw_p50:.1} us p99 {raw_p99:.1} us"
        );
        out.push(Comparison::new(
            "append_durable_100b_p50",
            ours_p50,
            raw_p50,
            "us",
            Better::Lower,
        ));
        out.push(Comparison::new(
            "append_durable_100b_p99",
            ours_p99,
            raw_p99,
            "us",
            Better::Lower,
        ));
    }
    if part("scan") {
        let (scan_gbps, crc_gbps) = recovery_scan(&root.join("scan"), plan.scan_bytes)?;
        println!(
            "recovery scan of {} MiB: {scan_gbps:.2} GB/s | crc32c in memory: {crc_gbps:.2} GB/s",
            plan.scan_bytes >> 20
        );
        out.push(Comparison::new(
            "recovery_scan",
            scan_gbps,
            crc_gbps,
            "GB/s",
            Better::Higher,
        ));
    }
    if part("takeover") {
        let exe = std::env::current_exe()?;
        let (own_p50, own_p99) =
            takeover(&exe, &root.join("takeover"), "open", plan.takeover_rounds)?;
        let (lock_p50, lock_p99) = takeover(
            &exe,
            &root.join("takeover-lock"),
            "flock",
            plan.takeover_rounds,
        )?;
        println!(
            "takeover after SIGKILL: LSG owned p50 {own_p50:.2} ms p99 {own_p99:.2} ms | bare flock p50 {lock_p50:.2} ms p99 {lock_p99:.2} ms"
        );
        out.push(Comparison::new(
            "takeover_p50",
            own_p50,
            lock_p50,
            "ms",
            Better::Lower,
        ));
        out.push(Comparison::new(
            "takeover_p99",
            own_p99,
            lock_p99,
            "ms",
            Better::Lower,
        ));
    }
    if part("design") {
        let (pwrite_mbps, msync_mbps) = durable_path_choice(&root.join("design"), plan.run / 2)?;
        println!(
            "64 KiB durable writes: pwrite+fdatasync {pwrite_mbps:.0} MB/s | map+msync {msync_mbps:.0} MB/s"
        );
        out.push(Comparison::new(
            "design_pwrite_fdatasync_vs_msync_64k",
            pwrite_mbps,
            msync_mbps,
            "MB/s",
            Better::Higher,
        ));
    }

    let _ = std::fs::remove_dir_all(&root);
    print_comparisons(&out);
    Ok(())
}

#[derive(Default)]
struct AppendResult {
    records: u64,
    records_per_s: f64,
    flushes: u64,
    bytes_flushed: u64,
    elapsed_s: f64,
}

/// Blocks of Duplex and of the raw loop alternate, so drift in the disk's speed during the run
/// (large on these VMs) falls on both alike. The raw loop writes, per sync, the bytes the trail
/// flushed per sync so far.
const BLOCKS: u32 = 4;

fn group_append_vs_raw(
    dir: &Path,
    size: usize,
    appenders: usize,
    run: Duration,
) -> Result<(AppendResult, RawResult, usize)> {
    let lsg = Arc::new(LogStorageGroup::create(
        dir,
        LsgId(1),
        LsgConfig::default(),
    )?);
    lsg.audit().preallocate_next()?;
    let raw_file = prealloc(&dir.join("raw"), RAW_FILE_BYTES)?;
    let block = run / BLOCKS;
    let mut ours = AppendResult::default();
    let mut raw = RawResult::default();
    let mut group_bytes = 1;
    for _ in 0..BLOCKS {
        let b = group_append(&lsg, size, appenders, block)?;
        ours.records += b.records;
        ours.flushes += b.flushes;
        ours.bytes_flushed += b.bytes_flushed;
        ours.elapsed_s += b.elapsed_s;
        group_bytes = (ours.bytes_flushed / ours.flushes.max(1)).max(1) as usize;
        let r = raw_sync_loop(&raw_file, group_bytes, block / 2)?;
        raw.syncs += r.syncs;
        raw.elapsed_s += r.elapsed_s;
    }
    ours.records_per_s = ours.records as f64 / ours.elapsed_s;
    raw.syncs_per_s = raw.syncs as f64 / raw.elapsed_s;
    Ok((ours, raw, group_bytes))
}

fn group_append(
    lsg: &Arc<LogStorageGroup>,
    size: usize,
    appenders: usize,
    run: Duration,
) -> Result<AppendResult> {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let before = lsg.audit().stats();
    let started = Instant::now();
    let threads: Vec<_> = (0..appenders)
        .map(|_| {
            let (lsg, stop, count) = (Arc::clone(lsg), Arc::clone(&stop), Arc::clone(&count));
            std::thread::spawn(move || -> Result<()> {
                let payload = vec![0x5Au8; size];
                while !stop.load(Ordering::Relaxed) {
                    let lsn =
                        lsg.audit()
                            .append(RecordType::Update, RecordFlags::NONE, &payload)?;
                    lsg.audit().wait_durable(lsn)?;
                    count.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(run);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("appender panicked"))??;
    }
    // Segment preallocation is part of the trail's cost: finish it inside this block.
    lsg.audit().preallocate_next()?;
    let elapsed_s = started.elapsed().as_secs_f64();
    let after = lsg.audit().stats();
    let records = count.load(Ordering::Relaxed);
    Ok(AppendResult {
        records,
        records_per_s: records as f64 / elapsed_s,
        flushes: after.flushes - before.flushes,
        bytes_flushed: after.bytes_flushed - before.bytes_flushed,
        elapsed_s,
    })
}

const RAW_FILE_BYTES: u64 = 256 << 20;

/// A preallocated file for raw loops: overwriting written blocks, as the trail does.
fn prealloc(path: &Path, size: u64) -> Result<File> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let chunk = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < size {
        f.write_all(&chunk)?;
        at += chunk.len() as u64;
    }
    f.sync_all()?;
    Ok(f)
}

#[derive(Default)]
struct RawResult {
    syncs: u64,
    elapsed_s: f64,
    syncs_per_s: f64,
}

/// `pwrite` + `fdatasync` of `group_bytes` at a time, sequentially through a preallocated file.
fn raw_sync_loop(f: &File, group_bytes: usize, run: Duration) -> Result<RawResult> {
    let size = f.metadata()?.len();
    let buf = vec![0xA5u8; group_bytes];
    let started = Instant::now();
    let mut syncs = 0u64;
    let mut at = 0u64;
    while started.elapsed() < run {
        if at + group_bytes as u64 > size {
            at = 0;
        }
        f.write_all_at(&buf, at)?;
        f.sync_data()?;
        at += group_bytes as u64;
        syncs += 1;
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    Ok(RawResult {
        syncs,
        elapsed_s,
        syncs_per_s: syncs as f64 / elapsed_s,
    })
}

/// One 100-byte append + wait durable at a time, against one raw 4 KiB write + fdatasync at a
/// time, in alternating blocks.
fn latency_vs_raw(dir: &Path, samples: usize) -> Result<((f64, f64), (f64, f64))> {
    let lsg = LogStorageGroup::create(dir, LsgId(1), LsgConfig::default())?;
    // Setup: the spare segment made at creation is written before measuring, not during.
    lsg.audit().preallocate_next()?;
    let raw = prealloc(&dir.join("raw"), 64 << 20)?;
    let payload = [0x33u8; 100];
    let buf = [0x44u8; 4096];
    let per_block = (samples / BLOCKS as usize).max(1);
    let (mut ours, mut base) = (Vec::with_capacity(samples), Vec::with_capacity(samples));
    let mut raw_at = 0u64;
    for _ in 0..BLOCKS {
        for i in 0..per_block + 20 {
            let t = Instant::now();
            lsg.audit()
                .append_durable(RecordType::Update, RecordFlags::NONE, &payload)?;
            if i >= 20 {
                ours.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        for i in 0..per_block + 20 {
            raw_at = (raw_at + 4096) % (64 << 20);
            let t = Instant::now();
            raw.write_all_at(&buf, raw_at)?;
            raw.sync_data()?;
            if i >= 20 {
                base.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    Ok((percentiles(&mut ours), percentiles(&mut base)))
}

fn recovery_scan(dir: &Path, bytes: u64) -> Result<(f64, f64)> {
    let config = LsgConfig::default();
    {
        let lsg = LogStorageGroup::create(dir, LsgId(1), config)?;
        let payload = vec![0x77u8; 4000];
        let per = duplex_lsg::record::encoded_len(payload.len()) as u64;
        for _ in 0..bytes / per {
            lsg.audit()
                .append(RecordType::Update, RecordFlags::NONE, &payload)?;
        }
        lsg.audit().flush()?;
    }
    let lsg = LogStorageGroup::open(dir, config, OpenMode::Write)?;
    // Warm the page cache and the maps once, as a takeover on a warm host would find them.
    let mut scanned = 0u64;
    lsg.audit().scan(Lsn(1), |v| {
        scanned += v.encoded_len() as u64;
        std::ops::ControlFlow::Continue(())
    })?;
    let mut best_scan = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let mut n = 0u64;
        lsg.audit().scan(Lsn(1), |v| {
            n += v.encoded_len() as u64;
            std::ops::ControlFlow::Continue(())
        })?;
        best_scan = best_scan.min(t.elapsed().as_secs_f64());
        if n != scanned {
            bail!("scan saw {n} bytes, expected {scanned}");
        }
    }
    // The same bytes, in memory, checksummed by the same crc32c.
    drop(lsg);
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir.join("audit"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort();
    let mut memory = Vec::with_capacity(scanned as usize);
    for path in segments {
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        memory.extend_from_slice(&data[4096..]);
    }
    memory.truncate(scanned as usize);
    let mut best_crc = f64::MAX;
    let mut sink = 0u32;
    for _ in 0..3 {
        let t = Instant::now();
        sink ^= crc32c::crc32c(&memory);
        best_crc = best_crc.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    Ok((
        scanned as f64 / best_scan / 1e9,
        scanned as f64 / best_crc / 1e9,
    ))
}

fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64,
        Err(_) => 0,
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_child(
    exe: &Path,
    args: &[&str],
) -> Result<(Killed, BufReader<std::process::ChildStdout>)> {
    let mut child = Command::new(exe)
        .arg("--child")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("child stdout")?;
    Ok((Killed(child), BufReader::new(stdout)))
}

fn read_line(r: &mut BufReader<std::process::ChildStdout>) -> Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        bail!("child exited early");
    }
    Ok(line.trim().to_string())
}

/// Milliseconds from SIGKILL of a holder to a waiting process owning the LSG (`open`) or holding
/// a bare flock on a file (`flock`).
fn takeover(exe: &Path, dir: &Path, what: &str, rounds: usize) -> Result<(f64, f64)> {
    std::fs::create_dir_all(dir)?;
    let dir_s = dir.to_str().context("utf-8 path")?;
    if what == "open" {
        let lsg = LogStorageGroup::create(dir, LsgId(1), LsgConfig::default())?;
        let payload = vec![1u8; 1000];
        for _ in 0..20_000 {
            lsg.audit()
                .append(RecordType::Update, RecordFlags::NONE, &payload)?;
        }
        lsg.audit().flush()?;
    }
    let mut ms = Vec::new();
    for _ in 0..rounds {
        let (mut holder, mut holder_out) = spawn_child(exe, &[what, "hold", dir_s])?;
        read_line(&mut holder_out)?;
        let (_waiter, mut waiter_out) = spawn_child(exe, &[what, "wait", dir_s])?;
        read_line(&mut waiter_out)?;
        // Give the waiter time to block in the lock call: this is setup, not synchronisation of
        // what is measured (the figure is taken from timestamps on one monotonic clock).
        std::thread::sleep(Duration::from_millis(30));
        let killed_ns = monotonic_ns();
        holder.0.kill()?;
        let owned_ns: u64 = read_line(&mut waiter_out)?
            .strip_prefix("owned ")
            .context("owned line")?
            .parse()?;
        let _ = holder.0.wait();
        ms.push(owned_ns.saturating_sub(killed_ns) as f64 / 1e6);
    }
    Ok(percentiles(&mut ms))
}

/// 64 KiB per durable write through each path, to keep the faster for the audit trail.
fn durable_path_choice(dir: &Path, run: Duration) -> Result<(f64, f64)> {
    let group = 64usize << 10;
    let size = 128u64 << 20;
    let pwrite = raw_sync_loop(&prealloc(&dir.join("pwrite"), size)?, group, run)?;
    let f = prealloc(&dir.join("msync"), size)?;
    // SAFETY: the file is private to this benchmark and not resized while mapped.
    #[allow(unsafe_code)]
    let mut map = unsafe { memmap2::MmapMut::map_mut(&f)? };
    let buf = vec![0x5Au8; group];
    let started = Instant::now();
    let mut syncs = 0u64;
    let mut at = 0usize;
    while started.elapsed() < run {
        if at + group > size as usize {
            at = 0;
        }
        map[at..at + group].copy_from_slice(&buf);
        map.flush_range(at, group)?;
        at += group;
        syncs += 1;
    }
    let msync_rate = syncs as f64 / started.elapsed().as_secs_f64();
    Ok((
        pwrite.syncs_per_s * group as f64 / 1e6,
        msync_rate * group as f64 / 1e6,
    ))
}

/// Child roles for the takeover measurement: `open|flock hold|wait DIR`.
fn child(args: &[String]) -> Result<()> {
    let [what, role, dir] = args else {
        bail!("usage: --child open|flock hold|wait DIR");
    };
    let dir = Path::new(dir);
    let mut stdout = std::io::stdout().lock();
    if role == "wait" {
        writeln!(stdout, "waiting")?;
        stdout.flush()?;
    }
    let _owned: Box<dyn std::any::Any> = match what.as_str() {
        "open" => Box::new(LogStorageGroup::open(
            dir,
            LsgConfig::default(),
            OpenMode::WriteWaiting,
        )?),
        "flock" => {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.join("LOCK"))?;
            f.lock()?;
            Box::new(f)
        }
        other => bail!("unknown child kind {other}"),
    };
    writeln!(stdout, "owned {}", monotonic_ns())?;
    stdout.flush()?;
    let mut sink = String::new();
    while std::io::stdin().read_line(&mut sink)? > 0 {
        sink.clear();
    }
    Ok(())
}
