//! The daemon behind `twinfs mount`: mounts every configured volume in place, serves
//! the control socket, and unmounts cleanly on SIGINT/SIGTERM.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use twinfs_fs::{MountOptions, Mounted, Volume};
use twinfs_replicator::capture::Capture;
use twinfs_replicator::manifest::HashCache;
use twinfs_replicator::node::{self, Peer, VolumeLink};
use twinfs_replicator::transport::{self, PinnedPeers, TlsIdentity};

use crate::config::{Config, Role, VolumeConfig};
use crate::control::{self, ChangeCounts, NodeStatus, Request, Response, VolumeStatus};
use crate::state::VolumeState;

/// Change records a volume keeps for sessions that have not read them yet.
const CHANGE_BACKLOG: usize = 65_536;

/// How long an unmount at shutdown waits for the kernel to let go.
const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of `twinfs mount` that come from flags, not from the file.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// Ask the kernel for FUSE passthrough.
    pub passthrough: bool,
    /// FUSE worker threads per volume.
    pub threads: usize,
}

/// One mounted volume and what the daemon knows about it.
struct VolumeRuntime {
    config: VolumeConfig,
    mounted: Mounted,
    capture: Arc<Capture>,
    state: Mutex<VolumeState>,
    changes: tokio::sync::broadcast::Sender<node::Numbered>,
    gate: Arc<node::SyncGate>,
}

/// The running daemon's state, shared by the control connections.
struct Daemon {
    config: Config,
    volumes: Vec<VolumeRuntime>,
    board: node::Board,
}

fn mount_volume(
    config: &Config,
    vc: &VolumeConfig,
    options: &DaemonOptions,
) -> anyhow::Result<VolumeRuntime> {
    let state = VolumeState::load_or_init(&config.node.state_dir, &vc.name, vc.initial_role)?;
    // Bounded: a session that falls this far behind resyncs by manifest instead.
    let (changes, _) = tokio::sync::broadcast::channel(CHANGE_BACKLOG);
    let gate = Arc::new(node::SyncGate::default());
    let capture = Arc::new(Capture::new(
        &vc.name,
        vc.policies.clone(),
        Some(Box::new(node::Broadcast::new(
            changes.clone(),
            gate.clone(),
            vc.durability,
            vc.sync_timeout,
        ))),
    ));
    let volume = Volume::new(&vc.path, state.role, capture.clone()).map_err(|e| {
        if e.errno() == libc::EBUSY {
            anyhow::anyhow!(
                "volume {}: {} is already a FUSE mount (is another twinfs running?)",
                vc.name,
                vc.path.display()
            )
        } else {
            anyhow::anyhow!("volume {}: cannot open {}: {e}", vc.name, vc.path.display())
        }
    })?;
    let mount_options = MountOptions {
        name: vc.name.clone(),
        // A replicated volume serves writes itself: a handle opened while this node
        // was active must get EROFS once it is demoted, which passthrough (the kernel
        // writing to the backing file directly) cannot do, and the kernel wants all
        // handles of an inode passthrough or none.
        passthrough: options.passthrough && config.peers.is_empty(),
        threads: options.threads,
    };
    let mounted = Mounted::mount(Arc::new(volume), &mount_options)
        .with_context(|| format!("volume {}: cannot mount {}", vc.name, vc.path.display()))?;
    tracing::info!(
        volume = %vc.name,
        path = %vc.path.display(),
        role = %state.role,
        epoch = state.epoch,
        passthrough = mounted.volume().passthrough(),
        "mounted in place"
    );
    Ok(VolumeRuntime {
        config: vc.clone(),
        mounted,
        capture,
        state: Mutex::new(state),
        changes,
        gate,
    })
}

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run(config: Config, options: DaemonOptions) -> anyhow::Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("twinfs mount must run as root (it mounts in place with allow_other and FUSE passthrough)");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let listener = runtime.block_on(bind_control(&config.node.control_socket))?;
    // Listen for signals before mounting: a SIGTERM while volumes are being mounted
    // then stops the daemon cleanly once they are, instead of killing it halfway.
    let signals = {
        let _runtime = runtime.enter();
        Signals::new()?
    };

    let mut volumes = Vec::new();
    for vc in &config.volumes {
        match mount_volume(&config, vc, &options) {
            Ok(v) => volumes.push(v),
            Err(e) => {
                for v in volumes {
                    unmount(v);
                }
                let _ = std::fs::remove_file(&config.node.control_socket);
                return Err(e);
            }
        }
    }
    let board = node::Board::default();
    let mut endpoint = None;
    if !config.peers.is_empty() {
        let _runtime = runtime.enter();
        match start_replication(&config, &volumes, board.clone()) {
            Ok(e) => endpoint = Some(e),
            Err(e) => {
                for v in volumes {
                    unmount(v);
                }
                let _ = std::fs::remove_file(&config.node.control_socket);
                return Err(e);
            }
        }
    }
    let socket = config.node.control_socket.clone();
    let daemon = Arc::new(Daemon {
        config,
        volumes,
        board,
    });
    tracing::info!(socket = %socket.display(), "twinfs daemon ready");

    runtime.block_on(serve(daemon.clone(), listener, signals));

    tracing::info!("shutting down");
    let _ = std::fs::remove_file(&socket);
    if let Some(endpoint) = endpoint {
        // Tell the peers now, so an active redials a restarted standby at once instead
        // of waiting out the idle timeout of a connection nobody answers.
        endpoint.close(0u32.into(), b"shutting down");
        runtime.block_on(async {
            let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
        });
    }
    match Arc::try_unwrap(daemon) {
        Ok(daemon) => {
            for v in daemon.volumes {
                unmount(v);
            }
        }
        Err(_) => tracing::warn!("control connections still open; leaving the unmount to exit"),
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// Listens for peers and dials them, with this node's identity and the pinned
/// peer IDs. Needs the tokio runtime entered.
fn start_replication(
    config: &Config,
    volumes: &[VolumeRuntime],
    board: node::Board,
) -> anyhow::Result<quinn::Endpoint> {
    let (identity, created) =
        crate::identity::Identity::load_or_create(&config.node.state_dir, &config.node.name)?;
    if created {
        tracing::info!(node_id = %identity.node_id(), "created this node's identity");
    }
    let tls = TlsIdentity {
        cert: identity.certificate().clone(),
        key: rustls_pki_types::PrivateKeyDer::Pkcs8(identity.private_key().clone_key()),
    };
    let pinned = PinnedPeers::new(config.peers.iter().map(|p| *p.node_id.as_bytes()));
    let endpoint = transport::endpoint(config.node.listen, &tls, pinned)
        .with_context(|| format!("cannot listen on {}", config.node.listen))?;
    let mut links = Vec::new();
    for v in volumes {
        let state = *v.state.lock().unwrap_or_else(|e| e.into_inner());
        let root = v
            .mounted
            .volume()
            .root_fd()
            .try_clone_to_owned()
            .with_context(|| format!("volume {}: cannot duplicate its fd", v.config.name))?;
        let cache_file = config
            .node
            .state_dir
            .join("volumes")
            .join(format!("{}.hashes", v.config.name));
        links.push(VolumeLink {
            name: v.config.name.clone(),
            root: Arc::new(root),
            policies: v.config.policies.clone(),
            role: state.role,
            epoch: state.epoch,
            changes: v.changes.clone(),
            gate: v.gate.clone(),
            invalidator: v.mounted.invalidator(),
            volume: v.mounted.volume().clone(),
            cache: Arc::new(Mutex::new(HashCache::load(&cache_file))),
            cache_file,
            applying: Default::default(),
        });
    }
    let peers = config
        .peers
        .iter()
        .map(|p| Peer {
            name: p.name.clone(),
            address: p.address.clone(),
            id: *p.node_id.as_bytes(),
        })
        .collect();
    tracing::info!(listen = %config.node.listen, node_id = %identity.node_id(), "replication started");
    node::start(endpoint.clone(), links, peers, board);
    Ok(endpoint)
}

fn unmount(v: VolumeRuntime) {
    let path = v.config.path.clone();
    match v.mounted.unmount(UNMOUNT_TIMEOUT) {
        Ok(()) => tracing::info!(volume = %v.config.name, path = %path.display(), "unmounted"),
        Err(e) => tracing::warn!(volume = %v.config.name, error = %e, "unmount incomplete"),
    }
}

/// Binds the control socket; a stale socket file is replaced, a live one means another
/// daemon already serves this state directory.
async fn bind_control(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!(
                "another twinfs daemon is already serving {} (see `twinfs status`)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))?;
    Ok(listener)
}

/// SIGINT and SIGTERM, the two ways to stop the daemon.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        })
    }
}

async fn serve(daemon: Arc<Daemon>, listener: UnixListener, mut signals: Signals) {
    loop {
        tokio::select! {
            _ = signals.interrupt.recv() => return,
            _ = signals.terminate.recv() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let daemon = daemon.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle_connection(&daemon, stream).await {
                            tracing::debug!(error = %e, "control connection failed");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "control socket accept failed"),
            },
        }
    }
}

async fn handle_connection(daemon: &Daemon, stream: UnixStream) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(control::MAX_LINE as u64));
    let mut line = String::new();
    let read = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await;
    let response = match read {
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Ok(request) => daemon.handle(request),
            Err(e) => Response::Error(format!("bad request: {e}")),
        },
        Ok(Err(e)) => return Err(e),
        Err(_) => Response::Error("request timed out".into()),
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await
}

impl Daemon {
    fn handle(&self, request: Request) -> Response {
        match request {
            Request::Status => Response::Status(self.status()),
            Request::Role { volume, role } => match self.set_role(&volume, role) {
                Ok(message) => Response::Done(message),
                Err(e) => Response::Error(format!("{e:#}")),
            },
        }
    }

    fn volume(&self, name: &str) -> anyhow::Result<&VolumeRuntime> {
        self.volumes
            .iter()
            .find(|v| v.config.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = self
                    .volumes
                    .iter()
                    .map(|v| v.config.name.as_str())
                    .collect();
                anyhow::anyhow!("no volume named {name:?} (volumes: {})", known.join(", "))
            })
    }

    fn set_role(&self, name: &str, role: Role) -> anyhow::Result<String> {
        let v = self.volume(name)?;
        let mut state = v.state.lock().unwrap_or_else(|e| e.into_inner());
        let before = state.role;
        // Persist first: after a crash the node must come back in the role it last had.
        let next = VolumeState { role, ..*state };
        next.store(&self.config.node.state_dir, name)?;
        *state = next;
        v.mounted.volume().set_role(role);
        tracing::info!(volume = name, from = %before, to = %role, "role switched");
        let writers = v.mounted.volume().stats().open_for_write;
        let mut message = format!("volume {name}: role {before} -> {role}");
        if role == Role::Standby && writers > 0 {
            message.push_str(&format!(
                "; {writers} file(s) opened for writing before the switch stay writable until closed"
            ));
        }
        Ok(message)
    }

    fn status(&self) -> NodeStatus {
        let volumes = self
            .volumes
            .iter()
            .map(|v| {
                let state = *v.state.lock().unwrap_or_else(|e| e.into_inner());
                let c = v.capture.counters();
                let stats = v.mounted.volume().stats();
                VolumeStatus {
                    name: v.config.name.clone(),
                    path: v.config.path.clone(),
                    role: state.role,
                    epoch: state.epoch,
                    mounted: is_twinfs_mount(&v.config.path),
                    passthrough: v.mounted.volume().passthrough(),
                    changes: ChangeCounts {
                        always: c.always,
                        once: c.once,
                        interval: c.interval,
                        never: c.never,
                        total: c.total(),
                    },
                    open_files: stats.open_files,
                    open_for_write: stats.open_for_write,
                    inodes: stats.inodes,
                    peers: self
                        .board
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .values()
                        .filter(|p| p.volume == v.config.name)
                        .cloned()
                        .collect(),
                }
            })
            .collect();
        NodeStatus {
            node: self.config.node.name.clone(),
            pid: std::process::id(),
            volumes,
        }
    }
}

/// Whether a twinfs FUSE mount sits on `path` (per /proc/self/mountinfo).
fn is_twinfs_mount(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want: PathBuf = path.to_owned();
    info.lines().any(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            return false;
        };
        let mount_point = fields.get(4).map(|m| m.replace("\\040", " "));
        mount_point.as_deref().map(Path::new) == Some(want.as_path())
            && fields.get(sep + 1) == Some(&"fuse.twinfs")
    })
}
