//! What the audit pairs (`duplex-audit-pair`) and the volume pairs (`duplex-volume-pair`) of a
//! log storage group share, so neither reaches into the other:
//!
//! - `ids`: transactions, clients and requests, named the same way everywhere.
//! - `records`: the schemas of the audit records the pairs write (update, compensation, commit,
//!   abort, prepare, checkpoint, state change), fixed in `docs/storage-format.md`.
//! - `message_table`: (client, sequence) → reply, so a resent request is answered, never run
//!   twice.
//! - `stream`: the checkpoint stream between a primary and its backups, every message tagged
//!   with (LSG, owner epoch, incarnation).
//! - `clock`: the time boundary; cores take `now` as an argument, drivers read it here.
//!
//! Everything here is plain data and pure functions: no IO, no threads, no wall clock.

pub mod clock;
pub mod ids;
pub mod message_table;
pub mod records;
pub mod stream;

pub use clock::{Clock, MonotonicClock, VirtualClock};
pub use ids::{AbortReason, ClientId, CommitState, Receipt, Reply, RequestKey, RequestSeq, TxId};
pub use message_table::{Lookup, MessageEntry, MessageTable, MessageTableLimits};
pub use records::{
    ActiveTx, AuditBody, Checkpoint, Commit, Compensation, Prepare, RecordError, StateChange,
    TxEnd, Update,
};
pub use stream::{PairMessage, PairTag, StreamError, StreamRecord, batches};
