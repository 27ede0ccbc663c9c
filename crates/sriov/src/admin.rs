//! NVMe admin commands for SR-IOV (Identify CNS 14h/15h, Virtualization Management 1Ch) as
//! typed values, and the structures they return parsed at the edge.
//!
//! Layouts from the NVMe Base Specification (2.0): Figure "Primary Controller Capabilities
//! Structure", "Secondary Controller List" / "Secondary Controller Entry", and the
//! Virtualization Management command's CDW10/CDW11.

use std::fmt;

use devlend_nvme_spec::opcode::admin::{IDENTIFY, VIRTUALIZATION_MANAGEMENT};

/// Bytes an Identify command returns.
pub const IDENTIFY_LEN: usize = 4096;
const CNS_PRIMARY_CAPS: u32 = 0x14;
const CNS_SECONDARY_LIST: u32 = 0x15;
/// Secondary Controller List: entries start at byte 32, 32 bytes each, at most 127.
const SEC_ENTRY_LEN: usize = 32;
const SEC_MAX_ENTRIES: usize = 127;

/// A controller identifier (CNTLID) in the NVM subsystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CntlId(pub u16);

impl fmt::Display for CntlId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A flexible resource type of Virtualization Management (RT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    /// VQ: a submission/completion queue pair (the admin queue counts as one).
    Queue = 0,
    /// VI: an interrupt (MSI-X vector).
    Interrupt = 1,
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::Queue => "queue",
            Resource::Interrupt => "interrupt",
        })
    }
}

/// A Virtualization Management action (ACT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtAction {
    /// 1h: set the primary controller's flexible allocation (takes effect at its next reset).
    PrimaryFlexible = 0x1,
    /// 7h: take a secondary controller offline (its flexible resources are released).
    SecondaryOffline = 0x7,
    /// 8h: assign flexible resources to an offline secondary controller.
    SecondaryAssign = 0x8,
    /// 9h: bring a secondary controller online.
    SecondaryOnline = 0x9,
}

/// The admin commands this crate sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminCmd {
    /// Identify, CNS 14h: the Primary Controller Capabilities of the controller asked.
    IdentifyPrimaryCaps,
    /// Identify, CNS 15h: its secondary controllers, from this identifier up.
    IdentifySecondaryList {
        /// The lowest controller identifier to list.
        from: CntlId,
    },
    /// Virtualization Management.
    VirtMgmt {
        /// What to do.
        action: VirtAction,
        /// Which kind of resource (ignored by the device for online/offline).
        resource: Resource,
        /// The controller it applies to.
        cntlid: CntlId,
        /// How many resources (NR).
        count: u16,
    },
}

/// An admin command's wire fields (what the passthrough ioctl carries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// Opcode.
    pub opcode: u8,
    /// Command Dword 10.
    pub cdw10: u32,
    /// Command Dword 11.
    pub cdw11: u32,
    /// Bytes the controller returns (0 for none).
    pub data_len: u32,
}

impl AdminCmd {
    /// The command's wire fields.
    pub fn encode(&self) -> Encoded {
        match *self {
            AdminCmd::IdentifyPrimaryCaps => Encoded {
                opcode: IDENTIFY,
                cdw10: CNS_PRIMARY_CAPS,
                cdw11: 0,
                data_len: IDENTIFY_LEN as u32,
            },
            AdminCmd::IdentifySecondaryList { from } => Encoded {
                opcode: IDENTIFY,
                cdw10: CNS_SECONDARY_LIST | (u32::from(from.0) << 16),
                cdw11: 0,
                data_len: IDENTIFY_LEN as u32,
            },
            AdminCmd::VirtMgmt {
                action,
                resource,
                cntlid,
                count,
            } => Encoded {
                opcode: VIRTUALIZATION_MANAGEMENT,
                cdw10: (action as u32) | ((resource as u32) << 8) | (u32::from(cntlid.0) << 16),
                cdw11: u32::from(count),
                data_len: 0,
            },
        }
    }
}

impl fmt::Display for AdminCmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminCmd::IdentifyPrimaryCaps => f.write_str("Identify Primary Controller Capabilities"),
            AdminCmd::IdentifySecondaryList { .. } => f.write_str("Identify Secondary Controller List"),
            AdminCmd::VirtMgmt {
                action,
                resource,
                cntlid,
                count,
            } => match action {
                VirtAction::PrimaryFlexible => write!(
                    f,
                    "Virtualization Management: primary controller {cntlid} keeps {count} flexible {resource} resources"
                ),
                VirtAction::SecondaryOffline => write!(
                    f,
                    "Virtualization Management: secondary controller {cntlid} offline"
                ),
                VirtAction::SecondaryAssign => write!(
                    f,
                    "Virtualization Management: assign {count} {resource} resources to secondary controller {cntlid}"
                ),
                VirtAction::SecondaryOnline => write!(
                    f,
                    "Virtualization Management: secondary controller {cntlid} online"
                ),
            },
        }
    }
}

/// An NVMe completion status (Status Field without the phase bit: DNR, More, SCT, SC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status(pub u16);

impl Status {
    /// Status Code Type and Status Code (what identifies the error).
    pub fn code(self) -> u16 {
        self.0 & 0x7ff
    }

    fn meaning(self) -> &'static str {
        match self.code() {
            0x001 => "Invalid Command Opcode (the controller has no Virtualization Management)",
            0x002 => "Invalid Field in Command",
            0x00b => "Invalid Namespace or Format",
            0x11f => "Invalid Controller Identifier",
            0x120 => "Invalid Secondary Controller State",
            0x121 => "Invalid Number of Controller Resources",
            0x122 => "Invalid Resource Identifier (not that many free flexible resources)",
            _ => "see the NVMe specification's status codes",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "status {:#05x}: {}{}",
            self.code(),
            self.meaning(),
            if self.0 & 0x4000 != 0 {
                " (do not retry)"
            } else {
                ""
            }
        )
    }
}

/// What went wrong parsing a structure the controller returned.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than the structure.
    #[error("{what}: {len} bytes, expected {want}")]
    Short {
        /// The structure.
        what: &'static str,
        /// Bytes given.
        len: usize,
        /// Bytes needed.
        want: usize,
    },
    /// More secondary controllers than the list can hold.
    #[error("secondary controller list claims {0} entries (at most 127)")]
    TooManyEntries(u8),
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    match b.get(at..at + 2) {
        Some(&[lo, hi]) => u16::from_le_bytes([lo, hi]),
        _ => 0,
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    match b.get(at..at + 4) {
        Some(&[a, c, d, e]) => u32::from_le_bytes([a, c, d, e]),
        _ => 0,
    }
}

fn need(what: &'static str, b: &[u8], want: usize) -> Result<(), ParseError> {
    if b.len() < want {
        return Err(ParseError::Short {
            what,
            len: b.len(),
            want,
        });
    }
    Ok(())
}

/// One resource type's line of the Primary Controller Capabilities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flexible {
    /// Total flexible resources (VQFRT / VIFRT).
    pub total: u32,
    /// Assigned to secondary controllers (VQRFA / VIRFA).
    pub assigned_secondary: u32,
    /// Allocated to the primary controller (VQRFAP / VIRFAP).
    pub allocated_primary: u16,
    /// Private to the primary controller (VQPRT / VIPRT).
    pub private_primary: u16,
    /// The most one secondary controller may be given (VQFRSM / VIFRSM).
    pub max_per_secondary: u16,
}

impl Flexible {
    fn parse(b: &[u8], at: usize) -> Self {
        Self {
            total: u32_at(b, at),
            assigned_secondary: u32_at(b, at + 4),
            allocated_primary: u16_at(b, at + 8),
            private_primary: u16_at(b, at + 10),
            max_per_secondary: u16_at(b, at + 12),
        }
    }

    /// Neither the primary nor a secondary holds them.
    pub fn free(&self) -> u32 {
        self.total
            .saturating_sub(self.assigned_secondary)
            .saturating_sub(u32::from(self.allocated_primary))
    }
}

/// Identify CNS 14h: the Primary Controller Capabilities Structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrimaryCaps {
    /// The primary controller's identifier.
    pub cntlid: CntlId,
    /// Controller Resource Types: bit 0 VQ, bit 1 VI.
    pub crt: u8,
    /// Queue resources.
    pub queues: Flexible,
    /// Interrupt resources.
    pub interrupts: Flexible,
}

impl PrimaryCaps {
    /// Parses the structure (the first 80 bytes are read).
    pub fn parse(b: &[u8]) -> Result<Self, ParseError> {
        need("primary controller capabilities", b, 80)?;
        Ok(Self {
            cntlid: CntlId(u16_at(b, 0)),
            crt: b.get(4).copied().unwrap_or(0),
            queues: Flexible::parse(b, 32),
            interrupts: Flexible::parse(b, 64),
        })
    }

    /// Whether queues and interrupts are both flexible resources.
    pub fn manages_queues_and_interrupts(&self) -> bool {
        self.crt & 0b11 == 0b11
    }

    /// The line for `r`.
    pub fn flexible(&self, r: Resource) -> &Flexible {
        match r {
            Resource::Queue => &self.queues,
            Resource::Interrupt => &self.interrupts,
        }
    }
}

/// One entry of the Secondary Controller List.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SecondaryCtrl {
    /// Its controller identifier (SCID).
    pub scid: CntlId,
    /// Its primary controller (PCID).
    pub pcid: CntlId,
    /// Online (SCS bit 0).
    pub online: bool,
    /// Its virtual function number (VFN, 1-based; 0 for none).
    pub vfn: u16,
    /// Queue resources assigned (NVQ).
    pub queues: u16,
    /// Interrupt resources assigned (NVI).
    pub interrupts: u16,
}

/// Identify CNS 15h: the Secondary Controller List.
pub fn parse_secondary_list(b: &[u8]) -> Result<Vec<SecondaryCtrl>, ParseError> {
    need("secondary controller list", b, 1)?;
    let n = b.first().copied().unwrap_or(0);
    if usize::from(n) > SEC_MAX_ENTRIES {
        return Err(ParseError::TooManyEntries(n));
    }
    let end = SEC_ENTRY_LEN * (usize::from(n) + 1);
    need("secondary controller list", b, end)?;
    Ok((1..=usize::from(n))
        .map(|i| {
            let e = SEC_ENTRY_LEN * i;
            SecondaryCtrl {
                scid: CntlId(u16_at(b, e)),
                pcid: CntlId(u16_at(b, e + 2)),
                online: b.get(e + 4).is_some_and(|s| s & 1 != 0),
                vfn: u16_at(b, e + 8),
                queues: u16_at(b, e + 10),
                interrupts: u16_at(b, e + 12),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtualization_management_fields() {
        // nvme-cli's `virt-mgmt -c 2 -r 1 -a 8 -n 3`: ACT 3:0, RT 10:8, CNTLID 31:16, NR 15:0.
        let e = AdminCmd::VirtMgmt {
            action: VirtAction::SecondaryAssign,
            resource: Resource::Interrupt,
            cntlid: CntlId(2),
            count: 3,
        }
        .encode();
        assert_eq!(
            e,
            Encoded {
                opcode: 0x1c,
                cdw10: 0x0002_0108,
                cdw11: 3,
                data_len: 0
            }
        );
        let on = AdminCmd::VirtMgmt {
            action: VirtAction::SecondaryOnline,
            resource: Resource::Queue,
            cntlid: CntlId(0x1234),
            count: 0,
        }
        .encode();
        assert_eq!((on.cdw10, on.cdw11), (0x1234_0009, 0));
        let prim = AdminCmd::VirtMgmt {
            action: VirtAction::PrimaryFlexible,
            resource: Resource::Queue,
            cntlid: CntlId(0),
            count: 0,
        }
        .encode();
        assert_eq!(prim.cdw10, 0x1);
    }

    #[test]
    fn identify_fields() {
        let p = AdminCmd::IdentifyPrimaryCaps.encode();
        assert_eq!((p.opcode, p.cdw10, p.data_len), (0x06, 0x14, 4096));
        let s = AdminCmd::IdentifySecondaryList { from: CntlId(5) }.encode();
        assert_eq!((s.opcode, s.cdw10, s.data_len), (0x06, 0x0005_0015, 4096));
    }

    fn caps_bytes() -> Vec<u8> {
        let mut b = vec![0u8; IDENTIFY_LEN];
        b[0..2].copy_from_slice(&7u16.to_le_bytes());
        b[4] = 0b11;
        b[32..36].copy_from_slice(&6u32.to_le_bytes()); // VQFRT
        b[36..40].copy_from_slice(&2u32.to_le_bytes()); // VQRFA
        b[40..42].copy_from_slice(&1u16.to_le_bytes()); // VQRFAP
        b[42..44].copy_from_slice(&59u16.to_le_bytes()); // VQPRT
        b[44..46].copy_from_slice(&3u16.to_le_bytes()); // VQFRSM
        b[64..68].copy_from_slice(&4u32.to_le_bytes()); // VIFRT
        b[76..78].copy_from_slice(&2u16.to_le_bytes()); // VIFRSM
        b
    }

    #[test]
    fn primary_caps() {
        let c = PrimaryCaps::parse(&caps_bytes()).unwrap();
        assert_eq!(c.cntlid, CntlId(7));
        assert!(c.manages_queues_and_interrupts());
        assert_eq!(
            c.queues,
            Flexible {
                total: 6,
                assigned_secondary: 2,
                allocated_primary: 1,
                private_primary: 59,
                max_per_secondary: 3
            }
        );
        assert_eq!(c.queues.free(), 3);
        assert_eq!(c.interrupts.total, 4);
        assert_eq!(c.flexible(Resource::Interrupt).max_per_secondary, 2);
        assert!(matches!(
            PrimaryCaps::parse(&[0u8; 79]),
            Err(ParseError::Short { .. })
        ));
        // A controller that lies about its totals cannot make `free` wrap.
        let mut b = caps_bytes();
        b[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(PrimaryCaps::parse(&b).unwrap().queues.free(), 0);
    }

    #[test]
    fn secondary_list() {
        let mut b = vec![0u8; IDENTIFY_LEN];
        b[0] = 2;
        for (i, (scid, online, vfn, nvq, nvi)) in [(1u16, 0u8, 1u16, 0u16, 0u16), (2, 1, 2, 3, 2)]
            .iter()
            .enumerate()
        {
            let e = 32 * (i + 1);
            b[e..e + 2].copy_from_slice(&scid.to_le_bytes());
            b[e + 4] = *online;
            b[e + 8..e + 10].copy_from_slice(&vfn.to_le_bytes());
            b[e + 10..e + 12].copy_from_slice(&nvq.to_le_bytes());
            b[e + 12..e + 14].copy_from_slice(&nvi.to_le_bytes());
        }
        let l = parse_secondary_list(&b).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(
            l[1],
            SecondaryCtrl {
                scid: CntlId(2),
                pcid: CntlId(0),
                online: true,
                vfn: 2,
                queues: 3,
                interrupts: 2
            }
        );
        assert!(!l[0].online);
        b[0] = 128;
        assert_eq!(
            parse_secondary_list(&b),
            Err(ParseError::TooManyEntries(128))
        );
        b[0] = 3;
        assert!(matches!(
            parse_secondary_list(&b[..100]),
            Err(ParseError::Short { .. })
        ));
        assert_eq!(parse_secondary_list(&[0u8; 32]).unwrap(), vec![]);
        assert!(
            parse_secondary_list(&[0]).is_err(),
            "the header is 32 bytes"
        );
    }

    #[test]
    fn status_names_the_error() {
        let s = Status(0x4122).to_string();
        assert!(
            s.contains("0x122") && s.contains("free flexible") && s.contains("do not retry"),
            "{s}"
        );
        assert_eq!(Status(0x0120).code(), 0x120);
    }
}
