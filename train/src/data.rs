//! What training reads: for each position, the frozen backbone's hidden state at the exit
//! layer and the teacher's (the model's own final layer's) top-K distribution.
//!
//! Building a dataset runs the model once over the text; the result is cached on disk so
//! that epochs, resumed runs and later runs with other head options do not run it again.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use tandem_models::{Model, Rows, Tokenizer};

use crate::corpus::CorpusFile;
use crate::upper::{SeqData, Targets};
use crate::{bar, say};

const MAGIC: &[u8; 8] = b"TNDMDS01";

/// Positions with hidden states and teacher targets.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Hidden size.
    pub d: usize,
    /// Teacher entries kept per position.
    pub top_k: usize,
    /// `len × d` hidden states after the exit layer (no adapter).
    pub hidden: Vec<f32>,
    /// `len × top_k` teacher token ids, most probable first.
    pub ids: Vec<u32>,
    /// `len × top_k` teacher probabilities (of the full softmax, not renormalised).
    pub probs: Vec<f32>,
}

impl Dataset {
    /// An empty dataset.
    pub fn new(d: usize, top_k: usize) -> Self {
        Dataset {
            d,
            top_k,
            hidden: Vec::new(),
            ids: Vec::new(),
            probs: Vec::new(),
        }
    }

    /// Number of positions.
    pub fn len(&self) -> usize {
        self.ids.len() / self.top_k.max(1)
    }

    /// Whether there are no positions.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Runs `tokens` through `model` (a fresh cache at position 0) and appends every
    /// position: the hidden state after block `layer` and the final layer's top-K. Then
    /// continues greedily for `generate` tokens and appends those positions too: the
    /// positions a drafter or an exit meets when the model generates, which teacher-forced
    /// text alone under-represents (one step per generated token; the exit rides along each
    /// forward). The model must have no adapter at `layer` (see
    /// [`Model::remove_exit_adapter`]).
    pub fn push_sequence(
        &mut self,
        model: &Model,
        layer: usize,
        tokens: &[u32],
        generate: usize,
    ) -> Result<()> {
        let mut cache = model.new_cache();
        let mut feed = tokens.to_vec();
        let (mut pos, mut rows) = (0, Rows::All);
        for step in 0..=generate {
            let mut hidden = Vec::new();
            let logits =
                model.forward_with_exits(&feed, pos, &mut cache, rows, &[layer], &mut |e| {
                    hidden = e.hidden().to_vec();
                })?;
            pos += feed.len();
            let scored: Vec<(Vec<u32>, Vec<f32>)> = (0..logits.rows())
                .into_par_iter()
                .map(|i| top_k_softmax(logits.row(i), self.top_k))
                .collect();
            self.hidden.extend_from_slice(&hidden);
            for (ids, probs) in scored {
                self.ids.extend(ids);
                self.probs.extend(probs);
            }
            if step == generate || pos >= model.config().context_length {
                break;
            }
            feed = vec![self.teacher_top1(self.len() - 1)];
            rows = Rows::Last;
        }
        Ok(())
    }

    /// The teacher's most probable token at position `i`.
    pub fn teacher_top1(&self, i: usize) -> u32 {
        self.ids[i * self.top_k]
    }

    /// Writes the dataset (beside `path`, then renamed into place).
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("partial");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut w = BufWriter::new(
            File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?,
        );
        w.write_all(MAGIC)?;
        for v in [self.d, self.top_k, self.len()] {
            w.write_all(&(v as u64).to_le_bytes())?;
        }
        for v in &self.hidden {
            w.write_all(&v.to_le_bytes())?;
        }
        for v in &self.ids {
            w.write_all(&v.to_le_bytes())?;
        }
        for v in &self.probs {
            w.write_all(&v.to_le_bytes())?;
        }
        w.flush()?;
        drop(w);
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Reads a dataset written by [`Dataset::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let mut r = BufReader::new(
            File::open(path).with_context(|| format!("reading {}", path.display()))?,
        );
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)?;
        if &magic != MAGIC {
            bail!("{} is not a tandem training cache", path.display());
        }
        let mut u = || -> Result<usize> {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            Ok(u64::from_le_bytes(b) as usize)
        };
        let (d, top_k, n) = (u()?, u()?, u()?);
        let mut bytes = Vec::new();
        r.read_to_end(&mut bytes)?;
        let want = 4 * (n * d + 2 * n * top_k);
        if bytes.len() != want {
            bail!(
                "{} is cut short ({} of {want} bytes); delete it to rebuild",
                path.display(),
                bytes.len()
            );
        }
        let words = |b: &[u8]| -> Vec<[u8; 4]> {
            b.chunks_exact(4)
                .map(|c| c.try_into().expect("4"))
                .collect()
        };
        let (h, rest) = bytes.split_at(4 * n * d);
        let (ids, probs) = rest.split_at(4 * n * top_k);
        Ok(Dataset {
            d,
            top_k,
            hidden: words(h).into_iter().map(f32::from_le_bytes).collect(),
            ids: words(ids).into_iter().map(u32::from_le_bytes).collect(),
            probs: words(probs).into_iter().map(f32::from_le_bytes).collect(),
        })
    }
}

/// Softmax of a logit row, reduced to its `k` most probable entries (ids and
/// probabilities, most probable first).
pub fn top_k_softmax(row: &[f32], k: usize) -> (Vec<u32>, Vec<f32>) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    for (i, &x) in row.iter().enumerate() {
        if best.len() == k && x <= best[k - 1].0 {
            continue;
        }
        let at = best.partition_point(|&(v, _)| v >= x);
        best.insert(at, (x, i as u32));
        best.truncate(k);
    }
    let ids = best.iter().map(|&(_, i)| i).collect();
    let probs = best
        .iter()
        .map(|&(x, _)| (((x - max) as f64).exp() / sum) as f32)
        .collect();
    (ids, probs)
}

/// How the text is cut into model inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// Tokens per forward.
    pub seq_len: usize,
    /// Forwards taken from one file at most (spread over the file), so that a few long
    /// files do not make up the whole budget.
    pub per_file: usize,
    /// Positions to collect.
    pub budget: usize,
    /// Greedy tokens generated after each window (their positions count in the budget).
    pub generate: usize,
}

/// Token windows from `files` in order until `budget` positions: `(file key, tokens)`.
/// Files that are not UTF-8 are skipped.
pub fn windows(
    tokenizer: &Tokenizer,
    files: &[CorpusFile],
    w: Windows,
) -> Result<Vec<(String, Vec<u32>)>> {
    let mut out = Vec::new();
    let mut total = 0;
    for f in files {
        if total >= w.budget {
            break;
        }
        let Ok(text) = std::fs::read_to_string(&f.path) else {
            continue;
        };
        let tokens = tokenizer
            .encode(&text)
            .with_context(|| format!("tokenizing {}", f.path.display()))?;
        let chunks: Vec<&[u32]> = tokens.chunks(w.seq_len).collect();
        // Up to `per_file` windows spread evenly over the file (not only its header).
        let picks = chunks.len().min(w.per_file);
        for p in 0..picks {
            let chunk = chunks[p * chunks.len() / picks];
            // A window needs some context to be worth a forward.
            if chunk.len() < 16 || total >= w.budget {
                continue;
            }
            let take = chunk.len().min(w.budget - total);
            out.push((f.key.clone(), chunk[..take].to_vec()));
            total += take + w.generate.min(w.budget - total - take);
        }
    }
    Ok(out)
}

/// Full windows of `seq_len` tokens from `files` in order (up to two per file, spread over
/// it) until `budget` tokens; with the files they came from.
pub(crate) fn full_windows(
    tokenizer: &Tokenizer,
    files: &[CorpusFile],
    seq_len: usize,
    budget: usize,
) -> Result<(Vec<Vec<u32>>, Vec<CorpusFile>)> {
    let (mut out, mut used) = (Vec::new(), Vec::new());
    for f in files {
        if out.len() * seq_len >= budget {
            break;
        }
        let Ok(text) = std::fs::read_to_string(&f.path) else {
            continue;
        };
        let tokens = tokenizer
            .encode(&text)
            .with_context(|| format!("tokenizing {}", f.path.display()))?;
        let chunks: Vec<&[u32]> = tokens.chunks_exact(seq_len).collect();
        let picks = chunks.len().min(2);
        for p in 0..picks {
            if out.len() * seq_len < budget {
                out.push(chunks[p * chunks.len() / picks].to_vec());
            }
        }
        if picks > 0 {
            used.push(f.clone());
        }
    }
    Ok((out, used))
}

/// What [`build_sequences`] runs and how its result is keyed in the cache.
pub(crate) struct Sequences<'a> {
    /// The model file (part of the cache key).
    pub model_path: &'a Path,
    /// The model, with no adapter at `layer`.
    pub model: &'a Model,
    /// Its tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// The block whose hidden state is kept.
    pub layer: usize,
    /// Text tokens per window.
    pub seq_len: usize,
    /// Greedy tokens the window is continued by.
    pub generate: usize,
    /// Teacher entries kept per position (0 for next-token data).
    pub top_k: usize,
    /// The trainer's name in the cache file's name.
    pub tag: &'a str,
}

/// Full windows of `src.seq_len` text tokens of `files` (up to `budget` positions counting
/// their continuations), each turned by `window` into one sequence of `seq_len + generate`
/// positions appended to the data; cached on disk. `about` says on the console what is kept.
/// Returns the data, the number of files read and whether it came from the cache.
pub(crate) fn build_sequences(
    src: &Sequences,
    files: &[CorpusFile],
    budget: usize,
    what: &str,
    about: &str,
    mut window: impl FnMut(&[u32], &mut SeqData) -> Result<()>,
) -> Result<(SeqData, usize, bool)> {
    let len = src.seq_len + src.generate;
    let d = src.model.config().n_embd;
    let (wins, used) = full_windows(
        src.tokenizer,
        files,
        src.seq_len,
        budget * src.seq_len / len,
    )?;
    if wins.is_empty() {
        bail!(
            "the {what} files gave no window of {} tokens (are they UTF-8 text, and long \
             enough for --seq-len?)",
            src.seq_len
        );
    }
    let w = Windows {
        seq_len: src.seq_len,
        per_file: 2,
        budget,
        generate: src.generate,
    };
    let tag = format!("{}-{what}", src.tag);
    let path = cache_path(src.model_path, src.layer, src.top_k, w, &used, &tag)?;
    if let Ok(ds) = SeqData::load(&path)
        && ds.sequences() == wins.len()
        && ds.seq_len == len
        && ds.d == d
    {
        eprintln!(
            "{what}: {} sequences from the cache {}",
            ds.sequences(),
            path.display()
        );
        return Ok((ds, used.len(), true));
    }
    let total = wins.len() * len;
    let b = bar(total as u64, what);
    say(
        &b,
        format!(
            "{what}: running the model over {total} positions of {} files ({} of text and {} \
             generated per window; {about})",
            used.len(),
            src.seq_len,
            src.generate,
        ),
    );
    let mut out = SeqData {
        d,
        seq_len: len,
        hidden: Vec::with_capacity(total * d),
        targets: if src.top_k == 0 {
            Targets::Next(Vec::with_capacity(total))
        } else {
            Targets::Teacher {
                k: src.top_k,
                ids: Vec::with_capacity(total * src.top_k),
                probs: Vec::with_capacity(total * src.top_k),
            }
        },
    };
    let started = Instant::now();
    let mut next_line = total / 10;
    for tokens in &wins {
        let before = out.hidden.len() / d;
        window(tokens, &mut out)?;
        let done = out.hidden.len() / d;
        if done - before != len {
            bail!(
                "internal: a window gave {} positions, not {len}",
                done - before
            );
        }
        b.inc(len as u64);
        let rate = done as f64 / started.elapsed().as_secs_f64();
        b.set_message(format!("{rate:.0} tok/s"));
        if b.is_hidden() && done >= next_line && done < total {
            eprintln!("{what}: {done}/{total} tokens ({rate:.0} tok/s)");
            next_line += total / 10;
        }
    }
    b.finish_and_clear();
    out.save(&path)?;
    Ok((out, used.len(), false))
}

/// The cache file for a dataset built with these inputs: keyed by the model file (path,
/// size, modification time), the layer, the teacher's K, the windows and every file read
/// (path, size, modification time).
pub fn cache_path(
    model: &Path,
    layer: usize,
    top_k: usize,
    w: Windows,
    files: &[CorpusFile],
    what: &str,
) -> Result<PathBuf> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"tandem train data v1");
    let mut stamp = |p: &Path| -> Result<()> {
        let m = std::fs::metadata(p).with_context(|| format!("reading {}", p.display()))?;
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let canon = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
        h.update(canon.to_string_lossy().as_bytes());
        h.update(m.len().to_le_bytes());
        h.update(mtime.to_le_bytes());
        Ok(())
    };
    stamp(model)?;
    for f in files {
        stamp(&f.path)?;
    }
    for v in [layer, top_k, w.seq_len, w.per_file, w.budget, w.generate] {
        h.update((v as u64).to_le_bytes());
    }
    h.update(what.as_bytes());
    let key = hex::encode(&h.finalize()[..12]);
    let dir = tandem_models::fetch::cache_dir()
        .parent()
        .map_or_else(|| PathBuf::from(".cache"), Path::to_owned)
        .join("train");
    Ok(dir.join(format!("{what}-layer{layer}-{key}.bin")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_matches_a_full_sort() {
        let row: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.01)
            .collect();
        let (ids, probs) = top_k_softmax(&row, 8);
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap());
        assert_eq!(ids, idx[..8].iter().map(|&i| i as u32).collect::<Vec<_>>());
        let max = row[idx[0]];
        let z: f32 = row.iter().map(|&x| (x - max).exp()).sum();
        assert!((probs[0] - 1.0 / z).abs() < 1e-6);
        assert!(probs.windows(2).all(|p| p[0] >= p[1]));
    }

    #[test]
    fn save_and_load_round_trip_and_cut_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.bin");
        let ds = Dataset {
            d: 3,
            top_k: 2,
            hidden: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            ids: vec![7, 8, 9, 10],
            probs: vec![0.5, 0.25, 0.75, 0.125],
        };
        ds.save(&p).unwrap();
        assert_eq!(Dataset::load(&p).unwrap(), ds);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();
        let e = Dataset::load(&p).unwrap_err().to_string();
        assert!(e.contains("cut short"), "{e}");
    }
}
