//! Audit pairs: the primary and backup halves that write a log storage group's audit trail.
//!
//! - `recovery`: what a new owner redoes, undoes and keeps locked, read from the trail.

pub mod recovery;
