use super::*;
use crate::config::{Identity, PciExpressCap, CONFIG_SPACE_SIZE};
use crate::test_support::{bar_spec as spec, msix_in};
use crate::{AccessSize, BarIndex, ConfigSpace, ConfigSpaceBuilder};

/// A function shaped like the NVMe model: BAR0 64-bit 16 KiB, BAR2 64-bit 16 KiB (MSI-X),
/// PM, PCIe, MSI-X with 17 vectors.
fn nvme_like() -> ConfigSpace {
    let mut b = ConfigSpaceBuilder::new(Identity {
        vendor_id: 0x1dec,
        device_id: 0x0001,
        class_code: 0x01_08_02,
        revision_id: 0,
        subsystem_vendor_id: 0x1dec,
        subsystem_id: 0x0001,
    });
    b.bar(BarIndex::ALL[0], spec(0x4000, true, false)).unwrap();
    b.bar(BarIndex::ALL[2], spec(0x4000, true, false)).unwrap();
    b.power_management().unwrap();
    b.pci_express(PciExpressCap { flr_capable: true }).unwrap();
    b.msix(msix_in(BarIndex::ALL[2], 17, 0, 0x2000)).unwrap();
    b.build().unwrap()
}

/// A function with a 32-bit prefetchable BAR, a revision, and a Red Hat identity.
fn other() -> ConfigSpace {
    let mut b = ConfigSpaceBuilder::new(Identity {
        vendor_id: 0x1af4,
        device_id: 0x7fff,
        class_code: 0x01_80_00,
        revision_id: 1,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x1100,
    });
    b.bar(BarIndex::ALL[1], spec(0x10_0000, false, true))
        .unwrap();
    b.msix(msix_in(BarIndex::ALL[1], 2, 0x1000, 0x2000))
        .unwrap();
    b.build().unwrap()
}

fn bytes(space: &ConfigSpace) -> Vec<u8> {
    (0..CONFIG_SPACE_SIZE as u16)
        .step_by(4)
        .flat_map(|o| space.read(o, AccessSize::Dword).to_le_bytes())
        .collect()
}

/// A driver's set-up: BARs placed, memory and bus mastering on, MSI-X enabled, a D3hot.
fn programmed(mut space: ConfigSpace) -> ConfigSpace {
    space.write(0x10, AccessSize::Dword, 0xfebf_0000);
    space.write(0x14, AccessSize::Dword, 0x0000_0001);
    space.write(0x18, AccessSize::Dword, 0xfebe_c000);
    space.write(0x04, AccessSize::Word, 0x0406);
    if let Some((at, _)) = space.msix() {
        space.write(at + 2, AccessSize::Word, 0x8000);
    }
    space
}

fn sizes(space: &ConfigSpace) -> [Option<u64>; 6] {
    let mut s = [None; 6];
    for (slot, b) in s.iter_mut().zip(BarIndex::ALL) {
        *slot = space.bar_spec(b).map(|x| x.size);
    }
    s
}

fn render_space(space: &ConfigSpace, v: Verbosity) -> String {
    let cfg = bytes(space);
    render(
        &Function {
            slot: "01:00.0",
            config: &cfg,
            bar_sizes: sizes(space),
        },
        v,
    )
}

#[test]
fn nvme_header_and_capabilities_decode() {
    let out = render_space(&programmed(nvme_like()), Verbosity::VeryVerbose);
    let expect_lines = [
        "01:00.0 Non-Volatile memory controller: Device 1dec:0001 (prog-if 02 [NVM Express])",
        "\tSubsystem: Device 1dec:0001",
        "\tControl: I/O- Mem+ BusMaster+ SpecCycle- MemWINV- VGASnoop- ParErr- Stepping- SERR- FastB2B- DisINTx+",
        "\tRegion 0: Memory at 1febf0000 (64-bit, non-prefetchable) [size=16K]",
        "\tRegion 2: Memory at febec000 (64-bit, non-prefetchable) [size=16K]",
        "\tCapabilities: [40] Power Management version 3",
        "\t\tStatus: D0 NoSoftRst+ PME-Enable- DSel=0 DScale=0 PME-",
        "\tCapabilities: [48] Express (v2) Endpoint, MSI 00",
        "\t\t\tExtTag- AttnBtn- AttnInd- PwrInd- RBE+ FLReset+ SlotPowerLimit 0W",
        "\t\tLnkCap:\tPort #0, Speed 8GT/s, Width x4, ASPM not supported",
        "\tCapabilities: [84] MSI-X: Enable+ Count=17 Masked-",
        "\t\tVector table: BAR=2 offset=00000000",
        "\t\tPBA: BAR=2 offset=00002000",
    ];
    for l in expect_lines {
        assert!(out.lines().any(|x| x == l), "missing line {l:?} in\n{out}");
    }
}

#[test]
fn terse_and_verbose_levels() {
    let space = nvme_like();
    let terse = render_space(&space, Verbosity::Terse);
    assert_eq!(
        terse,
        "01:00.0 Non-Volatile memory controller: Device 1dec:0001\n"
    );
    let v = render_space(&space, Verbosity::Verbose);
    assert!(v.contains("\tFlags: fast devsel\n"), "{v}");
    assert!(
        v.contains("\tMemory at <unassigned> (64-bit, non-prefetchable) [disabled] [size=16K]\n"),
        "{v}"
    );
    assert!(v.contains("\tCapabilities: [84] MSI-X: Enable- Count=17 Masked-\n"));
    assert!(!v.contains("Vector table"), "-v leaves out register detail");
}

#[test]
fn sizes_print_in_lspci_units() {
    assert_eq!(size_text(16 << 10), " [size=16K]");
    assert_eq!(size_text(1 << 20), " [size=1M]");
    assert_eq!(size_text(3 << 30), " [size=3G]");
    assert_eq!(size_text(96), " [size=96]");
}

#[test]
fn short_or_looping_snapshots_do_not_panic() {
    // A header only, a capability list that points at itself, and garbage.
    let mut cfg = vec![0u8; 64];
    cfg[0x06] = 0x10;
    cfg[0x34] = 0x40;
    let out = render(
        &Function {
            slot: "00:00.0",
            config: &cfg,
            bar_sizes: [None; 6],
        },
        Verbosity::VeryVerbose,
    );
    assert!(out.contains("Capabilities: [40]"), "{out}");
    let mut looping = bytes(&nvme_like());
    looping[0x41] = 0x40;
    let out = render(
        &Function {
            slot: "00:00.0",
            config: &looping,
            bar_sizes: [None; 6],
        },
        Verbosity::VeryVerbose,
    );
    assert_eq!(out.matches("Capabilities: [40]").count(), MAX_CAPABILITIES);
    for seed in 0u32..200 {
        let junk: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 97) >> 13) as u8)
            .collect();
        let _ = render(
            &Function {
                slot: "00:00.0",
                config: &junk,
                bar_sizes: [Some(u64::MAX); 6],
            },
            Verbosity::VeryVerbose,
        );
    }
}

/// An SR-IOV extended capability at 0x100 behind a PCIe capability.
#[test]
fn sriov_is_decoded_from_the_extended_table() {
    let mut cfg = bytes(&nvme_like());
    let at = 0x100usize;
    cfg[at..at + 4].copy_from_slice(&(0x0001_0010u32).to_le_bytes());
    cfg[at + 0x0c..at + 0x0e].copy_from_slice(&8u16.to_le_bytes());
    cfg[at + 0x0e..at + 0x10].copy_from_slice(&8u16.to_le_bytes());
    cfg[at + 0x10..at + 0x12].copy_from_slice(&2u16.to_le_bytes());
    cfg[at + 0x14..at + 0x16].copy_from_slice(&1u16.to_le_bytes());
    cfg[at + 0x16..at + 0x18].copy_from_slice(&1u16.to_le_bytes());
    cfg[at + 0x1a..at + 0x1c].copy_from_slice(&0x0002u16.to_le_bytes());
    cfg[at + 0x24..at + 0x28].copy_from_slice(&0x0000_000cu32.to_le_bytes());
    let out = render(
        &Function {
            slot: "01:00.0",
            config: &cfg,
            bar_sizes: [None; 6],
        },
        Verbosity::VeryVerbose,
    );
    assert!(
        out.contains(
            "\tCapabilities: [100 v1] Single Root I/O Virtualization (SR-IOV)\n\
             \t\tIOVCap:"
        ),
        "{out}"
    );
    assert!(
        out.contains("\t\tInitial VFs: 8, Total VFs: 8, Number of VFs: 2,"),
        "{out}"
    );
    assert!(out.contains("\t\tVF offset: 1, stride: 1, Device ID: 0002\n"));
}

/// pciutils' own `lspci`, when installed (scripts/deps.sh installs it; CI fails without it).
fn lspci_binary() -> Option<&'static str> {
    let path = "/usr/bin/lspci";
    if std::path::Path::new(path).exists() {
        Some(path)
    } else if std::env::var_os("CI").is_some() {
        panic!("lspci (pciutils) is missing: run scripts/deps.sh");
    } else {
        eprintln!("skipping: lspci (pciutils) is not installed; scripts/deps.sh installs it");
        None
    }
}

/// pciutils decodes the same bytes (`lspci -F DUMP`): every line must match, except the sizes
/// (a dump does not carry them) and a line pciutils prints for the upper half of a 64-bit BAR
/// when it reads a dump.
fn compare_with_pciutils(space: &ConfigSpace, verbosity: Verbosity, flags: &[&str]) {
    let Some(lspci) = lspci_binary() else { return };
    let cfg = bytes(space);
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("devlend-lspci-{}-{call}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dump = dir.join("dump");
    std::fs::write(&dump, hex_dump("01:00.0", &cfg)).unwrap();
    let out = std::process::Command::new(lspci)
        .args(flags)
        .arg("-F")
        .arg(&dump)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(out.status.success(), "{out:?}");
    let theirs = String::from_utf8(out.stdout).unwrap();
    let ours = render(
        &Function {
            slot: "01:00.0",
            config: &cfg,
            bar_sizes: [None; 6],
        },
        verbosity,
    );
    // pciutils reading a dump shows the upper dword of a 64-bit BAR as a BAR of its own.
    let uppers: Vec<String> = (0..6u16)
        .filter(|i| (cfg[usize::from(0x10 + 4 * i)] >> 1) & 3 == 2)
        .map(|i| format!("\tRegion {}: ", i + 1))
        .collect();
    let theirs: Vec<&str> = theirs
        .lines()
        .filter(|l| !uppers.iter().any(|u| l.starts_with(u.as_str())))
        .filter(|l| {
            !(verbosity == Verbosity::Verbose
                && (l.starts_with("\tMemory at <unassigned> (32-bit, non-prefetchable)")
                    || l.starts_with("\tI/O ports at <unassigned>")))
        })
        .collect();
    let ours: Vec<&str> = ours.lines().collect();
    assert_eq!(
        ours,
        theirs,
        "ours:\n{}\npciutils:\n{}",
        ours.join("\n"),
        theirs.join("\n")
    );
}

#[test]
fn matches_pciutils_vv_on_power_on_nvme_like() {
    compare_with_pciutils(&nvme_like(), Verbosity::VeryVerbose, &["-vv"]);
}

#[test]
fn matches_pciutils_vv_on_programmed_nvme_like() {
    compare_with_pciutils(&programmed(nvme_like()), Verbosity::VeryVerbose, &["-vv"]);
}

#[test]
fn matches_pciutils_v_and_terse() {
    compare_with_pciutils(&programmed(nvme_like()), Verbosity::Verbose, &["-v"]);
    compare_with_pciutils(&other(), Verbosity::VeryVerbose, &["-vv"]);
    compare_with_pciutils(&other(), Verbosity::Terse, &[]);
}
