//! The portable kernels: plain Rust, any CPU and wasm. They define the result every other
//! path reproduces bit for bit: exact integer block sums, then the fixed float combination
//! of the parent module.

use super::{
    Activations, Combine, Format, QK, QK_K, ROW_GROUP, f16_at, kquant_term, legacy_term,
    scale_min_k4,
};

/// Dot products of the weight rows in `w` (`row_bytes` each) with activation rows
/// `r0..r0+rows`, into `out` laid out `[rows][columns]`.
pub(crate) fn dot_tile(
    format: Format,
    w: &[u8],
    row_bytes: usize,
    acts: &Activations,
    r0: usize,
    rows: usize,
    out: &mut [f32],
) {
    let ncols = w.len() / row_bytes;
    debug_assert!(rows <= ROW_GROUP);
    for (j, wj) in w.chunks_exact(row_bytes).enumerate() {
        for r in 0..rows {
            out[r * ncols + j] = dot_row(format, wj, acts, r0 + r);
        }
    }
}

fn dot_row(format: Format, w: &[u8], a: &Activations, r: usize) -> f32 {
    let (_, bb) = format.block();
    let q = a.q_row(r);
    let d = a.d_row(r);
    let sums = a.sums_row(r);
    let mut acc = Combine::new();
    for (b, blk) in w.chunks_exact(bb).enumerate() {
        let term = match format {
            Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q8_0 => {
                let x = &q[b * QK..(b + 1) * QK];
                let mut wq = [0i32; QK];
                decode_legacy(format, blk, &mut wq);
                let mut isum: i32 = wq.iter().zip(x).map(|(&w, &x)| w * x as i32).sum();
                isum -= legacy_offset(format) * sums[b];
                let mw_sx = (format == Format::Q4_1).then(|| (f16_at(blk, 2), a.s_row(r)[b]));
                legacy_term(f16_at(blk, 0), d[b], isum, mw_sx)
            }
            Format::Q4K | Format::Q5K => {
                let x = &q[b * QK_K..(b + 1) * QK_K];
                let bs = &sums[b * 16..(b + 1) * 16];
                let mut wq = [0u8; QK_K];
                decode_k4(format, blk, &mut wq);
                let (mut isum, mut imin) = (0i32, 0i32);
                for j in 0..8 {
                    let (sc, m) = scale_min_k4(j, &blk[4..16]);

                    let sub: i32 = (j * 32..(j + 1) * 32)
                        .map(|i| wq[i] as i32 * x[i] as i32)
                        .sum();
                    isum += sc as i32 * sub;
                    imin += m as i32 * (bs[2 * j] + bs[2 * j + 1]);
                }
                kquant_term(f16_at(blk, 0), f16_at(blk, 2), d[b], isum, imin)
            }
            Format::Q6K => {
                let x = &q[b * QK_K..(b + 1) * QK_K];
                let bs = &sums[b * 16..(b + 1) * 16];
                let mut wq = [0u8; QK_K];
                decode_q6k(blk, &mut wq);
                let mut isum = 0i32;
                for g in 0..16 {
                    let sc = blk[192 + g] as i8 as i32;
                    let sub: i32 = (g * 16..(g + 1) * 16)
                        .map(|i| wq[i] as i32 * x[i] as i32)
                        .sum();
                    isum += sc * (sub - 32 * bs[g]);
                }
                kquant_term(f16_at(blk, 208), 0.0, d[b], isum, 0)
            }
            Format::F32 | Format::F16 => unreachable!("float matrices use the f32 dot"),
        };
        acc.add(b, term);
    }
    acc.finish()
}

/// What is subtracted from the unsigned stored value of a legacy format, times `Σx`.
pub(crate) fn legacy_offset(format: Format) -> i32 {
    match format {
        Format::Q4_0 => 8,
        Format::Q5_0 => 16,
        _ => 0,
    }
}

/// The 32 stored integers of a legacy block, in value order (unsigned for Q4_0/Q4_1/Q5_0,
/// before the offset; signed for Q8_0).
pub(crate) fn decode_legacy(format: Format, blk: &[u8], out: &mut [i32; QK]) {
    match format {
        Format::Q4_0 | Format::Q4_1 => {
            let qs = &blk[blk.len() - 16..];
            for i in 0..16 {
                out[i] = (qs[i] & 0x0F) as i32;
                out[i + 16] = (qs[i] >> 4) as i32;
            }
        }
        Format::Q5_0 => {
            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
            let qs = &blk[6..22];
            for i in 0..16 {
                out[i] = ((qs[i] & 0x0F) as u32 | (((qh >> i) & 1) << 4)) as i32;
                out[i + 16] = ((qs[i] >> 4) as u32 | (((qh >> (i + 16)) & 1) << 4)) as i32;
            }
        }
        Format::Q8_0 => {
            for i in 0..QK {
                out[i] = blk[2 + i] as i8 as i32;
            }
        }
        _ => unreachable!("not a legacy format"),
    }
}

/// The 256 unsigned stored values of a Q4_K or Q5_K super-block, in value order.
pub(crate) fn decode_k4(format: Format, blk: &[u8], out: &mut [u8; QK_K]) {
    let (qh, qs) = match format {
        Format::Q4K => (None, &blk[16..144]),
        _ => (Some(&blk[16..48]), &blk[48..176]),
    };
    for c in 0..4 {
        let q = &qs[c * 32..(c + 1) * 32];
        for l in 0..32 {
            let (mut lo, mut hi) = (q[l] & 0x0F, q[l] >> 4);
            if let Some(qh) = qh {
                lo |= ((qh[l] >> (2 * c)) & 1) << 4;
                hi |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
            }
            out[c * 64 + l] = lo;
            out[c * 64 + 32 + l] = hi;
        }
    }
}

/// The 256 unsigned 6-bit values (before the −32 offset) of a Q6_K super-block.
pub(crate) fn decode_q6k(blk: &[u8], out: &mut [u8; QK_K]) {
    let (ql, qh) = (&blk[0..128], &blk[128..192]);
    for half in 0..2 {
        let (ql, qh) = (&ql[half * 64..], &qh[half * 32..]);
        let o = &mut out[half * 128..];
        for l in 0..32 {
            o[l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
            o[l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
            o[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            o[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
}
