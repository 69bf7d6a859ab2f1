//! A real full disk and a real read-only file system, on a small tmpfs mounted for the test, and
//! a real power loss on ext4 in a loop-mounted image. Mounting needs root (CI runs as root);
//! elsewhere each test says so and checks nothing.

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
    // Waiting: a process another test thread is spawning holds a copy of the lock's descriptor
    // from its fork until its exec.
    let lsg = LogStorageGroup::open(&dir, config(), OpenMode::WriteWaiting).expect("reopen");
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
    let mut lsg =
        LogStorageGroup::open(&dir, config(), OpenMode::ReadOnly).expect("read-only open");
    lsg.catch_up().expect("a catch-up reads only");
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

/// An ext4 file system in an image file, loop-mounted for one test. A power loss is simulated by
/// copying the image: the copy holds what reached the "disk" (the loop device), not the dirty
/// pages still in the page cache of the mounted file system.
struct Ext4Image {
    dir: tempfile::TempDir,
    mounts: Vec<PathBuf>,
}

impl Ext4Image {
    fn new(size: &str) -> Ext4Image {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img");
        let ok = |args: &[&str]| {
            let status = Command::new(args[0])
                .args(&args[1..])
                .status()
                .expect("run");
            assert!(status.success(), "{args:?} failed");
        };
        ok(&["truncate", "-s", size, &image.to_string_lossy()]);
        ok(&["mkfs.ext4", "-q", "-F", &image.to_string_lossy()]);
        Ext4Image {
            dir,
            mounts: Vec::new(),
        }
    }

    /// Mounts `image` (a file in this image's directory) and returns where.
    fn mount(&mut self, image: &str) -> PathBuf {
        let at = self.dir.path().join(format!("{image}.mnt"));
        std::fs::create_dir(&at).expect("mkdir");
        // A long journal commit interval: only explicit syncs move data to the disk.
        let image = self.dir.path().join(image);
        let status = Command::new("mount")
            .args(["-o", "loop,commit=300", "-t", "ext4"])
            .arg(&image)
            .arg(&at)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount {} failed", image.display());
        self.mounts.push(at.clone());
        at
    }

    /// The disk as a power loss now would leave it, as a new image file.
    fn power_loss_copy(&self, name: &str) {
        std::fs::copy(self.dir.path().join("disk.img"), self.dir.path().join(name))
            .expect("copy image");
    }
}

impl Drop for Ext4Image {
    fn drop(&mut self) {
        for at in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg(at).status();
        }
    }
}

fn has_loop_and_ext4() -> bool {
    is_root()
        && Path::new("/dev/loop-control").exists()
        && Command::new("mkfs.ext4")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
}

/// The sequence that made LSGs unopenable: an owner leaves volume records only in the page cache
/// (closed without a volume flush; a `kill -9` leaves the same pages behind), the next owner
/// opens, writes on and flushes a checkpoint, and the power fails before the first owner's pages
/// reached the disk. Opening for writing must make what it recovered durable first.
#[test]
fn a_power_loss_after_a_new_owner_wrote_on_loses_nothing_on_ext4() {
    if !has_loop_and_ext4() {
        println!("not root or no loop devices / mkfs.ext4: real power-loss test not run");
        return;
    }
    let mut image = Ext4Image::new("64M");
    let mnt = image.mount("disk.img");
    let dir = mnt.join("lsg");
    let config = LsgConfig {
        volume_segment_bytes: 64 << 10,
        ..config()
    };
    let value = |i: u64| vec![(i % 251) as u8; 1000 + (i % 7) as usize];
    let key = |i: u64| format!("key-{i:05}").into_bytes();
    let put = |lsg: &LogStorageGroup, i: u64| {
        let lsn = lsg
            .audit()
            .append_durable(RecordType::Update, RecordFlags::NONE, &key(i))
            .expect("append");
        lsg.volume("v")
            .expect("volume")
            .put(&key(i), &value(i), lsn)
            .expect("put");
    };
    {
        let mut first = LogStorageGroup::create(&dir, LsgId(9), config).expect("create");
        first.create_volume("v").expect("volume");
        for i in 0..50 {
            put(&first, i);
        }
        first
            .volume("v")
            .expect("volume")
            .flush(Lsn(50))
            .expect("checkpoint");
        // Three more segments' worth, in the page cache only.
        for i in 50..250 {
            put(&first, i);
        }
    }
    let second = LogStorageGroup::open(&dir, config, OpenMode::Write).expect("second owner");
    for i in 250..260 {
        put(&second, i);
    }
    let last = Lsn(second.audit().next_lsn().0 - 1);
    second
        .volume("v")
        .expect("volume")
        .flush(last)
        .expect("checkpoint");
    image.power_loss_copy("after.img");
    drop(second);

    let after = image.mount("after.img");
    let lsg = LogStorageGroup::open(after.join("lsg"), config, OpenMode::Write)
        .expect("the LSG opens after the power loss");
    let v = lsg.volume("v").expect("volume");
    for i in 0..260 {
        let got = v.get(&key(i)).expect("get");
        assert_eq!(got.map(|r| r.value), Some(value(i)), "key {i} lost");
    }
}

/// `duplex lsg create` on a file system too small for it: the failure leaves no LSG behind, so
/// the retry after space is freed creates one (it used to say the LSG already existed, and the
/// LSG it named had no audit trail).
#[test]
fn a_creation_that_fills_the_disk_can_be_retried_once_space_is_freed() {
    if !is_root() {
        println!("not root: cannot mount a small tmpfs, real creation test not run");
        return;
    }
    let fs = Tmpfs::mount("1m");
    let dir = fs.path.join("lsg");
    let e = LogStorageGroup::create(&dir, LsgId(2), config()).expect_err("1 MiB is too small");
    assert!(matches!(e, LsgError::DiskFull { .. }), "{e}");
    let missing = LogStorageGroup::open(&dir, config(), OpenMode::ReadOnly).expect_err("no LSG");
    assert!(matches!(missing, LsgError::Missing { .. }), "{missing}");
    fs.remount("size=16m");
    let lsg = LogStorageGroup::create(&dir, LsgId(2), config()).expect("retry");
    lsg.audit()
        .append_durable(RecordType::Commit, RecordFlags::NONE, b"first")
        .expect("append");
}
