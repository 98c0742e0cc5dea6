//! Failover end to end: real `twinfs mount` daemons, each in its own network
//! namespace (on one bridge, or a veth pair where a test cuts the link), promoted,
//! demoted, killed and restarted; epochs fence a node that was active before.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use twinfs_tests::daemon::{wait_until, Cluster, NetBridge, Node};

const CONVERGE: Duration = Duration::from_secs(30);

const RULES: &str = r#"
[[volume.rule]]
match = "passwd"
sync = "always"
priority = 1
"#;

/// A subnet of 198.18.0.0/15 for this test process's namespaces.
fn subnet() -> u8 {
    (std::process::id() % 200 + 20) as u8
}

fn fill(dir: &Path) {
    fs::write(dir.join("passwd"), "root:x:0:0\n").expect("fill");
    fs::write(dir.join("cmm.conf"), "chassis_id = 42\n").expect("fill");
}

/// The node's role and epoch for the volume, from `twinfs status --json`.
fn role_epoch(node: &Node) -> (String, u64) {
    let v = node.volume_status();
    (
        v["role"].as_str().unwrap_or_default().to_owned(),
        v["epoch"].as_u64().unwrap_or_default(),
    )
}

fn wait_role(node: &Node, role: &str, epoch: u64) {
    assert!(
        wait_until(CONVERGE, || role_epoch(node) == (role.to_owned(), epoch)),
        "expected {role} at epoch {epoch}, got {:?}; log:\n{}",
        role_epoch(node),
        node.log_text()
    );
}

/// Waits until the standby `node` follows a connected active and is in sync.
fn wait_ready(node: &Node, active: &Node) {
    assert!(
        wait_until(CONVERGE, || {
            let v = node.volume_status();
            v["peers"].as_array().is_some_and(|peers| {
                peers.iter().any(|p| {
                    p["connected"] == true && p["peer_role"] == "active" && p["full_sync"] == "done"
                })
            })
        }),
        "standby not in sync: {}\nlog:\n{}\nactive's log:\n{}",
        node.volume_status(),
        node.log_text(),
        active.log_text()
    );
}

/// Waits until the standby `node` is fit to take over, as recorded.
fn wait_fit(node: &Node) {
    assert!(
        wait_until(CONVERGE, || node.volume_status()["takeover"] == "ready"),
        "{}",
        node.volume_status()
    );
}

fn run_ok(node: &Node, args: &[&str]) -> String {
    let out = node.twinfs(args);
    assert!(
        out.status.success(),
        "twinfs {args:?}: {}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.log_text()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn is_erofs(result: std::io::Result<()>) -> bool {
    matches!(result, Err(e) if e.raw_os_error() == Some(libc::EROFS))
}

#[test]
fn unplanned_failover_and_the_old_active_comes_back_as_a_standby() {
    let _serial = twinfs_tests::serial();
    let net = NetBridge::new(subnet(), 3);
    let mut c = Cluster::in_bridge(&net, 0, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    fs::write(c.active().join("passwd"), "root:x:0:0\nadmin:x:1000:1000\n").expect("write");
    c.wait_converged(CONVERGE);
    wait_fit(&c.nodes[1]);
    assert_eq!(c.nodes[0].volume_status()["takeover"], "active");

    c.nodes[0].kill9();
    let said = run_ok(&c.nodes[1], &["promote"]);
    assert!(said.contains("epoch 2"), "{said}");
    assert_eq!(role_epoch(&c.nodes[1]), ("active".into(), 2));
    // Writes on the new active reach the remaining standby, which follows epoch 2.
    fs::write(
        c.nodes[1].volume.join("after-failover"),
        "written on node1\n",
    )
    .expect("write");
    assert!(
        wait_until(CONVERGE, || c.nodes[2]
            .volume
            .join("after-failover")
            .exists()),
        "node2 log:\n{}",
        c.nodes[2].log_text()
    );
    wait_role(&c.nodes[2], "standby", 2);

    // The old active comes back with its old state, and a file written behind its
    // back meanwhile: it is fenced, becomes a standby, and nothing of it reaches the
    // others.
    fs::write(
        c.nodes[0].volume.join("stale-write"),
        "from the old active\n",
    )
    .expect("write");
    c.nodes[0].start(&[]);
    wait_role(&c.nodes[0], "standby", 2);
    c.wait_converged_to(1, CONVERGE);
    for node in &c.nodes[1..] {
        assert!(!node.volume.join("stale-write").exists());
    }
    assert!(
        is_erofs(fs::write(c.nodes[0].volume.join("x"), "y")),
        "a fenced node refuses local writes"
    );
    assert!(
        c.nodes[0].log_text().contains("fenced"),
        "the log says why it stepped down"
    );
}

#[test]
fn demote_then_promote_elsewhere_moves_the_active_role() {
    let _serial = twinfs_tests::serial();
    let net = NetBridge::new(subnet(), 2);
    let mut c = Cluster::in_bridge(&net, 0, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    fs::write(c.active().join("cmm.conf"), "chassis_id = 43\n").expect("write");

    let said = run_ok(&c.nodes[0], &["demote"]);
    assert!(said.contains("acknowledged everything: node1"), "{said}");
    assert!(is_erofs(fs::write(c.active().join("late"), "x")));
    assert_eq!(role_epoch(&c.nodes[0]), ("standby".into(), 1));
    assert_eq!(
        fs::read_to_string(c.nodes[1].volume.join("cmm.conf")).expect("read"),
        "chassis_id = 43\n",
        "what was written before the demotion is on the standby when demote returns"
    );

    run_ok(&c.nodes[1], &["promote", "vol"]);
    assert_eq!(role_epoch(&c.nodes[1]), ("active".into(), 2));
    fs::write(c.nodes[1].volume.join("passwd"), "root:x:0:0\nnew:x:1:1\n").expect("write");
    wait_role(&c.nodes[0], "standby", 2);
    c.wait_converged_to(1, CONVERGE);
    // Promoting an active node is a no-op, and says so.
    assert!(run_ok(&c.nodes[1], &["promote"]).contains("already active"));
    // The standby had everything: nothing of node0's was at risk, nothing kept.
    assert!(!c.nodes[0].state_dir.join("conflicts/vol/PENDING").exists());
    assert!(run_ok(&c.nodes[0], &["conflicts"]).contains("no conflicts"));
}

/// A demotion while the standby is away: the standby that takes over lacks what was
/// written last on the demoted node, and its full sync replaces it there, so the
/// demoted node keeps its versions in its conflicts area first, as a fenced node does.
#[test]
fn a_demotion_with_a_standby_behind_keeps_what_the_new_active_replaces() {
    let _serial = twinfs_tests::serial();
    let net = NetBridge::new(subnet(), 2);
    let mut c = Cluster::in_bridge(&net, 0, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    // (Fit to take over, as recorded, before it stops.)
    wait_fit(&c.nodes[1]);
    c.nodes[1].stop();
    let a = c.nodes[0].volume.clone();
    fs::write(a.join("cmm.conf"), "chassis_id = 44 (node0 only)\n").expect("write");
    fs::write(a.join("late"), "node0 only\n").expect("write");

    // (It waits up to 30 s for node1, which is away.)
    let said = run_ok(&c.nodes[0], &["demote"]);
    assert!(
        said.contains("NOT acknowledged: node1") && said.contains("kept first"),
        "{said}"
    );
    c.nodes[1].start(&[]);
    run_ok(&c.nodes[1], &["promote"]);
    assert_eq!(role_epoch(&c.nodes[1]), ("active".into(), 2));
    wait_role(&c.nodes[0], "standby", 2);
    c.wait_converged_to(1, CONVERGE);
    assert_eq!(
        fs::read_to_string(a.join("cmm.conf")).expect("read"),
        "chassis_id = 42\n"
    );
    assert!(!a.join("late").exists());

    let listed = run_ok(&c.nodes[0], &["conflicts"]);
    let area = c.nodes[0].state_dir.join("conflicts/vol");
    let set = fs::read_dir(&area)
        .expect("conflicts area")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .unwrap_or_else(|| panic!("no conflict set; listed:\n{listed}"));
    for (what, path, content) in [
        ("replaced", "cmm.conf", "chassis_id = 44 (node0 only)\n"),
        ("deleted", "late", "node0 only\n"),
    ] {
        assert!(
            listed
                .lines()
                .any(|l| l.split_whitespace().eq([what, path])),
            "{what} {path} listed:\n{listed}"
        );
        assert_eq!(
            fs::read_to_string(set.join(path)).ok().as_deref(),
            Some(content),
            "{path} kept with node0's content"
        );
    }
    // The full sync is through: the area is no longer armed.
    assert!(
        wait_until(CONVERGE, || !area.join("PENDING").exists()),
        "still armed"
    );
}

#[test]
fn a_demoted_active_takes_the_role_back_with_a_plain_promote() {
    let _serial = twinfs_tests::serial();
    let net = NetBridge::new(subnet(), 2);
    let mut c = Cluster::in_bridge(&net, 0, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    run_ok(&c.nodes[0], &["demote"]);
    assert_eq!(role_epoch(&c.nodes[0]), ("standby".into(), 1));
    // It was the active a moment ago: it has every change, so it is ready, and says
    // so (not "never completed a full sync").
    assert_eq!(c.nodes[0].volume_status()["takeover"], "ready");
    run_ok(&c.nodes[0], &["promote"]);
    assert_eq!(role_epoch(&c.nodes[0]), ("active".into(), 2));
    fs::write(c.active().join("after"), "back\n").expect("write");
    wait_role(&c.nodes[1], "standby", 2);
    c.wait_converged(CONVERGE);
}

/// A large file changed on one node, then on the other after a switchover (which
/// reaches the first node as an in-place update of its copy, beside its mount), then
/// on the first again after a switch back: every version reaches the other node
/// whole. The first node's record of what was written to the file (see
/// `twinfs_fs::written`) must not outlive its time as a standby, or its next hash
/// would miss the update it received.
#[test]
fn a_large_file_changed_on_each_side_in_turn_stays_equal() {
    use std::io::{Seek, SeekFrom, Write};
    let _serial = twinfs_tests::serial();
    let net = NetBridge::new(subnet(), 2);
    let mut c = Cluster::in_bridge(&net, 0, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let mut want: Vec<u8> = (0..20u32 << 20).map(|i| (i % 239) as u8).collect();
    fs::write(c.nodes[0].volume.join("disk.img"), &want).expect("write");
    c.wait_converged_to(0, Duration::from_secs(60));
    let mut change = |c: &Cluster, node: usize, at: usize, byte: u8| {
        want[at..at + 100_000].fill(byte);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(c.nodes[node].volume.join("disk.img"))
            .expect("open");
        f.seek(SeekFrom::Start(at as u64)).expect("seek");
        f.write_all(&want[at..at + 100_000]).expect("write");
        drop(f);
        c.wait_converged_to(node, Duration::from_secs(60));
        for n in &c.nodes {
            assert!(
                fs::read(n.volume.join("disk.img")).expect("read") == want,
                "{} differs after a change on node {node}",
                n.volume.display()
            );
        }
    };
    change(&c, 0, 1 << 20, 1);
    change(&c, 0, 2 << 20, 2);
    run_ok(&c.nodes[1], &["promote"]);
    wait_role(&c.nodes[0], "standby", 2);
    wait_ready(&c.nodes[0], &c.nodes[1]);
    change(&c, 1, 5 << 20, 3);
    run_ok(&c.nodes[0], &["promote"]);
    wait_role(&c.nodes[1], "standby", 3);
    wait_ready(&c.nodes[1], &c.nodes[0]);
    change(&c, 0, 9 << 20, 4);
    change(&c, 0, 1 << 20, 5);
    assert!(
        c.nodes[1].log_text().contains("updated in place")
            && c.nodes[0].log_text().contains("updated in place"),
        "each node's copy was updated in place at least once"
    );
}

/// Clears the immutable flag it set, so the test's directories can be removed. Made
/// before the cluster, so it is dropped after the cluster has unmounted (the flag is
/// on the backing file, which chattr cannot reach through the mount).
#[derive(Default)]
struct Immutable(Option<PathBuf>);

impl Immutable {
    fn set(&mut self, path: &Path) {
        let ok = Command::new("chattr")
            .arg("+i")
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "chattr +i {}", path.display());
        self.0 = Some(path.to_owned());
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = Command::new("chattr").arg("-i").arg(path).status();
            // The node's directory (NODE/vol/FILE) could not be removed with the file
            // still immutable: remove it now.
            if let Some(node_dir) = path.parent().and_then(Path::parent) {
                let _ = fs::remove_dir_all(node_dir);
            }
        }
    }
}

#[test]
fn promotion_is_refused_while_a_priority1_file_is_not_in_sync() {
    let _serial = twinfs_tests::serial();
    let mut immutable = Immutable::default();
    let net = NetBridge::new(subnet(), 2);
    let mut c = Cluster::in_bridge(&net, 0, RULES, fill);
    // The standby's own copy of passwd cannot be replaced (immutable in its backing
    // directory), so the full sync cannot bring it in sync.
    fs::write(c.nodes[1].volume.join("passwd"), "old\n").expect("write");
    immutable.set(&c.nodes[1].volume.join("passwd"));
    c.start();
    let standby = &c.nodes[1];
    assert!(
        wait_until(CONVERGE, || {
            standby.volume_status()["peers"][0]["rejected"]
                .as_u64()
                .is_some_and(|n| n > 0)
        }),
        "the standby refuses passwd; log:\n{}",
        standby.log_text()
    );
    assert!(
        wait_until(CONVERGE, || c.nodes[1].volume.join("cmm.conf").exists()),
        "the rest arrives"
    );
    let takeover = c.nodes[1].volume_status()["takeover"].clone();
    assert!(
        takeover
            .as_str()
            .is_some_and(|t| t.starts_with("not ready") && t.contains("passwd")),
        "{takeover}"
    );
    c.nodes[0].kill9();

    let out = c.nodes[1].twinfs(&["promote"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "promotion must be refused: {said}");
    assert!(said.contains("passwd"), "names the path: {said}");
    assert_eq!(role_epoch(&c.nodes[1]), ("standby".into(), 1));

    let said = run_ok(&c.nodes[1], &["promote", "--force"]);
    assert!(said.contains("forced"), "{said}");
    assert_eq!(role_epoch(&c.nodes[1]), ("active".into(), 2));
    assert!(c.nodes[1].log_text().contains("promotion forced"));
}

#[test]
fn promotion_is_refused_when_the_link_is_cut_during_a_priority1_transfer() {
    let _serial = twinfs_tests::serial();
    use twinfs_tests::daemon::NetPair;
    let net = NetPair::new((std::process::id() % 250) as u8);
    let rules =
        format!("{RULES}\n[[volume.rule]]\nmatch = \"*.bin\"\nsync = \"always\"\npriority = 1\n");
    let mut c = Cluster::in_namespaces(&net, &rules, fill);
    c.start();
    c.wait_converged(CONVERGE);
    assert!(wait_until(CONVERGE, || c.nodes[1].volume_status()
        ["takeover"]
        == "ready"));

    // 8 MiB over a 4 Mbit/s link: about 16 s of transfer, cut after it started.
    net.limit_rate("4mbit");
    let mut image = vec![0u8; 8 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in image.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    fs::write(c.active().join("blade.bin"), &image).expect("write the image");
    assert!(
        wait_until(CONVERGE, || c.nodes[1].volume_status()["takeover"]
            .as_str()
            .is_some_and(
                |t| t.starts_with("not ready") && t.contains("blade.bin")
            )),
        "the standby knows blade.bin is on its way: {}",
        c.nodes[1].volume_status()
    );
    net.cut();
    c.nodes[0].kill9();

    let out = c.nodes[1].twinfs(&["promote"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "promotion must be refused: {said}");
    assert!(said.contains("blade.bin"), "names the path: {said}");
    assert_eq!(role_epoch(&c.nodes[1]), ("standby".into(), 1));
    assert!(
        !c.nodes[1].volume.join("blade.bin").exists(),
        "no part of the image is visible"
    );

    let said = run_ok(&c.nodes[1], &["promote", "--force"]);
    assert!(said.contains("forced"), "{said}");
    assert_eq!(role_epoch(&c.nodes[1]), ("active".into(), 2));
}

/// Sends `SIGCONT` to a paused daemon when dropped, even if the test fails.
struct Resume<'a>(&'a Node);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        self.0.signal(libc::SIGCONT);
    }
}

#[test]
fn what_the_old_active_sent_is_not_put_in_place_once_the_standby_is_promoted() {
    let _serial = twinfs_tests::serial();
    use twinfs_tests::daemon::NetPair;
    let net = NetPair::new((std::process::id() % 250) as u8);
    let mut c = Cluster::in_namespaces(&net, RULES, fill);
    // The standby's volume on a disk of its own, which stops answering below.
    let disk = twinfs_tests::Ext4Image::at(&c.nodes[1].volume, 64 << 20);
    c.start();
    c.wait_converged(CONVERGE);
    wait_ready(&c.nodes[1], &c.nodes[0]);

    // The standby receives a new version of a file, and its write of it waits for
    // the disk, before the file is put in place (so the promotion need not wait for
    // it: roles.rs tests the wait for a change being put in place). (The file is rewritten in place: a new name would change the
    // directory too, and its metadata would wait for the disk at another step.)
    disk.freeze();
    let conf = "cmm.conf";
    let theirs = "chassis_id = 43\n";
    fs::write(c.active().join(conf), theirs).expect("write on the active");
    assert!(
        wait_until(CONVERGE, || c.nodes[1].blocked_in_a_write()),
        "the standby's write never waited for the frozen disk; log:\n{}",
        c.nodes[1].log_text()
    );

    // The active stops answering; the standby is promoted meanwhile.
    c.nodes[0].signal(libc::SIGSTOP);
    let resume = Resume(&c.nodes[0]);
    run_ok(&c.nodes[1], &["promote", "--force"]);
    assert_eq!(role_epoch(&c.nodes[1]), ("active".into(), 2));

    // The disk answers again: the version it was writing for the old active is not
    // put in place on the new active.
    disk.thaw();
    let ours = "chassis_id = 42\n";
    let read = || fs::read_to_string(c.nodes[1].volume.join(conf)).unwrap_or_default();
    let refused = "not applied: this node is no longer a standby";
    wait_until(CONVERGE, || {
        read() != ours || c.nodes[1].log_text().contains(refused)
    });
    assert_eq!(
        read(),
        ours,
        "the old active's version landed on the new active after its promotion; log:\n{}",
        c.nodes[1].log_text()
    );
    assert!(
        c.nodes[1].log_text().contains(refused),
        "the write it waited for was not refused; log:\n{}",
        c.nodes[1].log_text()
    );

    // The old active comes back, is fenced, and keeps its version.
    drop(resume);
    wait_role(&c.nodes[0], "standby", 2);
    c.wait_converged(CONVERGE);
    let listed = run_ok(&c.nodes[0], &["conflicts"]);
    assert!(listed.contains(conf), "{listed}");
    // The disk goes after the daemon that mounted over it, before the node's scratch
    // directory, which holds its mount point.
    c.nodes[1].stop();
    drop(disk);
}

/// The active's disk stops answering with a local write under way: the active
/// cannot hand over (its writes never stop), and `promote --force` on the standby
/// takes over all the same once the handover's wait is over (it was refused). The
/// old active, fenced, gives up the role without waiting for its stuck write.
#[test]
fn a_forced_promotion_takes_over_from_an_active_whose_disk_stops_answering() {
    let _serial = twinfs_tests::serial();
    let net = NetBridge::new(subnet(), 2);
    // (No health check gives up the role meanwhile.)
    let rules = format!("health_interval = \"1h\"\n{RULES}");
    let mut c = Cluster::in_bridge(&net, 0, &rules, fill);
    // The active's volume on a disk of its own (filled again: the disk hides what
    // was there).
    let disk = twinfs_tests::Ext4Image::at(&c.nodes[0].volume, 64 << 20);
    fill(&c.nodes[0].volume);
    c.start();
    c.wait_converged(CONVERGE);
    wait_ready(&c.nodes[1], &c.nodes[0]);

    disk.freeze();
    let target = c.nodes[0].volume.join("cmm.conf");
    let writer = std::thread::spawn(move || fs::write(target, "chassis_id = 43\n"));
    assert!(
        wait_until(CONVERGE, || c.nodes[0].blocked_in_a_write()),
        "the write never waited for the frozen disk; log:\n{}",
        c.nodes[0].log_text()
    );
    // (It waits up to 40 s for the handover.)
    let said = run_ok(&c.nodes[1], &["promote", "--force"]);
    assert!(said.contains("did not hand over"), "{said}");
    assert_eq!(role_epoch(&c.nodes[1]), ("active".into(), 2));
    wait_role(&c.nodes[0], "standby", 2);

    disk.thaw();
    let _ = writer.join();
    fs::write(c.nodes[1].volume.join("after"), "on the new active\n").expect("write");
    c.wait_converged_to(1, CONVERGE);
    // The disk goes after the daemon that mounted over it.
    c.nodes[0].stop();
    drop(disk);
}

#[test]
fn a_standby_that_never_synced_is_not_promoted() {
    let _serial = twinfs_tests::serial();
    let net = NetBridge::new(subnet(), 2);
    let mut c = Cluster::in_bridge(&net, 0, RULES, fill);
    c.nodes[1].start(&[]);
    let out = c.nodes[1].twinfs(&["promote"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("never completed a full sync"));
    assert_eq!(role_epoch(&c.nodes[1]), ("standby".into(), 1));
}

#[test]
fn planned_switchover_back_and_forth_loses_no_acknowledged_write() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let _serial = twinfs_tests::serial();
    let net = NetBridge::new(subnet(), 2);
    let mut c = Cluster::in_bridge(&net, 0, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let volumes: Vec<PathBuf> = c.nodes.iter().map(|n| n.volume.clone()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    // Appends numbered lines to a log on whichever node takes writes; keeps the
    // numbers whose write returned success.
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut acked, mut refused, mut at) = (Vec::new(), 0u32, 0usize);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let line = format!("line {n}\n");
                let wrote = fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(volumes[at].join("app.log"))
                    .and_then(|mut f| f.write_all(line.as_bytes()));
                match wrote {
                    Ok(()) => {
                        acked.push(n);
                        n += 1;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
                        refused += 1;
                        at = 1 - at;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("write to node {at}: {e}"),
                }
            }
            (acked, refused)
        })
    };
    const SWITCHES: usize = 20;
    for i in 0..SWITCHES {
        std::thread::sleep(Duration::from_millis(150));
        let (from, to) = if i % 2 == 0 { (0, 1) } else { (1, 0) };
        let said = run_ok(&c.nodes[to], &["promote"]);
        assert!(said.contains("planned switchover"), "switch {i}: {said}");
        let epoch = 2 + i as u64;
        assert_eq!(role_epoch(&c.nodes[to]), ("active".into(), epoch));
        wait_role(&c.nodes[from], "standby", epoch);
        // As an administrator would: switch back once the new standby is in sync.
        wait_ready(&c.nodes[from], &c.nodes[to]);
    }
    std::thread::sleep(Duration::from_millis(150));
    stop.store(true, Ordering::Relaxed);
    let (acked, refused) = writer.join().expect("writer");
    let last = if SWITCHES % 2 == 0 { 0 } else { 1 };
    c.wait_converged_to(last, CONVERGE);
    for node in &c.nodes {
        let log = fs::read_to_string(node.volume.join("app.log"))
            .unwrap_or_else(|e| panic!("read {}: {e}", node.volume.join("app.log").display()));
        let lines: Vec<&str> = log.lines().collect();
        let want: Vec<String> = acked.iter().map(|n| format!("line {n}")).collect();
        if lines != want {
            let have: std::collections::HashSet<&str> = lines.iter().copied().collect();
            let missing: Vec<&String> =
                want.iter().filter(|l| !have.contains(l.as_str())).collect();
            panic!(
                "{}: {} lines, {} acknowledged; missing {:?}; first lines that differ: {:?}\nnode 0 log:\n{}\nnode 1 log:\n{}",
                node.volume.display(),
                lines.len(),
                want.len(),
                &missing[..missing.len().min(20)],
                lines.iter().zip(&want).find(|(a, b)| **a != b.as_str()),
                c.nodes[0].log_text(),
                c.nodes[1].log_text()
            );
        }
    }
    assert!(
        acked.len() > 100,
        "the writer kept writing: {}",
        acked.len()
    );
    assert!(refused > 0, "writes during a switch get EROFS");
    // Nothing was at risk in a planned switchover: nothing is kept as a conflict.
    for node in &c.nodes {
        let listed = run_ok(node, &["conflicts"]);
        assert!(listed.contains("no conflicts"), "{listed}");
        assert_eq!(node.volume_status()["conflicts"], 0);
    }
    assert_eq!(
        role_epoch(&c.nodes[last]),
        ("active".into(), 1 + SWITCHES as u64)
    );
    assert_eq!(
        role_epoch(&c.nodes[1 - last]),
        ("standby".into(), 1 + SWITCHES as u64)
    );
}

/// Starts the two nodes, lets them converge, then cuts them apart: node1 no longer
/// hears the active and takes over (it was in sync) at epoch 2. Their volumes.
fn split_brain(c: &mut Cluster, net: &twinfs_tests::daemon::NetPair) -> (PathBuf, PathBuf) {
    c.start();
    c.wait_converged(CONVERGE);
    net.cut();
    let said = run_ok(&c.nodes[1], &["promote"]);
    assert!(said.contains("epoch 2"), "{said}");
    (c.nodes[0].volume.clone(), c.nodes[1].volume.clone())
}

#[test]
fn split_brain_keeps_the_losers_writes_in_its_conflicts_area() {
    let _serial = twinfs_tests::serial();
    use twinfs_tests::daemon::NetPair;
    let net = NetPair::new((std::process::id() % 250) as u8);
    let mut c = Cluster::in_namespaces(&net, RULES, fill);
    let (a, b) = split_brain(&mut c, &net);
    // Both take writes: to the same file, and to files of their own.
    fs::write(a.join("cmm.conf"), "chassis_id = 0 (node0)\n").expect("write on node0");
    fs::write(a.join("only-on-node0"), "mine\n").expect("write on node0");
    fs::create_dir(a.join("newdir")).expect("mkdir on node0");
    fs::write(a.join("newdir/f"), "deep\n").expect("write on node0");
    fs::write(b.join("cmm.conf"), "chassis_id = 1 (node1)\n").expect("write on node1");
    fs::write(b.join("only-on-node1"), "theirs\n").expect("write on node1");
    // Node0 changes only a file's metadata; at one name node0 writes a file and node1
    // makes a FIFO.
    let passwd = std::ffi::CString::new(a.join("passwd").as_os_str().as_bytes()).expect("path");
    // SAFETY: valid NUL-terminated strings and a buffer of the length given.
    unsafe {
        assert_eq!(
            libc::chown(passwd.as_ptr(), 4242, 4243),
            0,
            "chown on node0"
        );
        assert_eq!(
            libc::setxattr(
                passwd.as_ptr(),
                c"user.note".as_ptr(),
                b"node0".as_ptr().cast(),
                5,
                0
            ),
            0,
            "setxattr on node0"
        );
    }
    fs::set_permissions(a.join("passwd"), fs::Permissions::from_mode(0o640)).expect("chmod");
    fs::write(a.join("pipe"), "a file on node0\n").expect("write on node0");
    let fifo = std::ffi::CString::new(b.join("pipe").as_os_str().as_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(
        unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) },
        0,
        "mkfifo on node1"
    );

    net.heal();
    // One active remains: node1, of the higher epoch; node0 is fenced and follows it.
    wait_role(&c.nodes[0], "standby", 2);
    assert_eq!(role_epoch(&c.nodes[1]), ("active".into(), 2));
    c.wait_converged_to(1, Duration::from_secs(60));
    assert_eq!(
        fs::read_to_string(a.join("cmm.conf")).expect("read"),
        "chassis_id = 1 (node1)\n"
    );

    // Everything node0 wrote on its own is in its conflicts area, and listed.
    let listed = run_ok(&c.nodes[0], &["conflicts"]);
    for path in ["cmm.conf", "only-on-node0", "newdir"] {
        assert!(listed.contains(path), "{path} listed:\n{listed}");
    }
    let area = c.nodes[0].state_dir.join("conflicts/vol");
    let set = fs::read_dir(&area)
        .expect("conflicts area")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .expect("a conflict set");
    assert!(set.join("MANIFEST.json").exists());
    for (path, content) in [
        ("cmm.conf", "chassis_id = 0 (node0)\n"),
        ("only-on-node0", "mine\n"),
        ("newdir/f", "deep\n"),
        ("pipe", "a file on node0\n"),
        ("passwd", "root:x:0:0\n"),
    ] {
        assert_eq!(
            fs::read_to_string(set.join(path)).ok().as_deref(),
            Some(content),
            "{path} kept with node0's content"
        );
    }
    // Kept as node0 had it: its metadata too.
    let kept = fs::metadata(set.join("passwd")).expect("kept passwd");
    assert_eq!(
        (kept.permissions().mode() & 0o777, kept.uid(), kept.gid()),
        (0o640, 4242, 4243),
        "passwd kept with node0's mode and owner"
    );
    let path = std::ffi::CString::new(set.join("passwd").as_os_str().as_bytes()).expect("path");
    let mut value = [0u8; 16];
    // SAFETY: valid NUL-terminated strings and a buffer of the length given.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"user.note".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    assert_eq!(
        usize::try_from(n).ok().map(|n| &value[..n]),
        Some(&b"node0"[..])
    );
    assert!(c.nodes[0].volume_status()["conflicts"].as_u64() >= Some(5));
    // The winner keeps nothing; its files were never at risk.
    assert!(run_ok(&c.nodes[1], &["conflicts"]).contains("no conflicts"));
}

/// Split brain when the loser's conflicts area has no room for its version of a
/// file: that version is not replaced (the op is refused and listed, the node not in
/// sync), and once there is room the next full sync keeps it whole, then applies the
/// winner's. Nothing the loser wrote is lost on the way.
#[test]
fn a_losers_version_with_no_room_to_keep_it_is_not_replaced() {
    let _serial = twinfs_tests::serial();
    use twinfs_tests::daemon::NetPair;
    let net = NetPair::new((std::process::id() % 250) as u8);
    let mut c = Cluster::in_namespaces(&net, RULES, fill);
    // Room for the area's marker and list, not for a 1 MiB file. (Dropped before the
    // cluster, whose state directory it is in.)
    let area =
        twinfs_tests::Tmpfs::at(&c.nodes[0].state_dir.join("conflicts/vol"), 64 << 10, 0o700);
    let (a, b) = split_brain(&mut c, &net);
    let mine: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    fs::write(a.join("big.bin"), &mine).expect("write on node0");
    fs::write(b.join("cmm.conf"), "chassis_id = 1 (node1)\n").expect("write on node1");

    net.heal();
    wait_role(&c.nodes[0], "standby", 2);
    // Refused: the winner has no big.bin, and node0's could not be kept.
    let refused = |c: &Cluster| {
        c.nodes[1].volume_status()["peers"]
            .as_array()
            .is_some_and(|peers| {
                peers.iter().any(|p| {
                    p["peer"] == "node0"
                        && p["rejected_paths"].as_array().is_some_and(|r| {
                            r.iter().any(|r| {
                                r.as_str().is_some_and(|r| {
                                    r.starts_with("big.bin:") && r.contains("could not be kept")
                                })
                            })
                        })
                })
            })
    };
    assert!(
        wait_until(Duration::from_secs(60), || refused(&c)),
        "{}\nnode0's log:\n{}",
        c.nodes[1].volume_status(),
        c.nodes[0].log_text()
    );
    // What needed no room went on: node1's cmm.conf is there.
    assert!(wait_until(CONVERGE, || fs::read_to_string(
        a.join("cmm.conf")
    )
    .is_ok_and(|t| t == "chassis_id = 1 (node1)\n")));
    assert!(
        fs::read(a.join("big.bin")).is_ok_and(|d| d == mine),
        "node0's big.bin is still there, whole"
    );
    // Nothing half copied is left to pass for a kept version.
    let files_in_area = |dir: &Path| {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in fs::read_dir(dir)
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
            {
                if e.path().is_dir() {
                    walk(&e.path(), out);
                } else {
                    out.push(e.path());
                }
            }
        }
        let mut out = Vec::new();
        walk(dir, &mut out);
        out
    };
    assert!(
        !files_in_area(area.path())
            .iter()
            .any(|p| p.file_name().is_some_and(|n| n == "big.bin")),
        "{:?}",
        files_in_area(area.path())
    );

    // Room now; the next full sync keeps it, then removes it as the winner has.
    area.resize(16 << 20);
    let _ = c.nodes[1].twinfs(&["sync", "--full"]);
    c.wait_converged_to(1, Duration::from_secs(60));
    let kept: Vec<PathBuf> = files_in_area(area.path())
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "big.bin"))
        .collect();
    assert_eq!(kept.len(), 1, "{:?}", files_in_area(area.path()));
    assert!(fs::read(&kept[0]).is_ok_and(|d| d == mine), "kept whole");
    assert!(run_ok(&c.nodes[0], &["conflicts"]).contains("big.bin"));
}

/// The `TWINFS_*` variables of each hook run, in the order they ran (each run
/// writes a `.tmp` file and renames it to `.env` when it is complete).
fn hook_runs(dir: &Path) -> Vec<(String, String)> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .expect("hook dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "env"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let kind = name
                .split('-')
                .nth(1)
                .and_then(|k| k.strip_suffix(".env"))
                .unwrap_or_default()
                .to_owned();
            (
                kind,
                fs::read_to_string(f).expect("read").replace('\n', " "),
            )
        })
        .collect()
}

#[test]
fn hooks_run_with_the_documented_environment_and_a_failure_shows_in_status() {
    let _serial = twinfs_tests::serial();
    let events = tempfile::tempdir().expect("tempdir");
    let dir = events.path().display();
    // Each run records its TWINFS_* variables; the promote hook fails at epoch 3.
    let rules = format!(
        "on_promote = 'f={dir}/$(date +%s%N)-promote; env | grep -E \"^TWINFS_(VOLUME|ROLE|PREVIOUS_ROLE|EPOCH|REASON)=\" | sort > $f.tmp; mv $f.tmp $f.env; [ \"$TWINFS_EPOCH\" != 3 ]'\n\
         on_demote = 'f={dir}/$(date +%s%N)-demote; env | grep -E \"^TWINFS_(VOLUME|ROLE|PREVIOUS_ROLE|EPOCH|REASON)=\" | sort > $f.tmp; mv $f.tmp $f.env'\n{RULES}"
    );
    let net = NetBridge::new(subnet(), 2);
    let mut c = Cluster::in_bridge(&net, 0, &rules, fill);
    c.start();
    c.wait_converged(CONVERGE);
    assert!(
        hook_runs(events.path()).is_empty(),
        "no hook without a role change"
    );

    run_ok(&c.nodes[0], &["demote"]);
    c.nodes[0].stop();
    run_ok(&c.nodes[1], &["promote"]);
    // node0 comes back with the state of an active of epoch 1 (as if it had been
    // active all along): it meets the new active and is fenced.
    fs::write(
        c.nodes[0].state_dir.join("volumes/vol.json"),
        "{\"role\": \"active\", \"epoch\": 1}\n",
    )
    .expect("old state");
    c.nodes[0].start(&[]);
    wait_role(&c.nodes[0], "standby", 2);
    wait_ready(&c.nodes[0], &c.nodes[1]);
    // A planned handover to node0 at epoch 3, where its promote hook fails.
    let said = run_ok(&c.nodes[0], &["promote"]);
    assert!(said.contains("epoch 3"), "{said}");

    // The old active runs its demote hook after it handed over: it may still be at it.
    assert!(wait_until(CONVERGE, || hook_runs(events.path()).len() >= 5));
    let runs = hook_runs(events.path());
    let want = [
        ("demote", "TWINFS_EPOCH=1 TWINFS_PREVIOUS_ROLE=active TWINFS_REASON=manual TWINFS_ROLE=standby TWINFS_VOLUME=vol "),
        ("promote", "TWINFS_EPOCH=2 TWINFS_PREVIOUS_ROLE=standby TWINFS_REASON=manual TWINFS_ROLE=active TWINFS_VOLUME=vol "),
        ("demote", "TWINFS_EPOCH=2 TWINFS_PREVIOUS_ROLE=active TWINFS_REASON=fenced TWINFS_ROLE=standby TWINFS_VOLUME=vol "),
        ("demote", "TWINFS_EPOCH=2 TWINFS_PREVIOUS_ROLE=active TWINFS_REASON=manual TWINFS_ROLE=standby TWINFS_VOLUME=vol "),
        ("promote", "TWINFS_EPOCH=3 TWINFS_PREVIOUS_ROLE=standby TWINFS_REASON=manual TWINFS_ROLE=active TWINFS_VOLUME=vol "),
    ];
    let mut got: Vec<(&str, &str)> = runs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut want = want.to_vec();
    // The two sides of the handover run their hooks at the same time: either order.
    if got.len() == want.len() {
        got[3..].sort();
        want[3..].sort();
    }
    assert_eq!(got, want, "hook runs in order");

    // The failed promote hook is in status; the node stays active (the default).
    let hook = c.nodes[0].volume_status()["last_hook"].clone();
    assert_eq!(hook["hook"], "on_promote", "{hook}");
    assert_eq!(hook["ok"], false, "{hook}");
    assert_eq!(hook["exit_code"], 1, "{hook}");
    assert_eq!(role_epoch(&c.nodes[0]), ("active".into(), 3));
    assert!(
        String::from_utf8_lossy(&c.nodes[0].twinfs(&["status"]).stdout)
            .contains("FAILED: exit 1\n")
    );
    assert_eq!(c.nodes[1].volume_status()["last_hook"]["ok"], true);
}

#[test]
fn a_failed_promote_hook_hands_the_role_back_when_configured() {
    let _serial = twinfs_tests::serial();
    let rules = format!("on_promote = 'echo cannot start xcatd >&2; exit 4'\non_promote_failure = \"rollback\"\n{RULES}");
    let net = NetBridge::new(subnet(), 2);
    let mut c = Cluster::in_bridge(&net, 0, &rules, fill);
    c.start();
    c.wait_converged(CONVERGE);
    run_ok(&c.nodes[0], &["demote"]);
    let out = c.nodes[1].twinfs(&["promote"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("standby again"), "{said}");
    // As documented: it keeps the new epoch, counts as not in sync, and the volume
    // has no active node (node 0 handed over).
    assert_eq!(role_epoch(&c.nodes[1]), ("standby".into(), 2));
    assert_eq!(role_epoch(&c.nodes[0]).0, "standby");
    let takeover = c.nodes[1].volume_status()["takeover"].clone();
    assert!(
        takeover
            .as_str()
            .is_some_and(|t| t.starts_with("not ready")),
        "{takeover}"
    );
    let hook = c.nodes[1].volume_status()["last_hook"].clone();
    assert_eq!(hook["exit_code"], 4, "{hook}");
    assert!(
        hook["output"]
            .as_str()
            .is_some_and(|o| o.contains("cannot start xcatd")),
        "{hook}"
    );
    assert!(
        c.nodes[1].log_text().contains("cannot start xcatd"),
        "hook output is logged"
    );
    assert!(is_erofs(fs::write(c.nodes[1].volume.join("x"), "y")));
    // The low-level `twinfs role` says so too, and fails (it said it had switched).
    let out = c.nodes[1].twinfs(&["role", "vol", "active"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("handed back"), "{said}");
    assert_eq!(role_epoch(&c.nodes[1]), ("standby".into(), 2));
}

/// A hook that starts a service in the background (`cmmd &`) returns when its shell
/// does: the service holding the hook's output open holds up neither the role change
/// nor the hook's result, and what it writes later still reaches the daemon's log.
#[test]
fn a_hook_that_leaves_a_process_running_does_not_hold_the_role_change() {
    let _serial = twinfs_tests::serial();
    let rules = format!("on_promote = '(sleep 4; echo late-line) & echo started'\n{RULES}");
    let net = NetBridge::new(subnet(), 2);
    let mut c = Cluster::in_bridge(&net, 0, &rules, fill);
    c.start();
    c.wait_converged(CONVERGE);
    run_ok(&c.nodes[0], &["demote"]);
    run_ok(&c.nodes[1], &["promote"]);
    let hook = c.nodes[1].volume_status()["last_hook"].clone();
    assert_eq!(hook["ok"], true, "{hook}");
    assert_eq!(
        hook["output"], "started\n",
        "the hook's result waited for the background process: {hook}"
    );
    assert!(
        wait_until(CONVERGE, || c.nodes[1]
            .log_text()
            .contains("late-line (from a process the hook left running)")),
        "the background process's output is not in the log\n{}",
        c.nodes[1].log_text()
    );
}

/// The path through which daemon `pid` reaches the backing directory under the mount at
/// `volume` (its own fd on it): a write there goes behind the mount's back.
fn backing_dir(pid: u32, volume: &Path) -> PathBuf {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|fd| fs::read_link(fd).is_ok_and(|target| target == volume) && fd.is_dir())
        .expect("the daemon holds the backing directory open")
}

/// A priority-1 `once` file changed on the active after contact is not shipped, so
/// the standby is not ready to take over (and says which file) until it is:
/// `twinfs sync PATH` ships it. A planned handover and `twinfs demote` ship such a
/// file too, so the node that takes over does not lack (or overwrite) it.
#[test]
fn a_changed_priority1_once_file_keeps_the_standby_not_ready_until_it_ships() {
    let _serial = twinfs_tests::serial();
    let rules =
        format!("{RULES}\n[[volume.rule]]\nmatch = \"*.sif\"\nsync = \"once\"\npriority = 1\n");
    let net = NetBridge::new(subnet(), 2);
    let mut c = Cluster::in_bridge(&net, 0, &rules, fill);
    c.start();
    c.wait_converged(CONVERGE);
    wait_ready(&c.nodes[1], &c.nodes[0]);
    assert_eq!(c.nodes[1].volume_status()["takeover"], "ready");
    let sif = |n: usize| fs::read_to_string(c.nodes[n].volume.join("blade.sif")).ok();

    fs::write(c.active().join("blade.sif"), "firmware 2\n").expect("write");
    assert!(
        wait_until(CONVERGE, || {
            c.nodes[1].volume_status()["takeover"]
                .as_str()
                .is_some_and(|t| t.starts_with("not ready") && t.contains("blade.sif"))
        }),
        "the standby knows its blade.sif is old: {}",
        c.nodes[1].volume_status()
    );
    assert_eq!(sif(1), None, "once: not shipped");
    run_ok(&c.nodes[0], &["sync", "blade.sif"]);
    assert_eq!(sif(1).as_deref(), Some("firmware 2\n"));
    wait_fit(&c.nodes[1]);

    // A planned handover ships it before the standby takes over.
    fs::write(c.active().join("blade.sif"), "firmware 3\n").expect("write");
    run_ok(&c.nodes[1], &["promote"]);
    assert_eq!(role_epoch(&c.nodes[1]), ("active".into(), 2));
    assert_eq!(sif(1).as_deref(), Some("firmware 3\n"));
    wait_role(&c.nodes[0], "standby", 2);
    wait_ready(&c.nodes[0], &c.nodes[1]);
    assert_eq!(sif(0).as_deref(), Some("firmware 3\n"), "not overwritten");

    // So does `twinfs demote`: the standby has it when demote returns, and can take
    // over without `--force`.
    fs::write(c.nodes[1].volume.join("blade.sif"), "firmware 4\n").expect("write");
    run_ok(&c.nodes[1], &["demote"]);
    assert_eq!(sif(0).as_deref(), Some("firmware 4\n"));
    run_ok(&c.nodes[0], &["promote"]);
    assert_eq!(role_epoch(&c.nodes[0]).0, "active");
    wait_role(&c.nodes[1], "standby", role_epoch(&c.nodes[0]).1);
    wait_ready(&c.nodes[1], &c.nodes[0]);
    assert_eq!(sif(1).as_deref(), Some("firmware 4\n"), "not overwritten");
}

#[test]
fn verify_finds_a_file_changed_behind_a_standbys_back_and_sync_repairs_it() {
    let _serial = twinfs_tests::serial();
    let rules = format!("{RULES}\n[[volume.rule]]\nmatch = \"*.sif\"\nsync = \"once\"\n");
    let net = NetBridge::new(subnet(), 2);
    let mut c = Cluster::in_bridge(&net, 0, &rules, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let out = c.nodes[0].twinfs(&["verify"]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("node1: identical"),
        "{}\nstandby's log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.nodes[1].log_text()
    );

    // Straight into the standby's backing directory: no FUSE operation, nothing seen.
    let pid = c.nodes[1].pid().expect("running");
    let back = backing_dir(pid, &c.nodes[1].volume);
    fs::write(back.join("cmm.conf"), "tampered\n").expect("write behind its back");
    let out = c.nodes[0].twinfs(&["verify"]);
    // The report on standard output (as `diff` gives its own), the status 1.
    let said = String::from_utf8_lossy(&out.stdout);
    let error = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}{error}");
    assert!(
        said.contains("node1: 1 path(s) differ") && said.contains("  cmm.conf"),
        "{said}{error}"
    );
    assert!(
        error.contains("not every standby was found identical"),
        "{error}"
    );
    // A standby cannot be verified from, nor synced from.
    assert!(!c.nodes[1].twinfs(&["verify"]).status.success());

    // Many paths differ: the report lists the first 1,000 and counts the rest.
    fs::create_dir(back.join("strays")).expect("mkdir behind its back");
    for i in 0..1_200 {
        fs::write(back.join(format!("strays/{i}")), "x").expect("write behind its back");
    }
    let out = c.nodes[0].twinfs(&["verify"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    // (cmm.conf, strays and what is in it; the volume root's mtime maybe.)
    let differ: usize = said
        .split_once("node1: ")
        .and_then(|(_, rest)| rest.split_once(" path(s) differ"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of differing paths: {said}"));
    assert!(differ >= 1_202, "{said}");
    assert_eq!(said.lines().filter(|l| l.starts_with("  ")).count(), 1_000);
    assert!(
        said.contains(&format!(
            "node1: {} more path(s) differ, not listed",
            differ - 1_000
        )),
        "{said}"
    );

    let said = run_ok(&c.nodes[0], &["sync", "--full"]);
    assert!(said.contains("full sync acknowledged by node1"), "{said}");
    assert_eq!(
        fs::read_to_string(c.nodes[1].volume.join("cmm.conf")).expect("read"),
        "chassis_id = 42\n"
    );
    assert!(run_ok(&c.nodes[0], &["verify"]).contains("node1: identical"));

    // A `once` file changed after contact stays put; `twinfs sync` ships it anyway.
    fs::write(c.active().join("blade.sif"), "firmware 2\n").expect("write");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!c.nodes[1].volume.join("blade.sif").exists());
    let path = c.active().join("blade.sif");
    let said = run_ok(&c.nodes[0], &["sync", "vol", &path.display().to_string()]);
    assert!(said.contains("1 path(s) acknowledged by node1"), "{said}");
    assert_eq!(
        fs::read_to_string(c.nodes[1].volume.join("blade.sif"))
            .expect("on the standby when sync returns"),
        "firmware 2\n"
    );
    let out = c.nodes[0].twinfs(&["sync", "vol", "../etc/passwd"]);
    assert!(
        !out.status.success(),
        "a path outside the volume is refused"
    );
}

/// How many times the standby's log says a session's connection ended.
fn connections_ended(node: &Node) -> usize {
    node.log_text().matches("connection ended").count()
}

/// An active killed and restarted at once: its new session reaches the standby while
/// the old one lingers there until the connection's idle timeout. Waits for the new
/// session to be in sync, then for the old one to end.
fn restart_and_outlive_the_old_session(c: &mut Cluster, before_restart: impl FnOnce(&Path)) {
    let ended = connections_ended(&c.nodes[1]);
    c.nodes[0].kill9();
    before_restart(&c.nodes[0].volume);
    c.nodes[0].start(&[]);
    assert!(
        wait_until(CONVERGE, || connections_ended(&c.nodes[1]) > ended),
        "the old session never ended; log:\n{}",
        c.nodes[1].log_text()
    );
}

#[test]
fn an_old_session_ending_leaves_the_handover_to_the_new_one() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    wait_ready(&c.nodes[1], &c.nodes[0]);
    restart_and_outlive_the_old_session(&mut c, |_| {});
    wait_ready(&c.nodes[1], &c.nodes[0]);

    let said = run_ok(&c.nodes[1], &["promote"]);
    assert!(
        said.contains("planned switchover"),
        "the active is alive and asked to hand over: {said}\nlog:\n{}",
        c.nodes[1].log_text()
    );
    wait_role(&c.nodes[0], "standby", 2);
}

#[test]
fn an_old_session_ending_does_not_record_the_standby_fit_during_a_new_full_sync() {
    let _serial = twinfs_tests::serial();
    let mut immutable = Immutable::default();
    let mut c = Cluster::new(2, RULES, fill);
    // The standby has passwd as it is on the active, and cannot replace it.
    let (theirs, ours) = (c.active().join("passwd"), c.nodes[1].volume.join("passwd"));
    fs::copy(&theirs, &ours).expect("copy");
    let mtime = fs::metadata(&theirs)
        .and_then(|m| m.modified())
        .expect("mtime");
    fs::File::options()
        .write(true)
        .open(&ours)
        .and_then(|f| f.set_modified(mtime))
        .expect("set mtime");
    immutable.set(&ours);
    c.start();
    c.wait_converged(CONVERGE);
    wait_fit(&c.nodes[1]);

    // The restarted active has a new passwd, which the standby cannot take: its new
    // full sync never completes.
    restart_and_outlive_the_old_session(&mut c, |volume| {
        fs::write(volume.join("passwd"), "root:x:0:0\nnew:x:1:1\n").expect("write");
    });
    let record = c.nodes[1].state_dir.join("volumes/vol.sync.json");
    let synced = |record: &Path| {
        let text = fs::read_to_string(record).expect("sync record");
        let value: serde_json::Value = serde_json::from_str(&text).expect("json");
        value["synced"].clone()
    };
    assert_eq!(
        synced(&record),
        false,
        "a standby that cannot take passwd is not fit; log:\n{}",
        c.nodes[1].log_text()
    );
}

/// A stale active (of an older epoch) dials a standby that follows the real active:
/// the standby refuses it at hello, and that short session must leave the live one's
/// place alone: the standby stays fit and a planned promote still reaches the active.
#[test]
fn a_session_refused_at_hello_leaves_the_standby_fit_and_its_handover_alone() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(3, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    c.nodes[2].stop();
    // node1 takes over (epoch 2); node0 follows it.
    let said = run_ok(&c.nodes[1], &["promote"]);
    assert!(said.contains("planned switchover"), "{said}");
    wait_role(&c.nodes[0], "standby", 2);
    wait_ready(&c.nodes[0], &c.nodes[1]);
    let ready = |node: &Node| node.volume_status()["takeover"] == "ready";
    assert!(
        wait_until(CONVERGE, || ready(&c.nodes[0])),
        "{}",
        c.nodes[0].volume_status()
    );

    // node2 comes back as the active of epoch 1 it was, knowing only node0: it dials
    // node0, which refuses it at hello (and fences it).
    fs::write(
        c.nodes[2].state_dir.join("volumes/vol.json"),
        "{\"role\": \"active\", \"epoch\": 1}\n",
    )
    .expect("old state");
    let config = fs::read_to_string(&c.nodes[2].config).expect("config");
    let without_node1: Vec<&str> = config
        .split("\n\n")
        .filter(|block| !block.contains("name = \"node1\""))
        .collect();
    fs::write(&c.nodes[2].config, without_node1.join("\n\n")).expect("config");
    c.nodes[2].start(&[]);
    wait_role(&c.nodes[2], "standby", 2);
    // The refused session has ended on node0 (it says so last).
    let ended = |node: &Node| {
        node.volume_status()["peers"]
            .as_array()
            .is_some_and(|peers| {
                peers
                    .iter()
                    .any(|p| p["peer"] == "node2" && p["connected"] == false)
            })
    };
    assert!(
        wait_until(CONVERGE, || ended(&c.nodes[0])),
        "{}\nlog:\n{}",
        c.nodes[0].volume_status(),
        c.nodes[0].log_text()
    );

    // The live session goes on recording node0's fitness.
    fs::write(
        c.nodes[1].volume.join("passwd"),
        "root:x:0:0\nlater:x:2:2\n",
    )
    .expect("write");
    assert!(
        wait_until(CONVERGE, || {
            fs::read_to_string(c.nodes[0].volume.join("passwd")).is_ok_and(|t| t.contains("later"))
                && ready(&c.nodes[0])
        }),
        "{}\nlog:\n{}",
        c.nodes[0].volume_status(),
        c.nodes[0].log_text()
    );
    let said = run_ok(&c.nodes[0], &["promote"]);
    assert!(
        said.contains("planned switchover"),
        "the active is alive and asked to hand over: {said}\nlog:\n{}",
        c.nodes[0].log_text()
    );
    wait_role(&c.nodes[1], "standby", 3);
}
