//! The thin driver that runs one CPU's roles for its LSGs: real files
//! (`duplex_lsg::FileStore`), the QUIC transport, and the sans-IO cores of `duplex-owner` and
//! `duplex-audit-pair`.
//!
//! One event loop per process ([`Cpu`]) owns, per LSG, the
//! [`LsgOwner`](duplex_owner::LsgOwner) or the [`AuditBackup`](duplex_audit_pair::AuditBackup):
//! transport events, storage completions and ticks go in with `now`, and the cores' actions
//! come out. Everything that may wait on a disk
//! (trail flushes, volume flushes, truncation, opening the LSG, the takeover itself) runs on
//! storage threads and comes back as an event; the owner's trail appends and volume page-cache
//! writes stay in line, as in the simulation (`duplex_owner::sim`), which is the reference for
//! how the pieces are wired.
//!
//! - `config`: what one CPU runs for one LSG (layout, limits, timing) and the owner's settings.
//! - `cpu`: the CPU's event loop ([`Cpu`]), routing each event to its LSG's role.
//! - `driver`: one LSG's role on the CPU ([`Host`]).
//! - `wire`: the envelope of client requests and replies, and status ([`CpuRequest`]).
//! - `storage`: the storage threads and their completions.
//! - `node`: what a node service does for its CPUs on one host: pid files, and ending a CPU
//!   that is stopped or hung before another takes its LSG over.
//! - `create`: creating an LSG with its volumes and first rows.
//! - `notice`: the host's own messages (who is primary).
//! - `faults`: `partition` / `heal` lines on stdin, for drills and process tests.
//! - `client`: a client endpoint and sessions that find the primary and resend after a takeover.

pub mod client;
pub mod config;
pub mod cpu;
pub mod create;
pub mod driver;
pub mod faults;
pub mod node;
pub mod notice;
pub mod storage;
pub mod wire;

pub use client::{Answer, ClientEndpoint, ClientError, ClientOptions, Session};
pub use config::{HostConfig, KeyRange, PAIR_STREAM, Timing};
pub use cpu::Cpu;
pub use create::{Row, create_lsg};
pub use driver::{Exit, Host, Report};
pub use notice::Notice;
pub use wire::{CpuReply, CpuRequest, CpuStatus, LsgStatus, Timeline};

use thiserror::Error;

/// Why a CPU could not start or run.
#[derive(Debug, Error)]
pub enum HostError {
    #[error("LSG at {path}: {source}")]
    Lsg {
        path: std::path::PathBuf,
        source: duplex_lsg::LsgError,
    },
    #[error("creating the LSG: {0}")]
    Create(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("a storage task failed: {0}")]
    Task(String),
}
