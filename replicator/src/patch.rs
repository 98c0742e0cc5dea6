//! In-place updates of large files on a standby.
//!
//! A block delta normally builds a whole new copy of the file beside it and renames it
//! over ([`crate::apply::Applier::build_from_blocks`]): for a 1 MiB change in a 512 MiB
//! file that copies 512 MiB. When few bytes changed, the standby instead writes them
//! into the file itself:
//!
//! 1. The new block hashes are worked out from the old ones ([`BlockCache`]) and the
//!    records received ([`patched_list`]); records that do not fit whole blocks, or a
//!    file whose block size would change, go the copy way. The new list must give the
//!    active's content hash ([`crate::delta::content_hash`]), or the copy way (which
//!    reads and checks every byte) is taken: the file is never read whole here.
//! 2. The records and the new size and metadata are written to a **journal** in the
//!    node's state directory and made durable ([`Journal::write`]).
//! 3. The FUSE layer is asked for the file ([`twinfs_fs::Volume::begin_patch`]): it
//!    refuses while a handle on it is open (that reader would see the bytes change;
//!    the copy way keeps its version whole for it), and holds back new opens until
//!    the kernel has been told to drop what it cached.
//! 4. The records are written in place, the file truncated or extended, its metadata
//!    set; the kernel's caches are invalidated and opens go on, seeing the new version.
//! 5. The file is fsync'd, the journal removed.
//!
//! A crash between 2 and 5 leaves a journal that [`Journal::replay`] applies again at
//! the next start (the writes are idempotent), so the file ends up whole: the new
//! version. A journal that was not completely written is discarded; the file was not
//! touched yet. A journal is only ever replayed into the inode it was written for
//! (number and generation: its paths never leave the volume's filesystem, whose
//! device number may differ after a reboot), and one that cannot be applied is
//! dropped with a warning rather than stopping the daemon: the next full sync repairs
//! its file. One whose file cannot be opened for a passing reason (a disk error, no
//! fd left) is kept for the next start. Journals hold file contents: owner only. If
//! the write in 4 fails, a new copy is built at once ([`replace_by_copy`]), and the
//! journal goes once that copy is in place.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use twinfs_fs::sys::{self, Stat};

use crate::apply::{Applier, ApplyError, FileMeta};
use crate::delta::{self, BlockHasher, BlockList};
use crate::manifest::Stamp;
use crate::path::RelPath;

/// Files smaller than this are always rebuilt beside the old copy: copying them costs
/// little, and a file rewritten whole gains nothing from a journal.
pub const MIN_FILE: u64 = 16 << 20;

/// The most bytes of records an in-place update takes (they are held in memory and
/// written twice: journal, then file); more go the copy way.
pub const MAX_RECORDS: u64 = 8 << 20;

/// The most bytes of records held for in-place updates by all large files at once
/// (a full sync may bring deltas of many): past it, a file goes the copy way, its
/// records written as they come.
pub const MAX_HELD: u64 = 4 * MAX_RECORDS;

/// The standby's budget of bytes of records held for in-place updates.
pub static HELD: Budget = Budget::new(MAX_HELD);

/// Bytes that may be held in memory at once, shared by whoever reserves them.
#[derive(Debug)]
pub struct Budget {
    used: AtomicU64,
    limit: u64,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub const fn new(limit: u64) -> Budget {
        Budget {
            used: AtomicU64::new(0),
            limit,
        }
    }

    /// A reservation of no bytes yet.
    pub fn reserve(&self) -> Held<'_> {
        Held {
            budget: self,
            bytes: 0,
        }
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

/// Bytes reserved from a [`Budget`] until dropped.
#[derive(Debug)]
pub struct Held<'a> {
    budget: &'a Budget,
    bytes: u64,
}

impl Held<'_> {
    /// Reserves `bytes` more; false, reserving nothing, if the budget has not that
    /// much left.
    pub fn take(&mut self, bytes: u64) -> bool {
        let limit = self.budget.limit;
        let taken = self
            .budget
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|n| *n <= limit)
            })
            .is_ok();
        if taken {
            self.bytes += bytes;
        }
        taken
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Whether `sent` bytes of records for a file of `new_size` bytes are few enough to
/// patch the file in place.
pub fn worth_patching(sent: u64, new_size: u64) -> bool {
    new_size >= MIN_FILE && sent <= MAX_RECORDS && sent <= new_size / 8
}

/// What must be unchanged for a file's block list to still describe it: the file
/// itself, and its [`Stamp`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    /// (device, inode).
    pub key: (u64, u64),
    /// Size and times.
    pub changed: Stamp,
}

impl FileStamp {
    /// The stamp of a file as `st` shows it.
    pub fn of(st: &Stat) -> FileStamp {
        FileStamp {
            key: (st.st_dev, st.st_ino),
            changed: Stamp::of(st),
        }
    }

    /// The file's size.
    pub fn size(&self) -> u64 {
        self.changed.size
    }
}

/// Block lists of large files, by a key (a standby's: by path), each with the stamp
/// of the file it was made for, so that a delta does not read the whole old copy to
/// tell the active what it has. Only the replicator writes a standby's files, and it
/// updates the list it changed; a list whose file's stamp moved anyway is not used.
/// (The active keeps the lists of the files its mount watches in one too; see
/// [`crate::manifest::HashCache::watch`].) Bounded: past [`MAX_HASHES`] hashes in
/// all, lists are dropped.
#[derive(Debug)]
pub struct BlockCache<K = RelPath, S = FileStamp> {
    entries: HashMap<K, (S, Arc<BlockList>)>,
    hashes: usize,
}

/// The most hashes one [`BlockCache`] keeps (16 bytes each): 4 MiB, the lists of
/// 16 GiB of files.
pub const MAX_HASHES: usize = 256 << 10;

impl<K, S> Default for BlockCache<K, S> {
    fn default() -> Self {
        BlockCache {
            entries: HashMap::new(),
            hashes: 0,
        }
    }
}

impl<K: Eq + std::hash::Hash + Clone, S: PartialEq> BlockCache<K, S> {
    /// The list kept for `key`, if it was made for the file `stamp` describes.
    pub fn get(&self, key: &K, stamp: &S) -> Option<Arc<BlockList>> {
        self.entries
            .get(key)
            .filter(|(s, _)| s == stamp)
            .map(|(_, list)| list.clone())
    }

    /// Whether a list is kept for `key`.
    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// Keeps `list` for `key` as it is at `stamp`.
    pub fn put(&mut self, key: &K, stamp: S, list: Arc<BlockList>) {
        self.forget(key);
        if list.hashes.len() > MAX_HASHES {
            return;
        }
        while self.hashes + list.hashes.len() > MAX_HASHES {
            let Some(victim) = self.entries.keys().next().cloned() else {
                break;
            };
            self.forget(&victim);
        }
        self.hashes += list.hashes.len();
        self.entries.insert(key.clone(), (stamp, list));
    }

    /// Drops what is kept for `key`, and returns it.
    pub fn forget(&mut self, key: &K) -> Option<(S, Arc<BlockList>)> {
        let (stamp, list) = self.entries.remove(key)?;
        self.hashes -= list.hashes.len();
        Some((stamp, list))
    }

    /// Drops everything (the node stops being a standby).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.hashes = 0;
    }

    /// How many lists are kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The block list of the file `old` describes (of `old_size` bytes) once `records`
/// (ascending `(offset, bytes)`, as a blocks stream brings them) are written into it
/// and it is cut or extended to `new_size`. Refuses what an in-place update cannot
/// vouch for: records that start or end inside a block (but at the end of the file),
/// a block kept from the old copy whose length changes, a block size that changes
/// with the size, bytes past the old end that no record brings.
pub fn patched_list(
    old: &BlockList,
    old_size: u64,
    new_size: u64,
    records: &[(u64, Vec<u8>)],
) -> Result<BlockList, &'static str> {
    let block = u64::from(old.block_size);
    if delta::block_size(new_size) != old.block_size
        || delta::block_size(old_size) != old.block_size
    {
        return Err("the block size changes with the file's size");
    }
    if old.hashes.len() as u64 != old_size.div_ceil(block) {
        return Err("the old block list does not fit the old size");
    }
    // Bytes past the old end come in records, of which there are few: a size beyond
    // what they can bring is refused before a list of that size is allocated.
    let brought = records
        .iter()
        .fold(0u64, |n, (_, data)| n.saturating_add(data.len() as u64));
    if new_size > old_size.saturating_add(brought) {
        return Err("bytes past the old end that no record brings");
    }
    let count = usize::try_from(new_size.div_ceil(block)).map_err(|_| "too many blocks")?;
    let mut hashes = vec![0u128; count];
    let mut sent = vec![false; count];
    // Consecutive records make a run, hashed block by block from its start: it must
    // start at a block and end at one (or at the end of the file).
    let mut end_run = |run: Option<(u64, BlockHasher)>, end: u64| {
        let Some((start, hasher)) = run else {
            return Ok(());
        };
        if end % block != 0 && end != new_size {
            return Err("a record ends inside a block");
        }
        let first = (start / block) as usize;
        for (i, hash) in hasher.finish().hashes.into_iter().enumerate() {
            hashes[first + i] = hash;
            sent[first + i] = true;
        }
        Ok(())
    };
    let mut run: Option<(u64, BlockHasher)> = None;
    let mut cursor = 0u64;
    for (offset, data) in records {
        let offset = *offset;
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or("a record past the largest offset")?;
        if offset < cursor || end > new_size {
            return Err("records out of order or past the end of the file");
        }
        if offset > old_size {
            return Err("a gap past the end of the old copy");
        }
        if run.is_some() && offset != cursor {
            end_run(run.take(), cursor)?;
        }
        let (_, hasher) = match &mut run {
            Some(run) => run,
            None if offset % block != 0 => return Err("a record starts inside a block"),
            None => run.insert((offset, BlockHasher::new(old.block_size))),
        };
        hasher.update(data);
        cursor = end;
    }
    end_run(run.take(), cursor)?;
    for (index, hash) in hashes.iter_mut().enumerate() {
        if sent[index] {
            continue;
        }
        let start = index as u64 * block;
        let new_end = (start + block).min(new_size);
        let old_end = (start + block).min(old_size);
        if start >= old_size || new_end != old_end {
            return Err("a block kept from the old copy changes length");
        }
        *hash = old.hashes[index];
    }
    Ok(BlockList {
        block_size: old.block_size,
        hashes,
    })
}

/// Reserves the disk space that writing `records` into `file`, now `old_size` bytes
/// long, needs where it lies in holes (a sparse file: the standby keeps the holes of
/// what it receives), so that the write in place cannot run out of space half way.
/// Space past the old end is the caller's ([`libc::FALLOC_FL_KEEP_SIZE`]). A
/// filesystem without `fallocate` is left to the write (and on one that copies on
/// write, such as btrfs, a reservation does not cover an overwrite).
pub fn reserve(file: BorrowedFd<'_>, records: &[(u64, Vec<u8>)], old_size: u64) -> io::Result<()> {
    let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
    for (offset, data) in records {
        let end = offset.saturating_add(data.len() as u64).min(old_size);
        if *offset < end {
            delta::push_run(&mut runs, *offset..end);
        }
    }
    for run in runs {
        // Holes get blocks (reading zeros, as before); the bytes already there stay,
        // and the size too (KEEP_SIZE: the file may have shrunk since its stamp).
        match sys::fallocate(
            file,
            libc::FALLOC_FL_KEEP_SIZE,
            run.start,
            run.end - run.start,
        ) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes `records` into `file` and makes it `new_size` bytes long.
pub fn write_records(
    file: BorrowedFd<'_>,
    records: &[(u64, Vec<u8>)],
    new_size: u64,
) -> io::Result<()> {
    for (offset, data) in records {
        let mut done = 0;
        while done < data.len() {
            match sys::pwrite(file, &data[done..], offset + done as u64) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    if sys::fstat(file)?.st_size as u64 != new_size {
        sys::ftruncate(file, new_size)?;
    }
    Ok(())
}

/// One in-place update as its journal keeps it. Written with the records borrowed
/// (`R` = `&[(u64, Vec<u8>)]`), read back owned.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry<R = Vec<(u64, Vec<u8>)>> {
    /// The volume path of the file (its bytes).
    pub path: Vec<u8>,
    /// The (device, inode) of the file: a journal for a file that was replaced since
    /// is not replayed into the new one. Only the inode number is compared: the
    /// device number of a filesystem can change across a reboot (btrfs, NVMe, LVM).
    pub key: (u64, u64),
    /// The file's inode generation ([`sys::generation`]), which tells it from a later
    /// file given the same inode number (ext4 reuses them); `None` on a filesystem
    /// without generation numbers, where the key alone is checked.
    pub generation: Option<u64>,
    /// Its new size.
    pub size: u64,
    /// Its new metadata.
    pub meta: FileMeta,
    /// The bytes to write, ascending `(offset, bytes)`.
    pub records: R,
}

/// The first bytes of a journal file; the last two say the format version.
const JOURNAL_MAGIC: &[u8; 8] = b"twfsjn02";

/// The first bytes of a journal of format 01, which had no inode generation.
const JOURNAL_MAGIC_01: &[u8; 8] = b"twfsjn01";

/// Where a volume's in-place updates are journaled: a directory of the node's state
/// directory, one file per update under way.
#[derive(Clone, Debug)]
pub struct Journal {
    dir: PathBuf,
}

/// The journal file of one update, removed by [`Journal::done`].
#[derive(Debug)]
pub struct Written(PathBuf);

impl Journal {
    /// The journal kept in `dir` (made when first written).
    pub fn new(dir: impl Into<PathBuf>) -> Journal {
        Journal { dir: dir.into() }
    }

    /// Where it is kept.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the directory if it is missing, durably (its parent fsync'd): a journal
    /// in a directory whose own entry a crash could lose would be no journal.
    pub fn prepare(&self) -> io::Result<()> {
        if self.dir.is_dir() {
            return Ok(());
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        if let Some(parent) = self.dir.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
        Ok(())
    }

    /// Whether no journal is kept (no update is under way or left by a failure).
    pub fn is_empty(&self) -> bool {
        std::fs::read_dir(&self.dir).map_or(true, |mut d| d.next().is_none())
    }

    /// Writes `entry` durably (file and directory fsync'd).
    pub fn write<R: Serialize>(&self, entry: &Entry<R>) -> io::Result<Written> {
        self.write_named(entry, "")
    }

    /// [`Journal::write`] by a standby of `epoch`: replayed only into a standby of
    /// the same epoch (see [`Journal::replay`]).
    pub fn write_at<R: Serialize>(&self, entry: &Entry<R>, epoch: u64) -> io::Result<Written> {
        self.write_named(entry, &format!("-e{epoch}"))
    }

    fn write_named<R: Serialize>(&self, entry: &Entry<R>, tag: &str) -> io::Result<Written> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        self.prepare()?;
        let body = postcard::to_allocvec(entry).map_err(io::Error::other)?;
        let sum = xxhash_rust::xxh3::xxh3_64(&body).to_le_bytes();
        let name = format!(
            "{}-{}{tag}.journal",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = self.dir.join(name);
        let written = Written(path.clone());
        // The new content of any file, a 0600 one too: owner only.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        for part in [&JOURNAL_MAGIC[..], &body, &sum] {
            io::Write::write_all(&mut &file, part)?;
        }
        file.sync_all()?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(written)
    }

    /// Removes the journal of an update that is durable in the file. The directory is
    /// fsync'd, so a journal of an older version can never be replayed over a newer one.
    pub fn done(&self, written: Written) -> io::Result<()> {
        std::fs::remove_file(&written.0)?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// Applies again every update whose journal is whole (a crash cut it short), and
    /// removes its journal. An update that cannot be applied to its file (the file was
    /// replaced or removed, its parent is now a symlink, its metadata cannot be set) is
    /// logged and its journal removed: the next full sync repairs the file. One whose
    /// writes fail (a disk error) keeps its journal for the next start. Only an
    /// unreadable journal directory is an error. Returns how many were applied.
    ///
    /// `standby_of` is the epoch this node is a standby of now, `None` if it is not a
    /// standby: a journal written at another epoch is not replayed (this node has been
    /// active since, or followed another active: its file may have been written
    /// since, which the old records would overwrite); the next full sync repairs it.
    pub fn replay(&self, applier: &Applier<'_>, standby_of: Option<u64>) -> io::Result<usize> {
        // (Made 0755 by an older twinfs: its journals hold file contents.)
        if let Err(e) = std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
        {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(journal = %self.dir.display(), error = %e,
                    "cannot make the journal directory owner only");
            }
        }
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut applied = 0;
        for dirent in entries {
            let file = match dirent {
                Ok(dirent) => dirent.path(),
                Err(e) => {
                    tracing::error!(journal = %self.dir.display(), error = %e,
                        "cannot list the in-place update journals; the rest are left for the next start");
                    break;
                }
            };
            if file.extension() != Some(std::ffi::OsStr::new("journal")) {
                tracing::warn!(entry = %file.display(), "not a journal; left alone");
                continue;
            }
            let bytes = match std::fs::read(&file) {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::error!(journal = %file.display(), error = %e,
                        "cannot read an in-place update journal; left for the next start");
                    continue;
                }
            };
            let written_at = epoch_of(&file);
            match decode(&bytes) {
                Decoded::Whole(entry)
                    if written_at.is_some_and(|epoch| standby_of != Some(epoch)) =>
                {
                    let path = String::from_utf8_lossy(&entry.path).into_owned();
                    if standby_of.is_some() {
                        tracing::warn!(%path, journal = %file.display(),
                            "in-place update not replayed: this node has changed epoch since \
                             (its file may have been written since); the next full sync \
                             repairs the file");
                    } else {
                        // Active: no full sync brings it another version.
                        tracing::error!(%path, journal = %file.display(),
                            "in-place update not replayed: this node has been active since \
                             (its file may have been written since); if it was not, the file \
                             may be half written: compare it with a standby's copy");
                    }
                }
                Decoded::Whole(entry) => {
                    let path = String::from_utf8_lossy(&entry.path).into_owned();
                    match replay_one(applier, &entry) {
                        Ok(Replayed::Applied) => {
                            applied += 1;
                            tracing::warn!(%path, "finished an in-place update a crash interrupted");
                        }
                        Ok(Replayed::Not(why)) => {
                            tracing::warn!(%path, why = %why,
                                "in-place update not replayed; the next full sync repairs the file");
                        }
                        Err(e) => {
                            tracing::error!(%path, journal = %file.display(), error = %e,
                                "in-place update could not be finished; its journal is kept for the next start");
                            continue;
                        }
                    }
                }
                Decoded::Format01 => {
                    tracing::warn!(journal = %file.display(),
                        "in-place update journaled by an older twinfs not replayed: its file \
                         cannot be told from a later one on the same inode number; the next \
                         full sync repairs the file");
                }
                Decoded::Torn => {
                    tracing::info!(journal = %file.display(), "discarded an incomplete journal (its file was not touched)");
                }
            }
            if let Err(e) = std::fs::remove_file(&file) {
                tracing::error!(journal = %file.display(), error = %e,
                    "cannot remove an in-place update journal");
            }
        }
        if let Err(e) = std::fs::File::open(&self.dir).and_then(|d| d.sync_all()) {
            tracing::warn!(journal = %self.dir.display(), error = %e,
                "cannot fsync the journal directory after the replay");
        }
        Ok(applied)
    }
}

/// After the in-place update of `path` journaled as `written` failed half way:
/// builds a new copy of the file from what it holds and the update's `records`
/// (which cover every byte the update touched), which must give the content hash
/// `expected`, with `meta`, and renames it durably over the file; only then is the
/// journal removed. If anything fails, the journal stays and finishes the update at
/// the next start. Returns the new copy's block list.
#[allow(clippy::too_many_arguments)]
pub fn replace_by_copy(
    applier: &Applier<'_>,
    journal: &Journal,
    written: Written,
    path: &RelPath,
    new_size: u64,
    records: &[(u64, Vec<u8>)],
    expected: u128,
    meta: &FileMeta,
) -> Result<Option<BlockList>, ApplyError> {
    let mut blocks = records
        .iter()
        .map(|(offset, data)| Ok((*offset, data.clone())));
    let mut prepared = applier.build_from_blocks(path, new_size, &mut blocks, expected, meta)?;
    let list = prepared.take_blocks();
    prepared.sync_data()?;
    applier.place_prepared(prepared, true)?;
    journal.done(written).map_err(|source| ApplyError::Io {
        op: "remove the journal of",
        path: path.clone(),
        source,
    })?;
    Ok(list)
}

/// The epoch a journal file's name says it was written at (`PID-N-eEPOCH.journal`);
/// `None` for a name without one (an older twinfs).
fn epoch_of(file: &Path) -> Option<u64> {
    let stem = file.file_stem()?.to_str()?;
    stem.rsplit_once("-e")?.1.parse().ok()
}

/// What a journal file holds.
#[derive(Debug, PartialEq, Eq)]
enum Decoded {
    /// A whole entry.
    Whole(Entry),
    /// A whole entry of format 01 (no inode generation), not decoded further.
    Format01,
    /// Anything else: a journal whose writing was cut short.
    Torn,
}

/// The entry of a journal file, if it is whole.
fn decode(bytes: &[u8]) -> Decoded {
    let (body, old) = match (
        bytes.strip_prefix(JOURNAL_MAGIC.as_slice()),
        bytes.strip_prefix(JOURNAL_MAGIC_01.as_slice()),
    ) {
        (Some(body), _) => (body, false),
        (None, Some(body)) => (body, true),
        (None, None) => return Decoded::Torn,
    };
    let Some(at) = body.len().checked_sub(8) else {
        return Decoded::Torn;
    };
    let (body, sum) = body.split_at(at);
    if xxhash_rust::xxh3::xxh3_64(body).to_le_bytes() != sum {
        return Decoded::Torn;
    }
    if old {
        return Decoded::Format01;
    }
    postcard::from_bytes(body).map_or(Decoded::Torn, Decoded::Whole)
}

/// What became of one journaled update at its replay.
#[derive(Debug)]
enum Replayed {
    /// Written again, with its metadata, and fsync'd.
    Applied,
    /// Not applied (or not all of it), for the reason given; the journal can go.
    Not(String),
}

/// Applies one journaled update again. An error is a failed write or fsync of the
/// file, which keeps the journal.
fn replay_one(applier: &Applier<'_>, entry: &Entry) -> io::Result<Replayed> {
    let Ok(path) = RelPath::new(entry.path.clone()) else {
        return Ok(Replayed::Not("not a volume path".into()));
    };
    let file = match applier.open_for_patch(&path) {
        // The device number too where there is no generation to tell files apart.
        Ok(Some((fd, st)))
            if st.st_ino == entry.key.1
                && (entry.generation.is_some() || st.st_dev == entry.key.0) =>
        {
            fd
        }
        Ok(_) => {
            return Ok(Replayed::Not(
                "the file was replaced or removed since".into(),
            ))
        }
        // A passing failure (a disk error, no fd or memory left) keeps the journal:
        // the file may be half written.
        Err(e) if e.is_passing() => return Err(io::Error::other(e.to_string())),
        Err(e) => return Ok(Replayed::Not(format!("cannot open the file: {e}"))),
    };
    if let Some(generation) = entry.generation {
        if sys::generation(file.as_fd()).ok() != Some(generation) {
            return Ok(Replayed::Not(
                "another file has the inode number of the one journaled".into(),
            ));
        }
    }
    write_records(file.as_fd(), &entry.records, entry.size)?;
    let meta = applier.set_file_meta(file.as_fd(), &entry.meta, &path);
    sys::fsync(file.as_fd(), false)?;
    match meta {
        Ok(()) => Ok(Replayed::Applied),
        Err(e) => Ok(Replayed::Not(format!(
            "the content was written but the metadata cannot be set: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_records_stay_within_the_budget_of_all_files() {
        let budget = Budget::new(10);
        let mut a = budget.reserve();
        let mut b = budget.reserve();
        assert!(a.take(6));
        assert!(!b.take(5), "past the budget");
        assert_eq!(budget.used(), 6, "a refused reservation takes nothing");
        assert!(b.take(4));
        assert!(!a.take(1));
        drop(a);
        assert_eq!(budget.used(), 4);
        assert!(b.take(6));
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    const B: usize = delta::MIN_BLOCK as usize;

    fn list_of(data: &[u8]) -> BlockList {
        BlockList {
            block_size: delta::block_size(data.len() as u64),
            hashes: data.chunks(B).map(delta::block_hash).collect(),
        }
    }

    fn patched(
        old: &[u8],
        new: &[u8],
        records: &[(u64, Vec<u8>)],
    ) -> Result<BlockList, &'static str> {
        patched_list(&list_of(old), old.len() as u64, new.len() as u64, records)
    }

    #[test]
    fn the_patched_list_is_the_list_of_the_new_file() {
        let old: Vec<u8> = (0..5 * B + 100).map(|i| (i / B) as u8).collect();
        // Blocks 1-2 change, sent as two pieces (as the stream splits them).
        let mut new = old.clone();
        new[B..3 * B].fill(0xee);
        let records = vec![
            (B as u64, new[B..B + B / 2].to_vec()),
            ((B + B / 2) as u64, new[B + B / 2..3 * B].to_vec()),
        ];
        assert_eq!(patched(&old, &new, &records), Ok(list_of(&new)));
        // Grown by a block and a half: the old short last block and what follows are
        // sent.
        let mut grown = old.clone();
        grown.extend(std::iter::repeat_n(9u8, B + B / 2));
        let records = vec![(5 * B as u64, grown[5 * B..].to_vec())];
        assert_eq!(patched(&old, &grown, &records), Ok(list_of(&grown)));
        // Cut inside block 3: its new short version is sent.
        let cut = old[..3 * B + 10].to_vec();
        let records = vec![(3 * B as u64, cut[3 * B..].to_vec())];
        assert_eq!(patched(&old, &cut, &records), Ok(list_of(&cut)));
        // Cut at a block boundary: nothing to send.
        let cut = old[..3 * B].to_vec();
        assert_eq!(patched(&old, &cut, &[]), Ok(list_of(&cut)));
    }

    #[test]
    fn what_an_in_place_update_cannot_vouch_for_is_refused() {
        let old: Vec<u8> = vec![1u8; 4 * B];
        let new = old.clone();
        // A record starting inside a block.
        assert!(patched(&old, &new, &[(10, vec![1; B])]).is_err());
        // A record ending inside a block (not the file's end).
        assert!(patched(&old, &new, &[(0, vec![1; B / 2])]).is_err());
        // Out of order.
        let r = vec![(B as u64, vec![1; B]), (0, vec![1; B])];
        assert!(patched(&old, &new, &r).is_err());
        // Past the end.
        assert!(patched(&old, &new, &[(3 * B as u64, vec![1; 2 * B])]).is_err());
        // Grown, with nothing sent for the new part.
        let grown = vec![1u8; 5 * B];
        assert!(patched(&old, &grown, &[]).is_err());
        // Cut inside a block that is not sent.
        let cut = vec![1u8; 3 * B + 5];
        assert!(patched(&old, &cut, &[]).is_err());
        // An old list that does not fit the old size.
        let short = BlockList {
            block_size: delta::MIN_BLOCK,
            hashes: vec![0],
        };
        assert!(patched_list(&short, old.len() as u64, old.len() as u64, &[]).is_err());
        // Grown far past what its records bring: refused before a list of that size
        // (2^36 hashes here) is allocated.
        let huge_old = 1u64 << 40;
        let big = BlockList {
            block_size: delta::MAX_BLOCK,
            hashes: vec![0; (huge_old / u64::from(delta::MAX_BLOCK)) as usize],
        };
        assert_eq!(delta::block_size(huge_old), delta::MAX_BLOCK);
        assert_eq!(delta::block_size(1 << 62), delta::MAX_BLOCK);
        assert_eq!(
            patched_list(&big, huge_old, 1 << 62, &[(huge_old, vec![1; 10])]),
            Err("bytes past the old end that no record brings")
        );
    }

    #[test]
    fn journal_entries_round_trip_and_torn_ones_are_refused() {
        let entry = Entry {
            path: b"a/b".to_vec(),
            key: (1, 2),
            generation: Some(3),
            size: 10,
            meta: FileMeta {
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime: (5, 6),
                xattrs: vec![(b"user.x".to_vec(), b"y".to_vec())],
            },
            records: vec![(0, vec![1, 2, 3])],
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Journal::new(dir.path().join("j"));
        let written = journal.write(&entry).expect("write");
        let bytes = std::fs::read(&written.0).expect("read");
        assert_eq!(decode(&bytes), Decoded::Whole(entry));
        for cut in [0, 8, bytes.len() / 2, bytes.len() - 1] {
            assert_eq!(decode(&bytes[..cut]), Decoded::Torn, "cut at {cut}");
        }
        let mut flipped = bytes.clone();
        flipped[12] ^= 1;
        assert_eq!(decode(&flipped), Decoded::Torn);
        let mut old = bytes.clone();
        old[..8].copy_from_slice(JOURNAL_MAGIC_01);
        assert_eq!(decode(&old), Decoded::Format01);
        journal.done(written).expect("done");
        assert_eq!(std::fs::read_dir(journal.dir()).expect("list").count(), 0);
    }

    /// A temp directory as a standby's volume, with its applier's root fd.
    struct Vol {
        dir: tempfile::TempDir,
        root: std::os::fd::OwnedFd,
    }

    impl Vol {
        fn new() -> Vol {
            let dir = tempfile::tempdir().expect("tempdir");
            let root = sys::open_dir_path(dir.path()).expect("open root");
            Vol { dir, root }
        }

        fn applier(&self) -> Applier<'_> {
            Applier::new(self.root.as_fd())
        }

        fn path(&self, p: &str) -> PathBuf {
            self.dir.path().join(p)
        }

        /// The (device, inode) and generation of the file `p`.
        fn id(&self, p: &str) -> ((u64, u64), Option<u64>) {
            let f = std::fs::File::open(self.path(p)).expect("open");
            let st = sys::fstat(f.as_fd()).expect("stat");
            ((st.st_dev, st.st_ino), sys::generation(f.as_fd()).ok())
        }

        fn meta(&self, p: &str) -> FileMeta {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(self.path(p)).expect("stat");
            FileMeta {
                mode: 0o640,
                uid: m.uid(),
                gid: m.gid(),
                mtime: (1_700_000_000, 0),
                xattrs: Vec::new(),
            }
        }

        /// A journal entry that writes `data` at the start of `p` as it is now.
        fn entry(&self, p: &str, data: &[u8]) -> Entry {
            let (key, generation) = self.id(p);
            Entry {
                path: p.as_bytes().to_vec(),
                key,
                generation,
                size: std::fs::metadata(self.path(p)).expect("stat").len(),
                meta: self.meta(p),
                records: vec![(0, data.to_vec())],
            }
        }
    }

    /// The journal file format 01 wrote: no inode generation.
    #[derive(Serialize)]
    struct Entry01 {
        path: Vec<u8>,
        key: (u64, u64),
        size: u64,
        meta: FileMeta,
        records: Vec<(u64, Vec<u8>)>,
    }

    #[test]
    fn replay_finishes_only_its_own_file_and_never_fails_on_one_it_cannot_update() {
        let vol = Vol::new();
        let outside = tempfile::tempdir().expect("tempdir");
        for f in ["own", "renumbered", "reused", "old-format", "xattr"] {
            std::fs::write(vol.path(f), b"old bytes").expect("write");
        }
        std::fs::write(outside.path().join("linked"), b"old bytes").expect("write");
        std::fs::create_dir(vol.path("d")).expect("mkdir");
        std::fs::write(vol.path("d/linked"), b"old bytes").expect("write");
        let journal = Journal::new(vol.path("journal"));

        journal.write(&vol.entry("own", b"NEW")).expect("journal");
        // The same file on a device numbered otherwise since (a reboot: btrfs, NVMe).
        let mut renumbered = vol.entry("renumbered", b"NEW");
        renumbered.key.0 ^= 1;
        journal.write(&renumbered).expect("journal");
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode();
            assert_eq!(mode(journal.dir()) & 0o777, 0o700);
            for f in std::fs::read_dir(journal.dir()).expect("list") {
                let f = f.expect("entry").path();
                assert_eq!(mode(&f) & 0o777, 0o600, "{}: file contents", f.display());
            }
        }
        // Another file that got the inode number of the one journaled.
        let mut reused = vol.entry("reused", b"NEW");
        reused.generation = Some(reused.generation.expect("ext4 has generations") ^ 1);
        journal.write(&reused).expect("journal");
        // The parent became a symlink (to a directory outside) since.
        let linked = vol.entry("d/linked", b"NEW");
        std::fs::remove_dir_all(vol.path("d")).expect("rm");
        std::os::unix::fs::symlink(outside.path(), vol.path("d")).expect("symlink");
        journal.write(&linked).expect("journal");
        // An xattr this filesystem cannot store (no such namespace).
        let mut xattr = vol.entry("xattr", b"NEW");
        xattr.meta.xattrs = vec![(b"bogus.name".to_vec(), b"v".to_vec())];
        journal.write(&xattr).expect("journal");
        // Format 01, for the file as it is: its inode cannot be told from a later one.
        let (key, _) = vol.id("old-format");
        let body = postcard::to_allocvec(&Entry01 {
            path: b"old-format".to_vec(),
            key,
            size: 9,
            meta: vol.meta("old-format"),
            records: vec![(0, b"NEW".to_vec())],
        })
        .expect("encode");
        let sum = xxhash_rust::xxh3::xxh3_64(&body).to_le_bytes();
        std::fs::write(
            vol.path("journal/old.journal"),
            [&JOURNAL_MAGIC_01[..], &body, &sum].concat(),
        )
        .expect("write");

        let applied = journal.replay(&vol.applier(), None).expect("replay");
        assert_eq!(applied, 2);
        let read = |p: &Path| std::fs::read(p).expect("read");
        assert_eq!(read(&vol.path("own")), b"NEW bytes");
        assert_eq!(read(&vol.path("renumbered")), b"NEW bytes");
        assert_eq!(read(&vol.path("reused")), b"old bytes");
        assert_eq!(read(&vol.path("old-format")), b"old bytes");
        assert_eq!(read(&outside.path().join("linked")), b"old bytes");
        // Its content was written; only the metadata is left to the next full sync.
        assert_eq!(read(&vol.path("xattr")), b"NEW bytes");
        assert!(journal.is_empty(), "every journal was dealt with");
    }

    /// A journal written by a standby of one epoch is replayed only into a standby of
    /// that epoch: a node that has been active since may have written the file since.
    #[test]
    fn a_journal_is_replayed_only_into_a_standby_of_the_epoch_it_was_written_at() {
        let vol = Vol::new();
        let journal = Journal::new(vol.path("journal"));
        for (now, applied) in [(Some(4), 0), (None, 0), (Some(3), 1)] {
            std::fs::write(vol.path("f"), b"old bytes").expect("write");
            journal
                .write_at(&vol.entry("f", b"NEW"), 3)
                .expect("journal");
            assert_eq!(
                journal.replay(&vol.applier(), now).expect("replay"),
                applied
            );
            let want: &[u8] = if applied == 1 {
                b"NEW bytes"
            } else {
                b"old bytes"
            };
            assert_eq!(std::fs::read(vol.path("f")).expect("read"), want, "{now:?}");
            assert!(journal.is_empty(), "{now:?}: dealt with");
        }
    }

    /// A journal whose file cannot be opened for now (here: no fd left) is kept for
    /// the next start, not dropped: the file may be half written.
    #[test]
    fn a_journal_whose_file_cannot_be_opened_for_now_is_kept() {
        const CHILD: &str = "TWINFS_PATCH_TEST_LOW_NOFILE";
        if std::env::var_os(CHILD).is_none() {
            // In a process of its own: it lowers its limit of open files.
            let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
                .args([
                    "--exact",
                    "patch::tests::a_journal_whose_file_cannot_be_opened_for_now_is_kept",
                    "--test-threads=1",
                ])
                .env(CHILD, "1")
                .output()
                .expect("run the test binary");
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success() && said.contains("1 passed"), "{said}");
            return;
        }
        use std::os::fd::AsRawFd;
        let vol = Vol::new();
        std::fs::write(vol.path("f"), b"old bytes").expect("write");
        let journal = Journal::new(vol.path("journal"));
        journal.write(&vol.entry("f", b"NEW")).expect("journal");
        let limit = |soft: libc::rlim_t, hard: libc::rlim_t| {
            let l = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            // SAFETY: a valid rlimit.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) }, 0);
        };
        let mut was = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a valid out pointer.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut was) }, 0);
        // The lowest free fd: the journal directory's listing takes it, the root's
        // clone the next one, and the file's open finds none left.
        let lowest = std::fs::File::open("/dev/null").expect("open").as_raw_fd();
        limit(lowest as libc::rlim_t + 2, was.rlim_max);
        let replayed = journal.replay(&vol.applier(), None);
        limit(was.rlim_cur, was.rlim_max);
        assert_eq!(replayed.expect("replay"), 0);
        assert!(
            !journal.is_empty(),
            "the journal went with its file not updated"
        );
        assert_eq!(std::fs::read(vol.path("f")).expect("read"), b"old bytes");
        // The next start finishes it.
        assert_eq!(journal.replay(&vol.applier(), None).expect("replay"), 1);
        assert_eq!(std::fs::read(vol.path("f")).expect("read"), b"NEW bytes");
        assert!(journal.is_empty());
    }

    #[test]
    fn a_new_copy_after_a_failed_update_removes_the_journal_only_once_in_place() {
        let vol = Vol::new();
        let old: Vec<u8> = (0..3 * B).map(|i| (i % 251) as u8).collect();
        let mut new = old.clone();
        new[B..2 * B].fill(0xee);
        std::fs::write(vol.path("f"), &old).expect("write");
        let records = vec![(B as u64, new[B..2 * B].to_vec())];
        let mut entry = vol.entry("f", b"");
        entry.records = records.clone();
        let journal = Journal::new(vol.path("journal"));
        let path = RelPath::new("f").expect("path");
        let meta = vol.meta("f");
        let expected = delta::content_hash(&list_of(&new), new.len() as u64);

        // A copy that does not check out (say, the file changed meanwhile) leaves the
        // journal for the next start.
        let written = journal.write(&entry).expect("journal");
        let err = replace_by_copy(
            &vol.applier(),
            &journal,
            written,
            &path,
            new.len() as u64,
            &records,
            expected ^ 1,
            &meta,
        )
        .expect_err("hash mismatch");
        assert!(matches!(err, ApplyError::Content { .. }), "{err:?}");
        assert!(!journal.is_empty());
        std::fs::remove_dir_all(journal.dir()).expect("rm");

        // Half written when the write in place failed.
        let written = journal.write(&entry).expect("journal");
        let half = std::fs::OpenOptions::new()
            .write(true)
            .open(vol.path("f"))
            .expect("open");
        sys::pwrite(half.as_fd(), &new[B..B + B / 2], B as u64).expect("half");
        let list = replace_by_copy(
            &vol.applier(),
            &journal,
            written,
            &path,
            new.len() as u64,
            &records,
            expected,
            &meta,
        )
        .expect("copy");
        assert_eq!(std::fs::read(vol.path("f")).expect("read"), new);
        assert_eq!(list, Some(list_of(&new)));
        assert!(
            journal.is_empty(),
            "the journal went with the copy in place"
        );
    }

    #[test]
    fn the_cache_serves_only_the_same_file_and_stays_bounded() {
        let stamp = FileStamp {
            key: (1, 1),
            changed: Stamp {
                size: 1,
                mtime: (1, 0),
                ctime: (1, 0),
            },
        };
        let path = |s: &str| RelPath::new(s).expect("path");
        let list = |n: usize| {
            Arc::new(BlockList {
                block_size: delta::MIN_BLOCK,
                hashes: vec![7; n],
            })
        };
        let mut cache = BlockCache::default();
        cache.put(&path("a"), stamp, list(3));
        assert_eq!(
            cache.get(&path("a"), &stamp).map(|l| l.hashes.len()),
            Some(3)
        );
        let moved = FileStamp {
            changed: Stamp {
                ctime: (2, 0),
                ..stamp.changed
            },
            ..stamp
        };
        assert!(cache.get(&path("a"), &moved).is_none());
        cache.put(&path("b"), stamp, list(MAX_HASHES - 1));
        assert_eq!(cache.len(), 1, "a was dropped to make room");
        assert!(cache.get(&path("b"), &stamp).is_some());
        cache.forget(&path("b"));
        assert!(cache.is_empty());
        cache.put(&path("c"), stamp, list(MAX_HASHES + 1));
        assert!(cache.is_empty(), "a list over the bound is not kept");
    }
}
