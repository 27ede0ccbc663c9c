//! State that survives a restart, in the node's state directory: the devices it lends (the
//! `add` requests that made them, replayed at start-up) and the devices it held as a borrower
//! (reported at start-up: a lease does not survive its holder). Each file is replaced
//! atomically (written to a temporary file, synced, renamed over the old one).

use std::path::Path;

use anyhow::Context;

use crate::proto::Request;

/// Lent devices: the `add` requests, in order.
pub const DEVICES: &str = "devices.json";
/// Borrowed devices: names.
pub const BORROWED: &str = "borrowed.json";

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

fn read<T: serde::de::DeserializeOwned + Default>(path: &Path) -> anyhow::Result<T> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("parsing {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The saved `add` requests.
pub fn devices(state: &Path) -> anyhow::Result<Vec<Request>> {
    read(&state.join(DEVICES))
}

/// Records a successful request that changes what persists.
pub fn record(state: &Path, req: &Request) -> anyhow::Result<()> {
    match req {
        Request::Add(add) => {
            let mut all = devices(state)?;
            all.retain(|r| !matches!(r, Request::Add(a) if a.name == add.name));
            all.push(req.clone());
            write_atomic(&state.join(DEVICES), &serde_json::to_vec_pretty(&all)?)
        }
        Request::Borrow(b) => {
            let mut held: Vec<String> = read(&state.join(BORROWED))?;
            if !held.contains(&b.name) {
                held.push(b.name.clone());
            }
            write_atomic(&state.join(BORROWED), &serde_json::to_vec(&held)?)
        }
        Request::Return(r) => {
            let mut held: Vec<String> = read(&state.join(BORROWED))?;
            held.retain(|n| *n != r.name);
            write_atomic(&state.join(BORROWED), &serde_json::to_vec(&held)?)
        }
        _ => Ok(()),
    }
}

/// What this node held before it restarted (and forgets it: it holds none of it now).
pub fn take_held(state: &Path) -> anyhow::Result<Vec<String>> {
    let held: Vec<String> = read(&state.join(BORROWED))?;
    if !held.is_empty() {
        write_atomic(&state.join(BORROWED), b"[]")?;
    }
    Ok(held)
}
