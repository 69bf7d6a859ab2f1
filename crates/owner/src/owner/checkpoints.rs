//! Ticks and fuzzy checkpoints: lock timeouts, idle transactions, group flushes, and the
//! checkpoint record written after every volume was flushed up to the previous one.

use super::*;
use tracing::warn;

impl<S: Store, C: Clone + std::fmt::Debug> LsgOwner<S, C> {
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
        // Clients that are idle and saw every reply need no low mark: dropped, so the
        // checkpoint does not carry every client that ever connected.
        self.table.forget_idle_clients();
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
        let lsn = match self.append(now, &body, false) {
            Ok(lsn) => lsn,
            Err(e) => {
                // Stopped, or a checkpoint larger than the LSG's record limit (a message
                // table or an active list that outgrew `max_record_bytes`): the trail is not
                // truncated until one fits, so say so every time.
                warn!(lsg = %self.lsg.lsg_id(), error = %e, "checkpoint not written; the trail keeps growing until one is");
                return;
            }
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
}
