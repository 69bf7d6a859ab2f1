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
//! acknowledged from memory (normal state) may be lost only when both failure domains lose
//! their memory at once (a power loss of the whole simulated host, or every CPU killed); its
//! receipt said so. It also reads the owner's retained trail as a cold recovery would: it must
//! plan without error (no update undone twice, no transaction ended twice, LSNs dense).
//!
//! [`run_script`] runs the same world with a [`Script`] instead of random faults: each
//! [`ScriptStep`] waits for its [`When`] and then injects its [`Fault`] (a kill, a partition, a
//! stopped process, a crash armed for the next taker, a lost reply, a prepared transfer, a probe
//! of locks, the coordinator's decision). The report then says what happened at each takeover
//! ([`SimTakeover`]) and what the scripted parts saw, for tests to assert on.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use duplex_audit_pair::recovery::{Outcome, TrailRecord, plan_recovery};
use duplex_audit_pair::{AuditBackup, BackupAction, PrimaryConfig};
use duplex_lsg::{
    LogStorageGroup, LsgConfig, LsgId, LsgOptions, Lsn, OpenMode, OwnerEpoch, RecordType, SimStore,
};
use duplex_pair::records::AuditBody;
use duplex_pair::stream::{PairMessage, PairTag};
use duplex_pair::{ClientId, CommitState, MessageTableLimits, Receipt, Reply, RequestSeq, TxId};
use duplex_transport::{
    EndpointId, Event, Path, PeerEvent, RequestId, SimConfig, SimNetwork, SimTransport, StreamId,
    Transport,
};
use duplex_volume_pair::LockConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::owner::{LsgOwner, OwnerAction, OwnerConfig, OwnerStart};
use crate::protocol::{ClientReply, ClientRequest, Op, OpError};
use crate::takeover::{Chain, StartKind, TakeoverError, TakeoverReport, Taker, take_over};

const LSG: LsgId = LsgId(1);
const ACCOUNTS: &str = "accounts";
const MARKERS: &str = "markers";
const PAIR_STREAM: StreamId = StreamId(1);
const QUANTUM: Duration = Duration::from_micros(500);
const START_BALANCE: i64 = 1_000;
/// The LSG whose trail logs the decisions on transactions prepared here (scripted runs).
const COORDINATOR: LsgId = LsgId(2);

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
    /// Acknowledged from memory and lost to a power loss of the whole host, or to every CPU
    /// killed at once (allowed: the receipt said normal, two failure domains, and both were
    /// lost).
    pub transfers_lost_to_power_loss: usize,
    pub takeovers_warm: usize,
    pub takeovers_cold: usize,
    pub faults: Vec<String>,
    pub aborted_by_deadlock_or_timeout: usize,
    /// Every takeover that ran, in order.
    pub takeovers: Vec<SimTakeover>,
    /// Every commit a client saw acknowledged, in the order they saw them.
    pub acknowledged: Vec<Acknowledged>,
    pub lost_reply: Option<LostReply>,
    pub resent_answer: Option<ResentAnswer>,
    pub prepared: Option<PreparedReport>,
    pub probes: Vec<ProbeReport>,
    /// Replies sent to clients by a CPU after it resumed from [`Fault::StopPrimary`].
    pub replies_after_resume: Vec<(Duration, EndpointId, ClientReply)>,
    /// Why a resumed CPU stopped being an owner.
    pub resumed_owner_stopped: Vec<(Duration, EndpointId, String)>,
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

// ---- scripted runs ----------------------------------------------------------------------

/// The steps of a scripted run, in order: each waits for the one before it.
pub type Script = Vec<ScriptStep>;

/// Once `when` holds (checked every quantum, after the step before it ran), `fault` happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptStep {
    pub when: When,
    pub fault: Fault,
}

impl ScriptStep {
    pub fn new(when: When, fault: Fault) -> Self {
        ScriptStep { when, fault }
    }
}

/// When a scripted step runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum When {
    /// At this virtual time or later.
    At(Duration),
    /// This long after the step before it ran.
    After(Duration),
    /// Once clients have seen this many transfers committed in all.
    Committed(usize),
    /// Once clients have seen this many transfers committed with a receipt in `state` since
    /// the step before it ran.
    CommittedIn { state: CommitState, count: usize },
    /// Once a client has seen a commit acknowledged whose record the owner's trail does not
    /// hold yet (acknowledged from memory, normal state).
    AckedBeyondTrail,
    /// Once the owner is in normal state and does not count its same-node half.
    HomeNotCounting,
    /// Once everything the owner appended is written to the trail while some client's
    /// transfer has a write answered and its commit not yet sent: a recovery now has a loser
    /// to undo.
    LoserInTrail,
    /// Once a takeover has finished since the step before it ran.
    OwnerReady,
    /// Once the scripted prepared transfer was answered `Prepared`.
    Prepared,
    /// Once the commit reply set aside by [`Fault::LoseNextCommitReply`] was dropped.
    ReplyLost,
    /// Once some client's transfer has a write answered and its commit not yet sent.
    WriteInFlight,
    /// Once all of these hold at once.
    All(Vec<When>),
}

/// Which CPUs a scripted kill takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The owner's CPU.
    Primary,
    /// The other CPU of the owner's node: its same-node backup half.
    HomeBackup,
    /// Both CPUs of the owner's node.
    HomeNode,
    /// Both CPUs of the other node.
    BackupNode,
    /// Every CPU of both nodes, without a power loss: the page cache survives, every
    /// process's memory is gone.
    AllCpus,
    Cpu(EndpointId),
}

/// When a killed CPU starts again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// After a random 150-600 ms, as in random runs.
    Auto,
    /// Only at a [`Fault::Restart`].
    Held,
}

/// What a scripted step does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Nothing but a line in the log: a step that only waits.
    Note(String),
    Kill {
        target: Target,
        restart: Restart,
    },
    /// Starts every CPU killed with [`Restart::Held`].
    Restart,
    /// Cuts every path between the two nodes (clients reach both), until [`Fault::Heal`].
    Partition,
    Heal,
    /// Power loss of the whole host: every process dies, unsynced writes may be lost.
    PowerLoss,
    /// SIGSTOP of the owner's CPU: it stops running its event loop (its memory, its open LSG
    /// and its transport stay; frames for it queue up) until [`Fault::Resume`].
    StopPrimary,
    /// The node service gives up on the stopped owner and ends its ownership so a backup can
    /// take over (see [`run_script`] for how the sim models it).
    StealLock,
    /// SIGCONT of the stopped CPU: it runs its event loop again with what it had.
    Resume,
    /// The next taker's process dies at its `after_writes`-th file write from the start of
    /// its `take_over` (re-append, redo, undo, or its first flushes after it).
    CrashNextTaker {
        after_writes: u64,
    },
    /// The next commit acknowledgement an owner sends is lost on the wire: the client resends.
    LoseNextCommitReply,
    /// Client `client`'s next transfer ends with `Prepare` instead of `Commit`, then waits for
    /// the coordinator's decision ([`Fault::Resolve`]).
    PrepareNext {
        client: usize,
    },
    /// A probe transaction reads one key and reports how long it waited.
    Probe {
        key: ProbeKey,
    },
    /// The coordinator's decision on the prepared transfer, applied by the current owner with
    /// [`LsgOwner::resolve_in_doubt`]. The transfer must be in doubt there.
    Resolve(Outcome),
}

/// Which key a probe reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKey {
    /// The account the prepared transfer debits: in its write set.
    InDoubt,
    /// An account no transfer touches.
    Free,
}

/// A backup's copy of the stream as a taker saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySummary {
    pub from: EndpointId,
    /// The epoch of the primary whose stream it is.
    pub epoch: OwnerEpoch,
    pub first: Option<Lsn>,
    pub last: Option<Lsn>,
}

impl CopySummary {
    fn of(from: EndpointId, chain: &Chain) -> Self {
        CopySummary {
            from,
            epoch: chain.epoch,
            first: chain.records.first().map(|r| r.lsn),
            last: chain.records.last().map(|r| r.lsn),
        }
    }
}

/// One takeover that ran (attempts that found no complete copy and waited are not listed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimTakeover {
    pub at: Duration,
    pub taker: EndpointId,
    /// The epoch it opened the LSG with.
    pub epoch: OwnerEpoch,
    /// The trail's last record when it opened the LSG.
    pub trail_end: Lsn,
    /// Its own copy of the stream, if it held records.
    pub own: Option<CopySummary>,
    /// The copies the other backups sent.
    pub gathered: Vec<CopySummary>,
    /// A crash armed by [`Fault::CrashNextTaker`] for this taker.
    pub crash_armed: Option<u64>,
    pub outcome: Result<TakeoverReport, String>,
    /// Commits acknowledged to clients (by the end of the run) by earlier owners, with an LSN
    /// beyond `trail_end`: only a backup's copy held them.
    pub acked_beyond_trail_end: Vec<Lsn>,
}

/// A transfer a client saw committed, with its receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acknowledged {
    pub transfer: u64,
    pub commit_lsn: Lsn,
    pub epoch: OwnerEpoch,
    pub state: CommitState,
}

/// A commit acknowledgement lost on the wire ([`Fault::LoseNextCommitReply`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostReply {
    pub at: Duration,
    /// The owner that sent it.
    pub by: EndpointId,
    pub client: ClientId,
    pub seq: RequestSeq,
    pub tx: TxId,
    pub receipt: Receipt,
}

/// The answer the client got when it resent the request whose reply was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResentAnswer {
    pub at: Duration,
    /// The owner when it was answered, and its epoch.
    pub owner: Option<EndpointId>,
    pub owner_epoch: Option<OwnerEpoch>,
    pub reply: Reply,
    /// Commit records of the transaction in that owner's trail (durable part, from its first
    /// retained record) when the answer came.
    pub commit_records_in_trail: usize,
}

/// What a probe transaction saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    pub key: ProbeKey,
    /// When its read was sent.
    pub read_sent_at: Option<Duration>,
    pub answered_at: Option<Duration>,
    pub reply: Option<ClientReply>,
}

/// The scripted prepared transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedReport {
    pub tx: TxId,
    pub transfer: u64,
    /// The accounts it debits and credits.
    pub accounts: (usize, usize),
    pub prepared_at: Duration,
    /// The in-doubt transactions of the owner that applied the decision, just before.
    pub in_doubt_at_resolve: Vec<TxId>,
    pub resolved: Option<(Duration, Outcome)>,
}

type ReplyTo = (EndpointId, RequestId);
/// Key-value pairs read from a volume.
type Rows = Vec<(Vec<u8>, Vec<u8>)>;
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
    /// Stopped (SIGSTOP): its event loop does not run.
    stopped: bool,
    /// Resumed after a stop: its replies are recorded.
    resumed: bool,
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
    /// The next transfer ends with `Prepare` (scripted).
    prepare_next: bool,
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
    /// (owner epoch, durable LSN) whenever every CPU lost its memory at once (a power loss of
    /// the whole host, or all CPUs killed): commits of that epoch acknowledged from memory
    /// beyond it may be gone.
    memory_losses: Vec<(OwnerEpoch, Lsn)>,
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
    /// The scripted run's state; `None` in a random run.
    script: Option<Box<Scripted>>,
}

/// The state of a scripted run.
#[derive(Debug)]
struct Scripted {
    steps: VecDeque<ScriptStep>,
    last_step_at: Duration,
    /// Successful takeovers when the last step ran.
    takeovers_at_last_step: usize,
    /// Commits clients had seen when the last step ran.
    committed_at_last_step: usize,
    /// CPUs killed with [`Restart::Held`].
    held: BTreeSet<EndpointId>,
    crash_next_taker: Option<u64>,
    lose_next_commit_reply: bool,
    stopped: Option<EndpointId>,
    /// The prepared transfer: client index, transaction, transfer.
    prepared: Option<(usize, TxId, Transfer)>,
    probes: Vec<ProbeClient>,
}

#[derive(Debug)]
struct ProbeClient {
    volume: String,
    account: usize,
    id: ClientId,
    transport: SimTransport,
    next_seq: u64,
    tx: Option<TxId>,
    /// 0: begin, 1: read, 2: abort, 3: done.
    stage: u8,
    pending: Option<(Option<RequestId>, ClientRequest)>,
    report: ProbeReport,
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
                    stopped: false,
                    resumed: false,
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
                prepare_next: false,
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
            memory_losses: Vec::new(),
            partitioned_until: None,
            node_takeover_at: None,
            pending_node_kill: None,
            last_owner: None,
            takeover_retry_at: None,
            quiet_until: Duration::ZERO,
            memory_lost_everywhere: false,
            script: None,
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
        cpu.stopped = false;
        cpu.resumed = false;
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
            self.memory_losses.push((epoch, durable));
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

// ---- scripted faults --------------------------------------------------------------------

impl World {
    /// The owner's CPU and its owner, if one runs.
    fn current_owner(&self) -> Option<(EndpointId, &Owner)> {
        let id = self.primary?;
        match &self.cpus.get(&id)?.role {
            Role::Owner { owner, .. } => Some((id, owner)),
            _ => None,
        }
    }

    fn successful_takeovers(&self) -> usize {
        self.report
            .takeovers
            .iter()
            .filter(|t| t.outcome.is_ok())
            .count()
    }

    fn holds(&self, when: &When) -> bool {
        let Some(script) = &self.script else {
            return false;
        };
        let now = self.now();
        match when {
            When::At(at) => now >= *at,
            When::After(d) => now >= script.last_step_at + *d,
            When::Committed(n) => self.committed.len() >= *n,
            When::CommittedIn { state, count } => {
                self.committed
                    .iter()
                    .skip(script.committed_at_last_step)
                    .filter(|c| c.state == *state)
                    .count()
                    >= *count
            }
            When::AckedBeyondTrail => self.current_owner().is_some_and(|(_, owner)| {
                let durable = owner.lsg().audit().durable_lsn();
                self.committed
                    .iter()
                    .any(|c| c.epoch == owner.epoch() && c.lsn > durable)
            }),
            When::HomeNotCounting => self.current_owner().is_some_and(|(_, owner)| {
                owner.state() == CommitState::Normal && !owner.primary().home_counts()
            }),
            When::LoserInTrail => self.current_owner().is_some_and(|(_, owner)| {
                let written = owner.lsg().audit().durable_lsn();
                written.0 + 1 == owner.primary().next_lsn().0 && self.holds(&When::WriteInFlight)
            }),
            When::WriteInFlight => self
                .clients
                .iter()
                .any(|c| c.transfer.is_some() && matches!(c.step, 4 | 5)),
            When::All(all) => all.iter().all(|w| self.holds(w)),
            When::OwnerReady => {
                self.primary.is_some()
                    && self.successful_takeovers() > script.takeovers_at_last_step
            }
            When::Prepared => script.prepared.is_some(),
            When::ReplyLost => self.report.lost_reply.is_some(),
        }
    }

    /// Runs every scripted step whose time has come.
    fn step_script(&mut self) -> Result<(), SimFailure> {
        loop {
            let Some(step) = self.script.as_ref().and_then(|s| s.steps.front().cloned()) else {
                return Ok(());
            };
            if !self.holds(&step.when) {
                return Ok(());
            }
            let now = self.now();
            let takeovers = self.successful_takeovers();
            let committed = self.committed.len();
            if let Some(script) = self.script.as_mut() {
                script.steps.pop_front();
                script.last_step_at = now;
                script.takeovers_at_last_step = takeovers;
                script.committed_at_last_step = committed;
            }
            self.note(format!("SCRIPT {:?}: {:?}", step.when, step.fault));
            self.report.faults.push(format!("{now:?} {:?}", step.fault));
            self.apply_fault(step.fault)?;
        }
    }

    fn targets(&self, target: Target) -> Result<Vec<EndpointId>, SimFailure> {
        let home = self.primary.map_or(self.last_home_node(), |p| p.node);
        Ok(match target {
            Target::Primary => match self.primary {
                Some(p) => vec![p],
                None => return Err(self.fail("script: no primary to kill".into())),
            },
            Target::HomeBackup => {
                let Some(p) = self.primary else {
                    return Err(self.fail("script: no primary, so no home backup".into()));
                };
                vec![EndpointId::new(p.node, 1 - p.cpu)]
            }
            Target::HomeNode => CPUS.into_iter().filter(|c| c.node == home).collect(),
            Target::BackupNode => CPUS.into_iter().filter(|c| c.node != home).collect(),
            Target::AllCpus => CPUS.to_vec(),
            Target::Cpu(id) => vec![id],
        })
    }

    fn apply_fault(&mut self, fault: Fault) -> Result<(), SimFailure> {
        let now = self.now();
        match fault {
            Fault::Note(_) => {}
            Fault::Kill { target, restart } => {
                let ids = self.targets(target)?;
                if target == Target::AllCpus {
                    // Every process's memory goes; the page cache stays. Commits acknowledged
                    // from memory and not yet written are gone, as their receipts allowed.
                    if let Some((_, owner)) = self.current_owner() {
                        let lost = (owner.epoch(), owner.lsg().audit().durable_lsn());
                        self.memory_losses.push(lost);
                    }
                }
                for id in ids {
                    self.kill(id, "script");
                    if restart == Restart::Held
                        && let Some(cpu) = self.cpus.get_mut(&id)
                    {
                        cpu.restart_at = None;
                        if let Some(script) = self.script.as_mut() {
                            script.held.insert(id);
                        }
                    }
                }
                if target == Target::AllCpus {
                    self.memory_lost_everywhere = true;
                }
            }
            Fault::Restart => {
                let held = self
                    .script
                    .as_mut()
                    .map(|s| std::mem::take(&mut s.held))
                    .unwrap_or_default();
                for id in held {
                    let down = self
                        .cpus
                        .get(&id)
                        .is_some_and(|c| matches!(c.role, Role::Down));
                    if down {
                        self.restart(id);
                    }
                }
            }
            Fault::Partition => self.set_partition(true),
            Fault::Heal => self.set_partition(false),
            Fault::PowerLoss => self.power_loss(),
            Fault::StopPrimary => {
                let Some(p) = self.primary else {
                    return Err(self.fail("script: no primary to stop".into()));
                };
                if let Some(cpu) = self.cpus.get_mut(&p) {
                    cpu.stopped = true;
                }
                if let Some(script) = self.script.as_mut() {
                    script.stopped = Some(p);
                }
                self.note(format!("{p} stopped (SIGSTOP)"));
            }
            Fault::StealLock => {
                let Some(id) = self.script.as_ref().and_then(|s| s.stopped) else {
                    return Err(self.fail("script: no stopped CPU to steal the lock from".into()));
                };
                // The node service found the owner unresponsive. It must end the owner's hold
                // on the LSG before a backup can open it: on one host by killing the process
                // (SIGKILL ends even a stopped process, and the kernel frees its lock), across
                // hosts by letting its lease lapse. The sim models the lock's loss by killing
                // the stopped process's store handle only: its lock is free and every file
                // operation it tries fails, while its memory, its open LSG, its owner state
                // and its transport live on, as a process that wakes up would have them.
                if let Some(cpu) = self.cpus.get_mut(&id) {
                    cpu.store.kill_process();
                }
                if self.primary == Some(id) {
                    self.primary = None;
                }
                self.note(format!(
                    "node service: {id} does not answer; its lock is taken from it"
                ));
            }
            Fault::Resume => {
                let Some(id) = self.script.as_mut().and_then(|s| s.stopped.take()) else {
                    return Err(self.fail("script: no stopped CPU to resume".into()));
                };
                if let Some(cpu) = self.cpus.get_mut(&id) {
                    cpu.stopped = false;
                    cpu.resumed = true;
                }
                self.note(format!("{id} resumed (SIGCONT)"));
            }
            Fault::CrashNextTaker { after_writes } => {
                if let Some(script) = self.script.as_mut() {
                    script.crash_next_taker = Some(after_writes);
                }
            }
            Fault::LoseNextCommitReply => {
                if let Some(script) = self.script.as_mut() {
                    script.lose_next_commit_reply = true;
                }
            }
            Fault::PrepareNext { client } => match self.clients.get_mut(client) {
                Some(c) => c.prepare_next = true,
                None => return Err(self.fail(format!("script: no client {client}"))),
            },
            Fault::Probe { key } => {
                let account = match key {
                    ProbeKey::InDoubt => match &self.report.prepared {
                        Some(prepared) => prepared.accounts.0,
                        None => {
                            return Err(self.fail(
                                "script: a probe of the in-doubt key needs a prepared transfer"
                                    .into(),
                            ));
                        }
                    },
                    ProbeKey::Free => self.options.accounts + 1,
                };
                let index = self.script.as_ref().map_or(0, |s| s.probes.len());
                let endpoint = EndpointId::new(4, index as u16);
                let transport = self.net.add_endpoint(endpoint, &[Path::Main]);
                let probe = ProbeClient {
                    volume: ACCOUNTS.into(),
                    account,
                    id: ClientId(9000 + index as u64),
                    transport,
                    next_seq: 1,
                    tx: None,
                    stage: 0,
                    pending: None,
                    report: ProbeReport {
                        key,
                        read_sent_at: None,
                        answered_at: None,
                        reply: None,
                    },
                };
                if let Some(script) = self.script.as_mut() {
                    script.probes.push(probe);
                }
            }
            Fault::Resolve(outcome) => self.resolve(now, outcome)?,
        }
        Ok(())
    }

    /// The coordinator's decision on the prepared transfer, applied by the current owner.
    fn resolve(&mut self, now: Duration, outcome: Outcome) -> Result<(), SimFailure> {
        let Some((index, tx, transfer)) = self.script.as_mut().and_then(|s| s.prepared.take())
        else {
            return Err(self.fail("script: nothing prepared to resolve".into()));
        };
        let owner = self
            .primary
            .and_then(|p| match &mut self.cpus.get_mut(&p)?.role {
                Role::Owner { owner, .. } => Some(owner),
                _ => None,
            });
        let Some(owner) = owner else {
            return Err(self.fail("script: no owner to resolve the prepared transfer".into()));
        };
        let in_doubt: Vec<TxId> = owner.in_doubt().map(|d| d.tx).collect();
        let resolved = owner.resolve_in_doubt(now, tx, outcome);
        let commit_lsn = Lsn(owner.primary().next_lsn().0 - 1);
        let (epoch, state) = (owner.epoch(), owner.state());
        if let Some(p) = self.report.prepared.as_mut() {
            p.in_doubt_at_resolve = in_doubt;
            p.resolved = Some((now, outcome));
        }
        if let Err(e) = resolved {
            return Err(self.fail(format!("resolving {tx} ({outcome:?}) failed: {e}")));
        }
        self.note(format!("coordinator: {tx} {outcome:?}"));
        let client = &mut self.clients[index];
        match outcome {
            Outcome::Commit => {
                client.done += 1;
                client.transfer = None;
                client.pending = None;
                self.committed.push(Committed {
                    transfer: transfer.id,
                    lsn: commit_lsn,
                    epoch,
                    state,
                });
                self.report.transfers_committed += 1;
            }
            Outcome::Abort => Self::restart_transfer(client, now, Duration::from_millis(1)),
        }
        Ok(())
    }

    /// Runs the probe transactions: begin, read the key, abort.
    fn step_probes(&mut self) {
        let now = self.now();
        let primary = self.primary;
        let Some(script) = self.script.as_mut() else {
            return;
        };
        for probe in &mut script.probes {
            let mut replies = Vec::new();
            while let Some(e) = probe.transport.try_next_event() {
                match e {
                    Event::Response { id, payload, .. }
                        if probe.pending.as_ref().is_some_and(|(p, _)| *p == Some(id)) =>
                    {
                        replies
                            .push(ClientReply::decode(&payload).unwrap_or_else(ClientReply::Error));
                    }
                    Event::RequestFailed { id, .. } => {
                        if let Some((p, _)) = probe.pending.as_mut()
                            && *p == Some(id)
                        {
                            *p = None;
                        }
                    }
                    _ => {}
                }
            }
            for reply in replies {
                probe.pending = None;
                match (probe.stage, &reply) {
                    (_, ClientReply::Error(OpError::NotPrimary { .. })) => {}
                    (0, ClientReply::Began(tx)) => {
                        probe.tx = Some(*tx);
                        probe.stage = 1;
                    }
                    (1, _) => {
                        probe.report.answered_at = Some(now);
                        probe.report.reply = Some(reply.clone());
                        probe.stage = if matches!(reply, ClientReply::Value(_)) {
                            2
                        } else {
                            3
                        };
                    }
                    _ => probe.stage = 3,
                }
            }
            if probe.pending.is_none() && probe.stage < 3 {
                let op = match probe.stage {
                    0 => Op::Begin,
                    1 => Op::Get {
                        volume: probe.volume.clone(),
                        key: account_key(probe.account),
                    },
                    _ => Op::Abort,
                };
                let seq = probe.next_seq;
                probe.next_seq += 1;
                probe.pending = Some((
                    None,
                    ClientRequest {
                        client: probe.id,
                        seq: RequestSeq(seq),
                        seen_below: RequestSeq(seq),
                        tx: probe.tx,
                        op,
                    },
                ));
            }
            if let (Some((None, request)), Some(p)) = (&probe.pending, primary) {
                let request = request.clone();
                let sent = request.encode().ok().and_then(|bytes| {
                    probe
                        .transport
                        .request(p, Bytes::from(bytes), Duration::from_secs(2))
                        .ok()
                });
                if let Some(id) = sent {
                    if probe.stage == 1 && probe.report.read_sent_at.is_none() {
                        probe.report.read_sent_at = Some(now);
                    }
                    probe.pending = Some((Some(id), request));
                }
            }
        }
    }

    fn script_done(&self) -> bool {
        self.script.as_ref().is_none_or(|s| {
            s.steps.is_empty()
                && s.stopped.is_none()
                && s.prepared.is_none()
                && s.probes.iter().all(|p| p.stage == 3)
        })
    }

    /// Commit records of `tx` in the durable trail of `owner`, from its first retained record.
    fn commit_records(owner: &Owner, tx: TxId) -> usize {
        let audit = owner.lsg().audit();
        let Ok(reader) = audit.reader(audit.first_lsn()) else {
            return 0;
        };
        reader
            .filter_map(Result::ok)
            .filter(|r| r.record_type == RecordType::Commit)
            .filter(|r| {
                matches!(AuditBody::decode(r.lsn, r.record_type, &r.payload),
                    Ok(AuditBody::Commit(end)) if end.tx == tx)
            })
            .count()
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
        if cpu.stopped {
            // SIGSTOP: nothing runs; frames for it wait in its transport's queue.
            return Ok(());
        }
        let resumed = cpu.resumed;
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
                            if resumed {
                                self.report
                                    .replies_after_resume
                                    .push((now, id, reply.clone()));
                            }
                            if let ClientReply::Outcome(Reply::Committed(receipt)) = &reply
                                && let Some(script) = self.script.as_mut()
                                && script.lose_next_commit_reply
                                && to.0.node == 3
                                && let Some(client) = self.clients.get(usize::from(to.0.cpu))
                                && let Some((Some(rid), request)) = &client.pending
                                && *rid == to.1
                                && let Some(tx) = request.tx
                            {
                                // Lost on the wire: the client hears nothing and resends.
                                script.lose_next_commit_reply = false;
                                self.report.lost_reply = Some(LostReply {
                                    at: now,
                                    by: id,
                                    client: client.id,
                                    seq: request.seq,
                                    tx,
                                    receipt: *receipt,
                                });
                                notes.push(format!(
                                    "the commit reply of {tx} to client {} is lost",
                                    client.id.0
                                ));
                                continue;
                            }
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
                    if resumed {
                        self.report
                            .resumed_owner_stopped
                            .push((now, id, reason.clone()));
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
        let mut attempt = SimTakeover {
            at: now,
            taker: id,
            epoch: g.lsg.owner_epoch(),
            trail_end: Lsn(g.lsg.audit().next_lsn().0 - 1),
            own: own.as_ref().map(|c| CopySummary::of(id, c)),
            gathered: g
                .chains
                .iter()
                .map(|(from, c)| CopySummary::of(*from, c))
                .collect(),
            crash_armed: self.script.as_mut().and_then(|s| s.crash_next_taker.take()),
            outcome: Err(String::new()),
            acked_beyond_trail_end: Vec::new(),
        };
        if let Some(n) = attempt.crash_armed {
            cpu.store.crash_after_writes(n);
        }
        let result = take_over::<SimStore, ReplyTo>(g.lsg, taker, own, g.chains, owner_config, now);
        match &result {
            Ok((_, report)) => attempt.outcome = Ok(report.clone()),
            Err(TakeoverError::CopyMissing { .. }) => {}
            Err(e) => attempt.outcome = Err(e.to_string()),
        }
        if !matches!(result, Err(TakeoverError::CopyMissing { .. })) {
            self.report.takeovers.push(attempt);
        }
        match result {
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
        self.note_resent_answer(index, &reply);
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
            (ClientReply::Written, 5) if client.prepare_next => {
                client.step = 7;
                client.prepare_next = false;
                Self::issue(
                    client,
                    Op::Prepare {
                        coordinator: COORDINATOR,
                    },
                );
            }
            (ClientReply::Written, 5) => {
                client.step = 6;
                Self::issue(client, Op::Commit);
            }
            (ClientReply::Prepared, 7) => {
                // In doubt as far as this LSG goes: the client waits for the coordinator.
                client.pending = None;
                let Some(tx) = client.tx else {
                    return Err(self.fail("a prepared transfer without a transaction".into()));
                };
                if let Some(script) = self.script.as_mut() {
                    script.prepared = Some((index, tx, transfer.clone()));
                }
                self.report.prepared = Some(PreparedReport {
                    tx,
                    transfer: transfer.id,
                    accounts: (transfer.from, transfer.to),
                    prepared_at: now,
                    in_doubt_at_resolve: Vec::new(),
                    resolved: None,
                });
                self.note(format!(
                    "client {index} transfer {} prepared as {tx}",
                    transfer.id
                ));
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

    /// The answer to a resent request whose first reply was lost.
    fn note_resent_answer(&mut self, index: usize, reply: &ClientReply) {
        let (Some(lost), ClientReply::Outcome(outcome)) = (&self.report.lost_reply, reply) else {
            return;
        };
        let client = &self.clients[index];
        let resent = client.id == lost.client
            && client
                .pending
                .as_ref()
                .is_some_and(|(_, r)| r.seq == lost.seq);
        if !resent || self.report.resent_answer.is_some() {
            return;
        }
        let tx = lost.tx;
        let owner = self.current_owner();
        let answer = ResentAnswer {
            at: self.now(),
            owner: owner.map(|(id, _)| id),
            owner_epoch: owner.map(|(_, o)| o.epoch()),
            reply: *outcome,
            commit_records_in_trail: owner.map_or(0, |(_, o)| Self::commit_records(o, tx)),
        };
        self.report.resent_answer = Some(answer);
    }

    fn clients_done(&self) -> bool {
        self.clients
            .iter()
            .all(|c| c.done >= self.options.transfers_per_client && c.pending.is_none())
    }

    // ---- the oracle -------------------------------------------------------------------

    /// The bank after the run: totals, balances against markers, acknowledged transfers.
    fn check_bank(&mut self) -> Result<(), SimFailure> {
        let Some((_, owner)) = self.current_owner() else {
            return Err(self.fail("no owner at the end".into()));
        };
        if owner.active_transactions() != 0 {
            return Err(self.fail(format!(
                "{} transactions still active at the end",
                owner.active_transactions()
            )));
        }
        let lsg = std::sync::Arc::clone(owner.lsg());
        self.check_trail(&lsg)
            .map_err(|e| self.fail(format!("the final trail does not recover: {e}")))?;
        let read_all = |name: &str| -> Result<Rows, String> {
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
                        .memory_losses
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

    /// Reads the owner's retained durable trail as a cold recovery would: it must plan
    /// without error (dense LSNs, no transaction ended twice, no update undone twice, every
    /// checkpoint agreeing with the records before it).
    fn check_trail(&self, lsg: &LogStorageGroup<SimStore>) -> Result<(), String> {
        let audit = lsg.audit();
        let mut records = Vec::new();
        for r in audit.reader(audit.first_lsn()).map_err(|e| e.to_string())? {
            let r = r.map_err(|e| e.to_string())?;
            let body =
                AuditBody::decode(r.lsn, r.record_type, &r.payload).map_err(|e| e.to_string())?;
            records.push(TrailRecord {
                lsn: r.lsn,
                flags: r.flags,
                body,
            });
        }
        let volumes: BTreeMap<String, Lsn> = lsg
            .volume_names()
            .into_iter()
            .filter_map(|name| {
                let lsn = lsg.volume(&name).ok()?.checkpoint_lsn();
                Some((name, lsn))
            })
            .collect();
        plan_recovery(records, &volumes, MessageTableLimits::default())
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// What the report says about the whole run, once it ended.
    fn finish_report(&mut self) {
        self.report.acknowledged = self
            .committed
            .iter()
            .map(|c| Acknowledged {
                transfer: c.transfer,
                commit_lsn: c.lsn,
                epoch: c.epoch,
                state: c.state,
            })
            .collect();
        for t in &mut self.report.takeovers {
            t.acked_beyond_trail_end = self
                .committed
                .iter()
                .filter(|c| c.epoch < t.epoch && c.lsn > t.trail_end)
                .map(|c| c.lsn)
                .collect();
        }
        if let Some(script) = &self.script {
            self.report.probes = script.probes.iter().map(|p| p.report.clone()).collect();
        }
    }
}

/// Runs one seeded history with random faults and checks it. See the module docs.
pub fn run(options: SimOptions) -> Result<SimReport, SimFailure> {
    run_world(options, None)
}

/// Runs one seeded history with the faults of `script` (and no random ones; messages are
/// still lost with `options.loss_probability`) and checks it like [`run`]. The run ends once
/// every step ran, no CPU is stopped, nothing prepared waits for its decision, every probe
/// finished and the clients are done.
///
/// A stopped owner ([`Fault::StopPrimary`]) keeps the LSG's lock: the takeover waits for a
/// [`Fault::StealLock`], the node service's decision that the owner is gone. See there for the
/// model; once the stopped CPU resumes, whatever it sends to clients is in
/// [`SimReport::replies_after_resume`].
pub fn run_script(options: SimOptions, script: Script) -> Result<SimReport, SimFailure> {
    run_world(options, Some(script))
}

fn run_world(options: SimOptions, script: Option<Script>) -> Result<SimReport, SimFailure> {
    let mut w = World::new(options).map_err(|e| SimFailure {
        seed: options.seed,
        at: Duration::ZERO,
        reason: e,
        log: String::new(),
    })?;
    w.script = script.map(|steps| {
        Box::new(Scripted {
            steps: steps.into(),
            last_step_at: Duration::ZERO,
            takeovers_at_last_step: 0,
            committed_at_last_step: 0,
            held: BTreeSet::new(),
            crash_next_taker: None,
            lose_next_commit_reply: false,
            stopped: None,
            prepared: None,
            probes: Vec::new(),
        })
    });
    w.create()
        .map_err(|e| w.fail(format!("creating the LSG: {e}")))?;
    let rounds = (options.time_limit.as_micros() / QUANTUM.as_micros()) as u64;
    let mut finished = false;
    for _ in 0..rounds {
        let next = w.now() + QUANTUM;
        w.net.run_until(next);
        if w.script.is_some() {
            w.step_script()?;
            w.step_probes();
        } else {
            w.inject_faults();
        }
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
            && w.script_done()
        {
            finished = true;
            break;
        }
    }
    if !finished {
        let progress: Vec<usize> = w.clients.iter().map(|c| c.done).collect();
        let script_left = w.script.as_ref().map(|s| s.steps.front().cloned());
        return Err(w.fail(format!(
            "clients did not finish within {:?} of virtual time (transfers done per client: {progress:?}, primary {:?}, next scripted step {script_left:?})",
            options.time_limit, w.primary
        )));
    }
    w.check_bank()?;
    w.finish_report();
    w.report.virtual_time = w.now();
    Ok(w.report)
}
