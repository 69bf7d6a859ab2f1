//! The audit records the pairs write, one struct per record type. The lsg frame (`duplex_lsg::
//! record`) carries LSN, type, flags and checksum; the payload is the postcard encoding of the
//! struct named by the type. `docs/storage-format.md` ("Audit record schemas") is the reference.
//!
//! Bytes read back become an [`AuditBody`] only through [`AuditBody::decode`], which checks the
//! type, the whole payload and the limits, and names the LSN in its error.

use duplex_lsg::{Lsn, OwnerEpoch, RecordType};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::{AbortReason, ClientId, CommitState, RequestKey, RequestSeq, TxId};
use crate::message_table::MessageEntry;

/// One change to a data volume, with what it replaced, so it can be redone and undone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    pub tx: TxId,
    pub volume: String,
    pub key: Vec<u8>,
    /// The value before the change; `None`: the key was absent.
    pub before: Option<Vec<u8>>,
    /// The value after the change; `None`: the change deletes the key.
    pub after: Option<Vec<u8>>,
}

/// Undoes one update of a transaction that ends aborted: written at a new LSN, redone like an
/// update, never undone itself. `undoes` names the update, so undo that a crash interrupted
/// resumes without undoing anything twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compensation {
    pub tx: TxId,
    pub undoes: Lsn,
    pub volume: String,
    pub key: Vec<u8>,
    /// The value put back (the update's before image).
    pub restore: Option<Vec<u8>>,
}

/// How a transaction ended: commit and abort records share this shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxEnd {
    pub tx: TxId,
    /// The epoch of the owner that wrote the record (a commit's receipt names it).
    pub epoch: OwnerEpoch,
    /// The client request this record answers, entered in the message table with the reply.
    pub request: Option<RequestKey>,
}

/// A commit record: the transaction's changes are final.
pub type Commit = TxEnd;

/// A transaction prepared by two-phase commit: its outcome is the coordinator's. Carries the
/// write set so recovery can take the locks again and keep them until the outcome is known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepare {
    pub tx: TxId,
    /// The LSG whose audit trail logs the decision.
    pub coordinator: duplex_lsg::LsgId,
    /// Every (volume, key) the transaction wrote.
    pub write_set: Vec<(String, Vec<u8>)>,
}

/// A transaction active when a checkpoint was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveTx {
    pub tx: TxId,
    /// Its first record: recovery must read from here to undo it.
    pub first_lsn: Lsn,
    pub prepared: bool,
}

/// A fuzzy checkpoint: taken while transactions run. Every volume was flushed up to the
/// previous checkpoint before this one was written, so redo never starts before the
/// penultimate checkpoint; the message table rides along so truncating the trail loses no
/// reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub epoch: OwnerEpoch,
    pub active: Vec<ActiveTx>,
    pub messages: Vec<MessageEntry>,
    /// Each client's low mark: its requests below it are forgotten.
    pub message_lows: Vec<(ClientId, RequestSeq)>,
    /// The LSN of the checkpoint before this one (`Lsn(0)`: none).
    pub previous: Lsn,
}

/// The commit state changed, or which backups count for acknowledgements. Written and flushed
/// before a commit is acknowledged under the new rule, so a backup that takes over can tell from
/// the trail whether its memory is complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    pub epoch: OwnerEpoch,
    pub state: CommitState,
    /// The incarnation of the same-node backup half whose acknowledgement counts, if any.
    pub home_backup: Option<u64>,
}

/// Every audit record a pair writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditBody {
    Update(Update),
    Compensation(Compensation),
    Commit(Commit),
    Abort(TxEnd, AbortReason),
    Prepare(Prepare),
    Checkpoint(Checkpoint),
    StateChange(StateChange),
}

#[derive(Debug, Serialize, Deserialize)]
struct AbortPayload {
    end: TxEnd,
    reason: AbortReason,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("audit record {lsn}: type {record_type:?} is not a pair record")]
    NotAPairRecord { lsn: Lsn, record_type: RecordType },
    #[error("audit record {lsn} ({record_type:?}): payload does not decode: {reason}")]
    Malformed {
        lsn: Lsn,
        record_type: RecordType,
        reason: String,
    },
    #[error("audit record {lsn} ({record_type:?}): {trailing} bytes after the end of its payload")]
    TrailingBytes {
        lsn: Lsn,
        record_type: RecordType,
        trailing: usize,
    },
    #[error("audit record of {size_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    TooLarge {
        size_bytes: usize,
        limit_bytes: usize,
    },
}

impl AuditBody {
    pub fn record_type(&self) -> RecordType {
        match self {
            AuditBody::Update(_) => RecordType::Update,
            AuditBody::Compensation(_) => RecordType::Compensation,
            AuditBody::Commit(_) => RecordType::Commit,
            AuditBody::Abort(..) => RecordType::Abort,
            AuditBody::Prepare(_) => RecordType::Prepare,
            AuditBody::Checkpoint(_) => RecordType::Checkpoint,
            AuditBody::StateChange(_) => RecordType::StateChange,
        }
    }

    /// The transaction the record belongs to, if it belongs to one.
    pub fn tx(&self) -> Option<TxId> {
        match self {
            AuditBody::Update(u) => Some(u.tx),
            AuditBody::Compensation(c) => Some(c.tx),
            AuditBody::Commit(e) | AuditBody::Abort(e, _) => Some(e.tx),
            AuditBody::Prepare(p) => Some(p.tx),
            AuditBody::Checkpoint(_) | AuditBody::StateChange(_) => None,
        }
    }

    /// The payload bytes, refused above `limit_bytes` (the LSG's `max_record_bytes`).
    pub fn encode(&self, limit_bytes: usize) -> Result<Vec<u8>, RecordError> {
        let bytes = match self {
            AuditBody::Update(u) => postcard::to_stdvec(u),
            AuditBody::Compensation(c) => postcard::to_stdvec(c),
            AuditBody::Commit(e) => postcard::to_stdvec(e),
            AuditBody::Abort(end, reason) => postcard::to_stdvec(&AbortPayload {
                end: end.clone(),
                reason: *reason,
            }),
            AuditBody::Prepare(p) => postcard::to_stdvec(p),
            AuditBody::Checkpoint(c) => postcard::to_stdvec(c),
            AuditBody::StateChange(s) => postcard::to_stdvec(s),
        }
        .map_err(|e| RecordError::Malformed {
            lsn: Lsn(0),
            record_type: self.record_type(),
            reason: e.to_string(),
        })?;
        if bytes.len() > limit_bytes {
            return Err(RecordError::TooLarge {
                size_bytes: bytes.len(),
                limit_bytes,
            });
        }
        Ok(bytes)
    }

    /// Checks and decodes the payload of the record at `lsn`.
    pub fn decode(lsn: Lsn, record_type: RecordType, payload: &[u8]) -> Result<Self, RecordError> {
        fn take<'a, T: Deserialize<'a>>(
            lsn: Lsn,
            record_type: RecordType,
            payload: &'a [u8],
        ) -> Result<T, RecordError> {
            let (value, rest) =
                postcard::take_from_bytes(payload).map_err(|e| RecordError::Malformed {
                    lsn,
                    record_type,
                    reason: e.to_string(),
                })?;
            if !rest.is_empty() {
                return Err(RecordError::TrailingBytes {
                    lsn,
                    record_type,
                    trailing: rest.len(),
                });
            }
            Ok(value)
        }
        Ok(match record_type {
            RecordType::Update => AuditBody::Update(take(lsn, record_type, payload)?),
            RecordType::Compensation => AuditBody::Compensation(take(lsn, record_type, payload)?),
            RecordType::Commit => AuditBody::Commit(take(lsn, record_type, payload)?),
            RecordType::Abort => {
                let p: AbortPayload = take(lsn, record_type, payload)?;
                AuditBody::Abort(p.end, p.reason)
            }
            RecordType::Prepare => AuditBody::Prepare(take(lsn, record_type, payload)?),
            RecordType::Checkpoint => AuditBody::Checkpoint(take(lsn, record_type, payload)?),
            RecordType::StateChange => AuditBody::StateChange(take(lsn, record_type, payload)?),
            RecordType::VolumePut | RecordType::VolumeDelete | RecordType::SegmentEnd => {
                return Err(RecordError::NotAPairRecord { lsn, record_type });
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Reply;
    use duplex_lsg::LsgId;
    use proptest::prelude::*;

    fn tx(n: u64) -> TxId {
        TxId {
            epoch: OwnerEpoch(3),
            number: n,
        }
    }

    fn samples() -> Vec<AuditBody> {
        let request = Some(RequestKey {
            client: ClientId(7),
            seq: RequestSeq(9),
        });
        vec![
            AuditBody::Update(Update {
                tx: tx(1),
                volume: "accounts".into(),
                key: b"k".to_vec(),
                before: None,
                after: Some(b"v".to_vec()),
            }),
            AuditBody::Compensation(Compensation {
                tx: tx(1),
                undoes: Lsn(4),
                volume: "accounts".into(),
                key: b"k".to_vec(),
                restore: None,
            }),
            AuditBody::Commit(TxEnd {
                tx: tx(2),
                epoch: OwnerEpoch(3),
                request,
            }),
            AuditBody::Abort(
                TxEnd {
                    tx: tx(3),
                    epoch: OwnerEpoch(3),
                    request: None,
                },
                AbortReason::Deadlock,
            ),
            AuditBody::Prepare(Prepare {
                tx: tx(4),
                coordinator: LsgId(2),
                write_set: vec![("accounts".into(), b"a".to_vec())],
            }),
            AuditBody::Checkpoint(Checkpoint {
                epoch: OwnerEpoch(3),
                active: vec![ActiveTx {
                    tx: tx(5),
                    first_lsn: Lsn(2),
                    prepared: false,
                }],
                messages: vec![MessageEntry {
                    request: RequestKey {
                        client: ClientId(1),
                        seq: RequestSeq(1),
                    },
                    reply: Reply::Aborted(AbortReason::Requested),
                }],
                message_lows: vec![(ClientId(1), RequestSeq(1))],
                previous: Lsn(1),
            }),
            AuditBody::StateChange(StateChange {
                epoch: OwnerEpoch(3),
                state: CommitState::PrimaryOnly,
                home_backup: Some(11),
            }),
        ]
    }

    #[test]
    fn every_record_type_reads_back_as_written() {
        for (i, body) in samples().into_iter().enumerate() {
            let lsn = Lsn(i as u64 + 1);
            let bytes = body.encode(1 << 20).expect("encodes");
            let back = AuditBody::decode(lsn, body.record_type(), &bytes).expect("decodes");
            assert_eq!(back, body);
        }
    }

    #[test]
    fn a_payload_with_trailing_bytes_is_refused_naming_its_lsn() {
        let body = &samples()[2];
        let mut bytes = body.encode(1 << 20).expect("encodes");
        bytes.push(0);
        let err = AuditBody::decode(Lsn(42), body.record_type(), &bytes).expect_err("refused");
        assert_eq!(
            err,
            RecordError::TrailingBytes {
                lsn: Lsn(42),
                record_type: RecordType::Commit,
                trailing: 1
            }
        );
        assert!(err.to_string().contains("audit record 42"));
    }

    #[test]
    fn volume_record_types_are_not_pair_records() {
        let err = AuditBody::decode(Lsn(1), RecordType::VolumePut, &[]).expect_err("refused");
        assert!(matches!(err, RecordError::NotAPairRecord { .. }));
    }

    #[test]
    fn a_record_over_the_limit_is_refused_before_it_is_written() {
        let body = AuditBody::Update(Update {
            tx: tx(1),
            volume: "v".into(),
            key: vec![1; 10],
            before: None,
            after: Some(vec![0; 100]),
        });
        assert!(matches!(
            body.encode(64),
            Err(RecordError::TooLarge {
                limit_bytes: 64,
                ..
            })
        ));
    }

    proptest! {
        #[test]
        fn garbage_payloads_never_panic(ty in 1u8..8, bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let record_type = RecordType::try_from(ty).expect("pair types 1..8");
            let _ = AuditBody::decode(Lsn(1), record_type, &bytes);
        }

        #[test]
        fn truncated_payloads_are_refused(cut in 0usize..1000, which in 0usize..7) {
            let body = samples().swap_remove(which);
            let bytes = body.encode(1 << 20).expect("encodes");
            let cut = cut % bytes.len();
            prop_assert!(AuditBody::decode(Lsn(1), body.record_type(), &bytes[..cut]).is_err());
        }
    }
}
