//! x86_64 kernels (AVX2 + FMA + F16C), chosen at run time. Integer block sums are exact, so
//! whatever the lane layout here, each block's sum equals the portable one; the float terms
//! are formed with the same operations in the same order (vector lane `l` of the legacy
//! kernels holds blocks `b ≡ l mod 8`, exactly the portable accumulator lanes).

use std::arch::x86_64::*;

use super::portable::legacy_offset;
use super::{Activations, Combine, Format, PACKED_ROW_GROUP, QK, QK_K, ROW_GROUP, scales_mins_k4};

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

/// Whether this CPU runs the AVX-VNNI kernels (the same 256-bit dot products, VEX-encoded:
/// Alder Lake and later client cores, Atom-class N100/N200, Zen 5).
pub(crate) fn avxvnni_available() -> bool {
    avx2_available() && is_x86_feature_detected!("avxvnni")
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

/// Dispatches on the number of rows (1..=8) to a kernel instantiated for it.
macro_rules! by_rows8 {
    ($f:ident, $fmt:expr, $rows:expr, $args:tt) => {
        match $rows {
            1 => $f::<1, { $fmt }> $args,
            2 => $f::<2, { $fmt }> $args,
            3 => $f::<3, { $fmt }> $args,
            4 => $f::<4, { $fmt }> $args,
            5 => $f::<5, { $fmt }> $args,
            6 => $f::<6, { $fmt }> $args,
            7 => $f::<7, { $fmt }> $args,
            _ => $f::<8, { $fmt }> $args,
        }
    };
}

/// The kernels, instantiated once per feature set: `$vnni` replaces `vpmaddubsw` +
/// `vpmaddwd` by `vpdpbusd` and fuses the k-quant scale multiply-add into `vpdpwssd`. The
/// integer results are the same (exact), so both instantiations give the same bits.
macro_rules! kernels {
    ($module:ident, $tf:tt, $vnni:expr, $dpbusd:ident, $dpwssd:ident) => {
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

/// Dot products of the packed columns in `recs` (whole groups of eight, see
/// [`super::packed`]) with activation rows `r0..r0+rows`, into `out` laid out
/// `[rows][columns]`. Same bits as [`dot_tile`] on the same columns in GGUF layout.
///
/// # Safety
/// As [`dot_tile`]; `format` is one [`super::packed::pack`] packs, `recs` holds whole groups
/// of `nb` records of it.
#[target_feature(enable = $tf)]
pub(crate) unsafe fn dot_packed(
    format: Format,
    recs: &[u8],
    nb: usize,
    acts: &Activations,
    r0: usize,
    rows: usize,
    out: &mut [f32],
) {
    debug_assert!(rows <= PACKED_ROW_GROUP);
    match format {
        Format::Q4K => by_rows8!(packed_q4k, 0, rows, (recs, nb, acts, r0, out)),
        Format::Q6K => by_rows8!(packed_q6k, 0, rows, (recs, nb, acts, r0, out)),
        Format::Q4_0 => by_rows8!(packed_legacy, Q4_0, rows, (recs, nb, acts, r0, out)),
        Format::Q4_1 => by_rows8!(packed_legacy, Q4_1, rows, (recs, nb, acts, r0, out)),
        Format::Q5_0 => by_rows8!(packed_legacy, Q5_0, rows, (recs, nb, acts, r0, out)),
        Format::Q8_0 => by_rows8!(packed_legacy, Q8_0, rows, (recs, nb, acts, r0, out)),
        _ => unreachable!("Q5_K and float matrices are not packed"),
    }
}

/// `acc + Σ₄ w·x` per 32-bit lane (`w` unsigned bytes, `x` signed; exact).
#[target_feature(enable = $tf)]
#[inline]
fn dot4(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
    if $vnni {
        // SAFETY: this instantiation is compiled with AVX-512 VNNI + VL.
        unsafe { $dpbusd(acc, w, x) }
    } else {
        // The 16-bit pair sums stay in range: `w` is at most 63 (2·63·128 < 2^15), or
        // (Q8_0) |w| ≤ 128 and |x| ≤ 127 (activations are quantized to ±127).
        let m = _mm256_maddubs_epi16(w, x);
        _mm256_add_epi32(acc, _mm256_madd_epi16(m, _mm256_set1_epi16(1)))
    }
}

/// `acc + w·x` for a chain of at most eight steps with `w ≤ 15`, or four with `w ≤ 31` (`w`
/// unsigned bytes, `x` signed, `|x| ≤ 128`), closed by [`widen16`]: with VNNI as
/// [`dot4`]; on AVX2 the `vpmaddubsw` pair sums are added as 16-bit lanes, which those bounds
/// keep below 2^15 (8 · 2·15·128 = 30720, 4 · 2·31·128 = 31744), so the sums stay exact and
/// the widening to 32 bits is paid once per chain instead of once per step.
#[target_feature(enable = $tf)]
#[inline]
fn dot4_16(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
    if $vnni {
        dot4(acc, w, x)
    } else {
        _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, x))
    }
}

/// A [`dot4_16`] chain's sums as 32-bit lanes (each the sum of its lane's four products).
#[target_feature(enable = $tf)]
#[inline]
fn widen16(acc: __m256i) -> __m256i {
    if $vnni {
        acc
    } else {
        _mm256_madd_epi16(acc, _mm256_set1_epi16(1))
    }
}

/// Q4_K in the eight-column layout: per super-block and column the portable integers
/// (`Σ_j sc_j Σ q·x`, `Σ_j m_j Σx`) and float term, eight columns per vector.
#[target_feature(enable = $tf)]
fn packed_q4k<const R: usize, const F: u8>(
    recs: &[u8],
    nb: usize,
    a: &Activations,
    r0: usize,
    out: &mut [f32],
) {
    use crate::quant::packed::{COLS, Q4K_D, Q4K_DMIN, Q4K_MN, Q4K_QS, Q4K_REC, Q4K_SC};
    let groups = recs.len() / (nb * Q4K_REC);
    let ncols = groups * COLS;
    let q: [&[i8]; R] = std::array::from_fn(|r| a.q_row(r0 + r));
    let d: [&[f32]; R] = std::array::from_fn(|r| a.d_row(r0 + r));
    let s32: [&[i32]; R] = std::array::from_fn(|r| a.sums32_row(r0 + r));
    let low4 = _mm256_set1_epi8(0x0F);
    // With VNNI the high nibbles are used in place (16 × the value: no 16-bit pair sums
    // to saturate) and the sub-block sum is divided by 16 exactly after.
    let high4 = _mm256_set1_epi8(0xF0u8 as i8);
    let zero = _mm256_setzero_si256();
    for g in 0..groups {
        let mut acc = [[_mm256_setzero_ps(); 8]; R];
        for b in 0..nb {
            let rec = recs[(g * nb + b) * Q4K_REC..(g * nb + b + 1) * Q4K_REC].as_ptr();
            let mut isum = [zero; R];
            let mut imin = [zero; R];
            for p in 0..4 {
                // Two chains per sub-block (even and odd `t`), so that consecutive
                // `vpdpbusd`s do not wait for each other.
                let mut lo = [[zero; R]; 2];
                let mut hi = [[zero; R]; 2];
                for t2 in 0..4 {
                    // SAFETY (loads below): the record holds 1024 nibble bytes from
                    // `Q4K_QS`; each activation row has `nb * 256` values.
                    let at = Q4K_QS + 64 * (4 * p + t2);
                    prefetch(rec.wrapping_add(at));
                    let v = unsafe {
                        [
                            _mm256_load_si256(rec.add(at) as *const __m256i),
                            _mm256_load_si256(rec.add(at + 32) as *const __m256i),
                        ]
                    };
                    for (e, &v) in v.iter().enumerate() {
                        let wl = _mm256_and_si256(v, low4);
                        let wh = if $vnni {
                            _mm256_and_si256(v, high4)
                        } else {
                            _mm256_and_si256(_mm256_srli_epi16::<4>(v), low4)
                        };
                        let t = 2 * t2 + e;
                        // Several rows are independent chains already.
                        let e = if R == 1 { e } else { 0 };
                        for r in 0..R {
                            let x = unsafe { q[r].as_ptr().add(b * QK_K + 64 * p + 4 * t) };
                            let xl =
                                _mm256_set1_epi32(unsafe { (x as *const i32).read_unaligned() });
                            let xh = _mm256_set1_epi32(unsafe {
                                (x.add(32) as *const i32).read_unaligned()
                            });
                            lo[e][r] = dot4_16(lo[e][r], wl, xl);
                            hi[e][r] = dot4_16(hi[e][r], wh, xh);
                        }
                    }
                }
                // SAFETY: 64 scale bytes at `Q4K_SC`, 64 minimum bytes at `Q4K_MN`.
                let sc_lo = _mm256_cvtepu8_epi32(unsafe {
                    _mm_loadl_epi64(rec.add(Q4K_SC + 16 * p) as *const __m128i)
                });
                let sc_hi = _mm256_cvtepu8_epi32(unsafe {
                    _mm_loadl_epi64(rec.add(Q4K_SC + 16 * p + 8) as *const __m128i)
                });
                let mn = _mm256_cvtepu8_epi16(unsafe {
                    _mm_load_si128(rec.add(Q4K_MN + 16 * p) as *const __m128i)
                });
                for r in 0..R {
                    let sl = _mm256_add_epi32(widen16(lo[0][r]), widen16(lo[1][r]));
                    let mut sh = _mm256_add_epi32(widen16(hi[0][r]), widen16(hi[1][r]));
                    if $vnni {
                        sh = _mm256_srai_epi32::<4>(sh);
                    }
                    isum[r] = _mm256_add_epi32(
                        isum[r],
                        _mm256_add_epi32(
                            _mm256_mullo_epi32(sl, sc_lo),
                            _mm256_mullo_epi32(sh, sc_hi),
                        ),
                    );
                    let s = &s32[r][8 * b + 2 * p..];
                    let pair = (s[0] as u16 as u32 | (s[1] as u32) << 16) as i32;
                    imin[r] =
                        _mm256_add_epi32(imin[r], _mm256_madd_epi16(mn, _mm256_set1_epi32(pair)));
                }
            }
            // SAFETY: eight f16 `d` and eight `dmin` at their offsets.
            let dv = _mm256_cvtph_ps(unsafe { _mm_load_si128(rec.add(Q4K_D) as *const __m128i) });
            let mv =
                _mm256_cvtph_ps(unsafe { _mm_load_si128(rec.add(Q4K_DMIN) as *const __m128i) });
            for r in 0..R {
                let dx = _mm256_set1_ps(d[r][b]);
                let t = _mm256_sub_ps(
                    _mm256_mul_ps(_mm256_mul_ps(dv, dx), _mm256_cvtepi32_ps(isum[r])),
                    _mm256_mul_ps(_mm256_mul_ps(mv, dx), _mm256_cvtepi32_ps(imin[r])),
                );
                acc[r][b % 8] = _mm256_add_ps(acc[r][b % 8], t);
            }
        }
        for r in 0..R {
            store_columns(&acc[r], &mut out[r * ncols + g * COLS..r * ncols + (g + 1) * COLS]);
        }
    }
}

/// The legacy formats in the eight-column layout: per block and column the portable
/// `Σ q·x − offset·Σx` and float term, eight columns per vector.
#[target_feature(enable = $tf)]
fn packed_legacy<const R: usize, const F: u8>(
    recs: &[u8],
    nb: usize,
    a: &Activations,
    r0: usize,
    out: &mut [f32],
) {
    use crate::quant::packed::{COLS, legacy_qs, legacy_rec};
    let format = legacy_format(F);
    let rec_len = legacy_rec(format);
    let qs_at = legacy_qs(format);
    let groups = recs.len() / (nb * rec_len);
    let ncols = groups * COLS;
    // VNNI multiplies Q8_0's values as unsigned bytes, 128 more than they are.
    let off = if F == Q8_0 && $vnni { 128 } else { legacy_offset(format) };
    let q: [&[i8]; R] = std::array::from_fn(|r| a.q_row(r0 + r));
    let d: [&[f32]; R] = std::array::from_fn(|r| a.d_row(r0 + r));
    let sx: [&[f32]; R] = std::array::from_fn(|r| a.s_row(r0 + r));
    let sums: [&[i32]; R] = std::array::from_fn(|r| a.sums_row(r0 + r));
    let low4 = _mm256_set1_epi8(0x0F);
    let zero = _mm256_setzero_si256();
    // Q5_0: per `t`, each lane's byte of fifth bits spread over its four bytes, and the bit
    // of each byte's value (low nibble side: bits 0–3, high: bits 4–7).
    let spread: [__m256i; 4] = std::array::from_fn(|t| {
        let b = |c: i8| 4 * t as i8 + c;
        let (b0, b1, b2, b3) = (b(0), b(1), b(2), b(3));
        _mm256_setr_epi8(
            b0, b0, b0, b0, b1, b1, b1, b1, b2, b2, b2, b2, b3, b3, b3, b3, b0, b0, b0, b0, b1,
            b1, b1, b1, b2, b2, b2, b2, b3, b3, b3, b3,
        )
    });
    let bit_lo = _mm256_set1_epi32(0x0804_0201);
    let bit_hi = _mm256_set1_epi32(0x8040_2010u32 as i32);
    let fifth = _mm256_set1_epi8(0x10);
    for g in 0..groups {
        let mut acc = [[_mm256_setzero_ps(); 8]; R];
        for b in 0..nb {
            let rec = recs[(g * nb + b) * rec_len..(g * nb + b + 1) * rec_len].as_ptr();
            prefetch(rec);
            prefetch(rec.wrapping_add(64));
            prefetch(rec.wrapping_add(128));
            if F == Q8_0 {
                prefetch(rec.wrapping_add(192));
                prefetch(rec.wrapping_add(256));
            }
            let mut s = [[zero; R]; 2];
            // SAFETY (loads below): the record's values at `qs_at` (128 nibble bytes, then
            // for Q5_0 32 bytes of fifth bits; 256 bytes for Q8_0); each activation row has
            // `nb * 32` values.
            if F == Q8_0 {
                for t2 in 0..4 {
                    for e in 0..2 {
                        let t = 2 * t2 + e;
                        let v = unsafe {
                            _mm256_loadu_si256(rec.add(qs_at + 32 * t) as *const __m256i)
                        };
                        let wu = _mm256_xor_si256(v, _mm256_set1_epi8(-128));
                        let wabs = _mm256_sign_epi8(v, v);
                        // Several rows are independent chains already.
                        let e = if R == 1 { e } else { 0 };
                        for r in 0..R {
                            let x = _mm256_set1_epi32(unsafe {
                                (q[r].as_ptr().add(b * QK + 4 * t) as *const i32).read_unaligned()
                            });
                            s[e][r] = if $vnni {
                                dot4(s[e][r], wu, x)
                            } else {
                                dot4(s[e][r], wabs, _mm256_sign_epi8(x, v))
                            };
                        }
                    }
                }
            } else {
                let hb = if F == Q5_0 {
                    unsafe { _mm256_loadu_si256(rec.add(qs_at + 128) as *const __m256i) }
                } else {
                    zero
                };
                for t in 0..4 {
                    let v = unsafe { _mm256_loadu_si256(rec.add(qs_at + 32 * t) as *const __m256i) };
                    let mut wl = _mm256_and_si256(v, low4);
                    let mut wh = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low4);
                    if F == Q5_0 {
                        let bits = _mm256_shuffle_epi8(hb, spread[t]);
                        let lo5 = _mm256_cmpeq_epi8(_mm256_and_si256(bits, bit_lo), bit_lo);
                        let hi5 = _mm256_cmpeq_epi8(_mm256_and_si256(bits, bit_hi), bit_hi);
                        wl = _mm256_or_si256(wl, _mm256_and_si256(lo5, fifth));
                        wh = _mm256_or_si256(wh, _mm256_and_si256(hi5, fifth));
                    }
                    for r in 0..R {
                        let x = unsafe { q[r].as_ptr().add(b * QK + 4 * t) };
                        let xl = _mm256_set1_epi32(unsafe { (x as *const i32).read_unaligned() });
                        let xh =
                            _mm256_set1_epi32(unsafe { (x.add(16) as *const i32).read_unaligned() });
                        s[0][r] = dot4_16(s[0][r], wl, xl);
                        s[1][r] = dot4_16(s[1][r], wh, xh);
                    }
                }
            }
            // SAFETY: eight f16 scales at 0 and, for Q4_1, eight minimums at 16.
            let dw = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(rec as *const __m128i) });
            let mw = if F == Q4_1 {
                _mm256_cvtph_ps(unsafe { _mm_loadu_si128(rec.add(16) as *const __m128i) })
            } else {
                _mm256_setzero_ps()
            };
            for r in 0..R {
                let mut isum = if F == Q8_0 {
                    _mm256_add_epi32(s[0][r], s[1][r])
                } else {
                    _mm256_add_epi32(widen16(s[0][r]), widen16(s[1][r]))
                };
                if off != 0 {
                    isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(off * sums[r][b]));
                }
                let dx = _mm256_set1_ps(d[r][b]);
                let mut t = _mm256_mul_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(isum));
                if F == Q4_1 {
                    t = _mm256_add_ps(t, _mm256_mul_ps(mw, _mm256_set1_ps(sx[r][b])));
                }
                acc[r][b % 8] = _mm256_add_ps(acc[r][b % 8], t);
            }
        }
        for r in 0..R {
            store_columns(&acc[r], &mut out[r * ncols + g * COLS..r * ncols + (g + 1) * COLS]);
        }
    }
}

/// Q6_K in the eight-column layout: per column the portable `Σ_g sc_g (Σ q·x − 32·Σx)` and
/// float term, eight columns per vector.
#[target_feature(enable = $tf)]
fn packed_q6k<const R: usize, const F: u8>(
    recs: &[u8],
    nb: usize,
    a: &Activations,
    r0: usize,
    out: &mut [f32],
) {
    use crate::quant::packed::{COLS, Q6K_D, Q6K_QH, Q6K_QL, Q6K_REC, Q6K_SC};
    let groups = recs.len() / (nb * Q6K_REC);
    let ncols = groups * COLS;
    let q: [&[i8]; R] = std::array::from_fn(|r| a.q_row(r0 + r));
    let d: [&[f32]; R] = std::array::from_fn(|r| a.d_row(r0 + r));
    let bs: [&[i32]; R] = std::array::from_fn(|r| a.sums_row(r0 + r));
    let low4 = _mm256_set1_epi8(0x0F);
    let bits45 = _mm256_set1_epi8(0x30);
    let zero = _mm256_setzero_si256();
    for g in 0..groups {
        let mut acc = [[_mm256_setzero_ps(); 8]; R];
        for b in 0..nb {
            let rec = recs[(g * nb + b) * Q6K_REC..(g * nb + b + 1) * Q6K_REC].as_ptr();
            let mut isum = [zero; R];
            for h in 0..2 {
                for tq in 0..2 {
                    // Four 16-value groups per row: values 128h + 32m + 16tq ..
                    let mut s = [[zero; 4]; R];
                    for t in 4 * tq..4 * tq + 4 {
                        // SAFETY (loads below): the record's `ql` and `qh` vectors at
                        // their offsets; each activation row has `nb * 256` values.
                        let l0 = Q6K_QL + 32 * (8 * (2 * h) + t);
                        let l1 = Q6K_QL + 32 * (8 * (2 * h + 1) + t);
                        let lh = Q6K_QH + 32 * (8 * h + t);
                        prefetch(rec.wrapping_add(l0));
                        let ql0 = unsafe { _mm256_load_si256(rec.add(l0) as *const __m256i) };
                        let ql1 = unsafe { _mm256_load_si256(rec.add(l1) as *const __m256i) };
                        let qh = unsafe { _mm256_load_si256(rec.add(lh) as *const __m256i) };
                        let w = [
                            _mm256_or_si256(
                                _mm256_and_si256(ql0, low4),
                                _mm256_and_si256(_mm256_slli_epi16::<4>(qh), bits45),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(ql1, low4),
                                _mm256_and_si256(_mm256_slli_epi16::<2>(qh), bits45),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low4),
                                _mm256_and_si256(qh, bits45),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low4),
                                _mm256_and_si256(_mm256_srli_epi16::<2>(qh), bits45),
                            ),
                        ];
                        for r in 0..R {
                            let x = unsafe { q[r].as_ptr().add(b * QK_K + 128 * h + 4 * t) };
                            for m in 0..4 {
                                let xv = _mm256_set1_epi32(unsafe {
                                    (x.add(32 * m) as *const i32).read_unaligned()
                                });
                                s[r][m] = dot4(s[r][m], w[m], xv);
                            }
                        }
                    }
                    for m in 0..4 {
                        let grp = 8 * h + 2 * m + tq;
                        // SAFETY: 128 scale bytes at `Q6K_SC`.
                        let sc = _mm256_cvtepi8_epi32(unsafe {
                            _mm_loadl_epi64(rec.add(Q6K_SC + 8 * grp) as *const __m128i)
                        });
                        for r in 0..R {
                            let off = _mm256_set1_epi32(bs[r][16 * b + grp] << 5);
                            let v = _mm256_mullo_epi32(_mm256_sub_epi32(s[r][m], off), sc);
                            isum[r] = _mm256_add_epi32(isum[r], v);
                        }
                    }
                }
            }
            // SAFETY: eight f16 `d` at `Q6K_D`.
            let dv = _mm256_cvtph_ps(unsafe { _mm_load_si128(rec.add(Q6K_D) as *const __m128i) });
            let zf = _mm256_setzero_ps();
            for r in 0..R {
                let dx = _mm256_set1_ps(d[r][b]);
                // As `kquant_term(d, 0.0, dx, isum, 0)`, operation for operation.
                let t = _mm256_sub_ps(
                    _mm256_mul_ps(_mm256_mul_ps(dv, dx), _mm256_cvtepi32_ps(isum[r])),
                    _mm256_mul_ps(_mm256_mul_ps(zf, dx), zf),
                );
                acc[r][b % 8] = _mm256_add_ps(acc[r][b % 8], t);
            }
        }
        for r in 0..R {
            store_columns(&acc[r], &mut out[r * ncols + g * COLS..r * ncols + (g + 1) * COLS]);
        }
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
                            unsafe { $dpbusd(_mm256_setzero_si256(), wabs, sx) }
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
                            unsafe { $dpbusd(_mm256_setzero_si256(), wv, xv) }
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
                                $dpwssd($dpwssd(isum[r], m_lo, s_lo), m_hi, s_hi)
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
                                unsafe { $dpwssd(isum[r], m, scv) }
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

kernels!(
    avx2,
    "avx2,fma,f16c",
    false,
    _mm256_dpbusd_epi32,
    _mm256_dpwssd_epi32
);
kernels!(
    vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    true,
    _mm256_dpbusd_epi32,
    _mm256_dpwssd_epi32
);
kernels!(
    avxvnni,
    "avx2,fma,f16c,avxvnni",
    true,
    _mm256_dpbusd_avx_epi32,
    _mm256_dpwssd_avx_epi32
);

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

/// Eight columns' accumulator lanes (vector `l` holding lane `l` of every column) summed in
/// [`Combine::finish`]'s tree, into `out[..8]`.
#[target_feature(enable = "avx2")]
#[inline]
fn store_columns(a: &[__m256; 8], out: &mut [f32]) {
    let s = _mm256_add_ps(
        _mm256_add_ps(_mm256_add_ps(a[0], a[4]), _mm256_add_ps(a[1], a[5])),
        _mm256_add_ps(_mm256_add_ps(a[2], a[6]), _mm256_add_ps(a[3], a[7])),
    );
    assert!(out.len() >= 8);
    // SAFETY: eight values are in bounds (checked).
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
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
