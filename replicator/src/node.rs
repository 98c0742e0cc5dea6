//! The replication driver: runs one [`Session`] per volume and peer over QUIC, and
//! carries out what the sessions ask for: scanning a volume, reading a file to ship it,
//! applying an op on a standby and telling FUSE about it.
//!
//! The active node dials each standby peer (and keeps redialling); a standby accepts.
//! Each volume's session runs on its own bidirectional stream. A bad frame or a
//! protocol error closes that stream's session, never the daemon.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use twinfs_fs::{Invalidator, Role};

use crate::apply::{Applier, ApplyError, FileMeta, NodeKind};
use crate::capture::{Record, RecordSink};
use crate::delta::{self, BlockList};
use crate::manifest::{self, HashCache, Kind, Manifest, Meta};
use crate::path::RelPath;
use crate::policy::{Durability, PolicySet, SyncMode};
use crate::protocol::{Message, Op, ProtocolError, VolumeView, MAX_MESSAGE};
use crate::roles::{Hold, RoleCell, RoleHold, Term};
use crate::session::{Output, Session, SessionConfig, Ship, Shipped};
use crate::transport::{self, PeerId};
use crate::upstream::{self, Outbox};

/// How long to wait before dialling a peer again.
const REDIAL: Duration = Duration::from_millis(500);

/// The longest pause before a volume whose sessions keep ending on a live connection
/// gets a new stream; a session that lasted this long starts the pauses over.
const REOPEN_MAX: Duration = Duration::from_secs(30);

/// How long one dial waits for the handshake before starting over (a peer that comes
/// up meanwhile answers the next attempt at once, not a backed-off retransmission).
const CONNECT_ATTEMPT: Duration = Duration::from_secs(2);

/// A change record numbered in capture order. Shared, not copied, by the sessions
/// that read it: the backlog's slots hold a pointer each (7 MiB of slots held whole
/// records).
pub type Numbered = (u64, Arc<Record>);

/// Forwards a volume's change records to every session of that volume and, for a
/// path whose durability is `sync` (its rule's, else the volume's), holds the writer
/// until every connected standby has applied the change, or until the timeout.
pub struct Broadcast {
    tx: broadcast::Sender<Numbered>,
    gate: Arc<SyncGate>,
    durability: Durability,
    sync_timeout: Duration,
}

impl Broadcast {
    /// A sink sending into `tx`; `durability` is the volume's, for paths whose rule
    /// does not say, and a sync write waits at most `sync_timeout`.
    pub fn new(
        tx: broadcast::Sender<Numbered>,
        gate: Arc<SyncGate>,
        durability: Durability,
        sync_timeout: Duration,
    ) -> Broadcast {
        Broadcast {
            tx,
            gate,
            durability,
            sync_timeout,
        }
    }
}

impl RecordSink for Broadcast {
    fn push(&self, record: Record) {
        if let Some(wait) = self.push_later(record) {
            wait();
        }
    }

    fn push_later(&self, record: Record) -> Option<twinfs_fs::turn::Wait> {
        let id = self.gate.issue();
        let ships_now = record.policy.sync == SyncMode::Always;
        let durability = record.policy.durability.unwrap_or(self.durability);
        // No receiver (no standby connected) is fine: the next full sync covers it.
        let rename = matches!(record.change.kind, twinfs_fs::ChangeKind::Rename { .. });
        let _ = self.tx.send((id, Arc::new(record)));
        if rename {
            // Its record is where a session takes it from, before the wait below.
            self.gate
                .renames
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        if ships_now && durability == Durability::Sync {
            let (gate, timeout) = (self.gate.clone(), self.sync_timeout);
            return Some(Box::new(move || gate.wait(id, timeout)));
        }
        None
    }
}

/// The numbering of a volume's change records, and where the writers of a `sync`
/// volume wait for the standbys: each connected session reports the highest change it
/// has caught up with.
#[derive(Default)]
pub struct SyncGate {
    sessions: Mutex<std::collections::HashMap<u64, GateEntry>>,
    changed: std::sync::Condvar,
    next_session: std::sync::atomic::AtomicU64,
    /// The number of the last change record issued.
    issued: std::sync::atomic::AtomicU64,
    /// Rename records put in the channel (see [`catch_up_renames`]).
    renames: std::sync::atomic::AtomicU64,
    /// Standby: the number of the last local write of an upstream path its session
    /// has shipped (or known it could not): see [`SyncGate::upstream_shipped`].
    upstream_shipped: std::sync::atomic::AtomicU64,
}

#[derive(Clone, Copy, Default)]
struct GateEntry {
    caught_up: u64,
    out_of_sync: bool,
    /// The standby refused a change and waits for a full sync to repair it: waiting
    /// would not bring it, so `sync` writers do not wait for it (it is out of sync).
    refusing: bool,
}

impl SyncGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, GateEntry>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Numbers the next change record (from 1).
    fn issue(&self) -> u64 {
        self.issued
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            + 1
    }

    /// The number of the last change record issued (0 before any): once local writes
    /// are refused, a handover must see and ship every record up to it.
    fn last_issued(&self) -> u64 {
        self.issued.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Standby: the session has shipped the local writes up to record `id`.
    fn shipped_upstream(&self, id: u64) {
        self.upstream_shipped
            .fetch_max(id, std::sync::atomic::Ordering::SeqCst);
    }

    /// Standby: whether every record issued has been shipped upstream, so that a large
    /// file of the active put at an upstream path replaces nothing a local write made
    /// and has yet to ship (under the apply turn, no new one comes).
    fn upstream_shipped(&self) -> bool {
        self.upstream_shipped
            .load(std::sync::atomic::Ordering::SeqCst)
            >= self.last_issued()
    }

    /// A new session to wait for.
    fn register(&self) -> u64 {
        let id = self
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().insert(id, GateEntry::default());
        id
    }

    /// The session ended: nobody waits for it any more.
    fn unregister(&self, session: u64) {
        self.lock().remove(&session);
        self.changed.notify_all();
    }

    /// The session's standby has applied every change up to `id`.
    fn caught_up(&self, session: u64, id: u64) {
        if let Some(e) = self.lock().get_mut(&session) {
            if id > e.caught_up {
                e.caught_up = id;
                e.out_of_sync = false;
            }
        }
        self.changed.notify_all();
    }

    /// Whether the session's standby refused a change that no full sync has
    /// repaired yet ([`Session::refused`]).
    fn refusing(&self, session: u64, refusing: bool) {
        let mut sessions = self.lock();
        if let Some(e) = sessions.get_mut(&session) {
            if e.refusing != refusing {
                e.refusing = refusing;
                drop(sessions);
                self.changed.notify_all();
            }
        }
    }

    fn out_of_sync(&self, session: u64) -> bool {
        self.lock().get(&session).is_some_and(|e| e.out_of_sync)
    }

    /// Waits until every session registered now has caught up with `id`, or
    /// `timeout`; a session that did not is marked out of sync (status says so).
    fn wait(&self, id: u64, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let mut sessions = self.lock();
        let waiting: Vec<u64> = sessions.keys().copied().collect();
        loop {
            let mut behind: Vec<u64> = waiting
                .iter()
                .copied()
                .filter(|s| sessions.get(s).is_some_and(|e| e.caught_up < id))
                .collect();
            // A standby that refused a change is not waited for: it is out of sync
            // until a full sync repairs it.
            behind.retain(|s| match sessions.get_mut(s) {
                Some(e) if e.refusing => {
                    if !std::mem::replace(&mut e.out_of_sync, true) {
                        tracing::warn!(change = id,
                            "a standby refused a change: sync writes do not wait for it until a full sync repairs it");
                    }
                    false
                }
                _ => true,
            });
            if behind.is_empty() {
                return;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                for s in behind {
                    if let Some(e) = sessions.get_mut(&s) {
                        e.out_of_sync = true;
                    }
                }
                tracing::warn!(
                    change = id,
                    ?timeout,
                    "a standby did not apply a sync write in time"
                );
                return;
            }
            sessions = match self.changed.wait_timeout(sessions, deadline - now) {
                Ok((guard, _)) => guard,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

/// One volume as the driver sees it.
#[derive(Clone)]
pub struct VolumeLink {
    /// The volume's name.
    pub name: String,
    /// The underlying directory's `O_PATH` fd (opened before the mount).
    pub root: Arc<OwnedFd>,
    /// Its rules.
    pub policies: PolicySet,
    /// This node's role and epoch for it.
    pub roles: Arc<RoleCell>,
    /// Its change records.
    pub changes: broadcast::Sender<Numbered>,
    /// Where its `sync` writers wait.
    pub gate: Arc<SyncGate>,
    /// Tells FUSE that a path changed underneath.
    pub invalidator: Invalidator,
    /// The mounted volume (to see whether a file is being written).
    pub volume: Arc<twinfs_fs::Volume>,
    /// Hashes already computed, shared by the sessions of this volume.
    pub cache: Arc<Mutex<HashCache>>,
    /// Where the hash cache is kept across restarts.
    pub cache_file: std::path::PathBuf,
    /// Where a standby keeps its [`SyncRecord`].
    pub sync_file: std::path::PathBuf,
    /// Where a fenced node keeps its own versions of what the winner replaces.
    pub conflicts: crate::conflicts::Area,
    /// Requests of the administrator to the active sessions (`twinfs sync`).
    pub commands: broadcast::Sender<Command>,
    /// Standby: where `twinfs promote` asks the session with the active, if one runs,
    /// for a planned handover.
    pub handover: HandoverSlot,
    /// Held (shared) by each large file being applied in the background, and
    /// (exclusively) by a standby's scan: a new session's full sync never starts while
    /// an old session's large file may still be put in place.
    pub applying: Arc<tokio::sync::RwLock<()>>,
    /// The epoch at which this node last handed the active role over with everything
    /// acknowledged by the new active (0: never). If the new active fences it before
    /// its own demotion is through, it has nothing to keep in its conflicts area.
    pub handed_over: Arc<std::sync::atomic::AtomicU64>,
    /// Standby: the block lists of large files, kept between deltas.
    pub blocks: Arc<Mutex<crate::patch::BlockCache>>,
    /// Standby: where in-place updates of large files are journaled.
    pub journal: crate::patch::Journal,
    /// Standby: its sessions with an active, numbered as they get past hello.
    pub followings: Arc<Followings>,
    /// Standby: large files whose stream the active gave up on ([`GaveUp`]) and that
    /// no later version has reached since, under the names the active gave them since.
    /// A rename of one may find nothing to move here (it was new), a hard link to one
    /// nothing to name: the change that made the active give up ships it, under one of
    /// its names, and the others are made then.
    pub gave_up: Arc<Mutex<GaveUpNames>>,
    /// Standby: large files of the active put in place at upstream paths, with their
    /// content hashes, for the session's outbox to learn as the base of local writes
    /// (filled under the apply turn, so before any local write made after).
    pub placed_upstream: Arc<Mutex<Vec<PlacedUpstream>>>,
    /// The term of the session this copy serves, set as the session begins
    /// ([`RoleCell::term`]): a standby's changes of the volume hold it, so none that
    /// an old session carries on with lands after a change of role, even one handed
    /// back (a copy made outside a session has the term of its making).
    pub term: Term,
}

/// A large file put in place at an upstream path, and its content hash.
pub type PlacedUpstream = (RelPath, Option<u128>);

/// Standby: the names of the large files whose stream the active gave up on
/// ([`VolumeLink::gave_up`]), each with the number of its file: the names the active
/// linked to one while this node had no version of it share its number.
#[derive(Debug, Default)]
pub struct GaveUpNames {
    names: std::collections::BTreeMap<RelPath, u64>,
    /// The number the next file gets.
    next: u64,
}

impl GaveUpNames {
    /// `path` is a file whose stream the active gave up on (again, maybe: a name
    /// listed keeps its file, and the names linked to it). At most [`GAVE_UP_KEPT`]
    /// names are listed: past that a new one is not, and a rename of it, or a link to
    /// it, is refused (the manifest comparison the refusal starts repairs it, and the
    /// scan for it empties the list).
    fn add(&mut self, path: RelPath) {
        if self.names.contains_key(&path) || self.names.len() >= GAVE_UP_KEPT {
            return;
        }
        self.next += 1;
        self.names.insert(path, self.next);
    }

    fn contains(&self, path: &RelPath) -> bool {
        self.names.contains_key(path)
    }

    /// `path` names something else now; with `below`, what lies under it too (it was
    /// deleted).
    fn forget(&mut self, path: &RelPath, below: bool) {
        if below {
            self.names.retain(|p, _| !p.starts_with(path));
        } else {
            self.names.remove(path);
        }
    }

    /// A rename moves the names at or below its source to its target; without an
    /// exchange, those at or below the target were replaced.
    fn rename(&mut self, from: &RelPath, to: &RelPath, exchange: bool) {
        crate::path::rename_in(&mut self.names, from, to, exchange, true);
    }

    /// `path` (which was deleted, with what lay below it) became another name of the
    /// file named `existing`. False if `existing` is not listed, or the list is full
    /// (see [`GaveUpNames::add`]).
    fn join(&mut self, path: RelPath, existing: &RelPath) -> bool {
        self.forget(&path, true);
        match self.names.get(existing) {
            Some(&file) if self.names.len() < GAVE_UP_KEPT => {
                self.names.insert(path, file);
                true
            }
            _ => false,
        }
    }

    /// The names of the file named `path` other than `path`.
    fn others(&self, path: &RelPath) -> Vec<RelPath> {
        let Some(&file) = self.names.get(path) else {
            return Vec::new();
        };
        self.names
            .iter()
            .filter(|(p, f)| **f == file && *p != path)
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// A version of the file named `path` arrived: forgets all its names, giving back
    /// those other than `path`.
    fn take_others(&mut self, path: &RelPath) -> Vec<RelPath> {
        let others = self.others(path);
        self.names.remove(path);
        for other in &others {
            self.names.remove(other);
        }
        others
    }

    fn clear(&mut self) {
        self.names.clear();
    }
}

/// Standby: the sessions of a volume with an active, numbered as they get past hello
/// (one refused there, say by a stale active, never counts). After the active
/// restarts, its new session runs while the old one lingers until the connection's
/// idle timeout; the old one ending must leave the new one's records alone.
#[derive(Debug)]
pub struct Followings {
    newest: std::sync::atomic::AtomicU64,
    /// Held while a session checks that it is the newest and records the fitness, so
    /// an old session's record never lands after a newer one's.
    recording: tokio::sync::Mutex<()>,
    /// Told the number of each session that gets past hello.
    started: tokio::sync::watch::Sender<u64>,
    /// Held by a session that takes local writes of `direction = "both"` paths from
    /// past hello until its end has counted its unconfirmed ones (and armed the
    /// conflicts area for them): a newer session knows only then whether its full
    /// sync must keep what it replaces.
    upstream: Arc<tokio::sync::Mutex<()>>,
}

impl Default for Followings {
    fn default() -> Followings {
        Followings {
            newest: Default::default(),
            recording: Default::default(),
            started: tokio::sync::watch::Sender::new(0),
            upstream: Default::default(),
        }
    }
}

impl Followings {
    /// A session got past hello: its number.
    fn start(&self) -> u64 {
        let following = self
            .newest
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            + 1;
        self.started.send_replace(following);
        following
    }

    fn is_newest(&self, following: u64) -> bool {
        self.newest.load(std::sync::atomic::Ordering::Acquire) == following
    }

    /// How many sessions with an active have got past hello so far.
    pub fn started(&self) -> u64 {
        self.newest.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Saves `record` in `path` as this node's fitness (a demotion's), unless a session
    /// with an active started after [`Followings::started`] gave `since`: it follows a
    /// newer order, and what it records stands. Whether it was saved.
    pub async fn record_unless_followed(
        &self,
        since: u64,
        record: SyncRecord,
        path: std::path::PathBuf,
    ) -> std::io::Result<bool> {
        let _recording = self.recording.lock().await;
        if self.started() != since {
            return Ok(false);
        }
        tokio::task::spawn_blocking(move || record.store(&path))
            .await
            .map_err(std::io::Error::other)??;
        Ok(true)
    }
}

/// What a standby knows of its fitness to take over, kept across restarts in the
/// state directory: whether its last full sync completed and every priority-1 path
/// sent since is applied, as of the last message from the active.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SyncRecord {
    /// Fit to take over.
    pub synced: bool,
    /// When this was recorded (seconds since the Unix epoch).
    pub at: u64,
    /// The epoch of the active it followed.
    pub epoch: u64,
    /// Priority-1 paths not known to be in sync.
    pub priority1_pending: Vec<String>,
    /// More of them, not named.
    pub priority1_more: u64,
    /// Set when the record was written as this node stopped being the active (the
    /// demotion's reason: `"manual"` or `"health"`), not by a full sync: the node has
    /// every change it made as the active. Cleared by its next full sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demoted: Option<String>,
    /// Streamed changes this node refused that no full sync has repaired yet.
    #[serde(default)]
    pub refused: u64,
    /// The last change it refused, as "path: reason" (with `refused`).
    #[serde(default)]
    pub last_refused: Option<String>,
}

impl SyncRecord {
    /// The record in `path`; `None` if there is none (this node never synced).
    pub fn load(path: &Path) -> Result<Option<SyncRecord>, String> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Saves it durably (a crash leaves the old or the new record).
    pub fn store(&self, path: &Path) -> std::io::Result<()> {
        crate::durable::write_json(path, self)
    }
}

/// The answer to `twinfs sync` (and a demotion's flush) from a standby that refused
/// a change it was sent: it lacks that until a full sync repairs it.
fn refused_answer(session: &Session) -> String {
    let what = match session.refusal() {
        Some((path, why)) => format!("it refused {path}: {why}"),
        None => "it refused a change".to_owned(),
    };
    format!("{what} (a full sync repairs it once it can take it: twinfs sync --full)")
}

/// Standby: saves what session number `following` knows of this node's fitness to
/// take over, unless a newer session of the volume has started.
async fn record_fitness(volume: &VolumeLink, session: &Session, following: u64) {
    let _recording = volume.followings.recording.lock().await;
    // (A session whose term is over speaks of an order that is gone: a role change
    // drops the record, and it is not made again.)
    let over = || volume.roles.term() != volume.term;
    if !volume.followings.is_newest(following) || over() {
        return;
    }
    let (pending, more) = session.priority1_pending();
    let refused = session.unrepaired();
    let record = SyncRecord {
        synced: session.fit(),
        at: unix_now(),
        epoch: volume.roles.get().epoch,
        priority1_pending: pending.iter().map(|p| p.to_string()).collect(),
        priority1_more: more,
        demoted: None,
        refused,
        last_refused: (refused > 0)
            .then(|| session.rejected_paths().last())
            .flatten()
            .map(|(p, why)| format!("{p}: {why}")),
    };
    let path = volume.sync_file.clone();
    let stored = tokio::task::spawn_blocking(move || record.store(&path)).await;
    if !matches!(stored, Ok(Ok(()))) {
        tracing::error!(volume = %volume.name, file = %volume.sync_file.display(),
            "cannot record the sync state; promotion will see an older one");
    }
    // The term ended while the record was being saved, maybe after the role change
    // dropped the record: dropped again ([`RoleCell`] drops it both before and after
    // the term changes).
    if over() {
        if let Err(e) = std::fs::remove_file(&volume.sync_file) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(volume = %volume.name, error = %e, "cannot drop the sync record");
            }
        }
    }
}

/// A request to every session in which this node is active for the volume; each
/// answers on `reply` with the peer's name.
#[derive(Clone, Debug)]
pub enum Command {
    /// Ship these paths now (or, with `full`, compare manifests and send what differs)
    /// and answer once the standby has acknowledged it.
    Sync {
        /// The paths (ignored with `full`).
        paths: Vec<RelPath>,
        /// A full sync.
        full: bool,
        /// Where the answer goes.
        reply: mpsc::Sender<(String, Result<(), String>)>,
    },
    /// Ship what waits for a later time now (`interval` paths waiting for their
    /// interval, `once` paths changed since the last full sync) and answer once the
    /// standby has acknowledged everything: `twinfs demote`, before the node steps
    /// down, so that a standby taking over lacks nothing this node wrote.
    Flush {
        /// Where the answer goes.
        reply: mpsc::Sender<(String, Result<(), String>)>,
    },
    /// Hash every file on both sides now (no cache) and answer with the paths that
    /// differ (content or metadata), `never` paths left out.
    Verify {
        /// Where the answer goes.
        reply: mpsc::Sender<(String, Result<Vec<String>, String>)>,
    },
}

/// A `twinfs verify` waiting for the standby's manifest.
struct Verifying {
    id: u64,
    entries: Vec<manifest::Entry>,
    reply: mpsc::Sender<(String, Result<Vec<String>, String>)>,
}

/// Where the standby's session answers a handover request: the epoch of the active
/// that handed over, or why it did not.
pub type HandoverReply = tokio::sync::oneshot::Sender<Result<u64, String>>;

/// Where a standby's session with its active takes handover requests, while it runs.
pub type HandoverSlot = Arc<Mutex<Option<mpsc::Sender<HandoverReply>>>>;

/// How long an active that is handing over waits for its standby to acknowledge
/// everything before it takes local writes again.
const HANDOVER_DRAIN: Duration = Duration::from_secs(30);

/// Asks the active this standby follows for `volume` to hand over; `None` when no
/// session with an active runs (unreachable), else its answer within `wait`.
pub async fn request_handover(slot: &HandoverSlot, wait: Duration) -> Option<Result<u64, String>> {
    let asker = slot.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    asker.send(tx).await.ok()?;
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(answer)) => Some(answer),
        // The session ended without an answer: the active is gone.
        Ok(Err(_)) => None,
        Err(_) => Some(Err(format!(
            "the active did not hand over within {wait:?} (should it still do so, it becomes a \
             standby and no node is active: see `twinfs status` on both nodes)"
        ))),
    }
}

/// Another node.
#[derive(Clone, Debug)]
pub struct Peer {
    /// Its name, for logs.
    pub name: String,
    /// `host:port`.
    pub address: String,
    /// Its pinned certificate hash.
    pub id: PeerId,
    /// A witness: asked only by automatic failover, never dialled for a session.
    pub witness: bool,
}

/// What `twinfs status` shows for one volume and one peer.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerStatus {
    /// The volume.
    pub volume: String,
    /// The peer's name.
    pub peer: String,
    /// The peer's address as configured (or as seen, for an incoming connection).
    pub address: String,
    /// Whether a session with it runs now.
    pub connected: bool,
    /// The session that set `connected` (an old session ending after a new one started
    /// must not mark the peer disconnected).
    #[serde(skip)]
    pub session: u64,
    /// Its role in the last session: `active` (this node follows it) or `standby`.
    #[serde(default)]
    pub peer_role: Option<Role>,
    /// Seconds since the epoch of the last message from it.
    pub last_contact: Option<u64>,
    /// When the last message from it arrived (automatic failover measures silence by
    /// it).
    #[serde(skip)]
    pub heard: Option<std::time::Instant>,
    /// "never", "in progress" or "done".
    pub full_sync: String,
    /// Ops of the current or last full sync.
    pub full_sync_ops: u64,
    /// How many of them are applied on the standby.
    pub full_sync_ops_done: u64,
    /// Active: bytes of file content of the current or last full sync.
    pub full_sync_bytes: u64,
    /// Active: how many of them the standby has applied.
    pub full_sync_bytes_done: u64,
    /// Progress of the current or last full sync in percent (by bytes where the active
    /// knows them, else by ops).
    pub full_sync_percent: u8,
    /// Seconds since the epoch when the last full sync completed.
    pub full_sync_done: Option<u64>,
    /// Ops sent (active) or applied (standby) in this session.
    pub ops: u64,
    /// Highest op acknowledged (active) or applied (standby).
    pub acked: u64,
    /// Changes not yet applied on the standby: queued, or sent and not yet acked
    /// (active side).
    pub pending: u64,
    /// Bytes of file content sent and not yet acked (active side; changes still queued
    /// are counted in `pending` only, their size is known once they are read).
    pub pending_bytes: u64,
    /// Ops the standby refused (unsafe paths, disk errors).
    pub rejected: u64,
    /// A `sync` write timed out waiting for this standby, and it has not caught up
    /// since.
    pub out_of_sync: bool,
    /// Since when (seconds since the Unix epoch) it has been out of sync.
    #[serde(default)]
    pub out_of_sync_since: Option<u64>,
    /// The connection's current round-trip time estimate, in microseconds.
    #[serde(default)]
    pub rtt_us: Option<u64>,
    /// The last paths refused by the standby, as "path: reason".
    pub rejected_paths: Vec<String>,
    /// Active: the standby refused a change that no full sync has repaired yet: it
    /// lacks that change (`rejected_paths` says which).
    #[serde(default)]
    pub refused_unrepaired: bool,
    /// Bytes sent and received in this session.
    pub bytes_sent: u64,
    /// Bytes received.
    pub bytes_received: u64,
}

/// The status of every (volume, peer) pair, shared with the daemon.
pub type Board = Arc<Mutex<std::collections::BTreeMap<(String, String), PeerStatus>>>;

/// What a node answers a probe with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeReply {
    /// Its name (`[node] name`).
    pub node: String,
    /// How it sees each of its volumes.
    pub volumes: Vec<VolumeView>,
    /// Whether it grants the vote asked for.
    pub granted: bool,
}

/// How this node answers a peer deciding on an automatic failover: called with the
/// asking peer's name and the volume it asks this node's vote for, if any.
pub type Prober = Arc<dyn Fn(&str, Option<&str>) -> ProbeReply + Send + Sync>;

/// Asks `peer` how it sees its volumes, and for its vote for `vote` (a volume this
/// node would become active for), on a connection of its own; `None` when it cannot
/// be reached or does not answer within `wait`.
pub async fn probe(
    endpoint: &quinn::Endpoint,
    peer: &Peer,
    vote: Option<&str>,
    wait: Duration,
) -> Option<ProbeReply> {
    let asked = async {
        let addr = resolve(&peer.address).await?;
        let (connection, _) = transport::connect(endpoint, addr, peer.id).await.ok()?;
        let answer = async {
            let (send, mut recv) = connection.open_bi().await.ok()?;
            let mut send = Control::in_place(send);
            send.write(&Message::Probe {
                version: crate::protocol::VERSION,
                vote: vote.map(str::to_owned),
            })
            .await?;
            send.finish();
            let bytes = transport::read_frame(&mut recv, MAX_MESSAGE).await.ok()??;
            match Message::decode(&bytes).ok()? {
                Message::ProbeAnswer {
                    node,
                    volumes,
                    granted,
                } => Some(ProbeReply {
                    node,
                    volumes,
                    granted,
                }),
                _ => None,
            }
        }
        .await;
        connection.close(0u32.into(), b"probed");
        answer
    };
    tokio::time::timeout(wait, asked).await.ok()?
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Who a session talks to, and where its status goes.
#[derive(Clone)]
struct Link {
    peer: String,
    address: String,
    board: Board,
    /// The connection, for the streams that carry large files.
    connection: Option<quinn::Connection>,
    /// Standby side: large files arriving on their own streams, by op number.
    streams: Option<Arc<Streams>>,
    /// Whether this node stays active when it meets this peer active at the same epoch.
    wins_ties: bool,
}

/// Files over this size travel on their own stream instead of inside their op.
const INLINE_MAX: u64 = 1 << 20;

/// How long a standby waits for the stream of a large file its op announced.
const STREAM_WAIT: Duration = Duration::from_secs(60);

/// The unidirectional streams of one connection that carry large files (blocks one
/// way, block lists the other), keyed by their session's [`stream_tag`] and the op
/// number they start with.
///
/// A stream nobody takes must be stopped, not kept: its unread bytes hold their share
/// of the connection's flow-control window, and a few such streams would leave the
/// peer unable to send anything on the connection.
#[derive(Default)]
pub struct Streams {
    pending: Mutex<PendingStreams>,
    arrived: tokio::sync::Notify,
}

#[derive(Default)]
struct PendingStreams {
    /// Arrived, not taken yet, with when each came.
    waiting: std::collections::HashMap<(u64, u64), (std::time::Instant, quinn::RecvStream)>,
    /// Given up on (the wait for them ended), with when: stopped as they come.
    abandoned: std::collections::HashMap<(u64, u64), std::time::Instant>,
}

/// Streams waiting to be taken before the oldest are stopped (their op was refused or
/// its session ended).
const STREAMS_KEPT: usize = 1024;

/// A stream not taken this long after it came is stopped: every take waits less.
const STREAM_KEPT_FOR: Duration = BLOCK_LIST_WAIT;

/// How long a stream given up on is remembered, to stop it should it still come.
const ABANDONED_KEPT_FOR: Duration = Duration::from_secs(600);

impl PendingStreams {
    /// Stops the streams kept too long and forgets old abandoned keys.
    fn expire(&mut self, now: std::time::Instant) {
        self.waiting.retain(|_, (at, recv)| {
            let keep = now.duration_since(*at) < STREAM_KEPT_FOR;
            if !keep {
                let _ = recv.stop(STREAM_UNWANTED);
            }
            keep
        });
        self.abandoned
            .retain(|_, at| now.duration_since(*at) < ABANDONED_KEPT_FOR);
        if self.abandoned.len() > STREAMS_KEPT {
            self.abandoned.clear();
        }
    }
}

/// The error code a stream nobody takes is stopped with.
const STREAM_UNWANTED: quinn::VarInt = quinn::VarInt::from_u32(1);

/// Tells apart the large-file streams of the sessions sharing a connection: those of
/// other volumes, and those of an earlier session of the same volume, whose op numbers
/// the new one uses again while its detached tasks may still wait for their streams.
/// `session` is the session's bi-stream, the same on both ends and never reused on a
/// connection.
fn stream_tag(volume: &str, session: quinn::StreamId) -> u64 {
    let mut key = volume.as_bytes().to_vec();
    key.extend_from_slice(&u64::from(session).to_be_bytes());
    xxhash_rust::xxh3::xxh3_64(&key)
}

/// The 16-byte head of a large-file stream of the session tagged `tag`.
fn stream_header(tag: u64, seq: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&tag.to_be_bytes());
    h[8..].copy_from_slice(&seq.to_be_bytes());
    h
}

impl Streams {
    /// Accepts the connection's unidirectional streams until it closes.
    async fn accept(self: Arc<Self>, connection: quinn::Connection) {
        while let Ok(mut recv) = connection.accept_uni().await {
            let streams = self.clone();
            tokio::spawn(async move {
                let mut header = [0u8; 16];
                if recv.read_exact(&mut header).await.is_ok() {
                    let mut tag = [0u8; 8];
                    tag.copy_from_slice(&header[..8]);
                    let mut seq = [0u8; 8];
                    seq.copy_from_slice(&header[8..]);
                    let key = (u64::from_be_bytes(tag), u64::from_be_bytes(seq));
                    let now = std::time::Instant::now();
                    let mut pending = streams.pending.lock().unwrap_or_else(|e| e.into_inner());
                    pending.expire(now);
                    if pending.abandoned.remove(&key).is_some() {
                        let _ = recv.stop(STREAM_UNWANTED);
                        return;
                    }
                    if pending.waiting.len() >= STREAMS_KEPT {
                        if let Some(oldest) = pending.waiting.keys().min_by_key(|k| k.1).copied() {
                            if let Some((_, mut old)) = pending.waiting.remove(&oldest) {
                                let _ = old.stop(STREAM_UNWANTED);
                            }
                        }
                    }
                    pending.waiting.insert(key, (now, recv));
                    drop(pending);
                    streams.arrived.notify_waiters();
                }
            });
        }
    }

    /// The stream of op `seq` of the session tagged `tag`, once it has arrived, waiting
    /// up to `wait`. Not there by then: it is stopped if it still comes.
    async fn take(&self, tag: u64, seq: u64, wait: Duration) -> Option<quinn::RecvStream> {
        let key = (tag, seq);
        let waited = async {
            loop {
                let notified = self.arrived.notified();
                if let Some((_, s)) = self
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .waiting
                    .remove(&key)
                {
                    return s;
                }
                notified.await;
            }
        };
        let taken = tokio::time::timeout(wait, waited).await.ok();
        if taken.is_none() {
            let now = std::time::Instant::now();
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            match pending.waiting.remove(&key) {
                // Came just as the wait ended: too late all the same.
                Some((_, mut late)) => {
                    let _ = late.stop(STREAM_UNWANTED);
                }
                None => {
                    pending.abandoned.insert(key, now);
                }
            }
            pending.expire(now);
        }
        taken
    }
}

impl Link {
    fn update(&self, volume: &str, f: impl FnOnce(&mut PeerStatus)) {
        let mut board = self.board.lock().unwrap_or_else(|e| e.into_inner());
        let entry = board
            .entry((volume.to_owned(), self.peer.clone()))
            .or_insert_with(|| PeerStatus {
                volume: volume.to_owned(),
                peer: self.peer.clone(),
                full_sync: "never".into(),
                // (None runs yet: as documented, 100.)
                full_sync_percent: 100,
                ..PeerStatus::default()
            });
        entry.address = self.address.clone();
        f(entry);
    }
}

/// A session's copy of the volume, in the term now ([`VolumeLink::term`]), and its
/// settings: the term is read first, so [`run_session`] sees any role change since,
/// and the settings never come from a later term than the copy's.
fn session_config(volume: &VolumeLink, link: &Link) -> (VolumeLink, SessionConfig) {
    let mut volume = volume.clone();
    volume.term = volume.roles.term();
    let now = volume.roles.get();
    let config = SessionConfig {
        volume: volume.name.clone(),
        role: now.role,
        epoch: now.epoch,
        wins_ties: link.wins_ties,
        policies: volume.policies.clone(),
        heartbeat: HEARTBEAT,
        // QUIC keep-alives find a dead peer within its 10 s idle timeout; this one only
        // catches a peer whose session stalls (a standby busy applying a large file
        // sends nothing meanwhile).
        peer_timeout: PEER_TIMEOUT,
        stall_timeout: Duration::from_secs(120),
        max_in_flight: 4096,
        max_queue: 100_000,
    };
    (volume, config)
}

/// How often a session sends a heartbeat when it has nothing else to send: a peer
/// that says nothing for several of these is likely gone, although its connection
/// lasts until QUIC's idle timeout.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long a session waits without hearing its peer; a large file's blocks stream
/// that brings nothing for as long ends the same way.
const PEER_TIMEOUT: Duration = Duration::from_secs(120);

/// How often the active sends a [`delta::keep_alive_record`] while it reads a stretch
/// of a large file that the standby already has: well within [`PEER_TIMEOUT`] and the
/// stall timeout.
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(10);

/// Starts the driver on the current tokio runtime; `board` receives the status of
/// every session, `own` is this node's ID, and `roles` changes whenever a volume of
/// this node changes role (each peer is dialled while any volume is active).
pub fn start(
    endpoint: quinn::Endpoint,
    own: PeerId,
    volumes: Vec<VolumeLink>,
    peers: Vec<Peer>,
    board: Board,
    roles: watch::Receiver<u64>,
    prober: Prober,
) {
    let volumes = Arc::new(volumes);
    let peers = Arc::new(peers);
    let bells: Bells = Arc::new(
        peers
            .iter()
            .map(|p| (p.id, Arc::new(tokio::sync::Notify::new())))
            .collect(),
    );
    tokio::spawn(accept_loop(
        endpoint.clone(),
        own,
        volumes.clone(),
        peers.clone(),
        board.clone(),
        prober,
        bells.clone(),
    ));
    // A standby that starts knocks at its peers' doors: an active waiting to dial it
    // again (its last attempt's packets were lost while this node was down) dials at
    // once instead of after its next retransmission.
    if volumes.iter().any(|v| v.roles.get().role == Role::Standby) {
        for peer in peers.iter().filter(|p| !p.witness) {
            tokio::spawn(knock(endpoint.clone(), peer.clone()));
        }
    }
    for peer in peers.iter().filter(|p| !p.witness) {
        let bell = bells.get(&peer.id).cloned().unwrap_or_default();
        let link = Link {
            peer: peer.name.clone(),
            address: peer.address.clone(),
            board: board.clone(),
            connection: None,
            streams: None,
            wins_ties: own < peer.id,
        };
        tokio::spawn(dial_loop(
            endpoint.clone(),
            volumes.clone(),
            peer.clone(),
            link,
            roles.clone(),
            bell,
        ));
    }
}

/// Per peer, rung when it connects to this node: its dial loop dials at once.
type Bells = Arc<std::collections::HashMap<PeerId, Arc<tokio::sync::Notify>>>;

/// Connects to `peer` once and closes at once: a peer that is active dials this node
/// right away (see `accept_loop`).
async fn knock(endpoint: quinn::Endpoint, peer: Peer) {
    let Some(addr) = resolve(&peer.address).await else {
        return;
    };
    let attempt = tokio::time::timeout(
        CONNECT_ATTEMPT,
        transport::connect(&endpoint, addr, peer.id),
    );
    if let Ok(Ok((connection, _))) = attempt.await {
        tracing::debug!(peer = %peer.name, %addr, "knocked");
        connection.close(0u32.into(), b"knock");
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    own: PeerId,
    volumes: Arc<Vec<VolumeLink>>,
    peers: Arc<Vec<Peer>>,
    board: Board,
    prober: Prober,
    bells: Bells,
) {
    // The addresses the peers connect from (resolved once: a name whose address
    // changes is still let in, within the limit of all).
    let mut addresses = Vec::new();
    for peer in peers.iter() {
        let lookup = tokio::net::lookup_host(&peer.address);
        match tokio::time::timeout(Duration::from_secs(2), lookup).await {
            Ok(Ok(found)) => addresses.extend(found.map(|a| a.ip())),
            Ok(Err(e)) => tracing::debug!(peer = %peer.name, address = %peer.address, error = %e,
                "cannot resolve a peer's address"),
            Err(_) => tracing::debug!(peer = %peer.name, address = %peer.address,
                "no answer resolving a peer's address"),
        }
    }
    let mut listener = transport::Listener::with_peers(endpoint, addresses);
    while let Some(accepted) = listener.accept().await {
        let Ok((connection, id)) = accepted else {
            continue;
        };
        // The peer is up (it may have just started): if this node is waiting to dial
        // it, it dials now.
        if let Some(bell) = bells.get(&id) {
            bell.notify_one();
        }
        let peer = peers.iter().find(|p| p.id == id);
        let name = peer.map_or_else(|| "unknown".into(), |p| p.name.clone());
        // A witness only asks the failover probe: it never replicates a volume.
        let witness = peer.is_some_and(|p| p.witness);
        let streams = Arc::new(Streams::default());
        tokio::spawn(streams.clone().accept(connection.clone()));
        let link = Link {
            peer: name,
            address: connection.remote_address().to_string(),
            board: board.clone(),
            connection: Some(connection.clone()),
            streams: Some(streams),
            wins_ties: own < id,
        };
        let volumes = volumes.clone();
        let prober = prober.clone();
        tokio::spawn(async move {
            while let Ok((send, recv)) = connection.accept_bi().await {
                tokio::spawn(peer_stream(
                    volumes.clone(),
                    send,
                    recv,
                    link.clone(),
                    prober.clone(),
                    witness,
                ));
            }
        });
    }
}

async fn resolve(address: &str) -> Option<SocketAddr> {
    tokio::net::lookup_host(address).await.ok()?.next()
}

fn active_volumes(volumes: &[VolumeLink]) -> Vec<VolumeLink> {
    volumes
        .iter()
        .filter(|v| v.roles.get().role == Role::Active)
        .cloned()
        .collect()
}

/// Dials `peer` while any volume of this node is active, and runs a session for each
/// active volume; starts over whenever a volume changes role.
async fn dial_loop(
    endpoint: quinn::Endpoint,
    volumes: Arc<Vec<VolumeLink>>,
    peer: Peer,
    link: Link,
    mut roles: watch::Receiver<u64>,
    bell: Arc<tokio::sync::Notify>,
) {
    loop {
        roles.borrow_and_update();
        let active = active_volumes(&volumes);
        if active.is_empty() {
            if roles.changed().await.is_err() {
                return;
            }
            continue;
        }
        let Some(addr) = resolve(&peer.address).await else {
            tracing::warn!(peer = %peer.name, address = %peer.address, "cannot resolve");
            tokio::time::sleep(REDIAL).await;
            continue;
        };
        let attempt = tokio::time::timeout(
            CONNECT_ATTEMPT,
            transport::connect(&endpoint, addr, peer.id),
        );
        let connected = tokio::select! {
            attempt = attempt => match attempt {
                Ok(result) => result,
                Err(_) => {
                    tracing::debug!(peer = %peer.name, %addr, "no answer; dialling again");
                    continue;
                }
            },
            _ = bell.notified() => {
                tracing::debug!(peer = %peer.name, %addr, "the peer knocked; dialling again at once");
                continue;
            }
        };
        match connected {
            Ok((connection, _)) => {
                tracing::info!(peer = %peer.name, %addr, "connected");
                // The standby's block lists for large files come back on streams of
                // their own.
                let streams = Arc::new(Streams::default());
                let acceptor = tokio::spawn(streams.clone().accept(connection.clone()));
                let link = Link {
                    connection: Some(connection.clone()),
                    streams: Some(streams),
                    ..link.clone()
                };
                let mut tasks = tokio::task::JoinSet::new();
                for volume in active {
                    tasks.spawn(volume_session(
                        volume,
                        connection.clone(),
                        link.clone(),
                        Duration::ZERO,
                    ));
                }
                // A volume whose session ends while the connection stays up (the peer
                // closed its stream, a bad frame, a peer timeout) gets a new stream,
                // after a pause that grows while its sessions keep ending at once.
                let mut pauses = std::collections::HashMap::<String, Duration>::new();
                let role_changed = loop {
                    let ended = tokio::select! {
                        ended = tasks.join_next() => ended,
                        _ = roles.changed() => break true,
                    };
                    let Some(ended) = ended else { break false };
                    let Ok((volume, lasted)) = ended else {
                        continue;
                    };
                    if connection.close_reason().is_some()
                        || volume.roles.get().role != Role::Active
                    {
                        continue;
                    }
                    let pause = pauses.entry(volume.name.clone()).or_insert(Duration::ZERO);
                    *pause = match lasted {
                        Some(lasted) if lasted >= REOPEN_MAX => REDIAL,
                        _ => (*pause * 2).clamp(REDIAL, REOPEN_MAX),
                    };
                    tracing::info!(volume = %volume.name, peer = %peer.name, pause = ?*pause,
                        "the volume's session ended; opening a new stream");
                    tasks.spawn(volume_session(
                        volume,
                        connection.clone(),
                        link.clone(),
                        *pause,
                    ));
                };
                // Closing the connection ends the sessions still running (a role
                // changed: they start over in the new roles); each cleans up after
                // itself.
                connection.close(0u32.into(), b"sessions ended");
                while tasks.join_next().await.is_some() {}
                acceptor.abort();
                tracing::info!(peer = %peer.name, "disconnected");
                if role_changed {
                    continue;
                }
            }
            Err(e) => tracing::debug!(peer = %peer.name, error = %e, "cannot connect"),
        }
        tokio::select! {
            _ = tokio::time::sleep(REDIAL) => {}
            _ = roles.changed() => {}
            _ = bell.notified() => {}
        }
    }
}

/// Active: after `pause` (unless the connection closes first), opens a stream for
/// `volume` on `connection` and runs its session there. Returns the volume and how
/// long its session ran (`None`: none started).
async fn volume_session(
    volume: VolumeLink,
    connection: quinn::Connection,
    link: Link,
    pause: Duration,
) -> (VolumeLink, Option<Duration>) {
    tokio::select! {
        _ = tokio::time::sleep(pause) => {}
        _ = connection.closed() => return (volume, None),
    }
    match connection.open_bi().await {
        Ok((send, recv)) => {
            let started = std::time::Instant::now();
            let (copy, config) = session_config(&volume, &link);
            let session = Session::new(config, started);
            run_session(copy, session, send, recv, None, link).await;
            (volume, Some(started.elapsed()))
        }
        Err(e) => {
            tracing::warn!(peer = %link.peer, volume = %volume.name, error = %e, "cannot open a stream");
            (volume, None)
        }
    }
}

/// A stream a peer opened for a volume it is active for: its first message names the
/// volume. Served in this node's role, whatever it is: two actives meeting find out
/// which one steps down. A `witness` may only probe.
async fn peer_stream(
    volumes: Arc<Vec<VolumeLink>>,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    link: Link,
    prober: Prober,
    witness: bool,
) {
    let first = match transport::read_frame(&mut recv, MAX_MESSAGE).await {
        Ok(Some(bytes)) => Message::decode(&bytes),
        _ => return,
    };
    let hello = match first {
        Ok(Message::Hello { volume, .. }) if witness => {
            tracing::warn!(peer = %link.peer, %volume, "a witness offers a session; refused");
            return;
        }
        Ok(m @ Message::Hello { .. }) => m,
        Ok(Message::Probe { version, vote }) => {
            if version != crate::protocol::VERSION {
                tracing::warn!(peer = %link.peer, version, "probe of another protocol version; not answered");
                return;
            }
            let ProbeReply {
                node,
                volumes,
                granted,
            } = prober(&link.peer, vote.as_deref());
            let answer = Message::ProbeAnswer {
                node,
                volumes,
                granted,
            };
            let mut send = Control::in_place(send);
            if send.write(&answer).await.is_some() {
                send.finish_read(Duration::from_secs(2)).await;
            }
            return;
        }
        Ok(other) => {
            tracing::warn!(message = ?other, "stream did not start with a hello");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "bad first message; closing the stream");
            return;
        }
    };
    let Message::Hello { volume: name, .. } = &hello else {
        return;
    };
    let Some(volume) = volumes.iter().find(|v| &v.name == name) else {
        tracing::warn!(volume = %name, "peer offers a volume this node does not have");
        return;
    };
    let (copy, config) = session_config(volume, &link);
    let session = Session::new(config, std::time::Instant::now());
    run_session(copy, session, send, recv, Some(hello), link).await;
}

/// The peer's messages, as the session loop takes them. The reader task passes on
/// frames still encoded (a part of a manifest is about 80 KB so, 330 KB decoded)
/// and they are decoded as they are taken: when they were decoded as read, 64 frames
/// queued while the active scanned its own volume held a whole 100,000-entry manifest
/// of the standby's decoded (about 20 MiB) at the daemon's peak of memory.
struct Messages {
    rx: mpsc::Receiver<(Vec<u8>, tokio::sync::OwnedSemaphorePermit)>,
    broken: bool,
}

impl Messages {
    /// The next message; `None` once the stream has ended or a message could not be
    /// decoded (the session then ends, as for a bad frame).
    async fn recv(&mut self) -> Option<Message> {
        if self.broken {
            return None;
        }
        let (bytes, _room) = self.rx.recv().await?;
        self.decode(&bytes)
    }

    /// Whether a message is here, not taken yet.
    fn waiting(&self) -> bool {
        !self.broken && !self.rx.is_empty()
    }

    /// The next message if one is already here.
    fn try_recv(&mut self) -> Option<Message> {
        if self.broken {
            return None;
        }
        let (bytes, _room) = self.rx.try_recv().ok()?;
        self.decode(&bytes)
    }

    fn decode(&mut self, bytes: &[u8]) -> Option<Message> {
        match Message::decode(bytes) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(error = %e, "bad message; closing the session");
                self.broken = true;
                self.rx.close();
                None
            }
        }
    }
}

/// The bytes of frames a session's reader reads ahead of its loop (besides at most
/// [`READ_AHEAD_FRAMES`]): past them the peer's flow control holds it back, so a
/// peer's large frames (upstream writes of up to 16 MiB) cannot pile up in memory.
/// (64 ops of up to 1 MiB from an active fit.)
const READ_AHEAD: usize = 64 << 20;

/// The frames a session's reader reads ahead of its loop: more than a standby's
/// upstream writes unanswered ([`upstream::WINDOW_WRITES`]), so that the heartbeats
/// behind them still come through to an active that takes no messages for a while.
const READ_AHEAD_FRAMES: usize = 256;

/// Reads frames onto a channel (so the session loop can wait on several things
/// without losing half-read frames), counting the bytes in `received`. Ends on a bad
/// frame. A heartbeat that finds no place (the channel or its bytes full) is dropped,
/// counted: while its loop takes nothing (an active waiting to write), the peer's
/// heartbeats still say it is alive, and the frames behind them come through.
///
/// `heard` is called for what it reads, at most every [`HEARD_EVERY`], and as often
/// while a frame waits for a place: the peer is alive whether or not the loop takes
/// its messages yet (a standby's loop scanning its volume or making a batch durable
/// takes none for a while, and automatic failover must not take the active for
/// silent meanwhile).
fn spawn_reader(
    mut recv: quinn::RecvStream,
    received: Arc<std::sync::atomic::AtomicU64>,
    heard: impl Fn() + Send + 'static,
) -> Messages {
    let (tx, rx) = mpsc::channel(READ_AHEAD_FRAMES);
    let room = Arc::new(tokio::sync::Semaphore::new(READ_AHEAD));
    let heartbeat = Message::Heartbeat.encode().unwrap_or_default();
    tokio::spawn(async move {
        let mut told: Option<Instant> = None;
        loop {
            let bytes = match transport::read_frame(&mut recv, MAX_MESSAGE).await {
                Ok(Some(bytes)) => bytes,
                Ok(None) => return,
                // The peer went away (its daemon stopped, the network was cut): not
                // a bad frame, and said as such.
                Err(transport::TransportError::Read(
                    e @ (quinn::ReadError::ConnectionLost(_) | quinn::ReadError::Reset(_)),
                )) => {
                    tracing::info!(error = %e, "connection ended; closing the session");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "bad frame; closing the session");
                    return;
                }
            };
            received.fetch_add(bytes.len() as u64 + 4, std::sync::atomic::Ordering::Relaxed);
            if told.is_none_or(|t| t.elapsed() >= HEARD_EVERY) {
                heard();
                told = Some(Instant::now());
            }
            if bytes == heartbeat && (tx.capacity() == 0 || room.available_permits() == 0) {
                continue;
            }
            // (A frame larger than the room takes all of it.)
            let size = bytes.len().clamp(1, READ_AHEAD) as u32;
            let handed = async {
                let taken = room.clone().acquire_many_owned(size).await.ok()?;
                tx.send((bytes, taken)).await.ok()
            };
            tokio::pin!(handed);
            // While it waits for a place, what the peer sends next waits in its
            // stream (the peer's flow control holds it back): the peer is still
            // heard, as long as the connection lives (`heard` checks that).
            loop {
                tokio::select! {
                    done = &mut handed => match done {
                        Some(()) => break,
                        None => return,
                    },
                    () = tokio::time::sleep(HEARD_EVERY) => heard(),
                }
            }
        }
    });
    Messages { rx, broken: false }
}

/// How often a session's reader tells the status board that the peer was heard.
const HEARD_EVERY: Duration = Duration::from_millis(100);

async fn run_session(
    volume: VolumeLink,
    mut session: Session,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    first: Option<Message>,
    link: Link,
) {
    // The session ends when this node's term for the volume ends (its role changes,
    // even if handed back at once): followed from here, and a term that ended since
    // the session's settings were read ends it now.
    let mut roles = volume.roles.subscribe();
    if volume.roles.term() != volume.term || volume.term.role != session.role() {
        tracing::info!(volume = %volume.name, peer = %link.peer, "role changed; ending the session");
        return;
    }
    static SESSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let session_id = SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut messages = spawn_reader(recv, received.clone(), {
        let (link, name) = (link.clone(), volume.name.clone());
        move || {
            // (A dead peer's connection ends by QUIC's idle timeout, 10 s. The reader
            // of a session that a newer one replaced, still waiting on its loop,
            // tells nothing.)
            if link
                .connection
                .as_ref()
                .is_some_and(|c| c.close_reason().is_none())
            {
                link.update(&name, |s| {
                    if s.session == session_id {
                        s.last_contact = Some(unix_now());
                        s.heard = Some(std::time::Instant::now());
                    }
                })
            }
        }
    });
    let role = session.role();
    let tag = stream_tag(&volume.name, send.id());
    let counters = StreamCounters::default();
    // Anything from the peer, on this stream or a large file's, says it is alive.
    let from_peer = Silence {
        heard: [received.clone(), counters.received.clone()],
        limit: PEER_TIMEOUT,
    };
    let mut send = match role {
        Role::Active => Control::watched(send, from_peer.clone()),
        Role::Standby => Control::queued(send),
    };
    // A standby with `direction = "both"` rules follows its own change records too:
    // its local writes of those paths go upstream, to the active.
    let has_upstream = volume
        .policies
        .rules()
        .iter()
        .any(|r| r.policy().upstream());
    let mut outbox =
        (role == Role::Standby && has_upstream).then(|| Outbox::new(volume.policies.clone()));
    // Standby: whether the upstream paths take local writes (from the first complete
    // full sync of this session to its end).
    let mut upstream_live = false;
    // Active: the standby's upstream writes, taken one after the other by a worker.
    let (upstream_jobs, mut upstream_done) = match role {
        Role::Active => {
            let (jobs, done) = start_upstream_worker(volume.clone());
            (Some(jobs), Some(done))
        }
        Role::Standby => (None, None),
    };
    let mut changes =
        (role == Role::Active || outbox.is_some()).then(|| volume.changes.subscribe());
    // The highest change record handed to the session, and this session's place in
    // the volume's sync gate. Records issued before the subscription are covered by
    // the full sync this session starts with.
    let mut seen = volume.gate.last_issued();
    let mut sent = 0u64;
    let gate_id = volume.gate.register();
    let disconnected = move |s: &mut PeerStatus| {
        if s.session == session_id {
            s.connected = false;
        }
    };
    link.update(&volume.name, |s| {
        s.connected = true;
        s.session = session_id;
        s.last_contact = Some(unix_now());
        s.heard = Some(std::time::Instant::now());
        s.peer_role = Some(match role {
            Role::Active => Role::Standby,
            Role::Standby => Role::Active,
        });
    });
    if let Some(m) = first {
        session.on_message(m, std::time::Instant::now());
    }
    let mut batch = Batch::default();
    // A message for this loop that came while a batch was being gathered.
    let mut held: Option<Message> = None;
    let mut large = LargeApplies::new();
    // Full syncs finished, and those whose memory was given back since.
    let (mut synced, mut compacted) = (0u64, 0u64);
    // Full syncs of this session known to have completed, for status.
    let mut full_syncs_done = 0u64;
    // Standby after a fencing: keep this node's versions of what the winner's full
    // sync replaces or deletes, until that full sync is through.
    let mut keeping = role == Role::Standby && volume.conflicts.armed().is_some();
    // The full sync under way when keeping began (0: armed before this session): only
    // one asked for after it, completed with nothing refused, disarms the area (a
    // lag's resync, not a full sync that began before the lag).
    let mut keep_from = 0u64;
    let mut was_keeping = keeping;
    // Standby: what decided the fitness last recorded by this session (whether fit,
    // whether priority-1 paths are pending, refusals so far, phase): recorded again
    // when it changes. The pending list shrinks as files are applied without being
    // recorded each time; what is on disk is never less than what is pending.
    let mut recorded_fit = None;
    let mut refusing = false;
    // Standby: a promotion waiting for the active's handover. Active: since when this
    // node has been handing over (local writes refused, draining), and the last change
    // record issued when writes stopped, which must be seen and acknowledged first.
    let (ask_tx, mut asks) = mpsc::channel::<HandoverReply>(1);
    let mut waiting_handover: Option<HandoverReply> = None;
    let mut handing_over: Option<(std::time::Instant, u64)> = None;
    let mut stopping: Option<tokio::task::JoinHandle<()>> = None;
    // Active: writes taken again after a handover that timed out, in the blocking pool
    // (`resume_writes` waits for a role change under way, and for `stop_writes`, which
    // waits for writes that may wait for this loop's acks); a new stop waits for it.
    let mut resuming: Option<tokio::task::JoinHandle<()>> = None;
    // Active: `twinfs sync` requests waiting for the standby to catch up.
    let mut commands = (role == Role::Active).then(|| volume.commands.subscribe());
    let mut syncs: Vec<mpsc::Sender<(String, Result<(), String>)>> = Vec::new();
    // A `Command::Flush` not done yet: what waits for a later time ships once the
    // session streams (not in the middle of a full sync, whose end would not cover
    // changes made meanwhile).
    let mut flushing = false;
    // `twinfs verify` requests under way, in the order they were asked (the standby
    // answers them in turn): a second one while the first waits (a cron job's and an
    // administrator's, say) gets an answer of its own, not the first one's cut off.
    let mut verifying: Vec<Verifying> = Vec::new();
    let mut verify_id = 0;
    // Standby: this session's number among the volume's sessions with an active, taken
    // (with the handover slot) once the active's hello is accepted: a session refused
    // at hello (a stale active) must not displace the one that follows the real one.
    let mut following: Option<u64> = None;
    // Standby with upstream paths: [`Followings::upstream`], from past hello to the end.
    let mut upstream_slot: Option<tokio::sync::OwnedMutexGuard<()>> = None;
    let mut newer = volume.followings.started.subscribe();
    // Standby: the output that waits for large files being applied (an op on a related
    // path, or a scan). Meanwhile this loop goes on: it takes messages, its timers run,
    // heartbeats and acks go out; a wait of minutes must not look like a dead peer.
    let mut parked: Option<Output> = None;
    // Active: the bytes of large-file streams last seen, which count as progress.
    let mut streamed = 0u64;
    // The bytes the reader has counted, last seen.
    let mut heard = 0u64;
    'session: loop {
        if role == Role::Standby
            && following.is_none()
            && matches!(
                session.phase(),
                crate::session::Phase::FullSync | crate::session::Phase::Streaming
            )
        {
            following = Some(volume.followings.start());
            *volume.handover.lock().unwrap_or_else(|e| e.into_inner()) = Some(ask_tx.clone());
            if outbox.is_some() {
                // An older session with the active (its connection lingers after the
                // active restarted) ends first: its unconfirmed upstream writes arm the
                // conflicts area, and this full sync then keeps what it replaces.
                let slot = volume.followings.upstream.clone().lock_owned();
                let Some(slot) = heartbeating(&mut send, &mut sent, slot).await else {
                    break 'session;
                };
                upstream_slot = Some(slot);
                if !keeping && volume.conflicts.armed().is_some() {
                    keeping = true;
                    was_keeping = true;
                }
            }
        }
        while let Some(out) = next_output(&mut parked, &mut session, &large) {
            if matches!(out, Output::InSync) {
                synced += 1;
                // (The conflicts area is disarmed below, by `Session::clean_sync`.)
                if outbox.is_some() && !upstream_live {
                    upstream_live = true;
                    // (Nothing before could be a local write of an upstream path.)
                    volume.gate.shipped_upstream(volume.gate.last_issued());
                    volume.volume.set_upstream_open(true);
                    tracing::info!(volume = %volume.name, "taking local writes of direction = \"both\" paths");
                }
            }
            // Local writes of upstream paths and an op that may replace or remove what
            // they wrote take turns: those recorded before it go upstream first (based
            // on the version they replaced), and the op is applied at once, not in a
            // batch put in place later; a write made after finds its file replaced.
            let mut turn = None;
            if let (Output::Apply { op, .. }, Some(outbox)) = (&out, outbox.as_mut()) {
                learn_placed(&volume, outbox);
                if upstream_live {
                    // A local write closed before this op came goes upstream first:
                    // applying the op replaces the file it wrote. (Past the backlog,
                    // an op that cannot replace it lets it wait.)
                    let turn_op = takes_turn(outbox, op);
                    let mut upstream = Upstream {
                        changes: &mut changes,
                        seen: &mut seen,
                        keeping: &mut keeping,
                        was_keeping: &mut was_keeping,
                    };
                    if upstream
                        .drain(&volume, outbox, &mut send, turn_op)
                        .await
                        .is_none()
                    {
                        break 'session;
                    }
                    if turn_op {
                        if !batch.is_empty() {
                            batch.flush(&volume, &mut session).await;
                        }
                        turn = Some(apply_turn(&volume).await);
                        // Those recorded since the drain above (the turn waited for
                        // them); none can come now until the op is applied.
                        if upstream
                            .drain(&volume, outbox, &mut send, true)
                            .await
                            .is_none()
                        {
                            break 'session;
                        }
                    }
                }
                // Under the turn, learned once the op is in place (below); a large
                // file, once the stream apply puts it in place (`placed_upstream`).
                match op {
                    _ if turn.is_some() => {}
                    Op::PutStream { entry } if outbox.upstream(&entry.path) => {}
                    _ => outbox.learn_applied(op),
                }
            }
            if let (true, Output::Apply { seq, op }) = (keeping, &out) {
                if let Err(e) = keep_before(&volume, op).await {
                    // This node's version stays, and the op is refused: nothing is
                    // replaced that was not kept. The area stays armed (a full sync
                    // with refusals is not in sync): the next full sync (one more at
                    // once, then at a reconnect, a restart, `twinfs sync --full`)
                    // tries again.
                    let path = op.path().clone();
                    if let Some(outbox) = outbox.as_mut() {
                        outbox.forget(&path);
                    }
                    session.applied(
                        *seq,
                        &path,
                        Err(format!(
                            "not applied: this node's version could not be kept first: {e}"
                        )),
                        std::time::Instant::now(),
                    );
                    continue;
                }
            }
            match out {
                Output::Fenced { epoch } => {
                    fence(&volume, &link, epoch).await;
                    continue;
                }
                Output::Follow { epoch } => {
                    // Persisted before anything from this active is applied.
                    let roles = volume.roles.clone();
                    let followed = tokio::task::spawn_blocking(move || roles.follow(epoch)).await;
                    if !matches!(followed, Ok(Ok(()))) {
                        tracing::error!(volume = %volume.name, epoch, "cannot persist the epoch; not following");
                        break 'session;
                    }
                    continue;
                }
                _ => {}
            }
            if let (Output::Apply { seq, op }, Some(outbox)) = (&out, outbox.as_mut()) {
                // (A streamed file is left alone: the active waits for its block list.)
                let entry = match op {
                    Op::Put { entry, .. } => Some(entry),
                    _ => None,
                };
                if let Some(entry) = entry.filter(|e| outbox.upstream(&e.path)) {
                    // This node's own write coming back from the active: replacing the
                    // file with itself would only make its name unknown for a moment.
                    if !batch.is_empty() {
                        batch.flush(&volume, &mut session).await;
                    }
                    // (Unless names the active linked to it wait for a version of
                    // it here: the apply makes them.)
                    if !gave_up_on(&volume, &entry.path) && already_there(&volume, entry).await {
                        session.applied(*seq, &entry.path, Ok(()), std::time::Instant::now());
                        if turn.is_some() {
                            outbox.learn_applied(op);
                        }
                        continue;
                    }
                }
            }
            // Small files to write go into a batch, made durable together; a large
            // file is applied in the background while later ops go on; any other op
            // waits for the batch to be in place first.
            let out = match out {
                Output::Apply {
                    seq,
                    op:
                        Op::Put {
                            entry,
                            content: Some(bytes),
                        },
                } if entry.meta.kind == Kind::File && !entry.path.is_root() && turn.is_none() => {
                    if let Some(path) = batch.stage(&volume, seq, entry, bytes).await {
                        // Answered, refused, like every op: the active then repairs it
                        // by a full sync (a standby that stopped answering would stall).
                        session.applied(
                            seq,
                            &path,
                            Err("the apply task failed".into()),
                            std::time::Instant::now(),
                        );
                    }
                    if batch.is_full() {
                        batch.place_full(&volume, &mut session).await;
                    }
                    continue;
                }
                // A directory's metadata (its times after a create in it, say) joins
                // the batch too when the directory is there: one flush for each would
                // hold every next file up by the fsyncs of the one before.
                Output::Apply {
                    seq,
                    op:
                        Op::Put {
                            entry,
                            content: None,
                        },
                } if entry.meta.kind == Kind::Dir
                    // (Not one of this node's own upstream paths: its local changes
                    // would race an apply put off till later.)
                    && !outbox.as_ref().is_some_and(|o| o.upstream(&entry.path)) =>
                {
                    match batch.stage_directory(&volume, seq, entry) {
                        Ok(()) => {
                            if batch.is_full() {
                                batch.place_full(&volume, &mut session).await;
                            }
                            continue;
                        }
                        Err(entry) => Output::Apply {
                            seq,
                            op: Op::Put {
                                entry,
                                content: None,
                            },
                        },
                    }
                }
                // Nothing to do: it need not wait for the files before it.
                Output::Apply {
                    seq,
                    op: Op::Skip { path },
                } => {
                    session.applied(seq, &path, Ok(()), std::time::Instant::now());
                    continue;
                }
                Output::Apply {
                    seq,
                    op: Op::PutStream { entry },
                } => {
                    // Earlier small files first: one may be an older version of it.
                    if !batch.is_empty() {
                        batch.flush(&volume, &mut session).await;
                    }
                    large.start(&volume, &link, &counters, tag, seq, entry);
                    continue;
                }
                other => other,
            };
            // (Messages to send, acks among them, need not wait.)
            if !batch.is_empty() && matches!(out, Output::Apply { .. } | Output::ScanLocal) {
                batch.flush(&volume, &mut session).await;
            }
            if let (Output::ScanLocal, Some(outbox)) = (&out, outbox.as_mut()) {
                // What was put in place before the scan, the scan sees.
                learn_placed(&volume, outbox);
                match heartbeating(&mut send, &mut sent, scan_for_standby(&volume))
                    .await
                    .flatten()
                {
                    Some(manifest) => {
                        outbox.learn_manifest(&manifest);
                        session.local_manifest(manifest, std::time::Instant::now());
                        continue;
                    }
                    None => {
                        send.finish();
                        break 'session;
                    }
                }
            }
            let done = match out {
                Output::Ship(first) => {
                    let mut ships = vec![first];
                    while ships.len() < SHIP_GATHER && session.next_is_ship() {
                        if let Some(Output::Ship(ship)) = session.poll_output() {
                            ships.push(ship);
                        }
                    }
                    let mut records = Records {
                        changes: &mut changes,
                        seen: &mut seen,
                    };
                    ship(
                        &volume,
                        &mut session,
                        &mut send,
                        ships,
                        &mut records,
                        &link,
                        &counters,
                        tag,
                    )
                    .await
                }
                Output::Apply { seq, op } if turn.is_some() => {
                    let applied = apply_now(&volume, &mut session, seq, op, turn).await;
                    if let (Some(op), Some(outbox)) = (applied, outbox.as_mut()) {
                        outbox.learn_applied(&op);
                    }
                    Some(0)
                }
                out => carry_out(&volume, &mut session, &mut send, out).await,
            };
            match done {
                Some(n) => sent += n,
                None => {
                    send.finish();
                    // The cleanup after the loop ends the session (and an upstream
                    // outbox: what it could not ship is kept).
                    break 'session;
                }
            }
        }
        if batch.can_start() {
            // More ops already here join the batch; else it goes into place in the
            // background and its acks come when it is through.
            match messages.try_recv() {
                // Carried out by this loop, not the session: taken below, after the
                // batch (the session alone would drop them).
                Some(m) if for_the_driver(&m) => {
                    held = Some(m);
                    batch.flush(&volume, &mut session).await;
                }
                Some(m) => session.on_message(m, std::time::Instant::now()),
                None => batch.start_placing(&volume),
            }
            continue;
        }
        if keeping && !was_keeping {
            keep_from = session.sync_id();
        }
        if keeping && session.clean_sync() > keep_from {
            keeping = false;
            if let Err(e) = volume.conflicts.disarm() {
                tracing::warn!(volume = %volume.name, error = %e, "cannot clear the conflicts marker");
            }
        }
        was_keeping = keeping;
        if session.caught_up() {
            volume.gate.caught_up(gate_id, seen);
            synced = synced.max(session.stats().full_syncs);
        }
        // Also while a full sync repairs it: one that is refused again (a full disk)
        // would hold every writer meanwhile. (Told when it changes: no lock per turn.)
        if session.refused() != refusing {
            refusing = session.refused();
            volume.gate.refusing(gate_id, refusing);
        }
        if outbox.as_ref().is_some_and(|o| o.waiting() == 0) {
            // A standby's `sync` writer waits until the active has taken its write.
            volume.gate.caught_up(gate_id, seen);
        }
        if let Some(following) = following {
            let key = (
                session.fit(),
                session.priority1_pending_len() == 0,
                session.stats().rejected,
                session.unrepaired(),
                session.phase(),
            );
            if recorded_fit != Some(key) {
                record_fitness(&volume, &session, following).await;
                recorded_fit = Some(key);
            }
        }
        if flushing && session.phase() == crate::session::Phase::Streaming {
            flushing = false;
            if session.ship_waiting(std::time::Instant::now()) {
                continue;
            }
        }
        if !syncs.is_empty() && !flushing && session.settled() {
            // Everything is answered: applied, or refused (the standby lacks that
            // until a full sync repairs it; waiting would not bring it).
            let answer = if session.caught_up() {
                Ok(())
            } else {
                Err(refused_answer(&session))
            };
            for reply in syncs.drain(..) {
                let _ = reply.try_send((link.peer.clone(), answer.clone()));
            }
        }
        if let Some((since, drain_to)) = handing_over {
            // A record still in the broadcast channel is not in the session yet, so
            // `caught_up` alone could hand over without it; interval paths waiting
            // for their time go now.
            if seen >= drain_to && session.ship_waiting(std::time::Instant::now()) {
                continue;
            }
            if seen >= drain_to && session.caught_up() {
                // Everything is acknowledged: tell the standby (and wait until it has
                // the message: stepping down closes this connection), then step down.
                // Should this node die in between, the standby's new epoch fences it.
                let epoch = volume.roles.get().epoch;
                volume
                    .handed_over
                    .store(epoch, std::sync::atomic::Ordering::Release);
                if send
                    .write(&Message::HandoverReady { epoch })
                    .await
                    .is_some()
                {
                    send.finish_read(Duration::from_secs(2)).await;
                }
                let roles = volume.roles.clone();
                let demoted =
                    tokio::task::spawn_blocking(move || roles.demote(epoch, "manual")).await;
                if matches!(demoted, Ok(Ok(_))) {
                    tracing::warn!(volume = %volume.name, peer = %link.peer, epoch, "handed over");
                } else {
                    tracing::error!(volume = %volume.name, "cannot persist the handover; local writes stay refused");
                }
                handing_over = None;
            } else if since.elapsed() > HANDOVER_DRAIN {
                tracing::warn!(volume = %volume.name, peer = %link.peer, "handover: the standby did not catch up in time; taking writes again");
                let roles = volume.roles.clone();
                resuming = Some(tokio::task::spawn_blocking(move || {
                    roles.resume_writes(Hold::Handover)
                }));
                handing_over = None;
            }
        }
        if synced > compacted {
            // A full sync is through: its manifests and queues are gone; give the
            // room back rather than keep the peak for the life of the daemon.
            compacted = synced;
            session.compact();
            release_memory();
        }
        report(
            &link,
            &volume,
            &session,
            &mut full_syncs_done,
            sent + counters.sent.load(std::sync::atomic::Ordering::Relaxed),
            received.load(std::sync::atomic::Ordering::Relaxed)
                + counters.received.load(std::sync::atomic::Ordering::Relaxed),
        );
        let out_of_sync = volume.gate.out_of_sync(gate_id);
        let rtt = link.connection.as_ref().map(|c| c.rtt().as_micros() as u64);
        link.update(&volume.name, |s| {
            match (out_of_sync, s.out_of_sync_since) {
                (true, None) => s.out_of_sync_since = Some(unix_now()),
                (false, Some(_)) => s.out_of_sync_since = None,
                _ => {}
            }
            s.out_of_sync = out_of_sync;
            s.rtt_us = rtt;
        });
        // Standby: with many outputs backed up behind a parked one, messages wait in
        // the reader's channel (and QUIC's flow control holds the active back) rather
        // than pile up in memory; that they are there says the active is alive. (Not for
        // ever: a blocks stream silent for the peer timeout ends the apply they wait on.)
        let backlog = parked.is_some() && session.outputs_waiting() >= PARKED_BACKLOG;
        if backlog && (held.is_some() || messages.waiting()) {
            session.peer_heard(std::time::Instant::now());
        }
        let moved = counters.sent.load(std::sync::atomic::Ordering::Relaxed)
            + counters.received.load(std::sync::atomic::Ordering::Relaxed);
        if moved != streamed {
            streamed = moved;
            session.stream_progress(std::time::Instant::now());
        }
        // What the reader read (or a large file's stream) says the peer is alive,
        // taken by this loop yet or not (after a long wait to write, the peer's
        // timeout must not end the session before the messages waiting are taken).
        let read = from_peer.heard();
        if read != heard {
            heard = read;
            session.peer_heard(std::time::Instant::now());
        }
        let deadline = Instant::from_std(session.next_deadline());
        // Standby: local writes of upstream paths wait in the change stream while the
        // active is slow to take those already read (they would wait in memory
        // otherwise); the change stream lagging behind then makes this node keep its
        // versions and resync, as for any lag. (Answers from the active shrink it.)
        let upstream_backlog = outbox.as_ref().is_some_and(upstream_backlog);
        tokio::select! {
            m = next_message(&mut held, &mut messages), if !backlog => match m {
                Some(m) => {
                    match &m {
                        m if for_the_driver(m) && !session.driver_may_act(m) => {
                            tracing::warn!(volume = %volume.name, peer = %link.peer, message = ?m,
                                "message before the peer's hello or not for this node's role; dropped");
                        }
                        Message::HandoverRequest
                            if role == Role::Active && handing_over.is_none() && stopping.is_none() =>
                        {
                            tracing::warn!(volume = %volume.name, peer = %link.peer, "handing over: local writes refused, shipping what is pending");
                            // Not awaited here: a write under way may wait (sync
                            // durability) for the very acks this loop must go on taking.
                            let roles = volume.roles.clone();
                            let resumed = resuming.take();
                            stopping = Some(tokio::spawn(async move {
                                // Not lifted after it is set again.
                                if let Some(resumed) = resumed {
                                    let _ = resumed.await;
                                }
                                let _ = tokio::task::spawn_blocking(move || roles.stop_writes(Hold::Handover)).await;
                            }));
                        }
                        Message::HandoverReady { epoch } if role == Role::Standby => {
                            let taken = waiting_handover.take().is_some_and(|reply| reply.send(Ok(*epoch)).is_ok());
                            if !taken {
                                // `promote` stopped waiting (or nobody asked): the active
                                // has made itself a standby all the same.
                                tracing::error!(volume = %volume.name, epoch,
                                    "the active handed over after `twinfs promote` stopped waiting: it is a standby now, and no node is active until `twinfs promote` runs again");
                            }
                        }
                        Message::VerifyRequest { id } if role == Role::Standby => {
                            // Files readers already see (staged, or large ones being
                            // rebuilt) are put in place first: the scan reads the
                            // directory underneath, where they are not yet.
                            if !batch.is_empty() {
                                batch.flush(&volume, &mut session).await;
                            }
                            let waited = heartbeating(&mut send, &mut sent, large.wait_all(&mut session)).await;
                            if waited.is_none() || answer_verify(&volume, &mut send, &mut sent, *id).await.is_none() {
                                break;
                            }
                        }
                        Message::Upstream { id, base, op } => {
                            let refused = match upstream_jobs.as_ref() {
                                Some(jobs) => jobs
                                    .try_send((*id, *base, op.clone()))
                                    .err()
                                    .map(|_| "the active is busy with upstream writes".to_owned()),
                                None => Some("a standby takes no upstream writes".to_owned()),
                            };
                            if let Some(reason) = refused {
                                let path = upstream::checked_path(op).clone();
                                let answered = refuse_upstream(&volume, &mut session, &mut send, *id, vec![path], reason).await;
                                if answered.is_none() {
                                    break;
                                }
                            }
                        }
                        Message::UpstreamApplied { id } => {
                            if let Some(outbox) = outbox.as_mut() {
                                outbox.answered(*id);
                                if release_upstream(outbox, &mut send).await.is_none() {
                                    break;
                                }
                            }
                        }
                        Message::UpstreamRefused { id, path, reason } => {
                            if let Some(outbox) = outbox.as_mut() {
                                if let Some(sent) = outbox.answered(*id) {
                                    if !keep_refused(&volume, sent, path, reason).await {
                                        // Not kept, but still in place: the active's
                                        // version, which follows, replaces it only
                                        // once kept (or is refused until there is
                                        // room), as after a fencing; a full sync ends
                                        // that.
                                        keeping = true;
                                        was_keeping = false;
                                        if keep_and_resync(&volume, &mut send).await.is_none() {
                                            break;
                                        }
                                    }
                                }
                                if release_upstream(outbox, &mut send).await.is_none() {
                                    break;
                                }
                            }
                        }
                        Message::VerifyManifest { id, entries, done } if role == Role::Active => {
                            if let Some(at) = verifying.iter().position(|v| v.id == *id) {
                                verifying[at].entries.extend(entries.iter().cloned());
                                if *done {
                                    let v = verifying.remove(at);
                                    let answer = heartbeating(&mut send, &mut sent, compare_fresh(&volume, v.entries)).await;
                                    let ended = answer.is_none();
                                    let answer = answer.unwrap_or_else(|| Err("the session ended".into()));
                                    let _ = v.reply.try_send((link.peer.clone(), answer));
                                    if ended {
                                        break;
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                    session.on_message(m, std::time::Instant::now());
                }
                None => break,
            },
            command = async {
                match commands.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                match command {
                    Ok(Command::Sync { paths, full, reply }) => {
                        if full {
                            session.resync();
                        } else {
                            session.ship_now(paths, std::time::Instant::now());
                        }
                        syncs.push(reply);
                    }
                    Ok(Command::Flush { reply }) => {
                        flushing = true;
                        syncs.push(reply);
                    }
                    Ok(Command::Verify { reply }) => {
                        verify_id += 1;
                        let id = verify_id;
                        if send.write(&Message::VerifyRequest { id }).await.is_some() {
                            verifying.push(Verifying { id, entries: Vec::new(), reply });
                        } else {
                            let _ = reply.try_send((link.peer.clone(), Err("cannot reach the standby".into())));
                        }
                    }
                    Err(_) => {}
                }
            }
            _ = async {
                match stopping.as_mut() {
                    Some(task) => {
                        let _ = task.await;
                    }
                    None => std::future::pending().await,
                }
            } => {
                // Local writes are refused and none is under way: drain, then hand over.
                stopping = None;
                handing_over = Some((std::time::Instant::now(), volume.gate.last_issued()));
            }
            Some(reply) = asks.recv() => {
                if send.write(&Message::HandoverRequest).await.is_none() {
                    let _ = reply.send(Err("the connection to the active failed".into()));
                } else {
                    waiting_handover = Some(reply);
                }
            }
            r = async {
                match changes.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            }, if !upstream_backlog => match r {
                Ok((id, record)) => {
                    seen = id;
                    if role == Role::Active {
                        session.on_change(&record, std::time::Instant::now());
                    } else if let Some(outbox) = outbox.as_mut().filter(|_| upstream_live) {
                        if ship_upstream(&volume, outbox, &mut send, &record).await.is_none() {
                            break;
                        }
                        volume.gate.shipped_upstream(seen);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) if role == Role::Standby => {
                    keeping = true;
                    was_keeping = false;
                    seen = seen.max(volume.gate.last_issued());
                    if upstream_lagged(&volume, &mut send, n).await.is_none() {
                        break;
                    }
                    volume.gate.shipped_upstream(seen);
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::info!(volume = %volume.name, missed = n, "change stream lagged; resyncing");
                    session.resync();
                    seen = seen.max(volume.gate.last_issued());
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            Some((id, paths, result)) = async {
                match upstream_done.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let answered = match result {
                    Ok(()) => send.write(&Message::UpstreamApplied { id }).await,
                    Err(reason) => refuse_upstream(&volume, &mut session, &mut send, id, paths, reason).await,
                };
                if answered.is_none() {
                    break;
                }
            }
            results = batch.placed(), if batch.placing.is_some() => {
                batch.report(results, &volume, &mut session);
            }
            Some((seq, path, result)) = large.done.recv(), if !large.busy.is_empty() => {
                large.finished(seq, &path, result, &mut session);
            }
            _ = tokio::time::sleep_until(deadline) => session.on_tick(std::time::Instant::now()),
            changed = roles.changed() => {
                if changed.is_err() || volume.roles.term() != volume.term {
                    tracing::info!(volume = %volume.name, peer = %link.peer, "role changed; ending the session");
                    break;
                }
            }
            Ok(()) = newer.changed(), if upstream_slot.is_some() => {
                if following.is_some_and(|f| !volume.followings.is_newest(f)) {
                    tracing::info!(volume = %volume.name, peer = %link.peer,
                        "a newer session with the active began; ending this one");
                    break;
                }
            }
        }
    }
    if let Some(following) = following {
        record_fitness(&volume, &session, following).await;
    }
    if role == Role::Standby {
        // A newer session's place is left to it.
        let mut slot = volume.handover.lock().unwrap_or_else(|e| e.into_inner());
        if slot
            .as_ref()
            .is_some_and(|asker| asker.same_channel(&ask_tx))
        {
            *slot = None;
        }
    }
    if let Some(task) = stopping.take() {
        let _ = task.await;
        handing_over = Some((std::time::Instant::now(), volume.gate.last_issued()));
    }
    if handing_over.is_some() {
        // The standby went away mid-handover: this node takes writes again.
        let roles = volume.roles.clone();
        let _ = tokio::task::spawn_blocking(move || roles.resume_writes(Hold::Handover)).await;
    }
    for reply in syncs.drain(..) {
        let _ = reply.try_send((link.peer.clone(), Err("the session ended".into())));
    }
    for v in verifying {
        let _ = v
            .reply
            .try_send((link.peer.clone(), Err("the session ended".into())));
    }
    volume.gate.unregister(gate_id);
    if let Some(outbox) = outbox {
        close_upstream(&volume, outbox, changes, upstream_live).await;
    }
    // (Only now: see `Followings::upstream`.)
    drop(upstream_slot);
    link.update(&volume.name, disconnected);
}

/// Messages `run_session` carries out itself (beside the session, which only notes
/// them as signs of life).
fn for_the_driver(m: &Message) -> bool {
    matches!(
        m,
        Message::HandoverRequest
            | Message::HandoverReady { .. }
            | Message::VerifyRequest { .. }
            | Message::VerifyManifest { .. }
            | Message::Upstream { .. }
            | Message::UpstreamApplied { .. }
            | Message::UpstreamRefused { .. }
    )
}

/// The bytes of upstream writes read and not answered by the active
/// ([`Outbox::holding`]) past which a standby's session reads no more local writes of
/// upstream paths, but for an op of the active's that takes the turn (a file of up to
/// 16 MiB may go over it once).
const UPSTREAM_BACKLOG: u64 = 16 << 20;

/// The bytes of upstream writes read and not answered past which even an op that
/// takes the turn reads no more: the writes not read yet count as missed, as when the
/// change stream lags.
const UPSTREAM_HELD_MAX: u64 = 64 << 20;

/// Standby: whether its upstream writes read and not answered are past
/// [`UPSTREAM_BACKLOG`].
fn upstream_backlog(outbox: &Outbox) -> bool {
    outbox.holding() > UPSTREAM_BACKLOG
}

/// Outputs backed up behind a parked one past which a standby takes no more messages
/// until it can go on.
const PARKED_BACKLOG: usize = 256;

/// The next output for `run_session` to carry out. One that must wait for large
/// files being applied (an op on a path one of them is applied to, or above or below
/// it, but a directory's metadata only for those in it; a scan, for all of them) is
/// parked until they are done, and only messages to
/// send (or a close) go ahead of it.
fn next_output(
    parked: &mut Option<Output>,
    session: &mut Session,
    large: &LargeApplies,
) -> Option<Output> {
    let out = match parked.take() {
        Some(out) => out,
        None => session.poll_output()?,
    };
    let waits = match &out {
        Output::Apply {
            op: Op::Put { entry, .. },
            ..
        } if entry.meta.kind == Kind::Dir => large.holds_directory(&entry.path),
        Output::Apply { op, .. } => large.related(&op_paths(op)),
        Output::ScanLocal => !large.busy.is_empty(),
        _ => false,
    };
    if waits {
        *parked = Some(out);
        return session.poll_message();
    }
    Some(out)
}

/// The held message if there is one, else the next from the peer.
async fn next_message(held: &mut Option<Message>, messages: &mut Messages) -> Option<Message> {
    match held.take() {
        Some(m) => Some(m),
        None => messages.recv().await,
    }
}

/// Standby: the session ends; local writes of the upstream paths stop (once those
/// under way are recorded). What was not shipped, or not answered, may be replaced by
/// the next full sync: it keeps this node's versions of what it replaces.
async fn close_upstream(
    volume: &VolumeLink,
    outbox: Outbox,
    changes: Option<broadcast::Receiver<Numbered>>,
    live: bool,
) {
    if live {
        let v = volume.clone();
        let _ = tokio::task::spawn_blocking(move || v.volume.set_upstream_open(false)).await;
    }
    let mut unshipped = outbox.waiting();
    if let Some(mut rx) = changes {
        loop {
            match rx.try_recv() {
                Ok((_, record)) => {
                    let upstream =
                        RelPath::from_path(&record.change.path).is_ok_and(|p| outbox.upstream(&p));
                    unshipped += usize::from(upstream);
                }
                Err(broadcast::error::TryRecvError::Lagged(n)) => unshipped += n as usize,
                Err(_) => break,
            }
        }
    }
    if unshipped > 0 {
        tracing::warn!(volume = %volume.name, writes = unshipped,
            "upstream writes not confirmed by the active; the next full sync keeps what it replaces");
        arm_keeping(volume).await;
    }
}

/// Arms the conflicts area: the next full sync keeps this node's versions of what it
/// replaces or deletes.
async fn arm_keeping(volume: &VolumeLink) {
    let epoch = volume.roles.get().epoch;
    let conflicts = volume.conflicts.clone();
    let armed = tokio::task::spawn_blocking(move || conflicts.arm(epoch, unix_now())).await;
    if !matches!(armed, Ok(Ok(()))) {
        tracing::error!(volume = %volume.name, dir = %volume.conflicts.dir().display(),
            "cannot arm the conflicts area: unconfirmed upstream writes may be overwritten");
    }
}

/// Standby: `missed` local writes can no longer go upstream; the full sync asked for
/// keeps this node's versions of what it replaces. `None` when the stream failed.
async fn upstream_lagged(volume: &VolumeLink, send: &mut Control, missed: u64) -> Option<()> {
    tracing::error!(volume = %volume.name, missed,
        "upstream writes lagged; keeping this node's versions and resyncing");
    keep_and_resync(volume, send).await
}

/// Standby: arms the conflicts area and asks the active for a full sync, which keeps
/// this node's versions of what it replaces. `None` when the stream failed.
async fn keep_and_resync(volume: &VolumeLink, send: &mut Control) -> Option<()> {
    arm_keeping(volume).await;
    send.write(&Message::Resync).await.map(|_| ())
}

/// Standby: scans the volume for the full sync, once the large files of an earlier
/// session still being applied have landed. `None` if it cannot.
async fn scan_for_standby(volume: &VolumeLink) -> Option<Manifest> {
    // A local write still under way from this node's time as the active (stuck on a
    // disk that did not answer when it stepped down) changes the volume when it ends:
    // the scan sees what it leaves, so that the full sync puts it right.
    let v = volume.clone();
    let _ = tokio::task::spawn_blocking(move || v.volume.wait_for_writes()).await;
    let _applying = volume.applying.write().await;
    // The full sync this scan is for brings every path as the active has it.
    gave_up_names(volume).clear();
    let v = volume.clone();
    match tokio::task::spawn_blocking(move || scan(&v)).await {
        Ok(Ok(m)) => Some(m),
        Ok(Err(e)) => {
            tracing::error!(volume = %volume.name, error = %e, "cannot scan the volume");
            None
        }
        Err(_) => None,
    }
}

/// Standby: whether the volume has `entry` exactly (content and metadata) already.
async fn already_there(volume: &VolumeLink, entry: &manifest::Entry) -> bool {
    let (v, path) = (volume.clone(), entry.path.clone());
    let described = tokio::task::spawn_blocking(move || {
        let mut cache = v.cache.lock().unwrap_or_else(|e| e.into_inner());
        manifest::describe(v.root.as_fd(), &path, &mut cache).map(|d| d.map(|(meta, _, _)| meta))
    })
    .await;
    matches!(described, Ok(Ok(Some(meta))) if meta == entry.meta)
}

/// Standby: the outbox learns the large files put in place at upstream paths since
/// ([`VolumeLink::placed_upstream`]).
fn learn_placed(volume: &VolumeLink, outbox: &mut Outbox) {
    let placed = std::mem::take(
        &mut *volume
            .placed_upstream
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
    );
    for (path, hash) in placed {
        outbox.learn_placed(&path, hash);
    }
}

/// Standby: where a session takes its local writes of upstream paths from.
struct Upstream<'a> {
    changes: &'a mut Option<broadcast::Receiver<Numbered>>,
    seen: &'a mut u64,
    /// Set when records were missed: the next full sync keeps what it replaces.
    keeping: &'a mut bool,
    /// Cleared with it: keeping lasts until a full sync that began after that.
    was_keeping: &'a mut bool,
}

impl Upstream<'_> {
    /// Ships every local write recorded so far; unless `turn` (for an op that takes
    /// the turn, which must find none left), only while the backlog lets it. `None`
    /// if the stream broke.
    async fn drain(
        &mut self,
        volume: &VolumeLink,
        outbox: &mut Outbox,
        send: &mut Control,
        turn: bool,
    ) -> Option<()> {
        while let Some(rx) = self.changes.as_mut() {
            if !turn && upstream_backlog(outbox) {
                break;
            }
            if outbox.holding() > UPSTREAM_HELD_MAX && !rx.is_empty() {
                // Past what this node holds for the active: as if the change stream
                // had lagged.
                let missed = rx.len() as u64;
                *rx = rx.resubscribe();
                *self.keeping = true;
                *self.was_keeping = false;
                *self.seen = (*self.seen).max(volume.gate.last_issued());
                upstream_lagged(volume, send, missed).await?;
                break;
            }
            match rx.try_recv() {
                Ok((id, record)) => {
                    *self.seen = id;
                    ship_upstream(volume, outbox, send, &record).await?;
                }
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    *self.keeping = true;
                    *self.was_keeping = false;
                    *self.seen = (*self.seen).max(volume.gate.last_issued());
                    upstream_lagged(volume, send, n).await?;
                }
                Err(_) => break,
            }
        }
        volume.gate.shipped_upstream(*self.seen);
        Some(())
    }
}

/// Standby: ships a local change of an upstream path to the active. `None` if the
/// stream broke.
async fn ship_upstream(
    volume: &VolumeLink,
    outbox: &mut Outbox,
    send: &mut Control,
    record: &Record,
) -> Option<()> {
    let path = match RelPath::from_path(&record.change.path) {
        Ok(path) => path,
        Err(error) => {
            tracing::warn!(volume = %volume.name, path = %record.change.path.display(), %error,
                "a local write of a path longer than PATH_MAX (4096 bytes) does not go upstream");
            return Some(());
        }
    };
    // A handle opened while this node was active, closed since: not an upstream path.
    if !outbox.upstream(&path) {
        return Some(());
    }
    // A large file put in place before this write was made is its base.
    learn_placed(volume, outbox);
    let renamed_from = match &record.change.kind {
        twinfs_fs::ChangeKind::Rename { from, .. } => RelPath::from_path(from).ok(),
        _ => None,
    };
    let op = match (&record.change.kind, renamed_from) {
        (twinfs_fs::ChangeKind::Unlink | twinfs_fs::ChangeKind::Rmdir, _) => Op::Delete { path },
        (twinfs_fs::ChangeKind::Rename { exchange, .. }, Some(from)) => Op::Rename {
            from,
            to: path,
            exchange: *exchange,
            unsent: false,
        },
        // A rename from a name the active cannot be told (longer than `PATH_MAX`)
        // goes as what arrived, read below (a file whole, a directory only itself).
        // Still open for writing (a create, say): its close ships it whole.
        _ if volume.volume.being_written(&record.change.path) => return Some(()),
        _ => {
            let v = volume.clone();
            let read = tokio::task::spawn_blocking(move || {
                let small = is_small(&v, &path);
                read_op(&v, path, true, None, true, false, None, false, false, small)
                    .map(|(op, _, _)| op)
            })
            .await;
            match read {
                Ok(Ok(op)) => op,
                Ok(Err(e)) => {
                    tracing::warn!(volume = %volume.name, error = %e, "cannot read an upstream write");
                    return Some(());
                }
                Err(_) => return Some(()),
            }
        }
    };
    // Changed while it was read: the close that follows ships it.
    if matches!(op, Op::Skip { .. }) {
        return Some(());
    }
    let shipped = op.path().clone();
    let message = outbox.send(op);
    match message.encode() {
        Ok(bytes) => {
            tracing::debug!(volume = %volume.name, path = %shipped, "shipped upstream");
            if let Message::Upstream { id, .. } = message {
                outbox.hold(id, bytes);
            }
            release_upstream(outbox, send).await
        }
        Err(e) => {
            tracing::error!(volume = %volume.name, path = %shipped, error = %e,
                "cannot ship this write upstream; it stays on this node only");
            if let Message::Upstream { id, .. } = message {
                outbox.answered(id);
            }
            Some(())
        }
    }
}

/// Standby: sends the upstream writes the outbox's window lets out now. `None` if
/// the stream broke.
async fn release_upstream(outbox: &mut Outbox, send: &mut Control) -> Option<()> {
    while let Some(bytes) = outbox.release() {
        send.write_bytes(bytes).await?;
    }
    Some(())
}

/// Standby: the active refused upstream write `sent` of `path`: keeps it in the
/// conflicts area (the active's version follows on the stream). Whether it could.
async fn keep_refused(
    volume: &VolumeLink,
    sent: upstream::Sent,
    path: &RelPath,
    reason: &str,
) -> bool {
    let content = match sent.op {
        Op::Put {
            content: Some(c), ..
        } => Some(c),
        _ => None,
    };
    let epoch = volume.roles.get().epoch;
    let (area, path, reason) = (volume.conflicts.clone(), path.clone(), reason.to_owned());
    let kept = tokio::task::spawn_blocking(move || {
        area.keep_refused(epoch, unix_now(), &path, content.as_deref(), &reason)
    })
    .await;
    let done = matches!(kept, Ok(Ok(())));
    if !done {
        tracing::error!(volume = %volume.name, ?kept,
            "cannot keep a refused upstream write in the conflicts area; keeping this node's version before the active's replaces it");
    }
    done
}

/// Active: tells the standby that upstream write `id` is refused, and ships the
/// active's version of `paths` to it again. `None` if the stream broke.
async fn refuse_upstream(
    volume: &VolumeLink,
    session: &mut Session,
    send: &mut Control,
    id: u64,
    paths: Vec<RelPath>,
    reason: String,
) -> Option<u64> {
    let path = paths.first().cloned().unwrap_or_else(RelPath::root);
    tracing::warn!(volume = %volume.name, %path, %reason, "refused a standby's upstream write");
    let sent = send
        .write(&Message::UpstreamRefused { id, path, reason })
        .await;
    session.ship_now(paths, std::time::Instant::now());
    sent
}

/// One upstream write for the active's worker: (id, base, op).
type UpstreamJob = (u64, Option<u128>, Op);

/// What became of it: (id, the paths it changes, applied or why not).
type UpstreamResult = (u64, Vec<RelPath>, Result<(), String>);

/// Upstream writes waiting for the worker before further ones are refused as busy.
const UPSTREAM_QUEUE: usize = 256;

// A standby's window never lets out more than the worker queues.
const _: () = assert!(upstream::WINDOW_WRITES <= UPSTREAM_QUEUE);

/// Active: applies a standby's upstream writes in the order they came, beside the
/// session loop (a `sync` path's record waits for the standbys' acks, which that loop
/// takes).
fn start_upstream_worker(
    volume: VolumeLink,
) -> (mpsc::Sender<UpstreamJob>, mpsc::Receiver<UpstreamResult>) {
    let (jobs_tx, mut jobs) = mpsc::channel::<UpstreamJob>(UPSTREAM_QUEUE);
    let (done_tx, done) = mpsc::channel(UPSTREAM_QUEUE);
    tokio::spawn(async move {
        while let Some((id, base, op)) = jobs.recv().await {
            let paths = upstream::changed_paths(&op);
            let v = volume.clone();
            let result = tokio::task::spawn_blocking(move || take_upstream(&v, &op, base))
                .await
                .unwrap_or_else(|_| Err("the apply task failed".to_owned()));
            if done_tx.send((id, paths, result)).await.is_err() {
                return;
            }
        }
    });
    (jobs_tx, done)
}

/// Active: judges and applies one upstream write, records it as a change of the
/// volume so that every session ships it on, then tells the kernel.
fn take_upstream(volume: &VolumeLink, op: &Op, base: Option<u128>) -> Result<(), String> {
    take_upstream_recorded(volume, op, base)?;
    // Not under the write guard: the kernel may wait for a FUSE request of the same
    // directory, which may wait for the guard behind a role switch.
    for path in op_paths(op) {
        invalidate(volume, path);
    }
    Ok(())
}

fn take_upstream_recorded(volume: &VolumeLink, op: &Op, base: Option<u128>) -> Result<(), String> {
    use twinfs_fs::{AttrChange, Change, ChangeKind};
    // Held until the change is recorded: a handover waits for it and ships it.
    let _writing = volume
        .volume
        .active_write()
        .map_err(|_| "the active takes no writes now (handing over)".to_owned())?;
    let checked = upstream::checked_path(op);
    if volume.volume.being_written(checked.as_path()) {
        return Err(format!(
            "{checked} is being written on the active; the active's version stands"
        ));
    }
    let current = {
        let mut cache = volume.cache.lock().unwrap_or_else(|e| e.into_inner());
        manifest::describe(volume.root.as_fd(), checked, &mut cache)
            .map_err(|e| e.to_string())?
            .map(|(meta, _, _)| meta)
    };
    upstream::judge(&volume.policies, op, base, current.as_ref())?;
    apply_upstream(volume, op).map_err(|e| match e {
        ApplyError::NotEmpty { path } => {
            format!("{path} is not empty on the active; the active's stands")
        }
        ApplyError::IsDirectory { path, .. } | ApplyError::NotDirectory { path } => {
            format!("{path} is of another kind on the active now; the active's stands")
        }
        e => e.to_string(),
    })?;
    let (path, kind) = match op {
        Op::Put { entry, .. } => {
            // A file, symlink or node is put in place through a temp entry, after
            // which the directory's times are put back; a ship of the directory read
            // in between carried the temp entry's moment. Recorded as made anew, so
            // the directory's metadata ships after it, read as it is now.
            let kind = match (&current, entry.meta.kind) {
                (_, Kind::File) => ChangeKind::Create,
                (None, Kind::Dir) => ChangeKind::Mkdir,
                (_, Kind::Symlink) => ChangeKind::Symlink,
                (Some(_), Kind::Dir) => ChangeKind::Attr(AttrChange {
                    times: true,
                    mode: true,
                    owner: true,
                    size: false,
                }),
                (_, _) => ChangeKind::Mknod,
            };
            (entry.path.clone(), kind)
        }
        Op::Delete { path } => {
            let dir = current.as_ref().is_some_and(|m| m.kind == Kind::Dir);
            let kind = if dir {
                ChangeKind::Rmdir
            } else {
                ChangeKind::Unlink
            };
            (path.clone(), kind)
        }
        Op::Rename {
            from, to, exchange, ..
        } => (
            to.clone(),
            ChangeKind::Rename {
                from: from.as_path().to_owned(),
                exchange: *exchange,
            },
        ),
        // A standby ships its links as copies (`read_op`).
        Op::PutStream { .. } | Op::Skip { .. } | Op::Link { .. } => return Ok(()),
    };
    volume.volume.note_change(Change {
        path: path.as_path().to_owned(),
        kind,
        file: None,
    });
    Ok(())
}

/// This node met an active of a later epoch (or one that wins the tie), or a standby
/// that followed one: it stops being active at once and becomes a standby, which the
/// winner then brings to its state.
async fn fence(volume: &VolumeLink, link: &Link, epoch: u64) {
    let roles = volume.roles.clone();
    // The node this one just handed over to, meeting it before its own demotion is
    // through: local writes have been refused since everything was acknowledged, so
    // there is nothing of this node's to keep, and this is the handover's demotion.
    let handed_over = volume
        .handed_over
        .load(std::sync::atomic::Ordering::Acquire)
        == roles.get().epoch
        && volume.volume.role() == Role::Standby;
    if handed_over {
        tracing::info!(volume = %volume.name, peer = %link.peer, epoch,
            "the node this one handed over to is active; stepping down");
        let demoted = tokio::task::spawn_blocking(move || roles.demote(epoch, "manual")).await;
        if !matches!(demoted, Ok(Ok(_))) {
            tracing::error!(volume = %volume.name, ?demoted, "cannot persist the handover");
        }
        return;
    }
    tracing::warn!(volume = %volume.name, peer = %link.peer, epoch,
        "fenced: another node is active with a later epoch (or wins the tie); stepping down");
    let conflicts = volume.conflicts.clone();
    let demoted = tokio::task::spawn_blocking(move || {
        // Armed before the role changes: the winner's full sync keeps what it replaces
        // even if this node restarts in between.
        if let Err(e) = conflicts.arm(epoch, unix_now()) {
            tracing::error!(error = %e, dir = %conflicts.dir().display(),
                "cannot arm the conflicts area: this node's own writes will be overwritten");
        }
        roles.demote(epoch, "fenced")
    });
    match demoted.await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(volume = %volume.name, error = %e,
            "fenced, local writes refused, but the new role could not be persisted"),
        Err(e) => tracing::error!(volume = %volume.name, error = %e, "fencing failed"),
    }
}

/// Keeps this node's version of what `op` (from the winner's full sync after a
/// fencing) is about to replace or delete. `Err` (logged) if it could not: the op
/// must not be applied.
async fn keep_before(volume: &VolumeLink, op: &Op) -> Result<(), String> {
    let (path, what) = match op {
        // Anything put but a directory's metadata: new content, a file's metadata
        // alone (this node's chmod, say), a symlink or a special file in its place.
        Op::Put { entry, content } if content.is_some() || entry.meta.kind != Kind::Dir => {
            (entry.path.clone(), "replaced")
        }
        Op::PutStream { entry } => (entry.path.clone(), "replaced"),
        Op::Link { path, .. } => (path.clone(), "replaced"),
        // (A full sync sends no renames: while keeping lasts past one, a rename's
        // target is this node's to keep too.)
        Op::Rename {
            to,
            exchange: false,
            ..
        } => (to.clone(), "replaced"),
        Op::Delete { path } => (path.clone(), "deleted"),
        _ => return Ok(()),
    };
    let v = volume.clone();
    let kept = tokio::task::spawn_blocking(move || {
        // What a write still under way (stuck when this node stopped being the
        // active) leaves, not what was there before it.
        v.volume.wait_for_writes();
        let applier = Applier::new(v.root.as_fd());
        // (`never` paths below a deleted directory stay where they are; but all of a
        // `never` path itself goes, as `delete_for_active` does.)
        let never = |p: &RelPath| v.policies.resolve(p.as_path()).sync == SyncMode::Never;
        let skip = |p: &RelPath| !never(&path) && never(p);
        v.conflicts
            .keep(&applier, &path, what, &skip)
            .map_err(|e| (path, e))
    })
    .await;
    match kept {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((path, e))) => {
            tracing::error!(volume = %volume.name, %path, error = %e,
                "cannot keep this node's version in the conflicts area; not replacing it");
            Err(e)
        }
        Err(e) => {
            tracing::error!(volume = %volume.name, error = %e,
                "keeping this node's version in the conflicts area failed; not replacing it");
            Err(e.to_string())
        }
    }
}

/// Returns the heap's free memory to the system (glibc keeps it otherwise).
fn release_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Puts the session's figures on the board; `full_syncs_done` is how many of its full
/// syncs were known to have completed at the last report.
fn report(
    link: &Link,
    volume: &VolumeLink,
    session: &Session,
    full_syncs_done: &mut u64,
    sent: u64,
    received: u64,
) {
    let stats = session.stats();
    let phase = session.phase();
    let active = session.role() == Role::Active;
    let completed = stats.full_syncs_done > *full_syncs_done;
    *full_syncs_done = stats.full_syncs_done;
    link.update(&volume.name, |s| {
        if completed {
            s.full_sync_done = Some(unix_now());
        }
        // With `pending`, in one update: a demotion reads both at once.
        s.refused_unrepaired = session.refused();
        s.full_sync = match phase {
            crate::session::Phase::Hello if s.full_sync_done.is_none() => "never",
            crate::session::Phase::FullSync => "in progress",
            _ if s.full_sync_done.is_some() || (active && stats.full_syncs > 0) => "done",
            _ => "never",
        }
        .into();
        s.full_sync_ops = stats.full_sync_ops;
        s.full_sync_ops_done = stats.full_sync_ops_done;
        s.full_sync_bytes = stats.full_sync_bytes;
        s.full_sync_bytes_done = stats.full_sync_bytes_done;
        s.full_sync_percent = percent(
            stats.full_sync_bytes_done,
            stats.full_sync_bytes,
            stats.full_sync_ops_done,
            stats.full_sync_ops,
            phase == crate::session::Phase::FullSync,
        );
        s.pending_bytes = stats.unacked_bytes;
        s.ops = stats.ops;
        s.acked = stats.acked;
        s.pending = stats.queued as u64 + stats.ops.saturating_sub(stats.acked).min(stats.ops);
        // Refusals are rare: rebuild their list only when one was added.
        if s.rejected != stats.rejected {
            s.rejected_paths = session
                .rejected_paths()
                .map(|(p, why)| format!("{p}: {why}"))
                .collect();
        }
        s.rejected = stats.rejected;
        s.bytes_sent = sent;
        s.bytes_received = received;
    });
}

/// Full-sync progress in percent: by bytes when there are any, else by ops; 100 once
/// it is over, 0 while the total is not yet known.
fn percent(bytes_done: u64, bytes: u64, ops_done: u64, ops: u64, running: bool) -> u8 {
    let (done, total) = if bytes > 0 {
        (bytes_done, bytes)
    } else {
        (ops_done, ops)
    };
    match (running, total) {
        (false, _) => 100,
        (true, 0) => 0,
        (true, t) => (done.min(t) * 100 / t) as u8,
    }
}

/// The stream a session (or a probe) writes its messages to.
///
/// An active writes in place: while a standby's flow control holds it back, its
/// session loop waits, and so a slow standby slows what the active reads and ships
/// for it. A standby's session hands its frames to a task of its own and never waits
/// on the active: were both loops waiting for the other to read (the active shipping
/// its changes, the standby its upstream writes or a verify manifest), neither would
/// read again, and the session would hang with both nodes connected.
///
/// An active's session gives up on a standby that reads nothing of what it writes and
/// says nothing for the peer timeout, as it does when it has nothing to write: its
/// loop, waiting to write, takes no messages and runs no timers meanwhile.
enum Control {
    InPlace(quinn::SendStream, Option<Silence>),
    Queued(Queued),
}

/// How long a write in place waits while nothing is heard from the peer.
#[derive(Clone)]
struct Silence {
    /// Bytes received from the peer so far.
    heard: [Arc<std::sync::atomic::AtomicU64>; 2],
    limit: Duration,
}

impl Silence {
    fn heard(&self) -> u64 {
        self.heard
            .iter()
            .map(|h| h.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }
}

/// A standby's control stream, written by [`Queued::writer`]. (What waits in it is
/// bounded by what the standby sends: acks of the active's ops in flight, upstream
/// writes within their window, a manifest.)
struct Queued {
    /// Frames for the writer, in order; `None` once finished.
    frames: Option<mpsc::UnboundedSender<Vec<u8>>>,
}

impl Queued {
    async fn writer(mut send: quinn::SendStream, mut frames: mpsc::UnboundedReceiver<Vec<u8>>) {
        while let Some(frame) = frames.recv().await {
            // (A broken stream drops `frames`: the loop's next write fails.)
            if transport::write_frame(&mut send, &frame).await.is_err() {
                return;
            }
        }
        let _ = send.finish();
    }
}

impl Control {
    /// Written in place, for a probe (which has a time limit of its own).
    fn in_place(send: quinn::SendStream) -> Control {
        Control::InPlace(send, None)
    }

    /// Written in place, for an active's session: a write fails once it has waited
    /// for `silence.limit` with nothing heard from the peer.
    fn watched(send: quinn::SendStream, silence: Silence) -> Control {
        Control::InPlace(send, Some(silence))
    }

    /// Written by a task of its own, for a standby's session.
    fn queued(send: quinn::SendStream) -> Control {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(Queued::writer(send, rx));
        Control::Queued(Queued { frames: Some(tx) })
    }

    /// Writes one message; the bytes it takes on the wire, or `None` if the stream
    /// broke.
    async fn write(&mut self, message: &Message) -> Option<u64> {
        match message.encode() {
            Ok(bytes) => self.write_bytes(bytes).await,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode a message");
                None
            }
        }
    }

    async fn write_bytes(&mut self, bytes: Vec<u8>) -> Option<u64> {
        let len = bytes.len() as u64 + 4;
        match self {
            Control::InPlace(send, None) => transport::write_frame(send, &bytes).await.ok()?,
            Control::InPlace(send, Some(silence)) => {
                let gave_up = {
                    let write = transport::write_frame(send, &bytes);
                    tokio::pin!(write);
                    let mut heard = silence.heard();
                    let mut since = Instant::now();
                    loop {
                        tokio::select! {
                            written = &mut write => {
                                written.ok()?;
                                break false;
                            }
                            () = tokio::time::sleep(silence.limit / 8) => {
                                let now = silence.heard();
                                if now != heard {
                                    (heard, since) = (now, Instant::now());
                                } else if since.elapsed() >= silence.limit {
                                    break true;
                                }
                            }
                        }
                    }
                };
                if gave_up {
                    tracing::warn!(silent = ?silence.limit,
                        "the peer reads nothing this node sends and says nothing; ending the session");
                    // (Half a frame may be out: the stream ends as broken, not
                    // cleanly, and takes no more.)
                    let _ = send.reset(quinn::VarInt::from_u32(0));
                    return None;
                }
            }
            Control::Queued(q) => q.frames.as_ref()?.send(bytes).ok()?,
        }
        Some(len)
    }

    /// No more messages: the stream ends once what was handed over is written.
    fn finish(&mut self) {
        match self {
            Control::InPlace(send, _) => {
                let _ = send.finish();
            }
            Control::Queued(q) => q.frames = None,
        }
    }

    /// [`Control::finish`], then waits (at most `wait`) until the peer has read it
    /// all (written in place only).
    async fn finish_read(&mut self, wait: Duration) {
        self.finish();
        if let Control::InPlace(send, _) = self {
            let _ = tokio::time::timeout(wait, send.stopped()).await;
        }
    }
}

/// Awaits `work` (a scan of the whole volume, which takes minutes on a large one),
/// sending a heartbeat every [`HEARTBEAT`] meanwhile and adding their bytes to
/// `sent`: the peer would otherwise take this node for silent, its session after
/// the peer timeout, a standby's automatic failover after the volume's
/// `peer_timeout`. `None` if the stream broke.
async fn heartbeating<T>(
    send: &mut Control,
    sent: &mut u64,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::pin!(work);
    loop {
        tokio::select! {
            biased;
            done = &mut work => return Some(done),
            () = tokio::time::sleep(HEARTBEAT) => *sent += send.write(&Message::Heartbeat).await?,
        }
    }
}

/// Carries out one output: the bytes it sent, or `None` to end the session.
async fn carry_out(
    volume: &VolumeLink,
    session: &mut Session,
    send: &mut Control,
    out: Output,
) -> Option<u64> {
    match out {
        Output::Send(m) => send.write(&m).await,
        // Handled by `run_session` before they get here.
        Output::Fenced { .. } | Output::Follow { .. } | Output::Ship(_) => Some(0),
        Output::ScanLocal => {
            let mut sent = 0;
            let m = heartbeating(send, &mut sent, scan_for_standby(volume)).await??;
            session.local_manifest(m, std::time::Instant::now());
            Some(sent)
        }
        Output::Apply { seq, op } => {
            apply_now(volume, session, seq, op, None).await;
            Some(0)
        }
        Output::InSync => {
            tracing::info!(volume = %volume.name, "in sync with the active");
            Some(0)
        }
        Output::Close(reason) => {
            tracing::info!(volume = %volume.name, %reason, "session closed");
            None
        }
    }
}

/// Applies op `seq` in the background ([`apply_op`], ending `turn` there) and tells
/// the session how it went; the op back if it was applied.
async fn apply_now(
    volume: &VolumeLink,
    session: &mut Session,
    seq: u64,
    op: Op,
    turn: Option<twinfs_fs::ApplyTurn>,
) -> Option<Op> {
    let v = volume.clone();
    let path = op.path().clone();
    let applied = tokio::task::spawn_blocking(move || {
        let result = apply_op(&v, &op, turn);
        (op, result)
    })
    .await;
    let (op, result) = match applied {
        Ok((op, Ok(()))) => (Some(op), Ok(())),
        Ok((_, Err(e))) => {
            tracing::warn!(volume = %volume.name, %path, error = %e, "refused or failed to apply");
            (None, Err(e.to_string()))
        }
        Err(_) => (None, Err("apply task failed".to_owned())),
    };
    session.applied(seq, &path, result, std::time::Instant::now());
    op
}

/// What reading a [`Ship`] gave: its number, its path, [`read_op`]'s result,
/// whether its change was made to a file with several names ([`FileId::linked`]),
/// and for a copy ([`Ship::copy`]) whether what it found has several names.
///
/// [`FileId::linked`]: twinfs_fs::FileId::linked
type ShipRead = (
    u64,
    RelPath,
    Result<(Op, bool, Option<Streamed>), manifest::ManifestError>,
    bool,
    Option<bool>,
);

/// A large file to send on a stream of its own: the open file, and its block list
/// if it was read from the same pass as the hash its op announces.
struct Streamed {
    file: OwnedFd,
    /// The size and content hash the op announced: bytes read that do not make them
    /// are another version (the file changed since its hash was taken).
    announced: (u64, u128),
    /// Its block list, if the pass that hashed it made one.
    blocks: Option<BlockList>,
    /// Without one, for a file the mount watches: where the send, which reads the
    /// whole file then, leaves the list it makes on the way
    /// ([`HashCache::adopt`]), so the file's next change reads only its written
    /// blocks.
    adopt: Option<Adopt>,
}

/// See [`Streamed::adopt`].
struct Adopt {
    cache: Arc<Mutex<HashCache>>,
    key: (u64, u64),
    token: u64,
}

impl Adopt {
    /// Leaves the list of `file`, read whole (`len` bytes, blocks of `block_size`
    /// whose hashes are `hashes`), in the cache, if `file` is the file watched.
    fn give(self, file: std::os::fd::BorrowedFd<'_>, len: u64, hashes: Vec<u128>, block_size: u32) {
        let same = twinfs_fs::sys::fstat(file).is_ok_and(|st| (st.st_dev, st.st_ino) == self.key);
        let generation = twinfs_fs::sys::generation(file);
        let (true, Ok(generation)) = (same, generation) else {
            return;
        };
        let list = BlockList { block_size, hashes };
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .adopt(self.key, self.token, generation, len, list);
    }
}

/// Reads the file of `ship` (see [`read_op`]; `small` is [`is_small`] of its path).
fn read_ship(volume: &VolumeLink, ship: Ship, can_stream: bool, small: bool) -> ShipRead {
    let linked = ship.file.as_ref().is_some_and(|f| f.linked);
    let read = read_op(
        volume,
        ship.path.clone(),
        ship.content,
        ship.standby_hash.map(|h| *h),
        ship.delete_if_missing,
        ship.link,
        ship.file.map(|f| *f),
        ship.dir,
        can_stream,
        small,
    );
    // A copy: whether what it found is one of several names of a file (one held back
    // too: being written, its writer's close ships it under the name it was opened
    // by, and this may be another of its names).
    let copy = ship.copy.then(|| match &read {
        Ok((Op::Put { entry, .. } | Op::PutStream { entry }, false, _)) => {
            entry.meta.link().is_some()
        }
        Ok((Op::Skip { .. }, false, _)) => {
            twinfs_fs::sys::statat(volume.root.as_fd(), ship.path.as_path().as_os_str())
                .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_nlink > 1)
        }
        _ => false,
    });
    (ship.seq, ship.path, read, linked, copy)
}

/// Reads the files of `ships` and sends their ops, in order. One ship (a change on
/// its own) is read by the session's task if it is small: a hop to the blocking pool
/// and back would cost more than reading it, on the path of every change's latency.
/// Ships that come in a row (a full sync, a burst of changes) are read at once by a
/// few blocking threads: the disk gets several reads to work on and both cores a
/// share, where one by one the session's task waited on each read in turn. The caller
/// gathers at most [`SHIP_GATHER`], so at most that many files are held in memory.
/// Active: the volume's change records, as the session's loop takes them.
struct Records<'a> {
    changes: &'a mut Option<broadcast::Receiver<Numbered>>,
    /// The number of the last record taken.
    seen: &'a mut u64,
}

/// How long [`catch_up_renames`] waits at most for renames under way to be recorded.
const RENAME_SETTLE: Duration = Duration::from_millis(20);

/// Active, after reading ships and before sending them: gives the session the
/// records of every rename those reads could have seen. A read finds what is at a
/// path at that moment; a rename made meanwhile, whose record the session has not
/// had yet, may have moved what the ship was about away and put something else at
/// the path (an exchange, a file renamed over it). Sent ahead of the rename, that
/// would replace on the standby what the rename is to move: a directory with all
/// below it, or a file that then arrives under its new name with another content.
/// Waits (briefly) for renames under way to make their records, then takes every
/// record waiting.
async fn catch_up_renames(volume: &VolumeLink, session: &mut Session, records: &mut Records<'_>) {
    let begun = volume.volume.renames_begun();
    let deadline = std::time::Instant::now() + RENAME_SETTLE;
    // Recorded (in the channel: a `sync` rename then waits for the sessions, this one
    // among them), or ended without a record.
    let through = || {
        volume
            .gate
            .renames
            .load(std::sync::atomic::Ordering::SeqCst)
            + volume.volume.renames_unrecorded()
            >= begun
    };
    while !through() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let Some(rx) = records.changes.as_mut() else {
        return;
    };
    loop {
        match rx.try_recv() {
            Ok((id, record)) => {
                *records.seen = id;
                session.on_change(&record, std::time::Instant::now());
            }
            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                tracing::info!(volume = %volume.name, missed = n, "change stream lagged; resyncing");
                session.resync();
                *records.seen = (*records.seen).max(volume.gate.last_issued());
            }
            Err(_) => break,
        }
    }
}

/// What a read found, unless an op the session now knows of (see
/// [`catch_up_renames`]) moved the path, or a directory above it, away since the
/// ship's change, or removes it: then whatever is there came later, and goes as gone
/// ([`Session::ship_superseded`]); a rename ships it under its new name.
fn unless_superseded(session: &Session, read: &mut ShipRead) {
    let (seq, path, result, linked, _) = read;
    if let Ok((op, vanished, source)) = result {
        if !*vanished && session.ship_superseded(*seq, path, *linked) {
            *op = Op::Skip { path: path.clone() };
            *vanished = true;
            *source = None;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn ship(
    volume: &VolumeLink,
    session: &mut Session,
    send: &mut Control,
    mut ships: Vec<Ship>,
    records: &mut Records<'_>,
    link: &Link,
    counters: &StreamCounters,
    tag: u64,
) -> Option<u64> {
    let can_stream = link.connection.is_some() && link.streams.is_some();
    // (Reading a large file whole, its first change since this node started, takes
    // a while: heartbeats go out meanwhile.)
    let mut sent = 0;
    if ships.len() == 1 {
        let one = ships.pop()?;
        let small = is_small(volume, &one.path);
        let mut read = if small {
            read_ship(volume, one, can_stream, small)
        } else {
            let v = volume.clone();
            let reading =
                tokio::task::spawn_blocking(move || read_ship(&v, one, can_stream, small));
            heartbeating(send, &mut sent, reading).await?.ok()?
        };
        catch_up_renames(volume, session, records).await;
        unless_superseded(session, &mut read);
        return Some(sent + send_ship(volume, session, send, read, link, counters, tag).await?);
    }
    let mut groups: Vec<Vec<(usize, Ship)>> = (0..SHIP_READERS).map(|_| Vec::new()).collect();
    let count = ships.len();
    // Ships of one path stay in one group, read in their order: read by two threads,
    // a later op could carry an older version than an earlier one and leave the
    // standby with it.
    for (i, ship) in ships.into_iter().enumerate() {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&ship.path, &mut hasher);
        let group = std::hash::Hasher::finish(&hasher) as usize % SHIP_READERS;
        groups[group].push((i, ship));
    }
    let tasks: Vec<_> = groups
        .into_iter()
        .filter(|g| !g.is_empty())
        .map(|group| {
            let v = volume.clone();
            tokio::task::spawn_blocking(move || {
                group
                    .into_iter()
                    .map(|(i, ship)| {
                        let small = is_small(&v, &ship.path);
                        (i, read_ship(&v, ship, can_stream, small))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut reads: Vec<Option<ShipRead>> = (0..count).map(|_| None).collect();
    let all = async {
        let mut all = Vec::with_capacity(tasks.len());
        for task in tasks {
            all.push(task.await.ok()?);
        }
        Some(all)
    };
    for (i, read) in heartbeating(send, &mut sent, all)
        .await??
        .into_iter()
        .flatten()
    {
        reads[i] = Some(read);
    }
    catch_up_renames(volume, session, records).await;
    for read in reads.iter_mut().flatten() {
        unless_superseded(session, read);
    }
    gone_below_gone(&mut reads);
    for read in reads {
        sent += send_ship(volume, session, send, read?, link, counters, tag).await?;
    }
    Some(sent)
}

/// Ships read side by side may find a path whose directory, shipped before it and
/// read a moment later by another thread, was gone (renamed away, say): the standby
/// would have nowhere to put it. It is sent as gone too; what became of the directory
/// follows, and with it the path under its new name.
fn gone_below_gone(reads: &mut [Option<ShipRead>]) {
    let mut gone: Vec<RelPath> = Vec::new();
    for (_, path, result, ..) in reads.iter_mut().flatten() {
        let Ok((op, vanished, source)) = result else {
            continue;
        };
        if *vanished {
            gone.push(path.clone());
        } else if matches!(op, Op::Put { .. } | Op::PutStream { .. })
            && gone.iter().any(|g| path.starts_with(g) && path != g)
        {
            *op = Op::Skip { path: path.clone() };
            *vanished = true;
            *source = None;
            gone.push(path.clone());
        }
    }
}

/// The kind of an op, for the log.
fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Put {
            content: Some(_), ..
        } => "put",
        Op::Put { content: None, .. } => "put-meta",
        Op::PutStream { .. } => "put-stream",
        Op::Rename { .. } => "rename",
        Op::Link { .. } => "link",
        Op::Delete { .. } => "delete",
        Op::Skip { .. } => "skip",
    }
}

/// The size an op puts, for the log.
fn op_size(op: &Op) -> Option<u64> {
    match op {
        Op::Put { entry, .. } | Op::PutStream { entry } => Some(entry.meta.size),
        _ => None,
    }
}

/// The first name of the hard-linked file an op puts, or the name it links to.
fn op_link(op: &Op) -> Option<&RelPath> {
    match op {
        Op::Put { entry, .. } | Op::PutStream { entry } => entry.meta.link(),
        Op::Link { existing, .. } => Some(existing),
        _ => None,
    }
}

/// Ships read at once at most ([`ship`]), and the threads reading them.
const SHIP_GATHER: usize = 16;
const SHIP_READERS: usize = 4;

/// Sends the op a [`Ship`] was read into (and starts the stream of a large file's
/// blocks).
async fn send_ship(
    volume: &VolumeLink,
    session: &mut Session,
    send: &mut Control,
    read: ShipRead,
    link: &Link,
    counters: &StreamCounters,
    tag: u64,
) -> Option<u64> {
    let (seq, shipped, read, linked, copy) = read;
    let (op, vanished, source) = match read {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(volume = %volume.name, error = %e, "cannot read a change to ship");
            return None;
        }
    };
    let outcome = match &op {
        _ if vanished => Shipped::Gone,
        Op::Put {
            content: Some(c), ..
        } => Shipped::Sent {
            bytes: c.len() as u64,
        },
        Op::PutStream { entry } => Shipped::Sent {
            bytes: entry.meta.size,
        },
        // A further name of a hard-linked file: a link to its first name, no bytes.
        Op::Put { content: None, .. } | Op::Link { .. } => Shipped::Sent { bytes: 0 },
        // Only a missing path is sent as a deletion.
        Op::Delete { .. } => Shipped::Gone,
        Op::Skip { .. } | Op::Rename { .. } => Shipped::Held,
    };
    tracing::debug!(volume = %volume.name, seq, path = %shipped, op = op_name(&op),
        size = op_size(&op), link = ?op_link(&op), vanished, linked, "ship read");
    session.shipped(seq, &shipped, outcome, std::time::Instant::now());
    if vanished && linked {
        // A change to a hard-linked file, recorded under a name that is gone (or holds
        // another file) when it is read: the change shows through the file's other
        // names, whose copies on the standby are linked to its copy of this one, which
        // the ops behind remove or replace; they would keep the old version. Where
        // those names are, only a walk of the volume would tell, and a ship of one now
        // could come before the ops that make its directory there: a comparison of
        // manifests sets them right, once the ops sent so far are acknowledged.
        tracing::info!(volume = %volume.name, path = %shipped,
            "a changed hard-linked file lost the name it was recorded under; comparing manifests");
        session.resync();
    } else if copy == Some(true) && !vanished {
        // In place of a link or a rename that could not go as one, and one of several
        // names of a file now (or held back): the standby's copy is a file of its own
        // (or missing) until a comparison of manifests sets it right (once the ops
        // sent so far are acknowledged).
        tracing::info!(volume = %volume.name, path = %shipped,
            "a name of a hard-linked file went as a copy; comparing manifests");
        session.resync();
    }
    if let Some(streamed) = source {
        tokio::spawn(stream_file(
            link.clone(),
            tag,
            seq,
            streamed,
            shipped.clone(),
            counters.clone(),
        ));
    }
    match (Message::Op { seq, op }).encode() {
        Ok(bytes) => send.write_bytes(bytes).await,
        // Files travel whole in one message for now: one that does not fit is
        // left out (and said so), not allowed to break the session.
        Err(ProtocolError::TooLarge(size)) => {
            tracing::error!(volume = %volume.name, path = %shipped, size,
                        "file too large to replicate (limit {MAX_MESSAGE} bytes); skipped");
            let op = Op::Skip { path: shipped };
            send.write(&Message::Op { seq, op }).await
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode a message");
            None
        }
    }
}

/// The directories holding names left out of a scan for a path longer than
/// `PATH_MAX`, each with how many, for a log line: `"a/b" (2), "c" (1)`.
fn too_long_shown(below: &std::collections::BTreeMap<RelPath, u64>) -> String {
    let shown: Vec<String> = below
        .iter()
        .map(|(dir, n)| format!("{dir} ({n})"))
        .collect();
    shown.join(", ")
}

/// Names a scan left out for a path longer than `PATH_MAX`: the first directories
/// that hold them, each with how many, and how many in all.
type TooLong = (std::collections::BTreeMap<RelPath, u64>, u64);

/// The volume's manifest with every file hashed now (`twinfs verify`), `never` paths
/// left out; and the names left out for a path longer than `PATH_MAX`.
fn scan_fresh(volume: &VolumeLink) -> Result<(Manifest, TooLong), manifest::ManifestError> {
    let policies = &volume.policies;
    let mut cache = HashCache::new();
    let manifest = manifest::scan(
        volume.root.as_fd(),
        |path, _| policies.resolve(path.as_path()).sync != SyncMode::Never,
        &mut cache,
    )?;
    let too_long = (cache.too_long_below().clone(), cache.last_scan().too_long);
    Ok((manifest, too_long))
}

/// Standby: answers a `twinfs verify` with a freshly hashed manifest.
async fn answer_verify(
    volume: &VolumeLink,
    send: &mut Control,
    sent: &mut u64,
    id: u64,
) -> Option<()> {
    let v = volume.clone();
    let scanned = heartbeating(
        send,
        sent,
        tokio::task::spawn_blocking(move || scan_fresh(&v)),
    )
    .await?;
    let manifest = match scanned {
        Ok(Ok((m, _))) => m,
        // No answer: the active reports that this standby did not answer (an empty
        // manifest would claim every path differs).
        Ok(Err(e)) => {
            tracing::error!(volume = %volume.name, error = %e, "verify: cannot scan the volume");
            return Some(());
        }
        Err(e) => {
            tracing::error!(volume = %volume.name, error = %e, "verify: scan failed");
            return Some(());
        }
    };
    for (entries, done) in manifest.parts(crate::protocol::MANIFEST_CHUNK) {
        *sent += send
            .write(&Message::VerifyManifest { id, entries, done })
            .await?;
    }
    Some(())
}

/// Active: the paths where the standby's fresh manifest differs from this node's.
async fn compare_fresh(
    volume: &VolumeLink,
    theirs: Vec<manifest::Entry>,
) -> Result<Vec<String>, String> {
    let v = volume.clone();
    let (ours, (too_long, too_long_in_all)) = tokio::task::spawn_blocking(move || scan_fresh(&v))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let mut standby = Manifest::new();
    for entry in theirs {
        standby.insert(entry);
    }
    let diff = manifest::diff(&ours, &standby, |_| 2);
    let mut paths: Vec<String> = diff
        .send
        .iter()
        .map(|t| &t.path)
        .chain(diff.delete.iter())
        .map(|p| {
            let differ = how_they_differ(ours.get(p), standby.get(p));
            match p.is_root() {
                true => format!("the volume root ({differ})"),
                false => format!("{p} ({differ})"),
            }
        })
        .collect();
    paths.sort();
    paths.dedup();
    // In neither manifest: no peer can name them.
    const NOT: &str = "path longer than PATH_MAX, 4096 bytes: not replicated";
    paths.extend(too_long.iter().map(|(dir, n)| {
        let dir = match dir.is_root() {
            true => "the volume root".to_owned(),
            false => dir.to_string(),
        };
        format!("{n} name(s) in {dir} ({NOT})")
    }));
    let rest = too_long_in_all.saturating_sub(too_long.values().sum());
    if rest > 0 {
        paths.push(format!("{rest} name(s) in other directories ({NOT})"));
    }
    Ok(paths)
}

/// What differs between the active's and a standby's entry of one path, for
/// `twinfs verify`: "missing on the standby", or the fields, such as "content, mtime".
fn how_they_differ(ours: Option<&manifest::Meta>, theirs: Option<&manifest::Meta>) -> String {
    let (ours, theirs) = match (ours, theirs) {
        (Some(o), Some(t)) => (o, t),
        (Some(_), None) => return "missing on the standby".into(),
        (None, _) => return "only on the standby".into(),
    };
    let fields = [
        ("kind", ours.kind != theirs.kind),
        ("content", ours.hash != theirs.hash),
        ("size", ours.size != theirs.size),
        ("mode", ours.mode != theirs.mode),
        ("owner", (ours.uid, ours.gid) != (theirs.uid, theirs.gid)),
        ("mtime", ours.mtime != theirs.mtime),
        ("link target", ours.target() != theirs.target()),
        ("xattrs", ours.xattrs() != theirs.xattrs()),
        ("device", ours.rdev() != theirs.rdev()),
        ("hard links", ours.link() != theirs.link()),
    ];
    let differ: Vec<&str> = fields.iter().filter(|f| f.1).map(|f| f.0).collect();
    if differ.is_empty() {
        "metadata".into()
    } else {
        differ.join(", ")
    }
}

fn scan(volume: &VolumeLink) -> Result<Manifest, manifest::ManifestError> {
    // A full sync starts: the block lists kept since the last one go (the node may
    // have been active meanwhile, its files written by others than the replicator).
    volume
        .blocks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    let mut cache = volume.cache.lock().unwrap_or_else(|e| e.into_inner());
    let policies = &volume.policies;
    let manifest = manifest::scan(
        volume.root.as_fd(),
        |path, _| policies.resolve(path.as_path()).sync != SyncMode::Never,
        &mut cache,
    )?;
    let stats = cache.last_scan();
    tracing::info!(volume = %volume.name, entries = manifest.len(), hashed_bytes = stats.bytes_hashed,
        cached = stats.hits, "scanned");
    if stats.too_long > 0 {
        tracing::warn!(volume = %volume.name, count = stats.too_long,
            below = %too_long_shown(cache.too_long_below()),
            "names whose path is longer than PATH_MAX (4096 bytes) are not replicated");
    }
    // Kept so a restart does not read every file again; losing it only costs time.
    if let Err(e) = cache.store(&volume.cache_file) {
        tracing::warn!(volume = %volume.name, error = %e, "cannot save the hash cache");
    }
    Ok(manifest)
}

/// Files up to this size are read, written and hashed by the session's own task, not
/// in the blocking pool.
const SMALL_FILE: u64 = 64 << 10;

/// Whether `path` is something other than a regular file larger than [`SMALL_FILE`]
/// (a hint from one `fstatat`: a file that grows meanwhile is still handled right,
/// only on the session's task).
fn is_small(volume: &VolumeLink, path: &RelPath) -> bool {
    // A relative path with slashes is fine for fstatat; nothing here follows a symlink
    // but the path's own directories, and only to stat.
    match twinfs_fs::sys::statat(volume.root.as_fd(), path.as_path().as_os_str()) {
        Ok(st) => st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_size as u64 <= SMALL_FILE,
        Err(_) => true,
    }
}

/// The op that ships `path` as it is now, whether it had vanished, and for a large
/// file the open file whose bytes follow on their own stream. `small` is
/// [`is_small`] of the path, taken once by the caller. With `link` ([`Ship::link`]),
/// a further name of a hard-linked file ships as `Op::Link` to its first name; one
/// that is no longer linked ships with its content. With `dir` ([`Ship::dir`]),
/// anything but a directory there counts as gone.
#[allow(clippy::too_many_arguments)]
fn read_op(
    volume: &VolumeLink,
    path: RelPath,
    content: bool,
    standby_hash: Option<u128>,
    delete_if_missing: bool,
    link: bool,
    recorded: Option<twinfs_fs::FileId>,
    dir: bool,
    can_stream: bool,
    small: bool,
) -> Result<(Op, bool, Option<Streamed>), manifest::ManifestError> {
    // Another file at the path than the one its record was about: that one was renamed
    // or removed, and something took its name since (log rotation: `mv log log.1`, a
    // new `log`). What is there now is not sent as it: the standby would give it the
    // old file's later name. It counts as gone; the op saying what became of the old
    // file follows, and the new file's own record ships it.
    let other =
        |st: &twinfs_fs::sys::Stat| recorded.is_some_and(|f| f.key != (st.st_dev, st.st_ino));
    let gone = |path| Ok((Op::Skip { path }, true, None));
    // (Checked first too, so that a new file being written there is not taken for
    // this one, held back.)
    let at = path.as_path().as_os_str();
    if recorded.is_some()
        && twinfs_fs::sys::statat(volume.root.as_fd(), at).is_ok_and(|st| other(&st))
    {
        return gone(path);
    }
    let writers_allowed = volume.volume.role() == Role::Active;
    if writers_allowed && volume.volume.being_written(path.as_path()) {
        // Half written, maybe: its writer's close is recorded and ships it whole.
        // (Once local writes are refused, what is there is final: it ships.)
        return Ok((Op::Skip { path }, false, None));
    }
    let mut blocks = None;
    let mut adopt = None;
    let described = if small {
        // Hashing it costs less than the shared cache's lock could (a scan holds it):
        // small files are hashed afresh.
        manifest::describe(volume.root.as_fd(), &path, &mut HashCache::new())?
    } else {
        let mut cache = volume.cache.lock().unwrap_or_else(|e| e.into_inner());
        // A changed large file is read once: the pass that hashes it also gives the
        // block list its delta is sent by. On an active, the mount tells which of its
        // blocks were written since that list was made: only those are read.
        cache.collect_blocks(can_stream);
        // (Watched on an active node only, also while it holds local writes back;
        // only files worth it, so that the mount keeps few records.)
        if can_stream && volume.roles.get().role == Role::Active {
            let at = path.as_path().as_os_str();
            let large = twinfs_fs::sys::statat(volume.root.as_fd(), at)
                .ok()
                .filter(|st| st.st_size as u64 >= twinfs_fs::written::TRACK_MIN);
            if let Some(st) = large {
                let key = (st.st_dev, st.st_ino);
                let token = cache.watch(key, volume.volume.take_written(key));
                adopt = Some(Adopt {
                    cache: volume.cache.clone(),
                    key,
                    token,
                });
            }
        }
        let described = manifest::describe(volume.root.as_fd(), &path, &mut cache);
        blocks = cache.take_blocks();
        cache.collect_blocks(false);
        described?
    };
    let Some((mut meta, fd, parent)) = described else {
        return if delete_if_missing {
            Ok((Op::Delete { path }, false, None))
        } else {
            gone(path)
        };
    };
    let described_file = stat_of(fd.as_fd(), &path)?;
    // What took a directory's name since (by a rename or exchange behind this ship)
    // sent ahead of that op would replace the directory on the standby, with all the
    // op is to move.
    if other(&described_file) || (dir && meta.kind != Kind::Dir) {
        return gone(path);
    }
    let policies = &volume.policies;
    meta.set_link(manifest::link_identity(
        volume.root.as_fd(),
        &described_file,
        |p, _| policies.resolve(p.as_path()).sync != SyncMode::Never,
    )?);
    // The name removed (or given to another file) since it was described, before or
    // while the walk looked for the file's names: the walk did not find it (or the
    // link count had dropped, and there was no walk), and with the other names seen
    // alone the file would go as one no longer linked, and the standby would cut its
    // other names off from it (seed 1133 of the random workload: they kept an older
    // version). It goes as gone, which for a linked record has the active compare
    // manifests; the op that removed the name follows.
    // (Only a name that is missing or another file's counts: a name of exactly
    // PATH_MAX bytes cannot be stat'ed whole, though it was described.)
    let moved = match twinfs_fs::sys::statat(volume.root.as_fd(), at) {
        Ok(st) => (st.st_dev, st.st_ino) != (described_file.st_dev, described_file.st_ino),
        Err(e) => matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)),
    };
    if moved {
        return gone(path);
    }
    match meta.link() {
        Some(first) if link && *first != path => {
            let existing = first.clone();
            return Ok((Op::Link { path, existing }, false, None));
        }
        _ => {}
    }
    // A name the full sync would have linked, linked no longer: the standby's copy may
    // still be a name of another file, so it gets one of its own.
    let content = content || link;
    let wants_bytes = meta.kind == Kind::File && (content || meta.hash != standby_hash);
    if !wants_bytes {
        let entry = manifest::Entry { path, meta };
        return Ok((
            Op::Put {
                entry,
                content: None,
            },
            false,
            None,
        ));
    }
    let name = path
        .split_last()
        .map(|(_, n)| n.to_owned())
        .unwrap_or_default();
    // The file described, opened for reading through its O_PATH fd (an O_PATH fd
    // cannot be read): by name, what is there may have been replaced since, by a FIFO
    // or a device node, which must not be opened.
    let file = match reopen(fd.as_fd(), &parent, &name) {
        Ok(fd) => fd,
        // Gone between the stat and the open (by name, without /proc), or replaced by
        // a symlink (ELOOP): a later op says what became of it.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ELOOP)) => {
            return gone(path)
        }
        Err(source) => {
            return Err(manifest::ManifestError::Io {
                path,
                op: "open",
                source,
            })
        }
    };
    let opened = stat_of(file.as_fd(), &path)?;
    if (opened.st_dev, opened.st_ino) != (described_file.st_dev, described_file.st_ino) {
        return gone(path);
    }
    if can_stream && meta.size > INLINE_MAX {
        if recorded.is_some() && other(&stat_of(file.as_fd(), &path)?) {
            return gone(path);
        }
        // The standby checks the streamed bytes against the hash: a file that changes
        // while it streams is refused there, never put in place half old, half new.
        let entry = manifest::Entry { path, meta };
        // A list made by the hash needs none made by the send.
        let adopt = adopt.filter(|_| blocks.is_none());
        let streamed = Streamed {
            file,
            announced: (entry.meta.size, entry.meta.hash.unwrap_or_default()),
            blocks,
            adopt,
        };
        return Ok((Op::PutStream { entry }, false, Some(streamed)));
    }
    if !can_stream && meta.size > MAX_MESSAGE as u64 {
        // It could not travel in one message anyway (an upstream write, say): not
        // read into memory first (a file of gigabytes would take the daemon down).
        tracing::error!(volume = %volume.name, %path, size = meta.size,
            "file too large to ship in one message (limit {MAX_MESSAGE} bytes); it stays on this node only");
        return Ok((Op::Skip { path }, false, None));
    }
    let mut buf = vec![0u8; meta.size as usize];
    let read = twinfs_fs::sys::pread(file.as_fd(), &mut buf, 0)
        .and_then(|n| Ok((n, twinfs_fs::sys::fstat(file.as_fd())?)));
    let (n, after) = match read {
        Ok(x) => x,
        Err(source) => {
            return Err(manifest::ManifestError::Io {
                path,
                op: "read",
                source,
            })
        }
    };
    buf.truncate(n);
    if other(&after) {
        return gone(path);
    }
    // Changed while it was read, or a writer opened it meanwhile: what was read may be
    // half of something; the writer's close ships it whole.
    let unchanged = after.st_size as u64 == meta.size
        && (after.st_mtime, after.st_mtime_nsec as u32) == meta.mtime
        && buf.len() as u64 == meta.size;
    if !unchanged || (writers_allowed && volume.volume.being_written(path.as_path())) {
        return Ok((Op::Skip { path }, false, None));
    }
    let entry = manifest::Entry { path, meta };
    Ok((
        Op::Put {
            entry,
            content: Some(buf),
        },
        false,
        None,
    ))
}

/// Opens for reading the file an `O_PATH` fd refers to, through `/proc/self/fd`; by
/// `name` in `parent` where `/proc` is not mounted (the caller checks that it got the
/// same file; `O_NONBLOCK` so that a FIFO put there meanwhile is not waited on).
fn reopen(
    fd: std::os::fd::BorrowedFd<'_>,
    parent: &OwnedFd,
    name: &std::ffi::OsStr,
) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let proc = format!("/proc/self/fd/{}", fd.as_raw_fd());
    match std::fs::File::open(&proc) {
        Ok(file) => Ok(file.into()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !Path::new("/proc/self").exists() => {
            twinfs_fs::sys::openat(parent.as_fd(), name, libc::O_RDONLY | libc::O_NONBLOCK, 0)
        }
        Err(e) => Err(e),
    }
}

fn stat_of(
    fd: std::os::fd::BorrowedFd<'_>,
    path: &RelPath,
) -> Result<twinfs_fs::sys::Stat, manifest::ManifestError> {
    twinfs_fs::sys::fstat(fd).map_err(|source| manifest::ManifestError::Io {
        path: path.clone(),
        op: "stat",
        source,
    })
}

/// Active: sends a large file as a block delta. Waits for the standby's block list
/// (it sends one when it reaches the op), then sends on a stream of its own, headed by
/// the op number, the blocks the standby lacks. Counts the bytes both ways.
async fn stream_file(
    link: Link,
    tag: u64,
    seq: u64,
    Streamed {
        file,
        announced,
        blocks: active,
        adopt,
    }: Streamed,
    path: RelPath,
    counters: StreamCounters,
) {
    let (Some(connection), Some(streams)) = (link.connection, link.streams) else {
        return;
    };
    // The standby asks only when it gets to this op; a refused op never asks.
    let Some(mut recv) = streams.take(tag, seq, BLOCK_LIST_WAIT).await else {
        tracing::debug!(%path, "no block list for a large file; not sent");
        return;
    };
    let list = match read_block_list(&mut recv).await {
        Ok(list) => {
            let bytes = 16 + BlockList::HEADER + BlockList::HASH * list.hashes.len();
            counters
                .received
                .fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
            list
        }
        Err(e) => {
            tracing::warn!(%path, error = %e, "bad block list from the standby");
            return;
        }
    };
    let mut send = match connection.open_uni().await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%path, error = %e, "cannot open a stream for a large file");
            return;
        }
    };
    if send.write_all(&stream_header(tag, seq)).await.is_err() {
        return;
    }
    let (tx, mut rx) = mpsc::channel::<BlockRecord>(4);
    // Reading and hashing are blocking work: a thread reads, this task sends. A read
    // error ends the stream early; the standby's hash check refuses the result.
    tokio::task::spawn_blocking(move || {
        let len = twinfs_fs::sys::fstat(file.as_fd()).map_or(0, |st| st.st_size as u64);
        let planned = active
            .as_ref()
            .filter(|_| len == announced.0)
            .and_then(|a| Some((a, list.runs_against(a, len)?)));
        if let Some((active, runs)) = planned {
            // Its block list was read with its hash: only the differing blocks are
            // read now.
            send_runs(file.as_fd(), &runs, &active.hashes, list.block_size, &tx);
            return;
        }
        let block = list.block_size as usize;
        // The file's own block list, made on the way: it must give the announced hash
        // (else the bytes sent are another version), and is kept for the file's next
        // delta if the mount watches it. Made of the blocks hashed for the standby
        // when its block size is the file's, else hashed apart.
        let own_size = delta::block_size(announced.0);
        let mut made = Vec::<u128>::new();
        let mut apart = (list.block_size != own_size).then(|| delta::BlockHasher::new(own_size));
        // Reads and records of up to a MiB (a whole number of blocks): one wake-up of
        // each side per MiB, not per 64 KiB block.
        let chunk = block.max(SEND_CHUNK);
        let mut offset = 0u64;
        let mut index = 0usize;
        let mut quiet_since = std::time::Instant::now();
        loop {
            let data = match crate::apply::read_new(file.as_fd(), chunk, offset) {
                Ok(d) => bytes::Bytes::from(d),
                // Not a clean end: the records so far are not the whole delta.
                Err(_) => {
                    let _ = tx.blocking_send(Err(UNREADABLE));
                    return;
                }
            };
            // Grown past the size announced: another version (the standby would
            // refuse a block past the end).
            if offset + data.len() as u64 > announced.0 {
                let _ = tx.blocking_send(Err(CHANGED));
                return;
            }
            let hashes: Vec<u128> = data.chunks(block).map(delta::block_hash).collect();
            match apart.as_mut() {
                Some(hasher) => hasher.update(&data),
                None => made.extend_from_slice(&hashes),
            }
            // Runs of consecutive blocks the standby lacks, each one record.
            for run in list.runs_for(index, &hashes, data.len()) {
                let header = delta::record_header(offset + run.start as u64, run.len() as u32);
                if tx.blocking_send(Ok((header, data.slice(run)))).is_err() {
                    return;
                }
                quiet_since = std::time::Instant::now();
            }
            // A long stretch the standby has: say the stream is alive.
            if quiet_since.elapsed() >= KEEP_ALIVE_EVERY {
                let alive = (delta::keep_alive_record(), bytes::Bytes::new());
                if tx.blocking_send(Ok(alive)).is_err() {
                    return;
                }
                quiet_since = std::time::Instant::now();
            }
            index += hashes.len();
            offset += data.len() as u64;
            if data.len() < chunk {
                break;
            }
        }
        // Read whole, to its end: the version announced, or the standby is told to
        // drop what it got (its writer's close, which is yet to come, ships the file).
        let own = match apart {
            Some(hasher) => hasher.finish(),
            None => delta::BlockList {
                block_size: own_size,
                hashes: made,
            },
        };
        if offset != announced.0 || delta::content_hash(&own, offset) != announced.1 {
            let _ = tx.blocking_send(Err(CHANGED));
            return;
        }
        if let Some(adopt) = adopt {
            adopt.give(file.as_fd(), offset, own.hashes, own.block_size);
        }
    });
    let sent = |n: usize| {
        counters
            .sent
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed)
    };
    sent(16);
    while let Some(record) = rx.recv().await {
        let (header, data) = match record {
            Ok(r) => r,
            Err(why) if why == CHANGED => {
                tracing::info!(%path, why, "large file not sent; its next change ships it");
                // Delivered in order after the header, so the standby knows which op
                // it ends, and drops it before writing anything.
                if send.write_all(&delta::abort_record()).await.is_ok() {
                    let _ = send.finish();
                }
                return;
            }
            Err(why) => {
                // No change will ship it again: the stream ends short, the standby's
                // check refuses the op, and the refusal brings a manifest comparison.
                tracing::warn!(%path, why, "large file not sent");
                let _ = send.finish();
                return;
            }
        };
        let len = header.len() + data.len();
        let written = match send.write_all(&header).await {
            Ok(()) if data.is_empty() => Ok(()),
            Ok(()) => send.write_chunk(data).await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            tracing::warn!(%path, error = %e, "large file stream broke");
            return;
        }
        sent(len);
    }
    let path_stats = connection.stats().path;
    tracing::debug!(%path, lost_packets = path_stats.lost_packets,
        congestion_events = path_stats.congestion_events, mtu = path_stats.current_mtu,
        "large file sent");
    let _ = send.finish();
}

/// Reads the byte ranges `runs` (whole blocks of `block_size`) of `file` and puts them
/// on `tx` as records of at most [`SEND_CHUNK`] (or a block). Each block read must
/// still hash to `hashes[i]`: a file that changed since its hash was taken ends the
/// records early, with an error for the stream, and the standby refuses the result.
fn send_runs(
    file: std::os::fd::BorrowedFd<'_>,
    runs: &[std::ops::Range<u64>],
    hashes: &[u128],
    block_size: u32,
    tx: &mpsc::Sender<BlockRecord>,
) {
    let block = u64::from(block_size);
    let chunk = block.max(SEND_CHUNK as u64);
    for run in runs {
        let mut offset = run.start;
        while offset < run.end {
            let want = (run.end - offset).min(chunk);
            let data = match crate::apply::read_new(file, want as usize, offset) {
                Ok(d) if d.len() as u64 == want => bytes::Bytes::from(d),
                Ok(_) => {
                    let _ = tx.blocking_send(Err(CHANGED));
                    return;
                }
                Err(_) => {
                    let _ = tx.blocking_send(Err(UNREADABLE));
                    return;
                }
            };
            let first = (offset / block) as usize;
            let changed = data
                .chunks(block as usize)
                .enumerate()
                .any(|(i, part)| hashes.get(first + i) != Some(&delta::block_hash(part)));
            if changed {
                let _ = tx.blocking_send(Err(CHANGED));
                return;
            }
            let header = delta::record_header(offset, data.len() as u32);
            if tx.blocking_send(Ok((header, data))).is_err() {
                return;
            }
            offset += want;
        }
    }
}

/// One record of a blocks stream, or why the stream must end unfinished.
type BlockRecord = Result<([u8; delta::RECORD_HEADER], bytes::Bytes), &'static str>;

/// Why a large file's stream ends early: it changed while it was read (its writer's
/// close ships it again: the standby keeps its version and is told so by the abort
/// record), or it could not be read (nothing will ship it again: the standby refuses
/// the op).
const CHANGED: &str = "it changed while it was sent";
const UNREADABLE: &str = "the file could not be read";

/// Bytes a large file is read and its records are sent in, at most (a whole number of
/// blocks, at least one).
const SEND_CHUNK: usize = 1 << 20;

/// How long the active keeps a large file open waiting for the standby to ask for it.
const BLOCK_LIST_WAIT: Duration = Duration::from_secs(120);

/// Errors reading a block list or blocks from a stream.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error(transparent)]
    Delta(#[from] delta::DeltaError),
    #[error("stream: {0}")]
    Read(#[from] quinn::ReadExactError),
}

async fn read_block_list(recv: &mut quinn::RecvStream) -> Result<BlockList, StreamError> {
    let mut header = [0u8; BlockList::HEADER];
    recv.read_exact(&mut header).await?;
    let (block_size, count) = BlockList::check_header(header)?;
    let mut bytes = vec![0u8; count as usize * BlockList::HASH];
    recv.read_exact(&mut bytes).await?;
    Ok(BlockList {
        block_size,
        hashes: BlockList::hashes_from(&bytes),
    })
}

/// Reads the records of a blocks stream onto a channel, an error last if the stream
/// broke, held a bad record or brought nothing for `idle`; the channel closes at the
/// stream's clean end.
///
/// Without `idle`, an active whose read of the file hangs (its disk) while QUIC's
/// keep-alives go on would have this wait for ever: the apply would never end, and
/// the standby's session, whose messages wait unread behind it (which counts as
/// hearing the active), would never time the active out.
async fn pump_blocks(
    mut recv: quinn::RecvStream,
    tx: mpsc::Sender<std::io::Result<(u64, Vec<u8>)>>,
    received: Arc<std::sync::atomic::AtomicU64>,
    idle: Duration,
) {
    let silent = || {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("nothing came on the blocks stream for {idle:?}"),
        )
    };
    loop {
        let mut header = [0u8; delta::RECORD_HEADER];
        match tokio::time::timeout(idle, recv.read_exact(&mut header)).await {
            Ok(Ok(())) => {}
            // The clean end: the stream finished between records.
            Ok(Err(quinn::ReadExactError::FinishedEarly(0))) => return,
            Ok(Err(e)) => {
                let _ = tx.send(Err(std::io::Error::other(e))).await;
                return;
            }
            Err(_) => {
                let _ = recv.stop(STREAM_UNWANTED);
                let _ = tx.send(Err(silent())).await;
                return;
            }
        }
        let record = match delta::parse_record_header(header) {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(std::io::Error::other(e))).await;
                return;
            }
        };
        let (mut offset, len) = record;
        if delta::is_abort(offset, len) {
            let _ = tx.send(Err(std::io::Error::other(GaveUp))).await;
            return;
        }
        received.fetch_add(
            delta::RECORD_HEADER as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        // An empty record (the active's keep-alive while it reads a long stretch the
        // standby has) yields nothing below; its header was enough to reset the wait.
        // Passed on in pieces of at most a MiB, gathered from the stream's chunks
        // without zeroing a buffer first.
        let mut left = len as usize;
        while left > 0 {
            let want = left.min(SEND_CHUNK);
            let mut data = Vec::with_capacity(want);
            while data.len() < want {
                match tokio::time::timeout(idle, recv.read_chunk(want - data.len(), true)).await {
                    Ok(Ok(Some(chunk))) => data.extend_from_slice(&chunk.bytes),
                    Ok(Ok(None)) => {
                        let e = std::io::Error::other("the blocks stream ended inside a record");
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    Ok(Err(e)) => {
                        let _ = tx.send(Err(std::io::Error::other(e))).await;
                        return;
                    }
                    Err(_) => {
                        let _ = recv.stop(STREAM_UNWANTED);
                        let _ = tx.send(Err(silent())).await;
                        return;
                    }
                }
            }
            received.fetch_add(want as u64, std::sync::atomic::Ordering::Relaxed);
            if tx.send(Ok((offset, data))).await.is_err() {
                return;
            }
            // (A record past the end of any file: refused when it is written.)
            offset = offset.saturating_add(want as u64);
            left -= want;
        }
    }
}

/// The active gave up on sending a version of a large file: it changed while it was
/// sent ([`CHANGED`]; one it could not read ends its stream short instead, and is
/// refused). Its writer's close, which is still to come, ships it again; until then
/// the standby keeps the version it has. Not a refusal: nothing is left for a
/// manifest comparison to repair.
#[derive(Debug)]
struct GaveUp;

impl std::fmt::Display for GaveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the active gave up on this version (it changed while being sent); its next change ships it")
    }
}

impl std::error::Error for GaveUp {}

/// At most this many names in [`VolumeLink::gave_up`] (see [`GaveUpNames::add`]).
const GAVE_UP_KEPT: usize = 1024;

fn gave_up_names(volume: &VolumeLink) -> std::sync::MutexGuard<'_, GaveUpNames> {
    volume.gave_up.lock().unwrap_or_else(|e| e.into_inner())
}

/// Standby: forgets `path` in [`VolumeLink::gave_up`], and with `below` what lies
/// under it too (it was deleted).
fn forget_gave_up(volume: &VolumeLink, path: &RelPath, below: bool) {
    gave_up_names(volume).forget(path, below);
}

/// Standby: whether `path` is in [`VolumeLink::gave_up`]. Never on an active node:
/// what a standby listed there before its promotion means nothing to the upstream
/// writes it applies (the scan of its next full sync as a standby empties the list).
fn gave_up_on(volume: &VolumeLink, path: &RelPath) -> bool {
    volume.volume.role() == Role::Standby && gave_up_names(volume).contains(path)
}

/// Standby: a rename moves the names of [`VolumeLink::gave_up`] at or below its
/// source to its target (the file the active gave up on is there now, on the active,
/// and its change ships it under that name); without an exchange, those at or below
/// the target were replaced.
fn rename_gave_up(volume: &VolumeLink, from: &RelPath, to: &RelPath, exchange: bool) {
    gave_up_names(volume).rename(from, to, exchange);
}

/// Standby: a version of what is at `path` is in place: it leaves
/// [`VolumeLink::gave_up`]. If it is a file with other names on the active (`linked`:
/// [`has_other_names`]), the names the active gave it while this node had no version of
/// it ([`Op::Link`]s it could not make then) are made names of it now, each by an
/// atomic rename. (One the active has alone no longer has them: the ops saying what
/// they are now follow, or the full sync under way brings them.)
fn link_gave_up_names(
    volume: &VolumeLink,
    applier: &Applier<'_>,
    path: &RelPath,
    linked: bool,
) -> Result<(), ApplyError> {
    let others = {
        let mut names = gave_up_names(volume);
        if linked && volume.volume.role() == Role::Standby {
            names.take_others(path)
        } else {
            names.forget(path, false);
            Vec::new()
        }
    };
    for other in others {
        link_replacing(volume, applier, path, &other)?;
        tracing::debug!(%path, %other, "hard link made with the version the active gave up on");
        invalidate(volume, &other);
    }
    Ok(())
}

/// Whether `meta` is of a regular file with other names on the active.
fn has_other_names(meta: &Meta) -> bool {
    meta.kind == Kind::File && meta.link().is_some()
}

/// Makes `path` another name of the file at `existing`, replacing what is there (a
/// directory goes as on the active: see [`clear_the_way`]).
fn link_replacing(
    volume: &VolumeLink,
    applier: &Applier<'_>,
    existing: &RelPath,
    path: &RelPath,
) -> Result<(), ApplyError> {
    match applier.link(existing, path) {
        Err(ApplyError::IsDirectory { .. }) => {
            clear_the_way(volume, applier, path)?;
            applier.link(existing, path)
        }
        other => other,
    }
}

/// Whether an apply failed only because the active gave up on the version ([`GaveUp`]).
fn gave_up(e: &ApplyError) -> bool {
    matches!(e, ApplyError::Content { source, .. }
        if source.get_ref().is_some_and(|inner| inner.is::<GaveUp>()))
}

/// Standby: applies a `PutStream` op as a block delta: sends the block list of its
/// copy (kept from the last delta when the file has not changed since), then builds
/// the file from the blocks that come back: in place when few bytes changed
/// ([`crate::patch`]), else as a new copy beside it. `Ok(false)`: given up, as the
/// file changed on the active while it came (its next ship brings it).
async fn apply_streamed(
    volume: &VolumeLink,
    link: &Link,
    tag: u64,
    seq: u64,
    entry: manifest::Entry,
    counters: &StreamCounters,
) -> Result<bool, String> {
    let (Some(streams), Some(connection)) = (&link.streams, &link.connection) else {
        return Err("large file announced on a connection without streams".into());
    };
    if entry.path.is_root() {
        return Err(ApplyError::Root { op: "replace" }.to_string());
    }
    let Some(expected) = entry.meta.hash else {
        return Err(format!(
            "large file {} announced without a hash",
            entry.path
        ));
    };
    let v = volume.clone();
    let path = entry.path.clone();
    let (list, stamp) = tokio::task::spawn_blocking(move || {
        let blocks = v.blocks.clone();
        let mut kept = false;
        let list = Applier::new(v.root.as_fd()).block_list_cached(&path, &mut |stamp| {
            let list = blocks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&path, stamp);
            kept = list.is_some();
            list
        });
        tracing::debug!(%path, kept, "block list");
        list
    })
    .await
    .map_err(|_| "block list task failed".to_owned())?
    .map_err(|e| e.to_string())?;
    let mut ask = connection
        .open_uni()
        .await
        .map_err(|e| format!("cannot open a stream: {e}"))?;
    let mut bytes = stream_header(tag, seq).to_vec();
    bytes.extend_from_slice(&list.encode());
    ask.write_all(&bytes)
        .await
        .map_err(|e| format!("cannot send the block list: {e}"))?;
    let _ = ask.finish();
    counters
        .sent
        .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let Some(recv) = streams.take(tag, seq, STREAM_WAIT).await else {
        return Err(format!("the blocks of {} never arrived", entry.path));
    };
    let (tx, mut rx) = mpsc::channel(4);
    let pump = tokio::spawn(pump_blocks(
        recv,
        tx,
        counters.received.clone(),
        PEER_TIMEOUT,
    ));
    let v = volume.clone();
    let path = entry.path.clone();
    let result = tokio::task::spawn_blocking(move || {
        let applier = Applier::new(v.root.as_fd());
        let fm = file_meta(&entry.meta);
        // The records, held while they are few enough to write in place (and the
        // standby's budget for all files has room), counted until the copy made of
        // them, if any, is written.
        let mut held: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut reserved = crate::patch::HELD.reserve();
        // Not a path this standby takes local writes of (`direction = "both"`): one let
        // in while the file is written in place would leave it neither version; a copy
        // is put in place under the turn instead.
        let patchable = stamp.filter(|_| {
            v.volume.role() == Role::Standby
                && entry.meta.size >= crate::patch::MIN_FILE
                && !v.policies.resolve(entry.path.as_path()).upstream()
        });
        if let Some(stamp) = patchable {
            let all_held = hold_records(&mut rx, &mut held, entry.meta.size, &mut reserved)
                .map_err(|source| ApplyError::Content {
                    path: entry.path.clone(),
                    source,
                })?;
            if all_held {
                let _hold = standby_hold(&v, &entry.path)?;
                match patch_in_place(&v, &applier, &entry, &fm, expected, &list, stamp, &held)? {
                    Patched::Done => {
                        note_placed_upstream(&v, &entry);
                        return link_gave_up_names(
                            &v,
                            &applier,
                            &entry.path,
                            has_other_names(&entry.meta),
                        );
                    }
                    Patched::Refused(why) => {
                        tracing::debug!(path = %entry.path, why, "not updated in place");
                    }
                }
            }
        }
        v.blocks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget(&entry.path);
        // The held records first; once they are taken, their reservation goes.
        let mut held = held.into_iter();
        let mut reserved = Some(reserved);
        let mut blocks = std::iter::from_fn(|| match held.next() {
            Some(record) => Some(Ok(record)),
            None => {
                drop(reserved.take());
                rx.blocking_recv()
            }
        });
        let before = linked_before(&applier, &entry)?;
        let mut build = |applier: &Applier<'_>| {
            applier.build_from_blocks(&entry.path, entry.meta.size, &mut blocks, expected, &fm)
        };
        let mut prepared = match build(&applier) {
            Err(ApplyError::IsDirectory { .. }) => {
                let cleared = standby_hold(&v, &entry.path)
                    .and_then(|_hold| clear_the_way(&v, &applier, &entry.path));
                cleared.and_then(|()| build(&applier))
            }
            other => other,
        }?;
        let new_list = prepared
            .take_blocks()
            .filter(|_| entry.meta.size >= crate::patch::MIN_FILE);
        // Whole and checked: readers see it now, while it is made durable (for a
        // large file that is most of the time).
        let mut shown = Shown::new(&v, &prepared);
        if shown.is_some() {
            invalidate(&v, &entry.path);
        }
        prepared.sync_data()?;
        let _hold = standby_hold(&v, &entry.path).inspect_err(|_| prepared.give_up_on_active())?;
        let turn = upstream_turn(&v, &entry.path)?;
        applier.place_prepared(prepared, true)?;
        note_placed_upstream(&v, &entry);
        // What was placed, before a local write let in once the turn goes changes it.
        let placed = applier.stamp(&entry.path);
        drop(turn);
        if let Some(shown) = shown.as_mut() {
            shown.placed = true;
        }
        drop(shown);
        invalidate(&v, &entry.path);
        relink_others(&v, &applier, &entry.path, before)?;
        link_gave_up_names(&v, &applier, &entry.path, has_other_names(&entry.meta))?;
        // Kept for the file's next delta, which then need not read it.
        if let (Some(list), Ok(Some(stamp))) = (new_list, placed) {
            v.blocks.lock().unwrap_or_else(|e| e.into_inner()).put(
                &entry.path,
                stamp,
                Arc::new(list),
            );
        }
        Ok::<(), ApplyError>(())
    })
    .await;
    pump.abort();
    match result {
        // (Its names left the gave-up list as it was placed: `link_gave_up_names`.)
        Ok(Ok(())) => Ok(true),
        Ok(Err(e)) if gave_up(&e) => {
            tracing::debug!(%path, "{GaveUp}");
            gave_up_names(volume).add(path);
            Ok(false)
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("apply task failed".into()),
    }
}

/// Takes records from `rx` into `held` while they are few enough to write in place
/// into a file of `size` bytes: true if that took them all (the stream ended), false
/// if it stopped at one too many (the rest are still on `rx`).
fn hold_records(
    rx: &mut mpsc::Receiver<std::io::Result<(u64, Vec<u8>)>>,
    held: &mut Vec<(u64, Vec<u8>)>,
    size: u64,
    reserved: &mut crate::patch::Held<'_>,
) -> std::io::Result<bool> {
    let mut bytes = 0u64;
    while let Some(record) = rx.blocking_recv() {
        let record = record?;
        let len = record.1.len() as u64;
        bytes += len;
        let room = reserved.take(len);
        held.push(record);
        if !room || !crate::patch::worth_patching(bytes, size) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// How long an in-place update waits for readers of the file to close it (new opens
/// wait meanwhile) before it writes a new copy beside it instead.
const PATCH_WAIT: Duration = Duration::from_millis(20);

/// What became of an attempt to update a file in place.
enum Patched {
    /// Updated (in place, or by a new copy when the write in place failed), durable,
    /// checked.
    Done,
    /// Not attempted, for the reason given: the caller builds a new copy instead.
    Refused(&'static str),
}

/// Standby: updates the large file `entry` in place with the received `records`
/// (see [`crate::patch`]): `list` is the block list the active was sent, of the file
/// as `stamp` describes it. Readers see the new version once it is all written; it
/// is durable, and checked against the active's hash, when this returns `Done`.
#[allow(clippy::too_many_arguments)]
fn patch_in_place(
    v: &VolumeLink,
    applier: &Applier<'_>,
    entry: &manifest::Entry,
    meta: &FileMeta,
    expected: u128,
    list: &BlockList,
    stamp: crate::patch::FileStamp,
    records: &[(u64, Vec<u8>)],
) -> Result<Patched, ApplyError> {
    let path = &entry.path;
    let Some((file, st)) = applier.open_for_patch(path)? else {
        return Ok(Patched::Refused("no single-linked regular file there"));
    };
    if crate::patch::FileStamp::of(&st) != stamp {
        return Ok(Patched::Refused(
            "the file changed since its block list was made",
        ));
    }
    let new_list = match crate::patch::patched_list(list, stamp.size(), entry.meta.size, records) {
        Ok(l) => l,
        Err(why) => return Ok(Patched::Refused(why)),
    };
    // The check, before anything is written: the received blocks, hashed as they
    // came, and the kept ones, taken on the strength of their hashes (the list is of
    // the file as `stamp` describes it, checked above), must give the active's hash
    // (`delta::content_hash`), so the file is never read whole. If they do not, the
    // list is dropped and a new copy is built, which reads and checks every byte.
    if delta::content_hash(&new_list, entry.meta.size) != expected {
        v.blocks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget(path);
        return Ok(Patched::Refused(
            "the blocks received and kept do not give the announced hash",
        ));
    }
    let io = |op: &'static str| {
        move |source: std::io::Error| ApplyError::Io {
            op,
            path: path.clone(),
            source,
        }
    };
    if !v.journal.is_empty() {
        // An update that failed is still journaled: a second journal for the same
        // file could be replayed before it.
        return Ok(Patched::Refused(
            "an earlier in-place update is still journaled",
        ));
    }
    // The room first: once the journal is written, the file's update must not fail
    // for want of space (readers would get a half-written file). Records that fall in
    // holes of a sparse file need new blocks as much as a growth does.
    if let Err(e) = crate::patch::reserve(file.as_fd(), records, stamp.size()) {
        if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
            return Err(io("make room for")(e));
        }
    }
    if entry.meta.size > stamp.size() {
        // Reserved past the end, the size left as it is: readers see the new size
        // only with the new bytes.
        let grow = entry.meta.size - stamp.size();
        let keep_size = libc::FALLOC_FL_KEEP_SIZE;
        if let Err(e) = twinfs_fs::sys::fallocate(file.as_fd(), keep_size, stamp.size(), grow) {
            if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
                return Err(io("make room for")(e));
            }
        }
    }
    let journaled = crate::patch::Entry {
        path: path.as_bytes().to_vec(),
        key: stamp.key,
        // ext4 reuses inode numbers: the key alone could name a later file.
        generation: twinfs_fs::sys::generation(file.as_fd()).ok(),
        size: entry.meta.size,
        meta: meta.clone(),
        records,
    };
    let written = match v.journal.write_at(&journaled, v.roles.get().epoch) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(%path, journal = %v.journal.dir().display(), error = %e,
                "cannot journal an in-place update; writing a new copy instead");
            return Ok(Patched::Refused("the journal cannot be written"));
        }
    };
    // Written beside the mount: a record of it would miss this.
    v.volume.forget_written(stamp.key);
    let Some(guard) = v.volume.begin_patch(stamp.key, PATCH_WAIT) else {
        v.journal
            .done(written)
            .map_err(io("remove the journal of"))?;
        return Ok(Patched::Refused("a reader has the file open"));
    };
    let changed = crate::patch::write_records(file.as_fd(), records, entry.meta.size)
        .map_err(io("update in place"))
        .and_then(|()| applier.set_file_meta(file.as_fd(), meta, path));
    if let Err(e) = changed {
        // Half written, maybe. A new copy is built from it and the same records at
        // once (they cover every byte the update touched) and renamed over it. The
        // journal goes only once that copy is durably in place; if the copy fails too,
        // the journal stays and finishes the update at the next start (a journal whose
        // file was replaced since is not replayed: key and generation are checked).
        // New opens stay held back until the copy has the name: none gets the
        // half-written file, and one that waited is sent to the copy (ESTALE).
        tracing::error!(%path, error = %e,
            "in-place update failed; writing a new copy instead");
        v.blocks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget(path);
        let size = entry.meta.size;
        let list = crate::patch::replace_by_copy(
            applier, &v.journal, written, path, size, records, expected, meta,
        );
        invalidate(v, path);
        drop(guard);
        let list = list?;
        tracing::info!(%path, "a new copy replaced the file whose in-place update failed");
        if let (Some(list), Ok(Some(stamp))) = (list, applier.stamp(path)) {
            v.blocks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .put(path, stamp, Arc::new(list));
        }
        return Ok(Patched::Done);
    }
    // Only what changed leaves the kernel's cache: dropping all 512 MiB of a file
    // readers had cached took 20 ms, and they would read it all again.
    let mut runs = Vec::with_capacity(records.len() + 1);
    for (offset, data) in records {
        delta::push_run(&mut runs, *offset..offset + data.len() as u64);
    }
    let mut ranges: Vec<(u64, u64)> = runs.iter().map(|r| (r.start, r.end - r.start)).collect();
    if entry.meta.size < stamp.size() {
        ranges.push((entry.meta.size, u64::MAX));
    }
    if let Err(e) = v
        .invalidator
        .invalidate_ranges(Path::new(path.as_path()), &ranges)
    {
        tracing::debug!(%path, error = %e, "invalidation of the changed ranges refused");
        invalidate(v, path);
    }
    let held_opens = guard.held_opens();
    drop(guard);
    twinfs_fs::sys::fsync(file.as_fd(), false).map_err(io("fsync"))?;
    v.journal
        .done(written)
        .map_err(io("remove the journal of"))?;
    let after = twinfs_fs::sys::fstat(file.as_fd()).map_err(io("stat"))?;
    v.blocks.lock().unwrap_or_else(|e| e.into_inner()).put(
        path,
        crate::patch::FileStamp::of(&after),
        Arc::new(new_list),
    );
    tracing::debug!(%path, new_size = entry.meta.size, records = records.len(), held_opens,
        "updated in place");
    Ok(Patched::Done)
}

/// The paths an op changes.
fn op_paths(op: &Op) -> Vec<&RelPath> {
    match op {
        Op::Rename { from, to, .. } => vec![from, to],
        // The existing name's link count changes too.
        Op::Link { path, existing } => vec![path, existing],
        other => vec![other.path()],
    }
}

/// Whether one path is the other or lies beneath it.
fn related(a: &RelPath, b: &RelPath) -> bool {
    a.is_root()
        || b.is_root()
        || a.as_path().starts_with(b.as_path())
        || b.as_path().starts_with(a.as_path())
}

type Applied = (u64, RelPath, Result<(), String>);

/// A large file's op, its path, and whether it was applied: `Ok(false)` if it was
/// given up (the file changed on the active while it came, whose next ship brings it).
type LargeApplied = (u64, RelPath, Result<bool, String>);

/// Standby: large files being applied in the background, so that the ops behind one
/// (a small priority-1 file, say) are not held up by it. An op on a related path waits.
struct LargeApplies {
    busy: std::collections::BTreeMap<u64, RelPath>,
    /// Those of `busy` that are hard-linked: applying one relinks its other names,
    /// in directories anywhere in the volume.
    linked: std::collections::BTreeSet<u64>,
    /// For those of `busy` whose stream the active gave up on before, the names it
    /// linked to the file since ([`VolumeLink::gave_up`]): applying one makes them.
    gave_up: std::collections::BTreeMap<u64, Vec<RelPath>>,
    done_tx: mpsc::UnboundedSender<LargeApplied>,
    done: mpsc::UnboundedReceiver<LargeApplied>,
}

impl LargeApplies {
    fn new() -> LargeApplies {
        let (done_tx, done) = mpsc::unbounded_channel();
        LargeApplies {
            busy: std::collections::BTreeMap::new(),
            linked: std::collections::BTreeSet::new(),
            gave_up: std::collections::BTreeMap::new(),
            done_tx,
            done,
        }
    }

    fn start(
        &mut self,
        volume: &VolumeLink,
        link: &Link,
        counters: &StreamCounters,
        tag: u64,
        seq: u64,
        entry: manifest::Entry,
    ) {
        let (volume, link, counters, done) = (
            volume.clone(),
            link.clone(),
            counters.clone(),
            self.done_tx.clone(),
        );
        self.busy.insert(seq, entry.path.clone());
        if entry.meta.link().is_some() {
            self.linked.insert(seq);
        }
        let others = gave_up_names(&volume).others(&entry.path);
        if !others.is_empty() {
            self.gave_up.insert(seq, others);
        }
        tokio::spawn(async move {
            let _applying = volume.applying.clone().read_owned().await;
            let path = entry.path.clone();
            let result = apply_streamed(&volume, &link, tag, seq, entry, &counters).await;
            let _ = done.send((seq, path, result));
        });
    }

    fn finished(
        &mut self,
        seq: u64,
        path: &RelPath,
        result: Result<bool, String>,
        session: &mut Session,
    ) {
        self.busy.remove(&seq);
        self.linked.remove(&seq);
        self.gave_up.remove(&seq);
        if let Err(e) = &result {
            tracing::warn!(%path, error = %e, "refused or failed to apply");
        }
        if result == Ok(false) {
            session.held_back(seq);
        }
        session.applied(seq, path, result.map(|_| ()), std::time::Instant::now());
    }

    async fn wait_until(&mut self, session: &mut Session, done: impl Fn(&Self) -> bool) {
        while !done(self) {
            match self.done.recv().await {
                Some((seq, path, result)) => self.finished(seq, &path, result, session),
                None => return,
            }
        }
    }

    /// Whether a large file is being applied to one of `paths`, or above or below,
    /// or is to be linked to one of them (see [`LargeApplies::gave_up`]).
    fn related(&self, paths: &[&RelPath]) -> bool {
        self.busy
            .values()
            .chain(self.gave_up.values().flatten())
            .any(|b| paths.iter().any(|p| related(p, b)))
    }

    /// Whether the metadata of directory `dir` must wait: a large file is being
    /// applied in it (its temp file and rename move the directory's times) or at or
    /// above it. One further below does not touch it: the root's metadata, which
    /// follows every change in it, never waits for a file in a subdirectory. A
    /// hard-linked file holds every directory: its other names, anywhere, are relinked
    /// beside temp names, and their directories get their times back afterwards.
    fn holds_directory(&self, dir: &RelPath) -> bool {
        !self.linked.is_empty()
            || self.busy.values().any(|b| {
                dir.starts_with(b) || b.split_last().is_some_and(|(parent, _)| parent == *dir)
            })
    }

    async fn wait_all(&mut self, session: &mut Session) {
        self.wait_until(session, |s| s.busy.is_empty()).await;
    }
}

/// Most files, and bytes, in one batch of a standby's writes.
const BATCH_FILES: usize = 256;
const BATCH_BYTES: u64 = 64 << 20;

/// Standby: small files received back to back (and the metadata of directories that
/// exist here, which follows every create in them), written to temp files without fsync,
/// then made durable by one `syncfs`, renamed into place in order and made durable
/// again, and acked together: two filesystem syncs per batch instead of two fsyncs
/// per file, and still never a torn file after a crash. A batch of one (a single
/// change while streaming) takes the plain path: fsync the file, rename, fsync the
/// directory.
///
/// Readers see each file as soon as its temp file is written ([`Shown`]), before any
/// of that. While one batch is being put in place in the background, the next files
/// are staged (and shown) and wait for it: the session goes on taking messages, so
/// one file's fsyncs never delay the next file being readable.
#[derive(Default)]
struct Batch {
    staged: Vec<Staged>,
    bytes: u64,
    /// Per directory, its times before the first temp file not yet placed in it
    /// (staged here or being placed), which every placement there restores.
    dir_times: crate::apply::DirTimesSeen,
    /// The previous batch, being put in place in the background.
    placing: Option<tokio::task::JoinHandle<Option<Vec<Applied>>>>,
    /// Its ops, answered as refused should its task fail.
    placing_ops: Vec<(u64, RelPath)>,
}

struct Staged {
    seq: u64,
    /// Readers on the standby see the temp file under its name until it is placed
    /// (dropped before `prepared`, which removes the temp file if never placed).
    shown: Option<Shown>,
    entry: manifest::Entry,
    /// The content, kept until the batch is flushed in case it must be applied the
    /// plain way (the temp file could not be made: a directory in the way). Neither
    /// this nor `prepared` for a directory's metadata.
    content: Option<Vec<u8>>,
    prepared: Option<crate::apply::Prepared>,
}

impl Batch {
    /// Nothing staged and nothing being placed.
    fn is_empty(&self) -> bool {
        self.staged.is_empty() && self.placing.is_none()
    }

    /// Files staged and no batch being placed: [`Batch::start_placing`] would start.
    fn can_start(&self) -> bool {
        !self.staged.is_empty() && self.placing.is_none()
    }

    fn is_full(&self) -> bool {
        self.staged.len() >= BATCH_FILES || self.bytes >= BATCH_BYTES
    }

    /// Writes the file to a temp entry beside its target, and shows it to readers.
    /// Returns the path if the task doing it failed (the op is not staged).
    async fn stage(
        &mut self,
        volume: &VolumeLink,
        seq: u64,
        entry: manifest::Entry,
        bytes: Vec<u8>,
    ) -> Option<RelPath> {
        self.bytes += bytes.len() as u64;
        let small = bytes.len() as u64 <= SMALL_FILE;
        // (Kept only for a task that may fail: a small file is written here.)
        let path = (!small).then(|| entry.path.clone());
        let v = volume.clone();
        let prepare = move || {
            let applier = Applier::new(v.root.as_fd());
            let prepared =
                applier.prepare_file(&entry.path, &bytes, &file_meta(&entry.meta), false);
            // Whole now: readers may see it before it is durable, since the file on
            // disk changes only when it is renamed into place after its fsync.
            let shown = prepared.as_ref().ok().and_then(|p| Shown::new(&v, p));
            if shown.is_some() {
                invalidate(&v, &entry.path);
            }
            (entry, bytes, prepared, shown)
        };
        // A small file is written here, sparing the latency of a blocking-pool hop.
        let prepared = if small {
            Ok(prepare())
        } else {
            tokio::task::spawn_blocking(prepare).await
        };
        let Ok((entry, bytes, prepared, shown)) = prepared else {
            return path;
        };
        let (content, prepared) = match prepared {
            Ok(mut p) => {
                p.share_dir_times(&mut self.dir_times);
                (None, Some(p))
            }
            // Applied the plain way at the flush, which deals with what is in the way
            // or reports why it cannot.
            Err(_) => (Some(bytes), None),
        };
        self.staged.push(Staged {
            seq,
            shown,
            entry,
            content,
            prepared,
        });
        None
    }

    /// Stages the metadata of the directory `entry`, applied after the files staged
    /// before it, in order. Files staged after it that replace one in the directory
    /// give the directory these times back when they are placed. Gives the entry back
    /// when there is no directory at its path here (it is then made the plain way,
    /// before anything is staged in it).
    fn stage_directory(
        &mut self,
        volume: &VolumeLink,
        seq: u64,
        entry: manifest::Entry,
    ) -> Result<(), manifest::Entry> {
        let applier = Applier::new(volume.root.as_fd());
        let st = applier
            .open_parent(&entry.path)
            .ok()
            .and_then(|(dir, name)| twinfs_fs::sys::statat(dir.as_fd(), &name).ok())
            .filter(crate::apply::is_dir);
        let Some(st) = st else {
            return Err(entry);
        };
        let times = [
            libc::timespec {
                tv_sec: st.st_atime,
                tv_nsec: st.st_atime_nsec,
            },
            libc::timespec {
                tv_sec: entry.meta.mtime.0,
                tv_nsec: entry.meta.mtime.1.into(),
            },
        ];
        self.dir_times.insert((st.st_dev, st.st_ino), Some(times));
        self.staged.push(Staged {
            seq,
            shown: None,
            entry,
            content: None,
            prepared: None,
        });
        Ok(())
    }

    /// Starts putting the staged files in place in the background, unless a batch is
    /// being placed already (they go when it is through). [`Batch::placed`] reports.
    fn start_placing(&mut self, volume: &VolumeLink) {
        if !self.can_start() {
            return;
        }
        let staged = std::mem::take(&mut self.staged);
        self.placing_ops = staged
            .iter()
            .map(|s| (s.seq, s.entry.path.clone()))
            .collect();
        self.bytes = 0;
        let v = volume.clone();
        self.placing = Some(tokio::spawn(async move {
            // A later session's scan waits for it, as for a large file.
            let _applying = v.applying.clone().read_owned().await;
            tokio::task::spawn_blocking(move || place_batch(&v, staged))
                .await
                .ok()
        }));
    }

    /// A full batch: starts placing it once the one before is through, so the next
    /// is written while it is made durable.
    async fn place_full(&mut self, volume: &VolumeLink, session: &mut Session) {
        if self.placing.is_some() {
            let results = self.placed().await;
            self.report(results, volume, session);
        }
        self.start_placing(volume);
    }

    /// Waits for the batch being placed in the background (never returns if none).
    async fn placed(&mut self) -> Option<Vec<Applied>> {
        let Some(placing) = self.placing.as_mut() else {
            return std::future::pending().await;
        };
        let results = placing.await.ok().flatten();
        self.placing = None;
        results
    }

    /// Reports each op of a placed batch to the session, in order.
    fn report(
        &mut self,
        results: Option<Vec<Applied>>,
        volume: &VolumeLink,
        session: &mut Session,
    ) {
        if self.is_empty() {
            self.dir_times.clear();
        }
        let ops = std::mem::take(&mut self.placing_ops);
        let Some(results) = results else {
            // Answered, refused, like every op: the active then repairs them by a full
            // sync (a standby that stopped answering would stall).
            tracing::error!(volume = %volume.name, ops = ops.len(), "batch task failed; its changes are refused");
            for (seq, path) in ops {
                session.applied(
                    seq,
                    &path,
                    Err("the batch task failed".into()),
                    std::time::Instant::now(),
                );
            }
            return;
        };
        for (seq, path, result) in results {
            if let Err(e) = &result {
                tracing::warn!(volume = %volume.name, %path, error = %e, "refused or failed to apply");
            }
            session.applied(seq, &path, result, std::time::Instant::now());
        }
    }

    /// Puts everything in place (the batch being placed, then the staged files) and
    /// reports each op to the session, in order.
    async fn flush(&mut self, volume: &VolumeLink, session: &mut Session) {
        if self.placing.is_some() {
            let results = self.placed().await;
            self.report(results, volume, session);
        }
        if self.staged.is_empty() {
            return;
        }
        let staged = std::mem::take(&mut self.staged);
        self.placing_ops = staged
            .iter()
            .map(|s| (s.seq, s.entry.path.clone()))
            .collect();
        self.bytes = 0;
        let v = volume.clone();
        let results = tokio::task::spawn_blocking(move || place_batch(&v, staged))
            .await
            .ok();
        self.report(results, volume, session);
    }
}

/// Puts staged files in place, in order; returns each op's result.
fn place_batch(v: &VolumeLink, staged: Vec<Staged>) -> Vec<Applied> {
    let applier = Applier::new(v.root.as_fd());
    // One file (directories' metadata aside, each made durable on its own then).
    let single = staged
        .iter()
        .filter(|s| s.entry.meta.kind != Kind::Dir)
        .count()
        <= 1;
    let mut results = Vec::with_capacity(staged.len());
    // Those not put in place because this node is no longer a standby.
    let mut refused: Vec<RelPath> = Vec::new();
    // Data first: after this, a crash leaves whole temp files, never a torn file.
    let synced = if single {
        Ok(())
    } else {
        applier.sync_filesystem()
    };
    for s in staged {
        let path = s.entry.path.clone();
        let linked = has_other_names(&s.entry.meta);
        // Stops showing the temp file once it is in place (or given up).
        let mut shown = s.shown;
        // Other names of the file here that must follow it.
        let before = match (&s.prepared, linked_before(&applier, &s.entry)) {
            (None, _) => Ok(None),
            (Some(_), before) => before.map_err(|e| e.to_string()),
        };
        let hold = held_standby(v);
        let result = match (&hold, &synced, before, s.prepared, s.content) {
            (None, _, _, prepared, _) => {
                if let Some(mut p) = prepared {
                    p.give_up_on_active();
                }
                refused.push(path.clone());
                Err(ApplyError::NotStandby { path: path.clone() }.to_string())
            }
            (_, Err(e), _, _, _) => Err(e.to_string()),
            (_, Ok(()), Err(e), _, _) => Err(e),
            (_, Ok(()), Ok(before), Some(p), _) if single => {
                // One file: fsync it, rename, and only then fsync the directory (the
                // ack waits for that).
                place_single(&applier, p, || invalidate(v, &path)).and_then(|()| {
                    relink_others(v, &applier, &path, before).map_err(|e| e.to_string())
                })
            }
            (_, Ok(()), Ok(before), Some(p), _) => {
                let placed = applier.place_prepared(p, false).map_err(|e| e.to_string());
                if placed.is_ok() {
                    invalidate(v, &path);
                }
                placed.and_then(|()| {
                    relink_others(v, &applier, &path, before).map_err(|e| e.to_string())
                })
            }
            (_, Ok(()), Ok(_), None, Some(bytes)) => apply_op(
                v,
                &Op::Put {
                    entry: s.entry,
                    content: Some(bytes),
                },
                None,
            )
            .map_err(|e| e.to_string()),
            // A directory's metadata: made durable by its own fsync, or in a batch of
            // files by the filesystem sync after the renames.
            (_, Ok(()), Ok(_), None, None) if s.entry.meta.kind == Kind::Dir && single => apply_op(
                v,
                &Op::Put {
                    entry: s.entry,
                    content: None,
                },
                None,
            )
            .map_err(|e| e.to_string()),
            (_, Ok(()), Ok(_), None, None) if s.entry.meta.kind == Kind::Dir => {
                let set = applier
                    .set_directory_metadata_unsynced(&path, &file_meta(&s.entry.meta))
                    .map_err(|e| e.to_string());
                if set.is_ok() {
                    invalidate(v, &path);
                }
                set
            }
            (_, Ok(()), Ok(_), None, None) => Err("nothing to apply".into()),
        };
        if let Some(shown) = shown.as_mut() {
            shown.placed = result.is_ok();
        }
        drop(shown);
        let result = result.and_then(|()| {
            link_gave_up_names(v, &applier, &path, linked).map_err(|e| e.to_string())
        });
        results.push((s.seq, path, result));
    }
    if let Some(first) = refused.first() {
        tracing::warn!(volume = %v.name, files = refused.len(), %first,
            "not applied: this node is no longer a standby");
    }
    // The renames now; the temp files' data already was.
    if !single && results.iter().any(|r| r.2.is_ok()) {
        if let Err(e) = applier.sync_filesystem() {
            for r in results.iter_mut().filter(|r| r.2.is_ok()) {
                r.2 = Err(e.to_string());
            }
        }
    }
    results
}

/// A staged file shown to the standby's readers under its name before it is in
/// place ([`twinfs_fs::Volume::show_staged`]); no longer shown once dropped, and if it
/// was never put in place, the kernel is told to forget the version it was shown.
struct Shown {
    link: VolumeLink,
    path: RelPath,
    dir: (u64, u64),
    name: std::ffi::OsString,
    temp: std::ffi::OsString,
    placed: bool,
}

impl Shown {
    fn new(link: &VolumeLink, prepared: &crate::apply::Prepared) -> Option<Shown> {
        let (dir, temp_key) = (prepared.dir_key()?, prepared.temp_key()?);
        let (name, temp) = (prepared.name(), prepared.temp_name());
        link.volume
            .show_staged(dir, name, temp, temp_key, prepared.path().as_path())
            .then(|| Shown {
                link: link.clone(),
                path: prepared.path().clone(),
                dir,
                name: name.to_owned(),
                temp: temp.to_owned(),
                placed: false,
            })
    }
}

impl Drop for Shown {
    fn drop(&mut self) {
        self.link
            .volume
            .unshow_staged(self.dir, &self.name, &self.temp);
        if !self.placed {
            invalidate(&self.link, &self.path);
        }
    }
}

/// Puts a single prepared file in place durably: fsync it, rename, call `visible`
/// (readers may see it now: a crash leaves the old or the new file whole), fsync the
/// directory.
fn place_single(
    applier: &Applier<'_>,
    prepared: crate::apply::Prepared,
    visible: impl FnOnce(),
) -> Result<(), String> {
    prepared.sync_data().map_err(|e| e.to_string())?;
    let placed = applier.place_visible(prepared).map_err(|e| e.to_string())?;
    visible();
    placed.sync().map_err(|e| e.to_string())
}

/// Bytes of a session's large-file streams, which bypass its message stream.
#[derive(Clone, Default)]
struct StreamCounters {
    sent: Arc<std::sync::atomic::AtomicU64>,
    received: Arc<std::sync::atomic::AtomicU64>,
}

fn file_meta(meta: &Meta) -> FileMeta {
    FileMeta {
        mode: meta.mode,
        uid: meta.uid,
        gid: meta.gid,
        mtime: meta.mtime,
        xattrs: meta.xattrs().to_vec(),
    }
}

thread_local! {
    /// Paths to tell the kernel about once this thread's apply turn is over.
    static HELD_INVALIDATIONS: std::cell::RefCell<Option<Vec<RelPath>>> =
        const { std::cell::RefCell::new(None) };
}

/// Holds this thread's invalidations back until [`HeldInvalidations::take`], and no
/// longer than it lives (an apply that panics does not leave the thread holding them).
struct HeldInvalidations;

impl HeldInvalidations {
    fn new() -> HeldInvalidations {
        HELD_INVALIDATIONS.with(|held| *held.borrow_mut() = Some(Vec::new()));
        HeldInvalidations
    }

    /// The paths held back; the thread tells the kernel at once again.
    fn take(self) -> Vec<RelPath> {
        HELD_INVALIDATIONS
            .with(|held| held.borrow_mut().take())
            .unwrap_or_default()
    }
}

impl Drop for HeldInvalidations {
    fn drop(&mut self) {
        HELD_INVALIDATIONS.with(|held| *held.borrow_mut() = None);
    }
}

/// `turn` (see [`takes_turn`]) ends once the op is applied, before the kernel is told
/// of any path (also those the apply itself would tell of, as names linked to a file):
/// telling the kernel can wait for a request of the mount (the directory's lock, a
/// page's), which can wait for the turn.
fn apply_op(
    volume: &VolumeLink,
    op: &Op,
    turn: Option<twinfs_fs::ApplyTurn>,
) -> Result<(), ApplyError> {
    let _hold = standby_hold(volume, op.path())?;
    let applied = match turn {
        Some(turn) => {
            let held = HeldInvalidations::new();
            let applied = apply_quietly(volume, &Applier::new(volume.root.as_fd()), op);
            let paths = held.take();
            drop(turn);
            for path in paths {
                invalidate(volume, &path);
            }
            applied
        }
        None => apply_quietly(volume, &Applier::new(volume.root.as_fd()), op),
    };
    applied?;
    if !matches!(op, Op::Skip { .. } | Op::PutStream { .. }) {
        for path in op_paths(op) {
            invalidate(volume, path);
        }
    }
    Ok(())
}

/// The hold of a standby's change of the volume, in the term of its session.
fn held_standby(volume: &VolumeLink) -> Option<RoleHold> {
    if volume.term.role != Role::Standby {
        return None;
    }
    volume.roles.hold(volume.term)
}

/// Standby: holds the role while it changes the volume as its active asked
/// ([`crate::roles::RoleCell::hold`]); refuses once this node is no longer a standby
/// (promoted while a large file or a batch was still being put in place, say): the
/// old active's version must not replace what was written here since.
fn standby_hold(volume: &VolumeLink, path: &RelPath) -> Result<RoleHold, ApplyError> {
    held_standby(volume).ok_or_else(|| {
        let refused = ApplyError::NotStandby { path: path.clone() };
        tracing::warn!(volume = %volume.name, "{refused}");
        refused
    })
}

/// Standby taking local writes of upstream paths: whether `op` may replace or remove
/// what such a write made, so that it takes its turn with them ([`twinfs_fs::turn`]):
/// a file put at an upstream path, and every rename, link and deletion (a directory's
/// goes with what is below it). A large file's stream does not: it is put in place in
/// the background (SEMANTICS.md, "Upstream writes", says what that leaves).
fn takes_turn(outbox: &Outbox, op: &Op) -> bool {
    match op {
        Op::Put { entry, .. } => outbox.upstream(&entry.path),
        Op::Rename { .. } | Op::Link { .. } | Op::Delete { .. } => true,
        Op::PutStream { .. } | Op::Skip { .. } => false,
    }
}

/// Standby: the large file `entry` is in place; at an upstream path it is now the base
/// of local writes there ([`VolumeLink::placed_upstream`]).
fn note_placed_upstream(volume: &VolumeLink, entry: &manifest::Entry) {
    if volume.volume.role() == Role::Standby
        && !entry.path.is_root()
        && volume.policies.resolve(entry.path.as_path()).upstream()
    {
        volume
            .placed_upstream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((entry.path.clone(), entry.meta.hash));
    }
}

/// Standby taking local writes of upstream paths: the apply turn for putting the
/// active's large file at upstream path `path` in place (in the background, outside
/// the session's order), once the session has shipped every local write recorded
/// before (a write made after finds its file replaced and is kept). Waits up to a
/// second for those; after that the apply fails, and the refusal has the active
/// compare manifests (the local write, shipped meanwhile, is judged first). `None`
/// where no local write can be in the way (an active, a path that is not upstream).
fn upstream_turn(
    volume: &VolumeLink,
    path: &RelPath,
) -> Result<Option<twinfs_fs::ApplyTurn>, ApplyError> {
    if volume.volume.role() != Role::Standby
        || path.is_root()
        || !volume.policies.resolve(path.as_path()).upstream()
    {
        return Ok(None);
    }
    let turns = volume.volume.turns();
    for _ in 0..100 {
        let turn = turns.apply();
        // (Not taking local writes: none can be in the way, and none would ship; one
        // let in from now on waits for the turn.)
        if !volume.volume.upstream_open() || volume.gate.upstream_shipped() {
            return Ok(Some(turn));
        }
        drop(turn);
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(ApplyError::Busy {
        path: path.clone(),
        why: "local writes of this upstream path are still to be shipped",
    })
}

/// Standby: the turn of the replicator (see [`takes_turn`]), waiting in the background
/// for the local writes under way if there are any.
async fn apply_turn(volume: &VolumeLink) -> twinfs_fs::ApplyTurn {
    let turns = volume.volume.turns();
    if let Some(turn) = turns.try_apply() {
        return turn;
    }
    let waiting = turns.clone();
    match tokio::task::spawn_blocking(move || waiting.apply()).await {
        Ok(turn) => turn,
        // (The wait cannot panic; if its task failed anyway, wait here.)
        Err(_) => turns.apply(),
    }
}

/// Active: applies an upstream write [`upstream::judge`] took, without telling the
/// kernel. Unlike an op from the active, it never removes what is below a directory:
/// a directory is deleted only if empty, and nothing is put where an entry of another
/// kind appeared since the judgement.
fn apply_upstream(volume: &VolumeLink, op: &Op) -> Result<(), ApplyError> {
    let applier = Applier::upstream(volume.root.as_fd());
    match op {
        Op::Put { entry, content } => put_entry(&applier, entry, content.as_deref()),
        Op::Delete { path } => applier.delete_entry(path),
        // Only the active may say a source went unsent.
        Op::Rename {
            from, to, exchange, ..
        } => applier.rename(from, to, *exchange),
        other => apply_quietly(volume, &applier, other),
    }
}

/// Refuses an op that would replace the volume root or make it a name of a file:
/// only its metadata can come (a directory's `Put`).
fn refuse_for_root(op: &Op) -> Result<(), ApplyError> {
    let refused = match op {
        Op::Put { entry, .. } => entry.path.is_root() && entry.meta.kind != Kind::Dir,
        Op::PutStream { entry } => entry.path.is_root(),
        Op::Link { path, existing } => path.is_root() || existing.is_root(),
        // The applier refuses these itself.
        Op::Rename { .. } | Op::Delete { .. } | Op::Skip { .. } => false,
    };
    if refused {
        return Err(ApplyError::Root { op: "replace" });
    }
    Ok(())
}

/// [`apply_op`] without telling the kernel.
fn apply_quietly(volume: &VolumeLink, applier: &Applier<'_>, op: &Op) -> Result<(), ApplyError> {
    refuse_for_root(op)?;
    match op {
        Op::Put { entry, content } => {
            let path = &entry.path;
            let before = match content {
                Some(_) => linked_before(applier, entry)?,
                None => None,
            };
            let put = |applier: &Applier<'_>| put_entry(applier, entry, content.as_deref());
            match put(applier) {
                // Something of another kind is in the way: it goes, as on the active.
                Err(ApplyError::IsDirectory { .. } | ApplyError::NotDirectory { .. }) => {
                    clear_the_way(volume, applier, path)?;
                    put(applier)?;
                }
                other => other?,
            }
            relink_others(volume, applier, path, before)?;
            link_gave_up_names(volume, applier, path, has_other_names(&entry.meta))?;
        }
        Op::Link { path, existing } => match link_replacing(volume, applier, existing, path) {
            // A large file new here whose stream the active gave up on: there is no
            // file to name (only what had its name before, if anything). On the active
            // the link replaced what is at `path`; the change that made it give up
            // ships the file under one of its names, and `path` is made one then.
            Err(e)
                if gave_up_on(volume, existing)
                    && matches!(applier.has_file(existing), Ok(false)) =>
            {
                tracing::debug!(%path, %existing, "hard link to a large file whose stream the active gave up on");
                clear_the_way(volume, applier, path)?;
                if !gave_up_names(volume).join(path.clone(), existing) {
                    return Err(e);
                }
            }
            other => {
                other?;
                forget_gave_up(volume, path, false);
            }
        },
        Op::Rename {
            from,
            to,
            exchange,
            unsent: false,
        } => {
            // A large file new here whose stream the active gave up on is not here to
            // move: the change that made it give up ships it under its new name.
            if gave_up_on(volume, from) || (*exchange && gave_up_on(volume, to)) {
                tracing::debug!(%from, %to, "rename of a large file whose stream the active gave up on");
                if !*exchange && !applier.exists(from)? {
                    // What is here under the new name is not the file: on the active
                    // the rename replaced it. Kept, it would take the file's other
                    // names (a link to it, made before its next version) and its own
                    // would follow that version.
                    delete_for_active(volume, applier, to)?;
                }
                applier.rename_unsent(from, to, *exchange)?
            } else {
                applier.rename(from, to, *exchange)?
            }
            rename_gave_up(volume, from, to, *exchange);
        }
        Op::Rename {
            from,
            to,
            exchange,
            unsent: true,
        } => {
            applier.rename_unsent(from, to, *exchange)?;
            rename_gave_up(volume, from, to, *exchange);
        }
        Op::Delete { path } => {
            delete_for_active(volume, applier, path)?;
            forget_gave_up(volume, path, true);
        }
        // Streamed files are applied by `apply_streamed`, with their stream.
        Op::Skip { .. } | Op::PutStream { .. } => {}
    }
    Ok(())
}

/// A hard-linked file's (device, inode) and link count.
type Linked = ((u64, u64), u64);

/// Standby: the (device, inode) and link count of the file at `entry.path`, before an
/// op replaces it with a new file, if the active has the file hard-linked
/// ([`Meta::link`]) and the copy here has other names too: they must then be made
/// names of the new file ([`relink_others`]), else they would keep the old content.
/// (A file the active no longer has linked leaves its other names alone here: the
/// active's links were broken, by a rename over one of them, say.)
fn linked_before(
    applier: &Applier<'_>,
    entry: &manifest::Entry,
) -> Result<Option<Linked>, ApplyError> {
    if entry.meta.kind != Kind::File || entry.meta.link().is_none() {
        return Ok(None);
    }
    Ok(applier
        .linked_file(&entry.path)?
        .map(|st| ((st.st_dev, st.st_ino), st.st_nlink)))
}

/// Standby: makes every other name of the file that was at `path` ([`linked_before`])
/// a name of the file now at `path`, each by an atomic rename: a reader of one of them
/// gets the old file or the new one, whole. Names this node never syncs keep the old
/// file, as they are left out of the link identity.
fn relink_others(
    volume: &VolumeLink,
    applier: &Applier<'_>,
    path: &RelPath,
    before: Option<Linked>,
) -> Result<(), ApplyError> {
    let Some((key, nlink)) = before else {
        return Ok(());
    };
    let policies = &volume.policies;
    let others = manifest::names_of(volume.root.as_fd(), key, nlink.saturating_sub(1), |p, _| {
        policies.resolve(p.as_path()).sync != SyncMode::Never
    })
    .map_err(|source| ApplyError::Names {
        path: path.clone(),
        source,
    })?;
    for other in others {
        applier.link(path, &other)?;
        tracing::debug!(%path, %other, "hard link follows the new content");
        invalidate(volume, &other);
    }
    Ok(())
}

/// Standby: deletes `path` as the active asks, keeping every path below it that is
/// `never` here (the active neither sees nor owns those), and the directories above
/// them. A `path` that is itself `never` here goes whole: only `twinfs sync` names one,
/// and the administrator asked. Whether anything stayed.
fn delete_for_active(
    volume: &VolumeLink,
    applier: &Applier<'_>,
    path: &RelPath,
) -> Result<bool, ApplyError> {
    let never = |p: &RelPath| volume.policies.resolve(p.as_path()).sync == SyncMode::Never;
    if never(path) {
        applier.delete(path).map(|()| false)
    } else {
        applier.delete_keeping(path, &never)
    }
}

/// Standby: removes what is in the way of the active's entry at `path`, as
/// [`delete_for_active`]; a directory that keeps `never` paths stays, and the entry is
/// refused ([`ApplyError::KeepsNever`]) rather than put in their place.
fn clear_the_way(
    volume: &VolumeLink,
    applier: &Applier<'_>,
    path: &RelPath,
) -> Result<(), ApplyError> {
    if delete_for_active(volume, applier, path)? {
        return Err(ApplyError::KeepsNever { path: path.clone() });
    }
    Ok(())
}

/// Puts `entry` at its path; a directory in the way of anything else (or anything else
/// in the way of a directory) is an error.
fn put_entry(
    applier: &Applier<'_>,
    entry: &manifest::Entry,
    content: Option<&[u8]>,
) -> Result<(), ApplyError> {
    let fm = file_meta(&entry.meta);
    let path = &entry.path;
    match (entry.meta.kind, content) {
        (Kind::File, Some(mut bytes)) => applier.write_file(path, &mut bytes, &fm),
        // Another kind of thing here (a directory, a symlink): the metadata is not
        // the standby's to set on it; refused, the full sync that brings on sends the
        // file whole.
        (Kind::File, None) if applier.exists(path)? && !applier.has_file(path)? => {
            Err(ApplyError::NoFileHere { path: path.clone() })
        }
        (Kind::File, None) => applier.set_metadata(path, &fm),
        (Kind::Dir, _) => applier.make_dir(path, &fm),
        (Kind::Symlink, _) => {
            applier.make_symlink(path, entry.meta.target().unwrap_or_default(), &fm)
        }
        (Kind::Fifo, _) => applier.make_node(path, NodeKind::Fifo, 0, &fm),
        (Kind::Socket, _) => applier.make_node(path, NodeKind::Socket, 0, &fm),
        (Kind::CharDev, _) => applier.make_node(path, NodeKind::Char, entry.meta.rdev(), &fm),
        (Kind::BlockDev, _) => applier.make_node(path, NodeKind::Block, entry.meta.rdev(), &fm),
    }
}

fn invalidate(volume: &VolumeLink, path: &RelPath) {
    // Under the turn: told once it is over (see `apply_op`).
    let deferred = HELD_INVALIDATIONS.with(|held| match held.borrow_mut().as_mut() {
        Some(paths) => {
            paths.push(path.clone());
            true
        }
        None => false,
    });
    if deferred {
        return;
    }
    if let Err(e) = volume.invalidator.invalidate(Path::new(path.as_path())) {
        tracing::debug!(volume = %volume.name, %path, error = %e, "invalidation refused");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

    /// A file's metadata alone is not set on a directory or a symlink that is at its
    /// path on the standby instead.
    #[test]
    fn a_files_metadata_is_not_set_on_something_else_at_its_path() -> TestResult {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        std::fs::create_dir(dir.path().join("d"))?;
        std::fs::set_permissions(dir.path().join("d"), std::fs::Permissions::from_mode(0o755))?;
        std::os::unix::fs::symlink("d", dir.path().join("l"))?;
        let root = twinfs_fs::sys::open_dir_path(dir.path())?;
        let applier = Applier::new(root.as_fd());
        for name in ["d", "l"] {
            let mut meta = manifest::Meta::new(Kind::File);
            meta.mode = 0o600;
            let entry = manifest::Entry {
                path: RelPath::new(name)?,
                meta,
            };
            let put = put_entry(&applier, &entry, None);
            assert!(
                matches!(put, Err(ApplyError::NoFileHere { .. })),
                "{name}: {put:?}"
            );
        }
        let mode = std::fs::metadata(dir.path().join("d"))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
        Ok(())
    }

    #[test]
    fn gave_up_names_keep_the_names_linked_to_each_file_apart() -> TestResult {
        let r = |s: &str| RelPath::new(s);
        let mut names = GaveUpNames::default();
        names.add(r("f")?);
        names.add(r("g")?);
        assert!(names.join(r("a")?, &r("f")?));
        assert!(names.join(r("z")?, &r("g")?));
        // Given up on again: the name keeps its file, and the names linked to it.
        names.add(r("z")?);
        assert_eq!(names.others(&r("z")?), vec![r("g")?]);
        // Not listed: no file to join.
        assert!(!names.join(r("x")?, &r("nothing")?));
        assert!(!names.contains(&r("x")?));
        // Renamed: the name moves, the file stays; the name replaced leaves.
        names.rename(&r("z")?, &r("d/z")?, false);
        names.rename(&r("a")?, &r("g")?, false);
        assert_eq!(names.take_others(&r("g")?), vec![r("f")?]);
        assert!(!names.contains(&r("f")?) && !names.contains(&r("g")?));
        assert_eq!(names.take_others(&r("d/z")?), Vec::<RelPath>::new());
        names.add(r("d/y")?);
        assert!(names.join(r("e")?, &r("d/y")?));
        names.forget(&r("d")?, true);
        assert_eq!(names.take_others(&r("e")?), Vec::<RelPath>::new());
        assert!(names.names.is_empty());
        // Full: a new file is not listed, nor a new name of one listed; nothing
        // listed is dropped.
        for i in 0..GAVE_UP_KEPT {
            names.add(r(&format!("n{i}"))?);
        }
        names.add(r("late")?);
        assert!(!names.contains(&r("late")?));
        assert!(!names.join(r("y")?, &r("n0")?));
        assert_eq!(names.names.len(), GAVE_UP_KEPT);
        Ok(())
    }

    fn identity(name: &str) -> TestResult<transport::TlsIdentity> {
        let generated = rcgen::generate_simple_self_signed(vec![name.into()])?;
        Ok(transport::TlsIdentity {
            cert: generated.cert.der().clone(),
            key: rustls::pki_types::PrivatePkcs8KeyDer::from(generated.signing_key.serialize_der())
                .into(),
        })
    }

    /// A demotion's fitness record is not kept when a session with a (new) active
    /// started after the demotion began: that session's record is the newer one.
    #[tokio::test]
    async fn a_demotion_record_does_not_land_over_a_newer_sessions() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("sync.json");
        let followings = Followings::default();
        let demoted = SyncRecord {
            synced: true,
            epoch: 4,
            demoted: Some("manual".into()),
            ..SyncRecord::default()
        };
        let since = followings.started();
        assert!(
            followings
                .record_unless_followed(since, demoted.clone(), path.clone())
                .await?
        );
        assert_eq!(SyncRecord::load(&path)?, Some(demoted.clone()));
        let newer = SyncRecord {
            epoch: 5,
            ..SyncRecord::default()
        };
        newer.store(&path)?;
        let since = followings.started();
        followings.start();
        assert!(
            !followings
                .record_unless_followed(since, demoted, path.clone())
                .await?
        );
        assert_eq!(SyncRecord::load(&path)?, Some(newer));
        Ok(())
    }

    /// A connection between two endpoints on 127.0.0.1: (sender's, receiver's).
    async fn connected() -> TestResult<(quinn::Connection, quinn::Connection)> {
        let (a, b) = (identity("a")?, identity("b")?);
        let (a_id, b_id) = (
            transport::peer_id_of(&a.cert),
            transport::peer_id_of(&b.cert),
        );
        let local: SocketAddr = "127.0.0.1:0".parse()?;
        let ea = transport::endpoint(local, &a, transport::PinnedPeers::new([b_id]))?;
        let eb = transport::endpoint(local, &b, transport::PinnedPeers::new([a_id]))?;
        let addr = eb.local_addr()?;
        let accepting = tokio::spawn(async move {
            let incoming = eb.accept().await.ok_or("no incoming connection")?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(incoming.await?)
        });
        let (sender, _) = transport::connect(&ea, addr, b_id).await?;
        Ok((sender, accepting.await??))
    }

    /// A standby's session writes through a queue and never waits on an active that
    /// does not read (one waiting on it in turn would never read again); written in
    /// place, as an active's, the same writes wait.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_queued_control_stream_never_waits_on_a_peer_that_does_not_read() -> TestResult {
        let (sender, receiver) = connected().await?;
        let frame = |i: u8| vec![i; 4 << 20];
        // 25 frames of 4 MiB: past the stream's and the connection's flow-control
        // windows.
        let (send, _) = sender.open_bi().await?;
        let mut control = Control::queued(send);
        tokio::time::timeout(Duration::from_secs(5), async {
            for i in 0..25 {
                control
                    .write_bytes(frame(i))
                    .await
                    .ok_or("the stream broke")?;
            }
            Ok::<_, &str>(())
        })
        .await??;
        // Read: every frame arrives whole and in order, then the end.
        let (_, mut recv) = receiver.accept_bi().await?;
        control.finish();
        for i in 0..25 {
            let got = transport::read_frame(&mut recv, 8 << 20).await?;
            assert_eq!(got.as_deref(), Some(&frame(i)[..]), "frame {i}");
        }
        assert_eq!(transport::read_frame(&mut recv, 8 << 20).await?, None);

        // Written in place, the same writes wait for the reader.
        let (send, _) = sender.open_bi().await?;
        let mut control = Control::in_place(send);
        let written = tokio::time::timeout(Duration::from_secs(2), async {
            for i in 0..25 {
                control.write_bytes(frame(i)).await;
            }
        })
        .await;
        assert!(written.is_err(), "in place, a writer waits for its reader");
        Ok(())
    }

    /// An active's write waits for a standby that does not read as long as it hears
    /// from it, and gives up once it has heard nothing for the limit.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_actives_write_gives_up_on_a_standby_that_reads_nothing_and_says_nothing(
    ) -> TestResult {
        use std::sync::atomic::{AtomicU64, Ordering};
        let (sender, _receiver) = connected().await?;
        let heard = Arc::new(AtomicU64::new(0));
        let (send, _) = sender.open_bi().await?;
        let mut control = Control::watched(
            send,
            Silence {
                heard: [heard.clone(), Arc::new(AtomicU64::new(0))],
                limit: Duration::from_secs(2),
            },
        );
        let frame = vec![7u8; 4 << 20];
        // Past the flow-control windows, with word from the peer every 100 ms: still
        // waiting after several times the limit.
        let talker = {
            let heard = heard.clone();
            tokio::spawn(async move {
                loop {
                    heard.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let waited = tokio::time::timeout(Duration::from_secs(6), async {
            for _ in 0..25 {
                if control.write_bytes(frame.clone()).await.is_none() {
                    return Err("gave up on a peer that talks");
                }
            }
            Ok(())
        })
        .await;
        talker.abort();
        assert!(
            waited.is_err(),
            "{waited:?}: the write should still be waiting"
        );
        // Nothing heard any more: it gives up.
        let given_up = tokio::time::timeout(Duration::from_secs(20), control.write_bytes(frame))
            .await
            .map_err(|_| "still waiting on a silent peer")?;
        assert_eq!(given_up, None);
        Ok(())
    }

    /// A peer's heartbeats are read, and count, while the loop takes nothing and the
    /// reader's channel is full; they are dropped, and nothing else is.
    #[tokio::test(flavor = "multi_thread")]
    async fn heartbeats_are_heard_while_the_loop_takes_nothing() -> TestResult {
        use std::sync::atomic::{AtomicU64, Ordering};
        let (sender, receiver) = connected().await?;
        let (send, _) = sender.open_bi().await?;
        let mut control = Control::in_place(send);
        let mut total = 0;
        for _ in 0..READ_AHEAD_FRAMES {
            total += control.write(&Message::Resync).await.ok_or("write")?;
        }
        for _ in 0..200 {
            total += control.write(&Message::Heartbeat).await.ok_or("write")?;
        }
        total += control.write(&Message::Resync).await.ok_or("write")?;
        control.finish();
        let (_, recv) = receiver.accept_bi().await?;
        let received = Arc::new(AtomicU64::new(0));
        let mut messages = spawn_reader(recv, received.clone(), || {});
        // Every frame is read (the last one waits for a place) with nothing taken.
        let all_read = tokio::time::timeout(Duration::from_secs(10), async {
            while received.load(Ordering::Relaxed) < total {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(
            all_read.is_ok(),
            "read {} of {total} bytes",
            received.load(Ordering::Relaxed)
        );
        for i in 0..=READ_AHEAD_FRAMES {
            let m = messages.recv().await;
            assert!(matches!(m, Some(Message::Resync)), "message {i}: {m:?}");
        }
        assert!(
            messages.recv().await.is_none(),
            "the heartbeats are dropped"
        );
        Ok(())
    }

    /// The reader tells the board the peer was heard while the loop takes nothing
    /// (a standby's loop scanning its volume): automatic failover goes by it.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_board_hears_a_peer_whose_messages_wait_untaken() -> TestResult {
        let (sender, receiver) = connected().await?;
        let (send, _) = sender.open_bi().await?;
        let mut control = Control::in_place(send);
        // The channel full first, so nothing after it could be taken anyway.
        for _ in 0..READ_AHEAD_FRAMES {
            control.write(&Message::Resync).await.ok_or("write")?;
        }
        control.write(&Message::Heartbeat).await.ok_or("write")?;
        let (_, recv) = receiver.accept_bi().await?;
        let told = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
        let _messages = spawn_reader(recv, Arc::default(), {
            let told = told.clone();
            move || {
                told.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Instant::now())
            }
        });
        // A heartbeat every 300 ms for 3 s, none of them taken.
        let mut last = Instant::now();
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            control.write(&Message::Heartbeat).await.ok_or("write")?;
            last = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let count = |told: &std::sync::Mutex<Vec<Instant>>| {
            told.lock().unwrap_or_else(|e| e.into_inner()).len()
        };
        let latest = told
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .copied()
            .ok_or("never told")?;
        assert!(count(&told) >= 10, "told {} times", count(&told));
        assert!(
            latest + Duration::from_millis(150) >= last,
            "the last heartbeat was not told: {:?} before it",
            last - latest
        );
        // A message that waits for a place, then nothing: the reader holds it, the
        // peer's next frames wait in the stream, and the peer is still heard.
        control.write(&Message::Resync).await.ok_or("write")?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = count(&told);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            count(&told) >= before + 5,
            "told {} times in a second of waiting",
            count(&told) - before
        );
        Ok(())
    }

    /// A loop busy with a long piece of work (a scan) still sends heartbeats.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_session_sends_heartbeats_while_it_scans() -> TestResult {
        let (sender, receiver) = connected().await?;
        let (send, _) = sender.open_bi().await?;
        let mut control = Control::queued(send);
        let mut sent = 0;
        let work = tokio::time::sleep(HEARTBEAT * 3 + HEARTBEAT / 2);
        let done = heartbeating(&mut control, &mut sent, async {
            work.await;
            7
        })
        .await;
        assert_eq!(done, Some(7));
        control.finish();
        let (_, mut recv) = receiver.accept_bi().await?;
        let heartbeat = Message::Heartbeat.encode()?;
        let mut frames = Vec::new();
        while let Some(frame) = transport::read_frame(&mut recv, MAX_MESSAGE).await? {
            frames.push(frame);
        }
        assert_eq!(frames.len(), 3, "a heartbeat a second: {frames:?}");
        assert!(frames.iter().all(|f| *f == heartbeat));
        assert_eq!(sent, 3 * (heartbeat.len() as u64 + 4));
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_stream_that_comes_after_its_wait_is_stopped_not_kept() -> TestResult {
        tokio::time::timeout(Duration::from_secs(10), async {
            let (sender, receiver) = connected().await?;
            let streams = Arc::new(Streams::default());
            tokio::spawn(streams.clone().accept(receiver));
            let tag = stream_tag("vol", sender.open_bi().await?.0.id());
            // Nobody sent op 7's stream in time.
            assert!(streams
                .take(tag, 7, Duration::from_millis(50))
                .await
                .is_none());
            // It comes now, with data nobody will read: stopped, so its flow-control
            // credit goes back to the connection.
            let mut send = sender.open_uni().await?;
            let written = async {
                send.write_all(&stream_header(tag, 7)).await?;
                send.write_all(&[0u8; 4096]).await
            }
            .await;
            // The stop can come back before the last write is done: that write then
            // fails with the stop's code, which is what is checked next.
            match written {
                Ok(()) => {}
                Err(quinn::WriteError::Stopped(code)) if code == STREAM_UNWANTED => {}
                Err(e) => return Err(e.into()),
            }
            let stopped = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
            assert!(
                matches!(stopped, Ok(Ok(Some(code))) if code == STREAM_UNWANTED),
                "{stopped:?}"
            );
            // A stream that is waited for is still taken.
            let mut send = sender.open_uni().await?;
            send.write_all(&stream_header(tag, 8)).await?;
            send.write_all(b"blocks").await?;
            let taken = streams.take(tag, 8, Duration::from_secs(5)).await;
            assert!(taken.is_some());
            Ok(())
        })
        .await?
    }

    /// An active whose read of a large file hangs sends nothing more on its blocks
    /// stream while the connection stays up: the standby gives up on the file rather
    /// than wait for ever.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_blocks_stream_that_goes_silent_ends_the_apply() -> TestResult {
        tokio::time::timeout(Duration::from_secs(10), async {
            let (sender, receiver) = connected().await?;
            let mut send = sender.open_uni().await?;
            // A record of 8 bytes, of which 3 come.
            send.write_all(&delta::record_header(0, 8)).await?;
            send.write_all(b"abc").await?;
            let recv = receiver.accept_uni().await?;
            let (tx, mut rx) = mpsc::channel(4);
            let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
            tokio::spawn(pump_blocks(recv, tx, received, Duration::from_millis(100)));
            let got = rx.recv().await;
            assert!(
                matches!(&got, Some(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut),
                "{got:?}"
            );
            // The stream is stopped: its unread bytes no longer hold the connection.
            let stopped = send.stopped().await;
            assert!(
                matches!(stopped, Ok(Some(code)) if code == STREAM_UNWANTED),
                "{stopped:?}"
            );
            // The connection itself is still up (keep-alives would go on).
            assert!(sender.close_reason().is_none());
            Ok(())
        })
        .await?
    }

    /// An active reading a long stretch the standby has sends keep-alive records: the
    /// standby's pump neither times out nor passes them on as blocks.
    #[tokio::test(flavor = "multi_thread")]
    async fn keep_alive_records_keep_a_quiet_blocks_stream_open() -> TestResult {
        tokio::time::timeout(Duration::from_secs(10), async {
            let (sender, receiver) = connected().await?;
            let mut send = sender.open_uni().await?;
            send.write_all(&delta::keep_alive_record()).await?;
            let recv = receiver.accept_uni().await?;
            let (tx, mut rx) = mpsc::channel(4);
            let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
            tokio::spawn(pump_blocks(recv, tx, received, Duration::from_millis(200)));
            // Quiet for four times the pump's limit, but for the keep-alives.
            for _ in 0..16 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                send.write_all(&delta::keep_alive_record()).await?;
            }
            send.write_all(&delta::record_header(4096, 3)).await?;
            send.write_all(b"abc").await?;
            send.finish()?;
            let got = rx.recv().await;
            assert!(
                matches!(&got, Some(Ok((4096, data))) if data == b"abc"),
                "{got:?}"
            );
            let end = rx.recv().await;
            assert!(end.is_none(), "{end:?}");
            Ok(())
        })
        .await?
    }

    /// Waits until `n` large-file streams wait to be taken.
    async fn waiting(streams: &Streams, n: usize) {
        loop {
            let notified = streams.arrived.notified();
            if streams
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .waiting
                .len()
                >= n
            {
                return;
            }
            notified.await;
        }
    }

    /// A volume's session re-opened on the same connection numbers its ops from 1 again,
    /// while the old session's detached tasks may still wait for their streams: those
    /// must neither take the new session's streams nor have them stopped.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_later_session_of_a_volume_keeps_its_streams_from_the_old_ones() -> TestResult {
        tokio::time::timeout(Duration::from_secs(10), async {
            let (sender, receiver) = connected().await?;
            let streams = Arc::new(Streams::default());
            tokio::spawn(streams.clone().accept(receiver.clone()));
            // Two sessions of the volume, one after the other; each end tags them by
            // its own view of the session's stream.
            let mut tags = Vec::new();
            for _ in 0..2 {
                let (mut send, _) = sender.open_bi().await?;
                send.write_all(b"hello").await?;
                let (_, recv) = receiver.accept_bi().await?;
                let (ours, theirs) = (stream_tag("vol", send.id()), stream_tag("vol", recv.id()));
                assert_eq!(ours, theirs);
                tags.push(ours);
            }
            let (old, new) = (tags[0], tags[1]);
            // The old session gave up on its op 9 (it ended meanwhile).
            assert!(streams.take(old, 9, Duration::ZERO).await.is_none());
            // The new session's ops 7 and 9 come.
            for seq in [7, 9] {
                let mut send = sender.open_uni().await?;
                send.write_all(&stream_header(new, seq)).await?;
                send.write_all(b"blocks").await?;
            }
            waiting(&streams, 2).await;
            // A task of the old session still waiting for its op 7 finds nothing.
            assert!(streams.take(old, 7, Duration::ZERO).await.is_none());
            // The new session gets both.
            assert!(streams.take(new, 7, Duration::ZERO).await.is_some());
            assert!(streams.take(new, 9, Duration::ZERO).await.is_some());
            Ok(())
        })
        .await?
    }
}
