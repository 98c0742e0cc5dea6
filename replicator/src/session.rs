//! The replication session of one volume between an active node and one standby, as a
//! state machine with no sockets and no clock: it takes messages, change records, local
//! manifests and the time as inputs, and returns [`Output`]s for a driver to carry out
//! (send a message, scan the volume, read a file and ship it, apply an op).
//!
//! Active side: hello → ask for the standby's manifest and scan its own → send the
//! difference (priority 1 first, then the rest, then deletions) → stream changes by
//! policy. Standby side: hello → send its manifest → apply ops in sequence, acking each;
//! a gap in the sequence (lost or reordered messages) asks for a new full sync, so the
//! two sides converge whatever the network did.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::time::{Duration, Instant};

use twinfs_fs::{ChangeKind, FileId, Role};

use crate::capture::Record;
use crate::manifest::{self, Manifest};
use crate::path::RelPath;
use crate::policy::{PolicySet, Priority, SyncMode};
use crate::protocol::{Message, Op, MANIFEST_CHUNK, MAX_MESSAGE, PRIORITY1_LISTED, VERSION};

/// Most bytes of priority-1 paths a full sync names in its start message.
const PRIORITY1_BYTES: usize = MAX_MESSAGE / 4;

/// Settings of a session.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// The volume's name.
    pub volume: String,
    /// This node's role for it.
    pub role: Role,
    /// This node's epoch for it.
    pub epoch: u64,
    /// The volume's rules.
    pub policies: PolicySet,
    /// Send a heartbeat after this much silence.
    pub heartbeat: Duration,
    /// Give up on a peer silent for this long.
    pub peer_timeout: Duration,
    /// Active: start over with a full sync when a full sync or sent ops make no
    /// progress for this long (a message went missing).
    pub stall_timeout: Duration,
    /// Ops sent but not yet acked before further ops wait in the queue.
    pub max_in_flight: u64,
    /// Changes queued before the session gives up on them and resyncs by manifest.
    pub max_queue: usize,
    /// Two actives of the same epoch meet: whether this node stays active (the one
    /// whose node ID is lower does; both sides compute the same answer).
    pub wins_ties: bool,
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Send this message to the peer.
    Send(Message),
    /// Scan the local volume (without `never` paths) and call
    /// [`Session::local_manifest`].
    ScanLocal,
    /// Active: read a file now and send it as an op (see [`Ship`]).
    Ship(Ship),
    /// Standby: apply `op`, then call [`Session::applied`] with `seq`.
    Apply {
        /// The op's sequence number.
        seq: u64,
        /// The op.
        op: Op,
    },
    /// Standby: the full sync is complete; everything the active had at its start is
    /// here.
    InSync,
    /// This node must stop being active: the peer is an active of a later epoch (or
    /// of the same epoch and wins the tie), or a standby that followed a later active.
    /// Demote, keeping what this node wrote on its own (split brain), then follow.
    /// A [`Output::Close`] comes with it.
    Fenced {
        /// The epoch that fenced this node.
        epoch: u64,
    },
    /// Standby: the active's epoch is newer than this node's; persist it before
    /// applying anything (a later promotion must go above it).
    Follow {
        /// The active's epoch.
        epoch: u64,
    },
    /// Close the connection; the reason is for the log.
    Close(String),
}

/// Active: read `path` now and send it as op `seq`: `Op::Put` with its current
/// metadata, and its bytes if `content` or if its hash now differs from
/// `standby_hash`. If it no longer exists: `Op::Delete` when `delete_if_missing`, else
/// `Op::Skip` (the change that removed it is queued behind, and deleting now could
/// undo a rename it is part of). Then call [`Session::shipped`] with what it found.
///
/// A full sync queues one per differing path (100,000s at once), so it is kept
/// small: 56 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ship {
    /// The op's sequence number.
    pub seq: u64,
    /// The path.
    pub path: RelPath,
    /// Whether the file's bytes must travel.
    pub content: bool,
    /// The hash of the standby's copy when the full sync compared them: the file may
    /// have changed since, so equal hashes are checked again at read time. Boxed: rare
    /// (a changed file the standby has), and an inline `u128` would make each ship 80
    /// bytes.
    pub standby_hash: Option<Box<u128>>,
    /// A missing path is a deletion to ship (interval paths, whose deletions are not
    /// shipped on their own).
    pub delete_if_missing: bool,
    /// A full sync found it a further name of a hard-linked file ([`Transfer::link`]):
    /// if it still is one, ship `Op::Link` to its first name, not its content.
    ///
    /// [`Transfer::link`]: crate::manifest::Transfer::link
    pub link: bool,
    /// The file the change record was about ([`Change::file`]): another file found at
    /// `path` means that one was renamed or removed and something took its name; what
    /// is there is not sent as it, but as gone (the op saying what became of it
    /// follows). Boxed, like `standby_hash`: a full sync's ships have none.
    ///
    /// [`Change::file`]: twinfs_fs::Change::file
    pub file: Option<Box<FileId>>,
    /// A directory's metadata: anything else found at `path` took the name since (a
    /// rename or an exchange behind it says so), and is not sent as it but as gone.
    pub dir: bool,
    /// Sent whole in place of a hard link or a rename that could not go as one: if it
    /// is one of several names of a file when read, the standby gets a file of its own
    /// there, and only a manifest comparison makes it a name of the others.
    pub copy: bool,
}

/// What the driver found when it read a [`Ship`], for [`Session::shipped`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shipped {
    /// Sent as it is now, with `bytes` of file content.
    Sent {
        /// Bytes of file content the op carries (or its blocks' stream).
        bytes: u64,
    },
    /// It no longer existed: sent as `Op::Skip` (`Op::Delete` with
    /// `delete_if_missing`).
    Gone,
    /// Sent as `Op::Skip` for now: it is being written, or changed while it was read
    /// (its writer's close ships it), or it is too large to send.
    Held,
}

/// An output waiting for the driver: ships inline (see [`Ship`]), anything else
/// boxed.
enum Queued {
    Ship(Ship),
    Other(Box<Output>),
}

impl Queued {
    fn of(output: Output) -> Queued {
        match output {
            Output::Ship(ship) => Queued::Ship(ship),
            other => Queued::Other(Box::new(other)),
        }
    }

    fn into_output(self) -> Output {
        match self {
            Queued::Ship(ship) => Output::Ship(ship),
            Queued::Other(output) => *output,
        }
    }
}

/// Where the session is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the peer's hello.
    Hello,
    /// Exchanging manifests and sending the difference.
    FullSync,
    /// Following changes as they happen.
    Streaming,
    /// Closed.
    Closed,
}

/// One queued change of the active side.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pending {
    Ship {
        path: RelPath,
        content: bool,
        delete_if_missing: bool,
        file: Option<FileId>,
        /// See [`Ship::dir`].
        dir: bool,
    },
    Send(Op),
}

/// Counters for status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Ops sent (active) or applied (standby).
    pub ops: u64,
    /// Highest op acked by the standby (active) or applied (standby).
    pub acked: u64,
    /// Ops of the current or last full sync.
    pub full_sync_ops: u64,
    /// How many of them are acked (active) or applied (standby).
    pub full_sync_ops_done: u64,
    /// Active: bytes of file content the current or last full sync sends.
    pub full_sync_bytes: u64,
    /// Active: how many of them the standby has acked.
    pub full_sync_bytes_done: u64,
    /// Active: bytes of file content sent and not yet acked.
    pub unacked_bytes: u64,
    /// Full syncs started.
    pub full_syncs: u64,
    /// Full syncs completed: every op acknowledged (active), or applied without a
    /// refusal (standby; one with refusals leaves it not in sync and asks for another).
    pub full_syncs_done: u64,
    /// Ops the standby refused.
    pub rejected: u64,
    /// Changes waiting to be sent.
    pub queued: usize,
}

/// The session of one volume with one peer.
pub struct Session {
    config: SessionConfig,
    phase: Phase,
    out: VecDeque<Queued>,
    started: Instant,
    last_sent: Instant,
    last_received: Instant,
    stats: SessionStats,
    // Active side.
    sync_id: u64,
    /// Standby: the number of the last full sync that completed with nothing refused
    /// (0: none yet in this session).
    clean_sync: u64,
    progress_at: Instant,
    next_seq: u64,
    /// Active: the standby's manifest entries that came before our own scan did.
    theirs: Vec<manifest::Entry>,
    /// Active: our manifest, compared with the standby's as its entries come.
    differ: Option<manifest::Differ>,
    theirs_done: bool,
    full_sync_end: Option<u64>,
    /// The sequence number before the first op of the current full sync.
    full_sync_base: u64,
    /// Active: the standby refused an op (the last refusal that counts: its sequence
    /// number, path, reason): it lacks what it refused, so it is not caught up until a
    /// full sync completes with nothing refused, that is one whose comparison came
    /// after this op. Refusals of ops before the comparison of the current full sync
    /// count no more: they came ahead of the standby's manifest, which shows what
    /// they left.
    refused: Option<(u64, RelPath, String)>,
    /// Content bytes of ops sent and not yet acked, by sequence number.
    unacked: VecDeque<(u64, u64)>,
    queue: VecDeque<Pending>,
    queued_ships: HashSet<RelPath>,
    /// Renames and deletions in the queue: a ship queued before one must not absorb a
    /// ship of the same path queued after it.
    queued_ops: usize,
    dirty: BTreeMap<RelPath, Instant>,
    /// Active: `once` paths changed since the last full sync began, not shipped for
    /// it; a planned handover ships them (the new active must not lack them).
    once_changed: BTreeSet<RelPath>,
    resync_wanted: bool,
    /// Active: names that arrived on the standby by a rename across policies, whose
    /// entries below come only with the next manifest comparison: a rename of what
    /// lies below one goes as one that may find nothing to move (its new name shipped
    /// after it), a hard link to it as a copy.
    awaiting_comparison: BTreeSet<RelPath>,
    /// Active: a change to a path longer than `PATH_MAX` was logged as not replicated
    /// (once per session; the next ones at debug level).
    warned_too_long: bool,
    /// Active: [`Output::Ship`]s handed out (or waiting in `out`) and not yet reported
    /// by [`Session::shipped`]. A rename waits in the queue until there are none, so
    /// it goes out knowing whether its source went out as gone.
    ships_unread: u64,
    /// Active: deletions sent while ships were unread, with their sequence numbers: a
    /// ship before one that finds its path gone needs no op after it to say so.
    deleted_unread: Vec<(u64, RelPath)>,
    /// Active: paths whose last ship did not carry what was there before the changes
    /// queued behind it: it found them gone, or a rename queued behind had moved them
    /// away already (what it read is what took the name since), or it held them back
    /// (being written: the writer's close ships them). The standby may lack them or
    /// hold another version; the op saying what became of them (a deletion, a rename
    /// of them or of a directory above them, their writer's close) is queued behind. A
    /// rename of one goes out `unsent`, followed by ships of the new names.
    ///
    /// Each with whether its last ship was held back (being written, or changed while
    /// it was read): the standby may then hold an older version of it, which a hard
    /// link to it can take (the writer's close ships the new one to every name), or
    /// nothing.
    unsent: BTreeMap<RelPath, bool>,
    /// Active: the names that renames waiting in the queue move away or replace (the
    /// source and the target), each with how many.
    renaming: std::collections::HashMap<RelPath, u32>,
    /// Active: the names that deletions waiting in the queue remove, each with how
    /// many.
    deleting: std::collections::HashMap<RelPath, u32>,
    /// Active: names made new (a create, or the new names of a rename that went
    /// `unsent` and ships them anew) that no ship has carried yet: the standby may
    /// have no version of them. One held back (its writer still has it open) then
    /// counts as gone, not as held: a hard link to it goes as a copy, which the
    /// standby can take, rather than as a link it would refuse.
    created: BTreeSet<RelPath>,
    // Standby side.
    expected: u64,
    /// Every op up to here is applied; ops applied ahead of a slower one (a large
    /// file) wait in `applied_ahead` for the ack.
    applied_upto: u64,
    applied_ahead: std::collections::BTreeSet<u64>,
    lost: bool,
    /// Priority-1 paths of the full sync not applied yet, or refused since, each with
    /// the last op received for it (0: the full sync's list): an op applied late
    /// settles only what it was the last op for.
    priority1_pending: BTreeMap<RelPath, u64>,
    /// Standby: ops received and not applied yet that bring nothing of the path they
    /// name (a skip) or act on more paths than it (a deletion, a rename), by sequence
    /// number: their application settles other priority-1 paths than `op.path()`.
    wide_ops: BTreeMap<u64, Wide>,
    priority1_more: u64,
    /// Standby: priority-1 `once` paths the active changed after sending them, with
    /// the first op that may bring them as they are now ([`Message::OnceChanged`]).
    once_stale: std::collections::BTreeMap<RelPath, u64>,
    in_sync_at: Option<u64>,
    in_sync: bool,
    /// An op of the current full sync was refused: it does not bring this node in sync.
    refused_in_full_sync: bool,
    /// A full sync with refusals was followed by a Resync already; the next one with
    /// refusals is not (a refusal that stays would otherwise loop).
    resynced_for_refusals: bool,
    /// Streamed changes refused (not ops of a full sync): this node is not in sync
    /// until a full sync that started after them completes without refusals.
    unrepaired: u64,
    /// How many of `unrepaired` the full sync under way repairs (those refused before
    /// it started).
    repairing: u64,
    // Both sides: the last paths refused, with why.
    rejected: VecDeque<(RelPath, String)>,
}

/// How many refused paths a session remembers for status.
const REJECTED_KEPT: usize = 16;

impl Session {
    /// A new session, started at `now`: the hello is the first output.
    pub fn new(config: SessionConfig, now: Instant) -> Session {
        let mut s = Session {
            phase: Phase::Hello,
            out: VecDeque::new(),
            started: now,
            last_sent: now,
            last_received: now,
            stats: SessionStats::default(),
            sync_id: 0,
            clean_sync: 0,
            progress_at: now,
            next_seq: 1,
            theirs: Vec::new(),
            differ: None,
            theirs_done: false,
            full_sync_end: None,
            full_sync_base: 0,
            refused: None,
            unacked: VecDeque::new(),
            queue: VecDeque::new(),
            queued_ships: HashSet::new(),
            queued_ops: 0,
            dirty: BTreeMap::new(),
            once_changed: BTreeSet::new(),
            resync_wanted: false,
            warned_too_long: false,
            awaiting_comparison: BTreeSet::new(),
            ships_unread: 0,
            deleted_unread: Vec::new(),
            unsent: BTreeMap::new(),
            renaming: Default::default(),
            deleting: Default::default(),
            created: BTreeSet::new(),
            expected: 1,
            applied_upto: 0,
            applied_ahead: std::collections::BTreeSet::new(),
            lost: false,
            priority1_pending: Default::default(),
            wide_ops: BTreeMap::new(),
            priority1_more: 0,
            once_stale: Default::default(),
            in_sync_at: None,
            in_sync: false,
            refused_in_full_sync: false,
            resynced_for_refusals: false,
            unrepaired: 0,
            repairing: 0,
            rejected: VecDeque::new(),
            config,
        };
        let hello = Message::Hello {
            version: VERSION,
            volume: s.config.volume.clone(),
            role: s.config.role,
            epoch: s.config.epoch,
        };
        s.send(hello, now);
        s
    }

    /// Whether the next output is an [`Output::Ship`] (the driver reads several
    /// files at once when they come in a row).
    pub fn next_is_ship(&self) -> bool {
        matches!(self.out.front(), Some(Queued::Ship(_)))
    }

    /// The next thing for the driver to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front().map(Queued::into_output)
    }

    /// The first message to send or close waiting among the outputs, taken ahead of
    /// the rest: a standby whose next output waits for a large file's apply goes on
    /// sending its heartbeats and acks meanwhile (what it sends never depends on an
    /// apply still to come: an ack covers only ops applied already).
    pub fn poll_message(&mut self) -> Option<Output> {
        let at = self.out.iter().position(
            |q| matches!(q, Queued::Other(o) if matches!(**o, Output::Send(_) | Output::Close(_))),
        )?;
        self.out.remove(at).map(Queued::into_output)
    }

    /// How many outputs wait for the driver.
    pub fn outputs_waiting(&self) -> usize {
        self.out.len()
    }

    /// Messages from the peer are here that the driver holds back (its outputs are
    /// backed up behind one that waits for a large file's apply): the peer is alive,
    /// though the session has not seen them yet.
    pub fn peer_heard(&mut self, now: Instant) {
        if self.phase != Phase::Closed {
            self.last_received = self.last_received.max(now);
        }
    }

    fn queue(&mut self, output: Output) {
        if matches!(output, Output::Ship(_)) {
            self.ships_unread += 1;
        }
        self.out.push_back(Queued::of(output));
    }

    /// Where the session is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Counters.
    pub fn stats(&self) -> SessionStats {
        let done = match (self.is_active(), self.full_sync_end) {
            (true, Some(end)) => self
                .stats
                .acked
                .min(end)
                .saturating_sub(self.full_sync_base),
            (true, None) => 0,
            (false, _) if self.phase == Phase::Streaming => self.stats.full_sync_ops,
            (false, _) => self.stats.acked.saturating_sub(self.full_sync_base),
        };
        SessionStats {
            queued: self.queue.len() + self.dirty.len(),
            full_sync_ops_done: done,
            unacked_bytes: self.unacked.iter().map(|(_, b)| b).sum(),
            ..self.stats
        }
    }

    /// Active: the driver read the path of ship `seq` and sent its op; `outcome` says
    /// what it found. Content bytes count as pending until the standby acks them. A
    /// path found gone, held back, or read after a rename queued behind had moved it
    /// away, is remembered until the op that says what became of it (see
    /// [`Session::vanished_paths`]); one sent as it is, forgotten. Every ship must be
    /// reported, in order: a rename waits for the ships before it.
    pub fn shipped(&mut self, seq: u64, path: &RelPath, outcome: Shipped, now: Instant) {
        self.ships_unread = self.ships_unread.saturating_sub(1);
        // A deletion sent after it has told the standby what became of it.
        let told = !self.deleted_unread.is_empty()
            && at_or_above(path, |p| {
                self.deleted_unread
                    .iter()
                    .any(|(deleted, d)| *deleted > seq && d == p)
            });
        let gone = match outcome {
            Shipped::Sent { bytes } => {
                if bytes > 0 && seq > self.stats.acked && seq >= self.full_sync_base {
                    self.unacked.push_back((seq, bytes));
                }
                // A rename of it (or of a directory above it) is queued: it happened
                // before this read, which found whatever took the name since.
                self.moved_away(path)
            }
            Shipped::Gone => !told,
            // Held back until its writer's close ships it: the standby may lack it, or
            // hold an older version, until then. A rename must not take it for there.
            Shipped::Held => !told,
        };
        // Ships are reported in order: no later one comes before these deletions.
        self.deleted_unread.retain(|(deleted, _)| *deleted > seq);
        // A deletion made since, still queued, has dropped what this read was about
        // from `created` (a hard-linked file's read is not superseded by it): a name
        // made again since is new, and what the read found tells nothing of it.
        let deleted_since =
            !self.deleting.is_empty() && at_or_above(path, |p| self.deleting.contains_key(p));
        match (gone, outcome) {
            (false, Shipped::Sent { .. }) => {
                self.unsent.remove(path);
                if !deleted_since {
                    self.created.remove(path);
                }
            }
            (false, _) => {}
            (true, _) => {
                let held =
                    outcome == Shipped::Held && !self.created.contains(path) && !deleted_since;
                self.note_unsent(path.clone(), held)
            }
        }
        if self.phase != Phase::Closed {
            self.drain(now);
        }
    }

    /// `path` is a name the standby may have no version of until a ship carries it
    /// ([`Session::created`]).
    fn note_created(&mut self, path: RelPath) {
        if self.created.len() >= self.config.max_queue {
            // Forgotten: a link to one held back is sent as a link again (and
            // refused by a standby that has no version of it yet).
            self.created.clear();
        }
        self.created.insert(path);
    }

    /// `path` went unsent ([`Session::vanished_paths`]); `held`: held back, the
    /// standby keeps an older version, rather than found gone.
    fn note_unsent(&mut self, path: RelPath, held: bool) {
        if self.unsent.len() >= self.config.max_queue {
            // Too many to follow one by one: a manifest comparison sorts it out.
            self.unsent.clear();
            self.resync_wanted = true;
        } else {
            self.unsent.insert(path, held);
        }
    }

    /// Active: whether a rename waiting in the queue moves or replaces `path` or a
    /// directory above it (a ship of it read now finds what came there since, if
    /// anything).
    pub fn moved_away(&self, path: &RelPath) -> bool {
        !self.renaming.is_empty() && at_or_above(path, |p| self.renaming.contains_key(p))
    }

    /// Active: whether a ship of `path` must go as gone, whatever a read of it finds
    /// now: a rename waiting in the queue moves or replaces it or a directory above it
    /// ([`Session::moved_away`]), or a deletion waiting there removes it or a
    /// directory above it. Either way what a read finds there now, if anything, came
    /// later (the directory removed by `rm -r` and made again as a file, say); sent
    /// ahead of the ops queued between, it would be what they find on the standby (a
    /// hard link into the old directory would find a file). The queued op says what
    /// became of what the ship was about, and the newcomer's own change ships it.
    ///
    /// A deletion does not count for a change to a hard-linked file (`linked`): its
    /// inode cannot have been reused while it had other names, so what a read finds
    /// is told apart by its inode, and the file's other names on the standby need the
    /// change (a read that finds the name gone starts a manifest comparison).
    pub fn superseded(&self, path: &RelPath, linked: bool) -> bool {
        self.moved_away(path)
            || (!linked
                && !self.deleting.is_empty()
                && at_or_above(path, |p| self.deleting.contains_key(p)))
    }

    /// Active: [`Session::superseded`] for the ship `seq` read by the driver, or a
    /// deletion sent after it (while it was being read) removes `path` or a directory
    /// above it.
    pub fn ship_superseded(&self, seq: u64, path: &RelPath, linked: bool) -> bool {
        self.superseded(path, linked)
            || (!linked
                && !self.deleted_unread.is_empty()
                && at_or_above(path, |p| {
                    self.deleted_unread
                        .iter()
                        .any(|(deleted, d)| *deleted > seq && d == p)
                }))
    }

    /// Active: the paths whose last ship did not carry what a later op moves or
    /// removes, and whose fate no op has told the standby yet, in path order.
    pub fn vanished_paths(&self) -> impl Iterator<Item = &RelPath> {
        self.unsent.keys()
    }

    /// Active: bytes moved on the streams of a large file this session sends (its
    /// blocks going out, the standby's block list coming in). Acks are cumulative, so
    /// none comes while a large file travels, for as long as it takes: this is the
    /// progress that keeps such a transfer from being taken for a stall.
    pub fn stream_progress(&mut self, now: Instant) {
        if self.watching_for_stall() {
            self.progress_at = now;
        }
    }

    /// Standby: whether a full sync completed and everything sent since is applied
    /// (none of it refused).
    pub fn in_sync(&self) -> bool {
        self.in_sync && !self.lost && self.unrepaired == 0
    }

    /// Standby: streamed changes refused since the last full sync that repaired them.
    /// This node is neither in sync nor fit until one does (the active starts it on
    /// hearing of the refusal).
    pub fn unrepaired(&self) -> u64 {
        self.unrepaired
    }

    /// Standby: the number of the full sync under way or last done (its active's
    /// `RequestManifest`); 0 before the first.
    pub fn sync_id(&self) -> u64 {
        self.sync_id
    }

    /// Standby: the number of the last full sync that completed with nothing refused;
    /// 0 if none has in this session.
    pub fn clean_sync(&self) -> u64 {
        self.clean_sync
    }

    /// Active: every change handed to the session so far is applied on the standby
    /// (settled, and no refusal that a full sync has not repaired: see
    /// [`refused`](Self::refused)).
    pub fn caught_up(&self) -> bool {
        self.settled() && self.refused.is_none()
    }

    /// Active: the standby refused a change, and no full sync has completed with
    /// nothing refused since (it lacks that change until one does).
    pub fn refused(&self) -> bool {
        self.refused.is_some()
    }

    /// Active: the change (path, reason) whose refusal makes [`refused`](Self::refused).
    pub fn refusal(&self) -> Option<(&RelPath, &str)> {
        self.refused
            .as_ref()
            .map(|(_, path, why)| (path, why.as_str()))
    }

    /// Active: every change handed to the session so far is answered by the standby,
    /// applied or refused (streaming, nothing queued or in flight, no full sync
    /// wanted). Settled but not [`caught_up`](Self::caught_up): the standby refused
    /// something and waits for a full sync to repair it.
    pub fn settled(&self) -> bool {
        self.is_active()
            && self.phase == Phase::Streaming
            && self.queue.is_empty()
            && self.in_flight() == 0
            && !self.resync_wanted
    }

    /// Gives back the room its queues grew to during a full sync, once they are
    /// empty (a full sync of 100,000 files leaves queues sized for all of them).
    pub fn compact(&mut self) {
        if self.queue.is_empty() {
            self.queue.shrink_to_fit();
            self.queued_ships.shrink_to_fit();
        }
        if self.unacked.is_empty() {
            self.unacked.shrink_to_fit();
        }
        if self.out.is_empty() {
            self.out.shrink_to_fit();
        }
    }

    fn remember_rejected(&mut self, path: RelPath, reason: String) {
        if self.rejected.len() == REJECTED_KEPT {
            self.rejected.pop_front();
        }
        self.rejected.push_back((path, reason));
    }

    /// The last paths the standby refused (up to 16), with the reason, oldest first.
    pub fn rejected_paths(&self) -> impl Iterator<Item = &(RelPath, String)> {
        self.rejected.iter()
    }

    /// Standby: whether a full sync is complete and every priority-1 path it or a
    /// later change sent is applied (as of the last message from the active).
    pub fn fit(&self) -> bool {
        self.in_sync()
            && self.phase == Phase::Streaming
            && self.priority1_pending.is_empty()
            && self.priority1_more == 0
            && self.once_stale.is_empty()
    }

    /// Standby: priority-1 paths sent (or about to be, in this full sync) and not
    /// applied; and how many more the active did not name.
    pub fn priority1_pending(&self) -> (Vec<RelPath>, u64) {
        let mut paths: BTreeSet<RelPath> = self.priority1_pending.keys().cloned().collect();
        paths.extend(self.once_stale.keys().cloned());
        (paths.into_iter().collect(), self.priority1_more)
    }

    /// Standby: how many priority-1 paths are pending (named ones).
    pub fn priority1_pending_len(&self) -> usize {
        self.priority1_pending.len() + self.once_stale.len()
    }

    /// This node's role in the session.
    pub fn role(&self) -> Role {
        self.config.role
    }

    /// The last op sequence number handed out (active).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    fn send(&mut self, message: Message, now: Instant) {
        self.last_sent = now;
        self.queue(Output::Send(message));
    }

    fn close(&mut self, reason: String) {
        if self.phase != Phase::Closed {
            self.phase = Phase::Closed;
            self.queue(Output::Close(reason));
        }
    }

    fn is_active(&self) -> bool {
        self.config.role == Role::Active
    }

    /// Whether the driver may carry out `message` (one it handles beside the session:
    /// a handover, a verify, an upstream write or its answer): only once the peer's
    /// hello is taken, and only what the peer's role may send. Anything else is
    /// dropped, so a peer cannot ask for a handover before saying who it is.
    pub fn driver_may_act(&self, message: &Message) -> bool {
        if matches!(self.phase, Phase::Hello | Phase::Closed) {
            return false;
        }
        match message {
            Message::HandoverRequest
            | Message::VerifyManifest { .. }
            | Message::Upstream { .. } => self.is_active(),
            Message::HandoverReady { .. }
            | Message::VerifyRequest { .. }
            | Message::UpstreamApplied { .. }
            | Message::UpstreamRefused { .. } => !self.is_active(),
            _ => false,
        }
    }

    /// A message from the peer.
    pub fn on_message(&mut self, message: Message, now: Instant) {
        if self.phase == Phase::Closed {
            return;
        }
        self.last_received = now;
        match message {
            Message::Hello {
                version,
                volume,
                role,
                epoch,
            } => self.on_hello(version, &volume, role, epoch, now),
            // Carried out by the driver (they change roles); alive all the same.
            Message::Heartbeat
            | Message::HandoverRequest
            | Message::HandoverReady { .. }
            | Message::VerifyRequest { .. }
            | Message::VerifyManifest { .. }
            | Message::Upstream { .. }
            | Message::UpstreamApplied { .. }
            | Message::UpstreamRefused { .. } => {}
            _ if self.phase == Phase::Hello => {
                self.close("message before hello".into());
            }
            m if self.is_active() => self.active_message(m, now),
            m => self.standby_message(m, now),
        }
    }

    fn on_hello(&mut self, version: u32, volume: &str, role: Role, epoch: u64, now: Instant) {
        if self.phase != Phase::Hello {
            // A repeated hello (the network duplicated it) changes nothing.
            return;
        }
        if version != VERSION {
            return self.close(format!(
                "peer speaks protocol {version}, we speak {VERSION}"
            ));
        }
        if volume != self.config.volume {
            return self.close(format!(
                "peer offers volume {volume:?}, expected {:?}",
                self.config.volume
            ));
        }
        let ours = self.config.epoch;
        match (self.config.role, role) {
            (Role::Standby, Role::Standby) => {
                return self.close(format!("peer is a standby too for volume {volume}"));
            }
            (Role::Standby, Role::Active) if epoch < ours => {
                // The active sees our hello and finds itself fenced.
                return self.close(format!(
                    "active's epoch {epoch} is older than ours ({ours}): not following it"
                ));
            }
            (Role::Standby, Role::Active) if epoch > ours => {
                self.queue(Output::Follow { epoch });
                self.config.epoch = epoch;
            }
            (Role::Active, Role::Active)
                if epoch > ours || (epoch == ours && !self.config.wins_ties) =>
            {
                self.queue(Output::Fenced { epoch });
                return self.close(format!(
                    "peer is active for volume {volume} with epoch {epoch} (ours {ours}): it wins"
                ));
            }
            (Role::Active, Role::Active) => {
                // The peer sees our hello and steps down.
                return self.close(format!(
                    "peer is active for volume {volume} with epoch {epoch} (ours {ours}): we win"
                ));
            }
            (Role::Active, Role::Standby) if epoch > ours => {
                self.queue(Output::Fenced { epoch });
                return self.close(format!(
                    "standby has followed epoch {epoch}, newer than ours ({ours}): this active is stale"
                ));
            }
            _ => {}
        }
        self.phase = Phase::FullSync;
        if self.is_active() {
            self.start_full_sync(now);
        }
    }

    fn start_full_sync(&mut self, now: Instant) {
        self.phase = Phase::FullSync;
        self.stats.full_syncs += 1;
        self.theirs = Vec::new();
        self.differ = None;
        self.theirs_done = false;
        self.full_sync_end = None;
        self.full_sync_base = self.next_seq - 1;
        self.stats.full_sync_ops = 0;
        self.stats.full_sync_bytes = 0;
        self.stats.full_sync_bytes_done = 0;
        self.unacked.clear();
        // The full sync covers every change made so far; what happens from here on is
        // queued and shipped after it.
        self.queue.clear();
        self.queued_ships.clear();
        self.queued_ops = 0;
        self.renaming.clear();
        self.deleting.clear();
        self.created.clear();
        self.dirty.clear();
        self.once_changed.clear();
        self.unsent.clear();
        self.resync_wanted = false;
        // Its scan comes after them; renames queued before its comparison are flagged
        // there.
        self.awaiting_comparison.clear();
        self.sync_id += 1;
        self.progress_at = now;
        self.send(Message::RequestManifest { sync: self.sync_id }, now);
        self.queue(Output::ScanLocal);
    }

    /// The local volume's manifest, after [`Output::ScanLocal`].
    pub fn local_manifest(&mut self, manifest: Manifest, now: Instant) {
        if self.phase != Phase::FullSync {
            return;
        }
        if self.is_active() {
            // The wait for the standby's manifest counts from the end of this node's
            // own scan (minutes on a large volume, during which the driver took no
            // messages): the standby's parts waiting meanwhile are not a stall.
            self.progress_at = now;
            let mut differ = manifest::Differ::new(manifest);
            for entry in std::mem::take(&mut self.theirs) {
                if let Err(e) = differ.feed(entry) {
                    return self.close(e.to_string());
                }
            }
            self.differ = Some(differ);
            self.try_diff(now);
        } else {
            let sync = self.sync_id;
            for (entries, done) in manifest.into_parts(MANIFEST_CHUNK) {
                self.send(
                    Message::Manifest {
                        sync,
                        entries,
                        done,
                    },
                    now,
                );
            }
        }
    }

    fn active_message(&mut self, message: Message, now: Instant) {
        match message {
            Message::Manifest {
                sync,
                entries,
                done,
            } => {
                // Parts of an abandoned full sync, or repeated ones, are dropped.
                if sync != self.sync_id || self.theirs_done || self.phase != Phase::FullSync {
                    return;
                }
                self.progress_at = now;
                for entry in entries {
                    // The standby's `never` paths are its own business: never deleted.
                    if self.config.policies.resolve(entry.path.as_path()).sync == SyncMode::Never {
                        continue;
                    }
                    match self.differ.as_mut() {
                        // Compared as it comes: the standby's manifest is never held.
                        Some(differ) => {
                            if let Err(e) = differ.feed(entry) {
                                return self.close(e.to_string());
                            }
                        }
                        None => self.theirs.push(entry),
                    }
                }
                self.theirs_done = done;
                self.try_diff(now);
            }
            Message::Ack { seq } => {
                if seq >= self.next_seq {
                    return self.close(format!("ack of op {seq} that was never sent"));
                }
                if seq > self.stats.acked {
                    self.progress_at = now;
                }
                self.stats.acked = self.stats.acked.max(seq);
                while let Some(&(s, bytes)) = self.unacked.front() {
                    if s > self.stats.acked {
                        break;
                    }
                    self.unacked.pop_front();
                    if self.full_sync_end.is_some_and(|end| s <= end) {
                        self.stats.full_sync_bytes_done += bytes;
                    }
                }
                if let Some(end) = self.full_sync_end {
                    if self.stats.acked >= end && self.phase == Phase::FullSync {
                        self.full_sync_complete();
                    }
                }
                self.drain(now);
            }
            Message::Rejected { seq, path, reason } => {
                self.stats.rejected += 1;
                tracing::warn!(volume = %self.config.volume, seq, %path, %reason,
                    "standby refused a change");
                // Refused since the last comparison: the standby lacks it, whichever
                // way it went (an op of a full sync is no more delivered than a
                // streamed one). Refusals of ops before it came ahead of the standby's
                // manifest, which shows what they left.
                if seq > self.full_sync_base {
                    self.refused = Some((seq, path.clone(), reason.clone()));
                }
                self.remember_rejected(path, reason);
                // A change refused while streaming (a rename whose source the standby
                // lacks, say) leaves the two apart: compare manifests. One refused
                // during a full sync would only be refused again (the standby asks for
                // one more full sync itself).
                if self.full_sync_end.is_some_and(|end| seq > end) {
                    self.resync_wanted = true;
                }
            }
            Message::Resync => self.start_full_sync(now),
            other => self.close(format!("unexpected message for an active: {other:?}")),
        }
    }

    fn try_diff(&mut self, now: Instant) {
        if !self.theirs_done {
            return;
        }
        let Some(differ) = self.differ.take() else {
            return;
        };
        let policies = self.config.policies.clone();
        let (diff, ours) = differ.finish(|p| policies.resolve(p.as_path()).priority.get());
        // Renames and links still queued were recorded before this comparison, maybe
        // before the scan it rests on: the full sync may bring their outcome, and the
        // standby then lacks their sources. A rename goes as `unsent` (a missing source
        // moves nothing), its new names shipped anew after it, as they are then; a link
        // goes as a copy of the file its new name has then (the next full sync links
        // them). The flag is on the op itself: marks in `unsent` would be cleared by
        // the ops ahead of it.
        for pending in self.queue.iter_mut() {
            match pending {
                Pending::Send(Op::Rename { unsent, .. }) => *unsent = true,
                Pending::Send(Op::Link { path, .. }) => {
                    self.queued_ops -= 1;
                    self.queued_ships.insert(path.clone());
                    *pending = Pending::Ship {
                        path: path.clone(),
                        content: true,
                        delete_if_missing: true,
                        file: None,
                        dir: false,
                    };
                }
                _ => {}
            }
        }
        let base = self.next_seq - 1;
        self.full_sync_base = base;
        self.stats.full_sync_bytes = diff.send.iter().filter(|t| t.content).map(|t| t.size).sum();
        let must_sync =
            |p: &RelPath| self.config.policies.resolve(p.as_path()).priority == Priority::MUST_SYNC;
        let priority1: Vec<RelPath> = diff
            .delete
            .iter()
            .chain(diff.send.iter().map(|t| &t.path))
            .filter(|p| must_sync(p))
            .cloned()
            .collect();
        // At most so many, and so many bytes of paths (10,000 paths of 4 KiB would not
        // fit in a message); the rest are counted.
        let mut bytes = 0;
        let listed = priority1
            .iter()
            .take(PRIORITY1_LISTED)
            .take_while(|p| {
                bytes += p.as_bytes().len() + 8;
                bytes <= PRIORITY1_BYTES
            })
            .count();
        let priority1_more = (priority1.len() - listed) as u64;
        let mut priority1 = priority1;
        priority1.truncate(listed);
        self.send(
            Message::FullSyncStart {
                sync: self.sync_id,
                base,
                priority1,
                priority1_more,
            },
            now,
        );
        // Priority-1 `once` paths changed since this full sync's scan began: the
        // standby dropped what it was told of them before this start, and the diff may
        // have seen them as they were. Told again: an op of this full sync (read when
        // it goes, so as they are now) or a later one puts them right.
        let changed: Vec<RelPath> = self
            .once_changed
            .iter()
            .filter(|p| self.priority(p) == Priority::MUST_SYNC)
            .cloned()
            .collect();
        for path in changed {
            self.send(
                Message::OnceChanged {
                    path,
                    from_seq: base + 1,
                },
                now,
            );
        }
        // Deletions first (they also clear paths whose kind changed), then the sends,
        // priority 1 leading.
        // Only its directories are needed from here on (the rest can be 100,000s of
        // entries): keep them, let the manifest go.
        let our_dirs: std::collections::HashSet<RelPath> = ours
            .iter()
            .filter(|(_, m)| m.kind == manifest::Kind::Dir)
            .map(|(p, _)| p.clone())
            .collect();
        drop(ours);
        // Creating and deleting entries moves the standby's directory mtimes: the
        // metadata of every directory touched (the root too) is sent again, deepest
        // first, once its entries are in place.
        let mut touched = std::collections::BTreeSet::new();
        let touch_parents = |path: &RelPath, touched: &mut std::collections::BTreeSet<RelPath>| {
            let mut at = path.split_last().map(|(p, _)| p);
            while let Some(dir) = at {
                at = dir.split_last().map(|(p, _)| p);
                touched.insert(dir);
            }
        };
        let mut ops = 0;
        for path in diff.delete {
            touch_parents(&path, &mut touched);
            let seq = self.take_seq(now);
            self.send(
                Message::Op {
                    seq,
                    op: Op::Delete { path },
                },
                now,
            );
            ops += 1;
        }
        for transfer in diff.send {
            if transfer.content || transfer.link || !transfer.on_standby {
                touch_parents(&transfer.path, &mut touched);
            }
            if transfer.kind == manifest::Kind::Dir {
                touched.insert(transfer.path.clone());
            }
            let seq = self.take_seq(now);
            self.queue(Output::Ship(Ship {
                seq,
                path: transfer.path,
                content: transfer.content,
                standby_hash: transfer.standby_hash,
                delete_if_missing: false,
                link: transfer.link,
                file: None,
                dir: false,
                copy: false,
            }));
            ops += 1;
        }
        for dir in touched.into_iter().rev() {
            if our_dirs.contains(&dir) {
                self.ship_directory_now(dir, now);
                ops += 1;
            }
        }
        let end = self.next_seq - 1;
        self.stats.full_sync_ops = ops;
        self.full_sync_end = Some(end);
        self.send(Message::FullSyncDone { seq: end }, now);
        if self.stats.acked >= end {
            self.full_sync_complete();
        }
        // Changes made during the full sync follow it.
        self.drain(now);
    }

    /// Active: every op of the full sync is acknowledged.
    fn full_sync_complete(&mut self) {
        self.phase = Phase::Streaming;
        self.stats.full_syncs_done += 1;
        // A refusal of an op before this full sync's comparison is repaired by it.
        if self
            .refused
            .as_ref()
            .is_some_and(|(seq, ..)| *seq <= self.full_sync_base)
        {
            self.refused = None;
        }
    }

    fn take_seq(&mut self, now: Instant) -> u64 {
        if self.in_flight() == 0 {
            // Nothing was awaited until now: the wait for progress starts here, not at
            // the last ack, which may be long ago (else the first change after an idle
            // spell would look like a stalled standby and start a full sync).
            self.progress_at = now;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.stats.ops += 1;
        seq
    }

    /// Active past the hello with a full sync or ops under way: acks are due, and a
    /// standby that sends none for `stall_timeout` is taken for stalled.
    fn watching_for_stall(&self) -> bool {
        self.is_active()
            && self.phase != Phase::Hello
            && (self.phase == Phase::FullSync || self.in_flight() > 0)
    }

    fn in_flight(&self) -> u64 {
        (self.next_seq - 1).saturating_sub(self.stats.acked)
    }

    /// Sends queued changes while the window allows.
    fn drain(&mut self, now: Instant) {
        if self.full_sync_end.is_none() {
            return;
        }
        while self.in_flight() < self.config.max_in_flight {
            // A rename or a hard link waits until the ships before it are read: one of
            // them may find its source gone.
            let rename_next = matches!(
                self.queue.front(),
                Some(Pending::Send(Op::Rename { .. } | Op::Link { .. }))
            );
            if rename_next && self.ships_unread > 0 {
                break;
            }
            let Some(pending) = self.queue.pop_front() else {
                break;
            };
            match pending {
                Pending::Ship {
                    path,
                    content,
                    delete_if_missing,
                    file,
                    dir,
                } => {
                    self.queued_ships.remove(&path);
                    let seq = self.take_seq(now);
                    let linked = file.is_some_and(|f| f.linked);
                    if self.superseded(&path, linked) {
                        if linked {
                            // Not read: the change never reaches the file's other names
                            // on the standby, and where they are only a walk of the
                            // volume tells (as when a read finds the name gone).
                            tracing::info!(volume = %self.config.volume, %path,
                                "a changed hard-linked file lost the name it was recorded under; comparing manifests");
                            self.resync_wanted = true;
                        }
                        // A rename queued behind moved it (or a directory above it)
                        // away, or a deletion queued behind removes it: whatever holds
                        // the name now came later, and sent ahead of that op it would
                        // replace on the standby what the op is about (a directory
                        // with all below it, which a rename is to move). It goes as
                        // gone; a rename ships it under its new name.
                        self.send(
                            Message::Op {
                                seq,
                                op: Op::Skip { path: path.clone() },
                            },
                            now,
                        );
                        self.note_unsent(path, false);
                        continue;
                    }
                    self.queue(Output::Ship(Ship {
                        seq,
                        path,
                        content,
                        standby_hash: None,
                        delete_if_missing,
                        link: false,
                        file: file.map(Box::new),
                        dir,
                        copy: false,
                    }));
                }
                Pending::Send(Op::Rename {
                    from,
                    to,
                    exchange,
                    unsent,
                }) => {
                    self.queued_ops -= 1;
                    self.send_rename(from, to, exchange, unsent, now);
                }
                Pending::Send(Op::Link { path, .. })
                    if self.moved_away(&path) || self.parent_unsent(&path) =>
                {
                    // A rename queued behind moves a directory above the new name (a
                    // directory made and filled, then renamed at once), or the
                    // directory it is made in went unsent (its ship found it removed
                    // since, or made again as something else): the standby may have
                    // nowhere to put it. The op saying what became of that directory
                    // is behind; a rename of it ships the new name under its new path.
                    self.queued_ops -= 1;
                    self.note_unsent(path, false);
                }
                Pending::Send(Op::Link { path, existing }) if self.link_as_copy(&existing) => {
                    // Its existing name never reached the standby as it is (found gone:
                    // `ln tmp/x new/x; rm tmp/x`): the new name goes as a copy, and is
                    // new to the standby until that carries it.
                    self.queued_ops -= 1;
                    self.note_created(path.clone());
                    self.ship_whole(path, now);
                }
                Pending::Send(op) => {
                    self.queued_ops -= 1;
                    let seq = self.take_seq(now);
                    if let Op::Delete { path } = &op {
                        if let Some(n) = self.deleting.get_mut(path) {
                            *n -= 1;
                            if *n == 0 {
                                self.deleting.remove(path);
                            }
                        }
                        // Whatever went unsent there is gone on the standby now, and so
                        // is whatever a ship still being read finds gone there.
                        for p in unsent_at_or_below(&self.unsent, path) {
                            self.unsent.remove(&p);
                        }
                        if self.ships_unread > 0 {
                            self.deleted_unread.push((seq, path.clone()));
                        }
                    }
                    self.send(Message::Op { seq, op }, now);
                }
            }
        }
    }

    /// Whether a hard link to `existing` must go as a copy: it never reached the
    /// standby as it is (found gone, or a directory above it was). One only held back
    /// is linked to: the standby's older version takes the link, and the close of its
    /// writer ships the new content to every name there. (A standby that has no
    /// version of it refuses the link.)
    fn link_as_copy(&self, existing: &RelPath) -> bool {
        if !self.unsent_covers(existing) {
            return false;
        }
        self.unsent.get(existing) != Some(&true) || self.parent_unsent(existing)
    }

    /// Whether `path` or a directory above it went unsent (see [`Session::shipped`]).
    fn unsent_covers(&self, path: &RelPath) -> bool {
        !self.unsent.is_empty() && at_or_above(path, |p| self.unsent.contains_key(p))
    }

    /// Whether a directory above `path` went unsent: the standby may lack it, or have
    /// something else there.
    fn parent_unsent(&self, path: &RelPath) -> bool {
        !self.unsent.is_empty()
            && path
                .split_last()
                .is_some_and(|(dir, _)| self.unsent_covers(&dir))
    }

    /// Sends a rename. If a ship of its source did not carry what the rename moves
    /// (found it gone, or read what took the name since), the standby may lack it or
    /// hold another version: the rename goes out `unsent` (a missing source moves
    /// nothing there). Each such path at or below the old names is then shipped under
    /// its new name as it is now, parents first: the temp file of an atomic write
    /// arrives as its target, a directory filled and renamed in one burst arrives
    /// whole, each entry having had its own ship that found it gone. `flagged`: it
    /// goes `unsent` whatever the ships found, and its new names are shipped anew.
    fn send_rename(
        &mut self,
        from: RelPath,
        to: RelPath,
        exchange: bool,
        flagged: bool,
        now: Instant,
    ) {
        for name in [&from, &to] {
            if let Some(n) = self.renaming.get_mut(name) {
                *n -= 1;
                if *n == 0 {
                    self.renaming.remove(name);
                }
            }
        }
        // Also when a directory it goes into went unsent (its ship found it removed,
        // or moved away, since): the standby may lack that directory, and makes it
        // for an `unsent` rename. The op saying what became of it is behind (a
        // deletion, or a rename that ships it anew, with what lies in it).
        let unsent = flagged
            || self.unsent.contains_key(&from)
            || (exchange && self.unsent.contains_key(&to))
            || self.parent_unsent(&to)
            || (exchange && self.parent_unsent(&from));
        let below_from = unsent_at_or_below(&self.unsent, &from);
        let below_to = unsent_at_or_below(&self.unsent, &to);
        let seq = self.take_seq(now);
        let op = Op::Rename {
            from: from.clone(),
            to: to.clone(),
            exchange,
            unsent,
        };
        self.send(Message::Op { seq, op }, now);
        // Without an exchange, what was at `to` is replaced, there as here.
        for p in below_from.iter().chain(&below_to) {
            self.unsent.remove(p);
        }
        let mut renamed: BTreeSet<RelPath> = below_from
            .iter()
            .filter_map(|p| p.renamed(&from, &to))
            .collect();
        if exchange {
            renamed.extend(below_to.iter().filter_map(|p| p.renamed(&to, &from)));
        }
        if flagged {
            renamed.insert(to.clone());
            if exchange {
                renamed.insert(from.clone());
            }
        }
        if !renamed.is_empty() {
            tracing::debug!(volume = %self.config.volume, %from, %to, unsent,
                reshipped = renamed.len(), "renamed what was not sent as it was; shipping it anew");
        }
        // The directories the rename moved, which hold them: placing them on the
        // standby leaves their times as they were there, and their times here moved
        // when they were made. Shipped after them.
        let moved = |d: &RelPath| d.starts_with(&to) || (exchange && d.starts_with(&from));
        let parents: BTreeSet<RelPath> = renamed
            .iter()
            .filter_map(|p| p.split_last().map(|(dir, _)| dir))
            .filter(moved)
            .collect();
        for path in renamed {
            // Gone until its ship finds it; and new to the standby, which may have no
            // version of it, until a ship carries it (one held back counts as gone).
            self.unsent.insert(path.clone(), false);
            self.note_created(path.clone());
            self.ship_whole(path, now);
        }
        for dir in parents {
            self.ship_directory_now(dir, now);
        }
    }

    /// Ships the metadata of the directory `dir` now, ahead of the queue.
    fn ship_directory_now(&mut self, dir: RelPath, now: Instant) {
        let seq = self.take_seq(now);
        self.queue(Output::Ship(Ship {
            seq,
            path: dir,
            content: false,
            standby_hash: None,
            delete_if_missing: false,
            link: false,
            file: None,
            dir: true,
            copy: false,
        }));
    }

    /// Ships `path` now, as it is when read, its bytes included, in place of a link or
    /// a rename that could not go as one ([`Ship::copy`]).
    fn ship_whole(&mut self, path: RelPath, now: Instant) {
        let seq = self.take_seq(now);
        self.queue(Output::Ship(Ship {
            seq,
            path,
            content: true,
            standby_hash: None,
            delete_if_missing: false,
            link: false,
            file: None,
            dir: false,
            copy: true,
        }));
    }

    fn enqueue(&mut self, pending: Pending, now: Instant) {
        if let Pending::Ship {
            path,
            content,
            file,
            delete_if_missing,
            ..
        } = &pending
        {
            // A ship of the same path already waiting, with no rename or delete queued
            // after it, will read the file when it goes: one is enough. It reads for the
            // later record's file. (Not one for another file: records made side by side
            // can come out of order, and the later file's ship must not be lost.)
            let other_file = |q: &Pending| {
                matches!(q, Pending::Ship { path: qp, file: Some(f), .. }
                    if qp == path && file.is_some_and(|n| n.key != f.key))
            };
            if self.queued_ships.contains(path)
                && self.queued_ops == 0
                && !self.queue.iter().any(other_file)
            {
                if *content || file.is_some() || *delete_if_missing {
                    for p in self.queue.iter_mut() {
                        if let Pending::Ship {
                            path: q,
                            content: c,
                            file: f,
                            delete_if_missing: d,
                            ..
                        } = p
                        {
                            if q == path {
                                *c |= *content;
                                *d |= *delete_if_missing;
                                if file.is_none() && (*content || *delete_if_missing) {
                                    // Whatever is at the path when it is read, not
                                    // the earlier record's file: a rename brought it.
                                    *f = None;
                                }
                                if let Some(new) = file {
                                    let linked = f.is_some_and(|old| old.linked);
                                    *f = Some(FileId {
                                        linked: new.linked || linked,
                                        ..*new
                                    });
                                }
                            }
                        }
                    }
                }
                return;
            }
            self.queued_ships.insert(path.clone());
        }
        if self.queue.len() >= self.config.max_queue {
            // Too far behind to remember each change: a full sync by manifest will
            // bring the standby up to date without holding them in memory.
            tracing::info!(volume = %self.config.volume, queued = self.queue.len(),
                "standby too far behind; resyncing by manifest");
            self.queue.clear();
            self.queued_ships.clear();
            self.queued_ops = 0;
            self.renaming.clear();
            self.deleting.clear();
            self.created.clear();
            self.resync_wanted = true;
            return;
        }
        if matches!(pending, Pending::Send(_)) {
            self.queued_ops += 1;
        }
        if let Pending::Send(Op::Delete { path }) = &pending {
            *self.deleting.entry(path.clone()).or_default() += 1;
            // Names made before the deletion are gone; one made again after it (its
            // record comes later) is new again.
            if !self.created.is_empty() {
                self.created.retain(|p| !p.starts_with(path));
            }
        }
        self.queue.push_back(pending);
        self.drain(now);
    }

    /// Active: ship `paths` now, whatever their policy (`once`, `interval` and `never`
    /// too: an administrator asked), with their content; a path that no longer exists
    /// is deleted on the standby. See [`Session::caught_up`] for when they are acked.
    /// The root is left out, as `twinfs sync` refuses it: its metadata ships when it
    /// changes, and a full sync compares it.
    pub fn ship_now(&mut self, mut paths: Vec<RelPath>, now: Instant) {
        if !self.is_active() || self.phase == Phase::Closed || self.phase == Phase::Hello {
            return;
        }
        paths.retain(|p| !p.is_root());
        for p in &paths {
            self.once_changed.remove(p);
        }
        self.ship_with_content(paths, now);
        self.drain(now);
    }

    /// Active: ship every `interval` path that waits for its interval now, and every
    /// `once` path changed since the last full sync began (a handover leaves nothing
    /// behind); whether there were any.
    pub fn ship_waiting(&mut self, now: Instant) -> bool {
        if (self.dirty.is_empty() && self.once_changed.is_empty())
            || !self.is_active()
            || self.phase != Phase::Streaming
        {
            return false;
        }
        let mut waiting: Vec<RelPath> = self.dirty.keys().cloned().collect();
        waiting.extend(std::mem::take(&mut self.once_changed));
        self.ship_with_content(waiting, now);
        self.drain(now);
        true
    }

    /// Queues each path to ship with its content (a vanished one is deleted on the
    /// standby); no longer waiting for its interval.
    fn ship_with_content(&mut self, paths: Vec<RelPath>, now: Instant) {
        for path in paths {
            self.dirty.remove(&path);
            self.enqueue(
                Pending::Ship {
                    path,
                    content: true,
                    delete_if_missing: true,
                    file: None,
                    dir: false,
                },
                now,
            );
        }
    }

    /// A change captured on the active's volume.
    pub fn on_change(&mut self, record: &Record, now: Instant) {
        if !self.is_active() || self.phase == Phase::Closed || self.phase == Phase::Hello {
            return;
        }
        let path = match RelPath::from_path(&record.change.path) {
            Ok(path) => path,
            Err(e) => return self.too_long(record, &e, now),
        };
        if let ChangeKind::Rename { from, exchange } = &record.change.kind {
            return self.rename(from, path, *exchange, record.policy.sync, now);
        }
        if matches!(record.policy.sync, SyncMode::Once | SyncMode::Interval(_))
            && is_namespace(&record.change.kind)
        {
            // The name waits (or never goes), but the directory's new mtime ships now
            // when the directory ships as changes come. (An interval name's own ship
            // is followed by its directory's again: making or removing it on the
            // standby moves the mtime there.)
            if let Some((dir, _)) = path.split_last() {
                self.ship_if_always(dir, now);
            }
        }
        match record.policy.sync {
            SyncMode::Once => {
                // Not shipped; but a priority-1 path's standby must know its copy is
                // not in sync, and a planned handover ships it.
                if record.policy.priority == Priority::MUST_SYNC {
                    let from_seq = self.next_seq;
                    self.send(
                        Message::OnceChanged {
                            path: path.clone(),
                            from_seq,
                        },
                        now,
                    );
                }
                if self.once_changed.len() < self.config.max_queue {
                    self.once_changed.insert(path);
                } else {
                    // Too many to follow: a manifest comparison finds them.
                    self.resync_wanted = true;
                }
            }
            SyncMode::Never => {}
            SyncMode::Interval(every) => {
                self.dirty.entry(path).or_insert(now + every);
            }
            SyncMode::Always => self.always(path, &record.change.kind, record.change.file, now),
        }
    }

    /// A change at a path no peer can name (longer than `PATH_MAX`) is not replicated,
    /// as scans leave such names out. A rename to one from a name that ships as
    /// changes come takes that name away: it goes on the standby too (or, for an
    /// exchange, gets what took its place, and a manifest comparison what lies
    /// below). From another name, a manifest comparison settles it, as for a rename
    /// across policies.
    fn too_long(&mut self, record: &Record, error: &crate::path::PathError, now: Instant) {
        let path = record.change.path.display();
        if self.warned_too_long {
            tracing::debug!(volume = %self.config.volume, %path, %error, "not replicated");
        } else {
            self.warned_too_long = true;
            tracing::warn!(volume = %self.config.volume, %path, %error,
                "a change to a path that no peer can name is not replicated");
        }
        // A name made or removed in a directory a peer can name moved its mtime.
        let namespace = is_namespace(&record.change.kind)
            || matches!(record.change.kind, ChangeKind::Rename { .. });
        if let Some(Ok(dir)) = namespace
            .then(|| record.change.path.parent())
            .flatten()
            .map(RelPath::from_path)
        {
            self.ship_if_always(dir, now);
        }
        let ChangeKind::Rename { from, exchange } = &record.change.kind else {
            return;
        };
        let Ok(from) = RelPath::from_path(from) else {
            return;
        };
        let parent = from.split_last().map(|(p, _)| p);
        match (self.config.policies.resolve(from.as_path()).sync, exchange) {
            (SyncMode::Never, _) => {}
            (SyncMode::Always, false) => {
                self.enqueue(Pending::Send(Op::Delete { path: from }), now);
                self.ship_directory(parent, now);
            }
            (SyncMode::Always, true) => {
                self.ship_with_content(vec![from], now);
                self.ship_directory(parent, now);
                self.resync_wanted = true;
            }
            _ => self.resync_wanted = true,
        }
    }

    /// A rename ships as a rename when both names ship at once. Otherwise the standby
    /// may lack what moved, or must lose the old name without getting the new one:
    /// a full sync by manifest sorts that out.
    fn rename(
        &mut self,
        from: &std::path::Path,
        to: RelPath,
        exchange: bool,
        to_sync: SyncMode,
        now: Instant,
    ) {
        let Ok(from) = RelPath::from_path(from) else {
            // From a name no peer can name (longer than `PATH_MAX`): what arrives at
            // `to` is new to the standby, and what lies below it comes with a
            // manifest comparison (which brings the rest of a name that does not ship
            // as changes come).
            if to_sync == SyncMode::Always {
                let parent = to.split_last().map(|(p, _)| p);
                self.ship_with_content(vec![to], now);
                self.ship_directory(parent, now);
            }
            if to_sync != SyncMode::Never {
                self.resync_wanted = true;
            }
            return;
        };
        // New names move with the rename as it is recorded (one made after it, whose
        // record comes later, is not moved when the rename goes); without an
        // exchange, those it replaced are gone.
        crate::path::rename_in(&mut self.created, &from, &to, exchange, true);
        let from_sync = self.config.policies.resolve(from.as_path()).sync;
        match (from_sync, to_sync) {
            (SyncMode::Always, SyncMode::Always) => {
                let parents = [
                    from.split_last().map(|(p, _)| p),
                    to.split_last().map(|(p, _)| p),
                ];
                // Whether the standby may lack the source is known only when it goes.
                // The target too: what a ship of it reads now is what the rename put
                // there, which must not reach the standby ahead of the rename (a hard
                // link queued between would take it for the file it was made to).
                *self.renaming.entry(from.clone()).or_default() += 1;
                *self.renaming.entry(to.clone()).or_default() += 1;
                let unsent = self.below_awaiting(&from) || (exchange && self.below_awaiting(&to));
                self.rebase_awaiting(&from, &to, exchange);
                let op = Op::Rename {
                    from,
                    to,
                    exchange,
                    unsent,
                };
                self.enqueue(Pending::Send(op), now);
                let [a, b] = parents;
                if a != b {
                    self.ship_directory(a, now);
                }
                self.ship_directory(b, now);
            }
            (SyncMode::Never, SyncMode::Never) => {}
            _ => {
                // A name that ships as changes come is put right at once, as it is
                // now: the source goes, the target (or each side of an exchange)
                // arrives, so that changes below a directory renamed to it find it
                // there. What lies below a directory comes with a manifest
                // comparison, which also settles the other name.
                for (path, sync) in [(from, from_sync), (to, to_sync)] {
                    if sync == SyncMode::Always {
                        let parent = path.split_last().map(|(p, _)| p);
                        self.awaiting_comparison.insert(path.clone());
                        self.ship_with_content(vec![path], now);
                        self.ship_directory(parent, now);
                    }
                }
                self.resync_wanted = true;
            }
        }
    }

    fn always(&mut self, path: RelPath, kind: &ChangeKind, file: Option<FileId>, now: Instant) {
        if *kind == ChangeKind::Create {
            self.note_created(path.clone());
        }
        let pending = match kind {
            // A hard link ships as a link when its existing name ships as changes come:
            // the standby's copy of it then has the content the new name must show.
            // Otherwise the new name gets a copy; the next full sync links them.
            ChangeKind::Link { existing } => match RelPath::from_path(existing) {
                Ok(existing)
                    if self.config.policies.resolve(existing.as_path()).sync
                        == SyncMode::Always
                        && !self.below_awaiting(&existing) =>
                {
                    Pending::Send(Op::Link { path, existing })
                }
                _ => Pending::Ship {
                    path,
                    content: true,
                    delete_if_missing: false,
                    file,
                    dir: false,
                },
            },
            ChangeKind::Unlink | ChangeKind::Rmdir => Pending::Send(Op::Delete { path }),
            // Handled by `rename` before the policy is looked at.
            ChangeKind::Rename { .. } => return,
            ChangeKind::Attr(a) => Pending::Ship {
                path,
                // A touch forces the file's bytes across too: it is how an
                // administrator repairs a standby's copy.
                content: a.size || a.times,
                delete_if_missing: false,
                file,
                dir: false,
            },
            ChangeKind::Xattr | ChangeKind::Mkdir | ChangeKind::Mknod | ChangeKind::Symlink => {
                Pending::Ship {
                    path,
                    content: false,
                    delete_if_missing: false,
                    file,
                    dir: *kind == ChangeKind::Mkdir,
                }
            }
            ChangeKind::Write | ChangeKind::Create => Pending::Ship {
                path,
                content: true,
                delete_if_missing: false,
                file,
                dir: false,
            },
        };
        let parent = pending_path(&pending).split_last().map(|(p, _)| p);
        self.enqueue(pending, now);
        if is_namespace(kind) {
            self.ship_directory(parent, now);
        }
    }

    /// Whether `path` lies below a name whose entries the standby gets only with the
    /// next manifest comparison ([`Session::awaiting_comparison`]).
    fn below_awaiting(&self, path: &RelPath) -> bool {
        !self.awaiting_comparison.is_empty()
            && path
                .split_last()
                .is_some_and(|(dir, _)| at_or_above(&dir, |p| self.awaiting_comparison.contains(p)))
    }

    /// A rename moves the names awaiting a comparison at or below its source (and, for
    /// an exchange, its target) with it.
    fn rebase_awaiting(&mut self, from: &RelPath, to: &RelPath, exchange: bool) {
        crate::path::rename_in(&mut self.awaiting_comparison, from, to, exchange, false);
    }

    /// Ships the metadata of the directory `dir` if it ships as changes come.
    fn ship_if_always(&mut self, dir: RelPath, now: Instant) {
        if self.config.policies.resolve(dir.as_path()).sync == SyncMode::Always {
            self.ship_directory(Some(dir), now);
        }
    }

    /// A namespace change moved its directory's mtime on the active; the standby's
    /// apply moved it too, to another time: ship the directory's metadata after it.
    fn ship_directory(&mut self, dir: Option<RelPath>, now: Instant) {
        if let Some(dir) = dir {
            self.enqueue(
                Pending::Ship {
                    path: dir,
                    content: false,
                    delete_if_missing: false,
                    file: None,
                    dir: true,
                },
                now,
            );
        }
    }

    /// Time passes: heartbeats, timeouts, interval flushes, wanted resyncs.
    pub fn on_tick(&mut self, now: Instant) {
        if self.phase == Phase::Closed {
            return;
        }
        if self.phase == Phase::Hello
            && now.duration_since(self.started) >= self.config.peer_timeout
        {
            return self.close("no hello from the peer".into());
        }
        if now.duration_since(self.last_received) >= self.config.peer_timeout {
            return self.close(format!(
                "peer silent for {:?}",
                now.duration_since(self.last_received)
            ));
        }
        if self.watching_for_stall()
            && now.duration_since(self.progress_at) >= self.config.stall_timeout
        {
            tracing::info!(volume = %self.config.volume, "no progress; starting a full sync");
            self.start_full_sync(now);
            return;
        }
        if self.is_active() && self.phase == Phase::Streaming {
            if self.resync_wanted && self.in_flight() == 0 {
                self.start_full_sync(now);
                return;
            }
            let due: Vec<RelPath> = self
                .dirty
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(p, _)| p.clone())
                .collect();
            self.ship_with_content(due.clone(), now);
            for (dir, _) in due.iter().filter_map(|p| p.split_last()) {
                self.ship_if_always(dir, now);
            }
        }
        if now.duration_since(self.last_sent) >= self.config.heartbeat {
            self.send(Message::Heartbeat, now);
        }
    }

    /// The earliest time [`Session::on_tick`] has something to do.
    pub fn next_deadline(&self) -> Instant {
        let mut at = (self.last_sent + self.config.heartbeat)
            .min(self.last_received + self.config.peer_timeout);
        if self.phase == Phase::Hello {
            at = at.min(self.started + self.config.peer_timeout);
        }
        // Each only when `on_tick` acts on it: a deadline in the past that `on_tick`
        // does nothing about would have the driver spin. (An idle active's last
        // progress soon lies more than a stall timeout back; an `interval` path
        // changed during a full sync waits for its end.)
        if self.watching_for_stall() {
            at = at.min(self.progress_at + self.config.stall_timeout);
        }
        if self.is_active() && self.phase == Phase::Streaming {
            if let Some(due) = self.dirty.values().min() {
                at = at.min(*due);
            }
        }
        at
    }

    fn standby_message(&mut self, message: Message, now: Instant) {
        match message {
            Message::RequestManifest { sync } => {
                self.sync_id = sync;
                // Ops still on their way from before are covered by the full sync
                // that follows; applying them after the scan would undo its work.
                self.lost = true;
                self.phase = Phase::FullSync;
                self.stats.full_syncs += 1;
                self.in_sync_at = None;
                self.refused_in_full_sync = false;
                // It compares manifests after what was refused until now.
                self.repairing = self.unrepaired;
                self.queue(Output::ScanLocal);
            }
            Message::FullSyncStart {
                sync,
                base,
                priority1,
                priority1_more,
            } => {
                if sync != self.sync_id {
                    return;
                }
                // Sequence numbers count ops from 1: no active comes near this, and
                // the numbers after it would overflow.
                if base >= u64::MAX / 2 {
                    return self
                        .close(format!("a full sync from op {base}: not a sequence number"));
                }
                self.priority1_pending = priority1.into_iter().map(|p| (p, 0)).collect();
                self.priority1_more = priority1_more;
                // This full sync compares the files as they are now: it brings what
                // changed before it began.
                self.once_stale.retain(|_, from| *from > base + 1);
                self.expected = base + 1;
                self.applied_upto = base;
                self.applied_ahead.clear();
                self.full_sync_base = base;
                self.lost = false;
                self.in_sync_at = None;
                if self.stats.acked < base {
                    // Ops before it were never answered (lost on the way here, or their
                    // apply failed): this full sync's comparison, after them, stands
                    // for them. Acknowledged, or the active would wait for them (for
                    // good, if the comparison found nothing to send).
                    self.stats.acked = base;
                    self.send(Message::Ack { seq: base }, now);
                }
            }
            Message::Op { seq, op } => {
                if self.lost {
                    return;
                }
                if seq < self.expected {
                    // A duplicate: already applied, say so again.
                    return self.send(
                        Message::Ack {
                            seq: self.stats.acked,
                        },
                        now,
                    );
                }
                if seq > self.expected {
                    // Something went missing: only a full sync can tell what.
                    self.lost = true;
                    return self.send(Message::Resync, now);
                }
                self.expected += 1;
                // A priority-1 path is not in sync from the moment its change is known
                // until it is applied: a link cut in the middle of a large file must
                // leave this node unfit.
                if self.config.policies.resolve(op.path().as_path()).priority == Priority::MUST_SYNC
                {
                    self.priority1_pending.insert(op.path().clone(), seq);
                }
                // A rename takes a priority-1 file away from its old name too (or
                // swaps it): not in sync there either until it is applied.
                if let Op::Rename { from, .. } = &op {
                    if self.priority(from) == Priority::MUST_SYNC {
                        self.priority1_pending.insert(from.clone(), seq);
                    }
                }
                let wide = match &op {
                    Op::Skip { .. } => Some(Wide::Skip),
                    Op::Delete { path } => Some(Wide::Gone(path.clone())),
                    Op::Rename {
                        from,
                        exchange: false,
                        ..
                    } => Some(Wide::Gone(from.clone())),
                    Op::Rename {
                        from,
                        exchange: true,
                        ..
                    } => Some(Wide::Also(from.clone())),
                    _ => None,
                };
                if let Some(wide) = wide {
                    self.wide_ops.insert(seq, wide);
                }
                self.queue(Output::Apply { seq, op });
            }
            Message::OnceChanged { path, from_seq } => {
                if self.priority(&path) == Priority::MUST_SYNC {
                    let from = self.once_stale.entry(path).or_insert(from_seq);
                    *from = (*from).max(from_seq);
                }
            }
            Message::FullSyncDone { seq } => {
                if !self.lost {
                    self.stats.full_sync_ops = seq.saturating_sub(self.full_sync_base);
                    self.in_sync_at = Some(seq);
                    self.check_in_sync(now);
                }
            }
            other => self.close(format!("unexpected message for a standby: {other:?}")),
        }
    }

    /// Standby: op `seq`, about to be reported applied, brought nothing of its path (a
    /// large file given up because it changed on the active while it came): like a
    /// skip, a priority-1 path stays pending until its next ship.
    pub fn held_back(&mut self, seq: u64) {
        self.wide_ops.insert(seq, Wide::Skip);
    }

    /// Standby: op `seq` was applied (`Ok`) or refused (`Err` with the reason). Ops may
    /// be reported out of order (a large file applied while later ops go on); the ack
    /// covers only what is applied without a gap.
    pub fn applied(&mut self, seq: u64, path: &RelPath, result: Result<(), String>, now: Instant) {
        self.stats.ops += 1;
        let rejected_before = self.stats.rejected;
        match (&result, self.wide_ops.remove(&seq)) {
            // The active held the file back (being written, or changed while it was
            // read): nothing of it came, and its writer's close (or that change)
            // ships it. Until then it is not in sync.
            (Ok(()), Some(Wide::Skip)) => {}
            (Ok(()), wide) => {
                if self
                    .priority1_pending
                    .get(path)
                    .is_some_and(|last| *last <= seq)
                {
                    self.priority1_pending.remove(path);
                }
                if self.once_stale.get(path).is_some_and(|from| seq >= *from) {
                    self.once_stale.remove(path);
                }
                // What was at or below a path deleted or renamed away is settled: the
                // active has nothing there any more (a rename's new names are
                // pending by their own op).
                match wide {
                    Some(Wide::Gone(gone)) => {
                        self.priority1_pending
                            .retain(|p, last| !(p.starts_with(&gone) && *last <= seq));
                        self.once_stale
                            .retain(|p, from| !(p.starts_with(&gone) && seq >= *from));
                    }
                    Some(Wide::Also(also))
                        if self
                            .priority1_pending
                            .get(&also)
                            .is_some_and(|last| *last <= seq) =>
                    {
                        self.priority1_pending.remove(&also);
                    }
                    _ => {}
                }
            }
            (Err(_), _)
                if self.config.policies.resolve(path.as_path()).priority == Priority::MUST_SYNC =>
            {
                let last = self.priority1_pending.entry(path.clone()).or_insert(seq);
                *last = (*last).max(seq);
            }
            (Err(_), _) => {}
        }
        if let Err(reason) = result {
            self.stats.rejected += 1;
            self.remember_rejected(path.clone(), reason.clone());
            self.send(
                Message::Rejected {
                    seq,
                    path: path.clone(),
                    reason,
                },
                now,
            );
        }
        if seq <= self.applied_upto {
            // An op of an abandoned full sync finishing late: nothing to ack.
            return;
        }
        if self.stats.rejected > rejected_before {
            if self.phase == Phase::FullSync && self.in_sync_at.is_none_or(|end| seq <= end) {
                self.refused_in_full_sync = true;
            } else {
                // A streamed change is not here as the active has it (a rename whose
                // source is missing leaves the target out too, whatever its priority):
                // not in sync until a full sync repairs it.
                self.unrepaired += 1;
            }
        }
        self.applied_ahead.insert(seq);
        let before = self.applied_upto;
        while self.applied_ahead.remove(&(self.applied_upto + 1)) {
            self.applied_upto += 1;
        }
        if self.applied_upto > before {
            self.stats.acked = self.applied_upto;
            self.send(
                Message::Ack {
                    seq: self.applied_upto,
                },
                now,
            );
            self.check_in_sync(now);
        }
    }

    fn check_in_sync(&mut self, now: Instant) {
        if let Some(end) = self.in_sync_at {
            if self.stats.acked >= end {
                self.in_sync_at = None;
                self.phase = Phase::Streaming;
                // Every op of the full sync is applied; those refused are still listed.
                self.priority1_more = 0;
                if self.refused_in_full_sync {
                    // What was refused (the blocks of a large file never came, say) may
                    // be stale here: not in sync, so not fit. One more full sync may
                    // bring it; if that has refusals too, they wait for the next one.
                    self.in_sync = false;
                    if !std::mem::replace(&mut self.resynced_for_refusals, true) {
                        tracing::info!(volume = %self.config.volume,
                            "changes refused during the full sync; asking for another");
                        self.send(Message::Resync, now);
                    }
                    return;
                }
                self.resynced_for_refusals = false;
                self.stats.full_syncs_done += 1;
                self.clean_sync = self.sync_id;
                let was = self.in_sync();
                self.in_sync = true;
                // Streamed changes refused before this full sync began are repaired;
                // any refused since wait for the next one.
                self.unrepaired -= std::mem::take(&mut self.repairing).min(self.unrepaired);
                if !was && self.in_sync() {
                    self.queue(Output::InSync);
                }
            }
        }
    }

    /// Active: changes were missed (the record stream lagged): compare manifests once
    /// what is in flight is through.
    pub fn resync(&mut self) {
        self.resync_wanted = true;
    }

    /// The priority of a path under this session's rules.
    pub fn priority(&self, path: &RelPath) -> Priority {
        self.config.policies.resolve(path.as_path()).priority
    }
}

/// Whether `hit` holds for `path` or a directory above it.
fn at_or_above(path: &RelPath, hit: impl Fn(&RelPath) -> bool) -> bool {
    let mut at = Some(path.clone());
    while let Some(here) = at {
        if hit(&here) {
            return true;
        }
        at = here.split_last().map(|(parent, _)| parent);
    }
    false
}

/// A received op whose application settles other priority-1 paths than the one it
/// names (see `Session::wide_ops`).
#[derive(Debug)]
enum Wide {
    /// `Op::Skip`: nothing of its path came.
    Skip,
    /// `Op::Delete`, or `Op::Rename` (not an exchange) from this path: what was at or
    /// below it is gone.
    Gone(RelPath),
    /// `Op::Rename` exchanging with this path: it is settled too.
    Also(RelPath),
}

/// The paths of `set` that are `path` or below it.
fn unsent_at_or_below(set: &BTreeMap<RelPath, bool>, path: &RelPath) -> Vec<RelPath> {
    // In byte order, everything that starts with the bytes of `path` follows it.
    set.range(path.clone()..)
        .map(|(p, _)| p)
        .take_while(|p| p.as_bytes().starts_with(path.as_bytes()))
        .filter(|p| p.starts_with(path))
        .cloned()
        .collect()
}

/// Whether a change makes or removes a name in its directory, moving the directory's
/// mtime (a rename is handled on its own).
fn is_namespace(kind: &ChangeKind) -> bool {
    matches!(
        kind,
        ChangeKind::Unlink
            | ChangeKind::Rmdir
            | ChangeKind::Mkdir
            | ChangeKind::Mknod
            | ChangeKind::Symlink
            | ChangeKind::Create
            | ChangeKind::Link { .. }
    )
}

fn pending_path(pending: &Pending) -> &RelPath {
    match pending {
        Pending::Ship { path, .. } => path,
        Pending::Send(op) => op.path(),
    }
}
