//! The client against a fake QMP server (a thread speaking the protocol from a script): greeting
//! and negotiation, typed replies, error replies, events queued between replies, and the
//! refusals (not QEMU, not answering, closed).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devlend_qmp::command::{DeviceAdd, DeviceDel, QomList, QueryMemdev, QueryPci};
use devlend_qmp::{Error, Qmp};

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 3, "minor": 1, "major": 11}, "package": "test"}, "capabilities": ["oob"]}}"#;

fn socket_path(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("devlend-qmp-{tag}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// Serves one client: sends `greeting` (if any), then for each received command calls `answer`
/// with the parsed request and writes the lines it returns (`{id}` is replaced by the
/// request's id). Returns the commands it saw.
fn fake(
    path: &PathBuf,
    greeting: Option<&'static str>,
    mut answer: impl FnMut(&serde_json::Value) -> Vec<String> + Send + 'static,
) -> JoinHandle<Vec<serde_json::Value>> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut w = stream.try_clone().unwrap();
        if let Some(g) = greeting {
            writeln!(w, "{g}").unwrap();
        }
        let mut seen = Vec::new();
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let req: serde_json::Value = serde_json::from_str(&line).unwrap();
            for out in answer(&req) {
                let out = out.replace("{id}", &req["id"].to_string());
                if writeln!(w, "{out}").is_err() {
                    break;
                }
            }
            seen.push(req);
        }
        seen
    })
}

fn ok(reply: &str) -> Vec<String> {
    // One line on the wire, whatever the test's layout.
    let reply = reply.replace('\n', " ");
    vec![format!(r#"{{"return": {reply}, "id": {{id}}}}"#)]
}

/// A fake QEMU on socket `tag` that negotiates and answers every other command with
/// `answer(command name)`, and a client connected to it.
fn fake_qemu(
    tag: &str,
    mut answer: impl FnMut(&str) -> Vec<String> + Send + 'static,
) -> (PathBuf, JoinHandle<Vec<serde_json::Value>>, Qmp) {
    let path = socket_path(tag);
    let server = fake(&path, Some(GREETING), move |req| {
        match req["execute"].as_str().unwrap() {
            "qmp_capabilities" => ok("{}"),
            other => answer(other),
        }
    });
    let qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
    (path, server, qmp)
}

/// The commands the fake server saw, once its client is gone; removes its socket.
fn finish(path: &PathBuf, server: JoinHandle<Vec<serde_json::Value>>) -> Vec<serde_json::Value> {
    let seen = server.join().unwrap();
    let _ = std::fs::remove_file(path);
    seen
}

#[test]
fn negotiates_and_returns_typed_replies() {
    let (path, server, mut qmp) = fake_qemu("typed", |command| match command {
        "query-memdev" => ok(r#"[{"id": "mem", "size": 536870912, "share": true, "merge": true}]"#),
        "qom-list" => ok(
            r#"[{"name": "type", "type": "string"}, {"name": "rp1", "type": "child<pcie-root-port>"}]"#,
        ),
        "query-pci" => ok(
            r#"[{"bus": 0, "devices": [{"bus": 0, "slot": 16, "function": 0, "qdev_id": "rp1",
                "class_info": {"class": 1540, "desc": "PCI bridge"}, "id": {"vendor": 6966, "device": 12},
                "pci_bridge": {"bus": {"number": 0, "secondary": 1, "subordinate": 1},
                  "devices": [{"bus": 1, "slot": 0, "function": 0, "qdev_id": "nv", "class_info": {"class": 264}, "id": {"vendor": 7660, "device": 1}}]}}]}]"#,
        ),
        other => panic!("unexpected {other}"),
    });
    assert_eq!(qmp.greeting().version.qemu.major, 11);
    let mem = qmp.execute(&QueryMemdev).unwrap();
    assert_eq!(mem[0].id.as_deref(), Some("mem"));
    assert_eq!(mem[0].share, Some(true));
    let props = qmp
        .execute(&QomList {
            path: "/machine/peripheral".into(),
        })
        .unwrap();
    assert_eq!(props[1].type_, "child<pcie-root-port>");
    let pci = qmp.execute(&QueryPci).unwrap();
    let bridge = pci[0].devices[0].pci_bridge.as_ref().unwrap();
    assert_eq!(bridge.bus.secondary, 1);
    assert_eq!(bridge.devices[0].address(), "0000:01:00.0");
    drop(qmp);
    let seen = finish(&path, server);
    let names: Vec<&str> = seen
        .iter()
        .map(|r| r["execute"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["qmp_capabilities", "query-memdev", "qom-list", "query-pci"]
    );
    // Commands without arguments carry none; the others carry theirs.
    assert!(seen[1].get("arguments").is_none());
    assert_eq!(seen[2]["arguments"]["path"], "/machine/peripheral");
}

#[test]
fn device_add_sends_the_json_form_and_errors_are_typed() {
    let (path, server, mut qmp) = fake_qemu("add", |command| {
        match command {
        "device_add" => vec![
            r#"{"error": {"class": "GenericError", "desc": "Duplicate device ID 'dl0'"}, "id": {id}}"#.into(),
        ],
        other => panic!("unexpected {other}"),
    }
    });
    let add = DeviceAdd::vfio_user_pci("dl0", Some("rp1"), std::path::Path::new("/tmp/x.sock"));
    match qmp.execute(&add) {
        Err(Error::Command {
            command,
            class,
            desc,
        }) => {
            assert_eq!(command, "device_add");
            assert_eq!(class, "GenericError");
            assert!(desc.contains("Duplicate"), "{desc}");
        }
        other => panic!("expected a command error, got {other:?}"),
    }
    drop(qmp);
    let seen = finish(&path, server);
    assert_eq!(
        seen[1]["arguments"],
        serde_json::json!({"driver": "vfio-user-pci", "id": "dl0", "bus": "rp1",
            "socket": {"path": "/tmp/x.sock", "type": "unix"}})
    );
}

#[test]
fn events_between_replies_are_queued_and_waited_for() {
    let (path, server, mut qmp) = fake_qemu("events", |command| {
        match command {
        // The event that answers device_del arrives before the reply of the next command.
        "device_del" => ok("{}"),
        "query-memdev" => vec![
            r#"{"event": "RTC_CHANGE", "data": {"offset": 1}, "timestamp": {"seconds": 1, "microseconds": 0}}"#.into(),
            r#"{"event": "DEVICE_DELETED", "data": {"device": "dl0", "path": "/machine/peripheral/dl0"}, "timestamp": {"seconds": 1, "microseconds": 2}}"#.into(),
            r#"{"return": [], "id": {id}}"#.into(),
        ],
        other => panic!("unexpected {other}"),
    }
    });
    qmp.execute(&DeviceDel { id: "dl0".into() }).unwrap();
    assert!(qmp.execute(&QueryMemdev).unwrap().is_empty());
    let ev = qmp
        .wait_event(Duration::from_secs(1), |e| {
            e.device_deleted().and_then(|d| d.device).as_deref() == Some("dl0")
        })
        .unwrap()
        .expect("the queued DEVICE_DELETED");
    assert_eq!(ev.device_deleted().unwrap().path, "/machine/peripheral/dl0");
    // The other event stays queued; no further event comes, so the wait times out.
    let start = Instant::now();
    assert!(qmp
        .wait_event(Duration::from_millis(200), |e| e.event == "DEVICE_DELETED")
        .unwrap()
        .is_none());
    assert!(start.elapsed() >= Duration::from_millis(200));
    let rest = qmp.take_events();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].event, "RTC_CHANGE");
    drop(qmp);
    finish(&path, server);
}

#[test]
fn a_socket_that_is_not_qemu_is_refused() {
    let path = socket_path("notqemu");
    let server = fake(&path, Some(r#"{"hello": "I am not QEMU"}"#), |_| Vec::new());
    match Qmp::connect(&path, Duration::from_secs(5)) {
        Err(e @ Error::NotQmp { .. }) => {
            assert!(e.to_string().contains("is not a QEMU QMP socket"), "{e}")
        }
        other => panic!("expected NotQmp, got {:?}", other.err()),
    }
    finish(&path, server);
}

#[test]
fn a_silent_socket_times_out() {
    let path = socket_path("silent");
    let listener = UnixListener::bind(&path).unwrap();
    let start = Instant::now();
    match Qmp::connect(&path, Duration::from_millis(300)) {
        Err(e @ Error::Timeout { .. }) => {
            assert!(e.to_string().contains("did not answer"), "{e}")
        }
        other => panic!("expected a timeout, got {:?}", other.err()),
    }
    assert!(start.elapsed() >= Duration::from_millis(300));
    drop(listener);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_peer_that_closes_and_a_missing_socket_are_errors() {
    let path = socket_path("closes");
    let listener = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (s, _): (UnixStream, _) = listener.accept().unwrap();
        drop(s);
    });
    assert!(matches!(
        Qmp::connect(&path, Duration::from_secs(5)),
        Err(Error::Closed { .. })
    ));
    t.join().unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(matches!(
        Qmp::connect(&path, Duration::from_secs(1)),
        Err(Error::Connect { .. })
    ));
}

#[test]
fn a_socket_made_after_the_first_look_is_waited_for() {
    let path = socket_path("late");
    // The fake QEMU makes its socket only once the client has looked and found nothing, so
    // the connection can succeed only if the client looks again.
    let mut server = None;
    let mut looks = 0;
    let qmp = Qmp::connect_when_made(
        &path,
        Duration::from_secs(60),
        Duration::from_secs(5),
        |_| {
            looks += 1;
            if server.is_none() {
                server = Some(fake(&path, Some(GREETING), |req| {
                    match req["execute"].as_str().unwrap() {
                        "qmp_capabilities" => ok("{}"),
                        _ => Vec::new(),
                    }
                }));
            }
        },
    )
    .expect("connects once the socket is made");
    assert_eq!(qmp.greeting().version.qemu.major, 11);
    assert_eq!(looks, 1, "one missing look, then connected");
    drop(qmp);
    let seen = finish(&path, server.expect("the socket was made"));
    assert_eq!(seen[0]["execute"], "qmp_capabilities");
}

#[test]
fn a_socket_never_made_is_refused_after_the_wait_and_a_dead_one_at_once() {
    let path = socket_path("never");
    let mut looks = 0;
    match Qmp::connect_when_made(
        &path,
        Duration::from_millis(200),
        Duration::from_secs(5),
        |_| looks += 1,
    ) {
        Err(e @ Error::NotMade { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("no QMP socket at"), "{msg}");
            assert!(msg.contains("-qmp unix:"), "{msg}");
        }
        other => panic!("expected NotMade, got {:?}", other.err()),
    }
    assert!(looks >= 1);

    // A socket file nobody listens on (its QEMU exited): refused without waiting.
    let listener = UnixListener::bind(&path).unwrap();
    drop(listener);
    let mut looks = 0;
    assert!(matches!(
        Qmp::connect_when_made(
            &path,
            Duration::from_secs(60),
            Duration::from_secs(5),
            |_| looks += 1
        ),
        Err(Error::Connect { .. })
    ));
    assert_eq!(looks, 0);
    let _ = std::fs::remove_file(&path);
}
