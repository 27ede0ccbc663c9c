//! Copies to and from memory that other processes (a peer host, a VMM, a device model) read
//! and write at the same time.
//!
//! A plain `memcpy` racing with another writer is a data race in Rust's memory model, and the
//! compiler may assume the bytes do not change under it. Here no access to shared memory is a
//! plain one: the ends of a copy (and any copy of up to 8 aligned bytes, a register) are atomic
//! loads or stores as wide as the alignment and the remaining length allow (8, 4, 2 or 1
//! bytes), so a register-sized access is a single access, as a PCIe TLP of that size would
//! be; the aligned middle of a larger copy is volatile 32-byte AVX accesses on x86-64 CPUs
//! that have AVX, 16-byte SSE2 ones on the others (8-byte atomics off x86-64): each one
//! instruction that the compiler may not merge, split, repeat or assume stable, as vm-memory
//! treats guest memory. (With 16-byte accesses a 4 KiB copy ran at 0.8 of `memcpy`.)
//! Ordering comes from the release/acquire protocol words the callers use (a mailbox commit
//! word, a doorbell), so these are relaxed.
//! (vm-memory keeps register-sized accesses whole too, but hands larger copies to `memcpy`.)

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};

/// Bytes per access in the aligned middle of a copy without AVX.
#[cfg(target_arch = "x86_64")]
const BODY: usize = 16;
#[cfg(not(target_arch = "x86_64"))]
const BODY: usize = 8;

/// Bytes per access with AVX.
#[cfg(target_arch = "x86_64")]
const BODY_AVX: usize = 32;

/// Bytes per access in the aligned middle of a copy on this CPU (the alignment the middle
/// starts at, too).
fn body_width() -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        return BODY_AVX;
    }
    BODY
}

/// The aligned middle of a copy from shared memory, `width` ([`body_width`]) bytes per access.
///
/// # Safety
/// `src` is `width`-aligned and valid for reads of `dst.len()` bytes, a multiple of `width`.
unsafe fn load_body(dst: &mut [u8], src: *const u8, width: usize) {
    #[cfg(target_arch = "x86_64")]
    if width == BODY_AVX {
        // SAFETY: `body_width` chose 32 only on a CPU with AVX; the range is the caller's.
        unsafe { body_load_avx(dst, src) };
        return;
    }
    for (i, chunk) in dst.chunks_exact_mut(BODY).enumerate() {
        // SAFETY: `src` is BODY-aligned and chunk `i` lies inside the caller's range.
        unsafe { body_load(chunk, src.add(BODY * i)) };
    }
}

/// The aligned middle of a copy into shared memory (see [`load_body`]).
///
/// # Safety
/// `dst` is `width`-aligned and valid for writes of `src.len()` bytes, a multiple of `width`.
unsafe fn store_body(dst: *mut u8, src: &[u8], width: usize) {
    #[cfg(target_arch = "x86_64")]
    if width == BODY_AVX {
        // SAFETY: as in `load_body`.
        unsafe { body_store_avx(dst, src) };
        return;
    }
    for (i, chunk) in src.chunks_exact(BODY).enumerate() {
        // SAFETY: `dst` is BODY-aligned and chunk `i` lies inside the caller's range.
        unsafe { body_store(dst.add(BODY * i), chunk) };
    }
}

/// [`load_body`] with volatile 32-byte AVX loads, each one instruction.
///
/// # Safety
/// The CPU has AVX; `src` is 32-byte aligned and valid for reads of `dst.len()` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn body_load_avx(dst: &mut [u8], src: *const u8) {
    use std::arch::x86_64::{__m256i, _mm256_storeu_si256};
    // Four loads before their four stores, so that the loads are in flight together.
    let mut blocks = dst.chunks_exact_mut(4 * BODY_AVX);
    let mut at = src.cast::<__m256i>();
    for block in &mut blocks {
        // SAFETY: `at` .. `at + 4` are 32-byte aligned and readable (caller: `block` is the
        // next 128 bytes of the range); `block` holds 128 bytes for the unaligned stores; AVX
        // is there (caller).
        unsafe {
            let v0 = std::ptr::read_volatile(at);
            let v1 = std::ptr::read_volatile(at.add(1));
            let v2 = std::ptr::read_volatile(at.add(2));
            let v3 = std::ptr::read_volatile(at.add(3));
            let out = block.as_mut_ptr().cast::<__m256i>();
            _mm256_storeu_si256(out, v0);
            _mm256_storeu_si256(out.add(1), v1);
            _mm256_storeu_si256(out.add(2), v2);
            _mm256_storeu_si256(out.add(3), v3);
            at = at.add(4);
        }
    }
    for chunk in blocks.into_remainder().chunks_exact_mut(BODY_AVX) {
        // SAFETY: as above, one access.
        unsafe {
            _mm256_storeu_si256(chunk.as_mut_ptr().cast(), std::ptr::read_volatile(at));
            at = at.add(1);
        }
    }
}

/// [`store_body`] with volatile 32-byte AVX stores, each one instruction.
///
/// # Safety
/// The CPU has AVX; `dst` is 32-byte aligned and valid for writes of `src.len()` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn body_store_avx(dst: *mut u8, src: &[u8]) {
    use std::arch::x86_64::{__m256i, _mm256_loadu_si256};
    for (i, chunk) in src.chunks_exact(BODY_AVX).enumerate() {
        // SAFETY: `chunk` holds 32 bytes (unaligned load); `dst + 32 i` is 32-byte aligned
        // and writable (caller); AVX is there (caller).
        unsafe {
            let v = _mm256_loadu_si256(chunk.as_ptr().cast());
            std::ptr::write_volatile(dst.add(BODY_AVX * i).cast::<__m256i>(), v);
        }
    }
}

/// One aligned access of the middle of a copy from shared memory: a volatile 16-byte SSE2
/// load on x86-64 (one instruction, never merged, split or repeated by the compiler), an
/// atomic 8-byte load elsewhere.
///
/// # Safety
/// `src` is `BODY`-aligned and valid for reads of `BODY` bytes; `dst.len() == BODY`.
#[cfg(target_arch = "x86_64")]
unsafe fn body_load(dst: &mut [u8], src: *const u8) {
    use std::arch::x86_64::{__m128i, _mm_storeu_si128};
    // SAFETY: `src` is 16-byte aligned and readable (caller); `dst` holds 16 bytes, and the
    // unaligned store is SSE2, which every x86-64 CPU has.
    unsafe {
        let v = std::ptr::read_volatile(src.cast::<__m128i>());
        _mm_storeu_si128(dst.as_mut_ptr().cast(), v);
    }
}

/// See the x86-64 version.
///
/// # Safety
/// As there.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn body_load(dst: &mut [u8], src: *const u8) {
    // SAFETY: aligned and readable (caller); only ever accessed atomically here.
    let v = unsafe { AtomicU64::from_ptr(src.cast_mut().cast()).load(Relaxed) };
    dst.copy_from_slice(&v.to_ne_bytes());
}

/// One aligned access of the middle of a copy into shared memory (see [`body_load`]).
///
/// # Safety
/// `dst` is `BODY`-aligned and valid for writes of `BODY` bytes; `src.len() == BODY`.
#[cfg(target_arch = "x86_64")]
unsafe fn body_store(dst: *mut u8, src: &[u8]) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128};
    // SAFETY: `src` holds 16 bytes (unaligned SSE2 load); `dst` is 16-byte aligned and
    // writable (caller).
    unsafe {
        let v = _mm_loadu_si128(src.as_ptr().cast());
        std::ptr::write_volatile(dst.cast::<__m128i>(), v);
    }
}

/// See the x86-64 version.
///
/// # Safety
/// As there.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn body_store(dst: *mut u8, src: &[u8]) {
    let mut word = [0u8; 8];
    word.copy_from_slice(src);
    // SAFETY: aligned and writable (caller); only ever accessed atomically here.
    unsafe { AtomicU64::from_ptr(dst.cast()).store(u64::from_ne_bytes(word), Relaxed) };
}

/// The widest access (8, 4, 2 or 1 bytes) that `addr` is aligned for and `left` allows.
fn width(addr: usize, left: usize) -> usize {
    let mut w = 8;
    while w > 1 && (!addr.is_multiple_of(w) || left < w) {
        w /= 2;
    }
    w
}

/// Copies `dst.len()` bytes from shared memory at `src` into `dst`.
///
/// # Safety
/// `src .. src + dst.len()` must be valid for reads for the whole call (a live mapping), and
/// must be accessed by this process only atomically (as [`crate::SharedMemory`] ensures).
pub(crate) unsafe fn copy_from_shared(dst: &mut [u8], src: *const u8) {
    let len = dst.len();
    // Head (until `src` is aligned for the middle's accesses) and tail: the widest access
    // each position allows.
    let wide = body_width();
    let head = ((src as usize).wrapping_neg() % wide).min(len);
    let body_end = head + (len - head) / wide * wide;
    let mut done = 0;
    while done < len {
        if done == head && done < body_end {
            if let Some(body) = dst.get_mut(head..body_end) {
                // SAFETY: `src + head` is `wide`-aligned, and the body lies inside the
                // caller's range and is a multiple of `wide` long.
                unsafe { load_body(body, src.add(head), wide) };
            }
            done = body_end;
            continue;
        }
        // SAFETY: `done < len`, so `src + done` is inside the range the caller vouches for.
        let at = unsafe { src.add(done) };
        let w = width(at as usize, len - done);
        // SAFETY: (each arm) `at` is aligned for the width chosen (see `width`), the `w` bytes
        // from it lie inside the range (`w <= len - done`), and they are only ever accessed
        // atomically by this process; other processes are outside this program's memory model.
        let bytes: [u8; 8] = unsafe {
            match w {
                8 => AtomicU64::from_ptr(at.cast_mut().cast())
                    .load(Relaxed)
                    .to_ne_bytes(),
                4 => widen(
                    &AtomicU32::from_ptr(at.cast_mut().cast())
                        .load(Relaxed)
                        .to_ne_bytes(),
                ),
                2 => widen(
                    &AtomicU16::from_ptr(at.cast_mut().cast())
                        .load(Relaxed)
                        .to_ne_bytes(),
                ),
                _ => widen(&[AtomicU8::from_ptr(at.cast_mut()).load(Relaxed)]),
            }
        };
        if let (Some(d), Some(s)) = (dst.get_mut(done..done + w), bytes.get(..w)) {
            d.copy_from_slice(s);
        }
        done += w;
    }
}

/// Copies `src` into shared memory at `dst`.
///
/// # Safety
/// `dst .. dst + src.len()` must be valid for writes for the whole call, and accessed by this
/// process only atomically.
pub(crate) unsafe fn copy_to_shared(dst: *mut u8, src: &[u8]) {
    let len = src.len();
    let wide = body_width();
    let head = ((dst as usize).wrapping_neg() % wide).min(len);
    let body_end = head + (len - head) / wide * wide;
    let mut done = 0;
    while done < len {
        if done == head && done < body_end {
            if let Some(body) = src.get(head..body_end) {
                // SAFETY: as in `copy_from_shared`'s body.
                unsafe { store_body(dst.add(head), body, wide) };
            }
            done = body_end;
            continue;
        }
        // SAFETY: `done < len`: inside the caller's range.
        let at = unsafe { dst.add(done) };
        let w = width(at as usize, len - done);
        let mut bytes = [0u8; 8];
        if let (Some(d), Some(s)) = (bytes.get_mut(..w), src.get(done..done + w)) {
            d.copy_from_slice(s);
        }
        // SAFETY: (each arm) as in `copy_from_shared`: aligned, inside the range, atomic only.
        unsafe {
            match w {
                8 => AtomicU64::from_ptr(at.cast()).store(u64::from_ne_bytes(bytes), Relaxed),
                4 => AtomicU32::from_ptr(at.cast())
                    .store(u32::from_ne_bytes(narrow(&bytes)), Relaxed),
                2 => AtomicU16::from_ptr(at.cast())
                    .store(u16::from_ne_bytes(narrow(&bytes)), Relaxed),
                _ => AtomicU8::from_ptr(at).store(bytes[0], Relaxed),
            }
        }
        done += w;
    }
}

/// Fills `len` bytes of shared memory at `dst` with `byte`.
///
/// # Safety
/// As for [`copy_to_shared`].
pub(crate) unsafe fn fill_shared(dst: *mut u8, len: usize, byte: u8) {
    let pattern = [byte; 512];
    let mut done = 0;
    while done < len {
        let chunk = (len - done).min(pattern.len());
        // SAFETY: `dst + done .. dst + done + chunk` is inside the caller's range.
        unsafe { copy_to_shared(dst.add(done), pattern.get(..chunk).unwrap_or(&[])) };
        done += chunk;
    }
}

fn widen<const N: usize>(b: &[u8; N]) -> [u8; 8] {
    let mut out = [0u8; 8];
    if let Some(d) = out.get_mut(..N) {
        d.copy_from_slice(b);
    }
    out
}

fn narrow<const N: usize>(b: &[u8; 8]) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(s) = b.get(..N) {
        out.copy_from_slice(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_follow_alignment_and_length() {
        assert_eq!(width(0x1000, 100), 8);
        assert_eq!(width(0x1004, 100), 4);
        assert_eq!(width(0x1004, 3), 2);
        assert_eq!(width(0x1001, 100), 1);
        assert_eq!(width(0x1000, 0), 1);
    }

    #[test]
    fn copies_of_every_alignment_and_length_round_trip() {
        let mut shared = vec![0u64; 64];
        let base = shared.as_mut_ptr().cast::<u8>();
        let src: Vec<u8> = (0..200u8).collect();
        // Every start within two 32-byte accesses (the widest the middle uses), and lengths
        // around each access width.
        for start in 0..66 {
            for len in [
                0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 200,
            ] {
                // SAFETY: `start + len <= 265 < 512` bytes of `shared`, only accessed here.
                unsafe {
                    fill_shared(base, 512, 0xee);
                    copy_to_shared(base.add(start), src.get(..len).unwrap());
                }
                let mut back = vec![0u8; len + 2];
                // SAFETY: as above.
                unsafe { copy_from_shared(&mut back, base.add(start)) };
                assert_eq!(back.get(..len).unwrap(), src.get(..len).unwrap());
                assert_eq!(back.get(len..).unwrap(), &[0xee, 0xee], "{start} {len}");
            }
        }
    }
}
