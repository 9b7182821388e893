//! Training text: which files, and which of them are held out.
//!
//! The default corpus for the code models is the Python standard library that ships with the
//! machine's `python3`. Files are split into train and held-out by a fixed rule on their path
//! relative to the root they were found under: held out when the first byte of the path's
//! sha256 is divisible by 10 (about one file in ten). The rule depends on nothing but the
//! path, so every run and every machine with the same library splits it the same way.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// Extensions read when a directory is given (a file named explicitly is always read).
const TEXT_EXTENSIONS: &[&str] = &[
    "py", "pyi", "txt", "md", "rst", "rs", "c", "h", "cc", "cpp", "hpp", "js", "ts", "go", "java",
    "toml", "sh",
];

/// Directory names never entered: installed third-party packages (HumanEval's own package
/// may live there) and caches.
const SKIPPED_DIRS: &[&str] = &[
    "site-packages",
    "dist-packages",
    "__pycache__",
    "node_modules",
];

/// One corpus file and the name the split rule hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorpusFile {
    /// Where the file is.
    pub path: PathBuf,
    /// Its path relative to the root it was found under (the file name for a file given
    /// directly).
    pub key: String,
    /// sha256 of `key` (or of the file's bytes, [`Split::Content`]): decides the split and
    /// the order files are read in.
    pub hash: [u8; 32],
}

/// The files of a corpus, split.
#[derive(Debug, Clone, Default)]
pub struct Corpus {
    /// Training files, in hash order.
    pub train: Vec<CorpusFile>,
    /// Held-out files, in hash order.
    pub heldout: Vec<CorpusFile>,
}

/// The default corpus root: the standard library of the machine's `python3`.
pub fn python_stdlib() -> Result<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['stdlib'])",
        ])
        .output()
        .context(
            "running python3 to find its standard library (the default corpus); \
             install python3 or pass --corpus PATH",
        )?;
    if !out.status.success() {
        bail!(
            "python3 could not name its standard library ({}); pass --corpus PATH",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !dir.is_dir() {
        bail!(
            "python3 names {} as its standard library but it is not a directory; pass --corpus PATH",
            dir.display()
        );
    }
    Ok(dir)
}

/// Whether a path must never be trained on (HumanEval, in any packaging).
fn is_benchmark_data(path: &Path) -> bool {
    let s = path.to_string_lossy().to_ascii_lowercase();
    s.contains("human_eval") || s.contains("human-eval") || s.contains("humaneval")
}

/// The default corpus of `tandem train target` (the "new domain"): the Rust sources in the
/// cargo registry's source cache (`$CARGO_HOME/registry/src`, `~/.cargo` by default).
pub fn rust_sources() -> Result<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set; pass --corpus PATH")?;
    let dir = home.join("registry").join("src");
    if !dir.is_dir() {
        bail!(
            "no cargo registry source cache at {} (the default corpus of Rust sources); \
             build any Rust project once, or pass --corpus PATH",
            dir.display()
        );
    }
    Ok(dir)
}

/// How files are split into train and held-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// By the sha256 of the path relative to its root.
    Path,
    /// By the sha256 of the file's bytes; files with the same bytes are kept once (the
    /// same source in two versions of a crate is never on both sides).
    Content,
}

/// Finds the files under `roots` (files or directories) and splits them by path.
pub fn collect(roots: &[PathBuf]) -> Result<Corpus> {
    collect_with(roots, Split::Path, None)
}

/// The head trainers' corpus: `given`, or the Python standard library when empty, split by
/// path; says on the console which and how many files.
pub fn for_heads(given: &[PathBuf]) -> Result<Corpus> {
    let roots = if given.is_empty() {
        let lib = python_stdlib()?;
        eprintln!("corpus: the Python standard library at {}", lib.display());
        vec![lib]
    } else {
        given.to_vec()
    };
    let corpus = collect(&roots)?;
    eprintln!(
        "corpus: {} training and {} held-out files (held out: sha256 of the path, first byte \
         divisible by 10)",
        corpus.train.len(),
        corpus.heldout.len()
    );
    Ok(corpus)
}

/// Finds the files under `roots` and splits them as `split` says; with `only`, only files
/// with those extensions are kept (for the default corpora, which are directories).
pub fn collect_with(roots: &[PathBuf], split: Split, only: Option<&[&str]>) -> Result<Corpus> {
    let mut files = Vec::new();
    for root in roots {
        let meta = std::fs::metadata(root)
            .with_context(|| format!("corpus path {} cannot be read", root.display()))?;
        if is_benchmark_data(root) {
            bail!(
                "corpus path {} looks like HumanEval data, which is the evaluation set: \
                 never train on it",
                root.display()
            );
        }
        if meta.is_file() {
            let key = root
                .file_name()
                .map_or_else(|| root.to_string_lossy(), |n| n.to_string_lossy())
                .into_owned();
            files.push(file(root.clone(), key));
        } else {
            walk(root, root, &mut files)?;
        }
    }
    if let Some(exts) = only {
        files.retain(|f| {
            f.path
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| exts.contains(&x))
        });
    }
    if split == Split::Content {
        for f in &mut files {
            let bytes = std::fs::read(&f.path)
                .with_context(|| format!("reading corpus file {}", f.path.display()))?;
            f.hash = Sha256::digest(&bytes).into();
        }
    }
    files.sort_by(|a, b| a.hash.cmp(&b.hash).then(a.path.cmp(&b.path)));
    files.dedup_by(|a, b| a.path == b.path || (split == Split::Content && a.hash == b.hash));
    let (mut heldout, mut train): (Vec<_>, Vec<_>) =
        files.into_iter().partition(|f| f.hash[0] % 10 == 0);
    if heldout.is_empty() && train.len() >= 2 {
        // Too few files for the rule to pick one: hold out the last in hash order.
        heldout.push(train.pop().expect("two files"));
    }
    if train.is_empty() || heldout.is_empty() {
        bail!(
            "the corpus has {} file(s); training needs at least two text files (one is held \
             out to measure the head)",
            train.len() + heldout.len()
        );
    }
    Ok(Corpus { train, heldout })
}

fn file(path: PathBuf, key: String) -> CorpusFile {
    let hash = Sha256::digest(key.as_bytes()).into();
    CorpusFile { path, key, hash }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<CorpusFile>) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("reading directory {}", dir.display()))?;
    let mut entries: Vec<_> = entries.filter_map(|e| e.ok()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(ft) = e.file_type() else { continue };
        if name.starts_with('.') || is_benchmark_data(&path) {
            continue;
        }
        if ft.is_dir() {
            if !SKIPPED_DIRS.contains(&name.as_str()) {
                walk(root, &path, out)?;
            }
        } else if ft.is_file()
            && path
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| TEXT_EXTENSIONS.contains(&x))
        {
            let key = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            out.push(file(path, key));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_fixed_by_path_and_excludes_benchmark_and_packages() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for i in 0..40 {
            std::fs::write(root.join(format!("m{i}.py")), "x = 1\n").unwrap();
        }
        std::fs::create_dir_all(root.join("site-packages/human_eval")).unwrap();
        std::fs::write(root.join("site-packages/human_eval/data.py"), "x").unwrap();
        std::fs::create_dir_all(root.join("pkg")).unwrap();
        std::fs::write(root.join("pkg/a.py"), "y = 2\n").unwrap();
        std::fs::write(root.join("pkg/blob.bin"), [0u8, 1, 2]).unwrap();
        let c = collect(&[root.to_owned()]).unwrap();
        let all: Vec<_> = c
            .train
            .iter()
            .chain(&c.heldout)
            .map(|f| f.key.clone())
            .collect();
        assert_eq!(all.len(), 41, "{all:?}");
        assert!(
            all.iter()
                .all(|k| !k.contains("site-packages") && !k.ends_with(".bin"))
        );
        assert!(c.heldout.iter().all(|f| f.hash[0] % 10 == 0));
        assert!(c.train.iter().all(|f| f.hash[0] % 10 != 0));
        assert!(!c.heldout.is_empty());
        // Same split again.
        let again = collect(&[root.to_owned()]).unwrap();
        assert_eq!(again.heldout, c.heldout);
    }

    #[test]
    fn content_split_keeps_identical_files_once_and_filters_extensions() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for v in ["a-1.0", "a-1.1"] {
            std::fs::create_dir_all(root.join(v)).unwrap();
            // The same file in two versions of a crate, and one that changed.
            std::fs::write(root.join(v).join("lib.rs"), "pub fn f() {}\n").unwrap();
            std::fs::write(root.join(v).join("new.rs"), format!("// {v}\n")).unwrap();
            std::fs::write(root.join(v).join("README.md"), "# a\n").unwrap();
        }
        for i in 0..30 {
            std::fs::write(
                root.join(format!("m{i}.rs")),
                format!("const X: u32 = {i};\n"),
            )
            .unwrap();
        }
        let c = collect_with(&[root.to_owned()], Split::Content, Some(&["rs"])).unwrap();
        let all: Vec<_> = c.train.iter().chain(&c.heldout).collect();
        assert_eq!(all.len(), 33, "{all:?}");
        assert!(all.iter().all(|f| f.key.ends_with(".rs")));
        for f in &all {
            let h: [u8; 32] = Sha256::digest(std::fs::read(&f.path).unwrap()).into();
            assert_eq!(f.hash, h);
        }
        assert!(c.heldout.iter().all(|f| f.hash[0] % 10 == 0));
    }

    #[test]
    fn too_small_or_benchmark_corpora_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let one = dir.path().join("one.py");
        std::fs::write(&one, "x").unwrap();
        let e = collect(std::slice::from_ref(&one)).unwrap_err().to_string();
        assert!(e.contains("at least two"), "{e}");
        let he = dir.path().join("HumanEval.jsonl");
        std::fs::write(&he, "{}").unwrap();
        let e = collect(&[one, he]).unwrap_err().to_string();
        assert!(e.contains("never train on it"), "{e}");
        let e = collect(&[dir.path().join("missing")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be read"), "{e}");
    }
}
