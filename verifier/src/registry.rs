//! Loaded target models: several families, several versions each. New sessions get the
//! newest compatible version; a retired version keeps serving the sessions it has until
//! they end (they hold an `Arc` to it), so a swap never fails a session.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, bail};
use tandem_core::protocol::Hello;
use tandem_models::backbone::tokenizer_fingerprint_of;
use tandem_models::backend::TargetBackend;
use tandem_models::{BackboneFingerprint, Model, Tokenizer, TokenizerFingerprint};

/// Where a target runs: `cpu`, `gpu` (the first hardware adapter) or `gpu:NAME` (the
/// first adapter whose name contains NAME, software ones included).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Device {
    /// The CPU engine, through the batch scheduler.
    #[default]
    Cpu,
    /// A wgpu adapter; `None`: the first hardware one.
    Gpu(Option<String>),
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "cpu" => Ok(Device::Cpu),
            "gpu" => Ok(Device::Gpu(None)),
            other => match other.strip_prefix("gpu:").map(str::trim) {
                Some(name) if !name.is_empty() => Ok(Device::Gpu(Some(name.to_string()))),
                _ => Err(format!(
                    "bad device `{s}`: expected cpu, gpu or gpu:NAME (part of an adapter's \
                     name, as `tandem gpu list` prints it)"
                )),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Gpu(None) => f.write_str("gpu"),
            Device::Gpu(Some(n)) => write!(f, "gpu:{n}"),
        }
    }
}

impl Device {
    /// Opens the device and loads `path` on it; `None` for the CPU engine.
    fn open(&self, path: &std::path::Path) -> anyhow::Result<Option<Arc<dyn TargetBackend>>> {
        let choice = match self {
            Device::Cpu => return Ok(None),
            Device::Gpu(None) => tandem_gpu::GpuChoice::Auto,
            Device::Gpu(Some(n)) => tandem_gpu::GpuChoice::Named(n.clone()),
        };
        let Some(gpu) = tandem_gpu::Gpu::open(&choice)? else {
            let found: Vec<String> = tandem_gpu::list_adapters()
                .iter()
                .map(|a| format!("`{a}`"))
                .collect();
            bail!(
                "--device gpu: this machine has no hardware GPU adapter (found: {}); name a \
                 software one to use it anyway (--device gpu:llvmpipe) or use --device cpu",
                if found.is_empty() {
                    "none".to_string()
                } else {
                    found.join(", ")
                }
            );
        };
        let model = tandem_gpu::GpuModel::load(gpu, path)?;
        Ok(Some(model as Arc<dyn TargetBackend>))
    }
}

/// What to load: `[FAMILY[@VERSION]=]NAME|PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    /// Family name; defaults to the catalog name or the file stem.
    pub family: Option<String>,
    /// Version; defaults to one more than the newest numeric version of the family.
    pub version: Option<String>,
    /// Catalog name or GGUF path.
    pub model: String,
    /// Layer whose predictions are sent as hints (`None`: the server default).
    pub early_exit_layer: Option<usize>,
    /// Where it runs (`None`: the server's `--device`).
    pub device: Option<Device>,
}

/// Whether `s` can name a family or a version: 1–64 of `A-Z a-z 0-9 . _ -`, not starting
/// with a dot (names appear in URLs such as `DELETE /admin/targets/{family}/{version}`).
pub fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl std::str::FromStr for TargetSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (name, model) = match s.split_once('=') {
            Some((n, m)) => (Some(n), m),
            None => (None, s),
        };
        let (family, version) = match name {
            Some(n) => match n.split_once('@') {
                Some((f, v)) => (Some(f.to_string()), Some(v.to_string())),
                None => (Some(n.to_string()), None),
            },
            None => (None, None),
        };
        if model.is_empty()
            || family.as_deref().is_some_and(|f| !valid_name(f))
            || version.as_deref().is_some_and(|v| !valid_name(v))
        {
            bail!(
                "bad target `{s}`: expected [FAMILY[@VERSION]=]NAME|PATH, e.g. smollm2@2=smollm2-135m"
            );
        }
        Ok(TargetSpec {
            family,
            version,
            model: model.to_string(),
            early_exit_layer: None,
            device: None,
        })
    }
}

/// Why a target could not be loaded: one variant per answer an admin gets.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A target of that family and version serves already.
    #[error(
        "target {id} is already loaded; give a new version (FAMILY@VERSION=...) or retire it first"
    )]
    AlreadyLoaded {
        /// `family@version`.
        id: String,
    },
    /// As many targets as the server allows are loaded.
    #[error(
        "{max} targets are loaded, the most this verifier serves (--max-targets); retire one \
         first (DELETE /admin/targets/FAMILY/VERSION)"
    )]
    TooMany {
        /// The cap.
        max: usize,
    },
    /// The family or version is not a usable name.
    #[error(
        "bad target name `{name}`: families and versions are 1–64 of A-Z a-z 0-9 . _ - (not \
         starting with a dot)"
    )]
    BadName {
        /// The name.
        name: String,
    },
    /// The model could not be found, read or checked.
    #[error("{0:#}")]
    Model(#[from] anyhow::Error),
}

impl LoadError {
    /// The HTTP status `POST /admin/targets` answers with.
    pub fn status(&self) -> hyper::StatusCode {
        match self {
            LoadError::AlreadyLoaded { .. } | LoadError::TooMany { .. } => {
                hyper::StatusCode::CONFLICT
            }
            LoadError::BadName { .. } | LoadError::Model(_) => hyper::StatusCode::BAD_REQUEST,
        }
    }
}

/// One loaded target version.
pub struct Target {
    /// Family name.
    pub family: String,
    /// Version within the family.
    pub version: String,
    /// The model on the CPU engine: what CPU targets run, and every target's configuration.
    pub model: Model,
    /// The device a GPU target runs on (`None`: the CPU engine, through the batch
    /// scheduler).
    pub backend: Option<Arc<dyn TargetBackend>>,
    /// Its tokenizer (for the completions endpoint).
    pub tokenizer: Tokenizer,
    /// Its tokenizer fingerprint.
    pub tokenizer_fp: TokenizerFingerprint,
    /// Layer whose predictions are sent as hints (0 = none).
    pub early_exit_layer: usize,
    /// The GGUF it was loaded from.
    pub path: PathBuf,
    /// When it was loaded, Unix seconds.
    pub loaded_at: u64,
    backbones: Mutex<HashMap<usize, BackboneFingerprint>>,
    /// The scheduler that batches this target's forwards.
    pub(crate) batcher: crate::batch::Batcher,
    seq: AtomicU64,
    active: AtomicUsize,
    retired: AtomicBool,
}

impl Target {
    /// Loads a target (slow: reads the whole model). `default_exit` and `default_device` are
    /// the server's `--early-exit-layer` and `--device`.
    pub fn load(
        spec: &TargetSpec,
        family: String,
        version: String,
        default_exit: Option<usize>,
        default_device: &Device,
    ) -> anyhow::Result<Target> {
        let path = tandem_models::fetch::resolve(&spec.model)
            .with_context(|| format!("target `{}`", spec.model))?;
        let model = Model::load(&path).with_context(|| format!("loading {}", path.display()))?;
        let tokenizer = Tokenizer::from_gguf(&path)?;
        let tokenizer_fp = tokenizer_fingerprint_of(&path)?;
        let n_layer = model.config().n_layer;
        let early_exit_layer = match spec.early_exit_layer.or(default_exit) {
            Some(k) if k == 0 || k >= n_layer => bail!(
                "early-exit layer {k} is outside 1..{n_layer} for {} ({n_layer} blocks; the \
                 exit must come before the last block)",
                path.display()
            ),
            Some(k) => k,
            // No flag: the layer of an exit adapter stored in the file, if any.
            None => model.exit_adapters().map(|(k, _)| k).min().unwrap_or(0),
        };
        let device = spec.device.as_ref().unwrap_or(default_device);
        if *device != Device::Cpu
            && let Some((k, _)) = model.exit_adapters().find(|(k, _)| *k == early_exit_layer)
        {
            bail!(
                "{} carries a trained exit adapter at block {k}, which the GPU kernels do not \
                 implement: load it with --device cpu, or choose another --early-exit-layer",
                path.display()
            );
        }
        let backend = device
            .open(&path)
            .with_context(|| format!("loading {} on {device}", path.display()))?;
        Ok(Target {
            family,
            version,
            model,
            backend,
            tokenizer,
            tokenizer_fp,
            early_exit_layer,
            path,
            loaded_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            backbones: Mutex::new(HashMap::new()),
            batcher: Default::default(),
            seq: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
        })
    }

    /// Where it runs: `cpu` or `gpu: ADAPTER`.
    pub fn device(&self) -> String {
        self.backend
            .as_ref()
            .map_or_else(|| "cpu".to_string(), |b| b.device())
    }

    /// `family@version`.
    pub fn id(&self) -> String {
        format!("{}@{}", self.family, self.version)
    }

    /// The backbone fingerprint over the first `layers` blocks (computed once, then cached).
    pub fn backbone(&self, layers: usize) -> anyhow::Result<BackboneFingerprint> {
        if let Some(fp) = self.backbones.lock().unwrap().get(&layers) {
            return Ok(*fp);
        }
        let fp = tandem_models::backbone::fingerprints(&self.path, Some(layers))?.backbone;
        self.backbones.lock().unwrap().insert(layers, fp);
        Ok(fp)
    }

    /// Sessions currently using this target.
    pub fn active_sessions(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Whether it was retired (serves only its remaining sessions).
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// Marks one more session on this target; the guard unmarks it when dropped.
    pub fn enter(self: &Arc<Self>) -> TargetUse {
        self.active.fetch_add(1, Ordering::SeqCst);
        TargetUse(self.clone())
    }

    /// A JSON description for `/admin/targets`.
    pub fn describe(&self) -> serde_json::Value {
        let c = self.model.config();
        serde_json::json!({
            "family": self.family,
            "version": self.version,
            "path": self.path.display().to_string(),
            "architecture": c.arch.as_str(),
            "layers": c.n_layer,
            "context_length": c.context_length,
            "early_exit_layer": self.early_exit_layer,
            "device": self.device(),
            "tokenizer_fingerprint": self.tokenizer_fp.to_string(),
            "active_sessions": self.active_sessions(),
            "retired": self.is_retired(),
        })
    }
}

/// A session's hold on a target; releases it when dropped.
pub struct TargetUse(pub Arc<Target>);

impl Drop for TargetUse {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Every target that serves new sessions.
#[derive(Default)]
pub struct Registry {
    targets: RwLock<Vec<Arc<Target>>>,
    next_seq: AtomicU64,
}

fn short(fp: &[u8; 32]) -> String {
    fp[..6].iter().map(|b| format!("{b:02x}")).collect()
}

impl Registry {
    /// The family and version a spec would get if loaded now.
    pub fn name_for(&self, spec: &TargetSpec) -> (String, String) {
        let family = spec.family.clone().unwrap_or_else(|| {
            let p = std::path::Path::new(&spec.model);
            if tandem_models::catalog::lookup(&spec.model).is_ok() {
                spec.model.clone()
            } else {
                p.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| spec.model.clone())
            }
        });
        let version = spec.version.clone().unwrap_or_else(|| {
            let newest = self
                .targets
                .read()
                .unwrap()
                .iter()
                .filter(|t| t.family == family)
                .filter_map(|t| t.version.parse::<u64>().ok())
                .max()
                .unwrap_or(0);
            (newest + 1).to_string()
        });
        (family, version)
    }

    /// Adds a loaded target; it serves new sessions from now on. At most `max` serve at
    /// once.
    pub fn add(&self, target: Target, max: usize) -> Result<Arc<Target>, LoadError> {
        let mut all = self.targets.write().unwrap();
        if all
            .iter()
            .any(|t| t.family == target.family && t.version == target.version)
        {
            return Err(LoadError::AlreadyLoaded { id: target.id() });
        }
        if all.len() >= max {
            return Err(LoadError::TooMany { max });
        }
        target.seq.store(
            self.next_seq.fetch_add(1, Ordering::SeqCst),
            Ordering::SeqCst,
        );
        let target = Arc::new(target);
        all.push(target.clone());
        Ok(target)
    }

    /// Retires a version: no new sessions; its current sessions finish normally.
    pub fn retire(&self, family: &str, version: &str) -> Option<Arc<Target>> {
        let mut all = self.targets.write().unwrap();
        let i = all
            .iter()
            .position(|t| t.family == family && t.version == version)?;
        let t = all.remove(i);
        t.retired.store(true, Ordering::SeqCst);
        Some(t)
    }

    /// The targets serving new sessions, oldest first.
    pub fn list(&self) -> Vec<Arc<Target>> {
        self.targets.read().unwrap().clone()
    }

    /// The newest target that fits the drafter described by `hello`, or a message saying
    /// what differs on each loaded target.
    pub fn pick(&self, hello: &Hello) -> Result<Arc<Target>, String> {
        let mut all = self.list();
        all.sort_by_key(|t| std::cmp::Reverse(t.seq.load(Ordering::SeqCst)));
        if all.is_empty() {
            return Err("no target is loaded on this server".into());
        }
        let mut why = Vec::new();
        for t in &all {
            if let Some(f) = &hello.family
                && &t.family != f
                && &t.id() != f
            {
                why.push(format!("{}: another family", t.id()));
                continue;
            }
            if t.tokenizer_fp.0 != hello.tokenizer {
                why.push(format!(
                    "{}: tokenizer fingerprint {} differs",
                    t.id(),
                    short(&t.tokenizer_fp.0)
                ));
                continue;
            }
            if let Some(b) = &hello.backbone {
                let layers = b.layers as usize;
                let n = t.model.config().n_layer;
                if layers == 0 || layers > n {
                    why.push(format!(
                        "{}: has {n} blocks, drafter backbone has {layers}",
                        t.id()
                    ));
                    continue;
                }
                match t.backbone(layers) {
                    Ok(fp) if fp.0 == b.fingerprint => {}
                    Ok(fp) => {
                        why.push(format!(
                            "{}: backbone fingerprint over {layers} blocks {} differs",
                            t.id(),
                            short(&fp.0)
                        ));
                        continue;
                    }
                    Err(e) => {
                        why.push(format!(
                            "{}: cannot fingerprint its backbone: {e:#}",
                            t.id()
                        ));
                        continue;
                    }
                }
            }
            return Ok(t.clone());
        }
        let fits: Vec<String> = all
            .iter()
            .filter(|t| t.tokenizer_fp.0 == hello.tokenizer)
            .map(|t| t.id())
            .collect();
        let backbone = hello.backbone.map_or(String::from("none"), |b| {
            format!("{} over {} blocks", short(&b.fingerprint), b.layers)
        });
        Err(format!(
            "no loaded target fits this drafter (tokenizer {}, backbone {backbone}{}): {}. \
             Targets with the same tokenizer (usable without a shared backbone): {}",
            short(&hello.tokenizer),
            hello
                .family
                .as_ref()
                .map_or(String::new(), |f| format!(", family {f}")),
            why.join("; "),
            if fits.is_empty() {
                "none".into()
            } else {
                fits.join(", ")
            }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_specs_parse() {
        let s: TargetSpec = "smollm2@2=/m/a.gguf".parse().unwrap();
        assert_eq!(s.family.as_deref(), Some("smollm2"));
        assert_eq!(s.version.as_deref(), Some("2"));
        assert_eq!(s.model, "/m/a.gguf");
        let s: TargetSpec = "smollm2-135m".parse().unwrap();
        assert_eq!((s.family, s.version), (None, None));
        let s: TargetSpec = "fam=x".parse().unwrap();
        assert_eq!((s.family.as_deref(), s.version), (Some("fam"), None));
        for bad in ["", "=x", "f@=x", "@1=x", "f="] {
            assert!(bad.parse::<TargetSpec>().is_err(), "{bad}");
        }
    }
}
