use duplex_lsg::LsgId;
use duplex_owner::{ClientReply, OpError};
use duplex_pair::{AbortReason, TxId};
use thiserror::Error;

/// What went wrong with a client's request.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("reading the cluster config: {0}")]
    Config(String),
    #[error("client credentials: {0}")]
    Credentials(String),
    #[error("no data volume holds key {key:?}")]
    NoVolume { key: String },
    #[error(
        "transaction {tx:?} began in LSG {first}; key {key:?} is in LSG {second}: a transaction across LSGs needs two-phase commit, which is not built yet"
    )]
    CrossLsg {
        tx: Option<TxId>,
        first: LsgId,
        second: LsgId,
        key: String,
    },
    #[error("transaction {tx} aborted: {reason:?}")]
    Aborted { tx: TxId, reason: AbortReason },
    #[error("the cluster refused the request: {0}")]
    Refused(#[from] OpError),
    #[error("unexpected reply {reply:?} to {request}")]
    Unexpected { request: String, reply: ClientReply },
    #[error("the transaction already ended")]
    Ended,
    #[error(transparent)]
    Transport(#[from] duplex_host::ClientError),
}

/// A key for messages: text when it is printable, bytes otherwise.
pub(crate) fn show_key(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => s.to_string(),
        _ => format!("{key:02x?}"),
    }
}
