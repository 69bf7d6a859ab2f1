//! The volume pair's lock manager: strict two-phase locking (SPEC §4) as a sans-IO state
//! machine. The owner process calls it with `now` passed in and does what its answers say; it
//! reads no clock, holds no thread and iterates no `HashMap`, so one seed replays one run.
//!
//! **Granularity.** Two levels, the volume and its keys ([`LockMode`]): a point read takes IS on
//! the volume then S on the key, a point write IX then X, a range scan S on the whole volume.
//! A scan thus conflicts with every writer of the volume, which is the simplest choice that is
//! serializable (no phantom can appear in a scanned range), at the cost of concurrency between
//! scans and writers; key-range locking is the later refinement. Locks are held until
//! [`VolumePair::release`], which the owner calls after the commit or abort is logged and undone.
//!
//! **Fairness.** A request is granted at once only if it is compatible with every holder and
//! nobody waits before it, so a stream of readers cannot starve a waiting writer (or scanner).
//! A conversion (a holder asking for more, such as S→X) queues ahead of new requests and is
//! granted as soon as the other holders allow; it cannot starve anyone, since modes only rise
//! and a transaction converts at most three times per resource.
//!
//! **Deadlock.** Every time a transaction starts waiting, the wait-for graph is searched from
//! it; if the wait closes a cycle, that transaction (the requester) is the victim and ends with
//! [`AbortReason::Deadlock`]. The requester, because its request is the one in hand: the abort
//! is the answer to its own call, no other transaction's operation is interrupted, and the
//! choice is deterministic. A waiter waits for the holders of modes incompatible with its own
//! and, unless it converts, for every waiter ahead of it (FIFO). Since a transaction waits for
//! one lock at a time, a cycle can only be closed by a new wait, and it always contains the new
//! waiter, so searching from it finds every cycle.
//!
//! **Reporting.** Each outcome of a waiting request is reported exactly once, and never after
//! the transaction's `release`: grants by [`VolumePair::release`], aborts by
//! [`VolumePair::expire`]. An operation can wait twice (first for the volume, then for the key);
//! when a release grants its volume lock and its key wait then closes a cycle, the abort is kept
//! for `expire`, and [`VolumePair::next_deadline`] returns zero so the driver calls it at once.
//! Grants that an expiry makes possible are returned by the next `release`, which the owner
//! calls for every transaction `expire` aborted.
//!
//! **Bounds.** A transaction holds at most `max_locks_per_tx` locks (the volume's counts as
//! one), and at most `max_waiters` transactions wait; a request past either is refused with a
//! [`LockError`] and changes nothing. The number of transactions is the owner's to bound.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;
use std::time::Duration;

use duplex_pair::{AbortReason, TxId, Update};
use thiserror::Error;
use tracing::debug;

use crate::access::{VolumeAccess, VolumeError};
use crate::mode::LockMode;

/// Limits and timing of one volume pair's locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockConfig {
    /// How long a request may wait before its transaction is aborted with
    /// [`AbortReason::LockTimeout`]; counted from when the operation first waited.
    pub lock_timeout: Duration,
    /// Transactions waiting at once; past it a request that would wait is refused.
    pub max_waiters: usize,
    /// Locks one transaction may hold in this volume, the volume-level lock included.
    pub max_locks_per_tx: usize,
}

impl Default for LockConfig {
    fn default() -> Self {
        LockConfig {
            lock_timeout: Duration::from_secs(5),
            max_waiters: 4_096,
            max_locks_per_tx: 10_000,
        }
    }
}

/// The answer to a lock request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockOutcome {
    /// The transaction holds the locks: go on with the operation.
    Granted,
    /// The transaction waits; a later [`Granted`] from `release`, or an abort from `expire`,
    /// ends the wait.
    Waiting,
    /// Waiting would close a cycle of waiters: this transaction is the victim. Its locks stay
    /// held until the owner has undone it and called `release`.
    Aborted(AbortReason),
}

/// A waiting operation whose locks are now all held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    pub tx: TxId,
    /// The key read or written; `None`: the volume-level scan lock.
    pub key: Option<Vec<u8>>,
}

/// A request refused without changing anything.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LockError {
    #[error(
        "volume {volume}: transaction {tx} would hold {wanted} locks, over the limit of {limit} per transaction"
    )]
    TooManyLocks {
        volume: String,
        tx: TxId,
        wanted: usize,
        limit: usize,
    },
    #[error(
        "volume {volume}: {limit} transactions already wait for locks (the limit); transaction {tx} was refused rather than queued"
    )]
    TooManyWaiters {
        volume: String,
        tx: TxId,
        limit: usize,
    },
    #[error(
        "volume {volume}: transaction {tx} already waits for a lock; it may wait for one at a time"
    )]
    AlreadyWaiting { volume: String, tx: TxId },
    #[error(
        "volume {volume}: in-doubt transaction {tx} cannot take back its lock on {}: transaction {holder} holds it",
        lock_name(.key.as_deref())
    )]
    InDoubtConflict {
        volume: String,
        tx: TxId,
        /// `None`: the volume-level lock.
        key: Option<Vec<u8>>,
        holder: TxId,
    },
}

fn lock_name(key: Option<&[u8]>) -> String {
    key.map_or_else(|| "the volume".to_string(), |k| format!("key {k:?}"))
}

/// What a lock is taken on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Resource {
    Volume,
    Key(Vec<u8>),
}

impl Resource {
    fn of(key: Option<&[u8]>) -> Resource {
        key.map_or(Resource::Volume, |k| Resource::Key(k.to_vec()))
    }

    fn key(&self) -> Option<Vec<u8>> {
        match self {
            Resource::Volume => None,
            Resource::Key(k) => Some(k.clone()),
        }
    }
}

/// An operation that takes locks, in the order it takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Read(Vec<u8>),
    Write(Vec<u8>),
    Scan,
}

impl Op {
    /// The operation's `i`th lock: the volume's first, then the key's.
    fn step(&self, i: usize) -> Option<(Resource, LockMode)> {
        match (self, i) {
            (Op::Read(_), 0) => Some((Resource::Volume, LockMode::IntentShared)),
            (Op::Read(k), 1) => Some((Resource::Key(k.clone()), LockMode::Shared)),
            (Op::Write(_), 0) => Some((Resource::Volume, LockMode::IntentExclusive)),
            (Op::Write(k), 1) => Some((Resource::Key(k.clone()), LockMode::Exclusive)),
            (Op::Scan, 0) => Some((Resource::Volume, LockMode::Shared)),
            _ => None,
        }
    }

    fn steps(&self) -> impl Iterator<Item = (Resource, LockMode)> + '_ {
        (0..).map_while(|i| self.step(i))
    }

    fn key(&self) -> Option<Vec<u8>> {
        match self {
            Op::Read(k) | Op::Write(k) => Some(k.clone()),
            Op::Scan => None,
        }
    }
}

#[derive(Debug)]
struct Waiter {
    tx: TxId,
    /// The mode it will hold when granted (for a conversion, the join with what it holds).
    mode: LockMode,
    /// It already holds the resource in a weaker mode.
    conversion: bool,
}

#[derive(Debug, Default)]
struct LockState {
    granted: BTreeMap<TxId, LockMode>,
    /// Holders per mode (indexed by [`LockMode::index`]), so that a request on the volume,
    /// which every transaction holds, is checked in constant time.
    holders_per_mode: [usize; LockMode::ALL.len()],
    /// Conversions first, then new requests, each in arrival order.
    queue: VecDeque<Waiter>,
}

impl LockState {
    fn set_granted(&mut self, tx: TxId, mode: LockMode) {
        if let Some(old) = self.granted.insert(tx, mode) {
            self.holders_per_mode[old.index()] -= 1;
        }
        self.holders_per_mode[mode.index()] += 1;
    }

    fn remove_granted(&mut self, tx: TxId) {
        if let Some(old) = self.granted.remove(&tx) {
            self.holders_per_mode[old.index()] -= 1;
        }
    }

    fn compatible_with_others(&self, tx: TxId, mode: LockMode) -> bool {
        let own = self.granted.get(&tx).copied();
        LockMode::ALL.into_iter().all(|m| {
            let others = self.holders_per_mode[m.index()] - usize::from(own == Some(m));
            others == 0 || m.compatible(mode)
        })
    }

    /// Whether the waiter at `position` may be granted now: a conversion when the other
    /// holders allow it, a new request only when nobody waits before it.
    fn grantable(&self, position: usize, waiter: &Waiter) -> bool {
        (waiter.conversion || position == 0) && self.compatible_with_others(waiter.tx, waiter.mode)
    }
}

/// A transaction's operation that is not yet granted.
#[derive(Debug)]
struct Wait {
    op: Op,
    /// The lock it waits for: `op.step(step)`; the earlier ones are held.
    step: usize,
    deadline: Duration,
}

#[derive(Debug, Default)]
struct TxLocks {
    held: BTreeSet<Resource>,
    wait: Option<Wait>,
}

enum Check {
    Held,
    Grant(LockMode),
    Wait { mode: LockMode, conversion: bool },
}

enum Advance {
    Granted,
    Waiting,
    Deadlock,
}

/// The record locks of one data volume, and the update records written under them.
#[derive(Debug)]
pub struct VolumePair {
    volume: String,
    config: LockConfig,
    locks: BTreeMap<Resource, LockState>,
    /// Every transaction that holds or waits for a lock here, and no other.
    txs: BTreeMap<TxId, TxLocks>,
    /// (deadline, tx) of every waiting transaction.
    deadlines: BTreeSet<(Duration, TxId)>,
    unreported_grants: Vec<Granted>,
    unreported_aborts: Vec<(TxId, AbortReason)>,
}

impl VolumePair {
    pub fn new(volume: String, config: LockConfig) -> Self {
        VolumePair {
            volume,
            config,
            locks: BTreeMap::new(),
            txs: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            unreported_grants: Vec::new(),
            unreported_aborts: Vec::new(),
        }
    }

    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// Read `key` inside `tx`: takes a shared record lock (held to the end of tx).
    pub fn read(&mut self, now: Duration, tx: TxId, key: &[u8]) -> Result<LockOutcome, LockError> {
        self.request(now, tx, Op::Read(key.to_vec()))
    }

    /// Prepare a write of `key` inside `tx` (put or delete): takes an exclusive lock.
    pub fn lock_for_write(
        &mut self,
        now: Duration,
        tx: TxId,
        key: &[u8],
    ) -> Result<LockOutcome, LockError> {
        self.request(now, tx, Op::Write(key.to_vec()))
    }

    /// A range scan inside `tx`: a shared lock on the whole volume (see the module docs), so
    /// any range may then be read with [`VolumeAccess::scan`] until the transaction ends.
    pub fn lock_for_scan(&mut self, now: Duration, tx: TxId) -> Result<LockOutcome, LockError> {
        self.request(now, tx, Op::Scan)
    }

    /// The update record the owner logs before it applies a write whose lock `tx` holds: the
    /// before image read from `vol`, the after image given (`None`: delete).
    pub fn update_record<V: VolumeAccess + ?Sized>(
        &self,
        vol: &V,
        tx: TxId,
        key: &[u8],
        after: Option<Vec<u8>>,
    ) -> Result<Update, VolumeError> {
        if self.held_mode(tx, Some(key)) != Some(LockMode::Exclusive) {
            return Err(VolumeError::NotLockedForWrite {
                tx,
                volume: self.volume.clone(),
                key: key.to_vec(),
            });
        }
        Ok(Update {
            tx,
            volume: self.volume.clone(),
            key: key.to_vec(),
            before: vol.get(key)?,
            after,
        })
    }

    /// Ends `tx` (committed or aborted, already logged and undone): drops its wait, releases
    /// all its locks and returns the operations now granted, in a deterministic order (those
    /// an earlier `expire` made possible first, then by resource, volume before keys, and
    /// queue order).
    pub fn release(&mut self, tx: TxId) -> Vec<Granted> {
        self.unreported_grants.retain(|g| g.tx != tx);
        self.unreported_aborts.retain(|(t, _)| *t != tx);
        let mut dirty = BTreeSet::new();
        dirty.extend(self.drop_wait(tx));
        if let Some(entry) = self.txs.remove(&tx) {
            for res in entry.held {
                if let Some(state) = self.locks.get_mut(&res) {
                    state.remove_granted(tx);
                }
                dirty.insert(res);
            }
        }
        self.settle(dirty);
        std::mem::take(&mut self.unreported_grants)
    }

    /// Aborts every waiter whose deadline is at or before `now` with
    /// [`AbortReason::LockTimeout`], dropping its wait (its locks stay held until `release`),
    /// and returns those with the deadlock victims found since the last call.
    pub fn expire(&mut self, now: Duration) -> Vec<(TxId, AbortReason)> {
        loop {
            // A waiter moved on by an earlier round keeps its deadline, which may be due too.
            let due: Vec<TxId> = self
                .deadlines
                .iter()
                .take_while(|(deadline, _)| *deadline <= now)
                .map(|(_, tx)| *tx)
                .collect();
            if due.is_empty() {
                break;
            }
            let mut dirty = BTreeSet::new();
            for tx in due {
                debug!(volume = %self.volume, %tx, "lock wait timed out");
                dirty.extend(self.drop_wait(tx));
                self.unreported_aborts.push((tx, AbortReason::LockTimeout));
            }
            self.settle(dirty);
        }
        std::mem::take(&mut self.unreported_aborts)
    }

    /// When `expire` has something to do: the earliest deadline of a waiter, or zero while a
    /// deadlock victim is unreported.
    pub fn next_deadline(&self) -> Option<Duration> {
        if !self.unreported_aborts.is_empty() {
            return Some(Duration::ZERO);
        }
        self.deadlines.first().map(|(deadline, _)| *deadline)
    }

    /// Takes the exclusive locks of an in-doubt (prepared) transaction again during recovery,
    /// before anything else runs, so its records stay locked until its outcome is known. Takes
    /// all or nothing: another holder of a conflicting lock is an error.
    pub fn relock_in_doubt(&mut self, tx: TxId, keys: &[Vec<u8>]) -> Result<(), LockError> {
        if keys.is_empty() {
            return Ok(());
        }
        if self.txs.get(&tx).is_some_and(|e| e.wait.is_some()) {
            return Err(self.already_waiting(tx));
        }
        let wanted: BTreeMap<Resource, LockMode> =
            std::iter::once((Resource::Volume, LockMode::IntentExclusive))
                .chain(
                    keys.iter()
                        .map(|k| (Resource::Key(k.clone()), LockMode::Exclusive)),
                )
                .collect();
        self.check_lock_limit(tx, wanted.keys().cloned())?;
        let mut grants = Vec::with_capacity(wanted.len());
        for (res, want) in wanted {
            let mode = match self.locks.get(&res) {
                Some(state) => {
                    let mode = state.granted.get(&tx).map_or(want, |h| h.join(want));
                    let conflict = state
                        .granted
                        .iter()
                        .find(|(t, m)| **t != tx && !m.compatible(mode));
                    if let Some((holder, _)) = conflict {
                        return Err(LockError::InDoubtConflict {
                            volume: self.volume.clone(),
                            tx,
                            key: res.key(),
                            holder: *holder,
                        });
                    }
                    mode
                }
                None => want,
            };
            grants.push((res, mode));
        }
        for (res, mode) in grants {
            self.grant(res, tx, mode);
        }
        Ok(())
    }

    /// Locks `tx` holds in this volume, the volume-level one included.
    pub fn locks_held(&self, tx: TxId) -> usize {
        self.txs.get(&tx).map_or(0, |e| e.held.len())
    }

    /// The mode `tx` holds on `key` (`None`: on the volume), if any.
    pub fn held_mode(&self, tx: TxId, key: Option<&[u8]>) -> Option<LockMode> {
        self.locks
            .get(&Resource::of(key))
            .and_then(|s| s.granted.get(&tx).copied())
    }

    /// Whether `tx` waits for a lock.
    pub fn is_waiting(&self, tx: TxId) -> bool {
        self.txs.get(&tx).is_some_and(|e| e.wait.is_some())
    }

    /// Checks every invariant of the lock table; for tests and simulations after every step.
    pub fn validate(&self) -> Result<(), String> {
        let v = &self.volume;
        let mut waiting_on: BTreeMap<TxId, &Resource> = BTreeMap::new();
        for (res, state) in &self.locks {
            if state.granted.is_empty() && state.queue.is_empty() {
                return Err(format!("{v}: {res:?} is kept without holders or waiters"));
            }
            let mut counted = [0; LockMode::ALL.len()];
            for mode in state.granted.values() {
                counted[mode.index()] += 1;
            }
            if counted != state.holders_per_mode {
                return Err(format!(
                    "{v}: {res:?} counts holders per mode {:?}, but they are {counted:?}",
                    state.holders_per_mode
                ));
            }
            for (a, ma) in &state.granted {
                for (b, mb) in state.granted.range((Bound::Excluded(a), Bound::Unbounded)) {
                    if !ma.compatible(*mb) {
                        return Err(format!(
                            "{v}: {res:?} is held by {a} in {ma:?} and by {b} in {mb:?} at once"
                        ));
                    }
                }
                if !self.txs.get(a).is_some_and(|e| e.held.contains(res)) {
                    return Err(format!(
                        "{v}: {a} holds {res:?} but its entry does not say so"
                    ));
                }
            }
            let mut new_request_seen = false;
            for (position, w) in state.queue.iter().enumerate() {
                if let Some(other) = waiting_on.insert(w.tx, res) {
                    return Err(format!("{v}: {} waits for {res:?} and {other:?}", w.tx));
                }
                let held = state.granted.get(&w.tx).copied();
                if w.conversion != held.is_some() {
                    return Err(format!(
                        "{v}: {} waits for {res:?} as conversion={} but holds {held:?}",
                        w.tx, w.conversion
                    ));
                }
                if let Some(h) = held
                    && (h.covers(w.mode) || !w.mode.covers(h))
                {
                    return Err(format!(
                        "{v}: {} converts {res:?} from {h:?} to {:?}, which is not stronger",
                        w.tx, w.mode
                    ));
                }
                if w.conversion && new_request_seen {
                    return Err(format!(
                        "{v}: a conversion of {} queues behind a new request for {res:?}",
                        w.tx
                    ));
                }
                new_request_seen |= !w.conversion;
                if state.grantable(position, w) {
                    return Err(format!(
                        "{v}: {} waits for {res:?} in {:?} though it could be granted",
                        w.tx, w.mode
                    ));
                }
            }
        }
        for (tx, entry) in &self.txs {
            if entry.held.is_empty() && entry.wait.is_none() {
                return Err(format!("{v}: {tx} is kept without locks or a wait"));
            }
            if entry.held.len() > self.config.max_locks_per_tx {
                return Err(format!(
                    "{v}: {tx} holds {} locks, over the limit of {}",
                    entry.held.len(),
                    self.config.max_locks_per_tx
                ));
            }
            for res in &entry.held {
                if self
                    .locks
                    .get(res)
                    .and_then(|s| s.granted.get(tx))
                    .is_none()
                {
                    return Err(format!(
                        "{v}: {tx}'s entry names {res:?}, which it does not hold"
                    ));
                }
            }
            match (&entry.wait, waiting_on.get(tx)) {
                (None, None) => {}
                (Some(wait), Some(res)) => {
                    if wait.op.step(wait.step).map(|(r, _)| r).as_ref() != Some(*res) {
                        return Err(format!(
                            "{v}: {tx} queues for {res:?}, not its step {}",
                            wait.step
                        ));
                    }
                    for (earlier, mode) in wait.op.steps().take(wait.step) {
                        if !self
                            .locks
                            .get(&earlier)
                            .and_then(|s| s.granted.get(tx))
                            .is_some_and(|h| h.covers(mode))
                        {
                            return Err(format!(
                                "{v}: {tx} waits past {earlier:?} without holding it in {mode:?}"
                            ));
                        }
                    }
                    if !self.deadlines.contains(&(wait.deadline, *tx)) {
                        return Err(format!("{v}: {tx} waits without its deadline"));
                    }
                }
                (wait, queued) => {
                    return Err(format!(
                        "{v}: {tx} has wait {wait:?} but is queued for {queued:?}"
                    ));
                }
            }
        }
        if self.deadlines.len() != waiting_on.len() {
            return Err(format!(
                "{v}: {} deadlines for {} waiters",
                self.deadlines.len(),
                waiting_on.len()
            ));
        }
        if waiting_on.len() > self.config.max_waiters {
            return Err(format!(
                "{v}: {} waiters, over the limit of {}",
                waiting_on.len(),
                self.config.max_waiters
            ));
        }
        let unreported = self
            .unreported_grants
            .iter()
            .map(|g| g.tx)
            .chain(self.unreported_aborts.iter().map(|(tx, _)| *tx));
        for tx in unreported {
            if waiting_on.contains_key(&tx) {
                return Err(format!(
                    "{v}: {tx} waits though its wait's end is unreported"
                ));
            }
        }
        for tx in waiting_on.keys() {
            if self.waits_for_itself(*tx) {
                return Err(format!(
                    "{v}: a cycle of waiters through {tx} was not broken"
                ));
            }
        }
        Ok(())
    }

    fn request(&mut self, now: Duration, tx: TxId, op: Op) -> Result<LockOutcome, LockError> {
        if self.is_waiting(tx) {
            return Err(self.already_waiting(tx));
        }
        self.check_lock_limit(tx, op.steps().map(|(r, _)| r))?;
        let must_wait = op
            .steps()
            .any(|(res, want)| matches!(self.check(&res, tx, want), Check::Wait { .. }));
        if must_wait && self.deadlines.len() >= self.config.max_waiters {
            return Err(LockError::TooManyWaiters {
                volume: self.volume.clone(),
                tx,
                limit: self.config.max_waiters,
            });
        }
        let wait = Wait {
            op,
            step: 0,
            deadline: now
                .checked_add(self.config.lock_timeout)
                .unwrap_or(Duration::MAX),
        };
        Ok(match self.advance(tx, wait) {
            Advance::Granted => LockOutcome::Granted,
            Advance::Waiting => LockOutcome::Waiting,
            Advance::Deadlock => LockOutcome::Aborted(AbortReason::Deadlock),
        })
    }

    fn already_waiting(&self, tx: TxId) -> LockError {
        LockError::AlreadyWaiting {
            volume: self.volume.clone(),
            tx,
        }
    }

    /// Refuses a request that would take `tx` past `max_locks_per_tx`.
    fn check_lock_limit(
        &self,
        tx: TxId,
        resources: impl Iterator<Item = Resource>,
    ) -> Result<(), LockError> {
        let held = self.txs.get(&tx);
        let new = resources
            .filter(|r| !held.is_some_and(|e| e.held.contains(r)))
            .count();
        let wanted = held.map_or(0, |e| e.held.len()) + new;
        if wanted > self.config.max_locks_per_tx {
            return Err(LockError::TooManyLocks {
                volume: self.volume.clone(),
                tx,
                wanted,
                limit: self.config.max_locks_per_tx,
            });
        }
        Ok(())
    }

    fn check(&self, res: &Resource, tx: TxId, want: LockMode) -> Check {
        let Some(state) = self.locks.get(res) else {
            return Check::Grant(want);
        };
        let held = state.granted.get(&tx).copied();
        let mode = held.map_or(want, |h| h.join(want));
        if held == Some(mode) {
            return Check::Held;
        }
        let conversion = held.is_some();
        if state.compatible_with_others(tx, mode) && (conversion || state.queue.is_empty()) {
            Check::Grant(mode)
        } else {
            Check::Wait { mode, conversion }
        }
    }

    fn grant(&mut self, res: Resource, tx: TxId, mode: LockMode) {
        self.locks
            .entry(res.clone())
            .or_default()
            .set_granted(tx, mode);
        self.txs.entry(tx).or_default().held.insert(res);
    }

    /// Takes `tx`'s locks in order from `wait.step` until one must wait (then queues it) or
    /// all are held.
    fn advance(&mut self, tx: TxId, mut wait: Wait) -> Advance {
        while let Some((res, want)) = wait.op.step(wait.step) {
            match self.check(&res, tx, want) {
                Check::Held => wait.step += 1,
                Check::Grant(mode) => {
                    self.grant(res, tx, mode);
                    wait.step += 1;
                }
                Check::Wait { mode, conversion } => {
                    let queue = &mut self.locks.entry(res.clone()).or_default().queue;
                    let waiter = Waiter {
                        tx,
                        mode,
                        conversion,
                    };
                    if conversion {
                        let position = queue.iter().take_while(|w| w.conversion).count();
                        queue.insert(position, waiter);
                    } else {
                        queue.push_back(waiter);
                    }
                    let deadline = wait.deadline;
                    self.txs.entry(tx).or_default().wait = Some(wait);
                    self.deadlines.insert((deadline, tx));
                    if !self.waits_for_itself(tx) {
                        return Advance::Waiting;
                    }
                    debug!(volume = %self.volume, %tx, resource = ?res, "deadlock: the requester is the victim");
                    // Taking the new waiter out restores the queue as it was: nothing to grant.
                    self.drop_wait(tx);
                    return Advance::Deadlock;
                }
            }
        }
        self.deadlines.remove(&(wait.deadline, tx));
        Advance::Granted
    }

    /// Takes `tx` out of the queue it waits in and forgets its entry if it holds nothing;
    /// returns the resource it waited for.
    fn drop_wait(&mut self, tx: TxId) -> Option<Resource> {
        let entry = self.txs.get_mut(&tx)?;
        let wait = entry.wait.take()?;
        if entry.held.is_empty() {
            self.txs.remove(&tx);
        }
        self.deadlines.remove(&(wait.deadline, tx));
        let (res, _) = wait.op.step(wait.step)?;
        if let Some(state) = self.locks.get_mut(&res) {
            state.queue.retain(|w| w.tx != tx);
            if state.granted.is_empty() && state.queue.is_empty() {
                self.locks.remove(&res);
            }
        }
        Some(res)
    }

    /// Grants what the changes to `dirty` resources made possible, and moves each granted
    /// operation on to its next lock, until nothing more changes.
    fn settle(&mut self, mut dirty: BTreeSet<Resource>) {
        let mut moved = VecDeque::new();
        loop {
            if let Some(res) = dirty.pop_first() {
                moved.extend(self.regrant(res));
                continue;
            }
            let Some(tx) = moved.pop_front() else { break };
            let Some(wait) = self.txs.get_mut(&tx).and_then(|e| e.wait.take()) else {
                continue;
            };
            let key = wait.op.key();
            match self.advance(tx, wait) {
                Advance::Granted => self.unreported_grants.push(Granted { tx, key }),
                Advance::Waiting => {}
                Advance::Deadlock => self.unreported_aborts.push((tx, AbortReason::Deadlock)),
            }
        }
    }

    /// Grants the waiters of `res` that may be granted now; returns them in queue order.
    fn regrant(&mut self, res: Resource) -> Vec<TxId> {
        let Some(state) = self.locks.get_mut(&res) else {
            return Vec::new();
        };
        let mut granted = Vec::new();
        let mut position = 0;
        while let Some(w) = state.queue.get(position) {
            if state.grantable(position, w) {
                let (tx, mode) = (w.tx, w.mode);
                state.queue.remove(position);
                state.set_granted(tx, mode);
                granted.push(tx);
            } else if w.conversion {
                position += 1;
            } else {
                break;
            }
        }
        if state.granted.is_empty() && state.queue.is_empty() {
            self.locks.remove(&res);
        }
        for tx in &granted {
            self.txs.entry(*tx).or_default().held.insert(res.clone());
        }
        granted
    }

    /// Whom waiting `tx` waits for: holders of modes incompatible with the one it asks for
    /// and, unless it converts, every waiter ahead of it.
    fn blockers(&self, tx: TxId) -> Vec<TxId> {
        let Some(wait) = self.txs.get(&tx).and_then(|e| e.wait.as_ref()) else {
            return Vec::new();
        };
        let Some(state) = wait
            .op
            .step(wait.step)
            .and_then(|(r, _)| self.locks.get(&r))
        else {
            return Vec::new();
        };
        let Some(position) = state.queue.iter().position(|w| w.tx == tx) else {
            return Vec::new();
        };
        let me = &state.queue[position];
        let mut out: Vec<TxId> = state
            .granted
            .iter()
            .filter(|(t, m)| **t != tx && !m.compatible(me.mode))
            .map(|(t, _)| *t)
            .collect();
        if !me.conversion {
            out.extend(state.queue.iter().take(position).map(|w| w.tx));
        }
        out
    }

    /// Whether the wait-for graph leads from `start` back to it.
    fn waits_for_itself(&self, start: TxId) -> bool {
        let mut seen = BTreeSet::new();
        let mut stack = self.blockers(start);
        while let Some(tx) = stack.pop() {
            if tx == start {
                return true;
            }
            if seen.insert(tx) {
                stack.extend(self.blockers(tx));
            }
        }
        false
    }
}
