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

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use duplex_audit_pair::recovery::{InDoubt, Outcome};
use duplex_audit_pair::{AuditPrimary, PrimaryAction, PrimaryConfig};
use duplex_lsg::{DataVolume, LogStorageGroup, Lsn, OwnerEpoch, RecordFlags, RecordType, Store};
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

    fn begin(&mut self, now: Duration, from: C, request: RequestKey) {
        if let Some(tx) = self.begun.get(&request) {
            let tx = *tx;
            self.reply(from, ClientReply::Began(tx));
            return;
        }
        if self.txs.len() >= self.config.max_active_transactions {
            let active = self.txs.len();
            self.reply(
                from,
                ClientReply::Error(OpError::TooManyTransactions { active }),
            );
            return;
        }
        let tx = TxId {
            epoch: self.epoch,
            number: self.next_tx,
        };
        self.next_tx += 1;
        self.txs.insert(
            tx,
            Tx {
                state: TxState::Active,
                first_lsn: None,
                updates: Vec::new(),
                waiting: None,
                begun_by: request,
                last_request_at: now,
            },
        );
        self.begun.insert(request, tx);
        self.reply(from, ClientReply::Began(tx));
    }

    /// Runs a read, write or scan of an active transaction, or parks it behind a lock.
    fn run_op(&mut self, now: Duration, from: C, tx: TxId, request: ClientRequest) {
        let (volume, key) = match &request.op {
            Op::Get { volume, key } | Op::Put { volume, key, .. } | Op::Delete { volume, key } => {
                (volume.clone(), Some(key.clone()))
            }
            Op::Scan { volume, .. } => (volume.clone(), None),
            Op::Begin | Op::Commit | Op::Abort | Op::Prepare { .. } => return,
        };
        if let Some(err) = self.check_sizes(&request.op) {
            self.reply(from, ClientReply::Error(err));
            return;
        }
        let Some(v) = self.volumes.get_mut(&volume) else {
            self.reply(from, ClientReply::Error(OpError::UnknownVolume { volume }));
            return;
        };
        let outcome = match (&request.op, &key) {
            (Op::Get { .. }, Some(key)) => v.pair.read(now, tx, key),
            (Op::Put { .. } | Op::Delete { .. }, Some(key)) => v.pair.lock_for_write(now, tx, key),
            _ => v.pair.lock_for_scan(now, tx),
        };
        match outcome {
            Err(e) => self.reply(
                from,
                ClientReply::Error(OpError::LockRefused {
                    reason: e.to_string(),
                }),
            ),
            Ok(LockOutcome::Waiting) => {
                if let Some(t) = self.txs.get_mut(&tx) {
                    t.waiting = Some((from, request));
                }
            }
            Ok(LockOutcome::Aborted(reason)) => {
                self.abort_tx(now, tx, reason, None);
                self.reply(from, ClientReply::Error(OpError::Aborted { tx, reason }));
            }
            Ok(LockOutcome::Granted) => {
                let reply = self.run_granted(now, tx, &volume, request.op);
                self.reply(from, reply);
            }
        }
    }

    fn check_sizes(&self, op: &Op) -> Option<OpError> {
        let config = self.lsg.config();
        let (key, value) = match op {
            Op::Get { key, .. } | Op::Delete { key, .. } => (Some(key), None),
            Op::Put { key, value, .. } => (Some(key), Some(value)),
            _ => (None, None),
        };
        if let Some(key) = key
            && key.len() > config.max_key_bytes
        {
            return Some(OpError::TooLarge {
                what: "key".into(),
                size_bytes: key.len(),
                limit_bytes: config.max_key_bytes,
            });
        }
        if let Some(value) = value {
            // The update record carries the before and after images: both must fit.
            let limit = config
                .max_value_bytes
                .min((config.max_record_bytes / 2).saturating_sub(1024));
            if value.len() > limit {
                return Some(OpError::TooLarge {
                    what: "value".into(),
                    size_bytes: value.len(),
                    limit_bytes: limit,
                });
            }
        }
        None
    }

    /// The operation of `tx` on `volume`, its lock held.
    fn run_granted(&mut self, now: Duration, tx: TxId, volume: &str, op: Op) -> ClientReply {
        let Some(v) = self.volumes.get(volume) else {
            return ClientReply::Error(OpError::UnknownVolume {
                volume: volume.to_string(),
            });
        };
        let data = Arc::clone(&v.data);
        let result = match op {
            Op::Get { key, .. } => VolumeAccess::get(data.as_ref(), &key).map(ClientReply::Value),
            Op::Scan {
                start, end, limit, ..
            } => {
                let limit = (limit as usize).min(self.config.max_scan_rows);
                VolumeAccess::scan(
                    data.as_ref(),
                    as_ref_bound(&start),
                    as_ref_bound(&end),
                    limit,
                )
                .map(ClientReply::Rows)
            }
            Op::Put { key, value, .. } => {
                return self.write(now, tx, volume, key, Some(value));
            }
            Op::Delete { key, .. } => return self.write(now, tx, volume, key, None),
            Op::Begin | Op::Commit | Op::Abort | Op::Prepare { .. } => {
                return ClientReply::Written;
            }
        };
        result.unwrap_or_else(|e| {
            ClientReply::Error(OpError::Storage {
                reason: e.to_string(),
            })
        })
    }

    fn write(
        &mut self,
        now: Duration,
        tx: TxId,
        volume: &str,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    ) -> ClientReply {
        let Some(v) = self.volumes.get(volume) else {
            return ClientReply::Error(OpError::UnknownVolume {
                volume: volume.to_string(),
            });
        };
        let data = Arc::clone(&v.data);
        let update = match v.pair.update_record(data.as_ref(), tx, &key, value.clone()) {
            Ok(u) => u,
            Err(e) => {
                return ClientReply::Error(OpError::Storage {
                    reason: e.to_string(),
                });
            }
        };
        let lsn = match self.append(now, &AuditBody::Update(update.clone()), false) {
            Ok(lsn) => lsn,
            Err(e) => return ClientReply::Error(e),
        };
        if let Err(e) = data.as_ref().apply(&key, value.as_deref(), lsn) {
            // The record is in the trail but the volume refused the change: the owner cannot
            // keep the two in step any more.
            self.stop(format!("volume {volume} refused change {lsn}: {e}"));
            return ClientReply::Error(OpError::Storage {
                reason: e.to_string(),
            });
        }
        if let Some(t) = self.txs.get_mut(&tx) {
            t.first_lsn.get_or_insert(lsn);
            t.updates.push((lsn, update));
        }
        ClientReply::Written
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
                    let appended = RecordType::try_from(record.record_type)
                        .map_err(|e| e.to_string())
                        .and_then(|t| {
                            let flags = if record.flags == 0 {
                                RecordFlags::NONE
                            } else {
                                RecordFlags::OUT_OF_COMMUNICATION
                            };
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

    fn on_acknowledged(&mut self, lsn: Lsn, receipt: Receipt) {
        let Some(end) = self.ends.remove(&lsn) else {
            return;
        };
        if end.prepare {
            if let Some(t) = self.txs.get_mut(&end.tx) {
                t.state = TxState::Prepared;
            }
            for to in end.replies_to {
                self.reply(to, ClientReply::Prepared);
            }
            return;
        }
        let reply = Reply::Committed(receipt);
        self.table.finish(end.request, reply);
        if let Some(t) = self.txs.remove(&end.tx) {
            self.begun.remove(&t.begun_by);
        }
        for to in end.replies_to {
            self.reply(to, ClientReply::Outcome(reply));
        }
        self.release(end.tx);
    }

    /// A commit or abort request: answered from the message table when it was seen before.
    fn end_request(&mut self, now: Duration, from: C, tx: TxId, request: ClientRequest) {
        let key = request.key();
        match self.table.start(key, tx) {
            Lookup::Done(reply) => self.reply(from, ClientReply::Outcome(reply)),
            Lookup::Forgotten { .. } => self.reply(
                from,
                ClientReply::Error(OpError::ReplyForgotten { request: key }),
            ),
            Lookup::Pending(_) => {
                if let Some(end) = self.ends.values_mut().find(|e| e.request == key) {
                    end.replies_to.push(from);
                }
            }
            Lookup::New => {
                let busy = match self.txs.get(&tx) {
                    None => Some(ClientReply::Outcome(Reply::Aborted(AbortReason::Takeover))),
                    Some(t) if t.waiting.is_some() || t.state == TxState::Committing => {
                        Some(ClientReply::Error(OpError::Busy { tx }))
                    }
                    Some(_) => None,
                };
                if let Some(reply) = busy {
                    // A transaction this owner does not know was lost with a failed primary
                    // before it ended (its end would be in the table): it is aborted.
                    if let ClientReply::Outcome(outcome) = reply {
                        self.table.finish(key, outcome);
                    } else {
                        self.table.forget_pending(key);
                    }
                    self.reply(from, reply);
                    return;
                }
                if request.op == Op::Commit {
                    self.commit(now, from, tx, key);
                } else {
                    self.abort_tx(now, tx, AbortReason::Requested, Some(key));
                    self.reply(
                        from,
                        ClientReply::Outcome(Reply::Aborted(AbortReason::Requested)),
                    );
                }
            }
        }
    }

    /// Logs `tx`'s write set in a prepare record; it is prepared once the rule holds for it.
    fn prepare(
        &mut self,
        now: Duration,
        from: C,
        tx: TxId,
        request: RequestKey,
        coordinator: duplex_lsg::LsgId,
    ) {
        let write_set = match self.txs.get(&tx) {
            None => {
                self.reply(from, ClientReply::Error(OpError::UnknownTransaction { tx }));
                return;
            }
            Some(t) if t.state == TxState::Prepared => {
                self.reply(from, ClientReply::Prepared);
                return;
            }
            Some(t) if t.state != TxState::Active || t.waiting.is_some() => {
                self.reply(from, ClientReply::Error(OpError::Busy { tx }));
                return;
            }
            Some(t) => {
                let mut set: Vec<(String, Vec<u8>)> = t
                    .updates
                    .iter()
                    .map(|(_, u)| (u.volume.clone(), u.key.clone()))
                    .collect();
                set.sort();
                set.dedup();
                set
            }
        };
        let body = AuditBody::Prepare(Prepare {
            tx,
            coordinator,
            write_set,
        });
        match self.append(now, &body, true) {
            Ok(lsn) => {
                if let Some(t) = self.txs.get_mut(&tx) {
                    t.state = TxState::Preparing;
                    t.first_lsn.get_or_insert(lsn);
                }
                self.ends.insert(
                    lsn,
                    WaitingEnd {
                        tx,
                        request,
                        replies_to: vec![from],
                        prepare: true,
                    },
                );
                self.drain_primary();
            }
            Err(e) => self.reply(from, ClientReply::Error(e)),
        }
    }

    fn commit(&mut self, now: Duration, from: C, tx: TxId, request: RequestKey) {
        let body = AuditBody::Commit(TxEnd {
            tx,
            epoch: self.epoch,
            request: Some(request),
        });
        match self.append(now, &body, true) {
            Ok(lsn) => {
                if let Some(t) = self.txs.get_mut(&tx) {
                    t.state = TxState::Committing;
                }
                self.ends.insert(
                    lsn,
                    WaitingEnd {
                        tx,
                        request,
                        replies_to: vec![from],
                        prepare: false,
                    },
                );
                // The rule may already hold (a flush or acknowledgements ahead of it).
                self.drain_primary();
            }
            Err(e) => {
                self.table.forget_pending(request);
                self.reply(from, ClientReply::Error(e));
            }
        }
    }

    /// Undoes `tx` (compensations newest first), logs its abort and releases its locks.
    fn abort_tx(
        &mut self,
        now: Duration,
        tx: TxId,
        reason: AbortReason,
        request: Option<RequestKey>,
    ) {
        let Some(t) = self.txs.remove(&tx) else {
            return;
        };
        self.begun.remove(&t.begun_by);
        debug!(%tx, %reason, "abort");
        for (lsn, update) in t.updates.iter().rev() {
            let comp = Compensation {
                tx,
                undoes: *lsn,
                volume: update.volume.clone(),
                key: update.key.clone(),
                restore: update.before.clone(),
            };
            let Ok(clsn) = self.append(now, &AuditBody::Compensation(comp), false) else {
                return;
            };
            if let Some(v) = self.volumes.get(&update.volume)
                && let Err(e) = v
                    .data
                    .as_ref()
                    .apply(&update.key, update.before.as_deref(), clsn)
            {
                self.stop(format!("undo of {tx} failed at {clsn}: {e}"));
                return;
            }
        }
        if t.first_lsn.is_some() || request.is_some() {
            let body = AuditBody::Abort(
                TxEnd {
                    tx,
                    epoch: self.epoch,
                    request,
                },
                reason,
            );
            if self.append(now, &body, false).is_err() {
                return;
            }
        }
        if let Some(key) = request {
            self.table.finish(key, Reply::Aborted(reason));
        }
        if let Some((to, _)) = t.waiting {
            self.reply(to, ClientReply::Error(OpError::Aborted { tx, reason }));
        }
        self.release(tx);
    }

    /// Releases `tx`'s locks in every volume and runs the operations they unblock.
    fn release(&mut self, tx: TxId) {
        let mut granted: Vec<Granted> = Vec::new();
        for v in self.volumes.values_mut() {
            granted.extend(v.pair.release(tx));
        }
        self.resume(granted);
    }

    fn resume(&mut self, granted: Vec<Granted>) {
        // Locks released by operations resumed here are handled by the calls they make.
        for g in granted {
            let Some(t) = self.txs.get_mut(&g.tx) else {
                continue;
            };
            let Some((to, request)) = t.waiting.take() else {
                continue;
            };
            self.run_op(self.now, to, g.tx, request);
        }
    }

    /// Time passed: lock timeouts, deadlock victims, group flushes, checkpoints.
    pub fn tick(&mut self, now: Duration) {
        self.now = now;
        if self.stopped.is_some() {
            return;
        }
        let mut victims = Vec::new();
        for v in self.volumes.values_mut() {
            victims.extend(v.pair.expire(now));
        }
        victims.extend(
            self.txs
                .iter()
                .filter(|(_, t)| {
                    t.state == TxState::Active
                        && t.waiting.is_none()
                        && now.saturating_sub(t.last_request_at) >= self.config.tx_idle_timeout
                })
                .map(|(tx, _)| (*tx, AbortReason::Idle)),
        );
        for (tx, reason) in victims {
            self.abort_tx(now, tx, reason, None);
        }
        self.primary.tick(now);
        if now >= self.checkpoints.next_at && self.checkpoints.flushing.is_none() {
            self.checkpoints.flushing = Some(self.checkpoints.last);
            self.actions.push_back(OwnerAction::FlushVolumes {
                checkpoint_lsn: self.checkpoints.last,
            });
        }
        self.drain_primary();
    }

    /// The volumes are flushed with checkpoint LSN `checkpoint_lsn`: write the next checkpoint.
    pub fn on_volumes_flushed(&mut self, now: Duration, checkpoint_lsn: Lsn) {
        self.now = now;
        if self.checkpoints.flushing != Some(checkpoint_lsn) || self.stopped.is_some() {
            return;
        }
        self.checkpoints.flushing = None;
        self.checkpoints.next_at = now + self.config.checkpoint_interval;
        // A transaction whose commit record is written has ended as far as the trail goes,
        // even while its acknowledgement waits.
        let active: Vec<ActiveTx> = self
            .txs
            .iter()
            .filter(|(_, t)| t.state != TxState::Committing)
            .filter_map(|(tx, t)| {
                t.first_lsn.map(|first_lsn| ActiveTx {
                    tx: *tx,
                    first_lsn,
                    prepared: matches!(t.state, TxState::Prepared | TxState::Preparing),
                })
            })
            .chain(self.in_doubt.values().map(|d| ActiveTx {
                tx: d.tx,
                first_lsn: d.first_lsn,
                prepared: true,
            }))
            .collect();
        let oldest_active = active.iter().map(|a| a.first_lsn).min();
        let (mut messages, message_lows) = self.table.entries();
        // Commits written but not yet acknowledged are answered by their records, which this
        // checkpoint follows: recovery from it must find their replies too.
        for (lsn, end) in &self.ends {
            if !end.prepare {
                messages.push(MessageEntry {
                    request: end.request,
                    reply: Reply::Committed(Receipt {
                        commit_lsn: *lsn,
                        epoch: self.epoch,
                        state: self.primary.state(),
                    }),
                });
            }
        }
        let body = AuditBody::Checkpoint(Checkpoint {
            epoch: self.epoch,
            active,
            messages,
            message_lows,
            previous: self.checkpoints.last,
        });
        let Ok(lsn) = self.append(now, &body, false) else {
            return;
        };
        self.checkpoints.penultimate = self.checkpoints.last;
        self.checkpoints.last = lsn;
        // Recovery reads from the penultimate checkpoint (every volume was flushed up to it
        // before this one was written); before the second checkpoint, from the start.
        let mut horizon = if self.checkpoints.penultimate == Lsn(0) {
            Lsn(1)
        } else {
            self.checkpoints.penultimate
        };
        if let Some(oldest) = oldest_active {
            horizon = horizon.min(oldest);
        }
        self.primary.set_horizon(horizon);
        self.actions
            .push_back(OwnerAction::TruncateTrail { below: horizon });
        self.drain_primary();
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

fn as_ref_bound(b: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match b {
        Bound::Included(k) => Bound::Included(k.as_slice()),
        Bound::Excluded(k) => Bound::Excluded(k.as_slice()),
        Bound::Unbounded => Bound::Unbounded,
    }
}
