//! `devlend lspci [NAME] [-v|-vv]`: every device this host sees (its own, lent or not, and the
//! ones it borrowed), decoded from a config-space snapshot the way `lspci` prints a local one.
//!
//! A borrowed device is read through the lender (its BAR registers as this borrower placed
//! them); a device this host owns is read at the device. Each gets a synthetic slot (`dl:NN.0`,
//! in the order listed) and a `Devlend:` line saying whose it is.

use std::time::Duration;

use devlend_pci::lspci::{render, Function, Verbosity};

use super::ctl::{call, Target};
use super::observe::PciSnapshot;

/// `devlend lspci`
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: Target,
    /// Only this device.
    name: Option<String>,
    /// -v: flags, BARs and capability names; -vv: every decoded register.
    #[arg(short, action = clap::ArgAction::Count)]
    verbose: u8,
}

/// Runs `lspci`.
pub fn run(a: Args) -> anyhow::Result<()> {
    let v = call(
        &a.target.state,
        crate::proto::LspciRequest {
            name: a.name.clone(),
        },
        Duration::from_secs(30),
    )?;
    if a.target.json {
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    let snaps = v.devices;
    let verbosity = match a.verbose {
        0 => Verbosity::Terse,
        1 => Verbosity::Verbose,
        _ => Verbosity::VeryVerbose,
    };
    print!("{}", text(&snaps, verbosity));
    Ok(())
}

fn whose(s: &PciSnapshot) -> String {
    match (s.role.as_str(), &s.borrower) {
        ("borrowed", _) => format!("{} borrowed from {}", s.name, s.owner),
        (_, Some(b)) => format!("{} owned here, lent to {b}", s.name),
        _ => format!("{} owned here, not lent", s.name),
    }
}

/// The listing: each device as `lspci` prints it, with a `Devlend:` line after the first.
pub fn text(snaps: &[PciSnapshot], verbosity: Verbosity) -> String {
    let mut out = String::new();
    for (i, s) in snaps.iter().enumerate() {
        let slot = format!("dl:{i:02x}.0");
        let body = render(
            &Function {
                slot: &slot,
                config: &s.config,
                bar_sizes: s.bar_sizes,
            },
            verbosity,
        );
        let mut lines = body.split_inclusive('\n');
        if let Some(first) = lines.next() {
            out.push_str(first);
        }
        out.push_str(&format!("\tDevlend: {}\n", whose(s)));
        for l in lines {
            out.push_str(l);
        }
    }
    if snaps.is_empty() {
        out.push_str("no devices (add one with `devlend add nvme --image PATH`, or borrow one)\n");
    }
    out
}

impl Args {
    /// Whether `--json` was given.
    pub fn json(&self) -> bool {
        self.target.json
    }
}
