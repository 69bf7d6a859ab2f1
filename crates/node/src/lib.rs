//! Node services: what turns the pairs, storage and transport into a cluster a user runs
//! (issue 9, `duplexd`).
//!
//! Built so far: the cluster configuration file ([`config`]). Every CPU of every node, the
//! client library and the CLI read the same file, so it is the one place where the cluster's
//! shape (nodes, CPUs, addresses, LSGs, key ranges) is decided and checked; everything else asks
//! it. Placement of pair halves over CPUs, the takeover order across nodes, the client service and
//! status are to come.

pub mod config;

pub use config::{
    ClusterConfig, ConfigError, Cpu, Durability, KeyBound, LoadError, Lsg, Node, Route, Storage,
    StorageMode, Timing, Volume,
};
