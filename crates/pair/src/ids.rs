//! Names of transactions, clients and requests, and the replies a client gets.

use std::fmt;

use duplex_lsg::{Lsn, OwnerEpoch};
use serde::{Deserialize, Serialize};

/// A transaction of one LSG, unique for the LSG's life: the owner epoch that began it and a
/// number counted within that epoch, so a new owner never reuses an old id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TxId {
    pub epoch: OwnerEpoch,
    pub number: u64,
}

impl fmt::Display for TxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.epoch, self.number)
    }
}

/// A client session, chosen by the client library (random, 64 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClientId(pub u64);

/// A request's number within its client session; the client numbers its requests 1, 2, ...
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestSeq(pub u64);

/// One client request, the key of the message table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestKey {
    pub client: ClientId,
    pub seq: RequestSeq,
}

impl fmt::Display for RequestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.client.0, self.seq.0)
    }
}

/// The commit state of an LSG's pairs (SPEC §2): what a commit needs before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum CommitState {
    /// The backup node's pairs are in sync: a commit is acknowledged once its records are in
    /// the memory of two failure domains.
    Normal,
    /// The backup node is out of communication: flush before acknowledging.
    PrimaryOnly,
    /// After a takeover, until a new backup is in sync: flush before acknowledging.
    BackupOnly,
}

impl CommitState {
    /// Records written in this state carry the communications flag "out of communication".
    pub fn out_of_communication(self) -> bool {
        self != CommitState::Normal
    }
}

/// What a commit's acknowledgement tells the client about its durability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The LSN of the commit record.
    pub commit_lsn: Lsn,
    /// The owner epoch of the primary that wrote it.
    pub epoch: OwnerEpoch,
    /// Normal: in memory on two nodes; primary-only or backup-only: flushed.
    pub state: CommitState,
}

/// Why a transaction ended without committing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AbortReason {
    /// The client asked.
    Requested,
    /// Waiting for a lock would have closed a cycle of waiters.
    Deadlock,
    /// A lock was not granted within the lock timeout.
    LockTimeout,
    /// The primary that ran it failed before it was prepared (SPEC §3).
    Takeover,
    /// Undone by recovery from the audit trail.
    Recovery,
    /// Its client sent nothing for longer than the transaction idle timeout.
    Idle,
}

impl fmt::Display for AbortReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AbortReason::Requested => "aborted at the client's request",
            AbortReason::Deadlock => "aborted to break a deadlock",
            AbortReason::LockTimeout => "aborted: a lock was not granted within the lock timeout",
            AbortReason::Takeover => {
                "aborted: its primary failed before the transaction was prepared"
            }
            AbortReason::Recovery => "aborted by recovery from the audit trail",
            AbortReason::Idle => {
                "aborted: its client sent nothing for longer than the idle timeout"
            }
        })
    }
}

/// The answer to a commit or abort request, kept in the message table so a resend gets the
/// same answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Committed(Receipt),
    Aborted(AbortReason),
}
