//! The drafter component in wasmtime: compiled once and cached, instantiated with memory and
//! time limits, given WASI (no files, no network) and the host's wasi:nn.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use sha2::{Digest, Sha256};
use tandem_core::protocol::{Outcome, Verify, VerifyResult};
use wasmtime::component::{Component, Linker, ResourceAny, ResourceTable};
use wasmtime::{Engine, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_nn::wit::WasiNnCtx;

use crate::cache::CompiledCache;
use crate::nn::NamedGraphs;

wasmtime::component::bindgen!({
    path: "../wit",
    world: "tandem:drafter/drafter-host",
});

pub use exports::tandem::drafter::session_api as api;

// The WIT records and tandem-core's types: every conversion between them on the host's
// side is here.

impl From<api::Block> for Verify {
    fn from(b: api::Block) -> Self {
        Verify {
            round: b.round,
            pos: b.pos,
            prev: b.prev,
            tokens: b.tokens,
            q: b.q,
        }
    }
}

impl From<VerifyResult> for api::VerifyResult {
    fn from(r: VerifyResult) -> Self {
        let (token, residual) = match r.outcome {
            Outcome::Token(t) => (Some(t), Vec::new()),
            Outcome::Residual(top) => (None, top),
        };
        api::VerifyResult {
            round: r.round,
            accepted: r.accepted,
            token,
            residual,
        }
    }
}

/// How much a guest may use.
#[derive(Debug, Clone, Copy)]
pub struct GuestLimits {
    /// Linear memory, bytes.
    pub memory: usize,
    /// Wall time of one call into the guest (including the draft-model compute it asks for).
    pub call_timeout: Duration,
}

impl Default for GuestLimits {
    fn default() -> Self {
        GuestLimits {
            memory: 256 << 20,
            call_timeout: Duration::from_secs(60),
        }
    }
}

/// Epoch ticks: one per 10 ms.
const TICK: Duration = Duration::from_millis(10);

/// `wasi:nn` `tensor` constructor: the library's, after checking that the guest's live
/// tensors stay within its memory budget.
fn new_tensor(
    mut store: wasmtime::StoreContextMut<'_, HostState>,
    (dimensions, ty, data): (Vec<u32>, wasmtime_wasi_nn::wit::TensorType, Vec<u8>),
) -> wasmtime::Result<(wasmtime::component::Resource<wasmtime_wasi_nn::Tensor>,)> {
    let s = store.data_mut();
    let live: usize = s
        .table
        .iter_mut()
        .filter_map(|e| e.downcast_mut::<wasmtime_wasi_nn::Tensor>())
        .map(|t| t.data.len())
        .sum();
    s.limiter
        .budget
        .check_tensors(live + data.len())
        .map_err(wasmtime::Error::msg)?;
    let tensor = s.table.push(wasmtime_wasi_nn::Tensor {
        dimensions,
        ty,
        data,
    })?;
    Ok((tensor,))
}

/// Resource handles (wasi and wasi-nn) one guest may hold at once.
const MAX_HANDLES: usize = 4096;

/// One guest's memory budget (`--guest-memory-mb`), shared by its linear memory and the
/// host memory it makes the host hold through wasi:nn (the KV caches of its execution
/// contexts), so that neither can be used to go around the other.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: usize,
    linear: AtomicUsize,
    nn: AtomicUsize,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            limit,
            linear: AtomicUsize::new(0),
            nn: AtomicUsize::new(0),
        })
    }

    /// Reserves `bytes` of host memory for wasi:nn, or says why not.
    pub fn reserve_nn(&self, bytes: usize) -> Result<(), String> {
        let mut cur = self.nn.load(Ordering::SeqCst);
        loop {
            let linear = self.linear.load(Ordering::SeqCst);
            if linear + cur + bytes > self.limit {
                return Err(format!(
                    "its draft-model KV caches would hold {} MiB, which with its {} MiB of \
                     linear memory passes its memory limit of {} MiB (--guest-memory-mb)",
                    (cur + bytes) >> 20,
                    linear >> 20,
                    self.limit >> 20
                ));
            }
            match self
                .nn
                .compare_exchange(cur, cur + bytes, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }

    /// Whether `bytes` of live wasi-nn tensors fit beside the linear memory and KV caches.
    pub fn check_tensors(&self, bytes: usize) -> Result<(), String> {
        let (linear, nn) = (self.linear.load(Ordering::SeqCst), self.nn_bytes());
        if linear + nn + bytes > self.limit {
            return Err(format!(
                "the drafter component's wasi-nn tensors would hold {} MiB, which with its {} \
                 MiB of linear memory and {} MiB of KV caches passes its memory limit of {} MiB \
                 (--guest-memory-mb)",
                bytes >> 20,
                linear >> 20,
                nn >> 20,
                self.limit >> 20
            ));
        }
        Ok(())
    }

    /// Returns `bytes` reserved with [`MemoryBudget::reserve_nn`].
    pub fn release_nn(&self, bytes: usize) {
        self.nn.fetch_sub(bytes, Ordering::SeqCst);
    }

    /// Bytes reserved for wasi:nn now.
    pub fn nn_bytes(&self) -> usize {
        self.nn.load(Ordering::SeqCst)
    }
}

struct Limiter {
    budget: Arc<MemoryBudget>,
    denied: Arc<AtomicBool>,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let b = &self.budget;
        if desired + b.nn_bytes() > b.limit {
            self.denied.store(true, Ordering::SeqCst);
            return Ok(false);
        }
        b.linear.store(desired, Ordering::SeqCst);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

/// A store's data.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    nn: WasiNnCtx,
    limiter: Limiter,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A compiled drafter component and the engine that runs it.
pub struct Runtime {
    engine: Engine,
    component: Component,
    linker: Linker<HostState>,
    /// Whether the compiled form came from the cache (no compilation this time).
    pub from_cache: bool,
    /// The component file's sha256, hex.
    pub digest: String,
}

fn engine() -> anyhow::Result<Engine> {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    if let Some(e) = ENGINE.get() {
        return Ok(e.clone());
    }
    let mut config = wasmtime::Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    // One linear memory per module: the memory limit then bounds what a component holds.
    config.wasm_multi_memory(false);
    let engine = Engine::new(&config).map_err(wt)?;
    // One ticker for the process: the epoch moves every 10 ms.
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("wasm-epoch".into())
        .spawn(move || {
            while let Some(e) = weak.upgrade() {
                e.increment_epoch();
                drop(e);
                std::thread::sleep(TICK);
            }
        })?;
    Ok(ENGINE.get_or_init(|| engine).clone())
}

/// What names this process's compiled components in the cache: a hash of everything that
/// makes wasmtime's machine code loadable (its version, the compiler settings and the CPU
/// features it compiled for). A file with another tag is not used.
pub fn engine_tag() -> anyhow::Result<String> {
    let mut compat = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&engine()?.precompile_compatibility_hash(), &mut compat);
    Ok(format!("{:016x}", std::hash::Hasher::finish(&compat)))
}

/// The cache file name of the component whose sha256 is `digest` (hex), compiled by the
/// engine tagged `tag`.
pub fn cache_key(digest: &str, tag: &str) -> String {
    format!("{}-{tag}.cwasm", &digest[..24])
}

/// Where compiled components are cached: `$TANDEM_WASM_CACHE`, else
/// `$XDG_CACHE_HOME/tandem/wasm`, else `~/.cache/tandem/wasm` — a directory of this user's
/// (see [`crate::cache`]).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TANDEM_WASM_CACHE") {
        return PathBuf::from(d);
    }
    tandem_models::fetch::cache_root().join("wasm")
}

impl Runtime {
    /// Loads a drafter component: from the compiled cache when this exact file was compiled
    /// before by this wasmtime, else compiles it and stores the result.
    pub fn load(wasm: &Path) -> anyhow::Result<Runtime> {
        let bytes = std::fs::read(wasm).with_context(|| {
            format!(
                "cannot read the drafter component {} (build it with `cargo build --profile wasm \
                 -p tandem-guest-drafter --target wasm32-wasip2`)",
                wasm.display()
            )
        })?;
        let engine = engine()?;
        let mut h = Sha256::new();
        h.update(&bytes);
        let digest = hex::encode(h.finalize());
        let key = cache_key(&digest, &engine_tag()?);
        let dir = cache_dir();
        let cache = CompiledCache::open(&dir)
            .map_err(|e| tracing_warn(&format!("compiled-component cache: {e}")))
            .ok();
        let mut from_cache = false;
        let mut component = None;
        match cache.as_ref().map(|c| c.get(&key)) {
            Some(Ok(Some(compiled))) => {
                // SAFETY: the bytes carry this user's HMAC tag for this name, so this
                // user's host wrote them with `Component::serialize` of an engine with this
                // compatibility hash (part of the name); a file that fails to load is
                // recompiled.
                match unsafe { Component::deserialize(&engine, &compiled) } {
                    Ok(c) => {
                        component = Some(c);
                        from_cache = true;
                    }
                    Err(e) => tracing_warn(&format!(
                        "ignoring the cached compiled component {key}: {e}"
                    )),
                }
            }
            Some(Err(e)) => tracing_warn(&format!(
                "ignoring a cached compiled component: {e}; compiling"
            )),
            Some(Ok(None)) | None => {}
        }
        let component = match component {
            Some(c) => c,
            None => {
                let c = Component::from_binary(&engine, &bytes).map_err(|e| {
                    anyhow::anyhow!(
                        "{} is not a valid WebAssembly component: {e:#}",
                        wasm.display()
                    )
                })?;
                if let (Some(cache), Ok(serialized)) = (&cache, c.serialize())
                    && let Err(e) = cache.put(&key, &serialized)
                {
                    tracing_warn(&format!("could not cache the compiled component: {e}"));
                }
                c
            }
        };
        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(wt)?;
        wasmtime_wasi_nn::wit::add_to_linker(&mut linker, |s: &mut HostState| {
            wasmtime_wasi_nn::wit::WasiNnView::new(&mut s.table, &mut s.nn)
        })
        .map_err(wt)?;
        // A wasi-nn tensor is a host copy of guest bytes that the guest may keep: its
        // constructor is replaced by one that counts live tensors against the guest's
        // memory budget.
        linker.allow_shadowing(true);
        linker
            .instance("wasi:nn/tensor@0.2.0-rc-2024-10-28")
            .map_err(wt)?
            .func_wrap("[constructor]tensor", new_tensor)
            .map_err(wt)?;
        linker.allow_shadowing(false);
        check_world(&engine, &component, wasm)?;
        Ok(Runtime {
            engine,
            component,
            linker,
            from_cache,
            digest,
        })
    }
}

/// The version of `tandem:drafter` this host speaks (wit/drafter.wit).
pub const WORLD_VERSION: &str = "0.2.0";

/// The `tandem:drafter` version a component implements (compiles it to read its exports).
pub fn world_version(bytes: &[u8]) -> anyhow::Result<String> {
    let engine = engine()?;
    let component = Component::from_binary(&engine, bytes)
        .map_err(|e| anyhow::anyhow!("not a valid WebAssembly component: {e:#}"))?;
    let ty = component.component_type();
    let names: Vec<String> = ty.exports(&engine).map(|(n, _)| n.to_string()).collect();
    names
        .iter()
        .find_map(|n| n.strip_prefix("tandem:drafter/session-api@"))
        .map(str::to_string)
        .ok_or_else(|| {
            anyhow::anyhow!("it exports no tandem:drafter/session-api interface: not a drafter")
        })
}

/// Refuses a component built against another version of `tandem:drafter`, saying which
/// (instead of wasmtime's missing-export error at instantiation).
fn check_world(engine: &Engine, component: &Component, wasm: &Path) -> anyhow::Result<()> {
    let ty = component.component_type();
    let ours = format!("tandem:drafter/session-api@{WORLD_VERSION}");
    let names: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
    if names.contains(&ours) {
        return Ok(());
    }
    match names
        .iter()
        .find_map(|n| n.strip_prefix("tandem:drafter/session-api@"))
    {
        Some(v) => anyhow::bail!(
            "{} implements tandem:drafter@{v}, but this host speaks tandem:drafter@{WORLD_VERSION}: \
             rebuild the drafter against this host's wit/drafter.wit (`cargo build --profile \
             wasm -p tandem-guest-drafter --target wasm32-wasip2`) or use a host of its version",
            wasm.display()
        ),
        None => anyhow::bail!(
            "{} is not a tandem drafter: it exports no tandem:drafter/session-api interface \
             (it exports: {})",
            wasm.display(),
            if names.is_empty() {
                "nothing".to_string()
            } else {
                names.join(", ")
            }
        ),
    }
}

/// wasmtime's error as an anyhow error, keeping its message chain.
fn wt(e: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{e:#}")
}

fn tracing_warn(msg: &str) {
    eprintln!("tandem: warning: {msg}");
}

/// One drafter session inside its own store.
pub struct Drafter {
    store: Store<HostState>,
    bindings: DrafterHost,
    session: ResourceAny,
    limits: GuestLimits,
    denied: Arc<AtomicBool>,
    /// Time spent inside calls into the component (its compute calls included).
    in_guest: Duration,
}

impl Drafter {
    /// Instantiates the component and opens a session with `config`. `budget` is the
    /// memory budget the graphs' execution contexts also draw from (`limits.memory` bytes).
    pub fn new(
        rt: &Runtime,
        graphs: NamedGraphs,
        config: &api::Config,
        limits: GuestLimits,
        budget: Arc<MemoryBudget>,
    ) -> anyhow::Result<Drafter> {
        let denied = Arc::new(AtomicBool::new(false));
        let state = HostState {
            wasi: WasiCtxBuilder::new().inherit_stderr().build(),
            table: {
                let mut t = ResourceTable::new();
                t.set_max_capacity(MAX_HANDLES);
                t
            },
            nn: WasiNnCtx::new(crate::nn::backends(), graphs.into()),
            limiter: Limiter {
                budget,
                denied: denied.clone(),
            },
        };
        let mut store = Store::new(&rt.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(ticks(limits.call_timeout));
        let bindings = DrafterHost::instantiate(&mut store, &rt.component, &rt.linker)
            .map_err(|e| explain(&denied, &limits, e))
            .context("instantiating the drafter component")?;
        let session = bindings
            .tandem_drafter_session_api()
            .session()
            .call_constructor(&mut store, config)
            .map_err(|e| explain(&denied, &limits, e))?;
        Ok(Drafter {
            store,
            bindings,
            session,
            limits,
            denied,
            in_guest: Duration::ZERO,
        })
    }

    /// Time spent inside calls into the component so far (the backend computes it asked
    /// for included).
    pub fn time_in_guest(&self) -> Duration {
        self.in_guest
    }

    fn call<T>(
        &mut self,
        f: impl FnOnce(&DrafterHost, &mut Store<HostState>) -> wasmtime::Result<T>,
    ) -> anyhow::Result<T> {
        self.store
            .set_epoch_deadline(ticks(self.limits.call_timeout));
        let started = Instant::now();
        let r = f(&self.bindings, &mut self.store);
        self.in_guest += started.elapsed();
        r.map_err(|e| explain(&self.denied, &self.limits, e))
    }

    fn guest<T>(
        &mut self,
        f: impl FnOnce(
            &api::GuestSession,
            &mut Store<HostState>,
            ResourceAny,
        ) -> wasmtime::Result<Result<T, String>>,
    ) -> anyhow::Result<T> {
        let session = self.session;
        crate::nn::take_backend_error();
        let r = self.call(|b, s| f(&b.tandem_drafter_session_api().session(), s, session))?;
        r.map_err(|m| match crate::nn::take_backend_error() {
            Some(backend) => {
                anyhow::anyhow!("drafter: {m} (the host's wasi:nn backend: {backend})")
            }
            None => anyhow::anyhow!("drafter: {m}"),
        })
    }

    /// Runs the prompt through the draft model.
    pub fn prefill(&mut self, prompt: &[u32]) -> anyhow::Result<()> {
        self.guest(|g, s, r| g.call_prefill(s, r, prompt))
    }

    /// Delivers an event.
    pub fn handle(&mut self, ev: &api::Event) -> anyhow::Result<()> {
        self.guest(|g, s, r| g.call_handle(s, r, ev))
    }

    /// One step.
    pub fn step(&mut self) -> anyhow::Result<Vec<api::Action>> {
        self.guest(|g, s, r| g.call_step(s, r))
    }

    /// Counters.
    pub fn stats(&mut self) -> anyhow::Result<api::Stats> {
        let session = self.session;
        self.call(|b, s| {
            b.tandem_drafter_session_api()
                .session()
                .call_stats(s, session)
        })
    }
}

fn ticks(d: Duration) -> u64 {
    (d.as_millis() / TICK.as_millis()).max(1) as u64
}

/// Turns a guest failure into an error that says what happened.
fn explain(denied: &AtomicBool, limits: &GuestLimits, e: wasmtime::Error) -> anyhow::Error {
    if denied.load(Ordering::SeqCst) {
        return anyhow::anyhow!(
            "the drafter component was stopped: it tried to grow its memory past the limit of \
             {} MiB, KV caches of its wasi-nn contexts included ({e})",
            limits.memory >> 20
        );
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => anyhow::anyhow!(
            "the drafter component was stopped: one call ran longer than the limit of {:?}",
            limits.call_timeout
        ),
        Some(t) => anyhow::anyhow!("the drafter component trapped: {t} ({e:#})"),
        None => anyhow::anyhow!("the drafter component failed: {e:#}"),
    }
}

impl Drop for Drafter {
    fn drop(&mut self) {
        if !self.denied.load(Ordering::SeqCst) {
            let _ = self.session.resource_drop(&mut self.store);
        }
    }
}
