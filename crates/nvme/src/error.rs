//! Errors of building and running the NVMe device model.

use std::path::PathBuf;

/// What [`crate::NvmeDevice::new`] can fail with.
#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    /// The configuration is unusable.
    #[error("invalid NVMe configuration: {0}")]
    InvalidConfig(&'static str),
    /// The backing image could not be opened, created or sized.
    #[error("image {path}: {op}: {source}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// What was attempted.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The image holds less than one logical block.
    #[error("image {path} is {len} bytes, smaller than one {block}-byte block")]
    ImageTooSmall {
        /// The image file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The logical block size.
        block: u32,
    },
    /// The PCI config space layout was rejected (a bug in this model).
    #[error("config space layout: {0}")]
    ConfigSpace(#[from] devlend_pci::config::ConfigError),
    /// A VF's controller was asked for while that VF is not enabled on the PF.
    #[error("VF {0} is not enabled (set NumVFs and VF Enable in the PF's SR-IOV capability)")]
    VfNotEnabled(u16),
    /// The worker thread could not be started.
    #[error("starting the controller thread: {0}")]
    Thread(#[source] std::io::Error),
}
