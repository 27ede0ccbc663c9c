use super::*;
use crate::test_support::{bar as b, bar_spec as spec, msix_in};
use crate::{AccessSize::*, BarIndex};

const ID: Identity = Identity {
    vendor_id: 0x1234,
    device_id: 0x5678,
    class_code: 0x01_08_02,
    revision_id: 0x07,
    subsystem_vendor_id: 0x9abc,
    subsystem_id: 0xdef0,
};

const LAYOUT: MsixLayout = msix_in(BarIndex::ALL[2], 4, 0, 0x800);

/// BAR0: 64-bit 16 KiB; BAR2: 32-bit 4 KiB; BAR3: 64-bit prefetchable 1 MiB (slots 3 and 4);
/// capabilities PCIe, MSI-X, PM in that order.
fn space() -> ConfigSpace {
    let mut bld = ConfigSpaceBuilder::new(ID);
    bld.bar(b(0), spec(0x4000, true, false)).unwrap();
    bld.bar(b(2), spec(0x1000, false, false)).unwrap();
    bld.bar(b(3), spec(0x10_0000, true, true)).unwrap();
    assert_eq!(bld.pci_express(PciExpressCap::default()).unwrap(), 0x40);
    assert_eq!(bld.msix(LAYOUT).unwrap(), 0x40 + pcie::LEN);
    assert_eq!(
        bld.power_management().unwrap(),
        0x40 + pcie::LEN + msix::LEN
    );
    bld.build().unwrap()
}

#[test]
fn identity_registers_read_back_and_are_read_only() {
    let mut c = space();
    // (offset, size, expected at power-on)
    let table: &[(u16, AccessSize, u32)] = &[
        (header::VENDOR_ID, Word, 0x1234),
        (header::DEVICE_ID, Word, 0x5678),
        (header::VENDOR_ID, Dword, 0x5678_1234),
        (header::REVISION_ID, Byte, 0x07),
        (header::REVISION_ID, Dword, 0x0108_0207),
        (header::HEADER_TYPE, Byte, 0),
        (header::SUBSYSTEM_VENDOR_ID, Word, 0x9abc),
        (header::SUBSYSTEM_ID, Word, 0xdef0),
        (header::EXPANSION_ROM, Dword, 0),
        (header::INTERRUPT_PIN, Byte, 0),
        (header::CAPABILITIES_POINTER, Byte, 0x40),
        (EXTENDED_CONFIG_START, Dword, 0),
    ];
    for &(off, size, want) in table {
        assert_eq!(c.read(off, size), want, "read {off:#x}");
        assert!(c.write(off, size, !want).is_empty());
        assert_eq!(c.read(off, size), want, "{off:#x} must be read-only");
    }
}

#[test]
fn writable_masks_per_register() {
    // (offset, size, value written, value read back)
    let table: &[(u16, AccessSize, u32, u32)] = &[
        // Command: I/O space is hardwired 0, reserved bits too.
        (header::COMMAND, Word, 0xffff, u32::from(command::WRITABLE)),
        (header::COMMAND, Word, 0x0001, 0),
        (header::CACHE_LINE_SIZE, Byte, 0x10, 0x10),
        (header::INTERRUPT_LINE, Byte, 0x0b, 0x0b),
        // Interrupt Line is writable, Interrupt Pin is not.
        (header::INTERRUPT_LINE, Word, 0xffff, 0x00ff),
        (
            0x40 + pcie::DEVICE_CONTROL,
            Word,
            0x7fff,
            u32::from(pcie::DEVCTL_WRITABLE),
        ),
        (
            0x40 + pcie::DEVICE_CAPABILITIES,
            Dword,
            0,
            pcie::DEVCAP_ROLE_BASED_ERROR | pcie::DEVCAP_FLR,
        ),
        (
            0x40 + pcie::LINK_CONTROL,
            Word,
            0xffff,
            u32::from(pcie::LINKCTL_WRITABLE),
        ),
        (0x40 + pcie::LINK_CONTROL_2, Word, 0x0001, 0x0001),
    ];
    for &(off, size, v, want) in table {
        let mut c = space();
        c.write(off, size, v);
        assert_eq!(c.read(off, size), want, "write {v:#x} at {off:#x}");
    }
}

#[test]
fn status_error_bits_are_rw1c_and_caplist_is_ro() {
    let mut c = space();
    assert_eq!(c.status(), status::CAPABILITIES_LIST);
    c.set_status_bits(status::RECEIVED_MASTER_ABORT | status::SIGNALED_TARGET_ABORT | 0x7);
    assert_eq!(
        c.status(),
        status::CAPABILITIES_LIST | status::RECEIVED_MASTER_ABORT | status::SIGNALED_TARGET_ABORT
    );
    // Writing 0 changes nothing; writing 1 clears exactly that bit; CAP_LIST stays.
    c.write(header::STATUS, Word, 0);
    assert_eq!(
        c.status() & status::RECEIVED_MASTER_ABORT,
        status::RECEIVED_MASTER_ABORT
    );
    c.write(
        header::STATUS,
        Word,
        u32::from(status::RECEIVED_MASTER_ABORT | status::CAPABILITIES_LIST),
    );
    assert_eq!(
        c.status(),
        status::CAPABILITIES_LIST | status::SIGNALED_TARGET_ABORT
    );
    // A dword write to Command must not clear status bits it writes as 0.
    c.write(header::COMMAND, Dword, u32::from(command::MEMORY_SPACE));
    assert_eq!(
        c.status(),
        status::CAPABILITIES_LIST | status::SIGNALED_TARGET_ABORT
    );
    // Command+Status dword write with all-ones clears every error bit.
    c.write(
        header::COMMAND,
        Dword,
        0xffff_0000 | u32::from(command::MEMORY_SPACE),
    );
    assert_eq!(c.status(), status::CAPABILITIES_LIST);
    assert!(c.memory_enabled());
}

#[test]
fn device_status_error_bits_are_rw1c() {
    let mut c = space();
    let at = 0x40 + pcie::DEVICE_STATUS;
    store(&mut c.regs, at, 2, 0x0f);
    c.write(at, Word, 0x05);
    assert_eq!(c.read(at, Word), 0x0a);
}

#[test]
fn bar_sizing_from_masks() {
    // (slot, lo after all-ones, hi after all-ones or None for 32-bit)
    let table: &[(u8, u32, Option<u32>)] = &[
        (0, !(0x4000 - 1) | bar::TYPE_64BIT, Some(0xffff_ffff)),
        (2, !(0x1000 - 1), None),
        (
            3,
            !(0x10_0000 - 1) | bar::TYPE_64BIT | bar::PREFETCHABLE,
            Some(0xffff_ffff),
        ),
        // Unimplemented slot: reads zero, sizing writes ignored.
        (5, 0, None),
    ];
    for &(slot, lo, hi) in table {
        let mut c = space();
        let off = header::bar(b(slot));
        c.write(off, Dword, 0xffff_ffff);
        assert_eq!(c.read(off, Dword), lo, "BAR{slot} low");
        if let Some(hi) = hi {
            c.write(off + 4, Dword, 0xffff_ffff);
            assert_eq!(c.read(off + 4, Dword), hi, "BAR{slot} high");
        }
    }
}

#[test]
fn bar_size_above_4g_shows_in_upper_half() {
    let mut bld = ConfigSpaceBuilder::new(ID);
    bld.bar(b(0), spec(1 << 33, true, true)).unwrap();
    let mut c = bld.build().unwrap();
    c.write(header::BAR0, Dword, 0xffff_ffff);
    c.write(header::BAR0 + 4, Dword, 0xffff_ffff);
    assert_eq!(
        c.read(header::BAR0, Dword),
        bar::TYPE_64BIT | bar::PREFETCHABLE
    );
    assert_eq!(c.read(header::BAR0 + 4, Dword), 0xffff_fffe);
}

#[test]
fn bar_specs_and_addresses() {
    let mut c = space();
    assert_eq!(c.bar_spec(b(0)), Some(spec(0x4000, true, false)));
    assert_eq!(c.bar_spec(b(1)), None, "upper half of BAR0");
    assert_eq!(c.bar_spec(b(2)), Some(spec(0x1000, false, false)));
    assert_eq!(c.bar_spec(b(4)), None);
    assert_eq!(c.bar_spec(b(5)), None);
    let e = c.write(header::BAR0, Dword, 0xfebc_1234);
    assert_eq!(e, vec![ConfigEffect::BarChanged(b(0))]);
    c.write(header::BAR0 + 4, Dword, 0x0000_0012);
    assert_eq!(c.bar_address(b(0)), Some(0x12_febc_0000));
    c.write(header::bar(b(2)), Dword, 0xfe00_0fff);
    assert_eq!(c.bar_address(b(2)), Some(0xfe00_0000));
    assert_eq!(c.bar_address(b(1)), None);
    // Writing the same address again changes nothing.
    assert!(c.write(header::bar(b(2)), Dword, 0xfe00_0000).is_empty());
}

type BuildStep = Box<dyn Fn(&mut ConfigSpaceBuilder) -> Result<(), ConfigError>>;

#[test]
fn builder_rejects_bad_layouts() {
    let cases: Vec<(BuildStep, ConfigError)> = vec![
        (
            Box::new(|x| x.bar(b(5), spec(0x1000, true, false)).map(|_| ())),
            ConfigError::Bar64InLastSlot,
        ),
        (
            Box::new(|x| x.bar(b(0), spec(0x1800, false, false)).map(|_| ())),
            ConfigError::BarSize { size: 0x1800 },
        ),
        (
            Box::new(|x| x.bar(b(0), spec(8, false, false)).map(|_| ())),
            ConfigError::BarSize { size: 8 },
        ),
        (
            Box::new(|x| x.bar(b(0), spec(1 << 32, false, false)).map(|_| ())),
            ConfigError::BarSize { size: 1 << 32 },
        ),
        (
            Box::new(|x| {
                x.bar(b(0), spec(0x1000, true, false))?;
                x.bar(b(1), spec(0x1000, false, false)).map(|_| ())
            }),
            ConfigError::BarSlotInUse(1),
        ),
        (
            Box::new(|x| {
                x.bar(b(1), spec(0x1000, false, false))?;
                x.bar(b(0), spec(0x1000, true, false)).map(|_| ())
            }),
            ConfigError::BarSlotInUse(1),
        ),
        (
            Box::new(|x| {
                x.power_management()?;
                x.power_management().map(|_| ())
            }),
            ConfigError::DuplicateCapability(cap::ID_POWER_MANAGEMENT),
        ),
    ];
    for (i, (f, want)) in cases.into_iter().enumerate() {
        let mut bld = ConfigSpaceBuilder::new(ID);
        assert_eq!(f(&mut bld), Err(want), "case {i}");
    }
}

#[test]
fn builder_checks_msix_against_bars() {
    let mut bld = ConfigSpaceBuilder::new(ID);
    bld.msix(LAYOUT).unwrap();
    assert!(
        matches!(bld.build(), Err(ConfigError::MsixLayout(_))),
        "no BAR2"
    );

    let mut bld = ConfigSpaceBuilder::new(ID);
    bld.bar(b(2), spec(0x1000, false, false)).unwrap();
    let mut overlap = LAYOUT;
    overlap.pba.offset = 0x38;
    bld.msix(overlap).unwrap();
    assert!(
        matches!(bld.build(), Err(ConfigError::MsixLayout(_))),
        "overlap"
    );

    let mut bld = ConfigSpaceBuilder::new(ID);
    let mut zero = LAYOUT;
    zero.vectors = 0;
    assert!(bld.msix(zero).is_err());
    let mut odd = LAYOUT;
    odd.table.offset = 4;
    assert!(bld.msix(odd).is_err());
}

#[test]
fn capability_chain_walks_from_0x34() {
    let c = space();
    let mut at = c.read(header::CAPABILITIES_POINTER, Byte) as u16;
    let mut seen = Vec::new();
    while at != 0 {
        seen.push((at, c.read(at, Byte) as u8));
        at = c.read(at + 1, Byte) as u16;
    }
    assert_eq!(
        seen,
        vec![
            (0x40, cap::ID_PCI_EXPRESS),
            (0x7c, cap::ID_MSIX),
            (0x88, cap::ID_POWER_MANAGEMENT)
        ]
    );
    assert_eq!(c.capability_offset(cap::ID_MSIX), Some(0x7c));
    assert_eq!(c.capability_offset(0x05), None);
    assert_eq!(c.msix(), Some((0x7c, LAYOUT)));
    // PCIe capabilities register: version 2, endpoint.
    assert_eq!(c.read(0x42, Word), 0x0002);
}

#[test]
fn command_changes_are_reported() {
    let mut c = space();
    let e = c.write(
        header::COMMAND,
        Word,
        u32::from(command::MEMORY_SPACE | command::BUS_MASTER),
    );
    assert_eq!(
        e,
        vec![ConfigEffect::CommandChanged {
            memory: true,
            bus_master: true,
            intx_disable: false
        }]
    );
    assert!(c.bus_master_enabled());
    // SERR enable is writable but not something the device reacts to.
    let e = c.write(
        header::COMMAND,
        Word,
        u32::from(command::MEMORY_SPACE | command::BUS_MASTER | command::SERR_ENABLE),
    );
    assert!(e.is_empty());
    let e = c.write(header::COMMAND, Byte, u32::from(command::MEMORY_SPACE));
    assert_eq!(
        e,
        vec![ConfigEffect::CommandChanged {
            memory: true,
            bus_master: false,
            intx_disable: false
        }]
    );
    // A byte write to the upper byte sets INTx disable only.
    let e = c.write(
        header::COMMAND + 1,
        Byte,
        u32::from(command::INTX_DISABLE >> 8),
    );
    assert_eq!(
        e,
        vec![ConfigEffect::CommandChanged {
            memory: true,
            bus_master: false,
            intx_disable: true
        }]
    );
}

#[test]
fn flr_is_an_action_bit() {
    let mut c = space();
    let devctl = 0x40 + pcie::DEVICE_CONTROL;
    assert_eq!(c.read(devctl, Word), u32::from(pcie::DEVCTL_DEFAULT));
    let e = c.write(
        devctl,
        Word,
        u32::from(pcie::DEVCTL_DEFAULT | pcie::DEVCTL_INITIATE_FLR),
    );
    assert_eq!(e, vec![ConfigEffect::FunctionLevelReset]);
    assert_eq!(
        c.read(devctl, Word) & u32::from(pcie::DEVCTL_INITIATE_FLR),
        0
    );
    // Byte write to the upper byte also initiates it; writing 0 does not.
    assert_eq!(
        c.write(devctl + 1, Byte, 0x80),
        vec![ConfigEffect::FunctionLevelReset]
    );
    assert!(c
        .write(devctl, Word, u32::from(pcie::DEVCTL_DEFAULT))
        .is_empty());
    // Dword write to Device Control/Status with bit 15 set.
    assert_eq!(
        c.write(devctl, Dword, 0x8000),
        vec![ConfigEffect::FunctionLevelReset]
    );

    let mut bld = ConfigSpaceBuilder::new(ID);
    let at = bld
        .pci_express(PciExpressCap { flr_capable: false })
        .unwrap();
    let mut c = bld.build().unwrap();
    assert_eq!(
        c.read(at + pcie::DEVICE_CAPABILITIES, Dword) & pcie::DEVCAP_FLR,
        0
    );
    assert!(c.write(at + pcie::DEVICE_CONTROL, Word, 0x8000).is_empty());
}

#[test]
fn msix_control_bits() {
    let mut c = space();
    let ctl = 0x7c + msix::CONTROL;
    assert_eq!(c.read(ctl, Word), 3, "table size N-1, disabled");
    let e = c.write(
        ctl,
        Word,
        u32::from(msix::CONTROL_ENABLE | msix::CONTROL_FUNCTION_MASK | 0x7ff),
    );
    assert_eq!(
        e,
        vec![ConfigEffect::MsixControl {
            enable: true,
            function_mask: true
        }]
    );
    assert_eq!(c.read(ctl, Word), 0xc003, "table size is read-only");
    assert_eq!(c.msix_control(), (true, true));
    let e = c.write(ctl + 1, Byte, 0x80);
    assert_eq!(
        e,
        vec![ConfigEffect::MsixControl {
            enable: true,
            function_mask: false
        }]
    );
    // Table/PBA offset registers are read-only.
    assert_eq!(c.read(0x7c + msix::TABLE, Dword), 2);
    assert_eq!(c.read(0x7c + msix::PBA, Dword), 0x802);
    c.write(0x7c + msix::PBA, Dword, 0);
    assert_eq!(c.read(0x7c + msix::PBA, Dword), 0x802);
}

#[test]
fn power_states() {
    let mut c = space();
    let pmcsr = 0x88 + pm::PMCSR;
    assert_eq!(c.read(0x88 + pm::PMC, Word), u32::from(pm::PMC_VERSION_1_2));
    assert_eq!(c.read(pmcsr, Word), u32::from(pm::PMCSR_NO_SOFT_RESET));
    assert_eq!(
        c.write(pmcsr, Word, 3),
        vec![ConfigEffect::PowerState(PowerState::D3Hot)]
    );
    assert_eq!(c.power_state(), PowerState::D3Hot);
    // D1 is unsupported: the write completes but the state stays.
    assert!(c.write(pmcsr, Word, 1).is_empty());
    assert_eq!(c.power_state(), PowerState::D3Hot);
    assert_eq!(c.read(pmcsr, Word) & 3, 3);
    assert_eq!(
        c.write(pmcsr, Word, 0),
        vec![ConfigEffect::PowerState(PowerState::D0)]
    );
    assert_eq!(c.power_state(), PowerState::D0);
}

#[test]
fn bad_accesses_read_all_ones_and_write_nothing() {
    let mut c = space();
    let before = c.clone();
    let table: &[(u16, AccessSize, u32)] = &[
        (0x1000, Byte, 0xff),
        (0x0ffe, Dword, 0xffff_ffff),
        (0x0002, Dword, 0xffff_ffff),
        (0x0005, Word, 0xffff),
        (u16::MAX, Word, 0xffff),
    ];
    for &(off, size, want) in table {
        assert_eq!(c.read(off, size), want, "{off:#x}");
        assert!(c.write(off, size, 0xffff_ffff).is_empty());
    }
    assert_eq!(&c.regs[..], &before.regs[..]);
    assert_eq!(c.read(0x0ffc, Dword), 0);
}

#[test]
fn reset_restores_power_on_values() {
    let mut c = space();
    let fresh = c.clone();
    c.write(header::COMMAND, Word, 0x0006);
    c.write(header::BAR0, Dword, 0xffff_ffff);
    c.write(0x7c + msix::CONTROL, Word, 0x8000);
    c.set_status_bits(status::RECEIVED_MASTER_ABORT);
    c.reset();
    assert_eq!(&c.regs[..], &fresh.regs[..]);
    assert!(!c.bus_master_enabled());
    assert_eq!(c.msix_control(), (false, false));
}

#[test]
fn constants_match_the_layout() {
    assert_eq!(header::bar(b(5)), 0x24);
    assert_eq!(command::WRITABLE, 0x0546);
    assert_eq!(status::RW1C, 0xf900);
    assert_eq!(pcie::DEVCTL_WRITABLE, 0x79ff);
    assert_eq!(LAYOUT.table_len(), 64);
    assert_eq!(LAYOUT.pba_len(), 8);
    let big = MsixLayout {
        vectors: 65,
        ..LAYOUT
    };
    assert_eq!(big.pba_len(), 16);
}
