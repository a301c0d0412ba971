//! `TopKRouter`: a router's scores, top-k choice and weights in one node (the k experts of every
//! token and their routing weights, as ScatterMoE takes them), so that a decode step does not pay a
//! launch per ONNX node for Softmax, TopK, ReduceSum and Div.

use super::values::{read_enum, Scoring, TieBreak};
use super::*;

pub const NAME: &str = "TopKRouter";

pub const LOGITS: usize = 0;
pub const INPUTS: [Port; 1] = [port("logits", PortType::Float, false, 2)];

pub const ROUTING_WEIGHTS: usize = 0;
pub const ROUTING_INDICES: usize = 1;
/// `routing_weights` in `T`, `routing_indices` int64; both the logits' leading dims and `k`.
pub const OUTPUTS: [Port; 2] = [port("routing_weights", PortType::Float, false, 2), port("routing_indices", PortType::Int64, false, 2)];

pub const ATTR_K: &str = "k";
pub const ATTR_SCORING: &str = "scoring";
pub const ATTR_NORMALIZE: &str = "normalize";
pub const ATTR_TIE_BREAK: &str = "tie_break";
pub const ATTRS: [AttrDesc; 4] = [
    AttrDesc { name: ATTR_K, default: AttrDefault::Int(0) },
    AttrDesc { name: ATTR_SCORING, default: AttrDefault::Str(Attrs::DEFAULT_SCORING.name()) },
    AttrDesc { name: ATTR_NORMALIZE, default: AttrDefault::Int(0) },
    AttrDesc { name: ATTR_TIE_BREAK, default: AttrDefault::Str(Attrs::DEFAULT_TIE_BREAK.name()) },
];

/// The attributes of one `TopKRouter` node, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attrs {
    pub k: usize,
    pub scoring: Scoring,
    /// divide the k weights by their sum
    pub normalize: bool,
    pub tie_break: TieBreak,
}

impl Attrs {
    pub const DEFAULT_SCORING: Scoring = Scoring::Softmax;
    pub const DEFAULT_TIE_BREAK: TieBreak = TieBreak::LowerIndex;

    pub fn parse(src: &dyn AttrSource) -> Result<Self, SpecError> {
        let k = match src.int(ATTR_K) {
            Some(k) if (1..=i32::MAX as i64).contains(&k) => k as usize,
            Some(k) => return err(NAME, format!("attribute 'k' must be in [1, {}], got {k}", i32::MAX)),
            None => return err(NAME, "attribute 'k' is required"),
        };
        let scoring = read_enum(NAME, src, ATTR_SCORING, Self::DEFAULT_SCORING)?;
        let normalize = read_bool(NAME, src, ATTR_NORMALIZE, false)?;
        let tie_break = read_enum(NAME, src, ATTR_TIE_BREAK, Self::DEFAULT_TIE_BREAK)?;
        Ok(Attrs { k, scoring, normalize, tie_break })
    }
}

/// The sizes of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// tokens T (product of the logits' leading dimensions)
    pub tokens: Dim,
    /// experts E (the logits' last dimension)
    pub experts: Dim,
}

/// Checks the input against the attributes; returns `T` and the sizes.
pub fn check(attrs: &Attrs, types: InputTypes, shapes: &[Option<&Shape>]) -> Result<(ElemType, Dims), SpecError> {
    let (t, _) = check_inputs(NAME, &INPUTS, types, shapes)?;
    let s = shapes[LOGITS].unwrap();
    check_min_rank(NAME, "logits", s, 2)?;
    check_positive(NAME, "logits", s, s.len() - 1, "E (last dimension)")?;
    let experts = s[s.len() - 1];
    if let Some(e) = experts {
        if attrs.k as u64 > e {
            return err(NAME, format!("attribute 'k' = {} is more than the {e} experts of input 'logits' (shape {})", attrs.k, fmt_shape(s)));
        }
    }
    Ok((t, Dims { tokens: leading_product(s), experts }))
}

/// Both outputs' shape: the logits' with the last dimension `k`.
pub fn output_shape<D: Clone>(attrs: &Attrs, logits: &[D], k: impl FnOnce(usize) -> D) -> Vec<D> {
    let mut s = logits.to_vec();
    if let Some(last) = s.last_mut() {
        *last = k(attrs.k);
    }
    s
}
