//! A small synchronous client for QEMU's machine protocol (QMP) on a UNIX socket.
//!
//! [`Qmp::connect`] reads QEMU's greeting (refusing a socket whose first line is not one),
//! negotiates capabilities, and then [`Qmp::execute`] sends typed [`command`]s and returns
//! their typed replies. Events that arrive between replies are kept in order and handed out by
//! [`Qmp::wait_event`] / [`Qmp::take_events`]. Every read has a deadline, so a socket that
//! is not answering is an error, not a hang.
//!
//! Why not the `qapi` crate: its generated types follow an older QEMU schema, it is built for
//! async runtimes, and devlend needs eight commands; these types are checked against QEMU 11.1.

#![warn(missing_docs)]

pub mod command;
mod error;
pub mod event;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;

pub use command::Command;
pub use error::{Error, Result};
pub use event::Event;

/// The longest line accepted from QEMU (a `query-pci` of a large machine is tens of KiB).
pub const MAX_LINE_BYTES: usize = 4 << 20;

/// How long [`Qmp::connect`] and [`Qmp::execute`] wait by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The greeting QEMU sends on connect.
#[derive(Clone, Debug, Deserialize)]
pub struct Greeting {
    /// QEMU's version.
    pub version: command::VersionInfo,
    /// Capabilities QEMU offers (none are enabled by this client).
    #[serde(default)]
    pub capabilities: Vec<String>,
}

#[derive(Deserialize)]
struct GreetingLine {
    #[serde(rename = "QMP")]
    qmp: Greeting,
}

/// One message from QEMU: a reply, an error reply or an event.
#[derive(Deserialize)]
struct Message {
    #[serde(default, rename = "return")]
    ret: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<ErrorBody>,
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    id: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ErrorBody {
    class: String,
    desc: String,
}

/// A connection to one QEMU's QMP socket, in command mode.
pub struct Qmp {
    stream: UnixStream,
    path: PathBuf,
    buf: Vec<u8>,
    events: VecDeque<Event>,
    next_id: u64,
    timeout: Duration,
    greeting: Greeting,
}

fn truncate(s: &str) -> String {
    let mut end = s.len().min(200);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

impl Qmp {
    /// Connects to the QMP socket at `path`, checks the greeting and leaves negotiation mode;
    /// every wait (here and in later commands) is at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let stream = UnixStream::connect(path).map_err(|source| Error::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let mut qmp = Self {
            stream,
            path: path.to_path_buf(),
            buf: Vec::new(),
            events: VecDeque::new(),
            next_id: 0,
            timeout,
            greeting: Greeting {
                version: command::VersionInfo {
                    qemu: command::VersionTriple {
                        major: 0,
                        minor: 0,
                        micro: 0,
                    },
                    package: String::new(),
                },
                capabilities: Vec::new(),
            },
        };
        let deadline = Instant::now() + timeout;
        let line = qmp.read_line(deadline, "QEMU's greeting")?;
        let greeting: GreetingLine = serde_json::from_str(&line).map_err(|_| Error::NotQmp {
            path: path.to_path_buf(),
            line: truncate(&line),
        })?;
        qmp.greeting = greeting.qmp;
        qmp.execute(&command::QmpCapabilities)?;
        Ok(qmp)
    }

    /// Like [`Qmp::connect`], but a socket that does not exist yet is waited for, up to
    /// `appear`: QEMU makes its `-qmp unix:PATH,server=on` socket early in its start-up, so a
    /// caller that has just started it (`qemu ... &` then `devlend borrow --vm PATH`) would
    /// otherwise race it. Only a missing path is waited for; a socket nobody listens on (a
    /// QEMU that exited) is an error at once. `waiting` is called with the time waited so far
    /// each time the path was found missing, before the next look (every 50 ms).
    pub fn connect_when_made(
        path: &Path,
        appear: Duration,
        timeout: Duration,
        mut waiting: impl FnMut(Duration),
    ) -> Result<Self> {
        const LOOK_EVERY: Duration = Duration::from_millis(50);
        let start = Instant::now();
        loop {
            match Self::connect(path, timeout) {
                Err(Error::Connect { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    let waited = start.elapsed();
                    let Some(left) = appear.checked_sub(waited).filter(|l| !l.is_zero()) else {
                        return Err(Error::NotMade {
                            path: path.to_path_buf(),
                            after: appear,
                        });
                    };
                    waiting(waited);
                    std::thread::sleep(LOOK_EVERY.min(left));
                }
                other => return other,
            }
        }
    }

    /// The greeting (QEMU's version).
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends `cmd` and waits for its reply; events arriving meanwhile are queued.
    pub fn execute<C: Command>(&mut self, cmd: &C) -> Result<C::Reply> {
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        let mut msg = serde_json::json!({"execute": C::NAME, "id": id});
        if C::HAS_ARGUMENTS {
            msg["arguments"] = serde_json::to_value(cmd).map_err(|source| Error::Parse {
                path: self.path.clone(),
                what: "arguments",
                source,
                line: String::new(),
            })?;
        }
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        self.stream.write_all(&line).map_err(|source| Error::Io {
            path: self.path.clone(),
            what: "sending a command",
            source,
        })?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let line = self.read_line(deadline, C::NAME)?;
            let m: Message = self.parse(&line, "message")?;
            if m.event.is_some() {
                let ev = self.parse(&line, "event")?;
                self.events.push_back(ev);
                continue;
            }
            // Replies to other ids (none are outstanding) are skipped.
            if m.id.as_ref().and_then(|v| v.as_u64()) != Some(id) {
                continue;
            }
            if let Some(e) = m.error {
                return Err(Error::Command {
                    command: C::NAME,
                    class: e.class,
                    desc: e.desc,
                });
            }
            let ret = m.ret.unwrap_or(serde_json::Value::Null);
            return serde_json::from_value(ret).map_err(|source| Error::Parse {
                path: self.path.clone(),
                what: "reply",
                source,
                line: truncate(&line),
            });
        }
    }

    /// Waits at most `timeout` for an event that `want` accepts; queued events come first.
    /// Events `want` rejects stay queued. `Ok(None)` when the time ran out.
    pub fn wait_event(
        &mut self,
        timeout: Duration,
        mut want: impl FnMut(&Event) -> bool,
    ) -> Result<Option<Event>> {
        if let Some(pos) = self.events.iter().position(&mut want) {
            return Ok(self.events.remove(pos));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let line = match self.read_line(deadline, "an event") {
                Ok(l) => l,
                Err(Error::Timeout { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            let m: Message = self.parse(&line, "message")?;
            if m.event.is_none() {
                continue;
            }
            let ev: Event = self.parse(&line, "event")?;
            if want(&ev) {
                return Ok(Some(ev));
            }
            self.events.push_back(ev);
        }
    }

    /// The events queued so far, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    fn parse<T: serde::de::DeserializeOwned>(&self, line: &str, what: &'static str) -> Result<T> {
        serde_json::from_str(line).map_err(|source| Error::Parse {
            path: self.path.clone(),
            what,
            source,
            line: truncate(line),
        })
    }

    /// The next non-empty line, waiting until `deadline`.
    fn read_line(&mut self, deadline: Instant, while_: &'static str) -> Result<String> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let rest = self.buf.split_off(pos + 1);
                let line = std::mem::replace(&mut self.buf, rest);
                let text = String::from_utf8_lossy(&line).trim().to_string();
                if text.is_empty() {
                    continue;
                }
                return Ok(text);
            }
            if self.buf.len() > MAX_LINE_BYTES {
                return Err(Error::LineTooLong {
                    path: self.path.clone(),
                    max_bytes: MAX_LINE_BYTES,
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = || Error::Timeout {
                path: self.path.clone(),
                while_,
                after: self.timeout,
            };
            if left.is_zero() {
                return Err(timeout());
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|source| Error::Io {
                    path: self.path.clone(),
                    what: "setting a read timeout",
                    source,
                })?;
            let mut chunk = [0u8; 16 << 10];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(Error::Closed {
                        path: self.path.clone(),
                        while_,
                    })
                }
                Ok(n) => self.buf.extend_from_slice(chunk.get(..n).unwrap_or(&[])),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(timeout())
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(Error::Io {
                        path: self.path.clone(),
                        what: "reading",
                        source,
                    })
                }
            }
        }
    }
}
