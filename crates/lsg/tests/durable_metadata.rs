//! Metadata that must be as durable as the data: LSG creation is all or nothing, a file whose
//! name may not be durable is not written into, failed manifest and audit syncs are final and
//! leave nothing for the next owner to build on, and a media error during recovery is an error
//! that names the place, not a dead process.

use duplex_lsg::{
    LogStorageGroup, LsgConfig, LsgError, LsgId, Lsn, OpenMode, RecordFlags, RecordType, SimStore,
};

fn config() -> LsgConfig {
    LsgConfig {
        audit_segment_bytes: 64 << 10,
        volume_segment_bytes: 16 << 10,
        max_batch_bytes: 8 << 10,
        max_record_bytes: 4 << 10,
        max_key_bytes: 64,
        max_value_bytes: 1 << 10,
    }
}

const FIRST_SEGMENT: &str = "audit/0000000000000001.seg";

/// A full disk at every point of a creation (capacity 0, 4 KiB, 8 KiB, ...): each failed try
/// leaves no LSG, survives a power loss as no LSG, and a retry with space creates a whole one.
#[test]
fn a_creation_stopped_at_any_point_leaves_no_lsg_and_can_be_retried() {
    let mut failures = 0;
    for step in 0..64u64 {
        let store = SimStore::new(step);
        store.set_capacity_bytes(Some(step * 4096));
        let Err(e) = LogStorageGroup::create_in(store.clone(), LsgId(5), config()) else {
            break;
        };
        failures += 1;
        assert!(matches!(e, LsgError::DiskFull { .. }), "step {step}: {e}");
        store.power_loss();
        let missing = LogStorageGroup::open_in(store.clone(), config(), OpenMode::Write)
            .expect_err("no LSG after a failed creation");
        assert!(
            matches!(missing, LsgError::Missing { .. }),
            "step {step}: {missing}"
        );
        store.set_capacity_bytes(None);
        let lsg = LogStorageGroup::create_in(store.clone(), LsgId(5), config())
            .unwrap_or_else(|e| panic!("step {step}: retry failed: {e}"));
        lsg.audit()
            .append_durable(RecordType::Commit, RecordFlags::NONE, b"first")
            .expect("append");
        drop(lsg);
        store.power_loss();
        let lsg = LogStorageGroup::open_in(store.clone(), config(), OpenMode::Write)
            .expect("the retried LSG opens");
        assert_eq!(lsg.audit().next_lsn(), Lsn(2), "step {step}");
    }
    assert!(failures >= 3, "only {failures} creation steps failed");
}

/// A volume segment whose directory sync failed exists but may vanish in a power loss: the next
/// attempt makes its name durable before writing records into it.
#[test]
fn a_segment_whose_name_may_not_be_durable_is_synced_before_records_go_in() {
    let store = SimStore::new(3);
    let mut lsg = LogStorageGroup::create_in(store.clone(), LsgId(1), config()).expect("create");
    let v = lsg.create_volume("v").expect("volume");
    store.fail_entry_sync("volumes/v/0000000000000002.seg");
    let value = vec![7u8; 900];
    let mut failed = 0;
    let mut acked = Vec::new();
    for i in 0..40u32 {
        let key = format!("k{i:03}").into_bytes();
        let lsn = lsg
            .audit()
            .append_durable(RecordType::Update, RecordFlags::NONE, &key)
            .expect("append");
        match v.put(&key, &value, lsn) {
            Ok(_) => acked.push(key),
            Err(e) => {
                failed += 1;
                assert!(matches!(e, LsgError::Io { .. }), "{e}");
                v.put(&key, &value, lsn)
                    .expect("the retry uses the segment");
                acked.push(key);
            }
        }
    }
    assert_eq!(failed, 1, "the injected directory sync failure was not met");
    v.flush(Lsn(lsg.audit().next_lsn().0 - 1)).expect("flush");
    drop(v);
    drop(lsg);
    store.power_loss();
    let lsg = LogStorageGroup::open_in(store.clone(), config(), OpenMode::Write).expect("reopen");
    let v = lsg.volume("v").expect("volume");
    for key in &acked {
        assert_eq!(
            v.get(key).expect("get").map(|r| r.value),
            Some(value.clone()),
            "{}",
            String::from_utf8_lossy(key)
        );
    }
}

/// After a failed manifest sync the slot on disk may hold the old or the new value: nothing may
/// be written on top of either, so every later write fails.
#[test]
fn a_failed_manifest_sync_is_final() {
    let store = SimStore::new(4);
    let lsg = LogStorageGroup::create_in(store.clone(), LsgId(1), config()).expect("create");
    // Enough records for three segments, so truncation has something to do.
    let payload = vec![1u8; 4000];
    for _ in 0..40 {
        lsg.audit()
            .append_durable(RecordType::Update, RecordFlags::NONE, &payload)
            .expect("append");
    }
    store.fail_syncs("MANIFEST", 1);
    let e = lsg.audit().truncate_below(Lsn(30)).expect_err("sync fails");
    assert!(matches!(e, LsgError::Io { .. }), "{e}");
    let again = lsg.audit().truncate_below(Lsn(30)).expect_err("final");
    assert!(matches!(again, LsgError::Failed(_)), "{again}");
    let lsn = lsg
        .audit()
        .append(RecordType::Update, RecordFlags::NONE, b"after")
        .expect("append to memory");
    let flush = lsg
        .audit()
        .wait_durable(lsn)
        .expect_err("no flush after it");
    assert!(matches!(flush, LsgError::Failed(_)), "{flush}");
}

/// Records whose flush failed are not durable, yet the page cache may still show them; the next
/// owner must not recover them (and build on records that a power loss then takes away).
#[test]
fn records_of_a_failed_flush_are_not_recovered_by_the_next_owner() {
    let store = SimStore::new(5);
    let lsg = LogStorageGroup::create_in(store.clone(), LsgId(1), config()).expect("create");
    let acked = lsg
        .audit()
        .append_durable(RecordType::Commit, RecordFlags::NONE, b"acked")
        .expect("append");
    for _ in 0..3 {
        lsg.audit()
            .append(RecordType::Update, RecordFlags::NONE, b"never acknowledged")
            .expect("append");
    }
    store.fail_syncs(FIRST_SEGMENT, 1);
    lsg.audit().flush().expect_err("the sync fails");
    drop(lsg);
    store.kill_process();
    let lsg = LogStorageGroup::open_in(store.clone(), config(), OpenMode::Write).expect("reopen");
    assert_eq!(lsg.audit().next_lsn(), Lsn(acked.0 + 1));
    // The new owner builds on what it recovered; a power loss keeps all of it.
    let next = lsg
        .audit()
        .append_durable(RecordType::Commit, RecordFlags::NONE, b"next owner")
        .expect("append");
    drop(lsg);
    store.power_loss();
    let lsg = LogStorageGroup::open_in(store.clone(), config(), OpenMode::Write).expect("reopen");
    let payloads: Vec<Vec<u8>> = lsg
        .audit()
        .reader(Lsn(1))
        .expect("reader")
        .map(|r| r.expect("record").payload)
        .collect();
    assert_eq!(payloads, vec![b"acked".to_vec(), b"next owner".to_vec()]);
    assert_eq!(lsg.audit().next_lsn(), Lsn(next.0 + 1));
}

/// A media error where recovery reads (the tail of the audit trail, a volume's records) is a clear
/// error naming file and offset; read through a memory map it would kill the process (SIGBUS),
/// which the simulated store models as a panic.
#[test]
fn a_media_error_during_recovery_is_an_error_naming_file_and_offset() {
    let store = SimStore::new(6);
    {
        let mut lsg =
            LogStorageGroup::create_in(store.clone(), LsgId(1), config()).expect("create");
        let v = lsg.create_volume("v").expect("volume");
        for i in 0..20u32 {
            let lsn = lsg
                .audit()
                .append_durable(RecordType::Update, RecordFlags::NONE, b"change")
                .expect("append");
            v.put(format!("k{i}").as_bytes(), &[3u8; 300], lsn)
                .expect("put");
        }
        v.flush(Lsn(20)).expect("flush");
    }
    store.power_loss();
    store.fail_reads(FIRST_SEGMENT, 8192, 512);
    let e = LogStorageGroup::open_in(store.clone(), config(), OpenMode::Write)
        .expect_err("unreadable audit trail");
    let LsgError::Unreadable { path, offset, .. } = &e else {
        panic!("{e}");
    };
    assert!(path.ends_with(FIRST_SEGMENT), "{e}");
    assert!(*offset <= 8192, "{e}");
    assert!(e.to_string().contains("media error"), "{e}");

    let store = SimStore::new(7);
    {
        let mut lsg =
            LogStorageGroup::create_in(store.clone(), LsgId(1), config()).expect("create");
        let v = lsg.create_volume("v").expect("volume");
        let lsn = lsg
            .audit()
            .append_durable(RecordType::Update, RecordFlags::NONE, b"change")
            .expect("append");
        v.put(b"k", &[3u8; 300], lsn).expect("put");
        v.flush(lsn).expect("flush");
    }
    store.power_loss();
    store.fail_reads("volumes/v/0000000000000001.seg", 0, 16 << 10);
    let e = LogStorageGroup::open_in(store, config(), OpenMode::ReadOnly)
        .expect_err("unreadable volume");
    assert!(matches!(e, LsgError::Unreadable { .. }), "{e}");
}
