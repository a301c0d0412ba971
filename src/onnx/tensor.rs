//! Tensor data: where an initializer's bytes live (inline, typed fields, or memory-mapped external
//! data) and reading them as f32 / i64 arrays.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::TensorProto;

use crate::spec::onnx_type_name;

pub const FLOAT: i32 = 1;
pub const UINT8: i32 = 2;
pub const INT8: i32 = 3;
pub const INT32: i32 = 6;
pub const INT64: i32 = 7;
pub const BOOL: i32 = 9;
pub const FLOAT16: i32 = 10;
pub const DOUBLE: i32 = 11;
pub const BFLOAT16: i32 = 16;
/// Quantized expert weights (docs/op-spec.md): one byte a value, like UINT8.
pub const FLOAT8E4M3FN: i32 = 17;

/// Bytes per element of the fixed-width types we read or write.
pub fn elem_size(data_type: i32) -> Option<usize> {
    Some(match data_type {
        FLOAT | INT32 => 4,
        UINT8 | INT8 | BOOL | FLOAT8E4M3FN => 1,
        4 | 5 | FLOAT16 | BFLOAT16 => 2,
        INT64 | DOUBLE | 13 => 8,
        12 => 4,
        _ => return None,
    })
}

/// Element count of a shape; saturates at `usize::MAX` (so a size check against real bytes fails
/// rather than wrapping to a small number). Use [`checked_numel`] where an error must be reported.
pub fn numel(dims: &[i64]) -> usize {
    checked_numel(dims).unwrap_or(usize::MAX)
}

/// Element count of a shape, or None when a dimension is negative or the product overflows
/// (dims [2^61, 8, 1] would wrap to 0 with plain multiplication and pass every size check).
pub fn checked_numel(dims: &[i64]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
}

/// Byte size of tensor `name` of `data_type` and shape `dims`, with an error naming the tensor
/// when the shape is invalid or its size does not fit in memory.
pub fn checked_byte_size(name: &str, data_type: i32, dims: &[i64]) -> Result<usize> {
    let esz = elem_size(data_type)
        .ok_or_else(|| anyhow!("tensor '{name}' has element type {} which is not supported here", onnx_type_name(data_type)))?;
    if let Some(d) = dims.iter().find(|&&d| d < 0) {
        bail!("tensor '{name}' has a negative dimension {d} in its shape {dims:?}");
    }
    checked_numel(dims)
        .and_then(|n| n.checked_mul(esz))
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or_else(|| anyhow!("tensor '{name}': shape {dims:?} of {} has more bytes than can be addressed", onnx_type_name(data_type)))
}

/// Checks that a tensor stored in the model holds exactly as many elements as its shape says
/// (raw_data bytes, or typed entries), without reading them: a declared [32, 2^31] over 512 bytes
/// is refused at load, as ONNX Runtime refuses it, instead of reaching a pass that sizes work by
/// the shape. The shape's byte count must be addressable ([`checked_byte_size`]) in every case;
/// external data is checked against its file elsewhere; element types this crate does
/// not read (strings, 4-bit) are not checked.
pub fn check_stored_size(t: &TensorProto) -> Result<()> {
    let Some(esz) = elem_size(t.data_type) else { return Ok(()) };
    let n = checked_byte_size(&t.name, t.data_type, &t.dims)? / esz;
    if is_external(t) {
        return Ok(());
    }
    if !t.raw_data.is_empty() {
        if t.raw_data.len() != n * esz {
            bail!("tensor '{}': raw_data holds {} bytes, its shape {:?} of {} needs {}", t.name, t.raw_data.len(), t.dims, onnx_type_name(t.data_type), n * esz);
        }
        return Ok(());
    }
    let present = match t.data_type {
        FLOAT => t.float_data.len(),
        DOUBLE => t.double_data.len(),
        INT64 => t.int64_data.len(),
        12 | 13 => t.uint64_data.len(),
        _ => t.int32_data.len(),
    };
    if present != n {
        bail!("tensor '{}': holds {present} elements, its shape {:?} needs {n}", t.name, t.dims);
    }
    Ok(())
}

/// Where a tensor's external data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalRef {
    pub location: String,
    pub offset: usize,
    pub length: Option<usize>,
}

pub fn is_external(t: &TensorProto) -> bool {
    t.data_location.enum_value_or_default() == DataLocation::EXTERNAL
}

pub fn external_ref(t: &TensorProto) -> Result<ExternalRef> {
    let mut location = None;
    let mut offset = 0usize;
    let mut length = None;
    for e in &t.external_data {
        match e.key.as_str() {
            "location" => location = Some(e.value.clone()),
            "offset" => offset = e.value.parse().with_context(|| format!("tensor '{}': bad external offset '{}'", t.name, e.value))?,
            "length" => {
                length = Some(e.value.parse().with_context(|| format!("tensor '{}': bad external length '{}'", t.name, e.value))?)
            }
            _ => {}
        }
    }
    let location = location.ok_or_else(|| anyhow!("tensor '{}' is marked external but names no location", t.name))?;
    Ok(ExternalRef { location, offset, length })
}

/// Resolves an external-data `location` against the model's folder `base` the way ONNX Runtime
/// does: a relative path, which after following every symlink (canonicalize) still lies inside
/// the model's folder and names a regular file. Folders, FIFOs, sockets and devices are refused by
/// their type before anything opens them (opening a FIFO for reading would block forever).
pub fn resolve_location(base: &Path, location: &str) -> Result<PathBuf> {
    let rel = Path::new(location);
    if location.is_empty() {
        bail!("external data location is empty");
    }
    if location.contains('\0') {
        bail!("external data location '{}' contains a NUL byte", location.escape_debug());
    }
    if rel.is_absolute() || rel.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        bail!("external data location '{location}' must be a relative path inside the model's directory");
    }
    let joined = base.join(rel);
    let base_real = base.canonicalize().with_context(|| format!("cannot resolve the model's directory {}", base.display()))?;
    // symlink_metadata first: a dangling link is reported as such rather than as "missing".
    fs::symlink_metadata(&joined).with_context(|| format!("cannot open external data file {}", joined.display()))?;
    let real = joined
        .canonicalize()
        .with_context(|| format!("external data location '{location}' ({}) cannot be resolved (a dangling symlink?)", joined.display()))?;
    if !real.starts_with(&base_real) {
        bail!(
            "external data location '{location}' resolves to {}, outside the model's directory {} (through a symlink); refused",
            real.display(),
            base_real.display()
        );
    }
    let meta = fs::metadata(&real).with_context(|| format!("cannot stat external data file {}", real.display()))?;
    let ft = meta.file_type();
    if !ft.is_file() {
        bail!("external data location '{location}' ({}) is {}, not a regular file; refused", real.display(), file_kind(ft));
    }
    Ok(real)
}

/// Words for a file type in error messages.
pub fn file_kind(ft: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO (named pipe)"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_symlink() {
        "a symlink"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// Memory-mapped external data files of one model, opened on first use.
#[derive(Default)]
pub struct ExternalStore {
    base: PathBuf,
    maps: Mutex<HashMap<String, &'static Mmap>>,
}

impl ExternalStore {
    pub fn new(base: &Path) -> Self {
        ExternalStore { base: base.to_path_buf(), maps: Mutex::new(HashMap::new()) }
    }

    pub fn base(&self) -> &Path {
        &self.base
    }

    fn map(&self, location: &str) -> Result<&'static Mmap> {
        let mut maps = self.maps.lock().unwrap();
        if let Some(m) = maps.get(location) {
            return Ok(m);
        }
        let path = resolve_location(&self.base, location)?;
        let file = File::open(&path).with_context(|| format!("cannot open external data file {}", path.display()))?;
        // SAFETY: the file is mapped read-only; we never write it while the map lives.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot memory-map {}", path.display()))?;
        // The maps live as long as the process's model; leaking keeps slices simple to hand out.
        let map: &'static Mmap = Box::leak(Box::new(map));
        maps.insert(location.to_string(), map);
        Ok(map)
    }

    /// Drops the pages of `s` (a slice handed out by [`ExternalStore::bytes`]) from this process's
    /// memory: they stay in the page cache and fault back in from the file if read again, so a
    /// streamed copy of a large model keeps its resident set small.
    pub fn release(&self, s: &[u8]) {
        if s.is_empty() {
            return;
        }
        let maps = self.maps.lock().unwrap();
        for m in maps.values() {
            let base = m.as_ptr() as usize;
            let p = s.as_ptr() as usize;
            if p >= base && p + s.len() <= base + m.len() {
                // SAFETY: the mapping is a read-only view of a file nobody writes while we run;
                // MADV_DONTNEED only discards resident pages, which re-fault from the file.
                let _ = unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, p - base, s.len()) };
                return;
            }
        }
    }

    /// The external bytes of `t`, bounds-checked against the file and the tensor's size.
    pub fn bytes(&self, t: &TensorProto) -> Result<&'static [u8]> {
        let r = external_ref(t)?;
        let map = self.map(&r.location)?;
        let need = match elem_size(t.data_type) {
            Some(_) => Some(checked_byte_size(&t.name, t.data_type, &t.dims)?),
            None => None,
        };
        let len = match (r.length, need) {
            (Some(l), _) => l,
            (None, Some(n)) => n,
            (None, None) => map.len().saturating_sub(r.offset),
        };
        if let Some(n) = need {
            if n != len {
                bail!("tensor '{}': external length {len} bytes does not match its shape {:?} ({} bytes)", t.name, t.dims, n);
            }
        }
        let end = r.offset.checked_add(len).ok_or_else(|| anyhow!("tensor '{}': external offset overflows", t.name))?;
        if end > map.len() {
            bail!(
                "tensor '{}': external data file '{}' holds {} bytes but the tensor needs bytes {}..{} (truncated file?)",
                t.name, r.location, map.len(), r.offset, end
            );
        }
        Ok(&map[r.offset..end])
    }
}

/// The little-endian bytes of a tensor of a fixed-width type, from wherever they are stored.
pub fn tensor_bytes<'a>(t: &'a TensorProto, ext: Option<&ExternalStore>) -> Result<Cow<'a, [u8]>> {
    let esz = elem_size(t.data_type)
        .ok_or_else(|| anyhow!("tensor '{}' has element type {} which is not supported here", t.name, onnx_type_name(t.data_type)))?;
    let n = checked_byte_size(&t.name, t.data_type, &t.dims)? / esz;
    if is_external(t) {
        let ext = ext.ok_or_else(|| anyhow!("tensor '{}' has external data but no model directory is known", t.name))?;
        return Ok(Cow::Borrowed(ext.bytes(t)?));
    }
    // the stored data fills the shape exactly (so nothing below allocates by a claimed shape)
    check_stored_size(t)?;
    if !t.raw_data.is_empty() || n == 0 {
        return Ok(Cow::Borrowed(&t.raw_data));
    }
    let mut out = Vec::with_capacity(n * esz);
    match t.data_type {
        FLOAT => t.float_data.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DOUBLE => t.double_data.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        INT64 => t.int64_data.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        13 => t.uint64_data.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        12 => t.uint64_data.iter().for_each(|v| out.extend_from_slice(&(*v as u32).to_le_bytes())),
        INT32 => t.int32_data.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        // int32_data holds one element per entry for the narrower types (f16/bf16 as bit patterns).
        4 | 5 | FLOAT16 | BFLOAT16 => t.int32_data.iter().for_each(|v| out.extend_from_slice(&(*v as u16).to_le_bytes())),
        UINT8 | INT8 | BOOL | FLOAT8E4M3FN => t.int32_data.iter().for_each(|v| out.push(*v as u8)),
        _ => unreachable!(),
    }
    Ok(Cow::Owned(out))
}

/// Reads a float tensor (f32, f16, bf16, f64) as f32.
pub fn tensor_f32(t: &TensorProto, ext: Option<&ExternalStore>) -> Result<Vec<f32>> {
    let b = tensor_bytes(t, ext)?;
    Ok(match t.data_type {
        FLOAT => b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        FLOAT16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        BFLOAT16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        DOUBLE => b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
        INT64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
        INT32 => b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
        other => bail!("tensor '{}' is {}, not a float tensor", t.name, onnx_type_name(other)),
    })
}

/// Reads an integer tensor (int64, int32, int8, uint8, bool) as i64.
pub fn tensor_i64(t: &TensorProto, ext: Option<&ExternalStore>) -> Result<Vec<i64>> {
    let b = tensor_bytes(t, ext)?;
    Ok(match t.data_type {
        INT64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(),
        INT32 => b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
        INT8 => b.iter().map(|&v| v as i8 as i64).collect(),
        UINT8 | BOOL => b.iter().map(|&v| v as i64).collect(),
        other => bail!("tensor '{}' is {}, not an integer tensor", t.name, onnx_type_name(other)),
    })
}

/// Encodes f32 values as little-endian bytes of a float type.
pub fn encode_f32(values: &[f32], data_type: i32, out: &mut Vec<u8>) {
    match data_type {
        FLOAT => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        FLOAT16 => values.iter().for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        BFLOAT16 => values.iter().for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        DOUBLE => values.iter().for_each(|v| out.extend_from_slice(&(*v as f64).to_le_bytes())),
        _ => panic!("encode_f32: not a float type {data_type}"),
    }
}

/// A small tensor with inline raw data.
pub fn make_tensor(name: &str, data_type: i32, dims: &[i64], raw: Vec<u8>) -> TensorProto {
    let mut t = TensorProto::new();
    t.name = name.to_string();
    t.data_type = data_type;
    t.dims = dims.to_vec();
    t.raw_data = raw;
    t
}

pub fn make_i64(name: &str, dims: &[i64], values: &[i64]) -> TensorProto {
    let mut raw = Vec::with_capacity(values.len() * 8);
    values.iter().for_each(|v| raw.extend_from_slice(&v.to_le_bytes()));
    make_tensor(name, INT64, dims, raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_tensors_read_as_f32_from_raw_and_typed_fields() {
        let vals = [1.5f32, -2.25, 0.0, 65504.0];
        let mut raw = Vec::new();
        encode_f32(&vals, FLOAT16, &mut raw);
        let t = make_tensor("h", FLOAT16, &[4], raw);
        assert_eq!(tensor_f32(&t, None).unwrap(), vals);
        let mut raw = Vec::new();
        encode_f32(&vals[..3], BFLOAT16, &mut raw);
        assert_eq!(tensor_f32(&make_tensor("b", BFLOAT16, &[3], raw), None).unwrap(), &vals[..3]);
        // f16 bit patterns in int32_data
        let mut t = TensorProto::new();
        t.data_type = FLOAT16;
        t.dims = vec![2];
        t.int32_data = vec![half::f16::from_f32(3.0).to_bits() as i32, half::f16::from_f32(-0.5).to_bits() as i32];
        assert_eq!(tensor_f32(&t, None).unwrap(), [3.0, -0.5]);
        let mut t = TensorProto::new();
        t.data_type = FLOAT;
        t.dims = vec![2, 1];
        t.float_data = vec![7.0, 8.0];
        assert_eq!(tensor_f32(&t, None).unwrap(), [7.0, 8.0]);
        assert_eq!(tensor_i64(&make_i64("i", &[2], &[-3, 9]), None).unwrap(), [-3, 9]);
    }

    #[test]
    fn sizes_that_disagree_with_the_shape_are_errors() {
        let t = make_tensor("x", FLOAT, &[3], vec![0u8; 8]);
        let e = tensor_f32(&t, None).unwrap_err().to_string();
        assert!(e.contains("'x'") && e.contains("needs 12"), "{e}");
    }

    #[test]
    fn truncated_external_data_is_reported() {
        let dir = std::env::temp_dir().join(format!("scattermoe-ext-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("w.bin"), vec![0u8; 10]).unwrap();
        let mut t = TensorProto::new();
        t.name = "w".into();
        t.data_type = FLOAT;
        t.dims = vec![4];
        t.data_location = DataLocation::EXTERNAL.into();
        let mut e = onnx_protobuf::StringStringEntryProto::new();
        e.key = "location".into();
        e.value = "w.bin".into();
        t.external_data.push(e);
        let store = ExternalStore::new(&dir);
        let err = store.bytes(&t).unwrap_err().to_string();
        assert!(err.contains("truncated") && err.contains("w.bin"), "{err}");
        let mut t2 = t.clone();
        t2.external_data[0].value = "../escape.bin".into();
        assert!(store.bytes(&t2).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
