//! A borrowed device lent into a *running* VM and taken back while it runs: `devlend borrow
//! NAME --vm QMP` hot-adds it through QEMU's QMP onto a free PCIe root port, `devlend return`
//! asks the guest to release it. The guests are QEMU 11 TCG q35 machines started with guest
//! RAM in a shareable memfd, a QMP socket, free `pcie-root-port`s and no NVMe device; they run
//! a command loop on their console ([`guest::live`]), so every step is checked from inside
//! the guest while it keeps running.
//!
//! - `hot_add_return_move_two_devices_reclaim_lender_death`: two guests (A with ACPI hot-plug,
//!   B with native PCIe hot-plug). Hot-add into A, data check, orderly return (gone in A,
//!   offered again); the same device into B, which reads what A wrote; a second device into
//!   B at once; the lender's forced take-back of it released by B's guest in order; then the
//!   lender killed under B: I/O errors in B, B and QEMU keep running, `return` takes the dead
//!   device out of B.
//! - `a_guest_that_ignores_the_unplug_request_gets_a_surprise_removal`: a guest with no
//!   hot-plug driver; `return --grace 3s` ends in a surprise removal, said so; the lender's
//!   `reclaim --grace 3s` of a second device ends with it cut off and revoked.
//! - `an_unplug_asked_before_the_guest_booted_is_asked_again`: a VM stopped in its firmware
//!   gets the device, `return` asks for it back while the VM is still stopped, then the guest
//!   boots (its kernel clears the pending ACPI event, so that request is lost); `return` asks
//!   again and the guest releases the device in order.
//! - `refusals_borrow_nothing`: no guest boots (QEMU paused before its firmware): a socket
//!   that is not QEMU, one that does not answer, a missing one, guest RAM that is not
//!   shareable, an unknown port, an occupied port, a device id in use, an id QEMU would not
//!   take; each refused with its reason, nothing borrowed.
//!
//! Needs root (to provision QEMU with `scripts/vm-setup.sh` the first time); skipped with a
//! printed reason otherwise, except under `CI`, where it fails instead.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{scratch, NodeProcess};
use devlend_testkit::guest::live::{Hotplug, LiveGuest, LiveSpec, POWER_ON_AND_RESCAN};
use devlend_testkit::guest::{self, VmAssets};

/// The two-VM test's devices, with the serials `devlend add nvme` gives (one per device:
/// Linux refuses a second controller with a serial it has, `Duplicate cntlid 0 ... rejecting`).
const TWO_VM_DEVICES: [(&str, Option<&str>); 2] = [("nvme0", None), ("nvme1", None)];

/// Generous: TCG guests on a machine shared with other builds.
const GUEST_CMD: Duration = Duration::from_secs(120);
/// Size of each lent disk.
const DISK_BYTES: u64 = 64 << 20;
/// Where the guests write their patterns (4 KiB blocks).
const PATTERN_BLOCK: u64 = 2048;
const PATTERN_BYTES: usize = 64 << 10;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A lender lending NVMe devices (name, serial) on images in a scratch directory, and a
/// borrower node on the same shm link.
struct Rig {
    dir: PathBuf,
    lender: NodeProcess,
    borrower: NodeProcess,
    /// Last: removed after the nodes are killed.
    _scratch: Scratch,
}

/// Removes a scratch directory when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Rig {
    /// Devices are (name, serial); `None`: the serial `devlend add` gives.
    fn new(tag: &str, devices: &[(&str, Option<&str>)]) -> Rig {
        let dir = scratch(tag);
        let fabric = dir.join("fabric");
        let lender = NodeProcess::start(&dir, "lender", &[&fabric], 5000);
        // At info: the tests read what it did to the VM from its log.
        let mut cmd = Command::new(common::exe());
        cmd.env("DEVLEND_LOG", "info");
        let shm = format!("shm:{}", fabric.display());
        let borrower = NodeProcess::start_with(cmd, &dir, "borrower", &[shm], 5000, &[]);
        for (name, serial) in devices {
            let image = dir.join(format!("{name}.img"));
            let size = DISK_BYTES.to_string();
            let mut args = vec![
                "add",
                "nvme",
                "--name",
                name,
                "--size",
                &size,
                "--image",
                image.to_str().unwrap(),
            ];
            if let Some(serial) = serial {
                args.extend(["--serial", serial]);
            }
            lender.ctl_ok(&args);
        }
        borrower.wait_peer_lists(devices.first().map_or("", |d| d.0));
        Rig {
            _scratch: Scratch(dir.clone()),
            dir,
            lender,
            borrower,
        }
    }

    fn image(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.img"))
    }

    /// `devlend borrow NAME --vm QMP --json` on the borrower; the reply, or the failure.
    fn borrow_into(&self, name: &str, guest: &LiveGuest) -> serde_json::Value {
        let out = self.borrower.ctl(&[
            "borrow",
            name,
            "--vm",
            guest.qmp().to_str().unwrap(),
            "--json",
        ]);
        assert!(
            out.status.success(),
            "borrow {name} --vm failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            guest.transcript()
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The borrower's device names (status).
    fn borrowed(&self) -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&self.borrower.ctl_ok(&["status", "--json"])).unwrap();
        v["borrowed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// The lender's `list` line state of `name`.
    fn lender_state(&self, name: &str) -> String {
        let v: serde_json::Value =
            serde_json::from_str(&self.lender.ctl_ok(&["list", "--json"])).unwrap();
        let d = v["local"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .cloned()
            .unwrap();
        d["state"].as_str().unwrap().to_string()
    }
}

fn ok(guest: &mut LiveGuest, cmd: &str) -> Vec<String> {
    let out = guest.run(cmd, GUEST_CMD).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.ok(),
        "guest command failed ({}): {cmd}\n{}\n{}",
        out.status,
        out.text(),
        guest.transcript()
    );
    out.lines
}

/// Shell: the block device (e.g. `nvme1n1`) whose controller has serial `serial`, waited for
/// at most a minute.
fn wait_disk_cmd(serial: &str) -> String {
    format!(
        "i=0; while :; do for b in /sys/block/nvme*; do [ -e \"$b/device/serial\" ] && [ \"$(tr -d ' ' < \"$b/device/serial\" 2>/dev/null)\" = {serial} ] && {{ basename \"$b\"; exit 0; }}; done; i=$((i+1)); [ $i -gt 600 ] && exit 1; sleep 0.1; done"
    )
}

/// Shell: waits (at most a minute) until no block device has serial `serial`.
fn wait_gone_cmd(serial: &str) -> String {
    format!(
        "i=0; while :; do f=0; for b in /sys/block/nvme*; do [ -e \"$b/device/serial\" ] && [ \"$(tr -d ' ' < \"$b/device/serial\" 2>/dev/null)\" = {serial} ] && f=1; done; [ $f = 0 ] && exit 0; i=$((i+1)); [ $i -gt 600 ] && exit 1; sleep 0.1; done"
    )
}

/// The serials of the guest's NVMe disks now.
fn serials(guest: &mut LiveGuest) -> Vec<String> {
    ok(
        guest,
        "for b in /sys/block/nvme*; do [ -e \"$b/device/serial\" ] && tr -d ' ' < \"$b/device/serial\" 2>/dev/null; done; true",
    )
}

/// The serial of the controller the guest found at the guest address in a `borrow --vm`
/// reply, once the controller is live (before, sysfs may show `(efault)`); waits at most a
/// minute.
fn serial_at(guest: &mut LiveGuest, reply: &serde_json::Value) -> String {
    let addr = reply["vm"]["guest_address"]
        .as_str()
        .unwrap_or_else(|| panic!("no guest address in {reply}"));
    let lines = ok(
        guest,
        &format!("i=0; while :; do for c in /sys/bus/pci/devices/{addr}/nvme/nvme*; do [ \"$(cat \"$c/state\" 2>/dev/null)\" = live ] && s=$(tr -d ' ' < \"$c/serial\") && [ -n \"$s\" ] && {{ echo \"$s\"; exit 0; }}; done; i=$((i+1)); [ $i -gt 600 ] && exit 1; sleep 0.1; done"),
    );
    let serial = lines
        .last()
        .cloned()
        .unwrap_or_else(|| panic!("no serial at {addr}"));
    assert!(
        !serial.is_empty() && serial.chars().all(|c| c.is_ascii_alphanumeric()),
        "not a serial at {addr}: {lines:?}"
    );
    serial
}

/// Shell: no block device has serial `serial` right now.
fn absent_cmd(serial: &str) -> String {
    format!(
        "for b in /sys/block/nvme*; do [ -e \"$b/device/serial\" ] && [ \"$(tr -d ' ' < \"$b/device/serial\" 2>/dev/null)\" = {serial} ] && exit 1; done; exit 0"
    )
}

/// The guest's disk for `serial` (waits for it).
fn disk(guest: &mut LiveGuest, serial: &str) -> String {
    let lines = ok(guest, &wait_disk_cmd(serial));
    lines
        .last()
        .cloned()
        .unwrap_or_else(|| panic!("no disk for {serial}"))
}

/// Shell: writes `tag`'s pattern with O_DIRECT at [`PATTERN_BLOCK`] of `/dev/DISK`, reads it
/// back and compares.
fn write_check_cmd(disk: &str, tag: &str) -> String {
    let count = PATTERN_BYTES / 4096;
    format!(
        "yes {tag} | head -c {PATTERN_BYTES} > /tmp/p-{tag} && dd if=/tmp/p-{tag} of=/dev/{disk} bs=4096 seek={PATTERN_BLOCK} count={count} oflag=direct 2>/dev/null && dd if=/dev/{disk} of=/tmp/b-{tag} bs=4096 skip={PATTERN_BLOCK} count={count} iflag=direct 2>/dev/null && cmp /tmp/p-{tag} /tmp/b-{tag} && echo WRITE-CHECK-OK"
    )
}

/// Shell: reads [`PATTERN_BLOCK`] of `/dev/DISK` with O_DIRECT and compares with `tag`'s
/// pattern.
fn read_check_cmd(disk: &str, tag: &str) -> String {
    let count = PATTERN_BYTES / 4096;
    format!(
        "yes {tag} | head -c {PATTERN_BYTES} > /tmp/p-{tag} && dd if=/dev/{disk} of=/tmp/r-{tag} bs=4096 skip={PATTERN_BLOCK} count={count} iflag=direct 2>/dev/null && cmp /tmp/p-{tag} /tmp/r-{tag} && echo READ-CHECK-OK"
    )
}

fn pattern(tag: &str) -> Vec<u8> {
    format!("{tag}\n")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(PATTERN_BYTES)
        .collect()
}

/// The lender's image holds `tag`'s pattern where the guest wrote it.
fn assert_image_has(image: &Path, tag: &str) {
    let mut f = std::fs::File::open(image).unwrap();
    f.seek(SeekFrom::Start(PATTERN_BLOCK * 4096)).unwrap();
    let mut got = vec![0u8; PATTERN_BYTES];
    f.read_exact(&mut got).unwrap();
    assert!(
        got == pattern(tag),
        "{} does not hold the guest's {tag} pattern",
        image.display()
    );
}

/// QEMU answers on its QMP socket (held only for the check: QEMU serves one QMP client).
fn qemu_answers(guest: &LiveGuest) -> bool {
    match devlend_qmp::Qmp::connect(guest.qmp(), Duration::from_secs(10)) {
        Ok(mut q) => q.execute(&devlend_qmp::command::QueryPci).is_ok(),
        Err(_) => false,
    }
}

/// The QEMU devices on the VM's PCI buses, by id.
fn qemu_device_ids(guest: &LiveGuest) -> Vec<String> {
    let mut q = devlend_qmp::Qmp::connect(guest.qmp(), Duration::from_secs(10)).unwrap();
    let pci = q.execute(&devlend_qmp::command::QueryPci).unwrap();
    fn walk(d: &[devlend_qmp::command::PciDeviceInfo], out: &mut Vec<String>) {
        for x in d {
            out.push(x.qdev_id.clone());
            if let Some(b) = &x.pci_bridge {
                walk(&b.devices, out);
            }
        }
    }
    let mut out = Vec::new();
    for b in &pci {
        walk(&b.devices, &mut out);
    }
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn boot(assets: &VmAssets, dir: &Path, hotplug: Hotplug, name: &str) -> LiveGuest {
    let t = Instant::now();
    let g = LiveGuest::boot(&LiveSpec::new(assets.clone(), dir, hotplug), name)
        .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "guest {name} ({hotplug:?} hot-plug) up after {:?}",
        t.elapsed()
    );
    g
}

#[test]
fn hot_add_return_move_two_devices_reclaim_lender_death() {
    let Some(assets) = guest::provision_for_tests(&repo_root()).expect("provisioning VM assets")
    else {
        return;
    };
    let start = Instant::now();
    let mut rig = Rig::new("vm-hotplug", &TWO_VM_DEVICES);
    // Two guests, booted side by side; both run to the end of the test.
    let (mut a, mut b) = std::thread::scope(|s| {
        let a = s.spawn(|| boot(&assets, &rig.dir, Hotplug::Acpi, "a"));
        let b = s.spawn(|| boot(&assets, &rig.dir, Hotplug::Native, "b"));
        (a.join().unwrap(), b.join().unwrap())
    });

    // 1. Hot-add into A: the disk appears, a pattern written with O_DIRECT reads back and is in
    //    the lender's image.
    let before = serials(&mut a);
    let t = Instant::now();
    let reply = rig.borrow_into("nvme0", &a);
    assert_eq!(reply["vm"]["device_id"], "devlend-nvme0", "{reply}");
    let s0 = serial_at(&mut a, &reply);
    assert!(!before.contains(&s0), "{s0} was there before: {before:?}");
    let disk_a = disk(&mut a, &s0);
    println!(
        "A: nvme0 is /dev/{disk_a} {:?} after the borrow",
        t.elapsed()
    );
    let out = ok(&mut a, &write_check_cmd(&disk_a, "from-guest-a"));
    assert!(out.iter().any(|l| l == "WRITE-CHECK-OK"), "{out:?}");
    assert_image_has(&rig.image("nvme0"), "from-guest-a");
    assert_eq!(rig.lender_state("nvme0"), "lent");
    let status = rig.borrower.ctl_ok(&["status"]);
    assert!(
        status.contains(&format!("in the VM at {}", a.qmp().display())),
        "{status}"
    );

    // Orderly return: the guest releases it, the command says so, the disk is gone in A and
    // the lender offers the device again.
    let t = Instant::now();
    let ret = rig.borrower.ctl(&["return", "nvme0"]);
    assert!(ret.status.success(), "{}", stderr(&ret));
    assert!(stdout(&ret).contains("orderly"), "{}", stdout(&ret));
    println!("return from A (ACPI): {:?}", t.elapsed());
    ok(&mut a, &wait_gone_cmd(&s0));
    assert!(!qemu_device_ids(&a).contains(&"devlend-nvme0".to_string()));
    assert_eq!(rig.lender_state("nvme0"), "available");
    assert!(rig.borrowed().is_empty());

    // 2. The same device into B, which reads what A wrote; A keeps running.
    ok(&mut b, &absent_cmd(&s0));
    rig.borrow_into("nvme0", &b);
    let disk_b0 = disk(&mut b, &s0);
    let out = ok(&mut b, &read_check_cmd(&disk_b0, "from-guest-a"));
    assert!(out.iter().any(|l| l == "READ-CHECK-OK"), "{out:?}");
    assert_eq!(ok(&mut a, "echo a-still-here"), ["a-still-here"]);

    // Two devices in B at once (distinct serials), each with its own data.
    let before = serials(&mut b);
    let reply = rig.borrow_into("nvme1", &b);
    let s1 = serial_at(&mut b, &reply);
    assert!(!before.contains(&s1), "{s1} was there before: {before:?}");
    assert_ne!(
        s0, s1,
        "two devices with one serial: Linux refuses the second"
    );
    let disk_b1 = disk(&mut b, &s1);
    assert_ne!(disk_b0, disk_b1);
    let out = ok(&mut b, &write_check_cmd(&disk_b1, "from-guest-b"));
    assert!(out.iter().any(|l| l == "WRITE-CHECK-OK"), "{out:?}");
    let out = ok(&mut b, &read_check_cmd(&disk_b0, "from-guest-a"));
    assert!(out.iter().any(|l| l == "READ-CHECK-OK"), "{out:?}");
    assert_image_has(&rig.image("nvme1"), "from-guest-b");
    let mut held = rig.borrowed();
    held.sort();
    assert_eq!(held, ["nvme0", "nvme1"]);

    // 5. The lender takes nvme1 back by force: the borrower asks B to release it, B's guest
    //    does (native hot-plug: pciehp's 5 s attention-button delay), the lease comes back
    //    before the grace ends: "given back", not revoked.
    let t = Instant::now();
    let rec = rig
        .lender
        .ctl(&["reclaim", "nvme1", "--grace", "40s", "--json"]);
    assert!(rec.status.success(), "{}", stderr(&rec));
    let v: serde_json::Value = serde_json::from_slice(&rec.stdout).unwrap();
    println!("reclaim of nvme1 from B (native): {:?} ({v})", t.elapsed());
    assert_eq!(
        v["returned"], true,
        "the guest did not release it in order: {v}"
    );
    ok(&mut b, &wait_gone_cmd(&s1));
    assert!(!qemu_device_ids(&b).contains(&"devlend-nvme1".to_string()));
    assert_eq!(rig.lender_state("nvme1"), "available");
    assert_eq!(rig.borrowed(), ["nvme0"]);
    // nvme0 in B is untouched.
    let out = ok(&mut b, &read_check_cmd(&disk_b0, "from-guest-a"));
    assert!(out.iter().any(|l| l == "READ-CHECK-OK"), "{out:?}");

    // 3. The lender dies with nvme0 in B: B's I/O fails, B's guest still answers and its QEMU
    //    keeps running.
    rig.lender.kill9();
    let io = b
        .run(
            &format!("dd if=/dev/{disk_b0} of=/dev/null bs=4096 count=16 iflag=direct"),
            GUEST_CMD,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !io.ok(),
        "I/O on a device whose lender died must fail: {io:?}"
    );
    println!("B after the lender died: {}", io.text());
    assert_eq!(ok(&mut b, "echo b-still-here"), ["b-still-here"]);
    assert!(b.is_running(), "QEMU B died\n{}", b.transcript());
    assert!(qemu_answers(&b), "QEMU B does not answer QMP");
    // The borrower still shows it, in B, with its lease ended.
    let st: serde_json::Value =
        serde_json::from_str(&rig.borrower.ctl_ok(&["status", "--json"])).unwrap();
    let dead = st["borrowed"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "nvme0")
        .cloned()
        .unwrap_or_else(|| panic!("nvme0 not in the borrower's status: {st}"));
    assert_eq!(dead["state"], "lease_ended", "{dead}");
    assert_eq!(dead["vm"]["device_id"], "devlend-nvme0", "{dead}");
    // `return` takes the dead device out of B (the guest releases it), and says the lease
    // had ended already.
    let ret = rig.borrower.ctl(&["return", "nvme0", "--json"]);
    assert!(ret.status.success(), "{}", stderr(&ret));
    let v: serde_json::Value = serde_json::from_slice(&ret.stdout).unwrap();
    assert_eq!(v["removal"], "orderly", "{v}");
    assert_eq!(v["lease_had_ended"], true, "{v}");
    ok(&mut b, &wait_gone_cmd(&s0));
    assert!(rig.borrowed().is_empty());
    assert!(b.is_running() && a.is_running(), "a QEMU died");
    assert_eq!(ok(&mut a, "echo a-at-the-end"), ["a-at-the-end"]);
    assert!(
        !b.qemu_stderr().contains("Assertion") && !a.qemu_stderr().contains("Assertion"),
        "{}\n{}",
        a.transcript(),
        b.transcript()
    );
    println!("whole run: {:?}", start.elapsed());
}

#[test]
fn a_guest_that_ignores_the_unplug_request_gets_a_surprise_removal() {
    let Some(assets) = guest::provision_for_tests(&repo_root()).expect("provisioning VM assets")
    else {
        return;
    };
    let start = Instant::now();
    let rig = Rig::new(
        "vm-hotplug-ignore",
        &[("nvme0", Some("DLHPX")), ("nvme1", Some("DLHPY"))],
    );
    let mut c = boot(&assets, &rig.dir, Hotplug::Ignored, "c");
    ok(&mut c, &absent_cmd("DLHPX"));
    let reply = rig.borrow_into("nvme0", &c);
    // No hot-plug driver in this guest: power the slot and rescan by hand.
    let address = reply["vm"]["guest_address"].as_str().unwrap().to_string();
    let bus = address.rsplit_once(':').unwrap().0;
    ok(&mut c, &format!("BUS={bus}; {POWER_ON_AND_RESCAN}"));
    let disk0 = disk(&mut c, "DLHPX");
    let out = ok(&mut c, &write_check_cmd(&disk0, "guest-c"));
    assert!(out.iter().any(|l| l == "WRITE-CHECK-OK"), "{out:?}");
    assert_image_has(&rig.image("nvme0"), "guest-c");

    let t = Instant::now();
    let ret = rig
        .borrower
        .ctl(&["return", "nvme0", "--grace", "3s", "--json"]);
    let took = t.elapsed();
    assert!(ret.status.success(), "{}", stderr(&ret));
    let v: serde_json::Value = serde_json::from_slice(&ret.stdout).unwrap();
    assert_eq!(v["removal"], "surprise", "{v}");
    assert!(
        v["removal_text"]
            .as_str()
            .unwrap()
            .contains("surprise removal"),
        "{v}"
    );
    assert!(took >= Duration::from_secs(3), "{took:?}");
    println!("return --grace 3s from an ignoring guest: {took:?}");
    assert_eq!(rig.lender_state("nvme0"), "available");
    assert!(rig.borrowed().is_empty());
    // QEMU keeps the device, its unplug pending: a second borrow into this VM under the same
    // id is refused, and nothing is borrowed.
    assert!(qemu_device_ids(&c).contains(&"devlend-nvme0".to_string()));
    let again = rig
        .borrower
        .ctl(&["borrow", "nvme0", "--vm", c.qmp().to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already has a device with id devlend-nvme0"),
        "{}",
        stderr(&again)
    );
    assert_eq!(rig.lender_state("nvme0"), "available");
    // The guest's driver sees the device fail; the guest and QEMU keep running.
    let io = c
        .run(
            &format!("dd if=/dev/{disk0} of=/dev/null bs=4096 count=16 iflag=direct"),
            GUEST_CMD,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!io.ok(), "I/O after a surprise removal must fail: {io:?}");
    assert_eq!(ok(&mut c, "echo c-still-here"), ["c-still-here"]);
    assert!(c.is_running(), "QEMU died\n{}", c.transcript());
    assert!(qemu_answers(&c));

    // The lender's forced take-back from this guest: the borrower asks the VM to release the
    // device, the guest ignores that too, so it is cut off and the lender revokes it at the
    // end of the grace.
    let reply = rig.borrow_into("nvme1", &c);
    assert_eq!(reply["vm"]["port"], "rp2", "{reply}");
    let address = reply["vm"]["guest_address"].as_str().unwrap().to_string();
    let bus = address.rsplit_once(':').unwrap().0;
    ok(&mut c, &format!("BUS={bus}; {POWER_ON_AND_RESCAN}"));
    let disk1 = disk(&mut c, "DLHPY");
    let out = ok(&mut c, &write_check_cmd(&disk1, "guest-c-second"));
    assert!(out.iter().any(|l| l == "WRITE-CHECK-OK"), "{out:?}");
    let rec = rig
        .lender
        .ctl(&["reclaim", "nvme1", "--grace", "3s", "--json"]);
    assert!(rec.status.success(), "{}", stderr(&rec));
    let v: serde_json::Value = serde_json::from_slice(&rec.stdout).unwrap();
    assert_eq!(v["returned"], false, "{v}");
    assert_eq!(rig.lender_state("nvme1"), "available");
    wait_for_log(
        &rig.dir.join("borrower.log"),
        "nvme1 taken back by its lender; it left its VM: the guest did not release it",
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !rig.borrowed().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the borrower still lists {:?}",
            rig.borrowed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let io = c
        .run(
            &format!("dd if=/dev/{disk1} of=/dev/null bs=4096 count=16 iflag=direct"),
            GUEST_CMD,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!io.ok(), "I/O after a revoked take-back must fail: {io:?}");
    assert_eq!(ok(&mut c, "echo c-still-here"), ["c-still-here"]);
    assert!(c.is_running(), "QEMU died\n{}", c.transcript());
    assert!(qemu_answers(&c));
    println!("whole run: {:?}", start.elapsed());
}

/// Waits until `log` contains `what`.
fn wait_for_log(log: &Path, what: &str) {
    let deadline = Instant::now() + GUEST_CMD;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(what) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never said {what:?}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_unplug_asked_before_the_guest_booted_is_asked_again() {
    let Some(assets) = guest::provision_for_tests(&repo_root()).expect("provisioning VM assets")
    else {
        return;
    };
    let start = Instant::now();
    let rig = Rig::new("vm-hotplug-early", &[("nvme0", Some("DLHPE"))]);
    let mut spec = LiveSpec::new(assets.clone(), &rig.dir, Hotplug::Acpi);
    spec.paused = true;
    let mut g = LiveGuest::boot(&spec, "e").unwrap_or_else(|e| panic!("{e}"));
    // Run the firmware until it has numbered the root ports' buses, and stop the VM there,
    // long before its OS boots. (A VM that never ran has a virtual clock at 0, where QEMU
    // never takes a second request: not the case of a VM someone started.)
    g.control("cont").unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + GUEST_CMD;
    loop {
        let pci = g.control("query-pci").unwrap_or_else(|e| panic!("{e}"));
        let numbered = pci.as_array().into_iter().flatten().any(|bus| {
            bus["devices"].as_array().into_iter().flatten().any(|d| {
                d["qdev_id"] == "rp1" && d["pci_bridge"]["bus"]["secondary"].as_u64() > Some(0)
            })
        });
        if numbered {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the firmware never numbered rp1's bus"
        );
    }
    g.control("stop").unwrap_or_else(|e| panic!("{e}"));
    // Hot-added while the firmware is stopped: the guest will find it when it boots.
    rig.borrow_into("nvme0", &g);
    let log = rig.dir.join("borrower.log");
    let ret = std::thread::scope(|s| {
        let ret = s.spawn(|| {
            rig.borrower
                .ctl(&["return", "nvme0", "--grace", "300s", "--json"])
        });
        // The first request reaches QEMU while the guest is still paused ...
        wait_for_log(&log, "devlend-nvme0: asked the guest to release it");
        // ... and the guest's kernel, booting, clears its event: only a second one is seen.
        g.resume().unwrap_or_else(|e| panic!("{e}"));
        ret.join().unwrap()
    });
    assert!(ret.status.success(), "{}", stderr(&ret));
    let v: serde_json::Value = serde_json::from_slice(&ret.stdout).unwrap();
    assert_eq!(v["removal"], "orderly", "{v}\n{}", g.transcript());
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("devlend-nvme0: the guest has not released it yet; asked again"),
        "{text}"
    );
    assert!(!qemu_device_ids(&g).contains(&"devlend-nvme0".to_string()));
    assert_eq!(rig.lender_state("nvme0"), "available");
    assert!(rig.borrowed().is_empty());
    // The guest let go of it and keeps running.
    ok(&mut g, &absent_cmd("DLHPE"));
    assert!(g.is_running(), "QEMU died\n{}", g.transcript());
    println!("whole run: {:?}", start.elapsed());
}

/// A QEMU that never runs its guest (`-S`): enough for QMP.
struct PausedQemu {
    child: std::process::Child,
    qmp: PathBuf,
}

impl PausedQemu {
    fn start(assets: &VmAssets, dir: &Path, name: &str, shared_ram: bool, extra: &[&str]) -> Self {
        let qmp = dir.join(format!("{name}.qmp"));
        let mut cmd = Command::new(&assets.qemu);
        cmd.args(["-S", "-accel", "tcg", "-nodefaults", "-display", "none"])
            .args(["-m", "128"]);
        if shared_ram {
            cmd.args([
                "-machine",
                "q35,memory-backend=mem",
                "-object",
                "memory-backend-memfd,id=mem,size=128M,share=on",
            ]);
        } else {
            cmd.args(["-machine", "q35"]);
        }
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=on", qmp.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().unwrap();
        // server=on,wait=on: QEMU creates the socket before anything else and waits for us.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !qmp.exists() {
            assert!(Instant::now() < deadline, "QEMU made no QMP socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        PausedQemu { child, qmp }
    }
}

impl Drop for PausedQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.qmp);
    }
}

#[test]
fn refusals_borrow_nothing() {
    let Some(assets) = guest::provision_for_tests(&repo_root()).expect("provisioning VM assets")
    else {
        return;
    };
    let rig = Rig::new("vm-hotplug-refusals", &[("nvme0", None)]);
    let refused = |qmp: &Path, extra: &[&str], why: &str| {
        let mut args = vec!["borrow", "nvme0", "--vm", qmp.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = rig.borrower.ctl(&args);
        assert!(
            !out.status.success(),
            "borrow {extra:?} into {} should be refused",
            qmp.display()
        );
        assert!(
            stderr(&out).contains(why),
            "expected {why:?} in: {}",
            stderr(&out)
        );
        // Nothing borrowed: the lender still offers it, the borrower holds nothing.
        assert_eq!(rig.lender_state("nvme0"), "available");
        assert!(rig.borrowed().is_empty());
    };

    // A socket that is not QEMU's.
    let not_qemu = rig.dir.join("not-qemu.sock");
    let listener = UnixListener::bind(&not_qemu).unwrap();
    let talker = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = writeln!(s, "SSH-2.0-OpenSSH_9.6");
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf);
    });
    refused(&not_qemu, &[], "is not a QEMU QMP socket");
    talker.join().unwrap();
    // One that never answers.
    let silent = rig.dir.join("silent.sock");
    let _silent_listener = UnixListener::bind(&silent).unwrap();
    refused(&silent, &[], "did not answer");
    // None at all.
    refused(&rig.dir.join("missing.sock"), &[], "missing.sock");

    // Plain RAM: the lender's device could not reach guest memory.
    let plain = PausedQemu::start(
        &assets,
        &rig.dir,
        "plain",
        false,
        &["-device", "pcie-root-port,id=rp1,chassis=1,bus=pcie.0"],
    );
    refused(&plain.qmp, &[], "is not shareable");
    drop(plain);

    let vm = PausedQemu::start(
        &assets,
        &rig.dir,
        "vm",
        true,
        &[
            "-device",
            "pcie-root-port,id=rp1,chassis=1,bus=pcie.0",
            "-device",
            "pcie-root-port,id=rp2,chassis=2,bus=pcie.0",
            "-device",
            "virtio-rng-pci,id=rng,bus=rp2",
        ],
    );
    refused(&vm.qmp, &["--port", "rp9"], "no hot-pluggable port rp9");
    refused(&vm.qmp, &["--port", "rp2"], "port rp2 of the VM");
    refused(
        &vm.qmp,
        &["--id", "rng"],
        "already has a device with id rng",
    );
    refused(&vm.qmp, &["--id", "9lives"], "cannot be a QEMU device id");
    // And the same VM takes it on the free port: the refusals left nothing behind.
    let out = rig.borrower.ctl(&[
        "borrow",
        "nvme0",
        "--vm",
        vm.qmp.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["vm"]["port"], "rp1", "{v}");
    assert_eq!(rig.lender_state("nvme0"), "lent");
    drop(vm);
    // QEMU is gone: the return finds the VM without it.
    let ret = rig.borrower.ctl(&["return", "nvme0", "--json"]);
    assert!(ret.status.success(), "{}", stderr(&ret));
    let v: serde_json::Value = serde_json::from_slice(&ret.stdout).unwrap();
    assert_eq!(v["removal"], "already_gone", "{v}");
    assert_eq!(rig.lender_state("nvme0"), "available");
}
