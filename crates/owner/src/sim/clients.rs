//! The bank clients: transfers as interactive transactions, resends of the request in flight
//! to the current primary, and what each saw committed.

use super::*;

pub(super) fn balance_of(reply: &ClientReply) -> Option<i64> {
    match reply {
        ClientReply::Value(Some(v)) => Some(i64::from_le_bytes(v.as_slice().try_into().ok()?)),
        _ => None,
    }
}

pub(super) fn marker_value(t: &Transfer) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    v.extend_from_slice(&(t.from as u64).to_le_bytes());
    v.extend_from_slice(&(t.to as u64).to_le_bytes());
    v.extend_from_slice(&t.amount.to_le_bytes());
    v
}

impl World {
    pub(super) fn step_client(&mut self, index: usize) -> Result<(), SimFailure> {
        let now = self.now();
        let primary = self.primary;
        let accounts = self.options.accounts;
        let quota = self.options.transfers_per_client;
        let mut replies = Vec::new();
        {
            let client = &mut self.clients[index];
            while let Some(e) = client.transport.try_next_event() {
                match e {
                    Event::Response { id, payload, .. }
                        if client.pending.as_ref().is_some_and(|(p, _)| *p == Some(id)) =>
                    {
                        match ClientReply::decode(&payload) {
                            Ok(r) => replies.push(r),
                            Err(e) => replies.push(ClientReply::Error(e)),
                        }
                    }
                    Event::RequestFailed { id, .. } => {
                        if let Some((p, _)) = client.pending.as_mut()
                            && *p == Some(id)
                        {
                            *p = None;
                            client.retry_at = Some(now + Duration::from_millis(20));
                        }
                    }
                    _ => {}
                }
            }
        }
        for reply in replies {
            self.on_client_reply(index, reply)?;
        }
        let client = &mut self.clients[index];
        if client.pending.is_none() && client.transfer.is_none() && client.done < quota {
            let from = self.rng.random_range(0..accounts);
            let mut to = self.rng.random_range(0..accounts - 1);
            if to >= from {
                to += 1;
            }
            client.transfer = Some(Transfer {
                id: client.next_transfer,
                from,
                to,
                amount: self.rng.random_range(1..50),
            });
            client.next_transfer += 1;
            client.step = 0;
            client.tx = None;
            Self::issue(client, Op::Begin);
        }
        if let Some((None, request)) = &client.pending
            && client.retry_at.is_none_or(|t| now >= t)
            && let Some(p) = primary
        {
            let request = request.clone();
            let sent = request.encode().ok().and_then(|bytes| {
                client
                    .transport
                    .request(p, Bytes::from(bytes), Duration::from_millis(200))
                    .ok()
            });
            match sent {
                Some(id) => {
                    client.pending = Some((Some(id), request));
                    client.retry_at = None;
                }
                None => client.retry_at = Some(now + Duration::from_millis(20)),
            }
        }
        Ok(())
    }

    /// Queues the next request of the client's transfer (sent by `step_client`).
    pub(super) fn issue(client: &mut Client, op: Op) {
        let seq = client.next_seq;
        client.next_seq += 1;
        client.seen_below = seq;
        client.pending = Some((
            None,
            ClientRequest {
                client: client.id,
                seq: RequestSeq(seq),
                seen_below: RequestSeq(client.seen_below),
                tx: client.tx,
                op,
            },
        ));
        client.retry_at = None;
    }

    pub(super) fn restart_transfer(client: &mut Client, now: Duration, backoff: Duration) {
        client.step = 0;
        client.tx = None;
        Self::issue(client, Op::Begin);
        client.retry_at = Some(now + backoff);
    }

    pub(super) fn on_client_reply(
        &mut self,
        index: usize,
        reply: ClientReply,
    ) -> Result<(), SimFailure> {
        let now = self.now();
        self.note_resent_answer(index, &reply);
        let client = &mut self.clients[index];
        let Some(transfer) = client.transfer.clone() else {
            return Ok(());
        };
        let resend = |client: &mut Client| {
            if let Some((p, _)) = client.pending.as_mut() {
                *p = None;
            }
            client.retry_at = Some(now + Duration::from_millis(20));
        };
        match (&reply, client.step) {
            (ClientReply::Error(OpError::NotPrimary { .. }), _) => resend(client),
            (ClientReply::Error(OpError::Aborted { reason, .. }), _) => {
                if matches!(
                    reason,
                    duplex_pair::AbortReason::Deadlock | duplex_pair::AbortReason::LockTimeout
                ) {
                    self.report.aborted_by_deadlock_or_timeout += 1;
                }
                let backoff = Duration::from_millis(1 + transfer.id % 7);
                Self::restart_transfer(client, now, backoff);
            }
            (
                ClientReply::Error(
                    OpError::UnknownTransaction { .. }
                    | OpError::LockRefused { .. }
                    | OpError::TooManyTransactions { .. }
                    | OpError::Storage { .. },
                ),
                _,
            ) => Self::restart_transfer(client, now, Duration::from_millis(5)),
            (ClientReply::Began(tx), 0) => {
                client.tx = Some(*tx);
                client.step = 1;
                Self::issue(
                    client,
                    Op::Get {
                        volume: ACCOUNTS.into(),
                        key: account_key(transfer.from),
                    },
                );
            }
            (r @ ClientReply::Value(_), 1) => {
                let Some(b) = balance_of(r) else {
                    return Err(
                        self.fail(format!("account {} has no balance: {r:?}", transfer.from))
                    );
                };
                let client = &mut self.clients[index];
                client.balances.0 = b;
                client.step = 2;
                Self::issue(
                    client,
                    Op::Get {
                        volume: ACCOUNTS.into(),
                        key: account_key(transfer.to),
                    },
                );
            }
            (r @ ClientReply::Value(_), 2) => {
                let Some(b) = balance_of(r) else {
                    return Err(self.fail(format!("account {} has no balance: {r:?}", transfer.to)));
                };
                let client = &mut self.clients[index];
                client.balances.1 = b;
                client.step = 3;
                let value = (client.balances.0 - transfer.amount).to_le_bytes().to_vec();
                Self::issue(
                    client,
                    Op::Put {
                        volume: ACCOUNTS.into(),
                        key: account_key(transfer.from),
                        value,
                    },
                );
            }
            (ClientReply::Written, 3) => {
                client.step = 4;
                let value = (client.balances.1 + transfer.amount).to_le_bytes().to_vec();
                Self::issue(
                    client,
                    Op::Put {
                        volume: ACCOUNTS.into(),
                        key: account_key(transfer.to),
                        value,
                    },
                );
            }
            (ClientReply::Written, 4) => {
                client.step = 5;
                Self::issue(
                    client,
                    Op::Put {
                        volume: MARKERS.into(),
                        key: transfer.id.to_be_bytes().to_vec(),
                        value: marker_value(&transfer),
                    },
                );
            }
            (ClientReply::Written, 5) if client.prepare_next => {
                client.step = 7;
                client.prepare_next = false;
                Self::issue(
                    client,
                    Op::Prepare {
                        coordinator: COORDINATOR,
                    },
                );
            }
            (ClientReply::Written, 5) => {
                client.step = 6;
                Self::issue(client, Op::Commit);
            }
            (ClientReply::Prepared, 7) => {
                // In doubt as far as this LSG goes: the client waits for the coordinator.
                client.pending = None;
                let Some(tx) = client.tx else {
                    return Err(self.fail("a prepared transfer without a transaction".into()));
                };
                if let Some(script) = self.script.as_mut() {
                    script.prepared = Some((index, tx, transfer.clone()));
                }
                self.report.prepared = Some(PreparedReport {
                    tx,
                    transfer: transfer.id,
                    accounts: (transfer.from, transfer.to),
                    prepared_at: now,
                    in_doubt_at_resolve: Vec::new(),
                    resolved: None,
                });
                self.note(format!(
                    "client {index} transfer {} prepared as {tx}",
                    transfer.id
                ));
            }
            (ClientReply::Outcome(Reply::Committed(receipt)), 6) => {
                client.done += 1;
                client.transfer = None;
                client.pending = None;
                self.committed.push(Committed {
                    transfer: transfer.id,
                    lsn: receipt.commit_lsn,
                    epoch: receipt.epoch,
                    state: receipt.state,
                });
                self.report.transfers_committed += 1;
                self.note(format!(
                    "client {index} transfer {} committed at {} ({:?}, epoch {})",
                    transfer.id, receipt.commit_lsn, receipt.state, receipt.epoch
                ));
            }
            (ClientReply::Outcome(Reply::Aborted(_)), 6) => {
                Self::restart_transfer(client, now, Duration::from_millis(2));
            }
            (other, step) => {
                return Err(self.fail(format!(
                    "client {} transfer {} step {step}: unexpected reply {other:?}",
                    index, transfer.id
                )));
            }
        }
        Ok(())
    }

    /// The answer to a resent request whose first reply was lost.
    pub(super) fn note_resent_answer(&mut self, index: usize, reply: &ClientReply) {
        let (Some(lost), ClientReply::Outcome(outcome)) = (&self.report.lost_reply, reply) else {
            return;
        };
        let client = &self.clients[index];
        let resent = client.id == lost.client
            && client
                .pending
                .as_ref()
                .is_some_and(|(_, r)| r.seq == lost.seq);
        if !resent || self.report.resent_answer.is_some() {
            return;
        }
        let tx = lost.tx;
        let owner = self.current_owner();
        let answer = ResentAnswer {
            at: self.now(),
            owner: owner.map(|(id, _)| id),
            owner_epoch: owner.map(|(_, o)| o.epoch()),
            reply: *outcome,
            commit_records_in_trail: owner.map_or(0, |(_, o)| Self::commit_records(o, tx)),
        };
        self.report.resent_answer = Some(answer);
    }

    pub(super) fn clients_done(&self) -> bool {
        self.clients
            .iter()
            .all(|c| c.done >= self.options.transfers_per_client && c.pending.is_none())
    }
}
