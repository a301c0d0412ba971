//! The op's stacked codes, scales and zero points for one projection matched through
//! `DequantizeLinear`, produced while the model is saved (one expert at a time for the codes).

use std::sync::Arc;

use anyhow::bail;
use onnx_protobuf::TensorProto;

use super::{OpFormat, Proj, QTensor, QWeight};
use crate::onnx::tensor::{encode_f32, is_external, tensor_f32, ExternalStore};
use crate::rewrite::dequant::{self, code_values, unsigned_code, Dq};

const FLOAT: i32 = 1;

/// What the producers need of one part, owned.
#[derive(Clone)]
struct Src {
    codes: Arc<TensorProto>,
    scale: Arc<TensorProto>,
    zero: Option<Arc<TensorProto>>,
    /// a copy of the node's reading of its scale (for `scale_index`), with owned tensors
    granularity: dequant::Granularity,
    index: Option<usize>,
    transposed: bool,
    out: usize,
    inp: usize,
}

impl Src {
    fn of(dq: &Dq, index: Option<usize>, transposed: bool, out: usize, inp: usize) -> Src {
        Src {
            codes: Arc::new(dq.codes.clone()),
            scale: Arc::new(dq.scale.clone()),
            zero: dq.zero_point.map(|z| Arc::new(z.clone())),
            granularity: dq.granularity,
            index,
            transposed,
            out,
            inp,
        }
    }

    fn coord(&self, o: usize, i: usize) -> Vec<usize> {
        let (r, c) = if self.transposed { (i, o) } else { (o, i) };
        match self.index {
            Some(e) => vec![e, r, c],
            None => vec![r, c],
        }
    }

    fn scale_index(&self, coord: &[usize]) -> usize {
        match self.granularity {
            dequant::Granularity::Tensor => 0,
            dequant::Granularity::Axis(a) => coord[a],
            dequant::Granularity::Blocked { axis, block } => coord.iter().enumerate().fold(0usize, |idx, (j, &c)| {
                let n = self.scale.dims[j] as usize;
                idx * n + if j == axis { c / block } else { c }
            }),
        }
    }

    /// This part's codes for its expert as op codes (unsigned, one a byte), row-major `[out, in]`.
    fn codes(&self, ext: &ExternalStore) -> anyhow::Result<Vec<u8>> {
        let (r, c) = if self.transposed { (self.inp, self.out) } else { (self.out, self.inp) };
        let base = self.index.unwrap_or(0) * r * c;
        let m = code_slice(&self.codes, ext, base, r * c)?;
        let ty = self.codes.data_type;
        let mut v = Vec::with_capacity(r * c);
        for o in 0..self.out {
            for i in 0..self.inp {
                v.push(unsigned_code(ty, m[if self.transposed { i * c + o } else { o * c + i }]));
            }
        }
        Ok(v)
    }
}

/// Elements [start, start + len) of a tensor of codes, one a byte in the tensor's encoding
/// (int4 nibbles sign-extended), read from the mapped or inline bytes without reading the rest.
fn code_slice(t: &TensorProto, ext: &ExternalStore, start: usize, len: usize) -> anyhow::Result<Vec<u8>> {
    let four = dequant::code_bits(t.data_type) == 4;
    let n = crate::onnx::tensor::numel(&t.dims);
    if start + len > n {
        bail!("tensor '{}': elements {start}..{} are outside its {n}", t.name, start + len);
    }
    let bytes: &[u8] = if is_external(t) {
        ext.bytes(t)?
    } else if !t.raw_data.is_empty() {
        &t.raw_data
    } else {
        return Ok(code_values(t, Some(ext))?[start..start + len].to_vec());
    };
    let stored = if four { n.div_ceil(2) } else { n };
    if bytes.len() != stored {
        bail!("tensor '{}' holds {} bytes, its shape {:?} needs {stored}", t.name, bytes.len(), t.dims);
    }
    if !four {
        return Ok(bytes[start..start + len].to_vec());
    }
    Ok((start..start + len)
        .map(|j| {
            let nib = (bytes[j / 2] >> (4 * (j % 2))) & 15;
            if t.data_type == dequant::INT4 {
                ((nib << 4) as i8 >> 4) as u8
            } else {
                nib
            }
        })
        .collect())
}

/// One projection's op inputs. `block_size` is the node's; `elem` its T.
pub(super) fn weight(p: &Proj, block_size: Option<[usize; 2]>, elem: i32) -> Result<QWeight, String> {
    let parts: Vec<&super::Part> = p.experts.iter().flatten().collect();
    for x in &parts {
        if x.dq.out_elem != elem && x.dq.out_elem != FLOAT {
            return Err(format!(
                "weight '{}': DequantizeLinear gives {} weights while the experts compute in {}; the op would not round them to {0}",
                x.dq.output,
                crate::spec::onnx_type_name(x.dq.out_elem),
                crate::spec::onnx_type_name(elem)
            ));
        }
    }
    let scale_type = if parts.iter().all(|x| x.dq.scale.data_type == elem) { elem } else { FLOAT };
    let has_zero = parts.iter().any(|x| x.dq.zero_point.is_some());
    let zero_point = match p.format {
        OpFormat::Fp8 => {
            for x in &parts {
                if let Some(z) = x.dq.zero_point {
                    let v = code_values(z, None).map_err(|e| e.to_string())?;
                    if v.iter().any(|&b| b & 0x7f != 0) {
                        return Err(format!("weight '{}': a float8 zero point other than 0 (the op takes none for float8 codes)", x.dq.output));
                    }
                }
            }
            false
        }
        OpFormat::Int8 => has_zero || parts.iter().any(|x| x.dq.codes.data_type != dequant::INT8),
        OpFormat::Int4 => has_zero || parts.iter().any(|x| x.dq.codes.data_type != dequant::INT4),
    };
    let e_count = p.experts.len();
    let srcs: Vec<Vec<Src>> = p.experts.iter().map(|e| e.iter().map(|x| Src::of(&x.dq, x.index, x.transposed, x.out, x.inp)).collect()).collect();
    let srcs = Arc::new(srcs);
    let (out, inp, format) = (p.out, p.inp, p.format);
    // --- codes [E, out, in] (4-bit: [E, out, ceil(in / 2)])
    let stored_in = if format == OpFormat::Int4 { inp.div_ceil(2) } else { inp };
    let code_type = if format == OpFormat::Fp8 { dequant::FLOAT8E4M3FN } else { dequant::UINT8 };
    let s = srcs.clone();
    let codes = QTensor::New {
        what: "codes",
        data_type: code_type,
        dims: vec![e_count as i64, out as i64, stored_in as i64],
        produce: Arc::new(move |ext, sink| {
            for e in s.iter() {
                for x in e {
                    let v = x.codes(ext)?;
                    if format == OpFormat::Int4 {
                        let mut packed = vec![0u8; x.out * stored_in];
                        for o in 0..x.out {
                            for i in 0..inp {
                                packed[o * stored_in + i / 2] |= (v[o * inp + i] & 15) << (4 * (i % 2));
                            }
                        }
                        sink(&packed)?;
                    } else {
                        sink(&v)?;
                    }
                }
            }
            Ok(())
        }),
    };
    // --- scale and zero point: one value per block of the op's layout, read at the block's first code
    let (bo, bi) = match (p.blocked, block_size) {
        (true, Some([o, i])) => (o, i),
        _ => (1, inp.max(1)),
    };
    let grid = move |x: &Src| -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        for ko in 0..x.out.div_ceil(bo) {
            for ki in 0..inp.div_ceil(bi) {
                v.push((ko * bo, ki * bi));
            }
        }
        v
    };
    let rows = out.div_ceil(bo);
    let dims: Vec<i64> = if p.blocked { vec![e_count as i64, rows as i64, inp.div_ceil(bi) as i64] } else { vec![e_count as i64, out as i64] };
    let s = srcs.clone();
    let scale = QTensor::New {
        what: "scale",
        data_type: scale_type,
        dims: dims.clone(),
        produce: Arc::new(move |_ext, sink| {
            let mut cache: Vec<(*const TensorProto, Vec<f32>)> = Vec::new();
            let mut buf = Vec::new();
            for e in s.iter() {
                for x in e {
                    let key = Arc::as_ptr(&x.scale);
                    if !cache.iter().any(|(k, _)| *k == key) {
                        cache.push((key, tensor_f32(&x.scale, Some(_ext))?));
                    }
                    let vals = &cache.iter().find(|(k, _)| *k == key).unwrap().1;
                    let v: Vec<f32> = grid(x).into_iter().map(|(o, i)| vals[x.scale_index(&x.coord(o, i))]).collect();
                    buf.clear();
                    encode_f32(&v, scale_type, &mut buf);
                    sink(&buf)?;
                }
            }
            Ok(())
        }),
    };
    let zero_point = zero_point.then(|| {
        let s = srcs.clone();
        QTensor::New {
            what: "zero_point",
            data_type: dequant::UINT8,
            dims,
            produce: Arc::new(move |ext, sink| {
                for e in s.iter() {
                    for x in e {
                        let ty = x.codes.data_type;
                        let vals = match &x.zero {
                            Some(z) => code_values(z, Some(ext))?,
                            None => Vec::new(),
                        };
                        let v: Vec<u8> = grid(x)
                            .into_iter()
                            .map(|(o, i)| unsigned_code(ty, if vals.is_empty() { 0 } else { vals[x.scale_index(&x.coord(o, i))] }))
                            .collect();
                        sink(&v)?;
                    }
                }
                Ok(())
            }),
        }
    });
    Ok(QWeight { format, codes, scale, zero_point, blocked: p.blocked })
}
