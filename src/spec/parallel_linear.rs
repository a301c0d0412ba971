//! `ParallelLinear`: one scattered grouped linear layer, ScatterMoE's building block.

use super::quant::{self, check_packed_in, check_weight, WeightPorts};
use super::*;

pub const NAME: &str = "ParallelLinear";

pub const X: usize = 0;
pub const ROUTING_INDICES: usize = 1;
pub const W: usize = 2;
pub const B: usize = 3;
pub const GATES: usize = 4;
pub const W_SCALE: usize = 5;
pub const W_ZERO_POINT: usize = 6;

pub const INPUTS: [Port; 7] = [
    port("X", PortType::Float, false, 2),
    port("routing_indices", PortType::Index, false, 2),
    port("W", PortType::Weight, false, 3),
    port("b", PortType::Float, true, 2),
    port("gates", PortType::Float, true, 2),
    port("W_scale", PortType::Scale, true, 2),
    port("W_zero_point", PortType::ZeroPoint, true, 2),
];
pub const OUTPUTS: [Port; 1] = [port("Y", PortType::Float, false, 2)];

pub const ATTR_GROUPED_IN: &str = "grouped_in";
pub const ATTR_GROUPED_OUT: &str = "grouped_out";
pub const ATTR_WEIGHT_BITS: &str = quant::ATTR_WEIGHT_BITS;
pub const ATTR_BLOCK_SIZE: &str = quant::ATTR_BLOCK_SIZE;
pub const ATTRS: [AttrDesc; 4] = [
    AttrDesc { name: ATTR_GROUPED_IN, default: AttrDefault::Int(0) },
    AttrDesc { name: ATTR_GROUPED_OUT, default: AttrDefault::Int(0) },
    quant::ATTRS[0],
    quant::ATTRS[1],
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attrs {
    pub grouped_in: bool,
    pub grouped_out: bool,
    /// `weight_bits` and `block_size`, for a quantized `W`.
    pub quant: QuantAttrs,
}

impl Attrs {
    pub fn parse(src: &dyn AttrSource) -> Result<Self, SpecError> {
        Ok(Attrs {
            grouped_in: read_bool(NAME, src, ATTR_GROUPED_IN, false)?,
            grouped_out: read_bool(NAME, src, ATTR_GROUPED_OUT, false)?,
            quant: QuantAttrs::parse(NAME, src)?,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub tokens: Dim,
    pub k: Dim,
    pub experts: Dim,
    pub d_in: Dim,
    pub d_out: Dim,
    pub has_bias: bool,
    pub has_gates: bool,
    /// How `W` is quantized (None: in `T`, or not known before run time).
    pub w: Option<Quant>,
}

pub fn check(
    attrs: &Attrs,
    types: InputTypes,
    shapes: &[Option<&Shape>],
) -> Result<(ElemType, IndexType, Dims), SpecError> {
    let op = NAME;
    let (t, it) = check_inputs(op, &INPUTS, types, shapes)?;
    let get = |i: usize| shapes.get(i).copied().flatten();
    let x = get(X).expect("required");
    let ri = get(ROUTING_INDICES).expect("required");
    let w = get(W).expect("required");
    check_min_rank(op, "routing_indices", ri, 2)?;
    check_rank(op, "W", w, 3)?;
    check_positive(op, "routing_indices", ri, ri.len() - 1, "k (last dimension)")?;
    check_positive(op, "W", w, 0, "E")?;
    check_positive(op, "W", w, 1, "d_out")?;
    let tokens = leading_product(ri);
    let k = *ri.last().unwrap();
    if attrs.grouped_in {
        check_rank(op, "X", x, 2)?;
        let rows = tokens.zip(k).map(|(t, k)| t * k);
        unify(op, x[0], rows, || {
            format!("input 'X' {} is grouped (grouped_in = 1) and must have T*k = {} rows", fmt_shape(x), rows.unwrap())
        })?;
    } else {
        check_min_rank(op, "X", x, 2)?;
        unify(op, leading_product(x), tokens, || {
            format!(
                "input 'X' {} has {} tokens but 'routing_indices' {} has {}",
                fmt_shape(x), leading_product(x).unwrap(), fmt_shape(ri), tokens.unwrap()
            )
        })?;
    }
    check_positive(op, "X", x, x.len() - 1, "d_in (last dimension)")?;
    let typ = |i: usize| types.get(i).copied().flatten();
    let qw = WeightPorts {
        name: INPUTS[W].name,
        scale_name: INPUTS[W_SCALE].name,
        zero_name: INPUTS[W_ZERO_POINT].name,
        ty: typ(W),
        shape: w,
        scale: get(W_SCALE).map(|s| (typ(W_SCALE), s)),
        zero: get(W_ZERO_POINT).map(|s| (typ(W_ZERO_POINT), s)),
    };
    // A 4-bit W stores ceil(d_in / 2) bytes a row: d_in is X's.
    let d_in = if qw.may_be_packed(&attrs.quant) {
        *x.last().unwrap()
    } else {
        unify(op, *x.last().unwrap(), w[2], || {
            format!("input 'W' {} must be [E, d_out, d_in] with d_in = {}", fmt_shape(w), x.last().unwrap().unwrap())
        })?
    };
    check_packed_in(op, &qw, &attrs.quant, "d_in", d_in)?;
    let experts = w[0];
    let d_out = w[1];
    let b = get(B);
    if let Some(b) = b {
        check_rank(op, "b", b, 2)?;
        unify(op, b[0], experts, || format!("input 'b' {} must be [E, d_out] with E = {}", fmt_shape(b), experts.unwrap()))?;
        unify(op, b[1], d_out, || format!("input 'b' {} must be [E, d_out] with d_out = {}", fmt_shape(b), d_out.unwrap()))?;
    }
    let g = get(GATES);
    if let Some(g) = g {
        if attrs.grouped_out {
            return err(op, "input 'gates' combines over k into token order, so it needs 'grouped_out' = 0");
        }
        if g.len() != ri.len() || g.iter().zip(ri.iter()).any(|(a, b)| matches!((a, b), (Some(a), Some(b)) if a != b)) {
            return err(op, format!(
                "inputs 'gates' {} and 'routing_indices' {} must have the same shape",
                fmt_shape(g),
                fmt_shape(ri)
            ));
        }
    }
    let q = check_weight(op, &attrs.quant, t, &qw, experts, ("d_out", d_out), ("d_in", d_in))?;
    Ok((t, it, Dims { tokens, k, experts, d_in, d_out, has_bias: b.is_some(), has_gates: g.is_some(), w: q }))
}

/// The number of rows T*k of a grouped tensor, from the routing shape.
pub fn grouped_rows(routing: &Shape) -> Dim {
    routing.iter().try_fold(1u64, |acc, d| d.map(|v| acc * v))
}

/// Output shape: with gates, routing's leading dims + [d_out]; grouped, [T*k, d_out];
/// otherwise routing's shape + [d_out] (row (t, j) for each assignment).
/// `rows` makes the T*k dimension of a grouped output from the routing shape.
pub fn output_shape<D: Clone>(attrs: &Attrs, routing: &[D], d_out: D, has_gates: bool, rows: impl FnOnce(&[D]) -> D) -> Vec<D> {
    if has_gates {
        let mut s = routing[..routing.len() - 1].to_vec();
        s.push(d_out);
        s
    } else if attrs.grouped_out {
        vec![rows(routing), d_out]
    } else {
        let mut s = routing.to_vec();
        s.push(d_out);
        s
    }
}
