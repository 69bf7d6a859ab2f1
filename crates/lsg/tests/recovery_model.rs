//! The storage contract the recovery layer builds on, checked against a model: after any sequence
//! of process kills, clean closes and power losses, a data volume redone from its checkpoint LSN
//! with the recovered audit trail holds exactly what replaying that whole trail from LSN 1 gives,
//! and no acknowledged change is missing from it. Everything an opener recovers counts as
//! acknowledged from then on: a new owner builds on it (and answers for it), so a later power
//! loss must not take it away.

use std::collections::BTreeMap;

use duplex_lsg::{
    LogStorageGroup, LsgConfig, LsgId, Lsn, OpenMode, RecordFlags, RecordType, SimStore,
};
use proptest::prelude::*;

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

/// A change as the audit trail records it: key, and the new value or `None` for a delete.
fn encode(key: u8, value: Option<&[u8]>) -> Vec<u8> {
    let mut p = vec![key];
    if let Some(v) = value {
        p.push(1);
        p.extend_from_slice(v);
    } else {
        p.push(0);
    }
    p
}

fn decode(p: &[u8]) -> (u8, Option<Vec<u8>>) {
    match p {
        [key, 1, value @ ..] => (*key, Some(value.to_vec())),
        [key, ..] => (*key, None),
        [] => panic!("empty change record"),
    }
}

#[derive(Debug, Clone)]
enum Op {
    Put(u8, usize),
    Delete(u8),
    AuditFlush,
    VolumeFlush,
    /// The kernel writes the volume's dirty pages back on its own, before any flush.
    WriteBack,
    Compact,
    /// `kill -9` of the owner: its unsynced writes stay in the page cache for the next owner.
    Kill,
    KillInFlush(u64),
    /// The owner's next audit sync fails (its trail stops for good); then it is killed.
    FailedSyncThenKill,
    /// The owner's next volume flush fails to sync (the volume stops for good); then it is killed.
    FailedVolumeSyncThenKill,
    /// The owner's next volume flush fails to sync and the owner is killed at once, before it
    /// can scrub what the sync did not write.
    FailedVolumeSyncKilledBeforeScrub,
    /// The owner closes without a flush and a new one opens.
    Close,
    PowerLoss,
    PowerLossInFlush(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..24, 0usize..400).prop_map(|(k, n)| Op::Put(k, n)),
        2 => (0u8..24).prop_map(Op::Delete),
        2 => Just(Op::AuditFlush),
        1 => Just(Op::VolumeFlush),
        1 => Just(Op::WriteBack),
        1 => Just(Op::Compact),
        1 => Just(Op::Kill),
        1 => (1u64..4).prop_map(Op::KillInFlush),
        1 => Just(Op::Close),
        1 => Just(Op::FailedSyncThenKill),
        1 => Just(Op::FailedVolumeSyncThenKill),
        1 => Just(Op::FailedVolumeSyncKilledBeforeScrub),
        1 => Just(Op::PowerLoss),
        1 => (1u64..4).prop_map(Op::PowerLossInFlush),
    ]
}

type Lsg = LogStorageGroup<SimStore>;

/// Recovers the way the volume pair will: redo every change after the volume's checkpoint.
fn recover(store: &SimStore) -> Lsg {
    let lsg = LogStorageGroup::open_in(store.clone(), config(), OpenMode::Write).expect("reopen");
    let v = lsg.volume("v").expect("volume");
    let from = Lsn(v.checkpoint_lsn().0 + 1);
    for r in lsg.audit().reader(from).expect("reader") {
        let r = r.expect("record");
        match decode(&r.payload) {
            (k, Some(value)) => v.put(&[k], &value, r.lsn).map(drop),
            (k, None) => v.delete(&[k], r.lsn).map(drop),
        }
        .expect("redo");
    }
    lsg
}

/// What replaying the whole recovered trail gives.
fn replay(lsg: &Lsg) -> BTreeMap<u8, Vec<u8>> {
    let mut state = BTreeMap::new();
    for r in lsg.audit().reader(Lsn(1)).expect("reader") {
        match decode(&r.expect("record").payload) {
            (k, Some(value)) => state.insert(k, value),
            (k, None) => state.remove(&k),
        };
    }
    state
}

fn volume_state(lsg: &Lsg) -> BTreeMap<u8, Vec<u8>> {
    let v = lsg.volume("v").expect("volume");
    v.scan(
        (std::ops::Bound::Unbounded, std::ops::Bound::Unbounded),
        1000,
    )
    .expect("scan")
    .into_iter()
    .map(|r| (r.key[0], r.value))
    .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn a_redone_volume_matches_its_audit_trail_after_any_sequence_of_faults(
        seed in any::<u64>(),
        ops in prop::collection::vec(op(), 1..150),
    ) {
        let store = SimStore::new(seed);
        let mut lsg = LogStorageGroup::create_in(store.clone(), LsgId(1), config()).expect("create");
        lsg.create_volume("v").expect("volume");
        // Changes acknowledged durable, in LSN order, as the model of what must survive.
        let mut acked = 0u64;
        let mut faults = 0;
        for op in ops {
            let v = lsg.volume("v").expect("volume");
            match op {
                Op::Put(k, n) => {
                    let value = vec![k ^ n as u8; n];
                    let lsn = lsg.audit().append(RecordType::Update, RecordFlags::NONE, &encode(k, Some(&value))).expect("append");
                    v.put(&[k], &value, lsn).expect("put");
                }
                Op::Delete(k) => {
                    let lsn = lsg.audit().append(RecordType::Update, RecordFlags::NONE, &encode(k, None)).expect("append");
                    v.delete(&[k], lsn).expect("delete");
                }
                Op::AuditFlush => acked = lsg.audit().flush().expect("flush").0,
                Op::VolumeFlush => {
                    let last = Lsn(lsg.audit().next_lsn().0 - 1);
                    v.flush(last).expect("volume flush");
                    acked = acked.max(last.0);
                }
                Op::WriteBack => {
                    // Whichever segments exist now: compaction moves the volume along.
                    for n in 1..64u64 {
                        let _ = store.write_back(&format!("volumes/v/{n:016x}.seg"));
                    }
                }
                Op::Compact => {
                    v.compact().expect("compact");
                    acked = acked.max(v.checkpoint_lsn().0);
                }
                Op::Kill | Op::KillInFlush(_) | Op::FailedSyncThenKill | Op::FailedVolumeSyncThenKill | Op::FailedVolumeSyncKilledBeforeScrub | Op::Close | Op::PowerLoss | Op::PowerLossInFlush(_) => {
                    if let Op::KillInFlush(n) | Op::PowerLossInFlush(n) = op {
                        store.crash_after_writes(n);
                        if let Ok(l) = lsg.audit().flush() {
                            acked = l.0;
                        }
                    }
                    if let Op::FailedSyncThenKill = op {
                        for n in 1..64u64 {
                            store.fail_syncs(&format!("audit/{n:016x}.seg"), 1);
                        }
                        if let Ok(l) = lsg.audit().flush() {
                            acked = l.0;
                        }
                        for n in 1..64u64 {
                            store.fail_syncs(&format!("audit/{n:016x}.seg"), 0);
                        }
                    }
                    if let Op::FailedVolumeSyncThenKill | Op::FailedVolumeSyncKilledBeforeScrub = op {
                        for n in 1..64u64 {
                            let name = format!("volumes/v/{n:016x}.seg");
                            match op {
                                Op::FailedVolumeSyncKilledBeforeScrub => store.fail_syncs_and_crash(&name, 1),
                                _ => store.fail_syncs(&name, 1),
                            }
                        }
                        let last = Lsn(lsg.audit().next_lsn().0 - 1);
                        if v.flush(last).is_ok() {
                            acked = acked.max(last.0);
                        }
                        for n in 1..64u64 {
                            store.fail_syncs(&format!("volumes/v/{n:016x}.seg"), 0);
                        }
                    }
                    drop(v);
                    drop(lsg);
                    match op {
                        Op::Kill | Op::KillInFlush(_) | Op::FailedSyncThenKill | Op::FailedVolumeSyncThenKill | Op::FailedVolumeSyncKilledBeforeScrub => store.kill_process(),
                        Op::PowerLoss | Op::PowerLossInFlush(_) => store.power_loss(),
                        _ => {}
                    }
                    faults += 1;
                    lsg = recover(&store);
                    prop_assert!(lsg.audit().next_lsn().0 > acked, "seed {}: acknowledged changes lost after {:?}: next {} acked {}", seed, op, lsg.audit().next_lsn(), acked);
                    prop_assert_eq!(volume_state(&lsg), replay(&lsg), "seed {}: volume differs from its trail after {:?} ({} faults)", seed, op, faults);
                    acked = lsg.audit().next_lsn().0 - 1;
                }
            }
        }
        store.power_loss();
        let lsg = recover(&store);
        prop_assert!(lsg.audit().next_lsn().0 > acked);
        prop_assert_eq!(volume_state(&lsg), replay(&lsg));
    }
}
