//! The management protocol and machine output: typed `--json` replies (sizes as numbers, a
//! `state` on devices), JSON errors with stable codes, version mismatches refused on both
//! sides, the socket's limits (garbage, a huge line, many connections, an idle client), and
//! `devlend wait`.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{exe, json_error, scratch_dir, NodeProcess};
use serde_json::Value;

/// Sends raw bytes on the node's socket (in a thread: the node may stop reading) and returns
/// the reply line it got.
fn raw(state: &Path, bytes: Vec<u8>) -> Value {
    let stream = UnixStream::connect(state.join("node.sock")).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        // The node may close before all is sent (a huge line): that is its answer. Then the
        // client's side ends, as a client that sent all it had does.
        let _ = w.write_all(&bytes);
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    let mut answer = Vec::new();
    let mut r = &stream;
    let mut byte = [0u8; 1];
    while r.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
        answer.push(byte[0]);
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    writer.join().unwrap();
    serde_json::from_slice(&answer)
        .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&answer)))
}

fn code(reply: &Value) -> &str {
    assert_eq!(reply["v"], 1, "{reply}");
    assert_eq!(reply["ok"], false, "{reply}");
    reply["error"]["code"].as_str().unwrap_or("")
}

/// Waits (on the real condition) until `status` answers again.
fn answers(node: &NodeProcess) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !node.ctl(&["status"]).status.success() {
        assert!(Instant::now() < deadline, "the node stopped answering");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn replies_are_typed_and_errors_carry_stable_codes() {
    let dir = scratch_dir("schema-typed");
    let fabric = dir.join("fabric");
    let lender = NodeProcess::start(&dir, "lender", &[&fabric], 3000);
    let borrower = NodeProcess::start(&dir, "borrower", &[&fabric], 3000);
    let image = dir.join("disk.img");
    let image_arg = image.to_str().unwrap();

    let added = lender.ctl_json(&[
        "add", "nvme", "--image", image_arg, "--size", "4M", "--name", "nvme0",
    ]);
    let dev = &added["devices"][0];
    assert_eq!(dev["name"], "nvme0", "{added}");
    assert_eq!(dev["state"], "available", "{added}");
    assert_eq!(dev["size_bytes"].as_u64(), Some(4 << 20), "{added}");

    let waited = borrower.ctl_json(&["wait", "--peer", "lender", "--device", "nvme0"]);
    assert_eq!(waited["node"], "borrower", "{waited}");
    assert_eq!(waited["device"], "nvme0", "{waited}");

    let list = borrower.ctl_json(&["list"]);
    let peer = &list["peer"][0];
    assert_eq!(
        (&peer["name"], &peer["state"], &peer["owner"]),
        (
            &Value::from("nvme0"),
            &Value::from("available"),
            &Value::from("lender")
        ),
        "{list}"
    );
    assert_eq!(peer["size_bytes"].as_u64(), Some(4 << 20), "{list}");

    let borrowed = borrower.ctl_json(&["borrow", "nvme0"]);
    assert_eq!(borrowed["owner"], "lender", "{borrowed}");
    assert!(borrowed["lease"].is_u64(), "{borrowed}");
    let list = borrower.ctl_json(&["list"]);
    assert_eq!(list["peer"][0]["state"], "borrowed", "{list}");
    let list = lender.ctl_json(&["list"]);
    assert_eq!(list["local"][0]["state"], "lent", "{list}");
    assert_eq!(list["local"][0]["borrower"], "borrower", "{list}");
    let status = borrower.ctl_json(&["status"]);
    assert_eq!(status["borrowed"][0]["state"], "borrowed", "{status}");
    assert_eq!(status["links"][0]["link"], "up", "{status}");
    let status = lender.ctl_json(&["status"]);
    assert!(status["leases"][0]["expires_in_ms"].is_u64(), "{status}");
    let lspci = borrower.ctl_json(&["lspci"]);
    assert_eq!(lspci["devices"][0]["name"], "nvme0", "{lspci}");
    let metrics = borrower.ctl_json(&["top", "--iterations", "1"]);
    assert_eq!(metrics["node"], "borrower", "{metrics}");

    // Errors: JSON on stderr, with their codes.
    assert_eq!(borrower.ctl_err(&["borrow", "nosuch"]).0, "not_found");
    assert_eq!(lender.ctl_err(&["check", "nvme0"]).0, "not_held");
    assert_eq!(
        lender
            .ctl_err(&["add", "nvme", "--image", image_arg, "--name", "nvme0"])
            .0,
        "already_exists"
    );
    assert_eq!(borrower.ctl_err(&["list", "--no-such-flag"]).0, "usage");
    let (code, msg) = borrower.ctl_err(&["wait", "--device", "nosuch", "--timeout", "200ms"]);
    assert_eq!(code, "timeout", "{msg}");
    assert!(msg.contains("nosuch"), "{msg}");
    let nowhere = dir.join("nowhere");
    let out = Command::new(exe())
        .args(["status", "--json", "--state"])
        .arg(&nowhere)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(json_error(&out.stderr).0, "unreachable");
    let out = common::keygen(&dir.join("keys"), &["--json"], &["a", "b"]);
    let keys: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(keys["hosts"], serde_json::json!(["a", "b"]));

    let returned = borrower.ctl_json(&["return", "nvme0"]);
    assert_eq!(returned["name"], "nvme0", "{returned}");
}

#[test]
fn another_protocol_version_is_refused_on_both_sides() {
    let dir = scratch_dir("schema-version");
    let fabric = dir.join("fabric");
    let node = NodeProcess::start(&dir, "n", &[&fabric], 3000);
    // A client of another version (or of none): the node says so.
    let r = raw(&node.state, b"{\"verb\":\"status\"}\n".to_vec());
    assert_eq!(code(&r), "version_mismatch", "{r}");
    let r = raw(&node.state, b"{\"v\":2,\"verb\":\"status\"}\n".to_vec());
    assert_eq!(code(&r), "version_mismatch", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("version 1"),
        "{r}"
    );
    let ok = raw(&node.state, b"{\"v\":1,\"verb\":\"status\"}\n".to_vec());
    assert_eq!(ok["ok"], true, "{ok}");
    assert_eq!(ok["result"]["name"], "n", "{ok}");
    drop(node);

    // A node of another version (or an older one without "v"): the client says so.
    for answer in [
        "{\"v\":2,\"ok\":true,\"result\":{}}\n",
        "{\"ok\":true,\"result\":{\"name\":\"old\"}}\n",
    ] {
        let state = dir.join("fake");
        std::fs::create_dir_all(&state).unwrap();
        let sock = state.join("node.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut line = [0u8; 4096];
            let _ = s.read(&mut line);
            s.write_all(answer.as_bytes()).unwrap();
        });
        let out = Command::new(exe())
            .args(["status", "--json", "--state"])
            .arg(&state)
            .output()
            .unwrap();
        server.join().unwrap();
        assert!(!out.status.success());
        let (code, msg) = json_error(&out.stderr);
        assert_eq!(code, "version_mismatch", "{msg}");
    }
}

#[test]
fn the_socket_answers_garbage_and_long_lines_and_keeps_serving() {
    let dir = scratch_dir("schema-garbage");
    let fabric = dir.join("fabric");
    let node = NodeProcess::start(&dir, "n", &[&fabric], 3000);
    for garbage in [
        b"hello\n".to_vec(),
        vec![0xff, 0xfe, 0x00, b'\n'],
        b"{\"v\":1,\"verb\":\"no_such_verb\"}\n".to_vec(),
        b"{\"v\":1,\"verb\":\"borrow\"}\n".to_vec(),
        b"[1,2,3]\n".to_vec(),
        // No newline, then the client closes its side: what it sent is the request.
        b"{\"v\":1,".to_vec(),
    ] {
        let r = raw(&node.state, garbage.clone());
        assert_eq!(code(&r), "bad_request", "{:?}: {r}", garbage);
    }
    // A line longer than 64 KiB, with or without its newline, is refused as such.
    let mut huge = vec![b'x'; 1 << 20];
    let r = raw(&node.state, huge.clone());
    assert_eq!(code(&r), "line_too_long", "{r}");
    huge.push(b'\n');
    let r = raw(&node.state, huge);
    assert_eq!(code(&r), "line_too_long", "{r}");
    // A line just under the limit is read whole (and is not a request).
    let mut long = vec![b' '; 60 * 1024];
    long.extend_from_slice(b"{\"v\":1,\"verb\":\"status\"}\n");
    let r = raw(&node.state, long);
    assert_eq!(r["ok"], true, "{r}");

    // While one client is stuck mid-line, others are answered.
    let stuck = UnixStream::connect(node.state.join("node.sock")).unwrap();
    (&stuck).write_all(b"{\"v\":1,").unwrap();
    assert!(node.ctl(&["status"]).status.success());
    drop(stuck);
    answers(&node);
}

#[test]
fn the_socket_caps_connections_and_closes_idle_ones() {
    let dir = scratch_dir("schema-limits");
    let fabric = dir.join("fabric");
    let mut cmd = Command::new(exe());
    cmd.env("DEVLEND_MGMT_MAX_CONNECTIONS", "4")
        .env("DEVLEND_MGMT_IDLE_MS", "120000");
    let node = NodeProcess::start_with(
        cmd,
        &dir,
        "capped",
        &[format!("shm:{}", fabric.display())],
        3000,
        &[],
    );
    // Four idle connections fill the node; the fifth is told it is busy, and so is a verb.
    let idle: Vec<UnixStream> = (0..4)
        .map(|_| UnixStream::connect(node.state.join("node.sock")).unwrap())
        .collect();
    let r = raw(&node.state, b"{\"v\":1,\"verb\":\"status\"}\n".to_vec());
    assert_eq!(code(&r), "busy", "{r}");
    let (c, msg) = node.ctl_err(&["status"]);
    assert_eq!(c, "busy", "{msg}");
    // Once they go, it serves again.
    drop(idle);
    answers(&node);
    drop(node);

    // A connection that sends nothing is told so and closed; the node goes on.
    let mut cmd = Command::new(exe());
    cmd.env("DEVLEND_MGMT_IDLE_MS", "200");
    let node = NodeProcess::start_with(
        cmd,
        &dir,
        "idle",
        &[format!("shm:{}", dir.join("fabric2").display())],
        3000,
        &[],
    );
    let silent = UnixStream::connect(node.state.join("node.sock")).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut all = String::new();
    (&silent).read_to_string(&mut all).unwrap();
    let r: Value = serde_json::from_str(all.trim()).unwrap();
    assert_eq!(code(&r), "idle_timeout", "{r}");
    answers(&node);
}

#[test]
fn wait_blocks_until_the_node_answers() {
    let dir = scratch_dir("schema-wait");
    let state = dir.join("late");
    // Nothing there yet: a short wait fails with a timeout that says why.
    let out = Command::new(exe())
        .args(["wait", "--json", "--timeout", "100ms", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let (code, msg) = json_error(&out.stderr);
    assert_eq!(code, "timeout", "{msg}");
    assert!(msg.contains("does not answer"), "{msg}");
    // A wait started before the node returns once the node is up.
    let waiter = Command::new(exe())
        .args(["wait", "--timeout", "120s", "--state"])
        .arg(&state)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _node = NodeProcess::start(&dir, "late", &[&dir.join("fabric")], 3000);
    let out = waiter.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("node late is up"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
