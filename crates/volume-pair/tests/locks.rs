//! The lock manager's rules, one scripted case each, through the API the owner uses; every
//! step is followed by `validate()`.

use std::time::Duration;

use duplex_lsg::{Lsn, OwnerEpoch};
use duplex_pair::{AbortReason, TxId};
use duplex_volume_pair::{
    Granted, LockConfig, LockError, LockMode, LockOutcome, MemoryVolume, VolumeAccess, VolumeError,
    VolumePair,
};

const GRANTED: Result<LockOutcome, LockError> = Ok(LockOutcome::Granted);
const WAITING: Result<LockOutcome, LockError> = Ok(LockOutcome::Waiting);
const DEADLOCK: Result<LockOutcome, LockError> = Ok(LockOutcome::Aborted(AbortReason::Deadlock));

fn tx(n: u64) -> TxId {
    TxId {
        epoch: OwnerEpoch(1),
        number: n,
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A volume pair whose every call is followed by `validate()`.
struct Pair(VolumePair);

impl Pair {
    fn new() -> Self {
        Self::with(LockConfig::default())
    }

    fn with(config: LockConfig) -> Self {
        Pair(VolumePair::new("accounts".into(), config))
    }

    fn checked<T>(&mut self, f: impl FnOnce(&mut VolumePair) -> T) -> T {
        let out = f(&mut self.0);
        if let Err(e) = self.0.validate() {
            panic!("invariant broken: {e}");
        }
        out
    }

    fn read_at(&mut self, now: Duration, n: u64, key: &str) -> Result<LockOutcome, LockError> {
        self.checked(|p| p.read(now, tx(n), key.as_bytes()))
    }

    fn read(&mut self, n: u64, key: &str) -> Result<LockOutcome, LockError> {
        self.read_at(Duration::ZERO, n, key)
    }

    fn write_at(&mut self, now: Duration, n: u64, key: &str) -> Result<LockOutcome, LockError> {
        self.checked(|p| p.lock_for_write(now, tx(n), key.as_bytes()))
    }

    fn write(&mut self, n: u64, key: &str) -> Result<LockOutcome, LockError> {
        self.write_at(Duration::ZERO, n, key)
    }

    fn scan(&mut self, n: u64) -> Result<LockOutcome, LockError> {
        self.checked(|p| p.lock_for_scan(Duration::ZERO, tx(n)))
    }

    fn release(&mut self, n: u64) -> Vec<Granted> {
        self.checked(|p| p.release(tx(n)))
    }

    fn expire(&mut self, now: Duration) -> Vec<(TxId, AbortReason)> {
        self.checked(|p| p.expire(now))
    }

    fn mode(&self, n: u64, key: &str) -> Option<LockMode> {
        self.0.held_mode(tx(n), Some(key.as_bytes()))
    }
}

fn granted(n: u64, key: &str) -> Granted {
    Granted {
        tx: tx(n),
        key: Some(key.as_bytes().to_vec()),
    }
}

fn scan_granted(n: u64) -> Granted {
    Granted {
        tx: tx(n),
        key: None,
    }
}

#[test]
fn readers_share_a_key_and_a_writer_waits_for_all_of_them() {
    let mut p = Pair::new();
    assert_eq!(p.read(1, "k"), GRANTED);
    assert_eq!(p.read(2, "k"), GRANTED);
    assert_eq!(p.write(3, "k"), WAITING);
    assert!(p.0.is_waiting(tx(3)));
    assert_eq!(p.release(1), vec![]);
    assert_eq!(p.release(2), vec![granted(3, "k")]);
    assert_eq!(p.mode(3, "k"), Some(LockMode::Exclusive));
    assert_eq!(p.0.locks_held(tx(3)), 2, "the key and the volume's IX");
}

#[test]
fn point_operations_on_different_keys_never_wait() {
    let mut p = Pair::new();
    for n in 1..=20 {
        assert_eq!(p.write(n, &format!("w{n}")), GRANTED);
        assert_eq!(p.read(n, &format!("r{}", n % 3)), GRANTED);
    }
    assert_eq!(p.0.held_mode(tx(1), None), Some(LockMode::IntentExclusive));
}

#[test]
fn a_lone_reader_upgrades_to_writer_at_once_and_a_writer_reads_without_asking() {
    let mut p = Pair::new();
    assert_eq!(p.read(1, "k"), GRANTED);
    assert_eq!(p.write(1, "k"), GRANTED);
    assert_eq!(p.mode(1, "k"), Some(LockMode::Exclusive));
    assert_eq!(p.0.held_mode(tx(1), None), Some(LockMode::IntentExclusive));
    assert_eq!(p.read(1, "k"), GRANTED);
    assert_eq!(
        p.mode(1, "k"),
        Some(LockMode::Exclusive),
        "a read never weakens"
    );
    assert_eq!(p.0.locks_held(tx(1)), 2);
}

#[test]
fn an_upgrade_waits_for_the_other_readers_and_goes_ahead_of_new_requests() {
    let mut p = Pair::new();
    assert_eq!(p.read(1, "k"), GRANTED);
    assert_eq!(p.read(2, "k"), GRANTED);
    assert_eq!(p.write(3, "k"), WAITING, "a new writer queues");
    assert_eq!(p.write(1, "k"), WAITING, "the upgrade waits for reader 2");
    assert_eq!(p.release(2), vec![granted(1, "k")], "the upgrade first");
    assert_eq!(p.release(1), vec![granted(3, "k")]);
}

#[test]
fn two_readers_that_both_upgrade_deadlock_and_the_second_to_ask_is_the_victim() {
    let mut p = Pair::new();
    assert_eq!(p.read(1, "k"), GRANTED);
    assert_eq!(p.read(2, "k"), GRANTED);
    assert_eq!(p.write(1, "k"), WAITING);
    assert_eq!(p.write(2, "k"), DEADLOCK);
    assert!(!p.0.is_waiting(tx(2)));
    assert_eq!(
        p.mode(2, "k"),
        Some(LockMode::Shared),
        "the victim keeps its locks until it is released"
    );
    assert_eq!(p.release(2), vec![granted(1, "k")]);
}

#[test]
fn a_waiting_writer_is_not_starved_by_readers_that_come_later() {
    let mut p = Pair::new();
    assert_eq!(p.read(1, "k"), GRANTED);
    assert_eq!(p.write(2, "k"), WAITING);
    // Compatible with the holder, but the writer came first.
    for n in 3..=6 {
        assert_eq!(p.read(n, "k"), WAITING);
    }
    assert_eq!(p.release(1), vec![granted(2, "k")]);
    let readers: Vec<Granted> = (3..=6).map(|n| granted(n, "k")).collect();
    assert_eq!(
        p.release(2),
        readers,
        "the readers together, in arrival order"
    );
}

#[test]
fn waiters_are_granted_in_arrival_order_compatible_neighbours_together() {
    let mut p = Pair::new();
    assert_eq!(p.write(1, "k"), GRANTED);
    assert_eq!(p.read(2, "k"), WAITING);
    assert_eq!(p.read(3, "k"), WAITING);
    assert_eq!(p.write(4, "k"), WAITING);
    assert_eq!(p.read(5, "k"), WAITING);
    assert_eq!(p.write(6, "k"), WAITING);
    assert_eq!(p.release(1), vec![granted(2, "k"), granted(3, "k")]);
    assert_eq!(p.release(3), vec![]);
    assert_eq!(p.release(2), vec![granted(4, "k")]);
    assert_eq!(p.release(4), vec![granted(5, "k")]);
    assert_eq!(p.release(5), vec![granted(6, "k")]);
}

#[test]
fn a_cycle_of_two_writers_is_a_deadlock() {
    let mut p = Pair::new();
    assert_eq!(p.write(1, "a"), GRANTED);
    assert_eq!(p.write(2, "b"), GRANTED);
    assert_eq!(p.write(1, "b"), WAITING);
    assert_eq!(p.write(2, "a"), DEADLOCK);
    assert_eq!(p.release(2), vec![granted(1, "b")]);
}

#[test]
fn a_cycle_of_three_is_a_deadlock_and_a_chain_is_not() {
    let mut p = Pair::new();
    for (n, key) in [(1, "a"), (2, "b"), (3, "c"), (4, "d")] {
        assert_eq!(p.write(n, key), GRANTED);
    }
    assert_eq!(p.write(1, "b"), WAITING);
    assert_eq!(p.read(2, "c"), WAITING);
    assert_eq!(p.read(4, "a"), WAITING, "4 -> 1 -> 2 -> 3: a chain");
    assert_eq!(p.write(3, "a"), DEADLOCK, "3 -> 1 -> 2 -> 3: a cycle");
    assert_eq!(p.release(3), vec![granted(2, "c")]);
    assert_eq!(p.release(2), vec![granted(1, "b")]);
    assert_eq!(p.release(1), vec![granted(4, "a")]);
}

#[test]
fn a_waiter_waits_for_the_waiters_ahead_of_it_too() {
    let mut p = Pair::new();
    assert_eq!(p.read(1, "k"), GRANTED);
    assert_eq!(p.write(2, "k"), WAITING, "2 waits for reader 1");
    assert_eq!(p.write(3, "j"), GRANTED);
    assert_eq!(
        p.read(3, "k"),
        WAITING,
        "3 is compatible with 1 but queues behind 2"
    );
    // 1 -> 3 (holder of j) -> 2 (ahead in k's queue) -> 1 (holder of k).
    assert_eq!(p.write(1, "j"), DEADLOCK);
    assert_eq!(p.release(1), vec![granted(2, "k")]);
    assert_eq!(p.release(2), vec![granted(3, "k")]);
}

#[test]
fn a_lock_not_granted_within_the_timeout_aborts_its_transaction() {
    let mut p = Pair::with(LockConfig {
        lock_timeout: ms(100),
        ..LockConfig::default()
    });
    assert_eq!(p.0.next_deadline(), None);
    assert_eq!(p.write_at(ms(0), 1, "k"), GRANTED);
    assert_eq!(p.write_at(ms(10), 2, "k"), WAITING);
    assert_eq!(p.read_at(ms(30), 3, "k"), WAITING);
    assert_eq!(p.0.next_deadline(), Some(ms(110)));
    assert_eq!(p.expire(ms(109)), vec![]);
    assert_eq!(p.expire(ms(110)), vec![(tx(2), AbortReason::LockTimeout)]);
    assert!(!p.0.is_waiting(tx(2)));
    assert_eq!(p.0.next_deadline(), Some(ms(130)));
    assert_eq!(p.release(2), vec![]);
    assert_eq!(p.release(1), vec![granted(3, "k")]);
    assert_eq!(p.0.next_deadline(), None);
    assert_eq!(p.expire(ms(1_000)), vec![]);
}

#[test]
fn an_expired_waiter_stops_blocking_those_behind_it_and_their_grant_comes_with_its_release() {
    let mut p = Pair::with(LockConfig {
        lock_timeout: ms(100),
        ..LockConfig::default()
    });
    assert_eq!(p.read_at(ms(0), 1, "k"), GRANTED);
    assert_eq!(p.write_at(ms(0), 2, "k"), WAITING);
    assert_eq!(p.read_at(ms(50), 3, "k"), WAITING);
    assert_eq!(p.expire(ms(100)), vec![(tx(2), AbortReason::LockTimeout)]);
    assert_eq!(p.mode(3, "k"), Some(LockMode::Shared), "granted at once");
    assert_eq!(p.release(2), vec![granted(3, "k")], "and reported here");
}

#[test]
fn releasing_a_waiting_transaction_drops_its_wait() {
    let mut p = Pair::new();
    assert_eq!(p.read(1, "k"), GRANTED);
    assert_eq!(p.write(2, "k"), WAITING);
    assert_eq!(p.read(3, "k"), WAITING);
    assert_eq!(p.release(2), vec![granted(3, "k")]);
    assert_eq!(p.0.locks_held(tx(2)), 0);
}

#[test]
fn a_deadlock_found_when_a_release_moves_a_waiter_on_is_reported_by_expire() {
    let mut p = Pair::new();
    assert_eq!(p.scan(1), GRANTED);
    assert_eq!(p.read(2, "j"), GRANTED);
    assert_eq!(p.read(3, "k"), GRANTED);
    // Both wait for the scanner on the volume (IS -> IX), before their keys.
    assert_eq!(p.write(2, "k"), WAITING);
    assert_eq!(p.write(3, "j"), WAITING);
    // Both get IX; then 2 waits for 3 on k, and 3, waiting for 2 on j, closes the cycle.
    assert_eq!(p.release(1), vec![]);
    assert_eq!(p.0.next_deadline(), Some(Duration::ZERO), "call expire now");
    assert_eq!(p.expire(ms(1)), vec![(tx(3), AbortReason::Deadlock)]);
    assert_eq!(
        p.0.next_deadline(),
        Some(LockConfig::default().lock_timeout)
    );
    assert_eq!(p.release(3), vec![granted(2, "k")]);
}

#[test]
fn an_unreported_outcome_is_dropped_when_its_transaction_is_released_first() {
    let mut p = Pair::new();
    assert_eq!(p.scan(1), GRANTED);
    assert_eq!(p.read(2, "j"), GRANTED);
    assert_eq!(p.read(3, "k"), GRANTED);
    assert_eq!(p.write(2, "k"), WAITING);
    assert_eq!(p.write(3, "j"), WAITING);
    assert_eq!(p.release(1), vec![]);
    // The owner ends 3 for its own reason before it hears of the deadlock.
    assert_eq!(p.release(3), vec![granted(2, "k")]);
    assert_eq!(p.0.next_deadline(), None);
    assert_eq!(p.expire(ms(1)), vec![]);
}

#[test]
fn a_scan_waits_for_writers_and_writers_wait_for_a_scan() {
    let mut p = Pair::new();
    assert_eq!(p.write(1, "k"), GRANTED);
    assert_eq!(p.scan(2), WAITING);
    assert_eq!(
        p.read(3, "j"),
        WAITING,
        "a new reader queues behind the scan"
    );
    assert_eq!(p.release(1), vec![scan_granted(2), granted(3, "j")]);
    assert_eq!(p.write(4, "m"), WAITING, "no write under a scan");
    assert_eq!(p.read(5, "m"), WAITING, "and FIFO behind that writer");
    assert_eq!(p.release(2), vec![granted(4, "m")]);
    assert_eq!(p.release(4), vec![granted(5, "m")]);
}

#[test]
fn a_writer_that_scans_holds_six_which_admits_readers_only() {
    let mut p = Pair::new();
    assert_eq!(p.write(1, "a"), GRANTED);
    assert_eq!(p.scan(1), GRANTED);
    assert_eq!(
        p.0.held_mode(tx(1), None),
        Some(LockMode::SharedIntentExclusive)
    );
    assert_eq!(p.read(2, "b"), GRANTED);
    assert_eq!(p.write(2, "b"), WAITING, "IS -> IX conflicts with SIX");
    assert_eq!(p.write(1, "c"), GRANTED, "its own writes go on");
    assert_eq!(p.release(1), vec![granted(2, "b")]);
}

#[test]
fn in_doubt_locks_block_others_until_the_outcome_is_applied() {
    let mut p = Pair::new();
    let keys = [b"a".to_vec(), b"b".to_vec(), b"a".to_vec()];
    p.checked(|p| p.relock_in_doubt(tx(9), &keys))
        .expect("relock");
    assert_eq!(p.0.locks_held(tx(9)), 3, "two keys and the volume");
    assert_eq!(p.mode(9, "a"), Some(LockMode::Exclusive));
    assert_eq!(p.read(1, "a"), WAITING);
    assert_eq!(p.write(2, "b"), WAITING);
    assert_eq!(
        p.read(3, "c"),
        GRANTED,
        "every other record is open at once"
    );
    assert_eq!(p.scan(4), WAITING);
    assert_eq!(p.release(9), vec![granted(1, "a"), granted(2, "b")]);
    assert_eq!(p.release(2), vec![scan_granted(4)]);
}

#[test]
fn an_in_doubt_relock_takes_all_or_nothing() {
    let mut p = Pair::new();
    assert_eq!(p.read(1, "b"), GRANTED);
    let err = p
        .checked(|p| p.relock_in_doubt(tx(9), &[b"a".to_vec(), b"b".to_vec()]))
        .expect_err("b is held");
    assert_eq!(
        err,
        LockError::InDoubtConflict {
            volume: "accounts".into(),
            tx: tx(9),
            key: Some(b"b".to_vec()),
            holder: tx(1),
        }
    );
    assert!(
        err.to_string().contains("transaction 1.1 holds it"),
        "{err}"
    );
    assert_eq!(p.0.locks_held(tx(9)), 0);
    p.checked(|p| p.relock_in_doubt(tx(9), &[]))
        .expect("nothing to lock");
    assert_eq!(p.0.locks_held(tx(9)), 0);
}

#[test]
fn a_transaction_over_its_lock_limit_is_refused_and_keeps_what_it_holds() {
    let mut p = Pair::with(LockConfig {
        max_locks_per_tx: 3,
        ..LockConfig::default()
    });
    assert_eq!(p.write(1, "a"), GRANTED);
    assert_eq!(p.write(1, "b"), GRANTED);
    let err = p.write(1, "c").expect_err("a fourth lock");
    assert!(
        matches!(
            err,
            LockError::TooManyLocks {
                wanted: 4,
                limit: 3,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(p.0.locks_held(tx(1)), 3);
    assert_eq!(p.read(1, "a"), GRANTED, "what it holds needs no new lock");
    let err = p
        .checked(|p| p.relock_in_doubt(tx(1), &[b"d".to_vec()]))
        .expect_err("relock counts too");
    assert!(matches!(err, LockError::TooManyLocks { .. }));
}

#[test]
fn waiters_past_the_limit_are_refused_and_one_transaction_waits_once() {
    let mut p = Pair::with(LockConfig {
        max_waiters: 2,
        ..LockConfig::default()
    });
    assert_eq!(p.write(1, "k"), GRANTED);
    assert_eq!(p.write(2, "k"), WAITING);
    assert_eq!(p.write(3, "k"), WAITING);
    let err = p.write(4, "k").expect_err("a third waiter");
    assert!(
        matches!(err, LockError::TooManyWaiters { limit: 2, .. }),
        "{err}"
    );
    assert_eq!(
        p.0.locks_held(tx(4)),
        0,
        "refused before taking the volume lock"
    );
    assert_eq!(
        p.write(4, "j"),
        GRANTED,
        "a request that need not wait is served"
    );
    let err = p.read(2, "x").expect_err("2 already waits");
    assert!(matches!(err, LockError::AlreadyWaiting { .. }), "{err}");
    let err = p
        .checked(|p| p.relock_in_doubt(tx(2), &[b"x".to_vec()]))
        .expect_err("2 already waits");
    assert!(matches!(err, LockError::AlreadyWaiting { .. }));
}

#[test]
fn an_update_record_carries_the_before_image_and_needs_the_exclusive_lock() {
    let vol = MemoryVolume::new();
    vol.apply(b"k", Some(b"old"), Lsn(1)).expect("apply");
    let mut p = Pair::new();
    assert_eq!(p.read(1, "k"), GRANTED);
    let err =
        p.0.update_record(&vol, tx(1), b"k", Some(b"new".to_vec()))
            .expect_err("only a shared lock");
    assert!(
        matches!(err, VolumeError::NotLockedForWrite { .. }),
        "{err}"
    );
    assert_eq!(p.write(1, "k"), GRANTED);
    let update =
        p.0.update_record(&vol, tx(1), b"k", Some(b"new".to_vec()))
            .expect("update");
    assert_eq!(update.tx, tx(1));
    assert_eq!(update.volume, "accounts");
    assert_eq!(update.key, b"k");
    assert_eq!(update.before.as_deref(), Some(&b"old"[..]));
    assert_eq!(update.after.as_deref(), Some(&b"new"[..]));
    assert_eq!(p.write(1, "absent"), GRANTED);
    let delete =
        p.0.update_record(&vol, tx(1), b"absent", None)
            .expect("update");
    assert_eq!((delete.before, delete.after), (None, None));
}
