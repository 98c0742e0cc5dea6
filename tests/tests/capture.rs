//! Change capture through a real mount: which operations produce records, how many,
//! and the policy resolved for each path.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use twinfs_fs::{AttrChange, ChangeKind, Role};
use twinfs_replicator::capture::{Capture, Record, RecordSink};
use twinfs_replicator::policy::{Policy, PolicySet, Priority, Rule, SyncMode};
use twinfs_tests::inproc::{MountedDir, Recorder};

#[derive(Clone, Default)]
struct Records(Arc<Mutex<Vec<Record>>>);

impl RecordSink for Records {
    fn push(&self, record: Record) {
        self.0.lock().expect("records").push(record);
    }
}

impl Records {
    fn take(&self) -> Vec<Record> {
        std::mem::take(&mut *self.0.lock().expect("records"))
    }

    /// The (path, kind) pairs, for compact assertions.
    fn kinds(&self) -> Vec<(PathBuf, ChangeKind)> {
        self.take()
            .into_iter()
            .map(|r| (r.change.path, r.change.kind))
            .collect()
    }
}

fn cmm_policies() -> PolicySet {
    let rule = |pattern: &str, sync, priority| {
        Rule::new(
            pattern,
            Policy {
                sync,
                priority: Priority::new(priority).expect("priority"),
                durability: None,
                ..Policy::DEFAULT
            },
        )
        .expect("rule")
    };
    PolicySet::new(vec![
        rule("*.sif", SyncMode::Once, 1),
        rule("**/*.bin", SyncMode::Once, 1),
        rule(
            "hosts",
            SyncMode::Interval(std::time::Duration::from_secs(3600)),
            2,
        ),
        rule("local/**", SyncMode::Never, 2),
    ])
}

fn mount(passthrough: bool, fill: impl FnOnce(&Path)) -> (MountedDir, Records) {
    let records = Records::default();
    let capture = Capture::new("test", cmm_policies(), Some(Box::new(records.clone())));
    let m = MountedDir::with_sink(
        passthrough,
        Arc::new(capture),
        Arc::new(Recorder::default()),
        fill,
    );
    (m, records)
}

fn p(s: &str) -> PathBuf {
    PathBuf::from(s)
}

fn touch_times(path: &Path, secs: i64) {
    let c = CString::new(path.as_os_str().as_bytes()).expect("no NUL");
    let t = libc::timespec {
        tv_sec: secs,
        tv_nsec: 5,
    };
    // SAFETY: valid string and two timespecs.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [t, t].as_ptr(), 0) };
    assert_eq!(r, 0, "utimensat {}", path.display());
}

#[test]
fn one_record_per_close_after_write_not_per_write() {
    let _serial = twinfs_tests::serial();
    for passthrough in [true, false] {
        let (m, records) = mount(passthrough, |d| {
            fs::write(d.join("cfg"), b"old").expect("fill")
        });
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(m.path.join("cfg"))
            .expect("open");
        for i in 0..100 {
            f.write_all(format!("line {i}\n").as_bytes())
                .expect("write");
            f.flush().expect("flush");
        }
        let early = records.take();
        assert!(
            early.is_empty(),
            "no record before the close (passthrough {passthrough}): {early:?}"
        );
        drop(f);
        assert_eq!(
            records.kinds(),
            vec![(p("cfg"), ChangeKind::Write)],
            "passthrough {passthrough}"
        );

        // Opening for reading and closing is not a change.
        fs::read(m.path.join("cfg")).expect("read");
        assert!(records.take().is_empty());

        // fsync is a change; a close after it records only what was written since.
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(m.path.join("cfg"))
            .expect("open");
        f.write_all(b"before fsync\n").expect("write");
        f.sync_all().expect("fsync");
        assert_eq!(
            records.kinds(),
            vec![(p("cfg"), ChangeKind::Write)],
            "passthrough {passthrough}"
        );
        // A chmod changes the ctime, not the content: the close records nothing more.
        fs::set_permissions(m.path.join("cfg"), fs::Permissions::from_mode(0o640)).expect("chmod");
        drop(f);
        let mode = ChangeKind::Attr(AttrChange {
            times: false,
            mode: true,
            owner: false,
            size: false,
        });
        assert_eq!(
            records.kinds(),
            vec![(p("cfg"), mode)],
            "nothing written after the fsync (passthrough {passthrough})"
        );

        // A second fd of the same open file (dup) closed without writes since the
        // last record adds nothing.
        let mut a = fs::OpenOptions::new()
            .append(true)
            .open(m.path.join("cfg"))
            .expect("open");
        let b = a.try_clone().expect("dup");
        a.write_all(b"via a\n").expect("write");
        drop(a);
        assert_eq!(records.kinds(), vec![(p("cfg"), ChangeKind::Write)]);
        drop(b);
        assert!(records.take().is_empty(), "no write after the first close");
        // The kernel releases the open file after the last close, asynchronously; a
        // release that came during the next step would record that step's write a
        // third time (it changed the file since this one's record).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while m.volume().open_handles() > 0 {
            assert!(std::time::Instant::now() < deadline, "never released");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(records.take().is_empty(), "no write at the release");

        // Two fds of one open file, written through both: each close after a write counts.
        let mut a = fs::OpenOptions::new()
            .append(true)
            .open(m.path.join("cfg"))
            .expect("open");
        let mut b = a.try_clone().expect("dup");
        a.write_all(b"via a\n").expect("write");
        drop(a);
        b.write_all(b"via b\n").expect("write");
        drop(b);
        assert_eq!(
            records.kinds(),
            vec![(p("cfg"), ChangeKind::Write), (p("cfg"), ChangeKind::Write)]
        );
    }
}

/// A hard-linked file whose only name the kernel knew goes away while a process
/// holds it open: its other name, looked up then, is the same inode (one page cache,
/// one `st_ino`), and a write through the open handle is recorded under that name.
#[test]
fn a_write_through_a_handle_whose_name_went_is_recorded_under_its_other_name() {
    use std::os::unix::fs::MetadataExt;
    let _serial = twinfs_tests::serial();
    for passthrough in [true, false] {
        let (m, records) = mount(passthrough, |d| {
            fs::write(d.join("a"), b"one\n").expect("fill");
            fs::hard_link(d.join("a"), d.join("b")).expect("fill");
        });
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(m.path.join("a"))
            .expect("open");
        fs::remove_file(m.path.join("a")).expect("unlink");
        let b = fs::metadata(m.path.join("b")).expect("stat b");
        assert_eq!(
            b.ino(),
            f.metadata().expect("fstat").ino(),
            "one file, two inodes (passthrough {passthrough})"
        );
        records.take();
        f.write_all(b"two\n").expect("write");
        drop(f);
        assert_eq!(
            records.kinds(),
            vec![(p("b"), ChangeKind::Write)],
            "passthrough {passthrough}"
        );
        assert_eq!(fs::read(m.path.join("b")).expect("read"), b"one\ntwo\n");
    }
}

/// A directory renamed behind the mount (as a standby's apply renames one) while the
/// kernel holds a file below it: a write to the file under the directory's new name is
/// recorded under that name (it was recorded under none, so never shipped once this
/// node took over).
#[test]
fn a_write_below_a_directory_renamed_behind_the_mount_is_recorded_under_its_new_path() {
    use std::ffi::OsStr;
    let _serial = twinfs_tests::serial();
    let (m, records) = mount(false, |d| {
        fs::create_dir(d.join("d")).expect("fill");
        fs::write(d.join("d/f"), b"one\n").expect("fill");
    });
    let held = fs::File::open(m.path.join("d/f")).expect("open");
    let root = m.volume().root_fd();
    twinfs_fs::sys::renameat2(root, OsStr::new("d"), root, OsStr::new("e"), 0).expect("rename");
    for name in ["d", "e"] {
        m.mounted().invalidate(Path::new(name)).expect("invalidate");
    }
    records.take();
    fs::write(m.path.join("e/f"), b"two\n").expect("write");
    assert_eq!(records.kinds(), vec![(p("e/f"), ChangeKind::Write)]);
    drop(held);
}

/// A rename that would leave a whiteout (a device no record would tell a standby of)
/// is refused, and changes nothing.
#[test]
fn a_rename_leaving_a_whiteout_is_refused() {
    let _serial = twinfs_tests::serial();
    let (m, records) = mount(false, |d| fs::write(d.join("a"), b"x").expect("fill"));
    let c = |name: &str| CString::new(m.path.join(name).as_os_str().as_bytes()).expect("path");
    let (from, to) = (c("a"), c("b"));
    // SAFETY: valid NUL-terminated paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_WHITEOUT,
        )
    };
    let errno = std::io::Error::last_os_error().raw_os_error();
    assert_eq!((r, errno), (-1, Some(libc::EINVAL)));
    assert!(m.path.join("a").exists() && !m.path.join("b").exists());
    assert_eq!(records.kinds(), vec![]);
}

#[test]
fn touch_of_an_unchanged_file_is_a_change() {
    let _serial = twinfs_tests::serial();
    let (m, records) = mount(true, |d| fs::write(d.join("hosts"), b"h").expect("fill"));
    touch_times(&m.path.join("hosts"), 1_600_000_000);
    let times = ChangeKind::Attr(AttrChange {
        times: true,
        ..AttrChange::default()
    });
    assert_eq!(records.kinds(), vec![(p("hosts"), times.clone())]);
    // The touch command: an unchanged file, current time.
    let out = std::process::Command::new("touch")
        .arg(m.path.join("hosts"))
        .status()
        .expect("touch");
    assert!(out.success());
    // touch(1) opens the file for writing before it sets the times, so its close is
    // recorded too; the time change is what forces the sync.
    let got = records.kinds();
    assert!(got.contains(&(p("hosts"), times)), "{got:?}");
    assert!(got.iter().all(|(path, _)| path == &p("hosts")), "{got:?}");
}

#[test]
fn every_namespace_and_attribute_operation_is_recorded() {
    let _serial = twinfs_tests::serial();
    let (m, records) = mount(true, |_| {});
    let d = &m.path;
    fs::create_dir(d.join("dir")).expect("mkdir");
    fs::File::create(d.join("dir/f")).expect("create");
    std::os::unix::fs::symlink("f", d.join("dir/link")).expect("symlink");
    fs::hard_link(d.join("dir/f"), d.join("dir/hard")).expect("link");
    let fifo = CString::new(d.join("dir/fifo").as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: valid string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    fs::rename(d.join("dir/f"), d.join("dir/g")).expect("rename");
    fs::set_permissions(d.join("dir/g"), fs::Permissions::from_mode(0o600)).expect("chmod");
    std::os::unix::fs::chown(d.join("dir/g"), Some(65534), None).expect("chown");
    fs::OpenOptions::new()
        .write(true)
        .open(d.join("dir/g"))
        .expect("open")
        .set_len(10)
        .expect("ftruncate");
    let name = CString::new("user.k").expect("no NUL");
    let path = CString::new(d.join("dir/g").as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: valid strings and buffer.
    assert_eq!(
        unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), b"v".as_ptr().cast(), 1, 0) },
        0
    );
    // SAFETY: valid strings.
    assert_eq!(
        unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) },
        0
    );
    fs::remove_file(d.join("dir/hard")).expect("unlink");
    fs::remove_file(d.join("dir/link")).expect("unlink");
    fs::remove_file(d.join("dir/fifo")).expect("unlink");
    fs::remove_file(d.join("dir/g")).expect("unlink");
    fs::remove_dir(d.join("dir")).expect("rmdir");

    let attr = |mode, owner, size| {
        ChangeKind::Attr(AttrChange {
            times: false,
            mode,
            owner,
            size,
        })
    };
    let got = records.kinds();
    let want = vec![
        (p("dir"), ChangeKind::Mkdir),
        (p("dir/f"), ChangeKind::Create),
        (p("dir/f"), ChangeKind::Write),
        (p("dir/link"), ChangeKind::Symlink),
        (
            p("dir/hard"),
            ChangeKind::Link {
                existing: p("dir/f"),
            },
        ),
        (p("dir/fifo"), ChangeKind::Mknod),
        (
            p("dir/g"),
            ChangeKind::Rename {
                from: p("dir/f"),
                exchange: false,
            },
        ),
        (p("dir/g"), attr(true, false, false)),
        (p("dir/g"), attr(false, true, false)),
        (p("dir/g"), attr(false, false, true)),
        (p("dir/g"), ChangeKind::Write),
        (p("dir/g"), ChangeKind::Xattr),
        (p("dir/g"), ChangeKind::Xattr),
        (p("dir/hard"), ChangeKind::Unlink),
        (p("dir/link"), ChangeKind::Unlink),
        (p("dir/fifo"), ChangeKind::Unlink),
        (p("dir/g"), ChangeKind::Unlink),
        (p("dir"), ChangeKind::Rmdir),
    ];
    assert_eq!(got, want);
}

#[test]
fn each_record_carries_the_policy_of_its_path() {
    let _serial = twinfs_tests::serial();
    let (m, records) = mount(true, |d| {
        fs::create_dir_all(d.join("fw/img")).expect("fill");
        fs::create_dir(d.join("local")).expect("fill");
    });
    let d = &m.path;
    for name in [
        "a.sif",
        "fw/b.sif",
        "fw/img/c.bin",
        "hosts",
        "fw/hosts",
        "local/x",
        "motd",
    ] {
        fs::write(d.join(name), b"x").expect("write");
    }
    let once1 = Policy {
        sync: SyncMode::Once,
        priority: Priority::MUST_SYNC,
        durability: None,
        ..Policy::DEFAULT
    };
    let interval = Policy {
        sync: SyncMode::Interval(std::time::Duration::from_secs(3600)),
        priority: Priority::NORMAL,
        durability: None,
        ..Policy::DEFAULT
    };
    let never = Policy {
        sync: SyncMode::Never,
        priority: Priority::NORMAL,
        durability: None,
        ..Policy::DEFAULT
    };
    let want = [
        ("a.sif", once1),
        ("fw/b.sif", once1),
        ("fw/img/c.bin", once1),
        ("hosts", interval),
        ("fw/hosts", interval),
        ("local/x", never),
        ("motd", Policy::DEFAULT),
    ];
    let got = records.take();
    assert_eq!(
        got.len(),
        want.len() * 2,
        "create + close of each: {got:#?}"
    );
    for (path, policy) in want {
        for r in got.iter().filter(|r| r.change.path == p(path)) {
            assert_eq!(r.policy, policy, "{path}: {:?}", r.change.kind);
        }
    }
}

#[test]
fn a_standby_records_nothing_and_an_active_again_does() {
    let _serial = twinfs_tests::serial();
    let (m, records) = mount(true, |d| fs::write(d.join("f"), b"x").expect("fill"));
    m.volume().set_role(Role::Standby);
    assert!(fs::write(m.path.join("f"), b"y").is_err());
    assert!(fs::create_dir(m.path.join("d")).is_err());
    assert!(records.take().is_empty());
    m.volume().set_role(Role::Active);
    fs::write(m.path.join("f"), b"y").expect("write");
    assert_eq!(records.kinds(), vec![(p("f"), ChangeKind::Write)]);
}

#[test]
fn demotion_refuses_open_handles_and_records_what_they_wrote() {
    let _serial = twinfs_tests::serial();
    // Without passthrough, as a replicated volume is mounted.
    let (m, records) = mount(false, |d| fs::write(d.join("log"), b"").expect("fill"));
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.path.join("log"))
        .expect("open");
    f.write_all(b"line 1\n").expect("write while active");
    assert!(records.take().is_empty(), "no record before a close");
    m.volume().set_role(Role::Standby);
    assert_eq!(
        records.kinds(),
        vec![(p("log"), ChangeKind::Write)],
        "what the open handle wrote is recorded at the switch"
    );
    let err = f
        .write_all(b"line 2\n")
        .expect_err("EROFS after the switch");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    drop(f);
    assert!(
        records.take().is_empty(),
        "nothing new to record at the close"
    );
    assert_eq!(fs::read(m.path.join("log")).expect("read"), b"line 1\n");
}

/// A sink that asks the volume, at the moment each record is made, whether the path
/// is still being written: what the replicator will see when it reads the file.
#[derive(Default)]
struct Probe {
    volume: std::sync::OnceLock<Arc<twinfs_fs::Volume>>,
    seen: Mutex<Vec<(PathBuf, ChangeKind, bool)>>,
}

impl twinfs_fs::ChangeSink for Probe {
    fn record(&self, change: twinfs_fs::Change) {
        let writing = self
            .volume
            .get()
            .is_some_and(|v| v.being_written(&change.path));
        self.seen
            .lock()
            .expect("probe")
            .push((change.path, change.kind, writing));
    }
}

#[test]
fn a_new_file_is_being_written_when_its_creation_is_recorded() {
    let _serial = twinfs_tests::serial();
    let probe = Arc::new(Probe::default());
    let m = MountedDir::with_sink(true, probe.clone(), Arc::new(Recorder::default()), |_| {});
    probe
        .volume
        .set(m.mounted().volume().clone())
        .unwrap_or_else(|_| panic!("set once"));
    let mut f = fs::File::create(m.path.join("new")).expect("create");
    f.write_all(b"content").expect("write");
    drop(f);
    let seen = std::mem::take(&mut *probe.seen.lock().expect("probe"));
    // At the create the file is empty and its writer registered: a replicator must not
    // ship it then. At the close the writer is done: ship.
    assert_eq!(
        seen,
        vec![
            (p("new"), ChangeKind::Create, true),
            (p("new"), ChangeKind::Write, false),
        ]
    );
}

/// A handle opened read-write that writes nothing (a reader of a database, which
/// opens it so) does not make the file "being written": the changes other handles
/// close must ship. One that writes does, until its close.
#[test]
fn a_read_write_handle_that_writes_nothing_holds_up_no_one() {
    let _serial = twinfs_tests::serial();
    let probe = Arc::new(Probe::default());
    // (No passthrough, as a replicated volume is mounted: twinfs sees every write.)
    let m = MountedDir::with_sink(false, probe.clone(), Arc::new(Recorder::default()), |d| {
        fs::write(d.join("db"), "v1").expect("fill");
    });
    probe
        .volume
        .set(m.mounted().volume().clone())
        .unwrap_or_else(|_| panic!("set once"));
    let path = m.path.join("db");
    let idle = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open read-write");
    fs::write(&path, "v2").expect("write through another handle");
    let mut writer = fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("open to append");
    writer.write_all(b" more").expect("append");
    // Still open and written: its content may be half of what it means to write.
    assert!(m.mounted().volume().being_written(Path::new("db")));
    drop(writer);
    drop(idle);
    let seen = std::mem::take(&mut *probe.seen.lock().expect("probe"));
    // The closes of `fs::write`'s handle, the appender's and the idle one's (a close
    // of a handle opened for writing is a change): none waits for the idle handle.
    assert_eq!(seen, vec![(p("db"), ChangeKind::Write, false); 3]);
}

fn erofs<T: std::fmt::Debug>(what: &str, result: std::io::Result<T>) {
    match result {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
        other => panic!("{what}: expected EROFS, got {other:?}"),
    }
}

#[test]
fn a_standby_takes_and_records_writes_of_its_upstream_paths_only_while_open() {
    let _serial = twinfs_tests::serial();
    let upstream: twinfs_fs::UpstreamFilter = Arc::new(|path: &Path| path.starts_with("users"));
    let m = MountedDir::with_upstream(upstream, |d| {
        fs::create_dir(d.join("users")).expect("fill");
        fs::write(d.join("users/a"), b"1").expect("fill");
        fs::write(d.join("conf"), b"c").expect("fill");
    });
    let v = &m.path;
    m.volume().set_role(Role::Standby);
    erofs(
        "before the upstream opens",
        fs::write(v.join("users/a"), b"2"),
    );
    assert!(m.recorder.take().is_empty());

    m.volume().set_upstream_open(true);
    fs::write(v.join("users/a"), b"2").expect("write");
    fs::write(v.join("users/b"), b"b").expect("create");
    fs::create_dir(v.join("users/d")).expect("mkdir");
    std::os::unix::fs::symlink("a", v.join("users/l")).expect("symlink");
    fs::rename(v.join("users/b"), v.join("users/d/b")).expect("rename");
    fs::set_permissions(v.join("users/a"), fs::Permissions::from_mode(0o600)).expect("chmod");
    fs::remove_file(v.join("users/l")).expect("unlink");
    erofs("write", fs::write(v.join("conf"), b"x"));
    erofs("create", fs::write(v.join("new"), b"x"));
    erofs("unlink", fs::remove_file(v.join("conf")));
    erofs("mkdir", fs::create_dir(v.join("top")));
    erofs("rename out", fs::rename(v.join("users/a"), v.join("a")));
    erofs(
        "rename in",
        fs::rename(v.join("conf"), v.join("users/conf")),
    );
    erofs(
        "link in",
        fs::hard_link(v.join("conf"), v.join("users/conf")),
    );
    erofs(
        "chmod",
        fs::set_permissions(v.join("conf"), fs::Permissions::from_mode(0o600)),
    );
    erofs(
        "chmod root",
        fs::set_permissions(v, fs::Permissions::from_mode(0o700)),
    );
    let records = m.recorder.take();
    assert!(
        records.iter().all(|c| c.path.starts_with("users")),
        "{records:#?}"
    );
    for (path, kind) in [
        ("users/a", ChangeKind::Write),
        ("users/b", ChangeKind::Create),
        ("users/d", ChangeKind::Mkdir),
        ("users/l", ChangeKind::Unlink),
    ] {
        assert!(
            records.iter().any(|c| c.path == p(path) && c.kind == kind),
            "{path} {kind:?} in {records:#?}"
        );
    }

    // A file open for writing loses its write access when the upstream closes.
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(v.join("users/a"))
        .expect("open");
    f.write_all(b"3").expect("write while open");
    m.volume().set_upstream_open(false);
    erofs("after the upstream closed", f.write_all(b"4"));
    drop(f);
    assert_eq!(fs::read(v.join("users/a")).expect("read"), b"23");
    m.volume().set_role(Role::Active);
    fs::write(v.join("conf"), b"active again").expect("write on an active");
}

/// The mtime of `name` in the backing directory `dir`.
fn backing_mtime(dir: &fs::File, name: &str) -> (i64, i64) {
    use std::os::fd::AsRawFd;
    let c = CString::new(name).expect("no NUL");
    // SAFETY: an all-zero stat is valid to be written over.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, string and stat buffer.
    let r = unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), &mut st, 0) };
    assert_eq!(r, 0, "fstatat {name}");
    (st.st_mtime, st.st_mtime_nsec)
}

/// Sets the mtime of `name` in the backing directory `dir` (an fd opened before the
/// mount, so this goes around it), leaving the atime alone.
fn set_backing_mtime(dir: &fs::File, name: &str, mtime: (i64, i64)) {
    use std::os::fd::AsRawFd;
    let c = CString::new(name).expect("no NUL");
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    // SAFETY: valid fd, string and two timespecs.
    let r = unsafe { libc::utimensat(dir.as_raw_fd(), c.as_ptr(), times.as_ptr(), 0) };
    assert_eq!(r, 0, "utimensat {name}");
}

/// On a filesystem whose mtime moves once per clock tick (ext4 before Linux 6.13), a
/// same-size rewrite within the tick of the last record leaves size and mtime as they
/// were. Kernels since 6.13 give such a write a fresh time, so the test puts the
/// mtime back behind the mount, as the coarse clock would have left it.
#[test]
fn a_same_size_rewrite_in_the_same_mtime_tick_is_recorded() {
    use std::os::unix::fs::FileExt;
    let _serial = twinfs_tests::serial();
    let mut backing = None;
    let (m, records) = mount(false, |d| {
        fs::write(d.join("cfg"), b"old!").expect("fill");
        backing = Some(fs::File::open(d).expect("open backing dir"));
    });
    let backing = backing.expect("backing dir");
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path.join("cfg"))
        .expect("open");
    f.write_all_at(b"aaaa", 0).expect("write");
    f.sync_all().expect("fsync");
    assert_eq!(records.kinds(), vec![(p("cfg"), ChangeKind::Write)]);
    let mtime = backing_mtime(&backing, "cfg");
    f.write_all_at(b"bbbb", 0).expect("write");
    set_backing_mtime(&backing, "cfg", mtime);
    drop(f);
    assert_eq!(
        records.kinds(),
        vec![(p("cfg"), ChangeKind::Write)],
        "the close after the second write records it"
    );
}

/// Renames and links inside a directory race a rename of the directory: each record
/// must name paths as they are after the records before it, so that a standby
/// replaying them in order finds every source. (The rename of `d/x` read its source path before the
/// rename of `d` was in the table, and its destination after: `d/x` → `e/y`, which
/// no order of the two records can replay.)
#[test]
fn renames_racing_a_rename_of_their_directory_are_recorded_in_a_replayable_order() {
    use std::collections::BTreeSet;
    const ROUNDS: usize = 10_000;
    let m = MountedDir::new(false, |p| {
        fs::create_dir(p.join("d")).expect("d");
        fs::write(p.join("d/x"), "x").expect("x");
    });
    let root = m.path.clone();
    // Renames in it through an fd of the directory, whatever its name is then.
    let dir = fs::File::open(root.join("d")).expect("open d");
    std::thread::scope(|s| {
        let files = s.spawn(|| {
            let rename = |from: &str, to: &str| {
                let (from, to) = (CString::new(from).expect("c"), CString::new(to).expect("c"));
                // SAFETY: valid fd and strings.
                let rc = unsafe {
                    libc::renameat(dir_fd(&dir), from.as_ptr(), dir_fd(&dir), to.as_ptr())
                };
                assert_eq!(rc, 0, "rename in d: {}", std::io::Error::last_os_error());
            };
            let c = |s: &str| CString::new(s).expect("c");
            for _ in 0..ROUNDS {
                rename("x", "y");
                // SAFETY: valid fd and strings.
                let rc = unsafe {
                    libc::linkat(
                        dir_fd(&dir),
                        c("y").as_ptr(),
                        dir_fd(&dir),
                        c("l").as_ptr(),
                        0,
                    )
                };
                assert_eq!(rc, 0, "link in d: {}", std::io::Error::last_os_error());
                // SAFETY: valid fd and string.
                let rc = unsafe { libc::unlinkat(dir_fd(&dir), c("l").as_ptr(), 0) };
                assert_eq!(rc, 0, "unlink in d: {}", std::io::Error::last_os_error());
                rename("y", "x");
            }
        });
        for i in 0..ROUNDS {
            let (from, to) = if i % 2 == 0 { ("d", "e") } else { ("e", "d") };
            fs::rename(root.join(from), root.join(to)).expect("rename the directory");
        }
        files.join().expect("renames in d");
    });
    // Replay the records on the tree as it was.
    let mut tree: BTreeSet<PathBuf> = [p("d"), p("d/x")].into_iter().collect();
    let records = m.recorder.take();
    let renames = records.len();
    for (i, change) in records.into_iter().enumerate() {
        let from = match change.kind {
            ChangeKind::Rename { from, .. } => from,
            ChangeKind::Link { existing } => {
                assert!(
                    tree.contains(&existing),
                    "record {i} of {renames}: link of {} to {}, which is not there: {tree:?}",
                    change.path.display(),
                    existing.display()
                );
                tree.insert(change.path);
                continue;
            }
            ChangeKind::Unlink => {
                assert!(
                    tree.remove(&change.path),
                    "record {i}: unlink of a name not there"
                );
                continue;
            }
            _ => continue,
        };
        assert!(
            tree.contains(&from),
            "record {i} of {renames}: rename of {} to {}, which is not there after the records before it: {tree:?}",
            from.display(),
            change.path.display()
        );
        let moved: Vec<PathBuf> = tree
            .iter()
            .filter(|q| q.starts_with(&from))
            .cloned()
            .collect();
        for q in moved {
            tree.remove(&q);
            let rest = q.strip_prefix(&from).expect("below");
            tree.insert(if rest.as_os_str().is_empty() {
                change.path.clone()
            } else {
                change.path.join(rest)
            });
        }
    }
    let on_disk: BTreeSet<PathBuf> = ["d", "e"]
        .iter()
        .filter(|n| m.path.join(n).exists())
        .flat_map(|n| {
            let dir = m.path.join(n);
            let mut v = vec![p(n)];
            for e in fs::read_dir(&dir).expect("read_dir").flatten() {
                v.push(p(n).join(e.file_name()));
            }
            v
        })
        .collect();
    assert_eq!(tree, on_disk);
}

fn dir_fd(f: &fs::File) -> i32 {
    use std::os::fd::AsRawFd;
    f.as_raw_fd()
}
