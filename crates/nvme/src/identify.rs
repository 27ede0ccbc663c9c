//! Identify data structures (NVMe base spec 1.4, section 5.15.2): the controller, the
//! namespace, the active namespace list and the namespace identification descriptors.

use crate::regs::{CQES_LOG2, SQES_LOG2, VERSION_1_4};

/// Size of every Identify data structure.
pub const IDENTIFY_BYTES: usize = 4096;

/// CNS values.
pub mod cns {
    /// Identify Namespace.
    pub const NAMESPACE: u8 = 0x00;
    /// Identify Controller.
    pub const CONTROLLER: u8 = 0x01;
    /// Active Namespace ID list.
    pub const ACTIVE_NAMESPACES: u8 = 0x02;
    /// Namespace Identification Descriptor list.
    pub const NAMESPACE_DESCRIPTORS: u8 = 0x03;
    /// Primary Controller Capabilities (the physical function's controller only).
    pub const PRIMARY_CONTROLLER_CAPABILITIES: u8 = 0x14;
    /// Secondary Controller List (the physical function's controller only).
    pub const SECONDARY_CONTROLLER_LIST: u8 = 0x15;
}

/// OACS bit: Virtualization Management supported.
pub const OACS_VIRTUALIZATION_MANAGEMENT: u16 = 1 << 7;
/// OACS bit: Doorbell Buffer Config supported.
pub const OACS_DOORBELL_BUFFER_CONFIG: u16 = 1 << 8;
/// ONCS bits: Compare, Dataset Management, Write Zeroes, Save/Select in features.
pub const ONCS: u16 = (1 << 0) | (1 << 2) | (1 << 3) | (1 << 4);
/// LPA bits: SMART per namespace, Commands Supported and Effects, extended Get Log Page data.
pub const LPA: u8 = (1 << 0) | (1 << 1) | (1 << 2);
/// VWC: a volatile write cache is present and Flush accepts the broadcast NSID.
pub const VWC: u8 = 0b111;
/// FRMW: slot 1 read-only, one slot.
pub const FRMW: u8 = 0b011;
/// Warning composite temperature threshold (Kelvin).
pub const WCTEMP_KELVIN: u16 = 343;
/// Critical composite temperature threshold (Kelvin).
pub const CCTEMP_KELVIN: u16 = 358;
/// Abort Command Limit (0-based).
pub const ACL: u8 = 3;
/// Asynchronous Event Request Limit (0-based).
pub const AERL: u8 = 3;
/// Error Log Page Entries (0-based).
pub const ELPE: u8 = 15;
/// NIDT values of namespace identification descriptors.
const NIDT_EUI64: u8 = 1;
const NIDT_NGUID: u8 = 2;
const NIDT_UUID: u8 = 3;

/// What the controller structure reports that depends on the configuration.
#[derive(Clone, Debug)]
pub struct ControllerInfo {
    /// PCI Vendor ID.
    pub vendor_id: u16,
    /// PCI Subsystem Vendor ID.
    pub subsystem_vendor_id: u16,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Firmware revision.
    pub firmware_rev: String,
    /// MDTS (power of two of 4 KiB pages).
    pub mdts: u8,
    /// Total capacity in bytes.
    pub capacity_bytes: u128,
    /// Most outstanding commands (MAXCMD).
    pub max_commands: u16,
    /// Controller ID (0 for a primary or plain controller; the VF number for a secondary).
    pub cntlid: u16,
    /// Virtualization Management is supported (a primary controller).
    pub virtualization_management: bool,
}

/// What the namespace structure reports.
#[derive(Clone, Copy, Debug)]
pub struct NamespaceInfo {
    /// Size in logical blocks.
    pub blocks: u64,
    /// log2 of the logical block size.
    pub block_shift: u32,
    /// EUI-64.
    pub eui64: [u8; 8],
    /// NGUID.
    pub nguid: [u8; 16],
    /// UUID.
    pub uuid: [u8; 16],
    /// The namespace is write protected (NSATTR bit 0).
    pub write_protected: bool,
}

fn put(page: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = page.get_mut(at..at + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

/// An ASCII field padded with spaces (non-ASCII characters become '?').
fn put_ascii(page: &mut [u8], at: usize, len: usize, s: &str) {
    let mut field = vec![b' '; len];
    for (dst, c) in field.iter_mut().zip(s.chars()) {
        *dst = if c.is_ascii_graphic() || c == ' ' {
            c as u8
        } else {
            b'?'
        };
    }
    put(page, at, &field);
}

/// The Identify Controller data structure.
pub fn controller(info: &ControllerInfo) -> Vec<u8> {
    let mut p = vec![0u8; IDENTIFY_BYTES];
    put(&mut p, 0, &info.vendor_id.to_le_bytes());
    put(&mut p, 2, &info.subsystem_vendor_id.to_le_bytes());
    put_ascii(&mut p, 4, 20, &info.serial);
    put_ascii(&mut p, 24, 40, &info.model);
    put_ascii(&mut p, 64, 8, &info.firmware_rev);
    p[72] = 6; // RAB: recommended arbitration burst (2^6)
    p[77] = info.mdts;
    put(&mut p, 78, &info.cntlid.to_le_bytes()); // CNTLID
    put(&mut p, 80, &VERSION_1_4.to_le_bytes());
    p[111] = 1; // CNTRLTYPE: I/O controller
    let mut oacs = OACS_DOORBELL_BUFFER_CONFIG;
    if info.virtualization_management {
        oacs |= OACS_VIRTUALIZATION_MANAGEMENT;
    }
    put(&mut p, 256, &oacs.to_le_bytes());
    p[258] = ACL;
    p[259] = AERL;
    p[260] = FRMW;
    p[261] = LPA;
    p[262] = ELPE;
    p[263] = 0; // NPSS: one power state
    put(&mut p, 266, &WCTEMP_KELVIN.to_le_bytes());
    put(&mut p, 268, &CCTEMP_KELVIN.to_le_bytes());
    put(&mut p, 280, &info.capacity_bytes.to_le_bytes()); // TNVMCAP
    p[512] = ((SQES_LOG2 << 4) | SQES_LOG2) as u8;
    p[513] = ((CQES_LOG2 << 4) | CQES_LOG2) as u8;
    put(&mut p, 514, &info.max_commands.to_le_bytes());
    put(&mut p, 516, &1u32.to_le_bytes()); // NN
    put(&mut p, 520, &ONCS.to_le_bytes());
    p[525] = VWC;
    let nqn = format!("nqn.2026-11.dev.devlend:nvme:{}", info.serial.trim());
    put(
        &mut p,
        768,
        nqn.as_bytes().get(..255).unwrap_or(nqn.as_bytes()),
    );
    // Power state 0: 25 W maximum, operational.
    put(&mut p, 2048, &2500u16.to_le_bytes());
    p
}

/// The Identify Namespace data structure.
pub fn namespace(info: &NamespaceInfo) -> Vec<u8> {
    let mut p = vec![0u8; IDENTIFY_BYTES];
    put(&mut p, 0, &info.blocks.to_le_bytes()); // NSZE
    put(&mut p, 8, &info.blocks.to_le_bytes()); // NCAP
    put(&mut p, 16, &info.blocks.to_le_bytes()); // NUSE
    p[24] = 1 << 3; // NSFEAT.UIDREUSE: this NGUID and EUI64 are never reused for another namespace
    p[25] = 0; // NLBAF: one format
    p[26] = 0; // FLBAS: format 0, no metadata
    p[33] = 0b1001; // DLFEAT: deallocated reads zeroes; Write Zeroes may deallocate
    p[99] = u8::from(info.write_protected); // NSATTR
    put(&mut p, 104, &info.nguid);
    put(&mut p, 120, &info.eui64);
    // LBA format 0: no metadata, LBADS, best relative performance.
    put(&mut p, 128, &[0, 0, info.block_shift as u8, 0]);
    p
}

/// The active namespace list: NSIDs greater than `after`.
pub fn active_namespaces(after: u32) -> Vec<u8> {
    let mut p = vec![0u8; IDENTIFY_BYTES];
    if after < crate::io::NSID {
        put(&mut p, 0, &crate::io::NSID.to_le_bytes());
    }
    p
}

/// The namespace identification descriptor list.
pub fn namespace_descriptors(info: &NamespaceInfo) -> Vec<u8> {
    let mut p = vec![0u8; IDENTIFY_BYTES];
    let mut at = 0;
    for (nidt, id) in [
        (NIDT_EUI64, &info.eui64[..]),
        (NIDT_NGUID, &info.nguid[..]),
        (NIDT_UUID, &info.uuid[..]),
    ] {
        put(&mut p, at, &[nidt, id.len() as u8, 0, 0]);
        put(&mut p, at + 4, id);
        at += 4 + id.len();
    }
    p
}

/// Stable identifiers derived from the serial number (FNV-1a, so the same image and serial
/// give the same IDs on every start).
pub fn namespace_ids(serial: &str) -> ([u8; 8], [u8; 16], [u8; 16]) {
    let hash = |seed: u64| {
        let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
        for b in serial.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    };
    let a = hash(1).to_be_bytes();
    let b = hash(2).to_be_bytes();
    let c = hash(3).to_be_bytes();
    let mut eui64 = a;
    eui64[0] = 0x02; // locally administered
    let mut nguid = [0u8; 16];
    nguid[..8].copy_from_slice(&a);
    nguid[8..].copy_from_slice(&b);
    let mut uuid = [0u8; 16];
    uuid[..8].copy_from_slice(&b);
    uuid[8..].copy_from_slice(&c);
    uuid[6] = (uuid[6] & 0x0f) | 0x40; // version 4 layout
    uuid[8] = (uuid[8] & 0x3f) | 0x80; // RFC 4122 variant
    (eui64, nguid, uuid)
}
