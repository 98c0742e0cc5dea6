//! The messages two nodes exchange for one volume, encoded with postcard. One volume's
//! session runs on one QUIC stream; the TLS handshake has already proven which node is
//! on the other end, so messages carry no node identity of their own.

use serde::{Deserialize, Serialize};
use twinfs_fs::Role;

use crate::manifest::Entry;
use crate::path::RelPath;

/// Protocol version; a peer with another version is refused at `Hello`. Version 6
/// added [`Op::Link`] and the hard link identity of manifest entries
/// ([`crate::manifest::Meta::link`]), which version 5 cannot decode, and the
/// `unsent` flag of [`Op::Rename`], and [`Message::OnceChanged`].
pub const VERSION: u32 = 6;

/// Most priority-1 paths a full sync names in its start message.
pub const PRIORITY1_LISTED: usize = 10_000;

/// The largest encoded message accepted (a manifest chunk or an inline file).
pub const MAX_MESSAGE: usize = 16 << 20;

/// Most entries in one `Manifest` message.
pub const MANIFEST_CHUNK: usize = 2048;

/// What to do to one path on the standby.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Make `entry.path` exactly `entry` (creating, replacing or re-attributing it).
    /// `content` is the whole file for regular files whose content changed, `None`
    /// when only metadata changed (or for non-files).
    Put {
        /// Path and metadata as on the active.
        entry: Entry,
        /// The file's bytes, when they must travel.
        // Bytes as one block, not a sequence of numbers: the same postcard encoding,
        // far faster to encode and decode.
        #[serde(with = "serde_bytes")]
        content: Option<Vec<u8>>,
    },
    /// Make `entry.path` exactly `entry`, a regular file sent as a block delta on
    /// unidirectional streams of the same connection (see [`crate::delta`]): the
    /// standby answers with the block hashes of its copy, the active sends the blocks
    /// that differ. Large files travel this way, so they never hold up the small
    /// changes behind them; the standby checks the rebuilt file against
    /// `entry.meta.hash` before it puts it in place.
    PutStream {
        /// Path and metadata as on the active.
        entry: Entry,
    },
    /// Rename `from` to `to` (swapping them with `exchange`).
    Rename {
        /// Old path.
        from: RelPath,
        /// New path.
        to: RelPath,
        /// `RENAME_EXCHANGE`.
        exchange: bool,
        /// The active never sent `from` as it is (nor `to`, for an exchange): it was
        /// gone when the active read it for an earlier op of this session (a file
        /// written under a temp name and renamed at once). The standby may lack it or
        /// hold an older version: a missing source moves nothing here (an exchange
        /// with one side missing moves the other over to it), and ops shipping the
        /// new names as they are now follow.
        unsent: bool,
    },
    /// Make `path` another name of the regular file at `existing` (a hard link),
    /// replacing what is at `path` atomically. The file's content and metadata are
    /// `existing`'s: they belong to the file, not to a name.
    Link {
        /// The new name.
        path: RelPath,
        /// A name the file has already.
        existing: RelPath,
    },
    /// Remove `path` (recursively for a directory); missing is fine.
    Delete {
        /// The path.
        path: RelPath,
    },
    /// Nothing to do: `path` vanished on the active before it could be read; a later
    /// op (or a full sync) says what became of it. Keeps the sequence unbroken.
    Skip {
        /// The path.
        path: RelPath,
    },
}

impl Op {
    /// The path the op changes (the new one for a rename).
    pub fn path(&self) -> &RelPath {
        match self {
            Op::Put { entry, .. } | Op::PutStream { entry } => &entry.path,
            Op::Rename { to, .. } => to,
            Op::Link { path, .. } | Op::Delete { path } | Op::Skip { path } => path,
        }
    }
}

/// One message of a volume's session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message on each side: who I am for this volume.
    Hello {
        /// [`VERSION`].
        version: u32,
        /// The volume's name.
        volume: String,
        /// The sender's role for it.
        role: Role,
        /// The sender's epoch for it.
        epoch: u64,
    },
    /// Active → standby: send me your manifest (starts full sync number `sync`).
    RequestManifest {
        /// Numbers full syncs, so parts of an abandoned one are told apart.
        sync: u64,
    },
    /// Standby → active: part of its manifest; `done` on the last part.
    Manifest {
        /// The full sync it answers.
        sync: u64,
        /// Entries, in path order.
        entries: Vec<Entry>,
        /// Last part.
        done: bool,
    },
    /// Active → standby: the ops of full sync `sync` follow, numbered from `base + 1`.
    FullSyncStart {
        /// The full sync.
        sync: u64,
        /// The sequence number before the first op.
        base: u64,
        /// The priority-1 paths among the ops that follow (up to
        /// [`PRIORITY1_LISTED`]): the standby is not fit to take over until they are
        /// applied.
        priority1: Vec<RelPath>,
        /// Priority-1 paths beyond those listed.
        priority1_more: u64,
    },
    /// Active → standby: one op.
    Op {
        /// Sequence number, one more than the previous op's.
        seq: u64,
        /// What to do.
        op: Op,
    },
    /// Active → standby: the full sync is complete once ops up to `seq` are applied.
    FullSyncDone {
        /// The last op of the full sync.
        seq: u64,
    },
    /// Standby → active: every op up to `seq` is durably applied (or rejected).
    Ack {
        /// The last op handled.
        seq: u64,
    },
    /// Standby → active: op `seq` was refused (unsafe path, disk error); still acked.
    Rejected {
        /// The op.
        seq: u64,
        /// Its path.
        path: RelPath,
        /// Why.
        reason: String,
    },
    /// Standby → active: I missed ops; start a full sync.
    Resync,
    /// Either way: I am alive.
    Heartbeat,
    /// Standby → active: hand the active role over to me (`twinfs promote` with the
    /// active reachable). The active refuses local writes, ships what is pending, and
    /// answers [`Message::HandoverReady`] once this standby has acknowledged it all.
    HandoverRequest,
    /// Active → standby: everything is acknowledged and this node is a standby from
    /// now on; take over with an epoch above `epoch`.
    HandoverReady {
        /// The epoch of the active handing over.
        epoch: u64,
    },
    /// Active → standby (`twinfs verify`): hash every file now, not from the cache,
    /// and send the manifest back.
    VerifyRequest {
        /// Tells the answers apart.
        id: u64,
    },
    /// Standby → active: part of the freshly hashed manifest.
    VerifyManifest {
        /// The request answered.
        id: u64,
        /// Entries, in path order.
        entries: Vec<Entry>,
        /// Last part.
        done: bool,
    },
    /// Any node → any node, as the first message of a stream of its own (automatic
    /// failover): tell me how you see your volumes. Answered with
    /// [`Message::ProbeAnswer`], then the stream ends.
    Probe {
        /// The asking node's protocol version.
        version: u32,
        /// The volume the asking node asks this node's vote for, to become its active
        /// (a node grants one candidate per volume at a time).
        vote: Option<String>,
    },
    /// The answer to a [`Message::Probe`].
    ProbeAnswer {
        /// The answering node's name (its `[node] name`).
        node: String,
        /// Its volumes (none on a witness).
        volumes: Vec<VolumeView>,
        /// The vote asked for is granted.
        granted: bool,
    },
    /// Standby → active: a local write of a `direction = "both"` path (see
    /// [`crate::upstream`]). The active applies it if its own version of the path
    /// still has the hash `base`, and ships it on to every standby.
    Upstream {
        /// Numbers the standby's upstream writes, for the answer.
        id: u64,
        /// The content hash of the version the write replaced (for a rename, of the
        /// one it moves); `None` where the standby had no regular file.
        base: Option<u128>,
        /// The write: `Put` (with the whole file for a regular file), `Rename` or
        /// `Delete`.
        op: Op,
    },
    /// Active → standby: upstream write `id` is applied.
    UpstreamApplied {
        /// The write.
        id: u64,
    },
    /// Active → standby: upstream write `id` was refused; the active's version of
    /// `path` stands and is shipped to the standby again.
    UpstreamRefused {
        /// The write.
        id: u64,
        /// The path it changed.
        path: RelPath,
        /// Why.
        reason: String,
    },
    /// Active → standby: priority-1 `path`, whose policy is `once`, changed here and
    /// is not shipped for it: the standby's copy is not in sync (so it is not fit to
    /// take over) until an op numbered `from_seq` or later puts it right (`twinfs
    /// sync PATH`), or a full sync begun after it does.
    OnceChanged {
        /// The path.
        path: RelPath,
        /// The first op that may carry it as it is now.
        from_seq: u64,
    },
}

/// How a node sees one of its volumes, for another node deciding whether to take over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeView {
    /// The volume's name.
    pub volume: String,
    /// The node's role for it.
    pub role: Role,
    /// The highest epoch it has held or followed.
    pub epoch: u64,
    /// Standby: fit to take over (a completed full sync, everything sent applied).
    pub fit: bool,
    /// Standby: it heard from an active of the volume within the failover timeout.
    pub hears_active: bool,
}

/// Errors decoding a message.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Not a valid message (garbage, a path that escapes the volume, an unknown variant).
    #[error("bad message: {0}")]
    Decode(#[from] postcard::Error),
    /// Larger than [`MAX_MESSAGE`].
    #[error("message of {0} bytes is over the limit of {MAX_MESSAGE}")]
    TooLarge(usize),
}

impl Message {
    /// Encodes for the wire.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        let bytes = postcard::to_allocvec(self)?;
        if bytes.len() > MAX_MESSAGE {
            return Err(ProtocolError::TooLarge(bytes.len()));
        }
        Ok(bytes)
    }

    /// Decodes one message; paths in it are validated ([`RelPath`]).
    pub fn decode(bytes: &[u8]) -> Result<Message, ProtocolError> {
        if bytes.len() > MAX_MESSAGE {
            return Err(ProtocolError::TooLarge(bytes.len()));
        }
        Ok(postcard::from_bytes(bytes)?)
    }
}
