//! `TopKRouter`: a router's scores, top-k choice and weights in one node (the k experts of every
//! token and their routing weights, as ScatterMoE takes them), so that a decode step does not pay a
//! launch per ONNX node for Softmax, TopK, ReduceSum and Div, or for DeepSeek-V3's selection bias
//! and group-limited choice (about twenty nodes).

use super::values::{read_enum, GroupScore, Scoring, TieBreak, WeightsFrom};
use super::*;

pub const NAME: &str = "TopKRouter";

pub const LOGITS: usize = 0;
pub const BIAS: usize = 1;
pub const EXPERT_SCALE: usize = 2;
/// `bias` and `expert_scale`: float32 or `T`, `[E]` (a rank-2 `[1, E]` is read the same).
pub const INPUTS: [Port; 3] = [
    port("logits", PortType::Float, false, 2),
    port("bias", PortType::Scale, true, 1),
    port("expert_scale", PortType::Scale, true, 1),
];

pub const ROUTING_WEIGHTS: usize = 0;
pub const ROUTING_INDICES: usize = 1;
/// `routing_weights` in `T`, `routing_indices` int64; both the logits' leading dims and `k`.
pub const OUTPUTS: [Port; 2] = [port("routing_weights", PortType::Float, false, 2), port("routing_indices", PortType::Int64, false, 2)];

pub const ATTR_K: &str = "k";
pub const ATTR_SCORING: &str = "scoring";
pub const ATTR_NORMALIZE: &str = "normalize";
pub const ATTR_TIE_BREAK: &str = "tie_break";
pub const ATTR_N_GROUP: &str = "n_group";
pub const ATTR_TOPK_GROUP: &str = "topk_group";
pub const ATTR_GROUP_SCORE: &str = "group_score";
pub const ATTR_GROUP_FILL: &str = "group_fill";
pub const ATTR_WEIGHTS_FROM: &str = "weights_from";
pub const ATTR_NORMALIZE_EPS: &str = "normalize_eps";
pub const ATTR_NORMALIZE_MIN: &str = "normalize_min";
pub const ATTR_SCALE: &str = "scale";
pub const ATTRS: [AttrDesc; 12] = [
    AttrDesc { name: ATTR_K, default: AttrDefault::Int(0) },
    AttrDesc { name: ATTR_SCORING, default: AttrDefault::Str(Attrs::DEFAULT_SCORING.name()) },
    AttrDesc { name: ATTR_NORMALIZE, default: AttrDefault::Int(0) },
    AttrDesc { name: ATTR_TIE_BREAK, default: AttrDefault::Str(Attrs::DEFAULT_TIE_BREAK.name()) },
    AttrDesc { name: ATTR_N_GROUP, default: AttrDefault::Int(1) },
    AttrDesc { name: ATTR_TOPK_GROUP, default: AttrDefault::Int(0) },
    AttrDesc { name: ATTR_GROUP_SCORE, default: AttrDefault::Str(Groups::DEFAULT_SCORE.name()) },
    AttrDesc { name: ATTR_GROUP_FILL, default: AttrDefault::Float(f32::NEG_INFINITY) },
    AttrDesc { name: ATTR_WEIGHTS_FROM, default: AttrDefault::Str(Attrs::DEFAULT_WEIGHTS_FROM.name()) },
    AttrDesc { name: ATTR_NORMALIZE_EPS, default: AttrDefault::Float(0.0) },
    AttrDesc { name: ATTR_NORMALIZE_MIN, default: AttrDefault::Float(0.0) },
    AttrDesc { name: ATTR_SCALE, default: AttrDefault::Float(1.0) },
];

/// The group-limited choice (DeepSeek-V2/V3): the experts split into `n_group` groups of
/// consecutive numbers; only the `topk_group` best groups by `score` compete, the others' choice
/// scores become `fill`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Groups {
    pub n_group: usize,
    pub topk_group: usize,
    pub score: GroupScore,
    pub fill: f32,
}

impl Groups {
    pub const DEFAULT_SCORE: GroupScore = GroupScore::Top2Sum;
}

/// The attributes of one `TopKRouter` node, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attrs {
    pub k: usize,
    pub scoring: Scoring,
    /// divide the k weights by their sum (plus `normalize_eps`, at least `normalize_min`)
    pub normalize: bool,
    pub tie_break: TieBreak,
    /// the group-limited choice, where it limits anything (`topk_group < n_group`)
    pub groups: Option<Groups>,
    pub weights_from: WeightsFrom,
    pub normalize_eps: f32,
    /// the divisor's floor (Ernie-4.5: `sum.clamp(min = norm_min)`)
    pub normalize_min: f32,
    pub scale: f32,
}

impl Attrs {
    pub const DEFAULT_SCORING: Scoring = Scoring::Softmax;
    pub const DEFAULT_TIE_BREAK: TieBreak = TieBreak::LowerIndex;
    pub const DEFAULT_WEIGHTS_FROM: WeightsFrom = WeightsFrom::Scores;

    /// The plain router: no bias, no groups, weights as scored, no epsilon, no scale.
    pub const fn plain(k: usize, scoring: Scoring, normalize: bool, tie_break: TieBreak) -> Self {
        Attrs { k, scoring, normalize, tie_break, groups: None, weights_from: WeightsFrom::Scores, normalize_eps: 0.0, normalize_min: 0.0, scale: 1.0 }
    }

    pub fn parse(src: &dyn AttrSource) -> Result<Self, SpecError> {
        let k = match src.int(ATTR_K) {
            Some(k) if (1..=i32::MAX as i64).contains(&k) => k as usize,
            Some(k) => return err(NAME, format!("attribute 'k' must be in [1, {}], got {k}", i32::MAX)),
            None => return err(NAME, "attribute 'k' is required"),
        };
        let scoring = read_enum(NAME, src, ATTR_SCORING, Self::DEFAULT_SCORING)?;
        let normalize = read_bool(NAME, src, ATTR_NORMALIZE, false)?;
        let tie_break = read_enum(NAME, src, ATTR_TIE_BREAK, Self::DEFAULT_TIE_BREAK)?;
        let n_group = match src.int(ATTR_N_GROUP).unwrap_or(1) {
            n if (1..=i32::MAX as i64).contains(&n) => n as usize,
            n => return err(NAME, format!("attribute 'n_group' must be at least 1, got {n}")),
        };
        let topk_group = match src.int(ATTR_TOPK_GROUP).unwrap_or(0) {
            0 => n_group,
            t if t >= 1 && t as u64 <= n_group as u64 => t as usize,
            t => return err(NAME, format!("attribute 'topk_group' must be in [1, n_group = {n_group}] (or 0: every group), got {t}")),
        };
        let score = read_enum(NAME, src, ATTR_GROUP_SCORE, Groups::DEFAULT_SCORE)?;
        let fill = src.float(ATTR_GROUP_FILL).unwrap_or(f32::NEG_INFINITY);
        if fill.is_nan() {
            return err(NAME, "attribute 'group_fill' is NaN");
        }
        let weights_from = read_enum(NAME, src, ATTR_WEIGHTS_FROM, Self::DEFAULT_WEIGHTS_FROM)?;
        let normalize_eps = src.float(ATTR_NORMALIZE_EPS).unwrap_or(0.0);
        if !(normalize_eps.is_finite() && normalize_eps >= 0.0) {
            return err(NAME, format!("attribute 'normalize_eps' must be finite and >= 0, got {normalize_eps}"));
        }
        let normalize_min = src.float(ATTR_NORMALIZE_MIN).unwrap_or(0.0);
        if !(normalize_min.is_finite() && normalize_min >= 0.0) {
            return err(NAME, format!("attribute 'normalize_min' must be finite and >= 0, got {normalize_min}"));
        }
        let scale = src.float(ATTR_SCALE).unwrap_or(1.0);
        if !scale.is_finite() {
            return err(NAME, format!("attribute 'scale' must be finite, got {scale}"));
        }
        let groups = (topk_group < n_group).then_some(Groups { n_group, topk_group, score, fill });
        if scoring == Scoring::TopkSoftmax && (groups.is_some() || weights_from != WeightsFrom::Scores) {
            return err(NAME, "scoring 'topk_softmax' takes no group-limited choice and no 'weights_from'");
        }
        Ok(Attrs { k, scoring, normalize, tie_break, groups, weights_from, normalize_eps, normalize_min, scale })
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

/// Checks the inputs against the attributes; returns `T` and the sizes.
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
        if let Some(g) = attrs.groups {
            if e % g.n_group as u64 != 0 {
                return err(NAME, format!("the {e} experts of input 'logits' do not split into n_group = {} groups", g.n_group));
            }
            if g.score == GroupScore::Top2Sum && e / (g.n_group as u64) < 2 {
                return err(NAME, format!("group_score 'top2_sum' needs two experts a group; n_group = {} leaves {}", g.n_group, e / g.n_group as u64));
            }
        }
    }
    for (i, name) in [(BIAS, "bias"), (EXPERT_SCALE, "expert_scale")] {
        let Some(Some(b)) = shapes.get(i) else { continue };
        let ok = match b.len() {
            1 => true,
            2 => b[0].is_none_or(|d| d == 1),
            _ => false,
        };
        if !ok {
            return err(NAME, format!("input '{name}' must have shape [E] or [1, E], got {}", fmt_shape(b)));
        }
        unify(NAME, b[b.len() - 1], experts, || {
            format!("input '{name}' has {} values but input 'logits' has {} experts", fmt_shape(b), fmt_shape(s))
        })?;
        if i == BIAS && attrs.scoring == Scoring::TopkSoftmax {
            return err(NAME, "scoring 'topk_softmax' takes no 'bias'");
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
