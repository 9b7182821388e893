//! tandem-gpu: the draft model's forward on a wgpu device (Vulkan, Metal, DX12 or GL), for
//! the host's `gpu` wasi:nn backend.
//!
//! The whole forward of the `llama`/`qwen2` architectures runs in this crate's WGSL kernels
//! (`shaders.wgsl`): token embedding, RMSNorm, rotary embedding, grouped-query attention over
//! a KV cache held on the device, SwiGLU MLP, residuals, final norm, output head and argmax.
//! Matrices stay in their GGUF block formats (Q4_1, Q5_0, Q8_0, Q4_K, Q6_K), uploaded once;
//! each call sends the token ids and its position and reads back what was asked: the argmax
//! (8 bytes), or the logits of the last or of every position.
//!
//! Activations entering a quantized matrix are quantized to 8-bit blocks exactly as
//! tandem-models does on the CPU, so the two engines differ only in the order of float sums.

mod engine;

pub use engine::{BatchStep, GpuModel, GpuSession, Output, Stats, Want};
pub use tandem_models::GpuChoice;
pub use tandem_models::backend::{Best, ExitTo};

use std::fmt;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No adapter matches the choice.
    #[error("{0}")]
    NoAdapter(String),
    /// The device could not be opened or failed.
    #[error("GPU device: {0}")]
    Device(String),
    /// The model uses something this backend does not implement.
    #[error("the GPU backend cannot run {path}: {what}")]
    Unsupported {
        /// The model file.
        path: String,
        /// What is missing.
        what: String,
    },
    /// Bad arguments to a forward.
    #[error("{0}")]
    InvalidArgument(String),
    /// Reading the model.
    #[error(transparent)]
    Model(#[from] tandem_models::Error),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// One adapter wgpu found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterInfo {
    /// Adapter name, e.g. `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub name: String,
    /// Vulkan, Metal, Dx12 or Gl.
    pub backend: String,
    /// DiscreteGpu, IntegratedGpu, VirtualGpu, Cpu or Other.
    pub device_type: String,
    /// Driver name and version, when the driver says.
    pub driver: String,
}

impl AdapterInfo {
    fn of(a: &wgpu::Adapter) -> Self {
        let i = a.get_info();
        AdapterInfo {
            name: i.name,
            backend: format!("{:?}", i.backend),
            device_type: format!("{:?}", i.device_type),
            driver: format!("{} {}", i.driver, i.driver_info).trim().to_string(),
        }
    }

    /// Whether this is a software rasterizer (llvmpipe, SwiftShader, WARP): `auto` skips it.
    pub fn is_software(&self) -> bool {
        self.device_type == "Cpu"
    }
}

impl fmt::Display for AdapterInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {})", self.name, self.backend, self.device_type)
    }
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

/// Turns off Mesa's implicit Vulkan device-selection layer (sets `NODEVICE_SELECT=1` unless
/// the user set it or `MESA_VK_DEVICE_SELECT`). tandem lists and picks adapters itself, and
/// the layer only reorders them — while on a headless board it asks Wayland for the default
/// device and prints `error: XDG_RUNTIME_DIR is invalid…` on every start.
///
/// # Safety
/// Sets an environment variable: call it at the top of `main`, before any thread starts.
pub unsafe fn skip_device_select_layer() {
    let set = |k: &str| std::env::var_os(k).is_some();
    if !set("NODEVICE_SELECT") && !set("MESA_VK_DEVICE_SELECT") {
        // SAFETY: the caller guarantees no other thread reads or writes the environment.
        unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
    }
}

fn adapters(instance: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    // The primary backends first; GL only where none of them has an adapter (Mesa's EGL
    // complains on headless machines for nothing when Vulkan is there).
    let primary = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
    if !primary.is_empty() {
        return primary;
    }
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::SECONDARY))
}

/// Every adapter wgpu finds (honouring `WGPU_BACKEND`).
pub fn list_adapters() -> Vec<AdapterInfo> {
    adapters(&instance()).iter().map(AdapterInfo::of).collect()
}

/// An open device.
pub struct Gpu {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) limits: wgpu::Limits,
    /// The adapter it runs on.
    pub info: AdapterInfo,
}

/// Runs `f` with the device's out-of-memory and validation errors captured (wgpu would
/// otherwise panic on them) and returns the first as an [`Error::Device`] saying `what` failed.
pub(crate) fn captured<T>(
    device: &wgpu::Device,
    what: &str,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let invalid = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let r = f();
    let invalid = pollster::block_on(invalid.pop());
    let oom = pollster::block_on(oom.pop());
    match oom.or(invalid) {
        Some(wgpu::Error::OutOfMemory { .. }) => Err(Error::Device(format!(
            "{what}: the GPU ran out of memory (run on the CPU instead: --gpu off, or the \
             verifier's --device cpu)"
        ))),
        Some(e) => Err(Error::Device(format!("{what}: {e}"))),
        None => r,
    }
}

impl Gpu {
    /// Opens the adapter `choice` names. `Ok(None)`: the CPU backend should be used (`off`,
    /// or `auto` without a hardware adapter). A name that matches nothing is an error that
    /// lists what there is.
    pub fn open(choice: &GpuChoice) -> Result<Option<Gpu>> {
        if *choice == GpuChoice::Off {
            return Ok(None);
        }
        let inst = instance();
        let found = adapters(&inst);
        let pick = match choice {
            GpuChoice::Off => return Ok(None),
            GpuChoice::Auto => found
                .into_iter()
                .find(|a| !AdapterInfo::of(a).is_software()),
            GpuChoice::Named(name) => {
                let want = name.to_lowercase();
                let infos: Vec<AdapterInfo> = found.iter().map(AdapterInfo::of).collect();
                match found
                    .into_iter()
                    .find(|a| AdapterInfo::of(a).name.to_lowercase().contains(&want))
                {
                    Some(a) => Some(a),
                    None => {
                        let list = if infos.is_empty() {
                            "wgpu finds no adapter on this machine (install a Vulkan driver, \
                             e.g. Debian's mesa-vulkan-drivers)"
                                .to_string()
                        } else {
                            let names: Vec<String> =
                                infos.iter().map(|i| format!("`{i}`")).collect();
                            format!("adapters found: {}", names.join(", "))
                        };
                        return Err(Error::NoAdapter(format!(
                            "no GPU adapter's name contains `{name}`; {list}. Use --gpu auto, \
                             --gpu off or part of one of those names"
                        )));
                    }
                }
            }
        };
        let Some(adapter) = pick else { return Ok(None) };
        let info = AdapterInfo::of(&adapter);
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("tandem"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| Error::Device(format!("{info}: {e}")))?;
        Ok(Some(Gpu {
            device,
            queue,
            limits,
            info,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_choice_parses_and_prints_back() {
        for (s, c) in [
            ("auto", GpuChoice::Auto),
            ("off", GpuChoice::Off),
            ("cpu", GpuChoice::Off),
            (" llvmpipe ", GpuChoice::Named("llvmpipe".into())),
        ] {
            assert_eq!(s.parse::<GpuChoice>().unwrap(), c, "{s:?}");
            assert_eq!(c.to_string().parse::<GpuChoice>().unwrap(), c);
        }
        let e = "".parse::<GpuChoice>().unwrap_err();
        assert!(e.contains("tandem gpu list"), "{e}");
    }
}
