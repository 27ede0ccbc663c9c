//! Shorthands the unit tests of this crate share: BARs, BAR specifications and MSI-X layouts.

use crate::config::{BarRegion, MsixLayout};
use crate::{BarIndex, BarSpec};

/// BAR `i` (0 to 5).
pub(crate) fn bar(i: u8) -> BarIndex {
    BarIndex::new(i).unwrap()
}

/// A memory BAR of `size` bytes.
pub(crate) fn bar_spec(size: u64, is_64bit: bool, prefetchable: bool) -> BarSpec {
    BarSpec {
        size,
        is_64bit,
        prefetchable,
    }
}

/// `vectors` MSI-X vectors with the table at `table_offset` and the PBA at `pba_offset` of
/// `bar`.
pub(crate) const fn msix_in(
    bar: BarIndex,
    vectors: u16,
    table_offset: u32,
    pba_offset: u32,
) -> MsixLayout {
    MsixLayout {
        vectors,
        table: BarRegion {
            bar,
            offset: table_offset,
        },
        pba: BarRegion {
            bar,
            offset: pba_offset,
        },
    }
}
