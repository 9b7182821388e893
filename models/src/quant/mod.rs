//! Matrix products over GGUF block formats, batch-invariant by construction.
//!
//! Every output element `y[r, j] = Σ_k x[r, k] · W[j, k]` is computed as ggml does it, with
//! activations quantized to 8-bit blocks (32 values for the legacy formats, 256 for the
//! k-quants), but with one difference that makes every path give the same bits:
//!
//! 1. the integer part of each weight block's dot product is computed **exactly** in `i32`
//!    (however a SIMD path groups its lanes, an integer sum has one value);
//! 2. the block's float term is formed from it with a fixed sequence of IEEE operations
//!    (no fused multiply-add, which Rust never introduces by itself), see `Combine`;
//! 3. block `b`'s term is added to accumulator lane `b % 8`, and the eight lanes are summed in
//!    a fixed tree at the end.
//!
//! So a result depends only on the weights, the activation row and `k`: not on how many
//! rows are in the product, how the columns are split between threads, nor on which code
//! path (portable, AVX2, AVX-512, NEON) ran. The tests check the SIMD paths against the
//! portable one bit for bit.
//!
//! Weight reuse: columns are processed in tiles whose weights fit in the L2 cache, and rows
//! in groups of up to [`ROW_GROUP`] (eight for packed weights); within a group each weight
//! block is loaded and decoded once and multiplied with every row of the group. On x86 most
//! formats are read from an eight-column copy made at load (`packed`), in which one SIMD
//! product serves eight columns at once.

#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "x86_64")]
mod packed;
mod portable;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::fmt;
use std::sync::{Arc, OnceLock};

use candle_core::quantized::{GgmlDType, QTensor};

use crate::gguf::MappedTensor;
use crate::kernels::dot;
use crate::weights::Source;

/// Values per legacy block (Q4_0, Q4_1, Q5_0, Q8_0).
pub(crate) const QK: usize = 32;
/// Values per k-quant super-block (Q4_K, Q5_K, Q6_K).
pub(crate) const QK_K: usize = 256;
/// Rows of activations multiplied with one decoded weight block.
pub(crate) const ROW_GROUP: usize = 4;
/// Rows multiplied with one decoded group of packed (eight-column) weights: the weights are
/// decoded once per group, the rows' products are cheap broadcasts.
#[cfg(target_arch = "x86_64")]
pub(crate) const PACKED_ROW_GROUP: usize = 8;

/// A weight format this engine has a kernel for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// 32-bit floats (used as they are).
    F32,
    /// 16-bit floats (widened to f32 at load).
    F16,
    /// 4-bit, one scale per 32 values.
    Q4_0,
    /// 4-bit, scale and minimum per 32 values.
    Q4_1,
    /// 5-bit, one scale per 32 values.
    Q5_0,
    /// 8-bit, one scale per 32 values.
    Q8_0,
    /// 4-bit k-quant: 256-value super-blocks, 6-bit scales and minimums per 32.
    Q4K,
    /// 5-bit k-quant.
    Q5K,
    /// 6-bit k-quant: 8-bit scales per 16 values.
    Q6K,
}

impl Format {
    /// The format of a GGUF tensor type, or `None` when there is no kernel for it.
    pub fn of(dtype: GgmlDType) -> Option<Format> {
        Some(match dtype {
            GgmlDType::F32 => Format::F32,
            GgmlDType::F16 => Format::F16,
            GgmlDType::Q4_0 => Format::Q4_0,
            GgmlDType::Q4_1 => Format::Q4_1,
            GgmlDType::Q5_0 => Format::Q5_0,
            GgmlDType::Q8_0 => Format::Q8_0,
            GgmlDType::Q4K => Format::Q4K,
            GgmlDType::Q5K => Format::Q5K,
            GgmlDType::Q6K => Format::Q6K,
            _ => return None,
        })
    }

    /// The GGUF tensor type of this format.
    pub(crate) fn dtype(self) -> GgmlDType {
        match self {
            Format::F32 => GgmlDType::F32,
            Format::F16 => GgmlDType::F16,
            Format::Q4_0 => GgmlDType::Q4_0,
            Format::Q4_1 => GgmlDType::Q4_1,
            Format::Q5_0 => GgmlDType::Q5_0,
            Format::Q8_0 => GgmlDType::Q8_0,
            Format::Q4K => GgmlDType::Q4K,
            Format::Q5K => GgmlDType::Q5K,
            Format::Q6K => GgmlDType::Q6K,
        }
    }

    /// Values and bytes per block.
    pub(crate) fn block(self) -> (usize, usize) {
        match self {
            Format::F32 => (1, 4),
            Format::F16 => (1, 2),
            Format::Q4_0 => (QK, 18),
            Format::Q4_1 => (QK, 20),
            Format::Q5_0 => (QK, 22),
            Format::Q8_0 => (QK, 34),
            Format::Q4K => (QK_K, 144),
            Format::Q5K => (QK_K, 176),
            Format::Q6K => (QK_K, 210),
        }
    }

    /// The block size activations are quantized to (0: not quantized).
    fn act_block(self) -> usize {
        match self {
            Format::F32 | Format::F16 => 0,
            Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q8_0 => QK,
            Format::Q4K | Format::Q5K | Format::Q6K => QK_K,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::F32 => "F32",
            Format::F16 => "F16",
            Format::Q4_0 => "Q4_0",
            Format::Q4_1 => "Q4_1",
            Format::Q5_0 => "Q5_0",
            Format::Q8_0 => "Q8_0",
            Format::Q4K => "Q4_K",
            Format::Q5K => "Q5_K",
            Format::Q6K => "Q6_K",
        })
    }
}

/// The code path chosen for this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust: any CPU, and wasm.
    Portable,
    /// x86_64 AVX2 + FMA (+ F16C).
    Avx2,
    /// x86_64 AVX2 with AVX-512 VNNI dot-product instructions (256-bit).
    Avx2Vnni,
    /// x86_64 AVX2 with AVX-VNNI (the same dot products, VEX-encoded, on CPUs without
    /// AVX-512).
    Avx2AvxVnni,
    /// aarch64 NEON (every aarch64 CPU).
    Neon,
    /// aarch64 NEON with the 8-bit dot-product instructions (Armv8.2 `dotprod`).
    NeonDotprod,
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kernel::Portable => "portable",
            Kernel::Avx2 => "avx2",
            Kernel::Avx2Vnni => "avx2+vnni",
            Kernel::Avx2AvxVnni => "avx2+avxvnni",
            Kernel::Neon => "neon",
            Kernel::NeonDotprod => "neon+dotprod",
        })
    }
}

/// The kernel path used by this process: the best the CPU supports, detected once at run
/// time. `TANDEM_KERNEL=NAME` (`portable`, `avx2`, `avx2+avxvnni`, `avx2+vnni` on x86_64;
/// `portable`, `neon`, `neon+dotprod` on aarch64) forces
/// another path this CPU supports (for comparisons); a name it does not support is ignored
/// with a warning.
pub fn kernel() -> Kernel {
    static CHOSEN: OnceLock<Kernel> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let supported = supported_kernels();
        let best = *supported
            .last()
            .expect("the portable path is always supported");
        match std::env::var("TANDEM_KERNEL") {
            Ok(name) => match supported.iter().find(|k| k.to_string() == name) {
                Some(&k) => k,
                None => {
                    let names: Vec<String> = supported.iter().map(|k| k.to_string()).collect();
                    eprintln!(
                        "warning: TANDEM_KERNEL={name:?} is not a kernel path this CPU runs \
                         ({}): using {best}",
                        names.join(", ")
                    );
                    best
                }
            },
            Err(_) => best,
        }
    })
}

/// The kernel paths this CPU can run, best last.
pub fn supported_kernels() -> Vec<Kernel> {
    #[cfg_attr(
        not(any(target_arch = "x86_64", target_arch = "aarch64")),
        allow(unused_mut)
    )]
    let mut v = vec![Kernel::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        if x86::avx2_available() {
            v.push(Kernel::Avx2);
        }
        if x86::avxvnni_available() {
            v.push(Kernel::Avx2AvxVnni);
        }
        if x86::vnni_available() {
            v.push(Kernel::Avx2Vnni);
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if neon::neon_available() {
            v.push(Kernel::Neon);
        }
        if neon::dotprod_available() {
            v.push(Kernel::NeonDotprod);
        }
    }
    v
}

/// A weight matrix `[out_dim, in_dim]` in its GGUF block format, read in place.
pub(crate) struct QMatrix {
    pub format: Format,
    pub out_dim: usize,
    pub in_dim: usize,
    store: Store,
    row_bytes: usize,
    /// The eight-column copy the x86 kernels read (every quantized format but Q5_K, when
    /// the columns are a multiple of eight), see [`packed`].
    #[cfg(target_arch = "x86_64")]
    packed: Option<packed::Packed>,
}

enum Store {
    /// Raw blocks (or f32 values) inside candle's CPU storage of the tensor.
    Tensor(Arc<QTensor>),
    /// Raw blocks where they lie in the mapped file.
    Mapped(MappedTensor),
    /// Raw blocks held here (tests).
    Bytes(Vec<u8>),
    /// f32 values (F16 matrices widened at load).
    F32(Vec<f32>),
}

impl QMatrix {
    /// The matrix of a `[out_dim, in_dim]` tensor, or why there is no kernel for it (the
    /// caller names the tensor).
    pub fn from_source(src: Source) -> Result<Self, String> {
        let dims = src.dims();
        let &[out_dim, in_dim] = dims.as_slice() else {
            return Err(format!("is {dims:?}, not a matrix"));
        };
        let dtype = src.dtype();
        let format = Format::of(dtype).ok_or_else(|| format!("{dtype:?}"))?;
        let store = match src {
            Source::Mapped(m) if format != Format::F16 => Store::Mapped(m),
            Source::Mapped(m) => Store::F32(widen_f16(m.bytes())),
            Source::Read(t) => {
                let data = t.data().map_err(|e| e.to_string())?;
                let store = match (format, &data) {
                    (Format::F16, _) => Store::F32(widen_f16(&data)),
                    (_, std::borrow::Cow::Borrowed(_)) => Store::Tensor(t.clone()),
                    (_, std::borrow::Cow::Owned(b)) => Store::Bytes(b.clone()),
                };
                drop(data);
                store
            }
        };
        Self::with_store(format, out_dim, in_dim, store)
    }

    /// The matrix as f32 values, `[out_dim, in_dim]` (for training against frozen weights).
    pub fn dequantize(&self) -> candle_core::Result<candle_core::Tensor> {
        use candle_core::quantized::QStorage;
        use candle_core::{Device, Tensor};
        let shape = (self.out_dim, self.in_dim);
        if let Store::F32(v) = &self.store {
            return Tensor::from_slice(v, shape, &Device::Cpu);
        }
        let storage = QStorage::from_data(
            std::borrow::Cow::Borrowed(self.bytes()),
            &Device::Cpu,
            self.format.dtype(),
        )?;
        QTensor::new(storage, shape)?.dequantize(&Device::Cpu)
    }

    /// A matrix over raw GGUF block bytes.
    #[cfg(test)]
    pub fn new(format: Format, out_dim: usize, in_dim: usize, raw: &[u8]) -> Result<Self, String> {
        let store = match format {
            Format::F16 => Store::F32(widen_f16(raw)),
            Format::F32 => Store::F32(
                raw.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
            _ => Store::Bytes(raw.to_vec()),
        };
        Self::with_store(format, out_dim, in_dim, store)
    }

    fn with_store(
        format: Format,
        out_dim: usize,
        in_dim: usize,
        store: Store,
    ) -> Result<Self, String> {
        let bv = format.block().0;
        if !in_dim.is_multiple_of(bv) {
            return Err(format!(
                "rows of {in_dim} values are not a whole number of {format:?} blocks of {bv}"
            ));
        }
        let format = if format == Format::F16 {
            Format::F32
        } else {
            format
        };
        let row_bytes = in_dim / bv * format.block().1;
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut m = QMatrix {
            format,
            out_dim,
            in_dim,
            store,
            row_bytes,
            #[cfg(target_arch = "x86_64")]
            packed: None,
        };
        let have = m.bytes().len();
        if have != out_dim * row_bytes {
            return Err(format!(
                "holds {have} bytes, expected {} for {out_dim}x{in_dim} {format:?}",
                out_dim * row_bytes
            ));
        }
        #[cfg(target_arch = "x86_64")]
        if kernel() != Kernel::Portable {
            m.packed = packed::pack(format, m.bytes(), out_dim, row_bytes);
            if let (Some(_), Store::Mapped(t)) = (&m.packed, &m.store) {
                // The kernels read the packed copy: the file's pages need not stay in
                // this process's resident memory (they stay in the page cache).
                t.release();
            }
        }
        Ok(m)
    }

    /// Bytes of weights one product reads.
    pub fn weight_bytes(&self) -> usize {
        self.out_dim * self.row_bytes
    }

    fn bytes(&self) -> &[u8] {
        match &self.store {
            Store::Tensor(t) => match t.data() {
                Ok(std::borrow::Cow::Borrowed(b)) => b,
                _ => unreachable!("checked to be CPU storage borrowed in place at load"),
            },
            Store::Mapped(m) => m.bytes(),
            Store::Bytes(b) => b,
            // SAFETY: any initialised f32 slice is a valid byte slice of four times the length.
            Store::F32(v) => unsafe {
                std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 4)
            },
        }
    }

    /// `n` rows of `x` (each `in_dim` long) times the matrix: `n` rows of `out_dim` (tests;
    /// the model goes through [`matmul_many`]).
    #[cfg(test)]
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        self.matmul_with(kernel(), x, n)
    }

    /// [`QMatrix::matmul`] on a given kernel path (tests).
    #[cfg(test)]
    pub(crate) fn matmul_with(&self, kernel: Kernel, x: &[f32], n: usize) -> Vec<f32> {
        matmul_many(kernel, &[self], x, n)
            .pop()
            .expect("one product")
    }

    /// Columns per tile: a tile's weights fit in L2 together with a row group's activations;
    /// the tile is the unit of work handed to a thread, so the tiles are made equal and their
    /// number a multiple of the thread count (a product of 4½ tiles on 2 threads would wait
    /// for its last one). Tiling never changes a column's value.
    fn tile(&self) -> usize {
        let max = (64 * 1024 / self.row_bytes.max(1)).clamp(4, 256);
        #[cfg(not(target_arch = "wasm32"))]
        let threads = crate::team::threads();
        #[cfg(target_arch = "wasm32")]
        let threads = 1;
        let tiles = self.out_dim.div_ceil(max).next_multiple_of(threads);
        let tile = self.out_dim.div_ceil(tiles).max(1);
        #[cfg(target_arch = "x86_64")]
        if self.packed.is_some() {
            // Packed columns come in whole groups.
            return tile.next_multiple_of(packed::COLS);
        }
        tile
    }

    /// Computes tile `t` (of `tile` columns) for all `n` rows into `out_t`, laid out
    /// `[rows][tile width]`.
    fn run_tile(
        &self,
        kernel: Kernel,
        acts: &Activations,
        n: usize,
        (t, tile): (usize, usize),
        out_t: &mut [f32],
    ) {
        let cols = t * tile..((t + 1) * tile).min(self.out_dim);
        let width = cols.len();
        #[cfg(target_arch = "x86_64")]
        if let (Some(p), Kernel::Avx2 | Kernel::Avx2Vnni | Kernel::Avx2AvxVnni) =
            (&self.packed, kernel)
        {
            let recs = p.columns(cols);
            row_groups(n, PACKED_ROW_GROUP, width, out_t, |r0, rows, out| {
                // SAFETY: these kernels are only chosen (or passed by tests) when the CPU
                // has their features; the records are whole groups of this matrix.
                unsafe {
                    match kernel {
                        Kernel::Avx2Vnni => {
                            x86::vnni::dot_packed(self.format, recs, p.nb, acts, r0, rows, out)
                        }
                        Kernel::Avx2AvxVnni => {
                            x86::avxvnni::dot_packed(self.format, recs, p.nb, acts, r0, rows, out)
                        }
                        _ => x86::avx2::dot_packed(self.format, recs, p.nb, acts, r0, rows, out),
                    }
                }
            });
            return;
        }
        let bytes = self.bytes();
        let w = &bytes[cols.start * self.row_bytes..cols.end * self.row_bytes];
        row_groups(n, ROW_GROUP, width, out_t, |r0, rows, out| {
            self.dot_tile(kernel, w, acts, r0, rows, out)
        });
    }

    /// Dot products of the weight rows in `w` (a tile of whole rows) with activation rows
    /// `r0..r0+rows` (`rows <= ROW_GROUP`), into `out` laid out `[rows][tile columns]`.
    fn dot_tile(
        &self,
        kernel: Kernel,
        w: &[u8],
        acts: &Activations,
        r0: usize,
        rows: usize,
        out: &mut [f32],
    ) {
        let rb = self.row_bytes;
        let ncols = w.len() / rb;
        if self.format == Format::F32 {
            for (j, wj) in w.chunks_exact(rb).enumerate() {
                let wf = bytemuck_f32(wj);
                for r in 0..rows {
                    out[r * ncols + j] = dot(wf, acts.f32_row(r0 + r));
                }
            }
            return;
        }
        match kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::Avx2` is only chosen (or passed by tests) when the CPU has
            // AVX2, FMA and F16C.
            Kernel::Avx2 => unsafe { x86::avx2::dot_tile(self.format, w, rb, acts, r0, rows, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::Avx2Vnni` likewise, with AVX-512 VNNI and VL.
            Kernel::Avx2Vnni => unsafe {
                x86::vnni::dot_tile(self.format, w, rb, acts, r0, rows, out)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::Avx2AvxVnni` likewise, with AVX-VNNI.
            Kernel::Avx2AvxVnni => unsafe {
                x86::avxvnni::dot_tile(self.format, w, rb, acts, r0, rows, out)
            },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: `Kernel::Neon` is only chosen (or passed by tests) when the CPU has NEON.
            Kernel::Neon => unsafe { neon::dot_tile(self.format, w, rb, acts, r0, rows, out) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: `Kernel::NeonDotprod` likewise, with `dotprod`.
            Kernel::NeonDotprod => unsafe {
                neon::dot_tile_dotprod(self.format, w, rb, acts, r0, rows, out)
            },
            _ => portable::dot_tile(self.format, w, rb, acts, r0, rows, out),
        }
    }
}

/// Calls `f(r0, rows, out)` for the rows `0..n` in groups of at most `group`, `out` being the
/// group's part of `out_t` (laid out `[rows][width]`).
fn row_groups(
    n: usize,
    group: usize,
    width: usize,
    out_t: &mut [f32],
    mut f: impl FnMut(usize, usize, &mut [f32]),
) {
    let mut r0 = 0;
    while r0 < n {
        let rows = (n - r0).min(group);
        f(r0, rows, &mut out_t[r0 * width..(r0 + rows) * width]);
        r0 += rows;
    }
}

/// `n` rows of `x` times each of `mats` (all of the same input width), as one parallel
/// region: the activations are quantized once per block size, and the tiles of every matrix
/// are handed to the threads together (the q/k/v and gate/up products of a block). Each
/// result is bitwise what [`QMatrix::matmul`] gives for that matrix alone.
pub(crate) fn matmul_many(kernel: Kernel, mats: &[&QMatrix], x: &[f32], n: usize) -> Vec<Vec<f32>> {
    let k = mats.first().map_or(0, |m| m.in_dim);
    assert!(
        mats.iter().all(|m| m.in_dim == k),
        "products of one input width"
    );
    assert_eq!(x.len(), n * k, "matmul input shape");
    let mut acts: Vec<Activations> = Vec::new();
    let act_of: Vec<usize> = mats
        .iter()
        .map(|m| {
            let block = m.format.act_block();
            match acts.iter().position(|a| a.block == block) {
                Some(i) => i,
                None => {
                    acts.push(Activations::quantize(x, n, k, block));
                    acts.len() - 1
                }
            }
        })
        .collect();
    // Each tile's results are laid out [rows][tile width]; scattered into rows after.
    let mut tmp: Vec<Vec<f32>> = mats.iter().map(|m| vec![0f32; n * m.out_dim]).collect();
    let mut work = 0;
    // The tile width of each matrix, chosen once here (it depends on the pool's size).
    let tiles: Vec<usize> = mats.iter().map(|m| m.tile()).collect();
    let mut jobs: Vec<(usize, usize, &mut [f32])> = Vec::new();
    for (i, (m, out)) in mats.iter().zip(tmp.iter_mut()).enumerate() {
        work += m.weight_bytes() * n.min(ROW_GROUP);
        let tile = tiles[i];
        let mut rest = out.as_mut_slice();
        for t in 0..m.out_dim.div_ceil(tile) {
            let w = ((t + 1) * tile).min(m.out_dim) - t * tile;
            let (a, b) = rest.split_at_mut(w * n);
            jobs.push((i, t, a));
            rest = b;
        }
    }
    let run = |(i, t, o): &mut (usize, usize, &mut [f32])| {
        mats[*i].run_tile(kernel, &acts[act_of[*i]], n, (*t, tiles[*i]), o)
    };
    // Small products run on the calling thread: handing them to the team costs more than
    // they do. Which thread computes a column never changes its value.
    #[cfg(not(target_arch = "wasm32"))]
    if work >= 1 << 16 && jobs.len() > 1 {
        crate::team::for_each_mut(&mut jobs, run);
    } else {
        jobs.iter_mut().for_each(run);
    }
    #[cfg(target_arch = "wasm32")]
    {
        let _ = work;
        jobs.iter_mut().for_each(run);
    }
    if n == 1 {
        return tmp;
    }
    mats.iter()
        .zip(tmp)
        .zip(&tiles)
        .map(|((m, tmp), &tile)| {
            let mut out = vec![0f32; n * m.out_dim];
            for c0 in (0..m.out_dim).step_by(tile) {
                let width = tile.min(m.out_dim - c0);
                let src = &tmp[c0 * n..(c0 + width) * n];
                for r in 0..n {
                    out[r * m.out_dim + c0..r * m.out_dim + c0 + width]
                        .copy_from_slice(&src[r * width..(r + 1) * width]);
                }
            }
            out
        })
        .collect()
}

/// Little-endian f16 values widened to f32 (exact).
fn widen_f16(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(2)
        .map(|h| half::f16::from_le_bytes([h[0], h[1]]).to_f32())
        .collect()
}

/// Reinterprets little-endian f32 bytes (F32 matrices are stored so).
fn bytemuck_f32(b: &[u8]) -> &[f32] {
    // SAFETY: the bytes came from a `Vec<u8>` of f32 values written with `to_le_bytes` on a
    // little-endian target or straight from the file; alignment is checked.
    const { assert!(cfg!(target_endian = "little")) };
    let (pre, mid, post) = unsafe { b.align_to::<f32>() };
    assert!(pre.is_empty() && post.is_empty(), "unaligned f32 weights");
    mid
}

/// Rows of activations quantized the way the weight format's kernel reads them.
pub(crate) struct Activations {
    /// Values per block (32 or 256; 0: `f` holds the rows unquantized).
    pub block: usize,
    pub k: usize,
    /// `n * k` quantized values.
    pub q: Vec<i8>,
    /// One scale per block.
    pub d: Vec<f32>,
    /// 32-blocks: `f16(d_unrounded · Σq)` per block (the minimum term of Q4_1).
    pub s: Vec<f32>,
    /// Exact integer sums of `q`: per block (32-blocks) or per 16 values (256-blocks).
    pub sums: Vec<i32>,
    /// 256-blocks: exact integer sums of `q` per 32 values (the Q4_K/Q5_K minimum terms).
    pub sums32: Vec<i32>,
    /// Unquantized rows (F32 weights).
    pub f: Vec<f32>,
}

impl Activations {
    /// Quantizes `n` rows of `k` values: 32-blocks as ggml's Q8_0/Q8_1 (`d = amax/127`,
    /// scales rounded through f16), 256-blocks as ggml's Q8_K (`d = max/-127`, f32).
    pub fn quantize(x: &[f32], n: usize, k: usize, block: usize) -> Self {
        let mut a = Activations {
            block,
            k,
            q: Vec::new(),
            d: Vec::new(),
            s: Vec::new(),
            sums: Vec::new(),
            sums32: Vec::new(),
            f: Vec::new(),
        };
        if block == 0 {
            a.f = x.to_vec();
            return a;
        }
        let nb = n * k / block;
        a.q = vec![0i8; n * k];
        a.d.reserve(nb);
        let r = |v: f32| half::f16::from_f32(v).to_f32();
        for (xs, qs) in x.chunks_exact(block).zip(a.q.chunks_exact_mut(block)) {
            if block == QK {
                let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let mut sum = 0i32;
                for (q, &v) in qs.iter_mut().zip(xs) {
                    *q = (v * id).round() as i8;
                    sum += *q as i32;
                }
                a.d.push(r(d));
                a.s.push(r(d * sum as f32));
                a.sums.push(sum);
            } else {
                let mut amax = 0f32;
                let mut max = 0f32;
                for &v in xs {
                    if amax < v.abs() {
                        amax = v.abs();
                        max = v;
                    }
                }
                if amax == 0.0 {
                    a.d.push(0.0);
                } else {
                    let iscale = -127.0 / max;
                    for (q, &v) in qs.iter_mut().zip(xs) {
                        *q = (iscale * v).round().clamp(-128.0, 127.0) as i8;
                    }
                    a.d.push(1.0 / iscale);
                }
                for g in qs.chunks_exact(16) {
                    a.sums.push(g.iter().map(|&q| q as i32).sum());
                }
                let s16 = &a.sums[a.sums.len() - 16..];
                a.sums32.extend(s16.chunks_exact(2).map(|p| p[0] + p[1]));
            }
        }
        a
    }

    fn f32_row(&self, r: usize) -> &[f32] {
        &self.f[r * self.k..(r + 1) * self.k]
    }

    /// Quantized values of row `r`.
    pub fn q_row(&self, r: usize) -> &[i8] {
        &self.q[r * self.k..(r + 1) * self.k]
    }

    /// Block scales of row `r`.
    pub fn d_row(&self, r: usize) -> &[f32] {
        let nb = self.k / self.block;
        &self.d[r * nb..(r + 1) * nb]
    }

    /// Q4_1 minimum terms of row `r` (32-blocks).
    pub fn s_row(&self, r: usize) -> &[f32] {
        let nb = self.k / self.block;
        &self.s[r * nb..(r + 1) * nb]
    }

    /// Per-32 integer sums of row `r` (256-blocks).
    #[cfg_attr(
        not(any(target_arch = "x86_64", target_arch = "aarch64")),
        allow(dead_code)
    )] // used by the SIMD paths
    pub fn sums32_row(&self, r: usize) -> &[i32] {
        let ns = self.k / 32;
        &self.sums32[r * ns..(r + 1) * ns]
    }

    /// Integer sums of row `r` (per block, or per 16 values for 256-blocks).
    pub fn sums_row(&self, r: usize) -> &[i32] {
        let per = if self.block == QK { QK } else { 16 };
        let ns = self.k / per;
        &self.sums[r * ns..(r + 1) * ns]
    }
}

/// The fixed float arithmetic that turns exact per-block integer sums into a result; every
/// code path calls (or mirrors lane for lane) these, so they round identically.
pub(crate) struct Combine {
    lanes: [f32; 8],
}

impl Combine {
    pub fn new() -> Self {
        Combine { lanes: [0.0; 8] }
    }

    /// Adds block `b`'s term to lane `b % 8`.
    #[inline(always)]
    pub fn add(&mut self, b: usize, term: f32) {
        self.lanes[b % 8] += term;
    }

    /// Starts from lanes a SIMD path accumulated (lane `l` holding blocks `b ≡ l mod 8`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86 paths
    pub fn from_lanes(lanes: [f32; 8]) -> Self {
        Combine { lanes }
    }

    /// The eight lanes summed in a fixed tree.
    #[inline(always)]
    pub fn finish(&self) -> f32 {
        let a = &self.lanes;
        ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
    }
}

/// Term of a legacy block: `(d_w · d_x) · isum (+ m_w · s_x for Q4_1)`.
#[inline(always)]
pub(crate) fn legacy_term(dw: f32, dx: f32, isum: i32, mw_sx: Option<(f32, f32)>) -> f32 {
    let t = (dw * dx) * isum as f32;
    match mw_sx {
        Some((m, s)) => t + m * s,
        None => t,
    }
}

/// Term of a k-quant super-block: `(d · d_x) · isum − (dmin · d_x) · isum_min`.
#[inline(always)]
pub(crate) fn kquant_term(d: f32, dmin: f32, dx: f32, isum: i32, isum_min: i32) -> f32 {
    (d * dx) * isum as f32 - (dmin * dx) * isum_min as f32
}

#[inline(always)]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The eight 6-bit scales and eight minimums of a Q4_K/Q5_K super-block, unpacked from
/// its 12 packed bytes with word operations (same values as [`scale_min_k4`]).
#[inline(always)]
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)] // used by the SIMD paths
pub(crate) fn scales_mins_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    const M1: u32 = 0x3f3f_3f3f;
    const M2: u32 = 0x0f0f_0f0f;
    const M3: u32 = 0x0303_0303;
    let u = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    let (u0, u1, u2) = (u(0), u(4), u(8));
    let sc_lo = u0 & M1;
    let sc_hi = (u2 & M2) | (((u0 >> 6) & M3) << 4);
    let mn_lo = u1 & M1;
    let mn_hi = ((u2 >> 4) & M2) | (((u1 >> 6) & M3) << 4);
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    sc[..4].copy_from_slice(&sc_lo.to_le_bytes());
    sc[4..].copy_from_slice(&sc_hi.to_le_bytes());
    mn[..4].copy_from_slice(&mn_lo.to_le_bytes());
    mn[4..].copy_from_slice(&mn_hi.to_le_bytes());
    (sc, mn)
}

/// The 6-bit scale and minimum of sub-block `j` (0..8) of a Q4_K/Q5_K super-block.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

#[cfg(test)]
mod tests;
