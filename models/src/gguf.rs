//! Reading GGUF files through candle, with errors that name the file, tensor and type.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QTensor};

use crate::{Error, Result};

/// Opens a GGUF file and parses its header; the reader is left ready for tensor reads.
pub(crate) fn open(path: &Path) -> Result<(Content, BufReader<File>)> {
    let file = File::open(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut reader = BufReader::new(file);
    let content = read_content(&mut reader, path)?;
    Ok((content, reader))
}

/// Parses the GGUF header (metadata and tensor table), after [`check_layout`] has walked it
/// with every count, size and offset checked against the file's length, so that nothing
/// in a crafted header makes the parser divide by zero or allocate beyond the file.
pub(crate) fn read_content<R: Read + Seek>(reader: &mut R, path: &Path) -> Result<Content> {
    let invalid = |reason: String| Error::InvalidGguf {
        path: path.to_owned(),
        reason,
    };
    let io = |e: std::io::Error| invalid(e.to_string());
    let len = reader.seek(SeekFrom::End(0)).map_err(io)?;
    reader.seek(SeekFrom::Start(0)).map_err(io)?;
    match check_layout(&mut BufReader::new(&mut *reader), len) {
        Ok(()) => {}
        Err(Layout::Unsupported { tensor, code }) => {
            return Err(Error::UnsupportedTensorType {
                tensor,
                dtype: ggml_type_name(code),
            });
        }
        Err(Layout::Invalid(reason)) => return Err(invalid(reason)),
    }
    reader.seek(SeekFrom::Start(0)).map_err(io)?;
    Content::read(reader).map_err(|e| invalid(e.to_string()))
}

/// Reads every tensor of the file into memory, keeping its block format.
pub(crate) fn read_tensors<R: Read + Seek>(
    content: &Content,
    reader: &mut R,
    path: &Path,
) -> Result<BTreeMap<String, Arc<QTensor>>> {
    read_tensors_except(content, reader, path, &BTreeMap::new())
}

/// Reads the tensors of the file that are not in `mapped`.
pub(crate) fn read_tensors_except<R: Read + Seek>(
    content: &Content,
    reader: &mut R,
    path: &Path,
    mapped: &BTreeMap<String, MappedTensor>,
) -> Result<BTreeMap<String, Arc<QTensor>>> {
    let mut out = BTreeMap::new();
    for name in content.tensor_infos.keys() {
        if mapped.contains_key(name) {
            continue;
        }
        let t = content
            .tensor(reader, name, &Device::Cpu)
            .map_err(|e| Error::InvalidGguf {
                path: path.to_owned(),
                reason: format!("tensor `{name}`: {e} (is the file truncated?)"),
            })?;
        out.insert(name.clone(), Arc::new(t));
    }
    Ok(out)
}

/// A tensor's bytes as they lie in the file, in its block format.
#[derive(Clone)]
pub(crate) struct MappedTensor {
    /// The whole file, mapped read-only.
    pub file: Arc<Mapping>,
    /// Where the tensor's bytes are in `file`.
    pub range: std::ops::Range<usize>,
    pub dtype: GgmlDType,
    pub dims: Vec<usize>,
}

impl MappedTensor {
    /// The tensor's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.file.bytes()[self.range.clone()]
    }

    /// Drops the tensor's pages from this process's resident memory (they stay in the page
    /// cache and are read again if touched): for tensors the engine keeps another copy of.
    #[cfg(target_arch = "x86_64")]
    pub fn release(&self) {
        // SAFETY: the mapping is private and read-only, so its pages are never modified:
        // dropping them loses nothing, and a later read faults the same bytes back in from
        // the file. Whole pages around the range may be dropped too, for the same reason.
        let _ = unsafe {
            self.file.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                self.range.start,
                self.range.len(),
            )
        };
    }
}

/// A file mapped into memory read-only.
pub(crate) struct Mapping {
    #[cfg(not(target_arch = "wasm32"))]
    map: memmap2::Mmap,
}

impl Mapping {
    fn bytes(&self) -> &[u8] {
        #[cfg(not(target_arch = "wasm32"))]
        return &self.map;
        #[cfg(target_arch = "wasm32")]
        unreachable!("nothing is mapped on wasm32")
    }
}

/// Maps the file and locates the tensors `wanted` selects, so that they are used where they
/// lie: loading costs no copy, the pages are shared with the page cache (and with other
/// processes serving the same file), and only the pages a forward touches are read.
/// `Ok(None)` where the file cannot be mapped (the caller reads it instead).
///
/// The file must not be changed while it is mapped: tandem's model cache only ever
/// replaces files by renaming a new one over them, which leaves a mapping intact.
pub(crate) fn map_tensors(
    content: &Content,
    path: &Path,
    wanted: impl Fn(&str, GgmlDType, &[usize]) -> bool,
) -> Result<Option<BTreeMap<String, MappedTensor>>> {
    #[cfg(target_arch = "wasm32")]
    {
        let _ = (content, path, wanted);
        Ok(None)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        // SAFETY: the mapping is read-only and private to this process's view of the file;
        // the file is not modified while the model lives (see above). Reads of a file
        // truncated by another process afterwards would fault, as with any mapped file.
        let Ok(map) = (unsafe { memmap2::Mmap::map(&file) }) else {
            return Ok(None);
        };
        let file = Arc::new(Mapping { map });
        let len = file.bytes().len() as u64;
        let mut out = BTreeMap::new();
        for (name, info) in &content.tensor_infos {
            let dims = info.shape.dims().to_vec();
            if !wanted(name, info.ggml_dtype, &dims) {
                continue;
            }
            let bs = info.ggml_dtype.block_size();
            let elems: usize = dims.iter().product();
            let size = (elems / bs * info.ggml_dtype.type_size()) as u64;
            let start = content.tensor_data_offset.saturating_add(info.offset);
            if !elems.is_multiple_of(bs) || start.saturating_add(size) > len {
                return Err(Error::InvalidGguf {
                    path: path.to_owned(),
                    reason: format!(
                        "tensor `{name}`: needs {size} bytes at offset {start}, the file has \
                         {len} (is the file truncated?)"
                    ),
                });
            }
            out.insert(
                name.clone(),
                MappedTensor {
                    file: file.clone(),
                    range: start as usize..(start + size) as usize,
                    dtype: info.ggml_dtype,
                    dims,
                },
            );
        }
        Ok(Some(out))
    }
}

/// The ggml name of a tensor type code.
pub(crate) fn ggml_type_name(code: u32) -> String {
    let name = match code {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return format!("ggml type {code}"),
    };
    name.to_string()
}

/// Values per block and bytes per block of the tensor types candle loads; `None` for others.
fn block_layout(code: u32) -> Option<(u64, u64)> {
    Some(match code {
        0 => (1, 4),
        1 | 30 => (1, 2),
        2 => (32, 18),
        3 => (32, 20),
        6 => (32, 22),
        7 => (32, 24),
        8 => (32, 34),
        9 => (32, 36),
        10 => (256, 84),
        11 => (256, 110),
        12 => (256, 144),
        13 => (256, 176),
        14 => (256, 210),
        15 => (256, 292),
        _ => return None,
    })
}

/// Why [`check_layout`] refused a header.
#[derive(Debug)]
enum Layout {
    Invalid(String),
    Unsupported { tensor: String, code: u32 },
}

impl From<String> for Layout {
    fn from(s: String) -> Self {
        Layout::Invalid(s)
    }
}

/// Largest GGUF string (key, value or tensor name) accepted.
const MAX_STRING: u64 = 1 << 20;

/// Walks a GGUF v2/v3 header by hand, reading nothing it has not bounded: counts against
/// the bytes left, string lengths, array nesting, tensor dimensions (1 to 4, no zero, no
/// overflow, whole blocks), types, `general.alignment` (a power of two), and each tensor's
/// bytes lying inside the file, aligned and named once.
fn check_layout<R: Read>(r: &mut R, file_len: u64) -> std::result::Result<(), Layout> {
    struct Walk<'a, R> {
        r: &'a mut R,
        pos: u64,
        len: u64,
    }
    impl<R: Read> Walk<'_, R> {
        fn left(&self) -> u64 {
            self.len.saturating_sub(self.pos)
        }
        fn bytes<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
            let mut b = [0u8; N];
            self.r
                .read_exact(&mut b)
                .map_err(|_| format!("the header ends early, at byte {}", self.pos))?;
            self.pos += N as u64;
            Ok(b)
        }
        fn u32(&mut self) -> std::result::Result<u32, String> {
            self.bytes::<4>().map(u32::from_le_bytes)
        }
        fn u64(&mut self) -> std::result::Result<u64, String> {
            self.bytes::<8>().map(u64::from_le_bytes)
        }
        fn skip(&mut self, n: u64) -> std::result::Result<(), String> {
            if n > self.left() {
                return Err(format!(
                    "a value of {n} bytes at byte {} runs past the end of the file",
                    self.pos
                ));
            }
            let copied = std::io::copy(&mut self.r.take(n), &mut std::io::sink())
                .map_err(|e| e.to_string())?;
            self.pos += copied;
            if copied != n {
                return Err(format!("the header ends early, at byte {}", self.pos));
            }
            Ok(())
        }
        fn string(&mut self) -> std::result::Result<String, String> {
            let at = self.pos;
            let n = self.u64()?;
            if n > MAX_STRING || n > self.left() {
                return Err(format!("a string at byte {at} claims {n} bytes"));
            }
            let mut b = vec![0u8; n as usize];
            self.r
                .read_exact(&mut b)
                .map_err(|_| format!("the header ends early, at byte {}", self.pos))?;
            self.pos += n;
            Ok(String::from_utf8_lossy(&b).into_owned())
        }
        /// Skips a value; returns it when it is an unsigned or signed integer.
        fn value(&mut self, ty: u32, depth: u32) -> std::result::Result<Option<i128>, String> {
            Ok(match ty {
                0 => Some(self.bytes::<1>()?[0] as i128),
                1 => Some(self.bytes::<1>()?[0] as i8 as i128),
                2 => Some(u16::from_le_bytes(self.bytes()?) as i128),
                3 => Some(i16::from_le_bytes(self.bytes()?) as i128),
                4 => Some(self.u32()? as i128),
                5 => Some(self.u32()? as i32 as i128),
                6 => self.skip(4).map(|_| None)?,
                7 => self.skip(1).map(|_| None)?,
                8 => {
                    self.string()?;
                    None
                }
                9 if depth < 2 => {
                    let elem = self.u32()?;
                    let count = self.u64()?;
                    // Every element takes at least one byte.
                    if count > self.left() {
                        return Err(format!(
                            "an array at byte {} claims {count} elements",
                            self.pos
                        ));
                    }
                    for _ in 0..count {
                        self.value(elem, depth + 1)?;
                    }
                    None
                }
                9 => return Err("arrays nested more than two deep".into()),
                10 => Some(self.u64()? as i128),
                11 => Some(self.u64()? as i64 as i128),
                12 => self.skip(8).map(|_| None)?,
                _ => return Err(format!("unknown metadata value type {ty}")),
            })
        }
    }

    let mut w = Walk {
        r,
        pos: 0,
        len: file_len,
    };
    if w.u32()? != 0x4655_4747 {
        return Err("not a GGUF file (bad magic)".to_string().into());
    }
    let version = w.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} is not supported (2 and 3 are)").into());
    }
    let n_tensors = w.u64()?;
    let n_kv = w.u64()?;
    // A key-value pair takes at least 13 bytes, a tensor entry at least 24.
    if n_kv
        .saturating_mul(13)
        .saturating_add(n_tensors.saturating_mul(24))
        > w.left()
    {
        return Err(format!(
            "the header declares {n_tensors} tensors and {n_kv} metadata entries, more than \
             the file's {file_len} bytes can hold"
        )
        .into());
    }
    let mut alignment = 32u64;
    for _ in 0..n_kv {
        let key = w.string()?;
        let ty = w.u32()?;
        let v = w.value(ty, 0)?;
        if key == "general.alignment" {
            // candle takes 8- to 32-bit integers here and the default for anything else.
            if matches!(ty, 0..=5) {
                let a = v.unwrap_or(0);
                if a <= 0 || a > 1 << 16 || (a as u64).count_ones() != 1 {
                    return Err(format!(
                        "`general.alignment` is {a}; it must be a power of two up to 65536"
                    )
                    .into());
                }
                alignment = a as u64;
            }
        }
    }
    let mut tensors = Vec::new();
    for _ in 0..n_tensors {
        let name = w.string()?;
        let n_dims = w.u32()?;
        if !(1..=4).contains(&n_dims) {
            return Err(format!("tensor `{name}` has {n_dims} dimensions (1 to 4 allowed)").into());
        }
        let mut elems = 1u64;
        let mut first = 0u64;
        for i in 0..n_dims {
            let d = w.u64()?;
            if i == 0 {
                first = d;
            }
            elems = match elems.checked_mul(d) {
                Some(e) if d > 0 && e <= 1 << 50 => e,
                _ => {
                    return Err(format!(
                        "tensor `{name}` has a dimension of {d}: empty, or too many elements"
                    )
                    .into());
                }
            };
        }
        let code = w.u32()?;
        let offset = w.u64()?;
        let Some((block, bytes)) = block_layout(code) else {
            return Err(Layout::Unsupported { tensor: name, code });
        };
        if !first.is_multiple_of(block) {
            return Err(format!(
                "tensor `{name}`: a row of {first} values is not whole {block}-value blocks"
            )
            .into());
        }
        let size = elems / block * bytes;
        tensors.push((name, offset, size));
    }
    let data = w.pos.div_ceil(alignment) * alignment;
    let mut names = std::collections::HashSet::new();
    for (name, offset, size) in &tensors {
        if !names.insert(name.as_str()) {
            return Err(format!("tensor `{name}` is declared twice").into());
        }
        let end = data.checked_add(*offset).and_then(|s| s.checked_add(*size));
        if !offset.is_multiple_of(alignment) || end.is_none_or(|e| e > file_len) {
            return Err(format!(
                "tensor `{name}`: {size} bytes at data offset {offset} do not lie, aligned to \
                 {alignment}, within the file's {file_len} bytes (is the file truncated?)"
            )
            .into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_layouts_match_candle() {
        use GgmlDType::*;
        for (code, t) in [
            (0, F32),
            (1, F16),
            (30, BF16),
            (2, Q4_0),
            (3, Q4_1),
            (6, Q5_0),
            (7, Q5_1),
            (8, Q8_0),
            (9, Q8_1),
            (10, Q2K),
            (11, Q3K),
            (12, Q4K),
            (13, Q5K),
            (14, Q6K),
            (15, Q8K),
        ] {
            let want = (t.block_size() as u64, t.type_size() as u64);
            assert_eq!(block_layout(code), Some(want), "{t:?}");
        }
        assert_eq!(block_layout(20), None);
    }
}
