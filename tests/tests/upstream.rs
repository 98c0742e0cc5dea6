//! Upstream writes end to end: a standby's local writes of `direction = "both"`
//! paths reach the active and the other standbys; everything else stays read-only on
//! a standby; when both sides change a file, the active's version wins and the
//! standby keeps its own in its conflicts area. Real `twinfs mount` daemons.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use twinfs_tests::daemon::{wait_until, Cluster, Node};

const CONVERGE: Duration = Duration::from_secs(30);

const RULES: &str = r#"
[[volume.rule]]
match = "passwd"
sync = "always"
direction = "both"

[[volume.rule]]
match = "/users"
sync = "always"
direction = "both"
"#;

fn fill(dir: &Path) {
    fs::write(dir.join("passwd"), "root:x:0:0\n").expect("fill");
    fs::write(dir.join("cmm.conf"), "chassis_id = 42\n").expect("fill");
    fs::create_dir(dir.join("users")).expect("fill");
    fs::write(dir.join("users/admin"), "password = old\n").expect("fill");
}

fn read(path: impl AsRef<Path>) -> Option<String> {
    fs::read_to_string(path).ok()
}

fn erofs<T: std::fmt::Debug>(what: &str, result: std::io::Result<T>) {
    match result {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
        other => panic!("{what}: expected EROFS, got {other:?}"),
    }
}

/// Waits until the standby takes local writes of its upstream paths (it does once
/// its first full sync with the active is through), by writing `content` to `path`.
fn write_once_open(node: &Node, path: &str, content: &str) {
    let target = node.volume.join(path);
    assert!(
        wait_until(CONVERGE, || fs::write(&target, content).is_ok()),
        "the standby never took a write of {path}: {:?}\nlog:\n{}",
        fs::write(&target, content),
        node.log_text()
    );
}

fn wait_content(node: &Node, path: &str, want: &str) {
    let at = node.volume.join(path);
    assert!(
        wait_until(CONVERGE, || read(&at).as_deref() == Some(want)),
        "{path} on {}: {:?}, want {want:?}\nlog:\n{}",
        node.volume.display(),
        read(&at),
        node.log_text()
    );
}

/// The content `node` keeps of `path` in a set of its conflicts area, if any.
fn kept(node: &Node, path: &str) -> Option<String> {
    fs::read_dir(node.state_dir.join("conflicts/vol"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path().join(path))
        .find_map(read)
}

/// Has the standby (node 1) take cmm.conf for a `both` path, which the active does not.
fn cmm_conf_is_both_on_the_standby(c: &Cluster) {
    let config = &c.nodes[1].config;
    let mut text = fs::read_to_string(config).expect("config");
    text.push_str(
        "\n[[volume.rule]]\nmatch = \"cmm.conf\"\nsync = \"always\"\ndirection = \"both\"\n",
    );
    fs::write(config, text).expect("config");
}

fn sh(script: &str) {
    let status = Command::new("sh")
        .args(["-c", script])
        .status()
        .expect("sh");
    assert!(status.success(), "sh -c {script:?}: {status}");
}

#[test]
fn both_writes_on_a_standby_reach_the_active_and_the_other_standbys() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(3, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let standby = &c.nodes[1];

    // A password reset on the standby, with fs::write.
    write_once_open(standby, "passwd", "root:x:0:0\nadmin:x:1000:1000\n");
    for node in [&c.nodes[0], &c.nodes[2]] {
        wait_content(node, "passwd", "root:x:0:0\nadmin:x:1000:1000\n");
    }
    c.wait_converged(CONVERGE);

    // A shell redirection, to an existing file and to a new one under a `both`
    // directory.
    let users = standby.volume.join("users");
    let users_mtime = |node: &Node| {
        fs::metadata(node.volume.join("users"))
            .and_then(|m| m.modified())
            .ok()
    };
    let before = users_mtime(&c.nodes[0]);
    sh(&format!(
        "echo 'password = new' > {0}/admin && echo 'password = bob' > {0}/bob",
        users.display()
    ));
    for node in [&c.nodes[0], &c.nodes[2]] {
        wait_content(node, "users/admin", "password = new\n");
        wait_content(node, "users/bob", "password = bob\n");
    }
    c.wait_converged(CONVERGE);
    // The new file moved the directory's mtime on the active, as a local create
    // would, and every node has that time.
    let after = users_mtime(&c.nodes[0]);
    assert!(
        after > before,
        "users: {after:?}, before the create {before:?}"
    );
    assert!(
        wait_until(CONVERGE, || c.nodes.iter().all(|n| users_mtime(n) == after)),
        "users: active {after:?}, standbys {:?} {:?}",
        users_mtime(&c.nodes[1]),
        users_mtime(&c.nodes[2])
    );

    // chmod and touch.
    fs::set_permissions(users.join("bob"), fs::Permissions::from_mode(0o600)).expect("chmod");
    let mode = |node: &Node| {
        fs::metadata(node.volume.join("users/bob"))
            .map(|m| m.permissions().mode() & 0o7777)
            .ok()
    };
    assert!(
        wait_until(CONVERGE, || mode(&c.nodes[0]) == Some(0o600)),
        "mode on the active: {:?}\nactive log:\n{}\nstandby log:\n{}",
        mode(&c.nodes[0]),
        c.nodes[0].log_text(),
        standby.log_text()
    );
    sh(&format!(
        "touch -d '2001-02-03 04:05:06' {}/bob",
        users.display()
    ));
    let mtime = |node: &Node| {
        fs::metadata(node.volume.join("users/bob"))
            .and_then(|m| m.modified())
            .ok()
    };
    let want = mtime(standby);
    assert!(
        wait_until(CONVERGE, || mtime(&c.nodes[0]) == want),
        "mtime on the active: {:?}, want {want:?}",
        mtime(&c.nodes[0])
    );
    c.wait_converged(CONVERGE);

    // Within the `both` directory: a new directory, a rename, a deletion.
    fs::create_dir(users.join("team")).expect("mkdir under users");
    fs::rename(users.join("bob"), users.join("team/robert")).expect("rename under users");
    fs::remove_file(users.join("admin")).expect("rm under users");
    for node in [&c.nodes[0], &c.nodes[2]] {
        wait_content(node, "users/team/robert", "password = bob\n");
        let gone = node.volume.join("users/admin");
        assert!(
            wait_until(CONVERGE, || !gone.exists()
                && !node.volume.join("users/bob").exists()),
            "users/admin and users/bob still on {}",
            node.volume.display()
        );
    }
    c.wait_converged(CONVERGE);
    // Nothing conflicted.
    assert_eq!(standby.volume_status()["conflicts"].as_u64(), Some(0));
}

#[test]
fn everything_else_stays_read_only_on_a_standby() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let standby = &c.nodes[1];
    let v = &standby.volume;
    write_once_open(standby, "passwd", "root:x:0:0\nop:x:1:1\n");

    erofs("write a plain file", fs::write(v.join("cmm.conf"), "x"));
    erofs("create a plain file", fs::write(v.join("new.conf"), "x"));
    erofs("delete a plain file", fs::remove_file(v.join("cmm.conf")));
    erofs(
        "rename both -> plain",
        fs::rename(v.join("passwd"), v.join("passwd.old")),
    );
    erofs(
        "rename plain -> both",
        fs::rename(v.join("cmm.conf"), v.join("users/cmm.conf")),
    );
    erofs("mkdir outside a both rule", fs::create_dir(v.join("etc")));
    erofs(
        "chmod a plain file",
        fs::set_permissions(v.join("cmm.conf"), fs::Permissions::from_mode(0o600)),
    );
    erofs(
        "chmod the root",
        fs::set_permissions(v, fs::Permissions::from_mode(0o700)),
    );
    erofs(
        "hard link of a plain file into a both directory",
        fs::hard_link(v.join("cmm.conf"), v.join("users/link")),
    );
    erofs(
        "symlink outside a both rule",
        std::os::unix::fs::symlink("passwd", v.join("pw")),
    );

    // The active still takes every write, and the standby gets them.
    fs::write(c.active().join("cmm.conf"), "chassis_id = 7\n").expect("write on the active");
    wait_content(standby, "cmm.conf", "chassis_id = 7\n");
    c.wait_converged(CONVERGE);
    assert_eq!(
        read(c.active().join("passwd")).as_deref(),
        Some("root:x:0:0\nop:x:1:1\n")
    );
    assert!(!c.active().join("new.conf").exists());
}

#[test]
fn a_concurrent_change_the_actives_version_wins_and_the_standby_keeps_its_own() {
    let _serial = twinfs_tests::serial();
    use twinfs_tests::daemon::NetPair;
    let net = NetPair::new((std::process::id() % 250) as u8);
    let mut c = Cluster::in_namespaces(&net, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let (active, standby) = (&c.nodes[0], &c.nodes[1]);
    write_once_open(standby, "users/admin", "password = agreed\n");
    wait_content(active, "users/admin", "password = agreed\n");

    // Neither hears the other while both change the same file: the standby's write
    // is based on "agreed", which the active no longer has when it arrives.
    net.cut();
    fs::write(active.volume.join("users/admin"), "password = active\n").expect("active");
    fs::write(standby.volume.join("users/admin"), "password = standby\n").expect("standby");
    net.heal();

    wait_content(standby, "users/admin", "password = active\n");
    c.wait_converged(CONVERGE);
    assert_eq!(
        read(active.volume.join("users/admin")).as_deref(),
        Some("password = active\n")
    );

    // The standby's version is in its conflicts area, and listed.
    let kept = || kept(standby, "users/admin");
    assert!(
        wait_until(CONVERGE, || kept().as_deref()
            == Some("password = standby\n")),
        "kept: {:?}\nstandby log:\n{}\nactive log:\n{}",
        kept(),
        standby.log_text(),
        active.log_text()
    );
    let out = standby.twinfs(&["conflicts"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains("users/admin"), "{listed}");
    assert!(
        listed.contains("refused by the active of epoch 1"),
        "{listed}"
    );
    assert!(active.twinfs(&["conflicts"]).status.success());
    assert!(
        String::from_utf8_lossy(&active.twinfs(&["conflicts"]).stdout).contains("no conflicts")
    );
}

#[test]
fn the_active_refuses_a_path_that_is_not_both_under_its_own_rules() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    // The standby (wrongly) believes cmm.conf is a `both` path; the active does not.
    cmm_conf_is_both_on_the_standby(&c);
    c.start();
    c.wait_converged(CONVERGE);
    let standby = &c.nodes[1];
    write_once_open(standby, "cmm.conf", "chassis_id = 666\n");

    // Refused and logged by the active, which stays up; its version comes back.
    assert!(
        wait_until(CONVERGE, || c.nodes[0]
            .log_text()
            .contains("is not a direction = \"both\" path on the active")),
        "active log:\n{}",
        c.nodes[0].log_text()
    );
    wait_content(standby, "cmm.conf", "chassis_id = 42\n");
    c.wait_converged(CONVERGE);
    let listed = || String::from_utf8_lossy(&standby.twinfs(&["conflicts"]).stdout).into_owned();
    assert!(
        wait_until(CONVERGE, || listed().contains("cmm.conf")),
        "{}",
        listed()
    );
    // Still replicating.
    fs::write(c.active().join("passwd"), "root:x:0:0\nnew:x:2:2\n").expect("write on the active");
    wait_content(standby, "passwd", "root:x:0:0\nnew:x:2:2\n");
}

/// An upstream write of a file too large for a message is not read into the standby
/// daemon's memory first (a file of gigabytes would take it down): it stays on the
/// standby, said so in its log, and the daemon goes on.
#[test]
fn an_upstream_write_too_large_for_a_message_is_not_read_into_memory() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let standby = &c.nodes[1];
    write_once_open(standby, "users/admin", "password = new\n");
    wait_content(&c.nodes[0], "users/admin", "password = new\n");
    fs::write(standby.volume.join("users/big"), vec![7u8; 200 << 20]).expect("write");
    assert!(
        wait_until(CONVERGE, || standby
            .log_text()
            .contains("file too large to ship in one message")),
        "standby log:\n{}",
        standby.log_text()
    );
    let pid = standby.pid().expect("the standby's daemon runs");
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    assert!(
        peak_kib < 150 << 10,
        "the standby's daemon peaked at {peak_kib} KiB"
    );
    // Still replicating both ways.
    fs::write(standby.volume.join("passwd"), "root:x:0:0\nup:x:3:3\n").expect("write");
    wait_content(&c.nodes[0], "passwd", "root:x:0:0\nup:x:3:3\n");
}

/// The active dies with a standby's write unconfirmed and comes back at once: the
/// standby's session with it before (its connection lingers until the idle timeout)
/// ends first and arms the conflicts area, so the new session's full sync keeps that
/// write before it replaces it; and the standby takes local writes again after.
#[test]
fn an_unconfirmed_write_is_kept_when_the_active_comes_back_before_the_old_session_ends() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    write_once_open(&c.nodes[1], "users/admin", "password = agreed\n");
    wait_content(&c.nodes[0], "users/admin", "password = agreed\n");

    c.nodes[0].signal(libc::SIGSTOP);
    fs::write(
        c.nodes[1].volume.join("users/admin"),
        "password = unconfirmed\n",
    )
    .expect("write on the standby");
    c.nodes[0].kill9();
    c.nodes[0].start(&[]);
    let standby = &c.nodes[1];
    wait_content(standby, "users/admin", "password = agreed\n");
    assert!(
        wait_until(CONVERGE, || kept(standby, "users/admin").as_deref()
            == Some("password = unconfirmed\n")),
        "kept: {:?}\nstandby log:\n{}",
        kept(standby, "users/admin"),
        standby.log_text()
    );
    write_once_open(standby, "passwd", "root:x:0:0\nafter:x:3:3\n");
    wait_content(&c.nodes[0], "passwd", "root:x:0:0\nafter:x:3:3\n");
    c.wait_converged(CONVERGE);
}

/// A refused write the standby cannot keep (its conflicts area takes nothing) is not
/// replaced by the active's version until it is kept: once the area takes files
/// again, the next full sync keeps it, then applies the active's.
#[test]
fn a_refused_write_that_cannot_be_kept_is_not_replaced() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    cmm_conf_is_both_on_the_standby(&c);
    let area = c.nodes[1].state_dir.join("conflicts/vol");
    fs::create_dir_all(&area).expect("conflicts area");
    c.start();
    c.wait_converged(CONVERGE);
    let standby = &c.nodes[1];
    let full = twinfs_tests::Immutable::set(&area);
    write_once_open(standby, "cmm.conf", "chassis_id = 666\n");
    assert!(
        wait_until(CONVERGE, || standby
            .log_text()
            .contains("cannot keep a refused upstream write")),
        "standby log:\n{}",
        standby.log_text()
    );
    // The active's version came, and more than one full sync since: none replaced it.
    assert!(
        wait_until(CONVERGE, || standby
            .log_text()
            .matches("cannot keep this node's version in the conflicts area")
            .count()
            >= 2),
        "standby log:\n{}",
        standby.log_text()
    );
    assert_eq!(
        read(standby.volume.join("cmm.conf")).as_deref(),
        Some("chassis_id = 666\n")
    );

    drop(full);
    let out = c.nodes[0].twinfs(&["sync", "--full"]);
    assert!(out.status.success(), "{out:?}");
    wait_content(standby, "cmm.conf", "chassis_id = 42\n");
    assert_eq!(
        kept(standby, "cmm.conf").as_deref(),
        Some("chassis_id = 666\n")
    );
    c.wait_converged(CONVERGE);
}

#[test]
fn a_sync_upstream_write_is_on_the_active_when_close_returns() {
    let _serial = twinfs_tests::serial();
    let rules = "[[volume.rule]]\nmatch = \"passwd\"\nsync = \"always\"\ndirection = \"both\"\ndurability = \"sync\"\n";
    let mut c = Cluster::new(3, rules, fill);
    c.start();
    c.wait_converged(CONVERGE);
    write_once_open(&c.nodes[1], "passwd", "root:x:0:0\nfirst:x:1:1\n");
    for i in 0..5 {
        let content = format!("root:x:0:0\nuser{i}:x:1:1\n");
        fs::write(c.nodes[1].volume.join("passwd"), &content).expect("write on the standby");
        // With async durability the write is usually still on its way here.
        for node in [&c.nodes[0], &c.nodes[2]] {
            assert_eq!(
                read(node.volume.join("passwd")).as_deref(),
                Some(content.as_str()),
                "{} when close() returned on the standby",
                node.volume.display()
            );
        }
    }
}

#[test]
fn a_standby_write_still_open_when_the_actives_version_arrives_is_kept() {
    use std::io::Write;
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let (active, standby) = (&c.nodes[0], &c.nodes[1]);
    write_once_open(standby, "users/admin", "password = old\n");
    c.wait_converged(CONVERGE);

    // A local writer on the standby holds the file open while the active changes it.
    let mut held = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(standby.volume.join("users/admin"))
        .expect("open on the standby");
    held.write_all(b"password = typed on the standby")
        .expect("write on the standby");
    fs::write(active.volume.join("users/admin"), "password = active\n").expect("write");
    wait_content(standby, "users/admin", "password = active\n");
    // Its file is gone from the volume: further writes are refused, not lost.
    erofs(
        "a write to the replaced file",
        held.write_all(b", and more\n"),
    );
    drop(held);

    // The active's version stands everywhere; what the writer wrote is kept.
    c.wait_converged(CONVERGE);
    assert_eq!(
        read(active.volume.join("users/admin")).as_deref(),
        Some("password = active\n")
    );
    assert_eq!(
        kept(standby, "users/admin").as_deref(),
        Some("password = typed on the standby"),
        "standby log:\n{}",
        standby.log_text()
    );
    let listed = String::from_utf8_lossy(&standby.twinfs(&["conflicts"]).stdout).into_owned();
    assert!(listed.contains("users/admin"), "{listed}");
}

#[test]
fn an_upstream_write_never_removes_a_tree_the_active_filled_meanwhile() {
    let _serial = twinfs_tests::serial();
    use twinfs_tests::daemon::NetPair;
    let net = NetPair::new((std::process::id() % 250) as u8);
    let mut c = Cluster::in_namespaces(&net, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let (active, standby) = (&c.nodes[0], &c.nodes[1]);
    fs::create_dir(active.volume.join("users/sub")).expect("mkdir on the active");
    write_once_open(standby, "users/admin", "password = agreed\n");
    c.wait_converged(CONVERGE);

    // Cut off, the active fills users/sub and makes a directory users/team, while
    // the standby removes users/sub (empty there) and writes a file users/team.
    net.cut();
    fs::write(
        active.volume.join("users/sub/new.txt"),
        "made on the active\n",
    )
    .expect("active");
    fs::create_dir(active.volume.join("users/team")).expect("mkdir on the active");
    fs::write(active.volume.join("users/team/a"), "in the team\n").expect("active");
    fs::remove_dir(standby.volume.join("users/sub")).expect("rmdir on the standby");
    fs::write(standby.volume.join("users/team"), "a file on the standby\n").expect("standby");
    net.heal();

    // The active's trees stand, everywhere; the standby keeps its file.
    wait_content(standby, "users/sub/new.txt", "made on the active\n");
    wait_content(standby, "users/team/a", "in the team\n");
    c.wait_converged(CONVERGE);
    assert_eq!(
        read(active.volume.join("users/sub/new.txt")).as_deref(),
        Some("made on the active\n"),
        "active log:\n{}",
        active.log_text()
    );
    assert_eq!(
        read(active.volume.join("users/team/a")).as_deref(),
        Some("in the team\n")
    );
    let kept = || kept(standby, "users/team");
    assert!(
        wait_until(CONVERGE, || kept().as_deref()
            == Some("a file on the standby\n")),
        "kept: {:?}\nstandby log:\n{}",
        kept(),
        standby.log_text()
    );
}

/// An active and a standby, converged, the standby taking local writes of `passwd`.
fn taking_writes_of_passwd() -> Cluster {
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    write_once_open(&c.nodes[1], "passwd", "root:x:0:0\n");
    c.wait_converged(CONVERGE);
    c
}

/// The first two lines of a version (the rest is padding).
fn head(version: &str) -> String {
    version.lines().take(2).collect::<Vec<_>>().join("/")
}

/// The first two lines of every version of `passwd` that `node` keeps.
fn kept_heads(node: &Node) -> Vec<String> {
    kept_versions(node, "passwd")
        .iter()
        .map(|k| head(k))
        .collect()
}

/// Every version of `name` (a file at the volume root) that `node` keeps in its
/// conflicts area, in any set (`name`, `name.2`, ...).
fn kept_versions(node: &Node, name: &str) -> Vec<String> {
    let sets = fs::read_dir(node.state_dir.join("conflicts/vol"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok);
    let mut out = Vec::new();
    for set in sets {
        for entry in fs::read_dir(set.path())
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
        {
            let file = entry.file_name().to_string_lossy().into_owned();
            if file == name || file.starts_with(&format!("{name}.")) {
                out.extend(read(entry.path()));
            }
        }
    }
    out
}

#[test]
fn a_standby_write_closed_while_the_actives_version_is_applied_is_never_lost() {
    // 0 to 8 ms after the active's write, in steps of 40 µs.
    closes_while_the_actives_version_arrives(0, 200, Duration::from_micros(40));
}

#[test]
fn a_standby_write_closed_while_the_actives_large_version_streams_is_never_lost() {
    // A file over 1 MiB travels on a stream of its own and is put in place in the
    // background: 0 to 60 ms after the active's write, in steps of 1.5 ms.
    closes_while_the_actives_version_arrives(2 << 20, 40, Duration::from_micros(1500));
}

/// A writer on the standby closes its file while the active's version of it is on
/// its way or being put in place there (after a delay that sweeps that time: round
/// `r` of `rounds` waits `r × step`; each version is padded to `pad` bytes). Its close
/// must either go upstream before the active's version replaces its file (and be
/// refused, the active having changed the file since) or find its file replaced;
/// either way what it wrote ends up in the conflicts area, and the active's version
/// stays: never the standby's shipped as if based on the active's (which the active
/// would take over its own), nor the active's in place of the standby's.
fn closes_while_the_actives_version_arrives(pad: usize, rounds: u32, step: Duration) {
    use std::io::Write;
    let _serial = twinfs_tests::serial();
    let c = taking_writes_of_passwd();
    let (active, standby) = (&c.nodes[0], &c.nodes[1]);
    let (on_active, on_standby) = (active.volume.join("passwd"), standby.volume.join("passwd"));
    let padded = |s: String| format!("{s}{}", "#".repeat(pad.saturating_sub(s.len())));
    for round in 0..rounds {
        let mine = padded(format!("root:x:0:0\nstandby:{round}\n"));
        let theirs = padded(format!("root:x:0:0\nactive:{round}\n"));
        // (The active may still be sending its version of the round before again,
        // after it refused the standby's: a write then finds its file replaced.)
        let mut attempts = 0;
        let held = loop {
            let mut held = fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&on_standby)
                .expect("open on the standby");
            match held.write_all(mine.as_bytes()) {
                Ok(()) => break held,
                Err(e) if e.raw_os_error() == Some(libc::EROFS) && attempts < 10 => {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("round {round}: write on the standby: {e}"),
            }
        };
        fs::write(&on_active, &theirs).expect("write on the active");
        std::thread::sleep(step * round);
        drop(held);
        let settled = || {
            kept_versions(standby, "passwd").contains(&mine)
                && read(&on_active).as_deref() == Some(theirs.as_str())
                && read(&on_standby).as_deref() == Some(theirs.as_str())
        };
        assert!(
            wait_until(Duration::from_secs(10), settled),
            "round {round}: want the active's version on both nodes and the standby's \
             kept; kept: {:?}, the active has {:?}, the standby {:?}\n\
             standby log:\n{}\nactive log:\n{}",
            kept_heads(standby),
            read(&on_active).as_deref().map(head),
            read(&on_standby).as_deref().map(head),
            standby.log_text(),
            active.log_text()
        );
    }
}

#[test]
fn a_standby_write_made_once_the_actives_large_version_is_in_place_is_taken() {
    let _serial = twinfs_tests::serial();
    let c = taking_writes_of_passwd();
    let (active, standby) = (&c.nodes[0], &c.nodes[1]);
    let (on_active, on_standby) = (active.volume.join("passwd"), standby.volume.join("passwd"));
    // A file over 1 MiB streams and is put in place in the background: a write made
    // on the standby as soon as it reads the active's version there is based on that
    // version, and the active takes it (not a conflict).
    let pad = |s: String| format!("{s}{}", "#".repeat((2 << 20) - s.len()));
    for round in 0..10 {
        let theirs = pad(format!("root:x:0:0\nactive:{round}\n"));
        let mine = pad(format!("root:x:0:0\nstandby:{round}\n"));
        fs::write(&on_active, &theirs).expect("write on the active");
        let deadline = std::time::Instant::now() + CONVERGE;
        while read(&on_standby).as_deref() != Some(theirs.as_str()) {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: the active's version never showed on the standby"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        fs::write(&on_standby, &mine).expect("write on the standby");
        assert!(
            wait_until(CONVERGE, || read(&on_active).as_deref()
                == Some(mine.as_str())),
            "round {round}: the active has {:?}; kept on the standby: {:?}\nstandby log:\n{}",
            read(&on_active).as_deref().map(head),
            kept_heads(standby),
            standby.log_text()
        );
    }
    assert!(
        kept_versions(standby, "passwd").is_empty(),
        "conflicts kept: {:?}",
        kept_heads(standby)
    );
}

/// Heavy traffic both ways at once: the active writes many files while a standby
/// writes large `both` files faster than the active takes them. Until 2026-12-05 both
/// sessions could end up waiting to write, each for the other to read (the active
/// shipping its files, the standby its upstream writes), and never read again:
/// replication stopped for good with both nodes connected; and the standby held every
/// write it had read in memory until answered (2 GB here).
#[test]
fn heavy_writes_both_ways_at_once_converge_and_lose_nothing() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    write_once_open(&c.nodes[1], "users/first", "x");
    let active = c.nodes[0].volume.clone();
    let standby = c.nodes[1].volume.clone();
    let body = |i: u32, size: usize| vec![(i % 251) as u8 + 1; size];
    let writer = std::thread::spawn(move || {
        fs::create_dir(active.join("act")).expect("mkdir");
        for i in 0..300 {
            fs::write(active.join(format!("act/f{i}")), body(i, 1 << 20)).expect("active write");
        }
    });
    const BIG: u32 = 60;
    for i in 0..BIG {
        fs::write(standby.join(format!("users/big{i}")), body(i, 8 << 20)).expect("standby write");
    }
    writer.join().expect("active writer");
    c.wait_converged(Duration::from_secs(300));
    // Each of the standby's writes was taken by the active, or (when the standby
    // held too much for an active slow to take them) kept in its conflicts area.
    let has = |path: &Path, want: &[u8]| fs::read(path).is_ok_and(|got| got == want);
    for i in 0..BIG {
        let name = format!("users/big{i}");
        let want = body(i, 8 << 20);
        let taken = has(&c.nodes[0].volume.join(&name), &want);
        let kept = fs::read_dir(c.nodes[1].state_dir.join("conflicts/vol"))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .any(|set| has(&set.path().join(&name), &want));
        assert!(taken || kept, "{name}: the standby's write is lost");
    }
    // The standby held a bounded part of its 480 MiB of writes in memory at a time.
    let peak = c.nodes[1].pid().and_then(|pid| {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok()
    });
    let peak = peak.expect("the standby's peak memory");
    assert!(peak < 512 << 10, "the standby's peak memory: {peak} KiB");
}
