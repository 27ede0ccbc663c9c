//! `devlend sriov`: enabling a real device's virtual functions so each can be lent
//! (`devlend add vfio VF --bind`) to its own borrower.

use anyhow::Context;
use devlend_sriov::{bring_online, Plan, SysfsPf};
use devlend_vfio::{Bdf, PciSysfs};

/// `devlend sriov` verbs.
#[derive(clap::Subcommand)]
pub enum Cmd {
    /// NVMe: enable VFS virtual functions on the PF at PF_BDF (left on the nvme driver) and
    /// bring each VF's secondary controller online with queue and interrupt resources, through
    /// Virtualization Management commands on the PF's admin queue (/dev/nvmeN; needs root).
    /// When the primary controller still holds the flexible resources, they are released and
    /// the PF is reset once (its driver restarts it). The VFs are left unbound (autoprobe off),
    /// ready for `devlend add vfio VF --bind`. Already-online VFs as asked are left alone; a VF
    /// that would change while bound to a driver is refused.
    NvmeOnline(NvmeOnlineArgs),
}

/// `devlend sriov nvme-online` flags.
#[derive(clap::Args)]
pub struct NvmeOnlineArgs {
    /// The physical function (DDDD:BB:DD.F or BB:DD.F).
    pf: String,
    /// How many virtual functions.
    #[arg(long)]
    vfs: u16,
    /// Queue resources per VF, the admin queue included (at least 2; default: the flexible
    /// queues split evenly, within the controller's per-VF limit).
    #[arg(long)]
    queues: Option<u16>,
    /// Interrupt resources (MSI-X vectors) per VF (at least 1; default: split evenly).
    #[arg(long)]
    interrupts: Option<u16>,
}

/// Runs a `devlend sriov` verb.
pub fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::NvmeOnline(a) => nvme_online(a),
    }
}

fn nvme_online(a: NvmeOnlineArgs) -> anyhow::Result<()> {
    let pf: Bdf = a.pf.parse()?;
    let sysfs = PciSysfs::default();
    let host = SysfsPf::open(&sysfs, pf, std::path::Path::new("/dev"))?;
    let plan = Plan {
        vfs: a.vfs,
        queues: a.queues,
        interrupts: a.interrupts,
    };
    let vfs = bring_online(&host, plan).with_context(|| format!("bringing {pf}'s VFs online"))?;
    for v in vfs {
        println!(
            "{} secondary controller {}: online, {} queues, {} interrupts",
            v.vf, v.scid, v.queues, v.interrupts
        );
    }
    Ok(())
}
