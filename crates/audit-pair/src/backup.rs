//! A backup of an audit pair: the same-node backup half or the backup node's pairs. It holds the
//! primary's checkpoint stream in memory, in LSN order, from the truncation horizon on, and
//! acknowledges how far it holds it. At a takeover its records are what only it may hold (the
//! tail the trail lacks) and, when they continue the trail, the warm state recovery starts from.
//!
//! Sans-IO like the primary: messages and `now` in, [`BackupAction`]s out.
//!
//! Epochs. The backup remembers the highest owner epoch it has seen for its LSG and refuses
//! anything older: it answers a stale primary with its own epoch, which fences that primary
//! (it acknowledges nothing more). It accepts records only after the primary it joined sent a
//! `Resync`, so records of a previous primary's stream never mix with the current one's.

use std::collections::VecDeque;
use std::time::Duration;

use duplex_lsg::{LsgId, Lsn, OwnerEpoch};
use duplex_pair::stream::{PairMessage, PairTag, StreamRecord, batches};
use duplex_transport::EndpointId;

/// The largest `FenceAck` message: a copy larger than this goes as several, well under the
/// transport's bulk frame limit (16 MiB by default).
pub const FENCE_ACK_BYTES: usize = 4 << 20;

/// What the backup wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupAction {
    Send {
        to: EndpointId,
        message: PairMessage,
    },
}

#[derive(Debug)]
pub struct AuditBackup {
    lsg: LsgId,
    incarnation: u64,
    /// The primary this backup joined, if any.
    primary: Option<EndpointId>,
    /// The highest owner epoch seen for the LSG.
    epoch: OwnerEpoch,
    /// The epoch of the primary whose stream the records come from.
    stream_epoch: OwnerEpoch,
    /// The current primary resynchronised this backup: its records are welcome.
    synced: bool,
    records: VecDeque<StreamRecord>,
    retained_from: Lsn,
    retained_bytes: usize,
    actions: VecDeque<BackupAction>,
    /// When the primary was last heard; silence for `rejoin_interval` sends a `Join` again.
    heard_at: Duration,
    rejoin_interval: Duration,
}

impl AuditBackup {
    /// A backup with nothing yet, in process incarnation `incarnation`.
    /// A backup that asks its primary for the stream again after `rejoin_interval` of silence
    /// (lost frames, or a primary that stopped streaming to it).
    pub fn new(lsg: LsgId, incarnation: u64, rejoin_interval: Duration) -> Self {
        AuditBackup {
            lsg,
            incarnation,
            primary: None,
            epoch: OwnerEpoch(0),
            stream_epoch: OwnerEpoch(0),
            synced: false,
            records: VecDeque::new(),
            retained_from: Lsn(1),
            retained_bytes: 0,
            actions: VecDeque::new(),
            heard_at: Duration::ZERO,
            rejoin_interval,
        }
    }

    fn tag(&self) -> PairTag {
        PairTag {
            lsg: self.lsg,
            epoch: self.stream_epoch,
            incarnation: self.incarnation,
        }
    }

    /// The last record held (`Lsn(0)`: none).
    pub fn held(&self) -> Lsn {
        Lsn(self.retained_from.0 + self.records.len() as u64 - 1)
    }

    pub fn epoch(&self) -> OwnerEpoch {
        self.epoch
    }

    /// The epoch of the primary whose stream this backup holds.
    pub fn stream_epoch(&self) -> OwnerEpoch {
        self.stream_epoch
    }

    pub fn primary(&self) -> Option<EndpointId> {
        self.primary
    }

    /// The record at `lsn`, if held.
    pub fn record(&self, lsn: Lsn) -> Option<&StreamRecord> {
        let index = lsn.0.checked_sub(self.retained_from.0)?;
        self.records.get(usize::try_from(index).ok()?)
    }

    /// Records held from `from` on, in order.
    pub fn records_from(&self, from: Lsn) -> impl Iterator<Item = &StreamRecord> {
        let skip = from.0.saturating_sub(self.retained_from.0);
        self.records
            .iter()
            .skip(usize::try_from(skip).unwrap_or(usize::MAX))
    }

    /// The oldest record held.
    pub fn retained_from(&self) -> Lsn {
        self.retained_from
    }

    pub fn retained_bytes(&self) -> usize {
        self.retained_bytes
    }

    /// Time passed: a silent primary is asked for its stream again.
    pub fn tick(&mut self, now: Duration) {
        if let Some(primary) = self.primary
            && now.saturating_sub(self.heard_at) >= self.rejoin_interval
        {
            self.heard_at = now;
            self.join(primary);
        }
    }

    /// Asks `primary` for its stream, continuing from what is held.
    pub fn join(&mut self, primary: EndpointId) {
        self.primary = Some(primary);
        self.synced = false;
        self.actions.push_back(BackupAction::Send {
            to: primary,
            message: PairMessage::Join {
                tag: self.tag(),
                held: self.held(),
            },
        });
    }

    /// This backup is taking over at `epoch`: it refuses every older primary from now on.
    pub fn take_over(&mut self, epoch: OwnerEpoch) {
        self.epoch = self.epoch.max(epoch);
        self.primary = None;
        self.synced = false;
    }

    pub fn on_message(&mut self, now: Duration, from: EndpointId, message: PairMessage) {
        let tag = message.tag();
        if tag.lsg != self.lsg {
            return;
        }
        if tag.epoch < self.epoch && !matches!(message, PairMessage::FenceAck { .. }) {
            // A fenced primary: tell it who owns the LSG now.
            self.actions.push_back(BackupAction::Send {
                to: from,
                message: PairMessage::Ack {
                    tag: PairTag {
                        epoch: self.epoch,
                        ..self.tag()
                    },
                    held: Lsn(0),
                },
            });
            return;
        }
        if Some(from) == self.primary {
            self.heard_at = now;
        }
        match message {
            PairMessage::Resync { tag, from: start } if Some(from) == self.primary => {
                self.epoch = self.epoch.max(tag.epoch);
                if tag.epoch != self.stream_epoch || start.0 > self.held().0 + 1 {
                    // Another primary's history, or a gap: start over from `start`.
                    self.resync(start);
                }
                // The same primary's stream: what is held is the same records it will resend,
                // and may already have been counted for an acknowledgement; keep it.
                self.stream_epoch = tag.epoch;
                self.synced = true;
            }
            PairMessage::Records {
                tag,
                records,
                retain_from,
            } if self.synced && Some(from) == self.primary && tag.epoch == self.stream_epoch => {
                self.take_records(from, records, retain_from);
            }
            PairMessage::Fence { tag, from: start } => {
                self.epoch = self.epoch.max(tag.epoch);
                self.primary = Some(from);
                self.synced = false;
                let records: Vec<StreamRecord> = self.records_from(start).cloned().collect();
                let parts = batches(&records, FENCE_ACK_BYTES);
                let last = parts.len().saturating_sub(1);
                if parts.is_empty() {
                    self.actions.push_back(BackupAction::Send {
                        to: from,
                        message: PairMessage::FenceAck {
                            tag: self.tag(),
                            records: Vec::new(),
                            complete: true,
                        },
                    });
                }
                for (i, part) in parts.into_iter().enumerate() {
                    self.actions.push_back(BackupAction::Send {
                        to: from,
                        message: PairMessage::FenceAck {
                            tag: self.tag(),
                            records: part.to_vec(),
                            complete: i == last,
                        },
                    });
                }
            }
            _ => {}
        }
    }

    pub fn poll_action(&mut self) -> Option<BackupAction> {
        self.actions.pop_front()
    }

    /// Checks the invariants; tests call it after every step.
    pub fn validate(&self) -> Result<(), String> {
        for (i, r) in self.records.iter().enumerate() {
            if r.lsn.0 != self.retained_from.0 + i as u64 {
                return Err(format!("record {} held at position {i}", r.lsn));
            }
        }
        if self.stream_epoch > self.epoch {
            return Err(format!(
                "holds the stream of epoch {} above the highest seen {}",
                self.stream_epoch, self.epoch
            ));
        }
        let bytes: usize = self.records.iter().map(StreamRecord::size_bytes).sum();
        if bytes != self.retained_bytes {
            return Err(format!(
                "{bytes} bytes held, {} counted",
                self.retained_bytes
            ));
        }
        if self.retained_from == Lsn(0) {
            return Err("records start at LSN 0".into());
        }
        Ok(())
    }

    /// Drops what is held from `start` on; a start past the end (a gap) drops everything.
    fn resync(&mut self, start: Lsn) {
        if start.0 > self.held().0 + 1 || start < self.retained_from {
            self.records.clear();
            self.retained_bytes = 0;
            self.retained_from = start.max(Lsn(1));
            return;
        }
        while self.held() >= start {
            match self.records.pop_back() {
                Some(r) => self.retained_bytes -= r.size_bytes(),
                None => break,
            }
        }
    }

    fn take_records(&mut self, from: EndpointId, records: Vec<StreamRecord>, retain_from: Lsn) {
        let Some(first) = records.first() else { return };
        let next = Lsn(self.held().0 + 1);
        if first.lsn > next {
            // A gap: frames were lost. Ask for the stream again from what is held.
            self.join(from);
            return;
        }
        let before = self.held();
        for r in records {
            if r.lsn == Lsn(self.held().0 + 1) {
                self.retained_bytes += r.size_bytes();
                self.records.push_back(r);
            }
        }
        while self.retained_from < retain_from.min(self.held()) {
            match self.records.pop_front() {
                Some(r) => {
                    self.retained_bytes -= r.size_bytes();
                    self.retained_from = Lsn(self.retained_from.0 + 1);
                }
                None => break,
            }
        }
        if self.held() > before {
            self.actions.push_back(BackupAction::Send {
                to: from,
                message: PairMessage::Ack {
                    tag: self.tag(),
                    held: self.held(),
                },
            });
        }
    }
}
