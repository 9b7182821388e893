//! CPU kernels whose every reduction runs in an order that does not depend on how many
//! tokens are in a forward: a position's result is bitwise the same whether it is computed
//! alone (a decode step) or inside a block (prefill, verification). This is what makes a
//! verifier's output identical to target-only decoding.

/// Dot product with eight fixed lanes: the lane layout depends only on the vector length.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    dots(a, [b])[0]
}

/// `N` dot products of `a` with `b[0..N]` at once, each bitwise equal to [`dot`]`(a, b[i])`:
/// the same lanes and tree per product, interleaved so that the `N` accumulator chains
/// overlap instead of each waiting on its own additions.
#[inline(always)]
pub(crate) fn dots<const N: usize>(a: &[f32], b: [&[f32]; N]) -> [f32; N] {
    let n = a.len() / 8 * 8;
    let mut acc = [[0f32; 8]; N];
    for c in (0..n).step_by(8) {
        let x = &a[c..c + 8];
        for (acc, b) in acc.iter_mut().zip(b) {
            let y = &b[c..c + 8];
            for l in 0..8 {
                acc[l] += x[l] * y[l];
            }
        }
    }
    std::array::from_fn(|i| {
        let a8 = &acc[i];
        let mut s = ((a8[0] + a8[4]) + (a8[1] + a8[5])) + ((a8[2] + a8[6]) + (a8[3] + a8[7]));
        for (x, y) in a[n..].iter().zip(&b[i][n..]) {
            s += x * y;
        }
        s
    })
}

/// Whether the float kernels below run their AVX2 compilation. Both compilations perform
/// the same IEEE operations in the same order (Rust never fuses a multiply and an add, and
/// LLVM never reorders a float reduction), so they give the same bits; AVX2 only makes the
/// eight-lane loops one instruction wide.
#[inline]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86 paths
fn avx2() -> bool {
    #[cfg(test)]
    if FORCE_BASELINE.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    return crate::quant::kernel() != crate::quant::Kernel::Portable;
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Tests: run the baseline compilation even where AVX2 is available.
#[cfg(test)]
static FORCE_BASELINE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Defines `$name` as a function whose body is compiled twice, for the baseline CPU and for
/// AVX2 + FMA, the latter chosen at run time.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn with_avx2($($arg: $ty),*) {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if avx2() {
                // SAFETY: `avx2()` is true only when the CPU has AVX2 and FMA.
                return unsafe { with_avx2($($arg),*) };
            }
            body($($arg),*)
        }
    };
}

multiversion! {
    /// RMSNorm of each row of `x` (rows of `weight.len()`), written to `out`.
    pub(crate) fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        let d = weight.len();
        for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let ms = dot(row, row) / d as f32;
            let scale = 1.0 / (ms + eps).sqrt();
            for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
                *o = v * scale * w;
            }
        }
    }
}

/// Rotary-embedding angles of consecutive positions: `cos`/`sin` of `p · θ_i` for each
/// position `p` of a forward and each of the `rope_dim / 2` frequencies, computed once per
/// forward and shared by every layer's queries and keys.
pub(crate) struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Angles for positions `pos..pos + n`.
    pub fn new(pos: usize, n: usize, rope_dim: usize, base: f32) -> Self {
        let half = rope_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / rope_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for t in 0..n {
            let p = (pos + t) as f32;
            for &f in &inv_freq {
                let a = p * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        RopeTable { half, cos, sin }
    }

    /// Rotates `x` in place: one row per position of the table, each holding `heads` heads
    /// of `head_dim`, of which the first `rope_dim` rotate. `neox` rotates split halves
    /// (Qwen2); otherwise adjacent pairs (Llama in GGUF layout).
    pub fn apply(&self, x: &mut [f32], heads: usize, head_dim: usize, neox: bool) {
        let half = self.half;
        for (t, row) in x.chunks_exact_mut(heads * head_dim).enumerate() {
            let cos = &self.cos[t * half..(t + 1) * half];
            let sin = &self.sin[t * half..(t + 1) * half];
            for h in row.chunks_exact_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = if neox {
                        (i, i + half)
                    } else {
                        (2 * i, 2 * i + 1)
                    };
                    let (x0, x1) = (h[a], h[b]);
                    h[a] = x0 * cos[i] - x1 * sin[i];
                    h[b] = x0 * sin[i] + x1 * cos[i];
                }
            }
        }
    }
}

/// One layer's keys or values in a KV cache, rows of `n_head_kv * head_dim`.
#[derive(Clone, Copy)]
pub(crate) enum KvView<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

/// Rows `0..len` of one head (values `at..at + hd` of each row of `stride`) widened to f32.
#[inline(always)]
fn widen_head(src: &[half::f16], len: usize, stride: usize, at: usize, hd: usize) -> Vec<f32> {
    let mut out = vec![0f32; len * hd];
    for (j, o) in out.chunks_exact_mut(hd).enumerate() {
        let row = &src[j * stride + at..j * stride + at + hd];
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(row, o);
    }
    out
}

/// Shapes of one attention call.
pub(crate) struct AttnShape {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
}

/// Causal grouped-query attention for `n` queries at positions `pos..pos+n` over a cache
/// holding keys and values of positions `0..pos+n` (rows of `n_head_kv * head_dim`).
/// Writes `n` rows of `n_head * head_dim` to `out`.
pub(crate) fn attention(
    q: &[f32],
    keys: KvView,
    values: KvView,
    pos: usize,
    s: &AttnShape,
    out: &mut [f32],
) {
    // One task per (query position, head) — or, over an f16 cache, per (query position, KV
    // head), so that the widened keys and values serve the heads that share them. A head's
    // arithmetic is the same whichever task computes it and however tasks meet threads.
    let heads = match keys {
        KvView::F32(_) => 1,
        KvView::F16(_) => s.n_head / s.n_head_kv,
    };
    let work = |(task, o): (usize, &mut [f32])| attend(task, heads, q, (keys, values), pos, s, o);
    #[cfg(not(target_arch = "wasm32"))]
    {
        let mut tasks: Vec<(usize, &mut [f32])> =
            out.chunks_mut(heads * s.head_dim).enumerate().collect();
        crate::team::for_each_mut(&mut tasks, |(task, o)| work((*task, o)));
    }
    #[cfg(target_arch = "wasm32")]
    out.chunks_mut(heads * s.head_dim)
        .enumerate()
        .for_each(work);
}

multiversion! {
    /// Task `task` of [`attention`]: `heads` consecutive heads of one query position, which
    /// share one KV head when there are more than one.
    fn attend(
        task: usize,
        heads: usize,
        q: &[f32],
        kv: (KvView, KvView),
        pos: usize,
        s: &AttnShape,
        o: &mut [f32],
    ) {
        let hd = s.head_dim;
        let kv_dim = s.n_head_kv * hd;
        let group = s.n_head / s.n_head_kv;
        let first = task * heads;
        let t = first / s.n_head;
        let kvh = (first % s.n_head) / group;
        let len = pos + t + 1;
        // An f16 cache: the KV head's keys and values widened (exactly) into rows of `hd`
        // once for the task's heads; the arithmetic is then the same for both precisions.
        let widened;
        let (keys, values, stride, at) = match kv {
            (KvView::F32(k), KvView::F32(v)) => (k, v, kv_dim, kvh * hd),
            (KvView::F16(k), KvView::F16(v)) => {
                widened = (
                    widen_head(k, len, kv_dim, kvh * hd, hd),
                    widen_head(v, len, kv_dim, kvh * hd, hd),
                );
                (&widened.0[..], &widened.1[..], hd, 0)
            }
            _ => unreachable!("keys and values of one cache share a precision"),
        };
        let kv = HeadKv { keys, values, stride, at, len };
        for (i, o) in o.chunks_exact_mut(hd).enumerate() {
            attend_head(&q[(first + i) * hd..(first + i + 1) * hd], &kv, o);
        }
    }
}

/// One KV head's keys and values: row `j`'s `hd` values start at `j * stride + at`.
struct HeadKv<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    stride: usize,
    at: usize,
    len: usize,
}

/// Softmax(q·K / √hd)·V for one query head over positions `0..kv.len`.
#[inline(always)]
fn attend_head(qv: &[f32], kv: &HeadKv, o: &mut [f32]) {
    let hd = qv.len();
    let scale = 1.0 / (hd as f32).sqrt();
    let (keys, values, stride, at0, len) = (kv.keys, kv.values, kv.stride, kv.at, kv.len);
    // A plain loop, not an iterator adapter: a closure's `fold` may be compiled apart,
    // for the baseline CPU, outside this function's AVX2 compilation.
    let key = |j: usize| &keys[j * stride + at0..j * stride + at0 + hd];
    let mut scores = Vec::with_capacity(len);
    let mut j = 0;
    while j + 8 <= len {
        for d in dots(qv, std::array::from_fn::<_, 8, _>(|i| key(j + i))) {
            scores.push(d * scale);
        }
        j += 8;
    }
    for j in j..len {
        scores.push(dot(qv, key(j)) * scale);
    }
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for sc in scores.iter_mut() {
        *sc = (*sc - max).exp();
        sum += *sc;
    }
    // Σ_j w_j·v_j per output value, j ascending from 0.0, 64 values at a time so that
    // the sums stay in registers over all j.
    for (c, oc) in o.chunks_mut(64).enumerate() {
        let at = at0 + 64 * c;
        let mut acc = [0f32; 64];
        if oc.len() == 64 {
            for (j, &w) in scores.iter().enumerate() {
                let v = &values[j * stride + at..j * stride + at + 64];
                for d in 0..64 {
                    acc[d] += w * v[d];
                }
            }
        } else {
            for (j, &w) in scores.iter().enumerate() {
                let v = &values[j * stride + at..j * stride + at + oc.len()];
                for (a, &v) in acc.iter_mut().zip(v) {
                    *a += w * v;
                }
            }
        }
        oc.copy_from_slice(&acc[..oc.len()]);
    }
    let inv = 1.0 / sum;
    for o in o.iter_mut() {
        *o *= inv;
    }
}

multiversion! {
    /// SiLU(gate) * up, element-wise, into `gate`.
    pub(crate) fn swiglu(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    }
}

multiversion! {
    /// `x += y`, element-wise.
    pub(crate) fn add_assign(x: &mut [f32], y: &[f32]) {
        for (a, &b) in x.iter_mut().zip(y) {
            *a += b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_sum_closely() {
        let a: Vec<f32> = (0..77).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..77).map(|i| (i as f32 * 0.11).cos()).collect();
        let naive: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (*x as f64) * (*y as f64))
            .sum();
        assert!((dot(&a, &b) as f64 - naive).abs() < 1e-4);
        let bs: Vec<Vec<f32>> = (0..4)
            .map(|i| b.iter().map(|v| v * (i as f32 + 0.5)).collect())
            .collect();
        let four = dots(&a, [&bs[0], &bs[1], &bs[2], &bs[3]]);
        for i in 0..4 {
            assert_eq!(four[i].to_bits(), dot(&a, &bs[i]).to_bits());
        }
    }

    #[test]
    fn attention_of_one_key_returns_its_value() {
        let s = AttnShape {
            n_head: 2,
            n_head_kv: 1,
            head_dim: 4,
        };
        let q = vec![0.3; 8];
        let k = vec![1.0; 4];
        let v = vec![1.0, 2.0, 3.0, 4.0];
        let mut out = vec![0.0; 8];
        attention(&q, KvView::F32(&k), KvView::F32(&v), 0, &s, &mut out);
        assert_eq!(out, vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn rope_at_position_zero_is_identity() {
        let mut x: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let orig = x.clone();
        RopeTable::new(0, 1, 8, 10_000.0).apply(&mut x, 2, 8, true);
        assert_eq!(x, orig);
    }

    /// The AVX2 compilation of the float kernels gives the bits of the baseline one.
    #[test]
    fn avx2_float_kernels_match_the_baseline_bit_for_bit() {
        let n = 3;
        let d = 70;
        let x: Vec<f32> = (0..n * d).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let w: Vec<f32> = (0..d).map(|i| (i as f32 * 0.11).cos()).collect();
        let s = AttnShape {
            n_head: 4,
            n_head_kv: 2,
            head_dim: 35,
        };
        let run = || {
            let mut norm = vec![0f32; n * d];
            rms_norm(&x, &w, 1e-6, &mut norm);
            let mut g = x.clone();
            swiglu(&mut g, &norm);
            // keys/values for positions 0..6, 3 queries at position 3
            let kv: Vec<f32> = (0..6 * d).map(|i| (i as f32 * 0.05).sin()).collect();
            let q: Vec<f32> = (0..n * 140).map(|i| (i as f32 * 0.21).cos()).collect();
            let mut att = vec![0f32; n * 140];
            attention(
                &q,
                KvView::F32(&kv[..6 * 70]),
                KvView::F32(&kv[..6 * 70]),
                3,
                &s,
                &mut att,
            );
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            (bits(&norm), bits(&g), bits(&att))
        };
        let dispatched = run();
        FORCE_BASELINE.store(true, std::sync::atomic::Ordering::SeqCst);
        let baseline = run();
        FORCE_BASELINE.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(dispatched, baseline);
    }
}
