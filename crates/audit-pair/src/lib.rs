//! Audit pairs: the halves that write a log storage group's audit trail (SPEC §2-3, seeds 000,
//! 001, 004).
//!
//! - `primary`: LSN assignment, the checkpoint stream to the backups, and the rule for when a
//!   commit may be acknowledged in each commit state.
//! - `backup`: a backup's copy of the stream, its acknowledgements, and epoch fencing.
//! - `recovery`: what a new owner redoes, undoes and keeps locked, read from the trail (or from
//!   a warm backup's copy of it).
//!
//! All are sans-IO (events and `now` in, actions out; recovery is a pure function) with a
//! `validate()` of their invariants; the LSG owner drives them over the trail and the transport.

pub mod backup;
pub mod primary;
pub mod recovery;

pub use backup::{AuditBackup, BackupAction};
pub use primary::{AuditPrimary, BackupRole, PrimaryAction, PrimaryConfig, PrimaryStatus};
