//! A running cluster of real `duplexd` processes (`duplex local up`, 3 nodes x 2 CPUs), real
//! files, real QUIC, real `kill -9`: takeovers as a user meets them, with the bank workload
//! running and its check (total unchanged, every acknowledged transfer present once) after.
//!
//! The tests run one at a time: six processes per cluster already share two cores, and a
//! starved CPU would be declared down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use duplex_client::bank::{self, BankRun, Progress};
use duplex_client::{ClientError, Cluster};
use duplex_host::{CpuReply, CpuRequest};
use duplex_lsg::LsgId;
use duplex_owner::{ClientReply, ClientRequest, Op, OpError};
use duplex_pair::{ClientId, CommitState, Reply, RequestSeq, TxId};
use duplex_testbed::local::{LocalCluster, LocalOptions, wait_owner};
use duplex_transport::{EndpointId, Transport};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const BANK: LsgId = LsgId(1);
const ACCOUNTS: usize = 200;
const WAIT: Duration = Duration::from_secs(20);

/// Held by the running test (each test has a runtime of its own; the lock is runtime-agnostic).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn cpu(node: u16, cpu: u16) -> EndpointId {
    EndpointId::new(node, cpu)
}

/// Bank transfers from `clients` sessions for `seconds`, in the background.
fn start_bank(
    cluster: &Cluster,
    clients: usize,
    seconds: u64,
    seed: u64,
) -> (
    Arc<Progress>,
    Arc<AtomicBool>,
    tokio::task::JoinHandle<Result<BankRun, ClientError>>,
) {
    println!("bank seed {seed}");
    let progress = Arc::new(Progress::default());
    let stop = Arc::new(AtomicBool::new(false));
    let run = {
        let (cluster, progress, stop) = (cluster.clone(), Arc::clone(&progress), Arc::clone(&stop));
        tokio::spawn(async move {
            bank::run(
                &cluster,
                ACCOUNTS,
                clients,
                Duration::from_secs(seconds),
                seed,
                stop,
                progress,
            )
            .await
        })
    };
    (progress, stop, run)
}

/// Waits until `n` more transfers committed than `from`, at most `limit`.
async fn wait_commits(progress: &Progress, from: u64, n: u64, limit: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    while progress.committed.load(Ordering::Relaxed) < from + n {
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "only {} of {n} commits within {limit:?}",
                progress.committed.load(Ordering::Relaxed) - from
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Finishes the bank run and checks it.
async fn finish_bank(
    cluster: &Cluster,
    stop: &AtomicBool,
    run: tokio::task::JoinHandle<Result<BankRun, ClientError>>,
) -> Result<BankRun> {
    stop.store(true, Ordering::Relaxed);
    let run = run.await.context("bank task")??;
    let check = bank::check(cluster, ACCOUNTS, &run.acknowledged)
        .await
        .map_err(anyhow::Error::msg)?;
    println!(
        "bank: {} committed, {} retries, {} unknown; check {check:?}",
        run.committed, run.retries, run.unknown
    );
    assert_eq!(check.acknowledged, run.acknowledged.len());
    Ok(run)
}

async fn with_logs<T>(local: &LocalCluster, f: impl std::future::Future<Output = Result<T>>) -> T {
    match f.await {
        Ok(t) => t,
        Err(e) => panic!("{e:#}\n--- CPU logs ---\n{}", local.logs()),
    }
}

#[tokio::test]
async fn a_killed_primary_cpu_is_taken_over_by_its_same_node_half_mid_bank() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let local = LocalCluster::up(LocalOptions::default()).expect("cluster up");
    with_logs(&local, async {
        let cluster = local.connect().await?;
        bank::init(&cluster, ACCOUNTS).await?;
        let (primary, _) = wait_owner(&cluster, BANK, WAIT, |_, _| true).await?;
        assert_eq!(
            primary,
            cpu(1, 0),
            "LSG 1 starts on its home node's first CPU"
        );
        let (progress, stop, run) = start_bank(&cluster, 4, 30, 11);
        wait_commits(&progress, 0, 50, WAIT).await?;
        // A backup's copy starts where it joined; it is warm once the truncation horizon (the
        // penultimate checkpoint) passed that point: two checkpoints after both joined.
        let (_, joined) = wait_owner(&cluster, BANK, WAIT, |_, l| {
            l.state.as_deref() == Some("Normal") && l.home_counts
        })
        .await?;
        let mut checkpoint = joined.lsn;
        for _ in 0..2 {
            let (_, l) = wait_owner(&cluster, BANK, WAIT, |_, l| {
                l.last_checkpoint_lsn > checkpoint
            })
            .await?;
            checkpoint = l.last_checkpoint_lsn;
        }
        local.kill_cpu(primary)?;
        let at_kill = progress.committed.load(Ordering::Relaxed);
        let (owner, status) = wait_owner(&cluster, BANK, WAIT, |c, _| c != primary).await?;
        assert_eq!(owner, cpu(1, 1), "the same-node half takes over");
        assert_eq!(status.epoch.0, 2);
        let timeline = status.takeovers.last().context("a takeover timeline")?;
        if timeline.start.as_deref() != Some("warm") {
            bail!(
                "the same-node half took over {:?}, not warm",
                timeline.start
            );
        }
        assert!(timeline.detected_unix_ms <= timeline.fenced_unix_ms);
        let (recovered, ready) = (
            timeline.recovered_unix_ms.context("recovered")?,
            timeline.ready_unix_ms.context("ready")?,
        );
        assert!(timeline.fenced_unix_ms <= recovered && recovered <= ready);
        wait_commits(&progress, at_kill, 50, WAIT).await?;
        finish_bank(&cluster, &stop, run).await?;
        // The new owner's metrics say so (gauges are set every second).
        let mut text = String::new();
        for _ in 0..50 {
            text = local.metrics(owner)?;
            if text.contains("duplex_lsg_owner{lsg=\"1\"} 1") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for want in [
            "duplex_lsg_owner{lsg=\"1\"} 1",
            "duplex_takeovers_total{lsg=\"1\",start=\"warm\"} 1",
            "duplex_commits_total{lsg=\"1\"}",
            "duplex_lsg_epoch{lsg=\"1\"} 2",
        ] {
            assert!(text.contains(want), "metrics lack {want}:\n{text}");
        }
        cluster.close();
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_killed_node_is_taken_over_by_its_backup_node_mid_bank() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let local = LocalCluster::up(LocalOptions::default()).expect("cluster up");
    with_logs(&local, async {
        let cluster = local.connect().await?;
        bank::init(&cluster, ACCOUNTS).await?;
        let (progress, stop, run) = start_bank(&cluster, 4, 30, 12);
        wait_commits(&progress, 0, 50, WAIT).await?;
        local.kill_node(1)?;
        let at_kill = progress.committed.load(Ordering::Relaxed);
        let (owner, status) = wait_owner(&cluster, BANK, WAIT, |c, _| c.node == 2).await?;
        assert_eq!(
            owner,
            cpu(2, 0),
            "the backup node's pair the primary streamed to"
        );
        assert_eq!(status.state.as_deref(), Some("BackupOnly"));
        // LSG 3's backup node was node 1: its primary goes on alone.
        wait_owner(&cluster, LsgId(3), WAIT, |_, l| {
            l.state.as_deref() == Some("PrimaryOnly")
        })
        .await?;
        wait_commits(&progress, at_kill, 50, WAIT).await?;
        let run = finish_bank(&cluster, &stop, run).await?;
        assert!(run.committed > at_kill);
        // The killed node restarts and rejoins as the backup node: back to normal.
        local.start_missing()?;
        wait_owner(&cluster, BANK, WAIT, |c, l| {
            c == owner && l.state.as_deref() == Some("Normal")
        })
        .await?;
        cluster.close();
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_home_node_cut_off_from_its_backup_node_goes_primary_only_and_its_death_loses_nothing() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let local = LocalCluster::up(LocalOptions {
        faults: true,
        ..LocalOptions::default()
    })
    .expect("cluster up");
    with_logs(&local, async {
        let cluster = local.connect().await?;
        bank::init(&cluster, ACCOUNTS).await?;
        let (progress, stop, run) = start_bank(&cluster, 4, 30, 13);
        wait_commits(&progress, 0, 50, WAIT).await?;
        let cut = |what: &str| -> Result<()> {
            for home in [cpu(1, 0), cpu(1, 1)] {
                for backup in [cpu(2, 0), cpu(2, 1)] {
                    local.fault(home, &format!("{what} {backup}"))?;
                    local.fault(backup, &format!("{what} {home}"))?;
                }
            }
            Ok(())
        };
        cut("partition")?;
        // Alive but cut off: never taken over, primary-only instead ...
        let (owner, _) = wait_owner(&cluster, BANK, WAIT, |_, l| {
            l.state.as_deref() == Some("PrimaryOnly")
        })
        .await?;
        assert_eq!(owner, cpu(1, 0));
        // ... and back to normal once the backup node is reachable and caught up.
        cut("heal")?;
        wait_owner(&cluster, BANK, WAIT, |c, l| {
            c == owner && l.state.as_deref() == Some("Normal") && l.epoch.0 == 1
        })
        .await?;
        cut("partition")?;
        wait_owner(&cluster, BANK, WAIT, |c, l| {
            c == owner && l.state.as_deref() == Some("PrimaryOnly")
        })
        .await?;
        let at_cut = progress.committed.load(Ordering::Relaxed);
        wait_commits(&progress, at_cut, 100, WAIT).await?;
        let flushed_before = progress.flushed.load(Ordering::Relaxed);
        assert!(
            flushed_before > 0,
            "commits in primary-only state are flushed first"
        );
        local.kill_node(1)?;
        let (owner, status) = wait_owner(&cluster, BANK, WAIT, |c, _| c.node == 2).await?;
        let timeline = status.takeovers.last().context("a takeover timeline")?;
        assert_eq!(
            timeline.start.as_deref(),
            Some("cold"),
            "the backup node's copy is stale: recovery from the trail"
        );
        println!("taken over by {owner}: {timeline:?}");
        let at_kill = progress.committed.load(Ordering::Relaxed);
        wait_commits(&progress, at_kill, 50, WAIT).await?;
        finish_bank(&cluster, &stop, run).await?;
        cluster.close();
        Ok(())
    })
    .await;
}

/// Sends one client request as it was first sent (same client and sequence number) to `to`.
async fn send_raw(
    cluster: &Cluster,
    to: EndpointId,
    lsg: LsgId,
    request: ClientRequest,
) -> Result<CpuReply> {
    let payload = CpuRequest::Lsg { lsg, request }.encode()?;
    let bytes = cluster
        .endpoint()
        .transport()
        .call(to, Bytes::from(payload), Duration::from_secs(5))
        .await?;
    CpuReply::decode(&bytes).map_err(anyhow::Error::msg)
}

#[tokio::test]
async fn a_commit_resent_after_a_takeover_is_answered_from_the_table_not_run_again() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let local = LocalCluster::up(LocalOptions::default()).expect("cluster up");
    with_logs(&local, async {
        let cluster = local.connect().await?;
        let lsg = LsgId(2);
        let counter = b"a/counter".to_vec();
        let volume = "kv-low".to_string();
        // Both backups in: a commit is then acknowledged from memory on two nodes.
        let (primary, _) = wait_owner(&cluster, lsg, WAIT, |_, l| {
            l.state.as_deref() == Some("Normal") && l.home_counts
        })
        .await?;
        let request = |seq: u64, tx, op| raw(0xC0FFEE, seq, tx, op);
        let ClientReply::Began(tx) =
            lsg_reply(send_raw(&cluster, primary, lsg, request(1, None, Op::Begin)).await?)?
        else {
            bail!("begin");
        };
        let read = lsg_reply(
            send_raw(
                &cluster,
                primary,
                lsg,
                request(
                    2,
                    Some(tx),
                    Op::Get {
                        volume: volume.clone(),
                        key: counter.clone(),
                    },
                ),
            )
            .await?,
        )?;
        let before = match read {
            ClientReply::Value(v) => v.map_or(0, |v| v.first().copied().unwrap_or(0)),
            r => bail!("get answered {r:?}"),
        };
        let put = request(
            3,
            Some(tx),
            Op::Put {
                volume: volume.clone(),
                key: counter.clone(),
                value: vec![before + 1],
            },
        );
        lsg_reply(send_raw(&cluster, primary, lsg, put.clone()).await?)?;
        let commit = request(4, Some(tx), Op::Commit);
        let first = lsg_reply(send_raw(&cluster, primary, lsg, commit.clone()).await?)?;
        let ClientReply::Outcome(Reply::Committed(receipt)) = &first else {
            bail!("commit answered {first:?}");
        };
        assert_eq!(receipt.state, CommitState::Normal);
        // The primary dies; its same-node half takes over.
        local.kill_cpu(primary)?;
        let (owner, _) = wait_owner(&cluster, lsg, WAIT, |c, _| c != primary).await?;
        // The client never saw the answer and resends the same requests to the new primary.
        let again = lsg_reply(send_raw(&cluster, owner, lsg, commit).await?)?;
        assert_eq!(again, first, "the resent commit gets the original answer");
        let put_again = lsg_reply(send_raw(&cluster, owner, lsg, put).await?);
        assert!(
            put_again.is_err() || !matches!(put_again, Ok(ClientReply::Written)),
            "the transaction ended: {put_again:?}"
        );
        // Many requests in flight on one session: 16 transactions begun at once, each answered.
        let many = cluster.endpoint().session_in(lsg, ClientId(0xBEEF));
        let begins = (0..16).map(|_| many.request(None, Op::Begin));
        let mut txs = std::collections::BTreeSet::new();
        for answer in join_all(begins).await {
            match answer?.reply {
                ClientReply::Began(tx) => txs.insert(tx),
                r => bail!("a begin answered {r:?}"),
            };
        }
        assert_eq!(txs.len(), 16, "16 requests in flight, 16 transactions");
        let commits = txs.iter().map(|tx| many.request(Some(*tx), Op::Commit));
        for answer in join_all(commits).await {
            assert!(matches!(
                answer?.reply,
                ClientReply::Outcome(Reply::Committed(_))
            ));
        }
        let session = cluster.session();
        let mut t = session.transaction();
        let now = t
            .get(&counter)
            .await?
            .and_then(|v| v.first().copied())
            .unwrap_or(0);
        t.commit().await?;
        println!("counter before {before}, after {now}");
        assert_eq!(now, before + 1, "the counter moved once");
        cluster.close();
        Ok(())
    })
    .await;
}

/// Runs `futures` concurrently on this task; their outputs in order.
async fn join_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<_> = futures.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut waiting = false;
        for (slot, f) in out.iter_mut().zip(pending.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => waiting = true,
                }
            }
        }
        if waiting {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// A client request as the library would number it: client `client`, sequence `seq`, every
/// earlier reply seen.
fn raw(client: u64, seq: u64, tx: Option<TxId>, op: Op) -> ClientRequest {
    ClientRequest {
        client: ClientId(client),
        seq: RequestSeq(seq),
        seen_below: RequestSeq(1),
        tx,
        op,
    }
}

fn lsg_reply(reply: CpuReply) -> Result<ClientReply> {
    match reply {
        CpuReply::Lsg(ClientReply::Error(e)) => Err(anyhow::anyhow!("refused: {e}")),
        CpuReply::Lsg(r) => Ok(r),
        other => bail!("expected an LSG reply, got {other:?}"),
    }
}

#[tokio::test]
async fn a_stopped_primary_is_ended_and_taken_over_and_never_answers_after_it_wakes() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let local = LocalCluster::up(LocalOptions::default()).expect("cluster up");
    with_logs(&local, async {
        let cluster = local.connect().await?;
        bank::init(&cluster, ACCOUNTS).await?;
        let (progress, stop, run) = start_bank(&cluster, 4, 30, 14);
        wait_commits(&progress, 0, 50, WAIT).await?;
        let stopped = cpu(1, 0);
        let pid = Pid::from_raw(local.pid_of(stopped)?);
        kill(pid, Signal::SIGSTOP)?;
        let (owner, status) = wait_owner(&cluster, BANK, WAIT, |c, _| c != stopped).await?;
        assert_eq!(owner, cpu(1, 1));
        assert_eq!(status.epoch.0, 2);
        // Woken after the takeover: it was ended (the halt rule), so it cannot write or answer.
        let _ = kill(pid, Signal::SIGCONT);
        let gone = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        });
        assert!(
            gone,
            "the stopped primary was ended before its LSG was taken over"
        );
        let at = progress.committed.load(Ordering::Relaxed);
        wait_commits(&progress, at, 50, WAIT).await?;
        finish_bank(&cluster, &stop, run).await?;
        cluster.close();
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn after_the_cluster_is_stopped_it_comes_back_from_its_trails_with_every_acknowledged_commit()
{
    let _serial = ONE_AT_A_TIME.lock().await;
    let local = LocalCluster::up(LocalOptions::default()).expect("cluster up");
    with_logs(&local, async {
        let cluster = local.connect().await?;
        bank::init(&cluster, ACCOUNTS).await?;
        let (progress, stop, run) = start_bank(&cluster, 4, 3, 15);
        wait_commits(&progress, 0, 100, WAIT).await?;
        let run = {
            stop.store(true, Ordering::Relaxed);
            run.await.context("bank task")??
        };
        cluster.close();
        // The operator's stop (SIGTERM: every owner makes its trail durable), then a cold
        // start: nobody announces a primary, so each LSG's first CPU recovers it.
        local.stop()?;
        local.start_missing()?;
        let cluster = local.connect().await?;
        let check = bank::check(&cluster, ACCOUNTS, &run.acknowledged)
            .await
            .map_err(anyhow::Error::msg)?;
        assert_eq!(check.acknowledged, run.acknowledged.len());
        let (_, status) = wait_owner(&cluster, BANK, WAIT, |_, _| true).await?;
        assert_eq!(
            status.takeovers.last().and_then(|t| t.start.as_deref()),
            Some("cold")
        );
        cluster.close();
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_the_cpu_stays_up() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let local = LocalCluster::up(LocalOptions::default()).expect("cluster up");
    with_logs(&local, async {
        let cluster = local.connect().await?;
        // Both halves joined: the backups know the primary.
        let (primary, _) = wait_owner(&cluster, BANK, WAIT, |_, l| {
            l.state.as_deref() == Some("Normal") && l.home_counts
        })
        .await?;
        let transport = cluster.endpoint().transport();
        // Garbage.
        let garbage = transport
            .call(primary, Bytes::from_static(&[0xff, 0x13, 0x37, 0x00, 0x42]), Duration::from_secs(5))
            .await?;
        assert!(matches!(CpuReply::decode(&garbage), Ok(CpuReply::Malformed { .. })));
        // An LSG this CPU does not run: redirected.
        let other = send_raw(&cluster, primary, LsgId(2), raw(5, 1, None, Op::Begin))
        .await?;
        assert!(matches!(other, CpuReply::Redirect { .. }), "{other:?}");
        // A backup redirects to the primary it knows.
        let backup = send_raw(&cluster, cpu(1, 1), BANK, raw(5, 1, None, Op::Begin))
        .await?;
        assert!(matches!(backup, CpuReply::Redirect { primary: Some(p), .. } if p == primary), "{backup:?}");
        // An unknown volume and an oversized value: refused, nothing written.
        let session = cluster.session();
        let mut t = session.transaction();
        t.put(b"bank/a/00001", b"x").await?;
        let ClientReply::Began(tx) = lsg_reply(send_raw(&cluster, primary, BANK, raw(6, 1, None, Op::Begin)).await?)? else {
            bail!("begin");
        };
        let unknown = send_raw(&cluster, primary, BANK, raw(6, 2, Some(tx), Op::Put { volume: "nope".into(), key: b"k".to_vec(), value: b"v".to_vec() }))
        .await?;
        assert!(matches!(unknown, CpuReply::Lsg(ClientReply::Error(OpError::UnknownVolume { .. }))), "{unknown:?}");
        let misrouted = send_raw(&cluster, primary, BANK, raw(6, 3, Some(tx), Op::Put { volume: "bank-accounts".into(), key: b"zebra".to_vec(), value: b"v".to_vec() }))
        .await?;
        assert!(
            matches!(&misrouted, CpuReply::Lsg(ClientReply::Error(OpError::Malformed { reason })) if reason.contains("outside volume bank-accounts")),
            "{misrouted:?}"
        );
        // Over the LSG's value limit: refused by the owner, the transaction goes on.
        let big = vec![7u8; (1 << 20) + 1];
        match t.put(b"bank/a/00002", &big).await {
            Err(e) if e.to_string().contains("exceeds the limit") => {}
            other => bail!("an oversized value: {other:?}"),
        }
        // Far over any limit: refused before it is decoded.
        let huge = Bytes::from(vec![7u8; 4 << 20]);
        let reply = transport.call(primary, huge, Duration::from_secs(10)).await?;
        match CpuReply::decode(&reply) {
            Ok(CpuReply::Malformed { reason }) if reason.contains("exceeds the limit") => {}
            other => bail!("a huge request: {other:?}"),
        }
        // A key that spans another LSG: a clear error, not a silent two-LSG commit.
        let err = t.put(b"apple", b"1").await.expect_err("cross-LSG");
        assert!(matches!(err, ClientError::CrossLsg { .. }), "{err}");
        t.abort().await?;
        // Prepare has no coordinator yet: refused, so no client can lock records for ever.
        let prepare = send_raw(&cluster, primary, BANK, raw(6, 4, Some(tx), Op::Prepare { coordinator: BANK }))
        .await?;
        assert!(
            matches!(&prepare, CpuReply::Lsg(ClientReply::Error(OpError::Malformed { reason })) if reason.contains("coordinator")),
            "{prepare:?}"
        );
        // A client posing as a primary (a notice) or fencing the backups (a pair message) is
        // ignored: the backups still follow the real primary and it stays in normal state.
        let fake = duplex_host::Notice::Primary { lsg: BANK, epoch: duplex_lsg::OwnerEpoch(1000) };
        let fence = duplex_pair::PairMessage::Fence {
            tag: duplex_pair::PairTag { lsg: BANK, epoch: duplex_lsg::OwnerEpoch(1000), incarnation: 1 },
            from: duplex_lsg::Lsn(1),
        };
        for backup in [cpu(1, 1), cpu(2, 0)] {
            transport.send(backup, Bytes::from(fake.encode()?))?;
            transport.stream_send(backup, duplex_host::PAIR_STREAM, Bytes::from(fence.encode()?))?;
        }
        // Commits that need both backups' acknowledgements go through meanwhile.
        for n in 0..20u32 {
            let mut w = session.transaction();
            w.put(format!("bank/t/probe/{n}").as_bytes(), b"p").await?;
            w.commit().await?;
        }
        for backup in [cpu(1, 1), cpu(2, 0)] {
            let status = cluster.endpoint().status(backup, Duration::from_secs(5)).await?;
            let role = status.lsgs.iter().find(|l| l.lsg == BANK).context("LSG 1's role")?;
            assert_eq!((role.primary, role.epoch.0), (Some(primary), 1), "{backup}: {role:?}");
        }
        // A client without a certificate of the cluster CA gets no connection.
        let err = Cluster::connect(
            local.config.clone(),
            duplex_client::ConnectOptions {
                certs: local.dir().join("certs"),
                client_name: "stranger".into(),
                timeouts: duplex_host::ClientOptions::default(),
            },
        )
        .await
        .expect_err("no certificate");
        assert!(matches!(err, ClientError::Credentials(_)), "{err}");
        // The CPU still serves, and was never taken over.
        let status = cluster.endpoint().status(primary, Duration::from_secs(5)).await?;
        let bank = status.lsgs.iter().find(|l| l.lsg == BANK).context("LSG 1's role")?;
        assert_eq!((bank.role.as_str(), bank.epoch.0), ("owner", 1));
        cluster.close();
        Ok(())
    })
    .await;
}
