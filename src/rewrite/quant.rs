//! Quantized expert weights in the op's terms (docs/op-spec.md, "Quantized expert weights"): the
//! codes, scale and zero point the node reads for `w_in` and `w_out`, with the node's
//! `weight_bits` and `block_size`. Two sources fill them:
//! - weights a rule matched through `DequantizeLinear` (`dequant.rs`): [`plan`] reads each
//!   expert's codes, scale and zero point and lays them out as the op's stacks, losslessly: the
//!   codes transposed to `[out, in]` and repacked (two 4-bit codes a byte along `in`, or 4-bit
//!   codes one a byte where the node's other weight is 8-bit), signed codes moved to unsigned
//!   with their zero point moved by the same amount (`q - z` keeps its value), scales and zero
//!   points copied to one value per block of the op's layout (float16/bfloat16 scales widened to
//!   float32 where the node's type is another one). Nothing is re-quantised.
//! - `com.microsoft.QMoE` (`ort_moe/qmoe.rs`), whose codes and scales already have the op's
//!   layout: it builds a [`LayerQuant`] itself.
//!
//! A form the op cannot hold exactly is an error saying why, and the layer is left as it is.

use std::fmt;
use std::sync::Arc;

use anyhow::Result;

use super::dequant::{self, Dq, Granularity};
use super::expr::WSrc;
use crate::onnx::graph::GraphIndex;
use crate::onnx::tensor::ExternalStore;

mod build;

/// How the op stores one quantized weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpFormat {
    /// float8e4m3fn codes, no zero point
    Fp8,
    /// uint8 codes, `weight_bits = 8`
    Int8,
    /// uint8, two 4-bit codes a byte along `in`, `weight_bits = 4`
    Int4,
}

impl OpFormat {
    pub fn name(self) -> &'static str {
        match self {
            OpFormat::Fp8 => "float8e4m3fn",
            OpFormat::Int8 => "int8",
            OpFormat::Int4 => "int4",
        }
    }
}

/// Writes a new tensor's bytes, in order, to the sink.
pub type Produce = Arc<dyn Fn(&ExternalStore, &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()>>;

/// A tensor the op reads: one of the graph's, or one made while the model is saved.
#[derive(Clone)]
pub enum QTensor {
    Existing(String),
    New { what: &'static str, data_type: i32, dims: Vec<i64>, produce: Produce },
}

impl fmt::Debug for QTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QTensor::Existing(n) => write!(f, "Existing({n})"),
            QTensor::New { what, data_type, dims, .. } => write!(f, "New({what}, type {data_type}, {dims:?})"),
        }
    }
}

/// One quantized weight input of the node.
#[derive(Debug, Clone)]
pub struct QWeight {
    pub format: OpFormat,
    pub codes: QTensor,
    pub scale: QTensor,
    pub zero_point: Option<QTensor>,
    /// rank 3 scale (blocks), else one scale per output channel
    pub blocked: bool,
}

/// The quantized weights of a layer: each projection quantized or not (None: in T as before).
#[derive(Debug, Clone, Default)]
pub struct LayerQuant {
    pub w_in: Option<QWeight>,
    pub w_out: Option<QWeight>,
    /// 4 or 8: the node's `weight_bits` (for its uint8 weights)
    pub weight_bits: u8,
    /// `[block_out, block_in]`, where a scale is rank 3
    pub block_size: Option<[i64; 2]>,
}

impl LayerQuant {
    /// How the report names the layer's weights, e.g. "w_in int4 blocks [1, 32], w_out int8 per channel".
    pub fn describe(&self) -> String {
        let one = |w: &Option<QWeight>| match w {
            None => "float".to_string(),
            Some(q) => {
                let lay = match (q.blocked, self.block_size) {
                    (true, Some([o, i])) => format!("blocks [{o}, {i}]"),
                    _ => "per channel".to_string(),
                };
                format!("{} {lay}{}", q.format.name(), if q.zero_point.is_some() { " with zero points" } else { "" })
            }
        };
        format!("w_in {}, w_out {}", one(&self.w_in), one(&self.w_out))
    }
}

/// An axis extent a scale covers: a block of this many codes, or the whole axis.
type Extent = Option<usize>;

/// One expert's share of one projection: a matrix `[out, in]` that is a `DequantizeLinear` output
/// (a rank-2 one, or expert `index` of a rank-3 stack), stored transposed or not.
struct Part<'g> {
    dq: Dq<'g>,
    index: Option<usize>,
    transposed: bool,
    out: usize,
    inp: usize,
    /// the block of the codes one scale covers, in `[out, in]` terms
    block: (Extent, Extent),
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn part<'g>(g: &GraphIndex<'g>, w: &WSrc, what: &str) -> Result<Option<Part<'g>>, String> {
    let Some(dq) = dequant::dequantized(g, &w.init) else { return Ok(None) };
    let dq = dq?;
    let rank = dq.dims().len();
    let index = match (rank, w.index) {
        (3, Some(r)) => Some(r.expert() as usize),
        (2, None) => None,
        _ => return Err(format!("{what}: weight '{}' of rank {rank} is not one matrix per expert", w.init)),
    };
    let (ra, ca) = (rank - 2, rank - 1);
    let (out_axis, in_axis) = if w.transposed { (ca, ra) } else { (ra, ca) };
    let whole = |n: usize, b: usize| if b >= n { None } else { Some(b) };
    let block = match dq.granularity {
        Granularity::Tensor => (None, None),
        Granularity::Axis(a) if a == out_axis => (Some(1), None),
        Granularity::Axis(a) if a == in_axis => {
            return Err(format!(
                "{what}: weight '{}' has one scale per input channel (DequantizeLinear axis {a}); weight quantization scales output channels or \
                 groups along the input, and the rule does not write a column-wise layout",
                w.init
            ))
        }
        Granularity::Axis(_) => (None, None), // the expert axis of a stack: one scale per expert
        Granularity::Blocked { axis, block } if axis == in_axis => (Some(1), whole(w.inp, block)),
        Granularity::Blocked { axis, block } if axis == out_axis && block < w.out => (Some(block), Some(1)),
        Granularity::Blocked { axis, .. } if axis == out_axis => {
            return Err(format!(
                "{what}: weight '{}' has one scale per input channel (a DequantizeLinear block of the whole output axis {axis}); the rule does not write a column-wise layout",
                w.init
            ))
        }
        Granularity::Blocked { axis, block } => {
            return Err(format!("{what}: weight '{}' is blocked along the expert axis {axis} (block {block}): every code would have its own scale", w.init))
        }
    };
    Ok(Some(Part { dq, index, transposed: w.transposed, out: w.out, inp: w.inp, block }))
}

/// One projection's parts, expert by expert (each expert's parts stacked along `out`).
struct Proj<'g> {
    experts: Vec<Vec<Part<'g>>>,
    format: OpFormat,
    /// rank-3 scale
    blocked: bool,
    out: usize,
    inp: usize,
}

fn projection<'g>(g: &GraphIndex<'g>, parts: &[Vec<WSrc>], what: &str) -> Result<Option<Proj<'g>>, String> {
    let mut experts = Vec::new();
    let (mut quantized, mut float) = (0, 0);
    for p in parts {
        let mut v = Vec::new();
        for w in p {
            match part(g, w, what)? {
                Some(x) => {
                    quantized += 1;
                    v.push(x);
                }
                None => float += 1,
            }
        }
        experts.push(v);
    }
    if quantized == 0 {
        return Ok(None);
    }
    if float > 0 {
        return Err(format!("{what}: some experts' weights are dequantized and others are not (the op takes one format per projection)"));
    }
    let all: Vec<&Part> = experts.iter().flatten().collect();
    let fp8 = all.iter().filter(|p| p.dq.codes.data_type == dequant::FLOAT8E4M3FN).count();
    if fp8 != 0 && fp8 != all.len() {
        return Err(format!("{what}: the experts mix float8 and integer codes"));
    }
    let format = if fp8 > 0 {
        OpFormat::Fp8
    } else if all.iter().all(|p| dequant::code_bits(p.dq.codes.data_type) == 4) {
        OpFormat::Int4
    } else {
        OpFormat::Int8
    };
    let blocked = !all.iter().all(|p| p.block.1.is_none() && matches!(p.block.0, None | Some(1)));
    let out = experts[0].iter().map(|p| p.out).sum();
    let inp = experts[0][0].inp;
    if experts.iter().any(|e| e.iter().map(|p| p.out).sum::<usize>() != out || e.iter().any(|p| p.inp != inp)) {
        return Err(format!("{what}: experts' weights differ in shape"));
    }
    Ok(Some(Proj { experts, format, blocked, out, inp }))
}

/// The op's quantized inputs for a layer whose expert weights were matched through
/// `DequantizeLinear` (None: no weight of it is). `elem` is the node's T.
pub fn plan(g: &GraphIndex, w_in: &[Vec<WSrc>], w_out: &[WSrc], elem: i32) -> Result<Option<LayerQuant>, String> {
    let w_out: Vec<Vec<WSrc>> = w_out.iter().map(|w| vec![w.clone()]).collect();
    let pin = projection(g, w_in, "w_in")?;
    let pout = projection(g, &w_out, "w_out")?;
    if pin.is_none() && pout.is_none() {
        return Ok(None);
    }
    // one block size for the node: the coarsest that every blocked projection's blocks are made of
    let (mut bo, mut bi, mut max_out) = (0usize, 0usize, 1usize);
    for p in [&pin, &pout].into_iter().flatten().filter(|p| p.blocked) {
        max_out = max_out.max(p.out);
        for x in p.experts.iter().flatten() {
            if let Some(b) = x.block.0 {
                bo = gcd(bo, b);
            }
            if let Some(b) = x.block.1 {
                bi = gcd(bi, b);
            }
        }
    }
    let block_size = (bo > 0 || bi > 0).then_some([if bo == 0 { max_out } else { bo }, if bi == 0 { 1 } else { bi }]);
    if let Some([o, i]) = block_size {
        if o * i < 2 {
            return Err("the weights' scale blocks have no common block larger than one code (the node has one block_size)".into());
        }
        // stacked parts (gate and up) must not share a block
        for p in [&pin, &pout].into_iter().flatten().filter(|p| p.blocked) {
            for e in &p.experts {
                let mut at = 0;
                for x in &e[..e.len() - 1] {
                    at += x.out;
                    if at % o != 0 {
                        return Err(format!("a block of {o} rows would span two of an expert's weights (one ends at row {at})"));
                    }
                }
            }
        }
    }
    let ints = [&pin, &pout].into_iter().flatten().filter(|p| p.format != OpFormat::Fp8).collect::<Vec<_>>();
    let weight_bits = if !ints.is_empty() && ints.iter().all(|p| p.format == OpFormat::Int4) { 4 } else { 8 };
    let mut lq = LayerQuant { weight_bits, block_size: block_size.map(|[o, i]| [o as i64, i as i64]), ..Default::default() };
    for (p, slot) in [(pin, &mut lq.w_in), (pout, &mut lq.w_out)] {
        let Some(mut p) = p else { continue };
        if p.format == OpFormat::Int4 && weight_bits == 8 {
            p.format = OpFormat::Int8;
        }
        *slot = Some(build::weight(&p, block_size, elem)?);
    }
    Ok(Some(lq))
}

#[cfg(test)]
mod tests;
