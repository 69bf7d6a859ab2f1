//! One LSG's role on one CPU.
//!
//! [`Host`] owns the one core this CPU runs for its LSG, an [`LsgOwner`] or an
//! [`AuditBackup`], and feeds it everything with `now` (the time since the process started):
//! transport events, storage completions, lock acquisitions, the finished takeover, and ticks
//! ([`Timing`](crate::Timing)). The CPU's event loop ([`Cpu`](crate::Cpu)) decodes what
//! arrives and hands each LSG's events to its `Host`; after the events that are ready it drains
//! every core's actions: replies and pair messages go out on the transport at once; trail
//! flushes, volume flushes and truncations go to the storage threads (`storage`); nothing on
//! that thread waits on a disk. The transport runs on the same current-thread runtime, so a
//! request's hops (socket, decoder, owner, reply) stay on one thread.
//!
//! How a CPU becomes the owner (the decisions of `duplex_owner::sim`'s node services, made by
//! each CPU for itself):
//!
//! - A backup whose primary runs on its own node waits for the LSG's ownership lock on a thread
//!   of its own (`OpenMode::WriteWaiting`). The kernel releases a dead owner's `flock` at once,
//!   so a killed primary CPU is taken over without waiting for the failure detector. A primary
//!   the detector declares down while it still holds the lock (stopped or hung) is ended first
//!   (`node`), then the same path runs.
//! - A backup whose primary runs on another node tries the lock (`OpenMode::Write`, not
//!   waiting) every [`Timing::acquire_poll`](crate::Timing) once that node is dead: its
//!   liveness file was released by the kernel (`node::NodeWatch`; the backup node's designated
//!   CPU only) or the detector reports every CPU of that node down. On one host the LSG's lock
//!   also keeps it out while the home node lives behind a partition.
//! - At a cold start of the cluster nobody announces a primary: after
//!   [`Timing::cold_start_wait`](crate::Timing), times its rank in the LSG's CPU list, a backup
//!   tries the lock and, if nobody holds it, recovers the LSG from its trail.
//! - Holding the lock (the epoch is raised: the old owner's flushes now fail and the backups
//!   refuse its stream), the taker fences the other backups that are up and gathers their
//!   copies of the stream (`Fence` / `FenceAck`), then runs [`take_over`] on a blocking thread
//!   and starts as the owner, backup-only until a backup catches up.
//! - An owner tells every peer that comes up that it is the primary ([`Notice`]): backups join
//!   it, clients send to it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use duplex_audit_pair::BackupRole;
use duplex_audit_pair::{AuditBackup, BackupAction};
use duplex_lsg::{
    FileStore, LogStorageGroup, LsgError, LsgId, Lsn, OpenMode, OwnerEpoch, RecordType,
};
use duplex_owner::takeover::{
    Chain, Copies, StartKind, TakeoverError, TakeoverReport, Taker, take_over,
};
use duplex_owner::{ClientReply, ClientRequest, LsgOwner, Op, OpError, OwnerAction, OwnerStart};
use duplex_pair::{Clock, MonotonicClock, PairMessage, PairTag, Reply, StreamRecord};
use duplex_transport::{EndpointId, QuicTransport, RequestId, Transport, TransportError};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, debug_span, info, warn};

use crate::HostError;
use crate::config::{HostConfig, PAIR_STREAM};
use crate::create::{Row, create_lsg};
use crate::node::{self, Ended};
use crate::notice::Notice;
use crate::storage::{StorageDone, StorageWorkers};
use crate::wire::{CpuReply, LsgStatus, Timeline};

/// Where a client's reply goes: the requester and its request.
pub type ReplyTo = (EndpointId, RequestId);
type Owner = LsgOwner<FileStore, ReplyTo>;

/// Pair messages kept while a takeover runs, for the owner it makes (a backup's `Join` that
/// arrived meanwhile is then answered at once instead of after the backup's rejoin interval).
const MAX_BUFFERED_MESSAGES: usize = 4096;
/// Takeover timelines kept for status, per LSG.
const MAX_TIMELINES: usize = 16;

/// What the driver reports, one line each in `duplexd`'s and `lsg-cpu`'s output.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Report {
    /// The CPU runs its role.
    Ready {
        endpoint: String,
        role: String,
        incarnation: u64,
    },
    /// A backup joined the primary that announced itself.
    Joined { primary: String, epoch: u64 },
    /// This CPU holds the LSG's lock at `epoch` and gathers the backups' copies.
    Acquired { epoch: u64, waited_ms: f64 },
    /// This CPU owns the LSG.
    Owner {
        epoch: u64,
        start: String,
        trail_end: u64,
        reappended: u64,
        records_read: u64,
        redone: usize,
        undone: usize,
        in_doubt: usize,
        copies: usize,
        /// In `take_over` (checking the copies, recovery, the new owner's start).
        recovery_ms: f64,
        /// From holding the lock to owning.
        takeover_ms: f64,
    },
    /// The owner's commit state changed.
    State { state: String, home_counts: bool },
    /// A takeover found no complete copy of the stream: the LSG was let go for now.
    TakeoverDeferred { reason: String },
    /// The node service ended a local CPU the detector declared down that still held the lock.
    EndedLocalCpu { cpu: String, pid: i32 },
    /// The owner stopped for good (fenced or a storage failure): the process ends.
    Stopped { reason: String },
}

/// Why [`Cpu::run`](crate::Cpu::run) returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The owner stopped, or a takeover failed: end the process so another CPU takes over.
    Stopped(String),
    /// The transport was closed.
    Closed,
}

/// A finished takeover: the owner, its report, the copies gathered, the time `take_over` took.
type TakenOver = (Owner, TakeoverReport, usize, Duration);

pub(crate) enum Internal {
    Storage(StorageDone),
    /// An attempt to open the LSG for writing ended.
    Acquired {
        result: Box<Result<LogStorageGroup<FileStore>, LsgError>>,
        waited: Duration,
    },
    TakeoverDone(Box<Result<TakenOver, TakeoverError>>),
}

impl std::fmt::Debug for Internal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Internal::Storage(s) => write!(f, "Storage({s:?})"),
            Internal::Acquired { result, .. } => write!(f, "Acquired(ok: {})", result.is_ok()),
            Internal::TakeoverDone(r) => write!(f, "TakeoverDone(ok: {})", r.is_ok()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Acquire {
    Idle,
    /// A thread waits for the lock (`WriteWaiting`).
    Waiting,
    /// A thread tries the lock once (`Write`).
    Trying,
}

#[derive(Debug)]
struct Gathering {
    lsg: LogStorageGroup<FileStore>,
    copies: Copies,
    fence: Bytes,
    resend_at: Duration,
    deadline: Duration,
    acquired_at: Duration,
}

#[derive(Debug)]
struct BackupState {
    backup: AuditBackup,
    acquire: Acquire,
    next_try_at: Duration,
    gathering: Option<Box<Gathering>>,
}

/// Pair messages held back for a moment (see [`Outbox::hold`]).
#[derive(Debug, Default)]
struct Outbox {
    held: BTreeMap<EndpointId, Vec<PairMessage>>,
    /// When the oldest held message was held.
    since: Option<Duration>,
}

/// The largest message the outbox makes by merging held ones.
const MAX_MERGED_BYTES: usize = 256 << 10;

/// Whether the primary waits for a backup to hold this message's records: commits and
/// prepares wait for the rule, a state change back to normal waits for the backup node.
fn awaited(message: &PairMessage) -> bool {
    match message {
        PairMessage::Records { records, .. } => records.iter().any(|r| {
            matches!(
                RecordType::try_from(r.record_type),
                Ok(RecordType::Commit | RecordType::Prepare | RecordType::StateChange) | Err(_)
            )
        }),
        _ => true,
    }
}

impl Outbox {
    /// Records nothing waits for (a transaction's updates) are held until something that is
    /// waited for goes to the same backup, the trail is flushed, or `pair_delay` passes: a
    /// transaction's records then reach each backup in one message with one acknowledgement,
    /// not one per request. Order per backup is kept: a message is sent only after what is
    /// held for its backup.
    fn hold(&mut self, now: Duration, to: EndpointId, message: PairMessage) -> Option<PairMessage> {
        if awaited(&message) {
            return Some(message);
        }
        let queue = self.held.entry(to).or_default();
        match (queue.last_mut(), message) {
            (
                Some(PairMessage::Records {
                    tag,
                    records,
                    retain_from,
                }),
                PairMessage::Records {
                    tag: next_tag,
                    records: next,
                    retain_from: next_retain,
                },
            ) if *tag == next_tag
                && records.last().map(|r| r.lsn.0 + 1) == next.first().map(|r| r.lsn.0)
                && records
                    .iter()
                    .chain(&next)
                    .map(StreamRecord::size_bytes)
                    .sum::<usize>()
                    <= MAX_MERGED_BYTES =>
            {
                records.extend(next);
                *retain_from = next_retain;
            }
            (_, message) => queue.push(message),
        }
        self.since.get_or_insert(now);
        None
    }

    fn take(&mut self, to: EndpointId) -> Vec<PairMessage> {
        let held = self.held.remove(&to).unwrap_or_default();
        if self.held.is_empty() {
            self.since = None;
        }
        held
    }

    fn take_all(&mut self) -> Vec<(EndpointId, PairMessage)> {
        self.since = None;
        std::mem::take(&mut self.held)
            .into_iter()
            .flat_map(|(to, messages)| messages.into_iter().map(move |m| (to, m)))
            .collect()
    }
}

#[derive(Debug)]
struct OwnerState {
    owner: Box<Owner>,
    storage: StorageWorkers,
    outbox: Outbox,
    /// The commit state and counting of the same-node half last reported.
    reported: Option<(duplex_pair::CommitState, bool)>,
}

#[derive(Debug)]
enum Role {
    Backup(Box<BackupState>),
    /// The takeover runs on a blocking thread; the backup is kept for a retry.
    TakingOver(Box<BackupState>),
    Owner(OwnerState),
    Stopped,
}

/// Where a `Host`'s storage threads and lock attempts report: the CPU's event loop, tagged
/// with the LSG.
#[derive(Debug, Clone)]
pub(crate) struct Inbox {
    pub(crate) lsg: LsgId,
    pub(crate) tx: UnboundedSender<(LsgId, Internal)>,
}

impl Inbox {
    fn send(&self, internal: Internal) {
        // The loop is gone only when the process ends.
        let _ = self.tx.send((self.lsg, internal));
    }
}

/// Wall-clock milliseconds since the Unix epoch, for status only (the cores never see it).
fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One LSG's role on one CPU. See the module docs.
pub struct Host {
    config: HostConfig,
    transport: QuicTransport,
    /// The cores' time: monotonic, since this process started (the `Clock` boundary; the
    /// simulation uses a virtual one).
    clock: MonotonicClock,
    role: Role,
    inbox: Inbox,
    report: Box<dyn FnMut(Report)>,
    /// The primary this CPU follows (or is).
    primary: Option<EndpointId>,
    epoch_seen: OwnerEpoch,
    /// Peers the detector has up, with their incarnations.
    peers_up: BTreeMap<EndpointId, u64>,
    /// Fresh pairs after every CPU was lost: take the LSG at once, with no copy to wait for.
    recover: bool,
    buffered: VecDeque<(EndpointId, PairMessage)>,
    /// When the running takeover's lock was taken.
    acquired_at: Option<Duration>,
    exit: Option<Exit>,
    /// When the primary in `primary` was learned: a node death signalled before is stale.
    primary_since: Duration,
    /// Nodes whose liveness file the kernel released, with when: every CPU of them died.
    nodes_dead: BTreeMap<u16, Duration>,
    /// With no primary announced by then, try to recover the LSG (a cold start).
    cold_start_at: Option<Duration>,
    /// When the failure that the running takeover answers was first known (wall clock).
    detected: Option<SystemTime>,
    timelines: VecDeque<Timeline>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("local", &self.config.local)
            .field("role", &self.role)
            .field("primary", &self.primary)
            .finish_non_exhaustive()
    }
}

fn state_name(state: duplex_pair::CommitState) -> String {
    format!("{state:?}")
}

fn encode_reply(reply: &CpuReply) -> Bytes {
    match reply.encode() {
        Ok(bytes) => Bytes::from(bytes),
        // Replies hold only what a request carried in: encoding cannot fail in practice; the
        // client hears a malformed reply and resends.
        Err(_) => Bytes::new(),
    }
}

impl Host {
    fn new(
        config: HostConfig,
        transport: QuicTransport,
        inbox: Inbox,
        role: Role,
        recover: bool,
        report: Box<dyn FnMut(Report)>,
    ) -> Self {
        Host {
            config,
            transport,
            clock: MonotonicClock::new(),
            role,
            inbox,
            report,
            primary: None,
            epoch_seen: OwnerEpoch(0),
            peers_up: BTreeMap::new(),
            recover,
            buffered: VecDeque::new(),
            acquired_at: None,
            exit: None,
            primary_since: Duration::ZERO,
            nodes_dead: BTreeMap::new(),
            cold_start_at: None,
            detected: None,
            timelines: VecDeque::new(),
        }
    }

    fn new_backup(config: &HostConfig, transport: &QuicTransport) -> Box<BackupState> {
        Box::new(BackupState {
            backup: AuditBackup::new(
                config.lsg_id,
                transport.incarnation(),
                config.timing.rejoin_interval,
            ),
            acquire: Acquire::Idle,
            next_try_at: Duration::ZERO,
            gathering: None,
        })
    }

    /// A backup: it joins whichever owner announces itself. With `cold_start`, a backup that
    /// hears of no primary for `Timing::cold_start_wait` times its rank in the LSG's CPU list
    /// recovers the LSG itself if nobody holds it (the whole cluster was down).
    pub(crate) fn backup(
        config: HostConfig,
        transport: QuicTransport,
        inbox: Inbox,
        cold_start: bool,
        report: Box<dyn FnMut(Report)>,
    ) -> Self {
        let role = Role::Backup(Self::new_backup(&config, &transport));
        let rank = config
            .cpus
            .iter()
            .position(|c| *c == config.local)
            .unwrap_or(config.cpus.len());
        let wait = config.timing.cold_start_wait * (u32::try_from(rank).unwrap_or(u32::MAX) + 1);
        let mut host = Self::new(config, transport, inbox, role, false, report);
        if cold_start {
            host.cold_start_at = Some(host.now() + wait);
        }
        host
    }

    /// Fresh pairs after every CPU that held the LSG was lost: takes the LSG over at once and
    /// recovers from the trail (no copy of the stream survives anywhere).
    pub(crate) fn recover(
        config: HostConfig,
        transport: QuicTransport,
        inbox: Inbox,
        report: Box<dyn FnMut(Report)>,
    ) -> Self {
        let role = Role::Backup(Self::new_backup(&config, &transport));
        Self::new(config, transport, inbox, role, true, report)
    }

    /// Creates the LSG with `volumes` and `rows` and owns it.
    pub(crate) async fn create_and_own(
        config: HostConfig,
        transport: QuicTransport,
        inbox: Inbox,
        volumes: Vec<String>,
        rows: Vec<Row>,
        report: Box<dyn FnMut(Report)>,
    ) -> Result<Self, HostError> {
        let dir = config.lsg_dir.clone();
        let (lsg_id, lsg_config) = (config.lsg_id, config.lsg_config);
        let messages = config
            .owner_config(OwnerEpoch(0), 0, lsg_config.max_record_bytes)
            .messages;
        let created = tokio::task::spawn_blocking(move || {
            let names: Vec<&str> = volumes.iter().map(String::as_str).collect();
            create_lsg(&dir, lsg_id, lsg_config, &names, &rows, messages)
        })
        .await
        .map_err(|e| HostError::Task(e.to_string()))??;
        let mut host = Self::new(config, transport, inbox, Role::Stopped, false, report);
        let (lsg, start) = created;
        host.become_owner_of(lsg, start)?;
        Ok(host)
    }

    fn become_owner_of(
        &mut self,
        lsg: LogStorageGroup<FileStore>,
        start: OwnerStart,
    ) -> Result<(), HostError> {
        let config = self.config.owner_config(
            lsg.owner_epoch(),
            self.transport.incarnation(),
            lsg.config().max_record_bytes,
        );
        let owner = LsgOwner::new(config, lsg, start, self.now());
        self.start_owner(Box::new(owner))
            .map_err(|source| HostError::Io {
                what: "starting the storage threads".into(),
                source,
            })
    }

    fn start_owner(&mut self, owner: Box<Owner>) -> Result<(), std::io::Error> {
        let lsg = self.inbox.lsg;
        let storage = StorageWorkers::start(
            Arc::clone(owner.lsg()),
            self.inbox.tx.clone(),
            move |done| (lsg, Internal::Storage(done)),
        )?;
        self.epoch_seen = self.epoch_seen.max(owner.epoch());
        self.primary = Some(self.config.local);
        self.role = Role::Owner(OwnerState {
            owner,
            storage,
            outbox: Outbox::default(),
            reported: None,
        });
        let peers: Vec<EndpointId> = self.peers_up.keys().copied().collect();
        for peer in peers {
            self.announce(peer);
        }
        Ok(())
    }

    /// The time since this process started: the cores' `now`.
    fn now(&self) -> Duration {
        self.clock.now()
    }

    pub fn transport(&self) -> &QuicTransport {
        &self.transport
    }

    fn role_name(&self) -> &'static str {
        match (&self.role, self.recover) {
            (Role::Owner(_), _) => "owner",
            (Role::Backup(_) | Role::TakingOver(_), false) => "backup",
            (Role::Backup(_) | Role::TakingOver(_), true) => "recover",
            (Role::Stopped, _) => "stopped",
        }
    }

    /// Reports that this CPU runs its role (once, when the CPU's loop starts).
    pub(crate) fn report_ready(&mut self) {
        let role = self.role_name().to_string();
        (self.report)(Report::Ready {
            endpoint: self.config.local.to_string(),
            role,
            incarnation: self.transport.incarnation(),
        });
    }

    pub(crate) fn lsg_id(&self) -> LsgId {
        self.config.lsg_id
    }

    pub(crate) fn lsg_config(&self) -> duplex_lsg::LsgConfig {
        self.config.lsg_config
    }

    /// How often this role wants a tick.
    pub(crate) fn tick_every(&self) -> Duration {
        match self.role {
            Role::Owner(_) => self.config.timing.owner_tick,
            _ => self.config.timing.backup_tick,
        }
    }

    /// Why the CPU must end, once: the owner stopped or a takeover failed.
    pub(crate) fn take_exit(&mut self) -> Option<Exit> {
        self.exit.take()
    }

    // ---- events ----------------------------------------------------------------------

    pub(crate) fn on_peer_up(&mut self, peer: EndpointId, incarnation: u64) {
        self.peers_up.insert(peer, incarnation);
        if peer.node != 0 {
            self.nodes_dead.remove(&peer.node);
        }
        if matches!(self.role, Role::Owner(_)) {
            self.announce(peer);
        }
    }

    pub(crate) fn on_peer_down_event(&mut self, peer: EndpointId, incarnation: u64) {
        let now = self.now();
        if self.peers_up.get(&peer) == Some(&incarnation) {
            self.peers_up.remove(&peer);
        }
        if self.primary == Some(peer) && self.detected.is_none() {
            self.detected = Some(SystemTime::now());
        }
        self.on_peer_down(now, peer, incarnation);
    }

    /// Every CPU of `node` died: the kernel released its liveness file.
    pub(crate) fn on_node_dead(&mut self, node: u16) {
        let now = self.now();
        self.nodes_dead.insert(node, now);
        if self.primary.is_some_and(|p| p.node == node) && self.detected.is_none() {
            self.detected = Some(SystemTime::now());
        }
        if let Role::Backup(b) = &mut self.role
            && let Some(g) = b.gathering.as_mut()
        {
            for cpu in self.config.cpus.iter().filter(|c| c.node == node) {
                g.copies.give_up_on(*cpu);
            }
        }
        self.maybe_acquire(now);
    }

    /// The state of this role, for `duplex status`.
    pub(crate) fn status(&self) -> LsgStatus {
        let mut status = LsgStatus {
            lsg: self.config.lsg_id,
            role: self.role_name().to_string(),
            primary: self.primary,
            epoch: self.epoch_seen,
            state: None,
            home_counts: false,
            lsn: 0,
            durable_lsn: 0,
            lag_records: None,
            last_checkpoint_lsn: 0,
            active_transactions: 0,
            in_doubt: 0,
            takeovers: self.timelines.iter().cloned().collect(),
        };
        match &self.role {
            Role::Owner(o) => {
                let p = o.owner.primary().status();
                status.epoch = o.owner.epoch();
                status.state = Some(state_name(p.state));
                status.home_counts = p.home_counts;
                status.lsn = p.next_lsn.0;
                status.durable_lsn = p.durable.0;
                status.lag_records = p
                    .held
                    .get(&BackupRole::Remote)
                    .map(|held| p.next_lsn.0.saturating_sub(held.0 + 1));
                status.last_checkpoint_lsn = o.owner.last_checkpoint().0;
                status.active_transactions = o.owner.active_transactions();
                status.in_doubt = o.owner.in_doubt().count();
            }
            Role::Backup(b) | Role::TakingOver(b) => status.lsn = b.backup.held().0,
            Role::Stopped => {}
        }
        status
    }

    pub(crate) fn on_client_request(
        &mut self,
        from: EndpointId,
        id: RequestId,
        request: ClientRequest,
    ) {
        let now = self.now();
        let span = debug_span!(
            "client_request",
            lsg = %self.config.lsg_id,
            %from,
            client = request.client.0,
            seq = request.seq.0,
        );
        let _entered = span.enter();
        if let Op::Prepare { .. } = request.op {
            // No coordinator exists yet: a prepared transaction would hold its locks until a
            // decision nobody can give.
            let reason =
                "prepare is for a two-phase commit coordinator, which is not built yet".to_string();
            let reply = CpuReply::Lsg(ClientReply::Error(OpError::Malformed { reason }));
            self.respond(from, id, &reply);
            return;
        }
        if let Some(reason) = self.outside_range(&request.op) {
            let reply = CpuReply::Lsg(ClientReply::Error(OpError::Malformed { reason }));
            self.respond(from, id, &reply);
            return;
        }
        match &mut self.role {
            Role::Owner(o) => o.owner.on_request(now, (from, id), request),
            _ => {
                let local = self.config.local;
                let primary = self.primary.filter(|p| *p != local);
                let reason = match primary {
                    Some(p) => format!("{local} is a backup; the primary is {p}"),
                    None => format!("{local} is a backup and knows no primary yet"),
                };
                let reply = CpuReply::Redirect {
                    lsg: self.config.lsg_id,
                    primary,
                    reason,
                };
                self.respond(from, id, &reply);
            }
        }
    }

    /// Why `op`'s key is not its volume's (see `HostConfig::key_ranges`).
    fn outside_range(&self, op: &Op) -> Option<String> {
        let (volume, key) = match op {
            Op::Get { volume, key } | Op::Put { volume, key, .. } | Op::Delete { volume, key } => {
                (volume, key)
            }
            _ => return None,
        };
        let range = self
            .config
            .key_ranges
            .iter()
            .find(|r| &r.volume == volume)?;
        (!range.holds(key)).then(|| {
            format!(
                "key {} is outside volume {volume}'s range [{}, {}): route it by the cluster config",
                String::from_utf8_lossy(key),
                String::from_utf8_lossy(&range.start),
                range
                    .end
                    .as_deref()
                    .map_or("end".into(), String::from_utf8_lossy)
            )
        })
    }

    fn respond(&self, to: EndpointId, id: RequestId, reply: &CpuReply) {
        if let Err(e) = self.transport.respond(to, id, encode_reply(reply)) {
            debug!(%to, error = %e, "reply not sent");
        }
    }

    pub(crate) fn on_pair_message(&mut self, from: EndpointId, message: PairMessage) {
        let now = self.now();
        if message.tag().lsg != self.config.lsg_id || !self.config.cpus.contains(&from) {
            return;
        }
        match &mut self.role {
            Role::Owner(o) => o.owner.on_pair_message(now, from, message),
            Role::Backup(b) => {
                if let (
                    Some(g),
                    PairMessage::FenceAck {
                        tag,
                        records,
                        complete,
                    },
                ) = (b.gathering.as_mut(), &message)
                {
                    if g.copies.on_part(from, tag.epoch, records, *complete) {
                        // A copy complete: take over as soon as the last is in.
                        self.gather(now);
                    }
                    return;
                }
                if let PairMessage::Fence { tag, .. } = &message
                    && tag.epoch >= self.epoch_seen
                    && b.gathering.is_none()
                {
                    // A new owner: follow it.
                    self.epoch_seen = tag.epoch;
                    if self.primary != Some(from) {
                        self.primary = Some(from);
                        self.primary_since = now;
                        self.detected = None;
                    }
                    self.cold_start_at = None;
                }
                b.backup.on_message(now, from, message);
            }
            Role::TakingOver(_) => {
                if self.buffered.len() < MAX_BUFFERED_MESSAGES {
                    self.buffered.push_back((from, message));
                }
            }
            Role::Stopped => {}
        }
    }

    pub(crate) fn on_notice(&mut self, from: EndpointId, notice: Notice) {
        let Notice::Primary { lsg, epoch } = notice;
        if lsg != self.config.lsg_id
            || epoch < self.epoch_seen
            || from == self.config.local
            || !self.config.cpus.contains(&from)
        {
            return;
        }
        match &mut self.role {
            Role::Backup(b) if b.gathering.is_none() => {
                self.epoch_seen = epoch;
                self.cold_start_at = None;
                if self.primary != Some(from) || b.backup.primary() != Some(from) {
                    self.primary = Some(from);
                    self.primary_since = self.clock.now();
                    self.detected = None;
                    b.backup.join(from);
                    info!(primary = %from, %epoch, "joining the primary");
                    (self.report)(Report::Joined {
                        primary: from.to_string(),
                        epoch: epoch.0,
                    });
                }
            }
            Role::Owner(o) if epoch > o.owner.epoch() => {
                // Our next flush will find the higher epoch and stop us; say so now.
                warn!(%from, %epoch, own = %o.owner.epoch(), "another CPU owns the LSG at a higher epoch");
            }
            _ => {}
        }
    }

    fn on_peer_down(&mut self, now: Duration, peer: EndpointId, incarnation: u64) {
        match &mut self.role {
            Role::Owner(o) => o.owner.on_peer_down(now, peer, incarnation),
            Role::Backup(b) => {
                if let Some(g) = b.gathering.as_mut() {
                    g.copies.give_up_on(peer);
                }
                let local = self.config.local;
                if b.acquire == Acquire::Waiting
                    && self.primary == Some(peer)
                    && peer.node == local.node
                    && peer != local
                {
                    // The detector declared the local primary down, yet it holds the lock:
                    // stopped or hung. End it, so the lock is released and we take over.
                    match node::end_local_cpu(&self.config.run_dir, peer) {
                        Ok(Ended::Killed { pid }) => {
                            warn!(cpu = %peer, pid, "ended a local CPU the detector declared down");
                            (self.report)(Report::EndedLocalCpu {
                                cpu: peer.to_string(),
                                pid,
                            });
                        }
                        Ok(Ended::NotRunning) => {}
                        Err(e) => warn!(cpu = %peer, error = %e, "could not end a local CPU"),
                    }
                }
            }
            Role::TakingOver(_) | Role::Stopped => {}
        }
    }

    pub(crate) fn on_internal(&mut self, internal: Internal) {
        let now = self.now();
        match internal {
            Internal::Storage(done) => {
                let Role::Owner(o) = &mut self.role else {
                    return;
                };
                match done {
                    StorageDone::TrailDurable(lsn) => o.owner.on_trail_durable(now, lsn),
                    StorageDone::VolumesFlushed(lsn) => o.owner.on_volumes_flushed(now, lsn),
                    StorageDone::Failed(e) => o.owner.on_storage_failed(e),
                }
            }
            Internal::Acquired { result, waited } => self.on_acquired(now, *result, waited),
            Internal::TakeoverDone(result) => self.on_takeover_done(*result),
        }
    }

    pub(crate) fn on_tick(&mut self) {
        let now = self.now();
        match &mut self.role {
            Role::Owner(o) => o.owner.tick(now),
            Role::Backup(b) => {
                b.backup.tick(now);
                self.gather(now);
                self.maybe_acquire(now);
            }
            Role::TakingOver(_) | Role::Stopped => {}
        }
    }

    // ---- actions ---------------------------------------------------------------------

    pub(crate) fn drain(&mut self) {
        let now = self.now();
        let pair_delay = self.config.timing.pair_delay;
        match &mut self.role {
            Role::Owner(o) => {
                let mut stopped = None;
                while let Some(action) = o.owner.poll_action() {
                    match action {
                        OwnerAction::Reply { to, reply } => {
                            let _span = debug_span!("reply", to = %to.0).entered();
                            if let ClientReply::Outcome(Reply::Committed(_)) = &reply {
                                metrics::counter!("duplex_commits_total", "lsg" => self.config.lsg_id.to_string())
                                    .increment(1);
                            }
                            let reply = encode_reply(&CpuReply::Lsg(reply));
                            if let Err(e) = self.transport.respond(to.0, to.1, reply) {
                                debug!(to = %to.0, error = %e, "reply not sent");
                            }
                        }
                        OwnerAction::Send { to, message } => {
                            if let Some(message) = o.outbox.hold(now, to, message) {
                                for held in o.outbox.take(to) {
                                    send_pair(&self.transport, to, &held);
                                }
                                send_pair(&self.transport, to, &message);
                            }
                        }
                        OwnerAction::FlushTrail { through } => {
                            // The backups get the records before the trail is durable with
                            // them, so a takeover finds its copy reaching the trail's end.
                            for (to, held) in o.outbox.take_all() {
                                send_pair(&self.transport, to, &held);
                            }
                            o.storage.flush_trail(through);
                        }
                        OwnerAction::FlushVolumes { checkpoint_lsn } => {
                            o.storage.flush_volumes(checkpoint_lsn);
                        }
                        OwnerAction::TruncateTrail { below } => o.storage.truncate_trail(below),
                        OwnerAction::StateChanged { state, home_counts } => {
                            debug!(?state, home_counts, "commit state changed");
                        }
                        OwnerAction::Stopped { reason } => stopped = Some(reason),
                    }
                }
                if o.outbox
                    .since
                    .is_some_and(|at| now.saturating_sub(at) >= pair_delay)
                {
                    for (to, held) in o.outbox.take_all() {
                        send_pair(&self.transport, to, &held);
                    }
                }
                // The same-node half starting to count is no state change of the primary's, so
                // both inputs of the rule are compared here and reported when either moves.
                let now_state = (o.owner.state(), o.owner.primary().home_counts());
                if stopped.is_none() && o.reported != Some(now_state) {
                    o.reported = Some(now_state);
                    (self.report)(Report::State {
                        state: state_name(now_state.0),
                        home_counts: now_state.1,
                    });
                }
                if let Some(reason) = stopped {
                    (self.report)(Report::Stopped {
                        reason: reason.clone(),
                    });
                    self.role = Role::Stopped;
                    self.exit = Some(Exit::Stopped(reason));
                }
            }
            Role::Backup(b) | Role::TakingOver(b) => {
                let mut sends = Vec::new();
                while let Some(BackupAction::Send { to, message }) = b.backup.poll_action() {
                    sends.push((to, message));
                }
                // An acknowledgement says "I hold everything up to here": of several to one
                // primary in one turn, the last says all the earlier ones do.
                let mut last_ack: BTreeMap<EndpointId, usize> = BTreeMap::new();
                for (i, (to, message)) in sends.iter().enumerate() {
                    if matches!(message, PairMessage::Ack { .. }) {
                        last_ack.insert(*to, i);
                    }
                }
                for (i, (to, message)) in sends.iter().enumerate() {
                    let superseded = matches!(message, PairMessage::Ack { .. })
                        && last_ack.get(to).is_some_and(|last| {
                            *last != i && {
                                let later = &sends[*last].1;
                                later.tag() == message.tag()
                            }
                        });
                    if !superseded {
                        send_pair(&self.transport, *to, message);
                    }
                }
            }
            Role::Stopped => {}
        }
    }

    fn announce(&self, peer: EndpointId) {
        let Role::Owner(o) = &self.role else { return };
        let notice = Notice::Primary {
            lsg: self.config.lsg_id,
            epoch: o.owner.epoch(),
        };
        if let Ok(bytes) = notice.encode()
            && let Err(e) = self.transport.send(peer, Bytes::from(bytes))
        {
            debug!(%peer, error = %e, "notice not sent");
        }
    }

    // ---- taking over -----------------------------------------------------------------

    /// Whether this backup should go for the LSG's lock now, and how.
    fn acquire_mode(&self, now: Duration, b: &BackupState) -> Option<OpenMode> {
        if b.gathering.is_some() || b.acquire != Acquire::Idle || now < b.next_try_at {
            return None;
        }
        if self.recover {
            return Some(OpenMode::WriteWaiting);
        }
        let Some(primary) = self.primary else {
            // A cold start: nobody announced a primary in time; whoever holds no lock may
            // recover (the lock says whether anybody owns the LSG).
            return self
                .cold_start_at
                .is_some_and(|at| now >= at)
                .then_some(OpenMode::Write);
        };
        if primary == self.config.local {
            return None;
        }
        if primary.node == self.config.local.node {
            return Some(OpenMode::WriteWaiting);
        }
        // The kernel's release of the node's liveness file is the fast signal; the backup
        // node's designated CPU (the one the primary streams to) acts on it, the others wait
        // for the detector, so the CPU with the copy of the stream normally takes over.
        let released = self.config.backup_node_of(primary) == Some(self.config.local)
            && self
                .nodes_dead
                .get(&primary.node)
                .is_some_and(|at| *at >= self.primary_since);
        let node_down = self
            .config
            .cpus
            .iter()
            .filter(|c| c.node == primary.node)
            .all(|c| !self.peers_up.contains_key(c));
        (released || node_down).then_some(OpenMode::Write)
    }

    fn maybe_acquire(&mut self, now: Duration) {
        let Role::Backup(b) = &self.role else { return };
        let Some(mode) = self.acquire_mode(now, b) else {
            return;
        };
        let (dir, lsg_config) = (self.config.lsg_dir.clone(), self.config.lsg_config);
        let done = self.inbox.clone();
        // A thread of its own: a `WriteWaiting` open may wait for as long as the owner lives,
        // and must not hold a runtime thread (or the runtime's shutdown) meanwhile.
        let spawned = std::thread::Builder::new()
            .name("lsg-acquire".into())
            .spawn(move || {
                let started = Instant::now();
                let result = LogStorageGroup::open(&dir, lsg_config, mode);
                done.send(Internal::Acquired {
                    result: Box::new(result),
                    waited: started.elapsed(),
                });
            });
        let Role::Backup(b) = &mut self.role else {
            return;
        };
        match spawned {
            Ok(_) => {
                b.acquire = if mode == OpenMode::WriteWaiting {
                    Acquire::Waiting
                } else {
                    Acquire::Trying
                };
            }
            Err(e) => {
                warn!(error = %e, "cannot start a thread to acquire the LSG");
                b.next_try_at = now + self.config.timing.acquire_poll;
            }
        }
    }

    fn on_acquired(
        &mut self,
        now: Duration,
        result: Result<LogStorageGroup<FileStore>, LsgError>,
        waited: Duration,
    ) {
        let retry = self.config.timing.acquire_poll;
        let Role::Backup(b) = &mut self.role else {
            // Owning already (cannot happen: one attempt at a time); the handle is dropped.
            return;
        };
        b.acquire = Acquire::Idle;
        let cold_start = self.primary.is_none() && self.cold_start_at.is_some();
        let lsg = match result {
            Ok(lsg) => lsg,
            Err(LsgError::OwnedBy { .. }) if cold_start => {
                // A live owner holds the LSG: it announces itself to us; no cold start.
                self.cold_start_at = None;
                return;
            }
            Err(LsgError::OwnedBy { .. }) => {
                b.next_try_at = now + retry;
                return;
            }
            Err(e) => {
                warn!(error = %e, "opening the LSG for writing failed");
                b.next_try_at = now + retry;
                return;
            }
        };
        if cold_start {
            // Nobody held the LSG and nobody announced a primary: every CPU that held it is
            // gone, and with it every copy of the stream.
            info!("no primary and nobody holds the LSG: recovering it from the trail");
            self.cold_start_at = None;
            self.recover = true;
        }
        let epoch = lsg.owner_epoch();
        self.epoch_seen = self.epoch_seen.max(epoch);
        b.backup.take_over(epoch);
        let fenced_at = SystemTime::now();
        let detected = self.detected.take().unwrap_or(fenced_at).min(fenced_at);
        self.timelines.push_back(Timeline {
            detected_unix_ms: unix_ms(detected),
            fenced_unix_ms: unix_ms(fenced_at),
            recovered_unix_ms: None,
            ready_unix_ms: None,
            epoch,
            from: self.primary.filter(|p| *p != self.config.local),
            start: None,
        });
        if self.timelines.len() > MAX_TIMELINES {
            self.timelines.pop_front();
        }
        let from = Lsn(lsg.audit().next_lsn().0.saturating_sub(1).max(1));
        let tag = PairTag {
            lsg: self.config.lsg_id,
            epoch,
            incarnation: self.transport.incarnation(),
        };
        let fence = match (PairMessage::Fence { tag, from }).encode() {
            Ok(bytes) => Bytes::from(bytes),
            Err(e) => {
                warn!(error = %e, "cannot encode a fence");
                return;
            }
        };
        // The backups up, not the owner we take over from: holding its lock, we know it is
        // dead (the detector may not have said so yet).
        let local = self.config.local;
        let previous = self.primary;
        let waiting_for: BTreeSet<EndpointId> = self
            .config
            .cpus
            .iter()
            .copied()
            .filter(|c| {
                *c != local
                    && Some(*c) != previous
                    && self.peers_up.contains_key(c)
                    && !self.nodes_dead.contains_key(&c.node)
            })
            .collect();
        info!(%epoch, waited_ms = waited.as_secs_f64() * 1e3, ?waiting_for, "holding the LSG: gathering the backups' copies");
        (self.report)(Report::Acquired {
            epoch: epoch.0,
            waited_ms: waited.as_secs_f64() * 1e3,
        });
        b.gathering = Some(Box::new(Gathering {
            lsg,
            copies: Copies::new(waiting_for),
            fence,
            resend_at: now,
            deadline: now + self.config.timing.fence_deadline,
            acquired_at: now,
        }));
        self.gather(now);
    }

    /// Sends the fence to the backups that have not answered; takes over once all have (or at
    /// the deadline).
    fn gather(&mut self, now: Duration) {
        let Role::Backup(b) = &mut self.role else {
            return;
        };
        let Some(g) = b.gathering.as_mut() else {
            return;
        };
        if now >= g.resend_at {
            g.resend_at = now + self.config.timing.fence_resend;
            for other in g.copies.waiting_for() {
                if let Err(e) = self
                    .transport
                    .stream_send(*other, PAIR_STREAM, g.fence.clone())
                {
                    debug!(to = %other, error = %e, "fence not sent");
                }
            }
        }
        if g.copies.all_in() || now >= g.deadline {
            self.start_takeover();
        }
    }

    fn start_takeover(&mut self) {
        let role = std::mem::replace(&mut self.role, Role::Stopped);
        let Role::Backup(mut b) = role else {
            self.role = role;
            return;
        };
        let Some(g) = b.gathering.take() else {
            self.role = Role::Backup(b);
            return;
        };
        let mut g = *g;
        // A copy still arriving when the time ran out is incomplete: it cannot vouch.
        let gathered = std::mem::take(&mut g.copies).into_complete();
        let own = Chain::of_backup(&b.backup);
        let own = (!own.records.is_empty()).then_some(own);
        let incarnation = self.transport.incarnation();
        let owner_config = self.config.owner_config(
            g.lsg.owner_epoch(),
            incarnation,
            g.lsg.config().max_record_bytes,
        );
        let local = self.config.local;
        let backup_node = self
            .primary
            .filter(|p| *p != local)
            .and_then(|p| self.config.backup_node_of(p))
            .filter(|b| *b != local);
        let taker = Taker {
            incarnation,
            backup_node,
            memory_lost_everywhere: self.recover,
        };
        let copies = gathered.len();
        let done = self.inbox.clone();
        self.acquired_at = Some(g.acquired_at);
        debug!(?taker, copies, own = own.is_some(), "taking over");
        self.role = Role::TakingOver(b);
        let clock = self.clock;
        tokio::task::spawn_blocking(move || {
            let t0 = Instant::now();
            let result = take_over::<FileStore, ReplyTo>(
                g.lsg,
                taker,
                own,
                gathered,
                owner_config,
                clock.now(),
            )
            .map(|(owner, report)| (owner, report, copies, t0.elapsed()));
            done.send(Internal::TakeoverDone(Box::new(result)));
        });
    }

    fn on_takeover_done(&mut self, result: Result<TakenOver, TakeoverError>) {
        let now = self.now();
        let role = std::mem::replace(&mut self.role, Role::Stopped);
        let Role::TakingOver(mut b) = role else {
            self.role = role;
            return;
        };
        match result {
            Ok((owner, report, copies, recovery)) => {
                let recovered_at = SystemTime::now();
                let start = match report.start {
                    StartKind::Warm => "warm",
                    StartKind::Cold => "cold",
                };
                let owner = Box::new(owner);
                if let Err(e) = self.start_owner(owner) {
                    let reason = format!("cannot start the storage threads: {e}");
                    (self.report)(Report::Stopped {
                        reason: reason.clone(),
                    });
                    self.exit = Some(Exit::Stopped(reason));
                    return;
                }
                self.recover = false;
                let lsg = self.config.lsg_id.to_string();
                metrics::counter!("duplex_takeovers_total", "lsg" => lsg.clone(), "start" => start)
                    .increment(1);
                if let Some(at) = self.acquired_at {
                    metrics::histogram!("duplex_takeover_seconds", "lsg" => lsg)
                        .record(now.saturating_sub(at).as_secs_f64());
                }
                if let Some(t) = self.timelines.back_mut() {
                    t.recovered_unix_ms = Some(unix_ms(recovered_at));
                    t.ready_unix_ms = Some(unix_ms(SystemTime::now()));
                    t.start = Some(start.to_string());
                }
                (self.report)(Report::Owner {
                    epoch: report.epoch.0,
                    start: start.into(),
                    trail_end: report.trail_end.0,
                    reappended: report.reappended,
                    records_read: report.records_read,
                    redone: report.redone,
                    undone: report.undone,
                    in_doubt: report.in_doubt,
                    copies,
                    recovery_ms: recovery.as_secs_f64() * 1e3,
                    takeover_ms: self
                        .acquired_at
                        .take()
                        .map_or(0.0, |at| now.saturating_sub(at).as_secs_f64() * 1e3),
                });
                let buffered = std::mem::take(&mut self.buffered);
                if let Role::Owner(o) = &mut self.role {
                    for (from, message) in buffered {
                        o.owner.on_pair_message(now, from, message);
                    }
                }
            }
            Err(TakeoverError::CopyMissing { from }) => {
                // Let the LSG go (the handle was dropped with the error) and try again: the
                // backup node's pairs may answer, or take it over themselves.
                let reason = format!(
                    "no complete copy of the stream at hand (backup node {from:?} did not answer)"
                );
                warn!(%reason, "takeover deferred");
                (self.report)(Report::TakeoverDeferred { reason });
                self.buffered.clear();
                b.next_try_at = now + self.config.timing.copy_missing_retry;
                self.role = Role::Backup(b);
            }
            Err(e) => {
                let reason = format!("takeover failed: {e}");
                warn!(%reason);
                (self.report)(Report::Stopped {
                    reason: reason.clone(),
                });
                self.exit = Some(Exit::Stopped(reason));
            }
        }
    }
}

fn send_pair(transport: &QuicTransport, to: EndpointId, message: &PairMessage) {
    match message.encode() {
        Ok(bytes) => match transport.stream_send(to, PAIR_STREAM, Bytes::from(bytes)) {
            Ok(_) => {}
            Err(TransportError::Unreachable { .. }) => {}
            Err(e) => debug!(%to, error = %e, "pair message not sent"),
        },
        Err(e) => warn!(%to, error = %e, "cannot encode a pair message"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use duplex_lsg::LsgId;

    fn records(tag: PairTag, from: u64, types: &[RecordType]) -> PairMessage {
        PairMessage::Records {
            tag,
            records: types
                .iter()
                .enumerate()
                .map(|(i, t)| StreamRecord {
                    lsn: Lsn(from + i as u64),
                    record_type: *t as u8,
                    flags: 0,
                    payload: vec![1, 2, 3],
                })
                .collect(),
            retain_from: Lsn(from),
        }
    }

    fn lsns(m: &PairMessage) -> Vec<u64> {
        match m {
            PairMessage::Records { records, .. } => records.iter().map(|r| r.lsn.0).collect(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn the_outbox_holds_updates_until_something_awaited_and_keeps_their_order() {
        let tag = PairTag {
            lsg: LsgId(1),
            epoch: OwnerEpoch(2),
            incarnation: 7,
        };
        let (a, b) = (EndpointId::new(1, 1), EndpointId::new(2, 0));
        let mut out = Outbox::default();
        let now = Duration::from_millis(10);
        // Two requests' updates to two backups: held, and merged per backup.
        for to in [a, b] {
            assert!(
                out.hold(now, to, records(tag, 5, &[RecordType::Update]))
                    .is_none()
            );
            assert!(
                out.hold(now, to, records(tag, 6, &[RecordType::Update]))
                    .is_none()
            );
        }
        assert_eq!(out.since, Some(now));
        // A commit is awaited: it goes at once, after what is held for its backup.
        let commit = records(tag, 7, &[RecordType::Commit]);
        let passed = out.hold(now, a, commit.clone());
        assert_eq!(passed, Some(commit));
        let held = out.take(a);
        assert_eq!(held.len(), 1, "contiguous updates merge into one message");
        assert_eq!(lsns(&held[0]), vec![5, 6]);
        // The other backup's records stay held until a flush or the delay takes them.
        assert!(out.since.is_some());
        let rest = out.take_all();
        assert_eq!(rest.len(), 1);
        assert_eq!((rest[0].0, lsns(&rest[0].1)), (b, vec![5, 6]));
        assert_eq!(out.since, None);
        // Anything but records (a resync) is never held.
        let resync = PairMessage::Resync { tag, from: Lsn(1) };
        assert_eq!(out.hold(now, a, resync.clone()), Some(resync));
        // Records that do not continue the held ones are not merged with them.
        assert!(
            out.hold(now, a, records(tag, 9, &[RecordType::Update]))
                .is_none()
        );
        assert!(
            out.hold(now, a, records(tag, 12, &[RecordType::Update]))
                .is_none()
        );
        assert_eq!(out.take(a).len(), 2);
    }
}
