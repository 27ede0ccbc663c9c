//! `devlend demo`: the main job, on an embedded default.
//!
//! Two emulated hosts on this machine, joined by the `shm` NTB fabric: a *lender* (a
//! `devlend node` child process) owns an NVMe device backed by a temporary image; the
//! *borrower* (this process) borrows it and runs the unmodified user-space NVMe driver on it.
//! A second borrower host (also in this process, with its own address space and its own shm
//! link) joins for the sharing step: two SR-IOV virtual functions of one device, one each.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use devlend_nvme_driver::workload::{self, Limit, Pattern, Workload};
use devlend_nvme_driver::Controller;
use devlend_pci::PciFunction;

use crate::host::{self, NvmeOptions};
use crate::pair::Pair;

/// Demo options (all optional).
#[derive(clap::Args)]
pub struct Args {
    /// Where to put the scratch directory.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    /// Size of the lent device's image.
    #[arg(long, default_value = "256M", value_parser = super::verbs::parse_size)]
    size: u64,
    /// Seconds per performance sample.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Keep the scratch directory (images, logs) afterwards.
    #[arg(long)]
    keep: bool,
}

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

/// Runs the demo.
pub fn run(a: Args) -> anyhow::Result<()> {
    println!("devlend demo: lending an NVMe device across an emulated NTB (shm fabric)");
    println!(
        "  emulated: the NTB (windows, doorbells, scratchpads, messages) between two processes"
    );
    println!(
        "  real:     two OS processes, a raw image file, the NVMe model, the user-space driver"
    );

    step(
        1,
        "start three hosts: a lender node (child process) and two borrower nodes (this process)",
    );
    let mut pair = Pair::start_with_borrowers(&a.dir, 1)?;
    if a.keep {
        pair.keep();
    }
    println!("    scratch directory {}", pair.dir.display());
    println!(
        "    link up between 'borrower' and 'lender' over shm:{}",
        pair.dir.join("fabric").display()
    );
    println!(
        "    link up between 'borrower2' and 'lender' over shm:{}",
        pair.dir.join("fabric-2").display()
    );

    step(
        2,
        "the lender adds an NVMe device backed by a temporary image",
    );
    let image = pair.dir.join("lender-nvme0.img");
    pair.lender_add_nvme("nvme0", &image, a.size)?;
    for d in pair.borrower.peer_devices()? {
        println!(
            "    peer offers {} ({}, {} MSI-X vectors): {}",
            d.name, d.kind, d.vectors, d.detail
        );
    }

    step(3, "the borrower borrows nvme0");
    let f = pair.borrow("nvme0")?;
    println!(
        "    lease {} granted; BARs reached through the lender's NTB windows:",
        f.lease()
    );
    for b in &f.device().bars {
        println!(
            "      BAR{} {} KiB{}",
            b.index,
            b.size >> 10,
            if b.is_64bit { " (64-bit)" } else { "" }
        );
    }
    println!("    DMA memory: borrower RAM exposed through a borrower window, mapped by the lender's IOMMU");
    println!("    MSI-X: the device's vectors ring doorbell bits on the borrower");

    step(
        4,
        "the unmodified user-space NVMe driver initialises the borrowed device",
    );
    let function: Arc<dyn PciFunction> = f.clone();
    let drv = Controller::new(function.clone())
        .context("driver initialisation on the borrowed device")?;
    let id = drv.identity();
    println!(
        "    model {:?}, serial {:?}: namespace of {} MiB in {}-byte blocks, {} I/O queue(s)",
        id.model,
        id.serial,
        drv.capacity_bytes() >> 20,
        drv.lba_bytes(),
        drv.io_queue_count()
    );

    step(5, "write 4 MiB at offset 1 MiB, flush, read back");
    let offset = 1u64 << 20;
    let pattern: Vec<u8> = (0..4usize << 20)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 9)) as u8)
        .collect();
    drv.write_at(offset, &pattern)?;
    drv.flush()?;
    let mut back = vec![0u8; pattern.len()];
    drv.read_at(offset, &mut back)?;
    anyhow::ensure!(
        back == pattern,
        "the borrowed device returned different bytes"
    );
    println!("    read-back matches ({} bytes)", back.len());

    step(6, "check the bytes in the lender's image file");
    let on_disk = read_file_at(&image, offset, pattern.len())?;
    anyhow::ensure!(
        on_disk == pattern,
        "the lender's image does not hold the written bytes"
    );
    println!(
        "    {} holds the 4 MiB written through the borrowed device",
        image.display()
    );
    drv.shutdown()?;
    drop(drv);

    step(
        7,
        "two borrowers share one device: each borrows its own SR-IOV virtual function",
    );
    share(&pair)?;

    step(
        8,
        "performance: the same driver and workload, local device vs borrowed device",
    );
    let local_image = pair.dir.join("local-nvme.img");
    let local = host::local_nvme(NvmeOptions {
        image: local_image,
        size: Some(a.size),
        serial: None,
        model: None,
        queues: None,
        cmb: None,
    })?;
    let dur = Duration::from_secs_f64(a.seconds.max(0.2));
    let local_ctrl = Controller::new(local.clone())?;
    let borrowed_ctrl = Controller::new(function.clone())?;
    println!(
        "    {:<26} {:>12} {:>12} {:>14}",
        "workload (4 KiB random)", "local", "borrowed", "borrowed/local"
    );
    for (label, pattern, qd) in [
        ("read QD1 IOPS", Pattern::RandRead, 1),
        ("read QD32 IOPS", Pattern::RandRead, 32),
        ("write QD1 IOPS", Pattern::RandWrite, 1),
    ] {
        let w = Workload::new(pattern, qd, Limit::Duration(dur));
        let l = workload::run(&local_ctrl, &w)?;
        let b = workload::run(&borrowed_ctrl, &w)?;
        println!(
            "    {:<26} {:>12.0} {:>12.0} {:>14.3}",
            label,
            l.iops,
            b.iops,
            b.iops / l.iops
        );
        if qd == 1 {
            println!(
                "    {:<26} {:>10.1}us {:>10.1}us {:>14.3}",
                "  median latency",
                l.median_us,
                b.median_us,
                b.median_us / l.median_us
            );
        }
    }

    println!("    (one sample each; `devlend bench lending` interleaves repetitions and reports medians)");

    step(
        9,
        "return the device; the lender resets it and offers it again",
    );
    borrowed_ctrl.shutdown()?;
    local_ctrl.shutdown()?;
    drop((borrowed_ctrl, local_ctrl, function));
    pair.borrower.give_back("nvme0")?;
    for d in pair.borrower.peer_devices()? {
        println!(
            "    {} is {}",
            d.name,
            d.borrower
                .map(|b| format!("lent to {b}"))
                .unwrap_or_else(|| "available".into())
        );
    }
    println!("\ndemo complete: an unmodified driver used a device owned by another host.");
    Ok(())
}

/// Bytes a borrower writes in the sharing step: its own pattern, different for each.
fn own_pattern(who: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(13) as u8) ^ (i >> 10) as u8 ^ who.wrapping_mul(0x5b))
        .collect()
}

/// Byte offset of VF `vf`'s private namespace in an image of `image_len` bytes: slice `vf` of
/// `TotalVFs + 1` equal 1 MiB-aligned slices (the PF has slice 0).
fn private_slice(image_len: u64, vf: u64) -> u64 {
    let slices = u64::from(host::SRIOV_TOTAL_VFS) + 1;
    ((image_len / slices) & !((1u64 << 20) - 1)) * vf
}

/// The sharing step: the lender adds `nvme1` with two VFs on private namespaces; `borrower`
/// borrows VF 1 and `borrower2` VF 2; both, at the same time, write their own 1 MiB at the same
/// namespace offset, then each reads its own bytes back; the lender's image holds each in that
/// VF's slice.
fn share(pair: &Pair) -> anyhow::Result<()> {
    let second = pair
        .more_borrowers
        .first()
        .context("the demo starts a second borrower")?;
    let image = pair.dir.join("lender-nvme1.img");
    let added = pair.lender_add_nvme_vfs("nvme1", &image, 64 << 20, 2, "private")?;
    for d in &added.devices {
        println!("    lender offers {}: {}", d.name, d.detail);
    }
    let offset = 1u64 << 20;
    let len = 1usize << 20;
    let hosts: [(&str, &devlend_lending::Node, &str, u8); 2] = [
        ("borrower", &pair.borrower, "nvme1-vf1", 1),
        ("borrower2", second, "nvme1-vf2", 2),
    ];
    // Both write at the same time, each to its own VF at the same namespace offset ...
    let drivers: Vec<anyhow::Result<Controller>> = std::thread::scope(|s| {
        let running: Vec<_> = hosts
            .iter()
            .map(|&(who, node, dev, vf)| {
                s.spawn(move || -> anyhow::Result<Controller> {
                    let f: Arc<dyn PciFunction> = node
                        .borrow(dev)
                        .with_context(|| format!("{who} borrowing {dev}"))?;
                    let drv = Controller::new(f)
                        .with_context(|| format!("driver initialisation on {dev}"))?;
                    drv.write_at(offset, &own_pattern(vf, len))?;
                    drv.flush()?;
                    Ok(drv)
                })
            })
            .collect();
        running
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a borrower thread panicked")))
            })
            .collect()
    });
    // ... then, once both have written, each reads its own bytes back.
    let drivers = drivers.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    for ((who, node, dev, vf), drv) in hosts.iter().zip(drivers) {
        let mut back = vec![0u8; len];
        drv.read_at(offset, &mut back)?;
        anyhow::ensure!(
            back == own_pattern(*vf, len),
            "{who} read back different bytes from {dev}"
        );
        println!(
            "    {who} borrowed {dev} ({} MiB namespace), wrote its own 1 MiB at offset 1 MiB",
            drv.capacity_bytes() >> 20
        );
        println!("      after both wrote there, {who} reads back its own bytes");
        drv.shutdown()?;
        drop(drv);
        node.give_back(dev)?;
    }
    let image_len = std::fs::metadata(&image)?.len();
    for (who, _, _, vf) in hosts {
        let at = private_slice(image_len, u64::from(vf)) + offset;
        let on_disk = read_file_at(&image, at, len)?;
        anyhow::ensure!(
            on_disk == own_pattern(vf, len),
            "the lender's image does not hold {who}'s bytes in VF {vf}'s slice"
        );
        println!(
            "    {} holds {who}'s bytes at byte {at} (VF {vf}'s private slice)",
            image.display()
        );
    }
    println!("    both VFs returned; each borrower saw only its own slice of the one device");
    Ok(())
}

fn read_file_at(path: &std::path::Path, offset: u64, len: usize) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}
