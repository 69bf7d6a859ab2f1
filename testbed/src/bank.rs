//! Bank transfers against an LSG served by real processes, and the oracle that checks them
//! (the workload and checks of `duplex_owner::sim`, over the QUIC transport).
//!
//! Each transfer reads two balances, writes both and a marker record keyed by the transfer's
//! id (from, to, amount), and commits. At the end the bank is read in one transaction and
//! checked: the total is unchanged, every balance is what the markers make it (so no transfer
//! applied partly or twice), and every transfer a client saw committed has its marker, unless
//! the caller excuses it (acknowledged from memory in normal state, and every memory copy lost).

use std::collections::BTreeSet;
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use duplex_host::{ClientEndpoint, ClientOptions, Row, Session};
use duplex_lsg::LsgId;
use duplex_owner::{ClientReply, Op, OpError};
use duplex_pair::{AbortReason, ClientId, Receipt, Reply, TxId};
use duplex_transport::{EndpointId, PeerAddrs, QuicConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const LSG: LsgId = LsgId(1);
pub const ACCOUNTS: &str = "accounts";
pub const MARKERS: &str = "markers";
pub const START_BALANCE: i64 = 1_000;

pub fn account_key(a: usize) -> Vec<u8> {
    format!("acct{a:04}").into_bytes()
}

/// The volumes and opening balances of a bank of `accounts` accounts.
pub fn initial_rows(accounts: usize) -> (Vec<String>, Vec<Row>) {
    let rows = (0..accounts)
        .map(|a| {
            (
                ACCOUNTS.to_string(),
                account_key(a),
                START_BALANCE.to_le_bytes().to_vec(),
            )
        })
        .collect();
    (vec![ACCOUNTS.into(), MARKERS.into()], rows)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    pub id: u64,
    pub from: usize,
    pub to: usize,
    pub amount: i64,
}

fn marker_value(t: &Transfer) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    v.extend_from_slice(&(t.from as u64).to_le_bytes());
    v.extend_from_slice(&(t.to as u64).to_le_bytes());
    v.extend_from_slice(&t.amount.to_le_bytes());
    v
}

/// A transfer a client saw committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    pub transfer: u64,
    pub receipt: Receipt,
    /// The CPU that answered the commit.
    pub by: EndpointId,
    pub at: Instant,
}

fn balance_of(reply: &ClientReply) -> Option<i64> {
    match reply {
        ClientReply::Value(Some(v)) => Some(i64::from_le_bytes(v.as_slice().try_into().ok()?)),
        _ => None,
    }
}

/// What ends one attempt of a transfer.
enum Attempt {
    Done(Committed),
    /// Begin again (an abort, a transaction lost at a takeover, a busy owner); the transaction
    /// begun, if any, is ended first so it holds no locks meanwhile.
    Again(Option<TxId>),
}

fn retryable(reply: &ClientReply) -> bool {
    matches!(
        reply,
        ClientReply::Error(
            OpError::Aborted { .. }
                | OpError::UnknownTransaction { .. }
                | OpError::LockRefused { .. }
                | OpError::TooManyTransactions { .. }
                | OpError::Busy { .. }
                | OpError::Storage { .. }
        ) | ClientReply::Outcome(Reply::Aborted(_))
    )
}

async fn attempt(session: &mut Session, t: &Transfer) -> Result<Attempt, String> {
    let began = session
        .request(None, Op::Begin)
        .await
        .map_err(|e| e.to_string())?;
    let tx: TxId = match began.reply {
        ClientReply::Began(tx) => tx,
        r if retryable(&r) => return Ok(Attempt::Again(None)),
        r => return Err(format!("transfer {}: begin answered {r:?}", t.id)),
    };
    let mut balances = [0i64; 2];
    for (i, account) in [t.from, t.to].into_iter().enumerate() {
        let a = session
            .request(
                Some(tx),
                Op::Get {
                    volume: ACCOUNTS.into(),
                    key: account_key(account),
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        match balance_of(&a.reply) {
            Some(b) => balances[i] = b,
            None if retryable(&a.reply) => return Ok(Attempt::Again(Some(tx))),
            None => {
                return Err(format!(
                    "transfer {}: account {account} answered {:?}",
                    t.id, a.reply
                ));
            }
        }
    }
    let writes = [
        (
            ACCOUNTS,
            account_key(t.from),
            (balances[0] - t.amount).to_le_bytes().to_vec(),
        ),
        (
            ACCOUNTS,
            account_key(t.to),
            (balances[1] + t.amount).to_le_bytes().to_vec(),
        ),
        (MARKERS, t.id.to_be_bytes().to_vec(), marker_value(t)),
    ];
    for (volume, key, value) in writes {
        let a = session
            .request(
                Some(tx),
                Op::Put {
                    volume: volume.into(),
                    key,
                    value,
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        match a.reply {
            ClientReply::Written => {}
            r if retryable(&r) => return Ok(Attempt::Again(Some(tx))),
            r => return Err(format!("transfer {}: write answered {r:?}", t.id)),
        }
    }
    let a = session
        .request(Some(tx), Op::Commit)
        .await
        .map_err(|e| e.to_string())?;
    match a.reply {
        ClientReply::Outcome(Reply::Committed(receipt)) => Ok(Attempt::Done(Committed {
            transfer: t.id,
            receipt,
            by: a.from,
            at: Instant::now(),
        })),
        r if retryable(&r) => Ok(Attempt::Again(None)),
        r => Err(format!("transfer {}: commit answered {r:?}", t.id)),
    }
}

/// Runs `t` until it commits (begun again after aborts and takeovers), at most 200 attempts.
pub async fn transfer(session: &mut Session, t: &Transfer) -> Result<Committed, String> {
    for n in 0..200u64 {
        match attempt(session, t).await? {
            Attempt::Done(c) => return Ok(c),
            Attempt::Again(tx) => {
                if let Some(tx) = tx {
                    // Best effort: an owner that lost it answers aborted, which is as good.
                    let _ = session.request(Some(tx), Op::Abort).await;
                }
                tokio::time::sleep(Duration::from_millis(1 + (t.id + n) % 7)).await;
            }
        }
    }
    Err(format!("transfer {} did not commit in 200 attempts", t.id))
}

/// The whole bank, read in one transaction.
#[derive(Debug, Clone, Default)]
pub struct BankState {
    pub accounts: Vec<(Vec<u8>, Vec<u8>)>,
    pub markers: Vec<(Vec<u8>, Vec<u8>)>,
}

pub async fn read_bank(session: &mut Session) -> Result<BankState, String> {
    for _ in 0..100 {
        let began = session
            .request(None, Op::Begin)
            .await
            .map_err(|e| e.to_string())?;
        let ClientReply::Began(tx) = began.reply else {
            continue;
        };
        let mut state = BankState::default();
        let mut ok = true;
        for volume in [ACCOUNTS, MARKERS] {
            let a = session
                .request(
                    Some(tx),
                    Op::Scan {
                        volume: volume.into(),
                        start: Bound::Unbounded,
                        end: Bound::Unbounded,
                        limit: u32::MAX,
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
            match a.reply {
                ClientReply::Rows(rows) if volume == ACCOUNTS => state.accounts = rows,
                ClientReply::Rows(rows) => state.markers = rows,
                _ => ok = false,
            }
        }
        let end = session
            .request(Some(tx), Op::Abort)
            .await
            .map_err(|e| e.to_string())?;
        if ok
            && matches!(
                end.reply,
                ClientReply::Outcome(Reply::Aborted(AbortReason::Requested))
            )
        {
            return Ok(state);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Err("the bank could not be read in 100 attempts".into())
}

/// What the oracle found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BankReport {
    pub markers: usize,
    pub acknowledged: usize,
    /// Acknowledged, missing, and excused by the caller.
    pub lost_excused: usize,
}

/// Checks the bank (see the module docs). `excused` says which acknowledged transfers may be
/// missing.
pub fn check_bank(
    state: &BankState,
    accounts: usize,
    committed: &[Committed],
    excused: impl Fn(&Committed) -> bool,
) -> Result<BankReport, String> {
    let mut expected = vec![START_BALANCE; accounts];
    let mut present = BTreeSet::new();
    for (key, value) in &state.markers {
        let field = |i: usize| -> Option<[u8; 8]> { value.get(i * 8..i * 8 + 8)?.try_into().ok() };
        let (Ok(id), Some(from), Some(to), Some(amount)) = (
            <[u8; 8]>::try_from(key.as_slice()),
            field(0),
            field(1),
            field(2),
        ) else {
            return Err(format!("malformed marker {key:?}"));
        };
        if !present.insert(u64::from_be_bytes(id)) {
            return Err(format!("marker {} twice", u64::from_be_bytes(id)));
        }
        let (from, to, amount) = (
            u64::from_le_bytes(from) as usize,
            u64::from_le_bytes(to) as usize,
            i64::from_le_bytes(amount),
        );
        if from >= accounts || to >= accounts {
            return Err(format!("marker names unknown accounts {from} {to}"));
        }
        expected[from] -= amount;
        expected[to] += amount;
    }
    let mut found = vec![None; accounts];
    for (key, value) in &state.accounts {
        let Some(a) = std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_prefix("acct"))
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|a| *a < accounts)
        else {
            return Err(format!("unknown account key {key:?}"));
        };
        let Ok(b) = <[u8; 8]>::try_from(value.as_slice()) else {
            return Err(format!("malformed balance of account {a}"));
        };
        found[a] = Some(i64::from_le_bytes(b));
    }
    let total: i64 = found.iter().flatten().sum();
    let start_total = START_BALANCE * accounts as i64;
    if total != start_total || found.iter().any(Option::is_none) {
        return Err(format!(
            "total {total} over {} accounts, expected {start_total} over {accounts}: money was made or lost",
            found.iter().flatten().count()
        ));
    }
    for (a, (f, e)) in found.iter().zip(&expected).enumerate() {
        if *f != Some(*e) {
            return Err(format!(
                "account {a} holds {f:?} but the committed transfers (markers) make it {e}: a transfer applied partly or twice"
            ));
        }
    }
    let mut report = BankReport {
        markers: present.len(),
        acknowledged: committed.len(),
        lost_excused: 0,
    };
    let mut seen = BTreeSet::new();
    for c in committed {
        if !seen.insert(c.transfer) {
            return Err(format!("transfer {} acknowledged twice", c.transfer));
        }
        if !present.contains(&c.transfer) {
            if excused(c) {
                report.lost_excused += 1;
            } else {
                return Err(format!(
                    "transfer {} was acknowledged by {} ({:?} at LSN {}, epoch {}) but is not in the volumes",
                    c.transfer, c.by, c.receipt.state, c.receipt.commit_lsn, c.receipt.epoch
                ));
            }
        }
    }
    Ok(report)
}

/// Where the clients run and whom they talk to.
#[derive(Debug, Clone)]
pub struct BankOptions {
    pub certs: PathBuf,
    /// The client endpoint (node 0: lower than every CPU, so it dials them).
    pub endpoint: EndpointId,
    pub cpus: Vec<(EndpointId, PeerAddrs)>,
    pub clients: usize,
    pub accounts: usize,
    pub seed: u64,
}

/// Every commit the clients saw, and the bank read at the end.
pub type BankOutcome = (Vec<Committed>, BankState);

/// Clients running transfers on a thread of their own (with their own runtime) until told to
/// stop; then they read the bank.
#[derive(Debug)]
pub struct BankRun {
    stop: Arc<AtomicBool>,
    commits: mpsc::Receiver<Committed>,
    thread: Option<JoinHandle<Result<BankOutcome, String>>>,
}

impl BankRun {
    pub fn start(options: BankOptions) -> Result<BankRun, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, commits) = mpsc::channel();
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("bank-clients".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                runtime.block_on(run_clients(options, flag, tx))
            })
            .map_err(|e| e.to_string())?;
        Ok(BankRun {
            stop,
            commits,
            thread: Some(thread),
        })
    }

    /// Waits for `n` more commits that satisfy `want`, at most `limit`; returns them.
    pub fn wait_commits(
        &self,
        n: usize,
        limit: Duration,
        want: impl Fn(&Committed) -> bool,
    ) -> Result<Vec<Committed>, String> {
        let deadline = Instant::now() + limit;
        let mut got = Vec::new();
        while got.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.commits.recv_timeout(left) {
                Ok(c) if want(&c) => got.push(c),
                Ok(_) => {}
                Err(_) => {
                    return Err(format!("{} of {n} commits within {limit:?}", got.len()));
                }
            }
        }
        Ok(got)
    }

    /// Stops the clients (each finishes its transfer), reads the bank, and returns every
    /// commit seen and the bank.
    pub fn finish(mut self) -> Result<BankOutcome, String> {
        self.stop.store(true, Ordering::Release);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err("the client thread panicked".into()),
            None => Err("finished twice".into()),
        }
    }
}

impl Drop for BankRun {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

async fn run_clients(
    options: BankOptions,
    stop: Arc<AtomicBool>,
    notify: mpsc::Sender<Committed>,
) -> Result<BankOutcome, String> {
    let creds =
        crate::cluster::credentials(&options.certs, options.endpoint).map_err(|e| e.to_string())?;
    let addr = "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?;
    let config = QuicConfig::new(options.endpoint, addr, creds);
    let endpoint = ClientEndpoint::bind(config, LSG, &options.cpus, ClientOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut tasks = Vec::new();
    for i in 0..options.clients {
        let mut session = endpoint.session(ClientId(1000 + i as u64));
        let stop = Arc::clone(&stop);
        let notify = notify.clone();
        let accounts = options.accounts;
        let mut rng = ChaCha8Rng::seed_from_u64(options.seed ^ (i as u64) << 32);
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            let mut next = (i as u64 + 1) * 1_000_000;
            while !stop.load(Ordering::Acquire) {
                let from = rng.random_range(0..accounts);
                let mut to = rng.random_range(0..accounts - 1);
                if to >= from {
                    to += 1;
                }
                let t = Transfer {
                    id: next,
                    from,
                    to,
                    amount: rng.random_range(1..50),
                };
                next += 1;
                let c = transfer(&mut session, &t).await?;
                let _ = notify.send(c);
                done.push(c);
            }
            Ok::<_, String>(done)
        }));
    }
    let mut committed = Vec::new();
    for t in tasks {
        committed.extend(t.await.map_err(|e| e.to_string())??);
    }
    let mut session = endpoint.session(ClientId(999));
    let state = read_bank(&mut session).await?;
    endpoint.close();
    Ok((committed, state))
}
