//! Admin commands: queue management, Identify, features, log pages, Abort, asynchronous
//! events and Doorbell Buffer Config.

use devlend_memory::BusAddr;
use devlend_pci::DmaAccess;

use crate::command::{admin_opcode, nvm_opcode, AdminOp, Command, DataPointer};
use crate::controller::{
    event, Controller, DoorbellBuffer, Features, QueuePlacement, ERROR_LOG_ENTRIES,
};
use crate::identify::{self, cns, IDENTIFY_BYTES};
use crate::io::{NSID, NSID_BROADCAST};
use crate::queues::{CompletionQueue, SubmissionQueue};
use crate::regs::{CQES_LOG2, CQE_BYTES, SQES_LOG2, SQE_BYTES};
use crate::status::Status;
use crate::virt::Role;

/// Feature identifiers.
pub mod fid {
    /// Arbitration.
    pub const ARBITRATION: u8 = 0x01;
    /// Power Management.
    pub const POWER_MANAGEMENT: u8 = 0x02;
    /// Temperature Threshold.
    pub const TEMPERATURE_THRESHOLD: u8 = 0x04;
    /// Error Recovery.
    pub const ERROR_RECOVERY: u8 = 0x05;
    /// Volatile Write Cache.
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    /// Number of Queues.
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    /// Interrupt Coalescing.
    pub const INTERRUPT_COALESCING: u8 = 0x08;
    /// Interrupt Vector Configuration.
    pub const INTERRUPT_VECTOR_CONFIG: u8 = 0x09;
    /// Write Atomicity Normal.
    pub const WRITE_ATOMICITY: u8 = 0x0a;
    /// Asynchronous Event Configuration.
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
}

/// Log page identifiers.
pub mod lid {
    /// Error Information.
    pub const ERROR_INFORMATION: u8 = 0x01;
    /// SMART / Health Information.
    pub const SMART_HEALTH: u8 = 0x02;
    /// Firmware Slot Information.
    pub const FIRMWARE_SLOT: u8 = 0x03;
    /// Commands Supported and Effects.
    pub const COMMAND_EFFECTS: u8 = 0x05;
}

/// Composite temperature this model reports (Kelvin): 40 °C.
const COMPOSITE_TEMPERATURE_KELVIN: u16 = 313;
/// Temperature threshold select: over / under.
const THSEL_OVER: u32 = 0;
const THSEL_UNDER: u32 = 1;
/// Get Features capabilities: changeable.
const FEATURE_CHANGEABLE: u32 = 1 << 2;

type Outcome = Option<(Status, u32)>;

fn done(status: Status) -> Outcome {
    Some((status, 0))
}

fn value(dw0: u32) -> Outcome {
    Some((Status::SUCCESS, dw0))
}

impl Controller {
    /// Runs one admin command. `None` means the command stays outstanding (an Asynchronous
    /// Event Request) and completes later.
    pub(crate) fn admin(&mut self, cmd: &Command) -> Outcome {
        let op = match AdminOp::parse(cmd) {
            Ok(op) => op,
            Err(s) => return done(s),
        };
        match op {
            AdminOp::CreateIoCq {
                qid,
                entries,
                contiguous,
                interrupts,
                vector,
                base,
            } => done(self.create_io_cq(qid, entries, contiguous, interrupts, vector, base)),
            AdminOp::CreateIoSq {
                qid,
                entries,
                contiguous,
                cqid,
                base,
            } => done(self.create_io_sq(qid, entries, contiguous, cqid, base)),
            AdminOp::DeleteIoSq { qid } => done(self.delete_io_sq(qid)),
            AdminOp::DeleteIoCq { qid } => done(self.delete_io_cq(qid)),
            AdminOp::Identify {
                cns,
                cntid,
                nsid,
                data,
            } => done(self.identify(cns, cntid, nsid, data)),
            AdminOp::GetLogPage {
                lid,
                rae,
                len_bytes,
                offset,
                nsid,
                data,
            } => done(self.get_log_page(lid, rae, len_bytes, offset, nsid, data)),
            AdminOp::SetFeatures {
                fid, save, value, ..
            } => self.set_features(fid, save, value),
            AdminOp::GetFeatures {
                fid, select, arg, ..
            } => self.get_features(fid, select, arg),
            AdminOp::Abort { .. } => {
                // Commands run to completion as they are fetched, so there is never one to
                // abort: dword 0 bit 0 set means "not aborted".
                value(1)
            }
            AdminOp::AsyncEventRequest => {
                if self.aers.len() > usize::from(identify::AERL) {
                    return done(Status::AER_LIMIT_EXCEEDED);
                }
                self.aers.push(cmd.cid);
                None
            }
            AdminOp::DoorbellBufferConfig {
                shadow,
                event_index,
            } => done(self.doorbell_buffer_config(shadow, event_index)),
            AdminOp::VirtualizationManagement {
                action,
                resource,
                cntlid,
                count,
            } => {
                let Role::Primary(virt) = &self.role else {
                    // Only a primary controller supports it (OACS bit 7).
                    return done(Status::INVALID_OPCODE);
                };
                match virt.manage(action, resource, cntlid, count, self.role.cntlid()) {
                    Ok(dw0) => value(dw0),
                    Err(s) => done(s),
                }
            }
        }
    }

    /// I/O queues the driver may use: what Number of Queues granted, else the maximum.
    fn granted(&self) -> (u16, u16) {
        self.queues_granted
            .unwrap_or((self.limits.max_io_queues, self.limits.max_io_queues))
    }

    fn create_io_cq(
        &mut self,
        qid: u16,
        entries: u32,
        contiguous: bool,
        interrupts: bool,
        vector: u16,
        base: u64,
    ) -> Status {
        let slot = usize::from(qid);
        if qid == 0 || qid > self.granted().1 || !matches!(self.cqs.get(slot), Some(None)) {
            return Status::INVALID_QUEUE_ID;
        }
        if entries < 2 || entries > self.limits.max_queue_entries {
            return Status::INVALID_QUEUE_SIZE;
        }
        if !contiguous || self.cc.iocqes() != CQES_LOG2 || base == 0 {
            return Status::INVALID_FIELD;
        }
        if interrupts && vector >= self.limits.vectors {
            return Status::INVALID_INTERRUPT_VECTOR;
        }
        if !base.is_multiple_of(self.page_size) {
            return Status::INVALID_PRP_OFFSET;
        }
        match self.queue_placement(base, u64::from(entries) * CQE_BYTES, false) {
            QueuePlacement::Ok => {}
            QueuePlacement::CompletionInCmb => return Status::INVALID_CMB_USE,
            QueuePlacement::Straddles => return Status::INVALID_FIELD,
        }
        let ring = self.ring(base, u64::from(entries) * CQE_BYTES, DmaAccess::Write);
        if let Some(s) = self.cqs.get_mut(slot) {
            *s = Some(CompletionQueue::new(
                base, entries, interrupts, vector, ring,
            ));
        }
        self.io_queue_created = true;
        self.switch_to_shadow(slot);
        Status::SUCCESS
    }

    fn create_io_sq(
        &mut self,
        qid: u16,
        entries: u32,
        contiguous: bool,
        cqid: u16,
        base: u64,
    ) -> Status {
        let slot = usize::from(qid);
        if qid == 0 || qid > self.granted().0 || !matches!(self.sqs.get(slot), Some(None)) {
            return Status::INVALID_QUEUE_ID;
        }
        if cqid == 0 || !matches!(self.cqs.get(usize::from(cqid)), Some(Some(_))) {
            return Status::COMPLETION_QUEUE_INVALID;
        }
        if entries < 2 || entries > self.limits.max_queue_entries {
            return Status::INVALID_QUEUE_SIZE;
        }
        if !contiguous || self.cc.iosqes() != SQES_LOG2 || base == 0 {
            return Status::INVALID_FIELD;
        }
        if !base.is_multiple_of(self.page_size) {
            return Status::INVALID_PRP_OFFSET;
        }
        match self.queue_placement(base, u64::from(entries) * SQE_BYTES, true) {
            QueuePlacement::Ok => {}
            QueuePlacement::CompletionInCmb => return Status::INVALID_CMB_USE,
            QueuePlacement::Straddles => return Status::INVALID_FIELD,
        }
        let ring = self.ring(base, u64::from(entries) * SQE_BYTES, DmaAccess::Read);
        if let Some(cq) = self.cqs.get_mut(usize::from(cqid)).and_then(Option::as_mut) {
            cq.sq_count += 1;
        }
        if let Some(s) = self.sqs.get_mut(slot) {
            *s = Some(SubmissionQueue::new(base, entries, cqid, ring));
        }
        self.io_queue_created = true;
        self.switch_to_shadow(slot);
        Status::SUCCESS
    }

    fn delete_io_sq(&mut self, qid: u16) -> Status {
        let slot = usize::from(qid);
        if qid == 0 {
            return Status::INVALID_QUEUE_ID;
        }
        let Some(sq) = self.sqs.get_mut(slot).and_then(Option::take) else {
            return Status::INVALID_QUEUE_ID;
        };
        if let Some(cq) = self
            .cqs
            .get_mut(usize::from(sq.cqid))
            .and_then(Option::as_mut)
        {
            cq.sq_count = cq.sq_count.saturating_sub(1);
        }
        self.reset_doorbell(2 * slot);
        Status::SUCCESS
    }

    fn delete_io_cq(&mut self, qid: u16) -> Status {
        let slot = usize::from(qid);
        if qid == 0 {
            return Status::INVALID_QUEUE_ID;
        }
        match self.cqs.get_mut(slot) {
            Some(entry @ Some(_)) => {
                if entry.as_ref().is_some_and(|cq| cq.sq_count > 0) {
                    return Status::INVALID_QUEUE_DELETION;
                }
                *entry = None;
            }
            _ => return Status::INVALID_QUEUE_ID,
        }
        self.reset_doorbell(2 * slot + 1);
        Status::SUCCESS
    }

    fn identify(&mut self, cns: u8, cntid: u16, nsid: u32, data: DataPointer) -> Status {
        let page = match cns {
            cns::NAMESPACE => {
                if nsid != NSID {
                    return Status::INVALID_NAMESPACE;
                }
                identify::namespace(&self.ns_info)
            }
            cns::CONTROLLER => identify::controller(&self.info),
            cns::ACTIVE_NAMESPACES => {
                if nsid >= NSID_BROADCAST - 1 {
                    return Status::INVALID_NAMESPACE;
                }
                identify::active_namespaces(nsid)
            }
            cns::NAMESPACE_DESCRIPTORS => {
                if nsid != NSID {
                    return Status::INVALID_NAMESPACE;
                }
                identify::namespace_descriptors(&self.ns_info)
            }
            cns::PRIMARY_CONTROLLER_CAPABILITIES => match &self.role {
                Role::Primary(virt) => virt.primary_capabilities(self.role.cntlid()),
                _ => return Status::INVALID_FIELD,
            },
            cns::SECONDARY_CONTROLLER_LIST => match &self.role {
                Role::Primary(virt) => virt.secondary_list(self.role.cntlid(), cntid),
                _ => return Status::INVALID_FIELD,
            },
            _ => return Status::INVALID_FIELD,
        };
        debug_assert_eq!(page.len(), IDENTIFY_BYTES);
        match self.transfer().copy_to_host(data, &page) {
            Ok(()) => Status::SUCCESS,
            Err(s) => s,
        }
    }

    fn get_log_page(
        &mut self,
        lid: u8,
        rae: bool,
        len_bytes: u64,
        offset: u64,
        nsid: u32,
        data: DataPointer,
    ) -> Status {
        if !offset.is_multiple_of(4) || len_bytes > self.limits.max_transfer {
            return Status::INVALID_FIELD;
        }
        let (log, event_type) = match lid {
            lid::ERROR_INFORMATION => (self.error_log(), Some(event::TYPE_ERROR)),
            lid::SMART_HEALTH => {
                if nsid != 0 && nsid != NSID && nsid != NSID_BROADCAST {
                    return Status::INVALID_NAMESPACE;
                }
                (self.smart_log(), Some(event::TYPE_SMART))
            }
            lid::FIRMWARE_SLOT => (self.firmware_log(), None),
            lid::COMMAND_EFFECTS => (command_effects_log(), None),
            _ => return Status::INVALID_LOG_PAGE,
        };
        let Ok(start) = usize::try_from(offset) else {
            return Status::INVALID_FIELD;
        };
        if start > log.len() {
            return Status::INVALID_FIELD;
        }
        let Ok(len) = usize::try_from(len_bytes) else {
            return Status::INVALID_FIELD;
        };
        let mut out = vec![0u8; len];
        let avail = log.get(start..).unwrap_or_default();
        let n = avail.len().min(len);
        if let (Some(dst), Some(src)) = (out.get_mut(..n), avail.get(..n)) {
            dst.copy_from_slice(src);
        }
        if let Err(s) = self.transfer().copy_to_host(data, &out) {
            return s;
        }
        if let (false, Some(t)) = (rae, event_type) {
            self.masked_event_types &= !(1 << t);
        }
        Status::SUCCESS
    }

    fn error_log(&self) -> Vec<u8> {
        let mut log = vec![0u8; ERROR_LOG_ENTRIES * 64];
        for (chunk, entry) in log.chunks_exact_mut(64).zip(self.errors.entries.iter()) {
            chunk.copy_from_slice(entry);
        }
        log
    }

    fn smart_log(&self) -> Vec<u8> {
        let mut log = vec![0u8; 512];
        let temp = COMPOSITE_TEMPERATURE_KELVIN;
        let over = temp >= self.features.temperature_over;
        let under = self.features.temperature_under != 0 && temp <= self.features.temperature_under;
        let mut put = |at: usize, bytes: &[u8]| {
            if let Some(dst) = log.get_mut(at..at + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
        };
        put(0, &[u8::from(over || under) << 1]);
        put(1, &temp.to_le_bytes());
        put(3, &[100, 10, 0]); // available spare, threshold, percentage used
        let c = &self.counters;
        put(32, &c.units_read.div_ceil(1000).to_le_bytes());
        put(48, &c.units_written.div_ceil(1000).to_le_bytes());
        put(64, &c.read_commands.to_le_bytes());
        put(80, &c.write_commands.to_le_bytes());
        put(112, &1u128.to_le_bytes()); // power cycles
        let hours = u128::from(self.started.elapsed().as_secs() / 3600);
        put(128, &hours.to_le_bytes());
        put(160, &c.media_errors.to_le_bytes());
        put(176, &u128::from(self.errors.count).to_le_bytes());
        log
    }

    fn firmware_log(&self) -> Vec<u8> {
        let mut log = vec![0u8; 512];
        if let Some(afi) = log.first_mut() {
            *afi = 1; // slot 1 active
        }
        let mut rev = [b' '; 8];
        for (d, s) in rev.iter_mut().zip(self.info.firmware_rev.bytes()) {
            *d = if s.is_ascii_graphic() { s } else { b'?' };
        }
        if let Some(dst) = log.get_mut(8..16) {
            dst.copy_from_slice(&rev);
        }
        log
    }

    fn feature_supported(fid: u8) -> bool {
        matches!(
            fid,
            fid::ARBITRATION
                | fid::POWER_MANAGEMENT
                | fid::TEMPERATURE_THRESHOLD
                | fid::ERROR_RECOVERY
                | fid::VOLATILE_WRITE_CACHE
                | fid::NUMBER_OF_QUEUES
                | fid::INTERRUPT_COALESCING
                | fid::INTERRUPT_VECTOR_CONFIG
                | fid::WRITE_ATOMICITY
                | fid::ASYNC_EVENT_CONFIG
        )
    }

    fn set_features(&mut self, id: u8, save: bool, v: u32) -> Outcome {
        if !Self::feature_supported(id) {
            return done(Status::INVALID_FIELD);
        }
        if save {
            return done(Status::FEATURE_NOT_SAVEABLE);
        }
        let f = &mut self.features;
        match id {
            fid::ARBITRATION => f.arbitration = v,
            fid::POWER_MANAGEMENT => {
                if v & 0x1f != 0 {
                    return done(Status::INVALID_FIELD);
                }
                f.power_management = v & 0xff;
            }
            fid::TEMPERATURE_THRESHOLD => {
                let tmpsel = (v >> 16) & 0xf;
                let threshold = (v & 0xffff) as u16;
                if tmpsel != 0 {
                    return done(Status::INVALID_FIELD);
                }
                match (v >> 20) & 0x3 {
                    THSEL_OVER => f.temperature_over = threshold,
                    THSEL_UNDER => f.temperature_under = threshold,
                    _ => return done(Status::INVALID_FIELD),
                }
            }
            fid::ERROR_RECOVERY => {
                if v & (1 << 16) != 0 {
                    return done(Status::INVALID_FIELD);
                }
                f.error_recovery = v & 0xffff;
            }
            fid::VOLATILE_WRITE_CACHE => f.write_cache = v & 1 != 0,
            fid::NUMBER_OF_QUEUES => {
                if self.io_queue_created {
                    return done(Status::COMMAND_SEQUENCE_ERROR);
                }
                let nsqr = v & 0xffff;
                let ncqr = v >> 16;
                if nsqr == 0xffff || ncqr == 0xffff {
                    return done(Status::INVALID_FIELD);
                }
                let max = u32::from(self.limits.max_io_queues);
                let nsq = (nsqr + 1).min(max) as u16;
                let ncq = (ncqr + 1).min(max) as u16;
                self.queues_granted = Some((nsq, ncq));
                return value(number_of_queues(nsq, ncq));
            }
            fid::INTERRUPT_COALESCING => f.interrupt_coalescing = v & 0xffff,
            fid::INTERRUPT_VECTOR_CONFIG => {
                let iv = usize::from((v & 0xffff) as u16);
                match f.vector_coalescing_disabled.get_mut(iv) {
                    Some(cd) => *cd = v & (1 << 16) != 0,
                    None => return done(Status::INVALID_FIELD),
                }
            }
            fid::WRITE_ATOMICITY => f.write_atomicity = v & 1,
            fid::ASYNC_EVENT_CONFIG => f.async_event_config = v & 0xff,
            _ => return done(Status::INVALID_FIELD),
        }
        value(0)
    }

    fn get_features(&mut self, id: u8, select: u8, arg: u32) -> Outcome {
        if !Self::feature_supported(id) {
            return done(Status::INVALID_FIELD);
        }
        let defaults;
        let f = match select {
            0 => &self.features,
            1 | 2 => {
                defaults = Features::defaults(self.limits.vectors);
                &defaults
            }
            3 => return value(FEATURE_CHANGEABLE),
            _ => return done(Status::INVALID_FIELD),
        };
        let dw0 = match id {
            fid::ARBITRATION => f.arbitration,
            fid::POWER_MANAGEMENT => f.power_management,
            fid::TEMPERATURE_THRESHOLD => {
                if (arg >> 16) & 0xf != 0 {
                    return done(Status::INVALID_FIELD);
                }
                match (arg >> 20) & 0x3 {
                    THSEL_OVER => u32::from(f.temperature_over),
                    THSEL_UNDER => u32::from(f.temperature_under),
                    _ => return done(Status::INVALID_FIELD),
                }
            }
            fid::ERROR_RECOVERY => f.error_recovery,
            fid::VOLATILE_WRITE_CACHE => u32::from(f.write_cache),
            fid::NUMBER_OF_QUEUES => {
                let (nsq, ncq) = if select == 0 {
                    self.granted()
                } else {
                    (self.limits.max_io_queues, self.limits.max_io_queues)
                };
                number_of_queues(nsq, ncq)
            }
            fid::INTERRUPT_COALESCING => f.interrupt_coalescing,
            fid::INTERRUPT_VECTOR_CONFIG => {
                let iv = (arg & 0xffff) as u16;
                match f.vector_coalescing_disabled.get(usize::from(iv)) {
                    Some(&cd) => u32::from(iv) | (u32::from(cd) << 16),
                    None => return done(Status::INVALID_FIELD),
                }
            }
            fid::WRITE_ATOMICITY => f.write_atomicity,
            fid::ASYNC_EVENT_CONFIG => f.async_event_config,
            _ => return done(Status::INVALID_FIELD),
        };
        value(dw0)
    }

    fn doorbell_buffer_config(&mut self, shadow: u64, event_index: u64) -> Status {
        let mask = self.page_size - 1;
        if shadow == 0 || event_index == 0 || shadow & mask != 0 || event_index & mask != 0 {
            return Status::INVALID_FIELD;
        }
        let len = self.page_size;
        let shadow_span = match self.dma.dma_span(BusAddr(shadow), len, DmaAccess::Read) {
            Ok(s) => s,
            Err(_) => return Status::DATA_TRANSFER_ERROR,
        };
        let event_span = match self
            .dma
            .dma_span(BusAddr(event_index), len, DmaAccess::Write)
        {
            Ok(s) => s,
            Err(_) => return Status::DATA_TRANSFER_ERROR,
        };
        self.dbbuf = Some(DoorbellBuffer {
            shadow,
            event_index,
            shadow_span,
            event_span,
        });
        // I/O queues switch to the shadow buffer now (Linux sends this command after creating
        // them) and queues created later use it from the start. The admin queue keeps its MMIO
        // doorbells: Linux never updates its shadow slots. Each switched queue's slots are
        // seeded with the doorbell value the controller has, so nothing is lost or replayed.
        for qid in 1..self.sqs.len() {
            self.switch_to_shadow(qid);
        }
        Status::SUCCESS
    }
}

fn number_of_queues(nsq: u16, ncq: u16) -> u32 {
    u32::from(nsq.saturating_sub(1)) | (u32::from(ncq.saturating_sub(1)) << 16)
}

/// Commands Supported and Effects: CSUPP for every command, LBCC for those that change
/// logical block content.
fn command_effects_log() -> Vec<u8> {
    const CSUPP: u32 = 1;
    const LBCC: u32 = 1 << 1;
    let mut log = vec![0u8; 4096];
    let mut set = |index: usize, v: u32| {
        if let Some(dst) = log.get_mut(index * 4..index * 4 + 4) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
    };
    for op in [
        admin_opcode::DELETE_IO_SQ,
        admin_opcode::CREATE_IO_SQ,
        admin_opcode::GET_LOG_PAGE,
        admin_opcode::DELETE_IO_CQ,
        admin_opcode::CREATE_IO_CQ,
        admin_opcode::IDENTIFY,
        admin_opcode::ABORT,
        admin_opcode::SET_FEATURES,
        admin_opcode::GET_FEATURES,
        admin_opcode::ASYNC_EVENT_REQUEST,
        admin_opcode::DOORBELL_BUFFER_CONFIG,
    ] {
        set(usize::from(op), CSUPP);
    }
    for (op, effects) in [
        (nvm_opcode::FLUSH, CSUPP),
        (nvm_opcode::WRITE, CSUPP | LBCC),
        (nvm_opcode::READ, CSUPP),
        (nvm_opcode::COMPARE, CSUPP),
        (nvm_opcode::WRITE_ZEROES, CSUPP | LBCC),
        (nvm_opcode::DATASET_MANAGEMENT, CSUPP | LBCC),
    ] {
        set(256 + usize::from(op), effects);
    }
    log
}
