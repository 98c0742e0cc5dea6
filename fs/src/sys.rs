//! Thin, safe wrappers over the `*at` system calls the volume is served with.
//!
//! Every call takes a directory fd and a single name (never a path with `/`), never
//! follows a trailing symlink, and returns `io::Result`, so the volume core stays free
//! of `unsafe` and of errno juggling.

use std::ffi::{CString, OsStr};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `struct stat` as the kernel returns it.
pub type Stat = libc::stat;

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn check_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// The path through `/proc/self/fd` that reaches the object behind `fd` itself, even
/// for `O_PATH` fds and directories hidden under a mount.
pub fn proc_path(fd: BorrowedFd<'_>) -> CString {
    // A decimal number never contains a NUL byte.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// Opens `path` as an `O_PATH` directory handle (no read access needed).
pub fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    open_directory(path, libc::O_PATH)
}

/// Opens the directory `path` for reading (`O_RDONLY | O_DIRECTORY`), which asks its
/// filesystem, unlike [`open_dir_path`].
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    open_directory(path, libc::O_RDONLY)
}

/// `open(path, O_DIRECTORY | O_CLOEXEC | how)`.
fn open_directory(path: &Path, how: libc::c_int) -> io::Result<OwnedFd> {
    let c = cstr(path.as_os_str())?;
    // SAFETY: `c` is a valid NUL-terminated string; the returned fd is owned by us.
    let fd = unsafe { libc::open(c.as_ptr(), how | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `openat(dir, name, flags | O_NOFOLLOW | O_CLOEXEC, mode)`.
pub fn openat(dir: BorrowedFd<'_>, name: &OsStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: valid fd and string; the returned fd is owned by us.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Re-opens a directory held as an `O_PATH` fd for reading its entries.
pub fn reopen_dir(dir: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // "." never resolves through a symlink, so O_NOFOLLOW (added by openat) is harmless.
    openat(dir, OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`; an empty name stats `dir` itself.
pub fn statat(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Stat> {
    let c = cstr(name)?;
    let flags = if name.is_empty() {
        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW
    } else {
        libc::AT_SYMLINK_NOFOLLOW
    };
    let mut st = MaybeUninit::<Stat>::uninit();
    // SAFETY: `st` is a valid out-pointer; on success the kernel fills it completely.
    check(unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), st.as_mut_ptr(), flags) })?;
    // SAFETY: fstatat succeeded, so `st` is initialised.
    Ok(unsafe { st.assume_init() })
}

/// `fstat(fd)`.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    statat(fd, OsStr::new(""))
}

/// `mkdirat(dir, name, mode)`.
pub fn mkdirat(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid fd and string.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) })
}

/// `mknodat(dir, name, mode, rdev)`.
pub fn mknodat(dir: BorrowedFd<'_>, name: &OsStr, mode: u32, rdev: u64) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid fd and string.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), c.as_ptr(), mode as libc::mode_t, rdev) })
}

/// `symlinkat(target, dir, name)`.
pub fn symlinkat(target: &OsStr, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let t = cstr(target)?;
    let c = cstr(name)?;
    // SAFETY: valid fd and strings.
    check(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), c.as_ptr()) })
}

/// `readlinkat(dir, name)`.
pub fn readlinkat(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Vec<u8>> {
    let c = cstr(name)?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `buf` is writable for its whole length.
    let n = check_size(unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            c.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// `unlinkat(dir, name, flags)`; `AT_REMOVEDIR` for rmdir.
pub fn unlinkat(dir: BorrowedFd<'_>, name: &OsStr, flags: i32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid fd and string.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) })
}

/// fsyncs the directory behind `dir` (an `O_PATH` fd will do: fsync needs a real
/// open): an entry just made in it is durable.
pub fn fsync_dir(dir: BorrowedFd<'_>) -> io::Result<()> {
    fsync(std::os::fd::AsFd::as_fd(&reopen_dir(dir)?), false)
}

/// Renames `old` to `new` in `dir` unless `new` exists (`EEXIST` then). On a
/// filesystem without rename flags (NFS, say: `EINVAL`), a hard link and an unlink
/// do the same.
pub fn rename_noreplace(dir: BorrowedFd<'_>, old: &OsStr, new: &OsStr) -> io::Result<()> {
    match renameat2(dir, old, dir, new, libc::RENAME_NOREPLACE) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            linkat(dir, old, dir, new)?;
            unlinkat(dir, old, 0)
        }
        other => other,
    }
}

/// `renameat2(olddir, old, newdir, new, flags)`.
pub fn renameat2(
    olddir: BorrowedFd<'_>,
    old: &OsStr,
    newdir: BorrowedFd<'_>,
    new: &OsStr,
    flags: u32,
) -> io::Result<()> {
    let o = cstr(old)?;
    let n = cstr(new)?;
    // SAFETY: valid fds and strings.
    check(unsafe {
        libc::renameat2(
            olddir.as_raw_fd(),
            o.as_ptr(),
            newdir.as_raw_fd(),
            n.as_ptr(),
            flags,
        )
    })
}

/// `linkat(olddir, old, newdir, new, 0)`.
pub fn linkat(
    olddir: BorrowedFd<'_>,
    old: &OsStr,
    newdir: BorrowedFd<'_>,
    new: &OsStr,
) -> io::Result<()> {
    let o = cstr(old)?;
    let n = cstr(new)?;
    // SAFETY: valid fds and strings.
    check(unsafe {
        libc::linkat(
            olddir.as_raw_fd(),
            o.as_ptr(),
            newdir.as_raw_fd(),
            n.as_ptr(),
            0,
        )
    })
}

/// A file addressed either as `name` inside a directory fd, or as an fd of its own
/// (directories, which the volume holds as `O_PATH` fds).
#[derive(Clone, Copy)]
pub enum At<'a> {
    /// `name` inside the directory `dir`; never follows a trailing symlink.
    Entry(BorrowedFd<'a>, &'a OsStr),
    /// The object behind the fd itself.
    Fd(BorrowedFd<'a>),
}

impl At<'_> {
    /// The directory fd, the name and the flags that make an `*at` call address this
    /// object without following a trailing symlink.
    fn resolve(&self) -> io::Result<(RawFd, CString, i32)> {
        match *self {
            At::Entry(dir, name) => Ok((dir.as_raw_fd(), cstr(name)?, libc::AT_SYMLINK_NOFOLLOW)),
            // The /proc magic link lands on the object itself and is not followed further.
            At::Fd(fd) => Ok((libc::AT_FDCWD, proc_path(fd), 0)),
        }
    }

    /// Opens this object with `flags` (never following a trailing symlink). An fd of
    /// its own is opened anew through its `/proc/self/fd` link, which reaches a file
    /// whose every name is gone too (a caller reopening an unlinked file through
    /// `/proc/PID/fd`).
    pub fn open(&self, flags: i32) -> io::Result<OwnedFd> {
        match *self {
            At::Entry(dir, name) => openat(dir, name, flags, 0),
            At::Fd(fd) => {
                let path = proc_path(fd);
                // (O_NOFOLLOW would refuse the magic link itself.)
                let flags = (flags & !libc::O_NOFOLLOW) | libc::O_CLOEXEC;
                // SAFETY: valid string; the returned fd is owned by us.
                let fd = unsafe { libc::open(path.as_ptr(), flags) };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: `fd` was just returned by open and is not owned elsewhere.
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            }
        }
    }

    /// `stat` without following a trailing symlink.
    pub fn stat(&self) -> io::Result<Stat> {
        match *self {
            At::Entry(dir, name) => statat(dir, name),
            At::Fd(fd) => fstat(fd),
        }
    }

    /// `chmod`. Symlinks have no mode of their own; the kernel never asks.
    pub fn chmod(&self, mode: u32) -> io::Result<()> {
        let (dir, c, _) = self.resolve()?;
        // SAFETY: valid fd and string. fchmodat has no working AT_SYMLINK_NOFOLLOW, but the
        // kernel resolves symlinks itself and never sends a chmod for one.
        check(unsafe { libc::fchmodat(dir, c.as_ptr(), mode as libc::mode_t, 0) })
    }

    /// `chown`; `None` leaves that id unchanged.
    pub fn chown(&self, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
        let (dir, c, flags) = self.resolve()?;
        let uid = uid.unwrap_or(u32::MAX);
        let gid = gid.unwrap_or(u32::MAX);
        // SAFETY: valid fd and string; -1 leaves an id unchanged.
        check(unsafe { libc::fchownat(dir, c.as_ptr(), uid, gid, flags) })
    }

    /// `utimensat` with two timespecs (`UTIME_NOW`/`UTIME_OMIT` allowed).
    pub fn utimens(&self, times: &[libc::timespec; 2]) -> io::Result<()> {
        let (dir, c, flags) = self.resolve()?;
        // SAFETY: valid fd, string and a two-element array.
        check(unsafe { libc::utimensat(dir, c.as_ptr(), times.as_ptr(), flags) })
    }

    /// Runs `f` with a path that reaches this object without following it if it is a
    /// symlink: the xattr calls have no `*at` form on older kernels.
    fn with_path<T>(&self, f: impl FnOnce(&CString) -> io::Result<T>) -> io::Result<T> {
        match *self {
            At::Fd(fd) => f(&proc_path(fd)),
            At::Entry(dir, name) => {
                let fd = openat(dir, name, libc::O_PATH, 0)?;
                f(&proc_path(std::os::fd::AsFd::as_fd(&fd)))
            }
        }
    }

    /// `getxattr`; with an empty buffer returns the size.
    pub fn getxattr(&self, name: &OsStr, buf: &mut [u8]) -> io::Result<usize> {
        let n = cstr(name)?;
        self.with_path(|p| {
            // SAFETY: valid strings; buffer is writable for its length (or null with 0).
            check_size(unsafe {
                libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            })
        })
    }

    /// `listxattr`; with an empty buffer returns the size.
    pub fn listxattr(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.with_path(|p| {
            // SAFETY: valid string; buffer is writable for its length.
            check_size(unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
        })
    }

    /// `setxattr`.
    pub fn setxattr(&self, name: &OsStr, value: &[u8], flags: i32) -> io::Result<()> {
        let n = cstr(name)?;
        self.with_path(|p| {
            // SAFETY: valid strings and value slice.
            check(unsafe {
                libc::setxattr(
                    p.as_ptr(),
                    n.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    flags,
                )
            })
        })
    }

    /// `removexattr`.
    pub fn removexattr(&self, name: &OsStr) -> io::Result<()> {
        let n = cstr(name)?;
        self.with_path(|p| {
            // SAFETY: valid strings.
            check(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) })
        })
    }
}

/// `pread` until `buf` is full or end of file.
pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the slice past `done` is writable.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        match check_size(n) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// `pwrite` of the whole buffer, or as much of it as the file takes: an error after
/// part of it was written (the disk full, a quota or size limit) is a short count, as
/// a native `write` returns, not an error that would hide the bytes written.
pub fn pwrite(fd: BorrowedFd<'_>, data: &[u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        // SAFETY: the slice past `done` is readable.
        let n = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                data[done..].as_ptr().cast(),
                data.len() - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        match check_size(n) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) if done > 0 => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Starts writing back the dirty pages of `fd` in `offset..offset + len` and returns
/// without waiting (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): a later fsync has that
/// much less to do. Makes nothing durable by itself.
pub fn start_writeback(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe {
        libc::sync_file_range(
            fd.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    })
}

/// `fsync` or `fdatasync`.
pub fn fsync(fd: BorrowedFd<'_>, data_only: bool) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe {
        if data_only {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    })
}

/// `fchmod`.
pub fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) })
}

/// `ftruncate`.
pub fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) })
}

/// `fallocate`.
pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    })
}

/// `lseek`.
pub fn lseek(fd: BorrowedFd<'_>, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: plain syscall on a valid fd.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The inode's generation number (`FS_IOC_GETVERSION`), which tells an inode from a
/// later one that reuses its number (ext4 and XFS draw it at random); an error where
/// the filesystem has none.
pub fn generation(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // _IOR('v', 1, long), which the libc crate does not define.
    const FS_IOC_GETVERSION: libc::c_ulong = 0x8008_7601;
    let mut version: libc::c_long = 0;
    // SAFETY: valid fd; the kernel writes one long through the pointer.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_GETVERSION, &mut version) })?;
    Ok(version as u64)
}

/// The id of the mount `fd` is on, which tells a bind mount from the directory it sits
/// in even when both are on one filesystem (one `st_dev`): `statx(STATX_MNT_ID)` (Linux
/// 5.8), else the `mnt_id` line of `/proc/self/fdinfo/<fd>` (Linux 3.15).
pub fn mount_id(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: valid fd, a NUL-terminated empty path and a valid out-pointer.
    let ret = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MNT_ID,
            stx.as_mut_ptr(),
        )
    };
    if ret == 0 {
        // SAFETY: statx succeeded and the buffer was zeroed before.
        let stx = unsafe { stx.assume_init() };
        if stx.stx_mask & libc::STATX_MNT_ID != 0 {
            return Ok(stx.stx_mnt_id);
        }
    }
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    info.lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no mnt_id in /proc/self/fdinfo"))
}

/// The supplementary groups of thread `tid`, from the `Groups:` line of
/// `/proc/<tid>/status` (credentials are per thread; a thread id is found there even
/// though `/proc` does not list it). An error if the thread is gone, or not in this pid
/// namespace, or the line is not as expected.
pub fn supplementary_groups(tid: u32) -> io::Result<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status"))?;
    groups_in_status(&status)
        .ok_or_else(|| io::Error::other(format!("no Groups line in /proc/{tid}/status")))
}

/// The gids of the `Groups:` line of a `/proc/<pid>/status` text; `None` if there is no
/// such line or a word of it is not a gid.
fn groups_in_status(status: &str) -> Option<Vec<u32>> {
    let line = status.lines().find_map(|l| l.strip_prefix("Groups:"))?;
    line.split_whitespace().map(|g| g.parse().ok()).collect()
}

/// The running kernel's (major, minor) version, from `uname`; (0, 0) if it cannot be
/// told. Read once.
pub fn kernel_version() -> (u32, u32) {
    static VERSION: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
    *VERSION.get_or_init(|| {
        let mut uts = MaybeUninit::<libc::utsname>::uninit();
        // SAFETY: uname fills the struct it is given.
        if unsafe { libc::uname(uts.as_mut_ptr()) } != 0 {
            return (0, 0);
        }
        // SAFETY: filled by the successful uname above.
        let uts = unsafe { uts.assume_init() };
        // SAFETY: `release` is a NUL-terminated string within the array.
        let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) };
        parse_kernel_version(&release.to_string_lossy())
    })
}

/// (major, minor) of a kernel release like `6.1.0-18-amd64`; (0, 0) if it is not one.
fn parse_kernel_version(release: &str) -> (u32, u32) {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>());
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor),
        _ => (0, 0),
    }
}

/// `fstatfs`.
pub fn fstatfs(fd: BorrowedFd<'_>) -> io::Result<libc::statfs> {
    let mut st = MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: valid out-pointer.
    check(unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatfs succeeded.
    Ok(unsafe { st.assume_init() })
}

/// One entry of a directory listing.
pub struct DirEntry {
    /// The name, never `.` or `..`.
    pub name: std::ffi::OsString,
    /// The backing inode number.
    pub ino: u64,
    /// `DT_*` type from the directory entry.
    pub kind: u8,
}

/// Reads every entry of the directory behind `dir` (an `O_PATH` fd), without `.`/`..`.
pub fn read_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<DirEntry>> {
    let fd = reopen_dir(dir)?;
    let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
    // SAFETY: `raw` is a valid directory fd whose ownership passes to the DIR stream.
    let stream = unsafe { libc::fdopendir(raw) };
    if stream.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so we still own `raw`.
        unsafe { libc::close(raw) };
        return Err(e);
    }
    let mut out = Vec::new();
    let result = loop {
        // SAFETY: errno is thread-local; reset it to tell end-of-stream from an error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `stream` is a valid DIR*.
        let ent = unsafe { libc::readdir64(stream) };
        if ent.is_null() {
            // SAFETY: reading thread-local errno.
            let errno = unsafe { *libc::__errno_location() };
            break if errno == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(errno))
            };
        }
        // SAFETY: readdir64 returned a valid entry that lives until the next call.
        let ent = unsafe { &*ent };
        // SAFETY: d_name is NUL-terminated.
        let name = unsafe { std::ffi::CStr::from_ptr(ent.d_name.as_ptr()) };
        let bytes = name.to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        out.push(DirEntry {
            name: OsStr::from_bytes(bytes).to_owned(),
            ino: ent.d_ino,
            kind: ent.d_type,
        });
    };
    // SAFETY: `stream` is valid and closed exactly once (this also closes `raw`).
    unsafe { libc::closedir(stream) };
    result.map(|()| out)
}

thread_local! {
    /// Whether this thread has a umask of its own: unknown yet (`None`), yes, or no
    /// (`unshare` failed).
    static OWN_UMASK: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// A create on behalf of a caller, with the caller's umask: while it lives, the
/// calling thread has that umask of its own, so the backing filesystem applies it, or
/// a default ACL of the parent directory in its place, as for the caller itself (the
/// kernel sends the mode unmasked, with `FUSE_DONT_MASK`). Dropped, the thread's umask
/// is 0 again, for whatever else the thread creates. Only the FUSE worker threads are
/// affected, not the process that embeds the volume.
pub struct CallerUmask {
    /// The bits the caller must clear from the mode itself: none, or the umask if
    /// the thread could not get one of its own (then the process's umask is 0, as
    /// the volume needs it).
    pub clear: u32,
    /// Whether the thread's umask is to be set back to 0 (it was set to another).
    reset: bool,
}

impl CallerUmask {
    /// Gives the calling thread the umask `mask`. (Between creates a thread's own
    /// umask is 0, so a `mask` of 0 costs no system call.)
    pub fn set(mask: u32) -> CallerUmask {
        let mask = mask & 0o777;
        let own = OWN_UMASK.with(|own| {
            let now = own.get().unwrap_or_else(|| {
                // SAFETY: unsharing the fs_struct only affects this thread.
                let unshared = unsafe { libc::unshare(libc::CLONE_FS) } == 0;
                if !unshared {
                    tracing::warn!(error = %std::io::Error::last_os_error(),
                        "unshare(CLONE_FS) failed; clearing the process umask");
                }
                // SAFETY: umask cannot fail. (The thread's own umask, or the process's.)
                unsafe { libc::umask(0) };
                unshared
            });
            own.set(Some(now));
            now
        });
        if !own {
            return CallerUmask {
                clear: mask,
                reset: false,
            };
        }
        if mask != 0 {
            // SAFETY: umask cannot fail; this thread's fs_struct is its own.
            unsafe { libc::umask(mask) };
        }
        CallerUmask {
            clear: 0,
            reset: mask != 0,
        }
    }
}

impl Drop for CallerUmask {
    fn drop(&mut self) {
        if self.reset {
            // SAFETY: as above.
            unsafe { libc::umask(0) };
        }
    }
}

/// Raises the soft limit of open files to the hard limit: a volume holds one fd per
/// directory the kernel has looked up and one per open file.
pub fn raise_fd_limit() {
    let mut lim = MaybeUninit::<libc::rlimit>::uninit();
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, lim.as_mut_ptr()) } == 0 {
        // SAFETY: getrlimit succeeded.
        let mut lim = unsafe { lim.assume_init() };
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: valid pointer; failure only leaves the old limit in place.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// Mounts a FUSE filesystem of type `fuse.twinfs` at `mountpoint`, shown with `source`,
/// open to every user with the kernel checking permissions (`allow_other`,
/// `default_permissions`), device files, set-user-ID bits, execution and symlinks
/// honoured as in the directory it covers: the `nosuid`, `nodev`, `noexec` and
/// `nosymfollow` of its filesystem are the mount's too (a config flash mounted
/// `nosuid,nodev,noexec` stays so). Returns the /dev/fuse fd that serves it.
pub fn mount_fuse(mountpoint: &Path, source: &str) -> io::Result<OwnedFd> {
    let device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open /dev/fuse: {e}")))?;
    // SAFETY: getuid and getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let data = format!(
        "fd={},rootmode={:o},user_id={uid},group_id={gid},default_permissions,allow_other",
        device.as_raw_fd(),
        libc::S_IFDIR
    );
    let target = cstr(mountpoint.as_os_str())?;
    let source = cstr(OsStr::new(source))?;
    let data = CString::new(data).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let flags = covered_mount_flags(&target)?;
    // SAFETY: valid NUL-terminated strings; `data` is the text FUSE parses.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            c"fuse.twinfs".as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    })?;
    Ok(OwnedFd::from(device))
}

/// The mount flags of the filesystem `path` is on that a mount over it keeps:
/// `nosuid`, `nodev`, `noexec`, `nosymfollow`.
fn covered_mount_flags(path: &std::ffi::CStr) -> io::Result<libc::c_ulong> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: valid string and out pointer.
    check(unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) })?;
    // SAFETY: statvfs succeeded.
    let on = unsafe { st.assume_init() }.f_flag;
    // (ST_NOSYMFOLLOW and MS_NOSYMFOLLOW: Linux 5.10; libc has the mount flag only.)
    const ST_NOSYMFOLLOW: libc::c_ulong = 0x2000;
    let kept = [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (ST_NOSYMFOLLOW, libc::MS_NOSYMFOLLOW),
    ];
    Ok(kept
        .iter()
        .filter(|(st, _)| on & st != 0)
        .fold(0, |flags, (_, ms)| flags | ms))
}

/// `umount2(path)`, lazily (`MNT_DETACH`) if asked.
pub fn umount(path: &Path, lazy: bool) -> io::Result<()> {
    let c = cstr(path.as_os_str())?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: valid string.
    check(unsafe { libc::umount2(c.as_ptr(), flags) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_read_from_a_status_text() {
        let status = "Name:\tsh\nUid:\t4243\t4243\t4243\t4243\nGroups:\t4242 10 \nNgid:\t0\n";
        assert_eq!(groups_in_status(status), Some(vec![4242, 10]));
        assert_eq!(groups_in_status("Groups:\n"), Some(vec![]));
        assert_eq!(groups_in_status("Name:\tsh\n"), None);
        assert_eq!(groups_in_status("Groups:\t12 x\n"), None);
        assert_eq!(groups_in_status("Groups:\t4294967296\n"), None);
    }

    #[test]
    fn this_thread_s_groups_are_its_own() {
        // SAFETY: gettid and getgroups(0, NULL) cannot fail.
        let (tid, n) = unsafe { (libc::gettid(), libc::getgroups(0, std::ptr::null_mut())) };
        let groups = supplementary_groups(tid as u32).expect("own status");
        assert_eq!(groups.len(), n as usize);
        assert!(supplementary_groups(0).is_err(), "no /proc/0");
    }

    #[test]
    fn kernel_versions_are_read_from_releases() {
        assert_eq!(parse_kernel_version("6.1.0-18-amd64"), (6, 1));
        assert_eq!(parse_kernel_version("6.18.44-fc-v1045"), (6, 18));
        assert_eq!(parse_kernel_version("5.10"), (5, 10));
        assert_eq!(parse_kernel_version("six"), (0, 0));
        assert_eq!(parse_kernel_version("6"), (0, 0));
        assert!(kernel_version() >= (3, 0), "{:?}", kernel_version());
    }
}
