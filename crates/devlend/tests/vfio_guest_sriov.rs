//! SR-IOV on a real device: QEMU's own emulated NVMe controller with two virtual functions,
//! each VF bound to `vfio-pci` and lent through devlend's VFIO backend to a different borrower
//! process at the same time, in a QEMU guest (TCG) with a virtual IOMMU.
//!
//! One boot, driven by `/test.sh` inside the guest:
//! 1. the PF (left on the guest's nvme driver) gets its VFs from
//!    `devlend sriov nvme-online PF --vfs 2`: the primary controller's flexible resources
//!    released (one PF reset), `sriov_numvfs`, then each VF's secondary controller given 3
//!    queues and 2 interrupts and set online with Virtualization Management commands;
//! 2. one `devlend node` lender on two `shm` links lends VF 1 and VF 2
//!    (`devlend add vfio VF --bind`, each VF in its own IOMMU group);
//! 3. borrower A (link 1, VF 1) writes its pattern, flushes, and then keeps reading it back;
//!    borrower B (link 2, VF 2) loops write/flush/read-back rounds in its own LBA range. Both
//!    run at once: the script waits until each has done two rounds;
//! 4. A is killed with `kill -9`; B goes on: after it sees the kill, it completes two more
//!    rounds and a final write/flush/read-back of a fixed pattern, and returns its VF;
//! 5. VF 1's lease expires, the lender resets it through VFIO and offers it again; a third
//!    borrower reads A's completed write back through VF 1;
//! 6. the lender stops: both VFs are unbound again; the PF's controller is still live.
//!
//! The two VFs share one namespace (QEMU's `nvme-ns` with `shared=on`, attached to every
//! controller of the subsystem); each borrower has its own LBA range. From the host, after
//! the guest powers off: A's and B's final patterns are in the disk image, where each wrote.
//!
//! The lease is 20 s (see `LEASE_MS`).
//!
//! Needs root (QEMU provisioning); skips with a reason when not root and `CI` is unset.

mod guest_lending;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devlend_nvme_driver::Controller;
use devlend_pci::PciFunction;

const A_OFFSET: u64 = 32 << 20;
const B_OFFSET: u64 = 64 << 20;
const PATTERN_LEN: usize = 256 << 10;
const DISK_BYTES: u64 = 128 << 20;
const A_SEED: u8 = 0x5a;
const B_FINAL_SEED: u8 = 0xb7;
/// The lease (lender and borrowers). Generous: with 5 s, on this loaded 2-core host (TCG, several
/// guests at once), the surviving borrower's lease once expired 11 s after the killed one's VF
/// came back, its heartbeats (every lease/4) not having reached the lender in time.
const LEASE_MS: u64 = 20_000;
/// Rounds B completes after it has seen A killed.
const ROUNDS_AFTER_KILL: u32 = 2;

fn pattern(seed: u8) -> Vec<u8> {
    guest_lending::pattern(PATTERN_LEN, 2, seed)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("borrower") => guest_borrower(&args[2..]),
        _ => host_test(),
    }
}

// ---------------------------------------------------------------------------------------------
// Inside the guest
// ---------------------------------------------------------------------------------------------

fn borrow(fabric: &Path, device: &str) -> (devlend_lending::Node, Arc<dyn PciFunction>) {
    let mut cfg = devlend_lending::NodeConfig::new(format!("borrower-{device}"));
    cfg.lease = Duration::from_millis(LEASE_MS);
    // Under TCG on a loaded host the lender can take seconds to answer while it maps the other
    // borrower's pool into its VF's IOMMU domain: a generous bound, and a smaller pool (the
    // patterns are 1 MiB).
    cfg.request_timeout = Duration::from_secs(60);
    cfg.dma_pool_bytes = 16 << 20;
    guest_lending::borrow_on_shm(fabric, device, cfg)
}

fn write_check(c: &Controller, offset: u64, seed: u8) {
    let p = pattern(seed);
    c.write_at(offset, &p).expect("write");
    c.flush().expect("flush");
    read_check(c, offset, seed);
}

fn read_check(c: &Controller, offset: u64, seed: u8) {
    let mut back = vec![0u8; PATTERN_LEN];
    c.read_at(offset, &mut back).expect("read");
    assert!(
        back == pattern(seed),
        "read back at {offset:#x} is not the pattern of seed {seed:#x}"
    );
}

/// `borrower DIR DEVICE hold|steady|readback MARKER`
fn guest_borrower(args: &[String]) {
    let [dir, device, role, marker] = args else {
        panic!("usage: borrower DIR DEVICE ROLE MARKER");
    };
    let (node, f) = borrow(Path::new(dir), device);
    println!("SRIOV-BORROWED {device} ({role}): {}", f.describe());
    let c = Controller::new(f.clone()).expect("driver bring-up on the VF");
    println!("SRIOV-UP {device}");
    match role.as_str() {
        // A: its write, then read-back rounds until it is killed.
        "hold" => {
            write_check(&c, A_OFFSET, A_SEED);
            println!("SRIOV-A-WROTE");
            for round in 1u64.. {
                read_check(&c, A_OFFSET, A_SEED);
                println!("SRIOV-A-ROUND {round}");
            }
        }
        // B: write/flush/read-back rounds; after `MARKER` appears (A was killed), a few more
        // and a final fixed pattern.
        "steady" => {
            let mut after_kill = 0;
            for round in 1u32.. {
                let seed = (round as u8).wrapping_mul(17) | 1;
                write_check(&c, B_OFFSET, seed);
                println!("SRIOV-B-ROUND {round}");
                if Path::new(marker).exists() {
                    after_kill += 1;
                    if after_kill > ROUNDS_AFTER_KILL {
                        break;
                    }
                }
            }
            write_check(&c, B_OFFSET, B_FINAL_SEED);
            println!("SRIOV-B-DONE {after_kill} rounds after the kill");
        }
        // Reads A's completed write back through the reset VF.
        "readback" => {
            read_check(&c, A_OFFSET, A_SEED);
            println!("SRIOV-READBACK-OK");
        }
        other => panic!("unknown role {other}"),
    }
    c.shutdown().expect("shutdown");
    drop(c);
    drop(f);
    node.give_back(device).expect("returning the device");
}

// ---------------------------------------------------------------------------------------------
// On the host
// ---------------------------------------------------------------------------------------------

const SCRIPT: &str = r#"#!/bin/sh
export PATH=/devlend:$PATH
fail() {
    echo "SRIOV-FAIL $*"
    for f in /tmp/*.log; do sed "s|^|$(basename $f): |" $f; done
    exit 1
}
drv() { d=/sys/bus/pci/devices/$1/driver; [ -e $d ] && basename $(readlink $d) || echo none; }
waitfor() { # FILE PATTERN WHAT
    i=0
    until grep -q "$2" $1 2>/dev/null; do
        i=$((i + 1)); [ $i -gt 1200 ] && fail "$3"; sleep 0.5
    done
}
for m in $(cat /lib/vfio/order); do insmod /lib/vfio/$m.ko || fail "insmod $m"; done
PF=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/class)" = 0x010802 ] && [ -e $d/sriov_totalvfs ] && PF=$(basename $d)
done
[ -n "$PF" ] || fail "no NVMe PF with SR-IOV"
P=/sys/bus/pci/devices/$PF
echo "SRIOV-PF $PF driver=$(drv $PF) totalvfs=$(cat $P/sriov_totalvfs) numvfs=$(cat $P/sriov_numvfs)"
DEVLEND_LOG=info devlend sriov nvme-online $PF --vfs 2 >/tmp/online.out 2>/tmp/online.log \
    || fail "devlend sriov nvme-online"
sed 's/^/SRIOV-ONLINE /' /tmp/online.out
sed 's/^/SRIOV-ONLINE-LOG /' /tmp/online.log
DEVLEND_LOG=info devlend sriov nvme-online $PF --vfs 2 >/tmp/again.out 2>/tmp/again.log \
    || fail "devlend sriov nvme-online, again"
echo "SRIOV-AGAIN $(grep -c 'Virtualization Management' /tmp/again.log) commands"
VF1=$(basename $(readlink $P/virtfn0))
VF2=$(basename $(readlink $P/virtfn1))
for v in $PF $VF1 $VF2; do
    echo "SRIOV-GROUP $v $(basename $(readlink /sys/bus/pci/devices/$v/iommu_group)) driver=$(drv $v)"
done
DEVLEND_LOG=info devlend node --name lender --state /tmp/l --fabric shm:/tmp/f1 --fabric shm:/tmp/f2 \
    --lease-ms 20000 2>>/tmp/lender.log &
LENDER=$!
i=0
until devlend status --state /tmp/l >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -gt 600 ] && fail "lender did not start"; sleep 0.1
done
devlend add vfio $VF1 --bind --name vf1 --state /tmp/l || fail "devlend add vfio $VF1"
devlend add vfio $VF2 --bind --name vf2 --state /tmp/l || fail "devlend add vfio $VF2"
echo "SRIOV-DRIVERS-LENT $(drv $VF1) $(drv $VF2) pf=$(drv $PF)"
devlend list --state /tmp/l | sed 's/^/SRIOV-LIST /'
touch /tmp/a.log /tmp/b.log
tail -f /tmp/a.log /tmp/b.log &
TAIL=$!
sriov-guest borrower /tmp/f1 vf1 hold /tmp/killed >/tmp/a.log 2>&1 &
A=$!
sriov-guest borrower /tmp/f2 vf2 steady /tmp/killed >/tmp/b.log 2>&1 &
B=$!
waitfor /tmp/a.log "SRIOV-A-ROUND 2$" "borrower A never did two rounds"
waitfor /tmp/b.log "SRIOV-B-ROUND 2$" "borrower B never did two rounds"
kill -0 $A || fail "borrower A died"
echo "SRIOV-CONCURRENT $(grep -c SRIOV-A-ROUND /tmp/a.log) $(grep -c SRIOV-B-ROUND /tmp/b.log)"
kill -9 $A
wait $A
touch /tmp/killed
echo "SRIOV-KILLED"
wait $B || fail "borrower B failed after A was killed"
grep SRIOV-B-DONE /tmp/b.log || fail "borrower B did not finish"
waitfor /tmp/lender.log "vf1 is back from borrower-vf1 (lease" "vf1's lease never expired"
echo "SRIOV-EXPIRED $(grep 'vf1 is back from borrower-vf1 (lease' /tmp/lender.log | head -1)"
sriov-guest borrower /tmp/f1 vf1 readback - >/tmp/c.log 2>&1 || fail "readback borrower"
grep SRIOV-READBACK-OK /tmp/c.log
kill $TAIL
kill $LENDER
wait $LENDER
echo "SRIOV-DRIVERS-AFTER $(drv $VF1) $(drv $VF2) pf=$(drv $PF) state=$(cat $P/nvme/*/state)"
grep -i "reset failed" /tmp/lender.log && fail "a VFIO reset failed"
grep "Could not unbind VFIO group" /tmp/lender.log && fail "a VF's group did not leave its container"
sed 's/^/lender: /' /tmp/lender.log | tail -20
sync
echo SRIOV-ALL-DONE
"#;

fn host_test() {
    let start = Instant::now();
    let Some(rig) = guest_lending::HostRig::new("vfio_guest_sriov") else {
        return;
    };
    let me = std::env::current_exe().unwrap();
    let (bundle, disk) = rig.bundle(
        &[
            (Path::new(env!("CARGO_BIN_EXE_devlend")), "devlend/devlend"),
            (&me, "devlend/sriov-guest"),
        ],
        SCRIPT,
        DISK_BYTES,
    );
    let mut qemu = rig.qemu(&bundle);
    qemu.args(["-device", "nvme-subsys,id=subsys0,nqn=devlend-sriov"])
        // 6 flexible queues and 4 interrupts: 3 queues (admin + 2 I/O) and 2 vectors per VF.
        .args([
            "-device",
            "nvme,id=nvme0,serial=sriov-pf,subsys=subsys0,sriov_max_vfs=2,\
             sriov_vq_flexible=6,sriov_vi_flexible=4",
        ])
        .arg("-drive")
        .arg(format!("file={},if=none,id=d0,format=raw", disk.display()))
        .args(["-device", "nvme-ns,drive=d0,bus=nvme0,nsid=1,shared=on"]);
    let run = devlend_testkit::guest::bundle::run(qemu, Duration::from_secs(1200))
        .expect("running the guest");
    let transcript = run.transcript();
    guest_lending::assert_markers(
        &run,
        &[
            "SRIOV-DRIVERS-LENT vfio-pci vfio-pci pf=nvme",
            "SRIOV-CONCURRENT",
            "SRIOV-KILLED",
            "SRIOV-B-DONE",
            "SRIOV-EXPIRED",
            "SRIOV-READBACK-OK",
            "SRIOV-DRIVERS-AFTER none none pf=nvme state=live",
            "SRIOV-AGAIN 0 commands",
            "SRIOV-ALL-DONE",
        ],
        "SRIOV-FAIL",
    );
    assert!(run.passed(), "the guest script failed:\n{transcript}");
    // Each VF went online with its resources, and each is its own function to devlend.
    let online: Vec<&str> = run.lines_with("SRIOV-ONLINE ").collect();
    assert_eq!(online.len(), 2, "{transcript}");
    assert!(
        online
            .iter()
            .all(|l| l.contains("online, 3 queues, 2 interrupts")),
        "{online:?}"
    );
    let listed = run
        .console
        .iter()
        .filter(|l| l.contains("SRIOV-LIST vf") && l.contains("class 010802"))
        .count();
    assert_eq!(
        listed, 2,
        "devlend list shows both VFs as NVMe functions:\n{transcript}"
    );

    // The bytes each borrower wrote are in the image behind the shared namespace.
    guest_lending::assert_on_disk(
        &disk,
        &[
            (
                A_OFFSET,
                pattern(A_SEED),
                "borrower A (killed after its flush)",
            ),
            (B_OFFSET, pattern(B_FINAL_SEED), "borrower B"),
        ],
    );
    rig.remove();
    println!(
        "vfio_guest_sriov passed in {:.0} s",
        start.elapsed().as_secs_f64()
    );
}
