//! Mounting a volume in place: the FUSE session on top of the directory the volume
//! already holds an fd of, cache invalidation, and a bounded unmount.

use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use fuser::{BackgroundSession, Config, INodeNo, Notifier, Session, SessionACL};

use crate::fuse::FuseAdapter;
use crate::volume::Volume;
use crate::watchdog::{MountIdentity, Watchdog, WatchdogCommand};

/// How a volume is mounted.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Name shown as the source in /proc/mounts (`twinfs:<name>`).
    pub name: String,
    /// Ask the kernel for FUSE passthrough (needs Linux 6.9+ and root).
    pub passthrough: bool,
    /// Threads serving FUSE requests.
    pub threads: usize,
    /// The watchdog that detaches the mount if this process dies without unmounting
    /// it (see [`crate::watchdog`]). Without one, such a mount stays, answering
    /// ENOTCONN, until someone unmounts it.
    pub watchdog: Option<WatchdogCommand>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            name: "volume".into(),
            passthrough: true,
            threads: 4,
            watchdog: None,
        }
    }
}

/// A mounted volume; unmounts when dropped.
pub struct Mounted {
    volume: Arc<Volume>,
    mountpoint: PathBuf,
    /// Which mount this is: the unmount takes off only that one.
    identity: Option<MountIdentity>,
    notifier: Notifier,
    session: Option<BackgroundSession>,
    watchdog: Option<Watchdog>,
}

impl Mounted {
    /// Mounts `volume` on top of its own directory. The volume's fd was opened before,
    /// so it keeps serving the files underneath.
    ///
    /// twinfs makes the mount itself (`mount(2)`: it runs as root) and hands the
    /// /dev/fuse fd to fuser, so neither fusermount3 nor fuser ever unmounts anything:
    /// - fusermount3's `auto_unmount` sometimes leaves a dead daemon's mount behind
    ///   (see [`crate::watchdog`], which does that job instead);
    /// - fuser, when a session it mounted ends, unmounts the mount point by path
    ///   whether or not its mount is still there (0.18 reads a dead connection's
    ///   POLLERR as "still mounted"), so after a lazy detach it would unmount
    ///   whatever is mounted there now: the volume directory may be the mount point
    ///   of a filesystem of its own.
    pub fn mount(volume: Arc<Volume>, options: &MountOptions) -> io::Result<Mounted> {
        crate::sys::raise_fd_limit();
        let mountpoint = volume.path().to_owned();
        let device = crate::sys::mount_fuse(&mountpoint, &format!("twinfs:{}", options.name))?;
        // The mount just made, whatever happens at its path from now on.
        let root = crate::sys::open_dir_path(&mountpoint).inspect_err(|_| {
            let _ = crate::sys::umount(&mountpoint, true);
        })?;
        let mut config = Config::default();
        config.n_threads = Some(options.threads.max(1));
        config.clone_fd = true;
        let adapter = FuseAdapter::new(volume.clone(), options.passthrough);
        let notifier_slot = adapter.notifier_slot();
        let session = Session::from_fd(adapter, device, SessionACL::All, config)
            // Before the first request is served.
            .inspect(|session| {
                let _ = notifier_slot.set(session.notifier());
            })
            .and_then(Session::spawn)
            .inspect_err(|_| {
                let _ = crate::watchdog::detach(root.as_fd());
            })?;
        let notifier = session.notifier();
        let identity = MountIdentity::of(root.as_fd());
        let mut mounted = Mounted {
            volume,
            mountpoint,
            identity: identity.as_ref().ok().copied(),
            notifier,
            session: Some(session),
            watchdog: None,
        };
        if let Some(command) = &options.watchdog {
            // Dropped on error, `mounted` unmounts.
            let started = identity
                .and_then(|identity| Watchdog::start(command, &mounted.mountpoint, identity));
            mounted.watchdog = Some(started.map_err(|e| {
                io::Error::new(e.kind(), format!("cannot start the mount's watchdog: {e}"))
            })?);
        }
        Ok(mounted)
    }

    /// The volume being served.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Tells the kernel that `path` (relative to the volume root) changed underneath,
    /// so the next access sees the directory as it is now. Used after the standby
    /// applies a change through the volume's fd.
    pub fn invalidate(&self, path: &Path) -> io::Result<()> {
        self.invalidator().invalidate(path)
    }

    /// A handle that invalidates paths of this mount from another thread or task.
    pub fn invalidator(&self) -> Invalidator {
        Invalidator {
            volume: self.volume.clone(),
            notifier: self.notifier.clone(),
        }
    }

    /// Unmounts and waits up to `timeout` for the session to end; a session still held
    /// by open files after that is left to end when the process exits.
    pub fn unmount(mut self, timeout: Duration) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        // The watchdog only cleans up after a dead daemon; a live one unmounts itself.
        // A busy mount is detached and goes away with its last user.
        if self.ours_at_mountpoint() {
            if let Err(e) = crate::sys::umount(&self.mountpoint, false) {
                tracing::warn!(path = %self.mountpoint.display(), error = %e,
                    "mount busy; detaching it lazily");
                crate::sys::umount(&self.mountpoint, true)?;
            }
        }
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.release();
        }
        // The session ends once nothing holds the unmounted filesystem any more.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(session.join());
        });
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{}: session still busy after unmount (files open?)",
                    self.mountpoint.display()
                ),
            )),
        }
    }
}

impl Mounted {
    /// Whether this mount is what the mount point leads to now. Someone may have
    /// unmounted it (`umount`, `fusermount3 -u`) or mounted something on top since:
    /// an unmount by path would then take off whatever is there, such as the
    /// filesystem the volume directory is the mount point of. (Without an identity,
    /// taken at the mount, it cannot tell, and says yes.)
    fn ours_at_mountpoint(&self) -> bool {
        let Some(ours) = self.identity else {
            return true;
        };
        match MountIdentity::of_path(&self.mountpoint) {
            Ok((_, now)) if now == ours => true,
            found => {
                tracing::warn!(path = %self.mountpoint.display(), found = ?found.map(|(_, id)| id),
                    ours = ?ours, "the volume's mount is no longer what its path leads to; \
                     leaving what is mounted there alone");
                false
            }
        }
    }

    /// Whether the volume's path leads to this mount now (the mount point followed
    /// through symlinks, without asking the filesystem); `None` where the kernel gives
    /// no mount identity to tell.
    pub fn in_place(&self) -> Option<bool> {
        let ours = self.identity?;
        Some(MountIdentity::of_path(&self.mountpoint).is_ok_and(|(_, now)| now == ours))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let ours = self.ours_at_mountpoint();
            if ours {
                let _ = crate::sys::umount(&self.mountpoint, true);
            }
            if let Some(watchdog) = self.watchdog.take() {
                watchdog.release();
            }
            if ours {
                let _ = session.join();
            } else {
                // Still mounted out of reach (covered): its session may never end.
                std::thread::spawn(move || session.join());
            }
        }
    }
}

/// Invalidates the kernel's caches for paths of one mounted volume (cheap to clone).
#[derive(Clone)]
pub struct Invalidator {
    volume: Arc<Volume>,
    notifier: Notifier,
}

impl Invalidator {
    /// Tells the kernel that the bytes `ranges` (offset, length) of the file at `path`
    /// and its attributes changed underneath, the file itself staying the same inode
    /// (an in-place update): only those pages of its cache are dropped.
    pub fn invalidate_ranges(&self, path: &Path, ranges: &[(u64, u64)]) -> io::Result<()> {
        let Some((_, ino)) = self.volume.ino_of(path) else {
            // The kernel does not hold it, so it caches nothing of it.
            return Ok(());
        };
        // A negative offset: the attributes only.
        self.notifier.inval_inode(INodeNo(ino), -1, 0)?;
        for &(offset, len) in ranges {
            let offset = i64::try_from(offset).unwrap_or(i64::MAX);
            let len = i64::try_from(len).unwrap_or(i64::MAX);
            self.notifier.inval_inode(INodeNo(ino), offset, len)?;
        }
        Ok(())
    }

    /// See [`Mounted::invalidate`].
    pub fn invalidate(&self, path: &Path) -> io::Result<()> {
        let Some(name) = path.file_name() else {
            return self.notifier.inval_inode(INodeNo::ROOT, 0, 0);
        };
        let parent_path = path.parent().unwrap_or(Path::new(""));
        let Some((_, parent)) = self.volume.ino_of(parent_path) else {
            // The kernel does not hold the parent, so it caches nothing below it.
            return Ok(());
        };
        let known = self.volume.entry_state(parent, name);
        let told = self
            .notifier
            .inval_entry(INodeNo(parent), name)
            .and_then(|()| self.notifier.inval_inode(INodeNo(parent), 0, 0))
            .and_then(|()| match known {
                Some((child, _)) => self.notifier.inval_inode(INodeNo(child), 0, 0),
                None => Ok(()),
            });
        // Only once the kernel has forgotten the entry: an operation it sent on the
        // old entry before that still finds the name (forgetting the name first
        // failed such an open with ENOENT).
        if let Some((child, true)) = known {
            self.volume.drop_stale_entry(parent, name, child);
        }
        told
    }
}
