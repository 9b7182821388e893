//! Drafter bundles and channels: the manifest a signed bundle carries and the channel
//! listing (`GET /v1/drafters`, or `index.json` on a static server) that both the verifier
//! and the device read. Signing and verifying live in the host (`tandem drafter`); this is
//! the part both sides share. Layout and rules: docs/drafters.md.

use std::cmp::Ordering;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The manifest's file name inside a bundle directory.
pub const MANIFEST: &str = "manifest.json";
/// The signature of the manifest's bytes.
pub const SIGNATURE: &str = "manifest.sig";
/// The component's file name inside a bundle directory.
pub const COMPONENT: &str = "drafter.wasm";
/// The channel listing a static server serves beside the bundle directories.
pub const INDEX: &str = "index.json";
/// The version of this manifest layout.
pub const MANIFEST_FORMAT: u32 = 1;

/// What a signed bundle says about its component.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout version ([`MANIFEST_FORMAT`]).
    pub format: u32,
    /// The drafter's name.
    pub name: String,
    /// Its version: dot-separated numbers (`1.4.0`).
    pub version: String,
    /// The target family it drafts for (the verifier's `--target FAMILY@...`).
    pub family: String,
    /// The component file.
    pub component: ComponentRef,
    /// The WIT package version of `tandem:drafter` the component implements.
    pub world: String,
    /// The draft model it expects.
    pub draft_model: DraftModelRef,
    /// The oldest host (`tandem --version`) that can run it.
    pub min_host_version: String,
    /// Release notes.
    #[serde(default)]
    pub notes: String,
}

/// A component file pinned by hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentRef {
    /// File name inside the bundle.
    pub file: String,
    /// sha256 of the file, hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// The draft model a bundle expects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DraftModelRef {
    /// Catalog name (`tandem models list`), if it is a catalog model: a device that lacks it
    /// fetches it.
    #[serde(default)]
    pub catalog: Option<String>,
    /// sha256 of the GGUF file, hex.
    pub sha256: String,
    /// Tokenizer fingerprint, hex.
    pub tokenizer_fingerprint: String,
    /// Shared-backbone claim, when the model declares a split.
    #[serde(default)]
    pub backbone: Option<BackboneRef>,
}

/// A backbone claim: the layers shared with the target and their fingerprint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackboneRef {
    /// Backbone layers.
    pub layers: u32,
    /// Backbone fingerprint, hex.
    pub fingerprint: String,
}

impl Manifest {
    /// `name@version`.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// One bundle in a channel listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Listed {
    /// Drafter name.
    pub name: String,
    /// Drafter version.
    pub version: String,
    /// The bundle's directory relative to the channel root.
    pub path: String,
    /// The component's sha256 (as its manifest says).
    pub sha256: String,
    /// The component's size.
    pub size: u64,
    /// Release notes.
    #[serde(default)]
    pub notes: String,
}

/// The bundles of one target family, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FamilyListing {
    /// Target family.
    pub family: String,
    /// The version recommended for it (the newest).
    pub recommended: String,
    /// Its bundles, newest first.
    pub bundles: Vec<Listed>,
}

/// A channel listing: `GET /v1/drafters` on a verifier, `index.json` on a static server.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Index {
    /// Target families, by name.
    pub families: Vec<FamilyListing>,
}

impl Index {
    /// The recommended bundle for `family`.
    pub fn recommended(&self, family: &str) -> Option<&Listed> {
        let f = self.families.iter().find(|f| f.family == family)?;
        f.bundles.iter().find(|b| b.version == f.recommended)
    }
}

/// Compares dot-separated versions number by number (`1.10` > `1.9`; a missing part is 0);
/// parts that are not numbers compare as text.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (pa, pb): (Vec<&str>, Vec<&str>) = (a.split('.').collect(), b.split('.').collect());
    for i in 0..pa.len().max(pb.len()) {
        let (x, y) = (pa.get(i).unwrap_or(&"0"), pb.get(i).unwrap_or(&"0"));
        let o = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => x.cmp(y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

/// Whether `v` is a version this module orders: dot-separated, non-empty parts of
/// letters, digits, `-` or `_` (it becomes part of a directory name on devices).
pub fn valid_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && v.split('.').all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

/// Whether `n` can name a drafter or a family: 1–64 of `A-Z a-z 0-9 . _ -`, not starting
/// with a dot (a drafter's `NAME@VERSION` is a directory name on devices).
pub fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && !n.starts_with('.')
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Lists the bundle directories directly under `dir` (each with a readable manifest;
/// others are skipped with their reason returned), grouped by family, newest first.
/// Signatures are not checked here: devices check them against their own trusted keys.
pub fn scan(dir: &Path) -> std::io::Result<(Index, Vec<String>)> {
    let mut skipped = Vec::new();
    let mut found: Vec<(String, Listed)> = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if name.starts_with('.') || !e.file_type()?.is_dir() {
            continue;
        }
        let m = match std::fs::read(e.path().join(MANIFEST)) {
            Ok(bytes) => match serde_json::from_slice::<Manifest>(&bytes) {
                Ok(m) if valid_version(&m.version) => m,
                Ok(m) => {
                    skipped.push(format!("{name}: version `{}` is not valid", m.version));
                    continue;
                }
                Err(err) => {
                    skipped.push(format!("{name}/{MANIFEST}: {err}"));
                    continue;
                }
            },
            Err(err) => {
                skipped.push(format!("{name}/{MANIFEST}: {err}"));
                continue;
            }
        };
        found.push((
            m.family.clone(),
            Listed {
                name: m.name,
                version: m.version,
                path: name,
                sha256: m.component.sha256,
                size: m.component.size,
                notes: m.notes,
            },
        ));
    }
    let mut index = Index::default();
    for (family, listed) in found {
        match index.families.iter_mut().find(|f| f.family == family) {
            Some(f) => f.bundles.push(listed),
            None => index.families.push(FamilyListing {
                family,
                recommended: String::new(),
                bundles: vec![listed],
            }),
        }
    }
    index.families.sort_by(|a, b| a.family.cmp(&b.family));
    for f in &mut index.families {
        f.bundles
            .sort_by(|a, b| compare_versions(&b.version, &a.version));
        f.recommended = f.bundles[0].version.clone();
    }
    Ok((index, skipped))
}

/// Whether `rel` is a safe path of a file inside a bundle directory of a channel:
/// `BUNDLE/FILE` with plain names (no `..`, no hidden files, no deeper paths).
pub fn safe_bundle_path(rel: &str) -> bool {
    let parts: Vec<&str> = rel.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
        })
        && [MANIFEST, SIGNATURE, COMPONENT].contains(&parts[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_by_number() {
        assert_eq!(compare_versions("1.10.0", "1.9.3"), Ordering::Greater);
        assert_eq!(compare_versions("2", "2.0.0"), Ordering::Equal);
        assert_eq!(compare_versions("0.1.0", "0.1.1"), Ordering::Less);
        assert!(valid_version("1.2.3-rc1"));
        assert!(!valid_version("1..2") && !valid_version("../x") && !valid_version(""));
        assert!(valid_name("tandem-drafter") && !valid_name("../x") && !valid_name("a/b"));
    }

    #[test]
    fn only_plain_bundle_files_are_served() {
        assert!(safe_bundle_path("coder-2.0.0/drafter.wasm"));
        assert!(!safe_bundle_path("../etc/passwd"));
        assert!(!safe_bundle_path("coder/../../x/manifest.json"));
        assert!(!safe_bundle_path(".hidden/manifest.json"));
        assert!(!safe_bundle_path("coder/key"));
    }
}
