//! A local cluster run by the real binaries, for the process tests: `duplex local up` in a
//! temporary directory (every `duplexd` a process of its own), `duplex kill` for drills, the
//! CPUs' fault pipes for partitions, and `duplex local down` when the guard drops.
//!
//! The binaries are found beside the test executable's directory (`target/debug`), where
//! `cargo test --workspace` builds them (each has an integration test), or in
//! `DUPLEX_BIN_DIR`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use duplex_client::{Cluster, ConnectOptions};
use duplex_host::{ClientOptions, LsgStatus};
use duplex_lsg::LsgId;
use duplex_node::ClusterConfig;
use duplex_transport::EndpointId;

/// Where `duplex` and `duplexd` are: `DUPLEX_BIN_DIR`, or the running executable's directory
/// (a benchmark in `target/release`) or its parent (a test in `target/debug/deps`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("DUPLEX_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    let here = exe.parent().context("the executable's directory")?;
    let candidates = [Some(here), here.parent()];
    for dir in candidates.into_iter().flatten() {
        if ["duplex", "duplexd"].iter().all(|b| dir.join(b).exists()) {
            return Ok(dir.to_path_buf());
        }
    }
    bail!(
        "no duplex and duplexd beside {}: build them first (`cargo build -p duplex -p duplexd`, or run `cargo test --workspace`)",
        exe.display()
    )
}

#[derive(Debug, Clone)]
pub struct LocalOptions {
    pub nodes: u16,
    pub cpus: u16,
    pub paranoid: bool,
    /// Each CPU reads `partition N.C` / `heal N.C` from a pipe ([`LocalCluster::fault`]).
    pub faults: bool,
}

impl Default for LocalOptions {
    fn default() -> Self {
        LocalOptions {
            nodes: 3,
            cpus: 2,
            paranoid: false,
            faults: false,
        }
    }
}

/// See the module docs. Dropping it stops every CPU.
#[derive(Debug)]
pub struct LocalCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    options: LocalOptions,
    pub config: ClusterConfig,
}

impl LocalCluster {
    pub fn up(options: LocalOptions) -> Result<Self> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new().prefix("duplex-local-").tempdir()?;
        let started = start(&bin, dir.path(), &options)
            .and_then(|()| Ok(ClusterConfig::load(&dir.path().join("cluster.toml"))?));
        match started {
            Ok(config) => Ok(LocalCluster {
                dir,
                bin,
                options,
                config,
            }),
            Err(e) => {
                stop(&bin, dir.path());
                Err(e)
            }
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("cluster.toml")
    }

    fn duplex(&self) -> Command {
        Command::new(self.bin.join("duplex"))
    }

    /// `duplex local up` on the directory: starts every CPU that is not running and waits for
    /// every LSG's primary.
    pub fn start_missing(&self) -> Result<()> {
        start(&self.bin, self.dir.path(), &self.options)
    }

    /// `duplex local down`: every CPU stopped (SIGTERM, then SIGKILL after a bound).
    pub fn stop(&self) -> Result<()> {
        let out = self
            .duplex()
            .args(["local", "down", "--dir"])
            .arg(self.dir.path())
            .output()?;
        if !out.status.success() {
            bail!(
                "duplex local down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// `duplex kill --cpu N.K`.
    pub fn kill_cpu(&self, cpu: EndpointId) -> Result<Instant> {
        self.kill(&["--cpu", &cpu.to_string()])
    }

    /// `duplex kill --node N`.
    pub fn kill_node(&self, node: u16) -> Result<Instant> {
        self.kill(&["--node", &node.to_string()])
    }

    fn kill(&self, what: &[&str]) -> Result<Instant> {
        let at = Instant::now();
        let out = self
            .duplex()
            .arg("kill")
            .arg("--config")
            .arg(self.config_path())
            .args(what)
            .output()?;
        if !out.status.success() {
            bail!(
                "duplex kill failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(at)
    }

    /// SIGKILLs `cpus` directly (pid files read first, so the signals go out back to back);
    /// returns when the first was sent. For measurements: `kill_cpu` spawns `duplex kill`.
    pub fn kill_now(&self, cpus: &[EndpointId]) -> Result<Instant> {
        let pids: Vec<i32> = cpus
            .iter()
            .map(|c| self.pid_of(*c))
            .collect::<Result<_>>()?;
        let at = Instant::now();
        for pid in pids {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )?;
        }
        Ok(at)
    }

    /// Sends a fault line (`partition N.C`, `heal N.C`) to CPU `cpu`.
    pub fn fault(&self, cpu: EndpointId, line: &str) -> Result<()> {
        let fifo = self
            .dir
            .path()
            .join("logs")
            .join(format!("cpu-{cpu}.faults"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .with_context(|| format!("opening {}", fifo.display()))?;
        writeln!(f, "{line}")?;
        Ok(())
    }

    /// CPU `cpu`'s metrics page (Prometheus text format), fetched over plain HTTP/1.0.
    pub fn metrics(&self, cpu: EndpointId) -> Result<String> {
        use std::io::Read;
        let addr = self
            .config
            .node(cpu.node)
            .and_then(|n| n.cpus.iter().find(|c| c.id == cpu.cpu))
            .and_then(|c| c.metrics)
            .context("the CPU has no metrics address")?;
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    }

    /// The pid in CPU `cpu`'s pid file.
    pub fn pid_of(&self, cpu: EndpointId) -> Result<i32> {
        let node = self.config.node(cpu.node).context("no such node")?;
        let text = std::fs::read_to_string(
            node.data_dir
                .join(format!("cpu-{}.{}.pid", cpu.node, cpu.cpu)),
        )?;
        text.split_whitespace()
            .next()
            .context("empty pid file")?
            .parse()
            .context("pid")
    }

    /// A client connection.
    pub async fn connect(&self) -> Result<Cluster> {
        let options = ConnectOptions {
            certs: self.dir.path().join("certs"),
            client_name: "local".into(),
            timeouts: ClientOptions::default(),
        };
        let cluster = Cluster::connect(self.config.clone(), options).await?;
        cluster.wait_ready(Duration::from_secs(20)).await?;
        Ok(cluster)
    }

    /// The logs of every CPU, for a failing test's message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path().join("logs")) {
            let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            paths.sort();
            for p in paths {
                if p.extension().is_some_and(|e| e == "jsonl" || e == "log")
                    && let Ok(text) = std::fs::read_to_string(&p)
                {
                    let tail: Vec<&str> = text.lines().rev().take(40).collect();
                    out.push_str(&format!("== {}\n", p.display()));
                    for l in tail.into_iter().rev() {
                        out.push_str(l);
                        out.push('\n');
                    }
                }
            }
        }
        out
    }
}

/// `duplex local up` on `dir` (see [`LocalCluster::start_missing`]).
fn start(bin: &Path, dir: &Path, options: &LocalOptions) -> Result<()> {
    let mut cmd = Command::new(bin.join("duplex"));
    cmd.args(["local", "up", "--dir"])
        .arg(dir)
        .args(["--nodes", &options.nodes.to_string()])
        .args(["--cpus", &options.cpus.to_string()])
        .arg("--duplexd")
        .arg(bin.join("duplexd"));
    if options.paranoid {
        cmd.arg("--paranoid");
    }
    if options.faults {
        cmd.arg("--faults-on-stdin");
    }
    let out = cmd.output().context("running duplex local up")?;
    if !out.status.success() {
        bail!(
            "duplex local up failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn stop(bin: &Path, dir: &Path) {
    let _ = Command::new(bin.join("duplex"))
        .args(["local", "down", "--dir"])
        .arg(dir)
        .output();
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        stop(&self.bin, self.dir.path());
    }
}

/// The owner of `lsg` with the highest epoch among the CPUs that answer, polled every 20 ms
/// until `want` holds, at most `limit`.
pub async fn wait_owner(
    cluster: &Cluster,
    lsg: LsgId,
    limit: Duration,
    want: impl Fn(EndpointId, &LsgStatus) -> bool,
) -> Result<(EndpointId, LsgStatus)> {
    let deadline = Instant::now() + limit;
    let mut last = None;
    while Instant::now() < deadline {
        let statuses = cluster.status(Duration::from_millis(500)).await;
        let owner = statuses
            .into_iter()
            .filter_map(|(cpu, s)| s.ok().map(|s| (cpu, s)))
            .flat_map(|(cpu, s)| s.lsgs.into_iter().map(move |l| (cpu, l)))
            .filter(|(_, l)| l.lsg == lsg && l.role == "owner")
            .max_by_key(|(_, l)| l.epoch);
        if let Some((cpu, l)) = owner {
            if want(cpu, &l) {
                return Ok((cpu, l));
            }
            last = Some((cpu, l));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("LSG {lsg}: no owner as wanted within {limit:?}; last seen {last:?}")
}
