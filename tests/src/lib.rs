//! The end-to-end test harness: scratch directories, in-process mounts with a guard
//! that always unmounts, and real `twinfs` daemons as child processes.

pub mod daemon;
pub mod inproc;
pub mod tree;

use std::path::Path;

/// Whether this machine can run kernel-mount tests (root and /dev/fuse). Tests that
/// need a mount fail loudly without it, rather than pass by skipping.
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: these tests mount real FUSE filesystems"
    );
    // SAFETY: geteuid cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests mount FUSE filesystems in place and must run as root"
    );
}

/// Lazily unmounts anything still mounted at `path` (last resort in Drop guards).
pub fn force_unmount(path: &Path) {
    let _ = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(path)
        .stderr(std::process::Stdio::null())
        .status();
}

/// Whether a twinfs mount is on `path` (listed in /proc/self/mounts with type
/// `fuse.twinfs`; a filesystem of another type mounted there does not count).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    let want = path.to_string_lossy();
    mounts.lines().any(|l| {
        let mut fields = l.split(' ').skip(1);
        fields.next().map(|m| m.replace("\\040", " ")).as_deref() == Some(&*want)
            && fields.next() == Some("fuse.twinfs")
    })
}

/// The twinfs mounts at or below `dir`.
pub fn mounts_below(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    mounts
        .lines()
        .filter_map(|l| {
            let mut fields = l.split(' ').skip(1);
            let at = std::path::PathBuf::from(fields.next()?.replace("\\040", " "));
            (fields.next() == Some("fuse.twinfs") && at.starts_with(dir)).then_some(at)
        })
        .collect()
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Makes the tests of one test binary that take it run one at a time. A child process
/// forked by one test (the CLI, sh, touch) inherits every fd this process has open,
/// including files another test has open on a mount, and its exec closes them: a real
/// close, recorded as a change, which would disturb tests that count records or check
/// that only whole versions are shipped.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A tmpfs of a given size mounted on a fresh temp directory, for tests that fill a
/// filesystem up; detached (exactly it) when dropped. Drop what was made inside it
/// (a [`inproc::MountedDir`]) first.
pub struct Tmpfs {
    root: std::fs::File,
    path: std::path::PathBuf,
    /// The temp directory it is mounted on, if it made one.
    _dir: Option<tempfile::TempDir>,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` bytes (rounded up to pages).
    pub fn new(size: u64) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("twinfs-tmpfs-")
            .tempdir()
            .expect("tmpfs mount point");
        let mut fs = Tmpfs::at(dir.path(), size, 0o755);
        fs._dir = Some(dir);
        fs
    }

    /// Mounts a tmpfs of `size` bytes with root mode `mode` on `dir` (made if missing).
    pub fn at(dir: &Path, size: u64, mode: u32) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("tmpfs mount point");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode={mode:o}")])
            .arg("twinfs-test")
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount tmpfs on {}", dir.display());
        let root = std::fs::File::open(dir).expect("open the tmpfs root");
        Tmpfs {
            root,
            path: dir.to_owned(),
            _dir: None,
        }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file `name` from its root, also when something is mounted on top
    /// of it (a twinfs mount in place).
    pub fn remove(&self, name: &str) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let name = std::ffi::CString::new(name)?;
        // SAFETY: a valid fd and NUL-terminated name.
        if unsafe { libc::unlinkat(self.root.as_raw_fd(), name.as_ptr(), 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Gives it `size` bytes (what is in it stays).
    pub fn resize(&self, size: u64) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "resize the tmpfs on {}",
            self.path.display()
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        unmount_all_on(&self.root);
    }
}

/// Unmounts the filesystem whose root `root` is open on, and first whatever is
/// mounted on top of it (a twinfs mount in place, left by a test that failed): the
/// fd's path reaches the top mount on the directory.
pub fn unmount_all_on(root: &std::fs::File) {
    use std::os::fd::AsRawFd;
    let Ok(path) = std::ffi::CString::new(format!("/proc/self/fd/{}", root.as_raw_fd())) else {
        return;
    };
    for _ in 0..4 {
        if !is_listed(root) {
            break;
        }
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Whether the mount that `root` is open on still stands: its mount ID is listed.
fn is_listed(root: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    let fd = root.as_raw_fd();
    let Some(id) = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("mnt_id:").map(|v| v.trim().to_owned()))
        })
    else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| {
        info.lines()
            .any(|l| l.split(' ').next() == Some(id.as_str()))
    })
}

/// A small ext4 filesystem of its own (an image file on a loop device) mounted on a
/// directory, which a test can freeze (`FIFREEZE`): every write to it then blocks
/// until it is thawed, as on a disk that stopped answering. Thawed and detached when
/// dropped, with whatever is mounted on top of it; the loop device goes with the
/// last user (`mount -o loop` sets autoclear).
pub struct Ext4Image {
    root: std::fs::File,
    frozen: std::sync::atomic::AtomicBool,
    _image: tempfile::TempDir,
}

impl Ext4Image {
    /// An empty ext4 filesystem of `size` bytes mounted on `dir` (which must exist).
    pub fn at(dir: &Path, size: u64) -> Ext4Image {
        Self::made_with(dir, size, &[])
    }

    /// Like [`Ext4Image::at`], made with these further `mkfs.ext4` options (`-O
    /// ^filetype`: directory entries that carry no file type, as on XFS without
    /// `ftype`).
    pub fn made_with(dir: &Path, size: u64, options: &[&str]) -> Ext4Image {
        let image = tempfile::Builder::new()
            .prefix("twinfs-ext4-")
            .tempdir()
            .expect("image dir");
        let file = image.path().join("fs.img");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(size))
            .expect("image file");
        let run = |cmd: &mut std::process::Command| {
            let out = cmd.output().expect("run");
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .args(options)
            .arg(&file));
        run(std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&file)
            .arg(dir));
        let root = std::fs::File::open(dir).unwrap_or_else(|e| {
            let _ = std::process::Command::new("umount").arg(dir).status();
            panic!("open the image's root {}: {e}", dir.display())
        });
        let fs = Ext4Image {
            root,
            frozen: std::sync::atomic::AtomicBool::new(false),
            _image: image,
        };
        std::fs::remove_dir(dir.join("lost+found")).expect("remove lost+found");
        fs
    }

    /// Freezes it: writes block from now on.
    pub fn freeze(&self) {
        self.ioctl(FIFREEZE).expect("FIFREEZE");
        self.frozen
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Thaws it: the blocked writes go on.
    pub fn thaw(&self) {
        if self
            .frozen
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            self.ioctl(FITHAW).expect("FITHAW");
        }
    }

    fn ioctl(&self, request: libc::c_ulong) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let mut arg: libc::c_int = 0;
        // SAFETY: FIFREEZE and FITHAW take an int argument, on an fd of the filesystem.
        if unsafe { libc::ioctl(self.root.as_raw_fd(), request, &mut arg) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` from linux/fs.h.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

impl Drop for Ext4Image {
    fn drop(&mut self) {
        // (No panic here: a test that failed is unwinding.)
        if self
            .frozen
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            let _ = self.ioctl(FITHAW);
        }
        unmount_all_on(&self.root);
    }
}

/// Sets the immutable flag of a file or directory (`chattr +i`: not even root may
/// change it), and clears it when dropped. A path below a mounted volume is out of
/// chattr's reach: set it on files outside the mount (a state directory, say).
pub struct Immutable(std::path::PathBuf);

impl Immutable {
    /// Sets the flag on `path`.
    pub fn set(path: &Path) -> Immutable {
        let ok = std::process::Command::new("chattr")
            .arg("+i")
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "chattr +i {} (scripts/test installs e2fsprogs)",
            path.display()
        );
        Immutable(path.to_owned())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}
