//! Scripted runs: faults at chosen moments instead of random ones, and what the report tells
//! about each takeover, so a test can force one path and check it.

use super::*;

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
    pub(super) fn of(from: EndpointId, chain: &Chain) -> Self {
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
