//! Unit tests of `plan_recovery`: one per error, the start rule, and what the plan asks for on
//! small hand-written trails. The property test over generated histories is
//! `recovery_model.rs`.

use std::collections::BTreeMap;

use duplex_audit_pair::recovery::{
    ActiveMismatch, Outcome, RecoveryError, RecoveryPlan, Redo, TrailRecord, plan_recovery,
};
use duplex_lsg::{LsgId, Lsn, OwnerEpoch, RecordFlags};
use duplex_pair::{
    AbortReason, ActiveTx, AuditBody, Checkpoint, ClientId, CommitState, Compensation, Lookup,
    MessageEntry, MessageTableLimits, Prepare, Receipt, Reply, RequestKey, RequestSeq, StateChange,
    TxEnd, TxId, Update,
};

fn tx(n: u64) -> TxId {
    TxId {
        epoch: OwnerEpoch(1),
        number: n,
    }
}

fn request(seq: u64) -> RequestKey {
    RequestKey {
        client: ClientId(5),
        seq: RequestSeq(seq),
    }
}

fn end(n: u64, request: Option<RequestKey>) -> TxEnd {
    TxEnd {
        tx: tx(n),
        epoch: OwnerEpoch(1),
        request,
    }
}

/// A trail written record by record from LSN 1.
#[derive(Default)]
struct Trail {
    records: Vec<TrailRecord>,
}

impl Trail {
    fn push_flagged(&mut self, flags: RecordFlags, body: AuditBody) -> Lsn {
        let lsn = Lsn(self.records.len() as u64 + 1);
        self.records.push(TrailRecord { lsn, flags, body });
        lsn
    }

    fn push(&mut self, body: AuditBody) -> Lsn {
        self.push_flagged(RecordFlags::NONE, body)
    }

    /// `tx` sets `key` of volume `v` from `before` to `after`.
    fn update(&mut self, n: u64, key: &str, before: Option<&str>, after: Option<&str>) -> Lsn {
        self.push(AuditBody::Update(Update {
            tx: tx(n),
            volume: "v".into(),
            key: key.into(),
            before: before.map(Into::into),
            after: after.map(Into::into),
        }))
    }

    fn compensate(&mut self, n: u64, undoes: Lsn, key: &str, restore: Option<&str>) -> Lsn {
        self.push(AuditBody::Compensation(compensation(
            n, undoes, key, restore,
        )))
    }

    fn prepare(&mut self, n: u64, keys: &[&str]) -> Lsn {
        self.push(AuditBody::Prepare(Prepare {
            tx: tx(n),
            coordinator: LsgId(9),
            write_set: keys
                .iter()
                .map(|k| ("v".into(), k.as_bytes().to_vec()))
                .collect(),
        }))
    }

    fn checkpoint(&mut self, active: &[(u64, Lsn, bool)], previous: Lsn) -> Lsn {
        self.push(AuditBody::Checkpoint(Checkpoint {
            epoch: OwnerEpoch(1),
            active: active
                .iter()
                .map(|&(n, first_lsn, prepared)| ActiveTx {
                    tx: tx(n),
                    first_lsn,
                    prepared,
                })
                .collect(),
            messages: Vec::new(),
            message_lows: Vec::new(),
            previous,
        }))
    }

    fn from(&self, start: u64) -> Vec<TrailRecord> {
        self.records[start as usize - 1..].to_vec()
    }
}

fn compensation(n: u64, undoes: Lsn, key: &str, restore: Option<&str>) -> Compensation {
    Compensation {
        tx: tx(n),
        undoes,
        volume: "v".into(),
        key: key.into(),
        restore: restore.map(Into::into),
    }
}

fn volume_at(checkpoint: u64) -> BTreeMap<String, Lsn> {
    BTreeMap::from([("v".to_owned(), Lsn(checkpoint))])
}

fn plan(records: Vec<TrailRecord>, checkpoint: u64) -> Result<RecoveryPlan, RecoveryError> {
    plan_recovery(
        records,
        &volume_at(checkpoint),
        MessageTableLimits::default(),
    )
}

fn plan_err(trail: &Trail) -> RecoveryError {
    plan(trail.from(1), 0).expect_err("the trail must be refused")
}

// What a plan says.

#[test]
fn a_loser_is_undone_newest_first_skipping_what_an_earlier_undo_compensated() {
    let mut t = Trail::default();
    let u1 = t.update(1, "a", None, Some("1"));
    let u2 = t.update(1, "b", Some("x"), Some("2"));
    let u3 = t.update(1, "a", Some("1"), Some("3"));
    // An earlier recovery undid u3 and crashed.
    t.compensate(1, u3, "a", Some("1"));
    let p = plan(t.from(1), 0).expect("plan");
    assert_eq!(p.undo.len(), 1);
    assert_eq!(p.undo[0].tx, tx(1));
    assert_eq!(p.undo[0].first_lsn, u1);
    assert_eq!(
        p.undo[0].compensations,
        vec![
            compensation(1, u2, "b", Some("x")),
            compensation(1, u1, "a", None)
        ]
    );
    let records = p.undo_records(OwnerEpoch(2));
    assert_eq!(records.len(), 3);
    assert_eq!(
        records[2],
        AuditBody::Abort(
            TxEnd {
                tx: tx(1),
                epoch: OwnerEpoch(2),
                request: None
            },
            AbortReason::Recovery
        )
    );
}

#[test]
fn a_loser_without_updates_still_gets_its_abort_record() {
    let mut t = Trail::default();
    let u = t.update(1, "a", None, Some("1"));
    t.compensate(1, u, "a", None);
    let p = plan(t.from(1), 0).expect("plan");
    assert!(p.undo[0].compensations.is_empty());
    assert!(matches!(
        p.undo_records(OwnerEpoch(2)).as_slice(),
        [AuditBody::Abort(_, AbortReason::Recovery)]
    ));
}

#[test]
fn redo_lists_changes_after_each_volume_checkpoint_in_lsn_order() {
    let mut t = Trail::default();
    t.update(1, "a", None, Some("1"));
    t.push(AuditBody::Commit(end(1, None)));
    let u = t.update(2, "a", Some("1"), Some("2"));
    let c = t.compensate(2, u, "a", Some("1"));
    t.push(AuditBody::Abort(end(2, None), AbortReason::Requested));
    let p = plan(t.from(1), 2).expect("plan");
    let redo = |value: &str, lsn| Redo {
        volume: "v".into(),
        key: b"a".to_vec(),
        value: Some(value.into()),
        lsn,
    };
    assert_eq!(p.redo, vec![redo("2", u), redo("1", c)]);
    assert!(p.undo.is_empty() && p.in_doubt.is_empty());
    assert_eq!(p.max_tx, Some(tx(2)));
    assert_eq!(p.last_lsn, Some(Lsn(5)));
    assert_eq!(p.records_read, 5);
}

#[test]
fn an_in_doubt_transaction_is_kept_with_its_write_set_and_resolves_either_way() {
    let mut t = Trail::default();
    let u = t.update(1, "a", Some("0"), Some("1"));
    let prepare = t.prepare(1, &["a"]);
    let p = plan(t.from(1), 0).expect("plan");
    assert!(p.undo.is_empty());
    let d = &p.in_doubt[0];
    assert_eq!((d.tx, d.first_lsn, d.prepare_lsn), (tx(1), u, prepare));
    assert_eq!(d.coordinator, LsgId(9));
    assert_eq!(d.write_set, vec![("v".to_owned(), b"a".to_vec())]);
    assert_eq!(
        d.resolve(Outcome::Commit, OwnerEpoch(2)),
        vec![AuditBody::Commit(TxEnd {
            tx: tx(1),
            epoch: OwnerEpoch(2),
            request: None
        })]
    );
    let abort = d.resolve(Outcome::Abort, OwnerEpoch(2));
    assert_eq!(
        abort[0],
        AuditBody::Compensation(compensation(1, u, "a", Some("0")))
    );
    assert!(matches!(abort[1], AuditBody::Abort(..)));
}

#[test]
fn a_prepared_transaction_with_a_compensation_after_its_prepare_is_a_loser() {
    let mut t = Trail::default();
    let u1 = t.update(1, "a", None, Some("1"));
    let u2 = t.update(1, "b", None, Some("2"));
    t.prepare(1, &["a", "b"]);
    // The coordinator decided abort; the owner crashed half way through the undo.
    t.compensate(1, u2, "b", None);
    let p = plan(t.from(1), 0).expect("plan");
    assert!(p.in_doubt.is_empty());
    assert_eq!(
        p.undo[0].compensations,
        vec![compensation(1, u1, "a", None)]
    );
}

#[test]
fn the_message_table_is_the_last_checkpoints_plus_every_reply_after_it() {
    let mut t = Trail::default();
    let out = RecordFlags::OUT_OF_COMMUNICATION;
    let entry = |seq, reply| MessageEntry {
        request: request(seq),
        reply,
    };
    let deadlock = Reply::Aborted(AbortReason::Deadlock);
    let mut checkpoint = Checkpoint {
        epoch: OwnerEpoch(1),
        active: Vec::new(),
        messages: vec![entry(1, deadlock)],
        message_lows: Vec::new(),
        previous: Lsn(0),
    };
    let first = t.push(AuditBody::Checkpoint(checkpoint.clone()));
    t.push_flagged(
        out,
        AuditBody::StateChange(StateChange {
            epoch: OwnerEpoch(1),
            state: CommitState::BackupOnly,
            home_backup: None,
        }),
    );
    let commit = t.push_flagged(out, AuditBody::Commit(end(1, Some(request(2)))));
    let backup_only = Reply::Committed(Receipt {
        commit_lsn: commit,
        epoch: OwnerEpoch(1),
        state: CommitState::BackupOnly,
    });
    // Read up to here, the reply comes from the commit record and the state change before it.
    let p = plan(t.from(1), 0).expect("plan");
    assert_eq!(p.message_table.lookup(request(1)), Lookup::Done(deadlock));
    assert_eq!(
        p.message_table.lookup(request(2)),
        Lookup::Done(backup_only)
    );

    // Past a checkpoint carrying it, the reply comes from the checkpoint.
    checkpoint.messages.push(entry(2, backup_only));
    checkpoint.previous = first;
    let last = t.push(AuditBody::Checkpoint(checkpoint));
    let normal = t.push(AuditBody::Commit(end(2, Some(request(3)))));
    let p = plan(t.from(first.0), 0).expect("plan");
    assert_eq!(p.last_checkpoint, Some(last));
    assert_eq!(p.penultimate_checkpoint, Some(first));
    assert_eq!(p.last_state.map(|s| s.state), Some(CommitState::BackupOnly));
    assert_eq!(
        p.message_table.lookup(request(2)),
        Lookup::Done(backup_only)
    );
    assert_eq!(
        p.message_table.lookup(request(3)),
        Lookup::Done(Reply::Committed(Receipt {
            commit_lsn: normal,
            epoch: OwnerEpoch(1),
            state: CommitState::Normal
        }))
    );
    assert_eq!(p.message_table.lookup(request(4)), Lookup::New);
}

// The start rule.

/// Transaction 1 begins at LSN 1 and is active at the checkpoint at LSN 3; transaction 2 begins
/// after it. Volume checkpoint 2.
fn spanning_trail(end_tx1: bool) -> Trail {
    let mut t = Trail::default();
    t.update(1, "a", None, Some("1"));
    t.update(2, "b", None, Some("2"));
    t.checkpoint(&[(1, Lsn(1), false), (2, Lsn(2), false)], Lsn(0));
    t.update(1, "c", None, Some("3"));
    if end_tx1 {
        t.push(AuditBody::Commit(end(1, None)));
    }
    t
}

#[test]
fn reading_from_a_losers_first_record_undoes_all_of_it() {
    let t = spanning_trail(false);
    let p = plan(t.from(1), 2).expect("plan");
    assert_eq!(p.undo[0].compensations.len(), 2);
    assert_eq!(p.undo[0].first_lsn, Lsn(1));
}

#[test]
fn reading_from_after_a_losers_first_record_is_refused() {
    let t = spanning_trail(false);
    assert_eq!(
        plan(t.from(2), 2),
        Err(RecoveryError::StartsAfterFirstRecord {
            tx: tx(1),
            first_lsn: Lsn(1),
            start: Lsn(2)
        })
    );
}

#[test]
fn reading_from_after_the_first_record_of_a_transaction_that_ended_is_accepted() {
    let t = spanning_trail(true);
    let p = plan(t.from(2), 2).expect("plan");
    assert_eq!(p.undo.len(), 1);
    assert_eq!(p.undo[0].tx, tx(2));
    // The update before the start is in the volume (checkpoint 2); the rest is redone.
    let redone: Vec<Lsn> = p.redo.iter().map(|r| r.lsn).collect();
    assert_eq!(redone, vec![Lsn(4)]);
}

#[test]
fn reading_from_after_an_in_doubt_transactions_first_record_is_refused() {
    let mut t = Trail::default();
    t.update(1, "a", None, Some("1"));
    t.prepare(1, &["a"]);
    t.checkpoint(&[(1, Lsn(1), true)], Lsn(0));
    assert!(plan(t.from(1), 2).is_ok());
    assert_eq!(
        plan(t.from(2), 2),
        Err(RecoveryError::StartsAfterFirstRecord {
            tx: tx(1),
            first_lsn: Lsn(1),
            start: Lsn(2)
        })
    );
}

#[test]
fn reading_from_after_a_volume_checkpoint_is_refused() {
    let t = spanning_trail(true);
    assert_eq!(
        plan(t.from(3), 1),
        Err(RecoveryError::StartsAfterVolumeCheckpoint {
            volume: "v".into(),
            checkpoint: Lsn(1),
            start: Lsn(3)
        })
    );
}

#[test]
fn reading_from_after_lsn_1_without_a_checkpoint_is_refused() {
    let mut t = Trail::default();
    t.update(1, "a", None, Some("1"));
    t.push(AuditBody::Commit(end(1, None)));
    assert_eq!(
        plan(t.from(2), 1),
        Err(RecoveryError::NoCheckpoint { start: Lsn(2) })
    );
}

#[test]
fn a_volume_checkpoint_past_the_trail_read_is_refused() {
    let t = spanning_trail(true);
    assert_eq!(
        plan(t.from(1), 9),
        Err(RecoveryError::VolumeCheckpointBeyondEnd {
            volume: "v".into(),
            checkpoint: Lsn(9),
            last: Lsn(5)
        })
    );
}

#[test]
fn an_empty_trail_plans_nothing() {
    let p = plan(Vec::new(), 0).expect("plan");
    assert!(p.redo.is_empty() && p.undo.is_empty() && p.in_doubt.is_empty());
    assert_eq!((p.last_lsn, p.records_read), (None, 0));
}

// Errors in the trail.

#[test]
fn a_gap_in_lsns_is_refused() {
    let t = spanning_trail(true);
    let mut records = t.from(1);
    records.remove(2);
    assert_eq!(
        plan(records, 0),
        Err(RecoveryError::LsnOutOfSequence {
            expected: Lsn(3),
            found: Lsn(4)
        })
    );
}

#[test]
fn lsn_0_is_refused() {
    let mut t = Trail::default();
    t.update(1, "a", None, Some("1"));
    let mut records = t.from(1);
    records[0].lsn = Lsn(0);
    assert_eq!(
        plan(records, 0),
        Err(RecoveryError::LsnOutOfSequence {
            expected: Lsn(1),
            found: Lsn(0)
        })
    );
}

#[test]
fn an_update_of_an_unknown_volume_is_refused() {
    let mut t = Trail::default();
    t.update(1, "a", None, Some("1"));
    let err = plan_recovery(
        t.from(1),
        &BTreeMap::from([("w".to_owned(), Lsn(0))]),
        MessageTableLimits::default(),
    );
    assert_eq!(
        err,
        Err(RecoveryError::UnknownVolume {
            lsn: Lsn(1),
            volume: "v".into()
        })
    );
}

#[test]
fn a_record_of_a_transaction_that_ended_is_refused() {
    let mut t = Trail::default();
    t.update(1, "a", None, Some("1"));
    let commit = t.push(AuditBody::Commit(end(1, None)));
    t.update(1, "b", None, Some("1"));
    assert_eq!(
        plan_err(&t),
        RecoveryError::TxAlreadyEnded {
            lsn: Lsn(3),
            tx: tx(1),
            ended: commit
        }
    );
    t.records.pop();
    t.push(AuditBody::Abort(end(1, None), AbortReason::Requested));
    assert!(matches!(
        plan_err(&t),
        RecoveryError::TxAlreadyEnded { lsn: Lsn(3), .. }
    ));
}

#[test]
fn an_update_or_second_prepare_after_a_prepare_is_refused() {
    let mut t = Trail::default();
    t.update(1, "a", None, Some("1"));
    t.prepare(1, &["a"]);
    t.update(1, "b", None, Some("1"));
    assert_eq!(
        plan_err(&t),
        RecoveryError::AfterPrepare {
            lsn: Lsn(3),
            tx: tx(1)
        }
    );
    t.records.pop();
    t.prepare(1, &["a"]);
    assert_eq!(
        plan_err(&t),
        RecoveryError::AfterPrepare {
            lsn: Lsn(3),
            tx: tx(1)
        }
    );
}

#[test]
fn a_compensation_that_matches_no_update_is_refused() {
    let mismatch = |undoes| RecoveryError::CompensationMismatch {
        lsn: Lsn(2),
        tx: tx(1),
        undoes,
    };
    for (undoes, key, restore) in [
        (Lsn(1), "a", Some("wrong")),
        (Lsn(1), "b", None),
        (Lsn(7), "a", None),
    ] {
        let mut t = Trail::default();
        t.update(1, "a", None, Some("1"));
        t.compensate(1, undoes, key, restore);
        assert_eq!(plan_err(&t), mismatch(undoes));
    }
    // Another transaction's update.
    let mut t = Trail::default();
    t.update(2, "a", None, Some("1"));
    t.compensate(1, Lsn(1), "a", None);
    assert_eq!(plan_err(&t), mismatch(Lsn(1)));
}

#[test]
fn a_second_compensation_of_one_update_is_refused() {
    let mut t = Trail::default();
    let u = t.update(1, "a", None, Some("1"));
    let first = t.compensate(1, u, "a", None);
    t.compensate(1, u, "a", None);
    assert_eq!(
        plan_err(&t),
        RecoveryError::CompensatedTwice {
            lsn: Lsn(3),
            tx: tx(1),
            undoes: u,
            first
        }
    );
}

#[test]
fn an_abort_with_an_update_not_compensated_is_refused() {
    let mut t = Trail::default();
    let u1 = t.update(1, "a", None, Some("1"));
    let u2 = t.update(1, "b", None, Some("1"));
    t.compensate(1, u2, "b", None);
    t.push(AuditBody::Abort(end(1, None), AbortReason::Requested));
    assert_eq!(
        plan_err(&t),
        RecoveryError::UncompensatedAbort {
            lsn: Lsn(4),
            tx: tx(1),
            update: u1
        }
    );
}

#[test]
fn an_in_doubt_write_set_lacking_an_updated_key_is_refused() {
    let mut t = Trail::default();
    t.update(1, "a", None, Some("1"));
    t.update(1, "b", None, Some("1"));
    let prepare = t.prepare(1, &["a"]);
    assert_eq!(
        plan_err(&t),
        RecoveryError::WriteSetIncomplete {
            lsn: prepare,
            tx: tx(1),
            volume: "v".into(),
            key: b"b".to_vec()
        }
    );
}

#[test]
fn a_checkpoint_that_disagrees_with_the_records_before_it_is_refused() {
    let disagrees = |n, mismatch| RecoveryError::CheckpointDisagrees {
        lsn: Lsn(3),
        tx: tx(n),
        mismatch,
    };
    let trail = |active: &[(u64, Lsn, bool)]| {
        let mut t = Trail::default();
        t.update(1, "a", None, Some("1"));
        t.prepare(1, &["a"]);
        t.checkpoint(active, Lsn(0));
        t
    };
    assert_eq!(
        plan_err(&trail(&[])),
        disagrees(1, ActiveMismatch::NotListed)
    );
    assert_eq!(
        plan_err(&trail(&[(1, Lsn(1), true), (2, Lsn(2), false)])),
        disagrees(2, ActiveMismatch::NotLive)
    );
    assert_eq!(
        plan_err(&trail(&[(1, Lsn(2), true)])),
        disagrees(
            1,
            ActiveMismatch::FirstLsn {
                listed: Lsn(2),
                read: Lsn(1)
            }
        )
    );
    assert_eq!(
        plan_err(&trail(&[(1, Lsn(1), false)])),
        disagrees(
            1,
            ActiveMismatch::Prepared {
                listed: false,
                read: true
            }
        )
    );
}

#[test]
fn a_checkpoint_naming_the_wrong_previous_checkpoint_is_refused() {
    let mut t = Trail::default();
    t.checkpoint(&[], Lsn(0));
    t.checkpoint(&[], Lsn(0));
    assert_eq!(
        plan_err(&t),
        RecoveryError::CheckpointChainBroken {
            lsn: Lsn(2),
            previous: Lsn(0),
            expected: Lsn(1)
        }
    );
    let mut t = Trail::default();
    t.checkpoint(&[], Lsn(5));
    assert!(matches!(
        plan_err(&t),
        RecoveryError::CheckpointChainBroken { lsn: Lsn(1), .. }
    ));
}

#[test]
fn errors_name_the_lsn() {
    let mut t = Trail::default();
    t.update(1, "a", None, Some("1"));
    t.push(AuditBody::Commit(end(1, None)));
    t.update(1, "b", None, Some("1"));
    assert_eq!(
        plan_err(&t).to_string(),
        "audit record 3: transaction 1.1 already ended at LSN 2"
    );
}

#[test]
fn lsns_and_checkpoints_at_the_top_of_the_range_are_errors_not_overflows() {
    let mut t = Trail::default();
    t.update(1, "a", None, Some("1"));
    t.update(1, "b", None, Some("1"));
    let mut records = t.from(1);
    records[0].lsn = Lsn(u64::MAX - 1);
    records[1].lsn = Lsn(u64::MAX);
    assert!(matches!(
        plan(records.clone(), u64::MAX),
        Err(RecoveryError::NoCheckpoint { .. })
    ));
    // Nothing can follow LSN u64::MAX, not even a second record claiming it.
    let mut third = records[1].clone();
    records.push(third.clone());
    assert!(matches!(
        plan(records.clone(), u64::MAX),
        Err(RecoveryError::LsnOutOfSequence {
            found: Lsn(u64::MAX),
            ..
        })
    ));
    third.lsn = Lsn(0);
    records.pop();
    records.push(third);
    assert!(matches!(
        plan(records, u64::MAX),
        Err(RecoveryError::LsnOutOfSequence { found: Lsn(0), .. })
    ));
}
