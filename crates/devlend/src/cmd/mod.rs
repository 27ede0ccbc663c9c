//! One module per subcommand; each owns its `Args` and `run`.

pub mod baseline;
pub mod baseline_tls;
pub mod bench_args;
pub mod bench_cluster;
pub mod bench_cmb;
pub mod bench_fabric;
pub mod bench_fabric_tcp;
pub mod bench_lending;
pub mod bench_nvme;
pub mod bench_sharing;
pub mod bench_vm;
pub mod ctl;
pub mod demo;
pub mod io_load;
pub mod lspci;
pub mod node;
pub mod observe;
pub mod persist;
pub mod progress;
pub mod serve;
pub mod sriov;
pub mod top;
pub mod verbs;
pub mod wait;
