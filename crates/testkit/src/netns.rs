//! Two network namespaces joined by a veth pair: test hosts for the tcp fabric on one machine.
//!
//! [`NetnsPair::create`] makes namespaces and veth ends with names unique to this process
//! (pid + counter), puts `10.213.0.1/30` on side 0 and `10.213.0.2/30` on side 1 (addresses
//! that exist only inside these namespaces), and deletes everything when dropped. Needs root
//! (`CAP_SYS_ADMIN` and `CAP_NET_ADMIN`) and the `ip` tool.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::Command;

use rustix::thread::LinkNameSpaceType;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Why the namespaces could not be made or entered.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// Not running as root.
    #[error("network namespaces need root (running as uid {0})")]
    NotRoot(u32),
    /// An `ip` command failed.
    #[error("`ip {args}` failed: {reason}")]
    Ip {
        /// The arguments.
        args: String,
        /// Its stderr or the spawn error.
        reason: String,
    },
    /// `setns` failed.
    #[error("entering namespace {name}: {source}")]
    Enter {
        /// Namespace name.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| NetnsError::Ip {
            args: args.join(" "),
            reason: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetnsError::Ip {
            args: args.join(" "),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Deletes the namespaces named `PREFIX<pid>…` whose process is gone: a test killed before
/// its `Drop` ran (SIGKILL from a timeout, an aborted run) leaves them behind, and the next run
/// that uses the same prefix removes them. Namespaces of live processes are left alone.
/// Returns the names deleted.
pub fn sweep_stale(prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    let mut deleted = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = stale_owner(&name, prefix) else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if ip(&["netns", "del", &name]).is_ok() {
            deleted.push(name);
        }
    }
    deleted
}

/// The pid in `PREFIX<pid><rest>`, when `name` has that shape (`rest` not starting with a digit).
fn stale_owner(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    rest.get(..digits)?.parse().ok()
}

/// Two namespaces joined by a veth pair; deleted on drop.
#[derive(Debug)]
pub struct NetnsPair {
    names: [String; 2],
    veths: [String; 2],
}

impl NetnsPair {
    /// Address of side `i` (0 or 1) on the veth link.
    pub fn addr(&self, side: usize) -> Ipv4Addr {
        if side == 0 {
            Ipv4Addr::new(10, 213, 0, 1)
        } else {
            Ipv4Addr::new(10, 213, 0, 2)
        }
    }

    /// Name of namespace `side`.
    pub fn name(&self, side: usize) -> &str {
        self.names.get(side).map_or("", |s| s.as_str())
    }

    /// Creates the pair, or says why not and returns `None`: a test that needs namespaces
    /// skips `what` (printed) where they cannot be made, but fails under `CI`, which must run it.
    pub fn create_or_skip(what: &str) -> Option<Self> {
        match Self::create() {
            Ok(p) => Some(p),
            Err(e) if std::env::var_os("CI").is_some() => {
                panic!("CI needs network namespaces (run as root): {e}")
            }
            Err(e) => {
                eprintln!("SKIPPED {what}: {e}");
                None
            }
        }
    }

    /// Creates the pair (root only).
    pub fn create() -> Result<Self, NetnsError> {
        let uid = rustix::process::geteuid().as_raw();
        if uid != 0 {
            return Err(NetnsError::NotRoot(uid));
        }
        for gone in sweep_stale("dlt") {
            eprintln!("netns: deleted {gone}, left by a process that no longer exists");
        }
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}x{n}", std::process::id());
        let pair = NetnsPair {
            names: [format!("dlt{tag}a"), format!("dlt{tag}b")],
            // Interface names are at most 15 bytes.
            veths: [
                format!("dv{}{n}a", std::process::id() % 100_000),
                format!("dv{}{n}b", std::process::id() % 100_000),
            ],
        };
        // From here on, Drop cleans up whatever was made.
        for name in &pair.names {
            ip(&["netns", "add", name])?;
        }
        let [na, nb] = &pair.names;
        let [va, vb] = &pair.veths;
        ip(&[
            "link", "add", va, "netns", na, "type", "veth", "peer", "name", vb, "netns", nb,
        ])?;
        for (side, (ns, veth)) in pair.names.iter().zip(&pair.veths).enumerate() {
            let cidr = format!("{}/30", pair.addr(side));
            ip(&["-n", ns, "addr", "add", &cidr, "dev", veth])?;
            ip(&["-n", ns, "link", "set", veth, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    /// A command that runs `program` inside namespace `side`.
    pub fn command(&self, side: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.name(side), program]);
        c
    }

    /// Moves the calling thread into namespace `side`: sockets it (and threads it spawns from
    /// now on) creates live there.
    pub fn enter(&self, side: usize) -> Result<(), NetnsError> {
        let name = self.name(side).to_string();
        let path = format!("/run/netns/{name}");
        let f = File::open(&path).map_err(|source| NetnsError::Enter {
            name: name.clone(),
            source,
        })?;
        rustix::thread::move_into_link_name_space(f.as_fd(), Some(LinkNameSpaceType::Network))
            .map_err(|e| NetnsError::Enter {
                name,
                source: e.into(),
            })?;
        Ok(())
    }

    /// Cuts (`up == false`) or restores the link: the veth end of side 0 goes down or up.
    pub fn set_link(&self, up: bool) -> Result<(), NetnsError> {
        let state = if up { "up" } else { "down" };
        ip(&["-n", self.name(0), "link", "set", &self.veths[0], state])
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for name in &self.names {
            // Deleting a namespace also deletes its veth end (and so the pair).
            let _ = ip(&["netns", "del", name]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::stale_owner;

    #[test]
    fn the_owner_pid_is_read_only_from_names_of_the_prefix() {
        assert_eq!(stale_owner("dlt1234x0a", "dlt"), Some(1234));
        assert_eq!(stale_owner("dlc29715-h15", "dlc"), Some(29715));
        assert_eq!(stale_owner("dlc29715-sw", "dlc"), Some(29715));
        assert_eq!(stale_owner("dltx0a", "dlt"), None);
        assert_eq!(stale_owner("other1234", "dlt"), None);
        assert_eq!(stale_owner("dlt99999999999999999999x", "dlt"), None);
    }
}
