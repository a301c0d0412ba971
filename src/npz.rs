//! Reading NumPy `.npz` archives (`np.savez`, `np.savez_compressed`): the real inputs that
//! `scattermoe rewrite --verify --inputs FILE.npz` feeds both models. Only what model inputs
//! need: little-endian (or byte-order-free) numeric arrays in C order.

use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

/// An array's element type, as NumPy's `descr` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    F64,
    I64,
    I32,
    Bool,
}

impl Dtype {
    fn parse(descr: &str) -> Option<Dtype> {
        Some(match descr {
            "<f4" => Dtype::F32,
            "<f2" => Dtype::F16,
            "<f8" => Dtype::F64,
            "<i8" => Dtype::I64,
            "<i4" => Dtype::I32,
            "|b1" => Dtype::Bool,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 => 2,
            Dtype::Bool => 1,
        }
    }

    /// The ONNX element type of the same values.
    pub fn onnx(self) -> i32 {
        match self {
            Dtype::F32 => 1,
            Dtype::F16 => 10,
            Dtype::F64 => 11,
            Dtype::I64 => 7,
            Dtype::I32 => 6,
            Dtype::Bool => 9,
        }
    }
}

/// One array of the archive: its name (the file name without `.npy`), type, shape and bytes
/// (little-endian, C order).
#[derive(Debug, Clone)]
pub struct Array {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Every array of `path`, in archive order.
pub fn read(path: &Path) -> Result<Vec<Array>> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| anyhow!("{} is not an .npz archive (np.savez): {e}", path.display()))?;
    let mut out = Vec::new();
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| anyhow!("{}: entry {i}: {e}", path.display()))?;
        let file = entry.name().to_string();
        let Some(name) = file.strip_suffix(".npy") else {
            bail!("{}: '{file}' is not an .npy array", path.display());
        };
        let mut bytes = Vec::with_capacity(entry.size().min(1 << 30) as usize);
        entry.read_to_end(&mut bytes).map_err(|e| anyhow!("{}: cannot read '{file}': {e}", path.display()))?;
        out.push(parse_npy(name, &bytes).with_context(|| format!("{}: array '{name}'", path.display()))?);
    }
    Ok(out)
}

/// One `.npy` file: magic, version, header dict, data.
pub fn parse_npy(name: &str, b: &[u8]) -> Result<Array> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        bail!("not an .npy array (no NUMPY magic)");
    }
    let (header_len, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => bail!(".npy version {v} is not supported"),
    };
    let header = b.get(start..start + header_len).ok_or_else(|| anyhow!("the .npy header is truncated"))?;
    let header = std::str::from_utf8(header).map_err(|_| anyhow!("the .npy header is not text"))?;
    let descr = dict_value(header, "descr").ok_or_else(|| anyhow!("the .npy header has no descr"))?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let dtype =
        Dtype::parse(descr).ok_or_else(|| anyhow!("dtype '{descr}' is not supported (float32, float16, float64, int64, int32, bool, little-endian)"))?;
    if dict_value(header, "fortran_order").is_some_and(|v| v.starts_with("True")) {
        bail!("the array is in Fortran order: save np.ascontiguousarray(a) instead");
    }
    let shape_text = dict_value(header, "shape").ok_or_else(|| anyhow!("the .npy header has no shape"))?;
    let inner = shape_text.trim().trim_start_matches('(');
    let inner = &inner[..inner.find(')').ok_or_else(|| anyhow!("the .npy shape is not a tuple"))?];
    let shape: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| anyhow!("the .npy shape '{shape_text}' is not a tuple of sizes")))
        .collect::<Result<_>>()?;
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| anyhow!("the shape {shape:?} overflows"))?;
    let want = numel.checked_mul(dtype.size()).ok_or_else(|| anyhow!("the shape {shape:?} overflows"))?;
    let data = &b[start + header_len..];
    if data.len() != want {
        bail!("{} bytes of data for shape {shape:?} of {descr} ({want} expected): truncated or corrupt", data.len());
    }
    Ok(Array { name: name.to_string(), dtype, shape, data: data.to_vec() })
}

/// The text after `'key':` in a Python dict literal, up to the end of the dict.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'")).or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = &header[at + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    // the value ends at the next top-level comma (a shape tuple holds commas inside parentheses)
    if rest.starts_with('(') {
        return Some(&rest[..=rest.find(')')?]);
    }
    Some(rest[..rest.find(',').unwrap_or(rest.len())].trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(header: &str, data: &[u8]) -> Vec<u8> {
        let mut h = header.to_string();
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn parses_numpy_headers_and_refuses_what_it_cannot_read() {
        let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let a = parse_npy("x", &npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", &data)).unwrap();
        assert_eq!((a.dtype, a.shape.clone(), a.data.len()), (Dtype::F32, vec![2, 3], 24));
        let s = parse_npy("s", &npy("{'descr': '<i8', 'fortran_order': False, 'shape': (), }", &7i64.to_le_bytes())).unwrap();
        assert!(s.shape.is_empty());
        let one = parse_npy("o", &npy("{'descr': '<i4', 'fortran_order': False, 'shape': (3,), }", &[0u8; 12])).unwrap();
        assert_eq!(one.shape, vec![3]);
        let e = parse_npy("b", &npy("{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }", &[0u8; 4])).unwrap_err();
        assert!(e.to_string().contains("'>f4' is not supported"), "{e}");
        let e = parse_npy("t", &npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", &data[..8])).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let e = parse_npy("f", &npy("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", &data)).unwrap_err();
        assert!(e.to_string().contains("Fortran"), "{e}");
    }
}
