//! Data volumes: idempotent puts and deletes by generation, range scans, limits, and recovery
//! after a crash before and after a volume checkpoint.

use std::ops::Bound;

use duplex_lsg::{
    LogStorageGroup, LsgConfig, LsgError, LsgId, Lsn, OpenMode, RecordFlags, RecordType, SimStore,
    Store, StoreFile, VolumeRecord,
};

fn config() -> LsgConfig {
    LsgConfig {
        audit_segment_bytes: 64 << 10,
        volume_segment_bytes: 32 << 10,
        max_batch_bytes: 8 << 10,
        max_record_bytes: 4 << 10,
        max_key_bytes: 64,
        max_value_bytes: 1 << 10,
    }
}

/// Logs `n` durable audit records so that the changes of a test can use LSNs 1..=n (a change must
/// be logged before it is applied).
fn log_changes<S: Store>(lsg: &LogStorageGroup<S>, n: u64) {
    for _ in 0..n {
        lsg.audit()
            .append(RecordType::Update, RecordFlags::NONE, b"change")
            .expect("append");
    }
    lsg.audit().flush().expect("flush");
}

fn key(i: u32) -> Vec<u8> {
    format!("key-{i:06}").into_bytes()
}

#[test]
fn put_get_delete_scan_and_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut lsg = LogStorageGroup::create(dir.path(), LsgId(1), config()).expect("create");
        let v = lsg.create_volume("accounts").expect("volume");
        log_changes(&lsg, 3000);
        for i in 0..1000u32 {
            assert!(
                v.put(
                    &key(i),
                    &vec![i as u8; 100 + (i as usize % 200)],
                    Lsn(i as u64 + 1)
                )
                .expect("put")
            );
        }
        for i in (0..1000u32).step_by(3) {
            assert!(v.delete(&key(i), Lsn(2000 + i as u64)).expect("delete"));
        }
        assert_eq!(v.len(), 666);
        v.flush(Lsn(3000)).expect("flush");
    }
    let lsg = LogStorageGroup::open(dir.path(), config(), OpenMode::Write).expect("open");
    let v = lsg.volume("accounts").expect("volume");
    assert_eq!(v.len(), 666);
    assert_eq!(v.checkpoint_lsn(), Lsn(3000));
    let got = v.get(&key(1)).expect("get").expect("present");
    assert_eq!(
        got,
        VolumeRecord {
            key: key(1),
            value: vec![1; 101],
            lsn: Lsn(2)
        }
    );
    assert_eq!(v.get(&key(3)).expect("get"), None);
    assert_eq!(v.generation(&key(3)), Some(Lsn(2003)));
    let page = v
        .scan(
            (
                Bound::Included(key(10).as_slice()),
                Bound::Excluded(key(20).as_slice()),
            ),
            100,
        )
        .expect("scan");
    let keys: Vec<Vec<u8>> = page.iter().map(|r| r.key.clone()).collect();
    let expected: Vec<Vec<u8>> = (10..20).filter(|i| i % 3 != 0).map(key).collect();
    assert_eq!(keys, expected);
    assert_eq!(
        v.scan_range(..key(100).as_slice(), 5).expect("scan").len(),
        5
    );
    assert!(matches!(
        lsg.volume("nope"),
        Err(LsgError::UnknownVolume { .. })
    ));
}

#[test]
fn redo_is_idempotent_by_generation() {
    let mut lsg = LogStorageGroup::create_in(SimStore::new(1), LsgId(1), config()).expect("create");
    let v = lsg.create_volume("v").expect("volume");
    log_changes(&lsg, 20);
    assert!(v.put(b"k", b"new", Lsn(10)).expect("put"));
    assert!(!v.put(b"k", b"old", Lsn(9)).expect("older put is skipped"));
    assert!(
        !v.put(b"k", b"same", Lsn(10))
            .expect("replayed put is skipped")
    );
    assert!(v.delete(b"k", Lsn(11)).expect("delete"));
    assert!(
        !v.put(b"k", b"resurrect", Lsn(10))
            .expect("put older than the delete is skipped")
    );
    assert_eq!(v.get(b"k").expect("get"), None);
}

#[test]
fn oversized_keys_and_values_are_clear_errors() {
    let mut lsg = LogStorageGroup::create_in(SimStore::new(1), LsgId(1), config()).expect("create");
    let v = lsg.create_volume("v").expect("volume");
    log_changes(&lsg, 1);
    let e = v.put(&[0; 65], b"x", Lsn(1)).expect_err("key too large");
    assert!(
        matches!(
            e,
            LsgError::KeyTooLarge {
                length: 65,
                limit: 64
            }
        ),
        "{e}"
    );
    let e = v
        .put(b"k", &[0; 1025], Lsn(1))
        .expect_err("value too large");
    assert!(
        matches!(
            e,
            LsgError::ValueTooLarge {
                length: 1025,
                limit: 1024
            }
        ),
        "{e}"
    );
    assert!(v.is_empty());
    assert!(matches!(
        lsg.create_volume("../x"),
        Err(LsgError::InvalidName { .. })
    ));
}

#[test]
fn a_crash_keeps_the_checkpointed_volume_and_cuts_what_tore_after_it() {
    for seed in 0..40u64 {
        let store = SimStore::new(seed);
        {
            let mut lsg =
                LogStorageGroup::create_in(store.clone(), LsgId(1), config()).expect("create");
            let v = lsg.create_volume("v").expect("volume");
            log_changes(&lsg, 400);
            for i in 0..300u32 {
                v.put(&key(i), &[7; 300], Lsn(i as u64 + 1)).expect("put");
            }
            v.flush(Lsn(300)).expect("flush");
            store.crash_after_writes(1 + seed % 5);
            for i in 300..400u32 {
                if v.put(&key(i), &[8; 300], Lsn(i as u64 + 1)).is_err() {
                    break;
                }
            }
        }
        store.power_loss();
        let lsg =
            LogStorageGroup::open_in(store.clone(), config(), OpenMode::Write).expect("reopen");
        let v = lsg.volume("v").expect("volume");
        assert_eq!(v.checkpoint_lsn(), Lsn(300), "seed {seed}");
        for i in 0..300u32 {
            let r = v
                .get(&key(i))
                .expect("get")
                .unwrap_or_else(|| panic!("seed {seed}: key {i} lost"));
            assert_eq!(r.value, vec![7; 300]);
        }
        // Redo from the checkpoint restores the rest, skipping what survived.
        for i in 300..400u32 {
            v.put(&key(i), &[8; 300], Lsn(i as u64 + 1)).expect("redo");
        }
        assert_eq!(v.len(), 400);
    }
}

#[test]
fn corruption_before_the_checkpoint_is_reported() {
    let store = checkpointed_volume(4, 20, &[1; 100]);
    store
        .flip_bit("volumes/v/0000000000000001.seg", 4096 + 500, 2)
        .expect("flip");
    match LogStorageGroup::open_in(store, config(), OpenMode::Write) {
        Err(LsgError::Corrupt { path, offset, .. }) => {
            assert!(
                path.ends_with("volumes/v/0000000000000001.seg"),
                "{}",
                path.display()
            );
            assert!(offset <= 4096 + 500, "offset {offset}");
        }
        other => panic!("expected corruption, got {other:?}"),
    }
}

#[test]
fn a_change_must_be_logged_before_it_is_applied() {
    let mut lsg = LogStorageGroup::create_in(SimStore::new(2), LsgId(1), config()).expect("create");
    let v = lsg.create_volume("v").expect("volume");
    let e = v.put(b"k", b"v", Lsn(1)).expect_err("nothing logged yet");
    assert!(matches!(e, LsgError::LsnNotAppended { .. }), "{e}");
    let e = v.delete(b"k", Lsn(0)).expect_err("LSN 0 is never a change");
    assert!(matches!(e, LsgError::LsnNotAppended { .. }), "{e}");
}

/// The page cache may write a volume page before the change's audit record is durable; if the
/// process then dies and the record is lost, the change must vanish from the volume too.
#[test]
fn a_change_whose_audit_record_was_lost_does_not_survive() {
    let store = SimStore::new(3);
    {
        let mut lsg =
            LogStorageGroup::create_in(store.clone(), LsgId(1), config()).expect("create");
        let v = lsg.create_volume("v").expect("volume");
        log_changes(&lsg, 1);
        v.put(b"kept", b"durable", Lsn(1)).expect("put");
        v.flush(Lsn(1)).expect("flush");
        let lsn = lsg
            .audit()
            .append(RecordType::Update, RecordFlags::NONE, b"not yet durable")
            .expect("append");
        v.put(b"phantom", b"lost", lsn).expect("put");
        store
            .write_back("volumes/v/0000000000000001.seg")
            .expect("writeback");
    }
    store.power_loss();
    let lsg = LogStorageGroup::open_in(store, config(), OpenMode::Write).expect("reopen");
    assert_eq!(lsg.audit().next_lsn(), Lsn(2));
    let v = lsg.volume("v").expect("volume");
    assert_eq!(v.get(b"phantom").expect("get"), None);
    assert_eq!(
        v.get(b"kept").expect("get").expect("kept").value,
        b"durable"
    );
    // The LSN is given out again, to a real change, which the volume accepts.
    log_changes(&lsg, 1);
    assert!(v.put(b"phantom", b"real", Lsn(2)).expect("put"));
}

#[test]
fn a_missing_volume_segment_is_reported() {
    let store = checkpointed_volume(6, 300, &[5; 300]);
    store
        .remove("volumes/v/0000000000000002.seg")
        .expect("remove");
    match LogStorageGroup::open_in(store, config(), OpenMode::Write) {
        Err(LsgError::Missing { path, .. }) => {
            assert!(
                path.ends_with("volumes/v/0000000000000002.seg"),
                "{}",
                path.display()
            );
        }
        other => panic!("expected a missing segment, got {other:?}"),
    }
}

#[test]
fn compaction_reclaims_overwritten_records_and_keeps_every_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let expected: Vec<(Vec<u8>, Vec<u8>)>;
    {
        let mut lsg = LogStorageGroup::create(dir.path(), LsgId(1), config()).expect("create");
        let v = lsg.create_volume("v").expect("volume");
        log_changes(&lsg, 3000);
        // 100 keys overwritten 20 times each, then a third of them deleted.
        for round in 0..20u32 {
            for i in 0..100u32 {
                let lsn = Lsn((round * 100 + i + 1) as u64);
                v.put(&key(i), &[round as u8; 200], lsn).expect("put");
            }
        }
        for i in (0..100u32).step_by(3) {
            v.delete(&key(i), Lsn(2001 + i as u64)).expect("delete");
        }
        v.flush(Lsn(3000)).expect("flush");
        let before = v.stats();
        assert!(before.segments > 3, "{before:?}");
        let done = v.compact().expect("compact");
        let after = v.stats();
        assert_eq!(done.bytes_before, before.written_bytes);
        assert_eq!(done.bytes_after, after.written_bytes);
        assert!(
            after.written_bytes * 10 < before.written_bytes,
            "{before:?} -> {after:?}"
        );
        assert_eq!(done.deletion_markers_dropped, 34);
        assert_eq!(after.live_keys, 66);
        expected = v
            .scan((Bound::Unbounded, Bound::Unbounded), 1000)
            .expect("scan")
            .into_iter()
            .map(|r| (r.key, r.value))
            .collect();
        assert_eq!(expected.len(), 66);
        assert!(expected.iter().all(|(_, value)| *value == vec![19u8; 200]));
        // Writing after a compaction works as before.
        v.put(&key(1), b"after", Lsn(2999)).expect("put");
        v.flush(Lsn(3000)).expect("flush");
    }
    let lsg = LogStorageGroup::open(dir.path(), config(), OpenMode::Write).expect("reopen");
    let v = lsg.volume("v").expect("volume");
    let got: Vec<(Vec<u8>, Vec<u8>)> = v
        .scan((Bound::Unbounded, Bound::Unbounded), 1000)
        .expect("scan")
        .into_iter()
        .map(|r| (r.key, r.value))
        .collect();
    let mut want = expected;
    want[0].1 = b"after".to_vec();
    assert_eq!(got[0].0, key(1));
    assert_eq!(got, want);
}

#[test]
fn a_crash_at_any_write_of_a_compaction_loses_nothing() {
    let mut points = 0;
    for crash_at in 1..60u64 {
        let store = SimStore::new(crash_at);
        let before;
        {
            let mut lsg =
                LogStorageGroup::create_in(store.clone(), LsgId(1), config()).expect("create");
            let v = lsg.create_volume("v").expect("volume");
            log_changes(&lsg, 600);
            for lsn in 1..=600u64 {
                let i = (lsn % 50) as u32;
                if lsn % 7 == 0 {
                    v.delete(&key(i), Lsn(lsn)).expect("delete");
                } else {
                    v.put(&key(i), &[lsn as u8; 150], Lsn(lsn)).expect("put");
                }
            }
            v.flush(Lsn(600)).expect("flush");
            before = v
                .scan((Bound::Unbounded, Bound::Unbounded), 1000)
                .expect("scan");
            store.crash_after_writes(crash_at);
            if v.compact().is_ok() {
                continue;
            }
            points += 1;
        }
        store.power_loss();
        let lsg = LogStorageGroup::open_in(store, config(), OpenMode::Write).expect("reopen");
        let v = lsg.volume("v").expect("volume");
        let after = v
            .scan((Bound::Unbounded, Bound::Unbounded), 1000)
            .expect("scan");
        assert_eq!(after, before, "crash at write {crash_at}");
    }
    assert!(
        points > 20,
        "only {points} crash points fell inside the compaction"
    );
}

/// A simulated LSG whose volume "v" holds `keys` keys, each changed once at LSNs 1..=keys, all
/// logged and checkpointed.
fn checkpointed_volume(seed: u64, keys: u32, value: &[u8]) -> SimStore {
    let store = SimStore::new(seed);
    let mut lsg = LogStorageGroup::create_in(store.clone(), LsgId(1), config()).expect("create");
    let v = lsg.create_volume("v").expect("volume");
    log_changes(&lsg, keys as u64);
    for i in 0..keys {
        v.put(&key(i), value, Lsn(i as u64 + 1)).expect("put");
    }
    v.flush(Lsn(keys as u64)).expect("flush");
    store
}

/// Bytes the store holds now: to leave room for exactly one more volume segment.
fn used_bytes(store: &SimStore) -> u64 {
    let mut names: Vec<String> = vec!["MANIFEST".into(), "volumes/v/CHECKPOINT".into()];
    for dir in ["volumes/v", "audit"] {
        for n in store.list(dir).expect("list") {
            if n.ends_with(".seg") {
                names.push(format!("{dir}/{n}"));
            }
        }
    }
    names
        .iter()
        .map(|n| store.open(n).expect("open").len_bytes())
        .sum()
}

#[test]
fn a_compaction_that_fails_half_way_changes_nothing() {
    let store = SimStore::new(7);
    let mut lsg = LogStorageGroup::create_in(store.clone(), LsgId(1), config()).expect("create");
    let v = lsg.create_volume("v").expect("volume");
    log_changes(&lsg, 200);
    for i in 0..200u32 {
        v.put(&key(i), &[i as u8; 500], Lsn(i as u64 + 1))
            .expect("put");
    }
    v.flush(Lsn(200)).expect("flush");
    store.set_capacity_bytes(Some(used_bytes(&store) + (32 << 10)));
    let e = v.compact().expect_err("the disk fills up");
    assert!(matches!(e, LsgError::DiskFull { .. }), "{e}");
    for i in 0..200u32 {
        let r = v.get(&key(i)).expect("get");
        assert_eq!(r.map(|r| r.value), Some(vec![i as u8; 500]), "key {i}");
    }
    store.set_capacity_bytes(None);
    v.compact().expect("compact once space returns");
    drop(v);
    drop(lsg);
    store.power_loss();
    let lsg = LogStorageGroup::open_in(store, config(), OpenMode::Write).expect("reopen");
    let v = lsg.volume("v").expect("volume");
    for i in 0..200u32 {
        assert!(v.get(&key(i)).expect("get").is_some(), "key {i} lost");
    }
}

#[test]
fn a_lost_end_of_a_segment_before_the_checkpoint_is_reported() {
    let store = checkpointed_volume(9, 100, &[1; 500]);
    // Zero segment 1 from its last record on (end marker included): a lost write.
    let name = "volumes/v/0000000000000001.seg";
    let f = store.open(name).expect("open");
    let mut bytes = vec![0u8; f.len_bytes() as usize];
    f.read_at(0, &mut bytes).expect("read");
    let end = bytes.iter().rposition(|&b| b != 0).expect("data") + 1;
    let record = duplex_lsg::record::encoded_len(2 + 10 + 500);
    let start = end.next_multiple_of(8) - 24 - record;
    for (offset, byte) in bytes.iter().enumerate().take(end).skip(start) {
        for bit in 0..8 {
            if byte & (1 << bit) != 0 {
                store.flip_bit(name, offset as u64, bit).expect("flip");
            }
        }
    }
    match LogStorageGroup::open_in(store, config(), OpenMode::ReadOnly) {
        Err(LsgError::Corrupt { path, offset, .. }) => {
            assert!(path.ends_with(name), "{}", path.display());
            assert_eq!(offset as usize, start);
        }
        other => panic!("expected corruption, got {other:?}"),
    }
}

#[test]
fn an_unfinished_volume_creation_is_ignored_and_can_be_redone() {
    let store = SimStore::new(13);
    drop(LogStorageGroup::create_in(store.clone(), LsgId(1), config()).expect("create"));
    // A crash after the volume's first segment but before its checkpoint file.
    store.create_dir("volumes/half").expect("dir");
    store
        .create(
            "volumes/half/0000000000000001.seg",
            &[7u8; 64],
            32 << 10,
            false,
        )
        .expect("segment");
    let mut lsg = LogStorageGroup::open_in(store, config(), OpenMode::Write).expect("open");
    assert!(matches!(
        lsg.volume("half"),
        Err(LsgError::UnknownVolume { .. })
    ));
    let v = lsg.create_volume("half").expect("create again");
    assert!(v.is_empty());
}

#[test]
fn a_missing_checkpoint_segment_is_reported() {
    let store = checkpointed_volume(14, 300, &[5; 300]);
    let segments = store.list("volumes/v").expect("list");
    let last = segments
        .iter()
        .filter(|n| n.ends_with(".seg"))
        .max()
        .expect("segments")
        .clone();
    store.remove(&format!("volumes/v/{last}")).expect("remove");
    match LogStorageGroup::open_in(store, config(), OpenMode::Write) {
        Err(LsgError::Missing { path, .. }) => assert!(path.ends_with(&last), "{}", path.display()),
        other => panic!("expected the checkpoint's segment to be missing, got {other:?}"),
    }
}

#[test]
fn a_segment_too_small_for_a_record_and_its_end_marker_is_refused() {
    let tight = LsgConfig {
        volume_segment_bytes: 4096 + duplex_lsg::record::encoded_len(2 + 64 + 1024) as u64,
        ..config()
    };
    let e = tight.validate().expect_err("no room for the end marker");
    assert!(matches!(e, LsgError::InvalidConfig(_)), "{e}");
    let roomy = LsgConfig {
        volume_segment_bytes: tight.volume_segment_bytes + 24,
        ..tight
    };
    roomy
        .validate()
        .expect("room for one record and the marker");
}

type Change = (Vec<u8>, Option<Vec<u8>>, Lsn);
/// What a refused batch must fail with.
type ErrorCheck = fn(&LsgError) -> bool;

fn everything<S: Store>(v: &duplex_lsg::DataVolume<S>) -> Vec<VolumeRecord> {
    v.scan((Bound::Unbounded, Bound::Unbounded), usize::MAX)
        .expect("scan")
}

/// A batch of redo applies exactly what the same changes applied one by one with put/delete
/// apply, skipping by generation the same way, and survives a reopen.
#[test]
fn apply_redo_applies_a_batch_like_single_changes_would() {
    use rand::{Rng, SeedableRng};
    for seed in 0..20u64 {
        eprintln!("seed {seed}");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let store = SimStore::new(seed);
        let mut lsg =
            LogStorageGroup::create_in(store.clone(), LsgId(1), config()).expect("create");
        let batched = lsg.create_volume("batched").expect("volume");
        let single = lsg.create_volume("single").expect("volume");
        log_changes(&lsg, 400);
        for round in 0..6 {
            // Changes out of LSN order, with repeats and older generations, as a redo may bring.
            let changes: Vec<Change> = (0..rng.random_range(1..120))
                .map(|_| {
                    let key = vec![b'k', rng.random_range(0..40u8)];
                    let value = rng
                        .random_bool(0.8)
                        .then(|| vec![rng.random::<u8>(); rng.random_range(0..300)]);
                    (key, value, Lsn(rng.random_range(1..=400)))
                })
                .collect();
            let mut expected = 0;
            for (key, value, lsn) in &changes {
                let written = match value {
                    Some(value) => single.put(key, value, *lsn),
                    None => single.delete(key, *lsn),
                }
                .expect("single change");
                expected += usize::from(written);
            }
            let applied = batched.apply_redo(changes.clone()).expect("apply_redo");
            assert_eq!(
                applied, expected,
                "seed {seed} round {round}: applied count"
            );
            assert_eq!(
                batched.apply_redo(changes).expect("again"),
                0,
                "seed {seed} round {round}: a batch redone is all skipped"
            );
            assert_eq!(
                everything(&batched),
                everything(&single),
                "seed {seed} round {round}"
            );
            assert_eq!(batched.stats().live_bytes, single.stats().live_bytes);
        }
        let last = lsg.audit().flush().expect("flush");
        batched.flush(last).expect("flush batched");
        let before = everything(&batched);
        drop((batched, single, lsg));
        store.power_loss();
        let lsg = LogStorageGroup::open_in(store, config(), OpenMode::Write).expect("reopen");
        let batched = lsg.volume("batched").expect("volume");
        assert_eq!(
            everything(&batched),
            before,
            "seed {seed}: after a power loss"
        );
    }
}

/// Every change of a batch passes the checks of put and delete before any is written: one bad
/// change (too large, not yet logged) and the whole batch is refused, nothing written.
#[test]
fn apply_redo_checks_every_change_before_writing_any() {
    let mut lsg = LogStorageGroup::create_in(SimStore::new(3), LsgId(1), config()).expect("create");
    let v = lsg.create_volume("v").expect("volume");
    log_changes(&lsg, 10);
    let good = |i: u8| (vec![i], Some(vec![i; 8]), Lsn(u64::from(i) + 1));
    let cases: Vec<(Change, ErrorCheck)> = vec![
        ((vec![0; 65], None, Lsn(5)), |e| {
            matches!(e, LsgError::KeyTooLarge { length: 65, .. })
        }),
        ((b"k".to_vec(), Some(vec![0; 1025]), Lsn(5)), |e| {
            matches!(e, LsgError::ValueTooLarge { length: 1025, .. })
        }),
        ((b"k".to_vec(), None, Lsn(11)), |e| {
            matches!(
                e,
                LsgError::LsnNotAppended {
                    lsn: Lsn(11),
                    next: Lsn(11)
                }
            )
        }),
        ((b"k".to_vec(), None, Lsn(0)), |e| {
            matches!(e, LsgError::LsnNotAppended { lsn: Lsn(0), .. })
        }),
    ];
    for (bad, is_expected) in cases {
        let batch = vec![good(1), good(2), bad.clone(), good(3)];
        let e = v.apply_redo(batch).expect_err("a bad change");
        assert!(is_expected(&e), "{bad:?}: {e}");
        assert_eq!(v.stats().written_bytes, 0, "{bad:?}: nothing written");
        assert_eq!(v.generation(&[1]), None);
    }
    assert_eq!(
        v.apply_redo(vec![good(1), good(2), good(3)]).expect("good"),
        3
    );
    assert_eq!(v.len(), 3);
    drop(v);
    drop(lsg);
    // A read-only volume takes no redo.
    let store = SimStore::new(4);
    let mut lsg = LogStorageGroup::create_in(store.clone(), LsgId(1), config()).expect("create");
    lsg.create_volume("v").expect("volume");
    drop(lsg);
    let lsg = LogStorageGroup::open_in(store, config(), OpenMode::ReadOnly).expect("open");
    let e = lsg
        .volume("v")
        .expect("volume")
        .apply_redo(vec![good(1)])
        .expect_err("read-only");
    assert!(matches!(e, LsgError::ReadOnly { .. }), "{e}");
}

#[test]
fn an_inverted_or_empty_range_scans_nothing_instead_of_panicking() {
    let mut lsg = LogStorageGroup::create_in(SimStore::new(3), LsgId(1), config()).expect("create");
    let v = lsg.create_volume("v").expect("volume");
    log_changes(&lsg, 3);
    for i in 0..3u32 {
        v.put(&key(i), b"x", Lsn(i as u64 + 1)).expect("put");
    }
    let (a, b) = (key(2), key(0));
    for range in [
        (Bound::Included(a.as_slice()), Bound::Included(b.as_slice())),
        (Bound::Excluded(b.as_slice()), Bound::Excluded(b.as_slice())),
        (Bound::Included(b.as_slice()), Bound::Excluded(b.as_slice())),
        (Bound::Excluded(a.as_slice()), Bound::Included(b.as_slice())),
    ] {
        assert_eq!(
            v.scan(range, 10).expect("scan"),
            Vec::<VolumeRecord>::new(),
            "{range:?}"
        );
    }
    let one = v
        .scan(
            (Bound::Included(b.as_slice()), Bound::Included(b.as_slice())),
            10,
        )
        .expect("scan");
    assert_eq!(one.len(), 1);
}
