//! CRC-32C (Castagnoli) helpers: fast appending of runs of zero bytes, and
//! fast detection of all-zero pages.
//!
//! Memory chunks are checksummed as if holes were zeros. Hashing the zeros
//! would cost as much as hashing data, so instead we use the linearity of
//! CRCs: `crc(A ‖ 0ⁿ) = shiftₙ(crc(A)) ⊕ crc(0ⁿ)`, where `shiftₙ` is a
//! fixed GF(2) linear map. We precompute `shiftₙ` (as byte-sliced lookup
//! tables) and `crc(0ⁿ)` for every `n = 4096·2ʲ`, so appending `k` zero
//! pages costs one table step per set bit of `k`.

use std::sync::OnceLock;

/// The granule of [`append_zeros`]' fast path: one 4 KiB page.
const ZERO_UNIT: u64 = 4096;
/// Number of power-of-two steps precomputed: enough for any `u64` length
/// (`len / 4 KiB < 2⁵²`), so [`append_zeros`] is total.
const STEPS: usize = 53;

/// A linear map on CRC values, as four byte-sliced lookup tables.
struct Shift {
    tables: [[u32; 256]; 4],
}

impl Shift {
    /// Builds the tables from the images of the 32 basis vectors.
    fn from_columns(cols: &[u32; 32]) -> Shift {
        let mut tables = [[0u32; 256]; 4];
        for (b, table) in tables.iter_mut().enumerate() {
            for (v, slot) in table.iter_mut().enumerate() {
                let mut acc = 0;
                for bit in 0..8 {
                    if v & (1 << bit) != 0 {
                        acc ^= cols[b * 8 + bit];
                    }
                }
                *slot = acc;
            }
        }
        Shift { tables }
    }

    /// Applies the map.
    fn apply(&self, x: u32) -> u32 {
        self.tables[0][(x & 0xff) as usize]
            ^ self.tables[1][((x >> 8) & 0xff) as usize]
            ^ self.tables[2][((x >> 16) & 0xff) as usize]
            ^ self.tables[3][(x >> 24) as usize]
    }
}

/// `shift` and `crc(0ⁿ)` for `n = ZERO_UNIT · 2ʲ`.
struct ZeroTables {
    shift: Vec<Shift>,
    zero_crc: Vec<u32>,
}

fn tables() -> &'static ZeroTables {
    static TABLES: OnceLock<ZeroTables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut cols = [0u32; 32];
        for (i, c) in cols.iter_mut().enumerate() {
            // combine(x, 0, n) = shiftₙ(x): the image of basis vector i.
            *c = crc32c::crc32c_combine(1 << i, 0, ZERO_UNIT as usize);
        }
        let mut shift = vec![Shift::from_columns(&cols)];
        let mut zero_crc = vec![crc32c::crc32c(&[0u8; ZERO_UNIT as usize])];
        for j in 1..STEPS {
            let prev = &shift[j - 1];
            // shift₂ₙ = shiftₙ ∘ shiftₙ; crc(0²ⁿ) = shiftₙ(crc(0ⁿ)) ⊕ crc(0ⁿ).
            let mut next = [0u32; 32];
            for (i, c) in next.iter_mut().enumerate() {
                *c = prev.apply(prev.apply(1 << i));
            }
            let z = zero_crc[j - 1];
            zero_crc.push(prev.apply(z) ^ z);
            shift.push(Shift::from_columns(&next));
        }
        ZeroTables { shift, zero_crc }
    })
}

/// Returns the CRC-32C of `data` appended to a stream whose CRC so far is `crc`.
#[inline]
pub fn append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

/// Returns the CRC-32C of `len` zero bytes appended to a stream whose CRC so
/// far is `crc`, without hashing the zeros.
pub fn append_zeros(mut crc: u32, len: u64) -> u32 {
    let units = len / ZERO_UNIT;
    let rest = (len % ZERO_UNIT) as usize;
    if units > 0 {
        let t = tables();
        let mut u = units;
        let mut j = 0;
        while u != 0 {
            if u & 1 != 0 {
                crc = t.shift[j].apply(crc) ^ t.zero_crc[j];
            }
            u >>= 1;
            j += 1;
        }
    }
    if rest > 0 {
        crc = crc32c::crc32c_append(crc, &ZERO_PAGE[..rest]);
    }
    crc
}

/// A page of zeros.
static ZERO_PAGE: [u8; ZERO_UNIT as usize] = [0; ZERO_UNIT as usize];

/// Returns true if every byte of `page` is zero.
///
/// ORs 256-byte blocks word by word (the compiler vectorizes this) and
/// stops at the first block with a set bit, so a typical non-zero page
/// costs one block and a zero page one pass at memory speed.
#[inline]
pub fn is_zero(page: &[u8]) -> bool {
    let mut blocks = page.chunks_exact(256);
    for block in &mut blocks {
        let mut acc = 0u64;
        for w in block.chunks_exact(8) {
            acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod huge_len_tests {
    #[test]
    fn append_zeros_accepts_any_length() {
        // Must not panic; lengths this large never occur in a real file.
        let _ = super::append_zeros(0, u64::MAX);
        let _ = super::append_zeros(0x1234_5678, 1 << 60);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_match_hashing() {
        for &seed in &[0u32, 1, 0xdead_beef, 0xffff_ffff] {
            for &len in &[
                0u64,
                1,
                100,
                4096,
                4097,
                8192,
                3 * 4096 + 5,
                2 << 20,
                (2 << 20) + 4096 * 7,
            ] {
                let want = crc32c::crc32c_append(seed, &vec![0u8; len as usize]);
                assert_eq!(append_zeros(seed, len), want, "seed {seed:x} len {len}");
            }
        }
    }

    #[test]
    fn zero_detection() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        for i in [0, 63, 64, 255, 256, 2048, 4095] {
            page[i] = 1;
            assert!(!is_zero(&page), "byte {i}");
            page[i] = 0;
        }
        assert!(is_zero(&page[..100]));
        assert!(!is_zero(&[0, 0, 3]));
    }
}
