//! A borrowed device in a *running* VM: hot-added through QEMU's QMP onto a free hot-pluggable
//! PCIe port, and taken back in order (`device_del`, the guest releases it, `DEVICE_DELETED`)
//! or, when the guest does not release it within a grace period, by surprise removal.
//!
//! Everything that can be checked is checked before the device is borrowed ([`preflight`]),
//! so a refusal changes nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use devlend_qmp::command::{
    DeviceAdd, DeviceDel, DeviceListProperties, PciDeviceInfo, QomGet, QomList, QueryMemdev,
    QueryPci,
};
use devlend_qmp::Qmp;

/// How long a QMP command may take before the VM counts as not answering.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `borrow --vm` waits for a QMP socket that does not exist yet (a QEMU started just
/// before makes it in its first second).
pub const QMP_APPEAR: Duration = Duration::from_secs(10);

/// Default grace period of `devlend return` for a device attached to a VM.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(20);

/// Port types a device can be hot-added to.
const HOTPLUG_PORTS: &[&str] = &["pcie-root-port", "ioh3420", "xio3130-downstream"];

/// What can go wrong attaching to or detaching from a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The QMP socket is missing, not QEMU, or not answering.
    #[error(transparent)]
    Qmp(#[from] devlend_qmp::Error),
    /// QEMU lacks the vfio-user client.
    #[error("the QEMU at {qmp} ({version}) has no vfio-user-pci device; use QEMU >= 10.1")]
    NoVfioUser {
        /// The QMP socket.
        qmp: PathBuf,
        /// QEMU's version.
        version: String,
    },
    /// Guest RAM is not in shareable, fd-backed memory.
    #[error("the guest RAM of the VM at {qmp} is not shareable ({why}): start QEMU with -object memory-backend-memfd,id=mem,size=SIZE,share=on -machine memory-backend=mem")]
    RamNotShared {
        /// The QMP socket.
        qmp: PathBuf,
        /// Which backend, or that there is none.
        why: String,
    },
    /// The device id is taken.
    #[error("the VM at {qmp} already has a device with id {id}; give another with --id")]
    IdInUse {
        /// The QMP socket.
        qmp: PathBuf,
        /// The id.
        id: String,
    },
    /// The named port does not exist or is not a hot-pluggable PCIe port.
    #[error("the VM at {qmp} has no hot-pluggable port {port} (its hot-pluggable ports: {known})")]
    UnknownPort {
        /// The QMP socket.
        qmp: PathBuf,
        /// The port asked for.
        port: String,
        /// The ports it has.
        known: String,
    },
    /// The named port holds a device already.
    #[error("port {port} of the VM at {qmp} is occupied (by {by})")]
    PortBusy {
        /// The QMP socket.
        qmp: PathBuf,
        /// The port.
        port: String,
        /// What sits there.
        by: String,
    },
    /// All hot-pluggable ports are taken (or there are none).
    #[error("the VM at {qmp} has no free hot-pluggable port (start it with free ones, e.g. -device pcie-root-port,id=rp1,chassis=1,bus=pcie.0)")]
    NoFreePort {
        /// The QMP socket.
        qmp: PathBuf,
    },
    /// A device name that cannot become a QEMU id.
    #[error(
        "{0:?} cannot be a QEMU device id (letters, digits, '-', '.', '_', starting with a letter)"
    )]
    BadId(String),
}

/// A hot-pluggable port found free.
#[derive(Clone, Debug)]
pub struct Port {
    /// Its QEMU id (the bus to plug into).
    pub id: String,
}

pub use crate::proto::{Removal, VmAttachment as Attachment};

/// The QEMU device id for a borrowed device `name`: `devlend-NAME`.
pub fn device_id(name: &str) -> Result<String, VmError> {
    let id = format!("devlend-{name}");
    let ok = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok {
        Ok(id)
    } else {
        Err(VmError::BadId(id))
    }
}

fn is_valid_id(id: &str) -> bool {
    id.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// Checks that the VM at `qmp_path` (waited for up to [`QMP_APPEAR`] if it has no socket
/// yet) can take a vfio-user device with id `id` (on `port`, or on any free hot-pluggable
/// port), without changing anything. Returns the connection and the port.
pub fn preflight(qmp_path: &Path, port: Option<&str>, id: &str) -> Result<(Qmp, Port), VmError> {
    if !is_valid_id(id) {
        return Err(VmError::BadId(id.to_string()));
    }
    let mut told = false;
    let mut qmp = Qmp::connect_when_made(qmp_path, QMP_APPEAR, QMP_TIMEOUT, |_| {
        if !std::mem::replace(&mut told, true) {
            tracing::info!(
                "no QMP socket at {} yet: waiting up to {QMP_APPEAR:?} for QEMU to make it",
                qmp_path.display()
            );
        }
    })?;
    let path = qmp_path.to_path_buf();
    match qmp.execute(&DeviceListProperties {
        typename: "vfio-user-pci".into(),
    }) {
        Ok(_) => {}
        Err(devlend_qmp::Error::Command { class, .. }) if class == "DeviceNotFound" => {
            let v = &qmp.greeting().version.qemu;
            return Err(VmError::NoVfioUser {
                qmp: path,
                version: format!("{}.{}.{}", v.major, v.minor, v.micro),
            });
        }
        Err(e) => return Err(e.into()),
    }
    check_ram_shared(&mut qmp, &path)?;
    let peripherals = qmp.execute(&QomList {
        path: "/machine/peripheral".into(),
    })?;
    if peripherals.iter().any(|p| p.name == id) {
        return Err(VmError::IdInUse {
            qmp: path,
            id: id.to_string(),
        });
    }
    // Hot-pluggable ports the user created (they have ids), in creation order.
    let mut ports = Vec::new();
    for p in &peripherals {
        let Some(ty) = p
            .type_
            .strip_prefix("child<")
            .and_then(|t| t.strip_suffix('>'))
        else {
            continue;
        };
        if !HOTPLUG_PORTS.contains(&ty) {
            continue;
        }
        let hotplug = qmp.execute(&QomGet {
            path: format!("/machine/peripheral/{}", p.name),
            property: "hotplug".into(),
        });
        // Ports without the property (older QEMU) are hot-pluggable.
        if matches!(hotplug, Ok(serde_json::Value::Bool(false))) {
            continue;
        }
        ports.push(p.name.clone());
    }
    let pci = qmp.execute(&QueryPci)?;
    // What each device created on the command line or by device_add sits on: query-pci lists
    // a bridge's devices only once the firmware numbered its bus (not in a VM started with
    // -S and not yet run), so the QOM parent bus decides too.
    let mut on_bus: Vec<(String, String)> = Vec::new();
    for container in ["/machine/peripheral", "/machine/peripheral-anon"] {
        let children = match qmp.execute(&QomList {
            path: container.into(),
        }) {
            Ok(c) => c,
            Err(devlend_qmp::Error::Command { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        for c in children.iter().filter(|c| c.type_.starts_with("child<")) {
            let dev = format!("{container}/{}", c.name);
            if let Ok(serde_json::Value::String(bus)) = qmp.execute(&QomGet {
                path: dev,
                property: "parent_bus".into(),
            }) {
                on_bus.push((c.name.clone(), bus));
            }
        }
    }
    let occupant = |port: &str| -> Option<String> {
        let listed = pci
            .iter()
            .flat_map(|b| all_devices(&b.devices))
            .find(|d| d.qdev_id == port)
            .and_then(|bridge| bridge.pci_bridge.as_ref()?.devices.first());
        if let Some(first) = listed {
            return Some(if first.qdev_id.is_empty() {
                first.address()
            } else {
                format!("{} at {}", first.qdev_id, first.address())
            });
        }
        let below = format!("/machine/peripheral/{port}/");
        on_bus
            .iter()
            .find(|(_, bus)| bus.starts_with(&below))
            .map(|(name, _)| name.clone())
    };
    let chosen = match port {
        Some(p) => {
            if !ports.iter().any(|x| x == p) {
                return Err(VmError::UnknownPort {
                    qmp: path,
                    port: p.to_string(),
                    known: if ports.is_empty() {
                        "none".into()
                    } else {
                        ports.join(", ")
                    },
                });
            }
            if let Some(by) = occupant(p) {
                return Err(VmError::PortBusy {
                    qmp: path,
                    port: p.to_string(),
                    by,
                });
            }
            p.to_string()
        }
        None => ports
            .iter()
            .find(|p| occupant(p).is_none())
            .cloned()
            .ok_or(VmError::NoFreePort { qmp: path })?,
    };
    Ok((qmp, Port { id: chosen }))
}

/// Guest RAM must live in shared, fd-backed backends: the machine's RAM backend and every
/// other backend (NUMA nodes) must say `share`.
fn check_ram_shared(qmp: &mut Qmp, path: &Path) -> Result<(), VmError> {
    let backend = qmp.execute(&QomGet {
        path: "/machine".into(),
        property: "memory-backend".into(),
    });
    let memdevs = qmp.execute(&QueryMemdev)?;
    let refuse = |why: String| VmError::RamNotShared {
        qmp: path.to_path_buf(),
        why,
    };
    let has_backend = matches!(&backend, Ok(serde_json::Value::String(s)) if !s.is_empty());
    if !has_backend && memdevs.is_empty() {
        return Err(refuse("plain -m RAM, no memory backend".into()));
    }
    if let Some(m) = memdevs.iter().find(|m| m.share != Some(true)) {
        return Err(refuse(format!(
            "backend {} has share=off",
            m.id.as_deref().unwrap_or("(unnamed)")
        )));
    }
    Ok(())
}

fn all_devices(devs: &[PciDeviceInfo]) -> Vec<&PciDeviceInfo> {
    let mut out = Vec::new();
    for d in devs {
        out.push(d);
        if let Some(b) = &d.pci_bridge {
            out.extend(all_devices(&b.devices));
        }
    }
    out
}

/// Hot-adds the vfio-user device served on `socket` as `id` on `port`, and reads back where
/// the guest sees it.
pub fn attach(
    mut qmp: Qmp,
    qmp_path: &Path,
    id: &str,
    port: &Port,
    socket: &Path,
) -> Result<Attachment, VmError> {
    qmp.execute(&DeviceAdd::vfio_user_pci(id, Some(&port.id), socket))?;
    let guest_address = qmp.execute(&QueryPci).ok().and_then(|pci| {
        pci.iter()
            .flat_map(|b| all_devices(&b.devices))
            .find(|d| d.qdev_id == id)
            .map(PciDeviceInfo::address)
    });
    Ok(Attachment {
        qmp: qmp_path.to_path_buf(),
        device_id: id.to_string(),
        port: port.id.clone(),
        guest_address,
        vfio_user: socket.to_path_buf(),
    })
}

/// How often [`detach`] asks again while the guest has not released the device. A request
/// made before the guest's OS set up hot-plug is lost (Linux clears the ACPI hot-plug event
/// while it boots, and QEMU accepts the request again for that reason); a native PCIe one is
/// refused by QEMU for 5 s, and one pressed again during the guest's 5 s pciehp wait would
/// cancel the removal, so the repeat comes well after that wait.
pub const ASK_AGAIN_EVERY: Duration = Duration::from_secs(10);

/// What one `device_del` found.
enum Asked {
    /// QEMU passed the request on to the guest.
    Sent,
    /// QEMU refused it because an unplug is pending (native PCIe: within 5 s of the last).
    Pending,
    /// QEMU has no such device: it is gone.
    Gone,
}

fn ask_release(qmp: &mut Qmp, id: &str) -> Result<Asked, VmError> {
    match qmp.execute(&DeviceDel { id: id.to_string() }) {
        Ok(_) => Ok(Asked::Sent),
        Err(devlend_qmp::Error::Command { class, .. }) if class == "DeviceNotFound" => {
            Ok(Asked::Gone)
        }
        // "Device ID is already in the process of unplug": an unplug requested moments ago
        // (by this loop, or by an earlier return that ended in a surprise removal).
        Err(devlend_qmp::Error::Command { desc, .. }) if desc.contains("process of unplug") => {
            Ok(Asked::Pending)
        }
        Err(e) => Err(e.into()),
    }
}

/// Asks the guest to release the device and waits at most `grace` for QEMU's
/// `DEVICE_DELETED`, asking again every [`ASK_AGAIN_EVERY`] (a guest that was still booting
/// when first asked never saw the request). The caller then stops serving it, whichever way
/// it went.
pub fn detach(att: &Attachment, grace: Duration) -> Result<Removal, VmError> {
    let mut qmp = match Qmp::connect(&att.qmp, QMP_TIMEOUT) {
        Ok(q) => q,
        // QEMU is gone: nothing holds the device any more.
        Err(devlend_qmp::Error::Connect { .. }) => return Ok(Removal::AlreadyGone),
        Err(e) => return Err(e.into()),
    };
    let id = att.device_id.clone();
    let deadline = std::time::Instant::now() + grace;
    let mut asked = 0u32;
    loop {
        match ask_release(&mut qmp, &id)? {
            Asked::Gone if asked == 0 => return Ok(Removal::AlreadyGone),
            // Gone between two requests: the guest let it go (its event read below or lost
            // with an earlier connection).
            Asked::Gone => return Ok(Removal::Orderly),
            Asked::Sent => {
                asked = asked.saturating_add(1);
                if asked == 1 {
                    tracing::info!(
                        "{id}: asked the guest to release it (device_del), waiting up to {grace:?}"
                    );
                } else {
                    tracing::info!(
                        "{id}: the guest has not released it yet; asked again (request {asked})"
                    );
                }
            }
            Asked::Pending => {}
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let wait = left.min(ASK_AGAIN_EVERY);
        match qmp.wait_event(wait, |e| {
            e.device_deleted().and_then(|d| d.device).as_deref() == Some(id.as_str())
        }) {
            Ok(Some(_)) => return Ok(Removal::Orderly),
            Ok(None) if wait >= left => return Ok(Removal::Surprise),
            Ok(None) => {}
            // QEMU closed the connection while the guest released the device: it exited.
            Err(devlend_qmp::Error::Closed { .. }) => return Ok(Removal::AlreadyGone),
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids() {
        assert_eq!(device_id("nvme0").unwrap(), "devlend-nvme0");
        assert!(device_id("a b").is_err());
        assert!(device_id("x/y").is_err());
        assert!(is_valid_id("devlend-nvme0"));
        assert!(!is_valid_id("0abc"));
        assert!(!is_valid_id(""));
    }
}
