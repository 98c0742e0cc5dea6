//! The conflicts area: where a node that was fenced after a split brain keeps its own
//! versions of the files the winner's full sync overwrites or deletes, before they
//! go. Nothing in it is ever deleted by twinfs.
//!
//! Layout, under the state directory: `conflicts/VOLUME/EPOCH-TIMESTAMP/` holds the
//! files at their paths in the volume, and `MANIFEST.json` says what each one was.
//! A file `conflicts/VOLUME/PENDING` (with the epoch that fenced the node) marks that
//! the next full sync must keep what it replaces, so a restart in between does not
//! lose that.
//!
//! A standby whose upstream write (see [`crate::upstream`]) the active refused keeps
//! that write here too, in a set `refused-EPOCH-TIMESTAMP` (the active's epoch and the
//! time), with `what` = `"refused"`.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use twinfs_fs::sys;

use crate::apply::Applier;
use crate::path::RelPath;

/// The name of the marker file.
const PENDING: &str = "PENDING";

/// The name of each set's manifest.
pub const MANIFEST: &str = "MANIFEST.json";

/// One kept file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    /// Its path in the volume.
    pub path: String,
    /// What the winner's full sync did to it: `"replaced"` or `"deleted"`; or
    /// `"refused"`: the active refused this node's upstream write of it.
    pub what: String,
    /// Entries copied (more than 1 for a directory).
    pub entries: u64,
}

/// A set's manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The volume.
    pub volume: String,
    /// The epoch of the active that won.
    pub fenced_by_epoch: u64,
    /// When the node was fenced (seconds since the Unix epoch).
    pub at: u64,
    /// The files kept, in the order they were.
    pub kept: Vec<Kept>,
}

/// The conflicts area of one volume.
#[derive(Clone, Debug)]
pub struct Area {
    dir: PathBuf,
    volume: String,
}

impl Area {
    /// The area of `volume` under `state_dir`.
    pub fn new(state_dir: &Path, volume: &str) -> Area {
        Area {
            dir: state_dir.join("conflicts").join(volume),
            volume: volume.to_owned(),
        }
    }

    /// Where it is.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Marks that the next full sync must keep what it replaces: this node was fenced
    /// by `epoch` at `at`. Durable before it returns.
    /// Replaced whole (a crash or a full disk leaves the marker as it was).
    pub fn arm(&self, epoch: u64, at: u64) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        crate::durable::atomic_write(
            &self.dir.join(PENDING),
            format!("{epoch} {at}\n").as_bytes(),
            0o644,
        )
    }

    /// The armed marker: (epoch, time) of the fencing, if any. A marker that cannot
    /// be read whole still arms the area, for the time it was written (each incident
    /// keeps its own set, not one shared by every unreadable marker).
    pub fn armed(&self) -> Option<(u64, u64)> {
        let path = self.dir.join(PENDING);
        let text = match std::fs::read(&path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(_) => String::new(),
        };
        let mut parts = text.split_whitespace().map(str::parse::<u64>);
        match (parts.next(), parts.next()) {
            (Some(Ok(epoch)), Some(Ok(at))) => Some((epoch, at)),
            _ => {
                let written = std::fs::symlink_metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                Some((0, written))
            }
        }
    }

    /// The full sync after the fencing is through: nothing more to keep.
    pub fn disarm(&self) -> std::io::Result<()> {
        match std::fs::remove_file(self.dir.join(PENDING)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Keeps what is at `path` in the volume (through `applier`) before the winner's
    /// op `what` ("replaced" or "deleted") changes it. Nothing there: nothing kept.
    ///
    /// The set is written without following anything kept in it: a kept symlink (or
    /// file) where a directory of `path` would go is never entered; that directory is
    /// made beside it under a `.N` suffix instead, and listed so. What is kept already
    /// stays (a path touched twice by one full sync); a kept directory gets what it
    /// lacks (a directory deleted after some of its files were). What is below `path`
    /// and `skip` names (what the op leaves in place) is not kept.
    ///
    /// `Err` if it could not be kept whole and listed: the op must not be applied. A
    /// later try lists what an earlier one kept but could not list.
    pub fn keep(
        &self,
        applier: &Applier<'_>,
        path: &RelPath,
        what: &str,
        skip: &dyn Fn(&RelPath) -> bool,
    ) -> Result<u64, String> {
        // Kept only while keeping lasts, which its marker must say too (a restart then
        // keeps on keeping): one that could not be written when keeping began is
        // written now, or nothing is kept (and the op not applied).
        let (epoch, at) = match self.armed() {
            Some(armed) => armed,
            None => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                self.arm(0, now)
                    .map_err(|e| format!("{}: {e}", self.dir.join(PENDING).display()))?;
                (0, now)
            }
        };
        let set = self.dir.join(format!("{epoch}-{}", timestamp(at)));
        let (dir, mut kept_as, name) = enter_set(&set, path)?;
        kept_as.push(&name);
        let there = sys::statat(dir.as_fd(), &name).is_ok();
        let entries = applier
            .copy_out(path, dir.as_fd(), &name, skip)
            .map_err(|e| e.to_string())?;
        let kept_as = kept_as.to_string_lossy().into_owned();
        if entries == 0 {
            // Kept already: by an earlier try, whose listing may have failed (listed
            // now), or with a directory above it (listed as that). Or nothing there.
            let here = applier.exists(path).map_err(|e| e.to_string())?;
            if !there || !here || self.listed(&set, &kept_as) {
                return Ok(0);
            }
        }
        let entries = entries.max(1);
        if kept_as != path.to_string() {
            tracing::warn!(volume = %self.volume, %path, %kept_as,
                "a kept symlink or file is where a directory of this path would go: kept beside it");
        }
        self.list(
            &set,
            epoch,
            at,
            Kept {
                path: kept_as,
                what: what.to_owned(),
                entries,
            },
        )?;
        tracing::warn!(volume = %self.volume, %path, what, kept_in = %set.display(),
            "split brain: kept this node's version before the winner's full sync changed it");
        Ok(entries)
    }

    /// Keeps this standby's upstream write of `path` that the active of `epoch`
    /// refused at `at`: `content` is the file as the standby wrote it (`None` for a
    /// write with no content to keep: a deletion, a rename, a directory). Nothing is
    /// overwritten: a second refused version of a path in the same set gets a `.N`
    /// suffix.
    pub fn keep_refused(
        &self,
        epoch: u64,
        at: u64,
        path: &RelPath,
        content: Option<&[u8]>,
        reason: &str,
    ) -> Result<(), String> {
        // Apart from the sets of fencings: a fencing in the same second must not find
        // a path kept already in a set of refused writes.
        let set = self.dir.join(format!("refused-{epoch}-{}", timestamp(at)));
        let mut kept_as = path.to_string();
        if let Some(content) = content {
            // As `keep` does: nothing kept in the set is followed or overwritten; a
            // second version of a path gets `NAME.N`.
            let (dir, mut used_path, name) = enter_set(&set, path)?;
            let used = write_new(dir.as_fd(), &name, content)
                .map_err(|e| format!("{}: {e}", set.join(&used_path).join(&name).display()))?;
            used_path.push(used);
            kept_as = used_path.to_string_lossy().into_owned();
        }
        self.list(
            &set,
            epoch,
            at,
            Kept {
                path: kept_as,
                what: "refused".to_owned(),
                entries: u64::from(content.is_some()),
            },
        )?;
        tracing::warn!(volume = %self.volume, %path, %reason, kept_in = %set.display(),
            "the active refused this standby's write; kept this node's version");
        Ok(())
    }

    /// Whether the set's manifest lists `kept_as`, or a directory above it.
    fn listed(&self, set: &Path, kept_as: &str) -> bool {
        read_manifest(&set.join(MANIFEST)).is_some_and(|m| {
            m.kept.iter().any(|k| {
                kept_as
                    .strip_prefix(k.path.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
        })
    }

    /// Adds `kept` to the manifest of `set` (made for `epoch` and `at` if new).
    fn list(&self, set: &Path, epoch: u64, at: u64, kept: Kept) -> Result<(), String> {
        let manifest_path = set.join(MANIFEST);
        let mut manifest = read_manifest(&manifest_path).unwrap_or_else(|| Manifest {
            volume: self.volume.clone(),
            fenced_by_epoch: epoch,
            at,
            kept: Vec::new(),
        });
        manifest.kept.push(kept);
        write_manifest(&manifest_path, &manifest)
            .map_err(|e| format!("{}: {e}", manifest_path.display()))
    }

    /// Whether the area can be listed: one that does not exist yet can; one that
    /// exists but cannot be read is not "no conflicts" ([`Area::sets`] finds none).
    pub fn readable(&self) -> std::io::Result<()> {
        match std::fs::read_dir(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every set, oldest first (by its manifest's time, then name), with its manifest.
    pub fn sets(&self) -> Vec<(PathBuf, Manifest)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut sets: Vec<(PathBuf, Manifest)> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .filter_map(|p| read_manifest(&p.join(MANIFEST)).map(|m| (p, m)))
            .collect();
        sets.sort_by(|a, b| (a.1.at, &a.0).cmp(&(b.1.at, &b.0)));
        sets
    }

    /// How many files are kept, over all sets.
    pub fn count(&self) -> usize {
        self.sets().iter().map(|(_, m)| m.kept.len()).sum()
    }
}

/// Opens the directory `name` of `dir` in a set, making it (owner-only) if it is
/// missing, never through a symlink. Where something else is kept under that name, the
/// first of `name.2`, `name.3`, ... that is a directory or free is used instead.
/// Returns the directory and the name used.
/// Makes `set` if need be and the directories of `path`'s parent in it, never
/// entering anything kept there: a kept file or symlink where a directory would go
/// gets a `.N` directory beside it. Returns the parent directory, its path in the set
/// as used, and the name `path`'s last component takes there (see [`in_set`]).
fn enter_set(set: &Path, path: &RelPath) -> Result<(OwnedFd, PathBuf, OsString), String> {
    let Some((parent, name)) = path.split_last() else {
        return Err("cannot keep the volume root".to_owned());
    };
    if !set.is_dir() {
        std::fs::create_dir_all(set).map_err(|e| format!("{}: {e}", set.display()))?;
        // Durable before what is kept in it is relied on.
        if let Some(area) = set.parent() {
            std::fs::File::open(area)
                .and_then(|d| d.sync_all())
                .map_err(|e| format!("{}: {e}", area.display()))?;
        }
    }
    let mut dir = sys::open_dir_path(set).map_err(|e| format!("{}: {e}", set.display()))?;
    let mut used_path = PathBuf::new();
    for (i, component) in parent.components().enumerate() {
        let component = in_set(i, component);
        let (sub, used) = enter_or_make(dir.as_fd(), &component)
            .map_err(|e| format!("{}: {e}", set.join(&used_path).join(&component).display()))?;
        dir = sub;
        used_path.push(used);
    }
    Ok((dir, used_path, in_set(parent.components().count(), name)))
}

/// The name in a set of the component at `depth` of a kept path: the set's own
/// `MANIFEST.json` is not the volume's, so at the top `MANIFEST.json`,
/// `MANIFEST.json.kept`, ... each get one more `.kept` (distinct names stay distinct).
fn in_set(depth: usize, name: &OsStr) -> OsString {
    let mut rest = name.as_bytes();
    if depth == 0 {
        if let Some(r) = rest.strip_prefix(MANIFEST.as_bytes()) {
            rest = r;
            while let Some(r) = rest.strip_prefix(b".kept") {
                rest = r;
            }
            if rest.is_empty() {
                let mut escaped = name.to_owned();
                escaped.push(".kept");
                return escaped;
            }
        }
    }
    name.to_owned()
}

fn enter_or_make(dir: BorrowedFd<'_>, name: &OsStr) -> std::io::Result<(OwnedFd, OsString)> {
    let mut used = name.to_owned();
    for n in 2u32.. {
        match sys::mkdirat(dir, &used, 0o700) {
            // Durable before what is kept in it is relied on.
            Ok(()) => sys::fsync_dir(dir)?,
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        // O_NOFOLLOW (always, in `sys::openat`): ELOOP or ENOTDIR for a symlink.
        match sys::openat(dir, &used, libc::O_PATH | libc::O_DIRECTORY, 0) {
            Ok(fd) => return Ok((fd, used)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                used = name.to_owned();
                used.push(format!(".{n}"));
            }
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
}

/// Writes `content` into `dir` as a new owner-only file `name`, or `name.N` if that
/// is taken (by anything: nothing is replaced or followed). Whole or not at all: a
/// temporary file, synced, renamed in without replacing, then the directory synced.
/// Returns the name used.
fn write_new(dir: BorrowedFd<'_>, name: &OsStr, content: &[u8]) -> std::io::Result<OsString> {
    let (temp, fd) = crate::apply::keep_temp(dir, name)?;
    let written = (|| {
        let mut file = std::fs::File::from(fd);
        file.write_all(content)?;
        file.sync_all()?;
        let mut used = name.to_owned();
        for n in 2u32.. {
            match sys::rename_noreplace(dir, &temp, &used) {
                Ok(()) => return Ok(used),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    used = name.to_owned();
                    used.push(format!(".{n}"));
                }
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
    })();
    match written {
        Ok(used) => {
            sys::fsync_dir(dir)?;
            Ok(used)
        }
        Err(e) => {
            // Best effort: the write already failed.
            let _ = sys::unlinkat(dir, &temp, 0);
            Err(e)
        }
    }
}

fn read_manifest(path: &Path) -> Option<Manifest> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn write_manifest(path: &Path, manifest: &Manifest) -> std::io::Result<()> {
    crate::durable::write_json(path, manifest)
}

/// `YYYYMMDDTHHMMSSZ` for seconds since the Unix epoch (UTC).
fn timestamp(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_area_that_cannot_be_read_is_not_taken_for_an_empty_one() {
        let state = tempfile::tempdir().expect("tempdir");
        let area = Area::new(state.path(), "vol");
        assert!(area.readable().is_ok(), "not made yet: nothing kept");
        std::fs::create_dir(state.path().join("conflicts")).expect("mkdir");
        std::fs::write(area.dir(), "not a directory").expect("write");
        assert!(area.readable().is_err());
        assert!(area.sets().is_empty());
    }

    /// A marker left empty or garbled (by a crash of an earlier version, say) arms the
    /// area for the time it was written, not for a time shared by every such marker.
    #[test]
    fn a_marker_that_cannot_be_read_arms_for_the_time_it_was_written() {
        let state = tempfile::tempdir().expect("tempdir");
        let area = Area::new(state.path(), "vol");
        assert_eq!(area.armed(), None);
        area.arm(7, 1234).expect("arm");
        assert_eq!(area.armed(), Some((7, 1234)));
        for garbled in ["", "7", "x y\n"] {
            std::fs::write(area.dir().join(PENDING), garbled).expect("write");
            let (epoch, at) = area.armed().expect("armed");
            assert_eq!(epoch, 0);
            assert!(at > 1_700_000_000, "{garbled:?}: {at}");
        }
        area.disarm().expect("disarm");
        assert_eq!(area.armed(), None);
    }

    #[test]
    fn timestamps_are_utc_calendar_times() {
        assert_eq!(timestamp(0), "19700101T000000Z");
        assert_eq!(timestamp(951_782_400), "20000229T000000Z");
        assert_eq!(timestamp(1_795_463_482), "20261123T195122Z");
    }

    #[test]
    fn only_the_manifest_family_is_renamed_and_only_at_the_top() {
        let name = |depth, n: &str| in_set(depth, OsStr::new(n)).into_string().expect("utf-8");
        assert_eq!(name(0, "MANIFEST.json"), "MANIFEST.json.kept");
        assert_eq!(name(0, "MANIFEST.json.kept"), "MANIFEST.json.kept.kept");
        assert_eq!(name(0, "MANIFEST.json.2"), "MANIFEST.json.2");
        assert_eq!(name(0, "MANIFEST.jsonx"), "MANIFEST.jsonx");
        assert_eq!(name(0, "hosts"), "hosts");
        assert_eq!(name(1, "MANIFEST.json"), "MANIFEST.json");
    }
}
