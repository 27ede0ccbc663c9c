//! Conformance of the NVMe model: registers, transitions, admin commands and their error
//! statuses, driven through BAR writes like a driver would.

mod common;

use std::time::Duration;

use common::*;
use devlend_nvme::command::{admin_opcode, nvm_opcode};
use devlend_nvme::regs::*;
use devlend_nvme::{fid, lid, Command, Status, PCI_CLASS_NVME, PCI_VENDOR_ID};
use devlend_pci::{AccessSize, BarIndex, PciDevice};

#[test]
fn config_space_identifies_an_nvme_controller() {
    let h = Harness::new();
    assert_eq!(
        h.dev.config_read(0, AccessSize::Word),
        u32::from(PCI_VENDOR_ID)
    );
    assert_eq!(
        h.dev.config_read(0x08, AccessSize::Dword) >> 8,
        PCI_CLASS_NVME
    );
    let bar0 = h.dev.bar_spec(BarIndex::new(0).unwrap()).unwrap();
    assert!(bar0.is_64bit);
    assert_eq!(bar0.size, BAR0_SIZE);
    let bar4 = h.dev.bar_spec(BarIndex::new(4).unwrap()).unwrap();
    assert!(bar4.is_64bit);
    assert_eq!(h.dev.msix_vectors(), 5);
    // BAR sizing through the masks.
    h.dev.config_write(0x10, AccessSize::Dword, 0xffff_ffff);
    assert_eq!(
        h.dev.config_read(0x10, AccessSize::Dword) & !0xf,
        !(BAR0_SIZE as u32 - 1)
    );
}

#[test]
fn register_reset_values() {
    let h = Harness::new();
    let cap = h.read64(REG_CAP);
    let table: &[(&str, u64, u64)] = &[
        ("MQES", cap & 0xffff, 1023),
        ("CQR", (cap >> 16) & 1, 1),
        ("TO", (cap >> 24) & 0xff, 20),
        ("DSTRD", (cap >> 32) & 0xf, 0),
        ("CSS", (cap >> 37) & 0xff, 1),
        ("MPSMIN", (cap >> 48) & 0xf, 0),
        ("VS", u64::from(h.read32(REG_VS)), 0x0001_0400),
        ("CC", u64::from(h.read32(REG_CC)), 0),
        ("CSTS", u64::from(h.read32(REG_CSTS)), 0),
        ("AQA", u64::from(h.read32(REG_AQA)), 0),
        (
            "CAP lo/hi = 64-bit",
            u64::from(h.read32(REG_CAP)) | u64::from(h.read32(REG_CAP + 4)) << 32,
            cap,
        ),
    ];
    for (name, got, want) in table {
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn register_writes() {
    let h = Harness::new();
    // Read-only registers ignore writes.
    let cap = h.read64(REG_CAP);
    h.write64(REG_CAP, 0);
    h.write32(REG_VS, 0);
    h.write32(REG_CSTS, 0xffff_ffff);
    assert_eq!(h.read64(REG_CAP), cap);
    assert_eq!(h.read32(REG_VS), VERSION_1_4);
    assert_eq!(h.read32(REG_CSTS), 0);
    // ASQ/ACQ: bits 11:0 reserved; 32-bit halves compose.
    h.write32(REG_ASQ, 0x1234_5fff);
    h.write32(REG_ASQ + 4, 0xab);
    assert_eq!(h.read64(REG_ASQ), 0xab_1234_5000);
    h.write64(REG_ACQ, 0xdead_beef_f00d_0fff);
    assert_eq!(h.read64(REG_ACQ), 0xdead_beef_f00d_0000);
    // AQA reserved bits.
    h.write32(REG_AQA, 0xffff_ffff);
    assert_eq!(h.read32(REG_AQA), 0x0fff_0fff);
    // INTMS / INTMC.
    h.write32(REG_INTMS, 0b101);
    assert_eq!(h.read32(REG_INTMC), 0b101);
    h.write32(REG_INTMC, 0b001);
    assert_eq!(h.read32(REG_INTMS), 0b100);
    // Outside BAR0 reads all-ones.
    let mut b = [0u8; 4];
    h.dev.bar_read(bar0(), BAR0_SIZE, &mut b);
    assert_eq!(b, [0xff; 4]);
    // Narrow reads of a register.
    let mut b = [0u8; 2];
    h.dev.bar_read(bar0(), REG_VS + 2, &mut b);
    assert_eq!(u16::from_le_bytes(b), 1);
}

#[test]
fn memory_space_disabled_hides_registers() {
    let h = Harness::new();
    h.dev.config_write(0x04, AccessSize::Word, 0x4);
    assert_eq!(h.read32(REG_VS), 0xffff_ffff);
}

#[test]
fn enable_disable_and_shutdown() {
    let mut h = Harness::new();
    h.enable();
    assert_eq!(h.read32(REG_CSTS) & CSTS_RDY, CSTS_RDY);
    // Disable.
    h.write32(REG_CC, 0);
    assert!(h.wait_csts(CSTS_RDY, 0));
    // Enable again, then shut down: SHST complete.
    h.enable();
    h.write32(REG_CC, Harness::CC_READY | (1 << CC_SHN_SHIFT));
    assert!(h.wait_csts(CSTS_SHST_MASK, CSTS_SHST_COMPLETE));
    // Commands are no longer processed after shutdown.
    h.push(0, identify(1, 0, DATA));
    h.ring_sq(0);
    assert!(h.reap(0, Duration::from_millis(200)).is_none());
    // Reset and enable clears SHST.
    h.write32(REG_CC, 0);
    assert!(h.wait_csts(CSTS_RDY, 0));
    h.enable();
    assert_eq!(h.read32(REG_CSTS) & CSTS_SHST_MASK, 0);
}

#[test]
fn bad_enable_sets_cfs() {
    let cases: &[(&str, u32, u64, u64, u32)] = &[
        // name, AQA, ASQ, ACQ, CC
        (
            "zero-size admin SQ",
            0x003f_0000,
            HOST_BASE,
            HOST_BASE + 0x1000,
            Harness::CC_READY,
        ),
        (
            "zero-size admin CQ",
            0x0000_003f,
            HOST_BASE,
            HOST_BASE + 0x1000,
            Harness::CC_READY,
        ),
        (
            "null ASQ",
            0x003f_003f,
            0,
            HOST_BASE + 0x1000,
            Harness::CC_READY,
        ),
        (
            "bad CSS",
            0x003f_003f,
            HOST_BASE,
            HOST_BASE + 0x1000,
            Harness::CC_READY | (1 << CC_CSS_SHIFT),
        ),
        (
            "MPS above MPSMAX",
            0x003f_003f,
            HOST_BASE,
            HOST_BASE + 0x1000,
            Harness::CC_READY | (5 << CC_MPS_SHIFT),
        ),
        (
            "bad AMS",
            0x003f_003f,
            HOST_BASE,
            HOST_BASE + 0x1000,
            Harness::CC_READY | (1 << CC_AMS_SHIFT),
        ),
    ];
    for (name, aqa, asq, acq, cc) in cases {
        let h = Harness::new();
        h.write32(REG_AQA, *aqa);
        h.write64(REG_ASQ, *asq);
        h.write64(REG_ACQ, *acq);
        h.write32(REG_CC, *cc);
        let csts = h.read32(REG_CSTS);
        assert_eq!(csts & (CSTS_CFS | CSTS_RDY), CSTS_CFS, "{name}");
        // A reset clears it.
        h.write32(REG_CC, 0);
        assert_eq!(h.read32(REG_CSTS) & CSTS_CFS, 0, "{name}");
    }
}

#[test]
fn function_level_reset() {
    let mut h = Harness::new();
    h.enable();
    // Find the PCI Express capability and write Initiate FLR (Device Control bit 15).
    let mut cap = h.dev.config_read(0x34, AccessSize::Byte) as u16;
    while cap != 0 && h.dev.config_read(cap, AccessSize::Byte) != 0x10 {
        cap = h.dev.config_read(cap + 1, AccessSize::Byte) as u16;
    }
    assert_ne!(cap, 0);
    h.dev.config_write(cap + 8, AccessSize::Word, 1 << 15);
    // Config space is back at power-on: memory decode off.
    assert_eq!(h.dev.config_read(0x04, AccessSize::Word) & 0x6, 0);
    h.pci_enable();
    assert_eq!(h.read32(REG_CSTS), 0);
    assert_eq!(h.read32(REG_CC), 0);
    assert_eq!(h.read64(REG_ASQ), 0);
    // And it works again.
    h.enable();
    assert!(h.admin(identify(1, 0, DATA)).status.is_success());
    // PciDevice::reset does the same.
    h.dev.reset();
    h.pci_enable();
    assert_eq!(h.read32(REG_CSTS), 0);
}

#[test]
fn identify_controller_and_namespace() {
    let mut h = Harness::with(
        |c| {
            c.serial = "SN-TEST-42".into();
            c.model = "devlend test model".into();
            c.firmware_rev = "1.2.3".into();
        },
        true,
    );
    h.enable();
    let c = h.admin(identify(1, 0, DATA));
    assert_eq!(c.status, Status::SUCCESS);
    let id = h.read_mem(DATA, 4096);
    let u16at = |o: usize| u16::from_le_bytes([id[o], id[o + 1]]);
    let u32at = |o: usize| u32::from_le_bytes([id[o], id[o + 1], id[o + 2], id[o + 3]]);
    assert_eq!(u16at(0), PCI_VENDOR_ID);
    assert_eq!(&id[4..24], b"SN-TEST-42          ");
    assert_eq!(&id[24..42], b"devlend test model");
    assert_eq!(&id[64..72], b"1.2.3   ");
    assert_eq!(id[77], 5, "MDTS");
    assert_eq!(u32at(80), VERSION_1_4);
    assert_ne!(u16at(256) & (1 << 8), 0, "OACS doorbell buffer config");
    assert_eq!(id[259], 3, "AERL");
    assert_eq!(id[512], 0x66, "SQES");
    assert_eq!(id[513], 0x44, "CQES");
    assert_eq!(u32at(516), 1, "NN");
    assert_eq!(id[525] & 1, 1, "VWC");
    assert_eq!(u16at(520) & 0b1101, 0b1101, "ONCS compare/dsm/write zeroes");

    // Namespace.
    assert_eq!(h.status(0, identify(0, 1, DATA)), Status::SUCCESS);
    let ns = h.read_mem(DATA, 4096);
    let nsze = u64::from_le_bytes(ns[0..8].try_into().unwrap());
    assert_eq!(nsze, IMAGE_BYTES / 512);
    assert_eq!(ns[128 + 2], 9, "LBADS");

    // Active namespace list.
    h.mem.fill(DATA, 4096, 0xee).unwrap();
    assert_eq!(h.status(0, identify(2, 0, DATA)), Status::SUCCESS);
    let list = h.read_mem(DATA, 8);
    assert_eq!(list, [1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(h.status(0, identify(2, 1, DATA)), Status::SUCCESS);
    assert_eq!(h.read_mem(DATA, 4), [0; 4]);

    // Descriptors: EUI64, NGUID, UUID.
    assert_eq!(h.status(0, identify(3, 1, DATA)), Status::SUCCESS);
    let d = h.read_mem(DATA, 64);
    assert_eq!((d[0], d[1]), (1, 8));
    assert_eq!((d[12], d[13]), (2, 16));
    assert_eq!((d[32], d[33]), (3, 16));
    assert_eq!(d[52], 0, "list terminated");
}

#[test]
fn admin_error_statuses() {
    let mut h = Harness::new();
    h.enable();
    h.create_io_pair(1, 16);
    let feat = |opcode: u8, cdw10: u32, cdw11: u32| Command {
        opcode,
        cdw: [cdw10, cdw11, 0, 0, 0, 0],
        ..Command::default()
    };
    let log = |lid: u8, numd: u32, offset: u32| Command {
        opcode: admin_opcode::GET_LOG_PAGE,
        prp1: HOST_BASE + DATA,
        cdw: [((numd - 1) << 16) | u32::from(lid), 0, offset, 0, 0, 0],
        ..Command::default()
    };
    let mut sgl = identify(1, 0, DATA);
    sgl.psdt = 1;
    let mut fused = identify(1, 0, DATA);
    fused.fuse = 1;
    let mut cq_pc0 = create_cq(2, 16, 0xa_0000, 2);
    cq_pc0.cdw[1] &= !1;
    let mut cq_unaligned = create_cq(2, 16, 0xa_0000, 2);
    cq_unaligned.prp1 += 0x200;
    let cases: Vec<(&str, Command, Status)> = vec![
        ("unknown opcode", cmd(0x7f), Status::INVALID_OPCODE),
        (
            "NVM opcode on admin queue",
            cmd(0x80),
            Status::INVALID_OPCODE,
        ),
        ("SGL requested", sgl, Status::INVALID_FIELD),
        ("fused", fused, Status::INVALID_FIELD),
        (
            "identify unknown CNS",
            identify(0x20, 0, DATA),
            Status::INVALID_FIELD,
        ),
        (
            "identify ns 0",
            identify(0, 0, DATA),
            Status::INVALID_NAMESPACE,
        ),
        (
            "identify ns 2",
            identify(0, 2, DATA),
            Status::INVALID_NAMESPACE,
        ),
        (
            "identify ns broadcast",
            identify(0, 0xffff_ffff, DATA),
            Status::INVALID_NAMESPACE,
        ),
        (
            "active list from FFFFFFFE",
            identify(2, 0xffff_fffe, DATA),
            Status::INVALID_NAMESPACE,
        ),
        (
            "identify into unmapped memory",
            Command {
                prp1: 0x1000,
                ..identify(1, 0, DATA)
            },
            Status::DATA_TRANSFER_ERROR,
        ),
        (
            "identify misaligned PRP1",
            Command {
                prp1: HOST_BASE + DATA + 2,
                ..identify(1, 0, DATA)
            },
            Status::INVALID_PRP_OFFSET,
        ),
        (
            "create CQ qid 0",
            create_cq(0, 16, 0xa_0000, 0),
            Status::INVALID_QUEUE_ID,
        ),
        (
            "create CQ qid beyond max",
            create_cq(5, 16, 0xa_0000, 0),
            Status::INVALID_QUEUE_ID,
        ),
        (
            "create CQ existing",
            create_cq(1, 16, 0xa_0000, 0),
            Status::INVALID_QUEUE_ID,
        ),
        (
            "create CQ 1 entry",
            create_cq(2, 1, 0xa_0000, 2),
            Status::INVALID_QUEUE_SIZE,
        ),
        (
            "create CQ above MQES",
            create_cq(2, 1025, 0xa_0000, 2),
            Status::INVALID_QUEUE_SIZE,
        ),
        ("create CQ not contiguous", cq_pc0, Status::INVALID_FIELD),
        (
            "create CQ bad vector",
            create_cq(2, 16, 0xa_0000, 5),
            Status::INVALID_INTERRUPT_VECTOR,
        ),
        (
            "create CQ unaligned",
            cq_unaligned,
            Status::INVALID_PRP_OFFSET,
        ),
        (
            "create SQ qid 0",
            create_sq(0, 16, 0xb_0000, 1),
            Status::INVALID_QUEUE_ID,
        ),
        (
            "create SQ existing",
            create_sq(1, 16, 0xb_0000, 1),
            Status::INVALID_QUEUE_ID,
        ),
        (
            "create SQ on CQ 0",
            create_sq(2, 16, 0xb_0000, 0),
            Status::COMPLETION_QUEUE_INVALID,
        ),
        (
            "create SQ on missing CQ",
            create_sq(2, 16, 0xb_0000, 3),
            Status::COMPLETION_QUEUE_INVALID,
        ),
        (
            "create SQ 1 entry",
            create_sq(2, 1, 0xb_0000, 1),
            Status::INVALID_QUEUE_SIZE,
        ),
        (
            "delete SQ 0",
            feat(admin_opcode::DELETE_IO_SQ, 0, 0),
            Status::INVALID_QUEUE_ID,
        ),
        (
            "delete missing SQ",
            feat(admin_opcode::DELETE_IO_SQ, 3, 0),
            Status::INVALID_QUEUE_ID,
        ),
        (
            "delete CQ 0",
            feat(admin_opcode::DELETE_IO_CQ, 0, 0),
            Status::INVALID_QUEUE_ID,
        ),
        (
            "delete CQ in use",
            feat(admin_opcode::DELETE_IO_CQ, 1, 0),
            Status::INVALID_QUEUE_DELETION,
        ),
        (
            "get unsupported feature",
            feat(admin_opcode::GET_FEATURES, 0x03, 0),
            Status::INVALID_FIELD,
        ),
        (
            "set unsupported feature",
            feat(admin_opcode::SET_FEATURES, 0x80, 0),
            Status::INVALID_FIELD,
        ),
        (
            "set feature with save",
            feat(
                admin_opcode::SET_FEATURES,
                (1 << 31) | u32::from(fid::VOLATILE_WRITE_CACHE),
                1,
            ),
            Status::FEATURE_NOT_SAVEABLE,
        ),
        (
            "number of queues after creation",
            feat(
                admin_opcode::SET_FEATURES,
                u32::from(fid::NUMBER_OF_QUEUES),
                0x0001_0001,
            ),
            Status::COMMAND_SEQUENCE_ERROR,
        ),
        (
            "power state 1",
            feat(
                admin_opcode::SET_FEATURES,
                u32::from(fid::POWER_MANAGEMENT),
                1,
            ),
            Status::INVALID_FIELD,
        ),
        (
            "temperature sensor 3",
            feat(
                admin_opcode::SET_FEATURES,
                u32::from(fid::TEMPERATURE_THRESHOLD),
                3 << 16,
            ),
            Status::INVALID_FIELD,
        ),
        (
            "vector config beyond table",
            feat(
                admin_opcode::GET_FEATURES,
                u32::from(fid::INTERRUPT_VECTOR_CONFIG),
                99,
            ),
            Status::INVALID_FIELD,
        ),
        (
            "get features select 4",
            feat(
                admin_opcode::GET_FEATURES,
                (4 << 8) | u32::from(fid::ARBITRATION),
                0,
            ),
            Status::INVALID_FIELD,
        ),
        (
            "unknown log page",
            log(0x70, 128, 0),
            Status::INVALID_LOG_PAGE,
        ),
        (
            "log offset not dword aligned",
            log(lid::SMART_HEALTH, 128, 2),
            Status::INVALID_FIELD,
        ),
        (
            "log offset beyond log",
            log(lid::SMART_HEALTH, 128, 4096),
            Status::INVALID_FIELD,
        ),
        (
            "log above MDTS",
            log(lid::SMART_HEALTH, 0x10000, 0),
            Status::INVALID_FIELD,
        ),
        (
            "doorbell buffer unaligned",
            Command {
                opcode: admin_opcode::DOORBELL_BUFFER_CONFIG,
                prp1: HOST_BASE + 0x8_0100,
                prp2: HOST_BASE + 0x8_1000,
                ..Command::default()
            },
            Status::INVALID_FIELD,
        ),
        (
            "keep alive not supported",
            cmd(0x18),
            Status::INVALID_OPCODE,
        ),
    ];
    for (name, c, want) in cases {
        let got = h.admin(c).status;
        assert_eq!(got, want, "{name}: got {got}, want {want}");
    }
}

#[test]
fn features_roundtrip() {
    let mut h = Harness::new();
    h.enable();
    let set = |fid: u8, v: u32| Command {
        opcode: admin_opcode::SET_FEATURES,
        cdw: [u32::from(fid), v, 0, 0, 0, 0],
        ..Command::default()
    };
    let get = |fid: u8, sel: u32, arg: u32| Command {
        opcode: admin_opcode::GET_FEATURES,
        cdw: [(sel << 8) | u32::from(fid), arg, 0, 0, 0, 0],
        ..Command::default()
    };
    // Number of queues: asks for 8+8, max is 4: granted 4 (0-based 3).
    let c = h.admin(set(fid::NUMBER_OF_QUEUES, 0x0007_0007));
    assert_eq!((c.status, c.dw0), (Status::SUCCESS, 0x0003_0003));
    assert_eq!(h.admin(get(fid::NUMBER_OF_QUEUES, 0, 0)).dw0, 0x0003_0003);
    let c = h.admin(set(fid::NUMBER_OF_QUEUES, 0xffff));
    assert_eq!(c.status, Status::INVALID_FIELD);
    // Granted 2 SQs: a third is an invalid queue id.
    assert_eq!(
        h.admin(set(fid::NUMBER_OF_QUEUES, 0x0001_0001)).dw0,
        0x0001_0001
    );
    assert_eq!(
        h.admin(create_cq(3, 16, 0xa_0000, 3)).status,
        Status::INVALID_QUEUE_ID
    );
    let table: &[(u8, u32, u32)] = &[
        (fid::ARBITRATION, 0x0102_0303, 0),
        (fid::VOLATILE_WRITE_CACHE, 0, 0),
        (fid::VOLATILE_WRITE_CACHE, 1, 0),
        (fid::INTERRUPT_COALESCING, 0x0a05, 0),
        (fid::ASYNC_EVENT_CONFIG, 0x1f, 0),
        (fid::WRITE_ATOMICITY, 1, 0),
        (fid::ERROR_RECOVERY, 0x20, 0),
        (fid::INTERRUPT_VECTOR_CONFIG, (1 << 16) | 2, 2),
    ];
    for &(f, v, arg) in table {
        assert_eq!(h.admin(set(f, v)).status, Status::SUCCESS, "set {f:#x}");
        let c = h.admin(get(f, 0, arg));
        assert_eq!((c.status, c.dw0), (Status::SUCCESS, v), "get {f:#x}");
    }
    // Temperature threshold: over, then under.
    assert!(h
        .admin(set(fid::TEMPERATURE_THRESHOLD, 350))
        .status
        .is_success());
    assert!(h
        .admin(set(fid::TEMPERATURE_THRESHOLD, (1 << 20) | 260))
        .status
        .is_success());
    assert_eq!(h.admin(get(fid::TEMPERATURE_THRESHOLD, 0, 0)).dw0, 350);
    assert_eq!(
        h.admin(get(fid::TEMPERATURE_THRESHOLD, 0, 1 << 20)).dw0,
        260
    );
    // Defaults (select 1) and capabilities (select 3).
    assert_eq!(h.admin(get(fid::VOLATILE_WRITE_CACHE, 1, 0)).dw0, 1);
    assert_eq!(h.admin(get(fid::ARBITRATION, 3, 0)).dw0, 0b100);
    // A controller reset restores defaults.
    h.write32(REG_CC, 0);
    assert!(h.wait_csts(CSTS_RDY, 0));
    h.enable();
    assert_eq!(h.admin(get(fid::ARBITRATION, 0, 0)).dw0, 0);
    assert_eq!(h.admin(get(fid::NUMBER_OF_QUEUES, 0, 0)).dw0, 0x0003_0003);
}

#[test]
fn log_pages() {
    let mut h = Harness::new();
    h.enable();
    h.create_io_pair(1, 16);
    h.mem.write_at(DATA + 0x1000, &[7u8; 4096]).unwrap();
    for _ in 0..3 {
        assert!(h.status(1, write(0, 8, DATA + 0x1000)).is_success());
    }
    assert!(h
        .admin(log_page(lid::SMART_HEALTH, 128))
        .status
        .is_success());
    let s = h.read_mem(DATA, 512);
    let temp = u16::from_le_bytes([s[1], s[2]]);
    assert!((273..373).contains(&temp));
    assert_eq!(s[3], 100, "available spare");
    let host_writes = u128::from_le_bytes(s[80..96].try_into().unwrap());
    assert_eq!(host_writes, 3);
    let units_written = u128::from_le_bytes(s[48..64].try_into().unwrap());
    assert_eq!(
        units_written, 1,
        "24 units of 512 bytes round up to one thousand"
    );

    assert!(h
        .admin(log_page(lid::FIRMWARE_SLOT, 128))
        .status
        .is_success());
    let f = h.read_mem(DATA, 16);
    assert_eq!(f[0] & 7, 1);
    assert_eq!(&f[8..11], b"0.1");

    // An error is recorded in the error log.
    assert_eq!(h.admin(cmd(0x7f)).status, Status::INVALID_OPCODE);
    assert!(h
        .admin(log_page(lid::ERROR_INFORMATION, 16))
        .status
        .is_success());
    let e = h.read_mem(DATA, 64);
    assert!(u64::from_le_bytes(e[0..8].try_into().unwrap()) >= 1);
    let status = u16::from_le_bytes([e[12], e[13]]) >> 1;
    assert_eq!(status & 0xff, 0x01);

    assert!(h
        .admin(log_page(lid::COMMAND_EFFECTS, 1024))
        .status
        .is_success());
    let ce = h.read_mem(DATA, 4096);
    assert_eq!(ce[4 * 6] & 1, 1, "identify supported");
    assert_eq!(
        ce[1024 + 4 * usize::from(nvm_opcode::WRITE)] & 3,
        3,
        "write changes content"
    );
}

#[test]
fn async_event_requests() {
    let mut h = Harness::new();
    h.enable();
    let aer = cmd(admin_opcode::ASYNC_EVENT_REQUEST);
    let mut cids = Vec::new();
    for _ in 0..4 {
        cids.push(h.push(0, aer));
    }
    h.ring_sq(0);
    // Kept outstanding: no completion.
    assert!(h.reap(0, Duration::from_millis(100)).is_none());
    // A fifth exceeds AERL + 1.
    assert_eq!(h.admin(aer).status, Status::AER_LIMIT_EXCEEDED);
    // An invalid doorbell value (tail beyond the queue) completes one with an error event.
    h.write32(DOORBELL_BASE, 1000);
    let c = h.reap(0, Duration::from_secs(5)).expect("event");
    assert!(cids.contains(&c.cid));
    assert_eq!(c.dw0 & 7, 0, "error status event");
    assert_eq!((c.dw0 >> 8) & 0xff, 1, "invalid doorbell write value");
    assert_eq!((c.dw0 >> 16) & 0xff, 1, "error log page");
    // The queue still works (the bad value was dropped).
    h.write32(DOORBELL_BASE, h.queues[0].as_ref().unwrap().sq_tail);
    assert!(h.admin(identify(1, 0, DATA)).status.is_success());
    // Abort: nothing to abort, dword 0 bit 0 says "not aborted".
    let c = h.admin(Command {
        opcode: admin_opcode::ABORT,
        cdw: [u32::from(cids[0]) << 16, 0, 0, 0, 0, 0],
        ..Command::default()
    });
    assert_eq!((c.status, c.dw0 & 1), (Status::SUCCESS, 1));
}

#[test]
fn interrupts_fire_per_completion_queue_vector() {
    let mut h = Harness::new();
    h.enable();
    // The vector fires after the entry is posted: wait for it.
    let fired = |h: &Harness, vector: u16, before: u64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while h.irqs.count(vector) == before && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        h.irqs.count(vector) > before
    };
    let before = h.irqs.count(0);
    assert!(h.admin(identify(1, 0, DATA)).status.is_success());
    assert!(fired(&h, 0, before));
    h.create_io_pair(2, 16);
    let before = h.irqs.count(2);
    assert!(h.status(2, read(0, 1, DATA)).is_success());
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while h.irqs.count(2) == before && std::time::Instant::now() < deadline {
        std::thread::yield_now();
    }
    assert!(h.irqs.count(2) > before);
    // A CQ created without IEN raises none.
    let mut c = create_cq(3, 16, 0xd_0000, 3);
    c.cdw[1] &= !2;
    assert!(h.admin(c).status.is_success());
    assert!(h.admin(create_sq(3, 16, 0xe_0000, 3)).status.is_success());
    h.queues[3] = Some(QueueState {
        sq_base: 0xe_0000,
        cq_base: 0xd_0000,
        entries: 16,
        cq_entries: 16,
        sq_tail: 0,
        cq_head: 0,
        phase: true,
    });
    assert!(h.status(3, read(0, 1, DATA)).is_success());
    assert_eq!(h.irqs.count(3), 0);
}

#[test]
fn queue_deletion_and_reuse() {
    let mut h = Harness::new();
    h.enable();
    h.create_io_pair(1, 8);
    assert!(h.status(1, read(0, 1, DATA)).is_success());
    let del = |op: u8, qid: u32| Command {
        opcode: op,
        cdw: [qid, 0, 0, 0, 0, 0],
        ..Command::default()
    };
    assert!(h
        .admin(del(admin_opcode::DELETE_IO_SQ, 1))
        .status
        .is_success());
    assert!(h
        .admin(del(admin_opcode::DELETE_IO_CQ, 1))
        .status
        .is_success());
    assert_eq!(
        h.admin(del(admin_opcode::DELETE_IO_CQ, 1)).status,
        Status::INVALID_QUEUE_ID
    );
    // Same id again, fresh state (doorbells start from 0).
    h.create_io_pair(1, 8);
    for _ in 0..20 {
        assert!(h.status(1, read(0, 1, DATA)).is_success());
    }
}

#[test]
fn completion_queue_full_is_not_overwritten() {
    let mut h = Harness::new();
    h.enable();
    // CQ of 2 entries holds one completion; SQ of 8.
    assert!(h.admin(create_cq(1, 2, 0x4_0000, 1)).status.is_success());
    assert!(h.admin(create_sq(1, 8, 0x5_0000, 1)).status.is_success());
    h.queues[1] = Some(QueueState {
        sq_base: 0x5_0000,
        cq_base: 0x4_0000,
        entries: 8,
        cq_entries: 2,
        sq_tail: 0,
        cq_head: 0,
        phase: true,
    });
    let cids: Vec<u16> = (0..3).map(|_| h.push(1, read(0, 1, DATA))).collect();
    h.ring_sq(1);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while h.read_mem(0x4_0000, 16)[14] & 1 == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "first entry not posted"
        );
        std::thread::yield_now();
    }
    // Then the worker goes to sleep (a counter): it has looked at the rest and found nothing
    // it may post while the queue is full.
    let sleeps = h.dev.stats().sleeps;
    while h.dev.stats().sleeps == sleeps {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never slept"
        );
        std::thread::yield_now();
    }
    // Exactly one entry posted; the second slot is untouched.
    let e1 = h.read_mem(0x4_0010, 16);
    assert_eq!(e1, [0u8; 16], "no entry beyond the free slot");
    // Consuming entries lets the rest through, in order.
    for cid in cids {
        let c = h.reap(1, Duration::from_secs(5)).expect("completion");
        assert_eq!(c.cid, cid);
        assert!(c.status.is_success());
    }
}

#[test]
fn sq_head_pointer_and_phase_wrap() {
    let mut h = Harness::new();
    h.enable();
    h.create_io_pair(1, 4);
    let mut phases_seen = 0;
    for i in 0..10u32 {
        let c = h.submit(1, read(0, 1, DATA));
        assert!(c.status.is_success());
        assert_eq!(u32::from(c.sqhd), (i + 1) % 4);
        if !h.queues[1].as_ref().unwrap().phase {
            phases_seen += 1;
        }
    }
    assert!(phases_seen > 0, "phase tag inverted after wrapping");
}

#[test]
fn drop_joins_worker() {
    let mut h = Harness::new();
    h.enable();
    assert!(h.admin(identify(1, 0, DATA)).status.is_success());
    h.dev.shutdown();
    // After shutdown, doorbells are ignored.
    h.push(0, identify(1, 0, DATA));
    h.ring_sq(0);
    assert!(h.reap(0, Duration::from_millis(100)).is_none());
}

#[test]
fn interrupt_coalescing() {
    let mut h = Harness::new();
    h.enable();
    h.create_io_pair(1, 32);
    let set = |fid: u8, v: u32| Command {
        opcode: admin_opcode::SET_FEATURES,
        cdw: [u32::from(fid), v, 0, 0, 0, 0],
        ..Command::default()
    };
    // Threshold 4 entries (0-based 3), time 25.5 ms.
    assert!(h
        .admin(set(fid::INTERRUPT_COALESCING, (255 << 8) | 3))
        .status
        .is_success());
    let wait_irq = |h: &Harness, before: u64, within: Duration| {
        let deadline = std::time::Instant::now() + within;
        while h.irqs.count(1) == before {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    };
    // Two completions: posted at once, the interrupt waits for the time limit.
    let before = h.irqs.count(1);
    let start = std::time::Instant::now();
    for _ in 0..2 {
        assert!(h.submit(1, read(0, 1, DATA)).status.is_success());
    }
    assert!(
        wait_irq(&h, before, Duration::from_secs(2)),
        "time limit fires it"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(20),
        "held back by coalescing"
    );
    // Four at once reach the threshold: signalled without waiting for the time limit.
    let before = h.irqs.count(1);
    for _ in 0..4 {
        h.push(1, read(0, 1, DATA));
    }
    let start = std::time::Instant::now();
    h.ring_sq(1);
    assert!(wait_irq(&h, before, Duration::from_secs(2)));
    let threshold_latency = start.elapsed();
    for _ in 0..4 {
        assert!(h
            .reap(1, Duration::from_secs(1))
            .unwrap()
            .status
            .is_success());
    }
    // Coalescing Disable on the vector: immediate.
    assert!(h
        .admin(set(fid::INTERRUPT_VECTOR_CONFIG, (1 << 16) | 1))
        .status
        .is_success());
    let before = h.irqs.count(1);
    let start = std::time::Instant::now();
    assert!(h.submit(1, read(0, 1, DATA)).status.is_success());
    assert!(wait_irq(&h, before, Duration::from_secs(2)));
    assert!(
        threshold_latency < Duration::from_millis(20)
            || start.elapsed() < Duration::from_millis(20),
        "threshold or disable bypass the time limit"
    );
}

// ---------------------------------------------------------------------------------------------
// Virtualization: SR-IOV physical function, primary and secondary controllers.
// ---------------------------------------------------------------------------------------------

use devlend_nvme::virt::action;
use devlend_nvme::{NvmeError, VfNamespaces, PCI_VF_DEVICE_ID};
use std::sync::Arc;

const VQ: u8 = 0;
const VI: u8 = 1;

#[test]
fn sriov_capability_and_vf_functions() {
    let pf = Harness::sriov(4, VfNamespaces::Shared);
    let at = Harness::SRIOV;
    // (register, width, value): the capability the PF offers.
    let table: &[(&str, u16, AccessSize, u32)] = &[
        ("header ID", 0x00, AccessSize::Word, 0x0010),
        ("TotalVFs", 0x0e, AccessSize::Word, 4),
        ("InitialVFs", 0x0c, AccessSize::Word, 4),
        (
            "VF Device ID",
            0x1a,
            AccessSize::Word,
            u32::from(PCI_VF_DEVICE_ID),
        ),
        ("VF BAR0 type: 64-bit", 0x24, AccessSize::Dword, 0x4),
        ("VF BAR4 type: 64-bit", 0x34, AccessSize::Dword, 0x4),
    ];
    for (name, reg, size, want) in table {
        assert_eq!(pf.dev.config_read(at + reg, *size), *want, "{name}");
    }
    // No VF before VF Enable.
    let port = || {
        Arc::new(common::MemPort {
            mem: pf.mem.clone(),
            direct: true,
        })
    };
    let irqs = Arc::new(common::Irqs::default());
    assert!(matches!(
        pf.dev.new_virtual_function(1, port(), irqs.clone()),
        Err(NvmeError::VfNotEnabled(1))
    ));
    pf.enable_vfs(2);
    for bad in [0u16, 3, 5] {
        assert!(
            matches!(
                pf.dev.new_virtual_function(bad, port(), irqs.clone()),
                Err(NvmeError::VfNotEnabled(v)) if v == bad
            ),
            "VF {bad} of 2"
        );
    }
    let vf = pf.virtual_function(2);
    assert_eq!(
        vf.dev.config_read(0, AccessSize::Dword),
        0xffff_ffff,
        "VF IDs"
    );
    assert_eq!(
        vf.dev.config_read(0x08, AccessSize::Dword) >> 8,
        PCI_CLASS_NVME
    );
    assert_eq!(
        vf.dev.config_read(0x10, AccessSize::Dword),
        0,
        "VF BAR0 register"
    );
    assert_eq!(
        vf.dev.bar_spec(BarIndex::new(0).unwrap()).unwrap().size,
        BAR0_SIZE
    );
    // Its registers decode while the PF's VF MSE is set, and not after it is cleared.
    assert_eq!(vf.read32(REG_VS), VERSION_1_4);
    pf.dev.config_write(at + 0x08, AccessSize::Word, 0b0001);
    assert_eq!(vf.read32(REG_VS), 0xffff_ffff, "VF MSE clear");
    // The PF itself is not a VF, and a VF cannot make VFs.
    assert!(matches!(
        vf.dev.new_virtual_function(1, port(), irqs),
        Err(NvmeError::InvalidConfig(_))
    ));
}

fn u16le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[test]
fn identify_primary_capabilities_and_secondary_list() {
    let mut pf = Harness::sriov(3, VfNamespaces::Shared);
    pf.enable();
    pf.enable_vfs(3);
    // Identify Controller: the primary supports Virtualization Management (OACS bit 7).
    assert_eq!(pf.status(0, identify(1, 0, DATA)), Status::SUCCESS);
    let id = pf.read_mem(DATA, 4096);
    assert_ne!(
        u16le(&id, 256) & (1 << 7),
        0,
        "OACS virtualization management"
    );
    assert_eq!(u16le(&id, 78), 0, "primary CNTLID");

    // Resources: a secondary may take 5 (4 I/O queue pairs + admin; 5 vectors).
    for (rt, nr) in [(VQ, 3), (VI, 2)] {
        assert_eq!(
            pf.admin(virt_mgmt(action::SECONDARY_ASSIGN, rt, 2, nr))
                .status,
            Status::SUCCESS
        );
    }
    assert_eq!(
        pf.admin(virt_mgmt(action::SECONDARY_ONLINE, 0, 2, 0))
            .status,
        Status::SUCCESS
    );

    assert_eq!(pf.status(0, identify(0x14, 0, DATA)), Status::SUCCESS);
    let p = pf.read_mem(DATA, 4096);
    let table: &[(&str, u32, u32)] = &[
        ("CNTLID", u32::from(u16le(&p, 0x00)), 0),
        ("CRT", u32::from(p[0x04]), 0b11),
        ("VQFRT", u32le(&p, 0x20), 15),
        ("VQRFA", u32le(&p, 0x24), 3),
        ("VQRFAP", u32::from(u16le(&p, 0x28)), 0),
        ("VQPRT", u32::from(u16le(&p, 0x2a)), 5),
        ("VQFRSM", u32::from(u16le(&p, 0x2c)), 5),
        ("VQGRAN", u32::from(u16le(&p, 0x2e)), 1),
        ("VIFRT", u32le(&p, 0x50), 15),
        ("VIRFA", u32le(&p, 0x54), 2),
        ("VIRFAP", u32::from(u16le(&p, 0x58)), 0),
        ("VIPRT", u32::from(u16le(&p, 0x5a)), 5),
        ("VIFRSM", u32::from(u16le(&p, 0x5c)), 5),
        ("VIGRAN", u32::from(u16le(&p, 0x5e)), 1),
    ];
    for (name, got, want) in table {
        assert_eq!(got, want, "primary controller capabilities: {name}");
    }

    // The secondary controller list: every secondary, then from CNTID 2 on.
    for (from, want_ids) in [(0u16, vec![1u16, 2, 3]), (2, vec![2, 3]), (4, vec![])] {
        pf.mem.fill(DATA, 4096, 0xee).unwrap();
        let mut c = identify(0x15, 0, DATA);
        c.cdw[0] |= u32::from(from) << 16;
        assert_eq!(pf.status(0, c), Status::SUCCESS);
        let l = pf.read_mem(DATA, 4096);
        assert_eq!(usize::from(l[0]), want_ids.len(), "entries from {from}");
        for (i, scid) in want_ids.iter().enumerate() {
            let e = &l[32 + 32 * i..64 + 32 * i];
            let (online, nvq, nvi) = if *scid == 2 { (1, 3, 2) } else { (0, 0, 0) };
            assert_eq!(
                (
                    u16le(e, 0),
                    u16le(e, 2),
                    e[4],
                    u16le(e, 8),
                    u16le(e, 12),
                    u16le(e, 14)
                ),
                (*scid, 0, online, *scid, nvq, nvi),
                "entry {i} from {from}: SCID, PCID, SCS, VFN, NVQ, NVI"
            );
        }
    }

    // A plain controller has neither page, nor Virtualization Management.
    let mut plain = Harness::new();
    plain.enable();
    for cns in [0x14u8, 0x15] {
        assert_eq!(
            plain.status(0, identify(cns, 0, DATA)),
            Status::INVALID_FIELD,
            "CNS {cns:#x}"
        );
    }
    assert_eq!(
        plain
            .admin(virt_mgmt(action::SECONDARY_ONLINE, 0, 1, 0))
            .status,
        Status::INVALID_OPCODE
    );
}

#[test]
fn virtualization_management_statuses() {
    let mut pf = Harness::sriov(2, VfNamespaces::Shared);
    pf.enable();
    pf.enable_vfs(1);
    // (what, action, rt, cntlid, nr, status, dw0), in order: each row sees the rows before.
    let table: &[(&str, u8, u8, u16, u16, Status, u32)] = &[
        (
            "online without resources",
            action::SECONDARY_ONLINE,
            0,
            1,
            0,
            Status::INVALID_SECONDARY_STATE,
            0,
        ),
        (
            "assign VQ",
            action::SECONDARY_ASSIGN,
            VQ,
            1,
            2,
            Status::SUCCESS,
            2,
        ),
        (
            "online without VI",
            action::SECONDARY_ONLINE,
            0,
            1,
            0,
            Status::INVALID_SECONDARY_STATE,
            0,
        ),
        (
            "assign VI",
            action::SECONDARY_ASSIGN,
            VI,
            1,
            1,
            Status::SUCCESS,
            1,
        ),
        (
            "more than a secondary may take",
            action::SECONDARY_ASSIGN,
            VQ,
            2,
            6,
            Status::INVALID_CONTROLLER_RESOURCES,
            0,
        ),
        (
            "no such resource type",
            action::SECONDARY_ASSIGN,
            2,
            1,
            1,
            Status::INVALID_RESOURCE_ID,
            0,
        ),
        (
            "controller 0 is the primary",
            action::SECONDARY_ASSIGN,
            VQ,
            0,
            1,
            Status::INVALID_CONTROLLER_ID,
            0,
        ),
        (
            "beyond TotalVFs",
            action::SECONDARY_ASSIGN,
            VQ,
            3,
            1,
            Status::INVALID_CONTROLLER_ID,
            0,
        ),
        (
            "online 0xffff",
            action::SECONDARY_ONLINE,
            0,
            0xffff,
            0,
            Status::INVALID_CONTROLLER_ID,
            0,
        ),
        (
            "VF 2 not enabled",
            action::SECONDARY_ASSIGN,
            VQ,
            2,
            2,
            Status::SUCCESS,
            2,
        ),
        (
            "VF 2 assign VI",
            action::SECONDARY_ASSIGN,
            VI,
            2,
            1,
            Status::SUCCESS,
            1,
        ),
        (
            "online a disabled VF",
            action::SECONDARY_ONLINE,
            0,
            2,
            0,
            Status::INVALID_SECONDARY_STATE,
            0,
        ),
        (
            "online",
            action::SECONDARY_ONLINE,
            0,
            1,
            0,
            Status::SUCCESS,
            0,
        ),
        (
            "assign to an online secondary",
            action::SECONDARY_ASSIGN,
            VQ,
            1,
            3,
            Status::INVALID_SECONDARY_STATE,
            0,
        ),
        (
            "primary allocation for another controller",
            action::PRIMARY_FLEXIBLE_ALLOCATION,
            VQ,
            1,
            1,
            Status::INVALID_CONTROLLER_ID,
            0,
        ),
        (
            "primary allocation beyond the pool",
            action::PRIMARY_FLEXIBLE_ALLOCATION,
            VQ,
            0,
            9,
            Status::INVALID_CONTROLLER_RESOURCES,
            0,
        ),
        (
            "primary allocation",
            action::PRIMARY_FLEXIBLE_ALLOCATION,
            VQ,
            0,
            6,
            Status::SUCCESS,
            6,
        ),
        (
            "pool exhausted by the primary",
            action::SECONDARY_ASSIGN,
            VQ,
            2,
            3,
            Status::INVALID_CONTROLLER_RESOURCES,
            0,
        ),
        ("unknown action", 0x3, 0, 1, 0, Status::INVALID_FIELD, 0),
        (
            "offline",
            action::SECONDARY_OFFLINE,
            0,
            1,
            0,
            Status::SUCCESS,
            0,
        ),
        (
            "offline again",
            action::SECONDARY_OFFLINE,
            0,
            1,
            0,
            Status::SUCCESS,
            0,
        ),
    ];
    for &(what, act, rt, cntlid, nr, status, dw0) in table {
        let c = pf.admin(virt_mgmt(act, rt, cntlid, nr));
        assert_eq!(c.status, status, "{what}");
        if status == Status::SUCCESS {
            assert_eq!(c.dw0, dw0, "{what}: resources allocated");
        }
    }
    assert!(!pf.dev.secondary_online(1));

    // A secondary controller has no Virtualization Management.
    pf.admin(virt_mgmt(action::SECONDARY_ASSIGN, VQ, 1, 2));
    pf.admin(virt_mgmt(action::SECONDARY_ONLINE, 0, 1, 0));
    let mut vf = pf.virtual_function(1);
    vf.enable();
    assert_eq!(
        vf.admin(virt_mgmt(action::SECONDARY_OFFLINE, 0, 1, 0))
            .status,
        Status::INVALID_OPCODE
    );
    assert_eq!(vf.status(0, identify(0x14, 0, DATA)), Status::INVALID_FIELD);
    assert!(
        pf.dev.secondary_online(1),
        "the secondary's own command changed nothing"
    );
}

/// Brings VF `vf` online with `nvq` queue and `nvi` interrupt resources through the PF.
fn online(pf: &mut Harness, vf: u16, nvq: u16, nvi: u16) {
    for (rt, nr) in [(VQ, nvq), (VI, nvi)] {
        assert_eq!(
            pf.admin(virt_mgmt(action::SECONDARY_ASSIGN, rt, vf, nr))
                .status,
            Status::SUCCESS
        );
    }
    assert_eq!(
        pf.admin(virt_mgmt(action::SECONDARY_ONLINE, 0, vf, 0))
            .status,
        Status::SUCCESS
    );
}

#[test]
fn offline_secondary_fails_cc_en_and_an_online_one_runs_on_its_resources() {
    let mut pf = Harness::sriov(2, VfNamespaces::Shared);
    pf.enable();
    pf.enable_vfs(2);
    let mut vf = pf.virtual_function(1);
    assert!(
        vf.enable_expecting_cfs(),
        "CC.EN on an offline secondary sets CFS"
    );
    vf.write32(REG_CC, 0);
    assert!(vf.wait_csts(CSTS_CFS | CSTS_RDY, 0));

    online(&mut pf, 1, 3, 3);
    vf.enable();
    assert_eq!(vf.status(0, identify(1, 0, DATA)), Status::SUCCESS);
    let id = vf.read_mem(DATA, 4096);
    assert_eq!(u16le(&id, 78), 1, "secondary CNTLID is its VF number");
    assert_eq!(
        u16le(&id, 256) & (1 << 7),
        0,
        "no Virtualization Management on a secondary"
    );
    // Three VQ resources: the admin queue and two I/O queue pairs; three vectors.
    let mut c = cmd(admin_opcode::GET_FEATURES);
    c.cdw[0] = u32::from(fid::NUMBER_OF_QUEUES);
    let got = vf.admin(c);
    assert_eq!((got.status, got.dw0), (Status::SUCCESS, 0x0001_0001));
    vf.create_io_pair(1, 16);
    vf.create_io_pair(2, 16);
    assert_eq!(
        vf.status(0, create_cq(3, 16, 0x40_0000, 0)),
        Status::INVALID_QUEUE_ID,
        "a third I/O queue exceeds the VQ resources"
    );
    assert_eq!(
        vf.status(0, create_cq(3, 16, 0x40_0000, 2)),
        Status::INVALID_QUEUE_ID
    );
    let data = pattern(512, 7);
    vf.mem.write_at(DATA, &data).unwrap();
    assert_eq!(vf.status(1, write(0, 1, DATA)), Status::SUCCESS);
    assert_eq!(
        &pf.image_bytes()[..512],
        &data[..],
        "shared namespace: the whole image"
    );

    // Taken offline while running: the secondary stops with CFS.
    assert_eq!(
        pf.admin(virt_mgmt(action::SECONDARY_OFFLINE, 0, 1, 0))
            .status,
        Status::SUCCESS
    );
    vf.push(1, write(1, 1, DATA));
    vf.ring_sq(1);
    assert!(
        vf.wait_csts(CSTS_CFS, CSTS_CFS),
        "offline secondary reports CFS"
    );
    assert_eq!(
        &pf.image_bytes()[512..1024],
        &[0u8; 512][..],
        "nothing written after offline"
    );

    // VF Enable cleared on the PF takes every secondary offline.
    online(&mut pf, 2, 2, 1);
    pf.dev
        .config_write(Harness::SRIOV + 0x08, AccessSize::Word, 0);
    assert!(!pf.dev.secondary_online(2));
}

#[test]
fn private_namespaces_are_slices_of_the_image_and_shared_is_one_disk() {
    // Private: 3 VFs -> four 1 MiB slices of the 4 MiB image; VF n writes into slice n.
    let mut pf = Harness::sriov(3, VfNamespaces::Private);
    pf.enable();
    pf.enable_vfs(3);
    let slice = (IMAGE_BYTES / 4) as usize;
    assert_eq!(pf.status(0, identify(0, 1, DATA)), Status::SUCCESS);
    let ns = pf.read_mem(DATA, 8);
    assert_eq!(
        u64::from_le_bytes(ns.try_into().unwrap()),
        slice as u64 / 512,
        "PF NSZE"
    );
    let mut nguids = vec![];
    for n in 1..=3u16 {
        online(&mut pf, n, 2, 2);
        let mut vf = pf.virtual_function(n);
        vf.enable();
        vf.create_io_pair(1, 16);
        assert_eq!(vf.status(0, identify(0, 1, DATA)), Status::SUCCESS);
        let ns = vf.read_mem(DATA, 4096);
        assert_eq!(
            u64::from_le_bytes(ns[0..8].try_into().unwrap()),
            slice as u64 / 512,
            "VF {n} NSZE"
        );
        nguids.push(ns[104..120].to_vec());
        let data = pattern(512, n as u8);
        vf.mem.write_at(DATA, &data).unwrap();
        assert_eq!(vf.status(1, write(0, 1, DATA)), Status::SUCCESS);
        // The last block is in range, one past it is not.
        let last = slice as u64 / 512 - 1;
        assert_eq!(vf.status(1, write(last, 1, DATA)), Status::SUCCESS);
        assert_eq!(
            vf.status(1, write(last + 1, 1, DATA)),
            Status::LBA_OUT_OF_RANGE
        );
        let img = pf.image_bytes();
        let at = usize::from(n) * slice;
        assert_eq!(
            &img[at..at + 512],
            &data[..],
            "VF {n}'s block 0 is at slice {n}"
        );
        assert_eq!(
            &img[at + slice - 512..at + slice],
            &data[..],
            "VF {n}'s last block"
        );
    }
    assert_ne!(
        nguids[0], nguids[1],
        "private namespaces have their own NGUIDs"
    );
    assert!(
        pf.image_bytes()[..slice].iter().all(|&b| b == 0),
        "PF slice untouched"
    );

    // Shared: a write through VF 1 is read through VF 2 and the PF.
    let mut pf = Harness::sriov(2, VfNamespaces::Shared);
    pf.enable();
    pf.create_io_pair(1, 16);
    pf.enable_vfs(2);
    let mut vfs: Vec<Harness> = (1..=2u16)
        .map(|n| {
            online(&mut pf, n, 2, 2);
            let mut vf = pf.virtual_function(n);
            vf.enable();
            vf.create_io_pair(1, 16);
            vf
        })
        .collect();
    let data = pattern(512, 0x5a);
    vfs[0].mem.write_at(DATA, &data).unwrap();
    assert_eq!(vfs[0].status(1, write(100, 1, DATA)), Status::SUCCESS);
    assert_eq!(vfs[1].status(1, read(100, 1, DATA)), Status::SUCCESS);
    assert_eq!(vfs[1].read_mem(DATA, 512), data);
    assert_eq!(pf.status(1, read(100, 1, DATA)), Status::SUCCESS);
    assert_eq!(pf.read_mem(DATA, 512), data);
}

#[test]
fn vf_function_level_reset_resets_that_vf_alone() {
    let mut pf = Harness::sriov(2, VfNamespaces::Shared);
    pf.enable();
    pf.enable_vfs(2);
    online(&mut pf, 1, 2, 2);
    online(&mut pf, 2, 2, 2);
    let mut a = pf.virtual_function(1);
    let mut b = pf.virtual_function(2);
    a.enable();
    b.enable();
    a.create_io_pair(1, 16);
    b.create_io_pair(1, 16);
    // FLR of VF 1 through its own PCI Express capability.
    let mut cap = a.dev.config_read(0x34, AccessSize::Byte) as u16;
    while a.dev.config_read(cap, AccessSize::Byte) != 0x10 {
        cap = a.dev.config_read(cap + 1, AccessSize::Byte) as u16;
    }
    assert_eq!(a.read32(REG_CSTS) & CSTS_RDY, CSTS_RDY);
    a.dev.config_write(cap + 8, AccessSize::Word, 1 << 15);
    assert_eq!(a.read32(REG_CSTS) & CSTS_RDY, 0, "VF 1 reset");
    assert_eq!(b.read32(REG_CSTS) & CSTS_RDY, CSTS_RDY, "VF 2 still ready");
    assert_eq!(
        b.status(1, read(0, 1, DATA)),
        Status::SUCCESS,
        "VF 2 still runs I/O"
    );
    assert!(pf.dev.secondary_online(1), "FLR keeps the secondary online");
    a.pci_enable();
    a.enable();
    a.create_io_pair(1, 16);
    assert_eq!(
        a.status(1, read(0, 1, DATA)),
        Status::SUCCESS,
        "VF 1 usable again"
    );
}

#[test]
fn a_vfs_dma_reaches_only_its_own_domain() {
    let mut pf = Harness::sriov(2, VfNamespaces::Shared);
    pf.enable();
    pf.enable_vfs(2);
    online(&mut pf, 1, 2, 2);
    online(&mut pf, 2, 2, 2);
    let mut a = pf.virtual_function(1);
    let mut b = pf.virtual_function(2);
    for h in [&mut a, &mut b] {
        h.enable();
        h.create_io_pair(1, 16);
    }
    b.mem.fill(DATA, 8192, 0xaa).unwrap();
    a.mem.write_at(DATA, &pattern(512, 3)).unwrap();
    assert_eq!(a.status(1, write(0, 1, DATA)), Status::SUCCESS);
    // A read lands in VF 1's memory only, at the same bus address VF 2 uses for its own.
    assert_eq!(a.status(1, read(0, 1, DATA + 4096)), Status::SUCCESS);
    assert_eq!(a.read_mem(DATA + 4096, 512), pattern(512, 3));
    // Outside VF 1's domain: an error, and no byte anywhere.
    let outside = HOST_LEN as u64;
    assert_eq!(
        a.status(1, read(0, 1, outside)),
        Status::DATA_TRANSFER_ERROR
    );
    assert!(
        b.read_mem(DATA, 8192).iter().all(|&x| x == 0xaa),
        "VF 2's memory untouched by VF 1's DMA"
    );
}

// ---------------------------------------------------------------------------------------------
// Controller Memory Buffer (NVMe 1.4: CAP.CMBS, CMBLOC, CMBSZ, CMBMSC, CMBSTS)
// ---------------------------------------------------------------------------------------------

const CMB_BYTES: u64 = 1 << 20;
/// Right after host memory: a multiple of the 64 KiB size unit, and nothing the host port maps.
const CBA: u64 = HOST_BASE + HOST_LEN as u64;

fn bar2() -> BarIndex {
    BarIndex::new(devlend_nvme::CMB_BAR).unwrap()
}

fn with_cmb() -> Harness {
    Harness::with(|c| c.cmb_bytes = Some(CMB_BYTES), true)
}

/// Writes CMBMSC as Linux does: the high dword, then the low one.
fn write_cmbmsc(h: &Harness, v: u64) {
    h.write32(REG_CMBMSC + 4, (v >> 32) as u32);
    h.write32(REG_CMBMSC, v as u32);
}

fn cmb_read(h: &Harness, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    h.dev.bar_read(bar2(), off, &mut v);
    v
}

#[test]
fn cmb_registers() {
    // Without a CMB: CAP.CMBS clear, the registers read zero and ignore writes, no BAR 2.
    let h = Harness::new();
    assert_eq!(h.read64(REG_CAP) & CAP_CMBS, 0);
    write_cmbmsc(&h, CBA | CMBMSC_CMSE | CMBMSC_CRE);
    for (name, reg) in [
        ("CMBLOC", REG_CMBLOC),
        ("CMBSZ", REG_CMBSZ),
        ("CMBMSC", REG_CMBMSC),
        ("CMBMSC hi", REG_CMBMSC + 4),
        ("CMBSTS", REG_CMBSTS),
    ] {
        assert_eq!(h.read32(reg), 0, "no CMB: {name}");
    }
    assert!(h.dev.bar_spec(bar2()).is_none());

    let h = with_cmb();
    let bar = h.dev.bar_spec(bar2()).unwrap();
    assert_eq!(
        (bar.size, bar.is_64bit, bar.prefetchable),
        (CMB_BYTES, true, true)
    );
    // BAR sizing through the mask: 64-bit (type 10b) prefetchable (bit 3).
    h.dev.config_write(0x18, AccessSize::Dword, 0xffff_ffff);
    let raw = h.dev.config_read(0x18, AccessSize::Dword);
    assert_eq!(raw & 0xf, 0b1100);
    assert_eq!(raw & !0xf, !(CMB_BYTES as u32 - 1));
    h.dev.config_write(0x18, AccessSize::Dword, 0);

    let cap = h.read64(REG_CAP);
    let before: &[(&str, u64, u64)] = &[
        ("CAP.CMBS", (cap >> 57) & 1, 1),
        ("CMBLOC before CRE", u64::from(h.read32(REG_CMBLOC)), 0),
        ("CMBSZ before CRE", u64::from(h.read32(REG_CMBSZ)), 0),
        ("CMBMSC", h.read64(REG_CMBMSC), 0),
        ("CMBSTS", u64::from(h.read32(REG_CMBSTS)), 0),
    ];
    for (name, got, want) in before {
        assert_eq!(got, want, "{name}");
    }
    // CRE: the capability registers read their values. Reserved bits 11:2 stay zero.
    h.write32(REG_CMBMSC, 0xffc | CMBMSC_CRE as u32);
    let loc = h.read32(REG_CMBLOC);
    let sz = h.read32(REG_CMBSZ);
    let after: &[(&str, u32, u32)] = &[
        ("CMBMSC (reserved bits zero)", h.read32(REG_CMBMSC), 1),
        ("CMBLOC.BIR", loc & CMBLOC_BIR_MASK, 2),
        ("CMBLOC.OFST", loc >> CMBLOC_OFST_SHIFT, 0),
        ("CMBLOC.CQMMS", loc & CMBLOC_CQMMS, CMBLOC_CQMMS),
        ("CMBLOC.CQPDS", loc & CMBLOC_CQPDS, 0),
        ("CMBLOC.CDPMLS", loc & CMBLOC_CDPMLS, CMBLOC_CDPMLS),
        ("CMBLOC.CDPCILS", loc & CMBLOC_CDPCILS, CMBLOC_CDPCILS),
        ("CMBLOC.CQDA", loc & CMBLOC_CQDA, 0),
        ("CMBSZ.SQS", sz & CMBSZ_SQS, CMBSZ_SQS),
        ("CMBSZ.CQS", sz & CMBSZ_CQS, 0),
        ("CMBSZ.LISTS", sz & CMBSZ_LISTS, CMBSZ_LISTS),
        ("CMBSZ.RDS", sz & CMBSZ_RDS, CMBSZ_RDS),
        ("CMBSZ.WDS", sz & CMBSZ_WDS, CMBSZ_WDS),
        ("CMBSZ.SZU (64 KiB)", (sz >> CMBSZ_SZU_SHIFT) & 0xf, 1),
        ("CMBSZ.SZ (units)", sz >> CMBSZ_SZ_SHIFT, 16),
        ("CMBSTS.CBAI (no CMSE)", h.read32(REG_CMBSTS), 0),
    ];
    for (name, got, want) in after {
        assert_eq!(got, want, "{name}");
    }
    // Read-only registers ignore writes.
    h.write32(REG_CMBLOC, 0xffff_ffff);
    h.write32(REG_CMBSZ, 0);
    h.write32(REG_CMBSTS, 1);
    assert_eq!((h.read32(REG_CMBLOC), h.read32(REG_CMBSZ)), (loc, sz));

    // CMSE with a base that is not a multiple of the size unit: CBAI, nothing mapped.
    let cases: &[(&str, u64, u32)] = &[
        ("aligned base", CBA, 0),
        ("4 KiB but not 64 KiB aligned", CBA + 0x1000, CMBSTS_CBAI),
        ("range wraps past 2^64", 0xffff_ffff_fff1_0000, CMBSTS_CBAI),
        ("aligned again clears CBAI", CBA, 0),
    ];
    for (name, cba, cbai) in cases {
        write_cmbmsc(&h, cba | CMBMSC_CMSE | CMBMSC_CRE);
        assert_eq!(h.read32(REG_CMBSTS), *cbai, "{name}");
        assert_eq!(h.read64(REG_CMBMSC), cba | 3, "{name}: CMBMSC reads back");
    }
    // Clearing CRE hides the capability registers again.
    write_cmbmsc(&h, 0);
    assert_eq!((h.read32(REG_CMBLOC), h.read32(REG_CMBSZ)), (0, 0));

    // A controller reset keeps CMBMSC; a function level reset clears it.
    let mut h = with_cmb();
    write_cmbmsc(&h, CBA | CMBMSC_CMSE | CMBMSC_CRE);
    h.enable();
    h.write32(REG_CC, 0);
    assert!(h.wait_csts(CSTS_RDY, 0));
    assert_eq!(h.read64(REG_CMBMSC), CBA | 3);
    h.dev.reset();
    h.pci_enable();
    assert_eq!(h.read64(REG_CMBMSC), 0);
    // BAR 2 is plain memory while memory space is enabled, all-ones past its end.
    h.dev.bar_write(bar2(), 0x100, b"cmb!");
    assert_eq!(cmb_read(&h, 0x100, 4), b"cmb!");
    assert_eq!(cmb_read(&h, CMB_BYTES, 4), [0xff; 4]);
    h.dev.config_write(0x04, AccessSize::Word, 0x4);
    assert_eq!(cmb_read(&h, 0x100, 4), [0xff; 4]);
}

/// A write into the CMB may be applied by a thread that must not block (a lender's socket
/// reader): `bar_write_nonblocking` takes it as `bar_write` would. Register writes it refuses,
/// doing nothing, so they go the ordinary way.
#[test]
fn cmb_writes_are_nonblocking_and_register_writes_are_not() {
    let h = with_cmb();
    assert!(h.dev.bar_write_nonblocking(bar2(), 0x200, b"fast"));
    assert_eq!(cmb_read(&h, 0x200, 4), b"fast");
    // Past the buffer: taken (nothing blocks) and dropped, as bar_write drops it.
    assert!(h.dev.bar_write_nonblocking(bar2(), CMB_BYTES, b"lost"));
    let bar0 = BarIndex::new(0).unwrap();
    let cc = h.read32(REG_CC);
    assert!(!h
        .dev
        .bar_write_nonblocking(bar0, REG_CC, &1u32.to_le_bytes()));
    assert_eq!(h.read32(REG_CC), cc, "a refused write changed nothing");
    // Memory space off: taken and dropped.
    h.dev.config_write(0x04, AccessSize::Word, 0x4);
    assert!(h.dev.bar_write_nonblocking(bar2(), 0x200, b"gone"));
    h.pci_enable();
    assert_eq!(cmb_read(&h, 0x200, 4), b"fast");
    // A device without a CMB takes none.
    let plain = Harness::new();
    assert!(!plain.dev.bar_write_nonblocking(bar2(), 0, b"none"));
}

/// An I/O submission queue, a PRP list and write data in the CMB (addresses the host port does
/// not map at all, so every one of them was read from the buffer), the completion queue and the
/// read buffer in host memory; then read data into the CMB.
#[test]
fn cmb_holds_a_submission_queue_prp_lists_and_data() {
    let mut h = with_cmb();
    write_cmbmsc(&h, CBA | CMBMSC_CMSE | CMBMSC_CRE);
    h.enable();
    let entries = 16u32;
    let cq_base = 0x4_0000u64;
    assert_eq!(
        h.status(0, create_cq(1, entries, cq_base, 1)),
        Status::SUCCESS
    );
    let sq_off = 0x1_0000u64;
    let mut sq = create_sq(1, entries, 0, 1);
    sq.prp1 = CBA + sq_off;
    assert_eq!(h.status(0, sq), Status::SUCCESS);

    // 16 KiB of write data at CMB 0x4_0000 and its PRP list at CMB 0x2_0000.
    let len = 16 * 1024usize;
    let data = pattern(len, 7);
    h.dev.bar_write(bar2(), 0x4_0000, &data);
    let mut list = Vec::new();
    for p in 1..4u64 {
        list.extend_from_slice(&(CBA + 0x4_0000 + p * PAGE).to_le_bytes());
    }
    h.dev.bar_write(bar2(), 0x2_0000, &list);
    let blocks = (len / 512) as u32;
    let mut tail = 0u32;
    let mut cq_head = 0u32;
    let mut run = |h: &mut Harness, c: Command| -> Status {
        let mut c = c;
        c.cid = 0x100 + tail as u16;
        h.dev
            .bar_write(bar2(), sq_off + u64::from(tail) * 64, &c.to_bytes());
        tail = (tail + 1) % entries;
        h.write32(DOORBELL_BASE + 8, tail);
        let at = cq_base + u64::from(cq_head) * 16;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if h.mem.load_u32(at + 12).unwrap() & (1 << 16) != 0 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no completion");
            std::thread::yield_now();
        }
        let mut b = [0u8; 16];
        h.mem.read_at(at, &mut b).unwrap();
        let (done, _) = devlend_nvme::Completion::from_bytes(&b);
        assert_eq!(done.cid, c.cid);
        cq_head += 1;
        h.write32(DOORBELL_BASE + 12, cq_head);
        done.status
    };
    let w = rw(nvm_opcode::WRITE, 8, blocks, CBA + 0x4_0000, CBA + 0x2_0000);
    assert_eq!(run(&mut h, w), Status::SUCCESS);
    let img = h.image_bytes();
    assert_eq!(
        &img[8 * 512..8 * 512 + len],
        &data[..],
        "written from the CMB"
    );

    // Read it back into host memory (PRP list in host memory).
    let buf = 0x20_0000u64;
    let mut host_list = Vec::new();
    for p in 1..4u64 {
        host_list.extend_from_slice(&(HOST_BASE + buf + p * PAGE).to_le_bytes());
    }
    h.mem.write_at(0x1f_0000, &host_list).unwrap();
    let r = rw(
        nvm_opcode::READ,
        8,
        blocks,
        HOST_BASE + buf,
        HOST_BASE + 0x1f_0000,
    );
    assert_eq!(run(&mut h, r), Status::SUCCESS);
    assert_eq!(h.read_mem(buf, len), data);

    // Read data into the CMB (RDS), one page.
    let r = rw(nvm_opcode::READ, 8, 8, CBA + 0x8_0000, 0);
    assert_eq!(run(&mut h, r), Status::SUCCESS);
    assert_eq!(cmb_read(&h, 0x8_0000, 4096), data[..4096]);
}

/// Queues or data pointers at CMB addresses that are not (wholly) in the buffer get an error
/// status, and nothing outside the buffer changes.
#[test]
fn cmb_bad_placements_get_error_statuses() {
    let mut h = with_cmb();
    write_cmbmsc(&h, CBA | CMBMSC_CMSE | CMBMSC_CRE);
    h.enable();
    // A completion queue in the CMB: CMBSZ.CQS is clear.
    let mut cq = create_cq(1, 16, 0, 1);
    cq.prp1 = CBA;
    assert_eq!(h.status(0, cq), Status::INVALID_CMB_USE);
    // A submission queue that starts in the CMB and runs past its end.
    assert_eq!(h.status(0, create_cq(1, 16, 0x4_0000, 1)), Status::SUCCESS);
    let mut sq = create_sq(1, 128, 0, 1);
    sq.prp1 = CBA + CMB_BYTES - PAGE;
    assert_eq!(h.status(0, sq), Status::INVALID_FIELD);
    // One that ends inside it but starts in host memory.
    let mut sq = create_sq(1, 128, 0, 1);
    sq.prp1 = CBA - PAGE;
    assert_eq!(h.status(0, sq), Status::INVALID_FIELD);
    h.create_io_pair(2, 16);

    // Data pointers just past the CMB's end: nothing there, Data Transfer Error, the image
    // unchanged. A PRP list in the CMB whose entries point past it: the same.
    let image = h.image_bytes();
    h.dev.bar_write(bar2(), CMB_BYTES - 4096, &pattern(4096, 3));
    let past = CBA + CMB_BYTES;
    let mut list = Vec::new();
    for p in 0..3u64 {
        list.extend_from_slice(&(past + p * PAGE).to_le_bytes());
    }
    h.dev.bar_write(bar2(), 0x3_0000, &list);
    let cmb_before = cmb_read(&h, 0, CMB_BYTES as usize);
    let cases: &[(&str, Command)] = &[
        (
            "write from past the end",
            rw(nvm_opcode::WRITE, 0, 8, past, 0),
        ),
        (
            "read into past the end",
            rw(nvm_opcode::READ, 0, 8, past, 0),
        ),
        (
            "PRP list entries past the end",
            rw(
                nvm_opcode::WRITE,
                0,
                32,
                CBA + CMB_BYTES - 4096,
                CBA + 0x3_0000,
            ),
        ),
        (
            "PRP list read into past the end",
            rw(
                nvm_opcode::READ,
                0,
                32,
                CBA + CMB_BYTES - 4096,
                CBA + 0x3_0000,
            ),
        ),
        (
            "PRP list itself past the end",
            rw(nvm_opcode::WRITE, 0, 32, CBA, past),
        ),
    ];
    for (name, c) in cases {
        assert_eq!(h.status(2, *c), Status::DATA_TRANSFER_ERROR, "{name}");
        let now = cmb_read(&h, 0, CMB_BYTES as usize);
        let first = now.iter().zip(&cmb_before).position(|(a, b)| a != b);
        assert_eq!(first, None, "{name}: the CMB changed");
    }
    assert_eq!(h.image_bytes(), image, "the image is unchanged");
    assert!(
        cmb_read(&h, 0, CMB_BYTES as usize) == cmb_before,
        "the CMB is unchanged"
    );

    // CMSE with an unaligned base: CBAI, and the addresses are not the buffer's: a read aimed
    // there fails and the buffer keeps its contents.
    write_cmbmsc(&h, (CBA + 0x1000) | CMBMSC_CMSE | CMBMSC_CRE);
    assert_eq!(h.read32(REG_CMBSTS), CMBSTS_CBAI);
    let r = rw(nvm_opcode::READ, 0, 8, CBA + 0x1000, 0);
    assert_eq!(h.status(2, r), Status::DATA_TRANSFER_ERROR);
    let r = rw(nvm_opcode::READ, 0, 8, CBA, 0);
    assert_eq!(h.status(2, r), Status::DATA_TRANSFER_ERROR);
    assert!(cmb_read(&h, 0, CMB_BYTES as usize) == cmb_before);
}

/// An admin completion queue in the CMB is refused at enable (CSTS.CFS); an admin submission
/// queue in the CMB works.
#[test]
fn cmb_admin_queues() {
    let h = with_cmb();
    write_cmbmsc(&h, CBA | CMBMSC_CMSE | CMBMSC_CRE);
    h.write32(REG_AQA, (15 << 16) | 15);
    h.write64(REG_ASQ, HOST_BASE);
    h.write64(REG_ACQ, CBA);
    h.write32(REG_CC, Harness::CC_READY);
    assert_eq!(h.read32(REG_CSTS) & (CSTS_CFS | CSTS_RDY), CSTS_CFS);
    h.write32(REG_CC, 0);
    assert!(h.wait_csts(CSTS_RDY | CSTS_CFS, 0));

    h.write64(REG_ASQ, CBA);
    h.write64(REG_ACQ, HOST_BASE + ADMIN_CQ);
    h.write32(REG_CC, Harness::CC_READY);
    assert!(h.wait_csts(CSTS_RDY, CSTS_RDY));
    let mut c = identify(1, 0, DATA);
    c.cid = 9;
    h.dev.bar_write(bar2(), 0, &c.to_bytes());
    h.write32(DOORBELL_BASE, 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while h.mem.load_u32(ADMIN_CQ + 12).unwrap() & (1 << 16) == 0 {
        assert!(std::time::Instant::now() < deadline, "no completion");
        std::thread::yield_now();
    }
    let mut b = [0u8; 16];
    h.mem.read_at(ADMIN_CQ, &mut b).unwrap();
    let (done, _) = devlend_nvme::Completion::from_bytes(&b);
    assert_eq!((done.cid, done.status), (9, Status::SUCCESS));
    assert_eq!(&h.read_mem(DATA, 2), &PCI_VENDOR_ID.to_le_bytes());
}
