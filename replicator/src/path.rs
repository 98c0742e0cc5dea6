//! Paths inside a volume as they travel between nodes: relative, `/`-separated bytes,
//! never absolute, never `.`/`..`/empty components, never a NUL. Everything a peer
//! sends is parsed into a [`RelPath`] first, so a path that would escape the volume
//! is refused before anything touches the disk.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The longest path accepted (Linux's `PATH_MAX`).
pub const MAX_PATH: usize = 4096;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Starts with `/`.
    #[error("absolute path {0:?}")]
    Absolute(String),
    /// Has a `..` component.
    #[error("path {0:?} climbs out with ..")]
    Parent(String),
    /// Has an empty or `.` component (`a//b`, `a/./b`, trailing `/`).
    #[error("path {0:?} has an empty or '.' component")]
    EmptyComponent(String),
    /// Contains a NUL byte.
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    /// Longer than [`MAX_PATH`].
    #[error("path of {0} bytes is longer than {MAX_PATH}")]
    TooLong(usize),
}

/// A validated path relative to a volume root. The empty path is the root itself.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct RelPath(Vec<u8>);

impl RelPath {
    /// The volume root.
    pub fn root() -> RelPath {
        RelPath(Vec::new())
    }

    /// Validates `bytes` as a relative path.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<RelPath, PathError> {
        let bytes = bytes.into();
        let show = || String::from_utf8_lossy(&bytes).into_owned();
        if bytes.len() > MAX_PATH {
            return Err(PathError::TooLong(bytes.len()));
        }
        if bytes.is_empty() {
            return Ok(RelPath(bytes));
        }
        if bytes.contains(&0) {
            return Err(PathError::Nul(show()));
        }
        if bytes[0] == b'/' {
            return Err(PathError::Absolute(show()));
        }
        for part in bytes.split(|&b| b == b'/') {
            match part {
                b".." => return Err(PathError::Parent(show())),
                b"" | b"." => return Err(PathError::EmptyComponent(show())),
                _ => {}
            }
        }
        Ok(RelPath(bytes))
    }

    /// From a path as the volume reports it (relative, already clean).
    pub fn from_path(path: &Path) -> Result<RelPath, PathError> {
        RelPath::new(path.as_os_str().as_bytes())
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// As a `Path` (relative).
    pub fn as_path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.0))
    }

    /// Whether this is the root.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The components, in order.
    pub fn components(&self) -> impl Iterator<Item = &OsStr> {
        self.0
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .map(OsStr::from_bytes)
    }

    /// The parent directory and the last component; `None` for the root.
    pub fn split_last(&self) -> Option<(RelPath, &OsStr)> {
        if self.0.is_empty() {
            return None;
        }
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => Some((
                RelPath(self.0[..i].to_vec()),
                OsStr::from_bytes(&self.0[i + 1..]),
            )),
            None => Some((RelPath::root(), OsStr::from_bytes(&self.0))),
        }
    }

    /// `self/name`; `name` must be one valid component.
    pub fn join(&self, name: &OsStr) -> Result<RelPath, PathError> {
        // Sized exactly: a manifest holds one per entry.
        let mut bytes = Vec::with_capacity(self.0.len() + 1 + name.len());
        bytes.extend_from_slice(&self.0);
        if !bytes.is_empty() {
            bytes.push(b'/');
        }
        bytes.extend_from_slice(name.as_bytes());
        RelPath::new(bytes)
    }

    /// Whether `self` is `other` or below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        other.0.is_empty()
            || (self.0.starts_with(&other.0)
                && (self.0.len() == other.0.len() || self.0[other.0.len()] == b'/'))
    }

    /// Where `self` is once `from` is renamed to `to`; `None` if `self` is neither
    /// `from` nor below it (or would be longer than a path may be).
    pub fn renamed(&self, from: &RelPath, to: &RelPath) -> Option<RelPath> {
        if from.is_root() || !self.starts_with(from) {
            return None;
        }
        let mut bytes = to.0.clone();
        bytes.extend_from_slice(&self.0[from.0.len()..]);
        RelPath::new(bytes).ok()
    }
}

/// A collection keyed by path whose entries [`rename_in`] moves along with renames: a
/// set of paths, or a map from paths to what is known of each.
pub trait PathKeyed {
    /// What an entry holds besides its path (nothing, for a set).
    type Value;
    /// Whether it has no entry.
    fn no_entries(&self) -> bool;
    /// Its paths, in order.
    fn paths(&self) -> impl Iterator<Item = &RelPath>;
    /// Removes the entry of `path`, giving back what it held.
    fn take(&mut self, path: &RelPath) -> Option<Self::Value>;
    /// Adds (or replaces) the entry of `path`.
    fn put(&mut self, path: RelPath, value: Self::Value);
    /// Removes the entries at or below `path`.
    fn drop_at_or_below(&mut self, path: &RelPath);
}

impl PathKeyed for std::collections::BTreeSet<RelPath> {
    type Value = ();
    fn no_entries(&self) -> bool {
        self.is_empty()
    }
    fn paths(&self) -> impl Iterator<Item = &RelPath> {
        self.iter()
    }
    fn take(&mut self, path: &RelPath) -> Option<()> {
        self.remove(path).then_some(())
    }
    fn put(&mut self, path: RelPath, (): ()) {
        self.insert(path);
    }
    fn drop_at_or_below(&mut self, path: &RelPath) {
        self.retain(|p| !p.starts_with(path));
    }
}

impl<V> PathKeyed for std::collections::BTreeMap<RelPath, V> {
    type Value = V;
    fn no_entries(&self) -> bool {
        self.is_empty()
    }
    fn paths(&self) -> impl Iterator<Item = &RelPath> {
        self.keys()
    }
    fn take(&mut self, path: &RelPath) -> Option<V> {
        self.remove(path)
    }
    fn put(&mut self, path: RelPath, value: V) {
        self.insert(path, value);
    }
    fn drop_at_or_below(&mut self, path: &RelPath) {
        self.retain(|p, _| !p.starts_with(path));
    }
}

/// Follows a rename (or, with `exchange`, an exchange) of `from` to `to` in a set of
/// paths (or a map keyed by them): those at or below `from` move below `to` (and, for
/// an exchange, those below `to` below `from`), with what they hold. With `replace`
/// and no exchange, those at or below `to` are dropped first: the rename replaced
/// what was there.
pub fn rename_in<S: PathKeyed>(
    set: &mut S,
    from: &RelPath,
    to: &RelPath,
    exchange: bool,
    replace: bool,
) {
    if set.no_entries() {
        return;
    }
    let moved: Vec<(RelPath, RelPath)> = set
        .paths()
        .filter_map(|p| {
            p.renamed(from, to)
                .or_else(|| exchange.then(|| p.renamed(to, from)).flatten())
                .map(|new| (p.clone(), new))
        })
        .collect();
    let moved: Vec<(RelPath, S::Value)> = moved
        .into_iter()
        .filter_map(|(old, new)| set.take(&old).map(|value| (new, value)))
        .collect();
    if replace && !exchange {
        set.drop_at_or_below(to);
    }
    for (new, value) in moved {
        set.put(new, value);
    }
}

impl<'de> Deserialize<'de> for RelPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = <Vec<u8>>::deserialize(d)?;
        RelPath::new(bytes).map_err(serde::de::Error::custom)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_relative_paths() {
        for p in [
            "",
            "a",
            "a/b",
            "ssh/id_rsa.pub",
            "..a",
            "a..",
            "a/.b",
            "é/ü",
        ] {
            assert!(RelPath::new(p).is_ok(), "{p}");
        }
    }

    #[test]
    fn refuses_escapes_and_oddities() {
        assert!(matches!(
            RelPath::new("/etc/passwd"),
            Err(PathError::Absolute(_))
        ));
        assert!(matches!(RelPath::new(".."), Err(PathError::Parent(_))));
        assert!(matches!(
            RelPath::new("a/../../b"),
            Err(PathError::Parent(_))
        ));
        assert!(matches!(RelPath::new("a/.."), Err(PathError::Parent(_))));
        for p in ["a//b", "a/./b", "a/", ".", "./a"] {
            assert!(
                matches!(RelPath::new(p), Err(PathError::EmptyComponent(_))),
                "{p}"
            );
        }
        assert!(matches!(
            RelPath::new(b"a\0b".to_vec()),
            Err(PathError::Nul(_))
        ));
        assert!(matches!(
            RelPath::new(vec![b'a'; 5000]),
            Err(PathError::TooLong(5000))
        ));
    }

    #[test]
    fn deserializing_validates() {
        let bad = postcard::to_allocvec(&b"../x".to_vec()).expect("encode");
        assert!(postcard::from_bytes::<RelPath>(&bad).is_err());
        let good = postcard::to_allocvec(&RelPath::new("a/b").expect("valid")).expect("encode");
        assert_eq!(
            postcard::from_bytes::<RelPath>(&good).expect("decode"),
            RelPath::new("a/b").expect("valid")
        );
    }

    #[test]
    fn split_join_and_prefix() {
        let p = RelPath::new("a/b/c").expect("valid");
        let (parent, name) = p.split_last().expect("not root");
        assert_eq!(parent, RelPath::new("a/b").expect("valid"));
        assert_eq!(name, "c");
        assert_eq!(parent.join(name).expect("join"), p);
        assert!(p.starts_with(&RelPath::new("a").expect("valid")));
        assert!(!RelPath::new("ab")
            .expect("valid")
            .starts_with(&RelPath::new("a").expect("valid")));
        assert!(p.starts_with(&RelPath::root()));
        assert!(RelPath::root().split_last().is_none());
        assert!(RelPath::root().join(OsStr::new("..")).is_err());
    }

    #[test]
    fn renamed_moves_a_path_and_what_is_below_it() {
        let r = |s: &str| RelPath::new(s).expect("valid");
        assert_eq!(r("d").renamed(&r("d"), &r("e/f")), Some(r("e/f")));
        assert_eq!(r("d/x/y").renamed(&r("d"), &r("e")), Some(r("e/x/y")));
        assert_eq!(r("dx").renamed(&r("d"), &r("e")), None);
        assert_eq!(r("a").renamed(&r("d"), &r("e")), None);
    }

    #[test]
    fn rename_in_follows_renames_and_exchanges_in_a_set() {
        let r = |s: &str| RelPath::new(s).expect("valid");
        let set = |v: &[&str]| {
            v.iter()
                .map(|s| r(s))
                .collect::<std::collections::BTreeSet<_>>()
        };
        let mut s = set(&["d/x", "e/y", "q"]);
        super::rename_in(&mut s, &r("d"), &r("e"), false, true);
        assert_eq!(s, set(&["e/x", "q"]), "e/y was replaced");
        let mut s = set(&["d/x", "e/y"]);
        super::rename_in(&mut s, &r("d"), &r("e"), false, false);
        assert_eq!(s, set(&["e/x", "e/y"]));
        let mut s = set(&["d/x", "e/y", "d"]);
        super::rename_in(&mut s, &r("d"), &r("e"), true, true);
        assert_eq!(s, set(&["e/x", "d/y", "e"]));
    }

    #[test]
    fn rename_in_moves_what_a_map_holds_with_its_paths() {
        let r = |s: &str| RelPath::new(s).expect("valid");
        let map = |v: &[(&str, u32)]| {
            v.iter()
                .map(|(s, n)| (r(s), *n))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let mut m = map(&[("d/x", 1), ("e/y", 2), ("q", 3)]);
        super::rename_in(&mut m, &r("d"), &r("e"), false, true);
        assert_eq!(m, map(&[("e/x", 1), ("q", 3)]), "e/y was replaced");
        let mut m = map(&[("d/x", 1), ("e/y", 2), ("e", 4)]);
        super::rename_in(&mut m, &r("d"), &r("e"), true, true);
        assert_eq!(m, map(&[("e/x", 1), ("d/y", 2), ("d", 4)]));
    }
}
