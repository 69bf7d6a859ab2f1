//! The bank workload of `duplex_testbed::bank` against PostgreSQL: the baseline that
//! `scripts/bench bank` runs next to Duplex (start the server with `scripts/pg-standby`).
//!
//! ```text
//! bench-bank-pg --host 127.0.0.1 --port P --user U --accounts 10000 --clients 1,8,32 \
//!     --seconds S --seed N [--sync-commit on|off] [--warmup W] [--dbname D]
//! ```
//!
//! Creates `accounts(id int primary key, balance bigint)` with `--accounts` rows at 1000 each
//! and `transfers(id bigint primary key, from_id, to_id, amount)`, dropping both first. Each
//! client is one connection running transfers back to back, each as a client library would
//! send them, one round trip apiece (seven, as the Duplex transfer's begin, two gets, three
//! puts and commit): `BEGIN`; `SELECT balance ... FOR UPDATE` of both accounts, lower id first
//! (no deadlocks); `UPDATE` both with the balances computed by the client; `INSERT` the marker
//! row keyed by the transfer's id; `COMMIT`. Statements are prepared once per connection.
//! Accounts and amounts come from the same generator as the Duplex clients (ChaCha8 seeded
//! with `seed ^ client << 32`, a pair of distinct accounts, an amount in 1..50).
//!
//! For each client count: `--warmup` seconds not counted, then `--seconds` counted; a commit
//! counts when its acknowledgement arrives inside the counted window, and its latency is from
//! the first `BEGIN` of the transfer to the `COMMIT` acknowledged (retries included).
//! Serialization failures and deadlocks are rolled back and retried, and counted.
//!
//! Human-readable lines go to stderr; stdout gets one JSON line per client count:
//! `{"system":"postgresql","clients":N,"commits_per_s":..,"p50_us":..,"p99_us":..,
//! "retries":..,"sync_standby":true,"sync_commit":"on"}`, where `sync_standby` says that
//! `pg_stat_replication` showed a standby in `sync` state both before and after the run.
//! At the end the bank is checked: the total is unchanged, every balance is what the marker
//! rows make it, and there is one marker per transfer the clients saw committed; the exit
//! code is non-zero when any of that fails.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls, Statement};

const START_BALANCE: i64 = 1_000;
/// Attempts of one transfer before the run gives up.
const MAX_ATTEMPTS: u32 = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SyncCommit {
    On,
    Off,
}

impl SyncCommit {
    fn as_str(self) -> &'static str {
        match self {
            SyncCommit::On => "on",
            SyncCommit::Off => "off",
        }
    }
}

#[derive(Parser, Debug)]
#[command(about = "Bank transfers against PostgreSQL (the baseline of scripts/bench bank)")]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 5432)]
    port: u16,
    #[arg(long, default_value = "bench")]
    user: String,
    #[arg(long, default_value = "postgres")]
    dbname: String,
    #[arg(long, default_value_t = 10_000)]
    accounts: usize,
    /// Client counts, one run each, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    clients: Vec<usize>,
    /// Counted seconds of each run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Seconds before each counted window that are not counted.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// The workload's seed (a random one when not given; it is printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// The sessions' synchronous_commit: `on` waits for the standby's flush too.
    #[arg(long, value_enum, default_value = "on")]
    sync_commit: SyncCommit,
}

#[derive(Debug, Clone, Copy)]
struct Transfer {
    id: i64,
    from: i32,
    to: i32,
    amount: i64,
}

/// The JSON line printed for each client count (fields in this order).
#[derive(Debug, Serialize)]
struct Line {
    system: &'static str,
    clients: usize,
    commits_per_s: f64,
    p50_us: u64,
    p99_us: u64,
    retries: u64,
    sync_standby: bool,
    sync_commit: &'static str,
}

/// One client's connection and prepared statements.
#[derive(Debug)]
struct BankClient {
    client: Client,
    connection: tokio::task::JoinHandle<()>,
    select: Statement,
    update: Statement,
    insert: Statement,
}

/// What one client did in one run.
#[derive(Debug)]
struct ClientResult {
    latencies_us: Histogram<u64>,
    /// Commits acknowledged inside the counted window.
    counted: u64,
    /// Retries of attempts begun inside the counted window.
    retries: u64,
    /// Every commit acknowledged, warm-up and overrun included (one marker each).
    committed: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.accounts < 2 || args.accounts > i32::MAX as usize {
        bail!("--accounts must be between 2 and {}", i32::MAX);
    }
    if args.clients.is_empty() || args.clients.contains(&0) {
        bail!("--clients must list client counts of at least 1");
    }
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !positive(args.seconds) || !(positive(args.warmup) || args.warmup == 0.0) {
        bail!("--seconds must be positive and --warmup not negative");
    }
    // One thread for every client, as the Duplex bank clients run: the machine's other cores
    // are left to the servers.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(run(args))
}

fn config(args: &Args) -> Config {
    let mut config = Config::new();
    config
        .host(&args.host)
        .port(args.port)
        .user(&args.user)
        .dbname(&args.dbname)
        .application_name("bench-bank-pg")
        .connect_timeout(Duration::from_secs(10));
    config
}

async fn connect(args: &Args) -> Result<(Client, tokio::task::JoinHandle<()>)> {
    let (client, connection) = config(args).connect(NoTls).await.with_context(|| {
        format!(
            "cannot connect to PostgreSQL at {}:{} as {}",
            args.host, args.port, args.user
        )
    })?;
    let handle = tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("bench-bank-pg: connection ended: {e}");
        }
    });
    Ok((client, handle))
}

async fn run(args: Args) -> Result<()> {
    let seed = args.seed.unwrap_or_else(rand::random);
    eprintln!("bench-bank-pg: seed {seed}");
    let (admin, admin_connection) = connect(&args).await?;
    let version: String = admin
        .query_one("SHOW server_version", &[])
        .await?
        .try_get(0)?;
    eprintln!(
        "bench-bank-pg: PostgreSQL {version} at {}:{}, {} accounts, synchronous_commit={}",
        args.host,
        args.port,
        args.accounts,
        args.sync_commit.as_str()
    );
    create_bank(&admin, args.accounts).await?;

    let mut total_committed = 0u64;
    for (round, &clients) in args.clients.iter().enumerate() {
        let before = sync_standby(&admin).await?;
        if !before {
            eprintln!("bench-bank-pg: warning: no standby in sync state before the run");
        }
        let mut bank_clients = Vec::with_capacity(clients);
        for _ in 0..clients {
            bank_clients.push(open_client(&args).await?);
        }
        let warmup = Duration::from_secs_f64(args.warmup);
        let measure = Duration::from_secs_f64(args.seconds);
        // Every client starts at once, after all are connected.
        let start = Instant::now() + Duration::from_millis(50);
        let counted_from = start + warmup;
        let end = counted_from + measure;
        let mut tasks = Vec::with_capacity(clients);
        for (i, c) in bank_clients.into_iter().enumerate() {
            let rng = ChaCha8Rng::seed_from_u64(seed ^ ((i as u64) << 32));
            let first_id = ((round as i64 + 1) << 40) | ((i as i64 + 1) << 24);
            let accounts = args.accounts;
            tasks.push(tokio::spawn(async move {
                let r = run_client(&c, rng, accounts, first_id, start, counted_from, end).await;
                drop(c.client);
                // The connection ends once its client is gone.
                let _ = c.connection.await;
                r
            }));
        }
        let mut latencies = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let (mut counted, mut retries) = (0u64, 0u64);
        let mut failure = None;
        for t in tasks {
            match t.await.context("a client task failed")? {
                Ok(r) => {
                    latencies.add(&r.latencies_us)?;
                    counted += r.counted;
                    retries += r.retries;
                    total_committed += r.committed;
                }
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        if let Some(e) = failure {
            return Err(e.context(format!("the run with {clients} clients")));
        }
        let after = sync_standby(&admin).await?;
        let commits_per_s = counted as f64 / measure.as_secs_f64();
        let (p50, p99) = (
            latencies.value_at_quantile(0.5),
            latencies.value_at_quantile(0.99),
        );
        eprintln!(
            "bench-bank-pg: {clients} clients: {commits_per_s:.1} commits/s ({counted} in {:.1} s), \
             p50 {:.2} ms, p99 {:.2} ms, {retries} retries",
            measure.as_secs_f64(),
            p50 as f64 / 1000.0,
            p99 as f64 / 1000.0
        );
        let line = serde_json::to_string(&Line {
            system: "postgresql",
            clients,
            commits_per_s: (commits_per_s * 10.0).round() / 10.0,
            p50_us: p50,
            p99_us: p99,
            retries,
            sync_standby: before && after,
            sync_commit: args.sync_commit.as_str(),
        })?;
        println!("{line}");
    }

    let checked = check_bank(&admin, args.accounts, total_committed).await;
    drop(admin);
    let _ = admin_connection.await;
    checked?;
    eprintln!(
        "bench-bank-pg: bank checked: total unchanged, balances match {total_committed} markers"
    );
    Ok(())
}

async fn create_bank(admin: &Client, accounts: usize) -> Result<()> {
    // One statement a round trip: VACUUM and CHECKPOINT cannot run in the implicit
    // transaction of a multi-statement query.
    let statements = [
        "DROP TABLE IF EXISTS accounts, transfers".to_string(),
        "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL)".to_string(),
        "CREATE TABLE transfers (id bigint PRIMARY KEY, from_id int NOT NULL, \
         to_id int NOT NULL, amount bigint NOT NULL)"
            .to_string(),
        format!(
            "INSERT INTO accounts SELECT g, {START_BALANCE} FROM generate_series(0, {}) g",
            accounts - 1
        ),
        "VACUUM ANALYZE accounts".to_string(),
        "CHECKPOINT".to_string(),
    ];
    for s in &statements {
        admin
            .batch_execute(s)
            .await
            .with_context(|| format!("cannot create the bank: {s}"))?;
    }
    Ok(())
}

/// Whether the primary has a standby in `sync` state.
async fn sync_standby(admin: &Client) -> Result<bool> {
    let n: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
            &[],
        )
        .await?
        .try_get(0)?;
    Ok(n > 0)
}

async fn open_client(args: &Args) -> Result<BankClient> {
    let (client, connection) = connect(args).await?;
    client
        .batch_execute(&format!(
            "SET synchronous_commit = {}",
            args.sync_commit.as_str()
        ))
        .await?;
    let select = client
        .prepare("SELECT balance FROM accounts WHERE id = $1 FOR UPDATE")
        .await?;
    let update = client
        .prepare("UPDATE accounts SET balance = $1 WHERE id = $2")
        .await?;
    let insert = client
        .prepare("INSERT INTO transfers (id, from_id, to_id, amount) VALUES ($1, $2, $3, $4)")
        .await?;
    Ok(BankClient {
        client,
        connection,
        select,
        update,
        insert,
    })
}

async fn run_client(
    c: &BankClient,
    mut rng: ChaCha8Rng,
    accounts: usize,
    first_id: i64,
    start: Instant,
    counted_from: Instant,
    end: Instant,
) -> Result<ClientResult> {
    let mut r = ClientResult {
        latencies_us: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        counted: 0,
        retries: 0,
        committed: 0,
    };
    tokio::time::sleep_until(start).await;
    let mut next = first_id;
    while Instant::now() < end {
        let from = rng.random_range(0..accounts);
        let mut to = rng.random_range(0..accounts - 1);
        if to >= from {
            to += 1;
        }
        let t = Transfer {
            id: next,
            from: i32::try_from(from)?,
            to: i32::try_from(to)?,
            amount: rng.random_range(1..50),
        };
        next += 1;
        let began = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let tried = Instant::now();
            match attempt(c, &t).await {
                Ok(()) => break,
                Err(e) if retryable(&e) && attempts < MAX_ATTEMPTS => {
                    if tried >= counted_from {
                        r.retries += 1;
                    }
                    c.client
                        .batch_execute("ROLLBACK")
                        .await
                        .context("rollback after a retryable error")?;
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("transfer {} after {attempts} attempts", t.id)));
                }
            }
        }
        let done = Instant::now();
        r.committed += 1;
        if done >= counted_from && done < end {
            r.counted += 1;
            let us = u64::try_from(done.duration_since(began).as_micros()).unwrap_or(u64::MAX);
            r.latencies_us.saturating_record(us.max(1));
        }
    }
    Ok(r)
}

fn retryable(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}

/// One transfer, seven round trips.
async fn attempt(c: &BankClient, t: &Transfer) -> Result<(), tokio_postgres::Error> {
    c.client.batch_execute("BEGIN").await?;
    // Locks in id order, so two transfers never wait on each other in a cycle.
    let (low, high) = if t.from < t.to {
        (t.from, t.to)
    } else {
        (t.to, t.from)
    };
    let low_balance: i64 = c.client.query_one(&c.select, &[&low]).await?.try_get(0)?;
    let high_balance: i64 = c.client.query_one(&c.select, &[&high]).await?.try_get(0)?;
    let (from_balance, to_balance) = if t.from == low {
        (low_balance, high_balance)
    } else {
        (high_balance, low_balance)
    };
    c.client
        .execute(&c.update, &[&(from_balance - t.amount), &t.from])
        .await?;
    c.client
        .execute(&c.update, &[&(to_balance + t.amount), &t.to])
        .await?;
    c.client
        .execute(&c.insert, &[&t.id, &t.from, &t.to, &t.amount])
        .await?;
    c.client.batch_execute("COMMIT").await?;
    Ok(())
}

/// The total is unchanged, every balance is what the markers make it, and there is one marker
/// per commit the clients saw.
async fn check_bank(admin: &Client, accounts: usize, committed: u64) -> Result<()> {
    let row = admin
        .query_one("SELECT count(*), sum(balance)::bigint FROM accounts", &[])
        .await?;
    let (count, total): (i64, Option<i64>) = (row.try_get(0)?, row.try_get(1)?);
    let want = START_BALANCE * i64::try_from(accounts)?;
    if usize::try_from(count)? != accounts || total != Some(want) {
        bail!(
            "the bank is wrong: {count} accounts holding {total:?}, want {accounts} holding {want}"
        );
    }
    let wrong: i64 = admin
        .query_one(
            "SELECT count(*) FROM accounts a LEFT JOIN (
                 SELECT id, sum(delta)::bigint AS delta FROM (
                     SELECT from_id AS id, -amount AS delta FROM transfers
                     UNION ALL SELECT to_id, amount FROM transfers) d
                 GROUP BY id) m ON m.id = a.id
             WHERE a.balance <> $1 + coalesce(m.delta, 0::bigint)",
            &[&START_BALANCE],
        )
        .await?
        .try_get(0)?;
    if wrong != 0 {
        bail!("{wrong} balances differ from what the transfer markers make them");
    }
    let markers: i64 = admin
        .query_one("SELECT count(*) FROM transfers", &[])
        .await?
        .try_get(0)?;
    if u64::try_from(markers)? != committed {
        bail!("{markers} transfer markers, but the clients saw {committed} commits");
    }
    Ok(())
}
