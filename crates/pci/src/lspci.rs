//! `lspci`-style decoding of a config-space snapshot: bytes in, text out (no device access).
//!
//! [`render`] prints a function the way pciutils' `lspci`, `lspci -v` and `lspci -vv` print
//! it (the header registers, the BARs, and each capability), so that an operator reads a lent
//! or borrowed device exactly as a local one. [`hex_dump`] prints the bytes the way
//! `lspci -xxxx` does, which `lspci -F` reads back: the tests compare [`render`] with pciutils'
//! own decoding of the same bytes.
//!
//! Capabilities are decoded from two tables ([`CAPABILITIES`] for the list at 0x34,
//! [`EXTENDED_CAPABILITIES`] for the list at 0x100); a new capability is one entry. Every
//! offset comes from the snapshot, so every read is bounds-checked: a snapshot that is short or
//! whose lists loop prints what it can (lists are walked at most [`MAX_CAPABILITIES`] steps).

use std::fmt::Write as _;

use crate::config::{cap, header, msix, pcie, pm, sriov as iov};

/// How many entries of a capability list are walked at most (a looping list stops there).
pub const MAX_CAPABILITIES: usize = cap::MAX_WALK;

/// How much `lspci` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    /// `lspci`: one line.
    Terse,
    /// `lspci -v`: flags, BARs, capability names.
    Verbose,
    /// `lspci -vv`: every decoded register.
    VeryVerbose,
}

/// A function to print: its config space (at least the 64-byte header; up to 4096 bytes) and
/// what a snapshot alone cannot say.
#[derive(Clone, Debug)]
pub struct Function<'a> {
    /// The slot shown first on the line, `BB:DD.F`.
    pub slot: &'a str,
    /// Config space from offset 0.
    pub config: &'a [u8],
    /// Size of each BAR that starts in that slot (as sizing it would show), when known.
    pub bar_sizes: [Option<u64>; 6],
}

/// Reads of the snapshot; bytes beyond it read as zero (as an absent extended space does).
#[derive(Clone, Copy)]
struct Cfg<'a>(&'a [u8]);

impl Cfg<'_> {
    fn u8(self, off: u16) -> u8 {
        self.0.get(usize::from(off)).copied().unwrap_or(0)
    }
    fn u16(self, off: u16) -> u16 {
        u16::from(self.u8(off)) | u16::from(self.u8(off.wrapping_add(1))) << 8
    }
    fn u32(self, off: u16) -> u32 {
        u32::from(self.u16(off)) | u32::from(self.u16(off.wrapping_add(2))) << 16
    }
}

/// `+` or `-` for a flag.
fn flag(v: u32, bit: u32) -> char {
    if v & bit != 0 {
        '+'
    } else {
        '-'
    }
}

/// Flags as `lspci` prints them, `Name+` or `Name-` each, separated by spaces.
fn flag_list(v: u32, named: &[(&str, u32)]) -> String {
    let each: Vec<String> = named
        .iter()
        .map(|(name, bit)| format!("{name}{}", flag(v, *bit)))
        .collect();
    each.join(" ")
}

/// A decoder of one capability: appends its lines, `at` is the capability's offset.
type CapFn = fn(Cfg<'_>, u16, Verbosity, &mut String);

/// A capability the list at 0x34 may hold.
pub struct CapabilityDecoder {
    /// Capability ID.
    pub id: u8,
    decode: CapFn,
}

/// An extended capability (list at 0x100).
pub struct ExtendedCapabilityDecoder {
    /// Extended capability ID.
    pub id: u16,
    decode: CapFn,
}

/// The capabilities decoded in full; any other is printed by ID, as `lspci` does.
pub const CAPABILITIES: &[CapabilityDecoder] = &[
    CapabilityDecoder {
        id: cap::ID_POWER_MANAGEMENT,
        decode: power_management,
    },
    CapabilityDecoder {
        id: cap::ID_PCI_EXPRESS,
        decode: express,
    },
    CapabilityDecoder {
        id: cap::ID_MSIX,
        decode: msix_cap,
    },
];

/// Extended capability ID of SR-IOV (`config::sriov::EXT_CAP_ID`).
pub const EXT_ID_SRIOV: u16 = iov::EXT_CAP_ID;

/// The extended capabilities decoded in full.
pub const EXTENDED_CAPABILITIES: &[ExtendedCapabilityDecoder] = &[ExtendedCapabilityDecoder {
    id: EXT_ID_SRIOV,
    decode: sriov,
}];

/// The PCI class names `lspci` takes from pci.ids, for the classes devices here have.
const CLASSES: &[(u16, &str)] = &[
    (0x0000, "Non-VGA unclassified device"),
    (0x0100, "SCSI storage controller"),
    (0x0101, "IDE interface"),
    (0x0104, "RAID bus controller"),
    (0x0106, "SATA controller"),
    (0x0107, "Serial Attached SCSI controller"),
    (0x0108, "Non-Volatile memory controller"),
    (0x0180, "Mass storage controller"),
    (0x0200, "Ethernet controller"),
    (0x0207, "Infiniband controller"),
    (0x0280, "Network controller"),
    (0x0300, "VGA compatible controller"),
    (0x0302, "3D controller"),
    (0x0500, "RAM memory"),
    (0x0600, "Host bridge"),
    (0x0604, "PCI bridge"),
    (0x0680, "Bridge"),
    (0x0880, "System peripheral"),
    (0x0c03, "USB controller"),
    (0x1200, "Processing accelerators"),
    (0xff00, "Unassigned class"),
];

/// Programming interfaces with a name in pci.ids, for the classes above.
const PROG_IFS: &[(u32, &str)] = &[
    (0x01_08_01, "NVMHCI"),
    (0x01_08_02, "NVM Express"),
    (0x01_06_01, "AHCI 1.0"),
    (0x0c_03_30, "XHCI"),
];

/// Vendors `lspci` names from pci.ids (devices of other vendors print as `Device VVVV:DDDD`).
const VENDORS: &[(u16, &str)] = &[
    (0x1af4, "Red Hat, Inc."),
    (0x1b36, "Red Hat, Inc."),
    (0x8086, "Intel Corporation"),
    (0x144d, "Samsung Electronics Co Ltd"),
];

fn vendor_device(vendor: u16, device: u16) -> String {
    match VENDORS.iter().find(|(v, _)| *v == vendor) {
        Some((_, name)) => format!("{name} Device {device:04x}"),
        None => format!("Device {vendor:04x}:{device:04x}"),
    }
}

fn class_name(class: u16) -> String {
    match CLASSES.iter().find(|(c, _)| *c == class) {
        Some((_, name)) => (*name).to_string(),
        None => format!("Class {class:04x}"),
    }
}

/// Prints `f` as `lspci` with `verbosity` would (followed by an empty line from `-v` on).
pub fn render(f: &Function<'_>, verbosity: Verbosity) -> String {
    let c = Cfg(f.config);
    let mut out = String::new();
    let class = c.u16(header::CLASS_CODE + 1);
    let prog_if = c.u8(header::CLASS_CODE);
    let _ = write!(
        out,
        "{} {}: {}",
        f.slot,
        class_name(class),
        vendor_device(c.u16(header::VENDOR_ID), c.u16(header::DEVICE_ID))
    );
    let rev = c.u8(header::REVISION_ID);
    if rev != 0 {
        let _ = write!(out, " (rev {rev:02x})");
    }
    if verbosity >= Verbosity::Verbose && prog_if != 0 {
        let _ = write!(out, " (prog-if {prog_if:02x}");
        let full = u32::from(class) << 8 | u32::from(prog_if);
        if let Some((_, name)) = PROG_IFS.iter().find(|(p, _)| *p == full) {
            let _ = write!(out, " [{name}]");
        }
        out.push(')');
    }
    out.push('\n');
    if verbosity == Verbosity::Terse {
        return out;
    }
    let sub_vendor = c.u16(header::SUBSYSTEM_VENDOR_ID);
    let sub_id = c.u16(header::SUBSYSTEM_ID);
    if sub_vendor != 0 && sub_vendor != 0xffff {
        let _ = writeln!(out, "\tSubsystem: {}", vendor_device(sub_vendor, sub_id));
    }
    let cmd = u32::from(c.u16(header::COMMAND));
    let status = u32::from(c.u16(header::STATUS));
    let latency = c.u8(0x0d);
    let cache_line = c.u8(header::CACHE_LINE_SIZE);
    let int_pin = c.u8(header::INTERRUPT_PIN);
    let irq = c.u8(header::INTERRUPT_LINE);
    let devsel = match (status >> 9) & 3 {
        0 => "fast",
        1 => "medium",
        2 => "slow",
        _ => "??",
    };
    if verbosity == Verbosity::VeryVerbose {
        let control = [
            ("I/O", 1),
            ("Mem", 1 << 1),
            ("BusMaster", 1 << 2),
            ("SpecCycle", 1 << 3),
            ("MemWINV", 1 << 4),
            ("VGASnoop", 1 << 5),
            ("ParErr", 1 << 6),
            ("Stepping", 1 << 7),
            ("SERR", 1 << 8),
            ("FastB2B", 1 << 9),
            ("DisINTx", 1 << 10),
        ];
        let _ = writeln!(out, "\tControl: {}", flag_list(cmd, &control));
        let before = [
            ("Cap", 1 << 4),
            ("66MHz", 1 << 5),
            ("UDF", 1 << 6),
            ("FastB2B", 1 << 7),
            ("ParErr", 1 << 8),
        ];
        let after = [
            (">TAbort", 1 << 11),
            ("<TAbort", 1 << 12),
            ("<MAbort", 1 << 13),
            (">SERR", 1 << 14),
            ("<PERR", 1 << 15),
            ("INTx", 1 << 3),
        ];
        let _ = writeln!(
            out,
            "\tStatus: {} DEVSEL={devsel} {}",
            flag_list(status, &before),
            flag_list(status, &after)
        );
        if cmd & 4 != 0 {
            let _ = write!(out, "\tLatency: {latency}");
            if cache_line != 0 {
                let _ = write!(
                    out,
                    ", Cache Line Size: {} bytes",
                    u32::from(cache_line) * 4
                );
            }
            out.push('\n');
        }
        if int_pin != 0 || irq != 0 {
            let pin = if int_pin == 0 {
                '?'
            } else {
                char::from(b'A'.wrapping_add(int_pin).wrapping_sub(1))
            };
            let _ = writeln!(out, "\tInterrupt: pin {pin} routed to IRQ {irq}");
        }
    } else {
        out.push_str("\tFlags: ");
        if cmd & 4 != 0 {
            out.push_str("bus master, ");
        }
        if cmd & (1 << 5) != 0 {
            out.push_str("VGA palette snoop, ");
        }
        if cmd & (1 << 7) != 0 {
            out.push_str("stepping, ");
        }
        if cmd & (1 << 9) != 0 {
            out.push_str("fast Back2Back, ");
        }
        if status & (1 << 5) != 0 {
            out.push_str("66MHz, ");
        }
        if status & (1 << 6) != 0 {
            out.push_str("user-definable features, ");
        }
        let _ = write!(out, "{devsel} devsel");
        if cmd & 4 != 0 {
            let _ = write!(out, ", latency {latency}");
        }
        if irq != 0 {
            let _ = write!(out, ", IRQ {irq}");
        }
        out.push('\n');
    }
    bars(c, f, verbosity, &mut out);
    if status & u32::from(crate::config::status::CAPABILITIES_LIST) != 0 {
        capabilities(c, verbosity, &mut out);
    }
    out.push('\n');
    out
}

/// `[size=16K]` as `lspci` prints sizes.
fn size_text(len: u64) -> String {
    const UNITS: [&str; 7] = ["", "K", "M", "G", "T", "P", "E"];
    let mut n = len;
    let mut unit = 0;
    while n != 0 && n.is_multiple_of(1024) && unit + 1 < UNITS.len() {
        n /= 1024;
        unit += 1;
    }
    format!(" [size={n}{}]", UNITS.get(unit).copied().unwrap_or(""))
}

fn bars(c: Cfg<'_>, f: &Function<'_>, verbosity: Verbosity, out: &mut String) {
    let cmd = c.u16(header::COMMAND);
    let mut i = 0usize;
    while i < 6 {
        let off = header::BAR0 + 4 * i as u16;
        let flg = c.u32(off);
        let len = f.bar_sizes.get(i).copied().flatten().unwrap_or(0);
        let io = flg & 1 != 0;
        let is_64 = !io && (flg >> 1) & 3 == 2;
        let pos = if io {
            u64::from(flg & !3)
        } else if is_64 {
            u64::from(flg & !0xf) | u64::from(c.u32(off + 4)) << 32
        } else {
            u64::from(flg & !0xf)
        };
        let this = i;
        i += if is_64 { 2 } else { 1 };
        if flg == 0 && pos == 0 && len == 0 {
            continue;
        }
        if verbosity == Verbosity::VeryVerbose {
            let _ = write!(out, "\tRegion {this}: ");
        } else {
            out.push('\t');
        }
        if io {
            out.push_str("I/O ports at ");
            if pos != 0 {
                let _ = write!(out, "{pos:04x}");
            } else {
                out.push_str("<unassigned>");
            }
        } else {
            out.push_str("Memory at ");
            if pos != 0 {
                let _ = write!(out, "{pos:08x}");
            } else {
                out.push_str("<unassigned>");
            }
            let t = match (flg >> 1) & 3 {
                0 => "32-bit",
                1 => "low-1M",
                2 => "64-bit",
                _ => "type 3",
            };
            let pre = if flg & 8 != 0 { "" } else { "non-" };
            let _ = write!(out, " ({t}, {pre}prefetchable)");
        }
        let enabled = if io { cmd & 1 != 0 } else { cmd & 2 != 0 };
        if !enabled {
            out.push_str(" [disabled]");
        }
        if len != 0 {
            out.push_str(&size_text(len));
        }
        out.push('\n');
    }
}

fn capabilities(c: Cfg<'_>, verbosity: Verbosity, out: &mut String) {
    let mut at = u16::from(c.u8(header::CAPABILITIES_POINTER) & !3);
    let mut express = false;
    for _ in 0..MAX_CAPABILITIES {
        if at == 0 {
            break;
        }
        let id = c.u8(at + cap::ID);
        let next = u16::from(c.u8(at + cap::NEXT) & !3);
        let _ = write!(out, "\tCapabilities: [{at:02x}] ");
        if id == 0xff {
            out.push_str("<chain broken>\n");
            break;
        }
        express |= id == cap::ID_PCI_EXPRESS;
        match CAPABILITIES.iter().find(|d| d.id == id) {
            Some(d) => (d.decode)(c, at, verbosity, out),
            None => {
                let _ = writeln!(out, "#{id:02x} [{:04x}]", c.u16(at + 2));
            }
        }
        at = next;
    }
    if express && c.0.len() > usize::from(crate::config::EXTENDED_CONFIG_START) {
        extended_capabilities(c, verbosity, out);
    }
}

fn extended_capabilities(c: Cfg<'_>, verbosity: Verbosity, out: &mut String) {
    let mut at = crate::config::EXTENDED_CONFIG_START;
    for _ in 0..MAX_CAPABILITIES {
        let h = c.u32(at);
        if h == 0 || h == 0xffff_ffff {
            break;
        }
        let id = (h & 0xffff) as u16;
        let version = (h >> 16) & 0xf;
        let next = ((h >> 20) & 0xffc) as u16;
        let _ = write!(out, "\tCapabilities: [{at:03x} v{version}] ");
        match EXTENDED_CAPABILITIES.iter().find(|d| d.id == id) {
            Some(d) => (d.decode)(c, at, verbosity, out),
            None => {
                let _ = writeln!(out, "Extended Capability ID {id:#x}");
            }
        }
        if next < crate::config::EXTENDED_CONFIG_START {
            break;
        }
        at = next;
    }
}

fn power_management(c: Cfg<'_>, at: u16, verbosity: Verbosity, out: &mut String) {
    let pmc = u32::from(c.u16(at + pm::PMC));
    let _ = writeln!(out, "Power Management version {}", pmc & 7);
    if verbosity < Verbosity::VeryVerbose {
        return;
    }
    const AUX_MA: [u32; 8] = [0, 55, 100, 160, 220, 270, 320, 375];
    let aux = AUX_MA.get(((pmc >> 6) & 7) as usize).copied().unwrap_or(0);
    let _ = writeln!(
        out,
        "\t\tFlags: {} AuxCurrent={aux}mA PME(D0{},D1{},D2{},D3hot{},D3cold{})",
        flag_list(
            pmc,
            &[
                ("PMEClk", 1 << 3),
                ("DSI", 1 << 5),
                ("D1", 1 << 9),
                ("D2", 1 << 10)
            ]
        ),
        flag(pmc, 1 << 11),
        flag(pmc, 1 << 12),
        flag(pmc, 1 << 13),
        flag(pmc, 1 << 14),
        flag(pmc, 1 << 15),
    );
    let csr = u32::from(c.u16(at + pm::PMCSR));
    let _ = writeln!(
        out,
        "\t\tStatus: D{} NoSoftRst{} PME-Enable{} DSel={} DScale={} PME{}",
        csr & 3,
        flag(csr, 1 << 3),
        flag(csr, 1 << 8),
        (csr >> 9) & 0xf,
        (csr >> 13) & 3,
        flag(csr, 1 << 15),
    );
}

fn msix_cap(c: Cfg<'_>, at: u16, verbosity: Verbosity, out: &mut String) {
    let ctrl = u32::from(c.u16(at + msix::CONTROL));
    let _ = writeln!(
        out,
        "MSI-X: Enable{} Count={} Masked{}",
        flag(ctrl, msix::CONTROL_ENABLE.into()),
        (ctrl & u32::from(msix::CONTROL_TABLE_SIZE)) + 1,
        flag(ctrl, msix::CONTROL_FUNCTION_MASK.into()),
    );
    if verbosity < Verbosity::VeryVerbose {
        return;
    }
    let table = c.u32(at + msix::TABLE);
    let pba = c.u32(at + msix::PBA);
    let _ = writeln!(
        out,
        "\t\tVector table: BAR={} offset={:08x}",
        table & msix::BIR_MASK,
        table & !msix::BIR_MASK
    );
    let _ = writeln!(
        out,
        "\t\tPBA: BAR={} offset={:08x}",
        pba & msix::BIR_MASK,
        pba & !msix::BIR_MASK
    );
}

const LINK_SPEEDS: [&str; 8] = [
    "unknown", "2.5GT/s", "5GT/s", "8GT/s", "16GT/s", "32GT/s", "64GT/s", "unknown",
];

fn link_speed(code: u32) -> &'static str {
    LINK_SPEEDS
        .get((code & 0xf) as usize)
        .copied()
        .unwrap_or("unknown")
}

fn payload(code: u32) -> u32 {
    128u32 << (code & 7).min(5)
}

fn express(c: Cfg<'_>, at: u16, verbosity: Verbosity, out: &mut String) {
    let flags = u32::from(c.u16(at + pcie::CAPABILITIES));
    let version = flags & 0xf;
    out.push_str("Express ");
    if version > 1 && verbosity == Verbosity::VeryVerbose {
        let _ = write!(out, "(v{version}) ");
    }
    let kind = match (flags >> 4) & 0xf {
        0 => "Endpoint",
        1 => "Legacy Endpoint",
        4 => "Root Port (Slot-)",
        5 => "Upstream Port",
        6 => "Downstream Port (Slot-)",
        9 => "Root Complex Integrated Endpoint",
        _ => "Unknown type",
    };
    let _ = writeln!(out, "{kind}, MSI {:02x}", (flags >> 9) & 0x1f);
    if verbosity < Verbosity::VeryVerbose {
        return;
    }
    // Device.
    let devcap = c.u32(at + pcie::DEVICE_CAPABILITIES);
    const L0S: [&str; 8] = [
        "<64ns",
        "<128ns",
        "<256ns",
        "<512ns",
        "<1us",
        "<2us",
        "<4us",
        "unlimited",
    ];
    const L1: [&str; 8] = [
        "<1us",
        "<2us",
        "<4us",
        "<8us",
        "<16us",
        "<32us",
        "<64us",
        "unlimited",
    ];
    let pick = |t: &[&'static str; 8], v: u32| t.get((v & 7) as usize).copied().unwrap_or("");
    let _ = writeln!(
        out,
        "\t\tDevCap:\tMaxPayload {} bytes, PhantFunc {}, Latency L0s {}, L1 {}",
        payload(devcap),
        (devcap >> 3) & 3,
        pick(&L0S, devcap >> 6),
        pick(&L1, devcap >> 9),
    );
    let _ = writeln!(
        out,
        "\t\t\t{} SlotPowerLimit {}W",
        flag_list(
            devcap,
            &[
                ("ExtTag", 1 << 5),
                ("AttnBtn", 1 << 12),
                ("AttnInd", 1 << 13),
                ("PwrInd", 1 << 14),
                ("RBE", 1 << 15),
                ("FLReset", 1 << 28),
            ]
        ),
        slot_power(devcap),
    );
    let devctl = u32::from(c.u16(at + pcie::DEVICE_CONTROL));
    let _ = writeln!(
        out,
        "\t\tDevCtl:\t{}",
        flag_list(
            devctl,
            &[
                ("CorrErr", 1),
                ("NonFatalErr", 2),
                ("FatalErr", 4),
                ("UnsupReq", 8)
            ]
        )
    );
    let _ = writeln!(
        out,
        "\t\t\t{}",
        flag_list(
            devctl,
            &[
                ("RlxdOrd", 1 << 4),
                ("ExtTag", 1 << 8),
                ("PhantFunc", 1 << 9),
                ("AuxPwr", 1 << 10),
                ("NoSnoop", 1 << 11),
                ("FLReset", 1 << 15)
            ]
        )
    );
    let _ = writeln!(
        out,
        "\t\t\tMaxPayload {} bytes, MaxReadReq {} bytes",
        payload(devctl >> 5),
        payload(devctl >> 12),
    );
    let devsta = u32::from(c.u16(at + pcie::DEVICE_STATUS));
    let _ = writeln!(
        out,
        "\t\tDevSta:\t{}",
        flag_list(
            devsta,
            &[
                ("CorrErr", 1),
                ("NonFatalErr", 2),
                ("FatalErr", 4),
                ("UnsupReq", 8),
                ("AuxPwr", 16),
                ("TransPend", 32)
            ]
        )
    );
    // Link.
    let lnkcap = c.u32(at + pcie::LINK_CAPABILITIES);
    let aspm = match (lnkcap >> 10) & 3 {
        0 => "not supported",
        1 => "L0s",
        2 => "L1",
        _ => "L0s L1",
    };
    let _ = write!(
        out,
        "\t\tLnkCap:\tPort #{}, Speed {}, Width x{}, ASPM {aspm}",
        lnkcap >> 24,
        link_speed(lnkcap),
        (lnkcap >> 4) & 0x3f,
    );
    if (lnkcap >> 10) & 3 != 0 {
        let _ = write!(
            out,
            ", Exit Latency L0s {}, L1 {}",
            pick(&L0S, lnkcap >> 12),
            pick(&L1, lnkcap >> 15)
        );
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "\t\t\t{}",
        flag_list(
            lnkcap,
            &[
                ("ClockPM", 1 << 18),
                ("Surprise", 1 << 19),
                ("LLActRep", 1 << 20),
                ("BwNot", 1 << 21),
                ("ASPMOptComp", 1 << 22)
            ]
        )
    );
    let lnkctl = u32::from(c.u16(at + pcie::LINK_CONTROL));
    let aspm_ctl = match lnkctl & 3 {
        0 => "Disabled",
        1 => "L0s Enabled",
        2 => "L1 Enabled",
        _ => "L0s L1 Enabled",
    };
    let _ = writeln!(
        out,
        "\t\tLnkCtl:\tASPM {aspm_ctl}; RCB {} bytes, Disabled{} CommClk{}",
        if lnkctl & (1 << 3) != 0 { 128 } else { 64 },
        flag(lnkctl, 1 << 4),
        flag(lnkctl, 1 << 6),
    );
    let _ = writeln!(
        out,
        "\t\t\t{}",
        flag_list(
            lnkctl,
            &[
                ("ExtSynch", 1 << 7),
                ("ClockPM", 1 << 8),
                ("AutWidDis", 1 << 9),
                ("BWInt", 1 << 10),
                ("AutBWInt", 1 << 11)
            ]
        )
    );
    let lnksta = u32::from(c.u16(at + pcie::LINK_STATUS));
    let _ = writeln!(
        out,
        "\t\tLnkSta:\tSpeed {}, Width x{}",
        link_speed(lnksta),
        (lnksta >> 4) & 0x3f,
    );
    let _ = writeln!(
        out,
        "\t\t\t{}",
        flag_list(
            lnksta,
            &[
                ("TrErr", 1 << 10),
                ("Train", 1 << 11),
                ("SlotClk", 1 << 12),
                ("DLActive", 1 << 13),
                ("BWMgmt", 1 << 14),
                ("ABWMgmt", 1 << 15)
            ]
        )
    );
    if version >= 2 {
        express_v2(c, at, out);
    }
}

fn slot_power(devcap: u32) -> String {
    let value = (devcap >> 18) & 0xff;
    let scale = (devcap >> 26) & 3;
    match scale {
        0 => format!("{value}"),
        1 => format!("{}", f64::from(value) / 10.0),
        2 => format!("{}", f64::from(value) / 100.0),
        _ => format!("{}", f64::from(value) / 1000.0),
    }
}

fn express_v2(c: Cfg<'_>, at: u16, out: &mut String) {
    let cap2 = c.u32(at + pcie::DEVICE_CAPABILITIES_2);
    let timeouts = match cap2 & 0xf {
        0 => "Not Supported",
        _ => "Range ?",
    };
    let ltr = flag(cap2, 1 << 11);
    let obff = match (cap2 >> 18) & 3 {
        0 => "Not Supported",
        1 => "Via message",
        2 => "Via WAKE#",
        _ => "Via message/WAKE#",
    };
    let _ = writeln!(
        out,
        "\t\tDevCap2: Completion Timeout: {timeouts}, TimeoutDis{} NROPrPrP{} LTR{}",
        flag(cap2, 1 << 4),
        flag(cap2, 1 << 10),
        ltr,
    );
    let _ = writeln!(
        out,
        "\t\t\t 10BitTagComp{} 10BitTagReq{} OBFF {obff}, ExtFmt{} EETLPPrefix{}",
        flag(cap2, 1 << 16),
        flag(cap2, 1 << 17),
        flag(cap2, 1 << 20),
        flag(cap2, 1 << 21),
    );
    let _ = writeln!(
        out,
        "\t\t\t EmergencyPowerReduction {}, EmergencyPowerReductionInit{}",
        match (cap2 >> 24) & 3 {
            0 => "Not Supported",
            1 => "Dev Specific",
            2 => "Form Factor Dev Specific",
            _ => "Reserved",
        },
        flag(cap2, 1 << 26),
    );
    let _ = writeln!(
        out,
        "\t\t\t FRS{} TPHComp{} ExtTPHComp{}",
        flag(cap2, 1 << 31),
        flag(cap2, 1 << 12),
        flag(cap2, 1 << 13),
    );
    let _ = writeln!(
        out,
        "\t\t\t AtomicOpsCap: 32bit{} 64bit{} 128bitCAS{}",
        flag(cap2, 1 << 7),
        flag(cap2, 1 << 8),
        flag(cap2, 1 << 9),
    );
    let ctl2 = u32::from(c.u16(at + pcie::DEVICE_CONTROL_2));
    let _ = writeln!(
        out,
        "\t\tDevCtl2: Completion Timeout: {}, TimeoutDis{} LTR{} 10BitTagReq{} OBFF {},",
        if ctl2 & 0xf == 0 { "50us to 50ms" } else { "?" },
        flag(ctl2, 1 << 4),
        flag(ctl2, 1 << 10),
        flag(ctl2, 1 << 12),
        match (ctl2 >> 13) & 3 {
            0 => "Disabled",
            1 => "Via message A",
            2 => "Via message B",
            _ => "Via WAKE#",
        },
    );
    let _ = writeln!(out, "\t\t\t AtomicOpsCtl: ReqEn{}", flag(ctl2, 1 << 6));
    let lnkcap2 = c.u32(at + pcie::LINK_CAPABILITIES_2);
    let speeds = (lnkcap2 >> 1) & 0x7f;
    let vector = match speeds {
        0 => "RsvdP".to_string(),
        1 => "2.5GT/s".to_string(),
        _ => {
            let top = 31 - speeds.leading_zeros();
            let name = ["2.5", "5", "8", "16", "32", "64", "128"]
                .get(top as usize)
                .copied()
                .unwrap_or("?");
            format!("2.5-{name}GT/s")
        }
    };
    let _ = writeln!(
        out,
        "\t\tLnkCap2: Supported Link Speeds: {vector}, {}",
        flag_list(
            lnkcap2,
            &[
                ("Crosslink", 1 << 8),
                ("Retimer", 1 << 23),
                ("2Retimers", 1 << 24),
                ("DRS", 1 << 31),
            ]
        ),
    );
    let lnkctl2 = u32::from(c.u16(at + pcie::LINK_CONTROL_2));
    let _ = writeln!(
        out,
        "\t\tLnkCtl2: Target Link Speed: {}, EnterCompliance{} SpeedDis{}",
        link_speed(lnkctl2),
        flag(lnkctl2, 1 << 4),
        flag(lnkctl2, 1 << 5),
    );
    let _ = writeln!(
        out,
        "\t\t\t Transmit Margin: Normal Operating Range, EnterModifiedCompliance{} ComplianceSOS{}",
        flag(lnkctl2, 1 << 10),
        flag(lnkctl2, 1 << 11),
    );
    let _ = writeln!(
        out,
        "\t\t\t Compliance Preset/De-emphasis: -6dB de-emphasis, 0dB preshoot",
    );
    let lnksta2 = u32::from(c.u16(at + pcie::LINK_STATUS_2));
    let _ = writeln!(
        out,
        "\t\tLnkSta2: Current De-emphasis Level: {}, EqualizationComplete{} EqualizationPhase1{}",
        if lnksta2 & 1 != 0 { "-3.5dB" } else { "-6dB" },
        flag(lnksta2, 1 << 1),
        flag(lnksta2, 1 << 2),
    );
    let _ = writeln!(
        out,
        "\t\t\t EqualizationPhase2{} EqualizationPhase3{} LinkEqualizationRequest{}",
        flag(lnksta2, 1 << 3),
        flag(lnksta2, 1 << 4),
        flag(lnksta2, 1 << 5),
    );
    let _ = writeln!(
        out,
        "\t\t\t Retimer{} 2Retimers{} CrosslinkRes: unsupported",
        flag(lnksta2, 1 << 6),
        flag(lnksta2, 1 << 7),
    );
}

fn sriov(c: Cfg<'_>, at: u16, verbosity: Verbosity, out: &mut String) {
    out.push_str("Single Root I/O Virtualization (SR-IOV)\n");
    if verbosity < Verbosity::VeryVerbose {
        return;
    }
    let caps = c.u32(at + iov::CAPABILITIES);
    let ctl = u32::from(c.u16(at + iov::CONTROL));
    let sta = u32::from(c.u16(at + iov::STATUS));
    let _ = writeln!(
        out,
        "\t\tIOVCap:\tMigration{} 10BitTagReq{} IntMsgNum {}",
        flag(caps, 1),
        flag(caps, 1 << 2),
        caps >> 21
    );
    let _ = writeln!(
        out,
        "\t\tIOVCtl:\t{}",
        flag_list(
            ctl,
            &[
                ("Enable", 1),
                ("Migration", 1 << 1),
                ("Interrupt", 1 << 2),
                ("MSE", 1 << 3),
                ("ARIHierarchy", 1 << 4),
                ("10BitTagReq", 1 << 5)
            ]
        )
    );
    let _ = writeln!(out, "\t\tIOVSta:\tMigration{}", flag(sta, 1));
    let _ = writeln!(
        out,
        "\t\tInitial VFs: {}, Total VFs: {}, Number of VFs: {}, Function Dependency Link: {:02x}",
        c.u16(at + iov::INITIAL_VFS),
        c.u16(at + iov::TOTAL_VFS),
        c.u16(at + iov::NUM_VFS),
        c.u8(at + iov::FUNCTION_DEPENDENCY_LINK),
    );
    let _ = writeln!(
        out,
        "\t\tVF offset: {}, stride: {}, Device ID: {:04x}",
        c.u16(at + iov::FIRST_VF_OFFSET),
        c.u16(at + iov::VF_STRIDE),
        c.u16(at + iov::VF_DEVICE_ID),
    );
    let _ = writeln!(
        out,
        "\t\tSupported Page Size: {:08x}, System Page Size: {:08x}",
        c.u32(at + iov::SUPPORTED_PAGE_SIZES),
        c.u32(at + iov::SYSTEM_PAGE_SIZE),
    );
    let mut i = 0u16;
    while i < 6 {
        let off = at + iov::VF_BAR0 + 4 * i;
        let flg = c.u32(off);
        let is_64 = (flg >> 1) & 3 == 2;
        let this = i;
        i += if is_64 { 2 } else { 1 };
        if flg == 0 {
            continue;
        }
        let pos = if is_64 {
            u64::from(flg & !0xf) | u64::from(c.u32(off + 4)) << 32
        } else {
            u64::from(flg & !0xf)
        };
        let _ = write!(out, "\t\tRegion {this}: Memory at ");
        if pos != 0 {
            let _ = write!(out, "{pos:016x}");
        } else {
            out.push_str("<unassigned>");
        }
        let _ = writeln!(
            out,
            " ({}, {}prefetchable)",
            if is_64 { "64-bit" } else { "32-bit" },
            if flg & 8 != 0 { "" } else { "non-" }
        );
    }
    let _ = writeln!(
        out,
        "\t\tVF Migration: offset: {:08x}, BIR: {}",
        c.u32(at + iov::VF_MIGRATION_STATE) & !7,
        c.u32(at + iov::VF_MIGRATION_STATE) & 7
    );
}

/// Prints `config` as `lspci -xxxx` does (the form `lspci -F FILE` reads), under `slot`.
pub fn hex_dump(slot: &str, config: &[u8]) -> String {
    let mut out = format!("{slot} devlend snapshot\n");
    for (i, row) in config.chunks(16).enumerate() {
        let _ = write!(out, "{:02x}:", i * 16);
        for b in row {
            let _ = write!(out, " {b:02x}");
        }
        out.push('\n');
    }
    out.push('\n');
    out
}

#[cfg(test)]
#[path = "tests/lspci.rs"]
mod tests;
