//! x86_64 kernels (AVX2 + FMA + F16C), chosen at run time. Integer block sums are exact, so
//! whatever the lane layout here, each block's sum equals the portable one; the float terms
//! are formed with the same operations in the same order (vector lane `l` of the legacy
//! kernels holds blocks `b ≡ l mod 8`, exactly the portable accumulator lanes).

use std::arch::x86_64::*;

use super::portable::legacy_offset;
use super::{Activations, Combine, Format, QK, QK_K, ROW_GROUP, scales_mins_k4};

/// Whether this CPU runs the AVX2 kernels.
pub(crate) fn avx2_available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// Whether this CPU runs the VNNI kernels (AVX-512 VNNI at 256-bit width).
pub(crate) fn vnni_available() -> bool {
    avx2_available()
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx512vl")
}

/// How far ahead of the block being computed the weight stream is prefetched.
const PREFETCH: usize = 1536;

/// Asks for the weight bytes `PREFETCH` past `p` (a hint: never faults).
#[target_feature(enable = "avx2")]
#[inline]
fn prefetch(p: *const u8) {
    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
}

const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q5_0: u8 = 2;
const Q8_0: u8 = 3;
const Q4K: u8 = 4;
const Q5K: u8 = 5;

/// Dispatches on the number of rows (1..=4) to a kernel instantiated for it.
macro_rules! by_rows {
    ($f:ident, $fmt:expr, $rows:expr, $args:tt) => {
        match $rows {
            1 => $f::<1, { $fmt }> $args,
            2 => $f::<2, { $fmt }> $args,
            3 => $f::<3, { $fmt }> $args,
            _ => $f::<4, { $fmt }> $args,
        }
    };
}

/// The kernels, instantiated once per feature set: `$vnni` replaces `vpmaddubsw` +
/// `vpmaddwd` by `vpdpbusd` and fuses the k-quant scale multiply-add into `vpdpwssd`. The
/// integer results are the same (exact), so both instantiations give the same bits.
macro_rules! kernels {
    ($module:ident, $tf:tt, $vnni:expr) => {
        // The VNNI calls need `unsafe` where the module lacks the feature (the AVX2
        // instantiation, whose branches are dead) and not where it has it.
        #[allow(unused_unsafe)]
        pub(crate) mod $module {
            use super::*;

/// Dot products of the weight rows in `w` (`row_bytes` each) with activation rows
/// `r0..r0+rows`, into `out` laid out `[rows][columns]`.
///
/// # Safety
/// The CPU must support this module's features (see [`super::Kernel`]); `w` holds whole rows of `format` blocks
/// matching `acts.k`.
#[target_feature(enable = $tf)]
pub(crate) unsafe fn dot_tile(
    format: Format,
    w: &[u8],
    row_bytes: usize,
    acts: &Activations,
    r0: usize,
    rows: usize,
    out: &mut [f32],
) {
    debug_assert!(rows <= ROW_GROUP);
    match format {
        Format::Q4_0 => by_rows!(legacy, Q4_0, rows, (w, row_bytes, acts, r0, out)),
        Format::Q4_1 => by_rows!(legacy, Q4_1, rows, (w, row_bytes, acts, r0, out)),
        Format::Q5_0 => by_rows!(legacy, Q5_0, rows, (w, row_bytes, acts, r0, out)),
        Format::Q8_0 => by_rows!(legacy, Q8_0, rows, (w, row_bytes, acts, r0, out)),
        Format::Q4K => by_rows!(kquant4, Q4K, rows, (w, row_bytes, acts, r0, out)),
        Format::Q5K => by_rows!(kquant4, Q5K, rows, (w, row_bytes, acts, r0, out)),
        Format::Q6K => by_rows!(q6k, 0, rows, (w, row_bytes, acts, r0, out)),
        Format::F32 | Format::F16 => unreachable!("float matrices use the f32 dot"),
    }
}

/// The legacy formats: 32-value blocks against Q8 activation blocks.
#[target_feature(enable = $tf)]
fn legacy<const R: usize, const F: u8>(
    tile: &[u8],
    row_bytes: usize,
    a: &Activations,
    r0: usize,
    out: &mut [f32],
) {
    let format = legacy_format(F);
    let (_, bb) = format.block();
    let nb = row_bytes / bb;
    let ncols = tile.len() / row_bytes;
    let qs_at = match F {
        Q4_0 => 2,
        Q4_1 => 4,
        Q5_0 => 6,
        _ => 2,
    };
    let off = legacy_offset(format);
    let q: [&[i8]; R] = std::array::from_fn(|r| a.q_row(r0 + r));
    let d: [&[f32]; R] = std::array::from_fn(|r| a.d_row(r0 + r));
    let sx: [&[f32]; R] = std::array::from_fn(|r| a.s_row(r0 + r));
    let sums: [&[i32]; R] = std::array::from_fn(|r| a.sums_row(r0 + r));
    let ones = _mm256_set1_epi16(1);
    let low4 = _mm_set1_epi8(0x0F);
    // Block sums of a group, kept across columns: zeroing 1 KiB per group on the stack
    // (a `memset` call) cost 9% of a prefill. Only a short last group needs its unused
    // entries cleared.
    let mut part = [[_mm256_setzero_si256(); 8]; R];
    for (j, w) in tile.chunks_exact(row_bytes).enumerate() {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut g = 0;
        while g < nb {
            let cnt = (nb - g).min(8);
            let mut dw = [0u16; 8];
            let mut mw = [0u16; 8];
            clear_unused(&mut part, cnt, 8);
            for i in 0..cnt {
                let blk = &w[(g + i) * bb..(g + i + 1) * bb];
                dw[i] = f16_bits(blk, 0);
                if F == Q4_1 {
                    mw[i] = f16_bits(blk, 2);
                }
                let x_at = (g + i) * QK;
                if F == Q8_0 {
                    // SAFETY: a Q8_0 block holds 32 signed bytes from offset 2.
                    let wv = unsafe { _mm256_loadu_si256(blk.as_ptr().add(2) as *const __m256i) };
                    let wabs = _mm256_sign_epi8(wv, wv);
                    for r in 0..R {
                        // SAFETY: row `r` has `nb * 32` values.
                        let xv = unsafe {
                            _mm256_loadu_si256(q[r].as_ptr().add(x_at) as *const __m256i)
                        };
                        let sx = _mm256_sign_epi8(xv, wv);
                        part[r][i] = if $vnni {
                            // SAFETY: this instantiation is compiled with AVX-512 VNNI + VL.
                            unsafe { _mm256_dpbusd_epi32(_mm256_setzero_si256(), wabs, sx) }
                        } else {
                            _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, sx), ones)
                        };
                    }
                } else {
                    // SAFETY: 16 nibble bytes end the block.
                    let bytes =
                        unsafe { _mm_loadu_si128(blk.as_ptr().add(qs_at) as *const __m128i) };
                    let lo = _mm_and_si128(bytes, low4);
                    let hi = _mm_and_si128(_mm_srli_epi16::<4>(bytes), low4);
                    let mut wv = _mm256_set_m128i(hi, lo);
                    if F == Q5_0 {
                        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                        wv = _mm256_or_si256(wv, bits_to_bytes(qh, 0x10));
                    }
                    for r in 0..R {
                        // SAFETY: row `r` has `nb * 32` values.
                        let xv = unsafe {
                            _mm256_loadu_si256(q[r].as_ptr().add(x_at) as *const __m256i)
                        };
                        part[r][i] = if $vnni {
                            // SAFETY: this instantiation is compiled with AVX-512 VNNI + VL.
                            unsafe { _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv, xv) }
                        } else {
                            _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones)
                        };
                    }
                }
            }
            let dwv = f16x8(&dw);
            for r in 0..R {
                let mut isum = hsum8(&part[r]);
                if off != 0 {
                    let s = load8i(sums[r], g);
                    isum = _mm256_sub_epi32(isum, _mm256_mullo_epi32(s, _mm256_set1_epi32(off)));
                }
                let mut t =
                    _mm256_mul_ps(_mm256_mul_ps(dwv, load8(d[r], g)), _mm256_cvtepi32_ps(isum));
                if F == Q4_1 {
                    t = _mm256_add_ps(t, _mm256_mul_ps(f16x8(&mw), load8(sx[r], g)));
                }
                acc[r] = _mm256_add_ps(acc[r], t);
            }
            g += 8;
        }
        for r in 0..R {
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` holds eight values.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r]) };
            out[r * ncols + j] = Combine::from_lanes(lanes).finish();
        }
    }
}

/// Q4_K and Q5_K: 256-value super-blocks, eight sub-blocks of 32 with 6-bit scales/mins.
#[target_feature(enable = $tf)]
fn kquant4<const R: usize, const F: u8>(
    tile: &[u8],
    row_bytes: usize,
    a: &Activations,
    r0: usize,
    out: &mut [f32],
) {
    let bb = if F == Q4K { 144 } else { 176 };
    let qs_at = if F == Q4K { 16 } else { 48 };
    let nb = row_bytes / bb;
    let ncols = tile.len() / row_bytes;
    let q: [&[i8]; R] = std::array::from_fn(|r| a.q_row(r0 + r));
    let d: [&[f32]; R] = std::array::from_fn(|r| a.d_row(r0 + r));
    let s32: [&[i32]; R] = std::array::from_fn(|r| a.sums32_row(r0 + r));
    let low4 = _mm256_set1_epi8(0x0F);
    let one8 = _mm256_set1_epi8(1);
    // Kept across columns (see `legacy`).
    let mut parts = [[_mm256_setzero_si256(); 8]; R];
    for (j, w) in tile.chunks_exact(row_bytes).enumerate() {
        let mut acc = [[_mm_setzero_ps(); 2]; R];
        let mut b = 0;
        while b < nb {
            clear_unused(&mut parts, (nb - b).min(4), 4);
            let mut dd = [0u16; 8];
            let mut dm = [0u16; 8];
            for i in 0..(nb - b).min(4) {
                let blk = &w[(b + i) * bb..(b + i + 1) * bb];
                prefetch(blk.as_ptr());
                prefetch(blk.as_ptr().wrapping_add(64));
                dd[i] = f16_bits(blk, 0);
                dm[i] = f16_bits(blk, 2);
                let (sc, mn) = scales_mins_k4(&blk[4..16]);
                // SAFETY: eight bytes.
                let mnv =
                    _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(mn.as_ptr() as *const __m128i) });
                // SAFETY (loads below): the block has 128 nibble bytes from `qs_at` and, for
                // Q5_K, 32 high-bit bytes from 16; each activation row has `nb * 256` values
                // and `nb * 8` per-32 sums.
                let mut qh = if F == Q5K {
                    unsafe { _mm256_loadu_si256(blk.as_ptr().add(16) as *const __m256i) }
                } else {
                    _mm256_setzero_si256()
                };
                let mut isum = [_mm256_setzero_si256(); R];
                for c in 0..4 {
                    let qv = unsafe {
                        _mm256_loadu_si256(blk.as_ptr().add(qs_at + 32 * c) as *const __m256i)
                    };
                    let mut lo = _mm256_and_si256(qv, low4);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(qv), low4);
                    if F == Q5K {
                        lo =
                            _mm256_or_si256(lo, _mm256_slli_epi16::<4>(_mm256_and_si256(qh, one8)));
                        let h1 = _mm256_and_si256(_mm256_srli_epi16::<1>(qh), one8);
                        hi = _mm256_or_si256(hi, _mm256_slli_epi16::<4>(h1));
                        qh = _mm256_srli_epi16::<2>(qh);
                    }
                    let s_lo = _mm256_set1_epi16(sc[2 * c] as i16);
                    let s_hi = _mm256_set1_epi16(sc[2 * c + 1] as i16);
                    for r in 0..R {
                        let x = q[r].as_ptr();
                        let at = (b + i) * QK_K + 64 * c;
                        let x_lo = unsafe { _mm256_loadu_si256(x.add(at) as *const __m256i) };
                        let x_hi = unsafe { _mm256_loadu_si256(x.add(at + 32) as *const __m256i) };
                        let m_lo = _mm256_maddubs_epi16(lo, x_lo);
                        let m_hi = _mm256_maddubs_epi16(hi, x_hi);
                        isum[r] = if $vnni {
                            // SAFETY: this instantiation is compiled with AVX-512 VNNI + VL.
                            unsafe {
                                _mm256_dpwssd_epi32(_mm256_dpwssd_epi32(isum[r], m_lo, s_lo), m_hi, s_hi)
                            }
                        } else {
                            let p_lo = _mm256_madd_epi16(m_lo, s_lo);
                            let p_hi = _mm256_madd_epi16(m_hi, s_hi);
                            _mm256_add_epi32(isum[r], _mm256_add_epi32(p_lo, p_hi))
                        };
                    }
                }
                for r in 0..R {
                    let s = unsafe {
                        _mm256_loadu_si256(s32[r].as_ptr().add(8 * (b + i)) as *const __m256i)
                    };
                    parts[r][i] = isum[r];
                    parts[r][4 + i] = _mm256_mullo_epi32(mnv, s);
                }
            }
            // SAFETY: this kernel is compiled with AVX2, FMA and F16C.
            unsafe { kquant_group(&parts, &dd, &dm, &d, b, 0, &mut acc) };
            b += 4;
        }
        for r in 0..R {
            out[r * ncols + j] = finish_lanes(&acc[r]);
        }
    }
}

/// Q6_K: 256-value super-blocks, sixteen sub-blocks of 16 with signed 8-bit scales.
#[target_feature(enable = $tf)]
fn q6k<const R: usize, const F: u8>(
    tile: &[u8],
    row_bytes: usize,
    a: &Activations,
    r0: usize,
    out: &mut [f32],
) {
    const BB: usize = 210;
    let nb = row_bytes / BB;
    let ncols = tile.len() / row_bytes;
    let q: [&[i8]; R] = std::array::from_fn(|r| a.q_row(r0 + r));
    let d: [&[f32]; R] = std::array::from_fn(|r| a.d_row(r0 + r));
    let bs: [&[i32]; R] = std::array::from_fn(|r| a.sums_row(r0 + r));
    let low4 = _mm256_set1_epi8(0x0F);
    let three = _mm256_set1_epi8(3);
    let zero16 = [0u16; 8];
    // Kept across columns (see `legacy`).
    let mut parts = [[_mm256_setzero_si256(); 8]; R];
    for (j, w) in tile.chunks_exact(row_bytes).enumerate() {
        let mut acc = [[_mm_setzero_ps(); 2]; R];
        let mut b = 0;
        while b < nb {
            clear_unused(&mut parts, (nb - b).min(4), 4);
            let mut dd = [0u16; 8];
            for i in 0..(nb - b).min(4) {
                let blk = &w[(b + i) * BB..(b + i + 1) * BB];
                for l in (0..BB).step_by(64) {
                    prefetch(blk.as_ptr().wrapping_add(l));
                }
                dd[i] = f16_bits(blk, 208);
                // SAFETY (loads below): 16 scale bytes at 192, ql 128 bytes at 0, qh 64
                // bytes at 128; each activation row has `nb * 256` values and `nb * 16`
                // per-16 sums.
                let scb = unsafe { _mm_loadu_si128(blk.as_ptr().add(192) as *const __m128i) };
                let sc_lo = _mm256_cvtepi8_epi32(scb);
                let sc_hi = _mm256_cvtepi8_epi32(_mm_srli_si128::<8>(scb));
                // Scales of the sixteen 16-value groups as i16 pairs per 32-value vector:
                // vector v covers groups 2v (low 128 bits) and 2v + 1 (high 128 bits).
                let sc16 = _mm256_cvtepi8_epi16(scb);
                let mut isum = [_mm256_setzero_si256(); R];
                for half in 0..2 {
                    let p = blk.as_ptr();
                    let ql0 = unsafe { _mm256_loadu_si256(p.add(64 * half) as *const __m256i) };
                    let ql1 =
                        unsafe { _mm256_loadu_si256(p.add(64 * half + 32) as *const __m256i) };
                    let qh =
                        unsafe { _mm256_loadu_si256(p.add(128 + 32 * half) as *const __m256i) };
                    let hb = |v: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(v, three));
                    let wq = [
                        _mm256_or_si256(_mm256_and_si256(ql0, low4), hb(qh)),
                        _mm256_or_si256(
                            _mm256_and_si256(ql1, low4),
                            hb(_mm256_srli_epi16::<2>(qh)),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low4),
                            hb(_mm256_srli_epi16::<4>(qh)),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low4),
                            hb(_mm256_srli_epi16::<6>(qh)),
                        ),
                    ];
                    for (i4, &wv) in wq.iter().enumerate() {
                        let v = half * 4 + i4;
                        let scv = scale_pair(sc16, v);
                        for r in 0..R {
                            let at = (b + i) * QK_K + 32 * v;
                            let xv = unsafe {
                                _mm256_loadu_si256(q[r].as_ptr().add(at) as *const __m256i)
                            };
                            let m = _mm256_maddubs_epi16(wv, xv);
                            isum[r] = if $vnni {
                                // SAFETY: this instantiation is compiled with AVX-512 VNNI + VL.
                                unsafe { _mm256_dpwssd_epi32(isum[r], m, scv) }
                            } else {
                                _mm256_add_epi32(isum[r], _mm256_madd_epi16(m, scv))
                            };
                        }
                    }
                }
                for r in 0..R {
                    let p = unsafe { bs[r].as_ptr().add(16 * (b + i)) };
                    let s_lo = unsafe { _mm256_loadu_si256(p as *const __m256i) };
                    let s_hi = unsafe { _mm256_loadu_si256(p.add(8) as *const __m256i) };
                    parts[r][i] = isum[r];
                    parts[r][4 + i] = _mm256_add_epi32(
                        _mm256_mullo_epi32(sc_lo, s_lo),
                        _mm256_mullo_epi32(sc_hi, s_hi),
                    );
                }
            }
            // SAFETY: this kernel is compiled with AVX2, FMA and F16C.
            unsafe { kquant_group(&parts, &dd, &zero16, &d, b, 5, &mut acc) };
            b += 4;
        }
        for r in 0..R {
            out[r * ncols + j] = finish_lanes(&acc[r]);
        }
    }
}

        }
    };
}

kernels!(avx2, "avx2,fma,f16c", false);
kernels!(vnni, "avx2,fma,f16c,avx512vnni,avx512vl", true);

const fn legacy_format(f: u8) -> Format {
    match f {
        Q4_0 => Format::Q4_0,
        Q4_1 => Format::Q4_1,
        Q5_0 => Format::Q5_0,
        _ => Format::Q8_0,
    }
}

/// 32 bits spread to 32 bytes: byte `i` is `val` where bit `i` is set, else 0.
#[target_feature(enable = "avx2")]
#[inline]
fn bits_to_bytes(bits: u32, val: i8) -> __m256i {
    let v = _mm256_set1_epi32(bits as i32);
    let shuf = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let bytes = _mm256_shuffle_epi8(v, shuf);
    let mask = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let sel = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, mask), mask);
    _mm256_and_si256(sel, _mm256_set1_epi8(val))
}

/// Zeroes the entries of a short last group that its blocks do not write: block slots
/// `used..per` and, for the k-quants (`per == 4`), their minimum slots `4 + used..8`.
#[target_feature(enable = "avx2")]
#[inline]
fn clear_unused<const R: usize>(parts: &mut [[__m256i; 8]; R], used: usize, per: usize) {
    if used == per {
        return;
    }
    for p in parts.iter_mut() {
        for i in used..per {
            p[i] = _mm256_setzero_si256();
            if per == 4 {
                p[4 + i] = _mm256_setzero_si256();
            }
        }
    }
}

/// Eight vectors of i32 partial sums → one vector of their eight totals (exact).
#[target_feature(enable = "avx2")]
#[inline]
fn hsum8(v: &[__m256i; 8]) -> __m256i {
    let h01 = _mm256_hadd_epi32(v[0], v[1]);
    let h23 = _mm256_hadd_epi32(v[2], v[3]);
    let h45 = _mm256_hadd_epi32(v[4], v[5]);
    let h67 = _mm256_hadd_epi32(v[6], v[7]);
    let a = _mm256_hadd_epi32(h01, h23);
    let b = _mm256_hadd_epi32(h45, h67);
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(a, b),
        _mm256_permute2x128_si256::<0x31>(a, b),
    )
}

#[inline(always)]
fn f16_bits(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

/// Eight f16 values (raw bits) as f32 (exact conversion). Built in registers: eight narrow
/// stores followed by a wide load would stall on store forwarding.
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn f16x8(b: &[u16; 8]) -> __m256 {
    let v = _mm_setr_epi16(
        b[0] as i16,
        b[1] as i16,
        b[2] as i16,
        b[3] as i16,
        b[4] as i16,
        b[5] as i16,
        b[6] as i16,
        b[7] as i16,
    );
    _mm256_cvtph_ps(v)
}

/// Eight f32 from `src[at..]`, zero past the end.
#[target_feature(enable = "avx2")]
#[inline]
fn load8(src: &[f32], at: usize) -> __m256 {
    if at + 8 <= src.len() {
        // SAFETY: eight values are in bounds.
        unsafe { _mm256_loadu_ps(src.as_ptr().add(at)) }
    } else {
        // Built in registers: a copy to a stack array and a wide load would call `memcpy`
        // and stall on store forwarding, on every row of a short matrix.
        let v = |i: usize| src.get(at + i).copied().unwrap_or(0.0);
        _mm256_setr_ps(v(0), v(1), v(2), v(3), v(4), v(5), v(6), v(7))
    }
}

/// Four f32 from `src[at..]`, zero past the end.
#[target_feature(enable = "avx2")]
#[inline]
fn load4(src: &[f32], at: usize) -> __m128 {
    if at + 4 <= src.len() {
        // SAFETY: four values are in bounds.
        unsafe { _mm_loadu_ps(src.as_ptr().add(at)) }
    } else {
        let v = |i: usize| src.get(at + i).copied().unwrap_or(0.0);
        _mm_setr_ps(v(0), v(1), v(2), v(3))
    }
}

/// Eight i32 from `src[at..]`, zero past the end.
#[target_feature(enable = "avx2")]
#[inline]
fn load8i(src: &[i32], at: usize) -> __m256i {
    if at + 8 <= src.len() {
        // SAFETY: eight values are in bounds.
        return unsafe { _mm256_loadu_si256(src.as_ptr().add(at) as *const __m256i) };
    }
    let v = |i: usize| src.get(at + i).copied().unwrap_or(0);
    _mm256_setr_epi32(v(0), v(1), v(2), v(3), v(4), v(5), v(6), v(7))
}

/// Float terms of four k-quant super-blocks `b..b+4` of each row, from their exact integer
/// sums: `parts[r][i]` holds the lanes of super-block `b + i`'s scaled sum and
/// `parts[r][4 + i]` those of its minimum sum. The terms are
/// `(d · d_x) · isum − (dmin · d_x) · isum_min` (as [`super::kquant_term`]) and go to accumulator
/// lanes `b % 8 ..`, as in the portable path; missing super-blocks are zeros and add +0.
///
/// Not a `#[target_feature]` function, so that it can be inlined into the kernels always.
///
/// # Safety
/// Only for callers compiled with AVX2, FMA and F16C.
#[inline(always)]
unsafe fn kquant_group<const R: usize>(
    parts: &[[__m256i; 8]; R],
    dd: &[u16; 8],
    dm: &[u16; 8],
    d: &[&[f32]; R],
    b: usize,
    min_shift: i32,
    acc: &mut [[__m128; 2]; R],
) {
    // SAFETY: the caller has AVX2, FMA and F16C (see above).
    unsafe {
        let ddv = _mm256_castps256_ps128(f16x8(dd));
        let dmv = _mm256_castps256_ps128(f16x8(dm));
        for r in 0..R {
            let sums = hsum8(&parts[r]);
            let lo = _mm256_castsi256_si128(sums);
            let hi = _mm256_extracti128_si256::<1>(sums);
            // Q6_K folds its −32 offset into the sum: isum − 32 · Σ sc·bsum (exact).
            let (is, im) = if min_shift > 0 {
                (
                    _mm_sub_epi32(lo, _mm_sll_epi32(hi, _mm_cvtsi32_si128(min_shift))),
                    _mm_setzero_si128(),
                )
            } else {
                (lo, hi)
            };
            let dx = load4(d[r], b);
            let t = _mm_sub_ps(
                _mm_mul_ps(_mm_mul_ps(ddv, dx), _mm_cvtepi32_ps(is)),
                _mm_mul_ps(_mm_mul_ps(dmv, dx), _mm_cvtepi32_ps(im)),
            );
            let half = (b / 4) % 2;
            acc[r][half] = _mm_add_ps(acc[r][half], t);
        }
    }
}

/// The accumulated lanes of one row, combined.
#[target_feature(enable = "avx2")]
#[inline]
fn finish_lanes(acc: &[__m128; 2]) -> f32 {
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds eight values.
    unsafe {
        _mm_storeu_ps(lanes.as_mut_ptr(), acc[0]);
        _mm_storeu_ps(lanes.as_mut_ptr().add(4), acc[1]);
    }
    Combine::from_lanes(lanes).finish()
}

/// The i16 scales of groups `2v` and `2v + 1`, each broadcast over its 128-bit half.
#[target_feature(enable = "avx2")]
#[inline]
fn scale_pair(sc16: __m256i, v: usize) -> __m256i {
    let mut t = [0i16; 16];
    // SAFETY: `t` holds sixteen values.
    unsafe { _mm256_storeu_si256(t.as_mut_ptr() as *mut __m256i, sc16) };
    _mm256_set_m128i(_mm_set1_epi16(t[2 * v + 1]), _mm_set1_epi16(t[2 * v]))
}

const _: () = assert!(QK == 32);
