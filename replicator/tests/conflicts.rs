//! The conflicts area against plain temp directories (no FUSE): what a fenced node
//! keeps lands in its set, and only there.

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::symlink;

use twinfs_fs::sys;
use twinfs_replicator::apply::Applier;
use twinfs_replicator::conflicts::Area;
use twinfs_replicator::path::RelPath;

/// A volume directory and a state directory, the area armed as after a fencing.
struct Fenced {
    volume: tempfile::TempDir,
    root: OwnedFd,
    _state: tempfile::TempDir,
    area: Area,
}

impl Fenced {
    fn new() -> Fenced {
        let volume = tempfile::tempdir().expect("tempdir");
        let root = sys::open_dir_path(volume.path()).expect("open root");
        let state = tempfile::tempdir().expect("tempdir");
        let area = Area::new(state.path(), "vol");
        area.arm(5, 0).expect("arm");
        Fenced {
            volume,
            root,
            _state: state,
            area,
        }
    }

    fn keep(&self, path: &str, what: &str) -> u64 {
        let applier = Applier::new(self.root.as_fd());
        let path = RelPath::new(path).expect("valid path");
        self.area
            .keep(&applier, &path, what, &|_| false)
            .expect("keep")
    }

    /// The one set, and what its manifest lists.
    fn set(&self) -> (std::path::PathBuf, Vec<String>) {
        let sets = self.area.sets();
        assert_eq!(sets.len(), 1, "{sets:?}");
        let (dir, manifest) = sets.into_iter().next().expect("one set");
        (dir, manifest.kept.into_iter().map(|k| k.path).collect())
    }
}

#[test]
fn a_kept_symlink_is_never_written_through() {
    let f = Fenced::new();
    let outside = tempfile::tempdir().expect("tempdir");
    let v = f.volume.path();
    // The loser's `certs` is a symlink out of the volume; the winner deletes it.
    symlink(outside.path(), v.join("certs")).expect("symlink");
    assert_eq!(f.keep("certs", "deleted"), 1);
    // Later in that full sync, `certs` is a directory whose file goes too.
    fs::remove_file(v.join("certs")).expect("unlink");
    fs::create_dir(v.join("certs")).expect("mkdir");
    fs::write(v.join("certs/ca.pem"), "loser's ca").expect("write");
    assert_eq!(f.keep("certs/ca.pem", "deleted"), 1);

    assert_eq!(
        fs::read_dir(outside.path()).expect("read_dir").count(),
        0,
        "something was written through the kept symlink"
    );
    let (set, listed) = f.set();
    assert_eq!(
        fs::read_link(set.join("certs")).expect("kept symlink"),
        outside.path()
    );
    assert_eq!(
        fs::read_to_string(set.join("certs.2/ca.pem")).expect("kept beside it"),
        "loser's ca"
    );
    assert_eq!(listed, ["certs", "certs.2/ca.pem"]);
    // The same path again (kept already): nothing written, through the symlink or not.
    assert_eq!(f.keep("certs", "deleted"), 0);
    assert_eq!(fs::read_dir(outside.path()).expect("read_dir").count(), 0);
}

#[test]
fn a_directory_kept_after_one_of_its_files_gets_the_rest() {
    let f = Fenced::new();
    let v = f.volume.path();
    fs::create_dir_all(v.join("site/sub")).expect("mkdir");
    fs::write(v.join("site/a"), "a").expect("write");
    fs::write(v.join("site/hosts.local"), "kept too").expect("write");
    fs::write(v.join("site/sub/b"), "b").expect("write");
    // Children are deleted before their directory.
    assert_eq!(f.keep("site/a", "deleted"), 1);
    fs::remove_file(v.join("site/a")).expect("unlink");
    assert_eq!(f.keep("site", "deleted"), 3, "hosts.local, sub, sub/b");
    let (set, listed) = f.set();
    assert_eq!(fs::read_to_string(set.join("site/a")).expect("kept"), "a");
    assert_eq!(
        fs::read_to_string(set.join("site/hosts.local")).expect("kept"),
        "kept too"
    );
    assert_eq!(
        fs::read_to_string(set.join("site/sub/b")).expect("kept"),
        "b"
    );
    assert_eq!(listed, ["site/a", "site"]);
}

#[test]
fn a_refused_write_and_a_fencing_in_the_same_second_keep_apart() {
    let f = Fenced::new();
    let v = f.volume.path();
    let path = RelPath::new("hosts").expect("valid path");
    // A refused upstream write, then a fencing by the same epoch in the same second.
    f.area
        .keep_refused(5, 0, &path, Some(b"refused version"), "test")
        .expect("keep refused");
    fs::write(v.join("hosts"), "later version").expect("write");
    assert_eq!(
        f.keep("hosts", "replaced"),
        1,
        "the later version was not kept"
    );
    let sets = f.area.sets();
    assert_eq!(sets.len(), 2, "{sets:?}");
    let contents: Vec<(String, String)> = sets
        .iter()
        .map(|(dir, m)| {
            let kept = fs::read_to_string(dir.join(&m.kept[0].path)).expect("kept");
            (m.kept[0].what.clone(), kept)
        })
        .collect();
    assert!(contents.contains(&("refused".into(), "refused version".into())));
    assert!(contents.contains(&("replaced".into(), "later version".into())));
}

#[test]
fn refused_writes_never_follow_or_overwrite_what_their_set_holds() {
    let f = Fenced::new();
    let outside = tempfile::tempdir().expect("tempdir");
    let refuse = |path: &str, content: &str| {
        let path = RelPath::new(path).expect("valid path");
        f.area
            .keep_refused(7, 0, &path, Some(content.as_bytes()), "test")
            .expect("keep refused");
    };
    // A file where a later path needs a directory, and a second version of a path.
    refuse("etc", "etc as a file");
    refuse("etc/hosts", "hosts in etc");
    refuse("hosts", "first");
    refuse("hosts", "second");
    // Something in the set is a symlink out of it (it was never made by twinfs; a
    // set is only root's, but nothing written there may go through one).
    let set = f.area.dir().join("refused-7-19700101T000000Z");
    symlink(outside.path(), set.join("certs")).expect("symlink");
    refuse("certs/ca.pem", "ca");

    assert_eq!(
        fs::read_dir(outside.path()).expect("read_dir").count(),
        0,
        "written through the symlink in the set"
    );
    let sets = f.area.sets();
    let (dir, manifest) = sets
        .iter()
        .find(|(d, _)| d == &set)
        .expect("the refused set");
    let listed: Vec<&str> = manifest.kept.iter().map(|k| k.path.as_str()).collect();
    assert_eq!(
        listed,
        ["etc", "etc.2/hosts", "hosts", "hosts.2", "certs.2/ca.pem"]
    );
    for (path, content) in [
        ("etc", "etc as a file"),
        ("etc.2/hosts", "hosts in etc"),
        ("hosts", "first"),
        ("hosts.2", "second"),
        ("certs.2/ca.pem", "ca"),
    ] {
        assert_eq!(
            fs::read_to_string(dir.join(path)).expect("kept"),
            content,
            "{path}"
        );
    }
    let leftovers: Vec<_> = fs::read_dir(dir)
        .expect("read_dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

#[test]
fn a_volume_file_named_like_a_sets_manifest_is_kept_beside_it() {
    let f = Fenced::new();
    let v = f.volume.path();
    fs::write(v.join("MANIFEST.json"), "the volume's own").expect("write");
    fs::write(v.join("MANIFEST.json.kept"), "also the volume's").expect("write");
    fs::write(v.join("hosts"), "hosts").expect("write");
    assert_eq!(f.keep("MANIFEST.json", "replaced"), 1);
    assert_eq!(f.keep("MANIFEST.json.kept", "replaced"), 1);
    assert_eq!(f.keep("hosts", "deleted"), 1);
    let (set, listed) = f.set();
    assert_eq!(
        listed,
        ["MANIFEST.json.kept", "MANIFEST.json.kept.kept", "hosts"]
    );
    assert_eq!(
        fs::read_to_string(set.join("MANIFEST.json.kept")).expect("kept"),
        "the volume's own"
    );
    assert_eq!(
        fs::read_to_string(set.join("MANIFEST.json.kept.kept")).expect("kept"),
        "also the volume's"
    );

    // The same for a refused upstream write.
    let path = RelPath::new("MANIFEST.json").expect("valid path");
    f.area
        .keep_refused(9, 0, &path, Some(b"refused own"), "test")
        .expect("keep refused");
    let sets = f.area.sets();
    let (dir, manifest) = sets
        .iter()
        .find(|(d, _)| d.ends_with("refused-9-19700101T000000Z"))
        .expect("the refused set, with a readable manifest");
    assert_eq!(manifest.kept[0].path, "MANIFEST.json.kept");
    assert_eq!(
        fs::read_to_string(dir.join("MANIFEST.json.kept")).expect("kept"),
        "refused own"
    );
}

/// A copy kept by a try that then could not list it (no room for the manifest) is
/// listed by the next try: else that try would find it kept, let the op replace the
/// original, and `twinfs conflicts` would never show the copy.
#[test]
fn a_kept_copy_left_unlisted_is_listed_by_the_next_try() {
    let f = Fenced::new();
    fs::write(f.volume.path().join("cmm.conf"), "loser's").expect("write");
    assert_eq!(f.keep("cmm.conf", "replaced"), 1);
    let (set, listed) = f.set();
    assert_eq!(listed, ["cmm.conf"]);
    // As if the listing had failed: the copy is there, the manifest is not.
    fs::remove_file(set.join("MANIFEST.json")).expect("rm");
    assert!(f.area.sets().is_empty());
    assert_eq!(f.keep("cmm.conf", "replaced"), 1);
    let (set, listed) = f.set();
    assert_eq!(listed, ["cmm.conf"]);
    assert_eq!(
        fs::read_to_string(set.join("cmm.conf")).expect("kept"),
        "loser's"
    );
    // Listed: a third try keeps and lists nothing more.
    assert_eq!(f.keep("cmm.conf", "replaced"), 0);
    assert_eq!(f.set().1, ["cmm.conf"]);
}

/// What the op leaves in place below a deleted directory (`never` paths) is not
/// copied: it is not at risk, and a state directory with no room for it would
/// otherwise hold the deletion up.
#[test]
fn what_a_deletion_leaves_in_place_is_not_kept() {
    let f = Fenced::new();
    let v = f.volume.path();
    fs::create_dir_all(v.join("app/cache")).expect("mkdir");
    fs::write(v.join("app/app.conf"), "loser's").expect("write");
    fs::write(v.join("app/cache/big"), "local only").expect("write");
    let applier = Applier::new(f.root.as_fd());
    let never = |p: &RelPath| p.as_path().starts_with("app/cache");
    let kept = f
        .area
        .keep(
            &applier,
            &RelPath::new("app").expect("path"),
            "deleted",
            &never,
        )
        .expect("keep");
    assert_eq!(kept, 2, "app and app/app.conf");
    let (set, _) = f.set();
    assert!(set.join("app/app.conf").exists());
    assert!(!set.join("app/cache").exists());
}

/// A file kept with its directory is listed as that directory: keeping it again later
/// in the set (the winner replaces it, say) adds no entry of its own.
#[test]
fn a_file_kept_with_its_directory_is_not_listed_again() {
    let f = Fenced::new();
    let v = f.volume.path();
    fs::create_dir(v.join("app")).expect("mkdir");
    fs::write(v.join("app/app.conf"), "loser's").expect("write");
    assert_eq!(f.keep("app", "deleted"), 2);
    assert_eq!(f.keep("app/app.conf", "replaced"), 0);
    assert_eq!(f.set().1, ["app"]);
    // Nothing there any more: nothing kept or listed either.
    fs::remove_file(v.join("app/app.conf")).expect("rm");
    fs::remove_file(f.set().0.join("MANIFEST.json")).expect("rm");
    assert_eq!(f.keep("app/app.conf", "replaced"), 0);
    assert!(f.area.sets().is_empty());
}
