//! Quantized weights kept in their GGUF block format.

use std::sync::Arc;

use candle_core::quantized::k_quants::{self, BlockQ4K, BlockQ6K, GgmlType};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::{Error, Result};

/// A linear layer `y = x W^T` over a quantized matrix of shape `(out_dim, in_dim)`.
pub(crate) struct Linear {
    weight: QMatMul,
    tensor: Arc<QTensor>,
    pub in_dim: usize,
    pub out_dim: usize,
}

impl Linear {
    pub fn new(t: Arc<QTensor>) -> Result<Self> {
        let (out_dim, in_dim) = t.shape().dims2()?;
        Ok(Linear {
            weight: QMatMul::from_arc(t.clone())?,
            tensor: t,
            in_dim,
            out_dim,
        })
    }

    /// The matrix as f32, `[out_dim, in_dim]`.
    pub fn dequantize(&self) -> Result<Tensor> {
        Ok(self.tensor.dequantize(&Device::Cpu)?)
    }

    /// Applies the layer to `n` rows of `in_dim` values.
    ///
    /// Each output element must be computed the same way whatever `n` is (batch
    /// invariance). candle's x86 kernels choose between a compact GEMV and a repacked tile
    /// kernel by the number of rows for Q6_K, and the two round differently. For Q6_K and
    /// Q4_K we call candle's generic kernel directly, which computes every output element
    /// with the same per-row dot product for any `n` (and still reads the weights once per
    /// tile of rows). For Q4_K this is also faster: the repacked tiles are wider than the
    /// 4.5-bit blocks, and decoding is memory-bound (measured on Qwen2.5-Coder-1.5B, 2
    /// threads: 21.8 vs 16.9 tok/s; a 5-token forward costs 4.0x a 1-token one instead
    /// of 2.0x, the same as llama.cpp's 4.0x).
    pub fn forward(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        match self.tensor.dtype() {
            #[cfg(all(
                target_arch = "x86_64",
                target_feature = "avx2",
                target_feature = "fma"
            ))]
            GgmlDType::Q4_1 => {
                let data = self.tensor.data()?;
                return Ok(crate::simd::matmul_q4_1(
                    x,
                    n,
                    self.in_dim,
                    &data,
                    self.out_dim,
                ));
            }
            GgmlDType::Q6K => return self.generic::<BlockQ6K>(x, n),
            GgmlDType::Q4K => return self.generic::<BlockQ4K>(x, n),
            _ => {}
        }
        let xs = Tensor::from_slice(x, (n, self.in_dim), &Device::Cpu)?;
        let y = self.weight.forward(&xs)?;
        Ok(y.flatten_all()?.to_vec1::<f32>()?)
    }
}

impl Linear {
    fn generic<T: GgmlType>(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let data = self.tensor.data()?;
        let size = std::mem::size_of::<T>();
        if self.tensor.dtype() != T::DTYPE
            || !data.len().is_multiple_of(size)
            || !(data.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
        {
            return Err(Error::InvalidArgument(format!(
                "internal: {:?} weights are not laid out as {:?} blocks",
                self.tensor.dtype(),
                T::DTYPE
            )));
        }
        // SAFETY: candle's CPU storage for this dtype is a `Vec<T>`; size, alignment and
        // type were checked above, and `data` borrows it for the duration of the call.
        let blocks =
            unsafe { std::slice::from_raw_parts(data.as_ptr() as *const T, data.len() / size) };
        let mut dst = vec![0f32; n * self.out_dim];
        k_quants::matmul((n, self.in_dim, self.out_dim), x, blocks, &mut dst)?;
        Ok(dst)
    }
}

/// A token-embedding table, dequantized one row at a time.
pub(crate) struct Embedding {
    table: Arc<QTensor>,
    dim: usize,
    row_bytes: usize,
}

impl Embedding {
    pub fn new(table: Arc<QTensor>) -> Result<Self> {
        let (_, dim) = table.shape().dims2()?;
        let dtype = table.dtype();
        let row_bytes = dim / dtype.block_size() * dtype.type_size();
        Ok(Embedding {
            table,
            dim,
            row_bytes,
        })
    }

    /// Appends the embedding of `token` to `out`.
    pub fn lookup(&self, token: u32, out: &mut Vec<f32>) -> Result<()> {
        let data = self.table.data()?;
        let start = token as usize * self.row_bytes;
        let row = &data[start..start + self.row_bytes];
        let storage = QStorage::from_data(
            std::borrow::Cow::Borrowed(row),
            &Device::Cpu,
            self.table.dtype(),
        )?;
        let q = QTensor::new(storage, (self.dim,))?;
        out.extend(q.dequantize(&Device::Cpu)?.to_vec1::<f32>()?);
        Ok(())
    }
}

/// Reads a one-dimensional tensor (norm weights, biases) as f32.
pub(crate) fn vector(t: &QTensor) -> Result<Vec<f32>> {
    Ok(t.dequantize(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}
