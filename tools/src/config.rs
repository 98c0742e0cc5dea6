//! The configuration file (`twinfs.toml`): parsed once into typed structs and
//! validated, with every error pointing at `<file>:<line>: <key>`.
//!
//! ```toml
//! [node]                              # optional, as is each key in it
//! name = "cmm-a"                      # default: the hostname
//! listen = "0.0.0.0:7790"             # default
//! state_dir = "/var/lib/twinfs"       # default
//! control_socket = "/var/lib/twinfs/control.sock"  # default: <state_dir>/control.sock
//!
//! [[peer]]                            # zero or more
//! name = "cmm-b"
//! address = "cmm-b:7790"              # host:port
//! node_id = "5f1c...e2"               # SHA-256 of the peer's certificate, 64 hex digits
//!
//! [[volume]]                          # zero or more
//! name = "cmm"                        # letters, digits, '_', '.', '-'; unique
//! path = "/etc/cmm"                   # an existing directory, absolute
//! initial_role = "active"             # or "standby"; default "active"
//! durability = "async"                # or "sync"; default "async"
//! sync_timeout = "10s"                # default 10s
//! on_promote = "ip addr add 10.0.0.9/24 dev eth0"   # optional, run with sh -c
//! on_demote = "ip addr del 10.0.0.9/24 dev eth0"    # optional
//! hook_timeout = "30s"                # default 30s
//! on_promote_failure = "keep"         # or "rollback"; default "keep"
//!
//! [[volume.rule]]                     # zero or more, first match wins
//! match = "*.sif"                     # glob, see twinfs_replicator::policy
//! sync = "interval"                   # always | once | interval | never
//! interval = "1h"                     # with sync = "interval" only, and then required
//! priority = 1                        # 1 (must sync) or 2 (default)
//! durability = "sync"                 # optional: the volume's when left out
//! direction = "both"                  # down (default) or both: standbys may write it too;
//!                                     # both needs sync = "always"
//! ```

use std::collections::HashMap;

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use twinfs_replicator::policy::{Direction, Policy, PolicySet, Priority, Rule, SyncMode};

use crate::identity::NodeId;

/// The port twinfs listens on when `node.listen` is not set.
pub const DEFAULT_PORT: u16 = 7790;
/// The state directory when `node.state_dir` is not set.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/twinfs";
/// How long a sync write waits for the standbys when `sync_timeout` is not
/// set.
pub const DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// The name of the control socket in the state directory.
const CONTROL_SOCKET_NAME: &str = "control.sock";

/// A validated configuration file.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it was read from.
    pub source: PathBuf,
    /// This node.
    pub node: NodeConfig,
    /// The other nodes.
    pub peers: Vec<PeerConfig>,
    /// The replicated directories.
    pub volumes: Vec<VolumeConfig>,
}

/// The `[node]` table, defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// This node's name; the hostname unless set.
    pub name: String,
    /// Where peers connect.
    pub listen: SocketAddr,
    /// Where the identity and the volume states are kept (absolute).
    pub state_dir: PathBuf,
    /// The socket the command-line tool talks to the daemon through
    /// (absolute).
    pub control_socket: PathBuf,
}

/// One `[[peer]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer's name, for logs and commands.
    pub name: String,
    /// `host:port` to connect to; the host may be a name, resolved when
    /// connecting.
    pub address: String,
    /// The peer's certificate must hash to this.
    pub node_id: NodeId,
    /// A witness: a node with no volumes that only counts towards a majority for
    /// automatic failover (never dialled for replication).
    pub witness: bool,
}

/// One `[[volume]]`.
#[derive(Clone, Debug)]
pub struct VolumeConfig {
    /// The volume's name, unique in the file.
    pub name: String,
    /// The directory replicated (absolute, existed at validation).
    pub path: PathBuf,
    /// The role on the very first start; later the persisted role wins.
    pub initial_role: Role,
    /// Whether writes wait for the standbys.
    pub durability: Durability,
    /// How long a sync write waits for the standbys.
    pub sync_timeout: Duration,
    /// The `[[volume.rule]]`s, in order.
    pub policies: PolicySet,
    /// Commands run (`sh -c`) when this node becomes active / stops being active.
    pub hooks: Hooks,
    /// Whether a standby takes over by itself when the active falls silent.
    pub failover: Failover,
    /// How the active checks that it can still serve.
    pub health: Health,
}

/// `failover` and `peer_timeout` of a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failover {
    /// `auto`: a fit standby that hears nothing from the active for `peer_timeout`
    /// (and reaches a majority of the nodes, when there are more than two) promotes
    /// itself. `manual`: only `twinfs promote` does.
    pub auto: bool,
    /// How long the active may be silent before an automatic failover.
    pub peer_timeout: Duration,
}

/// `peer_timeout` when not given.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// The shortest `peer_timeout`: two of the active's heartbeats, so that one sent a
/// little late (a busy machine) is not taken for a silent active.
pub const MIN_PEER_TIMEOUT: Duration =
    Duration::from_secs(2 * twinfs_replicator::node::HEARTBEAT.as_secs());

/// `health_*` of a volume: the active gives up the role when it cannot serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// Run with `sh -c` every `interval` on the active; a non-zero exit (or running
    /// longer than `interval`) is a failure.
    pub command: Option<String>,
    /// How often the active checks its backing directory and runs `command`.
    pub interval: Duration,
    /// Consecutive failures after which the active demotes itself.
    pub failures: u32,
}

/// `health_interval` when not given.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// `health_failures` when not given.
pub const DEFAULT_HEALTH_FAILURES: u32 = 3;

/// `failover` as written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum FailoverMode {
    Manual,
    Auto,
}

/// A volume's hook commands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hooks {
    /// Run after this node became active.
    pub on_promote: Option<String>,
    /// Run after this node stopped being active.
    pub on_demote: Option<String>,
    /// How long a hook may run before it is killed.
    pub timeout: Duration,
    /// A failed `on_promote` hands the role back (the node demotes itself).
    pub rollback_failed_promote: bool,
}

/// How long a hook may run when `hook_timeout` is not given.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// What a failed `on_promote` hook does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum PromoteFailure {
    /// Stay active; status shows the failure.
    Keep,
    /// Demote again.
    Rollback,
}

/// A node's role for a volume (defined by the FUSE layer, which enforces it).
pub use twinfs_fs::Role;

/// When a write on the active node returns.
pub use twinfs_replicator::policy::Durability;

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file is not valid TOML.
    #[error("{}:{line}: {key}: {message}", file.display())]
    Syntax {
        /// The file.
        file: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// The key path of the table or key around the error, as far as it
        /// can be told from the text (`volume[0].rule[1].sync`).
        key: String,
        /// The TOML parser's explanation.
        message: String,
    },
    /// A key is unknown or missing, or a value has the wrong type or is not
    /// acceptable.
    #[error("{}:{line}: {key}: {message}", file.display())]
    Invalid {
        /// The file.
        file: PathBuf,
        /// 1-based line of the offending key or value.
        line: usize,
        /// The key path (`volume[0].rule[1].interval`).
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`, read from `source` (used in errors and
    /// kept in [`Config::source`]). Checks that the volume directories exist.
    pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigError> {
        let doc = Document { file: source, text };
        doc.deserialize()?.validate(&doc)
    }
}

/// The text being parsed and its name, to turn byte offsets into errors.
struct Document<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Document<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        // Offsets from the parser are char boundaries; bytes are counted so
        // that a bad one cannot panic.
        1 + self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
    }

    fn invalid(&self, span: Range<usize>, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_owned(),
            line: self.line(span.start),
            key: key.to_owned(),
            message: message.into(),
        }
    }

    fn deserialize(&self) -> Result<RawConfig, ConfigError> {
        let deserializer =
            toml::de::Deserializer::parse(self.text).map_err(|e| self.syntax_error(&e))?;
        serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let message = e.inner().message().to_owned();
            let mut key = key_path(e.path());
            // The path of a missing key stops at the table that lacks it; the
            // key's name is only in the message.
            if let Some(name) = message
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split('`').next())
            {
                key = join_key(&key, name);
            }
            ConfigError::Invalid {
                file: self.file.to_owned(),
                // toml locates the errors it reports; line 1 is a fallback.
                line: e.inner().span().map_or(1, |s| self.line(s.start)),
                key: or_top_level(key),
                message,
            }
        })
    }

    fn syntax_error(&self, e: &toml::de::Error) -> ConfigError {
        let offset = e.span().map_or(0, |s| s.start);
        ConfigError::Syntax {
            file: self.file.to_owned(),
            line: self.line(offset),
            key: or_top_level(key_near(self.text, offset)),
            message: e.message().to_owned(),
        }
    }
}

/// `volume[0].rule[1].interval` from serde's view of the path; empty for the
/// top level.
fn key_path(path: &serde_path_to_error::Path) -> String {
    let mut key = String::new();
    for segment in path {
        match segment {
            serde_path_to_error::Segment::Seq { index } => key.push_str(&format!("[{index}]")),
            // `toml::Spanned` wraps each value it locates in a map with
            // private keys, which mean nothing to the user.
            serde_path_to_error::Segment::Map { key: name }
                if name.starts_with("$__serde_spanned_private") => {}
            serde_path_to_error::Segment::Map { key: name }
            | serde_path_to_error::Segment::Enum { variant: name } => {
                key = join_key(&key, name);
            }
            serde_path_to_error::Segment::Unknown => key = join_key(&key, "?"),
        }
    }
    key
}

/// `table.key`, or `key` at the top level (empty `table`).
fn join_key(table: &str, key: &str) -> String {
    if table.is_empty() {
        key.to_owned()
    } else {
        format!("{table}.{key}")
    }
}

/// `key`, or words for the top level, which has no key.
fn or_top_level(key: String) -> String {
    if key.is_empty() {
        "(top level)".to_owned()
    } else {
        key
    }
}

/// The key path at byte `offset` of a document that does not parse, from the
/// table headers above it and the key on its line: `volume[1].rule[0].sync`;
/// empty for the top level.
/// Only for pointing at syntax errors, so it reads headers line by line and
/// does not try to understand multi-line values.
fn key_near(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text.as_bytes()[..offset]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    // Elements seen so far of each array of tables, by dotted name.
    let mut arrays: HashMap<String, usize> = HashMap::new();
    let mut table = String::new();
    for line in text[..line_start].lines().map(str::trim) {
        if let Some(header) = line.strip_prefix("[[").and_then(|l| l.split("]]").next()) {
            let name = dotted(header);
            // A new element starts its nested arrays afresh: the first rule of
            // the second volume is `volume[1].rule[0]`.
            let nested = format!("{name}.");
            arrays.retain(|k, _| !k.starts_with(&nested));
            *arrays.entry(name.clone()).or_default() += 1;
            table = indexed(&name, &arrays);
        } else if let Some(header) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            table = indexed(&dotted(header), &arrays);
        }
    }
    let error_line = text[line_start..].lines().next().unwrap_or_default();
    let key = match error_line.split_once('=') {
        Some((key, _)) if !error_line.trim_start().starts_with(['[', '#']) => dotted(key),
        _ => String::new(),
    };
    if key.is_empty() {
        table
    } else {
        join_key(&table, &key)
    }
}

/// A dotted TOML key with the whitespace and quotes around its parts removed.
fn dotted(key: &str) -> String {
    key.split('.')
        .map(|part| part.trim().trim_matches(|c| c == '"' || c == '\''))
        .collect::<Vec<_>>()
        .join(".")
}

/// `name` with the index of the current element after each array of tables
/// in it: `volume.rule` becomes `volume[1].rule[0]`.
fn indexed(name: &str, arrays: &HashMap<String, usize>) -> String {
    let mut prefix = String::new();
    let mut out = String::new();
    for part in name.split('.') {
        if !prefix.is_empty() {
            prefix.push('.');
            out.push('.');
        }
        prefix.push_str(part);
        out.push_str(part);
        if let Some(count) = arrays.get(&prefix) {
            out.push_str(&format!("[{}]", count.saturating_sub(1)));
        }
    }
    out
}

/// The file as written. Fields that are checked after parsing keep their
/// position, for the error message.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    node: RawNode,
    #[serde(default)]
    peer: Vec<RawPeer>,
    #[serde(default)]
    volume: Vec<RawVolume>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Option<Spanned<String>>,
    listen: Option<Spanned<String>>,
    state_dir: Option<Spanned<PathBuf>>,
    control_socket: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: Spanned<String>,
    address: Spanned<String>,
    node_id: Spanned<String>,
    #[serde(default)]
    witness: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    name: Spanned<String>,
    path: Spanned<PathBuf>,
    initial_role: Option<Role>,
    durability: Option<Durability>,
    sync_timeout: Option<Spanned<String>>,
    on_promote: Option<String>,
    on_demote: Option<String>,
    hook_timeout: Option<Spanned<String>>,
    on_promote_failure: Option<PromoteFailure>,
    failover: Option<FailoverMode>,
    peer_timeout: Option<Spanned<String>>,
    health_command: Option<String>,
    health_interval: Option<Spanned<String>>,
    health_failures: Option<Spanned<i64>>,
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(rename = "match")]
    pattern: Spanned<String>,
    sync: Spanned<SyncName>,
    interval: Option<Spanned<String>>,
    priority: Option<Spanned<i64>>,
    durability: Option<Durability>,
    direction: Option<Spanned<Direction>>,
}

/// `sync` as written; the interval is a key of its own.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum SyncName {
    Always,
    Once,
    Interval,
    Never,
}

impl RawConfig {
    fn validate(self, doc: &Document) -> Result<Config, ConfigError> {
        let state_dir_span = self.node.state_dir.as_ref().map(Spanned::span);
        let control_socket_span = self.node.control_socket.as_ref().map(Spanned::span);
        let node = self.node.validate(doc)?;

        let mut peers: Vec<PeerConfig> = Vec::with_capacity(self.peer.len());
        for (i, raw) in self.peer.into_iter().enumerate() {
            let name_span = raw.name.span();
            let node_id_span = raw.node_id.span();
            let peer = raw.validate(doc, i)?;
            if peer.name == node.name {
                return Err(doc.invalid(
                    name_span,
                    &format!("peer[{i}].name"),
                    format!(
                        "{:?} is this node's own name (node.name): a node does not list \
                         itself as a peer",
                        peer.name
                    ),
                ));
            }
            if let Some(j) = peers.iter().position(|p| p.name == peer.name) {
                return Err(doc.invalid(
                    name_span,
                    &format!("peer[{i}].name"),
                    format!("{:?} is already the name of peer[{j}]", peer.name),
                ));
            }
            if let Some(j) = peers.iter().position(|p| p.node_id == peer.node_id) {
                return Err(doc.invalid(
                    node_id_span,
                    &format!("peer[{i}].node_id"),
                    format!("{} is already the node id of peer[{j}]", peer.node_id),
                ));
            }
            peers.push(peer);
        }

        let mut volumes: Vec<VolumeConfig> = Vec::with_capacity(self.volume.len());
        // Each volume's path as resolved (symlinks, `.` and `..`), and where it is written.
        let mut paths: Vec<(PathBuf, Range<usize>)> = Vec::with_capacity(self.volume.len());
        for (i, raw) in self.volume.into_iter().enumerate() {
            let name_span = raw.name.span();
            let path_span = raw.path.span();
            let volume = raw.validate(doc, i)?;
            if let Some(j) = volumes.iter().position(|v| v.name == volume.name) {
                return Err(doc.invalid(
                    name_span,
                    &format!("volume[{i}].name"),
                    format!("{:?} is already the name of volume[{j}]", volume.name),
                ));
            }
            // The state directory names a volume's files after it: the role file of
            // `x.sync` (`volumes/x.sync.json`) would be the sync record of `x`.
            if let Some((j, other)) = volumes.iter().enumerate().find(|(_, v)| {
                v.name == format!("{}.sync", volume.name)
                    || volume.name == format!("{}.sync", v.name)
            }) {
                let (short, long) = if other.name.len() < volume.name.len() {
                    (&other.name, &volume.name)
                } else {
                    (&volume.name, &other.name)
                };
                return Err(doc.invalid(
                    name_span,
                    &format!("volume[{i}].name"),
                    format!(
                        "{:?} and the name of volume[{j}], {:?}, would share a state file \
                         (volumes/{long}.json is the role file of {long:?} and the sync \
                         record of {short:?}): rename one",
                        volume.name, other.name
                    ),
                ));
            }
            let real = resolved(&volume.path);
            for (j, (other, _)) in paths.iter().enumerate() {
                let Some(how) = nesting(&real, other) else {
                    continue;
                };
                let message = match how {
                    Nesting::Same if real == volume.path => {
                        format!("{} is already the path of volume[{j}]", real.display())
                    }
                    Nesting::Same => format!(
                        "{} is {}, already the path of volume[{j}]",
                        volume.path.display(),
                        real.display()
                    ),
                    _ => format!(
                        "{} {} {}, the path of volume[{j}]: volumes must not overlap (each \
                         is mounted in place on a directory of its own)",
                        volume.path.display(),
                        how.words(),
                        volumes[j].path.display()
                    ),
                };
                return Err(doc.invalid(path_span, &format!("volume[{i}].path"), message));
            }
            paths.push((real, path_span));
            volumes.push(volume);
        }

        // The daemon's own files in a volume would be replicated (and read-only on a
        // standby); a volume in the state directory would hold the daemon's files.
        for (key, path, span) in [
            ("node.state_dir", &node.state_dir, state_dir_span),
            (
                "node.control_socket",
                &node.control_socket,
                control_socket_span,
            ),
        ] {
            let real = resolved(path);
            for (i, (volume, volume_span)) in paths.iter().enumerate() {
                let why = "the daemon's own files must be outside every volume";
                let error = match (nesting(&real, volume), span.clone()) {
                    (None, _) => continue,
                    (Some(how), Some(span)) => doc.invalid(
                        span,
                        key,
                        format!(
                            "{} {} {}, volume[{i}].path: {why}",
                            path.display(),
                            how.words(),
                            volumes[i].path.display()
                        ),
                    ),
                    // Not written: the default is at fault only together with the volume.
                    (Some(_), None) => {
                        let how = nesting(volume, &real).unwrap_or(Nesting::Same);
                        doc.invalid(
                            volume_span.clone(),
                            &format!("volume[{i}].path"),
                            format!(
                                "{} {} {}, {key} (by default): {why}; set {key}",
                                volumes[i].path.display(),
                                how.words(),
                                path.display()
                            ),
                        )
                    }
                };
                return Err(error);
            }
        }

        Ok(Config {
            source: doc.file.to_owned(),
            node,
            peers,
            volumes,
        })
    }
}

impl RawNode {
    fn validate(self, doc: &Document) -> Result<NodeConfig, ConfigError> {
        let name = match self.name {
            Some(name) => {
                check_name(&name, doc, "node.name")?;
                name.into_inner()
            }
            None => hostname(doc)?,
        };
        let listen = match self.listen {
            Some(listen) => listen.get_ref().parse().map_err(|_| {
                doc.invalid(
                    listen.span(),
                    "node.listen",
                    format!(
                        "{:?} is not a socket address (expected e.g. \"0.0.0.0:{DEFAULT_PORT}\")",
                        listen.get_ref()
                    ),
                )
            })?,
            None => SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
        };
        let state_dir_span = self.state_dir.as_ref().map(Spanned::span);
        let state_dir = match self.state_dir {
            Some(dir) => absolute(dir, doc, "node.state_dir")?,
            None => PathBuf::from(DEFAULT_STATE_DIR),
        };
        // (Checked here rather than when the daemon binds it and fails.)
        let too_long = |path: &Path, span: Range<usize>, key: &str, hint: &str| {
            let len = path.as_os_str().len();
            if len <= MAX_SOCKET_PATH {
                return Ok(());
            }
            Err(doc.invalid(
                span,
                key,
                format!(
                    "the control socket {} would be {len} bytes long; a Unix socket's path \
                     can be at most {MAX_SOCKET_PATH}{hint}",
                    path.display()
                ),
            ))
        };
        let control_socket = match self.control_socket {
            Some(socket) => {
                let span = socket.span();
                let path = absolute(socket, doc, "node.control_socket")?;
                too_long(&path, span, "node.control_socket", "")?;
                path
            }
            None => {
                let path = state_dir.join(CONTROL_SOCKET_NAME);
                too_long(
                    &path,
                    state_dir_span.unwrap_or(0..0),
                    "node.state_dir",
                    ": set node.control_socket to a shorter path",
                )?;
                path
            }
        };
        Ok(NodeConfig {
            name,
            listen,
            state_dir,
            control_socket,
        })
    }
}

impl RawPeer {
    fn validate(self, doc: &Document, i: usize) -> Result<PeerConfig, ConfigError> {
        check_name(&self.name, doc, &format!("peer[{i}].name"))?;
        if !is_host_port(self.address.get_ref()) {
            return Err(doc.invalid(
                self.address.span(),
                &format!("peer[{i}].address"),
                format!(
                    "{:?} is not an address (expected host:port, e.g. \"cmm-b:{DEFAULT_PORT}\" \
                     or \"10.0.0.2:{DEFAULT_PORT}\")",
                    self.address.get_ref()
                ),
            ));
        }
        let node_id = self.node_id.get_ref().parse().map_err(|e| {
            doc.invalid(
                self.node_id.span(),
                &format!("peer[{i}].node_id"),
                format!("{:?} is not a node id: {e}", self.node_id.get_ref()),
            )
        })?;
        Ok(PeerConfig {
            name: self.name.into_inner(),
            address: self.address.into_inner(),
            node_id,
            witness: self.witness,
        })
    }
}

impl RawVolume {
    fn validate(self, doc: &Document, i: usize) -> Result<VolumeConfig, ConfigError> {
        let key = |name: &str| format!("volume[{i}].{name}");
        check_name(&self.name, doc, &key("name"))?;
        let path_span = self.path.span();
        let path = absolute(self.path, doc, &key("path"))?;
        let not_a_dir = |what: String| doc.invalid(path_span.clone(), &key("path"), what);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(not_a_dir(format!("{} is not a directory", path.display()))),
            // A dead FUSE mount: the daemon detaches it if it is a twinfs mount left by
            // a killed daemon, and says what it is otherwise.
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(not_a_dir(format!("{} does not exist", path.display())))
            }
            Err(e) => return Err(not_a_dir(format!("{}: {e}", path.display()))),
        }
        let sync_timeout = match self.sync_timeout {
            Some(timeout) => duration(&timeout, doc, &key("sync_timeout"), MAX_SYNC_TIMEOUT)?,
            None => DEFAULT_SYNC_TIMEOUT,
        };
        let hooks = Hooks {
            on_promote: self.on_promote.filter(|c| !c.trim().is_empty()),
            on_demote: self.on_demote.filter(|c| !c.trim().is_empty()),
            timeout: match self.hook_timeout {
                Some(t) => duration(&t, doc, &key("hook_timeout"), MAX_TIMEOUT)?,
                None => DEFAULT_HOOK_TIMEOUT,
            },
            rollback_failed_promote: self.on_promote_failure == Some(PromoteFailure::Rollback),
        };
        let failover = Failover {
            auto: self.failover == Some(FailoverMode::Auto),
            peer_timeout: match self.peer_timeout {
                Some(t) => match duration(&t, doc, &key("peer_timeout"), MAX_TIMEOUT)? {
                    d if d < MIN_PEER_TIMEOUT => {
                        return Err(doc.invalid(
                            t.span(),
                            &key("peer_timeout"),
                            format!(
                                "{:?} is too short: at least {} (the active sends a \
                                 heartbeat every {}; a shorter timeout takes one sent \
                                 a little late for a silent active)",
                                t.get_ref(),
                                humantime::format_duration(MIN_PEER_TIMEOUT),
                                humantime::format_duration(twinfs_replicator::node::HEARTBEAT),
                            ),
                        ))
                    }
                    d => d,
                },
                None => DEFAULT_PEER_TIMEOUT,
            },
        };
        let health = Health {
            command: self.health_command.filter(|c| !c.trim().is_empty()),
            interval: match self.health_interval {
                Some(t) => duration(&t, doc, &key("health_interval"), MAX_TIMEOUT)?,
                None => DEFAULT_HEALTH_INTERVAL,
            },
            failures: match self.health_failures {
                Some(n) => u32::try_from(*n.get_ref())
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| {
                        doc.invalid(
                            n.span(),
                            &key("health_failures"),
                            format!("{} is not a count from 1 to 1000", n.get_ref()),
                        )
                    })?,
                None => DEFAULT_HEALTH_FAILURES,
            },
        };
        let rules = self
            .rule
            .into_iter()
            .enumerate()
            .map(|(j, rule)| rule.validate(doc, &format!("volume[{i}].rule[{j}]"), &path))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VolumeConfig {
            name: self.name.into_inner(),
            path,
            initial_role: self.initial_role.unwrap_or(Role::Active),
            durability: self.durability.unwrap_or(Durability::Async),
            sync_timeout,
            policies: PolicySet::new(rules),
            hooks,
            failover,
            health,
        })
    }
}

impl RawRule {
    /// The rule of the volume at `volume` (its path).
    fn validate(self, doc: &Document, key: &str, volume: &Path) -> Result<Rule, ConfigError> {
        if let Some(why) = never_matches(self.pattern.get_ref(), volume) {
            return Err(doc.invalid(self.pattern.span(), &format!("{key}.match"), why));
        }
        let sync = match (*self.sync.get_ref(), &self.interval) {
            (SyncName::Always, None) => SyncMode::Always,
            (SyncName::Once, None) => SyncMode::Once,
            (SyncName::Never, None) => SyncMode::Never,
            (SyncName::Interval, Some(interval)) => SyncMode::Interval(duration(
                interval,
                doc,
                &format!("{key}.interval"),
                MAX_INTERVAL,
            )?),
            (SyncName::Interval, None) => {
                return Err(doc.invalid(
                    self.sync.span(),
                    &format!("{key}.interval"),
                    "missing: sync = \"interval\" needs an interval (e.g. interval = \"1h\")",
                ))
            }
            (_, Some(interval)) => {
                return Err(doc.invalid(
                    interval.span(),
                    &format!("{key}.interval"),
                    "only allowed with sync = \"interval\"",
                ))
            }
        };
        let priority = match self.priority {
            Some(priority) => u8::try_from(*priority.get_ref())
                .ok()
                .and_then(|p| Priority::new(p).ok())
                .ok_or_else(|| {
                    doc.invalid(
                        priority.span(),
                        &format!("{key}.priority"),
                        format!(
                            "{} is not a priority (expected 1 = must sync, or 2 = normal)",
                            priority.get_ref()
                        ),
                    )
                })?,
            None => Priority::NORMAL,
        };
        let direction = match self.direction {
            // Upstream writes ship at once like `always` changes; the other modes would
            // leave a standby's write waiting, or never shipped.
            Some(d) if *d.get_ref() == Direction::Both && sync != SyncMode::Always => {
                return Err(doc.invalid(
                    d.span(),
                    &format!("{key}.direction"),
                    "\"both\" is only allowed with sync = \"always\"",
                ))
            }
            Some(d) => d.into_inner(),
            None => Direction::Down,
        };
        let policy = Policy {
            sync,
            priority,
            durability: self.durability,
            direction,
        };
        Rule::new(self.pattern.get_ref(), policy)
            .map_err(|e| doc.invalid(self.pattern.span(), &format!("{key}.match"), e.to_string()))
    }
}

/// Why `pattern` can never match a path of the volume at `volume`, if it cannot: the
/// paths it is matched against are relative to the volume root, without `.` or `..`.
fn never_matches(pattern: &str, volume: &Path) -> Option<String> {
    if pattern.contains("//") {
        return Some(format!(
            "{pattern:?} has an empty part (\"//\"), which no path in the volume has: write \
             one '/' between names"
        ));
    }
    if pattern.split('/').any(|part| part == "." || part == "..") {
        return Some(format!(
            "{pattern:?} has a \".\" or \"..\" part, which no path in the volume has: write \
             it from the volume root (\"fw/*.bin\"), or without '/' to match a name at any depth"
        ));
    }
    if !pattern.starts_with('/') {
        return None;
    }
    // A leading '/' means the volume root, so the volume's own path is no prefix.
    let pattern_path = Path::new(pattern);
    let rest = [volume.to_owned(), resolved(volume)]
        .iter()
        .find_map(|v| pattern_path.strip_prefix(v).ok())?;
    Some(if rest.as_os_str().is_empty() {
        format!("{pattern:?} is the volume's own path: a pattern is relative to the volume root")
    } else {
        format!(
            "{pattern:?} starts with the volume's own path, but a pattern is relative to the \
             volume root (a leading '/' is the volume root): write {:?}",
            rest.display().to_string()
        )
    })
}

/// The longest path of a Unix socket: `sun_path` holds 108 bytes with the NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Whether `name` is a valid volume or node name: ASCII letters, digits, `_`,
/// `.` and `-`, and not `.` or `..`, so that it can name files.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn check_name(name: &Spanned<String>, doc: &Document, key: &str) -> Result<(), ConfigError> {
    if is_valid_name(name.get_ref()) {
        return Ok(());
    }
    Err(doc.invalid(
        name.span(),
        key,
        format!(
            "{:?} is not a valid name (letters, digits, '_', '.' and '-' only)",
            name.get_ref()
        ),
    ))
}

fn absolute(path: Spanned<PathBuf>, doc: &Document, key: &str) -> Result<PathBuf, ConfigError> {
    if path.get_ref().is_absolute() {
        // Without `.` components (and doubled slashes): a volume path ending in `/.`
        // would have its own mount asked for `.` while it is being made.
        return Ok(path.get_ref().components().collect());
    }
    Err(doc.invalid(
        path.span(),
        key,
        format!("{:?} is not an absolute path", path.get_ref()),
    ))
}

/// The longest `sync_timeout`: a `sync` write holds its writer that long.
pub const MAX_SYNC_TIMEOUT: Duration = Duration::from_secs(60 * 60);
/// The longest `hook_timeout`, `peer_timeout` and `health_interval`.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);
/// The longest rule `interval`: a year (of 365.25 days, as humantime counts it).
pub const MAX_INTERVAL: Duration = Duration::from_secs(31_557_600);

/// A duration of at most `max`: longer ones are mistakes, and added to the clock
/// they could overflow it.
fn duration(
    text: &Spanned<String>,
    doc: &Document,
    key: &str,
    max: Duration,
) -> Result<Duration, ConfigError> {
    match humantime::parse_duration(text.get_ref()) {
        Ok(d) if d.is_zero() => Err(doc.invalid(text.span(), key, "must be longer than zero")),
        Ok(d) if d > max => Err(doc.invalid(
            text.span(),
            key,
            format!(
                "{:?} is too long: at most {}",
                text.get_ref(),
                humantime::format_duration(max)
            ),
        )),
        Ok(d) => Ok(d),
        Err(_) => Err(doc.invalid(
            text.span(),
            key,
            format!(
                "{:?} is not a duration (expected e.g. \"30s\", \"1h\")",
                text.get_ref()
            ),
        )),
    }
}

/// `path` with symlinks, `.` and `..` resolved as far as it exists, and the rest
/// taken as written (`..` there removes the name before it): two names of one
/// directory come out the same. `path` is absolute.
fn resolved(path: &Path) -> PathBuf {
    let mut real = PathBuf::from("/");
    let mut exists = true;
    for component in path.components() {
        match component {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            // `real` is resolved up to here, so its parent is the real one.
            Component::ParentDir => {
                real.pop();
            }
            Component::Normal(name) => {
                real.push(name);
                if exists {
                    match std::fs::canonicalize(&real) {
                        Ok(canonical) => real = canonical,
                        // Not there yet (a state directory `twinfs init` creates), or
                        // a dead mount: the rest is compared as written.
                        Err(_) => exists = false,
                    }
                }
            }
        }
    }
    real
}

/// How one resolved path lies relative to another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Nesting {
    Same,
    Inside,
    Contains,
}

impl Nesting {
    fn words(self) -> &'static str {
        match self {
            Nesting::Same => "is the same as",
            Nesting::Inside => "is inside",
            Nesting::Contains => "contains",
        }
    }
}

/// How `a` lies relative to `b` (both resolved), or `None` when neither is inside the
/// other.
fn nesting(a: &Path, b: &Path) -> Option<Nesting> {
    if a == b {
        Some(Nesting::Same)
    } else if a.starts_with(b) {
        Some(Nesting::Inside)
    } else if b.starts_with(a) {
        Some(Nesting::Contains)
    } else {
        None
    }
}

/// `host:port` with a non-empty host and a numeric port; an IPv6 host must be
/// in brackets.
fn is_host_port(address: &str) -> bool {
    if address.parse::<SocketAddr>().is_ok() {
        return true;
    }
    match address.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains(|c: char| c == ':' || c.is_whitespace())
                && port.parse::<u16>().is_ok()
        }
        None => false,
    }
}

/// The hostname, as the default node name.
fn hostname(doc: &Document) -> Result<String, ConfigError> {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which outlives the call.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    // No table to point at when `[node]` is absent, so point at the top.
    let unusable = |why: String| doc.invalid(0..0, "node.name", why);
    if rc != 0 {
        return Err(unusable(format!(
            "not set, and the hostname cannot be read: {}",
            io::Error::last_os_error()
        )));
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..len]).into_owned();
    if !is_valid_name(&name) {
        return Err(unusable(format!(
            "not set, and the hostname {name:?} is not a valid name; set node.name"
        )));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_near_counts_array_elements_per_parent() {
        let text = "[node]\nname = \"a\"\n\
                    [[volume]]\n[[volume.rule]]\n[[volume.rule]]\n\
                    [[volume]]\n[[ volume . \"rule\" ]] # comment\nsync = once\n";
        let at = |needle: &str| text.find(needle).expect("needle in text");
        assert_eq!(key_near(text, at("sync")), "volume[1].rule[0].sync");
        assert_eq!(key_near(text, at("name")), "node.name");
        assert_eq!(key_near(text, 0), "");
        assert_eq!(key_near("a = \n", 4), "a");
        assert_eq!(key_near("[node]\n# x = 1\n", 8), "node");
        assert_eq!(key_near(text, text.len() + 10), "volume[1].rule[0]");
    }

    #[test]
    fn host_port_addresses() {
        for good in ["a:1", "10.0.0.2:7790", "[::1]:7790", "cmm-b.example:65535"] {
            assert!(is_host_port(good), "{good}");
        }
        for bad in ["a", "a:", ":1", "a:65536", "::1:1", "a b:1", "a:-1"] {
            assert!(!is_host_port(bad), "{bad}");
        }
    }

    #[test]
    fn names() {
        for good in ["cmm", "cmm-a", "a.b_c", "A9", "..."] {
            assert!(is_valid_name(good), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "é"] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }
}
