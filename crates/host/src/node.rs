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

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use duplex_transport::EndpointId;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn pid_file(run_dir: &Path, cpu: EndpointId) -> PathBuf {
    run_dir.join(format!("cpu-{}.{}.pid", cpu.node, cpu.cpu))
}

/// The start time of process `pid` in clock ticks since boot, from `/proc/PID/stat`.
fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields follow the last ')'.
    let after = stat.rsplit_once(')')?.1;
    // Field 3 (state) is the first after the name; the start time is field 22.
    after.split_whitespace().nth(22 - 3)?.parse().ok()
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
    let path = pid_file(run_dir, cpu);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Ended::NotRunning),
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
        return Ok(Ended::NotRunning);
    }
    if start_time(pid) != Some(start) {
        return Ok(Ended::NotRunning);
    }
    match kill(Pid::from_raw(pid), Signal::SIGKILL) {
        Ok(()) => Ok(Ended::Killed { pid }),
        Err(nix::errno::Errno::ESRCH) => Ok(Ended::NotRunning),
        Err(e) => Err(format!("killing CPU {cpu} (pid {pid}): {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // A pid whose start time does not match is another process: not killed.
        fs::write(pid_file(&dir, cpu), "1 12345\n").expect("write");
        assert_eq!(end_local_cpu(&dir, cpu), Ok(Ended::NotRunning));
        let _ = fs::remove_dir_all(&dir);
    }
}
