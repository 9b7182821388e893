//! Weights on the device, the kernels' pipelines, and a session's buffers and dispatch plan.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::Device;
use candle_core::quantized::{GgmlDType, QTensor};
use tandem_models::backend::{
    BatchItem, Best, Block, ExitTo, Readback, TargetBackend, TopRow, VerifySequence,
};
use tandem_models::{Architecture, Config, Logits};
use wgpu::util::DeviceExt;

use crate::{Error, Gpu, Result};

const SRC: &str = include_str!("shaders.wgsl");
/// Tokens per submission: longer forwards (prefills) run in chunks of this many.
const MAX_CHUNK: usize = 32;
/// Bytes between two dispatches' parameter slots (the uniform offset alignment).
const SLOT: u64 = 256;
/// First KV capacity, in positions; doubled when a forward needs more.
const FIRST_CAPACITY: usize = 256;
/// Bytes of one position's [`Best`] on the device (token, logit, probability).
const BEST: usize = 12;
/// Largest logits a [`TopRow`] holds.
const TOP_K: usize = tandem_models::backend::TOP_ENTRIES;
/// Bytes of one position's [`TopRow`] on the device.
const TOP: usize = 4 * (3 + 2 * TOP_K);

/// The GGUF block formats the matrix kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Format {
    Q8_0,
    Q5_0,
    Q4_1,
    Q4K,
    Q6K,
}

impl Format {
    fn of(d: GgmlDType) -> Option<Self> {
        Some(match d {
            GgmlDType::Q8_0 => Format::Q8_0,
            GgmlDType::Q5_0 => Format::Q5_0,
            GgmlDType::Q4_1 => Format::Q4_1,
            GgmlDType::Q4K => Format::Q4K,
            GgmlDType::Q6K => Format::Q6K,
            _ => return None,
        })
    }
    fn name(self) -> &'static str {
        match self {
            Format::Q8_0 => "q8_0",
            Format::Q5_0 => "q5_0",
            Format::Q4_1 => "q4_1",
            Format::Q4K => "q4_k",
            Format::Q6K => "q6_k",
        }
    }
    /// Values per block.
    fn block(self) -> usize {
        match self {
            Format::Q4K | Format::Q6K => 256,
            _ => 32,
        }
    }
    /// Bytes per block in the file.
    fn bytes(self) -> usize {
        match self {
            Format::Q8_0 => 34,
            Format::Q5_0 => 22,
            Format::Q4_1 => 20,
            Format::Q4K => 144,
            Format::Q6K => 210,
        }
    }
    /// 32-bit words per block on the device (blocks padded to whole words).
    fn words(self) -> usize {
        self.bytes().div_ceil(4)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kernel {
    Matmul(Format),
    Embed(Format),
    Quant,
    RmsNorm,
    Rope,
    Attention,
    Swiglu,
    Argmax,
    Top,
}

impl Kernel {
    fn name(self) -> &'static str {
        match self {
            Kernel::Matmul(_) => "matmul",
            Kernel::Embed(_) => "embed",
            Kernel::Quant => "quant",
            Kernel::RmsNorm => "rmsnorm",
            Kernel::Rope => "rope",
            Kernel::Attention => "attention",
            Kernel::Swiglu => "swiglu",
            Kernel::Argmax => "argmax",
            Kernel::Top => "top",
        }
    }
    /// The storage buffers it binds, from binding 2 on, as its WGSL reads them.
    fn storage(self) -> &'static [Storage] {
        const U: &str = "array<u32>";
        const I: &str = "array<i32>";
        const F: &str = "array<f32>";
        const MATMUL: &[Storage] = &[
            ro("W", U),
            ro("XQ", I),
            ro("XS", F),
            ro("BIAS", F),
            rw("Y", F),
        ];
        const EMBED: &[Storage] = &[ro("W", U), ro("TOK", U), rw("H", F)];
        const QUANT: &[Storage] = &[ro("X", F), rw("XQ", I), rw("XS", F)];
        const RMSNORM: &[Storage] = &[ro("X", F), ro("NW", F), rw("O", F)];
        const ROPE: &[Storage] = &[rw("X", F), ro("TAB", F)];
        const ATTENTION: &[Storage] = &[ro("Q", F), ro("K", F), ro("V", F), rw("O", F)];
        const SWIGLU: &[Storage] = &[rw("G", F), ro("U", F)];
        const ARGMAX: &[Storage] = &[ro("L", F), rw("R", U)];
        const TOP: &[Storage] = &[ro("L", F), ro("TOK", U), ro("TEMP", F), rw("R", U)];
        match self {
            Kernel::Matmul(_) => MATMUL,
            Kernel::Embed(_) => EMBED,
            Kernel::Quant => QUANT,
            Kernel::RmsNorm => RMSNORM,
            Kernel::Rope => ROPE,
            Kernel::Attention => ATTENTION,
            Kernel::Swiglu => SWIGLU,
            Kernel::Argmax => ARGMAX,
            Kernel::Top => TOP,
        }
    }

    /// The WGSL struct of its static parameters.
    fn params(self) -> &'static str {
        match self {
            Kernel::Matmul(_) => params::Matmul::WGSL,
            Kernel::Embed(_) => params::Embed::WGSL,
            Kernel::Quant => params::Quant::WGSL,
            Kernel::RmsNorm => params::RmsNorm::WGSL,
            Kernel::Rope => params::Rope::WGSL,
            Kernel::Attention => params::Attention::WGSL,
            Kernel::Swiglu => params::Swiglu::WGSL,
            Kernel::Argmax => params::Argmax::WGSL,
            Kernel::Top => params::Top::WGSL,
        }
    }

    /// The declarations its section relies on: `P` and the storage buffers.
    fn declarations(self) -> String {
        let mut s = format!(
            "{}@group(0) @binding(0) var<uniform> P: Params;\n",
            self.params()
        );
        for (i, b) in self.storage().iter().enumerate() {
            let access = if b.read_only { "read" } else { "read_write" };
            s += &format!(
                "@group(0) @binding({}) var<storage, {access}> {}: {};\n",
                2 + i,
                b.name,
                b.ty
            );
        }
        s
    }
}

/// A storage buffer of a kernel: its WGSL name and type, and whether it only reads it.
struct Storage {
    name: &'static str,
    ty: &'static str,
    read_only: bool,
}

const fn ro(name: &'static str, ty: &'static str) -> Storage {
    Storage {
        name,
        ty,
        read_only: true,
    }
}

const fn rw(name: &'static str, ty: &'static str) -> Storage {
    Storage {
        name,
        ty,
        read_only: false,
    }
}

/// The static parameters of each kernel, one `#[repr(C)]` struct per kernel; the WGSL
/// struct `Params` its section reads is generated from the same definition, so the two
/// cannot disagree.
mod params {
    /// A kernel's parameter struct and its WGSL mirror.
    pub trait KernelParams: bytemuck::Pod {
        /// `struct Params { ... }` in WGSL.
        const WGSL: &'static str;
    }

    macro_rules! kernel_params {
        ($($(#[$doc:meta])* $name:ident { $($field:ident: $ty:ident),* $(,)? })*) => {$(
            $(#[$doc])*
            #[repr(C)]
            #[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
            pub struct $name {
                $(pub $field: $ty,)*
            }
            impl KernelParams for $name {
                const WGSL: &'static str = concat!(
                    "struct Params { ",
                    $(stringify!($field), ": ", stringify!($ty), ", ",)*
                    "}\n"
                );
            }
        )*};
    }

    kernel_params! {
        /// `Y[offset + pos * pos_stride + t * stride + row0 + r] (+)= W[r] · x[t]` for
        /// `rows` rows of length `k`; `flags` 1 accumulates, 2 adds the bias.
        Matmul { rows: u32, k: u32, row0: u32, stride: u32, offset: u32, pos_stride: u32, flags: u32 }
        /// The embedding rows `row0..row0 + rows` of width `d` that this chunk holds.
        Embed { d: u32, row0: u32, rows: u32 }
        /// Rows of length `k` quantized in blocks of `block` (32 or 256).
        Quant { k: u32, block: u32 }
        /// RMS norm of width `d`; `last` ≠ 0 normalizes only the last row, into row 0.
        RmsNorm { d: u32, eps: f32, last: u32 }
        /// Rotary embedding of `heads` heads; `neox` ≠ 0 rotates halves, else pairs.
        Rope { heads: u32, head_dim: u32, rope_dim: u32, neox: u32, stride: u32, offset: u32, pos_stride: u32 }
        /// Causal attention of `heads` query heads over `kv_heads` cached ones.
        Attention { heads: u32, kv_heads: u32, head_dim: u32, scale: f32 }
        /// `G = silu(G) * U` over `len` elements per row.
        Swiglu { len: u32 }
        /// Argmax (and its probability) over `vocab` logits: of the last position, which is
        /// row 0 for `mode` 0 (its logits computed alone) and row n − 1 for mode 1; of every
        /// row for mode 2.
        Argmax { vocab: u32, mode: u32 }
        /// Per row: the largest logit, the softmax normalizer at the row's temperature, the
        /// next input token's logit and the `k` largest logits with their ids.
        Top { vocab: u32, k: u32 }
    }
}

use params::KernelParams;

/// `shaders.wgsl` cut at its `//!KERNEL` and `//!FORMAT` markers.
struct Sources {
    prelude: String,
    sections: HashMap<String, String>,
}

fn sources() -> Sources {
    let mut prelude = String::new();
    let mut sections: HashMap<String, String> = HashMap::new();
    let mut current: Option<String> = None;
    for line in SRC.lines() {
        if let Some(rest) = line
            .strip_prefix("//!KERNEL ")
            .or_else(|| line.strip_prefix("//!FORMAT "))
        {
            current = Some(rest.trim().to_string());
            continue;
        }
        let dst = match &current {
            Some(name) => sections.entry(name.clone()).or_default(),
            None => &mut prelude,
        };
        dst.push_str(line);
        dst.push('\n');
    }
    Sources { prelude, sections }
}

impl Sources {
    fn module(&self, k: Kernel) -> String {
        let mut s = self.prelude.clone();
        s += &k.declarations();
        if let Kernel::Matmul(f) | Kernel::Embed(f) = k {
            s += &self.sections["formats"];
            s += &self.sections[f.name()];
        }
        s += &self.sections[k.name()];
        s
    }
}

struct Pipeline {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

fn make_pipeline(device: &wgpu::Device, src: &Sources, k: Kernel) -> Pipeline {
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(k.name()),
        source: wgpu::ShaderSource::Wgsl(src.module(k).into()),
    });
    let uniform = |binding, dynamic: bool, size: u64| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: dynamic,
            min_binding_size: wgpu::BufferSize::new(size),
        },
        count: None,
    };
    let mut entries = vec![uniform(0, true, 64), uniform(1, false, 16)];
    for (i, b) in k.storage().iter().enumerate() {
        entries.push(wgpu::BindGroupLayoutEntry {
            binding: 2 + i as u32,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage {
                    read_only: b.read_only,
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        });
    }
    let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(k.name()),
        entries: &entries,
    });
    let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(k.name()),
        bind_group_layouts: &[Some(&layout)],
        ..Default::default()
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(k.name()),
        layout: Some(&pl),
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    Pipeline { pipeline, layout }
}

/// A quantized matrix `[rows, k]` on the device, cut by rows into buffers that each fit one
/// storage binding.
struct Matrix {
    format: Format,
    k: usize,
    /// (buffer, first row, rows)
    chunks: Vec<(wgpu::Buffer, usize, usize)>,
}

struct Layer {
    attn_norm: wgpu::Buffer,
    wq: Matrix,
    wk: Matrix,
    wv: Matrix,
    bq: Option<wgpu::Buffer>,
    bk: Option<wgpu::Buffer>,
    bv: Option<wgpu::Buffer>,
    wo: Matrix,
    ffn_norm: wgpu::Buffer,
    gate: Matrix,
    up: Matrix,
    down: Matrix,
}

/// A draft model on a GPU: weights uploaded once, kernels compiled. Share it behind an `Arc`;
/// each sequence runs in its own [`GpuSession`].
pub struct GpuModel {
    gpu: Gpu,
    config: Config,
    pipelines: HashMap<Kernel, Pipeline>,
    embed: Matrix,
    /// `None`: tied to the embedding.
    output: Option<Matrix>,
    output_norm: wgpu::Buffer,
    layers: Vec<Layer>,
    rope: wgpu::Buffer,
    dummy: wgpu::Buffer,
    weight_bytes: u64,
    /// Activations and dispatches of batch forwards, made at the first.
    workspace: Mutex<Option<Workspace>>,
}

impl GpuModel {
    /// Uploads a `llama`/`qwen2` GGUF to `gpu`. Refused (with a reason, so the caller can use
    /// the CPU backend): matrices in formats the kernels do not read, heads wider than 256,
    /// a trained exit adapter at the last block, and exit blocks (`exit.{k}.blk.*`).
    /// An upload the device has no memory for fails with what the weights need.
    pub fn load(gpu: Gpu, path: &Path) -> Result<Arc<GpuModel>> {
        let device = gpu.device.clone();
        let (config, tensors) = tandem_models::load_tensors(path)?;
        let what = format!(
            "uploading {} ({} MiB of weights on the device, plus each sequence's KV cache) to {}",
            path.display(),
            device_bytes(&tensors).div_ceil(1 << 20),
            gpu.info
        );
        crate::captured(&device, &what, || Self::upload(gpu, path, config, tensors))
    }

    fn upload(
        gpu: Gpu,
        path: &Path,
        config: Config,
        tensors: BTreeMap<String, Arc<QTensor>>,
    ) -> Result<Arc<GpuModel>> {
        let unsupported = |what: String| Error::Unsupported {
            path: path.display().to_string(),
            what,
        };
        let c = &config;
        let last_exit = format!("exit.{}.", c.n_layer);
        if tensors.keys().any(|n| n.starts_with(&last_exit)) {
            return Err(unsupported(format!(
                "it carries a trained exit adapter at its last block ({}), which the GPU \
                 kernels do not implement",
                last_exit.trim_end_matches('.')
            )));
        }
        let exit_block = tensors.keys().find_map(|n| {
            let (k, rest) = n.strip_prefix("exit.")?.split_once('.')?;
            rest.starts_with("blk.").then_some(k)
        });
        if let Some(k) = exit_block {
            return Err(unsupported(format!(
                "it carries an exit block at layer {k} (a transformer block with its own KV \
                 cache), which the GPU engine does not run"
            )));
        }
        if c.head_dim > 256 || c.rope_dim > c.head_dim || !c.rope_dim.is_multiple_of(2) {
            return Err(unsupported(format!(
                "head size {} (rotary {}): the attention kernel takes heads of at most 256",
                c.head_dim, c.rope_dim
            )));
        }
        let src = sources();
        let mut up = Uploader {
            gpu: &gpu,
            tensors: &tensors,
            path,
            bytes: 0,
        };
        let d = c.n_embd;
        let kv = c.kv_dim();
        let embed = up.matrix("token_embd.weight", c.vocab_size, d)?;
        let output = match tensors.contains_key("output.weight") {
            true => Some(up.matrix("output.weight", c.vocab_size, d)?),
            false => None,
        };
        let output_norm = up.vector("output_norm.weight", d)?;
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let p = |s: &str| format!("blk.{i}.{s}");
            let bias = |up: &mut Uploader, s: &str, n: usize| -> Result<Option<wgpu::Buffer>> {
                match tensors.contains_key(&p(s)) {
                    true => up.vector(&p(s), n).map(Some),
                    false => Ok(None),
                }
            };
            layers.push(Layer {
                attn_norm: up.vector(&p("attn_norm.weight"), d)?,
                wq: up.matrix(&p("attn_q.weight"), d, d)?,
                wk: up.matrix(&p("attn_k.weight"), kv, d)?,
                wv: up.matrix(&p("attn_v.weight"), kv, d)?,
                bq: bias(&mut up, "attn_q.bias", d)?,
                bk: bias(&mut up, "attn_k.bias", kv)?,
                bv: bias(&mut up, "attn_v.bias", kv)?,
                wo: up.matrix(&p("attn_output.weight"), d, d)?,
                ffn_norm: up.vector(&p("ffn_norm.weight"), d)?,
                gate: up.matrix(&p("ffn_gate.weight"), c.n_ff, d)?,
                up: up.matrix(&p("ffn_up.weight"), c.n_ff, d)?,
                down: up.matrix(&p("ffn_down.weight"), d, c.n_ff)?,
            });
        }
        let weight_bytes = up.bytes;
        // cos/sin of every position, with the CPU engine's formula (so both rotate alike).
        let half = c.rope_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / c.rope_base.powf((2 * i) as f32 / c.rope_dim as f32))
            .collect();
        let mut table = Vec::with_capacity(c.context_length * half * 2);
        for p in 0..c.context_length {
            for &f in &inv_freq {
                let a = p as f32 * f;
                table.push(a.cos());
                table.push(a.sin());
            }
        }
        let rope = storage_init(&gpu.device, "rope", bytes_of(&table));
        let dummy = storage_init(&gpu.device, "dummy", &[0u8; 16]);
        let mut kernels = vec![
            Kernel::Quant,
            Kernel::RmsNorm,
            Kernel::Rope,
            Kernel::Attention,
            Kernel::Swiglu,
            Kernel::Argmax,
            Kernel::Top,
            Kernel::Embed(embed.format),
        ];
        let mats = layers
            .iter()
            .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down])
            .chain(output.as_ref())
            .chain([&embed]);
        for m in mats {
            kernels.push(Kernel::Matmul(m.format));
        }
        let mut pipelines = HashMap::new();
        for k in kernels {
            pipelines
                .entry(k)
                .or_insert_with(|| make_pipeline(&gpu.device, &src, k));
        }
        Ok(Arc::new(GpuModel {
            gpu,
            config,
            pipelines,
            embed,
            output,
            output_norm,
            layers,
            rope,
            dummy,
            weight_bytes,
            workspace: Mutex::new(None),
        }))
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The adapter it runs on.
    pub fn adapter(&self) -> &crate::AdapterInfo {
        &self.gpu.info
    }

    /// Bytes of weights on the device (quantized, blocks padded to whole words).
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    fn head(&self) -> &Matrix {
        self.output.as_ref().unwrap_or(&self.embed)
    }
}

struct Uploader<'a> {
    gpu: &'a Gpu,
    tensors: &'a BTreeMap<String, Arc<QTensor>>,
    path: &'a Path,
    bytes: u64,
}

impl Uploader<'_> {
    fn get(&self, name: &str) -> Result<&Arc<QTensor>> {
        self.tensors.get(name).ok_or_else(|| Error::Unsupported {
            path: self.path.display().to_string(),
            what: format!("tensor `{name}` is missing"),
        })
    }

    fn malformed(&self, what: String) -> Error {
        Error::Unsupported {
            path: self.path.display().to_string(),
            what,
        }
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<wgpu::Buffer> {
        let t = self.get(name)?;
        let v: Vec<f32> = t
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map_err(|e| self.malformed(format!("tensor `{name}`: {e}")))?;
        if v.len() != len {
            return Err(self.malformed(format!(
                "tensor `{name}` has {} values, expected {len}",
                v.len()
            )));
        }
        self.bytes += 4 * len as u64;
        Ok(storage_init(&self.gpu.device, name, bytes_of(&v)))
    }

    fn matrix(&mut self, name: &str, rows: usize, k: usize) -> Result<Matrix> {
        let t = self.get(name)?.clone();
        let dims = t.shape().dims().to_vec();
        if dims != [rows, k] {
            return Err(self.malformed(format!(
                "tensor `{name}` is {dims:?}, expected [{rows}, {k}]"
            )));
        }
        let format = Format::of(t.dtype()).ok_or_else(|| {
            self.malformed(format!(
                "tensor `{name}` is {:?}; the GPU kernels read Q4_1, Q5_0, Q8_0, Q4_K and Q6_K",
                t.dtype()
            ))
        })?;
        if !k.is_multiple_of(format.block()) {
            return Err(self.malformed(format!("tensor `{name}`: {k} columns")));
        }
        let data = t
            .data()
            .map_err(|e| self.malformed(format!("tensor `{name}`: {e}")))?;
        let nb = k / format.block();
        let (row_in, row_out) = (nb * format.bytes(), nb * format.words() * 4);
        if data.len() != rows * row_in {
            return Err(self.malformed(format!("tensor `{name}` has a short data section")));
        }
        let l = &self.gpu.limits;
        let max = l.max_storage_buffer_binding_size.min(l.max_buffer_size) as usize;
        let per = (max / row_out).max(1);
        let mut chunks = Vec::new();
        let mut row0 = 0;
        while row0 < rows {
            let n = per.min(rows - row0);
            let mut buf = vec![0u8; n * row_out];
            for (b, dst) in buf.chunks_exact_mut(format.words() * 4).enumerate() {
                let s = row0 * row_in + b * format.bytes();
                dst[..format.bytes()].copy_from_slice(&data[s..s + format.bytes()]);
            }
            self.bytes += buf.len() as u64;
            chunks.push((storage_init(&self.gpu.device, name, &buf), row0, n));
            row0 += n;
        }
        Ok(Matrix { format, k, chunks })
    }
}

/// Bytes the tensors take on the device: quantized blocks padded to whole words, the rest as
/// f32.
fn device_bytes(tensors: &BTreeMap<String, Arc<QTensor>>) -> u64 {
    tensors
        .values()
        .map(|t| {
            let n = t.shape().elem_count();
            match Format::of(t.dtype()) {
                Some(f) => (n / f.block() * f.words() * 4) as u64,
                None => n as u64 * 4,
            }
        })
        .sum()
}

fn bytes_of(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte is a valid u8; the slice covers exactly the
    // floats' memory.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn storage_init(device: &wgpu::Device, label: &str, bytes: &[u8]) -> wgpu::Buffer {
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: bytes,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
    })
}

fn buffer(
    device: &wgpu::Device,
    label: &str,
    size: usize,
    usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: (size.max(4) as u64).next_multiple_of(4),
        usage,
        mapped_at_creation: false,
    })
}

/// What a forward reads back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Want {
    /// The last position's argmax and its logit (8 bytes).
    Argmax,
    /// And the last position's logits.
    LastLogits,
    /// And every position's logits (tests, verification-style blocks).
    AllLogits,
    /// Every position's best token, its logit and probability (12 bytes a position): what a
    /// greedy verifier needs of a block.
    Rows,
    /// Those and every position's logits (a sampling verifier's block).
    RowsAndLogits,
    /// Every position's [`TopRow`] at a temperature (524 bytes a position): what a
    /// sampling verifier needs of a block; the rows of logits stay on the device for
    /// [`GpuSession::row`].
    Top(f32),
}

/// What a forward returns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Output {
    /// Argmax of the last position's logits (lowest index among equal maxima).
    pub argmax: u32,
    /// Its logit.
    pub max_logit: f32,
    /// Logits as asked: empty, the last row, or every row (row-major, `vocab` wide).
    pub logits: Vec<f32>,
    /// Every position's best token ([`Want::Rows`], [`Want::RowsAndLogits`]), else empty.
    pub rows: Vec<Best>,
    /// Every position's [`TopRow`] ([`Want::Top`]), else empty.
    pub top: Vec<TopRow>,
}

/// Counters of a session's traffic with the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Forward calls.
    pub forwards: u64,
    /// Tokens run.
    pub tokens: u64,
    /// Queue submissions.
    pub submissions: u64,
    /// Bytes copied back from the device.
    pub bytes_read: u64,
    /// Bytes written to the device per forward (token ids and the step's position).
    pub bytes_written: u64,
    /// Bytes of early-exit results copied back (part of `bytes_read`).
    pub exit_bytes_read: u64,
}

#[derive(Clone, Copy)]
enum Rows {
    Tokens,
    One,
}

struct Dispatch {
    kernel: Kernel,
    group: wgpu::BindGroup,
    slot: u32,
    x: u32,
    rows: Rows,
}

struct Pending {
    kernel: Kernel,
    buffers: Vec<wgpu::Buffer>,
    params: [u8; 64],
    x: u32,
    rows: Rows,
}

impl Pending {
    /// A dispatch of `kernel` with its parameters and its storage buffers by name, in the
    /// order [`Kernel::storage`] lists them (checked: a mismatch is a bug in this file).
    fn new<P: KernelParams>(
        kernel: Kernel,
        params: P,
        buffers: &[(&str, &wgpu::Buffer)],
        x: u32,
        rows: Rows,
    ) -> Pending {
        assert_eq!(
            P::WGSL,
            kernel.params(),
            "{}: wrong params struct",
            kernel.name()
        );
        let want: Vec<&str> = kernel.storage().iter().map(|b| b.name).collect();
        let got: Vec<&str> = buffers.iter().map(|b| b.0).collect();
        assert_eq!(got, want, "{}: bindings out of order", kernel.name());
        let mut bytes = [0u8; 64];
        let p = bytemuck::bytes_of(&params);
        bytes[..p.len()].copy_from_slice(p);
        Pending {
            kernel,
            buffers: buffers.iter().map(|b| b.1.clone()).collect(),
            params: bytes,
            x,
            rows,
        }
    }
}

struct Buffers {
    tok: wgpu::Buffer,
    h: wgpu::Buffer,
    x: wgpu::Buffer,
    q: wgpu::Buffer,
    att: wgpu::Buffer,
    g: wgpu::Buffer,
    u: wgpu::Buffer,
    xq: wgpu::Buffer,
    xs: wgpu::Buffer,
    logits: wgpu::Buffer,
    res: wgpu::Buffer,
    res_read: wgpu::Buffer,
    exit_res: wgpu::Buffer,
    exit_read: wgpu::Buffer,
    logits_read: wgpu::Buffer,
    step: wgpu::Buffer,
    top: wgpu::Buffer,
    top_read: wgpu::Buffer,
    temp: wgpu::Buffer,
}

impl Buffers {
    /// Activations for up to [`MAX_CHUNK`] positions, their results and read-back buffers.
    fn new(dev: &wgpu::Device, c: &Config) -> Buffers {
        use wgpu::BufferUsages as U;
        let st = U::STORAGE;
        let widest = c.n_embd.max(c.n_ff);
        let m = MAX_CHUNK;
        Buffers {
            tok: buffer(dev, "tokens", m * 4, st | U::COPY_DST),
            h: buffer(dev, "h", m * c.n_embd * 4, st),
            x: buffer(dev, "x", m * c.n_embd * 4, st),
            q: buffer(dev, "q", m * c.n_embd * 4, st),
            att: buffer(dev, "att", m * c.n_embd * 4, st),
            g: buffer(dev, "gate", m * c.n_ff * 4, st),
            u: buffer(dev, "up", m * c.n_ff * 4, st),
            xq: buffer(dev, "xq", m * widest * 4, st),
            xs: buffer(dev, "xs", m * widest / 32 * 2 * 4, st),
            logits: buffer(
                dev,
                "logits",
                m * c.vocab_size * 4,
                st | U::COPY_SRC | U::COPY_DST,
            ),
            res: buffer(dev, "argmax", m * BEST, st | U::COPY_SRC),
            res_read: buffer(dev, "argmax-read", m * BEST, U::MAP_READ | U::COPY_DST),
            exit_res: buffer(dev, "exit", m * BEST, st | U::COPY_SRC),
            exit_read: buffer(dev, "exit-read", m * BEST, U::MAP_READ | U::COPY_DST),
            logits_read: buffer(
                dev,
                "logits-read",
                m * c.vocab_size * 4,
                U::MAP_READ | U::COPY_DST,
            ),
            step: buffer(dev, "step", 16, U::UNIFORM | U::COPY_DST),
            top: buffer(dev, "top", m * TOP, st | U::COPY_SRC),
            top_read: buffer(dev, "top-read", m * TOP, U::MAP_READ | U::COPY_DST),
            temp: buffer(dev, "temperature", m * 4, st | U::COPY_DST),
        }
    }
}

/// One sequence on the device: its KV cache (grown as needed, truncated for rollback) and
/// the recorded dispatches of a forward.
pub struct GpuSession {
    model: Arc<GpuModel>,
    b: Buffers,
    kv: Vec<(wgpu::Buffer, wgpu::Buffer)>,
    capacity: usize,
    params: Option<wgpu::Buffer>,
    body: Vec<Dispatch>,
    /// `body[..layer_end[i]]` runs blocks 0..=i.
    layer_end: Vec<usize>,
    tail_last: Vec<Dispatch>,
    tail_all: Vec<Dispatch>,
    tail_rows: Vec<Dispatch>,
    tail_exit: Vec<Dispatch>,
    tail_top: Vec<Dispatch>,
    /// Rows of the last forward's logits its logits buffer holds.
    held: usize,
    /// Its step in a batch forward (rows, first position, first row in the batch).
    step_b: wgpu::Buffer,
    /// Its part of a batch forward, per block (empty until its first batch, or after a
    /// grow), with the parameters those dispatches read.
    attend: Vec<Vec<Dispatch>>,
    attend_params: Option<wgpu::Buffer>,
    len: usize,
    stats: Stats,
}

impl GpuSession {
    /// A new, empty sequence.
    pub fn new(model: Arc<GpuModel>) -> Result<Self> {
        let device = model.gpu.device.clone();
        crate::captured(&device, "allocating a sequence's buffers", || {
            Self::create(model)
        })
    }

    fn create(model: Arc<GpuModel>) -> Result<Self> {
        let c = model.config.clone();
        let dev = &model.gpu.device;
        let b = Buffers::new(dev, &c);
        let step_b = buffer(
            dev,
            "batch-step",
            16,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        );
        let mut s = GpuSession {
            model,
            b,
            kv: Vec::new(),
            capacity: 0,
            params: None,
            body: Vec::new(),
            layer_end: Vec::new(),
            tail_last: Vec::new(),
            tail_all: Vec::new(),
            tail_rows: Vec::new(),
            tail_exit: Vec::new(),
            tail_top: Vec::new(),
            held: 0,
            step_b,
            attend: Vec::new(),
            attend_params: None,
            len: 0,
            stats: Stats::default(),
        };
        s.grow(FIRST_CAPACITY.min(c.context_length))?;
        Ok(s)
    }

    /// Positions in the KV cache.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops every position at or after `len` (rollback of speculative tokens).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Traffic so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The model.
    pub fn model(&self) -> &Arc<GpuModel> {
        &self.model
    }

    /// Runs `tokens` at positions `pos..` (`pos <= len()`; a lower `pos` rolls back first)
    /// and reads back what `want` asks for.
    pub fn forward(&mut self, tokens: &[u32], pos: usize, want: Want) -> Result<Output> {
        self.forward_with_exit(tokens, pos, want, None)
    }

    /// [`GpuSession::forward`] with an early exit: the blocks up to it and the exit's head
    /// run in a submission of their own, whose results (12 bytes a position) are read back
    /// and handed to the sink while the rest of the forward runs in the next. With several
    /// chunks (more than 32 tokens) the sink is called once, after the last chunk's exit.
    pub fn forward_with_exit(
        &mut self,
        tokens: &[u32],
        pos: usize,
        want: Want,
        exit: Option<ExitTo>,
    ) -> Result<Output> {
        let device = self.model.gpu.device.clone();
        crate::captured(&device, "running the model", || {
            self.run(tokens, pos, want, exit)
        })
    }

    /// Bytes this session's KV cache holds on the device (its whole capacity).
    pub fn cache_bytes(&self) -> usize {
        let c = &self.model.config;
        2 * c.n_layer * self.capacity * c.kv_dim() * 4
    }

    fn run(
        &mut self,
        tokens: &[u32],
        pos: usize,
        want: Want,
        mut exit: Option<ExitTo>,
    ) -> Result<Output> {
        let c = self.model.config.clone();
        let n = tokens.len();
        let most = tandem_models::backend::TOP_ROWS_MAX_TOKENS.min(MAX_CHUNK);
        if matches!(want, Want::Top(_)) && n > most {
            return Err(Error::InvalidArgument(format!(
                "a forward that reads back top rows takes at most {most} tokens, not {n}"
            )));
        }
        self.prepare(tokens, pos, exit.as_ref().map(|e| e.layer))?;
        let chunks: Vec<&[u32]> = tokens.chunks(MAX_CHUNK).collect();
        let mut out = Output::default();
        let per_row = matches!(want, Want::Rows | Want::RowsAndLogits);
        let mut exit_rows = Vec::new();
        self.held = 0;
        for (ci, chunk) in chunks.iter().enumerate() {
            let p = pos + ci * MAX_CHUNK;
            let last = ci + 1 == chunks.len();
            let tail = match want {
                Want::AllLogits => Some(&self.tail_all),
                Want::Rows | Want::RowsAndLogits => Some(&self.tail_rows),
                Want::Top(_) => Some(&self.tail_top),
                _ if last => Some(&self.tail_last),
                _ => None,
            };
            let q = &self.model.gpu.queue;
            let ids: Vec<u8> = chunk.iter().flat_map(|t| t.to_le_bytes()).collect();
            q.write_buffer(&self.b.tok, 0, &ids);
            let step: Vec<u8> = [chunk.len() as u32, p as u32, 0, 0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            q.write_buffer(&self.b.step, 0, &step);
            self.stats.bytes_written += (ids.len() + step.len()) as u64;
            if let Want::Top(t) = want {
                let temps: Vec<u8> = chunk.iter().flat_map(|_| t.to_le_bytes()).collect();
                q.write_buffer(&self.b.temp, 0, &temps);
                self.stats.bytes_written += temps.len() as u64;
            }
            let dev = &self.model.gpu.device;
            let rows = chunk.len() as u32;
            let encode = |enc: &mut wgpu::CommandEncoder,
                          list: &mut dyn Iterator<Item = &Dispatch>| {
                pass(enc, &self.model, list.map(|d| (d, rows)))
            };
            // With an exit, the blocks up to it and the exit's head go in a submission of
            // their own, so its results can be read while the rest runs.
            let split = match &exit {
                Some(e) => self.layer_end[e.layer - 1],
                None => 0,
            };
            let best_bytes = (chunk.len() * BEST) as u64;
            let exit_sub = exit.as_ref().map(|_| {
                let mut enc = dev.create_command_encoder(&Default::default());
                encode(
                    &mut enc,
                    &mut self.body[..split].iter().chain(&self.tail_exit),
                );
                enc.copy_buffer_to_buffer(&self.b.exit_res, 0, &self.b.exit_read, 0, best_bytes);
                q.submit([enc.finish()])
            });
            let logit_rows = match want {
                Want::Argmax | Want::Rows | Want::Top(_) => 0,
                Want::LastLogits => 1,
                Want::AllLogits | Want::RowsAndLogits => chunk.len(),
            };
            let logit_bytes = (logit_rows * c.vocab_size * 4) as u64;
            let (res, res_read, res_bytes) = match want {
                Want::Top(_) => (&self.b.top, &self.b.top_read, (chunk.len() * TOP) as u64),
                _ if per_row => (&self.b.res, &self.b.res_read, best_bytes),
                _ => (&self.b.res, &self.b.res_read, 8),
            };
            let mut enc = dev.create_command_encoder(&Default::default());
            encode(
                &mut enc,
                &mut self.body[split..].iter().chain(tail.into_iter().flatten()),
            );
            if tail.is_some() {
                enc.copy_buffer_to_buffer(res, 0, res_read, 0, res_bytes);
                if logit_bytes > 0 {
                    enc.copy_buffer_to_buffer(
                        &self.b.logits,
                        0,
                        &self.b.logits_read,
                        0,
                        logit_bytes,
                    );
                }
            }
            q.submit([enc.finish()]);
            self.stats.submissions += 1 + exit_sub.is_some() as u64;
            if let Some(sub) = exit_sub {
                let raw = self.read(&self.b.exit_read, best_bytes, Some(sub))?;
                exit_rows.extend(bests(&raw));
                self.stats.bytes_read += best_bytes;
                self.stats.exit_bytes_read += best_bytes;
                if last && let Some(e) = exit.as_mut() {
                    (e.sink)(&exit_rows);
                }
            }
            if tail.is_some() {
                let res = self.read(res_read, res_bytes, None)?;
                if let Want::Top(_) = want {
                    out.top.extend(top_rows(&res));
                    let l = &out.top[out.top.len() - 1].top[0];
                    (out.argmax, out.max_logit) = *l;
                } else if per_row {
                    out.rows.extend(bests(&res));
                    let l = out.rows[out.rows.len() - 1];
                    (out.argmax, out.max_logit) = (l.token, l.logit);
                } else {
                    out.argmax = u32::from_le_bytes(res[0..4].try_into().unwrap());
                    out.max_logit = f32::from_le_bytes(res[4..8].try_into().unwrap());
                }
                if logit_bytes > 0 {
                    let raw = self.read(&self.b.logits_read, logit_bytes, None)?;
                    out.logits.extend(
                        raw.chunks_exact(4)
                            .map(|b| f32::from_le_bytes(b.try_into().unwrap())),
                    );
                }
                self.stats.bytes_read += res_bytes + logit_bytes;
            }
        }
        self.len = pos + n;
        self.stats.forwards += 1;
        self.stats.tokens += n as u64;
        let all_rows = !matches!(want, Want::Argmax | Want::LastLogits);
        if chunks.len() == 1 && all_rows {
            self.held = n;
        }
        Ok(out)
    }

    /// Row `i` of the last forward's logits, read back from the device: they stay there
    /// after a forward of at most 32 tokens that computed every position's logits (a
    /// sampling round's whole row, when its [`TopRow`] does not suffice).
    pub fn row(&mut self, i: usize) -> Result<Vec<f32>> {
        if i >= self.held {
            return Err(Error::InvalidArgument(format!(
                "row {i} of the last forward's logits is not on the device ({} rows are)",
                self.held
            )));
        }
        let dev = self.model.gpu.device.clone();
        crate::captured(&dev, "reading back a row of logits", || {
            let bytes = (self.model.config.vocab_size * 4) as u64;
            let mut enc = dev.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(
                &self.b.logits,
                i as u64 * bytes,
                &self.b.logits_read,
                0,
                bytes,
            );
            self.model.gpu.queue.submit([enc.finish()]);
            let raw = self.read(&self.b.logits_read, bytes, None)?;
            self.stats.submissions += 1;
            self.stats.bytes_read += bytes;
            Ok(raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect())
        })
    }

    /// Checks a forward of `tokens` at `pos` (with an exit after block `exit`), rolls back
    /// to `pos` and makes the cache hold the forward's positions.
    fn prepare(&mut self, tokens: &[u32], pos: usize, exit: Option<usize>) -> Result<()> {
        let c = self.model.config.clone();
        let n = tokens.len();
        if n == 0 {
            return Err(Error::InvalidArgument(
                "forward needs at least one token".into(),
            ));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        if pos > self.len {
            return Err(Error::InvalidArgument(format!(
                "position {pos} is past the {} cached positions",
                self.len
            )));
        }
        if pos + n > c.context_length {
            return Err(Error::InvalidArgument(format!(
                "positions {pos}..{} exceed the context length {}",
                pos + n,
                c.context_length
            )));
        }
        if let Some(layer) = exit
            && (layer == 0 || layer >= c.n_layer)
        {
            return Err(Error::InvalidArgument(format!(
                "early exit after block {layer} of {}: it must lie in 1..{}",
                c.n_layer, c.n_layer
            )));
        }
        self.len = pos;
        if pos + n > self.capacity {
            let mut cap = self.capacity.max(1);
            while cap < pos + n {
                cap *= 2;
            }
            self.grow(cap.min(c.context_length))?;
        }
        Ok(())
    }

    /// Copies `bytes` of a mapped-read buffer back, once submission `after` (default: every
    /// submission so far) is done.
    fn read(
        &self,
        buf: &wgpu::Buffer,
        bytes: u64,
        after: Option<wgpu::SubmissionIndex>,
    ) -> Result<Vec<u8>> {
        read_back(&self.model.gpu.device, buf, 0..bytes, after)
    }

    /// Makes the KV cache hold `cap` positions (keeping what it holds) and records the plan
    /// against the new buffers.
    fn grow(&mut self, cap: usize) -> Result<()> {
        let c = self.model.config.clone();
        let dev = &self.model.gpu.device;
        let bytes = cap * c.kv_dim() * 4;
        let max = self.model.gpu.limits.max_storage_buffer_binding_size as usize;
        if bytes > max {
            return Err(Error::Device(format!(
                "a KV cache of {cap} positions needs {bytes} bytes per layer, over this \
                 adapter's {max}-byte binding limit"
            )));
        }
        use wgpu::BufferUsages as U;
        let usage = U::STORAGE | U::COPY_SRC | U::COPY_DST;
        let kv: Vec<(wgpu::Buffer, wgpu::Buffer)> = (0..c.n_layer)
            .map(|_| {
                (
                    buffer(dev, "k", bytes, usage),
                    buffer(dev, "v", bytes, usage),
                )
            })
            .collect();
        if self.len > 0 {
            let keep = (self.len * c.kv_dim() * 4) as u64;
            let mut enc = dev.create_command_encoder(&Default::default());
            for ((ok, ov), (nk, nv)) in self.kv.iter().zip(&kv) {
                enc.copy_buffer_to_buffer(ok, 0, nk, 0, keep);
                enc.copy_buffer_to_buffer(ov, 0, nv, 0, keep);
            }
            self.model.gpu.queue.submit([enc.finish()]);
            self.stats.submissions += 1;
        }
        self.kv = kv;
        self.capacity = cap;
        self.plan();
        Ok(())
    }

    /// Records every dispatch of a forward (bind groups and static parameters).
    fn plan(&mut self) {
        let m = self.model.clone();
        let b = &self.b;
        let body = blocks(&m, b, Kv::Cache(&self.kv));
        let lists = vec![
            body.list,
            tail(&m, b, 0, &b.res),
            tail(&m, b, 1, &b.res),
            tail(&m, b, 2, &b.res),
            tail(&m, b, 2, &b.exit_res),
            tail(&m, b, TOP_MODE, &b.top),
        ];
        let (params, mut lists) = record(&m, &b.step, lists);
        self.tail_top = lists.pop().unwrap();
        self.tail_exit = lists.pop().unwrap();
        self.tail_rows = lists.pop().unwrap();
        self.tail_all = lists.pop().unwrap();
        self.tail_last = lists.pop().unwrap();
        self.body = lists.pop().unwrap();
        self.layer_end = body.layer_end;
        self.params = Some(params);
        self.attend.clear();
    }

    /// Records this session's part of a batch forward over `ws`: per block, rope and
    /// attention of its rows of the batch's queries over its own cache.
    fn plan_attend(&mut self, ws: &Workspace) {
        let m = self.model.clone();
        let lists = self
            .kv
            .iter()
            .map(|(kc, vc)| attend(&m, &ws.b.q, &ws.b.att, kc, vc))
            .collect();
        let (params, lists) = record(&m, &self.step_b, lists);
        self.attend = lists;
        self.attend_params = Some(params);
    }
}

/// Where a plan's blocks put K and V.
enum Kv<'a> {
    /// Into a session's cache at the step's positions; rope and attention follow in the plan.
    Cache(&'a [(wgpu::Buffer, wgpu::Buffer)]),
    /// Into rows of a batch's activations, copied into each session's cache between the
    /// block's two halves; rope and attention are each session's own dispatches
    /// ([`GpuSession::plan_attend`]).
    Rows(&'a wgpu::Buffer, &'a wgpu::Buffer),
}

/// The embedding's and blocks' dispatches of a plan.
struct Body {
    list: Vec<Pending>,
    /// `list[..pre_end[i]]` runs block i up to its K and V.
    pre_end: Vec<usize>,
    /// `list[..layer_end[i]]` runs blocks 0..=i.
    layer_end: Vec<usize>,
}

/// The embedding and every block over the activations `b`.
fn blocks(m: &GpuModel, b: &Buffers, kv: Kv) -> Body {
    let c = &m.config;
    let (d, kvd, ff) = (c.n_embd as u32, c.kv_dim() as u32, c.n_ff as u32);
    let eps = c.rms_eps;
    let mut body: Vec<Pending> = Vec::new();
    for (buf, row0, rows) in &m.embed.chunks {
        body.push(Pending::new(
            Kernel::Embed(m.embed.format),
            params::Embed {
                d,
                row0: *row0 as u32,
                rows: *rows as u32,
            },
            &[("W", buf), ("TOK", &b.tok), ("H", &b.h)],
            d.div_ceil(64),
            Rows::Tokens,
        ));
    }
    let mut pre_end = Vec::with_capacity(m.layers.len());
    let mut layer_end = Vec::with_capacity(m.layers.len());
    for (i, l) in m.layers.iter().enumerate() {
        let (kout, vout, pos_mult) = match &kv {
            Kv::Cache(kv) => (&kv[i].0, &kv[i].1, kvd),
            Kv::Rows(k, v) => (*k, *v, 0),
        };
        body.push(norm(&b.h, &l.attn_norm, &b.x, d, eps, false));
        let qkv = [
            (&l.wq, &b.q, l.bq.as_ref(), d, 0),
            (&l.wk, kout, l.bk.as_ref(), kvd, pos_mult),
            (&l.wv, vout, l.bv.as_ref(), kvd, pos_mult),
        ];
        for (w, out, bias, stride, pos_mult) in qkv {
            let place = [stride, 0, pos_mult];
            matmul(&mut body, b, m, &b.x, w, out, bias, place, 0, Rows::Tokens);
        }
        pre_end.push(body.len());
        if let Kv::Cache(kv) = &kv {
            body.extend(attend(m, &b.q, &b.att, &kv[i].0, &kv[i].1));
        }
        let att = &b.att;
        matmul(
            &mut body,
            b,
            m,
            att,
            &l.wo,
            &b.h,
            None,
            [d, 0, 0],
            1,
            Rows::Tokens,
        );
        body.push(norm(&b.h, &l.ffn_norm, &b.x, d, eps, false));
        matmul(
            &mut body,
            b,
            m,
            &b.x,
            &l.gate,
            &b.g,
            None,
            [ff, 0, 0],
            0,
            Rows::Tokens,
        );
        matmul(
            &mut body,
            b,
            m,
            &b.x,
            &l.up,
            &b.u,
            None,
            [ff, 0, 0],
            0,
            Rows::Tokens,
        );
        body.push(Pending::new(
            Kernel::Swiglu,
            params::Swiglu { len: ff },
            &[("G", &b.g), ("U", &b.u)],
            ff.div_ceil(64),
            Rows::Tokens,
        ));
        matmul(
            &mut body,
            b,
            m,
            &b.g,
            &l.down,
            &b.h,
            None,
            [d, 0, 0],
            1,
            Rows::Tokens,
        );
        layer_end.push(body.len());
    }
    Body {
        list: body,
        pre_end,
        layer_end,
    }
}

/// Rope of the queries `q` and of the step's keys in the cache `kc`, then attention over
/// `kc`/`vc` into `att`: the part of a block that reads a session's cache.
fn attend(
    m: &GpuModel,
    q: &wgpu::Buffer,
    att: &wgpu::Buffer,
    kc: &wgpu::Buffer,
    vc: &wgpu::Buffer,
) -> Vec<Pending> {
    let c = &m.config;
    let (d, kvd) = (c.n_embd as u32, c.kv_dim() as u32);
    let half = (c.rope_dim / 2) as u32;
    let neox = (c.arch == Architecture::Qwen2) as u32;
    let mut list = Vec::with_capacity(3);
    for (buf, heads, stride, pos_stride) in [
        (q, c.n_head as u32, d, 0),
        (kc, c.n_head_kv as u32, kvd, kvd),
    ] {
        list.push(Pending::new(
            Kernel::Rope,
            params::Rope {
                heads,
                head_dim: c.head_dim as u32,
                rope_dim: c.rope_dim as u32,
                neox,
                stride,
                offset: 0,
                pos_stride,
            },
            &[("X", buf), ("TAB", &m.rope)],
            (heads * half).div_ceil(64),
            Rows::Tokens,
        ));
    }
    list.push(Pending::new(
        Kernel::Attention,
        params::Attention {
            heads: c.n_head as u32,
            kv_heads: c.n_head_kv as u32,
            head_dim: c.head_dim as u32,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        },
        &[("Q", q), ("K", kc), ("V", vc), ("O", att)],
        c.n_head as u32,
        Rows::Tokens,
    ));
    list
}

/// The output head over `b.h`: final norm, head, and the argmax kernel in `mode` (see its
/// params) writing to `res`, or with [`TOP_MODE`] the top kernel.
fn tail(m: &GpuModel, b: &Buffers, mode: u32, res: &wgpu::Buffer) -> Vec<Pending> {
    let c = &m.config;
    let last = mode == 0;
    let rows = if last { Rows::One } else { Rows::Tokens };
    let mut t = vec![norm(
        &b.h,
        &m.output_norm,
        &b.x,
        c.n_embd as u32,
        c.rms_eps,
        last,
    )];
    let v = c.vocab_size as u32;
    matmul(
        &mut t,
        b,
        m,
        &b.x,
        m.head(),
        &b.logits,
        None,
        [v, 0, 0],
        0,
        rows,
    );
    if mode == TOP_MODE {
        t.push(Pending::new(
            Kernel::Top,
            params::Top {
                vocab: v,
                k: TOP_K as u32,
            },
            &[
                ("L", &b.logits),
                ("TOK", &b.tok),
                ("TEMP", &b.temp),
                ("R", res),
            ],
            1,
            Rows::Tokens,
        ));
        return t;
    }
    t.push(Pending::new(
        Kernel::Argmax,
        params::Argmax { vocab: v, mode },
        &[("L", &b.logits), ("R", res)],
        1,
        if mode == 2 { Rows::Tokens } else { Rows::One },
    ));
    t
}

/// The output head's mode that ends in the top kernel (the others are the argmax kernel's).
const TOP_MODE: u32 = 3;

/// Makes dispatches of `lists` (bind groups over `step` and each one's buffers) with their
/// static parameters in slots of one new uniform buffer, which they keep using.
fn record(
    m: &GpuModel,
    step: &wgpu::Buffer,
    lists: Vec<Vec<Pending>>,
) -> (wgpu::Buffer, Vec<Vec<Dispatch>>) {
    let total: usize = lists.iter().map(Vec::len).sum();
    let dev = &m.gpu.device;
    let params = buffer(
        dev,
        "params",
        total.max(1) * SLOT as usize,
        wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
    );
    let mut bytes = vec![0u8; total.max(1) * SLOT as usize];
    let mut slot = 0u32;
    let mut finish = |list: Vec<Pending>| -> Vec<Dispatch> {
        list.into_iter()
            .map(|pd| {
                let at = slot as usize * SLOT as usize;
                bytes[at..at + pd.params.len()].copy_from_slice(&pd.params);
                let mut entries = vec![
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &params,
                            offset: 0,
                            size: wgpu::BufferSize::new(64),
                        }),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: step.as_entire_binding(),
                    },
                ];
                for (j, buf) in pd.buffers.iter().enumerate() {
                    entries.push(wgpu::BindGroupEntry {
                        binding: 2 + j as u32,
                        resource: buf.as_entire_binding(),
                    });
                }
                let group = dev.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some(pd.kernel.name()),
                    layout: &m.pipelines[&pd.kernel].layout,
                    entries: &entries,
                });
                slot += 1;
                Dispatch {
                    kernel: pd.kernel,
                    group,
                    slot: slot - 1,
                    x: pd.x,
                    rows: pd.rows,
                }
            })
            .collect()
    };
    let lists = lists.into_iter().map(&mut finish).collect();
    m.gpu.queue.write_buffer(&params, 0, &bytes);
    (params, lists)
}

/// Copies `range` of a mapped-read buffer back, once submission `after` (default: every
/// submission so far) is done.
fn read_back(
    dev: &wgpu::Device,
    buf: &wgpu::Buffer,
    range: Range<u64>,
    after: Option<wgpu::SubmissionIndex>,
) -> Result<Vec<u8>> {
    let slice = buf.slice(range);
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    dev.poll(wgpu::PollType::Wait {
        submission_index: after,
        timeout: None,
    })
    .map_err(|e| Error::Device(format!("waiting for the GPU: {e}")))?;
    rx.recv()
        .map_err(|_| Error::Device("the read-back was dropped".into()))?
        .map_err(|e| Error::Device(format!("reading back: {e}")))?;
    let data = slice
        .get_mapped_range()
        .map_err(|e| Error::Device(format!("reading back: {e}")))?
        .to_vec();
    buf.unmap();
    Ok(data)
}

/// Records `list` — each dispatch with the rows of its step it covers — in one compute pass.
fn pass<'d>(
    enc: &mut wgpu::CommandEncoder,
    m: &GpuModel,
    list: impl Iterator<Item = (&'d Dispatch, u32)>,
) {
    let mut pass = enc.begin_compute_pass(&Default::default());
    for (d, tokens) in list {
        pass.set_pipeline(&m.pipelines[&d.kernel].pipeline);
        pass.set_bind_group(0, &d.group, &[d.slot * SLOT as u32]);
        let rows = match d.rows {
            Rows::Tokens => tokens,
            Rows::One => 1,
        };
        pass.dispatch_workgroups(d.x, rows, 1);
    }
}

/// The four words of a step's uniform.
fn step_words(words: [usize; 4]) -> Vec<u8> {
    words
        .iter()
        .flat_map(|&v| (v as u32).to_le_bytes())
        .collect()
}

/// A batch forward's activations (up to [`MAX_CHUNK`] positions of several sessions) and the
/// dispatches that read the weights once for all of them; one per model, made at its first
/// batch and kept.
struct Workspace {
    b: Buffers,
    kb: wgpu::Buffer,
    vb: wgpu::Buffer,
    body: Vec<Dispatch>,
    pre_end: Vec<usize>,
    layer_end: Vec<usize>,
    tail_rows: Vec<Dispatch>,
    tail_exit: Vec<Dispatch>,
    tail_top: Vec<Dispatch>,
    _params: wgpu::Buffer,
}

impl Workspace {
    fn new(m: &GpuModel) -> Workspace {
        let dev = &m.gpu.device;
        let b = Buffers::new(dev, &m.config);
        let kv_bytes = MAX_CHUNK * m.config.kv_dim() * 4;
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
        let kb = buffer(dev, "batch-k", kv_bytes, usage);
        let vb = buffer(dev, "batch-v", kv_bytes, usage);
        let body = blocks(m, &b, Kv::Rows(&kb, &vb));
        let lists = vec![
            body.list,
            tail(m, &b, 2, &b.res),
            tail(m, &b, 2, &b.exit_res),
            tail(m, &b, TOP_MODE, &b.top),
        ];
        let (params, mut lists) = record(m, &b.step, lists);
        let tail_top = lists.pop().unwrap();
        let tail_exit = lists.pop().unwrap();
        let tail_rows = lists.pop().unwrap();
        Workspace {
            body: lists.pop().unwrap(),
            pre_end: body.pre_end,
            layer_end: body.layer_end,
            tail_rows,
            tail_exit,
            tail_top,
            b,
            kb,
            vb,
            _params: params,
        }
    }
}

/// One session's forward in a batch ([`GpuModel::forward_batch`]).
pub struct BatchStep<'a> {
    /// The session (of the model the batch runs on).
    pub session: &'a mut GpuSession,
    /// Its tokens.
    pub tokens: &'a [u32],
    /// Position of the first (rolling back whatever lies at or after it).
    pub pos: usize,
    /// What it reads back: [`Want::Rows`], [`Want::RowsAndLogits`] or [`Want::Top`] (the
    /// rows of logits then stay in the session's buffers for [`GpuSession::row`]); anything
    /// else runs as the session's own forward.
    pub want: Want,
    /// An early exit whose rows go to the sink before the rest of the forward is done.
    pub exit: Option<ExitTo<'a>>,
}

impl GpuModel {
    /// Runs several sessions' forwards as one: the dispatches that read weights (embedding,
    /// matrix products, norms, the head) run once over all their positions, rope and
    /// attention per session over its own cache. Every position's results are bitwise those
    /// of the session's own [`GpuSession::forward_with_exit`] (the kernels compute each
    /// position alone). Steps go in batches of up to 32 positions that share an exit layer
    /// and whether they read [`TopRow`]s, in order; a longer step runs alone. Results come
    /// back in the steps' order.
    pub fn forward_batch(self: &Arc<Self>, steps: &mut [BatchStep]) -> Vec<Result<Output>> {
        let mut results: Vec<Option<Result<Output>>> = steps.iter().map(|_| None).collect();
        // Indices of runnable steps, grouped by exit layer and tail in order of appearance.
        type Key = (Option<usize>, bool);
        let mut groups: Vec<(Key, Vec<usize>)> = Vec::new();
        for (i, s) in steps.iter_mut().enumerate() {
            if !Arc::ptr_eq(&s.session.model, self) {
                results[i] = Some(Err(Error::InvalidArgument(
                    "a batch forward got a session of another model".into(),
                )));
                continue;
            }
            let layer = s.exit.as_ref().map(|e| e.layer);
            let batchable = matches!(s.want, Want::Rows | Want::RowsAndLogits | Want::Top(_));
            if s.tokens.len() > MAX_CHUNK || !batchable {
                let out = s
                    .session
                    .forward_with_exit(s.tokens, s.pos, s.want, s.exit.take());
                results[i] = Some(out);
                continue;
            }
            let key = (layer, matches!(s.want, Want::Top(_)));
            let dev = self.gpu.device.clone();
            let what = "allocating a sequence's KV cache";
            if let Err(e) =
                crate::captured(&dev, what, || s.session.prepare(s.tokens, s.pos, layer))
            {
                results[i] = Some(Err(e));
                continue;
            }
            match groups.iter_mut().find(|g| g.0 == key) {
                Some(g) => g.1.push(i),
                None => groups.push((key, vec![i])),
            }
        }
        let mut ws = self.workspace.lock().unwrap_or_else(|e| e.into_inner());
        let ws = ws.get_or_insert_with(|| Workspace::new(self));
        for ((layer, top), members) in groups {
            let mut start = 0;
            while start < members.len() {
                let mut end = start;
                let mut rows = 0;
                while end < members.len() && rows + steps[members[end]].tokens.len() <= MAX_CHUNK {
                    rows += steps[members[end]].tokens.len();
                    end += 1;
                }
                let batch = &members[start..end];
                let mut picked: Vec<&mut BatchStep> = steps
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| batch.contains(i))
                    .map(|(_, s)| s)
                    .collect();
                let dev = self.gpu.device.clone();
                let out = crate::captured(&dev, "running a batch", || {
                    self.run_batch(ws, &mut picked, layer, top)
                });
                match out {
                    Ok(outs) => {
                        for (&i, o) in batch.iter().zip(outs) {
                            results[i] = Some(Ok(o));
                        }
                    }
                    Err(e) => {
                        for &i in batch {
                            results[i] = Some(Err(Error::Device(e.to_string())));
                        }
                    }
                }
                start = end;
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every step answered"))
            .collect()
    }

    fn run_batch(
        &self,
        ws: &Workspace,
        steps: &mut [&mut BatchStep],
        layer: Option<usize>,
        top: bool,
    ) -> Result<Vec<Output>> {
        let c = &self.config;
        let (q, dev) = (&self.gpu.queue, &self.gpu.device);
        let total: usize = steps.iter().map(|s| s.tokens.len()).sum();
        let ids: Vec<u8> = steps
            .iter()
            .flat_map(|s| s.tokens.iter().flat_map(|t| t.to_le_bytes()))
            .collect();
        q.write_buffer(&ws.b.tok, 0, &ids);
        q.write_buffer(&ws.b.step, 0, &step_words([total, 0, 0, 0]));
        let temps: Vec<u8> = steps
            .iter()
            .flat_map(|s| {
                let t = if let Want::Top(t) = s.want { t } else { 1.0 };
                s.tokens.iter().flat_map(move |_| t.to_le_bytes())
            })
            .collect();
        if top {
            q.write_buffer(&ws.b.temp, 0, &temps);
        }
        let mut row0 = Vec::with_capacity(steps.len());
        for s in steps.iter_mut() {
            if s.session.attend.is_empty() {
                s.session.plan_attend(ws);
            }
            let r = row0.last().map_or(0, |&(r, n)| r + n);
            let n = s.tokens.len();
            q.write_buffer(&s.session.step_b, 0, &step_words([n, s.pos, 0, r]));
            row0.push((r, n));
        }
        let kv_row = (c.kv_dim() * 4) as u64;
        let encode = |enc: &mut wgpu::CommandEncoder, blocks: Range<usize>| {
            let all = total as u32;
            for l in blocks {
                let start = if l == 0 { 0 } else { ws.layer_end[l - 1] };
                pass(
                    enc,
                    self,
                    ws.body[start..ws.pre_end[l]].iter().map(|d| (d, all)),
                );
                for (s, &(r, n)) in steps.iter().zip(&row0) {
                    let (kc, vc) = &s.session.kv[l];
                    let (from, to, len) =
                        (r as u64 * kv_row, s.pos as u64 * kv_row, n as u64 * kv_row);
                    enc.copy_buffer_to_buffer(&ws.kb, from, kc, to, len);
                    enc.copy_buffer_to_buffer(&ws.vb, from, vc, to, len);
                }
                let own = steps.iter().zip(&row0).flat_map(|(s, &(_, n))| {
                    s.session.attend[l].iter().map(move |d| (d, n as u32))
                });
                let shared = ws.body[ws.pre_end[l]..ws.layer_end[l]]
                    .iter()
                    .map(|d| (d, all));
                pass(enc, self, own.chain(shared));
            }
        };
        let best_bytes = (total * BEST) as u64;
        let split = layer.unwrap_or(0);
        let exit_sub = layer.map(|_| {
            let mut enc = dev.create_command_encoder(&Default::default());
            encode(&mut enc, 0..split);
            pass(
                &mut enc,
                self,
                ws.tail_exit.iter().map(|d| (d, total as u32)),
            );
            enc.copy_buffer_to_buffer(&ws.b.exit_res, 0, &ws.b.exit_read, 0, best_bytes);
            q.submit([enc.finish()])
        });
        let mut enc = dev.create_command_encoder(&Default::default());
        encode(&mut enc, split..c.n_layer);
        let (tail, res, res_read, res_bytes) = if top {
            let bytes = (total * TOP) as u64;
            (&ws.tail_top, &ws.b.top, &ws.b.top_read, bytes)
        } else {
            (&ws.tail_rows, &ws.b.res, &ws.b.res_read, best_bytes)
        };
        pass(&mut enc, self, tail.iter().map(|d| (d, total as u32)));
        enc.copy_buffer_to_buffer(res, 0, res_read, 0, res_bytes);
        let row_bytes = (c.vocab_size * 4) as u64;
        if top {
            // The rows stay with each session, for `GpuSession::row`.
            for (s, &(r, n)) in steps.iter().zip(&row0) {
                let (from, len) = (r as u64 * row_bytes, n as u64 * row_bytes);
                enc.copy_buffer_to_buffer(&ws.b.logits, from, &s.session.b.logits, 0, len);
            }
        }
        // The rows of logits asked for: one span from the first to the last session's.
        let wanted: Vec<(usize, usize)> = steps
            .iter()
            .zip(&row0)
            .filter(|(s, _)| s.want == Want::RowsAndLogits)
            .map(|(_, &r)| r)
            .collect();
        let span = match (wanted.first(), wanted.last()) {
            (Some(&(a, _)), Some(&(b, n))) => a as u64 * row_bytes..(b + n) as u64 * row_bytes,
            _ => 0..0,
        };
        if !span.is_empty() {
            let len = span.end - span.start;
            enc.copy_buffer_to_buffer(&ws.b.logits, span.start, &ws.b.logits_read, span.start, len);
        }
        q.submit([enc.finish()]);
        let subs = 1 + exit_sub.is_some() as u64;
        if let Some(sub) = exit_sub {
            let raw = read_back(dev, &ws.b.exit_read, 0..best_bytes, Some(sub))?;
            let rows: Vec<Best> = bests(&raw).collect();
            for (s, &(r, n)) in steps.iter_mut().zip(&row0) {
                if let Some(e) = s.exit.as_mut() {
                    (e.sink)(&rows[r..r + n]);
                }
            }
        }
        let raw = read_back(dev, res_read, 0..res_bytes, None)?;
        let (rows, tops): (Vec<Best>, Vec<TopRow>) = if top {
            (Vec::new(), top_rows(&raw).collect())
        } else {
            (bests(&raw).collect(), Vec::new())
        };
        let logits = if span.is_empty() {
            Vec::new()
        } else {
            read_back(dev, &ws.b.logits_read, span.clone(), None)?
        };
        let mut outs = Vec::with_capacity(steps.len());
        for (s, &(r, n)) in steps.iter_mut().zip(&row0) {
            let mut out = Output::default();
            if top {
                out.top = tops[r..r + n].to_vec();
                (out.argmax, out.max_logit) = out.top[n - 1].top[0];
                s.session.held = n;
            } else {
                out.rows = rows[r..r + n].to_vec();
                let last = out.rows[n - 1];
                (out.argmax, out.max_logit) = (last.token, last.logit);
                s.session.held = 0;
            }
            if s.want == Want::RowsAndLogits {
                let from = (r as u64 * row_bytes - span.start) as usize;
                let bytes = &logits[from..from + n * row_bytes as usize];
                out.logits = bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect();
            }
            let st = &mut s.session.stats;
            st.forwards += 1;
            st.tokens += n as u64;
            st.submissions += subs;
            st.bytes_written += (n * 4 + 16) as u64 + if top { n as u64 * 4 } else { 0 };
            let per_row = if top { TOP } else { BEST };
            let exit_bytes = if layer.is_some() {
                (n * BEST) as u64
            } else {
                0
            };
            st.exit_bytes_read += exit_bytes;
            st.bytes_read += (n * per_row) as u64 + exit_bytes + out.logits.len() as u64 * 4;
            s.session.len = s.pos + n;
            outs.push(out);
        }
        Ok(outs)
    }
}

/// [`TopRow`]s from the top kernel's words.
fn top_rows(raw: &[u8]) -> impl Iterator<Item = TopRow> + '_ {
    raw.chunks_exact(TOP).map(|w| {
        let word = |i: usize| u32::from_le_bytes(w[4 * i..4 * i + 4].try_into().unwrap());
        TopRow {
            max: f32::from_bits(word(0)),
            z: f32::from_bits(word(1)),
            next: f32::from_bits(word(2)),
            top: (0..TOP_K)
                .map(|j| (word(3 + 2 * j), f32::from_bits(word(4 + 2 * j))))
                .collect(),
        }
    })
}

/// [`Best`]s from the argmax kernel's words (token, logit bits, probability bits).
fn bests(raw: &[u8]) -> impl Iterator<Item = Best> + '_ {
    raw.chunks_exact(BEST).map(|w| {
        let word = |i: usize| u32::from_le_bytes(w[4 * i..4 * i + 4].try_into().unwrap());
        Best {
            token: word(0),
            logit: f32::from_bits(word(1)),
            prob: f32::from_bits(word(2)),
        }
    })
}

fn norm(
    x: &wgpu::Buffer,
    w: &wgpu::Buffer,
    out: &wgpu::Buffer,
    d: u32,
    eps: f32,
    last: bool,
) -> Pending {
    Pending::new(
        Kernel::RmsNorm,
        params::RmsNorm {
            d,
            eps,
            last: last as u32,
        },
        &[("X", x), ("NW", w), ("O", out)],
        1,
        if last { Rows::One } else { Rows::Tokens },
    )
}

/// Quantizes `src` into `xq`/`xs` for the matrix `w`, unless the dispatches since its last
/// quantization are matrix products that left it alone and `w` reads the same block size
/// (q, k and v share one quantized input, as do gate and up).
fn quantize(list: &mut Vec<Pending>, b: &Buffers, src: &wgpu::Buffer, w: &Matrix, rows: Rows) {
    let bs = w.format.block();
    let params = params::Quant {
        k: w.k as u32,
        block: bs as u32,
    };
    let same = bytemuck::bytes_of(&params);
    for d in list.iter().rev() {
        match d.kernel {
            // Buffer 4 of a product is its output Y.
            Kernel::Matmul(_) if d.buffers[4] != *src => continue,
            // Buffer 0 of a quantization is its input X.
            Kernel::Quant if d.buffers[0] == *src && d.params[..same.len()] == *same => return,
            _ => break,
        }
    }
    list.push(Pending::new(
        Kernel::Quant,
        params,
        &[("X", src), ("XQ", &b.xq), ("XS", &b.xs)],
        ((w.k / bs) as u32).div_ceil(64),
        rows,
    ));
}

/// `out[t, stride-wide rows] (+)= w · src[t]` (`src` quantized first, see [`quantize`]):
/// `[stride, offset, per-position offset]` place the output; `flags` 1 accumulates into it.
#[allow(clippy::too_many_arguments)]
fn matmul(
    list: &mut Vec<Pending>,
    b: &Buffers,
    m: &GpuModel,
    src: &wgpu::Buffer,
    w: &Matrix,
    out: &wgpu::Buffer,
    bias: Option<&wgpu::Buffer>,
    place: [u32; 3],
    flags: u32,
    rows: Rows,
) {
    quantize(list, b, src, w, rows);
    let flags = flags | if bias.is_some() { 2 } else { 0 };
    for (buf, row0, n) in &w.chunks {
        list.push(Pending::new(
            Kernel::Matmul(w.format),
            params::Matmul {
                rows: *n as u32,
                k: w.k as u32,
                row0: *row0 as u32,
                stride: place[0],
                offset: place[1],
                pos_stride: place[2],
                flags,
            },
            &[
                ("W", buf),
                ("XQ", &b.xq),
                ("XS", &b.xs),
                ("BIAS", bias.unwrap_or(&m.dummy)),
                ("Y", out),
            ],
            (*n as u32).div_ceil(64),
            rows,
        ));
    }
}

impl tandem_models::DraftForward for GpuSession {
    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    fn forward(
        &mut self,
        tokens: &[u32],
        pos: usize,
        want_logits: bool,
    ) -> tandem_models::Result<tandem_models::Forwarded> {
        let want = if want_logits {
            Want::LastLogits
        } else {
            Want::Argmax
        };
        let out = GpuSession::forward(self, tokens, pos, want)
            .map_err(|e| tandem_models::Error::Backend(Box::new(e)))?;
        Ok(tandem_models::Forwarded {
            argmax: out.argmax,
            logits: want_logits.then_some(out.logits),
        })
    }
}

impl VerifySequence for GpuSession {
    fn forward(
        &mut self,
        tokens: &[u32],
        pos: usize,
        want: Readback,
        exit: Option<ExitTo>,
    ) -> tandem_models::Result<Block> {
        let w = match want {
            Readback::Nothing => Want::Argmax,
            Readback::Last => Want::LastLogits,
            Readback::Rows => Want::Rows,
            Readback::RowsAndLogits => Want::RowsAndLogits,
            Readback::Top(t) => Want::Top(t),
        };
        let out = self.forward_with_exit(tokens, pos, w, exit);
        block(out, self.model.config.vocab_size)
    }

    fn len(&self) -> usize {
        self.len
    }

    fn truncate(&mut self, len: usize) {
        GpuSession::truncate(self, len)
    }

    fn cache_bytes(&self) -> usize {
        GpuSession::cache_bytes(self)
    }

    fn as_any(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn row(&mut self, i: usize) -> tandem_models::Result<Vec<f32>> {
        GpuSession::row(self, i).map_err(model_error)
    }
}

/// This crate's error as the backend traits return it.
fn model_error(e: Error) -> tandem_models::Error {
    match e {
        Error::InvalidArgument(m) => tandem_models::Error::InvalidArgument(m),
        other => tandem_models::Error::Backend(Box::new(other)),
    }
}

/// A forward's output as the backend traits return it.
fn block(out: Result<Output>, vocab: usize) -> tandem_models::Result<Block> {
    let out = out.map_err(model_error)?;
    Ok(Block {
        top: out.top,
        rows: out.rows,
        logits: (!out.logits.is_empty()).then_some(Logits {
            vocab,
            data: out.logits,
        }),
    })
}

impl TargetBackend for GpuModel {
    fn device(&self) -> String {
        format!("gpu: {}", self.gpu.info)
    }

    fn sequence(self: Arc<Self>) -> tandem_models::Result<Box<dyn VerifySequence>> {
        GpuSession::new(self)
            .map(|s| Box::new(s) as Box<dyn VerifySequence>)
            .map_err(|e| tandem_models::Error::Backend(Box::new(e)))
    }

    /// Rounds that read back each position's best token (and maybe the rows) run as
    /// [`GpuModel::forward_batch`]es; anything else (prompt chunks) runs alone.
    fn forward_batch(
        self: Arc<Self>,
        items: &mut [BatchItem],
    ) -> Vec<tandem_models::Result<Block>> {
        let vocab = self.config.vocab_size;
        let mut results: Vec<Option<tandem_models::Result<Block>>> = Vec::new();
        let mut steps = Vec::new();
        let mut at = Vec::new();
        for (i, it) in items.iter_mut().enumerate() {
            let want = match it.want {
                Readback::Rows => Want::Rows,
                Readback::RowsAndLogits => Want::RowsAndLogits,
                Readback::Top(t) => Want::Top(t),
                _ => {
                    let out = it.seq.forward(it.tokens, it.pos, it.want, it.exit.take());
                    results.push(Some(out));
                    continue;
                }
            };
            match it.seq.as_any().downcast_mut::<GpuSession>() {
                Some(session) => {
                    results.push(None);
                    at.push(i);
                    steps.push(BatchStep {
                        session,
                        tokens: it.tokens,
                        pos: it.pos,
                        want,
                        // Rebuilt, so the sink's borrow shortens to the session's.
                        exit: it.exit.take().map(|e| ExitTo {
                            layer: e.layer,
                            sink: e.sink,
                        }),
                    });
                }
                None => results.push(Some(Err(tandem_models::Error::InvalidArgument(
                    "a GPU target got a sequence of another backend".into(),
                )))),
            }
        }
        for (i, out) in at
            .into_iter()
            .zip(GpuModel::forward_batch(&self, &mut steps))
        {
            results[i] = Some(block(out, vocab));
        }
        results
            .into_iter()
            .map(|r| r.expect("every item answered"))
            .collect()
    }
}
