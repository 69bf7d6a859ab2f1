//! Addresses: every CPU of the cluster is an endpoint named by (node, CPU), reachable over a
//! main path and, optionally, a failsafe path (seed 001). Callers never see socket addresses
//! beyond configuration; everything else speaks `EndpointId`.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The node number of clients: an endpoint `0.k` is a client (it holds a client certificate,
/// `certs::CLIENT_SERVER_NAME`), never a CPU; nodes are numbered from 1.
pub const CLIENT_NODE: u16 = 0;

/// One CPU of the cluster: one OS process with its own transport endpoint; or, with node
/// `CLIENT_NODE`, a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EndpointId {
    pub node: u16,
    pub cpu: u16,
}

impl EndpointId {
    pub const fn new(node: u16, cpu: u16) -> Self {
        EndpointId { node, cpu }
    }

    /// Whether this is a client endpoint (node `CLIENT_NODE`).
    pub const fn is_client(&self) -> bool {
        self.node == CLIENT_NODE
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.node, self.cpu)
    }
}

/// `NODE.CPU`, as `Display` writes it.
impl std::str::FromStr for EndpointId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not an endpoint: expected NODE.CPU, e.g. 1.0");
        let (node, cpu) = s.split_once('.').ok_or_else(bad)?;
        Ok(EndpointId::new(
            node.parse().map_err(|_| bad())?,
            cpu.parse().map_err(|_| bad())?,
        ))
    }
}

/// Which of a peer's two links a frame travelled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Path {
    Main,
    Failsafe,
}

impl Path {
    pub const ALL: [Path; 2] = [Path::Main, Path::Failsafe];

    pub(crate) fn to_byte(self) -> u8 {
        match self {
            Path::Main => 0,
            Path::Failsafe => 1,
        }
    }

    pub(crate) fn from_byte(b: u8) -> Option<Path> {
        match b {
            0 => Some(Path::Main),
            1 => Some(Path::Failsafe),
            _ => None,
        }
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Main => f.write_str("main"),
            Path::Failsafe => f.write_str("failsafe"),
        }
    }
}

/// Where a peer listens: always a main address, optionally a failsafe one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAddrs {
    pub main: SocketAddr,
    pub failsafe: Option<SocketAddr>,
}

impl PeerAddrs {
    pub fn get(&self, path: Path) -> Option<SocketAddr> {
        match path {
            Path::Main => Some(self.main),
            Path::Failsafe => self.failsafe,
        }
    }
}
