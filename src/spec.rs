//! The op contract: the one place that says what the scattered ops are.
//!
//! Domain, version, op names, inputs, outputs, attributes (names, defaults, allowed values),
//! element types, shape rules and every error message live here. The rewriter's emitter, the CPU
//! reference, the ONNX Runtime kernels and the TensorRT plugin read this module; none of them
//! re-declares an attribute name or a shape rule. `docs/op-spec.md` is its human-readable twin:
//! change both together.

use std::fmt;

/// ONNX domain of every op in this crate.
pub const DOMAIN: &str = "ai.scattermoe";
/// Opset version of [`DOMAIN`] that this crate implements.
pub const OPSET_VERSION: i64 = 1;

// ---------------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------------

/// Floating element type of activations, weights, biases and routing weights (`T`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElemType {
    F32,
    F16,
    BF16,
}

impl ElemType {
    pub const ALL: [ElemType; 3] = [ElemType::F32, ElemType::F16, ElemType::BF16];

    /// `TensorProto.DataType` code.
    pub const fn onnx_code(self) -> i32 {
        match self {
            ElemType::F32 => 1,
            ElemType::F16 => 10,
            ElemType::BF16 => 16,
        }
    }

    pub fn from_onnx_code(code: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.onnx_code() == code)
    }

    pub const fn size_bytes(self) -> usize {
        match self {
            ElemType::F32 => 4,
            ElemType::F16 | ElemType::BF16 => 2,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            ElemType::F32 => "float32",
            ElemType::F16 => "float16",
            ElemType::BF16 => "bfloat16",
        }
    }
}

/// Integer element type of routing indices (`I`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IndexType {
    I32,
    I64,
}

impl IndexType {
    pub const ALL: [IndexType; 2] = [IndexType::I32, IndexType::I64];

    pub const fn onnx_code(self) -> i32 {
        match self {
            IndexType::I32 => 6,
            IndexType::I64 => 7,
        }
    }

    pub fn from_onnx_code(code: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.onnx_code() == code)
    }

    pub const fn name(self) -> &'static str {
        match self {
            IndexType::I32 => "int32",
            IndexType::I64 => "int64",
        }
    }
}

/// Name of any ONNX element type code, for error messages.
pub fn onnx_type_name(code: i32) -> &'static str {
    match code {
        0 => "undefined",
        1 => "float32",
        2 => "uint8",
        3 => "int8",
        4 => "uint16",
        5 => "int16",
        6 => "int32",
        7 => "int64",
        8 => "string",
        9 => "bool",
        10 => "float16",
        11 => "float64",
        12 => "uint32",
        13 => "uint64",
        16 => "bfloat16",
        _ => "an unsupported type",
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// A violation of the contract, naming the op and the problem. Its `Display` is the message users
/// see, from ONNX Runtime, TensorRT or the rewriter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub op: &'static str,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.op, self.message)
    }
}

impl std::error::Error for SpecError {}

fn err<T>(op: &'static str, message: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError { op, message: message.into() })
}

// ---------------------------------------------------------------------------------------------
// Inputs and outputs
// ---------------------------------------------------------------------------------------------

/// What an input or output accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortType {
    /// The op's float type `T`.
    Float,
    /// Routing indices `I` (int32 or int64).
    Index,
    /// Always int64.
    Int64,
    /// Always bool (outputs only).
    Bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Port {
    pub name: &'static str,
    pub ty: PortType,
    pub optional: bool,
    /// The smallest rank the input may have (0 for scalars).
    pub min_rank: usize,
}

const fn port(name: &'static str, ty: PortType, optional: bool, min_rank: usize) -> Port {
    Port { name, ty, optional, min_rank }
}

/// Before run time a runtime may report an input whose shape it does not know as rank 0 (ONNX
/// Runtime before 1.24 does, at kernel creation). Where the contract needs rank >= 1, such a shape
/// means "unknown": it becomes `min_rank` symbolic dimensions, so only what is known is checked
/// then, and everything at run time.
pub fn unknown_ranks_as_symbolic(ports: &[Port], shapes: &mut [Option<Vec<Dim>>]) {
    for (p, s) in ports.iter().zip(shapes.iter_mut()) {
        if let Some(s) = s {
            if s.is_empty() && p.min_rank > 0 {
                *s = vec![None; p.min_rank];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Attributes
// ---------------------------------------------------------------------------------------------

/// Where attribute values come from (an ONNX node, ORT's kernel info, TensorRT plugin fields).
/// `None` means the attribute is absent, so its default applies.
pub trait AttrSource {
    fn int(&self, name: &str) -> Option<i64>;
    fn float(&self, name: &str) -> Option<f32>;
    fn string(&self, name: &str) -> Option<String>;
}

/// An attribute's name, type and default, for emitters and plugin fields.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttrDefault {
    Int(i64),
    Float(f32),
    Str(&'static str),
}

#[derive(Debug, Clone, Copy)]
pub struct AttrDesc {
    pub name: &'static str,
    pub default: AttrDefault,
}

fn read_bool(op: &'static str, src: &dyn AttrSource, name: &str, default: bool) -> Result<bool, SpecError> {
    match src.int(name) {
        None => Ok(default),
        Some(0) => Ok(false),
        Some(1) => Ok(true),
        Some(v) => err(op, format!("attribute '{name}' must be 0 or 1, got {v}")),
    }
}

/// Activation applied between the two expert projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Activation {
    /// x * sigmoid(x)
    Silu,
    /// x * Phi(x), the exact (erf) form
    Gelu,
    /// the tanh approximation of GELU
    GeluTanh,
    /// max(x, 0)
    Relu,
    /// GPT-OSS's clamped SwiGLU: g = min(gate, limit), u = clamp(up, -limit, limit),
    /// h = (u + 1) * g * sigmoid(alpha * g). Gated only.
    SwigluOai,
}

impl Activation {
    pub const ALL: [Activation; 5] =
        [Activation::Silu, Activation::Gelu, Activation::GeluTanh, Activation::Relu, Activation::SwigluOai];

    pub const fn name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_tanh",
            Activation::Relu => "relu",
            Activation::SwigluOai => "swiglu_oai",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == s)
    }
}

/// How the 2f rows of a gated `w_in` hold the gate and the up projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GluLayout {
    /// rows [0, f) gate, rows [f, 2f) up (Mixtral's w1 then w3)
    GateUp,
    /// rows [0, f) up, rows [f, 2f) gate
    UpGate,
    /// row 2i gate, row 2i+1 up (GPT-OSS)
    Interleaved,
}

impl GluLayout {
    pub const ALL: [GluLayout; 3] = [GluLayout::GateUp, GluLayout::UpGate, GluLayout::Interleaved];

    pub const fn name(self) -> &'static str {
        match self {
            GluLayout::GateUp => "gate_up",
            GluLayout::UpGate => "up_gate",
            GluLayout::Interleaved => "interleaved",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == s)
    }

    /// Row of `w_in` (and element of `b_in`) holding gate unit `i` and up unit `i`, for `f` units.
    #[inline]
    pub const fn rows(self, i: usize, f: usize) -> (usize, usize) {
        match self {
            GluLayout::GateUp => (i, f + i),
            GluLayout::UpGate => (f + i, i),
            GluLayout::Interleaved => (2 * i, 2 * i + 1),
        }
    }
}

/// Which assignments win an expert's capacity when it is oversubscribed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CapacityOrder {
    /// all first choices (slot 0) in token order, then all slot-1 choices, ... (GShard, Switch)
    SlotMajor,
    /// token 0's choices, then token 1's, ...
    TokenMajor,
}

impl CapacityOrder {
    pub const ALL: [CapacityOrder; 2] = [CapacityOrder::SlotMajor, CapacityOrder::TokenMajor];

    pub const fn name(self) -> &'static str {
        match self {
            CapacityOrder::SlotMajor => "slot_major",
            CapacityOrder::TokenMajor => "token_major",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == s)
    }
}

fn read_enum<T: Copy>(
    op: &'static str,
    src: &dyn AttrSource,
    name: &str,
    default: T,
    parse: fn(&str) -> Option<T>,
    allowed: &[&str],
) -> Result<T, SpecError> {
    match src.string(name) {
        None => Ok(default),
        Some(s) => match parse(&s) {
            Some(v) => Ok(v),
            None => err(op, format!("attribute '{name}' has unsupported value '{s}' (supported: {})", allowed.join(", "))),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Shapes
// ---------------------------------------------------------------------------------------------

/// One dimension: known, or symbolic (only at session creation / engine build time).
pub type Dim = Option<u64>;

/// A shape whose dimensions may be symbolic. At run time every dimension is known.
pub type Shape = [Dim];

fn fmt_shape(s: &Shape) -> String {
    let parts: Vec<String> = s.iter().map(|d| d.map_or_else(|| "?".to_string(), |v| v.to_string())).collect();
    format!("[{}]", parts.join(", "))
}

/// Product of leading dimensions (all but the last), or None if one is symbolic.
fn leading_product(s: &Shape) -> Dim {
    s[..s.len() - 1].iter().try_fold(1u64, |acc, d| d.map(|v| acc * v))
}

/// Checks that two dims agree when both are known; returns the known one.
fn unify(op: &'static str, a: Dim, b: Dim, what: impl FnOnce() -> String) -> Result<Dim, SpecError> {
    match (a, b) {
        (Some(x), Some(y)) if x != y => err(op, what()),
        (Some(x), _) | (_, Some(x)) => Ok(Some(x)),
        _ => Ok(None),
    }
}

fn check_rank(op: &'static str, input: &str, s: &Shape, rank: usize) -> Result<(), SpecError> {
    if s.len() != rank {
        return err(op, format!("input '{input}' must have rank {rank}, got shape {}", fmt_shape(s)));
    }
    Ok(())
}

fn check_min_rank(op: &'static str, input: &str, s: &Shape, rank: usize) -> Result<(), SpecError> {
    if s.len() < rank {
        return err(op, format!("input '{input}' must have rank >= {rank}, got shape {}", fmt_shape(s)));
    }
    Ok(())
}

fn check_positive(op: &'static str, input: &str, s: &Shape, axis: usize, what: &str) -> Result<(), SpecError> {
    if s[axis] == Some(0) {
        return err(op, format!("input '{input}' has {what} = 0 (shape {}); it must be at least 1", fmt_shape(s)));
    }
    Ok(())
}

/// The element types a node's inputs were given, by position (`None`: the input is absent).
pub type InputTypes<'a> = &'a [Option<i32>];

/// Checks every present input's element type against the ports: all `Float` ports must share
/// one of f32/f16/bf16, `Index` ports int32/int64, `Int64` ports int64. Returns (T, I).
pub fn check_types(op: &'static str, ports: &[Port], types: InputTypes) -> Result<(ElemType, IndexType), SpecError> {
    let mut t: Option<(ElemType, &str)> = None;
    let mut i: Option<IndexType> = None;
    for (p, ty) in ports.iter().zip(types.iter()) {
        let Some(code) = *ty else { continue };
        match p.ty {
            PortType::Float => {
                let Some(et) = ElemType::from_onnx_code(code) else {
                    return err(op, format!(
                        "input '{}' has element type {}; supported: float32, float16, bfloat16",
                        p.name, onnx_type_name(code)
                    ));
                };
                match t {
                    None => t = Some((et, p.name)),
                    Some((t0, n0)) if t0 != et => {
                        return err(op, format!(
                            "input '{}' is {} but input '{n0}' is {}; all float inputs must share one element type",
                            p.name, et.name(), t0.name()
                        ))
                    }
                    _ => {}
                }
            }
            PortType::Index => match IndexType::from_onnx_code(code) {
                Some(it) => i = Some(it),
                None => {
                    return err(op, format!(
                        "input '{}' has element type {}; supported: int32, int64",
                        p.name, onnx_type_name(code)
                    ))
                }
            },
            PortType::Bool => {
                if code != 9 {
                    return err(op, format!("input '{}' has element type {}; it must be bool", p.name, onnx_type_name(code)));
                }
            }
            PortType::Int64 => {
                if code != 7 {
                    return err(op, format!("input '{}' has element type {}; it must be int64", p.name, onnx_type_name(code)));
                }
            }
        }
    }
    let t = t.map(|x| x.0).unwrap_or(ElemType::F32);
    Ok((t, i.unwrap_or(IndexType::I64)))
}

fn check_arity(op: &'static str, ports: &[Port], given: usize) -> Result<(), SpecError> {
    let required = ports.iter().filter(|p| !p.optional).count();
    if given < required || given > ports.len() {
        return err(op, format!("expects {required} to {} inputs, got {given}", ports.len()));
    }
    Ok(())
}

/// What every op's check starts with: the number of inputs, the required ones present
/// (`shapes[i]` is None for an absent input), and their element types (see [`check_types`]).
fn check_inputs(op: &'static str, ports: &[Port], types: InputTypes, shapes: &[Option<&Shape>]) -> Result<(ElemType, IndexType), SpecError> {
    check_arity(op, ports, shapes.len())?;
    for (p, shape) in ports.iter().zip(shapes) {
        if !p.optional && shape.is_none() {
            return err(op, format!("input '{}' is required", p.name));
        }
    }
    check_types(op, ports, types)
}

/// Which of the routing index checks failed, for [`index_out_of_range`].
pub fn index_out_of_range(op: &'static str, input: &str, value: i64, token: usize, slot: usize, experts: usize) -> SpecError {
    SpecError {
        op,
        message: format!(
            "input '{input}' holds {value} at [{token}, {slot}], outside [0, {experts}) (the number of experts)"
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// ScatterMoE
// ---------------------------------------------------------------------------------------------

/// `ScatterMoE`: a whole expert MLP over scattered tokens.
pub mod scatter_moe {
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

    pub const INPUTS: [Port; 8] = [
        port("X", PortType::Float, false, 2),
        port("routing_weights", PortType::Float, false, 2),
        port("routing_indices", PortType::Index, false, 2),
        port("w_in", PortType::Float, false, 3),
        port("w_out", PortType::Float, false, 3),
        port("b_in", PortType::Float, true, 2),
        port("b_out", PortType::Float, true, 2),
        port("capacity", PortType::Int64, true, 0),
    ];

    pub const Y: usize = 0;
    pub const OUTPUTS: [Port; 1] = [port("Y", PortType::Float, false, 2)];

    pub const ATTR_ACTIVATION: &str = "activation";
    pub const ATTR_GATED: &str = "gated";
    pub const ATTR_GLU_LAYOUT: &str = "glu_layout";
    pub const ATTR_ALPHA: &str = "alpha";
    pub const ATTR_LIMIT: &str = "limit";
    pub const ATTR_CAPACITY_ORDER: &str = "capacity_order";

    pub const ATTRS: [AttrDesc; 6] = [
        AttrDesc { name: ATTR_ACTIVATION, default: AttrDefault::Str("silu") },
        AttrDesc { name: ATTR_GATED, default: AttrDefault::Int(1) },
        AttrDesc { name: ATTR_GLU_LAYOUT, default: AttrDefault::Str("gate_up") },
        AttrDesc { name: ATTR_ALPHA, default: AttrDefault::Float(1.702) },
        AttrDesc { name: ATTR_LIMIT, default: AttrDefault::Float(7.0) },
        AttrDesc { name: ATTR_CAPACITY_ORDER, default: AttrDefault::Str("slot_major") },
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
    }

    impl Default for Attrs {
        fn default() -> Self {
            Attrs {
                activation: Activation::Silu,
                gated: true,
                glu_layout: GluLayout::GateUp,
                alpha: 1.702,
                limit: 7.0,
                capacity_order: CapacityOrder::SlotMajor,
            }
        }
    }

    impl Attrs {
        pub fn parse(src: &dyn AttrSource) -> Result<Self, SpecError> {
            let d = Attrs::default();
            let activation = read_enum(NAME, src, ATTR_ACTIVATION, d.activation, Activation::from_name, &[
                "silu", "gelu", "gelu_tanh", "relu", "swiglu_oai",
            ])?;
            let gated = read_bool(NAME, src, ATTR_GATED, d.gated)?;
            let glu_layout =
                read_enum(NAME, src, ATTR_GLU_LAYOUT, d.glu_layout, GluLayout::from_name, &["gate_up", "up_gate", "interleaved"])?;
            let alpha = src.float(ATTR_ALPHA).unwrap_or(d.alpha);
            let limit = src.float(ATTR_LIMIT).unwrap_or(d.limit);
            let capacity_order = read_enum(NAME, src, ATTR_CAPACITY_ORDER, d.capacity_order, CapacityOrder::from_name, &[
                "slot_major", "token_major",
            ])?;
            if activation == Activation::SwigluOai && !gated {
                return err(NAME, "attribute 'activation' = 'swiglu_oai' needs 'gated' = 1");
            }
            if !alpha.is_finite() {
                return err(NAME, format!("attribute 'alpha' must be finite, got {alpha}"));
            }
            if !(limit > 0.0) {
                return err(NAME, format!("attribute 'limit' must be positive, got {limit}"));
            }
            Ok(Attrs { activation, gated, glu_layout, alpha, limit, capacity_order })
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

        let d = unify(op, *x.last().unwrap(), w_in[2], || {
            format!("input 'w_in' {} must be [E, n, d] with d = {} (the last dimension of X)", fmt_shape(w_in), x.last().unwrap().unwrap())
        })?;
        check_positive(op, "X", x, x.len() - 1, "d (last dimension)")?;
        let experts = unify(op, w_in[0], w_out[0], || {
            format!("inputs 'w_in' {} and 'w_out' {} disagree on the number of experts E", fmt_shape(w_in), fmt_shape(w_out))
        })?;
        check_positive(op, "w_in", w_in, 0, "E")?;
        let d = unify(op, d, w_out[1], || {
            format!("input 'w_out' {} must be [E, d, f] with d = {}", fmt_shape(w_out), d.unwrap())
        })?;
        let f = w_out[2];
        check_positive(op, "w_out", w_out, 2, "f")?;
        let mult = if attrs.gated { 2 } else { 1 };
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
        Ok((t, it, Dims {
            tokens,
            k,
            experts,
            d,
            f,
            has_b_in: b_in.is_some(),
            has_b_out: b_out.is_some(),
            has_capacity: cap.is_some(),
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
}

// ---------------------------------------------------------------------------------------------
// ParallelLinear
// ---------------------------------------------------------------------------------------------

/// `ParallelLinear`: one scattered grouped linear layer, ScatterMoE's building block.
pub mod parallel_linear {
    use super::*;

    pub const NAME: &str = "ParallelLinear";

    pub const X: usize = 0;
    pub const ROUTING_INDICES: usize = 1;
    pub const W: usize = 2;
    pub const B: usize = 3;
    pub const GATES: usize = 4;

    pub const INPUTS: [Port; 5] = [
        port("X", PortType::Float, false, 2),
        port("routing_indices", PortType::Index, false, 2),
        port("W", PortType::Float, false, 3),
        port("b", PortType::Float, true, 2),
        port("gates", PortType::Float, true, 2),
    ];
    pub const OUTPUTS: [Port; 1] = [port("Y", PortType::Float, false, 2)];

    pub const ATTR_GROUPED_IN: &str = "grouped_in";
    pub const ATTR_GROUPED_OUT: &str = "grouped_out";
    pub const ATTRS: [AttrDesc; 2] = [
        AttrDesc { name: ATTR_GROUPED_IN, default: AttrDefault::Int(0) },
        AttrDesc { name: ATTR_GROUPED_OUT, default: AttrDefault::Int(0) },
    ];

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct Attrs {
        pub grouped_in: bool,
        pub grouped_out: bool,
    }

    impl Attrs {
        pub fn parse(src: &dyn AttrSource) -> Result<Self, SpecError> {
            Ok(Attrs {
                grouped_in: read_bool(NAME, src, ATTR_GROUPED_IN, false)?,
                grouped_out: read_bool(NAME, src, ATTR_GROUPED_OUT, false)?,
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
        let d_in = unify(op, *x.last().unwrap(), w[2], || {
            format!("input 'W' {} must be [E, d_out, d_in] with d_in = {}", fmt_shape(w), x.last().unwrap().unwrap())
        })?;
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
        Ok((t, it, Dims { tokens, k, experts, d_in, d_out, has_bias: b.is_some(), has_gates: g.is_some() }))
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
}

// ---------------------------------------------------------------------------------------------
// CapacityMask
// ---------------------------------------------------------------------------------------------

/// `CapacityMask`: which assignments `ScatterMoE` keeps under a capacity, for models that treat
/// dropped tokens specially (Switch passes them through scaled by their router probability).
pub mod capacity_mask {
    use super::*;

    pub const NAME: &str = "CapacityMask";

    pub const ROUTING_INDICES: usize = 0;
    pub const CAPACITY: usize = 1;
    pub const INPUTS: [Port; 2] =
        [port("routing_indices", PortType::Index, false, 2), port("capacity", PortType::Int64, false, 0)];
    /// bool, shape of `routing_indices`
    pub const OUTPUTS: [Port; 1] = [port("kept", PortType::Bool, false, 2)];

    pub const ATTR_NUM_EXPERTS: &str = "num_experts";
    pub const ATTR_CAPACITY_ORDER: &str = scatter_moe::ATTR_CAPACITY_ORDER;
    pub const ATTRS: [AttrDesc; 2] = [
        AttrDesc { name: ATTR_NUM_EXPERTS, default: AttrDefault::Int(0) },
        AttrDesc { name: ATTR_CAPACITY_ORDER, default: AttrDefault::Str("slot_major") },
    ];

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Attrs {
        pub num_experts: usize,
        pub capacity_order: CapacityOrder,
    }

    impl Attrs {
        pub fn parse(src: &dyn AttrSource) -> Result<Self, SpecError> {
            let num_experts = match src.int(ATTR_NUM_EXPERTS) {
                // Expert ids are int32 or int64 tensors held as u32 by the kernels: beyond
                // i32::MAX no index tensor could name them all.
                Some(e) if (1..=i32::MAX as i64).contains(&e) => e as usize,
                Some(e) => return err(NAME, format!("attribute 'num_experts' must be in [1, {}], got {e}", i32::MAX)),
                None => return err(NAME, "attribute 'num_experts' is required"),
            };
            let capacity_order = read_enum(NAME, src, ATTR_CAPACITY_ORDER, CapacityOrder::SlotMajor, CapacityOrder::from_name, &[
                "slot_major", "token_major",
            ])?;
            Ok(Attrs { num_experts, capacity_order })
        }
    }

    /// Checks inputs; returns the index type.
    pub fn check(types: InputTypes, shapes: &[Option<&Shape>]) -> Result<IndexType, SpecError> {
        let (_, it) = check_inputs(NAME, &INPUTS, types, shapes)?;
        let ri = shapes[ROUTING_INDICES].unwrap();
        check_min_rank(NAME, "routing_indices", ri, 2)?;
        check_positive(NAME, "routing_indices", ri, ri.len() - 1, "k (last dimension)")?;
        let c = shapes[CAPACITY].unwrap();
        let count = c.iter().try_fold(1u64, |acc, d| d.map(|v| acc * v));
        if c.len() > 1 || count.is_some_and(|n| n != 1) {
            return err(NAME, format!("input 'capacity' must be a scalar (shape []) or a 1-D tensor of one element (shape [1]), got shape {}", fmt_shape(c)));
        }
        Ok(it)
    }

    pub fn check_capacity(value: i64) -> Result<usize, SpecError> {
        if value < 0 {
            return err(NAME, format!("input 'capacity' must be >= 0, got {value}"));
        }
        Ok(value as usize)
    }
}

#[cfg(test)]
mod tests;
