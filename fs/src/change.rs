//! Change records: what the volume tells the replicator about each change made
//! through the mount. The fs crate only reports; the replicator decides what to ship.

use std::path::PathBuf;

/// Which attributes a `setattr` changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttrChange {
    /// Access or modification time (a `touch`, also of an unchanged file).
    pub times: bool,
    /// Permission bits.
    pub mode: bool,
    /// Owner or group.
    pub owner: bool,
    /// Size (truncate).
    pub size: bool,
}

/// What happened to a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// A file opened for writing was closed, or fsync'd; one record per `close()`
    /// however many writes there were, recorded before `close()` returns.
    Write,
    /// Attributes changed.
    Attr(AttrChange),
    /// A regular file was created.
    Create,
    /// A directory was created.
    Mkdir,
    /// A fifo, socket or device node was created.
    Mknod,
    /// A symlink was created.
    Symlink,
    /// A hard link to `existing` was created at the record's path.
    Link {
        /// The path of the existing name of the file.
        existing: PathBuf,
    },
    /// A non-directory was removed.
    Unlink,
    /// A directory was removed.
    Rmdir,
    /// `from` was renamed to the record's path.
    Rename {
        /// The old path.
        from: PathBuf,
        /// The two paths swapped places (`RENAME_EXCHANGE`).
        exchange: bool,
    },
    /// An extended attribute was set or removed.
    Xattr,
}

impl ChangeKind {
    /// A short stable name for logs and counters.
    pub fn name(&self) -> &'static str {
        match self {
            ChangeKind::Write => "write",
            ChangeKind::Attr(_) => "attr",
            ChangeKind::Create => "create",
            ChangeKind::Mkdir => "mkdir",
            ChangeKind::Mknod => "mknod",
            ChangeKind::Symlink => "symlink",
            ChangeKind::Link { .. } => "link",
            ChangeKind::Unlink => "unlink",
            ChangeKind::Rmdir => "rmdir",
            ChangeKind::Rename { .. } => "rename",
            ChangeKind::Xattr => "xattr",
        }
    }
}

/// One change, with the path relative to the volume root (no leading `/`; the root
/// itself is the empty path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Path relative to the volume root, as it is after the change.
    pub path: PathBuf,
    /// What happened.
    pub kind: ChangeKind,
    /// The file the change was made to, when it was made to one file through the
    /// mount (a write, a create, an attribute): whoever reads `path` later and finds
    /// another file there knows that what it reads is not what this record is about
    /// (it was renamed or removed, and something took its name). `None` for a
    /// removal, a rename, a hard link, or a change recorded behind the mount.
    pub file: Option<FileId>,
}

/// The file a [`Change`] was made to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    /// Its backing (device, inode).
    pub key: crate::inode::Key,
    /// A regular file with more than one name when the change was recorded: the
    /// change shows through its other names too, so if the record's name no longer
    /// holds it when it is read, one of those carries the change.
    pub linked: bool,
}

/// Receives the volume's change records. Called on the FUSE request path after the
/// operation succeeded: implementations must be quick and must not block on the network.
pub trait ChangeSink: Send + Sync + 'static {
    /// Takes one change record.
    fn record(&self, change: Change);

    /// Takes one change record, and returns what the writer must still wait for (the
    /// standbys, for a `sync` path) instead of waiting in the call: the volume waits
    /// once the writer's turn is over (see [`crate::turn`]).
    fn record_later(&self, change: Change) -> Option<crate::turn::Wait> {
        self.record(change);
        None
    }
}

/// A sink that drops every record (a volume that is not replicated).
pub struct Discard;

impl ChangeSink for Discard {
    fn record(&self, _change: Change) {}
}
