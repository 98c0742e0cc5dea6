//! Crash-safe file writes: after a crash or power cut a reader finds either
//! the old content or the new, never a mix or an empty file. Used for the state
//! files of the daemon (roles, identity) and of the replication (sync records,
//! conflict manifests).

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Replaces `path` with `bytes`, with permission bits `mode`: writes a
/// temporary file next to it, syncs it, renames it over `path` and syncs the
/// directory so that the rename itself survives a crash.
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    // Distinct per process and per call, so that concurrent writers of the
    // same file never share a temporary file.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))?;
    let dir = parent(path);
    let mut temp_name = OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let temp = dir.join(temp_name);
    let result = write_synced(&temp, bytes, mode).and_then(|()| fs::rename(&temp, path));
    if result.is_err() {
        // Best effort: the write already failed, and a leftover temporary file
        // is harmless apart from the space it takes.
        let _ = fs::remove_file(&temp);
    }
    result?;
    sync_dir(dir)
}

/// Writes `bytes` to `path` (created or truncated) with exactly the permission
/// bits `mode`, and syncs the file to disk. Not atomic on its own: use it for
/// files in a directory that nobody reads until it is complete.
pub fn write_synced(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    // `mode` above is filtered by the umask and ignored for an existing file;
    // a key file must end up with exactly the bits asked for.
    file.set_permissions(Permissions::from_mode(mode))?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Syncs the directory `dir`, making the creations, renames and removals of
/// its entries durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The directory holding `path`; `.` for a bare file name.
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Replaces `path` with `value` as JSON (mode 0644), as [`atomic_write`] does.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    let mut bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    atomic_write(path, &bytes, 0o644)
}

#[cfg(test)]
mod tests {
    #[test]
    fn writes_json_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/state.json");
        write_json(&path, &vec![1, 2, 3]).expect("write");
        write_json(&path, &vec![4]).expect("overwrite");
        let back: Vec<u32> = serde_json::from_slice(&fs::read(&path).expect("read")).expect("json");
        assert_eq!(back, vec![4]);
    }

    use super::*;

    #[test]
    fn replaces_content_and_sets_the_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        atomic_write(&path, b"one", 0o644).expect("first write");
        atomic_write(&path, b"two", 0o600).expect("second write");
        assert_eq!(fs::read(&path).expect("read"), b"two");
        let mode = fs::metadata(&path).expect("metadata").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["f"], "no temporary file is left behind");
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        atomic_write(&path, b"old", 0o644).expect("first write");
        // A directory in the way makes the rename fail.
        let blocked = dir.path().join("d");
        fs::create_dir(blocked.join("")).expect("mkdir");
        fs::write(blocked.join("x"), b"").expect("fill dir");
        assert!(atomic_write(&blocked, b"new", 0o644).is_err());
        assert_eq!(fs::read(&path).expect("read"), b"old");
        assert_eq!(fs::read_dir(dir.path()).expect("read_dir").count(), 2);
    }
}
