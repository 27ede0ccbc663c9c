//! QMP events (asynchronous messages QEMU sends between replies).

use serde::Deserialize;

/// An event as it arrived.
#[derive(Clone, Debug, Deserialize)]
pub struct Event {
    /// Its name (`DEVICE_DELETED`, ...).
    pub event: String,
    /// Its data (absent for some events).
    #[serde(default)]
    pub data: serde_json::Value,
}

/// `DEVICE_DELETED`: a device is gone from QEMU (the guest released it, or it never was
/// visible to the guest).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct DeviceDeleted {
    /// The device's id (absent for devices without one).
    #[serde(default)]
    pub device: Option<String>,
    /// Its QOM path.
    pub path: String,
}

/// `DEVICE_UNPLUG_GUEST_ERROR`: the guest refused an unplug request.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct DeviceUnplugGuestError {
    /// The device's id.
    #[serde(default)]
    pub device: Option<String>,
    /// Its QOM path.
    pub path: String,
}

impl Event {
    /// The data of a `DEVICE_DELETED` event.
    pub fn device_deleted(&self) -> Option<DeviceDeleted> {
        (self.event == "DEVICE_DELETED")
            .then(|| serde_json::from_value(self.data.clone()).ok())
            .flatten()
    }

    /// The data of a `DEVICE_UNPLUG_GUEST_ERROR` event.
    pub fn unplug_guest_error(&self) -> Option<DeviceUnplugGuestError> {
        (self.event == "DEVICE_UNPLUG_GUEST_ERROR")
            .then(|| serde_json::from_value(self.data.clone()).ok())
            .flatten()
    }
}
