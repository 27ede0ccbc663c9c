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
    local_function_with(image, None)
}

/// The same, with a Controller Memory Buffer of `cmb_bytes`.
fn local_function_with(image: &std::path::Path, cmb_bytes: Option<u64>) -> Arc<dyn PciFunction> {
    let mut config = NvmeConfig::new(image);
    config.cmb_bytes = cmb_bytes;
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
    cmb_submission_queues,
);

#[test]
fn every_case_is_listed_here() {
    // `cases!` above and `suite::CASES` must not drift apart.
    assert_eq!(suite::CASES.len(), 15);
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

/// The CMB case on a device that has one: the driver must put every I/O submission queue
/// there (the case checks it against CMBSZ), and the rest of the suite runs unchanged with the
/// CMB present.
#[test]
fn cmb_submission_queues_on_a_device_with_a_cmb() {
    let image = Image::new("cmb");
    let path = image.0.clone();
    let fun = local_function_with(&path, Some(1 << 20));
    let probe = fun.clone();
    let t = Target {
        make: Box::new(move || fun.clone()),
        image: Some(image.0.clone()),
    };
    if let Err(e) = suite::cmb_submission_queues(&t) {
        panic!("{e}");
    }
    // The case ran against a CMB (not the fallback): CAP.CMBS is set on this function.
    let bar0 = devlend_pci::BarIndex::new(0).unwrap();
    assert_ne!(probe.bar_read_u64(bar0, 0).unwrap() & (1 << 57), 0);
    let c = devlend_nvme_driver::Controller::with_config(
        probe,
        devlend_nvme_driver::DriverConfig {
            cmb_submission_queues: true,
            io_queues: 3,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(c.cmb_queue_count(), 3);
    // 3 queues of 256 entries (48 KiB) and 16 write buffers of 4 KiB each (192 KiB) fit in 1 MiB.
    assert_eq!(c.cmb_write_queue_count(), 3);
    assert_eq!(c.cmb().unwrap().bytes, 1 << 20);
    drop(c);
    if let Err(e) = suite::run_all(&t) {
        panic!("{e}");
    }
}

/// With Interrupt Coalescing asked for (threshold 4, at most 100 µs), a QD8 interrupt-driven
/// workload completes every command; turning it off again works too. Over a fabric this cuts
/// the number of MSI-X messages at queue depth.
#[test]
fn interrupt_coalescing_option() {
    use devlend_nvme_driver::workload::{self, Limit, Pattern, Workload};
    use devlend_nvme_driver::{CompletionMode, DriverConfig, InterruptCoalescing};
    let image = Image::new("coalescing");
    let coalescing = InterruptCoalescing {
        threshold: 4,
        time_100us: 1,
    };
    assert_eq!(coalescing.cdw11(), 0x0103);
    let c = devlend_nvme_driver::Controller::with_config(
        local_function(&image.0),
        DriverConfig {
            completion: CompletionMode::Interrupt,
            interrupt_coalescing: Some(coalescing),
            ..Default::default()
        },
    )
    .unwrap();
    for pattern in [Pattern::RandWrite, Pattern::RandRead] {
        let s = workload::run(&c, &Workload::new(pattern, 8, Limit::Ops(500))).unwrap();
        assert_eq!(s.ops, 500);
    }
    c.set_interrupt_coalescing(None).unwrap();
    let s = workload::run(&c, &Workload::new(Pattern::RandRead, 8, Limit::Ops(100))).unwrap();
    assert_eq!(s.ops, 100);
    c.shutdown().unwrap();
}
