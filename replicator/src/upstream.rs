//! Upstream writes: a standby's local change to a `direction = "both"` path, shipped
//! to the active, which decides. No I/O here: the standby's [`Outbox`] numbers its
//! writes and remembers what each one was based on; [`judge`] is the active's rule.
//!
//! The rule: the standby says which version of the path its write replaced (the
//! content hash of the last version it had from the active, or of its own last write
//! it shipped; none for a path it had no file at). The active applies the write only
//! if its own current version still has that hash, so nobody changed the path on the
//! active meanwhile. Otherwise the active's version wins: it stays, is shipped to the
//! standby again, and the standby keeps its own version in its conflicts area. The
//! active checks the path's rule itself and never trusts the standby's word for it.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::manifest::{Kind, Manifest, Meta};
use crate::path::RelPath;
use crate::policy::PolicySet;
use crate::protocol::{Message, Op};

/// One upstream write sent and not answered yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    /// The write.
    pub op: Op,
    /// The hash it was based on.
    pub base: Option<u128>,
}

/// The bytes of upstream writes a standby lets be on their way to the active and not
/// answered before it holds the next ones back (one write alone may be larger). The
/// active's worker takes them one after the other, and queues 256 (of up to 16 MiB
/// each) before it refuses more as busy.
pub const WINDOW: u64 = 8 << 20;

/// The upstream writes a standby lets be on their way and not answered at once,
/// whatever their size: fewer than the active queues for its worker before it
/// refuses more as busy.
pub const WINDOW_WRITES: usize = 128;

/// Standby: the upstream writes of one session.
#[derive(Debug)]
pub struct Outbox {
    policies: PolicySet,
    /// The hash of the version each upstream path has as far as the active knows
    /// (`None`: no regular file there).
    known: HashMap<RelPath, Option<u128>>,
    next_id: u64,
    sent: BTreeMap<u64, Sent>,
    /// Encoded messages of writes held back by the window, in order.
    held: VecDeque<(u64, Vec<u8>)>,
    held_bytes: u64,
    /// The size of each message let out and not answered, and their sum.
    on_way: HashMap<u64, u64>,
    in_flight: u64,
}

impl Outbox {
    /// An empty outbox for a volume with these rules.
    pub fn new(policies: PolicySet) -> Outbox {
        Outbox {
            policies,
            known: HashMap::new(),
            next_id: 1,
            sent: BTreeMap::new(),
            held: VecDeque::new(),
            held_bytes: 0,
            on_way: HashMap::new(),
            in_flight: 0,
        }
    }

    /// Whether `path` is an upstream path under this node's rules.
    pub fn upstream(&self, path: &RelPath) -> bool {
        !path.is_root() && self.policies.resolve(path.as_path()).upstream()
    }

    /// The standby's manifest at the start of a full sync: what the active compares
    /// it with, and so the versions the active's ops are based on.
    pub fn learn_manifest(&mut self, manifest: &Manifest) {
        self.known.clear();
        for (path, meta) in manifest.iter() {
            if self.upstream(path) {
                self.known.insert(path.clone(), meta.hash);
            }
        }
    }

    /// An op from the active was applied: the standby has the active's version.
    pub fn learn_applied(&mut self, op: &Op) {
        match op {
            Op::Put { entry, .. } | Op::PutStream { entry } => {
                self.learn(&entry.path, entry.meta.hash)
            }
            Op::Delete { path } => {
                let below: Vec<RelPath> = self
                    .known
                    .keys()
                    .filter(|p| p.starts_with(path))
                    .cloned()
                    .collect();
                for p in below {
                    self.known.remove(&p);
                }
            }
            Op::Rename {
                from, to, exchange, ..
            } => {
                let a = self.known.remove(from).flatten();
                let b = self.known.remove(to).flatten();
                self.learn(to, a);
                if *exchange {
                    self.learn(from, b);
                }
            }
            Op::Link { path, existing } => {
                let hash = self.known.get(existing).copied().flatten();
                self.learn(path, hash);
            }
            Op::Skip { .. } => {}
        }
    }

    /// An op from the active on `path` was not applied: what this node has there (and
    /// below) is no version of the active's that a write could be based on.
    pub fn forget(&mut self, path: &RelPath) {
        self.known.retain(|p, _| !p.starts_with(path));
    }

    /// The active's large file at `path`, with content hash `hash`, is in place here.
    pub fn learn_placed(&mut self, path: &RelPath, hash: Option<u128>) {
        self.learn(path, hash);
    }

    fn learn(&mut self, path: &RelPath, hash: Option<u128>) {
        if self.upstream(path) {
            self.known.insert(path.clone(), hash);
        } else {
            self.known.remove(path);
        }
    }

    /// The message that ships a local write `op` upstream. Later writes of the
    /// same path are based on this one: the active applies them in order.
    pub fn send(&mut self, op: Op) -> Message {
        let checked = checked_path(&op).clone();
        let base = self.known.get(&checked).copied().flatten();
        self.learn_applied(&op);
        let id = self.next_id;
        self.next_id += 1;
        self.sent.insert(
            id,
            Sent {
                op: op.clone(),
                base,
            },
        );
        Message::Upstream { id, base, op }
    }

    /// Queues `bytes`, the encoded message of write `id` (from [`Outbox::send`]), to
    /// go to the active after those queued before, when [`Outbox::release`] lets it.
    pub fn hold(&mut self, id: u64, bytes: Vec<u8>) {
        self.held_bytes += bytes.len() as u64;
        self.held.push_back((id, bytes));
    }

    /// The next queued message if the window lets it out now: when nothing else is on
    /// its way, or it fits in the [`WINDOW`] with what is and fewer than
    /// [`WINDOW_WRITES`] are. It counts as on its way until answered.
    pub fn release(&mut self) -> Option<Vec<u8>> {
        let (id, bytes) = self.held.front()?;
        let size = bytes.len() as u64;
        if self.in_flight > 0
            && (self.in_flight + size > WINDOW || self.on_way.len() >= WINDOW_WRITES)
        {
            return None;
        }
        let id = *id;
        let (_, bytes) = self.held.pop_front()?;
        self.held_bytes -= size;
        self.in_flight += size;
        self.on_way.insert(id, size);
        Some(bytes)
    }

    /// The bytes of messages queued and held back.
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    /// The bytes of messages queued and not answered: held back, or on their way.
    pub fn holding(&self) -> u64 {
        self.held_bytes + self.in_flight
    }

    /// The active answered write `id`: what was sent, if it was waiting.
    pub fn answered(&mut self, id: u64) -> Option<Sent> {
        if let Some(size) = self.on_way.remove(&id) {
            self.in_flight -= size;
        }
        self.sent.remove(&id)
    }

    /// Writes sent (or held back) and not answered.
    pub fn waiting(&self) -> usize {
        self.sent.len()
    }
}

/// The path whose version the write is based on: the one it replaces, or for a
/// rename the one it moves.
pub fn checked_path(op: &Op) -> &RelPath {
    match op {
        Op::Rename { from, .. } => from,
        other => other.path(),
    }
}

/// Every path an upstream write changes.
pub fn changed_paths(op: &Op) -> Vec<RelPath> {
    match op {
        Op::Rename { from, to, .. } => vec![from.clone(), to.clone()],
        other => vec![other.path().clone()],
    }
}

/// Active: whether to apply upstream write `op`, based on `base`, when the active's
/// own version of [`checked_path`] is `current` (`None`: nothing there). The content
/// hashes must agree (`None` where neither has a regular file), and a `Put` must find
/// nothing or the same kind of thing: a file is never put over the active's directory
/// (nor a directory over its file or symlink), whose contents the standby never saw.
/// A `Delete` of a directory is applied as `rmdir(2)`, so only an empty one goes.
/// `Err` says why not, for the standby and the log.
pub fn judge(
    policies: &PolicySet,
    op: &Op,
    base: Option<u128>,
    current: Option<&Meta>,
) -> Result<(), String> {
    // (A standby ships its hard links as copies: a link would make an upstream path
    // a name of any file of the active's, `existing` judged by no rule.)
    if matches!(op, Op::Skip { .. } | Op::PutStream { .. } | Op::Link { .. }) {
        return Err("not an upstream write".into());
    }
    if matches!(op, Op::Put { entry, content: None } if entry.meta.kind == Kind::File) {
        return Err("an upstream file comes with its content".into());
    }
    for path in changed_paths(op) {
        if path.is_root() || !policies.resolve(path.as_path()).upstream() {
            return Err(format!(
                "{path} is not a direction = \"both\" path on the active"
            ));
        }
        if path.components().any(twinfs_fs::volume::is_reserved) {
            return Err(format!("{path} is a name reserved for twinfs"));
        }
    }
    if let (Op::Put { entry, .. }, Some(current)) = (op, current) {
        if entry.meta.kind != current.kind {
            return Err(format!(
                "{} is a {} on the active, not a {}; the active's stands",
                entry.path,
                noun(current.kind),
                noun(entry.meta.kind)
            ));
        }
    }
    if base != current.and_then(|m| m.hash) {
        return Err(format!(
            "{} changed on the active since the standby's version; the active's stands",
            checked_path(op)
        ));
    }
    Ok(())
}

fn noun(kind: Kind) -> &'static str {
    match kind {
        Kind::File => "file",
        Kind::Dir => "directory",
        Kind::Symlink => "symlink",
        Kind::Fifo => "fifo",
        Kind::Socket => "socket",
        Kind::CharDev => "character device",
        Kind::BlockDev => "block device",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Direction, Policy, Rule, SyncMode};

    fn both(pattern: &str) -> PolicySet {
        let policy = Policy {
            sync: SyncMode::Always,
            direction: Direction::Both,
            ..Policy::DEFAULT
        };
        PolicySet::new(vec![Rule::new(pattern, policy).expect("valid pattern")])
    }

    fn path(p: &str) -> RelPath {
        RelPath::new(p).expect("valid path")
    }

    /// A standby never sends a hard link upstream: one would make a `both` path a
    /// name of any file on the active (a `never` key, say), or replace the directory
    /// at its path whole.
    #[test]
    fn a_link_is_no_upstream_write() {
        let policies = both("users/*");
        let link = Op::Link {
            path: path("users/x"),
            existing: path("local/secret.key"),
        };
        assert_eq!(
            judge(&policies, &link, None, None),
            Err("not an upstream write".into())
        );
        // What a standby does send, a delete of a `both` path, is taken.
        let delete = Op::Delete {
            path: path("users/x"),
        };
        assert_eq!(judge(&policies, &delete, None, None), Ok(()));
        let outside = Op::Delete {
            path: path("local/secret.key"),
        };
        assert!(judge(&policies, &outside, None, None).is_err());
    }
}
