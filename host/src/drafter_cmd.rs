//! `tandem drafter`: publishing signed drafter bundles (keygen, pack, verify, index) and the
//! device's store of installed bundles (update from a channel, list, use, rollback).
//!
//! The store (`$TANDEM_DRAFTERS`, default `~/.cache/tandem/drafters`) holds each installed
//! bundle as `NAME@VERSION/` and `state.json` naming the current and previous ones. An
//! update downloads into a `.partial-*` directory, verifies it, fetches its draft model if
//! missing, compiles the component into the compiled cache, and only then renames it into
//! place and rewrites `state.json` (write and rename): a crash at any point leaves the
//! current drafter as it was.

use std::fs;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use ed25519_dalek::VerifyingKey;
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tandem_client::drafters::{COMPONENT, Index, MANIFEST, Manifest, SIGNATURE, compare_versions};

use crate::bundle::{self, LocalModel, PackSpec};

/// `tandem drafter` subcommands.
#[derive(Subcommand, Debug)]
pub enum DrafterCommand {
    /// Make an Ed25519 signing key: writes the secret key OUT (mode 0600) and OUT.pub.
    Keygen {
        /// Secret key file to create.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a drafter component into a bundle directory (manifest, signature, component).
    Pack {
        /// The drafter component (.wasm).
        #[arg(long)]
        component: PathBuf,
        /// The draft model it expects: a catalog name (devices fetch it when missing) or a
        /// GGUF file.
        #[arg(long)]
        model: String,
        /// Secret key from `tandem drafter keygen`.
        #[arg(long)]
        key: PathBuf,
        /// Drafter version: dot-separated numbers.
        #[arg(long)]
        version: String,
        /// The target family it drafts for (as the verifier names its targets).
        #[arg(long)]
        family: String,
        /// Drafter name.
        #[arg(long, default_value = "tandem-drafter")]
        name: String,
        /// Oldest host version that can run it.
        #[arg(long, default_value = bundle::HOST_VERSION)]
        min_host_version: String,
        /// Release notes.
        #[arg(long, default_value = "")]
        notes: String,
        /// Bundle directory to create (a subdirectory of a channel directory).
        #[arg(long)]
        out: PathBuf,
    },
    /// Check a bundle: signature, component hash, WIT and host versions (and the draft
    /// model's fingerprints with --draft-model). Exit status 0 only for a valid bundle.
    Verify {
        /// The bundle directory.
        dir: PathBuf,
        /// Public key(s) to trust.
        #[arg(long, required = true)]
        pubkey: Vec<PathBuf>,
        /// Also check the bundle fits this draft model (catalog name or GGUF file).
        #[arg(long)]
        draft_model: Option<String>,
    },
    /// Write CHANNEL/index.json, so that a static HTTP server can serve the channel.
    Index {
        /// Channel directory (of bundle directories).
        channel: PathBuf,
    },
    /// Add public key(s) to this device's trusted keys (`$TANDEM_TRUSTED_KEYS`, default
    /// ~/.config/tandem/trusted-drafter-keys).
    Trust {
        /// Public key file (`tandem drafter keygen` writes K.pub).
        pubkey: PathBuf,
    },
    /// Fetch the channel's recommended bundle for a family, verify it, fetch its draft model
    /// if missing, compile it, and make it current (the previous one is kept for rollback).
    Update(UpdateArgs),
    /// Installed bundles (current and previous marked), and with --channel what it offers.
    List {
        /// Also list this channel's bundles.
        #[arg(long)]
        channel: Option<String>,
        /// The drafter store.
        #[arg(long)]
        store: Option<PathBuf>,
    },
    /// Make an installed version current (and pin it: automatic updates leave it).
    Use {
        /// The version (or NAME@VERSION).
        version: String,
        /// The drafter store.
        #[arg(long)]
        store: Option<PathBuf>,
    },
    /// Return to the previous drafter (and pin it).
    Rollback {
        /// The drafter store.
        #[arg(long)]
        store: Option<PathBuf>,
    },
}

/// Options of an update (`tandem drafter update`, and the checks of `tandem serve`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct UpdateArgs {
    /// The channel: a verifier (`http://HOST:PORT`, its `/v1/drafters`) or the URL of a
    /// directory on a static HTTP server holding index.json.
    #[arg(long)]
    pub channel: String,
    /// Target family to follow; default: the current drafter's, or the channel's only one.
    #[arg(long)]
    pub family: Option<String>,
    /// The device's draft model, checked against bundles that name no catalog model.
    #[arg(long)]
    pub draft_model: Option<String>,
    /// Public key file to trust besides the trusted-keys file (repeatable).
    #[arg(long)]
    pub trust_key: Vec<PathBuf>,
    /// Bearer token for the channel (a verifier started with --token-file).
    #[arg(long)]
    pub token: Option<String>,
    /// The drafter store.
    #[arg(long)]
    pub store: Option<PathBuf>,
}

/// Runs a `tandem drafter` subcommand.
pub fn run(cmd: DrafterCommand) -> anyhow::Result<()> {
    match cmd {
        DrafterCommand::Keygen { out } => {
            let id = bundle::keygen(&out)?;
            println!(
                "key {id}: secret {} (keep it private), public {}.pub (give it to devices: \
                 `tandem drafter trust {}.pub`)",
                out.display(),
                out.display(),
                out.display()
            );
        }
        DrafterCommand::Pack {
            component,
            model,
            key,
            version,
            family,
            name,
            min_host_version,
            notes,
            out,
        } => {
            let m = bundle::pack(&PackSpec {
                component: &component,
                model: &model,
                key: &key,
                name: &name,
                version: &version,
                family: &family,
                min_host_version: &min_host_version,
                notes: &notes,
                out: &out,
            })?;
            println!(
                "{} for {} (tandem:drafter@{}, {} bytes, sha256 {}) -> {}",
                m.id(),
                m.family,
                m.world,
                m.component.size,
                m.component.sha256,
                out.display()
            );
        }
        DrafterCommand::Verify {
            dir,
            pubkey,
            draft_model,
        } => {
            let mut keys = Vec::new();
            for p in &pubkey {
                keys.extend(bundle::read_public(p)?);
            }
            let local = match &draft_model {
                Some(name) => Some(LocalModel::of(
                    &tandem_models::fetch::resolve(name)
                        .with_context(|| format!("draft model `{name}`"))?,
                )?),
                None => None,
            };
            let m = bundle::verify(&dir, &keys, local.as_ref())
                .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
            println!(
                "{}: valid bundle {} for {}",
                dir.display(),
                m.id(),
                m.family
            );
        }
        DrafterCommand::Index { channel } => {
            let (index, skipped) = tandem_client::drafters::scan(&channel)
                .with_context(|| format!("reading {}", channel.display()))?;
            for s in skipped {
                eprintln!("tandem: skipping {s}");
            }
            let path = channel.join(tandem_client::drafters::INDEX);
            write_atomic(&path, &serde_json::to_vec_pretty(&index)?)?;
            for f in &index.families {
                println!(
                    "{}: {} bundle(s), recommended {}",
                    f.family,
                    f.bundles.len(),
                    f.recommended
                );
            }
        }
        DrafterCommand::Trust { pubkey } => {
            let keys = bundle::read_public(&pubkey)?;
            let path = trusted_keys_path();
            let mut have = read_trusted(&[])?;
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir)?;
            }
            let mut f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            for k in keys {
                if have.contains(&k) {
                    println!("key {} is already trusted", bundle::key_id(&k));
                    continue;
                }
                writeln!(f, "tandem-drafter-public-key:{}", hex::encode(k.as_bytes()))?;
                println!("trusting key {} ({})", bundle::key_id(&k), path.display());
                have.push(k);
            }
        }
        DrafterCommand::Update(args) => {
            let store = Store::open(args.store.as_deref())?;
            match update(&store, &args, true)? {
                Updated::Installed(m) => println!("now using {} ({})", m.id(), m.family),
                Updated::Current(m) => println!("{} is current: nothing to do", m.id()),
                Updated::Pinned { current, offered } => {
                    println!("{current} is pinned; {offered} not installed")
                }
            }
        }
        DrafterCommand::List { channel, store } => {
            let store = Store::open(store.as_deref())?;
            let state = store.state();
            let installed = store.installed();
            if installed.is_empty() {
                println!("no drafter installed in {}", store.dir.display());
            }
            for (id, m) in installed {
                let mark = if state.current.as_deref() == Some(&id) {
                    if state.pinned {
                        "current, pinned"
                    } else {
                        "current"
                    }
                } else if state.previous.as_deref() == Some(&id) {
                    "previous"
                } else {
                    ""
                };
                println!("{id:<32} {:<20} {:<16} {}", m.family, mark, m.notes);
            }
            if let Some(url) = channel {
                let ch = Channel::parse(&url, None)?;
                let index = ch.index()?;
                for f in &index.families {
                    for b in &f.bundles {
                        let rec = if b.version == f.recommended {
                            "recommended"
                        } else {
                            ""
                        };
                        println!("{url}: {}@{} {:<20} {rec}", b.name, b.version, f.family);
                    }
                }
            }
        }
        DrafterCommand::Use { version, store } => {
            let store = Store::open(store.as_deref())?;
            let id = store.switch_to(&version)?;
            println!("now using {id} (pinned: automatic updates leave it)");
        }
        DrafterCommand::Rollback { store } => {
            let store = Store::open(store.as_deref())?;
            let state = store.state();
            let Some(prev) = state.previous.clone() else {
                bail!(
                    "no previous drafter to roll back to (`tandem drafter list` shows what is installed)"
                );
            };
            let id = store.switch_to(&prev)?;
            println!("rolled back to {id} (pinned: automatic updates leave it)");
        }
    }
    Ok(())
}

/// Where this device's trusted public keys are listed: `$TANDEM_TRUSTED_KEYS`, else
/// `$XDG_CONFIG_HOME/tandem/trusted-drafter-keys`, else `~/.config/tandem/...`.
pub fn trusted_keys_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TANDEM_TRUSTED_KEYS") {
        return PathBuf::from(p);
    }
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from(".config"));
    config.join("tandem").join("trusted-drafter-keys")
}

/// The trusted keys: the trusted-keys file (if any) and `extra` key files.
pub fn read_trusted(extra: &[PathBuf]) -> anyhow::Result<Vec<VerifyingKey>> {
    let path = trusted_keys_path();
    let mut keys = match fs::read_to_string(&path) {
        Ok(t) => bundle::parse_public_keys(&t, &path)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    for p in extra {
        keys.extend(bundle::read_public(p)?);
    }
    Ok(keys)
}

/// Which installed bundle is current.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoreState {
    /// `NAME@VERSION` in use.
    pub current: Option<String>,
    /// The one before it (rollback target).
    pub previous: Option<String>,
    /// Chosen by hand (`use`, `rollback`): automatic updates do not replace it.
    #[serde(default)]
    pub pinned: bool,
}

/// The device's installed bundles.
pub struct Store {
    dir: PathBuf,
}

/// An installed bundle.
#[derive(Debug, Clone)]
pub struct Installed {
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl Installed {
    /// The component file.
    pub fn component(&self) -> PathBuf {
        self.dir.join(COMPONENT)
    }
}

const STATE: &str = "state.json";

impl Store {
    /// Opens (creating it 0700) the store: `dir`, else `$TANDEM_DRAFTERS`, else
    /// `~/.cache/tandem/drafters`.
    pub fn open(dir: Option<&Path>) -> anyhow::Result<Store> {
        let dir = dir.map_or_else(Store::default_dir, Path::to_path_buf);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating the drafter store {}", dir.display()))?;
        Ok(Store { dir })
    }

    /// `$TANDEM_DRAFTERS`, else `~/.cache/tandem/drafters`.
    pub fn default_dir() -> PathBuf {
        match std::env::var_os("TANDEM_DRAFTERS") {
            Some(d) => PathBuf::from(d),
            None => tandem_models::fetch::cache_root().join("drafters"),
        }
    }

    /// The current and previous bundles.
    pub fn state(&self) -> StoreState {
        fs::read(self.dir.join(STATE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn set_state(&self, s: &StoreState) -> anyhow::Result<()> {
        write_atomic(&self.dir.join(STATE), &serde_json::to_vec_pretty(s)?)
    }

    /// Installed bundles by id, oldest version first.
    pub fn installed(&self) -> Vec<(String, Manifest)> {
        let mut out: Vec<(String, Manifest)> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                if name.starts_with('.') {
                    return None;
                }
                let m: Manifest =
                    serde_json::from_slice(&fs::read(e.path().join(MANIFEST)).ok()?).ok()?;
                Some((name, m))
            })
            .collect();
        out.sort_by(|a, b| {
            a.1.name
                .cmp(&b.1.name)
                .then(compare_versions(&a.1.version, &b.1.version))
        });
        out
    }

    /// The bundle in use, checked against its manifest's hash (the store is this user's
    /// own directory; this catches a damaged file).
    pub fn current(&self) -> anyhow::Result<Option<Installed>> {
        let Some(id) = self.state().current else {
            return Ok(None);
        };
        let dir = self.dir.join(&id);
        let manifest: Manifest =
            serde_json::from_slice(&fs::read(dir.join(MANIFEST)).with_context(|| {
                format!(
                    "the current drafter {id} is missing from {}",
                    self.dir.display()
                )
            })?)?;
        bundle::verify_component(&dir, &manifest).with_context(|| {
            format!(
                "the installed drafter {id} is damaged: `tandem drafter rollback` or run an update"
            )
        })?;
        Ok(Some(Installed { dir, manifest }))
    }

    /// Makes an installed version current (pinned).
    pub fn switch_to(&self, version: &str) -> anyhow::Result<String> {
        let installed = self.installed();
        let found: Vec<&String> = installed
            .iter()
            .filter(|(id, m)| id == version || m.version == version)
            .map(|(id, _)| id)
            .collect();
        let id = match found.as_slice() {
            [one] => (*one).clone(),
            [] => bail!(
                "{version} is not installed (installed: {}); `tandem drafter update` installs \
                 from a channel",
                installed
                    .iter()
                    .map(|(i, _)| i.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => bail!("{version} matches several installed drafters: name it as NAME@VERSION"),
        };
        let old = self.state();
        let previous = match &old.current {
            Some(c) if *c != id => Some(c.clone()),
            _ => old.previous.clone(),
        };
        self.set_state(&StoreState {
            current: Some(id.clone()),
            previous,
            pinned: true,
        })?;
        Ok(id)
    }

    /// Removes partial downloads left by processes that are gone.
    fn sweep_partials(&self) {
        for e in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(rest) = name.strip_prefix(".partial-") {
                let pid = rest.split('-').next().unwrap_or("");
                if !Path::new("/proc").join(pid).exists() {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

/// Writes `bytes` to a fresh file beside `path` and renames it into place.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// What an update did.
pub enum Updated {
    /// A new bundle was installed and made current.
    Installed(Manifest),
    /// The recommended bundle is already current.
    Current(Manifest),
    /// A hand-picked drafter is current; the offered one was left alone.
    Pinned {
        /// The current id.
        current: String,
        /// The channel's recommended id.
        offered: String,
    },
}

/// Checks the channel and installs its recommended bundle when it is not the current one.
/// `explicit` (the `update` command) replaces a pinned drafter too.
pub fn update(store: &Store, args: &UpdateArgs, explicit: bool) -> anyhow::Result<Updated> {
    let channel = Channel::parse(&args.channel, args.token.clone())?;
    let index = channel.index()?;
    let state = store.state();
    let current = store.current().ok().flatten();
    let family = match (&args.family, &current) {
        (Some(f), _) => f.clone(),
        (None, Some(c)) => c.manifest.family.clone(),
        (None, None) => match index.families.as_slice() {
            [one] => one.family.clone(),
            [] => bail!("the channel {} offers no drafters", args.channel),
            many => bail!(
                "the channel offers drafters for several families ({}): pick one with --family",
                many.iter()
                    .map(|f| f.family.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    };
    let Some(listed) = index.recommended(&family) else {
        bail!(
            "the channel {} has no drafter for family {family}",
            args.channel
        );
    };
    if !tandem_client::drafters::valid_name(&listed.name)
        || !tandem_client::drafters::valid_version(&listed.version)
    {
        bail!(
            "the channel {} lists a drafter `{}@{}`, which is not a valid name and version",
            args.channel,
            listed.name,
            listed.version
        );
    }
    let id = format!("{}@{}", listed.name, listed.version);
    if let Some(c) = &current
        && c.manifest.id() == id
    {
        return Ok(Updated::Current(c.manifest.clone()));
    }
    if state.pinned && !explicit {
        return Ok(Updated::Pinned {
            current: state.current.unwrap_or_default(),
            offered: id,
        });
    }
    let trusted = read_trusted(&args.trust_key)?;
    let dest = store.dir.join(&id);
    if !dest.join(MANIFEST).exists() {
        store.sweep_partials();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let partial = store
            .dir
            .join(format!(".partial-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&partial)?;
        let result =
            download_and_check(&channel, &listed.path, &partial, &trusted, args).and_then(|m| {
                if m.id() == id {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!(
                        "the channel lists {id} at {}, but its signed manifest is {}",
                        listed.path,
                        m.id()
                    ))
                }
            });
        match result {
            Ok(()) => {
                if dest.exists() {
                    fs::remove_dir_all(&dest)?;
                }
                fs::rename(&partial, &dest)
                    .with_context(|| format!("installing {}", dest.display()))?;
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&partial);
                return Err(e.context(format!(
                    "refusing {id} from {}; the current drafter ({}) stays",
                    args.channel,
                    state.current.as_deref().unwrap_or("none")
                )));
            }
        }
    }
    let manifest: Manifest = serde_json::from_slice(&fs::read(dest.join(MANIFEST))?)?;
    store.set_state(&StoreState {
        current: Some(id.clone()),
        previous: state.current.filter(|c| *c != id).or(state.previous),
        pinned: false,
    })?;
    Ok(Updated::Installed(manifest))
}

/// Downloads a bundle into `dir`, verifies it, fetches its draft model if needed, and
/// compiles it (into the compiled cache). Nothing is compiled before every check passed.
/// Returns the verified manifest.
fn download_and_check(
    channel: &Channel,
    rel: &str,
    dir: &Path,
    trusted: &[VerifyingKey],
    args: &UpdateArgs,
) -> anyhow::Result<Manifest> {
    if !tandem_client::drafters::safe_bundle_path(&format!("{rel}/{MANIFEST}")) {
        bail!("the channel lists a bundle at `{rel}`, which is not a plain directory name");
    }
    for (file, limit) in [(MANIFEST, 1 << 20), (SIGNATURE, 1 << 16)] {
        match channel.get(&format!("{rel}/{file}"), limit, None) {
            Ok(bytes) => fs::write(dir.join(file), bytes)?,
            // An unsigned bundle is reported as such by the checks below.
            Err(e) if file == SIGNATURE && e.to_string().contains("HTTP 404") => {}
            Err(e) => return Err(e),
        }
    }
    // Signature, manifest, WIT and host versions first: nothing unsigned is downloaded
    // further, and the component may be at most the signed size.
    let m = bundle::verify_manifest(dir, trusted).map_err(anyhow::Error::new)?;
    let bytes = match channel.get(
        &format!("{rel}/{COMPONENT}"),
        m.component.size as usize,
        Some("component"),
    ) {
        Err(e) if e.is::<TooLarge>() => {
            return Err(bundle::Refusal::Component(format!(
                "the channel's {COMPONENT} is larger than the {} bytes the signed manifest pins: \
                 the component was altered or damaged in transit",
                m.component.size
            ))
            .into());
        }
        other => other?,
    };
    fs::write(dir.join(COMPONENT), bytes)?;
    bundle::verify_component(dir, &m).map_err(anyhow::Error::new)?;
    let model_path = match (&m.draft_model.catalog, &args.draft_model) {
        (Some(name), _) => crate::models_cmd::fetch_with_progress(name)?,
        (None, Some(name)) => {
            tandem_models::fetch::resolve(name).with_context(|| format!("draft model `{name}`"))?
        }
        (None, None) => bail!(
            "the bundle names no catalog draft model: give the device's model with --draft-model \
             so its fingerprints can be checked"
        ),
    };
    let local = LocalModel::of(&model_path)?;
    bundle::check_model(&m.draft_model, &local).map_err(anyhow::Error::new)?;
    let t = std::time::Instant::now();
    let runtime = crate::component::Runtime::load(&dir.join(COMPONENT))?;
    if !runtime.from_cache {
        eprintln!(
            "tandem: compiled {} in {:.1} s",
            m.id(),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(m)
}

/// A body longer than the caller allowed.
#[derive(Debug, thiserror::Error)]
#[error("GET {url}: the body is larger than {limit} bytes; refused")]
pub struct TooLarge {
    url: String,
    limit: usize,
}

/// A drafter channel: `http://HOST:PORT[/PATH]`.
pub struct Channel {
    host: String,
    base: String,
    token: Option<String>,
}

impl Channel {
    /// Parses a channel URL: a verifier (`http://HOST:PORT`, served at `/v1/drafters/`) or
    /// a directory URL on a static server.
    pub fn parse(url: &str, token: Option<String>) -> anyhow::Result<Channel> {
        let Some(rest) = url.strip_prefix("http://") else {
            bail!(
                "drafter channel `{url}`: only http:// URLs are supported (bundles are signed, so \
                 the transport need not be trusted); https is not built in yet"
            );
        };
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if host.is_empty() {
            bail!("drafter channel `{url}` names no host");
        }
        let base = match path.trim_end_matches('/') {
            "" => "/v1/drafters".to_string(),
            p => p.to_string(),
        };
        Ok(Channel {
            host: host.to_string(),
            base,
            token,
        })
    }

    /// The channel's listing.
    pub fn index(&self) -> anyhow::Result<Index> {
        let bytes = self.get(tandem_client::drafters::INDEX, 4 << 20, None)?;
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "the channel's {}/index.json is not a drafter listing",
                self.base
            )
        })
    }

    /// `GET base/rel`, at most `limit` bytes, with a progress bar when `progress` names it.
    pub fn get(&self, rel: &str, limit: usize, progress: Option<&str>) -> anyhow::Result<Vec<u8>> {
        let path = format!("{}/{rel}", self.base);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(600),
                self.get_async(&path, limit, progress),
            )
            .await
        })
        .map_err(|_| anyhow::anyhow!("GET http://{}{path}: no answer within 600 s", self.host))?
    }

    async fn get_async(
        &self,
        path: &str,
        limit: usize,
        progress: Option<&str>,
    ) -> anyhow::Result<Vec<u8>> {
        let url = format!("http://{}{path}", self.host);
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(&self.host),
        )
        .await
        .map_err(|_| anyhow::anyhow!("GET {url}: no connection within 10 s"))?
        .with_context(|| format!("GET {url}: cannot connect"))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .with_context(|| format!("GET {url}"))?;
        tokio::spawn(conn);
        let mut req = hyper::Request::get(path).header("host", &self.host);
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = send
            .send_request(req.body(http_body_util::Empty::<bytes::Bytes>::new())?)
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = resp.status();
        let total = resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let mut body = resp.into_body();
        let bar = progress.map(|what| {
            let bar = indicatif::ProgressBar::new(total.unwrap_or(0));
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .expect("valid template"),
            );
            bar.set_message(format!("downloading the {what}"));
            bar
        });
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.with_context(|| format!("GET {url}: reading the body"))?;
            if let Some(d) = frame.data_ref() {
                if out.len() + d.len() > limit {
                    return Err(TooLarge { url, limit }.into());
                }
                out.extend_from_slice(d);
                if let Some(b) = &bar {
                    b.set_position(out.len() as u64);
                }
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        if !status.is_success() {
            bail!(
                "GET {url}: HTTP {}: {}",
                status.as_u16(),
                String::from_utf8_lossy(&out[..out.len().min(300)]).trim()
            );
        }
        Ok(out)
    }
}
