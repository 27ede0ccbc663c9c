use super::*;
use crate::config::{BarRegion, MsixLayout};
use crate::BarIndex;

#[derive(Default)]
struct Recorder(Mutex<Vec<u16>>);

impl InterruptSink for Recorder {
    fn signal(&self, vector: u16) {
        self.0.lock().unwrap().push(vector);
    }
}

impl Recorder {
    fn take(&self) -> Vec<u16> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

const BAR2: BarIndex = BarIndex::ALL[2];
const BAR4: BarIndex = BarIndex::ALL[4];

fn layout(vectors: u16) -> MsixLayout {
    MsixLayout {
        vectors,
        table: BarRegion {
            bar: BAR2,
            offset: 0x1000,
        },
        pba: BarRegion {
            bar: BAR4,
            offset: 0x0,
        },
    }
}

fn table(vectors: u16) -> (MsixTable, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    (MsixTable::new(layout(vectors), rec.clone()), rec)
}

fn unmask(t: &MsixTable, v: u16) {
    assert!(t.bar_write(
        BAR2,
        0x1000 + u64::from(v) * ENTRY_LEN + ENTRY_VECTOR_CONTROL,
        &0u32.to_le_bytes()
    ));
}

fn mask(t: &MsixTable, v: u16) {
    t.table_write(
        u64::from(v) * ENTRY_LEN + ENTRY_VECTOR_CONTROL,
        &1u32.to_le_bytes(),
    );
}

fn pba(t: &MsixTable) -> u64 {
    let mut b = [0u8; 8];
    assert!(t.bar_read(BAR4, 0, &mut b));
    u64::from_le_bytes(b)
}

#[test]
fn power_on_state_masks_everything() {
    let (t, rec) = table(4);
    for v in 0..4 {
        assert_eq!(t.is_masked(v), Some(true));
    }
    assert_eq!(t.is_masked(4), None);
    assert_eq!(t.control(), (false, false));
    assert!(!t.trigger(0));
    assert!(rec.take().is_empty());
    assert_eq!(pba(&t), 1);
}

#[test]
fn delivery_needs_enable_and_both_masks_clear() {
    // (enable, function mask, vector mask, delivered)
    let cases = [
        (false, false, false, false),
        (true, true, false, false),
        (true, false, true, false),
        (true, true, true, false),
        (true, false, false, true),
    ];
    for (enable, fmask, vmask, want) in cases {
        let (t, rec) = table(4);
        t.set_control(enable, fmask);
        if !vmask {
            unmask(&t, 2);
        }
        assert_eq!(t.trigger(2), want, "{enable} {fmask} {vmask}");
        assert_eq!(rec.take(), if want { vec![2] } else { vec![] });
        assert_eq!(t.is_pending(2), !want);
    }
}

#[test]
fn pending_is_delivered_when_vector_unmasked() {
    let (t, rec) = table(4);
    t.set_control(true, false);
    t.trigger(1);
    t.trigger(1);
    assert_eq!(pba(&t), 0b10);
    assert!(rec.take().is_empty());
    unmask(&t, 1);
    assert_eq!(
        rec.take(),
        vec![1],
        "one message for the latched pending bit"
    );
    assert_eq!(pba(&t), 0);
    // Masked again: latches again.
    mask(&t, 1);
    t.trigger(1);
    assert!(rec.take().is_empty());
    assert!(t.is_pending(1));
}

#[test]
fn function_mask_and_enable_release_pending() {
    let (t, rec) = table(4);
    unmask(&t, 0);
    unmask(&t, 3);
    t.trigger(0); // disabled: latched
    t.set_control(true, true);
    t.trigger(3); // function-masked: latched
    t.trigger(1); // vector-masked: latched
    assert!(rec.take().is_empty());
    assert_eq!(pba(&t), 0b1011);
    t.set_control(true, false);
    assert_eq!(rec.take(), vec![0, 3]);
    assert_eq!(pba(&t), 0b0010, "vector 1 is still masked");
}

#[test]
fn table_reads_and_writes() {
    let (t, _) = table(4);
    let base = 0x1000 + ENTRY_LEN; // vector 1
                                   // 8-byte write of the address, 4-byte writes of data and control.
    assert!(t.bar_write(BAR2, base, &0x0000_0001_fee0_1003u64.to_le_bytes()));
    assert!(t.bar_write(BAR2, base + ENTRY_DATA, &0x4041u32.to_le_bytes()));
    assert_eq!(
        t.message(1),
        Some(MsixMessage {
            address: 0x1_fee0_1000,
            data: 0x4041
        })
    );
    let mut q = [0u8; 8];
    assert!(t.bar_read(BAR2, base + ENTRY_DATA, &mut q));
    assert_eq!(
        u64::from_le_bytes(q),
        0x0000_0001_0000_4041,
        "data and control (masked)"
    );
    // 8-byte write of data + control unmasks; reserved control bits read zero.
    assert!(t.bar_write(
        BAR2,
        base + ENTRY_DATA,
        &0xffff_fffe_0000_0042u64.to_le_bytes()
    ));
    assert_eq!(t.is_masked(1), Some(false));
    let mut d = [0u8; 4];
    t.table_read(ENTRY_LEN + ENTRY_VECTOR_CONTROL, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0);
}

#[test]
fn bad_accesses_are_ignored() {
    let (t, rec) = table(4);
    t.set_control(true, false);
    // Misaligned, wrong-size, out-of-table writes change nothing.
    let writes: &[(u64, &[u8])] = &[
        (ENTRY_VECTOR_CONTROL + 1, &[0, 0, 0, 0]),
        (ENTRY_VECTOR_CONTROL, &[0, 0]),
        (ENTRY_VECTOR_CONTROL, &[0]),
        (ENTRY_DATA + 4, &[0; 8]),
        (4 * ENTRY_LEN, &[0; 4]),
        (u64::MAX - 3, &[0; 4]),
    ];
    for &(off, data) in writes {
        t.table_write(off, data);
    }
    for v in 0..4 {
        assert_eq!(t.is_masked(v), Some(true));
    }
    let mut b = [0u8; 2];
    t.table_read(0, &mut b);
    assert_eq!(b, [0xff, 0xff]);
    let mut b = [0u8; 4];
    t.table_read(4 * ENTRY_LEN, &mut b);
    assert_eq!(b, [0xff; 4]);
    // PBA writes are dropped.
    t.trigger(0);
    assert!(t.bar_write(BAR4, 0, &[0; 8]));
    assert_eq!(pba(&t), 1);
    assert!(rec.take().is_empty());
    // Outside both regions the table does not claim the access.
    assert!(!t.bar_read(BAR2, 0x0, &mut b));
    assert!(!t.bar_write(BAR2, 0x1000 + 4 * ENTRY_LEN, &b));
    assert!(!t.bar_read(BAR4, 8, &mut b));
    assert!(!t.bar_read(BarIndex::ALL[0], 0x1000, &mut b));
    assert!(!t.trigger(4));
}

#[test]
fn pba_word_halves_and_many_vectors() {
    let (t, _) = table(100);
    t.trigger(3);
    t.trigger(64);
    t.trigger(99);
    let mut d = [0u8; 4];
    t.pba_read(0, &mut d);
    assert_eq!(u32::from_le_bytes(d), 1 << 3);
    t.pba_read(4, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0);
    let mut q = [0u8; 8];
    t.pba_read(8, &mut q);
    assert_eq!(u64::from_le_bytes(q), 1 | 1 << 35);
    t.pba_read(16, &mut q);
    assert_eq!(q, [0xff; 8], "beyond the PBA");
}

#[test]
fn reset_restores_power_on() {
    let (t, rec) = table(4);
    t.set_control(true, false);
    unmask(&t, 0);
    t.table_write(0, &0xfee0_0000u32.to_le_bytes());
    mask(&t, 1);
    t.trigger(1);
    t.reset();
    assert_eq!(t.control(), (false, false));
    assert_eq!(t.is_masked(0), Some(true));
    assert!(!t.is_pending(1));
    assert_eq!(t.message(0), Some(MsixMessage::default()));
    assert!(rec.take().is_empty());
}

#[test]
fn entry_constants_match_the_spec_layout() {
    assert_eq!(
        [
            ENTRY_ADDR_LO,
            ENTRY_ADDR_HI,
            ENTRY_DATA,
            ENTRY_VECTOR_CONTROL,
            ENTRY_LEN
        ],
        [0, 4, 8, 12, 16]
    );
}
