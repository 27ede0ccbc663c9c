//! The management socket, the verbs' side: where it is, and the client.
//!
//! One JSON object per line each way over a UNIX stream socket in the node's state directory;
//! the messages are `crate::proto`'s.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::proto::{parse_reply, request_line, ErrorBody, ErrorCode, Request, Verb};

/// File name of the management socket inside a state directory.
pub const SOCKET_NAME: &str = "node.sock";

/// Default state directory (override with `--state` or `DEVLEND_STATE`).
pub const DEFAULT_STATE: &str = "/tmp/devlend";

/// Options every management verb takes.
#[derive(clap::Args, Clone)]
pub struct Target {
    /// The local node's state directory (where its socket lives).
    #[arg(long, env = "DEVLEND_STATE", default_value = DEFAULT_STATE)]
    pub state: PathBuf,
    /// Print JSON instead of text (an error too: `{"error":{"code":...,"message":...}}` on
    /// stderr).
    #[arg(long)]
    pub json: bool,
}

/// Sends one request to the node at `state` and returns its typed reply. Every error is an
/// [`ErrorBody`] (its code says what kind: `unreachable`, `timeout`, the node's own, ...).
pub fn call<V: Verb>(state: &Path, req: V, timeout: Duration) -> anyhow::Result<V::Reply> {
    let req: Request = req.into();
    let _progress = super::progress::Progress::start(req.verb().to_string());
    Ok(exchange::<V::Reply>(state, req, timeout)?)
}

fn exchange<T: serde::de::DeserializeOwned>(
    state: &Path,
    req: Request,
    timeout: Duration,
) -> Result<T, ErrorBody> {
    let path = state.join(SOCKET_NAME);
    let stream = UnixStream::connect(&path).map_err(|e| {
        ErrorBody::new(
            ErrorCode::Unreachable,
            format!(
                "cannot reach the devlend node at {} ({e}; start one with `devlend node --state {}`)",
                path.display(),
                state.display()
            ),
        )
    })?;
    let io = |what: &str, e: std::io::Error| {
        let code = match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ErrorCode::Timeout,
            _ => ErrorCode::Unreachable,
        };
        ErrorBody::new(code, format!("{what} the node at {}: {e}", path.display()))
    };
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| io("talking to", e))?;
    // A node that refuses at once (busy) answers and closes before reading: then the write
    // fails, and its answer is what counts.
    let sent = (&stream).write_all(&request_line(req)?);
    let mut answer = Vec::new();
    let read = BufReader::new(&stream).read_until(b'\n', &mut answer);
    match (sent, read) {
        (_, Ok(_)) if !answer.is_empty() => {}
        (Err(e), _) => return Err(io("writing to", e)),
        (Ok(()), Err(e)) => return Err(io("reading the answer of", e)),
        (Ok(()), Ok(_)) => {}
    }
    if answer.is_empty() {
        return Err(ErrorBody::new(
            ErrorCode::BadReply,
            format!(
                "the node at {} closed the connection without an answer",
                path.display()
            ),
        ));
    }
    parse_reply(&answer)
}
