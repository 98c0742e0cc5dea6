//! Changes made underneath the mount (as the standby's apply will make them, through
//! the volume's own directory fd) become visible to readers of the mount at once after
//! `Mounted::invalidate`, despite the long attribute and entry caches.

use std::ffi::OsStr;
use std::fs;
use std::os::fd::AsFd;

use twinfs_fs::sys;
use twinfs_tests::inproc::MountedDir;

/// Replaces `name` in the volume root the way an atomic apply does: a temp file,
/// written and renamed over the target, all through the volume's directory fd.
fn replace_underneath(m: &MountedDir, name: &str, content: &[u8]) {
    let root = m.volume().root_fd();
    let tmp = OsStr::new(".twinfs-apply.tmp");
    let fd = sys::openat(
        root,
        tmp,
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
        0o644,
    )
    .expect("create temp");
    sys::pwrite(fd.as_fd(), content, 0).expect("write temp");
    sys::fsync(fd.as_fd(), false).expect("fsync temp");
    sys::renameat2(root, tmp, root, OsStr::new(name), 0).expect("rename over");
}

#[test]
fn a_replaced_file_is_seen_after_invalidation() {
    for passthrough in [true, false] {
        let m = MountedDir::new(passthrough, |d| {
            fs::write(d.join("f"), b"old").expect("fill")
        });
        let f = m.path.join("f");
        assert_eq!(fs::read(&f).expect("read"), b"old");
        let ino_before = fs::metadata(&f).expect("stat").len();
        assert_eq!(ino_before, 3);

        replace_underneath(&m, "f", b"new and longer");
        // The kernel still holds the old entry: that is what invalidation is for.
        assert_eq!(fs::metadata(&f).expect("stat").len(), 3, "cached entry");

        m.mounted()
            .invalidate(std::path::Path::new("f"))
            .expect("invalidate");
        assert_eq!(fs::read(&f).expect("read"), b"new and longer");
        assert_eq!(fs::metadata(&f).expect("stat").len(), 14);
        assert!(m
            .recorder
            .take()
            .iter()
            .all(|c| c.path != std::path::Path::new(".twinfs-apply.tmp")));
    }
}

#[test]
fn files_created_and_removed_underneath_in_a_subdirectory() {
    let m = MountedDir::new(true, |d| {
        fs::create_dir(d.join("sub")).expect("fill");
        fs::write(d.join("sub/gone"), b"x").expect("fill");
    });
    let sub = m.path.join("sub");
    let names = |dir: &std::path::Path| {
        let mut v: Vec<String> = fs::read_dir(dir)
            .expect("readdir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&sub), vec!["gone"]);
    assert!(sub.join("gone").exists());

    let subfd = sys::openat(
        m.volume().root_fd(),
        OsStr::new("sub"),
        libc::O_PATH | libc::O_DIRECTORY,
        0,
    )
    .expect("open sub underneath");
    sys::unlinkat(subfd.as_fd(), OsStr::new("gone"), 0).expect("unlink underneath");
    let fd = sys::openat(
        subfd.as_fd(),
        OsStr::new("new"),
        libc::O_WRONLY | libc::O_CREAT,
        0o600,
    )
    .expect("create underneath");
    sys::pwrite(fd.as_fd(), b"hello", 0).expect("write");

    let mounted = m.mounted();
    mounted
        .invalidate(std::path::Path::new("sub/gone"))
        .expect("invalidate gone");
    mounted
        .invalidate(std::path::Path::new("sub/new"))
        .expect("invalidate new");
    assert!(!sub.join("gone").exists());
    assert_eq!(fs::read(sub.join("new")).expect("read new"), b"hello");
    assert_eq!(names(&sub), vec!["new"]);
}

#[test]
fn reserved_names_are_invisible_and_not_creatable() {
    let m = MountedDir::new(true, |d| {
        fs::write(d.join(".twinfs-tmp.0123"), b"half written").expect("fill");
        fs::write(d.join("visible"), b"x").expect("fill");
    });
    let listed: Vec<String> = fs::read_dir(&m.path)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed, vec!["visible"]);
    let err = |r: std::io::Result<()>| r.err().and_then(|e| e.raw_os_error());
    assert_eq!(
        err(fs::metadata(m.path.join(".twinfs-tmp.0123")).map(|_| ())),
        Some(libc::ENOENT)
    );
    assert_eq!(
        err(fs::write(m.path.join(".twinfs-mine"), b"y")),
        Some(libc::EPERM)
    );
    assert_eq!(
        err(fs::create_dir(m.path.join(".twinfs-d"))),
        Some(libc::EPERM)
    );
    assert_eq!(
        err(fs::rename(m.path.join("visible"), m.path.join(".twinfs-x"))),
        Some(libc::EPERM)
    );
    assert_eq!(
        err(fs::remove_file(m.path.join(".twinfs-tmp.0123"))),
        Some(libc::ENOENT)
    );
    // Names that merely look alike are ordinary.
    fs::write(m.path.join(".twinfs"), b"ok").expect("plain dotfile");
    fs::write(m.path.join("x.twinfs-tmp"), b"ok").expect("plain file");
}
