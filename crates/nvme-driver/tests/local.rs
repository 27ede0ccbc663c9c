//! The driver's acceptance suite on the NVMe model bound in-process ([`LocalFunction`]), each
//! case on its own temporary image; plus the whole suite in order on one device, as the lending
//! tests run it on a borrowed function.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use devlend_nvme::{NvmeConfig, NvmeDevice};
use devlend_nvme_driver::suite::{self, Target};
use devlend_pci::{LocalFunction, PciDevice, PciFunction};

/// Image size for each test.
const IMAGE_BYTES: u64 = 64 << 20;
/// DMA memory for each binding: queues, a 4 MiB single transfer and the 8 MiB staging window.
const DMA_BYTES: usize = 48 << 20;

/// A temporary image file, removed on drop.
struct Image(PathBuf);

impl Image {
    fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "devlend-nvme-driver-{}-{n}-{name}.img",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        Image(path)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The NVMe model on `image` (created on first use), bound in-process. MDTS is the largest the
/// model offers (4 MiB), so one command's PRP list spans several list pages.
fn local_function(image: &std::path::Path) -> Arc<dyn PciFunction> {
    let mut config = NvmeConfig::new(image);
    config.create_size = Some(IMAGE_BYTES);
    config.mdts = 10;
    let f = LocalFunction::new(DMA_BYTES, move |dma, irq| {
        NvmeDevice::new(config, dma, irq).map(|d| d as Arc<dyn PciDevice>)
    })
    .expect("binding the NVMe model");
    Arc::new(f)
}

fn target(image: &Image) -> Target {
    let path = image.0.clone();
    Target {
        make: Box::new(move || local_function(&path)),
        image: Some(image.0.clone()),
    }
}

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let image = Image::new(stringify!($name));
                if let Err(e) = suite::$name(&target(&image)) {
                    panic!("{e}");
                }
            }
        )*
    };
}

cases!(
    init_identify,
    write_read_sizes,
    prp_list_chain,
    mdts_split,
    flush_persists,
    queues_in_parallel,
    interrupt_mode,
    polling_mode,
    out_of_range,
    reinit_after_reset,
    shutdown,
    workload_runs,
    removal_errors,
    removal_all_ones,
);

#[test]
fn every_case_is_listed_here() {
    // `cases!` above and `suite::CASES` must not drift apart.
    assert_eq!(suite::CASES.len(), 14);
}

#[test]
fn whole_suite_in_order_on_one_device() {
    let image = Image::new("whole");
    let path = image.0.clone();
    // One binding, handed out again for every bring-up (as a borrowed function would be).
    let fun = local_function(&path);
    let t = Target {
        make: Box::new(move || fun.clone()),
        image: Some(image.0.clone()),
    };
    if let Err(e) = suite::run_all(&t) {
        panic!("{e}");
    }
}
