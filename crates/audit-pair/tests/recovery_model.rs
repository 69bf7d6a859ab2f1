//! The property of recovery: redo + undo of any prefix of any trail gives the committed state
//! of a model.
//!
//! A seeded generator plays a primary: interleaved transactions over a few volumes and keys
//! under strict two-phase locking (a transaction writes only keys no other live transaction
//! holds), commits, aborts written as a live primary writes them (compensations, then the abort
//! record), prepares, checkpoints with the active list and message table, state changes, and
//! takeovers whose own undo may crash half way. Every prefix of its trail is a crash. For each,
//! the test builds a volume a steal/no-force crash could leave (everything at or below the
//! volume's checkpoint LSN, and per key any prefix of the later changes), recovers it, and
//! checks it against an oracle that applies only committed transactions, at their commit
//! records. Then it recovers again after its own records (whole or cut short) and after the
//! in-doubt transactions are resolved.
//!
//! `RECOVERY_SEED=n` replays one history; `RECOVERY_CASES=n` runs n of them.

use std::collections::{BTreeMap, BTreeSet};

use duplex_audit_pair::recovery::{
    Outcome, RecoveryError, RecoveryPlan, TrailRecord, plan_recovery,
};
use duplex_lsg::{LsgId, Lsn, OwnerEpoch, RecordFlags};
use duplex_pair::{
    AbortReason, ActiveTx, AuditBody, Checkpoint, ClientId, CommitState, Compensation, Lookup,
    MessageTable, MessageTableLimits, Prepare, Receipt, Reply, RequestKey, RequestSeq, StateChange,
    TxEnd, TxId, Update,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const VOLUMES: [&str; 3] = ["a", "b", "c"];
const KEYS_PER_VOLUME: u8 = 3;
const STEPS: usize = 90;
const MAX_LIVE: usize = 4;
const RECOVERY_EPOCH: OwnerEpoch = OwnerEpoch(1_000);

type Key = (String, Vec<u8>);
/// What a reader sees: present keys and their values.
type State = BTreeMap<Key, Vec<u8>>;
/// A value as a change leaves it: `None` is deleted.
type Value = Option<Vec<u8>>;
/// A data volume: per key the value and its generation.
type Volume = BTreeMap<Key, (Value, Lsn)>;

// The primary that writes the trail.

#[derive(Debug)]
struct GenTx {
    first_lsn: Lsn,
    updates: Vec<(Lsn, Update)>,
    compensated: BTreeSet<Lsn>,
    prepared: bool,
    /// A compensation was written after its prepare: its coordinator decided abort.
    aborting: bool,
}

#[derive(Debug)]
struct Primary {
    rng: ChaCha8Rng,
    trail: Vec<TrailRecord>,
    /// Every reply the primary gave, with the LSN of the record that logged it.
    replies: Vec<(Lsn, RequestKey, Reply)>,
    epoch: u64,
    next_tx: u64,
    next_seq: u64,
    live: BTreeMap<TxId, GenTx>,
    locks: BTreeMap<Key, TxId>,
    /// The primary's cache, uncommitted changes included: where before images come from.
    cache: BTreeMap<Key, Value>,
    table: MessageTable,
    last_checkpoint: Lsn,
    state: CommitState,
}

impl Primary {
    fn run(seed: u64) -> Primary {
        let mut p = Primary {
            rng: ChaCha8Rng::seed_from_u64(seed),
            trail: Vec::new(),
            replies: Vec::new(),
            epoch: 1,
            next_tx: 1,
            next_seq: 1,
            live: BTreeMap::new(),
            locks: BTreeMap::new(),
            cache: BTreeMap::new(),
            table: MessageTable::new(MessageTableLimits::default()),
            last_checkpoint: Lsn(0),
            state: CommitState::Normal,
        };
        for _ in 0..STEPS {
            match p.rng.random_range(0..100) {
                0..45 => p.update(),
                45..62 => p.commit(),
                62..72 => p.abort(),
                72..80 => p.prepare(),
                80..90 => p.checkpoint(),
                90..95 => p.change_state(),
                _ => p.takeover(),
            }
        }
        p
    }

    fn next_lsn(&self) -> Lsn {
        Lsn(self.trail.len() as u64 + 1)
    }

    fn append(&mut self, body: AuditBody) -> Lsn {
        let lsn = self.next_lsn();
        let flags = if self.state.out_of_communication() {
            RecordFlags::OUT_OF_COMMUNICATION
        } else {
            RecordFlags::NONE
        };
        self.trail.push(TrailRecord { lsn, flags, body });
        lsn
    }

    fn pick_live(&mut self, pred: impl Fn(&GenTx) -> bool) -> Option<TxId> {
        let txs: Vec<TxId> = self
            .live
            .iter()
            .filter(|(_, t)| pred(t))
            .map(|(tx, _)| *tx)
            .collect();
        (!txs.is_empty()).then(|| txs[self.rng.random_range(0..txs.len())])
    }

    fn new_request(&mut self) -> Option<RequestKey> {
        self.rng.random_bool(0.7).then(|| {
            self.next_seq += 1;
            RequestKey {
                client: ClientId(self.next_seq % 3),
                seq: RequestSeq(self.next_seq),
            }
        })
    }

    fn end(&mut self, tx: TxId, body: impl FnOnce(TxEnd) -> AuditBody, reply: Reply) {
        let request = self.new_request();
        let lsn = self.append(body(TxEnd {
            tx,
            epoch: OwnerEpoch(self.epoch),
            request,
        }));
        if let Some(request) = request {
            let reply = match reply {
                Reply::Committed(r) => Reply::Committed(Receipt {
                    commit_lsn: lsn,
                    ..r
                }),
                aborted => aborted,
            };
            self.table.finish(request, reply);
            self.replies.push((lsn, request, reply));
        }
        self.locks.retain(|_, holder| *holder != tx);
        self.live.remove(&tx);
    }

    fn update(&mut self) {
        let existing = self.pick_live(|t| !t.prepared);
        let tx = match existing {
            Some(tx) if self.live.len() >= MAX_LIVE || self.rng.random_bool(0.7) => tx,
            _ if self.live.len() < MAX_LIVE => {
                let tx = TxId {
                    epoch: OwnerEpoch(self.epoch),
                    number: self.next_tx,
                };
                self.next_tx += 1;
                tx
            }
            _ => return,
        };
        let free: Vec<Key> = VOLUMES
            .iter()
            .flat_map(|v| (0..KEYS_PER_VOLUME).map(move |k| (v.to_string(), vec![k])))
            .filter(|key| self.locks.get(key).is_none_or(|holder| *holder == tx))
            .collect();
        if free.is_empty() {
            return;
        }
        let key = free[self.rng.random_range(0..free.len())].clone();
        let lsn = self.next_lsn();
        let after = (!self.rng.random_bool(0.2)).then(|| lsn.0.to_le_bytes().to_vec());
        let update = Update {
            tx,
            volume: key.0.clone(),
            key: key.1.clone(),
            before: self.cache.get(&key).cloned().flatten(),
            after: after.clone(),
        };
        self.append(AuditBody::Update(update.clone()));
        self.cache.insert(key.clone(), after);
        self.locks.insert(key, tx);
        self.live
            .entry(tx)
            .or_insert_with(|| GenTx {
                first_lsn: lsn,
                updates: Vec::new(),
                compensated: BTreeSet::new(),
                prepared: false,
                aborting: false,
            })
            .updates
            .push((lsn, update));
    }

    /// Writes the compensation of `tx`'s newest update not yet compensated; false if none.
    fn compensate_one(&mut self, tx: TxId) -> bool {
        let Some(t) = self.live.get(&tx) else {
            return false;
        };
        let Some((lsn, u)) = t
            .updates
            .iter()
            .rev()
            .find(|(lsn, _)| !t.compensated.contains(lsn))
            .cloned()
        else {
            return false;
        };
        self.append(AuditBody::Compensation(Compensation {
            tx,
            undoes: lsn,
            volume: u.volume.clone(),
            key: u.key.clone(),
            restore: u.before.clone(),
        }));
        self.cache.insert((u.volume, u.key), u.before);
        if let Some(t) = self.live.get_mut(&tx) {
            t.compensated.insert(lsn);
            t.aborting |= t.prepared;
        }
        true
    }

    fn commit(&mut self) {
        if let Some(tx) = self.pick_live(|_| true) {
            let receipt = Receipt {
                commit_lsn: Lsn(0),
                epoch: OwnerEpoch(self.epoch),
                state: self.state,
            };
            self.end(tx, AuditBody::Commit, Reply::Committed(receipt));
        }
    }

    /// A live abort (prepared transactions too: the coordinator decided abort); the primary may
    /// crash half way through it.
    fn abort(&mut self) {
        let Some(tx) = self.pick_live(|_| true) else {
            return;
        };
        loop {
            if self.rng.random_bool(0.1) {
                return self.takeover();
            }
            if !self.compensate_one(tx) {
                break;
            }
        }
        let reason = if self.rng.random_bool(0.5) {
            AbortReason::Requested
        } else {
            AbortReason::Deadlock
        };
        self.end(tx, |e| AuditBody::Abort(e, reason), Reply::Aborted(reason));
    }

    fn prepare(&mut self) {
        let Some(tx) = self.pick_live(|t| !t.prepared) else {
            return;
        };
        let Some(t) = self.live.get_mut(&tx) else {
            return;
        };
        t.prepared = true;
        let write_set: BTreeSet<Key> = t
            .updates
            .iter()
            .map(|(_, u)| (u.volume.clone(), u.key.clone()))
            .collect();
        self.append(AuditBody::Prepare(Prepare {
            tx,
            coordinator: LsgId(7),
            write_set: write_set.into_iter().collect(),
        }));
    }

    fn checkpoint(&mut self) {
        let active = self
            .live
            .iter()
            .map(|(&tx, t)| ActiveTx {
                tx,
                first_lsn: t.first_lsn,
                prepared: t.prepared,
            })
            .collect();
        let (messages, message_lows) = self.table.entries();
        self.last_checkpoint = self.append(AuditBody::Checkpoint(Checkpoint {
            epoch: OwnerEpoch(self.epoch),
            active,
            messages,
            message_lows,
            previous: self.last_checkpoint,
        }));
    }

    fn state_change(&mut self, state: CommitState) {
        self.state = state;
        self.append(AuditBody::StateChange(StateChange {
            epoch: OwnerEpoch(self.epoch),
            state,
            home_backup: None,
        }));
    }

    fn change_state(&mut self) {
        let state = if self.rng.random_bool(0.5) {
            CommitState::Normal
        } else {
            CommitState::PrimaryOnly
        };
        self.state_change(state);
    }

    /// A new owner undoes the losers, and may itself crash after any record it writes.
    fn takeover(&mut self) {
        'owner: loop {
            self.epoch += 1;
            self.next_tx = 1;
            self.state_change(CommitState::BackupOnly);
            let losers = self
                .live
                .iter()
                .filter(|(_, t)| !t.prepared || t.aborting)
                .map(|(tx, _)| *tx)
                .collect::<Vec<_>>();
            for tx in losers {
                loop {
                    if self.rng.random_bool(0.1) {
                        continue 'owner;
                    }
                    if !self.compensate_one(tx) {
                        break;
                    }
                }
                self.end(
                    tx,
                    |e| AuditBody::Abort(e, AbortReason::Recovery),
                    Reply::Aborted(AbortReason::Recovery),
                );
            }
            return;
        }
    }
}

// The oracle.

/// What any recovery of `trail` must end with.
#[derive(Debug, PartialEq, Eq)]
struct Expected {
    /// Committed transactions applied at their commit records, then the writes of in-doubt ones.
    state: State,
    /// In-doubt transactions and their write sets.
    in_doubt: BTreeMap<TxId, Vec<Key>>,
}

fn expected(trail: &[TrailRecord]) -> Expected {
    let mut writes: BTreeMap<TxId, Vec<(Key, Value)>> = BTreeMap::new();
    let mut prepared: BTreeMap<TxId, Vec<Key>> = BTreeMap::new();
    let mut aborting = BTreeSet::new();
    let mut committed = BTreeMap::new();
    for r in trail {
        match &r.body {
            AuditBody::Update(u) => writes
                .entry(u.tx)
                .or_default()
                .push(((u.volume.clone(), u.key.clone()), u.after.clone())),
            AuditBody::Compensation(c) if prepared.contains_key(&c.tx) => {
                aborting.insert(c.tx);
            }
            AuditBody::Commit(e) => {
                committed.extend(writes.remove(&e.tx).unwrap_or_default());
                prepared.remove(&e.tx);
            }
            AuditBody::Abort(e, _) => {
                writes.remove(&e.tx);
                prepared.remove(&e.tx);
            }
            AuditBody::Prepare(p) => {
                prepared.insert(p.tx, p.write_set.clone());
            }
            _ => {}
        }
    }
    prepared.retain(|tx, _| !aborting.contains(tx));
    for tx in prepared.keys() {
        committed.extend(writes.remove(tx).unwrap_or_default());
    }
    Expected {
        state: committed
            .into_iter()
            .filter_map(|(k, v)| Some((k, v?)))
            .collect(),
        in_doubt: prepared,
    }
}

// Volumes.

fn changes(trail: &[TrailRecord]) -> impl Iterator<Item = (Key, Value, Lsn)> + '_ {
    trail.iter().filter_map(|r| match &r.body {
        AuditBody::Update(u) => Some(((u.volume.clone(), u.key.clone()), u.after.clone(), r.lsn)),
        AuditBody::Compensation(c) => {
            Some(((c.volume.clone(), c.key.clone()), c.restore.clone(), r.lsn))
        }
        _ => None,
    })
}

/// What a steal/no-force crash may leave: every change at or below the volume's checkpoint
/// LSN, and per key any prefix of the later ones.
fn crashed_volume(
    trail: &[TrailRecord],
    checkpoints: &BTreeMap<String, Lsn>,
    rng: &mut ChaCha8Rng,
) -> Volume {
    let mut per_key: BTreeMap<Key, Vec<(Value, Lsn)>> = BTreeMap::new();
    for (key, value, lsn) in changes(trail) {
        per_key.entry(key).or_default().push((value, lsn));
    }
    let mut volume = Volume::new();
    for (key, list) in per_key {
        let checkpoint = checkpoints[&key.0];
        let must = list.iter().filter(|(_, lsn)| *lsn <= checkpoint).count();
        let applied = rng.random_range(must..=list.len());
        if applied > 0 {
            volume.insert(key, list[applied - 1].clone());
        }
    }
    volume
}

/// `put` / `delete` at generation `lsn`: skipped at or below the key's generation.
fn apply(volume: &mut Volume, key: Key, value: Value, lsn: Lsn) {
    let slot = volume.entry(key).or_insert((None, Lsn(0)));
    if lsn > slot.1 {
        *slot = (value, lsn);
    }
}

fn visible(volume: &Volume) -> State {
    volume
        .iter()
        .filter_map(|(k, (v, _))| Some((k.clone(), v.clone()?)))
        .collect()
}

fn redo(volume: &mut Volume, plan: &RecoveryPlan) {
    for r in &plan.redo {
        apply(
            volume,
            (r.volume.clone(), r.key.clone()),
            r.value.clone(),
            r.lsn,
        );
    }
}

/// Appends `bodies` to `trail` as the owner would, and applies their compensations.
fn append_and_apply(trail: &mut Vec<TrailRecord>, volume: &mut Volume, bodies: Vec<AuditBody>) {
    for body in bodies {
        let lsn = Lsn(trail.len() as u64 + 1);
        if let AuditBody::Compensation(c) = &body {
            apply(
                volume,
                (c.volume.clone(), c.key.clone()),
                c.restore.clone(),
                lsn,
            );
        }
        trail.push(TrailRecord {
            lsn,
            flags: RecordFlags::NONE,
            body,
        });
    }
}

fn plan_from(
    trail: &[TrailRecord],
    start: Lsn,
    checkpoints: &BTreeMap<String, Lsn>,
) -> Result<RecoveryPlan, RecoveryError> {
    plan_recovery(
        trail[start.0 as usize - 1..].iter().cloned(),
        checkpoints,
        MessageTableLimits::default(),
    )
}

fn in_doubt_of(plan: &RecoveryPlan) -> BTreeMap<TxId, Vec<Key>> {
    plan.in_doubt
        .iter()
        .map(|d| (d.tx, d.write_set.clone()))
        .collect()
}

fn undone(plan: &RecoveryPlan) -> Vec<Lsn> {
    plan.undo
        .iter()
        .flat_map(|l| l.compensations.iter().map(|c| c.undoes))
        .collect()
}

/// A reply as a reader who knows only the records from `start` on can tell it: primary-only
/// and backup-only are told apart by a state change that may precede the start.
fn as_told(reply: Reply, exact: bool) -> Reply {
    match reply {
        Reply::Committed(r) if !exact && r.state.out_of_communication() => {
            Reply::Committed(Receipt {
                state: CommitState::PrimaryOnly,
                ..r
            })
        }
        other => other,
    }
}

/// How often each case came up, so the generator cannot quietly stop producing it.
#[derive(Debug, Default)]
struct Coverage {
    prefixes: u64,
    losers: u64,
    resumed_undo: u64,
    in_doubt: u64,
    truncated_starts: u64,
    refused_starts: u64,
    accepted_late_starts: u64,
}

/// Recovers `trail` read from `start` onto a crashed volume and checks everything the plan
/// promises. `exact`: the plan must be accepted.
fn check_recovery(
    ctx: &str,
    trail: &[TrailRecord],
    replies: &[(Lsn, RequestKey, Reply)],
    start: Lsn,
    checkpoints: &BTreeMap<String, Lsn>,
    rng: &mut ChaCha8Rng,
    coverage: &mut Coverage,
) {
    let ctx = format!("{ctx}, start {start}, volume checkpoints {checkpoints:?}");
    let plan = match plan_from(trail, start, checkpoints) {
        Ok(plan) => plan,
        Err(e) => {
            assert!(
                matches!(
                    e,
                    RecoveryError::StartsAfterFirstRecord { .. }
                        | RecoveryError::StartsAfterVolumeCheckpoint { .. }
                        | RecoveryError::NoCheckpoint { .. }
                ),
                "{ctx}: a valid trail refused for another reason than its start: {e}"
            );
            coverage.refused_starts += 1;
            return;
        }
    };
    let want = expected(trail);
    let crashed = crashed_volume(trail, checkpoints, rng);

    // Redo, then undo at new LSNs.
    let mut volume = crashed.clone();
    redo(&mut volume, &plan);
    let mut recovered = trail.to_vec();
    let undo_records = plan.undo_records(RECOVERY_EPOCH);
    append_and_apply(&mut recovered, &mut volume, undo_records.clone());
    assert_eq!(visible(&volume), want.state, "{ctx}: recovered state");
    assert_eq!(in_doubt_of(&plan), want.in_doubt, "{ctx}: in-doubt");
    for &(lsn, request, reply) in replies
        .iter()
        .filter(|(lsn, ..)| *lsn <= Lsn(trail.len() as u64))
    {
        assert_eq!(
            told_reply(plan.message_table.lookup(request), start == Lsn(1)),
            Some(as_told(reply, start == Lsn(1))),
            "{ctx}: reply to {request} logged at {lsn}"
        );
    }
    coverage.losers += plan.undo.len() as u64;
    coverage.in_doubt += plan.in_doubt.len() as u64;

    // Recovery over its own records: nothing left to undo, nothing changes.
    let again = plan_from(&recovered, start, checkpoints).expect("recovery of a recovered trail");
    assert!(
        again.undo.is_empty(),
        "{ctx}: undo after undo: {:?}",
        again.undo
    );
    assert_eq!(
        again.in_doubt, plan.in_doubt,
        "{ctx}: in-doubt after recovery"
    );
    let mut redone = volume.clone();
    redo(&mut redone, &again);
    assert_eq!(
        redone, volume,
        "{ctx}: redo after recovery changed the volume"
    );

    // A crash part way through recovery's own records: the next one finishes the undo,
    // never undoing an update twice.
    let cut = rng.random_range(0..=undo_records.len());
    let mut partial = trail.to_vec();
    let mut ignored = Volume::new();
    append_and_apply(&mut partial, &mut ignored, undo_records[..cut].to_vec());
    let resumed = plan_from(&partial, start, checkpoints).expect("recovery of a cut recovery");
    let mut volume2 = crashed_volume(&partial, checkpoints, rng);
    redo(&mut volume2, &resumed);
    append_and_apply(
        &mut partial,
        &mut volume2,
        resumed.undo_records(RECOVERY_EPOCH),
    );
    assert_eq!(
        visible(&volume2),
        want.state,
        "{ctx}: state after a resumed undo (cut {cut})"
    );
    let mut compensated: Vec<Lsn> = undo_records[..cut]
        .iter()
        .filter_map(|b| match b {
            AuditBody::Compensation(c) => Some(c.undoes),
            _ => None,
        })
        .chain(undone(&resumed))
        .collect();
    compensated.sort();
    let mut once = undone(&plan);
    once.sort();
    assert_eq!(
        compensated, once,
        "{ctx}: compensations across a cut recovery (cut {cut})"
    );
    if cut > 0 && !resumed.undo.is_empty() {
        coverage.resumed_undo += 1;
    }

    // The coordinators decide: once resolved, nothing is in doubt and the state is committed.
    for d in &plan.in_doubt {
        let outcome = if rng.random_bool(0.5) {
            Outcome::Commit
        } else {
            Outcome::Abort
        };
        append_and_apply(
            &mut recovered,
            &mut volume,
            d.resolve(outcome, RECOVERY_EPOCH),
        );
    }
    let resolved = expected(&recovered);
    assert!(resolved.in_doubt.is_empty());
    assert_eq!(
        visible(&volume),
        resolved.state,
        "{ctx}: state after resolution"
    );
    let last = plan_from(&recovered, start, checkpoints).expect("recovery after resolution");
    assert!(
        last.undo.is_empty() && last.in_doubt.is_empty(),
        "{ctx}: after resolution"
    );
    let mut redone = volume.clone();
    redo(&mut redone, &last);
    assert_eq!(
        redone, volume,
        "{ctx}: redo after resolution changed the volume"
    );
}

/// The reply a lookup holds, as a reader from the start could tell it.
fn told_reply(lookup: Lookup, exact: bool) -> Option<Reply> {
    match lookup {
        Lookup::Done(reply) => Some(as_told(reply, exact)),
        _ => None,
    }
}

fn check_history(seed: u64, coverage: &mut Coverage) {
    let primary = Primary::run(seed);
    let trail = &primary.trail;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    for n in 0..=trail.len() {
        let prefix = &trail[..n];
        let ctx = format!("seed {seed}, prefix of {n} records");
        coverage.prefixes += 1;
        let checkpoints: Vec<(Lsn, &Checkpoint)> = prefix
            .iter()
            .filter_map(|r| match &r.body {
                AuditBody::Checkpoint(c) => Some((r.lsn, c)),
                _ => None,
            })
            .collect();
        // Before a checkpoint, every volume was flushed up to the previous one; any volume may
        // have been flushed further since.
        let penultimate = checkpoints.len().checked_sub(2).map(|i| checkpoints[i]);
        let floor = penultimate.map_or(0, |(lsn, _)| lsn.0);
        let volume_checkpoints: BTreeMap<String, Lsn> = VOLUMES
            .iter()
            .map(|v| (v.to_string(), Lsn(rng.random_range(floor..=n as u64))))
            .collect();
        // Where truncation may cut: the penultimate checkpoint or the first record of a
        // transaction active at it.
        let truncated = penultimate.map_or(Lsn(1), |(lsn, c)| {
            c.active
                .iter()
                .map(|a| a.first_lsn)
                .chain([lsn])
                .min()
                .unwrap_or(lsn)
        });
        let mut starts = vec![Lsn(1)];
        if n > 0 {
            starts.push(truncated);
            starts.push(Lsn(rng.random_range(1..=n as u64)));
        }
        for (i, start) in starts.into_iter().enumerate() {
            let refused = coverage.refused_starts;
            check_recovery(
                &ctx,
                prefix,
                &primary.replies,
                start,
                &volume_checkpoints,
                &mut rng,
                coverage,
            );
            let accepted = coverage.refused_starts == refused;
            assert!(
                accepted || i == 2,
                "{ctx}: start {start} meets the start rule and must be accepted"
            );
            if i == 1 && start > Lsn(1) {
                coverage.truncated_starts += 1;
            }
            if i == 2 && accepted && start > truncated {
                coverage.accepted_late_starts += 1;
            }
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn redo_and_undo_of_any_prefix_of_any_trail_give_the_committed_state() {
    let seeds: Vec<u64> = match env_u64("RECOVERY_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("RECOVERY_CASES").unwrap_or(24)).collect(),
    };
    let mut coverage = Coverage::default();
    for seed in seeds {
        eprintln!("recovery model: seed {seed} (replay with RECOVERY_SEED={seed})");
        check_history(seed, &mut coverage);
    }
    eprintln!("{coverage:?}");
    if env_u64("RECOVERY_SEED").is_none() {
        let Coverage {
            prefixes,
            losers,
            resumed_undo,
            in_doubt,
            truncated_starts,
            refused_starts,
            accepted_late_starts,
        } = coverage;
        for (what, count) in [
            ("prefixes", prefixes),
            ("losers", losers),
            ("resumed undos", resumed_undo),
            ("in-doubt transactions", in_doubt),
            ("truncated starts", truncated_starts),
            ("refused starts", refused_starts),
            ("accepted late starts", accepted_late_starts),
        ] {
            assert!(count > 0, "the generator produced no {what}: {coverage:?}");
        }
    }
}
