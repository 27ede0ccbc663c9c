//! A hostile VMM, as a process of its own (this test), against a real borrower: `devlend node`
//! borrows an NVMe device and serves it over vfio-user (`devlend borrow --vfio-user`); the VMM
//! offers guest RAM that could be truncated under the mapping (an unsealed memfd), RAM shorter
//! than the range it is to back (a sealed memfd too small), and a malformed message. Each is
//! refused; a sealed memfd that covers its range is mapped and can then no longer be truncated;
//! the device still answers on the same connection, and the node stays up with the device
//! borrowed. (The same in-process against the server alone: `crates/vfio-user/tests/
//! bad_input.rs`, whose raw client this test shares.)

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

#[path = "../../vfio-user/tests/common/mod.rs"]
mod vfio_client;

mod common;

use common::{borrowed_names, ShmLender};
use vfio_client::{command_header, dma_map, memfd, raw, region_rw, unsealed_memfd, Client};

/// VFIO's config-space region index.
const CONFIG_REGION: u32 = 7;

/// The device's vendor and device id, read through the vfio-user connection.
fn ids(c: &mut Client) -> [u8; 4] {
    let r = c.call(9, &region_rw(0, CONFIG_REGION, 4, &[]), &[]);
    assert!(!r.is_error(), "config read failed: errno {}", r.errno());
    r.payload[16..20].try_into().unwrap()
}

#[test]
fn a_hostile_vmm_gets_its_guest_ram_refused_and_the_borrower_stays_up() {
    let rig = ShmLender::start("hostile-vmm", 3000, "16M");
    let borrower = rig.borrower(3000);
    let ShmLender { dir, lender, .. } = rig;
    borrower.wait_peer_lists("nvme0");
    let sock = dir.join("vfio-user.sock");
    borrower.ctl_ok(&["borrow", "nvme0", "--vfio-user", sock.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let stream = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "no vfio-user socket: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let mut c = Client::new(stream);
    assert!(!c.version().is_error());
    let good = ids(&mut c);
    assert_ne!(good, [0xff; 4], "the borrowed device does not answer");

    // Guest RAM that anyone holding the fd could truncate under the mapping: refused.
    let loose = unsealed_memfd(0x10_0000);
    let r = c.call(2, &dma_map(3, 0, 0x10_0000, 0x1_0000), &[raw(&loose)]);
    assert_eq!(r.errno(), libc::EBADF, "an unsealed memfd was mapped");
    // Sealed, but shorter than the range it is to back: refused.
    let small = memfd(0x1_0000);
    let r = c.call(2, &dma_map(3, 0x1000, 0x10_0000, 0x1_0000), &[raw(&small)]);
    assert_eq!(r.errno(), libc::EBADF, "a too-short memfd was mapped");
    // A message shorter than its header: refused, the stream stays in sync.
    let h = command_header(77, 4, 3);
    c.send_raw(&h.encode(), &[]);
    let r = c.recv();
    assert_eq!((r.header.msg_id, r.errno()), (77, libc::EINVAL));
    assert_eq!(ids(&mut c), good);

    // Sealed and long enough: mapped, and from then on it cannot be truncated.
    let r = c.call(2, &dma_map(3, 0, 0x10_0000, 0x1_0000), &[raw(&small)]);
    assert!(
        !r.is_error(),
        "a sealed memfd was refused: errno {}",
        r.errno()
    );
    assert!(small.set_len(0).is_err(), "the mapped guest RAM shrank");
    assert_eq!(ids(&mut c), good);

    // The borrower is up and still holds the device it serves.
    let v: serde_json::Value =
        serde_json::from_str(&borrower.ctl_ok(&["status", "--json"])).unwrap();
    assert_eq!(borrowed_names(&borrower), ["nvme0"], "{v}");
    assert_eq!(lender.borrower_of("nvme0").as_deref(), Some("borrower"));
    drop(c);
    drop(borrower);
    drop(lender);
    let _ = std::fs::remove_dir_all(&dir);
}
