//! A digest of a whole directory tree, to compare an active's volume with a standby's:
//! every path with its kind, mode, owner, size, mtime, content hash and symlink
//! target, and the volume root's mode and owner (under the empty name). Read through
//! the mount, as a user would.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What one path holds.
pub type Digest = BTreeMap<String, String>;

/// Walks `root` (not following symlinks) into a digest.
pub fn digest(root: &Path) -> Digest {
    let mut out = Digest::new();
    if let Ok(meta) = std::fs::metadata(root) {
        out.insert(String::new(), directory(&meta));
    }
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Digest) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let rel = path
            .strip_prefix(root)
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let ft = meta.file_type();
        let what = if ft.is_dir() {
            walk(root, &path, out);
            directory(&meta)
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path).unwrap_or_default();
            format!("link -> {}", target.display())
        } else if ft.is_file() {
            let data = std::fs::read(&path).unwrap_or_default();
            format!(
                "file {:o} {}:{} size {} mtime {}.{:09} xxh3 {:032x}",
                meta.mode() & 0o7777,
                meta.uid(),
                meta.gid(),
                meta.len(),
                meta.mtime(),
                meta.mtime_nsec(),
                xxhash_rust::xxh3::xxh3_128(&data)
            )
        } else {
            format!("special {:o} {:o}", meta.mode(), meta.rdev())
        };
        out.insert(rel, what);
    }
}

fn directory(meta: &std::fs::Metadata) -> String {
    format!(
        "dir {:o} {}:{}",
        meta.mode() & 0o7777,
        meta.uid(),
        meta.gid()
    )
}

/// The lines that differ between two digests.
pub fn difference(want: &Digest, got: &Digest) -> String {
    let mut out = String::new();
    for (k, v) in want {
        match got.get(k) {
            Some(g) if g == v => {}
            Some(g) => out.push_str(&format!("{k}: active {v}, standby {g}\n")),
            None => out.push_str(&format!("{k}: active {v}, standby has nothing\n")),
        }
    }
    for (k, g) in got {
        if !want.contains_key(k) {
            out.push_str(&format!("{k}: only on the standby: {g}\n"));
        }
    }
    out
}
