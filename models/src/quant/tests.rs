use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::*;

const FORMATS: [GgmlDType; 9] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// Deterministic pseudo-random values in [-2, 2) (an LCG), with a few outliers so block
/// scales differ.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
    (0..n)
        .map(|i| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let v = ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0;
            if i % 97 == 13 { v * 9.0 } else { v }
        })
        .collect()
}

/// A quantized matrix of `out_dim x k` and its dequantized values.
fn matrix(dtype: GgmlDType, out_dim: usize, k: usize, seed: u64) -> (QMatrix, Vec<f32>) {
    let w = Tensor::from_vec(values(out_dim * k, seed), (out_dim, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, dtype).unwrap();
    let deq: Vec<f32> = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let m = QMatrix::new(Format::of(dtype).unwrap(), out_dim, k, &q.data().unwrap()).unwrap();
    (m, deq)
}

/// Each format's kernel against the plain product of the dequantized weights with the
/// dequantized activations it was given: they differ by float order and, for Q4_1, by the
/// f16 rounding of the activation block sums only, so a wrong nibble, high bit, scale or
/// minimum shows up at once.
#[test]
fn every_format_matches_the_dequantized_product() {
    let (out_dim, k, n) = (6, 512, 3);
    let x = values(n * k, 7);
    for dtype in FORMATS {
        let (m, wd) = matrix(dtype, out_dim, k, 3);
        let acts = Activations::quantize(&x, n, k, m.format.act_block());
        for kernel in supported_kernels() {
            let got = m.matmul_with(kernel, &x, n);
            for r in 0..n {
                for j in 0..out_dim {
                    let xd: Vec<f64> = if acts.block == 0 {
                        x[r * k..(r + 1) * k].iter().map(|&v| v as f64).collect()
                    } else {
                        (0..k)
                            .map(|i| acts.q_row(r)[i] as f64 * acts.d_row(r)[i / acts.block] as f64)
                            .collect()
                    };
                    let w = &wd[j * k..(j + 1) * k];
                    let want: f64 = w.iter().zip(&xd).map(|(&w, x)| w as f64 * x).sum();
                    let mag: f64 = w.iter().zip(&xd).map(|(&w, x)| (w as f64 * x).abs()).sum();
                    let g = got[r * out_dim + j] as f64;
                    assert!(
                        (g - want).abs() <= 2e-3 * mag + 1e-4,
                        "{dtype:?} ({kernel}) row {r} column {j}: kernel {g} vs dequantized {want}"
                    );
                }
            }
        }
    }
}

/// The batch-invariance contract at the kernel level: every row of an n-row product equals
/// the 1-row product of that row, bit for bit, for every n from 1 to 17 (row groups of 1..4
/// and their remainders), and the SIMD path equals the portable one bit for bit — with 72
/// columns the x86 paths read Q4_K and Q6_K in the packed eight-column layout, with 70 in
/// GGUF's.
#[test]
fn rows_and_paths_agree_bit_for_bit() {
    // k = 896 (Qwen2.5-0.5B's width) leaves a partial group of 8 legacy blocks.
    for (dtype, out_dim) in FORMATS.into_iter().flat_map(|t| [(t, 70), (t, 72)]) {
        let k = if Format::of(dtype).unwrap().act_block() == QK_K {
            768
        } else {
            896
        };
        let (m, _) = matrix(dtype, out_dim, k, 11);
        let x = values(17 * k, 5);
        let single: Vec<Vec<f32>> = (0..17)
            .map(|r| m.matmul_with(Kernel::Portable, &x[r * k..(r + 1) * k], 1))
            .collect();
        for kernel in supported_kernels() {
            for n in 1..=17 {
                let y = m.matmul_with(kernel, &x[..n * k], n);
                for (r, want) in single.iter().take(n).enumerate() {
                    let got = &y[r * out_dim..(r + 1) * out_dim];
                    assert!(
                        got.iter()
                            .zip(want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{dtype:?}: row {r} of a {n}-row product ({kernel}) differs from the portable 1-row product"
                    );
                }
            }
        }
    }
}

/// Splitting columns between threads changes nothing: one thread and the whole team give the same
/// bits.
#[test]
fn thread_count_does_not_change_results() {
    let (m, _) = matrix(GgmlDType::Q4K, 1024, 1536, 2);
    let x = values(5 * 1536, 9);
    let one = crate::team::single_threaded(|| crate::team::forward(|| m.matmul(&x, 5)));
    let two = crate::team::forward(|| {
        assert_eq!(crate::team::threads(), crate::compute_threads());
        m.matmul(&x, 5)
    });
    assert!(
        one.iter()
            .zip(&two)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
}

/// Products fused into one parallel region (q/k/v, gate/up) give each matrix's own bits,
/// also when the formats (and so the activation block sizes) differ.
#[test]
fn fused_products_match_single_products() {
    let k = 512;
    let mats: Vec<QMatrix> = [
        GgmlDType::Q4K,
        GgmlDType::Q6K,
        GgmlDType::Q8_0,
        GgmlDType::F32,
    ]
    .iter()
    .enumerate()
    .map(|(i, &t)| matrix(t, 96 + 64 * i, k, 40 + i as u64).0)
    .collect();
    let refs: Vec<&QMatrix> = mats.iter().collect();
    for n in [1, 3, 6] {
        let x = values(n * k, 7 + n as u64);
        for kernel in supported_kernels() {
            let fused = matmul_many(kernel, &refs, &x, n);
            for (m, got) in mats.iter().zip(&fused) {
                let want = m.matmul_with(kernel, &x, n);
                assert_eq!(got.len(), want.len());
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{:?}: fused {n}-row product ({kernel}) differs from the single one",
                    m.format
                );
            }
        }
    }
}

/// The packed layout covers every column and block: products with one super-block per row,
/// nine (a partial group of eight in the float lanes) and two, and extreme activations (a row
/// of ±127 after quantizing) give the portable bits, in every packed format.
#[cfg(target_arch = "x86_64")]
#[test]
fn packed_columns_give_the_portable_bits() {
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ] {
        for (out_dim, k) in [(8, 256), (24, 9 * 256), (64, 512)] {
            let (m, _) = matrix(dtype, out_dim, k, 17 + k as u64);
            if kernel() != Kernel::Portable {
                assert!(m.packed.is_some(), "{dtype:?} {out_dim}x{k} is packed");
            }
            let mut x = values(3 * k, 21);
            for (i, v) in x[2 * k..].iter_mut().enumerate() {
                *v = if i % 3 == 0 { -5.0 } else { 5.0 };
            }
            let want = m.matmul_with(Kernel::Portable, &x, 3);
            for kernel in supported_kernels() {
                let got = m.matmul_with(kernel, &x, 3);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{dtype:?} {out_dim}x{k} ({kernel}) differs from the portable product"
                );
            }
        }
    }
}

#[test]
fn unsupported_shapes_are_errors() {
    let err = QMatrix::new(Format::Q4K, 2, 100, &[0; 10]).err().unwrap();
    assert!(err.contains("not a whole number"), "{err}");
    let err = QMatrix::new(Format::Q8_0, 2, 64, &[0; 10]).err().unwrap();
    assert!(err.contains("expected 136"), "{err}");
}

/// The word-wise unpacking of Q4_K/Q5_K scales (used by the SIMD paths) gives the values of
/// the per-sub-block reference for every byte pattern of a few thousand blocks.
#[test]
fn packed_k4_scales_unpack_alike() {
    let bytes: Vec<u8> = values(12 * 4096, 1)
        .iter()
        .map(|v| (v.to_bits() >> 7) as u8)
        .collect();
    for s in bytes.chunks_exact(12) {
        let (sc, mn) = scales_mins_k4(s);
        for j in 0..8 {
            assert_eq!((sc[j], mn[j]), scale_min_k4(j, s), "sub-block {j} of {s:?}");
        }
    }
}
