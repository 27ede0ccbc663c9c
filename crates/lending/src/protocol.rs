//! The management protocol between a lender and a borrower, carried by [`crate::channel`].
//!
//! Every message is JSON (small, rare, human-debuggable); none is on a data path. Parsing is at
//! the edge: a malformed message is an error, never a panic.

use serde::{Deserialize, Serialize};

/// One BAR of a device as the lender describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarDesc {
    /// BAR slot.
    pub index: u8,
    /// Size in bytes.
    pub size: u64,
    /// 64-bit BAR.
    pub is_64bit: bool,
    /// Prefetchable.
    pub prefetchable: bool,
}

/// A device a host offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDesc {
    /// Name, unique on its host.
    pub name: String,
    /// Kind ("nvme").
    pub kind: String,
    /// Host that owns it.
    pub owner: String,
    /// Borrower holding it, if any.
    pub borrower: Option<String>,
    /// MSI-X vectors.
    pub vectors: u16,
    /// BARs.
    pub bars: Vec<BarDesc>,
    /// Free-form detail (backing image, size).
    pub detail: String,
    /// Storage capacity in bytes, for a device that has one (absent from older peers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
}

/// Part of a BAR exposed through its own window, reached by the borrower's plain loads and
/// stores: memory a device model polls (doorbells; the borrower wakes the device through its
/// sleep word), or a real device's registers (no sleep word: the device sees every access).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AreaGrant {
    /// Offset of the area in the BAR.
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// Lender's inbound window onto the area's memory.
    pub window: usize,
    /// Offset of the device's sleep word inside the window; `None` for a real device's
    /// registers.
    pub wake_word: Option<u64>,
}

/// Where a granted BAR is reached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarGrant {
    /// BAR slot.
    pub index: u8,
    /// Lender's inbound window that exposes it (all of it, as MMIO).
    pub window: usize,
    /// Size in bytes.
    pub size: u64,
    /// Memory areas of the BAR with their own windows.
    #[serde(default)]
    pub areas: Vec<AreaGrant>,
}

/// What a successful borrow returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Lease identifier, quoted in every later request.
    pub lease: u64,
    /// The device.
    pub device: DeviceDesc,
    /// BAR windows.
    pub bars: Vec<BarGrant>,
    /// Doorbell bit of vector 0; vector *v* rings bit `doorbell_base + v` on the borrower.
    pub doorbell_base: u32,
    /// Lease timeout: the borrower must send heartbeats well within it.
    pub lease_ms: u64,
}

/// Most MSI-X vectors a function may have (PCI's limit).
pub const MAX_VECTORS: u16 = 2048;
/// Most memory areas a grant may name per BAR.
pub const MAX_AREAS: usize = 16;
/// Doorbell bits a link has for interrupt vectors (bit 63 is never one of them).
pub const DOORBELL_BITS: u32 = 63;

impl Grant {
    /// Range checks of every value a borrower later computes with (doorbell bits, BAR slots
    /// and sizes, areas and their wake words), so that none of them can wrap or index out of
    /// range: a grant comes from a peer.
    pub fn validate(&self) -> Result<(), String> {
        let vectors = self.device.vectors;
        if vectors > MAX_VECTORS {
            return Err(format!("{vectors} interrupt vectors"));
        }
        match self.doorbell_base.checked_add(u32::from(vectors)) {
            Some(end) if end <= DOORBELL_BITS => {}
            _ => {
                return Err(format!(
                    "doorbell bits {} + {vectors} are outside the {DOORBELL_BITS} a link has",
                    self.doorbell_base
                ))
            }
        }
        if self.bars.len() > 6 {
            return Err(format!("{} BARs", self.bars.len()));
        }
        for b in &self.bars {
            if b.index > 5 {
                return Err(format!("BAR{}", b.index));
            }
            if b.size == 0 || !b.size.is_power_of_two() {
                return Err(format!("BAR{} of {:#x} bytes", b.index, b.size));
            }
            if b.areas.len() > MAX_AREAS {
                return Err(format!("{} areas in BAR{}", b.areas.len(), b.index));
            }
            for a in &b.areas {
                match a.offset.checked_add(a.len) {
                    Some(end) if a.len > 0 && end <= b.size => {}
                    _ => {
                        return Err(format!(
                            "area {:#x} + {:#x} outside BAR{} ({:#x} bytes)",
                            a.offset, a.len, b.index, b.size
                        ))
                    }
                }
                if let Some(w) = a.wake_word {
                    if w.checked_add(4).is_none_or(|end| end > a.len) {
                        return Err(format!("wake word at {w:#x}"));
                    }
                }
            }
        }
        Ok(())
    }
}

/// A request from one host to the other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Introduce ourselves (name) after link-up.
    Hello {
        /// The sender's host name.
        host: String,
    },
    /// The devices the receiver offers.
    List,
    /// Borrow a device.
    Borrow {
        /// Device name.
        device: String,
        /// Borrowing host's name.
        borrower: String,
        /// Requested lease timeout.
        lease_ms: u64,
    },
    /// Give a device back.
    Return {
        /// Lease.
        lease: u64,
    },
    /// Keep a lease alive.
    Heartbeat {
        /// Lease.
        lease: u64,
    },
    /// Config-space read (the `pci_ops` read).
    ConfigRead {
        /// Lease.
        lease: u64,
        /// Offset.
        offset: u16,
        /// Size (1, 2, 4).
        size: u8,
    },
    /// Config-space write (the `pci_ops` write).
    ConfigWrite {
        /// Lease.
        lease: u64,
        /// Offset.
        offset: u16,
        /// Size (1, 2, 4).
        size: u8,
        /// Value.
        value: u32,
    },
    /// Map borrower memory for the device's DMA: device bus addresses `[iova, iova + len)`
    /// resolve to `[offset, offset + len)` of the borrower's inbound `window` (which the borrower
    /// translated onto that memory).
    MapDma {
        /// Lease.
        lease: u64,
        /// Device-visible address.
        iova: u64,
        /// Length.
        len: u64,
        /// Borrower's inbound window.
        window: usize,
        /// Offset of `iova`'s memory inside the window.
        #[serde(default)]
        offset: u64,
        /// Whether the device may write.
        writable: bool,
    },
    /// Remove DMA mappings inside `[iova, iova + len)`.
    UnmapDma {
        /// Lease.
        lease: u64,
        /// Start.
        iova: u64,
        /// Length.
        len: u64,
    },
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Response {
    /// Done, nothing to return.
    Ok,
    /// The peer's name.
    Hello {
        /// Host name.
        host: String,
    },
    /// Device list.
    Devices {
        /// Devices.
        devices: Vec<DeviceDesc>,
    },
    /// Borrow granted.
    Granted {
        /// The grant.
        grant: Grant,
    },
    /// A config read's value.
    Value {
        /// Value.
        value: u32,
    },
    /// Refused, with a reason meant for a person.
    Error {
        /// Why.
        message: String,
    },
}

/// An unsolicited notice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The lender is taking the device back (`devlend reclaim`): the borrower has `grace_ms`
    /// to finish outstanding I/O and give it back; then the lease is revoked.
    Reclaiming {
        /// Lease.
        lease: u64,
        /// Milliseconds until the lease is revoked.
        grace_ms: u64,
        /// Why.
        reason: String,
    },
    /// The lender took a device back (lease expiry, forced take-back, shutdown).
    Revoked {
        /// Lease.
        lease: u64,
        /// Why.
        reason: String,
    },
}

/// Everything that travels on the channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Envelope {
    /// A request expecting a response with the same id.
    Request {
        /// Correlation id.
        id: u64,
        /// The request.
        body: Request,
    },
    /// The response to request `id`.
    Response {
        /// Correlation id.
        id: u64,
        /// The response.
        body: Response,
    },
    /// A notice.
    Event {
        /// The event.
        body: Event,
    },
}

/// A message that could not be understood.
#[derive(Debug, thiserror::Error)]
#[error("malformed management message: {0}")]
pub struct ParseError(#[from] serde_json::Error);

impl Envelope {
    /// Parses bytes received from the peer.
    pub fn parse(bytes: &[u8]) -> Result<Self, ParseError> {
        Ok(serde_json::from_slice(bytes)?)
    }

    /// Encodes for sending.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising these plain data types cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let e = Envelope::Request {
            id: 7,
            body: Request::ConfigWrite {
                lease: 1,
                offset: 4,
                size: 2,
                value: 6,
            },
        };
        assert_eq!(Envelope::parse(&e.encode()).unwrap(), e);
        assert!(Envelope::parse(b"{\"kind\":\"request\"").is_err());
        assert!(Envelope::parse(b"\xff\xfe").is_err());
        assert!(Envelope::parse(b"{\"kind\":\"nope\",\"id\":1}").is_err());
    }
}
