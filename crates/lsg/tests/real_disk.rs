//! A real full disk and a real read-only file system, on a small tmpfs mounted for the test.
//! Mounting needs root (CI runs as root); elsewhere the test says so and checks nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use duplex_lsg::{
    LogStorageGroup, LsgConfig, LsgError, LsgId, Lsn, OpenMode, RecordFlags, RecordType,
};

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A tmpfs mounted for one test, unmounted however the test ends.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).expect("mkdir");
        run(
            &[
                "mount",
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
            ],
            &path,
        );
        Tmpfs { path, _dir: dir }
    }

    fn remount(&self, options: &str) {
        run(&["mount", "-o", &format!("remount,{options}")], &self.path);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

fn run(args: &[&str], path: &Path) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .arg(path)
        .status()
        .expect("run mount");
    assert!(status.success(), "{args:?} {} failed", path.display());
}

fn config() -> LsgConfig {
    LsgConfig {
        audit_segment_bytes: 2 << 20,
        volume_segment_bytes: 1 << 20,
        max_batch_bytes: 256 << 10,
        max_record_bytes: 16 << 10,
        max_key_bytes: 64,
        max_value_bytes: 4 << 10,
    }
}

#[test]
fn a_full_disk_is_a_clear_retriable_error_and_loses_nothing() {
    if !is_root() {
        println!("not root: cannot mount a small tmpfs, real disk-full test not run");
        return;
    }
    let fs = Tmpfs::mount("7m");
    let dir = fs.path.join("lsg");
    let lsg = LogStorageGroup::create(&dir, LsgId(1), config()).expect("create");
    let payload = vec![0x42u8; 4000];
    let mut acked = Lsn(0);
    let mut failure = None;
    for _ in 0..10_000 {
        let lsn = lsg
            .audit()
            .append(RecordType::Update, RecordFlags::NONE, &payload)
            .expect("append to memory");
        match lsg.audit().wait_durable(lsn) {
            Ok(()) => acked = lsn,
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let failure = failure.expect("a 7 MiB file system must fill up");
    assert!(matches!(failure, LsgError::DiskFull { .. }), "{failure}");
    assert!(failure.to_string().contains("disk full"), "{failure}");
    // The data already there stays readable.
    let readable = lsg.audit().reader(Lsn(1)).expect("reader").count() as u64;
    assert_eq!(readable, acked.0);
    // Space returns: the held batch is written, nothing was lost or acknowledged early.
    fs.remount("size=32m");
    let next = lsg.audit().next_lsn();
    lsg.audit()
        .wait_durable(Lsn(next.0 - 1))
        .expect("flush after space returns");
    drop(lsg);
    let lsg = LogStorageGroup::open(&dir, config(), OpenMode::Write).expect("reopen");
    assert_eq!(lsg.audit().next_lsn(), next);
    for r in lsg.audit().reader(Lsn(1)).expect("reader") {
        assert_eq!(r.expect("record").payload, payload);
    }
}

#[test]
fn a_read_only_file_system_refuses_writers_and_serves_readers() {
    if !is_root() {
        println!("not root: cannot mount a small tmpfs, real read-only test not run");
        return;
    }
    let fs = Tmpfs::mount("16m");
    let dir = fs.path.join("lsg");
    {
        let mut lsg = LogStorageGroup::create(&dir, LsgId(3), config()).expect("create");
        lsg.audit()
            .append_durable(RecordType::Commit, RecordFlags::NONE, b"kept")
            .expect("append");
        let v = lsg.create_volume("v").expect("volume");
        v.put(b"k", b"value", Lsn(1))
            .expect("put (LSN 1 is the commit record above)");
        v.flush(Lsn(1)).expect("flush");
    }
    fs.remount("ro");
    let e = LogStorageGroup::open(&dir, config(), OpenMode::Write).expect_err("read-only");
    assert!(matches!(e, LsgError::ReadOnly { .. }), "{e}");
    assert!(e.to_string().contains("read-only"), "{e}");
    let lsg = LogStorageGroup::open(&dir, config(), OpenMode::ReadOnly).expect("read-only open");
    let records: Vec<_> = lsg
        .audit()
        .reader(Lsn(1))
        .expect("reader")
        .map(|r| r.expect("record").payload)
        .collect();
    assert_eq!(records, vec![b"kept".to_vec()]);
    let v = lsg.volume("v").expect("volume");
    assert_eq!(v.get(b"k").expect("get").expect("present").value, b"value");
}
