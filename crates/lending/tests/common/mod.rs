//! What the lending integration tests share: the test device's builder and loopback links.
#![allow(dead_code)]

use std::sync::Arc;

use devlend_fabric::{loopback_pair, AddressSpace, LinkConfig, LoopbackNtb};
use devlend_lending::{DeviceBuilder, Node};
use devlend_pci::test_device::TestDevice;

/// Builds devlend-pci's test device (DMA engine, interrupts) on the lender.
pub fn test_device() -> DeviceBuilder {
    Box::new(|dma, irq| TestDevice::build(dma, irq).map_err(|e| e.to_string()))
}

/// Adds the test device to `lender` as `td0`.
pub fn add_td0(lender: &Node) {
    lender
        .add_device("td0", "test device", test_device())
        .unwrap();
}

/// A loopback link from a host on `here` to a peer host on an address space of its own:
/// (this host's end, the peer's end).
pub fn link_from(here: Arc<AddressSpace>) -> (Arc<LoopbackNtb>, Arc<LoopbackNtb>) {
    loopback_pair(LinkConfig::default(), here, Arc::new(AddressSpace::new())).unwrap()
}
