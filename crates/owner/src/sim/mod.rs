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

//!
//! Split by job: `world` (setup, CPUs started and killed, random faults), `script` and
//! `scripted` (forced paths), `cpus` (driving owners and backups, takeovers), `clients` (the
//! bank workload), `oracle` (the checks at the end).

mod clients;
mod cpus;
mod oracle;
mod script;
mod scripted;
mod world;

pub use script::*;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use duplex_audit_pair::recovery::{Outcome, plan_recovery};
use duplex_audit_pair::{AuditBackup, BackupAction, PrimaryConfig};
use duplex_lsg::{
    LogStorageGroup, LsgConfig, LsgId, LsgOptions, Lsn, OpenMode, OwnerEpoch, RecordType, SimStore,
};
use duplex_pair::records::AuditBody;
use duplex_pair::stream::{PairMessage, PairTag};
use duplex_pair::{ClientId, CommitState, MessageTableLimits, Receipt, Reply, RequestSeq, TxId};
use duplex_pair::{Clock, VirtualClock};
use duplex_transport::{
    EndpointId, Event, Path, PeerEvent, RequestId, SimConfig, SimNetwork, SimTransport, StreamId,
    Transport,
};
use duplex_volume_pair::LockConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::owner::{LsgOwner, OwnerAction, OwnerConfig, OwnerStart};
use crate::protocol::{ClientReply, ClientRequest, Op, OpError};
use crate::takeover::{
    Chain, Copies, StartKind, TakeoverError, TakeoverReport, Taker, read_trail, take_over,
    trail_records, volume_checkpoints,
};

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
    copies: Copies,
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
    clock: VirtualClock,
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

fn account_key(a: usize) -> Vec<u8> {
    format!("acct{a:04}").into_bytes()
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
        w.clock.advance_to(w.net.now());
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
