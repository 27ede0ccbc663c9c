use super::*;

const BASE: BusAddr = BusAddr(0x1_0000_0000);

fn pool(pages: usize) -> DmaPool {
    let mem = Arc::new(SharedMemory::new("pool-test", pages * DMA_PAGE_SIZE).unwrap());
    DmaPool::new(mem, BASE)
}

#[test]
fn buffers_are_page_aligned_rounded_and_first_fit() {
    let p = pool(8);
    let a = p.alloc(1).unwrap();
    let b = p.alloc(DMA_PAGE_SIZE + 1).unwrap();
    let c = p.alloc(0).unwrap();
    assert_eq!((a.bus_addr(), a.len()), (BASE, DMA_PAGE_SIZE));
    assert_eq!(
        (b.bus_addr().raw(), b.len()),
        (BASE.raw() + 0x1000, 2 * DMA_PAGE_SIZE)
    );
    assert_eq!(
        (c.bus_addr().raw(), c.len()),
        (BASE.raw() + 0x3000, DMA_PAGE_SIZE)
    );
    drop(b);
    // First fit: a one-page buffer goes into the hole b left.
    let d = p.alloc(100).unwrap();
    assert_eq!(d.bus_addr().raw(), BASE.raw() + 0x1000);
    // A three-page buffer does not fit the remaining one-page hole.
    let e = p.alloc(3 * DMA_PAGE_SIZE).unwrap();
    assert_eq!(e.bus_addr().raw(), BASE.raw() + 0x4000);
    assert_eq!(p.free_bytes(), 2 * DMA_PAGE_SIZE);
    drop((a, c, d, e));
    assert_eq!(p.free_bytes(), 8 * DMA_PAGE_SIZE);
    assert_eq!(
        p.largest_free_bytes(),
        8 * DMA_PAGE_SIZE,
        "freed extents coalesce"
    );
}

#[test]
fn buffers_are_zeroed_and_share_the_pool_memory() {
    let p = pool(2);
    let a = p.alloc(16).unwrap();
    a.fill(0xaa).unwrap();
    a.store_u32(8, 0x1234_5678).unwrap();
    let mut w = [0u8; 4];
    p.memory().read_at(8, &mut w).unwrap();
    assert_eq!(u32::from_le_bytes(w), 0x1234_5678);
    drop(a);
    let b = p.alloc(16).unwrap();
    let mut buf = vec![0xffu8; DMA_PAGE_SIZE];
    b.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0));
}

#[test]
fn exhaustion_reports_the_largest_free_block() {
    let p = pool(4);
    let _a = p.alloc(DMA_PAGE_SIZE).unwrap();
    let b = p.alloc(DMA_PAGE_SIZE).unwrap();
    let _c = p.alloc(DMA_PAGE_SIZE).unwrap();
    drop(b);
    match p.alloc(2 * DMA_PAGE_SIZE) {
        Err(FunctionError::OutOfDmaMemory {
            requested,
            available,
        }) => {
            assert_eq!(requested, 2 * DMA_PAGE_SIZE);
            assert_eq!(available, DMA_PAGE_SIZE);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(p.alloc(usize::MAX).is_err());
}

#[test]
fn partial_pages_and_top_of_address_space() {
    let mem = Arc::new(SharedMemory::new("pool-test", 100).unwrap());
    let p = DmaPool::new(mem, BASE);
    assert_eq!(p.len_bytes(), 0);
    assert!(p.bus_range().is_none());
    assert!(p.alloc(1).is_err());

    let mem = Arc::new(SharedMemory::new("pool-test", 4 * DMA_PAGE_SIZE).unwrap());
    let p = DmaPool::new(mem, BusAddr(u64::MAX - 2 * DMA_PAGE_SIZE as u64 + 1));
    assert_eq!(p.len_bytes(), 2 * DMA_PAGE_SIZE);
    assert_eq!(p.bus_range().unwrap().end_inclusive(), u64::MAX);
}

#[test]
fn concurrent_alloc_and_free() {
    let p = pool(64);
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let p = p.clone();
            s.spawn(move || {
                for i in 0..200usize {
                    let buf = p.alloc(1 + (i % 3) * DMA_PAGE_SIZE).unwrap();
                    buf.fill(t).unwrap();
                    let mut b = [0u8; 1];
                    buf.read_at(buf.len() - 1, &mut b).unwrap();
                    assert_eq!(b[0], t, "buffers never overlap");
                }
            });
        }
    });
    assert_eq!(p.free_bytes(), 64 * DMA_PAGE_SIZE);
    assert_eq!(p.largest_free_bytes(), 64 * DMA_PAGE_SIZE);
}
