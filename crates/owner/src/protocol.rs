//! What a client says to an LSG's owner and what it hears back. One request, one reply; the
//! client numbers its requests, and the ones whose outcome must never be produced twice
//! (commit, abort, prepare) are answered from the message table when resent.
//!
//! Reads, writes and scans inside a live transaction are not in the table: a resent write is
//! applied again with the same value (the transaction still holds the key's exclusive lock, so
//! the result is the same), and a transaction the primary lost at a takeover is unknown to the
//! new one, which answers [`OpError::UnknownTransaction`]: the client begins it again.

use std::ops::Bound;

use duplex_lsg::LsgId;
use duplex_pair::{AbortReason, ClientId, Reply, RequestKey, RequestSeq, TxId};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// One operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Begin,
    Get {
        volume: String,
        key: Vec<u8>,
    },
    Put {
        volume: String,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        volume: String,
        key: Vec<u8>,
    },
    Scan {
        volume: String,
        start: Bound<Vec<u8>>,
        end: Bound<Vec<u8>>,
        limit: u32,
    },
    /// Two-phase commit, first phase: log the transaction's write set and keep its locks until
    /// the coordinator (whose trail logs the decision) commits or aborts it.
    Prepare {
        coordinator: LsgId,
    },
    Commit,
    Abort,
}

/// A client request: `tx` names the transaction for every operation but `Begin`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRequest {
    pub client: ClientId,
    pub seq: RequestSeq,
    /// The client has seen the replies of all its requests below this one.
    pub seen_below: RequestSeq,
    pub tx: Option<TxId>,
    pub op: Op,
}

impl ClientRequest {
    pub fn key(&self) -> RequestKey {
        RequestKey {
            client: self.client,
            seq: self.seq,
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, OpError> {
        encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, OpError> {
        decode(bytes)
    }
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientReply {
    Began(TxId),
    Value(Option<Vec<u8>>),
    Rows(Vec<(Vec<u8>, Vec<u8>)>),
    Written,
    /// The transaction is prepared: its outcome is the coordinator's.
    Prepared,
    /// The outcome of a commit or abort: the same on every resend.
    Outcome(Reply),
    Error(OpError),
}

impl ClientReply {
    pub fn encode(&self) -> Result<Vec<u8>, OpError> {
        encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, OpError> {
        decode(bytes)
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, OpError> {
    postcard::to_stdvec(value).map_err(|e| OpError::Malformed {
        reason: e.to_string(),
    })
}

/// A whole message: bytes left over after it are refused, not ignored.
fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, OpError> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| OpError::Malformed {
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(OpError::Malformed {
            reason: format!("{} bytes after the message", rest.len()),
        });
    }
    Ok(value)
}

/// Why a request was refused. Nothing was changed by a refused request unless it says so.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum OpError {
    #[error("malformed request: {reason}")]
    Malformed { reason: String },
    #[error(
        "transaction {tx} is not known here: it ended, or the primary that ran it failed before it was prepared"
    )]
    UnknownTransaction { tx: TxId },
    #[error("transaction {tx} {reason}")]
    Aborted { tx: TxId, reason: AbortReason },
    #[error(
        "transaction {tx} is in doubt: it was prepared and its outcome is its coordinator's; it keeps its locks until the coordinator's decision is applied"
    )]
    InDoubt { tx: TxId },
    #[error("no data volume {volume} in this LSG")]
    UnknownVolume { volume: String },
    #[error("{what} of {size_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    TooLarge {
        what: String,
        size_bytes: usize,
        limit_bytes: usize,
    },
    #[error("the operation needs a transaction")]
    NoTransaction,
    #[error("transaction {tx} is already running an operation or ending")]
    Busy { tx: TxId },
    #[error("{active} transactions are active, the limit; begin again later")]
    TooManyTransactions { active: usize },
    #[error("request {request} was answered long ago and its reply is no longer kept")]
    ReplyForgotten { request: RequestKey },
    #[error("lock refused: {reason}")]
    LockRefused { reason: String },
    #[error("this process is not the LSG's primary (it stopped: {reason})")]
    NotPrimary { reason: String },
    #[error("storage failed: {reason}")]
    Storage { reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_reads_back_and_garbage_or_trailing_bytes_are_refused() {
        let request = ClientRequest {
            client: ClientId(1),
            seq: RequestSeq(2),
            seen_below: RequestSeq(1),
            tx: None,
            op: Op::Begin,
        };
        let mut bytes = request.encode().expect("encodes");
        assert_eq!(ClientRequest::decode(&bytes), Ok(request));
        bytes.push(0);
        assert!(matches!(
            ClientRequest::decode(&bytes),
            Err(OpError::Malformed { .. })
        ));
        assert!(matches!(
            ClientReply::decode(&[0xff; 3]),
            Err(OpError::Malformed { .. })
        ));
    }
}
