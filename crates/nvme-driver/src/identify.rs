//! Identify data structures (NVMe base specification 1.4, section 5.15): the fields the driver
//! uses, read with bounds checks from a copy of the 4 KiB page.

/// Bytes in an Identify data structure.
pub const IDENTIFY_BYTES: usize = 4096;

/// What the driver keeps from Identify Controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerIdentity {
    /// PCI vendor ID.
    pub vendor_id: u16,
    /// Serial number (trimmed).
    pub serial: String,
    /// Model number (trimmed).
    pub model: String,
    /// Firmware revision (trimmed).
    pub firmware: String,
    /// Maximum data transfer size as a power of two of the minimum page size; 0 = no limit.
    pub mdts: u8,
    /// Controller ID.
    pub controller_id: u16,
    /// Number of namespaces (the largest valid NSID).
    pub namespace_count: u32,
    /// A volatile write cache is present.
    pub volatile_write_cache: bool,
    /// Required (low nibble) and maximum (high nibble) SQ entry size, log2.
    pub sqes: u8,
    /// Required and maximum CQ entry size, log2.
    pub cqes: u8,
}

impl ControllerIdentity {
    /// Parses the controller data structure.
    pub fn parse(page: &[u8]) -> Self {
        Self {
            vendor_id: le16(page, 0),
            serial: ascii(page, 4, 20),
            model: ascii(page, 24, 40),
            firmware: ascii(page, 64, 8),
            mdts: byte(page, 77),
            controller_id: le16(page, 78),
            sqes: byte(page, 512),
            cqes: byte(page, 513),
            namespace_count: le32(page, 516),
            volatile_write_cache: byte(page, 525) & 1 == 1,
        }
    }

    /// MDTS in bytes given the controller's minimum page size; `None` = no limit.
    pub fn max_transfer_bytes(&self, min_page_bytes: u64) -> Option<u64> {
        if self.mdts == 0 {
            return None;
        }
        Some(min_page_bytes.saturating_mul(1u64.checked_shl(u32::from(self.mdts))?))
    }
}

/// What the driver keeps from Identify Namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceIdentity {
    /// Namespace size in logical blocks.
    pub blocks: u64,
    /// Logical block size in bytes.
    pub lba_bytes: u32,
    /// Metadata bytes per block in the current format.
    pub metadata_bytes: u16,
}

impl NamespaceIdentity {
    /// Parses the namespace data structure; `None` when the current LBA format is unusable
    /// (a block size below 512 bytes or above 2 GiB, or a format index past NLBAF).
    pub fn parse(page: &[u8]) -> Option<Self> {
        let nsze = le64(page, 0);
        let nlbaf = byte(page, 25);
        let flbas = byte(page, 26);
        // FLBAS bits 3:0 are the format index (bits 6:5 extend it past 16 formats).
        let index = usize::from(flbas & 0xf) | (usize::from((flbas >> 5) & 0x3) << 4);
        if index > usize::from(nlbaf) {
            return None;
        }
        let lbaf = le32(page, 128 + 4 * index);
        let metadata_bytes = (lbaf & 0xffff) as u16;
        let lbads = (lbaf >> 16) & 0xff;
        if !(9..=31).contains(&lbads) {
            return None;
        }
        Some(Self {
            blocks: nsze,
            lba_bytes: 1u32 << lbads,
            metadata_bytes,
        })
    }

    /// Namespace size in bytes (saturating).
    pub fn capacity_bytes(&self) -> u64 {
        self.blocks.saturating_mul(u64::from(self.lba_bytes))
    }
}

/// The non-zero NSIDs of an active namespace ID list.
pub fn active_namespaces(page: &[u8]) -> Vec<u32> {
    page.chunks_exact(4)
        .map(|c| <[u8; 4]>::try_from(c).map(u32::from_le_bytes).unwrap_or(0))
        .take_while(|&id| id != 0)
        .collect()
}

fn byte(page: &[u8], at: usize) -> u8 {
    page.get(at).copied().unwrap_or(0)
}

fn le16(page: &[u8], at: usize) -> u16 {
    let mut b = [0u8; 2];
    if let Some(s) = page.get(at..at + 2) {
        b.copy_from_slice(s);
    }
    u16::from_le_bytes(b)
}

fn le32(page: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(s) = page.get(at..at + 4) {
        b.copy_from_slice(s);
    }
    u32::from_le_bytes(b)
}

fn le64(page: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = page.get(at..at + 8) {
        b.copy_from_slice(s);
    }
    u64::from_le_bytes(b)
}

fn ascii(page: &[u8], at: usize, len: usize) -> String {
    page.get(at..at + len)
        .map(|s| {
            s.iter()
                .map(|&c| {
                    if c.is_ascii_graphic() || c == b' ' {
                        c as char
                    } else {
                        ' '
                    }
                })
                .collect::<String>()
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_fields() {
        let mut p = vec![0u8; IDENTIFY_BYTES];
        p[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        p[4..24].copy_from_slice(b"SERIAL01            ");
        p[24..64].copy_from_slice(&[b' '; 40]);
        p[24..30].copy_from_slice(b"devlnd");
        p[64..72].copy_from_slice(b"1.0     ");
        p[77] = 5;
        p[516..520].copy_from_slice(&1u32.to_le_bytes());
        p[525] = 1;
        let c = ControllerIdentity::parse(&p);
        assert_eq!(c.vendor_id, 0x1b36);
        assert_eq!(c.serial, "SERIAL01");
        assert_eq!(c.model, "devlnd");
        assert_eq!(c.firmware, "1.0");
        assert_eq!(c.namespace_count, 1);
        assert!(c.volatile_write_cache);
        assert_eq!(c.max_transfer_bytes(4096), Some(128 * 1024));
        assert_eq!(
            ControllerIdentity {
                mdts: 0,
                ..c.clone()
            }
            .max_transfer_bytes(4096),
            None
        );
        // A short page parses to zeros instead of panicking.
        assert_eq!(ControllerIdentity::parse(&p[..10]).namespace_count, 0);
    }

    #[test]
    fn namespace_fields() {
        let mut p = vec![0u8; IDENTIFY_BYTES];
        p[0..8].copy_from_slice(&1000u64.to_le_bytes());
        p[25] = 1; // two formats
        p[26] = 1; // using format 1
        p[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
        p[132..136].copy_from_slice(&(12u32 << 16).to_le_bytes());
        let n = NamespaceIdentity::parse(&p).unwrap();
        assert_eq!(n.lba_bytes, 4096);
        assert_eq!(n.capacity_bytes(), 4096 * 1000);
        p[26] = 2; // past NLBAF
        assert_eq!(NamespaceIdentity::parse(&p), None);
        p[26] = 0;
        p[128..132].copy_from_slice(&(3u32 << 16).to_le_bytes()); // 8-byte blocks: refused
        assert_eq!(NamespaceIdentity::parse(&p), None);
        assert_eq!(NamespaceIdentity::parse(&[]), None);
    }

    #[test]
    fn namespace_list() {
        let mut p = vec![0u8; 16];
        p[0..4].copy_from_slice(&1u32.to_le_bytes());
        p[4..8].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(active_namespaces(&p), vec![1, 7]);
        assert!(active_namespaces(&[0, 0, 0]).is_empty());
    }
}
