//! `ScatterMoE`: a whole expert MLP over scattered tokens.

use super::quant::{self, check_packed_in, check_weight, WeightPorts};
use super::values::read_enum;
use super::*;

pub const NAME: &str = "ScatterMoE";

pub const X: usize = 0;
pub const ROUTING_WEIGHTS: usize = 1;
pub const ROUTING_INDICES: usize = 2;
pub const W_IN: usize = 3;
pub const W_OUT: usize = 4;
pub const B_IN: usize = 5;
pub const B_OUT: usize = 6;
pub const CAPACITY: usize = 7;
pub const W_IN_SCALE: usize = 8;
pub const W_OUT_SCALE: usize = 9;
pub const W_IN_ZERO_POINT: usize = 10;
pub const W_OUT_ZERO_POINT: usize = 11;

pub const INPUTS: [Port; 12] = [
    port("X", PortType::Float, false, 2),
    port("routing_weights", PortType::Float, false, 2),
    port("routing_indices", PortType::Index, false, 2),
    port("w_in", PortType::Weight, false, 3),
    port("w_out", PortType::Weight, false, 3),
    port("b_in", PortType::Float, true, 2),
    port("b_out", PortType::Float, true, 2),
    port("capacity", PortType::Int64, true, 0),
    port("w_in_scale", PortType::Scale, true, 2),
    port("w_out_scale", PortType::Scale, true, 2),
    port("w_in_zero_point", PortType::ZeroPoint, true, 2),
    port("w_out_zero_point", PortType::ZeroPoint, true, 2),
];

pub const Y: usize = 0;
pub const OUTPUTS: [Port; 1] = [port("Y", PortType::Float, false, 2)];

pub const ATTR_ACTIVATION: &str = "activation";
pub const ATTR_GATED: &str = "gated";
pub const ATTR_GLU_LAYOUT: &str = "glu_layout";
pub const ATTR_ALPHA: &str = "alpha";
pub const ATTR_LIMIT: &str = "limit";
pub const ATTR_CAPACITY_ORDER: &str = "capacity_order";
pub const ATTR_WEIGHT_BITS: &str = quant::ATTR_WEIGHT_BITS;
pub const ATTR_BLOCK_SIZE: &str = quant::ATTR_BLOCK_SIZE;

pub const ATTRS: [AttrDesc; 8] = [
    AttrDesc { name: ATTR_ACTIVATION, default: AttrDefault::Str(Attrs::DEFAULT.activation.name()) },
    AttrDesc { name: ATTR_GATED, default: AttrDefault::Int(Attrs::DEFAULT.gated as i64) },
    AttrDesc { name: ATTR_GLU_LAYOUT, default: AttrDefault::Str(Attrs::DEFAULT.glu_layout.name()) },
    AttrDesc { name: ATTR_ALPHA, default: AttrDefault::Float(Attrs::DEFAULT.alpha) },
    AttrDesc { name: ATTR_LIMIT, default: AttrDefault::Float(Attrs::DEFAULT.limit) },
    AttrDesc { name: ATTR_CAPACITY_ORDER, default: AttrDefault::Str(Attrs::DEFAULT.capacity_order.name()) },
    quant::ATTRS[0],
    quant::ATTRS[1],
];

/// The attributes of one `ScatterMoE` node, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attrs {
    pub activation: Activation,
    pub gated: bool,
    pub glu_layout: GluLayout,
    pub alpha: f32,
    pub limit: f32,
    pub capacity_order: CapacityOrder,
    /// `weight_bits` and `block_size`, for quantized weights.
    pub quant: QuantAttrs,
}

impl Default for Attrs {
    fn default() -> Self {
        Attrs::DEFAULT
    }
}

impl Attrs {
    /// The value of every absent attribute (also what [`ATTRS`] declares to emitters).
    pub const DEFAULT: Attrs = Attrs {
        activation: Activation::Silu,
        gated: true,
        glu_layout: GluLayout::GateUp,
        alpha: 1.702,
        limit: 7.0,
        capacity_order: CapacityOrder::SlotMajor,
        quant: QuantAttrs::DEFAULT,
    };

    pub fn parse(src: &dyn AttrSource) -> Result<Self, SpecError> {
        let d = Attrs::default();
        let activation = read_enum(NAME, src, ATTR_ACTIVATION, d.activation)?;
        let gated = read_bool(NAME, src, ATTR_GATED, d.gated)?;
        let glu_layout = read_enum(NAME, src, ATTR_GLU_LAYOUT, d.glu_layout)?;
        let alpha = src.float(ATTR_ALPHA).unwrap_or(d.alpha);
        let limit = src.float(ATTR_LIMIT).unwrap_or(d.limit);
        let capacity_order = read_enum(NAME, src, ATTR_CAPACITY_ORDER, d.capacity_order)?;
        let quant = QuantAttrs::parse(NAME, src)?;
        if activation.gated_only() && !gated {
            return err(NAME, format!("attribute 'activation' = '{}' needs 'gated' = 1", activation.name()));
        }
        if !alpha.is_finite() {
            return err(NAME, format!("attribute 'alpha' must be finite, got {alpha}"));
        }
        if !(limit > 0.0) {
            return err(NAME, format!("attribute 'limit' must be positive, got {limit}"));
        }
        Ok(Attrs { activation, gated, glu_layout, alpha, limit, capacity_order, quant })
    }
}

/// The sizes of one call, from its input shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// tokens T (product of X's leading dimensions)
    pub tokens: Dim,
    pub k: Dim,
    pub experts: Dim,
    pub d: Dim,
    /// hidden width f of one expert
    pub f: Dim,
    pub has_b_in: bool,
    pub has_b_out: bool,
    pub has_capacity: bool,
    /// How `w_in` and `w_out` are quantized (None: in `T`, or not known before run time).
    pub w_in: Option<Quant>,
    pub w_out: Option<Quant>,
}

/// Checks input count, element types and shapes (`shapes[i]` is None for an absent input).
/// Symbolic dimensions are checked only against known ones; at run time all are known.
pub fn check(
    attrs: &Attrs,
    types: InputTypes,
    shapes: &[Option<&Shape>],
) -> Result<(ElemType, IndexType, Dims), SpecError> {
    let op = NAME;
    let (t, it) = check_inputs(op, &INPUTS, types, shapes)?;
    let get = |i: usize| shapes.get(i).copied().flatten();
    let x = get(X).expect("required");
    let rw = get(ROUTING_WEIGHTS).expect("required");
    let ri = get(ROUTING_INDICES).expect("required");
    let w_in = get(W_IN).expect("required");
    let w_out = get(W_OUT).expect("required");

    check_min_rank(op, "X", x, 2)?;
    check_min_rank(op, "routing_weights", rw, 2)?;
    check_min_rank(op, "routing_indices", ri, 2)?;
    check_rank(op, "w_in", w_in, 3)?;
    check_rank(op, "w_out", w_out, 3)?;

    if rw.len() != ri.len() || rw.iter().zip(ri.iter()).any(|(a, b)| matches!((a, b), (Some(a), Some(b)) if a != b)) {
        return err(op, format!(
            "inputs 'routing_weights' {} and 'routing_indices' {} must have the same shape",
            fmt_shape(rw),
            fmt_shape(ri)
        ));
    }
    let tokens = unify(op, leading_product(x), leading_product(ri), || {
        format!(
            "input 'X' {} has {} tokens but 'routing_indices' {} has {}; their leading dimensions must hold the same number of tokens",
            fmt_shape(x), leading_product(x).unwrap(), fmt_shape(ri), leading_product(ri).unwrap()
        )
    })?;
    let k = unify(op, *rw.last().unwrap(), *ri.last().unwrap(), || unreachable!())?;
    check_positive(op, "routing_indices", ri, ri.len() - 1, "k (last dimension)")?;

    let typ = |i: usize| types.get(i).copied().flatten();
    let weight = |w: usize, s: usize, z: usize, shape| WeightPorts {
        name: INPUTS[w].name,
        scale_name: INPUTS[s].name,
        zero_name: INPUTS[z].name,
        ty: typ(w),
        shape,
        scale: get(s).map(|sh| (typ(s), sh)),
        zero: get(z).map(|sh| (typ(z), sh)),
    };
    let (q_in, q_out) = (weight(W_IN, W_IN_SCALE, W_IN_ZERO_POINT, w_in), weight(W_OUT, W_OUT_SCALE, W_OUT_ZERO_POINT, w_out));
    let qa = &attrs.quant;

    // A 4-bit weight stores ceil(in / 2) bytes a row: its in is told by the other inputs.
    let d = if q_in.may_be_packed(qa) {
        *x.last().unwrap()
    } else {
        unify(op, *x.last().unwrap(), w_in[2], || {
            format!("input 'w_in' {} must be [E, n, d] with d = {} (the last dimension of X)", fmt_shape(w_in), x.last().unwrap().unwrap())
        })?
    };
    check_positive(op, "X", x, x.len() - 1, "d (last dimension)")?;
    let experts = unify(op, w_in[0], w_out[0], || {
        format!("inputs 'w_in' {} and 'w_out' {} disagree on the number of experts E", fmt_shape(w_in), fmt_shape(w_out))
    })?;
    check_positive(op, "w_in", w_in, 0, "E")?;
    let d = unify(op, d, w_out[1], || {
        format!("input 'w_out' {} must be [E, d, f] with d = {}", fmt_shape(w_out), d.unwrap())
    })?;
    check_packed_in(op, &q_in, qa, "d", d)?;
    let mult = if attrs.gated { 2 } else { 1 };
    let f = if q_out.may_be_packed(qa) {
        if let Some(n) = w_in[1].filter(|n| n % mult != 0) {
            return err(op, format!("input 'w_in' {} must be [E, 2f, d] (gated: gate and up rows), got an odd n = {n}", fmt_shape(w_in)));
        }
        check_positive(op, "w_in", w_in, 1, "n")?;
        w_in[1].map(|n| n / mult)
    } else {
        w_out[2]
    };
    check_positive(op, "w_out", w_out, 2, "f")?;
    check_packed_in(op, &q_out, qa, "f", f)?;
    if let (Some(n), Some(f)) = (w_in[1], f) {
        if n != mult * f {
            return err(op, format!(
                "input 'w_in' {} must be [E, {}, d] for f = {f} ({}), got n = {n}",
                fmt_shape(w_in),
                mult * f,
                if attrs.gated { "gated: gate and up rows" } else { "not gated" }
            ));
        }
    }
    let f = match (f, w_in[1]) {
        (Some(f), _) => Some(f),
        (None, Some(n)) => Some(n / mult),
        _ => None,
    };
    let n = f.map(|f| f * mult);

    let b_in = get(B_IN);
    if let Some(b) = b_in {
        check_rank(op, "b_in", b, 2)?;
        unify(op, b[0], experts, || format!("input 'b_in' {} must be [E, n] with E = {}", fmt_shape(b), experts.unwrap()))?;
        unify(op, b[1], n, || format!("input 'b_in' {} must be [E, n] with n = {}", fmt_shape(b), n.unwrap()))?;
    }
    let b_out = get(B_OUT);
    if let Some(b) = b_out {
        check_rank(op, "b_out", b, 2)?;
        unify(op, b[0], experts, || format!("input 'b_out' {} must be [E, d] with E = {}", fmt_shape(b), experts.unwrap()))?;
        unify(op, b[1], d, || format!("input 'b_out' {} must be [E, d] with d = {}", fmt_shape(b), d.unwrap()))?;
    }
    let cap = get(CAPACITY);
    if let Some(c) = cap {
        let count = c.iter().try_fold(1u64, |acc, d| d.map(|v| acc * v));
        if c.len() > 1 || count.is_some_and(|n| n != 1) {
            return err(op, format!("input 'capacity' must be a scalar (shape []) or a 1-D tensor of one element (shape [1]), got shape {}", fmt_shape(c)));
        }
    }
    let q_in = check_weight(op, qa, t, &q_in, experts, ("n", n), ("d", d))?;
    let q_out = check_weight(op, qa, t, &q_out, experts, ("d", d), ("f", f))?;
    Ok((t, it, Dims {
        tokens,
        k,
        experts,
        d,
        f,
        has_b_in: b_in.is_some(),
        has_b_out: b_out.is_some(),
        has_capacity: cap.is_some(),
        w_in: q_in,
        w_out: q_out,
    }))
}

/// Output shape: Y has X's shape. Generic over the dimension type so shape inference can
/// carry symbolic names through.
pub fn output_shape<D: Clone>(x: &[D]) -> Vec<D> {
    x.to_vec()
}

/// The capacity value, once read: must be >= 0.
pub fn check_capacity(value: i64) -> Result<usize, SpecError> {
    if value < 0 {
        return err(NAME, format!("input 'capacity' must be >= 0, got {value}"));
    }
    Ok(value as usize)
}
