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

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use duplex_audit_pair::BackupRole;
use duplex_audit_pair::{AuditBackup, BackupAction};
use duplex_lsg::{FileStore, LogStorageGroup, LsgError, LsgId, OwnerEpoch};
use duplex_owner::takeover::{Copies, TakeoverError, TakeoverReport};
use duplex_owner::{ClientReply, ClientRequest, LsgOwner, Op, OpError, OwnerAction, OwnerStart};
use duplex_pair::{Clock, MonotonicClock, PairMessage, Reply};
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

mod outbox;
mod takeover;

use outbox::Outbox;

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

    /// A stop asked for by the operator: an owner sends what its outbox holds and makes its
    /// trail durable, so every commit it acknowledged from memory survives the whole cluster
    /// stopping. Waits on the disk: only for the last thing the process does.
    pub(crate) fn flush_for_stop(&mut self) {
        let Role::Owner(o) = &mut self.role else {
            return;
        };
        for (to, held) in o.outbox.take_all() {
            send_pair(&self.transport, to, &held);
        }
        match o.owner.lsg().audit().flush() {
            Ok(lsn) => {
                info!(lsg = %self.config.lsg_id, durable = %lsn, "trail flushed for the stop")
            }
            Err(e) => {
                warn!(lsg = %self.config.lsg_id, error = %e, "the trail could not be flushed for the stop")
            }
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
