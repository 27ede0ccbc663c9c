//! `devlend node --tcp-cpus WRITER,READER` pins each tcp link's threads (read back from
//! `/proc`), and a CPU the node may not use, or a malformed list, is refused at start.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{exe, scratch, NodeProcess};

/// `Cpus_allowed_list` of each thread of `pid` whose name is `comm`.
fn cpus_of_threads(pid: u32, comm: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if name.trim() != comm {
            continue;
        }
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        if let Some(list) = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        {
            out.push(list.trim().to_string());
        }
    }
    out
}

fn port(offset: u16) -> u16 {
    41_000 + (std::process::id() % 2000) as u16 * 2 + offset
}

#[test]
fn tcp_link_threads_run_on_the_cpus_asked_for() {
    let allowed = devlend_fabric_tcp::cpu::allowed().unwrap();
    let (writer, reader) = (*allowed.last().unwrap(), allowed[0]);
    let dir = scratch("tcp-cpus");
    let port = port(0);
    let cpus = format!("{writer},{reader}");
    let lender = NodeProcess::start_with(
        Command::new(exe()),
        &dir,
        "lender",
        &[format!("tcp-listen:borrower@127.0.0.1:{port}")],
        3000,
        &["--insecure-tcp", "--tcp-cpus", &cpus],
    );
    let _borrower = NodeProcess::start_with(
        Command::new(exe()),
        &dir,
        "borrower",
        &[format!("tcp-connect:lender@127.0.0.1:{port}")],
        3000,
        &["--insecure-tcp"],
    );
    // The writer and service threads exist once the connection does.
    let deadline = Instant::now() + Duration::from_secs(30);
    let writers = loop {
        let w = cpus_of_threads(lender.pid(), "fabric-tcp-writ");
        if !w.is_empty() {
            break w;
        }
        assert!(Instant::now() < deadline, "the lender never connected");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(writers, vec![writer.to_string()]);
    assert_eq!(
        cpus_of_threads(lender.pid(), "fabric-tcp-serv"),
        vec![reader.to_string()]
    );
    assert_eq!(
        cpus_of_threads(lender.pid(), "fabric-tcp"),
        vec![reader.to_string()]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cpus_the_node_may_not_use_or_malformed_lists_are_refused() {
    let dir = scratch("tcp-cpus-bad");
    let port = port(1);
    for (cpus, want) in [("100000,0", "CPU 100000"), ("0", "WRITER,READER")] {
        let out = Command::new(exe())
            .args(["node", "--name", "x", "--insecure-tcp", "--state"])
            .arg(dir.join("x"))
            .arg("--fabric")
            .arg(format!("tcp-listen:y@127.0.0.1:{port}"))
            .args(["--tcp-cpus", cpus])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--tcp-cpus {cpus} accepted");
        assert!(err.contains(want), "--tcp-cpus {cpus}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
