//! Hand-written AVX2 kernels for block types candle computes with scalar code on x86
//! (Q4_1). Each output element is one dot product whose order depends only on `k`, so the
//! kernels are batch-invariant by construction.

use rayon::prelude::*;
use std::arch::x86_64::*;

const QK: usize = 32;
const Q4_1_BYTES: usize = 20; // f16 d, f16 m, 16 bytes of nibbles

/// One activation block quantized to 8 bits (ggml's Q8_1): `x ≈ d * q`, `s = d * Σq`.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Q8Block {
    q: [i8; QK],
    d: f32,
    s: f32,
}

fn quantize_row(x: &[f32], out: &mut Vec<Q8Block>) {
    for chunk in x.chunks_exact(QK) {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut q = [0i8; QK];
        let mut sum = 0i32;
        for (qi, &v) in q.iter_mut().zip(chunk) {
            *qi = (v * id).round() as i8;
            sum += *qi as i32;
        }
        // Scales rounded through f16 as ggml's Q8_1 does, so results match ggml-style
        // kernels up to summation order.
        let r = |v: f32| half::f16::from_f32(v).to_f32();
        out.push(Q8Block {
            q,
            d: r(d),
            s: r(d * sum as f32),
        });
    }
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dot product of one Q4_1 weight row with one quantized activation row.
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_q4_1(w: &[u8], x: &[Q8Block]) -> f32 {
    let mask = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0f32;
    for (blk, xb) in w.chunks_exact(Q4_1_BYTES).zip(x) {
        let d = f16_at(blk, 0);
        let m = f16_at(blk, 2);
        // SAFETY: `blk` has 20 bytes, of which 16 nibble bytes start at offset 4; `xb.q` is
        // 32 bytes.
        let bytes = unsafe { _mm_loadu_si128(blk.as_ptr().add(4) as *const __m128i) };
        let lo = _mm_and_si128(bytes, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
        let w8 = _mm256_set_m128i(hi, lo);
        let x8 = unsafe { _mm256_loadu_si256(xb.q.as_ptr() as *const __m256i) };
        let p16 = _mm256_maddubs_epi16(w8, x8);
        let p32 = _mm256_madd_epi16(p16, ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(p32), acc);
        mins += m * xb.s;
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
        + mins
}

/// `n` rows of `x` (length `k`) times a Q4_1 matrix of `out_dim` rows (`w`, raw GGUF blocks).
pub(crate) fn matmul_q4_1(x: &[f32], n: usize, k: usize, w: &[u8], out_dim: usize) -> Vec<f32> {
    let row_bytes = k / QK * Q4_1_BYTES;
    let mut xq = Vec::with_capacity(n * k / QK);
    for row in x.chunks_exact(k) {
        quantize_row(row, &mut xq);
    }
    const COLS: usize = 64;
    let mut out_t = vec![0f32; out_dim * n];
    out_t
        .par_chunks_mut(COLS * n)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (j, col) in chunk.chunks_exact_mut(n).enumerate() {
                let wrow = &w[(c * COLS + j) * row_bytes..(c * COLS + j + 1) * row_bytes];
                for (r, o) in col.iter_mut().enumerate() {
                    // SAFETY: AVX2 and FMA are enabled at compile time (see the cfg on the module).
                    *o = unsafe { dot_q4_1(wrow, &xq[r * (k / QK)..(r + 1) * (k / QK)]) };
                }
            }
        });
    let mut out = vec![0f32; n * out_dim];
    for (j, col) in out_t.chunks_exact(n).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            out[r * out_dim + j] = v;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel against the exact product of the dequantized weights with the
    /// Q8-quantized activations it is given (using the same f16-rounded block sums): the two
    /// differ only by float summation order, so the tolerance is tight and a wrong nibble,
    /// scale or min shows up at once.
    #[test]
    fn q4_1_kernel_matches_dequantized_product() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        let (out_dim, k, n) = (8, 128, 3);
        // Deterministic weights and activations (an LCG), so the test is the same every run.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        };
        let w: Vec<f32> = (0..out_dim * k).map(|_| next()).collect();
        let x: Vec<f32> = (0..n * k).map(|_| next()).collect();
        let w = Tensor::from_vec(w, (out_dim, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let wd: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut xq = Vec::new();
        for row in x.chunks_exact(k) {
            quantize_row(row, &mut xq);
        }
        let raw = q.data().unwrap();
        let blocks = k / QK;
        let got = matmul_q4_1(&x, n, k, &raw, out_dim);
        for r in 0..n {
            for j in 0..out_dim {
                // Per block: Σ (w - m)·x + m·s, with the same f16-rounded `s` the kernel uses.
                let want: f32 = (0..blocks)
                    .map(|b| {
                        let xb = &xq[r * blocks + b];
                        let m = f16_at(&raw, (j * blocks + b) * Q4_1_BYTES + 2);
                        let scaled: f32 = (0..QK)
                            .map(|i| (wd[j * k + b * QK + i] - m) * xb.d * xb.q[i] as f32)
                            .sum();
                        scaled + m * xb.s
                    })
                    .sum();
                let got = got[r * out_dim + j];
                assert!(
                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "row {r}, column {j}: kernel {got} vs reference {want}"
                );
            }
        }
    }
}
