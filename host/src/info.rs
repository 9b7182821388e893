//! `tandem info`: what this device is and what it can run — architecture, CPU features and
//! the kernel path chosen, memory, GPU adapters, the wasmtime that runs drafters and whether
//! the compiled components in the cache are usable by it, and the models and drafters
//! present. Read-only: nothing is created or fetched.

use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::cache::CompiledCache;
use crate::component;
use crate::drafter_cmd::Store;

/// Options of `tandem info`.
#[derive(clap::Args)]
pub struct InfoArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// The drafter component to check the compiled cache for (default: the one `tandem
    /// generate` uses).
    #[arg(long, default_value_os_t = crate::generate::default_drafter())]
    pub drafter: PathBuf,
}

/// Everything `tandem info` reports.
#[derive(Debug, Serialize)]
pub struct Info {
    /// `tandem --version`.
    pub tandem_version: String,
    /// Cargo features this binary was built with (`gpu`, `train`, `demo`; none in the edge
    /// build).
    pub build_features: Vec<&'static str>,
    /// `x86_64`, `aarch64`, …
    pub arch: &'static str,
    /// `linux`, …
    pub os: &'static str,
    /// The processor.
    pub cpu: Cpu,
    /// The matrix kernels.
    pub kernel: KernelInfo,
    /// Memory, MiB.
    pub memory: Memory,
    /// GPU adapters wgpu finds.
    pub gpu: GpuInfo,
    /// The WebAssembly runtime and its compiled-component cache.
    pub wasmtime: Wasmtime,
    /// Catalog models and whether they are in the model cache.
    pub models: Vec<ModelPresence>,
    /// Drafter components: the default file and the installed bundles.
    pub drafters: Drafters,
}

/// The processor.
#[derive(Debug, Serialize)]
pub struct Cpu {
    /// The CPU's name (`model name` of /proc/cpuinfo; on Arm the implementer and part
    /// numbers when there is no name).
    pub model: String,
    /// The board's name from the device tree (Raspberry Pi, Jetson, …), if it has one.
    pub board: Option<String>,
    /// Logical cores this process may use.
    pub logical_cores: usize,
    /// The SIMD features the kernels care about that this CPU has.
    pub features: Vec<&'static str>,
}

/// The matrix kernels.
#[derive(Debug, Serialize)]
pub struct KernelInfo {
    /// The path products run on.
    pub chosen: String,
    /// Every path this CPU runs, best last (`TANDEM_KERNEL` picks another).
    pub supported: Vec<String>,
    /// `TANDEM_KERNEL`, if set.
    pub forced: Option<String>,
    /// Compute threads (`RAYON_NUM_THREADS`, default: the cores).
    pub threads: usize,
}

/// Memory from /proc/meminfo, MiB.
#[derive(Debug, Serialize)]
pub struct Memory {
    /// Installed.
    pub total_mib: u64,
    /// Available to new work.
    pub available_mib: u64,
}

/// GPU adapters.
#[derive(Debug, Serialize)]
pub struct GpuInfo {
    /// Whether this binary has the wgpu backend (not in the edge build).
    pub built: bool,
    /// What wgpu finds.
    pub adapters: Vec<Adapter>,
}

/// One GPU adapter.
#[derive(Debug, Serialize)]
pub struct Adapter {
    /// Its name.
    pub name: String,
    /// Vulkan, Metal, Dx12 or Gl.
    pub backend: String,
    /// DiscreteGpu, IntegratedGpu, VirtualGpu, Cpu or Other.
    pub device_type: String,
    /// Driver name and version.
    pub driver: String,
}

/// The WebAssembly runtime.
#[derive(Debug, Serialize)]
pub struct Wasmtime {
    /// wasmtime's version.
    pub version: &'static str,
    /// The tag of this engine's machine code (version, settings, CPU features): cached
    /// components compiled under another tag are recompiled.
    pub engine_tag: String,
    /// The compiled-component cache directory.
    pub cache_dir: PathBuf,
    /// Why the cache is not used, when it is not (ownership, permissions).
    pub cache_error: Option<String>,
    /// Compiled components in the cache.
    pub cached: usize,
    /// Of those, compiled by this engine (loadable without compiling).
    pub cached_compatible: usize,
}

/// A catalog model.
#[derive(Debug, Serialize)]
pub struct ModelPresence {
    /// Catalog name.
    pub name: String,
    /// Architecture.
    pub architecture: String,
    /// File size, MiB.
    pub size_mib: u64,
    /// Whether the whole file is in the cache.
    pub present: bool,
}

/// Drafter components.
#[derive(Debug, Serialize)]
pub struct Drafters {
    /// The component file checked (`--drafter`).
    pub component: PathBuf,
    /// Its sha256, if it exists.
    pub component_sha256: Option<String>,
    /// Whether the cache holds it compiled by this engine (the first run then starts without
    /// compiling).
    pub component_compiled: bool,
    /// The bundle store.
    pub store: PathBuf,
    /// Installed bundles (`NAME@VERSION`), oldest first.
    pub installed: Vec<String>,
    /// The one in use.
    pub current: Option<String>,
}

/// Gathers what `tandem info` reports.
pub fn gather(drafter: &Path) -> anyhow::Result<Info> {
    let mut build_features = Vec::new();
    if cfg!(feature = "gpu") {
        build_features.push("gpu");
    }
    if cfg!(feature = "train") {
        build_features.push("train");
    }
    if cfg!(feature = "demo") {
        build_features.push("demo");
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let board = std::fs::read("/proc/device-tree/model")
        .ok()
        .map(|b| {
            String::from_utf8_lossy(&b)
                .trim_end_matches('\0')
                .trim()
                .to_string()
        })
        .filter(|s| !s.is_empty());
    let cpu = Cpu {
        model: cpu_model(&cpuinfo),
        board,
        logical_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        features: cpu_features(),
    };
    let kernel = KernelInfo {
        chosen: tandem_models::quant::kernel().to_string(),
        supported: tandem_models::quant::supported_kernels()
            .iter()
            .map(|k| k.to_string())
            .collect(),
        forced: std::env::var("TANDEM_KERNEL").ok(),
        threads: tandem_models::compute_threads(),
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = Memory {
        total_mib: meminfo_kib(&meminfo, "MemTotal") / 1024,
        available_mib: meminfo_kib(&meminfo, "MemAvailable") / 1024,
    };
    let gpu = gpu_info();
    let tag = component::engine_tag()?;
    let cache_dir = component::cache_dir();
    let cache_error = match std::fs::metadata(&cache_dir) {
        // Opening creates a missing directory: only check one that exists.
        Ok(_) => CompiledCache::open(&cache_dir).err().map(|e| e.to_string()),
        Err(_) => None,
    };
    let names: Vec<String> = std::fs::read_dir(&cache_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".cwasm"))
        .collect();
    let suffix = format!("-{tag}.cwasm");
    let cached_compatible = names.iter().filter(|n| n.ends_with(&suffix)).count();
    let component_sha256 = std::fs::read(drafter)
        .ok()
        .map(|b| hex::encode(Sha256::digest(&b)));
    let component_compiled = component_sha256
        .as_ref()
        .is_some_and(|d| names.contains(&component::cache_key(d, &tag)));
    let store = Store::default_dir();
    let (installed, current) = if store.is_dir() {
        let s = Store::open(Some(&store))?;
        let installed = s
            .installed()
            .into_iter()
            .map(|(_, m)| format!("{}@{}", m.name, m.version))
            .collect();
        (installed, s.state().current)
    } else {
        (Vec::new(), None)
    };
    let models = tandem_models::catalog::catalog()
        .into_iter()
        .map(|e| ModelPresence {
            present: tandem_models::fetch::cache_state(&e)
                == tandem_models::fetch::CacheState::Present,
            name: e.name,
            architecture: e.architecture,
            size_mib: e.size >> 20,
        })
        .collect();
    Ok(Info {
        tandem_version: env!("CARGO_PKG_VERSION").to_string(),
        build_features,
        arch: std::env::consts::ARCH,
        os: std::env::consts::OS,
        cpu,
        kernel,
        memory,
        gpu,
        wasmtime: Wasmtime {
            version: wasmtime_environ::VERSION,
            engine_tag: tag,
            cache_dir,
            cache_error,
            cached: names.len(),
            cached_compatible,
        },
        models,
        drafters: Drafters {
            component: drafter.to_path_buf(),
            component_sha256,
            component_compiled,
            store,
            installed,
            current,
        },
    })
}

/// `tandem info`.
pub fn run(args: &InfoArgs) -> anyhow::Result<()> {
    let i = gather(&args.drafter)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&i)?);
        return Ok(());
    }
    let feats = if i.build_features.is_empty() {
        "edge build: no gpu, train, demo".to_string()
    } else {
        i.build_features.join(", ")
    };
    println!("tandem      {} ({feats})", i.tandem_version);
    println!("platform    {}-{}", i.arch, i.os);
    println!(
        "cpu         {}, {} logical cores",
        i.cpu.model, i.cpu.logical_cores
    );
    if let Some(b) = &i.cpu.board {
        println!("board       {b}");
    }
    println!("features    {}", i.cpu.features.join(" "));
    println!(
        "kernel      {} (supported: {}){}, {} threads",
        i.kernel.chosen,
        i.kernel.supported.join(", "),
        i.kernel
            .forced
            .as_ref()
            .map(|f| format!(", TANDEM_KERNEL={f}"))
            .unwrap_or_default(),
        i.kernel.threads
    );
    println!(
        "memory      {} MiB, {} MiB available",
        i.memory.total_mib, i.memory.available_mib
    );
    if !i.gpu.built {
        println!("gpu         not in this build (edge build): drafting runs on the CPU");
    } else if i.gpu.adapters.is_empty() {
        println!("gpu         no adapter found: drafting runs on the CPU");
    }
    for a in &i.gpu.adapters {
        println!(
            "gpu         {} ({}, {}, {})",
            a.name, a.backend, a.device_type, a.driver
        );
    }
    let w = &i.wasmtime;
    println!("wasmtime    {} (engine tag {})", w.version, w.engine_tag);
    match &w.cache_error {
        Some(e) => println!("wasm cache  {}: not used: {e}", w.cache_dir.display()),
        None => println!(
            "wasm cache  {}: {} compiled components, {} compatible with this engine",
            w.cache_dir.display(),
            w.cached,
            w.cached_compatible
        ),
    }
    let d = &i.drafters;
    match &d.component_sha256 {
        Some(h) => println!(
            "drafter     {} (sha256 {h}){}",
            d.component.display(),
            if d.component_compiled {
                ", compiled in the cache"
            } else {
                ", compiled on first use"
            }
        ),
        None => println!("drafter     {}: not found", d.component.display()),
    }
    if !d.installed.is_empty() {
        println!(
            "bundles     {} (current: {})",
            d.installed.join(", "),
            d.current.as_deref().unwrap_or("none")
        );
    }
    for m in &i.models {
        println!(
            "model       {:<20} {:<7} {:>5} MiB  {}",
            m.name,
            m.architecture,
            m.size_mib,
            if m.present { "present" } else { "not fetched" }
        );
    }
    Ok(())
}

/// The CPU's name from /proc/cpuinfo.
fn cpu_model(cpuinfo: &str) -> String {
    let field = |key: &str| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
    };
    if let Some(m) = field("model name") {
        return m;
    }
    match (field("CPU implementer"), field("CPU part")) {
        (Some(i), Some(p)) => match arm_core(&i, &p) {
            Some(name) => format!("Arm {name}"),
            None => format!("implementer {i}, part {p}"),
        },
        _ => "unknown".to_string(),
    }
}

/// Names of common Arm-designed cores (implementer 0x41) by part number.
fn arm_core(implementer: &str, part: &str) -> Option<&'static str> {
    if implementer != "0x41" {
        return None;
    }
    Some(match part {
        "0xd03" => "Cortex-A53",
        "0xd04" => "Cortex-A35",
        "0xd05" => "Cortex-A55",
        "0xd07" => "Cortex-A57",
        "0xd08" => "Cortex-A72",
        "0xd09" => "Cortex-A73",
        "0xd0a" => "Cortex-A75",
        "0xd0b" => "Cortex-A76",
        "0xd0c" => "Neoverse-N1",
        "0xd0d" => "Cortex-A77",
        "0xd40" => "Neoverse-V1",
        "0xd41" => "Cortex-A78",
        "0xd42" => "Cortex-A78AE",
        "0xd44" => "Cortex-X1",
        "0xd46" => "Cortex-A510",
        "0xd47" => "Cortex-A710",
        "0xd48" => "Cortex-X2",
        "0xd49" => "Neoverse-N2",
        "0xd4b" => "Cortex-A78C",
        "0xd4f" => "Neoverse-V2",
        "0xd80" => "Cortex-A520",
        "0xd81" => "Cortex-A720",
        "0xd82" => "Cortex-X4",
        _ => return None,
    })
}

/// A `Key:   N kB` line of /proc/meminfo, KiB (0 when absent).
fn meminfo_kib(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(key)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// The SIMD features the kernels (and wasmtime's code) care about.
fn cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut v = Vec::new();
    #[allow(unused_macros)]
    macro_rules! detect {
        ($detected:ident: $($f:tt),*) => {$(
            if std::arch::$detected!($f) {
                v.push($f);
            }
        )*};
    }
    #[cfg(target_arch = "x86_64")]
    detect!(is_x86_feature_detected: "sse4.2", "avx", "avx2", "fma", "f16c", "avxvnni",
        "avx512f", "avx512bw", "avx512vl", "avx512vnni");
    #[cfg(target_arch = "aarch64")]
    detect!(is_aarch64_feature_detected: "neon", "dotprod", "fp16", "i8mm", "sve", "sve2");
    v
}

#[cfg(feature = "gpu")]
fn gpu_info() -> GpuInfo {
    GpuInfo {
        built: true,
        adapters: tandem_gpu::list_adapters()
            .into_iter()
            .map(|a| Adapter {
                name: a.name,
                backend: a.backend,
                device_type: a.device_type,
                driver: a.driver,
            })
            .collect(),
    }
}

#[cfg(not(feature = "gpu"))]
fn gpu_info() -> GpuInfo {
    GpuInfo {
        built: false,
        adapters: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_files() {
        let x86 = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) CPU\nflags\t: fpu\n";
        assert_eq!(cpu_model(x86), "Intel(R) Xeon(R) CPU");
        let arm = "processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd08\n";
        assert_eq!(cpu_model(arm), "Arm Cortex-A72");
        let other = "CPU implementer\t: 0x61\nCPU part\t: 0x022\n";
        assert_eq!(cpu_model(other), "implementer 0x61, part 0x022");
        assert_eq!(cpu_model(""), "unknown");
        let mem = "MemTotal:       24576000 kB\nMemFree: 1 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(meminfo_kib(mem, "MemTotal"), 24_576_000);
        assert_eq!(meminfo_kib(mem, "MemAvailable"), 2048);
        assert_eq!(meminfo_kib(mem, "Nope"), 0);
    }
}
