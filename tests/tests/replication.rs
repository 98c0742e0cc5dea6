//! Replication end to end: real `twinfs mount` daemons, each with its own mounted
//! directory and state directory, talking QUIC over loopback.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use twinfs_tests::daemon::{wait_until, Cluster};

const CONVERGE: Duration = Duration::from_secs(30);

const RULES: &str = r#"
[[volume.rule]]
match = "*.sif"
sync = "once"
priority = 1

[[volume.rule]]
match = "hosts"
sync = "interval"
interval = "2s"

[[volume.rule]]
match = "local"
sync = "never"
"#;

fn sh(script: &str) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fill(dir: &Path) {
    fs::write(dir.join("cmm.conf"), "chassis_id = 42\n").expect("fill");
    fs::create_dir(dir.join("ssh")).expect("fill");
    fs::write(dir.join("ssh/known_hosts"), "b ssh-ed25519 AAAA\n").expect("fill");
    fs::write(dir.join("blade.sif"), vec![3u8; 200_000]).expect("fill");
}

#[test]
fn normal_tools_on_the_active_reach_the_standby() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    fs::write(c.nodes[1].volume.join("stale"), "only on the standby").expect("stale");
    c.start();
    // The full sync at contact: the standby gets everything, loses what the active
    // does not have.
    c.wait_converged(CONVERGE);
    assert!(!c.nodes[1].volume.join("stale").exists());

    let a = c.active().display().to_string();
    sh(&format!("cp /etc/services {a}/services"));
    sh(&format!("echo 'fan = loud' > {a}/fan.conf"));
    sh(&format!("sed -i 's/42/43/' {a}/cmm.conf"));
    sh(&format!("mv {a}/ssh/known_hosts {a}/ssh/known_hosts.old"));
    sh(&format!("rm {a}/fan.conf"));
    sh(&format!(
        "mkdir -p {a}/deep/er/est && echo bottom > {a}/deep/er/est/file"
    ));
    sh(&format!("ln -s cmm.conf {a}/current.conf"));
    sh(&format!("chmod 600 {a}/cmm.conf"));
    sh(&format!("touch -d '2021-02-03 04:05:06.789' {a}/services"));
    c.wait_converged(CONVERGE);

    let b = &c.nodes[1].volume;
    assert_eq!(
        fs::read_to_string(b.join("cmm.conf")).expect("read"),
        "chassis_id = 43\n"
    );
    assert_eq!(
        fs::metadata(b.join("cmm.conf"))
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777,
        0o600
    );
    assert_eq!(
        fs::read_link(b.join("current.conf")).expect("readlink"),
        Path::new("cmm.conf")
    );
    // The standby stays read-only for its own users.
    assert!(fs::write(b.join("x"), "no").is_err());
}

#[test]
fn a_file_written_through_a_mapping_after_its_close_reaches_the_standby() {
    use std::os::fd::AsRawFd;
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let path = c.active().join("mapped.db");
    fs::write(&path, vec![b'.'; 8192]).expect("write");
    c.wait_converged(CONVERGE);

    // Map the file, close the fd (recorded: nothing changed yet), write through the
    // mapping, unmap. The writes reach twinfs when the unmap writes the pages back,
    // after the close; only the release that follows can record them.
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    // SAFETY: a fresh shared mapping of an 8 KiB file this test owns, written only
    // within its length, flushed and unmapped before the end of the block.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        drop(file);
        let bytes = std::slice::from_raw_parts_mut(map.cast::<u8>(), 8192);
        bytes[4096..4096 + 11].copy_from_slice(b"via mapping");
        // No msync (its fsync would be recorded): the unmap writes the pages back.
        assert_eq!(libc::munmap(map, 8192), 0);
    }
    let standby = c.nodes[1].volume.join("mapped.db");
    let arrived = twinfs_tests::daemon::wait_until(CONVERGE, || {
        fs::read(&standby).is_ok_and(|b| b.get(4096..4096 + 11) == Some(b"via mapping"))
    });
    assert!(
        arrived,
        "what was written through the mapping never reached the standby"
    );
    c.wait_converged(CONVERGE);
}

#[test]
fn fan_out_to_three_standbys() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(4, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    for i in 0..50 {
        fs::write(c.active().join(format!("f{i}")), format!("file {i}")).expect("write");
    }
    c.wait_converged(CONVERGE);
}

/// `twinfs verify` and `twinfs sync` fail (exit 1) when a configured standby is down,
/// naming it: a cron job on their exit code must not take "the others are identical"
/// for "all are".
#[test]
fn verify_and_sync_name_a_standby_that_is_down_and_fail() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(3, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    assert!(c.nodes[2].stop().success());
    assert!(
        wait_until(CONVERGE, || c.nodes[0].volume_status()["peers"]
            .as_array()
            .is_some_and(|peers| peers
                .iter()
                .any(|p| p["peer"] == "node2" && p["connected"] == false))),
        "the active sees node2 gone"
    );
    let out = c.nodes[0].twinfs(&["verify"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("vol: node1: identical"), "{said}");
    assert!(
        said.contains("vol: node2: not compared: not connected"),
        "{said}"
    );
    let out = c.nodes[0].twinfs(&["sync", "--full"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("acknowledged by node1") && said.contains("NOT connected: node2"),
        "{said}"
    );
}

/// Two `twinfs verify` at once (a cron job's and an administrator's) each get the
/// standby's answer: the second must not cut the first off ("did not answer").
#[test]
fn two_verifies_at_once_both_get_an_answer() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    // Sparse and the same on both nodes (nothing to send), hashed in full by every
    // verify on each side: it takes long enough for the second to come meanwhile.
    for node in &c.nodes {
        let file = fs::File::create(node.volume.join("firmware.img")).expect("create");
        file.set_len(256 << 20).expect("set_len");
        file.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
            .expect("set mtime");
    }
    c.start();
    c.wait_converged(CONVERGE);
    let verify = || {
        Command::new(twinfs_tests::daemon::twinfs_bin())
            .arg("--config")
            .arg(&c.nodes[0].config)
            .arg("verify")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run twinfs verify")
    };
    let mut first = verify();
    std::thread::sleep(Duration::from_millis(100));
    let second = verify();
    std::thread::sleep(Duration::from_millis(100));
    // Else this proves nothing: the first was done before the second was asked.
    let overlapped = first.try_wait().expect("try_wait").is_none();
    for (which, child) in [("first", first), ("second", second)] {
        let out = child.wait_with_output().expect("wait for twinfs verify");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.contains("vol: node1: identical"),
            "{which} verify: {said}\n{}\n{}",
            c.nodes[0].log_text(),
            c.nodes[1].log_text()
        );
    }
    assert!(
        overlapped,
        "the first verify was over before the second began"
    );
}
#[test]
fn a_standby_that_was_down_catches_up() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    assert!(c.nodes[1].stop().success());
    // A clean stop unmounts the volume itself; its watchdog is for a daemon that died.
    let log = c.nodes[1].log_text();
    assert!(
        log.contains("unmounted") && !log.contains("leaving the unmount"),
        "the stopped daemon did not unmount its volume: {log}"
    );

    // 1,000 changes while it is away: creates, edits, renames, deletes.
    let a = c.active().to_path_buf();
    fs::create_dir(a.join("many")).expect("mkdir");
    for i in 0..400 {
        fs::write(a.join(format!("many/{i}")), format!("v1 {i}")).expect("create");
    }
    for i in 0..300 {
        fs::write(a.join(format!("many/{i}")), format!("v2 {i}")).expect("edit");
    }
    for i in 0..200 {
        fs::rename(a.join(format!("many/{i}")), a.join(format!("many/r{i}"))).expect("rename");
    }
    for i in 300..400 {
        fs::remove_file(a.join(format!("many/{i}"))).expect("delete");
    }
    c.nodes[1].start(&[]);
    c.wait_converged(CONVERGE);
}

#[test]
fn policies_end_to_end() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, |d| {
        fill(d);
        fs::create_dir(d.join("local")).expect("fill");
        fs::write(d.join("local/boot-count"), "7").expect("fill");
    });
    c.start();
    let b = c.nodes[1].volume.clone();
    assert!(wait_until(CONVERGE, || b.join("blade.sif").exists()));
    // `never`: not sent at contact.
    assert!(!b.join("local/boot-count").exists());

    // `once`: a change after contact is not shipped...
    fs::write(c.active().join("blade.sif"), "new firmware").expect("write");
    sh(&format!("touch {}/blade.sif", c.active().display()));
    // `interval` (2 s): not at once, but after the interval.
    fs::write(c.active().join("hosts"), "10.0.0.9 new\n").expect("write");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!b.join("hosts").exists(), "interval path shipped early");
    assert!(wait_until(Duration::from_secs(10), || {
        fs::read_to_string(b.join("hosts")).ok().as_deref() == Some("10.0.0.9 new\n")
    }));
    assert_eq!(fs::read(b.join("blade.sif")).expect("read").len(), 200_000);

    // `always`: a touch of an unchanged file re-ships it; the standby's mtime follows.
    sh(&format!(
        "touch -d '2020-05-06 07:08:09' {}/cmm.conf",
        c.active().display()
    ));
    let want = fs::metadata(c.active().join("cmm.conf"))
        .expect("stat")
        .modified()
        .expect("mtime");
    assert!(wait_until(CONVERGE, || {
        fs::metadata(b.join("cmm.conf"))
            .and_then(|m| m.modified())
            .ok()
            == Some(want)
    }));

    // ...but a standby that connects again (new contact) gets the `once` file.
    assert!(c.nodes[1].stop().success());
    c.nodes[1].start(&[]);
    assert!(wait_until(CONVERGE, || {
        fs::read(b.join("blade.sif")).ok().as_deref() == Some(b"new firmware".as_slice())
    }));
    assert!(
        !b.join("local/boot-count").exists(),
        "never file stayed local"
    );
}

#[test]
fn a_node_that_is_not_pinned_cannot_replicate() {
    let _serial = twinfs_tests::serial();
    // Two separate clusters: the active of the second one is told about the first
    // cluster's standby (address and real node ID), but that standby does not pin it.
    let mut good = Cluster::new(2, RULES, fill);
    good.start();
    good.wait_converged(CONVERGE);
    let mut intruder = Cluster::new(2, RULES, |d| {
        fs::write(d.join("cmm.conf"), "evil").expect("fill");
    });
    let standby = &good.nodes[1];
    let standby_config = fs::read_to_string(&standby.config).expect("config");
    let listen = standby_config
        .lines()
        .find_map(|l| l.strip_prefix("listen = "))
        .expect("listen line")
        .trim_matches('"')
        .to_owned();
    let id = String::from_utf8(standby.twinfs(&["init"]).stdout).expect("utf-8");
    let intruder_config = fs::read_to_string(&intruder.nodes[0].config).expect("config");
    let patched = format!(
        "{intruder_config}\n[[peer]]\nname = \"victim\"\naddress = \"{listen}\"\n{}",
        id.trim()
    );
    // The [[peer]] table must come before [[volume]]: rebuild the file in that order.
    let (head, volume) = patched.split_once("[[volume]]").expect("volume table");
    let (volume, extra_peer) = volume.split_once("\n[[peer]]").expect("appended peer");
    fs::write(
        &intruder.nodes[0].config,
        format!("{head}[[peer]]{extra_peer}\n[[volume]]{volume}"),
    )
    .expect("write config");
    intruder.nodes[0].start(&[]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        fs::read_to_string(standby.volume.join("cmm.conf")).expect("read"),
        "chassis_id = 42\n",
        "the standby applied nothing from an unpinned node"
    );
    let log = standby.log_text();
    assert!(
        log.contains("refused") || log.contains("not pinned") || log.contains("failed"),
        "the refusal is logged:\n{log}"
    );
}

/// Calls `read` on a thread of its own until the flag returned is set; the thread
/// returns how many calls read something (`read` returned true). An assertion that
/// fails in `read` fails the thread's join.
fn keep_reading(
    mut read: impl FnMut() -> bool + Send + 'static,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<u32>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let reader = std::thread::spawn(move || {
        let mut seen = 0u32;
        while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
            if read() {
                seen += 1;
            }
        }
        seen
    });
    (stop, reader)
}

#[test]
fn readers_on_the_standby_see_only_whole_versions() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let target = c.nodes[1].volume.join("blob");
    let (stop, reader) = keep_reading({
        let target = target.clone();
        move || {
            let Ok(data) = fs::read(&target) else {
                return false;
            };
            // Each version is 32 KiB of one byte value: a torn or mixed read would
            // show two values or a wrong length.
            assert_eq!(data.len(), 32 * 1024, "torn read: {} bytes", data.len());
            assert!(data.iter().all(|b| *b == data[0]), "mixed versions");
            true
        }
    });
    for i in 0..1000u32 {
        fs::write(c.active().join("blob"), vec![(i % 251) as u8; 32 * 1024]).expect("write");
    }
    let last = vec![(999 % 251) as u8; 32 * 1024];
    // The last version arrives, and is readable at once (no cache timeout).
    assert!(wait_until(CONVERGE, || fs::read(&target).ok().as_deref()
        == Some(&last[..])));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = reader.join().expect("reader never saw a torn version");
    assert!(seen > 0, "the reader read something");
}

/// The same for a large file updated in place on the standby: each version changes
/// two regions 14 MiB apart to one byte value; a reader that saw a version half
/// written would see two values.
#[test]
fn readers_on_the_standby_see_only_whole_versions_of_a_large_file() {
    use std::os::unix::fs::FileExt;
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    const SIZE: usize = 17 << 20;
    const A: u64 = 1 << 20;
    const B: u64 = 15 << 20;
    const REGION: usize = 64 << 10;
    fs::write(c.active().join("image.bin"), vec![0u8; SIZE]).expect("write");
    c.wait_converged(Duration::from_secs(60));
    let target = c.nodes[1].volume.join("image.bin");
    let (stop, reader) = keep_reading({
        let target = target.clone();
        let (mut a, mut b) = (vec![0u8; REGION], vec![0u8; REGION]);
        move || {
            let Ok(f) = fs::File::open(&target) else {
                return false;
            };
            let len = f.metadata().expect("fstat").len();
            f.read_exact_at(&mut a, A).expect("read a");
            f.read_exact_at(&mut b, B).expect("read b");
            drop(f);
            assert_eq!(len, SIZE as u64, "torn: {len} bytes");
            assert!(a.iter().all(|x| *x == a[0]), "a region half written");
            assert_eq!(a, b, "regions of two versions in one read");
            std::thread::sleep(Duration::from_millis(1));
            true
        }
    });
    // Spaced out so that most versions ship: one that changes while the active reads
    // it is not sent (the next one is).
    for i in 1..=12u8 {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(c.active().join("image.bin"))
            .expect("open");
        f.write_all_at(&[i; REGION], A).expect("write a");
        f.write_all_at(&[i; REGION], B).expect("write b");
        drop(f);
        std::thread::sleep(Duration::from_millis(400));
    }
    assert!(wait_until(CONVERGE, || {
        fs::File::open(&target).is_ok_and(|f| {
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, B).is_ok() && b[0] == 12
        })
    }));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = reader.join().expect("reader never saw a torn version");
    assert!(seen > 0, "the reader read something");
    // With readers about, a version may have gone the copy way (a read that kept the
    // file open past the update's wait); without them, the next one is written in
    // place. (Logged once the file is also checked, after readers could see it.)
    let f = fs::OpenOptions::new()
        .write(true)
        .open(c.active().join("image.bin"))
        .expect("open");
    f.write_all_at(&[13; REGION], A).expect("write a");
    drop(f);
    let node = &c.nodes[1];
    assert!(
        wait_until(CONVERGE, || node.log_text().contains("updated in place")),
        "{}",
        node.log_text()
    );
}

#[test]
fn changes_made_while_the_standby_was_away_arrive_after_an_active_restart() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    assert!(c.nodes[1].stop().success());
    fs::write(c.active().join("while-away"), "made with the standby down").expect("write");
    fs::remove_file(c.active().join("cmm.conf")).expect("rm");
    // The active restarts before it could ship anything. With no standby to accept
    // it, it holds local writes back for a while (another node might have taken
    // over meanwhile), then takes them.
    assert!(c.nodes[0].stop().success());
    c.nodes[0].start(&[]);
    assert!(
        c.nodes[0].log_text().contains("no standby answered"),
        "{}",
        c.nodes[0].log_text()
    );
    c.nodes[1].start(&[]);
    c.wait_converged(CONVERGE);
    assert!(!c.nodes[1].volume.join("cmm.conf").exists());
}

/// A stop of the active ships what it has not shipped yet, `interval` paths too (as a
/// demote does), before it closes the connections: a standby that takes over next
/// must not miss it.
#[test]
fn a_stopping_active_ships_what_is_pending_first() {
    let _serial = twinfs_tests::serial();
    let rules = RULES.replace("interval = \"2s\"", "interval = \"1h\"");
    let mut c = Cluster::new(2, &rules, fill);
    c.start();
    c.wait_converged(CONVERGE);
    fs::write(
        c.active().join("hosts"),
        "10.0.0.9 written before the stop\n",
    )
    .expect("write");
    std::thread::sleep(Duration::from_millis(300));
    let b = c.nodes[1].volume.join("hosts");
    assert_ne!(
        fs::read_to_string(&b).ok().as_deref(),
        Some("10.0.0.9 written before the stop\n"),
        "an hourly path shipped early"
    );
    assert!(c.nodes[0].stop().success());
    assert_eq!(
        fs::read_to_string(&b).ok().as_deref(),
        Some("10.0.0.9 written before the stop\n"),
        "{}",
        c.nodes[0].log_text()
    );
    assert!(c.nodes[0]
        .log_text()
        .contains("shipped everything before stopping"));
}

#[test]
fn large_files_travel_on_their_own_streams_as_block_deltas() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    // Bigger than one message may be; distinct bytes so a misplaced chunk shows.
    let big: Vec<u8> = (0..40u32 << 20).map(|i| (i % 253) as u8).collect();
    fs::write(c.active().join("huge.img"), &big).expect("write");
    fs::write(c.active().join("after"), "small").expect("write");
    let b = c.nodes[1].volume.clone();
    assert!(wait_until(CONVERGE, || fs::read_to_string(b.join("after"))
        .ok()
        .as_deref()
        == Some("small")));
    c.wait_converged(Duration::from_secs(60));
    assert_eq!(fs::read(b.join("huge.img")).expect("read"), big);

    // A 1 MiB change in the middle travels as the blocks it touches, not the file.
    let sent = || {
        c.nodes[0].volume_status()["peers"][0]["bytes_sent"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = sent();
    let mut changed = big.clone();
    let at = (17 << 20) + 12_345;
    changed[at..at + (1 << 20)].fill(0x5A);
    {
        use std::io::{Seek, Write};
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(c.active().join("huge.img"))
            .expect("open");
        f.seek(std::io::SeekFrom::Start(at as u64)).expect("seek");
        f.write_all(&changed[at..at + (1 << 20)]).expect("write");
    }
    c.wait_converged(Duration::from_secs(60));
    assert_eq!(fs::read(b.join("huge.img")).expect("read"), changed);
    let delta = sent() - before;
    assert!(
        delta < (1 << 20) + 3 * 65_536 + 10_000,
        "a 1 MiB change sent {delta} bytes"
    );
    // Written into the standby's copy in place, not into a new 40 MiB copy.
    assert!(
        c.nodes[1].log_text().contains("updated in place"),
        "{}",
        c.nodes[1].log_text()
    );
    // And the active read only the blocks the write touched (17 of 64 KiB) to hash
    // the new version, not the 40 MiB: the mount told it which were written.
    let active_log = c.nodes[0].log_text();
    let reads: Vec<u64> = active_log
        .lines()
        .filter(|l| l.contains("hashed from its written blocks"))
        .filter_map(|l| {
            l.split("read=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        reads.contains(&(17 * 65_536)),
        "no hash from the written blocks alone: {reads:?}\n{active_log}"
    );

    // A reader on the standby that has the file open while the next change arrives
    // keeps reading the version it opened, whole; an open after the change gets the
    // new one. (The change goes the copy way: in place, the reader would see it.)
    let mut reader = fs::File::open(b.join("huge.img")).expect("open on the standby");
    let mut next = changed.clone();
    let at2 = (30 << 20) + 999;
    next[at2..at2 + 4096].fill(0xA5);
    {
        use std::io::{Seek, Write};
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(c.active().join("huge.img"))
            .expect("open");
        f.seek(std::io::SeekFrom::Start(at2 as u64)).expect("seek");
        f.write_all(&next[at2..at2 + 4096]).expect("write");
    }
    c.wait_converged(Duration::from_secs(60));
    assert_eq!(fs::read(b.join("huge.img")).expect("read"), next);
    let mut old = Vec::new();
    std::io::Read::read_to_end(&mut reader, &mut old).expect("read the open version");
    assert!(old == changed, "the open reader saw the change happen");
    assert!(
        c.nodes[1].log_text().contains("a reader has the file open"),
        "{}",
        c.nodes[1].log_text()
    );
    drop(reader);

    // And at contact too (full sync): a standby that was away gets a new one.
    assert!(c.nodes[1].stop().success());
    let big2: Vec<u8> = (0..20u32 << 20).map(|i| (i % 251) as u8).collect();
    fs::write(c.active().join("huge2.img"), &big2).expect("write");
    c.nodes[1].start(&[]);
    c.wait_converged(Duration::from_secs(60));
    assert_eq!(fs::read(b.join("huge2.img")).expect("read"), big2);
}

/// The active hashes a large file changed through the mount by reading only the
/// blocks the mount saw written: whatever the change (a write across blocks, a
/// truncation, a growth, an append, a punched hole, an `O_TRUNC` open, a write through
/// a second handle), the standby ends up with the same bytes, and most of these
/// changes were hashed that way.
#[test]
fn a_large_file_changed_in_every_way_is_hashed_from_its_written_blocks_and_stays_equal() {
    use std::io::{Seek, SeekFrom, Write};
    use std::os::fd::AsRawFd;
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let path = c.active().join("disk.img");
    let mut want: Vec<u8> = (0..20u32 << 20).map(|i| (i % 241) as u8).collect();
    fs::write(&path, &want).expect("write");
    c.wait_converged(Duration::from_secs(60));
    let b = c.nodes[1].volume.join("disk.img");
    let incremental = |c: &Cluster| {
        c.nodes[0]
            .log_text()
            .matches("hashed from its written blocks")
            .count()
    };
    let open = || {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open")
    };
    let mut step = |name: &str, c: &mut Cluster, change: &mut dyn FnMut(&mut Vec<u8>)| {
        change(&mut want);
        c.wait_converged(Duration::from_secs(60));
        assert!(
            fs::read(&b).expect("read on the standby") == want,
            "after {name}: the standby's copy differs"
        );
    };
    step("a write across blocks", &mut c, &mut |want| {
        let at = (3 << 20) + 4_000;
        want[at..at + 200_000].fill(1);
        let mut f = open();
        f.seek(SeekFrom::Start(at as u64)).expect("seek");
        f.write_all(&want[at..at + 200_000]).expect("write");
    });
    step("writes through two handles", &mut c, &mut |want| {
        let (mut f, mut g) = (open(), open());
        want[100..200].fill(2);
        want[(9 << 20)..(9 << 20) + 10].fill(3);
        f.seek(SeekFrom::Start(100)).expect("seek");
        f.write_all(&want[100..200]).expect("write");
        g.seek(SeekFrom::Start(9 << 20)).expect("seek");
        g.write_all(&want[(9 << 20)..(9 << 20) + 10])
            .expect("write");
    });
    step("a truncation inside a block", &mut c, &mut |want| {
        want.truncate((18 << 20) + 777);
        open().set_len(want.len() as u64).expect("truncate");
    });
    step("a growth with zeros", &mut c, &mut |want| {
        want.resize((19 << 20) + 5, 0);
        open().set_len(want.len() as u64).expect("grow");
    });
    step(
        "a truncation and a growth back to the same length",
        &mut c,
        &mut |want| {
            let len = want.len();
            want[(10 << 20)..].fill(0);
            let f = open();
            f.set_len(10 << 20).expect("truncate");
            f.set_len(len as u64).expect("grow");
        },
    );
    step("an append", &mut c, &mut |want| {
        let tail = vec![4u8; 100_000];
        want.extend_from_slice(&tail);
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        f.write_all(&tail).expect("append");
    });
    step("a punched hole", &mut c, &mut |want| {
        let (at, len) = ((5 << 20) + 10, 300_000usize);
        want[at..at + len].fill(0);
        let f = open();
        // SAFETY: a valid fd.
        let rc = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                at as i64,
                len as i64,
            )
        };
        assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
    });
    let before_trunc = incremental(&c);
    assert!(
        before_trunc >= 5,
        "only {before_trunc} of the changes so far were hashed from their written blocks\n{}",
        c.nodes[0].log_text()
    );
    step("an O_TRUNC open and a rewrite", &mut c, &mut |want| {
        want.truncate(17 << 20);
        want[(1 << 20)..(2 << 20)].fill(5);
        fs::write(&path, &*want).expect("rewrite");
    });
    // After a new start nothing is kept. A file sent whole at contact (to a standby
    // that lacks it; its hash from the cache) leaves its list on the way, so its next
    // change reads only the written blocks.
    assert!(c.nodes[1].stop().success());
    fs::remove_file(&b).expect("remove the standby's copy");
    assert!(c.nodes[0].stop().success());
    c.nodes[0].start(&[]);
    c.nodes[1].start(&[]);
    step(
        "a full sync to a standby that lacks it",
        &mut c,
        &mut |_| {},
    );
    let after_restart = incremental(&c);
    step("a write after a restart", &mut c, &mut |want| {
        want[7 << 20] = 6;
        let mut f = open();
        f.seek(SeekFrom::Start(7 << 20)).expect("seek");
        f.write_all(&[6]).expect("write");
    });
    assert!(
        incremental(&c) > after_restart,
        "the first write after a restart was not hashed from its written blocks\n{}",
        c.nodes[0].log_text()
    );
}

/// An in-place update of a large file that a crash interrupted is finished from its
/// journal when the daemon starts again, before anything reads the file; a journal
/// whose writing the crash cut short is discarded (its file was not touched yet).
#[test]
fn an_interrupted_in_place_update_is_finished_at_the_next_start() {
    use std::os::unix::fs::MetadataExt;
    use twinfs_replicator::patch::{Entry, Journal};
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    let big: Vec<u8> = (0..20u32 << 20).map(|i| (i % 241) as u8).collect();
    fs::write(c.active().join("big.img"), &big).expect("write");
    c.wait_converged(Duration::from_secs(60));
    assert!(c.nodes[1].stop().success());
    assert!(c.nodes[0].stop().success());

    // What the standby was applying: 2 MiB at 5 MiB, and the file grown by 1000
    // bytes. It had written the journal and half of the new bytes when it died.
    let path = c.nodes[1].volume.join("big.img");
    let st = fs::metadata(&path).expect("stat the standby's copy");
    let mut new = big.clone();
    new[5 << 20..7 << 20].fill(0x77);
    new.extend(std::iter::repeat_n(0x33u8, 1000));
    let records = vec![
        (5u64 << 20, new[5 << 20..7 << 20].to_vec()),
        (
            big.len() as u64 - (big.len() as u64 % 65_536),
            new[big.len() - big.len() % 65_536..].to_vec(),
        ),
    ];
    let generation = fs::File::open(&path)
        .and_then(|f| twinfs_fs::sys::generation(std::os::fd::AsFd::as_fd(&f)))
        .ok();
    let entry = Entry {
        path: b"big.img".to_vec(),
        key: (st.dev(), st.ino()),
        generation,
        size: new.len() as u64,
        meta: twinfs_replicator::apply::FileMeta {
            mode: 0o640,
            uid: st.uid(),
            gid: st.gid(),
            mtime: (1_700_000_000, 5),
            xattrs: vec![],
        },
        records,
    };
    let dir = c.nodes[1].state_dir.join("volumes").join("vol.journal");
    let journal = Journal::new(&dir);
    // (By the standby of epoch 1 it still is at its start.)
    journal.write_at(&entry, 1).expect("write the journal");
    {
        use std::io::{Seek, Write};
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        f.seek(std::io::SeekFrom::Start(5 << 20)).expect("seek");
        f.write_all(&new[5 << 20..6 << 20])
            .expect("half of the update");
    }
    // Another journal, cut short by the crash, for a file it never touched.
    let conf = fs::metadata(c.nodes[1].volume.join("cmm.conf")).expect("stat");
    let other = Entry {
        path: b"cmm.conf".to_vec(),
        key: (conf.dev(), conf.ino()),
        size: 1,
        records: vec![(0, b"X".to_vec())],
        ..entry
    };
    let written = Journal::new(dir.join("scratch"))
        .write(&other)
        .expect("write");
    drop(written);
    let whole = fs::read_dir(dir.join("scratch"))
        .expect("list")
        .next()
        .expect("one journal")
        .expect("entry")
        .path();
    let bytes = fs::read(&whole).expect("read");
    fs::write(dir.join("cut.journal"), &bytes[..bytes.len() / 2]).expect("write");
    fs::remove_dir_all(dir.join("scratch")).expect("rm");
    let conf_before = fs::read(c.nodes[1].volume.join("cmm.conf")).expect("read");

    // The standby alone: no active to bring the file up to date, only the journal.
    c.nodes[1].start(&[]);
    let mounted = c.nodes[1].volume.join("big.img");
    assert!(
        fs::read(&mounted).expect("read") == new,
        "the update was not finished"
    );
    let meta = fs::metadata(&mounted).expect("stat");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!((meta.mtime(), meta.mtime_nsec()), (1_700_000_000, 5));
    assert_eq!(
        fs::read(c.nodes[1].volume.join("cmm.conf")).expect("read"),
        conf_before,
        "a cut journal was replayed"
    );
    assert_eq!(
        fs::read_dir(&dir).expect("list").count(),
        0,
        "journals left"
    );
    let log = c.nodes[1].log_text();
    assert!(
        log.contains("finished an in-place update a crash interrupted"),
        "{log}"
    );
    assert!(log.contains("discarded an incomplete journal"), "{log}");
}

#[test]
fn status_shows_each_peer() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    fs::write(c.active().join("one-more"), "x").expect("write");
    c.wait_converged(CONVERGE);
    let peer_of = |i: usize| c.nodes[i].volume_status()["peers"][0].clone();
    assert!(wait_until(CONVERGE, || {
        let p = peer_of(0);
        p["connected"] == true
            && p["full_sync"] == "done"
            && p["pending"] == 0
            && p["acked"] == p["ops"]
    }));
    let active_view = peer_of(0);
    assert_eq!(active_view["peer"], "node1", "{active_view}");
    assert_eq!(active_view["full_sync_percent"], 100, "{active_view}");
    assert_eq!(active_view["pending_bytes"], 0, "{active_view}");
    assert!(
        active_view["full_sync_bytes"].as_u64().unwrap_or(0) > 0
            && active_view["full_sync_bytes"] == active_view["full_sync_bytes_done"]
            && active_view["full_sync_ops"] == active_view["full_sync_ops_done"],
        "{active_view}"
    );
    assert!(
        active_view["bytes_sent"].as_u64().unwrap_or(0) > 200_000,
        "{active_view}"
    );
    assert!(
        active_view["last_contact"].as_u64().is_some(),
        "{active_view}"
    );
    assert!(
        active_view["rtt_us"].as_u64().is_some_and(|us| us > 0),
        "round-trip time: {active_view}"
    );
    let standby_view = peer_of(1);
    assert_eq!(standby_view["peer"], "node0", "{standby_view}");
    assert_eq!(standby_view["connected"], true, "{standby_view}");
    assert_eq!(standby_view["full_sync"], "done", "{standby_view}");
    assert!(standby_view["bytes_received"].as_u64().unwrap_or(0) > 200_000);
    // The table shows them too.
    let table = String::from_utf8(c.nodes[0].twinfs(&["status"]).stdout).expect("utf-8");
    assert!(table.contains("peer node1"), "{table}");

    // A standby that goes away shows as disconnected on the active.
    assert!(c.nodes[1].stop().success());
    let active = &c.nodes[0];
    assert!(wait_until(CONVERGE, || {
        active.volume_status()["peers"][0]["connected"] == false
    }));
}

#[test]
fn sync_durability_waits_for_the_standby_and_gives_up_at_the_timeout() {
    let _serial = twinfs_tests::serial();
    let rules = format!("durability = \"sync\"\nsync_timeout = \"3s\"\n{RULES}");
    let mut c = Cluster::new(2, &rules, fill);
    c.start();
    c.wait_converged(CONVERGE);
    there_when_close_returns(&c, (0..20).map(|i| format!("synced-{i}")));

    // A standby that does not answer: the write completes after sync_timeout, and
    // status says that standby is out of sync.
    c.nodes[1].signal(libc::SIGSTOP);
    fs::write(c.active().join("while-paused"), "late").expect("write completes");
    let peer = c.nodes[0].volume_status()["peers"][0].clone();
    assert_eq!(peer["out_of_sync"], true, "{peer}");
    assert!(peer["out_of_sync_since"].as_u64().is_some(), "{peer}");
    let table = String::from_utf8(c.nodes[0].twinfs(&["status"]).stdout).expect("utf-8");
    assert!(table.contains("OUT OF SYNC since"), "{table}");
    c.nodes[1].signal(libc::SIGCONT);
    c.wait_converged(CONVERGE);
    let active = &c.nodes[0];
    assert!(wait_until(CONVERGE, || {
        let peer = &active.volume_status()["peers"][0];
        peer["out_of_sync"] == false && peer["out_of_sync_since"].is_null()
    }));
}

/// A sync write that the standby refuses (its disk is full) is not taken for
/// delivered, though the standby answers: the writer is held until `sync_timeout`,
/// the standby shows out of sync, and `twinfs sync` says what it refused. Once the
/// standby has room, a full sync brings it in.
#[test]
fn a_sync_write_the_standby_refuses_is_not_taken_for_delivered() {
    let _serial = twinfs_tests::serial();
    let rules = format!("durability = \"sync\"\nsync_timeout = \"3s\"\n{RULES}");
    let mut c = Cluster::new(2, &rules, fill);
    // The standby's volume is a small disk, mostly taken by a file of its own.
    let disk = twinfs_tests::Tmpfs::at(&c.nodes[1].volume, 4 << 20, 0o755);
    fs::write(c.nodes[1].volume.join("local"), vec![1u8; 3 << 20]).expect("filler");
    c.start();
    // (Its own file keeps the trees apart: compared by the status and the files.)
    let active = &c.nodes[0];
    let settled = || {
        let p = &active.volume_status()["peers"][0];
        p["full_sync"] == "done" && p["pending"] == 0 && p["acked"] == p["ops"]
    };
    assert!(wait_until(CONVERGE, settled));
    assert!(c.nodes[1].volume.join("blade.sif").exists());

    fs::write(c.active().join("big"), vec![7u8; 2 << 20]).expect("write completes");
    // (Status shows it at the session's next turn, at most a heartbeat later.)
    assert!(
        wait_until(Duration::from_secs(5), || {
            active.volume_status()["peers"][0]["out_of_sync"] == true
        }),
        "a write the standby refused was taken for delivered: {}",
        active.volume_status()
    );
    assert!(!c.nodes[1].volume.join("big").exists());
    let out = c.nodes[0].twinfs(&["sync", "big"]);
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("NOT acknowledged") && said.contains("refused big"),
        "{said}"
    );
    assert_eq!(
        active.volume_status()["peers"][0]["refused_unrepaired"],
        true
    );
    // Waiting would not bring it: later sync writers are not held for that standby
    // (none waited until sync_timeout).
    fs::write(c.active().join("small"), "x").expect("write completes");
    assert!(
        !active
            .log_text()
            .contains("did not apply a sync write in time"),
        "a writer waited for a standby that refused a change"
    );

    // Room again: the next full sync repairs it.
    disk.remove("local").expect("free the standby's disk");
    let out = c.nodes[0].twinfs(&["sync", "--full"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        fs::read(c.nodes[1].volume.join("big")).expect("read on the standby"),
        vec![7u8; 2 << 20]
    );
    assert!(wait_until(CONVERGE, || {
        let p = &active.volume_status()["peers"][0];
        p["out_of_sync"] == false && p["refused_unrepaired"] == false
    }));

    // Refused again: a demotion does not take that standby for having everything,
    // and keeps what a new active's full sync would replace here.
    fs::write(c.active().join("big2"), vec![8u8; 2 << 20]).expect("write completes");
    assert!(wait_until(CONVERGE, || {
        active.volume_status()["peers"][0]["refused_unrepaired"] == true
    }));
    let out = c.nodes[0].twinfs(&["demote"]);
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("NOT acknowledged: node1 (refused big2") && said.contains("is kept first in"),
        "{said}"
    );
}

#[test]
fn sync_durability_per_rule_holds_only_the_paths_it_names() {
    let _serial = twinfs_tests::serial();
    let rules = format!(
        "sync_timeout = \"3s\"\n\n[[volume.rule]]\nmatch = \"critical\"\nsync = \"always\"\ndurability = \"sync\"\n{RULES}"
    );
    let mut c = Cluster::new(2, &rules, fill);
    c.start();
    c.wait_converged(CONVERGE);
    fs::create_dir(c.active().join("critical")).expect("mkdir");
    there_when_close_returns(&c, (0..10).map(|i| format!("critical/passwd-{i}")));

    // With the standby paused, a write to a path of the (async) volume does not
    // wait, so it cannot time out; one under the sync rule does, and times out.
    c.nodes[1].signal(libc::SIGSTOP);
    fs::write(c.active().join("cmm.conf"), "async while paused\n").expect("write");
    let peer = c.nodes[0].volume_status()["peers"][0].clone();
    assert_eq!(peer["out_of_sync"], false, "an async write waited: {peer}");
    fs::write(c.active().join("critical/late"), "late").expect("write completes");
    let peer = c.nodes[0].volume_status()["peers"][0].clone();
    assert_eq!(peer["out_of_sync"], true, "{peer}");
    c.nodes[1].signal(libc::SIGCONT);
    c.wait_converged(CONVERGE);
}

/// Writes each file on the active and checks that the standby has it as soon as
/// close() returned (sync durability: no waiting here).
fn there_when_close_returns(c: &Cluster, names: impl Iterator<Item = String>) {
    for (i, name) in names.enumerate() {
        fs::write(c.active().join(&name), format!("version {i}")).expect("write");
        assert_eq!(
            fs::read_to_string(c.nodes[1].volume.join(&name))
                .ok()
                .as_deref(),
            Some(format!("version {i}").as_str()),
            "{name} on the standby when close() returned"
        );
    }
}

#[test]
fn a_network_cut_during_a_stream_of_writes_heals_by_itself() {
    let _serial = twinfs_tests::serial();
    use twinfs_tests::daemon::NetPair;
    let net = NetPair::new((std::process::id() % 250) as u8);
    let mut c = Cluster::in_namespaces(&net, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);

    let writer = {
        let dir = c.active().to_path_buf();
        std::thread::spawn(move || {
            for i in 0..300 {
                fs::write(dir.join(format!("stream-{}", i % 50)), format!("write {i}"))
                    .expect("write");
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    // The standby's peer is the active's namespace address: the traffic crosses the veth.
    let seen_from = c.nodes[1].volume_status()["peers"][0]["address"].clone();
    assert!(
        seen_from
            .as_str()
            .is_some_and(|a| a.starts_with(&net.addresses[0])),
        "{seen_from}"
    );
    net.cut();
    std::thread::sleep(Duration::from_secs(3));
    // The cut is real: the standby is behind.
    let behind =
        twinfs_tests::tree::digest(c.active()) != twinfs_tests::tree::digest(&c.nodes[1].volume);
    assert!(behind, "the standby kept up through a cut link");
    net.heal();
    writer.join().expect("writer");
    // The QUIC connection may need its idle timeout to notice; then the active redials
    // and a full sync settles the difference.
    c.wait_converged(Duration::from_secs(60));
}

/// Makes a file mutable again when dropped (after the cluster, so after the unmount),
/// even when the test fails, and removes the scratch directory the node's own cleanup
/// could not remove because of it.
struct Unlock(Option<(std::path::PathBuf, std::path::PathBuf)>);

impl Drop for Unlock {
    fn drop(&mut self) {
        if let Some((file, scratch)) = &self.0 {
            let _ = Command::new("chattr").arg("-i").arg(file).status();
            let _ = fs::remove_dir_all(scratch);
        }
    }
}

#[test]
fn a_change_the_standby_cannot_apply_is_reported_and_the_rest_goes_on() {
    let _serial = twinfs_tests::serial();
    let mut unlock = Unlock(None);
    let mut c = Cluster::new(2, RULES, |d| {
        fill(d);
        fs::write(d.join("locked.conf"), "new").expect("fill");
    });
    // An immutable file on the standby: replacing it fails there (EPERM).
    let locked = c.nodes[1].volume.join("locked.conf");
    fs::write(&locked, "old").expect("fill");
    sh(&format!("chattr +i {}", locked.display()));
    unlock.0 = Some((locked.clone(), c.nodes[1].dir.path().to_path_buf()));
    c.start();
    let b = c.nodes[1].volume.clone();
    assert!(wait_until(CONVERGE, || b.join("ssh/known_hosts").exists()));
    let active = &c.nodes[0];
    let reported = wait_until(CONVERGE, || {
        let peer = active.volume_status()["peers"][0].clone();
        peer["rejected"].as_u64().unwrap_or(0) >= 1
            && peer["rejected_paths"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|p| p.as_str().is_some_and(|p| p.starts_with("locked.conf")))
            })
    });
    // Later changes still flow.
    fs::write(c.active().join("after"), "still replicating").expect("write");
    let flowed = wait_until(CONVERGE, || b.join("after").exists());
    let status = active.volume_status();
    assert!(reported, "status lists the refused path: {status}");
    assert!(flowed);
}

#[test]
fn a_directory_the_active_lacks_keeps_the_standbys_never_files() {
    let _serial = twinfs_tests::serial();
    let rules = format!("{RULES}\n[[volume.rule]]\nmatch = \"*.local\"\nsync = \"never\"\n");
    let mut c = Cluster::new(2, &rules, |d| {
        fill(d);
        fs::write(d.join("box"), "a file on the active").expect("fill");
    });
    // The standby has `site`, which the active lacks, and a directory `box` where the
    // active has a file; both hold files that are `never` here.
    let b = c.nodes[1].volume.clone();
    fs::create_dir_all(b.join("site/sub")).expect("fill");
    fs::create_dir(b.join("box")).expect("fill");
    fs::write(b.join("site/hosts.local"), "10.0.0.1 blade\n").expect("fill");
    fs::write(b.join("site/sub/id.local"), "7").expect("fill");
    fs::write(b.join("site/old.conf"), "not on the active").expect("fill");
    fs::write(b.join("box/id.local"), "blade 3").expect("fill");
    c.start();
    // Deletions come first in a full sync: once the file `box` is refused (it would
    // have replaced a never file), the deletion of `site` is through.
    let active = &c.nodes[0];
    let refused = wait_until(CONVERGE, || {
        active.volume_status()["peers"][0]["rejected_paths"]
            .as_array()
            .is_some_and(|a| {
                a.iter()
                    .any(|p| p.as_str().is_some_and(|p| p.starts_with("box")))
            })
    });
    assert!(
        refused,
        "the put over box was not refused: {}",
        active.volume_status()
    );
    assert!(
        !b.join("site/old.conf").exists(),
        "the active's deletion was not applied"
    );
    assert_eq!(
        fs::read_to_string(b.join("site/hosts.local")).expect("kept"),
        "10.0.0.1 blade\n"
    );
    assert_eq!(
        fs::read_to_string(b.join("site/sub/id.local")).expect("kept"),
        "7"
    );
    assert_eq!(
        fs::read_to_string(b.join("box/id.local")).expect("kept"),
        "blade 3"
    );
    // The rest replicates as usual.
    assert_eq!(
        fs::read_to_string(b.join("cmm.conf")).expect("read"),
        "chassis_id = 42\n"
    );
}

/// The listen address in a node's config.
fn listen_of(node: &twinfs_tests::daemon::Node) -> String {
    fs::read_to_string(&node.config)
        .expect("config")
        .lines()
        .find_map(|l| l.strip_prefix("listen = "))
        .expect("listen line")
        .trim_matches('"')
        .to_owned()
}

#[test]
fn crafted_frames_from_a_pinned_peer_close_only_their_session() {
    let _serial = twinfs_tests::serial();
    use twinfs_replicator::protocol::{Message, Op};
    use twinfs_replicator::transport::{self, PinnedPeers, TlsIdentity};
    use twinfs_tools::identity::Identity;

    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    // A peer the standby trusts (it holds the active's key) turned hostile or buggy.
    let (active_id, _) = Identity::load_or_create(&c.nodes[0].state_dir, "node0").expect("id");
    let (standby_id, _) = Identity::load_or_create(&c.nodes[1].state_dir, "node1").expect("id");
    let tls = TlsIdentity {
        cert: active_id.certificate().clone(),
        key: rustls_pki_types::PrivateKeyDer::Pkcs8(active_id.private_key().clone_key()),
    };
    let standby_addr: std::net::SocketAddr = listen_of(&c.nodes[1]).parse().expect("addr");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let pinned = PinnedPeers::new([*standby_id.node_id().as_bytes()]);
        let bind = std::net::SocketAddr::new(standby_addr.ip(), 0);
        let endpoint = transport::endpoint(bind, &tls, pinned).expect("endpoint");
        let (conn, _) =
            transport::connect(&endpoint, standby_addr, *standby_id.node_id().as_bytes())
                .await
                .expect("a pinned identity connects");
        let hello = Message::Hello {
            version: twinfs_replicator::protocol::VERSION,
            volume: "vol".into(),
            role: twinfs_fs::Role::Active,
            epoch: 1,
        }
        .encode()
        .expect("encode");
        // 1. Garbage after a valid hello.
        let (mut send, _recv) = conn.open_bi().await.expect("stream");
        transport::write_frame(&mut send, &hello)
            .await
            .expect("hello");
        transport::write_frame(&mut send, b"\xff\xfe garbage")
            .await
            .expect("garbage");
        // 2. A frame announced far over the limit.
        let (mut send2, _recv2) = conn.open_bi().await.expect("stream");
        send2
            .write_all(&u32::MAX.to_be_bytes())
            .await
            .expect("prefix");
        // 3. An op whose path climbs out of the volume.
        let (mut send3, _recv3) = conn.open_bi().await.expect("stream");
        transport::write_frame(&mut send3, &hello)
            .await
            .expect("hello");
        let op = Message::Op {
            seq: 1,
            op: Op::Delete {
                path: twinfs_replicator::path::RelPath::new("x/y").expect("path"),
            },
        };
        let mut bytes = op.encode().expect("encode");
        let at = bytes
            .windows(3)
            .position(|w| w == b"x/y")
            .expect("path bytes");
        bytes[at..at + 3].copy_from_slice(b"../");
        transport::write_frame(&mut send3, &bytes)
            .await
            .expect("frame");
        tokio::time::sleep(Duration::from_millis(500)).await;
        conn.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
    });
    // The standby is alive, serves its users, and still follows the real active.
    assert!(
        c.nodes[1].status_json().is_some(),
        "standby daemon still answers"
    );
    fs::write(c.active().join("after-attack"), "fine").expect("write");
    c.wait_converged(CONVERGE);
    let log = c.nodes[1].log_text();
    assert!(
        log.contains("bad message"),
        "garbage was refused and logged:\n{log}"
    );
}

/// The TLS identity of `node` (made by `twinfs init`), for the test to act as it.
fn identity_of(
    node: &twinfs_tests::daemon::Node,
    name: &str,
) -> twinfs_replicator::transport::TlsIdentity {
    let (id, _) =
        twinfs_tools::identity::Identity::load_or_create(&node.state_dir, name).expect("id");
    twinfs_replicator::transport::TlsIdentity {
        cert: id.certificate().clone(),
        key: rustls_pki_types::PrivateKeyDer::Pkcs8(id.private_key().clone_key()),
    }
}

/// The volume named in the hello a stream starts with.
async fn hello_volume(recv: &mut quinn::RecvStream) -> String {
    use twinfs_replicator::protocol::{Message, MAX_MESSAGE};
    let bytes = twinfs_replicator::transport::read_frame(recv, MAX_MESSAGE)
        .await
        .expect("read")
        .expect("a first frame");
    match Message::decode(&bytes).expect("decode") {
        Message::Hello { volume, .. } => volume,
        other => panic!("stream started with {other:?}"),
    }
}

#[test]
fn a_volume_whose_session_ends_gets_a_new_stream_while_the_others_run() {
    let _serial = twinfs_tests::serial();
    use twinfs_replicator::transport::{self, PinnedPeers};

    let mut c = Cluster::new(2, "", |_| {});
    let second = c.nodes[0].dir.path().join("vol2");
    fs::create_dir(&second).expect("mkdir");
    let mut config = fs::read_to_string(&c.nodes[0].config).expect("config");
    config.push_str(&format!(
        "[[volume]]\nname = \"two\"\npath = \"{}\"\ninitial_role = \"active\"\n",
        second.display()
    ));
    fs::write(&c.nodes[0].config, config).expect("config");
    // The test plays node 1, the standby, at its address.
    let standby = identity_of(&c.nodes[1], "node1");
    let (active, _) =
        twinfs_tools::identity::Identity::load_or_create(&c.nodes[0].state_dir, "node0")
            .expect("id");
    let addr: std::net::SocketAddr = listen_of(&c.nodes[1]).parse().expect("addr");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut listener = runtime.block_on(async {
        let pinned = PinnedPeers::new([*active.node_id().as_bytes()]);
        let endpoint = transport::endpoint(addr, &standby, pinned).expect("endpoint");
        transport::Listener::new(endpoint)
    });
    c.nodes[0].start(&[]);
    let streams = runtime.block_on(async {
        let waited = tokio::time::timeout(CONVERGE, async {
            let (conn, _) = listener
                .accept()
                .await
                .expect("endpoint open")
                .expect("the active connects");
            let mut kept = Vec::new();
            let mut two = 0;
            loop {
                let (send, mut recv) = conn.accept_bi().await.expect("a stream");
                let volume = hello_volume(&mut recv).await;
                if volume == "two" {
                    two += 1;
                    if two == 2 {
                        break;
                    }
                    // The standby closes the stream of this volume only: its
                    // session ends, the other's goes on.
                    drop((send, recv));
                } else {
                    kept.push((volume, send, recv));
                }
            }
            kept.into_iter().map(|(v, ..)| v).collect::<Vec<_>>()
        });
        waited.await
    });
    let streams = streams.unwrap_or_else(|_| {
        panic!(
            "no new stream for volume two in {CONVERGE:?}; active's log:\n{}",
            c.nodes[0].log_text()
        )
    });
    // The other volume's session was never interrupted.
    assert_eq!(streams, ["vol"]);
}

#[test]
fn a_witness_identity_cannot_run_a_session() {
    let _serial = twinfs_tests::serial();
    use twinfs_replicator::protocol::{Message, MAX_MESSAGE};
    use twinfs_replicator::transport::{self, PinnedPeers};

    // Loopback addresses of their own (`Cluster::new` numbers its subnets below 250).
    let net = std::process::id() % 200 + 20;
    let addresses = (1..=3).map(|i| format!("127.{net}.251.{i}:7790")).collect();
    let mut c = Cluster::with_witnesses(addresses, 1, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    // Node 2, the witness, offers the standby a session as an active of a later epoch.
    let witness = identity_of(&c.nodes[2], "node2");
    let (standby_id, _) =
        twinfs_tools::identity::Identity::load_or_create(&c.nodes[1].state_dir, "node1")
            .expect("id");
    let standby_addr: std::net::SocketAddr = listen_of(&c.nodes[1]).parse().expect("addr");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let answer = runtime.block_on(async {
        let standby_id = *standby_id.node_id().as_bytes();
        let bind = std::net::SocketAddr::new(standby_addr.ip(), 0);
        let endpoint =
            transport::endpoint(bind, &witness, PinnedPeers::new([standby_id])).expect("endpoint");
        let (conn, _) = transport::connect(&endpoint, standby_addr, standby_id)
            .await
            .expect("a witness is pinned");
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        let hello = Message::Hello {
            version: twinfs_replicator::protocol::VERSION,
            volume: "vol".into(),
            role: twinfs_fs::Role::Active,
            epoch: 5,
        };
        transport::write_frame(&mut send, &hello.encode().expect("encode"))
            .await
            .expect("hello");
        let answer = tokio::time::timeout(CONVERGE, transport::read_frame(&mut recv, MAX_MESSAGE))
            .await
            .expect("the standby answers or closes the stream");
        conn.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        answer.ok().flatten()
    });
    assert!(
        answer.is_none(),
        "the standby answered a witness's hello; log:\n{}",
        c.nodes[1].log_text()
    );
    assert_eq!(
        c.nodes[1].volume_status()["epoch"],
        1,
        "the standby followed nobody"
    );
    // It still follows the real active.
    fs::write(c.active().join("after-witness"), "fine").expect("write");
    c.wait_converged(CONVERGE);
}

/// Runs `twinfs ARGS` on node `i`, in `cwd` when given; panics unless it succeeds, and
/// returns its stdout.
fn twinfs_ok(c: &Cluster, i: usize, cwd: Option<&Path>, args: &[&str]) -> String {
    let node = &c.nodes[i];
    let out = match cwd {
        Some(dir) => node.twinfs_in(dir, args),
        None => node.twinfs(args),
    };
    assert!(
        out.status.success(),
        "twinfs {args:?}: {}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.log_text()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `twinfs ARGS` on node `i` in `cwd`; panics if it succeeds, and returns its
/// stderr.
fn twinfs_refused(c: &Cluster, i: usize, cwd: &Path, args: &[&str]) -> String {
    let out = c.nodes[i].twinfs_in(cwd, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "twinfs {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

/// `twinfs sync PATH` never sends an op for the volume's root (it sent a deletion of
/// it, which the standby refused), takes `.` and relative paths from the current
/// directory inside the volume, says which paths it ships as deletions, and `--full`
/// takes a volume's name only.
#[test]
fn sync_refuses_the_root_and_says_what_it_ships() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let root = c.active().to_owned();
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let outside = elsewhere.path();

    let shown = root.display().to_string();
    let with_slash = format!("{shown}/");
    let climbing = format!("{shown}/ssh/..");
    let ssh = root.join("ssh");
    for (cwd, args) in [
        (outside, vec!["sync", shown.as_str()]),
        (outside, vec!["sync", "vol", with_slash.as_str()]),
        (outside, vec!["sync", climbing.as_str()]),
        (root.as_path(), vec!["sync", "."]),
        (ssh.as_path(), vec!["sync", ".."]),
    ] {
        let err = twinfs_refused(&c, 0, cwd, &args);
        assert!(
            err.contains("is the volume's root") && err.contains("twinfs sync --full vol"),
            "{args:?} in {}: {err}",
            cwd.display()
        );
    }
    // Nor does the daemon take the root from another client.
    let socket = c.nodes[0].state_dir.join("control.sock");
    for path in ["", shown.as_str()] {
        let request = twinfs_tools::control::Request::Sync {
            volume: Some("vol".into()),
            paths: vec![path.into()],
            full: false,
        };
        match twinfs_tools::control::call(&socket, &request, CONVERGE) {
            Ok(twinfs_tools::control::Response::Error(e)) => {
                assert!(e.contains("--full"), "{path:?}: {e}")
            }
            other => panic!("{path:?}: {other:?}"),
        }
    }

    // Relative paths come from the current directory inside the volume. A `once`
    // file changed after contact stays put until `twinfs sync` ships it.
    fs::write(root.join("ssh/new.sif"), "firmware 3\n").expect("write");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!c.nodes[1].volume.join("ssh/new.sif").exists());
    let said = twinfs_ok(&c, 0, Some(&ssh), &["sync", "new.sif"]);
    assert!(said.contains("1 path(s) acknowledged by node1"), "{said}");
    assert!(!said.contains("deletion"), "{said}");
    assert_eq!(
        fs::read_to_string(c.nodes[1].volume.join("ssh/new.sif")).expect("shipped"),
        "firmware 3\n"
    );

    // A name that is neither a volume nor on this node: shipped as a deletion, and
    // said so.
    let said = twinfs_ok(&c, 0, Some(outside), &["sync", "volx"]);
    assert!(
        said.contains("volx: not on this node: sent as a deletion"),
        "{said}"
    );
    // `--full` takes a volume's name, never a path.
    let err = twinfs_refused(&c, 0, outside, &["sync", "--full", "volx"]);
    assert!(
        err.contains("no volume named \"volx\" (volumes: vol)"),
        "{err}"
    );
    let err = twinfs_refused(&c, 0, outside, &["sync", "--full", "vol", "cmm.conf"]);
    assert!(err.contains("--full"), "{err}");

    // The standby refused nothing: no op for the root ever reached it.
    for node in &c.nodes {
        let peer = node.volume_status()["peers"][0].clone();
        assert_eq!(peer["rejected"], 0, "{peer}");
    }
}

/// `full_sync_done` says when the last full sync completed, on both nodes: it moves
/// with a full sync asked for by `twinfs sync --full` (it stayed at the first contact).
#[test]
fn every_full_sync_moves_full_sync_done() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let done = |i: usize| c.nodes[i].volume_status()["peers"][0]["full_sync_done"].as_u64();
    assert!(wait_until(CONVERGE, || done(0).is_some() && done(1).is_some()));
    let before = [done(0), done(1)];
    // The field has whole seconds.
    std::thread::sleep(Duration::from_millis(1100));
    let said = twinfs_ok(&c, 0, None, &["sync", "--full"]);
    assert!(said.contains("full sync acknowledged by node1"), "{said}");
    let moved = wait_until(Duration::from_secs(10), || {
        done(0) > before[0] && done(1) > before[1]
    });
    assert!(
        moved,
        "before {before:?}, after [{:?}, {:?}]",
        done(0),
        done(1)
    );
}

/// A dead active looks connected to its standby until QUIC's idle timeout ends the
/// connection; meanwhile the table says how long it has been silent.
#[test]
fn status_says_how_long_a_connected_peer_has_been_silent() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let table = c.nodes[1].status_text();
    assert!(
        table.contains("connected") && !table.contains("no word"),
        "{table}"
    );
    c.nodes[0].kill9_only();
    let mut last = String::new();
    let said = wait_until(Duration::from_secs(9), || {
        last = c.nodes[1].status_text();
        last.contains("connected (no word for ")
    });
    assert!(said, "{last}");
}

/// Each name's inode number, link count and content on `dir` (through its mount).
fn names(dir: &Path, names: &[&str]) -> Vec<(u64, u64, String)> {
    use std::os::unix::fs::MetadataExt;
    names
        .iter()
        .map(|n| {
            let meta = fs::symlink_metadata(dir.join(n));
            let content = fs::read_to_string(dir.join(n)).unwrap_or_default();
            meta.map_or((0, 0, content.clone()), |m| (m.ino(), m.nlink(), content))
        })
        .collect()
}

/// Whether the paths are all names of one file with `content` and exactly `links` names.
fn linked(dir: &Path, paths: &[&str], links: u64, content: &str) -> bool {
    let seen = names(dir, paths);
    seen.iter()
        .all(|(ino, nlink, c)| *ino == seen[0].0 && *nlink == links && c == content)
}

fn verify_identical(c: &Cluster) {
    let out = c.nodes[0].twinfs(&["verify"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.contains("node1: identical"),
        "{said}"
    );
}

/// Hard links made on the active are links on the standby: a write through one name
/// reaches every name, metadata is shared, and removing a name leaves the others.
#[test]
fn hard_links_stay_links_on_the_standby() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let a = c.active().to_path_buf();
    let b = c.nodes[1].volume.clone();
    let all = ["h_a", "h_b", "sub/h_c"];
    fs::write(a.join("h_a"), "v1\n").expect("write");
    fs::hard_link(a.join("h_a"), a.join("h_b")).expect("ln");
    fs::create_dir(a.join("sub")).expect("mkdir");
    fs::hard_link(a.join("h_b"), a.join("sub/h_c")).expect("ln");
    let ok = wait_until(CONVERGE, || linked(&b, &all, 3, "v1\n"));
    assert!(ok, "not linked on the standby: {:?}", names(&b, &all));

    // Written through one name (as `echo v2 >> h_a` does), chmod through another.
    sh(&format!("echo v2 >> {}", a.join("h_a").display()));
    let ok = wait_until(CONVERGE, || linked(&b, &all, 3, "v1\nv2\n"));
    assert!(ok, "a name kept the old content: {:?}", names(&b, &all));
    sh(&format!("echo v3 >> {}", a.join("sub/h_c").display()));
    let ok = wait_until(CONVERGE, || linked(&b, &all, 3, "v1\nv2\nv3\n"));
    assert!(ok, "a name kept the old content: {:?}", names(&b, &all));
    sh(&format!("chmod 600 {}", a.join("h_b").display()));
    c.wait_converged(CONVERGE);
    assert!(linked(&b, &all, 3, "v1\nv2\nv3\n"), "{:?}", names(&b, &all));
    verify_identical(&c);

    // One name goes, the others stay one file.
    fs::remove_file(a.join("h_a")).expect("rm");
    let ok = wait_until(CONVERGE, || {
        !b.join("h_a").exists() && linked(&b, &all[1..], 2, "v1\nv2\nv3\n")
    });
    assert!(ok, "{:?}", names(&b, &all));
    c.wait_converged(CONVERGE);
    verify_identical(&c);
}

/// A hard link to a symlink or a FIFO (`ln` does not follow a symlink) reaches the
/// standby as one more symlink or FIFO of its own, without a refusal: only regular
/// files' names stay one file there.
#[test]
fn a_hard_link_to_a_symlink_or_fifo_arrives_without_a_refusal() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let a = c.active().to_path_buf();
    sh(&format!(
        "cd {} && ln -s cmm.conf sym && ln sym sym2 && mkfifo fifo && ln fifo fifo2",
        a.display()
    ));
    c.wait_converged(CONVERGE);
    let b = &c.nodes[1].volume;
    assert_eq!(
        fs::read_link(b.join("sym2")).expect("a symlink on the standby"),
        Path::new("cmm.conf")
    );
    use std::os::unix::fs::FileTypeExt;
    let fifo = fs::symlink_metadata(b.join("fifo2")).expect("a FIFO on the standby");
    assert!(fifo.file_type().is_fifo());
    verify_identical(&c);
    assert_converged_by_the_stream_alone(&c);
}

/// Directories whose fate comes right after a change in them, back to back: a file
/// moved into a new directory that is then removed or moved away, and a directory
/// given a mode and linked into, then removed and made again as a file. The active often
/// reads the directory after its fate: the ops on the old directory must still apply
/// on the standby, without a refusal or a manifest comparison.
#[test]
fn ops_into_a_directory_removed_or_moved_right_after_arrive_without_a_refusal() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let a = c.active().to_path_buf();
    // Made by syscalls back to back (a shell's fork and exec between them would give
    // the active time to read each directory before its fate).
    let w = a.join("w");
    fs::create_dir(&w).expect("mkdir w");
    // The standby makes a directory for a rename into one the active sent as gone:
    // rounds of 100 until it did (the test must not pass without the case).
    let made = || {
        c.nodes[1]
            .log_text()
            .matches("made a directory the active sent as gone")
            .count()
    };
    let mut last = 0;
    for round in 0..5 {
        for n in 0..100 {
            let i = round * 100 + n;
            let (x, t) = (w.join(format!("x{i}")), w.join(format!("t{i}")));
            fs::write(&x, format!("{i}\n")).expect("write x");
            fs::create_dir(&t).expect("mkdir t");
            fs::rename(&x, t.join("x")).expect("mv x t/x");
            fs::remove_dir_all(&t).expect("rm -r t");
            let (y, u) = (w.join(format!("y{i}")), w.join(format!("u{i}")));
            fs::write(&y, format!("{i}\n")).expect("write y");
            fs::create_dir(&u).expect("mkdir u");
            fs::rename(&y, u.join("y")).expect("mv y u/y");
            fs::rename(&u, w.join(format!("v{i}"))).expect("mv u v");
            let (f, d) = (w.join(format!("f{i}")), w.join(format!("d{i}")));
            fs::write(&f, format!("{i}\n")).expect("write f");
            fs::create_dir(&d).expect("mkdir d");
            fs::set_permissions(&d, fs::Permissions::from_mode(0o750)).expect("chmod d");
            fs::hard_link(&f, d.join("l")).expect("ln f d/l");
            fs::remove_dir_all(&d).expect("rm -r d");
            fs::write(&d, "file\n").expect("write d");
            last = i;
        }
        c.wait_converged(CONVERGE);
        if made() > 0 {
            break;
        }
    }
    assert!(
        made() > 0,
        "no rename went into a directory sent as gone in 500 tries: the test proves nothing"
    );
    let b = &c.nodes[1].volume;
    assert_eq!(
        fs::read_to_string(b.join(format!("w/v{last}/y")))
            .expect("moved in, then moved with its directory"),
        format!("{last}\n")
    );
    assert!(!b.join(format!("w/t{last}")).exists() && !b.join(format!("w/x{last}")).exists());
    assert_eq!(
        fs::read_to_string(b.join(format!("w/d{last}"))).expect("d"),
        "file\n"
    );
    verify_identical(&c);
    assert_converged_by_the_stream_alone(&c);
}

/// A hard link made to a new file that its writer still has open (the standby has no
/// version of it yet): no refusal. The new name goes as a copy, and a manifest
/// comparison links the two names on the standby.
#[test]
fn a_hard_link_to_a_new_file_still_being_written_is_not_refused() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let a = c.active().to_path_buf();
    for i in 0..5 {
        let (g, b) = (a.join(format!("new{i}")), a.join(format!("link{i}")));
        let mut f = fs::File::create(&g).expect("create");
        std::io::Write::write_all(&mut f, b"first part\n").expect("write");
        // Its ship finds it being written: held back.
        std::thread::sleep(Duration::from_millis(50));
        fs::hard_link(&g, &b).expect("ln");
        std::io::Write::write_all(&mut f, b"second part\n").expect("write");
        drop(f);
    }
    c.wait_converged(CONVERGE);
    verify_identical(&c);
    let (rejected, paths) = refusals_on_the_standby(&c);
    assert_eq!(rejected, 0, "the standby refused changes: {paths}");
    use std::os::unix::fs::MetadataExt;
    let b = &c.nodes[1].volume;
    let ok = wait_until(CONVERGE, || {
        let ino = |p: &str| fs::metadata(b.join(p)).map(|m| m.ino()).ok();
        ino("new4").is_some() && ino("new4") == ino("link4")
    });
    assert!(ok, "the two names are not one file on the standby");
}

/// A large file new to the standby, renamed twice and then changed while the active
/// sends it: the active gives up on that version, so the standby has nothing to move
/// when the renames come; the change ships the file under its last name. No refusal,
/// no manifest comparison.
#[test]
fn a_large_file_renamed_and_changed_while_it_is_sent_arrives_without_a_refusal() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let a = c.active().to_path_buf();
    let gave_up = || streams_given_up(&c);
    // Until the active gave up on two versions (on a fast machine a stream can end
    // before the change): the test must not pass without the case it is about.
    for i in 0..10 {
        if gave_up() >= 2 {
            break;
        }
        let (g, big) = (a.join(format!("g{i}")), a.join(format!("big{i}")));
        fs::write(&g, vec![i as u8; 48 << 20]).expect("write g");
        // Once its stream has begun (the active counts its bytes as pending), a change
        // of its last block, which goes last, makes the active give that version up.
        wait_for_a_stream(&c, &format!("g{i}"));
        // Through a name between (the standby has nothing under either).
        let mid = a.join(format!("mid{i}"));
        fs::rename(&g, &mid).expect("mv g mid");
        fs::rename(&mid, &big).expect("mv mid big");
        write_at(&big, b"changed", (48 << 20) - 16);
        c.wait_converged(CONVERGE);
    }
    assert!(
        gave_up() >= 2,
        "the active gave up on {} versions in 10 tries: the test proves nothing",
        gave_up()
    );
    verify_identical(&c);
    assert_converged_by_the_stream_alone(&c);
}

/// A large file new to the standby, moved over a FIFO (or over a file with another
/// name), given a hard link and changed through it while the active sends it: the
/// active gives up on that version, so the standby has no file for the link to name
/// (only what the move replaced). No refusal, no manifest comparison: the change
/// ships the file under the name it was written through, and the standby makes its
/// other names then (and the replaced file's other name keeps it); also when the
/// active gives up on that version too.
#[test]
fn a_hard_link_to_a_large_file_whose_stream_was_given_up_is_not_refused() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let a = c.active().to_path_buf();
    let b = c.nodes[1].volume.clone();
    let gave_up = || streams_given_up(&c);
    let sent = || {
        c.nodes[0].volume_status()["peers"][0]["bytes_sent"]
            .as_u64()
            .unwrap_or(0)
    };
    // Whether the active gave up on a version with the link's name before the FIFO's,
    // and after it, and on two versions in a row (the second shipped under the link's
    // name: the standby then has no version under either name yet).
    let (mut hit, mut twice) = ([false; 2], false);
    // Until it did all three (on a fast machine a stream can end before the change):
    // the test must not pass without the cases it is about.
    for i in 0..20 {
        if hit == [true; 2] && twice {
            break;
        }
        // A new name that sorts before the FIFO's, then one after: the first name of
        // the linked file (the one the active links to) is either.
        let (fifo, g) = (format!("m{i}"), format!("g{i}"));
        let link = if i % 2 == 0 {
            format!("a{i}")
        } else {
            format!("z{i}")
        };
        // Odd: a file with another name, which keeps it.
        let other = format!("q{i}");
        if i % 2 == 0 {
            sh(&format!("mkfifo {}", a.join(&fifo).display()));
        } else {
            fs::write(a.join(&fifo), "replaced\n").expect("write");
            fs::hard_link(a.join(&fifo), a.join(&other)).expect("ln");
        }
        c.wait_converged(CONVERGE);
        let before = gave_up();
        fs::write(a.join(&g), vec![i as u8; 48 << 20]).expect("write g");
        wait_for_a_stream(&c, &g);
        fs::rename(a.join(&g), a.join(&fifo)).expect("mv g over the fifo");
        fs::hard_link(a.join(&fifo), a.join(&link)).expect("ln");
        write_at(&a.join(&link), b"changed", (48 << 20) - 16);
        // Given up: the change ships the file, whole (the standby has none); once
        // 8 MiB of it went, another change through the link, at its end.
        if wait_until(Duration::from_secs(2), || gave_up() > before) {
            let from = sent();
            let going = wait_until(CONVERGE, || sent() >= from + (8 << 20));
            assert!(going, "the active never sent {link}");
            write_at(&a.join(&link), b"again", (48 << 20) - 8);
        }
        c.wait_converged(CONVERGE);
        let ok = wait_until(CONVERGE, || {
            let seen = names(&b, &[fifo.as_str(), link.as_str()]);
            seen[0].0 == seen[1].0 && seen.iter().all(|s| s.1 == 2)
        });
        assert!(ok, "{fifo} and {link} are not one file on the standby");
        if i % 2 == 1 {
            let seen = names(&b, &[other.as_str()]);
            assert!(
                seen[0].1 == 1 && seen[0].2 == "replaced\n",
                "{other} on the standby: {seen:?}"
            );
        }
        if gave_up() > before {
            hit[i % 2] = true;
        }
        twice |= gave_up() >= before + 2;
    }
    assert!(
        hit == [true; 2] && twice,
        "the active gave up on a version with the link's name before the FIFO's: {}, \
         after it: {}, on two in a row: {twice}, in 20 tries: the test proves nothing",
        hit[0],
        hit[1]
    );
    verify_identical(&c);
    assert_converged_by_the_stream_alone(&c);
}

/// A standby that was away converges by full sync: names the active linked meanwhile
/// become links, names the active separated become files of their own.
#[test]
fn a_full_sync_links_and_unlinks_names_on_the_standby() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let a = c.active().to_path_buf();
    let b = c.nodes[1].volume.clone();
    fs::write(a.join("p"), "shared\n").expect("write");
    fs::hard_link(a.join("p"), a.join("q")).expect("ln");
    fs::write(a.join("x"), "one\n").expect("write");
    fs::write(a.join("y"), "one\n").expect("write");
    let ok = wait_until(CONVERGE, || linked(&b, &["p", "q"], 2, "shared\n"));
    assert!(ok, "{:?}", names(&b, &["p", "q"]));
    c.wait_converged(CONVERGE);
    assert!(c.nodes[1].stop().success());

    // q becomes a file of its own (as an editor's save by rename makes it), with p's
    // content for a start; x and y, copies with equal content, become one file.
    sh(&format!(
        "cd {} && cp p q.new && mv q.new q && ln -f x y && echo more >> x",
        a.display()
    ));
    c.nodes[1].start(&[]);
    c.wait_converged(CONVERGE);
    let ok = wait_until(CONVERGE, || linked(&b, &["x", "y"], 2, "one\nmore\n"));
    assert!(ok, "{:?}", names(&b, &["x", "y"]));
    let seen = names(&b, &["p", "q"]);
    assert!(
        seen[0].0 != seen[1].0 && seen.iter().all(|s| s.1 == 1 && s.2 == "shared\n"),
        "{seen:?}"
    );
    verify_identical(&c);

    // Streaming again: a write to p leaves q alone.
    sh(&format!("echo p2 >> {}", a.join("p").display()));
    c.wait_converged(CONVERGE);
    assert_eq!(fs::read_to_string(b.join("q")).expect("read"), "shared\n");
}

/// How many large files' streams the active gave up on (they changed while sent).
fn streams_given_up(c: &Cluster) -> usize {
    c.nodes[0]
        .log_text()
        .matches("large file not sent; its next change ships it")
        .count()
}

/// Waits until the active sends a large file (it counts its bytes as pending).
fn wait_for_a_stream(c: &Cluster, what: &str) {
    let begun = wait_until(CONVERGE, || {
        c.nodes[0].volume_status()["peers"][0]["pending_bytes"]
            .as_u64()
            .is_some_and(|b| b > 0)
    });
    assert!(begun, "the active never sent {what}");
}

/// Writes `bytes` at `offset` into the file at `path`, in place, and closes it.
fn write_at(path: &Path, bytes: &[u8], offset: u64) {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for writing");
    std::os::unix::fs::FileExt::write_all_at(&f, bytes, offset).expect("write");
}

/// The standby converged by the stream alone: no change refused (a refused one is
/// repaired only by a new manifest comparison), and no scan but the one at contact.
fn assert_converged_by_the_stream_alone(c: &Cluster) {
    let (rejected, paths) = refusals_on_the_standby(c);
    assert_eq!(rejected, 0, "the standby refused changes: {paths}");
    let scans = c.nodes[0]
        .log_text()
        .matches("twinfs_replicator::node: scanned")
        .count();
    assert_eq!(scans, 1, "the active compared manifests again");
}

/// The standby's refusals in its session with the active, as `twinfs status --json`
/// shows them: (count, "path: reason" of the last ones).
fn refusals_on_the_standby(c: &Cluster) -> (u64, serde_json::Value) {
    let peer = c.nodes[1].volume_status()["peers"][0].clone();
    (
        peer["rejected"].as_u64().expect("rejected count"),
        peer["rejected_paths"].clone(),
    )
}

#[test]
fn files_written_under_a_temp_name_and_renamed_over_arrive_without_a_refusal() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let a = c.active().to_path_buf();
    // As rsync and atomic-write helpers do: write a temp file, rename it over the
    // target, as fast as possible. The temp name is often gone by the time the
    // active reads the file it closed.
    fs::create_dir(a.join("py")).expect("mkdir");
    for i in 0..200 {
        let tmp = a.join(format!("py/.f{i}.tmp"));
        fs::write(&tmp, format!("{i}").repeat(100)).expect("write temp");
        fs::rename(&tmp, a.join(format!("py/f{i}"))).expect("rename");
    }
    // Over existing targets, too.
    for i in 0..50 {
        let tmp = a.join(format!("py/.f{i}.tmp"));
        fs::write(&tmp, format!("second {i}")).expect("write temp");
        fs::rename(&tmp, a.join(format!("py/f{i}"))).expect("rename");
    }
    // A directory filled under a temp name, then renamed into place.
    for round in 0..5 {
        let tmpd = a.join(format!("tmpd{round}"));
        fs::create_dir_all(tmpd.join("sub")).expect("mkdir");
        for i in 0..10 {
            fs::write(tmpd.join(format!("x{i}")), format!("x{i} of {round}")).expect("write");
        }
        fs::write(tmpd.join("sub/y"), "deeper").expect("write");
        fs::rename(&tmpd, a.join(format!("final{round}"))).expect("rename dir");
    }
    c.wait_converged(CONVERGE);
    let b = &c.nodes[1].volume;
    assert_eq!(
        fs::read_to_string(b.join("py/f7")).expect("read"),
        "second 7"
    );
    assert_eq!(
        fs::read_to_string(b.join("final4/sub/y")).expect("read"),
        "deeper"
    );
    assert_converged_by_the_stream_alone(&c);
    assert!(
        wait_until(CONVERGE, || c.nodes[1].volume_status()["takeover"]
            == "ready"),
        "{}",
        c.nodes[1].volume_status()
    );
}

/// A hard link made to a file that is removed at once (Maildir delivery, lock
/// files: write `tmp/x`, `ln tmp/x new/x`, `rm tmp/x`): the active often finds `tmp/x`
/// gone when it reads it, so the standby never had it to link to. The new name must
/// arrive as a copy, without a refusal.
#[test]
fn a_link_to_a_file_removed_at_once_arrives_without_a_refusal() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let a = c.active().to_path_buf();
    fs::create_dir_all(a.join("tmp")).expect("mkdir");
    fs::create_dir_all(a.join("new")).expect("mkdir");
    for i in 0..100 {
        let tmp = a.join(format!("tmp/m{i}"));
        fs::write(&tmp, format!("message {i}")).expect("write");
        fs::hard_link(&tmp, a.join(format!("new/m{i}"))).expect("link");
        fs::remove_file(&tmp).expect("unlink");
    }
    c.wait_converged(CONVERGE);
    assert_eq!(
        fs::read_to_string(c.nodes[1].volume.join("new/m42")).expect("read"),
        "message 42"
    );
    let (rejected, paths) = refusals_on_the_standby(&c);
    assert_eq!(rejected, 0, "the standby refused changes: {paths}");
}

#[test]
fn sync_durability_an_atomic_write_is_on_the_standby_when_its_rename_returns() {
    let _serial = twinfs_tests::serial();
    let rules = format!("durability = \"sync\"\nsync_timeout = \"20s\"\n{RULES}");
    let mut c = Cluster::new(2, &rules, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let (a, b) = (c.active().to_path_buf(), c.nodes[1].volume.clone());
    for i in 0..30 {
        let tmp = a.join(format!(".f{i}.tmp"));
        fs::write(&tmp, format!("version {i}")).expect("write temp");
        fs::rename(&tmp, a.join("f")).expect("rename");
        assert_eq!(
            fs::read_to_string(b.join("f")).ok().as_deref(),
            Some(format!("version {i}").as_str()),
            "f on the standby when rename() returned"
        );
    }
    let (rejected, paths) = refusals_on_the_standby(&c);
    assert_eq!(rejected, 0, "the standby refused changes: {paths}");
    let peer = c.nodes[0].volume_status()["peers"][0].clone();
    assert_eq!(peer["out_of_sync"], false, "a write timed out: {peer}");
}

/// Log rotation right after a write (`echo >> log; mv log log.1; echo > log`): the
/// active may read `log` for the write's ship after the rename and the new file's
/// create, and find the new file there. What it read is not what the rename moves:
/// `log.1` on the standby must get the rotated content, not the new file's.
#[test]
fn a_file_rotated_right_after_its_write_arrives_with_its_own_content() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let a = c.active().to_path_buf();
    fs::create_dir(a.join("logs")).expect("mkdir");
    for i in 0..300 {
        let log = a.join(format!("logs/l{i}"));
        fs::write(&log, format!("rotated {i}\n").repeat(20)).expect("write");
        fs::rename(&log, a.join(format!("logs/l{i}.1"))).expect("rotate");
        fs::write(&log, format!("new {i}\n")).expect("write new");
    }
    c.wait_converged(CONVERGE);
    assert_eq!(
        fs::read_to_string(c.nodes[1].volume.join("logs/l7.1")).expect("read"),
        "rotated 7\n".repeat(20)
    );
    assert_converged_by_the_stream_alone(&c);
}

/// A file renamed while its writer still has it open (a download moved into place
/// before it is closed, a log renamed under its daemon): the active cannot ship the
/// file before its close, so the standby lacks it when the rename comes. The file must
/// still arrive under its new name, without a refusal.
#[test]
fn a_file_renamed_while_still_being_written_arrives_without_a_refusal() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let a = c.active().to_path_buf();
    fs::create_dir(a.join("w")).expect("mkdir");
    for i in 0..30 {
        use std::io::Write as _;
        let mut f = fs::File::create(a.join(format!("w/part{i}"))).expect("create");
        f.write_all(format!("first {i}\n").as_bytes())
            .expect("write");
        fs::rename(a.join(format!("w/part{i}")), a.join(format!("w/done{i}"))).expect("rename");
        f.write_all(b"more\n").expect("write");
        drop(f);
    }
    c.wait_converged(CONVERGE);
    let b = &c.nodes[1].volume;
    assert_eq!(
        fs::read_to_string(b.join("w/done7")).expect("read"),
        "first 7\nmore\n"
    );
    assert_converged_by_the_stream_alone(&c);
}

/// A database some process holds open without writing (an SQLite reader opens it
/// read-write) does not hold up what other processes write to it: each writer's
/// commit ships while the reader keeps its connection.
#[test]
fn an_sqlite_reader_kept_open_does_not_hold_up_other_writers() {
    use std::io::{BufRead, BufReader, Write as _};
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let db = c.active().join("nodes.sqlite");
    let b = c.nodes[1].volume.join("nodes.sqlite");
    let sql = |statements: &str| {
        let out = Command::new("sqlite3")
            .arg(&db)
            .arg(statements)
            .output()
            .expect("sqlite3 (Debian package sqlite3)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sql("CREATE TABLE t (n INTEGER);");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut reader = Kill(
        Command::new("sqlite3")
            .arg(&db)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sqlite3"),
    );
    let mut input = reader.0.stdin.take().expect("stdin");
    let mut output = BufReader::new(reader.0.stdout.take().expect("stdout"));
    let mut line = String::new();
    writeln!(input, "SELECT count(*) FROM t;").expect("ask the reader");
    output.read_line(&mut line).expect("the reader answers");
    assert_eq!(line.trim(), "0");
    let on_the_standby = || {
        let out = Command::new("sqlite3")
            .arg(format!("file:{}?immutable=1", b.display()))
            .arg("SELECT count(*) FROM t;")
            .output()
            .expect("sqlite3 on the standby");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    for round in 1..=3 {
        sql(&format!("INSERT INTO t VALUES ({round});"));
        assert!(
            wait_until(CONVERGE, || on_the_standby() == round.to_string()),
            "round {round}: the standby has {} rows",
            on_the_standby()
        );
    }
    // The reader was there all along.
    line.clear();
    writeln!(input, "SELECT count(*) FROM t;").expect("ask the reader");
    output.read_line(&mut line).expect("the reader answers");
    assert_eq!(line.trim(), "3");
    drop(input);
    drop(reader);
    c.wait_converged(CONVERGE);
}

/// An in-place update of a large file whose records fall in holes (the standby keeps
/// the holes of a sparse file) reserves the room they need before anything is
/// written: on a full filesystem the reservation fails, and the file is untouched
/// (a write in place that ran out of space half way would leave it torn).
#[test]
fn an_in_place_update_into_holes_reserves_its_room_first() {
    use std::io::Write as _;
    use std::os::fd::AsFd;
    let _serial = twinfs_tests::serial();
    let tmp = twinfs_tests::Tmpfs::new(2 << 20);
    let img = tmp.path().join("disk.img");
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&img)
        .expect("create");
    file.set_len(8 << 20).expect("a sparse 8 MiB file");
    // The rest of the filesystem filled up.
    let mut filler = fs::File::create(tmp.path().join("filler")).expect("create");
    while filler.write_all(&[1u8; 64 << 10]).is_ok() {}
    drop(filler);
    let records = vec![
        (1u64 << 20, vec![7u8; 1 << 20]),
        (3 << 20, vec![8u8; 64 << 10]),
    ];
    let err = twinfs_replicator::patch::reserve(file.as_fd(), &records, 8 << 20)
        .expect_err("no room for 1 MiB in the holes");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert_eq!(fs::metadata(&img).expect("stat").len(), 8 << 20);
    assert!(
        fs::read(&img).expect("read").iter().all(|b| *b == 0),
        "untouched"
    );
    // With room, it is reserved, and the write in place then cannot run out of it.
    fs::remove_file(tmp.path().join("filler")).expect("rm");
    twinfs_replicator::patch::reserve(file.as_fd(), &records, 8 << 20).expect("reserve");
    let mut filler = fs::File::create(tmp.path().join("filler")).expect("create");
    while filler.write_all(&[1u8; 64 << 10]).is_ok() {}
    drop(filler);
    twinfs_replicator::patch::write_records(file.as_fd(), &records, 8 << 20)
        .expect("written in the room reserved");
    let data = fs::read(&img).expect("read");
    assert!(data[1 << 20..2 << 20].iter().all(|b| *b == 7));
    assert!(data[3 << 20..(3 << 20) + (64 << 10)]
        .iter()
        .all(|b| *b == 8));
}

/// An SQLite database kept open by its writer (xCAT keeps its tables in SQLite under
/// `/etc/xcat`): each transaction writes the database in place and fsyncs it, beside
/// a rollback journal that is created, fsync'd and deleted. The standby must get a
/// whole, consistent database at each commit while the writer still has it open, and
/// never keep a stale journal (SQLite would take it for a hot journal and roll back).
#[test]
fn an_sqlite_database_kept_open_by_its_writer_reaches_the_standby_whole() {
    use std::io::{BufRead, BufReader, Write as _};
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let a = c.active().to_path_buf();
    fs::create_dir(a.join("xcat")).expect("mkdir");
    let db = a.join("xcat/nodelist.sqlite");
    let mut writer = Command::new("sqlite3")
        .arg(&db)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sqlite3 (Debian package sqlite3)");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut stdin = writer.stdin.take().expect("stdin");
    let mut stdout = BufReader::new(writer.stdout.take().expect("stdout"));
    let writer = Kill(writer);
    let mut ask = |sql: String| -> String {
        writeln!(stdin, "{sql}").expect("write to sqlite3");
        stdin.flush().expect("flush");
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read from sqlite3");
        line.trim().to_owned()
    };
    ask("PRAGMA journal_mode=DELETE;".into());
    let create = "CREATE TABLE nodelist(node TEXT PRIMARY KEY, grp TEXT, status TEXT);";
    assert_eq!(ask(format!("{create} SELECT 'created';")), "created");
    let on_the_standby = |c: &Cluster| -> String {
        let b = c.nodes[1].volume.join("xcat/nodelist.sqlite");
        let out = Command::new("sqlite3")
            .arg("-readonly")
            .arg(format!("file:{}?immutable=1", b.display()))
            .arg("PRAGMA integrity_check; SELECT count(*), max(node) FROM nodelist;")
            .output()
            .expect("sqlite3 on the standby");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    for round in 1..=3 {
        for i in 0..100 {
            let n = (round - 1) * 100 + i;
            ask(format!(
                "INSERT INTO nodelist VALUES ('cn{n:04}', 'compute', 'booted'); SELECT 1;"
            ));
        }
        ask("UPDATE nodelist SET status = 'installing' WHERE node < 'cn0010'; SELECT 1;".into());
        // The writer keeps the database open; what it committed must be there.
        c.wait_converged(CONVERGE);
        let want = format!("ok\n{}|cn{:04}", round * 100, round * 100 - 1);
        assert_eq!(on_the_standby(&c), want, "round {round}");
        assert!(
            !c.nodes[1]
                .volume
                .join("xcat/nodelist.sqlite-journal")
                .exists(),
            "a journal was left on the standby"
        );
    }
    drop(stdin);
    drop(writer);
    c.wait_converged(CONVERGE);
    assert_eq!(on_the_standby(&c), "ok\n300|cn0299");
    let (rejected, paths) = refusals_on_the_standby(&c);
    assert_eq!(rejected, 0, "the standby refused changes: {paths}");
}

/// etckeeper keeps a git repository in the directory it watches: git writes each
/// object to a temp file and hard-links it into place (then removes the temp name),
/// moves `index.lock` and ref locks over their targets, and `git gc` packs and prunes.
/// The standby's copy must be a sound repository with the same history, reached by
/// the stream alone.
#[test]
fn a_git_repository_worked_in_on_the_active_is_sound_on_the_standby() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let a = c.active().join("etc");
    fs::create_dir(&a).expect("mkdir");
    let git = |dir: &Path, args: &[&str]| -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "safe.directory=*",
            ])
            .args(args)
            .output()
            .expect("git (Debian package git)");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    git(&a, &["init", "-q"]);
    for round in 0..5 {
        for i in 0..40 {
            fs::write(
                a.join(format!("conf{i}")),
                format!("setting {i} = {round}\n"),
            )
            .expect("write");
        }
        git(&a, &["add", "-A"]);
        git(&a, &["commit", "-q", "-m", &format!("round {round}")]);
    }
    git(&a, &["gc", "-q", "--prune=now"]);
    fs::write(a.join("conf7"), "after gc\n").expect("write");
    git(&a, &["commit", "-q", "-a", "-m", "after gc"]);
    c.wait_converged(CONVERGE);
    let b = c.nodes[1].volume.join("etc");
    assert_eq!(
        git(&b, &["rev-parse", "HEAD"]),
        git(&a, &["rev-parse", "HEAD"])
    );
    git(&b, &["fsck", "--no-dangling", "--no-progress"]);
    assert_eq!(git(&b, &["log", "--format=%s", "-1", "HEAD~1"]), "round 4");
    assert_converged_by_the_stream_alone(&c);
}

/// A hard-linked file changed through one name, which is removed (or has another
/// file renamed over it) right after: the change is recorded under that name, which
/// the active may find gone when it reads it. The other name has the new content on
/// the active; it must get it on the standby too (by a comparison of manifests), not
/// keep the old version there.
#[test]
fn a_change_to_a_linked_file_whose_name_goes_at_once_reaches_its_other_names() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let a = c.active().join("l");
    fs::create_dir(&a).expect("mkdir");
    for i in 0..40 {
        fs::write(a.join(format!("p{i}")), format!("old {i}\n")).expect("write");
        fs::hard_link(a.join(format!("p{i}")), a.join(format!("q{i}"))).expect("link");
    }
    c.wait_converged(CONVERGE);
    for i in 0..40 {
        let p = a.join(format!("p{i}"));
        // In place: the same file, under both names.
        fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .and_then(|mut f| {
                use std::io::Write as _;
                f.write_all(format!("new {i}\n").as_bytes())
            })
            .expect("write in place");
        if i % 2 == 0 {
            fs::remove_file(&p).expect("unlink");
        } else {
            fs::write(a.join(format!(".r{i}")), "replacement\n").expect("write");
            fs::rename(a.join(format!(".r{i}")), &p).expect("rename over");
        }
    }
    c.wait_converged(CONVERGE);
    let b = c.nodes[1].volume.join("l");
    assert_eq!(fs::read_to_string(b.join("q6")).expect("read"), "new 6\n");
    assert_eq!(fs::read_to_string(b.join("q7")).expect("read"), "new 7\n");
    let (rejected, paths) = refusals_on_the_standby(&c);
    assert_eq!(rejected, 0, "the standby refused changes: {paths}");
}

/// The volume root's mode, owner, times and xattrs, as a reader on each node sees them.
fn root_of(dir: &Path) -> (u32, u32, u32, i64, i64, String) {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(dir).expect("stat the root");
    let xattrs = Command::new("getfattr")
        .args(["-d", "-m", "user\\.", "--absolute-names"])
        .arg(dir)
        .output()
        .expect("getfattr (Debian package attr)");
    let xattrs = String::from_utf8_lossy(&xattrs.stdout)
        .lines()
        .filter(|l| l.starts_with("user."))
        .collect::<Vec<_>>()
        .join(",");
    (
        meta.mode() & 0o7777,
        meta.uid(),
        meta.gid(),
        meta.mtime(),
        meta.mtime_nsec(),
        xattrs,
    )
}

#[test]
fn the_volume_roots_metadata_reaches_the_standby() {
    let _serial = twinfs_tests::serial();
    // Set on the active before contact: the full sync brings it.
    let mut c = Cluster::new(2, RULES, |dir| {
        fill(dir);
        sh(&format!(
            "chmod 2750 {d} && chgrp 100 {d} && setfattr -n user.site -v rack1 {d} && touch -d @1577934245.5 {d}",
            d = dir.display()
        ));
    });
    c.start();
    c.wait_converged(CONVERGE);
    let want = root_of(c.active());
    assert_eq!(
        (want.0, want.2, want.3, &*want.5),
        (0o2750, 100, 1_577_934_245, "user.site=\"rack1\"")
    );
    let b = c.nodes[1].volume.clone();
    assert!(
        wait_until(CONVERGE, || root_of(&b) == want),
        "after the full sync: active {want:?}, standby {:?}",
        root_of(&b)
    );
    // Changed through the active's mount while connected: each change ships.
    let a = c.active().display().to_string();
    sh(&format!(
        "chmod 0770 {a} && chgrp 200 {a} && setfattr -n user.site -v rack2 {a}"
    ));
    let want = root_of(c.active());
    assert!(
        wait_until(CONVERGE, || root_of(&b) == want),
        "after chmod, chgrp, setfattr: active {want:?}, standby {:?}",
        root_of(&b)
    );
    // A file created and one removed in the root move its mtime, on the standby too.
    sh(&format!("echo new > {a}/new.conf && rm {a}/cmm.conf"));
    c.wait_converged(CONVERGE);
    let want = root_of(c.active());
    assert!(
        wait_until(CONVERGE, || root_of(&b) == want),
        "after a create and a delete in the root: active {want:?}, standby {:?}",
        root_of(&b)
    );
    sh(&format!("touch -d @1620284889 {a}"));
    let want = root_of(c.active());
    assert_eq!(want.3, 1_620_284_889);
    assert!(
        wait_until(CONVERGE, || root_of(&b) == want),
        "after touch -d: active {want:?}, standby {:?}",
        root_of(&b)
    );
    assert_converged_by_the_stream_alone(&c);
}

/// A name that does not ship as changes come (`interval`, `once`) made in a directory
/// that does moved the directory's mtime: that ships at once, and placing the name
/// later (the interval file when its interval is up) leaves it as the active's.
#[test]
fn a_directorys_mtime_follows_names_of_other_policies_made_in_it() {
    use std::os::unix::fs::MetadataExt;
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let a = c.active().join("net");
    fs::create_dir(&a).expect("mkdir");
    c.wait_converged(CONVERGE);
    let b = c.nodes[1].volume.join("net");
    let mtime = |d: &Path| {
        fs::metadata(d)
            .map(|m| (m.mtime(), m.mtime_nsec()))
            .unwrap_or_default()
    };
    // `hosts` is `interval` (2 s), `*.sif` is `once`.
    fs::write(a.join("hosts"), "10.0.0.1 a\n").expect("write");
    fs::write(a.join("new.sif"), "firmware").expect("write");
    let want = mtime(&a);
    assert!(
        wait_until(CONVERGE, || mtime(&b) == want),
        "before the interval: active {want:?}, standby {:?}",
        mtime(&b)
    );
    assert!(
        wait_until(CONVERGE, || b.join("hosts").exists()),
        "hosts never arrived"
    );
    assert!(
        !b.join("new.sif").exists(),
        "a once file shipped after contact"
    );
    assert!(
        wait_until(CONVERGE, || mtime(&b) == want),
        "after the interval file arrived: active {want:?}, standby {:?}",
        mtime(&b)
    );
    // Removed, then made again as a directory: the standby removes and makes it when
    // the interval is up, and the directory's metadata follows.
    fs::remove_file(a.join("hosts")).expect("rm");
    fs::create_dir(a.join("hosts")).expect("mkdir");
    let want = mtime(&a);
    assert!(
        wait_until(CONVERGE, || b.join("hosts").is_dir() && mtime(&b) == want),
        "after the interval directory arrived: active {want:?}, standby {:?}",
        mtime(&b)
    );
    assert_converged_by_the_stream_alone(&c);
}

/// A path longer than PATH_MAX (a runaway copy into itself, say) cannot be named to a
/// peer: it is left out, and the log and `twinfs verify` say so. It must not stop the
/// rest of the volume: every full sync used to fail on it ("cannot scan below ..."),
/// and the standby got nothing more.
#[test]
fn a_path_past_path_max_is_left_out_without_stopping_the_volume() {
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let a = c.active().display().to_string();
    let b = c.nodes[1].volume.display().to_string();
    // bash, not sh: dash's cd fails once the path it tracks passes PATH_MAX.
    let bash = |script: &str| {
        let out = Command::new("bash")
            .arg("-c")
            .arg(script)
            .output()
            .expect("run bash");
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // 20 levels of 250-byte names under `deep`: the first 16 fit in 4,096 bytes.
    let name = "d".repeat(250);
    let down = format!("cd {a}/deep && for i in $(seq 1 20); do cd {name} || exit 1; done");
    bash(&format!(
        "mkdir {a}/deep && cd {a}/deep && for i in $(seq 1 20); do mkdir {name} && cd {name} || exit 1; done && echo bottom > f && mkdir up && echo up > up/u"
    ));
    // A tree moved down into the deep place goes from the standby as changes come.
    sh(&format!("mkdir {a}/down && echo d > {a}/down/x"));
    c.wait_converged(CONVERGE);
    // The deepest directory a peer can name has the active's mtime, which the names
    // made in it past the limit moved.
    let deepest = |root: &str| {
        bash(&format!(
            "cd {root}/deep && for i in $(seq 1 16); do cd {name} || exit 1; done && stat -c %y ."
        ))
    };
    let want = deepest(&a);
    assert!(
        wait_until(CONVERGE, || deepest(&b) == want),
        "the 16th level: active {want}, standby {}",
        deepest(&b)
    );
    let standby = c.nodes[1].volume.clone();
    assert!(standby.join("down/x").exists());
    bash(&format!("{down} && mv {a}/down ."));
    assert!(
        wait_until(CONVERGE, || !standby.join("down").exists()),
        "down did not go"
    );
    assert_converged_by_the_stream_alone(&c);
    // So does an `interval` file moved down, by a comparison of manifests.
    fs::write(c.active().join("hosts"), "10.0.0.1 a\n").expect("write");
    assert!(
        wait_until(CONVERGE, || standby.join("hosts").exists()),
        "hosts did not arrive"
    );
    bash(&format!("{down} && mv {a}/hosts ."));
    assert!(
        wait_until(CONVERGE, || !standby.join("hosts").exists()),
        "hosts did not go"
    );
    // One moved up out of it arrives whole.
    bash(&format!("{down} && mv up {a}/up"));
    fs::write(c.active().join("after.conf"), "x\n").expect("write");
    c.wait_converged(CONVERGE);
    assert_eq!(
        fs::read_to_string(standby.join("up/u")).expect("read"),
        "up\n"
    );
    // The standby has the 16 levels that fit, and nothing below.
    bash(&format!(
        "cd {b}/deep && for i in $(seq 1 16); do cd {name} || exit 1; done && [ ! -e {name} ]"
    ));
    // A full sync passes over the names that do not fit.
    let out = c.nodes[0].twinfs(&["sync", "--full"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("full sync acknowledged"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `verify` says what is not replicated, and where.
    let out = c.nodes[0].twinfs(&["verify"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("1 name(s) in deep/dddd") && said.contains("not replicated"),
        "{said}"
    );
    let log = c.nodes[0].log_text();
    assert!(
        log.contains("names whose path is longer than PATH_MAX (4096 bytes) are not replicated")
            && log.contains("a change to a path that no peer can name is not replicated"),
        "{}",
        &log[log.len().saturating_sub(3000)..]
    );
    let (rejected, paths) = refusals_on_the_standby(&c);
    assert_eq!(rejected, 0, "the standby refused changes: {paths}");
}

/// A new file its writer holds open ships at its close, after the op that brought its
/// directory's mtime from the create: placing it on the standby must not move that
/// mtime again (`cp` to a new name, or a log rotation's copy, does this).
#[test]
fn a_file_held_open_from_its_create_leaves_its_directorys_mtime_as_the_actives() {
    use std::io::Write as _;
    use std::os::unix::fs::MetadataExt;
    let _serial = twinfs_tests::serial();
    let mut c = Cluster::new(2, RULES, fill);
    c.start();
    c.wait_converged(CONVERGE);
    let a = c.active().join("log");
    fs::create_dir(&a).expect("mkdir");
    let b = c.nodes[1].volume.join("log");
    let mtime = |d: &Path| {
        fs::metadata(d)
            .map(|m| (m.mtime(), m.mtime_nsec()))
            .unwrap_or_default()
    };
    let mut file = fs::File::create(a.join("app.log.1")).expect("create");
    file.write_all(b"first\n").expect("write");
    let want = mtime(&a);
    assert!(
        wait_until(CONVERGE, || mtime(&b) == want),
        "while the file is open: active {want:?}, standby {:?}",
        mtime(&b)
    );
    file.write_all(b"second\n").expect("write");
    drop(file);
    c.wait_converged(CONVERGE);
    assert_eq!(
        fs::read_to_string(b.join("app.log.1")).expect("read"),
        "first\nsecond\n"
    );
    let want = mtime(&a);
    assert!(
        wait_until(CONVERGE, || mtime(&b) == want),
        "after the close: active {want:?}, standby {:?}",
        mtime(&b)
    );
    assert_converged_by_the_stream_alone(&c);
}
