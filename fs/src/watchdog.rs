//! A daemon that dies without unmounting (killed, crashed) does not leave its volume's
//! directory answering "Transport endpoint is not connected".
//!
//! - The watchdog, a small process started with each mount ([`Watchdog::start`], run
//!   by [`watch`]), waits for its daemon to be gone and then detaches the mount if it
//!   is still there.
//! - A daemon that finds a dead twinfs mount on its volume's path (its daemon and
//!   watchdog were killed together) detaches it before mounting
//!   ([`clear_dead_mount`]).
//!
//! fusermount3's `auto_unmount` is not enough: after the daemon's end it unmounts only
//! when opening the mount already fails with ENOTCONN, and a daemon still closing its
//! /dev/fuse fds at that moment (its socket to fusermount3 was closed first) makes
//! that check fail, so the dead mount stays for good. The watchdog does not ask the
//! mount: its daemon is gone, so the mount is dead. Both detach exactly the mount they
//! identified, through an fd on that mount's root, never whatever else is mounted at
//! the path (a volume directory may itself be the mount point of a config flash).

use std::ffi::{CString, OsString};
use std::fmt;
use std::io::{self, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::sys;

/// The filesystem type of a twinfs mount, as /proc/self/mountinfo shows it.
const FSTYPE: &str = "fuse.twinfs";

/// Which mount a path leads to, as the kernel names it: the mount's ID (never reused
/// while the system runs, where the kernel offers such an ID: Linux 6.8 and later)
/// and its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MountIdentity {
    mnt_id: u64,
    /// `mnt_id` is the unique ID, not the one /proc/self/mountinfo shows (which a
    /// later mount may reuse).
    unique: bool,
    dev_major: u32,
    dev_minor: u32,
}

impl MountIdentity {
    /// Opens `path` (`O_PATH`) and identifies the mount it leads to. Neither step asks
    /// the filesystem, so a dead FUSE mount is identified as well as a live one.
    pub fn of_path(path: &Path) -> io::Result<(OwnedFd, MountIdentity)> {
        let root = sys::open_dir_path(path)?;
        let identity = MountIdentity::of(root.as_fd())?;
        Ok((root, identity))
    }

    /// Identifies the mount `root` (an fd on a mount's root) is on, without asking
    /// the filesystem.
    pub fn of(root: BorrowedFd<'_>) -> io::Result<MountIdentity> {
        let stx = statx_cached(root, libc::STATX_MNT_ID | libc::STATX_MNT_ID_UNIQUE)?;
        let unique = stx.stx_mask & libc::STATX_MNT_ID_UNIQUE != 0;
        if !unique && stx.stx_mask & libc::STATX_MNT_ID == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the kernel gives no mount IDs (Linux 5.8 or later needed)",
            ));
        }
        Ok(MountIdentity {
            mnt_id: stx.stx_mnt_id,
            unique,
            dev_major: stx.stx_dev_major,
            dev_minor: stx.stx_dev_minor,
        })
    }
}

/// `<mount id>:<u(nique)|r(eusable)>:<major>:<minor>`, as the watchdog gets it.
impl fmt::Display for MountIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.unique { "u" } else { "r" };
        write!(
            f,
            "{}:{kind}:{}:{}",
            self.mnt_id, self.dev_major, self.dev_minor
        )
    }
}

impl FromStr for MountIdentity {
    type Err = String;

    fn from_str(s: &str) -> Result<MountIdentity, String> {
        let bad = || format!("{s:?} is not a mount identity (<id>:<u|r>:<major>:<minor>)");
        let parts: Vec<&str> = s.split(':').collect();
        let [id, kind, major, minor] = parts[..] else {
            return Err(bad());
        };
        Ok(MountIdentity {
            mnt_id: id.parse().map_err(|_| bad())?,
            unique: match kind {
                "u" => true,
                "r" => false,
                _ => return Err(bad()),
            },
            dev_major: major.parse().map_err(|_| bad())?,
            dev_minor: minor.parse().map_err(|_| bad())?,
        })
    }
}

/// `statx` from what the kernel holds (`AT_STATX_DONT_SYNC`): a FUSE filesystem is
/// not asked, so this works on a dead mount.
fn statx_cached(fd: BorrowedFd<'_>, mask: libc::c_uint) -> io::Result<libc::statx> {
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: a valid fd, an empty NUL-terminated path with AT_EMPTY_PATH, and a
    // valid out-pointer.
    let ret = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC,
            mask,
            stx.as_mut_ptr(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statx succeeded and filled the struct (it was zeroed before).
    Ok(unsafe { stx.assume_init() })
}

/// Detaches (`MNT_DETACH`) the mount whose root `root` is an fd on: that mount, even
/// if another was mounted on top of it since.
pub(crate) fn detach(root: BorrowedFd<'_>) -> io::Result<()> {
    let path = CString::new(format!("/proc/self/fd/{}", root.as_raw_fd()))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a valid NUL-terminated string. Without UMOUNT_NOFOLLOW the magic link
    // leads to the fd's own mount.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What the watchdog runs as: a program and the arguments before the two it appends
/// (the mount point and the mount's [`MountIdentity`]), which must end up in [`watch`].
#[derive(Clone, Debug)]
pub struct WatchdogCommand {
    /// The program (`/proc/self/exe` runs the daemon's own binary).
    pub program: PathBuf,
    /// Shown as the program's name (`argv[0]`) by `ps`.
    pub name: OsString,
    /// The arguments before the mount point.
    pub args: Vec<OsString>,
}

/// The watchdog of one mount, as its daemon holds it: the write end of a pipe that is
/// the watchdog's stdin. The daemon never writes to it; its end (the daemon's exit, or
/// [`Watchdog::release`]) is what the watchdog waits for.
#[derive(Debug)]
pub struct Watchdog {
    child: Child,
}

impl Watchdog {
    /// Starts the watchdog of the mount `identity`, just made at `mountpoint`.
    pub fn start(
        command: &WatchdogCommand,
        mountpoint: &Path,
        identity: MountIdentity,
    ) -> io::Result<Watchdog> {
        let child = Command::new(&command.program)
            .arg0(&command.name)
            .args(&command.args)
            .arg(mountpoint)
            .arg(identity.to_string())
            // (Only the daemon speaks to systemd.)
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Watchdog { child })
    }

    /// The mount is gone (unmounted or detached by the daemon): the watchdog ends
    /// without doing anything. Waits a moment for it, so it is not left a zombie.
    pub fn release(mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        tracing::warn!(pid = self.child.id(), "the mount's watchdog did not end");
    }
}

/// What [`watch`] found once its daemon was gone.
#[derive(Debug, PartialEq, Eq)]
pub enum Watched {
    /// The mount was gone already: the daemon unmounted it.
    Unmounted,
    /// The mount was still there, dead: the watchdog detached it.
    Detached,
}

/// The watchdog's work, in the process [`Watchdog::start`] started: waits until its
/// stdin ends (the daemon exited or released it), then detaches the mount identified
/// by `identity` at `mountpoint` if it is still there.
///
/// SIGINT, SIGTERM and SIGHUP are ignored: a Ctrl-C in the daemon's terminal or a
/// service manager stopping the daemon's whole group reaches the watchdog too, and it
/// must outlive the daemon to do its job. It has its own session for the same reason,
/// and works from `/` so it keeps no filesystem busy.
pub fn watch(mountpoint: &Path, identity: &str) -> io::Result<Watched> {
    let identity: MountIdentity = identity
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: setsid and signal have no memory-safety preconditions; SIG_IGN is a
    // valid disposition.
    unsafe {
        libc::setsid();
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
    std::env::set_current_dir("/")?;
    let mut stdin = io::stdin().lock();
    let mut buf = [0u8; 64];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Nothing more can come: as good as the end.
            Err(_) => break,
        }
    }
    let (root, now) = match MountIdentity::of_path(mountpoint) {
        Ok(found) => found,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Watched::Unmounted),
        Err(e) => return Err(e),
    };
    // Another mount at the path is not ours. (Where the kernel has no unique mount
    // IDs, before Linux 6.8, a new mount could reuse the dead one's ID and device
    // only if the dead one was unmounted by someone else and a new daemon mounted
    // in the moment between the daemon's end and this check.)
    if now != identity {
        return Ok(Watched::Unmounted);
    }
    detach(root.as_fd())?;
    Ok(Watched::Detached)
}

/// Detaches a dead twinfs mount left on `path` (its daemon and its watchdog were killed
/// together, say), so a daemon can mount the volume again; returns whether there was
/// one. A live mount and any other filesystem are left alone.
pub fn clear_dead_mount(path: &Path) -> io::Result<bool> {
    let root = sys::open_dir_path(path)?;
    let stx = statx_cached(root.as_fd(), libc::STATX_MNT_ID)?;
    let attributes = libc::STATX_ATTR_MOUNT_ROOT as u64;
    if stx.stx_attributes_mask & attributes == 0 || stx.stx_attributes & attributes == 0 {
        return Ok(false);
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    if fstype_of(&mountinfo, stx.stx_mnt_id) != Some(FSTYPE) {
        return Ok(false);
    }
    // A live mount answers the open; a dead one's connection is gone.
    match sys::open_dir(path) {
        Ok(_) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            detach(root.as_fd())?;
            tracing::debug!(path = %path.display(), mnt_id = stx.stx_mnt_id, "dead mount detached");
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

/// The filesystem type of the mount with ID `mnt_id` in /proc/self/mountinfo's text.
fn fstype_of(mountinfo: &str, mnt_id: u64) -> Option<&str> {
    mountinfo.lines().find_map(|line| {
        let mut fields = line.split(' ');
        if fields.next()?.parse::<u64>().ok()? != mnt_id {
            return None;
        }
        // After the optional fields: "-", then the filesystem type.
        fields.skip_while(|f| *f != "-").nth(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_reads_back_as_written() {
        for identity in [
            MountIdentity {
                mnt_id: 2_000_000_001,
                unique: true,
                dev_major: 0,
                dev_minor: 52,
            },
            MountIdentity {
                mnt_id: 37,
                unique: false,
                dev_major: 259,
                dev_minor: 3,
            },
        ] {
            assert_eq!(identity.to_string().parse(), Ok(identity));
        }
        for bad in ["", "1:u:0", "1:x:0:52", "a:u:0:52", "1:u:0:52:9"] {
            assert!(bad.parse::<MountIdentity>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_filesystem_type_comes_from_the_mount_s_own_line() {
        let mountinfo = "\
22 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
96 22 0:52 / /etc/cmm rw,nosuid shared:40 master:3 - fuse.twinfs twinfs:cmm rw,user_id=0
97 96 0:53 / /etc/cmm rw - ext4 /dev/loop0 rw
";
        assert_eq!(fstype_of(mountinfo, 96), Some("fuse.twinfs"));
        assert_eq!(fstype_of(mountinfo, 22), Some("ext4"));
        assert_eq!(fstype_of(mountinfo, 9), None);
    }

    #[test]
    fn a_plain_directory_is_no_dead_mount() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!clear_dead_mount(dir.path()).unwrap());
        let (_, a) = MountIdentity::of_path(dir.path()).unwrap();
        let (_, b) = MountIdentity::of_path(Path::new("/proc")).unwrap();
        assert_ne!(a, b, "two mounts, two identities");
    }
}
