//! The cluster registry: which hosts are up, which devices they lend, and who holds each, on
//! etcd.
//!
//! Layout under a root prefix (default `/devlend`):
//!
//! | key | value | attached to |
//! |---|---|---|
//! | `nodes/NAME` | [`NodeRecord`]: how to reach the host | the node's lease |
//! | `devices/NAME` | [`DeviceRecord`]: kind, IDs, VFs, lender | the lender's lease |
//! | `owners/NAME` | [`OwnerRecord`]: the borrower | the borrower's lease |
//! | `links/LENDER/BORROWER` | a borrower asks the lender for a link | the borrower's lease |
//! | `ports/LENDER/BORROWER` | the lender's answer: the port it listens on | the lender's lease |
//!
//! Every record lives under a lease its writer keeps alive ([`LeaseKeeper`]): a host that dies
//! drops out of the cluster when its lease expires, its devices with it, and the devices it
//! borrowed become free. Registration and ownership are etcd transactions (compare-and-swap on
//! the record's existence), so two hosts racing for one name or one device never both win.
//!
//! The client speaks etcd's v3 API through its JSON gateway ([`etcd`]); no data path goes
//! through the registry.
#![warn(missing_docs)]

pub mod addr;
pub mod etcd;
pub mod http;
mod keeper;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use addr::{AddrError, Endpoint, RegistryAddr};
pub use etcd::{EtcdClient, EtcdError, LeaseId, Watch, WatchEvent};
pub use keeper::{LeaseKeeper, LeaseView, OnLease};

use etcd::{Compare, Op};
use serde::{Deserialize, Serialize};

/// What went wrong with the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry address does not parse.
    #[error(transparent)]
    Addr(#[from] AddrError),
    /// Talking to etcd failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// A node or device name that cannot be a key.
    #[error("{what} name {name:?} is not valid: use 1-63 letters, digits, '.', '_' or '-'")]
    BadName {
        /// "node" or "device".
        what: &'static str,
        /// The name.
        name: String,
    },
    /// Another live node is registered under this name.
    #[error("node name {name:?} is already registered by a live node ({reach})")]
    NodeNameTaken {
        /// The name.
        name: String,
        /// How that node is reached.
        reach: Reach,
    },
    /// A device of this name is already in the cluster.
    #[error("device name {name:?} already exists in the cluster (lent by {lender}); device names must be unique")]
    DuplicateDevice {
        /// The name.
        name: String,
        /// Who lends the one registered.
        lender: String,
    },
    /// No device of this name is registered.
    #[error("no device {0:?} in the cluster")]
    NoSuchDevice(String),
    /// A record in etcd does not parse.
    #[error("registry record {key} is malformed: {reason}")]
    Malformed {
        /// Its key.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// How to reach a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reach {
    /// Over tcp at this address (the lender listens on a port per borrower, see `ports/`).
    Tcp {
        /// The host's address.
        addr: IpAddr,
    },
    /// On this machine, through the `shm` fabric rendezvous in this directory.
    Shm {
        /// The rendezvous directory.
        dir: PathBuf,
    },
}

impl std::fmt::Display for Reach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reach::Tcp { addr } => write!(f, "tcp {addr}"),
            Reach::Shm { dir } => write!(f, "shm {}", dir.display()),
        }
    }
}

/// A node's registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The host's name.
    pub name: String,
    /// How to reach it.
    pub reach: Reach,
}

/// A lent device's registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Cluster-unique device name.
    pub name: String,
    /// Device kind (e.g. `nvme`).
    pub kind: String,
    /// PCI vendor ID.
    pub vendor: u16,
    /// PCI device ID.
    pub device: u16,
    /// SR-IOV virtual functions it offers (0: none).
    pub vfs: u16,
    /// The lender's state for it (e.g. `available`).
    pub state: String,
    /// The host that lends it.
    pub lender: String,
    /// One line for listings.
    pub detail: String,
    /// Storage capacity in bytes, when the device has one (absent from older records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
}

/// Who holds a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// The borrowing host.
    pub borrower: String,
}

/// A device with its current borrower.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceView {
    /// The registration.
    #[serde(flatten)]
    pub record: DeviceRecord,
    /// The borrower, if any.
    pub borrower: Option<String>,
}

/// The outcome of a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The caller holds the device now.
    Won,
    /// Another host holds it.
    Held {
        /// The holder.
        by: String,
    },
}

/// Checks a node or device name: it becomes part of a key.
pub fn check_name(what: &'static str, name: &str) -> Result<(), RegistryError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(RegistryError::BadName {
            what,
            name: name.to_string(),
        })
    }
}

/// The registry of one cluster.
pub struct Registry {
    etcd: EtcdClient,
    root: String,
}

/// The default root prefix.
pub const DEFAULT_ROOT: &str = "/devlend";
/// How long one request to one etcd member may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

impl Registry {
    /// Connects to the cluster at `addr` and checks that a member answers.
    pub fn connect(addr: &RegistryAddr) -> Result<Self, RegistryError> {
        Self::connect_with(addr, DEFAULT_ROOT, REQUEST_TIMEOUT)
    }

    /// [`Registry::connect`] under another root prefix (tests, several clusters on one etcd).
    pub fn connect_with(
        addr: &RegistryAddr,
        root: &str,
        timeout: Duration,
    ) -> Result<Self, RegistryError> {
        let r = Self {
            etcd: EtcdClient::new(addr.clone(), timeout),
            root: root.trim_end_matches('/').to_string(),
        };
        r.etcd.ping()?;
        Ok(r)
    }

    /// The etcd client.
    pub fn etcd(&self) -> &EtcdClient {
        &self.etcd
    }

    fn key(&self, kind: &str, name: &str) -> Vec<u8> {
        format!("{}/{kind}/{name}", self.root).into_bytes()
    }

    fn prefix(&self, kind: &str) -> Vec<u8> {
        format!("{}/{kind}/", self.root).into_bytes()
    }

    fn decode<T: for<'de> Deserialize<'de>>(kv: &etcd::Kv) -> Result<T, RegistryError> {
        serde_json::from_slice(&kv.value).map_err(|e| RegistryError::Malformed {
            key: String::from_utf8_lossy(&kv.key).into_owned(),
            reason: e.to_string(),
        })
    }

    fn encode<T: Serialize>(v: &T) -> Vec<u8> {
        // Plain records of strings and integers always serialise.
        serde_json::to_vec(v).unwrap_or_default()
    }

    /// Grants a lease of `ttl` (whole seconds).
    pub fn grant(&self, ttl: Duration) -> Result<LeaseId, RegistryError> {
        Ok(self.etcd.grant(ttl)?.0)
    }

    /// Creates `key` under `lease` unless it exists; returns what is there when it does (a
    /// record already under `lease` counts as created: a retried request).
    fn create(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Result<Option<etcd::Kv>, RegistryError> {
        let r = self.etcd.txn(
            &[Compare::Absent(key.clone())],
            &[Op::Put(key.clone(), value, lease)],
            &[Op::Get(key)],
        )?;
        if r.succeeded {
            return Ok(None);
        }
        let existing = r.gets.into_iter().next().and_then(|g| g.into_iter().next());
        Ok(existing.filter(|kv| kv.lease != lease.0))
    }

    /// Registers a node under `lease`; refused when a live node holds the name.
    pub fn register_node(&self, rec: &NodeRecord, lease: LeaseId) -> Result<(), RegistryError> {
        check_name("node", &rec.name)?;
        match self.create(self.key("nodes", &rec.name), Self::encode(rec), lease)? {
            None => Ok(()),
            Some(kv) => {
                let other: NodeRecord = Self::decode(&kv)?;
                Err(RegistryError::NodeNameTaken {
                    name: rec.name.clone(),
                    reach: other.reach,
                })
            }
        }
    }

    /// Registers a lent device under the lender's `lease`; refused when the name exists.
    pub fn register_device(&self, rec: &DeviceRecord, lease: LeaseId) -> Result<(), RegistryError> {
        check_name("device", &rec.name)?;
        check_name("node", &rec.lender)?;
        match self.create(self.key("devices", &rec.name), Self::encode(rec), lease)? {
            None => Ok(()),
            Some(kv) => {
                let other: DeviceRecord = Self::decode(&kv)?;
                Err(RegistryError::DuplicateDevice {
                    name: rec.name.clone(),
                    lender: other.lender,
                })
            }
        }
    }

    /// Removes a device `lender` registered (nothing if another lender's).
    pub fn unregister_device(&self, name: &str, lender: &str) -> Result<(), RegistryError> {
        let key = self.key("devices", name);
        for kv in self.etcd.get(&key, false)? {
            let rec: DeviceRecord = Self::decode(&kv)?;
            if rec.lender == lender {
                self.etcd.txn(
                    &[Compare::ValueIs(key.clone(), kv.value.clone())],
                    &[Op::Delete(key.clone())],
                    &[],
                )?;
            }
        }
        Ok(())
    }

    /// Claims `device` for `borrower` under the borrower's `lease`: one transaction that
    /// succeeds only if the device is registered and nobody holds it.
    pub fn claim(
        &self,
        device: &str,
        borrower: &str,
        lease: LeaseId,
    ) -> Result<Claim, RegistryError> {
        check_name("device", device)?;
        check_name("node", borrower)?;
        let dev = self.key("devices", device);
        let owner = self.key("owners", device);
        let rec = OwnerRecord {
            borrower: borrower.to_string(),
        };
        let r = self.etcd.txn(
            &[
                Compare::Present(dev.clone()),
                Compare::Absent(owner.clone()),
            ],
            &[Op::Put(owner.clone(), Self::encode(&rec), lease)],
            &[Op::Get(dev), Op::Get(owner)],
        )?;
        if r.succeeded {
            return Ok(Claim::Won);
        }
        let mut gets = r.gets.into_iter();
        let dev_kv = gets.next().and_then(|g| g.into_iter().next());
        let owner_kv = gets.next().and_then(|g| g.into_iter().next());
        if dev_kv.is_none() {
            return Err(RegistryError::NoSuchDevice(device.to_string()));
        }
        match owner_kv {
            Some(kv) => {
                let holder: OwnerRecord = Self::decode(&kv)?;
                if holder.borrower == borrower && kv.lease == lease.0 {
                    Ok(Claim::Won)
                } else {
                    Ok(Claim::Held {
                        by: holder.borrower,
                    })
                }
            }
            // Released between the comparison and the read: a retry may win.
            None => Ok(Claim::Held { by: String::new() }),
        }
    }

    /// Releases `device` if `borrower` holds it.
    pub fn release(&self, device: &str, borrower: &str) -> Result<(), RegistryError> {
        let owner = self.key("owners", device);
        let rec = OwnerRecord {
            borrower: borrower.to_string(),
        };
        self.etcd.txn(
            &[Compare::ValueIs(owner.clone(), Self::encode(&rec))],
            &[Op::Delete(owner)],
            &[],
        )?;
        Ok(())
    }

    /// Who holds `device`, if anyone.
    pub fn owner(&self, device: &str) -> Result<Option<String>, RegistryError> {
        check_name("device", device)?;
        match self.etcd.get(&self.key("owners", device), false)?.first() {
            Some(kv) => Ok(Some(Self::decode::<OwnerRecord>(kv)?.borrower)),
            None => Ok(None),
        }
    }

    /// A node's registration, if it is live.
    pub fn node(&self, name: &str) -> Result<Option<NodeRecord>, RegistryError> {
        check_name("node", name)?;
        match self.etcd.get(&self.key("nodes", name), false)?.first() {
            Some(kv) => Ok(Some(Self::decode(kv)?)),
            None => Ok(None),
        }
    }

    fn list<T: for<'de> Deserialize<'de>>(&self, kind: &str) -> Result<Vec<T>, RegistryError> {
        let mut out = Vec::new();
        for kv in self.etcd.get(&self.prefix(kind), true)? {
            match Self::decode(&kv) {
                Ok(v) => out.push(v),
                Err(e) => tracing::warn!("skipping: {e}"),
            }
        }
        Ok(out)
    }

    /// Every live node.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, RegistryError> {
        self.list("nodes")
    }

    /// Every device of the cluster with its borrower (records that do not parse are skipped
    /// and logged).
    pub fn devices(&self) -> Result<Vec<DeviceView>, RegistryError> {
        let devices: Vec<DeviceRecord> = self.list("devices")?;
        let owners = self.etcd.get(&self.prefix("owners"), true)?;
        let owner_prefix = self.prefix("owners");
        let holder = |name: &str| {
            owners.iter().find_map(|kv| {
                let n = kv.key.strip_prefix(owner_prefix.as_slice())?;
                (n == name.as_bytes())
                    .then(|| Self::decode::<OwnerRecord>(kv).ok().map(|o| o.borrower))
                    .flatten()
            })
        };
        Ok(devices
            .into_iter()
            .map(|record| {
                let borrower = holder(&record.name);
                DeviceView { record, borrower }
            })
            .collect())
    }

    /// One device with its borrower.
    pub fn device(&self, name: &str) -> Result<DeviceView, RegistryError> {
        check_name("device", name)?;
        let r = self.etcd.txn(
            &[],
            &[
                Op::Get(self.key("devices", name)),
                Op::Get(self.key("owners", name)),
            ],
            &[],
        )?;
        let mut gets = r.gets.into_iter();
        let record: DeviceRecord = match gets.next().and_then(|g| g.into_iter().next()) {
            Some(kv) => Self::decode(&kv)?,
            None => return Err(RegistryError::NoSuchDevice(name.to_string())),
        };
        let borrower = match gets.next().and_then(|g| g.into_iter().next()) {
            Some(kv) => Some(Self::decode::<OwnerRecord>(&kv)?.borrower),
            None => None,
        };
        Ok(DeviceView { record, borrower })
    }

    /// A borrower asks `lender` for a link (under the borrower's lease).
    pub fn request_link(
        &self,
        lender: &str,
        borrower: &str,
        lease: LeaseId,
    ) -> Result<(), RegistryError> {
        check_name("node", lender)?;
        check_name("node", borrower)?;
        let key = self.key("links", &format!("{lender}/{borrower}"));
        Ok(self.etcd.put(&key, b"{}", lease)?)
    }

    /// The borrower no longer needs its link to `lender`.
    pub fn drop_link_request(&self, lender: &str, borrower: &str) -> Result<(), RegistryError> {
        let key = self.key("links", &format!("{lender}/{borrower}"));
        self.etcd.delete(&key, false)?;
        Ok(())
    }

    /// The borrowers that ask `lender` for a link.
    pub fn link_requests(&self, lender: &str) -> Result<Vec<String>, RegistryError> {
        let prefix = self.key("links", &format!("{lender}/"));
        Ok(self
            .etcd
            .get(&prefix, true)?
            .into_iter()
            .filter_map(|kv| {
                let name = kv.key.strip_prefix(prefix.as_slice())?;
                let name = String::from_utf8(name.to_vec()).ok()?;
                check_name("node", &name).ok().map(|()| name)
            })
            .collect())
    }

    /// Watches the link requests to `lender` (wakes its link manager).
    pub fn watch_link_requests(&self, lender: &str) -> Result<Watch, RegistryError> {
        Ok(self
            .etcd
            .watch(&self.key("links", &format!("{lender}/")), 0)?)
    }

    /// The lender answers a link request: it listens for `borrower` on `port`.
    pub fn answer_link(
        &self,
        lender: &str,
        borrower: &str,
        port: u16,
        lease: LeaseId,
    ) -> Result<(), RegistryError> {
        let key = self.key("ports", &format!("{lender}/{borrower}"));
        Ok(self.etcd.put(&key, port.to_string().as_bytes(), lease)?)
    }

    /// Withdraws the lender's answer.
    pub fn withdraw_link(&self, lender: &str, borrower: &str) -> Result<(), RegistryError> {
        let key = self.key("ports", &format!("{lender}/{borrower}"));
        self.etcd.delete(&key, false)?;
        Ok(())
    }

    /// The port `lender` listens on for `borrower`, once it answered.
    pub fn link_port(&self, lender: &str, borrower: &str) -> Result<Option<u16>, RegistryError> {
        let key = self.key("ports", &format!("{lender}/{borrower}"));
        match self.etcd.get(&key, false)?.first() {
            None => Ok(None),
            Some(kv) => std::str::from_utf8(&kv.value)
                .ok()
                .and_then(|s| s.parse().ok())
                .map(Some)
                .ok_or_else(|| RegistryError::Malformed {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    reason: "not a port number".into(),
                }),
        }
    }

    /// Watches every device and owner record (for views that follow the cluster).
    pub fn watch_all(&self) -> Result<Watch, RegistryError> {
        Ok(self.etcd.watch(format!("{}/", self.root).as_bytes(), 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_cannot_be_keys_are_refused() {
        for ok in ["nvme0", "host-1.lab", "A_b"] {
            check_name("device", ok).unwrap();
        }
        let long = "x".repeat(64);
        for bad in ["", "a/b", "..", ".", "a b", "ü", long.as_str()] {
            let e = check_name("device", bad).unwrap_err().to_string();
            assert!(e.contains("is not valid"), "{bad:?}: {e}");
        }
    }
}
