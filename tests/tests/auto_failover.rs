//! Automatic failover end to end: real daemons, each in its own network namespace on
//! one bridge, so a test can kill the active or cut one node off from the others.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use twinfs_tests::daemon::{wait_until, Cluster, NetBridge, Node};

const CONVERGE: Duration = Duration::from_secs(30);

/// The volume's `peer_timeout` in these tests.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);

/// Appended to the `[[volume]]` table: automatic failover, then one priority-1 rule.
const AUTO: &str = r#"failover = "auto"
peer_timeout = "3s"

[[volume.rule]]
match = "passwd"
sync = "always"
priority = 1
"#;

fn fill(dir: &Path) {
    fs::write(dir.join("passwd"), "root:x:0:0\n").expect("fill");
    fs::write(dir.join("cmm.conf"), "chassis_id = 42\n").expect("fill");
}

fn subnet() -> u8 {
    (std::process::id() % 200 + 20) as u8
}

fn role_epoch(node: &Node) -> (String, u64) {
    let v = node.volume_status();
    (
        v["role"].as_str().unwrap_or_default().to_owned(),
        v["epoch"].as_u64().unwrap_or_default(),
    )
}

fn logs(c: &Cluster) -> String {
    c.nodes
        .iter()
        .enumerate()
        .map(|(i, n)| format!("--- node {i} log:\n{}", n.log_text()))
        .collect()
}

/// Waits until every node of `standbys` says it is ready to take over.
fn wait_ready(c: &Cluster, standbys: &[usize]) {
    for &i in standbys {
        assert!(
            wait_until(CONVERGE, || c.nodes[i].volume_status()["takeover"]
                == "ready"),
            "node {i} not ready: {}\n{}",
            c.nodes[i].volume_status(),
            logs(c)
        );
    }
}

/// `n` nodes (the last `witnesses` of them witnesses) on one bridge with `rules`,
/// started and in sync, every standby ready to take over. The bridge goes last.
fn started(n: usize, witnesses: usize, rules: &str) -> (NetBridge, Cluster) {
    let net = NetBridge::new(subnet(), n);
    let mut c = Cluster::in_bridge(&net, witnesses, rules, fill);
    c.start();
    c.wait_converged(CONVERGE);
    wait_ready(&c, &(1..n - witnesses).collect::<Vec<_>>());
    (net, c)
}

/// The nodes of `among` that are active now.
fn actives(c: &Cluster, among: &[usize]) -> Vec<usize> {
    among
        .iter()
        .copied()
        .filter(|&i| role_epoch(&c.nodes[i]).0 == "active")
        .collect()
}

/// Waits up to `peer_timeout` + 2 s from `from` for one node of `among` to be active
/// at `epoch`, then a little longer to see that no second one promotes; returns it.
fn exactly_one_promotes(c: &Cluster, among: &[usize], epoch: u64, from: Instant) -> usize {
    let deadline = PEER_TIMEOUT + Duration::from_secs(2);
    let promoted = wait_until(deadline.saturating_sub(from.elapsed()), || {
        !actives(c, among).is_empty()
    });
    assert!(
        promoted,
        "no standby promoted within {deadline:?}: {:?}\n{}",
        among
            .iter()
            .map(|&i| role_epoch(&c.nodes[i]))
            .collect::<Vec<_>>(),
        logs(c)
    );
    std::thread::sleep(PEER_TIMEOUT + Duration::from_secs(1));
    let now = actives(c, among);
    assert_eq!(now.len(), 1, "exactly one promotes: {now:?}\n{}", logs(c));
    let winner = now[0];
    assert_eq!(role_epoch(&c.nodes[winner]), ("active".into(), epoch));
    for &i in among.iter().filter(|&&i| i != winner) {
        assert!(
            wait_until(CONVERGE, || role_epoch(&c.nodes[i])
                == ("standby".into(), epoch)),
            "node {i} follows the new active: {:?}\n{}",
            role_epoch(&c.nodes[i]),
            logs(c)
        );
        assert!(
            !c.nodes[i].log_text().contains("now active"),
            "node {i} never promoted"
        );
    }
    winner
}

/// Waits until node `i` has stayed a standby for `peer_timeout` + 3 s after `from`
/// and its status says why it does not take over.
fn stays_standby(c: &Cluster, i: usize, from: Instant, why: &str) {
    while from.elapsed() < PEER_TIMEOUT + Duration::from_secs(3) {
        assert_eq!(
            role_epoch(&c.nodes[i]).0,
            "standby",
            "node {i} must not promote\n{}",
            logs(c)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let note = c.nodes[i].volume_status()["auto_failover"].clone();
    assert!(
        note.as_str().is_some_and(|n| n.contains(why)),
        "node {i}: {note}"
    );
}

#[test]
fn three_nodes_exactly_one_standby_takes_over_from_a_dead_active() {
    let _serial = twinfs_tests::serial();
    let (_net, mut c) = started(3, 0, AUTO);
    assert_eq!(c.nodes[1].volume_status()["failover"], "auto");

    c.nodes[0].kill9();
    let winner = exactly_one_promotes(&c, &[1, 2], 2, Instant::now());
    assert!(c.nodes[winner]
        .log_text()
        .contains("automatic failover: the active is silent; taking over"));
    // Writes on the new active reach the remaining standby.
    fs::write(
        c.nodes[winner].volume.join("after"),
        "written after failover\n",
    )
    .expect("write");
    c.wait_converged_to(winner, CONVERGE);
}

#[test]
fn a_node_cut_off_from_the_majority_does_not_promote() {
    let _serial = twinfs_tests::serial();
    let (net, c) = started(3, 0, AUTO);

    // A standby alone: it hears no active, but reaches 1 of 3 nodes.
    net.cut(2);
    stays_standby(&c, 2, Instant::now(), "no majority");
    assert_eq!(role_epoch(&c.nodes[0]), ("active".into(), 1));
    fs::write(c.active().join("while-cut"), "node2 was away\n").expect("write");
    net.heal(2);
    c.wait_converged(CONVERGE);
    wait_ready(&c, &[1, 2]);

    // The active alone: the two standbys are the majority, and one of them takes
    // over; the old active, healed, meets the new epoch and steps down.
    net.cut(0);
    let winner = exactly_one_promotes(&c, &[1, 2], 2, Instant::now());
    net.heal(0);
    assert!(
        wait_until(CONVERGE, || role_epoch(&c.nodes[0])
            == ("standby".into(), 2)),
        "the old active is fenced: {:?}\n{}",
        role_epoch(&c.nodes[0]),
        logs(&c)
    );
    c.wait_converged_to(winner, CONVERGE);
}

#[test]
fn two_nodes_and_a_witness_behave_the_same() {
    let _serial = twinfs_tests::serial();
    let (net, mut c) = started(3, 1, AUTO);
    assert!(c.nodes[2].witness);
    // A witness has no volume to verify, promote or demote, and says so.
    for command in [
        &["verify"][..],
        &["promote"],
        &["demote"],
        &["sync", "--full"],
    ] {
        let out = c.nodes[2].twinfs(command);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && said.contains("this node has no volumes"),
            "{command:?}: {said}"
        );
    }

    // Cut off from the active and the witness: 1 of 3, no promotion.
    net.cut(1);
    stays_standby(&c, 1, Instant::now(), "no majority");
    net.heal(1);
    c.wait_converged(CONVERGE);
    wait_ready(&c, &[1]);

    // The active dies: the standby and the witness are the majority.
    c.nodes[0].kill9();
    let winner = exactly_one_promotes(&c, &[1], 2, Instant::now());
    assert_eq!(winner, 1);
}

#[test]
fn an_active_that_fails_its_health_check_hands_over_to_the_standby() {
    let _serial = twinfs_tests::serial();
    let scratch = tempfile::tempdir().expect("scratch");
    let sick = scratch.path().join("sick");
    let hooks = scratch.path().join("hooks");
    let rules = format!(
        "health_command = \"test ! -e {}\"\nhealth_interval = \"1s\"\nhealth_failures = 2\n\
         on_promote = \"echo $TWINFS_ROLE $TWINFS_REASON >> {hooks}\"\n\
         on_demote = \"echo $TWINFS_ROLE $TWINFS_REASON >> {hooks}\"\n{AUTO}",
        sick.display(),
        hooks = hooks.display()
    );
    let net = NetBridge::new(subnet(), 2);
    let mut c = Cluster::in_bridge(&net, 0, &rules, fill);
    // Each node its own health: only node 0 falls sick.
    let cmd = format!("test ! -e {}", sick.display());
    for (i, node) in c.nodes.iter().enumerate() {
        let text = fs::read_to_string(&node.config).expect("config");
        fs::write(&node.config, text.replace(&cmd, &format!("{cmd}-{i}"))).expect("config");
    }
    let sick = scratch.path().join("sick-0");
    c.start();
    c.wait_converged(CONVERGE);
    wait_ready(&c, &[1]);
    assert_eq!(c.nodes[0].volume_status()["health"]["failures"], 0);

    fs::write(&sick, "").expect("make the active sick");
    let from = Instant::now();
    assert!(
        wait_until(CONVERGE, || role_epoch(&c.nodes[0]).0 == "standby"),
        "the sick active demotes itself\n{}",
        logs(&c)
    );
    let health = c.nodes[0].volume_status()["health"].clone();
    assert!(
        health["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("health_command")),
        "{health}"
    );
    assert!(health["demoted_at"].as_u64().is_some(), "{health}");
    // The standby, hearing no active, takes over.
    exactly_one_promotes(&c, &[1], 2, from + Duration::from_secs(2));
    let runs = fs::read_to_string(&hooks).expect("hooks ran");
    assert!(runs.contains("standby health"), "{runs}");
    assert!(runs.contains("active auto"), "{runs}");
    fs::write(c.nodes[1].volume.join("after"), "on the new active\n").expect("write");
    c.wait_converged_to(1, CONVERGE);
}

/// The active's disk stops answering with a local write under way: its health check
/// fails, and it gives up the role without waiting for that write (it used to wait
/// for good, still active), so the standby takes over. Once the disk answers again,
/// the write that ended on the demoted node is kept in its conflicts area when the
/// new active's full sync replaces it.
#[test]
fn an_active_whose_disk_stops_answering_gives_up_the_role() {
    let _serial = twinfs_tests::serial();
    let rules = format!("health_interval = \"1s\"\nhealth_failures = 2\n{AUTO}");
    let net = NetBridge::new(subnet(), 2);
    let mut c = Cluster::in_bridge(&net, 0, &rules, fill);
    // The active's volume on a disk of its own (filled again: the disk hides what
    // was there).
    let disk = twinfs_tests::Ext4Image::at(&c.nodes[0].volume, 64 << 20);
    fill(&c.nodes[0].volume);
    c.start();
    c.wait_converged(CONVERGE);
    wait_ready(&c, &[1]);

    disk.freeze();
    let target = c.nodes[0].volume.join("cmm.conf");
    let writer = std::thread::spawn(move || fs::write(target, "chassis_id = 43\n"));
    assert!(
        wait_until(CONVERGE, || c.nodes[0].blocked_in_a_write()),
        "the write never waited for the frozen disk\n{}",
        logs(&c)
    );
    assert!(
        wait_until(Duration::from_secs(90), || role_epoch(&c.nodes[0]).0
            == "standby"),
        "the active whose disk hangs never gave up the role\n{}",
        logs(&c)
    );
    let from = Instant::now();
    exactly_one_promotes(&c, &[1], 2, from);

    disk.thaw();
    let written = writer.join().expect("writer");
    assert!(
        wait_until(CONVERGE, || role_epoch(&c.nodes[0])
            == ("standby".into(), 2)),
        "{}",
        logs(&c)
    );
    c.wait_converged_to(1, CONVERGE);
    assert_eq!(
        fs::read_to_string(c.nodes[0].volume.join("cmm.conf")).expect("read"),
        "chassis_id = 42\n"
    );
    // What the write left (all of it, or the file truncated by its open if its write
    // came once writes were refused) is kept.
    let listed = String::from_utf8_lossy(&c.nodes[0].twinfs(&["conflicts"]).stdout).into_owned();
    assert!(
        listed.contains("cmm.conf"),
        "{listed}\nwrite: {written:?}\n{}",
        logs(&c)
    );
    // The disk goes after the daemon that mounted over it.
    c.nodes[0].stop();
    drop(disk);
}

/// A full sync and a `twinfs verify` that each scan a volume for longer than the
/// volume's `peer_timeout`, and a change the active reads a large file whole for, do
/// not make the standby take its active for silent: a session sends heartbeats while
/// it scans or reads, and a standby counts what it reads while its own session
/// scans.
#[test]
fn long_scans_never_make_the_active_look_silent() {
    let _serial = twinfs_tests::serial();
    // Sparse, the same on both nodes (nothing to send), and hashed in full by each
    // scan: some seconds of reading zeros.
    const BIG: u64 = 1 << 30;
    let big = |dir: &Path| {
        let file = fs::File::create(dir.join("firmware.img")).expect("create");
        file.set_len(BIG).expect("set_len");
        file.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
            .expect("set mtime");
    };
    let rules = "failover = \"auto\"\npeer_timeout = \"2s\"\n";
    let mut c = Cluster::new(2, rules, fill);
    for node in &c.nodes {
        big(&node.volume);
    }
    c.start();

    // What the standby's failover watch says, every 200 ms, until `done`.
    let watched = |c: &Cluster, done: &dyn Fn() -> bool, seen: &mut Vec<String>| {
        let end = Instant::now() + Duration::from_secs(300);
        while !done() {
            assert!(Instant::now() < end, "not done in 300 s\n{}", logs(c));
            let note = c.nodes[1].volume_status()["auto_failover"].clone();
            let note = note.as_str().unwrap_or_default().to_owned();
            if seen.last() != Some(&note) {
                seen.push(note);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let mut seen = Vec::new();
    let from = Instant::now();
    watched(
        &c,
        &|| c.nodes[1].volume_status()["takeover"] == "ready",
        &mut seen,
    );
    let synced_in = from.elapsed();

    // A change of the file: the active reads it whole (its first change since the
    // active started) before it ships the block.
    let middle = BIG / 2;
    let changed = |dir: &Path| {
        use std::os::unix::fs::FileExt;
        let mut byte = [0u8];
        fs::File::open(dir.join("firmware.img"))
            .and_then(|f| f.read_exact_at(&mut byte, middle))
            .is_ok_and(|()| byte == *b"x")
    };
    {
        use std::os::unix::fs::FileExt;
        let file = fs::OpenOptions::new()
            .write(true)
            .open(c.active().join("firmware.img"))
            .expect("open on the active");
        file.write_all_at(b"x", middle)
            .expect("write on the active");
    }
    let from = Instant::now();
    watched(&c, &|| changed(&c.nodes[1].volume), &mut seen);
    let shipped_in = from.elapsed();

    // `twinfs verify` hashes everything on the standby, then on the active.
    let verify = std::thread::scope(|s| {
        let running = s.spawn(|| c.nodes[0].twinfs(&["verify"]));
        let from = Instant::now();
        watched(&c, &|| running.is_finished(), &mut seen);
        (running.join().expect("verify thread"), from.elapsed())
    });
    let (out, verified_in) = verify;
    eprintln!("full sync {synced_in:?}, change {shipped_in:?}, verify {verified_in:?}");
    assert!(
        out.status.success(),
        "verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The proof needs reads longer than the timeout: the verify's two scans, one
    // after the other, the full sync's, side by side, and the change's.
    assert!(
        verified_in > Duration::from_secs(5)
            && synced_in > Duration::from_secs(3)
            && shipped_in > Duration::from_secs(3),
        "reads too fast to show anything (full sync {synced_in:?}, change \
         {shipped_in:?}, verify {verified_in:?}): make the file larger"
    );
    // (The watch logs each change of what it says: a moment of silence that the
    // polling missed is in the log.)
    assert!(
        !seen.iter().any(|n| n.contains("silent"))
            && !c.nodes[1]
                .log_text()
                .contains("automatic failover: the active is silent"),
        "the standby took the active for silent: {seen:?}\n{}",
        logs(&c)
    );
    for node in &c.nodes {
        let log = node.log_text();
        assert!(!log.contains("peer silent"), "{log}");
    }
    assert_eq!(role_epoch(&c.nodes[1]), ("standby".into(), 1));
}
