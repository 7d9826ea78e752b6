//! GGUF reader (versions 2 and 3), following ggml's `docs/gguf.md`.
//!
//! Layout: magic "GGUF", u32 version, u64 tensor count, u64 metadata count, the metadata
//! key/values, the tensor infos (name, dims, type, offset), padding to `general.alignment`,
//! then the tensor data. Every length, count and offset is checked against the file before
//! it is used, so a truncated or hostile file gives a `LoadError`, never a panic or a huge
//! allocation.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::error::LoadError;
use crate::ggml::{GgmlType, unsupported_type_name};
use crate::progress::{OnRead, ReadProgress};

const MAGIC: [u8; 4] = *b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Largest rank ggml supports.
const MAX_DIMS: u32 = 4;
/// Upper bound on tensor or key counts; real models have a few thousand at most.
const MAX_COUNT: u64 = 1 << 24;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any integer value that fits a u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where a tensor's bytes are in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (row) length.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset in the file.
    pub start: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Shape in row-major (PyTorch) order: `[rows, row_len]` for a matrix.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A file's bytes, or some of them: memory-mapped natively (the file stays mapped while
/// any holder lives), owned when they came from elsewhere (a browser). A parsed file holds
/// the whole of it; a loader may keep a tensor's part ([`Gguf::kept_tensor`]).
pub enum FileBytes {
    Mapped(MappedBytes),
    Owned(Vec<u8>),
}

/// Bytes of a memory-mapped file, used where they lie rather than copied. As with
/// llama.cpp's mapped weights, the file must not be truncated while the model runs.
#[derive(Clone)]
pub struct MappedBytes {
    map: Arc<memmap2::Mmap>,
    start: usize,
    len: usize,
}

impl MappedBytes {
    /// The whole mapped file.
    pub fn whole(map: memmap2::Mmap) -> Self {
        let len = map.len();
        Self { map: Arc::new(map), start: 0, len }
    }

    /// `len` bytes from `start` (within these bytes), sharing the mapping.
    fn part(&self, start: usize, len: usize) -> Self {
        Self { map: self.map.clone(), start: self.start + start, len }
    }
}

impl std::ops::Deref for MappedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for MappedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedBytes({} bytes at {})", self.len, self.start)
    }
}

impl FileBytes {
    /// Let go of the pages of a mapped file that this process has read (`MADV_DONTNEED` on
    /// the whole mapping); bytes read later come in again from the page cache or the file.
    /// Owned bytes stay.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        if let FileBytes::Mapped(m) = self {
            // SAFETY: the mapping is a read-only map of a file: released pages hold no
            // writes, and the next read of them reads the file again. Failing is harmless.
            let _ = unsafe { m.map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file.
pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    source: FileBytes,
    /// Tensor bytes read so far through [`Gguf::tensor_bytes`].
    progress: ReadProgress,
}

impl Gguf {
    /// Memory-map and parse a file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        let path = path.as_ref();
        let open_err = |source| LoadError::Open { path: path.display().to_string(), source };
        let file = std::fs::File::open(path).map_err(open_err)?;
        // SAFETY: the map is read-only; vidllm never writes model files while they are open.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(open_err)?;
        Self::parse(FileBytes::Mapped(MappedBytes::whole(map)))
    }

    /// Parse bytes already in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, LoadError> {
        Self::parse(FileBytes::Owned(bytes))
    }

    fn parse(source: FileBytes) -> Result<Self, LoadError> {
        let mut r = Reader { buf: &source, pos: 0 };
        let magic: [u8; 4] = r.take(4, "magic")?.try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(LoadError::BadMagic { found: magic });
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(LoadError::UnsupportedVersion(version));
        }
        let n_tensors = r.count("tensor count")?;
        let n_kv = r.count("metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32("value type")?;
            let value = r.value(&key, ty, 0)?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => return Err(absurd("general.alignment", v.as_u64().unwrap_or(0))),
            },
        };
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            raw.push(r.tensor_info()?);
        }
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let len = source.len() as u64;
        let tensors = raw.into_iter().map(|t| t.locate(data_start, alignment, len)).collect::<Result<Vec<_>, _>>()?;
        let progress = ReadProgress::new(tensors.iter().map(|t| t.n_bytes).sum());
        Ok(Self { version, metadata, tensors, alignment, source, progress })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The bytes of a tensor (bounds were checked at parse time).
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        self.progress.advance(t.n_bytes);
        &self.source[t.start as usize..(t.start + t.n_bytes) as usize]
    }

    /// A tensor's bytes to keep: where the file is memory-mapped, its part of the mapping,
    /// without a copy, else a copy. A loader keeps these for tables it reads a row at a
    /// time, such as the token embeddings, whose pages then come into memory as rows are
    /// used.
    pub fn kept_tensor(&self, t: &TensorInfo) -> FileBytes {
        match &self.source {
            FileBytes::Mapped(m) => {
                self.progress.advance(t.n_bytes);
                FileBytes::Mapped(m.part(t.start as usize, t.n_bytes as usize))
            }
            FileBytes::Owned(_) => FileBytes::Owned(self.tensor_bytes(t).to_vec()),
        }
    }

    /// Let go of the file's pages that loading has read into this process's memory
    /// (`MADV_DONTNEED` on the mapping). A loader that copies tensors to a device calls it
    /// as it goes, so that its peak memory is the copies, not the copies and the file.
    /// Bytes read later (a kept tensor) come in again from the page cache or the file.
    pub fn release_pages(&self) {
        self.source.release_pages();
    }

    /// Report tensor reads (bytes so far, bytes of all tensors) to `f`: a loader's progress.
    pub fn on_read(&mut self, f: OnRead) {
        self.progress.observe(f);
    }

    pub fn file_len(&self) -> u64 {
        self.source.len() as u64
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn require(&self, key: &str) -> Result<&Value, LoadError> {
        self.get(key).ok_or_else(|| LoadError::MissingKey(key.to_string()))
    }

    pub fn u64(&self, key: &str) -> Result<u64, LoadError> {
        let v = self.require(key)?;
        v.as_u64().ok_or(LoadError::WrongKeyType { key: key.into(), expected: "integer" })
    }

    pub fn f64(&self, key: &str) -> Result<f64, LoadError> {
        let v = self.require(key)?;
        v.as_f64().ok_or(LoadError::WrongKeyType { key: key.into(), expected: "number" })
    }

    pub fn str(&self, key: &str) -> Result<&str, LoadError> {
        let v = self.require(key)?;
        v.as_str().ok_or(LoadError::WrongKeyType { key: key.into(), expected: "string" })
    }

    /// A string array (tokens, merges).
    pub fn str_array(&self, key: &str) -> Result<Vec<&str>, LoadError> {
        let wrong = || LoadError::WrongKeyType { key: key.into(), expected: "string array" };
        let arr = self.require(key)?.as_array().ok_or_else(wrong)?;
        arr.iter().map(|v| v.as_str().ok_or_else(wrong)).collect()
    }
}

fn absurd(what: &str, value: u64) -> LoadError {
    LoadError::Absurd { what: what.to_string(), value }
}

/// A tensor info before its data offset is resolved.
struct RawTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    offset: u64,
}

impl RawTensor {
    fn locate(self, data_start: u64, alignment: u64, len: u64) -> Result<TensorInfo, LoadError> {
        let bad = |reason: String| LoadError::BadTensor { name: self.name.clone(), reason };
        if !self.offset.is_multiple_of(alignment) {
            return Err(bad(format!("offset {} is not a multiple of the alignment {alignment}", self.offset)));
        }
        let n = self.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let n = n.filter(|&n| n < 1 << 40).ok_or_else(|| bad(format!("dimensions {:?} overflow", self.dims)))?;
        let row = self.dims[0];
        if !row.is_multiple_of(self.ty.block_elems() as u64) {
            return Err(bad(format!("row length {row} is not a multiple of the {} block", self.ty.name())));
        }
        let n_bytes = self.ty.bytes_for(n).expect("checked row divisibility");
        let start = data_start.checked_add(self.offset).ok_or_else(|| absurd("tensor offset", self.offset))?;
        let end = start.saturating_add(n_bytes);
        if end > len {
            return Err(LoadError::TensorOutOfBounds { name: self.name, start, end, len });
        }
        Ok(TensorInfo { name: self.name, dims: self.dims, ty: self.ty, start, n_bytes })
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: u64,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], LoadError> {
        let len = self.buf.len() as u64;
        if n > len.saturating_sub(self.pos) {
            return Err(LoadError::Truncated { what: what.to_string(), offset: self.pos, need: n, len });
        }
        let s = &self.buf[self.pos as usize..(self.pos + n) as usize];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], LoadError> {
        Ok(self.take(N as u64, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, LoadError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, LoadError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn count(&mut self, what: &str) -> Result<u64, LoadError> {
        let n = self.u64(what)?;
        if n > MAX_COUNT {
            return Err(absurd(what, n));
        }
        Ok(n)
    }

    fn string(&mut self, what: &str) -> Result<String, LoadError> {
        let n = self.u64(what)?;
        let bytes = self.take(n, what)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, key: &str, ty: u32, depth: u32) -> Result<Value, LoadError> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => Value::Bool(self.array::<1>(key)?[0] != 0),
            8 => Value::String(self.string(key)?),
            9 if depth == 0 => self.array_value(key)?,
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            _ => return Err(LoadError::UnknownValueType { key: key.to_string(), ty }),
        })
    }

    fn array_value(&mut self, key: &str) -> Result<Value, LoadError> {
        let ty = self.u32(key)?;
        let n = self.u64(key)?;
        // Every element takes at least one byte: a count beyond the bytes left is a lie.
        let left = self.buf.len() as u64 - self.pos;
        if n > left {
            return Err(LoadError::Truncated { what: format!("array {key}"), offset: self.pos, need: n, len: self.buf.len() as u64 });
        }
        let mut items = Vec::with_capacity(n as usize);
        for _ in 0..n {
            items.push(self.value(key, ty, 1)?);
        }
        Ok(Value::Array(items))
    }

    fn tensor_info(&mut self) -> Result<RawTensor, LoadError> {
        let name = self.string("tensor name")?;
        let n_dims = self.u32("tensor rank")?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(LoadError::BadTensor { name, reason: format!("rank {n_dims} (ggml supports 1 to 4)") });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = self.u64("tensor dimension")?;
            if d == 0 || d > 1 << 32 {
                return Err(LoadError::BadTensor { name, reason: format!("dimension {d}") });
            }
            dims.push(d);
        }
        let ty_id = self.u32("tensor type")?;
        let ty = GgmlType::from_id(ty_id).ok_or_else(|| LoadError::UnknownTensorType {
            name: name.clone(),
            what: unsupported_type_name(ty_id).map_or_else(|| format!("id {ty_id} (unknown)"), |n| format!("{n} (id {ty_id})")),
            supported: GgmlType::ALL.map(GgmlType::name).join(", "),
        })?;
        let offset = self.u64("tensor offset")?;
        Ok(RawTensor { name, dims, ty, offset })
    }
}

/// Writes GGUF v3 files: used by tests to build small and deliberately broken files.
pub mod writer {
    use super::Value;

    pub struct TensorSpec<'a> {
        pub name: &'a str,
        pub dims: Vec<u64>,
        pub ty_id: u32,
        pub data: &'a [u8],
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn put_value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(x) => out.push(*x as u8),
            Value::String(s) => put_str(out, s),
            Value::Array(items) => {
                out.extend_from_slice(&type_id(&items[0]).to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                items.iter().for_each(|i| put_value(out, i));
            }
            other => panic!("writer: unsupported value {other:?}"),
        }
    }

    fn type_id(v: &Value) -> u32 {
        match v {
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            other => panic!("writer: unsupported value {other:?}"),
        }
    }

    /// Serialise a GGUF v3 file with 32-byte alignment.
    pub fn write(metadata: &[(&str, Value)], tensors: &[TensorSpec]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for t in tensors {
            put_str(&mut out, t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            t.dims.iter().for_each(|d| out.extend_from_slice(&d.to_le_bytes()));
            out.extend_from_slice(&t.ty_id.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += (t.data.len() as u64).div_ceil(32) * 32;
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        for t in tensors {
            out.extend_from_slice(t.data);
            out.resize(out.len().div_ceil(32) * 32, 0);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::writer::{TensorSpec, write};
    use super::*;

    fn sample() -> Vec<u8> {
        let data = vec![0u8; 4 * 8];
        write(
            &[("general.architecture", Value::String("llama".into())), ("llama.block_count", Value::U32(2))],
            &[TensorSpec { name: "w", dims: vec![4, 2], ty_id: 0, data: &data }],
        )
    }

    #[test]
    fn parses_what_the_writer_wrote() {
        let g = Gguf::from_bytes(sample()).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.str("general.architecture").unwrap(), "llama");
        assert_eq!(g.u64("llama.block_count").unwrap(), 2);
        let t = g.tensor("w").unwrap();
        assert_eq!(t.shape(), vec![2, 4]);
        assert_eq!(g.tensor_bytes(t).len(), 32);
    }

    #[test]
    fn kept_tensors_read_as_copied_ones_after_pages_are_released() {
        let data: Vec<u8> = (0..32u8).collect();
        let b = write(&[], &[TensorSpec { name: "w", dims: vec![8], ty_id: 0, data: &data }]);
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &b).unwrap();
        let g = Gguf::open(file.path()).unwrap();
        let t = g.tensor("w").unwrap().clone();
        let kept = g.kept_tensor(&t);
        assert!(matches!(kept, FileBytes::Mapped(_)), "a mapped file's tensor is kept mapped");
        g.release_pages();
        assert_eq!(&*kept, &data[..]);
        assert_eq!(g.tensor_bytes(&t), &data[..]);
        drop(g);
        // The bytes outlive the parsed file: they hold the mapping.
        assert_eq!(&*kept, &data[..]);
        let in_memory = Gguf::from_bytes(b).unwrap();
        let copied = in_memory.kept_tensor(&t);
        assert!(matches!(copied, FileBytes::Owned(_)), "bytes in memory are copied");
        assert_eq!(&*copied, &data[..]);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let full = sample();
        for cut in 0..full.len() - 1 {
            // Cuts inside the final tensor's data are caught by the bounds check.
            assert!(Gguf::from_bytes(full[..cut].to_vec()).is_err(), "cut at {cut} parsed");
        }
    }

    #[test]
    fn bad_magic_and_version() {
        let mut b = sample();
        b[0] = b'X';
        assert!(matches!(Gguf::from_bytes(b), Err(LoadError::BadMagic { .. })));
        let mut b = sample();
        b[4] = 9;
        assert!(matches!(Gguf::from_bytes(b), Err(LoadError::UnsupportedVersion(9))));
    }

    #[test]
    fn unknown_tensor_type_is_named() {
        let data = vec![0u8; 32];
        let b = write(&[], &[TensorSpec { name: "odd", dims: vec![8], ty_id: 99, data: &data }]);
        let e = Gguf::from_bytes(b).err().unwrap().to_string();
        assert!(e.contains("odd") && e.contains("99"), "{e}");
    }

    #[test]
    fn huge_string_length_is_rejected_before_allocating() {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(Gguf::from_bytes(b), Err(LoadError::Truncated { .. })));
    }

    #[test]
    fn absurd_dimensions_are_rejected() {
        let data = vec![0u8; 32];
        let b = write(&[], &[TensorSpec { name: "big", dims: vec![1 << 31, 1 << 31, 1 << 20], ty_id: 0, data: &data }]);
        assert!(Gguf::from_bytes(b).is_err());
    }
}
