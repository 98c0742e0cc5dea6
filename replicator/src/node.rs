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

use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use twinfs_fs::{Invalidator, Role};

use crate::apply::{Applier, ApplyError, FileMeta, NodeKind};
use crate::capture::{Record, RecordSink};
use crate::manifest::{self, HashCache, Kind, Manifest, Meta};
use crate::path::RelPath;
use crate::policy::{PolicySet, SyncMode};
use crate::protocol::{Message, Op, ProtocolError, MAX_MESSAGE};
use crate::session::{Output, Session, SessionConfig};
use crate::transport::{self, PeerId};

/// How long to wait before dialling a peer again.
const REDIAL: Duration = Duration::from_secs(1);

/// Forwards a volume's change records to every session of that volume.
/// A change record numbered in capture order.
pub type Numbered = (u64, Record);

/// Forwards a volume's change records to every session of that volume and, for a
/// volume with `durability = "sync"`, holds the writer until every connected standby
/// has applied the change, or until the timeout.
pub struct Broadcast {
    tx: broadcast::Sender<Numbered>,
    next: std::sync::atomic::AtomicU64,
    gate: Arc<SyncGate>,
    sync_timeout: Option<Duration>,
}

impl Broadcast {
    /// A sink sending into `tx`; `sync_timeout` set for synchronous durability.
    pub fn new(
        tx: broadcast::Sender<Numbered>,
        gate: Arc<SyncGate>,
        sync_timeout: Option<Duration>,
    ) -> Broadcast {
        Broadcast {
            tx,
            next: std::sync::atomic::AtomicU64::new(1),
            gate,
            sync_timeout,
        }
    }
}

impl RecordSink for Broadcast {
    fn push(&self, record: Record) {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ships_now = record.policy.sync == SyncMode::Always;
        // No receiver (no standby connected) is fine: the next full sync covers it.
        let _ = self.tx.send((id, record));
        if let (Some(timeout), true) = (self.sync_timeout, ships_now) {
            self.gate.wait(id, timeout);
        }
    }
}

/// Where the writers of a `sync` volume wait for the standbys: each connected session
/// reports the highest change it has caught up with.
#[derive(Default)]
pub struct SyncGate {
    sessions: Mutex<std::collections::HashMap<u64, GateEntry>>,
    changed: std::sync::Condvar,
    next_session: std::sync::atomic::AtomicU64,
}

#[derive(Clone, Copy, Default)]
struct GateEntry {
    caught_up: u64,
    out_of_sync: bool,
}

impl SyncGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, GateEntry>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
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
            let behind: Vec<u64> = waiting
                .iter()
                .copied()
                .filter(|s| sessions.get(s).is_some_and(|e| e.caught_up < id))
                .collect();
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
    /// This node's role for it.
    pub role: Role,
    /// This node's epoch for it.
    pub epoch: u64,
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
    /// Seconds since the epoch of the last message from it.
    pub last_contact: Option<u64>,
    /// "never", "in progress" or "done".
    pub full_sync: String,
    /// Ops of the current or last full sync.
    pub full_sync_ops: u64,
    /// Seconds since the epoch when the last full sync completed.
    pub full_sync_done: Option<u64>,
    /// Ops sent (active) or applied (standby) in this session.
    pub ops: u64,
    /// Highest op acknowledged (active) or applied (standby).
    pub acked: u64,
    /// Changes waiting to be sent.
    pub pending: u64,
    /// Ops the standby refused (unsafe paths, disk errors).
    pub rejected: u64,
    /// A `sync` write timed out waiting for this standby, and it has not caught up
    /// since.
    pub out_of_sync: bool,
    /// The last paths refused by the standby, as "path: reason".
    pub rejected_paths: Vec<String>,
    /// Bytes sent and received in this session.
    pub bytes_sent: u64,
    /// Bytes received.
    pub bytes_received: u64,
}

/// The status of every (volume, peer) pair, shared with the daemon.
pub type Board = Arc<Mutex<std::collections::BTreeMap<(String, String), PeerStatus>>>;

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
}

/// Files over this size travel on their own stream instead of inside their op.
const INLINE_MAX: u64 = 1 << 20;

/// How long a standby waits for the stream of a large file its op announced.
const STREAM_WAIT: Duration = Duration::from_secs(60);

/// The unidirectional streams of one connection that carry large files, keyed by the
/// op number each starts with.
#[derive(Default)]
pub struct Streams {
    waiting: Mutex<std::collections::HashMap<u64, quinn::RecvStream>>,
    arrived: tokio::sync::Notify,
}

impl Streams {
    /// Accepts the connection's unidirectional streams until it closes.
    async fn accept(self: Arc<Self>, connection: quinn::Connection) {
        while let Ok(mut recv) = connection.accept_uni().await {
            let streams = self.clone();
            tokio::spawn(async move {
                let mut header = [0u8; 8];
                if recv.read_exact(&mut header).await.is_ok() {
                    let seq = u64::from_be_bytes(header);
                    streams
                        .waiting
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(seq, recv);
                    streams.arrived.notify_waiters();
                }
            });
        }
    }

    /// The stream of op `seq`, once it has arrived.
    async fn take(&self, seq: u64) -> Option<quinn::RecvStream> {
        let wait = async {
            loop {
                let notified = self.arrived.notified();
                if let Some(s) = self
                    .waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&seq)
                {
                    return s;
                }
                notified.await;
            }
        };
        tokio::time::timeout(STREAM_WAIT, wait).await.ok()
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
                ..PeerStatus::default()
            });
        entry.address = self.address.clone();
        f(entry);
    }
}

fn session_config(volume: &VolumeLink) -> SessionConfig {
    SessionConfig {
        volume: volume.name.clone(),
        role: volume.role,
        epoch: volume.epoch,
        policies: volume.policies.clone(),
        heartbeat: Duration::from_secs(1),
        // QUIC keep-alives find a dead peer within its 10 s idle timeout; this one only
        // catches a peer whose session stalls (a standby busy applying a large file
        // sends nothing meanwhile).
        peer_timeout: Duration::from_secs(120),
        stall_timeout: Duration::from_secs(120),
        max_in_flight: 256,
        max_queue: 100_000,
    }
}

/// Starts the driver on the current tokio runtime; `board` receives the status of
/// every session.
pub fn start(endpoint: quinn::Endpoint, volumes: Vec<VolumeLink>, peers: Vec<Peer>, board: Board) {
    let volumes = Arc::new(volumes);
    let peers = Arc::new(peers);
    tokio::spawn(accept_loop(
        endpoint.clone(),
        volumes.clone(),
        peers.clone(),
        board.clone(),
    ));
    if volumes.iter().any(|v| v.role == Role::Active) {
        for peer in peers.iter() {
            let link = Link {
                peer: peer.name.clone(),
                address: peer.address.clone(),
                board: board.clone(),
                connection: None,
                streams: None,
            };
            tokio::spawn(dial_loop(
                endpoint.clone(),
                volumes.clone(),
                peer.clone(),
                link,
            ));
        }
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    volumes: Arc<Vec<VolumeLink>>,
    peers: Arc<Vec<Peer>>,
    board: Board,
) {
    while let Some(accepted) = transport::accept(&endpoint).await {
        let Ok((connection, id)) = accepted else {
            continue;
        };
        let name = peers
            .iter()
            .find(|p| p.id == id)
            .map(|p| p.name.clone())
            .unwrap_or_else(|| "unknown".into());
        let streams = Arc::new(Streams::default());
        tokio::spawn(streams.clone().accept(connection.clone()));
        let link = Link {
            peer: name,
            address: connection.remote_address().to_string(),
            board: board.clone(),
            connection: Some(connection.clone()),
            streams: Some(streams),
        };
        let volumes = volumes.clone();
        tokio::spawn(async move {
            while let Ok((send, recv)) = connection.accept_bi().await {
                tokio::spawn(standby_stream(volumes.clone(), send, recv, link.clone()));
            }
        });
    }
}

async fn resolve(address: &str) -> Option<SocketAddr> {
    tokio::net::lookup_host(address).await.ok()?.next()
}

async fn dial_loop(
    endpoint: quinn::Endpoint,
    volumes: Arc<Vec<VolumeLink>>,
    peer: Peer,
    link: Link,
) {
    loop {
        let Some(addr) = resolve(&peer.address).await else {
            tracing::warn!(peer = %peer.name, address = %peer.address, "cannot resolve");
            tokio::time::sleep(REDIAL).await;
            continue;
        };
        match transport::connect(&endpoint, addr, peer.id).await {
            Ok((connection, _)) => {
                tracing::info!(peer = %peer.name, %addr, "connected");
                let link = Link {
                    connection: Some(connection.clone()),
                    ..link.clone()
                };
                let mut tasks = Vec::new();
                for volume in volumes.iter().filter(|v| v.role == Role::Active) {
                    match connection.open_bi().await {
                        Ok((send, recv)) => {
                            tasks.push(tokio::spawn(run_session(
                                volume.clone(),
                                Session::new(session_config(volume), std::time::Instant::now()),
                                send,
                                recv,
                                None,
                                link.clone(),
                            )));
                        }
                        Err(e) => {
                            tracing::warn!(peer = %peer.name, error = %e, "cannot open a stream")
                        }
                    }
                }
                for task in tasks {
                    let _ = task.await;
                }
                connection.close(0u32.into(), b"sessions ended");
                tracing::info!(peer = %peer.name, "disconnected");
            }
            Err(e) => tracing::debug!(peer = %peer.name, error = %e, "cannot connect"),
        }
        tokio::time::sleep(REDIAL).await;
    }
}

/// A stream the active opened: its first message names the volume.
async fn standby_stream(
    volumes: Arc<Vec<VolumeLink>>,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    link: Link,
) {
    let first = match transport::read_frame(&mut recv, MAX_MESSAGE).await {
        Ok(Some(bytes)) => Message::decode(&bytes),
        _ => return,
    };
    let hello = match first {
        Ok(m @ Message::Hello { .. }) => m,
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
    let Some(volume) = volumes
        .iter()
        .find(|v| &v.name == name && v.role == Role::Standby)
    else {
        tracing::warn!(volume = %name, "peer offers a volume this node is not a standby of");
        return;
    };
    let session = Session::new(session_config(volume), std::time::Instant::now());
    run_session(volume.clone(), session, send, recv, Some(hello), link).await;
}

/// Reads frames into decoded messages on a channel (so the session loop can wait on
/// several things without losing half-read frames). Ends on a bad frame.
fn spawn_reader(
    mut recv: quinn::RecvStream,
    received: Arc<std::sync::atomic::AtomicU64>,
) -> mpsc::Receiver<Message> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let bytes = match transport::read_frame(&mut recv, MAX_MESSAGE).await {
                Ok(Some(bytes)) => bytes,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "bad frame; closing the session");
                    return;
                }
            };
            received.fetch_add(bytes.len() as u64 + 4, std::sync::atomic::Ordering::Relaxed);
            match Message::decode(&bytes) {
                Ok(m) => {
                    if tx.send(m).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "bad message; closing the session");
                    return;
                }
            }
        }
    });
    rx
}

async fn run_session(
    volume: VolumeLink,
    mut session: Session,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    first: Option<Message>,
    link: Link,
) {
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut messages = spawn_reader(recv, received.clone());
    let mut changes = (volume.role == Role::Active).then(|| volume.changes.subscribe());
    let mut sent = 0u64;
    // The highest change record handed to the session, and this session's place in
    // the volume's sync gate.
    let mut seen = 0u64;
    let gate_id = volume.gate.register();
    link.update(&volume.name, |s| {
        s.connected = true;
        s.last_contact = Some(unix_now());
    });
    if let Some(m) = first {
        session.on_message(m, std::time::Instant::now());
    }
    loop {
        while let Some(out) = session.poll_output() {
            if matches!(out, Output::InSync) {
                link.update(&volume.name, |s| s.full_sync_done = Some(unix_now()));
            }
            match carry_out(&volume, &mut session, &mut send, out, &link).await {
                Some(n) => sent += n,
                None => {
                    let _ = send.finish();
                    volume.gate.unregister(gate_id);
                    link.update(&volume.name, |s| s.connected = false);
                    return;
                }
            }
        }
        if session.caught_up() {
            volume.gate.caught_up(gate_id, seen);
        }
        report(
            &link,
            &volume,
            &session,
            sent,
            received.load(std::sync::atomic::Ordering::Relaxed),
        );
        let out_of_sync = volume.gate.out_of_sync(gate_id);
        link.update(&volume.name, |s| s.out_of_sync = out_of_sync);
        let deadline = Instant::from_std(session.next_deadline());
        tokio::select! {
            m = messages.recv() => match m {
                Some(m) => {
                    link.update(&volume.name, |s| s.last_contact = Some(unix_now()));
                    session.on_message(m, std::time::Instant::now());
                }
                None => break,
            },
            r = async {
                match changes.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => match r {
                Ok((id, record)) => {
                    seen = id;
                    session.on_change(&record, std::time::Instant::now());
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::info!(volume = %volume.name, missed = n, "change stream lagged; resyncing");
                    session.resync();
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = tokio::time::sleep_until(deadline) => session.on_tick(std::time::Instant::now()),
        }
    }
    volume.gate.unregister(gate_id);
    link.update(&volume.name, |s| s.connected = false);
}

fn report(link: &Link, volume: &VolumeLink, session: &Session, sent: u64, received: u64) {
    let stats = session.stats();
    let phase = session.phase();
    let active = volume.role == Role::Active;
    link.update(&volume.name, |s| {
        s.full_sync = match phase {
            crate::session::Phase::Hello if s.full_sync_done.is_none() => "never",
            crate::session::Phase::FullSync => "in progress",
            _ if s.full_sync_done.is_some() || (active && stats.full_syncs > 0) => "done",
            _ => "never",
        }
        .into();
        if active && phase == crate::session::Phase::Streaming && s.full_sync_done.is_none() {
            s.full_sync_done = Some(unix_now());
        }
        s.full_sync_ops = stats.full_sync_ops;
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

/// Writes one message; the bytes written, or `None` if the stream broke.
async fn write(send: &mut quinn::SendStream, message: &Message) -> Option<u64> {
    match message.encode() {
        Ok(bytes) => write_bytes(send, &bytes).await,
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode a message");
            None
        }
    }
}

async fn write_bytes(send: &mut quinn::SendStream, bytes: &[u8]) -> Option<u64> {
    transport::write_frame(send, bytes)
        .await
        .ok()
        .map(|()| bytes.len() as u64 + 4)
}

/// Carries out one output: the bytes it sent, or `None` to end the session.
async fn carry_out(
    volume: &VolumeLink,
    session: &mut Session,
    send: &mut quinn::SendStream,
    out: Output,
    link: &Link,
) -> Option<u64> {
    match out {
        Output::Send(m) => write(send, &m).await,
        Output::ScanLocal => {
            let v = volume.clone();
            let scanned = tokio::task::spawn_blocking(move || scan(&v)).await;
            match scanned {
                Ok(Ok(m)) => {
                    session.local_manifest(m, std::time::Instant::now());
                    Some(0)
                }
                Ok(Err(e)) => {
                    tracing::error!(volume = %volume.name, error = %e, "cannot scan the volume");
                    None
                }
                Err(_) => None,
            }
        }
        Output::Ship {
            seq,
            path,
            content,
            standby_hash,
            delete_if_missing,
        } => {
            let v = volume.clone();
            let shipped = path.clone();
            let can_stream = link.connection.is_some();
            let read = tokio::task::spawn_blocking(move || {
                read_op(
                    &v,
                    path,
                    content,
                    standby_hash,
                    delete_if_missing,
                    can_stream,
                )
            })
            .await;
            let (op, vanished, source) = match read {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => {
                    tracing::warn!(volume = %volume.name, error = %e, "cannot read a change to ship");
                    return None;
                }
                Err(_) => return None,
            };
            if vanished {
                session.vanished(seq);
            }
            if let (Some(file), Some(connection)) = (source, &link.connection) {
                tokio::spawn(stream_file(connection.clone(), seq, file, shipped.clone()));
            }
            match (Message::Op { seq, op }).encode() {
                Ok(bytes) => write_bytes(send, &bytes).await,
                // Files travel whole in one message for now: one that does not fit is
                // left out (and said so), not allowed to break the session.
                Err(ProtocolError::TooLarge(size)) => {
                    tracing::error!(volume = %volume.name, path = %shipped, size,
                        "file too large to replicate (limit {MAX_MESSAGE} bytes); skipped");
                    let op = Op::Skip { path: shipped };
                    write(send, &Message::Op { seq, op }).await
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot encode a message");
                    None
                }
            }
        }
        Output::Apply {
            seq,
            op: Op::PutStream { entry },
        } => {
            let path = entry.path.clone();
            let result = apply_streamed(volume, link, seq, entry).await;
            if let Err(e) = &result {
                tracing::warn!(volume = %volume.name, %path, error = %e, "refused or failed to apply");
            }
            session.applied(seq, &path, result, std::time::Instant::now());
            Some(0)
        }
        Output::Apply { seq, op } => {
            let v = volume.clone();
            let path = op.path().clone();
            let applied = tokio::task::spawn_blocking(move || apply_op(&v, &op)).await;
            let result = match applied {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => {
                    tracing::warn!(volume = %volume.name, %path, error = %e, "refused or failed to apply");
                    Err(e.to_string())
                }
                Err(_) => Err("apply task failed".to_owned()),
            };
            session.applied(seq, &path, result, std::time::Instant::now());
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

fn scan(volume: &VolumeLink) -> Result<Manifest, manifest::ManifestError> {
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
    // Kept so a restart does not read every file again; losing it only costs time.
    if let Err(e) = cache.store(&volume.cache_file) {
        tracing::warn!(volume = %volume.name, error = %e, "cannot save the hash cache");
    }
    Ok(manifest)
}

/// The op that ships `path` as it is now, whether it had vanished, and for a large
/// file the open file whose bytes follow on their own stream.
fn read_op(
    volume: &VolumeLink,
    path: RelPath,
    content: bool,
    standby_hash: Option<u128>,
    delete_if_missing: bool,
    can_stream: bool,
) -> Result<(Op, bool, Option<OwnedFd>), manifest::ManifestError> {
    if volume.volume.being_written(path.as_path()) {
        // Half written, maybe: its writer's close is recorded and ships it whole.
        return Ok((Op::Skip { path }, false, None));
    }
    let described = {
        let mut cache = volume.cache.lock().unwrap_or_else(|e| e.into_inner());
        manifest::describe(volume.root.as_fd(), &path, &mut cache)?
    };
    let Some((meta, _fd, parent)) = described else {
        return Ok(if delete_if_missing {
            (Op::Delete { path }, false, None)
        } else {
            (Op::Skip { path }, true, None)
        });
    };
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
    let file = match twinfs_fs::sys::openat(parent.as_fd(), &name, libc::O_RDONLY, 0) {
        Ok(fd) => fd,
        // Gone between the stat and the open: a later op says what became of it.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            return Ok((Op::Skip { path }, true, None))
        }
        Err(source) => {
            return Err(manifest::ManifestError::Io {
                path,
                op: "open",
                source,
            })
        }
    };
    if can_stream && meta.size > INLINE_MAX {
        // The standby checks the streamed bytes against the hash: a file that changes
        // while it streams is refused there, never put in place half old, half new.
        let entry = manifest::Entry { path, meta };
        return Ok((Op::PutStream { entry }, false, Some(file)));
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
    // Changed while it was read, or a writer opened it meanwhile: what was read may be
    // half of something; the writer's close ships it whole.
    let unchanged = after.st_size as u64 == meta.size
        && (after.st_mtime, after.st_mtime_nsec as u32) == meta.mtime
        && buf.len() as u64 == meta.size;
    if !unchanged || volume.volume.being_written(path.as_path()) {
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

/// Sends the bytes of a large file on a stream of its own, headed by its op number.
async fn stream_file(connection: quinn::Connection, seq: u64, file: OwnedFd, path: RelPath) {
    let mut send = match connection.open_uni().await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%path, error = %e, "cannot open a stream for a large file");
            return;
        }
    };
    if send.write_all(&seq.to_be_bytes()).await.is_err() {
        return;
    }
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
    // Reading is blocking file I/O: a thread reads, this task sends.
    tokio::task::spawn_blocking(move || {
        let mut offset = 0u64;
        loop {
            let mut chunk = vec![0u8; 1 << 20];
            match twinfs_fs::sys::pread(file.as_fd(), &mut chunk, offset) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    chunk.truncate(n);
                    offset += n as u64;
                    if tx.blocking_send(chunk).is_err() {
                        return;
                    }
                }
            }
        }
    });
    while let Some(chunk) = rx.recv().await {
        if let Err(e) = send.write_all(&chunk).await {
            tracing::warn!(%path, error = %e, "large file stream broke");
            return;
        }
    }
    let _ = send.finish();
}

/// Reads a large file's stream as a blocking `Read`, and fails at the end if the bytes
/// do not hash to what the active announced, so a torn file is never put in place.
struct StreamReader {
    chunks: mpsc::Receiver<Vec<u8>>,
    current: Vec<u8>,
    at: usize,
    hasher: xxhash_rust::xxh3::Xxh3Default,
    expected: Option<u128>,
}

impl std::io::Read for StreamReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.current.len() {
            match self.chunks.blocking_recv() {
                Some(chunk) => {
                    self.hasher.update(&chunk);
                    self.current = chunk;
                    self.at = 0;
                }
                None => {
                    if Some(self.hasher.digest128()) != self.expected {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "streamed bytes do not match the announced hash (changed while sent, or cut off)",
                        ));
                    }
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Standby: applies a `PutStream` op with the bytes from its stream.
async fn apply_streamed(
    volume: &VolumeLink,
    link: &Link,
    seq: u64,
    entry: manifest::Entry,
) -> Result<(), String> {
    let Some(streams) = &link.streams else {
        return Err("large file announced on a connection without streams".into());
    };
    let Some(mut recv) = streams.take(seq).await else {
        return Err(format!("the stream of {} never arrived", entry.path));
    };
    let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
    let pump = tokio::spawn(async move {
        while let Ok(Some(chunk)) = recv.read_chunk(1 << 20, true).await {
            if tx.send(chunk.bytes.to_vec()).await.is_err() {
                return;
            }
        }
    });
    let v = volume.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut reader = StreamReader {
            chunks: rx,
            current: Vec::new(),
            at: 0,
            hasher: xxhash_rust::xxh3::Xxh3Default::new(),
            expected: entry.meta.hash,
        };
        let applier = Applier::new(v.root.as_fd());
        let fm = file_meta(&entry.meta);
        let written = match applier.write_file(&entry.path, &mut reader, &fm) {
            Err(ApplyError::IsDirectory { .. }) => applier
                .delete(&entry.path)
                .and_then(|()| applier.write_file(&entry.path, &mut reader, &fm)),
            other => other,
        };
        if written.is_ok() {
            invalidate(&v, &entry.path);
        }
        written
    })
    .await;
    pump.abort();
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("apply task failed".into()),
    }
}

fn file_meta(meta: &Meta) -> FileMeta {
    FileMeta {
        mode: meta.mode,
        uid: meta.uid,
        gid: meta.gid,
        mtime: meta.mtime,
        xattrs: meta.xattrs.clone(),
    }
}

fn apply_op(volume: &VolumeLink, op: &Op) -> Result<(), ApplyError> {
    let applier = Applier::new(volume.root.as_fd());
    match op {
        Op::Put { entry, content } => {
            let fm = file_meta(&entry.meta);
            let path = &entry.path;
            let put = |applier: &Applier<'_>| match (entry.meta.kind, content) {
                (Kind::File, Some(bytes)) => applier.write_file(path, &mut bytes.as_slice(), &fm),
                (Kind::File, None) => applier.set_metadata(path, &fm),
                (Kind::Dir, _) => applier.make_dir(path, &fm),
                (Kind::Symlink, _) => applier.make_symlink(
                    path,
                    entry.meta.target.as_deref().unwrap_or_default(),
                    &fm,
                ),
                (Kind::Fifo, _) => applier.make_node(path, NodeKind::Fifo, 0, &fm),
                (Kind::Socket, _) => applier.make_node(path, NodeKind::Socket, 0, &fm),
                (Kind::CharDev, _) => applier.make_node(path, NodeKind::Char, entry.meta.rdev, &fm),
                (Kind::BlockDev, _) => {
                    applier.make_node(path, NodeKind::Block, entry.meta.rdev, &fm)
                }
            };
            match put(&applier) {
                // Something of another kind is in the way: it goes, as on the active.
                Err(ApplyError::IsDirectory { .. } | ApplyError::NotDirectory { .. }) => {
                    applier.delete(path)?;
                    put(&applier)?;
                }
                other => other?,
            }
            invalidate(volume, path);
        }
        Op::Rename { from, to, exchange } => {
            applier.rename(from, to, *exchange)?;
            invalidate(volume, from);
            invalidate(volume, to);
        }
        Op::Delete { path } => {
            applier.delete(path)?;
            invalidate(volume, path);
        }
        // Streamed files are applied by `apply_streamed`, with their stream.
        Op::Skip { .. } | Op::PutStream { .. } => {}
    }
    Ok(())
}

fn invalidate(volume: &VolumeLink, path: &RelPath) {
    if let Err(e) = volume.invalidator.invalidate(Path::new(path.as_path())) {
        tracing::debug!(volume = %volume.name, %path, error = %e, "invalidation refused");
    }
}
