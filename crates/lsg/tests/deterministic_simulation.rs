//! Opened with [`LsgOptions::deterministic`], an LSG starts no thread of its own: every write
//! happens on the caller's thread, in the caller's order, so a `SimStore` simulation with crash
//! points replays exactly for a seed. Every LSG in this file is opened that way, so the thread
//! check below sees only threads it made itself.

use std::collections::BTreeMap;

use duplex_lsg::{
    LogStorageGroup, LsgConfig, LsgId, LsgOptions, Lsn, OpenMode, RecordFlags, RecordType,
    SimFileImage, SimStore, Store,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const PREALLOCATOR_THREAD: &str = "audit-prealloc";

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

/// Names of this process's threads, from `/proc/self/task/*/comm`.
fn thread_names() -> Vec<String> {
    let mut names = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("list /proc/self/task") {
        let comm = task.expect("task").path().join("comm");
        // A thread that ended between the listing and the read is simply gone.
        if let Ok(name) = std::fs::read_to_string(comm) {
            names.push(name.trim().to_string());
        }
    }
    names
}

fn preallocator_running() -> bool {
    thread_names().iter().any(|n| n == PREALLOCATOR_THREAD)
}

#[test]
fn without_background_preallocation_no_thread_is_started() {
    let store = SimStore::new(1);
    let lsg = LogStorageGroup::create_in_with(
        store.clone(),
        LsgId(1),
        config(),
        LsgOptions::deterministic(),
    )
    .expect("create");
    // Enough records for several segment rollovers, each segment made inline by the flusher.
    for i in 0..400u32 {
        lsg.audit()
            .append(RecordType::Update, RecordFlags::NONE, &[i as u8; 300])
            .expect("append");
        assert!(
            !preallocator_running(),
            "a preallocator thread at append {i}"
        );
    }
    lsg.audit().flush().expect("flush");
    assert!(
        store.exists("audit/0000000000000004.seg").expect("exists"),
        "the trail rolled over to later segments"
    );
    drop(lsg);
    let lsg = LogStorageGroup::open_in_with(
        store.clone(),
        config(),
        OpenMode::Write,
        LsgOptions::deterministic(),
    )
    .expect("reopen");
    lsg.audit()
        .append_durable(RecordType::Update, RecordFlags::NONE, b"after reopen")
        .expect("append");
    assert!(
        !preallocator_running(),
        "a preallocator thread after reopen"
    );
    drop(lsg);

    // The control: the same check sees the thread of a default opener (it names itself when it
    // starts; wait for that, bounded, without sleeping).
    let lsg = LogStorageGroup::open_in(store, config(), OpenMode::Write).expect("default open");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !preallocator_running() {
        assert!(
            std::time::Instant::now() < deadline,
            "the default opener's preallocator thread never showed up: {:?}",
            thread_names()
        );
        std::thread::yield_now();
    }
    drop(lsg);
    assert!(
        !preallocator_running(),
        "dropping the trail joins its preallocator"
    );
}

/// A whole simulated life of an LSG, decided by `seed`: appends, volume changes, flushes,
/// crashes in the middle of a flush at a seeded write, failed syncs, kills and power losses.
/// Returns every file as it stands at the end.
fn simulate(seed: u64) -> BTreeMap<String, SimFileImage> {
    let store = SimStore::new(seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let options = LsgOptions::deterministic();
    let mut lsg = LogStorageGroup::create_in_with(store.clone(), LsgId(7), config(), options)
        .expect("create");
    lsg.create_volume("v").expect("volume");
    for _ in 0..300 {
        let v = lsg.volume("v").expect("volume");
        match rng.random_range(0..100u32) {
            0..60 => {
                let key = [rng.random_range(0..32u8)];
                let value = vec![rng.random::<u8>(); rng.random_range(0..400)];
                // A failed trail is the point of some steps; later ones see `Failed`.
                if let Ok(lsn) = lsg
                    .audit()
                    .append(RecordType::Update, RecordFlags::NONE, &value)
                {
                    let _ = v.put(&key, &value, lsn);
                }
            }
            60..75 => {
                let _ = lsg.audit().flush();
            }
            75..82 => {
                let last = Lsn(lsg.audit().next_lsn().0 - 1);
                let _ = v.flush(last);
            }
            82..86 => {
                // The volume's next flush fails to sync one segment (it stops for good).
                let segment = rng.random_range(1..8u64);
                let name = format!("volumes/v/{segment:016x}.seg");
                store.fail_syncs(&name, 1);
                let _ = v.flush(Lsn(lsg.audit().next_lsn().0 - 1));
                store.fail_syncs(&name, 0);
            }
            86..94 => {
                // Killed at a seeded write of a flush, or right away.
                store.crash_after_writes(rng.random_range(1..4));
                let _ = lsg.audit().flush();
                let _ = v.flush(Lsn(lsg.audit().next_lsn().0.saturating_sub(1)));
                drop(v);
                drop(lsg);
                store.kill_process();
                lsg = LogStorageGroup::open_in_with(
                    store.clone(),
                    config(),
                    OpenMode::Write,
                    options,
                )
                .expect("reopen after kill");
            }
            _ => {
                drop(v);
                drop(lsg);
                store.power_loss();
                lsg = LogStorageGroup::open_in_with(
                    store.clone(),
                    config(),
                    OpenMode::Write,
                    options,
                )
                .expect("reopen after power loss");
            }
        }
    }
    drop(lsg);
    store.image()
}

/// The first difference between two images, for the failure message.
fn first_difference(
    a: &BTreeMap<String, SimFileImage>,
    b: &BTreeMap<String, SimFileImage>,
) -> Option<String> {
    let names: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for name in names {
        match (a.get(name), b.get(name)) {
            (Some(x), Some(y)) if x == y => {}
            (Some(x), Some(y)) => {
                let at = x
                    .current
                    .iter()
                    .zip(&y.current)
                    .position(|(p, q)| p != q)
                    .or_else(|| x.durable.iter().zip(&y.durable).position(|(p, q)| p != q));
                return Some(format!("{name} differs (first at byte {at:?})"));
            }
            (x, _) => {
                return Some(format!(
                    "{name} exists only in run {}",
                    if x.is_some() { 1 } else { 2 }
                ));
            }
        }
    }
    None
}

#[test]
fn a_seeded_crash_simulation_replays_byte_for_byte() {
    for seed in 0..12u64 {
        eprintln!("seed {seed}");
        let first = simulate(seed);
        let second = simulate(seed);
        assert!(
            first_difference(&first, &second).is_none(),
            "seed {seed}: two runs of one seed differ: {}",
            first_difference(&first, &second).unwrap_or_default()
        );
        // The comparison has teeth: another seed gives other files.
        let other = simulate(seed + 1000);
        assert!(
            first_difference(&first, &other).is_some(),
            "seed {seed}: another seed gave identical files"
        );
    }
}
