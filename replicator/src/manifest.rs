//! Manifests: what a volume holds, path by path (kind, mode, owner, mtime, size,
//! content hash, symlink target, xattrs, hard link identity); [`scan`] builds one from the backing
//! directory, a [`HashCache`] keeps rescans cheap, and [`diff`] turns the active's and
//! a standby's manifests into the work a full sync has to do.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Write};
use std::ops::Bound;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use twinfs_fs::sys::{self, At, Stat};
use twinfs_fs::written::Record;
use xxhash_rust::xxh3::xxh3_64;

use crate::delta::{self, BlockHasher, BlockList};

use crate::path::{PathError, RelPath};

pub use twinfs_fs::volume::RESERVED_PREFIX;

/// Files are hashed in reads of this size: large enough to keep syscalls few, small
/// enough that one buffer serves the whole scan.
const CHUNK: usize = 1 << 20;

/// How old a file's ctime must be before its hash is cached. With coarse kernel
/// timestamps (before Linux 6.13's multigrain ctime), a same-size rewrite within one
/// clock tick of our read leaves size, mtime and ctime unchanged, so a hash taken that
/// close to the last change could be stale for good. Such files are simply hashed
/// again next time.
const CACHE_MIN_AGE: Duration = Duration::from_millis(100);

/// How much older still a ctime of whole seconds must be: a filesystem that keeps
/// only seconds (ext4 with 128-byte inodes, JFFS2) or two (FAT) gives every change
/// within them the same ctime. (On one that keeps nanoseconds, a ctime of exactly
/// zero of them is rare, and costs only a hash.)
const COARSE_CTIME: Duration = Duration::from_secs(2);

/// What kind of object a path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link (never followed).
    Symlink,
    /// Named pipe.
    Fifo,
    /// Unix socket.
    Socket,
    /// Character device.
    CharDev,
    /// Block device.
    BlockDev,
}

impl Kind {
    /// The kind in the type bits of `st_mode`.
    fn of_mode(mode: u32) -> Option<Kind> {
        match mode & libc::S_IFMT {
            libc::S_IFREG => Some(Kind::File),
            libc::S_IFDIR => Some(Kind::Dir),
            libc::S_IFLNK => Some(Kind::Symlink),
            libc::S_IFIFO => Some(Kind::Fifo),
            libc::S_IFSOCK => Some(Kind::Socket),
            libc::S_IFCHR => Some(Kind::CharDev),
            libc::S_IFBLK => Some(Kind::BlockDev),
            _ => None,
        }
    }
}

/// Everything a manifest says about one path.
///
/// The fields most objects lack (device number, link target, xattrs) live in a box
/// that is absent when they are all empty: a manifest of 100,000 plain files is then
/// about 6 MiB smaller. On the wire it is the flat [`MetaWire`].
#[derive(Clone, Debug, Deserialize)]
#[serde(from = "OwnedWire")]
pub struct Meta {
    /// What the object is.
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky; no type bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time: seconds and nanoseconds since the epoch.
    pub mtime: (i64, u32),
    /// Size in bytes for files, 0 for everything else.
    pub size: u64,
    /// Content hash ([`delta::content_hash`], an xxh3-128), for files only.
    pub hash: Option<u128>,
    /// Device number, link target and xattrs, if any is not empty (see
    /// [`Meta::rdev`], [`Meta::target`], [`Meta::xattrs`] and their setters).
    pub extra: Option<Box<Extra>>,
}

/// The fields of a [`Meta`] most objects lack.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extra {
    /// Device number for character and block devices.
    pub rdev: u64,
    /// The link target, for symlinks.
    pub target: Option<Vec<u8>>,
    /// Extended attributes (name, value), sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// For a regular file with more than one name in the volume: the first of them in
    /// path order (see [`Meta::link`]).
    pub link: Option<RelPath>,
}

/// A [`Meta`] as it travels: every field flat. Received owned; sent borrowed
/// (`T` = `&Vec<u8>`, `X` = `&Vec<..>`, `L` = `&RelPath`), which serializes the same.
#[derive(Serialize, Deserialize)]
struct MetaWire<T, X, L> {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, u32),
    size: u64,
    rdev: u64,
    hash: Option<u128>,
    target: Option<T>,
    xattrs: X,
    link: Option<L>,
}

/// The [`MetaWire`] a [`Meta`] is decoded from.
type OwnedWire = MetaWire<Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>, RelPath>;

impl From<OwnedWire> for Meta {
    fn from(w: OwnedWire) -> Meta {
        let mut meta = Meta::new(w.kind);
        (
            meta.mode, meta.uid, meta.gid, meta.mtime, meta.size, meta.hash,
        ) = (w.mode, w.uid, w.gid, w.mtime, w.size, w.hash);
        meta.set_extra(Extra {
            rdev: w.rdev,
            target: w.target,
            xattrs: w.xattrs,
            link: w.link,
        });
        meta
    }
}

impl Serialize for Meta {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        static NO_XATTRS: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let extra = self.extra.as_deref();
        MetaWire {
            kind: self.kind,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            mtime: self.mtime,
            size: self.size,
            rdev: self.rdev(),
            hash: self.hash,
            target: extra.and_then(|e| e.target.as_ref()),
            xattrs: extra.map_or(&NO_XATTRS, |e| &e.xattrs),
            link: extra.and_then(|e| e.link.as_ref()),
        }
        .serialize(serializer)
    }
}

impl PartialEq for Meta {
    fn eq(&self, other: &Meta) -> bool {
        self.same_content(other) && self.same_metadata(other) && self.link() == other.link()
    }
}

impl Eq for Meta {}

impl Meta {
    /// A `kind` with every other field zero or empty.
    pub fn new(kind: Kind) -> Meta {
        Meta {
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime: (0, 0),
            size: 0,
            hash: None,
            extra: None,
        }
    }

    /// Device number for character and block devices, 0 for everything else.
    pub fn rdev(&self) -> u64 {
        self.extra.as_ref().map_or(0, |e| e.rdev)
    }

    /// The link target, for symlinks only.
    pub fn target(&self) -> Option<&[u8]> {
        self.extra.as_ref().and_then(|e| e.target.as_deref())
    }

    /// Extended attributes (name, value), sorted by name.
    pub fn xattrs(&self) -> &[(Vec<u8>, Vec<u8>)] {
        self.extra.as_ref().map_or(&[], |e| &e.xattrs)
    }

    /// The file's hard link identity: for a regular file with more than one name in
    /// the volume (`never` paths and names outside the volume do not count), the first
    /// of those names in path order; `None` for a file with one name and for anything
    /// else. The active's `(device, inode)` means nothing on a standby, the first name
    /// does: two paths are names of one file on a node exactly when their identities
    /// are the same `Some`. [`scan`] sets it; [`describe`] does not (it looks at one
    /// path): [`link_identity`] does, for a file with other names.
    pub fn link(&self) -> Option<&RelPath> {
        self.extra.as_ref().and_then(|e| e.link.as_ref())
    }

    /// Sets the hard link identity.
    pub fn set_link(&mut self, link: Option<RelPath>) {
        let mut extra = self.take_extra();
        extra.link = link;
        self.set_extra(extra);
    }

    /// Sets the device number.
    pub fn set_rdev(&mut self, rdev: u64) {
        let mut extra = self.take_extra();
        extra.rdev = rdev;
        self.set_extra(extra);
    }

    /// Sets the link target.
    pub fn set_target(&mut self, target: Option<Vec<u8>>) {
        let mut extra = self.take_extra();
        extra.target = target;
        self.set_extra(extra);
    }

    /// Sets the extended attributes (sorted by name).
    pub fn set_xattrs(&mut self, xattrs: Vec<(Vec<u8>, Vec<u8>)>) {
        let mut extra = self.take_extra();
        extra.xattrs = xattrs;
        self.set_extra(extra);
    }

    fn take_extra(&mut self) -> Extra {
        self.extra.take().map(|e| *e).unwrap_or_default()
    }

    fn set_extra(&mut self, extra: Extra) {
        self.extra = (extra != Extra::default()).then(|| Box::new(extra));
    }

    /// Whether the two describe the same content: kind, size, hash, target and device
    /// number.
    pub fn same_content(&self, other: &Meta) -> bool {
        self.kind == other.kind
            && self.size == other.size
            && self.hash == other.hash
            && self.target() == other.target()
            && self.rdev() == other.rdev()
    }

    /// Whether the two carry the same metadata: mode, owner, mtime and xattrs.
    pub fn same_metadata(&self, other: &Meta) -> bool {
        self.mode == other.mode
            && self.uid == other.uid
            && self.gid == other.gid
            && self.mtime == other.mtime
            && self.xattrs() == other.xattrs()
    }
}

/// One path of a manifest with what it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The path, relative to the volume root.
    pub path: RelPath,
    /// What is there.
    pub meta: Meta,
}

/// The most bytes the entries of one manifest part take encoded (bounded from
/// above by [`Entry::wire_size_bound`]), well within the message limit.
const PART_BYTES: usize = crate::protocol::MAX_MESSAGE / 4;

impl Entry {
    /// At least the bytes its encoding takes: its variable parts plus room for
    /// every fixed field and length prefix.
    pub fn wire_size_bound(&self) -> usize {
        const FIXED: usize = 96;
        let extra = self.meta.extra.as_deref().map_or(0, |x| {
            x.target.as_ref().map_or(0, Vec::len)
                + x.link.as_ref().map_or(0, |l| l.as_bytes().len())
                + x.xattrs
                    .iter()
                    .map(|(k, v)| k.len() + v.len() + 20)
                    .sum::<usize>()
        });
        FIXED + self.path.as_bytes().len() + extra
    }
}

/// The entries of a volume, ordered by path bytes, so a directory always comes
/// before everything below it. The volume root itself is the first entry (the empty
/// path) when the manifest comes from [`scan`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Manifest {
    entries: BTreeMap<RelPath, Meta>,
}

impl Manifest {
    /// An empty manifest.
    pub fn new() -> Manifest {
        Manifest::default()
    }

    /// What the manifest says about `path`.
    pub fn get(&self, path: &RelPath) -> Option<&Meta> {
        self.entries.get(path)
    }

    /// All entries, parents before children.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&RelPath, &Meta)> {
        self.entries.iter()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds or replaces an entry; returns what was there.
    pub fn insert(&mut self, entry: Entry) -> Option<Meta> {
        self.entries.insert(entry.path, entry.meta)
    }

    /// Its entries in path order, in parts of at most `size` entries, each with
    /// whether it is the last (an empty manifest is one empty last part): what
    /// travels in `Manifest` messages.
    pub fn parts(&self, size: usize) -> Vec<(Vec<Entry>, bool)> {
        Self::split(
            self.iter().map(|(path, meta)| Entry {
                path: path.clone(),
                meta: meta.clone(),
            }),
            self.len(),
            size,
        )
    }

    /// [`Manifest::parts`], consuming the manifest: its entries move into the parts
    /// instead of being copied (a standby sends a manifest of 100,000 files this way).
    pub fn into_parts(self, size: usize) -> Vec<(Vec<Entry>, bool)> {
        let len = self.len();
        Self::split(
            self.entries
                .into_iter()
                .map(|(path, meta)| Entry { path, meta }),
            len,
            size,
        )
    }

    fn split(
        entries: impl Iterator<Item = Entry>,
        len: usize,
        size: usize,
    ) -> Vec<(Vec<Entry>, bool)> {
        let size = size.max(1);
        let mut parts: Vec<(Vec<Entry>, bool)> = Vec::with_capacity(len.div_ceil(size).max(1));
        let mut part = Vec::with_capacity(size.min(len));
        let mut bytes = 0;
        for entry in entries {
            // A part also ends before its encoding could pass the message limit: long
            // paths, symlink targets and large xattrs would take 2,048 entries past
            // it (the part could never be sent, and the full sync would start over
            // for good).
            let more = entry.wire_size_bound();
            if !part.is_empty() && bytes + more > PART_BYTES {
                let full = std::mem::replace(&mut part, Vec::with_capacity(size));
                parts.push((full, false));
                bytes = 0;
            }
            bytes += more;
            part.push(entry);
            if part.len() == size {
                let full = std::mem::replace(&mut part, Vec::with_capacity(size));
                parts.push((full, false));
                bytes = 0;
            }
        }
        if !part.is_empty() || parts.is_empty() {
            parts.push((part, false));
        }
        if let Some(last) = parts.last_mut() {
            last.1 = true;
        }
        parts
    }

    /// Removes the entry of `path` (not its children); returns what was there.
    pub fn remove(&mut self, path: &RelPath) -> Option<Meta> {
        self.entries.remove(path)
    }
}

impl FromIterator<Entry> for Manifest {
    fn from_iter<I: IntoIterator<Item = Entry>>(iter: I) -> Manifest {
        Manifest {
            entries: iter.into_iter().map(|e| (e.path, e.meta)).collect(),
        }
    }
}

/// Why a scan failed.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A system call on a path failed (other than the path vanishing, which is not an
    /// error).
    #[error("cannot {op} {}: {source}", shown(.path))]
    Io {
        /// The path.
        path: RelPath,
        /// What was being done (`open`, `list`, `hash`, ...).
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// A name in the directory makes a path that is not a valid [`RelPath`] (longer
    /// than `PATH_MAX`).
    #[error("cannot scan below {}: {source}", shown(.parent))]
    Path {
        /// The directory holding the name.
        parent: RelPath,
        /// Why the path was refused.
        source: PathError,
    },
    /// The file type bits are none Linux knows.
    #[error("{} has an unknown file type (mode {mode:#o})", shown(.path))]
    UnknownType {
        /// The path.
        path: RelPath,
        /// Its `st_mode`.
        mode: u32,
    },
}

/// A path for messages: the root has no name of its own.
fn shown(path: &RelPath) -> String {
    if path.is_root() {
        "the volume root".to_owned()
    } else {
        format!("{path:?}")
    }
}

/// Wraps an I/O error with the path and what was being done to it.
fn io_error<'a>(
    path: &'a RelPath,
    op: &'static str,
) -> impl FnOnce(io::Error) -> ManifestError + 'a {
    move |source| ManifestError::Io {
        path: path.clone(),
        op,
        source,
    }
}

/// Whether the error means the object is gone: something removed it while the scan
/// was looking, which is a change like any other, not a failure.
fn vanished(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOENT)
}

/// Whether the directory behind `dir` has been removed.
fn removed(dir: BorrowedFd<'_>) -> bool {
    sys::fstat(dir).is_ok_and(|st| st.st_nlink == 0)
}

/// One directory level of the walk: its fd and the entries not visited yet.
struct Level {
    dir: OwnedFd,
    path: RelPath,
    names: std::vec::IntoIter<sys::DirEntry>,
}

/// Scans the tree below `root` (an `O_PATH` fd of the volume's backing directory)
/// into a manifest of every entry, the root itself first (its filter does not apply).
///
/// - Symlinks are recorded, never followed; a symlink to a directory is a
///   [`Kind::Symlink`] entry and nothing below it is scanned.
/// - `filter(path, kind)` returning false leaves the entry out, and for a directory
///   everything below it too. Names starting with [`RESERVED_PREFIX`] are never
///   recorded.
/// - Regular files are hashed with xxh3-128 unless `cache` holds a hash for the same
///   inode, size, mtime and ctime; `cache.last_scan()` tells how much was hashed.
/// - Something that vanishes during the scan is left out. The tree may change while
///   it is scanned, so the manifest is a fuzzy snapshot: the change stream, started
///   before the scan, brings what changed meanwhile.
/// - Regular files with more than one name among the entries get their hard link
///   identity ([`Meta::link`]).
///
/// The walk is depth first and holds one fd per directory level (plus one listing
/// per level), so tree size does not bound it, only depth.
pub fn scan(
    root: BorrowedFd<'_>,
    filter: impl Fn(&RelPath, Kind) -> bool,
    cache: &mut HashCache,
) -> Result<Manifest, ManifestError> {
    cache.begin_scan();
    let mut manifest = Manifest::new();
    let mut buf = Vec::new();
    // The names of each file with other links, by (device, inode).
    let mut linked: HashMap<(u64, u64), Vec<RelPath>> = HashMap::new();
    let top = RelPath::root();
    // The root itself: its mode, owner, times and xattrs (a default ACL, say) are
    // the volume's too. It is no path under a rule: `filter` does not judge it.
    if let Some((meta, _, _)) = describe(root, &top, cache)? {
        manifest.entries.insert(top.clone(), meta);
    }
    let names = sys::read_dir(root).map_err(io_error(&top, "list"))?;
    let dir = root
        .try_clone_to_owned()
        .map_err(io_error(&top, "duplicate the fd of"))?;
    let mut stack = vec![Level {
        dir,
        path: top,
        names: names.into_iter(),
    }];
    while let Some(level) = stack.last_mut() {
        let Some(dirent) = level.names.next() else {
            stack.pop();
            continue;
        };
        if dirent.name.as_bytes().starts_with(RESERVED_PREFIX) {
            continue;
        }
        let path = match level.path.join(&dirent.name) {
            Ok(path) => path,
            // Longer than PATH_MAX: no peer could name it. Left out, with all below
            // it, and counted: one such name must not stop the whole volume.
            Err(PathError::TooLong(_)) => {
                cache.too_long(&level.path);
                continue;
            }
            Err(source) => {
                return Err(ManifestError::Path {
                    parent: level.path.clone(),
                    source,
                })
            }
        };
        let Some((meta, fd, key)) = visit(
            level.dir.as_fd(),
            &dirent.name,
            &path,
            &filter,
            cache,
            &mut buf,
        )?
        else {
            continue;
        };
        if meta.kind != Kind::Dir {
            if let Some(key) = key {
                linked.entry(key).or_default().push(path.clone());
            }
            manifest.entries.insert(path, meta);
            continue;
        }
        match sys::read_dir(fd.as_fd()) {
            // glibc reports a removed directory as an empty one; its link count tells.
            Ok(names) if names.is_empty() && removed(fd.as_fd()) => {
                tracing::debug!(%path, "directory removed during the scan");
            }
            Ok(names) => {
                manifest.entries.insert(path.clone(), meta);
                stack.push(Level {
                    dir: fd,
                    path,
                    names: names.into_iter(),
                });
            }
            Err(e) if vanished(&e) => tracing::debug!(%path, "directory removed during the scan"),
            Err(e) => return Err(io_error(&path, "list")(e)),
        }
    }
    for names in linked.into_values().filter(|names| names.len() > 1) {
        let first = names.iter().min().cloned();
        for name in &names {
            if let Some(meta) = manifest.entries.get_mut(name) {
                meta.set_link(first.clone());
            }
        }
    }
    cache.finish_scan();
    let stats = cache.last_scan();
    tracing::debug!(
        entries = manifest.len(),
        hits = stats.hits,
        misses = stats.misses,
        bytes_hashed = stats.bytes_hashed,
        "scanned"
    );
    Ok(manifest)
}

/// Describes the single path `path` of the volume under `root` as a scan would, without
/// following symlinks on the way; `None` if it does not exist. Also returns an
/// `O_PATH` fd of the object and one of its parent directory.
pub fn describe(
    root: BorrowedFd<'_>,
    path: &RelPath,
    cache: &mut HashCache,
) -> Result<Option<(Meta, OwnedFd, OwnedFd)>, ManifestError> {
    let Some((parent, name)) = path.split_last() else {
        // The root: described through itself, and its own "parent".
        let mut buf = Vec::new();
        let dir = root
            .try_clone_to_owned()
            .map_err(io_error(path, "duplicate the fd of"))?;
        return Ok(
            visit(root, OsStr::new("."), path, &|_, _| true, cache, &mut buf)?
                .map(|(meta, fd, _)| (meta, fd, dir)),
        );
    };
    let mut dir = root
        .try_clone_to_owned()
        .map_err(io_error(path, "duplicate the fd of"))?;
    for part in parent.components() {
        dir = match sys::openat(dir.as_fd(), part, libc::O_PATH | libc::O_DIRECTORY, 0) {
            Ok(fd) => fd,
            // Gone, or no longer a directory (a symlink is not followed: ENOTDIR, or
            // ELOOP): nothing there to describe.
            Err(e)
                if vanished(&e)
                    || matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP)) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(io_error(path, "open a parent of")(e)),
        };
    }
    let mut buf = Vec::new();
    Ok(
        visit(dir.as_fd(), name, path, &|_, _| true, cache, &mut buf)?
            .map(|(meta, fd, _)| (meta, fd, dir)),
    )
}

/// The hard link identity ([`Meta::link`]) of the object whose `fstat` is `st` (of
/// an fd [`describe`] returned): `None` unless it is a regular file with another name
/// in the volume that `filter` accepts (as for [`scan`]). Walks the volume for the
/// other names, so it costs a scan's directory listings and a `stat` per regular file
/// (without hashing), and only for a file whose link count is above one.
pub fn link_identity(
    root: BorrowedFd<'_>,
    st: &Stat,
    filter: impl Fn(&RelPath, Kind) -> bool,
) -> Result<Option<RelPath>, ManifestError> {
    if Kind::of_mode(st.st_mode) != Some(Kind::File) || st.st_nlink < 2 {
        return Ok(None);
    }
    let names = names_of(root, (st.st_dev, st.st_ino), st.st_nlink, filter)?;
    if names.len() < 2 {
        return Ok(None);
    }
    Ok(names.into_iter().min())
}

/// The paths below `root` of the regular file `key` (device, inode), up to `most` of
/// them (its link count: no more can exist), in no particular order. Walks as [`scan`]
/// does: never through a symlink, without [`RESERVED_PREFIX`] names or what `filter`
/// refuses (a refused directory with all below it).
pub fn names_of(
    root: BorrowedFd<'_>,
    key: (u64, u64),
    most: u64,
    filter: impl Fn(&RelPath, Kind) -> bool,
) -> Result<Vec<RelPath>, ManifestError> {
    let top = RelPath::root();
    let mut names = Vec::new();
    let mut stack = vec![(
        root.try_clone_to_owned()
            .map_err(io_error(&top, "duplicate the fd of"))?,
        top,
    )];
    while let Some((dir, path)) = stack.pop() {
        let entries = match sys::read_dir(dir.as_fd()) {
            Ok(entries) => entries,
            Err(e) if vanished(&e) => continue,
            Err(e) => return Err(io_error(&path, "list")(e)),
        };
        for dirent in entries {
            if dirent.name.as_bytes().starts_with(RESERVED_PREFIX) {
                continue;
            }
            let child = match path.join(&dirent.name) {
                Ok(child) => child,
                // Left out of every manifest, as by `scan`.
                Err(PathError::TooLong(_)) => continue,
                Err(source) => {
                    return Err(ManifestError::Path {
                        parent: path.clone(),
                        source,
                    })
                }
            };
            let kind = match dirent.kind {
                libc::DT_DIR => Some(Kind::Dir),
                libc::DT_REG => Some(Kind::File),
                libc::DT_UNKNOWN => match sys::statat(dir.as_fd(), &dirent.name) {
                    Ok(st) => Kind::of_mode(st.st_mode),
                    Err(e) if vanished(&e) => None,
                    Err(e) => return Err(io_error(&child, "stat")(e)),
                },
                _ => None,
            };
            match kind {
                Some(Kind::Dir) if filter(&child, Kind::Dir) => {
                    match sys::openat(
                        dir.as_fd(),
                        &dirent.name,
                        libc::O_PATH | libc::O_DIRECTORY,
                        0,
                    ) {
                        Ok(fd) => stack.push((fd, child)),
                        Err(e) if vanished(&e) || e.raw_os_error() == Some(libc::ENOTDIR) => {}
                        Err(e) => return Err(io_error(&child, "open")(e)),
                    }
                }
                Some(Kind::File) if filter(&child, Kind::File) => {
                    let st = match sys::statat(dir.as_fd(), &dirent.name) {
                        Ok(st) => st,
                        Err(e) if vanished(&e) => continue,
                        Err(e) => return Err(io_error(&child, "stat")(e)),
                    };
                    if Kind::of_mode(st.st_mode) == Some(Kind::File)
                        && (st.st_dev, st.st_ino) == key
                    {
                        names.push(child);
                        if names.len() as u64 >= most {
                            return Ok(names);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(names)
}

/// What [`visit`] found: the entry, its `O_PATH` fd, and the (device, inode) of a
/// regular file with other links.
type Visited = (Meta, OwnedFd, Option<(u64, u64)>);

/// Describes one directory entry; `None` if it vanished or the filter refused it. For
/// a directory, also returns its `O_PATH` fd for the next level of the walk; for a
/// regular file with other links, its (device, inode).
fn visit(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    path: &RelPath,
    filter: &impl Fn(&RelPath, Kind) -> bool,
    cache: &mut HashCache,
    buf: &mut Vec<u8>,
) -> Result<Option<Visited>, ManifestError> {
    // Everything below comes through this one O_PATH fd (sys::openat adds O_NOFOLLOW),
    // so stat, xattrs, link target and content all describe the same object even if
    // the name is replaced meanwhile, and nothing but a regular file is ever opened for
    // reading (opening a FIFO blocks, opening a device can act on it).
    let fd = match sys::openat(dir, name, libc::O_PATH, 0) {
        Ok(fd) => fd,
        Err(e) if vanished(&e) => {
            tracing::debug!(%path, "vanished during the scan");
            return Ok(None);
        }
        Err(e) => return Err(io_error(path, "open")(e)),
    };
    let st = sys::fstat(fd.as_fd()).map_err(io_error(path, "stat"))?;
    let kind = Kind::of_mode(st.st_mode).ok_or_else(|| ManifestError::UnknownType {
        path: path.clone(),
        mode: st.st_mode,
    })?;
    if !filter(path, kind) {
        return Ok(None);
    }
    let mut meta = Meta::new(kind);
    meta.mode = st.st_mode & 0o7777;
    meta.uid = st.st_uid;
    meta.gid = st.st_gid;
    meta.mtime = (st.st_mtime, st.st_mtime_nsec as u32);
    meta.set_xattrs(read_xattrs(At::Fd(fd.as_fd())).map_err(io_error(path, "read the xattrs of"))?);
    match kind {
        Kind::File => {
            meta.size = st.st_size as u64;
            meta.hash = Some(
                cache
                    .content_hash(fd.as_fd(), &st, buf)
                    .map_err(io_error(path, "hash"))?,
            );
        }
        Kind::Symlink => {
            // An empty name makes readlinkat read the symlink the O_PATH fd is.
            meta.set_target(Some(
                sys::readlinkat(fd.as_fd(), OsStr::new(""))
                    .map_err(io_error(path, "read the target of"))?,
            ));
        }
        Kind::CharDev | Kind::BlockDev => meta.set_rdev(st.st_rdev),
        Kind::Dir | Kind::Fifo | Kind::Socket => {}
    }
    let key = (kind == Kind::File && st.st_nlink > 1).then_some((st.st_dev, st.st_ino));
    Ok(Some((meta, fd, key)))
}

/// Reads `f` into a buffer sized by a first call with an empty buffer, asking again if
/// the value grew in between (`ERANGE`).
fn read_sized(mut f: impl FnMut(&mut [u8]) -> io::Result<usize>) -> io::Result<Vec<u8>> {
    let mut attempts = 0;
    loop {
        let size = f(&mut [])?;
        let mut buf = vec![0u8; size];
        match f(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) && attempts < 8 => attempts += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Every extended attribute the process can read, sorted by name.
pub(crate) fn read_xattrs(at: At<'_>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let names = match read_sized(|buf| at.listxattr(buf)) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut xattrs = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        match read_sized(|buf| at.getxattr(OsStr::from_bytes(name), buf)) {
            Ok(value) => xattrs.push((name.to_vec(), value)),
            // Removed since the listing, or in a namespace this process may list but
            // not read: neither is something a standby could be given.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENODATA | libc::EACCES | libc::EPERM)
                ) => {}
            Err(e) => return Err(e),
        }
    }
    xattrs.sort();
    Ok(xattrs)
}

/// What must be unchanged for a cached hash (or block list) of a file to hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// Bytes.
    pub size: u64,
    /// Modification time.
    pub mtime: (i64, u32),
    /// Status change time.
    pub ctime: (i64, u32),
}

impl Stamp {
    /// The stamp of a file as `st` shows it.
    pub fn of(st: &Stat) -> Stamp {
        Stamp {
            size: st.st_size as u64,
            mtime: (st.st_mtime, st.st_mtime_nsec as u32),
            ctime: (st.st_ctime, st.st_ctime_nsec as u32),
        }
    }

    /// Whether the last change is far enough before `now` that a later change is
    /// bound to move the ctime.
    fn settled(&self, now: SystemTime) -> bool {
        let ctime = UNIX_EPOCH
            .checked_add(Duration::new(
                u64::try_from(self.ctime.0).unwrap_or(0),
                self.ctime.1,
            ))
            .unwrap_or(UNIX_EPOCH);
        let min_age = match self.ctime.1 {
            0 => CACHE_MIN_AGE + COARSE_CTIME,
            _ => CACHE_MIN_AGE,
        };
        now.duration_since(ctime).is_ok_and(|age| age >= min_age)
    }
}

/// A cached content hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Cached {
    stamp: Stamp,
    hash: u128,
    /// The last scan that saw the file (in the padding before `hash`; not stored).
    #[serde(skip)]
    scan: u32,
}

/// How much work the last scan did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Files whose hash came from the cache.
    pub hits: u64,
    /// Files that were read and hashed.
    pub misses: u64,
    /// Bytes read to hash them.
    pub bytes_hashed: u64,
    /// Names left out because their path would be longer than [`MAX_PATH`](crate::path::MAX_PATH).
    pub too_long: u64,
}

/// How many directories [`HashCache::too_long_below`] names, at most.
const TOO_LONG_SHOWN: usize = 16;

/// Content hashes by inode, valid while the file's size, mtime and ctime stay the
/// same (any write or `utimensat` moves the ctime, and nothing can set it back). Keep
/// one per volume: a scan drops the entries it did not see.
#[derive(Debug, Default)]
pub struct HashCache {
    /// Keyed by (device, inode), so hard links are hashed once.
    entries: HashMap<(u64, u64), Cached>,
    /// The number of the scan under way (see [`Cached::scan`]).
    scan: u32,
    stats: CacheStats,
    /// The directories where the last scan left out names whose path would be longer
    /// than [`MAX_PATH`](crate::path::MAX_PATH), with how many (the first [`TOO_LONG_SHOWN`] directories).
    too_long: BTreeMap<RelPath, u64>,
    /// While set ([`HashCache::collect_blocks`]), a file hashed afresh also gets its
    /// block list, for a delta, from the same read.
    collect: bool,
    blocks: Option<BlockList>,
    /// For the next file hashed ([`HashCache::watch`]): its backing file and what the
    /// mount saw written to it since its last watch.
    watched: Option<((u64, u64), Option<Record>)>,
    /// Active: the block lists of the large files the mount watches for it (see
    /// `twinfs_fs::written`), each as it was when its watch began; not stored.
    lists: crate::patch::BlockCache<(u64, u64), Kept>,
    /// The number of the last watch, and of each watched file's last
    /// ([`HashCache::adopt`]).
    watches: u64,
    last_watch: HashMap<(u64, u64), u64>,
}

/// The file a watched file's kept block list was made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Kept {
    /// The inode's generation number: a new file that reuses the inode number is
    /// another.
    generation: u64,
    /// Its length when the list was made.
    len: u64,
}

/// Most files whose last watch number is kept (past that, they are all dropped:
/// [`HashCache::adopt`] then keeps nothing until a file's next watch).
const MAX_WATCHES: usize = 4096;

/// The first bytes of a cache file; the last two say the format version.
///
/// 02: content hashes of files of more than one block are built from their blocks
/// (`delta::content_hash`); a cache of 01 is dropped, and the files hashed afresh.
const CACHE_MAGIC: &[u8; 8] = b"twfshc02";

/// Why the cache could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Writing, syncing or renaming the file failed.
    #[error("cannot {op} the hash cache {}: {source}", .path.display())]
    Io {
        /// The cache file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
}

impl HashCache {
    /// An empty cache.
    pub fn new() -> HashCache {
        HashCache::default()
    }

    /// The cache stored at `path`. A missing, unreadable or corrupt file gives an empty
    /// cache (logged): it only costs one full hash of the volume.
    pub fn load(path: &Path) -> HashCache {
        let entries = match fs::read(path) {
            Ok(bytes) => decode(&bytes).unwrap_or_else(|reason| {
                tracing::warn!(path = %path.display(), reason, "ignoring the hash cache");
                HashMap::new()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::debug!(path = %path.display(), "no hash cache yet");
                HashMap::new()
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the hash cache; starting empty");
                HashMap::new()
            }
        };
        HashCache {
            entries,
            ..HashCache::default()
        }
    }

    /// Writes the cache to `path` atomically: a temporary file next to it, fsync,
    /// rename, fsync of the directory. Only one process may store to a given path.
    pub fn store(&self, path: &Path) -> Result<(), CacheError> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let fail = |op, source| CacheError::Io {
            path: path.to_owned(),
            op,
            source,
        };
        let written = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|f| {
                let mut out = io::BufWriter::new(f);
                out.write_all(CACHE_MAGIC)?;
                self.encode_into(&mut out)?;
                out.into_inner().map_err(|e| e.into_error())?.sync_all()
            })
            .map_err(|e| fail("write", e))
            .and_then(|()| fs::rename(&tmp, path).map_err(|e| fail("rename into place", e)));
        if let Err(e) = written {
            // Best effort: the error that matters is the one returned.
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| fail("sync the directory of", e))
    }

    /// Writes the entries as `postcard` encodes the map, then the xxh3-64 of those
    /// bytes: entry by entry, never the whole encoding in memory (8 MiB at 100,000
    /// files, at the moment a scan's manifest was held too).
    fn encode_into(&self, out: &mut impl Write) -> io::Result<()> {
        let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
        let mut buf = [0u8; 128];
        let mut put = |bytes: &[u8], out: &mut dyn Write| {
            hasher.update(bytes);
            out.write_all(bytes)
        };
        let len = postcard::to_slice(&self.entries.len(), &mut buf).map_err(io::Error::other)?;
        put(len, out)?;
        for entry in &self.entries {
            let bytes = postcard::to_slice(&entry, &mut buf).map_err(io::Error::other)?;
            put(bytes, out)?;
        }
        out.write_all(&hasher.digest().to_le_bytes())
    }

    /// Number of cached hashes.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no hash is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sets whether a file hashed afresh also gets its block list (taken with
    /// [`HashCache::take_blocks`]); a file whose hash is cached gets none.
    pub fn collect_blocks(&mut self, on: bool) {
        self.collect = on;
        self.blocks = None;
        // A record taken for a file that was not hashed (not a regular file, gone):
        // its list misses those writes now.
        if let Some((key, _)) = self.watched.take() {
            self.lists.forget(&key);
        }
    }

    /// The block list of the last file hashed afresh while collecting, once.
    pub fn take_blocks(&mut self) -> Option<BlockList> {
        self.blocks.take()
    }

    /// Active, before the file `key` is described while collecting: `written` is what
    /// the mount saw written to it since it was last watched
    /// (`twinfs_fs::Volume::take_written`, just called). If the list of its last
    /// hash is still kept and only these ranges changed since, only their blocks are
    /// read: its new hash is built from the list (see [`delta::content_hash`]).
    ///
    /// Returns the watch's number, for [`HashCache::adopt`].
    pub fn watch(&mut self, key: (u64, u64), written: Option<Record>) -> u64 {
        if let Some((unused, _)) = self.watched.replace((key, written)) {
            self.lists.forget(&unused);
        }
        self.watches += 1;
        if self.last_watch.len() >= MAX_WATCHES && !self.last_watch.contains_key(&key) {
            self.last_watch.clear();
        }
        self.last_watch.insert(key, self.watches);
        self.watches
    }

    /// Keeps `list`, the block list of the watched file `key` (whose generation
    /// number is `generation`), made from its `len` bytes as read after its watch
    /// number `watch` began (by the send of a file whose hash came from the cache,
    /// which reads it whole anyway). Only if no later watch of the file began (its
    /// record would not hold the writes since `watch`) and no list is kept.
    pub fn adopt(
        &mut self,
        key: (u64, u64),
        watch: u64,
        generation: u64,
        len: u64,
        list: BlockList,
    ) {
        let fits = list.block_size == delta::block_size(len)
            && list.hashes.len() as u64 == len.div_ceil(u64::from(list.block_size));
        let current = self.last_watch.get(&key) == Some(&watch);
        let kept =
            current && fits && !self.lists.contains(&key) && len >= twinfs_fs::written::TRACK_MIN;
        tracing::debug!(inode = key.1, len, kept, "block list made by a send");
        if kept {
            self.lists
                .put(&key, Kept { generation, len }, std::sync::Arc::new(list));
        }
    }

    /// The work done by the last scan.
    pub fn last_scan(&self) -> CacheStats {
        self.stats
    }

    fn begin_scan(&mut self) {
        self.scan = self.scan.wrapping_add(1);
        self.stats = CacheStats::default();
        self.too_long.clear();
    }

    /// The scan left out a name in `dir` whose path would be too long.
    fn too_long(&mut self, dir: &RelPath) {
        self.stats.too_long += 1;
        if let Some(n) = self.too_long.get_mut(dir) {
            *n += 1;
        } else if self.too_long.len() < TOO_LONG_SHOWN {
            self.too_long.insert(dir.clone(), 1);
        }
    }

    /// The directories where the last scan left out names whose path would be longer
    /// than [`MAX_PATH`](crate::path::MAX_PATH) (`PATH_MAX`), each with how many; the first few only
    /// ([`CacheStats::too_long`] counts them all).
    pub fn too_long_below(&self) -> &BTreeMap<RelPath, u64> {
        &self.too_long
    }

    /// Drops what the scan did not see (deleted files, filtered paths), so the cache
    /// does not grow forever. Only after a complete scan: a failed one saw too little.
    fn finish_scan(&mut self) {
        let scan = self.scan;
        self.entries.retain(|_, cached| cached.scan == scan);
    }

    /// The content hash of the regular file behind the `O_PATH` fd `file`, whose stat
    /// is `st`, from the cache or by reading it through `buf`, grown as the file needs
    /// up to [`CHUNK`] (zeroing a whole chunk for each small file cost more than
    /// hashing it).
    fn content_hash(
        &mut self,
        file: BorrowedFd<'_>,
        st: &Stat,
        buf: &mut Vec<u8>,
    ) -> io::Result<u128> {
        let key = (st.st_dev, st.st_ino);
        let stamp = Stamp::of(st);
        // What the mount saw written to this file since its list was kept, if watched.
        // A watched file's kept list leaves `lists` here: only a hash that uses the
        // new record puts a list back, so a record taken and not used (an error, a
        // file replaced meanwhile) never leaves a list that misses its writes.
        let watched = match self.watched.take() {
            Some((k, written)) => {
                let kept = self.lists.forget(&k);
                (k == key).then_some((written, kept))
            }
            None => None,
        };
        if let Some(cached) = self.entries.get_mut(&key) {
            if cached.stamp == stamp {
                cached.scan = self.scan;
                self.stats.hits += 1;
                let hash = cached.hash;
                // Nothing written since the list was made: it is this version's.
                // (A file is watched only while blocks are collected.)
                if let Some((Some(Record::Ranges(r)), Some((kept, list)))) = watched {
                    if r.is_empty() {
                        self.blocks = Some(BlockList::clone(&list));
                        self.lists.put(&key, kept, list);
                    }
                }
                return Ok(hash);
            }
        }
        let started = SystemTime::now();
        // Reopening through /proc reaches the very inode the O_PATH fd holds.
        let reader = fs::File::open(OsStr::from_bytes(sys::proc_path(file).as_bytes()))?;
        if let Some((written, kept)) = watched {
            return self.hash_watched(key, reader, st, written, kept);
        }
        // One byte more than the file, so a file read whole is seen to end at once.
        let want = usize::try_from(st.st_size).map_or(CHUNK, |n| n.saturating_add(1).min(CHUNK));
        if buf.len() < want {
            buf.resize(want, 0);
        }
        // The content hash is built from the block list (`delta::content_hash`).
        let mut blocks = BlockHasher::new(delta::block_size(st.st_size as u64));
        self.blocks = None;
        let offset = if st.st_size as u64 >= PIPELINE_MIN {
            read_pipelined(reader.as_fd(), &mut |data| blocks.update(data))?
        } else {
            let mut offset = 0u64;
            loop {
                let n = sys::pread(reader.as_fd(), buf, offset)?;
                blocks.update(&buf[..n]);
                offset += n as u64;
                if n < buf.len() {
                    break offset;
                }
            }
        };
        let list = blocks.finish();
        let hash = delta::content_hash(&list, offset);
        if self.collect {
            self.blocks = Some(list);
        }
        self.stats.misses += 1;
        self.stats.bytes_hashed += offset;
        // A file written while we read it has a hash of no particular version: report
        // it (the change stream ships the final one) but never cache it.
        let unchanged = Stamp::of(&sys::fstat(reader.as_fd())?) == stamp;
        if unchanged && stamp.settled(started) {
            let scan = self.scan;
            self.entries.insert(key, Cached { stamp, hash, scan });
        } else {
            self.entries.remove(&key);
        }
        Ok(hash)
    }

    /// [`HashCache::content_hash`] of a watched file (`written`: see
    /// [`HashCache::watch`]) that is not in the cache: from its kept list and the
    /// written blocks if it can, by reading it whole otherwise. Its list is kept for
    /// the next change (a large file's), as it is after this read (the new watch began
    /// before it), if the file did not change during the read. The hash is not cached by stamp: only whole reads are (a full sync
    /// compares those).
    fn hash_watched(
        &mut self,
        key: (u64, u64),
        reader: fs::File,
        st: &Stat,
        written: Option<Record>,
        kept: Option<(Kept, std::sync::Arc<BlockList>)>,
    ) -> io::Result<u128> {
        self.entries.remove(&key);
        let len = st.st_size as u64;
        let generation = sys::generation(reader.as_fd()).ok();
        let kept = kept.filter(|(k, list)| {
            Some(k.generation) == generation && list.block_size == delta::block_size(len)
        });
        let rebuilt = match (kept, &written) {
            (Some((k, list)), Some(Record::Ranges(ranges))) => {
                rehash_written(reader.as_fd(), &list, k.len, len, ranges)?
            }
            _ => None,
        };
        let from_written = rebuilt.is_some();
        let (list, read) = match rebuilt {
            Some(x) => {
                tracing::debug!(
                    inode = key.1,
                    len,
                    read = x.1,
                    "hashed from its written blocks"
                );
                x
            }
            None => {
                let mut blocks = BlockHasher::new(delta::block_size(len));
                let read = read_pipelined(reader.as_fd(), &mut |data| blocks.update(data))?;
                (blocks.finish(), read)
            }
        };
        self.stats.misses += 1;
        self.stats.bytes_hashed += read;
        // The list is of `len` bytes, unless the file changed meanwhile (then the hash
        // is of no particular version, as with a whole read, and the watch has seen
        // the change).
        let hash = delta::content_hash(&list, len);
        // Kept only as a list of exactly `len` bytes: a read that saw the file grow or
        // shrink, or a change during the read (or the rebuild), would leave a wrong
        // hash for its last block or any other, under a `Kept` that says it is right.
        let whole = from_written || read == len;
        let unchanged = Stamp::of(&sys::fstat(reader.as_fd())?) == Stamp::of(st);
        match generation {
            Some(generation) if whole && unchanged && len >= twinfs_fs::written::TRACK_MIN => {
                let kept = Kept { generation, len };
                self.lists
                    .put(&key, kept, std::sync::Arc::new(list.clone()));
            }
            _ => {}
        }
        if self.collect {
            self.blocks = Some(list);
        }
        Ok(hash)
    }
}

/// The block list of a file now `new_len` bytes long, whose list was `old` when it
/// was `old_len` bytes long, and of which only `written` changed since: the blocks
/// that `written` touches, or whose extent changed, are read from `file` and hashed;
/// the rest keep their hashes. With the bytes read; `None` if the file is shorter
/// than `new_len` (it changed meanwhile: read it whole).
fn rehash_written(
    file: BorrowedFd<'_>,
    old: &BlockList,
    old_len: u64,
    new_len: u64,
    written: &[std::ops::Range<u64>],
) -> io::Result<Option<(BlockList, u64)>> {
    let block = u64::from(old.block_size);
    let count = usize::try_from(new_len.div_ceil(block)).map_err(io::Error::other)?;
    let mut hashes = Vec::with_capacity(count);
    // Runs of consecutive blocks to read, as block indexes.
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for index in 0..count {
        let start = index as u64 * block;
        let end = (start + block).min(new_len);
        let same_extent = start < old_len && end == (start + block).min(old_len);
        let first = written.partition_point(|r| r.end <= start);
        let touched = written.get(first).is_some_and(|r| r.start < end);
        match old.hashes.get(index) {
            Some(hash) if same_extent && !touched => hashes.push(*hash),
            _ => {
                hashes.push(0);
                delta::push_run(&mut runs, index..index + 1);
            }
        }
    }
    let mut read = 0u64;
    let mut buf = Vec::new();
    for run in runs {
        let mut index = run.start;
        while index < run.end {
            // Up to a chunk (whole blocks) at a time.
            let blocks = (run.end - index).min((CHUNK as u64 / block).max(1) as usize);
            let start = index as u64 * block;
            let want = ((blocks as u64 * block).min(new_len - start)) as usize;
            buf.resize(want, 0);
            let n = crate::apply::read_full(file, &mut buf, start)?;
            if n < want {
                return Ok(None);
            }
            read += n as u64;
            for (i, part) in buf.chunks(block as usize).enumerate() {
                hashes[index + i] = delta::block_hash(part);
            }
            index += blocks;
        }
    }
    let list = BlockList {
        block_size: old.block_size,
        hashes,
    };
    Ok(Some((list, read)))
}

/// Files from this size are read by a thread of their own while they are hashed.
const PIPELINE_MIN: u64 = 8 << 20;

/// Reads all of `file` in pieces of [`CHUNK`] on a thread of its own, passing each to
/// `consume` in order on this one: reading (a copy out of the page cache, mostly) and
/// hashing then take one core each. Returns the bytes read.
pub(crate) fn read_pipelined(
    file: BorrowedFd<'_>,
    consume: &mut dyn FnMut(&[u8]),
) -> io::Result<u64> {
    use std::sync::mpsc::sync_channel;
    std::thread::scope(|scope| {
        // Made in here, so that this side's ends are dropped (and the reader stops)
        // before the scope waits for it, however this side returns.
        // Three buffers go round: one being read, one being hashed, one waiting.
        let (full_tx, full_rx) = sync_channel::<io::Result<Vec<u8>>>(3);
        let (empty_tx, empty_rx) = sync_channel::<Vec<u8>>(3);
        for _ in 0..3 {
            let _ = empty_tx.send(vec![0u8; CHUNK]);
        }
        scope.spawn(move || {
            let mut offset = 0u64;
            while let Ok(mut buf) = empty_rx.recv() {
                buf.resize(CHUNK, 0);
                match crate::apply::read_full(file, &mut buf, offset) {
                    Ok(n) => {
                        buf.truncate(n);
                        offset += n as u64;
                        let last = n < CHUNK;
                        if full_tx.send(Ok(buf)).is_err() || last {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = full_tx.send(Err(e));
                        return;
                    }
                }
            }
        });
        let mut total = 0u64;
        while let Ok(piece) = full_rx.recv() {
            let buf = piece?;
            consume(&buf);
            total += buf.len() as u64;
            if buf.len() < CHUNK {
                break;
            }
            // The reader may have stopped already; then this buffer is not needed.
            let _ = empty_tx.send(buf);
        }
        Ok(total)
    })
}

/// Parses a cache file; the error says why it was refused.
fn decode(bytes: &[u8]) -> Result<HashMap<(u64, u64), Cached>, &'static str> {
    let rest = bytes
        .strip_prefix(CACHE_MAGIC)
        .ok_or("not a hash cache of this twinfs version")?;
    let (body, sum) = rest
        .split_at_checked(rest.len().wrapping_sub(8))
        .ok_or("truncated")?;
    if sum != xxh3_64(body).to_le_bytes() {
        return Err("checksum mismatch");
    }
    postcard::from_bytes(body).map_err(|_| "undecodable")
}

/// One entry to send to a standby.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// The path (what it must become is in the active's manifest; a full sync's list
    /// can name every file of the volume, so it does not carry a copy).
    pub path: RelPath,
    /// What it is on the active.
    pub kind: Kind,
    /// Its size on the active.
    pub size: u64,
    /// Whether the standby has something at this path (of any kind).
    pub on_standby: bool,
    /// The content hash of the standby's copy, if it has a file there. Boxed: most
    /// transfers have none, and an inline `u128` would make each 80 bytes, not 48.
    pub standby_hash: Option<Box<u128>>,
    /// Whether the content must travel (new path, new kind, or different content);
    /// false when the standby has the content and only mode, owner, mtime or xattrs
    /// differ, and for a link.
    pub content: bool,
    /// A further name of a hard-linked file ([`Meta::link`] is another path): the
    /// standby is to make it a link of the first name, which carries the content and
    /// metadata and comes earlier in path order.
    pub link: bool,
}

/// The work that makes a standby's tree match the active's.
///
/// **Order:** apply every `delete` first, in order, then every `send`, in order. A path
/// whose kind changed (a file that became a directory, ...) is in both lists: the old
/// object must be gone before the new one can be created. Deletes go first because
/// they cost nothing next to sends, so priority-1 content is barely delayed.
///
/// A directory's mtime moves whenever something is created in it, so an applier sets
/// directory times after their children have been applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Entries of the active that the standby lacks or holds differently. Priority 1
    /// first, together with the new or changed directories above them, then the rest;
    /// within each group parents before children.
    pub send: Vec<Transfer>,
    /// Paths the standby must remove (recursively for directories): those the active
    /// does not have and those whose kind changed. Children before parents.
    pub delete: Vec<RelPath>,
}

impl Diff {
    /// Whether the two manifests were equal.
    pub fn is_empty(&self) -> bool {
        self.send.is_empty() && self.delete.is_empty()
    }
}

/// What to do so that a standby holding `standby` holds `active`; `priority_of` gives
/// each path's priority (1 = must be in sync before a takeover). The volume root is
/// never deleted or replaced: only its metadata is sent when it differs.
pub fn diff(active: &Manifest, standby: &Manifest, priority_of: impl Fn(&RelPath) -> u8) -> Diff {
    let mut differ = Differ::new(active.clone());
    for (path, meta) in standby.iter() {
        // A manifest iterates in path order, so none is refused.
        let _ = differ.feed(Entry {
            path: path.clone(),
            meta: meta.clone(),
        });
    }
    differ.finish(priority_of).0
}

/// A standby's manifest entry that did not come in path order.
#[derive(Debug, thiserror::Error)]
#[error("the standby's manifest is not in path order at {0}")]
pub struct OutOfOrder(pub RelPath);

/// [`diff`] with the standby's manifest taken one entry at a time, in path order, so
/// that it is never held whole: the active holds its own manifest and the work found
/// so far (for a volume of 100,000 files that is half the memory).
pub struct Differ {
    active: Manifest,
    /// The last standby path taken: every active path up to it is dealt with.
    cursor: Option<RelPath>,
    send: Vec<Transfer>,
    /// In path order; [`Differ::finish`] reverses it (children before parents).
    delete: Vec<RelPath>,
}

impl Differ {
    /// A comparison against the active's manifest `active`.
    pub fn new(active: Manifest) -> Differ {
        Differ {
            active,
            cursor: None,
            send: Vec::new(),
            delete: Vec::new(),
        }
    }

    /// Takes the standby's next entry; they must come in strictly increasing path
    /// order (as [`Manifest::parts`] gives them), else nothing is taken.
    pub fn feed(&mut self, theirs: Entry) -> Result<(), OutOfOrder> {
        if self.cursor.as_ref().is_some_and(|c| *c >= theirs.path) {
            return Err(OutOfOrder(theirs.path));
        }
        // Active paths before it: the standby has nothing there.
        self.send_missing(Bound::Excluded(&theirs.path));
        let old = &theirs.meta;
        if theirs.path.is_root() {
            // The root is never deleted or replaced: only its metadata can differ.
            if let Some(new) = self.active.get(&theirs.path) {
                if new.kind == old.kind && !old.same_metadata(new) {
                    self.send
                        .push(Transfer::new(&theirs.path, new, Some(old), false));
                }
            }
        } else {
            match self.active.get(&theirs.path) {
                Some(new) if new.kind == old.kind && further_name(&theirs.path, new) => {
                    // One of the standby's names of the file (and the same file as the
                    // first name there), with its content and metadata, or it is linked
                    // to the first name again.
                    if *old != *new {
                        self.send
                            .push(Transfer::new(&theirs.path, new, Some(old), false));
                    }
                }
                Some(new) if new.kind == old.kind => {
                    // A file the standby has linked, where the active has it with this
                    // one name or linked to other names (another first name), gets a
                    // copy of its own; its further names are then linked to it. (A
                    // first name linked as on the active need not change for links.)
                    let unlinked = old.link().is_some() && old.link() != new.link();
                    if !old.same_content(new) || unlinked {
                        self.send
                            .push(Transfer::new(&theirs.path, new, Some(old), true));
                    } else if !old.same_metadata(new) {
                        self.send
                            .push(Transfer::new(&theirs.path, new, Some(old), false));
                    }
                }
                // Of another kind: it goes, and the active's is sent whole.
                Some(new) => {
                    self.delete.push(theirs.path.clone());
                    self.send
                        .push(Transfer::new(&theirs.path, new, Some(old), true));
                }
                None => self.delete.push(theirs.path.clone()),
            }
        }
        self.cursor = Some(theirs.path);
        Ok(())
    }

    /// The work, once every standby entry is in, and the active's manifest back.
    pub fn finish(mut self, priority_of: impl Fn(&RelPath) -> u8) -> (Diff, Manifest) {
        self.send_missing(Bound::Unbounded);
        let Differ {
            active,
            mut send,
            mut delete,
            ..
        } = self;
        delete.reverse();
        order_by_priority(&mut send, &active, priority_of);
        (Diff { send, delete }, active)
    }
}

impl Differ {
    /// Sends whole the active's paths after the last standby path taken and before
    /// `end`: the standby has nothing there.
    fn send_missing(&mut self, end: Bound<&RelPath>) {
        let from = match &self.cursor {
            Some(c) => Bound::Excluded(c),
            None => Bound::Unbounded,
        };
        let missing = self.active.entries.range::<RelPath, _>((from, end));
        // The first run exactly: for an empty standby it is every path of the volume,
        // and a Vec doubling its way there held up to twice that (10 MiB at 100,000
        // files). Later runs (the gaps between the standby's paths) amortized: exact
        // growth by a few each time would copy the list over and over.
        let count = missing.clone().count();
        if self.send.is_empty() {
            self.send.reserve_exact(count);
        } else {
            self.send.reserve(count);
        }
        for (path, new) in missing {
            let mut transfer = Transfer::new(path, new, None, !path.is_root());
            // A standby whose manifest leaves its root out (a node of an earlier
            // version) has one all the same: it gets the active's metadata.
            transfer.on_standby |= path.is_root();
            self.send.push(transfer);
        }
    }
}

impl Transfer {
    fn new(path: &RelPath, new: &Meta, old: Option<&Meta>, content: bool) -> Transfer {
        let link = further_name(path, new);
        Transfer {
            path: path.clone(),
            kind: new.kind,
            size: new.size,
            on_standby: old.is_some(),
            standby_hash: old.and_then(|o| o.hash).map(Box::new),
            content: content && !link,
            link,
        }
    }
}

/// Whether `path` is a name of a hard-linked file other than its first ([`Meta::link`]).
fn further_name(path: &RelPath, meta: &Meta) -> bool {
    meta.kind == Kind::File && meta.link().is_some_and(|first| first != path)
}

/// Puts the priority-1 transfers first, with the new or changed directories above
/// them (and for a further name of a hard-linked file, its first name), keeping the
/// order within each group (parents before children, a first name before the others).
fn order_by_priority(
    send: &mut Vec<Transfer>,
    active: &Manifest,
    priority_of: impl Fn(&RelPath) -> u8,
) {
    // A priority-1 file in a new directory is no use before that directory exists, so
    // the directories above it travel with it even if they are priority 2. A further
    // name is made by linking it to the first name ([`Transfer::link`]), which must be
    // there before it: that name travels with it too.
    let index: HashMap<&RelPath, usize> =
        send.iter().enumerate().map(|(i, t)| (&t.path, i)).collect();
    let mut urgent = vec![false; send.len()];
    for t in send.iter() {
        if priority_of(&t.path) != 1 {
            continue;
        }
        mark_urgent(&t.path, &index, &mut urgent);
        if t.link {
            if let Some(first) = active.entries.get(&t.path).and_then(Meta::link) {
                mark_urgent(first, &index, &mut urgent);
            }
        }
    }
    drop(index);
    // Moved out in place, in order: copying the whole list (it can hold every file of
    // the volume) would double the peak memory of a first full sync.
    let mut at = 0;
    let mut first: Vec<Transfer> = Vec::new();
    send.retain(|t| {
        at += 1;
        if urgent[at - 1] {
            first.push(t.clone());
        }
        !urgent[at - 1]
    });
    // Room for them is left over from what was taken out.
    send.splice(0..0, first);
}

/// Marks the transfer of `path`, if there is one, and those of the directories above
/// it ([`order_by_priority`]).
fn mark_urgent(path: &RelPath, index: &HashMap<&RelPath, usize>, urgent: &mut [bool]) {
    if let Some(&i) = index.get(path) {
        urgent[i] = true;
    }
    let mut up = path.split_last().map(|(parent, _)| parent);
    while let Some(parent) = up {
        if let Some(&j) = index.get(&parent) {
            if urgent[j] {
                // Marked earlier, together with its own ancestors.
                break;
            }
            urgent[j] = true;
        }
        up = parent.split_last().map(|(parent, _)| parent);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn rel(s: &str) -> RelPath {
        RelPath::new(s).expect("valid path")
    }

    fn meta(kind: Kind, hash: u128) -> Meta {
        Meta {
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: (1, 0),
            size: if kind == Kind::File { 1 } else { 0 },
            hash: (kind == Kind::File).then_some(hash),
            extra: None,
        }
    }

    /// A watched file that grew after its size was taken (and before it was read
    /// whole): its block list is of other bytes than its `len`, so it is not kept.
    #[test]
    fn a_watched_file_that_grew_during_its_read_keeps_no_block_list() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("big");
        let file = fs::File::create(&path)?;
        file.set_len(twinfs_fs::written::TRACK_MIN)?;
        let reader = fs::File::open(&path)?;
        let st = sys::fstat(reader.as_fd())?;
        let key = (st.st_dev, st.st_ino);
        let mut cache = HashCache::new();
        // It grows between the stat and the read.
        file.set_len(twinfs_fs::written::TRACK_MIN + 100)?;
        cache.hash_watched(key, reader, &st, None, None)?;
        assert!(
            !cache.lists.contains(&key),
            "a list of a grown file was kept"
        );
        // Unchanged during the read: kept.
        let reader = fs::File::open(&path)?;
        let st = sys::fstat(reader.as_fd())?;
        cache.hash_watched(key, reader, &st, None, None)?;
        if sys::generation(file.as_fd()).is_ok() {
            assert!(
                cache.lists.contains(&key),
                "the list of a stable file was not kept"
            );
        }
        Ok(())
    }

    /// The wire form of a `Meta` is the flat one it had before its rare fields were
    /// boxed, and an empty box is the same as none.
    #[test]
    fn meta_travels_flat_and_its_rare_fields_are_boxed_only_when_set() {
        #[derive(Serialize)]
        struct Flat {
            kind: Kind,
            mode: u32,
            uid: u32,
            gid: u32,
            mtime: (i64, u32),
            size: u64,
            rdev: u64,
            hash: Option<u128>,
            target: Option<Vec<u8>>,
            xattrs: Vec<(Vec<u8>, Vec<u8>)>,
            link: Option<Vec<u8>>,
        }
        let mut m = meta(Kind::Symlink, 7);
        m.set_target(Some(b"there".to_vec()));
        m.set_xattrs(vec![(b"user.a".to_vec(), b"1".to_vec())]);
        let flat = Flat {
            kind: Kind::Symlink,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: (1, 0),
            size: 0,
            rdev: 0,
            hash: None,
            target: Some(b"there".to_vec()),
            xattrs: vec![(b"user.a".to_vec(), b"1".to_vec())],
            link: None,
        };
        let bytes = postcard::to_allocvec(&m).expect("encode");
        assert_eq!(bytes, postcard::to_allocvec(&flat).expect("encode flat"));
        assert_eq!(postcard::from_bytes::<Meta>(&bytes).expect("decode"), m);

        let plain = meta(Kind::File, 9);
        let decoded: Meta =
            postcard::from_bytes(&postcard::to_allocvec(&plain).expect("encode")).expect("decode");
        assert!(decoded.extra.is_none(), "nothing rare, nothing boxed");
        let mut linked = meta(Kind::File, 9);
        linked.set_link(Some(rel("first")));
        let decoded: Meta =
            postcard::from_bytes(&postcard::to_allocvec(&linked).expect("encode")).expect("decode");
        assert_eq!(decoded.link(), Some(&rel("first")));
        assert_ne!(decoded, plain, "the link identity is part of the entry");
        linked.set_link(None);
        assert!(linked.extra.is_none(), "unlinked, unboxed");
        m.set_target(None);
        m.set_xattrs(Vec::new());
        assert!(m.extra.is_none(), "emptied, unboxed");
        let mut boxed = meta(Kind::File, 9);
        boxed.extra = Some(Box::default());
        assert_eq!(boxed, plain, "an empty box is no box");
        assert!(
            std::mem::size_of::<Meta>() <= 80,
            "{}",
            std::mem::size_of::<Meta>()
        );
    }

    fn manifest(entries: &[(&str, Meta)]) -> Manifest {
        entries
            .iter()
            .map(|(path, meta)| Entry {
                path: rel(path),
                meta: meta.clone(),
            })
            .collect()
    }

    /// What a standby that applies `diff` in the documented order ends up with.
    fn apply(mut standby: Manifest, active: &Manifest, diff: &Diff) -> Manifest {
        for path in &diff.delete {
            standby.remove(path);
        }
        for t in &diff.send {
            standby.insert(Entry {
                path: t.path.clone(),
                meta: active.get(&t.path).expect("sent from the active").clone(),
            });
        }
        standby
    }

    fn paths(diff: &Diff) -> Vec<String> {
        diff.send.iter().map(|t| t.path.to_string()).collect()
    }

    /// The standby's entries, compared as they come, give the whole comparison; one
    /// that does not come in path order (a repeated or reordered part) is refused,
    /// since everything up to the last one was already settled.
    #[test]
    fn a_standby_manifest_is_compared_as_it_comes_and_only_in_order() {
        let active: Manifest = [
            ("a", meta(Kind::File, 1)),
            ("b", meta(Kind::File, 2)),
            ("d", meta(Kind::Dir, 0)),
            ("d/x", meta(Kind::File, 3)),
        ]
        .into_iter()
        .map(|(p, m)| Entry {
            path: rel(p),
            meta: m,
        })
        .collect();
        let standby = [
            ("b", meta(Kind::File, 2)),
            ("c", meta(Kind::File, 9)),
            ("d", meta(Kind::File, 4)),
        ];
        let mut differ = Differ::new(active.clone());
        for (p, m) in &standby {
            differ
                .feed(Entry {
                    path: rel(p),
                    meta: m.clone(),
                })
                .expect("in order");
        }
        let (d, back) = differ.finish(|_| 2);
        assert_eq!(back, active);
        let sent: Vec<(String, bool, bool, Option<u128>)> = d
            .send
            .iter()
            .map(|t| {
                (
                    t.path.to_string(),
                    t.content,
                    t.on_standby,
                    t.standby_hash.as_deref().copied(),
                )
            })
            .collect();
        assert_eq!(
            sent,
            vec![
                ("a".into(), true, false, None),
                ("d".into(), true, true, Some(4)),
                ("d/x".into(), true, false, None),
            ]
        );
        assert_eq!(d.delete, vec![rel("d"), rel("c")]);

        let mut differ = Differ::new(active);
        differ
            .feed(Entry {
                path: rel("c"),
                meta: meta(Kind::File, 9),
            })
            .expect("first");
        for again in ["c", "b"] {
            let refused = differ.feed(Entry {
                path: rel(again),
                meta: meta(Kind::File, 2),
            });
            assert!(refused.is_err(), "{again} after c");
        }
    }

    #[test]
    fn priority_one_first_with_its_directories() {
        let active = manifest(&[
            ("a", meta(Kind::File, 1)),
            ("d", meta(Kind::Dir, 0)),
            ("d/key", meta(Kind::File, 2)),
            ("d/other", meta(Kind::File, 3)),
            ("z", meta(Kind::File, 4)),
        ]);
        let standby = manifest(&[
            ("old", meta(Kind::Dir, 0)),
            ("old/x", meta(Kind::File, 5)),
            ("old/x2", meta(Kind::File, 5)),
        ]);
        let urgent = [rel("d/key"), rel("z")];
        let d = diff(
            &active,
            &standby,
            |p| if urgent.contains(p) { 1 } else { 2 },
        );
        assert_eq!(paths(&d), ["d", "d/key", "z", "a", "d/other"]);
        assert!(d.send.iter().all(|t| t.content));
        assert_eq!(d.delete, [rel("old/x2"), rel("old/x"), rel("old")]);
        assert_eq!(apply(standby, &active, &d), active);
    }

    /// A priority-1 name of a hard-linked file whose first name is priority 2: the
    /// standby makes it by linking it to the first name, which travels first.
    #[test]
    fn a_priority_one_further_name_goes_after_its_first_name() {
        let mut linked = meta(Kind::File, 1);
        linked.set_link(Some(rel("b/f")));
        let active = manifest(&[
            ("a", meta(Kind::File, 2)),
            ("b", meta(Kind::Dir, 0)),
            ("b/f", linked.clone()),
            ("b/g", meta(Kind::File, 3)),
            ("p", linked),
        ]);
        let d = diff(&active, &Manifest::default(), |p| {
            if *p == rel("p") {
                1
            } else {
                2
            }
        });
        assert_eq!(paths(&d), ["b", "b/f", "p", "a", "b/g"]);
        assert!(d.send[2].link && !d.send[2].content);
        assert!(d.send[1].content);
        assert_eq!(apply(Manifest::default(), &active, &d), active);
    }

    /// A hash is cached only once a change would move the ctime, also where the
    /// filesystem keeps whole seconds: a same-size rewrite later in that second keeps
    /// size, mtime and ctime.
    #[test]
    fn a_ctime_of_whole_seconds_settles_only_after_they_are_past() {
        let at = |secs: u64, nanos: u32| UNIX_EPOCH + Duration::new(secs, nanos);
        let stamp = |nanos: u32| Stamp {
            size: 1,
            mtime: (1000, nanos),
            ctime: (1000, nanos),
        };
        assert!(stamp(5).settled(at(1000, 500_000_000)));
        assert!(!stamp(5).settled(at(1000, 50_000_000)));
        assert!(!stamp(0).settled(at(1000, 500_000_000)));
        assert!(!stamp(0).settled(at(1001, 900_000_000)));
        assert!(stamp(0).settled(at(1002, 200_000_000)));
    }

    #[test]
    fn kind_change_is_deleted_then_sent() {
        let active = manifest(&[("x", meta(Kind::File, 1))]);
        let standby = manifest(&[("x", meta(Kind::Dir, 0)), ("x/y", meta(Kind::File, 1))]);
        let d = diff(&active, &standby, |_| 2);
        assert_eq!(d.delete, [rel("x/y"), rel("x")]);
        assert_eq!(paths(&d), ["x"]);
        assert!(d.send[0].content);
    }

    #[test]
    fn metadata_only_change_leaves_content_home() {
        let mut touched = meta(Kind::File, 7);
        touched.mtime = (2, 5);
        touched.set_xattrs(vec![(b"user.a".to_vec(), b"1".to_vec())]);
        let active = manifest(&[("f", touched)]);
        let standby = manifest(&[("f", meta(Kind::File, 7)), ("", meta(Kind::Dir, 0))]);
        let d = diff(&active, &standby, |_| 2);
        assert_eq!(paths(&d), ["f"]);
        assert!(!d.send[0].content);
        // The root is never deleted, even when a manifest lists it.
        assert!(d.delete.is_empty());
        assert!(diff(&active, &active, |_| 1).is_empty());
    }

    #[test]
    fn the_roots_metadata_is_sent_when_it_differs_and_the_root_never_goes() {
        let mut root = meta(Kind::Dir, 0);
        root.mode = 0o750;
        root.gid = 100;
        root.set_xattrs(vec![(
            b"system.posix_acl_default".to_vec(),
            b"acl".to_vec(),
        )]);
        let active = manifest(&[("", root.clone()), ("f", meta(Kind::File, 7))]);
        // The standby's root has other metadata.
        let standby = manifest(&[("", meta(Kind::Dir, 0)), ("f", meta(Kind::File, 7))]);
        let d = diff(&active, &standby, |_| 2);
        assert_eq!(paths(&d), [""]);
        assert!(d.send[0].on_standby && !d.send[0].content);
        assert!(d.delete.is_empty());
        // A standby whose manifest has no root (an earlier version) gets it too,
        // as metadata of what it has.
        let old = manifest(&[("f", meta(Kind::File, 7))]);
        let d = diff(&active, &old, |_| 2);
        assert_eq!(paths(&d), [""]);
        assert!(d.send[0].on_standby && !d.send[0].content);
        // Nothing when the roots match, and no root goes when the active lists none.
        assert!(diff(&active, &active, |_| 2).is_empty());
        let bare = manifest(&[("f", meta(Kind::File, 7))]);
        assert!(diff(&bare, &standby, |_| 2).is_empty());
    }

    #[test]
    fn a_scan_lists_the_root_with_its_metadata_whatever_the_filter() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("f"), "x").expect("write");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o750))
            .expect("chmod");
        let root = std::fs::File::open(dir.path()).expect("open");
        let m = scan(root.as_fd(), |p, _| !p.is_root(), &mut HashCache::new()).expect("scan");
        let top = m.get(&RelPath::root()).expect("the root is listed");
        assert_eq!((top.kind, top.mode), (Kind::Dir, 0o750));
        let (described, _, _) = describe(root.as_fd(), &RelPath::root(), &mut HashCache::new())
            .expect("describe")
            .expect("the root is there");
        assert_eq!(&described, top);
    }

    #[test]
    fn names_past_path_max_are_left_out_and_counted_and_the_scan_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        // 20 levels of 250-byte names, 5,019 bytes in all: 16 fit (4,015 bytes), the
        // 17th does not. Made level by level, as no single path may be that long.
        let name = "d".repeat(250);
        let made = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "cd {} && mkdir keep && echo x > keep/f && \
                 for i in $(seq 1 20); do mkdir {name} && cd {name} || exit 1; done && echo deep > f",
                dir.path().display()
            ))
            .status()
            .expect("bash");
        assert!(made.success());
        let root = std::fs::File::open(dir.path()).expect("open");
        let mut cache = HashCache::new();
        for _ in 0..2 {
            let m = scan(root.as_fd(), |_, _| true, &mut cache)
                .expect("a name past PATH_MAX does not fail the scan");
            assert!(m.get(&RelPath::new("keep/f").expect("path")).is_some());
            let longest = m.iter().map(|(p, _)| p.as_bytes().len()).max();
            assert_eq!(longest, Some(16 * 251 - 1));
            assert_eq!(cache.last_scan().too_long, 1);
            let below: Vec<(usize, u64)> = cache
                .too_long_below()
                .iter()
                .map(|(d, n)| (d.as_bytes().len(), *n))
                .collect();
            assert_eq!(below, [(16 * 251 - 1, 1)]);
        }
        use std::os::unix::fs::MetadataExt;
        // Asked for two names, it walks the whole tree.
        let f = std::fs::metadata(dir.path().join("keep/f")).expect("stat");
        let names = names_of(root.as_fd(), (f.dev(), f.ino()), 2, |_, _| true)
            .expect("a name past PATH_MAX does not fail the walk");
        assert_eq!(names, [RelPath::new("keep/f").expect("path")]);
    }

    #[test]
    fn manifest_round_trips_through_postcard() {
        let mut m = meta(Kind::Symlink, 0);
        m.set_target(Some(b"../x".to_vec()));
        let manifest = manifest(&[("a", meta(Kind::File, u128::MAX)), ("b", m)]);
        let bytes = postcard::to_allocvec(&manifest).expect("encode");
        assert_eq!(
            postcard::from_bytes::<Manifest>(&bytes).expect("decode"),
            manifest
        );
    }

    fn arb_meta() -> impl Strategy<Value = Meta> {
        let kind = prop::sample::select(vec![Kind::File, Kind::Dir, Kind::Symlink]);
        (kind, 0u128..3, 0u32..2, 0i64..2, any::<bool>()).prop_map(
            |(kind, hash, mode, mtime, xattr)| {
                let mut m = meta(kind, hash);
                m.mode = 0o600 | mode;
                m.mtime = (mtime, 0);
                if kind == Kind::Symlink {
                    m.set_target(Some(vec![b'a' + hash as u8]));
                }
                if xattr {
                    m.set_xattrs(vec![(b"user.x".to_vec(), vec![1])]);
                }
                m
            },
        )
    }

    fn arb_manifest() -> impl Strategy<Value = BTreeMap<RelPath, Meta>> {
        let path = prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..=3)
            .prop_map(|parts| rel(&parts.join("/")));
        prop::collection::btree_map(path, arb_meta(), 0..10)
    }

    fn priority(path: &RelPath) -> u8 {
        if path.as_bytes().ends_with(b"b") {
            1
        } else {
            2
        }
    }

    proptest! {
        #[test]
        fn applying_the_diff_gives_the_active(
            base in arb_manifest(),
            only_a in arb_manifest(),
            only_b in arb_manifest(),
        ) {
            let mut a = base.clone();
            a.extend(only_a);
            let mut b = base;
            b.extend(only_b);
            let to_manifest = |m: BTreeMap<RelPath, Meta>| Manifest { entries: m };
            let (a, b) = (to_manifest(a), to_manifest(b));
            let d = diff(&a, &b, priority);

            prop_assert_eq!(&apply(b.clone(), &a, &d), &a);
            for t in &d.send {
                let old = b.get(&t.path);
                let new = a.get(&t.path).expect("sent from the active");
                let same = old.is_some_and(|old| old.same_content(new));
                prop_assert_eq!(t.content, !same, "{:?}", t.path);
            }
            // Parents before children in `send`; children before parents in `delete`.
            for (i, t) in d.send.iter().enumerate() {
                for later in &d.send[i + 1..] {
                    prop_assert!(!t.path.starts_with(&later.path));
                }
            }
            for (i, p) in d.delete.iter().enumerate() {
                for later in &d.delete[i + 1..] {
                    prop_assert!(!later.starts_with(p));
                }
            }
            // Nothing that is neither priority 1 nor above a priority-1 entry comes
            // before a priority-1 entry.
            let needed = |p: &RelPath| {
                priority(p) == 1
                    || d.send.iter().any(|t| priority(&t.path) == 1 && t.path.starts_with(p))
            };
            if let Some(last_urgent) = d.send.iter().rposition(|t| priority(&t.path) == 1) {
                prop_assert!(d.send[..last_urgent].iter().all(|t| needed(&t.path)));
            }
            prop_assert!(diff(&a, &a, priority).is_empty());
        }
    }

    #[test]
    // Lists of one range are what is meant here, not ranges of numbers.
    #[allow(clippy::single_range_in_vec_init)]
    fn a_list_rehashed_from_the_written_ranges_is_the_list_of_the_new_bytes() {
        let block = delta::MIN_BLOCK as usize;
        let list_of = |data: &[u8]| {
            let mut h = BlockHasher::new(delta::MIN_BLOCK);
            h.update(data);
            h.finish()
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let old: Vec<u8> = (0..5 * block + 100).map(|i| (i % 251) as u8).collect();
        let old_list = list_of(&old);
        let check = |new: &[u8], written: &[std::ops::Range<u64>], want_read: u64| {
            fs::write(&path, new).expect("write");
            let f = fs::File::open(&path).expect("open");
            let (list, read) = rehash_written(
                f.as_fd(),
                &old_list,
                old.len() as u64,
                new.len() as u64,
                written,
            )
            .expect("read")
            .expect("long enough");
            assert_eq!(list, list_of(new), "written {written:?}");
            assert_eq!(read, want_read, "written {written:?}");
        };
        // A few bytes across a block boundary: those two blocks are read.
        let mut new = old.clone();
        new[2 * block - 3..2 * block + 3].fill(0);
        check(
            &new,
            &[(2 * block - 3) as u64..(2 * block + 3) as u64],
            2 * block as u64,
        );
        // Shorter: the new last block, whose extent changed, is read; nothing else.
        let short = &old[..3 * block + 10];
        check(short, &[(3 * block + 10) as u64..u64::MAX], 10);
        // Longer: the old short block and the new ones.
        let mut long = old.clone();
        long.resize(7 * block, 9);
        check(&long, &[], 2 * block as u64);
        // Cut and grown back to the same length: the record says so.
        let mut zeroed = old.clone();
        zeroed[block..].fill(0);
        check(
            &zeroed,
            &[block as u64..u64::MAX],
            (old.len() - block) as u64,
        );
        // A file shorter than it should be has changed again: read it whole.
        fs::write(&path, &old[..block]).expect("write");
        let f = fs::File::open(&path).expect("open");
        let got = rehash_written(
            f.as_fd(),
            &old_list,
            old.len() as u64,
            old.len() as u64,
            &[3 * block as u64..3 * block as u64 + 1],
        )
        .expect("read");
        assert_eq!(got, None);
    }
}
