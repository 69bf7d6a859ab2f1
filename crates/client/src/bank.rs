//! The bank-transfer workload and its oracle (`duplex bank`, `duplex demo`, the process tests
//! and `scripts/bench bank`).
//!
//! Accounts are keys `bank/a/NNNNN` holding an `i64` balance; each transfer reads two
//! balances, writes both and a marker `bank/t/CLIENT/N` (from, to, amount), and commits, all in
//! one LSG (the local cluster puts the `bank/` keys in LSG 1). The check reads everything in
//! one transaction: the total is unchanged, every balance is what the markers make it (so no
//! transfer applied partly or twice), and every transfer a client saw committed has its marker.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use duplex_owner::OpError;
use duplex_pair::{CommitState, Receipt};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::Mutex;

use crate::cluster::{ClientSession, Cluster};
use crate::error::ClientError;

pub const START_BALANCE: i64 = 1_000;
/// Accounts written per transaction when the bank is created ...
const INIT_BATCH: usize = 200;
/// ... by this many sessions at once.
const INIT_SESSIONS: usize = 8;
/// Rows per scan page when the bank is read.
const READ_PAGE: u32 = 5_000;
/// Attempts of one transfer before it is given up.
const MAX_ATTEMPTS: u32 = 200;

pub fn account_key(a: usize) -> Vec<u8> {
    format!("bank/a/{a:05}").into_bytes()
}

const ACCOUNTS_START: &[u8] = b"bank/a/";
const ACCOUNTS_END: &[u8] = b"bank/a0";
const MARKERS_START: &[u8] = b"bank/t/";
const MARKERS_END: &[u8] = b"bank/t0";

fn marker_key(client: u64, n: u64) -> Vec<u8> {
    format!("bank/t/{client:016x}/{n:010}").into_bytes()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Transfer {
    from: usize,
    to: usize,
    amount: i64,
}

fn marker_value(t: &Transfer) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    v.extend_from_slice(&(t.from as u64).to_le_bytes());
    v.extend_from_slice(&(t.to as u64).to_le_bytes());
    v.extend_from_slice(&t.amount.to_le_bytes());
    v
}

fn parse_marker(v: &[u8]) -> Option<Transfer> {
    let word = |i: usize| -> Option<[u8; 8]> { v.get(i * 8..i * 8 + 8)?.try_into().ok() };
    if v.len() != 24 {
        return None;
    }
    Some(Transfer {
        from: usize::try_from(u64::from_le_bytes(word(0)?)).ok()?,
        to: usize::try_from(u64::from_le_bytes(word(1)?)).ok()?,
        amount: i64::from_le_bytes(word(2)?),
    })
}

fn balance(v: &[u8]) -> Option<i64> {
    Some(i64::from_le_bytes(v.try_into().ok()?))
}

/// Creates the bank's accounts unless the first one exists; batches of accounts go in
/// parallel sessions, each batch retried after an abort or a takeover.
pub async fn init(cluster: &Cluster, accounts: usize) -> Result<bool, ClientError> {
    let session = cluster.session();
    let mut t = session.transaction();
    let exists = t.get(&account_key(0)).await?.is_some();
    t.abort().await?;
    if exists {
        return Ok(false);
    }
    let batches: Vec<Vec<usize>> = (0..accounts)
        .collect::<Vec<_>>()
        .chunks(INIT_BATCH)
        .map(<[usize]>::to_vec)
        .collect();
    let batches = Arc::new(std::sync::Mutex::new(batches));
    let mut tasks = Vec::new();
    for _ in 0..INIT_SESSIONS {
        let (cluster, batches) = (cluster.clone(), Arc::clone(&batches));
        tasks.push(tokio::spawn(async move {
            let session = cluster.session();
            loop {
                let batch = match batches.lock() {
                    Ok(mut b) => b.pop(),
                    Err(_) => None,
                };
                let Some(batch) = batch else { return Ok(()) };
                let mut last = None;
                for _ in 0..MAX_ATTEMPTS {
                    let mut t = session.transaction();
                    let written = async {
                        for a in &batch {
                            t.put(&account_key(*a), &START_BALANCE.to_le_bytes())
                                .await?;
                        }
                        Ok::<_, ClientError>(())
                    }
                    .await;
                    let result = match written {
                        Ok(()) => t.commit().await.map(|_| ()),
                        Err(e) => {
                            let _ = t.abort().await;
                            Err(e)
                        }
                    };
                    match result {
                        Ok(()) => {
                            last = None;
                            break;
                        }
                        Err(e) if retryable(&e) => last = Some(e),
                        Err(e) => return Err(e),
                    }
                }
                if let Some(e) = last {
                    return Err(e);
                }
            }
        }));
    }
    for t in tasks {
        match t.await {
            Ok(r) => r?,
            Err(e) => return Err(ClientError::Config(format!("an init task failed: {e}"))),
        }
    }
    Ok(true)
}

/// Whether an error ends only this attempt of a transfer.
fn retryable(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Aborted { .. }
            | ClientError::Ended
            | ClientError::Refused(
                OpError::UnknownTransaction { .. }
                    | OpError::LockRefused { .. }
                    | OpError::TooManyTransactions { .. }
                    | OpError::Busy { .. }
                    | OpError::Storage { .. }
            )
    )
}

async fn attempt(
    session: &ClientSession,
    t: &Transfer,
    marker: &[u8],
) -> Result<Receipt, ClientError> {
    let mut txn = session.transaction();
    let result = async {
        let from = txn.get(&account_key(t.from)).await?;
        let to = txn.get(&account_key(t.to)).await?;
        let (Some(from), Some(to)) = (
            from.as_deref().and_then(balance),
            to.as_deref().and_then(balance),
        ) else {
            return Err(ClientError::NoVolume {
                key: format!(
                    "bank account {} or {} is missing: run the bank's init",
                    t.from, t.to
                ),
            });
        };
        txn.put(&account_key(t.from), &(from - t.amount).to_le_bytes())
            .await?;
        txn.put(&account_key(t.to), &(to + t.amount).to_le_bytes())
            .await?;
        txn.put(marker, &marker_value(t)).await?;
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            let committed = txn.commit().await?;
            committed.receipt.ok_or(ClientError::Ended)
        }
        Err(e) => {
            // Best effort: an owner that lost the transaction answers it is unknown.
            let _ = txn.abort().await;
            Err(e)
        }
    }
}

/// Live counts of a run, for a progress line.
#[derive(Debug, Default)]
pub struct Progress {
    pub committed: AtomicU64,
    pub retries: AtomicU64,
    /// Commits acknowledged from memory on two nodes (normal state).
    pub normal: AtomicU64,
    /// Commits flushed before their acknowledgement (primary-only, backup-only, paranoid).
    pub flushed: AtomicU64,
}

/// What one run did.
#[derive(Debug)]
pub struct BankRun {
    pub committed: u64,
    pub retries: u64,
    pub elapsed: Duration,
    /// Commit latency (begin to commit acknowledged) of every committed transfer, in µs.
    pub latency_us: Histogram<u64>,
    /// Marker keys of every transfer a client saw committed.
    pub acknowledged: BTreeSet<Vec<u8>>,
    /// Transfers whose outcome the client never learned (given up): they may or may not be in.
    pub unknown: u64,
}

/// Runs `clients` sessions of transfers among `accounts` accounts until `stop` is set or
/// `duration` passes.
pub async fn run(
    cluster: &Cluster,
    accounts: usize,
    clients: usize,
    duration: Duration,
    seed: u64,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
) -> Result<BankRun, ClientError> {
    let started = Instant::now();
    let shared = Arc::new(Mutex::new((
        BTreeSet::new(),
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
            .map_err(|e| ClientError::Config(e.to_string()))?,
        0u64,
    )));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let session = cluster.session();
        let (stop, progress, shared) = (
            Arc::clone(&stop),
            Arc::clone(&progress),
            Arc::clone(&shared),
        );
        let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(c as u64));
        tasks.push(tokio::spawn(async move {
            let deadline = started + duration;
            let mut n = 0u64;
            let mut local = BTreeSet::new();
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
            let mut unknown = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                n += 1;
                let from = rng.random_range(0..accounts);
                let to = (from + rng.random_range(1..accounts.max(2))) % accounts;
                let t = Transfer {
                    from,
                    to,
                    amount: rng.random_range(1..=10),
                };
                let marker = marker_key(session.id().0, n);
                let t0 = Instant::now();
                let mut done = false;
                for _ in 0..MAX_ATTEMPTS {
                    match attempt(&session, &t, &marker).await {
                        Ok(receipt) => {
                            let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                            if let Some(h) = hist.as_mut() {
                                let _ = h.record(us.max(1));
                            }
                            progress.committed.fetch_add(1, Ordering::Relaxed);
                            let counter = if receipt.state == CommitState::Normal {
                                &progress.normal
                            } else {
                                &progress.flushed
                            };
                            counter.fetch_add(1, Ordering::Relaxed);
                            local.insert(marker.clone());
                            done = true;
                            break;
                        }
                        Err(e) if retryable(&e) => {
                            progress.retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(1 + n % 5)).await;
                        }
                        Err(e) => {
                            // A timeout or transport error: the outcome is unknown; the marker
                            // says later whether it committed.
                            tracing::warn!(error = %e, "transfer outcome unknown");
                            break;
                        }
                    }
                }
                if !done {
                    unknown += 1;
                }
            }
            let mut s = shared.lock().await;
            s.0.extend(local);
            if let Some(h) = hist {
                let _ = s.1.add(h);
            }
            s.2 += unknown;
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let (acknowledged, latency_us, unknown) = {
        let mut s = shared.lock().await;
        (std::mem::take(&mut s.0), s.1.clone(), s.2)
    };
    Ok(BankRun {
        committed: progress.committed.load(Ordering::Relaxed),
        retries: progress.retries.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        latency_us,
        acknowledged,
        unknown,
    })
}

/// What the check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BankCheck {
    pub accounts: usize,
    pub total: i64,
    pub markers: usize,
    pub acknowledged: usize,
}

async fn read_all(
    session: &ClientSession,
    txn: &mut crate::Transaction<'_>,
    start: &[u8],
    end: &[u8],
) -> Result<Vec<(Vec<u8>, Vec<u8>)>, ClientError> {
    let _ = session;
    let mut rows = Vec::new();
    let mut from = start.to_vec();
    // Each page is at most READ_PAGE rows; the bound keeps a broken scan from looping forever.
    for _ in 0..100_000 {
        let page = txn.scan(&from, Some(end), READ_PAGE).await?;
        let full = page.len() == READ_PAGE as usize;
        if let Some((last, _)) = page.last() {
            from = last.clone();
            from.push(0);
        }
        rows.extend(page);
        if !full {
            break;
        }
    }
    Ok(rows)
}

/// Reads the bank in one transaction and checks it (see the module docs).
pub async fn check(
    cluster: &Cluster,
    accounts: usize,
    acknowledged: &BTreeSet<Vec<u8>>,
) -> Result<BankCheck, String> {
    let session = cluster.session();
    let mut last_error = String::new();
    for _ in 0..50 {
        let mut txn = session.transaction();
        let read = async {
            let a = read_all(&session, &mut txn, ACCOUNTS_START, ACCOUNTS_END).await?;
            let m = read_all(&session, &mut txn, MARKERS_START, MARKERS_END).await?;
            Ok::<_, ClientError>((a, m))
        }
        .await;
        let _ = txn.abort().await;
        let (rows, markers) = match read {
            Ok(r) => r,
            Err(e) => {
                last_error = e.to_string();
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        return judge(accounts, &rows, &markers, acknowledged);
    }
    Err(format!("the bank could not be read: {last_error}"))
}

fn judge(
    accounts: usize,
    rows: &[(Vec<u8>, Vec<u8>)],
    markers: &[(Vec<u8>, Vec<u8>)],
    acknowledged: &BTreeSet<Vec<u8>>,
) -> Result<BankCheck, String> {
    if rows.len() != accounts {
        return Err(format!(
            "{} accounts found, {accounts} expected",
            rows.len()
        ));
    }
    let mut expected = vec![START_BALANCE; accounts];
    for (key, value) in markers {
        let t = parse_marker(value).ok_or_else(|| format!("marker {key:?} is malformed"))?;
        if t.from >= accounts || t.to >= accounts {
            return Err(format!("marker {key:?} names an account beyond {accounts}"));
        }
        expected[t.from] -= t.amount;
        expected[t.to] += t.amount;
    }
    let mut total = 0i64;
    for (i, (key, value)) in rows.iter().enumerate() {
        if *key != account_key(i) {
            return Err(format!("account {i} is missing (found {key:?})"));
        }
        let b = balance(value).ok_or_else(|| format!("account {i}'s balance is malformed"))?;
        if b != expected[i] {
            return Err(format!(
                "account {i} holds {b}, its transfers make it {}: a transfer was applied partly or twice",
                expected[i]
            ));
        }
        total += b;
    }
    let want = START_BALANCE * accounts as i64;
    if total != want {
        return Err(format!("the total is {total}, not {want}"));
    }
    let present: BTreeSet<&Vec<u8>> = markers.iter().map(|(k, _)| k).collect();
    let lost: Vec<&Vec<u8>> = acknowledged
        .iter()
        .filter(|k| !present.contains(k))
        .collect();
    if let Some(first) = lost.first() {
        return Err(format!(
            "{} acknowledged transfers are missing, the first {}",
            lost.len(),
            String::from_utf8_lossy(first)
        ));
    }
    Ok(BankCheck {
        accounts,
        total,
        markers: markers.len(),
        acknowledged: acknowledged.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oracle_catches_a_lost_or_doubled_transfer() {
        let t = Transfer {
            from: 0,
            to: 1,
            amount: 5,
        };
        let rows = vec![
            (account_key(0), (START_BALANCE - 5).to_le_bytes().to_vec()),
            (account_key(1), (START_BALANCE + 5).to_le_bytes().to_vec()),
        ];
        let markers = vec![(marker_key(7, 1), marker_value(&t))];
        let ack: BTreeSet<Vec<u8>> = [marker_key(7, 1)].into();
        assert!(judge(2, &rows, &markers, &ack).is_ok());
        // Acknowledged but missing.
        let more: BTreeSet<Vec<u8>> = [marker_key(7, 1), marker_key(7, 2)].into();
        assert!(judge(2, &rows, &markers, &more).is_err());
        // Applied twice: the balances moved twice, one marker.
        let twice = vec![
            (account_key(0), (START_BALANCE - 10).to_le_bytes().to_vec()),
            (account_key(1), (START_BALANCE + 10).to_le_bytes().to_vec()),
        ];
        assert!(judge(2, &twice, &markers, &ack).is_err());
        // Partly applied: one balance moved.
        let partly = vec![
            (account_key(0), (START_BALANCE - 5).to_le_bytes().to_vec()),
            (account_key(1), START_BALANCE.to_le_bytes().to_vec()),
        ];
        assert!(judge(2, &partly, &markers, &ack).is_err());
    }
}
