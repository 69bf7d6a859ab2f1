//! Metadata that must be as durable as the data: LSG creation is all or nothing, a file whose
//! name may not be durable is not written into, failed manifest and audit syncs are final and
//! leave nothing for the next owner to build on, and a media error during recovery is an error
//! that names the place, not a dead process.

use std::path::Path;
use std::sync::{Arc, Mutex};

use duplex_lsg::{
    DataVolume, LogStorageGroup, LsgConfig, LsgError, LsgId, Lsn, OpenMode, RecordFlags,
    RecordType, SimFile, SimLock, SimStore, Store,
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

/// Logs a change durably and applies it to `v`, as a volume pair does; returns its LSN.
fn logged_put(
    lsg: &LogStorageGroup<SimStore>,
    v: &DataVolume<SimStore>,
    key: &[u8],
    value: &[u8],
) -> Lsn {
    let lsn = lsg
        .audit()
        .append_durable(RecordType::Update, RecordFlags::NONE, key)
        .expect("append");
    v.put(key, value, lsn).expect("put");
    lsn
}

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
    // The failed update was scrubbed: a same-host next owner reads the manifest on disk, which
    // still keeps every segment.
    drop(lsg);
    store.kill_process();
    let lsg = LogStorageGroup::open_in(store, config(), OpenMode::Write).expect("takeover");
    assert_eq!(lsg.audit().first_lsn(), Lsn(1));
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
        let lsn = logged_put(&lsg, &v, b"k", &[3u8; 300]);
        v.flush(lsn).expect("flush");
    }
    store.power_loss();
    // Past the segment header: the volume's records, read when the index is rebuilt.
    store.fail_reads("volumes/v/0000000000000001.seg", 4096, 512);
    let e =
        LogStorageGroup::open_in(store, config(), OpenMode::Write).expect_err("unreadable volume");
    let LsgError::Unreadable { path, offset, .. } = &e else {
        panic!("{e}");
    };
    assert!(path.ends_with("volumes/v/0000000000000001.seg"), "{e}");
    assert!(*offset <= 4096, "{e}");
}

type Hook = Box<dyn FnOnce() + Send>;

/// A `SimStore` that runs a hook once, when the ownership lock is first asked for: between a
/// creator's check for an existing LSG and its taking the lock.
#[derive(Clone)]
struct BeforeLock {
    sim: SimStore,
    hook: Arc<Mutex<Option<Hook>>>,
}

impl std::fmt::Debug for BeforeLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BeforeLock")
    }
}

impl Store for BeforeLock {
    type File = SimFile;
    type Lock = SimLock;
    fn root(&self) -> &Path {
        self.sim.root()
    }
    fn create(
        &self,
        name: &str,
        initial: &[u8],
        size: u64,
        pre: bool,
    ) -> duplex_lsg::Result<SimFile> {
        self.sim.create(name, initial, size, pre)
    }
    fn open(&self, name: &str) -> duplex_lsg::Result<SimFile> {
        self.sim.open(name)
    }
    fn exists(&self, name: &str) -> duplex_lsg::Result<bool> {
        self.sim.exists(name)
    }
    fn list(&self, dir: &str) -> duplex_lsg::Result<Vec<String>> {
        self.sim.list(dir)
    }
    fn remove(&self, name: &str) -> duplex_lsg::Result<()> {
        self.sim.remove(name)
    }
    fn create_dir(&self, dir: &str) -> duplex_lsg::Result<()> {
        self.sim.create_dir(dir)
    }
    fn sync_dir(&self, dir: &str) -> duplex_lsg::Result<()> {
        self.sim.sync_dir(dir)
    }
    fn lock(&self, name: &str, wait: bool) -> duplex_lsg::Result<Option<SimLock>> {
        let hook = self.hook.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(hook) = hook {
            hook();
        }
        self.sim.lock(name, wait)
    }
}

/// Two creators race: the one that loses the race for the lock must find the winner's LSG, not
/// clear its audit trail as leftovers of a stopped creation.
#[test]
fn a_creator_that_lost_the_race_leaves_the_winners_lsg_alone() {
    let sim = SimStore::new(11);
    let winner = sim.clone();
    let racing = BeforeLock {
        sim: sim.clone(),
        hook: Arc::new(Mutex::new(Some(Box::new(move || {
            let lsg = LogStorageGroup::create_in(winner, LsgId(1), config()).expect("winner");
            lsg.audit()
                .append_durable(RecordType::Commit, RecordFlags::NONE, b"acknowledged")
                .expect("append");
        })))),
    };
    let e = LogStorageGroup::create_in(racing, LsgId(2), config()).expect_err("lost the race");
    assert!(matches!(e, LsgError::AlreadyExists { .. }), "{e}");
    let lsg = LogStorageGroup::open_in(sim, config(), OpenMode::Write).expect("reopen");
    assert_eq!(lsg.lsg_id(), LsgId(1));
    assert_eq!(lsg.audit().next_lsn(), Lsn(2));
}

/// An audit trail whose manifest was lost is not a leftover of a stopped creation: creating an
/// LSG over it is refused and nothing is removed.
#[test]
fn creating_over_an_audit_trail_without_a_manifest_is_refused() {
    let store = SimStore::new(12);
    {
        let lsg = LogStorageGroup::create_in(store.clone(), LsgId(7), config()).expect("create");
        for _ in 0..40 {
            lsg.audit()
                .append_durable(RecordType::Update, RecordFlags::NONE, &[1u8; 3000])
                .expect("append");
        }
    }
    store.remove("MANIFEST").expect("the manifest is lost");
    let before = store.list("audit").expect("list");
    assert!(before.len() >= 2);
    let e = LogStorageGroup::create_in(store.clone(), LsgId(7), config()).expect_err("refused");
    assert!(matches!(e, LsgError::ManifestMissing { .. }), "{e}");
    assert!(e.to_string().contains("nothing was changed"), "{e}");
    assert_eq!(store.list("audit").expect("list"), before);
}

/// An owner's open-time sync fails (its open fails); a second opener's sync then finds nothing
/// pending, as on Linux, yet must make the records it accepts durable before it acknowledges
/// anything after them.
#[test]
fn a_failed_sync_at_open_does_not_let_the_next_opener_vouch_for_unwritten_records() {
    let store = SimStore::new(13);
    {
        let lsg = LogStorageGroup::create_in(store.clone(), LsgId(1), config()).expect("create");
        lsg.audit()
            .append_durable(RecordType::Commit, RecordFlags::NONE, b"one")
            .expect("append");
        lsg.audit()
            .append(RecordType::Commit, RecordFlags::NONE, b"two")
            .expect("append");
        store.crash_after_writes(1);
        assert!(matches!(lsg.audit().flush(), Err(LsgError::Crashed)));
    }
    store.kill_process();
    store.fail_syncs(FIRST_SEGMENT, 1);
    let e = LogStorageGroup::open_in(store.clone(), config(), OpenMode::Write)
        .expect_err("the open-time sync fails");
    assert!(matches!(e, LsgError::Io { .. }), "{e}");
    let acked = {
        let lsg =
            LogStorageGroup::open_in(store.clone(), config(), OpenMode::Write).expect("retry");
        assert_eq!(lsg.audit().next_lsn(), Lsn(3));
        lsg.audit()
            .append_durable(RecordType::Commit, RecordFlags::NONE, b"three")
            .expect("append")
    };
    store.power_loss();
    let lsg = LogStorageGroup::open_in(store, config(), OpenMode::Write).expect("reopen");
    assert!(
        lsg.audit().next_lsn() > acked,
        "acknowledged LSN {acked} lost: next LSN {}",
        lsg.audit().next_lsn()
    );
}

/// A failed volume sync stops that owner; the same host's next owner (a CPU takeover shares the
/// page cache) must not take the unwritten records for durable ones and checkpoint past them.
#[test]
fn a_failed_volume_sync_then_a_takeover_then_a_power_loss_loses_nothing() {
    let store = SimStore::new(14);
    {
        let mut lsg =
            LogStorageGroup::create_in(store.clone(), LsgId(1), config()).expect("create");
        let v = lsg.create_volume("v").expect("volume");
        let l1 = logged_put(&lsg, &v, b"k1", b"one");
        v.flush(l1).expect("checkpoint");
        let l2 = logged_put(&lsg, &v, b"k2", b"two");
        store.fail_syncs("volumes/v/0000000000000001.seg", 1);
        v.flush(l2).expect_err("the volume sync fails");
        assert!(matches!(v.get(b"k2"), Err(LsgError::Failed(_))));
    }
    store.kill_process();
    {
        let lsg =
            LogStorageGroup::open_in(store.clone(), config(), OpenMode::Write).expect("takeover");
        let v = lsg.volume("v").expect("volume");
        // Redo from the trail, as the volume pair does after a takeover.
        assert_eq!(
            v.get(b"k2").expect("get"),
            None,
            "the unwritten record was taken"
        );
        v.put(b"k2", b"two", Lsn(2)).expect("redo");
        let l3 = logged_put(&lsg, &v, b"k3", b"three");
        v.flush(l3).expect("checkpoint by the new owner");
    }
    store.power_loss();
    let lsg = LogStorageGroup::open_in(store, config(), OpenMode::Write).expect("opens");
    let v = lsg.volume("v").expect("volume");
    for (k, value) in [
        (&b"k1"[..], &b"one"[..]),
        (b"k2", b"two"),
        (b"k3", b"three"),
    ] {
        assert_eq!(
            v.get(k).expect("get").map(|r| r.value),
            Some(value.to_vec())
        );
    }
}

/// An owner died after naming a segment but before its directory was synced (here: the sync
/// failed); the next owner finds the segment without records and, before it acknowledges records
/// in it (audit) or checkpoints a volume naming it, makes the name durable.
#[test]
fn a_found_segment_whose_name_may_not_be_durable_is_synced_before_it_is_relied_on() {
    let store = SimStore::new(15);
    store.fail_entry_sync("audit/0000000000000002.seg");
    store.fail_entry_sync("volumes/v/0000000000000002.seg");
    {
        let mut lsg =
            LogStorageGroup::create_in(store.clone(), LsgId(1), config()).expect("create");
        let v = lsg.create_volume("v").expect("volume");
        let lsn = lsg
            .audit()
            .append_durable(RecordType::Update, RecordFlags::NONE, b"k")
            .expect("append");
        // Fill volume segment 1; rolling to segment 2 fails after naming it.
        let mut rolled = false;
        for i in 0..40u32 {
            if v.put(format!("k{i:03}").as_bytes(), &[5u8; 900], lsn)
                .is_err()
            {
                rolled = true;
                break;
            }
        }
        assert!(rolled, "volume segment 2 was never needed");
        // Dropping the trail waits for its preallocator, which tried to make audit segment 2.
    }
    assert!(store.exists("audit/0000000000000002.seg").expect("exists"));
    assert!(
        store
            .exists("volumes/v/0000000000000002.seg")
            .expect("exists")
    );
    store.kill_process();
    let mut acked = Lsn(0);
    {
        let lsg = LogStorageGroup::open_in(store.clone(), config(), OpenMode::Write).expect("open");
        let v = lsg.volume("v").expect("volume");
        // Enough audit records to move into segment 2.
        for i in 0..40u32 {
            acked = lsg
                .audit()
                .append_durable(RecordType::Update, RecordFlags::NONE, &[6u8; 3000])
                .expect("append");
            v.put(format!("n{i:03}").as_bytes(), &[7u8; 900], acked)
                .expect("put");
        }
        v.flush(acked).expect("checkpoint");
    }
    store.power_loss();
    let lsg = LogStorageGroup::open_in(store, config(), OpenMode::Write).expect("reopen");
    assert_eq!(lsg.audit().next_lsn(), Lsn(acked.0 + 1));
    let v = lsg.volume("v").expect("volume");
    for i in 0..40u32 {
        assert!(v.get(format!("n{i:03}").as_bytes()).expect("get").is_some());
    }
}

/// A volume checkpoint whose sync failed may be readable in the page cache though not on disk; a
/// same-host next owner must read the previous checkpoint (the one on disk), not trust the
/// failed one (and, say, truncate the trail below a checkpoint that a power loss takes away).
#[test]
fn a_failed_checkpoint_write_leaves_the_previous_checkpoint_for_the_next_owner() {
    let store = SimStore::new(16);
    {
        let mut lsg =
            LogStorageGroup::create_in(store.clone(), LsgId(1), config()).expect("create");
        let v = lsg.create_volume("v").expect("volume");
        let l1 = logged_put(&lsg, &v, b"k1", b"one");
        v.flush(l1).expect("checkpoint");
        let l2 = logged_put(&lsg, &v, b"k2", b"two");
        store.fail_syncs("volumes/v/CHECKPOINT", 1);
        v.flush(l2).expect_err("the checkpoint sync fails");
    }
    store.kill_process();
    let lsg = LogStorageGroup::open_in(store, config(), OpenMode::Write).expect("takeover");
    assert_eq!(lsg.volume("v").expect("volume").checkpoint_lsn(), Lsn(1));
}

/// The same, but the owner is killed between its failed volume sync and the scrub it would do:
/// its records after the checkpoint stay readable in the page cache, clean, yet not on disk. The
/// same host's next owner (opening fresh, or adopting a warm read-only view) takes them, so it
/// must write them again before its first checkpoint vouches for them; a sync alone writes
/// nothing of a clean page. Then a power loss: nothing the new owner checkpointed is lost.
#[test]
fn a_volume_sync_failure_killed_before_its_scrub_then_a_takeover_then_a_power_loss_loses_nothing() {
    for adopt in [false, true] {
        let primary = SimStore::new(16);
        let backup = primary.another_process();
        let mut view = None;
        {
            let mut lsg =
                LogStorageGroup::create_in(primary.clone(), LsgId(1), config()).expect("create");
            let v = lsg.create_volume("v").expect("volume");
            let l1 = logged_put(&lsg, &v, b"k1", b"one");
            v.flush(l1).expect("checkpoint");
            for i in 2..=20u8 {
                logged_put(&lsg, &v, &[b'k', i], &[i; 300]);
            }
            if adopt {
                let mut ro = LogStorageGroup::open_in(backup.clone(), config(), OpenMode::ReadOnly)
                    .expect("read-only open");
                ro.catch_up().expect("catch up");
                view = Some(ro);
            }
            primary.fail_syncs_and_crash("volumes/v/0000000000000001.seg", 1);
            let last = lsg.audit().durable_lsn();
            v.flush(last).expect_err("the volume sync fails");
        }
        primary.kill_process();
        let checkpointed = {
            let lsg = match view.take() {
                Some(mut ro) => {
                    ro.adopt_for_write_in(backup.clone(), OpenMode::Write)
                        .expect("adopt");
                    ro
                }
                None => LogStorageGroup::open_in(primary.clone(), config(), OpenMode::Write)
                    .expect("takeover"),
            };
            let v = lsg.volume("v").expect("volume");
            assert_eq!(
                v.get(&[b'k', 20]).expect("get").map(|r| r.value),
                Some(vec![20; 300]),
                "adopt {adopt}: the new owner took the records it found"
            );
            let lsn = logged_put(&lsg, &v, b"new", b"owner");
            v.flush(lsn).expect("checkpoint by the new owner");
            lsn
        };
        primary.power_loss();
        let lsg = LogStorageGroup::open_in(primary, config(), OpenMode::Write)
            .unwrap_or_else(|e| panic!("adopt {adopt}: reopen after the power loss: {e}"));
        let v = lsg.volume("v").expect("volume");
        assert!(v.checkpoint_lsn() >= checkpointed, "adopt {adopt}");
        assert_eq!(
            v.get(b"k1").expect("get").map(|r| r.value),
            Some(b"one".to_vec())
        );
        for i in 2..=20u8 {
            assert_eq!(
                v.get(&[b'k', i]).expect("get").map(|r| r.value),
                Some(vec![i; 300]),
                "adopt {adopt}: key {i} checkpointed by the new owner was lost"
            );
        }
        assert_eq!(
            v.get(b"new").expect("get").map(|r| r.value),
            Some(b"owner".to_vec())
        );
    }
}
