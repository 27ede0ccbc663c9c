//! An etcd v3 client over etcd's JSON gateway (the same v3 RPCs as gRPC: `/v3/kv/range`,
//! `/v3/kv/txn`, `/v3/lease/*`, `/v3/watch`), synchronous, with fail-over across members.
//!
//! Keys and values are bytes (base64 on the wire), 64-bit integers are JSON strings.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

use crate::addr::{Endpoint, RegistryAddr};
use crate::http::{self, HttpError};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No member of the cluster could be reached.
    #[error("etcd unreachable at {addr}: {reason}")]
    Unreachable {
        /// The cluster's address as given.
        addr: String,
        /// The last member's failure.
        reason: String,
    },
    /// etcd refused the request.
    #[error("etcd refused {path}: {message} (gRPC code {code})")]
    Refused {
        /// The RPC.
        path: &'static str,
        /// gRPC status code.
        code: i64,
        /// etcd's message.
        message: String,
    },
    /// etcd's answer does not parse.
    #[error("etcd answered {path} with something unexpected: {reason}")]
    Malformed {
        /// The RPC.
        path: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// How long a request keeps trying the members before etcd counts as unreachable.
pub const PATIENCE: Duration = Duration::from_secs(3);

/// gRPC status: not found (e.g. a lease that expired).
pub const CODE_NOT_FOUND: i64 = 5;
/// gRPC status: unavailable (no leader, member stopping).
const CODE_UNAVAILABLE: i64 = 14;

/// An etcd lease's ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

/// One key-value pair with its revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    /// Key.
    pub key: Vec<u8>,
    /// Value.
    pub value: Vec<u8>,
    /// Revision at which the key was created.
    pub create_revision: i64,
    /// Revision of its last change.
    pub mod_revision: i64,
    /// The lease it is attached to (0: none).
    pub lease: i64,
}

/// A comparison in a transaction.
#[derive(Clone, Debug)]
pub enum Compare {
    /// The key does not exist.
    Absent(Vec<u8>),
    /// The key exists.
    Present(Vec<u8>),
    /// The key's value equals this.
    ValueIs(Vec<u8>, Vec<u8>),
}

/// An operation in a transaction.
#[derive(Clone, Debug)]
pub enum Op {
    /// Put a key, attached to a lease (0: none).
    Put(Vec<u8>, Vec<u8>, LeaseId),
    /// Read a key.
    Get(Vec<u8>),
    /// Delete a key.
    Delete(Vec<u8>),
}

/// A transaction's outcome: which branch ran, and the keys its `Get`s read, in order.
#[derive(Debug)]
pub struct TxnResult {
    /// Whether every comparison held (the success branch ran).
    pub succeeded: bool,
    /// For each `Get` of the branch that ran, what it read.
    pub gets: Vec<Vec<Kv>>,
}

/// A change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// A key was created or changed.
    Put(Kv),
    /// A key was deleted (or its lease expired); the previous value when known.
    Delete {
        /// The key.
        key: Vec<u8>,
        /// What it held.
        prev: Option<Kv>,
    },
}

/// The first key after every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        Value::Null => Some(0),
        _ => None,
    }
}

fn parse_kv(path: &'static str, v: &Value) -> Result<Kv, EtcdError> {
    let bad = |reason: &str| EtcdError::Malformed {
        path,
        reason: reason.to_string(),
    };
    let bytes = |field: &str| -> Result<Vec<u8>, EtcdError> {
        match v.get(field) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::String(s)) => B64
                .decode(s)
                .map_err(|_| bad("a key or value is not base64")),
            Some(_) => Err(bad("a key or value is not a string")),
        }
    };
    let num = |field: &str| {
        int(v.get(field).unwrap_or(&Value::Null)).ok_or_else(|| bad("a revision is not an integer"))
    };
    Ok(Kv {
        key: bytes("key")?,
        value: bytes("value")?,
        create_revision: num("create_revision")?,
        mod_revision: num("mod_revision")?,
        lease: num("lease")?,
    })
}

fn parse_kvs(path: &'static str, v: &Value) -> Result<Vec<Kv>, EtcdError> {
    match v.get("kvs") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(|kv| parse_kv(path, kv)).collect(),
        Some(_) => Err(EtcdError::Malformed {
            path,
            reason: "kvs is not a list".into(),
        }),
    }
}

fn compare_json(c: &Compare) -> Value {
    match c {
        Compare::Absent(k) => {
            json!({"key": b64(k), "target": "CREATE", "result": "EQUAL", "create_revision": "0"})
        }
        Compare::Present(k) => {
            json!({"key": b64(k), "target": "CREATE", "result": "GREATER", "create_revision": "0"})
        }
        Compare::ValueIs(k, v) => {
            json!({"key": b64(k), "target": "VALUE", "result": "EQUAL", "value": b64(v)})
        }
    }
}

fn op_json(op: &Op) -> Value {
    match op {
        Op::Put(k, v, lease) => {
            json!({"request_put": {"key": b64(k), "value": b64(v), "lease": lease.0.to_string()}})
        }
        Op::Get(k) => json!({"request_range": {"key": b64(k)}}),
        Op::Delete(k) => json!({"request_delete_range": {"key": b64(k)}}),
    }
}

/// A client of one etcd cluster. Requests go to the member that last answered, and on to the
/// next one when it cannot be reached.
pub struct EtcdClient {
    addr: RegistryAddr,
    preferred: AtomicUsize,
    timeout: Duration,
}

impl EtcdClient {
    /// A client of the members in `addr`; `timeout` bounds each request to one member.
    pub fn new(addr: RegistryAddr, timeout: Duration) -> Self {
        Self {
            addr,
            preferred: AtomicUsize::new(0),
            timeout,
        }
    }

    /// The cluster's address.
    pub fn addr(&self) -> &RegistryAddr {
        &self.addr
    }

    /// One RPC, trying the members in turn while they cannot be reached or have no leader,
    /// for up to [`PATIENCE`] (a leader election after a member died takes about a second).
    fn call(&self, path: &'static str, body: &Value) -> Result<Value, EtcdError> {
        let deadline = std::time::Instant::now() + PATIENCE;
        let body = body.to_string().into_bytes();
        loop {
            match self.call_round(path, &body) {
                Err(EtcdError::Unreachable { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                other => return other,
            }
        }
    }

    /// One pass over the members.
    fn call_round(&self, path: &'static str, body: &[u8]) -> Result<Value, EtcdError> {
        let members = self.addr.members();
        let n = members.len().max(1);
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last = String::from("no member");
        for i in 0..n {
            let idx = (start + i) % n;
            let Some(member) = members.get(idx) else {
                continue;
            };
            match self.call_member(member, path, body) {
                Ok(v) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(MemberError::Down(reason)) => last = format!("{member}: {reason}"),
                Err(MemberError::Etcd(e)) => return Err(e),
            }
        }
        Err(EtcdError::Unreachable {
            addr: self.addr.to_string(),
            reason: last,
        })
    }

    fn call_member(
        &self,
        member: &Endpoint,
        path: &'static str,
        body: &[u8],
    ) -> Result<Value, MemberError> {
        let addrs = member
            .resolve()
            .map_err(|e| MemberError::Down(format!("cannot resolve: {e}")))?;
        let mut last = MemberError::Down("resolves to no address".into());
        for sa in addrs {
            match http::post(sa, &member.to_string(), path, body, self.timeout) {
                Ok((status, bytes)) => {
                    let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
                        MemberError::Etcd(EtcdError::Malformed {
                            path,
                            reason: format!("not JSON ({e})"),
                        })
                    })?;
                    if status == 200 {
                        return Ok(v);
                    }
                    let code = v.get("code").and_then(int).unwrap_or(-1);
                    let message = v
                        .get("message")
                        .or_else(|| v.get("error"))
                        .and_then(Value::as_str)
                        .unwrap_or("no message")
                        .to_string();
                    if code == CODE_UNAVAILABLE {
                        last = MemberError::Down(message);
                        continue;
                    }
                    return Err(MemberError::Etcd(EtcdError::Refused {
                        path,
                        code,
                        message,
                    }));
                }
                Err(e @ (HttpError::Connect { .. } | HttpError::Io { .. })) => {
                    last = MemberError::Down(e.to_string());
                }
                Err(e @ HttpError::Malformed { .. }) => {
                    return Err(MemberError::Etcd(EtcdError::Malformed {
                        path,
                        reason: e.to_string(),
                    }))
                }
            }
        }
        Err(last)
    }

    /// Checks that a member answers (its status).
    pub fn ping(&self) -> Result<(), EtcdError> {
        self.call("/v3/maintenance/status", &json!({})).map(drop)
    }

    /// Reads one key, or every key with a prefix.
    pub fn get(&self, key: &[u8], prefix: bool) -> Result<Vec<Kv>, EtcdError> {
        let mut req = json!({"key": b64(key)});
        if prefix {
            req["range_end"] = json!(b64(&prefix_end(key)));
        }
        let v = self.call("/v3/kv/range", &req)?;
        parse_kvs("/v3/kv/range", &v)
    }

    /// Puts a key, attached to `lease` (`LeaseId(0)`: none).
    pub fn put(&self, key: &[u8], value: &[u8], lease: LeaseId) -> Result<(), EtcdError> {
        let req = json!({"key": b64(key), "value": b64(value), "lease": lease.0.to_string()});
        self.call("/v3/kv/put", &req).map(drop)
    }

    /// Deletes a key (or every key with a prefix); returns how many went.
    pub fn delete(&self, key: &[u8], prefix: bool) -> Result<i64, EtcdError> {
        let mut req = json!({"key": b64(key)});
        if prefix {
            req["range_end"] = json!(b64(&prefix_end(key)));
        }
        let v = self.call("/v3/kv/deleterange", &req)?;
        Ok(v.get("deleted").and_then(int).unwrap_or(0))
    }

    /// Runs `success` if every comparison holds, else `failure`, atomically.
    pub fn txn(
        &self,
        compare: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnResult, EtcdError> {
        const PATH: &str = "/v3/kv/txn";
        let req = json!({
            "compare": compare.iter().map(compare_json).collect::<Vec<_>>(),
            "success": success.iter().map(op_json).collect::<Vec<_>>(),
            "failure": failure.iter().map(op_json).collect::<Vec<_>>(),
        });
        let v = self.call(PATH, &req)?;
        let succeeded = v.get("succeeded").and_then(Value::as_bool).unwrap_or(false);
        let mut gets = Vec::new();
        if let Some(Value::Array(rs)) = v.get("responses") {
            for r in rs {
                if let Some(range) = r.get("response_range") {
                    gets.push(parse_kvs(PATH, range)?);
                }
            }
        }
        Ok(TxnResult { succeeded, gets })
    }

    /// Grants a lease of `ttl` (whole seconds, at least 1).
    pub fn grant(&self, ttl: Duration) -> Result<(LeaseId, Duration), EtcdError> {
        const PATH: &str = "/v3/lease/grant";
        let secs = ttl.as_secs().max(1);
        let v = self.call(PATH, &json!({"TTL": secs.to_string()}))?;
        let id = v
            .get("ID")
            .and_then(int)
            .filter(|id| *id != 0)
            .ok_or(EtcdError::Malformed {
                path: PATH,
                reason: "no lease ID".into(),
            })?;
        let granted = v.get("TTL").and_then(int).unwrap_or(0);
        Ok((
            LeaseId(id),
            Duration::from_secs(u64::try_from(granted).unwrap_or(0)),
        ))
    }

    /// Refreshes a lease; `None` when it no longer exists (it expired or was revoked).
    pub fn keep_alive(&self, lease: LeaseId) -> Result<Option<Duration>, EtcdError> {
        let v = self.call("/v3/lease/keepalive", &json!({"ID": lease.0.to_string()}))?;
        let ttl = v
            .get("result")
            .and_then(|r| r.get("TTL"))
            .and_then(int)
            .unwrap_or(0);
        Ok((ttl > 0).then(|| Duration::from_secs(u64::try_from(ttl).unwrap_or(0))))
    }

    /// Revokes a lease: every key attached to it is deleted.
    pub fn revoke(&self, lease: LeaseId) -> Result<(), EtcdError> {
        match self.call("/v3/lease/revoke", &json!({"ID": lease.0.to_string()})) {
            Ok(_) => Ok(()),
            Err(EtcdError::Refused { code, .. }) if code == CODE_NOT_FOUND => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Watches every key under `prefix` from revision `from` (0: from now) on one member;
    /// events arrive on the returned channel until the watch is dropped or the member goes
    /// away (then the channel closes, and the caller starts a new watch).
    pub fn watch(&self, prefix: &[u8], from: i64) -> Result<Watch, EtcdError> {
        const PATH: &str = "/v3/watch";
        let mut req = json!({"create_request": {
            "key": b64(prefix),
            "range_end": b64(&prefix_end(prefix)),
            "prev_kv": true,
        }});
        if from > 0 {
            req["create_request"]["start_revision"] = json!(from.to_string());
        }
        let body = req.to_string().into_bytes();
        let members = self.addr.members();
        let n = members.len().max(1);
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last = String::from("no member");
        for i in 0..n {
            let Some(member) = members.get((start + i) % n) else {
                continue;
            };
            let addrs = match member.resolve() {
                Ok(a) => a,
                Err(e) => {
                    last = format!("{member}: {e}");
                    continue;
                }
            };
            for sa in addrs {
                match http::post_streaming(sa, &member.to_string(), PATH, &body, self.timeout, None)
                {
                    Ok(s) if s.status == 200 => return Watch::start(s),
                    Ok(s) => last = format!("{member}: HTTP status {}", s.status),
                    Err(e) => last = e.to_string(),
                }
            }
        }
        Err(EtcdError::Unreachable {
            addr: self.addr.to_string(),
            reason: last,
        })
    }
}

enum MemberError {
    /// Try the next member.
    Down(String),
    /// A definite answer.
    Etcd(EtcdError),
}

/// A running watch: a thread reads the stream and forwards events; dropping the watch shuts
/// the connection down, which ends the thread.
pub struct Watch {
    events: mpsc::Receiver<WatchBatch>,
    socket: std::net::TcpStream,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The events of one revision, with that revision.
#[derive(Debug)]
pub struct WatchBatch {
    /// The store's revision after these events.
    pub revision: i64,
    /// The events.
    pub events: Vec<WatchEvent>,
}

impl Watch {
    fn start(s: http::Streaming) -> Result<Self, EtcdError> {
        let (tx, rx) = mpsc::channel();
        let socket = s.socket.try_clone().map_err(|e| EtcdError::Unreachable {
            addr: "watch".into(),
            reason: e.to_string(),
        })?;
        let body = s.body;
        let thread = std::thread::Builder::new()
            .name("etcd-watch".into())
            .spawn(move || watch_loop(body, tx))
            .map_err(|e| EtcdError::Unreachable {
                addr: "watch".into(),
                reason: format!("spawning the watch thread: {e}"),
            })?;
        Ok(Self {
            events: rx,
            socket,
            thread: Some(thread),
        })
    }

    /// The next batch, waiting at most `timeout`. `Ok(None)`: nothing yet; `Err`: the watch
    /// ended (member gone, or etcd cancelled it).
    pub fn next(&self, timeout: Duration) -> Result<Option<WatchBatch>, WatchEnded> {
        match self.events.recv_timeout(timeout) {
            Ok(b) => Ok(Some(b)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(WatchEnded),
        }
    }
}

/// A watch's stream ended; start a new one from the last revision seen plus one.
#[derive(Debug, thiserror::Error)]
#[error("the etcd watch ended")]
pub struct WatchEnded;

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch_loop(body: http::Body, tx: mpsc::Sender<WatchBatch>) {
    const PATH: &str = "/v3/watch";
    let stream = serde_json::Deserializer::from_reader(body).into_iter::<Value>();
    for item in stream {
        let Ok(v) = item else { return };
        let Some(result) = v.get("result") else {
            // An error object: the watch is over.
            return;
        };
        if result.get("canceled").and_then(Value::as_bool) == Some(true) {
            return;
        }
        let revision = result
            .get("header")
            .and_then(|h| h.get("revision"))
            .and_then(int)
            .unwrap_or(0);
        let mut events = Vec::new();
        if let Some(Value::Array(evs)) = result.get("events") {
            for e in evs {
                let kv = e.get("kv").map(|kv| parse_kv(PATH, kv));
                let Some(Ok(kv)) = kv else { continue };
                if e.get("type").and_then(Value::as_str) == Some("DELETE") {
                    let prev = e.get("prev_kv").and_then(|p| parse_kv(PATH, p).ok());
                    events.push(WatchEvent::Delete { key: kv.key, prev });
                } else {
                    events.push(WatchEvent::Put(kv));
                }
            }
        }
        if events.is_empty() {
            continue;
        }
        if tx.send(WatchBatch { revision, events }).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn key_values_parse_from_the_gateway_form() {
        let v = json!({"key": "Zm9v", "value": "YmFy", "create_revision": "7", "mod_revision": "9", "lease": "42"});
        let kv = parse_kv("t", &v).unwrap();
        assert_eq!(
            (kv.key.as_slice(), kv.value.as_slice()),
            (&b"foo"[..], &b"bar"[..])
        );
        assert_eq!((kv.create_revision, kv.mod_revision, kv.lease), (7, 9, 42));
        for bad in [
            json!({"key": "!!!"}),
            json!({"key": 3}),
            json!({"key": "Zm9v", "create_revision": "x"}),
            json!({"key": "Zm9v", "lease": [1]}),
        ] {
            assert!(parse_kv("t", &bad).is_err(), "{bad}");
        }
    }
}
