//! Scanning real directories into manifests: every kind of entry, symlinks never
//! followed, the hash cache (hits, invalidation, persistence) and a large tree.

use std::ffi::OsStr;
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use twinfs_fs::sys::{self, At};
use twinfs_replicator::manifest::{
    describe, diff, link_identity, names_of, scan, Diff, HashCache, Kind, Manifest,
};
use twinfs_replicator::path::RelPath;
use xxhash_rust::xxh3::xxh3_128;

/// Longer than the age a file's last change must have before its hash is cached.
const SETTLE: Duration = Duration::from_millis(200);

fn rel(s: &str) -> RelPath {
    RelPath::new(s).expect("valid path")
}

fn open(dir: &Path) -> OwnedFd {
    sys::open_dir_path(dir).expect("open the directory")
}

fn scan_all(dir: &Path, cache: &mut HashCache) -> Manifest {
    scan(open(dir).as_fd(), |_, _| true, cache).expect("scan")
}

/// The paths below the root (which every scan lists first, as a directory).
fn paths(m: &Manifest) -> Vec<String> {
    let mut all = m.iter().map(|(p, meta)| (p.to_string(), meta.kind));
    assert_eq!(
        all.next(),
        Some((String::new(), Kind::Dir)),
        "the root first"
    );
    all.map(|(p, _)| p).collect()
}

fn hash_of(m: &Manifest, path: &str) -> Option<u128> {
    m.get(&rel(path)).and_then(|meta| meta.hash)
}

fn user_xattrs(m: &Manifest, path: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let meta = m.get(&rel(path)).expect("entry");
    assert!(meta.xattrs().windows(2).all(|w| w[0].0 < w[1].0), "sorted");
    meta.xattrs()
        .to_vec()
        .iter()
        .filter(|(name, _)| name.starts_with(b"user."))
        .cloned()
        .collect()
}

/// Sets a user xattr; false where the filesystem has none.
fn set_xattr(dir: &Path, name: &str, key: &str, value: &[u8]) -> bool {
    let fd = open(dir);
    match At::Entry(fd.as_fd(), OsStr::new(name)).setxattr(OsStr::new(key), value, 0) {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => false,
        Err(e) => panic!("setxattr {name}: {e}"),
    }
}

#[test]
fn scan_records_every_kind_without_following_symlinks() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    fs::write(d.join("a.txt"), "hello").expect("write");
    fs::set_permissions(d.join("a.txt"), fs::Permissions::from_mode(0o4640)).expect("chmod");
    fs::write(d.join("empty"), "").expect("write");
    fs::create_dir_all(d.join("sub/nested")).expect("mkdir");
    // Spans several 1 MiB reads.
    let big: Vec<u8> = (0..(3 << 20) + 5).map(|i| (i % 251) as u8).collect();
    fs::write(d.join("sub/nested/big.bin"), &big).expect("write");
    fs::hard_link(d.join("a.txt"), d.join("hard")).expect("link");
    symlink("a.txt", d.join("link")).expect("symlink");
    symlink("/etc", d.join("etc")).expect("symlink");
    symlink("sub", d.join("dirlink")).expect("symlink");
    let root = open(d);
    sys::mknodat(root.as_fd(), OsStr::new("pipe"), libc::S_IFIFO | 0o600, 0).expect("mkfifo");
    let _socket = std::os::unix::net::UnixListener::bind(d.join("sock")).expect("bind");
    let null = libc::makedev(1, 3);
    let have_dev = sys::mknodat(
        root.as_fd(),
        OsStr::new("null"),
        libc::S_IFCHR | 0o666,
        null,
    )
    .is_ok();
    fs::write(d.join(".twinfs-tmp.1"), "ours").expect("write");
    fs::write(d.join("sub/.twinfs-tmp.2"), "ours").expect("write");
    let xattrs = set_xattr(d, "a.txt", "user.b", b"2")
        && set_xattr(d, "a.txt", "user.a", b"1")
        && set_xattr(d, "sub", "user.dir", b"x");
    std::thread::sleep(SETTLE);

    let mut cache = HashCache::new();
    let m = scan(root.as_fd(), |_, _| true, &mut cache).expect("scan");

    let mut expected = vec![
        "a.txt",
        "dirlink",
        "empty",
        "etc",
        "hard",
        "link",
        "pipe",
        "sock",
        "sub",
        "sub/nested",
        "sub/nested/big.bin",
    ];
    if have_dev {
        expected.push("null");
        expected.sort();
    }
    assert_eq!(paths(&m), expected);

    let a = m.get(&rel("a.txt")).expect("a.txt");
    let st = fs::symlink_metadata(d.join("a.txt")).expect("stat");
    assert_eq!(a.kind, Kind::File);
    assert_eq!(a.mode, 0o4640);
    assert_eq!((a.uid, a.gid), (st.uid(), st.gid()));
    assert_eq!(a.mtime, (st.mtime(), st.mtime_nsec() as u32));
    assert_eq!((a.size, a.hash), (5, Some(xxh3_128(b"hello"))));
    assert_eq!((a.target(), a.rdev()), (None, 0));
    assert_eq!(m.get(&rel("hard")).map(|h| h.hash), Some(a.hash));
    assert_eq!(hash_of(&m, "empty"), Some(xxh3_128(b"")));
    assert_eq!(
        hash_of(&m, "sub/nested/big.bin"),
        Some(twinfs_replicator::delta::content_hash_of(&big))
    );
    if xattrs {
        assert_eq!(
            user_xattrs(&m, "a.txt"),
            [
                (b"user.a".to_vec(), b"1".to_vec()),
                (b"user.b".to_vec(), b"2".to_vec())
            ]
        );
        assert_eq!(
            user_xattrs(&m, "sub"),
            [(b"user.dir".to_vec(), b"x".to_vec())]
        );
        // The symlink's own xattrs, not its target's.
        assert!(user_xattrs(&m, "dirlink").is_empty());
    }

    for (name, target) in [("link", "a.txt"), ("etc", "/etc"), ("dirlink", "sub")] {
        let l = m.get(&rel(name)).expect("symlink");
        assert_eq!(l.kind, Kind::Symlink, "{name}");
        assert_eq!(l.target(), Some(target.as_bytes()), "{name}");
        assert_eq!((l.size, l.hash), (0, None), "{name}");
    }
    let sub = m.get(&rel("sub")).expect("sub");
    assert_eq!((sub.kind, sub.size, sub.hash), (Kind::Dir, 0, None));
    assert_eq!(m.get(&rel("pipe")).map(|p| p.kind), Some(Kind::Fifo));
    assert_eq!(m.get(&rel("sock")).map(|p| p.kind), Some(Kind::Socket));
    if have_dev {
        let n = m.get(&rel("null")).expect("null");
        assert_eq!((n.kind, n.rdev()), (Kind::CharDev, null));
    }

    // a.txt and its hard link are one inode, hashed once.
    let stats = cache.last_scan();
    assert_eq!((stats.misses, stats.hits), (3, 1));
    assert_eq!(stats.bytes_hashed, 5 + big.len() as u64);
}

#[test]
fn filter_leaves_out_entries_and_subtrees() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    fs::create_dir_all(d.join("local/deep")).expect("mkdir");
    fs::write(d.join("local/deep/x"), "x").expect("write");
    fs::write(d.join("keep"), "k").expect("write");
    fs::write(d.join("run.log"), "l").expect("write");
    let mut cache = HashCache::new();
    let asked = std::cell::RefCell::new(Vec::new());
    let m = scan(
        open(d).as_fd(),
        |p, kind| {
            asked.borrow_mut().push((p.to_string(), kind));
            p != &rel("local") && !p.as_bytes().ends_with(b".log")
        },
        &mut cache,
    )
    .expect("scan");
    assert_eq!(paths(&m), ["keep"]);
    let mut asked = asked.into_inner();
    asked.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        asked,
        [
            ("keep".to_owned(), Kind::File),
            ("local".to_owned(), Kind::Dir),
            ("run.log".to_owned(), Kind::File)
        ]
    );
}

/// Names of one file share a link identity: the first of its names the scan keeps.
/// A name the filter leaves out, or one outside the volume, does not count.
#[test]
fn hard_linked_names_share_the_identity_of_their_first_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path().join("vol");
    fs::create_dir_all(d.join("sub")).expect("mkdir");
    fs::write(d.join("sub/b"), "one").expect("write");
    fs::hard_link(d.join("sub/b"), d.join("c")).expect("link");
    fs::hard_link(d.join("sub/b"), d.join("z")).expect("link");
    fs::write(d.join("lone"), "lone").expect("write");
    fs::hard_link(d.join("lone"), d.join("lone.never")).expect("link");
    fs::write(d.join("out"), "out").expect("write");
    fs::hard_link(d.join("out"), tmp.path().join("outside")).expect("link");
    let root = open(&d);
    let keep = |p: &RelPath, _: Kind| !p.as_bytes().ends_with(b".never");
    let m = scan(root.as_fd(), keep, &mut HashCache::new()).expect("scan");
    let link = |p: &str| m.get(&rel(p)).and_then(|meta| meta.link().cloned());
    for name in ["c", "sub/b", "z"] {
        assert_eq!(link(name), Some(rel("c")), "{name}");
    }
    assert_eq!(link("lone"), None, "its other name is left out");
    assert_eq!(link("out"), None, "its other name is outside the volume");
    assert_ne!(m.get(&rel("c")), m.get(&rel("lone")));

    // One path at a time, as the active ships a change.
    for (name, first) in [("z", Some(rel("c"))), ("lone", None), ("out", None)] {
        let (_, fd, _) = describe(root.as_fd(), &rel(name), &mut HashCache::new())
            .expect("describe")
            .expect("exists");
        let st = twinfs_fs::sys::fstat(fd.as_fd()).expect("fstat");
        let identity = link_identity(root.as_fd(), &st, keep).expect("walk");
        assert_eq!(identity, first, "{name}");
    }
    let mut names = names_of(root.as_fd(), key(&d.join("z")), 3, keep).expect("walk");
    names.sort();
    assert_eq!(names, [rel("c"), rel("sub/b"), rel("z")]);
}

/// A full sync links what the active has linked and the standby has as copies, and
/// unlinks what the standby has linked and the active no longer has.
#[test]
fn a_full_sync_links_and_unlinks_names() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, s) = (tmp.path().join("active"), tmp.path().join("standby"));
    for d in [&a, &s] {
        fs::create_dir(d).expect("mkdir");
    }
    // Active: a and b one file; x and y apart.
    fs::write(a.join("a"), "v1").expect("write");
    fs::hard_link(a.join("a"), a.join("b")).expect("link");
    fs::write(a.join("x"), "x").expect("write");
    fs::write(a.join("y"), "x").expect("write");
    // Standby: the same content and times, a and b apart, x and y one file.
    fs::write(s.join("a"), "v1").expect("write");
    fs::write(s.join("b"), "v1").expect("write");
    fs::write(s.join("x"), "x").expect("write");
    fs::hard_link(s.join("x"), s.join("y")).expect("link");
    // One mtime for all (written a clock tick apart, x and y would differ, and the
    // standby's one file can have only one).
    let mtime = fs::metadata(a.join("a"))
        .expect("stat")
        .modified()
        .expect("mtime");
    for name in ["a", "b", "x", "y"] {
        for dir in [&a, &s] {
            let file = fs::File::options()
                .write(true)
                .open(dir.join(name))
                .expect("open");
            file.set_modified(mtime).expect("touch");
        }
    }
    let mut cache = HashCache::new();
    let sent = sent_by_full_sync(&a, &s, &mut cache);
    assert_eq!(
        sent,
        [
            // b becomes a name of a; a itself already has the content.
            ("b".to_owned(), false, true),
            // x and y each get a copy of their own.
            ("x".to_owned(), true, false),
            ("y".to_owned(), true, false),
        ]
    );
    // Linked alike on both sides: nothing to do.
    fs::remove_file(s.join("b")).expect("rm");
    fs::hard_link(s.join("a"), s.join("b")).expect("link");
    fs::remove_file(a.join("y")).expect("rm");
    fs::hard_link(a.join("x"), a.join("y")).expect("link");
    same_root_mtime(&a, &s);
    let (ma, ms) = (scan_all(&a, &mut cache), scan_all(&s, &mut cache));
    assert_eq!(diff(&ma, &ms, |_| 2), Diff::default());
}

/// The standby has one file under four names; the active has the same content as
/// two files of two names each. The first name of the second group, which the
/// standby has linked into the first group, gets a copy of its own, and its further
/// name a link to it: else all four names would stay one file there.
#[test]
fn a_first_name_linked_into_another_group_gets_a_copy_of_its_own() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, s) = (tmp.path().join("active"), tmp.path().join("standby"));
    for d in [&a, &s] {
        fs::create_dir(d).expect("mkdir");
    }
    fs::write(a.join("a"), "v").expect("write");
    fs::hard_link(a.join("a"), a.join("d")).expect("link");
    fs::write(a.join("b"), "v").expect("write");
    fs::hard_link(a.join("b"), a.join("c")).expect("link");
    fs::write(s.join("a"), "v").expect("write");
    for name in ["b", "c", "d"] {
        fs::hard_link(s.join("a"), s.join(name)).expect("link");
    }
    let mtime = fs::metadata(a.join("a"))
        .expect("stat")
        .modified()
        .expect("mtime");
    for file in [a.join("b"), s.join("a")] {
        let f = fs::File::options().write(true).open(&file).expect("open");
        f.set_modified(mtime).expect("touch");
    }
    let mut cache = HashCache::new();
    let sent = sent_by_full_sync(&a, &s, &mut cache);
    assert_eq!(
        sent,
        [("b".to_owned(), true, false), ("c".to_owned(), false, true)]
    );
}

/// Gives the root `s` the mtime of the root `a`: manifests list the roots, and two
/// changed a clock tick apart would differ.
fn same_root_mtime(a: &Path, s: &Path) {
    let mtime = fs::metadata(a).expect("stat").modified().expect("mtime");
    fs::File::open(s)
        .expect("open")
        .set_modified(mtime)
        .expect("touch");
}

/// What a full sync from the active `a` to the standby `s` sends, as (path, with
/// content, as a link); it deletes nothing.
fn sent_by_full_sync(a: &Path, s: &Path, cache: &mut HashCache) -> Vec<(String, bool, bool)> {
    same_root_mtime(a, s);
    let (ma, ms) = (scan_all(a, cache), scan_all(s, cache));
    let d = diff(&ma, &ms, |_| 2);
    assert!(d.delete.is_empty(), "{d:?}");
    d.send
        .iter()
        .map(|t| (t.path.to_string(), t.content, t.link))
        .collect()
}

fn key(path: &Path) -> (u64, u64) {
    let meta = fs::symlink_metadata(path).expect("stat");
    (meta.dev(), meta.ino())
}

#[test]
fn entries_removed_during_the_scan_are_left_out() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    fs::write(d.join("x"), "x").expect("write");
    fs::write(d.join("y"), "y").expect("write");
    fs::create_dir_all(d.join("gone/inner")).expect("mkdir");
    let removed = std::cell::Cell::new(false);
    let m = scan(
        open(d).as_fd(),
        |p, _| {
            match p.to_string().as_str() {
                // Whichever of x and y comes first removes the other before its turn.
                "x" | "y" if !removed.get() => {
                    let other = if p == &rel("x") { "y" } else { "x" };
                    fs::remove_file(d.join(other)).expect("remove");
                    removed.set(true);
                }
                // Removed after its stat, before its listing.
                "gone" => fs::remove_dir_all(d.join("gone")).expect("remove"),
                _ => {}
            }
            true
        },
        &mut HashCache::new(),
    )
    .expect("scan");
    let found = paths(&m);
    assert!(found == ["x"] || found == ["y"], "{found:?}");
}

#[test]
fn cache_skips_unchanged_files_and_notices_changes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    fs::write(d.join("f1"), "one").expect("write");
    fs::write(d.join("f2"), "two").expect("write");
    fs::create_dir(d.join("dir")).expect("mkdir");
    fs::write(d.join("dir/f3"), "three").expect("write");
    std::thread::sleep(SETTLE);
    let mut cache = HashCache::new();

    let first = scan_all(d, &mut cache);
    assert_eq!(cache.last_scan().misses, 3);
    let second = scan_all(d, &mut cache);
    assert_eq!(second, first);
    let stats = cache.last_scan();
    assert_eq!((stats.hits, stats.misses, stats.bytes_hashed), (3, 0, 0));

    // A touch: new mtime, same content.
    let f1 = fs::File::options()
        .write(true)
        .open(d.join("f1"))
        .expect("open");
    f1.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .expect("touch");
    // A same-size rewrite with the old mtime put back: only the ctime tells.
    let old_mtime = fs::metadata(d.join("f2"))
        .and_then(|m| m.modified())
        .expect("stat");
    fs::write(d.join("f2"), "TWO").expect("write");
    let f2 = fs::File::options()
        .write(true)
        .open(d.join("f2"))
        .expect("open");
    f2.set_modified(old_mtime).expect("set mtime");
    std::thread::sleep(SETTLE);

    let third = scan_all(d, &mut cache);
    let stats = cache.last_scan();
    assert_eq!((stats.hits, stats.misses, stats.bytes_hashed), (1, 2, 6));
    assert_eq!(hash_of(&third, "f1"), hash_of(&first, "f1"));
    assert_ne!(
        third.get(&rel("f1")).map(|m| m.mtime),
        first.get(&rel("f1")).map(|m| m.mtime)
    );
    assert_eq!(hash_of(&third, "f2"), Some(xxh3_128(b"TWO")));
    assert_eq!(
        third.get(&rel("f2")).map(|m| m.mtime),
        first.get(&rel("f2")).map(|m| m.mtime)
    );
}

#[test]
fn a_file_changed_just_now_is_not_cached() {
    let tmp = tempfile::tempdir().expect("tempdir");
    fs::write(tmp.path().join("fresh"), "new").expect("write");
    let mut cache = HashCache::new();
    scan_all(tmp.path(), &mut cache);
    scan_all(tmp.path(), &mut cache);
    assert_eq!(cache.last_scan().misses, 1);
}

#[test]
fn cache_persists_prunes_and_survives_corruption() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path().join("volume");
    fs::create_dir(&d).expect("mkdir");
    for i in 0..5 {
        fs::write(d.join(format!("f{i}")), format!("content {i}")).expect("write");
    }
    std::thread::sleep(SETTLE);
    let file = tmp.path().join("state/hashes");
    fs::create_dir(tmp.path().join("state")).expect("mkdir");

    let mut cache = HashCache::new();
    let first = scan_all(&d, &mut cache);
    cache.store(&file).expect("store");
    assert_eq!(
        fs::read_dir(tmp.path().join("state")).expect("ls").count(),
        1,
        "no temp file left"
    );

    let mut loaded = HashCache::load(&file);
    assert_eq!(loaded.len(), 5);
    assert_eq!(scan_all(&d, &mut loaded), first);
    assert_eq!(loaded.last_scan().bytes_hashed, 0);

    // Deleted and filtered-out files leave the cache at the next scan.
    fs::remove_file(d.join("f0")).expect("rm");
    scan(open(&d).as_fd(), |p, _| p != &rel("f1"), &mut loaded).expect("scan");
    assert_eq!(loaded.len(), 3);
    loaded.store(&file).expect("store");
    assert_eq!(HashCache::load(&file).len(), 3);

    let good = fs::read(&file).expect("read");
    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    for corrupt in [
        b"garbage".to_vec(),
        good[..good.len() - 1].to_vec(),
        flipped,
        Vec::new(),
    ] {
        fs::write(&file, corrupt).expect("write");
        assert!(HashCache::load(&file).is_empty());
    }
    assert!(HashCache::load(&tmp.path().join("missing")).is_empty());
}

#[test]
fn twenty_thousand_files_rescan_without_hashing() {
    // Creating 20,000 files on a disk-backed filesystem can take longer than the scans
    // under test; memory-backed /dev/shm, where there is one, keeps the test quick.
    let shm = Path::new("/dev/shm");
    let tmp = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .expect("tempdir");
    let d = tmp.path();
    for dir in 0..20 {
        let sub = d.join(format!("d{dir:02}"));
        fs::create_dir(&sub).expect("mkdir");
        for file in 0..1000 {
            fs::write(sub.join(format!("f{file:04}")), format!("{dir}/{file}")).expect("write");
        }
    }
    std::thread::sleep(SETTLE);
    let mut cache = HashCache::new();

    let started = Instant::now();
    let first = scan_all(d, &mut cache);
    let cold = started.elapsed();
    assert_eq!(
        first.len(),
        20_021,
        "the files, their directories and the root"
    );
    assert_eq!(cache.last_scan().misses, 20_000);

    let started = Instant::now();
    let second = scan_all(d, &mut cache);
    let warm = started.elapsed();
    assert_eq!(second, first);
    let stats = cache.last_scan();
    assert_eq!((stats.hits, stats.bytes_hashed), (20_000, 0));
    eprintln!("20,000 files: cold scan {cold:?}, warm scan {warm:?}");
}

/// A manifest of entries with long paths, symlink targets and large xattrs goes in
/// parts that each fit in a message (by count alone, 2,048 of them would not: the
/// part could never be sent, and the full sync would start over for good).
#[test]
fn every_manifest_part_fits_in_a_message() {
    use twinfs_replicator::manifest::{Entry, Meta};
    use twinfs_replicator::protocol::{Message, MANIFEST_CHUNK};
    let long = "d".repeat(250);
    let manifest: Manifest = (0..3 * MANIFEST_CHUNK)
        .map(|i| {
            let path = format!("{}/{i:05}", vec![long.as_str(); 15].join("/"));
            let mut meta = Meta::new(Kind::Symlink);
            meta.set_target(Some(vec![b't'; 4000]));
            meta.set_xattrs(vec![(b"user.big".to_vec(), vec![7u8; 5 << 10])]);
            Entry {
                path: RelPath::new(path).expect("path"),
                meta,
            }
        })
        .collect();
    let len = manifest.len();
    let parts = manifest.into_parts(MANIFEST_CHUNK);
    let mut count = 0;
    for (i, (entries, done)) in parts.iter().enumerate() {
        assert_eq!(*done, i + 1 == parts.len());
        count += entries.len();
        let message = Message::Manifest {
            sync: 1,
            entries: entries.clone(),
            done: *done,
        };
        if let Err(e) = message.encode() {
            panic!("part {i} of {} entries: {e}", entries.len());
        }
    }
    assert_eq!(count, len);
    assert!(parts.len() > 3, "split by size too: {} parts", parts.len());
}
