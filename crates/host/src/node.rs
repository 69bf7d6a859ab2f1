//! What a node service does for the CPUs of its node on one host, reduced to what a takeover
//! needs: every CPU leaves a pid file in the node's run directory, and a CPU that is about to
//! take an LSG over from a local CPU the failure detector declared down ends that CPU first.
//!
//! Why end it. On one host the LSG's ownership is an exclusive `flock` on its `LOCK` file, which
//! the kernel releases the moment the owner's process dies: that is the same-host takeover
//! signal, immediate for a killed or crashed process. A process that is stopped (`SIGSTOP`, a
//! debugger) or hung keeps its lock, and nobody may take the LSG over while it could wake up
//! and write: its volume writes go to the same files through the page cache, and only its trail
//! flushes re-check the owner epoch. So once the detector has heard nothing from a local CPU for
//! the detection time, the node service kills it (`SIGKILL` also ends a stopped process), the
//! kernel releases its lock, and the waiting backup half takes over as after a crash. This is
//! the NonStop rule: a CPU that misses its "I'm alive" is halted, never left to run beside its
//! successor. Raising the epoch without the lock (a stolen epoch) was rejected: the old owner's
//! in-line volume writes are not fenced, so after a wake-up two writers would share the files.
//!
//! The pid file holds the pid and the process's start time (field 22 of `/proc/PID/stat`), and
//! both are checked before the kill, so a pid reused by another process is never killed.
//!
//! Node death. Every live CPU of a node holds a shared `flock` on the node's liveness file
//! ([`hold_liveness`]) for as long as its process lives. A CPU of the backup node watches the
//! home node's file ([`watch_node`]): once it has seen the file held, it waits for it
//! exclusively, and the kernel grants that the moment the last CPU of the node dies. That is
//! the node-takeover signal on one host, as immediate as the LSG lock is for one CPU, and it is
//! never given while any CPU of the node lives, behind a partition or not.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use duplex_transport::EndpointId;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::warn;

/// The liveness file of the node whose run directory is `run_dir`.
pub fn liveness_file(run_dir: &Path) -> PathBuf {
    run_dir.join("node.alive")
}

fn open_liveness(run_dir: &Path) -> std::io::Result<fs::File> {
    fs::create_dir_all(run_dir)?;
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(liveness_file(run_dir))
}

/// A shared lock on this node's liveness file, held until the process ends.
#[derive(Debug)]
pub struct Liveness {
    _lock: Flock<fs::File>,
}

/// Takes this CPU's shared lock on its node's liveness file (waiting while a watcher holds it
/// exclusively for an instant).
pub fn hold_liveness(run_dir: &Path) -> std::io::Result<Liveness> {
    let file = open_liveness(run_dir)?;
    let lock = Flock::lock(file, FlockArg::LockShared).map_err(|(_, e)| {
        std::io::Error::other(format!(
            "locking {} shared: {e}",
            liveness_file(run_dir).display()
        ))
    })?;
    Ok(Liveness { _lock: lock })
}

/// How often a watcher looks whether a dead (or not yet started) node's file is held again.
const LIVENESS_POLL: Duration = Duration::from_millis(20);

/// Watches node `node`'s liveness file in `run_dir` on a thread of its own and calls `on_dead`
/// each time every CPU of the node has died (see the module docs). The first call comes only
/// after the file was seen held, so a node that has not started is not reported dead.
pub fn watch_node(
    node: u16,
    run_dir: PathBuf,
    on_dead: impl Fn(u16) + Send + 'static,
) -> std::io::Result<()> {
    let file = open_liveness(&run_dir)?;
    std::thread::Builder::new()
        .name(format!("watch-node-{node}"))
        .spawn(move || {
            let mut file = file;
            loop {
                // Wait until some CPU of the node holds the file.
                loop {
                    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                        Ok(lock) => match lock.unlock() {
                            Ok(f) => file = f,
                            Err((_, e)) => {
                                warn!(node, error = %e, "liveness watch ended");
                                return;
                            }
                        },
                        Err((f, Errno::EWOULDBLOCK)) => {
                            file = f;
                            break;
                        }
                        Err((_, e)) => {
                            warn!(node, error = %e, "liveness watch ended");
                            return;
                        }
                    }
                    std::thread::sleep(LIVENESS_POLL);
                }
                // The kernel grants this once the last holder died.
                match Flock::lock(file, FlockArg::LockExclusive) {
                    Ok(lock) => match lock.unlock() {
                        Ok(f) => file = f,
                        Err((_, e)) => {
                            warn!(node, error = %e, "liveness watch ended");
                            return;
                        }
                    },
                    Err((_, e)) => {
                        warn!(node, error = %e, "liveness watch ended");
                        return;
                    }
                }
                on_dead(node);
            }
        })?;
    Ok(())
}

fn pid_file(run_dir: &Path, cpu: EndpointId) -> PathBuf {
    run_dir.join(format!("cpu-{}.{}.pid", cpu.node, cpu.cpu))
}

/// The start time of process `pid` in clock ticks since boot, from `/proc/PID/stat`, unless it
/// is a zombie (dead, its locks released, waiting to be reaped).
fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields follow the last ')'.
    let after = stat.rsplit_once(')')?.1;
    let mut fields = after.split_whitespace();
    // Field 3 (state) is the first after the name; the start time is field 22.
    if fields.next()? == "Z" {
        return None;
    }
    fields.nth(22 - 4)?.parse().ok()
}

/// Writes this process's pid file for `cpu` (under a temporary name, then renamed).
pub fn write_pid_file(run_dir: &Path, cpu: EndpointId) -> std::io::Result<()> {
    fs::create_dir_all(run_dir)?;
    let pid = std::process::id();
    let start = i32::try_from(pid)
        .ok()
        .and_then(start_time)
        .ok_or_else(|| std::io::Error::other(format!("no start time for process {pid}")))?;
    let path = pid_file(run_dir, cpu);
    let tmp = path.with_extension(format!("pid.{pid}.tmp"));
    {
        let mut f = fs::File::create(&tmp)?;
        writeln!(f, "{pid} {start}")?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &path)
}

/// What [`end_local_cpu`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The process in `cpu`'s pid file was killed.
    Killed { pid: i32 },
    /// No live process matches the pid file (none, already gone, or the pid was reused).
    NotRunning,
}

/// Ends the process running local CPU `cpu` (see the module docs), if the pid file names a live
/// one. Never kills this process.
pub fn end_local_cpu(run_dir: &Path, cpu: EndpointId) -> Result<Ended, String> {
    signal_local_cpu(run_dir, cpu, Signal::SIGKILL)
}

/// Whether the pid file of local CPU `cpu` names a live process: the pid's start time matches
/// (not a reused pid) and it is not a zombie.
pub fn local_cpu_running(run_dir: &Path, cpu: EndpointId) -> bool {
    matches!(live_pid(run_dir, cpu), Ok(Some(_)))
}

/// Sends `signal` to the process running local CPU `cpu`, with the checks of
/// [`end_local_cpu`] (`Ended::Killed` then means "signalled"). `duplex local down` asks with
/// SIGTERM first, which makes the CPU flush its trails and exit.
pub fn signal_local_cpu(run_dir: &Path, cpu: EndpointId, signal: Signal) -> Result<Ended, String> {
    let Some(pid) = live_pid(run_dir, cpu)? else {
        return Ok(Ended::NotRunning);
    };
    match kill(Pid::from_raw(pid), signal) {
        Ok(()) => Ok(Ended::Killed { pid }),
        Err(nix::errno::Errno::ESRCH) => Ok(Ended::NotRunning),
        Err(e) => Err(format!("sending {signal} to CPU {cpu} (pid {pid}): {e}")),
    }
}

/// The live process named by `cpu`'s pid file, never this process (see the module docs).
fn live_pid(run_dir: &Path, cpu: EndpointId) -> Result<Option<i32>, String> {
    let path = pid_file(run_dir, cpu);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    let mut words = text.split_whitespace();
    let (Some(Ok(pid)), Some(Ok(start))) = (
        words.next().map(str::parse::<i32>),
        words.next().map(str::parse::<u64>),
    ) else {
        return Err(format!(
            "{}: expected \"PID START_TIME\", found {text:?}",
            path.display()
        ));
    };
    if i64::from(pid) == i64::from(std::process::id()) || pid <= 1 {
        return Ok(None);
    }
    Ok((start_time(pid) == Some(start)).then_some(pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_reported_dead_only_after_it_was_alive_and_every_holder_let_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, rx) = std::sync::mpsc::channel();
        watch_node(3, dir.path().to_path_buf(), move |n| {
            let _ = tx.send(n);
        })
        .expect("watch");
        // Not started: never reported.
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        let first = hold_liveness(dir.path()).expect("hold");
        let second = hold_liveness(dir.path()).expect("hold");
        // Let the watcher see the file held and wait on it.
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        drop(first);
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "one CPU still lives"
        );
        drop(second);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(3));
    }

    #[test]
    fn a_pid_file_names_this_process_and_is_never_used_to_kill_it() {
        let dir = std::env::temp_dir().join(format!("duplex-host-node-{}", std::process::id()));
        let cpu = EndpointId::new(4, 1);
        write_pid_file(&dir, cpu).expect("pid file");
        let text = fs::read_to_string(pid_file(&dir, cpu)).expect("read");
        assert!(text.starts_with(&format!("{} ", std::process::id())));
        assert_eq!(end_local_cpu(&dir, cpu), Ok(Ended::NotRunning));
        assert_eq!(
            end_local_cpu(&dir, EndpointId::new(4, 2)),
            Ok(Ended::NotRunning)
        );
        fs::write(pid_file(&dir, cpu), "garbage").expect("write");
        assert!(end_local_cpu(&dir, cpu).is_err());
        // A live pid whose start time does not match is another process: not killed.
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = other.id();
        fs::write(pid_file(&dir, cpu), format!("{pid} 12345\n")).expect("write");
        assert_eq!(end_local_cpu(&dir, cpu), Ok(Ended::NotRunning));
        assert!(
            other.try_wait().expect("try_wait").is_none(),
            "the other process lives"
        );
        // With its real start time it is killed.
        let start = start_time(i32::try_from(pid).expect("pid")).expect("start time");
        fs::write(pid_file(&dir, cpu), format!("{pid} {start}\n")).expect("write");
        assert!(local_cpu_running(&dir, cpu));
        assert!(matches!(end_local_cpu(&dir, cpu), Ok(Ended::Killed { .. })));
        // Killed and not yet reaped: a zombie is not running, and is not signalled again.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while local_cpu_running(&dir, cpu) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            !local_cpu_running(&dir, cpu),
            "a killed process is not running"
        );
        assert_eq!(end_local_cpu(&dir, cpu), Ok(Ended::NotRunning));
        let _ = other.wait();
        let _ = fs::remove_dir_all(&dir);
    }
}
