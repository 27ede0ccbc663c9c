//! A first-fit allocator of page-aligned DMA buffers inside one shared-memory region.
//!
//! The region sits at a fixed bus address (where the device's IOMMU maps it, or where an NTB
//! window exposes it); a buffer's bus address is that base plus its offset in the region.
//! Buffers go back to the pool when dropped. Thread-safe: one mutex guards the free list.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use devlend_memory::{BusAddr, ByteRange, MemSpan, SharedMemory};

use crate::{DmaBuffer, FunctionError};

/// Allocation granularity and alignment.
pub const DMA_PAGE_SIZE: usize = 4096;

#[derive(Debug)]
struct Shared {
    mem: Arc<SharedMemory>,
    bus_base: BusAddr,
    pages: usize,
    /// Free extents: first page -> page count. Disjoint, never adjacent (coalesced).
    free: Mutex<BTreeMap<usize, usize>>,
}

impl Shared {
    fn free_list(&self) -> MutexGuard<'_, BTreeMap<usize, usize>> {
        // Every update is a complete insert/remove: the list is consistent even after a panic.
        devlend_sync::lock(&self.free)
    }

    fn release(&self, first: usize, count: usize) {
        let mut free = self.free_list();
        let (mut first, mut count) = (first, count);
        if let Some((&p, &n)) = free.range(..first).next_back() {
            if p + n == first {
                free.remove(&p);
                first = p;
                count += n;
            }
        }
        if let Some(n) = free.remove(&(first + count)) {
            count += n;
        }
        free.insert(first, count);
    }
}

/// DMA buffers carved out of one region of shared memory.
#[derive(Clone, Debug)]
pub struct DmaPool {
    shared: Arc<Shared>,
}

impl DmaPool {
    /// A pool over the whole pages of `mem`, seen by the device from `bus_base` (which should
    /// be page-aligned for buffers to be page-aligned on the bus). Pages whose bus address
    /// would pass the top of the address space are left out.
    pub fn new(mem: Arc<SharedMemory>, bus_base: BusAddr) -> Self {
        // Bytes from the base to the top of the address space, inclusive of the last.
        let room = u128::from(u64::MAX - bus_base.raw()) + 1;
        let fit = usize::try_from(room / DMA_PAGE_SIZE as u128).unwrap_or(usize::MAX);
        let pages = (mem.len() / DMA_PAGE_SIZE).min(fit);
        let mut free = BTreeMap::new();
        if pages > 0 {
            free.insert(0, pages);
        }
        Self {
            shared: Arc::new(Shared {
                mem,
                bus_base,
                pages,
                free: Mutex::new(free),
            }),
        }
    }

    /// Bus address of the pool's first byte.
    pub fn bus_base(&self) -> BusAddr {
        self.shared.bus_base
    }

    /// Capacity in bytes (whole pages).
    pub fn len_bytes(&self) -> usize {
        self.shared.pages * DMA_PAGE_SIZE
    }

    /// The bus range the pool covers (`None` for a pool without a single page).
    pub fn bus_range(&self) -> Option<ByteRange> {
        ByteRange::new(self.shared.bus_base.raw(), self.len_bytes() as u64).ok()
    }

    /// The pool's memory (for mapping it into an IOMMU or exporting it through a window).
    pub fn span(&self) -> Option<MemSpan> {
        MemSpan::new(self.shared.mem.clone(), 0, self.len_bytes() as u64).ok()
    }

    /// The backing memory.
    pub fn memory(&self) -> &Arc<SharedMemory> {
        &self.shared.mem
    }

    /// Bytes not allocated.
    pub fn free_bytes(&self) -> usize {
        self.shared.free_list().values().sum::<usize>() * DMA_PAGE_SIZE
    }

    /// The largest buffer that could be allocated now.
    pub fn largest_free_bytes(&self) -> usize {
        self.shared.free_list().values().max().copied().unwrap_or(0) * DMA_PAGE_SIZE
    }

    /// Allocates at least `len` bytes (a whole number of pages, at least one), zeroed and
    /// page-aligned, from the lowest free extent that fits.
    pub fn alloc(&self, len: usize) -> Result<DmaBuffer, FunctionError> {
        let out_of_memory = |available| FunctionError::OutOfDmaMemory {
            requested: len,
            available,
        };
        let count = len.max(1).div_ceil(DMA_PAGE_SIZE);
        let first = {
            let mut free = self.shared.free_list();
            let found = free
                .iter()
                .find(|(_, &n)| n >= count)
                .map(|(&p, &n)| (p, n));
            let Some((first, n)) = found else {
                let largest = free.values().max().copied().unwrap_or(0);
                return Err(out_of_memory(largest * DMA_PAGE_SIZE));
            };
            free.remove(&first);
            if n > count {
                free.insert(first + count, n - count);
            }
            first
        };
        let offset = (first * DMA_PAGE_SIZE) as u64;
        let bytes = count * DMA_PAGE_SIZE;
        // `first + count <= pages`, so every bus address fits (checked in `new`).
        let bus_addr = self.shared.bus_base.checked_add(offset);
        let span = MemSpan::new(self.shared.mem.clone(), offset, bytes as u64)
            .and_then(|span| span.fill(0, bytes, 0).map(|()| span));
        let (span, bus_addr) = match (span, bus_addr) {
            (Ok(span), Some(bus_addr)) => (span, bus_addr),
            (result, _) => {
                self.shared.release(first, count);
                return Err(match result {
                    Err(e) => e.into(),
                    Ok(_) => out_of_memory(0),
                });
            }
        };
        let shared = self.shared.clone();
        let release = Box::new(move || shared.release(first, count));
        Ok(DmaBuffer::new(span, bus_addr, Some(release)))
    }
}

#[cfg(test)]
#[path = "tests/dma_pool.rs"]
mod tests;
