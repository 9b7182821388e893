//! Quantized weights kept in their GGUF block format.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::Result;

/// A linear layer `y = x W^T` over a quantized matrix of shape `(out_dim, in_dim)`.
pub(crate) struct Linear {
    weight: QMatMul,
    dtype: GgmlDType,
    pub in_dim: usize,
    pub out_dim: usize,
}

impl Linear {
    pub fn new(t: Arc<QTensor>) -> Result<Self> {
        let (out_dim, in_dim) = t.shape().dims2()?;
        let dtype = t.dtype();
        Ok(Linear {
            weight: QMatMul::from_arc(t)?,
            dtype,
            in_dim,
            out_dim,
        })
    }

    /// Applies the layer to `n` rows of `in_dim` values.
    ///
    /// Each output element must be computed the same way whatever `n` is (batch
    /// invariance). candle's x86 kernels pick a repacked tile path for some types by the
    /// number of rows; for those we keep to row-at-a-time products.
    pub fn forward(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        if n > 1 && !batch_invariant_kernel(self.dtype) {
            let mut out = Vec::with_capacity(n * self.out_dim);
            for row in x.chunks_exact(self.in_dim) {
                out.extend(self.forward(row, 1)?);
            }
            return Ok(out);
        }
        let xs = Tensor::from_slice(x, (n, self.in_dim), &Device::Cpu)?;
        let y = self.weight.forward(&xs)?;
        Ok(y.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// Whether candle's CPU matmul for this block type computes each output element with the
/// same instruction sequence for one row and for many (checked by the engine's
/// batch-invariance test on every type the catalog models use).
fn batch_invariant_kernel(dtype: GgmlDType) -> bool {
    !matches!(dtype, GgmlDType::Q6K)
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
        let storage = QStorage::from_data(std::borrow::Cow::Borrowed(row), &Device::Cpu, self.table.dtype())?;
        let q = QTensor::new(storage, (self.dim,))?;
        out.extend(q.dequantize(&Device::Cpu)?.to_vec1::<f32>()?);
        Ok(())
    }
}

/// Reads a one-dimensional tensor (norm weights, biases) as f32.
pub(crate) fn vector(t: &QTensor) -> Result<Vec<f32>> {
    Ok(t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
}
