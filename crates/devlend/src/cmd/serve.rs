//! `devlend serve nvme --image PATH --vfio-user SOCKET`: a local NVMe model (no lending) served
//! to a VMM over vfio-user. The baseline the borrowed path is compared with.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use devlend_nvme::NvmeDevice;
use devlend_pci::{LocalFunction, PciDevice, PciFunction};
use devlend_vfio_user::Server;

use crate::host::NvmeOptions;

/// Arguments.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    device: Device,
}

#[derive(clap::Subcommand)]
enum Device {
    /// An NVMe controller with one namespace backed by a raw image file.
    Nvme(NvmeArgs),
}

/// What `serve nvme` takes.
#[derive(clap::Args, Clone, Debug)]
pub struct NvmeArgs {
    /// The raw image file backing the namespace.
    #[arg(long)]
    pub image: PathBuf,
    /// Create the image with this size when it does not exist (bytes; K, M, G suffixes).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Controller serial number.
    #[arg(long)]
    pub serial: Option<String>,
    /// Controller model number.
    #[arg(long)]
    pub model: Option<String>,
    /// How long the model's worker polls doorbells after its last command before sleeping,
    /// fixed (µs; default: the model's adaptive budget, 30 to 200 µs).
    #[arg(long)]
    pub poll_spin_us: Option<u64>,
    /// The UNIX socket to listen on (QEMU: `-device '{"driver":"vfio-user-pci","socket":{...}}'`).
    #[arg(long = "vfio-user")]
    pub vfio_user: PathBuf,
}

impl NvmeArgs {
    /// The device these options describe, as a node's `add nvme` builds it (default queues,
    /// no CMB).
    pub fn options(&self) -> NvmeOptions {
        NvmeOptions {
            image: self.image.clone(),
            size: self.size,
            serial: self.serial.clone(),
            model: self.model.clone(),
            queues: None,
            cmb: None,
        }
    }
}

/// A byte count with an optional K/M/G (binary) suffix.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_uppercase();
    let (digits, shift) = [("K", 10), ("M", 20), ("G", 30)]
        .iter()
        .find_map(|(suffix, shift)| t.strip_suffix(suffix).map(|d| (d, *shift)))
        .unwrap_or((t.as_str(), 0));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (bytes, or a number with K, M or G)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s} is too large"))
}

/// Runs the subcommand.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.device {
        Device::Nvme(a) => {
            // The image is this server's alone while it runs (as a node's device holds it).
            let mut lock = crate::host::ImageLock::take(&a.options())?;
            let function = local_nvme(&a)?;
            lock.keep();
            serve(function, &a.vfio_user)
        }
    }
}

/// The NVMe model bound locally, as the `PciFunction` the server (or a bench) uses.
pub fn local_nvme(a: &NvmeArgs) -> anyhow::Result<Arc<dyn PciFunction>> {
    let mut config = a.options().config();
    if let Some(us) = a.poll_spin_us {
        config.poll_spin = std::time::Duration::from_micros(us);
        config.poll_spin_max = config.poll_spin;
    }
    // The driver side of the binding allocates nothing here (guest RAM arrives by DMA_MAP), so
    // the local DMA pool stays one page.
    let function = LocalFunction::new(4096, |dma, irq| {
        NvmeDevice::new(config, dma, irq).map(|d| d as Arc<dyn PciDevice>)
    })
    .with_context(|| format!("building the NVMe model on {}", a.image.display()))?;
    Ok(Arc::new(function))
}

/// Serves `function` on `socket` until killed, one client at a time; prints
/// `vfio-user server listening on SOCKET` once listening and a line of message counters after
/// each client (`client left (...)`).
pub fn serve(function: Arc<dyn PciFunction>, socket: &Path) -> anyhow::Result<()> {
    let what = function.describe();
    let server = Server::new(function).context("probing the function")?;
    let listener = Server::bind(socket)?;
    eprintln!(
        "devlend serve: {what}: vfio-user server listening on {}",
        socket.display()
    );
    server.serve_listener(&listener, socket, |end, stats| {
        eprintln!(
            "devlend serve: client left ({end:?}); device reset; {}",
            stats.summary()
        );
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999G").is_err());
    }
}
