use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use super::*;
use crate::config::{cap, msix, sriov, ConfigError, MsixLayout, PciExpressCap, SriovCap};
use crate::test_support::{bar as b, msix_in};
use crate::AccessSize::*;
use crate::ConfigEffect;

const PF: Identity = Identity {
    vendor_id: 0x1dec,
    device_id: 0x0001,
    class_code: 0x01_08_02,
    revision_id: 0x02,
    subsystem_vendor_id: 0x1dec,
    subsystem_id: 0x0101,
};

fn spec(size: u64, is_64bit: bool) -> BarSpec {
    crate::test_support::bar_spec(size, is_64bit, false)
}

/// VF BAR0: 64-bit 16 KiB; VF BAR2: 32-bit 1 KiB (below a page: decoded as one page).
fn sriov_cap(total: u16) -> SriovCap {
    SriovCap {
        total_vfs: total,
        initial_vfs: total,
        vf_device_id: 0x0002,
        supported_page_sizes: sriov::PAGE_4K | (1 << 4), // 4 KiB and 64 KiB
        vf_bars: [
            Some(spec(0x4000, true)),
            None,
            Some(spec(0x400, false)),
            None,
            None,
            None,
        ],
    }
}

fn pf(total: u16) -> (ConfigSpace, u16) {
    let mut bld = ConfigSpaceBuilder::new(PF);
    bld.bar(b(0), spec(0x4000, true)).unwrap();
    bld.pci_express(PciExpressCap::default()).unwrap();
    let at = bld.sriov(sriov_cap(total)).unwrap();
    (bld.build().unwrap(), at)
}

#[test]
fn the_capability_is_an_extended_capability_with_read_only_identity() {
    let (mut c, at) = pf(8);
    assert_eq!(at, 0x100);
    let header = c.read(at, Dword);
    assert_eq!(header & 0xffff, u32::from(sriov::EXT_CAP_ID));
    assert_eq!((header >> 16) & 0xf, sriov::VERSION);
    assert_eq!(header >> 20, 0, "the last extended capability");
    // (register, width, value at power-on); none of them changes when written.
    let ro: &[(u16, AccessSize, u32)] = &[
        (sriov::CAPABILITIES, Dword, sriov::CAP_ARI_PRESERVED),
        (sriov::INITIAL_VFS, Word, 8),
        (sriov::TOTAL_VFS, Word, 8),
        (sriov::VF_DEVICE_ID, Word, 0x0002),
        (sriov::SUPPORTED_PAGE_SIZES, Dword, 0x11),
        (sriov::FIRST_VF_OFFSET, Word, 1),
        (sriov::VF_STRIDE, Word, 1),
        (sriov::VF_MIGRATION_STATE, Dword, 0),
        (sriov::FUNCTION_DEPENDENCY_LINK, Byte, 0),
    ];
    for &(reg, size, want) in ro {
        assert_eq!(c.read(at + reg, size), want, "register {reg:#x}");
        c.write(at + reg, size, 0x5a5a_5a5a);
        assert_eq!(
            c.read(at + reg, size),
            want,
            "register {reg:#x} after a write"
        );
    }
    assert_eq!(c.read(at + sriov::SYSTEM_PAGE_SIZE, Dword), sriov::PAGE_4K);
    assert_eq!(c.read(at + sriov::NUM_VFS, Word), 0);
    assert_eq!(c.read(at + sriov::CONTROL, Word), 0);
    let st = c.sriov().unwrap();
    assert_eq!(
        (st.total_vfs, st.num_vfs, st.vf_enable, st.page_size),
        (8, 0, false, 4096)
    );
}

/// The order Linux's `sriov_init` and `compute_max_vf_buses` use: page size, VF BAR sizing
/// with all-ones, then every NumVFs from TotalVFs down with offset and stride read back.
#[test]
fn linux_iov_probe_sequence_sees_sizes_and_valid_routing_for_every_num_vfs() {
    let (mut c, at) = pf(64);
    for ari in [false, true] {
        c.write(at + sriov::CONTROL, Word, if ari { 0x10 } else { 0 });
        c.write(at + sriov::SYSTEM_PAGE_SIZE, Dword, sriov::PAGE_4K);
        for nr in (1..=64u16).rev() {
            assert!(c.write(at + sriov::NUM_VFS, Word, nr.into()).is_empty());
            assert_eq!(c.read(at + sriov::NUM_VFS, Word), u32::from(nr));
            let offset = c.read(at + sriov::FIRST_VF_OFFSET, Word);
            let stride = c.read(at + sriov::VF_STRIDE, Word);
            assert_ne!(offset, 0, "NumVFs {nr}, ARI {ari}");
            assert!(nr == 1 || stride != 0, "NumVFs {nr}, ARI {ari}");
            let last = offset + stride * (u32::from(nr) - 1);
            assert!(last <= 0xffff, "NumVFs {nr}: last routing ID {last:#x}");
            if !ari && nr > 1 {
                // Without ARI only functions 0-7 of the PF's device are reachable: no VF may
                // take one of them (PF at function 0 of device 0).
                assert!(
                    offset >= 8,
                    "NumVFs {nr}: offset {offset} inside the PF's device"
                );
            }
        }
    }
    c.write(at + sriov::NUM_VFS, Word, 0);

    // VF BAR sizing: all-ones reads back the size (a page at least) and the type bits.
    let bar0 = at + sriov::vf_bar(b(0));
    c.write(bar0, Dword, 0xffff_ffff);
    c.write(bar0 + 4, Dword, 0xffff_ffff);
    assert_eq!(c.read(bar0, Dword), 0xffff_c004);
    assert_eq!(c.read(bar0 + 4, Dword), 0xffff_ffff);
    let bar2 = at + sriov::vf_bar(b(2));
    c.write(bar2, Dword, 0xffff_ffff);
    assert_eq!(
        c.read(bar2, Dword),
        0xffff_f000,
        "1 KiB VF BAR decodes a 4 KiB page"
    );
    assert_eq!(c.vf_bar_spec(b(0)).unwrap().size, 0x4000);
    assert_eq!(c.vf_bar_spec(b(2)).unwrap().size, 0x1000);
    assert!(c.vf_bar_spec(b(1)).is_none());
    // Placement.
    c.write(bar0, Dword, 0x8000_0000);
    c.write(bar0 + 4, Dword, 0x1);
    assert_eq!(c.vf_bar_address(b(0)), Some(0x1_8000_0000));
}

#[test]
fn system_page_size_resizes_the_vf_bars_and_rejects_unsupported_sizes() {
    let (mut c, at) = pf(4);
    let page = at + sriov::SYSTEM_PAGE_SIZE;
    // (value written, value read back): only one supported size is accepted.
    let table: &[(u32, u32)] = &[
        (1 << 4, 1 << 4), // 64 KiB: supported
        (1 << 1, 1 << 4), // 8 KiB: not supported, dropped
        (0x11, 1 << 4),   // two sizes at once, dropped
        (0, 1 << 4),      // none, dropped
        (1, 1),           // back to 4 KiB
    ];
    for &(write, want) in table {
        c.write(page, Dword, write);
        assert_eq!(c.read(page, Dword), want, "after writing {write:#x}");
    }
    c.write(page, Dword, 1 << 4);
    assert_eq!(c.sriov().unwrap().page_size, 0x1_0000);
    let bar0 = at + sriov::vf_bar(b(0));
    c.write(bar0, Dword, 0xffff_ffff);
    assert_eq!(
        c.read(bar0, Dword),
        0xffff_0004,
        "16 KiB VF BAR decodes a 64 KiB page"
    );
    assert_eq!(c.vf_bar_spec(b(0)).unwrap().size, 0x1_0000);
}

#[test]
fn vf_enable_and_vf_mse_report_effects() {
    let (mut c, at) = pf(8);
    c.write(at + sriov::NUM_VFS, Word, 3);
    let ctl = at + sriov::CONTROL;
    let fx = c.write(
        ctl,
        Word,
        u32::from(sriov::CTRL_VF_ENABLE | sriov::CTRL_VF_MSE),
    );
    assert_eq!(
        fx,
        vec![
            ConfigEffect::VfEnable {
                enabled: true,
                num_vfs: 3
            },
            ConfigEffect::VfMemorySpace(true)
        ]
    );
    // Writing the same value again changes nothing.
    assert!(c
        .write(
            ctl,
            Word,
            u32::from(sriov::CTRL_VF_ENABLE | sriov::CTRL_VF_MSE)
        )
        .is_empty());
    assert_eq!(
        c.write(ctl, Word, u32::from(sriov::CTRL_VF_ENABLE)),
        vec![ConfigEffect::VfMemorySpace(false)]
    );
    assert_eq!(
        c.write(ctl, Word, 0),
        vec![ConfigEffect::VfEnable {
            enabled: false,
            num_vfs: 3
        }]
    );
    // VF Migration Enable is hardwired 0 (no migration support).
    c.write(ctl, Word, u32::from(sriov::CTRL_VF_MIGRATION));
    assert_eq!(c.read(ctl, Word), 0);
}

#[test]
fn bad_writes_are_dropped_num_vfs_above_total_and_while_vf_enable_is_set() {
    let (mut c, at) = pf(8);
    let num = at + sriov::NUM_VFS;
    c.write(num, Word, 4);
    // Above TotalVFs: the old value stays, and so do offset and stride.
    let routing = (
        c.read(at + sriov::FIRST_VF_OFFSET, Word),
        c.read(at + sriov::VF_STRIDE, Word),
    );
    for bad in [9u32, 0xffff, 0x100] {
        assert!(c.write(num, Word, bad).is_empty());
        assert_eq!(c.read(num, Word), 4, "NumVFs after writing {bad}");
    }
    assert_eq!(
        (
            c.read(at + sriov::FIRST_VF_OFFSET, Word),
            c.read(at + sriov::VF_STRIDE, Word)
        ),
        routing
    );
    // While VF Enable is set: NumVFs, System Page Size and ARI Capable Hierarchy are locked.
    let ctl = at + sriov::CONTROL;
    c.write(ctl, Word, u32::from(sriov::CTRL_VF_ENABLE));
    c.write(num, Word, 2);
    c.write(at + sriov::SYSTEM_PAGE_SIZE, Dword, 1 << 4);
    c.write(
        ctl,
        Word,
        u32::from(sriov::CTRL_VF_ENABLE | sriov::CTRL_ARI_HIERARCHY),
    );
    let st = c.sriov().unwrap();
    assert_eq!(
        (st.num_vfs, st.page_size, st.ari, st.vf_enable),
        (4, 4096, false, true)
    );
    // Once VF Enable is clear they are writable again.
    c.write(ctl, Word, 0);
    c.write(num, Word, 2);
    c.write(ctl, Word, u32::from(sriov::CTRL_ARI_HIERARCHY));
    let st = c.sriov().unwrap();
    assert_eq!((st.num_vfs, st.ari, st.vf_enable), (2, true, false));
}

#[test]
fn reset_restores_values_and_unlocks_fields() {
    let (mut c, at) = pf(8);
    c.write(at + sriov::NUM_VFS, Word, 5);
    c.write(at + sriov::CONTROL, Word, u32::from(sriov::CTRL_VF_ENABLE));
    c.reset();
    let st = c.sriov().unwrap();
    assert_eq!((st.num_vfs, st.vf_enable), (0, false));
    c.write(at + sriov::NUM_VFS, Word, 6);
    assert_eq!(
        c.sriov().unwrap().num_vfs,
        6,
        "NumVFs is writable after a reset"
    );
}

#[test]
fn bad_capability_options_are_refused() {
    let cases: &[(SriovCap, ConfigError)] = &[
        (
            SriovCap {
                total_vfs: 0,
                ..sriov_cap(1)
            },
            ConfigError::Sriov("TotalVFs must be 1 to 7936"),
        ),
        (
            SriovCap {
                initial_vfs: 9,
                ..sriov_cap(8)
            },
            ConfigError::Sriov("InitialVFs above TotalVFs"),
        ),
        (
            SriovCap {
                supported_page_sizes: 1 << 4,
                ..sriov_cap(8)
            },
            ConfigError::Sriov("4 KiB pages must be supported"),
        ),
        (
            SriovCap {
                vf_bars: [None, None, None, None, None, Some(spec(0x4000, true))],
                ..sriov_cap(8)
            },
            ConfigError::Bar64InLastSlot,
        ),
        (
            SriovCap {
                vf_bars: [
                    Some(spec(0x4000, true)),
                    Some(spec(0x1000, false)),
                    None,
                    None,
                    None,
                    None,
                ],
                ..sriov_cap(8)
            },
            ConfigError::BarSlotInUse(1),
        ),
        (
            SriovCap {
                vf_bars: [Some(spec(0x3000, false)), None, None, None, None, None],
                ..sriov_cap(8)
            },
            ConfigError::BarSize { size: 0x3000 },
        ),
    ];
    for (cap, want) in cases {
        let mut bld = ConfigSpaceBuilder::new(PF);
        assert_eq!(bld.sriov(cap.clone()).unwrap_err(), *want);
    }
    let mut bld = ConfigSpaceBuilder::new(PF);
    bld.sriov(sriov_cap(2)).unwrap();
    assert!(matches!(
        bld.sriov(sriov_cap(2)),
        Err(ConfigError::DuplicateCapability(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// A virtual function's own config space, and its presentation as a function of its own.
// ---------------------------------------------------------------------------------------------

const VF_LAYOUT: MsixLayout = msix_in(BarIndex::ALL[2], 2, 0, 0x800);

fn vf_space() -> ConfigSpace {
    let mut bld = ConfigSpaceBuilder::new_virtual_function(PF);
    bld.bar(b(0), spec(0x4000, true)).unwrap();
    bld.bar(b(2), spec(0x1000, false)).unwrap();
    bld.pci_express(PciExpressCap::default()).unwrap();
    bld.msix(VF_LAYOUT).unwrap();
    bld.build().unwrap()
}

#[test]
fn a_vf_reads_ffff_ids_zero_bars_and_no_memory_space_enable() {
    let mut c = vf_space();
    assert!(c.is_virtual_function());
    assert_eq!(c.read(header::VENDOR_ID, Dword), 0xffff_ffff);
    assert_eq!(
        c.read(header::REVISION_ID, Dword) >> 8,
        0x01_08_02,
        "class code as the PF's"
    );
    for bar in 0..6u16 {
        let at = header::BAR0 + 4 * bar;
        c.write(at, Dword, 0xffff_ffff);
        assert_eq!(c.read(at, Dword), 0, "BAR{bar} register of a VF");
    }
    assert_eq!(
        c.bar_spec(b(0)),
        Some(spec(0x4000, true)),
        "the model still knows its BARs"
    );
    c.write(header::COMMAND, Word, 0xffff);
    assert_eq!(
        c.command(),
        command::BUS_MASTER | command::PARITY_ERROR_RESPONSE | command::SERR_ENABLE,
        "MSE and INTx Disable are hardwired 0 in a VF"
    );
    assert!(c.capability_offset(cap::ID_MSIX).is_some());
    let pcie_at = c.capability_offset(cap::ID_PCI_EXPRESS).unwrap();
    let devcap = c.read(pcie_at + pcie::DEVICE_CAPABILITIES, Dword);
    assert_ne!(devcap & pcie::DEVCAP_FLR, 0, "a VF must offer FLR");
    let fx = c.write(
        pcie_at + pcie::DEVICE_CONTROL,
        Word,
        u32::from(pcie::DEVCTL_INITIATE_FLR),
    );
    assert_eq!(fx, vec![ConfigEffect::FunctionLevelReset]);
}

/// A VF device model for the presentation tests: its config space, and a record of BAR
/// accesses and resets.
struct StubVf {
    config: Mutex<ConfigSpace>,
    bar_writes: Mutex<Vec<(u8, u64, Vec<u8>)>>,
    resets: AtomicU32,
}

impl StubVf {
    fn new(config: ConfigSpace) -> Arc<Self> {
        Arc::new(Self {
            config: Mutex::new(config),
            bar_writes: Mutex::new(Vec::new()),
            resets: AtomicU32::new(0),
        })
    }
}

impl PciDevice for StubVf {
    fn config_read(&self, offset: u16, size: AccessSize) -> u32 {
        self.config.lock().unwrap().read(offset, size)
    }
    fn config_write(&self, offset: u16, size: AccessSize, value: u32) {
        let fx = self.config.lock().unwrap().write(offset, size, value);
        if fx.contains(&ConfigEffect::FunctionLevelReset) {
            self.reset();
        }
    }
    fn bar_spec(&self, bar: BarIndex) -> Option<BarSpec> {
        self.config.lock().unwrap().bar_spec(bar)
    }
    fn bar_read(&self, _bar: BarIndex, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }
    fn bar_write(&self, bar: BarIndex, offset: u64, data: &[u8]) {
        self.bar_writes
            .lock()
            .unwrap()
            .push((bar.get(), offset, data.to_vec()));
    }
    fn reset(&self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
        self.config.lock().unwrap().reset();
    }
    fn msix_vectors(&self) -> u16 {
        VF_LAYOUT.vectors
    }
    fn kind(&self) -> &'static str {
        "stub-vf"
    }
}

#[test]
fn a_presented_vf_has_the_lenders_ids_sizable_bars_and_emulated_mse() {
    let stub = StubVf::new(vf_space());
    let vf = PresentedVf::new(stub.clone(), 0x1dec, 0x0002).unwrap();
    assert_eq!(vf.config_read(header::VENDOR_ID, Dword), 0x0002_1dec);
    assert_eq!(vf.config_read(header::REVISION_ID, Dword) >> 8, 0x01_08_02);
    // BAR sizing from the VF's BAR masks.
    vf.config_write(header::BAR0, Dword, 0xffff_ffff);
    vf.config_write(header::BAR0 + 4, Dword, 0xffff_ffff);
    assert_eq!(vf.config_read(header::BAR0, Dword), 0xffff_c004);
    vf.config_write(header::bar(b(2)), Dword, 0xffff_ffff);
    assert_eq!(vf.config_read(header::bar(b(2)), Dword), 0xffff_f000);
    assert_eq!(
        vf.config_read(header::bar(b(1)), Dword),
        0xffff_ffff,
        "upper half of BAR0"
    );
    // BAR accesses are dropped until the presented Memory Space Enable is set.
    let mut buf = [0u8; 4];
    vf.bar_read(b(0), 0x10, &mut buf);
    assert_eq!(buf, [0xff; 4]);
    vf.bar_write(b(0), 0x14, &[1, 2, 3, 4]);
    assert!(stub.bar_writes.lock().unwrap().is_empty());
    vf.config_write(
        header::COMMAND,
        Word,
        u32::from(command::MEMORY_SPACE | command::BUS_MASTER),
    );
    assert_eq!(
        vf.config_read(header::COMMAND, Word) as u16
            & (command::MEMORY_SPACE | command::BUS_MASTER),
        command::MEMORY_SPACE | command::BUS_MASTER
    );
    assert!(
        stub.config.lock().unwrap().bus_master_enabled(),
        "Bus Master reaches the VF"
    );
    // A dword at Command/Status gets Status from the VF.
    let dword = vf.config_read(header::COMMAND, Dword);
    assert_eq!(dword >> 16, u32::from(stub.config.lock().unwrap().status()));
    vf.bar_read(b(0), 0x10, &mut buf);
    assert_eq!(buf, [0x10; 4]);
    vf.bar_write(b(0), 0x14, &[1, 2, 3, 4]);
    assert_eq!(
        stub.bar_writes.lock().unwrap().as_slice(),
        &[(0, 0x14, vec![1, 2, 3, 4])]
    );

    // FLR through the VF's own PCI Express capability resets the VF and the presentation.
    let pcie_at = stub
        .config
        .lock()
        .unwrap()
        .capability_offset(cap::ID_PCI_EXPRESS)
        .unwrap();
    vf.config_write(
        pcie_at + pcie::DEVICE_CONTROL,
        Word,
        u32::from(pcie::DEVCTL_INITIATE_FLR),
    );
    assert_eq!(stub.resets.load(Ordering::SeqCst), 1);
    assert!(!vf.memory_enabled());
    assert_eq!(
        vf.config_read(header::BAR0, Dword),
        0x4,
        "BAR placement cleared by FLR"
    );
    assert_eq!(
        vf.config_read(header::VENDOR_ID, Word),
        0x1dec,
        "IDs survive FLR"
    );
    // MSI-X capability is the VF's own.
    let msix_at = stub
        .config
        .lock()
        .unwrap()
        .capability_offset(cap::ID_MSIX)
        .unwrap();
    assert_eq!(
        vf.config_read(msix_at + msix::CONTROL, Word) & u32::from(msix::CONTROL_TABLE_SIZE),
        1
    );
}

#[test]
fn presenting_a_physical_function_is_refused() {
    let mut bld = ConfigSpaceBuilder::new(PF);
    bld.bar(b(0), spec(0x4000, true)).unwrap();
    let stub = StubVf::new(bld.build().unwrap());
    assert_eq!(
        PresentedVf::new(stub, 0x1dec, 2).unwrap_err(),
        SriovError::NotAVirtualFunction(0x1dec)
    );
}
