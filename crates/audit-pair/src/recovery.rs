//! Recovery from the audit trail (SPEC §3, seeds 000 and 004): what a new owner must redo, undo
//! and keep locked after a cold takeover, or when fresh pairs recover an LSG from its trail.
//!
//! [`plan_recovery`] is a pure function: it reads records the caller read from the trail and
//! the volumes' checkpoint LSNs, and returns a [`RecoveryPlan`]. It opens no file and reads no
//! clock, so the same trail always gives the same plan, and tests can run it on every prefix
//! of a generated history. The owner then:
//!
//! 1. applies [`RecoveryPlan::redo`] to its volumes (`put`/`delete` at each change's LSN);
//! 2. appends [`RecoveryPlan::undo_records`] and applies their compensations at the LSNs the
//!    trail gives them;
//! 3. takes the locks of every [`InDoubt`] write set, opens everything else, and once the
//!    coordinator decides appends and applies [`InDoubt::resolve`].
//!
//! # Where reading must start
//!
//! The caller reads from the first retained record or from any LSN `start` such that:
//!
//! - `start <= checkpoint + 1` for every volume's checkpoint LSN, so every change a volume may
//!   lack is read ([`RecoveryError::StartsAfterVolumeCheckpoint`]);
//! - `start` is 1 or the records read hold a checkpoint, whose message table and active list
//!   say what happened before `start` ([`RecoveryError::NoCheckpoint`]);
//! - every transaction still without an end began at or after `start`, so all of its updates
//!   are read and can be undone ([`RecoveryError::StartsAfterFirstRecord`]: such a start is
//!   refused, not guessed around).
//!
//! The primary flushes every volume up to the previous checkpoint before it writes a
//! checkpoint, so the owner meets all three by reading from the penultimate checkpoint, or from
//! the first record of a transaction active at it if that is earlier: the same bound below
//! which `truncate_below` may drop the trail. Reading from the first retained record meets them
//! too.
//!
//! # Why the plan is right
//!
//! - **Redo is idempotent by generation.** Volumes are steal/no-force: any change after a
//!   volume's checkpoint LSN may or may not be in it. Redo lists every update and compensation
//!   after it, and a volume skips a change at or below a key's generation, so replaying what is
//!   already there changes nothing and the volume ends holding every logged change.
//! - **Undo restores before images newest first.** Locks are strict two-phase: no other
//!   transaction wrote a key a live transaction wrote before it ended. So the before image of a
//!   loser's oldest update of a key is what the key held before the loser; restoring before
//!   images newest first ends there.
//! - **Undo never happens twice.** A compensation is redo-only and names the update it undoes.
//!   A crash in the middle of an undo (a live abort or an earlier recovery) leaves some
//!   compensations in the trail; they are redone like updates, and their updates are skipped
//!   when the rest of the undo is planned.
//! - **In-doubt transactions are neither undone nor released.** A prepared transaction's fate
//!   is its coordinator's: its changes stay, redone like any other, and its write set stays
//!   locked until [`InDoubt::resolve`]. A prepared transaction with a compensation after its
//!   prepare record was being aborted on its coordinator's decision: it is a loser.
//! - **Replies survive.** The message table is the last checkpoint's table plus the reply of
//!   every commit and abort after it that names a request; the primary enters a reply when it
//!   appends the end record, so the checkpoint holds every earlier one.
//!
//! A trail that breaks these rules (a gap in LSNs, a record of a transaction that already
//! ended, a compensation that matches no update, a checkpoint that disagrees with the records
//! before it) is refused with an error naming the LSN: recovery that guessed would write
//! wrong data with the authority of a new owner.

use std::collections::BTreeMap;

use duplex_lsg::{LsgId, Lsn, OwnerEpoch, RecordFlags};
use duplex_pair::{
    AbortReason, AuditBody, Checkpoint, CommitState, Compensation, MessageTable,
    MessageTableLimits, Prepare, Receipt, Reply, StateChange, TxEnd, TxId, Update,
};
use thiserror::Error;

/// One audit record as read back from the trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrailRecord {
    pub lsn: Lsn,
    pub flags: RecordFlags,
    pub body: AuditBody,
}

/// One change to reapply: `put` (or `delete` when `value` is `None`) at generation `lsn`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redo {
    pub volume: String,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    pub lsn: Lsn,
}

/// A transaction with neither commit, abort nor prepare: undone now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loser {
    pub tx: TxId,
    /// Its first record.
    pub first_lsn: Lsn,
    /// The compensations still to write, in order: newest update first, those already
    /// compensated left out.
    pub compensations: Vec<Compensation>,
}

/// A prepared transaction whose outcome its coordinator has not yet logged here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InDoubt {
    pub tx: TxId,
    /// Its first record: the trail must be kept from here until it is resolved.
    pub first_lsn: Lsn,
    pub prepare_lsn: Lsn,
    /// The LSG whose trail logs the decision.
    pub coordinator: LsgId,
    /// Every (volume, key) it wrote: locked until it is resolved.
    pub write_set: Vec<(String, Vec<u8>)>,
    /// The compensations to write if it aborts, newest update first.
    pub compensations: Vec<Compensation>,
}

/// A coordinator's decision on an in-doubt transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Commit,
    Abort,
}

impl InDoubt {
    /// The records to append once the coordinator decided: a commit record, or the
    /// compensations then an abort record. `epoch` is the appending owner's.
    pub fn resolve(&self, outcome: Outcome, epoch: OwnerEpoch) -> Vec<AuditBody> {
        let end = TxEnd {
            tx: self.tx,
            epoch,
            request: None,
        };
        match outcome {
            Outcome::Commit => vec![AuditBody::Commit(end)],
            Outcome::Abort => self
                .compensations
                .iter()
                .cloned()
                .map(AuditBody::Compensation)
                .chain([AuditBody::Abort(end, AbortReason::Recovery)])
                .collect(),
        }
    }
}

/// What a new owner must do, read from the trail by [`plan_recovery`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryPlan {
    /// Every update and compensation after its volume's checkpoint LSN, in LSN order.
    pub redo: Vec<Redo>,
    /// Losers, by transaction id.
    pub undo: Vec<Loser>,
    /// Prepared transactions awaiting their coordinator, by transaction id.
    pub in_doubt: Vec<InDoubt>,
    /// The last checkpoint's table plus every reply logged after it.
    pub message_table: MessageTable,
    pub last_checkpoint: Option<Lsn>,
    pub penultimate_checkpoint: Option<Lsn>,
    /// The last state-change record read.
    pub last_state: Option<StateChange>,
    /// The highest transaction id read, so an owner continuing in the same epoch never
    /// reuses one.
    pub max_tx: Option<TxId>,
    /// The last LSN read: the records recovery writes follow it.
    pub last_lsn: Option<Lsn>,
    pub records_read: u64,
}

impl RecoveryPlan {
    /// The records the owner appends to finish recovery: for each loser its compensations,
    /// then its abort record (reason [`AbortReason::Recovery`], written in `epoch`). A crash
    /// while appending them is safe: the next recovery plans only what is left.
    pub fn undo_records(&self, epoch: OwnerEpoch) -> Vec<AuditBody> {
        let mut records = Vec::new();
        for loser in &self.undo {
            records.extend(
                loser
                    .compensations
                    .iter()
                    .cloned()
                    .map(AuditBody::Compensation),
            );
            records.push(AuditBody::Abort(
                TxEnd {
                    tx: loser.tx,
                    epoch,
                    request: None,
                },
                AbortReason::Recovery,
            ));
        }
        records
    }
}

/// How a checkpoint's active list disagrees with the records before it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ActiveMismatch {
    #[error("live in the trail but missing from the checkpoint's active list")]
    NotListed,
    #[error("listed as active but not live in the trail")]
    NotLive,
    #[error("listed as beginning at LSN {listed}, the trail has {read}")]
    FirstLsn { listed: Lsn, read: Lsn },
    #[error("listed with prepared = {listed}, the trail says {read}")]
    Prepared { listed: bool, read: bool },
}

/// Why a trail cannot be recovered as read. Each names the LSN where the trail went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RecoveryError {
    #[error(
        "audit record {found}: expected LSN {expected}: LSNs are dense, so a record is missing or out of order"
    )]
    LsnOutOfSequence { expected: Lsn, found: Lsn },
    #[error(
        "the trail is read from LSN {start}, after volume {volume}'s checkpoint LSN {checkpoint}: changes in between would not be redone"
    )]
    StartsAfterVolumeCheckpoint {
        volume: String,
        checkpoint: Lsn,
        start: Lsn,
    },
    #[error(
        "volume {volume}'s checkpoint LSN {checkpoint} is past the last LSN read ({last}): the trail read is incomplete"
    )]
    VolumeCheckpointBeyondEnd {
        volume: String,
        checkpoint: Lsn,
        last: Lsn,
    },
    #[error(
        "the trail is read from LSN {start} and holds no checkpoint: what began and was answered before it is unknown"
    )]
    NoCheckpoint { start: Lsn },
    #[error(
        "transaction {tx} has no end and began at LSN {first_lsn}, before the start {start}: its earlier updates could not be undone"
    )]
    StartsAfterFirstRecord {
        tx: TxId,
        first_lsn: Lsn,
        start: Lsn,
    },
    #[error("audit record {lsn}: {volume} is not a volume of this LSG")]
    UnknownVolume { lsn: Lsn, volume: String },
    #[error("audit record {lsn}: transaction {tx} already ended at LSN {ended}")]
    TxAlreadyEnded { lsn: Lsn, tx: TxId, ended: Lsn },
    #[error(
        "audit record {lsn}: transaction {tx} is prepared: only compensations and its end may follow"
    )]
    AfterPrepare { lsn: Lsn, tx: TxId },
    #[error(
        "audit record {lsn}: the compensation names LSN {undoes}, which is not an update of {tx} with the same volume, key and before image"
    )]
    CompensationMismatch { lsn: Lsn, tx: TxId, undoes: Lsn },
    #[error("audit record {lsn}: update {undoes} of {tx} was already compensated at LSN {first}")]
    CompensatedTwice {
        lsn: Lsn,
        tx: TxId,
        undoes: Lsn,
        first: Lsn,
    },
    #[error("audit record {lsn}: {tx} aborted with its update at LSN {update} not compensated")]
    UncompensatedAbort { lsn: Lsn, tx: TxId, update: Lsn },
    #[error(
        "prepare record {lsn}: the write set of {tx} lacks {volume} key {key:?}, which it updated"
    )]
    WriteSetIncomplete {
        lsn: Lsn,
        tx: TxId,
        volume: String,
        key: Vec<u8>,
    },
    #[error("checkpoint {lsn}: transaction {tx}: {mismatch}")]
    CheckpointDisagrees {
        lsn: Lsn,
        tx: TxId,
        mismatch: ActiveMismatch,
    },
    #[error(
        "checkpoint {lsn} names {previous} as the previous checkpoint; the trail's is {expected}"
    )]
    CheckpointChainBroken {
        lsn: Lsn,
        previous: Lsn,
        expected: Lsn,
    },
}

/// Reads `records` (dense LSNs, from a start that meets the rule in the module docs) and says
/// what to redo, undo and keep locked. `volume_checkpoints` names every volume of the LSG with
/// its checkpoint LSN: every change at or below it is in the volume.
pub fn plan_recovery(
    records: impl IntoIterator<Item = TrailRecord>,
    volume_checkpoints: &BTreeMap<String, Lsn>,
    limits: MessageTableLimits,
) -> Result<RecoveryPlan, RecoveryError> {
    let mut scan = Scan::new(volume_checkpoints, limits);
    for record in records {
        scan.record(record)?;
    }
    scan.finish()
}

/// Where a live transaction began, as far as the records read tell.
#[derive(Debug)]
enum Begin {
    /// At this LSN, at or after the start: every record of it is read.
    Known(Lsn),
    /// Read from after LSN 1 with no checkpoint yet: the next checkpoint will tell.
    Unsure { first_seen: Lsn },
    /// Before the start, as a checkpoint listed it; `prepared` as listed there.
    BeforeStart { first_lsn: Lsn, prepared: bool },
}

/// An update of a live transaction, kept until the transaction ends.
#[derive(Debug)]
struct Logged {
    lsn: Lsn,
    volume: String,
    key: Vec<u8>,
    before: Option<Vec<u8>>,
    compensated_at: Option<Lsn>,
}

#[derive(Debug)]
struct LiveTx {
    begin: Begin,
    /// In LSN order.
    updates: Vec<Logged>,
    prepare: Option<(Lsn, Prepare)>,
    /// A compensation followed its prepare record: the coordinator decided abort.
    aborting: bool,
}

impl LiveTx {
    fn prepared(&self) -> bool {
        self.prepare.is_some() || matches!(self.begin, Begin::BeforeStart { prepared: true, .. })
    }

    /// Compensations for every update not yet compensated, newest first.
    fn compensations(&self, tx: TxId) -> Vec<Compensation> {
        self.updates
            .iter()
            .rev()
            .filter(|u| u.compensated_at.is_none())
            .map(|u| Compensation {
                tx,
                undoes: u.lsn,
                volume: u.volume.clone(),
                key: u.key.clone(),
                restore: u.before.clone(),
            })
            .collect()
    }
}

#[derive(Debug)]
struct Scan<'a> {
    volumes: &'a BTreeMap<String, Lsn>,
    limits: MessageTableLimits,
    /// The first LSN read.
    start: Option<Lsn>,
    last_lsn: Option<Lsn>,
    /// A transaction first seen now begins here: the start is LSN 1 or a checkpoint was read.
    covered: bool,
    live: BTreeMap<TxId, LiveTx>,
    ended: BTreeMap<TxId, Lsn>,
    redo: Vec<Redo>,
    table: MessageTable,
    last_checkpoint: Option<Lsn>,
    penultimate_checkpoint: Option<Lsn>,
    last_state: Option<StateChange>,
    max_tx: Option<TxId>,
    records_read: u64,
}

impl<'a> Scan<'a> {
    fn new(volumes: &'a BTreeMap<String, Lsn>, limits: MessageTableLimits) -> Self {
        Scan {
            volumes,
            limits,
            start: None,
            last_lsn: None,
            covered: false,
            live: BTreeMap::new(),
            ended: BTreeMap::new(),
            redo: Vec::new(),
            table: MessageTable::new(limits),
            last_checkpoint: None,
            penultimate_checkpoint: None,
            last_state: None,
            max_tx: None,
            records_read: 0,
        }
    }

    fn record(&mut self, r: TrailRecord) -> Result<(), RecoveryError> {
        // No LSN follows u64::MAX.
        let expected = match self.last_lsn {
            Some(last) => last.0.checked_add(1).map(Lsn),
            None => Some(Lsn(1)),
        };
        let start = match self.start {
            Some(start) if Some(r.lsn) == expected => start,
            None if r.lsn.0 >= 1 => self.begin_at(r.lsn)?,
            _ => {
                return Err(RecoveryError::LsnOutOfSequence {
                    expected: expected.unwrap_or(Lsn(u64::MAX)),
                    found: r.lsn,
                });
            }
        };
        self.last_lsn = Some(r.lsn);
        self.records_read += 1;
        let lsn = r.lsn;
        match r.body {
            AuditBody::Update(u) => self.update(lsn, u),
            AuditBody::Compensation(c) => self.compensation(lsn, start, c),
            AuditBody::Commit(end) => {
                let reply = Reply::Committed(Receipt {
                    commit_lsn: lsn,
                    epoch: end.epoch,
                    state: self.commit_state(r.flags),
                });
                self.end(lsn, end, reply)
            }
            AuditBody::Abort(end, reason) => self.end(lsn, end, Reply::Aborted(reason)),
            AuditBody::Prepare(p) => self.prepare(lsn, p),
            AuditBody::Checkpoint(c) => self.checkpoint(lsn, start, c),
            AuditBody::StateChange(s) => {
                self.last_state = Some(s);
                Ok(())
            }
        }
    }

    /// The first record read: checks the start against every volume's checkpoint.
    fn begin_at(&mut self, start: Lsn) -> Result<Lsn, RecoveryError> {
        for (volume, &checkpoint) in self.volumes {
            if start.0 > checkpoint.0.saturating_add(1) {
                return Err(RecoveryError::StartsAfterVolumeCheckpoint {
                    volume: volume.clone(),
                    checkpoint,
                    start,
                });
            }
        }
        self.start = Some(start);
        self.covered = start == Lsn(1);
        Ok(start)
    }

    /// The receipt state of a commit: the flag tells normal from not; the last state change
    /// read tells primary-only from backup-only. If it was before the start, primary-only
    /// stands for both (each means "flushed before the acknowledgement").
    fn commit_state(&self, flags: RecordFlags) -> CommitState {
        if !flags.contains(RecordFlags::OUT_OF_COMMUNICATION) {
            return CommitState::Normal;
        }
        match &self.last_state {
            Some(s) if s.state.out_of_communication() => s.state,
            _ => CommitState::PrimaryOnly,
        }
    }

    fn checkpoint_of(&self, lsn: Lsn, volume: &str) -> Result<Lsn, RecoveryError> {
        self.volumes
            .get(volume)
            .copied()
            .ok_or_else(|| RecoveryError::UnknownVolume {
                lsn,
                volume: volume.to_owned(),
            })
    }

    /// The live transaction `tx`, begun at `lsn` if not seen before.
    fn live_tx(&mut self, lsn: Lsn, tx: TxId) -> Result<&mut LiveTx, RecoveryError> {
        if let Some(&ended) = self.ended.get(&tx) {
            return Err(RecoveryError::TxAlreadyEnded { lsn, tx, ended });
        }
        self.max_tx = self.max_tx.max(Some(tx));
        let covered = self.covered;
        Ok(self.live.entry(tx).or_insert_with(|| LiveTx {
            begin: if covered {
                Begin::Known(lsn)
            } else {
                Begin::Unsure { first_seen: lsn }
            },
            updates: Vec::new(),
            prepare: None,
            aborting: false,
        }))
    }

    fn update(&mut self, lsn: Lsn, u: Update) -> Result<(), RecoveryError> {
        let checkpoint = self.checkpoint_of(lsn, &u.volume)?;
        let t = self.live_tx(lsn, u.tx)?;
        if t.prepared() {
            return Err(RecoveryError::AfterPrepare { lsn, tx: u.tx });
        }
        t.updates.push(Logged {
            lsn,
            volume: u.volume.clone(),
            key: u.key.clone(),
            before: u.before,
            compensated_at: None,
        });
        if lsn > checkpoint {
            self.redo.push(Redo {
                volume: u.volume,
                key: u.key,
                value: u.after,
                lsn,
            });
        }
        Ok(())
    }

    fn compensation(&mut self, lsn: Lsn, start: Lsn, c: Compensation) -> Result<(), RecoveryError> {
        let checkpoint = self.checkpoint_of(lsn, &c.volume)?;
        let t = self.live_tx(lsn, c.tx)?;
        let mismatch = RecoveryError::CompensationMismatch {
            lsn,
            tx: c.tx,
            undoes: c.undoes,
        };
        match t.updates.binary_search_by_key(&c.undoes, |u| u.lsn) {
            Ok(i) => {
                let u = &mut t.updates[i];
                if u.volume != c.volume || u.key != c.key || u.before != c.restore {
                    return Err(mismatch);
                }
                if let Some(first) = u.compensated_at {
                    return Err(RecoveryError::CompensatedTwice {
                        lsn,
                        tx: c.tx,
                        undoes: c.undoes,
                        first,
                    });
                }
                u.compensated_at = Some(lsn);
            }
            // An update before the start of a transaction that began before it cannot be
            // checked; any other is missing.
            Err(_) if c.undoes < start && !matches!(t.begin, Begin::Known(_)) => {}
            Err(_) => return Err(mismatch),
        }
        if t.prepared() {
            t.aborting = true;
        }
        if lsn > checkpoint {
            self.redo.push(Redo {
                volume: c.volume,
                key: c.key,
                value: c.restore,
                lsn,
            });
        }
        Ok(())
    }

    fn end(&mut self, lsn: Lsn, end: TxEnd, reply: Reply) -> Result<(), RecoveryError> {
        if let Some(&ended) = self.ended.get(&end.tx) {
            return Err(RecoveryError::TxAlreadyEnded {
                lsn,
                tx: end.tx,
                ended,
            });
        }
        self.max_tx = self.max_tx.max(Some(end.tx));
        if let (Some(t), Reply::Aborted(_)) = (self.live.remove(&end.tx), reply)
            && let Some(u) = t.updates.iter().find(|u| u.compensated_at.is_none())
        {
            // Every update read follows the start, so its compensation would have been read.
            return Err(RecoveryError::UncompensatedAbort {
                lsn,
                tx: end.tx,
                update: u.lsn,
            });
        }
        self.ended.insert(end.tx, lsn);
        if let Some(request) = end.request {
            self.table.finish(request, reply);
        }
        Ok(())
    }

    fn prepare(&mut self, lsn: Lsn, p: Prepare) -> Result<(), RecoveryError> {
        let t = self.live_tx(lsn, p.tx)?;
        if t.prepared() {
            return Err(RecoveryError::AfterPrepare { lsn, tx: p.tx });
        }
        t.prepare = Some((lsn, p));
        Ok(())
    }

    /// Checks the checkpoint's active list against the transactions read as live, learns
    /// where those begun before the start began, and takes the checkpoint's message table.
    fn checkpoint(&mut self, lsn: Lsn, start: Lsn, c: Checkpoint) -> Result<(), RecoveryError> {
        let expected = self.last_checkpoint.or((start == Lsn(1)).then_some(Lsn(0)));
        if let Some(expected) = expected
            && c.previous != expected
        {
            return Err(RecoveryError::CheckpointChainBroken {
                lsn,
                previous: c.previous,
                expected,
            });
        }
        let disagrees = |tx, mismatch| RecoveryError::CheckpointDisagrees { lsn, tx, mismatch };
        let listed: BTreeMap<TxId, _> = c.active.iter().map(|a| (a.tx, a)).collect();
        for (&tx, t) in &self.live {
            let Some(a) = listed.get(&tx) else {
                return Err(disagrees(tx, ActiveMismatch::NotListed));
            };
            if a.prepared != t.prepared() {
                return Err(disagrees(
                    tx,
                    ActiveMismatch::Prepared {
                        listed: a.prepared,
                        read: t.prepared(),
                    },
                ));
            }
            let read = match t.begin {
                Begin::Known(first)
                | Begin::BeforeStart {
                    first_lsn: first, ..
                } => Some(first),
                // Begun at or after the start: it began where it was first seen.
                Begin::Unsure { first_seen } => (a.first_lsn >= start).then_some(first_seen),
            };
            if let Some(read) = read
                && read != a.first_lsn
            {
                return Err(disagrees(
                    tx,
                    ActiveMismatch::FirstLsn {
                        listed: a.first_lsn,
                        read,
                    },
                ));
            }
        }
        for a in &c.active {
            self.max_tx = self.max_tx.max(Some(a.tx));
            let before_start = Begin::BeforeStart {
                first_lsn: a.first_lsn,
                prepared: a.prepared,
            };
            match self.live.get_mut(&a.tx) {
                Some(t) => {
                    if let Begin::Unsure { .. } = t.begin {
                        t.begin = if a.first_lsn >= start {
                            Begin::Known(a.first_lsn)
                        } else {
                            before_start
                        };
                    }
                }
                // Begun before the start with no record read yet.
                None if a.first_lsn < start && !self.ended.contains_key(&a.tx) => {
                    self.live.insert(
                        a.tx,
                        LiveTx {
                            begin: before_start,
                            updates: Vec::new(),
                            prepare: None,
                            aborting: false,
                        },
                    );
                }
                None => return Err(disagrees(a.tx, ActiveMismatch::NotLive)),
            }
        }
        self.covered = true;
        self.penultimate_checkpoint = self.last_checkpoint;
        self.last_checkpoint = Some(lsn);
        self.table = MessageTable::restore(self.limits, &c.messages, &c.message_lows);
        Ok(())
    }

    fn finish(self) -> Result<RecoveryPlan, RecoveryError> {
        let last = self.last_lsn.unwrap_or(Lsn(0));
        for (volume, &checkpoint) in self.volumes {
            if checkpoint > last {
                return Err(RecoveryError::VolumeCheckpointBeyondEnd {
                    volume: volume.clone(),
                    checkpoint,
                    last,
                });
            }
        }
        let start = self.start.unwrap_or(Lsn(1));
        if start > Lsn(1) && self.last_checkpoint.is_none() {
            return Err(RecoveryError::NoCheckpoint { start });
        }
        let mut undo = Vec::new();
        let mut in_doubt = Vec::new();
        for (tx, t) in self.live {
            let first_lsn = match t.begin {
                Begin::Known(first) => first,
                Begin::BeforeStart { first_lsn, .. } => {
                    return Err(RecoveryError::StartsAfterFirstRecord {
                        tx,
                        first_lsn,
                        start,
                    });
                }
                // Only while no checkpoint was read, refused above; kept total all the same.
                Begin::Unsure { .. } => return Err(RecoveryError::NoCheckpoint { start }),
            };
            let compensations = t.compensations(tx);
            match t.prepare {
                Some((prepare_lsn, p)) if !t.aborting => {
                    if let Some(u) = t.updates.iter().find(|u| {
                        !p.write_set
                            .iter()
                            .any(|(v, k)| *v == u.volume && *k == u.key)
                    }) {
                        return Err(RecoveryError::WriteSetIncomplete {
                            lsn: prepare_lsn,
                            tx,
                            volume: u.volume.clone(),
                            key: u.key.clone(),
                        });
                    }
                    in_doubt.push(InDoubt {
                        tx,
                        first_lsn,
                        prepare_lsn,
                        coordinator: p.coordinator,
                        write_set: p.write_set,
                        compensations,
                    });
                }
                _ => undo.push(Loser {
                    tx,
                    first_lsn,
                    compensations,
                }),
            }
        }
        Ok(RecoveryPlan {
            redo: self.redo,
            undo,
            in_doubt,
            message_table: self.table,
            last_checkpoint: self.last_checkpoint,
            penultimate_checkpoint: self.penultimate_checkpoint,
            last_state: self.last_state,
            max_tx: self.max_tx,
            last_lsn: self.last_lsn,
            records_read: self.records_read,
        })
    }
}
