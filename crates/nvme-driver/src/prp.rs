//! Physical Region Page entries (NVMe base specification 1.4, section 4.3): how a transfer's
//! bus addresses are described to the controller.
//!
//! The first entry may start anywhere (dword-aligned) inside a page; every later entry is a
//! page-aligned page. Two pages fit in PRP1/PRP2; more need a PRP list whose pages each hold
//! `page / 8` entries, the last of which points to the next list page when more follow.

/// How a transfer is described, before any list pages exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrpLayout {
    /// PRP1 alone (PRP2 = 0).
    One {
        /// PRP1.
        prp1: u64,
    },
    /// PRP1 and a second page in PRP2.
    Two {
        /// PRP1.
        prp1: u64,
        /// PRP2: the second page.
        prp2: u64,
    },
    /// PRP1 and a list of the remaining pages (PRP2 will point at the list).
    List {
        /// PRP1.
        prp1: u64,
        /// The page addresses after the first, in order.
        pages: Vec<u64>,
    },
}

/// Describes `len` bytes (non-zero) at bus address `start` with pages of `page` bytes (a power
/// of two). `None` when `len` is zero, `page` is not a power of two of at least 8, `start` is
/// not dword-aligned, or the range wraps.
pub fn layout(start: u64, len: u64, page: u64) -> Option<PrpLayout> {
    if len == 0 || !page.is_power_of_two() || page < 8 || !start.is_multiple_of(4) {
        return None;
    }
    let last = start.checked_add(len - 1)?;
    let first_page = start & !(page - 1);
    let last_page = last & !(page - 1);
    let count = (last_page - first_page) / page + 1;
    Some(match count {
        1 => PrpLayout::One { prp1: start },
        2 => PrpLayout::Two {
            prp1: start,
            prp2: first_page + page,
        },
        _ => PrpLayout::List {
            prp1: start,
            pages: (1..count).map(|i| first_page + i * page).collect(),
        },
    })
}

/// The bytes of one list page into `out` (cleared first): `entries` little-endian, then the
/// pointer to the next list page when one follows.
pub fn encode_list(entries: &[u64], next: Option<u64>, out: &mut Vec<u8>) {
    out.clear();
    for e in entries.iter().chain(next.as_ref()) {
        out.extend_from_slice(&e.to_le_bytes());
    }
}

/// Splits `entries` into the contents of chained list pages of `per_page` entries each (at
/// least 2): every page but the last holds `per_page - 1` entries and leaves its last slot for
/// the pointer to the next page, which the caller fills in once the pages have addresses.
/// The last page holds up to `per_page` entries.
pub fn list_pages(entries: &[u64], per_page: usize) -> Vec<&[u64]> {
    let mut pages = Vec::new();
    if per_page < 2 {
        return pages;
    }
    let mut rest = entries;
    while rest.len() > per_page {
        let (head, tail) = rest.split_at(per_page - 1);
        pages.push(head);
        rest = tail;
    }
    if !rest.is_empty() {
        pages.push(rest);
    }
    pages
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 4096;

    #[test]
    fn one_two_and_lists() {
        assert_eq!(
            layout(0x10000, 4096, P),
            Some(PrpLayout::One { prp1: 0x10000 })
        );
        assert_eq!(
            layout(0x10200, 0xe00, P),
            Some(PrpLayout::One { prp1: 0x10200 })
        );
        // Crossing one page boundary from an offset: two entries.
        assert_eq!(
            layout(0x10200, 4096, P),
            Some(PrpLayout::Two {
                prp1: 0x10200,
                prp2: 0x11000
            })
        );
        assert_eq!(
            layout(0x10000, 8192, P),
            Some(PrpLayout::Two {
                prp1: 0x10000,
                prp2: 0x11000
            })
        );
        assert_eq!(
            layout(0x10000, 8193, P),
            Some(PrpLayout::List {
                prp1: 0x10000,
                pages: vec![0x11000, 0x12000]
            })
        );
        assert_eq!(
            layout(0x10800, 3 * 4096, P),
            Some(PrpLayout::List {
                prp1: 0x10800,
                pages: vec![0x11000, 0x12000, 0x13000]
            })
        );
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(layout(0x1000, 0, P), None);
        assert_eq!(layout(0x1002, 8, P), None);
        assert_eq!(layout(0x1000, 8, 3000), None);
        assert_eq!(layout(u64::MAX - 3, 8, P), None);
    }

    #[test]
    fn list_pages_encode_little_endian_with_the_next_pointer_last() {
        let mut out = vec![0xaa; 3];
        encode_list(&[0x1000, 0x2000], None, &mut out);
        assert_eq!(out.len(), 16);
        assert_eq!(out[..8], 0x1000u64.to_le_bytes());
        assert_eq!(out[8..], 0x2000u64.to_le_bytes());
        encode_list(&[0x3000], Some(0x9000), &mut out);
        assert_eq!(out.len(), 16);
        assert_eq!(out[8..], 0x9000u64.to_le_bytes());
    }

    #[test]
    fn list_chaining() {
        let entries: Vec<u64> = (0..10).collect();
        // Four entries a page: 3 + link, 3 + link, 4.
        let pages = list_pages(&entries, 4);
        assert_eq!(pages.len(), 3);
        assert_eq!(pages[0], &[0, 1, 2]);
        assert_eq!(pages[1], &[3, 4, 5]);
        assert_eq!(pages[2], &[6, 7, 8, 9]);
        // Exactly full: no link needed.
        assert_eq!(list_pages(&entries[..4], 4), vec![&entries[..4]]);
        // One over: a link, then two entries.
        assert_eq!(list_pages(&entries[..5], 4).len(), 2);
        assert!(list_pages(&entries, 1).is_empty());
        // 4 KiB pages hold 512 entries: a 4 MiB transfer (1023 list entries) needs 2 pages,
        // 8 MiB (2047) needs 5.
        let big: Vec<u64> = (0..2047).collect();
        let lens = |n: usize| {
            list_pages(&big[..n], 512)
                .iter()
                .map(|p| p.len())
                .collect::<Vec<_>>()
        };
        assert_eq!(lens(1023), vec![511, 512]);
        assert_eq!(lens(2047), vec![511, 511, 511, 511, 3]);
    }
}
