//! `duplex demo`: a local cluster, the bank workload, the home node of the bank's LSG killed
//! mid-run, the takeover shown as it happens, the bank checked, everything stopped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use duplex_lsg::LsgId;
use duplex_transport::EndpointId;

use crate::client_cmd::{self, BankArgs};
use crate::local_cmd::{self, DirArgs, UpArgs};

#[derive(Debug, Args, Clone)]
pub struct DemoArgs {
    /// Where the demo's cluster lives (default: a new temporary directory, removed at the end).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Seconds of bank transfers in all.
    #[arg(long, default_value_t = 12)]
    pub seconds: u64,
    /// Seconds into the run when the home node of LSG 1 is killed.
    #[arg(long, default_value_t = 4)]
    pub kill_after: u64,
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    #[arg(long, default_value_t = 1_000)]
    pub accounts: usize,
    /// The `duplexd` binary (default: beside this one).
    #[arg(long)]
    pub duplexd: Option<PathBuf>,
}

/// Ends the demo's CPUs whatever happens.
struct Down(DirArgs);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = local_cmd::down(&self.0);
    }
}

fn say(t0: Instant, line: &str) {
    eprintln!("[{:>6.2} s] {line}", t0.elapsed().as_secs_f64());
}

pub fn run(args: &DemoArgs) -> Result<()> {
    let t0 = Instant::now();
    let temp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::Builder::new().prefix("duplex-demo-").tempdir()?;
            temp.path().to_path_buf()
        }
    };
    say(
        t0,
        &format!(
            "starting a local cluster of 3 nodes x 2 CPUs in {}",
            dir.display()
        ),
    );
    let up = UpArgs {
        dir: DirArgs { dir: dir.clone() },
        nodes: 3,
        cpus: 2,
        paranoid: false,
        duplexd: args.duplexd.clone(),
        faults_on_stdin: false,
        wait_seconds: 30,
    };
    let _down = Down(up.dir.clone());
    local_cmd::up(&up)?;
    say(t0, "every LSG has its primary");
    let cluster_args = local_cmd::cluster_args(&dir);
    client_cmd::block_on(async {
        let cluster = client_cmd::connect(&cluster_args).await?;
        cluster.wait_ready(Duration::from_secs(10)).await?;
        client_cmd::print_status(
            cluster.config(),
            &cluster.status(Duration::from_secs(2)).await,
        );
        let bank = BankArgs {
            cluster: cluster_args.clone(),
            accounts: args.accounts,
            clients: args.clients,
            seconds: args.seconds,
            seed: Some(42),
            json: false,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let watching = Arc::new(AtomicBool::new(true));
        let watcher = tokio::spawn(watch(cluster.clone(), t0, Arc::clone(&watching)));
        let killer = {
            let cluster_args = cluster_args.clone();
            let after = Duration::from_secs(args.kill_after);
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                eprintln!();
                say(
                    t0,
                    "killing every CPU of node 1, the home node of LSG 1 (kill -9)",
                );
                if let Err(e) = client_cmd::kill(&cluster_args, Some(1), None) {
                    say(t0, &format!("kill failed: {e:#}"));
                }
            })
        };
        let result = client_cmd::bank_on(&cluster, &bank, stop, false).await;
        let _ = killer.await;
        watching.store(false, Ordering::Relaxed);
        let _ = watcher.await;
        let result = result.context("the bank")?;
        say(
            t0,
            &format!(
                "{} transfers committed ({:.0}/s, p99 {} µs); {} retried after aborts or the takeover",
                result["committed"],
                result["commits_per_s"].as_f64().unwrap_or(0.0),
                result["p99_us"],
                result["retries"]
            ),
        );
        say(
            t0,
            &format!(
                "check passed: the total is still {}, and all {} acknowledged transfers are present, each once",
                result["check"]["total"], result["check"]["acknowledged_present"]
            ),
        );
        client_cmd::print_status(
            cluster.config(),
            &cluster.status(Duration::from_secs(2)).await,
        );
        cluster.close();
        Ok::<_, anyhow::Error>(())
    })?;
    say(t0, "stopping the cluster");
    Ok(())
}

/// Prints every change of an LSG's primary, state or epoch, and each takeover's timeline once
/// it is ready.
async fn watch(cluster: duplex_client::Cluster, t0: Instant, watching: Arc<AtomicBool>) {
    let mut seen: BTreeMap<LsgId, (EndpointId, Option<String>, u64)> = BTreeMap::new();
    let mut shown: BTreeSet<(EndpointId, LsgId, u64)> = BTreeSet::new();
    let mut first = true;
    while watching.load(Ordering::Relaxed) {
        let statuses = cluster.status(Duration::from_millis(500)).await;
        for (cpu, status) in &statuses {
            let Ok(status) = status else { continue };
            for l in &status.lsgs {
                for t in &l.takeovers {
                    let Some(ready) = t.ready_unix_ms else {
                        continue;
                    };
                    if !shown.insert((*cpu, l.lsg, t.epoch.0)) || first {
                        continue;
                    }
                    eprintln!();
                    say(
                        t0,
                        &format!(
                            "takeover of LSG {} by {cpu} ({} start, epoch {}): failure detected, fenced +{} ms, recovered +{} ms, ready +{} ms",
                            l.lsg.0,
                            t.start.clone().unwrap_or_default(),
                            t.epoch.0,
                            t.fenced_unix_ms.saturating_sub(t.detected_unix_ms),
                            t.recovered_unix_ms
                                .unwrap_or(ready)
                                .saturating_sub(t.detected_unix_ms),
                            ready.saturating_sub(t.detected_unix_ms),
                        ),
                    );
                }
                if l.role != "owner" {
                    continue;
                }
                let now = (*cpu, l.state.clone(), l.epoch.0);
                if seen.get(&l.lsg) != Some(&now) {
                    if !first {
                        eprintln!();
                        say(
                            t0,
                            &format!(
                                "LSG {}: primary {cpu}, state {}, owner epoch {}",
                                l.lsg.0,
                                l.state.clone().unwrap_or_default(),
                                l.epoch.0
                            ),
                        );
                    }
                    seen.insert(l.lsg, now);
                }
            }
        }
        first = false;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
