//! The wire format: typed frames, an encoder, and a pure parser for untrusted bytes.
//!
//! Every frame is an 8-byte header followed by its payload (all integers little-endian):
//!
//! ```text
//! +------+------+-----------+-------------------+----------------
//! | kind | 0    | 0 (u16)   | payload len (u32) | payload ...
//! +------+------+-----------+-------------------+----------------
//! ```
//!
//! [`parse`] never panics: a buffer that does not yet hold a whole frame is `Ok(None)`, anything
//! malformed (unknown kind, non-zero reserved bytes, a length that does not fit the kind, a
//! payload over [`MAX_PAYLOAD`]) is a [`FrameError`], which ends the connection.

/// Bytes of the frame header.
pub const HEADER_LEN: usize = 8;
/// Most data bytes one write frame carries, and most one read asks for.
pub const MAX_DATA: usize = 64 * 1024;
/// Largest payload of any frame (a write of [`MAX_DATA`] bytes plus its addressing).
pub const MAX_PAYLOAD: usize = MAX_DATA + 16;
/// Protocol version carried in [`Hello`].
pub const VERSION: u16 = 1;
/// Most memory windows a [`Hello`] may describe.
pub const MAX_WINDOWS: usize = 64;

mod kind {
    pub const HELLO: u8 = 1;
    pub const PING: u8 = 2;
    pub const TRANS: u8 = 3;
    pub const WRITE: u8 = 4;
    pub const READ: u8 = 5;
    pub const DB_SET: u8 = 6;
    pub const SPAD_WRITE: u8 = 7;
    pub const SPAD_READ: u8 = 8;
    pub const MSG_WRITE: u8 = 9;
    pub const REPLY: u8 = 10;
}

/// Why bytes from the peer are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The connection ended inside a frame.
    #[error("connection ended inside a frame ({have} bytes of it received)")]
    Truncated {
        /// Bytes of the incomplete frame that did arrive.
        have: usize,
    },
    /// A frame kind this version does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Reserved header bytes were not zero.
    #[error("reserved header bytes are not zero")]
    Reserved,
    /// The payload is larger than any frame may be.
    #[error("payload of {len} bytes exceeds the limit of {MAX_PAYLOAD}")]
    Oversized {
        /// Announced payload length.
        len: u64,
    },
    /// The payload length does not fit the frame kind.
    #[error("{kind} frame with a payload of {len} bytes")]
    BadLength {
        /// Frame kind name.
        kind: &'static str,
        /// Payload length.
        len: usize,
    },
    /// A reply status code this version does not know.
    #[error("unknown reply status {0}")]
    BadStatus(u8),
    /// A hello that describes more windows than allowed.
    #[error("hello describes {0} windows (at most {MAX_WINDOWS})")]
    TooManyWindows(usize),
}

/// Outcome of a request, carried in a [`Frame::Reply`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// The window has no translation.
    NotTranslated = 1,
    /// The access runs past the window's translated size.
    OutsideWindow = 2,
    /// The window, scratchpad or message register does not exist.
    NoSuchIndex = 3,
    /// The message register still holds an unread message.
    MessageBusy = 4,
    /// The translation points at bus addresses that are no longer one region.
    NoRegion = 5,
    /// The access size is not supported.
    BadAccess = 6,
}

impl Status {
    fn from_u8(v: u8) -> Result<Self, FrameError> {
        Ok(match v {
            0 => Status::Ok,
            1 => Status::NotTranslated,
            2 => Status::OutsideWindow,
            3 => Status::NoSuchIndex,
            4 => Status::MessageBusy,
            5 => Status::NoRegion,
            6 => Status::BadAccess,
            other => return Err(FrameError::BadStatus(other)),
        })
    }
}

/// What each side announces first: its geometry and its current translations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// [`VERSION`] of the sender.
    pub version: u16,
    /// Number of scratchpads of the sender.
    pub spad_count: u16,
    /// Number of message registers of the sender.
    pub msg_count: u16,
    /// Valid doorbell bits of the sender.
    pub db_valid_mask: u64,
    /// Translated size of each inbound window of the sender (0: untranslated); its length is
    /// the sender's window count.
    pub window_sizes: Vec<u64>,
}

/// One frame, borrowing its data from the receive buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// First frame on a connection, both ways.
    Hello(Hello),
    /// Keepalive; carries nothing.
    Ping,
    /// The sender (re)translated or cleared (`size == 0`) one of its inbound windows.
    Trans {
        /// Window index.
        window: u16,
        /// New translated size.
        size: u64,
    },
    /// A posted write into the receiver's window.
    Write {
        /// Window index.
        window: u16,
        /// Offset inside the window.
        offset: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// A non-posted read of the receiver's window; answered by a [`Frame::Reply`] with the data.
    Read {
        /// Request tag echoed in the reply.
        tag: u32,
        /// Window index.
        window: u16,
        /// Offset inside the window.
        offset: u64,
        /// Bytes to read (1 to [`MAX_DATA`]).
        len: u32,
    },
    /// Sets bits in the receiver's doorbell register.
    DbSet {
        /// Bits to set.
        bits: u64,
    },
    /// Writes one of the receiver's scratchpads.
    SpadWrite {
        /// Scratchpad index.
        index: u16,
        /// Value.
        value: u32,
    },
    /// Reads one of the receiver's scratchpads; answered with 4 bytes of data.
    SpadRead {
        /// Request tag.
        tag: u32,
        /// Scratchpad index.
        index: u16,
    },
    /// Writes one of the receiver's inbound message registers; answered with a status.
    MsgWrite {
        /// Request tag.
        tag: u32,
        /// Register index.
        index: u16,
        /// Value.
        value: u32,
    },
    /// The answer to a `Read`, `SpadRead` or `MsgWrite`.
    Reply {
        /// Tag of the request.
        tag: u32,
        /// Outcome.
        status: Status,
        /// Data (reads only).
        data: &'a [u8],
    },
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).and_then(|b| b.first().copied())
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .and_then(|b| b.try_into().ok())
            .map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }
}

/// Parses one frame from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame (read more), or the frame and
/// the number of bytes it used. Never panics, whatever `buf` holds.
pub fn parse(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    let mut r = Reader { buf };
    let (Some(kind), Some(r0), Some(r1), Some(len)) = (r.u8(), r.u8(), r.u16(), r.u32()) else {
        return Ok(None);
    };
    if r0 != 0 || r1 != 0 {
        return Err(FrameError::Reserved);
    }
    if len as usize > MAX_PAYLOAD {
        return Err(FrameError::Oversized { len: len.into() });
    }
    let len = len as usize;
    let Some(payload) = r.take(len) else {
        return Ok(None);
    };
    let frame = parse_payload(kind, payload)?;
    Ok(Some((frame, HEADER_LEN + len)))
}

fn parse_payload(kind: u8, payload: &[u8]) -> Result<Frame<'_>, FrameError> {
    let len = payload.len();
    let mut r = Reader { buf: payload };
    let bad = |name: &'static str| FrameError::BadLength { kind: name, len };
    // Fixed-size frames: parse the fields, then require that nothing is left over.
    let exact = |r: &Reader<'_>, name: &'static str| {
        if r.buf.is_empty() {
            Ok(())
        } else {
            Err(bad(name))
        }
    };
    let frame = match kind {
        kind::HELLO => {
            let (Some(version), Some(spad_count), Some(msg_count), Some(n), Some(db)) =
                (r.u16(), r.u16(), r.u16(), r.u16(), r.u64())
            else {
                return Err(bad("hello"));
            };
            let n = usize::from(n);
            if n > MAX_WINDOWS {
                return Err(FrameError::TooManyWindows(n));
            }
            let mut window_sizes = Vec::with_capacity(n);
            for _ in 0..n {
                window_sizes.push(r.u64().ok_or_else(|| bad("hello"))?);
            }
            exact(&r, "hello")?;
            Frame::Hello(Hello {
                version,
                spad_count,
                msg_count,
                db_valid_mask: db,
                window_sizes,
            })
        }
        kind::PING => {
            exact(&r, "ping")?;
            Frame::Ping
        }
        kind::TRANS => {
            let (Some(window), Some(size)) = (r.u16(), r.u64()) else {
                return Err(bad("trans"));
            };
            exact(&r, "trans")?;
            Frame::Trans { window, size }
        }
        kind::WRITE => {
            let (Some(window), Some(offset)) = (r.u16(), r.u64()) else {
                return Err(bad("write"));
            };
            let data = r.buf;
            if data.is_empty() || data.len() > MAX_DATA {
                return Err(bad("write"));
            }
            Frame::Write {
                window,
                offset,
                data,
            }
        }
        kind::READ => {
            let (Some(tag), Some(window), Some(offset), Some(rlen)) =
                (r.u32(), r.u16(), r.u64(), r.u32())
            else {
                return Err(bad("read"));
            };
            exact(&r, "read")?;
            if rlen == 0 || rlen as usize > MAX_DATA {
                return Err(bad("read"));
            }
            Frame::Read {
                tag,
                window,
                offset,
                len: rlen,
            }
        }
        kind::DB_SET => {
            let bits = r.u64().ok_or_else(|| bad("doorbell"))?;
            exact(&r, "doorbell")?;
            Frame::DbSet { bits }
        }
        kind::SPAD_WRITE => {
            let (Some(index), Some(value)) = (r.u16(), r.u32()) else {
                return Err(bad("spad write"));
            };
            exact(&r, "spad write")?;
            Frame::SpadWrite { index, value }
        }
        kind::SPAD_READ => {
            let (Some(tag), Some(index)) = (r.u32(), r.u16()) else {
                return Err(bad("spad read"));
            };
            exact(&r, "spad read")?;
            Frame::SpadRead { tag, index }
        }
        kind::MSG_WRITE => {
            let (Some(tag), Some(index), Some(value)) = (r.u32(), r.u16(), r.u32()) else {
                return Err(bad("message write"));
            };
            exact(&r, "message write")?;
            Frame::MsgWrite { tag, index, value }
        }
        kind::REPLY => {
            let (Some(tag), Some(status)) = (r.u32(), r.u8()) else {
                return Err(bad("reply"));
            };
            let status = Status::from_u8(status)?;
            let data = r.buf;
            if data.len() > MAX_DATA {
                return Err(bad("reply"));
            }
            Frame::Reply { tag, status, data }
        }
        other => return Err(FrameError::UnknownKind(other)),
    };
    Ok(frame)
}

/// Bytes of a write frame before its data.
pub const WRITE_HEADER_LEN: usize = HEADER_LEN + 10;

/// A write frame that arrived split after its header (the TLS sender seals each write's data
/// in a record of its own): `head` holds exactly the header of a write frame, `tail` starts
/// with its data. Returns the frame, its data borrowed from `tail`, and the bytes of `tail` it
/// used. `None` whenever that is not the case (then gather `head` and `tail` and [`parse`]
/// them, which also reports what is wrong); when `Some`, [`parse`] of the two gathered gives
/// the same frame.
pub fn split_write<'a>(head: &[u8], tail: &'a [u8]) -> Option<(Frame<'a>, usize)> {
    let mut r = Reader { buf: head };
    let (kind, r0, r1, len, window, offset) =
        (r.u8()?, r.u8()?, r.u16()?, r.u32()?, r.u16()?, r.u64()?);
    if kind != kind::WRITE || r0 != 0 || r1 != 0 || !r.buf.is_empty() {
        return None;
    }
    let n = (len as usize).checked_sub(10)?;
    if n == 0 || n > MAX_DATA {
        return None;
    }
    let data = tail.get(..n)?;
    Some((
        Frame::Write {
            window,
            offset,
            data,
        },
        n,
    ))
}

/// The header of a write frame of `len` data bytes (1 to [`MAX_DATA`]): send it followed by
/// the data, without copying the data into a frame buffer.
pub fn write_header(window: u16, offset: u64, len: usize) -> [u8; WRITE_HEADER_LEN] {
    let mut h = Vec::with_capacity(WRITE_HEADER_LEN);
    header(&mut h, kind::WRITE, 10 + len);
    h.extend_from_slice(&window.to_le_bytes());
    h.extend_from_slice(&offset.to_le_bytes());
    let mut out = [0u8; WRITE_HEADER_LEN];
    out.copy_from_slice(&h);
    out
}

fn header(out: &mut Vec<u8>, kind: u8, len: usize) {
    out.push(kind);
    out.extend_from_slice(&[0, 0, 0]);
    // Callers never build a payload over MAX_PAYLOAD, which fits in u32.
    out.extend_from_slice(&(len as u32).to_le_bytes());
}

impl Frame<'_> {
    /// Appends the encoded frame to `out`. The caller keeps data within [`MAX_DATA`] and
    /// window lists within [`MAX_WINDOWS`] (the parser rejects anything larger).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Hello(h) => {
                header(out, kind::HELLO, 16 + 8 * h.window_sizes.len());
                out.extend_from_slice(&h.version.to_le_bytes());
                out.extend_from_slice(&h.spad_count.to_le_bytes());
                out.extend_from_slice(&h.msg_count.to_le_bytes());
                out.extend_from_slice(&(h.window_sizes.len() as u16).to_le_bytes());
                out.extend_from_slice(&h.db_valid_mask.to_le_bytes());
                for s in &h.window_sizes {
                    out.extend_from_slice(&s.to_le_bytes());
                }
            }
            Frame::Ping => header(out, kind::PING, 0),
            Frame::Trans { window, size } => {
                header(out, kind::TRANS, 10);
                out.extend_from_slice(&window.to_le_bytes());
                out.extend_from_slice(&size.to_le_bytes());
            }
            Frame::Write {
                window,
                offset,
                data,
            } => {
                header(out, kind::WRITE, 10 + data.len());
                out.extend_from_slice(&window.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(data);
            }
            Frame::Read {
                tag,
                window,
                offset,
                len,
            } => {
                header(out, kind::READ, 18);
                out.extend_from_slice(&tag.to_le_bytes());
                out.extend_from_slice(&window.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
            }
            Frame::DbSet { bits } => {
                header(out, kind::DB_SET, 8);
                out.extend_from_slice(&bits.to_le_bytes());
            }
            Frame::SpadWrite { index, value } => {
                header(out, kind::SPAD_WRITE, 6);
                out.extend_from_slice(&index.to_le_bytes());
                out.extend_from_slice(&value.to_le_bytes());
            }
            Frame::SpadRead { tag, index } => {
                header(out, kind::SPAD_READ, 6);
                out.extend_from_slice(&tag.to_le_bytes());
                out.extend_from_slice(&index.to_le_bytes());
            }
            Frame::MsgWrite { tag, index, value } => {
                header(out, kind::MSG_WRITE, 10);
                out.extend_from_slice(&tag.to_le_bytes());
                out.extend_from_slice(&index.to_le_bytes());
                out.extend_from_slice(&value.to_le_bytes());
            }
            Frame::Reply { tag, status, data } => {
                header(out, kind::REPLY, 5 + data.len());
                out.extend_from_slice(&tag.to_le_bytes());
                out.push(*status as u8);
                out.extend_from_slice(data);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_split_after_its_header_parses_as_the_whole() {
        let frame = Frame::Write {
            window: 3,
            offset: 0x1234_5678,
            data: &[9u8; 300],
        };
        let mut bytes = Vec::new();
        frame.encode(&mut bytes);
        bytes.extend_from_slice(b"next");
        let (head, tail) = bytes.split_at(WRITE_HEADER_LEN);
        let (f, used) = split_write(head, tail).unwrap();
        assert_eq!((f, used), (frame.clone(), 300));
        let (whole, n) = parse(&bytes).unwrap().unwrap();
        assert_eq!((whole, n), (frame, WRITE_HEADER_LEN + 300));
        // Not all of the data yet, a header cut elsewhere, or another kind of frame: gather.
        assert_eq!(split_write(head, &tail[..299]), None);
        let (short, long) = (WRITE_HEADER_LEN - 1, WRITE_HEADER_LEN + 1);
        assert_eq!(split_write(&bytes[..short], &bytes[short..]), None);
        assert_eq!(split_write(&bytes[..long], &bytes[long..]), None);
        let mut ping = Vec::new();
        Frame::Ping.encode(&mut ping);
        ping.resize(WRITE_HEADER_LEN, 0);
        assert_eq!(split_write(&ping, &[0; 64]), None);
    }

    fn samples() -> Vec<Frame<'static>> {
        vec![
            Frame::Hello(Hello {
                version: VERSION,
                spad_count: 16,
                msg_count: 4,
                db_valid_mask: 0xffff,
                window_sizes: vec![0, 4096, 1 << 20],
            }),
            Frame::Ping,
            Frame::Trans {
                window: 3,
                size: 8192,
            },
            Frame::Write {
                window: 1,
                offset: 0x1234,
                data: b"hello",
            },
            Frame::Read {
                tag: 7,
                window: 2,
                offset: 99,
                len: 4096,
            },
            Frame::DbSet { bits: 0b101 },
            Frame::SpadWrite {
                index: 3,
                value: 0xdead_beef,
            },
            Frame::SpadRead { tag: 1, index: 2 },
            Frame::MsgWrite {
                tag: 9,
                index: 1,
                value: 42,
            },
            Frame::Reply {
                tag: 9,
                status: Status::MessageBusy,
                data: b"",
            },
            Frame::Reply {
                tag: 10,
                status: Status::Ok,
                data: b"abcd",
            },
        ]
    }

    #[test]
    fn every_frame_round_trips_and_every_prefix_is_incomplete() {
        for f in samples() {
            let mut buf = Vec::new();
            f.encode(&mut buf);
            assert_eq!(parse(&buf), Ok(Some((f.clone(), buf.len()))));
            for cut in 0..buf.len() {
                assert_eq!(parse(&buf[..cut]), Ok(None), "{f:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn malformed_frames_are_errors() {
        let table: &[(&[u8], FrameError)] = &[
            (&[99, 0, 0, 0, 0, 0, 0, 0], FrameError::UnknownKind(99)),
            (&[2, 1, 0, 0, 0, 0, 0, 0], FrameError::Reserved),
            (
                &[4, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
                FrameError::Oversized {
                    len: u64::from(u32::MAX),
                },
            ),
            (
                &[2, 0, 0, 0, 1, 0, 0, 0, 0],
                FrameError::BadLength {
                    kind: "ping",
                    len: 1,
                },
            ),
            (
                &[6, 0, 0, 0, 4, 0, 0, 0, 1, 2, 3, 4],
                FrameError::BadLength {
                    kind: "doorbell",
                    len: 4,
                },
            ),
            (
                // a write with no data
                &[4, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                FrameError::BadLength {
                    kind: "write",
                    len: 10,
                },
            ),
            (
                &[10, 0, 0, 0, 5, 0, 0, 0, 1, 0, 0, 0, 77],
                FrameError::BadStatus(77),
            ),
            (
                // hello announcing 65 windows
                &[
                    1, 0, 0, 0, 16, 0, 0, 0, 1, 0, 0, 0, 0, 0, 65, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                ],
                FrameError::TooManyWindows(65),
            ),
        ];
        for (bytes, want) in table {
            assert_eq!(parse(bytes).as_ref().err(), Some(want), "{bytes:?}");
        }
    }

    #[test]
    fn a_write_header_plus_data_is_a_write_frame() {
        let mut buf = write_header(3, 0x99, 5).to_vec();
        buf.extend_from_slice(b"hello");
        let mut want = Vec::new();
        Frame::Write {
            window: 3,
            offset: 0x99,
            data: b"hello",
        }
        .encode(&mut want);
        assert_eq!(buf, want);
    }

    #[test]
    fn reads_of_zero_or_too_many_bytes_are_errors() {
        for len in [0u32, MAX_DATA as u32 + 1] {
            let mut buf = Vec::new();
            Frame::Read {
                tag: 1,
                window: 0,
                offset: 0,
                len,
            }
            .encode(&mut buf);
            assert!(matches!(parse(&buf), Err(FrameError::BadLength { .. })));
        }
    }
}
