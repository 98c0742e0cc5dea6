//! The only module that speaks fuser: each request is one call into the `Volume` core
//! and one reply. Errors become errnos in one place (`reply_err`); passthrough backing
//! ids are managed here because they are a property of the FUSE session.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::error::Error;
use crate::volume::{Attr, Caller, OpenFile, SetAttr, SetTime, Volume};

/// How long the kernel may cache entries and attributes. Long, because every change
/// to the directory goes through this mount or is announced by an explicit invalidation.
const TTL: Duration = Duration::from_secs(3600);

fn reply_errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

/// A `stat` time: seconds from the epoch (negative before it) and nanoseconds after
/// them. Any 64-bit second count is a valid time on Linux (tmpfs and btrfs store the
/// lowest, `i64::MIN`, which cannot be negated), so every step is checked; a time
/// `SystemTime` cannot hold becomes the epoch rather than a panic.
fn time(sec: i64, nsec: i64) -> SystemTime {
    let secs = Duration::from_secs(sec.unsigned_abs());
    let whole = if sec >= 0 {
        UNIX_EPOCH.checked_add(secs)
    } else {
        UNIX_EPOCH.checked_sub(secs)
    };
    let nanos = Duration::from_nanos(u64::try_from(nsec).unwrap_or(0).min(999_999_999));
    whole
        .and_then(|t| t.checked_add(nanos))
        .unwrap_or(UNIX_EPOCH)
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn dt_type(dt: u8) -> FileType {
    match dt {
        libc::DT_DIR => FileType::Directory,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_SOCK => FileType::Socket,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    let st = &a.st;
    FileAttr {
        ino: INodeNo(a.ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(t),
    })
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

/// Backing ids for passthrough: one per inode while any handle of it is open, as the
/// kernel requires.
#[derive(Default)]
struct Backing {
    by_inode: HashMap<u64, Weak<BackingId>>,
    by_handle: HashMap<u64, Arc<BackingId>>,
}

/// The fuser `Filesystem` over a `Volume`.
pub struct FuseAdapter {
    volume: Arc<Volume>,
    want_passthrough: bool,
    backing: Mutex<Backing>,
    /// The session's notifier, once it runs ([`FuseAdapter::notifier_slot`]).
    notifier: Arc<OnceLock<fuser::Notifier>>,
}

impl FuseAdapter {
    /// An adapter serving `volume`; `passthrough` asks the kernel for FUSE passthrough.
    pub fn new(volume: Arc<Volume>, passthrough: bool) -> Self {
        FuseAdapter {
            volume,
            want_passthrough: passthrough,
            backing: Mutex::new(Backing::default()),
            notifier: Arc::default(),
        }
    }

    /// The names of `ino`'s extended attributes (NUL-terminated, as `listxattr` gives
    /// them) but for the `trusted.` ones.
    fn unprivileged_xattr_names(&self, ino: u64) -> Result<Vec<u8>, Error> {
        let mut buf = Vec::new();
        // (The list may grow between the two calls: then again.)
        for _ in 0..8 {
            let len = self.volume.listxattr(ino, &mut [])?;
            buf.resize(len, 0);
            match self.volume.listxattr(ino, &mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf
                        .split_inclusive(|b| *b == 0)
                        .filter(|name| !name.starts_with(b"trusted."))
                        .flatten()
                        .copied()
                        .collect());
                }
                Err(e) if e.errno() == libc::ERANGE => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::from(std::io::Error::from_raw_os_error(libc::ERANGE)))
    }

    /// Where the mount puts the session's notifier once the session runs.
    pub fn notifier_slot(&self) -> Arc<OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    /// After a change of the access ACL of `ino` through the mount: the mode changed
    /// with it (its group bits are the ACL's mask), and the kernel, which takes no
    /// ACLs from twinfs (no `FUSE_POSIX_ACL`), would show the old mode until the
    /// attribute TTL ran out. Told now; the call takes no lock of the inode, so it is
    /// safe within the request.
    fn acl_changed(&self, ino: INodeNo, name: &OsStr) {
        use std::os::unix::ffi::OsStrExt;
        if name.as_bytes() != b"system.posix_acl_access" {
            return;
        }
        if let Some(notifier) = self.notifier.get() {
            if let Err(e) = notifier.inval_inode(ino, -1, 0) {
                tracing::debug!(ino = ino.0, error = %e, "cannot invalidate attributes");
            }
        }
    }

    fn backing(&self) -> std::sync::MutexGuard<'_, Backing> {
        self.backing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The backing id for `fh`, reusing the inode's if one is live.
    fn backing_for(
        &self,
        fh: u64,
        file: &OpenFile,
        open: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> std::io::Result<BackingId>,
    ) -> std::io::Result<Arc<BackingId>> {
        let mut backing = self.backing();
        let id = match backing.by_inode.get(&file.ino).and_then(Weak::upgrade) {
            Some(id) => id,
            None => {
                let id = Arc::new(open(file.fd.as_fd())?);
                backing.by_inode.insert(file.ino, Arc::downgrade(&id));
                id
            }
        };
        backing.by_handle.insert(fh, id.clone());
        Ok(id)
    }

    fn passthrough_failed(&self, e: &std::io::Error) {
        if self.volume.passthrough() {
            tracing::warn!(volume = %self.volume.path().display(), error = %e,
                "FUSE passthrough refused by the kernel; serving reads and writes through twinfs");
            self.volume.set_passthrough(false);
        }
    }
}

macro_rules! span {
    ($op:expr, $($field:tt)*) => {
        let _span = tracing::debug_span!("fuse", op = $op, $($field)*).entered();
    };
}

fn log_err(op: &'static str, e: &Error) -> Errno {
    // A missing name is the everyday answer to a lookup, not worth a log line.
    if e.errno() != libc::ENOENT {
        tracing::debug!(op, error = %e, "failed");
    }
    reply_errno(e)
}

fn reply_entry(op: &'static str, reply: ReplyEntry, result: crate::Result<Attr>) {
    match result {
        Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
        Err(e) => reply.error(log_err(op, &e)),
    }
}

fn reply_attr(op: &'static str, reply: ReplyAttr, result: crate::Result<Attr>) {
    match result {
        Ok(a) => reply.attr(&TTL, &file_attr(&a)),
        Err(e) => reply.error(log_err(op, &e)),
    }
}

fn reply_empty(op: &'static str, reply: ReplyEmpty, result: crate::Result<()>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(log_err(op, &e)),
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        // Creates come with the caller's umask beside the mode, not applied to it: the
        // backing filesystem applies it, or a default ACL of the parent in its place
        // ([`crate::sys::CallerUmask`]).
        let _ = config.add_capabilities(InitFlags::FUSE_DONT_MASK);
        let _ = config.set_max_write(1 << 20);
        if self.want_passthrough {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            self.volume.set_passthrough(ok);
            if !ok {
                tracing::info!(volume = %self.volume.path().display(),
                    "kernel offers no FUSE passthrough; serving reads and writes through twinfs");
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        span!("lookup", parent = parent.0, name = ?name);
        reply_entry("lookup", reply, self.volume.lookup(parent.0, name));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.volume.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        span!("getattr", ino = ino.0);
        reply_attr(
            "getattr",
            reply,
            self.volume.getattr(ino.0, fh.map(|f| f.0)),
        );
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        span!("setattr", ino = ino.0);
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
            fh: fh.map(|f| f.0),
        };
        reply_attr("setattr", reply, self.volume.setattr(ino.0, set));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        span!("readlink", ino = ino.0);
        match self.volume.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(log_err("readlink", &e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        span!("mknod", parent = parent.0, name = ?name);
        reply_entry(
            "mknod",
            reply,
            self.volume
                .mknod(parent.0, name, mode, umask, u64::from(rdev), caller(req)),
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        span!("mkdir", parent = parent.0, name = ?name);
        reply_entry(
            "mkdir",
            reply,
            self.volume.mkdir(parent.0, name, mode, umask, caller(req)),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        span!("unlink", parent = parent.0, name = ?name);
        reply_empty("unlink", reply, self.volume.unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        span!("rmdir", parent = parent.0, name = ?name);
        reply_empty("rmdir", reply, self.volume.rmdir(parent.0, name));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        span!("symlink", parent = parent.0, name = ?link_name);
        reply_entry(
            "symlink",
            reply,
            self.volume
                .symlink(parent.0, link_name, target.as_os_str(), caller(req)),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        span!("rename", parent = parent.0, name = ?name, newname = ?newname);
        reply_empty(
            "rename",
            reply,
            self.volume
                .rename(parent.0, name, newparent.0, newname, flags.bits()),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        span!("link", ino = ino.0, name = ?newname);
        reply_entry("link", reply, self.volume.link(ino.0, newparent.0, newname));
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        span!("open", ino = ino.0);
        let (fh, file) = match self.volume.open(ino.0, flags.0, caller(req)) {
            Ok(x) => x,
            Err(e) => return reply.error(log_err("open", &e)),
        };
        if self.volume.passthrough() {
            match self.backing_for(fh, &file, |fd| reply.open_backing(fd)) {
                Ok(id) => {
                    return reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id)
                }
                Err(e) => self.passthrough_failed(&e),
            }
        }
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.volume.read(fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(log_err("read", &e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.volume.write(fh.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(log_err("write", &e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        span!("flush", ino = ino.0);
        reply_empty("flush", reply, self.volume.flush(fh.0));
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        span!("release", ino = ino.0);
        let id = self.backing().by_handle.remove(&fh.0);
        let result = self.volume.release(fh.0);
        // The backing id must outlive the kernel's last use of this handle: drop after.
        if id.is_some() {
            drop(id);
            let mut backing = self.backing();
            if backing
                .by_inode
                .get(&ino.0)
                .is_some_and(|w| w.strong_count() == 0)
            {
                backing.by_inode.remove(&ino.0);
            }
        }
        match result {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(log_err("release", &e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        span!("fsync", ino = ino.0);
        reply_empty("fsync", reply, self.volume.fsync(fh.0, datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        span!("opendir", ino = ino.0);
        match self.volume.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(log_err("opendir", &e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        span!("readdir", ino = ino.0);
        let result = self.volume.readdir(ino.0, fh.0, offset, |next, e| {
            reply.add(INodeNo(e.ino), next, dt_type(e.kind), &e.name)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(log_err("readdir", &e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.volume.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty("fsyncdir", reply, self.volume.fsyncdir(ino.0, datasync));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.volume.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namelen as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(log_err("statfs", &e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        span!("setxattr", ino = ino.0, name = ?name);
        let set = self.volume.setxattr(ino.0, name, value, flags, caller(req));
        if set.is_ok() {
            self.acl_changed(ino, name);
        }
        reply_empty("setxattr", reply, set);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let mut buf = vec![0u8; size as usize];
        match self.volume.getxattr(ino.0, name, &mut buf) {
            Ok(n) if size == 0 => reply.size(n as u32),
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(reply_errno(&e)),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if req.uid() != 0 {
            // The daemon lists as root; a caller without privilege is not shown the
            // `trusted.` names, as the kernel hides them from it natively.
            let names = match self.unprivileged_xattr_names(ino.0) {
                Ok(names) => names,
                Err(e) => return reply.error(reply_errno(&e)),
            };
            return match size {
                0 => reply.size(names.len() as u32),
                n if (n as usize) < names.len() => reply.error(Errno::ERANGE),
                _ => reply.data(&names),
            };
        }
        let mut buf = vec![0u8; size as usize];
        match self.volume.listxattr(ino.0, &mut buf) {
            Ok(n) if size == 0 => reply.size(n as u32),
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(reply_errno(&e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        span!("removexattr", ino = ino.0, name = ?name);
        let removed = self.volume.removexattr(ino.0, name);
        if removed.is_ok() {
            self.acl_changed(ino, name);
        }
        reply_empty("removexattr", reply, removed);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Only reached without default_permissions; the kernel checks permissions.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        span!("create", parent = parent.0, name = ?name);
        let created = self
            .volume
            .create(parent.0, name, mode, umask, flags, caller(req));
        let (attr, fh, file) = match created {
            Ok(x) => x,
            Err(e) => return reply.error(log_err("create", &e)),
        };
        let fattr = file_attr(&attr);
        if self.volume.passthrough() {
            match self.backing_for(fh, &file, |fd| reply.open_backing(fd)) {
                Ok(id) => {
                    return reply.created_passthrough(
                        &TTL,
                        &fattr,
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::empty(),
                        &id,
                    )
                }
                Err(e) => self.passthrough_failed(&e),
            }
        }
        reply.created(
            &TTL,
            &fattr,
            Generation(0),
            FileHandle(fh),
            FopenFlags::FOPEN_KEEP_CACHE,
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            "fallocate",
            reply,
            self.volume.fallocate(fh.0, offset, length, mode),
        );
    }

    /// No ioctls: ENOTTY, which is what `isatty()` (every Python `open()`) expects,
    /// answered quietly (fuser's default logs a warning per call).
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.volume.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(log_err("lseek", &e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(t: SystemTime) -> (i128, u32) {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => (i128::from(d.as_secs()), d.subsec_nanos()),
            Err(e) => {
                let d = e.duration();
                match d.subsec_nanos() {
                    0 => (-i128::from(d.as_secs()), 0),
                    n => (-i128::from(d.as_secs()) - 1, 1_000_000_000 - n),
                }
            }
        }
    }

    #[test]
    fn stat_times_convert_over_the_whole_64_bit_range() {
        for (sec, nsec) in [
            (0, 0),
            (1, 5),
            (-1, 500_000_000),
            (i64::MAX, 999_999_999),
            (i64::MIN, 0),
            (i64::MIN, 999_999_999),
            (i64::MIN + 1, 1),
        ] {
            assert_eq!(
                parts(time(sec, nsec)),
                (i128::from(sec), nsec as u32),
                "{sec}.{nsec}"
            );
        }
    }
}
