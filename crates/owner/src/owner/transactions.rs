//! Transactions: begin, reads, writes and scans under the volume pairs' locks, commit by the
//! acknowledgement rule, abort by compensation, prepare, and the operations a released lock
//! unblocks.

use super::*;

impl<S: Store, C: Clone + std::fmt::Debug> LsgOwner<S, C> {
    pub(super) fn begin(&mut self, now: Duration, from: C, request: RequestKey) {
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
    pub(super) fn run_op(&mut self, now: Duration, from: C, tx: TxId, request: ClientRequest) {
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

    pub(super) fn check_sizes(&self, op: &Op) -> Option<OpError> {
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
    pub(super) fn run_granted(
        &mut self,
        now: Duration,
        tx: TxId,
        volume: &str,
        op: Op,
    ) -> ClientReply {
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

    pub(super) fn write(
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

    pub(super) fn on_acknowledged(&mut self, lsn: Lsn, receipt: Receipt) {
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
    pub(super) fn end_request(&mut self, now: Duration, from: C, tx: TxId, request: ClientRequest) {
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
    pub(super) fn prepare(
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

    pub(super) fn commit(&mut self, now: Duration, from: C, tx: TxId, request: RequestKey) {
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
    pub(super) fn abort_tx(
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
    pub(super) fn release(&mut self, tx: TxId) {
        let mut granted: Vec<Granted> = Vec::new();
        for v in self.volumes.values_mut() {
            granted.extend(v.pair.release(tx));
        }
        self.resume(granted);
    }

    pub(super) fn resume(&mut self, granted: Vec<Granted>) {
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
}

pub(super) fn as_ref_bound(b: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match b {
        Bound::Included(k) => Bound::Included(k.as_slice()),
        Bound::Excluded(k) => Bound::Excluded(k.as_slice()),
        Bound::Unbounded => Bound::Unbounded,
    }
}
