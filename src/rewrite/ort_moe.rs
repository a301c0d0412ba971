//! ONNX Runtime's `com.microsoft.MoE` node.
//!
//! Semantics, as ONNX Runtime 1.31's CPU kernel computes them (checked against a float64
//! evaluation by `python/tests/test_ort_moe_matrix.py`, over every attribute combination it runs):
//! `router_probs` [T, E] are logits; softmax over all experts (in float32), top-k, and with
//! `normalize_routing_weights = 1` the k weights are divided by their sum. `fc1_experts_weights`
//! is [E, n, d] and `fc2_experts_weights` [E, d, f] (the op's own layout); biases are [E, n] and
//! [E, d]. `activation_type`: relu, gelu (the tanh approximation), silu, identity, or swiglu with
//! `swiglu_fusion = 1` (gate and up interleaved in fc1's rows, gate first):
//! `h = g' * sigmoid(alpha * g') * (clamp(u, -limit, limit) + beta)`, `g' = min(g, limit)`, with
//! `activation_alpha` (default 1), `activation_beta` (default 0) and `swiglu_limit` (default
//! infinity). relu, gelu, silu and identity ignore alpha, beta and limit.
//!
//! The router becomes Cast -> Softmax -> TopK [-> ReduceSum, Div]; the experts one ScatterMoE node.
//! TopK reads the experts in reverse order, so that ties go to the higher expert number as in the
//! kernel (`top_k_last_wins`).
//! What ScatterMoE has no activation for is written exactly in one it has, by rescaling weights
//! (nodes in front of the op; ONNX Runtime folds them when the weights are initializers):
//! - identity: `a = relu(a) - relu(-a)`, so fc1 becomes `[fc1; -fc1]` and fc2 `[fc2, -fc2]`
//!   (relu over 2f rows; twice the work of the original);
//! - swiglu with beta = 0 and no limit: `g sigmoid(alpha g) u = silu(alpha g) u / alpha`, so the
//!   gate rows are scaled by alpha and fc2 by 1/alpha (silu, gated, interleaved);
//! - swiglu with beta != 0: with `s = |beta|`, gate rows / s, up rows / beta, `alpha' = alpha s`,
//!   `limit' = limit / s` and fc2 * (beta s) give `swiglu_oai(alpha', limit')` (its `+ 1`
//!   is `beta / beta`); beta = 1 needs no scaling.
//!
//! Left as they are, with the reason: swiglu with a limit and beta = 0 (clamp(u) without an offset:
//! no ScatterMoE activation computes it), swiglu with alpha = 0 and beta = 0, other swiglu
//! fusions (ONNX Runtime's CPU kernel refuses them), fc3 (the CPU kernel refuses it), sparse
//! mixer routing (the CPU kernel ignores `use_sparse_mixer`, its CUDA kernel routes by
//! sparsemixer: the two disagree), and weights in another layout.
//!
//! `com.microsoft.QMoE` (integer quantized experts) becomes a quantized ScatterMoE the same way:
//! `qmoe.rs`.
//!
//! ONNX Runtime's older CUDA MoE kernel (the FasterTransformer one) defaulted an absent
//! `activation_alpha` / `activation_beta` / `swiglu_limit` / `swiglu_fusion` to GPT-OSS's values
//! (1.702, 1, 7, interleaved); the CPU kernel and the current CUDA kernel use 1, 0, no limit.
//! The rewrite follows the CPU kernel's defaults; onnxruntime-genai's builder writes all four.

use super::emit::MoeLayer;
use super::expr::{BSrc, ERef, ExpertMlp, WSrc};
use super::Rejection;
use crate::onnx::graph::{attr_int, attr_ints_new, make_node, GraphIndex};
use crate::onnx::tensor::{encode_f32, make_i64, make_tensor};
use crate::spec::{Activation, CapacityOrder, GluLayout};
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::NodeProto;

mod qmoe;

const FLOAT: i32 = 1;
const BFLOAT16: i32 = 16;

pub fn find(g: &GraphIndex) -> (Vec<MoeLayer>, Vec<Rejection>) {
    let mut layers = Vec::new();
    let mut rejected = Vec::new();
    for (i, n) in g.graph.node.iter().enumerate() {
        if n.domain != "com.microsoft" {
            continue;
        }
        let at = n.output.first().cloned().unwrap_or_default();
        match n.op_type.as_str() {
            "MoE" => match convert(g, n, i) {
                Ok(l) => layers.push(l),
                Err(reason) => rejected.push(Rejection { family: "ort_moe", at, reason }),
            },
            "QMoE" => match qmoe::convert(g, n, i) {
                Ok(l) => layers.push(l),
                Err(reason) => rejected.push(Rejection { family: "ort_moe", at, reason: format!("com.microsoft.QMoE: {reason}") }),
            },
            _ => {}
        }
    }
    (layers, rejected)
}

/// The node's attributes, with ONNX Runtime CPU's defaults.
struct Attrs {
    k: i64,
    normalize: bool,
    activation: String,
    alpha: f32,
    beta: f32,
    fusion: i64,
    limit: f32,
}

fn attrs(n: &NodeProto) -> Result<Attrs, String> {
    let mut a = Attrs { k: 0, normalize: false, activation: String::new(), alpha: 1.0, beta: 0.0, fusion: 0, limit: f32::INFINITY };
    let (mut has_k, mut has_act) = (false, false);
    for at in &n.attribute {
        let ty = at.type_.enum_value_or_default();
        let int = || if ty == AttributeType::INT { Ok(at.i) } else { Err(format!("attribute '{}' is not an int", at.name)) };
        let float = || if ty == AttributeType::FLOAT { Ok(at.f) } else { Err(format!("attribute '{}' is not a float", at.name)) };
        match at.name.as_str() {
            "k" => {
                a.k = int()?;
                has_k = true;
            }
            "activation_type" if ty == AttributeType::STRING => {
                a.activation = String::from_utf8_lossy(&at.s).into_owned();
                has_act = true;
            }
            "activation_type" => return Err("attribute 'activation_type' is not a string".into()),
            "normalize_routing_weights" => a.normalize = int()? == 1,
            "use_sparse_mixer" if int()? == 0 => {}
            "use_sparse_mixer" => {
                return Err("use_sparse_mixer = 1 (sparse mixer routing): ONNX Runtime's CPU kernel ignores it (plain softmax top-k) while its CUDA kernel \
                            routes by sparsemixer, so the node has no one meaning to keep"
                    .into())
            }
            "swiglu_fusion" => a.fusion = int()?,
            "swiglu_limit" => a.limit = float()?,
            "activation_alpha" => a.alpha = float()?,
            "activation_beta" => a.beta = float()?,
            other => return Err(format!("attribute '{other}' is not recognised")),
        }
    }
    if !has_k || !has_act {
        return Err("attributes 'k' and 'activation_type' are required".into());
    }
    if a.k < 1 {
        return Err(format!("k = {} (must be >= 1)", a.k));
    }
    Ok(a)
}

/// A weight or bias input: an initializer, or a graph input with a static shape (passed to the op
/// as it is). Returns its dims.
fn weight_dims(g: &GraphIndex, v: &str, what: &str) -> Result<Vec<i64>, String> {
    if let Some(t) = g.const_tensor(v).filter(|_| g.initializers.contains_key(v)) {
        return Ok(t.dims.clone());
    }
    if g.graph_inputs.contains(v) {
        return g.static_input_dims(v).ok_or_else(|| format!("{what} '{v}' is a graph input without a static shape"));
    }
    // DequantizeLinear of initializers (the emitter gives the op its codes: `quant.rs`)
    if let Some(d) = super::dequant::weight_dims_or_reason(g, v)? {
        return Ok(d);
    }
    Err(format!("{what} '{v}' is neither an initializer nor a graph input"))
}

/// The router's expert axis, where declared, must be E, and k at most E (MoE and QMoE alike).
fn check_router_and_k(g: &GraphIndex, router: &str, e: i64, k: i64) -> Result<(), String> {
    if let Some(rd) = g.static_input_dims(router) {
        if rd.last() != Some(&e) {
            return Err(format!("router_probs {rd:?} does not end in E = {e}"));
        }
    }
    if k > e {
        return Err(format!("k = {k} is more than the {e} experts"));
    }
    Ok(())
}

/// An optional per-expert bias input (empty name: absent): a constant [E, len] of the node's
/// element type (MoE and QMoE alike).
fn expert_bias(g: &GraphIndex, name: &str, e: i64, len: i64, elem: i32) -> Result<Option<String>, String> {
    if name.is_empty() {
        return Ok(None);
    }
    let dims = weight_dims(g, name, "bias")?;
    if dims != [e, len] {
        return Err(format!("bias '{name}' is {dims:?}, expected [{e}, {len}]"));
    }
    if g.elem_type(name) != Some(elem) {
        return Err(format!("bias '{name}' is not of the input's element type"));
    }
    Ok(Some(name.to_string()))
}

/// How the experts are written for ScatterMoE.
enum Form {
    /// as they are
    Plain(Activation, bool),
    /// identity as relu(a) - relu(-a)
    IdentityPair,
    /// swiglu: gate rows * gate_scale, up rows * up_scale, fc2 * out_scale
    Swiglu { activation: Activation, gate_scale: f32, up_scale: f32, out_scale: f32, alpha: f32, limit: f32 },
}

fn form(a: &Attrs) -> Result<Form, String> {
    Ok(match a.activation.as_str() {
        "relu" => Form::Plain(Activation::Relu, false),
        "gelu" => Form::Plain(Activation::GeluTanh, false),
        "silu" => Form::Plain(Activation::Silu, false),
        "identity" => Form::IdentityPair,
        "swiglu" => {
            if a.fusion != 1 {
                return Err(format!("swiglu with swiglu_fusion = {}: ONNX Runtime's CPU kernel runs only the interleaved form (swiglu_fusion = 1)", a.fusion));
            }
            let (alpha, beta, limit) = (a.alpha, a.beta, a.limit);
            if !alpha.is_finite() || !beta.is_finite() || limit.is_nan() || limit <= 0.0 {
                return Err(format!("swiglu with activation_alpha = {alpha}, activation_beta = {beta}, swiglu_limit = {limit} is not recognised"));
            }
            if beta == 0.0 {
                if limit.is_finite() {
                    return Err(format!(
                        "swiglu with swiglu_limit = {limit} and activation_beta = 0 computes clamp(up) without an offset; \
                         no ScatterMoE activation does (swiglu_oai adds 1 to the clamped up value)"
                    ));
                }
                if alpha == 0.0 {
                    return Err("swiglu with activation_alpha = 0 and activation_beta = 0 (h = gate * up / 2) has no ScatterMoE activation".into());
                }
                Form::Swiglu { activation: Activation::Silu, gate_scale: alpha, up_scale: 1.0, out_scale: 1.0 / alpha, alpha: 1.702, limit: 7.0 }
            } else {
                let s = beta.abs();
                // no limit: one beyond every finite value keeps min/clamp the identity
                let limit = if limit.is_finite() { limit / s } else { f32::MAX };
                Form::Swiglu { activation: Activation::SwigluOai, gate_scale: 1.0 / s, up_scale: 1.0 / beta, out_scale: beta * s, alpha: alpha * s, limit }
            }
        }
        other => return Err(format!("activation_type '{other}' is not recognised")),
    })
}

/// Builds the nodes that rewrite weights, and names them. The arithmetic runs in the weights' type,
/// except bfloat16, which goes through float32 (ONNX Runtime's CPU Mul and Neg take no bfloat16);
/// each value is rounded to the weights' type once.
struct Prep<'a> {
    tag: &'a str,
    elem: i32,
    nodes: Vec<NodeProto>,
    inits: Vec<onnx_protobuf::TensorProto>,
}

impl Prep<'_> {
    fn math_elem(&self) -> i32 {
        if self.elem == BFLOAT16 {
            FLOAT
        } else {
            self.elem
        }
    }
    fn constant(&mut self, what: &str, dims: &[i64], vals: &[f32]) -> String {
        let name = format!("{}/{what}", self.tag);
        let mut raw = Vec::new();
        let elem = self.math_elem();
        encode_f32(vals, elem, &mut raw);
        self.inits.push(make_tensor(&name, elem, dims, raw));
        name
    }
    fn cast(&mut self, v: &str, to: i32, what: &str) -> String {
        let out = format!("{}/{what}", self.tag);
        let mut c = make_node("Cast", "", &out, &[v], &[&out]);
        c.attribute.push(attr_int("to", to as i64));
        self.nodes.push(c);
        out
    }
    /// `op` over `inputs`, the first of which is in the weights' type (the rest are constants
    /// from [`Prep::constant`]); the result is in the weights' type.
    fn node(&mut self, op: &str, what: &str, inputs: &[&str]) -> String {
        let mut ins: Vec<String> = inputs.iter().map(|s| s.to_string()).collect();
        let widen = self.math_elem() != self.elem;
        if widen {
            ins[0] = self.cast(&ins[0], FLOAT, &format!("{what}_f32_in"));
        }
        let out = format!("{}/{what}{}", self.tag, if widen { "_f32" } else { "" });
        let refs: Vec<&str> = ins.iter().map(String::as_str).collect();
        self.nodes.push(make_node(op, "", &out, &refs, &[&out]));
        if widen {
            return self.cast(&out, self.elem, what);
        }
        out
    }
    /// `v` times a per-row scale on axis 1 (`rank` 2 or 3).
    fn scale_rows(&mut self, v: &str, what: &str, scales: &[f32], rank: usize) -> String {
        let dims: Vec<i64> = if rank == 3 { vec![1, scales.len() as i64, 1] } else { vec![1, scales.len() as i64] };
        let c = self.constant(&format!("{what}_scale"), &dims, scales);
        self.node("Mul", &format!("{what}_scaled"), &[v, &c])
    }
    fn scale(&mut self, v: &str, what: &str, s: f32) -> String {
        let c = self.constant(&format!("{what}_scale"), &[1], &[s]);
        self.node("Mul", &format!("{what}_scaled"), &[v, &c])
    }
    /// `[v; -v]` along `axis`.
    fn with_negation(&mut self, v: &str, what: &str, axis: i64) -> String {
        let neg = self.node("Neg", &format!("{what}_neg"), &[v]);
        let out = format!("{}/{what}_pair", self.tag);
        let mut c = make_node("Concat", "", &out, &[v, &neg], &[&out]);
        c.attribute.push(attr_int("axis", axis));
        self.nodes.push(c);
        out
    }
}

/// Top-k of `probs` [T, E] as ONNX Runtime's CPU kernel takes it: `partial_sort` of (probability,
/// expert) pairs by `std::greater`, so of two equal probabilities the higher expert number wins
/// (checked at exact ties in float32 and float16 by `python/tests/test_ort_moe_matrix.py`), while
/// ONNX's TopK keeps the lower index. TopK runs over the experts in reverse order and its indices
/// are mapped back (`E - 1 - j`), which also gives the kernel's order within a row. Ties are
/// common where the router's logits are float16 (two logits one rounding apart). Returns the
/// values and the indices.
fn top_k_last_wins(p: &mut Prep, probs: &str, k: i64, e: i64) -> (String, String) {
    let tag = p.tag;
    let rev = format!("{tag}/probs_reversed");
    let [starts, ends, axes, steps] = ["starts", "ends", "axes", "steps"].map(|s| format!("{tag}/reverse_{s}"));
    // router_probs is [T, E] (ONNX Runtime's kernel requires rank 2); Slice-10 takes no negative axis
    for (name, v) in [(&starts, -1), (&ends, i64::MIN), (&axes, 1), (&steps, -1)] {
        p.inits.push(make_i64(name, &[1], &[v]));
    }
    p.nodes.push(make_node("Slice", "", &format!("{tag}/Reverse"), &[probs, &starts, &ends, &axes, &steps], &[&rev]));
    let kname = format!("{tag}/k");
    p.inits.push(make_i64(&kname, &[1], &[k]));
    let (vals, rev_idx) = (format!("{tag}/topk_values"), format!("{tag}/topk_reversed_indices"));
    let mut tk = make_node("TopK", "", &format!("{tag}/TopK"), &[&rev, &kname], &[&vals, &rev_idx]);
    tk.attribute.push(attr_int("axis", -1));
    tk.attribute.push(attr_int("largest", 1));
    tk.attribute.push(attr_int("sorted", 1));
    p.nodes.push(tk);
    let last = format!("{tag}/last_expert");
    p.inits.push(make_i64(&last, &[1], &[e - 1]));
    let idx = format!("{tag}/topk_indices");
    p.nodes.push(make_node("Sub", "", &format!("{tag}/Unreverse"), &[&last, &rev_idx], &[&idx]));
    (vals, idx)
}

fn convert(g: &GraphIndex, n: &NodeProto, i: usize) -> Result<MoeLayer, String> {
    let inp = |j: usize| n.input.get(j).map(String::as_str).unwrap_or("");
    if n.output.len() != 1 {
        return Err("MoE with more than one output".into());
    }
    let a = attrs(n)?;
    if !inp(6).is_empty() || !inp(7).is_empty() {
        return Err("fc3 (a separate up projection): ONNX Runtime's CPU kernel refuses it, so its meaning is not checked".into());
    }
    if n.input.len() > 8 {
        return Err(format!("MoE with {} inputs (at most 8 are known)", n.input.len()));
    }
    let form = form(&a)?;
    let gated_in = matches!(form, Form::Swiglu { .. });
    let (x, router, fc1, fc2) = (inp(0), inp(1), inp(2), inp(4));
    let elem = g.infer_type(x).ok_or_else(|| format!("cannot tell the element type of '{x}'"))?;
    let d1 = weight_dims(g, fc1, "fc1 weights")?;
    let d2 = weight_dims(g, fc2, "fc2 weights")?;
    if d1.len() != 3 || d2.len() != 3 {
        return Err(format!("fc1 {d1:?} and fc2 {d2:?} are not rank 3"));
    }
    let (e, n_rows, d) = (d1[0], d1[1], d1[2]);
    let f = if gated_in { n_rows / 2 } else { n_rows };
    if d2 != [e, d, f] || (gated_in && n_rows % 2 != 0) || e < 1 || d < 1 || f < 1 {
        return Err(format!("fc1 {d1:?} and fc2 {d2:?} are not [E, n, d] and [E, d, f] (n = {}f); other layouts are left", if gated_in { 2 } else { 1 }));
    }
    for (v, what) in [(fc1, "fc1"), (fc2, "fc2")] {
        if g.infer_type(v) != Some(elem) {
            return Err(format!("{what} weights are not of the input's element type"));
        }
    }
    // dequantized weights are read as the op's quantized inputs: only forms that use them as they are
    let rewritten = matches!(form, Form::IdentityPair)
        || matches!(form, Form::Swiglu { gate_scale, up_scale, out_scale, .. } if gate_scale != 1.0 || up_scale != 1.0 || out_scale != 1.0);
    if rewritten && (super::dequant::is_dequantized(g, fc1) || super::dequant::is_dequantized(g, fc2)) {
        return Err(format!(
            "activation '{}' (alpha {}, beta {}) on weights through DequantizeLinear: ScatterMoE computes it only with the weights rescaled or negated, \
             which the rule does not write for dequantized ones",
            a.activation, a.alpha, a.beta
        ));
    }
    check_router_and_k(g, router, e, a.k)?;
    let b1 = expert_bias(g, inp(3), e, n_rows, elem)?;
    let b2 = expert_bias(g, inp(5), e, d, elem)?;

    let tag = format!("ort_moe_{i}");
    let mut p = Prep { tag: &tag, elem, nodes: Vec::new(), inits: Vec::new() };
    // the experts, rewritten into a form ScatterMoE computes
    let (mut w1, mut w2, mut bb1) = (fc1.to_string(), fc2.to_string(), b1.clone());
    let (activation, gated, f_op, alpha, limit) = match form {
        Form::Plain(act, gated) => (act, gated, f, 1.702, 7.0),
        Form::IdentityPair => {
            w1 = p.with_negation(&w1, "fc1", 1);
            w2 = p.with_negation(&w2, "fc2", 2);
            bb1 = bb1.map(|b| p.with_negation(&b, "fc1_bias", 1));
            (Activation::Relu, false, 2 * f, 1.702, 7.0)
        }
        Form::Swiglu { activation, gate_scale, up_scale, out_scale, alpha, limit } => {
            if gate_scale != 1.0 || up_scale != 1.0 {
                // interleaved: row 2i gate, 2i+1 up
                let rows: Vec<f32> = (0..n_rows).map(|r| if r % 2 == 0 { gate_scale } else { up_scale }).collect();
                w1 = p.scale_rows(&w1, "fc1", &rows, 3);
                bb1 = bb1.map(|b| p.scale_rows(&b, "fc1_bias", &rows, 2));
            }
            if out_scale != 1.0 {
                w2 = p.scale(&w2, "fc2", out_scale);
            }
            (activation, true, f, alpha, limit)
        }
    };
    let n_op = if gated { 2 * f_op } else { f_op } as usize;
    let (d, f_op) = (d as usize, f_op as usize);
    let experts = (0..e)
        .map(|j| {
            let r = Some(ERef::Const(j));
            ExpertMlp {
                w_in: vec![WSrc { init: w1.clone(), index: r, transposed: false, out: n_op, inp: d }],
                b_in: vec![bb1.as_ref().map(|b| BSrc { init: b.clone(), index: r, len: n_op })],
                w_out: WSrc { init: w2.clone(), index: r, transposed: false, out: d, inp: f_op },
                b_out: b2.as_ref().map(|b| BSrc { init: b.clone(), index: r, len: d }),
                activation,
                gated,
                glu_layout: GluLayout::Interleaved,
                alpha,
                limit,
                f: f_op,
                d,
            }
        })
        .collect();

    // the router as ONNX ops, in float32 as the kernel computes it
    let logits = if elem == FLOAT {
        router.to_string()
    } else {
        let out = format!("{tag}/router_f32");
        let mut c = make_node("Cast", "", &format!("{tag}/Cast"), &[router], &[&out]);
        c.attribute.push(attr_int("to", FLOAT as i64));
        p.nodes.push(c);
        out
    };
    let probs = format!("{tag}/probs");
    let mut sm = make_node("Softmax", "", &format!("{tag}/Softmax"), &[&logits], &[&probs]);
    sm.attribute.push(attr_int("axis", -1));
    p.nodes.push(sm);
    let (vals, idx) = top_k_last_wins(&mut p, &probs, a.k, e);
    let weights = if a.normalize {
        let sum = format!("{tag}/sum");
        let w = format!("{tag}/weights");
        let mut rs = if g.default_opset() >= 13 {
            let axes = format!("{tag}/axes");
            p.inits.push(make_i64(&axes, &[1], &[-1]));
            make_node("ReduceSum", "", &format!("{tag}/ReduceSum"), &[&vals, &axes], &[&sum])
        } else {
            let mut r = make_node("ReduceSum", "", &format!("{tag}/ReduceSum"), &[&vals], &[&sum]);
            r.attribute.push(attr_ints_new("axes", &[-1]));
            r
        };
        rs.attribute.push(attr_int("keepdims", 1));
        p.nodes.push(rs);
        p.nodes.push(make_node("Div", "", &format!("{tag}/Div"), &[&vals, &sum], &[&w]));
        w
    } else {
        vals
    };
    Ok(MoeLayer {
        family: "ort_moe",
        x: x.to_string(),
        routing_weights: weights,
        routing_indices: idx,
        output: n.output[0].clone(),
        experts,
        capacity: None,
        capacity_order: CapacityOrder::SlotMajor,
        k: Some(a.k as usize),
        extra_nodes: p.nodes,
        extra_inits: p.inits,
        quant: None,
    })
}
