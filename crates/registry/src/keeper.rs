//! Keeping a host's lease alive, and registering again when it was lost.
//!
//! One thread per keeper: it refreshes the lease every third of its TTL. When etcd cannot be
//! reached for a whole TTL, or answers that the lease is gone, the host's records are gone
//! too (etcd expired them); the keeper then asks for a new lease as soon as etcd answers and
//! calls the registration callback again, so the host re-appears by itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{LeaseId, Registry, RegistryError};
use devlend_sync::lock;

/// Registers a host's records under a (new) lease.
pub type OnLease = Box<dyn FnMut(&Registry, LeaseId) -> Result<(), RegistryError> + Send>;

#[derive(Default)]
struct State {
    lease: Option<LeaseId>,
    /// The lease given up as lost (revoked before registering again: etcd restores leases
    /// with a fresh TTL when it restarts, and the old records would block the new ones).
    lost: Option<LeaseId>,
    /// Counts new leases (1 after start).
    generation: u64,
    last_error: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

/// Reads a [`LeaseKeeper`]'s lease from another thread.
#[derive(Clone)]
pub struct LeaseView(Arc<Shared>);

impl LeaseView {
    /// The lease in force, or `None` while the host is not registered.
    pub fn lease(&self) -> Option<LeaseId> {
        lock(&self.0.state).lease
    }
}

/// A lease kept alive by a thread: it refreshes the lease every third of its TTL, and when
/// the lease is lost (etcd unreachable for a whole TTL, or the lease gone) it asks for a new
/// one as soon as etcd answers and calls the registration callback again.
pub struct LeaseKeeper {
    shared: Arc<Shared>,
    ttl: Duration,
    thread: Option<JoinHandle<()>>,
}

impl LeaseKeeper {
    /// Grants a lease of `ttl`, calls `on_lease` with it (its error is returned: e.g. the name
    /// is taken), then keeps it alive in a thread.
    pub fn start(
        registry: Arc<Registry>,
        ttl: Duration,
        mut on_lease: OnLease,
    ) -> Result<Self, RegistryError> {
        let lease = registry.grant(ttl)?;
        if let Err(e) = on_lease(&registry, lease) {
            let _ = registry.etcd().revoke(lease);
            return Err(e);
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                lease: Some(lease),
                lost: None,
                generation: 1,
                last_error: None,
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("etcd-lease".into())
            .spawn(move || keep(&registry, &s, ttl, on_lease))
            .map_err(|e| {
                RegistryError::Etcd(crate::EtcdError::Unreachable {
                    addr: "lease keeper".into(),
                    reason: format!("spawning its thread: {e}"),
                })
            })?;
        Ok(Self {
            shared,
            ttl,
            thread: Some(thread),
        })
    }

    /// The lease in force, or `None` while the host is not registered (etcd unreachable).
    pub fn lease(&self) -> Option<LeaseId> {
        lock(&self.shared.state).lease
    }

    /// A handle that reads the lease in force from other threads.
    pub fn view(&self) -> LeaseView {
        LeaseView(self.shared.clone())
    }

    /// The lease's TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How many leases this keeper has had (1 after start; one more per re-registration).
    pub fn generation(&self) -> u64 {
        lock(&self.shared.state).generation
    }

    /// Why the last refresh or re-registration failed, if it did.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.shared.state).last_error.clone()
    }

    /// Waits until the keeper has had more than `generation` leases and holds one.
    pub fn wait_generation(&self, generation: u64, timeout: Duration) -> bool {
        let st = lock(&self.shared.state);
        let (st, _) = devlend_sync::wait_timeout_while(&self.shared.changed, st, timeout, |s| {
            s.generation <= generation || s.lease.is_none()
        });
        st.generation > generation && st.lease.is_some()
    }

    /// Waits until the keeper has lost its lease (etcd unreachable for a TTL, or expired).
    pub fn wait_lost(&self, timeout: Duration) -> bool {
        let st = lock(&self.shared.state);
        let (st, _) = devlend_sync::wait_timeout_while(&self.shared.changed, st, timeout, |s| {
            s.lease.is_some()
        });
        st.lease.is_none()
    }

    /// Stops refreshing and revokes the lease (the host's records go at once).
    pub fn stop(mut self, registry: &Registry) {
        self.halt();
        if let Some(lease) = self.lease() {
            if let Err(e) = registry.etcd().revoke(lease) {
                tracing::warn!("revoking lease {lease:?}: {e}");
            }
        }
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.halt();
    }
}

fn keep(registry: &Registry, shared: &Shared, ttl: Duration, mut on_lease: OnLease) {
    let period = (ttl / 3).max(Duration::from_millis(100));
    let mut last_ok = Instant::now();
    loop {
        {
            let st = lock(&shared.state);
            let _ = shared
                .changed
                .wait_timeout_while(st, period, |_| !shared.stop.load(Ordering::Acquire));
        }
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let current = lock(&shared.state).lease;
        let error = match current {
            Some(lease) => match registry.etcd().keep_alive(lease) {
                Ok(Some(_)) => {
                    last_ok = Instant::now();
                    None
                }
                Ok(None) => {
                    lose(shared, "the lease expired");
                    renew(registry, shared, ttl, &mut on_lease, &mut last_ok)
                }
                Err(e) => {
                    if last_ok.elapsed() >= ttl {
                        lose(shared, &format!("etcd unreachable for a whole lease ({e})"));
                    }
                    Some(e.to_string())
                }
            },
            None => renew(registry, shared, ttl, &mut on_lease, &mut last_ok),
        };
        let mut st = lock(&shared.state);
        if st.last_error != error {
            if let Some(e) = &error {
                tracing::warn!("registry: {e}");
            }
            st.last_error = error;
        }
    }
}

fn lose(shared: &Shared, why: &str) {
    let mut st = lock(&shared.state);
    if let Some(old) = st.lease.take() {
        st.lost = Some(old);
        tracing::warn!("registry: lease lost: {why}; registering again when etcd answers");
        shared.changed.notify_all();
    }
}

/// Asks for a new lease and registers again; the error when it cannot.
fn renew(
    registry: &Registry,
    shared: &Shared,
    ttl: Duration,
    on_lease: &mut OnLease,
    last_ok: &mut Instant,
) -> Option<String> {
    let lost = lock(&shared.state).lost;
    if let Some(old) = lost {
        if let Err(e) = registry.etcd().revoke(old) {
            return Some(e.to_string());
        }
        lock(&shared.state).lost = None;
    }
    let lease = match registry.grant(ttl) {
        Ok(l) => l,
        Err(e) => return Some(e.to_string()),
    };
    if let Err(e) = on_lease(registry, lease) {
        let _ = registry.etcd().revoke(lease);
        return Some(format!("registering again: {e}"));
    }
    *last_ok = Instant::now();
    let mut st = lock(&shared.state);
    st.lease = Some(lease);
    st.generation += 1;
    shared.changed.notify_all();
    tracing::info!("registry: registered again under lease {lease:?}");
    None
}
