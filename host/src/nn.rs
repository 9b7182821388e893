//! The host's wasi:nn backends for graph encoding `ggml`, in the shape of wasmtime-wasi-nn's
//! backend traits (`BackendInner` loads graphs, `BackendGraph` makes execution contexts,
//! `BackendExecutionContext` computes). A graph runs on the CPU (tandem-models) or, in builds
//! with the `gpu` feature, on the wgpu adapter `--gpu` chose (tandem-gpu); either is a
//! `tandem_models::DraftForward` sequence, and the guest cannot tell which.
//!
//! Named tensors (see `wit/drafter.wit`): inputs `tokens` (I32 [n]), `pos` (I64 [1]),
//! optional `logits` (U8 [1] = 1); outputs `argmax` (I32 [1]) and, when asked, `logits`
//! (FP32 [V], the last row).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::component::MemoryBudget;
use tandem_models::{CpuSequence, DraftForward, GpuChoice, Model};
use wasmtime_wasi_nn::backend::{
    BackendError, BackendExecutionContext, BackendFromDir, BackendGraph, BackendInner, Id,
    NamedTensor,
};
use wasmtime_wasi_nn::wit::{ExecutionTarget, GraphEncoding, TensorType};
use wasmtime_wasi_nn::{Backend, ExecutionContext, Graph, GraphRegistry, Tensor};

/// A backend error. wasi-nn shows the guest only "Failed while accessing backend", so the
/// message is also kept for the host: the call into the guest runs on this thread, and
/// [`take_backend_error`] after it fails tells the user what the backend refused.
fn err(msg: impl Into<String>) -> BackendError {
    let msg = msg.into();
    LAST_ERROR.with(|e| *e.borrow_mut() = Some(msg.clone()));
    BackendError::BackendAccess(wasmtime::Error::msg(msg))
}

thread_local! {
    static LAST_ERROR: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// The last error a backend returned on this thread, if any (cleared).
pub fn take_backend_error() -> Option<String> {
    LAST_ERROR.with(|e| e.borrow_mut().take())
}

/// Time spent in draft-model compute, shared with the host's driver: all calls (for
/// energy), and single-token calls apart (a draft step; multi-token calls are prefills and
/// catch-ups after the drafter sat out rounds).
#[derive(Default, Debug)]
pub struct ComputeMeter {
    nanos: std::sync::atomic::AtomicU64,
    steps: std::sync::atomic::AtomicU64,
    step_nanos: std::sync::atomic::AtomicU64,
}

/// A reading of a [`ComputeMeter`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MeterReading {
    /// Time in every compute call.
    pub total: Duration,
    /// Single-token calls.
    pub steps: u64,
    /// Time in single-token calls.
    pub step_time: Duration,
}

impl ComputeMeter {
    fn record(&self, d: Duration, tokens: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.nanos.fetch_add(d.as_nanos() as u64, Relaxed);
        if tokens == 1 {
            self.steps.fetch_add(1, Relaxed);
            self.step_nanos.fetch_add(d.as_nanos() as u64, Relaxed);
        }
    }

    /// Totals so far.
    pub fn read(&self) -> MeterReading {
        use std::sync::atomic::Ordering::Relaxed;
        MeterReading {
            total: Duration::from_nanos(self.nanos.load(Relaxed)),
            steps: self.steps.load(Relaxed),
            step_time: Duration::from_nanos(self.step_nanos.load(Relaxed)),
        }
    }
}

/// The CPU backend: tandem-models natively.
pub struct CpuBackend;

impl BackendInner for CpuBackend {
    fn encoding(&self) -> GraphEncoding {
        GraphEncoding::Ggml
    }

    fn load(&mut self, _: &[&[u8]], _: ExecutionTarget) -> Result<Graph, BackendError> {
        Err(err(
            "the ggml backend loads models by name (`load-by-name`): the host registers them \
             with --draft-model",
        ))
    }

    fn as_dir_loadable(&mut self) -> Option<&mut dyn BackendFromDir> {
        None
    }
}

/// A draft model as a wasi:nn graph: each execution context is one sequence with its own
/// KV cache, on the CPU or on the GPU the model was loaded on.
pub struct DraftGraph {
    model: DraftModel,
    meter: Arc<ComputeMeter>,
    /// Execution contexts alive (each holds a KV cache outside the guest's memory).
    contexts: Arc<std::sync::atomic::AtomicUsize>,
    limits: Arc<GraphLimits>,
}

/// What one session's draft graph may cost the host.
pub struct GraphLimits {
    /// The guest's memory budget, which every context's KV cache draws from.
    pub budget: Arc<MemoryBudget>,
    /// Positions a context may hold: the session's history, its tokens and a draft block
    /// ahead. Also bounds the work of one compute call, which the epoch deadline cannot
    /// interrupt.
    pub max_positions: usize,
}

/// Execution contexts a session's graph may have alive at once: a drafter needs one; each
/// holds a KV cache of host memory that the guest's memory limit does not see.
pub const MAX_CONTEXTS: usize = 4;

impl BackendGraph for DraftGraph {
    fn init_execution_context(&self) -> Result<ExecutionContext, BackendError> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.contexts.fetch_add(1, SeqCst) >= MAX_CONTEXTS {
            self.contexts.fetch_sub(1, SeqCst);
            return Err(err(format!(
                "the drafter component asked for more than {MAX_CONTEXTS} execution contexts \
                 at once (each holds a KV cache of host memory)"
            )));
        }
        let session = self.model.session().map_err(|e| {
            self.contexts.fetch_sub(1, SeqCst);
            err(format!("{e:#}"))
        })?;
        let ctx: Box<dyn BackendExecutionContext> = Box::new(DraftContext {
            session,
            meter: self.meter.clone(),
            alive: self.contexts.clone(),
            limits: self.limits.clone(),
            kv_per_position: self.model.kv_bytes_per_position(),
            reserved: 0,
        });
        Ok(ctx.into())
    }
}

struct DraftContext {
    session: Box<dyn DraftForward>,
    meter: Arc<ComputeMeter>,
    alive: Arc<std::sync::atomic::AtomicUsize>,
    limits: Arc<GraphLimits>,
    kv_per_position: usize,
    /// Bytes of the budget this context's KV cache holds.
    reserved: usize,
}

impl DraftContext {
    /// Makes the budget hold `positions` of KV cache for this context, or says why not.
    fn hold(&mut self, positions: usize) -> Result<(), BackendError> {
        let max = self.limits.max_positions;
        if positions > max {
            return Err(err(format!(
                "compute would extend the sequence to {positions} positions, beyond this \
                 session's {max} (history + tokens asked + a draft block)"
            )));
        }
        let need = positions * self.kv_per_position;
        let budget = &self.limits.budget;
        if need > self.reserved {
            budget.reserve_nn(need - self.reserved).map_err(err)?;
        } else {
            budget.release_nn(self.reserved - need);
        }
        self.reserved = need;
        Ok(())
    }
}

impl Drop for DraftContext {
    fn drop(&mut self) {
        self.alive.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.limits.budget.release_nn(self.reserved);
    }
}

/// The decoded inputs of one compute call.
pub struct DraftInputs {
    /// Tokens to append.
    pub tokens: Vec<u32>,
    /// Position of the first.
    pub pos: usize,
    /// Whether the last row's logits are wanted.
    pub want_logits: bool,
}

/// Decodes the named input tensors (shared by every ggml backend).
pub fn decode_inputs(inputs: &[NamedTensor]) -> Result<DraftInputs, BackendError> {
    let mut tokens = None;
    let mut pos = None;
    let mut want_logits = false;
    for t in inputs {
        let d = &t.tensor.data;
        match (t.name.as_str(), t.tensor.ty) {
            ("tokens", TensorType::I32) => {
                if d.is_empty() || !d.len().is_multiple_of(4) {
                    return Err(err("input `tokens` must hold at least one i32"));
                }
                let v = d
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                    .map(|x| u32::try_from(x).map_err(|_| err(format!("negative token id {x}"))))
                    .collect::<Result<Vec<u32>, _>>()?;
                tokens = Some(v);
            }
            ("pos", TensorType::I64) if d.len() == 8 => {
                let p = i64::from_le_bytes(d[..8].try_into().unwrap());
                pos = Some(usize::try_from(p).map_err(|_| err(format!("negative position {p}")))?);
            }
            ("logits", TensorType::U8) if d.len() == 1 => want_logits = d[0] != 0,
            (name, ty) => {
                return Err(err(format!(
                    "unexpected input `{name}` of type {ty:?}: this graph takes `tokens` (I32 [n]), \
                     `pos` (I64 [1]) and optionally `logits` (U8 [1])"
                )));
            }
        }
    }
    Ok(DraftInputs {
        tokens: tokens.ok_or_else(|| err("missing input `tokens`"))?,
        pos: pos.ok_or_else(|| err("missing input `pos`"))?,
        want_logits,
    })
}

/// The named outputs: the argmax and, when asked, the last row of logits.
pub fn encode_outputs(argmax: u32, last: Option<&[f32]>) -> Vec<NamedTensor> {
    let argmax = argmax as i32;
    let mut out = vec![NamedTensor {
        name: "argmax".into(),
        tensor: Tensor {
            dimensions: vec![1],
            ty: TensorType::I32,
            data: argmax.to_le_bytes().to_vec(),
        },
    }];
    if let Some(last) = last {
        out.push(NamedTensor {
            name: "logits".into(),
            tensor: Tensor {
                dimensions: vec![last.len() as u32],
                ty: TensorType::Fp32,
                data: last.iter().flat_map(|v| v.to_le_bytes()).collect(),
            },
        });
    }
    out
}

impl BackendExecutionContext for DraftContext {
    fn set_input(&mut self, _: Id, _: &Tensor) -> Result<(), BackendError> {
        Err(err(
            "set-input is not supported: pass named tensors to compute",
        ))
    }

    fn get_output(&mut self, _: Id) -> Result<Tensor, BackendError> {
        Err(err(
            "get-output is not supported: compute returns named tensors",
        ))
    }

    fn compute(
        &mut self,
        inputs: Option<Vec<NamedTensor>>,
    ) -> Result<Option<Vec<NamedTensor>>, BackendError> {
        let inputs = inputs.ok_or_else(|| err("compute needs named inputs"))?;
        let d = decode_inputs(&inputs)?;
        self.hold(d.pos.saturating_add(d.tokens.len()))?;
        let started = Instant::now();
        let out = self
            .session
            .forward(&d.tokens, d.pos, d.want_logits)
            .map_err(|e| err(format!("draft model: {e:#}")))?;
        self.meter.record(started.elapsed(), d.tokens.len());
        Ok(Some(encode_outputs(out.argmax, out.logits.as_deref())))
    }
}

/// A loaded draft model on the backend `--gpu` chose.
#[derive(Clone)]
pub enum DraftModel {
    /// tandem-models on the CPU.
    Cpu(Arc<Model>),
    /// tandem-gpu on a wgpu adapter.
    #[cfg(feature = "gpu")]
    Gpu(Arc<tandem_gpu::GpuModel>),
}

impl DraftModel {
    /// Loads the model at `path` on the GPU `choice` names, or on the CPU: with `off`, when
    /// `auto` finds no hardware adapter, or when the GPU backend cannot run this model (said
    /// once per process on stderr). A name that matches no adapter is an error, and so is
    /// any name in a build without the `gpu` feature.
    pub fn load(path: &std::path::Path, choice: &GpuChoice) -> anyhow::Result<DraftModel> {
        use anyhow::Context;
        #[cfg(feature = "gpu")]
        if let Some(m) = Self::load_gpu(path, choice)? {
            return Ok(m);
        }
        #[cfg(not(feature = "gpu"))]
        if let GpuChoice::Named(name) = choice {
            anyhow::bail!(
                "--gpu {name}: this tandem was built without its GPU backend (cargo feature \
                 `gpu`); use --gpu off, or build with default features"
            );
        }
        Ok(DraftModel::Cpu(Arc::new(Model::load(path).with_context(
            || format!("loading the draft model {}", path.display()),
        )?)))
    }

    /// The model on the GPU `choice` names, or `None` for the CPU.
    #[cfg(feature = "gpu")]
    fn load_gpu(path: &std::path::Path, choice: &GpuChoice) -> anyhow::Result<Option<Self>> {
        use anyhow::Context;
        static SAID: std::sync::Once = std::sync::Once::new();
        let say = |msg: String| SAID.call_once(|| eprintln!("{msg}"));
        match tandem_gpu::Gpu::open(choice)? {
            Some(gpu) => {
                let name = gpu.info.to_string();
                match tandem_gpu::GpuModel::load(gpu, path) {
                    Ok(m) => {
                        say(format!("running the model on the GPU: {name}"));
                        return Ok(Some(DraftModel::Gpu(m)));
                    }
                    Err(e @ tandem_gpu::Error::Unsupported { .. }) => {
                        say(format!("{e}; running the model on the CPU"))
                    }
                    Err(e) => return Err(e).context(format!("loading the model on {name}")),
                }
            }
            None if *choice == GpuChoice::Auto => say(
                "no hardware GPU adapter found (`tandem gpu list` shows what wgpu sees; a \
                 software one is used only when named, e.g. --gpu llvmpipe): running the model on the CPU"
                    .into(),
            ),
            None => {}
        }
        Ok(None)
    }

    /// A new, empty sequence of the model on its backend.
    pub fn session(&self) -> anyhow::Result<Box<dyn DraftForward>> {
        Ok(match self {
            DraftModel::Cpu(m) => Box::new(CpuSequence::new(m.clone())),
            #[cfg(feature = "gpu")]
            DraftModel::Gpu(m) => Box::new(tandem_gpu::GpuSession::new(m.clone())?),
        })
    }

    /// The wasi:nn graph that runs it, within `limits`.
    pub fn graph(&self, meter: Arc<ComputeMeter>, limits: GraphLimits) -> Box<dyn BackendGraph> {
        Box::new(DraftGraph {
            model: self.clone(),
            meter,
            contexts: Default::default(),
            limits: Arc::new(limits),
        })
    }

    /// Bytes of KV cache one position costs (keys and values of every layer, f32).
    pub fn kv_bytes_per_position(&self) -> usize {
        let (c, layers) = match self {
            DraftModel::Cpu(m) => (m.config(), m.cache_layers()),
            #[cfg(feature = "gpu")]
            DraftModel::Gpu(m) => (m.config(), m.config().n_layer),
        };
        layers * c.kv_dim() * 2 * std::mem::size_of::<f32>()
    }

    /// `cpu`, or the adapter's name.
    pub fn backend(&self) -> String {
        match self {
            DraftModel::Cpu(_) => "cpu".into(),
            #[cfg(feature = "gpu")]
            DraftModel::Gpu(m) => m.adapter().name.clone(),
        }
    }
}

/// Named graphs for `load-by-name`.
#[derive(Default)]
pub struct NamedGraphs(HashMap<String, Graph>);

impl NamedGraphs {
    /// Registers a graph under `name`.
    pub fn insert(&mut self, name: impl Into<String>, graph: Box<dyn BackendGraph>) {
        self.0.insert(name.into(), Graph::from(graph));
    }
}

impl GraphRegistry for NamedGraphs {
    fn get(&self, name: &str) -> Option<&Graph> {
        self.0.get(name)
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut Graph> {
        self.0.get_mut(name)
    }
}

/// The backends the host offers.
pub fn backends() -> Vec<Backend> {
    vec![Backend::from(CpuBackend)]
}
