//! The tcp rows of `devlend bench fabric`: window bandwidth and read latency over a veth link
//! between two network namespaces, each beside raw TCP between the same namespaces.

use anyhow::Context;
use devlend_bench::Figure;

/// The tcp figures; `quick` shortens every run. Needs root (it creates network namespaces).
pub fn figures(quick: bool) -> anyhow::Result<Vec<Figure>> {
    devlend_fabric_tcp::bench::figures(quick)
        .context("tcp fabric benchmark (run as root: it creates network namespaces)")
}
