//! Shared test helpers: the fixtures under models/ and their torch reference outputs (.npz).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub mod build;

pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
}

/// Every fixture name (models/*.onnx), sorted.
pub fn fixtures() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(models_dir())
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".onnx")).map(String::from))
        .collect();
    v.sort();
    v
}

/// One array of an .npz: shape, element type ('f4', 'f2', 'i8'), values as f64.
#[derive(Debug, Clone)]
pub struct Array {
    pub shape: Vec<usize>,
    pub dtype: String,
    pub data: Vec<f64>,
}

/// Reads an uncompressed .npz (numpy.savez): zip entries stored, zip64 sizes allowed.
pub fn read_npz(path: &Path) -> Vec<(String, Array)> {
    let b = std::fs::read(path).unwrap();
    let u16at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]) as usize;
    let u32at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap()) as usize;
    let u64at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap()) as usize;
    let mut out = Vec::new();
    let mut p = 0;
    while p + 30 <= b.len() && u32at(p) == 0x0403_4b50 {
        assert_eq!(u16at(p + 8), 0, "{}: compressed entries are not supported", path.display());
        let mut size = u32at(p + 18);
        let name_len = u16at(p + 26);
        let extra_len = u16at(p + 28);
        let name = String::from_utf8_lossy(&b[p + 30..p + 30 + name_len]).to_string();
        let extra = p + 30 + name_len;
        if size == 0xFFFF_FFFF {
            let mut e = extra;
            while e + 4 <= extra + extra_len {
                let (id, len) = (u16at(e), u16at(e + 2));
                if id == 1 {
                    size = u64at(e + 12); // uncompressed, then compressed size
                }
                e += 4 + len;
            }
        }
        let data = &b[extra + extra_len..extra + extra_len + size];
        out.push((name.trim_end_matches(".npy").to_string(), parse_npy(data)));
        p = extra + extra_len + size;
    }
    out
}

fn parse_npy(d: &[u8]) -> Array {
    assert_eq!(&d[..6], b"\x93NUMPY");
    let (hlen, start) = if d[6] == 1 { (u16::from_le_bytes([d[8], d[9]]) as usize, 10) } else { (u32::from_le_bytes(d[8..12].try_into().unwrap()) as usize, 12) };
    let header = String::from_utf8_lossy(&d[start..start + hlen]).to_string();
    let body = &d[start + hlen..];
    let descr = header.split("'descr': '").nth(1).unwrap().split('\'').next().unwrap().to_string();
    assert!(header.contains("'fortran_order': False"));
    let shape_s = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape: Vec<usize> = shape_s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
    let dtype = descr.trim_start_matches(['<', '|', '=']).to_string();
    let data: Vec<f64> = match dtype.as_str() {
        "f4" => body.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        "f2" => body.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
        "f8" => body.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
        "i8" => body.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        other => panic!("npy dtype {other} not supported"),
    };
    Array { shape, dtype, data }
}

/// A fresh, empty directory under the system temp dir.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("scattermoe-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
