//! A warm backup on the same storage: it opens the LSG read-only early, keeps it current with
//! `catch_up` (reading only what was appended), and at takeover turns it into the owner with
//! `adopt_for_write_in`, reading only what follows the checkpoints instead of whole volumes.
//!
//! The oracle: at every takeover the simulated host is forked, the backup adopts in one world
//! and a fresh `open_in(Write)` opens in the other, and the two must be indistinguishable: every
//! byte of every file (what readers see and what is durable), the next LSN, the audit records,
//! each volume's checkpoint LSN, statistics, scan and `get` of every key. After every catch-up
//! the read-only view must equal a fresh read-only open.

use std::collections::BTreeMap;
use std::ops::Bound;

use duplex_lsg::{
    AuditRecord, FileStore, LogStorageGroup, LsgConfig, LsgError, LsgId, LsgOptions, Lsn, OpenMode,
    RecordFlags, RecordType, SimFileImage, SimStore, Store, StoreFile, VolumeRecord, VolumeStats,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type Lsg = LogStorageGroup<SimStore>;

fn config() -> LsgConfig {
    LsgConfig {
        audit_segment_bytes: 32 << 10,
        volume_segment_bytes: 16 << 10,
        max_batch_bytes: 4 << 10,
        max_record_bytes: 2 << 10,
        max_key_bytes: 16,
        max_value_bytes: 512,
    }
}

const KEYS: u8 = 24;

fn open(store: &SimStore, mode: OpenMode) -> duplex_lsg::Result<Lsg> {
    LogStorageGroup::open_in_with(store.clone(), config(), mode, LsgOptions::deterministic())
}

/// Everything an opener can observe of an LSG, for comparing two of them.
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    next_lsn: Lsn,
    first_lsn: Lsn,
    records: Vec<AuditRecord>,
    volumes: BTreeMap<String, ObservedVolume>,
}

#[derive(Debug, PartialEq, Eq)]
struct ObservedVolume {
    checkpoint_lsn: Lsn,
    stats: VolumeStats,
    scan: Vec<VolumeRecord>,
    gets: Vec<(Option<VolumeRecord>, Option<Lsn>)>,
}

fn observe(lsg: &Lsg) -> Observed {
    let audit = lsg.audit();
    let records = audit
        .reader(audit.first_lsn())
        .expect("reader")
        .map(|r| r.expect("record"))
        .collect();
    let volumes = lsg
        .volume_names()
        .into_iter()
        .map(|name| {
            let v = lsg.volume(&name).expect("volume");
            let observed = ObservedVolume {
                checkpoint_lsn: v.checkpoint_lsn(),
                stats: v.stats(),
                scan: v
                    .scan((Bound::Unbounded, Bound::Unbounded), usize::MAX)
                    .expect("scan"),
                gets: (0..KEYS)
                    .map(|k| (v.get(&[k]).expect("get"), v.generation(&[k])))
                    .collect(),
            };
            (name, observed)
        })
        .collect();
    Observed {
        next_lsn: audit.next_lsn(),
        first_lsn: audit.first_lsn(),
        records,
        volumes,
    }
}

/// The first difference between two hosts' files, if any.
fn first_difference(
    a: &BTreeMap<String, SimFileImage>,
    b: &BTreeMap<String, SimFileImage>,
) -> Option<String> {
    let names: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for name in names {
        match (a.get(name), b.get(name)) {
            (Some(x), Some(y)) if x == y => {}
            (Some(x), Some(y)) => {
                let current = x.current.iter().zip(&y.current).position(|(p, q)| p != q);
                let durable = x.durable.iter().zip(&y.durable).position(|(p, q)| p != q);
                return Some(format!(
                    "{name}: first difference of what is read at {current:?}, of what is durable at {durable:?}, names durable {} / {}",
                    x.entry_durable, y.entry_durable
                ));
            }
            (x, _) => {
                return Some(format!(
                    "{name} exists only in the {} world",
                    if x.is_some() { "adopting" } else { "fresh" }
                ));
            }
        }
    }
    None
}

/// Logs a change in the trail and applies it to a volume (as a volume pair does).
fn change(lsg: &Lsg, volume: &str, key: u8, value: Option<&[u8]>) {
    let mut payload = vec![key];
    payload.extend_from_slice(value.unwrap_or_default());
    // Failed trails and volumes are part of the simulation: their errors are expected.
    let Ok(lsn) = lsg
        .audit()
        .append(RecordType::Update, RecordFlags::NONE, &payload)
    else {
        return;
    };
    let Ok(v) = lsg.volume(volume) else { return };
    let _ = match value {
        Some(value) => v.put(&[key], value, lsn),
        None => v.delete(&[key], lsn),
    };
}

fn volume_files(store: &SimStore, volume: &str) -> Vec<String> {
    store
        .list(&format!("volumes/{volume}"))
        .expect("list")
        .into_iter()
        .filter(|n| n.ends_with(".seg"))
        .map(|n| format!("volumes/{volume}/{n}"))
        .collect()
}

/// The read-only view after a catch-up equals what a fresh read-only open sees now.
fn check_view(seed: u64, step: usize, reader: &Lsg, reader_store: &SimStore) {
    let fresh = open(reader_store, OpenMode::ReadOnly).expect("fresh read-only open");
    assert_eq!(
        observe(reader),
        observe(&fresh),
        "seed {seed} step {step}: a caught-up view differs from a fresh read-only open"
    );
}

/// The backup takes over: in a fork of the host a fresh open, here the adoption; both must
/// give the same LSG and the same files. Returns the adopted LSG.
fn take_over(seed: u64, step: usize, mut reader: Lsg, reader_store: &SimStore) -> Lsg {
    let other_world = reader_store.fork();
    let fresh = open(&other_world, OpenMode::Write);
    let scanned_before: u64 = reader
        .volume_names()
        .iter()
        .map(|n| {
            reader
                .volume(n)
                .expect("volume")
                .scan_stats()
                .records_scanned
        })
        .sum();
    let adopted = reader.adopt_for_write_in(reader_store.clone(), OpenMode::Write);
    match (&adopted, &fresh) {
        (Ok(()), Ok(_)) => {}
        (Err(a), Err(f)) => {
            assert_eq!(a.to_string(), f.to_string(), "seed {seed} step {step}");
            panic!("seed {seed} step {step}: both takeovers failed: {a}");
        }
        _ => panic!(
            "seed {seed} step {step}: adoption {:?} but fresh open {:?}",
            adopted.as_ref().err(),
            fresh.as_ref().err()
        ),
    }
    let fresh = fresh.expect("fresh open");
    assert_eq!(reader.mode(), OpenMode::Write);
    assert_eq!(
        (reader.owner_epoch(), reader.boot_sequence()),
        (fresh.owner_epoch(), fresh.boot_sequence()),
        "seed {seed} step {step}"
    );
    assert_eq!(
        observe(&reader),
        observe(&fresh),
        "seed {seed} step {step}: the adopted LSG differs from a fresh open"
    );
    if let Some(diff) = first_difference(&reader_store.image(), &other_world.image()) {
        panic!(
            "seed {seed} step {step}: the files differ after adoption and after a fresh open: {diff}"
        );
    }
    // The adopted LSG read at most what a fresh open reads (the point of adopting).
    let scanned_after: u64 = reader
        .volume_names()
        .iter()
        .map(|n| {
            reader
                .volume(n)
                .expect("volume")
                .scan_stats()
                .records_scanned
        })
        .sum();
    let fresh_scanned: u64 = fresh
        .volume_names()
        .iter()
        .map(|n| {
            fresh
                .volume(n)
                .expect("volume")
                .scan_stats()
                .records_scanned
        })
        .sum();
    assert!(
        scanned_after - scanned_before <= fresh_scanned,
        "seed {seed} step {step}: adoption read {} records, a fresh open {fresh_scanned}",
        scanned_after - scanned_before
    );
    reader
}

/// One seeded life: an owner writing (with faults), a read-only backup catching up now and
/// then, and takeovers by adoption after kills, mid-flush crashes and clean closes.
fn simulate(seed: u64, steps: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut writer_store = SimStore::new(seed);
    let mut writer = LogStorageGroup::create_in_with(
        writer_store.clone(),
        LsgId(3),
        config(),
        LsgOptions::deterministic(),
    )
    .expect("create");
    writer.create_volume("v").expect("volume");
    let mut reader_store = writer_store.another_process();
    let mut reader = open(&reader_store, OpenMode::ReadOnly).expect("read-only open");
    let mut takeovers = 0;
    for step in 0..steps {
        let volumes = writer.volume_names();
        let volume = volumes[rng.random_range(0..volumes.len())].clone();
        match rng.random_range(0..100u32) {
            0..45 => {
                let key = rng.random_range(0..KEYS);
                let value = vec![rng.random_range(1..=255u8); rng.random_range(0..400)];
                let value = rng.random_bool(0.85).then_some(value.as_slice());
                change(&writer, &volume, key, value);
            }
            45..53 => {
                let _ = writer.audit().flush();
            }
            53..60 => {
                let v = writer.volume(&volume).expect("volume");
                let _ = v.flush(Lsn(writer.audit().next_lsn().0 - 1));
            }
            60..62 => {
                let _ = writer.volume(&volume).expect("volume").compact();
            }
            62..65 => {
                for name in volume_files(&writer_store, &volume) {
                    let _ = writer_store.write_back(&name);
                }
            }
            65..78 => {
                reader.catch_up().expect("catch up");
                check_view(seed, step, &reader, &reader_store);
            }
            78..80 => {
                if !volumes.iter().any(|n| n == "w") {
                    // A dead owner (killed at a failed sync) cannot.
                    let _ = writer.create_volume("w");
                }
            }
            80..82 => {
                // The volume's next flush fails to sync: the volume stops for good and scrubs
                // what follows its checkpoint, or its owner is killed before it can scrub.
                let names = volume_files(&writer_store, &volume);
                let killed_before_scrub = rng.random_bool(0.3);
                for name in &names {
                    match killed_before_scrub {
                        true => writer_store.fail_syncs_and_crash(name, 1),
                        false => writer_store.fail_syncs(name, 1),
                    }
                }
                let v = writer.volume(&volume).expect("volume");
                let _ = v.flush(Lsn(writer.audit().next_lsn().0 - 1));
                for name in &names {
                    writer_store.fail_syncs(name, 0);
                }
            }
            82..83 => {
                let names: Vec<String> = writer_store
                    .list("audit")
                    .expect("list")
                    .into_iter()
                    .map(|n| format!("audit/{n}"))
                    .collect();
                for name in &names {
                    writer_store.fail_syncs(name, 1);
                }
                let _ = writer.audit().flush();
                for name in &names {
                    writer_store.fail_syncs(name, 0);
                }
            }
            83..87 => {
                // The owner's process restarts and opens the LSG again itself (it may cut
                // what the backup's view read past a checkpoint): the view lives on.
                if rng.random_bool(0.5) {
                    writer_store.crash_after_writes(rng.random_range(1..4));
                    let _ = writer.audit().flush();
                }
                drop(writer);
                writer_store.kill_process();
                writer = open(&writer_store, OpenMode::Write).expect("restart");
            }
            87..94 => {
                // The owner dies: killed, or killed in the middle of a flush, or it closes.
                match rng.random_range(0..3u32) {
                    0 => {
                        writer_store.crash_after_writes(rng.random_range(1..4));
                        let _ = writer.audit().flush();
                        let v = writer.volume(&volume).expect("volume");
                        let _ = v.flush(Lsn(writer.audit().next_lsn().0 - 1));
                        if rng.random_bool(0.5) {
                            // The backup looks while the owner lies dead mid-write.
                            reader.catch_up().expect("catch up");
                            check_view(seed, step, &reader, &reader_store);
                        }
                        drop(writer);
                        writer_store.kill_process();
                    }
                    1 => {
                        drop(writer);
                        writer_store.kill_process();
                    }
                    _ => drop(writer),
                }
                if rng.random_bool(0.7) {
                    reader.catch_up().expect("catch up");
                    check_view(seed, step, &reader, &reader_store);
                }
                writer = take_over(seed, step, reader, &reader_store);
                takeovers += 1;
                writer_store = reader_store;
                reader_store = writer_store.another_process();
                reader = open(&reader_store, OpenMode::ReadOnly).expect("read-only open");
            }
            94..97 => {
                drop((writer, reader));
                writer_store.power_loss();
                writer = open(&writer_store, OpenMode::Write).expect("open after power loss");
                reader = open(&reader_store, OpenMode::ReadOnly).expect("read-only open");
            }
            _ => {
                reader = open(&reader_store, OpenMode::ReadOnly).expect("read-only reopen");
            }
        }
    }
    eprintln!("seed {seed}: {takeovers} takeovers in {steps} steps");
}

#[test]
fn an_adopted_lsg_is_indistinguishable_from_a_fresh_open() {
    let seeds: u64 = std::env::var("DUPLEX_ADOPTION_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(48);
    for seed in 0..seeds {
        eprintln!("seed {seed}");
        simulate(seed, 250);
    }
}

/// A volume of `records` checkpointed records plus `tail` records after the checkpoint; a
/// backup that opened it read-only and caught up; the owner killed. Returns how many records
/// the adoption read and how many a fresh open reads.
fn records_read_at_takeover(records: u32, tail: u32) -> (u64, u64) {
    let primary = SimStore::new(u64::from(records));
    let mut lsg = LogStorageGroup::create_in_with(
        primary.clone(),
        LsgId(1),
        LsgConfig {
            volume_segment_bytes: 1 << 20,
            ..config()
        },
        LsgOptions::deterministic(),
    )
    .expect("create");
    let v = lsg.create_volume("v").expect("volume");
    let write = |i: u32| {
        let lsn = lsg
            .audit()
            .append(RecordType::Update, RecordFlags::NONE, &i.to_le_bytes())
            .expect("append");
        v.put(&i.to_be_bytes(), &[7; 40], lsn).expect("put");
    };
    for i in 0..records {
        write(i);
    }
    v.flush(lsg.audit().flush().expect("flush"))
        .expect("checkpoint");
    let backup = primary.another_process();
    let mut view = LogStorageGroup::open_in_with(
        backup.clone(),
        config(),
        OpenMode::ReadOnly,
        LsgOptions::deterministic(),
    )
    .expect("read-only open");
    for i in records..records + tail {
        write(i);
    }
    lsg.audit().flush().expect("flush");
    view.catch_up().expect("catch up");
    drop(v);
    drop(lsg);
    primary.kill_process();
    let other_world = backup.fork();
    let before = view.volume("v").expect("volume").scan_stats();
    view.adopt_for_write_in(backup.clone(), OpenMode::Write)
        .expect("adopt");
    let after = view.volume("v").expect("volume").scan_stats();
    assert_eq!(
        after.full_scans, before.full_scans,
        "adoption does not read the volume whole"
    );
    let fresh = open(&other_world, OpenMode::Write).expect("fresh open");
    assert_eq!(observe(&view), observe(&fresh));
    let fresh_read = fresh
        .volume("v")
        .expect("volume")
        .scan_stats()
        .records_scanned;
    (after.records_scanned - before.records_scanned, fresh_read)
}

/// Adoption reads the records after the volume's checkpoint (the ones a crash could still cut,
/// read again under the lock), however large the volume: its cost follows what was written
/// since the last checkpoint, a fresh open's follows the volume's size.
#[test]
fn adoption_reads_what_follows_the_checkpoint_not_the_volume() {
    for (records, tail) in [(1_000, 40), (20_000, 40), (20_000, 300)] {
        let (adopted, fresh) = records_read_at_takeover(records, tail);
        eprintln!(
            "{records} checkpointed records + {tail} after: adoption read {adopted}, a fresh open {fresh}"
        );
        assert_eq!(adopted, u64::from(tail), "{records} + {tail}");
        assert_eq!(fresh, u64::from(records + tail), "{records} + {tail}");
    }
}

/// A catch-up reads what was appended since the last one, not the volume again, and its
/// readers see the new audit records.
#[test]
fn a_catch_up_reads_only_what_was_appended() {
    let primary = SimStore::new(5);
    let mut lsg = LogStorageGroup::create_in_with(
        primary.clone(),
        LsgId(1),
        config(),
        LsgOptions::deterministic(),
    )
    .expect("create");
    let v = lsg.create_volume("v").expect("volume");
    for i in 0..200u8 {
        change(&lsg, "v", i % KEYS, Some(&[i; 100]));
    }
    v.flush(lsg.audit().flush().expect("flush"))
        .expect("checkpoint");
    let backup = primary.another_process();
    let mut view = open(&backup, OpenMode::ReadOnly).expect("read-only open");
    let opened = view.volume("v").expect("volume").scan_stats();
    assert_eq!(opened.records_scanned, 200);
    for round in 1..=5u8 {
        for i in 0..10u8 {
            change(&lsg, "v", i, Some(&[round; 30]));
        }
        lsg.audit().flush().expect("flush");
        let before = view.volume("v").expect("volume").scan_stats();
        let files_before = primary.image();
        view.catch_up().expect("catch up");
        assert!(
            files_before == primary.image(),
            "round {round}: a catch-up changed a byte"
        );
        let after = view.volume("v").expect("volume").scan_stats();
        assert_eq!(
            after.records_scanned - before.records_scanned,
            10,
            "round {round}: a catch-up reads the new records only"
        );
        assert_eq!(view.audit().next_lsn(), lsg.audit().next_lsn());
        let seen = view
            .volume("v")
            .expect("volume")
            .get(&[3])
            .expect("get")
            .expect("present");
        assert_eq!(seen.value, vec![round; 30]);
        let last = view
            .audit()
            .reader(Lsn(lsg.audit().next_lsn().0 - 1))
            .expect("reader")
            .next()
            .expect("the newest record")
            .expect("record");
        let mut want = vec![9];
        want.extend([round; 30]);
        assert_eq!(last.payload, want);
    }
    // A checkpoint moves past the tentative records: they are read once more, as durable.
    v.flush(lsg.audit().flush().expect("flush"))
        .expect("checkpoint");
    let before = view.volume("v").expect("volume").scan_stats();
    view.catch_up().expect("catch up");
    let after = view.volume("v").expect("volume").scan_stats();
    assert_eq!(after.records_scanned - before.records_scanned, 50);
    assert_eq!(
        view.volume("v").expect("volume").checkpoint_lsn(),
        lsg.audit().durable_lsn()
    );
    // Nothing new: nothing read.
    view.catch_up().expect("catch up");
    assert_eq!(view.volume("v").expect("volume").scan_stats(), after);
}

/// The owner's writes are caught in the act: a record half written at the tail of a volume
/// and of the trail stops the catch-up there, with no error and nothing taken from it; once
/// the owner writes the record whole, the next catch-up takes it.
#[test]
fn a_catch_up_stops_cleanly_at_a_record_being_written() {
    let primary = SimStore::new(6);
    let mut lsg = LogStorageGroup::create_in_with(
        primary.clone(),
        LsgId(1),
        config(),
        LsgOptions::deterministic(),
    )
    .expect("create");
    let v = lsg.create_volume("v").expect("volume");
    change(&lsg, "v", 1, Some(&[0xAB; 200]));
    lsg.audit().flush().expect("flush");
    let backup = primary.another_process();
    let mut view = open(&backup, OpenMode::ReadOnly).expect("read-only open");
    assert_eq!(view.volume("v").expect("volume").len(), 1);

    // Where the owner writes next: just after the last non-zero byte, 8-aligned.
    let tail_of = |name: &str| {
        let image = primary.image();
        let bytes = &image[name].current;
        let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        (end as u64).next_multiple_of(8)
    };
    let segment = "volumes/v/0000000000000001.seg";
    let trail = "audit/0000000000000001.seg";
    let (volume_tail, trail_tail) = (tail_of(segment), tail_of(trail));
    // The first 40 bytes of a record of 300: a header and part of its payload.
    let mut half = Vec::new();
    duplex_lsg::record::encode_into(
        &mut half,
        Lsn(2),
        RecordType::VolumePut,
        RecordFlags::NONE,
        &[0xCD; 300],
    );
    half.truncate(40);
    primary
        .open(segment)
        .expect("open")
        .write_at(volume_tail, &half)
        .expect("write");
    primary
        .open(trail)
        .expect("open")
        .write_at(trail_tail, &half)
        .expect("write");
    view.catch_up().expect("a record being written is no error");
    assert_eq!(view.audit().next_lsn(), Lsn(2));
    assert_eq!(view.volume("v").expect("volume").len(), 1);

    // The owner writes its records over the half ones.
    change(&lsg, "v", 2, Some(&[0xEF; 300]));
    lsg.audit().flush().expect("flush");
    view.catch_up().expect("catch up");
    assert_eq!(view.audit().next_lsn(), Lsn(3));
    let got = view
        .volume("v")
        .expect("volume")
        .get(&[2])
        .expect("get")
        .expect("present");
    assert_eq!((got.value, got.lsn), (vec![0xEF; 300], Lsn(2)));
    drop(v);
}

/// Adopting while the owner lives is refused with `OwnedBy`, and the backup keeps its view:
/// it catches up and adopts once the owner is gone. Handles taken before the adoption answer
/// `Failed`; the adopted LSG's handles write.
#[test]
fn a_refused_adoption_keeps_the_view_for_a_later_one() {
    let primary = SimStore::new(7);
    let mut lsg = LogStorageGroup::create_in_with(
        primary.clone(),
        LsgId(1),
        config(),
        LsgOptions::deterministic(),
    )
    .expect("create");
    lsg.create_volume("v").expect("volume");
    change(&lsg, "v", 1, Some(b"one"));
    lsg.audit().flush().expect("flush");
    let backup = primary.another_process();
    let mut view = open(&backup, OpenMode::ReadOnly).expect("read-only open");
    let e = view
        .adopt_for_write_in(backup.clone(), OpenMode::Write)
        .expect_err("the owner lives");
    assert!(matches!(e, LsgError::OwnedBy { epoch: 1, .. }), "{e}");
    assert_eq!(view.mode(), OpenMode::ReadOnly);
    let e = view
        .adopt_for_write_in(backup.clone(), OpenMode::ReadOnly)
        .expect_err("not a writing mode");
    assert!(matches!(e, LsgError::WrongMode { .. }), "{e}");

    change(&lsg, "v", 2, Some(b"two"));
    lsg.audit().flush().expect("flush");
    view.catch_up().expect("catch up");
    let before = view.volume("v").expect("volume");
    assert_eq!(before.len(), 2);
    drop(lsg);
    primary.kill_process();
    view.adopt_for_write_in(backup.clone(), OpenMode::Write)
        .expect("adopt");
    assert_eq!(view.owner_epoch().0, 2);
    let e = before.get(&[1]).expect_err("a handle of the read-only LSG");
    assert!(matches!(e, LsgError::Failed(_)), "{e}");
    let v = view.volume("v").expect("volume");
    assert_eq!(v.get(&[2]).expect("get").expect("present").value, b"two");
    let lsn = view
        .audit()
        .append(RecordType::Update, RecordFlags::NONE, b"three")
        .expect("append");
    assert!(v.put(&[3], b"three", lsn).expect("put"));
    v.flush(view.audit().flush().expect("flush"))
        .expect("flush");
    assert!(
        view.adopt_for_write_in(backup.clone(), OpenMode::Write)
            .is_err(),
        "an owner adopts nothing"
    );
    drop((v, before, view));
    primary.power_loss();
    let lsg = open(&primary, OpenMode::Write).expect("reopen");
    assert_eq!(
        lsg.volume("v")
            .expect("volume")
            .get(&[3])
            .expect("get")
            .expect("present")
            .value,
        b"three"
    );
}

/// On real files: the backup reads with `pread` through read-only descriptors, and the adopted
/// owner writes the tail, new segments, checkpoints and the trail through its own.
#[test]
fn a_warm_backup_on_files_adopts_and_writes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LsgConfig {
        volume_segment_bytes: 64 << 10,
        ..config()
    };
    let mut owner = LogStorageGroup::create(dir.path(), LsgId(9), config).expect("create");
    let v = owner.create_volume("v").expect("volume");
    let put = |lsg: &LogStorageGroup<FileStore>, v: &duplex_lsg::DataVolume<FileStore>, i: u32| {
        let lsn = lsg
            .audit()
            .append(RecordType::Update, RecordFlags::NONE, &i.to_le_bytes())
            .expect("append");
        v.put(&i.to_be_bytes(), &[i as u8; 300], lsn).expect("put");
    };
    for i in 0..300 {
        put(&owner, &v, i);
    }
    v.flush(owner.audit().flush().expect("flush"))
        .expect("checkpoint");
    let mut backup =
        LogStorageGroup::open(dir.path(), config, OpenMode::ReadOnly).expect("read-only");
    for i in 300..400 {
        put(&owner, &v, i);
    }
    owner.audit().flush().expect("flush");
    backup.catch_up().expect("catch up");
    assert_eq!(backup.volume("v").expect("volume").len(), 400);
    // The owner's process ends: its lock goes with its descriptors.
    drop(v);
    drop(owner);
    backup.adopt_for_write(OpenMode::Write).expect("adopt");
    let v = backup.volume("v").expect("volume");
    for i in 400..800 {
        put(&backup, &v, i);
    }
    v.flush(backup.audit().flush().expect("flush"))
        .expect("checkpoint");
    assert!(
        v.stats().segments > 2,
        "the adopted owner made new segments"
    );
    v.compact().expect("compact");
    drop(v);
    drop(backup);
    let lsg = LogStorageGroup::open(dir.path(), config, OpenMode::Write).expect("reopen");
    let v = lsg.volume("v").expect("volume");
    assert_eq!(v.len(), 800);
    for i in [0u32, 299, 350, 399, 400, 799] {
        let got = v.get(&i.to_be_bytes()).expect("get").expect("present");
        assert_eq!(got.value, vec![i as u8; 300], "key {i}");
    }
    assert_eq!(lsg.owner_epoch().0, 3);
}

/// A new owner may cut records that a view read past the checkpoint and write others in their
/// place: here the audit records of the view's last changes vanish (as a failed flush's scrub
/// leaves it; the volume records stay), the owner restarts, cuts the volume where the trail
/// ends and writes other changes at the same places. The view notices the new owner by the
/// boot sequence and reads again from the checkpoint (the records' headers alone could not
/// tell it: the first one after the checkpoint is unchanged).
#[test]
fn a_view_reads_again_what_a_new_owner_may_have_cut() {
    let primary = SimStore::new(11);
    let mut lsg = LogStorageGroup::create_in_with(
        primary.clone(),
        LsgId(1),
        config(),
        LsgOptions::deterministic(),
    )
    .expect("create");
    lsg.create_volume("v").expect("volume");
    let payload = |key: u8, value: &[u8]| {
        let mut p = vec![key];
        p.extend_from_slice(value);
        p
    };
    for key in 1..=5u8 {
        change(&lsg, "v", key, Some(&[key; 50]));
    }
    lsg.audit().flush().expect("flush");
    let backup = primary.another_process();
    let mut view = open(&backup, OpenMode::ReadOnly).expect("read-only open");
    assert_eq!(view.volume("v").expect("volume").len(), 5);

    // The audit records of LSNs 3..=5 vanish from the page cache.
    drop(lsg);
    primary.kill_process();
    let record_bytes =
        |key: u8| duplex_lsg::record::encoded_len(payload(key, &[key; 50]).len()) as u64;
    let from = 4096 + record_bytes(1) + record_bytes(2);
    let to = from + (3..=5).map(record_bytes).sum::<u64>();
    primary
        .open("audit/0000000000000001.seg")
        .expect("open")
        .write_at(from, &vec![0; (to - from) as usize])
        .expect("zero");

    // The owner restarts: LSNs 3..=5 are given to other changes, written where the cut ones were.
    let lsg = open(&primary, OpenMode::Write).expect("restart");
    assert_eq!(lsg.audit().next_lsn(), Lsn(3));
    for key in 13..=15u8 {
        change(&lsg, "v", key, Some(&[key; 50]));
    }
    lsg.audit().flush().expect("flush");

    view.catch_up().expect("catch up");
    let fresh = open(&backup, OpenMode::ReadOnly).expect("fresh read-only open");
    assert_eq!(observe(&view), observe(&fresh));
    let v = view.volume("v").expect("volume");
    assert_eq!(v.get(&[3]).expect("get"), None, "a cut change is gone");
    assert_eq!(
        v.get(&[13]).expect("get").expect("present").lsn,
        Lsn(3),
        "the new owner's change at the same LSN"
    );
}

/// A bench note, not a check (timings vary by machine): run with
/// `cargo test -p duplex-lsg --release --test warm_adoption -- --ignored --nocapture`.
/// Times a takeover of a volume of files holding n records (plus 1000 after its checkpoint)
/// by a fresh open and by adopting a warm read-only view, for growing n.
#[test]
#[ignore]
fn bench_takeover_time_against_volume_size() {
    let config = LsgConfig {
        audit_segment_bytes: 16 << 20,
        volume_segment_bytes: 64 << 20,
        max_batch_bytes: 4 << 20,
        max_record_bytes: 64 << 10,
        max_key_bytes: 64,
        max_value_bytes: 1 << 10,
    };
    for records in [10_000u32, 100_000, 1_000_000] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut owner = LogStorageGroup::create(dir.path(), LsgId(1), config).expect("create");
        let v = owner.create_volume("v").expect("volume");
        let write = |lsg: &LogStorageGroup<FileStore>, i: u32| {
            let lsn = lsg
                .audit()
                .append(RecordType::Update, RecordFlags::NONE, &i.to_le_bytes())
                .expect("append");
            v.put(format!("key-{i:09}").as_bytes(), &[i as u8; 100], lsn)
                .expect("put");
        };
        for i in 0..records {
            write(&owner, i);
        }
        v.flush(owner.audit().flush().expect("flush"))
            .expect("checkpoint");
        let mut view =
            LogStorageGroup::open(dir.path(), config, OpenMode::ReadOnly).expect("read-only");
        for i in records..records + 1000 {
            write(&owner, i);
        }
        owner.audit().flush().expect("flush");
        view.catch_up().expect("catch up");
        drop(v);
        drop(owner);
        let copy = tempfile::tempdir().expect("tempdir");
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", dir.path().display()))
            .arg(copy.path())
            .status()
            .expect("cp");
        assert!(status.success());
        let started = std::time::Instant::now();
        view.adopt_for_write(OpenMode::Write).expect("adopt");
        let adopt = started.elapsed();
        let scanned = view
            .volume("v")
            .expect("volume")
            .scan_stats()
            .records_scanned;
        let started = std::time::Instant::now();
        let fresh = LogStorageGroup::open(copy.path(), config, OpenMode::Write).expect("open");
        let open = started.elapsed();
        let fresh_scanned = fresh
            .volume("v")
            .expect("volume")
            .scan_stats()
            .records_scanned;
        println!(
            "{records:>9} records + 1000 after the checkpoint: fresh open {open:>10.2?} ({fresh_scanned} records read), adoption {adopt:>10.2?} ({} read at adoption)",
            scanned - u64::from(records) - 1000
        );
    }
}

/// Adopting through a store of another LSG is refused, naming both ids, and changes nothing
/// there (its epoch stays) nor here (the view stays read-only).
#[test]
fn adopting_through_another_lsgs_store_is_refused() {
    let ours = SimStore::new(12);
    let theirs = SimStore::new(13);
    for (store, id) in [(&ours, 1), (&theirs, 2)] {
        let mut lsg =
            LogStorageGroup::create_in(store.clone(), LsgId(id), config()).expect("create");
        lsg.create_volume("v").expect("volume");
    }
    let mut view = open(&ours, OpenMode::ReadOnly).expect("read-only open");
    let e = view
        .adopt_for_write_in(theirs.clone(), OpenMode::Write)
        .expect_err("another LSG");
    assert!(e.to_string().contains("expected 1, found 2"), "{e}");
    assert_eq!(view.mode(), OpenMode::ReadOnly);
    let other = open(&theirs, OpenMode::Write).expect("its lock was let go");
    assert_eq!(other.owner_epoch().0, 2, "only this open raised its epoch");
    drop(other);
    view.adopt_for_write_in(ours.clone(), OpenMode::Write)
        .expect("adopt through our own store");
}
