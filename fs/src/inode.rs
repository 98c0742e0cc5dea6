//! The inode table: which FUSE inode numbers the kernel holds, which backing file each
//! one is, and under which names it is known.
//!
//! Directories keep an `O_PATH` fd, so they stay addressable across renames; every
//! other file is addressed as a name inside its parent's fd. FUSE inode numbers are the
//! backing inode numbers where that is free (so `ls -i` agrees with the native
//! directory), and numbers from a private range when a backing number was reused while
//! the kernel still held the old inode.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

/// The FUSE inode number of the volume root.
pub const ROOT: u64 = 1;
/// First number of the private range used when a backing number is taken.
const PRIVATE_BASE: u64 = 1 << 62;

/// Identity of a backing file: (device, inode).
pub type Key = (u64, u64);

/// One inode the kernel knows.
pub struct Node {
    /// The backing file.
    pub key: Key,
    /// `S_IFMT` bits of the backing file.
    pub kind: u32,
    /// Names this inode is known by, as (parent inode, name); the first whose parent
    /// is still known is its path (see [`Table::link`]).
    pub links: Vec<(u64, OsString)>,
    /// For directories, an `O_PATH` fd of the directory.
    pub dir: Option<Arc<OwnedFd>>,
    /// Lookups the kernel has not forgotten yet.
    pub lookups: u64,
    /// For a non-directory whose last known name was removed while the kernel still
    /// holds it (a fifo or socket opened outside FUSE, say), an `O_PATH` fd of it, so
    /// `fstat` and `fchmod` through the kernel's inode keep working.
    pub kept: Option<Arc<OwnedFd>>,
}

/// The table of nodes, the index of known directory entries and of backing files.
pub struct Table {
    nodes: HashMap<u64, Node>,
    /// Ordered by directory, so a directory's names are one range of it.
    entries: BTreeMap<(u64, OsString), u64>,
    by_key: HashMap<Key, u64>,
    next_private: u64,
}

impl Table {
    /// A table holding only the root, whose directory fd is `root`.
    pub fn new(root: Arc<OwnedFd>, key: Key) -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                key,
                kind: libc::S_IFDIR,
                links: Vec::new(),
                dir: Some(root),
                lookups: 1,
                kept: None,
            },
        );
        let mut by_key = HashMap::new();
        by_key.insert(key, ROOT);
        Table {
            nodes,
            entries: BTreeMap::new(),
            by_key,
            next_private: PRIVATE_BASE,
        }
    }

    /// The node for `ino`.
    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(&ino)
    }

    /// The inode already known for a backing file, if any.
    pub fn by_key(&self, key: Key) -> Option<u64> {
        self.by_key.get(&key).copied()
    }

    /// The inode known under `name` in `parent`, if any.
    pub fn entry(&self, parent: u64, name: &OsStr) -> Option<u64> {
        self.entries.get(&(parent, name.to_owned())).copied()
    }

    /// Records one kernel lookup of the backing file `key` under (`parent`, `name`) and
    /// returns its inode number. `dir` is the directory's `O_PATH` fd, needed only when
    /// the node is new.
    pub fn remember(
        &mut self,
        parent: u64,
        name: &OsStr,
        key: Key,
        kind: u32,
        dir: Option<Arc<OwnedFd>>,
    ) -> u64 {
        // The entry may still point at a file that was replaced underneath.
        if let Some(old) = self.entry(parent, name) {
            if self.nodes.get(&old).map(|n| n.key) != Some(key) {
                self.drop_link(parent, name);
            }
        }
        let ino = match self.by_key.get(&key) {
            Some(&ino) => ino,
            None => {
                let ino = self.allocate(key.1);
                self.nodes.insert(
                    ino,
                    Node {
                        key,
                        kind,
                        links: Vec::new(),
                        dir,
                        lookups: 0,
                        kept: None,
                    },
                );
                self.by_key.insert(key, ino);
                ino
            }
        };
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups += 1;
            let link = (parent, name.to_owned());
            if !node.links.contains(&link) {
                node.links.push(link.clone());
            }
            self.entries.insert(link, ino);
        }
        ino
    }

    fn allocate(&mut self, backing: u64) -> u64 {
        if backing != ROOT
            && backing != 0
            && backing < PRIVATE_BASE
            && !self.nodes.contains_key(&backing)
        {
            return backing;
        }
        loop {
            let ino = self.next_private;
            self.next_private += 1;
            if !self.nodes.contains_key(&ino) {
                return ino;
            }
        }
    }

    /// Forgets the name (`parent`, `name`); a file left with no names is no longer
    /// found by its backing file (the number may be reused by a new file). A directory
    /// is: its fd pins the backing directory, whose number therefore goes to no other,
    /// and a lookup of its new name (renamed behind the mount) must give this inode,
    /// through which the kernel still reaches what it holds below it.
    pub fn drop_link(&mut self, parent: u64, name: &OsStr) -> Option<u64> {
        let link = (parent, name.to_owned());
        let ino = self.entries.remove(&link)?;
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.links.retain(|l| l != &link);
            if node.links.is_empty()
                && node.dir.is_none()
                && self.by_key.get(&node.key) == Some(&ino)
            {
                self.by_key.remove(&node.key);
            }
        }
        Some(ino)
    }

    /// Keeps `fd` for `ino` if it has no names left (see [`Node::kept`]). The node is
    /// found by its backing file again: the fd pins that file, so its number cannot go
    /// to another one, and a name of it the kernel did not know (a hard link looked
    /// up later) must be this inode, not a second one beside it (whose cache and
    /// attributes this one's writes would leave stale, and whose writes would be
    /// recorded under no name).
    pub fn keep(&mut self, ino: u64, fd: OwnedFd) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            if node.links.is_empty() && node.dir.is_none() {
                node.kept = Some(Arc::new(fd));
                self.by_key.entry(node.key).or_insert(ino);
            }
        }
    }

    /// Moves the name (`op`, `on`) to (`np`, `nn`), as a rename does; `exchange` swaps
    /// the two names instead.
    pub fn rename(&mut self, op: u64, on: &OsStr, np: u64, nn: &OsStr, exchange: bool) {
        let moved = self.entries.remove(&(op, on.to_owned()));
        let target = if exchange {
            self.entries.remove(&(np, nn.to_owned()))
        } else {
            self.drop_link(np, nn);
            None
        };
        if let Some(ino) = moved {
            self.relink(ino, (op, on.to_owned()), (np, nn.to_owned()));
        }
        if let Some(ino) = target {
            self.relink(ino, (np, nn.to_owned()), (op, on.to_owned()));
        }
    }

    fn relink(&mut self, ino: u64, from: (u64, OsString), to: (u64, OsString)) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            match node.links.iter_mut().find(|l| **l == from) {
                Some(l) => *l = to.clone(),
                None => node.links.push(to.clone()),
            }
            self.entries.insert(to, ino);
        }
    }

    /// Takes back `n` lookups; a node with none left is removed. Returns whether it was.
    pub fn forget(&mut self, ino: u64, n: u64) -> bool {
        if ino == ROOT {
            return false;
        }
        let Some(node) = self.nodes.get_mut(&ino) else {
            return false;
        };
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups > 0 {
            return false;
        }
        if let Some(node) = self.nodes.remove(&ino) {
            for link in node.links {
                if self.entries.get(&link) == Some(&ino) {
                    self.entries.remove(&link);
                }
            }
            if self.by_key.get(&node.key) == Some(&ino) {
                self.by_key.remove(&node.key);
            }
            if node.kind == libc::S_IFDIR {
                self.drop_links_in(ino);
            }
        }
        true
    }

    /// Drops the names known in the directory `dir`, which the kernel has forgotten.
    /// It forgets a directory only once it holds no entry below it, but a file with
    /// hard links can still be held through a name in another directory, and must not
    /// be addressed through this one. The files keep their backing keys: their names
    /// here still exist, and a new lookup finds the same inode.
    fn drop_links_in(&mut self, dir: u64) {
        let here: Vec<(u64, OsString)> = self
            .entries
            .range((dir, OsString::new())..)
            .take_while(|((parent, _), _)| *parent == dir)
            .map(|(link, _)| link.clone())
            .collect();
        let mut children = Vec::with_capacity(here.len());
        for link in here {
            if let Some(child) = self.entries.remove(&link) {
                children.push((child, link.1));
            }
        }
        for (child, name) in children {
            if let Some(node) = self.nodes.get_mut(&child) {
                node.links.retain(|(p, n)| !(*p == dir && *n == name));
            }
        }
    }

    /// The name `ino` is reached by: its first whose parent the table still holds.
    pub fn link(&self, ino: u64) -> Option<&(u64, OsString)> {
        self.nodes
            .get(&ino)?
            .links
            .iter()
            .find(|(parent, _)| self.nodes.contains_key(parent))
    }

    /// The path of `ino` relative to the root, through its first known name that
    /// leads there (a directory renamed behind the mount leaves a name below its old,
    /// nameless inode); `None` when it has none left (removed) or no ancestor is known.
    pub fn path(&self, ino: u64) -> Option<PathBuf> {
        let mut parts: Vec<&OsStr> = Vec::new();
        // (Stale names could make a loop, or many ways: the walk is bounded.)
        let mut steps = 1 << 16;
        self.path_into(ino, &mut parts, &mut steps)
            .then(|| parts.iter().rev().collect())
    }

    /// Pushes the names from `ino` up to the root (last first); whether they reach it.
    fn path_into<'a>(&'a self, ino: u64, parts: &mut Vec<&'a OsStr>, steps: &mut u32) -> bool {
        if ino == ROOT {
            return true;
        }
        if parts.len() > 4096 || *steps == 0 {
            return false;
        }
        *steps -= 1;
        let Some(node) = self.nodes.get(&ino) else {
            return false;
        };
        for (parent, name) in &node.links {
            parts.push(name);
            if self.path_into(*parent, parts, steps) {
                return true;
            }
            parts.pop();
        }
        false
    }

    /// How many inodes the kernel currently holds (for status).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: the root is never removed.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        let fd = crate::sys::open_dir_path(std::path::Path::new("/")).unwrap();
        Table::new(Arc::new(fd), (1, 2))
    }

    #[test]
    fn paths_follow_renames_of_ancestors() {
        let mut t = table();
        let d = t.remember(ROOT, OsStr::new("d"), (1, 10), libc::S_IFDIR, None);
        let f = t.remember(d, OsStr::new("f"), (1, 11), libc::S_IFREG, None);
        assert_eq!(d, 10);
        assert_eq!(t.path(f).unwrap(), PathBuf::from("d/f"));
        t.rename(ROOT, OsStr::new("d"), ROOT, OsStr::new("e"), false);
        assert_eq!(t.path(f).unwrap(), PathBuf::from("e/f"));
        assert_eq!(t.entry(ROOT, OsStr::new("d")), None);
    }

    #[test]
    fn reused_backing_number_gets_a_private_inode() {
        let mut t = table();
        let a = t.remember(ROOT, OsStr::new("a"), (1, 20), libc::S_IFREG, None);
        t.drop_link(ROOT, OsStr::new("a"));
        let b = t.remember(ROOT, OsStr::new("b"), (1, 20), libc::S_IFREG, None);
        assert_ne!(a, b);
        assert!(b >= PRIVATE_BASE);
        assert!(t.forget(a, 1));
        assert!(t.path(b).is_some());
    }

    #[test]
    fn exchange_swaps_names_and_replace_drops_target() {
        let mut t = table();
        let a = t.remember(ROOT, OsStr::new("a"), (1, 30), libc::S_IFREG, None);
        let b = t.remember(ROOT, OsStr::new("b"), (1, 31), libc::S_IFREG, None);
        t.rename(ROOT, OsStr::new("a"), ROOT, OsStr::new("b"), true);
        assert_eq!(t.path(a).unwrap(), PathBuf::from("b"));
        assert_eq!(t.path(b).unwrap(), PathBuf::from("a"));
        t.rename(ROOT, OsStr::new("a"), ROOT, OsStr::new("b"), false);
        assert_eq!(t.path(b).unwrap(), PathBuf::from("b"));
        assert_eq!(t.path(a), None);
        assert_eq!(t.by_key((1, 30)), None);
    }

    #[test]
    fn a_hard_link_is_reached_through_a_directory_still_known() {
        let mut t = table();
        let a = t.remember(ROOT, OsStr::new("a"), (1, 40), libc::S_IFDIR, None);
        let b = t.remember(ROOT, OsStr::new("b"), (1, 41), libc::S_IFDIR, None);
        let f = t.remember(a, OsStr::new("f"), (1, 42), libc::S_IFREG, None);
        assert_eq!(
            t.remember(b, OsStr::new("f"), (1, 42), libc::S_IFREG, None),
            f
        );
        assert_eq!(t.path(f).unwrap(), PathBuf::from("a/f"));
        // The kernel dropped a/f and then a; it still holds f through b/f.
        assert!(t.forget(a, 1));
        assert_eq!(t.path(f).unwrap(), PathBuf::from("b/f"));
        assert_eq!(t.link(f), Some(&(b, OsString::from("f"))));
        assert_eq!(t.get(f).unwrap().links.len(), 1, "the dead link is gone");
        assert_eq!(t.entry(a, OsStr::new("f")), None);
        assert_eq!(t.by_key((1, 42)), Some(f), "f keeps its number");
        // Found again through a new a: the same inode, two names again.
        let a2 = t.remember(ROOT, OsStr::new("a"), (1, 40), libc::S_IFDIR, None);
        assert_eq!(
            t.remember(a2, OsStr::new("f"), (1, 42), libc::S_IFREG, None),
            f
        );
        assert_eq!(t.get(f).unwrap().links.len(), 2);
    }
}
