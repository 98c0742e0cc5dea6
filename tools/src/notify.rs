//! systemd's readiness protocol (`sd_notify`), for a unit with `Type=notify`: the
//! daemon says `READY=1` once every volume is mounted, the control socket listens
//! and every active volume takes writes, and `STOPPING=1` when it begins to shut
//! down. Without `$NOTIFY_SOCKET` (not started that way) nothing is sent.

use std::io;
use std::os::unix::net::UnixDatagram;

/// Sends `state` (lines such as `READY=1`) to `$NOTIFY_SOCKET`, if set. A failure is
/// logged: the daemon runs on (systemd then reports the start as timed out).
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&socket, state) {
        tracing::warn!(socket = ?socket, error = %e, "cannot tell systemd {state:?}");
    }
}

fn send(socket: &std::ffi::OsStr, state: &str) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let sock = UnixDatagram::unbound()?;
    let sent = match socket.as_bytes() {
        // An abstract socket: its name after the '@'.
        [b'@', name @ ..] => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?
        }
        [b'/', ..] => sock.send_to(state.as_bytes(), socket)?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "neither an absolute path nor an abstract name (@...)",
            ))
        }
    };
    if sent != state.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short datagram"));
    }
    Ok(())
}
