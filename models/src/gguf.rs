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

/// Parses the GGUF header (metadata and tensor table).
pub(crate) fn read_content<R: Read + Seek>(reader: &mut R, path: &Path) -> Result<Content> {
    match Content::read(reader) {
        Ok(c) => Ok(c),
        Err(e) => {
            // candle reports an unknown tensor type by number only; find which tensor it is.
            if reader.seek(SeekFrom::Start(0)).is_ok()
                && let Some((tensor, code)) = first_unknown_dtype(reader)
            {
                return Err(Error::UnsupportedTensorType {
                    tensor,
                    dtype: ggml_type_name(code),
                });
            }
            Err(Error::InvalidGguf {
                path: path.to_owned(),
                reason: e.to_string(),
            })
        }
    }
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

fn is_supported(code: u32) -> bool {
    matches!(code, 0..=3 | 6..=15 | 30)
}

/// Walks a GGUF v2/v3 header by hand and returns the first tensor with a type candle
/// cannot load. Only used to explain a failed load; any parse problem yields `None`.
fn first_unknown_dtype<R: Read>(r: &mut R) -> Option<(String, u32)> {
    fn u32_<R: Read>(r: &mut R) -> Option<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }
    fn u64_<R: Read>(r: &mut R) -> Option<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
    fn skip<R: Read>(r: &mut R, n: u64) -> Option<()> {
        let copied = std::io::copy(&mut r.take(n), &mut std::io::sink()).ok()?;
        (copied == n).then_some(())
    }
    fn string<R: Read>(r: &mut R) -> Option<String> {
        let len = u64_(r)?;
        if len > 1 << 20 {
            return None;
        }
        let mut b = vec![0u8; len as usize];
        r.read_exact(&mut b).ok()?;
        Some(String::from_utf8_lossy(&b).into_owned())
    }
    fn skip_value<R: Read>(r: &mut R, ty: u32, depth: u32) -> Option<()> {
        match ty {
            0 | 1 | 7 => skip(r, 1),
            2 | 3 => skip(r, 2),
            4..=6 => skip(r, 4),
            10..=12 => skip(r, 8),
            8 => {
                let len = u64_(r)?;
                skip(r, len)
            }
            9 if depth < 4 => {
                let elem = u32_(r)?;
                let count = u64_(r)?;
                for _ in 0..count {
                    skip_value(r, elem, depth + 1)?;
                }
                Some(())
            }
            _ => None,
        }
    }
    if u32_(r)? != 0x4655_4747 {
        return None;
    }
    let version = u32_(r)?;
    if version < 2 {
        return None;
    }
    let n_tensors = u64_(r)?;
    let n_kv = u64_(r)?;
    for _ in 0..n_kv {
        string(r)?;
        let ty = u32_(r)?;
        skip_value(r, ty, 0)?;
    }
    for _ in 0..n_tensors {
        let name = string(r)?;
        let dims = u32_(r)?;
        skip(r, 8 * dims as u64)?;
        let ty = u32_(r)?;
        u64_(r)?;
        if !is_supported(ty) {
            return Some((name, ty));
        }
    }
    None
}
