//! Quantized weights kept in their GGUF block format.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};

use crate::gguf::MappedTensor;
use crate::quant::{Format, QMatrix};
use crate::{Error, Result};

/// A weight tensor: read into memory by candle, or where it lies in the mapped file.
#[derive(Clone)]
pub(crate) enum Source {
    Read(Arc<QTensor>),
    Mapped(MappedTensor),
}

impl Source {
    pub fn dtype(&self) -> GgmlDType {
        match self {
            Source::Read(t) => t.dtype(),
            Source::Mapped(m) => m.dtype,
        }
    }

    pub fn dims(&self) -> Vec<usize> {
        match self {
            Source::Read(t) => t.shape().dims().to_vec(),
            Source::Mapped(m) => m.dims.clone(),
        }
    }
}

impl From<Arc<QTensor>> for Source {
    fn from(t: Arc<QTensor>) -> Self {
        Source::Read(t)
    }
}

/// A linear layer `y = x W^T` over a quantized matrix of shape `(out_dim, in_dim)`, computed
/// by the engine's own batch-invariant kernels ([`crate::quant`]).
pub(crate) struct Linear {
    matrix: QMatrix,
    pub in_dim: usize,
    pub out_dim: usize,
}

impl Linear {
    /// The layer of tensor `name`; an error names the tensor when its shape or format has no
    /// kernel.
    pub fn new(name: &str, t: impl Into<Source>) -> Result<Self> {
        let t = t.into();
        let dtype = t.dtype();
        let matrix = QMatrix::from_source(t).map_err(|why| {
            if Format::of(dtype).is_none() {
                Error::NoKernel {
                    tensor: name.to_string(),
                    dtype: format!("{dtype:?}"),
                }
            } else {
                Error::InvalidArgument(format!("tensor `{name}`: {why}"))
            }
        })?;
        Ok(Linear {
            in_dim: matrix.in_dim,
            out_dim: matrix.out_dim,
            matrix,
        })
    }

    /// The weight format the kernels compute with (F16 is widened to F32 at load).
    pub fn format(&self) -> Format {
        self.matrix.format
    }

    /// Bytes of weights the layer reads per forward.
    pub fn weight_bytes(&self) -> usize {
        self.matrix.weight_bytes()
    }

    /// The matrix as f32, `[out_dim, in_dim]`.
    pub fn dequantize(&self) -> Result<Tensor> {
        Ok(self.matrix.dequantize()?)
    }

    /// Applies the layer to `n` rows of `in_dim` values. Each output element is computed the
    /// same way whatever `n` is, on however many threads (batch invariance).
    pub fn forward(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let [y] = Self::forward_many([self], x, n)?;
        Ok(y)
    }

    /// Applies several layers of the same input width to the same rows (q/k/v, gate/up) in
    /// one parallel region; each result is bitwise that of [`Linear::forward`].
    pub fn forward_many<const N: usize>(
        layers: [&Linear; N],
        x: &[f32],
        n: usize,
    ) -> Result<[Vec<f32>; N]> {
        for l in layers {
            if x.len() != n * l.in_dim {
                return Err(Error::InvalidArgument(format!(
                    "linear layer of width {} given {} values for {n} rows",
                    l.in_dim,
                    x.len()
                )));
            }
        }
        let mats = layers.map(|l| &l.matrix);
        let out = crate::quant::matmul_many(crate::quant::kernel(), &mats, x, n);
        Ok(out.try_into().expect("one result per layer"))
    }
}

/// A token-embedding table, dequantized one row at a time.
pub(crate) struct Embedding {
    table: Source,
    dim: usize,
    row_bytes: usize,
}

impl Embedding {
    pub fn new(table: Source) -> Result<Self> {
        let dims = table.dims();
        let &[_, dim] = dims.as_slice() else {
            return Err(Error::InvalidArgument(format!(
                "token embedding is {dims:?}, not a matrix"
            )));
        };
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
        let start = token as usize * self.row_bytes;
        let read;
        let data: &[u8] = match &self.table {
            Source::Read(t) => {
                read = t.data()?;
                &read
            }
            Source::Mapped(m) => m.bytes(),
        };
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
