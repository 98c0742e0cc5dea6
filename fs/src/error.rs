//! The volume's error type: an errno with the operation that failed.

use std::io;

/// An error from a volume operation, carried to the kernel as an errno.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The underlying directory returned an error; passed to the caller as is, so
    /// tools see exactly the errno the native filesystem would give.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// A write-type operation on a volume in the standby role (`EROFS`).
    #[error("volume is a read-only standby")]
    ReadOnly,
    /// The kernel named an inode or file handle the volume does not know (`ESTALE`/`EBADF`).
    #[error("stale {0}")]
    Stale(&'static str),
}

impl Error {
    /// The errno to return to the kernel.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            Error::ReadOnly => libc::EROFS,
            Error::Stale("file handle") => libc::EBADF,
            Error::Stale(_) => libc::ESTALE,
        }
    }

    /// An error from a raw errno value.
    pub fn from_errno(errno: i32) -> Self {
        Error::Io(io::Error::from_raw_os_error(errno))
    }
}

/// Result of a volume operation.
pub type Result<T> = std::result::Result<T, Error>;
