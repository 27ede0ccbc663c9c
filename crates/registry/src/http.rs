//! The little HTTP/1.1 client the etcd JSON gateway needs: one POST per connection
//! (`Connection: close`), bodies by `Content-Length`, chunks, or up to the end of the stream.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The largest header block or unary body accepted from a server.
const MAX_HEAD_BYTES: usize = 64 << 10;
const MAX_BODY_BYTES: usize = 64 << 20;

/// What went wrong talking HTTP.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The TCP connection could not be made (nothing was sent).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The exchange failed after connecting.
    #[error("talking to {addr}: {source}")]
    Io {
        /// Where.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The server's answer is not HTTP/1.1 as expected.
    #[error("{addr} answered malformed HTTP: {reason}")]
    Malformed {
        /// Who.
        addr: SocketAddr,
        /// What.
        reason: String,
    },
}

/// How the body of a response is delimited.
enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

/// A response whose body is still on the wire.
pub struct Streaming {
    /// The HTTP status code.
    pub status: u16,
    /// The body, de-chunked.
    pub body: Body,
    /// A handle on the connection, to shut it down from another thread.
    pub socket: TcpStream,
}

/// A response body as a reader.
pub struct Body {
    inner: BufReader<TcpStream>,
    framing: Framing,
    /// Bytes left in the current chunk (chunked framing).
    chunk_left: u64,
    done: bool,
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        match self.framing {
            Framing::UntilClose => self.inner.read(buf),
            Framing::Length(ref mut left) => {
                let want = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                if want == 0 {
                    self.done = true;
                    return Ok(0);
                }
                let n = self.inner.read(buf.get_mut(..want).unwrap_or_default())?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "body shorter than Content-Length",
                    ));
                }
                *left = left.saturating_sub(n as u64);
                Ok(n)
            }
            Framing::Chunked => {
                if self.chunk_left == 0 {
                    let line = read_line(&mut self.inner)?;
                    let size = line.split(';').next().unwrap_or_default().trim();
                    let size = u64::from_str_radix(size, 16).map_err(|_| {
                        io::Error::new(io::ErrorKind::InvalidData, "bad chunk size")
                    })?;
                    if size == 0 {
                        // Trailers, then the blank line.
                        while !read_line(&mut self.inner)?.is_empty() {}
                        self.done = true;
                        return Ok(0);
                    }
                    self.chunk_left = size;
                }
                let want = usize::try_from(self.chunk_left)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                let n = self.inner.read(buf.get_mut(..want).unwrap_or_default())?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "stream ended inside a chunk",
                    ));
                }
                self.chunk_left = self.chunk_left.saturating_sub(n as u64);
                if self.chunk_left == 0 && !read_line(&mut self.inner)?.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "chunk not followed by CRLF",
                    ));
                }
                Ok(n)
            }
        }
    }
}

/// Reads one CRLF- (or LF-) terminated line, bounded.
fn read_line(r: &mut BufReader<TcpStream>) -> io::Result<String> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(MAX_HEAD_BYTES as u64)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))
}

/// Sends `POST path` with a JSON body and returns the status and the body as a stream.
/// `timeout` bounds the connect and every read and write (`None` for reads: wait forever, for
/// watches).
pub fn post_streaming(
    addr: SocketAddr,
    host: &str,
    path: &str,
    body: &[u8],
    connect_timeout: Duration,
    read_timeout: Option<Duration>,
) -> Result<Streaming, HttpError> {
    let socket = TcpStream::connect_timeout(&addr, connect_timeout)
        .map_err(|source| HttpError::Connect { addr, source })?;
    let io_err = |source| HttpError::Io { addr, source };
    let malformed = |reason: &str| HttpError::Malformed {
        addr,
        reason: reason.to_string(),
    };
    socket.set_nodelay(true).map_err(io_err)?;
    socket
        .set_write_timeout(Some(connect_timeout))
        .map_err(io_err)?;
    socket.set_read_timeout(read_timeout).map_err(io_err)?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    (&socket).write_all(&request).map_err(io_err)?;
    let mut inner = BufReader::new(socket.try_clone().map_err(io_err)?);
    let status_line = read_line(&mut inner).map_err(io_err)?;
    let mut parts = status_line.split_whitespace();
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(malformed("no HTTP/1.x status line"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| malformed("no status code"))?;
    let mut framing = Framing::UntilClose;
    let mut head_bytes = 0usize;
    loop {
        let line = read_line(&mut inner).map_err(io_err)?;
        head_bytes = head_bytes.saturating_add(line.len());
        if head_bytes > MAX_HEAD_BYTES {
            return Err(malformed("header block too large"));
        }
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(malformed("header line without ':'"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            framing = Framing::Chunked;
        } else if name.eq_ignore_ascii_case("content-length")
            && !matches!(framing, Framing::Chunked)
        {
            let n = value.parse().map_err(|_| malformed("bad Content-Length"))?;
            framing = Framing::Length(n);
        }
    }
    Ok(Streaming {
        status,
        body: Body {
            inner,
            framing,
            chunk_left: 0,
            done: false,
        },
        socket,
    })
}

/// Sends `POST path` and reads the whole answer (at most 64 MiB).
pub fn post(
    addr: SocketAddr,
    host: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<(u16, Vec<u8>), HttpError> {
    let mut s = post_streaming(addr, host, path, body, timeout, Some(timeout))?;
    let mut out = Vec::new();
    s.body
        .by_ref()
        .take(MAX_BODY_BYTES as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|source| HttpError::Io { addr, source })?;
    if out.len() > MAX_BODY_BYTES {
        return Err(HttpError::Malformed {
            addr,
            reason: "body larger than 64 MiB".into(),
        });
    }
    Ok((s.status, out))
}
