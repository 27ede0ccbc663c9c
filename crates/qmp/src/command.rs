//! Typed QMP commands and their replies (the subset devlend uses), named as in QEMU's schema.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A QMP command: its wire name, arguments (the value itself) and reply type.
pub trait Command: Serialize {
    /// The command's name (`"execute"`).
    const NAME: &'static str;
    /// What `"return"` holds.
    type Reply: DeserializeOwned;
    /// Whether the command takes arguments (`"arguments"` is left out when not).
    const HAS_ARGUMENTS: bool = true;
}

/// An empty `{}` reply.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Empty {}

macro_rules! no_args {
    ($ty:ident, $name:literal, $reply:ty, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Copy, Debug, Default, Serialize)]
        pub struct $ty;
        impl Command for $ty {
            const NAME: &'static str = $name;
            type Reply = $reply;
            const HAS_ARGUMENTS: bool = false;
        }
    };
}

no_args!(
    QmpCapabilities,
    "qmp_capabilities",
    Empty,
    "Leaves capabilities negotiation mode (sent once, right after the greeting)."
);
no_args!(
    QueryPci,
    "query-pci",
    Vec<PciInfo>,
    "The PCI topology as the guest programmed it."
);
no_args!(
    QueryMemdev,
    "query-memdev",
    Vec<Memdev>,
    "The memory backends."
);
no_args!(
    QueryStatus,
    "query-status",
    StatusInfo,
    "Whether the guest runs."
);
no_args!(
    QueryVersion,
    "query-version",
    VersionInfo,
    "QEMU's version."
);

/// QEMU's version triple.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct VersionTriple {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Micro.
    pub micro: u32,
}

/// `query-version`'s reply (also inside the greeting).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct VersionInfo {
    /// The version.
    pub qemu: VersionTriple,
    /// The distribution's package string.
    #[serde(default)]
    pub package: String,
}

/// `query-status`'s reply.
#[derive(Clone, Debug, Deserialize)]
pub struct StatusInfo {
    /// Whether vCPUs run.
    pub running: bool,
    /// The run state (`running`, `paused`, ...).
    pub status: String,
}

/// One memory backend (`query-memdev`).
#[derive(Clone, Debug, Deserialize)]
pub struct Memdev {
    /// Its id (`-object ...,id=`).
    #[serde(default)]
    pub id: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Whether it is mapped shared (`share=on`): another process can map the same pages.
    #[serde(default)]
    pub share: Option<bool>,
}

/// One PCI bus (`query-pci`).
#[derive(Clone, Debug, Deserialize)]
pub struct PciInfo {
    /// Bus number.
    pub bus: u32,
    /// Devices on it.
    pub devices: Vec<PciDeviceInfo>,
}

/// A device's class (`query-pci`).
#[derive(Clone, Debug, Deserialize)]
pub struct PciClassInfo {
    /// Class code (base class << 8 | subclass).
    pub class: u32,
    /// QEMU's name for it.
    #[serde(default)]
    pub desc: Option<String>,
}

/// Vendor and device ids.
#[derive(Clone, Debug, Deserialize)]
pub struct PciDeviceId {
    /// Vendor id.
    pub vendor: u32,
    /// Device id.
    pub device: u32,
}

/// Bus numbers behind a bridge.
#[derive(Clone, Debug, Deserialize)]
pub struct PciBusInfo {
    /// The bridge's own bus.
    pub number: u32,
    /// Its secondary bus.
    pub secondary: u32,
    /// Its subordinate bus.
    pub subordinate: u32,
}

/// What lies behind a bridge.
#[derive(Clone, Debug, Deserialize)]
pub struct PciBridgeInfo {
    /// Bus numbers.
    pub bus: PciBusInfo,
    /// Devices on the secondary bus.
    #[serde(default)]
    pub devices: Vec<PciDeviceInfo>,
}

/// One function (`query-pci`).
#[derive(Clone, Debug, Deserialize)]
pub struct PciDeviceInfo {
    /// Bus number.
    pub bus: u32,
    /// Slot (device number).
    pub slot: u32,
    /// Function number.
    pub function: u32,
    /// Class.
    pub class_info: PciClassInfo,
    /// Ids.
    pub id: PciDeviceId,
    /// The device's QEMU id (empty when it has none).
    #[serde(default)]
    pub qdev_id: String,
    /// When it is a bridge: what lies behind it.
    #[serde(default)]
    pub pci_bridge: Option<PciBridgeInfo>,
}

impl PciDeviceInfo {
    /// The guest-visible address, `0000:BB:SS.F`.
    pub fn address(&self) -> String {
        format!(
            "0000:{:02x}:{:02x}.{:x}",
            self.bus, self.slot, self.function
        )
    }
}

/// `qom-list PATH`: the properties (and children) of an object.
#[derive(Clone, Debug, Serialize)]
pub struct QomList {
    /// The object's QOM path (`/machine/peripheral`).
    pub path: String,
}

impl Command for QomList {
    const NAME: &'static str = "qom-list";
    type Reply = Vec<ObjectPropertyInfo>;
}

/// A property of an object.
#[derive(Clone, Debug, Deserialize)]
pub struct ObjectPropertyInfo {
    /// Its name.
    pub name: String,
    /// Its type (`child<pcie-root-port>`, `bool`, ...).
    #[serde(rename = "type")]
    pub type_: String,
}

/// `qom-get PATH PROPERTY`.
#[derive(Clone, Debug, Serialize)]
pub struct QomGet {
    /// The object's QOM path.
    pub path: String,
    /// The property.
    pub property: String,
}

impl Command for QomGet {
    const NAME: &'static str = "qom-get";
    type Reply = serde_json::Value;
}

/// `device-list-properties TYPENAME`: fails with `DeviceNotFound` when QEMU lacks the device.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceListProperties {
    /// The device type (`vfio-user-pci`).
    pub typename: String,
}

impl Command for DeviceListProperties {
    const NAME: &'static str = "device-list-properties";
    type Reply = Vec<ObjectPropertyInfo>;
}

/// A socket address as QEMU's `SocketAddress` (UNIX sockets only here).
#[derive(Clone, Debug, Serialize)]
pub struct UnixSocketAddress {
    /// The socket's path.
    pub path: String,
    /// Always `"unix"`.
    #[serde(rename = "type")]
    pub type_: &'static str,
}

/// `device_add`: hot-adds a device (the JSON form, so structured properties such as
/// `vfio-user-pci`'s `socket` pass).
#[derive(Clone, Debug, Serialize)]
pub struct DeviceAdd {
    /// The device type.
    pub driver: String,
    /// Its QEMU id.
    pub id: String,
    /// The bus to plug it into (a root port's id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
    /// `vfio-user-pci`: the server's socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<UnixSocketAddress>,
}

impl DeviceAdd {
    /// A `vfio-user-pci` device served on `socket`.
    pub fn vfio_user_pci(id: &str, bus: Option<&str>, socket: &std::path::Path) -> Self {
        Self {
            driver: "vfio-user-pci".into(),
            id: id.into(),
            bus: bus.map(str::to_string),
            socket: Some(UnixSocketAddress {
                path: socket.display().to_string(),
                type_: "unix",
            }),
        }
    }
}

impl Command for DeviceAdd {
    const NAME: &'static str = "device_add";
    type Reply = Empty;
}

/// `device_del ID`: asks the guest to release the device (PCIe: an attention-button press or an
/// ACPI eject request); QEMU sends `DEVICE_DELETED` once it is gone.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceDel {
    /// The device's QEMU id.
    pub id: String,
}

impl Command for DeviceDel {
    const NAME: &'static str = "device_del";
    type Reply = Empty;
}
