//! The daemon behind `twinfs mount`: mounts every configured volume in place, serves
//! the control socket, and unmounts cleanly on SIGINT/SIGTERM.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use twinfs_fs::watchdog::WatchdogCommand;
use twinfs_fs::{MountOptions, Mounted, Volume};
use twinfs_replicator::capture::Capture;
use twinfs_replicator::manifest::HashCache;
use twinfs_replicator::node::{self, Peer, SyncRecord, VolumeLink};
use twinfs_replicator::roles::{Hold, RoleCell, RoleState, CHANGE_WAIT, SWITCH_WAIT};
use twinfs_replicator::transport::{self, PinnedPeers, TlsIdentity};

use crate::config::{Config, Role, VolumeConfig};
use crate::control::{self, ChangeCounts, NodeStatus, Request, Response, VolumeStatus};
use crate::failover::unfit;
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
    roles: Arc<RoleCell>,
    /// The last hook run, for status.
    last_hook: Arc<Mutex<Option<HookResult>>>,
    /// Where `twinfs sync` reaches the active sessions (shared with the link).
    commands: tokio::sync::broadcast::Sender<node::Command>,
    /// Where `promote` reaches the session with the active (shared with the link).
    handover: node::HandoverSlot,
    /// The volume's sessions with an active, which record its fitness (shared with
    /// the link): a demotion's record must not land after theirs.
    followings: Arc<node::Followings>,
    changes: tokio::sync::broadcast::Sender<node::Numbered>,
    gate: Arc<node::SyncGate>,
    /// What the automatic failover last found (standby, `failover = "auto"`).
    failover_note: Arc<Mutex<String>>,
    /// The active's health checks.
    health: Arc<Mutex<crate::failover::HealthStatus>>,
}

/// The running daemon's state, shared by the control connections.
struct Daemon {
    config: Config,
    volumes: Vec<VolumeRuntime>,
    board: node::Board,
}

/// How long `twinfs demote` waits for the standbys to acknowledge what is pending.
const DEMOTE_WAIT: Duration = Duration::from_secs(30);

/// How long `twinfs sync` waits for the standbys' acknowledgements.
const SYNC_WAIT: Duration = Duration::from_secs(600);

/// How long `twinfs promote` waits for a reachable active to hand over.
const HANDOVER_WAIT: Duration = Duration::from_secs(40);

/// What [`answer_within`] allows beyond the daemon's own waits: the volume work around
/// them (a demotion's stop of writes, the fsyncs of a role change).
const ANSWER_MARGIN: Duration = Duration::from_secs(30);

/// How long the daemon may take to answer `request` at most, from its waits and the
/// hook timeouts of the volumes it concerns (all when it names none): how long the
/// command waits before it says the daemon is still at work.
pub fn answer_within(config: &Config, request: &Request) -> Duration {
    let (volume, per_volume): (Option<&str>, fn(&crate::config::Hooks) -> Duration) = match request
    {
        Request::Status => return ANSWER_MARGIN,
        // The promote hook, the demote hook of a rollback, and the wait for a change
        // of the volume under way.
        Request::Role { volume, .. } => (Some(volume), |h| {
            CHANGE_WAIT.saturating_add(h.timeout.saturating_mul(2))
        }),
        Request::Promote { volume, .. } => (volume.as_deref(), |h| {
            HANDOVER_WAIT
                .saturating_add(CHANGE_WAIT)
                .saturating_add(h.timeout.saturating_mul(2))
        }),
        Request::Demote { volume } => (volume.as_deref(), |h| {
            DEMOTE_WAIT
                .saturating_add(SWITCH_WAIT * 2)
                .saturating_add(h.timeout)
        }),
        Request::Sync { volume, .. } | Request::Verify { volume } => {
            (volume.as_deref(), |_| SYNC_WAIT)
        }
    };
    let volumes = config
        .volumes
        .iter()
        .filter(|v| volume.is_none_or(|name| name == v.name));
    // A role change under way (an automatic failover, a health demotion) holds the
    // volume's role lock for as long as its hooks.
    let locked = volumes
        .clone()
        .map(|v| v.hooks.timeout.saturating_mul(2))
        .max()
        .unwrap_or_default();
    volumes.map(|v| per_volume(&v.hooks)).fold(
        ANSWER_MARGIN.saturating_add(locked),
        Duration::saturating_add,
    )
}

/// An active silent for this long (three heartbeats) is taken as gone.
const SILENT: Duration = Duration::from_secs(3 * node::HEARTBEAT.as_secs());

/// Where the in-place updates of volume `name` are journaled.
fn journal(config: &Config, name: &str) -> twinfs_replicator::patch::Journal {
    twinfs_replicator::patch::Journal::new(
        config
            .node
            .state_dir
            .join("volumes")
            .join(format!("{name}.journal")),
    )
}

fn mount_volume(
    node_roles: &tokio::sync::watch::Sender<u64>,
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
    // An active with peers starts read-only: another node may have taken over while
    // it was down, and it must meet the others (and be fenced) before it takes writes.
    let held = state.role == Role::Active && !config.peers.is_empty();
    let fs_role = if held { Role::Standby } else { state.role };
    // Left by a daemon killed together with its watchdog (a service manager's final
    // SIGKILL to the whole group, say): the directory answers ENOTCONN until detached.
    match twinfs_fs::watchdog::clear_dead_mount(&vc.path) {
        Ok(true) => tracing::warn!(volume = %vc.name, path = %vc.path.display(),
            "a dead twinfs mount was left on the volume (its daemon was killed?); detached it"),
        Ok(false) => {}
        Err(e) => tracing::debug!(volume = %vc.name, error = %e, "no check for a dead mount"),
    }
    let volume = Volume::new(&vc.path, fs_role, capture.clone()).map_err(|e| {
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
    // An in-place update a crash cut short is finished before the volume is mounted,
    // so no one reads its file half written.
    let journal = journal(config, &vc.name);
    journal
        .prepare()
        .and_then(|()| {
            // Only into a standby of the epoch it was written at: one that has been
            // active since (or is now) may have written its file since.
            let standby_of = (state.role == Role::Standby).then_some(state.epoch);
            journal.replay(
                &twinfs_replicator::apply::Applier::new(volume.root_fd()),
                standby_of,
            )
        })
        .with_context(|| {
            format!(
                "volume {}: cannot finish the in-place updates journaled in {}",
                vc.name,
                journal.dir().display()
            )
        })?;
    // Temp files a crash left between writing and renaming (up to a whole copy of a
    // large file each) would otherwise stay hidden on the disk for good. Nothing else
    // uses the directory before the mount, so none of them is still being written.
    match twinfs_replicator::apply::Applier::new(volume.root_fd()).remove_stale_temps() {
        Ok(0) => {}
        Ok(removed) => tracing::info!(volume = %vc.name, removed,
            "removed the temp files a crash had left in the volume"),
        // Only space is lost: the volume is served all the same.
        Err(e) => tracing::warn!(volume = %vc.name, error = %e,
            "could not remove the temp files a crash may have left in the volume"),
    }
    // A standby takes local writes of its `direction = "both"` paths (while its
    // session with the active can ship them upstream).
    let volume = if vc.policies.rules().iter().any(|r| r.policy().upstream()) {
        let policies = vc.policies.clone();
        let area = twinfs_replicator::conflicts::Area::new(&config.node.state_dir, &vc.name);
        let (state_dir, name) = (config.node.state_dir.clone(), vc.name.clone());
        volume
            .with_upstream(Arc::new(move |path: &Path| {
                policies.resolve(path).upstream()
            }))
            .with_rescue(Arc::new(move |path: &Path, fd| {
                // The state file exists by now: the volume's role was loaded from it.
                let epoch = VolumeState::load_or_init(&state_dir, &name, Role::Standby)
                    .map_or(0, |s| s.epoch);
                rescue(&area, epoch, path, fd);
            }))
    } else {
        volume
    };
    let mount_options = MountOptions {
        name: vc.name.clone(),
        // A replicated volume serves writes itself: a handle opened while this node
        // was active must get EROFS once it is demoted, which passthrough (the kernel
        // writing to the backing file directly) cannot do, and the kernel wants all
        // handles of an inode passthrough or none.
        passthrough: options.passthrough && config.peers.is_empty(),
        threads: options.threads,
        // This very binary, even if a package upgrade replaced its file since.
        watchdog: Some(WatchdogCommand {
            program: "/proc/self/exe".into(),
            name: "twinfs".into(),
            args: vec!["watch-mount".into()],
        }),
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
    let last_hook: Arc<Mutex<Option<HookResult>>> = Arc::default();
    let state_dir = config.node.state_dir.clone();
    let name = vc.name.clone();
    let store: twinfs_replicator::roles::Store = Box::new(move |r: RoleState| {
        VolumeState {
            role: r.role,
            epoch: r.epoch,
        }
        .store(&state_dir, &name)
        .map_err(|e| e.to_string())
    });
    let roles = Arc::new(RoleCell::new(
        &vc.name,
        RoleState {
            role: state.role,
            epoch: state.epoch,
        },
        mounted.volume().clone(),
        store,
        sync_file(config, &vc.name),
        node_roles.clone(),
        Some(hook_runner(vc.hooks.clone(), last_hook.clone())),
    ));
    if held {
        // Lifted by `hold_writes_until_unchallenged` once replication runs.
        roles.stop_writes(Hold::Startup);
    }
    Ok(VolumeRuntime {
        config: vc.clone(),
        mounted,
        capture,
        roles,
        last_hook,
        commands: tokio::sync::broadcast::channel(16).0,
        handover: Default::default(),
        followings: Arc::default(),
        changes,
        gate,
        failover_note: Arc::default(),
        health: Arc::default(),
    })
}

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run(config: Config, options: DaemonOptions) -> anyhow::Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("twinfs mount must run as root (it mounts in place with allow_other and FUSE passthrough)");
    }
    // Held until the daemon ends (and closed by the kernel if it dies).
    let _lock = lock_state_dir(&config.node.state_dir)?;
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

    let node_roles = tokio::sync::watch::Sender::new(0u64);
    let mut volumes = Vec::new();
    for vc in &config.volumes {
        match mount_volume(&node_roles, &config, vc, &options) {
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
    // The startup holds of active volumes: the daemon is ready once they are over.
    let mut holds = Vec::new();
    if !config.peers.is_empty() {
        let _runtime = runtime.enter();
        match start_replication(&config, &volumes, board.clone(), node_roles.subscribe()) {
            Ok(e) => {
                endpoint = Some(e);
                for v in volumes
                    .iter()
                    .filter(|v| v.roles.get().role == Role::Active)
                {
                    holds.push(tokio::spawn(hold_writes_until_unchallenged(
                        v.config.name.clone(),
                        v.roles.clone(),
                        board.clone(),
                    )));
                }
            }
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
    if let Some(endpoint) = &endpoint {
        let _runtime = runtime.enter();
        start_watches(&daemon, endpoint);
    }
    tracing::info!(socket = %socket.display(), "twinfs daemon ready");
    // (Roles change later: `twinfs status` says them, not systemd's status line.)
    let serving = match daemon.volumes.len() {
        0 => "a witness: no volumes".to_owned(),
        _ => {
            let names: Vec<&str> = daemon
                .volumes
                .iter()
                .map(|v| v.config.name.as_str())
                .collect();
            format!("mounted: {}", names.join(", "))
        }
    };
    let ready = runtime.spawn(async move {
        for hold in holds {
            let _ = hold.await;
        }
        crate::notify::notify(&format!("READY=1\nSTATUS={serving}"));
    });

    runtime.block_on(serve(daemon.clone(), listener, signals));

    tracing::info!("shutting down");
    // (Stopped during the startup hold: never ready after stopping.)
    ready.abort();
    crate::notify::notify("STOPPING=1\nSTATUS=shutting down");
    runtime.block_on(daemon.ship_before_stop(STOP_FLUSH));
    let _ = std::fs::remove_file(&socket);
    if let Some(endpoint) = endpoint {
        // Tell the peers now, so an active redials a restarted standby at once instead
        // of waiting out the idle timeout of a connection nobody answers.
        endpoint.close(0u32.into(), b"shutting down");
        runtime.block_on(async {
            let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
        });
    }
    match sole_owner(daemon, CONTROL_DRAIN) {
        Some(daemon) => {
            for v in daemon.volumes {
                unmount(v);
            }
        }
        None => {
            tracing::warn!("control requests still running; leaving the unmount to the watchdog")
        }
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// How long a stop waits for an active's standbys to take what it has not shipped.
const STOP_FLUSH: Duration = Duration::from_secs(3);

/// What a watch or a control request that finds the daemon gone gets.
const SHUTTING_DOWN: &str = "the daemon is shutting down";

/// How long the shutdown waits for control requests under way (a `promote` may wait
/// for its standby) before it leaves the unmount to the watchdog.
const CONTROL_DRAIN: Duration = Duration::from_secs(2);

/// The daemon, once the control requests under way (which hold it) are through;
/// `None` if some still run after `wait`.
fn sole_owner(mut daemon: Arc<Daemon>, wait: Duration) -> Option<Daemon> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match Arc::try_unwrap(daemon) {
            Ok(daemon) => return Some(daemon),
            Err(held) if std::time::Instant::now() < deadline => {
                daemon = held;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => return None,
        }
    }
}

/// Listens for peers and dials them, with this node's identity and the pinned
/// peer IDs. Needs the tokio runtime entered.
fn start_replication(
    config: &Config,
    volumes: &[VolumeRuntime],
    board: node::Board,
    roles: tokio::sync::watch::Receiver<u64>,
) -> anyhow::Result<quinn::Endpoint> {
    let (identity, created) =
        crate::identity::Identity::load_or_create(&config.node.state_dir, &config.node.name)?;
    if created {
        tracing::info!(node_id = %identity.node_id(), "created this node's identity");
    }
    // The active would dial itself and fence itself, and an automatic failover would
    // count this node twice.
    if let Some(peer) = config
        .peers
        .iter()
        .find(|p| p.node_id == identity.node_id())
    {
        bail!(
            "{}: peer {:?} has this node's own node_id ({}): a node does not list itself \
             as a peer; remove that [[peer]] from this node's configuration",
            config.source.display(),
            peer.name,
            peer.node_id
        );
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
        let sync_file = sync_file(config, &v.config.name);
        let journal = journal(config, &v.config.name);
        links.push(VolumeLink {
            name: v.config.name.clone(),
            root: Arc::new(root),
            policies: v.config.policies.clone(),
            roles: v.roles.clone(),
            changes: v.changes.clone(),
            gate: v.gate.clone(),
            invalidator: v.mounted.invalidator(),
            volume: v.mounted.volume().clone(),
            cache: Arc::new(Mutex::new(HashCache::load(&cache_file))),
            cache_file,
            sync_file,
            conflicts: twinfs_replicator::conflicts::Area::new(
                &config.node.state_dir,
                &v.config.name,
            ),
            handover: v.handover.clone(),
            commands: v.commands.clone(),
            applying: Default::default(),
            handed_over: Default::default(),
            blocks: Default::default(),
            journal,
            followings: v.followings.clone(),
            gave_up: Default::default(),
            placed_upstream: Default::default(),
            term: v.roles.term(),
        });
    }
    let peers = peers(config);
    tracing::info!(listen = %config.node.listen, node_id = %identity.node_id(), "replication started");
    let own: [u8; 32] = *identity.node_id().as_bytes();
    let viewed = volumes.iter().map(|v| viewed(config, v)).collect();
    let prober = crate::failover::prober(config.node.name.clone(), viewed, board.clone());
    node::start(endpoint.clone(), own, links, peers, board, roles, prober);
    Ok(endpoint)
}

/// The configured peers, as the replication knows them.
fn peers(config: &Config) -> Vec<Peer> {
    config
        .peers
        .iter()
        .map(|p| Peer {
            name: p.name.clone(),
            address: p.address.clone(),
            id: *p.node_id.as_bytes(),
            witness: p.witness,
        })
        .collect()
}

/// What the automatic failover needs of a volume.
fn viewed(config: &Config, v: &VolumeRuntime) -> crate::failover::Viewed {
    crate::failover::Viewed {
        name: v.config.name.clone(),
        roles: v.roles.clone(),
        sync_file: sync_file(config, &v.config.name),
        peer_timeout: v.config.failover.peer_timeout,
    }
}

/// Starts, for each volume, the automatic failover (`failover = "auto"`) and the
/// active's health watch. Needs the tokio runtime entered.
fn start_watches(daemon: &Arc<Daemon>, endpoint: &quinn::Endpoint) {
    let peers = peers(&daemon.config);
    for (i, v) in daemon.volumes.iter().enumerate() {
        // The watches hold the daemon weakly: the shutdown unmounts the volumes only
        // once nothing else holds it.
        if v.config.failover.auto {
            let d = Arc::downgrade(daemon);
            tokio::spawn(crate::failover::watch(
                viewed(&daemon.config, v),
                daemon.config.node.name.clone(),
                daemon.board.clone(),
                endpoint.clone(),
                peers.clone(),
                v.failover_note.clone(),
                move |epoch| {
                    let d = d.upgrade();
                    async move {
                        let Some(d) = d else {
                            return Err(SHUTTING_DOWN.to_owned());
                        };
                        match take_over(&d.volumes[i], epoch, "auto").await {
                            Ok(Ok(line)) => Ok(line),
                            Ok(Err(line)) => Err(line),
                            Err(e) => Err(crate::error::text(&e)),
                        }
                    }
                },
            ));
        }
        let root = match v.mounted.volume().root_fd().try_clone_to_owned() {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                tracing::error!(volume = %v.config.name, error = %e, "cannot duplicate the volume's fd; no health checks");
                continue;
            }
        };
        let d = Arc::downgrade(daemon);
        let name = v.config.name.clone();
        tokio::spawn(crate::failover::health(
            v.config.name.clone(),
            v.roles.clone(),
            root,
            v.config.health.command.clone(),
            v.config.health.interval,
            v.config.health.failures,
            v.health.clone(),
            move || {
                let (d, name) = (d.upgrade(), name.clone());
                async move {
                    let Some(d) = d else {
                        return Err(SHUTTING_DOWN.to_owned());
                    };
                    d.demote(Some(&name), "health")
                        .await
                        .map_err(|e| crate::error::text(&e))
                }
            },
        ));
    }
}

/// How long an active that starts waits to meet a standby before it takes writes.
const STARTUP_HOLD: Duration = Duration::from_secs(5);

/// An active that starts with peers takes local writes only once a standby has
/// accepted it as its active (so no other node took over with a later epoch: it
/// would have been fenced instead), or after [`STARTUP_HOLD`] if none answers.
async fn hold_writes_until_unchallenged(volume: String, roles: Arc<RoleCell>, board: node::Board) {
    let deadline = tokio::time::Instant::now() + STARTUP_HOLD;
    loop {
        if roles.get().role != Role::Active {
            return;
        }
        let accepted = board
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|p| {
                p.volume == volume
                    && p.connected
                    && p.peer_role == Some(Role::Standby)
                    && p.full_sync != "never"
            });
        let timed_out = tokio::time::Instant::now() >= deadline;
        if accepted || timed_out {
            if timed_out && !accepted {
                tracing::warn!(volume = %volume, "no standby answered within {STARTUP_HOLD:?}; taking writes");
            }
            let r = roles.clone();
            let _ = tokio::task::spawn_blocking(move || r.resume_writes(Hold::Startup)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Keeps in the conflicts area what a local writer on this standby wrote to `path`
/// after the active's version replaced it (the file behind `fd` is no longer in the
/// volume).
fn rescue(
    area: &twinfs_replicator::conflicts::Area,
    epoch: u64,
    path: &Path,
    fd: std::os::fd::BorrowedFd<'_>,
) {
    use std::os::fd::AsRawFd;
    let kept = twinfs_replicator::path::RelPath::from_path(path)
        .map_err(|e| e.to_string())
        .and_then(|rel| {
            // Opened anew through /proc: the writer's fd may be write-only.
            let content = std::fs::read(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .map_err(|e| e.to_string())?;
            area.keep_refused(
                epoch,
                unix_now(),
                &rel,
                Some(&content),
                "the active's version replaced it while it was open for writing on this standby",
            )
        });
    if let Err(e) = kept {
        tracing::error!(path = %path.display(), error = %e,
            "cannot keep a standby write that the active's version replaced");
    }
}

/// Where a standby keeps its fitness to take over (a [`SyncRecord`]).
fn sync_file(config: &Config, volume: &str) -> PathBuf {
    config
        .node
        .state_dir
        .join("volumes")
        .join(format!("{volume}.sync.json"))
}

fn unmount(v: VolumeRuntime) {
    let path = v.config.path.clone();
    match v.mounted.unmount(UNMOUNT_TIMEOUT) {
        Ok(()) => tracing::info!(volume = %v.config.name, path = %path.display(), "unmounted"),
        Err(e) => tracing::warn!(volume = %v.config.name, error = %e, "unmount incomplete"),
    }
}

/// The lock file in the state directory that one daemon holds while it runs.
const LOCK_FILE: &str = "daemon.lock";

/// Takes the state directory for this daemon: a second `twinfs mount` with the same
/// state (a manual start beside systemd's, say) would mount the volumes again on top,
/// replay their journals and remove each other's temp files and control socket. The
/// lock file holds the PID of the daemon that has it.
fn lock_state_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on an fd this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            bail!(
                "another twinfs mount (pid {}) runs with the state directory {} (it holds {}); stop it first",
                pid.trim(),
                dir.display(),
                path.display()
            );
        }
        return Err(e).with_context(|| format!("cannot lock {}", path.display()));
    }
    let pid = format!("{}\n", std::process::id());
    file.rewind()
        .and_then(|()| file.write_all(pid.as_bytes()))
        .and_then(|()| file.set_len(pid.len() as u64))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(file)
}

/// Binds the control socket; a stale socket file is replaced, a live one means another
/// daemon already serves this state directory.
async fn bind_control(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if UnixStream::connect(path).await.is_ok() {
            bail!(
                "another twinfs daemon is already serving {} (see `twinfs status`)",
                path.display()
            );
        }
        // Only a socket left by a daemon that died goes; anything else there is a
        // mistake of the config's, not ours to remove.
        if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            bail!(
                "{} exists and is not a socket: control_socket must name a path of its own",
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

/// SIGINT and SIGTERM, the two ways to stop the daemon; and SIGHUP, which does not
/// (its default would end the daemon with nothing shipped or unmounted: `kill -HUP` out
/// of habit, or the end of the terminal session it was started from).
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            hangup: signal(SignalKind::hangup()).context("cannot handle SIGHUP")?,
        })
    }
}

async fn serve(daemon: Arc<Daemon>, listener: UnixListener, mut signals: Signals) {
    loop {
        tokio::select! {
            _ = signals.interrupt.recv() => return,
            _ = signals.terminate.recv() => return,
            _ = signals.hangup.recv() => tracing::warn!(
                "SIGHUP ignored: the configuration is read at start only (restart the daemon to apply a change; SIGTERM stops it)"
            ),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // Held strongly only while a request is carried out: a client that
                    // connects and says nothing does not keep the shutdown from
                    // unmounting.
                    let daemon = Arc::downgrade(&daemon);
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

async fn handle_connection(
    daemon: &std::sync::Weak<Daemon>,
    stream: UnixStream,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(control::MAX_LINE as u64));
    let mut line = String::new();
    let read = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await;
    let response = match read {
        Ok(Ok(n)) if n >= control::MAX_LINE && !line.ends_with('\n') => Response::Error(format!(
            "request too long: over {} MiB",
            control::MAX_LINE >> 20
        )),
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Ok(request) => match daemon.upgrade() {
                Some(daemon) => daemon.handle(request).await,
                None => Response::Error(SHUTTING_DOWN.into()),
            },
            Err(e) => Response::Error(format!("bad request: {e}")),
        },
        Ok(Err(e)) => return Err(e),
        Err(_) => Response::Error("request timed out".into()),
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await
}

/// What `twinfs verify` found: whether any standby differs (or was not compared),
/// and the report, a line per volume and standby.
struct Verified {
    differ: bool,
    report: String,
}

impl Daemon {
    async fn handle(&self, request: Request) -> Response {
        let done = |r: anyhow::Result<String>| match r {
            Ok(message) => Response::Done(message),
            Err(e) => Response::Error(crate::error::text(&e)),
        };
        match request {
            Request::Status => Response::Status(self.status()),
            Request::Role { volume, role } => done(self.set_role(&volume, role).await),
            Request::Promote { volume, force } => {
                done(self.promote(volume.as_deref(), force).await)
            }
            Request::Demote { volume } => done(self.demote(volume.as_deref(), "manual").await),
            Request::Sync {
                volume,
                paths,
                full,
            } => done(self.sync(volume.as_deref(), paths, full).await),
            Request::Verify { volume } => match self.verify(volume.as_deref()).await {
                Ok(Verified { differ, report }) if differ => Response::Found(report),
                Ok(Verified { report, .. }) => Response::Done(report),
                Err(e) => Response::Error(crate::error::text(&e)),
            },
        }
    }

    /// The volumes a command names: one, or all when none is named.
    fn selected(&self, name: Option<&str>) -> anyhow::Result<Vec<&VolumeRuntime>> {
        Ok(match name {
            Some(name) => vec![self.volume(name)?],
            None if self.volumes.is_empty() => {
                bail!("this node has no volumes (a witness votes in failovers only)")
            }
            None => self.volumes.iter().collect(),
        })
    }

    /// Of the volumes selected by `name`, those this node is active for (`twinfs
    /// {command}` runs on the active), and a line for each standby one skipped. A
    /// standby volume named is an error, and so is a selection of standby volumes only.
    fn led(
        &self,
        name: Option<&str>,
        command: &str,
    ) -> anyhow::Result<(Vec<&VolumeRuntime>, Vec<String>)> {
        let (mut led, mut skipped) = (Vec::new(), Vec::new());
        for v in self.selected(name)? {
            let volume = &v.config.name;
            match v.roles.get().role {
                Role::Active => led.push(v),
                Role::Standby if name.is_some() => bail!(
                    "volume {volume}: this node is a standby; run `twinfs {command}` on the active"
                ),
                Role::Standby => {
                    skipped.push(format!("volume {volume}: this node is a standby; skipped"))
                }
            }
        }
        if led.is_empty() {
            bail!("{}", skipped.join("\n"));
        }
        Ok((led, skipped))
    }

    /// `twinfs promote`: this node becomes active for each selected standby volume it
    /// is fit to take over (or with `force`), with an epoch above any it has seen.
    async fn promote(&self, name: Option<&str>, force: bool) -> anyhow::Result<String> {
        let mut lines = Vec::new();
        let mut refused = Vec::new();
        for v in self.selected(name)? {
            let name = &v.config.name;
            let now = v.roles.get();
            if now.role == Role::Active {
                lines.push(format!(
                    "volume {name}: already active (epoch {})",
                    now.epoch
                ));
                continue;
            }
            if let Some(peer) = self.connected_active(name) {
                let answer = tokio::select! {
                    a = node::request_handover(&v.handover, HANDOVER_WAIT) => a,
                    _ = self.silent(name, &peer) => None,
                };
                match answer {
                    Some(Ok(active_epoch)) => {
                        let epoch = now.epoch.max(active_epoch) + 1;
                        match take_over(v, epoch, "manual").await {
                            Ok(Ok(line)) => lines.push(format!(
                                "{line} (planned switchover: {peer} handed over and is a standby now)"
                            )),
                            Ok(Err(line)) => refused.push(format!(
                                "{line} ({peer} handed over and is a standby now: the volume has no active node until one is promoted)"
                            )),
                            Err(e) => refused.push(format!(
                                "volume {name}: not promoted: {e} ({peer} handed over and is a standby now: the volume has no active node until one is promoted)"
                            )),
                        }
                        continue;
                    }
                    // The active answers but does not hand over (a disk of its that
                    // no longer answers holds its writes): forced, this node takes
                    // over as if it were silent; epochs fence the old one.
                    Some(Err(e)) if force => {
                        tracing::warn!(volume = %name, %peer, error = %e,
                            "the active did not hand over; taking over as forced");
                        lines.push(format!(
                            "volume {name}: {peer} did not hand over ({e}); taking over as forced"
                        ));
                    }
                    Some(Err(e)) => {
                        refused.push(format!(
                            "volume {name}: not promoted: {e}; `--force` takes over anyway"
                        ));
                        continue;
                    }
                    None => {
                        tracing::warn!(volume = %name, %peer, "the active does not answer; taking over as in an unplanned failover");
                    }
                }
            }
            let record = match SyncRecord::load(&sync_file(&self.config, name)) {
                Ok(record) => record,
                Err(e) => {
                    refused.push(format!(
                        "volume {name}: not promoted: cannot read the sync record: {e}"
                    ));
                    continue;
                }
            };
            if let Some(why) = unfit(record.as_ref(), now.epoch) {
                if !force {
                    refused.push(format!(
                        "volume {name}: not promoted: {why}; `--force` promotes anyway"
                    ));
                    continue;
                }
                tracing::warn!(volume = %name, reason = %why, "promotion forced");
                lines.push(format!("volume {name}: forced although {why}"));
            }
            match take_over(v, now.epoch + 1, "manual").await {
                Ok(Ok(line)) => lines.push(line),
                Ok(Err(line)) => refused.push(line),
                Err(e) => refused.push(format!("volume {name}: not promoted: {e}")),
            }
        }
        if !refused.is_empty() {
            lines.extend(refused);
            bail!("{}", lines.join("\n"));
        }
        Ok(lines.join("\n"))
    }

    /// Returns once `peer`, the active of `volume`, has been silent for [`SILENT`] or
    /// is disconnected.
    async fn silent(&self, volume: &str, peer: &str) {
        loop {
            let quiet = self
                .board
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&(volume.to_owned(), peer.to_owned()))
                .is_none_or(|p| {
                    !p.connected
                        || p.last_contact
                            .is_some_and(|t| unix_now().saturating_sub(t) >= SILENT.as_secs())
                });
            if quiet {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether this node may take over `v` now, as `twinfs promote` would judge it.
    fn takeover(&self, v: &VolumeRuntime) -> String {
        if v.roles.get().role == Role::Active {
            return "active".into();
        }
        match SyncRecord::load(&sync_file(&self.config, &v.config.name)) {
            Err(e) => format!("not ready: {e}"),
            Ok(record) => match unfit(record.as_ref(), v.roles.get().epoch) {
                None => "ready".into(),
                Some(why) => format!("not ready: {why}"),
            },
        }
    }

    /// The peer that is connected as this volume's active, if any.
    fn connected_active(&self, volume: &str) -> Option<String> {
        self.board
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|p| p.volume == volume && p.connected && p.peer_role == Some(Role::Active))
            .map(|p| p.peer.clone())
    }

    /// At a stop, on each active volume with a standby connected: takes no more local
    /// writes (they would not be shipped) and ships what is pending, `interval` paths
    /// too, as a demote does; waits at most `wait` in all (every volume at once) for
    /// the standbys to acknowledge it. The role stays active: the node is active again
    /// when it starts.
    async fn ship_before_stop(&self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        let volumes: Vec<&VolumeRuntime> = self
            .volumes
            .iter()
            .filter(|v| {
                v.roles.get().role == Role::Active
                    && self.standbys_away(&v.config.name).len() < self.replicas()
            })
            .collect();
        // First no more writes anywhere; a write under way on a disk that hangs does not
        // hold the stop past the deadline (the hold then comes when it ends).
        for v in &volumes {
            let roles = v.roles.clone();
            let held = tokio::task::spawn_blocking(move || roles.stop_writes(Hold::Demote));
            let _ = tokio::time::timeout_at(deadline, held).await;
        }
        self.flush_all(&volumes, deadline).await;
        for v in &volumes {
            let name = &v.config.name;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            // (Only those connected: nothing can reach the others now.)
            let (acked, behind) = self.wait_for_standbys(name, left, true).await;
            if behind.is_empty() {
                tracing::info!(volume = %name, acknowledged = ?acked, "shipped everything before stopping");
            } else {
                tracing::warn!(volume = %name, acknowledged = ?acked, behind = ?behind,
                    "stopping with changes not acknowledged; they go at the next contact's full sync");
            }
        }
    }

    /// `twinfs demote`: local writes refused at once, then what is pending is shipped
    /// and acknowledged (or the wait times out), then this node is a standby.
    async fn demote(&self, name: Option<&str>, reason: &'static str) -> anyhow::Result<String> {
        let mut lines = Vec::new();
        let mut failed = Vec::new();
        for v in self.selected(name)? {
            let name = &v.config.name;
            let now = v.roles.get();
            if now.role == Role::Standby {
                lines.push(format!(
                    "volume {name}: already standby (epoch {})",
                    now.epoch
                ));
                continue;
            }
            let roles = v.roles.clone();
            let stopped = tokio::task::spawn_blocking(move || roles.stop_writes(Hold::Demote));
            // Whether writes under way did not finish: a write stuck on a disk that no
            // longer answers. The demotion goes on (the role switch below does not wait
            // for it either); if the write ends later, it ends on a standby.
            let stuck = match tokio::time::timeout(SWITCH_WAIT, stopped).await {
                Ok(Ok(())) => false,
                Ok(Err(e)) => {
                    failed.push(format!("volume {name}: not demoted: {e}"));
                    continue;
                }
                Err(_) => {
                    tracing::error!(volume = %name, wait = ?SWITCH_WAIT,
                        "writes under way do not finish (a disk that does not answer?); demoting without them");
                    true
                }
            };
            let flushed = tokio::time::Instant::now() + DEMOTE_WAIT;
            self.flush(v, flushed).await;
            let left = flushed.saturating_duration_since(tokio::time::Instant::now());
            let (acked, mut behind) = self.wait_for_standbys(name, left, false).await;
            behind.extend(self.never_followed(name));
            let epoch = now.epoch;
            // A standby that did not acknowledge everything lacks some of this node's
            // writes (and none has a write still under way here, which ends after the
            // demotion): if it becomes the active, its full sync replaces them here.
            // So, as a fenced node does, the conflicts area is armed (durable before
            // the role changes): that full sync keeps this node's versions first.
            if stuck {
                behind
                    .push("writes still under way here (a disk that does not answer?)".to_owned());
            }
            let area = twinfs_replicator::conflicts::Area::new(&self.config.node.state_dir, name);
            let mut armed = None;
            if !behind.is_empty() {
                let dir = area.dir().to_owned();
                let arming = area.clone();
                let result = tokio::task::spawn_blocking(move || arming.arm(epoch, unix_now()))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|r| r);
                match result {
                    Ok(()) => armed = Some(dir),
                    // Given up for its health, it steps down anyway (a sick active that
                    // stays helps nobody); asked by hand, it stays active and says why.
                    Err(e) if reason == "health" => tracing::error!(volume = %name,
                        error = %e, dir = %dir.display(),
                        "cannot arm the conflicts area: the writes the standbys lack will be overwritten by a new active"),
                    Err(e) => {
                        let roles = v.roles.clone();
                        let _ =
                            tokio::task::spawn_blocking(move || roles.resume_writes(Hold::Demote))
                                .await;
                        failed.push(format!(
                            "volume {name}: not demoted: NOT acknowledged: {}, and the conflicts area {} cannot keep what a new active would replace: {e}; it stays active and takes writes again",
                            behind.join(", "),
                            dir.display()
                        ));
                        continue;
                    }
                }
            }
            let roles = v.roles.clone();
            // Sessions with an active that start from here on follow a newer order:
            // what they record of this node's fitness stands over the demotion's.
            let followed = v.followings.started();
            let demoted =
                match tokio::task::spawn_blocking(move || roles.demote(epoch, reason)).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("cannot persist the demotion: {e}")),
                    Err(e) => Err(e.to_string()),
                };
            if let Err(e) = demoted {
                // Still active: its writes come back rather than stay held for good (a
                // full disk under the state directory, say), and nothing is to be kept.
                if armed.is_some() {
                    let _ = tokio::task::spawn_blocking(move || area.disarm()).await;
                }
                let roles = v.roles.clone();
                let _ =
                    tokio::task::spawn_blocking(move || roles.resume_writes(Hold::Demote)).await;
                failed.push(format!(
                    "volume {name}: not demoted: {e}; it stays active and takes writes again"
                ));
                continue;
            }
            // This node has every change it made as the active: its fitness says so
            // (for `twinfs promote`), unless it gave up for its health.
            let record = SyncRecord {
                synced: reason != "health",
                at: unix_now(),
                epoch,
                demoted: Some(reason.to_owned()),
                ..SyncRecord::default()
            };
            let path = sync_file(&self.config, name);
            match v
                .followings
                .record_unless_followed(followed, record, path)
                .await
            {
                Ok(true) => {}
                Ok(false) => tracing::info!(volume = %name,
                    "a session with a new active recorded this node's fitness first; the demotion's record is not kept"),
                Err(e) => tracing::error!(volume = %name, error = %e,
                    "cannot record the demotion in the sync record; promotion will see an older one"),
            }
            let mut line = format!("volume {name}: active -> standby (epoch {epoch})");
            if !acked.is_empty() {
                line.push_str(&format!("; acknowledged everything: {}", acked.join(", ")));
            }
            if !behind.is_empty() {
                line.push_str(&format!("; NOT acknowledged: {}", behind.join(", ")));
            }
            if let Some(dir) = armed {
                line.push_str(&format!(
                    "; what a new active's full sync replaces here is kept first in {}",
                    dir.display()
                ));
            }
            lines.push(line);
        }
        if !failed.is_empty() {
            lines.extend(failed);
            bail!("{}", lines.join("\n"));
        }
        Ok(lines.join("\n"))
    }

    /// `twinfs sync`: ships `paths` (or runs a full sync) to every connected standby of
    /// each selected volume this node is active for, and waits for their acks.
    async fn sync(
        &self,
        name: Option<&str>,
        paths: Vec<String>,
        full: bool,
    ) -> anyhow::Result<String> {
        if !paths.is_empty() && self.selected(name)?.len() != 1 {
            bail!("name the volume the paths are in (twinfs sync VOLUME PATH...)");
        }
        if paths.is_empty() && !full {
            bail!("name the paths to ship, or ask for a full sync with --full");
        }
        let (volumes, mut lines) = self.led(name, "sync")?;
        let mut failed = false;
        for v in volumes {
            let name = &v.config.name;
            let rel = paths
                .iter()
                .map(|p| volume_path(name, &v.config.path, p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("volume {name}: {e}"))?;
            let root = v.mounted.volume().root_fd();
            let missing: Vec<&twinfs_replicator::path::RelPath> =
                rel.iter().filter(|p| !on_this_node(root, p)).collect();
            let (reply, mut answers) = tokio::sync::mpsc::channel(64);
            let asked = v
                .commands
                .send(node::Command::Sync {
                    paths: rel.clone(),
                    full,
                    reply,
                })
                .unwrap_or(0);
            if asked == 0 {
                lines.push(format!(
                    "volume {name}: no standby is connected; nothing shipped"
                ));
                failed = true;
                continue;
            }
            let deadline = tokio::time::Instant::now() + SYNC_WAIT;
            let (mut acked, mut not) = (Vec::new(), Vec::new());
            while acked.len() + not.len() < asked {
                match tokio::time::timeout_at(deadline, answers.recv()).await {
                    Ok(Some((peer, Ok(())))) => acked.push(peer),
                    Ok(Some((peer, Err(e)))) => not.push(format!("{peer} ({e})")),
                    _ => {
                        not.push(format!(
                            "{} standby(s) did not answer",
                            asked - acked.len() - not.len()
                        ));
                        break;
                    }
                }
            }
            let what = if full {
                "full sync".to_owned()
            } else {
                format!("{} path(s)", rel.len())
            };
            let mut line = format!("volume {name}: {what}");
            if !acked.is_empty() {
                line.push_str(&format!(" acknowledged by {}", acked.join(", ")));
            }
            if !not.is_empty() {
                failed = true;
                line.push_str(&format!("; NOT acknowledged: {}", not.join(", ")));
            }
            let away = self.standbys_away(name);
            if !away.is_empty() {
                failed = true;
                line.push_str(&format!("; NOT connected: {}", away.join(", ")));
            }
            lines.push(line);
            lines.extend(
                missing
                    .iter()
                    .map(|p| format!("  {p}: not on this node: sent as a deletion")),
            );
        }
        if failed {
            bail!("{}", lines.join("\n"));
        }
        Ok(lines.join("\n"))
    }

    /// `twinfs verify`: every file hashed now on this node (the active) and on every
    /// connected standby, compared; the report lists what differs per standby (at most
    /// [`control::VERIFY_LISTED`] paths each), and says whether anything does or was
    /// not compared.
    async fn verify(&self, name: Option<&str>) -> anyhow::Result<Verified> {
        let (volumes, mut lines) = self.led(name, "verify")?;
        let mut differ = false;
        for v in volumes {
            let name = &v.config.name;
            // A standby that is down is not compared: that is no "identical".
            for peer in self.standbys_away(name) {
                differ = true;
                lines.push(format!(
                    "volume {name}: {peer}: not compared: not connected"
                ));
            }
            let (reply, mut answers) = tokio::sync::mpsc::channel(64);
            let asked = v
                .commands
                .send(node::Command::Verify { reply })
                .unwrap_or(0);
            if asked == 0 {
                lines.push(format!(
                    "volume {name}: no standby is connected; nothing compared"
                ));
                differ = true;
                continue;
            }
            let deadline = tokio::time::Instant::now() + SYNC_WAIT;
            let mut answered = 0;
            while answered < asked {
                match tokio::time::timeout_at(deadline, answers.recv()).await {
                    Ok(Some((peer, Ok(paths)))) if paths.is_empty() => {
                        lines.push(format!("volume {name}: {peer}: identical"));
                    }
                    Ok(Some((peer, Ok(paths)))) => {
                        differ = true;
                        lines.push(format!(
                            "volume {name}: {peer}: {} path(s) differ:",
                            paths.len()
                        ));
                        let listed = paths.len().min(control::VERIFY_LISTED);
                        lines.extend(paths[..listed].iter().map(|p| format!("  {p}")));
                        if paths.len() > listed {
                            lines.push(format!(
                                "volume {name}: {peer}: {} more path(s) differ, not listed",
                                paths.len() - listed
                            ));
                        }
                    }
                    Ok(Some((peer, Err(e)))) => {
                        differ = true;
                        lines.push(format!("volume {name}: {peer}: not compared: {e}"));
                    }
                    _ => {
                        differ = true;
                        lines.push(format!(
                            "volume {name}: {} standby(s) did not answer",
                            asked - answered
                        ));
                        break;
                    }
                }
                answered += 1;
            }
        }
        Ok(Verified {
            differ,
            report: lines.join("\n"),
        })
    }

    /// How many peers hold each volume: every one but witnesses.
    fn replicas(&self) -> usize {
        self.config.peers.iter().filter(|p| !p.witness).count()
    }

    /// The configured peers (witnesses aside) that no session serves as a standby of
    /// `volume` now: down, cut off, or not a standby.
    fn standbys_away(&self, volume: &str) -> Vec<String> {
        self.not_standbys(volume, true)
    }

    /// The peers (not witnesses) that have not followed this node for `volume` since
    /// it started: they may lack anything it wrote.
    fn never_followed(&self, volume: &str) -> Vec<String> {
        self.not_standbys(volume, false)
            .into_iter()
            .map(|p| format!("{p} (no session as a standby since this node started)"))
            .collect()
    }

    /// The configured peers (witnesses aside) that no session serves as a standby of
    /// `volume`: now (`now`), or at all since this node started.
    fn not_standbys(&self, volume: &str, now: bool) -> Vec<String> {
        let board = self.board.lock().unwrap_or_else(|e| e.into_inner());
        self.config
            .peers
            .iter()
            .filter(|p| !p.witness)
            .filter(|p| {
                !board.values().any(|s| {
                    s.volume == volume
                        && s.peer == p.name
                        && (s.connected || !now)
                        && s.peer_role == Some(Role::Standby)
                })
            })
            .map(|p| p.name.clone())
            .collect()
    }

    /// Has every session of `v` ship what waits for a later time (see
    /// [`node::Command::Flush`]) and waits for their answers until `deadline`.
    async fn flush(&self, v: &VolumeRuntime, deadline: tokio::time::Instant) {
        self.flush_all(&[v], deadline).await;
    }

    /// [`Daemon::flush`] of every volume of `volumes` at once.
    async fn flush_all(&self, volumes: &[&VolumeRuntime], deadline: tokio::time::Instant) {
        let (reply, mut answers) = tokio::sync::mpsc::channel(64);
        let mut asked = 0;
        for v in volumes {
            asked += v
                .commands
                .send(node::Command::Flush {
                    reply: reply.clone(),
                })
                .unwrap_or(0);
        }
        drop(reply);
        for _ in 0..asked {
            if !matches!(
                tokio::time::timeout_at(deadline, answers.recv()).await,
                Ok(Some(_))
            ) {
                break;
            }
        }
    }

    /// Waits up to `wait` until every standby of `volume` (every connected one, with
    /// `connected_only`) has acknowledged everything; those that have, and those
    /// still behind.
    async fn wait_for_standbys(
        &self,
        volume: &str,
        wait: Duration,
        connected_only: bool,
    ) -> (Vec<String>, Vec<String>) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let (mut acked, mut behind) = (Vec::new(), Vec::new());
            // Behind for a refused change: waiting would not bring that.
            let mut refusing = 0;
            for p in self
                .board
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
            {
                if p.volume != volume
                    || p.peer_role != Some(Role::Standby)
                    || (connected_only && !p.connected)
                {
                    continue;
                }
                if p.connected
                    && p.pending == 0
                    && p.full_sync != "in progress"
                    && !p.refused_unrepaired
                {
                    acked.push(p.peer.clone());
                } else {
                    behind.push(match (p.connected, p.refused_unrepaired) {
                        (true, true) => {
                            refusing += 1;
                            format!(
                                "{} (refused {})",
                                p.peer,
                                p.rejected_paths.last().map_or("a change", String::as_str)
                            )
                        }
                        (true, false) => format!("{} ({} changes pending)", p.peer, p.pending),
                        (false, _) => format!("{} (disconnected)", p.peer),
                    });
                }
            }
            if behind.len() == refusing || tokio::time::Instant::now() >= deadline {
                return (acked, behind);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
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

    /// `twinfs role`: switches the role locally, keeping the epoch (no fitness check,
    /// no handover: `promote` and `demote` are the failover commands).
    async fn set_role(&self, name: &str, role: Role) -> anyhow::Result<String> {
        let v = self.volume(name)?;
        let before = v.roles.get();
        let roles = v.roles.clone();
        let now = tokio::task::spawn_blocking(move || match role {
            Role::Active => roles.activate("manual"),
            Role::Standby => roles.demote(before.epoch, "manual"),
        })
        .await
        .map_err(|e| anyhow::anyhow!("volume {name}: {e}"))?
        .map_err(|e| anyhow::anyhow!("volume {name}: {e}"))?;
        if now.role != role {
            // A failed promote hook handed the role back (`on_promote_failure`).
            bail!(
                "volume {name}: not switched: the on_promote hook failed and the role was handed back; it stays {} (see `twinfs status`)",
                now.role
            );
        }
        let before = before.role;
        tracing::info!(volume = name, from = %before, to = %role, "role switched");
        let writers = v.mounted.volume().stats().open_for_write;
        let mut message = format!("volume {name}: role {before} -> {role}");
        if role == Role::Standby && writers > 0 {
            // (With passthrough the kernel writes to the backing file without asking.)
            message.push_str(&match v.mounted.volume().passthrough() {
                true => format!("; {writers} file(s) opened for writing before the switch stay writable until closed"),
                false => format!("; {writers} file(s) opened for writing before the switch get EROFS on their next write"),
            });
        }
        Ok(message)
    }

    fn status(&self) -> NodeStatus {
        let volumes = self
            .volumes
            .iter()
            .map(|v| {
                let state = v.roles.get();
                let area = twinfs_replicator::conflicts::Area::new(
                    &self.config.node.state_dir,
                    &v.config.name,
                );
                let c = v.capture.counters();
                let stats = v.mounted.volume().stats();
                VolumeStatus {
                    name: v.config.name.clone(),
                    path: v.config.path.clone(),
                    role: state.role,
                    epoch: state.epoch,
                    mounted: v
                        .mounted
                        .in_place()
                        .unwrap_or_else(|| is_twinfs_mount(&v.config.path)),
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
                    takeover: self.takeover(v),
                    writable: v.mounted.volume().role() == Role::Active,
                    last_hook: v
                        .last_hook
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone(),
                    conflicts: area.count(),
                    conflicts_dir: area.dir().to_owned(),
                    failover: if v.config.failover.auto {
                        "auto".into()
                    } else {
                        "manual".into()
                    },
                    peer_timeout_ms: v.config.failover.peer_timeout.as_millis() as u64,
                    auto_failover: Some(
                        v.failover_note
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .clone(),
                    )
                    .filter(|n| !n.is_empty()),
                    health: v.health.lock().unwrap_or_else(|e| e.into_inner()).clone(),
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
    // The kernel lists the mount point with symlinks resolved; the configured path may
    // go through some (its last component is the mount itself, not asked here).
    let resolved = match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent).ok().map(|p| p.join(name)),
        _ => None,
    };
    info.lines().any(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            return false;
        };
        let Some(mount_point) = fields.get(4).map(|m| unescape_mountinfo(m)) else {
            return false;
        };
        let at =
            Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&mount_point));
        (at == path || Some(at) == resolved.as_deref())
            && fields.get(sep + 1) == Some(&"fuse.twinfs")
    })
}

/// A mountinfo field with its octal escapes (`\040` for a space, `\011`, `\012`,
/// `\134`) turned back into bytes.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push(
                    d.iter()
                        .fold(0u8, |n, b| n.wrapping_mul(8).wrapping_add(b - b'0')),
                );
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Promotes `v` to active with `epoch` (the hook runs): what to print, or, when a
/// failed promote hook handed the role back, why not.
async fn take_over(
    v: &VolumeRuntime,
    epoch: u64,
    reason: &'static str,
) -> anyhow::Result<Result<String, String>> {
    let name = &v.config.name;
    let roles = v.roles.clone();
    let promoted = tokio::task::spawn_blocking(move || roles.promote(epoch, reason))
        .await
        .map_err(|e| anyhow::anyhow!("volume {name}: {e}"))?;
    // (Refused, like a failed hook's rollback: the other volumes go on.)
    let now = match promoted {
        Ok(now) => now,
        Err(e) => return Ok(Err(format!("volume {name}: not promoted: {e}"))),
    };
    // The epoch given, or a later one if this node followed a newer active meanwhile.
    let epoch = now.epoch;
    Ok(if now.role == Role::Active {
        Ok(format!("volume {name}: standby -> active, epoch {epoch}"))
    } else {
        Err(format!(
            "volume {name}: promoted to epoch {epoch}, but the on_promote hook failed and this node is a standby again (on_promote_failure = \"rollback\"), keeping epoch {epoch}: an active of an older epoch that meets it steps down, so the volume may now have no active node. Fix what the hook starts, then promote a node again (with --force: after a rollback this node counts as not in sync); see `twinfs status`"
        ))
    })
}

/// What the last hook of a volume did, for `twinfs status`.
use crate::control::HookResult;

/// The hook of a volume's role cell: runs `on_promote` or `on_demote` (`sh -c`) with
/// the `TWINFS_*` environment, logs its output, keeps the result for status, and asks
/// for a rollback when a promote hook failed and the config says so.
fn hook_runner(
    hooks: crate::config::Hooks,
    last: Arc<Mutex<Option<HookResult>>>,
) -> twinfs_replicator::roles::Hook {
    Box::new(move |change| {
        let (hook, command) = match change.next.role {
            Role::Active => ("on_promote", hooks.on_promote.as_deref()),
            Role::Standby => ("on_demote", hooks.on_demote.as_deref()),
        };
        let Some(command) = command else {
            return false;
        };
        let result = run_hook(hook, command, change, hooks.timeout);
        let failed = !result.ok;
        *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        failed && hook == "on_promote" && hooks.rollback_failed_promote
    })
}

/// Runs one hook to completion or `timeout` (then kills it).
fn run_hook(
    hook: &str,
    command: &str,
    change: &twinfs_replicator::roles::RoleChange,
    timeout: Duration,
) -> HookResult {
    let mut result = HookResult {
        hook: hook.to_owned(),
        reason: change.reason.to_owned(),
        at: unix_now(),
        ok: false,
        exit_code: None,
        timed_out: false,
        output: String::new(),
    };
    let env = [
        ("TWINFS_VOLUME", change.volume.clone()),
        ("TWINFS_ROLE", change.next.role.name().to_owned()),
        (
            "TWINFS_PREVIOUS_ROLE",
            change.previous.role.name().to_owned(),
        ),
        ("TWINFS_EPOCH", change.next.epoch.to_string()),
        ("TWINFS_REASON", change.reason.to_owned()),
    ];
    let outcome = match crate::shell::run(command, &env, timeout, true) {
        Ok(o) => o,
        Err(e) => {
            result.output = format!("cannot run sh: {e}");
            tracing::error!(volume = %change.volume, hook, error = %e, "hook not run");
            return result;
        }
    };
    let text = outcome.output;
    for line in text.lines() {
        tracing::info!(volume = %change.volume, hook, "{line}");
    }
    // Processes the hook left running (a service it started with `&`) log on; their
    // output must not break on a closed pipe.
    if let Some(rest) = outcome.rest {
        let (volume, hook) = (change.volume.clone(), hook.to_owned());
        std::thread::spawn(move || {
            use std::io::BufRead;
            // Read to the end whatever the bytes: a reader that stopped would leave the
            // process a closed pipe (SIGPIPE).
            let mut reader = std::io::BufReader::new(rest);
            let mut line = Vec::new();
            while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches('\n');
                tracing::info!(%volume, hook, "{text} (from a process the hook left running)");
                line.clear();
            }
        });
    }
    result.exit_code = outcome.status.and_then(|s| s.code());
    result.ok = outcome.status.is_some_and(|s| s.success());
    result.timed_out = outcome.timed_out;
    // The last 1 KiB is enough to see why it failed.
    let cut = text.len().saturating_sub(1024);
    let cut = (cut..=text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    result.output = text[cut..].to_owned();
    if result.ok {
        tracing::info!(volume = %change.volume, hook, reason = change.reason, "hook succeeded");
    } else {
        tracing::error!(volume = %change.volume, hook, reason = change.reason,
            exit_code = ?result.exit_code, timed_out = result.timed_out, "hook failed");
    }
    result
}

/// The path of `given` in the volume `name` mounted at `root`: relative (to `root`) as
/// is, or absolute under `root`; never outside the volume, and never its root, which
/// cannot be shipped as a path (a full sync covers it).
fn volume_path(
    name: &str,
    root: &Path,
    given: &str,
) -> Result<twinfs_replicator::path::RelPath, String> {
    let p = Path::new(given);
    let inside = if p.is_absolute() {
        p.strip_prefix(root)
            .map_err(|_| format!("{given} is not in the volume ({})", root.display()))?
    } else {
        p
    };
    let rel =
        twinfs_replicator::path::RelPath::from_path(inside).map_err(|e| format!("{given}: {e}"))?;
    if rel.is_root() {
        return Err(format!(
            "{given:?} is the volume's root; to sync the whole volume, run `twinfs sync --full {name}`"
        ));
    }
    Ok(rel)
}

/// Whether `path` is in the volume whose directory is `root`, looked up as the active
/// reads a path it ships (no symlink followed on the way): one that is not goes to the
/// standbys as a deletion.
fn on_this_node(
    root: std::os::fd::BorrowedFd<'_>,
    path: &twinfs_replicator::path::RelPath,
) -> bool {
    use std::os::fd::AsFd;
    let gone = |e: &std::io::Error| {
        matches!(
            e.raw_os_error(),
            Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
        )
    };
    let Some((parent, name)) = path.split_last() else {
        return true;
    };
    // Unsure (the fd cannot be duplicated): not said to be missing.
    let Ok(mut dir) = root.try_clone_to_owned() else {
        return true;
    };
    for part in parent.components() {
        dir = match twinfs_fs::sys::openat(dir.as_fd(), part, libc::O_PATH | libc::O_DIRECTORY, 0) {
            Ok(fd) => fd,
            Err(e) => return !gone(&e),
        };
    }
    match twinfs_fs::sys::statat(dir.as_fd(), name) {
        Ok(_) => true,
        Err(e) => !gone(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_read_back_as_bytes() {
        assert_eq!(unescape_mountinfo("/etc/a\\040b"), b"/etc/a b");
        assert_eq!(unescape_mountinfo("/x\\011y\\012z\\134w"), b"/x\ty\nz\\w");
        // Not an escape: kept as it is.
        assert_eq!(unescape_mountinfo("/a\\9b\\"), b"/a\\9b\\");
    }

    /// A config of two volumes with `hook_timeout` of 5 min.
    fn two_volumes(dir: &Path) -> Config {
        let mut text = String::from("[node]\nname = \"a\"\n");
        for name in ["a", "b"] {
            std::fs::create_dir(dir.join(name)).expect("mkdir");
            text.push_str(&format!(
                "[[volume]]\nname = \"{name}\"\npath = \"{}\"\nhook_timeout = \"5min\"\n",
                dir.join(name).display()
            ));
        }
        Config::parse(&text, &dir.join("twinfs.toml")).expect("valid config")
    }

    #[test]
    fn the_root_is_no_path_to_ship() {
        let root = Path::new("/etc/cmm");
        for given in ["", "/etc/cmm", "/etc/cmm/"] {
            let e = volume_path("cmm", root, given).expect_err("the root");
            assert!(e.contains("twinfs sync --full cmm"), "{given:?}: {e}");
        }
        assert_eq!(
            volume_path("cmm", root, "/etc/cmm/ssh/x").expect("in the volume"),
            twinfs_replicator::path::RelPath::new("ssh/x").expect("valid")
        );
        assert!(volume_path("cmm", root, "/etc/passwd").is_err());
    }

    #[test]
    fn a_path_is_on_this_node_only_without_a_symlink_on_the_way() {
        use std::os::fd::AsFd;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("ssh")).expect("mkdir");
        std::fs::write(dir.path().join("ssh/x"), "x").expect("write");
        std::os::unix::fs::symlink("ssh", dir.path().join("link")).expect("symlink");
        std::os::unix::fs::symlink("nowhere", dir.path().join("dangling")).expect("symlink");
        let root = std::fs::File::open(dir.path()).expect("open");
        let here = |p: &str| {
            on_this_node(
                root.as_fd(),
                &twinfs_replicator::path::RelPath::new(p).expect("valid"),
            )
        };
        assert!(here("ssh/x"));
        assert!(here("ssh"));
        assert!(here("dangling"), "a symlink is there, wherever it points");
        assert!(!here("ssh/y"));
        assert!(!here("nope/x"));
        assert!(!here("ssh/x/y"));
        assert!(
            !here("link/x"),
            "the active does not read through a symlink"
        );
    }

    #[test]
    fn the_command_waits_for_every_volume_and_hook() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = two_volumes(dir.path());
        let hook = Duration::from_secs(300);
        let demote_all = answer_within(&config, &Request::Demote { volume: None });
        assert!(demote_all >= (DEMOTE_WAIT + hook) * 2, "{demote_all:?}");
        let demote_one = answer_within(
            &config,
            &Request::Demote {
                volume: Some("a".into()),
            },
        );
        assert!(demote_one >= DEMOTE_WAIT + hook, "{demote_one:?}");
        assert!(demote_one < demote_all, "{demote_one:?}");
        let promote = answer_within(
            &config,
            &Request::Promote {
                volume: None,
                force: false,
            },
        );
        // Each volume: the handover, its promote hook, a rollback's demote hook.
        assert!(promote >= (HANDOVER_WAIT + hook * 2) * 2, "{promote:?}");
        let role = answer_within(
            &config,
            &Request::Role {
                volume: "b".into(),
                role: Role::Standby,
            },
        );
        assert!(role >= hook, "{role:?}");
        for request in [
            Request::Verify { volume: None },
            Request::Sync {
                volume: None,
                paths: vec![],
                full: true,
            },
        ] {
            let wait = answer_within(&config, &request);
            assert!(wait >= SYNC_WAIT * 2, "{request:?}: {wait:?}");
        }
    }
}
