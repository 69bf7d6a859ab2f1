//! The owner of one LSG: the process that hosts the primaries of its audit pair and of its
//! volume pairs (one process, so a transaction's records, locks and data change in one place
//! without a hop; decision in docs/ARCHITECTURE.md).
//!
//! [`LsgOwner`] is an event-driven state machine over the LSG's files: client requests, pair
//! messages, flush completions, peer failures and ticks go in with `now`; [`OwnerAction`]s come
//! out (replies, messages, and the slow storage work: trail flushes, volume flushes, trail
//! truncation) for a driver to run off the event loop and report back. The trail append and the
//! volume reads and writes are page-cache operations done in line; nothing here syncs, sleeps or
//! reads a clock, so a simulation replays it exactly.
//!
//! A write: take the key's exclusive lock (or wait), read the before image, append the update
//! record through the audit primary (which streams it to the backups), apply the change to the
//! volume at that LSN (steal: uncommitted changes may reach the volume; the lock hides them).
//! A commit: append the commit record, wait for the acknowledgement rule, then record the
//! reply in the message table, release the locks and answer every copy of the request.
//! An abort: compensate each update newest first (new LSNs), append the abort record, release.

//!
//! Split by job: `transactions` (requests under locks, commit, abort, prepare),
//! `checkpoints` (ticks and fuzzy checkpoints); this file holds the owner's state, its events
//! from storage and peers, and its invariants.

mod checkpoints;
mod transactions;

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use duplex_audit_pair::recovery::{InDoubt, Outcome};
use duplex_audit_pair::{AuditPrimary, PrimaryAction, PrimaryConfig};
use duplex_lsg::{DataVolume, LogStorageGroup, Lsn, OwnerEpoch, Store};
use duplex_pair::records::{ActiveTx, AuditBody, Checkpoint, Compensation, Prepare, TxEnd, Update};
use duplex_pair::stream::{PairMessage, StreamRecord};
use duplex_pair::{
    AbortReason, CommitState, Lookup, MessageEntry, MessageTable, MessageTableLimits, Receipt,
    Reply, RequestKey, TxId,
};
use duplex_transport::EndpointId;
use duplex_volume_pair::{Granted, LockConfig, LockOutcome, VolumeAccess, VolumePair};
use tracing::{debug, info, warn};

use crate::protocol::{ClientReply, ClientRequest, Op, OpError};

#[derive(Debug, Clone)]
pub struct OwnerConfig {
    pub primary: PrimaryConfig,
    pub locks: LockConfig,
    pub messages: MessageTableLimits,
    /// Time between fuzzy checkpoints: recovery reads at most about two intervals of trail.
    pub checkpoint_interval: Duration,
    pub max_active_transactions: usize,
    /// A transaction whose client sends nothing for this long is aborted (a client that went
    /// away must not hold locks for ever).
    pub tx_idle_timeout: Duration,
    /// The most rows one scan returns.
    pub max_scan_rows: usize,
}

/// What the owner wants done. `C` is the driver's name for a client's request (where to send
/// its reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerAction<C> {
    Reply {
        to: C,
        reply: ClientReply,
    },
    Send {
        to: EndpointId,
        message: PairMessage,
    },
    /// Make the trail durable through `through` off the event loop, then call
    /// [`LsgOwner::on_trail_durable`] (or [`LsgOwner::on_storage_failed`]).
    FlushTrail {
        through: Lsn,
    },
    /// Flush every volume with checkpoint LSN `checkpoint_lsn` off the event loop, then call
    /// [`LsgOwner::on_volumes_flushed`].
    FlushVolumes {
        checkpoint_lsn: Lsn,
    },
    /// Drop trail segments wholly below `below` off the event loop.
    TruncateTrail {
        below: Lsn,
    },
    StateChanged {
        state: CommitState,
        home_counts: bool,
    },
    /// The owner stopped for good (fenced, or storage failed): the driver ends the process so
    /// a backup takes over.
    Stopped {
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxState {
    Active,
    /// Its prepare record is written; waiting for the rule, then for the coordinator.
    Preparing,
    Prepared,
    /// Its commit record is written; waiting for the acknowledgement rule.
    Committing,
}

#[derive(Debug)]
struct Tx<C> {
    state: TxState,
    first_lsn: Option<Lsn>,
    /// Its updates, oldest first, for undo.
    updates: Vec<(Lsn, Update)>,
    /// An operation waiting for a lock.
    waiting: Option<(C, ClientRequest)>,
    /// The request that began it (a resent begin gets the same transaction).
    begun_by: RequestKey,
    last_request_at: Duration,
}

#[derive(Debug)]
struct OwnedVolume<S: Store> {
    pair: VolumePair,
    data: Arc<DataVolume<S>>,
}

/// A commit (or prepare) whose record is written and waits for the rule.
#[derive(Debug)]
struct WaitingEnd<C> {
    tx: TxId,
    request: RequestKey,
    replies_to: Vec<C>,
    prepare: bool,
}

#[derive(Debug, Default)]
struct Checkpoints {
    last: Lsn,
    penultimate: Lsn,
    next_at: Duration,
    flushing: Option<Lsn>,
}

/// The primary side of one LSG. See the module docs.
#[derive(Debug)]
pub struct LsgOwner<S: Store, C> {
    config: OwnerConfig,
    lsg: Arc<LogStorageGroup<S>>,
    epoch: OwnerEpoch,
    primary: AuditPrimary,
    volumes: BTreeMap<String, OwnedVolume<S>>,
    txs: BTreeMap<TxId, Tx<C>>,
    /// The begin request of every live transaction.
    begun: BTreeMap<RequestKey, TxId>,
    next_tx: u64,
    table: MessageTable,
    ends: BTreeMap<Lsn, WaitingEnd<C>>,
    in_doubt: BTreeMap<TxId, InDoubt>,
    checkpoints: Checkpoints,
    actions: VecDeque<OwnerAction<C>>,
    stopped: Option<String>,
    /// The time of the event being handled (work resumed by a lock release runs at it).
    now: Duration,
}

/// What a new owner starts from: the state recovery (or a fresh LSG) left.
#[derive(Debug)]
pub struct OwnerStart {
    pub state: CommitState,
    /// Records from the truncation horizon to the trail's end, for backups that join.
    pub retained: Vec<StreamRecord>,
    pub durable: Lsn,
    pub table: MessageTable,
    pub in_doubt: Vec<InDoubt>,
    pub last_checkpoint: Lsn,
    pub penultimate_checkpoint: Lsn,
}

impl<S: Store, C: Clone + std::fmt::Debug> LsgOwner<S, C> {
    /// An owner of `lsg` (open for writing, recovered: every change the trail holds is in the
    /// volumes and losers are undone). `config.primary.tag.epoch` must be the LSG's epoch.
    pub fn new(
        config: OwnerConfig,
        lsg: LogStorageGroup<S>,
        start: OwnerStart,
        now: Duration,
    ) -> Self {
        let epoch = lsg.owner_epoch();
        let next_lsn = lsg.audit().next_lsn();
        let primary = AuditPrimary::new(
            config.primary.clone(),
            start.state,
            start.retained,
            next_lsn,
            start.durable,
        );
        let mut volumes = BTreeMap::new();
        for name in lsg.volume_names() {
            if let Ok(data) = lsg.volume(&name) {
                volumes.insert(
                    name.clone(),
                    OwnedVolume {
                        pair: VolumePair::new(name, config.locks),
                        data,
                    },
                );
            }
        }
        let mut owner = LsgOwner {
            lsg: Arc::new(lsg),
            epoch,
            primary,
            volumes,
            txs: BTreeMap::new(),
            begun: BTreeMap::new(),
            next_tx: 1,
            table: start.table,
            ends: BTreeMap::new(),
            in_doubt: BTreeMap::new(),
            checkpoints: Checkpoints {
                last: start.last_checkpoint,
                penultimate: start.penultimate_checkpoint,
                // A new owner checkpoints at once, so its recovery is never repeated from far.
                next_at: now,
                flushing: None,
            },
            actions: VecDeque::new(),
            stopped: None,
            now,
            config,
        };
        for d in start.in_doubt {
            owner.relock_in_doubt(d);
        }
        owner
    }

    fn relock_in_doubt(&mut self, d: InDoubt) {
        let mut by_volume: BTreeMap<&str, Vec<Vec<u8>>> = BTreeMap::new();
        for (volume, key) in &d.write_set {
            by_volume.entry(volume).or_default().push(key.clone());
        }
        for (volume, keys) in by_volume {
            match self.volumes.get_mut(volume) {
                Some(v) => {
                    if let Err(e) = v.pair.relock_in_doubt(d.tx, &keys) {
                        warn!(tx = %d.tx, error = %e, "in-doubt transaction: relocking failed");
                    }
                }
                None => warn!(tx = %d.tx, volume, "in-doubt transaction names an unknown volume"),
            }
        }
        self.in_doubt.insert(d.tx, d);
    }

    /// The LSG, for the driver's storage work (flushes run on its own thread).
    pub fn lsg(&self) -> &Arc<LogStorageGroup<S>> {
        &self.lsg
    }

    pub fn epoch(&self) -> OwnerEpoch {
        self.epoch
    }

    pub fn state(&self) -> CommitState {
        self.primary.state()
    }

    pub fn primary(&self) -> &AuditPrimary {
        &self.primary
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.is_some()
    }

    /// The LSN of the last fuzzy checkpoint.
    pub fn last_checkpoint(&self) -> Lsn {
        self.checkpoints.last
    }

    pub fn active_transactions(&self) -> usize {
        self.txs.len()
    }

    pub fn in_doubt(&self) -> impl Iterator<Item = &InDoubt> {
        self.in_doubt.values()
    }

    pub fn message_table(&self) -> &MessageTable {
        &self.table
    }

    pub fn poll_action(&mut self) -> Option<OwnerAction<C>> {
        if self.actions.is_empty() {
            self.drain_primary();
        }
        self.actions.pop_front()
    }

    /// A client request.
    pub fn on_request(&mut self, now: Duration, from: C, request: ClientRequest) {
        let _span = tracing::debug_span!("request", client = request.client.0, seq = request.seq.0)
            .entered();
        self.now = now;
        if let Some(reason) = &self.stopped {
            let reason = reason.clone();
            self.reply(from, ClientReply::Error(OpError::NotPrimary { reason }));
            return;
        }
        self.table
            .acknowledge_below(request.client, request.seen_below);
        if request.op == Op::Begin {
            self.begin(now, from, request.key());
            return;
        }
        if let Some(t) = request.tx.and_then(|tx| self.txs.get_mut(&tx)) {
            t.last_request_at = now;
        }
        let Some(tx) = request.tx else {
            self.reply(from, ClientReply::Error(OpError::NoTransaction));
            return;
        };
        if self.in_doubt.contains_key(&tx) {
            self.reply(from, ClientReply::Error(OpError::InDoubt { tx }));
            return;
        }
        // A transaction answers only the client that began it.
        if self
            .txs
            .get(&tx)
            .is_some_and(|t| t.begun_by.client != request.client)
        {
            self.reply(from, ClientReply::Error(OpError::UnknownTransaction { tx }));
            return;
        }
        match request.op {
            Op::Commit | Op::Abort => self.end_request(now, from, tx, request),
            Op::Prepare { coordinator } => self.prepare(now, from, tx, request.key(), coordinator),
            _ => match self.txs.get(&tx) {
                None => self.reply(from, ClientReply::Error(OpError::UnknownTransaction { tx })),
                Some(t) if t.state != TxState::Active || t.waiting.is_some() => {
                    self.reply(from, ClientReply::Error(OpError::Busy { tx }));
                }
                Some(_) => self.run_op(now, from, tx, request),
            },
        }
        self.drain_primary();
    }

    /// Appends a record through the audit primary and writes it to the trail at once.
    fn append(&mut self, now: Duration, body: &AuditBody, waits: bool) -> Result<Lsn, OpError> {
        if let Some(reason) = &self.stopped {
            return Err(OpError::NotPrimary {
                reason: reason.clone(),
            });
        }
        let appended = if waits {
            self.primary.append_commit(now, body)
        } else {
            self.primary.append(now, body)
        };
        let lsn = appended.map_err(|e| OpError::TooLarge {
            what: "audit record".into(),
            size_bytes: match e {
                duplex_pair::RecordError::TooLarge { size_bytes, .. } => size_bytes,
                _ => 0,
            },
            limit_bytes: self.config.primary.max_record_bytes,
        })?;
        self.drain_primary();
        match &self.stopped {
            Some(reason) => Err(OpError::NotPrimary {
                reason: reason.clone(),
            }),
            None => Ok(lsn),
        }
    }

    /// Runs what the audit primary asked for: trail appends in line, the rest to the driver.
    fn drain_primary(&mut self) {
        while let Some(action) = self.primary.poll_action() {
            match action {
                PrimaryAction::Append { lsn, record } => {
                    if self.stopped.is_some() {
                        continue;
                    }
                    let appended =
                        record
                            .kind()
                            .map_err(|e| e.to_string())
                            .and_then(|(t, flags)| {
                                self.lsg
                                    .audit()
                                    .append_at(lsn, t, flags, &record.payload)
                                    .map_err(|e| e.to_string())
                            });
                    if let Err(e) = appended {
                        self.stop(format!("appending record {lsn} to the trail failed: {e}"));
                    }
                }
                PrimaryAction::Flush { through } => {
                    self.actions.push_back(OwnerAction::FlushTrail { through });
                }
                PrimaryAction::Send { to, message } => {
                    self.actions.push_back(OwnerAction::Send { to, message });
                }
                PrimaryAction::Acknowledge {
                    commit_lsn,
                    receipt,
                } => {
                    self.on_acknowledged(commit_lsn, receipt);
                }
                PrimaryAction::StateChanged { state, home_counts } => {
                    info!(lsg = %self.lsg.lsg_id(), ?state, home_counts, "commit state changed");
                    self.actions
                        .push_back(OwnerAction::StateChanged { state, home_counts });
                }
                PrimaryAction::Fenced { by } => {
                    self.stop(format!("fenced: epoch {by} owns the LSG"));
                }
            }
        }
    }

    /// The trail is durable through `through`.
    pub fn on_trail_durable(&mut self, now: Duration, through: Lsn) {
        self.now = now;
        self.primary.on_durable(now, through);
        self.drain_primary();
    }

    /// A flush, volume flush or truncation failed: the owner stops (a backup takes over).
    pub fn on_storage_failed(&mut self, error: String) {
        match error.contains("fenced") {
            true => self.stop(format!("fenced: {error}")),
            false => self.stop(format!("storage failed: {error}")),
        }
    }

    pub fn on_pair_message(&mut self, now: Duration, from: EndpointId, message: PairMessage) {
        self.now = now;
        self.primary.on_message(now, from, message);
        self.drain_primary();
    }

    pub fn on_peer_down(&mut self, now: Duration, peer: EndpointId, incarnation: u64) {
        self.now = now;
        self.primary.on_peer_down(now, peer, incarnation);
        self.drain_primary();
    }

    /// Appends the records that finish recovery (compensations and aborts of the losers) and
    /// applies the compensations to the volumes.
    pub(crate) fn finish_recovery(
        &mut self,
        now: Duration,
        records: Vec<AuditBody>,
    ) -> Result<(), OpError> {
        self.now = now;
        for body in records {
            let lsn = self.append(now, &body, false)?;
            if let AuditBody::Compensation(c) = &body
                && let Some(v) = self.volumes.get(&c.volume)
                && let Err(e) = v.data.as_ref().apply(&c.key, c.restore.as_deref(), lsn)
            {
                self.stop(format!("undo at {lsn} failed: {e}"));
                return Err(OpError::Storage {
                    reason: e.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Ends an in-doubt transaction with its coordinator's decision.
    pub fn resolve_in_doubt(
        &mut self,
        now: Duration,
        tx: TxId,
        outcome: Outcome,
    ) -> Result<(), OpError> {
        let Some(d) = self.in_doubt.remove(&tx) else {
            return Err(OpError::UnknownTransaction { tx });
        };
        self.finish_recovery(now, d.resolve(outcome, self.epoch))?;
        self.release(tx);
        Ok(())
    }

    fn reply(&mut self, to: C, reply: ClientReply) {
        self.actions.push_back(OwnerAction::Reply { to, reply });
    }

    fn stop(&mut self, reason: String) {
        if self.stopped.is_some() {
            return;
        }
        warn!(lsg = %self.lsg.lsg_id(), %reason, "owner stops");
        self.stopped = Some(reason.clone());
        self.primary.on_fenced(self.epoch);
        // Nothing written after this is acknowledged; waiting clients hear it and resend to
        // whoever takes over.
        let ends = std::mem::take(&mut self.ends);
        for end in ends.into_values() {
            for to in end.replies_to {
                self.reply(
                    to,
                    ClientReply::Error(OpError::NotPrimary {
                        reason: reason.clone(),
                    }),
                );
            }
        }
        self.actions.push_back(OwnerAction::Stopped { reason });
    }

    /// Checks the invariants across the owner's parts; tests call it after every step.
    pub fn validate(&self) -> Result<(), String> {
        self.primary.validate()?;
        self.table.validate()?;
        if self.begun.len() != self.txs.len()
            || self
                .begun
                .iter()
                .any(|(request, tx)| self.txs.get(tx).is_none_or(|t| t.begun_by != *request))
        {
            return Err(format!(
                "{} begin requests kept for {} live transactions",
                self.begun.len(),
                self.txs.len()
            ));
        }
        for v in self.volumes.values() {
            v.pair.validate()?;
        }
        for (lsn, end) in &self.ends {
            match self.txs.get(&end.tx) {
                Some(t) if t.state == TxState::Committing || t.state == TxState::Preparing => {}
                _ if self.stopped.is_some() => {}
                other => {
                    return Err(format!(
                        "end record {lsn} of {} waits but the transaction is {:?}",
                        end.tx,
                        other.map(|t| t.state)
                    ));
                }
            }
        }
        if self.stopped.is_none() && self.lsg.audit().next_lsn() != self.primary.next_lsn() {
            return Err(format!(
                "the trail's next LSN {} is not the primary's {}",
                self.lsg.audit().next_lsn(),
                self.primary.next_lsn()
            ));
        }
        Ok(())
    }
}
