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
pub struct Broadcast(pub broadcast::Sender<Record>);

impl RecordSink for Broadcast {
    fn push(&self, record: Record) {
        // No receiver (no standby connected) is fine: the next full sync covers it.
        let _ = self.0.send(record);
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
    pub changes: broadcast::Sender<Record>,
    /// Tells FUSE that a path changed underneath.
    pub invalidator: Invalidator,
    /// The mounted volume (to see whether a file is being written).
    pub volume: Arc<twinfs_fs::Volume>,
    /// Hashes already computed, shared by the sessions of this volume.
    pub cache: Arc<Mutex<HashCache>>,
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

fn session_config(volume: &VolumeLink) -> SessionConfig {
    SessionConfig {
        volume: volume.name.clone(),
        role: volume.role,
        epoch: volume.epoch,
        policies: volume.policies.clone(),
        heartbeat: Duration::from_secs(1),
        peer_timeout: Duration::from_secs(10),
        stall_timeout: Duration::from_secs(30),
        max_in_flight: 256,
        max_queue: 100_000,
    }
}

/// Starts the driver on the current tokio runtime.
pub fn start(endpoint: quinn::Endpoint, volumes: Vec<VolumeLink>, peers: Vec<Peer>) {
    let volumes = Arc::new(volumes);
    tokio::spawn(accept_loop(endpoint.clone(), volumes.clone()));
    if volumes.iter().any(|v| v.role == Role::Active) {
        for peer in peers {
            tokio::spawn(dial_loop(endpoint.clone(), volumes.clone(), peer));
        }
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, volumes: Arc<Vec<VolumeLink>>) {
    while let Some(accepted) = transport::accept(&endpoint).await {
        let Ok((connection, _peer)) = accepted else {
            continue;
        };
        let volumes = volumes.clone();
        tokio::spawn(async move {
            while let Ok((send, recv)) = connection.accept_bi().await {
                tokio::spawn(standby_stream(volumes.clone(), send, recv));
            }
        });
    }
}

async fn resolve(address: &str) -> Option<SocketAddr> {
    tokio::net::lookup_host(address).await.ok()?.next()
}

async fn dial_loop(endpoint: quinn::Endpoint, volumes: Arc<Vec<VolumeLink>>, peer: Peer) {
    loop {
        let Some(addr) = resolve(&peer.address).await else {
            tracing::warn!(peer = %peer.name, address = %peer.address, "cannot resolve");
            tokio::time::sleep(REDIAL).await;
            continue;
        };
        match transport::connect(&endpoint, addr, peer.id).await {
            Ok((connection, _)) => {
                tracing::info!(peer = %peer.name, %addr, "connected");
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
    run_session(volume.clone(), session, send, recv, Some(hello)).await;
}

/// Reads frames into decoded messages on a channel (so the session loop can wait on
/// several things without losing half-read frames). Ends on a bad frame.
fn spawn_reader(mut recv: quinn::RecvStream) -> mpsc::Receiver<Message> {
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
) {
    let mut messages = spawn_reader(recv);
    let mut changes = (volume.role == Role::Active).then(|| volume.changes.subscribe());
    if let Some(m) = first {
        session.on_message(m, std::time::Instant::now());
    }
    loop {
        while let Some(out) = session.poll_output() {
            if !carry_out(&volume, &mut session, &mut send, out).await {
                let _ = send.finish();
                return;
            }
        }
        let deadline = Instant::from_std(session.next_deadline());
        tokio::select! {
            m = messages.recv() => match m {
                Some(m) => session.on_message(m, std::time::Instant::now()),
                None => return,
            },
            r = async {
                match changes.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => match r {
                Ok(record) => session.on_change(&record, std::time::Instant::now()),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::info!(volume = %volume.name, missed = n, "change stream lagged; resyncing");
                    session.resync();
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = tokio::time::sleep_until(deadline) => session.on_tick(std::time::Instant::now()),
        }
    }
}

async fn write(send: &mut quinn::SendStream, message: &Message) -> bool {
    match message.encode() {
        Ok(bytes) => transport::write_frame(send, &bytes).await.is_ok(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode a message");
            false
        }
    }
}

/// Carries out one output; false ends the session.
async fn carry_out(
    volume: &VolumeLink,
    session: &mut Session,
    send: &mut quinn::SendStream,
    out: Output,
) -> bool {
    match out {
        Output::Send(m) => write(send, &m).await,
        Output::ScanLocal => {
            let v = volume.clone();
            let scanned = tokio::task::spawn_blocking(move || scan(&v)).await;
            match scanned {
                Ok(Ok(m)) => {
                    session.local_manifest(m, std::time::Instant::now());
                    true
                }
                Ok(Err(e)) => {
                    tracing::error!(volume = %volume.name, error = %e, "cannot scan the volume");
                    false
                }
                Err(_) => false,
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
            let read = tokio::task::spawn_blocking(move || {
                read_op(&v, path, content, standby_hash, delete_if_missing)
            })
            .await;
            let (op, vanished) = match read {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => {
                    tracing::warn!(volume = %volume.name, error = %e, "cannot read a change to ship");
                    return false;
                }
                Err(_) => return false,
            };
            if vanished {
                session.vanished(seq);
            }
            match (Message::Op { seq, op }).encode() {
                Ok(bytes) => transport::write_frame(send, &bytes).await.is_ok(),
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
                    false
                }
            }
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
            true
        }
        Output::InSync => {
            tracing::info!(volume = %volume.name, "in sync with the active");
            true
        }
        Output::Close(reason) => {
            tracing::info!(volume = %volume.name, %reason, "session closed");
            false
        }
    }
}

fn scan(volume: &VolumeLink) -> Result<Manifest, manifest::ManifestError> {
    let mut cache = volume.cache.lock().unwrap_or_else(|e| e.into_inner());
    let policies = &volume.policies;
    manifest::scan(
        volume.root.as_fd(),
        |path, _| policies.resolve(path.as_path()).sync != SyncMode::Never,
        &mut cache,
    )
}

/// The op that ships `path` as it is now, and whether it had vanished.
fn read_op(
    volume: &VolumeLink,
    path: RelPath,
    content: bool,
    standby_hash: Option<u128>,
    delete_if_missing: bool,
) -> Result<(Op, bool), manifest::ManifestError> {
    if volume.volume.being_written(path.as_path()) {
        // Half written, maybe: its writer's close is recorded and ships it whole.
        return Ok((Op::Skip { path }, false));
    }
    let described = {
        let mut cache = volume.cache.lock().unwrap_or_else(|e| e.into_inner());
        manifest::describe(volume.root.as_fd(), &path, &mut cache)?
    };
    let Some((meta, _fd, parent)) = described else {
        return Ok(if delete_if_missing {
            (Op::Delete { path }, false)
        } else {
            (Op::Skip { path }, true)
        });
    };
    let bytes = if meta.kind == Kind::File && (content || meta.hash != standby_hash) {
        let name = path
            .split_last()
            .map(|(_, n)| n.to_owned())
            .unwrap_or_default();
        let read =
            twinfs_fs::sys::openat(parent.as_fd(), &name, libc::O_RDONLY, 0).and_then(|fd| {
                let mut buf = vec![0u8; meta.size as usize];
                let n = twinfs_fs::sys::pread(fd.as_fd(), &mut buf, 0)?;
                buf.truncate(n);
                let after = twinfs_fs::sys::fstat(fd.as_fd())?;
                Ok((buf, after))
            });
        match read {
            Ok((b, after)) => {
                // Changed while it was read, or a writer opened it meanwhile: what was
                // read may be half of something; the writer's close ships it whole.
                let unchanged = after.st_size as u64 == meta.size
                    && (after.st_mtime, after.st_mtime_nsec as u32) == meta.mtime
                    && b.len() as u64 == meta.size;
                if !unchanged || volume.volume.being_written(path.as_path()) {
                    return Ok((Op::Skip { path }, false));
                }
                Some(b)
            }
            // Gone between the stat and the read: a later op says what became of it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Ok((Op::Skip { path }, true))
            }
            Err(source) => {
                return Err(manifest::ManifestError::Io {
                    path,
                    op: "read",
                    source,
                })
            }
        }
    } else {
        None
    };
    let entry = manifest::Entry { path, meta };
    Ok((
        Op::Put {
            entry,
            content: bytes,
        },
        false,
    ))
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
        Op::Skip { .. } => {}
    }
    Ok(())
}

fn invalidate(volume: &VolumeLink, path: &RelPath) {
    if let Err(e) = volume.invalidator.invalidate(Path::new(path.as_path())) {
        tracing::debug!(volume = %volume.name, %path, error = %e, "invalidation refused");
    }
}
