//! A deterministic simulation of one LSG served by process pairs: two nodes of two CPUs each,
//! shared storage ([`SimStore`]), the simulated cluster transport ([`SimNetwork`]) and clients
//! running bank transfers, under process kills, node kills, power losses, partitions and lost
//! messages. One seed drives everything: the store's and the network's seeds and every fault
//! are drawn from it, every component runs on the one virtual clock the network keeps, and
//! nothing iterates a hash map, so a seed replays its run exactly.
//!
//! The driver here stands in for node services (issue 9): it runs each CPU's owner or backup,
//! does their storage work a little later (as a storage thread would), and decides takeovers
//! the way the takeover order says: the same-node backup half at once when a CPU dies, the
//! backup node's pairs only when every CPU of the home node is dead, fresh pairs from the trail
//! after a power loss.
//!
//! After every step each owner and backup `validate()`s. At the end [`run`] checks the bank:
//! the total is unchanged, every balance is what the committed transfers (one marker record
//! each) make it, every transfer a client saw committed is there exactly once. A transfer
//! acknowledged from memory (normal state) may be lost only to a power loss of the whole
//! simulated host, which takes both failure domains at once; its receipt said so.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use duplex_audit_pair::{AuditBackup, BackupAction, PrimaryConfig};
use duplex_lsg::{
    LogStorageGroup, LsgConfig, LsgId, LsgOptions, Lsn, OpenMode, OwnerEpoch, SimStore,
};
use duplex_pair::stream::{PairMessage, PairTag};
use duplex_pair::{ClientId, CommitState, MessageTableLimits, Reply, RequestSeq, TxId};
use duplex_transport::{
    EndpointId, Event, Path, PeerEvent, RequestId, SimConfig, SimNetwork, SimTransport, StreamId,
    Transport,
};
use duplex_volume_pair::LockConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::owner::{LsgOwner, OwnerAction, OwnerConfig, OwnerStart};
use crate::protocol::{ClientReply, ClientRequest, Op, OpError};
use crate::takeover::{Chain, StartKind, take_over};

const LSG: LsgId = LsgId(1);
const ACCOUNTS: &str = "accounts";
const MARKERS: &str = "markers";
const PAIR_STREAM: StreamId = StreamId(1);
const QUANTUM: Duration = Duration::from_micros(500);
const START_BALANCE: i64 = 1_000;

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimOptions {
    pub seed: u64,
    pub clients: usize,
    pub accounts: usize,
    /// Transfers each client runs to completion.
    pub transfers_per_client: usize,
    /// Faults are injected until this much virtual time has passed.
    pub fault_time: Duration,
    /// The run gives up (and fails) after this much virtual time.
    pub time_limit: Duration,
    /// Flush before every acknowledgement.
    pub paranoid: bool,
    pub loss_probability: f64,
    /// Faults of each kind a run may see at most.
    pub max_faults: usize,
}

impl SimOptions {
    pub fn new(seed: u64) -> Self {
        SimOptions {
            seed,
            clients: 4,
            accounts: 12,
            transfers_per_client: 12,
            fault_time: Duration::from_secs(3),
            time_limit: Duration::from_secs(60),
            paranoid: seed % 5 == 0,
            loss_probability: 0.002,
            max_faults: 4,
        }
    }
}

/// What a run saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimReport {
    pub seed: u64,
    pub virtual_time: Duration,
    pub transfers_committed: usize,
    /// Acknowledged from memory and lost to a power loss of the whole host (allowed: the
    /// receipt said normal, two failure domains, and both were lost).
    pub transfers_lost_to_power_loss: usize,
    pub takeovers_warm: usize,
    pub takeovers_cold: usize,
    pub faults: Vec<String>,
    pub aborted_by_deadlock_or_timeout: usize,
}

/// A run that broke an invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimFailure {
    pub seed: u64,
    pub at: Duration,
    pub reason: String,
    /// The last events of the run.
    pub log: String,
}

impl std::fmt::Display for SimFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} failed at {:?}: {}\n--- last events ---\n{}",
            self.seed, self.at, self.reason, self.log
        )
    }
}

type ReplyTo = (EndpointId, RequestId);
type Owner = LsgOwner<SimStore, ReplyTo>;

#[derive(Debug)]
enum StorageJob {
    FlushTrail(Lsn),
    FlushVolumes(Lsn),
    Truncate(Lsn),
}

#[derive(Debug)]
struct Gathering {
    lsg: LogStorageGroup<SimStore>,
    chains: Vec<Chain>,
    waiting_for: BTreeSet<EndpointId>,
    deadline: Duration,
}

#[derive(Debug)]
enum Role {
    Down,
    Backup {
        backup: AuditBackup,
        gathering: Option<Box<Gathering>>,
    },
    Owner {
        owner: Box<Owner>,
        jobs: VecDeque<(Duration, StorageJob)>,
    },
}

#[derive(Debug)]
struct Cpu {
    id: EndpointId,
    transport: SimTransport,
    store: SimStore,
    role: Role,
    restart_at: Option<Duration>,
}

#[derive(Debug, Clone)]
struct Transfer {
    id: u64,
    from: usize,
    to: usize,
    amount: i64,
}

#[derive(Debug)]
struct Client {
    id: ClientId,
    endpoint: EndpointId,
    transport: SimTransport,
    next_seq: u64,
    seen_below: u64,
    transfer: Option<Transfer>,
    step: usize,
    tx: Option<TxId>,
    balances: (i64, i64),
    /// The request in flight: its transport id and the request itself (resent as is).
    pending: Option<(Option<RequestId>, ClientRequest)>,
    retry_at: Option<Duration>,
    done: usize,
    next_transfer: u64,
}

/// A transfer a client saw committed, with its receipt.
#[derive(Debug, Clone, Copy)]
struct Committed {
    transfer: u64,
    lsn: Lsn,
    state: CommitState,
}

struct World {
    options: SimOptions,
    rng: ChaCha8Rng,
    net: SimNetwork,
    base_store: SimStore,
    cpus: BTreeMap<EndpointId, Cpu>,
    clients: Vec<Client>,
    primary: Option<EndpointId>,
    lsg_config: LsgConfig,
    log: VecDeque<String>,
    report: SimReport,
    committed: Vec<Committed>,
    /// Transfers acknowledged from memory and not durable when the whole host lost power.
    excused: BTreeSet<u64>,
    faults_left: usize,
    partitioned_until: Option<Duration>,
    /// When the backup node may take over a home node found wholly dead.
    node_takeover_at: Option<Duration>,
    /// A node to kill at a set time (after a partition began).
    pending_node_kill: Option<(Duration, u16)>,
}

const CPUS: [EndpointId; 4] = [
    EndpointId::new(1, 0),
    EndpointId::new(1, 1),
    EndpointId::new(2, 0),
    EndpointId::new(2, 1),
];

fn other_node(id: EndpointId) -> u16 {
    if id.node == 1 { 2 } else { 1 }
}

impl World {
    fn new(options: SimOptions) -> Result<Self, String> {
        let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
        let net = SimNetwork::new(
            rng.random(),
            SimConfig {
                loss_probability: options.loss_probability,
                ..SimConfig::default()
            },
        )
        .map_err(|e| e.to_string())?;
        let base_store = SimStore::new(rng.random());
        let lsg_config = LsgConfig {
            audit_segment_bytes: 64 << 10,
            volume_segment_bytes: 64 << 10,
            max_batch_bytes: 16 << 10,
            max_record_bytes: 8 << 10,
            max_key_bytes: 64,
            max_value_bytes: 1 << 10,
        };
        let mut cpus = BTreeMap::new();
        for id in CPUS {
            let transport = net.add_endpoint(id, &[Path::Main]);
            cpus.insert(
                id,
                Cpu {
                    id,
                    transport,
                    store: base_store.another_process(),
                    role: Role::Down,
                    restart_at: None,
                },
            );
        }
        let mut clients = Vec::new();
        for i in 0..options.clients {
            let endpoint = EndpointId::new(3, i as u16);
            let transport = net.add_endpoint(endpoint, &[Path::Main]);
            clients.push(Client {
                id: ClientId(1000 + i as u64),
                endpoint,
                transport,
                next_seq: 1,
                seen_below: 1,
                transfer: None,
                step: 0,
                tx: None,
                balances: (0, 0),
                pending: None,
                retry_at: None,
                done: 0,
                next_transfer: (i as u64 + 1) * 1_000_000,
            });
        }
        Ok(World {
            faults_left: options.max_faults,
            options,
            rng,
            net,
            base_store,
            cpus,
            clients,
            primary: None,
            lsg_config,
            log: VecDeque::new(),
            report: SimReport {
                seed: options.seed,
                ..SimReport::default()
            },
            committed: Vec::new(),
            excused: BTreeSet::new(),
            partitioned_until: None,
            node_takeover_at: None,
            pending_node_kill: None,
        })
    }

    fn now(&self) -> Duration {
        self.net.now()
    }

    fn note(&mut self, what: String) {
        if self.log.len() >= 200 {
            self.log.pop_front();
        }
        let line = format!("{:>10.3?} {what}", self.now());
        self.log.push_back(line);
    }

    fn fail(&self, reason: String) -> SimFailure {
        let mut log = String::new();
        for line in &self.log {
            let _ = writeln!(log, "{line}");
        }
        SimFailure {
            seed: self.options.seed,
            at: self.now(),
            reason,
            log,
        }
    }

    fn owner_config(&self, id: EndpointId, epoch: OwnerEpoch, incarnation: u64) -> OwnerConfig {
        OwnerConfig {
            primary: PrimaryConfig {
                tag: PairTag {
                    lsg: LSG,
                    epoch,
                    incarnation,
                },
                paranoid: self.options.paranoid,
                max_record_bytes: self.lsg_config.max_record_bytes,
                home: Some(EndpointId::new(id.node, 1 - id.cpu)),
                remote: Some(EndpointId::new(other_node(id), 0)),
                ack_timeout: Duration::from_millis(100),
                max_message_bytes: 32 << 10,
                max_unacked_records: 256,
                flush_bytes: 8 << 10,
                flush_interval: Duration::from_millis(5),
            },
            locks: LockConfig {
                lock_timeout: Duration::from_millis(200),
                ..LockConfig::default()
            },
            messages: MessageTableLimits::default(),
            checkpoint_interval: Duration::from_millis(150),
            max_active_transactions: 64,
            max_scan_rows: 1_000,
        }
    }

    /// Creates the LSG with its accounts on CPU 1.0, which becomes the first owner.
    fn create(&mut self) -> Result<(), String> {
        let id = CPUS[0];
        let now = self.now();
        let Some(cpu) = self.cpus.get_mut(&id) else {
            return Err("no CPU 1.0".into());
        };
        let mut lsg = LogStorageGroup::create_in_with(
            cpu.store.clone(),
            LSG,
            self.lsg_config,
            LsgOptions::deterministic(),
        )
        .map_err(|e| e.to_string())?;
        let accounts = lsg.create_volume(ACCOUNTS).map_err(|e| e.to_string())?;
        lsg.create_volume(MARKERS).map_err(|e| e.to_string())?;
        // The opening balances go in as one committed transaction written directly.
        let mut records = Vec::new();
        let tx = TxId {
            epoch: lsg.owner_epoch(),
            number: 0,
        };
        for a in 0..self.options.accounts {
            let key = account_key(a);
            let value = START_BALANCE.to_le_bytes().to_vec();
            let body = duplex_pair::AuditBody::Update(duplex_pair::Update {
                tx,
                volume: ACCOUNTS.into(),
                key: key.clone(),
                before: None,
                after: Some(value.clone()),
            });
            let payload = body.encode(self.lsg_config.max_record_bytes).map_err(|e| e.to_string())?;
            let lsn = lsg
                .audit()
                .append(body.record_type(), duplex_lsg::RecordFlags::NONE, &payload)
                .map_err(|e| e.to_string())?;
            accounts.put(&key, &value, lsn).map_err(|e| e.to_string())?;
            records.push((lsn, body.record_type(), payload));
        }
        let commit = duplex_pair::AuditBody::Commit(duplex_pair::TxEnd {
            tx,
            epoch: lsg.owner_epoch(),
            request: None,
        });
        let payload = commit.encode(self.lsg_config.max_record_bytes).map_err(|e| e.to_string())?;
        let lsn = lsg
            .audit()
            .append(commit.record_type(), duplex_lsg::RecordFlags::NONE, &payload)
            .map_err(|e| e.to_string())?;
        records.push((lsn, commit.record_type(), payload));
        lsg.audit().flush().map_err(|e| e.to_string())?;
        let retained = records
            .into_iter()
            .map(|(lsn, t, payload)| duplex_pair::StreamRecord {
                lsn,
                record_type: t as u8,
                flags: 0,
                payload,
            })
            .collect();
        let config = self.owner_config(id, lsg.owner_epoch(), cpu.transport.incarnation());
        let owner = LsgOwner::new(
            config,
            lsg,
            OwnerStart {
                state: CommitState::PrimaryOnly,
                retained,
                durable: lsn,
                table: duplex_pair::MessageTable::new(MessageTableLimits::default()),
                in_doubt: Vec::new(),
                last_checkpoint: Lsn(0),
                penultimate_checkpoint: Lsn(0),
            },
            now,
        );
        cpu.role = Role::Owner {
            owner: Box::new(owner),
            jobs: VecDeque::new(),
        };
        self.primary = Some(id);
        for other in CPUS.into_iter().skip(1) {
            self.start_backup(other);
        }
        Ok(())
    }

    fn start_backup(&mut self, id: EndpointId) {
        let primary = self.primary;
        let Some(cpu) = self.cpus.get_mut(&id) else {
            return;
        };
        let mut backup = AuditBackup::new(LSG, cpu.transport.incarnation(), Duration::from_millis(60));
        if let Some(p) = primary {
            backup.join(p);
        }
        cpu.role = Role::Backup {
            backup,
            gathering: None,
        };
        cpu.restart_at = None;
    }

    fn kill(&mut self, id: EndpointId, why: &str) {
        let now = self.now();
        let Some(cpu) = self.cpus.get_mut(&id) else {
            return;
        };
        if matches!(cpu.role, Role::Down) {
            return;
        }
        self.net.crash(id);
        cpu.store.kill_process();
        cpu.role = Role::Down;
        cpu.restart_at = Some(now + Duration::from_millis(150));
        if self.primary == Some(id) {
            self.primary = None;
        }
        self.note(format!("{id} killed ({why})"));
    }

    fn restart(&mut self, id: EndpointId) {
        let Some(cpu) = self.cpus.get_mut(&id) else {
            return;
        };
        self.net.restart(id);
        cpu.store = self.base_store.another_process();
        self.start_backup(id);
        self.note(format!("{id} restarted as a backup"));
    }

    // ---- faults -------------------------------------------------------------------------

    fn inject_faults(&mut self) {
        let now = self.now();
        if let Some(until) = self.partitioned_until
            && now >= until
        {
            self.partitioned_until = None;
            self.set_partition(false);
        }
        if now >= self.options.fault_time || self.faults_left == 0 {
            return;
        }
        // On average one fault every 400 ms of virtual time.
        if !self.rng.random_ratio(1, 800) {
            return;
        }
        self.faults_left -= 1;
        let fault = self.rng.random_range(0..100);
        let what = match fault {
            0..35 => {
                // Kill the primary's CPU.
                match self.primary {
                    Some(p) => {
                        self.kill(p, "fault: primary CPU killed");
                        format!("kill primary CPU {p}")
                    }
                    None => "kill primary (none)".into(),
                }
            }
            35..50 => {
                let id = CPUS[self.rng.random_range(0..CPUS.len())];
                self.kill(id, "fault: a CPU killed");
                format!("kill CPU {id}")
            }
            50..65 => {
                let node = self.primary.map_or(1, |p| p.node);
                for id in CPUS.into_iter().filter(|c| c.node == node) {
                    self.kill(id, "fault: home node killed");
                }
                format!("kill node {node}")
            }
            65..80 => {
                if self.partitioned_until.is_none() {
                    self.partitioned_until =
                        Some(now + Duration::from_millis(self.rng.random_range(100..800)));
                    self.set_partition(true);
                }
                "partition between the nodes".into()
            }
            80..90 => {
                // The backup node is cut off, then the home node dies: recovery must not use
                // the stale backup's memory.
                if self.partitioned_until.is_none() {
                    self.partitioned_until = Some(now + Duration::from_millis(600));
                    self.set_partition(true);
                }
                let node = self.primary.map_or(1, |p| p.node);
                let kill_at = now + Duration::from_millis(self.rng.random_range(350..500));
                for id in CPUS.into_iter().filter(|c| c.node == node) {
                    if let Some(cpu) = self.cpus.get_mut(&id) {
                        cpu.restart_at = None;
                    }
                }
                self.pending_node_kill = Some((kill_at, node));
                format!("partition, then kill node {node}")
            }
            _ => {
                self.power_loss();
                "power loss".into()
            }
        };
        self.note(format!("FAULT {what}"));
        self.report.faults.push(format!("{:?} {what}", now));
    }

    fn set_partition(&mut self, cut: bool) {
        for a in CPUS.into_iter().filter(|c| c.node == 1) {
            for b in CPUS.into_iter().filter(|c| c.node == 2) {
                if cut {
                    self.net.partition(a, b, &[Path::Main]);
                } else {
                    self.net.heal(a, b, &[Path::Main]);
                }
            }
        }
        self.note(format!("partition {}", if cut { "on" } else { "healed" }));
    }

    fn power_loss(&mut self) {
        // Whatever the owner acknowledged from memory and had not flushed may go.
        let durable = self.cpus.values().find_map(|c| match &c.role {
            Role::Owner { owner, .. } => Some(owner.lsg().audit().durable_lsn()),
            _ => None,
        });
        for c in &self.committed {
            if c.state == CommitState::Normal && durable.is_none_or(|d| c.lsn > d) {
                self.excused.insert(c.transfer);
            }
        }
        for id in CPUS {
            self.kill(id, "power loss");
        }
        self.base_store.power_loss();
    }
}

fn account_key(a: usize) -> Vec<u8> {
    format!("acct{a:04}").into_bytes()
}

// ---- the CPUs ---------------------------------------------------------------------------

impl World {
    /// Runs one CPU: its transport events, its storage work that is due, its ticks.
    fn step_cpu(&mut self, id: EndpointId) -> Result<(), SimFailure> {
        let now = self.now();
        let Some(cpu) = self.cpus.get_mut(&id) else {
            return Ok(());
        };
        let mut events = Vec::new();
        while let Some(e) = cpu.transport.try_next_event() {
            events.push(e);
        }
        let mut notes = Vec::new();
        match &mut cpu.role {
            Role::Down => {}
            Role::Owner { owner, jobs } => {
                for e in events {
                    match e {
                        Event::Request {
                            from, id: rid, payload, ..
                        } => match ClientRequest::decode(&payload) {
                            Ok(req) => owner.on_request(now, (from, rid), req),
                            Err(e) => {
                                let reply = ClientReply::Error(e).encode().unwrap_or_default();
                                let _ = cpu.transport.respond(from, rid, Bytes::from(reply));
                            }
                        },
                        Event::Stream { from, payload, .. } => {
                            if let Ok(m) = PairMessage::decode(&payload) {
                                owner.on_pair_message(now, from, m);
                            }
                        }
                        Event::Peer(PeerEvent::Down { peer, incarnation }) => {
                            owner.on_peer_down(now, peer, incarnation);
                        }
                        _ => {}
                    }
                }
                while jobs.front().is_some_and(|(at, _)| *at <= now) {
                    let Some((_, job)) = jobs.pop_front() else { break };
                    let lsg = std::sync::Arc::clone(owner.lsg());
                    match job {
                        StorageJob::FlushTrail(through) => match lsg.audit().wait_durable(through) {
                            Ok(()) => owner.on_trail_durable(now, lsg.audit().durable_lsn()),
                            Err(e) => owner.on_storage_failed(e.to_string()),
                        },
                        StorageJob::FlushVolumes(lsn) => {
                            let mut failed = None;
                            for name in lsg.volume_names() {
                                if let Err(e) = lsg.volume(&name).and_then(|v| v.flush(lsn)) {
                                    failed = Some(e.to_string());
                                    break;
                                }
                            }
                            match failed {
                                None => owner.on_volumes_flushed(now, lsn),
                                Some(e) => owner.on_storage_failed(e),
                            }
                        }
                        StorageJob::Truncate(below) => {
                            if let Err(e) = lsg.audit().truncate_below(below) {
                                owner.on_storage_failed(e.to_string());
                            }
                        }
                    }
                }
                owner.tick(now);
                let mut stopped = None;
                while let Some(action) = owner.poll_action() {
                    match action {
                        OwnerAction::Reply { to, reply } => {
                            let bytes = reply.encode().unwrap_or_default();
                            let _ = cpu.transport.respond(to.0, to.1, Bytes::from(bytes));
                        }
                        OwnerAction::Send { to, message } => {
                            if let Ok(bytes) = message.encode() {
                                let _ = cpu.transport.stream_send(to, PAIR_STREAM, Bytes::from(bytes));
                            }
                        }
                        OwnerAction::FlushTrail { through } => {
                            let delay = Duration::from_micros(500 + (through.0 % 7) * 300);
                            jobs.push_back((now + delay, StorageJob::FlushTrail(through)));
                        }
                        OwnerAction::FlushVolumes { checkpoint_lsn } => {
                            jobs.push_back((
                                now + Duration::from_millis(2),
                                StorageJob::FlushVolumes(checkpoint_lsn),
                            ));
                        }
                        OwnerAction::TruncateTrail { below } => {
                            jobs.push_back((now + Duration::from_millis(1), StorageJob::Truncate(below)));
                        }
                        OwnerAction::StateChanged { state, home_counts } => {
                            notes.push(format!("{id} state {state:?} home_counts {home_counts}"));
                        }
                        OwnerAction::Stopped { reason } => stopped = Some(reason),
                    }
                }
                // Jobs are kept in time order: flushes scheduled out of order are rare and
                // harmless (a flush covers everything before it), but keep them sorted.
                jobs.make_contiguous().sort_by_key(|(at, _)| *at);
                if let Err(e) = owner.validate() {
                    return Err(self.fail(format!("owner {id}: {e}")));
                }
                if let Some(reason) = stopped {
                    for n in notes {
                        self.note(n);
                    }
                    self.kill(id, &format!("owner stopped: {reason}"));
                    return Ok(());
                }
            }
            Role::Backup { backup, gathering } => {
                for e in events {
                    match e {
                        Event::Stream { from, payload, .. } => {
                            let Ok(m) = PairMessage::decode(&payload) else { continue };
                            if let (Some(g), PairMessage::FenceAck { tag, records }) = (gathering.as_mut(), &m) {
                                if g.waiting_for.remove(&from) {
                                    g.chains.push(Chain {
                                        epoch: tag.epoch,
                                        records: records.clone(),
                                    });
                                }
                                continue;
                            }
                            backup.on_message(now, from, m);
                        }
                        Event::Request { from, id: rid, .. } => {
                            let reply = ClientReply::Error(OpError::NotPrimary {
                                reason: "a backup".into(),
                            });
                            let _ = cpu
                                .transport
                                .respond(from, rid, Bytes::from(reply.encode().unwrap_or_default()));
                        }
                        _ => {}
                    }
                }
                backup.tick(now);
                while let Some(BackupAction::Send { to, message }) = backup.poll_action() {
                    if let Ok(bytes) = message.encode() {
                        let _ = cpu.transport.stream_send(to, PAIR_STREAM, Bytes::from(bytes));
                    }
                }
                if let Err(e) = backup.validate() {
                    return Err(self.fail(format!("backup {id}: {e}")));
                }
            }
        }
        for n in notes {
            self.note(n);
        }
        self.finish_gathering(id)
    }

    /// Starts a takeover on `id`: open the LSG for writing (fencing the old owner), then ask
    /// the other backups for their copies.
    fn start_takeover(&mut self, id: EndpointId) {
        let now = self.now();
        let lsg_config = self.lsg_config;
        let others: BTreeSet<EndpointId> = CPUS
            .into_iter()
            .filter(|c| *c != id)
            .filter(|c| self.cpus.get(c).is_some_and(|cpu| matches!(cpu.role, Role::Backup { .. })))
            .collect();
        let Some(cpu) = self.cpus.get_mut(&id) else { return };
        let Role::Backup { backup, gathering } = &mut cpu.role else { return };
        if gathering.is_some() {
            return;
        }
        let lsg = match LogStorageGroup::open_in_with(
            cpu.store.clone(),
            lsg_config,
            OpenMode::Write,
            LsgOptions::deterministic(),
        ) {
            Ok(lsg) => lsg,
            Err(e) => {
                let msg = format!("{id} cannot take over: {e}");
                self.note(msg);
                return;
            }
        };
        let epoch = lsg.owner_epoch();
        backup.take_over(epoch);
        let from = Lsn(lsg.audit().next_lsn().0.saturating_sub(1).max(1));
        let tag = PairTag {
            lsg: LSG,
            epoch,
            incarnation: cpu.transport.incarnation(),
        };
        let mut waiting_for = BTreeSet::new();
        for other in others {
            let message = PairMessage::Fence { tag, from };
            if let Ok(bytes) = message.encode()
                && cpu.transport.stream_send(other, PAIR_STREAM, Bytes::from(bytes)).is_ok()
            {
                waiting_for.insert(other);
            }
        }
        *gathering = Some(Box::new(Gathering {
            lsg,
            chains: Vec::new(),
            waiting_for,
            deadline: now + Duration::from_millis(40),
        }));
        self.note(format!("{id} takes over at epoch {epoch}: fenced, gathering copies"));
    }

    fn finish_gathering(&mut self, id: EndpointId) -> Result<(), SimFailure> {
        let now = self.now();
        let Some(cpu) = self.cpus.get_mut(&id) else { return Ok(()) };
        let Role::Backup { backup, gathering } = &mut cpu.role else { return Ok(()) };
        let done = gathering
            .as_ref()
            .is_some_and(|g| g.waiting_for.is_empty() || now >= g.deadline);
        if !done {
            return Ok(());
        }
        let Some(g) = gathering.take() else { return Ok(()) };
        let g = *g;
        let own = Chain::of_backup(backup);
        let own = (!own.records.is_empty()).then_some(own);
        let config = {
            let epoch = g.lsg.owner_epoch();
            let inc = cpu.transport.incarnation();
            (epoch, inc)
        };
        let owner_config = self.owner_config(id, config.0, config.1);
        let Some(cpu) = self.cpus.get_mut(&id) else { return Ok(()) };
        match take_over::<SimStore, ReplyTo>(g.lsg, own, g.chains, owner_config, now) {
            Ok((owner, report)) => {
                match report.start {
                    StartKind::Warm => self.report.takeovers_warm += 1,
                    StartKind::Cold => self.report.takeovers_cold += 1,
                }
                cpu.role = Role::Owner {
                    owner: Box::new(owner),
                    jobs: VecDeque::new(),
                };
                self.primary = Some(id);
                self.node_takeover_at = None;
                self.note(format!("{id} is the owner: {report:?}"));
                // The other backups follow the new primary.
                for other in CPUS {
                    if other == id {
                        continue;
                    }
                    if let Some(c) = self.cpus.get_mut(&other)
                        && let Role::Backup { backup, gathering } = &mut c.role
                    {
                        *gathering = None;
                        backup.join(id);
                    }
                }
            }
            Err(e) => {
                let msg = format!("takeover by {id} failed: {e}");
                self.kill(id, &msg);
            }
        }
        Ok(())
    }

    /// Node services: who takes over when the owner is gone, and restarts.
    fn node_services(&mut self) {
        let now = self.now();
        if let Some((at, node)) = self.pending_node_kill
            && now >= at
        {
            self.pending_node_kill = None;
            for id in CPUS.into_iter().filter(|c| c.node == node) {
                self.kill(id, "fault: home node killed after the partition began");
            }
        }
        for id in CPUS {
            let restart = self
                .cpus
                .get(&id)
                .is_some_and(|c| matches!(c.role, Role::Down) && c.restart_at.is_some_and(|t| now >= t));
            if restart {
                self.restart(id);
            }
        }
        if self.primary.is_some() {
            return;
        }
        let gathering = self.cpus.values().any(|c| {
            matches!(&c.role, Role::Backup { gathering: Some(_), .. })
        });
        if gathering {
            return;
        }
        // The home node is the one the last owner ran on; its live backup half goes first.
        let live_backups: Vec<EndpointId> = CPUS
            .into_iter()
            .filter(|c| self.cpus.get(c).is_some_and(|cpu| matches!(cpu.role, Role::Backup { .. })))
            .collect();
        if live_backups.is_empty() {
            return;
        }
        let holds = |id: &EndpointId| {
            self.cpus.get(id).map_or(Lsn(0), |c| match &c.role {
                Role::Backup { backup, .. } => backup.held(),
                _ => Lsn(0),
            })
        };
        let last_home = self.last_home_node();
        let home_alive: Vec<EndpointId> = live_backups
            .iter()
            .copied()
            .filter(|c| c.node == last_home)
            .collect();
        let candidate = if let Some(&c) = home_alive.first() {
            Some(c)
        } else {
            // The whole home node is dead: the backup node takes over after the detector's
            // silence (300 ms).
            match self.node_takeover_at {
                None => {
                    self.node_takeover_at = Some(now + Duration::from_millis(300));
                    None
                }
                Some(at) if now >= at => live_backups.iter().copied().max_by_key(|c| (holds(c), std::cmp::Reverse(*c))),
                Some(_) => None,
            }
        };
        if let Some(c) = candidate {
            self.start_takeover(c);
        }
    }

    fn last_home_node(&self) -> u16 {
        self.last_owner.map_or(1, |o| o.node)
    }
}
