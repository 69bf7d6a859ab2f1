//! `duplex local`: a cluster on this machine, for trying Duplex out and for drills.
//!
//! `up` makes a directory with a generated cluster config (default 3 nodes x 2 CPUs on
//! loopback, shared storage under the directory), the cluster's certificates, and one
//! `duplexd` per CPU, each in its own process group with its output under `logs/`; it returns
//! once every LSG has a primary. On a directory that exists it starts only the CPUs that are
//! not running (a killed CPU rejoins as a backup). `down` ends every CPU. `status` is
//! `duplex status` for the directory's config.
//!
//! The generated layout: LSG n has home node n and backup node n+1 (the last's backup is node
//! 1). LSG 1 holds the `bank/` keys (volumes `bank-accounts` and `bank-transfers`), LSG 2 the
//! keys before them, the others share the keys after them.

use std::fmt::Write as _;
use std::fs;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use duplex_host::node::{Ended, end_local_cpu, local_cpu_running, signal_local_cpu};
use duplex_node::ClusterConfig;
use duplex_transport::certs::{ClientName, ensure_client_cert, ensure_cluster_certs};
use nix::sys::signal::Signal;

use crate::client_cmd::{self, ClusterArgs};

#[derive(Debug, Subcommand)]
pub enum LocalCommand {
    /// Start a local cluster (or the CPUs of one that are not running).
    Up(UpArgs),
    /// Stop every CPU of a local cluster.
    Down(DirArgs),
    /// Show the state of every LSG of a local cluster.
    Status(DirArgs),
}

#[derive(Debug, Args, Clone)]
pub struct DirArgs {
    /// The local cluster's directory.
    #[arg(long, default_value = "duplex-local")]
    pub dir: PathBuf,
}

#[derive(Debug, Args, Clone)]
pub struct UpArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    /// Nodes (2 to 8), each with its LSG.
    #[arg(long, default_value_t = 3)]
    pub nodes: u16,
    /// CPUs per node (1 to 8).
    #[arg(long, default_value_t = 2)]
    pub cpus: u16,
    /// Flush every commit before its acknowledgement, in every state.
    #[arg(long)]
    pub paranoid: bool,
    /// The `duplexd` binary (default: beside this one).
    #[arg(long)]
    pub duplexd: Option<PathBuf>,
    /// Give each CPU a stdin pipe for `partition`/`heal` lines (tests; see duplexd --help).
    #[arg(long, hide = true)]
    pub faults_on_stdin: bool,
    /// How long to wait for every LSG's primary.
    #[arg(long, default_value_t = 30)]
    pub wait_seconds: u64,
}

pub fn run(command: LocalCommand) -> Result<()> {
    match command {
        LocalCommand::Up(args) => {
            let started = up(&args)?;
            println!(
                "local cluster in {} ({} CPUs started); config {}",
                args.dir.dir.display(),
                started,
                config_path(&args.dir.dir).display()
            );
            client_cmd::run_status(&cluster_args(&args.dir.dir), false)
        }
        LocalCommand::Down(args) => {
            let ended = down(&args)?;
            println!("{ended} CPUs stopped");
            Ok(())
        }
        LocalCommand::Status(args) => client_cmd::run_status(&cluster_args(&args.dir), false),
    }
}

/// The client certificate `up` issues, which the other commands use by default.
pub const LOCAL_CLIENT: &str = "local";

pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("cluster.toml")
}

pub fn cluster_args(dir: &Path) -> ClusterArgs {
    ClusterArgs {
        config: config_path(dir),
        certs: None,
        client: LOCAL_CLIENT.to_string(),
    }
}

/// Free loopback ports, each different from every other handed out (the config refuses an
/// address used twice, and UDP and TCP number their ports apart). The sockets are held until
/// the config is written, so the kernel does not hand a port out twice meanwhile.
#[derive(Default)]
struct Ports {
    held_udp: Vec<UdpSocket>,
    held_tcp: Vec<TcpListener>,
    used: std::collections::BTreeSet<u16>,
}

/// Attempts to find a port not handed out yet.
const PORT_ATTEMPTS: usize = 100;

impl Ports {
    fn udp(&mut self) -> Result<u16> {
        for _ in 0..PORT_ATTEMPTS {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            let port = s.local_addr()?.port();
            self.held_udp.push(s);
            if self.used.insert(port) {
                return Ok(port);
            }
        }
        bail!("no free UDP port on 127.0.0.1")
    }

    fn tcp(&mut self) -> Result<u16> {
        for _ in 0..PORT_ATTEMPTS {
            let s = TcpListener::bind("127.0.0.1:0")?;
            let port = s.local_addr()?.port();
            self.held_tcp.push(s);
            if self.used.insert(port) {
                return Ok(port);
            }
        }
        bail!("no free TCP port on 127.0.0.1")
    }
}

fn toml_string(s: &str) -> String {
    format!("{s:?}")
}

/// The generated config (see the module docs).
fn generate(dir: &Path, nodes: u16, cpus: u16, paranoid: bool) -> Result<String> {
    if !(2..=8).contains(&nodes) {
        bail!("--nodes must be 2 to 8, not {nodes}");
    }
    if !(1..=8).contains(&cpus) {
        bail!("--cpus must be 1 to 8, not {cpus}");
    }
    let dir = fs::canonicalize(dir)?;
    let shared = dir.join("shared");
    let mut ports = Ports::default();
    let mut t = String::new();
    let durability = if paranoid { "paranoid" } else { "normal" };
    writeln!(
        t,
        "# Generated by `duplex local up`; schema in docs/config.md."
    )?;
    writeln!(t, "durability = \"{durability}\"\n")?;
    writeln!(
        t,
        "[storage]\nmode = \"shared\"\ndir = {}\n",
        toml_string(&shared.display().to_string())
    )?;
    for n in 1..=nodes {
        writeln!(t, "[[nodes]]\nid = {n}")?;
        let data = dir.join(format!("node-{n}"));
        writeln!(t, "data_dir = {}", toml_string(&data.display().to_string()))?;
        writeln!(t, "cpus = [")?;
        for c in 0..cpus {
            writeln!(
                t,
                "    {{ id = {c}, main = \"127.0.0.1:{}\", metrics = \"127.0.0.1:{}\" }},",
                ports.udp()?,
                ports.tcp()?
            )?;
        }
        writeln!(t, "]\n")?;
    }
    // Ranges after the bank's keys, one per LSG from 3 on (LSG 2 takes them all with 2 nodes).
    let starts = ["bank0", "k", "p", "t", "x", "z"];
    let high: Vec<(String, String, Option<String>)> = if nodes == 2 {
        vec![("kv-high".into(), "bank0".into(), None)]
    } else {
        let m = usize::from(nodes - 2);
        (0..m)
            .map(|i| {
                let end = if i + 1 < m {
                    Some(starts[i + 1].to_string())
                } else {
                    None
                };
                (format!("kv-{}", i + 3), starts[i].to_string(), end)
            })
            .collect()
    };
    for l in 1..=nodes {
        let backup = if l == nodes { 1 } else { l + 1 };
        writeln!(
            t,
            "[[lsgs]]\nid = {l}\nhome = {l}\nbackup = {backup}\nvolumes = ["
        )?;
        let mut volumes: Vec<(String, String, Option<String>)> = Vec::new();
        match l {
            1 => {
                volumes.push((
                    "bank-accounts".into(),
                    "bank/".into(),
                    Some("bank/t/".into()),
                ));
                volumes.push((
                    "bank-transfers".into(),
                    "bank/t/".into(),
                    Some("bank0".into()),
                ));
            }
            2 => {
                volumes.push(("kv-low".into(), String::new(), Some("bank/".into())));
                if nodes == 2 {
                    volumes.extend(high.iter().cloned());
                }
            }
            _ => volumes.push(high[usize::from(l - 3)].clone()),
        }
        for (name, start, end) in volumes {
            let end = end.map_or(String::new(), |e| format!(", end = {}", toml_string(&e)));
            writeln!(
                t,
                "    {{ name = {}, start = {}{end} }},",
                toml_string(&name),
                toml_string(&start)
            )?;
        }
        writeln!(t, "]\n")?;
    }
    Ok(t)
}

fn duplexd_path(explicit: Option<&PathBuf>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.clone());
    }
    let me = std::env::current_exe().context("finding this binary")?;
    let beside = me.with_file_name("duplexd");
    if beside.exists() {
        return Ok(beside);
    }
    bail!(
        "no duplexd beside {} (build it with `cargo build --release -p duplexd`, or pass --duplexd)",
        me.display()
    )
}

/// Starts the local cluster in `args.dir` (see the module docs); returns the CPUs started.
pub fn up(args: &UpArgs) -> Result<usize> {
    let dir = &args.dir.dir;
    fs::create_dir_all(dir.join("logs")).with_context(|| format!("creating {}", dir.display()))?;
    let config_file = config_path(dir);
    if !config_file.exists() {
        let text = generate(dir, args.nodes, args.cpus, args.paranoid)?;
        ClusterConfig::parse(&text).context("the generated config")?;
        fs::write(&config_file, text)?;
    }
    let config = ClusterConfig::load(&config_file)?;
    let cert_nodes: Vec<u16> = config.nodes().iter().map(|n| n.id).collect();
    ensure_cluster_certs(&dir.join("certs"), &cert_nodes).context("the cluster's certificates")?;
    ensure_client_cert(&dir.join("certs"), &ClientName::new(LOCAL_CLIENT)?)
        .context("the local client's certificate")?;
    let duplexd = duplexd_path(args.duplexd.as_ref())?;
    let mut started = 0;
    for node in config.nodes() {
        for cpu in node.endpoints() {
            if local_cpu_running(&node.data_dir, cpu) {
                continue;
            }
            let log = |ext: &str| -> Result<fs::File> {
                Ok(fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("logs").join(format!("cpu-{cpu}.{ext}")))?)
            };
            let mut cmd = Command::new(&duplexd);
            cmd.arg("--config")
                .arg(&config_file)
                .args([
                    "--node",
                    &cpu.node.to_string(),
                    "--cpu",
                    &cpu.cpu.to_string(),
                ])
                .stdout(log("jsonl")?)
                .stderr(log("log")?)
                .stdin(Stdio::null());
            if args.faults_on_stdin {
                let fifo = dir.join("logs").join(format!("cpu-{cpu}.faults"));
                if !fifo.exists() {
                    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
                        .with_context(|| format!("making {}", fifo.display()))?;
                }
                // Read and write, so opening never waits for a writer and EOF never comes.
                let f = fs::OpenOptions::new().read(true).write(true).open(&fifo)?;
                cmd.arg("--faults-on-stdin").stdin(f);
            }
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
            cmd.spawn()
                .with_context(|| format!("starting {} for CPU {cpu}", duplexd.display()))?;
            started += 1;
        }
    }
    let wait = Duration::from_secs(args.wait_seconds);
    client_cmd::block_on(async {
        let cluster = client_cmd::connect(&cluster_args(dir)).await?;
        cluster
            .wait_ready(wait)
            .await
            .with_context(|| format!("see the CPUs' logs in {}", dir.join("logs").display()))?;
        cluster.close();
        Ok(())
    })?;
    Ok(started)
}

/// How long `down` waits for the CPUs to flush and exit before it kills them.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// Stops every CPU of the local cluster in `dir`: SIGTERM (each owner makes its trail durable
/// and the CPU exits), then SIGKILL for any still running after `STOP_WAIT`. Returns how many
/// were running.
pub fn down(args: &DirArgs) -> Result<usize> {
    let config = ClusterConfig::load(&config_path(&args.dir))?;
    let mut asked = Vec::new();
    for node in config.nodes() {
        for cpu in node.endpoints() {
            match signal_local_cpu(&node.data_dir, cpu, Signal::SIGTERM) {
                Ok(Ended::Killed { .. }) => asked.push((node.data_dir.clone(), cpu)),
                Ok(Ended::NotRunning) => {}
                Err(e) => eprintln!("CPU {cpu}: {e}"),
            }
        }
    }
    let deadline = std::time::Instant::now() + STOP_WAIT;
    while asked.iter().any(|(dir, cpu)| local_cpu_running(dir, *cpu))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    for (dir, cpu) in &asked {
        if local_cpu_running(dir, *cpu) {
            eprintln!("CPU {cpu} did not stop within {STOP_WAIT:?}: killed");
            if let Err(e) = end_local_cpu(dir, *cpu) {
                eprintln!("CPU {cpu}: {e}");
            }
        }
    }
    Ok(asked.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_config_parses_and_routes_the_bank_to_lsg_1() {
        for nodes in 2..=8 {
            let dir = tempfile::tempdir().expect("tempdir");
            let text = generate(dir.path(), nodes, 2, false).expect("generate");
            let config = ClusterConfig::parse(&text).expect("parses");
            assert_eq!(config.lsgs().len(), usize::from(nodes));
            for key in [&b"bank/a/00001"[..], b"bank/t/0000000000000001/0000000001"] {
                assert_eq!(config.route(key).map(|r| r.lsg.id.0), Some(1));
            }
            for key in [&b""[..], b"apple", b"bank0", b"zebra", &[255, 255]] {
                assert!(
                    config.route(key).is_some(),
                    "{key:?} routes ({nodes} nodes)"
                );
            }
        }
    }
}
