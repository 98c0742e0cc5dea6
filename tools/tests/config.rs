//! The configuration file: a full valid file, the defaults, and one test per
//! kind of error, each checking that the message points at file, line and key.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;
use twinfs_replicator::policy::{Direction, Policy, Priority, SyncMode};
use twinfs_tools::config::{Config, ConfigError, Durability, Role};
use twinfs_tools::identity::NodeId;

/// A directory with a volume directory `vol` in it, where the configuration
/// file is written; `{VOL}` in the text stands for the volume's path.
struct Setup {
    dir: TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("vol")).expect("mkdir vol");
        fs::create_dir(dir.path().join("vol2")).expect("mkdir vol2");
        Setup { dir }
    }

    fn volume(&self) -> PathBuf {
        self.dir.path().join("vol")
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("twinfs.toml")
    }

    fn load(&self, text: &str) -> Result<Config, ConfigError> {
        let text = text
            .replace("{VOL}", &self.volume().display().to_string())
            .replace(
                "{VOL2}",
                &self.dir.path().join("vol2").display().to_string(),
            );
        fs::write(self.file(), text).expect("write config");
        Config::load(&self.file())
    }

    /// Loads `text`, which must fail, and checks that the message reads
    /// `<file>:<line>: <key>: ...` and mentions `what`.
    fn assert_error(&self, text: &str, line: usize, key: &str, what: &str) -> ConfigError {
        let err = match self.load(text) {
            Ok(config) => panic!("expected an error, got {config:?}"),
            Err(err) => err,
        };
        let message = err.to_string();
        let prefix = format!("{}:{line}: {key}: ", self.file().display());
        assert!(
            message.starts_with(&prefix),
            "{message:?} should start with {prefix:?}"
        );
        assert!(
            message.contains(what),
            "{message:?} should mention {what:?}"
        );
        err
    }
}

const ID_B: &str = "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89";
const ID_C: &str = "  0000000000000000000000000000000000000000000000000000000000000001 ";

fn minimal_volume() -> String {
    "[[volume]]\nname = \"cmm\"\npath = \"{VOL}\"\n".to_owned()
}

#[test]
fn a_full_file() {
    let setup = Setup::new();
    let text = format!(
        r#"# twinfs test configuration
[node]
name = "cmm-a"
listen = "127.0.0.1:7790"
state_dir = "/var/lib/twinfs-test"
control_socket = "/run/twinfs.sock"

[[peer]]
name = "cmm-b"
address = "127.0.0.2:7790"
node_id = "{ID_B}"

[[peer]]
name = "cmm-c"
address = "cmm-c.example:7791"
node_id = "{ID_C}"

[[volume]]
name = "cmm"
path = "{{VOL}}"
initial_role = "standby"
durability = "sync"
sync_timeout = "2s"

[[volume.rule]]
match = "*.sif"
sync = "once"
priority = 1

[[volume.rule]]
match = "fw/*.bin"
sync = "interval"
interval = "1h 30m"

[[volume.rule]]
match = "local"
sync = "never"
priority = 2
durability = "async"

[[volume]]
name = "second.vol_2"
path = "{{VOL2}}"
"#
    );
    let config = setup.load(&text).expect("valid");
    assert_eq!(config.source, setup.file());

    assert_eq!(config.node.name, "cmm-a");
    assert_eq!(
        config.node.listen,
        "127.0.0.1:7790".parse::<SocketAddr>().expect("addr")
    );
    assert_eq!(config.node.state_dir, Path::new("/var/lib/twinfs-test"));
    assert_eq!(config.node.control_socket, Path::new("/run/twinfs.sock"));

    assert_eq!(config.peers.len(), 2);
    assert_eq!(config.peers[0].name, "cmm-b");
    assert_eq!(config.peers[0].address, "127.0.0.2:7790");
    assert_eq!(config.peers[0].node_id, ID_B.parse::<NodeId>().expect("id"));
    assert_eq!(
        config.peers[0].node_id.to_string(),
        ID_B.replace(':', "").to_lowercase()
    );
    assert_eq!(config.peers[1].name, "cmm-c");
    assert_eq!(config.peers[1].address, "cmm-c.example:7791");
    assert_eq!(config.peers[1].node_id.as_bytes()[31], 1);

    assert_eq!(config.volumes.len(), 2);
    let cmm = &config.volumes[0];
    assert_eq!(cmm.name, "cmm");
    assert_eq!(cmm.path, setup.volume());
    assert_eq!(cmm.initial_role, Role::Standby);
    assert_eq!(cmm.durability, Durability::Sync);
    assert_eq!(cmm.sync_timeout, Duration::from_secs(2));
    let rules = cmm.policies.rules();
    assert_eq!(rules.len(), 3);
    assert_eq!(rules[0].pattern(), "*.sif");
    assert_eq!(
        rules[0].policy(),
        Policy {
            sync: SyncMode::Once,
            priority: Priority::MUST_SYNC,
            durability: None,
            ..Policy::DEFAULT
        }
    );
    assert_eq!(rules[1].pattern(), "fw/*.bin");
    assert_eq!(
        rules[1].policy(),
        Policy {
            sync: SyncMode::Interval(Duration::from_secs(90 * 60)),
            priority: Priority::NORMAL,
            durability: None,
            ..Policy::DEFAULT
        }
    );
    assert_eq!(rules[2].policy().sync, SyncMode::Never);
    assert_eq!(rules[2].policy().durability, Some(Durability::Async));
    assert_eq!(
        cmm.policies.resolve(Path::new("local/x/a.sif")).sync,
        SyncMode::Once,
        "rules keep their order"
    );

    let second = &config.volumes[1];
    assert_eq!(second.name, "second.vol_2");
    assert_eq!(second.initial_role, Role::Active);
    assert_eq!(second.durability, Durability::Async);
    assert_eq!(second.sync_timeout, Duration::from_secs(10));
    assert!(second.policies.rules().is_empty());
}

#[test]
fn defaults_without_a_node_table() {
    let setup = Setup::new();
    let config = setup.load(&minimal_volume()).expect("valid");
    assert!(!config.node.name.is_empty(), "the hostname");
    assert_eq!(
        config.node.listen,
        "0.0.0.0:7790".parse::<SocketAddr>().expect("addr")
    );
    assert_eq!(config.node.state_dir, Path::new("/var/lib/twinfs"));
    assert_eq!(
        config.node.control_socket,
        Path::new("/var/lib/twinfs/control.sock")
    );
    assert!(config.peers.is_empty());
    assert_eq!(config.volumes.len(), 1);
    assert_eq!(
        config.volumes[0].policies.resolve(Path::new("a")),
        Policy::DEFAULT
    );
}

/// A control socket's path longer than a Unix socket's can be failed only when the
/// daemon bound it; it is refused with the key that makes it.
#[test]
fn a_control_socket_path_too_long_for_a_unix_socket() {
    let setup = Setup::new();
    let long = format!("/srv/{}", "d".repeat(110));
    setup.assert_error(
        &format!("[node]\nname = \"a\"\nstate_dir = \"{long}\"\n"),
        3,
        "node.state_dir",
        "bytes long; a Unix socket's path can be at most 107: set node.control_socket",
    );
    // A shorter socket of its own is fine.
    let text = format!(
        "[node]\nname = \"a\"\nstate_dir = \"{long}\"\ncontrol_socket = \"/run/tw.sock\"\n"
    );
    setup.load(&text).expect("a short socket");
    setup.assert_error(
        &format!("[node]\nname = \"a\"\ncontrol_socket = \"{long}/s\"\n"),
        3,
        "node.control_socket",
        "can be at most 107",
    );
    // 107 bytes is still fine.
    let fits = format!("/{}", "s".repeat(106));
    setup
        .load(&format!(
            "[node]\nname = \"a\"\ncontrol_socket = \"{fits}\"\n"
        ))
        .expect("107 bytes");
}

#[test]
fn control_socket_follows_state_dir() {
    let setup = Setup::new();
    let config = setup
        .load("[node]\nname = \"a\"\nstate_dir = \"/srv/tw\"\n")
        .expect("valid");
    assert_eq!(
        config.node.control_socket,
        Path::new("/srv/tw/control.sock")
    );
    assert!(config.volumes.is_empty());
}

#[test]
fn an_unknown_key() {
    let setup = Setup::new();
    let text = format!("{}colour = \"blue\"\n", minimal_volume());
    setup.assert_error(&text, 4, "volume[0].colour", "unknown field `colour`");
    setup.assert_error("[nod]\nname = \"a\"\n", 1, "nod", "unknown field `nod`");
    setup.assert_error("[node]\n\nnmae = \"a\"\n", 3, "node.nmae", "unknown field");
    let text = format!(
        "{}\n[[volume.rule]]\nmatch = \"a\"\nsync = \"once\"\nprio = 1\n",
        minimal_volume()
    );
    setup.assert_error(&text, 8, "volume[0].rule[0].prio", "unknown field");
}

#[test]
fn a_missing_key() {
    let setup = Setup::new();
    setup.assert_error(
        "[[volume]]\nname = \"cmm\"\n",
        1,
        "volume[0].path",
        "missing field `path`",
    );
}

#[test]
fn a_bad_duration() {
    let setup = Setup::new();
    let text = format!(
        "{}\n[[volume.rule]]\nmatch = \"a\"\nsync = \"once\"\n\n[[volume.rule]]\nmatch = \"b\"\nsync = \"interval\"\ninterval = \"1x\"\n",
        minimal_volume()
    );
    setup.assert_error(
        &text,
        12,
        "volume[0].rule[1].interval",
        "\"1x\" is not a duration (expected e.g. \"30s\", \"1h\")",
    );
    let text = format!("{}sync_timeout = \"soon\"\n", minimal_volume());
    setup.assert_error(
        &text,
        4,
        "volume[0].sync_timeout",
        "\"soon\" is not a duration",
    );
    let text = format!("{}sync_timeout = \"0s\"\n", minimal_volume());
    setup.assert_error(&text, 4, "volume[0].sync_timeout", "longer than zero");
}

#[test]
fn a_duration_too_long() {
    let setup = Setup::new();
    for (key, most) in [
        ("sync_timeout", "1h"),
        ("hook_timeout", "1day"),
        ("peer_timeout", "1day"),
        ("health_interval", "1day"),
    ] {
        // Long enough to overflow the clock when added to it.
        let text = format!("{}{key} = \"300000000000years\"\n", minimal_volume());
        let what = format!("\"300000000000years\" is too long: at most {most}");
        setup.assert_error(&text, 4, &format!("volume[0].{key}"), &what);
        let text = format!("{}{key} = \"{most}\"\n", minimal_volume());
        setup.load(&text).expect("the longest duration is allowed");
    }
    let rule = |interval: &str| {
        format!(
            "{}\n[[volume.rule]]\nmatch = \"a\"\nsync = \"interval\"\ninterval = \"{interval}\"\n",
            minimal_volume()
        )
    };
    setup.assert_error(
        &rule("1year 1s"),
        8,
        "volume[0].rule[0].interval",
        "at most 1year",
    );
    setup.load(&rule("1year")).expect("a yearly interval");
}

#[test]
fn a_peer_timeout_too_short_for_the_heartbeats() {
    let setup = Setup::new();
    for short in ["1s", "1999ms"] {
        let text = format!("{}peer_timeout = \"{short}\"\n", minimal_volume());
        let what = format!("\"{short}\" is too short: at least 2s");
        setup.assert_error(&text, 4, "volume[0].peer_timeout", &what);
    }
    let text = format!("{}peer_timeout = \"2s\"\n", minimal_volume());
    setup.load(&text).expect("two heartbeats are enough");
}

#[test]
fn a_pattern_that_can_never_match() {
    let setup = Setup::new();
    let rule = |pattern: &str| {
        format!(
            "{}\n[[volume.rule]]\nmatch = \"{pattern}\"\nsync = \"never\"\n",
            minimal_volume()
        )
    };
    let key = "volume[0].rule[0].match";
    setup.assert_error(
        &rule("{VOL}/fw/*.sif"),
        6,
        key,
        "starts with the volume's own path, but a pattern is relative to the volume root \
         (a leading '/' is the volume root): write \"fw/*.sif\"",
    );
    setup.assert_error(&rule("{VOL}/../vol/hosts"), 6, key, "\"..\" part");
    setup.assert_error(&rule("{VOL}"), 6, key, "the volume's own path");
    for pattern in ["./local", "../x", "fw/./x", "a/../b", "x/.."] {
        setup.assert_error(&rule(pattern), 6, key, "\"..\" part");
    }
    for pattern in ["//fw", "fw//x.bin", "/a//b"] {
        setup.assert_error(&rule(pattern), 6, key, "empty part");
    }
    // The volume's path through a symlink, the pattern with the real one.
    let link = setup.dir.path().join("link");
    std::os::unix::fs::symlink(setup.volume(), &link).expect("symlink");
    let text = rule("{VOL}/x").replacen("{VOL}", &link.display().to_string(), 1);
    setup.assert_error(&text, 6, key, "write \"x\"");
    // What can match stays allowed: anchored names, dot files, dots in names.
    for pattern in ["/hosts", "/fw/*.bin", ".ssh", "**/.*", "...", "a..b", "/.x"] {
        let config = setup.load(&rule(pattern)).expect(pattern);
        assert_eq!(config.volumes[0].policies.rules()[0].pattern(), pattern);
    }
}

#[test]
fn a_bad_glob() {
    let setup = Setup::new();
    let text = format!(
        "{}\n[[volume.rule]]\nmatch = \"a[b\"\nsync = \"never\"\n",
        minimal_volume()
    );
    setup.assert_error(
        &text,
        6,
        "volume[0].rule[0].match",
        "\"a[b\" is not a valid glob",
    );
}

#[test]
fn interval_sync_without_an_interval() {
    let setup = Setup::new();
    let text = format!(
        "{}\n[[volume.rule]]\nmatch = \"a\"\nsync = \"interval\"\n",
        minimal_volume()
    );
    setup.assert_error(&text, 7, "volume[0].rule[0].interval", "needs an interval");
}

#[test]
fn an_interval_for_another_sync_mode() {
    let setup = Setup::new();
    let text = format!(
        "{}\n[[volume.rule]]\nmatch = \"a\"\nsync = \"once\"\ninterval = \"1h\"\n",
        minimal_volume()
    );
    setup.assert_error(
        &text,
        8,
        "volume[0].rule[0].interval",
        "only allowed with sync = \"interval\"",
    );
}

#[test]
fn an_unknown_sync_mode() {
    let setup = Setup::new();
    let text = format!(
        "{}\n[[volume.rule]]\nmatch = \"a\"\nsync = \"sometimes\"\n",
        minimal_volume()
    );
    setup.assert_error(
        &text,
        7,
        "volume[0].rule[0].sync",
        "unknown variant `sometimes`",
    );
}

#[test]
fn duplicate_volume_names() {
    let setup = Setup::new();
    let text = format!(
        "{}\n[[volume]]\nname = \"cmm\"\npath = \"{{VOL2}}\"\n",
        minimal_volume()
    );
    setup.assert_error(
        &text,
        6,
        "volume[1].name",
        "\"cmm\" is already the name of volume[0]",
    );
}

/// `x.sync`'s role file would be `x`'s sync record: a promotion of `x` deleted it,
/// and `x.sync` came back at its next start with its first role and epoch 1.
#[test]
fn volume_names_that_would_share_a_state_file() {
    let setup = Setup::new();
    let text = format!(
        "{}\n[[volume]]\nname = \"cmm.sync\"\npath = \"{{VOL2}}\"\n",
        minimal_volume()
    );
    setup.assert_error(
        &text,
        6,
        "volume[1].name",
        "\"cmm.sync\" and the name of volume[0], \"cmm\", would share a state file",
    );
    // Either way round.
    let text = format!(
        "[[volume]]\nname = \"cmm.sync\"\npath = \"{{VOL2}}\"\n{}",
        minimal_volume()
    );
    setup.assert_error(
        &text,
        5,
        "volume[1].name",
        "\"cmm\" and the name of volume[0], \"cmm.sync\", would share a state file",
    );
    // Names that only look alike are fine.
    for other in ["cmm.syncs", "cmm-sync", "sync"] {
        let text = format!(
            "{}[[volume]]\nname = \"{other}\"\npath = \"{{VOL2}}\"\n",
            minimal_volume()
        );
        setup.load(&text).expect(other);
    }
}

#[test]
fn duplicate_volume_paths() {
    let setup = Setup::new();
    let text = format!(
        "{}\n[[volume]]\nname = \"b\"\npath = \"{{VOL}}\"\n",
        minimal_volume()
    );
    setup.assert_error(&text, 7, "volume[1].path", "already the path of volume[0]");
}

#[test]
fn nested_volumes() {
    let setup = Setup::new();
    fs::create_dir(setup.volume().join("sub")).expect("mkdir sub");
    let inner = "[[volume]]\nname = \"b\"\npath = \"{VOL}/sub\"\n";
    let text = format!("{}\n{inner}", minimal_volume());
    setup.assert_error(
        &text,
        7,
        "volume[1].path",
        "sub is inside {VOL}, the path of volume[0]: volumes must not overlap"
            .replace("{VOL}", &setup.volume().display().to_string())
            .as_str(),
    );
    let text = format!("{inner}\n{}", minimal_volume());
    setup.assert_error(&text, 7, "volume[1].path", "contains");
}

#[test]
fn two_names_of_one_volume_directory() {
    let setup = Setup::new();
    std::os::unix::fs::symlink(setup.volume(), setup.dir.path().join("link")).expect("symlink");
    let dir = setup.dir.path().display().to_string();
    for other in [
        format!("{dir}/link"),
        format!("{dir}/vol2/../vol"),
        format!("{dir}/./vol"),
    ] {
        let text = format!(
            "{}\n[[volume]]\nname = \"b\"\npath = \"{other}\"\n",
            minimal_volume()
        );
        setup.assert_error(&text, 7, "volume[1].path", "already the path of volume[0]");
    }
}

#[test]
fn the_state_directory_and_control_socket_outside_every_volume() {
    let setup = Setup::new();
    let volumes = format!(
        "{}\n[[volume]]\nname = \"b\"\npath = \"{{VOL2}}\"\n",
        minimal_volume()
    );
    // Inside a volume, whether it exists yet or not.
    for state_dir in ["{VOL2}/.twinfs", "{VOL2}"] {
        let text = format!("[node]\nname = \"a\"\nstate_dir = \"{state_dir}\"\n\n{volumes}");
        setup.assert_error(
            &text,
            3,
            "node.state_dir",
            "volume[1].path: the daemon's own files",
        );
    }
    // Holding a volume.
    let dir = setup.dir.path().display();
    let text = format!("[node]\nname = \"a\"\nstate_dir = \"{dir}\"\n\n{volumes}");
    setup.assert_error(&text, 3, "node.state_dir", "contains");
    let text = format!(
        "[node]\nname = \"a\"\nstate_dir = \"/srv/tw\"\ncontrol_socket = \"{{VOL}}/../vol/c.sock\"\n\n{volumes}"
    );
    setup.assert_error(&text, 4, "node.control_socket", "is inside");
    // The default state directory (/var/lib/twinfs) in a volume at /var.
    setup.assert_error(
        "[node]\nname = \"a\"\n\n[[volume]]\nname = \"var\"\npath = \"/var\"\n",
        6,
        "volume[0].path",
        "/var contains /var/lib/twinfs, node.state_dir (by default)",
    );
}

#[test]
fn a_bad_volume_name() {
    let setup = Setup::new();
    setup.assert_error(
        "[[volume]]\nname = \"../x\"\npath = \"{VOL}\"\n",
        2,
        "volume[0].name",
        "not a valid name",
    );
}

#[test]
fn a_volume_path_that_does_not_exist() {
    let setup = Setup::new();
    setup.assert_error(
        "[[volume]]\nname = \"cmm\"\npath = \"{VOL}/missing\"\n",
        3,
        "volume[0].path",
        "missing does not exist",
    );
}

#[test]
fn a_volume_path_that_is_a_file() {
    let setup = Setup::new();
    fs::write(setup.volume().join("f"), b"").expect("write");
    setup.assert_error(
        "[[volume]]\nname = \"cmm\"\npath = \"{VOL}/f\"\n",
        3,
        "volume[0].path",
        "is not a directory",
    );
}

#[test]
fn a_relative_volume_path() {
    let setup = Setup::new();
    setup.assert_error(
        "[[volume]]\nname = \"cmm\"\npath = \"etc/cmm\"\n",
        3,
        "volume[0].path",
        "\"etc/cmm\" is not an absolute path",
    );
}

#[test]
fn a_bad_priority() {
    let setup = Setup::new();
    for priority in ["3", "0", "-1", "300"] {
        let text = format!(
            "{}\n[[volume.rule]]\nmatch = \"a\"\nsync = \"once\"\npriority = {priority}\n",
            minimal_volume()
        );
        setup.assert_error(
            &text,
            8,
            "volume[0].rule[0].priority",
            &format!("{priority} is not a priority"),
        );
    }
    let text = format!(
        "{}\n[[volume.rule]]\nmatch = \"a\"\nsync = \"once\"\npriority = \"1\"\n",
        minimal_volume()
    );
    setup.assert_error(&text, 8, "volume[0].rule[0].priority", "expected i64");
}

#[test]
fn a_bad_node_id() {
    let setup = Setup::new();
    let text = "\n[[peer]]\nname = \"b\"\naddress = \"b:7790\"\nnode_id = \"abc\"\n";
    setup.assert_error(
        text,
        5,
        "peer[0].node_id",
        "found 3 hex digits (expected 64",
    );
    let text = format!(
        "[[peer]]\nname = \"b\"\naddress = \"b:7790\"\nnode_id = \"{}x\"\n",
        &ID_B[1..]
    );
    setup.assert_error(&text, 4, "peer[0].node_id", "'x' is not a hex digit");
}

#[test]
fn duplicate_peers() {
    let setup = Setup::new();
    let peer = format!("[[peer]]\nname = \"b\"\naddress = \"b:7790\"\nnode_id = \"{ID_B}\"\n");
    let text = format!("{peer}{}", peer.replace("\"b\"", "\"c\""));
    setup.assert_error(
        &text,
        8,
        "peer[1].node_id",
        "already the node id of peer[0]",
    );
    let text = format!("{peer}{}", peer.replace(ID_B, ID_C));
    setup.assert_error(
        &text,
        6,
        "peer[1].name",
        "\"b\" is already the name of peer[0]",
    );
}

#[test]
fn a_peer_named_like_this_node() {
    let setup = Setup::new();
    let text = format!(
        "[node]\nname = \"cmm-a\"\n\n[[peer]]\nname = \"cmm-a\"\naddress = \"b:7790\"\nnode_id = \"{ID_B}\"\n"
    );
    setup.assert_error(&text, 5, "peer[0].name", "this node's own name (node.name)");
}

#[test]
fn a_bad_peer_address() {
    let setup = Setup::new();
    for address in [
        "cmm-b",
        ":7790",
        "cmm-b:port",
        "cmm-b:70000",
        "::1:7790",
        "a b:1",
    ] {
        let text =
            format!("[[peer]]\nname = \"b\"\naddress = \"{address}\"\nnode_id = \"{ID_B}\"\n");
        setup.assert_error(&text, 3, "peer[0].address", "is not an address");
    }
    let text = format!("[[peer]]\nname = \"b\"\naddress = \"[::1]:7790\"\nnode_id = \"{ID_B}\"\n");
    assert!(setup.load(&text).is_ok(), "bracketed IPv6");
}

#[test]
fn bad_node_values() {
    let setup = Setup::new();
    setup.assert_error(
        "[node]\nlisten = \"localhost\"\n",
        2,
        "node.listen",
        "not a socket address",
    );
    setup.assert_error(
        "[node]\nstate_dir = \"var\"\n",
        2,
        "node.state_dir",
        "not an absolute path",
    );
    setup.assert_error(
        "[node]\nname = \"a b\"\n",
        2,
        "node.name",
        "not a valid name",
    );
}

#[test]
fn a_bad_role() {
    let setup = Setup::new();
    let text = format!("{}initial_role = \"primary\"\n", minimal_volume());
    setup.assert_error(
        &text,
        4,
        "volume[0].initial_role",
        "unknown variant `primary`, expected `active` or `standby`",
    );
    let text = format!("{}durability = \"eventual\"\n", minimal_volume());
    setup.assert_error(
        &text,
        4,
        "volume[0].durability",
        "unknown variant `eventual`",
    );
    let text = format!("{}hook_timeout = \"soon\"\n", minimal_volume());
    let err = setup.load(&text).expect_err("bad hook_timeout");
    assert!(err.to_string().contains("volume[0].hook_timeout"), "{err}");
    let text = format!("{}on_promote_failure = \"ignore\"\n", minimal_volume());
    let err = setup.load(&text).expect_err("bad on_promote_failure");
    assert!(err.to_string().contains("on_promote_failure"), "{err}");
    let text = format!(
        "{}on_promote = \"true\"\non_promote_failure = \"rollback\"\nhook_timeout = \"5s\"\n",
        minimal_volume()
    );
    let hooks = setup.load(&text).expect("hooks").volumes[0].hooks.clone();
    assert_eq!(hooks.on_promote.as_deref(), Some("true"));
    assert_eq!(hooks.on_demote, None);
    assert!(hooks.rollback_failed_promote);
    assert_eq!(hooks.timeout, Duration::from_secs(5));
    let text = format!(
        "{}[[volume.rule]]\nmatch = \"x\"\nsync = \"always\"\ndurability = \"eventual\"\n",
        minimal_volume()
    );
    setup.assert_error(
        &text,
        7,
        "volume[0].rule[0].durability",
        "unknown variant `eventual`",
    );
}

#[test]
fn a_toml_syntax_error() {
    let setup = Setup::new();
    let text = format!(
        "{}\n[[volume]]\nname = \"b\"\npath = \"{{VOL2}}\"\n\n[[volume.rule]]\nmatch = \"a\"\nsync = once\n",
        minimal_volume()
    );
    let err = setup.assert_error(&text, 11, "volume[1].rule[0].sync", "");
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err:?}");
    let err = setup.assert_error("[node\nname = \"a\"\n", 1, "(top level)", "");
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err:?}");
}

#[test]
fn an_unreadable_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("missing.toml");
    let err = Config::load(&path).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("{}: cannot read: ", path.display())),
        "{message}"
    );
    assert!(message.contains("No such file"), "{message}");
}

#[test]
fn rule_directions() {
    let setup = Setup::new();
    let rule = |extra: &str| {
        format!(
            "{}[[volume.rule]]\nmatch = \"passwd\"\nsync = \"always\"\n{extra}",
            minimal_volume()
        )
    };
    let config = setup.load(&rule("direction = \"both\"\n")).expect("both");
    let policies = &config.volumes[0].policies;
    assert_eq!(policies.rules()[0].policy().direction, Direction::Both);
    assert!(policies.resolve(Path::new("x/passwd")).upstream());
    assert!(!policies.resolve(Path::new("cmm.conf")).upstream());
    let config = setup.load(&rule("direction = \"down\"\n")).expect("down");
    assert_eq!(
        config.volumes[0].policies.rules()[0].policy().direction,
        Direction::Down
    );
    let config = setup.load(&rule("")).expect("default");
    assert_eq!(
        config.volumes[0].policies.rules()[0].policy().direction,
        Direction::Down
    );
    setup.assert_error(
        &rule("direction = \"up\"\n"),
        7,
        "volume[0].rule[0].direction",
        "unknown variant `up`, expected `down` or `both`",
    );
    let text = format!(
        "{}[[volume.rule]]\nmatch = \"passwd\"\nsync = \"once\"\ndirection = \"both\"\n",
        minimal_volume()
    );
    setup.assert_error(
        &text,
        7,
        "volume[0].rule[0].direction",
        "only allowed with sync = \"always\"",
    );
}

#[test]
fn a_volume_path_ending_in_a_dot_is_taken_without_it() {
    let setup = Setup::new();
    let text = minimal_volume().replace("{VOL}", "{VOL}/.//");
    let config = setup
        .load(&text)
        .expect("a path with a trailing /. is valid");
    assert_eq!(config.volumes[0].path, setup.volume());
}
