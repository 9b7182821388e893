//! Warm start: what the host learned in earlier sessions about a drafter working with one
//! verifier target version over one link on one backend — draft step, verifier time per
//! block size, acceptance per draft position, round trip — kept in a small JSON file under
//! the tandem cache directory and handed to the drafter component at the start of the next
//! session (`warm` event of `tandem:drafter`).
//!
//! An entry is keyed by the component's digest, the target (`family@version`), the
//! verifier's address and the draft backend: a new target version or another link starts
//! from scratch, except for the draft step, which depends only on the device and is taken
//! from any entry of the same drafter and backend.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::component::api;

/// Entries kept at most (the least recently updated go first).
const MAX_ENTRIES: usize = 64;

/// How much the file's acceptance counts weigh against a new session's when merged.
const KEEP: f64 = 0.5;

/// What one (drafter, target, link, backend) taught.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Mean draft step, ms.
    pub draft_ms: f64,
    /// Link round trip, ms.
    pub rtt_ms: f64,
    /// The verifier's mean time by tokens verified (drafts + 1), ms.
    pub verify_ms: BTreeMap<usize, f64>,
    /// Per draft position: (accepted, judged), recency-weighted.
    pub acceptance: Vec<(f64, f64)>,
    /// When it was last written, Unix seconds.
    pub updated: u64,
}

impl Entry {
    /// The event that hands this to the component.
    pub fn to_event(&self) -> api::WarmStart {
        api::WarmStart {
            draft_ms: self.draft_ms as f32,
            rtt_ms: self.rtt_ms as f32,
            verify_ms: self
                .verify_ms
                .iter()
                .map(|(&n, &ms)| (n as u32, ms as f32))
                .collect(),
            acceptance: self
                .acceptance
                .iter()
                .map(|&(a, t)| (a as f32, t as f32))
                .collect(),
        }
    }

    /// This entry updated with a new session's measurements: timings replaced where the
    /// session measured them, acceptance counts added to the older ones at half weight.
    fn merged(&self, new: &Entry) -> Entry {
        let mut verify_ms = self.verify_ms.clone();
        verify_ms.extend(new.verify_ms.iter().map(|(&n, &ms)| (n, ms)));
        let len = self.acceptance.len().max(new.acceptance.len());
        let at = |v: &[(f64, f64)], i: usize| v.get(i).copied().unwrap_or((0.0, 0.0));
        let acceptance = (0..len)
            .map(|i| {
                let (a0, t0) = at(&self.acceptance, i);
                let (a1, t1) = at(&new.acceptance, i);
                (a0 * KEEP + a1, t0 * KEEP + t1)
            })
            .collect();
        let pick = |new: f64, old: f64| if new > 0.0 { new } else { old };
        Entry {
            draft_ms: pick(new.draft_ms, self.draft_ms),
            rtt_ms: pick(new.rtt_ms, self.rtt_ms),
            verify_ms,
            acceptance,
            updated: new.updated,
        }
    }
}

/// Which entry a session reads and writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// The component's sha256 (hex).
    pub drafter: String,
    /// `family@version`.
    pub target: String,
    /// The verifier's address.
    pub link: String,
    /// `cpu` or the GPU adapter's name.
    pub backend: String,
}

impl Key {
    fn name(&self) -> String {
        format!(
            "{} {} {} {}",
            self.drafter, self.target, self.link, self.backend
        )
    }

    fn device_part(&self) -> String {
        format!("{} ", self.drafter)
    }
}

/// The state file: `$TANDEM_POLICY_STATE`, else `policy-state.json` in the tandem cache
/// directory (`$XDG_CACHE_HOME/tandem`, `~/.cache/tandem`).
pub fn state_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TANDEM_POLICY_STATE") {
        return PathBuf::from(p);
    }
    tandem_models::fetch::cache_root().join("policy-state.json")
}

type Entries = BTreeMap<String, Entry>;

/// The file's entries; a missing file is empty, an unreadable one is reported and treated
/// as empty (it is only a cache).
fn read(path: &Path) -> Entries {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            eprintln!(
                "tandem: warning: ignoring the warm-start state {} ({e}); it will be rewritten",
                path.display()
            );
            Entries::new()
        }),
        Err(_) => Entries::new(),
    }
}

/// What earlier sessions left for `key`: the whole entry, or (another target or link) only
/// the draft step of the same drafter and backend; `None` when there is nothing.
pub fn load(path: &Path, key: &Key) -> Option<Entry> {
    let entries = read(path);
    if let Some(e) = entries.get(&key.name()) {
        return Some(e.clone());
    }
    let device = key.device_part();
    entries
        .iter()
        .filter(|(k, _)| k.starts_with(&device) && k.ends_with(&format!(" {}", key.backend)))
        .max_by_key(|(_, e)| e.updated)
        .map(|(_, e)| Entry {
            draft_ms: e.draft_ms,
            ..Entry::default()
        })
}

/// Merges a session's measurements into the file (written to a temporary file and renamed,
/// so a reader never sees half of it).
pub fn save(path: &Path, key: &Key, session: &Entry) -> anyhow::Result<()> {
    let mut entries = read(path);
    let merged = match entries.get(&key.name()) {
        Some(old) => old.merged(session),
        None => session.clone(),
    };
    entries.insert(key.name(), merged);
    while entries.len() > MAX_ENTRIES {
        let oldest = entries
            .iter()
            .min_by_key(|(_, e)| e.updated)
            .map(|(k, _)| k.clone());
        match oldest {
            Some(k) => entries.remove(&k),
            None => break,
        };
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::drafter_cmd::write_atomic(path, &serde_json::to_vec_pretty(&entries)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(target: &str, link: &str) -> Key {
        Key {
            drafter: "d1".into(),
            target: target.into(),
            link: link.into(),
            backend: "cpu".into(),
        }
    }

    #[test]
    fn entries_are_merged_and_only_the_device_part_carries_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert_eq!(load(&path, &key("t@1", "a:1")), None);
        let first = Entry {
            draft_ms: 50.0,
            rtt_ms: 100.0,
            verify_ms: [(1, 60.0), (5, 200.0)].into(),
            acceptance: vec![(8.0, 10.0), (4.0, 8.0)],
            updated: 1,
        };
        save(&path, &key("t@1", "a:1"), &first).unwrap();
        assert_eq!(load(&path, &key("t@1", "a:1")), Some(first.clone()));
        let second = Entry {
            draft_ms: 40.0,
            rtt_ms: 0.0,
            verify_ms: [(5, 180.0)].into(),
            acceptance: vec![(2.0, 2.0)],
            updated: 2,
        };
        save(&path, &key("t@1", "a:1"), &second).unwrap();
        let got = load(&path, &key("t@1", "a:1")).unwrap();
        assert_eq!(got.draft_ms, 40.0);
        assert_eq!(got.rtt_ms, 100.0, "an unmeasured value keeps the older one");
        assert_eq!(got.verify_ms, [(1, 60.0), (5, 180.0)].into());
        assert_eq!(got.acceptance, vec![(6.0, 7.0), (2.0, 4.0)]);
        // A new target version or another link: only the draft step holds.
        for other in [key("t@2", "a:1"), key("t@1", "b:2")] {
            let e = load(&path, &other).unwrap();
            assert_eq!(e.draft_ms, 40.0);
            assert!(e.acceptance.is_empty() && e.verify_ms.is_empty() && e.rtt_ms == 0.0);
        }
        // Another backend: nothing.
        let gpu = Key {
            backend: "llvmpipe".into(),
            ..key("t@1", "a:1")
        };
        assert_eq!(load(&path, &gpu), None);
        // A damaged file is treated as empty and rewritten.
        std::fs::write(&path, b"{not json").unwrap();
        assert_eq!(load(&path, &key("t@1", "a:1")), None);
        save(&path, &key("t@1", "a:1"), &first).unwrap();
        assert_eq!(load(&path, &key("t@1", "a:1")), Some(first));
    }
}
