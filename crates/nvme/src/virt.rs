//! NVMe virtualization enhancements (NVMe base specification 1.4, 8.26): a primary controller
//! on the physical function, one secondary controller per SR-IOV virtual function.
//!
//! The primary owns a pool of *flexible resources*: virtual queue (VQ) resources, one per
//! submission/completion queue pair a secondary may create (its admin queue included), and
//! virtual interrupt (VI) resources, one per MSI-X vector it may use. Software (the PF's
//! manager) assigns resources to an offline secondary with the Virtualization Management
//! command and then brings it online; a secondary that is offline, or whose VF is not enabled,
//! fails `CC.EN` with `CSTS.CFS`. Identify CNS 0x14 reports the pool, CNS 0x15 the secondaries.
//!
//! `Virtualization` is shared by the primary's controller core and every secondary's (each
//! with its own worker thread). Lock order: a controller's `core` lock, then this one; the
//! secondaries' hot path reads only atomics.

use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Mutex;

use crate::status::Status;
use devlend_sync::lock;

/// How the virtual functions see the namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VfNamespaces {
    /// Every controller (primary and secondaries) attaches the one namespace: the whole
    /// image, a shared disk.
    Shared,
    /// Each controller has a private namespace: the image is cut into `total_vfs + 1` equal
    /// slices (1 MiB aligned); the primary has slice 0, VF n slice n.
    Private,
}

/// SR-IOV and virtualization options of a controller model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SriovConfig {
    /// TotalVFs (1 to [`MAX_SECONDARIES`]).
    pub total_vfs: u16,
    /// Shared or private namespaces.
    pub namespaces: VfNamespaces,
}

/// Most secondary controllers (entries of one Secondary Controller List).
pub const MAX_SECONDARIES: u16 = 127;

/// Virtualization Management actions (CDW10 bits 3:0).
pub mod action {
    /// Primary Controller Flexible Allocation.
    pub const PRIMARY_FLEXIBLE_ALLOCATION: u8 = 0x1;
    /// Secondary Controller Offline.
    pub const SECONDARY_OFFLINE: u8 = 0x7;
    /// Secondary Controller Assign.
    pub const SECONDARY_ASSIGN: u8 = 0x8;
    /// Secondary Controller Online.
    pub const SECONDARY_ONLINE: u8 = 0x9;
}

/// Flexible resource types (CDW10 bits 10:8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    /// Virtual queue resources.
    Queue,
    /// Virtual interrupt resources.
    Interrupt,
}

impl Resource {
    /// From the RT field.
    pub fn from_raw(rt: u8) -> Option<Resource> {
        match rt {
            0 => Some(Resource::Queue),
            1 => Some(Resource::Interrupt),
            _ => None,
        }
    }
}

/// One secondary controller's entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Secondary {
    /// Online (SCS bit 0).
    pub online: bool,
    /// VQ resources assigned.
    pub nvq: u16,
    /// VI resources assigned.
    pub nvi: u16,
}

#[derive(Debug)]
struct State {
    secondaries: Vec<Secondary>,
    /// VQ / VI flexible resources allocated to the primary.
    primary_vq: u16,
    primary_vi: u16,
}

/// The primary controller's view of its secondaries (shared with them).
#[derive(Debug)]
pub(crate) struct Virtualization {
    total_vfs: u16,
    namespaces: VfNamespaces,
    /// Most VQ / VI resources one secondary can take (its queue pairs incl. admin; its MSI-X
    /// table size).
    per_secondary: u16,
    /// Private VQ / VI resources of the primary.
    primary_private: u16,
    state: Mutex<State>,
    /// Per secondary (index VF - 1): online, read by its worker on every pass.
    online: Vec<AtomicBool>,
    /// NumVFs while VF Enable is set, else 0.
    enabled_vfs: AtomicU16,
    /// The PF's VF Memory Space Enable.
    vf_memory: AtomicBool,
}

impl Virtualization {
    /// `per_secondary`: a secondary's queue pairs (admin included) and MSI-X vectors;
    /// `primary_private`: the primary's own.
    pub(crate) fn new(cfg: SriovConfig, per_secondary: u16, primary_private: u16) -> Self {
        let n = usize::from(cfg.total_vfs);
        Self {
            total_vfs: cfg.total_vfs,
            namespaces: cfg.namespaces,
            per_secondary,
            primary_private,
            state: Mutex::new(State {
                secondaries: vec![Secondary::default(); n],
                primary_vq: 0,
                primary_vi: 0,
            }),
            online: (0..n).map(|_| AtomicBool::new(false)).collect(),
            enabled_vfs: AtomicU16::new(0),
            vf_memory: AtomicBool::new(false),
        }
    }

    pub(crate) fn total_vfs(&self) -> u16 {
        self.total_vfs
    }

    pub(crate) fn namespaces(&self) -> VfNamespaces {
        self.namespaces
    }

    /// Flexible resources of one type in the pool.
    fn flexible_total(&self) -> u32 {
        u32::from(self.total_vfs) * u32::from(self.per_secondary)
    }

    /// A copy of secondary `vf`'s entry (1-based).
    pub(crate) fn secondary(&self, vf: u16) -> Option<Secondary> {
        let i = usize::from(vf.checked_sub(1)?);
        lock(&self.state).secondaries.get(i).copied()
    }

    /// Whether secondary `vf` is online (its worker's check: one atomic load).
    pub(crate) fn is_online(&self, vf: u16) -> bool {
        vf.checked_sub(1)
            .and_then(|i| self.online.get(usize::from(i)))
            .is_some_and(|o| o.load(Ordering::Acquire))
    }

    /// Whether VF `vf` exists (VF Enable set and `vf <= NumVFs`).
    pub(crate) fn vf_enabled(&self, vf: u16) -> bool {
        vf >= 1 && vf <= self.enabled_vfs.load(Ordering::Acquire)
    }

    /// Whether VF `vf`'s BARs are decoded (it exists and VF MSE is set).
    pub(crate) fn vf_decodes(&self, vf: u16) -> bool {
        self.vf_enabled(vf) && self.vf_memory.load(Ordering::Acquire)
    }

    /// VF Enable changed on the PF. Disabled VFs take their secondaries offline.
    pub(crate) fn set_vf_enable(&self, enabled: bool, num_vfs: u16) {
        let n = if enabled {
            num_vfs.min(self.total_vfs)
        } else {
            0
        };
        self.enabled_vfs.store(n, Ordering::Release);
        let mut st = lock(&self.state);
        for (i, s) in st.secondaries.iter_mut().enumerate() {
            if i >= usize::from(n) {
                s.online = false;
                if let Some(o) = self.online.get(i) {
                    o.store(false, Ordering::Release);
                }
            }
        }
    }

    pub(crate) fn set_vf_memory(&self, on: bool) {
        self.vf_memory.store(on, Ordering::Release);
    }

    /// The PF was reset: VFs disabled, secondaries offline, assignments kept.
    pub(crate) fn pf_reset(&self) {
        self.set_vf_enable(false, 0);
        self.set_vf_memory(false);
    }

    /// Runs a Virtualization Management command; returns the completion's dword 0 (resources
    /// allocated) or the status it fails with. `primary_cntlid` is the primary's CNTLID.
    pub(crate) fn manage(
        &self,
        act: u8,
        rt: u8,
        cntlid: u16,
        count: u16,
        primary_cntlid: u16,
    ) -> Result<u32, Status> {
        match act {
            action::PRIMARY_FLEXIBLE_ALLOCATION => {
                if cntlid != primary_cntlid {
                    return Err(Status::INVALID_CONTROLLER_ID);
                }
                let rt = Resource::from_raw(rt).ok_or(Status::INVALID_RESOURCE_ID)?;
                let mut st = lock(&self.state);
                let assigned: u32 = st
                    .secondaries
                    .iter()
                    .map(|s| u32::from(Self::of(s, rt)))
                    .sum();
                if u32::from(count) + assigned > self.flexible_total() {
                    return Err(Status::INVALID_CONTROLLER_RESOURCES);
                }
                match rt {
                    Resource::Queue => st.primary_vq = count,
                    Resource::Interrupt => st.primary_vi = count,
                }
                Ok(u32::from(count))
            }
            action::SECONDARY_ASSIGN => {
                let index = self.secondary_index(cntlid)?;
                let rt = Resource::from_raw(rt).ok_or(Status::INVALID_RESOURCE_ID)?;
                let mut st = lock(&self.state);
                let entry = *st
                    .secondaries
                    .get(index)
                    .ok_or(Status::INVALID_CONTROLLER_ID)?;
                if entry.online {
                    return Err(Status::INVALID_SECONDARY_STATE);
                }
                if count > self.per_secondary {
                    return Err(Status::INVALID_CONTROLLER_RESOURCES);
                }
                let others: u32 = st
                    .secondaries
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != index)
                    .map(|(_, s)| u32::from(Self::of(s, rt)))
                    .sum();
                let primary = match rt {
                    Resource::Queue => st.primary_vq,
                    Resource::Interrupt => st.primary_vi,
                };
                if others + u32::from(primary) + u32::from(count) > self.flexible_total() {
                    return Err(Status::INVALID_CONTROLLER_RESOURCES);
                }
                if let Some(s) = st.secondaries.get_mut(index) {
                    match rt {
                        Resource::Queue => s.nvq = count,
                        Resource::Interrupt => s.nvi = count,
                    }
                }
                Ok(u32::from(count))
            }
            action::SECONDARY_ONLINE | action::SECONDARY_OFFLINE => {
                let index = self.secondary_index(cntlid)?;
                let online = act == action::SECONDARY_ONLINE;
                let mut st = lock(&self.state);
                let s = st
                    .secondaries
                    .get_mut(index)
                    .ok_or(Status::INVALID_CONTROLLER_ID)?;
                // Online needs an admin queue pair and one more (VQ >= 2), a vector, and the
                // VF enabled.
                if online && (s.nvq < 2 || s.nvi < 1 || !self.vf_enabled(cntlid)) {
                    return Err(Status::INVALID_SECONDARY_STATE);
                }
                s.online = online;
                if let Some(o) = self.online.get(index) {
                    o.store(online, Ordering::Release);
                }
                Ok(0)
            }
            _ => Err(Status::INVALID_FIELD),
        }
    }

    fn of(s: &Secondary, rt: Resource) -> u16 {
        match rt {
            Resource::Queue => s.nvq,
            Resource::Interrupt => s.nvi,
        }
    }

    /// Secondary controller identifiers are the VF numbers, 1 to TotalVFs.
    fn secondary_index(&self, cntlid: u16) -> Result<usize, Status> {
        match cntlid {
            1.. if cntlid <= self.total_vfs => Ok(usize::from(cntlid - 1)),
            _ => Err(Status::INVALID_CONTROLLER_ID),
        }
    }

    /// Identify CNS 0x14: the Primary Controller Capabilities structure.
    pub(crate) fn primary_capabilities(&self, cntlid: u16) -> Vec<u8> {
        let mut p = vec![0u8; crate::identify::IDENTIFY_BYTES];
        let st = lock(&self.state);
        let assigned = |rt| -> u32 {
            st.secondaries
                .iter()
                .map(|s| u32::from(Self::of(s, rt)))
                .sum()
        };
        let fields: [(usize, &[u8]); 15] = [
            (0x00, &cntlid.to_le_bytes()),
            (0x02, &0u16.to_le_bytes()), // PORTID
            (0x04, &[0b11]),             // CRT: VQ and VI resources
            (0x20, &self.flexible_total().to_le_bytes()),
            (0x24, &assigned(Resource::Queue).to_le_bytes()),
            (0x28, &st.primary_vq.to_le_bytes()),
            (0x2a, &self.primary_private.to_le_bytes()),
            (0x2c, &self.per_secondary.to_le_bytes()),
            (0x2e, &1u16.to_le_bytes()), // VQGRAN
            (0x50, &self.flexible_total().to_le_bytes()),
            (0x54, &assigned(Resource::Interrupt).to_le_bytes()),
            (0x58, &st.primary_vi.to_le_bytes()),
            (0x5a, &self.primary_private.to_le_bytes()),
            (0x5c, &self.per_secondary.to_le_bytes()),
            (0x5e, &1u16.to_le_bytes()), // VIGRAN
        ];
        for (at, bytes) in fields {
            if let Some(dst) = p.get_mut(at..at + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
        }
        p
    }

    /// Identify CNS 0x15: the Secondary Controller List, entries with SCID >= `from`.
    pub(crate) fn secondary_list(&self, primary_cntlid: u16, from: u16) -> Vec<u8> {
        let mut p = vec![0u8; crate::identify::IDENTIFY_BYTES];
        let st = lock(&self.state);
        let mut n = 0u8;
        for (i, s) in st.secondaries.iter().enumerate() {
            let scid = i as u16 + 1;
            if scid < from || n >= MAX_SECONDARIES as u8 {
                continue;
            }
            let at = 32 + 32 * usize::from(n);
            let mut e = [0u8; 32];
            e[0..2].copy_from_slice(&scid.to_le_bytes());
            e[2..4].copy_from_slice(&primary_cntlid.to_le_bytes());
            e[4] = u8::from(s.online);
            e[8..10].copy_from_slice(&scid.to_le_bytes()); // VFN
            e[12..14].copy_from_slice(&s.nvq.to_le_bytes());
            e[14..16].copy_from_slice(&s.nvi.to_le_bytes());
            if let Some(dst) = p.get_mut(at..at + 32) {
                dst.copy_from_slice(&e);
            }
            n += 1;
        }
        p[0] = n;
        p
    }
}

/// What a controller is in a virtualized subsystem.
#[derive(Clone, Debug)]
pub(crate) enum Role {
    /// Not virtualized (no SR-IOV).
    Plain,
    /// The primary controller of the physical function.
    Primary(std::sync::Arc<Virtualization>),
    /// The secondary controller of VF `vf`.
    Secondary {
        /// The primary's state.
        virt: std::sync::Arc<Virtualization>,
        /// VF number (= SCID = CNTLID).
        vf: u16,
    },
}

impl Role {
    /// CNTLID: 0 for the primary (and a plain controller), the VF number for a secondary.
    pub(crate) fn cntlid(&self) -> u16 {
        match self {
            Role::Secondary { vf, .. } => *vf,
            _ => 0,
        }
    }
}
