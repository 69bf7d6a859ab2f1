//! A local cluster of `lsg-cpu` processes for the process tests and the pairs benchmark: a
//! temporary directory with the certificates and the shared LSG, one reserved loopback port per
//! CPU (kept across restarts), every process killed when its guard drops, and each process's
//! report lines read on a thread of their own so callers wait on them with a bound.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use duplex_transport::certs::{
    CertError, ClientName, Credentials, ensure_client_cert, ensure_cluster_certs,
};
use duplex_transport::{EndpointId, PeerAddrs};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::bank::{BankOptions, BankRun};

/// A child process that is SIGKILLed and reaped when the guard drops, whatever happened.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One `lsg-cpu` process and its report lines.
#[derive(Debug)]
pub struct CpuProcess {
    pub id: EndpointId,
    pub child: KillOnDrop,
    stdin: ChildStdin,
    lines: mpsc::Receiver<(Instant, Value)>,
}

impl CpuProcess {
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.0.id() as i32)
    }

    /// Waits for the next report line matching `want`, at most `limit` (lines before it are
    /// passed over); returns it with when it was read.
    pub fn wait_for_at(
        &self,
        what: &str,
        limit: Duration,
        want: impl Fn(&Value) -> bool,
    ) -> Result<(Instant, Value)> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, v)) if want(&v) => return Ok((at, v)),
                Ok(_) => {}
                Err(_) => bail!("{}: no {what} within {limit:?}", self.id),
            }
        }
    }

    pub fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        want: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        self.wait_for_at(what, limit, want).map(|(_, v)| v)
    }

    /// Sends a command line (`partition N.C`, `heal N.C`).
    pub fn command(&mut self, line: &str) -> Result<()> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        Ok(())
    }
}

/// Whether a report line is the event `name`.
pub fn is_event(v: &Value, name: &str) -> bool {
    v["event"] == name
}

/// A state line with `state` (and the same-node half counting, if `home_counts`).
pub fn is_state(v: &Value, state: &str, home_counts: bool) -> bool {
    is_event(v, "state") && v["state"] == state && (!home_counts || v["home_counts"] == true)
}

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The `lsg-cpu` binary.
    pub bin: PathBuf,
    pub cpus: Vec<EndpointId>,
    /// The bank's accounts (created by the first owner).
    pub accounts: usize,
    pub paranoid: bool,
    /// Copy every process's output to stderr, prefixed by its CPU (tests show it on failure).
    pub echo: bool,
}

/// The client certificate (`client-testbed.pem`) every client endpoint `0.k` of a test
/// cluster presents.
pub const CLIENT_CERT_NAME: &str = "testbed";

/// The credentials of `endpoint` in a test cluster's cert directory: client `CLIENT_CERT_NAME`'s
/// for a client endpoint `0.k`, else its node's.
pub fn credentials(
    certs: &std::path::Path,
    endpoint: EndpointId,
) -> Result<Credentials, CertError> {
    if endpoint.is_client() {
        Credentials::load_client(certs, &ClientName::new(CLIENT_CERT_NAME)?)
    } else {
        Credentials::load_node(certs, endpoint.node)
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct Cluster {
    options: ClusterOptions,
    _dir: tempfile::TempDir,
    pub certs: PathBuf,
    pub data: PathBuf,
    pub addrs: BTreeMap<EndpointId, SocketAddr>,
    pub procs: BTreeMap<EndpointId, CpuProcess>,
}

impl Cluster {
    /// Certificates for nodes 1 and 2, every CPU's node and the clients (`CLIENT_CERT_NAME`),
    /// and one port per CPU.
    pub fn new(options: ClusterOptions) -> Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let certs = dir.path().join("certs");
        let mut nodes = vec![1, 2];
        nodes.extend(options.cpus.iter().map(|c| c.node));
        nodes.sort();
        nodes.dedup();
        ensure_cluster_certs(&certs, &nodes)?;
        ensure_client_cert(&certs, &ClientName::new(CLIENT_CERT_NAME)?)?;
        let data = dir.path().join("data");
        let mut addrs = BTreeMap::new();
        for id in &options.cpus {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            addrs.insert(*id, s.local_addr()?);
        }
        Ok(Cluster {
            options,
            _dir: dir,
            certs,
            data,
            addrs,
            procs: BTreeMap::new(),
        })
    }

    /// Starts CPU `id` in `role` (`create-and-own`, `backup`, `recover`) and waits for its
    /// ready line.
    pub fn spawn(&mut self, id: EndpointId, role: &str) -> Result<&mut CpuProcess> {
        let addr = self
            .addrs
            .get(&id)
            .ok_or_else(|| anyhow!("{id} is not a CPU of this cluster"))?;
        let mut cmd = Command::new(&self.options.bin);
        cmd.args(["--node", &id.node.to_string(), "--cpu", &id.cpu.to_string()])
            .args(["--role", role])
            .args(["--accounts", &self.options.accounts.to_string()])
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--certs")
            .arg(&self.certs)
            .args(["--listen", &addr.to_string()]);
        if self.options.paranoid {
            cmd.arg("--paranoid");
        }
        for (other, addr) in &self.addrs {
            if *other != id {
                cmd.args(["--peer", &format!("{other}={addr}")]);
            }
        }
        let mut child = KillOnDrop(
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("spawning {}", self.options.bin.display()))?,
        );
        let stdin = child.0.stdin.take().context("piped stdin")?;
        let stdout = child.0.stdout.take().context("piped stdout")?;
        let stderr = child.0.stderr.take().context("piped stderr")?;
        let echo = self.options.echo;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let at = Instant::now();
                if echo {
                    eprintln!("[{id}] {line}");
                }
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    // Keep reading after the receiver is gone, so the child never blocks.
                    let _ = tx.send((at, v));
                }
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if echo {
                    eprintln!("[{id} stderr] {line}");
                }
            }
        });
        let p = CpuProcess {
            id,
            child,
            stdin,
            lines,
        };
        p.wait_for("ready line", Duration::from_secs(15), |v| {
            is_event(v, "ready")
        })?;
        self.procs.insert(id, p);
        self.procs.get_mut(&id).context("just inserted")
    }

    pub fn proc(&self, id: EndpointId) -> Result<&CpuProcess> {
        self.procs
            .get(&id)
            .ok_or_else(|| anyhow!("{id} is not running"))
    }

    pub fn proc_mut(&mut self, id: EndpointId) -> Result<&mut CpuProcess> {
        self.procs
            .get_mut(&id)
            .ok_or_else(|| anyhow!("{id} is not running"))
    }

    /// SIGKILLs CPU `id` and reaps it; returns when the signal was sent.
    pub fn kill(&mut self, id: EndpointId) -> Result<Instant> {
        let mut p = self
            .procs
            .remove(&id)
            .ok_or_else(|| anyhow!("{id} is not running"))?;
        let at = Instant::now();
        kill(p.pid(), Signal::SIGKILL)?;
        p.child.0.wait()?;
        Ok(at)
    }

    /// Every CPU with its address, for clients.
    pub fn cpu_addrs(&self) -> Vec<(EndpointId, PeerAddrs)> {
        self.addrs
            .iter()
            .map(|(id, main)| {
                (
                    *id,
                    PeerAddrs {
                        main: *main,
                        failsafe: None,
                    },
                )
            })
            .collect()
    }

    /// Bank clients on endpoint 0.0.
    pub fn bank(&self, clients: usize, seed: u64) -> Result<BankRun> {
        BankRun::start(BankOptions {
            certs: self.certs.clone(),
            endpoint: EndpointId::new(0, 0),
            cpus: self.cpu_addrs(),
            clients,
            accounts: self.options.accounts,
            seed,
        })
        .map_err(|e| anyhow!(e))
    }
}
