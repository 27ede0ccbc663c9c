//! TLS 1.3 record protection after the handshake (RFC 8446 §5.2–5.4, key updates §4.6.3).
//!
//! rustls does the handshake and the key schedule; once the connection is established its
//! traffic secrets are taken over here (rustls's "kernel connection" API, made for kTLS), and
//! this module seals and opens application records itself. Why not let rustls do it: its
//! buffered API copies every byte twice more on each side, and one TLS state shared by the
//! sending and the receiving threads serialises them. Here the two directions have separate
//! keys and locks, a record is sealed in place in the buffer that goes to the socket, and
//! opened in place in the buffer it was received into.
//!
//! The wire format is plain TLS 1.3: `type 23, version 0x0303, length` then the AEAD of the
//! content followed by its real content type, nonce = IV xor sequence number, the header as
//! associated data. Keys are updated (a `KeyUpdate` handshake message, then the next traffic
//! secret from rustls) long before the cipher's confidentiality limit; the peer's updates are
//! followed, and answered when it asks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::ConnectionTrafficSecrets;

use crate::frame::WRITE_HEADER_LEN;
use devlend_sync::lock;

/// Most content bytes in one record.
pub(crate) const MAX_PLAINTEXT: usize = 1 << 14;
/// Record header: type, legacy version, length.
pub(crate) const HEADER_LEN: usize = 5;
const TAG_LEN: usize = 16;
/// Most bytes after the header that a record may carry (RFC 8446 §5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Most bytes of one record on the wire.
pub(crate) const MAX_RECORD: usize = HEADER_LEN + MAX_CIPHERTEXT;

const APPLICATION_DATA: u8 = 23;
const HANDSHAKE: u8 = 22;
const ALERT: u8 = 21;
const KEY_UPDATE: u8 = 24;
const NEW_SESSION_TICKET: u8 = 4;
const CLOSE_NOTIFY: u8 = 0;
/// Alert: the peer's certificate is not acceptable (RFC 8446 §6.2).
pub(crate) const BAD_CERTIFICATE: u8 = 42;

/// Records sealed under one key before it is replaced: far below the AES-GCM confidentiality
/// limit (2^24.5 full records, RFC 8446 §5.5).
const UPDATE_AFTER: u64 = 1 << 22;

/// Bad records from the peer, or a key update that could not be done.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A record type other than application data after the handshake.
    #[error("record of type {0} after the handshake")]
    Type(u8),
    /// A record longer than TLS 1.3 allows.
    #[error("record of {0} bytes (at most {MAX_CIPHERTEXT})")]
    Overflow(usize),
    /// The record did not authenticate (tampered, reordered, or a wrong key).
    #[error("record failed authentication")]
    Auth,
    /// The record's content was all padding.
    #[error("record without a content type")]
    NoContentType,
    /// The peer sent an alert other than close_notify.
    #[error("peer sent TLS alert {0}")]
    Alert(u8),
    /// A post-handshake message that is malformed or not allowed.
    #[error("bad post-handshake message: {0}")]
    Handshake(&'static str),
    /// rustls could not derive the next traffic secret.
    #[error("key update: {0}")]
    KeyUpdate(rustls::Error),
    /// This side asked for a record over the TLS limit (a bug: never the peer's doing).
    #[error("a record of {0} plaintext bytes (at most {MAX_PLAINTEXT} and its type)")]
    TooLarge(usize),
    /// A cipher suite this record layer does not implement.
    #[error("cipher suite not supported by the record layer")]
    Suite,
}

/// rustls's remaining connection state: it computes the next traffic secrets.
pub(crate) enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
    /// Fixed keys without a key schedule (fuzzing): a key update is an error.
    #[cfg(feature = "fuzzing")]
    Fixed,
}

impl Kernel {
    fn next(&mut self, tx: bool) -> Result<(u64, ConnectionTrafficSecrets), RecordError> {
        let r = match (self, tx) {
            (Kernel::Client(k), true) => k.update_tx_secret(),
            (Kernel::Client(k), false) => k.update_rx_secret(),
            (Kernel::Server(k), true) => k.update_tx_secret(),
            (Kernel::Server(k), false) => k.update_rx_secret(),
            #[cfg(feature = "fuzzing")]
            (Kernel::Fixed, _) => Err(rustls::Error::General("no key schedule".into())),
        };
        r.map_err(RecordError::KeyUpdate)
    }
}

/// One direction's key, IV and sequence number.
struct Keys {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl Keys {
    fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<Self, RecordError> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(RecordError::Suite),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| RecordError::Suite)?;
        let iv: [u8; aead::NONCE_LEN] = iv.as_ref().try_into().map_err(|_| RecordError::Suite)?;
        Ok(Self {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The nonce of the next record (IV xor the sequence number), advancing the number.
    fn next_nonce(&mut self) -> Nonce {
        let mut n = self.iv;
        for (b, s) in n.iter_mut().rev().zip(self.seq.to_le_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Nonce::assume_unique_for_key(n)
    }
}

fn header(len: usize) -> [u8; HEADER_LEN] {
    let l = (len as u16).to_be_bytes();
    [APPLICATION_DATA, 3, 3, l[0], l[1]]
}

/// Bytes for the socket, in a buffer whose room past them stays initialised from earlier use:
/// records are sealed straight into that room, without zero-filling it first (zero-filling
/// costs as much as the copy that sealing in place needs). Derefs to the bytes held.
#[derive(Clone, Debug, Default)]
pub(crate) struct WireBuf {
    /// Initialised up to its length; `len` bytes are held.
    buf: Vec<u8>,
    len: usize,
}

impl WireBuf {
    /// `n` more bytes at the end, to be written (they hold stale bytes, not zeroes).
    pub(crate) fn grow(&mut self, n: usize) -> &mut [u8] {
        let end = self.len + n;
        if self.buf.len() < end {
            self.buf.resize(end.max(2 * self.buf.len()), 0);
        }
        let start = std::mem::replace(&mut self.len, end);
        self.buf.get_mut(start..end).unwrap_or_default()
    }

    pub(crate) fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.grow(bytes.len()).copy_from_slice(bytes);
    }

    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }

    /// Drops the first `n` bytes (those sent).
    pub(crate) fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        self.buf.copy_within(n..self.len, 0);
        self.len -= n;
    }
}

impl std::ops::Deref for WireBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

impl std::ops::DerefMut for WireBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.buf.get_mut(..self.len).unwrap_or_default()
    }
}

/// The sending direction.
pub(crate) struct Sealer {
    keys: Keys,
    kernel: Arc<Mutex<Kernel>>,
    /// The peer asked for our key to be updated (set by the [`Opener`]).
    asked: Arc<AtomicBool>,
    update_after: u64,
}

/// What [`Opener::open`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Opened {
    /// Bytes of whole records used (a partial record stays for the next call).
    pub(crate) consumed: usize,
    /// The peer sent close_notify: nothing more will come.
    pub(crate) closed: bool,
    /// The peer asked for a key update: something must be sent soon (even nothing, sealed).
    pub(crate) answer: bool,
}

/// The receiving direction.
pub(crate) struct Opener {
    keys: Keys,
    kernel: Arc<Mutex<Kernel>>,
    asked: Arc<AtomicBool>,
}

/// The two directions of an established connection.
pub(crate) fn split(
    kernel: Kernel,
    tx: (u64, ConnectionTrafficSecrets),
    rx: (u64, ConnectionTrafficSecrets),
) -> Result<(Sealer, Opener), RecordError> {
    let kernel = Arc::new(Mutex::new(kernel));
    let asked = Arc::new(AtomicBool::new(false));
    Ok((
        Sealer {
            keys: Keys::new(tx.0, &tx.1)?,
            kernel: kernel.clone(),
            asked: asked.clone(),
            update_after: UPDATE_AFTER,
        },
        Opener {
            keys: Keys::new(rx.0, &rx.1)?,
            kernel,
            asked,
        },
    ))
}

impl Sealer {
    /// Appends to `wire` the records carrying the concatenation of `parts`, each record as
    /// full as possible; and a key update first when one is due.
    pub(crate) fn seal(&mut self, parts: &[&[u8]], wire: &mut WireBuf) -> Result<(), RecordError> {
        self.update_if_due(wire)?;
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut part = 0;
        let mut at = 0;
        let mut left = total;
        while left > 0 {
            let take = left.min(MAX_PLAINTEXT);
            let start = wire.len();
            wire.extend_from_slice(&header(take + 1 + TAG_LEN));
            let mut need = take;
            while need > 0 {
                let Some(p) = parts.get(part) else { break };
                let chunk = need.min(p.len() - at);
                wire.extend_from_slice(p.get(at..at + chunk).unwrap_or_default());
                need -= chunk;
                at += chunk;
                if at == p.len() {
                    part += 1;
                    at = 0;
                }
            }
            wire.extend_from_slice(&[APPLICATION_DATA]);
            self.seal_tail(start, wire)?;
            left -= take;
        }
        Ok(())
    }

    /// Appends records carrying `head` (encoded frames) and then the write frames `frames`
    /// (header, data): each data part is sealed from where it lies, never copied first, in a
    /// record of its own that also carries the next frame's header. A data part may fill a
    /// record but for a frame header ([`MAX_PLAINTEXT`] minus [`WRITE_HEADER_LEN`] bytes).
    pub(crate) fn seal_writes(
        &mut self,
        head: &[u8],
        frames: &[([u8; WRITE_HEADER_LEN], &[u8])],
        wire: &mut WireBuf,
    ) -> Result<(), RecordError> {
        let Some(((first, _), _)) = frames.split_first() else {
            return self.seal(&[head], wire);
        };
        self.seal(&[head, first], wire)?;
        for (i, (_, data)) in frames.iter().enumerate() {
            let next = frames
                .get(i + 1)
                .map(|(h, _)| h.as_slice())
                .unwrap_or_default();
            self.seal_data(data, next, wire)?;
        }
        Ok(())
    }

    /// One record carrying `data`, sealed out of place into `wire`, then `after` (a frame
    /// header, or nothing).
    fn seal_data(
        &mut self,
        data: &[u8],
        after: &[u8],
        wire: &mut WireBuf,
    ) -> Result<(), RecordError> {
        self.update_if_due(wire)?;
        let mut extra = [0u8; WRITE_HEADER_LEN + 1];
        let extra = extra
            .get_mut(..after.len() + 1)
            .ok_or(RecordError::TooLarge(after.len()))?;
        let (tail, kind) = extra.split_at_mut(after.len());
        tail.copy_from_slice(after);
        kind[0] = APPLICATION_DATA;
        let inner = data.len() + extra.len();
        if inner > MAX_PLAINTEXT + 1 {
            return Err(RecordError::TooLarge(inner));
        }
        let head = header(inner + TAG_LEN);
        wire.extend_from_slice(&head);
        let body = wire.grow(inner + TAG_LEN);
        let (out, extra_out) = body.split_at_mut(data.len());
        let nonce = self.keys.next_nonce();
        self.keys
            .key
            .seal_out_of_place_scatter(nonce, Aad::from(head), data, out, extra, extra_out)
            .map_err(|_| RecordError::Auth)
    }

    /// Sends a key update first when one is due (by count, or asked for by the peer).
    fn update_if_due(&mut self, wire: &mut WireBuf) -> Result<(), RecordError> {
        if self.keys.seq >= self.update_after || self.asked.swap(false, Ordering::AcqRel) {
            self.update(wire)?;
        }
        Ok(())
    }

    /// Seals the record whose header starts at `start` of `wire` and whose inner plaintext
    /// (content and type) follows it up to the end; appends the tag.
    fn seal_tail(&mut self, start: usize, wire: &mut WireBuf) -> Result<(), RecordError> {
        let nonce = self.keys.next_nonce();
        let (head, body) = wire.split_at_mut(start + HEADER_LEN);
        let aad: [u8; HEADER_LEN] = head
            .get(start..)
            .and_then(|h| h.try_into().ok())
            .ok_or(RecordError::Handshake("record header"))?;
        let tag = self
            .keys
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(aad), body)
            .map_err(|_| RecordError::Auth)?;
        wire.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Appends a fatal alert (`description`, RFC 8446 §6) to `wire`.
    pub(crate) fn alert(&mut self, description: u8, wire: &mut WireBuf) -> Result<(), RecordError> {
        self.seal_record(ALERT, &[2, description], wire)
    }

    /// Appends one record of inner content type `kind` carrying `content` (at most
    /// [`MAX_PLAINTEXT`] bytes) to `wire`.
    fn seal_record(
        &mut self,
        kind: u8,
        content: &[u8],
        wire: &mut WireBuf,
    ) -> Result<(), RecordError> {
        let start = wire.len();
        wire.extend_from_slice(&header(content.len() + 1 + TAG_LEN));
        wire.extend_from_slice(content);
        wire.extend_from_slice(&[kind]);
        self.seal_tail(start, wire)
    }

    /// Sends a `KeyUpdate` (not asking the peer to update) and moves to the next key.
    fn update(&mut self, wire: &mut WireBuf) -> Result<(), RecordError> {
        self.seal_record(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], wire)?;
        let (seq, secrets) = lock(&self.kernel).next(true)?;
        self.keys = Keys::new(seq, &secrets)?;
        Ok(())
    }

    /// Records sealed under the current key (for tests).
    #[cfg(test)]
    fn seq(&self) -> u64 {
        self.keys.seq
    }
}

impl Opener {
    /// Opens, in place, the whole records at the start of `net`, handing each record's
    /// application data to `sink` (in order, straight from `net`). A partial record at the
    /// end is left for the next call.
    pub(crate) fn open<E: From<RecordError>>(
        &mut self,
        net: &mut [u8],
        mut sink: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<Opened, E> {
        let mut done = Opened::default();
        loop {
            let rest = net.get_mut(done.consumed..).unwrap_or_default();
            let Some(&[typ, _, _, l0, l1]) = rest.get(..HEADER_LEN) else {
                return Ok(done);
            };
            if typ != APPLICATION_DATA {
                return Err(RecordError::Type(typ).into());
            }
            let len = usize::from(u16::from_be_bytes([l0, l1]));
            if len > MAX_CIPHERTEXT {
                return Err(RecordError::Overflow(len).into());
            }
            let Some(record) = rest.get_mut(..HEADER_LEN + len) else {
                return Ok(done);
            };
            let (head, body) = record.split_at_mut(HEADER_LEN);
            let aad: [u8; HEADER_LEN] = [typ, head[1], head[2], l0, l1];
            let nonce = self.keys.next_nonce();
            let inner = self
                .keys
                .key
                .open_in_place(nonce, Aad::from(aad), body)
                .map_err(|_| RecordError::Auth)?;
            done.consumed += HEADER_LEN + len;
            let Some(end) = inner.iter().rposition(|&b| b != 0) else {
                return Err(RecordError::NoContentType.into());
            };
            let (content, kind) = inner.split_at(end);
            match kind.first().copied() {
                Some(APPLICATION_DATA) => sink(content)?,
                Some(ALERT) => match content {
                    [_, CLOSE_NOTIFY] => {
                        done.closed = true;
                        return Ok(done);
                    }
                    [_, d] => return Err(RecordError::Alert(*d).into()),
                    _ => return Err(RecordError::Handshake("malformed alert").into()),
                },
                Some(HANDSHAKE) => self.handshake(content, &mut done)?,
                Some(other) => return Err(RecordError::Type(other).into()),
                None => return Err(RecordError::NoContentType.into()),
            }
        }
    }

    /// A post-handshake message: a key update (followed, and answered when asked), or a
    /// session ticket (ignored: devlend does not resume sessions).
    fn handshake(&mut self, msg: &[u8], done: &mut Opened) -> Result<(), RecordError> {
        match msg {
            [KEY_UPDATE, 0, 0, 1, request] => {
                let (seq, secrets) = lock(&self.kernel).next(false)?;
                self.keys = Keys::new(seq, &secrets)?;
                match request {
                    0 => {}
                    1 => {
                        self.asked.store(true, Ordering::Release);
                        done.answer = true;
                    }
                    _ => return Err(RecordError::Handshake("bad key update request")),
                }
                Ok(())
            }
            [NEW_SESSION_TICKET, ..] => Ok(()),
            _ => Err(RecordError::Handshake("unexpected message")),
        }
    }
}

/// Fuzzing entry: the first byte picks what `data` is. Even: raw bytes from the network for an
/// opener (headers, lengths, authentication). Odd: a list of `type, length, content` inner
/// records, each sealed with the same fixed key and then opened (content parsing: alerts,
/// post-handshake messages, padding). Must never panic.
#[cfg(feature = "fuzzing")]
pub fn fuzz(data: &[u8]) {
    let secrets = || ConnectionTrafficSecrets::Aes256Gcm {
        key: rustls::crypto::cipher::AeadKey::from([7u8; 32]),
        iv: rustls::crypto::cipher::Iv::from([9u8; aead::NONCE_LEN]),
    };
    let Ok((mut sealer, mut opener)) = split(Kernel::Fixed, (0, secrets()), (0, secrets())) else {
        return;
    };
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let sink = |_: &[u8]| Ok::<(), RecordError>(());
    if mode % 2 == 0 {
        let mut net = rest.to_vec();
        let _ = opener.open(&mut net, sink);
        return;
    }
    let mut wire = WireBuf::default();
    let mut rest = rest;
    while let [typ, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (content, next) = tail.split_at(n);
        if sealer.seal_record(*typ, content, &mut wire).is_err() {
            return;
        }
        rest = next;
    }
    let _ = opener.open(&mut wire, sink);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    impl Sealer {
        pub(crate) fn update_every(&mut self, records: u64) {
            self.update_after = records;
        }
    }

    /// Sealer and opener of one direction of a real TLS 1.3 connection, made by a handshake
    /// between two in-process rustls ends.
    pub(crate) fn pair() -> ((Sealer, Opener), (Sealer, Opener)) {
        crate::tls::tests::established_pair()
    }

    impl Opener {
        /// [`Opener::open`] appending to `out`.
        fn open_into(&mut self, net: &mut [u8], out: &mut Vec<u8>) -> Result<Opened, RecordError> {
            self.open(net, |d| {
                out.extend_from_slice(d);
                Ok::<(), RecordError>(())
            })
        }
    }

    fn roundtrip(s: &mut Sealer, o: &mut Opener, data: &[u8]) -> Vec<u8> {
        let mut wire = WireBuf::default();
        s.seal(&[data], &mut wire).unwrap();
        let mut out = Vec::new();
        let got = o.open_into(&mut wire, &mut out).unwrap();
        assert_eq!(got.consumed, wire.len());
        out
    }

    #[test]
    fn records_carry_data_both_ways_and_split_at_the_record_size() {
        let ((mut cs, mut co), (mut ss, mut so)) = pair();
        let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        assert_eq!(roundtrip(&mut cs, &mut so, &big), big);
        assert_eq!(roundtrip(&mut ss, &mut co, b"reply"), b"reply");
        let mut wire = WireBuf::default();
        cs.seal(&[b"ab", b"", b"cde"], &mut wire).unwrap();
        assert_eq!(wire.len(), HEADER_LEN + 5 + 1 + TAG_LEN);
        let mut out = Vec::new();
        so.open_into(&mut wire, &mut out).unwrap();
        assert_eq!(out, b"abcde");
    }

    #[test]
    fn write_data_is_sealed_from_where_it_lies_and_opens_to_the_same_stream() {
        let ((mut cs, _), (_, mut so)) = pair();
        let full = MAX_PLAINTEXT - WRITE_HEADER_LEN;
        let datas: Vec<Vec<u8>> = [full, 1, 5000]
            .iter()
            .map(|&n| (0..n).map(|i| (i * 7) as u8).collect())
            .collect();
        let frames: Vec<([u8; WRITE_HEADER_LEN], &[u8])> = datas
            .iter()
            .enumerate()
            .map(|(i, d)| ([i as u8 + 1; WRITE_HEADER_LEN], d.as_slice()))
            .collect();
        let mut wire = WireBuf::default();
        // A buffer used before: its stale bytes must not leak into the records.
        wire.extend_from_slice(&[0xee; 70_000]);
        wire.clear();
        cs.seal_writes(b"queued frames", &frames, &mut wire)
            .unwrap();
        let mut pieces = Vec::new();
        let got = so
            .open(&mut wire, |d| {
                pieces.push(d.to_vec());
                Ok::<(), RecordError>(())
            })
            .unwrap();
        assert_eq!(got.consumed, wire.len());
        // One record for what was queued and the first header, then one per data part.
        let mut want = vec![[&b"queued frames"[..], &frames[0].0].concat()];
        for (i, (_, d)) in frames.iter().enumerate() {
            let next = frames
                .get(i + 1)
                .map(|(h, _)| h.as_slice())
                .unwrap_or_default();
            want.push([*d, next].concat());
        }
        assert_eq!(pieces, want);
        let too_big = [([0u8; WRITE_HEADER_LEN], &[0u8; MAX_PLAINTEXT + 1][..])];
        assert!(matches!(
            cs.seal_writes(b"", &too_big, &mut wire),
            Err(RecordError::TooLarge(_))
        ));
    }

    #[test]
    fn partial_records_wait_for_the_rest() {
        let ((mut cs, _), (_, mut so)) = pair();
        let mut wire = WireBuf::default();
        cs.seal(&[&[7u8; 40_000]], &mut wire).unwrap();
        let mut out = Vec::new();
        let cut = HEADER_LEN + 100;
        let first = so.open_into(&mut wire[..cut], &mut out).unwrap();
        assert_eq!(first.consumed, 0);
        assert!(out.is_empty());
        let all = so.open_into(&mut wire, &mut out).unwrap();
        assert_eq!(all.consumed, wire.len());
        assert_eq!(out, vec![7u8; 40_000]);
    }

    #[test]
    fn a_flipped_bit_a_replay_or_a_bad_header_is_an_error() {
        let ((mut cs, _), (_, mut so)) = pair();
        let mut wire = WireBuf::default();
        cs.seal(&[b"hello"], &mut wire).unwrap();
        let mut tampered = wire.clone();
        tampered[HEADER_LEN + 2] ^= 1;
        let mut out = Vec::new();
        assert!(matches!(
            so.open_into(&mut tampered, &mut out),
            Err(RecordError::Auth)
        ));

        let ((mut cs, _), (_, mut so)) = pair();
        let mut wire = WireBuf::default();
        cs.seal(&[b"hello"], &mut wire).unwrap();
        let mut again = wire.clone();
        so.open_into(&mut wire, &mut out).unwrap();
        // The same record a second time has the wrong sequence number.
        assert!(matches!(
            so.open_into(&mut again, &mut out),
            Err(RecordError::Auth)
        ));

        let mut bad_type = vec![22, 3, 3, 0, 20];
        bad_type.resize(25, 0);
        assert!(matches!(
            so.open_into(&mut bad_type, &mut out),
            Err(RecordError::Type(22))
        ));
        let mut huge = vec![23, 3, 3, 0xff, 0xff];
        assert!(matches!(
            so.open_into(&mut huge, &mut out),
            Err(RecordError::Overflow(_))
        ));
    }

    #[test]
    fn keys_are_updated_on_schedule_and_the_peer_follows() {
        let ((mut cs, _), (_, mut so)) = pair();
        cs.update_every(3);
        let mut all = Vec::new();
        for i in 0..10u8 {
            all.extend(roundtrip(&mut cs, &mut so, &[i; 1000]));
        }
        assert_eq!(all.len(), 10_000);
        assert!(cs.seq() <= 3);
    }

    #[test]
    fn a_key_update_request_is_answered() {
        let ((mut cs, mut co), (mut ss, mut so)) = pair();
        // The client asks the server to update (request_update = 1) with its own update.
        let mut wire = WireBuf::default();
        cs.seal_record(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 1], &mut wire)
            .unwrap();
        let (seq, secrets) = lock(&cs.kernel).next(true).unwrap();
        cs.keys = Keys::new(seq, &secrets).unwrap();
        let mut out = Vec::new();
        let got = so.open_into(&mut wire, &mut out).unwrap();
        assert!(got.answer);
        // The server's next seal carries its own update first; the client follows it.
        let mut reply = WireBuf::default();
        ss.seal(&[], &mut reply).unwrap();
        assert!(!reply.is_empty());
        co.open_into(&mut reply, &mut out).unwrap();
        assert_eq!(roundtrip(&mut ss, &mut co, b"after"), b"after");
        assert_eq!(roundtrip(&mut cs, &mut so, b"both"), b"both");
    }

    #[test]
    fn close_notify_ends_and_other_alerts_are_errors() {
        let ((mut cs, _), (_, mut so)) = pair();
        for (desc, closed) in [(CLOSE_NOTIFY, true), (42u8, false)] {
            let mut wire = WireBuf::default();
            cs.seal_record(ALERT, &[1, desc], &mut wire).unwrap();
            let mut out = Vec::new();
            match so.open_into(&mut wire, &mut out) {
                Ok(o) => assert!(closed && o.closed),
                Err(RecordError::Alert(d)) => assert!(!closed && d == desc),
                Err(e) => panic!("{e}"),
            }
        }
    }
}
