//! The checkpoint stream: how a primary keeps its backups in sync (seed 002's logical
//! checkpoints, in LSN order).
//!
//! One stream per LSG goes from the primary to each backup: the same-node backup half and the
//! backup node's pairs. It carries the audit records themselves, in LSN order: a backup that
//! holds records 1..=n holds everything the primary's memory held up to n (the updates, the ends
//! of transactions, the message-table entries in them). A backup acknowledges how far it holds
//! the stream; the primary counts acknowledgements to decide when a commit may be acknowledged.
//!
//! Every message carries a [`PairTag`]: the LSG, the sender's owner epoch and its incarnation.
//! A receiver refuses anything from an epoch below the highest it has seen for the LSG, so a
//! fenced primary that wakes up can neither feed a backup nor be acknowledged by one.

use duplex_lsg::{LsgId, Lsn, OwnerEpoch, RecordFlags, RecordType};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Who sent a pair message, in which epoch, from which process incarnation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PairTag {
    pub lsg: LsgId,
    pub epoch: OwnerEpoch,
    pub incarnation: u64,
}

/// One audit record as the stream carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamRecord {
    pub lsn: Lsn,
    pub record_type: u8,
    pub flags: u8,
    pub payload: Vec<u8>,
}

impl StreamRecord {
    /// The record's type and flags, checked.
    pub fn kind(&self) -> Result<(RecordType, RecordFlags), StreamError> {
        let record_type =
            RecordType::try_from(self.record_type).map_err(|_| StreamError::Malformed {
                reason: format!("record {} has unknown type {}", self.lsn, self.record_type),
            })?;
        let flags = if self.flags == 0 {
            RecordFlags::NONE
        } else if self.flags == RecordFlags::OUT_OF_COMMUNICATION.bits() {
            RecordFlags::OUT_OF_COMMUNICATION
        } else {
            return Err(StreamError::Malformed {
                reason: format!("record {} has unknown flags {:#x}", self.lsn, self.flags),
            });
        };
        Ok((record_type, flags))
    }

    /// Bytes this record takes in a message, roughly: for splitting batches under a frame.
    pub fn size_bytes(&self) -> usize {
        self.payload.len() + 24
    }
}

/// Messages between an LSG's primary and its backups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PairMessage {
    /// Primary → backup: records `records[0].lsn ..`, dense and in order. `retain_from` is the
    /// oldest record recovery may still need (the truncation horizon): the backup drops older
    /// ones.
    Records {
        tag: PairTag,
        records: Vec<StreamRecord>,
        retain_from: Lsn,
    },
    /// Backup → primary: "I hold every record up to `held`". The tag names the backup's
    /// incarnation, so the primary never counts an acknowledgement of a restarted backup's
    /// previous life, and the epoch of the stream it holds.
    Ack { tag: PairTag, held: Lsn },
    /// Backup → primary: "I am here and hold every record up to `held` of the stream of epoch
    /// `tag.epoch`; send me the rest".
    Join { tag: PairTag, held: Lsn },
    /// Primary → backup: the stream restarts at `from` (a joining backup or one that saw a
    /// gap). The backup drops anything it holds at or after `from` and takes what follows.
    Resync { tag: PairTag, from: Lsn },
    /// New primary → other backups after a takeover: "the epoch is now `tag.epoch`; refuse
    /// older ones and send me every record you hold from `from` on".
    Fence { tag: PairTag, from: Lsn },
    /// Answer to `Fence`: the records held from the requested LSN on, in order, in as many
    /// messages as the frame size needs; the last says `complete`.
    FenceAck {
        tag: PairTag,
        records: Vec<StreamRecord>,
        complete: bool,
    },
}

impl PairMessage {
    pub fn tag(&self) -> PairTag {
        match self {
            PairMessage::Records { tag, .. }
            | PairMessage::Ack { tag, .. }
            | PairMessage::Join { tag, .. }
            | PairMessage::Resync { tag, .. }
            | PairMessage::Fence { tag, .. }
            | PairMessage::FenceAck { tag, .. } => *tag,
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, StreamError> {
        postcard::to_stdvec(self).map_err(|e| StreamError::Malformed {
            reason: e.to_string(),
        })
    }

    /// Checks and decodes a message from the network: whole, records dense and in order.
    pub fn decode(bytes: &[u8]) -> Result<Self, StreamError> {
        let (message, rest): (PairMessage, _) =
            postcard::take_from_bytes(bytes).map_err(|e| StreamError::Malformed {
                reason: e.to_string(),
            })?;
        if !rest.is_empty() {
            return Err(StreamError::Malformed {
                reason: format!("{} bytes after the message", rest.len()),
            });
        }
        if let PairMessage::Records { records, .. } | PairMessage::FenceAck { records, .. } =
            &message
        {
            for pair in records.windows(2) {
                if pair[1].lsn.0 != pair[0].lsn.0 + 1 {
                    return Err(StreamError::Malformed {
                        reason: format!(
                            "record {} follows record {} in one message",
                            pair[1].lsn, pair[0].lsn
                        ),
                    });
                }
            }
            for r in records {
                r.kind()?;
            }
        }
        Ok(message)
    }
}

/// Splits records into batches of at most `max_bytes` each (a single larger record travels
/// alone), so a checkpoint larger than one frame goes as several messages in order.
pub fn batches(records: &[StreamRecord], max_bytes: usize) -> Vec<&[StreamRecord]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for (i, r) in records.iter().enumerate() {
        if i > start && size + r.size_bytes() > max_bytes {
            out.push(&records[start..i]);
            start = i;
            size = 0;
        }
        size += r.size_bytes();
    }
    if start < records.len() {
        out.push(&records[start..]);
    }
    out
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StreamError {
    #[error("malformed pair message: {reason}")]
    Malformed { reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tag() -> PairTag {
        PairTag {
            lsg: LsgId(1),
            epoch: OwnerEpoch(2),
            incarnation: 3,
        }
    }

    fn record(lsn: u64, len: usize) -> StreamRecord {
        StreamRecord {
            lsn: Lsn(lsn),
            record_type: RecordType::Update as u8,
            flags: 0,
            payload: vec![7; len],
        }
    }

    #[test]
    fn records_out_of_order_in_one_message_are_refused() {
        let m = PairMessage::Records {
            tag: tag(),
            records: vec![record(1, 1), record(3, 1)],
            retain_from: Lsn(0),
        };
        let bytes = m.encode().expect("encodes");
        let err = PairMessage::decode(&bytes).expect_err("refused");
        assert!(
            err.to_string().contains("record 3 follows record 1"),
            "{err}"
        );
    }

    #[test]
    fn a_message_reads_back_as_sent() {
        let m = PairMessage::Records {
            tag: tag(),
            records: vec![record(5, 3), record(6, 0)],
            retain_from: Lsn(4),
        };
        let bytes = m.encode().expect("encodes");
        assert_eq!(PairMessage::decode(&bytes).expect("decodes"), m);
    }

    proptest! {
        #[test]
        fn batches_keep_every_record_in_order_and_within_the_bound(
            sizes in proptest::collection::vec(0usize..300, 0..60),
            max_bytes in 1usize..1000,
        ) {
            let records: Vec<_> = sizes.iter().enumerate().map(|(i, &s)| record(i as u64 + 1, s)).collect();
            let out = batches(&records, max_bytes);
            let flat: Vec<_> = out.iter().flat_map(|b| b.iter().cloned()).collect();
            prop_assert_eq!(&flat, &records);
            for b in out {
                let size: usize = b.iter().map(|r| r.size_bytes()).sum();
                prop_assert!(b.len() == 1 || size <= max_bytes);
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = PairMessage::decode(&bytes);
        }
    }
}
