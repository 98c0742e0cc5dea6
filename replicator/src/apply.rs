//! Apply: carries out on a standby what the active sends, writing into the directory
//! under the mount through the volume's root fd.
//!
//! Two promises hold for every operation:
//!
//! - **Nothing leads out of the volume.** Parents are resolved beneath the root with
//!   `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
//!   RESOLVE_NO_XDEV)` (or an equivalent walk on kernels before 5.6), and the last
//!   component is never followed: a symlink in the volume is replicated as a symlink,
//!   never written through. The last component and every directory a deletion enters
//!   are opened the same way, so a mount point inside the volume (a bind mount of the
//!   same filesystem too) is never entered, changed or emptied.
//! - **Replacements are atomic and durable.** Files, symlinks and nodes are built under
//!   a temp name (`.twinfs-tmp.<hex>`, hidden from the mount's users by the `.twinfs-`
//!   prefix), given their metadata, fsynced and renamed over the target; then the
//!   directory is fsynced. A reader sees the old version or the new one, never a mix.
//!   Temp entries left by a crash are cleared by [`Applier::remove_stale_temps`].

use std::collections::hash_map::RandomState;
use std::ffi::{CString, OsStr, OsString};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use twinfs_fs::sys::{self, At, DirEntry, Stat};

use crate::delta::{self, BlockList};
use crate::patch::FileStamp;
use crate::path::RelPath;

/// The name prefix of temp entries; the FUSE layer hides every `.twinfs-` name.
pub const TEMP_PREFIX: &str = ".twinfs-tmp.";

/// Buffer size for streaming content and for copying by hand.
const COPY_BUF: usize = 256 * 1024;

/// How many temp names are tried before giving up: a clash is already unlikely once.
const TEMP_ATTEMPTS: u32 = 16;

/// How often `openat2` is retried when it reports a concurrent rename (`EAGAIN`).
const OPENAT2_RETRIES: u32 = 4;

/// Set once `openat2` answered `ENOSYS`, so later lookups go straight to the walk.
static OPENAT2_MISSING: AtomicBool = AtomicBool::new(false);

/// The metadata an applied entry ends up with.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileMeta {
    /// Permission bits (`0o7777`); file-type bits are ignored. Not applied to symlinks.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time: seconds since the epoch and nanoseconds (below 10^9).
    pub mtime: (i64, u32),
    /// Extended attributes (name, value). The entry ends up with exactly these.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The kind of a special file made by [`Applier::make_node`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// A named pipe.
    Fifo,
    /// A character device.
    Char,
    /// A block device.
    Block,
    /// A Unix socket inode (no listener behind it).
    Socket,
}

impl NodeKind {
    fn file_type(self) -> u32 {
        match self {
            NodeKind::Fifo => libc::S_IFIFO,
            NodeKind::Char => libc::S_IFCHR,
            NodeKind::Block => libc::S_IFBLK,
            NodeKind::Socket => libc::S_IFSOCK,
        }
    }
}

/// Why applying a change failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The path crosses a symlink or a mount point on its way: following it could
    /// write outside the volume, so nothing was done.
    #[error(
        "refused {path:?}: it leads through a symlink or mount point, maybe out of the volume"
    )]
    Escape {
        /// The refused path.
        path: RelPath,
    },
    /// A system call on the underlying directory failed.
    #[error("{op} {path:?} failed: {source}")]
    Io {
        /// What was being done, phrased to precede the path ("create temp file for").
        op: &'static str,
        /// The volume path it was done for.
        path: RelPath,
        /// The error from the system.
        #[source]
        source: io::Error,
    },
    /// Reading the content to write failed (the stream from the active broke).
    #[error("reading the new content of {path:?} failed: {source}")]
    Content {
        /// The file being written.
        path: RelPath,
        /// The error from the reader.
        #[source]
        source: io::Error,
    },
    /// A rename or exchange failed.
    #[error("renaming {from:?} to {to:?} failed: {source}")]
    Rename {
        /// The source path.
        from: RelPath,
        /// The destination path.
        to: RelPath,
        /// The error from the system.
        #[source]
        source: io::Error,
    },
    /// A directory is where a file, symlink or node is to go; the caller must delete
    /// it first (replacing a whole tree is never done implicitly).
    #[error("{path:?} is a directory; delete it before putting a {want} there")]
    IsDirectory {
        /// The path of the directory.
        path: RelPath,
        /// What was to be put there.
        want: &'static str,
    },
    /// Something other than a directory is where a directory is to go.
    #[error("{path:?} exists and is not a directory")]
    NotDirectory {
        /// The path of the entry in the way.
        path: RelPath,
    },
    /// A block delta was sent for something that is not a regular file here.
    #[error("cannot patch {path:?}: it is not a regular file")]
    NotRegular {
        /// The path of the entry.
        path: RelPath,
    },
    /// A file's metadata alone was sent for something that is not a regular file here
    /// (a directory, a symlink...): not set on it.
    #[error("{path:?} is not a regular file here: only the metadata of a file was sent")]
    NoFileHere {
        /// The path of the entry.
        path: RelPath,
    },
    /// A hard link was asked for to something that is not a regular file here.
    #[error("cannot link to {path:?}: there is no regular file there")]
    NoLinkTarget {
        /// The existing name asked for.
        path: RelPath,
    },
    /// The other names of a hard-linked file could not be found.
    #[error("cannot find the other names of {path:?}")]
    Names {
        /// The file's name.
        path: RelPath,
        /// Why the walk failed.
        #[source]
        source: crate::manifest::ManifestError,
    },
    /// A directory to be removed without what is below it still holds entries.
    #[error("{path:?} is a directory that is not empty")]
    NotEmpty {
        /// The path of the directory.
        path: RelPath,
    },
    /// A directory in the way of what the active puts holds paths this node never
    /// syncs: they stay, so the directory stays, and nothing is put in its place.
    #[error("{path:?} is a directory holding paths this node never syncs; not replaced")]
    KeepsNever {
        /// The path of the directory.
        path: RelPath,
    },
    /// Local writes of an upstream path (on a standby) are still to be shipped to the
    /// active: what the active sent would replace one before it is judged.
    #[error("{path:?} not replaced: {why}")]
    Busy {
        /// The path.
        path: RelPath,
        /// Why.
        why: &'static str,
    },
    /// A standby's change of the volume, refused: this node has become active since
    /// its active sent it (see [`crate::roles::RoleCell::hold`]).
    #[error("{path:?} not applied: this node is no longer a standby")]
    NotStandby {
        /// The path.
        path: RelPath,
    },
    /// The operation cannot apply to the volume root (deleting or renaming it).
    #[error("cannot {op} the volume root")]
    Root {
        /// The refused operation.
        op: &'static str,
    },
}

impl ApplyError {
    /// Whether this is "no such file or directory" on the way to the path.
    fn is_missing(&self) -> bool {
        matches!(self, ApplyError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }

    /// Whether this is a passing failure of the disk or the system (an I/O error, no
    /// fd or memory left, a busy or interrupted call): trying again later may work.
    /// Not one about the path or the file (missing, a symlink on the way, not
    /// permitted), which stays.
    pub fn is_passing(&self) -> bool {
        matches!(self, ApplyError::Io { source, .. } if matches!(
            source.raw_os_error(),
            Some(
                libc::EIO
                    | libc::EMFILE
                    | libc::ENFILE
                    | libc::ENOMEM
                    | libc::EAGAIN
                    | libc::EINTR
                    | libc::EBUSY
                    | libc::ETXTBSY
                    | libc::EROFS
                    | libc::ENOSPC
                    | libc::EDQUOT
                    | libc::ESTALE
            )
        ))
    }

    /// Whether a directory on the way is something else here (`ENOTDIR`).
    fn is_not_directory(&self) -> bool {
        matches!(self, ApplyError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOTDIR))
    }
}

type Result<T> = std::result::Result<T, ApplyError>;

/// Wraps an `io::Error` as [`ApplyError::Io`] for `op` on `path`.
fn io_err<'p>(op: &'static str, path: &'p RelPath) -> impl FnOnce(io::Error) -> ApplyError + 'p {
    move |source| ApplyError::Io {
        op,
        path: path.clone(),
        source,
    }
}

/// Wraps an error of [`open_entry`] as [`ApplyError::Escape`] if the entry is a mount
/// point (`EXDEV`), else as [`ApplyError::Io`] for `op` on `path`.
fn entry_err<'p>(op: &'static str, path: &'p RelPath) -> impl FnOnce(io::Error) -> ApplyError + 'p {
    move |source| {
        if source.raw_os_error() == Some(libc::EXDEV) {
            tracing::warn!(%path, "not entering a mount point inside the volume");
            ApplyError::Escape { path: path.clone() }
        } else {
            io_err(op, path)(source)
        }
    }
}

/// Writes changes from the active into one volume's underlying directory.
pub struct Applier<'a> {
    root: BorrowedFd<'a>,
    /// Whether it applies ops on a standby (restores a directory's times after it
    /// puts an entry there), not upstream writes on the active.
    standby: bool,
}

impl<'a> Applier<'a> {
    /// An applier for the volume whose underlying directory is `root` (an `O_PATH`
    /// directory fd opened before the mount, as `Volume::root_fd` gives it).
    pub fn new(root: BorrowedFd<'a>) -> Self {
        Applier {
            root,
            standby: true,
        }
    }

    /// An applier of a standby's upstream writes on the active
    /// (`direction = "both"`): a new entry moves its directory's mtime, as a local
    /// create would; the active records the change and ships that time. (A
    /// replacement leaves it, as on a standby: no op for the directory follows one.)
    pub fn upstream(root: BorrowedFd<'a>) -> Self {
        Applier {
            root,
            standby: false,
        }
    }

    /// Opens the parent directory of `path` (an `O_PATH` fd) and returns it with the
    /// last component. For the root, the "parent" is the root itself and the name is
    /// empty. A path that crosses a symlink or a mount point gives
    /// [`ApplyError::Escape`].
    pub fn open_parent(&self, path: &RelPath) -> Result<(OwnedFd, OsString)> {
        let (opened, name) = match path.split_last() {
            None => (self.root.try_clone_to_owned(), OsString::new()),
            Some((parent, name)) if parent.is_root() => {
                (self.root.try_clone_to_owned(), name.to_owned())
            }
            Some((parent, name)) => (open_beneath(self.root, &parent), name.to_owned()),
        };
        match opened {
            Ok(fd) => Ok((fd, name)),
            // ELOOP: a symlink on the way (RESOLVE_NO_SYMLINKS); EXDEV: a mount point or
            // an attempt to climb above the root (RESOLVE_NO_XDEV, RESOLVE_BENEATH).
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::EXDEV)) => {
                tracing::warn!(%path, error = %e, "refused a path that leads through a symlink or mount point");
                Err(ApplyError::Escape { path: path.clone() })
            }
            Err(e) => Err(io_err("open the parent directory of", path)(e)),
        }
    }

    /// Replaces `path` with a regular file holding everything `content` yields, with
    /// `meta`. An existing file, symlink or node there is replaced atomically; an
    /// existing directory is an error.
    pub fn write_file(
        &self,
        path: &RelPath,
        content: &mut dyn Read,
        meta: &FileMeta,
    ) -> Result<()> {
        let (dir, name) = self.open_parent(path)?;
        let dir = dir.as_fd();
        refuse_directory(dir, &name, path, "file")?;
        let (temp, file) = create_temp(dir, self.standby, |tmp| {
            sys::openat(dir, tmp, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, 0o600)
        })
        .map_err(io_err("create a temp file for", path))?;
        let mut buf = vec![0u8; COPY_BUF];
        let mut size = 0u64;
        loop {
            let n = match content.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(ApplyError::Content {
                        path: path.clone(),
                        source,
                    })
                }
            };
            sys::pwrite(file.as_fd(), &buf[..n], size).map_err(io_err("write", path))?;
            size += n as u64;
        }
        commit_file(temp, file.as_fd(), &name, path, meta)?;
        tracing::debug!(%path, size, "wrote file");
        Ok(())
    }

    /// Writes `content` with `meta` to a temp file beside `path`, for
    /// [`Applier::place_prepared`] to put in place later; with `durable`, fsync'd. A
    /// batch of files is prepared without fsync, made durable by one
    /// [`Applier::sync_filesystem`], then placed: never a torn file after a crash,
    /// at a fraction of the fsyncs.
    pub fn prepare_file(
        &self,
        path: &RelPath,
        content: &[u8],
        meta: &FileMeta,
        durable: bool,
    ) -> Result<Prepared> {
        let (dir, name) = self.open_parent(path)?;
        refuse_directory(dir.as_fd(), &name, path, "file")?;
        let (temp, file) = create_temp(dir.as_fd(), self.standby, |tmp| {
            sys::openat(
                dir.as_fd(),
                tmp,
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
                0o600,
            )
        })
        .map_err(io_err("create a temp file for", path))?;
        let mut at = 0usize;
        while at < content.len() {
            at += sys::pwrite(file.as_fd(), &content[at..], at as u64)
                .map_err(io_err("write", path))?;
        }
        apply_meta(At::Fd(file.as_fd()), true, meta, path)?;
        if durable {
            sys::fsync(file.as_fd(), false).map_err(io_err("fsync", path))?;
        }
        let handed = temp.hand_over();
        Ok(Prepared::new(dir, name, path, handed, file.as_fd()))
    }

    /// Renames a prepared file into place; with `durable`, fsyncs the directory too.
    pub fn place_prepared(&self, mut prepared: Prepared, durable: bool) -> Result<()> {
        prepared.placed = true;
        let temp = TempEntry {
            dir: prepared.dir.as_fd(),
            name: std::mem::take(&mut prepared.temp),
            placed: false,
            dir_times: prepared.dir_times,
            new_too: prepared.new_too,
            hold: std::mem::take(&mut prepared.hold),
        };
        place_with(temp, &prepared.name, &prepared.path, "file", durable)
    }

    /// Puts a prepared file in place and returns at once, so readers see it; the
    /// rename is durable only after [`Placed::sync`]. Its content must already be
    /// ([`Prepared::sync_data`]) for a crash to leave the old or the new file whole.
    pub fn place_visible(&self, prepared: Prepared) -> Result<Placed> {
        let dir = prepared
            .dir
            .try_clone()
            .map_err(io_err("open the parent directory of", &prepared.path))?;
        let path = prepared.path.clone();
        self.place_prepared(prepared, false)?;
        Ok(Placed { dir, path })
    }

    /// Copies what is at `path` (a regular file, a symlink, or a directory and all it
    /// holds) to the entry `dest_name` of the directory `dest_dir`, outside the volume,
    /// keeping mode and mtime; for keeping a file before it is overwritten. Nothing
    /// there is ever followed or overwritten: what exists already at `dest_name` (or
    /// below it) stays and is not copied, except that a directory there (not a symlink
    /// to one) is filled with what it lacks; a copied symlink is never written through.
    /// Returns how many entries were copied: 0 when there is nothing at `path`. FIFOs,
    /// sockets and devices are skipped (no content to keep), and so are the entries
    /// below `path` that `skip` names (those an op leaves in place). New directories
    /// are owner-only: what is kept may be a password file.
    pub fn copy_out(
        &self,
        path: &RelPath,
        dest_dir: BorrowedFd<'_>,
        dest_name: &OsStr,
        skip: &dyn Fn(&RelPath) -> bool,
    ) -> Result<u64> {
        // A work list, not a recursion: a tree may be deeper than the call stack allows.
        let (mut copied, mut work) = self.copy_out_one(path, dest_dir, dest_name, skip)?;
        while let Some(Below { path, into, name }) = work.pop() {
            let (n, more) = self.copy_out_one(&path, into.as_fd(), &name, skip)?;
            copied += n;
            work.extend(more);
        }
        Ok(copied)
    }

    /// [`Applier::copy_out`] of `path` alone: how many entries it copied, and for a
    /// directory what is below it, to be copied into its copy.
    fn copy_out_one(
        &self,
        path: &RelPath,
        dest_dir: BorrowedFd<'_>,
        dest_name: &OsStr,
        skip: &dyn Fn(&RelPath) -> bool,
    ) -> Result<(u64, Vec<Below>)> {
        let none = Ok((0, Vec::new()));
        let (dir, name) = match self.open_parent(path) {
            Err(e) if e.is_missing() => return none,
            other => other?,
        };
        let st = match sys::statat(dir.as_fd(), &name) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return none,
            other => other.map_err(io_err("stat", path))?,
        };
        let write = |e: io::Error| ApplyError::Io {
            path: path.clone(),
            op: "copy out",
            source: e,
        };
        let mtime = std::time::UNIX_EPOCH
            + std::time::Duration::new(st.st_mtime.max(0) as u64, st.st_mtime_nsec as u32);
        match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => {
                // Never over what is kept already (a path touched twice by one full
                // sync, or kept by an earlier try).
                if sys::statat(dest_dir, dest_name).is_ok() {
                    return none;
                }
                let fd = open_entry(dir.as_fd(), &name, libc::O_RDONLY)
                    .map_err(entry_err("open", path))?;
                let mut from = std::fs::File::from(fd);
                // Whole or not at all: written under a temporary name and renamed in
                // once synced, so that a copy cut short (no space left, a crash) is
                // never taken for a kept version by the next try, which would then
                // let the original be replaced.
                let (temp, to) = keep_temp(dest_dir, dest_name).map_err(write)?;
                let mut to = std::fs::File::from(to);
                let copied = (|| {
                    io::copy(&mut from, &mut to)?;
                    // Its metadata too: what this node changed may be only that. The
                    // owner and xattrs as far as the state directory takes them (the
                    // content is what must not be lost); the owner first: a chown
                    // clears the set-ID bits the chmod then sets.
                    let kept = At::Fd(to.as_fd());
                    let owner = kept.chown(Some(st.st_uid), Some(st.st_gid));
                    sys::fchmod(to.as_fd(), st.st_mode & 0o7777)?;
                    let xattrs = crate::manifest::read_xattrs(At::Fd(from.as_fd()))
                        .map_err(|e| e.to_string())
                        .and_then(|x| sync_xattrs(kept, &x, path).map_err(|e| e.to_string()));
                    if let Err(e) = owner.map_err(|e| e.to_string()).and(xattrs) {
                        tracing::warn!(%path, error = %e, "kept without its owner or xattrs");
                    }
                    to.set_modified(mtime)?;
                    to.sync_all()?;
                    sys::rename_noreplace(dest_dir, &temp, dest_name)?;
                    // Durable before the original is replaced.
                    sys::fsync_dir(dest_dir)
                })();
                match copied {
                    Ok(()) => Ok((1, Vec::new())),
                    Err(e) => {
                        // (Best effort: the copy failed already.)
                        let _ = sys::unlinkat(dest_dir, &temp, 0);
                        if e.kind() == io::ErrorKind::AlreadyExists {
                            none
                        } else {
                            Err(write(e))
                        }
                    }
                }
            }
            libc::S_IFLNK => {
                let target =
                    sys::readlinkat(dir.as_fd(), &name).map_err(io_err("readlink", path))?;
                match sys::symlinkat(OsStr::from_bytes(&target), dest_dir, dest_name) {
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => none,
                    other => other
                        .and_then(|()| sys::fsync_dir(dest_dir))
                        .map(|()| (1, Vec::new()))
                        .map_err(write),
                }
            }
            libc::S_IFDIR => {
                let made = match sys::mkdirat(dest_dir, dest_name, 0o700) {
                    Ok(()) => {
                        sys::fsync_dir(dest_dir).map_err(write)?;
                        1
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => 0,
                    Err(e) => return Err(write(e)),
                };
                // O_NOFOLLOW: a symlink kept there earlier is not a way in.
                let into =
                    match sys::openat(dest_dir, dest_name, libc::O_PATH | libc::O_DIRECTORY, 0) {
                        Err(e)
                            if made == 0
                                && matches!(
                                    e.raw_os_error(),
                                    Some(libc::ENOTDIR | libc::ELOOP)
                                ) =>
                        {
                            return none
                        }
                        other => Arc::new(other.map_err(write)?),
                    };
                let here = if name.is_empty() {
                    dir
                } else {
                    open_entry(dir.as_fd(), &name, libc::O_PATH | libc::O_DIRECTORY)
                        .map_err(entry_err("open", path))?
                };
                let mut below = Vec::new();
                for entry in sys::read_dir(here.as_fd()).map_err(io_err("read", path))? {
                    if entry.name.as_bytes().starts_with(TEMP_PREFIX.as_bytes()) {
                        continue;
                    }
                    let child = match path.join(&entry.name) {
                        Ok(child) => child,
                        // Longer than PATH_MAX: this walk names entries by path, so it
                        // cannot keep that one (nor what is below). The rest is kept.
                        Err(e @ crate::path::PathError::TooLong(_)) => {
                            tracing::warn!(%path, error = %e,
                                "not kept: a name in this directory makes a path longer than PATH_MAX");
                            continue;
                        }
                        Err(e) => {
                            return Err(ApplyError::Io {
                                path: path.clone(),
                                op: "copy out",
                                source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
                            })
                        }
                    };
                    if skip(&child) {
                        continue;
                    }
                    below.push(Below {
                        path: child,
                        into: into.clone(),
                        name: entry.name,
                    });
                }
                Ok((made, below))
            }
            _ => none,
        }
    }

    /// Makes everything written to the volume's filesystem durable (`syncfs`).
    pub fn sync_filesystem(&self) -> Result<()> {
        let root = RelPath::root();
        let fd = sys::openat(
            self.root,
            OsStr::new("."),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )
        .map_err(io_err("open", &root))?;
        // SAFETY: a valid fd for the duration of the call.
        if unsafe { libc::syncfs(fd.as_raw_fd()) } != 0 {
            return Err(io_err("syncfs", &root)(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The block list of the regular file at `path` for a block delta: the block size
    /// [`delta::block_size`] picks for its length and the hash of each block. An empty
    /// list if there is no regular file there: then every block has to be sent.
    pub fn block_list(&self, path: &RelPath) -> Result<BlockList> {
        Ok(std::sync::Arc::unwrap_or_clone(
            self.block_list_cached(path, &mut |_| None)?.0,
        ))
    }

    /// [`Applier::block_list`], taken from `cached` if it has the list for the file as
    /// it is (by its stamp); with the stamp of the file the list describes, if it did
    /// not change while it was read.
    pub fn block_list_cached(
        &self,
        path: &RelPath,
        cached: &mut dyn FnMut(&FileStamp) -> Option<std::sync::Arc<BlockList>>,
    ) -> Result<(std::sync::Arc<BlockList>, Option<FileStamp>)> {
        let none = || (std::sync::Arc::new(BlockList::empty()), None);
        let (dir, name) = match self.open_parent(path) {
            Err(e) if e.is_missing() => return Ok(none()),
            other => other?,
        };
        let Some(file) = open_regular(dir.as_fd(), &name, path)? else {
            return Ok(none());
        };
        let st = sys::fstat(file.as_fd()).map_err(io_err("stat", path))?;
        let stamp = FileStamp::of(&st);
        if let Some(list) = cached(&stamp) {
            return Ok((list, Some(stamp)));
        }
        let mut blocks = delta::BlockHasher::new(delta::block_size(st.st_size as u64));
        crate::manifest::read_pipelined(file.as_fd(), &mut |data| blocks.update(data))
            .map_err(io_err("read", path))?;
        let after = sys::fstat(file.as_fd()).map_err(io_err("stat", path))?;
        let list = std::sync::Arc::new(blocks.finish());
        Ok((list, (FileStamp::of(&after) == stamp).then_some(stamp)))
    }

    /// The stamp of the regular file at `path`, `None` if there is none.
    pub fn stamp(&self, path: &RelPath) -> Result<Option<FileStamp>> {
        let (dir, name) = self.open_parent(path)?;
        Ok(regular_at(dir.as_fd(), &name, path)?.map(|st| FileStamp::of(&st)))
    }

    /// Opens the regular file at `path` for an in-place update, with its status:
    /// `None` if there is none, or if it has other hard links (they would change too).
    pub fn open_for_patch(&self, path: &RelPath) -> Result<Option<(OwnedFd, Stat)>> {
        let (dir, name) = match self.open_parent(path) {
            Err(e) if e.is_missing() => return Ok(None),
            other => other?,
        };
        // Never opens a FIFO or a device, whose open may block or act.
        if regular_at(dir.as_fd(), &name, path)?.is_none() {
            return Ok(None);
        }
        let fd = match open_entry(dir.as_fd(), &name, libc::O_RDWR | libc::O_NONBLOCK) {
            Ok(fd) => fd,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::ELOOP | libc::EISDIR)
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(entry_err("open", path)(e)),
        };
        let st = sys::fstat(fd.as_fd()).map_err(io_err("stat", path))?;
        let ok = is_regular(&st) && st.st_nlink == 1;
        Ok(ok.then_some((fd, st)))
    }

    /// Gives the open file `file` (at `path`) the metadata `meta`.
    pub fn set_file_meta(
        &self,
        file: BorrowedFd<'_>,
        meta: &FileMeta,
        path: &RelPath,
    ) -> Result<()> {
        apply_meta(At::Fd(file), true, meta, path)
    }

    /// Replaces `path` with a regular file of `new_size` bytes built from the current
    /// regular file there (if any) and the `(offset, bytes)` blocks `blocks` yields in
    /// ascending order, the rest of the bytes being the current file's; with `meta`.
    /// The result must have the content hash `expected`, or nothing changes: a block list
    /// that did not match, a stream cut short or a file that changed on the active
    /// while it was read never gets in place. As atomic as [`Applier::write_file`].
    pub fn write_blocks(
        &self,
        path: &RelPath,
        new_size: u64,
        blocks: &mut dyn Iterator<Item = io::Result<(u64, Vec<u8>)>>,
        expected: u128,
        meta: &FileMeta,
    ) -> Result<()> {
        let prepared = self.build_from_blocks(path, new_size, blocks, expected, meta)?;
        prepared.sync_data()?;
        self.place_prepared(prepared, true)
    }

    /// [`Applier::write_blocks`] up to the checked, whole temp file with `meta`, not
    /// yet durable nor in place: [`Prepared::sync_data`] and
    /// [`Applier::place_prepared`] finish it (meanwhile a standby can show it).
    pub fn build_from_blocks(
        &self,
        path: &RelPath,
        new_size: u64,
        blocks: &mut dyn Iterator<Item = io::Result<(u64, Vec<u8>)>>,
        expected: u128,
        meta: &FileMeta,
    ) -> Result<Prepared> {
        let (dir_fd, name) = self.open_parent(path)?;
        let dir = dir_fd.as_fd();
        refuse_directory(dir, &name, path, "file")?;
        let current = open_regular(dir, &name, path)?;
        let (temp, file) = create_temp(dir, self.standby, |tmp| {
            sys::openat(dir, tmp, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, 0o600)
        })
        .map_err(io_err("create a temp file for", path))?;
        let file = file.as_fd();
        let mut have = 0u64;
        // How much of the temp file holds the current copy's bytes: a block of zeros
        // past it is left a hole.
        let mut copied = 0u64;
        if let Some(current) = &current {
            let old = sys::fstat(current.as_fd())
                .map_err(io_err("stat", path))?
                .st_size as u64;
            have = old.min(new_size);
            copy_prefix(current.as_fd(), file, have)
                .map_err(io_err("copy the current content of", path))?;
            copied = have;
            // No writeback is started for the copy here: with the disk busy writing
            // it, rebuilding a 512 MiB file for a 1 MiB change took 1.6 s instead of
            // 0.4-0.6 s before it could be shown. Its fsync writes it anyway.
        }
        let content = |what: &str| ApplyError::Content {
            path: path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, what.to_owned()),
        };
        // Hashes the kept bytes between the blocks as it goes, so the result is checked
        // in one pass. Its block list is kept for its next delta too.
        let mut new_blocks = delta::BlockHasher::new(delta::block_size(new_size));
        let mut buf = vec![0u8; COPY_BUF];
        let mut hash_kept = |from: u64, to: u64, new_blocks: &mut delta::BlockHasher| {
            let mut at = from;
            while at < to {
                let want = (to - at).min(COPY_BUF as u64) as usize;
                let n = read_full(file, &mut buf[..want], at).map_err(io_err("read back", path))?;
                if n < want {
                    return Err(content(
                        "the standby's copy is shorter than the blocks assume",
                    ));
                }
                new_blocks.update(&buf[..n]);
                at += n as u64;
            }
            Ok(())
        };
        let mut cursor = 0u64;
        let mut sent = 0u64;
        // The disk starts on the blocks written while the rest is still on their way,
        // so the fsync at the end has little left to wait for. Only on the blocks:
        // kept bytes between them are left to the fsync (see above).
        let mut written_back = 0u64;
        for block in blocks {
            let (offset, data) = block.map_err(|source| ApplyError::Content {
                path: path.clone(),
                source,
            })?;
            let end = offset.checked_add(data.len() as u64);
            if offset < cursor || end.is_none_or(|end| end > new_size) {
                return Err(content("blocks out of order or past the end of the file"));
            }
            if offset > have {
                return Err(content("a gap past the end of the standby's copy"));
            }
            hash_kept(cursor, offset, &mut new_blocks)?;
            written_back = written_back.max(offset);
            write_block(file, &data, offset, copied).map_err(io_err("write a block of", path))?;
            new_blocks.update(&data);
            cursor = offset + data.len() as u64;
            have = have.max(cursor);
            sent += data.len() as u64;
            if cursor >= written_back + WRITEBACK_STEP {
                // Only a head start: the fsync below is what makes it durable.
                let _ = sys::start_writeback(file, written_back, cursor - written_back);
                written_back = cursor;
            }
        }
        if cursor < new_size && have < new_size {
            return Err(content("the blocks end before the file does"));
        }
        hash_kept(cursor, new_size, &mut new_blocks)?;
        let new_blocks = new_blocks.finish();
        if delta::content_hash(&new_blocks, new_size) != expected {
            return Err(content(
                "the rebuilt file does not match the announced hash (changed while sent, or cut off)",
            ));
        }
        sys::ftruncate(file, new_size).map_err(io_err("truncate", path))?;
        apply_meta(At::Fd(file), true, meta, path)?;
        tracing::debug!(%path, new_size, sent, "built file from blocks");
        let handed = temp.hand_over();
        let mut prepared = Prepared::new(dir_fd, name, path, handed, file);
        prepared.blocks = Some(new_blocks);
        Ok(prepared)
    }

    /// Makes `path` a directory with `meta`: creates it if missing, otherwise only sets
    /// the metadata. Anything other than a directory in the way is an error.
    pub fn make_dir(&self, path: &RelPath, meta: &FileMeta) -> Result<()> {
        let (dir, name) = self.open_parent(path)?;
        let dir = dir.as_fd();
        // The root (empty name) always exists. A new directory is 0700 until its
        // metadata is set, so nobody can use it half-made.
        let created = !name.is_empty()
            && match sys::mkdirat(dir, &name, 0o700) {
                Ok(()) => true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
                Err(e) => return Err(io_err("create directory", path)(e)),
            };
        let fd = if name.is_empty() {
            dir.try_clone_to_owned()
        } else {
            open_entry(dir, &name, libc::O_PATH | libc::O_DIRECTORY)
        }
        .map_err(|e| match e.raw_os_error() {
            // O_NOFOLLOW on a symlink gives ELOOP; O_DIRECTORY on anything else ENOTDIR.
            Some(libc::ENOTDIR | libc::ELOOP) => ApplyError::NotDirectory { path: path.clone() },
            _ => entry_err("open directory", path)(e),
        })?;
        apply_meta(At::Fd(fd.as_fd()), true, meta, path)?;
        sys::fsync_dir(fd.as_fd()).map_err(io_err("fsync directory", path))?;
        if created {
            sys::fsync_dir(dir).map_err(io_err("fsync the parent directory of", path))?;
        }
        tracing::debug!(%path, created, "made directory");
        Ok(())
    }

    /// Replaces `path` atomically with a symlink to `target` (stored as is, never
    /// resolved here), with `meta` except the mode.
    pub fn make_symlink(&self, path: &RelPath, target: &[u8], meta: &FileMeta) -> Result<()> {
        let (dir, name) = self.open_parent(path)?;
        let dir = dir.as_fd();
        refuse_directory(dir, &name, path, "symlink")?;
        let (temp, ()) = create_temp(dir, self.standby, |tmp| {
            sys::symlinkat(OsStr::from_bytes(target), dir, tmp)
        })
        .map_err(io_err("create a temp symlink for", path))?;
        meta_on_entry(dir, &temp.name, path, meta)?;
        place(temp, &name, path, "symlink")?;
        tracing::debug!(%path, "made symlink");
        Ok(())
    }

    /// Replaces `path` atomically with a special file of `kind` (`rdev` is the device
    /// number for character and block devices), with `meta`.
    pub fn make_node(
        &self,
        path: &RelPath,
        kind: NodeKind,
        rdev: u64,
        meta: &FileMeta,
    ) -> Result<()> {
        let (dir, name) = self.open_parent(path)?;
        let dir = dir.as_fd();
        refuse_directory(dir, &name, path, "special file")?;
        let (temp, ()) = create_temp(dir, self.standby, |tmp| {
            sys::mknodat(dir, tmp, kind.file_type() | 0o600, rdev)
        })
        .map_err(io_err("create a temp node for", path))?;
        meta_on_entry(dir, &temp.name, path, meta)?;
        place(temp, &name, path, "special file")?;
        tracing::debug!(%path, ?kind, "made special file");
        Ok(())
    }

    /// Gives the existing entry at `path` the owner, mode (not for symlinks), xattrs
    /// (exactly `meta.xattrs`) and mtime of `meta`, and makes that durable.
    /// Sets `meta` on the directory at `path` without making it durable: for a batch
    /// whose one filesystem sync follows. Something else there is not touched.
    pub fn set_directory_metadata_unsynced(&self, path: &RelPath, meta: &FileMeta) -> Result<()> {
        let (dir, name) = self.open_parent(path)?;
        let dir = dir.as_fd();
        match sys::statat(dir, &name) {
            Ok(st) if is_dir(&st) => {}
            Ok(_) => return Err(ApplyError::NotDirectory { path: path.clone() }),
            Err(e) => return Err(entry_err("stat", path)(e)),
        }
        meta_on_entry(dir, &name, path, meta)?;
        tracing::debug!(%path, "set directory metadata");
        Ok(())
    }

    pub fn set_metadata(&self, path: &RelPath, meta: &FileMeta) -> Result<()> {
        let (dir, name) = self.open_parent(path)?;
        let dir = dir.as_fd();
        let kind = meta_on_entry(dir, &name, path, meta)?;
        match kind {
            libc::S_IFDIR if name.is_empty() => sys::fsync_dir(dir),
            libc::S_IFDIR => open_entry(dir, &name, libc::O_PATH | libc::O_DIRECTORY)
                .and_then(|fd| sys::fsync_dir(fd.as_fd())),
            // O_NONBLOCK: the target was just seen to be a regular file, but opening
            // must never hang should it have become a FIFO meanwhile.
            libc::S_IFREG => open_entry(dir, &name, libc::O_RDONLY | libc::O_NONBLOCK)
                .and_then(|fd| sys::fsync(fd.as_fd(), false)),
            // Symlinks and special files cannot be opened for fsync; their inode change
            // is committed with the directory's.
            _ => sys::fsync_dir(dir),
        }
        .map_err(entry_err("fsync", path))?;
        tracing::debug!(%path, "set metadata");
        Ok(())
    }

    /// Makes `path` another name of the regular file at `existing` (a hard link) and
    /// makes that durable: a temp name is linked beside `path` and renamed over it, so
    /// what was at `path` is replaced atomically. Nothing changes if `path` is a name
    /// of that file already. A directory at `path` is an error, as for
    /// [`Applier::write_file`].
    pub fn link(&self, existing: &RelPath, path: &RelPath) -> Result<()> {
        let (from_dir, from_name) = self.open_parent(existing)?;
        let no_target = || ApplyError::NoLinkTarget {
            path: existing.clone(),
        };
        let file = regular_at(from_dir.as_fd(), &from_name, existing)?.ok_or_else(no_target)?;
        let (dir, name) = self.open_parent(path)?;
        let dir = dir.as_fd();
        refuse_directory(dir, &name, path, "hard link")?;
        // rename(2) of one name of a file over another does nothing: the temp name
        // would stay.
        if sys::statat(dir, &name).is_ok_and(|st| (st.st_dev, st.st_ino) == key(&file)) {
            return Ok(());
        }
        let (temp, ()) = create_temp(dir, self.standby, |tmp| {
            sys::linkat(from_dir.as_fd(), &from_name, dir, tmp)
        })
        .map_err(io_err("link a temp name for", path))?;
        // Replaced since it was looked at (linkat never follows a symlink): only the
        // file asked for is linked.
        let linked = sys::statat(dir, &temp.name).map_err(io_err("stat", path))?;
        if !is_regular(&linked) {
            return Err(no_target());
        }
        place(temp, &name, path, "hard link")?;
        tracing::debug!(%existing, %path, "linked");
        Ok(())
    }

    /// The status of the regular file at `path` if it has other names (hard links):
    /// an op replacing it may have to carry them along ([`Applier::link`]).
    pub fn linked_file(&self, path: &RelPath) -> Result<Option<Stat>> {
        let (dir, name) = match self.open_parent(path) {
            Err(e) if e.is_missing() => return Ok(None),
            other => other?,
        };
        Ok(regular_at(dir.as_fd(), &name, path)?.filter(|st| st.st_nlink > 1))
    }

    /// Renames `from` to `to`, replacing `to` as `rename(2)` does; with `exchange`,
    /// swaps the two atomically (both must exist).
    pub fn rename(&self, from: &RelPath, to: &RelPath, exchange: bool) -> Result<()> {
        if from.is_root() || to.is_root() {
            return Err(ApplyError::Root { op: "rename" });
        }
        let (from_dir, from_name) = self.open_parent(from)?;
        let (to_dir, to_name) = self.open_parent(to)?;
        // Two names of one file here: rename(2) does nothing and leaves both. The
        // active's were two files (its kernel makes no such rename), so `from` must
        // go; `to` already names the file it moved.
        if !exchange && from != to {
            let from_st = sys::statat(from_dir.as_fd(), &from_name);
            let to_st = sys::statat(to_dir.as_fd(), &to_name);
            if let (Ok(a), Ok(b)) = (&from_st, &to_st) {
                if key(a) == key(b) && !is_dir(a) {
                    sys::unlinkat(from_dir.as_fd(), &from_name, 0).map_err(|source| {
                        ApplyError::Rename {
                            from: from.clone(),
                            to: to.clone(),
                            source,
                        }
                    })?;
                    sys::fsync_dir(from_dir.as_fd())
                        .map_err(io_err("fsync the parent directory of", from))?;
                    tracing::debug!(%from, %to, "renamed one name of a file over another: removed the first");
                    return Ok(());
                }
            }
        }
        let flags = if exchange { libc::RENAME_EXCHANGE } else { 0 };
        sys::renameat2(
            from_dir.as_fd(),
            &from_name,
            to_dir.as_fd(),
            &to_name,
            flags,
        )
        .map_err(|source| ApplyError::Rename {
            from: from.clone(),
            to: to.clone(),
            source,
        })?;
        sys::fsync_dir(from_dir.as_fd()).map_err(io_err("fsync the parent directory of", from))?;
        if from.split_last().map(|(p, _)| p) != to.split_last().map(|(p, _)| p) {
            sys::fsync_dir(to_dir.as_fd()).map_err(io_err("fsync the parent directory of", to))?;
        }
        tracing::debug!(%from, %to, exchange, "renamed");
        Ok(())
    }

    /// [`Applier::rename`] of what the active never sent as it is (`Op::Rename`'s
    /// `unsent`): without `from` here nothing moves, and the new name keeps what it
    /// holds until the op shipping it follows. For an exchange, a side missing here
    /// takes the other's entry, as if it had been an empty slot. A directory missing
    /// on the way to where it goes is made (empty, 0700): the active sent it as gone
    /// (it was removed, or moved away, right after), and the op saying what became of
    /// it follows. (The standby also applies a rename of a large file whose stream the
    /// active gave up on this way.)
    pub fn rename_unsent(&self, from: &RelPath, to: &RelPath, exchange: bool) -> Result<()> {
        let from_here = self.exists(from)?;
        if !exchange {
            return match from_here {
                true => {
                    self.make_parents(to)?;
                    self.rename(from, to, false)
                }
                false => Ok(()),
            };
        }
        match (from_here, self.exists(to)?) {
            (true, true) => self.rename(from, to, true),
            (true, false) => {
                self.make_parents(to)?;
                self.rename(from, to, false)
            }
            (false, true) => {
                self.make_parents(from)?;
                self.rename(to, from, false)
            }
            (false, false) => Ok(()),
        }
    }

    /// Makes the directories missing on the way to `path`, each empty and 0700 (see
    /// [`Applier::rename_unsent`]). Anything else in the way is left for the op to
    /// fail on.
    fn make_parents(&self, path: &RelPath) -> Result<()> {
        // The missing ones, nearest first (found in a loop: a path may be deeper than
        // the call stack allows), made from the top down.
        let mut missing = Vec::new();
        let mut up = path.split_last().map(|(parent, _)| parent);
        while let Some(parent) = up {
            if parent.is_root() || self.exists(&parent)? {
                break;
            }
            up = parent.split_last().map(|(parent, _)| parent);
            missing.push(parent);
        }
        for parent in missing.into_iter().rev() {
            let (dir, name) = self.open_parent(&parent)?;
            match sys::mkdirat(dir.as_fd(), &name, 0o700) {
                Ok(()) => {
                    sys::fsync_dir(dir.as_fd())
                        .map_err(io_err("fsync the parent directory of", &parent))?;
                    tracing::debug!(path = %parent, "made a directory the active sent as gone, for a rename into it");
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err("create directory", &parent)(e)),
            }
        }
        Ok(())
    }

    /// Whether a regular file is at `path` (a missing directory on its way means
    /// none).
    pub fn has_file(&self, path: &RelPath) -> Result<bool> {
        let (dir, name) = match self.open_parent(path) {
            Err(e) if e.is_missing() => return Ok(false),
            other => other?,
        };
        Ok(regular_at(dir.as_fd(), &name, path)?.is_some())
    }

    /// Whether `path` is here (a symlink as itself); a missing directory on its way
    /// means it is not.
    pub fn exists(&self, path: &RelPath) -> Result<bool> {
        let (dir, name) = match self.open_parent(path) {
            Err(e) if e.is_missing() => return Ok(false),
            other => other?,
        };
        match sys::statat(dir.as_fd(), &name) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("stat", path)(e)),
        }
    }

    /// Removes `path`: a file, symlink or node is unlinked (a symlink itself, never its
    /// target); a directory is removed with everything below it, without following
    /// any symlink or entering another filesystem. Missing is fine.
    pub fn delete(&self, path: &RelPath) -> Result<()> {
        self.remove(path, Some(&|_: &RelPath| false)).map(|_| ())
    }

    /// [`Applier::delete`], except that every path below `path` for which `keep` is
    /// true stays, with what is below it, and so do the directories above it. Returns
    /// whether anything stayed (then `path` is still there, a directory).
    pub fn delete_keeping(&self, path: &RelPath, keep: &dyn Fn(&RelPath) -> bool) -> Result<bool> {
        self.remove(path, Some(keep))
    }

    /// Removes `path` as `unlink(2)` or `rmdir(2)` would: a directory only if it is
    /// empty ([`ApplyError::NotEmpty`] otherwise), never what is below it. Missing is
    /// fine.
    pub fn delete_entry(&self, path: &RelPath) -> Result<()> {
        self.remove(path, None).map(|_| ())
    }

    /// Removes `path`; a directory with what is below it if `tree` says which paths
    /// below it stay (none: only an empty directory goes). Whether anything stayed.
    fn remove(&self, path: &RelPath, tree: Option<&dyn Fn(&RelPath) -> bool>) -> Result<bool> {
        if path.is_root() {
            return Err(ApplyError::Root { op: "delete" });
        }
        let (dir, name) = match self.open_parent(path) {
            // Nothing can be there: a directory on the way is missing, or is a file
            // here (the active sent what its name holds now ahead of this removal of
            // what it held before).
            Err(e) if e.is_missing() || e.is_not_directory() => return Ok(false),
            other => other?,
        };
        let dir = dir.as_fd();
        let st = match sys::statat(dir, &name) {
            Ok(st) => st,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err("stat", path)(e)),
        };
        let mut kept = false;
        if let (true, Some(keep)) = (is_dir(&st), tree) {
            kept = self.remove_tree(dir, &name, path, keep)?;
        } else if is_dir(&st) {
            match ignore_missing(sys::unlinkat(dir, &name, libc::AT_REMOVEDIR)) {
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                    return Err(ApplyError::NotEmpty { path: path.clone() })
                }
                other => other.map_err(io_err("remove directory", path))?,
            }
        } else {
            ignore_missing(sys::unlinkat(dir, &name, 0)).map_err(io_err("unlink", path))?;
        }
        sys::fsync_dir(dir).map_err(io_err("fsync the parent directory of", path))?;
        if kept {
            tracing::info!(%path, "deleted what is below, but kept the paths this node never syncs");
        } else {
            tracing::debug!(%path, "deleted");
        }
        Ok(kept)
    }

    /// Removes the directory `name` in `parent` and everything below it but the paths
    /// `keep` names (and the directories above them), depth first with an explicit
    /// stack (a tree may be deeper than the call stack allows). Whether anything stayed.
    fn remove_tree(
        &self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        path: &RelPath,
        keep: &dyn Fn(&RelPath) -> bool,
    ) -> Result<bool> {
        let top = open_subdir(parent, name, path)?;
        let mut stack = vec![top];
        let mut kept = false;
        while let Some(level) = stack.last_mut() {
            if let Some(entry) = level.entries.pop() {
                let child = level
                    .path
                    .join(&entry.name)
                    .unwrap_or_else(|_| level.path.clone());
                if keep(&child) {
                    level.kept = true;
                } else if entry_is_dir(level.fd.as_fd(), &entry).map_err(io_err("stat", &child))? {
                    let sub = open_subdir(level.fd.as_fd(), &entry.name, &child)?;
                    stack.push(sub);
                } else {
                    ignore_missing(sys::unlinkat(level.fd.as_fd(), &entry.name, 0))
                        .map_err(io_err("unlink", &child))?;
                }
                continue;
            }
            // Emptied (but for what stays): remove the directory itself from the one
            // above it.
            let Some(done) = stack.pop() else { break };
            if done.kept {
                match stack.last_mut() {
                    Some(above) => above.kept = true,
                    None => kept = true,
                }
                continue;
            }
            let above = stack.last().map_or(parent, |l| l.fd.as_fd());
            ignore_missing(sys::unlinkat(above, &done.name, libc::AT_REMOVEDIR))
                .map_err(io_err("remove directory", &done.path))?;
        }
        Ok(kept)
    }

    /// Removes every `.twinfs-tmp.*` entry in the volume (left by a crash between
    /// creating a temp entry and renaming it into place), logging each; returns how
    /// many. Does not follow symlinks or enter other filesystems. Only for a volume
    /// nothing else is applying to (the daemon calls it before the mount).
    pub fn remove_stale_temps(&self) -> Result<usize> {
        let root = RelPath::root();
        let mut pending = vec![Level {
            entries: sys::read_dir(self.root).map_err(io_err("list", &root))?,
            fd: self
                .root
                .try_clone_to_owned()
                .map_err(io_err("duplicate the fd of", &root))?,
            name: OsString::new(),
            path: root,
            kept: false,
        }];
        let mut removed = 0;
        while let Some(level) = pending.pop() {
            for entry in &level.entries {
                let child = level
                    .path
                    .join(&entry.name)
                    .unwrap_or_else(|_| level.path.clone());
                let is_dir =
                    entry_is_dir(level.fd.as_fd(), entry).map_err(io_err("stat", &child))?;
                if is_dir {
                    match open_subdir(level.fd.as_fd(), &entry.name, &child) {
                        Ok(sub) => pending.push(sub),
                        // Another filesystem mounted inside is not ours to clean.
                        Err(ApplyError::Escape { .. }) => {}
                        Err(e) => return Err(e),
                    }
                } else if entry.name.as_bytes().starts_with(TEMP_PREFIX.as_bytes()) {
                    // Only for the log: what a crash cost, and where.
                    let size =
                        sys::statat(level.fd.as_fd(), &entry.name).map_or(0, |st| st.st_size);
                    match sys::unlinkat(level.fd.as_fd(), &entry.name, 0) {
                        Ok(()) => {
                            tracing::info!(path = %child, size, "removed a stale temp entry");
                            removed += 1;
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io_err("remove stale temp", &child)(e)),
                    }
                }
            }
        }
        Ok(removed)
    }
}

/// One directory being walked: its fd, the entries not handled yet, its name in its
/// parent, its volume path (for errors), and whether something in it stays.
struct Level {
    fd: OwnedFd,
    entries: Vec<DirEntry>,
    name: OsString,
    path: RelPath,
    kept: bool,
}

/// Opens and lists the subdirectory `name` of `parent`, refusing symlinks and mount
/// points, bind mounts of the volume's own filesystem included ([`open_entry`]).
fn open_subdir(parent: BorrowedFd<'_>, name: &OsStr, path: &RelPath) -> Result<Level> {
    let fd = open_entry(parent, name, libc::O_PATH | libc::O_DIRECTORY)
        .map_err(entry_err("open directory", path))?;
    Ok(Level {
        entries: sys::read_dir(fd.as_fd()).map_err(io_err("list", path))?,
        fd,
        name: name.to_owned(),
        path: path.clone(),
        kept: false,
    })
}

/// Whether a listed entry is a directory (not a symlink to one), asking the inode when
/// the filesystem does not fill in the entry type.
fn entry_is_dir(dir: BorrowedFd<'_>, entry: &DirEntry) -> io::Result<bool> {
    match entry.kind {
        libc::DT_DIR => Ok(true),
        libc::DT_UNKNOWN => Ok(is_dir(&sys::statat(dir, &entry.name)?)),
        _ => Ok(false),
    }
}

/// A removal that finds nothing there has reached its goal.
fn ignore_missing(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

pub(crate) fn is_dir(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// Fails with [`ApplyError::IsDirectory`] if `name` in `dir` is a directory: a rename
/// would refuse it anyway, but only after the whole new content had been written.
fn refuse_directory(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    path: &RelPath,
    want: &'static str,
) -> Result<()> {
    match sys::statat(dir, name) {
        Ok(st) if is_dir(&st) => Err(ApplyError::IsDirectory {
            path: path.clone(),
            want,
        }),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("stat", path)(e)),
    }
}

/// Opens `name` in `dir` for reading if it is a regular file; `None` if it is missing
/// or something else. Never opens a FIFO or a device, whose open may block or act.
fn open_regular(dir: BorrowedFd<'_>, name: &OsStr, path: &RelPath) -> Result<Option<OwnedFd>> {
    if regular_at(dir, name, path)?.is_none() {
        return Ok(None);
    }
    let fd = open_entry(dir, name, libc::O_RDONLY | libc::O_NONBLOCK)
        .map_err(entry_err("open", path))?;
    let st = sys::fstat(fd.as_fd()).map_err(io_err("stat", path))?;
    Ok(is_regular(&st).then_some(fd))
}

/// The status of `name` in `dir` (not followed) if it is a regular file; `None` if it
/// is missing or something else.
fn regular_at(dir: BorrowedFd<'_>, name: &OsStr, path: &RelPath) -> Result<Option<Stat>> {
    match sys::statat(dir, name) {
        Ok(st) if is_regular(&st) && !name.is_empty() => Ok(Some(st)),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("stat", path)(e)),
    }
}

fn is_regular(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG
}

/// An inode's (device, inode).
fn key(st: &Stat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

/// How much of a large file is written before the disk is asked to start on it.
const WRITEBACK_STEP: u64 = 8 << 20;

/// A file written beside its target by [`Applier::prepare_file`], not yet in place;
/// removed when dropped unless placed.
pub struct Prepared {
    dir: OwnedFd,
    name: OsString,
    temp: OsString,
    path: RelPath,
    dir_times: Option<[libc::timespec; 2]>,
    new_too: bool,
    hold: DirHold,
    dir_key: Option<(u64, u64)>,
    temp_key: Option<(u64, u64)>,
    placed: bool,
    blocks: Option<BlockList>,
}

impl Prepared {
    /// It will not be placed because this node is no longer a standby: removing the
    /// temp entry leaves the directory's times as they are (a local write may have
    /// moved them since).
    pub fn give_up_on_active(&mut self) {
        self.new_too = false;
    }

    /// The block list of the new file, if it was built from blocks.
    pub fn take_blocks(&mut self) -> Option<BlockList> {
        self.blocks.take()
    }

    /// Takes over a temp file `handed` over by its guard ([`TempEntry::hand_over`]),
    /// of which `file` is an open fd, in the directory `dir`, to become `name`.
    fn new(
        dir: OwnedFd,
        name: OsString,
        path: &RelPath,
        handed: Handed,
        file: BorrowedFd<'_>,
    ) -> Prepared {
        let key = |st: sys::Stat| (st.st_dev, st.st_ino);
        Prepared {
            dir_key: sys::fstat(dir.as_fd()).ok().map(key),
            temp_key: sys::fstat(file).ok().map(key),
            dir,
            name,
            temp: handed.temp,
            path: path.clone(),
            dir_times: handed.dir_times,
            new_too: handed.new_too,
            hold: handed.hold,
            placed: false,
            blocks: None,
        }
    }

    /// Makes the temp file's content and metadata durable (fsync).
    pub fn sync_data(&self) -> Result<()> {
        let file = sys::openat(
            self.dir.as_fd(),
            &self.temp,
            libc::O_RDONLY | libc::O_NOFOLLOW,
            0,
        )
        .map_err(io_err("open the temp file of", &self.path))?;
        sys::fsync(file.as_fd(), false).map_err(io_err("fsync", &self.path))
    }

    /// The path it is for.
    pub fn path(&self) -> &RelPath {
        &self.path
    }

    /// Its parent directory's backing (device, inode), if it could be read.
    pub fn dir_key(&self) -> Option<(u64, u64)> {
        self.dir_key
    }

    /// The name it will take in its parent directory.
    pub fn name(&self) -> &std::ffi::OsStr {
        &self.name
    }

    /// The name of the temp file it is written to until it is put in place.
    pub fn temp_name(&self) -> &std::ffi::OsStr {
        &self.temp
    }

    /// The temp file's backing (device, inode), if it could be read.
    pub fn temp_key(&self) -> Option<(u64, u64)> {
        self.temp_key
    }

    /// Gives it the parent directory's times recorded in `first` for an earlier file of
    /// the same batch in the same directory (or records its own): a batch's temp
    /// files move the directory's mtime, and each placed file restores the time from
    /// before the first of them.
    pub fn share_dir_times(&mut self, first: &mut DirTimesSeen) {
        if let Some(key) = self.dir_key {
            self.dir_times = *first.entry(key).or_insert(self.dir_times);
        }
    }
}

/// A file [`Applier::place_visible`] put in place whose directory entry may not be
/// durable yet.
pub struct Placed {
    dir: OwnedFd,
    path: RelPath,
}

impl Placed {
    /// Makes the rename durable (fsync of the parent directory).
    pub fn sync(self) -> Result<()> {
        sys::fsync_dir(self.dir.as_fd())
            .map_err(io_err("fsync the parent directory of", &self.path))
    }
}

/// Directory times by (device, inode), kept across one batch of prepared files.
pub type DirTimesSeen = std::collections::HashMap<(u64, u64), Option<[libc::timespec; 2]>>;

impl Drop for Prepared {
    fn drop(&mut self) {
        if self.placed {
            return;
        }
        remove_temp(
            self.dir.as_fd(),
            &self.temp,
            self.dir_times.filter(|_| self.new_too),
        );
    }
}

/// Removes a temp entry that is not to be placed (a large file whose active gave up
/// on its version, a failed apply), and gives the directory back `times`, from
/// before it: on a standby (`new_too`), making and removing it were this node's own
/// doing. (On an active, applying an upstream write, a local create may have moved
/// them meanwhile: they are left.)
fn remove_temp(dir: BorrowedFd<'_>, name: &OsStr, times: Option<[libc::timespec; 2]>) {
    match sys::unlinkat(dir, name, 0) {
        Ok(()) => {
            if let Some(times) = times {
                if let Err(e) = At::Fd(dir).utimens(&times) {
                    tracing::warn!(name = ?name, error = %e,
                        "could not restore the times of a directory after removing a temp entry");
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(name = ?name, error = %e, "could not remove a temp entry"),
    }
}

/// A temp entry handed over by [`TempEntry::hand_over`]: its name, and how to treat
/// the directory's times.
struct Handed {
    temp: OsString,
    dir_times: Option<[libc::timespec; 2]>,
    new_too: bool,
    hold: DirHold,
}

/// A temp entry in a directory, removed when dropped unless it was renamed into place.
struct TempEntry<'d> {
    dir: BorrowedFd<'d>,
    name: OsString,
    placed: bool,
    /// The directory's times before the temp entry was made, restored once it is in
    /// place: the standby's own temp entries and renames are not the active's.
    dir_times: Option<[libc::timespec; 2]>,
    /// Whether they are restored when the entry is new too, not only when it replaces
    /// one (see [`Applier::upstream`]).
    new_too: bool,
    /// Keeps `dir_times` for the directory's other temp entries made meanwhile.
    hold: DirHold,
}

impl TempEntry<'_> {
    /// Ends the guard without removing the temp file, whose care passes to the caller
    /// (a [`Prepared`]): its name and the directory's times from before it.
    fn hand_over(mut self) -> Handed {
        self.placed = true;
        Handed {
            temp: std::mem::take(&mut self.name),
            dir_times: self.dir_times,
            new_too: self.new_too,
            hold: std::mem::take(&mut self.hold),
        }
    }
}

impl Drop for TempEntry<'_> {
    fn drop(&mut self) {
        if self.placed {
            return;
        }
        remove_temp(
            self.dir,
            &self.name,
            self.dir_times.filter(|_| self.new_too),
        );
    }
}

/// Directories that hold temp entries of this process now, by (device, inode): their
/// times from before the first of those entries, and how many there are. Temp files
/// made side by side in one directory (a large file built while others are, or while
/// a batch of small ones is written) each move its mtime; each placed one restores
/// the times from before the first, not those its own creation found.
static HELD_DIRS: std::sync::Mutex<std::collections::BTreeMap<(u64, u64), HeldTimes>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// A directory's times (atime, mtime) and how many temp entries hold them.
type HeldTimes = ([libc::timespec; 2], usize);

/// One temp entry's count in [`HELD_DIRS`], given back when dropped.
#[derive(Default)]
struct DirHold(Option<(u64, u64)>);

impl Drop for DirHold {
    fn drop(&mut self) {
        let Some(key) = self.0.take() else {
            return;
        };
        let mut held = HELD_DIRS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, count)) = held.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                held.remove(&key);
            }
        }
    }
}

/// The times of `dir` from before the first temp entry now in it (its times now if
/// there is none), and a hold on them for one more.
fn hold_dir_times(dir: BorrowedFd<'_>) -> (Option<[libc::timespec; 2]>, DirHold) {
    let Ok(st) = sys::fstat(dir) else {
        return (None, DirHold::default());
    };
    let key = (st.st_dev, st.st_ino);
    let now = [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ];
    let mut held = HELD_DIRS.lock().unwrap_or_else(|e| e.into_inner());
    let (times, count) = held.entry(key).or_insert((now, 0));
    *count += 1;
    (Some(*times), DirHold(Some(key)))
}

/// A fresh temp name. `RandomState` is seeded from the OS once per thread; the counter
/// and the pid set apart names made here; `O_EXCL`/`EEXIST` catches any clash left.
fn temp_name() -> OsString {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    OsString::from(format!("{TEMP_PREFIX}{:016x}", hasher.finish()))
}

/// Creates a temp entry in `dir` with `make`, which must fail with `EEXIST` if the
/// name is taken; returns the guard and what `make` returned.
fn create_temp<T>(
    dir: BorrowedFd<'_>,
    new_too: bool,
    mut make: impl FnMut(&OsStr) -> io::Result<T>,
) -> io::Result<(TempEntry<'_>, T)> {
    let mut last = io::Error::from_raw_os_error(libc::EEXIST);
    let (dir_times, mut hold) = hold_dir_times(dir);
    for _ in 0..TEMP_ATTEMPTS {
        let name = temp_name();
        match make(&name) {
            Ok(made) => {
                let temp = TempEntry {
                    dir,
                    name,
                    placed: false,
                    dir_times,
                    new_too,
                    hold: std::mem::take(&mut hold),
                };
                return Ok((temp, made));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Sets the metadata of a temp file, fsyncs it and renames it over `name`.
fn commit_file(
    temp: TempEntry<'_>,
    file: BorrowedFd<'_>,
    name: &OsStr,
    path: &RelPath,
    meta: &FileMeta,
) -> Result<()> {
    apply_meta(At::Fd(file), true, meta, path)?;
    // Metadata before the fsync, so that one fsync makes content and metadata durable
    // together and the renamed file is never seen with the temp file's 0600.
    sys::fsync(file, false).map_err(io_err("fsync", path))?;
    place(temp, name, path, "file")
}

/// Renames a finished temp entry over `name` in the same directory, then fsyncs the
/// directory so the rename itself survives a crash.
fn place(temp: TempEntry<'_>, name: &OsStr, path: &RelPath, want: &'static str) -> Result<()> {
    place_with(temp, name, path, want, true)
}

/// [`place`], with the directory fsync left to the caller when `sync` is false.
fn place_with(
    mut temp: TempEntry<'_>,
    name: &OsStr,
    path: &RelPath,
    want: &'static str,
    sync: bool,
) -> Result<()> {
    let dir = temp.dir;
    let restore = match temp.new_too {
        true => temp.dir_times,
        false => temp.dir_times.filter(|_| sys::statat(dir, name).is_ok()),
    };
    sys::renameat2(dir, &temp.name, dir, name, 0).map_err(|e| match e.raw_os_error() {
        // A directory appeared since the check.
        Some(libc::EISDIR) => ApplyError::IsDirectory {
            path: path.clone(),
            want,
        },
        _ => io_err("rename into place", path)(e),
    })?;
    temp.placed = true;
    if let Some(times) = restore {
        // On a standby, the directory's times are the active's, as its last op set
        // them: replacing an entry's content left the active's directory untouched,
        // and a new entry moved it then, which the directory's own op after it brings
        // (one that came first, while the active held the file back as it was being
        // written, already counts it). Only cosmetic: the rename is done and must still be made
        // durable, so a failure here is logged, not returned (the caller would take
        // the change as not made).
        if let Err(e) = At::Fd(dir).utimens(&times) {
            tracing::warn!(%path, error = %e,
                "could not restore the times of the parent directory after placing");
        }
    }
    if !sync {
        return Ok(());
    }
    sys::fsync_dir(dir).map_err(io_err("fsync the parent directory of", path))
}

/// Sets `meta` on the entry `name` in `dir` (`dir` itself for an empty name) without
/// following it if it is a symlink; returns its file type (`S_IF*`).
fn meta_on_entry(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    path: &RelPath,
    meta: &FileMeta,
) -> Result<u32> {
    // O_PATH pins the inode without opening it: FIFOs and devices must not be opened.
    let fd = if name.is_empty() {
        dir.try_clone_to_owned()
    } else {
        open_entry(dir, name, libc::O_PATH)
    }
    .map_err(entry_err("open", path))?;
    let kind = sys::fstat(fd.as_fd())
        .map_err(io_err("stat", path))?
        .st_mode
        & libc::S_IFMT;
    if kind == libc::S_IFLNK {
        // Addressed by name: chown and utimens take AT_SYMLINK_NOFOLLOW, and a symlink
        // has no mode of its own to set.
        apply_meta(At::Entry(dir, name), false, meta, path)?;
    } else {
        apply_meta(At::Fd(fd.as_fd()), true, meta, path)?;
    }
    Ok(kind)
}

/// Owner, then mode, then xattrs, then times: chown clears set-id bits and file
/// capabilities, and every other change would move the times again.
fn apply_meta(at: At<'_>, chmod: bool, meta: &FileMeta, path: &RelPath) -> Result<()> {
    let st = at.stat().map_err(io_err("stat", path))?;
    // Skipped when already right, so that an unprivileged daemon can apply its own files.
    if st.st_uid != meta.uid || st.st_gid != meta.gid {
        at.chown(Some(meta.uid), Some(meta.gid))
            .map_err(io_err("chown", path))?;
    }
    if chmod {
        at.chmod(meta.mode & 0o7777)
            .map_err(io_err("chmod", path))?;
    }
    sync_xattrs(at, &meta.xattrs, path)?;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: meta.mtime.0 as libc::time_t,
            tv_nsec: meta.mtime.1 as libc::c_long,
        },
    ];
    at.utimens(&times).map_err(io_err("set the times of", path))
}

/// Makes the xattrs of `at` exactly `wanted`.
fn sync_xattrs(at: At<'_>, wanted: &[(Vec<u8>, Vec<u8>)], path: &RelPath) -> Result<()> {
    let present = match list_xattrs(at) {
        Ok(names) => names,
        // A filesystem without xattrs already matches an empty set.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) && wanted.is_empty() => return Ok(()),
        Err(e) => return Err(io_err("list the xattrs of", path)(e)),
    };
    for name in present
        .iter()
        .filter(|n| !wanted.iter().any(|(w, _)| w == *n))
    {
        match at.removexattr(OsStr::from_bytes(name)) {
            Err(e) if e.raw_os_error() != Some(libc::ENODATA) => {
                return Err(io_err("remove an xattr of", path)(e))
            }
            _ => {}
        }
    }
    for (name, value) in wanted {
        at.setxattr(OsStr::from_bytes(name), value, 0)
            .map_err(io_err("set an xattr of", path))?;
    }
    Ok(())
}

/// The names of the xattrs of `at`.
fn list_xattrs(at: At<'_>) -> io::Result<Vec<Vec<u8>>> {
    loop {
        let size = at.listxattr(&mut [])?;
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size];
        match at.listxattr(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf
                    .split(|&b| b == 0)
                    .filter(|n| !n.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect());
            }
            // An xattr was added between the two calls: ask for the size again.
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => {}
            Err(e) => return Err(e),
        }
    }
}

/// A new owner-only file in `dir` for a kept copy being written, and its name: never
/// `avoid` (the name it is to take), never through a symlink, nor over a temp file a
/// crash left (`O_EXCL`: the next name is tried).
pub(crate) fn keep_temp(dir: BorrowedFd<'_>, avoid: &OsStr) -> io::Result<(OsString, OwnedFd)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    loop {
        let temp = OsString::from(format!(
            ".keep.tmp-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        if temp == avoid {
            continue;
        }
        match sys::openat(
            dir,
            &temp,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            0o600,
        ) {
            Ok(fd) => return Ok((temp, fd)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Copies the first `len` bytes of `src` into the empty `dst` (more is fine: the caller
/// truncates). Clones extents where the filesystem can (btrfs, XFS), else copies in
/// the kernel, else by hand.
fn copy_prefix(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    // SAFETY: both fds are valid for the call; FICLONE takes the source fd as argument
    // and fails without side effects where cloning is not supported.
    if unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0 {
        return Ok(());
    }
    // Only the data: holes of a sparse file stay holes (the standby's disk holds what
    // the active's does), found with SEEK_DATA and SEEK_HOLE where the filesystem
    // tells them; the copy ends at `len` however much of it is a hole.
    let mut at = 0u64;
    while at < len {
        let data = match sys::lseek(src, at as i64, libc::SEEK_DATA) {
            Ok(d) => d as u64,
            // Nothing but a hole from `at` on.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            // No hole search here: all of it is data.
            Err(_) => at,
        };
        if data >= len {
            break;
        }
        let hole = match sys::lseek(src, data as i64, libc::SEEK_HOLE) {
            Ok(h) => (h as u64).clamp(data, len),
            Err(_) => len,
        };
        copy_range(src, dst, data, hole)?;
        at = hole.max(data + 1);
    }
    sys::ftruncate(dst, len)
}

/// Copies bytes `from..to` of `src` to the same offsets of `dst`.
fn copy_range(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, from: u64, to: u64) -> io::Result<()> {
    let mut done = from;
    while done < to {
        let mut off_in = done as libc::loff_t;
        let mut off_out = done as libc::loff_t;
        let chunk = (to - done).min(1 << 30) as usize;
        // SAFETY: valid fds; the offsets point to live loff_t values the kernel updates.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                chunk,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // Not offered by this kernel or for this pair of files.
                Some(libc::ENOSYS | libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP) => {
                    return copy_by_hand(src, dst, done, to)
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            // The source is shorter than it was when measured; the truncate pads.
            break;
        }
        done += n as u64;
    }
    Ok(())
}

/// Reads into all of `buf` from `offset` unless the file ends first: the bytes read.
pub(crate) fn read_full(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match sys::pread(fd, &mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Reads `len` bytes from `offset` into a new buffer, fewer only where the file ends.
/// The buffer is not zeroed first (for large files that showed in profiles): `pread`
/// fills what is kept.
pub(crate) fn read_new(fd: BorrowedFd<'_>, len: usize, offset: u64) -> io::Result<Vec<u8>> {
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let want = len - buf.len();
        let at = offset + buf.len() as u64;
        let spare = buf.spare_capacity_mut();
        // SAFETY: `spare` has room for at least `want` bytes, and pread writes at most
        // `want` bytes into it.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                want,
                at as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        // SAFETY: the kernel initialized the `n` bytes after the current length.
        unsafe { buf.set_len(buf.len() + n as usize) };
    }
    Ok(buf)
}

/// Writes one block of a file being built at `offset`. A block of zeros is not
/// written: past `copied` (the bytes copied from the current version) the file has a
/// hole there already (the final truncate sets its size); before it, a hole is
/// punched over the old bytes where the filesystem can. So a sparse file stays sparse.
fn write_block(file: BorrowedFd<'_>, data: &[u8], offset: u64, copied: u64) -> io::Result<()> {
    if !data.is_empty() && data.iter().all(|&b| b == 0) {
        let end = offset + data.len() as u64;
        if offset >= copied {
            return Ok(());
        }
        if end <= copied {
            let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            if sys::fallocate(file, punch, offset, data.len() as u64).is_ok() {
                return Ok(());
            }
        }
    }
    let mut at = 0usize;
    while at < data.len() {
        let n = sys::pwrite(file, &data[at..], offset + at as u64)?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        at += n;
    }
    Ok(())
}

/// Copies bytes `from..len` of `src` into `dst` through a buffer.
fn copy_by_hand(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, from: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUF];
    let mut offset = from;
    while offset < len {
        let want = (len - offset).min(COPY_BUF as u64) as usize;
        let n = sys::pread(src, &mut buf[..want], offset)?;
        if n == 0 {
            break;
        }
        sys::pwrite(dst, &buf[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

/// What `openat2` may not cross on its way: nothing that leads out of the volume.
const RESOLVE_IN_VOLUME: u64 = libc::RESOLVE_BENEATH
    | libc::RESOLVE_NO_SYMLINKS
    | libc::RESOLVE_NO_MAGICLINKS
    | libc::RESOLVE_NO_XDEV;

/// `openat2(dir, path, flags, RESOLVE_IN_VOLUME)`, retried when a concurrent rename
/// asks for it; `None` once `openat2` is known to be missing.
fn openat2_in_volume(dir: BorrowedFd<'_>, path: &OsStr, flags: i32) -> Option<io::Result<OwnedFd>> {
    if OPENAT2_MISSING.load(Ordering::Relaxed) {
        return None;
    }
    let mut retries = 0;
    loop {
        match openat2(dir, path, flags, RESOLVE_IN_VOLUME) {
            // A rename elsewhere raced with the lookup; the kernel asks to try again.
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && retries < OPENAT2_RETRIES => {
                retries += 1;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                OPENAT2_MISSING.store(true, Ordering::Relaxed);
                tracing::info!("openat2 is missing (Linux before 5.6); resolving paths one component at a time");
                return None;
            }
            other => return Some(other),
        }
    }
}

/// Opens the directory `parent` (not the root) beneath `root` without crossing any
/// symlink or mount point. Fails with `ELOOP` at a symlink and `EXDEV` at a mount
/// point, from `openat2` or from the walk alike.
fn open_beneath(root: BorrowedFd<'_>, parent: &RelPath) -> io::Result<OwnedFd> {
    openat2_in_volume(
        root,
        parent.as_path().as_os_str(),
        libc::O_PATH | libc::O_DIRECTORY,
    )
    .unwrap_or_else(|| walk_beneath(root, parent))
}

/// The walk `open_beneath` falls back to: one [`open_entry_walk`] per component.
fn walk_beneath(root: BorrowedFd<'_>, parent: &RelPath) -> io::Result<OwnedFd> {
    let mut dir = root.try_clone_to_owned()?;
    for name in parent.components() {
        let next = match open_entry_walk(dir.as_fd(), name, libc::O_PATH | libc::O_DIRECTORY) {
            Ok(fd) => fd,
            Err(e) => {
                // O_NOFOLLOW with O_DIRECTORY reports a symlink as ENOTDIR; say which.
                let is_link = sys::statat(dir.as_fd(), name)
                    .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK);
                return Err(if is_link {
                    io::Error::from_raw_os_error(libc::ELOOP)
                } else {
                    e
                });
            }
        };
        dir = next;
    }
    Ok(dir)
}

/// Opens the entry `name` (one component, not empty) of `dir` with `flags` (plus
/// `O_NOFOLLOW`: with `O_PATH` a symlink is opened itself, otherwise it is `ELOOP`),
/// never entering a mount point: a bind mount inside the volume (of a directory or of
/// a single file) fails with `EXDEV` even when it shares the volume's filesystem.
fn open_entry(dir: BorrowedFd<'_>, name: &OsStr, flags: i32) -> io::Result<OwnedFd> {
    openat2_in_volume(dir, name, flags | libc::O_NOFOLLOW)
        .unwrap_or_else(|| open_entry_walk(dir, name, flags))
}

/// [`open_entry`] without `openat2`: `openat(O_NOFOLLOW)`, which does enter a mount
/// point, then a comparison of mount ids (the device alone is the same for a bind
/// mount). Every directory fd handed in was itself reached from the root this way, so
/// its mount is the root's.
fn open_entry_walk(dir: BorrowedFd<'_>, name: &OsStr, flags: i32) -> io::Result<OwnedFd> {
    let fd = sys::openat(dir, name, flags, 0)?;
    if sys::mount_id(fd.as_fd())? != sys::mount_id(dir)? {
        return Err(io::Error::from_raw_os_error(libc::EXDEV));
    }
    Ok(fd)
}

/// `openat2(dir, path, flags | O_CLOEXEC, resolve)`; libc has no wrapper for it.
fn openat2(dir: BorrowedFd<'_>, path: &OsStr, flags: i32, resolve: u64) -> io::Result<OwnedFd> {
    let c =
        CString::new(path.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain integers; all zeros is its "no options" value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = resolve;
    // SAFETY: valid fd, a NUL-terminated string, and a pointer to an open_how whose
    // size is passed along; the kernel only reads both.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a non-negative return is a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

/// An entry below a directory [`Applier::copy_out`] copies: its path, the copy of its
/// directory, and its name there.
struct Below {
    path: RelPath,
    into: Arc<OwnedFd>,
    name: OsString,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::path::Path;

    fn rel(p: &str) -> RelPath {
        RelPath::new(p).expect("valid path")
    }

    /// A tree as deep as a path can name (2,000 levels) is kept, and the directories
    /// on the way to a rename's target are made, without a recursion: on a thread with
    /// a small stack.
    #[test]
    fn a_tree_as_deep_as_a_path_allows_is_copied_out_and_made() {
        let vol = tempfile::tempdir().expect("tempdir");
        let keep = tempfile::tempdir().expect("tempdir");
        let depth = 2000;
        let deep = format!("{}f", "d/".repeat(depth));
        std::fs::create_dir_all(vol.path().join("d/".repeat(depth))).expect("mkdir");
        std::fs::write(vol.path().join(&deep), "deep\n").expect("write");
        std::fs::write(vol.path().join("src"), "moved\n").expect("write");
        let root = sys::open_dir_path(vol.path()).expect("open");
        let into = sys::open_dir_path(keep.path()).expect("open");
        let target = format!("{}g", "e/".repeat(depth));
        let moved_to = target.clone();
        let done = std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || {
                let applier = Applier::new(root.as_fd());
                let copied = applier
                    .copy_out(&rel("d"), into.as_fd(), OsStr::new("d"), &|_| false)
                    .expect("copy out");
                applier
                    .rename_unsent(&rel("src"), &rel(&moved_to), false)
                    .expect("rename");
                copied
            })
            .expect("thread")
            .join()
            .expect("no overflow");
        assert_eq!(done, depth as u64 + 1);
        assert_eq!(
            std::fs::read_to_string(keep.path().join(&deep)).expect("kept"),
            "deep\n"
        );
        assert_eq!(
            std::fs::read_to_string(vol.path().join(&target)).expect("moved"),
            "moved\n"
        );
    }

    #[test]
    fn walk_fallback_refuses_symlinks_and_opens_real_dirs() {
        let vol = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(vol.path().join("a/b")).expect("mkdir");
        symlink(outside.path(), vol.path().join("a/evil")).expect("symlink");
        symlink("b", vol.path().join("a/inner")).expect("symlink");
        let root = sys::open_dir_path(vol.path()).expect("open root");

        let fd = walk_beneath(root.as_fd(), &rel("a/b")).expect("real directory");
        assert!(is_dir(&sys::fstat(fd.as_fd()).expect("stat")));
        for p in ["a/evil", "a/evil/x", "a/inner"] {
            let e = walk_beneath(root.as_fd(), &rel(p)).expect_err(p);
            assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{p}");
        }
        let e = walk_beneath(root.as_fd(), &rel("a/missing")).expect_err("missing");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn openat2_refuses_what_the_walk_refuses() {
        let vol = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(vol.path().join("a/b")).expect("mkdir");
        symlink(outside.path(), vol.path().join("a/evil")).expect("symlink");
        let root = sys::open_dir_path(vol.path()).expect("open root");
        let resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS;
        let flags = libc::O_PATH | libc::O_DIRECTORY;
        match openat2(root.as_fd(), OsStr::new("a/b"), flags, resolve) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return,
            other => {
                other.expect("real directory");
            }
        }
        let e = openat2(root.as_fd(), OsStr::new("a/evil/x"), flags, resolve).expect_err("symlink");
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        // A ".." in a scoped lookup gives EAGAIN while renames run anywhere on the
        // system (other tests of this process): asked again until it can tell.
        let climb = || openat2(root.as_fd(), OsStr::new("a/../.."), flags, resolve);
        let e = (0..10_000)
            .map(|_| climb().expect_err("climb"))
            .find(|e| e.raw_os_error() != Some(libc::EAGAIN))
            .expect("an answer other than EAGAIN");
        assert_eq!(e.raw_os_error(), Some(libc::EXDEV));
    }

    /// A bind mount, detached when dropped, so that a failing test leaves none behind.
    struct BindMount(CString);

    impl BindMount {
        fn new(source: &Path, target: &Path) -> BindMount {
            let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("no NUL");
            let (source, target) = (c(source), c(target));
            // SAFETY: valid NUL-terminated strings; a bind mount takes no type or data.
            let ret = unsafe {
                libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            };
            assert_eq!(ret, 0, "bind mount: {}", io::Error::last_os_error());
            BindMount(target)
        }
    }

    impl Drop for BindMount {
        fn drop(&mut self) {
            // SAFETY: a valid NUL-terminated string.
            unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
        }
    }

    #[test]
    fn a_bind_mount_of_the_same_filesystem_is_refused_with_or_without_openat2() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let vol = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(vol.path().join("d/m")).expect("mkdir");
        std::fs::create_dir(outside.path().join("x")).expect("mkdir");
        let root = sys::open_dir_path(vol.path()).expect("open root");
        // Dropped before the temp dirs are removed.
        let _mount = BindMount::new(outside.path(), &vol.path().join("d/m"));
        let d = walk_beneath(root.as_fd(), &rel("d")).expect("a plain directory");

        for p in ["d/m", "d/m/x"] {
            let e = walk_beneath(root.as_fd(), &rel(p)).expect_err(p);
            assert_eq!(e.raw_os_error(), Some(libc::EXDEV), "{p}");
        }
        let flags = libc::O_PATH | libc::O_DIRECTORY;
        let e = open_entry_walk(d.as_fd(), OsStr::new("m"), flags).expect_err("walk");
        assert_eq!(e.raw_os_error(), Some(libc::EXDEV));
        let e = open_entry(d.as_fd(), OsStr::new("m"), flags).expect_err("openat2");
        assert_eq!(e.raw_os_error(), Some(libc::EXDEV));
    }

    #[test]
    fn temp_names_are_hidden_and_distinct() {
        let names: std::collections::HashSet<_> = (0..1000).map(|_| temp_name()).collect();
        assert_eq!(names.len(), 1000);
        assert!(names.iter().all(|n| n.as_bytes().starts_with(b".twinfs-")));
    }
}
