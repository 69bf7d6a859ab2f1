//! Taking an LSG over: the step that turns a backup (or fresh pairs) into its owner (SPEC §3,
//! seeds 000 and 004).
//!
//! The caller has opened the LSG for writing, which raised the owner epoch: from then on the
//! old owner's flushes fail and the backups refuse its stream. It has also asked the other
//! backups for their copies of the stream (`Fence`). Then, here:
//!
//! 1. Each copy (a [`Chain`]) is checked against the trail: it continues the trail only if it
//!    holds the trail's last record, byte for byte, or starts right after it. A copy of a
//!    history the trail has moved past (a backup cut off during an earlier takeover) fails the
//!    check and is not used.
//! 2. The longest valid copy's records beyond the trail's end (acknowledged from memory, never
//!    flushed) are appended at their LSNs and flushed.
//! 3. Warm start when this backup's own copy is valid, reaches the trail's end, and the trail
//!    says it was in communication (its last record does not carry the communications flag):
//!    recovery reads the copy in memory. Otherwise cold start: recovery reads the retained
//!    trail. Either way the same [`plan_recovery`] decides: redo after each volume's checkpoint
//!    (idempotent by generation), undo of every transaction that was neither committed, aborted
//!    nor prepared (compensation records at new LSNs), and in-doubt transactions relocked.
//! 4. The new owner starts backup-only (flush before acknowledging) until a backup catches up.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use duplex_audit_pair::AuditBackup;
use duplex_audit_pair::recovery::{RecoveryError, RecoveryPlan, TrailRecord, plan_recovery};
use duplex_lsg::{
    AuditRecord, LogStorageGroup, LsgError, Lsn, OwnerEpoch, RecordFlags, RecordType, Store,
};
use duplex_pair::CommitState;
use duplex_pair::records::{AuditBody, RecordError, StateChange};
use duplex_pair::stream::{StreamError, StreamRecord};
use duplex_transport::EndpointId;
use thiserror::Error;
use tracing::{info, warn};

use crate::owner::{LsgOwner, OwnerConfig, OwnerStart};
use crate::protocol::OpError;

/// One change to redo: key, value (`None`: delete), LSN.
type RedoChange<'a> = (&'a [u8], Option<&'a [u8]>, Lsn);

/// A backup's copy of the checkpoint stream: dense records of one primary's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The epoch of the primary whose stream it is.
    pub epoch: OwnerEpoch,
    pub records: Vec<StreamRecord>,
}

impl Chain {
    pub fn of_backup(backup: &AuditBackup) -> Self {
        Chain {
            epoch: backup.stream_epoch(),
            records: backup
                .records_from(backup.retained_from())
                .cloned()
                .collect(),
        }
    }

    fn first(&self) -> Option<Lsn> {
        self.records.first().map(|r| r.lsn)
    }

    fn last(&self) -> Option<Lsn> {
        self.records.last().map(|r| r.lsn)
    }

    fn get(&self, lsn: Lsn) -> Option<&StreamRecord> {
        let first = self.first()?;
        let index = usize::try_from(lsn.0.checked_sub(first.0)?).ok()?;
        self.records.get(index)
    }
}

/// The copies a taker gathers after its `Fence`: each backup answers with one or more
/// `FenceAck` parts, the last marked complete. Both drivers (the simulation and the real one)
/// collect them here, so the rule "only a complete copy counts" lives once.
#[derive(Debug, Default)]
pub struct Copies {
    waiting_for: BTreeSet<EndpointId>,
    chains: Vec<(EndpointId, Chain)>,
}

impl Copies {
    /// Waits for a copy from each of `from`.
    pub fn new(from: impl IntoIterator<Item = EndpointId>) -> Self {
        Copies {
            waiting_for: from.into_iter().collect(),
            chains: Vec::new(),
        }
    }

    /// The backups whose copy is still missing or arriving.
    pub fn waiting_for(&self) -> impl Iterator<Item = &EndpointId> {
        self.waiting_for.iter()
    }

    /// Every copy asked for is in.
    pub fn all_in(&self) -> bool {
        self.waiting_for.is_empty()
    }

    /// Stops waiting for `peer` (it went down): a copy it was still sending is dropped, one it
    /// completed is kept (the records are here now, whatever became of the sender).
    pub fn give_up_on(&mut self, peer: EndpointId) {
        if self.waiting_for.remove(&peer) {
            self.chains.retain(|(from, _)| *from != peer);
        }
    }

    /// One `FenceAck` part from `from`, whose stream was of `epoch`. Returns true when it
    /// completed `from`'s copy. Parts from a backup not waited for are ignored.
    pub fn on_part(
        &mut self,
        from: EndpointId,
        epoch: OwnerEpoch,
        records: &[StreamRecord],
        complete: bool,
    ) -> bool {
        if !self.waiting_for.contains(&from) {
            return false;
        }
        match self.chains.iter_mut().find(|(f, _)| *f == from) {
            Some((_, chain)) => chain.records.extend(records.iter().cloned()),
            None => self.chains.push((
                from,
                Chain {
                    epoch,
                    records: records.to_vec(),
                },
            )),
        }
        if complete {
            self.waiting_for.remove(&from);
        }
        complete
    }

    /// The complete copies. One still arriving when the time ran out cannot vouch for
    /// anything and is left out.
    pub fn into_complete(self) -> Vec<(EndpointId, Chain)> {
        let Copies {
            waiting_for,
            mut chains,
        } = self;
        chains.retain(|(from, _)| !waiting_for.contains(from));
        chains
    }
}

/// How the new owner started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    /// From the backup's copy of the stream: no trail read.
    Warm,
    /// From the retained trail.
    Cold,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakeoverReport {
    pub epoch: OwnerEpoch,
    pub start: StartKind,
    /// The trail's last record when it was opened.
    pub trail_end: Lsn,
    /// Records appended from a backup's copy beyond it.
    pub reappended: u64,
    pub records_read: u64,
    pub redone: usize,
    pub undone: usize,
    pub in_doubt: usize,
}

#[derive(Debug, Error)]
pub enum TakeoverError {
    #[error("takeover: storage: {0}")]
    Storage(#[from] LsgError),
    #[error("takeover: {0}")]
    Record(#[from] RecordError),
    #[error("takeover: recovery: {0}")]
    Recovery(#[from] RecoveryError),
    #[error("takeover: a backup's copy: {0}")]
    Copy(#[from] StreamError),
    #[error("takeover: finishing recovery: {0}")]
    Finish(#[from] OpError),
    #[error(
        "takeover: the trail ends in normal state, so commits may have been acknowledged from memory, and no complete copy of the stream is at hand (the backup node's pairs {from:?} did not answer, and this half did not count): wait for them"
    )]
    CopyMissing { from: Option<EndpointId> },
}

/// Each volume of the LSG with its checkpoint LSN: every change at or below it is in the
/// volume, so redo starts after it.
pub fn volume_checkpoints<S: Store>(lsg: &LogStorageGroup<S>) -> BTreeMap<String, Lsn> {
    lsg.volume_names()
        .into_iter()
        .filter_map(|name| {
            let lsn = lsg.volume(&name).ok()?.checkpoint_lsn();
            Some((name, lsn))
        })
        .collect()
}

/// Records (a copy's or the trail's) checked and decoded for recovery.
pub fn trail_records(records: &[StreamRecord]) -> Result<Vec<TrailRecord>, TakeoverError> {
    let mut decoded = Vec::with_capacity(records.len());
    for r in records {
        let (record_type, flags) = r.kind()?;
        decoded.push(TrailRecord {
            lsn: r.lsn,
            flags,
            body: AuditBody::decode(r.lsn, record_type, &r.payload)?,
        });
    }
    Ok(decoded)
}

/// Every record of the retained trail, in order.
pub fn read_trail<S: Store>(lsg: &LogStorageGroup<S>) -> Result<Vec<StreamRecord>, TakeoverError> {
    let mut records = Vec::new();
    for r in lsg.audit().reader(lsg.audit().first_lsn())? {
        let r = r?;
        records.push(StreamRecord {
            lsn: r.lsn,
            record_type: r.record_type as u8,
            flags: r.flags.bits(),
            payload: r.payload,
        });
    }
    Ok(records)
}

fn is_state_change_to_normal(r: &AuditRecord) -> bool {
    r.record_type == RecordType::StateChange
        && matches!(
            AuditBody::decode(r.lsn, r.record_type, &r.payload),
            Ok(AuditBody::StateChange(StateChange {
                state: CommitState::Normal,
                ..
            }))
        )
}

/// Whether a same-node half with this copy counted for every acknowledgement up to the trail's
/// end: its copy's last state change names its incarnation, and no later one in the trail
/// dropped it (a drop is durable before it takes effect).
fn counted_through<S: Store>(
    lsg: &LogStorageGroup<S>,
    own: &Chain,
    incarnation: u64,
    trail_end: Lsn,
) -> bool {
    let names_me = |record_type: u8, lsn: Lsn, payload: &[u8]| -> Option<bool> {
        if record_type != RecordType::StateChange as u8 {
            return None;
        }
        match AuditBody::decode(lsn, RecordType::StateChange, payload) {
            Ok(AuditBody::StateChange(s)) => Some(s.home_backup == Some(incarnation)),
            _ => Some(false),
        }
    };
    let in_copy = own
        .records
        .iter()
        .rev()
        .find_map(|r| names_me(r.record_type, r.lsn, &r.payload));
    if in_copy != Some(true) {
        return false;
    }
    let Some(last) = own.last() else { return false };
    if last >= trail_end {
        return true;
    }
    let Ok(reader) = lsg.audit().reader(Lsn(last.0 + 1)) else {
        return false;
    };
    for r in reader {
        let Ok(r) = r else { return false };
        if names_me(r.record_type as u8, r.lsn, &r.payload) == Some(false) {
            return false;
        }
    }
    true
}

/// Who is taking over, and whose copy of the stream is complete when the trail ends in normal
/// state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taker {
    /// The taking process's incarnation: the one the same-node half is counted under.
    pub incarnation: u64,
    /// The backup node's pairs of the previous owner: in normal state they held every record
    /// acknowledged from memory. `None` when the taker is them.
    pub backup_node: Option<EndpointId>,
    /// Every process that could hold a copy has restarted since the last owner ran (a power
    /// loss of the whole cluster): no copy can be waited for; commits acknowledged from memory
    /// and not flushed are gone, as their receipts (normal state) allowed.
    pub memory_lost_everywhere: bool,
}

/// Takes over `lsg` (just opened for writing) with this backup's copy of the stream (`own`,
/// `None` for fresh pairs) and the copies gathered from the other backups. See the module docs.
pub fn take_over<S: Store, C: Clone + std::fmt::Debug>(
    lsg: LogStorageGroup<S>,
    taker: Taker,
    own: Option<Chain>,
    gathered: Vec<(EndpointId, Chain)>,
    config: OwnerConfig,
    now: Duration,
) -> Result<(LsgOwner<S, C>, TakeoverReport), TakeoverError> {
    let epoch = lsg.owner_epoch();
    let trail_end = Lsn(lsg.audit().next_lsn().0 - 1);
    let last_record = match trail_end {
        Lsn(0) => None,
        end => lsg.audit().reader(end)?.next().transpose()?,
    };
    let normal_at_end = last_record.as_ref().is_some_and(|r| {
        !r.flags.contains(RecordFlags::OUT_OF_COMMUNICATION) || is_state_change_to_normal(r)
    });
    let continues_trail = |chain: &Chain| -> bool {
        let (Some(first), Some(last)) = (chain.first(), chain.last()) else {
            return false;
        };
        // A copy must overlap the trail (a backup keeps records from at most the durable end
        // on), so it can be checked; one that starts after the trail's end cannot be.
        if first > trail_end {
            return false;
        }
        let at = last.min(trail_end);
        match (&last_record, chain.get(at)) {
            (Some(trail), Some(copy)) if at == trail_end => {
                trail.payload == copy.payload
                    && trail.record_type as u8 == copy.record_type
                    && trail.flags.bits() == copy.flags
            }
            // The copy ends before the trail does: it cannot vouch for the end; it may still
            // be the warm state if it matches where it ends (checked by reading that record).
            (_, Some(copy)) => lsg
                .audit()
                .reader(at)
                .ok()
                .and_then(|mut r| r.next())
                .and_then(|r| r.ok())
                .is_some_and(|trail| {
                    trail.payload == copy.payload && trail.record_type as u8 == copy.record_type
                }),
            _ => false,
        }
    };
    let own = own.filter(|c| !c.records.is_empty());
    let own_valid = own.as_ref().is_some_and(continues_trail);
    if normal_at_end {
        // Commits may have been acknowledged from memory beyond the trail's end: a complete
        // copy must be at hand, the backup node's or this same-node half's while it counted.
        let complete = match taker.backup_node {
            _ if taker.memory_lost_everywhere => true,
            None => true,
            Some(node) => {
                gathered
                    .iter()
                    .any(|(from, c)| *from == node && continues_trail(c))
                    || (own_valid
                        && own.as_ref().is_some_and(|c| {
                            counted_through(&lsg, c, taker.incarnation, trail_end)
                        }))
            }
        };
        if !complete {
            return Err(TakeoverError::CopyMissing {
                from: taker.backup_node,
            });
        }
    }
    let tail = own
        .iter()
        .filter(|_| own_valid)
        .chain(
            gathered
                .iter()
                .map(|(_, c)| c)
                .filter(|c| continues_trail(c)),
        )
        .filter(|c| c.last().is_some_and(|l| l > trail_end))
        .max_by_key(|c| (c.last(), c.epoch));
    let mut reappended = 0;
    if let Some(tail) = tail {
        for r in tail.records.iter().filter(|r| r.lsn > trail_end) {
            let (record_type, flags) = r.kind()?;
            lsg.audit()
                .append_at(r.lsn, record_type, flags, &r.payload)?;
            reappended += 1;
        }
        lsg.audit().flush()?;
    }
    // The trail says it was in communication (seed 000) when its last record is not flagged or
    // is the return to normal (the last flagged record before unflagged ones).
    let in_communication = last_record.as_ref().is_none_or(|r| {
        !r.flags.contains(RecordFlags::OUT_OF_COMMUNICATION) || is_state_change_to_normal(r)
    });
    let warm = own_valid && in_communication;
    let volumes = volume_checkpoints(&lsg);
    let plan_over = |records: &[StreamRecord]| -> Result<RecoveryPlan, TakeoverError> {
        Ok(plan_recovery(
            trail_records(records)?,
            &volumes,
            config.messages,
        )?)
    };
    let (mut start_kind, mut records) = match (&own, warm) {
        (Some(own), true) => {
            let mut records: Vec<StreamRecord> = own
                .records
                .iter()
                .filter(|r| r.lsn <= trail_end)
                .cloned()
                .collect();
            // A same-node half a few records behind (they were on their way) takes them from
            // the trail: its copy was checked to be a prefix of it.
            if let Some(last) = own.last()
                && last < trail_end
            {
                for r in lsg.audit().reader(Lsn(last.0 + 1))? {
                    let r = r?;
                    if r.lsn > trail_end {
                        break;
                    }
                    records.push(StreamRecord {
                        lsn: r.lsn,
                        record_type: r.record_type as u8,
                        flags: r.flags.bits(),
                        payload: r.payload,
                    });
                }
            }
            if let Some(tail) = tail {
                records.extend(tail.records.iter().filter(|r| r.lsn > trail_end).cloned());
            }
            (StartKind::Warm, records)
        }
        _ => (StartKind::Cold, read_trail(&lsg)?),
    };
    let plan = match plan_over(&records) {
        Ok(plan) => plan,
        Err(e) if start_kind == StartKind::Warm => {
            // The copy does not reach back far enough (or disagrees): the trail is the truth.
            warn!(error = %e, "warm recovery refused the backup's copy; recovering from the trail");
            records = read_trail(&lsg)?;
            start_kind = StartKind::Cold;
            plan_over(&records)?
        }
        Err(e) => return Err(e),
    };
    let mut by_volume: BTreeMap<&str, Vec<RedoChange<'_>>> = BTreeMap::new();
    for redo in &plan.redo {
        by_volume.entry(&redo.volume).or_default().push((
            &redo.key,
            redo.value.as_deref(),
            redo.lsn,
        ));
    }
    let mut redone = 0;
    for (name, changes) in by_volume {
        redone += lsg.volume(name)?.apply_redo(changes)?;
    }
    let durable = Lsn(lsg.audit().next_lsn().0 - 1);
    let report = TakeoverReport {
        epoch,
        start: start_kind,
        trail_end,
        reappended,
        records_read: plan.records_read,
        redone,
        undone: plan.undo.len(),
        in_doubt: plan.in_doubt.len(),
    };
    let undo = plan.undo_records(epoch);
    let start = OwnerStart {
        state: CommitState::BackupOnly,
        retained: records,
        durable,
        table: plan.message_table,
        in_doubt: plan.in_doubt,
        last_checkpoint: plan.last_checkpoint.unwrap_or_default(),
        penultimate_checkpoint: plan.penultimate_checkpoint.unwrap_or_default(),
    };
    let mut owner = LsgOwner::new(config, lsg, start, now);
    owner.finish_recovery(now, undo)?;
    info!(
        epoch = %report.epoch,
        start = ?report.start,
        trail_end = %report.trail_end,
        reappended = report.reappended,
        redone = report.redone,
        undone = report.undone,
        in_doubt = report.in_doubt,
        "took the LSG over"
    );
    Ok((owner, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(from: u64, to: u64) -> Vec<StreamRecord> {
        (from..=to)
            .map(|lsn| StreamRecord {
                lsn: Lsn(lsn),
                record_type: RecordType::Update as u8,
                flags: 0,
                payload: vec![lsn as u8],
            })
            .collect()
    }

    #[test]
    fn only_complete_copies_count_and_parts_join_in_order() {
        let (a, b, c) = (
            EndpointId::new(1, 1),
            EndpointId::new(2, 0),
            EndpointId::new(2, 1),
        );
        let mut copies = Copies::new([a, b, c]);
        assert!(!copies.on_part(a, OwnerEpoch(3), &part(5, 6), false));
        assert!(copies.on_part(a, OwnerEpoch(3), &part(7, 8), true));
        assert!(!copies.on_part(b, OwnerEpoch(3), &part(5, 5), false));
        assert!(
            !copies.on_part(EndpointId::new(9, 9), OwnerEpoch(3), &part(1, 1), true),
            "a copy nobody asked for is ignored"
        );
        copies.give_up_on(c);
        // a went down after its copy was complete: the copy is here, it still counts.
        copies.give_up_on(a);
        assert!(!copies.all_in(), "b's copy is still arriving");
        let complete = copies.into_complete();
        assert_eq!(complete.len(), 1, "b's partial copy cannot vouch");
        let (from, chain) = &complete[0];
        assert_eq!(*from, a);
        let lsns: Vec<u64> = chain.records.iter().map(|r| r.lsn.0).collect();
        assert_eq!(lsns, vec![5, 6, 7, 8]);
    }
}
