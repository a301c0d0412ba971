//! Router fusion: after the ScatterMoE nodes are written (ONNX Runtime target only: TensorRT has
//! no TopKRouter plugin), the ONNX router that makes a node's routing weights and indices is
//! replaced by one `ai.scattermoe::TopKRouter` node where it provably computes what that op
//! computes. At decode the router's six to ten small ONNX nodes each cost a launch; the op costs one.
//!
//! Recognised, from the ScatterMoE node's inputs backwards (Identity and Casts to the type they
//! read are skipped everywhere: they change nothing):
//! - indices: `TopK(C, k).indices` (k a constant, `largest = 1`, on C's last axis, sorted or not:
//!   an unsorted TopK's order is the runtime's, and ScatterMoE sums the k in any order), tie rule
//!   `lower_index` (ONNX TopK's); or com.microsoft.MoE's reversed form `Sub(E - 1,
//!   TopK(Slice(C, -1, <= -E-1, last axis, -1)).indices)`, tie rule `higher_index`, with E read from
//!   C's shape (a constant off by one would misnumber every expert); or a top-1 `ArgMax(C)` over
//!   the last axis with keepdims (Switch), k = 1, tie rule `lower_index` (the first maximum) or,
//!   with `select_last_index = 1`, `higher_index`, whose values are `ReduceMax(C)` over the same axis,
//!   kept. No Reshape or Unsqueeze is accepted on the indices: none of the exports needs one.
//! - weights: that TopK's values `v`, the scores gathered at its indices (`GatherElements(S,
//!   indices)`, DeepSeek-V3), or `Softmax(v)` over the last axis (then `topk_softmax`), each maybe
//!   normalised as `Div(w, ReduceSum(w, last axis, keepdims = 1) [+ eps])` (`normalize`,
//!   `normalize_eps`; the divisor maybe clamped from below by a constant, `normalize_min`; axes as attribute or input; ReduceL1 too, as DBRX writes it: these weights
//!   are never negative, so their L1 norm is their sum), maybe multiplied by a constant (`scale`)
//!   and by a constant table of one value an expert read at the chosen experts (`expert_scale`,
//!   Gemma 4's `per_expert_scale[top_k_index]`: `Gather` on axis 0 or `GatherND` of the indices
//!   unsqueezed, maybe widened by Casts), in float32, in either order. A clamp, a scale by any
//!   other tensor: not the op's formula, left. Then Casts between float types that
//!   round at most once (the op rounds its float32 weights to its T once, so a Cast from float32
//!   is the op's own rounding; a widening Cast is exact). Casts that round twice (float32 to
//!   float16 to bfloat16) are not one rounding: left.
//! - the choice C: the scores S; or S plus a constant of one value an expert, in float32
//!   (`bias`); or either with the experts of the groups that lost filled, `Where(mask, fill, ·)`
//!   (the group-limited choice, `choice::group_mask`).
//! - scores S: `Softmax(x)` over the last axis computed in float32 (`softmax`), `Sigmoid(x)` in
//!   float32 (`sigmoid`), or, with `Softmax(v)` weights, the logits themselves. A Softmax or
//!   Sigmoid computed in 16 bits (TorchScript exports `softmax(x, dtype=float32)` of float16
//!   logits as a float16 Softmax and a Cast) stays a graph node, and the TopKRouter reads the
//!   scores TopK read (`identity`): ONNX Runtime's CPU provider computes that Softmax in float32
//!   and, with the Cast to float32 behind it, never rounds its result (0.02% of 4,000 x 8 TopK
//!   values were float16 numbers, at every optimisation level), while the CUDA provider rounds it
//!   to float16; the op's own Softmax could match only one of them.
//!
//! The node reads the value the graph ranks: a float32 Cast of 16-bit logits stays in front of it
//! (ONNX Runtime's CPU optimizer may compute that Cast's input unrounded; the node then sees what
//! the graph's Softmax saw), and its float32 weights get a Cast to the type the ScatterMoE node
//! reads. Only com.microsoft.MoE's router, which the rewrite writes itself in front of 16-bit
//! logits the MoE node took as they were, reads those logits and writes 16-bit weights itself.
//! The old router nodes are left to [`crate::onnx::graph::prune`], which keeps every node whose
//! result is still read elsewhere or is a graph output.
//!
//! Proof: the layer proof ([`super::prove`]) draws the routing at the ScatterMoE node's boundary,
//! so it does not cover the router. Each fused router is proven on its own instead
//! ([`super::prove::router`]): the old router nodes and the TopKRouter node, cut out with the
//! logits as their input, run in ONNX Runtime on random logits, logits with ties (the tie rule),
//! skewed logits and logits that make each choice of groups win, at several token counts; the
//! indices must be equal (as sets for an unsorted TopK), the weights within the type's tolerance.
//! A router that fails its proof stays as it was (the layer stays rewritten).

use onnx_protobuf::NodeProto;

mod choice;
mod indices;
mod weights;

use choice::{choice, rows_of};
use indices::{indices_source, topk_k};
use weights::{expert_scaled, normalized, scaled, Divisor};
use super::matcher::{is_last_axis, rank_of};
use super::prove::shape::last_width;
use crate::onnx::graph::{attr_float, attr_i, attr_int, attr_string, make_node, GraphIndex};
use crate::spec::{self, scatter_moe as sm, topk_router as tr, Scoring, WeightsFrom};

const FLOAT: i32 = 1;

fn is_float(t: i32) -> bool {
    matches!(t, 1 | 10 | 16)
}

fn std_op<'g>(g: &GraphIndex<'g>, v: &str, op: &str) -> Option<(usize, &'g NodeProto)> {
    g.prod(v).filter(|(_, n)| n.op_type == op && (n.domain.is_empty() || n.domain == "ai.onnx"))
}

/// One router that a TopKRouter node computes, and where it goes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub attrs: tr::Attrs,
    /// the value the node reads
    pub logits: String,
    /// the node reads `Cast(logits, float32)` (no value of the graph has a type it can read)
    pub widen: bool,
    /// the type the ScatterMoE node reads its weights in, where it is not the logits' (a Cast after the node)
    pub cast_weights: Option<i32>,
    /// the values the ScatterMoE node reads now
    pub weights: String,
    pub indices: String,
    /// the selection bias the node reads: a constant, and whether it needs a Cast to float32
    /// (its type is neither float32 nor the logits')
    pub bias: Option<(String, bool)>,
    /// the per-expert weight scale the node reads (Gemma 4's `per_expert_scale`), likewise
    pub expert_scale: Option<(String, bool)>,
    /// the graph's TopK leaves its k in the runtime's order: the proof compares each token's
    /// experts and weights as a set
    pub unsorted: bool,
    /// `identity` scoring: the graph's op (Softmax or Sigmoid in 16 bits) that makes the scores the
    /// node reads; the proof draws scores as that op makes them
    pub identity_of: Option<Scoring>,
    /// the old router's nodes the match read (the proof cuts the router out by itself)
    pub nodes: Vec<usize>,
}

impl Plan {
    /// `softmax, k=2, normalize, lower_index`, then what a DeepSeek-style router adds:
    /// `, bias, groups 2/4 top2_sum fill 0, weights from choice, eps 1e-20, scale 2.5`
    pub fn text(&self) -> String {
        let a = &self.attrs;
        let scoring = match self.identity_of {
            Some(op) => format!("identity (the graph's {} in 16 bits kept)", op.name()),
            None => a.scoring.name().to_string(),
        };
        let mut t = format!("{scoring}, k={}{}, {}", a.k, if a.normalize { ", normalize" } else { "" }, a.tie_break.name());
        if self.bias.is_some() {
            t.push_str(", bias");
        }
        if self.expert_scale.is_some() {
            t.push_str(", expert scale");
        }
        if let Some(gr) = &a.groups {
            t.push_str(&format!(", groups {}/{} {}", gr.topk_group, gr.n_group, gr.score.name()));
            if gr.fill != f32::NEG_INFINITY {
                t.push_str(&format!(" fill {}", gr.fill));
            }
        }
        if a.weights_from == WeightsFrom::Choice {
            t.push_str(", weights from choice");
        }
        if a.normalize_eps != 0.0 {
            t.push_str(&format!(", eps {:e}", a.normalize_eps));
        }
        if a.normalize_min != 0.0 {
            t.push_str(&format!(", min {:e}", a.normalize_min));
        }
        if a.scale != 1.0 {
            t.push_str(&format!(", scale {}", a.scale));
        }
        t
    }
}

/// Identity and Casts to the type they read, which change nothing.
fn skip_identity<'g>(g: &GraphIndex<'g>, v: &'g str, nodes: &mut Vec<usize>) -> &'g str {
    let mut cur = v;
    for _ in 0..8 {
        let Some((i, n)) = g.prod(cur).filter(|(_, n)| n.domain.is_empty() || n.domain == "ai.onnx") else {
            break;
        };
        let same_type = n.op_type == "Cast" && g.infer_type(&n.input[0]).is_some_and(|t| attr_i(n, "to") == Some(t as i64));
        if n.op_type != "Identity" && !same_type {
            break;
        }
        nodes.push(i);
        cur = &n.input[0];
    }
    cur
}

/// Softmax over the last axis (the opset's default axis where none is written).
fn softmax_input<'g>(g: &GraphIndex<'g>, v: &'g str, nodes: &mut Vec<usize>) -> Option<&'g str> {
    let (i, n) = std_op(g, v, "Softmax")?;
    let axis = attr_i(n, "axis").unwrap_or(if g.opset >= 13 { -1 } else { 1 });
    // before opset 13 Softmax flattens the axes from `axis` on: per row only when it is the last
    is_last_axis(axis, rank_of(g, &n.input[0])).then(|| {
        nodes.push(i);
        n.input[0].as_str()
    })
}

/// The 16-bit value `v` is an exact Cast of to float32, if it is one.
fn widened_from<'g>(g: &GraphIndex<'g>, v: &'g str) -> Option<&'g str> {
    let (_, c) = std_op(g, v, "Cast")?;
    (attr_i(c, "to") == Some(FLOAT as i64) && matches!(g.infer_type(&c.input[0]), Some(10 | 16))).then_some(c.input[0].as_str())
}

/// The scoring op (Softmax over the last axis, or Sigmoid) of scores `v` computed in 16 bits, read
/// as they are or through one Cast to float32.
fn scored_in_16_bits(g: &GraphIndex, v: &str) -> Option<Scoring> {
    let src = widened_from(g, v).unwrap_or(v);
    if !matches!(g.infer_type(src), Some(10 | 16)) {
        return None;
    }
    if softmax_input(g, src, &mut Vec::new()).is_some() {
        Some(Scoring::Softmax)
    } else {
        std_op(g, src, "Sigmoid").map(|_| Scoring::Sigmoid)
    }
}

/// The router feeding ScatterMoE node `s`, or why it stays as ONNX nodes.
///
/// `logits_given`: the rewrite wrote this router itself in front of a node that took the 16-bit
/// logits as they are (com.microsoft.MoE, `ort_moe.rs`): the TopKRouter reads those logits. Any
/// other router reads the value its graph ranks (a float32 Cast of 16-bit logits stays in front of
/// it): ONNX Runtime's CPU optimizer computes a 16-bit MatMul in float32 and removes its Cast to
/// 16 bits and the Cast back, so the graph's Softmax there sees unrounded logits, and a TopKRouter
/// behind the same Cast sees what it sees (on the CUDA provider both see the rounded ones).
pub fn recognise(g: &GraphIndex, s: &NodeProto, logits_given: bool) -> Result<Plan, String> {
    let (w_in, idx_in) = match (s.input.get(sm::ROUTING_WEIGHTS), s.input.get(sm::ROUTING_INDICES)) {
        (Some(w), Some(i)) if !w.is_empty() && !i.is_empty() => (w.as_str(), i.as_str()),
        _ => return Err("the node has no routing inputs".into()),
    };
    let mut nodes = Vec::new();
    let (ti, tie_break, s_in) = indices_source(g, idx_in, &mut nodes)?;
    let topk = g.node(ti);
    nodes.push(ti);
    let argmax = topk.op_type == "ArgMax";
    let k = if argmax { 1 } else { topk_k(g, topk)? };
    // an unsorted TopK's order is the runtime's; the op's is best first (the proof compares sets)
    let unsorted = !argmax && attr_i(topk, "sorted").unwrap_or(1) != 1;
    // the chosen experts, and the values TopK returns with them (an ArgMax's: the ReduceMax of what
    // it ranks, over the same axis, kept)
    let chosen_idx = topk.output[if argmax { 0 } else { 1 }].as_str();
    let values = if argmax { "" } else { topk.output[0].as_str() };
    let is_values = |v: &str, nodes: &mut Vec<usize>| -> bool {
        if !argmax {
            return v == values;
        }
        let Some((ri, r)) = std_op(g, v, "ReduceMax") else { return false };
        let mut mine = vec![ri];
        let same = skip_identity(g, &r.input[0], &mut mine) == skip_identity(g, s_in, &mut Vec::new());
        let over_last = super::matcher::axes_of(g, r).is_some_and(|a| a.len() == 1 && is_last_axis(a[0], rank_of(g, &r.input[0])));
        let ok = same && over_last && attr_i(r, "keepdims").unwrap_or(1) == 1;
        if ok {
            nodes.extend(mine);
        }
        ok
    };

    // weights: Casts between float types after the router's own formula that round at most once
    // (a widening is exact), so that together they are one Cast from the formula's type
    let tw = g.infer_type(w_in).filter(|&t| is_float(t)).ok_or("cannot tell the routing weights' type")?;
    let mut w = w_in;
    let mut rounded = false;
    for _ in 0..8 {
        w = skip_identity(g, w, &mut nodes);
        let Some((ci, c)) = std_op(g, w, "Cast") else { break };
        if !g.infer_type(&c.input[0]).is_some_and(is_float) {
            return Err("the routing weights are a Cast of a value that is not floating point".into());
        }
        if attr_i(c, "to") != Some(FLOAT as i64) {
            if rounded {
                return Err("the routing weights are rounded twice by their Casts".into());
            }
            // rounded to 16 bits and widened again is not one Cast to float32
            if attr_i(c, "to") != Some(tw as i64) {
                return Err("the routing weights are rounded to 16 bits and widened again".into());
            }
            rounded = true;
        }
        nodes.push(ci);
        w = &c.input[0];
    }
    let wt = g.infer_type(w).ok_or("cannot tell the type the routing weights are computed in")?;
    // a scale by a constant and a scale per chosen expert, in either order (the op multiplies by
    // the expert's scale, then the constant: in float32 the orders differ by a rounding, which the
    // proof's tolerance holds)
    let chosen = skip_identity(g, idx_in, &mut Vec::new());
    let (mut scale, mut scaled_once) = (1.0f32, false);
    let mut expert_scale = None;
    for _ in 0..2 {
        if !scaled_once {
            if let Some((inner, c)) = scaled(g, w, &mut nodes) {
                w = skip_identity(g, inner, &mut nodes);
                (scale, scaled_once) = (c, true);
                continue;
            }
        }
        if expert_scale.is_none() {
            if let Some((inner, table, ty)) = expert_scaled(g, w, chosen, &mut nodes) {
                w = skip_identity(g, inner, &mut nodes);
                expert_scale = Some((table, ty));
                continue;
            }
        }
        break;
    }
    let (normalize, divisor) = match normalized(g, w, &mut nodes) {
        Some((inner, d)) => {
            w = inner;
            (true, d)
        }
        None => (false, Divisor::default()),
    };
    // where the weights come from: TopK's values, the scores gathered at its indices, or the
    // softmax of its values
    let mut topk_softmax = false;
    let mut gathered_from = None;
    if !is_values(w, &mut nodes) {
        if let Some((gi, ge)) = std_op(g, w, "GatherElements") {
            let mut mine = vec![gi];
            let idx = skip_identity(g, &ge.input[1], &mut mine);
            if idx != chosen_idx || !is_last_axis(attr_i(ge, "axis").unwrap_or(0), rank_of(g, &ge.input[0])) {
                return Err("the routing weights are gathered at other indices than TopK's".into());
            }
            nodes.extend(mine);
            gathered_from = Some(rows_of(g, &ge.input[0], &mut nodes));
        } else {
            let inner = softmax_input(g, w, &mut nodes).ok_or("the routing weights are not TopK's values, their softmax or their normalisation")?;
            let mut inner = skip_identity(g, inner, &mut nodes);
            if let Some(src) = widened_from(g, inner) {
                nodes.push(g.prod(inner).unwrap().0);
                inner = skip_identity(g, src, &mut nodes);
            }
            if argmax || inner != values {
                return Err("the routing weights are a softmax of something other than TopK's values".into());
            }
            topk_softmax = true;
        }
    }
    if normalize && wt != FLOAT {
        return Err(format!("the routing weights are normalised in {}, not float32", spec::onnx_type_name(wt)));
    }
    if (scale != 1.0 || expert_scale.is_some()) && wt != FLOAT {
        return Err(format!("the routing weights are scaled in {}, not float32", spec::onnx_type_name(wt)));
    }
    // the table must cover the experts the router ranks (the op checks it at run time; a rewrite
    // written unproven must not fail there)
    if let Some((table, _)) = expert_scale {
        let n = g.const_tensor(table).map_or(0, |t| t.dims[0]);
        match last_width(g, s_in) {
            Some(e) if n == e => {}
            Some(e) => return Err(format!("the per-expert scale has {n} values for {e} experts")),
            None => return Err("cannot tell how many experts the per-expert scale must cover".into()),
        }
    }

    // what TopK ranks: the scores, maybe biased, maybe limited to the best groups
    let ch = choice(g, s_in, &mut nodes)?;
    if topk_softmax && (ch.bias.is_some() || ch.groups.is_some()) {
        return Err("the routing weights are a softmax of TopK's values over a biased or group-limited choice".into());
    }
    let weights_from = match gathered_from {
        Some(src) if src == ch.scores => WeightsFrom::Scores,
        Some(_) => return Err("the routing weights are gathered from another value than the router's scores".into()),
        None if ch.bias.is_some() || ch.groups.is_some() => WeightsFrom::Choice,
        None => WeightsFrom::Scores,
    };

    // scores
    let mut scores = ch.scores;
    let mut identity_of = None;
    let scoring = if topk_softmax {
        Scoring::TopkSoftmax
    } else if let Some(op) = scored_in_16_bits(g, scores) {
        // the graph's Softmax or Sigmoid in 16 bits stays, and the node reads the scores it makes
        // (widened or not): ONNX Runtime's CPU provider computes that op in float32 and leaves its
        // result unrounded where a Cast to float32 follows, the CUDA provider rounds it to 16
        // bits, and a node reading what TopK read sees either (`identity`)
        identity_of = Some(op);
        Scoring::Identity
    } else {
        let (scoring, op) = if let Some(x) = softmax_input(g, scores, &mut nodes) {
            scores = x;
            (Scoring::Softmax, "Softmax")
        } else if let Some((si, sg)) = std_op(g, scores, "Sigmoid") {
            nodes.push(si);
            scores = &sg.input[0];
            (Scoring::Sigmoid, "Sigmoid")
        } else {
            let what = g.prod(scores).map_or("a graph input".to_string(), |(_, n)| n.op_type.clone());
            return Err(format!("TopK ranks {what}, not a Softmax or Sigmoid of the logits"));
        };
        let st = g.infer_type(scores);
        if st != Some(FLOAT) {
            return Err(format!("the router's {op} is computed in {}, so TopK ranks rounded scores", st.map_or("an unknown type", spec::onnx_type_name)));
        }
        scoring
    };

    // the value the node reads: the type its weights must have, else float32
    let have = |v: &str| g.infer_type(v).filter(|&t| is_float(t));
    let mut candidates = vec![scores];
    candidates.extend(widened_from(g, scores));
    let pick = |t: i32| candidates.iter().copied().find(|v| have(v) == Some(t));
    // the op rounds its float32 weights to its T once: T = the final type where the graph's weights
    // were float32 before their Cast; where they were computed in 16 bits, T must be that type
    let (logits, widen) = if identity_of.is_some() {
        // exactly what TopK ranked (its Cast to float32 included: see above)
        (scores, false)
    } else if wt == FLOAT {
        let first = if logits_given { pick(tw).or_else(|| pick(FLOAT)) } else { pick(FLOAT).or_else(|| pick(tw)) };
        match first {
            Some(v) => (v, false),
            None => (scores, true),
        }
    } else {
        (pick(wt).ok_or("the router's weights are computed in a type its logits are not in")?, false)
    };
    let lt = if widen { FLOAT } else { have(logits).ok_or("cannot tell the logits' type")? };
    if !matches!(rank_of(g, logits), Some(r) if r >= 2) {
        return Err("cannot tell that the logits have a token axis and an expert axis".into());
    }
    if let Some(e) = last_width(g, logits) {
        if (k as i64) > e {
            return Err(format!("k = {k} is more than the {e} experts"));
        }
    }
    let groups = ch.groups.filter(|&(n, top, _, _)| top < n).map(|(n_group, topk_group, score, fill)| tr::Groups { n_group, topk_group, score, fill });
    nodes.sort_unstable();
    nodes.dedup();
    let mut attrs = tr::Attrs::plain(k, scoring, normalize, tie_break);
    attrs.groups = groups;
    attrs.weights_from = weights_from;
    attrs.normalize_eps = divisor.eps;
    attrs.normalize_min = divisor.min;
    attrs.scale = scale;
    Ok(Plan {
        attrs,
        logits: logits.to_string(),
        widen,
        cast_weights: (lt != tw).then_some(tw),
        weights: String::new(),
        indices: String::new(),
        bias: ch.bias.map(|(b, bt)| (b.to_string(), bt != FLOAT && bt != lt)),
        expert_scale: expert_scale.map(|(e, et)| (e.to_string(), et != FLOAT && et != lt)),
        unsorted,
        identity_of,
        nodes,
    })
}

/// The nodes that compute `plan`'s router: [Cast of the logits,] TopKRouter [, Cast of the weights],
/// writing `plan.weights` and `plan.indices` (which it names, unique with `fresh`).
pub fn nodes(plan: &mut Plan, tag: &str, fresh: &mut dyn FnMut(&str) -> String) -> Vec<NodeProto> {
    let mut out = Vec::new();
    let mut input = plan.logits.clone();
    if plan.widen {
        let v = fresh(&format!("{tag}/router_logits_f32"));
        let mut c = make_node("Cast", "", &format!("{tag}/RouterCast"), &[&input], &[&v]);
        c.attribute.push(attr_int("to", FLOAT as i64));
        out.push(c);
        input = v;
    }
    let mut inputs = vec![input];
    // the per-expert inputs, each widened to float32 where its type is neither float32 nor the
    // logits'; an absent bias before an expert scale is the empty name
    for (per, name) in [(&plan.bias, "Bias"), (&plan.expert_scale, "ExpertScale")] {
        let Some((b, cast)) = per else {
            inputs.push(String::new());
            continue;
        };
        let mut b = b.clone();
        if *cast {
            let v = fresh(&format!("{tag}/router_{}_f32", name.to_lowercase()));
            let mut c = make_node("Cast", "", &format!("{tag}/Router{name}Cast"), &[&b], &[&v]);
            c.attribute.push(attr_int("to", FLOAT as i64));
            out.push(c);
            b = v;
        }
        inputs.push(b);
    }
    // no trailing empty inputs
    while inputs.last().is_some_and(String::is_empty) {
        inputs.pop();
    }
    let w = fresh(&format!("{tag}/router_weights"));
    let idx = fresh(&format!("{tag}/router_indices"));
    let ins: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let mut r = make_node(tr::NAME, spec::DOMAIN, &format!("{tag}/TopKRouter"), &ins, &[&w, &idx]);
    let a = &plan.attrs;
    r.attribute.push(attr_int(tr::ATTR_K, a.k as i64));
    r.attribute.push(attr_string(tr::ATTR_SCORING, a.scoring.name()));
    r.attribute.push(attr_int(tr::ATTR_NORMALIZE, a.normalize as i64));
    r.attribute.push(attr_string(tr::ATTR_TIE_BREAK, a.tie_break.name()));
    // the rest only where it is not the default, so a plain router's node stays as it was
    if let Some(gr) = &a.groups {
        r.attribute.push(attr_int(tr::ATTR_N_GROUP, gr.n_group as i64));
        r.attribute.push(attr_int(tr::ATTR_TOPK_GROUP, gr.topk_group as i64));
        r.attribute.push(attr_string(tr::ATTR_GROUP_SCORE, gr.score.name()));
        r.attribute.push(attr_float(tr::ATTR_GROUP_FILL, gr.fill));
    }
    if a.weights_from != WeightsFrom::Scores {
        r.attribute.push(attr_string(tr::ATTR_WEIGHTS_FROM, a.weights_from.name()));
    }
    if a.normalize_eps != 0.0 {
        r.attribute.push(attr_float(tr::ATTR_NORMALIZE_EPS, a.normalize_eps));
    }
    if a.normalize_min != 0.0 {
        r.attribute.push(attr_float(tr::ATTR_NORMALIZE_MIN, a.normalize_min));
    }
    if a.scale != 1.0 {
        r.attribute.push(attr_float(tr::ATTR_SCALE, a.scale));
    }
    out.push(r);
    plan.weights = w.clone();
    if let Some(t) = plan.cast_weights {
        let cw = fresh(&format!("{tag}/router_weights_cast"));
        let mut c = make_node("Cast", "", &format!("{tag}/RouterWeightsCast"), &[&w], &[&cw]);
        c.attribute.push(attr_int("to", t as i64));
        out.push(c);
        plan.weights = cw;
    }
    plan.indices = idx;
    out
}

/// What became of one ScatterMoE node's router: the fused router's attributes, or why the ONNX
/// router stays.
pub type Outcome = Result<String, String>;

/// Fuses the router of every ScatterMoE node of `model` that [`recognise`] accepts and, with
/// `prove`, whose proof passes. The TopKRouter node goes just before its ScatterMoE node (its
/// logits come before the router did); the old router is left for the caller's prune. Returns the
/// outcome per ScatterMoE node name.
/// `logits_given`: the ScatterMoE nodes whose router the rewrite wrote itself from 16-bit logits
/// (see [`recognise`]).
pub fn fuse(model: &mut crate::onnx::Model, prove: bool, logits_given: &std::collections::HashSet<String>) -> anyhow::Result<Vec<(String, Outcome)>> {
    let graph = model.proto.graph.clone().unwrap_or_default();
    let mut g = GraphIndex::new(&graph, Some(&model.ext))?;
    g.opset = model.opset("").unwrap_or(17);
    let mut names: std::collections::HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().chain(std::iter::once(&n.name)).cloned())
        .chain(graph.initializer.iter().map(|t| t.name.clone()))
        .collect();
    names.extend(graph.input.iter().map(|v| v.name.clone()));
    names.extend(model.pending.iter().map(|p| p.name.clone()));
    let mut fresh = |base: &str| {
        let mut n = base.to_string();
        let mut i = 1;
        while !names.insert(n.clone()) {
            n = format!("{base}_{i}");
            i += 1;
        }
        n
    };
    let mut edits: Vec<(usize, Vec<NodeProto>, String, String)> = Vec::new();
    let mut outcomes = Vec::new();
    for (i, s) in graph.node.iter().enumerate() {
        if s.domain != spec::DOMAIN || s.op_type != sm::NAME {
            continue;
        }
        let outcome = recognise(&g, s, logits_given.contains(&s.name)).and_then(|mut plan| {
            let new = nodes(&mut plan, &s.name, &mut fresh);
            if prove {
                let old = [s.input[sm::ROUTING_WEIGHTS].as_str(), s.input[sm::ROUTING_INDICES].as_str()];
                super::prove::router::prove(model, &g, &plan.logits, &new, old, [&plan.weights, &plan.indices], plan.unsorted, plan.identity_of, &plan.attrs).map_err(|e| format!("not proven: {e:#}"))?;
            }
            let text = plan.text();
            edits.push((i, new, plan.weights, plan.indices));
            Ok(text)
        });
        outcomes.push((s.name.clone(), outcome));
    }
    drop(g);
    let gm = model.proto.graph.mut_or_insert_default();
    // from the last, so that the positions of the earlier ones hold
    for (i, new, w, idx) in edits.into_iter().rev() {
        gm.node[i].input[sm::ROUTING_WEIGHTS] = w;
        gm.node[i].input[sm::ROUTING_INDICES] = idx;
        for (j, n) in new.into_iter().enumerate() {
            gm.node.insert(i + j, n);
        }
    }
    Ok(outcomes)
}
