//! The upstream rule without I/O: what a standby's outbox says each write was based
//! on, and which writes the active takes (the active's rules, never the standby's,
//! decide; a write based on a version the active no longer has is refused).

use std::path::Path;

use twinfs_replicator::manifest::{Entry, Kind, Manifest, Meta};
use twinfs_replicator::path::RelPath;
use twinfs_replicator::policy::{Direction, Policy, PolicySet, Rule, SyncMode};
use twinfs_replicator::protocol::{Message, Op};
use twinfs_replicator::upstream::{judge, Outbox};

fn rel(s: &str) -> RelPath {
    RelPath::new(s).expect("valid path")
}

fn policies() -> PolicySet {
    let both = Policy {
        direction: Direction::Both,
        ..Policy::DEFAULT
    };
    PolicySet::new(vec![
        // `both` with another sync mode is refused by the configuration; were it
        // there, it would not count.
        Rule::new(
            "/local",
            Policy {
                sync: SyncMode::Never,
                ..both
            },
        )
        .expect("rule"),
        Rule::new("passwd", both).expect("rule"),
        Rule::new("/users", both).expect("rule"),
    ])
}

fn meta(kind: Kind, hash: Option<u128>) -> Meta {
    Meta {
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: (1, 0),
        size: 1,
        hash,
        extra: None,
    }
}

fn file(hash: u128) -> Meta {
    meta(Kind::File, Some(hash))
}

fn put(path: &str, hash: u128) -> Op {
    Op::Put {
        entry: Entry {
            path: rel(path),
            meta: meta(Kind::File, Some(hash)),
        },
        content: Some(b"x".to_vec()),
    }
}

#[test]
fn upstream_paths_follow_the_rules() {
    let p = policies();
    for path in ["passwd", "x/passwd", "users", "users/a/b"] {
        assert!(p.resolve(Path::new(path)).upstream(), "{path}");
    }
    for path in ["", "cmm.conf", "passwd.old", "x/users/a", "local/passwd"] {
        assert!(!p.resolve(Path::new(path)).upstream(), "{path}");
    }
}

#[test]
fn the_active_takes_a_write_based_on_its_current_version() {
    let p = policies();
    assert_eq!(
        judge(&p, &put("passwd", 2), Some(1), Some(&file(1))),
        Ok(())
    );
    // A new file where the active has none either.
    assert_eq!(judge(&p, &put("users/bob", 2), None, None), Ok(()));
    assert_eq!(
        judge(
            &p,
            &Op::Delete {
                path: rel("users/bob")
            },
            Some(2),
            Some(&file(2))
        ),
        Ok(())
    );
    let rename = Op::Rename {
        from: rel("users/bob"),
        to: rel("users/robert"),
        exchange: false,
        unsent: false,
    };
    assert_eq!(judge(&p, &rename, Some(2), Some(&file(2))), Ok(()));
}

#[test]
fn the_active_refuses_a_write_based_on_a_version_it_no_longer_has() {
    let p = policies();
    let err = judge(&p, &put("passwd", 3), Some(1), Some(&file(2))).expect_err("changed meanwhile");
    assert!(err.contains("changed on the active"), "{err}");
    // The standby had no file; the active has one now.
    assert!(judge(&p, &put("users/bob", 3), None, Some(&file(2))).is_err());
    // The standby deletes what the active has changed.
    assert!(judge(
        &p,
        &Op::Delete {
            path: rel("passwd")
        },
        Some(1),
        Some(&file(2))
    )
    .is_err());
}

#[test]
fn a_put_must_find_what_the_standby_replaced_of_the_same_kind() {
    let p = policies();
    let dir = meta(Kind::Dir, None);
    let symlink = meta(Kind::Symlink, None);
    let mkdir = Op::Put {
        entry: Entry {
            path: rel("users/sub"),
            meta: dir.clone(),
        },
        content: None,
    };
    // A file where the active has a directory now: its tree is never replaced.
    let err = judge(&p, &put("users/sub", 1), None, Some(&dir)).expect_err("over a directory");
    assert!(err.contains("is a directory on the active"), "{err}");
    // A directory where the active has a symlink or a file.
    assert!(judge(&p, &mkdir, None, Some(&symlink)).is_err());
    assert!(judge(&p, &mkdir, None, Some(&file(1))).is_err());
    // The same kind: a directory's metadata, a new directory.
    assert_eq!(judge(&p, &mkdir, None, Some(&dir)), Ok(()));
    assert_eq!(judge(&p, &mkdir, None, None), Ok(()));
    // A directory the standby removed: taken, and applied as rmdir(2), which leaves
    // one the active has filled meanwhile alone.
    let rmdir = Op::Delete {
        path: rel("users/sub"),
    };
    assert_eq!(judge(&p, &rmdir, None, Some(&dir)), Ok(()));
}

#[test]
fn the_active_checks_the_rule_itself() {
    let p = policies();
    for op in [
        put("cmm.conf", 1),
        put("local/passwd", 1),
        Op::Delete {
            path: rel("cmm.conf"),
        },
        Op::Delete {
            path: RelPath::root(),
        },
        // Either end of a rename outside the rule.
        Op::Rename {
            from: rel("passwd"),
            to: rel("passwd.old"),
            exchange: false,
            unsent: false,
        },
        Op::Rename {
            from: rel("cmm.conf"),
            to: rel("users/cmm.conf"),
            exchange: false,
            unsent: false,
        },
        // Names twinfs keeps for itself.
        put("users/.twinfs-tmp", 1),
        // Not writes a standby sends.
        Op::Skip {
            path: rel("passwd"),
        },
        Op::PutStream {
            entry: Entry {
                path: rel("passwd"),
                meta: meta(Kind::File, None),
            },
        },
        // A file without its content.
        Op::Put {
            entry: Entry {
                path: rel("passwd"),
                meta: meta(Kind::File, None),
            },
            content: None,
        },
    ] {
        assert!(judge(&p, &op, None, None).is_err(), "{op:?} taken");
    }
}

/// The id and base of an upstream message.
fn upstream_of(message: &Message) -> (u64, Option<u128>) {
    match message {
        Message::Upstream { id, base, .. } => (*id, *base),
        other => panic!("not an upstream message: {other:?}"),
    }
}

fn base_of(message: &Message) -> Option<u128> {
    upstream_of(message).1
}

#[test]
fn the_outbox_bases_each_write_on_the_last_version_agreed_or_sent() {
    let mut outbox = Outbox::new(policies());
    let mut manifest = Manifest::new();
    manifest.insert(Entry {
        path: rel("passwd"),
        meta: meta(Kind::File, Some(1)),
    });
    manifest.insert(Entry {
        path: rel("cmm.conf"),
        meta: meta(Kind::File, Some(9)),
    });
    outbox.learn_manifest(&manifest);

    // Based on the full sync's version, then on its own write before any answer.
    let first = outbox.send(put("passwd", 2));
    assert_eq!(base_of(&first), Some(1));
    let second = outbox.send(put("passwd", 3));
    assert_eq!(base_of(&second), Some(2));
    assert_eq!(outbox.waiting(), 2);
    let Message::Upstream { id, .. } = first else {
        unreachable!()
    };
    assert_eq!(outbox.answered(id).map(|s| s.base), Some(Some(1)));
    assert_eq!(outbox.answered(id), None, "answered once");
    assert_eq!(outbox.waiting(), 1);

    // The active's version arrives: the next write is based on it.
    outbox.learn_applied(&put("passwd", 7));
    assert_eq!(base_of(&outbox.send(put("passwd", 8))), Some(7));

    // A new file has no base; a rename carries the base of what it moves.
    assert_eq!(base_of(&outbox.send(put("users/bob", 4))), None);
    let rename = Op::Rename {
        from: rel("users/bob"),
        to: rel("users/robert"),
        exchange: false,
        unsent: false,
    };
    assert_eq!(base_of(&outbox.send(rename)), Some(4));
    assert_eq!(
        base_of(&outbox.send(Op::Delete {
            path: rel("users/robert")
        })),
        Some(4)
    );
    // Deleted: a new file there is based on nothing.
    assert_eq!(base_of(&outbox.send(put("users/robert", 5))), None);
    // Deleting a directory forgets what was below it.
    outbox.learn_applied(&Op::Delete { path: rel("users") });
    assert_eq!(base_of(&outbox.send(put("users/robert", 6))), None);
}

fn id_of(message: &Message) -> u64 {
    upstream_of(message).0
}

#[test]
fn the_outbox_lets_out_no_more_than_its_window_unanswered() {
    use twinfs_replicator::upstream::{WINDOW, WINDOW_WRITES};
    let mut outbox = Outbox::new(policies());
    let mb = |n: u64| vec![0u8; (n << 20) as usize];
    let ids: Vec<u64> = (0..4)
        .map(|i| id_of(&outbox.send(put(&format!("users/f{i}"), i))))
        .collect();
    // 5 MiB, 5 MiB, 12 MiB, 1 MiB: the first goes, the second would pass the window
    // with it, and all wait in order behind it.
    for (id, size) in ids.iter().zip([5, 5, 12, 1]) {
        outbox.hold(*id, mb(size));
    }
    assert_eq!(outbox.release().map(|b| b.len()), Some(5 << 20));
    assert_eq!(
        outbox.release(),
        None,
        "5 + 5 MiB is past the {WINDOW}-byte window"
    );
    assert_eq!(outbox.held_bytes(), 18 << 20);
    assert_eq!(
        outbox.waiting(),
        4,
        "held back is still waiting for an answer"
    );
    // Answered: the next goes, and one larger than the window goes alone.
    assert!(outbox.answered(ids[0]).is_some());
    assert_eq!(outbox.release().map(|b| b.len()), Some(5 << 20));
    assert_eq!(outbox.release(), None);
    assert!(outbox.answered(ids[1]).is_some());
    assert_eq!(outbox.release().map(|b| b.len()), Some(12 << 20));
    assert_eq!(
        outbox.release(),
        None,
        "nothing joins a write past the window"
    );
    assert!(outbox.answered(ids[2]).is_some());
    assert_eq!(outbox.release().map(|b| b.len()), Some(1 << 20));
    assert_eq!(outbox.held_bytes(), 0);
    assert!(outbox.answered(ids[3]).is_some());
    assert_eq!(outbox.waiting(), 0);
    // An answer for a write never let out (an encoding failure) counts nothing off.
    let late = id_of(&outbox.send(put("users/g", 9)));
    assert!(outbox.answered(late).is_some());
    outbox.hold(99, mb(1));
    assert_eq!(outbox.release().map(|b| b.len()), Some(1 << 20));
    assert!(outbox.answered(99).is_none());

    // Small writes: no more than WINDOW_WRITES on their way at once.
    let small: Vec<u64> = (0..WINDOW_WRITES + 10)
        .map(|i| {
            let id = id_of(&outbox.send(put(&format!("users/s{i}"), i as u128)));
            outbox.hold(id, vec![0; 100]);
            id
        })
        .collect();
    let mut out = 0;
    while outbox.release().is_some() {
        out += 1;
    }
    assert_eq!(out, WINDOW_WRITES);
    assert!(outbox.answered(small[0]).is_some());
    assert!(outbox.release().is_some());
    assert_eq!(outbox.release(), None);
}
