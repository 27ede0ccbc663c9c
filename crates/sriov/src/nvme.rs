//! Bringing an NVMe physical function's virtual functions online: the VFs enabled through
//! sysfs (`sriov_numvfs`) and, on a controller with Virtualization Enhancements, each VF's
//! secondary controller given queue and interrupt resources and set online with
//! Virtualization Management commands sent on the PF's admin queue (through the PF's own
//! driver: it stays bound to `nvme`).
//!
//! Why: a secondary controller starts offline with no flexible resources, and on QEMU's
//! emulated NVMe (and SSDs such as Samsung's PM1733) all flexible resources start allocated
//! to the primary controller, so they are first released from it, which takes effect at its
//! next function reset. A VF whose controller is offline fails to enable (CSTS.CFS).
//!
//! The procedure ([`bring_online`]) is written against [`PfHost`]; [`SysfsPf`] is the real
//! one (sysfs plus `/dev/nvmeN`), the unit tests use a model of QEMU's controller.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devlend_vfio::sysfs::SysfsError;
use devlend_vfio::{Bdf, PciSysfs};

use crate::admin::{
    parse_secondary_list, AdminCmd, CntlId, ParseError, PrimaryCaps, Resource, SecondaryCtrl,
    Status, VirtAction, IDENTIFY_LEN,
};
use crate::ioctl::NvmeCharDev;

/// How long the PF's driver may take to bring its controller back after a function reset.
const LIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// What went wrong sending an admin command.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The controller's character device could not be opened.
    #[error("opening {path}: {source}")]
    Open {
        /// The device.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused the passthrough ioctl.
    #[error("{cmd} through {path}: {source}")]
    Ioctl {
        /// The command.
        cmd: AdminCmd,
        /// The device.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The controller completed the command with an error status.
    #[error("{cmd}: the controller answered {status}")]
    Status {
        /// The command.
        cmd: AdminCmd,
        /// Its status.
        status: Status,
    },
    /// The caller's buffer is smaller than the command's data.
    #[error("{cmd}: needs a {need}-byte buffer, got {have}")]
    Buffer {
        /// The command.
        cmd: AdminCmd,
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        have: usize,
    },
    /// What the controller returned does not parse.
    #[error(transparent)]
    Parse(#[from] ParseError),
}

/// Sends admin commands to the primary controller.
pub trait AdminChannel {
    /// Sends `cmd`; its data (if any) lands in `data`. Returns completion Dword 0.
    fn admin(&self, cmd: &AdminCmd, data: &mut [u8]) -> Result<u32, AdminError>;
}

/// What went wrong bringing VFs online.
#[derive(Debug, thiserror::Error)]
pub enum SriovError {
    /// A sysfs lookup failed.
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
    /// A sysfs file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The PF is not driven by Linux's nvme driver, which carries the admin commands.
    #[error("{pf} is not bound to the nvme driver (no {dir}): the Virtualization Management commands go through the PF's nvme driver; bind it to nvme first")]
    NotNvme {
        /// The PF.
        pf: Bdf,
        /// The directory that would name its controller.
        dir: PathBuf,
    },
    /// The function has no SR-IOV capability.
    #[error("{0} has no SR-IOV capability (no sriov_totalvfs); QEMU's nvme needs sriov_max_vfs=N and subsys=")]
    NoSriov(Bdf),
    /// More VFs asked for than the PF has (or none).
    #[error("{pf} has {total} virtual functions; asked for {want}")]
    VfCount {
        /// The PF.
        pf: Bdf,
        /// Asked for.
        want: u16,
        /// What it has.
        total: u16,
    },
    /// The controller does not manage queues and interrupts as flexible resources.
    #[error("{0}'s controller has no flexible queue and interrupt resources (Primary Controller Capabilities CRT); QEMU's nvme needs sriov_vq_flexible and sriov_vi_flexible")]
    NoVirtMgmt(Bdf),
    /// The resources asked for per VF do not fit what the controller has.
    #[error("{vfs} VFs with {each} {resource} resources each do not fit: at least {min} each, at most {max_per} per VF and {total} flexible in all")]
    NotEnough {
        /// Which kind.
        resource: Resource,
        /// VFs.
        vfs: u16,
        /// Per VF.
        each: u16,
        /// The least that works (2 queues: admin + one I/O; 1 interrupt).
        min: u16,
        /// The controller's per-VF limit.
        max_per: u16,
        /// The controller's total.
        total: u32,
    },
    /// A VF that would have to change is in use.
    #[error("VF {vf} is bound to {driver}: unbind it (devlend: remove the device) before its controller is reconfigured")]
    VfBusy {
        /// The VF.
        vf: String,
        /// Its driver.
        driver: String,
    },
    /// An admin command failed.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// The PF's controller did not come back after its reset.
    #[error("{ctrl} is {state} {secs} s after the function reset (expected live)")]
    NotLive {
        /// The controller.
        ctrl: String,
        /// Its last state.
        state: String,
        /// How long was waited.
        secs: u64,
    },
    /// The controller did not end in the state the commands asked for.
    #[error("{0}")]
    Unexpected(String),
}

/// What to set up: `vfs` VFs, each with `queues` queue resources (admin queue included) and
/// `interrupts` interrupt resources; `None` splits the controller's evenly (within its per-VF
/// limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// How many VFs.
    pub vfs: u16,
    /// Queue resources per VF.
    pub queues: Option<u16>,
    /// Interrupt resources per VF.
    pub interrupts: Option<u16>,
}

/// One VF as it was left: online, with its resources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VfReport {
    /// Its PCI address.
    pub vf: String,
    /// Its secondary controller.
    pub scid: CntlId,
    /// Queue resources (admin queue included).
    pub queues: u16,
    /// Interrupt resources.
    pub interrupts: u16,
}

/// Everything the procedure needs from the machine.
pub trait PfHost: AdminChannel {
    /// The PF (for messages).
    fn pf(&self) -> Bdf;
    /// `sriov_totalvfs`.
    fn total_vfs(&self) -> Result<u16, SriovError>;
    /// `sriov_numvfs`.
    fn num_vfs(&self) -> Result<u16, SriovError>;
    /// Writes `sriov_drivers_autoprobe = 0` then `sriov_numvfs` (0 first when VFs exist).
    fn set_num_vfs(&self, n: u16) -> Result<(), SriovError>;
    /// The address of VF `index` (0-based) and its driver, if bound.
    fn vf(&self, index: u16) -> Result<(String, Option<String>), SriovError>;
    /// Resets the PF (function reset; its driver quiesces and restarts the controller) and
    /// waits for the controller to be live again.
    fn reset_function(&self) -> Result<(), SriovError>;
}

fn identify_caps(h: &dyn PfHost) -> Result<PrimaryCaps, SriovError> {
    let mut b = vec![0u8; IDENTIFY_LEN];
    h.admin(&AdminCmd::IdentifyPrimaryCaps, &mut b)?;
    Ok(PrimaryCaps::parse(&b).map_err(AdminError::from)?)
}

fn secondaries(h: &dyn PfHost) -> Result<Vec<SecondaryCtrl>, SriovError> {
    let mut b = vec![0u8; IDENTIFY_LEN];
    h.admin(&AdminCmd::IdentifySecondaryList { from: CntlId(0) }, &mut b)?;
    Ok(parse_secondary_list(&b).map_err(AdminError::from)?)
}

fn virt(
    h: &dyn PfHost,
    action: VirtAction,
    resource: Resource,
    cntlid: CntlId,
    count: u16,
) -> Result<(), SriovError> {
    let cmd = AdminCmd::VirtMgmt {
        action,
        resource,
        cntlid,
        count,
    };
    tracing::info!("{}: {cmd}", h.pf());
    h.admin(&cmd, &mut [])?;
    Ok(())
}

/// Per-VF resources of kind `r` for `vfs` VFs: asked, or the even split within the limit.
fn per_vf(
    caps: &PrimaryCaps,
    r: Resource,
    vfs: u16,
    asked: Option<u16>,
) -> Result<u16, SriovError> {
    let f = caps.flexible(r);
    let even = u16::try_from(f.total / u32::from(vfs.max(1))).unwrap_or(u16::MAX);
    let each = asked.unwrap_or_else(|| even.min(f.max_per_secondary));
    let min = match r {
        Resource::Queue => 2,
        Resource::Interrupt => 1,
    };
    let fits =
        each >= min && each <= f.max_per_secondary && u32::from(each) * u32::from(vfs) <= f.total;
    if !fits {
        return Err(SriovError::NotEnough {
            resource: r,
            vfs,
            each,
            min,
            max_per: f.max_per_secondary,
            total: f.total,
        });
    }
    Ok(each)
}

fn entry_for(list: &[SecondaryCtrl], vfn: u16) -> Result<SecondaryCtrl, SriovError> {
    list.iter().find(|s| s.vfn == vfn).copied().ok_or_else(|| {
        SriovError::Unexpected(format!(
            "the controller lists no secondary controller for VF {vfn}"
        ))
    })
}

/// Enables `plan.vfs` VFs on the PF and brings each VF's secondary controller online with its
/// resources. Idempotent: VFs already online as asked are left alone. Refuses (changing
/// nothing) when a VF that would change is bound to a driver.
pub fn bring_online(h: &dyn PfHost, plan: Plan) -> Result<Vec<VfReport>, SriovError> {
    let pf = h.pf();
    let total = h.total_vfs()?;
    if plan.vfs == 0 || plan.vfs > total {
        return Err(SriovError::VfCount {
            pf,
            want: plan.vfs,
            total,
        });
    }
    let mut caps = identify_caps(h)?;
    for r in [Resource::Queue, Resource::Interrupt] {
        let f = caps.flexible(r);
        tracing::info!(
            "{pf}: primary controller {}: {} flexible {r} resources, {} held by it, {} by secondaries, at most {} per VF",
            caps.cntlid,
            f.total,
            f.allocated_primary,
            f.assigned_secondary,
            f.max_per_secondary
        );
    }
    if !caps.manages_queues_and_interrupts() || caps.queues.total == 0 {
        return Err(SriovError::NoVirtMgmt(pf));
    }
    let q = per_vf(&caps, Resource::Queue, plan.vfs, plan.queues)?;
    let i = per_vf(&caps, Resource::Interrupt, plan.vfs, plan.interrupts)?;
    let done = |s: &SecondaryCtrl| s.online && s.queues == q && s.interrupts == i;
    let vfns = 1..=plan.vfs;

    let numvfs = h.num_vfs()?;
    let list = secondaries(h)?;
    // What will change, and whether anything bound would be disturbed by it.
    let renumber = numvfs != plan.vfs;
    for index in 0..numvfs {
        let vfn = index.saturating_add(1);
        let changes = renumber || !entry_for(&list, vfn).is_ok_and(|s| done(&s));
        if let (true, (vf, Some(driver))) = (changes, h.vf(index)?) {
            return Err(SriovError::VfBusy { vf, driver });
        }
    }
    if !renumber
        && vfns
            .clone()
            .all(|v| entry_for(&list, v).is_ok_and(|s| done(&s)))
    {
        return report(h, plan.vfs);
    }

    // Secondary controllers to change give their resources back first.
    for vfn in vfns.clone() {
        let s = entry_for(&list, vfn)?;
        if !done(&s) && (s.online || s.queues > 0 || s.interrupts > 0) {
            virt(h, VirtAction::SecondaryOffline, Resource::Queue, s.scid, 0)?;
        }
    }
    caps = identify_caps(h)?;
    let short = |c: &PrimaryCaps| {
        let need = |r: Resource, each: u16| {
            let f = c.flexible(r);
            let missing = vfns
                .clone()
                .filter_map(|v| entry_for(&list, v).ok())
                .filter(|s| !done(s))
                .count() as u32;
            f.free() < missing.saturating_mul(u32::from(each))
        };
        need(Resource::Queue, q) || need(Resource::Interrupt, i)
    };
    if short(&caps) && (caps.queues.allocated_primary > 0 || caps.interrupts.allocated_primary > 0)
    {
        // Release the primary's flexible resources: effective at its next function reset,
        // which also takes every secondary controller offline and (on QEMU) disables the VFs.
        for r in [Resource::Queue, Resource::Interrupt] {
            virt(h, VirtAction::PrimaryFlexible, r, caps.cntlid, 0)?;
        }
        if h.num_vfs()? != 0 {
            h.set_num_vfs(0)?;
        }
        tracing::info!(
            "{pf}: function reset so the primary controller releases its flexible resources"
        );
        h.reset_function()?;
        caps = identify_caps(h)?;
        if caps.queues.allocated_primary > 0 || caps.interrupts.allocated_primary > 0 {
            return Err(SriovError::Unexpected(format!(
                "{pf}'s primary controller still holds {} queue and {} interrupt flexible resources after its reset",
                caps.queues.allocated_primary, caps.interrupts.allocated_primary
            )));
        }
    }
    if h.num_vfs()? != plan.vfs {
        h.set_num_vfs(plan.vfs)?;
    }
    let list = secondaries(h)?;
    for vfn in vfns {
        let s = entry_for(&list, vfn)?;
        if done(&s) {
            continue;
        }
        if s.online {
            virt(h, VirtAction::SecondaryOffline, Resource::Queue, s.scid, 0)?;
        }
        virt(h, VirtAction::SecondaryAssign, Resource::Queue, s.scid, q)?;
        virt(
            h,
            VirtAction::SecondaryAssign,
            Resource::Interrupt,
            s.scid,
            i,
        )?;
        virt(h, VirtAction::SecondaryOnline, Resource::Queue, s.scid, 0)?;
    }
    let list = secondaries(h)?;
    for vfn in 1..=plan.vfs {
        let s = entry_for(&list, vfn)?;
        if !done(&s) {
            return Err(SriovError::Unexpected(format!(
                "secondary controller {} (VF {vfn}) is {} with {} queues and {} interrupts after the commands (asked: online, {q}, {i})",
                s.scid,
                if s.online { "online" } else { "offline" },
                s.queues,
                s.interrupts
            )));
        }
    }
    report(h, plan.vfs)
}

fn report(h: &dyn PfHost, vfs: u16) -> Result<Vec<VfReport>, SriovError> {
    let list = secondaries(h)?;
    (1..=vfs)
        .map(|vfn| {
            let s = entry_for(&list, vfn)?;
            let (vf, _) = h.vf(vfn.saturating_sub(1))?;
            Ok(VfReport {
                vf,
                scid: s.scid,
                queues: s.queues,
                interrupts: s.interrupts,
            })
        })
        .collect()
}

/// The real [`PfHost`]: the PF's sysfs directory and its controller's character device.
pub struct SysfsPf {
    pf: Bdf,
    dir: PathBuf,
    ctrl: String,
    dev: NvmeCharDev,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SriovError + '_ {
    move |source| SriovError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl SysfsPf {
    /// The PF at `pf`, which must be bound to nvme; its controller is opened under `dev_dir`
    /// (`/dev`).
    pub fn open(sysfs: &PciSysfs, pf: Bdf, dev_dir: &Path) -> Result<Self, SriovError> {
        let dir = sysfs.device_dir(pf)?;
        let nvme = dir.join("nvme");
        let ctrl = std::fs::read_dir(&nvme)
            .ok()
            .and_then(|mut d| d.find_map(|e| e.ok()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .ok_or_else(|| SriovError::NotNvme {
                pf,
                dir: nvme.clone(),
            })?;
        let dev = NvmeCharDev::open(&dev_dir.join(&ctrl))?;
        Ok(Self { pf, dir, ctrl, dev })
    }

    fn read_u16(&self, file: &str) -> Result<u16, SriovError> {
        let path = self.dir.join(file);
        let text = std::fs::read_to_string(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                SriovError::NoSriov(self.pf)
            } else {
                SriovError::Io {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        text.trim().parse().map_err(|_| SriovError::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, text.trim().to_string()),
        })
    }

    fn write(&self, file: &str, value: &str) -> Result<(), SriovError> {
        let path = self.dir.join(file);
        std::fs::write(&path, value).map_err(io(&path))
    }

    fn state(&self) -> String {
        let path = self.dir.join("nvme").join(&self.ctrl).join("state");
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|e| format!("unreadable ({e})"))
    }
}

impl AdminChannel for SysfsPf {
    fn admin(&self, cmd: &AdminCmd, data: &mut [u8]) -> Result<u32, AdminError> {
        self.dev.admin(cmd, data)
    }
}

impl PfHost for SysfsPf {
    fn pf(&self) -> Bdf {
        self.pf
    }

    fn total_vfs(&self) -> Result<u16, SriovError> {
        self.read_u16("sriov_totalvfs")
    }

    fn num_vfs(&self) -> Result<u16, SriovError> {
        self.read_u16("sriov_numvfs")
    }

    fn set_num_vfs(&self, n: u16) -> Result<(), SriovError> {
        if n > 0 {
            // The VFs' controllers are offline until configured: no driver should probe them.
            self.write("sriov_drivers_autoprobe", "0")?;
            if self.num_vfs()? != 0 {
                self.write("sriov_numvfs", "0")?;
            }
        }
        self.write("sriov_numvfs", &n.to_string())
    }

    fn vf(&self, index: u16) -> Result<(String, Option<String>), SriovError> {
        let link = self.dir.join(format!("virtfn{index}"));
        let name = |p: &Path| {
            std::fs::read_link(p)
                .ok()
                .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
        };
        let vf = name(&link).ok_or_else(|| SriovError::Io {
            path: link.clone(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
        Ok((vf, name(&link.join("driver"))))
    }

    fn reset_function(&self) -> Result<(), SriovError> {
        self.write("reset", "1")?;
        // The driver restarts its controller after the reset; admin commands wait for that.
        let start = Instant::now();
        loop {
            let state = self.state();
            if state == "live" {
                return Ok(());
            }
            if start.elapsed() > LIVE_TIMEOUT {
                return Err(SriovError::NotLive {
                    ctrl: self.ctrl.clone(),
                    state,
                    secs: LIVE_TIMEOUT.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
#[path = "tests/nvme.rs"]
mod tests;
