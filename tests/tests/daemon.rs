//! End-to-end tests of the `twinfs` daemon: a real `twinfs mount` process mounts a
//! directory that already holds files, in place, and is stopped, killed and switched
//! between roles from the command line.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use twinfs_tests::daemon::{twinfs_bin, Node};
use twinfs_tests::is_mounted;

const CMM_RULES: &str = r#"
[[volume.rule]]
match = "*.sif"
sync = "once"
priority = 1

[[volume.rule]]
match = "hosts"
sync = "interval"
interval = "1h"

[[volume.rule]]
match = "local/**"
sync = "never"
"#;

fn fill_cmm(dir: &Path) {
    fs::write(dir.join("hosts"), "10.0.0.1 cmm-a\n").expect("hosts");
    fs::create_dir(dir.join("ssh")).expect("ssh");
    fs::write(dir.join("ssh/known_hosts"), "cmm-b ssh-ed25519 AAAA\n").expect("known_hosts");
    fs::write(dir.join("fw.sif"), vec![7u8; 100_000]).expect("fw.sif");
    std::os::unix::fs::symlink("hosts", dir.join("hosts.link")).expect("symlink");
}

#[test]
fn every_command_has_help() {
    let _serial = twinfs_tests::serial();
    let help = |args: &[&str]| {
        let out = std::process::Command::new(twinfs_bin())
            .args(args)
            .output()
            .expect("run twinfs");
        assert!(out.status.success(), "twinfs {args:?} failed");
        String::from_utf8(out.stdout).expect("utf-8 help")
    };
    let top = help(&["--help"]);
    for cmd in [
        "init",
        "mount",
        "status",
        "promote",
        "demote",
        "conflicts",
        "sync",
        "verify",
        "role",
        "config",
    ] {
        assert!(top.contains(cmd), "top-level help lists {cmd}:\n{top}");
        let sub = help(&[cmd, "--help"]);
        assert!(sub.contains("Usage: twinfs"), "{cmd} --help:\n{sub}");
    }
    assert!(help(&["config", "check", "--help"]).contains("without mounting"));
    assert!(help(&["mount", "--help"]).contains("--no-passthrough"));
    assert!(help(&["status", "--help"]).contains("--json"));
}

#[test]
fn init_prints_the_same_node_id_twice() {
    let _serial = twinfs_tests::serial();
    let node = Node::new("", |_| {});
    let first = node.twinfs(&["init"]);
    assert!(first.status.success(), "{first:?}");
    let second = node.twinfs(&["init"]);
    assert!(second.status.success(), "{second:?}");
    let id = String::from_utf8(first.stdout).expect("utf-8");
    assert_eq!(id, String::from_utf8(second.stdout).expect("utf-8"));
    let hex = id
        .trim()
        .strip_prefix("node_id = \"")
        .and_then(|s| s.strip_suffix('"'))
        .expect("node_id = \"...\" line");
    assert_eq!(hex.len(), 64);
    assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
}

#[test]
fn config_check_names_file_line_and_key() {
    let _serial = twinfs_tests::serial();
    let node = Node::new(
        "[[volume.rule]]\nmatch = \"*.sif\"\nsync = \"sometimes\"\n",
        |_| {},
    );
    let out = node.twinfs(&["config", "check"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&node.config.display().to_string()), "{err}");
    assert!(err.contains(":12:"), "line 12 is the bad sync: {err}");
    assert!(err.contains("sync"), "{err}");
    // And the daemon refuses to start on it.
    let out = node.twinfs(&["mount"]);
    assert!(!out.status.success());
    assert!(!is_mounted(&node.volume));
}

#[test]
fn mounts_in_place_and_leaves_changes_behind() {
    let _serial = twinfs_tests::serial();
    let mut node = Node::new(CMM_RULES, fill_cmm);
    node.start(&[]);
    let vol = node.volume.clone();
    assert!(is_mounted(&vol));

    // What was there is visible through the mount.
    assert_eq!(
        fs::read_to_string(vol.join("hosts")).unwrap(),
        "10.0.0.1 cmm-a\n"
    );
    assert_eq!(fs::read(vol.join("fw.sif")).unwrap(), vec![7u8; 100_000]);
    assert_eq!(
        fs::read_link(vol.join("hosts.link")).unwrap(),
        Path::new("hosts")
    );
    assert!(vol.join("ssh/known_hosts").exists());

    // Change it through the mount with ordinary tools.
    fs::write(vol.join("hosts"), "10.0.0.1 cmm-a\n10.0.0.2 cmm-b\n").unwrap();
    fs::create_dir_all(vol.join("new/deeper")).unwrap();
    fs::write(vol.join("new/deeper/file"), "fresh").unwrap();
    fs::rename(vol.join("ssh/known_hosts"), vol.join("ssh/known_hosts.old")).unwrap();
    fs::remove_file(vol.join("fw.sif")).unwrap();
    fs::set_permissions(vol.join("hosts"), fs::Permissions::from_mode(0o640)).unwrap();
    let sed = std::process::Command::new("sed")
        .args(["-i", "s/cmm-b/cmm-c/"])
        .arg(vol.join("hosts"))
        .status()
        .unwrap();
    assert!(sed.success());

    let status = node.volume_status();
    assert_eq!(status["role"], "active");
    assert_eq!(status["passthrough"], true);
    assert!(
        status["changes"]["total"].as_u64().unwrap() >= 6,
        "{status}"
    );

    let exit = node.stop();
    assert!(
        exit.success(),
        "daemon exit {exit}; log:\n{}",
        node.log_text()
    );
    assert!(!is_mounted(&vol), "SIGTERM unmounts");

    // The plain directory now holds every change.
    assert_eq!(
        fs::read_to_string(vol.join("hosts")).unwrap(),
        "10.0.0.1 cmm-a\n10.0.0.2 cmm-c\n"
    );
    assert_eq!(
        fs::read_to_string(vol.join("new/deeper/file")).unwrap(),
        "fresh"
    );
    assert!(vol.join("ssh/known_hosts.old").exists());
    assert!(!vol.join("ssh/known_hosts").exists());
    assert!(!vol.join("fw.sif").exists());
    // sed -i replaced the file; the mode it kept must still be 0640.
    assert_eq!(
        fs::metadata(vol.join("hosts")).unwrap().mode() & 0o7777,
        0o640
    );
}

#[test]
fn kill_9_leaves_the_directory_accessible_and_intact() {
    let _serial = twinfs_tests::serial();
    let mut node = Node::new(CMM_RULES, fill_cmm);
    node.start(&[]);
    let vol = node.volume.clone();
    let mut f = fs::File::create(vol.join("written-before-crash")).unwrap();
    f.write_all(b"durable enough").unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert!(
        node.watchdog_pid().is_some(),
        "a watchdog runs with the mount"
    );
    node.kill9();

    // The daemon's watchdog notices it is gone, detaches the dead mount, says so in
    // the daemon's log and ends.
    assert!(!is_mounted(&vol), "the watchdog detached the dead mount");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while node.watchdog_pid().is_some() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(node.watchdog_pid(), None, "the watchdog ended");
    assert!(
        node.log_text().contains("its watchdog detached the mount"),
        "{}",
        node.log_text()
    );
    // Not "Transport endpoint is not connected": the plain files are there.
    assert_eq!(
        fs::read_to_string(vol.join("hosts")).unwrap(),
        "10.0.0.1 cmm-a\n"
    );
    assert_eq!(
        fs::read_to_string(vol.join("written-before-crash")).unwrap(),
        "durable enough"
    );

    // And the daemon mounts it again, replacing its stale control socket.
    node.start(&[]);
    assert_eq!(
        fs::read_to_string(vol.join("written-before-crash")).unwrap(),
        "durable enough"
    );
}

#[test]
fn temp_files_a_crash_left_are_removed_when_the_daemon_starts() {
    let _serial = twinfs_tests::serial();
    // As a standby killed between writing a temp file and renaming it leaves them.
    let mut node = Node::new(CMM_RULES, |dir| {
        fill_cmm(dir);
        fs::write(dir.join(".twinfs-tmp.00000000deadbeef"), vec![1u8; 1 << 20]).expect("temp");
        fs::write(dir.join("ssh/.twinfs-tmp.0000000000c0ffee"), b"half").expect("temp");
        fs::write(dir.join(".twinfs-keep"), b"not a temp").expect("reserved name");
    });
    node.start(&[]);
    node.stop();

    let vol = &node.volume;
    assert!(
        !vol.join(".twinfs-tmp.00000000deadbeef").exists(),
        "{}",
        node.log_text()
    );
    assert!(!vol.join("ssh/.twinfs-tmp.0000000000c0ffee").exists());
    assert!(vol.join(".twinfs-keep").exists(), "only temp names go");
    assert_eq!(
        fs::read_to_string(vol.join("ssh/known_hosts")).expect("read"),
        "cmm-b ssh-ed25519 AAAA\n"
    );
    let log = node.log_text();
    assert!(
        log.contains("removed a stale temp entry")
            && log.contains("ssh/.twinfs-tmp.0000000000c0ffee"),
        "{log}"
    );
}

#[test]
fn a_dead_mount_left_behind_is_detached_when_the_daemon_starts_again() {
    let _serial = twinfs_tests::serial();
    let mut node = Node::new(CMM_RULES, fill_cmm);
    node.start(&[]);
    let vol = node.volume.clone();
    fs::write(vol.join("written-before-crash"), "kept").unwrap();
    // The watchdog first, then the daemon: as a service manager's last SIGKILL to the
    // whole group would, leaving no one to detach the mount.
    let watchdog = node.watchdog_pid().expect("a watchdog runs with the mount");
    // SAFETY: sending a signal to a process this test's daemon started.
    assert_eq!(unsafe { libc::kill(watchdog, libc::SIGKILL) }, 0);
    node.kill9_only();
    std::thread::sleep(Duration::from_millis(200));
    assert!(is_mounted(&vol), "nothing detached the dead mount");
    let err = fs::read_dir(&vol).expect_err("a dead mount answers nothing");
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");

    node.start(&[]);
    assert!(
        node.log_text()
            .contains("a dead twinfs mount was left on the volume"),
        "{}",
        node.log_text()
    );
    assert_eq!(
        fs::read_to_string(vol.join("written-before-crash")).unwrap(),
        "kept"
    );
    assert_eq!(
        fs::read_to_string(vol.join("hosts")).unwrap(),
        "10.0.0.1 cmm-a\n"
    );
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let on_vol = mounts
        .lines()
        .filter(|l| l.split(' ').nth(1) == Some(&*vol.to_string_lossy()))
        .count();
    assert_eq!(on_vol, 1, "one live mount, the dead one gone:\n{mounts}");
}

/// A filesystem mounted at a path, detached (exactly it, whatever was mounted on top
/// since) when dropped.
struct OwnMount(fs::File);

impl OwnMount {
    fn tmpfs(dir: &Path) -> OwnMount {
        OwnMount::tmpfs_with(dir, "size=16m")
    }

    fn tmpfs_with(dir: &Path, options: &str) -> OwnMount {
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "twinfs-test"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount tmpfs on {}", dir.display());
        OwnMount(
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
                .open(dir)
                .expect("open the tmpfs root"),
        )
    }

    /// Whether `dir` leads to this filesystem (nothing mounted on top of it).
    fn is_on_top(&self, dir: &Path) -> bool {
        let here = fs::metadata(dir).expect("stat dir");
        let own = self.0.metadata().expect("stat the tmpfs root");
        (here.dev(), here.ino()) == (own.dev(), own.ino())
    }
}

impl Drop for OwnMount {
    fn drop(&mut self) {
        // Also a twinfs mount left on top of it by a test that failed.
        twinfs_tests::unmount_all_on(&self.0);
    }
}

/// A config flash mounted `nosuid,nodev,noexec`: the twinfs mount over it keeps those
/// (else a program or a set-user-ID binary on it would run through the mount).
#[test]
fn the_mount_keeps_nosuid_nodev_and_noexec_of_the_filesystem_it_covers() {
    let _serial = twinfs_tests::serial();
    let mut node = Node::new("", |_| {});
    let _own = OwnMount::tmpfs_with(&node.volume, "size=16m,nosuid,nodev,noexec");
    let script = node.volume.join("run.sh");
    fs::write(&script, "#!/bin/sh\necho ran\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    node.start(&[]);
    assert!(is_mounted(&node.volume));
    let ran = std::process::Command::new(&script).output();
    assert!(
        matches!(&ran, Err(e) if e.raw_os_error() == Some(libc::EACCES)),
        "{ran:?}"
    );
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.contains(" fuse.twinfs ") && l.contains(node.volume.to_str().unwrap()))
        .expect("the twinfs mount is listed");
    let options = line.split(' ').nth(5).unwrap_or_default();
    for kept in ["nosuid", "nodev", "noexec"] {
        assert!(options.split(',').any(|o| o == kept), "{kept}: {line}");
    }
    node.stop();
}

/// SIGHUP (`kill -HUP` out of habit, the end of a terminal session) does not stop the
/// daemon: it would end with nothing shipped or unmounted.
#[test]
fn sighup_does_not_stop_the_daemon() {
    let _serial = twinfs_tests::serial();
    let mut node = Node::new("", |d| fs::write(d.join("f"), "x").unwrap());
    node.start(&[]);
    node.signal(libc::SIGHUP);
    assert!(
        twinfs_tests::daemon::wait_until(Duration::from_secs(10), || node
            .log_text()
            .contains("SIGHUP ignored")),
        "{}",
        node.log_text()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        node.twinfs(&["status"]).status.success(),
        "the daemon answers"
    );
    assert!(is_mounted(&node.volume));
    fs::write(node.volume.join("g"), "still served").unwrap();
    let stopped = node.stop();
    assert!(stopped.success(), "{stopped:?}");
}

#[test]
fn a_volume_that_is_a_mount_point_keeps_its_own_filesystem() {
    let _serial = twinfs_tests::serial();
    // A switch's config flash: the volume directory is a mount point itself. Neither
    // a stop nor a crash of the daemon may unmount it.
    let mut node = Node::new("", |_| {});
    let own = OwnMount::tmpfs(&node.volume);
    let vol = node.volume.clone();
    fs::write(vol.join("on-flash"), "kept").unwrap();

    node.start(&[]);
    fs::write(vol.join("written-through-twinfs"), "one").unwrap();
    node.stop();
    assert!(!is_mounted(&vol));
    assert!(own.is_on_top(&vol), "a stop left the flash mounted");
    assert_eq!(
        fs::read_to_string(vol.join("written-through-twinfs")).unwrap(),
        "one"
    );

    node.start(&[]);
    fs::write(vol.join("written-before-crash"), "two").unwrap();
    node.kill9();
    assert!(!is_mounted(&vol), "the watchdog detached the dead mount");
    assert!(own.is_on_top(&vol), "a crash left the flash mounted");
    assert_eq!(fs::read_to_string(vol.join("on-flash")).unwrap(), "kept");
    assert_eq!(
        fs::read_to_string(vol.join("written-before-crash")).unwrap(),
        "two"
    );

    // Someone unmounts the volume's twinfs mount while the daemon runs: its stop
    // must not unmount what the path leads to then, the flash.
    node.start(&[]);
    let status = std::process::Command::new("umount")
        .arg(&vol)
        .status()
        .expect("run umount");
    assert!(status.success());
    assert!(own.is_on_top(&vol));
    assert!(node.stop().success());
    assert!(own.is_on_top(&vol), "the stop unmounted the flash");
    assert!(node
        .log_text()
        .contains("the volume's mount is no longer what its path leads to"));
    assert_eq!(fs::read_to_string(vol.join("on-flash")).unwrap(), "kept");
    // Unmounted before the node's scratch directory is removed.
    drop(own);
}

/// Runs `twinfs mount` on `node`'s config in the foreground, as a second start would,
/// expecting it to refuse: its stderr and whether it succeeded. One that starts
/// after all is stopped (SIGTERM) after 20 s, and counts as a failure to refuse.
fn mount_refused(node: &Node) -> (bool, String) {
    let mut child = std::process::Command::new(twinfs_bin())
        .arg("--config")
        .arg(&node.config)
        .arg("mount")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run twinfs mount");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
            return (false, "it started instead of refusing".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("its output");
    (
        !out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A second `twinfs mount` with the state directory of one that runs (a manual start
/// beside systemd's) is refused before it touches anything: the first goes on
/// serving, its socket and mount in place.
#[test]
fn a_second_daemon_on_the_same_config_is_refused() {
    let _serial = twinfs_tests::serial();
    let mut node = Node::new("", |_| {});
    node.start(&[]);
    let pid = node.pid().expect("running");
    let (refused, err) = mount_refused(&node);
    assert!(refused, "{err}");
    assert!(
        err.contains(&format!(
            "another twinfs mount (pid {pid}) runs with the state directory"
        )) && err.contains("daemon.lock"),
        "{err}"
    );
    assert!(is_mounted(&node.volume), "the first daemon keeps its mount");
    assert_eq!(
        twinfs_tests::mounts_below(&node.volume).len(),
        1,
        "mounted once, not twice"
    );
    assert!(
        node.twinfs(&["status"]).status.success(),
        "the first still answers"
    );
}

#[test]
fn a_peer_with_this_nodes_own_id_is_refused() {
    let _serial = twinfs_tests::serial();
    let node = Node::new("", |_| {});
    let out = node.twinfs(&["init"]);
    assert!(out.status.success(), "{out:?}");
    let own = String::from_utf8_lossy(&out.stdout).into_owned();
    // The node under another name: config check cannot know the id is its own.
    let text = fs::read_to_string(&node.config).expect("read config");
    let text = text.replacen(
        "\n[[volume]]",
        &format!(
            "\n[[peer]]\nname = \"me-again\"\naddress = \"127.0.0.1:7790\"\n{own}\n[[volume]]"
        ),
        1,
    );
    fs::write(&node.config, text).expect("write config");
    let check = node.twinfs(&["config", "check"]);
    assert!(check.status.success(), "{check:?}");

    let mut daemon = std::process::Command::new(twinfs_bin())
        .arg("--config")
        .arg(&node.config)
        .arg("mount")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&node.log).expect("create log"))
        .spawn()
        .expect("spawn twinfs mount");
    // A guard against a hang, not a timing assertion: the daemon must exit by itself.
    let exited = twinfs_tests::daemon::wait_until(Duration::from_secs(60), || {
        matches!(daemon.try_wait(), Ok(Some(_)))
    });
    if !exited {
        let _ = daemon.kill();
        let _ = daemon.wait();
        panic!("the daemon started with itself as a peer");
    }
    let status = daemon.wait().expect("wait for the daemon");
    assert!(!status.success());
    let err = node.log_text();
    assert!(err.contains("\"me-again\""), "names the peer: {err}");
    assert!(err.contains("own node_id"), "{err}");
    assert!(!is_mounted(&node.volume));
}

#[test]
fn role_waits_for_a_hook_as_long_as_its_hook_timeout() {
    let _serial = twinfs_tests::serial();
    // Longer than the 30 s the command used to wait, well within hook_timeout.
    let mut node = Node::new(
        "on_demote = \"sleep 35\"\nhook_timeout = \"2min\"\n",
        |_| {},
    );
    node.start(&[]);
    let out = node.twinfs(&["role", "vol", "standby"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("cannot reach"), "{err}");
    assert_eq!(node.volume_status()["role"], "standby");
}

#[test]
fn sync_takes_paths_without_the_volume_on_a_node_with_one() {
    let _serial = twinfs_tests::serial();
    let mut node = Node::new("", fill_cmm);
    node.start(&[]);
    let out = node.twinfs(&["sync", "hosts", "ssh/known_hosts"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("no volume named"), "{err}");
    // Taken as paths of the volume `vol`; with no standby there is nobody to ship to.
    assert!(err.contains("volume vol: no standby is connected"), "{err}");
}

#[test]
fn status_counts_changes_by_policy() {
    let _serial = twinfs_tests::serial();
    let mut node = Node::new(CMM_RULES, fill_cmm);
    node.start(&[]);
    let vol = node.volume.clone();
    // One close after three writes: one change.
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(vol.join("hosts"))
        .unwrap();
    for line in ["a\n", "b\n", "c\n"] {
        f.write_all(line.as_bytes()).unwrap();
    }
    drop(f);
    fs::write(vol.join("fw.sif"), b"new firmware").unwrap(); // once (open with O_TRUNC + close)
    fs::create_dir(vol.join("local")).unwrap(); // always: "local/**" does not match "local"
    fs::write(vol.join("local/cache"), b"x").unwrap(); // never: create + close
    fs::write(vol.join("motd"), b"hi").unwrap(); // always: create + close
    let c = node.volume_status()["changes"].clone();
    assert_eq!(c["interval"], 1, "{c}");
    assert_eq!(c["once"], 1, "{c}");
    assert_eq!(c["never"], 2, "{c}");
    assert_eq!(c["always"], 3, "{c}");
    assert_eq!(c["total"], 7, "{c}");
}

fn errno_of<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

fn c(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("no NUL")
}

fn mkfifo(path: &Path) -> std::io::Result<()> {
    // SAFETY: valid C string.
    if unsafe { libc::mkfifo(c(path).as_ptr(), 0o644) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn setxattr(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let n = CString::new(name).expect("no NUL");
    // SAFETY: valid strings and buffer.
    let r = unsafe {
        libc::setxattr(
            c(path).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn removexattr(path: &Path, name: &str) -> std::io::Result<()> {
    let n = CString::new(name).expect("no NUL");
    // SAFETY: valid strings.
    if unsafe { libc::removexattr(c(path).as_ptr(), n.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn getxattr(path: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let n = CString::new(name).expect("no NUL");
    let mut buf = vec![0u8; 256];
    // SAFETY: valid strings and buffer.
    let r = unsafe {
        libc::getxattr(
            c(path).as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

fn utimes(path: &Path, secs: i64) -> std::io::Result<()> {
    let t = libc::timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    // SAFETY: valid string and two timespecs.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c(path).as_ptr(), [t, t].as_ptr(), 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn standby_refuses_every_write_and_keeps_reads() {
    let _serial = twinfs_tests::serial();
    let mut node = Node::new(CMM_RULES, |d| {
        fill_cmm(d);
        fs::create_dir(d.join("emptydir")).expect("emptydir");
    });
    node.start(&[]);
    let vol = node.volume.clone();
    setxattr(&vol.join("hosts"), "user.origin", b"a").unwrap();

    // A reader that opened before the switch.
    let mut reader = fs::File::open(vol.join("fw.sif")).unwrap();
    let mut head = [0u8; 10];
    reader.read_exact(&mut head).unwrap();

    let out = node.twinfs(&["role", "vol", "standby"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(node.volume_status()["role"], "standby");

    let erofs = Some(libc::EROFS);
    let hosts = vol.join("hosts");
    let write_ops: Vec<(&str, Option<i32>)> = vec![
        (
            "open O_WRONLY",
            errno_of(fs::OpenOptions::new().write(true).open(&hosts)),
        ),
        (
            "open O_RDWR",
            errno_of(fs::OpenOptions::new().read(true).write(true).open(&hosts)),
        ),
        (
            "open O_RDONLY|O_TRUNC",
            errno_of(
                fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_TRUNC)
                    .open(&hosts),
            ),
        ),
        (
            "open O_APPEND",
            errno_of(fs::OpenOptions::new().append(true).open(&hosts)),
        ),
        ("create", errno_of(fs::File::create(vol.join("new-file")))),
        ("mkdir", errno_of(fs::create_dir(vol.join("new-dir")))),
        ("mkfifo", errno_of(mkfifo(&vol.join("new-fifo")))),
        ("unlink", errno_of(fs::remove_file(&hosts))),
        ("rmdir", errno_of(fs::remove_dir(vol.join("emptydir")))),
        ("rename", errno_of(fs::rename(&hosts, vol.join("hosts2")))),
        (
            "chmod",
            errno_of(fs::set_permissions(
                &hosts,
                fs::Permissions::from_mode(0o600),
            )),
        ),
        (
            "chown",
            errno_of(std::os::unix::fs::chown(&hosts, Some(65534), Some(65534))),
        ),
        (
            "truncate",
            errno_of(
                fs::OpenOptions::new()
                    .write(true)
                    .open(&hosts)
                    .and_then(|f| f.set_len(0)),
            ),
        ),
        ("utimens (touch)", errno_of(utimes(&hosts, 1_000_000))),
        ("setxattr", errno_of(setxattr(&hosts, "user.x", b"1"))),
        ("removexattr", errno_of(removexattr(&hosts, "user.origin"))),
        (
            "link",
            errno_of(fs::hard_link(&hosts, vol.join("hosts.hard"))),
        ),
        (
            "symlink",
            errno_of(std::os::unix::fs::symlink(
                "hosts",
                vol.join("another.link"),
            )),
        ),
    ];
    for (op, errno) in &write_ops {
        assert_eq!(*errno, erofs, "{op} on a standby must fail with EROFS");
    }
    // `touch` from the command line too.
    let touch = std::process::Command::new("touch")
        .arg(&hosts)
        .output()
        .unwrap();
    assert!(!touch.status.success());
    assert!(String::from_utf8_lossy(&touch.stderr).contains("Read-only file system"));

    // Reads keep working.
    assert_eq!(fs::read_to_string(&hosts).unwrap(), "10.0.0.1 cmm-a\n");
    assert!(fs::read_dir(&vol).unwrap().count() >= 5);
    assert_eq!(
        fs::read_link(vol.join("hosts.link")).unwrap(),
        Path::new("hosts")
    );
    assert_eq!(getxattr(&hosts, "user.origin").unwrap(), b"a");
    assert!(fs::metadata(vol.join("ssh/known_hosts")).is_ok());
    // The reader opened before the switch reads on.
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert_eq!(rest.len(), 100_000 - 10);

    // Nothing was changed, nothing was counted while standby.
    assert_eq!(
        node.volume_status()["changes"]["total"],
        1,
        "only the setxattr before"
    );

    let out = node.twinfs(&["role", "vol", "active"]);
    assert!(out.status.success(), "{out:?}");
    fs::write(vol.join("new-file"), "after").unwrap();
    fs::create_dir(vol.join("new-dir")).unwrap();
    fs::rename(&hosts, vol.join("hosts2")).unwrap();
    assert_eq!(fs::read_to_string(vol.join("new-file")).unwrap(), "after");

    // The role survives a restart of the daemon (persisted in the state dir).
    node.twinfs(&["role", "vol", "standby"]);
    assert!(node.stop().success());
    node.start(&[]);
    assert_eq!(node.volume_status()["role"], "standby");
    assert_eq!(errno_of(fs::File::create(vol.join("x"))), erofs);
}

#[test]
fn role_of_an_unknown_volume_is_an_error() {
    let _serial = twinfs_tests::serial();
    let mut node = Node::new("", |_| {});
    node.start(&[]);
    let out = node.twinfs(&["role", "nope", "standby"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no volume named \"nope\""));
}

#[test]
fn status_without_a_daemon_says_so() {
    let _serial = twinfs_tests::serial();
    let node = Node::new("", |_| {});
    let out = node.twinfs(&["status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no twinfs daemon is running"));
}

/// A demotion whose new role cannot be persisted (a full disk under the state
/// directory; here the role file is immutable) fails, says so, and leaves the volume
/// active and writable: its writes were held back for good.
#[test]
fn a_demotion_that_cannot_be_persisted_leaves_the_volume_writable() {
    let _serial = twinfs_tests::serial();
    let mut node = Node::new("", |_| {});
    node.start(&[]);
    let role_file = node.state_dir.join("volumes/vol.json");
    assert!(
        role_file.exists(),
        "the role file is made at the first start"
    );
    // Dropped before the node, so that the node's directory can be removed.
    let _flag = twinfs_tests::Immutable::set(&role_file);
    let out = node.twinfs(&["demote"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("volume vol: not demoted: cannot persist the demotion")
            && said.contains("it stays active and takes writes again"),
        "{said}"
    );
    assert_eq!(node.volume_status()["role"], "active");
    fs::write(node.volume.join("after"), "x").expect("writable again");
}

/// A user who may not use the control socket (it is root's) is told so, not that no
/// daemon runs.
#[test]
fn a_user_other_than_root_is_told_the_commands_need_root() {
    let _serial = twinfs_tests::serial();
    let mut node = Node::new("", |_| {});
    node.start(&[]);
    // The same node's settings, in a file that user may read.
    let open = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(open.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let config = open.path().join("twinfs.toml");
    fs::write(
        &config,
        format!(
            "[node]\nname = \"test-node\"\nlisten = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n",
            node.state_dir.display()
        ),
    )
    .expect("write config");
    fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).expect("chmod");
    // A copy of the binary that user may run (a clone under /root is not reachable).
    let bin = open.path().join("twinfs");
    fs::copy(twinfs_bin(), &bin).expect("copy the binary");
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .arg("--config")
        .arg(&config)
        .arg("status")
        .output()
        .expect("run setpriv");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("twinfs commands need root"), "{said}");
    assert!(!said.contains("no twinfs daemon is running"), "{said}");
}

#[test]
fn without_passthrough_the_fallback_serves_io() {
    let _serial = twinfs_tests::serial();
    let mut node = Node::new(CMM_RULES, fill_cmm);
    node.start(&["--no-passthrough"]);
    assert_eq!(node.volume_status()["passthrough"], false);
    let vol = node.volume.clone();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(vol.join("big"), &data).unwrap();
    assert_eq!(fs::read(vol.join("big")).unwrap(), data);
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(vol.join("hosts"))
        .unwrap();
    f.write_all(b"appended\n").unwrap();
    drop(f);
    assert!(fs::read_to_string(vol.join("hosts"))
        .unwrap()
        .ends_with("appended\n"));
}

/// `twinfs status | true`: the command ends quietly when its reader goes away
/// early, with no panic on stderr (it used to panic in `println!`).
#[test]
fn status_into_a_pipe_closed_early_ends_quietly() {
    let _serial = twinfs_tests::serial();
    let mut node = Node::new(CMM_RULES, fill_cmm);
    node.start(&[]);
    let script = format!(
        "{} --config {} status --json | true",
        twinfs_bin().display(),
        node.config.display()
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .expect("sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}

/// An error says its cause once: the file's (or socket's) OS error was printed a
/// second time, after the message that already held it.
#[test]
fn an_error_says_its_cause_once() {
    let _serial = twinfs_tests::serial();
    let missing = "/nonexistent-twinfs-dir/twinfs.toml";
    let out = std::process::Command::new(twinfs_bin())
        .args(["--config", missing, "status"])
        .output()
        .expect("run twinfs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(
        err.trim_end(),
        format!("twinfs: {missing}: cannot read: No such file or directory (os error 2)")
    );
    // No daemon: the socket's error, once.
    let node = Node::new("", |_| {});
    let out = node.twinfs(&["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no twinfs daemon is running"), "{err}");
    assert_eq!(err.matches("(os error 2)").count(), 1, "{err}");
}

/// `twinfs status VOLUME` shows that volume only; a name that is no volume is an error
/// that lists them.
#[test]
fn status_of_one_volume() {
    let _serial = twinfs_tests::serial();
    let mut node = Node::new("", fill_cmm);
    let other = node.dir.path().join("other");
    fs::create_dir(&other).expect("mkdir");
    let mut config = fs::read_to_string(&node.config).expect("config");
    config.push_str(&format!(
        "[[volume]]\nname = \"other\"\npath = \"{}\"\n",
        other.display()
    ));
    fs::write(&node.config, config).expect("config");
    node.start(&[]);

    let out = node.twinfs(&["status", "other"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.lines().any(|l| l.starts_with("other ")), "{table}");
    assert!(!table.lines().any(|l| l.starts_with("vol ")), "{table}");

    let out = node.twinfs(&["status", "--json", "other"]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let names: Vec<&str> = json["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, ["other"]);

    let out = node.twinfs(&["status", "nope"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("no volume named \"nope\" (volumes: vol, other)"),
        "{err}"
    );
    // Both volumes unmounted by the daemon (the guard knows of the first only).
    assert!(node.stop().success());
    assert!(!is_mounted(&other));
}

/// A datagram the daemon sent to `NOTIFY_SOCKET`: its text, when it came, and
/// whether the volume was mounted and took writes just after it came.
#[derive(Clone, Debug)]
struct Notified {
    text: String,
    at: std::time::Instant,
    mounted: bool,
    writable: bool,
}

/// Receives what the daemon sends to `socket` until `until` is in a datagram (or
/// 60 s passed), asking `twinfs status` of the node with config `config` at each;
/// `handled` hears of each once it has.
fn notifications(
    socket: std::os::unix::net::UnixDatagram,
    config: std::path::PathBuf,
    until: &'static str,
    handled: std::sync::mpsc::Sender<()>,
) -> std::thread::JoinHandle<Vec<Notified>> {
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            let at = std::time::Instant::now();
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let out = std::process::Command::new(twinfs_bin())
                .arg("--config")
                .arg(&config)
                .args(["status", "--json"])
                .output()
                .expect("run twinfs status");
            let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let v = &status["volumes"][0];
            let done = text.contains(until);
            got.push(Notified {
                text,
                at,
                mounted: v["mounted"] == true,
                writable: v["writable"] == true,
            });
            let _ = handled.send(());
            if done {
                break;
            }
        }
        got
    })
}

/// Under systemd (`Type=notify`, contrib/systemd/twinfs.service) the daemon says
/// READY=1 only once its volume is mounted and takes writes: an active restarted
/// with a standby configured first waits up to 5 s for it (here it never comes), and
/// a service ordered after twinfs must not meet a read-only volume then. STOPPING=1
/// comes at SIGTERM.
#[test]
fn the_daemon_tells_systemd_it_is_ready_once_it_takes_writes_and_when_it_stops() {
    let _serial = twinfs_tests::serial();
    let mut c = twinfs_tests::daemon::Cluster::new(2, "", fill_cmm);
    let socket_path = c.nodes[0].dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind");
    let (handled, ready_handled) = std::sync::mpsc::channel();
    let got = notifications(socket, c.nodes[0].config.clone(), "STOPPING=1", handled);
    c.nodes[0].env.push((
        "NOTIFY_SOCKET".into(),
        socket_path.to_string_lossy().into_owned(),
    ));
    let started = std::time::Instant::now();
    // Only node 0: its standby never answers.
    c.nodes[0].start(&[]);
    // (The daemon is not stopped before the receiver has asked its status.)
    let _ = ready_handled.recv_timeout(Duration::from_secs(60));
    let stopping = std::time::Instant::now();
    assert!(c.nodes[0].stop().success());
    let got = got.join().expect("receiver");

    assert_eq!(got.len(), 2, "READY=1, then STOPPING=1: {got:?}");
    let (ready, stop) = (&got[0], &got[1]);
    assert!(ready.text.contains("READY=1"), "{got:?}");
    assert!(ready.text.contains("STATUS=mounted: vol"), "{got:?}");
    assert!(
        ready.mounted && ready.writable,
        "ready before it takes writes: {got:?}"
    );
    assert!(
        ready.at - started >= Duration::from_secs(4),
        "ready after {:?}, before the 5 s wait for a standby ended",
        ready.at - started
    );
    assert!(stop.text.contains("STOPPING=1"), "{got:?}");
    assert!(stop.at >= stopping, "{got:?}");
}

/// The same with an abstract socket (`@name`) and a volume without peers: ready,
/// mounted and taking writes.
#[test]
fn the_daemon_tells_an_abstract_notify_socket_it_is_ready() {
    let _serial = twinfs_tests::serial();
    use std::os::linux::net::SocketAddrExt;
    let mut node = Node::new(CMM_RULES, fill_cmm);
    let name = format!("twinfs-test-notify-{}", std::process::id());
    let addr =
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
    let socket = std::os::unix::net::UnixDatagram::bind_addr(&addr).expect("bind");
    let (handled, _) = std::sync::mpsc::channel();
    let got = notifications(socket, node.config.clone(), "READY=1", handled);
    node.env.push(("NOTIFY_SOCKET".into(), format!("@{name}")));
    node.start(&[]);
    let got = got.join().expect("receiver");
    let ready = got.last().expect("a datagram");
    assert!(ready.text.contains("READY=1"), "{got:?}");
    assert!(ready.mounted && ready.writable, "{got:?}");
    assert!(node.stop().success());
}

/// contrib/systemd/twinfs.service is a valid unit, as `systemd-analyze verify` reads
/// it (with the binary built here in place of /usr/local/sbin/twinfs): no error and
/// no warning.
#[test]
fn the_systemd_unit_verifies() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd/twinfs.service");
    let text = fs::read_to_string(&unit).expect("read the unit");
    assert!(
        text.contains("Type=notify") && text.contains("ExecStart=/usr/local/sbin/twinfs mount")
    );
    let dir = tempfile::tempdir().expect("scratch");
    let copy = dir.path().join("twinfs.service");
    let bin = twinfs_bin();
    fs::write(
        &copy,
        text.replace("/usr/local/sbin/twinfs", &bin.to_string_lossy()),
    )
    .expect("write the copy");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("run systemd-analyze (scripts/test installs systemd)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

/// A `control_socket` that names something else than a socket is left alone, and the
/// daemon does not start.
#[test]
fn a_control_socket_path_that_is_not_a_socket_is_left_alone() {
    let _serial = twinfs_tests::serial();
    let node = Node::new("", |_| {});
    let other = node.dir.path().join("not-a-socket");
    fs::write(&other, "keep me").unwrap();
    let text = fs::read_to_string(&node.config).unwrap().replacen(
        "[node]\n",
        &format!("[node]\ncontrol_socket = \"{}\"\n", other.display()),
        1,
    );
    fs::write(&node.config, text).unwrap();
    let (refused, said) = mount_refused(&node);
    assert!(refused, "{said}");
    assert!(said.contains("exists and is not a socket"), "{said}");
    assert_eq!(fs::read_to_string(&other).unwrap(), "keep me");
    assert!(!is_mounted(&node.volume));
}

/// `twinfs role standby` says what becomes of files opened for writing before it: on
/// a volume with peers (no passthrough) their next write gets EROFS.
#[test]
fn role_standby_says_open_writers_get_erofs_without_passthrough() {
    let _serial = twinfs_tests::serial();
    let mut c = twinfs_tests::daemon::Cluster::new(2, "", fill_cmm);
    // Only node 0: it takes writes once its wait for the standby is over.
    c.nodes[0].start(&[]);
    let mut writer = fs::OpenOptions::new()
        .append(true)
        .open(c.active().join("hosts"))
        .expect("open for writing");
    let out = c.nodes[0].twinfs(&["role", "vol", "standby"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        said.contains(
            "1 file(s) opened for writing before the switch get EROFS on their next write"
        ),
        "{said}"
    );
    let err = writer
        .write_all(b"after the switch\n")
        .and_then(|()| writer.flush());
    assert_eq!(err.err().and_then(|e| e.raw_os_error()), Some(libc::EROFS));
}

/// A volume whose configured path goes through a symlink: the kernel lists its mount
/// with the symlink resolved, and status still says it is mounted (`Node::start` waits
/// for that).
#[test]
fn a_volume_path_through_a_symlink_shows_as_mounted() {
    let _serial = twinfs_tests::serial();
    let mut node = Node::new("", fill_cmm);
    let link = node.dir.path().join("etc-cmm");
    std::os::unix::fs::symlink(&node.volume, &link).expect("symlink");
    let text = fs::read_to_string(&node.config).unwrap().replace(
        &format!("path = \"{}\"", node.volume.display()),
        &format!("path = \"{}\"", link.display()),
    );
    assert!(text.contains("etc-cmm"), "{text}");
    fs::write(&node.config, text).unwrap();
    node.start(&[]);
    assert_eq!(node.volume_status()["mounted"], true);
    assert!(node.status_text().contains("etc-cmm"));
    assert!(node.stop().success());
}
