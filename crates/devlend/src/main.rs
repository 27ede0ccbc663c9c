//! `devlend`: PCIe device lending over an (emulated) non-transparent bridge.
//!
//! One binary: the per-host daemon (`node`), management verbs that talk to it, the demo, the
//! vfio-user front-end for local devices (`serve`), and the benchmarks.

mod cluster;
mod cmd;
mod host;
mod pair;
mod vfio;
mod vm;

use devlend_proto as proto;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "devlend",
    version,
    about = "PCIe device lending over an emulated NTB",
    after_help = "Environment:\n  DEVLEND_LOG    log level or filter for stderr (error, warn [default], info, debug, trace; \n                 or per module, e.g. devlend_lending=debug); lend, return, lease expiry and\n                 removal are logged at info\n  DEVLEND_STATE  the node's state directory (instead of --state)\n  DEVLEND_PROGRESS_DELAY_MS\n                 how long a verb waits before it shows progress on a terminal (1000)\n  DEVLEND_MGMT_MAX_CONNECTIONS\n                 management connections a node serves at once (64)\n  DEVLEND_MGMT_IDLE_MS\n                 how long a node waits for a connection's request line (10000)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run this host's daemon.
    Node(cmd::node::Args),
    /// Add a device this host lends (`devlend add nvme --image PATH`).
    Add(cmd::verbs::AddArgs),
    /// Stop lending a device (on the lender): it leaves this host and its state; its image stays.
    Remove(cmd::verbs::RemoveArgs),
    /// List devices on this host and its peer, with owner and borrower.
    List(cmd::verbs::PlainArgs),
    /// Borrow a device from the peer.
    Borrow(cmd::verbs::NameArgs),
    /// Give a borrowed device back.
    Return(cmd::verbs::NameArgs),
    /// Take a lent device back (on the lender): the borrower gets a grace period, then loses it.
    Reclaim(cmd::verbs::ReclaimArgs),
    /// Show this node's link, peer, lent and borrowed devices.
    Status(cmd::verbs::PlainArgs),
    /// Wait until the node answers (and, with --peer/--device, a peer is linked, a device listed).
    Wait(cmd::wait::Args),
    /// Run the user-space NVMe driver on a borrowed device: read (only with --write: write a
    /// test pattern over the data, flush, read back, verify).
    Check(cmd::verbs::CheckArgs),
    /// Show the devices this host sees (its own and borrowed) as `lspci` would (-v, -vv).
    Lspci(cmd::lspci::Args),
    /// A live view of this node's links and devices and their rates.
    Top(cmd::top::Args),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout: `devlend man > devlend.1 && man ./devlend.1`.
    Man,
    /// Create TLS keys for hosts that link over tcp (a private CA plus one key pair per host).
    Keygen(cmd::verbs::KeygenArgs),
    /// Runs the demo: a lender and a borrower host on this machine, lending an NVMe device.
    Demo(cmd::demo::Args),
    /// Serve a local device model to a VMM over vfio-user (no lending: the baseline).
    Serve(cmd::serve::Args),
    /// Enable a real device's SR-IOV virtual functions so each can be lent on its own.
    #[command(subcommand)]
    Sriov(cmd::sriov::Cmd),
    /// Measurements, each beside its same-run baseline.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Random reads or writes with O_DIRECT on a block device at a queue depth (threads):
    /// prints one JSON line with IOPS, median and p99 latency and the count (`bench vm` runs
    /// it inside its guests). randwrite overwrites the range.
    IoLoad(cmd::io_load::Args),
    /// Hidden: the peer process of `bench fabric`.
    #[command(name = "__fabric-bench-peer", hide = true)]
    FabricBenchPeer(cmd::bench_fabric::PeerArgs),
    /// Hidden: a borrower process of `bench sharing`.
    #[command(name = "__sharing-bench-borrower", hide = true)]
    SharingBenchBorrower(cmd::bench_sharing::BorrowerArgs),
}

#[derive(Subcommand)]
enum BenchCmd {
    /// NTB fabric: window bandwidth, doorbell round trip, MMIO through a window.
    Fabric(cmd::bench_fabric::Args),
    /// The NVMe model driven by the user-space driver, against the backing file's own rate.
    Nvme(cmd::bench_nvme::Args),
    /// A device used locally vs borrowed over the fabric, same driver and workload.
    Lending(cmd::bench_lending::Args),
    /// A QEMU guest's nvme driver: QEMU's own NVMe vs ours local vs ours borrowed.
    Vm(cmd::bench_vm::Args),
    /// A cluster on etcd: borrow-by-name time at 2, 8, 16 hosts; a dead lender's exit time.
    Cluster(cmd::bench_cluster::Args),
    /// One device shared by 1, 2, 4, 8 borrowers through SR-IOV VFs vs the local function.
    Sharing(cmd::bench_sharing::Args),
    /// Borrowed QD1 latency with the submission queue in the device's CMB vs in host memory.
    Cmb(cmd::bench_cmb::Args),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEVLEND_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into a log file or pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            let wants_json = std::env::args().skip(1).any(|a| a == "--json");
            if wants_json && !matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
            {
                let body = proto::ErrorBody::new(proto::ErrorCode::Usage, e.to_string().trim_end());
                print_json_error(body);
                return std::process::ExitCode::from(2);
            }
            e.exit()
        }
    };
    let json = cli.cmd.json();
    let result = match cli.cmd {
        Cmd::Node(a) => cmd::node::run(a),
        Cmd::Add(a) => cmd::verbs::add(a),
        Cmd::Remove(a) => cmd::verbs::remove(a),
        Cmd::List(a) => cmd::verbs::list(a),
        Cmd::Borrow(a) => cmd::verbs::borrow(a),
        Cmd::Return(a) => cmd::verbs::give_back(a),
        Cmd::Reclaim(a) => cmd::verbs::reclaim(a),
        Cmd::Status(a) => cmd::verbs::status(a),
        Cmd::Wait(a) => cmd::wait::run(a),
        Cmd::Check(a) => cmd::verbs::check(a),
        Cmd::Lspci(a) => cmd::lspci::run(a),
        Cmd::Completions { shell } => {
            let mut c = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut c, "devlend", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man => clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
            .render(&mut std::io::stdout())
            .map_err(anyhow::Error::from),
        Cmd::Top(a) => cmd::top::run(a),
        Cmd::Keygen(a) => cmd::verbs::keygen(a),
        Cmd::Demo(a) => cmd::demo::run(a),
        Cmd::Serve(a) => cmd::serve::run(a),
        Cmd::Sriov(c) => cmd::sriov::run(c),
        Cmd::IoLoad(a) => cmd::io_load::run_cmd(a),
        Cmd::Bench(BenchCmd::Fabric(a)) => cmd::bench_fabric::run(a),
        Cmd::Bench(BenchCmd::Nvme(a)) => cmd::bench_nvme::run(a),
        Cmd::Bench(BenchCmd::Lending(a)) => cmd::bench_lending::run(a),
        Cmd::Bench(BenchCmd::Vm(a)) => cmd::bench_vm::run(a),
        Cmd::Bench(BenchCmd::Cluster(a)) => cmd::bench_cluster::run(a),
        Cmd::Bench(BenchCmd::Sharing(a)) => cmd::bench_sharing::run(a),
        Cmd::Bench(BenchCmd::Cmb(a)) => cmd::bench_cmb::run(a),
        Cmd::FabricBenchPeer(a) => cmd::bench_fabric::run_peer(a),
        Cmd::SharingBenchBorrower(a) => cmd::bench_sharing::run_borrower(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if json => {
            print_json_error(proto::ErrorBody::from_anyhow(&e));
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("devlend: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `{"error":{"code":...,"message":...}}` on stderr.
fn print_json_error(error: proto::ErrorBody) {
    match serde_json::to_string(&proto::ErrorReport { error }) {
        Ok(line) => eprintln!("{line}"),
        Err(e) => eprintln!("devlend: error: {e}"),
    }
}

impl Cmd {
    /// Whether the verb was asked for JSON (then its errors are JSON too).
    fn json(&self) -> bool {
        match self {
            Cmd::Add(a) => a.json(),
            Cmd::List(a) | Cmd::Status(a) => a.json(),
            Cmd::Borrow(a) | Cmd::Return(a) => a.json(),
            Cmd::Reclaim(a) => a.json(),
            Cmd::Remove(a) => a.json(),
            Cmd::Check(a) => a.json(),
            Cmd::Wait(a) => a.json(),
            Cmd::Lspci(a) => a.json(),
            Cmd::Top(a) => a.json(),
            Cmd::Keygen(a) => a.json,
            _ => false,
        }
    }
}
