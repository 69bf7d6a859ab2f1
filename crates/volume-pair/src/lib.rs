//! Volume pairs (SPEC §1, §4): the process pair that owns a data volume serves reads and writes
//! inside transactions under strict two-phase record locks, and hands the owner the update
//! records (before and after images) to log before each change.
//!
//! This crate is the pair's deterministic core, driven by the LSG owner process:
//!
//! - [`VolumePair`] (`pair.rs`): the lock manager, a sans-IO state machine (`now` passed in, no
//!   threads, no clock, no `HashMap` order), with deadlock detection, lock timeouts, FIFO
//!   fairness, bounds, the relocking of in-doubt transactions at recovery, and `validate()`.
//! - [`LockMode`] (`mode.rs`): the multiple-granularity modes and their compatibility.
//! - [`VolumeAccess`] (`access.rs`): the one boundary to the data, implemented by
//!   [`duplex_lsg::DataVolume`] and by [`MemoryVolume`], the model for tests and oracles.
//!
//! The owner keeps the order write-ahead needs: lock, build the update record, append it to the
//! audit trail, then apply the change to the volume with the record's LSN. It must not depend on
//! the transport or an async runtime; the halves' checkpointing lives in the owner layer.

mod access;
mod mode;
mod pair;

pub use access::{KeyValue, MemoryVolume, VolumeAccess, VolumeError};
pub use mode::LockMode;
pub use pair::{Granted, LockConfig, LockError, LockOutcome, VolumePair};
