//! Completion status codes (NVMe base spec 1.4, section 4.6.1.2).
//!
//! A [`Status`] is the 15-bit Status Field of a completion entry without the phase tag:
//! status code (SC) in bits 7:0, status code type (SCT) in bits 10:8, and Do Not Retry in
//! bit 14, so that `(status << 1) | phase` is bits 31:16 of completion dword 3.

/// A completion status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Status(u16);

/// Status code type: generic command status.
pub const SCT_GENERIC: u8 = 0;
/// Status code type: command specific status.
pub const SCT_COMMAND_SPECIFIC: u8 = 1;
/// Status code type: media and data integrity errors.
pub const SCT_MEDIA: u8 = 2;

const DNR: u16 = 1 << 14;

impl Status {
    /// Successful completion.
    pub const SUCCESS: Status = Status(0);

    // Generic command status (SCT 0).
    /// Invalid Command Opcode.
    pub const INVALID_OPCODE: Status = Status::dnr(SCT_GENERIC, 0x01);
    /// Invalid Field in Command.
    pub const INVALID_FIELD: Status = Status::dnr(SCT_GENERIC, 0x02);
    /// Data Transfer Error.
    pub const DATA_TRANSFER_ERROR: Status = Status::retry(SCT_GENERIC, 0x04);
    /// Internal Error (the backing file failed).
    pub const INTERNAL_ERROR: Status = Status::retry(SCT_GENERIC, 0x06);
    /// Command Abort Requested.
    pub const ABORT_REQUESTED: Status = Status::retry(SCT_GENERIC, 0x07);
    /// Command Aborted due to SQ Deletion.
    pub const ABORTED_SQ_DELETION: Status = Status::retry(SCT_GENERIC, 0x08);
    /// Invalid Namespace or Format.
    pub const INVALID_NAMESPACE: Status = Status::dnr(SCT_GENERIC, 0x0b);
    /// Command Sequence Error.
    pub const COMMAND_SEQUENCE_ERROR: Status = Status::dnr(SCT_GENERIC, 0x0c);
    /// Namespace is Write Protected.
    pub const NAMESPACE_WRITE_PROTECTED: Status = Status::dnr(SCT_GENERIC, 0x20);
    /// Invalid Use of Controller Memory Buffer (a completion queue placed in the CMB, which
    /// `CMBSZ.CQS` does not offer).
    pub const INVALID_CMB_USE: Status = Status::dnr(SCT_GENERIC, 0x12);
    /// PRP Offset Invalid.
    pub const INVALID_PRP_OFFSET: Status = Status::dnr(SCT_GENERIC, 0x13);
    /// LBA Out of Range.
    pub const LBA_OUT_OF_RANGE: Status = Status::dnr(SCT_GENERIC, 0x80);

    // Command specific status (SCT 1).
    /// Completion Queue Invalid.
    pub const COMPLETION_QUEUE_INVALID: Status = Status::dnr(SCT_COMMAND_SPECIFIC, 0x00);
    /// Invalid Queue Identifier.
    pub const INVALID_QUEUE_ID: Status = Status::dnr(SCT_COMMAND_SPECIFIC, 0x01);
    /// Invalid Queue Size.
    pub const INVALID_QUEUE_SIZE: Status = Status::dnr(SCT_COMMAND_SPECIFIC, 0x02);
    /// Abort Command Limit Exceeded.
    pub const ABORT_LIMIT_EXCEEDED: Status = Status::dnr(SCT_COMMAND_SPECIFIC, 0x03);
    /// Asynchronous Event Request Limit Exceeded.
    pub const AER_LIMIT_EXCEEDED: Status = Status::dnr(SCT_COMMAND_SPECIFIC, 0x05);
    /// Invalid Interrupt Vector.
    pub const INVALID_INTERRUPT_VECTOR: Status = Status::dnr(SCT_COMMAND_SPECIFIC, 0x08);
    /// Invalid Log Page.
    pub const INVALID_LOG_PAGE: Status = Status::dnr(SCT_COMMAND_SPECIFIC, 0x09);
    /// Invalid Queue Deletion.
    pub const INVALID_QUEUE_DELETION: Status = Status::dnr(SCT_COMMAND_SPECIFIC, 0x0c);
    /// Feature Identifier Not Saveable.
    pub const FEATURE_NOT_SAVEABLE: Status = Status::dnr(SCT_COMMAND_SPECIFIC, 0x0d);
    /// Virtualization Management: no such controller (or not the primary).
    pub const INVALID_CONTROLLER_ID: Status = Status::dnr(SCT_COMMAND_SPECIFIC, 0x1f);
    /// Virtualization Management: the secondary controller is in the wrong state (assigning
    /// to an online one; online without resources or without its VF).
    pub const INVALID_SECONDARY_STATE: Status = Status::dnr(SCT_COMMAND_SPECIFIC, 0x20);
    /// Virtualization Management: more resources than a secondary may have or the pool holds.
    pub const INVALID_CONTROLLER_RESOURCES: Status = Status::dnr(SCT_COMMAND_SPECIFIC, 0x21);
    /// Virtualization Management: no such resource type.
    pub const INVALID_RESOURCE_ID: Status = Status::dnr(SCT_COMMAND_SPECIFIC, 0x22);

    // Media and data integrity errors (SCT 2).
    /// Compare Failure.
    pub const COMPARE_FAILURE: Status = Status::dnr(SCT_MEDIA, 0x85);

    const fn dnr(sct: u8, sc: u8) -> Status {
        Status(DNR | ((sct as u16 & 0x7) << 8) | sc as u16)
    }

    const fn retry(sct: u8, sc: u8) -> Status {
        Status(((sct as u16 & 0x7) << 8) | sc as u16)
    }

    /// Status Code.
    pub fn code(self) -> u8 {
        (self.0 & 0xff) as u8
    }

    /// Status Code Type.
    pub fn code_type(self) -> u8 {
        ((self.0 >> 8) & 0x7) as u8
    }

    /// Do Not Retry.
    pub fn do_not_retry(self) -> bool {
        self.0 & DNR != 0
    }

    /// Success?
    pub fn is_success(self) -> bool {
        self.0 & 0x7ff == 0
    }

    /// The 15-bit field (without the phase tag).
    pub fn raw(self) -> u16 {
        self.0
    }

    /// From the 15-bit field of a completion entry (bits 31:17 of dword 3).
    pub fn from_raw(raw: u16) -> Status {
        Status(raw & 0x7fff)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sct {:#x} sc {:#04x}", self.code_type(), self.code())?;
        if self.do_not_retry() {
            write!(f, " dnr")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields() {
        assert!(Status::SUCCESS.is_success());
        assert_eq!(Status::LBA_OUT_OF_RANGE.code(), 0x80);
        assert_eq!(Status::LBA_OUT_OF_RANGE.code_type(), 0);
        assert_eq!(Status::INVALID_QUEUE_ID.code_type(), 1);
        assert!(Status::INVALID_FIELD.do_not_retry());
        assert!(!Status::DATA_TRANSFER_ERROR.do_not_retry());
        assert_eq!(
            Status::from_raw(Status::COMPARE_FAILURE.raw()),
            Status::COMPARE_FAILURE
        );
    }
}
