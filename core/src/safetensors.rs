//! Hugging Face checkpoint folders: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Memory-mapped; every header offset is checked.
//! Pickled PyTorch files (`*.bin`, `*.pt`) are never opened: they can execute code.
//!
//! Format (safetensors spec): u64 LE header length, a JSON header
//! `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the
//! data; offsets are relative to the end of the header.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rayon::prelude::*;
use serde::Deserialize;

use crate::error::LoadError;
use crate::gguf::{FileBytes, MappedBytes};
use crate::progress::{OnRead, ReadProgress};

/// Headers larger than this are refused (real ones are a few MB at most).
const MAX_HEADER: u64 = 100 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    Other,
}

impl Dtype {
    fn parse(s: &str) -> Self {
        match s {
            "F32" => Self::F32,
            "F16" => Self::F16,
            "BF16" => Self::BF16,
            _ => Self::Other,
        }
    }

    fn size(self) -> Option<usize> {
        match self {
            Self::F32 => Some(4),
            Self::F16 | Self::BF16 => Some(2),
            Self::Other => None,
        }
    }
}

#[derive(Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

#[derive(Debug, Clone)]
pub struct TensorView {
    pub dtype: Dtype,
    pub dtype_name: String,
    pub shape: Vec<usize>,
    file: usize,
    start: usize,
    end: usize,
}

/// All tensors of a checkpoint folder (one file or several shards).
pub struct Checkpoint {
    files: Vec<FileBytes>,
    tensors: BTreeMap<String, TensorView>,
    /// `__metadata__` of every file, merged.
    pub metadata: BTreeMap<String, String>,
    /// Tensor bytes read so far.
    progress: ReadProgress,
}

impl Checkpoint {
    /// Open `dir/model.safetensors` or the shards named by `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self, LoadError> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index.exists() {
            shard_files(&index)?.into_iter().map(|f| dir.join(f)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            let pickled = ["pytorch_model.bin", "model.pt", "pytorch_model.bin.index.json"].iter().any(|f| dir.join(f).exists());
            let why = if pickled { " (only pickled PyTorch weights, which vidllm never loads: convert them to safetensors)" } else { "" };
            return Err(LoadError::Unsupported(format!("no model.safetensors in {}{why}", dir.display())));
        };
        Self::open_files(&files)
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self, LoadError> {
        let mut sources = Vec::new();
        for p in paths {
            let open_err = |source| LoadError::Open { path: p.display().to_string(), source };
            let f = std::fs::File::open(p).map_err(open_err)?;
            // SAFETY: read-only map of a file vidllm does not modify.
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(open_err)?;
            sources.push((p.display().to_string(), FileBytes::Mapped(MappedBytes::whole(map))));
        }
        Self::from_sources(sources)
    }

    /// Files already in memory (a browser's fetches), each with a name for errors.
    pub fn from_buffers(buffers: Vec<(String, Vec<u8>)>) -> Result<Self, LoadError> {
        Self::from_sources(buffers.into_iter().map(|(name, b)| (name, FileBytes::Owned(b))).collect())
    }

    fn from_sources(sources: Vec<(String, FileBytes)>) -> Result<Self, LoadError> {
        let mut files = Vec::new();
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (i, (name, source)) in sources.into_iter().enumerate() {
            let (views, meta) = parse_header(&source, i, &name)?;
            tensors.extend(views);
            metadata.extend(meta);
            files.push(source);
        }
        let progress = ReadProgress::new(tensors.values().map(|v: &TensorView| (v.end - v.start) as u64).sum());
        Ok(Self { files, tensors, metadata, progress })
    }

    pub fn get(&self, name: &str) -> Option<&TensorView> {
        self.tensors.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Let go of the files' pages that loading has read ([`Gguf::release_pages`]): a
    /// loader that copies (or quantises) tensors to a device calls it as it goes.
    ///
    /// [`Gguf::release_pages`]: crate::gguf::Gguf::release_pages
    pub fn release_pages(&self) {
        self.files.iter().for_each(FileBytes::release_pages);
    }

    fn bytes(&self, v: &TensorView) -> &[u8] {
        self.progress.advance((v.end - v.start) as u64);
        &self.files[v.file][v.start..v.end]
    }

    /// Report tensor reads (bytes so far, bytes of all tensors) to `f`: a loader's progress.
    pub fn on_read(&mut self, f: OnRead) {
        self.progress.observe(f);
    }

    /// Raw little-endian bytes, dtype name (`"U8"`, `"I64"`, ...) and shape.
    pub fn raw(&self, name: &str) -> Result<(&[u8], &str, Vec<usize>), LoadError> {
        let v = self.get(name).ok_or_else(|| LoadError::MissingTensor(name.to_string()))?;
        Ok((self.bytes(v), &v.dtype_name, v.shape.clone()))
    }

    /// An I64 tensor (token ids in fixtures).
    pub fn i64(&self, name: &str) -> Result<(Vec<i64>, Vec<usize>), LoadError> {
        let (b, dt, shape) = self.raw(name)?;
        if dt != "I64" {
            return Err(LoadError::BadTensor { name: name.into(), reason: format!("dtype {dt}, expected I64") });
        }
        Ok((b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(), shape))
    }

    /// A tensor as f32 with its shape, whatever float type it is stored in.
    pub fn f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), LoadError> {
        let v = self.get(name).ok_or_else(|| LoadError::MissingTensor(name.to_string()))?;
        let b = self.bytes(v);
        let data = match v.dtype {
            Dtype::F32 => widen::<4>(b, |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            Dtype::F16 => widen::<2>(b, |c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
            Dtype::BF16 => widen::<2>(b, |c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            Dtype::Other => {
                return Err(LoadError::BadTensor { name: name.into(), reason: format!("dtype {} is not a float type", v.dtype_name) });
            }
        };
        Ok((data, v.shape.clone()))
    }

    /// A tensor as f32, checked against the expected shape.
    pub fn f32_shaped(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, LoadError> {
        let (data, shape) = self.f32(name)?;
        if shape != expected {
            return Err(LoadError::ShapeMismatch { name: name.into(), expected: expected.to_vec(), got: shape });
        }
        Ok(data)
    }
}

/// Values of `N` little-endian bytes each, as f32, in runs over the threads: a folder's
/// matrices are read one at a time, and each is copied out of the mapping (and its pages
/// first touched) here.
fn widen<const N: usize>(b: &[u8], value: impl Fn(&[u8]) -> f32 + Sync) -> Vec<f32> {
    const RUN: usize = 1 << 16;
    let mut out = vec![0f32; b.len() / N];
    out.par_chunks_mut(RUN)
        .zip(b.par_chunks(RUN * N))
        .for_each(|(o, bytes)| o.iter_mut().zip(bytes.chunks_exact(N)).for_each(|(o, c)| *o = value(c)));
    out
}

fn shard_files(index: &Path) -> Result<Vec<String>, LoadError> {
    let text = std::fs::read_to_string(index).map_err(|source| LoadError::Open { path: index.display().to_string(), source })?;
    shard_names(&text, &index.display().to_string())
}

/// The shard file names a `model.safetensors.index.json` (its text; `what` names it in
/// errors) lists, sorted and once each. Names that could leave the folder are refused.
pub fn shard_names(index_json: &str, what: &str) -> Result<Vec<String>, LoadError> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let idx: Index = serde_json::from_str(index_json).map_err(|e| LoadError::Unsupported(format!("{what}: {e}")))?;
    let mut files: Vec<String> = idx.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    if let Some(bad) = files.iter().find(|f| f.contains('/') || f.contains("..") || !f.ends_with(".safetensors")) {
        return Err(LoadError::Unsupported(format!("shard name {bad:?} in {what}")));
    }
    Ok(files)
}

type Header = (Vec<(String, TensorView)>, BTreeMap<String, String>);

fn parse_header(buf: &[u8], file: usize, path: &str) -> Result<Header, LoadError> {
    let len = buf.len() as u64;
    let trunc = |what: &str, offset: u64, need: u64| LoadError::Truncated { what: format!("{path} {what}"), offset, need, len };
    if len < 8 {
        return Err(trunc("header length", 0, 8));
    }
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER || n > len - 8 {
        return Err(trunc("header", 8, n));
    }
    let header = &buf[8..8 + n as usize];
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| LoadError::Unsupported(format!("{path}: bad safetensors header: {e}")))?;
    let data_start = 8 + n;
    let mut out = Vec::new();
    let mut meta = BTreeMap::new();
    for (name, v) in raw {
        if name == "__metadata__" {
            if let serde_json::Value::Object(m) = v {
                meta.extend(m.into_iter().filter_map(|(k, v)| v.as_str().map(|s| (k, s.to_string()))));
            }
            continue;
        }
        let info: RawInfo = serde_json::from_value(v).map_err(|e| LoadError::BadTensor { name: name.clone(), reason: e.to_string() })?;
        let dtype = Dtype::parse(&info.dtype);
        let [b, e] = info.data_offsets;
        let count = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let bytes = count.zip(dtype.size()).map(|(c, s)| c.saturating_mul(s) as u64);
        if e < b || bytes.is_some_and(|nb| nb != e - b) {
            return Err(LoadError::BadTensor {
                name,
                reason: format!("offsets [{b}, {e}) do not match shape {:?} of {}", info.shape, info.dtype),
            });
        }
        if data_start + e > len {
            return Err(LoadError::TensorOutOfBounds { name, start: data_start + b, end: data_start + e, len });
        }
        let view = TensorView {
            dtype,
            dtype_name: info.dtype,
            shape: info.shape,
            file,
            start: (data_start + b) as usize,
            end: (data_start + e) as usize,
        };
        out.push((name, view));
    }
    Ok((out, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, header: &str, data: &[u8]) -> PathBuf {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend_from_slice(data);
        let p = dir.join(name);
        std::fs::write(&p, b).unwrap();
        p
    }

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vidllm-st-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn reads_f16_and_bf16_as_f32() {
        let d = tmp("ok");
        let mut data = f16::from_f32(1.5).to_le_bytes().to_vec();
        data.extend_from_slice(&bf16::from_f32(-2.0).to_le_bytes());
        let h = r#"{"a":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},"b":{"dtype":"BF16","shape":[1],"data_offsets":[2,4]}}"#;
        write(&d, "model.safetensors", h, &data);
        let c = Checkpoint::open_dir(&d).unwrap();
        assert_eq!(c.f32("a").unwrap().0, vec![1.5]);
        assert_eq!(c.f32("b").unwrap().0, vec![-2.0]);
        assert!(c.f32_shaped("a", &[2]).is_err());
    }

    #[test]
    fn offsets_beyond_the_file_are_refused() {
        let d = tmp("oob");
        let h = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        write(&d, "model.safetensors", h, &[0u8; 8]);
        assert!(matches!(Checkpoint::open_dir(&d), Err(LoadError::TensorOutOfBounds { .. })));
    }

    #[test]
    fn pickles_are_named_and_refused() {
        let d = tmp("pickle");
        std::fs::write(d.join("pytorch_model.bin"), b"not opened").unwrap();
        let e = Checkpoint::open_dir(&d).err().unwrap().to_string();
        assert!(e.contains("pickled"), "{e}");
    }
}

/// Writes safetensors files: used by tests to build re-keyed, sharded, bf16 or broken
/// checkpoints from the fixtures.
pub mod writer {
    use half::bf16;

    /// One tensor to write: name, dtype name, shape and little-endian bytes.
    pub struct Entry {
        pub name: String,
        pub dtype: &'static str,
        pub shape: Vec<usize>,
        pub data: Vec<u8>,
    }

    impl Entry {
        pub fn f32(name: &str, shape: Vec<usize>, v: &[f32]) -> Self {
            Self { name: name.into(), dtype: "F32", shape, data: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
        }

        pub fn bf16(name: &str, shape: Vec<usize>, v: &[f32]) -> Self {
            Self { name: name.into(), dtype: "BF16", shape, data: v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect() }
        }
    }

    pub fn write(entries: &[Entry]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for e in entries {
            header.insert(
                e.name.clone(),
                serde_json::json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, offset + e.data.len()]}),
            );
            offset += e.data.len();
        }
        let mut h = serde_json::to_vec(&header).expect("json");
        h.resize(h.len().div_ceil(8) * 8, b' ');
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        entries.iter().for_each(|e| out.extend_from_slice(&e.data));
        out
    }
}
