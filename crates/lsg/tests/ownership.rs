//! Ownership within one process and against bad files: a second opener is refused with the
//! owner's epoch, epochs rise, and missing, foreign or newer-format files are clear errors.
//! (Ownership across real processes, with SIGKILL, is tested in `bin/duplex/tests`.)

use duplex_lsg::{
    LogStorageGroup, LsgConfig, LsgError, LsgId, Lsn, OpenMode, RecordFlags, RecordType,
};

fn small() -> LsgConfig {
    LsgConfig {
        audit_segment_bytes: 1 << 20,
        volume_segment_bytes: 1 << 20,
        max_record_bytes: 64 << 10,
        max_value_bytes: 64 << 10,
        ..LsgConfig::default()
    }
}

#[test]
fn a_second_opener_is_told_who_owns_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = small();
    let first = LogStorageGroup::create(dir.path(), LsgId(5), config).expect("create");
    assert_eq!(first.owner_epoch().0, 1);
    match LogStorageGroup::open(dir.path(), config, OpenMode::Write) {
        Err(e @ LsgError::OwnedBy { epoch: 1, .. }) => {
            assert!(e.to_string().contains("owned by epoch 1"), "{e}");
        }
        other => panic!("expected OwnedBy, got {other:?}"),
    }
    // Reading needs no ownership.
    let reader = LogStorageGroup::open(dir.path(), config, OpenMode::ReadOnly).expect("read-only");
    assert!(matches!(
        reader
            .audit()
            .append(RecordType::Commit, RecordFlags::NONE, b"x"),
        Err(LsgError::ReadOnly { .. })
    ));
    drop(first);
    let second = LogStorageGroup::open(dir.path(), config, OpenMode::Write).expect("open");
    assert_eq!(second.owner_epoch().0, 2);
    assert_eq!(second.boot_sequence(), 2);
}

#[test]
fn a_fenced_owner_refuses_to_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = small();
    let old = LogStorageGroup::create(dir.path(), LsgId(5), config).expect("create");
    old.audit()
        .append_durable(RecordType::Commit, RecordFlags::NONE, b"before")
        .expect("append");
    // Another owner took over without our lock (as on storage the lock does not reach) and
    // raised the epoch in the manifest.
    let taken = bump_epoch(dir.path());
    let e = old
        .audit()
        .append_durable(RecordType::Commit, RecordFlags::NONE, b"after")
        .expect_err("fenced");
    match e {
        LsgError::Fenced { ours: 1, found, .. } => assert_eq!(found, taken),
        other => panic!("expected Fenced, got {other:?}"),
    }
    // It stays stopped, and cannot roll the manifest back by truncating either.
    assert!(old.audit().flush().is_err());
    assert!(matches!(
        old.audit().truncate_below(Lsn(1)),
        Ok(0) | Err(LsgError::Fenced { .. })
    ));
    let reopened = LogStorageGroup::open(dir.path(), small(), OpenMode::ReadOnly).expect("read");
    assert_eq!(reopened.owner_epoch().0, taken);
}

/// Raises the owner epoch in the manifest the way a new owner would: writes the older slot with
/// the next sequence. Slot layout: docs/storage-format.md.
fn bump_epoch(dir: &std::path::Path) -> u64 {
    let path = dir.join("MANIFEST");
    let mut bytes = std::fs::read(&path).expect("read");
    let slot = |b: &[u8], i: usize| -> (u64, Vec<u8>) {
        let s = &b[i * 4096..(i + 1) * 4096];
        (
            u64::from_le_bytes(s[16..24].try_into().expect("8")),
            s.to_vec(),
        )
    };
    let (a, b) = (slot(&bytes, 0), slot(&bytes, 1));
    let (seq, mut cur) = if a.0 >= b.0 && a.1[..8] == *b"DPLXMAN1" {
        a
    } else {
        b
    };
    let epoch = u64::from_le_bytes(cur[32..40].try_into().expect("8")) + 5;
    cur[16..24].copy_from_slice(&(seq + 1).to_le_bytes());
    cur[32..40].copy_from_slice(&epoch.to_le_bytes());
    let body_len = u32::from_le_bytes(cur[12..16].try_into().expect("4")) as usize;
    let crc = crc32c::crc32c(&cur[..24 + body_len]);
    cur[24 + body_len..28 + body_len].copy_from_slice(&crc.to_le_bytes());
    let target = ((seq + 1) % 2) as usize;
    bytes[target * 4096..(target + 1) * 4096].copy_from_slice(&cur);
    std::fs::write(&path, &bytes).expect("write");
    epoch
}

#[test]
fn missing_foreign_and_newer_files_are_clear_errors() {
    let config = small();
    let empty = tempfile::tempdir().expect("tempdir");
    let e = LogStorageGroup::open(empty.path(), config, OpenMode::Write).expect_err("no LSG");
    assert!(matches!(e, LsgError::Missing { .. }), "{e}");

    let dir = tempfile::tempdir().expect("tempdir");
    drop(LogStorageGroup::create(dir.path(), LsgId(1), config).expect("create"));
    let manifest = dir.path().join("MANIFEST");
    let good = std::fs::read(&manifest).expect("read");

    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&2u32.to_le_bytes());
    let body_len = u32::from_le_bytes(newer[12..16].try_into().expect("4")) as usize;
    let crc = crc32c::crc32c(&newer[..24 + body_len]);
    newer[24 + body_len..28 + body_len].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&manifest, &newer).expect("write");
    let e = LogStorageGroup::open(dir.path(), config, OpenMode::Write).expect_err("newer");
    assert!(
        matches!(
            e,
            LsgError::NewerFormat {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{e}"
    );

    std::fs::write(&manifest, vec![b'x'; 8192]).expect("write");
    let e = LogStorageGroup::open(dir.path(), config, OpenMode::Write).expect_err("foreign");
    assert!(matches!(e, LsgError::Foreign { .. }), "{e}");

    std::fs::write(&manifest, &good).expect("restore");
    std::fs::remove_file(dir.path().join("audit/0000000000000001.seg")).expect("remove");
    let e =
        LogStorageGroup::open(dir.path(), config, OpenMode::Write).expect_err("missing segment");
    assert!(matches!(e, LsgError::Missing { .. }), "{e}");
    assert!(e.to_string().contains("audit"), "{e}");
}

#[test]
fn a_fenced_owner_cannot_roll_the_epoch_back_by_truncating() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LsgConfig {
        audit_segment_bytes: 64 << 10,
        max_batch_bytes: 8 << 10,
        max_record_bytes: 4 << 10,
        max_value_bytes: 1 << 10,
        max_key_bytes: 64,
        volume_segment_bytes: 64 << 10,
    };
    let old = LogStorageGroup::create(dir.path(), LsgId(5), config).expect("create");
    for _ in 0..1000 {
        old.audit()
            .append(RecordType::Update, RecordFlags::NONE, &[7; 200])
            .expect("append");
    }
    old.audit().flush().expect("flush");
    let taken = bump_epoch(dir.path());
    let e = old.audit().truncate_below(Lsn(900)).expect_err("fenced");
    assert!(matches!(e, LsgError::Fenced { ours: 1, .. }), "{e}");
    let now = LogStorageGroup::open(dir.path(), config, OpenMode::ReadOnly).expect("read");
    assert_eq!(now.owner_epoch().0, taken);
    assert_eq!(now.audit().first_lsn(), Lsn(1));
}

#[test]
fn ownership_lasts_while_any_writing_handle_lives() {
    let store = duplex_lsg::SimStore::new(8);
    let mut a = LogStorageGroup::create_in(store.clone(), LsgId(1), small()).expect("create");
    let volume = a.create_volume("v").expect("volume");
    drop(a);
    // The LSG handle is gone but its volume still writes: nobody else may own the LSG.
    let e = LogStorageGroup::open_in(store.clone(), small(), OpenMode::Write).expect_err("owned");
    assert!(matches!(e, LsgError::OwnedBy { .. }), "{e}");
    drop(volume);
    LogStorageGroup::open_in(store, small(), OpenMode::Write)
        .expect("free once every handle is gone");
}

#[test]
fn a_fenced_owner_refuses_volume_writes_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut old = LogStorageGroup::create(dir.path(), LsgId(5), small()).expect("create");
    let v = old.create_volume("v").expect("volume");
    let lsn = old
        .audit()
        .append_durable(RecordType::Update, RecordFlags::NONE, b"change")
        .expect("append");
    v.put(b"k", b"before", lsn).expect("put");
    let taken = bump_epoch(dir.path());
    assert!(matches!(v.flush(lsn), Err(LsgError::Fenced { .. })));
    let lsn = old
        .audit()
        .append(RecordType::Update, RecordFlags::NONE, b"change")
        .expect("append to memory");
    let e = v.put(b"k2", b"after", lsn).expect_err("fenced");
    assert!(
        matches!(e, LsgError::Fenced { ours: 1, found, .. } if found == taken),
        "{e}"
    );
}
