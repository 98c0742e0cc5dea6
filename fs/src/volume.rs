//! The volume core: every filesystem operation, served relative to the directory fd
//! opened before the mount, returning plain structs and `fs::Error`. No fuser types
//! here, so the core can be driven by tests without a kernel.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::SystemTime;

use crate::change::{AttrChange, Change, ChangeKind, ChangeSink, FileId};
use crate::error::{Error, Result};
use crate::inode::{Key, Table, ROOT};
use crate::sys::{self, At, Stat};

/// `FUSE_SUPER_MAGIC`: the directory is already a FUSE mount (twinfs running twice).
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// Names starting with this are twinfs's own (the standby's temp files while it applies
/// a change): invisible through the mount and not creatable by its users.
pub const RESERVED_PREFIX: &[u8] = b".twinfs-";

/// Whether `name` is reserved for twinfs.
pub fn is_reserved(name: &OsStr) -> bool {
    name.as_bytes().starts_with(RESERVED_PREFIX)
}

/// Refuses a user's attempt to create a reserved name.
fn check_name(name: &OsStr) -> Result<()> {
    if is_reserved(name) {
        Err(Error::from_errno(libc::EPERM))
    } else {
        Ok(())
    }
}

/// A reserved name does not exist as far as the mount's users can tell.
fn check_exists(name: &OsStr) -> Result<()> {
    if is_reserved(name) {
        Err(enoent())
    } else {
        Ok(())
    }
}

/// A volume's role: the active node takes local writes, a standby refuses them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Local processes may write; every change is recorded.
    Active,
    /// Local processes may only read: every write-type operation fails with `EROFS`,
    /// but for the upstream paths of [`Volume::with_upstream`] while they are open.
    Standby,
}

impl Role {
    /// "active" or "standby".
    pub fn name(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Standby => "standby",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Attributes of one inode, with the FUSE inode number.
#[derive(Clone, Copy)]
pub struct Attr {
    /// FUSE inode number.
    pub ino: u64,
    /// The backing file's `stat`.
    pub st: Stat,
}

/// The process on whose behalf a node is created: it becomes the owner.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
    /// Id of the calling thread, where its supplementary groups can be read; 0 if the
    /// kernel could not tell it (a caller in another pid namespace).
    pub pid: u32,
}

impl Caller {
    /// Whether the caller is in group `gid`: its effective group or one of its
    /// supplementary groups, which are read (from `/proc`) only if the effective group
    /// is not `gid`. A caller `/proc` does not show (pid 0, a thread gone since) is
    /// not known to be in the group, so it is not.
    fn in_group(&self, gid: u32) -> bool {
        if gid == self.gid {
            return true;
        }
        if self.pid == 0 {
            return false;
        }
        match sys::supplementary_groups(self.pid) {
            Ok(groups) => groups.contains(&gid),
            Err(e) => {
                tracing::debug!(pid = self.pid, error = %e, "caller's groups unknown");
                false
            }
        }
    }
}

/// A time to set with `setattr`.
#[derive(Clone, Copy, Debug)]
pub enum SetTime {
    /// The current time.
    Now,
    /// A given time.
    At(SystemTime),
}

/// The attributes a `setattr` changes; `None` leaves one as it is.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    /// New permission bits (with file type bits masked off by the volume).
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size.
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<SetTime>,
    /// New modification time.
    pub mtime: Option<SetTime>,
    /// The open file the change came through (`ftruncate`, `futimens`), if any.
    pub fh: Option<u64>,
}

/// A file opened through the volume.
pub struct OpenFile {
    /// FUSE inode number.
    pub ino: u64,
    /// The backing file, looked up at the first change through this handle (not at
    /// the open, which most handles never write through).
    key: std::sync::OnceLock<Key>,
    /// Our own fd of the backing file (also registered for passthrough).
    pub fd: OwnedFd,
    /// Opened for writing (or with `O_TRUNC`): its close is a change.
    pub writable: bool,
    /// Standby: the path an upstream file was opened for writing at (see
    /// [`Volume::with_rescue`]); `None` on an active.
    standby_path: Option<PathBuf>,
    /// Changes of the file's bytes made through twinfs (writes, truncations,
    /// `fallocate`), counted for every handle of the inode together: a shared
    /// mapping's pages may be written back through another handle than its own.
    changes: Arc<AtomicU64>,
    /// What the file looked like when this handle was last recorded; `None` until
    /// the first record. Tells a close after writing from a second close of a dup'd
    /// fd.
    recorded: Mutex<Option<Seen>>,
    /// Written through (or truncated by its open, or made by it). A handle opened for
    /// writing that has written nothing when another handle's change of its file is
    /// recorded has nothing of its own under way: see [`Volume::settle_idle`].
    wrote: AtomicBool,
    /// The last write through this handle looked like the first part of one the
    /// kernel split (see [`Volume::write`]): the rest is on its way.
    split: AtomicBool,
}

/// What a handle's record saw of its file. The count of changes made through twinfs
/// is what tells: size and mtime can stay the same across a same-size rewrite, as
/// the mtime moves only once per clock tick on many filesystems (ext4 before Linux
/// 6.13: about 4 ms). Size and mtime still count for the writes twinfs does not see
/// (FUSE passthrough).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    changes: u64,
    size: i64,
    mtime: (i64, i64),
}

impl OpenFile {
    /// The backing file. (An fstat of an open fd does not fail; if it did, the
    /// changes through this handle would be recorded for no file, and its file read
    /// whole.)
    fn key(&self) -> Key {
        *self.key.get_or_init(|| {
            sys::fstat(self.fd.as_fd())
                .map(|st| (st.st_dev, st.st_ino))
                .unwrap_or((0, 0))
        })
    }

    /// Whether our fd of the file was opened with write access.
    fn fd_writable(&self) -> bool {
        // SAFETY: F_GETFL on a valid fd has no side effect.
        let flags =
            unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&self.fd), libc::F_GETFL) };
        flags >= 0 && flags & libc::O_ACCMODE != libc::O_RDONLY
    }

    /// Whether the file's content may have changed since this handle was last
    /// recorded; if so, remembers its current state as recorded. Not the ctime: a
    /// chmod, an xattr or a link changes it, and those are recorded by their own
    /// operations (a late release would record the file a second time). A write sets
    /// the mtime and the ctime to the same time, so the ctime would tell nothing more.
    ///
    /// The count is read before the record is made, and each change counted after it
    /// was made: a change counted later is one the record may not have seen.
    fn take_change(&self) -> Result<bool> {
        let changes = self.changes.load(Ordering::Acquire);
        let st = sys::fstat(self.fd.as_fd())?;
        let seen = Seen {
            changes,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
        };
        let mut recorded = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        if *recorded == Some(seen) {
            return Ok(false);
        }
        *recorded = Some(seen);
        Ok(true)
    }

    /// Counts a change of the file's bytes made through twinfs; call once it is made
    /// (or failed part way).
    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
    }
}

/// One entry of a directory listing.
pub struct DirEntry {
    /// Inode number to show (the FUSE number if known, else the backing one).
    pub ino: u64,
    /// `DT_*` type.
    pub kind: u8,
    /// Name.
    pub name: OsString,
}

/// Counters for status.
#[derive(Clone, Copy, Debug, Default)]
pub struct VolumeStats {
    /// Inodes the kernel holds.
    pub inodes: usize,
    /// Files open.
    pub open_files: usize,
    /// Of which opened for writing.
    pub open_for_write: usize,
}

/// Says whether a local user may write a path (relative to the volume root) while the
/// volume is a standby: the upstream exceptions of the replicator's rules. Called on a
/// standby only, with every path an operation changes.
pub type UpstreamFilter = Arc<dyn Fn(&Path) -> bool + Send + Sync>;

/// Keeps what a local writer on a standby wrote to an upstream file that the active's
/// version replaced while it was open (its fd is of a file no longer in the volume):
/// called at its close with the path it was opened at and the fd of what it wrote.
pub type Rescue = Arc<dyn Fn(&Path, BorrowedFd<'_>) + Send + Sync>;

/// One in-place volume: the directory fd it serves and the state of its inodes and
/// open files.
pub struct Volume {
    path: PathBuf,
    root: Arc<OwnedFd>,
    table: RwLock<Table>,
    files: RwLock<HashMap<u64, Arc<OpenFile>>>,
    /// Open directories: their listing, and whether it is the one `opendir` read and
    /// no `readdir` has started on yet (the first read at offset 0 takes it; a later
    /// one is a rewind and lists again).
    dirs: Mutex<HashMap<u64, (Vec<DirEntry>, bool)>>,
    next_fh: AtomicU64,
    role: AtomicU8,
    /// Numbers the role switches as they begin: one that a later switch overtook
    /// while it waited for [`Volume::writing`] leaves the role alone.
    switches: AtomicU64,
    /// Write-type operations begun in the active role and still under way.
    active_writes: AtomicU64,
    /// The number of the switch that stored the role last: an older one that ends
    /// later does not store it.
    stored_switch: Mutex<u64>,
    /// Held shared by each write-type operation while it runs, and exclusively by a
    /// role switch: once [`Volume::set_role`] to standby returns, no local write is in
    /// progress, and none starts.
    writing: RwLock<()>,
    passthrough: AtomicBool,
    sink: Arc<dyn ChangeSink>,
    /// Standby: the paths local users may still write, and whether that is allowed
    /// now (only while a session with the active can ship such writes upstream).
    upstream: Option<UpstreamFilter>,
    upstream_open: AtomicBool,
    rescue: Option<Rescue>,
    /// Standby: new versions the replicator has written to temp files beside their
    /// names but not yet made durable and renamed into place, by (parent directory's
    /// backing key, name) → temp name. Lookups and opens of such a name get the temp
    /// file, so readers see a version as soon as it is whole, not after its fsync.
    /// Several versions of one name can be staged at once (oldest first): the kernel
    /// may still hold an earlier one, which stays itself.
    staged: RwLock<StagedVersions>,
    /// Whether `staged` holds anything (lookups skip its lock when it does not).
    any_staged: AtomicBool,
    /// Standby: backing files the replicator is updating in place (see
    /// [`Volume::begin_patch`]); an open of one waits on `patched` until it is done.
    patching: Mutex<std::collections::HashSet<Key>>,
    patched: std::sync::Condvar,
    /// How many opens are waiting on `patched` now.
    held_opens: std::sync::atomic::AtomicUsize,
    /// What was written to the files the replicator watches (see [`crate::written`]).
    written: crate::written::Written,
    /// Renames begun through the mount, and those that ended without a change record
    /// (failed, or of a name no longer known): see [`Volume::renames_begun`].
    renames_begun: AtomicU64,
    /// Held from the moment a change record's path is read from the table until the
    /// record is out, and by a rename from the moment it reads its source's path until
    /// its record is out (its change of the table included): the records leave in an
    /// order in which each names the paths as the records before it left them. (A
    /// rename inside a directory that raced a rename of the directory could otherwise
    /// be recorded from the old path to the new one, which no order replays.)
    emitting: Mutex<()>,
    renames_unrecorded: AtomicU64,
    /// Standby: local writes of upstream paths and the replicator's applies take
    /// turns (see [`crate::turn`]).
    turns: Arc<crate::turn::Turns>,
}

/// Held by a local write while it runs (see [`Volume::active_write`]): a role switch
/// waits for it, and on a standby an apply of the active's changes too.
pub struct Writing<'a> {
    // Dropped first: a wait for the standbys deferred by the turn runs still holding
    // off a role switch, as a record made outside a turn does.
    _turn: Option<crate::turn::WriteTurn<'a>>,
    _active: Option<ActiveWrite<'a>>,
    _writing: RwLockReadGuard<'a, ()>,
}

/// Counts a write-type operation begun in the active role while it runs (see
/// [`Volume::wait_for_writes`]).
struct ActiveWrite<'a>(&'a AtomicU64);

impl Drop for ActiveWrite<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts a rename as ended without a record when dropped, unless it was recorded.
struct RenameTicket<'a> {
    unrecorded: &'a AtomicU64,
    recorded: bool,
}

impl Drop for RenameTicket<'_> {
    fn drop(&mut self) {
        if !self.recorded {
            self.unrecorded.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// An in-place update of one backing file under way ([`Volume::begin_patch`]): opens
/// of the file wait until this is dropped.
pub struct PatchGuard<'a> {
    volume: &'a Volume,
    key: Key,
}

impl PatchGuard<'_> {
    /// How many opens are being held back now (by this update or another one).
    pub fn held_opens(&self) -> usize {
        self.volume.held_opens.load(Ordering::Acquire)
    }
}

impl Drop for PatchGuard<'_> {
    fn drop(&mut self) {
        let mut patching = self
            .volume
            .patching
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        patching.remove(&self.key);
        self.volume.patched.notify_all();
    }
}

/// Staged versions per (parent directory's backing key, name): (temp name, the temp
/// file's backing key), oldest first.
type StagedVersions = HashMap<(Key, OsString), Vec<(OsString, Key)>>;

/// How long a switch to standby waits for the rest of a split `write()` (the kernel
/// sends it as soon as the first part is answered).
const SPLIT_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    })
}

fn enoent() -> Error {
    Error::from_errno(libc::ENOENT)
}

/// How many times [`Volume::at_node`] finds a file before it gives up.
const RELOCATE_ATTEMPTS: u32 = 3;

/// Where an inode lives: its own fd (directories) or a name in its parent's fd.
/// `unstaged` is the real name when `name` is a staged temp file (see
/// [`Volume::show_staged`]), for a retry if the temp file was renamed meanwhile.
struct Location {
    dir: Arc<OwnedFd>,
    name: Option<OsString>,
    unstaged: Option<OsString>,
    /// The backing file the inode is.
    key: Key,
}

impl Location {
    fn at(&self) -> At<'_> {
        match &self.name {
            Some(name) => At::Entry(self.dir.as_fd(), name),
            None => At::Fd(self.dir.as_fd()),
        }
    }

    /// Runs `op` on the entry; if it was a staged temp file that has gone since it
    /// was located (renamed into place, or dropped), runs it again on the real name,
    /// which then holds the newest version.
    fn retry<T>(&self, mut op: impl FnMut(At<'_>) -> std::io::Result<T>) -> std::io::Result<T> {
        match (op(self.at()), &self.unstaged) {
            (Err(e), Some(real)) if e.raw_os_error() == Some(libc::ENOENT) => {
                op(At::Entry(self.dir.as_fd(), real))
            }
            (result, _) => result,
        }
    }
}

fn timespec(t: Option<SetTime>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(SetTime::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(SetTime::At(t)) => {
            let (sec, nsec) = match t.duration_since(SystemTime::UNIX_EPOCH) {
                Ok(d) => match i64::try_from(d.as_secs()) {
                    Ok(sec) => (sec, i64::from(d.subsec_nanos())),
                    Err(_) => (i64::MAX, 999_999_999),
                },
                Err(e) => {
                    // Before 1970: negative seconds, positive nanoseconds. The lowest
                    // second, i64::MIN, is 2^63 before the epoch, which no i64 negates.
                    let d = e.duration();
                    let sec = 0i64.checked_sub_unsigned(d.as_secs());
                    match (sec, d.subsec_nanos()) {
                        (Some(sec), 0) => (sec, 0),
                        (Some(sec), n) => match sec.checked_sub(1) {
                            Some(sec) => (sec, 1_000_000_000 - i64::from(n)),
                            None => (i64::MIN, 0),
                        },
                        (None, _) => (i64::MIN, 0),
                    }
                }
            };
            libc::timespec {
                tv_sec: sec,
                tv_nsec: nsec,
            }
        }
    }
}

impl Volume {
    /// Opens the directory `path` (before anything is mounted on it) as a volume.
    /// Refuses a directory that is already a FUSE mount.
    pub fn new(path: &Path, role: Role, sink: Arc<dyn ChangeSink>) -> Result<Volume> {
        let root = sys::open_dir_path(path)?;
        let fs = sys::fstatfs(root.as_fd())?;
        if fs.f_type as i64 == FUSE_SUPER_MAGIC {
            return Err(Error::from_errno(libc::EBUSY));
        }
        let st = sys::fstat(root.as_fd())?;
        let root = Arc::new(root);
        let table = Table::new(root.clone(), (st.st_dev, st.st_ino));
        Ok(Volume {
            path: path.to_owned(),
            root,
            table: RwLock::new(table),
            files: RwLock::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            renames_begun: AtomicU64::new(0),
            emitting: Mutex::new(()),
            renames_unrecorded: AtomicU64::new(0),
            role: AtomicU8::new(role as u8),
            switches: AtomicU64::new(0),
            active_writes: AtomicU64::new(0),
            stored_switch: Mutex::new(0),
            writing: RwLock::new(()),
            passthrough: AtomicBool::new(false),
            sink,
            upstream: None,
            upstream_open: AtomicBool::new(false),
            rescue: None,
            staged: RwLock::new(HashMap::new()),
            any_staged: AtomicBool::new(false),
            patching: Mutex::new(std::collections::HashSet::new()),
            patched: std::sync::Condvar::new(),
            held_opens: std::sync::atomic::AtomicUsize::new(0),
            written: crate::written::Written::default(),
            turns: Arc::default(),
        })
    }

    /// Standby: the turns local writes of upstream paths take with the replicator's
    /// applies (see [`crate::turn`]).
    pub fn turns(&self) -> Arc<crate::turn::Turns> {
        self.turns.clone()
    }

    /// Lets local users write the paths `filter` accepts while this volume is a
    /// standby, once [`Volume::set_upstream_open`] says their writes can be shipped.
    pub fn with_upstream(mut self, filter: UpstreamFilter) -> Volume {
        self.upstream = Some(filter);
        self
    }

    /// Standby: where an upstream file's local writer's content goes when the
    /// active's version replaced the file while it was open for writing, so nothing
    /// written on the standby is lost without a trace.
    pub fn with_rescue(mut self, rescue: Rescue) -> Volume {
        self.rescue = Some(rescue);
        self
    }

    /// Standby: whether the upstream paths take local writes now. Closing waits for
    /// the writes under way, so every write allowed before has been recorded when it
    /// returns.
    pub fn set_upstream_open(&self, open: bool) {
        if open {
            self.upstream_open.store(true, Ordering::Release);
        } else {
            let _quiet = self.writing.write().unwrap_or_else(|e| e.into_inner());
            self.upstream_open.store(false, Ordering::Release);
        }
    }

    /// Standby: whether the upstream paths take local writes now.
    pub fn upstream_open(&self) -> bool {
        self.upstream_open.load(Ordering::Acquire)
    }

    /// Records a change made to the volume's directory behind the mount (the active
    /// applying a standby's upstream write), so that it is shipped like a local one.
    pub fn note_change(&self, change: Change) {
        self.emit(self.emitting(), change.path, change.kind, change.file);
    }

    /// Whether local writes are allowed and the role is active, for a change made
    /// behind the mount that must be shipped like a local write; the guard keeps the
    /// role from switching until it is recorded.
    pub fn active_write(&self) -> Result<Writing<'_>> {
        self.writable_for(|| [None])
    }

    /// The directory this volume serves.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The fd of the underlying directory (not the mount on top of it).
    pub fn root_fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// The current role.
    pub fn role(&self) -> Role {
        if self.role.load(Ordering::Acquire) == Role::Standby as u8 {
            Role::Standby
        } else {
            Role::Active
        }
    }

    /// Switches the role without remounting, once the write-type operations under
    /// way have finished (they are short; a sync write waits at most its timeout).
    /// Open handles stay open; through FUSE (not passthrough) their writes get EROFS
    /// from then on.
    ///
    /// Switching to standby records a change for each file open for writing that was
    /// written since its last record: its writer can write no more, and what it
    /// wrote while this node was active must be shipped without waiting for a close.
    pub fn set_role(&self, role: Role) {
        self.finish_switch(role, self.begin_switch());
    }

    /// The number of a role switch that begins now (carried out by
    /// [`Volume::finish_switch`]): of two switches, the one begun later decides the
    /// role, whichever ends last.
    pub fn begin_switch(&self) -> u64 {
        self.switches.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// [`Volume::set_role`], waiting at most `wait` for the write-type operations under
    /// way: one stuck on a disk that no longer answers must not keep a node active (or
    /// keep it from taking writes). Past `wait` the role is switched at once (the
    /// writes under way finish in the old role, and a local write that starts meanwhile
    /// waits for them), and the rest of the switch is done once they have finished.
    /// Whether it was done within `wait`.
    pub fn set_role_within(self: &Arc<Self>, role: Role, wait: std::time::Duration) -> bool {
        let switch = self.begin_switch();
        let (done, finished) = std::sync::mpsc::channel();
        let volume = self.clone();
        let spawned = std::thread::Builder::new()
            .name("twinfs-role".into())
            .spawn(move || {
                volume.finish_switch(role, switch);
                let _ = done.send(());
            });
        if spawned.is_err() {
            self.finish_switch(role, switch);
            return true;
        }
        if finished.recv_timeout(wait).is_ok() {
            return true;
        }
        self.store_role_if_latest(role, switch);
        false
    }

    /// Stores `role` for switch number `switch`, unless a later switch stored it.
    fn store_role_if_latest(&self, role: Role, switch: u64) {
        let mut stored = self.stored_switch.lock().unwrap_or_else(|e| e.into_inner());
        if switch >= *stored {
            self.role.store(role as u8, Ordering::Release);
            *stored = switch;
        }
    }

    /// Waits until the write-type operations begun while this node was active have
    /// finished: a standby keeping its own version of a file takes it once a local
    /// write still under way from its time as the active (stuck on a disk that did not
    /// answer when it stepped down) has ended. (Not the writes of a standby's upstream
    /// paths: one may wait for the caller's turn.)
    pub fn wait_for_writes(&self) {
        while self.active_writes.load(Ordering::Acquire) > 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Carries out switch number `switch` ([`Volume::begin_switch`]) as
    /// [`Volume::set_role`] does: stores the role unless a later switch stored it.
    pub fn finish_switch(&self, role: Role, switch: u64) {
        let _quiet = self.quiet_for_switch(role);
        self.store_role_if_latest(role, switch);
        // (Also when overtaken: what was written before it is recorded all the same,
        // and a later switch to active makes no harm of it.)
        if role == Role::Standby {
            // A standby's files are written by the replicator, beside the mount: a
            // record kept now would miss those writes. (Only an active node watches,
            // and it may do so while its writes are still held back, as at its start.)
            self.written.forget_all();
            let open: Vec<Arc<OpenFile>> = self.read_files().values().cloned().collect();
            for file in &open {
                file.split.store(false, Ordering::Release);
            }
            for file in open.iter().filter(|f| f.writable) {
                if file.take_change().unwrap_or(true) {
                    self.record_write(file);
                }
            }
        }
    }

    /// The lock that keeps write-type operations out while the role switches. To
    /// standby, it waits (at most [`SPLIT_WAIT`]) while a handle's last write may be
    /// the first half of a `write()` the kernel split at a page boundary: refusing the
    /// second half would leave part of one `write()` in the file (a short write, then
    /// EROFS), and that part would be shipped.
    fn quiet_for_switch(&self, role: Role) -> RwLockWriteGuard<'_, ()> {
        let deadline = std::time::Instant::now() + SPLIT_WAIT;
        loop {
            let quiet = self.writing.write().unwrap_or_else(|e| e.into_inner());
            // (Only from active: once writes are refused, no second part comes.)
            let split = role == Role::Standby
                && self.role() == Role::Active
                && self
                    .read_files()
                    .values()
                    .any(|f| f.writable && f.split.load(Ordering::Acquire));
            if !split || std::time::Instant::now() >= deadline {
                return quiet;
            }
            drop(quiet);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Whether open files are served by FUSE passthrough.
    pub fn passthrough(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// Records whether the kernel accepted passthrough.
    pub fn set_passthrough(&self, on: bool) {
        self.passthrough.store(on, Ordering::Relaxed);
    }

    /// Replicator: what was written through the mount to the backing file `key` since
    /// the last call for it, `None` if there was none (see [`crate::written`]).
    /// Starts a new record. With FUSE passthrough (only volumes without peers use
    /// it) twinfs does not see writes: every record is spoiled.
    pub fn take_written(&self, key: Key) -> Option<crate::written::Record> {
        self.written.take(key, self.passthrough())
    }

    /// Replicator: stops watching `key`, whose file it is about to change itself.
    pub fn forget_written(&self, key: Key) {
        self.written.forget(key);
    }

    /// Counters for status.
    pub fn stats(&self) -> VolumeStats {
        let files = self.read_files();
        VolumeStats {
            inodes: self.read_table().len(),
            open_files: files.len(),
            open_for_write: files.values().filter(|f| f.writable).count(),
        }
    }

    fn read_table(&self) -> RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_table(&self) -> RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read_files(&self) -> RwLockReadGuard<'_, HashMap<u64, Arc<OpenFile>>> {
        self.files.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a local write changing `paths` is allowed; the guard keeps the role
    /// from switching until the write is done. On the active, the paths are never
    /// computed; on a standby, every one must be known and an upstream path.
    fn writable_for<const N: usize>(
        &self,
        paths: impl FnOnce() -> [Option<PathBuf>; N],
    ) -> Result<Writing<'_>> {
        let guard = self.writing.read().unwrap_or_else(|e| e.into_inner());
        match self.role() {
            Role::Active => {
                self.active_writes.fetch_add(1, Ordering::AcqRel);
                Ok(Writing {
                    _turn: None,
                    _active: Some(ActiveWrite(&self.active_writes)),
                    _writing: guard,
                })
            }
            Role::Standby => {
                let allowed = self.upstream_open.load(Ordering::Acquire)
                    && self.upstream.as_ref().is_some_and(|upstream| {
                        paths()
                            .iter()
                            .all(|p| p.as_deref().is_some_and(|p| upstream(p)))
                    });
                if allowed {
                    // A write of an upstream path and its record: not in the middle
                    // of an apply of the active's changes.
                    Ok(Writing {
                        _turn: Some(self.turns.write()),
                        _active: None,
                        _writing: guard,
                    })
                } else {
                    Err(Error::ReadOnly)
                }
            }
        }
    }

    /// The path of `name` in the directory `parent`, if the directory has a name.
    fn entry_path(&self, parent: u64, name: &OsStr) -> Option<PathBuf> {
        self.path_of(parent).map(|p| p.join(name))
    }

    /// Held while a close, fsync or release records what a handle wrote (allowed in
    /// either role): a switch to standby waits for it, so every change made while
    /// active is recorded before the switch returns (a handover ships up to there).
    fn recording(&self) -> RwLockReadGuard<'_, ()> {
        self.writing.read().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, ino: u64, kind: ChangeKind) {
        self.record_of(ino, kind, None);
    }

    /// A write through `file`: recorded as [`Volume::record`] does, its link count
    /// taken from the handle's fd.
    fn record_write(&self, file: &OpenFile) {
        self.record_of(file.ino, ChangeKind::Write, Some(file.fd.as_fd()));
    }

    /// Records `kind` for `ino`; `open` is an fd of its backing file, if one is at hand.
    fn record_of(&self, ino: u64, kind: ChangeKind, open: Option<BorrowedFd<'_>>) {
        self.settle_idle(ino);
        let order = self.emitting();
        let (path, file) = {
            let table = self.read_table();
            let file = table.get(ino).map(|n| (n.key, n.kind, n.links.len()));
            (table.path(ino), file)
        };
        let Some(path) = path else {
            return;
        };
        let created = matches!(kind, ChangeKind::Create);
        let file = file.map(|(key, mode, known)| FileId {
            key,
            // Names the kernel knows, else the backing file's link count (a file just
            // created has one).
            linked: mode == libc::S_IFREG
                && !created
                && (known > 1
                    || match open {
                        Some(fd) => sys::fstat(fd).ok(),
                        None => self.locate(ino).ok().and_then(|l| l.at().stat().ok()),
                    }
                    .is_some_and(|st| st.st_nlink > 1)),
        });
        self.emit(order, path, kind, file);
    }

    /// Records a change to the entry `name` of `parent`; false if the directory's
    /// path is no longer known (then nothing is recorded).
    fn record_entry(&self, parent: u64, name: &OsStr, kind: ChangeKind) -> bool {
        let order = self.emitting();
        let path = self.read_table().path(parent);
        if let Some(path) = &path {
            self.emit(order, path.join(name), kind, None);
        }
        path.is_some()
    }

    /// The order of change records ([`Volume::emitting`]); taken before the table.
    fn emitting(&self) -> std::sync::MutexGuard<'_, ()> {
        self.emitting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands a record to the sink, in `order`; a writer's wait for it (the standbys of
    /// a `sync` path) comes after the order is released.
    fn emit(
        &self,
        order: std::sync::MutexGuard<'_, ()>,
        path: PathBuf,
        kind: ChangeKind,
        file: Option<FileId>,
    ) {
        tracing::trace!(path = %path.display(), kind = kind.name(), "change");
        let wait = self.sink.record_later(Change { path, kind, file });
        drop(order);
        if let Some(wait) = wait {
            crate::turn::after_turn(wait);
        }
    }

    /// The relative path of an inode, if it still has a name.
    pub fn path_of(&self, ino: u64) -> Option<PathBuf> {
        self.read_table().path(ino)
    }

    /// The inode of a relative path, if the kernel currently holds every component.
    pub fn ino_of(&self, path: &Path) -> Option<(u64, u64)> {
        let table = self.read_table();
        let mut parent = ROOT;
        let mut ino = ROOT;
        for part in path.components() {
            parent = ino;
            ino = table.entry(parent, part.as_os_str())?;
        }
        Some((parent, ino))
    }

    /// The inode the kernel knows as `name` in `parent`, if any, and whether that name
    /// now names another file (or none) after the directory changed underneath (the
    /// standby's apply). A name still naming the same backing inode (only its
    /// attributes changed) is not stale, so its path stays known (a standby's upstream
    /// writes need it).
    pub fn entry_state(&self, parent: u64, name: &OsStr) -> Option<(u64, bool)> {
        let (ino, key) = {
            let table = self.read_table();
            let ino = table.entry(parent, name)?;
            (ino, table.get(ino)?.key)
        };
        Some((ino, !self.names_key(parent, name, key)))
    }

    /// Forgets the stale name `name` of `ino` in `parent` (see [`Volume::entry_state`]),
    /// unless a lookup since found it naming `ino`'s file after all; the next lookup
    /// sees the new file. Called after the kernel was told to forget it, so that an
    /// operation it sent on the old entry before that still finds the name.
    pub fn drop_stale_entry(&self, parent: u64, name: &OsStr, ino: u64) {
        let key = {
            let table = self.read_table();
            match (table.entry(parent, name), table.get(ino)) {
                (Some(known), Some(node)) if known == ino => node.key,
                _ => return,
            }
        };
        if self.names_key(parent, name, key) {
            return;
        }
        let mut table = self.write_table();
        if table.entry(parent, name) == Some(ino) {
            table.drop_link(parent, name);
        }
    }

    /// Whether `name` in `parent` is the backing file `key` now.
    fn names_key(&self, parent: u64, name: &OsStr, key: Key) -> bool {
        self.dir_fd(parent).is_ok_and(|dir| {
            self.stat_entry(parent, &dir, name)
                .is_ok_and(|st| (st.st_dev, st.st_ino) == key)
        })
    }

    fn dir_fd(&self, ino: u64) -> Result<Arc<OwnedFd>> {
        let table = self.read_table();
        let node = table.get(ino).ok_or(Error::Stale("inode"))?;
        match &node.dir {
            Some(fd) => Ok(fd.clone()),
            None => Err(Error::from_errno(libc::ENOTDIR)),
        }
    }

    fn locate(&self, ino: u64) -> Result<Location> {
        let table = self.read_table();
        let node = table.get(ino).ok_or(Error::Stale("inode"))?;
        if let Some(fd) = &node.dir {
            return Ok(Location {
                dir: fd.clone(),
                name: None,
                unstaged: None,
                key: node.key,
            });
        }
        let Some((parent, name)) = table.link(ino) else {
            return match &node.kept {
                Some(fd) => Ok(Location {
                    dir: fd.clone(),
                    name: None,
                    unstaged: None,
                    key: node.key,
                }),
                // Its name now holds another file (the replicator put a new version
                // there): ESTALE makes the kernel look the name up again, so an open
                // that raced with the new version gets it rather than failing.
                None => Err(Error::Stale("name")),
            };
        };
        let parent = table.get(*parent).ok_or(Error::Stale("parent"))?;
        let dir = parent.dir.clone().ok_or(Error::Stale("parent"))?;
        // Only the inode that is the staged file itself: an older one the kernel still
        // holds under the same name must not be served another file's content.
        let staged = self.staged_version(parent.key, name, node.key);
        Ok(match staged {
            Some((temp, _)) => Location {
                dir,
                name: Some(temp),
                unstaged: Some(name.clone()),
                key: node.key,
            },
            None => Location {
                dir,
                name: Some(name.clone()),
                unstaged: None,
                key: node.key,
            },
        })
    }

    /// Runs `op` on the backing file of `ino` where [`Volume::locate`] finds it, and
    /// checks with `key_of` that `op` reached that file: a rename over its name (by
    /// another process through the mount, or the replicator's new version on a
    /// standby) may come between finding the name and `op`, which then reached
    /// another file (an open would write it unrecorded, a reader of a file of another
    /// size would get a mix). Finds it again a few times (a rename through the mount
    /// tells the table just after it renamed: the file is then reached through the fd
    /// kept of it); past that its name holds another file: ESTALE, on which the
    /// kernel looks the name up again. (A file renamed away in that moment gives
    /// ENOENT, as an open that came a moment later would natively.)
    fn at_node<T>(
        &self,
        ino: u64,
        mut op: impl FnMut(At<'_>) -> std::io::Result<T>,
        key_of: impl Fn(&T) -> std::io::Result<Key>,
    ) -> Result<(Location, T)> {
        for attempt in 0..RELOCATE_ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            let loc = self.locate(ino)?;
            let reached = loc.retry(&mut op)?;
            if key_of(&reached)? == loc.key {
                return Ok((loc, reached));
            }
        }
        Err(Error::Stale("renamed over"))
    }

    /// Standby: serves `name` in the directory whose backing key is `dir` from `temp`,
    /// a whole new version the replicator wrote beside it and will make durable and
    /// rename into place (then [`Volume::unshow_staged`]). Lookups and opens get the
    /// new version at once; the file on disk changes only by the rename, so a crash
    /// still leaves the old or the new version whole. Returns false, and shows
    /// nothing, for a path local users may write (an upstream path) and on an active
    /// volume: their names change only by the rename.
    pub fn show_staged(
        &self,
        dir: Key,
        name: &OsStr,
        temp: &OsStr,
        temp_key: Key,
        path: &Path,
    ) -> bool {
        if self.role() != Role::Standby || self.upstream.as_ref().is_some_and(|u| u(path)) {
            return false;
        }
        let mut staged = self.staged.write().unwrap_or_else(|e| e.into_inner());
        staged
            .entry((dir, name.to_owned()))
            .or_default()
            .push((temp.to_owned(), temp_key));
        self.any_staged.store(true, Ordering::Release);
        true
    }

    /// Stops serving `name` from `temp` (renamed into place, or given up). A later
    /// version staged for the same name meanwhile stays shown.
    pub fn unshow_staged(&self, dir: Key, name: &OsStr, temp: &OsStr) {
        let mut staged = self.staged.write().unwrap_or_else(|e| e.into_inner());
        let key = (dir, name.to_owned());
        if let Some(versions) = staged.get_mut(&key) {
            versions.retain(|(t, _)| t != temp);
            if versions.is_empty() {
                staged.remove(&key);
            }
        }
        if staged.is_empty() {
            self.any_staged.store(false, Ordering::Release);
        }
    }

    /// Standby: lets the replicator update the backing file `key` in place, which no
    /// one may read meanwhile. New opens of the file wait from now on; handles already
    /// open are given up to `wait` to close. `None` if the volume is not a standby or a
    /// handle is still open then (its reader would see the change happen): the
    /// replicator then writes a new version beside the file and renames it over, as
    /// for any other file. Drop the guard only once the kernel has been told to forget
    /// what it cached of the file.
    pub fn begin_patch(&self, key: Key, wait: std::time::Duration) -> Option<PatchGuard<'_>> {
        if self.role() != Role::Standby {
            return None;
        }
        // Marked first, then the open handles checked: an open registers its handle
        // and then checks the mark (see `wait_patched`), so one of the two sees the
        // other.
        let mut patching = self.patching.lock().unwrap_or_else(|e| e.into_inner());
        patching.insert(key);
        drop(patching);
        let guard = PatchGuard { volume: self, key };
        let deadline = std::time::Instant::now() + wait;
        loop {
            // Checked with the mark's lock held, so a release cannot slip in between
            // the check and the wait.
            let patching = self.patching.lock().unwrap_or_else(|e| e.into_inner());
            if !self.has_open(key) {
                return Some(guard);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                drop(patching);
                return None;
            }
            let _ = self
                .patched
                .wait_timeout(patching, left)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Whether a handle on the backing file `key` is open.
    fn has_open(&self, key: Key) -> bool {
        let files = self.files.read().unwrap_or_else(|e| e.into_inner());
        let table = self.read_table();
        files
            .values()
            .any(|f| table.get(f.ino).is_some_and(|n| n.key == key))
    }

    /// Waits while the backing file of `ino` is being updated in place. The handle
    /// `fh` just opened on it steps aside meanwhile (the update waits for open handles
    /// to close, and this one is not read before the update is done). Returns whether
    /// it waited.
    fn wait_patched(&self, ino: u64, fh: u64) -> bool {
        let patching = self.patching.lock().unwrap_or_else(|e| e.into_inner());
        if patching.is_empty() {
            return false;
        }
        let Some(key) = self.read_table().get(ino).map(|n| n.key) else {
            return false;
        };
        if !patching.contains(&key) {
            return false;
        }
        let file = self
            .files
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh);
        self.patched.notify_all();
        self.held_opens.fetch_add(1, Ordering::AcqRel);
        let done = self
            .patched
            .wait_while(patching, |p| p.contains(&key))
            .unwrap_or_else(|e| e.into_inner());
        drop(done);
        self.held_opens.fetch_sub(1, Ordering::AcqRel);
        if let Some(file) = file {
            self.files
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(fh, file);
        }
        true
    }

    /// Whether the open file `file` of `ino` is still the file `ino`'s name holds.
    fn still_named(&self, ino: u64, file: &OpenFile) -> bool {
        let Ok(loc) = self.locate(ino) else {
            return false;
        };
        let Some(name) = loc.name.as_deref() else {
            return false;
        };
        match (
            sys::statat(loc.dir.as_fd(), name),
            sys::fstat(file.fd.as_fd()),
        ) {
            (Ok(named), Ok(open)) => (named.st_dev, named.st_ino) == (open.st_dev, open.st_ino),
            _ => false,
        }
    }

    /// The temp file `name` in the directory `dir` is served from, and its key, if it
    /// is staged and the volume a standby.
    fn staged_name(&self, dir: Key, name: &OsStr) -> Option<(OsString, Key)> {
        if !self.any_staged.load(Ordering::Acquire) || self.role() != Role::Standby {
            return None;
        }
        let staged = self.staged.read().unwrap_or_else(|e| e.into_inner());
        staged
            .get(&(dir, name.to_owned()))
            .and_then(|versions| versions.last().cloned())
    }

    /// The temp file of the version of `name` staged in `dir` whose backing key is
    /// `key`: what an inode the kernel holds is, though a later version took the name.
    fn staged_version(&self, dir: Key, name: &OsStr, key: Key) -> Option<(OsString, Key)> {
        if !self.any_staged.load(Ordering::Acquire) || self.role() != Role::Standby {
            return None;
        }
        let staged = self.staged.read().unwrap_or_else(|e| e.into_inner());
        staged
            .get(&(dir, name.to_owned()))
            .and_then(|versions| versions.iter().find(|(_, k)| *k == key).cloned())
    }

    /// Standby: puts the names staged in the directory `dir_key` into its listing
    /// `out`, with their new versions' inode numbers (a new file is listed as soon as
    /// it can be opened, not once it is renamed into place).
    fn list_staged(&self, dir_key: Key, dir: &OwnedFd, out: &mut Vec<DirEntry>) {
        if !self.any_staged.load(Ordering::Acquire) || self.role() != Role::Standby {
            return;
        }
        let here: Vec<(OsString, OsString)> = self
            .staged
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|((key, _), _)| *key == dir_key)
            .filter_map(|((_, name), versions)| Some((name.clone(), versions.last()?.0.clone())))
            .collect();
        for (name, temp) in here {
            // Gone meanwhile: renamed into place (the listing may show it already) or
            // given up.
            let Ok(st) = sys::statat(dir.as_fd(), &temp) else {
                continue;
            };
            let ino = self
                .read_table()
                .by_key((st.st_dev, st.st_ino))
                .unwrap_or(st.st_ino);
            match out.iter_mut().find(|e| e.name == name) {
                Some(e) => e.ino = ino,
                None => out.push(DirEntry {
                    ino,
                    kind: libc::DT_REG,
                    name,
                }),
            }
        }
    }

    /// `fstatat` of `name` in the directory `parent` (whose fd is `dir`), through its
    /// staged temp file if it has one.
    fn stat_entry(&self, parent: u64, dir: &OwnedFd, name: &OsStr) -> std::io::Result<Stat> {
        let parent_key = if self.any_staged.load(Ordering::Acquire) {
            self.read_table().get(parent).map(|n| n.key)
        } else {
            None
        };
        if let Some((temp, _)) = parent_key.and_then(|key| self.staged_name(key, name)) {
            match sys::statat(dir.as_fd(), &temp) {
                // Renamed into place (or given up) since: the name has the newest.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                other => return other,
            }
        }
        sys::statat(dir.as_fd(), name)
    }

    fn file(&self, fh: u64) -> Result<Arc<OpenFile>> {
        self.read_files()
            .get(&fh)
            .cloned()
            .ok_or(Error::Stale("file handle"))
    }

    /// Registers (`parent`, `name`) with the table after a lookup or a create.
    fn remember(&self, parent: u64, dir: &OwnedFd, name: &OsStr, st: Stat) -> Result<Attr> {
        let kind = st.st_mode & libc::S_IFMT;
        let key = (st.st_dev, st.st_ino);
        let known = self.read_table().by_key(key);
        let open_dir = || -> Result<(Option<Arc<OwnedFd>>, Stat)> {
            let fd = sys::openat(dir.as_fd(), name, libc::O_PATH | libc::O_DIRECTORY, 0)?;
            // The fd is the truth: re-stat it in case the entry changed in between.
            let st = sys::fstat(fd.as_fd())?;
            Ok((Some(Arc::new(fd)), st))
        };
        let (mut dir_fd, mut st) = if kind == libc::S_IFDIR && known.is_none() {
            open_dir()?
        } else {
            (None, st)
        };
        let mut table = self.write_table();
        // A directory known a moment ago may have been forgotten since (a FORGET on
        // another thread): its new node needs an fd too, which only it holds.
        if kind == libc::S_IFDIR && dir_fd.is_none() && table.by_key(key).is_none() {
            (dir_fd, st) = open_dir()?;
        }
        let ino = table.remember(
            parent,
            name,
            (st.st_dev, st.st_ino),
            st.st_mode & libc::S_IFMT,
            dir_fd,
        );
        Ok(Attr { ino, st })
    }

    /// Makes the entry `name` just created in `parent` (by `dir`) the caller's and
    /// known to the table. If that fails, the entry is removed again (`rmdir`: it is
    /// a directory), so a failed create leaves nothing behind, as natively, rather
    /// than an entry of root's that was never recorded.
    fn adopt(
        &self,
        parent: u64,
        dir: &OwnedFd,
        name: &OsStr,
        caller: Caller,
        rmdir: bool,
    ) -> Result<Attr> {
        let made = sys::statat(dir.as_fd(), name)?;
        let adopted = self
            .own(dir, name, made, caller)
            .and_then(|st| self.remember(parent, dir, name, st));
        if adopted.is_err() {
            self.unmake(dir, name, (made.st_dev, made.st_ino), rmdir);
        }
        adopted
    }

    /// Removes the entry `name` this call made, if it still is the file `key`.
    fn unmake(&self, dir: &OwnedFd, name: &OsStr, key: Key, rmdir: bool) {
        let still = sys::statat(dir.as_fd(), name).is_ok_and(|st| (st.st_dev, st.st_ino) == key);
        let flags = if rmdir { libc::AT_REMOVEDIR } else { 0 };
        if still {
            if let Err(e) = sys::unlinkat(dir.as_fd(), name, flags) {
                tracing::warn!(name = ?name, error = %e, "cannot remove an entry whose creation failed");
            }
        }
    }

    /// Makes a node created by root belong to the caller, as a native create would.
    fn own(&self, dir: &OwnedFd, name: &OsStr, mut st: Stat, caller: Caller) -> Result<Stat> {
        let parent = sys::fstat(dir.as_fd())?;
        let gid = if parent.st_mode & libc::S_ISGID != 0 {
            parent.st_gid
        } else {
            caller.gid
        };
        if st.st_uid != caller.uid || st.st_gid != gid {
            let at = At::Entry(dir.as_fd(), name);
            // The chown clears the set-ID bits the caller created the file with. Its
            // own user's bit is its to set. The group's only if the caller is in the
            // group: before Linux 6.0 the kernel leaves it to the filesystem to drop
            // S_ISGID when a set-group-ID directory gives the file a group the caller
            // is not in. (A caller not in the group but with CAP_FSETID loses the bit
            // here, where a native create keeps it.)
            let mut set_id = st.st_mode & libc::S_ISUID;
            if st.st_mode & libc::S_ISGID != 0 && caller.in_group(gid) {
                set_id |= libc::S_ISGID;
            }
            at.chown(Some(caller.uid), Some(gid))?;
            st = at.stat()?;
            if st.st_mode & set_id != set_id && st.st_mode & libc::S_IFMT != libc::S_IFLNK {
                at.chmod((st.st_mode | set_id) & 0o7777)?;
                st = at.stat()?;
            }
        }
        Ok(st)
    }

    /// Looks up `name` in `parent`.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr> {
        check_exists(name)?;
        let dir = self.dir_fd(parent)?;
        let st = self.stat_entry(parent, &dir, name)?;
        self.remember(parent, &dir, name, st)
    }

    /// Takes back `n` kernel lookups of `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        self.write_table().forget(ino, n);
    }

    /// Attributes of `ino`, through the open file `fh` if given (works after unlink).
    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> Result<Attr> {
        if let Some(fh) = fh {
            if let Ok(file) = self.file(fh) {
                return Ok(Attr {
                    ino,
                    st: sys::fstat(file.fd.as_fd())?,
                });
            }
        }
        match self.at_node(ino, |at| at.stat(), |st| Ok((st.st_dev, st.st_ino))) {
            Ok((_, st)) => Ok(Attr { ino, st }),
            // Unlinked but still open: the kernel asks without a handle. (Or its name
            // holds another file now, and an open handle still has it.)
            Err(e) => match self.open_file_of(ino) {
                Some(file) => Ok(Attr {
                    ino,
                    st: sys::fstat(file.fd.as_fd())?,
                }),
                None => Err(e),
            },
        }
    }

    /// Changes attributes: owner first, then mode, size and times, in the order
    /// `chown` clearing set-id bits needs.
    pub fn setattr(&self, ino: u64, set: SetAttr) -> Result<Attr> {
        let _writing = self.writable_for(|| [self.path_of(ino)])?;
        let file = match set.fh {
            Some(fh) => self.file(fh).ok(),
            None => None,
        };
        let loc = match self.locate(ino) {
            Ok(loc) => loc,
            // Unlinked but still open (ftruncate, fchmod, futimens of such a file):
            // address it through an open fd of it.
            Err(e) => match file.clone().or_else(|| self.open_file_of(ino)) {
                Some(f) => Location {
                    dir: Arc::new(f.fd.try_clone()?),
                    name: None,
                    unstaged: None,
                    key: f.key(),
                },
                None => return Err(e),
            },
        };
        let at = loc.at();
        // What took effect, recorded even if a later step fails (a chmod done, then a
        // truncate refused with EFBIG): it is on the disk.
        let mut done = AttrChange::default();
        let steps = (|| -> Result<()> {
            if set.uid.is_some() || set.gid.is_some() {
                at.chown(set.uid, set.gid)?;
                done.owner = true;
            }
            if let Some(mode) = set.mode {
                at.chmod(mode & 0o7777)?;
                done.mode = true;
            }
            if let Some(size) = set.size {
                // An ftruncate is a write of its handle; a truncate by path is a change
                // of its own (recorded by the caller).
                if let Some(f) = &file {
                    f.wrote.store(true, Ordering::Release);
                }
                let key = match &file {
                    Some(f) => {
                        sys::ftruncate(f.fd.as_fd(), size)?;
                        f.key()
                    }
                    // (A directory's fd opens for writing with EISDIR; a file whose
                    // every name is gone, truncated through `/proc/PID/fd`, through the
                    // fd kept of it.)
                    None => {
                        let fd = loc.retry(|at| at.open(libc::O_WRONLY))?;
                        sys::ftruncate(fd.as_fd(), size)?;
                        let st = sys::fstat(fd.as_fd())?;
                        (st.st_dev, st.st_ino)
                    }
                };
                done.size = true;
                // Bytes from the new end on changed (a growth is seen by the size).
                self.written.record(key, size..u64::MAX);
                if let Some(f) = file.clone().or_else(|| self.open_file_of(ino)) {
                    f.changed();
                }
            }
            if set.atime.is_some() || set.mtime.is_some() {
                at.utimens(&[timespec(set.atime), timespec(set.mtime)])?;
                done.times = true;
            }
            Ok(())
        })();
        if done != AttrChange::default() {
            self.record(ino, ChangeKind::Attr(done));
        }
        steps?;
        let st = match &file {
            Some(f) => sys::fstat(f.fd.as_fd())?,
            None => at.stat()?,
        };
        Ok(Attr { ino, st })
    }

    /// The target of a symlink.
    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let loc = self.locate(ino)?;
        let name = loc.name.as_deref().ok_or(Error::from_errno(libc::EINVAL))?;
        Ok(sys::readlinkat(loc.dir.as_fd(), name)?)
    }

    /// Creates a fifo, socket or device node.
    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u64,
        caller: Caller,
    ) -> Result<Attr> {
        let _writing = self.writable_for(|| [self.entry_path(parent, name)])?;
        check_name(name)?;
        let umask = sys::CallerUmask::set(umask);
        let mode = mode & !umask.clear;
        let dir = self.dir_fd(parent)?;
        sys::mknodat(dir.as_fd(), name, mode, rdev)?;
        let attr = self.adopt(parent, &dir, name, caller, false)?;
        self.record(attr.ino, ChangeKind::Mknod);
        Ok(attr)
    }

    /// Creates a directory.
    pub fn mkdir(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        caller: Caller,
    ) -> Result<Attr> {
        let _writing = self.writable_for(|| [self.entry_path(parent, name)])?;
        check_name(name)?;
        let umask = sys::CallerUmask::set(umask);
        let mode = mode & !umask.clear;
        let dir = self.dir_fd(parent)?;
        sys::mkdirat(dir.as_fd(), name, mode)?;
        let attr = self.adopt(parent, &dir, name, caller, true)?;
        self.record(attr.ino, ChangeKind::Mkdir);
        Ok(attr)
    }

    /// Creates a symlink.
    pub fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &OsStr,
        caller: Caller,
    ) -> Result<Attr> {
        let _writing = self.writable_for(|| [self.entry_path(parent, name)])?;
        check_name(name)?;
        let dir = self.dir_fd(parent)?;
        sys::symlinkat(target, dir.as_fd(), name)?;
        let attr = self.adopt(parent, &dir, name, caller, false)?;
        self.record(attr.ino, ChangeKind::Symlink);
        Ok(attr)
    }

    /// Removes a non-directory.
    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<()> {
        let _writing = self.writable_for(|| [self.entry_path(parent, name)])?;
        check_exists(name)?;
        let dir = self.dir_fd(parent)?;
        let held = self.hold_last_name(parent, &dir, name);
        sys::unlinkat(dir.as_fd(), name, 0)?;
        self.drop_name(parent, name, held);
        self.record_entry(parent, name, ChangeKind::Unlink);
        Ok(())
    }

    /// Before `name` in `parent` goes away: an `O_PATH` fd of it if it is the last
    /// known name of a non-directory the kernel holds, for `Table::keep`, so the
    /// kernel's inode stays addressable (see [`crate::inode::Node::kept`]).
    fn hold_last_name(&self, parent: u64, dir: &OwnedFd, name: &OsStr) -> Option<(u64, OwnedFd)> {
        let (ino, key) = {
            let table = self.read_table();
            let ino = table.entry(parent, name)?;
            let node = table.get(ino)?;
            if node.dir.is_some() || node.links.len() != 1 {
                return None;
            }
            (ino, node.key)
        };
        let fd = sys::openat(dir.as_fd(), name, libc::O_PATH, 0).ok()?;
        let st = sys::fstat(fd.as_fd()).ok()?;
        ((st.st_dev, st.st_ino) == key).then_some((ino, fd))
    }

    fn drop_name(&self, parent: u64, name: &OsStr, held: Option<(u64, OwnedFd)>) {
        let mut table = self.write_table();
        table.drop_link(parent, name);
        if let Some((ino, fd)) = held {
            table.keep(ino, fd);
        }
    }

    /// Removes an empty directory.
    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<()> {
        let _writing = self.writable_for(|| [self.entry_path(parent, name)])?;
        check_exists(name)?;
        let dir = self.dir_fd(parent)?;
        sys::unlinkat(dir.as_fd(), name, libc::AT_REMOVEDIR)?;
        self.write_table().drop_link(parent, name);
        self.record_entry(parent, name, ChangeKind::Rmdir);
        Ok(())
    }

    /// Renames, with `RENAME_NOREPLACE`/`RENAME_EXCHANGE` flags as given.
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        let _writing = self.writable_for(|| {
            [
                self.entry_path(parent, name),
                self.entry_path(newparent, newname),
            ]
        })?;
        check_exists(name)?;
        check_name(newname)?;
        // A whiteout (overlayfs with the mount as its upper directory) would leave a
        // device at the old name that no change record tells a standby of.
        if flags & libc::RENAME_WHITEOUT != 0 {
            return Err(Error::from_errno(libc::EINVAL));
        }
        // Counted before the backing directory changes: see `renames_begun`.
        self.renames_begun.fetch_add(1, Ordering::SeqCst);
        let mut ticket = RenameTicket {
            unrecorded: &self.renames_unrecorded,
            recorded: false,
        };
        let from_dir = self.dir_fd(parent)?;
        let to_dir = self.dir_fd(newparent)?;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let replaced = match exchange {
            true => None,
            false => self.hold_last_name(newparent, &to_dir, newname),
        };
        sys::renameat2(from_dir.as_fd(), name, to_dir.as_fd(), newname, flags)?;
        let order = self.emitting();
        let mut table = self.write_table();
        let from = table.path(parent).map(|p| p.join(name));
        table.rename(parent, name, newparent, newname, exchange);
        if let Some((ino, fd)) = replaced {
            table.keep(ino, fd);
        }
        let to = table.path(newparent).map(|p| p.join(newname));
        drop(table);
        if let (Some(from), Some(to)) = (from, to) {
            // Counted as recorded by the sink, once the record is out.
            self.emit(order, to, ChangeKind::Rename { from, exchange }, None);
            ticket.recorded = true;
        }
        Ok(())
    }

    /// How many renames through the mount have begun so far. Whoever reads the
    /// backing directory and must know of every rename that read could have seen
    /// (the replicator, which reads a path after its change record and must not send
    /// what a rename it has no record of yet put there) takes this after the read and
    /// waits until as many have been recorded by the change sink (which counts the
    /// rename records it takes) or ended without a record
    /// ([`Volume::renames_unrecorded`]). Renames end in any order, so the counts can
    /// match while one of the first is still under way and a later one is done; it
    /// is meant for a short wait, not a guarantee.
    pub fn renames_begun(&self) -> u64 {
        self.renames_begun.load(Ordering::SeqCst)
    }

    /// How many renames through the mount ended without a change record: failed, or
    /// of a name whose path was no longer known.
    pub fn renames_unrecorded(&self) -> u64 {
        self.renames_unrecorded.load(Ordering::SeqCst)
    }

    /// Creates a hard link to `ino` at (`newparent`, `newname`).
    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> Result<Attr> {
        // Both names: a link would let writes to the upstream name reach the other.
        let _writing =
            self.writable_for(|| [self.path_of(ino), self.entry_path(newparent, newname)])?;
        check_name(newname)?;
        let loc = self.locate(ino)?;
        let name = loc.name.as_deref().ok_or(Error::from_errno(libc::EPERM))?;
        let to_dir = self.dir_fd(newparent)?;
        sys::linkat(loc.dir.as_fd(), name, to_dir.as_fd(), newname)?;
        // The existing name, the new one and the record in the order of records (a
        // rename of a directory above either may come in between otherwise).
        let order = self.emitting();
        let existing = self.read_table().path(ino);
        let st = sys::statat(to_dir.as_fd(), newname)?;
        let attr = self.remember(newparent, &to_dir, newname, st)?;
        // Only a regular file's names stay one file on a standby (manifests link
        // only those): a further name of a symlink, FIFO or node is made there as a
        // new one, like the first.
        let kind = match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => existing.map(|existing| ChangeKind::Link { existing }),
            libc::S_IFLNK => Some(ChangeKind::Symlink),
            _ => Some(ChangeKind::Mknod),
        };
        // (The table's guard goes before the record: a writer's wait for the standbys
        // comes after it.)
        let path = self.read_table().path(newparent);
        if let (Some(kind), Some(path)) = (kind, path) {
            self.emit(order, path.join(newname), kind, None);
        }
        Ok(attr)
    }

    /// `wrote`: see [`OpenFile::wrote`].
    fn add_file(&self, ino: u64, fd: OwnedFd, writable: bool, wrote: bool) -> (u64, Arc<OpenFile>) {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        // Only a standby's writable handles need their path later; an active's never
        // computes it.
        let standby_path = (writable && self.rescue.is_some() && self.role() == Role::Standby)
            .then(|| self.path_of(ino))
            .flatten();
        let mut files = self.files.write().unwrap_or_else(|e| e.into_inner());
        let changes = files
            .values()
            .find(|f| f.ino == ino)
            .map(|f| f.changes.clone())
            .unwrap_or_default();
        let file = Arc::new(OpenFile {
            ino,
            key: std::sync::OnceLock::new(),
            fd,
            writable,
            standby_path,
            changes,
            recorded: Mutex::new(None),
            wrote: AtomicBool::new(wrote),
            split: AtomicBool::new(false),
        });
        files.insert(fh, file.clone());
        (fh, file)
    }

    fn open_flags(flags: i32) -> (i32, bool) {
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        // The kernel already handled O_CREAT/O_EXCL; O_DIRECT would impose alignment on
        // our own buffers in the non-passthrough path. O_APPEND would make every write
        // of ours append, whatever its offset: the kernel gives the end of the file as
        // the offset of an appending write itself, but the pages of a shared mapping
        // written back through the handle go to their own offsets. (With passthrough
        // the kernel opens a backing file of its own per handle, with the caller's
        // flags: our fd only names the file.) See `open_entry`.
        let flags = flags
            & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_DIRECT | libc::O_APPEND);
        (flags, writable)
    }

    /// Opens `name` in `dir` with `flags` as [`Volume::open_flags`] made them, for a
    /// caller that asked for O_APPEND if `append`: an append-only file (`chattr +a`)
    /// opens for writing only with O_APPEND, and every write to it appends anyway.
    fn open_entry(at: At<'_>, flags: i32, append: bool) -> std::io::Result<OwnedFd> {
        match at.open(flags) {
            Err(e) if append && e.raw_os_error() == Some(libc::EPERM) => {
                at.open(flags | libc::O_APPEND)
            }
            other => other,
        }
    }

    /// Opens `ino` with `flags` for `caller`; returns the handle and the open file.
    pub fn open(&self, ino: u64, flags: i32, caller: Caller) -> Result<(u64, Arc<OpenFile>)> {
        let append = flags & libc::O_APPEND != 0;
        let (flags, writable) = Self::open_flags(flags);
        let _writing = if writable {
            Some(self.writable_for(|| [self.path_of(ino)])?)
        } else {
            None
        };
        let truncate = flags & libc::O_TRUNC != 0;
        // (A file whose every name is gone is opened through the fd kept of it: a
        // process reopening it through `/proc/PID/fd`. The kernel never opens a
        // directory this way.)
        // Found first without being opened (a FIFO or device that took the name in a
        // race must not be opened), then opened itself.
        let (_, (found, st)) = self.at_node(
            ino,
            |at| {
                let fd = at.open(libc::O_PATH)?;
                let st = sys::fstat(fd.as_fd())?;
                Ok((fd, st))
            },
            |(_, st)| Ok((st.st_dev, st.st_ino)),
        )?;
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            return Err(Error::from_errno(libc::EISDIR));
        }
        let fd = Self::open_entry(At::Fd(found.as_fd()), flags & !libc::O_TRUNC, append)?;
        drop(found);
        // The open file is registered before the truncation, so a replicator that reads
        // the file meanwhile knows a writer is at it and does not ship the empty file.
        let (fh, file) = self.add_file(ino, fd, writable, truncate);
        // Registered first: an in-place update that starts now sees this handle and
        // waits for it to close (or leaves the file alone); one under way is waited
        // for, with this handle set aside meanwhile. An update whose write in place
        // failed ends with a new copy renamed over the file: this handle's fd is then
        // on the half-written old one, and ESTALE has the kernel look the name up
        // again and open the new copy.
        if self.wait_patched(ino, fh) && !self.still_named(ino, &file) {
            self.files
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&fh);
            return Err(Error::Stale("replaced while the open waited"));
        }
        if truncate {
            if let Err(e) = self.truncate_on_open(&file, caller) {
                self.files
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&fh);
                return Err(e);
            }
        }
        Ok((fh, file))
    }

    /// The truncation of an `O_TRUNC` open, which the kernel leaves to us (atomic
    /// O_TRUNC).
    fn truncate_on_open(&self, file: &OpenFile, caller: Caller) -> Result<()> {
        let st = sys::fstat(file.fd.as_fd())?;
        if caller.uid != 0 {
            // We truncate as root, which keeps set-ID bits: drop them as a truncation
            // by this (unprivileged) caller would. The group's bit goes if group
            // execute is set, and since Linux 6.2 (`setattr_should_drop_sgid`) also
            // without it if the caller is not in the file's group.
            let mut kill = libc::S_ISUID;
            if st.st_mode & libc::S_ISGID != 0
                && (st.st_mode & libc::S_IXGRP != 0
                    || (sys::kernel_version() >= (6, 2) && !caller.in_group(st.st_gid)))
            {
                kill |= libc::S_ISGID;
            }
            if st.st_mode & kill != 0 {
                sys::fchmod(file.fd.as_fd(), st.st_mode & 0o7777 & !kill)?;
            }
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Ok(());
        }
        if file.fd_writable() {
            sys::ftruncate(file.fd.as_fd(), 0)?;
        } else {
            // O_RDONLY|O_TRUNC truncates too (the file just opened, not its name).
            let fd = At::Fd(file.fd.as_fd()).open(libc::O_WRONLY)?;
            sys::ftruncate(fd.as_fd(), 0)?;
        }
        self.written.record(file.key(), 0..u64::MAX);
        file.changed();
        // Like O_TRUNC, and unlike ftruncate of an empty file, mark both times.
        let now = libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        };
        At::Fd(file.fd.as_fd()).utimens(&[
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            now,
        ])?;
        Ok(())
    }

    /// How many open files (FUSE handles) the volume holds now: a handle goes at the
    /// kernel's release, which comes after the process's last close, asynchronously.
    pub fn open_handles(&self) -> usize {
        self.read_files().len()
    }

    /// Whether a process has `path` open for writing and has not closed (or fsync'd)
    /// that open file yet: its content may be half written, and the close to come
    /// will be recorded as a change anyway. (A handle that has written nothing counts
    /// until another handle's change of the file is recorded: see
    /// [`Volume::settle_idle`].)
    pub fn being_written(&self, path: &Path) -> bool {
        let Some((_, ino)) = self.ino_of(path) else {
            return false;
        };
        self.read_files().values().any(|f| {
            f.ino == ino
                && f.writable
                && f.recorded
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_none()
        })
    }

    /// Any open file of `ino`: reaches a file whose last name is gone.
    fn open_file_of(&self, ino: u64) -> Option<Arc<OpenFile>> {
        self.read_files().values().find(|f| f.ino == ino).cloned()
    }

    /// Creates and opens a regular file.
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        caller: Caller,
    ) -> Result<(Attr, u64, Arc<OpenFile>)> {
        let _writing = self.writable_for(|| [self.entry_path(parent, name)])?;
        check_name(name)?;
        let umask = sys::CallerUmask::set(umask);
        let mode = mode & !umask.clear;
        let dir = self.dir_fd(parent)?;
        let (plain, _) = Self::open_flags(flags);
        let (fd, created) = match sys::openat(
            dir.as_fd(),
            name,
            plain | libc::O_CREAT | libc::O_EXCL,
            mode & 0o7777,
        ) {
            Ok(fd) => (fd, true),
            // Someone created it between the kernel's lookup and now: open it as is.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 => {
                let append = flags & libc::O_APPEND != 0;
                (
                    Self::open_entry(At::Entry(dir.as_fd(), name), plain, append)?,
                    false,
                )
            }
            Err(e) => return Err(e.into()),
        };
        let made = sys::fstat(fd.as_fd())?;
        let adopted = match created {
            true => self.own(&dir, name, made, caller),
            false => Ok(made),
        }
        .and_then(|st| self.remember(parent, &dir, name, st));
        let attr = match adopted {
            Ok(attr) => attr,
            Err(e) => {
                if created {
                    self.unmake(&dir, name, (made.st_dev, made.st_ino), false);
                }
                return Err(e);
            }
        };
        // The open file is registered before the change is recorded, so a replicator
        // that reads the new (still empty) file knows its writer is at it.
        let (fh, file) = self.add_file(attr.ino, fd, true, true);
        if created {
            self.record(attr.ino, ChangeKind::Create);
        }
        Ok((attr, fh, file))
    }

    /// Reads up to `size` bytes at `offset` (the non-passthrough path).
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let file = self.file(fh)?;
        let mut buf = vec![0u8; size as usize];
        let n = sys::pread(file.fd.as_fd(), &mut buf, offset)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Writes `data` at `offset` (the non-passthrough path).
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<usize> {
        let file = self.file(fh)?;
        let _writing = self.writable_for(|| [self.path_of(file.ino)])?;
        // Before the bytes land. (A change recorded at this very moment may still
        // settle this handle: its close records the file again.)
        file.wrote.store(true, Ordering::Release);
        let n = sys::pwrite(file.fd.as_fd(), data, offset)?;
        // The kernel sends a write() that starts inside a page it does not hold whole
        // in two requests: up to that page's end, then the rest. A write that starts
        // inside a page and ends at a page's end may be the first: a switch to standby
        // lets the second in, rather than leave half of one write() (`set_role`).
        let end = offset.saturating_add(n as u64);
        let page = page_size();
        file.split.store(
            n == data.len() && offset % page != 0 && end % page == 0,
            Ordering::Release,
        );
        // After the write: a replicator that takes the record before this line read
        // the bytes after they were written.
        self.written
            .record(file.key(), offset..offset.saturating_add(n as u64));
        file.changed();
        Ok(n)
    }

    /// `fsync`/`fdatasync` of an open file; a change like a close after writing.
    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        let file = self.file(fh)?;
        sys::fsync(file.fd.as_fd(), datasync)?;
        let _recording = self.recording();
        if file.writable && file.take_change()? {
            self.record_close(&file);
        }
        Ok(())
    }

    /// A `close()` of an fd of an open file (the kernel's FLUSH, which the closing
    /// process waits for): a file opened for writing is one change, recorded before
    /// `close()` returns. A later close of a dup'd fd (a shell redirection closes two)
    /// or after an fsync records again only if the file changed in between.
    pub fn flush(&self, fh: u64) -> Result<()> {
        let file = self.file(fh)?;
        let _recording = self.recording();
        if file.writable && file.take_change()? {
            self.record_close(&file);
        }
        Ok(())
    }

    /// Before a change of `ino` is recorded (a close after writing, a chmod, a
    /// truncate by path): the handles of its file that were opened for writing and
    /// have written nothing (a reader of a database opens it read-write, and may keep
    /// it open for days) count as recorded as the file is now. They have nothing
    /// under way, and would otherwise keep the file "being written"
    /// ([`Volume::being_written`]), held back until they close, with no change of
    /// their own to ship it then. One that writes later is recorded at its close as
    /// any handle after its first record.
    ///
    /// (A handle opened and about to write still counts while the file has no new
    /// record: a file appended to by one open, write and close after another is not
    /// read between an open and its write.)
    fn settle_idle(&self, ino: u64) {
        // (With passthrough, twinfs sees no writes: a handle's "nothing written" means
        // nothing. Only volumes without peers use it.)
        if self.passthrough() {
            return;
        }
        for other in self.read_files().values() {
            if other.ino == ino
                && other.writable
                && !other.wrote.load(Ordering::Acquire)
                && other
                    .recorded
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_none()
            {
                // (An fstat that fails leaves it unsettled: held back as before.)
                let _ = other.take_change();
            }
        }
    }

    /// Records what `file` wrote, for a close, fsync or release. Standby: a file
    /// opened at an upstream path and replaced since by the active's version (its path
    /// holds that now: nothing of it to ship) goes to the rescue instead; and either
    /// happens wholly before or wholly after an apply of the active's changes.
    fn record_close(&self, file: &OpenFile) {
        // (Also a handle opened while this node was active, written through since.)
        let standby = self.role() == Role::Standby && self.upstream.is_some();
        let _turn = (standby || file.standby_path.is_some()).then(|| self.turns.write());
        if !self.rescued(file) {
            self.record_write(file);
        }
    }

    /// Standby: if `file` was opened for writing at an upstream path whose file has
    /// been replaced since (the active's version put in place over it), hands what
    /// it wrote to the rescue; whether it did. (A handle opened while this node was
    /// active: if the path its inode still has here is an upstream path.)
    fn rescued(&self, file: &OpenFile) -> bool {
        let Some(rescue) = &self.rescue else {
            return false;
        };
        if !sys::fstat(file.fd.as_fd()).is_ok_and(|st| st.st_nlink == 0) {
            return false;
        }
        let path = match &file.standby_path {
            Some(path) => path.clone(),
            None if self.role() == Role::Standby => {
                match self
                    .path_of(file.ino)
                    .filter(|p| self.upstream.as_ref().is_some_and(|u| u(p)))
                {
                    Some(path) => path,
                    None => return false,
                }
            }
            None => return false,
        };
        rescue(&path, file.fd.as_fd());
        true
    }

    /// Forgets an open file after its last reference went away (asynchronous to the
    /// process, so later writes through other handles may already have happened).
    /// Records the handle if no close or fsync did, or if the file changed since the
    /// last one did: pages written through a shared mapping reach twinfs when the
    /// mapping is unmapped, after the close, and this is the last word on them.
    pub fn release(&self, fh: u64) -> Result<Arc<OpenFile>> {
        let _recording = self.recording();
        let file = self
            .files
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh)
            .ok_or(Error::Stale("file handle"))?;
        // An in-place update may be waiting for this handle to close.
        let patching = self.patching.lock().unwrap_or_else(|e| e.into_inner());
        if !patching.is_empty() {
            self.patched.notify_all();
        }
        drop(patching);
        // A file that cannot be looked at is recorded: shipping it again is harmless.
        if file.writable && file.take_change().unwrap_or(true) {
            self.record_close(&file);
        }
        Ok(file)
    }

    /// `fallocate` on an open file.
    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        let file = self.file(fh)?;
        let _writing = self.writable_for(|| [self.path_of(file.ino)])?;
        file.wrote.store(true, Ordering::Release);
        let result = sys::fallocate(file.fd.as_fd(), mode, offset, length);
        // Recorded even if it failed: a zero range that ran out of space part way has
        // changed what it did before. Collapsing or inserting a range moves every byte
        // after it.
        let shifts = mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0;
        let end = if shifts {
            u64::MAX
        } else {
            offset.saturating_add(length)
        };
        self.written.record(file.key(), offset..end);
        file.changed();
        Ok(result?)
    }

    /// `lseek` on an open file (for `SEEK_DATA`/`SEEK_HOLE`).
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64> {
        let file = self.file(fh)?;
        Ok(sys::lseek(file.fd.as_fd(), offset, whence)?)
    }

    /// Opens a directory for listing; the listing is read now and again on rewind.
    pub fn opendir(&self, ino: u64) -> Result<u64> {
        let entries = self.list(ino)?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, (entries, true));
        Ok(fh)
    }

    fn list(&self, ino: u64) -> Result<Vec<DirEntry>> {
        let dir = self.dir_fd(ino)?;
        let st = sys::fstat(dir.as_fd())?;
        let raw = sys::read_dir(dir.as_fd())?;
        let table = self.read_table();
        let parent_ino = table.link(ino).map(|l| l.0).unwrap_or(ROOT);
        let mut out = Vec::with_capacity(raw.len() + 2);
        out.push(DirEntry {
            ino,
            kind: libc::DT_DIR,
            name: ".".into(),
        });
        out.push(DirEntry {
            ino: parent_ino,
            kind: libc::DT_DIR,
            name: "..".into(),
        });
        for e in raw.into_iter().filter(|e| !is_reserved(&e.name)) {
            let ino = table.by_key((st.st_dev, e.ino)).unwrap_or(e.ino);
            out.push(DirEntry {
                ino,
                kind: e.kind,
                name: e.name,
            });
        }
        drop(table);
        // A filesystem whose entries carry no type (ext4 without `filetype`, XFS
        // without `ftype`): the kernel takes what FUSE lists as known, so the type is
        // asked of the entry itself. (One removed meanwhile is left out, as a listing
        // made a moment later would; one that cannot be asked is listed.)
        out.retain_mut(|e| {
            if e.kind != libc::DT_UNKNOWN {
                return true;
            }
            match sys::statat(dir.as_fd(), &e.name) {
                Ok(st) => {
                    e.kind = ((st.st_mode & libc::S_IFMT) >> 12) as u8;
                    true
                }
                Err(err) if err.raw_os_error() == Some(libc::ENOENT) => false,
                // (Listed as before, as a regular file: a lookup tells the truth.)
                Err(_) => true,
            }
        });
        self.list_staged((st.st_dev, st.st_ino), &dir, &mut out);
        Ok(out)
    }

    /// Calls `add(offset_of_next, entry)` for entries from `offset` on until it returns
    /// true (reply buffer full). Offset 0 reads the directory again (a rewind), except
    /// the first read after `opendir`, which takes the listing `opendir` made.
    pub fn readdir(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(u64, &DirEntry) -> bool,
    ) -> Result<()> {
        if offset == 0 {
            // The first read takes what `opendir` listed a moment ago; a rewind lists
            // again.
            let opened = self
                .dirs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(&fh)
                .is_some_and(|(_, fresh)| std::mem::replace(fresh, false));
            if !opened {
                let listed = self.list(ino)?;
                self.dirs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(fh, (listed, false));
            }
        }
        let dirs = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
        let (entries, _) = dirs.get(&fh).ok_or(Error::Stale("file handle"))?;
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            if add(i as u64 + 1, e) {
                break;
            }
        }
        Ok(())
    }

    /// Closes a directory handle.
    pub fn releasedir(&self, fh: u64) {
        self.dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh);
    }

    /// `fsync` of a directory.
    pub fn fsyncdir(&self, ino: u64, datasync: bool) -> Result<()> {
        let dir = self.dir_fd(ino)?;
        let fd = sys::reopen_dir(dir.as_fd())?;
        Ok(sys::fsync(fd.as_fd(), datasync)?)
    }

    /// `statfs` of the underlying filesystem.
    pub fn statfs(&self) -> Result<libc::statfs> {
        Ok(sys::fstatfs(self.root.as_fd())?)
    }

    /// Sets an extended attribute.
    pub fn setxattr(
        &self,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        caller: Caller,
    ) -> Result<()> {
        let _writing = self.writable_for(|| [self.path_of(ino)])?;
        let loc = self.locate(ino)?;
        let at = loc.at();
        at.setxattr(name, value, flags)?;
        let mut sgid = Ok(());
        if name.as_bytes() == b"system.posix_acl_access" && caller.uid != 0 {
            // The underlying filesystem set the mode the ACL implies with this daemon's
            // rights, which keep the set-group-ID bit; as the caller, who is not in
            // the file's group, it drops it (as a chmod does), or a user could make a
            // set-group-ID program of a group they are not in.
            sgid = at.stat().and_then(|st| {
                if st.st_mode & libc::S_ISGID != 0 && !caller.in_group(st.st_gid) {
                    at.chmod(st.st_mode & 0o7777 & !libc::S_ISGID)
                } else {
                    Ok(())
                }
            });
        }
        // The ACL is set, whatever became of the bit: recorded either way.
        self.record(ino, ChangeKind::Xattr);
        Ok(sgid?)
    }

    /// Reads an extended attribute into `buf` (or returns its size for an empty buffer).
    pub fn getxattr(&self, ino: u64, name: &OsStr, buf: &mut [u8]) -> Result<usize> {
        let loc = self.locate(ino)?;
        Ok(loc.retry(|at| at.getxattr(name, buf))?)
    }

    /// Lists extended attribute names into `buf` (or returns the size).
    pub fn listxattr(&self, ino: u64, buf: &mut [u8]) -> Result<usize> {
        let loc = self.locate(ino)?;
        Ok(loc.retry(|at| at.listxattr(buf))?)
    }

    /// Removes an extended attribute.
    pub fn removexattr(&self, ino: u64, name: &OsStr) -> Result<()> {
        let _writing = self.writable_for(|| [self.path_of(ino)])?;
        let loc = self.locate(ino)?;
        loc.at().removexattr(name)?;
        self.record(ino, ChangeKind::Xattr);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_open_held_back_while_its_file_is_replaced_is_sent_to_the_new_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("f"), b"half written").expect("write");
        let volume = Volume::new(dir.path(), Role::Standby, Arc::new(crate::change::Discard))
            .expect("volume");
        let attr = volume.lookup(ROOT, OsStr::new("f")).expect("lookup");
        let key = (attr.st.st_dev, attr.st.st_ino);
        let caller = ROOT_CALLER;

        let guard = volume
            .begin_patch(key, std::time::Duration::ZERO)
            .expect("no handle open");
        std::thread::scope(|s| {
            let reader = s.spawn(|| volume.open(attr.ino, libc::O_RDONLY, caller));
            while guard.held_opens() == 0 {
                assert!(!reader.is_finished(), "the open was not held back");
                std::thread::yield_now();
            }
            // The write in place failed: a new copy takes the name, the kernel is told.
            std::fs::write(dir.path().join("copy"), b"the new copy").expect("write");
            std::fs::rename(dir.path().join("copy"), dir.path().join("f")).expect("rename");
            if let Some((ino, true)) = volume.entry_state(ROOT, OsStr::new("f")) {
                volume.drop_stale_entry(ROOT, OsStr::new("f"), ino);
            }
            drop(guard);
            match reader.join().expect("reader") {
                Err(e) => assert_eq!(e.errno(), libc::ESTALE),
                Ok((_, file)) => {
                    let mut buf = [0u8; 32];
                    let n = sys::pread(file.fd.as_fd(), &mut buf, 0).expect("read");
                    panic!(
                        "the held-back open got the replaced file: {:?}",
                        String::from_utf8_lossy(&buf[..n])
                    );
                }
            }
        });
        let again = volume.lookup(ROOT, OsStr::new("f")).expect("lookup");
        let (_, file) = volume
            .open(again.ino, libc::O_RDONLY, caller)
            .expect("open");
        let mut buf = [0u8; 32];
        let n = sys::pread(file.fd.as_fd(), &mut buf, 0).expect("read");
        assert_eq!(&buf[..n], b"the new copy");
    }

    /// Keeps every record.
    #[derive(Default)]
    struct Records(Mutex<Vec<Change>>);

    impl ChangeSink for Records {
        fn record(&self, change: Change) {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(change);
        }
    }

    impl Records {
        fn writes(&self) -> usize {
            let changes = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
            changes
                .iter()
                .filter(|c| c.kind == ChangeKind::Write)
                .count()
        }
    }

    const ROOT_CALLER: Caller = Caller {
        uid: 0,
        gid: 0,
        pid: 0,
    };

    #[test]
    fn times_to_set_convert_over_the_whole_64_bit_range() {
        let at = |t: SystemTime| {
            let ts = timespec(Some(SetTime::At(t)));
            (ts.tv_sec, ts.tv_nsec)
        };
        let epoch = SystemTime::UNIX_EPOCH;
        assert_eq!(at(epoch + Duration::new(7, 3)), (7, 3));
        assert_eq!(at(epoch - Duration::new(1, 250_000_000)), (-2, 750_000_000));
        assert_eq!(at(epoch - Duration::from_secs(1 << 63)), (i64::MIN, 0));
        assert_eq!(
            at(epoch - Duration::new((1 << 63) - 1, 1)),
            (i64::MIN, 999_999_999)
        );
        assert_eq!(
            at(epoch + Duration::new(i64::MAX as u64, 999_999_999)),
            (i64::MAX, 999_999_999)
        );
    }

    /// A volume over a scratch directory holding `f`, driven without a kernel.
    fn volume(content: &[u8]) -> (tempfile::TempDir, Volume, Arc<Records>) {
        let dir = tempfile::tempdir().expect("scratch dir");
        std::fs::write(dir.path().join("f"), content).expect("fill");
        let records = Arc::new(Records::default());
        let volume = Volume::new(dir.path(), Role::Active, records.clone()).expect("volume");
        (dir, volume, records)
    }

    /// Sets the backing file's mtime back to what `st` says, as a write within the
    /// same tick of a coarse clock leaves it.
    fn restore_mtime(volume: &Volume, st: &Stat) {
        let omit = libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        };
        let mtime = libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        };
        At::Entry(volume.root_fd(), OsStr::new("f"))
            .utimens(&[omit, mtime])
            .expect("utimensat");
    }

    fn stat_f(volume: &Volume) -> Stat {
        sys::statat(volume.root_fd(), OsStr::new("f")).expect("stat")
    }

    /// A `write()` that starts inside a page and crosses its end comes from the kernel
    /// as two requests. A switch to standby between them must not refuse the second:
    /// the writer would get a short write then EROFS, and half its line would stay in
    /// the file (and be shipped). The switch lets it in.
    #[test]
    fn a_switch_to_standby_lets_in_the_rest_of_a_split_write() {
        let page = page_size() as usize;
        let (_dir, volume, _records) = volume(&vec![b'a'; page - 10]);
        let ino = volume.lookup(ROOT, OsStr::new("f")).expect("lookup").ino;
        let (fh, _) = volume.open(ino, libc::O_RDWR, ROOT_CALLER).expect("open");
        // 20 bytes written at 10 bytes before the page's end, as the kernel sends them.
        let line = b"xxxxxxxxxxline 1339\n";
        volume
            .write(fh, (page - 10) as u64, &line[..10])
            .expect("first part");
        std::thread::scope(|s| {
            let rest = s.spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(5));
                volume.write(fh, page as u64, &line[10..])
            });
            volume.set_role(Role::Standby);
            assert_eq!(rest.join().expect("writer").expect("second part"), 10);
        });
        // Now refused, like any write on a standby.
        assert!(volume.write(fh, (page + 10) as u64, b"late").is_err());
    }

    #[test]
    fn a_same_size_rewrite_within_one_mtime_tick_is_recorded() {
        let (_dir, volume, records) = volume(b"old!");
        let ino = volume.lookup(ROOT, OsStr::new("f")).expect("lookup").ino;
        let (fh, _) = volume.open(ino, libc::O_RDWR, ROOT_CALLER).expect("open");
        volume.write(fh, 0, b"aaaa").expect("write");
        volume.fsync(fh, false).expect("fsync");
        assert_eq!(records.writes(), 1, "the fsync records");
        let st = stat_f(&volume);
        volume.write(fh, 0, b"bbbb").expect("write");
        restore_mtime(&volume, &st);
        volume.flush(fh).expect("flush");
        assert_eq!(records.writes(), 1, "the close after the rewrite records");
        volume.flush(fh).expect("flush");
        assert_eq!(
            records.writes(),
            0,
            "a second close without a write does not"
        );
        volume.release(fh).expect("release");
        assert_eq!(records.writes(), 0);
    }

    #[test]
    fn a_mapping_written_back_after_the_close_is_recorded_at_release() {
        // ftruncate, mmap, close (recorded), then the mapping's pages reach twinfs
        // through another handle of the file before this one's release.
        let (_dir, volume, records) = volume(b"");
        let ino = volume.lookup(ROOT, OsStr::new("f")).expect("lookup").ino;
        let (fh, _) = volume.open(ino, libc::O_RDWR, ROOT_CALLER).expect("open");
        let (other, _) = volume.open(ino, libc::O_RDWR, ROOT_CALLER).expect("open");
        let size = SetAttr {
            size: Some(4096),
            fh: Some(fh),
            ..SetAttr::default()
        };
        volume.setattr(ino, size).expect("ftruncate");
        volume.flush(fh).expect("flush");
        volume.flush(other).expect("flush");
        // The other handle has written nothing: it counts as recorded with the first.
        assert_eq!(
            records.writes(),
            1,
            "the close after the truncation records"
        );
        let st = stat_f(&volume);
        volume.write(other, 0, &[7u8; 4096]).expect("writeback");
        restore_mtime(&volume, &st);
        volume.release(fh).expect("release");
        assert_eq!(
            records.writes(),
            1,
            "the release after the writeback records"
        );
    }

    #[test]
    fn a_handle_that_writes_nothing_holds_up_no_other_handles_change() {
        let (_dir, volume, records) = volume(b"v1");
        let ino = volume.lookup(ROOT, OsStr::new("f")).expect("lookup").ino;
        let path = Path::new("f");
        // A reader of a database opens it read-write.
        let (idle, _) = volume.open(ino, libc::O_RDWR, ROOT_CALLER).expect("open");
        let (writer, _) = volume.open(ino, libc::O_RDWR, ROOT_CALLER).expect("open");
        assert!(
            volume.being_written(path),
            "until a change of the file is recorded"
        );
        volume.write(writer, 0, b"v2").expect("write");
        volume.flush(writer).expect("flush");
        assert_eq!(records.writes(), 1);
        assert!(
            !volume.being_written(path),
            "the idle handle holds nothing up"
        );
        // It closes without a change since: nothing more to record.
        volume.flush(idle).expect("flush");
        volume.release(idle).expect("release");
        volume.release(writer).expect("release");
        assert_eq!(records.writes(), 0);
        // A change by path (a chmod, a truncate) settles an idle handle too.
        let (idle, _) = volume.open(ino, libc::O_RDWR, ROOT_CALLER).expect("open");
        assert!(volume.being_written(path));
        let chmod = SetAttr {
            mode: Some(0o600),
            ..SetAttr::default()
        };
        volume.setattr(ino, chmod).expect("chmod");
        assert!(
            !volume.being_written(path),
            "the idle handle holds nothing up"
        );
        volume.release(idle).expect("release");
    }
}
