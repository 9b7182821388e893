//! Signed drafter bundles: Ed25519 keys, packing a component with its manifest, and the
//! checks a device runs on a bundle before any of it is compiled. Layout: docs/drafters.md.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};
use tandem_client::drafters::{
    BackboneRef, COMPONENT, ComponentRef, DraftModelRef, MANIFEST, MANIFEST_FORMAT, Manifest,
    SIGNATURE, compare_versions, valid_name, valid_version,
};

use crate::component::WORLD_VERSION;

const SECRET_TAG: &str = "tandem-drafter-secret-key:";
const PUBLIC_TAG: &str = "tandem-drafter-public-key:";
const SIGNATURE_TAG: &str = "tandem-drafter-signature:";
/// This host's version, which a manifest's `min_host_version` is compared with.
pub const HOST_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why a bundle was refused: each check has its own kind, and the message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// No signature file.
    #[error(
        "unsigned bundle: {0} has no {SIGNATURE}; bundles are signed with `tandem drafter pack --key`"
    )]
    Unsigned(PathBuf),
    /// The signature is malformed or made by no trusted key.
    #[error("bad signature: {0}")]
    Signature(String),
    /// The manifest does not parse or is incomplete.
    #[error("bad manifest: {0}")]
    Manifest(String),
    /// The component differs from what the manifest pins.
    #[error("component mismatch: {0}")]
    Component(String),
    /// Built against another version of the WIT world.
    #[error(
        "WIT version mismatch: the component implements tandem:drafter@{found}, this host speaks \
         tandem:drafter@{WORLD_VERSION}; use a bundle built for this host or update the host"
    )]
    World {
        /// The bundle's world version.
        found: String,
    },
    /// Needs a newer host.
    #[error(
        "host too old: the bundle needs tandem {needs} or newer, this is {HOST_VERSION}; update \
         the tandem binary first"
    )]
    HostTooOld {
        /// The bundle's minimum host version.
        needs: String,
    },
    /// The draft model on this device is not the one the bundle was built for.
    #[error("backbone mismatch: {0}")]
    Model(String),
}

/// Reads 32 random bytes.
fn random32() -> anyhow::Result<[u8; 32]> {
    use std::io::Read;
    let mut b = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    Ok(b)
}

/// A key's id: the first 16 hex digits of its public key's sha256.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// `tandem drafter keygen --out K`: writes the secret key `K` (0600, never overwritten)
/// and the public key `K.pub`. Returns the key id.
pub fn keygen(out: &Path) -> anyhow::Result<String> {
    let key = SigningKey::from_bytes(&random32()?);
    let public = public_path(out);
    for p in [out, public.as_path()] {
        if p.exists() {
            bail!(
                "{} exists: keygen never overwrites a key (move it away or pick another --out)",
                p.display()
            );
        }
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating {}", out.display()))?;
    writeln!(f, "{SECRET_TAG}{}", hex::encode(key.to_bytes()))?;
    fs::write(
        &public,
        format!(
            "{PUBLIC_TAG}{}\n",
            hex::encode(key.verifying_key().as_bytes())
        ),
    )
    .with_context(|| format!("writing {}", public.display()))?;
    Ok(key_id(&key.verifying_key()))
}

/// `K` → `K.pub`.
fn public_path(secret: &Path) -> PathBuf {
    let mut s = secret.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

fn hex32(text: &str, what: &str, path: &Path) -> anyhow::Result<[u8; 32]> {
    let bytes = hex::decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok());
    bytes.with_context(|| {
        format!(
            "{} is not a tandem {what} (expected one line `{}<64 hex digits>`)",
            path.display(),
            if what == "secret key" {
                SECRET_TAG
            } else {
                PUBLIC_TAG
            }
        )
    })
}

/// Reads a secret key written by [`keygen`].
pub fn read_secret(path: &Path) -> anyhow::Result<SigningKey> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let Some(h) = text.trim().strip_prefix(SECRET_TAG) else {
        bail!(
            "{} is not a tandem secret key (it should start with `{SECRET_TAG}`; make one with \
             `tandem drafter keygen`)",
            path.display()
        );
    };
    Ok(SigningKey::from_bytes(&hex32(h, "secret key", path)?))
}

/// Parses public keys: each non-empty line that is not a `#` comment is one key
/// (`tandem-drafter-public-key:HEX`, or the bare hex).
pub fn parse_public_keys(text: &str, path: &Path) -> anyhow::Result<Vec<VerifyingKey>> {
    let mut keys = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let h = line.strip_prefix(PUBLIC_TAG).unwrap_or(line);
        let bytes = hex32(h, "public key", path)?;
        keys.push(
            VerifyingKey::from_bytes(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: not an Ed25519 key: {e}", path.display()))?,
        );
    }
    Ok(keys)
}

/// Reads a public key file (one or more keys).
pub fn read_public(path: &Path) -> anyhow::Result<Vec<VerifyingKey>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let keys = parse_public_keys(&text, path)?;
    if keys.is_empty() {
        bail!("{} holds no public key", path.display());
    }
    Ok(keys)
}

/// What a manifest records of a draft model (catalog name or GGUF path; a catalog model
/// is fetched if missing).
pub fn model_claim(name: &str) -> anyhow::Result<DraftModelRef> {
    let catalog = tandem_models::catalog::lookup(name).is_ok() && !Path::new(name).exists();
    let path = if catalog {
        crate::models_cmd::fetch_with_progress(name)?
    } else {
        tandem_models::fetch::resolve(name).with_context(|| format!("draft model `{name}`"))?
    };
    let mut h = Sha256::new();
    let mut f = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::io::copy(&mut f, &mut h)?;
    let local = LocalModel::of(&path)?;
    Ok(DraftModelRef {
        catalog: catalog.then(|| name.to_string()),
        sha256: hex::encode(h.finalize()),
        tokenizer_fingerprint: local.tokenizer_fingerprint,
        backbone: local.backbone,
    })
}

/// What `tandem drafter pack` is given.
pub struct PackSpec<'a> {
    /// The component.
    pub component: &'a Path,
    /// The draft model it expects.
    pub model: &'a str,
    /// The signing key.
    pub key: &'a Path,
    /// Drafter name.
    pub name: &'a str,
    /// Drafter version.
    pub version: &'a str,
    /// Target family.
    pub family: &'a str,
    /// Oldest host that runs it.
    pub min_host_version: &'a str,
    /// Release notes.
    pub notes: &'a str,
    /// The bundle directory to create.
    pub out: &'a Path,
}

/// `tandem drafter pack`: writes `out/{manifest.json, manifest.sig, drafter.wasm}`.
pub fn pack(spec: &PackSpec) -> anyhow::Result<Manifest> {
    for (flag, v) in [
        ("--version", spec.version),
        ("--min-host-version", spec.min_host_version),
    ] {
        if !valid_version(v) {
            bail!("{flag} `{v}` is not a version: use dot-separated numbers such as 1.2.0");
        }
    }
    for (flag, v) in [("--name", spec.name), ("--family", spec.family)] {
        if !valid_name(v) {
            bail!("{flag} `{v}` is not a name: use 1-64 letters, digits, `.`, `_` or `-`");
        }
    }
    if spec.out.exists() && fs::read_dir(spec.out)?.next().is_some() {
        bail!(
            "{} exists and is not empty: a bundle is written to a new directory",
            spec.out.display()
        );
    }
    let key = read_secret(spec.key)?;
    let bytes = fs::read(spec.component)
        .with_context(|| format!("reading the component {}", spec.component.display()))?;
    let world = crate::component::world_version(&bytes)
        .with_context(|| format!("{} is not a drafter component", spec.component.display()))?;
    let model = model_claim(spec.model)?;
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: spec.name.into(),
        version: spec.version.into(),
        family: spec.family.into(),
        component: ComponentRef {
            file: COMPONENT.into(),
            sha256: hex::encode(Sha256::digest(&bytes)),
            size: bytes.len() as u64,
        },
        world,
        draft_model: model,
        min_host_version: spec.min_host_version.into(),
        notes: spec.notes.into(),
    };
    fs::create_dir_all(spec.out).with_context(|| format!("creating {}", spec.out.display()))?;
    let text = serde_json::to_vec_pretty(&manifest)?;
    fs::write(spec.out.join(COMPONENT), &bytes)?;
    fs::write(spec.out.join(MANIFEST), &text)?;
    fs::write(spec.out.join(SIGNATURE), sign(&key, &text))?;
    Ok(manifest)
}

/// The signature file's text for `manifest` bytes.
pub fn sign(key: &SigningKey, manifest: &[u8]) -> String {
    format!(
        "{SIGNATURE_TAG}{}:{}\n",
        key_id(&key.verifying_key()),
        hex::encode(key.sign(manifest).to_bytes())
    )
}

/// The local draft model a bundle's claim is checked against.
pub struct LocalModel {
    /// Its tokenizer fingerprint, hex.
    pub tokenizer_fingerprint: String,
    /// Its backbone claim.
    pub backbone: Option<BackboneRef>,
}

impl LocalModel {
    /// Reads a model file's fingerprints.
    pub fn of(path: &Path) -> anyhow::Result<LocalModel> {
        let tokenizer = tandem_models::backbone::tokenizer_fingerprint_of(path)?.to_string();
        let backbone = match tandem_models::backbone::declared_split(path)? {
            Some(k) => Some(BackboneRef {
                layers: k as u32,
                fingerprint: tandem_models::backbone::fingerprints(path, Some(k))?
                    .backbone
                    .to_string(),
            }),
            None => None,
        };
        Ok(LocalModel {
            tokenizer_fingerprint: tokenizer,
            backbone,
        })
    }
}

/// Checks a bundle directory, in this order: signed, by a trusted key, manifest complete,
/// WIT version, host version, component matches its hash, and (when `local` is given) the
/// draft model's fingerprints. Nothing is compiled. Returns the manifest.
pub fn verify(
    dir: &Path,
    trusted: &[VerifyingKey],
    local: Option<&LocalModel>,
) -> Result<Manifest, Refusal> {
    let m = verify_manifest(dir, trusted)?;
    verify_component(dir, &m)?;
    if let Some(local) = local {
        check_model(&m.draft_model, local)?;
    }
    Ok(m)
}

/// The checks that need only `manifest.json` and `manifest.sig`: the signature by a
/// trusted key, a complete manifest, the WIT version and the host version. A device runs
/// them before downloading the component.
pub fn verify_manifest(dir: &Path, trusted: &[VerifyingKey]) -> Result<Manifest, Refusal> {
    let sig_path = dir.join(SIGNATURE);
    let sig_text = match fs::read_to_string(&sig_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Refusal::Unsigned(dir.to_path_buf()));
        }
        Err(e) => return Err(Refusal::Signature(format!("{}: {e}", sig_path.display()))),
    };
    let manifest_bytes = fs::read(dir.join(MANIFEST))
        .map_err(|e| Refusal::Manifest(format!("{}: {e}", dir.join(MANIFEST).display())))?;
    check_signature(&sig_text, &manifest_bytes, trusted)?;
    let m: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| Refusal::Manifest(format!("{MANIFEST}: {e}")))?;
    if m.format != MANIFEST_FORMAT {
        return Err(Refusal::Manifest(format!(
            "format {} (this host reads format {MANIFEST_FORMAT})",
            m.format
        )));
    }
    if !valid_version(&m.version) || !valid_name(&m.name) || m.component.file != COMPONENT {
        return Err(Refusal::Manifest(format!(
            "name `{}`, version `{}`, component file `{}`: expected a name, a dotted version and \
             {COMPONENT}",
            m.name, m.version, m.component.file
        )));
    }
    if m.world != WORLD_VERSION {
        return Err(Refusal::World {
            found: m.world.clone(),
        });
    }
    if compare_versions(HOST_VERSION, &m.min_host_version).is_lt() {
        return Err(Refusal::HostTooOld {
            needs: m.min_host_version.clone(),
        });
    }
    Ok(m)
}

/// Checks the component file against the (verified) manifest's sha256 and size.
pub fn verify_component(dir: &Path, m: &Manifest) -> Result<(), Refusal> {
    let comp = dir.join(COMPONENT);
    let bytes =
        fs::read(&comp).map_err(|e| Refusal::Component(format!("{}: {e}", comp.display())))?;
    let digest = hex::encode(Sha256::digest(&bytes));
    if bytes.len() as u64 != m.component.size || digest != m.component.sha256 {
        return Err(Refusal::Component(format!(
            "{COMPONENT} has sha256 {digest} ({} bytes), the signed manifest pins {} ({} bytes): \
             the component was altered or damaged in transit",
            bytes.len(),
            m.component.sha256,
            m.component.size
        )));
    }
    Ok(())
}

fn check_signature(
    sig_text: &str,
    manifest: &[u8],
    trusted: &[VerifyingKey],
) -> Result<(), Refusal> {
    let bad = |why: &str| Refusal::Signature(why.to_string());
    let body = sig_text.trim().strip_prefix(SIGNATURE_TAG).ok_or_else(|| {
        bad(&format!(
            "{SIGNATURE} does not start with `{SIGNATURE_TAG}`"
        ))
    })?;
    let (id, sig_hex) = body
        .split_once(':')
        .ok_or_else(|| bad(&format!("{SIGNATURE} is not `{SIGNATURE_TAG}KEYID:HEX`")))?;
    let sig = hex::decode(sig_hex)
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
        .map(|b| Signature::from_bytes(&b))
        .ok_or_else(|| bad("the signature is not 64 bytes of hex"))?;
    if trusted.is_empty() {
        return Err(bad(
            "no trusted keys: give --trust-key K.pub or add keys with `tandem drafter trust K.pub`",
        ));
    }
    let Some(key) = trusted.iter().find(|k| key_id(k) == id) else {
        let ids: Vec<String> = trusted.iter().map(key_id).collect();
        return Err(bad(&format!(
            "signed by key {id}, which is not trusted here (trusted: {})",
            ids.join(", ")
        )));
    };
    key.verify(manifest, &sig).map_err(|_| {
        bad(&format!(
            "the signature by key {id} does not match {MANIFEST}: the manifest was altered after \
             signing"
        ))
    })
}

/// Compares the bundle's draft-model claim with the device's model.
pub fn check_model(want: &DraftModelRef, local: &LocalModel) -> Result<(), Refusal> {
    if want.tokenizer_fingerprint != local.tokenizer_fingerprint {
        return Err(Refusal::Model(format!(
            "the bundle's draft model has tokenizer {}, this device's has {}: the drafter was \
             built for another model family",
            short(&want.tokenizer_fingerprint),
            short(&local.tokenizer_fingerprint)
        )));
    }
    if want.backbone != local.backbone {
        let show = |b: &Option<BackboneRef>| match b {
            Some(b) => format!("{} layers, {}", b.layers, short(&b.fingerprint)),
            None => "none declared".into(),
        };
        return Err(Refusal::Model(format!(
            "the bundle's draft model has backbone {}, this device's has {}",
            show(&want.backbone),
            show(&local.backbone)
        )));
    }
    Ok(())
}

fn short(h: &str) -> &str {
    &h[..h.len().min(16)]
}
