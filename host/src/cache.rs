//! The compiled-component cache. Deserializing a compiled component runs its machine code,
//! so a file in the cache must be one this user's host wrote: the directory is this user's
//! and writable by no one else (created 0700; refused otherwise), every file carries an
//! HMAC-SHA256 under a per-user key (a 0600 file in the directory) that is checked before
//! deserializing, and files are written to a fresh name (`O_EXCL`) and renamed into place.
//! A file that fails any check is ignored with a warning, and the component is compiled.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

const KEY_FILE: &str = "key";
const TAG_LEN: usize = 32;

/// Why the cache directory is not used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The directory or key file belongs to another user.
    #[error("{path} belongs to user {owner}, not to this user ({me}); the cache is not used")]
    Foreign {
        /// The path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's user.
        me: u32,
    },
    /// Others may write to the directory or read the key.
    #[error(
        "{path} has mode {mode:o}: others could plant files or read the key (fix with chmod \
         {want:o}); the cache is not used"
    )]
    Open {
        /// The path.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
        /// The mode it should have.
        want: u32,
    },
    /// A symlink where the directory or key should be.
    #[error("{0} is a symlink; the cache is not used")]
    Symlink(PathBuf),
    /// The file system failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An opened cache directory with its key.
pub struct CompiledCache {
    dir: PathBuf,
    key: [u8; 32],
}

impl CompiledCache {
    /// Opens (creating it 0700 if missing) the cache directory `dir` and its key, after
    /// checking that both are this user's and closed to others.
    pub fn open(dir: &Path) -> Result<CompiledCache, CacheError> {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(dir))?;
        }
        check_private(dir, 0o022, 0o700)?;
        let key_path = dir.join(KEY_FILE);
        let key = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
        {
            Ok(mut f) => {
                let mut key = [0u8; 32];
                File::open("/dev/urandom")
                    .and_then(|mut r| r.read_exact(&mut key))
                    .map_err(io(Path::new("/dev/urandom")))?;
                f.write_all(&key).map_err(io(&key_path))?;
                key
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                check_private(&key_path, 0o077, 0o600)?;
                let bytes = fs::read(&key_path).map_err(io(&key_path))?;
                bytes.try_into().map_err(|_| CacheError::Io {
                    path: key_path.clone(),
                    source: std::io::Error::other("a cache key is 32 bytes"),
                })?
            }
            Err(e) => return Err(io(&key_path)(e)),
        };
        Ok(CompiledCache {
            dir: dir.to_path_buf(),
            key,
        })
    }

    fn tag(&self, name: &str, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        mac.update(name.as_bytes());
        mac.update(&[0]);
        mac.update(body);
        mac
    }

    /// The bytes stored under `name`, if they are there and carry this user's tag; a file
    /// that does not is reported in the error and must not be used.
    pub fn get(&self, name: &str) -> Result<Option<Vec<u8>>, String> {
        let path = self.dir.join(name);
        let mut bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        if bytes.len() < TAG_LEN {
            return Err(format!(
                "{} is too short to be a cache file",
                path.display()
            ));
        }
        let tag = bytes.split_off(bytes.len() - TAG_LEN);
        self.tag(name, &bytes)
            .verify_slice(&tag)
            .map_err(|_| format!("{} does not carry this user's cache tag", path.display()))?;
        Ok(Some(bytes))
    }

    /// Stores `body` under `name`: written to a new file, then renamed into place.
    pub fn put(&self, name: &str, body: &[u8]) -> std::io::Result<()> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let tmp = self
            .dir
            .join(format!(".{name}.{}.{nanos:x}.tmp", std::process::id()));
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let tag = self.tag(name, body).finalize().into_bytes();
        let written = f
            .write_all(body)
            .and_then(|()| f.write_all(&tag))
            .and_then(|()| f.sync_all());
        if let Err(e) = written.and_then(|()| fs::rename(&tmp, self.dir.join(name))) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(())
    }
}

/// Checks that `path` is no symlink, is owned by this user, and has none of `forbidden`
/// mode bits.
fn check_private(path: &Path, forbidden: u32, want: u32) -> Result<(), CacheError> {
    let m = fs::symlink_metadata(path).map_err(io(path))?;
    if m.file_type().is_symlink() {
        return Err(CacheError::Symlink(path.to_path_buf()));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if m.uid() != me {
        return Err(CacheError::Foreign {
            path: path.to_path_buf(),
            owner: m.uid(),
            me,
        });
    }
    let mode = m.mode() & 0o7777;
    if mode & forbidden != 0 {
        return Err(CacheError::Open {
            path: path.to_path_buf(),
            mode,
            want,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn only_files_tagged_by_this_cache_are_returned() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("wasm");
        let c = CompiledCache::open(&dir).unwrap();
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let key_mode = fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(key_mode, 0o600);
        assert_eq!(c.get("a.cwasm").unwrap(), None);
        c.put("a.cwasm", b"compiled code").unwrap();
        assert_eq!(c.get("a.cwasm").unwrap().unwrap(), b"compiled code");
        // Reopened, the same key verifies it.
        let c = CompiledCache::open(&dir).unwrap();
        assert_eq!(c.get("a.cwasm").unwrap().unwrap(), b"compiled code");

        // One byte changed: refused.
        let path = dir.join("a.cwasm");
        let mut bytes = fs::read(&path).unwrap();
        bytes[3] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let e = c.get("a.cwasm").unwrap_err();
        assert!(e.contains("does not carry this user's cache tag"), "{e}");
        // A file tagged under another name (copied over a good one): refused.
        c.put("b.cwasm", b"other code").unwrap();
        fs::copy(dir.join("b.cwasm"), &path).unwrap();
        assert!(c.get("a.cwasm").is_err());
        // A file planted without the key: refused.
        fs::write(&path, [0u8; 64]).unwrap();
        assert!(c.get("a.cwasm").is_err());
        // Another cache's files (another key) are refused too.
        let other = CompiledCache::open(&d.path().join("other")).unwrap();
        other.put("a.cwasm", b"compiled code").unwrap();
        fs::copy(d.path().join("other/a.cwasm"), &path).unwrap();
        assert!(c.get("a.cwasm").is_err());
    }

    #[test]
    fn directories_others_can_write_or_own_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let open = d.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let e = CompiledCache::open(&open).err().unwrap();
        assert!(matches!(e, CacheError::Open { mode: 0o777, .. }), "{e}");

        let readable_key = d.path().join("key");
        CompiledCache::open(&readable_key).unwrap();
        fs::set_permissions(
            readable_key.join(KEY_FILE),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(CompiledCache::open(&readable_key).is_err());

        let link = d.path().join("link");
        std::os::unix::fs::symlink(d.path().join("key"), &link).unwrap();
        assert!(matches!(
            CompiledCache::open(&link),
            Err(CacheError::Symlink(_))
        ));

        // A directory of another user: made so here when running as root, else `/`.
        let foreign = if unsafe { libc::geteuid() } == 0 {
            let f = d.path().join("foreign");
            fs::DirBuilder::new().mode(0o700).create(&f).unwrap();
            std::os::unix::fs::chown(&f, Some(12345), Some(12345)).unwrap();
            f
        } else {
            PathBuf::from("/")
        };
        let e = CompiledCache::open(&foreign).err().unwrap();
        assert!(matches!(e, CacheError::Foreign { .. }), "{e}");
    }
}
