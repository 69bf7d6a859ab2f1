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
use crate::takeover::{Chain, StartKind, TakeoverError, Taker, take_over};

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
            paranoid: seed.is_multiple_of(5),
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
    chains: Vec<(EndpointId, Chain)>,
    waiting_for: BTreeSet<EndpointId>,
    /// The fence message, sent again until answered (a peer just restarted is not reachable
    /// until the detector hears it).
    fence: Bytes,
    resend_at: Duration,
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
    epoch: OwnerEpoch,
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
    /// (owner epoch, durable LSN) at each power loss of the whole host: commits of that epoch
    /// acknowledged from memory beyond it may be gone.
    power_losses: Vec<(OwnerEpoch, Lsn)>,
    faults_left: usize,
    partitioned_until: Option<Duration>,
    /// When the backup node may take over a home node found wholly dead.
    node_takeover_at: Option<Duration>,
    /// A node to kill at a set time (after a partition began).
    pending_node_kill: Option<(Duration, u16)>,
    /// The CPU that owned the LSG last: its node is the home node for the takeover order.
    last_owner: Option<EndpointId>,
    /// A takeover that found no complete copy is tried again from then on.
    takeover_retry_at: Option<Duration>,
    /// No new fault before this.
    quiet_until: Duration,
    /// Every CPU lost its memory (power loss) since the last owner ran.
    memory_lost_everywhere: bool,
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
            power_losses: Vec::new(),
            partitioned_until: None,
            node_takeover_at: None,
            pending_node_kill: None,
            last_owner: None,
            takeover_retry_at: None,
            quiet_until: Duration::ZERO,
            memory_lost_everywhere: false,
        })
    }

    fn now(&self) -> Duration {
        self.net.now()
    }

    fn note(&mut self, what: String) {
        if self.log.len() >= 400 {
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
            tx_idle_timeout: Duration::from_secs(1),
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
            let payload = body
                .encode(self.lsg_config.max_record_bytes)
                .map_err(|e| e.to_string())?;
            let lsn = lsg
                .audit()
                .append(
                    body.record_type(),
                    duplex_lsg::RecordFlags::OUT_OF_COMMUNICATION,
                    &payload,
                )
                .map_err(|e| e.to_string())?;
            accounts.put(&key, &value, lsn).map_err(|e| e.to_string())?;
            records.push((lsn, body.record_type(), payload));
        }
        let commit = duplex_pair::AuditBody::Commit(duplex_pair::TxEnd {
            tx,
            epoch: lsg.owner_epoch(),
            request: None,
        });
        let payload = commit
            .encode(self.lsg_config.max_record_bytes)
            .map_err(|e| e.to_string())?;
        let lsn = lsg
            .audit()
            .append(
                commit.record_type(),
                duplex_lsg::RecordFlags::OUT_OF_COMMUNICATION,
                &payload,
            )
            .map_err(|e| e.to_string())?;
        records.push((lsn, commit.record_type(), payload));
        lsg.audit().flush().map_err(|e| e.to_string())?;
        let retained = records
            .into_iter()
            .map(|(lsn, t, payload)| duplex_pair::StreamRecord {
                lsn,
                record_type: t as u8,
                // Written before any backup joined: not in communication.
                flags: duplex_lsg::RecordFlags::OUT_OF_COMMUNICATION.bits(),
                payload,
            })
            .collect();
        let incarnation = cpu.transport.incarnation();
        let epoch = lsg.owner_epoch();
        let config = self.owner_config(id, epoch, incarnation);
        let Some(cpu) = self.cpus.get_mut(&id) else {
            return Err("no CPU 1.0".into());
        };
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
        self.last_owner = Some(id);
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
        let mut backup =
            AuditBackup::new(LSG, cpu.transport.incarnation(), Duration::from_millis(60));
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
        cpu.restart_at = Some(now + Duration::from_millis(self.rng.random_range(150..600)));
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
        // On average one fault every 400 ms of virtual time, at least a second apart: two
        // failures within the detection time of each other are a double failure.
        if now < self.quiet_until || !self.rng.random_ratio(1, 800) {
            return;
        }
        self.quiet_until = now + Duration::from_secs(1);
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
        // Replies already on the wire still arrive, so this is judged by receipt, at the end.
        let owner = self.cpus.values().find_map(|c| match &c.role {
            Role::Owner { owner, .. } => Some((owner.epoch(), owner.lsg().audit().durable_lsn())),
            _ => None,
        });
        if let Some((epoch, durable)) = owner {
            self.power_losses.push((epoch, durable));
        }
        self.note(format!(
            "power loss with the owner's trail durable through {owner:?}"
        ));
        for id in CPUS {
            self.kill(id, "power loss");
        }
        self.base_store.power_loss();
        self.memory_lost_everywhere = true;
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
                            from,
                            id: rid,
                            payload,
                            ..
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
                    let Some((_, job)) = jobs.pop_front() else {
                        break;
                    };
                    let lsg = std::sync::Arc::clone(owner.lsg());
                    match job {
                        StorageJob::FlushTrail(through) => {
                            match lsg.audit().wait_durable(through) {
                                Ok(()) => owner.on_trail_durable(now, lsg.audit().durable_lsn()),
                                Err(e) => owner.on_storage_failed(e.to_string()),
                            }
                        }
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
                                let _ =
                                    cpu.transport
                                        .stream_send(to, PAIR_STREAM, Bytes::from(bytes));
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
                            jobs.push_back((
                                now + Duration::from_millis(1),
                                StorageJob::Truncate(below),
                            ));
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
                            let Ok(m) = PairMessage::decode(&payload) else {
                                continue;
                            };
                            if let (
                                Some(g),
                                PairMessage::FenceAck {
                                    tag,
                                    records,
                                    complete,
                                },
                            ) = (gathering.as_mut(), &m)
                            {
                                if g.waiting_for.contains(&from) {
                                    match g.chains.iter_mut().find(|(f, _)| *f == from) {
                                        Some((_, chain)) => {
                                            chain.records.extend(records.iter().cloned())
                                        }
                                        None => g.chains.push((
                                            from,
                                            Chain {
                                                epoch: tag.epoch,
                                                records: records.clone(),
                                            },
                                        )),
                                    }
                                    if *complete {
                                        g.waiting_for.remove(&from);
                                    }
                                }
                                continue;
                            }
                            backup.on_message(now, from, m);
                        }
                        Event::Request { from, id: rid, .. } => {
                            let reply = ClientReply::Error(OpError::NotPrimary {
                                reason: "a backup".into(),
                            });
                            let _ = cpu.transport.respond(
                                from,
                                rid,
                                Bytes::from(reply.encode().unwrap_or_default()),
                            );
                        }
                        _ => {}
                    }
                }
                backup.tick(now);
                while let Some(BackupAction::Send { to, message }) = backup.poll_action() {
                    if let Ok(bytes) = message.encode() {
                        let _ = cpu
                            .transport
                            .stream_send(to, PAIR_STREAM, Bytes::from(bytes));
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
            .filter(|c| {
                self.cpus
                    .get(c)
                    .is_some_and(|cpu| matches!(cpu.role, Role::Backup { .. }))
            })
            .collect();
        let Some(cpu) = self.cpus.get_mut(&id) else {
            return;
        };
        let Role::Backup { backup, gathering } = &mut cpu.role else {
            return;
        };
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
        let fence = match (PairMessage::Fence { tag, from }).encode() {
            Ok(bytes) => Bytes::from(bytes),
            Err(_) => return,
        };
        *gathering = Some(Box::new(Gathering {
            lsg,
            chains: Vec::new(),
            waiting_for: others,
            fence,
            resend_at: now,
            deadline: now + Duration::from_millis(40),
        }));
        if self.takeover_retry_at.is_none() {
            self.note(format!(
                "{id} takes over at epoch {epoch}: fenced, gathering copies"
            ));
        }
    }

    fn finish_gathering(&mut self, id: EndpointId) -> Result<(), SimFailure> {
        let now = self.now();
        let Some(cpu) = self.cpus.get_mut(&id) else {
            return Ok(());
        };
        let Role::Backup { backup, gathering } = &mut cpu.role else {
            return Ok(());
        };
        if let Some(g) = gathering.as_mut()
            && now >= g.resend_at
        {
            g.resend_at = now + Duration::from_millis(5);
            for other in &g.waiting_for {
                let _ = cpu
                    .transport
                    .stream_send(*other, PAIR_STREAM, g.fence.clone());
            }
        }
        let done = gathering
            .as_ref()
            .is_some_and(|g| g.waiting_for.is_empty() || now >= g.deadline);
        if !done {
            return Ok(());
        }
        let Some(g) = gathering.take() else {
            return Ok(());
        };
        let mut g = *g;
        // A copy still arriving when the time ran out is incomplete: it cannot vouch.
        let waiting_for = std::mem::take(&mut g.waiting_for);
        g.chains.retain(|(from, _)| !waiting_for.contains(from));
        let own = Chain::of_backup(backup);
        let own = (!own.records.is_empty()).then_some(own);
        let config = {
            let epoch = g.lsg.owner_epoch();
            let inc = cpu.transport.incarnation();
            (epoch, inc)
        };
        let owner_config = self.owner_config(id, config.0, config.1);
        let Some(cpu) = self.cpus.get_mut(&id) else {
            return Ok(());
        };
        let backup_node = self
            .last_owner
            .map(|o| EndpointId::new(other_node(o), 0))
            .filter(|b| *b != id);
        let taker = Taker {
            incarnation: config.1,
            backup_node,
            memory_lost_everywhere: self.memory_lost_everywhere,
        };
        match take_over::<SimStore, ReplyTo>(g.lsg, taker, own, g.chains, owner_config, now) {
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
                self.last_owner = Some(id);
                self.node_takeover_at = None;
                self.takeover_retry_at = None;
                self.memory_lost_everywhere = false;
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
            Err(TakeoverError::CopyMissing { .. }) => {
                // Let the LSG go and try again later (or let the backup node's pairs do it).
                if self.takeover_retry_at.is_none() {
                    self.note(format!(
                        "{id} gives up the takeover for now: no complete copy at hand (retrying quietly)"
                    ));
                }
                self.takeover_retry_at = Some(now + Duration::from_millis(50));
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
            let restart = self.cpus.get(&id).is_some_and(|c| {
                matches!(c.role, Role::Down) && c.restart_at.is_some_and(|t| now >= t)
            });
            if restart {
                self.restart(id);
            }
        }
        if self.primary.is_some() {
            return;
        }
        let gathering = self.cpus.values().any(|c| {
            matches!(
                &c.role,
                Role::Backup {
                    gathering: Some(_),
                    ..
                }
            )
        });
        if gathering || self.takeover_retry_at.is_some_and(|t| now < t) {
            return;
        }
        // The home node is the one the last owner ran on; its live backup half goes first.
        let live_backups: Vec<EndpointId> = CPUS
            .into_iter()
            .filter(|c| {
                self.cpus
                    .get(c)
                    .is_some_and(|cpu| matches!(cpu.role, Role::Backup { .. }))
            })
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
                Some(at) if now >= at => live_backups
                    .iter()
                    .copied()
                    .max_by_key(|c| (holds(c), std::cmp::Reverse(*c))),
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

// ---- the clients ------------------------------------------------------------------------

fn balance_of(reply: &ClientReply) -> Option<i64> {
    match reply {
        ClientReply::Value(Some(v)) => Some(i64::from_le_bytes(v.as_slice().try_into().ok()?)),
        _ => None,
    }
}

fn marker_value(t: &Transfer) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    v.extend_from_slice(&(t.from as u64).to_le_bytes());
    v.extend_from_slice(&(t.to as u64).to_le_bytes());
    v.extend_from_slice(&t.amount.to_le_bytes());
    v
}

impl World {
    fn step_client(&mut self, index: usize) -> Result<(), SimFailure> {
        let now = self.now();
        let primary = self.primary;
        let accounts = self.options.accounts;
        let quota = self.options.transfers_per_client;
        let mut replies = Vec::new();
        {
            let client = &mut self.clients[index];
            while let Some(e) = client.transport.try_next_event() {
                match e {
                    Event::Response { id, payload, .. }
                        if client.pending.as_ref().is_some_and(|(p, _)| *p == Some(id)) =>
                    {
                        match ClientReply::decode(&payload) {
                            Ok(r) => replies.push(r),
                            Err(e) => replies.push(ClientReply::Error(e)),
                        }
                    }
                    Event::RequestFailed { id, .. } => {
                        if let Some((p, _)) = client.pending.as_mut()
                            && *p == Some(id)
                        {
                            *p = None;
                            client.retry_at = Some(now + Duration::from_millis(20));
                        }
                    }
                    _ => {}
                }
            }
        }
        for reply in replies {
            self.on_client_reply(index, reply)?;
        }
        let client = &mut self.clients[index];
        if client.pending.is_none() && client.transfer.is_none() && client.done < quota {
            let from = self.rng.random_range(0..accounts);
            let mut to = self.rng.random_range(0..accounts - 1);
            if to >= from {
                to += 1;
            }
            client.transfer = Some(Transfer {
                id: client.next_transfer,
                from,
                to,
                amount: self.rng.random_range(1..50),
            });
            client.next_transfer += 1;
            client.step = 0;
            client.tx = None;
            Self::issue(client, Op::Begin);
        }
        if let Some((None, request)) = &client.pending
            && client.retry_at.is_none_or(|t| now >= t)
            && let Some(p) = primary
        {
            let request = request.clone();
            let sent = request.encode().ok().and_then(|bytes| {
                client
                    .transport
                    .request(p, Bytes::from(bytes), Duration::from_millis(200))
                    .ok()
            });
            match sent {
                Some(id) => {
                    client.pending = Some((Some(id), request));
                    client.retry_at = None;
                }
                None => client.retry_at = Some(now + Duration::from_millis(20)),
            }
        }
        Ok(())
    }

    /// Queues the next request of the client's transfer (sent by `step_client`).
    fn issue(client: &mut Client, op: Op) {
        let seq = client.next_seq;
        client.next_seq += 1;
        client.seen_below = seq;
        client.pending = Some((
            None,
            ClientRequest {
                client: client.id,
                seq: RequestSeq(seq),
                seen_below: RequestSeq(client.seen_below),
                tx: client.tx,
                op,
            },
        ));
        client.retry_at = None;
    }

    fn restart_transfer(client: &mut Client, now: Duration, backoff: Duration) {
        client.step = 0;
        client.tx = None;
        Self::issue(client, Op::Begin);
        client.retry_at = Some(now + backoff);
    }

    fn on_client_reply(&mut self, index: usize, reply: ClientReply) -> Result<(), SimFailure> {
        let now = self.now();
        let client = &mut self.clients[index];
        let Some(transfer) = client.transfer.clone() else {
            return Ok(());
        };
        let resend = |client: &mut Client| {
            if let Some((p, _)) = client.pending.as_mut() {
                *p = None;
            }
            client.retry_at = Some(now + Duration::from_millis(20));
        };
        match (&reply, client.step) {
            (ClientReply::Error(OpError::NotPrimary { .. }), _) => resend(client),
            (ClientReply::Error(OpError::Aborted { reason, .. }), _) => {
                if matches!(
                    reason,
                    duplex_pair::AbortReason::Deadlock | duplex_pair::AbortReason::LockTimeout
                ) {
                    self.report.aborted_by_deadlock_or_timeout += 1;
                }
                let backoff = Duration::from_millis(1 + transfer.id % 7);
                Self::restart_transfer(client, now, backoff);
            }
            (
                ClientReply::Error(
                    OpError::UnknownTransaction { .. }
                    | OpError::LockRefused { .. }
                    | OpError::TooManyTransactions { .. }
                    | OpError::Storage { .. },
                ),
                _,
            ) => Self::restart_transfer(client, now, Duration::from_millis(5)),
            (ClientReply::Began(tx), 0) => {
                client.tx = Some(*tx);
                client.step = 1;
                Self::issue(
                    client,
                    Op::Get {
                        volume: ACCOUNTS.into(),
                        key: account_key(transfer.from),
                    },
                );
            }
            (r @ ClientReply::Value(_), 1) => {
                let Some(b) = balance_of(r) else {
                    return Err(
                        self.fail(format!("account {} has no balance: {r:?}", transfer.from))
                    );
                };
                let client = &mut self.clients[index];
                client.balances.0 = b;
                client.step = 2;
                Self::issue(
                    client,
                    Op::Get {
                        volume: ACCOUNTS.into(),
                        key: account_key(transfer.to),
                    },
                );
            }
            (r @ ClientReply::Value(_), 2) => {
                let Some(b) = balance_of(r) else {
                    return Err(self.fail(format!("account {} has no balance: {r:?}", transfer.to)));
                };
                let client = &mut self.clients[index];
                client.balances.1 = b;
                client.step = 3;
                let value = (client.balances.0 - transfer.amount).to_le_bytes().to_vec();
                Self::issue(
                    client,
                    Op::Put {
                        volume: ACCOUNTS.into(),
                        key: account_key(transfer.from),
                        value,
                    },
                );
            }
            (ClientReply::Written, 3) => {
                client.step = 4;
                let value = (client.balances.1 + transfer.amount).to_le_bytes().to_vec();
                Self::issue(
                    client,
                    Op::Put {
                        volume: ACCOUNTS.into(),
                        key: account_key(transfer.to),
                        value,
                    },
                );
            }
            (ClientReply::Written, 4) => {
                client.step = 5;
                Self::issue(
                    client,
                    Op::Put {
                        volume: MARKERS.into(),
                        key: transfer.id.to_be_bytes().to_vec(),
                        value: marker_value(&transfer),
                    },
                );
            }
            (ClientReply::Written, 5) => {
                client.step = 6;
                Self::issue(client, Op::Commit);
            }
            (ClientReply::Outcome(Reply::Committed(receipt)), 6) => {
                client.done += 1;
                client.transfer = None;
                client.pending = None;
                self.committed.push(Committed {
                    transfer: transfer.id,
                    lsn: receipt.commit_lsn,
                    epoch: receipt.epoch,
                    state: receipt.state,
                });
                self.report.transfers_committed += 1;
                self.note(format!(
                    "client {index} transfer {} committed at {} ({:?}, epoch {})",
                    transfer.id, receipt.commit_lsn, receipt.state, receipt.epoch
                ));
            }
            (ClientReply::Outcome(Reply::Aborted(_)), 6) => {
                Self::restart_transfer(client, now, Duration::from_millis(2));
            }
            (other, step) => {
                return Err(self.fail(format!(
                    "client {} transfer {} step {step}: unexpected reply {other:?}",
                    index, transfer.id
                )));
            }
        }
        Ok(())
    }

    fn clients_done(&self) -> bool {
        self.clients
            .iter()
            .all(|c| c.done >= self.options.transfers_per_client && c.pending.is_none())
    }

    // ---- the oracle -------------------------------------------------------------------

    /// The bank after the run: totals, balances against markers, acknowledged transfers.
    fn check_bank(&mut self) -> Result<(), SimFailure> {
        let owner = self.cpus.values().find_map(|c| match &c.role {
            Role::Owner { owner, .. } => Some(owner),
            _ => None,
        });
        let Some(owner) = owner else {
            return Err(self.fail("no owner at the end".into()));
        };
        if owner.active_transactions() != 0 {
            return Err(self.fail(format!(
                "{} transactions still active at the end",
                owner.active_transactions()
            )));
        }
        let lsg = std::sync::Arc::clone(owner.lsg());
        let read_all = |name: &str| -> Result<Vec<duplex_volume_pair::KeyValue>, String> {
            let v = lsg.volume(name).map_err(|e| e.to_string())?;
            duplex_volume_pair::VolumeAccess::scan(
                v.as_ref(),
                std::ops::Bound::Unbounded,
                std::ops::Bound::Unbounded,
                usize::MAX,
            )
            .map_err(|e| e.to_string())
        };
        let accounts = read_all(ACCOUNTS).map_err(|e| self.fail(e))?;
        let markers = read_all(MARKERS).map_err(|e| self.fail(e))?;
        let mut expected = vec![START_BALANCE; self.options.accounts];
        let mut present = BTreeSet::new();
        for (key, value) in &markers {
            let (Ok(id), Ok(from), Ok(to), Ok(amount)) = (
                <[u8; 8]>::try_from(key.as_slice()),
                value
                    .get(0..8)
                    .map_or(Err(()), |b| <[u8; 8]>::try_from(b).map_err(|_| ())),
                value
                    .get(8..16)
                    .map_or(Err(()), |b| <[u8; 8]>::try_from(b).map_err(|_| ())),
                value
                    .get(16..24)
                    .map_or(Err(()), |b| <[u8; 8]>::try_from(b).map_err(|_| ())),
            ) else {
                return Err(self.fail(format!("malformed marker {key:?}")));
            };
            present.insert(u64::from_be_bytes(id));
            let (from, to, amount) = (
                u64::from_le_bytes(from) as usize,
                u64::from_le_bytes(to) as usize,
                i64::from_le_bytes(amount),
            );
            if from >= expected.len() || to >= expected.len() {
                return Err(self.fail(format!("marker names unknown accounts {from} {to}")));
            }
            expected[from] -= amount;
            expected[to] += amount;
        }
        let mut found = vec![None; self.options.accounts];
        for (key, value) in &accounts {
            let Some(a) = std::str::from_utf8(key)
                .ok()
                .and_then(|k| k.strip_prefix("acct"))
                .and_then(|n| n.parse::<usize>().ok())
            else {
                return Err(self.fail(format!("unknown account key {key:?}")));
            };
            let Ok(b) = <[u8; 8]>::try_from(value.as_slice()) else {
                return Err(self.fail(format!("malformed balance of account {a}")));
            };
            if a < found.len() {
                found[a] = Some(i64::from_le_bytes(b));
            }
        }
        let total: i64 = found.iter().flatten().sum();
        let start_total = START_BALANCE * self.options.accounts as i64;
        if total != start_total {
            return Err(self.fail(format!(
                "total {total}, expected {start_total}: money was made or lost"
            )));
        }
        for (a, (f, e)) in found.iter().zip(&expected).enumerate() {
            if *f != Some(*e) {
                return Err(self.fail(format!(
                    "account {a} holds {f:?} but the committed transfers (markers) make it {e}: a transfer applied partly or twice"
                )));
            }
        }
        let mut lost = 0;
        for c in &self.committed {
            if !present.contains(&c.transfer) {
                let excused = c.state == CommitState::Normal
                    && self
                        .power_losses
                        .iter()
                        .any(|(epoch, durable)| c.epoch == *epoch && c.lsn > *durable);
                if excused {
                    lost += 1;
                } else {
                    return Err(self.fail(format!(
                        "transfer {} was acknowledged ({:?} at {}) but is not in the volumes",
                        c.transfer, c.state, c.lsn
                    )));
                }
            }
        }
        self.report.transfers_lost_to_power_loss = lost;
        Ok(())
    }
}

/// Runs one seeded history and checks it. See the module docs.
pub fn run(options: SimOptions) -> Result<SimReport, SimFailure> {
    let mut w = World::new(options).map_err(|e| SimFailure {
        seed: options.seed,
        at: Duration::ZERO,
        reason: e,
        log: String::new(),
    })?;
    w.create()
        .map_err(|e| w.fail(format!("creating the LSG: {e}")))?;
    let rounds = (options.time_limit.as_micros() / QUANTUM.as_micros()) as u64;
    let mut finished = false;
    for _ in 0..rounds {
        let next = w.now() + QUANTUM;
        w.net.run_until(next);
        w.inject_faults();
        w.node_services();
        for id in CPUS {
            w.step_cpu(id)?;
        }
        for i in 0..w.clients.len() {
            w.step_client(i)?;
        }
        if w.now() >= options.fault_time
            && w.partitioned_until.is_none()
            && w.pending_node_kill.is_none()
            && w.primary.is_some()
            && w.clients_done()
        {
            finished = true;
            break;
        }
    }
    if !finished {
        let progress: Vec<usize> = w.clients.iter().map(|c| c.done).collect();
        return Err(w.fail(format!(
            "clients did not finish within {:?} of virtual time (transfers done per client: {progress:?}, primary {:?})",
            options.time_limit, w.primary
        )));
    }
    w.check_bank()?;
    w.report.virtual_time = w.now();
    Ok(w.report)
}
