//! A tiny in-test PCIe function and a raw vfio-user client for driving the server.
#![allow(dead_code)]

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devlend_pci::{
    AccessSize, BarAccess, BarIndex, BusAddr, ConfigAccess, DmaAlloc, DmaBuffer, DmaRemap,
    FunctionError, Interrupts, MemSpan, PciFunction,
};
use devlend_vfio_user::conn::{send_with_fds, MessageReader};
use devlend_vfio_user::wire::{Header, HEADER_LEN};
use vmm_sys_util::eventfd::EventFd;

pub const BAR0_SIZE: u64 = 0x4000;
pub const MSIX_TABLE: u64 = 0x2000;
pub const VECTORS: u16 = 4;

/// What the mock saw.
#[derive(Default)]
pub struct MockState {
    pub config: Vec<u8>,
    pub bar0: Vec<u8>,
    pub bar_writes: Vec<(u64, Vec<u8>)>,
    pub maps: Vec<(u64, MemSpan, bool)>,
    pub unmaps: Vec<(u64, u64)>,
    pub routes: Vec<Option<Arc<EventFd>>>,
    pub flrs: u32,
}

/// A function with a 64-bit 16 KiB BAR0 (MSI-X table at 0x2000, 4 vectors), MSI-X and PCIe
/// (FLR) capabilities.
pub struct MockFunction {
    pub state: Mutex<MockState>,
}

fn put(b: &mut [u8], off: usize, v: &[u8]) {
    b[off..off + v.len()].copy_from_slice(v);
}

impl MockFunction {
    pub fn new() -> Arc<Self> {
        let mut c = vec![0u8; 4096];
        put(&mut c, 0, &0x1234_u16.to_le_bytes());
        put(&mut c, 2, &0x5678_u16.to_le_bytes());
        put(&mut c, 6, &0x10_u16.to_le_bytes()); // capability list
        put(&mut c, 0x10, &0x4_u32.to_le_bytes()); // 64-bit memory BAR
        c[0x34] = 0x40;
        c[0x3d] = 1;
        // MSI-X at 0x40: 4 vectors, table BAR0+0x2000, PBA BAR0+0x3000.
        c[0x40] = 0x11;
        c[0x41] = 0x50;
        put(&mut c, 0x42, &(VECTORS - 1).to_le_bytes());
        put(&mut c, 0x44, &(MSIX_TABLE as u32).to_le_bytes());
        put(&mut c, 0x48, &0x3000_u32.to_le_bytes());
        // PCIe at 0x50: DevCap FLR.
        c[0x50] = 0x10;
        c[0x51] = 0;
        put(&mut c, 0x54, &(1u32 << 28).to_le_bytes());
        let mut bar0 = vec![0u8; BAR0_SIZE as usize];
        for v in 0..VECTORS as usize {
            put(
                &mut bar0,
                MSIX_TABLE as usize + v * 16 + 12,
                &1u32.to_le_bytes(),
            );
        }
        Arc::new(Self {
            state: Mutex::new(MockState {
                config: c,
                bar0,
                routes: vec![None; VECTORS as usize],
                ..Default::default()
            }),
        })
    }

    pub fn vector_masked(&self, v: u16) -> bool {
        let s = self.state.lock().unwrap();
        let at = MSIX_TABLE as usize + v as usize * 16 + 12;
        s.bar0[at] & 1 == 1
    }
}

impl ConfigAccess for MockFunction {
    fn config_read(&self, offset: u16, size: AccessSize) -> Result<u32, FunctionError> {
        let s = self.state.lock().unwrap();
        let o = offset as usize;
        if o + size.len() > 4096 || o & (size.len() - 1) != 0 {
            return Err(FunctionError::BadConfigAccess {
                offset,
                size: size.len(),
            });
        }
        let mut b = [0u8; 4];
        b[..size.len()].copy_from_slice(&s.config[o..o + size.len()]);
        Ok(u32::from_le_bytes(b))
    }

    fn config_write(&self, offset: u16, size: AccessSize, value: u32) -> Result<(), FunctionError> {
        let mut s = self.state.lock().unwrap();
        let o = offset as usize;
        if o + size.len() > 4096 || o & (size.len() - 1) != 0 {
            return Err(FunctionError::BadConfigAccess {
                offset,
                size: size.len(),
            });
        }
        let bytes = value.to_le_bytes();
        for (i, byte) in bytes.iter().enumerate().take(size.len()) {
            let at = o + i;
            let mask: u8 = match at {
                0x04 | 0x05 => 0xff,
                0x10 => 0x00, // low bits of BAR0: type, read-only; size 16 KiB
                0x11 => 0xc0,
                0x12..=0x17 => 0xff,
                0x42 | 0x43 => 0xff, // MSI-X message control (imprecise, enough here)
                0x58 | 0x59 => 0xff,
                _ => 0x00,
            };
            s.config[at] = (s.config[at] & !mask) | (byte & mask);
        }
        if o <= 0x59 && o + size.len() > 0x59 && s.config[0x59] & 0x80 != 0 {
            s.config[0x59] &= 0x7f;
            s.flrs += 1;
        }
        Ok(())
    }
}

/// The bytes of BAR0 an access of `len` at `offset` of `bar` covers; only BAR0 exists.
fn bar0_range(
    bar: BarIndex,
    offset: u64,
    len: usize,
) -> Result<std::ops::Range<usize>, FunctionError> {
    let end = offset as usize + len;
    if bar.get() != 0 || end > BAR0_SIZE as usize {
        return Err(FunctionError::BadBarAccess {
            bar: bar.get(),
            offset,
            len,
        });
    }
    Ok(offset as usize..end)
}

impl BarAccess for MockFunction {
    fn bar_read(&self, bar: BarIndex, offset: u64, data: &mut [u8]) -> Result<(), FunctionError> {
        let range = bar0_range(bar, offset, data.len())?;
        data.copy_from_slice(&self.state.lock().unwrap().bar0[range]);
        Ok(())
    }

    fn bar_write(&self, bar: BarIndex, offset: u64, data: &[u8]) -> Result<(), FunctionError> {
        let range = bar0_range(bar, offset, data.len())?;
        let mut s = self.state.lock().unwrap();
        s.bar0[range].copy_from_slice(data);
        s.bar_writes.push((offset, data.to_vec()));
        Ok(())
    }
}

impl DmaAlloc for MockFunction {
    fn dma_alloc(&self, len: usize) -> Result<DmaBuffer, FunctionError> {
        Err(FunctionError::OutOfDmaMemory {
            requested: len,
            available: 0,
        })
    }
}

impl DmaRemap for MockFunction {
    fn dma_map(&self, iova: BusAddr, mem: MemSpan, writable: bool) -> Result<(), FunctionError> {
        self.state
            .lock()
            .unwrap()
            .maps
            .push((iova.raw(), mem, writable));
        Ok(())
    }

    fn dma_unmap(&self, iova: BusAddr, len: u64) -> Result<(), FunctionError> {
        let mut s = self.state.lock().unwrap();
        s.maps.retain(|(a, _, _)| *a != iova.raw());
        s.unmaps.push((iova.raw(), len));
        Ok(())
    }
}

impl Interrupts for MockFunction {
    fn interrupt_vectors(&self) -> u16 {
        VECTORS
    }

    fn wait_interrupt(&self, _vector: u16, _timeout: Duration) -> Result<bool, FunctionError> {
        Ok(false)
    }

    fn set_interrupt_eventfd(
        &self,
        vector: u16,
        fd: Option<Arc<EventFd>>,
    ) -> Result<(), FunctionError> {
        let mut s = self.state.lock().unwrap();
        let slot = s
            .routes
            .get_mut(vector as usize)
            .ok_or(FunctionError::NoSuchVector {
                vector,
                count: VECTORS,
            })?;
        *slot = fd;
        Ok(())
    }
}

impl PciFunction for MockFunction {
    fn describe(&self) -> String {
        "mock".into()
    }
}

/// A raw client over a socket.
pub struct Client {
    pub sock: UnixStream,
    next_id: u16,
}

/// A reply: header and payload.
pub struct Reply {
    pub header: Header,
    pub payload: Vec<u8>,
}

impl Reply {
    pub fn is_error(&self) -> bool {
        self.header.flags & 0x20 != 0
    }
    pub fn errno(&self) -> i32 {
        self.header.error as i32
    }
    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.payload[off..off + 4].try_into().unwrap())
    }
    pub fn u64_at(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.payload[off..off + 8].try_into().unwrap())
    }
}

impl Client {
    pub fn new(sock: UnixStream) -> Self {
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Self { sock, next_id: 1 }
    }

    /// Sends raw bytes (for malformed messages).
    pub fn send_raw(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        send_with_fds(&self.sock, bytes, fds).unwrap();
    }

    /// Sends a well-framed message; returns its id.
    pub fn send(
        &mut self,
        command: u16,
        flags: u32,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let h = Header {
            msg_id: id,
            command,
            size: (HEADER_LEN + payload.len()) as u32,
            flags,
            error: 0,
        };
        let mut m = h.encode().to_vec();
        m.extend_from_slice(payload);
        self.send_raw(&m, fds);
        id
    }

    pub fn recv(&mut self) -> Reply {
        let msg = MessageReader::new(&self.sock)
            .read_message()
            .expect("reading a reply")
            .expect("the server closed the connection");
        Reply {
            header: msg.header,
            payload: msg.payload,
        }
    }

    /// Sends a command and waits for its reply (checking the id).
    pub fn call(&mut self, command: u16, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Reply {
        let id = self.send(command, 0, payload, fds);
        let r = self.recv();
        assert_eq!(r.header.msg_id, id, "reply id");
        assert_eq!(r.header.command, command, "reply command");
        assert_eq!(r.header.flags & 0xf, 1, "reply type");
        r
    }

    pub fn version(&mut self) -> Reply {
        let mut p = vec![0, 0, 0, 0];
        p.extend_from_slice(br#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}}"#);
        p.push(0);
        self.call(1, &p, &[])
    }
}

/// Payload builders.
pub fn region_rw(offset: u64, region: u32, count: u32, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_le_bytes().to_vec();
    p.extend_from_slice(&region.to_le_bytes());
    p.extend_from_slice(&count.to_le_bytes());
    p.extend_from_slice(data);
    p
}

pub fn dma_map(flags: u32, fd_offset: u64, iova: u64, size: u64) -> Vec<u8> {
    let mut p = 32u32.to_le_bytes().to_vec();
    p.extend_from_slice(&flags.to_le_bytes());
    p.extend_from_slice(&fd_offset.to_le_bytes());
    p.extend_from_slice(&iova.to_le_bytes());
    p.extend_from_slice(&size.to_le_bytes());
    p
}

pub fn dma_unmap(flags: u32, iova: u64, size: u64) -> Vec<u8> {
    let mut p = 24u32.to_le_bytes().to_vec();
    p.extend_from_slice(&flags.to_le_bytes());
    p.extend_from_slice(&iova.to_le_bytes());
    p.extend_from_slice(&size.to_le_bytes());
    p
}

pub fn set_irqs(flags: u32, index: u32, start: u32, count: u32) -> Vec<u8> {
    let mut p = 20u32.to_le_bytes().to_vec();
    for v in [flags, index, start, count] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p
}

pub fn info_req(argsz: u32, index: u32) -> Vec<u8> {
    let mut p = argsz.to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(&index.to_le_bytes());
    p.extend_from_slice(&[0u8; 20][..(argsz as usize).saturating_sub(12).min(20)]);
    p
}

/// A server on one end of a socket pair, served on its own thread.
pub fn start(function: Arc<MockFunction>) -> Session {
    Session::serve(devlend_vfio_user::Server::new(function).expect("probe"))
}

/// [`start`], and the version negotiated.
pub fn negotiated(function: Arc<MockFunction>) -> Session {
    let mut c = start(function);
    c.version();
    c
}

/// A client connected to a server thread serving one connection; derefs to the [`Client`].
pub struct Session {
    client: Client,
    server: std::thread::JoinHandle<devlend_vfio_user::Disconnect>,
}

impl Session {
    /// `server` serving one end of a socket pair on a thread of its own, a client on the other.
    pub fn serve(server: devlend_vfio_user::Server) -> Session {
        let (a, b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || server.serve_connection(&b));
        Session {
            client: Client::new(a),
            server,
        }
    }

    /// Hangs up and waits for the server thread to end (it must not have panicked).
    pub fn close(self) {
        drop(self.client);
        self.server.join().unwrap();
    }
}

impl std::ops::Deref for Session {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for Session {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// The header of a message that is a command (flags 0), `size` bytes in all.
pub fn command_header(msg_id: u16, command: u16, size: u32) -> Header {
    Header {
        msg_id,
        command,
        size,
        flags: 0,
        error: 0,
    }
}

/// Open descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Guest RAM as QEMU's memory-backend-memfd makes it: a memfd sealed against resizing.
pub fn memfd(len: u64) -> std::fs::File {
    let f = unsealed_memfd(len);
    rustix::fs::fcntl_add_seals(
        &f,
        rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW,
    )
    .unwrap();
    f
}

/// A memfd nobody sealed: whoever holds it can truncate it.
pub fn unsealed_memfd(len: u64) -> std::fs::File {
    use rustix::fs::MemfdFlags;
    let fd = rustix::fs::memfd_create("guest-ram", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
        .unwrap();
    let f = std::fs::File::from(fd);
    f.set_len(len).unwrap();
    f
}

/// `f`'s descriptor, borrowed for as long as `f` is (`EventFd` has no `AsFd`).
pub fn raw(f: &impl AsRawFd) -> BorrowedFd<'_> {
    // SAFETY: `f` owns the descriptor and outlives the returned borrow.
    unsafe { BorrowedFd::borrow_raw(f.as_raw_fd()) }
}
