//! Real `twinfs mount` daemons as child processes, each with its own scratch volume,
//! state directory and config file. The guard kills the daemon and unmounts whatever
//! is left when it is dropped, even when the test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `twinfs` binary built by this workspace: `$TWINFS_BIN`, or next to the test
/// executable's `deps/` directory.
pub fn twinfs_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TWINFS_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir.join("twinfs");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build, or cargo test --workspace)",
        bin.display()
    );
    bin
}

/// One node: a daemon serving one volume.
pub struct Node {
    /// Scratch directory holding everything of this node.
    pub dir: tempfile::TempDir,
    /// The config file.
    pub config: PathBuf,
    /// The volume directory (mounted in place while the daemon runs).
    pub volume: PathBuf,
    /// The state directory.
    pub state_dir: PathBuf,
    /// The daemon's stderr.
    pub log: PathBuf,
    /// The network namespace the daemon runs in (`ip netns` name), if any.
    pub netns: Option<String>,
    /// A witness: no volume, it only answers the others' failover probes.
    pub witness: bool,
    /// More environment for the daemon.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Node {
    /// A node whose volume `vol` is filled by `fill` before any mount, with the given
    /// `[[volume.rule]]` TOML appended to the volume table.
    pub fn new(rules: &str, fill: impl FnOnce(&Path)) -> Node {
        crate::require_fuse();
        let dir = tempfile::Builder::new()
            .prefix("twinfs-node-")
            .tempdir()
            .expect("scratch dir");
        let volume = dir.path().join("vol");
        std::fs::create_dir(&volume).expect("mkdir vol");
        fill(&volume);
        let state_dir = dir.path().join("state");
        let config = dir.path().join("twinfs.toml");
        let text = format!(
            "[node]\nname = \"test-node\"\nlisten = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n\n\
             [[volume]]\nname = \"vol\"\npath = \"{}\"\n\n{rules}\n",
            state_dir.display(),
            volume.display()
        );
        std::fs::write(&config, text).expect("write config");
        let log = dir.path().join("daemon.log");
        Node {
            dir,
            config,
            volume,
            state_dir,
            log,
            netns: None,
            witness: false,
            env: Vec::new(),
            child: None,
        }
    }

    /// Runs `twinfs --config <config> ARGS` and returns its output.
    pub fn twinfs(&self, args: &[&str]) -> Output {
        Command::new(twinfs_bin())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("run twinfs")
    }

    /// Runs `twinfs --config <config> ARGS` in the directory `cwd` (which relative
    /// paths are taken from) and returns its output.
    pub fn twinfs_in(&self, cwd: &Path, args: &[&str]) -> Output {
        Command::new(twinfs_bin())
            .current_dir(cwd)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("run twinfs")
    }

    /// `twinfs status` as a person reads it (the table).
    pub fn status_text(&self) -> String {
        String::from_utf8_lossy(&self.twinfs(&["status"]).stdout).into_owned()
    }

    /// Starts `twinfs mount ARGS` and waits until the volume is mounted.
    pub fn start(&mut self, args: &[&str]) {
        assert!(self.child.is_none(), "daemon already running");
        let log = std::fs::File::create(&self.log).expect("create log");
        // nsenter enters only the network namespace: the mount stays visible here.
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}"))
                    .arg(twinfs_bin());
                c
            }
            None => Command::new(twinfs_bin()),
        };
        let child = command
            .arg("--config")
            .arg(&self.config)
            .arg("mount")
            .args(args)
            .env("TWINFS_LOG", "debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn twinfs mount");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.status_json() {
                if self.witness {
                    return;
                }
                let v = &status["volumes"][0];
                // An active takes writes once a standby accepted it (or after 5 s).
                if v["mounted"] == true && (v["role"] != "active" || v["writable"] == true) {
                    return;
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(exit)) = child.try_wait() {
                    panic!("twinfs mount exited with {exit}; log:\n{}", self.log_text());
                }
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not come up in 30 s; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `twinfs status --json`, or `None` when no daemon answers.
    pub fn status_json(&self) -> Option<serde_json::Value> {
        let out = self.twinfs(&["status", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The status of the volume, panicking when the daemon does not answer.
    pub fn volume_status(&self) -> serde_json::Value {
        let status = self.status_json().expect("daemon answers status");
        status["volumes"][0].clone()
    }

    /// Whether a thread of the daemon waits for a frozen filesystem to thaw (a write
    /// waits in `percpu_rwsem_wait`, for the superblock's write lock).
    pub fn blocked_in_a_write(&self) -> bool {
        let Some(pid) = self.pid() else {
            return false;
        };
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.flatten().any(|task| {
            std::fs::read_to_string(task.path().join("wchan"))
                .is_ok_and(|w| w.contains("percpu_rwsem"))
        })
    }

    /// The daemon's pid, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `sig` to the daemon (`SIGSTOP` and `SIGCONT` pause and resume it).
    pub fn signal(&self, sig: i32) {
        let pid = self.pid().expect("daemon running") as i32;
        // SAFETY: a signal to our own child process.
        unsafe { libc::kill(pid, sig) };
    }

    /// Stops the daemon with SIGTERM and waits for it; returns its exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        wait_or_kill(&mut child, Duration::from_secs(20))
    }

    /// Whether this node is expected to hold the volume's tree: a running daemon that
    /// is not a witness.
    fn follows(&self) -> bool {
        self.child.is_some() && !self.witness
    }

    /// Kills the daemon with SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        self.kill9_only();
        // The mount goes when the daemon's watchdog notices (a moment later, longer
        // under load); until then the directory answers ENOTCONN.
        let deadline = Instant::now() + Duration::from_secs(30);
        while crate::is_mounted(&self.volume) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the daemon with SIGKILL and waits for it to be gone, not for its mount.
    pub fn kill9_only(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The pid of the watchdog the daemon started with its mount, if one runs: the
    /// process whose command line is `twinfs watch-mount <volume> ...`.
    pub fn watchdog_pid(&self) -> Option<i32> {
        let mut want = b"watch-mount\0".to_vec();
        want.extend_from_slice(self.volume.as_os_str().as_encoded_bytes());
        want.push(0);
        std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .find_map(|entry| {
                let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
                let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
                cmdline
                    .windows(want.len())
                    .any(|w| w == want.as_slice())
                    .then_some(pid)
            })
    }
}

fn wait_or_kill(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let status = child.wait().expect("wait");
            panic!("daemon did not exit within {timeout:?} of SIGTERM; killed ({status})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // auto_unmount takes a moment after the daemon dies. Every volume of the
        // node (a test may add some beside `volume`): a mount left below the scratch
        // directory would keep it from being removed.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !crate::mounts_below(self.dir.path()).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for mount in crate::mounts_below(self.dir.path()) {
            crate::force_unmount(&mount);
        }
    }
}

/// Waits until `done` holds, up to `timeout`; false if it never did.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

static CLUSTERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Nodes replicating one volume `vol` over QUIC on loopback: node 0 is the active,
/// the others its standbys. Each node listens on its own 127.x.y.z address.
pub struct Cluster {
    /// The nodes; `nodes[0]` is the active.
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// `n` nodes with `rules` for the volume; the active's volume is filled by `fill`.
    pub fn new(n: usize, rules: &str, fill: impl FnOnce(&Path)) -> Cluster {
        let serial = CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let net = (std::process::id() % 200 + 20) as u8;
        let sub = (serial % 250) as u8;
        let addresses = (0..n)
            .map(|i| format!("127.{net}.{sub}.{}:7790", i + 1))
            .collect();
        Self::with_addresses(addresses, rules, fill)
    }

    /// Two nodes, each in one of the namespaces of `net` (traffic crosses its veth
    /// pair, which [`NetPair::cut`] cuts), with `rules`; node 0's volume is filled.
    pub fn in_namespaces(net: &NetPair, rules: &str, fill: impl FnOnce(&Path)) -> Cluster {
        let addresses = net.addresses.iter().map(|a| format!("{a}:7790")).collect();
        let mut c = Self::with_addresses(addresses, rules, fill);
        for (node, ns) in c.nodes.iter_mut().zip(&net.names) {
            node.netns = Some(ns.clone());
        }
        c
    }

    /// One node per address (`ip:port`), with `rules`; node 0's volume is filled.
    pub fn with_addresses(
        addresses: Vec<String>,
        rules: &str,
        fill: impl FnOnce(&Path),
    ) -> Cluster {
        Self::with_witnesses(addresses, 0, rules, fill)
    }

    /// One node per address of `net`, each in its own namespace (a link of each can
    /// be cut with [`NetBridge::cut`]); the last `witnesses` are witnesses (no volume,
    /// `witness = true` in the others' configs).
    pub fn in_bridge(
        net: &NetBridge,
        witnesses: usize,
        rules: &str,
        fill: impl FnOnce(&Path),
    ) -> Cluster {
        let addresses = net.addresses.iter().map(|a| format!("{a}:7790")).collect();
        let mut c = Self::with_witnesses(addresses, witnesses, rules, fill);
        for (node, ns) in c.nodes.iter_mut().zip(&net.names) {
            node.netns = Some(ns.clone());
        }
        c
    }

    /// One node per address; the last `witnesses` are witnesses.
    pub fn with_witnesses(
        addresses: Vec<String>,
        witnesses: usize,
        rules: &str,
        fill: impl FnOnce(&Path),
    ) -> Cluster {
        let n = addresses.len();
        let is_witness = |i: usize| i + witnesses >= n;
        let mut fill = Some(fill);
        let mut nodes: Vec<Node> = (0..n)
            .map(|i| {
                if i == 0 {
                    Node::new(rules, |p| (fill.take().expect("fill once"))(p))
                } else {
                    Node::new(rules, |_| {})
                }
            })
            .collect();
        let ids: Vec<String> = nodes
            .iter()
            .map(|node| {
                let out = node.twinfs(&["init"]);
                assert!(out.status.success(), "twinfs init: {out:?}");
                let text = String::from_utf8(out.stdout).expect("utf-8");
                text.trim()
                    .strip_prefix("node_id = \"")
                    .and_then(|s| s.strip_suffix('"'))
                    .expect("node_id line")
                    .to_owned()
            })
            .collect();
        let addr = |i: usize| addresses[i].clone();
        for (i, node) in nodes.iter_mut().enumerate() {
            let mut text = format!(
                "[node]\nname = \"node{i}\"\nlisten = \"{}\"\nstate_dir = \"{}\"\n\n",
                addr(i),
                node.state_dir.display()
            );
            for (j, id) in ids.iter().enumerate() {
                if j != i {
                    text.push_str(&format!(
                        "[[peer]]\nname = \"node{j}\"\naddress = \"{}\"\nnode_id = \"{id}\"\nwitness = {}\n\n",
                        addr(j),
                        is_witness(j)
                    ));
                }
            }
            if is_witness(i) {
                node.witness = true;
                std::fs::write(&node.config, text).expect("write config");
                continue;
            }
            text.push_str(&format!(
                "[[volume]]\nname = \"vol\"\npath = \"{}\"\ninitial_role = \"{}\"\n\n{rules}\n",
                node.volume.display(),
                if i == 0 { "active" } else { "standby" }
            ));
            std::fs::write(&node.config, text).expect("write config");
        }
        Cluster { nodes }
    }

    /// Starts every daemon, standbys (and witnesses) first.
    pub fn start(&mut self) {
        for node in self.nodes.iter_mut().rev() {
            node.start(&[]);
        }
    }

    /// The active's volume.
    pub fn active(&self) -> &Path {
        &self.nodes[0].volume
    }

    /// Waits until every standby's tree equals the active's; panics with the
    /// difference after `timeout`.
    pub fn wait_converged(&self, timeout: Duration) {
        self.wait_converged_to(0, timeout);
    }

    /// Waits until the tree of every node with a running daemon (witnesses aside) equals
    /// node `to`'s; panics with the difference after `timeout`.
    pub fn wait_converged_to(&self, to: usize, timeout: Duration) {
        let reference = &self.nodes[to].volume;
        let ok = wait_until(timeout, || {
            let want = crate::tree::digest(reference);
            self.nodes
                .iter()
                .enumerate()
                .all(|(i, n)| i == to || !n.follows() || crate::tree::digest(&n.volume) == want)
        });
        if !ok {
            let want = crate::tree::digest(reference);
            for (i, n) in self
                .nodes
                .iter()
                .enumerate()
                .filter(|(i, n)| *i != to && n.follows())
            {
                let got = crate::tree::digest(&n.volume);
                let diff = crate::tree::difference(&want, &got);
                if !diff.is_empty() {
                    panic!(
                        "node {i} did not converge to node {to} in {timeout:?}:\n{diff}\nnode {to} log:\n{}\nnode {i} log:\n{}",
                        tail(&self.nodes[to].log_text()),
                        tail(&n.log_text())
                    );
                }
            }
        }
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Two network namespaces joined by a veth pair, with addresses from 198.18.0.0/15
/// (reserved for network tests); removed on drop.
pub struct NetPair {
    /// The namespaces' names.
    pub names: [String; 2],
    /// Their addresses.
    pub addresses: [String; 2],
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetPair {
    /// Creates the pair; `subnet` (0-255) picks 198.18.<subnet>.0/24.
    pub fn new(subnet: u8) -> NetPair {
        let tag = format!("tw{}x{subnet}", std::process::id() % 100_000);
        let names = [format!("{tag}a"), format!("{tag}b")];
        let addresses = [format!("198.18.{subnet}.1"), format!("198.18.{subnet}.2")];
        let pair = NetPair { names, addresses };
        for n in &pair.names {
            ip(&["netns", "add", n]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        let (va, vb) = (format!("{tag}va"), format!("{tag}vb"));
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &pair.names[0]]);
        ip(&["link", "set", &vb, "netns", &pair.names[1]]);
        for (i, v) in [&va, &vb].into_iter().enumerate() {
            let cidr = format!("{}/24", pair.addresses[i]);
            ip(&["-n", &pair.names[i], "addr", "add", &cidr, "dev", v]);
            ip(&["-n", &pair.names[i], "link", "set", v, "up"]);
        }
        pair
    }

    fn veth(&self, i: usize) -> String {
        format!(
            "{}v{}",
            &self.names[i][..self.names[i].len() - 1],
            if i == 0 { "a" } else { "b" }
        )
    }

    /// Cuts the link (both ends down).
    pub fn cut(&self) {
        for i in 0..2 {
            ip(&["-n", &self.names[i], "link", "set", &self.veth(i), "down"]);
        }
    }

    /// Limits the link to `rate` (as `tc` writes it, e.g. `"4mbit"`) each way.
    pub fn limit_rate(&self, rate: &str) {
        for i in 0..2 {
            let dev = self.veth(i);
            let args = [
                "-n",
                &self.names[i],
                "qdisc",
                "replace",
                "dev",
                &dev,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "32kbit",
                "latency",
                "400ms",
            ];
            let out = Command::new("tc").args(args).output().expect("run tc");
            assert!(
                out.status.success(),
                "tc {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Heals it.
    pub fn heal(&self) {
        for i in 0..2 {
            ip(&["-n", &self.names[i], "link", "set", &self.veth(i), "up"]);
        }
    }
}

/// One network namespace per node, each joined by a veth pair to a bridge in a
/// namespace of its own, with addresses from 198.18.<subnet>.0/24 (reserved for
/// network tests); a node's link can be cut alone. Removed on drop.
pub struct NetBridge {
    /// The nodes' namespaces.
    pub names: Vec<String>,
    /// Their addresses.
    pub addresses: Vec<String>,
    hub: String,
}

impl NetBridge {
    /// `n` (at most 9) namespaces on one bridge; `subnet` picks 198.18.<subnet>.0/24.
    pub fn new(subnet: u8, n: usize) -> NetBridge {
        assert!(n <= 9, "at most 9 nodes");
        let tag = format!("tw{}b{subnet}", std::process::id() % 100_000);
        let hub = format!("{tag}h");
        let net = NetBridge {
            names: (0..n).map(|i| format!("{tag}n{i}")).collect(),
            addresses: (0..n)
                .map(|i| format!("198.18.{subnet}.{}", i + 1))
                .collect(),
            hub,
        };
        ip(&["netns", "add", &net.hub]);
        ip(&["-n", &net.hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &net.hub, "link", "set", "br0", "up"]);
        for (i, ns) in net.names.iter().enumerate() {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            let (v, p) = (format!("{tag}v{i}"), format!("{tag}p{i}"));
            ip(&["link", "add", &v, "type", "veth", "peer", "name", &p]);
            ip(&["link", "set", &v, "netns", ns]);
            ip(&["link", "set", &p, "netns", &net.hub]);
            ip(&["-n", &net.hub, "link", "set", &p, "master", "br0"]);
            ip(&["-n", &net.hub, "link", "set", &p, "up"]);
            let cidr = format!("{}/24", net.addresses[i]);
            ip(&["-n", ns, "addr", "add", &cidr, "dev", &v]);
            ip(&["-n", ns, "link", "set", &v, "up"]);
        }
        net
    }

    fn veth(&self, i: usize) -> String {
        format!("{}v{i}", &self.hub[..self.hub.len() - 1])
    }

    /// Cuts node `i` off from every other node.
    pub fn cut(&self, i: usize) {
        ip(&["-n", &self.names[i], "link", "set", &self.veth(i), "down"]);
    }

    /// Joins node `i` again.
    pub fn heal(&self, i: usize) {
        ip(&["-n", &self.names[i], "link", "set", &self.veth(i), "up"]);
    }
}

impl Drop for NetBridge {
    fn drop(&mut self) {
        for n in self.names.iter().chain(std::iter::once(&self.hub)) {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}
