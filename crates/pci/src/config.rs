//! Config space of a type 0 (endpoint) function.
//!
//! The 4 KiB space is three byte arrays: the register values, a *writable* mask (bits a write
//! may change) and a *write-1-to-clear* mask (bits a write of 1 clears). Every behaviour of a
//! write falls out of those masks: BAR sizing (write all-ones, read back the size), read-only
//! identification registers, RW1C status bits. A handful of *hooks* watch fields whose change
//! the device must react to (Command, BARs, MSI-X Message Control, PMCSR, Initiate FLR); a
//! write returns the [`ConfigEffect`]s they saw instead of reaching into the device.
//!
//! Accesses a driver controls never panic: an out-of-range or misaligned read returns all-ones
//! and such a write is dropped.

use crate::{AccessSize, BarIndex, BarSpec};

/// Size of a PCI Express function's config space in bytes.
pub const CONFIG_SPACE_SIZE: usize = 4096;

/// First byte after the type 0 header, where capabilities may start.
pub const CAPABILITIES_START: u16 = 0x40;

/// First byte of extended config space (PCI Express extended capabilities).
pub const EXTENDED_CONFIG_START: u16 = 0x100;

/// Offsets of the type 0 header registers.
pub mod header {
    /// Vendor ID (16 bits, RO).
    pub const VENDOR_ID: u16 = 0x00;
    /// Device ID (16 bits, RO).
    pub const DEVICE_ID: u16 = 0x02;
    /// Command (16 bits).
    pub const COMMAND: u16 = 0x04;
    /// Status (16 bits).
    pub const STATUS: u16 = 0x06;
    /// Revision ID (8 bits, RO).
    pub const REVISION_ID: u16 = 0x08;
    /// Class code: programming interface, sub-class, base class (24 bits, RO).
    pub const CLASS_CODE: u16 = 0x09;
    /// Cache Line Size (8 bits, RW, no effect on PCI Express).
    pub const CACHE_LINE_SIZE: u16 = 0x0c;
    /// Header Type (8 bits, RO).
    pub const HEADER_TYPE: u16 = 0x0e;
    /// Base Address Register 0; BAR n is at `BAR0 + 4 * n`.
    pub const BAR0: u16 = 0x10;
    /// Subsystem Vendor ID (16 bits, RO).
    pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
    /// Subsystem ID (16 bits, RO).
    pub const SUBSYSTEM_ID: u16 = 0x2e;
    /// Expansion ROM Base Address (not implemented: reads zero).
    pub const EXPANSION_ROM: u16 = 0x30;
    /// Capabilities Pointer (8 bits, RO).
    pub const CAPABILITIES_POINTER: u16 = 0x34;
    /// Interrupt Line (8 bits, RW scratch for software).
    pub const INTERRUPT_LINE: u16 = 0x3c;
    /// Interrupt Pin (8 bits, RO; 0: no INTx).
    pub const INTERRUPT_PIN: u16 = 0x3d;

    /// Offset of BAR slot `bar`.
    pub fn bar(bar: crate::BarIndex) -> u16 {
        BAR0 + 4 * bar.get() as u16
    }
}

/// Command register bits.
pub mod command {
    /// I/O Space Enable (hardwired 0: no I/O BARs).
    pub const IO_SPACE: u16 = 1 << 0;
    /// Memory Space Enable.
    pub const MEMORY_SPACE: u16 = 1 << 1;
    /// Bus Master Enable: the function may issue DMA (and MSI-X writes).
    pub const BUS_MASTER: u16 = 1 << 2;
    /// Parity Error Response.
    pub const PARITY_ERROR_RESPONSE: u16 = 1 << 6;
    /// SERR# Enable.
    pub const SERR_ENABLE: u16 = 1 << 8;
    /// Interrupt Disable (INTx).
    pub const INTX_DISABLE: u16 = 1 << 10;
    /// Bits software may change.
    pub const WRITABLE: u16 =
        MEMORY_SPACE | BUS_MASTER | PARITY_ERROR_RESPONSE | SERR_ENABLE | INTX_DISABLE;
}

/// Status register bits.
pub mod status {
    /// Interrupt Status (RO; always 0: no INTx).
    pub const INTERRUPT_STATUS: u16 = 1 << 3;
    /// Capabilities List (RO 1).
    pub const CAPABILITIES_LIST: u16 = 1 << 4;
    /// Master Data Parity Error (RW1C).
    pub const MASTER_DATA_PARITY_ERROR: u16 = 1 << 8;
    /// Signaled Target Abort (RW1C).
    pub const SIGNALED_TARGET_ABORT: u16 = 1 << 11;
    /// Received Target Abort (RW1C).
    pub const RECEIVED_TARGET_ABORT: u16 = 1 << 12;
    /// Received Master Abort (RW1C).
    pub const RECEIVED_MASTER_ABORT: u16 = 1 << 13;
    /// Signaled System Error (RW1C).
    pub const SIGNALED_SYSTEM_ERROR: u16 = 1 << 14;
    /// Detected Parity Error (RW1C).
    pub const DETECTED_PARITY_ERROR: u16 = 1 << 15;
    /// The error bits, all write-1-to-clear.
    pub const RW1C: u16 = MASTER_DATA_PARITY_ERROR
        | SIGNALED_TARGET_ABORT
        | RECEIVED_TARGET_ABORT
        | RECEIVED_MASTER_ABORT
        | SIGNALED_SYSTEM_ERROR
        | DETECTED_PARITY_ERROR;
}

/// Low bits of a memory BAR.
pub mod bar {
    /// Bit 0: 1 for an I/O BAR (we only have memory BARs).
    pub const IO: u32 = 1 << 0;
    /// Bits 2:1 = 10b: a 64-bit memory BAR.
    pub const TYPE_64BIT: u32 = 0b10 << 1;
    /// Bit 3: prefetchable.
    pub const PREFETCHABLE: u32 = 1 << 3;
    /// The read-only low bits; address bits start above them.
    pub const FLAGS_MASK: u32 = 0xf;
    /// Smallest memory BAR.
    pub const MIN_SIZE: u64 = 16;
}

/// Capability IDs and layouts.
pub mod cap {
    /// Power Management capability ID.
    pub const ID_POWER_MANAGEMENT: u8 = 0x01;
    /// MSI capability ID.
    pub const ID_MSI: u8 = 0x05;
    /// PCI Express capability ID.
    pub const ID_PCI_EXPRESS: u8 = 0x10;
    /// MSI-X capability ID.
    pub const ID_MSIX: u8 = 0x11;
    /// Offset of the Capability ID byte in every capability.
    pub const ID: u16 = 0x00;
    /// Offset of the Next Capability Pointer byte in every capability.
    pub const NEXT: u16 = 0x01;
    /// Most entries a walk of the list visits: each capability takes at least 4 of the 192
    /// bytes after the header, so a longer walk is a list that loops.
    pub const MAX_WALK: usize = 48;

    /// What a walk of the capability list found.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Search {
        /// The capability is at this offset.
        Found(u16),
        /// The list ended (a pointer outside the capability area, e.g. 0) without it.
        Absent,
        /// [`MAX_WALK`] entries without an end: the list loops.
        Looping,
    }

    /// What the caller saw at one capability of a walk.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Step {
        /// This is the capability sought.
        Found,
        /// It is not; the walk goes on at this Next pointer (its low two bits are ignored).
        Next(u8),
    }

    /// Walks the capability list from `first` (the Capabilities Pointer as the caller read
    /// it); `visit(at)` reads the capability at `at` and says whether it is the one sought. A
    /// pointer outside `0x40..0x100` ends the list. The one walk every reader of a function's
    /// list uses (the device model's config space, the driver, VFIO's probe), each with its
    /// own config reads.
    pub fn find<E>(first: u16, mut visit: impl FnMut(u16) -> Result<Step, E>) -> Result<Search, E> {
        let mut at = first;
        for _ in 0..MAX_WALK {
            if !(super::CAPABILITIES_START..super::EXTENDED_CONFIG_START).contains(&at) {
                return Ok(Search::Absent);
            }
            match visit(at)? {
                Step::Found => return Ok(Search::Found(at)),
                Step::Next(next) => at = u16::from(next) & !0x3,
            }
        }
        Ok(Search::Looping)
    }

    /// [`find`] through byte reads (`byte(offset)`): the Capabilities Pointer, then each
    /// capability's ID, and its Next pointer only when the walk goes on. `None` when the list
    /// ends or loops without `id`.
    pub fn find_by_bytes(byte: impl Fn(u16) -> u8, id: u8) -> Option<u16> {
        let first = u16::from(byte(super::header::CAPABILITIES_POINTER));
        let visit = |at: u16| {
            let step = step(byte(at + ID), || byte(at + NEXT), id);
            Ok::<_, std::convert::Infallible>(step)
        };
        match find(first, visit) {
            Ok(Search::Found(at)) => Some(at),
            _ => None,
        }
    }

    /// [`Step`] from the two bytes of a capability's header: ID and Next.
    pub fn step(header_id: u8, next: impl FnOnce() -> u8, id: u8) -> Step {
        if header_id == id {
            Step::Found
        } else {
            Step::Next(next())
        }
    }
}

/// The Power Management capability (PCI PM 1.2).
pub mod pm {
    /// Power Management Capabilities (16 bits, RO).
    pub const PMC: u16 = 0x02;
    /// Power Management Control/Status (16 bits).
    pub const PMCSR: u16 = 0x04;
    /// Length of the capability.
    pub const LEN: u16 = 0x08;
    /// PMC version field: 011b = PCI PM 1.2.
    pub const PMC_VERSION_1_2: u16 = 0b011;
    /// PMCSR PowerState field (bits 1:0).
    pub const PMCSR_POWER_STATE: u16 = 0b11;
    /// PMCSR No_Soft_Reset: D3hot to D0 keeps the function's state.
    pub const PMCSR_NO_SOFT_RESET: u16 = 1 << 3;
}

/// The PCI Express capability (v2, endpoint).
pub mod pcie {
    /// PCI Express Capabilities register (16 bits, RO).
    pub const CAPABILITIES: u16 = 0x02;
    /// Device Capabilities (32 bits, RO).
    pub const DEVICE_CAPABILITIES: u16 = 0x04;
    /// Device Control (16 bits).
    pub const DEVICE_CONTROL: u16 = 0x08;
    /// Device Status (16 bits).
    pub const DEVICE_STATUS: u16 = 0x0a;
    /// Link Capabilities (32 bits, RO).
    pub const LINK_CAPABILITIES: u16 = 0x0c;
    /// Link Control (16 bits).
    pub const LINK_CONTROL: u16 = 0x10;
    /// Link Status (16 bits, RO).
    pub const LINK_STATUS: u16 = 0x12;
    /// Device Capabilities 2 (32 bits, RO).
    pub const DEVICE_CAPABILITIES_2: u16 = 0x24;
    /// Device Control 2 (16 bits).
    pub const DEVICE_CONTROL_2: u16 = 0x28;
    /// Link Capabilities 2 (32 bits, RO).
    pub const LINK_CAPABILITIES_2: u16 = 0x2c;
    /// Link Control 2 (16 bits).
    pub const LINK_CONTROL_2: u16 = 0x30;
    /// Link Status 2 (16 bits).
    pub const LINK_STATUS_2: u16 = 0x32;
    /// Length of a version 2 capability of an endpoint.
    pub const LEN: u16 = 0x3c;

    /// Capability version 2 (bits 3:0 of the Capabilities register).
    pub const CAP_VERSION_2: u16 = 0x2;
    /// Device/Port Type field (bits 7:4): 0000b = PCI Express Endpoint.
    pub const CAP_TYPE_ENDPOINT: u16 = 0x0 << 4;

    /// Device Capabilities: Role-Based Error Reporting.
    pub const DEVCAP_ROLE_BASED_ERROR: u32 = 1 << 15;
    /// Device Capabilities: Function Level Reset Capability.
    pub const DEVCAP_FLR: u32 = 1 << 28;

    /// Device Control: the four error reporting enables (bits 3:0).
    pub const DEVCTL_ERROR_REPORTING: u16 = 0xf;
    /// Device Control: Enable Relaxed Ordering.
    pub const DEVCTL_RELAXED_ORDERING: u16 = 1 << 4;
    /// Device Control: Max_Payload_Size (bits 7:5).
    pub const DEVCTL_MAX_PAYLOAD: u16 = 0b111 << 5;
    /// Device Control: Extended Tag Field Enable.
    pub const DEVCTL_EXT_TAG: u16 = 1 << 8;
    /// Device Control: Enable No Snoop.
    pub const DEVCTL_NO_SNOOP: u16 = 1 << 11;
    /// Device Control: Max_Read_Request_Size (bits 14:12).
    pub const DEVCTL_MAX_READ_REQUEST: u16 = 0b111 << 12;
    /// Device Control: Initiate Function Level Reset (writing 1 resets; always reads 0).
    pub const DEVCTL_INITIATE_FLR: u16 = 1 << 15;
    /// Device Control bits software may change (Initiate FLR is an action, not stored).
    pub const DEVCTL_WRITABLE: u16 = DEVCTL_ERROR_REPORTING
        | DEVCTL_RELAXED_ORDERING
        | DEVCTL_MAX_PAYLOAD
        | DEVCTL_EXT_TAG
        | DEVCTL_NO_SNOOP
        | DEVCTL_MAX_READ_REQUEST;
    /// Device Control after reset: relaxed ordering and no snoop on, 512-byte read requests.
    pub const DEVCTL_DEFAULT: u16 = DEVCTL_RELAXED_ORDERING | DEVCTL_NO_SNOOP | (0b010 << 12);

    /// Device Status: the four error-detected bits (RW1C).
    pub const DEVSTA_RW1C: u16 = 0xf;

    /// Link speed encoding used in Link Capabilities/Status/Control 2: 8.0 GT/s.
    pub const LINK_SPEED_8GT: u16 = 0x3;
    /// Link width we report: x4.
    pub const LINK_WIDTH_X4: u16 = 4;
    /// Link Capabilities 2: Supported Link Speeds Vector (2.5, 5, 8 GT/s).
    pub const LINKCAP2_SPEEDS: u32 = 0b111 << 1;
    /// Link Control: ASPM Control (1:0), Common Clock (6), Extended Synch (7).
    pub const LINKCTL_WRITABLE: u16 = 0b11 | (1 << 6) | (1 << 7);
    /// Link Control 2: Target Link Speed (3:0).
    pub const LINKCTL2_TARGET_SPEED: u16 = 0xf;
}

/// The MSI-X capability.
pub mod msix {
    /// Message Control (16 bits).
    pub const CONTROL: u16 = 0x02;
    /// Table Offset / Table BIR (32 bits, RO).
    pub const TABLE: u16 = 0x04;
    /// PBA Offset / PBA BIR (32 bits, RO).
    pub const PBA: u16 = 0x08;
    /// Length of the capability.
    pub const LEN: u16 = 0x0c;
    /// Message Control: Table Size field (N - 1, bits 10:0).
    pub const CONTROL_TABLE_SIZE: u16 = 0x7ff;
    /// Message Control: Function Mask.
    pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
    /// Message Control: MSI-X Enable.
    pub const CONTROL_ENABLE: u16 = 1 << 15;
    /// BIR field of the Table/PBA registers (bits 2:0).
    pub const BIR_MASK: u32 = 0x7;
    /// Most vectors a function may have.
    pub const MAX_VECTORS: u16 = 2048;
}

/// The Single Root I/O Virtualization extended capability (PCIe Base Specification 9.3.3), as
/// Linux `drivers/pci/iov.c` reads it.
pub mod sriov {
    /// Extended Capability ID of SR-IOV.
    pub const EXT_CAP_ID: u16 = 0x0010;
    /// Capability version.
    pub const VERSION: u32 = 1;
    /// SR-IOV Capabilities (32 bits, RO).
    pub const CAPABILITIES: u16 = 0x04;
    /// SR-IOV Control (16 bits).
    pub const CONTROL: u16 = 0x08;
    /// SR-IOV Status (16 bits).
    pub const STATUS: u16 = 0x0a;
    /// InitialVFs (16 bits, RO).
    pub const INITIAL_VFS: u16 = 0x0c;
    /// TotalVFs (16 bits, RO).
    pub const TOTAL_VFS: u16 = 0x0e;
    /// NumVFs (16 bits; read-only while VF Enable is set).
    pub const NUM_VFS: u16 = 0x10;
    /// Function Dependency Link (8 bits, RO).
    pub const FUNCTION_DEPENDENCY_LINK: u16 = 0x12;
    /// First VF Offset (16 bits, RO; follows NumVFs and ARI Capable Hierarchy).
    pub const FIRST_VF_OFFSET: u16 = 0x14;
    /// VF Stride (16 bits, RO; follows NumVFs and ARI Capable Hierarchy).
    pub const VF_STRIDE: u16 = 0x16;
    /// VF Device ID (16 bits, RO).
    pub const VF_DEVICE_ID: u16 = 0x1a;
    /// Supported Page Sizes (32 bits, RO): bit n set = 2^(n+12) bytes supported.
    pub const SUPPORTED_PAGE_SIZES: u16 = 0x1c;
    /// System Page Size (32 bits; one bit of the supported sizes).
    pub const SYSTEM_PAGE_SIZE: u16 = 0x20;
    /// VF BAR0; VF BAR n is at `VF_BAR0 + 4 * n`.
    pub const VF_BAR0: u16 = 0x24;
    /// VF Migration State Array Offset (32 bits, RO; 0: no migration).
    pub const VF_MIGRATION_STATE: u16 = 0x3c;
    /// Length of the capability.
    pub const LEN: u16 = 0x40;

    /// Control: VF Enable.
    pub const CTRL_VF_ENABLE: u16 = 1 << 0;
    /// Control: VF Migration Enable (hardwired 0: no migration).
    pub const CTRL_VF_MIGRATION: u16 = 1 << 1;
    /// Control: VF Memory Space Enable (decode of every VF's BARs).
    pub const CTRL_VF_MSE: u16 = 1 << 3;
    /// Control: ARI Capable Hierarchy (the PF's routing allows functions up to 255).
    pub const CTRL_ARI_HIERARCHY: u16 = 1 << 4;
    /// Capabilities: ARI Capable Hierarchy Preserved.
    pub const CAP_ARI_PRESERVED: u32 = 1 << 1;
    /// Supported page size bit of 4 KiB.
    pub const PAGE_4K: u32 = 1;

    /// Offset of VF BAR `bar`.
    pub fn vf_bar(bar: crate::BarIndex) -> u16 {
        VF_BAR0 + 4 * bar.get() as u16
    }

    /// First VF Offset and VF Stride for `num_vfs` VFs of a PF at function 0, with or without
    /// an ARI capable hierarchy. Without ARI only 8 functions of a device are reachable on
    /// the PF's bus, so VFs begin on the next device number and take one device each; with
    /// ARI they follow the PF. Both are non-zero for every NumVFs, as Linux requires, and the
    /// last VF's routing ID stays below 65536 for every NumVFs up to 7936.
    pub fn routing(num_vfs: u16, ari: bool) -> (u16, u16) {
        match (ari, num_vfs) {
            (true, _) => (1, 1),
            // One VF: it may take the next function of the PF's device.
            (false, 0..=1) => (1, 1),
            (false, _) => (8, 8),
        }
    }
}

/// What a physical function's SR-IOV capability offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SriovCap {
    /// TotalVFs: most VFs the PF can enable (1 to 7936 here).
    pub total_vfs: u16,
    /// InitialVFs (at most `total_vfs`).
    pub initial_vfs: u16,
    /// Device ID every VF has (read from the PF: a VF's own Device ID reads 0xFFFF).
    pub vf_device_id: u16,
    /// Supported Page Sizes; must include 4 KiB ([`sriov::PAGE_4K`]).
    pub supported_page_sizes: u32,
    /// Each VF's BARs (memory BARs; a 64-bit one takes two slots). A VF BAR's decoded size is
    /// this size rounded up to the System Page Size.
    pub vf_bars: [Option<BarSpec>; 6],
}

/// Where a function's SR-IOV capability is and what it was built with.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SriovLayout {
    at: u16,
    cap: SriovCap,
}

/// The SR-IOV state as software programmed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SriovState {
    /// TotalVFs.
    pub total_vfs: u16,
    /// NumVFs.
    pub num_vfs: u16,
    /// VF Enable.
    pub vf_enable: bool,
    /// VF Memory Space Enable.
    pub vf_memory: bool,
    /// ARI Capable Hierarchy.
    pub ari: bool,
    /// First VF Offset.
    pub first_vf_offset: u16,
    /// VF Stride.
    pub vf_stride: u16,
    /// System Page Size in bytes.
    pub page_size: u64,
}

/// Identification registers of the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Class code: base class << 16 | sub-class << 8 | programming interface.
    pub class_code: u32,
    /// Revision ID.
    pub revision_id: u8,
    /// Subsystem Vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
}

/// A region inside a BAR (where the MSI-X table or PBA lives).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRegion {
    /// The BAR.
    pub bar: BarIndex,
    /// Offset in the BAR (a multiple of 8).
    pub offset: u32,
}

/// Where a function's MSI-X table and PBA live and how many vectors it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixLayout {
    /// Number of vectors, 1 to 2048.
    pub vectors: u16,
    /// The table: 16 bytes per vector.
    pub table: BarRegion,
    /// The pending bit array: one bit per vector, in 64-bit words.
    pub pba: BarRegion,
}

impl MsixLayout {
    /// Bytes the table occupies.
    pub fn table_len(&self) -> u64 {
        u64::from(self.vectors) * crate::msix::ENTRY_LEN
    }

    /// Bytes the PBA occupies.
    pub fn pba_len(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }
}

/// Options of the PCI Express capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciExpressCap {
    /// Advertise Function Level Reset (Device Capabilities bit 28) and accept Initiate FLR.
    pub flr_capable: bool,
}

impl Default for PciExpressCap {
    fn default() -> Self {
        Self { flr_capable: true }
    }
}

/// A device power state the function supports (PMCSR PowerState).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerState {
    /// Fully on.
    D0,
    /// Software-visible off; config space stays accessible.
    D3Hot,
}

/// What a config write changed, for the device to act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigEffect {
    /// Memory Space, Bus Master or Interrupt Disable changed; the new values.
    CommandChanged {
        /// Memory Space Enable.
        memory: bool,
        /// Bus Master Enable.
        bus_master: bool,
        /// INTx Disable.
        intx_disable: bool,
    },
    /// The address in a BAR changed (including sizing writes).
    BarChanged(BarIndex),
    /// MSI-X Enable or Function Mask changed; the new values.
    MsixControl {
        /// MSI-X Enable.
        enable: bool,
        /// Function Mask.
        function_mask: bool,
    },
    /// Software wrote 1 to Initiate Function Level Reset: the device must reset (including
    /// this config space, through [`ConfigSpace::reset`]).
    FunctionLevelReset,
    /// PMCSR PowerState changed to a supported state.
    PowerState(PowerState),
    /// SR-IOV VF Enable changed: the VFs (`num_vfs` of them) appear or disappear.
    VfEnable {
        /// VF Enable.
        enabled: bool,
        /// NumVFs at the time (NumVFs cannot change while VF Enable is set).
        num_vfs: u16,
    },
    /// SR-IOV VF Memory Space Enable changed: every VF's BARs are decoded or not.
    VfMemorySpace(bool),
}

/// Mistakes in a config-space layout (made by a device model's author, not by a driver).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A 64-bit BAR needs the slot after it.
    #[error("a 64-bit BAR cannot start in slot 5")]
    Bar64InLastSlot,
    /// Size not a power of two, below 16 bytes, or above what the BAR width can decode.
    #[error("BAR size {size:#x} is invalid")]
    BarSize {
        /// Size asked for.
        size: u64,
    },
    /// Slot already taken (by a BAR or the upper half of a 64-bit BAR).
    #[error("BAR slot {0} is already in use")]
    BarSlotInUse(u8),
    /// A capability was added twice.
    #[error("capability {0:#04x} was already added")]
    DuplicateCapability(u8),
    /// The MSI-X layout does not fit its BARs.
    #[error("MSI-X layout is invalid: {0}")]
    MsixLayout(&'static str),
    /// No room left for a capability.
    #[error("no room for a capability of {len} bytes")]
    NoRoom {
        /// Length of the capability.
        len: u16,
    },
    /// The SR-IOV capability's options are inconsistent.
    #[error("SR-IOV capability is invalid: {0}")]
    Sriov(&'static str),
}

/// What a hook watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HookKind {
    Command,
    Bar(BarIndex),
    MsixControl,
    PowerState,
    InitiateFlr,
    SriovControl,
    SriovNumVfs,
    SriovPageSize,
}

/// A field the device reacts to: `width` bytes at `offset`, bits `mask`.
#[derive(Clone, Copy, Debug)]
struct Hook {
    offset: u16,
    width: u16,
    mask: u64,
    kind: HookKind,
}

type Bytes = Box<[u8; CONFIG_SPACE_SIZE]>;

fn zeroed() -> Bytes {
    Box::new([0u8; CONFIG_SPACE_SIZE])
}

/// Little-endian load of `width` (at most 8) bytes; bytes outside the space read as zero.
fn load(bytes: &[u8; CONFIG_SPACE_SIZE], offset: u16, width: u16) -> u64 {
    (0..width).fold(0u64, |acc, i| {
        let b = bytes
            .get(usize::from(offset) + usize::from(i))
            .copied()
            .unwrap_or(0);
        acc | (u64::from(b) << (8 * u32::from(i)))
    })
}

/// Little-endian store of `width` (at most 8) bytes; bytes outside the space are dropped.
fn store(bytes: &mut [u8; CONFIG_SPACE_SIZE], offset: u16, width: u16, value: u64) {
    for i in 0..width {
        if let Some(b) = bytes.get_mut(usize::from(offset) + usize::from(i)) {
            *b = (value >> (8 * u32::from(i))) as u8;
        }
    }
}

/// Whether an access of `size` at `offset` is inside config space and naturally aligned.
pub fn access_is_valid(offset: u16, size: AccessSize) -> bool {
    let len = size.len();
    usize::from(offset).is_multiple_of(len) && usize::from(offset) + len <= CONFIG_SPACE_SIZE
}

/// The config space of one endpoint function.
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    regs: Bytes,
    writable: Bytes,
    rw1c: Bytes,
    /// Register values at power-on, for [`ConfigSpace::reset`].
    initial: Bytes,
    hooks: Vec<Hook>,
    bars: [Option<BarSpec>; 6],
    msix: Option<(u16, MsixLayout)>,
    /// Writable masks at power-on (SR-IOV locks fields while VF Enable is set).
    initial_writable: Bytes,
    sriov: Option<SriovLayout>,
    /// A virtual function: BAR registers read zero (a VF's BARs are in its PF's capability).
    virtual_function: bool,
}

impl ConfigSpace {
    /// Reads `size` bytes at `offset`; all-ones when out of range or misaligned.
    pub fn read(&self, offset: u16, size: AccessSize) -> u32 {
        if !access_is_valid(offset, size) {
            return all_ones(size);
        }
        load(&self.regs, offset, size.len() as u16) as u32
    }

    /// Writes `size` bytes of `value` at `offset` through the masks and returns what changed.
    /// Out-of-range and misaligned writes are dropped (and change nothing).
    pub fn write(&mut self, offset: u16, size: AccessSize, value: u32) -> Vec<ConfigEffect> {
        let mut effects = Vec::new();
        if !access_is_valid(offset, size) {
            return effects;
        }
        let width = size.len() as u16;
        let end = offset + width;
        let touched: Vec<(Hook, u64)> = self
            .hooks
            .iter()
            .filter(|h| h.offset < end && offset < h.offset + h.width)
            .map(|h| (*h, load(&self.regs, h.offset, h.width)))
            .collect();

        let value = u64::from(value);
        for i in 0..width {
            let at = usize::from(offset + i);
            let v = (value >> (8 * u32::from(i))) as u8;
            let w = self.writable.get(at).copied().unwrap_or(0);
            let c = self.rw1c.get(at).copied().unwrap_or(0);
            if let Some(reg) = self.regs.get_mut(at) {
                *reg = ((*reg & !w) | (v & w)) & !(v & c);
            }
        }

        for (hook, old) in touched {
            // The value written, placed in the hook's field (bytes not written are zero).
            let mut written = 0u64;
            for i in 0..hook.width {
                let at = hook.offset + i;
                if (offset..end).contains(&at) {
                    let byte = (value >> (8 * u32::from(at - offset))) & 0xff;
                    written |= byte << (8 * u32::from(i));
                }
            }
            let new = load(&self.regs, hook.offset, hook.width);
            self.react(hook, old, new, written, &mut effects);
        }
        effects
    }

    fn react(
        &mut self,
        hook: Hook,
        old: u64,
        new: u64,
        written: u64,
        effects: &mut Vec<ConfigEffect>,
    ) {
        if hook.kind == HookKind::InitiateFlr {
            if written & hook.mask != 0 {
                effects.push(ConfigEffect::FunctionLevelReset);
            }
            return;
        }
        if (old ^ new) & hook.mask == 0 {
            return;
        }
        match hook.kind {
            HookKind::SriovControl => self.react_sriov_control(old as u16, new as u16, effects),
            HookKind::SriovNumVfs => self.react_num_vfs(old, new),
            HookKind::SriovPageSize => self.react_page_size(old, new),
            _ => effects.extend(self.react_header(hook, old, new)),
        }
    }

    fn react_header(&mut self, hook: Hook, old: u64, new: u64) -> Option<ConfigEffect> {
        match hook.kind {
            HookKind::Command => {
                let cmd = new as u16;
                Some(ConfigEffect::CommandChanged {
                    memory: cmd & command::MEMORY_SPACE != 0,
                    bus_master: cmd & command::BUS_MASTER != 0,
                    intx_disable: cmd & command::INTX_DISABLE != 0,
                })
            }
            HookKind::Bar(index) => Some(ConfigEffect::BarChanged(index)),
            HookKind::MsixControl => {
                let ctl = new as u16;
                Some(ConfigEffect::MsixControl {
                    enable: ctl & msix::CONTROL_ENABLE != 0,
                    function_mask: ctl & msix::CONTROL_FUNCTION_MASK != 0,
                })
            }
            HookKind::PowerState => match new & hook.mask {
                0b00 => Some(ConfigEffect::PowerState(PowerState::D0)),
                0b11 => Some(ConfigEffect::PowerState(PowerState::D3Hot)),
                _ => {
                    // D1/D2 are not supported: the write completes but the state is kept.
                    let kept = (new & !hook.mask) | (old & hook.mask);
                    store(&mut self.regs, hook.offset, hook.width, kept);
                    None
                }
            },
            HookKind::InitiateFlr
            | HookKind::SriovControl
            | HookKind::SriovNumVfs
            | HookKind::SriovPageSize => None,
        }
    }

    /// VF Enable locks NumVFs, System Page Size and ARI Capable Hierarchy (the spec leaves
    /// changing them while VFs exist undefined; here such writes are dropped), and reports
    /// VF Enable and VF MSE edges.
    fn react_sriov_control(&mut self, old: u16, new: u16, effects: &mut Vec<ConfigEffect>) {
        let Some(at) = self.sriov.as_ref().map(|l| l.at) else {
            return;
        };
        let was_enabled = old & sriov::CTRL_VF_ENABLE != 0;
        if was_enabled && (old ^ new) & sriov::CTRL_ARI_HIERARCHY != 0 {
            // ARI Capable Hierarchy is writable only while VF Enable is clear.
            let kept = (new & !sriov::CTRL_ARI_HIERARCHY) | (old & sriov::CTRL_ARI_HIERARCHY);
            store(&mut self.regs, at + sriov::CONTROL, 2, kept.into());
        }
        let new = self.read_u16(at + sriov::CONTROL);
        let enabled = new & sriov::CTRL_VF_ENABLE != 0;
        if (old ^ new) & sriov::CTRL_ARI_HIERARCHY != 0 {
            self.update_vf_routing();
        }
        if enabled != was_enabled {
            for (field, width) in [(sriov::NUM_VFS, 2), (sriov::SYSTEM_PAGE_SIZE, 4)] {
                let mask = if enabled {
                    0
                } else {
                    load(&self.initial_writable, at + field, width)
                };
                store(&mut self.writable, at + field, width, mask);
            }
            let ari_mask = u64::from(sriov::CTRL_ARI_HIERARCHY);
            let ctl = load(&self.writable, at + sriov::CONTROL, 2);
            let ctl = if enabled {
                ctl & !ari_mask
            } else {
                ctl | (load(&self.initial_writable, at + sriov::CONTROL, 2) & ari_mask)
            };
            store(&mut self.writable, at + sriov::CONTROL, 2, ctl);
            effects.push(ConfigEffect::VfEnable {
                enabled,
                num_vfs: self.read_u16(at + sriov::NUM_VFS),
            });
        }
        if (old ^ new) & sriov::CTRL_VF_MSE != 0 {
            effects.push(ConfigEffect::VfMemorySpace(new & sriov::CTRL_VF_MSE != 0));
        }
    }

    /// NumVFs above TotalVFs is dropped (the old value stays); otherwise the VF routing
    /// registers follow it.
    fn react_num_vfs(&mut self, old: u64, new: u64) {
        let Some((at, total)) = self.sriov.as_ref().map(|l| (l.at, l.cap.total_vfs)) else {
            return;
        };
        if new > u64::from(total) {
            store(&mut self.regs, at + sriov::NUM_VFS, 2, old);
            return;
        }
        self.update_vf_routing();
    }

    /// A System Page Size that is not exactly one supported size is dropped; otherwise the VF
    /// BARs' writable masks follow it (each VF BAR is aligned to the page size).
    fn react_page_size(&mut self, old: u64, new: u64) {
        let Some(layout) = self.sriov.clone() else {
            return;
        };
        let supported = u64::from(layout.cap.supported_page_sizes);
        if new.count_ones() != 1 || new & supported == 0 {
            store(&mut self.regs, layout.at + sriov::SYSTEM_PAGE_SIZE, 4, old);
            return;
        }
        self.update_vf_bar_masks(&layout);
    }

    fn update_vf_routing(&mut self) {
        let Some(at) = self.sriov.as_ref().map(|l| l.at) else {
            return;
        };
        let num = self.read_u16(at + sriov::NUM_VFS);
        let ari = self.read_u16(at + sriov::CONTROL) & sriov::CTRL_ARI_HIERARCHY != 0;
        let (offset, stride) = sriov::routing(num, ari);
        store(
            &mut self.regs,
            at + sriov::FIRST_VF_OFFSET,
            2,
            offset.into(),
        );
        store(&mut self.regs, at + sriov::VF_STRIDE, 2, stride.into());
    }

    fn update_vf_bar_masks(&mut self, layout: &SriovLayout) {
        let page = self.sriov_page_size(layout.at);
        for index in BarIndex::ALL {
            let Some(spec) = layout
                .cap
                .vf_bars
                .get(usize::from(index.get()))
                .copied()
                .flatten()
            else {
                continue;
            };
            let offset = layout.at + sriov::vf_bar(index);
            let (width, mask) = bar_mask(vf_bar_spec(spec, page));
            store(&mut self.writable, offset, width, mask);
            let value = load(&self.regs, offset, width);
            let flags = value & u64::from(bar::FLAGS_MASK);
            store(&mut self.regs, offset, width, (value & mask) | flags);
        }
    }

    fn sriov_page_size(&self, at: u16) -> u64 {
        let bits = load(&self.regs, at + sriov::SYSTEM_PAGE_SIZE, 4);
        4096u64 << bits.trailing_zeros().min(51)
    }

    /// The SR-IOV state, if the function has the capability.
    pub fn sriov(&self) -> Option<SriovState> {
        let layout = self.sriov.as_ref()?;
        let at = layout.at;
        let ctl = self.read_u16(at + sriov::CONTROL);
        Some(SriovState {
            total_vfs: layout.cap.total_vfs,
            num_vfs: self.read_u16(at + sriov::NUM_VFS),
            vf_enable: ctl & sriov::CTRL_VF_ENABLE != 0,
            vf_memory: ctl & sriov::CTRL_VF_MSE != 0,
            ari: ctl & sriov::CTRL_ARI_HIERARCHY != 0,
            first_vf_offset: self.read_u16(at + sriov::FIRST_VF_OFFSET),
            vf_stride: self.read_u16(at + sriov::VF_STRIDE),
            page_size: self.sriov_page_size(at),
        })
    }

    /// Each VF's BAR in slot `bar` as the VF decodes it (its size rounded up to the System
    /// Page Size), if the SR-IOV capability declares one there.
    pub fn vf_bar_spec(&self, bar: BarIndex) -> Option<BarSpec> {
        let layout = self.sriov.as_ref()?;
        let spec = layout
            .cap
            .vf_bars
            .get(usize::from(bar.get()))
            .copied()
            .flatten()?;
        Some(vf_bar_spec(spec, self.sriov_page_size(layout.at)))
    }

    /// Where software placed VF BAR `bar` of the first VF (VF n's is `n - 1` BAR sizes on).
    pub fn vf_bar_address(&self, bar: BarIndex) -> Option<u64> {
        let layout = self.sriov.as_ref()?;
        let spec = layout
            .cap
            .vf_bars
            .get(usize::from(bar.get()))
            .copied()
            .flatten()?;
        let width = if spec.is_64bit { 8 } else { 4 };
        let value = load(&self.regs, layout.at + sriov::vf_bar(bar), width);
        Some(value & !u64::from(self::bar::FLAGS_MASK))
    }

    /// Whether this is a virtual function's config space.
    pub fn is_virtual_function(&self) -> bool {
        self.virtual_function
    }

    /// Back to power-on values (Function Level Reset or a conventional reset).
    pub fn reset(&mut self) {
        self.regs.copy_from_slice(&self.initial[..]);
        self.writable.copy_from_slice(&self.initial_writable[..]);
    }

    /// A 16-bit register (e.g. for device-side bookkeeping); all-ones when invalid.
    pub fn read_u16(&self, offset: u16) -> u16 {
        self.read(offset, AccessSize::Word) as u16
    }

    /// The Command register.
    pub fn command(&self) -> u16 {
        self.read_u16(header::COMMAND)
    }

    /// Memory Space Enable: BAR accesses are decoded.
    pub fn memory_enabled(&self) -> bool {
        self.command() & command::MEMORY_SPACE != 0
    }

    /// Bus Master Enable: the function may issue DMA and MSI-X messages.
    pub fn bus_master_enabled(&self) -> bool {
        self.command() & command::BUS_MASTER != 0
    }

    /// Device-side: sets RW1C bits of the Status register (e.g. Received Master Abort after a
    /// failed DMA). Bits outside [`status::RW1C`] are ignored.
    pub fn set_status_bits(&mut self, bits: u16) {
        let bits = bits & status::RW1C;
        let old = load(&self.regs, header::STATUS, 2);
        store(&mut self.regs, header::STATUS, 2, old | u64::from(bits));
    }

    /// The Status register.
    pub fn status(&self) -> u16 {
        self.read_u16(header::STATUS)
    }

    /// The BAR that starts in slot `bar`, if any.
    pub fn bar_spec(&self, bar: BarIndex) -> Option<BarSpec> {
        self.bars.get(usize::from(bar.get())).copied().flatten()
    }

    /// The address software placed the BAR in slot `bar` at, if that slot starts a BAR.
    pub fn bar_address(&self, bar: BarIndex) -> Option<u64> {
        let spec = self.bar_spec(bar)?;
        if self.virtual_function {
            return Some(0);
        }
        let offset = header::bar(bar);
        let width = if spec.is_64bit { 8 } else { 4 };
        Some(load(&self.regs, offset, width) & !u64::from(self::bar::FLAGS_MASK))
    }

    /// Offset of the first capability with `id` in the list, walking from 0x34.
    pub fn capability_offset(&self, id: u8) -> Option<u16> {
        cap::find_by_bytes(|off| load(&self.regs, off, 1) as u8, id)
    }

    /// The MSI-X layout and the offset of its capability, if the function has MSI-X.
    pub fn msix(&self) -> Option<(u16, MsixLayout)> {
        self.msix
    }

    /// MSI-X (Enable, Function Mask) as currently programmed; `(false, false)` without MSI-X.
    pub fn msix_control(&self) -> (bool, bool) {
        match self.msix {
            Some((at, _)) => {
                let ctl = self.read_u16(at + msix::CONTROL);
                (
                    ctl & msix::CONTROL_ENABLE != 0,
                    ctl & msix::CONTROL_FUNCTION_MASK != 0,
                )
            }
            None => (false, false),
        }
    }

    /// Current power state (D0 without a Power Management capability).
    pub fn power_state(&self) -> PowerState {
        match self.capability_offset(cap::ID_POWER_MANAGEMENT) {
            Some(at) if self.read_u16(at + pm::PMCSR) & pm::PMCSR_POWER_STATE == 0b11 => {
                PowerState::D3Hot
            }
            _ => PowerState::D0,
        }
    }
}

/// A VF BAR's decoded size: its own size, at least one system page.
fn vf_bar_spec(spec: BarSpec, page_size: u64) -> BarSpec {
    BarSpec {
        size: spec.size.max(page_size),
        ..spec
    }
}

/// Register width and writable mask of a memory BAR: address bits below the size are
/// hardwired to zero, so writing all-ones reads back the size; the type bits are read-only.
fn bar_mask(spec: BarSpec) -> (u16, u64) {
    let mask = !(spec.size.wrapping_sub(1)) & !u64::from(bar::FLAGS_MASK);
    if spec.is_64bit {
        (8, mask)
    } else {
        (4, mask & 0xffff_ffff)
    }
}

/// The read-only type bits of a memory BAR.
fn bar_flags(spec: BarSpec) -> u32 {
    let mut flags = 0u32;
    if spec.is_64bit {
        flags |= bar::TYPE_64BIT;
    }
    if spec.prefetchable {
        flags |= bar::PREFETCHABLE;
    }
    flags
}

fn all_ones(size: AccessSize) -> u32 {
    match size {
        AccessSize::Byte => 0xff,
        AccessSize::Word => 0xffff,
        AccessSize::Dword => 0xffff_ffff,
    }
}

/// Builds a [`ConfigSpace`]: header, BARs, then capabilities in the order added.
#[derive(Debug)]
pub struct ConfigSpaceBuilder {
    space: ConfigSpace,
    next_cap: u16,
    last_next_ptr: u16,
    added: Vec<u8>,
    /// Offset of the last extended capability's header (its Next field is bits 31:20).
    last_ext: Option<u16>,
    next_ext: u16,
}

impl ConfigSpaceBuilder {
    /// A header with `id`, no BARs and no capabilities.
    pub fn new(id: Identity) -> Self {
        let mut space = ConfigSpace {
            regs: zeroed(),
            writable: zeroed(),
            rw1c: zeroed(),
            initial: zeroed(),
            hooks: Vec::new(),
            bars: [None; 6],
            msix: None,
            initial_writable: zeroed(),
            sriov: None,
            virtual_function: false,
        };
        let r = &mut space.regs;
        store(r, header::VENDOR_ID, 2, id.vendor_id.into());
        store(r, header::DEVICE_ID, 2, id.device_id.into());
        store(r, header::REVISION_ID, 1, id.revision_id.into());
        store(
            r,
            header::CLASS_CODE,
            3,
            u64::from(id.class_code & 0xff_ffff),
        );
        store(
            r,
            header::SUBSYSTEM_VENDOR_ID,
            2,
            id.subsystem_vendor_id.into(),
        );
        store(r, header::SUBSYSTEM_ID, 2, id.subsystem_id.into());
        store(r, header::STATUS, 2, status::CAPABILITIES_LIST.into());
        let w = &mut space.writable;
        store(w, header::COMMAND, 2, command::WRITABLE.into());
        store(w, header::CACHE_LINE_SIZE, 1, 0xff);
        store(w, header::INTERRUPT_LINE, 1, 0xff);
        store(&mut space.rw1c, header::STATUS, 2, status::RW1C.into());
        space.hooks.push(Hook {
            offset: header::COMMAND,
            width: 2,
            mask: u64::from(command::MEMORY_SPACE | command::BUS_MASTER | command::INTX_DISABLE),
            kind: HookKind::Command,
        });
        Self {
            space,
            next_cap: CAPABILITIES_START,
            last_next_ptr: header::CAPABILITIES_POINTER,
            added: Vec::new(),
            last_ext: None,
            next_ext: EXTENDED_CONFIG_START,
        }
    }

    /// The header of a virtual function of a PF identified by `pf`: Vendor and Device ID read
    /// 0xFFFF (software takes them from the PF and its VF Device ID), Memory Space Enable is
    /// hardwired 0 (the PF's VF MSE decodes every VF's BARs), no INTx. BARs declared with
    /// [`Self::bar`] are the VF's as its device model decodes them; their registers read zero
    /// (they live in the PF's SR-IOV capability).
    pub fn new_virtual_function(pf: Identity) -> Self {
        let mut b = Self::new(Identity {
            vendor_id: 0xffff,
            device_id: 0xffff,
            ..pf
        });
        b.space.virtual_function = true;
        store(
            &mut b.space.writable,
            header::COMMAND,
            2,
            u64::from(command::WRITABLE & !(command::MEMORY_SPACE | command::INTX_DISABLE)),
        );
        b
    }

    /// Declares a memory BAR in slot `index` (and `index + 1` for a 64-bit BAR).
    pub fn bar(&mut self, index: BarIndex, spec: BarSpec) -> Result<&mut Self, ConfigError> {
        let max = if spec.is_64bit {
            1u64 << 63
        } else {
            1u64 << 31
        };
        if !spec.size.is_power_of_two() || spec.size < bar::MIN_SIZE || spec.size > max {
            return Err(ConfigError::BarSize { size: spec.size });
        }
        let slot = usize::from(index.get());
        let upper = if spec.is_64bit {
            Some(BarIndex::new(index.get() + 1).ok_or(ConfigError::Bar64InLastSlot)?)
        } else {
            None
        };
        for s in std::iter::once(index).chain(upper) {
            if self.slot_in_use(s) {
                return Err(ConfigError::BarSlotInUse(s.get()));
            }
        }
        if let Some(s) = self.space.bars.get_mut(slot) {
            *s = Some(spec);
        }
        if self.space.virtual_function {
            return Ok(self);
        }
        let (width, mask) = bar_mask(spec);
        let offset = header::bar(index);
        store(&mut self.space.regs, offset, 4, bar_flags(spec).into());
        store(&mut self.space.writable, offset, width, mask);
        self.space.hooks.push(Hook {
            offset,
            width,
            mask,
            kind: HookKind::Bar(index),
        });
        Ok(self)
    }

    fn slot_in_use(&self, s: BarIndex) -> bool {
        let n = usize::from(s.get());
        let starts_here = self.space.bars.get(n).copied().flatten().is_some();
        let upper_of_previous = n
            .checked_sub(1)
            .and_then(|p| self.space.bars.get(p).copied().flatten())
            .is_some_and(|b| b.is_64bit);
        starts_here || upper_of_previous
    }

    /// Reserves `len` bytes for a capability with `id`, links it into the list and returns
    /// its offset.
    fn add_capability(&mut self, id: u8, len: u16) -> Result<u16, ConfigError> {
        if self.added.contains(&id) {
            return Err(ConfigError::DuplicateCapability(id));
        }
        let at = self.next_cap;
        let end = at + len;
        if end > EXTENDED_CONFIG_START {
            return Err(ConfigError::NoRoom { len });
        }
        store(&mut self.space.regs, at + cap::ID, 1, id.into());
        store(&mut self.space.regs, self.last_next_ptr, 1, at.into());
        self.last_next_ptr = at + cap::NEXT;
        self.next_cap = end.next_multiple_of(4);
        self.added.push(id);
        Ok(at)
    }

    /// Adds the PCI Express capability (version 2, endpoint); returns its offset.
    pub fn pci_express(&mut self, opts: PciExpressCap) -> Result<u16, ConfigError> {
        let at = self.add_capability(cap::ID_PCI_EXPRESS, pcie::LEN)?;
        let r = &mut self.space.regs;
        let w = &mut self.space.writable;
        store(
            r,
            at + pcie::CAPABILITIES,
            2,
            (pcie::CAP_VERSION_2 | pcie::CAP_TYPE_ENDPOINT).into(),
        );
        let mut devcap = pcie::DEVCAP_ROLE_BASED_ERROR;
        if opts.flr_capable {
            devcap |= pcie::DEVCAP_FLR;
        }
        store(r, at + pcie::DEVICE_CAPABILITIES, 4, devcap.into());
        store(r, at + pcie::DEVICE_CONTROL, 2, pcie::DEVCTL_DEFAULT.into());
        store(
            w,
            at + pcie::DEVICE_CONTROL,
            2,
            pcie::DEVCTL_WRITABLE.into(),
        );
        store(
            &mut self.space.rw1c,
            at + pcie::DEVICE_STATUS,
            2,
            pcie::DEVSTA_RW1C.into(),
        );
        let link = pcie::LINK_SPEED_8GT | (pcie::LINK_WIDTH_X4 << 4);
        store(r, at + pcie::LINK_CAPABILITIES, 4, link.into());
        store(w, at + pcie::LINK_CONTROL, 2, pcie::LINKCTL_WRITABLE.into());
        store(r, at + pcie::LINK_STATUS, 2, link.into());
        store(
            r,
            at + pcie::LINK_CAPABILITIES_2,
            4,
            pcie::LINKCAP2_SPEEDS.into(),
        );
        store(r, at + pcie::LINK_CONTROL_2, 2, pcie::LINK_SPEED_8GT.into());
        store(
            w,
            at + pcie::LINK_CONTROL_2,
            2,
            pcie::LINKCTL2_TARGET_SPEED.into(),
        );
        if opts.flr_capable {
            self.space.hooks.push(Hook {
                offset: at + pcie::DEVICE_CONTROL,
                width: 2,
                mask: pcie::DEVCTL_INITIATE_FLR.into(),
                kind: HookKind::InitiateFlr,
            });
        }
        Ok(at)
    }

    /// Adds the MSI-X capability for `layout` (checked against the BARs in [`Self::build`]);
    /// returns its offset.
    pub fn msix(&mut self, layout: MsixLayout) -> Result<u16, ConfigError> {
        if layout.vectors == 0 || layout.vectors > msix::MAX_VECTORS {
            return Err(ConfigError::MsixLayout("vector count must be 1 to 2048"));
        }
        if !layout.table.offset.is_multiple_of(8) || !layout.pba.offset.is_multiple_of(8) {
            return Err(ConfigError::MsixLayout("offsets must be multiples of 8"));
        }
        let at = self.add_capability(cap::ID_MSIX, msix::LEN)?;
        let r = &mut self.space.regs;
        store(r, at + msix::CONTROL, 2, u64::from(layout.vectors - 1));
        let table = layout.table.offset | u32::from(layout.table.bar.get());
        let pba = layout.pba.offset | u32::from(layout.pba.bar.get());
        store(r, at + msix::TABLE, 4, table.into());
        store(r, at + msix::PBA, 4, pba.into());
        let control = msix::CONTROL_ENABLE | msix::CONTROL_FUNCTION_MASK;
        store(
            &mut self.space.writable,
            at + msix::CONTROL,
            2,
            control.into(),
        );
        self.space.hooks.push(Hook {
            offset: at + msix::CONTROL,
            width: 2,
            mask: control.into(),
            kind: HookKind::MsixControl,
        });
        self.space.msix = Some((at, layout));
        Ok(at)
    }

    /// Adds the Power Management capability (D0 and D3hot); returns its offset.
    pub fn power_management(&mut self) -> Result<u16, ConfigError> {
        let at = self.add_capability(cap::ID_POWER_MANAGEMENT, pm::LEN)?;
        store(
            &mut self.space.regs,
            at + pm::PMC,
            2,
            pm::PMC_VERSION_1_2.into(),
        );
        store(
            &mut self.space.regs,
            at + pm::PMCSR,
            2,
            pm::PMCSR_NO_SOFT_RESET.into(),
        );
        store(
            &mut self.space.writable,
            at + pm::PMCSR,
            2,
            pm::PMCSR_POWER_STATE.into(),
        );
        self.space.hooks.push(Hook {
            offset: at + pm::PMCSR,
            width: 2,
            mask: pm::PMCSR_POWER_STATE.into(),
            kind: HookKind::PowerState,
        });
        Ok(at)
    }

    /// Reserves `len` bytes of extended config space for an extended capability with `id`,
    /// links it into the list that starts at 0x100 and returns its offset.
    fn add_extended_capability(
        &mut self,
        id: u16,
        version: u32,
        len: u16,
    ) -> Result<u16, ConfigError> {
        let key = (id & 0xff) as u8 | 0x80;
        if self.added.contains(&key) {
            return Err(ConfigError::DuplicateCapability(key));
        }
        let at = self.next_ext;
        let end = usize::from(at) + usize::from(len);
        if end > CONFIG_SPACE_SIZE {
            return Err(ConfigError::NoRoom { len });
        }
        let header = u64::from(id) | (u64::from(version & 0xf) << 16);
        store(&mut self.space.regs, at, 4, header);
        if let Some(prev) = self.last_ext {
            let h = load(&self.space.regs, prev, 4);
            store(&mut self.space.regs, prev, 4, h | (u64::from(at) << 20));
        }
        self.last_ext = Some(at);
        self.next_ext = (at + len).next_multiple_of(4);
        self.added.push(key);
        Ok(at)
    }

    /// Adds the SR-IOV extended capability (a physical function); returns its offset.
    /// NumVFs, VF Enable, VF MSE, ARI Capable Hierarchy, System Page Size and the VF BARs are
    /// writable; every other register is read-only. Writes the spec leaves undefined (NumVFs
    /// above TotalVFs, NumVFs / page size / ARI while VF Enable is set, a page size that is
    /// not one supported size) are dropped.
    pub fn sriov(&mut self, cap: SriovCap) -> Result<u16, ConfigError> {
        if cap.total_vfs == 0 || cap.total_vfs > 7936 {
            return Err(ConfigError::Sriov("TotalVFs must be 1 to 7936"));
        }
        if cap.initial_vfs > cap.total_vfs {
            return Err(ConfigError::Sriov("InitialVFs above TotalVFs"));
        }
        if cap.supported_page_sizes & sriov::PAGE_4K == 0 {
            return Err(ConfigError::Sriov("4 KiB pages must be supported"));
        }
        let mut used = [false; 6];
        for index in BarIndex::ALL {
            let Some(spec) = cap.vf_bars.get(usize::from(index.get())).copied().flatten() else {
                continue;
            };
            let max = if spec.is_64bit {
                1u64 << 63
            } else {
                1u64 << 31
            };
            if !spec.size.is_power_of_two() || spec.size < bar::MIN_SIZE || spec.size > max {
                return Err(ConfigError::BarSize { size: spec.size });
            }
            let slots = if spec.is_64bit { 2 } else { 1 };
            for s in usize::from(index.get())..usize::from(index.get()) + slots {
                match used.get_mut(s) {
                    Some(u) if !*u => *u = true,
                    Some(_) => return Err(ConfigError::BarSlotInUse(s as u8)),
                    None => return Err(ConfigError::Bar64InLastSlot),
                }
            }
        }
        let at = self.add_extended_capability(sriov::EXT_CAP_ID, sriov::VERSION, sriov::LEN)?;
        let r = &mut self.space.regs;
        store(
            r,
            at + sriov::CAPABILITIES,
            4,
            sriov::CAP_ARI_PRESERVED.into(),
        );
        store(r, at + sriov::INITIAL_VFS, 2, cap.initial_vfs.into());
        store(r, at + sriov::TOTAL_VFS, 2, cap.total_vfs.into());
        store(r, at + sriov::VF_DEVICE_ID, 2, cap.vf_device_id.into());
        store(
            r,
            at + sriov::SUPPORTED_PAGE_SIZES,
            4,
            cap.supported_page_sizes.into(),
        );
        store(r, at + sriov::SYSTEM_PAGE_SIZE, 4, sriov::PAGE_4K.into());
        let (offset, stride) = sriov::routing(0, false);
        store(r, at + sriov::FIRST_VF_OFFSET, 2, offset.into());
        store(r, at + sriov::VF_STRIDE, 2, stride.into());
        let w = &mut self.space.writable;
        let control = sriov::CTRL_VF_ENABLE | sriov::CTRL_VF_MSE | sriov::CTRL_ARI_HIERARCHY;
        store(w, at + sriov::CONTROL, 2, control.into());
        store(w, at + sriov::NUM_VFS, 2, 0xffff);
        store(
            w,
            at + sriov::SYSTEM_PAGE_SIZE,
            4,
            cap.supported_page_sizes.into(),
        );
        for index in BarIndex::ALL {
            let Some(spec) = cap.vf_bars.get(usize::from(index.get())).copied().flatten() else {
                continue;
            };
            let offset = at + sriov::vf_bar(index);
            let (width, mask) = bar_mask(vf_bar_spec(spec, 4096));
            store(&mut self.space.regs, offset, 4, bar_flags(spec).into());
            store(&mut self.space.writable, offset, width, mask);
        }
        let hooks = [
            (
                sriov::CONTROL,
                2,
                u64::from(control),
                HookKind::SriovControl,
            ),
            (sriov::NUM_VFS, 2, 0xffff, HookKind::SriovNumVfs),
            (
                sriov::SYSTEM_PAGE_SIZE,
                4,
                0xffff_ffff,
                HookKind::SriovPageSize,
            ),
        ];
        for (field, width, mask, kind) in hooks {
            self.space.hooks.push(Hook {
                offset: at + field,
                width,
                mask,
                kind,
            });
        }
        self.space.sriov = Some(SriovLayout { at, cap });
        Ok(at)
    }

    /// Checks the layout and returns the config space at its power-on values.
    pub fn build(mut self) -> Result<ConfigSpace, ConfigError> {
        if let Some((_, layout)) = self.space.msix {
            let fits = |region: BarRegion, len: u64| {
                self.space
                    .bar_spec(region.bar)
                    .is_some_and(|b| u64::from(region.offset) + len <= b.size)
            };
            if !fits(layout.table, layout.table_len()) || !fits(layout.pba, layout.pba_len()) {
                return Err(ConfigError::MsixLayout("table or PBA outside its BAR"));
            }
            let same_bar = layout.table.bar == layout.pba.bar;
            let t = (u64::from(layout.table.offset), layout.table_len());
            let p = (u64::from(layout.pba.offset), layout.pba_len());
            if same_bar && t.0 < p.0 + p.1 && p.0 < t.0 + t.1 {
                return Err(ConfigError::MsixLayout("table and PBA overlap"));
            }
        }
        self.space.initial = self.space.regs.clone();
        self.space.initial_writable = self.space.writable.clone();
        Ok(self.space)
    }
}

#[cfg(test)]
#[path = "tests/config.rs"]
mod tests;
