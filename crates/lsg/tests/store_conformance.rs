//! One conformance suite for the `Store` boundary: the real file store and the simulated one
//! must behave alike for everything the LSG manager relies on.

use duplex_lsg::{FileStore, LsgError, SimStore, Store, StoreFile};

fn conformance<S: Store>(store: &S) {
    store.create_dir("d").expect("create dir");
    assert!(store.list("d").expect("list").is_empty());

    // Create: initial bytes, then zeros up to the size; creating twice is refused.
    let f = store.create("d/a", b"head", 8192, true).expect("create");
    assert_eq!(f.len_bytes(), 8192);
    assert!(matches!(
        store.create("d/a", b"", 8192, true),
        Err(LsgError::AlreadyExists { .. })
    ));
    let mut buf = [0xFFu8; 8];
    f.read_at(0, &mut buf).expect("read");
    assert_eq!(&buf, b"head\0\0\0\0");

    // Writes are visible to reads (copying and lending alike) before and after a sync.
    f.write_at(4096, b"record").expect("write");
    let lent = f.with_bytes(4096, 6, <[u8]>::to_vec).expect("lend");
    assert_eq!(lent, b"record");
    f.sync().expect("sync");
    let mut got = [0u8; 6];
    f.read_at(4096, &mut got).expect("read");
    assert_eq!(&got, b"record");

    // Out-of-range access is an error naming the file, never a panic.
    let e = f.write_at(8190, b"xyz").expect_err("past the end");
    assert!(matches!(e, LsgError::Corrupt { .. }), "{e}");
    assert!(f.with_bytes(8000, 500, |_| ()).is_err());
    assert!(f.read_at(u64::MAX - 2, &mut [0u8; 4]).is_err());

    // Reopening sees the same bytes; listing is sorted; removal is durable and visible.
    store
        .create("d/b", b"", 4096, false)
        .expect("create sparse");
    assert_eq!(
        store.list("d").expect("list"),
        vec!["a".to_string(), "b".to_string()]
    );
    let again = store.open("d/a").expect("open");
    let mut got = [0u8; 6];
    again.read_at(4096, &mut got).expect("read");
    assert_eq!(&got, b"record");
    assert!(store.exists("d/b").expect("exists"));
    store.remove("d/b").expect("remove");
    assert!(!store.exists("d/b").expect("exists"));
    assert!(matches!(store.open("d/b"), Err(LsgError::Missing { .. })));
    assert!(matches!(store.remove("d/b"), Err(LsgError::Missing { .. })));

    // The ownership lock is exclusive and freed with its guard.
    let held = store.lock("LOCK", false).expect("lock").expect("free");
    assert!(store.lock("LOCK", false).expect("lock").is_none());
    drop(held);
    assert!(store.lock("LOCK", false).expect("lock").is_some());
}

#[test]
fn the_file_store_conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    conformance(&FileStore::new(dir.path()));
}

#[test]
fn the_simulated_store_conforms() {
    conformance(&SimStore::new(42));
}

#[test]
fn a_simulated_power_loss_keeps_what_was_synced_and_frees_locks() {
    let store = SimStore::new(7);
    let f = store.create("f", b"", 4096, true).expect("create");
    f.write_at(0, b"synced").expect("write");
    f.sync().expect("sync");
    f.write_at(512, &[9u8; 512]).expect("write");
    let _lock = store.lock("LOCK", false).expect("lock").expect("free");
    store.power_loss();
    // The old handle belongs to the dead process.
    assert!(matches!(f.write_at(0, b"x"), Err(LsgError::Crashed)));
    let f = store.open("f").expect("open");
    let mut got = [0u8; 6];
    f.read_at(0, &mut got).expect("read");
    assert_eq!(&got, b"synced");
    // The unsynced sector either survived whole or not at all (sector-level tearing).
    let torn = f.with_bytes(512, 512, <[u8]>::to_vec).expect("read");
    assert!(torn == vec![9u8; 512] || torn == vec![0u8; 512]);
    assert!(store.lock("LOCK", false).expect("lock").is_some());
}

#[test]
fn a_killed_process_leaves_its_unsynced_writes_visible_until_power_is_lost() {
    let store = SimStore::new(8);
    let f = store.create("f", b"", 4096, true).expect("create");
    let g = store.create("g", b"", 4096, true).expect("create");
    f.write_at(0, b"cached").expect("write");
    g.write_at(0, b"cached").expect("write");
    let _lock = store.lock("LOCK", false).expect("lock").expect("free");
    store.kill_process();
    assert!(matches!(f.write_at(0, b"x"), Err(LsgError::Crashed)));
    assert!(store.lock("LOCK", false).expect("lock").is_some());
    // The next process sees the dead one's writes and makes one file durable.
    let f = store.open("f").expect("open");
    let g = store.open("g").expect("open");
    assert_eq!(f.with_bytes(0, 6, <[u8]>::to_vec).expect("read"), b"cached");
    assert_eq!(g.with_bytes(0, 6, <[u8]>::to_vec).expect("read"), b"cached");
    f.sync().expect("sync");
    drop((f, g));
    store.power_loss();
    let f = store.open("f").expect("open");
    let g = store.open("g").expect("open");
    assert_eq!(f.with_bytes(0, 6, <[u8]>::to_vec).expect("read"), b"cached");
    // The unsynced write of `g` is its last: each sector survives or not.
    let torn = g.with_bytes(0, 6, <[u8]>::to_vec).expect("read");
    assert!(torn == b"cached" || torn == [0u8; 6], "{torn:?}");
}

/// Two processes on one simulated host: killing one (or crashing it mid-write) leaves the other's
/// handles, locks and view of the page cache alone; a power loss ends both.
#[test]
fn a_simulated_process_outlives_the_kill_of_another() {
    let primary = SimStore::new(9);
    let backup = primary.another_process();
    let f = primary.create("f", b"", 4096, true).expect("create");
    let seen = backup.open("f").expect("open");
    let _backup_lock = backup.lock("B", false).expect("lock").expect("free");
    let _primary_lock = primary.lock("P", false).expect("lock").expect("free");
    assert!(
        backup.lock("P", false).expect("lock").is_none(),
        "held by the primary"
    );

    // The primary dies right after a write; the backup reads the write and lives on.
    primary.crash_after_writes(1);
    assert!(matches!(f.write_at(0, b"last"), Err(LsgError::Crashed)));
    assert!(matches!(f.write_at(0, b"more"), Err(LsgError::Crashed)));
    let mut got = [0u8; 4];
    seen.read_at(0, &mut got).expect("the backup reads on");
    assert_eq!(&got, b"last");
    primary.kill_process();
    assert!(
        backup.lock("P", false).expect("lock").is_some(),
        "the dead primary's lock is free"
    );
    assert!(
        primary.lock("B", false).expect("lock").is_none(),
        "the live backup's lock is kept"
    );
    seen.read_at(0, &mut got).expect("still alive");

    // A fork is a separate world: what one does the other does not see.
    let other_world = backup.fork();
    let copy = other_world.open("f").expect("open in the fork");
    copy.write_at(0, b"fork").expect("write in the fork");
    seen.read_at(0, &mut got).expect("read");
    assert_eq!(&got, b"last");
    assert_eq!(other_world.image()["f"].current[..4], *b"fork");
    assert_eq!(backup.image()["f"].current[..4], *b"last");

    primary.power_loss();
    assert!(matches!(seen.read_at(0, &mut got), Err(LsgError::Crashed)));
}
