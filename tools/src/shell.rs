//! Runs an administrator's shell command (a role hook, a health check) with a time
//! limit that holds even when the command leaves processes behind.
//!
//! The command runs as `sh -c` in a process group of its own, so a timeout kills
//! everything it started, not only the shell. Its output is read from one pipe
//! (stdout and stderr in the order written) until the shell exits: a process the
//! command left running in the background, such as a service started with `&`, never
//! keeps the caller waiting. What it writes later is the caller's to read or drop
//! ([`Outcome::rest`]).

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How much of the output is kept: its end, where the reason a command failed is.
pub const OUTPUT_KEPT: usize = 64 << 10;

/// How a command ended.
#[derive(Debug)]
pub struct Outcome {
    /// The shell's exit status; `None` if it was killed for running too long.
    pub status: Option<ExitStatus>,
    /// The command ran past its time limit; its whole process group was killed.
    pub timed_out: bool,
    /// The last [`OUTPUT_KEPT`] bytes of its stdout and stderr, as written.
    pub output: String,
    /// The output's read end (blocking), while processes the command left running
    /// still hold it open. Dropping it makes their later writes fail (EPIPE, or
    /// SIGPIPE where they do not ignore it).
    pub rest: Option<std::fs::File>,
    /// The process group the command ran in (its shell's PID): processes it left
    /// running are in it, unless they left it.
    pub group: u32,
}

impl Outcome {
    /// The command exited with status 0 within its time.
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

/// Runs `sh -c command` with `env` added to the daemon's environment and stdin from
/// `/dev/null`, and waits for the shell to exit or for `timeout` (then kills its
/// process group). With `capture` false its output goes to `/dev/null`.
pub fn run(
    command: &str,
    env: &[(&str, String)],
    timeout: Duration,
    capture: bool,
) -> std::io::Result<Outcome> {
    let started = Instant::now();
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        // Only the daemon speaks to systemd (crate::notify).
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .process_group(0);
    let mut reader = None;
    if capture {
        let (read, write) = pipe()?;
        sh.stdout(Stdio::from(write.try_clone()?))
            .stderr(Stdio::from(write));
        reader = Some(std::fs::File::from(read));
    } else {
        sh.stdout(Stdio::null()).stderr(Stdio::null());
    }
    let mut child = sh.spawn()?;
    // The command's copies of the pipe's write end go with it.
    drop(sh);
    let mut output = Vec::new();
    let mut drain = |reader: &mut Option<std::fs::File>, wait: Duration| {
        let Some(file) = reader else {
            std::thread::sleep(wait);
            return;
        };
        let mut poll = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut poll, 1, ms) };
        if ready <= 0 {
            return;
        }
        let mut buf = [0u8; 8192];
        loop {
            match file.read(&mut buf) {
                Ok(0) => {
                    // Every writer is gone: nothing more will come.
                    *reader = None;
                    return;
                }
                Ok(n) => {
                    output.extend_from_slice(&buf[..n]);
                    if output.len() > 2 * OUTPUT_KEPT {
                        output.drain(..output.len() - OUTPUT_KEPT);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // WouldBlock: all there is for now; any other error ends the reading.
                Err(e) => {
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        *reader = None;
                    }
                    return;
                }
            }
        }
    };
    let (status, timed_out) = loop {
        match child.try_wait()? {
            Some(status) => break (Some(status), false),
            None if started.elapsed() >= timeout => {
                kill_group(&child);
                child.wait()?;
                break (None, true);
            }
            None => drain(&mut reader, Duration::from_millis(20)),
        }
    };
    // What the shell wrote before it exited is in the pipe now; take it and no more.
    drain(&mut reader, Duration::ZERO);
    if output.len() > OUTPUT_KEPT {
        output.drain(..output.len() - OUTPUT_KEPT);
    }
    if let Some(file) = &reader {
        set_nonblocking(file.as_raw_fd(), false)?;
    }
    Ok(Outcome {
        status,
        timed_out,
        output: String::from_utf8_lossy(&output).into_owned(),
        rest: reader,
        group: child.id(),
    })
}

/// Sends SIGKILL to every process of the child's group (the group's ID is its PID).
fn kill_group(child: &std::process::Child) {
    let Ok(pgid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) with a negative PID signals that process group; no memory involved.
    if unsafe { libc::kill(-pgid, libc::SIGKILL) } != 0 {
        tracing::warn!(pgid, error = %std::io::Error::last_os_error(), "cannot kill a command's process group");
    }
}

/// A pipe: its read end non-blocking, both ends close-on-exec (the child gets dups).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the two ints on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    set_nonblocking(read.as_raw_fd(), true)?;
    Ok((read, write))
}

fn set_nonblocking(fd: libc::c_int, on: bool) -> std::io::Result<()> {
    // SAFETY: fcntl on a valid fd, no memory involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    let flags = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_for(command: &str, timeout: Duration) -> (Outcome, Duration) {
        let started = Instant::now();
        let outcome = run(command, &[("TWINFS_X", "x1".into())], timeout, true).expect("run sh");
        (outcome, started.elapsed())
    }

    #[test]
    fn output_of_both_streams_in_order_and_the_environment() {
        let (o, _) = run_for(
            "echo one; echo two >&2; echo \"$TWINFS_X\"; exit 3",
            Duration::from_secs(10),
        );
        assert_eq!(o.status.and_then(|s| s.code()), Some(3));
        assert!(!o.timed_out && !o.success());
        assert_eq!(o.output, "one\ntwo\nx1\n");
    }

    #[test]
    fn a_background_process_holding_the_output_does_not_hold_the_caller() {
        let (o, took) = run_for("sleep 30 & echo started", Duration::from_secs(20));
        assert!(o.success(), "{o:?}");
        assert_eq!(o.output, "started\n");
        assert!(
            took < Duration::from_secs(15),
            "waited {took:?} for the background sleep"
        );
        assert!(o.rest.is_some(), "the sleep holds the output open");
        let group = libc::pid_t::try_from(o.group).expect("pid");
        // SAFETY: kill(2) of the test's own process group; no memory involved.
        assert_eq!(
            unsafe { libc::kill(-group, libc::SIGKILL) },
            0,
            "the sleep is gone"
        );
    }

    #[test]
    fn what_a_background_process_writes_later_can_still_be_read() {
        let (o, _) = run_for("(sleep 1; echo late) & echo early", Duration::from_secs(20));
        assert_eq!(o.output, "early\n");
        let mut rest = String::new();
        o.rest
            .expect("the subshell holds the output")
            .read_to_string(&mut rest)
            .expect("read");
        assert_eq!(rest, "late\n");
    }

    #[test]
    fn a_command_that_leaves_nothing_running_leaves_no_output_open() {
        let (o, _) = run_for("echo done", Duration::from_secs(20));
        assert!(o.success());
        // The pipe may still be open if the shell's exit was seen before its end.
        if let Some(mut rest) = o.rest {
            let mut more = String::new();
            rest.read_to_string(&mut more).expect("read");
            assert_eq!(more, "");
        }
    }

    #[test]
    fn a_timeout_kills_the_whole_group() {
        let marker = std::env::temp_dir().join(format!("twinfs-shell-{}", std::process::id()));
        let _ = std::fs::remove_file(&marker);
        // The child sleeps, then would leave a marker; killing only `sh` would not stop it.
        let command = format!("(sleep 2; touch {}) & wait", marker.display());
        let (o, took) = run_for(&command, Duration::from_millis(300));
        assert!(o.timed_out && o.status.is_none() && !o.success(), "{o:?}");
        assert!(took < Duration::from_secs(2), "took {took:?}");
        std::thread::sleep(Duration::from_millis(2500));
        assert!(
            !marker.exists(),
            "a process of the timed-out command lived on"
        );
    }

    #[test]
    fn only_the_end_of_a_long_output_is_kept() {
        let (o, _) = run_for(
            "head -c 300000 /dev/zero | tr '\\0' a; echo END",
            Duration::from_secs(20),
        );
        assert!(o.success());
        assert_eq!(o.output.len(), OUTPUT_KEPT);
        assert!(o.output.ends_with("aEND\n"));
    }
}
