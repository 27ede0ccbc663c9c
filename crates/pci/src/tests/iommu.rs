use super::*;
use devlend_memory::SharedMemory;
use std::sync::Mutex;

fn mem(len: usize) -> Arc<SharedMemory> {
    Arc::new(SharedMemory::new("iommu-test", len).unwrap())
}

fn span(m: &Arc<SharedMemory>, offset: u64, len: u64) -> DmaTarget {
    DmaTarget::Direct(MemSpan::new(m.clone(), offset, len).unwrap())
}

fn bytes(m: &SharedMemory) -> Vec<u8> {
    let mut v = vec![0u8; m.len()];
    m.read_at(0, &mut v).unwrap();
    v
}

/// Remote memory backed by a Vec, counting transfers, optionally failing.
struct FakeRemote {
    data: Mutex<Vec<u8>>,
    transfers: Mutex<usize>,
    /// (offset, length) of the reads of each `read_many`.
    batches: Mutex<Vec<Vec<(u64, usize)>>>,
    fail: bool,
}

impl FakeRemote {
    fn new(len: usize, fail: bool) -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::new(vec![0; len]),
            transfers: Mutex::new(0),
            batches: Mutex::new(Vec::new()),
            fail,
        })
    }
}

impl RemoteMemory for FakeRemote {
    fn len(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        *self.transfers.lock().unwrap() += 1;
        if self.fail {
            return Err(DmaError::Path("link down".into()));
        }
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), DmaError> {
        self.batches
            .lock()
            .unwrap()
            .push(reads.iter().map(|(o, b)| (*o, b.len())).collect());
        let d = self.data.lock().unwrap();
        for (offset, buf) in reads.iter_mut() {
            let at = *offset as usize;
            buf.copy_from_slice(&d[at..at + buf.len()]);
        }
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DmaError> {
        *self.transfers.lock().unwrap() += 1;
        if self.fail {
            return Err(DmaError::Path("link down".into()));
        }
        self.data.lock().unwrap()[offset as usize..offset as usize + data.len()]
            .copy_from_slice(data);
        Ok(())
    }
}

/// Three mappings: [0x1000, 0x2000) rw -> mem[0..0x1000), [0x2000, 0x3000) rw ->
/// mem[0x3000..0x4000) (adjacent on the bus, not in memory), [0x3000, 0x4000) ro ->
/// mem[0x1000..0x2000); a gap at [0x4000, 0x5000); [0x5000, 0x6000) rw -> mem[0x2000..).
fn setup() -> (Iommu, Arc<SharedMemory>) {
    let m = mem(0x4000);
    let io = Iommu::new();
    io.map(BusAddr(0x1000), span(&m, 0, 0x1000), true).unwrap();
    io.map(BusAddr(0x2000), span(&m, 0x3000, 0x1000), true)
        .unwrap();
    io.map(BusAddr(0x3000), span(&m, 0x1000, 0x1000), false)
        .unwrap();
    io.map(BusAddr(0x5000), span(&m, 0x2000, 0x1000), true)
        .unwrap();
    (io, m)
}

#[test]
fn failed_accesses_touch_nothing() {
    // (addr, len, expected error kind)
    let cases: &[(u64, usize, &str)] = &[
        (0x0, 4, "unmapped"),
        (0xffc, 8, "unmapped"),         // starts before the first mapping
        (0x1ff8, 0x1010, "permission"), // rw, rw, then ro
        (0x3ff8, 16, "permission"),     // read-only, then the gap: writes fail first on RO
        (0x4ff8, 16, "unmapped"),       // starts in the gap
        (0x5ffc, 8, "unmapped"),        // runs off the end
        (0x3000, 4, "permission"),
        (u64::MAX - 3, 8, "unmapped"), // wraps
    ];
    for &(addr, len, kind) in cases {
        let (io, m) = setup();
        let before = bytes(&m);
        let err = io.dma_write(BusAddr(addr), &vec![0xaa; len]).unwrap_err();
        let got = match err {
            DmaError::Unmapped { .. } => "unmapped",
            DmaError::Permission { .. } => "permission",
            _ => "other",
        };
        assert_eq!(got, kind, "write {addr:#x}+{len}");
        assert_eq!(bytes(&m), before, "write {addr:#x}+{len} touched memory");
        if kind == "unmapped" || addr == 0x3ff8 {
            let mut buf = vec![0x55; len];
            assert!(matches!(
                io.dma_read(BusAddr(addr), &mut buf),
                Err(DmaError::Unmapped { .. })
            ));
        }
    }
}

#[test]
fn accesses_split_across_adjacent_mappings() {
    let (io, m) = setup();
    let data: Vec<u8> = (0..32).collect();
    io.dma_write(BusAddr(0x1ff0), &data).unwrap();
    let mut lo = [0u8; 16];
    let mut hi = [0u8; 16];
    m.read_at(0xff0, &mut lo).unwrap();
    m.read_at(0x3000, &mut hi).unwrap();
    assert_eq!(&lo[..], &data[..16]);
    assert_eq!(&hi[..], &data[16..]);
    let mut back = [0u8; 32];
    io.dma_read(BusAddr(0x1ff0), &mut back).unwrap();
    assert_eq!(&back[..], &data[..]);
    // Reads may cross into the read-only mapping.
    m.write_at(0x1000, &[9, 9]).unwrap();
    let mut r = [0u8; 4];
    io.dma_read(BusAddr(0x2ffe), &mut r).unwrap();
    m.read_at(0x3ffe, &mut lo[..2]).unwrap();
    assert_eq!(r, [lo[0], lo[1], 9, 9]);
}

#[test]
fn overlapping_maps_are_rejected() {
    let (io, _) = setup();
    let m = mem(0x10000);
    for (iova, len) in [
        (0x1000, 0x1000),
        (0x800, 0x1000),
        (0x3fff, 2),
        (0x4000, 0x1001),
        (0x0, 0x10000),
    ] {
        let err = io.map(BusAddr(iova), span(&m, 0, len), true).unwrap_err();
        assert!(
            matches!(err, IommuError::Overlap { .. }),
            "{iova:#x}+{len:#x}"
        );
    }
    // Filling the gap exactly works.
    io.map(BusAddr(0x4000), span(&m, 0, 0x1000), false).unwrap();
    assert_eq!(io.mappings().len(), 5);
    assert!(matches!(
        io.map(BusAddr(u64::MAX - 0xfff), span(&m, 0, 0x2000), true),
        Err(IommuError::BadRange { .. })
    ));
}

#[test]
fn unmap_removes_whole_mappings_only() {
    let (io, _m) = setup();
    assert!(matches!(
        io.unmap(BusAddr(0x1800), 0x1000),
        Err(IommuError::PartialUnmap { .. })
    ));
    assert_eq!(io.mappings().len(), 4, "nothing removed on error");
    assert_eq!(io.unmap(BusAddr(0x1000), 0x2000).unwrap(), 0x2000);
    assert_eq!(io.unmap(BusAddr(0x1000), 0x2000).unwrap(), 0);
    assert!(matches!(
        io.dma_read(BusAddr(0x1000), &mut [0u8; 4]),
        Err(DmaError::Unmapped { .. })
    ));
    assert_eq!(io.unmap(BusAddr(0), u64::MAX).unwrap(), 0x2000);
    assert!(io.mappings().is_empty());
}

#[test]
fn dma_span_only_for_one_direct_mapping() {
    let (io, m) = setup();
    let s = io
        .dma_span(BusAddr(0x1100), 0x100, DmaAccess::Write)
        .unwrap()
        .unwrap();
    s.write_at(0, &[7]).unwrap();
    let mut b = [0u8];
    m.read_at(0x100, &mut b).unwrap();
    assert_eq!(b, [7]);
    assert!(
        io.dma_span(BusAddr(0x1ff0), 0x20, DmaAccess::Read)
            .unwrap()
            .is_none(),
        "split"
    );
    assert!(matches!(
        io.dma_span(BusAddr(0x3000), 4, DmaAccess::Write),
        Err(DmaError::Permission { .. })
    ));
    assert!(io
        .dma_span(BusAddr(0x3000), 4, DmaAccess::Read)
        .unwrap()
        .is_some());
    assert!(matches!(
        io.dma_span(BusAddr(0x3ff0), 0x20, DmaAccess::Read),
        Err(DmaError::Unmapped { .. })
    ));
    let r = FakeRemote::new(0x1000, false);
    io.map(BusAddr(0x10000), DmaTarget::Remote(r), true)
        .unwrap();
    assert!(io
        .dma_span(BusAddr(0x10000), 4, DmaAccess::Read)
        .unwrap()
        .is_none());
}

#[test]
fn remote_memory_targets() {
    let io = Iommu::new();
    let m = mem(0x1000);
    let r = FakeRemote::new(0x1000, false);
    io.map(BusAddr(0x0), span(&m, 0, 0x1000), true).unwrap();
    io.map(BusAddr(0x1000), DmaTarget::Remote(r.clone()), true)
        .unwrap();
    io.dma_write(BusAddr(0xffe), &[1, 2, 3, 4]).unwrap();
    assert_eq!(&r.data.lock().unwrap()[..2], &[3, 4]);
    let mut b = [0u8; 4];
    io.dma_read(BusAddr(0xffe), &mut b).unwrap();
    assert_eq!(b, [1, 2, 3, 4]);
    // A failed check issues no transfer at all.
    let n = *r.transfers.lock().unwrap();
    assert!(io.dma_write(BusAddr(0x1ffe), &[0; 4]).is_err());
    assert_eq!(*r.transfers.lock().unwrap(), n);

    let bad = FakeRemote::new(0x1000, true);
    io.map(BusAddr(0x2000), DmaTarget::Remote(bad), true)
        .unwrap();
    assert!(matches!(
        io.dma_read(BusAddr(0x2000), &mut b),
        Err(DmaError::Path(_))
    ));
}

#[test]
fn several_reads_reach_each_remote_memory_in_one_batch() {
    let io = Iommu::new();
    let m = mem(0x1000);
    let r = FakeRemote::new(0x2000, false);
    let r2 = FakeRemote::new(0x1000, false);
    let fill = |v: &mut Vec<u8>, seed: u8| {
        for (i, b) in v.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(7).wrapping_add(seed);
        }
    };
    fill(&mut r.data.lock().unwrap(), 1);
    fill(&mut r2.data.lock().unwrap(), 2);
    let mut direct = vec![0u8; 0x1000];
    fill(&mut direct, 3);
    m.write_at(0, &direct).unwrap();
    io.map(BusAddr(0x0), span(&m, 0, 0x1000), true).unwrap();
    io.map(BusAddr(0x1000), DmaTarget::Remote(r.clone()), true)
        .unwrap();
    io.map(BusAddr(0x3000), DmaTarget::Remote(r2.clone()), false)
        .unwrap();
    // Across the direct mapping into r; inside r; across r into r2; inside the direct one.
    let at = [
        (0xff0u64, 0x20usize),
        (0x1800, 0x100),
        (0x2ff0, 0x20),
        (0x100, 0x100),
    ];
    let mut bufs: Vec<Vec<u8>> = at.iter().map(|(_, n)| vec![0u8; *n]).collect();
    let mut reads: Vec<(BusAddr, &mut [u8])> = at
        .iter()
        .zip(bufs.iter_mut())
        .map(|((a, _), b)| (BusAddr(*a), b.as_mut_slice()))
        .collect();
    io.dma_read_many(&mut reads).unwrap();
    for ((a, n), got) in at.iter().zip(&bufs) {
        let mut one = vec![0u8; *n];
        io.dma_read(BusAddr(*a), &mut one).unwrap();
        assert_eq!(got, &one, "read at {a:#x}");
    }
    // One batch for each remote memory, in order; the single reads above came after.
    assert_eq!(
        *r.batches.lock().unwrap(),
        [vec![(0, 0x10), (0x800, 0x100), (0x1ff0, 0x10)]]
    );
    assert_eq!(*r2.batches.lock().unwrap(), [vec![(0, 0x10)]]);

    // One read reaching unmapped space: nothing is transferred at all.
    let transfers = *r.transfers.lock().unwrap();
    let (mut a, mut b) = ([0u8; 8], [0u8; 8]);
    let mut reads = [(BusAddr(0x1000), &mut a[..]), (BusAddr(0x3ffc), &mut b[..])];
    assert!(matches!(
        io.dma_read_many(&mut reads),
        Err(DmaError::Unmapped { .. })
    ));
    assert_eq!(r.batches.lock().unwrap().len(), 1);
    assert_eq!(*r.transfers.lock().unwrap(), transfers);
}

#[test]
fn empty_accesses_and_remap_trait() {
    let io = Iommu::new();
    io.dma_read(BusAddr(0), &mut []).unwrap();
    io.dma_write(BusAddr(0), &[]).unwrap();
    assert!(io
        .dma_span(BusAddr(0), 0, DmaAccess::Read)
        .unwrap()
        .is_none());
    let m = mem(0x2000);
    let remap: &dyn DmaRemap = &io;
    remap
        .dma_map(BusAddr(0x8000), MemSpan::whole(m.clone()), false)
        .unwrap();
    assert!(matches!(
        remap.dma_map(BusAddr(0x9000), MemSpan::whole(m), true),
        Err(FunctionError::DmaMap(IommuError::Overlap { .. }))
    ));
    assert!(matches!(
        io.dma_write(BusAddr(0x8000), &[1]),
        Err(DmaError::Permission { .. })
    ));
    remap.dma_unmap(BusAddr(0x8000), 0x2000).unwrap();
    assert!(io.mappings().is_empty());
}
