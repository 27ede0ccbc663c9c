//! Linux's own nvme driver in two QEMU guests at once, each on a different SR-IOV virtual
//! function of the same devices, borrowed by two borrower hosts (`devlend node` processes on
//! their own shm links; `devlend borrow NAME --vfio-user SOCK` serves each VF to its guest).
//!
//! The lender adds two devices with two VFs each: `nvme0` with private namespaces and `nvme1`
//! with a shared one. Each guest gets VF k of both, so one pair of boots covers both modes:
//! - private: both guests write their own bytes at the same namespace offset, and each reads
//!   its own back after the other has written; each guest's bytes are then in VF k's slice of
//!   `nvme0`'s image;
//! - shared: each guest writes its own bytes at its own offset and reads the other guest's
//!   bytes there with O_DIRECT; both are in `nvme1`'s image.
//!
//! Needs root (QEMU provisioning); skipped with a printed reason otherwise, except under `CI`,
//! where it fails instead.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{scratch, NodeProcess};
use devlend_testkit::guest::{self, GuestDisk, GuestSpec};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// TotalVFs of the model: a private namespace is slice k of `TotalVFs + 1`.
const SLICES: u64 = 9;
/// `nvme0`'s image: 9 slices of 8 MiB.
const PRIVATE_IMAGE: u64 = SLICES * (8 << 20);
/// `nvme1`'s image (whole, shared by every VF); a size the guests tell apart from a slice.
const SHARED_IMAGE: u64 = 16 << 20;
/// Where both guests write in their private namespaces.
const PRIVATE_OFFSET: u64 = 1 << 20;
const LEN: usize = 64 << 10;
const PASS: &str = "VM-SHARING-PASS";

/// Where guest `k` writes in the shared namespace.
fn shared_offset(k: u64) -> u64 {
    (k * 2) << 20
}

/// What guest `k` writes (`yes TEXT | head -c LEN` in the guest).
fn text(mode: &str, k: u64) -> String {
    format!("vm-sharing-{mode}-guest{k}")
}

fn bytes(mode: &str, k: u64) -> Vec<u8> {
    let line = format!("{}\n", text(mode, k));
    line.bytes().cycle().take(LEN).collect()
}

/// The `/test.sh` of guest `k` (the other is `other`).
fn script(k: u64, other: u64) -> String {
    let private_sectors = PRIVATE_IMAGE / SLICES / 512;
    let shared_sectors = SHARED_IMAGE / 512;
    let count = LEN / 4096;
    let p_seek = PRIVATE_OFFSET / 4096;
    let s_mine = shared_offset(k) / 4096;
    let s_other = shared_offset(other) / 4096;
    format!(
        r#"#!/bin/sh
fail() {{ echo "VM-SHARING-FAIL: $*"; exit 1; }}
disk() {{ for b in /sys/block/nvme*n1; do [ "$(cat "$b/size" 2>/dev/null)" = "$1" ] && {{ basename "$b"; return 0; }}; done; return 1; }}
i=0
until P=$(disk {private_sectors}) && S=$(disk {shared_sectors}); do
    i=$((i + 1)); [ $i -gt 600 ] && fail "no private and shared namespace after 60 s: $(ls /sys/block)"
    sleep 0.1
done
for d in $P $S; do
    echo "BOUND $d driver=$(basename $(readlink /sys/block/$d/device/device/driver)) sectors=$(cat /sys/block/$d/size)"
done
yes {mine_private} | head -c {len} > /tmp/private
yes {mine_shared} | head -c {len} > /tmp/shared
yes {other_shared} | head -c {len} > /tmp/other
dd if=/tmp/private of=/dev/$P bs=4096 seek={p_seek} count={count} oflag=direct 2>/dev/null || fail "private write"
dd if=/tmp/shared of=/dev/$S bs=4096 seek={s_mine} count={count} oflag=direct 2>/dev/null || fail "shared write"
echo "WROTE private and shared"
# The other guest writes its private bytes before its shared ones: once they are read here, both
# of its writes are done.
i=0
until dd if=/dev/$S of=/tmp/got bs=4096 skip={s_other} count={count} iflag=direct 2>/dev/null && cmp -s /tmp/other /tmp/got; do
    i=$((i + 1)); [ $i -gt 2400 ] && fail "guest{other}'s bytes never appeared in the shared namespace"
    sleep 0.1
done
echo "SHARED-READ guest{other}'s bytes (after $i earlier reads without them)"
dd if=/dev/$S of=/tmp/back bs=4096 skip={s_mine} count={count} iflag=direct 2>/dev/null || fail "shared read"
cmp -s /tmp/shared /tmp/back || fail "own shared bytes differ"
dd if=/dev/$P of=/tmp/back bs=4096 skip={p_seek} count={count} iflag=direct 2>/dev/null || fail "private read"
cmp -s /tmp/private /tmp/back || fail "private read-back differs after guest{other} wrote at the same offset"
echo "PRIVATE-OWN own bytes read back"
echo "{pass}"
"#,
        mine_private = text("private", k),
        mine_shared = text("shared", k),
        other_shared = text("shared", other),
        len = LEN,
        pass = PASS,
    )
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn read_at(path: &Path, offset: u64) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; LEN];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn two_guests_share_devices_through_vfs_private_and_shared() {
    let Some(assets) = guest::provision_for_tests(&repo_root()).expect("provisioning VM assets")
    else {
        return;
    };
    let dir = Scratch(scratch("vm-sharing"));
    let d = &dir.0;
    let fabrics = [d.join("fabric-1"), d.join("fabric-2")];
    let lender = NodeProcess::start(d, "lender", &[&fabrics[0], &fabrics[1]], 5000);
    let private = d.join("private.img");
    let shared = d.join("shared.img");
    for (name, image, size, mode) in [
        ("nvme0", &private, PRIVATE_IMAGE, "private"),
        ("nvme1", &shared, SHARED_IMAGE, "shared"),
    ] {
        lender.ctl_ok(&[
            "add",
            "nvme",
            "--name",
            name,
            "--size",
            &size.to_string(),
            "--image",
            image.to_str().unwrap(),
            "--vfs",
            "2",
            "--vf-namespaces",
            mode,
            // Its own subsystem (Linux refuses two controllers with one cntlid in a subsystem,
            // and VF k of either device is controller k).
            "--serial",
            &format!("DEVLEND-{name}"),
        ]);
    }
    let mut specs = Vec::new();
    let mut borrowers = Vec::new();
    for (k, other) in [(1u64, 2u64), (2, 1)] {
        let name = format!("guesthost{k}");
        let node = NodeProcess::start(d, &name, &[&fabrics[(k - 1) as usize]], 5000);
        let mut disks = Vec::new();
        for dev in ["nvme0", "nvme1"] {
            let vf = format!("{dev}-vf{k}");
            node.wait_peer_lists(&vf);
            let socket = d.join(format!("{name}-{dev}.sock"));
            let out = node.ctl_ok(&["borrow", &vf, "--vfio-user", socket.to_str().unwrap()]);
            assert!(out.contains(&vf), "{out}");
            disks.push(GuestDisk::VfioUser { socket });
        }
        assert_eq!(
            lender.borrower_of(&format!("nvme0-vf{k}")).as_deref(),
            Some(name.as_str())
        );
        let mut spec = GuestSpec::new(
            assets.clone(),
            disks.remove(0),
            script(k, other),
            &d.join(format!("guest{k}")),
        );
        spec.more_disks = disks;
        spec.timeout = Duration::from_secs(360);
        specs.push(spec);
        borrowers.push(node);
    }
    // Both guests at once.
    let outs: Vec<guest::GuestOutput> = std::thread::scope(|s| {
        let running: Vec<_> = specs
            .iter()
            .map(|spec| s.spawn(move || guest::boot(spec).expect("boot")))
            .collect();
        running.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (k, out) in (1..).zip(&outs) {
        for l in out.console.iter().filter(|l| {
            ["BOUND", "WROTE", "SHARED-READ", "PRIVATE-OWN", "VM-SHARING"]
                .iter()
                .any(|p| l.starts_with(p))
        }) {
            println!("guest{k}: {}", l.trim_end());
        }
        println!("guest{k} ran {:?}", out.elapsed);
    }
    for (k, out) in (1..).zip(&outs) {
        let t = out.transcript();
        assert!(!out.timed_out, "guest{k} timed out\n{t}");
        assert!(
            out.passed() && out.lines_with(PASS).next().is_some(),
            "guest{k} failed\n{t}"
        );
        let bound: Vec<&str> = out.lines_with("BOUND ").collect();
        assert_eq!(bound.len(), 2, "guest{k}: {bound:?}");
        assert!(
            bound.iter().all(|l| l.contains("driver=nvme ")),
            "guest{k}: Linux's nvme driver on both VFs: {bound:?}"
        );
    }
    // The lender's images: each guest's private bytes in its VF's slice, both guests' shared
    // bytes at their offsets of the one namespace.
    let slice = PRIVATE_IMAGE / SLICES;
    for k in [1u64, 2] {
        assert!(
            read_at(&private, slice * k + PRIVATE_OFFSET) == bytes("private", k),
            "guest{k}'s private bytes are not in VF {k}'s slice of the image"
        );
        assert!(
            read_at(&shared, shared_offset(k)) == bytes("shared", k),
            "guest{k}'s shared bytes are not in the shared image"
        );
    }
    assert!(
        read_at(&private, PRIVATE_OFFSET).iter().all(|&b| b == 0),
        "the PF's slice is untouched"
    );
    drop(borrowers);
    drop(lender);
}
