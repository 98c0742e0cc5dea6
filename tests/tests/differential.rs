//! Differential test: the same random sequence of file operations on a twinfs mount and
//! on a plain directory gives the same result or errno for every operation, and leaves
//! the same tree, both as seen through the mount and in the directory underneath it.
//!
//! One mount per test; each proptest case works in a fresh `case-N` subdirectory on
//! both sides, so cases (and shrinking) are independent. `PROPTEST_CASES` overrides the
//! number of cases.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::hash::{DefaultHasher, Hasher};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use twinfs_tests::inproc::MountedDir;

/// A small name space, so that operations collide: EEXIST, ENOENT, ENOTEMPTY, EISDIR
/// and ENOTDIR all come up often.
const PATHS: &[&str] = &["a", "b", "d", "d/a", "d/b", "d/e", "d/e/c"];
/// Symlink targets. None leaves the case directory (no `..`), so operations that
/// follow a link stay inside it; the absolute one dangles.
const TARGETS: &[&str] = &[
    "a",
    "b",
    "d",
    "d/a",
    "e/c",
    "c",
    ".",
    "/nonexistent-twinfs/x",
];
const XATTRS: &[&str] = &["user.x", "user.y", "user.a.longer.name"];
const MODES: &[u32] = &[
    0o644, 0o600, 0o755, 0o000, 0o444, 0o4755, 0o2755, 0o6777, 0o1777, 0o2644,
];
const OWNERS: &[u32] = &[0, 65534, u32::MAX];
/// Explicit timestamps (seconds): before 1970, the epoch, past dates and one far in the
/// future, all far from "now" so that an implicit update is told apart from them.
const SECONDS: &[i64] = &[
    -1,
    0,
    1_000_000_000,
    1_600_000_000,
    1_234_567_890,
    4_000_000_000,
];
/// Open file slots an operation sequence can keep files open in across operations.
const SLOTS: usize = 3;
const BLOCK: u64 = 4096;

#[derive(Clone, Copy, Debug)]
enum Time {
    Omit,
    Now,
    At(i64, i64),
}

#[derive(Clone, Copy, Debug)]
enum RenameKind {
    Plain,
    NoReplace,
    Exchange,
}

#[derive(Clone, Copy, Debug)]
enum Access {
    Read,
    Write,
    ReadWrite,
}

#[derive(Clone, Debug)]
enum Op {
    /// `open(O_CREAT|O_WRONLY[|O_EXCL][|O_TRUNC], mode)` and close.
    Create {
        path: &'static str,
        excl: bool,
        trunc: bool,
        mode: u32,
    },
    /// Opens a file into a slot (closing what was there).
    Open {
        slot: usize,
        path: &'static str,
        access: Access,
        creat: bool,
        trunc: bool,
        append: bool,
        mode: u32,
    },
    Close {
        slot: usize,
    },
    /// Open, `pwrite`, close.
    Write {
        path: &'static str,
        offset: u64,
        len: usize,
        seed: u8,
    },
    /// `pwrite` on an open slot (appends if it was opened with `O_APPEND`).
    FdWrite {
        slot: usize,
        offset: u64,
        len: usize,
        seed: u8,
    },
    /// Open, `pread`, close.
    Read {
        path: &'static str,
        offset: u64,
        len: usize,
    },
    FdRead {
        slot: usize,
        offset: u64,
        len: usize,
    },
    Truncate {
        path: &'static str,
        len: u64,
    },
    FdTruncate {
        slot: usize,
        len: u64,
    },
    FdStat {
        slot: usize,
    },
    FdSync {
        slot: usize,
        data_only: bool,
    },
    Stat {
        path: &'static str,
        follow: bool,
    },
    Rename {
        from: &'static str,
        to: &'static str,
        kind: RenameKind,
    },
    Unlink {
        path: &'static str,
    },
    Mkdir {
        path: &'static str,
        mode: u32,
    },
    Rmdir {
        path: &'static str,
    },
    Mkfifo {
        path: &'static str,
    },
    Symlink {
        target: &'static str,
        path: &'static str,
    },
    Readlink {
        path: &'static str,
    },
    Link {
        from: &'static str,
        to: &'static str,
    },
    Chmod {
        path: &'static str,
        mode: u32,
    },
    Chown {
        path: &'static str,
        uid: u32,
        gid: u32,
        follow: bool,
    },
    Utimens {
        path: &'static str,
        atime: Time,
        mtime: Time,
        follow: bool,
    },
    SetXattr {
        path: &'static str,
        name: &'static str,
        len: usize,
        seed: u8,
        flags: i32,
        follow: bool,
    },
    GetXattr {
        path: &'static str,
        name: &'static str,
        follow: bool,
    },
    ListXattr {
        path: &'static str,
        follow: bool,
    },
    RemoveXattr {
        path: &'static str,
        name: &'static str,
        follow: bool,
    },
    Readdir {
        path: &'static str,
    },
}

fn path() -> impl Strategy<Value = &'static str> {
    select(PATHS)
}

fn slot() -> impl Strategy<Value = usize> {
    0..SLOTS
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0..10_000u64,
        2 => Just(0u64),
        1 => (0..3u64).prop_map(|b| b * BLOCK),
        // Past 4 GiB: a sparse file whose size needs more than 32 bits.
        1 => (0..5000u64).prop_map(|o| (5 << 30) + o),
    ]
}

fn length() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0..12_000u64,
        1 => Just(0u64),
        1 => Just((4 << 30) + 7),
    ]
}

fn data_len() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 0..300usize, 2 => 0..9000usize]
}

fn time() -> impl Strategy<Value = Time> {
    prop_oneof![
        1 => Just(Time::Omit),
        1 => Just(Time::Now),
        // Before 1970 only whole seconds: fuser 0.18 turns (-1 s, +1 ns) into
        // -1.000000001 s (see posix.rs, `times_before_1970`).
        4 => (select(SECONDS), 0..1_000_000_000i64)
            .prop_map(|(s, n)| Time::At(s, if s < 0 { 0 } else { n })),
    ]
}

fn rename_kind() -> impl Strategy<Value = RenameKind> {
    prop_oneof![
        3 => Just(RenameKind::Plain),
        1 => Just(RenameKind::NoReplace),
        1 => Just(RenameKind::Exchange),
    ]
}

fn access() -> impl Strategy<Value = Access> {
    prop_oneof![
        Just(Access::Read),
        Just(Access::Write),
        Just(Access::ReadWrite)
    ]
}

fn xattr_flags() -> impl Strategy<Value = i32> {
    prop_oneof![
        2 => Just(0),
        1 => Just(libc::XATTR_CREATE),
        1 => Just(libc::XATTR_REPLACE),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (path(), any::<bool>(), any::<bool>(), select(MODES))
            .prop_map(|(path, excl, trunc, mode)| Op::Create { path, excl, trunc, mode }),
        6 => (slot(), path(), access(), any::<bool>(), any::<bool>(), any::<bool>(), select(MODES))
            .prop_map(|(slot, path, access, creat, trunc, append, mode)| Op::Open {
                slot, path, access, creat, trunc: trunc && creat, append, mode,
            }),
        1 => slot().prop_map(|slot| Op::Close { slot }),
        4 => (path(), offset(), data_len(), any::<u8>())
            .prop_map(|(path, offset, len, seed)| Op::Write { path, offset, len, seed }),
        4 => (slot(), offset(), data_len(), any::<u8>())
            .prop_map(|(slot, offset, len, seed)| Op::FdWrite { slot, offset, len, seed }),
        2 => (path(), offset(), 0..10_000usize)
            .prop_map(|(path, offset, len)| Op::Read { path, offset, len }),
        2 => (slot(), offset(), 0..10_000usize)
            .prop_map(|(slot, offset, len)| Op::FdRead { slot, offset, len }),
        2 => (path(), length()).prop_map(|(path, len)| Op::Truncate { path, len }),
        2 => (slot(), length()).prop_map(|(slot, len)| Op::FdTruncate { slot, len }),
        2 => slot().prop_map(|slot| Op::FdStat { slot }),
        1 => (slot(), any::<bool>()).prop_map(|(slot, data_only)| Op::FdSync { slot, data_only }),
        2 => (path(), any::<bool>()).prop_map(|(path, follow)| Op::Stat { path, follow }),
        4 => (path(), path(), rename_kind()).prop_map(|(from, to, kind)| Op::Rename { from, to, kind }),
        2 => path().prop_map(|path| Op::Unlink { path }),
        3 => (path(), select(MODES)).prop_map(|(path, mode)| Op::Mkdir { path, mode }),
        2 => path().prop_map(|path| Op::Rmdir { path }),
        1 => path().prop_map(|path| Op::Mkfifo { path }),
        1 => (select(TARGETS), path()).prop_map(|(target, path)| Op::Symlink { target, path }),
        1 => path().prop_map(|path| Op::Readlink { path }),
        2 => (path(), path()).prop_map(|(from, to)| Op::Link { from, to }),
        2 => (path(), select(MODES)).prop_map(|(path, mode)| Op::Chmod { path, mode }),
        1 => (path(), select(OWNERS), select(OWNERS), any::<bool>())
            .prop_map(|(path, uid, gid, follow)| Op::Chown { path, uid, gid, follow }),
        3 => (path(), time(), time(), any::<bool>())
            .prop_map(|(path, atime, mtime, follow)| Op::Utimens { path, atime, mtime, follow }),
        2 => (path(), select(XATTRS), 0..200usize, any::<u8>(), xattr_flags(), any::<bool>())
            .prop_map(|(path, name, len, seed, flags, follow)| Op::SetXattr {
                path, name, len, seed, flags, follow,
            }),
        1 => (path(), select(XATTRS), any::<bool>())
            .prop_map(|(path, name, follow)| Op::GetXattr { path, name, follow }),
        1 => (path(), any::<bool>()).prop_map(|(path, follow)| Op::ListXattr { path, follow }),
        1 => (path(), select(XATTRS), any::<bool>())
            .prop_map(|(path, name, follow)| Op::RemoveXattr { path, name, follow }),
        1 => prop_oneof![Just(""), path()].prop_map(|path| Op::Readdir { path }),
    ]
}

/// Operations that give a case something to work on; each case starts with an
/// ordered subset of them (shrinking removes the ones a failure does not need).
fn prelude() -> Vec<Op> {
    vec![
        Op::Mkdir {
            path: "d",
            mode: 0o755,
        },
        Op::Mkdir {
            path: "d/e",
            mode: 0o755,
        },
        Op::Create {
            path: "a",
            excl: true,
            trunc: false,
            mode: 0o644,
        },
        Op::Write {
            path: "a",
            offset: 0,
            len: 100,
            seed: 1,
        },
        Op::Create {
            path: "d/a",
            excl: true,
            trunc: false,
            mode: 0o600,
        },
        Op::Write {
            path: "d/a",
            offset: 0,
            len: 6000,
            seed: 2,
        },
        Op::Symlink {
            target: "a",
            path: "b",
        },
        Op::Create {
            path: "d/e/c",
            excl: true,
            trunc: false,
            mode: 0o755,
        },
        Op::Open {
            slot: 0,
            path: "a",
            access: Access::ReadWrite,
            creat: false,
            trunc: false,
            append: false,
            mode: 0,
        },
        Op::Open {
            slot: 1,
            path: "d/a",
            access: Access::Write,
            creat: false,
            trunc: false,
            append: true,
            mode: 0,
        },
    ]
}

fn case() -> impl Strategy<Value = Vec<Op>> {
    let n = prelude().len();
    (
        proptest::sample::subsequence(prelude(), 0..=n),
        proptest::collection::vec(op(), 1..=30),
    )
        .prop_map(|(mut ops, more)| {
            ops.extend(more);
            ops
        })
}

/// A modification time: either one set explicitly (compared exactly), or "recent",
/// meaning the clock set it during this case (not comparable across two directories).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mtime {
    Recent,
    At(i64, i64),
}

/// The comparable part of a `stat`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Meta {
    kind: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u64,
    /// Not for directories: their size depends on the filesystem's history.
    size: Option<i64>,
    rdev: u64,
    mtime: Mtime,
}

/// The window of "now" during one case: timestamps inside it were set by the clock.
#[derive(Clone, Copy)]
struct Window {
    start: i64,
}

impl Window {
    fn new() -> Self {
        Window {
            start: unix_now() - 2,
        }
    }

    fn meta(&self, st: &libc::stat) -> Meta {
        let kind = st.st_mode & libc::S_IFMT;
        let recent = st.st_mtime >= self.start && st.st_mtime <= unix_now() + 2;
        Meta {
            kind,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            nlink: st.st_nlink,
            size: (kind != libc::S_IFDIR).then_some(st.st_size),
            rdev: st.st_rdev,
            mtime: if recent {
                Mtime::Recent
            } else {
                Mtime::At(st.st_mtime, st.st_mtime_nsec)
            },
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What an operation returned.
#[derive(Debug, PartialEq, Eq)]
enum Out {
    Done,
    Count(u64),
    Data(Vec<u8>),
    Meta(Meta),
    Names(Vec<(Vec<u8>, Option<u32>)>),
}

type Outcome = Result<Out, i32>;

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(-1)
}

fn check(ret: libc::c_int) -> Result<(), i32> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

fn check_size(ret: isize) -> Result<u64, i32> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret as u64)
    }
}

fn c(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("test paths have no NUL")
}

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i as u8).wrapping_mul(31)) | 1)
        .collect()
}

fn timespec(t: Time) -> libc::timespec {
    match t {
        Time::Omit => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Time::Now => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Time::At(s, n) => libc::timespec {
            tv_sec: s,
            tv_nsec: n,
        },
    }
}

fn lstat_raw(path: &CString, follow: bool) -> Result<libc::stat, i32> {
    // SAFETY: an all-zero stat is a valid value; the kernel overwrites it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let flags = if follow { 0 } else { libc::AT_SYMLINK_NOFOLLOW };
    // SAFETY: valid string and out-pointer.
    check(unsafe { libc::fstatat(libc::AT_FDCWD, path.as_ptr(), &mut st, flags) })?;
    Ok(st)
}

fn open_raw(path: &CString, mut flags: i32, mode: u32) -> Result<OwnedFd, i32> {
    // A fifo would block the open until a peer comes; non-blocking it opens for
    // reading, and fails with ENXIO for writing, the same on both sides.
    if lstat_raw(path, true).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFIFO) {
        flags |= libc::O_NONBLOCK;
    }
    // SAFETY: valid string; the fd returned is ours.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: just opened, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pwrite(fd: &OwnedFd, data: &[u8], offset: u64) -> Outcome {
    // SAFETY: the slice is readable for its length.
    let n = unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            offset as libc::off_t,
        )
    };
    check_size(n).map(Out::Count)
}

fn pread(fd: &OwnedFd, offset: u64, len: usize) -> Outcome {
    let mut buf = vec![0u8; len];
    // SAFETY: the buffer is writable for its length.
    let n = unsafe {
        libc::pread(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            len,
            offset as libc::off_t,
        )
    };
    let n = check_size(n)?;
    buf.truncate(n as usize);
    Ok(Out::Data(buf))
}

/// The same side of the comparison: a case directory and its open file slots.
struct Side {
    root: PathBuf,
    slots: Vec<Option<OwnedFd>>,
    window: Window,
}

impl Side {
    fn new(root: PathBuf, window: Window) -> Self {
        Side {
            root,
            slots: (0..SLOTS).map(|_| None).collect(),
            window,
        }
    }

    fn path(&self, p: &str) -> CString {
        c(&self.root.join(p))
    }

    fn slot(&self, slot: usize) -> Result<&OwnedFd, i32> {
        self.slots[slot].as_ref().ok_or(libc::EBADF)
    }

    fn run(&mut self, op: &Op) -> Outcome {
        match *op {
            Op::Create {
                path,
                excl,
                trunc,
                mode,
            } => {
                let mut flags = libc::O_CREAT | libc::O_WRONLY;
                if excl {
                    flags |= libc::O_EXCL;
                }
                if trunc {
                    flags |= libc::O_TRUNC;
                }
                open_raw(&self.path(path), flags, mode).map(|_| Out::Done)
            }
            Op::Open {
                slot,
                path,
                access,
                creat,
                trunc,
                append,
                mode,
            } => {
                self.slots[slot] = None;
                let mut flags = match access {
                    Access::Read => libc::O_RDONLY,
                    Access::Write => libc::O_WRONLY,
                    Access::ReadWrite => libc::O_RDWR,
                };
                if creat {
                    flags |= libc::O_CREAT;
                }
                if trunc {
                    flags |= libc::O_TRUNC;
                }
                if append {
                    flags |= libc::O_APPEND;
                }
                let fd = open_raw(&self.path(path), flags, mode)?;
                self.slots[slot] = Some(fd);
                Ok(Out::Done)
            }
            Op::Close { slot } => {
                let fd = self.slots[slot].take().ok_or(libc::EBADF)?;
                let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
                // SAFETY: we own `raw`; close's result (a FUSE flush) is compared.
                check(unsafe { libc::close(raw) }).map(|()| Out::Done)
            }
            Op::Write {
                path,
                offset,
                len,
                seed,
            } => {
                let fd = open_raw(&self.path(path), libc::O_WRONLY, 0)?;
                pwrite(&fd, &bytes(len, seed), offset)
            }
            Op::FdWrite {
                slot,
                offset,
                len,
                seed,
            } => pwrite(self.slot(slot)?, &bytes(len, seed), offset),
            Op::Read { path, offset, len } => {
                let fd = open_raw(&self.path(path), libc::O_RDONLY, 0)?;
                pread(&fd, offset, len)
            }
            Op::FdRead { slot, offset, len } => pread(self.slot(slot)?, offset, len),
            Op::Truncate { path, len } => {
                // SAFETY: valid string.
                check(unsafe { libc::truncate(self.path(path).as_ptr(), len as libc::off_t) })
                    .map(|()| Out::Done)
            }
            Op::FdTruncate { slot, len } => {
                let fd = self.slot(slot)?;
                // SAFETY: plain syscall on an fd we own.
                check(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) })
                    .map(|()| Out::Done)
            }
            Op::FdStat { slot } => {
                let fd = self.slot(slot)?;
                // SAFETY: an all-zero stat is valid; the kernel overwrites it.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                // SAFETY: valid fd and out-pointer.
                check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
                Ok(Out::Meta(self.window.meta(&st)))
            }
            Op::FdSync { slot, data_only } => {
                let fd = self.slot(slot)?.as_raw_fd();
                // SAFETY: plain syscalls on an fd we own.
                let r = unsafe {
                    if data_only {
                        libc::fdatasync(fd)
                    } else {
                        libc::fsync(fd)
                    }
                };
                check(r).map(|()| Out::Done)
            }
            Op::Stat { path, follow } => {
                let st = lstat_raw(&self.path(path), follow)?;
                Ok(Out::Meta(self.window.meta(&st)))
            }
            Op::Rename { from, to, kind } => {
                let flags = match kind {
                    RenameKind::Plain => 0,
                    RenameKind::NoReplace => libc::RENAME_NOREPLACE,
                    RenameKind::Exchange => libc::RENAME_EXCHANGE,
                };
                // SAFETY: valid strings.
                check(unsafe {
                    libc::renameat2(
                        libc::AT_FDCWD,
                        self.path(from).as_ptr(),
                        libc::AT_FDCWD,
                        self.path(to).as_ptr(),
                        flags,
                    )
                })
                .map(|()| Out::Done)
            }
            // SAFETY (all below): valid strings and buffers.
            Op::Unlink { path } => {
                check(unsafe { libc::unlink(self.path(path).as_ptr()) }).map(|()| Out::Done)
            }
            Op::Mkdir { path, mode } => {
                check(unsafe { libc::mkdir(self.path(path).as_ptr(), mode) }).map(|()| Out::Done)
            }
            Op::Rmdir { path } => {
                check(unsafe { libc::rmdir(self.path(path).as_ptr()) }).map(|()| Out::Done)
            }
            Op::Mkfifo { path } => {
                check(unsafe { libc::mkfifo(self.path(path).as_ptr(), 0o640) }).map(|()| Out::Done)
            }
            Op::Symlink { target, path } => {
                let t = CString::new(target).expect("no NUL");
                check(unsafe { libc::symlink(t.as_ptr(), self.path(path).as_ptr()) })
                    .map(|()| Out::Done)
            }
            Op::Readlink { path } => {
                let mut buf = vec![0u8; 4096];
                let n = check_size(unsafe {
                    libc::readlink(self.path(path).as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                })?;
                buf.truncate(n as usize);
                Ok(Out::Data(buf))
            }
            Op::Link { from, to } => {
                check(unsafe { libc::link(self.path(from).as_ptr(), self.path(to).as_ptr()) })
                    .map(|()| Out::Done)
            }
            Op::Chmod { path, mode } => {
                check(unsafe { libc::chmod(self.path(path).as_ptr(), mode) }).map(|()| Out::Done)
            }
            Op::Chown {
                path,
                uid,
                gid,
                follow,
            } => {
                let flags = if follow { 0 } else { libc::AT_SYMLINK_NOFOLLOW };
                check(unsafe {
                    libc::fchownat(libc::AT_FDCWD, self.path(path).as_ptr(), uid, gid, flags)
                })
                .map(|()| Out::Done)
            }
            Op::Utimens {
                path,
                atime,
                mtime,
                follow,
            } => {
                let flags = if follow { 0 } else { libc::AT_SYMLINK_NOFOLLOW };
                let times = [timespec(atime), timespec(mtime)];
                check(unsafe {
                    libc::utimensat(
                        libc::AT_FDCWD,
                        self.path(path).as_ptr(),
                        times.as_ptr(),
                        flags,
                    )
                })
                .map(|()| Out::Done)
            }
            Op::SetXattr {
                path,
                name,
                len,
                seed,
                flags,
                follow,
            } => {
                let value = bytes(len, seed);
                let p = self.path(path);
                let n = CString::new(name).expect("no NUL");
                let r = unsafe {
                    if follow {
                        libc::setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), len, flags)
                    } else {
                        libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), len, flags)
                    }
                };
                check(r).map(|()| Out::Done)
            }
            Op::GetXattr { path, name, follow } => {
                get_xattr(&self.path(path), name, follow).map(Out::Data)
            }
            Op::ListXattr { path, follow } => {
                let names = list_xattr(&self.path(path), follow)?;
                Ok(Out::Names(names.into_iter().map(|n| (n, None)).collect()))
            }
            Op::RemoveXattr { path, name, follow } => {
                let p = self.path(path);
                let n = CString::new(name).expect("no NUL");
                let r = unsafe {
                    if follow {
                        libc::removexattr(p.as_ptr(), n.as_ptr())
                    } else {
                        libc::lremovexattr(p.as_ptr(), n.as_ptr())
                    }
                };
                check(r).map(|()| Out::Done)
            }
            Op::Readdir { path } => {
                let rd = std::fs::read_dir(self.root.join(path))
                    .map_err(|e| e.raw_os_error().unwrap_or(-1))?;
                let mut names = Vec::new();
                for e in rd {
                    let e = e.map_err(|e| e.raw_os_error().unwrap_or(-1))?;
                    let kind = e.file_type().map_err(|e| e.raw_os_error().unwrap_or(-1))?;
                    let kind = std::os::unix::fs::FileTypeExt::is_fifo(&kind) as u32
                        | (kind.is_dir() as u32) << 1
                        | (kind.is_symlink() as u32) << 2;
                    names.push((e.file_name().as_bytes().to_vec(), Some(kind)));
                }
                names.sort();
                Ok(Out::Names(names))
            }
        }
    }
}

fn get_xattr(path: &CString, name: &str, follow: bool) -> Result<Vec<u8>, i32> {
    let n = CString::new(name).expect("no NUL");
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid strings; the buffer is writable for its length.
    let len = check_size(unsafe {
        if follow {
            libc::getxattr(
                path.as_ptr(),
                n.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        } else {
            libc::lgetxattr(
                path.as_ptr(),
                n.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        }
    })?;
    buf.truncate(len as usize);
    Ok(buf)
}

/// Extended attribute names, sorted.
fn list_xattr(path: &CString, follow: bool) -> Result<Vec<Vec<u8>>, i32> {
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid string; the buffer is writable for its length.
    let len = check_size(unsafe {
        if follow {
            libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        } else {
            libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        }
    })?;
    let mut names: Vec<Vec<u8>> = buf[..len as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    names.sort();
    Ok(names)
}

/// One entry of a walked tree.
#[derive(Debug, PartialEq, Eq)]
struct Node {
    meta: Meta,
    /// Hash of the non-zero blocks of a regular file (holes and zeros are alike).
    content: Option<u64>,
    target: Option<Vec<u8>>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A walked tree: every entry by relative path, and the hard link groups (paths of
/// non-directories that share an inode, when more than one does).
#[derive(Debug, PartialEq, Eq)]
struct Tree {
    nodes: BTreeMap<String, Node>,
    links: Vec<Vec<String>>,
}

/// Hashes the non-zero blocks of a regular file, reading only its data extents, so a
/// 5 GiB sparse file costs a few blocks.
fn content_hash(path: &Path, size: u64) -> Result<u64, String> {
    let fd = open_raw(&c(path), libc::O_RDONLY | libc::O_NOFOLLOW, 0)
        .map_err(|e| format!("open {}: errno {e}", path.display()))?;
    let mut h = DefaultHasher::new();
    let mut pos: i64 = 0;
    let mut next_block = 0u64;
    let mut buf = vec![0u8; BLOCK as usize];
    while (pos as u64) < size {
        // SAFETY: plain syscall on an fd we own.
        let data = unsafe { libc::lseek(fd.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            if errno() == libc::ENXIO {
                break;
            }
            return Err(format!("SEEK_DATA {}: errno {}", path.display(), errno()));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(format!("SEEK_HOLE {}: errno {}", path.display(), errno()));
        }
        let first = (data as u64 / BLOCK).max(next_block);
        let end = (hole as u64).div_ceil(BLOCK);
        for b in first..end {
            // SAFETY: the buffer is writable for its length.
            let n = unsafe {
                libc::pread(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    (b * BLOCK) as i64,
                )
            };
            if n < 0 {
                return Err(format!("pread {}: errno {}", path.display(), errno()));
            }
            let block = &buf[..n as usize];
            if block.iter().any(|&x| x != 0) {
                h.write_u64(b);
                h.write(block);
            }
        }
        next_block = end;
        pos = hole.max(data + 1);
    }
    Ok(h.finish())
}

fn walk(root: &Path, window: Window) -> Result<Tree, String> {
    let mut nodes = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut stack = vec![String::new()];
    while let Some(dir) = stack.pop() {
        let rd = std::fs::read_dir(root.join(&dir))
            .map_err(|e| format!("read_dir {}: {e}", root.join(&dir).display()))?;
        for e in rd {
            let e = e.map_err(|e| format!("read_dir entry in {dir}: {e}"))?;
            let rel = if dir.is_empty() {
                e.file_name().to_string_lossy().into_owned()
            } else {
                format!("{dir}/{}", e.file_name().to_string_lossy())
            };
            let full = root.join(&rel);
            let cpath = c(&full);
            let st = lstat_raw(&cpath, false).map_err(|e| format!("lstat {rel}: errno {e}"))?;
            let meta = window.meta(&st);
            let kind = meta.kind;
            let content = if kind == libc::S_IFREG {
                Some(content_hash(&full, st.st_size as u64)?)
            } else {
                None
            };
            let target = if kind == libc::S_IFLNK {
                let t = std::fs::read_link(&full).map_err(|e| format!("readlink {rel}: {e}"))?;
                Some(t.as_os_str().as_bytes().to_vec())
            } else {
                None
            };
            let mut xattrs = Vec::new();
            for name in list_xattr(&cpath, false).map_err(|e| format!("llistxattr {rel}: {e}"))? {
                let n = String::from_utf8_lossy(&name).into_owned();
                let v = get_xattr(&cpath, &n, false)
                    .map_err(|e| format!("lgetxattr {rel} {n}: errno {e}"))?;
                xattrs.push((name, v));
            }
            if kind == libc::S_IFDIR {
                stack.push(rel.clone());
            } else {
                inodes.entry(st.st_ino).or_default().push(rel.clone());
            }
            nodes.insert(
                rel,
                Node {
                    meta,
                    content,
                    target,
                    xattrs,
                },
            );
        }
    }
    let mut links: Vec<Vec<String>> = inodes
        .into_values()
        .filter(|v| v.len() > 1)
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    links.sort();
    Ok(Tree { nodes, links })
}

/// The first difference between two trees, readable in a failure message.
fn tree_diff(what: &str, want: &Tree, got: &Tree) -> Option<String> {
    for (path, n) in &want.nodes {
        match got.nodes.get(path) {
            None => return Some(format!("{what}: {path} missing (native has {n:?})")),
            Some(g) if g != n => {
                return Some(format!(
                    "{what}: {path} differs\n native: {n:?}\n {what}: {g:?}"
                ))
            }
            Some(_) => {}
        }
    }
    for path in got.nodes.keys() {
        if !want.nodes.contains_key(path) {
            return Some(format!("{what}: extra entry {path}"));
        }
    }
    if want.links != got.links {
        return Some(format!(
            "{what}: hard link groups differ\n native: {:?}\n {what}: {:?}",
            want.links, got.links
        ));
    }
    None
}

fn run(passthrough: bool) {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let native = tempfile::Builder::new()
        .prefix("twinfs-native-")
        .tempdir()
        .expect("native tempdir");
    let mount = MountedDir::new(passthrough, |_| {});
    // The directory underneath the mount, reached through the volume's own fd: what
    // twinfs actually wrote, as opposed to what the kernel may have cached.
    let backing = PathBuf::from(format!(
        "/proc/self/fd/{}",
        mount.volume().root_fd().as_raw_fd()
    ));
    let counter = AtomicU32::new(0);
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_time: 120_000,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&case(), |ops| {
        let case = format!("case-{}", counter.fetch_add(1, Ordering::Relaxed));
        let window = Window::new();
        let mut want = Side::new(native.path().join(&case), window);
        let mut got = Side::new(mount.path.join(&case), window);
        std::fs::create_dir(&want.root).expect("mkdir native case");
        std::fs::create_dir(&got.root).expect("mkdir mounted case");
        for (i, op) in ops.iter().enumerate() {
            let w = want.run(op);
            let g = got.run(op);
            if w != g {
                return Err(TestCaseError::fail(format!(
                    "op #{i} {op:?}\n native: {w:?}\n twinfs: {g:?}\n in: {ops:#?}"
                )));
            }
        }
        // Close everything first: a file still open on the mount keeps it busy, and the
        // close itself is part of what is compared (a FUSE flush/release).
        for slot in 0..SLOTS {
            let w = want.run(&Op::Close { slot });
            let g = got.run(&Op::Close { slot });
            prop_assert_eq!(w, g, "closing slot {}", slot);
        }
        let w = walk(&want.root, window).map_err(TestCaseError::fail)?;
        let g = walk(&got.root, window).map_err(TestCaseError::fail)?;
        let b = walk(&backing.join(&case), window).map_err(TestCaseError::fail)?;
        let diff = tree_diff("twinfs", &w, &g).or_else(|| tree_diff("backing", &w, &b));
        if let Some(d) = diff {
            return Err(TestCaseError::fail(format!(
                "{d}\n after {} ops: {ops:#?}",
                ops.len()
            )));
        }
        Ok(())
    });
    drop(mount);
    if let Err(e) = result {
        panic!("passthrough={passthrough}: {e}");
    }
}

#[test]
fn same_as_native_with_passthrough() {
    run(true);
}

#[test]
fn same_as_native_without_passthrough() {
    run(false);
}
