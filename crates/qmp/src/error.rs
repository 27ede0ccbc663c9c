//! What can go wrong talking to a QMP socket.

use std::path::PathBuf;
use std::time::Duration;

/// Errors of the QMP client. Each message says which socket and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// QEMU answered a command with an error.
    #[error("QEMU refused {command}: {desc} ({class})")]
    Command {
        /// The command's name.
        command: &'static str,
        /// QMP's error class (`GenericError`, `DeviceNotFound`, ...).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// Connecting to the socket failed.
    #[error("cannot connect to the QMP socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Nothing appeared at the path while the client waited for QEMU to make its socket.
    #[error("no QMP socket at {path} after waiting {after:?} for QEMU to make it (start QEMU with -qmp unix:{path},server=on,wait=off)")]
    NotMade {
        /// The socket's path.
        path: PathBuf,
        /// How long the client waited.
        after: Duration,
    },
    /// The peer closed the connection (QEMU exited, or the socket is not QEMU's).
    #[error("the QMP peer at {path} closed the connection {while_}")]
    Closed {
        /// The socket.
        path: PathBuf,
        /// What the client was waiting for.
        while_: &'static str,
    },
    /// Reading or writing the socket failed.
    #[error("QMP socket {path}: {what}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What was attempted.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A line longer than the client accepts.
    #[error("QMP socket {path} sent a line longer than {max_bytes} bytes")]
    LineTooLong {
        /// The socket.
        path: PathBuf,
        /// The limit.
        max_bytes: usize,
    },
    /// The first line was not a QMP greeting: the socket is something else.
    #[error("{path} is not a QEMU QMP socket (its first line was {line:?})")]
    NotQmp {
        /// The socket.
        path: PathBuf,
        /// What it sent (truncated).
        line: String,
    },
    /// A reply or event that does not parse as the expected type.
    #[error("QMP socket {path}: unexpected {what} (in {line:?})")]
    Parse {
        /// The socket.
        path: PathBuf,
        /// What was being parsed.
        what: &'static str,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
        /// The line (truncated).
        line: String,
    },
    /// Nothing arrived in time.
    #[error("QMP socket {path} did not answer within {after:?} ({while_})")]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// What the client was waiting for.
        while_: &'static str,
        /// How long it waited.
        after: Duration,
    },
}

/// The QMP client's result type.
pub type Result<T> = std::result::Result<T, Error>;
