//! Random histories against the lock manager, with oracles that know nothing of its insides.
//!
//! A seeded simulator plays an owner: transactions read, write and scan a few keys, commit,
//! abort, are abandoned while waiting, time out; some runs start with in-doubt transactions
//! relocked. After every step it checks `validate()` and that no two live transactions were
//! ever granted conflicting accesses; every grant and abort it hears must answer a wait it
//! knows of; `expire` must leave nobody waiting past its deadline. At the end it ends every
//! transaction that does not wait and requires that every waiter was granted or aborted (no
//! lost wake-up, no undetected deadlock), and that the history of accesses granted to committed
//! transactions is conflict-serializable.
//!
//! A failure names its seed; `DUPLEX_SEED=<seed>` replays that one seed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use duplex_lsg::OwnerEpoch;
use duplex_pair::{AbortReason, TxId};
use duplex_volume_pair::{LockConfig, LockError, LockOutcome, VolumePair};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SEEDS: u64 = 400;
const STEPS: usize = 300;
const KEYS: u8 = 6;
const MAX_LIVE_TXS: usize = 6;
const LOCK_TIMEOUT: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read(u8),
    Write(u8),
    Scan,
}

impl Access {
    fn conflicts(self, other: Access) -> bool {
        match (self, other) {
            (Access::Write(a), Access::Write(b) | Access::Read(b))
            | (Access::Read(a), Access::Write(b)) => a == b,
            (Access::Scan, Access::Write(_)) | (Access::Write(_), Access::Scan) => true,
            _ => false,
        }
    }

    fn key(self) -> Option<Vec<u8>> {
        match self {
            Access::Read(k) | Access::Write(k) => Some(vec![k]),
            Access::Scan => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Waiting {
        access: Access,
        deadline: Duration,
    },
    /// Told to abort; holds its locks until the owner releases it.
    Aborted,
}

#[derive(Debug)]
struct Tx {
    state: State,
    granted: Vec<Access>,
    in_doubt: bool,
}

#[derive(Debug, Default)]
struct Stats {
    granted: u64,
    waited: u64,
    deadlocks: u64,
    deadlocks_found_by_release: u64,
    timeouts: u64,
    refused: u64,
    relocked: u64,
}

struct Sim<'s> {
    seed: u64,
    rng: ChaCha8Rng,
    config: LockConfig,
    pair: VolumePair,
    now: Duration,
    live: BTreeMap<TxId, Tx>,
    next_tx: u64,
    history: Vec<(TxId, Access)>,
    committed: BTreeSet<TxId>,
    trace: Vec<String>,
    stats: &'s mut Stats,
}

impl<'s> Sim<'s> {
    fn new(seed: u64, stats: &'s mut Stats) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let config = LockConfig {
            lock_timeout: LOCK_TIMEOUT,
            max_waiters: rng.random_range(2..=MAX_LIVE_TXS),
            max_locks_per_tx: rng.random_range(3..=KEYS as usize + 1),
        };
        Sim {
            seed,
            rng,
            config,
            pair: VolumePair::new("sim".into(), config),
            now: Duration::ZERO,
            live: BTreeMap::new(),
            next_tx: 1,
            history: Vec::new(),
            committed: BTreeSet::new(),
            trace: Vec::new(),
            stats,
        }
    }

    fn fail(&self, msg: String) -> String {
        let from = self.trace.len().saturating_sub(40);
        format!(
            "seed {} (replay with DUPLEX_SEED={}), config {:?}: {msg}\nlast steps:\n  {}",
            self.seed,
            self.seed,
            self.config,
            self.trace[from..].join("\n  ")
        )
    }

    fn note(&mut self, line: String) {
        self.trace.push(format!("t={:?} {line}", self.now));
    }

    fn pick(&mut self, want: impl Fn(&Tx) -> bool) -> Option<TxId> {
        let candidates: Vec<TxId> = self
            .live
            .iter()
            .filter(|(_, t)| want(t))
            .map(|(id, _)| *id)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        Some(candidates[self.rng.random_range(0..candidates.len())])
    }

    fn begin(&mut self, in_doubt: bool) -> TxId {
        let id = TxId {
            epoch: OwnerEpoch(1),
            number: self.next_tx,
        };
        self.next_tx += 1;
        self.live.insert(
            id,
            Tx {
                state: State::Running,
                granted: Vec::new(),
                in_doubt,
            },
        );
        id
    }

    fn run(&mut self) -> Result<(), String> {
        if self.rng.random_bool(0.3) {
            self.relock_in_doubt()?;
        }
        for _ in 0..STEPS {
            self.step()?;
            self.check()?;
        }
        self.finish()
    }

    /// Recovery: one or two in-doubt transactions take back their write locks first.
    fn relock_in_doubt(&mut self) -> Result<(), String> {
        let mut keys: Vec<u8> = (0..KEYS).collect();
        for _ in 0..self.rng.random_range(1..=2) {
            let tx = self.begin(true);
            let n = self
                .rng
                .random_range(1..=(self.config.max_locks_per_tx - 1).min(2));
            // Disjoint key sets: at most 2 x 2 of the KEYS, so `keys` never runs out.
            let mine: Vec<u8> = (0..n)
                .map(|_| keys.remove(self.rng.random_range(0..keys.len())))
                .collect();
            let as_keys: Vec<Vec<u8>> = mine.iter().map(|k| vec![*k]).collect();
            self.pair
                .relock_in_doubt(tx, &as_keys)
                .map_err(|e| self.fail(format!("relock of {tx}: {e}")))?;
            self.note(format!("{tx} in doubt, relocks {mine:?}"));
            for k in mine {
                self.granted(tx, Access::Write(k));
            }
            self.stats.relocked += 1;
        }
        Ok(())
    }

    fn step(&mut self) -> Result<(), String> {
        match self.rng.random_range(0..100) {
            0..10 if self.live.len() < MAX_LIVE_TXS => {
                let tx = self.begin(false);
                self.note(format!("{tx} begins"));
            }
            0..60 => {
                if let Some(tx) = self.pick(|t| t.state == State::Running && !t.in_doubt) {
                    self.operate(tx)?;
                }
            }
            60..70 => {
                if let Some(tx) = self.pick(|t| t.state == State::Running) {
                    self.end(tx, true)?;
                }
            }
            70..75 => {
                if let Some(tx) = self.pick(|t| t.state == State::Running) {
                    self.end(tx, false)?;
                }
            }
            75..82 => {
                if let Some(tx) = self.pick(|t| t.state == State::Aborted) {
                    self.end(tx, false)?;
                }
            }
            82..84 => {
                // The owner gives up on a waiting transaction (its client left, say).
                if let Some(tx) = self.pick(|t| matches!(t.state, State::Waiting { .. })) {
                    self.end(tx, false)?;
                }
            }
            _ => {
                self.now += Duration::from_millis(self.rng.random_range(0..40));
                if self.pair.next_deadline().is_some_and(|d| d <= self.now) {
                    self.expire()?;
                }
            }
        }
        Ok(())
    }

    fn operate(&mut self, tx: TxId) -> Result<(), String> {
        let key = self.rng.random_range(0..KEYS);
        let access = match self.rng.random_range(0..10) {
            0..4 => Access::Read(key),
            4..9 => Access::Write(key),
            _ => Access::Scan,
        };
        let outcome = match access {
            Access::Read(k) => self.pair.read(self.now, tx, &[k]),
            Access::Write(k) => self.pair.lock_for_write(self.now, tx, &[k]),
            Access::Scan => self.pair.lock_for_scan(self.now, tx),
        };
        self.note(format!("{tx} {access:?} -> {outcome:?}"));
        match outcome {
            Ok(LockOutcome::Granted) => self.granted(tx, access),
            Ok(LockOutcome::Waiting) => {
                self.stats.waited += 1;
                self.set_state(
                    tx,
                    State::Waiting {
                        access,
                        deadline: self.now + self.config.lock_timeout,
                    },
                );
            }
            Ok(LockOutcome::Aborted(AbortReason::Deadlock)) => {
                self.stats.deadlocks += 1;
                self.set_state(tx, State::Aborted);
            }
            Ok(LockOutcome::Aborted(other)) => {
                return Err(self.fail(format!("{tx} aborted by a request with {other:?}")));
            }
            Err(LockError::TooManyLocks { wanted, limit, .. }) => {
                self.stats.refused += 1;
                let held = self.pair.locks_held(tx);
                if wanted <= limit || wanted > held + 2 {
                    return Err(self.fail(format!(
                        "{tx} refused {wanted} locks (limit {limit}) while holding {held}"
                    )));
                }
            }
            Err(LockError::TooManyWaiters { limit, .. }) => {
                self.stats.refused += 1;
                let waiting = self
                    .live
                    .keys()
                    .filter(|t| self.pair.is_waiting(**t))
                    .count();
                if waiting != limit {
                    return Err(self.fail(format!(
                        "{tx} refused for {limit} waiters while {waiting} wait"
                    )));
                }
            }
            Err(e) => return Err(self.fail(format!("{tx} refused: {e}"))),
        }
        Ok(())
    }

    fn set_state(&mut self, tx: TxId, state: State) {
        if let Some(t) = self.live.get_mut(&tx) {
            t.state = state;
        }
    }

    fn granted(&mut self, tx: TxId, access: Access) {
        self.stats.granted += 1;
        self.history.push((tx, access));
        if let Some(t) = self.live.get_mut(&tx) {
            t.granted.push(access);
            t.state = State::Running;
        }
    }

    /// Commits or aborts `tx` (any undo done) and releases its locks.
    fn end(&mut self, tx: TxId, commit: bool) -> Result<(), String> {
        self.live.remove(&tx);
        if commit {
            self.committed.insert(tx);
        }
        let grants = self.pair.release(tx);
        self.note(format!(
            "{tx} {} -> {grants:?}",
            if commit { "commits" } else { "released" }
        ));
        for g in grants {
            let waited_for = match self.live.get(&g.tx).map(|t| t.state) {
                Some(State::Waiting { access, .. }) => access,
                other => {
                    return Err(self.fail(format!("grant of {:?} to {} in {other:?}", g.key, g.tx)));
                }
            };
            if waited_for.key() != g.key {
                return Err(self.fail(format!(
                    "{} waits for {waited_for:?} but was granted {:?}",
                    g.tx, g.key
                )));
            }
            self.granted(g.tx, waited_for);
        }
        Ok(())
    }

    fn expire(&mut self) -> Result<(), String> {
        let aborts = self.pair.expire(self.now);
        self.note(format!("expire -> {aborts:?}"));
        for (tx, reason) in aborts {
            let Some(State::Waiting { deadline, .. }) = self.live.get(&tx).map(|t| t.state) else {
                return Err(self.fail(format!("{tx} aborted ({reason:?}) but does not wait")));
            };
            match reason {
                AbortReason::LockTimeout if deadline <= self.now => self.stats.timeouts += 1,
                AbortReason::Deadlock => self.stats.deadlocks_found_by_release += 1,
                _ => {
                    return Err(self.fail(format!(
                        "{tx} aborted with {reason:?}, deadline {deadline:?}"
                    )));
                }
            }
            self.set_state(tx, State::Aborted);
        }
        for (tx, t) in &self.live {
            if let State::Waiting { deadline, .. } = t.state
                && deadline <= self.now
                && self.pair.is_waiting(*tx)
            {
                return Err(self.fail(format!("{tx} still waits past its deadline {deadline:?}")));
            }
        }
        Ok(())
    }

    fn check(&self) -> Result<(), String> {
        self.pair.validate().map_err(|e| self.fail(e))?;
        let live: Vec<(&TxId, &Tx)> = self.live.iter().collect();
        for (i, (a, ta)) in live.iter().enumerate() {
            for (b, tb) in &live[i + 1..] {
                for x in &ta.granted {
                    for y in &tb.granted {
                        if x.conflicts(*y) {
                            return Err(
                                self.fail(format!("{a} holds {x:?} and {b} holds {y:?} at once"))
                            );
                        }
                    }
                }
            }
        }
        // The earliest deadline of a waiter, unless a deadlock victim is still to be reported.
        let earliest = self
            .live
            .iter()
            .filter(|(tx, _)| self.pair.is_waiting(**tx))
            .filter_map(|(_, t)| match t.state {
                State::Waiting { deadline, .. } => Some(deadline),
                _ => None,
            })
            .min();
        let next = self.pair.next_deadline();
        if next != earliest && next != Some(Duration::ZERO) {
            return Err(self.fail(format!(
                "next deadline {next:?}, earliest wait ends {earliest:?}"
            )));
        }
        Ok(())
    }

    /// Ends every transaction that does not wait until none is left: a waiter that outlives
    /// all the others was lost.
    fn finish(&mut self) -> Result<(), String> {
        self.note("finish".into());
        loop {
            // Deadlock victims found by the last release.
            if self.pair.next_deadline() == Some(Duration::ZERO) {
                self.expire()?;
            }
            let Some(tx) = self.pick(|t| !matches!(t.state, State::Waiting { .. })) else {
                break;
            };
            let commit = self
                .live
                .get(&tx)
                .is_some_and(|t| t.state == State::Running);
            self.end(tx, commit)?;
            self.check()?;
        }
        if !self.live.is_empty() {
            let stuck: Vec<&TxId> = self.live.keys().collect();
            return Err(self.fail(format!("{stuck:?} still wait with nobody else left")));
        }
        if self.pair.next_deadline().is_some() {
            return Err(self.fail("a deadline is left with no transaction".into()));
        }
        for n in 1..self.next_tx {
            let tx = TxId {
                epoch: OwnerEpoch(1),
                number: n,
            };
            if self.pair.locks_held(tx) != 0 {
                return Err(self.fail(format!("{tx} holds locks after its release")));
            }
        }
        self.serializable()
    }

    /// The conflict graph of the committed transactions' granted accesses has no cycle.
    fn serializable(&self) -> Result<(), String> {
        let h: Vec<&(TxId, Access)> = self
            .history
            .iter()
            .filter(|(tx, _)| self.committed.contains(tx))
            .collect();
        let mut edges: BTreeMap<TxId, BTreeSet<TxId>> = BTreeMap::new();
        for (i, (a, x)) in h.iter().enumerate() {
            for (b, y) in &h[i + 1..] {
                if a != b && x.conflicts(*y) {
                    edges.entry(*a).or_default().insert(*b);
                }
            }
        }
        // Kahn: repeatedly remove transactions nobody points to.
        let mut indegree: BTreeMap<TxId, usize> =
            self.committed.iter().map(|tx| (*tx, 0)).collect();
        for to in edges.values().flatten() {
            *indegree.entry(*to).or_default() += 1;
        }
        let mut ready: Vec<TxId> = indegree
            .iter()
            .filter(|(_, d)| **d == 0)
            .map(|(tx, _)| *tx)
            .collect();
        let mut ordered = 0;
        while let Some(tx) = ready.pop() {
            ordered += 1;
            for to in edges.get(&tx).into_iter().flatten() {
                if let Some(d) = indegree.get_mut(to) {
                    *d -= 1;
                    if *d == 0 {
                        ready.push(*to);
                    }
                }
            }
        }
        if ordered != indegree.len() {
            return Err(self.fail(format!(
                "the committed history is not conflict-serializable: {edges:?}"
            )));
        }
        Ok(())
    }
}

#[test]
fn random_histories_keep_the_invariants_and_are_serializable() {
    let seeds = match std::env::var("DUPLEX_SEED") {
        Ok(s) => {
            let seed = s.parse().expect("DUPLEX_SEED is a number");
            seed..seed + 1
        }
        Err(_) => 0..SEEDS,
    };
    println!("seeds {seeds:?}");
    let mut stats = Stats::default();
    for seed in seeds.clone() {
        if let Err(e) = Sim::new(seed, &mut stats).run() {
            panic!("{e}");
        }
    }
    println!("{stats:?}");
    if seeds.end - seeds.start == SEEDS {
        // The runs reach every path, or they prove little.
        assert!(
            stats.granted > 0
                && stats.waited > 0
                && stats.deadlocks > 0
                && stats.deadlocks_found_by_release > 0
                && stats.timeouts > 0
                && stats.refused > 0
                && stats.relocked > 0,
            "{stats:?}"
        );
    }
}
