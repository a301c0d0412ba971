//! Expert weights that reach their products through `DequantizeLinear`: what every rule takes for
//! "a constant weight" is an initializer, or `DequantizeLinear(codes, scale[, zero point])` of
//! initializers. This module reads such a node (its codes, scale and zero point, and how the scale
//! is laid over the codes); the rules ask [`weight_dims`] where they used to ask an initializer's
//! dims, and `quant.rs` turns the weights they matched into the op's quantized inputs.
//!
//! ONNX's `DequantizeLinear` computes `y = (x - zero_point) * scale`, in the scale's type (or
//! `output_dtype` where given). The scale is per tensor (one value), per axis (a 1-D scale along
//! `axis`, opset 13), or blocked (opset 21: the scale has the codes' rank, and `block_size`
//! consecutive codes along `axis` share one value). The codes are int8, uint8, int4, uint4 or
//! float8e4m3fn here (other code types are left); the zero point has the codes' type and the
//! scale's shape, and is 0 when absent.

use onnx_protobuf::{NodeProto, TensorProto};

use crate::onnx::graph::{attr_i, GraphIndex};

pub const INT8: i32 = 3;
pub const UINT8: i32 = 2;
pub const INT4: i32 = 22;
pub const UINT4: i32 = 21;
pub const FLOAT8E4M3FN: i32 = 17;

/// How a `DequantizeLinear`'s scale is laid over its codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    /// one scale for the whole tensor
    Tensor,
    /// a 1-D scale along this axis of the codes
    Axis(usize),
    /// `block` consecutive codes along this axis share a scale (the scale has the codes' rank)
    Blocked { axis: usize, block: usize },
}

/// A `DequantizeLinear` of constants.
#[derive(Debug, Clone)]
pub struct Dq<'g> {
    /// the node's output (the weight value the graph's products read)
    pub output: String,
    pub codes: &'g TensorProto,
    pub scale: &'g TensorProto,
    pub zero_point: Option<&'g TensorProto>,
    pub granularity: Granularity,
    /// the element type of the dequantized weight
    pub out_elem: i32,
}

impl Dq<'_> {
    /// The codes' (logical) dims.
    pub fn dims(&self) -> &[i64] {
        &self.codes.dims
    }

    /// The index into the scale (and zero point) of the code at `coord` (one entry per axis).
    pub fn scale_index(&self, coord: &[usize]) -> usize {
        match self.granularity {
            Granularity::Tensor => 0,
            Granularity::Axis(a) => coord[a],
            Granularity::Blocked { axis, block } => {
                let mut idx = 0usize;
                for (j, &c) in coord.iter().enumerate() {
                    let (c, n) = if j == axis { (c / block, self.scale.dims[j] as usize) } else { (c, self.scale.dims[j] as usize) };
                    idx = idx * n + c;
                }
                idx
            }
        }
    }
}

fn is_dq(n: &NodeProto) -> bool {
    n.op_type == "DequantizeLinear" && (n.domain.is_empty() || n.domain == "ai.onnx")
}

/// Whether `v` is computed by a `DequantizeLinear` (of anything).
pub fn is_dequantized(g: &GraphIndex, v: &str) -> bool {
    g.prod(v).is_some_and(|(_, n)| is_dq(n))
}

/// The `DequantizeLinear` that computes `v` from constants: None where `v` has no such producer,
/// an error saying why where it has one that this module cannot read (codes that are not
/// constant, a code type other than int8/uint8/int4/uint4/float8e4m3fn, a scale that fits none
/// of the three layouts, a zero point of another shape).
pub fn dequantized<'g>(g: &GraphIndex<'g>, v: &str) -> Option<Result<Dq<'g>, String>> {
    let (_, n) = g.prod(v)?;
    if !is_dq(n) {
        return None;
    }
    Some(read(g, n, v))
}

fn initializer<'g>(g: &GraphIndex<'g>, v: &str, what: &str, w: &str) -> Result<&'g TensorProto, String> {
    match g.const_tensor(v) {
        Some(t) => Ok(t),
        None => {
            let from = g.prod(v).map_or("a graph input".to_string(), |(_, p)| p.op_type.to_string());
            Err(format!("weight '{w}' is DequantizeLinear of {what} that are not constant ('{v}' comes from {from})"))
        }
    }
}

fn read<'g>(g: &GraphIndex<'g>, n: &NodeProto, v: &str) -> Result<Dq<'g>, String> {
    let inp = |i: usize| n.input.get(i).map(String::as_str).unwrap_or("");
    let codes = initializer(g, inp(0), "codes", v)?;
    let scale = initializer(g, inp(1), "scales", v)?;
    let zero_point = if inp(2).is_empty() { None } else { Some(initializer(g, inp(2), "zero points", v)?) };
    if !matches!(codes.data_type, INT8 | UINT8 | INT4 | UINT4 | FLOAT8E4M3FN) {
        return Err(format!(
            "weight '{v}' is DequantizeLinear of {} codes (int8, uint8, int4, uint4 and float8e4m3fn are read)",
            crate::spec::onnx_type_name(codes.data_type)
        ));
    }
    if !matches!(scale.data_type, 1 | 10 | 16) {
        return Err(format!("weight '{v}': DequantizeLinear's scale is {}, not float32/float16/bfloat16", crate::spec::onnx_type_name(scale.data_type)));
    }
    if let Some(z) = zero_point {
        if z.data_type != codes.data_type || z.dims != scale.dims {
            return Err(format!("weight '{v}': DequantizeLinear's zero point is not of the codes' type and the scale's shape"));
        }
    }
    let rank = codes.dims.len();
    let norm = |a: i64| -> Option<usize> {
        let a = if a < 0 { a + rank as i64 } else { a };
        (0..rank as i64).contains(&a).then_some(a as usize)
    };
    let numel = |d: &[i64]| d.iter().product::<i64>();
    let block = attr_i(n, "block_size").unwrap_or(0);
    let axis = attr_i(n, "axis").unwrap_or(1);
    let granularity = if block > 0 {
        let a = norm(axis).ok_or_else(|| format!("weight '{v}': DequantizeLinear's axis {axis} is outside the codes' rank {rank}"))?;
        let want: Vec<i64> = codes.dims.iter().enumerate().map(|(j, &d)| if j == a { (d + block - 1) / block } else { d }).collect();
        if scale.dims != want {
            return Err(format!("weight '{v}': DequantizeLinear's blocked scale is {:?}, not {want:?} (block {block} along axis {a})", scale.dims));
        }
        Granularity::Blocked { axis: a, block: block as usize }
    } else if numel(&scale.dims) == 1 && scale.dims.len() <= 1 {
        Granularity::Tensor
    } else if scale.dims.len() == 1 {
        let a = norm(axis).ok_or_else(|| format!("weight '{v}': DequantizeLinear's axis {axis} is outside the codes' rank {rank}"))?;
        if scale.dims[0] != codes.dims[a] {
            return Err(format!("weight '{v}': DequantizeLinear's scale has {} values, axis {a} of the codes {}", scale.dims[0], codes.dims[a]));
        }
        Granularity::Axis(a)
    } else {
        return Err(format!("weight '{v}': DequantizeLinear's scale {:?} is neither per tensor, per axis nor blocked", scale.dims));
    };
    let out_elem = match attr_i(n, "output_dtype").unwrap_or(0) {
        0 => scale.data_type,
        t => t as i32,
    };
    Ok(Dq { output: v.to_string(), codes, scale, zero_point, granularity, out_elem })
}

/// The dims of a constant weight: an initializer's, or those of a `DequantizeLinear` of
/// constants. What the rules ask where a weight must be a constant of a known shape.
pub fn weight_dims(g: &GraphIndex, v: &str) -> Option<Vec<i64>> {
    if let Some(t) = g.initializers.get(v).filter(|_| !g.graph_inputs.contains(v)) {
        return Some(t.dims.clone());
    }
    match dequantized(g, v)? {
        Ok(d) => Some(d.codes.dims.clone()),
        Err(_) => None,
    }
}

/// [`weight_dims`] with the reason a `DequantizeLinear`-fed weight is not one.
pub fn weight_dims_or_reason(g: &GraphIndex, v: &str) -> Result<Option<Vec<i64>>, String> {
    if let Some(t) = g.initializers.get(v).filter(|_| !g.graph_inputs.contains(v)) {
        return Ok(Some(t.dims.clone()));
    }
    match dequantized(g, v) {
        Some(Ok(d)) => Ok(Some(d.codes.dims.clone())),
        Some(Err(e)) => Err(e),
        None => Ok(None),
    }
}

/// The codes of a tensor as one u8 per element in the tensor's own encoding: int8/uint8/fp8 bytes
/// as they are, int4/uint4 nibbles (low nibble first, over the flattened tensor) one per byte,
/// sign-extended for int4 (as `i8 as u8`).
pub fn code_values(t: &TensorProto, ext: Option<&crate::onnx::tensor::ExternalStore>) -> anyhow::Result<Vec<u8>> {
    let n = crate::onnx::tensor::checked_numel(&t.dims).ok_or_else(|| anyhow::anyhow!("tensor '{}' has an invalid shape {:?}", t.name, t.dims))?;
    let four = matches!(t.data_type, INT4 | UINT4);
    let stored = if four { n.div_ceil(2) } else { n };
    let bytes: std::borrow::Cow<[u8]> = if crate::onnx::tensor::is_external(t) {
        let ext = ext.ok_or_else(|| anyhow::anyhow!("tensor '{}' has external data but no model directory is known", t.name))?;
        std::borrow::Cow::Borrowed(ext.bytes(t)?)
    } else if !t.raw_data.is_empty() || n == 0 {
        std::borrow::Cow::Borrowed(&t.raw_data[..])
    } else if four {
        // int32_data: one element per entry
        if t.int32_data.len() != n {
            anyhow::bail!("tensor '{}' holds {} values, its shape {:?} needs {n}", t.name, t.int32_data.len(), t.dims);
        }
        return Ok(t.int32_data.iter().map(|&v| v as i8 as u8).map(|v| if t.data_type == UINT4 { v & 15 } else { v }).collect());
    } else {
        std::borrow::Cow::Owned(t.int32_data.iter().map(|&v| v as u8).collect())
    };
    if bytes.len() != stored {
        anyhow::bail!("tensor '{}' holds {} bytes, its shape {:?} of {} needs {stored}", t.name, bytes.len(), t.dims, crate::spec::onnx_type_name(t.data_type));
    }
    if !four {
        return Ok(bytes.into_owned());
    }
    let mut out = Vec::with_capacity(n);
    for j in 0..n {
        let nib = (bytes[j / 2] >> (4 * (j % 2))) & 15;
        out.push(if t.data_type == INT4 { ((nib << 4) as i8 >> 4) as u8 } else { nib });
    }
    Ok(out)
}

/// A code of `elem` (one value of [`code_values`]) as the op's unsigned code: signed codes move
/// up by 128 (8-bit) or 8 (4-bit), so that `(q - z)` keeps its value when the zero point moves
/// the same way; fp8 and unsigned codes are kept.
pub fn unsigned_code(elem: i32, v: u8) -> u8 {
    match elem {
        INT8 => (v as i8 as i16 + 128) as u8,
        INT4 => (v as i8 + 8) as u8,
        _ => v,
    }
}

/// Bits of a code type (fp8 and the 8-bit integers 8, the 4-bit ones 4).
pub fn code_bits(elem: i32) -> u32 {
    if matches!(elem, INT4 | UINT4) {
        4
    } else {
        8
    }
}
