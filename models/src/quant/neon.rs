//! aarch64 kernels (NEON, and the dot-product extension where the CPU has it), chosen at run
//! time. Each weight block is decoded once into 8-bit vectors and multiplied with up to
//! [`ROW_GROUP`] activation rows. Integer block sums are exact, so whichever instructions form
//! them (`sdot`, or `smull` + `sadalp`), each block's sum equals the portable one; the float
//! terms then go through the portable functions (`legacy_term`, `kquant_term`, [`Combine`]), so
//! the results are the portable bits, which the tests check.

use std::arch::aarch64::*;

use super::portable::legacy_offset;
use super::{
    Activations, Combine, Format, QK, QK_K, ROW_GROUP, f16_at, kquant_term, legacy_term,
    scales_mins_k4,
};

/// Whether this CPU runs the NEON kernels (every aarch64 Linux CPU does).
pub(crate) fn neon_available() -> bool {
    std::arch::is_aarch64_feature_detected!("neon")
}

/// Whether this CPU also has the 8-bit dot-product instructions (Armv8.2 `dotprod`:
/// Cortex-A55/A76 and later, Neoverse, Apple; not the Cortex-A53/A72 of a Raspberry Pi 3/4).
pub(crate) fn dotprod_available() -> bool {
    neon_available() && std::arch::is_aarch64_feature_detected!("dotprod")
}

/// How four-lane partial sums of 16 byte products are formed. The lanes differ between the
/// two, their total (the only thing the kernels read) does not.
trait Dot {
    /// `acc` plus the 16 products `a[i]·b[i]`, spread over four `i32` lanes.
    fn dot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t;
}

/// Plain NEON: widening multiplies to `i16` (a product of two bytes always fits), then pairs
/// added into the `i32` lanes.
struct Widen;

impl Dot for Widen {
    #[inline(always)]
    fn dot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        // SAFETY: NEON is part of every aarch64 target.
        unsafe {
            let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
            let hi = vmull_high_s8(a, b);
            vpadalq_s16(vpadalq_s16(acc, lo), hi)
        }
    }
}

/// `sdot`: four products added into each `i32` lane in one instruction. Its intrinsic is not
/// stable in Rust yet, so it is written as assembly; only called from functions compiled with
/// the `dotprod` feature, on CPUs that have it.
struct Sdot;

impl Dot for Sdot {
    #[inline(always)]
    fn dot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        // SAFETY: a register-only instruction; reached only on CPUs with `dotprod` (see
        // `dotprod_available`).
        unsafe {
            std::arch::asm!(
                "sdot {0:v}.4s, {1:v}.16b, {2:v}.16b",
                inout(vreg) acc,
                in(vreg) a,
                in(vreg) b,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        acc
    }
}

/// Dot products of the weight rows in `w` (`row_bytes` each) with activation rows
/// `r0..r0+rows` (`rows <= ROW_GROUP`), into `out` laid out `[rows][columns]`, with plain
/// NEON.
///
/// # Safety
/// The CPU must have NEON ([`neon_available`]).
#[target_feature(enable = "neon")]
pub(crate) unsafe fn dot_tile(
    format: Format,
    w: &[u8],
    row_bytes: usize,
    acts: &Activations,
    r0: usize,
    rows: usize,
    out: &mut [f32],
) {
    tile::<Widen>(format, w, row_bytes, acts, r0, rows, out)
}

/// [`dot_tile`] with the dot-product instructions.
///
/// # Safety
/// The CPU must have NEON and `dotprod` ([`dotprod_available`]).
#[target_feature(enable = "neon,dotprod")]
pub(crate) unsafe fn dot_tile_dotprod(
    format: Format,
    w: &[u8],
    row_bytes: usize,
    acts: &Activations,
    r0: usize,
    rows: usize,
    out: &mut [f32],
) {
    tile::<Sdot>(format, w, row_bytes, acts, r0, rows, out)
}

#[inline(always)]
fn tile<D: Dot>(
    format: Format,
    w: &[u8],
    row_bytes: usize,
    acts: &Activations,
    r0: usize,
    rows: usize,
    out: &mut [f32],
) {
    debug_assert!((1..=ROW_GROUP).contains(&rows));
    let ncols = w.len() / row_bytes;
    for (j, wj) in w.chunks_exact(row_bytes).enumerate() {
        let mut acc: [Combine; ROW_GROUP] = std::array::from_fn(|_| Combine::new());
        let acc = &mut acc[..rows];
        match format {
            Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q8_0 => {
                legacy_row::<D>(format, wj, acts, r0, acc)
            }
            Format::Q4K | Format::Q5K => k4_row::<D>(format, wj, acts, r0, acc),
            Format::Q6K => q6k_row::<D>(wj, acts, r0, acc),
            Format::F32 | Format::F16 => unreachable!("float matrices use the f32 dot"),
        }
        for (r, a) in acc.iter().enumerate() {
            out[r * ncols + j] = a.finish();
        }
    }
}

/// Loads 16 bytes.
#[inline(always)]
fn load_u8(b: &[u8]) -> uint8x16_t {
    assert!(b.len() >= 16);
    // SAFETY: 16 bytes are in bounds (checked); NEON loads need no alignment.
    unsafe { vld1q_u8(b.as_ptr()) }
}

/// Loads 16 activation values.
#[inline(always)]
fn load_i8(b: &[i8]) -> int8x16_t {
    assert!(b.len() >= 16);
    // SAFETY: as in `load_u8`.
    unsafe { vld1q_s8(b.as_ptr()) }
}

/// 16 bytes whose byte `i` is 16 where bit `i` of `bits` (16 bits) is set, else 0.
#[inline(always)]
fn bits_to_16(bits: u16) -> uint8x16_t {
    const MASK: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
    // SAFETY: NEON is part of every aarch64 target; the mask is 16 bytes.
    unsafe {
        let [lo, hi] = bits.to_le_bytes();
        let v = vcombine_u8(vdup_n_u8(lo), vdup_n_u8(hi));
        vandq_u8(vtstq_u8(v, vld1q_u8(MASK.as_ptr())), vdupq_n_u8(16))
    }
}

/// The 32 stored integers of a legacy block in value order, as two vectors (unsigned before
/// the offset for Q4_0/Q4_1/Q5_0, signed for Q8_0; all fit a signed byte).
#[inline(always)]
fn decode_legacy(format: Format, blk: &[u8]) -> [int8x16_t; 2] {
    // SAFETY: NEON is part of every aarch64 target.
    unsafe {
        match format {
            Format::Q8_0 => [
                vreinterpretq_s8_u8(load_u8(&blk[2..18])),
                vreinterpretq_s8_u8(load_u8(&blk[18..34])),
            ],
            _ => {
                let qs = load_u8(&blk[blk.len() - 16..]);
                let mut lo = vandq_u8(qs, vdupq_n_u8(0x0F));
                let mut hi = vshrq_n_u8::<4>(qs);
                if format == Format::Q5_0 {
                    lo = vorrq_u8(lo, bits_to_16(u16::from_le_bytes([blk[2], blk[3]])));
                    hi = vorrq_u8(hi, bits_to_16(u16::from_le_bytes([blk[4], blk[5]])));
                }
                [vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi)]
            }
        }
    }
}

/// `f(r)` for each row `r` of the group `r0..r0 + rows` (empty past it): the rows' slices of
/// the activations, looked up once per column instead of once per block.
#[inline(always)]
fn per_row<'a, T>(rows: usize, r0: usize, f: impl Fn(usize) -> &'a [T]) -> [&'a [T]; ROW_GROUP] {
    std::array::from_fn(|i| if i < rows { f(r0 + i) } else { &[] })
}

#[inline(always)]
fn legacy_row<D: Dot>(format: Format, w: &[u8], a: &Activations, r0: usize, acc: &mut [Combine]) {
    let bb = format.block().1;
    let offset = legacy_offset(format);
    let n = acc.len();
    let q = per_row(n, r0, |r| a.q_row(r));
    let d = per_row(n, r0, |r| a.d_row(r));
    let sums = per_row(n, r0, |r| a.sums_row(r));
    let s = per_row(n, r0, |r| a.s_row(r));
    for (b, blk) in w.chunks_exact(bb).enumerate() {
        let [w0, w1] = decode_legacy(format, blk);
        let dw = f16_at(blk, 0);
        let mw = (format == Format::Q4_1).then(|| f16_at(blk, 2));
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = &q[r][b * QK..(b + 1) * QK];
            // SAFETY: NEON is part of every aarch64 target.
            let v = unsafe { vdupq_n_s32(0) };
            let v = D::dot(D::dot(v, w0, load_i8(x)), w1, load_i8(&x[16..]));
            // SAFETY: as above.
            let isum = unsafe { vaddvq_s32(v) } - offset * sums[r][b];
            let mw_sx = mw.map(|m| (m, s[r][b]));
            acc.add(b, legacy_term(dw, d[r][b], isum, mw_sx));
        }
    }
}

#[inline(always)]
fn k4_row<D: Dot>(format: Format, w: &[u8], a: &Activations, r0: usize, acc: &mut [Combine]) {
    let bb = format.block().1;
    let n = acc.len();
    let xq = per_row(n, r0, |r| a.q_row(r));
    let d = per_row(n, r0, |r| a.d_row(r));
    let sums32 = per_row(n, r0, |r| a.sums32_row(r));
    for (b, blk) in w.chunks_exact(bb).enumerate() {
        let (sc, mn) = scales_mins_k4(&blk[4..16]);
        let (qh, qs) = match format {
            Format::Q4K => (None, &blk[16..144]),
            _ => (Some(&blk[16..48]), &blk[48..176]),
        };
        // SAFETY: NEON is part of every aarch64 target.
        let zero = unsafe { vdupq_n_s32(0) };
        let mut vsum = [zero; ROW_GROUP];
        for c in 0..4 {
            // Chunk `c`: 32 bytes whose low nibbles are sub-block 2c and high nibbles 2c+1.
            let q = &qs[c * 32..(c + 1) * 32];
            // v[h] = [low nibbles, high nibbles] of bytes 16h..16h+16 (Q5_K: plus bit 4).
            let v: [[int8x16_t; 2]; 2] = [0, 16].map(|h| {
                let qv = load_u8(&q[h..]);
                // SAFETY: NEON is part of every aarch64 target.
                unsafe {
                    let mut lo = vandq_u8(qv, vdupq_n_u8(0x0F));
                    let mut hi = vshrq_n_u8::<4>(qv);
                    if let Some(qh) = qh {
                        let hv = load_u8(&qh[h..]);
                        let bit =
                            |s: usize| vandq_u8(vtstq_u8(hv, vdupq_n_u8(1 << s)), vdupq_n_u8(16));
                        lo = vorrq_u8(lo, bit(2 * c));
                        hi = vorrq_u8(hi, bit(2 * c + 1));
                    }
                    [vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi)]
                }
            });
            for (r, vs) in vsum.iter_mut().enumerate().take(acc.len()) {
                let x = &xq[r][b * QK_K + c * 64..];
                let lo = D::dot(
                    D::dot(zero, v[0][0], load_i8(x)),
                    v[1][0],
                    load_i8(&x[16..]),
                );
                let hi = D::dot(
                    D::dot(zero, v[0][1], load_i8(&x[32..])),
                    v[1][1],
                    load_i8(&x[48..]),
                );
                // SAFETY: NEON is part of every aarch64 target.
                unsafe {
                    *vs = vmlaq_n_s32(*vs, lo, sc[2 * c] as i32);
                    *vs = vmlaq_n_s32(*vs, hi, sc[2 * c + 1] as i32);
                }
            }
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let s32 = &sums32[r][b * 8..(b + 1) * 8];
            let imin: i32 = mn.iter().zip(s32).map(|(&m, &s)| m as i32 * s).sum();
            // SAFETY: NEON is part of every aarch64 target.
            let isum = unsafe { vaddvq_s32(vsum[r]) };
            let term = kquant_term(f16_at(blk, 0), f16_at(blk, 2), d[r][b], isum, imin);
            acc.add(b, term);
        }
    }
}

#[inline(always)]
fn q6k_row<D: Dot>(w: &[u8], a: &Activations, r0: usize, acc: &mut [Combine]) {
    let n = acc.len();
    let q = per_row(n, r0, |r| a.q_row(r));
    let d = per_row(n, r0, |r| a.d_row(r));
    let sums = per_row(n, r0, |r| a.sums_row(r));
    for (b, blk) in w.chunks_exact(210).enumerate() {
        let scales = &blk[192..208];
        // SAFETY: NEON is part of every aarch64 target.
        let zero = unsafe { vdupq_n_s32(0) };
        let mut vsum = [zero; ROW_GROUP];
        for half in 0..2 {
            let (ql, qh) = (&blk[half * 64..], &blk[128 + half * 32..]);
            // The 128 values of this half in eight groups of 16 (see `decode_q6k`).
            // SAFETY: NEON is part of every aarch64 target.
            let g: [int8x16_t; 8] = unsafe {
                let m4 = vdupq_n_u8(0x0F);
                let m2 = vdupq_n_u8(0x03);
                let l = [0, 16, 32, 48].map(|o| load_u8(&ql[o..]));
                let h = [0, 16].map(|o| load_u8(&qh[o..]));
                let hb = |i: usize, s: u8| -> uint8x16_t {
                    let v = match s {
                        0 => h[i],
                        2 => vshrq_n_u8::<2>(h[i]),
                        4 => vshrq_n_u8::<4>(h[i]),
                        _ => vshrq_n_u8::<6>(h[i]),
                    };
                    vshlq_n_u8::<4>(vandq_u8(v, m2))
                };
                [
                    vorrq_u8(vandq_u8(l[0], m4), hb(0, 0)),
                    vorrq_u8(vandq_u8(l[1], m4), hb(1, 0)),
                    vorrq_u8(vandq_u8(l[2], m4), hb(0, 2)),
                    vorrq_u8(vandq_u8(l[3], m4), hb(1, 2)),
                    vorrq_u8(vshrq_n_u8::<4>(l[0]), hb(0, 4)),
                    vorrq_u8(vshrq_n_u8::<4>(l[1]), hb(1, 4)),
                    vorrq_u8(vshrq_n_u8::<4>(l[2]), hb(0, 6)),
                    vorrq_u8(vshrq_n_u8::<4>(l[3]), hb(1, 6)),
                ]
                .map(|v| vreinterpretq_s8_u8(v))
            };
            for (r, vs) in vsum.iter_mut().enumerate().take(acc.len()) {
                let x = &q[r][b * QK_K + half * 128..];
                for (i, &gv) in g.iter().enumerate() {
                    let p = D::dot(zero, gv, load_i8(&x[i * 16..]));
                    let sc = scales[half * 8 + i] as i8 as i32;
                    // SAFETY: NEON is part of every aarch64 target.
                    *vs = unsafe { vmlaq_n_s32(*vs, p, sc) };
                }
            }
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let bs = &sums[r][b * 16..(b + 1) * 16];
            let smin: i32 = scales
                .iter()
                .zip(bs)
                .map(|(&s, &x)| s as i8 as i32 * x)
                .sum();
            // SAFETY: NEON is part of every aarch64 target.
            let isum = unsafe { vaddvq_s32(vsum[r]) } - 32 * smin;
            let term = kquant_term(f16_at(blk, 208), 0.0, d[r][b], isum, 0);
            acc.add(b, term);
        }
    }
}
