//! The `twinfs` command: identity, the daemon, and the commands that talk to it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use twinfs_replicator::node::{PeerStatus, HEARTBEAT};
use twinfs_tools::config::{Config, Role};
use twinfs_tools::control::{self, NodeStatus, Request, Response};
use twinfs_tools::daemon::{self, DaemonOptions};
use twinfs_tools::identity::Identity;

/// The default configuration file.
const DEFAULT_CONFIG: &str = "/etc/twinfs/twinfs.toml";

/// twinfs keeps a management node's directories (/etc/cmm, /etc/xcat, a switch's
/// config) identical on a standby node, through a FUSE mount in place.
#[derive(Parser, Debug)]
#[command(name = "twinfs", version, propagate_version = true)]
struct Cli {
    /// The configuration file.
    #[arg(long, global = true, value_name = "FILE", env = "TWINFS_CONFIG", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create this node's identity (key pair and self-signed certificate in the state
    /// directory) and print its node ID, to paste into the other nodes' [[peer]] node_id.
    /// Run again, it keeps the identity and prints the same ID.
    Init,
    /// Run the daemon in the foreground: mount every volume in place, serve the control
    /// socket, unmount cleanly on SIGINT/SIGTERM. Logs go to stderr; set TWINFS_LOG
    /// (e.g. "debug" or "twinfs_replicator=debug") to choose what is logged.
    Mount {
        /// Do not use FUSE passthrough for open files, even where the kernel offers it
        /// (every read and write then goes through twinfs).
        #[arg(long)]
        no_passthrough: bool,
        /// FUSE worker threads per volume.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
        threads: u16,
    },
    /// Show what the running daemon serves: per volume its path, role, mount state,
    /// passthrough, and the changes captured per policy, and per peer the replication.
    Status {
        /// The volume (default: all).
        volume: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Take over as the active node for VOLUME (all volumes when none is named), with
    /// an epoch above any this node has seen, switching the mount to read-write without
    /// remounting. Refused (exit 1, naming the priority-1 paths not known to be in
    /// sync) when this node is not fit to take over; --force promotes anyway.
    Promote {
        /// The volume (default: all).
        volume: Option<String>,
        /// Promote even when not fit to take over (the log says so).
        #[arg(long)]
        force: bool,
    },
    /// Step down as the active node for VOLUME (all when none is named): local writes
    /// get EROFS at once, what is pending is shipped to the standbys and acknowledged
    /// (or the wait times out after 30 s), then this node is a standby. Reports which
    /// standbys acknowledged everything.
    Demote {
        /// The volume (default: all).
        volume: Option<String>,
    },
    /// On the active: hash every file of the volume now (not from the cache) on this
    /// node and on every connected standby, compare, and list the paths that differ
    /// per standby. Exit 0 when all are identical, 1 otherwise (a configured standby
    /// that is not connected counts as not identical).
    Verify {
        /// The volume (default: all).
        volume: Option<String>,
    },
    /// On the active: ship the named paths to every connected standby now, whatever
    /// their policy (once, interval and never paths too), or with --full compare
    /// manifests and send everything that differs; waits for the standbys'
    /// acknowledgements and exits 0 only when every one acknowledged and no configured
    /// standby is disconnected.
    ///
    /// The first argument is the volume when it is the name of one. On a node with
    /// one volume it can be left out: a first argument that names no volume is then a
    /// path (to ship a file named like the volume, name the volume first, or give an
    /// absolute path). With several volumes, name the volume first.
    ///
    /// A relative PATH is taken from the current directory when that is inside the
    /// volume, else from the volume's root; `.` and `..` are resolved by name. The
    /// volume's root itself is refused: `--full` syncs the whole volume. A path that
    /// is not on this node is shipped as a deletion, and the command says so.
    ///
    /// With --full, the only argument is a volume's name (default: all volumes).
    Sync {
        /// The volume (default: the only one; with --full, all).
        volume: Option<String>,
        /// Paths in the volume: absolute under its path, or relative (see above).
        paths: Vec<String>,
        /// Run a full sync of the volume instead of shipping paths.
        #[arg(long)]
        full: bool,
    },
    /// List what split brains left in the conflicts area (this node's own versions of
    /// files the winner's full sync replaced or deleted), per volume; reads the state
    /// directory, no daemon needed. Nothing there is ever deleted by twinfs.
    Conflicts {
        /// The volume (default: all).
        volume: Option<String>,
    },
    /// Switch a volume of the running daemon to active (read-write) or standby
    /// (read-only) at once, without remounting and keeping the epoch. A low-level
    /// command: promote and demote do this with the checks of a failover.
    Role {
        /// The volume's name.
        volume: String,
        /// The new role.
        role: RoleArg,
    },
    /// Work with the configuration file.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Internal: the watchdog `twinfs mount` starts with each mount. Once the daemon is
    /// gone (its end of the pipe on stdin closed), detaches the mount if the daemon
    /// did not unmount it.
    #[command(hide = true)]
    WatchMount {
        /// The mount point.
        mountpoint: PathBuf,
        /// The mount it must find there (`<id>:<u|r>:<major>:<minor>`).
        identity: String,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Validate the configuration file without mounting anything; errors name the
    /// file, the line and the key.
    Check,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RoleArg {
    /// Read-write; changes are captured.
    Active,
    /// Read-only for local processes (EROFS).
    Standby,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TWINFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // The journal stamps each line itself.
    match stderr_is_the_journal(std::env::var_os("JOURNAL_STREAM").as_deref()) {
        true => fmt.without_time().init(),
        false => fmt.init(),
    }
}

/// Whether stderr is the journal's stream that systemd named in `$JOURNAL_STREAM`
/// (`DEVICE:INODE`): a service's stderr, not redirected elsewhere since.
fn stderr_is_the_journal(stream: Option<&std::ffi::OsStr>) -> bool {
    let Some((dev, ino)) = stream
        .and_then(|s| s.to_str())
        .and_then(|s| s.split_once(':'))
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
    else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills `st` on success.
    if unsafe { libc::fstat(libc::STDERR_FILENO, st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstat succeeded.
    let st = unsafe { st.assume_init() };
    st.st_dev == dev && st.st_ino == ino
}

/// Two malloc arenas instead of glibc's eight per core: a full sync's short-lived
/// manifests, spread over many arenas between long-lived entries, kept a daemon with
/// 100,000 files at 80 MiB after the sync; with two it gives back all but 33 MiB.
fn limit_heap_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: called before the daemon starts any thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// A command whose output goes to a pipe that closes early (`twinfs status | head`)
/// ends quietly, as other command-line tools do, instead of panicking in `println!`.
/// Not for the daemon, which must outlive any peer that goes away.
fn die_quietly_on_closed_pipe() {
    // SAFETY: restores the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Mount { .. } | Command::WatchMount { .. }
    ) {
        die_quietly_on_closed_pipe();
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twinfs: {}", twinfs_tools::error::text(&e));
            ExitCode::FAILURE
        }
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    Ok(Config::load(path)?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init => {
            let config = load(&cli.config)?;
            let (identity, created) =
                Identity::load_or_create(&config.node.state_dir, &config.node.name)?;
            eprintln!(
                "{} identity of node {} in {}",
                if created {
                    "created"
                } else {
                    "kept the existing"
                },
                config.node.name,
                config.node.state_dir.display()
            );
            println!("node_id = \"{}\"", identity.node_id());
            Ok(())
        }
        Command::Mount {
            no_passthrough,
            threads,
        } => {
            let config = load(&cli.config)?;
            init_logging();
            limit_heap_arenas();
            daemon::run(
                config,
                DaemonOptions {
                    passthrough: !no_passthrough,
                    threads: usize::from(threads),
                },
            )
        }
        Command::WatchMount {
            mountpoint,
            identity,
        } => {
            init_logging();
            let watched = twinfs_fs::watchdog::watch(&mountpoint, &identity)
                .with_context(|| format!("watchdog of {}", mountpoint.display()))?;
            if watched == twinfs_fs::watchdog::Watched::Detached {
                tracing::warn!(path = %mountpoint.display(),
                    "the daemon ended without unmounting; its watchdog detached the mount");
            }
            Ok(())
        }
        Command::Status { volume, json } => {
            let config = load(&cli.config)?;
            let mut status = match ask(&config, &Request::Status)? {
                Response::Status(s) => s,
                other => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
            };
            if let Some(name) = volume {
                if !status.volumes.iter().any(|v| v.name == name) {
                    let known: Vec<&str> = status.volumes.iter().map(|v| v.name.as_str()).collect();
                    anyhow::bail!("no volume named {name:?} (volumes: {})", known.join(", "));
                }
                status.volumes.retain(|v| v.name == name);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(())
        }
        Command::Promote { volume, force } => {
            let config = load(&cli.config)?;
            done(ask(&config, &Request::Promote { volume, force })?)
        }
        Command::Demote { volume } => {
            let config = load(&cli.config)?;
            done(ask(&config, &Request::Demote { volume })?)
        }
        Command::Sync {
            volume,
            paths,
            full,
        } => {
            let config = load(&cli.config)?;
            let cwd = std::env::current_dir().ok();
            let (volume, paths) = sync_arguments(&config, cwd.as_deref(), volume, paths, full)?;
            let progress = std::io::IsTerminal::is_terminal(&std::io::stderr())
                .then(|| Progress::start(&config, volume.clone()));
            let answer = ask(
                &config,
                &Request::Sync {
                    volume,
                    paths,
                    full,
                },
            );
            drop(progress);
            done(answer?)
        }
        Command::Verify { volume } => {
            let config = load(&cli.config)?;
            match ask(&config, &Request::Verify { volume })? {
                // The report on standard output, what differs included; the status
                // says whether everything is identical.
                Response::Found(report) => {
                    println!("{report}");
                    anyhow::bail!(
                        "not every standby was found identical (the report is on standard output)"
                    )
                }
                other => done(other),
            }
        }
        Command::Conflicts { volume } => {
            let config = load(&cli.config)?;
            let names: Vec<&str> = match &volume {
                Some(v) => {
                    if !config.volumes.iter().any(|c| &c.name == v) {
                        anyhow::bail!("no volume named {v:?} in {}", config.source.display());
                    }
                    vec![v.as_str()]
                }
                None => config.volumes.iter().map(|v| v.name.as_str()).collect(),
            };
            for name in names {
                let area = twinfs_replicator::conflicts::Area::new(&config.node.state_dir, name);
                area.readable().with_context(|| {
                    format!(
                        "volume {name}: cannot read the conflicts area {}",
                        area.dir().display()
                    )
                })?;
                let sets = area.sets();
                if sets.is_empty() {
                    println!("volume {name}: no conflicts");
                }
                for (dir, manifest) in sets {
                    // A standby's refused upstream writes share the layout of a
                    // fencing's set; say which it is.
                    let why = if manifest.kept.iter().all(|k| k.what == "refused") {
                        "refused by the active of epoch"
                    } else {
                        "fenced by epoch"
                    };
                    println!(
                        "volume {name}: {} file(s) in {} ({why} {})",
                        manifest.kept.len(),
                        dir.display(),
                        manifest.fenced_by_epoch
                    );
                    for kept in &manifest.kept {
                        println!("  {:<9} {}", kept.what, kept.path);
                    }
                }
            }
            Ok(())
        }
        Command::Role { volume, role } => {
            let config = load(&cli.config)?;
            let role = match role {
                RoleArg::Active => Role::Active,
                RoleArg::Standby => Role::Standby,
            };
            match ask(&config, &Request::Role { volume, role })? {
                Response::Done(message) => {
                    println!("{message}");
                    Ok(())
                }
                other => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
            }
        }
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            let config = load(&cli.config)?;
            println!(
                "{}: OK: node {}, {} peer(s), {} volume(s)",
                config.source.display(),
                config.node.name,
                config.peers.len(),
                config.volumes.len()
            );
            for v in &config.volumes {
                println!(
                    "  volume {} at {} ({}, {}), {} rule(s)",
                    v.name,
                    v.path.display(),
                    v.initial_role,
                    v.durability,
                    v.policies.rules().len()
                );
                for r in v.policies.rules() {
                    let p = r.policy();
                    println!(
                        "    {:<24} {} priority {}",
                        r.pattern(),
                        describe_sync(p.sync),
                        p.priority.get()
                    );
                }
            }
            Ok(())
        }
    }
}

/// The volume and the paths (relative to its root) that `twinfs sync [VOLUME]
/// [PATH...] [--full]` asks for, run in `cwd`: the first argument is the volume if it
/// names one, else (on a node with one volume) the first path. With `full`, the only
/// argument must be a volume's name.
fn sync_arguments(
    config: &Config,
    cwd: Option<&Path>,
    first: Option<String>,
    rest: Vec<String>,
    full: bool,
) -> anyhow::Result<(Option<String>, Vec<String>)> {
    let known = || {
        let names: Vec<&str> = config.volumes.iter().map(|v| v.name.as_str()).collect();
        format!("volumes: {}", names.join(", "))
    };
    let (volume, paths) = match first {
        None => (None, rest),
        Some(first) => match config.volumes.iter().find(|v| v.name == first) {
            Some(v) => (Some(v), rest),
            None if full => anyhow::bail!(
                "no volume named {first:?} ({}); `twinfs sync --full [VOLUME]` takes a volume's name, not a path",
                known()
            ),
            None => match config.volumes.as_slice() {
                [only] => (Some(only), std::iter::once(first).chain(rest).collect()),
                _ => anyhow::bail!(
                    "no volume named {first:?} ({}); with several volumes, name the volume first: twinfs sync VOLUME PATH...",
                    known()
                ),
            },
        },
    };
    if full && !paths.is_empty() {
        anyhow::bail!(
            "--full syncs the whole volume and takes no paths (twinfs sync --full [VOLUME])"
        );
    }
    let paths = match volume {
        Some(v) => {
            // The current directory comes with symlinks resolved; the volume's path may
            // go through some.
            let physical = std::fs::canonicalize(&v.path).ok();
            let cwd = cwd.map(|c| logical(c, &v.path, physical.as_deref()));
            paths
                .iter()
                .map(|p| {
                    let given = match Path::new(p).is_absolute() {
                        true => logical(Path::new(p), &v.path, physical.as_deref())
                            .to_string_lossy()
                            .into_owned(),
                        false => p.clone(),
                    };
                    in_volume(&v.name, &v.path, cwd.as_deref(), &given)
                })
                .collect::<anyhow::Result<_>>()?
        }
        None => paths,
    };
    Ok((volume.map(|v| v.name.clone()), paths))
}

/// `given` as a path relative to the root of volume `name` at `root`: an absolute path
/// must be under `root`; a relative one is taken from `cwd` when that is inside the
/// volume (as other tools take it), else from the volume's root. `.` and `..` are
/// resolved by name, as `cd` does, and may not leave the volume; its root is refused,
/// as no path can ship it (`--full` syncs the whole volume).
fn in_volume(name: &str, root: &Path, cwd: Option<&Path>, given: &str) -> anyhow::Result<String> {
    let root = lexical(root);
    let base = match cwd.map(lexical) {
        Some(cwd) if cwd.starts_with(&root) => cwd,
        _ => root.clone(),
    };
    let path = lexical(&base.join(given));
    let Ok(inside) = path.strip_prefix(&root) else {
        anyhow::bail!("{given}: not in volume {name} ({})", root.display());
    };
    if inside.as_os_str().is_empty() {
        anyhow::bail!(
            "{given:?} is the volume's root ({}); to sync the whole volume, run `twinfs sync --full {name}`",
            root.display()
        );
    }
    inside
        .to_str()
        .map(str::to_owned)
        .with_context(|| format!("{given}: {} is not UTF-8", inside.display()))
}

/// `path` under the volume's `root` as configured: a path under `physical` (the root
/// with symlinks resolved) is taken as the same place under `root`.
fn logical(path: &Path, root: &Path, physical: Option<&Path>) -> PathBuf {
    match physical
        .filter(|ph| *ph != root)
        .map(|ph| path.strip_prefix(ph))
    {
        Some(Ok(rest)) => root.join(rest),
        _ => path.to_owned(),
    }
}

/// `path` with `.` left out and each `..` taking off the component before it, without
/// asking the filesystem (so without following symlinks).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn describe_sync(sync: twinfs_replicator::policy::SyncMode) -> String {
    match sync {
        twinfs_replicator::policy::SyncMode::Interval(d) => {
            format!("interval {}", humantime::format_duration(d))
        }
        other => other.name().to_owned(),
    }
}

fn done(response: Response) -> anyhow::Result<()> {
    match response {
        Response::Done(message) => {
            println!("{message}");
            Ok(())
        }
        other => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
    }
}

/// Sends `request` to the daemon and waits for its answer as long as the daemon may
/// take for it (see [`daemon::answer_within`]).
fn ask(config: &Config, request: &Request) -> anyhow::Result<Response> {
    let wait = daemon::answer_within(config, request);
    let response = match control::call(&config.node.control_socket, request, wait) {
        Ok(response) => response,
        // The daemon has the request: it is not a matter of reaching it.
        Err(e @ control::ControlError::NoAnswer { .. }) => return Err(e.into()),
        Err(e) => return Err(anyhow::Error::new(e).context("cannot reach the daemon")),
    };
    if let Response::Error(e) = response {
        anyhow::bail!("{e}");
    }
    Ok(response)
}

/// A line on the terminal (stderr) that shows, while a command waits, what each
/// standby still has to apply; cleared when dropped.
struct Progress {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    fn start(config: &Config, volume: Option<String>) -> Progress {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let socket = config.node.control_socket.clone();
        let done = stop.clone();
        let thread = std::thread::spawn(move || {
            use std::io::Write;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(300));
                let Ok(Response::Status(s)) =
                    control::call(&socket, &Request::Status, Duration::from_secs(2))
                else {
                    continue;
                };
                let parts: Vec<String> = s
                    .volumes
                    .iter()
                    .filter(|v| volume.as_ref().is_none_or(|n| *n == v.name))
                    .flat_map(|v| v.peers.iter().map(move |p| (v, p)))
                    .filter(|(_, p)| p.connected && p.peer_role == Some(Role::Standby))
                    .map(|(v, p)| {
                        if p.full_sync == "in progress" {
                            format!("{}/{}: full sync {}%", v.name, p.peer, p.full_sync_percent)
                        } else {
                            format!(
                                "{}/{}: {} pending ({} B)",
                                v.name, p.peer, p.pending, p.pending_bytes
                            )
                        }
                    })
                    .collect();
                if !done.load(std::sync::atomic::Ordering::Relaxed) {
                    eprint!("\r\x1b[K{}", parts.join("  "));
                    let _ = std::io::stderr().flush();
                }
            }
            eprint!("\r\x1b[K");
        });
        Progress {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A connected peer silent for longer than this many heartbeats is shown with how
/// long it has been silent.
const QUIET_HEARTBEATS: u32 = 3;

/// The state of the link with peer `p` at `now` (seconds since the Unix epoch): a dead
/// peer stays connected until QUIC's idle timeout (10 s and more), so a connected
/// one that has been silent for several heartbeats says for how long.
fn link(p: &PeerStatus, now: u64) -> String {
    if !p.connected {
        return "disconnected".to_owned();
    }
    let quiet = HEARTBEAT.saturating_mul(QUIET_HEARTBEATS).as_secs();
    match (p.last_contact.map(|t| now.saturating_sub(t)), p.rtt_us) {
        (Some(silent), _) if silent > quiet => format!("connected (no word for {silent} s)"),
        (_, Some(us)) => format!("connected {:.1} ms", us as f64 / 1000.0),
        (_, None) => "connected".to_owned(),
    }
}

fn print_status(s: &NodeStatus) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    println!("node {} (daemon pid {})", s.node, s.pid);
    println!(
        "{:<12} {:<8} {:<8} {:<12} {:>6} {:>22}  PATH",
        "VOLUME", "ROLE", "MOUNTED", "PASSTHROUGH", "EPOCH", "CHANGES alw/once/int/nev"
    );
    for v in &s.volumes {
        let c = &v.changes;
        println!(
            "{:<12} {:<8} {:<8} {:<12} {:>6} {:>22}  {}",
            v.name,
            v.role.name(),
            if v.mounted { "yes" } else { "NO" },
            if v.passthrough { "on" } else { "off" },
            v.epoch,
            format!("{}/{}/{}/{}", c.always, c.once, c.interval, c.never),
            v.path.display()
        );
        println!("  takeover: {}", v.takeover);
        let timeout = std::time::Duration::from_millis(v.peer_timeout_ms);
        match &v.auto_failover {
            Some(note) => println!(
                "  failover: {} (peer_timeout {timeout:?}): {note}",
                v.failover
            ),
            None => println!("  failover: {}", v.failover),
        }
        if let Some(e) = &v.health.last_error {
            println!("  health: FAILING ({} in a row): {e}", v.health.failures);
        }
        if let Some(t) = v.health.demoted_at {
            println!("  health: gave up the active role at {t}");
        }
        if let Some(h) = &v.last_hook {
            println!(
                "  last hook: {} ({}) {}",
                h.hook,
                h.reason,
                if h.ok {
                    "ok".to_owned()
                } else if h.timed_out {
                    "FAILED: timed out".to_owned()
                } else {
                    match h.exit_code {
                        Some(code) => format!("FAILED: exit {code}"),
                        None => "FAILED: killed by a signal, or not started".to_owned(),
                    }
                }
            );
        }
        if v.conflicts > 0 {
            println!(
                "  conflicts: {} file(s) kept in {} (`twinfs conflicts {}`)",
                v.conflicts,
                v.conflicts_dir.display(),
                v.name
            );
        }
        for p in &v.peers {
            let full_sync = if p.full_sync == "in progress" {
                format!("in progress {}%", p.full_sync_percent)
            } else {
                p.full_sync.clone()
            };
            let link = link(p, now);
            let full_sync = match p.out_of_sync_since {
                Some(t) => format!("{full_sync}, OUT OF SYNC since {t}"),
                None => full_sync,
            };
            println!(
                "  peer {:<10} {:<22} {:<19} full sync {:<16} ops {} acked {} pending {} ({} B) rejected {} sent {} B received {} B",
                p.peer,
                p.address,
                link,
                full_sync,
                p.ops,
                p.acked,
                p.pending,
                p.pending_bytes,
                p.rejected,
                p.bytes_sent,
                p.bytes_received
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_physical_path_of_a_volume_behind_a_symlink_is_taken_as_its_own() {
        let root = Path::new("/etc/cmm");
        let physical = Some(Path::new("/srv/cmm"));
        // (path, where the volume really is, what it maps to)
        for (path, physical, want) in [
            ("/srv/cmm/fw", physical, "/etc/cmm/fw"),
            ("/srv/cmm", physical, "/etc/cmm"),
            ("/srv/cmmx", physical, "/srv/cmmx"),
            ("/etc/cmm/fw", physical, "/etc/cmm/fw"),
            ("/srv/cmm/fw", None, "/srv/cmm/fw"),
        ] {
            assert_eq!(
                logical(Path::new(path), root, physical),
                Path::new(want),
                "{path}"
            );
        }
        // Then from the current directory, as inside the volume.
        let cwd = logical(Path::new("/srv/cmm/fw"), root, physical);
        assert_eq!(
            in_volume("cmm", root, Some(&cwd), "blade.sif").expect("inside"),
            "fw/blade.sif"
        );
    }

    #[test]
    fn the_journal_is_recognised_by_stderrs_device_and_inode() {
        use std::os::unix::fs::MetadataExt;
        let stderr = std::fs::metadata("/proc/self/fd/2").expect("stat stderr");
        let ours = format!("{}:{}", stderr.dev(), stderr.ino());
        assert!(stderr_is_the_journal(Some(ours.as_ref())));
        let other = format!("{}:{}", stderr.dev(), stderr.ino() + 1);
        assert!(!stderr_is_the_journal(Some(other.as_ref())));
        assert!(!stderr_is_the_journal(Some("not a stream".as_ref())));
        assert!(!stderr_is_the_journal(None));
    }

    fn config(volumes: &[&str]) -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut text = String::from("[node]\nname = \"a\"\n");
        for name in volumes {
            std::fs::create_dir(dir.path().join(name)).expect("mkdir");
            text.push_str(&format!(
                "[[volume]]\nname = \"{name}\"\npath = \"{}\"\n",
                dir.path().join(name).display()
            ));
        }
        let config = Config::parse(&text, &dir.path().join("twinfs.toml")).expect("config");
        (dir, config)
    }

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    /// `twinfs sync ARGS [--full]` run in `cwd` on a node with `config`.
    fn sync(
        config: &Config,
        cwd: Option<&Path>,
        args: &[&str],
        full: bool,
    ) -> anyhow::Result<(Option<String>, Vec<String>)> {
        sync_arguments(
            config,
            cwd,
            args.first().map(|s| s.to_string()),
            strings(&args[1.min(args.len())..]),
            full,
        )
    }

    fn refused(r: anyhow::Result<(Option<String>, Vec<String>)>) -> String {
        format!("{:#}", r.expect_err("refused"))
    }

    #[test]
    fn sync_paths_without_the_volume_on_a_node_with_one() {
        let (_dir, one) = config(&["cmm"]);
        let args = |v: &[&str]| sync(&one, None, v, false).expect("valid");
        assert_eq!(
            args(&["passwd"]),
            (Some("cmm".into()), strings(&["passwd"]))
        );
        assert_eq!(
            args(&["passwd", "ssh/x"]),
            (Some("cmm".into()), strings(&["passwd", "ssh/x"]))
        );
        assert_eq!(
            args(&["cmm", "passwd"]),
            (Some("cmm".into()), strings(&["passwd"]))
        );
        // A file named like the volume: after the volume's name.
        assert_eq!(
            args(&["cmm", "cmm"]),
            (Some("cmm".into()), strings(&["cmm"]))
        );
        assert_eq!(args(&["cmm"]), (Some("cmm".into()), vec![]));
        assert_eq!(args(&[]), (None, vec![]));

        // With several, the first argument must name the volume.
        let (_dir, two) = config(&["cmm", "xcat"]);
        let said = refused(sync(&two, None, &["passwd"], false));
        assert!(
            said.contains("no volume named \"passwd\" (volumes: cmm, xcat)")
                && said.contains("name the volume first"),
            "{said}"
        );
        assert_eq!(
            sync(&two, None, &["xcat", "passwd"], false).expect("valid"),
            (Some("xcat".into()), strings(&["passwd"]))
        );
    }

    #[test]
    fn sync_full_takes_a_volume_name_only() {
        let (_dir, one) = config(&["cmm"]);
        assert_eq!(sync(&one, None, &[], true).expect("all"), (None, vec![]));
        assert_eq!(
            sync(&one, None, &["cmm"], true).expect("one"),
            (Some("cmm".into()), vec![])
        );
        let said = refused(sync(&one, None, &["cmmx"], true));
        assert!(
            said.contains("no volume named \"cmmx\" (volumes: cmm)"),
            "{said}"
        );
        let said = refused(sync(&one, None, &["cmm", "passwd"], true));
        assert!(said.contains("--full syncs the whole volume"), "{said}");
    }

    #[test]
    fn sync_paths_are_taken_from_the_current_directory_inside_the_volume() {
        let (dir, one) = config(&["cmm"]);
        let root = dir.path().join("cmm");
        let ssh = root.join("ssh");
        let paths = |cwd: &Path, v: &[&str]| sync(&one, Some(cwd), v, false).map(|(_, p)| p);
        // Outside the volume: from its root.
        assert_eq!(paths(dir.path(), &["ssh/x"]).expect("valid"), ["ssh/x"]);
        assert_eq!(
            paths(Path::new("/"), &["./ssh/x"]).expect("valid"),
            ["ssh/x"]
        );
        // Inside: from the current directory, as other tools do.
        assert_eq!(
            paths(&ssh, &["x", "../passwd"]).expect("valid"),
            ["ssh/x", "passwd"]
        );
        assert_eq!(paths(&root, &["ssh/./x"]).expect("valid"), ["ssh/x"]);
        let absolute = ssh.join("x").display().to_string();
        assert_eq!(paths(&ssh, &[&absolute]).expect("valid"), ["ssh/x"]);

        // The root, however it is named, is no path to ship.
        let shown = root.display().to_string();
        for (cwd, given) in [
            (root.as_path(), "."),
            (ssh.as_path(), ".."),
            (dir.path(), "."),
            (dir.path(), shown.as_str()),
            (dir.path(), &format!("{shown}/")),
            (dir.path(), &format!("{shown}/ssh/..")),
        ] {
            let said = refused(paths(cwd, &[given]).map(|p| (None, p)));
            assert!(
                said.contains("is the volume's root") && said.contains("twinfs sync --full cmm"),
                "{given} in {}: {said}",
                cwd.display()
            );
        }
        // Nor anything outside it.
        for given in ["../etc/passwd", "/etc/passwd"] {
            let said = refused(paths(dir.path(), &[given]).map(|p| (None, p)));
            assert!(said.contains("not in volume cmm"), "{given}: {said}");
        }
        assert!(paths(&root, &["../../x"]).is_err());
    }

    #[test]
    fn a_connected_peer_silent_for_three_heartbeats_says_for_how_long() {
        let peer = |connected, last_contact, rtt_us| PeerStatus {
            connected,
            last_contact,
            rtt_us,
            ..PeerStatus::default()
        };
        let now = 1_000_000;
        assert_eq!(
            link(&peer(true, Some(now - 1), Some(2700)), now),
            "connected 2.7 ms"
        );
        assert_eq!(link(&peer(true, Some(now - 3), None), now), "connected");
        assert_eq!(
            link(&peer(true, Some(now - 9), Some(2700)), now),
            "connected (no word for 9 s)"
        );
        assert_eq!(link(&peer(false, Some(now - 9), None), now), "disconnected");
        // A clock that went back says nothing odd.
        assert_eq!(link(&peer(true, Some(now + 5), None), now), "connected");
    }
}
