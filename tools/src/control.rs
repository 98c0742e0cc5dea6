//! The control protocol between the `twinfs` command and the running daemon: one JSON
//! request line and one JSON response line per connection on a Unix socket that only
//! root can reach.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Role;

/// The longest request line the daemon accepts.
pub const MAX_LINE: usize = 1 << 20;

/// The longest answer the command-line side reads: the status of many volumes and
/// peers, a report of `twinfs verify` (which lists at most [`VERIFY_LISTED`] paths
/// per standby).
pub const MAX_ANSWER: usize = 16 << 20;

/// How many differing paths `twinfs verify` lists per standby and volume; it counts
/// the rest.
pub const VERIFY_LISTED: usize = 1000;

/// A request to the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Everything `twinfs status` shows.
    Status,
    /// Switch a volume's role at once, without remounting.
    Role {
        /// The volume's name.
        volume: String,
        /// The new role.
        role: Role,
    },
    /// Make this node active for a volume (all when `None`), with a new epoch.
    Promote {
        /// The volume, or all.
        volume: Option<String>,
        /// Promote even when not fit to take over.
        force: bool,
    },
    /// Make this node a standby for a volume (all when `None`), after shipping what is
    /// pending.
    Demote {
        /// The volume, or all.
        volume: Option<String>,
    },
    /// Hash every file on this node and every connected standby now and compare.
    Verify {
        /// The volume, or all.
        volume: Option<String>,
    },
    /// Ship paths now (or run a full sync) and wait for every connected standby.
    Sync {
        /// The volume, or all.
        volume: Option<String>,
        /// Paths in the volume (relative, or absolute under its path).
        paths: Vec<String>,
        /// A full sync instead.
        full: bool,
    },
}

/// The daemon's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// The status of the node.
    Status(NodeStatus),
    /// A command was carried out; the text says what happened.
    Done(String),
    /// The request was refused; the text says why.
    Error(String),
    /// A check was carried out and found something wrong (`twinfs verify` found a
    /// difference); the text is its whole report, which goes to standard output, and
    /// the command fails.
    Found(String),
}

/// Change counters of one volume, per sync mode of the changed path.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct ChangeCounts {
    /// Changes to `always` paths.
    pub always: u64,
    /// Changes to `once` paths.
    pub once: u64,
    /// Changes to `interval` paths.
    pub interval: u64,
    /// Changes to `never` paths.
    pub never: u64,
    /// All changes.
    pub total: u64,
}

/// The status of one volume.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeStatus {
    /// The volume's name.
    pub name: String,
    /// The directory mounted in place.
    pub path: PathBuf,
    /// Its current role.
    pub role: Role,
    /// The persisted epoch.
    pub epoch: u64,
    /// Whether the FUSE mount is in place (checked in /proc/self/mountinfo).
    pub mounted: bool,
    /// Whether open files are served by FUSE passthrough.
    pub passthrough: bool,
    /// Changes captured since the daemon started.
    pub changes: ChangeCounts,
    /// Files open through the mount.
    pub open_files: usize,
    /// Of which opened for writing.
    pub open_for_write: usize,
    /// Inodes the kernel holds.
    pub inodes: usize,
    /// Replication with each peer, for this volume.
    #[serde(default)]
    pub peers: Vec<twinfs_replicator::node::PeerStatus>,
    /// Whether local writes are taken now: false on a standby, and on an active for a
    /// moment at start (until a standby accepted it) and during a handover or demote.
    #[serde(default)]
    pub writable: bool,
    /// Standby: whether it may take over now ("ready") or why not; active: "active".
    #[serde(default)]
    pub takeover: String,
    /// Files kept in the conflicts area after split brains (`twinfs conflicts`).
    #[serde(default)]
    pub conflicts: usize,
    /// Where the conflicts area is.
    #[serde(default)]
    pub conflicts_dir: PathBuf,
    /// The last `on_promote`/`on_demote` hook run for this volume.
    #[serde(default)]
    pub last_hook: Option<HookResult>,
    /// `auto` or `manual`.
    #[serde(default)]
    pub failover: String,
    /// The volume's `peer_timeout`, in milliseconds.
    #[serde(default)]
    pub peer_timeout_ms: u64,
    /// Standby with `failover = "auto"`: what the watch last found ("the active
    /// answers", "the active is silent; waiting: no majority: 1 of 3 nodes reachable",
    /// "took over: ...").
    #[serde(default)]
    pub auto_failover: Option<String>,
    /// The active's health checks (backing directory, `health_command`).
    #[serde(default)]
    pub health: crate::failover::HealthStatus,
}

/// The status of the node.
/// What a hook did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookResult {
    /// `on_promote` or `on_demote`.
    pub hook: String,
    /// Why the role changed: `manual`, `fenced` or `rollback`.
    pub reason: String,
    /// When it ran (seconds since the Unix epoch).
    pub at: u64,
    /// It exited with status 0 within the timeout.
    pub ok: bool,
    /// Its exit status, if it exited.
    pub exit_code: Option<i32>,
    /// It was killed at `hook_timeout`.
    pub timed_out: bool,
    /// The last 1 KiB of its stdout and stderr.
    pub output: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's name.
    pub node: String,
    /// The daemon's process id.
    pub pid: u32,
    /// The volumes it serves.
    pub volumes: Vec<VolumeStatus>,
}

/// Errors of the command-line side of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No daemon answers on the socket.
    #[error("no twinfs daemon is running (cannot connect to {path}: {source}); start it with `twinfs mount`")]
    NotRunning {
        /// The socket.
        path: PathBuf,
        /// Why the connection failed.
        source: std::io::Error,
    },
    /// The socket is there, but this user may not use it (it is root's).
    #[error("cannot connect to the daemon's control socket {path}: {source} (twinfs commands need root)")]
    Denied {
        /// The socket.
        path: PathBuf,
        /// Why the connection failed.
        source: std::io::Error,
    },
    /// The daemon took the request but did not answer in time: it may still be at
    /// work on it.
    #[error(
        "the daemon has not answered within {}; it may still be carrying out the request: \
         see `twinfs status` for the outcome",
        humantime::format_duration(*waited)
    )]
    NoAnswer {
        /// How long the command waited.
        waited: Duration,
    },
    /// The conversation broke off.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The request is longer than the daemon reads ([`MAX_LINE`]).
    #[error(
        "the request is {len} bytes, longer than the {} MiB the daemon reads: name fewer \
         paths at a time (or use `twinfs sync --full`)",
        MAX_LINE >> 20
    )]
    RequestTooLong {
        /// Its length, with the line's end.
        len: usize,
    },
    /// The daemon's answer was longer than [`MAX_ANSWER`].
    #[error("control socket {path}: the daemon's answer is longer than {} MiB; not read", MAX_ANSWER >> 20)]
    TooLong {
        /// The socket.
        path: PathBuf,
    },
    /// The daemon answered something that is not a response.
    #[error("control socket {path}: bad response: {source}")]
    BadResponse {
        /// The socket.
        path: PathBuf,
        /// Why it did not parse.
        source: serde_json::Error,
    },
}

/// Sends one request to the daemon listening on `socket` and returns its response.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let io = |source| ControlError::Io {
        path: socket.to_owned(),
        source,
    };
    let mut line = serde_json::to_vec(request).map_err(|e| io(e.into()))?;
    line.push(b'\n');
    if line.len() > MAX_LINE {
        return Err(ControlError::RequestTooLong { len: line.len() });
    }
    let mut stream = UnixStream::connect(socket).map_err(|source| {
        let path = socket.to_owned();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        match source.kind() {
            std::io::ErrorKind::PermissionDenied if !root => ControlError::Denied { path, source },
            _ => ControlError::NotRunning { path, source },
        }
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    stream.write_all(&line).map_err(io)?;
    let mut reader = BufReader::new(stream).take(MAX_ANSWER as u64);
    let mut answer = String::new();
    reader.read_line(&mut answer).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            ControlError::NoAnswer { waited: timeout }
        }
        _ => io(e),
    })?;
    if answer.len() >= MAX_ANSWER && !answer.ends_with('\n') {
        return Err(ControlError::TooLong {
            path: socket.to_owned(),
        });
    }
    serde_json::from_str(&answer).map_err(|source| ControlError::BadResponse {
        path: socket.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_that_does_not_answer_in_time_is_still_at_work() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("control.sock");
        // Takes the request and never answers, as a daemon busy with a long hook does.
        let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        let err =
            call(&socket, &Request::Status, Duration::from_millis(100)).expect_err("no answer");
        assert!(matches!(err, ControlError::NoAnswer { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("may still be carrying out"), "{message}");
        assert!(message.contains("twinfs status"), "{message}");
        drop(listener);
    }

    /// A request longer than the daemon reads is refused here, saying so (the daemon
    /// answered "bad request: EOF while parsing", or the command died of SIGPIPE).
    #[test]
    fn a_request_longer_than_the_daemon_reads_is_refused_before_it_is_sent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("control.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        let paths = vec!["etc/cmm/a-long-enough-name".to_owned(); 60_000];
        let request = Request::Sync {
            volume: None,
            paths,
            full: false,
        };
        let err = call(&socket, &request, Duration::from_millis(100)).expect_err("too long");
        assert!(
            matches!(err, ControlError::RequestTooLong { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("name fewer paths"), "{err}");
        drop(listener);
    }
}
