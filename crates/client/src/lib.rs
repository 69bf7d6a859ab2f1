//! The Duplex client library.
//!
//! [`Cluster::connect`] reads the cluster config (every node, every LSG and its key ranges),
//! binds a client endpoint on the cluster transport with the client's certificate, and learns
//! each LSG's primary from the owners' notices. A [`ClientSession`] is one client id: its
//! requests are numbered, any number in flight, and a request whose answer was lost (a
//! takeover, a lost connection) is sent again unchanged once the new primary says it is ready;
//! the primary's message table answers it with the original response, so nothing is applied
//! twice (SPEC §4).
//!
//! A [`Transaction`] begins in the LSG of the first key it touches. Every later key must route
//! to the same LSG: a transaction across LSGs needs two-phase commit, which does not exist
//! yet, and gets [`ClientError::CrossLsg`] instead.
//!
//! - `cluster`: connecting, sessions, status.
//! - `txn`: transactions.
//! - `bank`: the bank-transfer workload and its oracle (`duplex bank`, `duplex demo`, tests
//!   and benchmarks).

pub mod bank;
mod cluster;
mod error;
mod txn;

pub use cluster::{ClientSession, Cluster, ConnectOptions};
pub use error::ClientError;
pub use txn::{Committed, Transaction};
