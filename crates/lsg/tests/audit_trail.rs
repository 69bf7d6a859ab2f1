//! The audit trail on real files and on the simulated store: durability across crashes, group
//! flush with many appenders, torn tails, corruption, truncation and disk full.

use std::sync::Arc;

use duplex_lsg::{
    Corruption, LogStorageGroup, LsgConfig, LsgError, LsgId, Lsn, OpenMode, RecordFlags,
    RecordType, SimStore, Store,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Small segments and batches so rollover and the torn window are exercised by small tests.
fn small_config() -> LsgConfig {
    LsgConfig {
        audit_segment_bytes: 64 << 10,
        volume_segment_bytes: 64 << 10,
        max_batch_bytes: 8 << 10,
        max_record_bytes: 4 << 10,
        max_key_bytes: 64,
        max_value_bytes: 1 << 10,
    }
}

/// The payload every test writes for an LSN: its size and bytes follow from the LSN alone.
fn payload_for(lsn: u64, max: usize) -> Vec<u8> {
    let len = 8 + (lsn.wrapping_mul(2654435761) % (max as u64 - 8)) as usize;
    let mut p = lsn.to_le_bytes().to_vec();
    p.extend((0..len - 8).map(|i| (lsn as usize * 31 + i) as u8));
    p
}

/// Appends the records `lsns` (which must be the next LSNs) with [`payload_for`] payloads.
fn append_range<S: Store>(
    lsg: &LogStorageGroup<S>,
    lsns: std::ops::RangeInclusive<u64>,
    max: usize,
) {
    for lsn in lsns {
        let got = lsg
            .audit()
            .append(
                RecordType::Update,
                RecordFlags::NONE,
                &payload_for(lsn, max),
            )
            .expect("append");
        assert_eq!(got, Lsn(lsn));
    }
}

/// A trail on real files holding `records` durable records of [`payload_for`] payloads.
fn written_trail(config: LsgConfig, records: u64, max: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let lsg = LogStorageGroup::create(dir.path(), LsgId(1), config).expect("create");
    append_range(&lsg, 1..=records, max);
    lsg.audit().flush().expect("flush");
    dir
}

/// Offset of record `index` (from 0) in the bytes of the first segment.
fn record_offset(segment: &[u8], index: usize) -> usize {
    let mut at = 4096usize;
    for _ in 0..index {
        let len = u32::from_le_bytes(segment[at + 4..at + 8].try_into().expect("4")) as usize;
        at += (24 + len).next_multiple_of(8);
    }
    at
}

/// A trail of one record with a small preallocated spare, and a configuration with larger
/// segments and records to reopen it with.
fn trail_with_small_spare(seed: u64) -> (SimStore, LsgConfig) {
    let store = SimStore::new(seed);
    let small = small_config();
    let lsg = LogStorageGroup::create_in(store.clone(), LsgId(1), small).expect("create");
    lsg.audit().preallocate_next().expect("spare");
    append_range(&lsg, 1..=1, 10);
    lsg.audit().flush().expect("flush");
    let big = LsgConfig {
        audit_segment_bytes: 1 << 20,
        max_record_bytes: 200 << 10,
        max_batch_bytes: 256 << 10,
        ..small
    };
    (store, big)
}

fn read_all<S: Store>(lsg: &LogStorageGroup<S>) -> Vec<(u64, Vec<u8>)> {
    lsg.audit()
        .reader(Lsn(1))
        .expect("reader")
        .map(|r| {
            let r = r.expect("record");
            (r.lsn.0, r.payload)
        })
        .collect()
}

#[test]
fn appended_records_survive_reopen_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = small_config();
    {
        let lsg = LogStorageGroup::create(dir.path(), LsgId(1), config).expect("create");
        append_range(&lsg, 1..=500, 1000);
        assert_eq!(lsg.audit().flush().expect("flush"), Lsn(500));
    }
    let lsg = LogStorageGroup::open(dir.path(), config, OpenMode::Write).expect("open");
    assert_eq!(lsg.owner_epoch().0, 2);
    assert_eq!(lsg.audit().next_lsn(), Lsn(501));
    let records = read_all(&lsg);
    assert_eq!(records.len(), 500);
    for (lsn, payload) in records {
        assert_eq!(payload, payload_for(lsn, 1000), "payload of LSN {lsn}");
    }
    // The reader starts anywhere.
    let from_300: Vec<u64> = lsg
        .audit()
        .reader(Lsn(300))
        .expect("reader")
        .map(|r| r.expect("record").lsn.0)
        .collect();
    assert_eq!(from_300, (300..=500).collect::<Vec<_>>());
    let mut scanned = 0;
    let last = lsg
        .audit()
        .scan(Lsn(1), |v| {
            scanned += 1;
            assert_eq!(v.payload, payload_for(v.lsn.0, 1000).as_slice());
            std::ops::ControlFlow::Continue(())
        })
        .expect("scan");
    assert_eq!((scanned, last), (500, Some(Lsn(500))));
}

#[test]
fn the_communications_flag_and_type_are_kept() {
    let store = SimStore::new(3);
    let lsg = LogStorageGroup::create_in(store, LsgId(2), small_config()).expect("create");
    let a = lsg
        .audit()
        .append_durable(RecordType::Commit, RecordFlags::OUT_OF_COMMUNICATION, b"c")
        .expect("append");
    let r = lsg
        .audit()
        .reader(a)
        .expect("reader")
        .next()
        .expect("one")
        .expect("ok");
    assert_eq!(r.record_type, RecordType::Commit);
    assert!(r.flags.contains(RecordFlags::OUT_OF_COMMUNICATION));
}

#[test]
fn many_appenders_share_flushes_and_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = small_config();
    let lsg = Arc::new(LogStorageGroup::create(dir.path(), LsgId(1), config).expect("create"));
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let lsg = Arc::clone(&lsg);
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for i in 0..200u64 {
                    let body = [t.to_le_bytes(), i.to_le_bytes()].concat();
                    let lsn = lsg
                        .audit()
                        .append(RecordType::Update, RecordFlags::NONE, &body)
                        .expect("append");
                    lsg.audit().wait_durable(lsn).expect("durable");
                    assert!(lsg.audit().durable_lsn() >= lsn);
                    mine.push((lsn, body));
                }
                mine
            })
        })
        .collect();
    let mut expected: Vec<(u64, Vec<u8>)> = threads
        .into_iter()
        .flat_map(|h| h.join().expect("thread"))
        .map(|(l, b)| (l.0, b))
        .collect();
    expected.sort();
    let stats = lsg.audit().stats();
    assert!(
        stats.flushes < 1600,
        "1600 durable appends took {} flushes: no grouping",
        stats.flushes
    );
    drop(lsg);
    let lsg = LogStorageGroup::open(dir.path(), config, OpenMode::Write).expect("open");
    assert_eq!(read_all(&lsg), expected);
}

#[test]
fn a_torn_tail_is_cut_at_the_last_whole_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = small_config();
    let (tail_offset, segment) = {
        let lsg = LogStorageGroup::create(dir.path(), LsgId(1), config).expect("create");
        append_range(&lsg, 1..=20, 300);
        lsg.audit().flush().expect("flush");
        let seg = dir.path().join("audit/0000000000000001.seg");
        let bytes = std::fs::read(&seg).expect("read segment");
        let end = bytes.iter().rposition(|&b| b != 0).expect("data") + 1;
        (end, seg)
    };
    // A torn write: half a record header and some payload after the last whole record.
    let mut bytes = std::fs::read(&segment).expect("read");
    let torn_at = tail_offset.next_multiple_of(8);
    bytes[torn_at..torn_at + 40].copy_from_slice(&[0xAB; 40]);
    std::fs::write(&segment, &bytes).expect("write");
    let lsg = LogStorageGroup::open(dir.path(), config, OpenMode::Write).expect("open");
    assert_eq!(lsg.audit().next_lsn(), Lsn(21));
    assert_eq!(read_all(&lsg).len(), 20);
    // The garbage was zeroed: appending after the cut and reopening finds exactly our records.
    lsg.audit()
        .append_durable(RecordType::Commit, RecordFlags::NONE, b"after")
        .expect("append");
    drop(lsg);
    let lsg = LogStorageGroup::open(dir.path(), config, OpenMode::Write).expect("reopen");
    let records = read_all(&lsg);
    assert_eq!(records.len(), 21);
    assert_eq!(records[20].1, b"after");
}

#[test]
fn a_flipped_bit_inside_durable_data_is_reported_with_its_offset() {
    let config = small_config();
    let dir = written_trail(config, 100, 300);
    // Flip a bit in the payload of the third record: far more than one batch follows it.
    let segment = dir.path().join("audit/0000000000000001.seg");
    let mut bytes = std::fs::read(&segment).expect("read");
    let third = record_offset(&bytes, 2);
    bytes[third + 30] ^= 0x10;
    std::fs::write(&segment, &bytes).expect("write");
    match LogStorageGroup::open(dir.path(), config, OpenMode::Write) {
        Err(LsgError::Corrupt { path, offset, what }) => {
            assert_eq!(path, segment);
            assert_eq!(offset, third as u64);
            assert!(
                matches!(what, Corruption::ChecksumMismatch { .. }),
                "{what}"
            );
            let message = LsgError::Corrupt { path, offset, what }.to_string();
            assert!(message.contains(&format!("offset {third}")), "{message}");
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    // Read-only opening changes nothing and reports the same.
    assert!(matches!(
        LogStorageGroup::open(dir.path(), config, OpenMode::ReadOnly),
        Err(LsgError::Corrupt { .. })
    ));
}

#[test]
fn corruption_in_an_older_segment_is_reported_by_the_reader() {
    let config = small_config();
    let dir = written_trail(config, 600, 300);
    let segment = dir.path().join("audit/0000000000000001.seg");
    let mut bytes = std::fs::read(&segment).expect("read");
    bytes[20_000] ^= 0x01;
    std::fs::write(&segment, &bytes).expect("write");
    let lsg = LogStorageGroup::open(dir.path(), config, OpenMode::Write).expect("open");
    let err = lsg
        .audit()
        .reader(Lsn(1))
        .expect("reader")
        .find_map(Result::err)
        .expect("the reader must report the corruption");
    match err {
        LsgError::Corrupt { path, offset, .. } => {
            assert_eq!(path, segment);
            assert!(offset <= 20_000 && offset + 400 > 20_000, "offset {offset}");
        }
        other => panic!("expected corruption, got {other:?}"),
    }
}

#[test]
fn truncation_drops_whole_segments_below_an_lsn() {
    let store = SimStore::new(5);
    let lsg = LogStorageGroup::create_in(store.clone(), LsgId(1), small_config()).expect("create");
    append_range(&lsg, 1..=2000, 200);
    lsg.audit().flush().expect("flush");
    let removed = lsg.audit().truncate_below(Lsn(1500)).expect("truncate");
    assert!(removed > 0);
    let first = lsg.audit().first_lsn();
    assert!(
        first <= Lsn(1500) && first > Lsn(1),
        "first retained {first}"
    );
    assert!(matches!(
        lsg.audit().reader(Lsn(1)),
        Err(LsgError::LsnTruncated { .. })
    ));
    let n = lsg.audit().reader(first).expect("reader").count() as u64;
    assert_eq!(n, 2001 - first.0);
    drop(lsg);
    let lsg = LogStorageGroup::open_in(store, small_config(), OpenMode::Write).expect("reopen");
    assert_eq!(lsg.audit().first_lsn(), first);
    assert_eq!(lsg.audit().next_lsn(), Lsn(2001));
}

#[test]
fn disk_full_loses_nothing_and_recovers_when_space_returns() {
    let store = SimStore::new(9);
    let config = small_config();
    let lsg = LogStorageGroup::create_in(store.clone(), LsgId(1), config).expect("create");
    store.set_capacity_bytes(Some(0));
    let mut appended = 0u64;
    let mut failure = None;
    for lsn in 1..=2000u64 {
        lsg.audit()
            .append(
                RecordType::Update,
                RecordFlags::NONE,
                &payload_for(lsn, 200),
            )
            .expect("append");
        appended = lsn;
        if let Err(e) = lsg.audit().wait_durable(Lsn(lsn)) {
            failure = Some(e);
            break;
        }
    }
    let failure = failure.expect("the disk must fill up");
    assert!(failure.is_retriable(), "{failure}");
    assert!(failure.to_string().contains("disk full"), "{failure}");
    store.set_capacity_bytes(None);
    lsg.audit()
        .wait_durable(Lsn(appended))
        .expect("flush after space returns");
    let records = read_all(&lsg);
    assert_eq!(records.len() as u64, appended);
}

#[derive(Debug, Clone)]
enum Op {
    Append(usize),
    WaitDurable,
    Crash,
    /// The process dies during the `n`-th write of the next flush.
    CrashInFlush(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1usize..1500).prop_map(Op::Append),
        2 => Just(Op::WaitDurable),
        1 => Just(Op::Crash),
        1 => (1u64..4).prop_map(Op::CrashInFlush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever was acknowledged durable survives any crash; the log after recovery is a prefix
    /// of what was appended, never anything else.
    #[test]
    fn what_was_flushed_is_what_is_read_back(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..120)) {
        let store = SimStore::new(seed);
        let config = small_config();
        let mut lsg = LogStorageGroup::create_in(store.clone(), LsgId(7), config).expect("create");
        let mut appended: Vec<Vec<u8>> = Vec::new();
        let mut acked = 0usize;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for op in ops {
            match op {
                Op::Append(len) => {
                    let body: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                    let lsn = lsg.audit().append(RecordType::Update, RecordFlags::NONE, &body).expect("append");
                    prop_assert_eq!(lsn.0 as usize, appended.len() + 1);
                    appended.push(body);
                }
                Op::WaitDurable if !appended.is_empty() => {
                    lsg.audit().wait_durable(Lsn(appended.len() as u64)).expect("durable");
                    acked = appended.len();
                }
                Op::WaitDurable => {}
                Op::CrashInFlush(_) | Op::Crash => {
                    if let Op::CrashInFlush(n) = op {
                        store.crash_after_writes(n);
                        if !appended.is_empty() && lsg.audit().wait_durable(Lsn(appended.len() as u64)).is_ok() {
                            acked = appended.len();
                        }
                    }
                    drop(lsg);
                    store.power_loss();
                    lsg = LogStorageGroup::open_in(store.clone(), config, OpenMode::Write).expect("reopen");
                    let records: Vec<_> = lsg.audit().reader(Lsn(1)).expect("reader")
                        .map(|r| r.expect("record")).collect();
                    prop_assert!(records.len() >= acked, "lost acknowledged records: {} < {}", records.len(), acked);
                    for r in &records {
                        prop_assert_eq!(&r.payload, &appended[r.lsn.0 as usize - 1]);
                    }
                    appended.truncate(records.len());
                    acked = records.len();
                }
            }
        }
    }
}

#[test]
fn a_crash_inside_a_flush_tears_it_and_recovery_keeps_a_whole_prefix() {
    let config = small_config();
    let mut partial = 0;
    for seed in 0..50u64 {
        let store = SimStore::new(seed);
        let lsg = LogStorageGroup::create_in(store.clone(), LsgId(1), config).expect("create");
        append_range(&lsg, 1..=10, 600);
        lsg.audit().flush().expect("flush");
        append_range(&lsg, 11..=20, 600);
        store.crash_after_writes(1);
        assert!(matches!(lsg.audit().flush(), Err(LsgError::Crashed)));
        drop(lsg);
        store.power_loss();
        let lsg = LogStorageGroup::open_in(store.clone(), config, OpenMode::Write).expect("reopen");
        let records = read_all(&lsg);
        assert!(
            records.len() >= 10,
            "seed {seed}: acknowledged records lost"
        );
        for (lsn, payload) in &records {
            assert_eq!(payload, &payload_for(*lsn, 600), "seed {seed}");
        }
        if records.len() > 10 && records.len() < 20 {
            partial += 1;
        }
    }
    assert!(
        partial > 0,
        "no seed tore the flush: the crash model is not exercised"
    );
}

#[test]
fn a_zeroed_sector_inside_durable_data_is_corruption_not_a_tail() {
    let config = small_config();
    let dir = written_trail(config, 100, 300);
    // Lose the 512-byte sector holding the third record's header: far more than one flush
    // window of acknowledged records follows it.
    let segment = dir.path().join("audit/0000000000000001.seg");
    let mut bytes = std::fs::read(&segment).expect("read");
    let third = record_offset(&bytes, 2);
    let sector = third / 512 * 512;
    bytes[sector..sector + 512].fill(0);
    std::fs::write(&segment, &bytes).expect("write");
    match LogStorageGroup::open(dir.path(), config, OpenMode::Write) {
        Err(LsgError::Corrupt { path, offset, .. }) => {
            assert_eq!(path, segment);
            assert!(
                offset as usize >= sector && offset as usize <= third,
                "offset {offset}"
            );
        }
        other => panic!("expected corruption, got {other:?}"),
    }
}

#[test]
fn a_zeroed_segment_start_is_reported_where_the_records_stop() {
    let config = small_config();
    let dir = written_trail(config, 800, 300);
    let second = dir.path().join("audit/0000000000000002.seg");
    assert!(
        dir.path().join("audit/0000000000000004.seg").exists(),
        "want 4+ segments"
    );
    let mut bytes = std::fs::read(&second).expect("read");
    bytes[4096..4096 + 24].fill(0);
    std::fs::write(&second, &bytes).expect("write");
    let lsg = LogStorageGroup::open(dir.path(), config, OpenMode::Write).expect("open");
    let err = lsg
        .audit()
        .reader(Lsn(1))
        .expect("reader")
        .find_map(Result::err)
        .expect("the reader must not end silently");
    match err {
        LsgError::Corrupt { path, offset, .. } => {
            assert_eq!((path, offset), (second.clone(), 4096));
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    let scanned = lsg
        .audit()
        .scan(Lsn(1), |_| std::ops::ControlFlow::Continue(()));
    assert!(
        matches!(&scanned, Err(LsgError::Corrupt { path, offset: 4096, .. }) if *path == second),
        "{scanned:?}"
    );
}

#[test]
fn reopening_with_another_segment_size_keeps_each_segment_its_own() {
    let store = SimStore::new(11);
    let small = small_config();
    {
        let lsg = LogStorageGroup::create_in(store.clone(), LsgId(1), small).expect("create");
        append_range(&lsg, 1..=150, 300);
        lsg.audit().flush().expect("flush");
    }
    let larger = LsgConfig {
        audit_segment_bytes: 128 << 10,
        ..small
    };
    let lsg = LogStorageGroup::open_in(store.clone(), larger, OpenMode::Write).expect("reopen");
    append_range(&lsg, 151..=900, 300);
    lsg.audit().flush().expect("flush");
    assert_eq!(read_all(&lsg).len(), 900);
    drop(lsg);
    let lsg = LogStorageGroup::open_in(store, small, OpenMode::Write).expect("reopen smaller");
    let records = read_all(&lsg);
    assert_eq!(records.len(), 900);
    assert!(records.iter().all(|(lsn, p)| *p == payload_for(*lsn, 300)));
}

#[test]
fn an_opener_with_smaller_limits_still_reads_what_was_written() {
    let store = SimStore::new(12);
    let config = small_config();
    {
        let lsg = LogStorageGroup::create_in(store.clone(), LsgId(1), config).expect("create");
        append_range(&lsg, 1..=50, 4000);
        lsg.audit().flush().expect("flush");
    }
    let smaller = LsgConfig {
        max_record_bytes: 1 << 10,
        max_batch_bytes: 2 << 10,
        ..config
    };
    let lsg = LogStorageGroup::open_in(store.clone(), smaller, OpenMode::Write).expect("reopen");
    assert_eq!(lsg.config().max_record_bytes, config.max_record_bytes);
    let records = read_all(&lsg);
    assert_eq!(records.len(), 50);
    assert!(records.iter().all(|(lsn, p)| *p == payload_for(*lsn, 4000)));
}

#[test]
fn a_record_too_large_for_an_older_spare_segment_skips_it() {
    let (store, big) = trail_with_small_spare(10);
    let lsg = LogStorageGroup::open_in(store.clone(), big, OpenMode::Write).expect("open");
    append_range(&lsg, 2..=16, 4000);
    append_range(&lsg, 17..=17, 100 << 10);
    append_range(&lsg, 18..=18, 10);
    lsg.audit().flush().expect("flush");
    drop(lsg);
    let lsg = LogStorageGroup::open_in(store, big, OpenMode::Write).expect("reopen");
    let records = read_all(&lsg);
    assert_eq!(records.len(), 18);
}

#[test]
fn an_opener_with_a_larger_window_still_reports_corruption() {
    for larger in [false, true] {
        let store = SimStore::new(11);
        let small = small_config();
        {
            let lsg = LogStorageGroup::create_in(store.clone(), LsgId(1), small).expect("create");
            for _ in 0..40 {
                lsg.audit()
                    .append_durable(RecordType::Update, RecordFlags::NONE, &[3u8; 1000])
                    .expect("append");
            }
        }
        // Inside record 10: about 30 KiB of acknowledged records follow, several windows' worth.
        store
            .flip_bit("audit/0000000000000001.seg", 4096 + 9 * 1024 + 100, 0)
            .expect("flip");
        let config = if larger {
            LsgConfig {
                max_batch_bytes: 48 << 10,
                ..small
            }
        } else {
            small
        };
        let opened = LogStorageGroup::open_in(store, config, OpenMode::Write);
        assert!(
            matches!(opened, Err(LsgError::Corrupt { .. })),
            "larger window {larger}: {:?}",
            opened.map(|l| l.audit().next_lsn())
        );
    }
}

#[test]
fn truncation_takes_skipped_empty_segments_along() {
    let (store, big) = trail_with_small_spare(15);
    let lsg = LogStorageGroup::open_in(store.clone(), big, OpenMode::Write).expect("open");
    append_range(&lsg, 2..=16, 4000);
    // Too large for the small spare (segment 2): it goes to segment 3, leaving 2 empty.
    append_range(&lsg, 17..=17, 100 << 10);
    append_range(&lsg, 18..=400, 4000);
    lsg.audit().flush().expect("flush");
    assert!(lsg.audit().truncate_below(Lsn(300)).expect("truncate") >= 2);
    let first = lsg.audit().first_lsn();
    let from_zero: Vec<u64> = lsg
        .audit()
        .reader(Lsn(0))
        .expect("reader")
        .map(|r| r.expect("record").lsn.0)
        .collect();
    assert_eq!(from_zero.first().copied(), Some(first.0));
    assert_eq!(from_zero.last().copied(), Some(400));
    assert!(!store.exists("audit/0000000000000002.seg").expect("exists"));
    drop(lsg);
    let lsg = LogStorageGroup::open_in(store, big, OpenMode::Write).expect("reopen");
    assert_eq!(lsg.audit().first_lsn(), first);
}

/// A backup taking over holds a tail of the trail (from its checkpoints) that may overlap what
/// the trail already has: `append_at` writes exactly the records the trail lacks, each once.
#[test]
fn append_at_writes_only_the_records_the_trail_lacks() {
    let store = SimStore::new(21);
    let lsg = LogStorageGroup::create_in(store.clone(), LsgId(1), small_config()).expect("create");
    append_range(&lsg, 1..=10, 200);
    lsg.audit().flush().expect("flush");
    // The backup's copy of LSNs 8..=15: 8..=10 are already there, 11..=15 only it holds.
    let backup: Vec<(Lsn, Vec<u8>)> = (8..=15).map(|l| (Lsn(l), payload_for(l, 200))).collect();
    let mut written = Vec::new();
    for (lsn, payload) in &backup {
        match lsg
            .audit()
            .append_at(*lsn, RecordType::Update, RecordFlags::NONE, payload)
        {
            Ok(got) => {
                assert_eq!(got, *lsn);
                written.push(got.0);
            }
            Err(LsgError::UnexpectedLsn {
                path,
                expected,
                next,
            }) => {
                assert_eq!(expected, *lsn);
                assert_eq!(next, Lsn(11), "the trail's next LSN while 11 is missing");
                assert!(
                    path.ends_with("audit"),
                    "the error names the trail: {path:?}"
                );
            }
            Err(e) => panic!("append_at({lsn}): {e}"),
        }
    }
    assert_eq!(written, vec![11, 12, 13, 14, 15]);
    // A gap is refused too, and nothing is written by a refused call.
    let gap = lsg
        .audit()
        .append_at(Lsn(17), RecordType::Update, RecordFlags::NONE, b"x")
        .expect_err("a gap");
    let message = gap.to_string();
    assert!(
        message.contains("expected to give LSN 17")
            && message.contains("next LSN is 16")
            && message.contains("gap"),
        "{message}"
    );
    let again = lsg
        .audit()
        .append_at(Lsn(9), RecordType::Update, RecordFlags::NONE, b"x")
        .expect_err("present");
    assert!(
        again.to_string().contains("already in the trail"),
        "{again}"
    );
    assert_eq!(lsg.audit().next_lsn(), Lsn(16));
    lsg.audit().flush().expect("flush");
    drop(lsg);
    store.power_loss();
    let lsg = LogStorageGroup::open_in(store, small_config(), OpenMode::Write).expect("reopen");
    let read = read_all(&lsg);
    assert_eq!(
        read,
        (1..=15)
            .map(|l| (l, payload_for(l, 200)))
            .collect::<Vec<_>>(),
        "every LSN once, with the payload first written for it"
    );
}

/// Two takers racing to append the same LSN: exactly one of them writes it.
#[test]
fn append_at_gives_an_lsn_to_exactly_one_of_racing_appenders() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lsg =
        Arc::new(LogStorageGroup::create(dir.path(), LsgId(1), small_config()).expect("create"));
    for round in 0..50u64 {
        let lsn = Lsn(round + 1);
        let winners: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4u8)
                .map(|t| {
                    let lsg = Arc::clone(&lsg);
                    s.spawn(move || {
                        lsg.audit()
                            .append_at(lsn, RecordType::Update, RecordFlags::NONE, &[t; 16])
                            .is_ok()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("appender"))
                .collect()
        });
        assert_eq!(winners.iter().filter(|w| **w).count(), 1, "round {round}");
    }
    assert_eq!(lsg.audit().next_lsn(), Lsn(51));
    lsg.audit().flush().expect("flush");
    assert_eq!(read_all(&lsg).len(), 50);
}
