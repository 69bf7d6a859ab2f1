//! Audit pairs: the halves that write a log storage group's audit trail (SPEC §2-3, seeds 000,
//! 001).
//!
//! - `primary`: LSN assignment, the checkpoint stream to the backups, and the rule for when a
//!   commit may be acknowledged in each commit state.
//! - `backup`: a backup's copy of the stream, its acknowledgements, and epoch fencing.
//!
//! Both are sans-IO state machines (events and `now` in, actions out) with a `validate()` of
//! their invariants; the LSG owner drives them over the trail and the transport.

pub mod backup;
pub mod primary;

pub use backup::{AuditBackup, BackupAction};
pub use primary::{AuditPrimary, BackupRole, PrimaryAction, PrimaryConfig, PrimaryStatus};
