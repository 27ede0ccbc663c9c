//! `devlend wait`: blocks until the node answers, and optionally until a peer is linked and a
//! device is listed. For scripts that start nodes and then use them.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::ctl::{call, Target};
use super::verbs::{emit, parse_duration};
use crate::proto::{ErrorBody, ErrorCode, ListRequest, StatusRequest};

/// `devlend wait`
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: Target,
    /// Also wait until a link to this peer (its node name) is up.
    #[arg(long)]
    peer: Option<String>,
    /// Also wait until a device by this name is listed (here or on a peer).
    #[arg(long)]
    device: Option<String>,
    /// Give up after this long (e.g. 30s, 500ms, 2m).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    timeout: Duration,
}

/// What `wait` saw when everything it waited for was there.
#[derive(Debug, Serialize, Deserialize)]
pub struct WaitReply {
    /// The node's name.
    pub node: String,
    /// The peer it waited for, linked.
    pub peer: Option<String>,
    /// The device it waited for, listed.
    pub device: Option<String>,
    /// How long it waited, milliseconds.
    pub waited_ms: u64,
}

/// Why the wait is not over yet (the last reason is the timeout's message).
fn pending(a: &Args, per_call: Duration) -> Result<String, String> {
    let st = call(&a.target.state, StatusRequest, per_call).map_err(|e| {
        format!(
            "the node at {} does not answer: {e:#}",
            a.target.state.display()
        )
    })?;
    if let Some(peer) = &a.peer {
        let linked = st
            .links
            .iter()
            .any(|l| l.link == "up" && l.peer.as_deref() == Some(peer.as_str()))
            || st.cluster.as_ref().is_some_and(|c| {
                c.links_to_lenders.contains(peer) || c.links_to_borrowers.contains(peer)
            });
        if !linked {
            let links: Vec<String> = st
                .links
                .iter()
                .map(|l| {
                    format!(
                        "{} {} peer {}",
                        l.fabric,
                        l.link,
                        l.peer.as_deref().unwrap_or("?")
                    )
                })
                .collect();
            return Err(format!(
                "node {} has no link up to {peer} (links: {})",
                st.name,
                if links.is_empty() {
                    "none".into()
                } else {
                    links.join(", ")
                }
            ));
        }
    }
    if let Some(device) = &a.device {
        let list = call(&a.target.state, ListRequest, per_call)
            .map_err(|e| format!("listing devices: {e:#}"))?;
        if !list
            .local
            .iter()
            .chain(&list.peer)
            .any(|d| &d.name == device)
        {
            return Err(format!(
                "node {} lists no device {device}{}",
                st.name,
                list.peer_error
                    .map(|e| format!(" (peer devices unavailable: {e})"))
                    .unwrap_or_default()
            ));
        }
    }
    Ok(st.name)
}

/// Runs `wait`.
pub fn run(a: Args) -> anyhow::Result<()> {
    let start = Instant::now();
    let deadline = start + a.timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let per_call = left.clamp(Duration::from_millis(100), Duration::from_secs(5));
        match pending(&a, per_call) {
            Ok(node) => {
                let v = WaitReply {
                    node,
                    peer: a.peer.clone(),
                    device: a.device.clone(),
                    waited_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
                };
                return emit(&a.target, &v, |v| {
                    let mut s = format!("node {} is up", v.node);
                    if let Some(p) = &v.peer {
                        s.push_str(&format!(", linked to {p}"));
                    }
                    if let Some(d) = &v.device {
                        s.push_str(&format!(", lists {d}"));
                    }
                    s.push('\n');
                    s
                });
            }
            Err(why) if left.is_zero() => {
                return Err(ErrorBody::new(
                    ErrorCode::Timeout,
                    format!("gave up after {:?}: {why}", a.timeout),
                )
                .into())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50).min(left)),
        }
    }
}

impl Args {
    /// Whether `--json` was given.
    pub fn json(&self) -> bool {
        self.target.json
    }
}
