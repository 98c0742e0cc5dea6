//! Apply against a plain temp directory standing in for a standby's volume (no FUSE):
//! content and metadata arrive intact, replacements are atomic, and nothing is ever
//! written or deleted outside the volume.

use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use twinfs_fs::sys;
use twinfs_replicator::apply::{Applier, ApplyError, FileMeta, NodeKind, TEMP_PREFIX};
use twinfs_replicator::delta::{block_hash, BlockList, MIN_BLOCK};
use twinfs_replicator::path::RelPath;

/// A temp directory as the volume, with its root fd open as the daemon holds it.
struct Vol {
    dir: tempfile::TempDir,
    root: OwnedFd,
}

impl Vol {
    fn new() -> Vol {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = sys::open_dir_path(dir.path()).expect("open root");
        Vol { dir, root }
    }

    fn applier(&self) -> Applier<'_> {
        Applier::new(self.root.as_fd())
    }

    fn path(&self, p: &str) -> std::path::PathBuf {
        self.dir.path().join(p)
    }

    /// Every temp entry anywhere in the volume.
    fn temps(&self) -> Vec<std::path::PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
            for entry in fs::read_dir(dir).expect("read_dir") {
                let entry = entry.expect("entry");
                if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                    out.push(entry.path());
                }
                if entry.file_type().expect("file type").is_dir() {
                    walk(&entry.path(), out);
                }
            }
        }
        let mut out = Vec::new();
        walk(self.dir.path(), &mut out);
        out
    }
}

fn rel(p: &str) -> RelPath {
    RelPath::new(p).expect("valid path")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Metadata owned by the running user, so the tests also pass unprivileged.
fn meta(mode: u32) -> FileMeta {
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    FileMeta {
        mode,
        uid,
        gid,
        mtime: (1_600_000_000, 123_456_789),
        xattrs: Vec::new(),
    }
}

fn mtime_of(p: &Path) -> (i64, u32) {
    let m = fs::symlink_metadata(p).expect("lstat");
    (m.mtime(), m.mtime_nsec() as u32)
}

#[test]
fn write_file_round_trips_content_and_metadata() {
    let vol = Vol::new();
    fs::create_dir(vol.path("etc")).expect("mkdir");
    let mut want = meta(0o640);
    want.xattrs = vec![(b"user.twinfs.test".to_vec(), b"value".to_vec())];
    if is_root() {
        want.uid = 1234;
        want.gid = 5678;
    }
    let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    vol.applier()
        .write_file(&rel("etc/conf"), &mut &content[..], &want)
        .expect("write");

    let p = vol.path("etc/conf");
    assert_eq!(fs::read(&p).expect("read"), content);
    let m = fs::metadata(&p).expect("stat");
    assert_eq!(m.permissions().mode() & 0o7777, 0o640);
    assert_eq!((m.uid(), m.gid()), (want.uid, want.gid));
    assert_eq!(mtime_of(&p), want.mtime);
    let mut buf = [0u8; 16];
    let n = sys::At::Entry(
        sys::open_dir_path(&vol.path("etc")).expect("open").as_fd(),
        std::ffi::OsStr::new("conf"),
    )
    .getxattr(std::ffi::OsStr::new("user.twinfs.test"), &mut buf)
    .expect("getxattr");
    assert_eq!(&buf[..n], b"value");
    assert!(vol.temps().is_empty());
}

#[test]
fn rewrites_are_atomic_for_a_concurrent_reader() {
    const SIZE: usize = 64 * 1024;
    let vol = Vol::new();
    let target = vol.path("file");
    vol.applier()
        .write_file(&rel("file"), &mut &vec![0u8; SIZE][..], &meta(0o644))
        .expect("first version");

    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let done = Arc::clone(&done);
        let target = target.clone();
        std::thread::spawn(move || {
            let mut reads = 0u32;
            while !done.load(Ordering::Relaxed) {
                let data = fs::read(&target).expect("the file is always there");
                assert_eq!(data.len(), SIZE, "torn file");
                assert!(data.iter().all(|&b| b == data[0]), "mixed versions");
                reads += 1;
            }
            reads
        })
    };
    for version in 1..=500u32 {
        let content = vec![(version % 256) as u8; SIZE];
        vol.applier()
            .write_file(&rel("file"), &mut &content[..], &meta(0o644))
            .expect("write");
    }
    done.store(true, Ordering::Relaxed);
    let reads = reader.join().expect("reader saw only whole versions");
    assert!(reads > 0);
    assert_eq!(
        fs::read(&target).expect("read"),
        vec![(500 % 256) as u8; SIZE]
    );
    assert!(vol.temps().is_empty());
}

#[test]
fn a_symlink_on_the_way_is_refused() {
    let vol = Vol::new();
    let outside = tempfile::tempdir().expect("tempdir");
    symlink(outside.path(), vol.path("evil")).expect("symlink");
    fs::create_dir(vol.path("d")).expect("mkdir");
    symlink("../evil", vol.path("d/up")).expect("symlink");
    let applier = vol.applier();

    for p in ["evil/x", "d/up/x", "evil/sub/x"] {
        let err = applier
            .write_file(&rel(p), &mut &b"pwned"[..], &meta(0o644))
            .expect_err(p);
        assert!(matches!(err, ApplyError::Escape { .. }), "{p}: {err:?}");
        assert!(matches!(
            applier.make_dir(&rel(p), &meta(0o755)),
            Err(ApplyError::Escape { .. })
        ));
        assert!(matches!(
            applier.make_symlink(&rel(p), b"/", &meta(0o777)),
            Err(ApplyError::Escape { .. })
        ));
        assert!(matches!(
            applier.delete(&rel(p)),
            Err(ApplyError::Escape { .. })
        ));
    }
    assert_eq!(fs::read_dir(outside.path()).expect("list").count(), 0);
    assert!(vol.temps().is_empty());
}

#[test]
fn a_symlink_as_the_target_is_replaced_not_followed() {
    let vol = Vol::new();
    let outside = tempfile::tempdir().expect("tempdir");
    let secret = outside.path().join("passwd");
    fs::write(&secret, b"root:x:0:0").expect("write");
    symlink(&secret, vol.path("link")).expect("symlink");
    let applier = vol.applier();

    applier
        .write_file(&rel("link"), &mut &b"new"[..], &meta(0o600))
        .expect("write");
    assert!(fs::symlink_metadata(vol.path("link"))
        .expect("lstat")
        .file_type()
        .is_file());
    assert_eq!(fs::read(vol.path("link")).expect("read"), b"new");
    assert_eq!(fs::read(&secret).expect("read"), b"root:x:0:0");

    // Metadata of a symlink lands on the link, not on what it points to.
    symlink(&secret, vol.path("link2")).expect("symlink");
    let before = fs::metadata(&secret).expect("stat");
    applier
        .set_metadata(&rel("link2"), &meta(0o000))
        .expect("set metadata");
    let after = fs::metadata(&secret).expect("stat");
    assert_eq!(before.mode(), after.mode());
    assert_eq!(before.mtime(), after.mtime());
    assert_eq!(mtime_of(&vol.path("link2")), meta(0).mtime);

    // Blocks never read through the link: it offers no blocks, and a delta that
    // assumes some is refused.
    assert!(applier
        .block_list(&rel("link2"))
        .expect("block list")
        .hashes
        .is_empty());
    let err = applier
        .write_blocks(
            &rel("link2"),
            10,
            &mut std::iter::empty(),
            content_hash(b"root:x:0:0"),
            &meta(0o644),
        )
        .expect_err("no base to build on");
    assert!(matches!(err, ApplyError::Content { .. }), "{err:?}");
    assert_eq!(fs::read(&secret).expect("read"), b"root:x:0:0");
}

/// The content hash the active announces for a file of these bytes.
fn content_hash(data: &[u8]) -> u128 {
    twinfs_replicator::delta::content_hash_of(data)
}

/// The blocks of `new` whose hash differs from the standby's list, as the active sends
/// them.
fn delta_of(list: &BlockList, new: &[u8]) -> Vec<(u64, Vec<u8>)> {
    new.chunks(list.block_size as usize)
        .enumerate()
        .filter(|(i, c)| list.must_send(*i, c))
        .map(|(i, c)| ((i * list.block_size as usize) as u64, c.to_vec()))
        .collect()
}

fn write_blocks(
    applier: &Applier<'_>,
    path: &str,
    new: &[u8],
    blocks: Vec<(u64, Vec<u8>)>,
    meta: &FileMeta,
) -> Result<(), ApplyError> {
    applier.write_blocks(
        &rel(path),
        new.len() as u64,
        &mut blocks.into_iter().map(Ok),
        content_hash(new),
        meta,
    )
}

#[test]
fn a_block_delta_sends_only_changed_blocks_and_rebuilds_the_file() {
    const BLOCK: usize = MIN_BLOCK as usize;
    let vol = Vol::new();
    let applier = vol.applier();
    let original: Vec<u8> = (0..4 * BLOCK).map(|i| (i / BLOCK) as u8 + 1).collect();

    // No copy yet: the list is empty and every block travels.
    let list = applier.block_list(&rel("big")).expect("list");
    assert!(list.hashes.is_empty());
    let blocks = delta_of(&list, &original);
    assert_eq!(blocks.len(), 4);
    write_blocks(&applier, "big", &original, blocks, &meta(0o644)).expect("first copy");
    assert_eq!(fs::read(vol.path("big")).expect("read"), original);

    let list = applier.block_list(&rel("big")).expect("list");
    assert_eq!(list.block_size, MIN_BLOCK);
    assert_eq!(list.hashes.len(), 4);
    assert_eq!(list.hashes[2], block_hash(&original[2 * BLOCK..3 * BLOCK]));

    // Change part of block 1, append a fifth, partial block: two blocks travel.
    let mut want = meta(0o600);
    want.mtime = (1_700_000_000, 1);
    let mut changed = original.clone();
    changed[BLOCK + 10..BLOCK + 20].fill(0xAA);
    changed.extend_from_slice(&[0xBB; 100]);
    let blocks = delta_of(&list, &changed);
    assert_eq!(
        blocks.iter().map(|b| b.0).collect::<Vec<_>>(),
        [BLOCK as u64, 4 * BLOCK as u64]
    );
    write_blocks(&applier, "big", &changed, blocks, &want).expect("delta");
    assert_eq!(fs::read(vol.path("big")).expect("read"), changed);
    assert_eq!(mtime_of(&vol.path("big")), want.mtime);

    // Shrink to a block and a half: only the now-short block travels.
    let list = applier.block_list(&rel("big")).expect("list");
    let shrunk = changed[..BLOCK + BLOCK / 2].to_vec();
    let blocks = delta_of(&list, &shrunk);
    assert_eq!(blocks.len(), 1);
    write_blocks(&applier, "big", &shrunk, blocks, &want).expect("shrink");
    assert_eq!(fs::read(vol.path("big")).expect("read"), shrunk);
    assert!(vol.temps().is_empty());
}

#[test]
fn a_sparse_file_stays_sparse_on_the_standby() {
    const BLOCK: usize = MIN_BLOCK as usize;
    let vol = Vol::new();
    let applier = vol.applier();
    let allocated = |p: &Path| fs::metadata(p).expect("stat").blocks() * 512;
    // 64 blocks (4 MiB), data only at the two ends: a new copy, every block sent.
    let mut original = vec![0u8; 64 * BLOCK];
    original[..100].fill(1);
    let end = original.len();
    original[end - 100..].fill(2);
    let list = applier.block_list(&rel("sparse")).expect("list");
    let blocks = delta_of(&list, &original);
    assert_eq!(blocks.len(), 64);
    write_blocks(&applier, "sparse", &original, blocks, &meta(0o644)).expect("first copy");
    assert_eq!(fs::read(vol.path("sparse")).expect("read"), original);
    let first = allocated(&vol.path("sparse"));
    assert!(
        first <= 4 * BLOCK as u64,
        "{first} bytes allocated of {end}"
    );

    // A delta: the first block becomes zeros (its old bytes are a hole now), one in
    // the middle gets data; the holes between are copied as holes.
    let list = applier.block_list(&rel("sparse")).expect("list");
    let mut changed = original.clone();
    changed[..100].fill(0);
    changed[5 * BLOCK] = 3;
    let blocks = delta_of(&list, &changed);
    assert_eq!(blocks.len(), 2);
    write_blocks(&applier, "sparse", &changed, blocks, &meta(0o644)).expect("delta");
    assert_eq!(fs::read(vol.path("sparse")).expect("read"), changed);
    let second = allocated(&vol.path("sparse"));
    assert!(
        second <= 4 * BLOCK as u64,
        "{second} bytes allocated of {end}"
    );
    assert!(vol.temps().is_empty());
}

#[test]
fn a_block_delta_that_does_not_add_up_changes_nothing() {
    const BLOCK: usize = MIN_BLOCK as usize;
    let vol = Vol::new();
    let applier = vol.applier();
    let original: Vec<u8> = (0..3 * BLOCK).map(|i| (i % 251) as u8).collect();
    fs::write(vol.path("f"), &original).expect("write");
    let list = applier.block_list(&rel("f")).expect("list");
    let mut new = original.clone();
    new[5] = 0xFF;
    let content_error = |r: Result<(), ApplyError>| match r {
        Err(ApplyError::Content { .. }) => {}
        other => panic!("expected a content error, got {other:?}"),
    };
    // The standby's copy is not what the list said (it changed since): hash mismatch.
    let mut other_base = original.clone();
    other_base[2 * BLOCK] ^= 1;
    fs::write(vol.path("f"), &other_base).expect("write");
    content_error(write_blocks(
        &applier,
        "f",
        &new,
        delta_of(&list, &new),
        &meta(0o644),
    ));
    assert_eq!(fs::read(vol.path("f")).expect("read"), other_base);
    fs::write(vol.path("f"), &original).expect("write");
    // Out of order, past the end, a gap past the copy's end, cut short, a stream error.
    let block = |at: usize| (at as u64, new[at..at + BLOCK].to_vec());
    content_error(write_blocks(
        &applier,
        "f",
        &new,
        vec![block(BLOCK), block(0)],
        &meta(0o644),
    ));
    content_error(write_blocks(
        &applier,
        "f",
        &new,
        vec![(3 * BLOCK as u64 - 1, vec![1, 2])],
        &meta(0o644),
    ));
    let longer = [&new[..], &[7u8; 10]].concat();
    content_error(write_blocks(
        &applier,
        "f",
        &longer,
        vec![(3 * BLOCK as u64 + 5, vec![7; 5])],
        &meta(0o644),
    ));
    content_error(write_blocks(
        &applier,
        "f",
        &longer,
        vec![block(0)],
        &meta(0o644),
    ));
    let mut broken = vec![Ok(block(0)), Err(io::Error::other("stream reset"))].into_iter();
    content_error(applier.write_blocks(
        &rel("f"),
        new.len() as u64,
        &mut broken,
        content_hash(&new),
        &meta(0o644),
    ));
    assert_eq!(fs::read(vol.path("f")).expect("read"), original);
    assert!(vol.temps().is_empty());
    // And the honest delta works.
    write_blocks(&applier, "f", &new, delta_of(&list, &new), &meta(0o644)).expect("delta");
    assert_eq!(fs::read(vol.path("f")).expect("read"), new);
}

#[test]
fn delete_removes_a_tree_but_not_what_its_symlinks_point_to() {
    let vol = Vol::new();
    let outside = tempfile::tempdir().expect("tempdir");
    fs::write(outside.path().join("precious"), b"keep").expect("write");
    fs::create_dir_all(vol.path("tree/a/b")).expect("mkdir");
    fs::write(vol.path("tree/a/b/f"), b"x").expect("write");
    fs::write(vol.path("tree/g"), b"y").expect("write");
    symlink(outside.path(), vol.path("tree/a/out")).expect("symlink");
    symlink(outside.path().join("precious"), vol.path("tree/file-link")).expect("symlink");
    symlink(outside.path(), vol.path("top-link")).expect("symlink");
    let applier = vol.applier();

    applier.delete(&rel("tree")).expect("delete tree");
    assert!(!vol.path("tree").exists());
    applier.delete(&rel("top-link")).expect("delete link");
    assert!(fs::symlink_metadata(vol.path("top-link")).is_err());
    assert_eq!(
        fs::read(outside.path().join("precious")).expect("outside kept"),
        b"keep"
    );
    applier.delete(&rel("tree")).expect("missing is fine");
    applier
        .delete(&rel("no/such/dir"))
        .expect("missing parent is fine");
    assert!(matches!(
        applier.delete(&RelPath::root()),
        Err(ApplyError::Root { .. })
    ));
}

/// A bind mount, detached when dropped, so that a failing test leaves none behind.
/// Declared after the directories it joins, so it is dropped before they are removed
/// (removing the volume's temp dir through the mount would empty the other one).
struct BindMount(std::path::PathBuf);

impl BindMount {
    fn new(source: &Path, target: &Path) -> BindMount {
        let c = |p: &Path| {
            std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("no NUL in a path")
        };
        let (source_c, target_c) = (c(source), c(target));
        // SAFETY: valid NUL-terminated strings; a bind mount takes no type or data.
        let ret = unsafe {
            libc::mount(
                source_c.as_ptr(),
                target_c.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        assert_eq!(ret, 0, "bind mount: {}", io::Error::last_os_error());
        BindMount(target.to_owned())
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        if let Ok(c) = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid NUL-terminated string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

#[test]
fn bind_mounts_inside_the_volume_are_never_entered() {
    if !is_root() {
        return;
    }
    let vol = Vol::new();
    let outside = tempfile::tempdir().expect("tempdir");
    fs::create_dir(outside.path().join("sub")).expect("mkdir");
    fs::write(outside.path().join("precious"), b"keep").expect("write");
    fs::write(outside.path().join("sub/deep"), b"keep").expect("write");
    fs::write(outside.path().join(format!("{TEMP_PREFIX}theirs")), b"").expect("write");
    fs::set_permissions(outside.path(), fs::Permissions::from_mode(0o751)).expect("chmod");
    let file = outside.path().join("file");
    fs::write(&file, b"outside file").expect("write");
    fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).expect("chmod");
    fs::create_dir_all(vol.path("d/m")).expect("mkdir");
    fs::write(vol.path("d/own"), b"x").expect("write");
    fs::write(vol.path("f"), b"").expect("write");
    // Both on the same filesystem (one st_dev), as a bind mount usually is.
    let _dir_mount = BindMount::new(outside.path(), &vol.path("d/m"));
    let _file_mount = BindMount::new(&file, &vol.path("f"));
    let applier = vol.applier();

    for p in ["d", "d/m"] {
        let err = applier.delete(&rel(p)).expect_err(p);
        assert!(matches!(err, ApplyError::Escape { .. }), "{p}: {err:?}");
    }
    let err = applier
        .make_dir(&rel("d/m"), &meta(0o700))
        .expect_err("make_dir");
    assert!(matches!(err, ApplyError::Escape { .. }), "{err:?}");
    for p in ["d/m", "f"] {
        let err = applier.set_metadata(&rel(p), &meta(0o600)).expect_err(p);
        assert!(matches!(err, ApplyError::Escape { .. }), "{p}: {err:?}");
    }
    assert!(!matches!(applier.open_for_patch(&rel("f")), Ok(Some(_))));
    assert_eq!(applier.remove_stale_temps().expect("clean"), 0);

    assert_eq!(
        fs::read(outside.path().join("precious")).expect("kept"),
        b"keep"
    );
    assert_eq!(
        fs::read(outside.path().join("sub/deep")).expect("kept"),
        b"keep"
    );
    assert!(outside.path().join(format!("{TEMP_PREFIX}theirs")).exists());
    let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
    assert_eq!(mode(outside.path()), 0o751);
    assert_eq!(mode(&file), 0o640);
    assert_eq!(fs::read(&file).expect("kept"), b"outside file");
}

#[test]
fn delete_entry_removes_a_directory_only_if_empty() {
    let vol = Vol::new();
    fs::create_dir_all(vol.path("full/sub")).expect("mkdir");
    fs::write(vol.path("full/sub/new.txt"), b"x").expect("write");
    fs::create_dir(vol.path("empty")).expect("mkdir");
    fs::write(vol.path("file"), b"y").expect("write");
    let applier = vol.applier();

    assert!(matches!(
        applier.delete_entry(&rel("full")),
        Err(ApplyError::NotEmpty { .. })
    ));
    assert_eq!(fs::read(vol.path("full/sub/new.txt")).expect("kept"), b"x");
    applier.delete_entry(&rel("empty")).expect("rmdir");
    assert!(!vol.path("empty").exists());
    applier.delete_entry(&rel("file")).expect("unlink");
    assert!(!vol.path("file").exists());
    applier
        .delete_entry(&rel("empty"))
        .expect("missing is fine");
    assert!(matches!(
        applier.delete_entry(&RelPath::root()),
        Err(ApplyError::Root { .. })
    ));
}

#[test]
fn make_dir_symlink_node_and_exact_metadata() {
    let vol = Vol::new();
    let applier = vol.applier();
    let mut dir_meta = meta(0o750);
    dir_meta.xattrs = vec![(b"user.a".to_vec(), b"1".to_vec())];
    applier.make_dir(&rel("d"), &dir_meta).expect("mkdir");
    let m = fs::metadata(vol.path("d")).expect("stat");
    assert!(m.is_dir());
    assert_eq!(m.permissions().mode() & 0o7777, 0o750);
    assert_eq!(mtime_of(&vol.path("d")), dir_meta.mtime);

    // Existing: only the metadata changes; the xattr set is made exactly equal.
    fs::write(vol.path("d/inside"), b"x").expect("write");
    let mut redo = meta(0o700);
    redo.xattrs = vec![(b"user.b".to_vec(), b"2".to_vec())];
    applier.make_dir(&rel("d"), &redo).expect("mkdir again");
    assert!(vol.path("d/inside").exists());
    assert_eq!(
        fs::metadata(vol.path("d"))
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777,
        0o700
    );
    let names = xattr_names(&vol.path("d"));
    assert_eq!(names, vec![b"user.b".to_vec()]);

    applier
        .make_symlink(&rel("d/ln"), b"../nowhere", &meta(0o777))
        .expect("symlink");
    assert_eq!(
        fs::read_link(vol.path("d/ln")).expect("readlink"),
        Path::new("../nowhere")
    );
    assert_eq!(mtime_of(&vol.path("d/ln")), meta(0).mtime);
    applier
        .make_symlink(&rel("d/ln"), b"elsewhere", &meta(0o777))
        .expect("replace symlink");
    assert_eq!(
        fs::read_link(vol.path("d/ln")).expect("readlink"),
        Path::new("elsewhere")
    );

    applier
        .make_node(&rel("d/pipe"), NodeKind::Fifo, 0, &meta(0o620))
        .expect("fifo");
    let m = fs::symlink_metadata(vol.path("d/pipe")).expect("stat");
    assert!(m.file_type().is_fifo());
    assert_eq!(m.permissions().mode() & 0o7777, 0o620);
    applier
        .set_metadata(&rel("d/pipe"), &meta(0o600))
        .expect("set metadata of a fifo without opening it");

    // Kinds in the way.
    assert!(matches!(
        applier.make_dir(&rel("d/inside"), &meta(0o755)),
        Err(ApplyError::NotDirectory { .. })
    ));
    assert!(matches!(
        applier.make_dir(&rel("d/ln"), &meta(0o755)),
        Err(ApplyError::NotDirectory { .. })
    ));
    assert!(matches!(
        applier.write_file(&rel("d"), &mut &b""[..], &meta(0o644)),
        Err(ApplyError::IsDirectory { .. })
    ));
    assert!(matches!(
        applier.make_symlink(&rel("d"), b"x", &meta(0o777)),
        Err(ApplyError::IsDirectory { .. })
    ));
    assert!(vol.temps().is_empty());
}

fn xattr_names(p: &Path) -> Vec<Vec<u8>> {
    let dir = sys::open_dir_path(p).expect("open");
    let at = sys::At::Fd(dir.as_fd());
    let mut buf = vec![0u8; 4096];
    let n = at.listxattr(&mut buf).expect("listxattr");
    buf[..n]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// An `unsent` rename into a directory this standby lacks (the active sent it as
/// gone) makes the missing directories, empty and 0700, and moves the source in;
/// without `unsent` the same rename is refused; a file in the way is never replaced.
#[test]
fn an_unsent_rename_makes_the_directories_missing_on_its_way() {
    use std::os::unix::fs::PermissionsExt;
    let vol = Vol::new();
    let applier = vol.applier();
    fs::write(vol.path("a"), b"A").expect("write");
    let plain = applier.rename(&rel("a"), &rel("t/u/a"), false);
    assert!(plain.is_err(), "{plain:?}");
    applier
        .rename_unsent(&rel("a"), &rel("t/u/a"), false)
        .expect("unsent rename");
    assert_eq!(fs::read(vol.path("t/u/a")).expect("read"), b"A");
    for made in ["t", "t/u"] {
        let mode = fs::metadata(vol.path(made))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o700, "{made}");
    }
    // An exchange whose source is missing here moves the target to the source's
    // name, making its directories too.
    applier
        .rename_unsent(&rel("v/w"), &rel("t/u/a"), true)
        .expect("unsent exchange");
    assert_eq!(fs::read(vol.path("v/w")).expect("read"), b"A");
    // A file where a directory is wanted stays, and the rename is refused.
    fs::write(vol.path("f"), b"F").expect("write");
    let blocked = applier.rename_unsent(&rel("v/w"), &rel("f/x"), false);
    assert!(blocked.is_err(), "{blocked:?}");
    assert_eq!(fs::read(vol.path("f")).expect("read"), b"F");
    assert_eq!(fs::read(vol.path("v/w")).expect("read"), b"A");
}

/// A rename from one name of a file to another name of the same file: rename(2)
/// would leave both (the active's kernel never makes such a rename; the standby gets
/// one where its copy has two names that are two files on the active). The source
/// name goes, as a rename's does, and the file keeps its content; a path renamed to
/// itself stays.
#[test]
fn a_rename_between_two_names_of_one_file_removes_the_first() {
    use std::os::unix::fs::MetadataExt;
    let vol = Vol::new();
    let applier = vol.applier();
    fs::create_dir(vol.path("d")).expect("mkdir");
    fs::write(vol.path("d/a"), b"same").expect("write");
    fs::hard_link(vol.path("d/a"), vol.path("b")).expect("link");
    applier
        .rename(&rel("d/a"), &rel("b"), false)
        .expect("rename");
    assert!(!vol.path("d/a").exists(), "the first name stayed");
    assert_eq!(fs::read(vol.path("b")).expect("read"), b"same");
    assert_eq!(fs::metadata(vol.path("b")).expect("stat").nlink(), 1);
    applier
        .rename(&rel("b"), &rel("b"), false)
        .expect("rename to itself");
    assert_eq!(fs::read(vol.path("b")).expect("read"), b"same");
}

#[test]
fn rename_and_exchange() {
    let vol = Vol::new();
    let applier = vol.applier();
    fs::create_dir(vol.path("d")).expect("mkdir");
    fs::write(vol.path("a"), b"A").expect("write");
    fs::write(vol.path("d/b"), b"B").expect("write");
    applier
        .rename(&rel("a"), &rel("d/b"), true)
        .expect("exchange");
    assert_eq!(fs::read(vol.path("a")).expect("read"), b"B");
    assert_eq!(fs::read(vol.path("d/b")).expect("read"), b"A");
    applier
        .rename(&rel("a"), &rel("d/b"), false)
        .expect("rename");
    assert!(!vol.path("a").exists());
    assert_eq!(fs::read(vol.path("d/b")).expect("read"), b"B");
    let missing = applier.rename(&rel("a"), &rel("c"), false);
    assert!(
        matches!(missing, Err(ApplyError::Rename { .. })),
        "{missing:?}"
    );
    // The message (logged, and sent to the active as the reason) says why.
    let message = missing.map_err(|e| e.to_string()).expect_err("refused");
    assert_eq!(
        message,
        "renaming \"a\" to \"c\" failed: No such file or directory (os error 2)"
    );
}

#[test]
fn stale_temps_are_removed_everywhere_but_outside() {
    let vol = Vol::new();
    let outside = tempfile::tempdir().expect("tempdir");
    let foreign = outside.path().join(format!("{TEMP_PREFIX}foreign"));
    fs::write(&foreign, b"").expect("write");
    fs::create_dir_all(vol.path("a/b")).expect("mkdir");
    fs::write(vol.path(&format!("{TEMP_PREFIX}1")), b"").expect("write");
    fs::write(vol.path(&format!("a/b/{TEMP_PREFIX}2")), b"").expect("write");
    symlink("/nowhere", vol.path(&format!("a/{TEMP_PREFIX}3"))).expect("symlink");
    fs::write(vol.path(".twinfs-other"), b"").expect("write");
    fs::write(vol.path("a/keep"), b"").expect("write");
    symlink(outside.path(), vol.path("a/out")).expect("symlink");

    assert_eq!(vol.applier().remove_stale_temps().expect("clean"), 3);
    assert!(vol.temps().is_empty());
    assert!(vol.path(".twinfs-other").exists());
    assert!(vol.path("a/keep").exists());
    assert!(foreign.exists());
}

/// A reader that fails after handing out some bytes, like a stream that broke.
struct Broken(usize);

impl Read for Broken {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.0 == 0 {
            return Err(io::Error::new(io::ErrorKind::ConnectionReset, "peer left"));
        }
        let n = self.0.min(buf.len());
        buf[..n].fill(b'x');
        self.0 -= n;
        Ok(n)
    }
}

#[test]
fn failures_leave_no_temp_and_the_old_version() {
    let vol = Vol::new();
    let applier = vol.applier();
    applier
        .write_file(&rel("f"), &mut &b"old"[..], &meta(0o644))
        .expect("write");

    let err = applier
        .write_file(&rel("f"), &mut Broken(1_000_000), &meta(0o644))
        .expect_err("broken stream");
    assert!(matches!(err, ApplyError::Content { .. }), "{err:?}");

    let mut bad = meta(0o644);
    bad.mtime.1 = 2_000_000_000; // not a valid nanosecond count
    let err = applier
        .write_file(&rel("f"), &mut &b"new"[..], &bad)
        .expect_err("bad time");
    assert!(
        matches!(
            err,
            ApplyError::Io {
                op: "set the times of",
                ..
            }
        ),
        "{err:?}"
    );
    let err = write_blocks(&applier, "f", b"New", vec![(0, b"New".to_vec())], &bad)
        .expect_err("bad time");
    assert!(matches!(err, ApplyError::Io { .. }), "{err:?}");
    let err = applier
        .make_symlink(&rel("f"), b"target", &bad)
        .expect_err("bad time");
    assert!(matches!(err, ApplyError::Io { .. }), "{err:?}");
    let err = applier
        .write_file(&rel("no/such/dir/f"), &mut &b"x"[..], &meta(0o644))
        .expect_err("missing parent");
    assert!(matches!(err, ApplyError::Io { .. }), "{err:?}");

    assert_eq!(fs::read(vol.path("f")).expect("read"), b"old");
    assert!(vol.temps().is_empty());
}

/// Drops `CAP_FOWNER` from the calling thread's effective capabilities (capabilities
/// are per thread, so the rest of the test process keeps it).
fn drop_fowner_in_this_thread() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_FOWNER: u32 = 3;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: valid pointers to a header and the two data words version 3 takes.
    let ret = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    assert_eq!(ret, 0, "capget: {}", io::Error::last_os_error());
    data[0].effective &= !(1 << CAP_FOWNER);
    // SAFETY: as above; capset only reads them.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    assert_eq!(ret, 0, "capset: {}", io::Error::last_os_error());
}

#[test]
fn a_replacement_is_done_even_when_the_directory_times_cannot_be_restored() {
    if !is_root() {
        return;
    }
    let vol = Vol::new();
    fs::create_dir(vol.path("sub")).expect("mkdir");
    fs::write(vol.path("sub/f"), b"old").expect("write");
    // Writable by all, owned by someone else: without CAP_FOWNER its times cannot be
    // set, while entries in it can still be created and renamed.
    fs::set_permissions(vol.path("sub"), fs::Permissions::from_mode(0o777)).expect("chmod");
    std::os::unix::fs::chown(vol.path("sub"), Some(12_345), Some(12_345)).expect("chown");

    let result = std::thread::scope(|s| {
        s.spawn(|| {
            drop_fowner_in_this_thread();
            vol.applier()
                .write_file(&rel("sub/f"), &mut &b"new"[..], &meta(0o644))
        })
        .join()
        .expect("thread")
    });
    result.expect("the file was replaced, so the write succeeded");
    assert_eq!(fs::read(vol.path("sub/f")).expect("read"), b"new");
    assert!(vol.temps().is_empty());
}

#[test]
fn the_root_takes_metadata_but_is_never_replaced() {
    let vol = Vol::new();
    let applier = vol.applier();
    applier
        .make_dir(&RelPath::root(), &meta(0o751))
        .expect("root metadata");
    assert_eq!(
        fs::metadata(vol.dir.path())
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777,
        0o751
    );
    assert!(matches!(
        applier.write_file(&RelPath::root(), &mut &b""[..], &meta(0o644)),
        Err(ApplyError::IsDirectory { .. })
    ));
    assert!(matches!(
        applier.rename(&RelPath::root(), &rel("x"), false),
        Err(ApplyError::Root { .. })
    ));
}

#[test]
fn device_nodes_when_root() {
    if !is_root() {
        return;
    }
    let vol = Vol::new();
    // /dev/null's numbers: 1, 3.
    let rdev = libc::makedev(1, 3);
    vol.applier()
        .make_node(&rel("null"), NodeKind::Char, rdev, &meta(0o666))
        .expect("mknod");
    let m = fs::symlink_metadata(vol.path("null")).expect("stat");
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), rdev);
}

#[test]
fn a_tree_deletion_keeps_what_the_caller_keeps_and_the_directories_above_it() {
    let vol = Vol::new();
    fs::create_dir_all(vol.path("site/sub/deeper")).expect("mkdir");
    fs::create_dir_all(vol.path("site/empty")).expect("mkdir");
    fs::write(vol.path("site/hosts.local"), "keep").expect("write");
    fs::write(vol.path("site/sub/deeper/id.local"), "keep").expect("write");
    fs::write(vol.path("site/sub/old"), "go").expect("write");
    fs::write(vol.path("site/old"), "go").expect("write");
    let keep = |p: &RelPath| p.as_path().to_string_lossy().ends_with(".local");
    assert!(vol
        .applier()
        .delete_keeping(&rel("site"), &keep)
        .expect("delete"));
    assert!(vol.path("site/hosts.local").exists());
    assert!(vol.path("site/sub/deeper/id.local").exists());
    assert!(!vol.path("site/sub/old").exists());
    assert!(!vol.path("site/old").exists());
    assert!(!vol.path("site/empty").exists());
    // With nothing to keep, the tree goes whole.
    assert!(!vol
        .applier()
        .delete_keeping(&rel("site"), &|_: &RelPath| false)
        .expect("delete"));
    assert!(!vol.path("site").exists());
}

/// A hard link replaces what is at the new name atomically, takes the existing
/// file's content and metadata (they are the file's), is idempotent, and refuses a
/// name that is no regular file or a directory in the way.
#[test]
fn link_makes_a_name_of_the_existing_file() {
    let v = Vol::new();
    let a = v.applier();
    fs::create_dir(v.path("d")).expect("mkdir");
    a.write_file(&rel("first"), &mut &b"linked"[..], &meta(0o640))
        .expect("write");
    fs::write(v.path("d/other"), "an old copy").expect("write");
    a.link(&rel("first"), &rel("d/other"))
        .expect("link over a copy");
    a.link(&rel("first"), &rel("new"))
        .expect("link to a new name");
    a.link(&rel("first"), &rel("new"))
        .expect("again: nothing to do");
    let first = fs::metadata(v.path("first")).expect("stat");
    for name in ["d/other", "new"] {
        let m = fs::metadata(v.path(name)).expect("stat");
        assert_eq!((m.dev(), m.ino()), (first.dev(), first.ino()), "{name}");
        assert_eq!(fs::read(v.path(name)).expect("read"), b"linked");
    }
    assert_eq!(first.nlink(), 3);
    assert_eq!(first.mode() & 0o7777, 0o640);
    assert!(a.linked_file(&rel("new")).expect("stat").is_some());

    fs::create_dir(v.path("dir")).expect("mkdir");
    assert!(matches!(
        a.link(&rel("first"), &rel("dir")),
        Err(ApplyError::IsDirectory { .. })
    ));
    symlink("first", v.path("sym")).expect("symlink");
    assert!(matches!(
        a.link(&rel("sym"), &rel("via-symlink")),
        Err(ApplyError::NoLinkTarget { .. })
    ));
    assert!(matches!(
        a.link(&rel("missing"), &rel("new")),
        Err(ApplyError::NoLinkTarget { .. })
    ));
    assert!(fs::symlink_metadata(v.path("via-symlink")).is_err());
    assert!(v.temps().is_empty(), "{:?}", v.temps());
    fs::write(v.path("lone"), "1").expect("write");
    assert!(a.linked_file(&rel("lone")).expect("stat").is_none());
}
