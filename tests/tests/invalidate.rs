//! Changes made underneath the mount (as the standby's apply will make them, through
//! the volume's own directory fd) become visible to readers of the mount at once after
//! `Mounted::invalidate`, despite the long attribute and entry caches.

use std::ffi::OsStr;
use std::fs;
use std::os::fd::AsFd;
use std::path::Path;

use twinfs_fs::{sys, Role};
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
fn an_inode_whose_name_was_replaced_is_stale_not_missing() {
    // An open the kernel sent on the old inode just as a new version took its name
    // must make the kernel look the name up again (ESTALE), not fail (ENOENT).
    use std::os::unix::fs::MetadataExt;
    let m = MountedDir::new(true, |d| fs::write(d.join("f"), b"old").expect("fill"));
    let f = m.path.join("f");
    let old = fs::metadata(&f).expect("stat").ino();
    replace_underneath(&m, "f", b"new");
    m.mounted()
        .invalidate(std::path::Path::new("f"))
        .expect("invalidate");
    match m.volume().getattr(old, None) {
        Ok(_) => panic!("the old inode has no name now, yet getattr found one"),
        Err(e) => assert_eq!(e.errno(), libc::ESTALE, "{e}"),
    }
    assert_eq!(fs::read(&f).expect("read"), b"new");
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

/// Writes `content` to the temp file `temp` in the volume root, through the volume's
/// own directory fd and without fsync, as the standby stages a new version.
fn write_temp(m: &MountedDir, temp: &str, content: &[u8]) -> (u64, u64) {
    let fd = sys::openat(
        m.volume().root_fd(),
        OsStr::new(temp),
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
        0o644,
    )
    .expect("create temp");
    sys::pwrite(fd.as_fd(), content, 0).expect("write temp");
    let st = sys::fstat(fd.as_fd()).expect("stat temp");
    (st.st_dev, st.st_ino)
}

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The standby's fast path: a new version staged beside its name is what readers get
/// at once, before it is durable and renamed; the file on disk stays the old one until
/// the rename, and readers keep seeing the new one across it.
#[test]
fn a_staged_version_is_seen_at_once_and_through_its_rename() {
    for passthrough in [true, false] {
        let m = MountedDir::new(passthrough, |d| {
            fs::write(d.join("f"), b"old").expect("fill")
        });
        let volume = m.volume();
        volume.set_role(Role::Standby);
        let root = volume.root_fd();
        let st = sys::fstat(root).expect("stat root");
        let dir = (st.st_dev, st.st_ino);
        let f = m.path.join("f");
        assert_eq!(fs::read(&f).expect("read"), b"old");

        let key = write_temp(&m, ".twinfs-stage.1", b"new version");
        assert!(volume.show_staged(
            dir,
            OsStr::new("f"),
            OsStr::new(".twinfs-stage.1"),
            key,
            Path::new("f")
        ));
        m.mounted().invalidate(Path::new("f")).expect("invalidate");
        assert_eq!(fs::read(&f).expect("read staged"), b"new version");
        assert_eq!(fs::metadata(&f).expect("stat").len(), 11);
        let on_disk = sys::openat(root, OsStr::new("f"), libc::O_RDONLY, 0).expect("open");
        let mut buf = [0u8; 16];
        let n = sys::pread(on_disk.as_fd(), &mut buf, 0).expect("read on disk");
        assert_eq!(
            &buf[..n],
            b"old",
            "the file on disk changes only by the rename"
        );

        // A later version staged under the same name is another file: the inode the
        // kernel already holds for the name (the first staged one) stays itself.
        let held_ino = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&f).expect("stat"));
        let later = write_temp(&m, ".twinfs-stage.9", b"a later, longer version");
        assert!(volume.show_staged(
            dir,
            OsStr::new("f"),
            OsStr::new(".twinfs-stage.9"),
            later,
            Path::new("f")
        ));
        let held_size = volume.getattr(held_ino, None).expect("getattr").st.st_size;
        assert_eq!(
            held_size, 11,
            "an older inode must not get the later file's size"
        );
        sys::unlinkat(root, OsStr::new(".twinfs-stage.9"), 0).expect("drop temp");
        volume.unshow_staged(dir, OsStr::new("f"), OsStr::new(".twinfs-stage.9"));

        // A name that does not exist yet is shown and listed too.
        let key = write_temp(&m, ".twinfs-stage.2", b"brand new");
        assert!(volume.show_staged(
            dir,
            OsStr::new("g"),
            OsStr::new(".twinfs-stage.2"),
            key,
            Path::new("g")
        ));
        m.mounted().invalidate(Path::new("g")).expect("invalidate");
        assert_eq!(fs::read(m.path.join("g")).expect("read g"), b"brand new");
        assert_eq!(names(&m.path), vec!["f", "g"]);

        // Renamed into place but still marked staged (the window before the marker
        // goes): the name is found; then the marker goes; the kernel's cached entry,
        // an open handle and a fresh lookup all see the new version.
        let held = fs::File::open(&f).expect("open staged");
        sys::renameat2(
            root,
            OsStr::new(".twinfs-stage.1"),
            root,
            OsStr::new("f"),
            0,
        )
        .expect("rename into place");
        assert_eq!(
            fs::read(&f).expect("read while the marker stays"),
            b"new version"
        );
        volume.unshow_staged(dir, OsStr::new("f"), OsStr::new(".twinfs-stage.1"));
        assert_eq!(fs::read(&f).expect("read placed"), b"new version");
        let mut again = String::new();
        std::io::Read::read_to_string(&mut &held, &mut again).expect("read held");
        assert_eq!(again, "new version");

        // Given up (the temp file removed without a rename): the old state is back.
        sys::unlinkat(root, OsStr::new(".twinfs-stage.2"), 0).expect("drop temp");
        volume.unshow_staged(dir, OsStr::new("g"), OsStr::new(".twinfs-stage.2"));
        m.mounted().invalidate(Path::new("g")).expect("invalidate");
        assert!(!m.path.join("g").exists());
        assert_eq!(names(&m.path), vec!["f"]);
    }
}

/// Only a standby shows staged versions, and never for a path its users may write
/// (an upstream path), whose file must change only by the rename.
#[test]
fn staging_is_refused_on_an_active_volume_and_for_upstream_paths() {
    let upstream: twinfs_fs::UpstreamFilter = std::sync::Arc::new(|p: &Path| p == Path::new("up"));
    let m = MountedDir::with_upstream(upstream, |d| {
        fs::write(d.join("up"), b"old").expect("fill");
        fs::write(d.join("down"), b"old").expect("fill");
    });
    let volume = m.volume();
    let st = sys::fstat(volume.root_fd()).expect("stat root");
    let dir = (st.st_dev, st.st_ino);
    let key = write_temp(&m, ".twinfs-stage.3", b"new");
    let show = |name: &str| {
        volume.show_staged(
            dir,
            OsStr::new(name),
            OsStr::new(".twinfs-stage.3"),
            key,
            Path::new(name),
        )
    };
    assert!(!show("down"), "active");
    volume.set_role(Role::Standby);
    assert!(!show("up"), "upstream path");
    assert!(show("down"));
    m.mounted()
        .invalidate(Path::new("down"))
        .expect("invalidate");
    assert_eq!(fs::read(m.path.join("down")).expect("read"), b"new");
    // Promoted before the rename: the name is the file on disk again.
    volume.set_role(Role::Active);
    m.mounted()
        .invalidate(Path::new("down"))
        .expect("invalidate");
    assert_eq!(fs::read(m.path.join("down")).expect("read"), b"old");
    assert_eq!(fs::read(m.path.join("up")).expect("read"), b"old");
}
