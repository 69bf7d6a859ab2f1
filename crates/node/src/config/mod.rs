//! The cluster configuration file (TOML): which nodes exist, their CPUs and addresses, which LSGs
//! they serve, the key ranges of the data volumes, where storage lives, the durability mode and
//! the timing knobs. The schema and a commented example are in `docs/config.md`.
//!
//! Parse, don't trust: the text is read into a schema whose values carry their position in the
//! file (`file.rs`), checked as a whole, and only then becomes a [`ClusterConfig`], whose fields
//! are private so that what a CPU routes by is what was checked. Every error names the line and
//! column of the value at fault, because the reader is about to edit that file.
//!
//! Decisions:
//! - Key ranges are half-open `[start, end)` over byte strings, ordered bytewise like the
//!   storage layer's keys; `start` defaults to the empty key and a missing `end` means "to the end
//!   of the key space". Ranges are global: no two volumes of the cluster, in one LSG or in two,
//!   may overlap, so a key alone decides its LSG and volume (SPEC §4: keys route to volumes by
//!   configured key ranges; the client has no other name to route by). Gaps are allowed: a key in
//!   a gap belongs to no volume and is refused as an unknown volume.
//! - Volume names are unique in the cluster, so a name also names one volume.
//! - A node's CPU ids are its own: a CPU is `(node, cpu)`, the transport's `EndpointId`.

mod error;
mod file;
mod key;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use duplex_host::HostConfig;
use duplex_lsg::{LsgConfig, LsgId};
use duplex_transport::{DetectorConfig, EndpointId, PeerAddrs};
use serde::{Deserialize, Serialize};

pub use error::{ConfigError, LoadError};
pub use key::KeyBound;

/// Most nodes in one cluster.
pub const MAX_NODES: usize = 256;
/// Most CPUs (`duplexd` processes) on one node.
pub const MAX_CPUS_PER_NODE: usize = 64;
/// Most LSGs in one cluster.
pub const MAX_LSGS: usize = 4096;
/// Most data volumes in one LSG.
pub const MAX_VOLUMES_PER_LSG: usize = 256;
/// The longest key-range bound: the storage layer's default key limit (a test keeps them equal),
/// so every bound is a key that could be stored.
pub const MAX_KEY_BOUND_BYTES: usize = 1 << 10;

/// How commits are made durable (SPEC §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// In normal state a commit is acknowledged from memory on two nodes; flushed first only in
    /// primary-only and backup-only states.
    #[default]
    Normal,
    /// Every commit is flushed before its acknowledgement, in every state.
    Paranoid,
}

/// Where LSG files live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageMode {
    /// Every node opens the same LSG files under one directory (one host, or a shared file system).
    /// Replicated storage (SPEC §5, seed 003) will be a second mode in which each node keeps its
    /// own copy under its `data_dir` and `storage.dir` is not used.
    Shared,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Storage {
    pub mode: StorageMode,
    /// The shared directory: LSG `n` lives in `<dir>/lsg-<n>`.
    pub dir: PathBuf,
}

/// The timing knobs an operator may tune; the rest of the driver's clocks follow from them or
/// keep their defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timing {
    /// Silence after which a CPU's path is declared down (the transport's failure detector).
    pub detection_time_ms: u64,
    /// How often an owner takes a fuzzy checkpoint; a warm takeover replays about two intervals.
    pub checkpoint_interval_ms: u64,
    /// How long a transaction waits for a record lock before it is aborted.
    pub lock_timeout_ms: u64,
}

impl Timing {
    pub const DETECTION_TIME_MS: std::ops::RangeInclusive<u64> = 20..=60_000;
    pub const CHECKPOINT_INTERVAL_MS: std::ops::RangeInclusive<u64> = 10..=3_600_000;
    pub const LOCK_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 1..=600_000;
}

impl Default for Timing {
    /// The transport's and the driver's own defaults (a test keeps them equal).
    fn default() -> Self {
        Timing {
            detection_time_ms: 300,
            checkpoint_interval_ms: 500,
            lock_timeout_ms: 500,
        }
    }
}

/// One CPU: one `duplexd` process with its transport endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cpu {
    pub id: u16,
    pub main: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failsafe: Option<SocketAddr>,
    /// Where the CPU serves its metrics (Prometheus text format over HTTP), if anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
}

impl Cpu {
    pub fn addrs(&self) -> PeerAddrs {
        PeerAddrs {
            main: self.main,
            failsafe: self.failsafe,
        }
    }
}

/// One node (host): its CPUs and its own directory (pid files, the liveness file; with
/// replicated storage, its copies of LSGs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: u16,
    pub data_dir: PathBuf,
    pub cpus: Vec<Cpu>,
}

impl Node {
    /// The transport endpoints of this node's CPUs, in file order.
    pub fn endpoints(&self) -> impl Iterator<Item = EndpointId> + '_ {
        self.cpus.iter().map(|c| EndpointId::new(self.id, c.id))
    }
}

/// A data volume and the keys it holds: `[start, end)`, `end` `None` meaning unbounded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    pub start: KeyBound,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<KeyBound>,
}

impl Volume {
    pub fn holds(&self, key: &[u8]) -> bool {
        self.start.as_bytes() <= key && self.end.as_ref().is_none_or(|e| key < e.as_bytes())
    }
}

/// A log storage group: its primary pairs run on `home`, its backup pairs on `backup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lsg {
    pub id: LsgId,
    pub home: u16,
    pub backup: u16,
    pub volumes: Vec<Volume>,
}

/// Where a key (or a volume name) lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route<'a> {
    pub lsg: &'a Lsg,
    pub volume: &'a Volume,
}

/// The size limits a cluster creates its LSGs with: the storage defaults but for smaller
/// segments. A taker opening the LSG for writing reads the rest of each tail segment (to find
/// where writing stopped and zero it), which with the defaults' 16 MiB audit and 64 MiB volume
/// segments took about 25 ms and 70 ms per volume, most of a CPU takeover. An LSG keeps the
/// limits it was created with.
pub fn cluster_lsg_config() -> LsgConfig {
    LsgConfig {
        audit_segment_bytes: 4 << 20,
        volume_segment_bytes: 8 << 20,
        max_batch_bytes: 1 << 20,
        ..LsgConfig::default()
    }
}

/// A checked cluster configuration. Built only by [`ClusterConfig::parse`] or
/// [`ClusterConfig::load`]; serializes back to the same schema ([`ClusterConfig::to_toml`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterConfig {
    durability: Durability,
    storage: Storage,
    timing: Timing,
    nodes: Vec<Node>,
    lsgs: Vec<Lsg>,
    /// Every volume as (LSG index, volume index), sorted by range start; ranges do not overlap.
    #[serde(skip)]
    routes: Vec<(usize, usize)>,
}

impl ClusterConfig {
    /// Parses and checks a configuration. Paths are kept as written.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        file::parse(text)
    }

    /// Reads, parses and checks a configuration file; relative paths in it are taken relative to
    /// the file's directory, so a cluster directory can be moved whole.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|source| LoadError::Invalid {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        config.storage.dir = base.join(&config.storage.dir);
        for node in &mut config.nodes {
            node.data_dir = base.join(&node.data_dir);
        }
        Ok(config)
    }

    /// The configuration in the file's schema; [`ClusterConfig::parse`] reads it back equal.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }

    pub fn durability(&self) -> Durability {
        self.durability
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// The nodes, in file order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The LSGs, in file order.
    pub fn lsgs(&self) -> &[Lsg] {
        &self.lsgs
    }

    pub fn node(&self, id: u16) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }

    pub fn lsg(&self, id: LsgId) -> Option<&Lsg> {
        self.lsgs.iter().find(|l| l.id == id)
    }

    /// The CPUs of node `id`, `None` for a node the cluster does not have.
    pub fn cpus_of(&self, node: u16) -> Option<&[Cpu]> {
        self.node(node).map(|n| n.cpus.as_slice())
    }

    /// Every CPU of the cluster with its addresses: the transport's cluster list.
    pub fn peers(&self) -> Vec<(EndpointId, PeerAddrs)> {
        self.nodes
            .iter()
            .flat_map(|n| {
                n.cpus
                    .iter()
                    .map(move |c| (EndpointId::new(n.id, c.id), c.addrs()))
            })
            .collect()
    }

    /// The transport's failure detector for the configured detection time.
    pub fn detector_config(&self) -> DetectorConfig {
        DetectorConfig::with_detection_time_ms(self.timing.detection_time_ms)
    }

    /// The LSG and volume whose range holds `key`; `None` for a key in a gap between ranges.
    pub fn route(&self, key: &[u8]) -> Option<Route<'_>> {
        let after = self
            .routes
            .partition_point(|&r| self.route_at(r).volume.start.as_bytes() <= key);
        let candidate = self.route_at(*self.routes.get(after.checked_sub(1)?)?);
        candidate.volume.holds(key).then_some(candidate)
    }

    /// The LSG of the volume named `name`.
    pub fn volume(&self, name: &str) -> Option<Route<'_>> {
        self.lsgs.iter().find_map(|lsg| {
            let volume = lsg.volumes.iter().find(|v| v.name == name)?;
            Some(Route { lsg, volume })
        })
    }

    fn route_at(&self, (l, v): (usize, usize)) -> Route<'_> {
        let lsg = &self.lsgs[l];
        Route {
            lsg,
            volume: &lsg.volumes[v],
        }
    }

    /// The CPUs that run LSG `lsg`'s roles, in order of preference (`HostConfig::cpus`): the
    /// home node's, then the backup node's, each list rotated by the LSG's id less one,
    /// so the primaries and backup halves of several LSGs spread over a node's CPUs. The first
    /// is where the LSG is created and its primary starts.
    pub fn lsg_cpus(&self, lsg: LsgId) -> Vec<EndpointId> {
        let Some(lsg) = self.lsgs.iter().find(|l| l.id == lsg) else {
            return Vec::new();
        };
        // By id, not by place in the file: CPUs reading two versions of the file, one with an
        // LSG added in the middle, still agree on every running LSG's placement.
        let index = usize::try_from(lsg.id.0.saturating_sub(1)).unwrap_or(0);
        [lsg.home, lsg.backup]
            .iter()
            .filter_map(|&n| self.node(n))
            .flat_map(|node| {
                let mut cpus: Vec<EndpointId> = node.endpoints().collect();
                let len = cpus.len().max(1);
                cpus.rotate_left(index % len);
                cpus
            })
            .collect()
    }

    /// Every LSG with its CPUs (`lsg_cpus`), for clients.
    pub fn lsg_routes(&self) -> Vec<(LsgId, Vec<EndpointId>)> {
        self.lsgs
            .iter()
            .map(|l| (l.id, self.lsg_cpus(l.id)))
            .collect()
    }

    /// What the driver (`duplex_host`) needs to run LSG `lsg` on CPU `cpu`: the CPUs of the
    /// LSG's home and backup nodes (`lsg_cpus`), its directory under shared storage, the node's
    /// directory for pid files, the durability mode and the timing knobs (the others keep the
    /// driver's defaults). `None` when the LSG is unknown or `cpu` is not a CPU of its home or
    /// backup node. The LSG's size limits are the storage defaults: the file does not set them
    /// yet.
    pub fn host_config(&self, lsg: LsgId, cpu: EndpointId) -> Option<HostConfig> {
        let lsg = self.lsg(lsg)?;
        if cpu.node != lsg.home && cpu.node != lsg.backup {
            return None;
        }
        let node = self.node(cpu.node)?;
        if !node.endpoints().any(|e| e == cpu) {
            return None;
        }
        let cpus = self.lsg_cpus(lsg.id);
        Some(HostConfig {
            local: cpu,
            lsg_id: lsg.id,
            lsg_dir: self.storage.dir.join(format!("lsg-{}", lsg.id)),
            run_dir: node.data_dir.clone(),
            lsg_config: cluster_lsg_config(),
            paranoid: self.durability == Durability::Paranoid,
            cpus,
            timing: duplex_host::Timing {
                checkpoint_interval: Duration::from_millis(self.timing.checkpoint_interval_ms),
                lock_timeout: Duration::from_millis(self.timing.lock_timeout_ms),
                ..duplex_host::Timing::default()
            },
            key_ranges: lsg
                .volumes
                .iter()
                .map(|v| duplex_host::KeyRange {
                    volume: v.name.clone(),
                    start: v.start.as_bytes().to_vec(),
                    end: v.end.as_ref().map(|e| e.as_bytes().to_vec()),
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_bound_limit_is_the_storage_default() {
        assert_eq!(MAX_KEY_BOUND_BYTES, LsgConfig::default().max_key_bytes);
    }

    #[test]
    fn timing_defaults_are_the_drivers_own() {
        let t = Timing::default();
        let host = duplex_host::Timing::default();
        assert_eq!(
            t.detection_time_ms,
            DetectorConfig::default().detection_time_ms
        );
        assert_eq!(
            Duration::from_millis(t.checkpoint_interval_ms),
            host.checkpoint_interval
        );
        assert_eq!(Duration::from_millis(t.lock_timeout_ms), host.lock_timeout);
    }
}
