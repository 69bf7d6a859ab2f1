//! The owner of a log storage group: the process that hosts the primaries of its audit pair and
//! volume pairs ([`LsgOwner`]), and the takeover that turns a backup (or fresh pairs) into one
//! ([`takeover`]).
//!
//! - `protocol`: client requests and replies.
//! - `owner`: the primary side as an event-driven state machine over the LSG's files.
//! - `takeover`: fencing the old owner, re-appending what only a backup holds, warm or cold
//!   recovery, and the new owner's start.

pub mod owner;
pub mod protocol;
pub mod sim;
pub mod takeover;

pub use owner::{LsgOwner, OwnerAction, OwnerConfig, OwnerStart};
pub use protocol::{ClientReply, ClientRequest, Op, OpError};
