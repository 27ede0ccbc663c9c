//! State that survives a restart, in the node's state directory: the devices it lends (the
//! `add` requests that made them, replayed at start-up) and the devices it held as a borrower
//! (reported at start-up: a lease does not survive its holder). Each file is replaced
//! atomically (written to a temporary file, synced, renamed over the old one), and every
//! read-modify-write of them holds one process-wide lock: the node serves requests on many
//! threads at once, and two borrows recorded together must both be kept (without the lock, the
//! second rename found the temporary file already gone, and one borrow was lost).

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use anyhow::Context;

use crate::proto::Request;

/// Lent devices: the `add` requests, in order.
pub const DEVICES: &str = "devices.json";
/// Borrowed devices: names.
pub const BORROWED: &str = "borrowed.json";

/// Held across each read-modify-write of the state files.
static STATE_FILES: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    // The guarded data is `()`: a panic while it was held leaves nothing half-updated in memory.
    devlend_sync::lock(&STATE_FILES)
}

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
    let _held = lock();
    read(&state.join(DEVICES))
}

/// Records a successful request that changes what persists.
pub fn record(state: &Path, req: &Request) -> anyhow::Result<()> {
    let _held = lock();
    match req {
        Request::Add(add) => {
            let mut all: Vec<Request> = read(&state.join(DEVICES))?;
            all.retain(|r| !matches!(r, Request::Add(a) if a.name == add.name));
            all.push(req.clone());
            write_atomic(&state.join(DEVICES), &serde_json::to_vec_pretty(&all)?)
        }
        Request::Remove(r) => {
            let mut all: Vec<Request> = read(&state.join(DEVICES))?;
            all.retain(|a| !matches!(a, Request::Add(a) if a.name == r.name));
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
    let _held = lock();
    let held: Vec<String> = read(&state.join(BORROWED))?;
    if !held.is_empty() {
        write_atomic(&state.join(BORROWED), b"[]")?;
    }
    Ok(held)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::BorrowRequest;

    fn borrow(name: String) -> Request {
        Request::Borrow(BorrowRequest {
            name,
            vfio_user: None,
            vm: None,
            port: None,
            id: None,
        })
    }

    /// The node records requests from many threads at once (a borrow storm): every one is kept
    /// and none fails.
    #[test]
    fn concurrent_records_keep_every_borrow() {
        let dir = std::env::temp_dir().join(format!("devlend-persist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        const THREADS: usize = 8;
        const EACH: usize = 25;
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let dir = &dir;
                s.spawn(move || {
                    for i in 0..EACH {
                        record(dir, &borrow(format!("d{t}-{i}"))).expect("recording a borrow");
                    }
                });
            }
        });
        let mut held = take_held(&dir).expect("reading what was held");
        held.sort();
        let _ = std::fs::remove_dir_all(&dir);
        let mut want: Vec<String> = (0..THREADS)
            .flat_map(|t| (0..EACH).map(move |i| format!("d{t}-{i}")))
            .collect();
        want.sort();
        assert_eq!(held, want);
    }
}
