//! What one CPU runs: its place in the cluster, the LSG's files and limits, and the timing of
//! the driver. The owner's settings are derived here so every CPU that takes the LSG over runs
//! it the same way.

use std::path::PathBuf;
use std::time::Duration;

use duplex_audit_pair::PrimaryConfig;
use duplex_lsg::{LsgConfig, LsgId, OwnerEpoch};
use duplex_owner::OwnerConfig;
use duplex_pair::{MessageTableLimits, PairTag};
use duplex_transport::{EndpointId, StreamId};
use duplex_volume_pair::LockConfig;

/// The ordered transport stream the pair messages travel on.
pub const PAIR_STREAM: StreamId = StreamId(1);

/// The driver's clocks. Defaults suit loopback and the 300 ms failure detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How often the owner is ticked (group flushes, lock timeouts, checkpoints): at most this
    /// much later than `flush_interval` a group flush starts.
    pub owner_tick: Duration,
    /// How often a backup is ticked (rejoining a silent primary, fence resends, lock tries).
    pub backup_tick: Duration,
    /// A backup that hears nothing from its primary for this long asks for the stream again.
    pub rejoin_interval: Duration,
    /// A taker resends its `Fence` to the backups that have not answered this often ...
    pub fence_resend: Duration,
    /// ... and takes over with the copies it has after this long.
    pub fence_deadline: Duration,
    /// A backup node whose primary's whole node is down tries the ownership lock this often.
    pub acquire_poll: Duration,
    /// A takeover that found no complete copy of the stream lets the LSG go and tries again
    /// after this long.
    pub copy_missing_retry: Duration,
    /// A backup that holds records it has not acknowledged for this long stops counting.
    pub ack_timeout: Duration,
    /// Records nothing waits for (updates) are held at most this long before they go to the
    /// backups, so a transaction's records travel together.
    pub pair_delay: Duration,
    /// Group flush in normal state: the oldest unflushed record waits at most this long.
    pub flush_interval: Duration,
    pub checkpoint_interval: Duration,
    pub lock_timeout: Duration,
    pub tx_idle_timeout: Duration,
    /// At a cold start (no primary announced), the first CPU of an LSG's list tries to recover
    /// it after this long, the second after twice as long, and so on.
    pub cold_start_wait: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            owner_tick: Duration::from_millis(2),
            backup_tick: Duration::from_millis(5),
            rejoin_interval: Duration::from_millis(100),
            fence_resend: Duration::from_millis(20),
            fence_deadline: Duration::from_millis(200),
            acquire_poll: Duration::from_millis(10),
            copy_missing_retry: Duration::from_millis(50),
            ack_timeout: Duration::from_millis(250),
            pair_delay: Duration::from_millis(2),
            flush_interval: Duration::from_millis(5),
            checkpoint_interval: Duration::from_millis(500),
            lock_timeout: Duration::from_millis(500),
            tx_idle_timeout: Duration::from_secs(5),
            cold_start_wait: Duration::from_millis(500),
        }
    }
}

/// One CPU's configuration.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub local: EndpointId,
    pub lsg_id: LsgId,
    /// The LSG's directory (shared storage: every CPU of every node opens the same one).
    pub lsg_dir: PathBuf,
    /// The node's run directory: one pid file per CPU of the node.
    pub run_dir: PathBuf,
    /// Limits for opening (and creating) the LSG; opening raises them to what the files hold.
    pub lsg_config: LsgConfig,
    /// Flush before every acknowledgement in every state.
    pub paranoid: bool,
    /// Every CPU that may own or back up the LSG (this one included), in order of preference:
    /// the same-node half of a primary is the first other CPU of its node in this list, the
    /// backup node's pair the first CPU of another node.
    pub cpus: Vec<EndpointId>,
    pub timing: Timing,
    /// The key range of each data volume, `[start, end)` (`end` `None`: unbounded). A request
    /// whose key lies outside its volume's range is refused, so a misrouted key is never
    /// stored where routed reads do not look. Empty: no check (tests and benchmarks).
    pub key_ranges: Vec<KeyRange>,
}

/// One data volume's keys: `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    pub volume: String,
    pub start: Vec<u8>,
    pub end: Option<Vec<u8>>,
}

impl KeyRange {
    pub fn holds(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && self.end.as_deref().is_none_or(|e| key < e)
    }
}

impl HostConfig {
    /// LSG limits for tests and benchmarks: small audit segments, so opening (which reads the
    /// tail segment and its spare) and a takeover (which looks records up by LSN in their
    /// segment) read little: with 4 MiB segments a warm takeover spent ~50 ms in such reads.
    pub fn small_lsg_config() -> LsgConfig {
        LsgConfig {
            audit_segment_bytes: 1 << 20,
            volume_segment_bytes: 4 << 20,
            max_batch_bytes: 256 << 10,
            max_record_bytes: 256 << 10,
            max_key_bytes: 256,
            max_value_bytes: 16 << 10,
        }
    }

    /// The same-node backup half of a primary on `cpu`: the first other CPU of its node.
    pub fn home_backup_of(&self, cpu: EndpointId) -> Option<EndpointId> {
        self.cpus
            .iter()
            .copied()
            .find(|c| c.node == cpu.node && *c != cpu)
    }

    /// The backup node's pairs of a primary on `cpu`: the first CPU of another node.
    pub fn backup_node_of(&self, cpu: EndpointId) -> Option<EndpointId> {
        self.cpus.iter().copied().find(|c| c.node != cpu.node)
    }

    /// The owner's settings when this CPU owns the LSG at `epoch`.
    pub fn owner_config(
        &self,
        epoch: OwnerEpoch,
        incarnation: u64,
        max_record_bytes: usize,
    ) -> OwnerConfig {
        let t = &self.timing;
        OwnerConfig {
            primary: PrimaryConfig {
                tag: PairTag {
                    lsg: self.lsg_id,
                    epoch,
                    incarnation,
                },
                paranoid: self.paranoid,
                max_record_bytes,
                home: self.home_backup_of(self.local),
                remote: self.backup_node_of(self.local),
                ack_timeout: t.ack_timeout,
                max_message_bytes: 256 << 10,
                max_unacked_records: 4096,
                flush_bytes: 256 << 10,
                flush_interval: t.flush_interval,
            },
            locks: LockConfig {
                lock_timeout: t.lock_timeout,
                ..LockConfig::default()
            },
            // A checkpoint carries the message table (about 40 bytes an entry): it must fit
            // one record of the LSG.
            messages: MessageTableLimits {
                max_entries: (max_record_bytes / 64).clamp(64, 32_768),
                ..MessageTableLimits::default()
            },
            checkpoint_interval: t.checkpoint_interval,
            max_active_transactions: 1024,
            tx_idle_timeout: t.tx_idle_timeout,
            max_scan_rows: 100_000,
        }
    }
}
