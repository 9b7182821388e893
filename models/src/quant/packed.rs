//! Eight-column interleaved copies of Q4_K and Q6_K matrices, made once at load for the x86
//! kernels.
//!
//! A matrix is cut into groups of eight consecutive columns (weight rows); a group holds one
//! record per super-block, records in `k` order, groups one after the other, so a tile of
//! columns (a multiple of eight) is one contiguous range. Within a record, four quantized
//! weights of each of the eight columns at the same `k` positions fill one 32-byte vector
//! (column `c` in 32-bit lane `c`): one `vpdpbusd` against four activation bytes broadcast to
//! every lane adds four products to each of eight columns, so a column's sums never need a
//! horizontal reduction, and the scales of eight columns are applied as one vector.
//!
//! The integers and float operations per column are those of the portable kernel (see the
//! parent module), so the results are the same bits; only the memory layout differs.

use super::{Format, scales_mins_k4};

/// Columns per group.
pub(crate) const COLS: usize = 8;

/// Bytes of a Q4_K record (eight columns, one super-block), 32-byte aligned:
/// `d` 8 × f16 at [`Q4K_D`], `dmin` 8 × f16 at [`Q4K_DMIN`], the 6-bit scales unpacked to
/// bytes `[sub-block 8][column 8]` at [`Q4K_SC`], the minimums `[pair 4][column 8][2]` at
/// [`Q4K_MN`] (an i16 pair per column once widened), and the nibbles at [`Q4K_QS`]:
/// `[pair p 4][t 8][column 8][4]`, byte `i` = the column's packed byte `32p + 4t + i` (low
/// nibble: value `64p + 4t + i`, high nibble: value `64p + 32 + 4t + i`).
pub(crate) const Q4K_REC: usize = 1184;
pub(crate) const Q4K_D: usize = 0;
pub(crate) const Q4K_DMIN: usize = 16;
pub(crate) const Q4K_SC: usize = 32;
pub(crate) const Q4K_MN: usize = 96;
pub(crate) const Q4K_QS: usize = 160;

/// Bytes of a Q6_K record, 32-byte aligned (16 bytes of padding): the low nibbles at
/// [`Q6K_QL`] as `[half h 2][part 2][t 8][column 8][4]` (byte = the column's `ql[64h + 32·part
/// + 4t + i]`), the high bits at [`Q6K_QH`] as `[h 2][t 8][column 8][4]` (byte =
/// `qh[32h + 4t + i]`), the signed scales `[group 16][column 8]` at [`Q6K_SC`], `d` 8 × f16 at
/// [`Q6K_D`].
pub(crate) const Q6K_REC: usize = 1696;
pub(crate) const Q6K_QL: usize = 0;
pub(crate) const Q6K_QH: usize = 1024;
pub(crate) const Q6K_SC: usize = 1536;
pub(crate) const Q6K_D: usize = 1664;

/// Bytes of a legacy record (eight columns, one 32-value block): eight times the block. `d` 8 ×
/// f16 at 0; Q4_1's minimums 8 × f16 at 16; then the values: Q4_0, Q4_1 and Q5_0 nibbles
/// `[t 4][column 8][4]` (byte = the column's `qs[4t + i]`: low nibble value `4t + i`, high
/// `16 + 4t + i`); Q5_0's fifth bits after them, 32 bytes, one byte per `(t, column)` —
/// bits 0–3 those of values `4t..4t + 4`, bits 4–7 those of `16 + 4t..` — the first 16 bytes
/// for columns 0–3 (`[t][column]`), the last 16 for columns 4–7 (so that a byte shuffle
/// within each 128-bit half finds them); Q8_0 values `[t 8][column 8][4]`, signed.
pub(crate) fn legacy_rec(format: Format) -> usize {
    COLS * format.block().1
}

/// Where the values of a legacy record start.
pub(crate) fn legacy_qs(format: Format) -> usize {
    if format == Format::Q4_1 { 32 } else { 16 }
}

/// A 64-byte-aligned piece of a packed matrix.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A matrix in the eight-column layout.
pub(crate) struct Packed {
    lines: Vec<Line>,
    len: usize,
    /// Bytes per record.
    pub rec: usize,
    /// Records (super-blocks) per group.
    pub nb: usize,
}

impl Packed {
    /// All records.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `Line` is 64 plain bytes; `len` is at most the lines' byte length.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const u8, self.len) }
    }

    /// The records of columns `cols` (whole groups).
    pub fn columns(&self, cols: std::ops::Range<usize>) -> &[u8] {
        debug_assert!(cols.start.is_multiple_of(COLS) && cols.end.is_multiple_of(COLS));
        let per = self.nb * self.rec;
        &self.bytes()[cols.start / COLS * per..cols.end / COLS * per]
    }
}

/// The packed copy of `raw` (`out_dim` rows of `row_bytes`), for the formats and shapes that
/// have one: Q4_0, Q4_1, Q5_0, Q8_0, Q4_K and Q6_K with a multiple of eight columns.
pub(crate) fn pack(format: Format, raw: &[u8], out_dim: usize, row_bytes: usize) -> Option<Packed> {
    let (rec, bb) = match format {
        Format::Q4K => (Q4K_REC, 144),
        Format::Q6K => (Q6K_REC, 210),
        Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q8_0 => {
            (legacy_rec(format), format.block().1)
        }
        _ => return None,
    };
    if out_dim == 0 || !out_dim.is_multiple_of(COLS) || raw.len() != out_dim * row_bytes {
        return None;
    }
    let nb = row_bytes / bb;
    let len = out_dim / COLS * nb * rec;
    let mut lines = vec![Line([0; 64]); len.div_ceil(64)];
    // SAFETY: as in `bytes`, mutably; the lines are initialised.
    let out = unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u8, len) };
    let group = |(g, dst): (usize, &mut [u8])| {
        for (b, r) in dst.chunks_exact_mut(rec).enumerate() {
            for c in 0..COLS {
                let at = (g * COLS + c) * row_bytes + b * bb;
                let blk = &raw[at..at + bb];
                match format {
                    Format::Q4K => q4k_column(r, c, blk),
                    Format::Q6K => q6k_column(r, c, blk),
                    _ => legacy_column(format, r, c, blk),
                }
            }
        }
    };
    #[cfg(not(target_arch = "wasm32"))]
    {
        use rayon::prelude::*;
        out.par_chunks_mut(nb * rec).enumerate().for_each(group);
    }
    #[cfg(target_arch = "wasm32")]
    out.chunks_mut(nb * rec).enumerate().for_each(group);
    Some(Packed {
        lines,
        len,
        rec,
        nb,
    })
}

/// Writes column `c` of a Q4_K record from its 144-byte super-block.
fn q4k_column(r: &mut [u8], c: usize, blk: &[u8]) {
    r[Q4K_D + 2 * c..Q4K_D + 2 * c + 2].copy_from_slice(&blk[0..2]);
    r[Q4K_DMIN + 2 * c..Q4K_DMIN + 2 * c + 2].copy_from_slice(&blk[2..4]);
    let (sc, mn) = scales_mins_k4(&blk[4..16]);
    for j in 0..8 {
        r[Q4K_SC + 8 * j + c] = sc[j];
        r[Q4K_MN + 16 * (j / 2) + 2 * c + j % 2] = mn[j];
    }
    let qs = &blk[16..144];
    for p in 0..4 {
        for t in 0..8 {
            let at = Q4K_QS + 32 * (8 * p + t) + 4 * c;
            r[at..at + 4].copy_from_slice(&qs[32 * p + 4 * t..32 * p + 4 * t + 4]);
        }
    }
}

/// Writes column `c` of a legacy record from its block.
fn legacy_column(format: Format, r: &mut [u8], c: usize, blk: &[u8]) {
    r[2 * c..2 * c + 2].copy_from_slice(&blk[0..2]);
    let qs_at = legacy_qs(format);
    match format {
        Format::Q8_0 => {
            for t in 0..8 {
                let at = qs_at + 32 * t + 4 * c;
                r[at..at + 4].copy_from_slice(&blk[2 + 4 * t..2 + 4 * t + 4]);
            }
            return;
        }
        Format::Q4_1 => r[16 + 2 * c..16 + 2 * c + 2].copy_from_slice(&blk[2..4]),
        _ => {}
    }
    let qs = &blk[blk.len() - 16..];
    for t in 0..4 {
        let at = qs_at + 32 * t + 4 * c;
        r[at..at + 4].copy_from_slice(&qs[4 * t..4 * t + 4]);
    }
    if format == Format::Q5_0 {
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        for t in 0..4 {
            let lo = (qh >> (4 * t)) & 0xF;
            let hi = (qh >> (16 + 4 * t)) & 0xF;
            r[qs_at + 128 + 16 * (c / 4) + 4 * t + c % 4] = (lo | hi << 4) as u8;
        }
    }
}

/// Writes column `c` of a Q6_K record from its 210-byte super-block.
fn q6k_column(r: &mut [u8], c: usize, blk: &[u8]) {
    let (ql, qh) = (&blk[0..128], &blk[128..192]);
    for h in 0..2 {
        for t in 0..8 {
            for part in 0..2 {
                let at = Q6K_QL + 32 * (8 * (2 * h + part) + t) + 4 * c;
                let from = 64 * h + 32 * part + 4 * t;
                r[at..at + 4].copy_from_slice(&ql[from..from + 4]);
            }
            let at = Q6K_QH + 32 * (8 * h + t) + 4 * c;
            r[at..at + 4].copy_from_slice(&qh[32 * h + 4 * t..32 * h + 4 * t + 4]);
        }
    }
    for g in 0..16 {
        r[Q6K_SC + 8 * g + c] = blk[192 + g];
    }
    r[Q6K_D + 2 * c..Q6K_D + 2 * c + 2].copy_from_slice(&blk[208..210]);
}

const _: () = assert!(Q4K_QS + 1024 == Q4K_REC && Q4K_REC.is_multiple_of(32));
const _: () = assert!(Q6K_D + 16 + 16 == Q6K_REC && Q6K_REC.is_multiple_of(32));
