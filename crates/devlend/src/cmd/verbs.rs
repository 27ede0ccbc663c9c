//! The management verbs: `add`, `remove`, `list`, `borrow`, `return`, `reclaim`, `status`,
//! `check`.

use std::path::PathBuf;
use std::time::Duration;

use super::ctl::{call, Target};
use crate::proto::{
    AddReply, AddRequest, AddVfioRequest, BorrowRequest, CheckRequest, Device, DeviceState,
    ErrorBody, ErrorCode, ListRequest, ReclaimRequest, RemoveRequest, ReturnRequest, StatusRequest,
    VmAttachment,
};

/// `devlend add nvme ...`
#[derive(clap::Args)]
pub struct AddArgs {
    #[command(flatten)]
    target: Target,
    /// Device kind: `nvme` (the emulated controller) or `vfio` (a real PCI function).
    kind: String,
    /// `vfio`: the function's PCI address (DDDD:BB:DD.F, as `lspci -D` shows it).
    bdf: Option<String>,
    /// `nvme`: raw image file that backs the device.
    #[arg(long)]
    image: Option<PathBuf>,
    /// `vfio`: move the function to vfio-pci from the driver it has (it goes back to that
    /// driver when devlend removes it).
    #[arg(long)]
    bind: bool,
    /// Name to lend it under (default: the image's file stem).
    #[arg(long)]
    name: Option<String>,
    /// Create the image with this size if it does not exist (bytes, or with K/M/G suffix).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// NVMe serial number.
    #[arg(long)]
    serial: Option<String>,
    /// NVMe model string.
    #[arg(long)]
    model: Option<String>,
    /// NVMe I/O queue pairs (1 to 47, default 16). The device has one MSI-X vector per queue
    /// plus one, and each takes one of the 48 interrupt doorbell bits of the link it is lent
    /// over: with 16, two devices fit on one link; with 4, nine.
    #[arg(long, value_name = "N")]
    queues: Option<u16>,
    /// Lend N SR-IOV virtual functions (NAME-vf1 ... NAME-vfN, each borrowable on its own)
    /// instead of the device: this host manages the physical function.
    #[arg(long, value_name = "N")]
    vfs: Option<u16>,
    /// With --vfs: `shared` (every VF sees the whole image, the default) or `private` (each VF
    /// its own slice of the image).
    #[arg(long, value_name = "shared|private", requires = "vfs")]
    vf_namespaces: Option<String>,
    /// Give the NVMe device a Controller Memory Buffer of SIZE in BAR 2 (a power of two from
    /// 64K to 1G): a driver may place submission queues, PRP lists and data there, which the
    /// device then reads from itself instead of across the link. Off by default.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    cmb: Option<u64>,
}

/// `devlend list`, `devlend status`
#[derive(clap::Args)]
pub struct PlainArgs {
    #[command(flatten)]
    target: Target,
}

/// `devlend remove NAME`
#[derive(clap::Args)]
pub struct RemoveArgs {
    #[command(flatten)]
    target: Target,
    /// A device this host lends (see `devlend list`); an SR-IOV physical function goes with
    /// its virtual functions.
    name: String,
}

/// `devlend borrow NAME`, `devlend return NAME`
#[derive(clap::Args)]
pub struct NameArgs {
    #[command(flatten)]
    target: Target,
    /// Device name (see `devlend list`).
    name: String,
    /// Serve the borrowed device to a VMM on this vfio-user socket (borrow only).
    #[arg(long)]
    vfio_user: Option<PathBuf>,
    /// Hot-add the borrowed device to the running VM whose QMP socket this is (borrow only;
    /// QEMU's `-qmp unix:PATH,server=on,wait=off`; a socket not made yet is waited for up to
    /// 10 s).
    #[arg(long, value_name = "QMP_SOCKET")]
    vm: Option<PathBuf>,
    /// With --vm: the hot-pluggable port (a pcie-root-port's id) to use (default: the first free).
    #[arg(long, requires = "vm")]
    port: Option<String>,
    /// With --vm: the QEMU device id (default: devlend-NAME).
    #[arg(long, requires = "vm")]
    id: Option<String>,
    /// Return only: how long a VM's guest has to release the device before it is removed by
    /// surprise (e.g. 20s, 500ms; default 20s); it is asked again every 10 s meanwhile.
    #[arg(long, value_parser = parse_duration)]
    grace: Option<Duration>,
}

/// Parses "20s", "500ms", "2m" or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || format!("{s:?} is not a duration (examples: 20s, 500ms, 2m)");
    let (num, mult_ms) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else {
        (s, 1000)
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult_ms))
        .map(Duration::from_millis)
        .ok_or_else(bad)
}

/// `devlend check NAME`
#[derive(clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    target: Target,
    /// Borrowed device name.
    name: String,
    /// Bytes to read (with --write: to write, read back and verify).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    bytes: u64,
    /// Byte offset on the device.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    offset: u64,
    /// Overwrite --bytes at --offset with a test pattern, flush, read back and verify. THIS
    /// DESTROYS WHAT IS STORED THERE (at offset 0: the partition table and superblock).
    /// Without it, check only reads.
    #[arg(long)]
    write: bool,
    /// Put the driver's I/O submission queues in the device's Controller Memory Buffer (a
    /// device added with `--cmb`), and as room allows the PRP lists and the data of writes of
    /// up to 128 KiB: commands and their data then cross the link as posted writes into the
    /// device, which no longer fetches them. Fails on a device without one.
    #[arg(long)]
    cmb: bool,
}

/// `devlend keygen`
#[derive(clap::Args)]
pub struct KeygenArgs {
    /// Directory to write the deployment CA and each host's certificate and key into.
    #[arg(long)]
    dir: PathBuf,
    /// Host names (each node's --name), at least two.
    #[arg(required = true, num_args = 2..)]
    hosts: Vec<String>,
    /// Print JSON instead of text (an error too, on stderr).
    #[arg(long)]
    pub json: bool,
    /// Replace a CA that is already in --dir. Every key it signed (handed out to hosts
    /// already) stops working.
    #[arg(long)]
    force: bool,
}

/// What `keygen --json` prints.
#[derive(serde::Serialize)]
struct KeygenReply<'a> {
    dir: &'a std::path::Path,
    hosts: &'a [String],
}

/// Runs `keygen`.
pub fn keygen(a: KeygenArgs) -> anyhow::Result<()> {
    let names: Vec<&str> = a.hosts.iter().map(String::as_str).collect();
    for (i, n) in names.iter().enumerate() {
        if names.get(..i).is_some_and(|seen| seen.contains(n)) {
            return Err(ErrorBody::new(
                ErrorCode::Invalid,
                format!("host name {n:?} is given twice: each host needs its own name"),
            )
            .into());
        }
    }
    let ca = devlend_fabric_tcp::keys::ca_path(&a.dir);
    if ca.exists() && !a.force {
        return Err(ErrorBody::new(
            ErrorCode::AlreadyExists,
            format!(
                "{} holds a CA already: a new one would make every key it signed stop working. Use another --dir, or --force to replace it",
                ca.display()
            ),
        )
        .into());
    }
    devlend_fabric_tcp::keys::generate(&a.dir, &names).map_err(|e| match e {
        devlend_fabric_tcp::keys::KeyError::BadHostName(_) => {
            anyhow::Error::from(ErrorBody::new(ErrorCode::Invalid, e.to_string()))
        }
        e => e.into(),
    })?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&KeygenReply {
                dir: &a.dir,
                hosts: &a.hosts
            })?
        );
        return Ok(());
    }
    println!(
        "wrote a CA and keys for {} into {}",
        names.join(", "),
        a.dir.display()
    );
    println!(
        "copy ca.pem and each host's <name>.pem/<name>.key to that host; keep the keys private"
    );
    Ok(())
}

/// Parses "4096", "64K", "256M", "2G".
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        Some('T') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (examples: 4096, 64K, 256M, 2G)"))
}

const TIMEOUT: Duration = Duration::from_secs(30);

/// Prints `v` as JSON (`--json`) or as `human` says.
pub fn emit<T: serde::Serialize>(
    target: &Target,
    v: &T,
    human: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    if target.json {
        println!("{}", serde_json::to_string(v)?);
    } else {
        print!("{}", human(v));
    }
    Ok(())
}

fn device_line(d: &Device) -> String {
    let state = match (&d.state, &d.borrower) {
        (DeviceState::Lent | DeviceState::Borrowed, Some(b)) => format!("lent to {b}"),
        (DeviceState::ManagingVfs, _) => "manages its VFs".into(),
        (DeviceState::Lost, _) => "lost (not held any more)".into(),
        (DeviceState::Borrowed, None) => "borrowed".into(),
        (DeviceState::LeaseEnded, _) => "lease ended".into(),
        _ => "available".into(),
    };
    format!(
        "{:<12} {:<6} owner {:<12} {:<22} {}\n",
        d.name, d.kind, d.owner, state, d.detail
    )
}

fn vm_line(vm: &VmAttachment) -> String {
    format!(
        "in the VM at {} as {} (port {}, guest address {}), vfio-user {}",
        vm.qmp.display(),
        vm.device_id,
        vm.port,
        vm.guest_address.as_deref().unwrap_or("not yet assigned"),
        vm.vfio_user.display(),
    )
}

/// Runs `add`.
pub fn add(a: AddArgs) -> anyhow::Result<()> {
    if a.kind == "vfio" {
        return add_vfio(a);
    }
    anyhow::ensure!(
        a.bdf.is_none() && !a.bind,
        "a PCI address and --bind are for `devlend add vfio BDF`"
    );
    let image = a
        .image
        .ok_or_else(|| anyhow::anyhow!("`devlend add nvme` needs --image PATH"))?;
    let name = match a.name {
        Some(n) => n,
        None => image
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("give the device a --name"))?,
    };
    let image = std::path::absolute(&image)?;
    let req = AddRequest {
        kind: a.kind,
        name,
        image,
        size: a.size,
        serial: a.serial,
        model: a.model,
        queues: a.queues,
        vfs: a.vfs,
        vf_namespaces: a.vf_namespaces,
        cmb: a.cmb,
    };
    emit_added(&a.target, call(&a.target.state, req, TIMEOUT)?)
}

/// Prints what `add` added: its devices, one line each, or the reply as JSON.
fn emit_added(target: &Target, v: AddReply) -> anyhow::Result<()> {
    emit(target, &v, |v| {
        v.devices
            .iter()
            .map(|d| format!("added {}", device_line(d)))
            .collect()
    })
}

/// `devlend add vfio BDF [--name NAME] [--bind]`.
fn add_vfio(a: AddArgs) -> anyhow::Result<()> {
    let bdf = a.bdf.ok_or_else(|| {
        anyhow::anyhow!("`devlend add vfio` needs the function's PCI address, e.g. 0000:01:00.0")
    })?;
    anyhow::ensure!(
        a.image.is_none()
            && a.size.is_none()
            && a.serial.is_none()
            && a.model.is_none()
            && a.queues.is_none()
            && a.cmb.is_none(),
        "--image, --size, --serial, --model, --queues and --cmb are for `devlend add nvme`; a real device brings its own"
    );
    let name = match a.name {
        Some(n) => n,
        None => crate::vfio::default_name(&bdf)?,
    };
    let req = AddVfioRequest {
        name,
        bdf,
        bind: a.bind,
    };
    emit_added(&a.target, call(&a.target.state, req, TIMEOUT)?)
}

/// Runs `list`.
pub fn list(a: PlainArgs) -> anyhow::Result<()> {
    let v = call(&a.target.state, ListRequest, TIMEOUT)?;
    emit(&a.target, &v, |v| {
        let mut out: String = v.local.iter().chain(&v.peer).map(device_line).collect();
        if let Some(e) = &v.peer_error {
            out.push_str(&format!("(peer devices unavailable: {e})\n"));
        }
        if out.is_empty() {
            out.push_str("no devices (add one with `devlend add nvme --image PATH`)\n");
        }
        out
    })
}

/// Runs `borrow`.
pub fn borrow(a: NameArgs) -> anyhow::Result<()> {
    let vfio_user = a.vfio_user.map(|p| std::path::absolute(&p)).transpose()?;
    let vm = a.vm.map(|p| std::path::absolute(&p)).transpose()?;
    let v = call(
        &a.target.state,
        BorrowRequest {
            name: a.name.clone(),
            vfio_user,
            vm,
            port: a.port,
            id: a.id,
        },
        TIMEOUT,
    )?;
    emit(&a.target, &v, |v| {
        let mut s = format!("borrowed {} from {} (lease {})\n", v.name, v.owner, v.lease);
        if let Some(vm) = &v.vm {
            s.push_str(&format!("hot-added: {}\n", vm_line(vm)));
        } else if let Some(sock) = &v.vfio_user {
            let sock = sock.display();
            s.push_str(&format!(
                "serving it over vfio-user at {sock}: -device '{{\"driver\":\"vfio-user-pci\",\"socket\":{{\"path\":\"{sock}\",\"type\":\"unix\"}}}}'\n"
            ));
        }
        s
    })
}

/// Runs `return`.
pub fn give_back(a: NameArgs) -> anyhow::Result<()> {
    let grace_ms = a
        .grace
        .map(|g| u64::try_from(g.as_millis()).unwrap_or(u64::MAX));
    let wait = TIMEOUT + a.grace.unwrap_or(crate::vm::DEFAULT_GRACE);
    let v = call(
        &a.target.state,
        ReturnRequest {
            name: a.name.clone(),
            grace_ms,
        },
        wait,
    )?;
    emit(&a.target, &v, |v| {
        // What follows "returned NAME[: how]".
        let mut notes = if v.lease_had_ended {
            "; its lease had ended already (the lender is gone or revoked it), nothing to give back"
                .to_string()
        } else {
            String::new()
        };
        if let Some(why) = &v.claim_release_pending {
            notes.push_str(&format!(
                "; the registry still shows it lent to this host until etcd takes the release \
                 (retried every {} ms; {why})",
                crate::cluster::RECONCILE_EVERY.as_millis()
            ));
        }
        match (&v.lost, &v.removal_text) {
            (Some(why), _) => format!(
                "forgot {}: it was lost before ({why}); nothing to give back\n",
                v.name
            ),
            (None, Some(how)) => format!("returned {}: {how}{notes}\n", v.name),
            (None, None) => format!("returned {}{notes}\n", v.name),
        }
    })
}

/// `devlend reclaim NAME [--grace DURATION]`
#[derive(clap::Args)]
pub struct ReclaimArgs {
    #[command(flatten)]
    target: Target,
    /// A device this host lends (see `devlend list`).
    name: String,
    /// How long the borrower has to finish outstanding I/O and give it back before it is
    /// revoked (e.g. 5s, 500ms; default 5s).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    grace: Duration,
}

/// Runs `reclaim` (on the lender).
pub fn reclaim(a: ReclaimArgs) -> anyhow::Result<()> {
    let grace_ms = u64::try_from(a.grace.as_millis()).unwrap_or(u64::MAX);
    let req = ReclaimRequest {
        name: a.name.clone(),
        grace_ms,
    };
    let v = call(&a.target.state, req, TIMEOUT + a.grace)?;
    emit(&a.target, &v, |v| {
        let how = if v.returned { "given back" } else { "revoked" };
        format!(
            "reclaimed {} from {} ({how} after {} ms); reset and available\n",
            v.device, v.borrower, v.elapsed_ms
        )
    })
}

/// Runs `remove` (on the lender).
pub fn remove(a: RemoveArgs) -> anyhow::Result<()> {
    let v = call(
        &a.target.state,
        RemoveRequest {
            name: a.name.clone(),
        },
        TIMEOUT,
    )?;
    emit(&a.target, &v, |v| {
        let (first, rest) = v
            .removed
            .split_first()
            .map_or(("", &[][..]), |(f, r)| (f.as_str(), r));
        let with = if rest.is_empty() {
            String::new()
        } else {
            format!(" with its virtual functions {}", rest.join(", "))
        };
        format!("removed {first}{with}: no longer lent from this host; its image stays\n")
    })
}

/// Runs `status`.
pub fn status(a: PlainArgs) -> anyhow::Result<()> {
    let v = call(&a.target.state, StatusRequest, TIMEOUT)?;
    emit(&a.target, &v, |v| {
        let mut s = format!("node {}\n", v.name);
        for l in &v.links {
            s.push_str(&format!(
                "  link over {}: {}, peer {}\n",
                l.fabric,
                l.link,
                l.peer.as_deref().unwrap_or("(unknown)")
            ));
        }
        for d in &v.lending {
            s.push_str(&format!("  lending  {}", device_line(d)));
        }
        for d in &v.lost {
            s.push_str(&format!("  lost     {}", device_line(d)));
            s.push_str(&format!(
                "           {}; `devlend return {}` forgets it\n",
                d.reason.as_deref().unwrap_or("taken away"),
                d.name
            ));
        }
        for d in &v.borrowed {
            s.push_str(&format!("  borrowed {}", device_line(d)));
            if let Some(vm) = &d.vm {
                s.push_str(&format!("           {}\n", vm_line(vm)));
            } else if let Some(sock) = &d.vfio_user {
                s.push_str(&format!(
                    "           served over vfio-user at {}\n",
                    sock.display()
                ));
            }
        }
        for l in &v.link_details {
            s.push_str(&format!(
                "  link {}: peer address {}, TLS identity {}\n",
                l.spec, l.address, l.tls_identity
            ));
        }
        for l in &v.leases {
            s.push_str(&format!(
                "  lease {} on {} held by {}, expires in {} ms unless renewed\n",
                l.lease, l.device, l.holder, l.expires_in_ms
            ));
        }
        for b in &v.borrowed {
            if let Some(sock) = &b.vfio_user {
                s.push_str(&format!(
                    "  vfio-user: {} served at {}\n",
                    b.name,
                    sock.display()
                ));
            }
        }
        s
    })
}

/// Runs `check`.
pub fn check(a: CheckArgs) -> anyhow::Result<()> {
    let req = CheckRequest {
        name: a.name,
        bytes: a.bytes,
        offset: a.offset,
        write: a.write,
        cmb: a.cmb,
    };
    let v = call(&a.target.state, req, Duration::from_secs(300))?;
    emit(&a.target, &v, |v| format!("{}\n", v.summary))
}

impl AddArgs {
    /// Whether `--json` was given.
    pub fn json(&self) -> bool {
        self.target.json
    }
}

impl PlainArgs {
    /// Whether `--json` was given.
    pub fn json(&self) -> bool {
        self.target.json
    }
}

impl NameArgs {
    /// Whether `--json` was given.
    pub fn json(&self) -> bool {
        self.target.json
    }
}

impl RemoveArgs {
    /// Whether `--json` was given.
    pub fn json(&self) -> bool {
        self.target.json
    }
}

impl ReclaimArgs {
    /// Whether `--json` was given.
    pub fn json(&self) -> bool {
        self.target.json
    }
}

impl CheckArgs {
    /// Whether `--json` was given.
    pub fn json(&self) -> bool {
        self.target.json
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_duration, parse_size};
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999999T").is_err());
        assert!(parse_size("").is_err());
    }
}
