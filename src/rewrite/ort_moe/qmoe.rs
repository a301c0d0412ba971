//! ONNX Runtime's `com.microsoft.QMoE` node (integer quantized experts) as a quantized ScatterMoE.
//!
//! Semantics, as ONNX Runtime 1.31's CPU kernel computes them (read from its source and checked
//! against a float64 evaluation by `python/tests/test_ort_qmoe_matrix.py`):
//! - routing: the top k of `router_probs` (logits; ties to the higher expert number, as for
//!   `com.microsoft.MoE`), weighted by the softmax over those k logits, so the weights are
//!   normalised whatever `normalize_routing_weights` says; with `router_weights` (input 14) the
//!   weights are instead `router_weights` at the chosen experts, divided by their sum when
//!   `normalize_routing_weights = 1` (a zero sum gives zeros). An assignment whose weight is not
//!   above 1e-8 is dropped (negative router weights included): the emitted nodes zero it.
//! - experts: fc1 `[E, n, d·bits/8]` and fc2 `[E, d, f·bits/8]` uint8 codes, `expert_weight_bits`
//!   8, 4 (two codes a byte, the even index in the low nibble) or 2 (four a byte, lowest first);
//!   scales `[E, rows]` (one per output channel) or `[E, rows, in / block_size]` (groups of
//!   `block_size` along the input), of the node's type; zero points uint8 `[E, rows]` /
//!   `[E, rows, blocks]` for 8 bits, packed like the codes for 4 and 2 bits (along the rows for
//!   one scale per channel, along the blocks otherwise); without them 2^(bits - 1).
//!   `W = (q - z) · s`; activation and biases as `com.microsoft.MoE`'s.
//!
//! The codes and scales are the op's layout already (8-bit: `[E, out, in]`; 4-bit: two codes a
//! byte along `in`, even index low): the node reads them as they are. 4-bit zero points are
//! unpacked to one byte each; 2-bit codes are repacked two a byte as 4-bit codes with their zero
//! points (2 where absent) given explicitly. Nothing is re-quantised.
//!
//! The activations ScatterMoE has no form for are written as for MoE, on the scales instead of the
//! weights: swiglu's rescaled gate/up rows and fc2 multiply the scales (`(q - z)(s c)`), identity's
//! negated copies `[W1; -W1]`, `[W2, -W2]` repeat the codes and negate the scales.
//!
//! Left, with the reason: quant types other than `int` (ONNX Runtime's CPU kernel ignores the
//! attribute and reads integers, its CUDA kernel reads fp8/fp4); fc1 and fc2 of different widths,
//! fc3, swiglu fusions other than 1 (the CPU kernel refuses them); sparse mixer routing (as for
//! MoE); the inputs of the fp8/fp4 modes; identity on 2-bit experts; and the forms the CPU kernel
//! computes with quantized activations rather than the dequantized product: 8-bit block-wise
//! experts, 4-bit block-wise experts with `accuracy_level = 4` (MLAS's QNBit kernels), 2-bit
//! block-wise experts (MLAS's LUT GEMM, where the shape allows) (relative differences of 5e-3 to
//! 7e-3 from the node's formula, measured).
//!
//! ONNX Runtime's CUDA kernel differs: its default `weights_prepacked = -1` means weights already
//! in CUTLASS's interleaved layout (the CPU kernel reads the raw layout whatever the attribute
//! says), it routes by the softmax over all experts and renormalises only with
//! `normalize_routing_weights = 1`, it takes swiglu_fusion 0 as interleaved, runs float16 and
//! bfloat16 only, and 4 and 8 bits only. The rewrite follows the CPU kernel, as for MoE.

use std::sync::Arc;

use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::NodeProto;

use super::{check_router_and_k, expert_bias, form, top_k_last_wins, weight_dims, Attrs, Form, Prep, FLOAT};
use crate::onnx::graph::{attr_int, make_node, GraphIndex};
use crate::onnx::tensor::{make_tensor, tensor_bytes};
use crate::rewrite::emit::MoeLayer;
use crate::rewrite::expr::{BSrc, ERef, ExpertMlp, WSrc};
use crate::rewrite::quant::{LayerQuant, OpFormat, QTensor, QWeight};
use crate::spec::{Activation, CapacityOrder, GluLayout};

const UINT8: i32 = 2;

/// The attributes a QMoE node adds to MoE's.
struct QAttrs {
    bits: i64,
    block_size: i64,
    accuracy_level: i64,
}

fn attrs(n: &NodeProto) -> Result<(Attrs, QAttrs), String> {
    // the schema's defaults: k 1, relu, 4 bits
    let mut a = Attrs { k: 1, normalize: false, activation: "relu".into(), alpha: 1.0, beta: 0.0, fusion: 0, limit: f32::INFINITY };
    let mut q = QAttrs { bits: 4, block_size: 0, accuracy_level: 0 };
    let (mut fc1_bits, mut fc2_bits) = (None, None);
    for at in &n.attribute {
        let ty = at.type_.enum_value_or_default();
        let int = || if ty == AttributeType::INT { Ok(at.i) } else { Err(format!("attribute '{}' is not an int", at.name)) };
        let float = || if ty == AttributeType::FLOAT { Ok(at.f) } else { Err(format!("attribute '{}' is not a float", at.name)) };
        match at.name.as_str() {
            "k" => a.k = int()?,
            "activation_type" if ty == AttributeType::STRING => a.activation = String::from_utf8_lossy(&at.s).into_owned(),
            "activation_type" => return Err("attribute 'activation_type' is not a string".into()),
            "normalize_routing_weights" => a.normalize = int()? == 1,
            "use_sparse_mixer" if int()? == 0 => {}
            "use_sparse_mixer" => {
                return Err("use_sparse_mixer = 1 (sparse mixer routing): ONNX Runtime's CPU kernel ignores it while its CUDA kernel routes by sparsemixer, \
                            so the node has no one meaning to keep"
                    .into())
            }
            "swiglu_fusion" => a.fusion = int()?,
            "swiglu_limit" => a.limit = float()?,
            "activation_alpha" => a.alpha = float()?,
            "activation_beta" => a.beta = float()?,
            "expert_weight_bits" => q.bits = int()?,
            "fc1_expert_weight_bits" => fc1_bits = Some(int()?),
            "fc2_expert_weight_bits" => fc2_bits = Some(int()?),
            "fc3_expert_weight_bits" => {}
            "block_size" => q.block_size = int()?,
            "accuracy_level" => q.accuracy_level = int()?,
            // the CPU kernel reads the raw [E, N, K / pack] layout whatever this says
            "weights_prepacked" => {
                int()?;
            }
            "quant_type" if ty == AttributeType::STRING && at.s == b"int" => {}
            "quant_type" => {
                return Err(format!(
                    "quant_type '{}': ONNX Runtime's CPU kernel ignores it (it reads uint8 codes as integers and has no float8 or fp4 kernel) while its \
                     CUDA kernel reads the codes as float8/fp4: the node has no one meaning to keep",
                    String::from_utf8_lossy(&at.s)
                ))
            }
            other => return Err(format!("attribute '{other}' is not recognised")),
        }
    }
    for b in [fc1_bits, fc2_bits].into_iter().flatten() {
        if b != q.bits {
            return Err(format!(
                "fc1/fc2_expert_weight_bits ({fc1_bits:?} / {fc2_bits:?}) differ from expert_weight_bits {}: ONNX Runtime's CPU kernel refuses mixed widths",
                q.bits
            ));
        }
    }
    if !matches!(q.bits, 2 | 4 | 8) {
        return Err(format!("expert_weight_bits = {} (2, 4 or 8)", q.bits));
    }
    if q.block_size < 0 || (q.block_size > 0 && (q.block_size < 16 || q.block_size & (q.block_size - 1) != 0)) {
        return Err(format!("block_size = {} (ONNX Runtime's CPU kernel takes powers of two from 16)", q.block_size));
    }
    if q.block_size > 0 && (q.bits == 8 || (q.bits == 4 && q.accuracy_level == 4)) {
        return Err(format!(
            "{}-bit block-wise experts{}: ONNX Runtime's CPU kernel computes them with int8-quantized activations (MLAS's QNBit kernels), not the \
             dequantized product ScatterMoE computes (relative differences of 5e-3 measured)",
            q.bits,
            if q.bits == 4 { " with accuracy_level = 4" } else { "" }
        ));
    }
    if q.block_size > 0 && q.bits == 2 {
        return Err("2-bit block-wise experts: ONNX Runtime's CPU kernel takes MLAS's LUT GEMM for them where the shape allows (int8-quantized \
                    activations looked up in tables: relative differences of 7e-3 measured), the dequantized product elsewhere"
            .into());
    }
    if a.k < 1 {
        return Err(format!("k = {} (must be >= 1)", a.k));
    }
    Ok((a, q))
}

/// A constant uint8 tensor's bytes (an initializer).
fn bytes_of(g: &GraphIndex, v: &str, what: &str) -> Result<Arc<onnx_protobuf::TensorProto>, String> {
    let t = g.const_tensor(v).filter(|t| t.data_type == UINT8).ok_or_else(|| format!("{what} '{v}' is not a uint8 initializer"))?;
    Ok(Arc::new(t.clone()))
}

/// Zero points `[E, rows(, blocks)]` one a byte, from QMoE's packing of `bits`-bit values along
/// the last axis (the rows for one scale per channel, the blocks otherwise): an initializer
/// (zero points are one value per scale, small).
fn unpacked_zero_points(g: &GraphIndex, p: &mut Prep, t: &onnx_protobuf::TensorProto, bits: i64, dims: &[i64], what: &str) -> Result<String, String> {
    let per = (8 / bits) as usize;
    let last = *dims.last().unwrap() as usize;
    let lead: usize = dims[..dims.len() - 1].iter().map(|&d| d as usize).product();
    let b = tensor_bytes(t, g.ext).map_err(|e| e.to_string())?;
    let stored = last.div_ceil(per);
    let mask = ((1u16 << bits) - 1) as u8;
    let mut out = Vec::with_capacity(lead * last);
    for r in 0..lead {
        for j in 0..last {
            out.push((b[r * stored + j / per] >> (bits as usize * (j % per))) & mask);
        }
    }
    let name = format!("{}/{what}_zero_points", p.tag);
    p.inits.push(make_tensor(&name, UINT8, dims, out));
    Ok(name)
}

/// One projection's op input: codes `[E, rows, in·bits/8]`, scale, zero point.
#[allow(clippy::too_many_arguments)]
fn weight(g: &GraphIndex, p: &mut Prep, n: &NodeProto, idx: [usize; 3], rows: i64, inp: i64, e: i64, q: &QAttrs, what: &str) -> Result<QWeight, String> {
    let elem = p.elem;
    let name = |i: usize| n.input.get(i).map(String::as_str).unwrap_or("");
    let (codes, scale, zero) = (name(idx[0]), name(idx[1]), name(idx[2]));
    if scale.is_empty() {
        return Err(format!("{what} has no scales"));
    }
    let per = 8 / q.bits;
    if inp % per != 0 {
        return Err(format!("{what}'s input width {inp} is not whole bytes of {}-bit codes", q.bits));
    }
    let cd = weight_dims(g, codes, &format!("{what} weights"))?;
    if cd != [e, rows, inp / per] || g.elem_type(codes) != Some(UINT8) {
        return Err(format!("{what} weights are {cd:?}, expected uint8 [{e}, {rows}, {}]", inp / per));
    }
    let sd = weight_dims(g, scale, &format!("{what} scales"))?;
    let blocked = sd.len() == 3;
    if blocked {
        if q.block_size == 0 || inp % q.block_size != 0 || sd != [e, rows, inp / q.block_size] {
            return Err(format!("{what} scales are {sd:?}, expected [{e}, {rows}, {}] (block_size {})", inp / q.block_size.max(1), q.block_size));
        }
    } else if sd != [e, rows] {
        return Err(format!("{what} scales are {sd:?}, expected [{e}, {rows}]"));
    }
    if g.elem_type(scale) != Some(elem) {
        return Err(format!("{what} scales are not of the input's element type"));
    }
    let logical: Vec<i64> = sd.clone();
    let zero_point = if zero.is_empty() {
        // 2-bit codes become 4-bit ones, whose default zero point (8) is not 2-bit's (2)
        (q.bits == 2).then(|| {
            let name = format!("{}/{what}_zero_points", p.tag);
            p.inits.push(make_tensor(&name, UINT8, &logical, vec![2u8; logical.iter().product::<i64>() as usize]));
            QTensor::Existing(name)
        })
    } else if q.bits == 8 {
        if weight_dims(g, zero, &format!("{what} zero points"))? != logical {
            return Err(format!("{what} zero points are not of the scales' shape {logical:?}"));
        }
        Some(QTensor::Existing(zero.to_string()))
    } else {
        let t = bytes_of(g, zero, &format!("{what} zero points"))?;
        let mut packed = logical.clone();
        let last = packed.len() - 1;
        packed[last] = (packed[last] + per - 1) / per;
        if t.dims != packed {
            return Err(format!("{what} zero points are {:?}, expected {packed:?} ({}-bit values packed)", t.dims, q.bits));
        }
        Some(QTensor::Existing(unpacked_zero_points(g, p, &t, q.bits, &logical, what)?))
    };
    let codes = if q.bits == 2 {
        // four codes a byte, lowest first -> two a byte (low nibble first)
        let t = bytes_of(g, codes, &format!("{what} weights"))?;
        let (outer, stored) = ((e * rows) as usize, (inp / 4) as usize);
        QTensor::New {
            what: "codes",
            data_type: UINT8,
            dims: vec![e, rows, inp / 2],
            produce: Arc::new(move |ext, sink| {
                let b = tensor_bytes(&t, Some(ext))?;
                let mut out = Vec::with_capacity(outer * stored * 2);
                for &x in &b[..outer * stored] {
                    out.push((x & 3) | ((x >> 2) & 3) << 4);
                    out.push(((x >> 4) & 3) | ((x >> 6) & 3) << 4);
                }
                sink(&out)
            }),
        }
    } else {
        QTensor::Existing(codes.to_string())
    };
    let format = if q.bits == 8 { OpFormat::Int8 } else { OpFormat::Int4 };
    Ok(QWeight { format, codes, scale: QTensor::Existing(scale.to_string()), zero_point, blocked })
}

pub(super) fn convert(g: &GraphIndex, n: &NodeProto, i: usize) -> Result<MoeLayer, String> {
    let inp = |j: usize| n.input.get(j).map(String::as_str).unwrap_or("");
    if n.output.len() != 1 {
        return Err("QMoE with more than one output".into());
    }
    let (a, q) = attrs(n)?;
    if (8..=10).chain(13..=13).any(|j| !inp(j).is_empty()) {
        return Err("fc3 (a separate up projection): ONNX Runtime's CPU kernel refuses it, so its meaning is not checked".into());
    }
    if (15..n.input.len()).any(|j| !inp(j).is_empty()) {
        return Err("global or activation scales (inputs 15-20, for the fp8 and fp4 modes) on an integer QMoE".into());
    }
    let form = form(&a)?;
    let gated = matches!(form, Form::Plain(_, true) | Form::Swiglu { .. });
    let (x, router) = (inp(0), inp(1));
    let elem = g.infer_type(x).ok_or_else(|| format!("cannot tell the element type of '{x}'"))?;
    let per = 8 / q.bits;
    let d1 = weight_dims(g, inp(2), "fc1 weights")?;
    let d2 = weight_dims(g, inp(5), "fc2 weights")?;
    if d1.len() != 3 || d2.len() != 3 {
        return Err(format!("fc1 {d1:?} and fc2 {d2:?} are not rank 3"));
    }
    let (e, n_rows, d) = (d1[0], d1[1], d2[1]);
    let f = if gated { n_rows / 2 } else { n_rows };
    if d1[2] * per != d || d2 != [e, d, f / per] || (gated && n_rows % 2 != 0) || e < 1 || d < 1 || f < 1 {
        return Err(format!("fc1 {d1:?} and fc2 {d2:?} are not [E, n, d/{per}] and [E, d, f/{per}]"));
    }
    check_router_and_k(g, router, e, a.k)?;
    let (b1, b2) = (expert_bias(g, inp(4), e, n_rows, elem)?, expert_bias(g, inp(7), e, d, elem)?);
    let tag = format!("ort_qmoe_{i}");
    let mut p = Prep { tag: &tag, elem, nodes: Vec::new(), inits: Vec::new() };
    let mut w_in = weight(g, &mut p, n, [2, 3, 11], n_rows, d, e, &q, "fc1")?;
    let mut w_out = weight(g, &mut p, n, [5, 6, 12], d, f, e, &q, "fc2")?;
    let mut bb1 = b1.clone();
    let mut block_size = (q.block_size > 0).then_some([1, q.block_size]);

    // the experts in a form ScatterMoE computes (as for MoE, with the scales rescaled in place of
    // the weights: (q - z) * (s * c) = ((q - z) * s) * c)
    let (activation, alpha, limit, f_op) = match form {
        Form::Plain(act, _) => (act, 1.702, 7.0, f),
        Form::IdentityPair => {
            identity_pair(&mut p, &mut w_in, &mut w_out, &mut block_size, f, q.bits, g.default_opset())?;
            bb1 = bb1.map(|b| p.with_negation(&b, "fc1_bias", 1));
            (Activation::Relu, 1.702, 7.0, 2 * f)
        }
        Form::Swiglu { activation, gate_scale, up_scale, out_scale, alpha, limit } => {
            if gate_scale != 1.0 || up_scale != 1.0 {
                // interleaved: row 2i gate, 2i+1 up
                let rows: Vec<f32> = (0..n_rows).map(|r| if r % 2 == 0 { gate_scale } else { up_scale }).collect();
                let rank = if w_in.blocked { 3 } else { 2 };
                w_in.scale = QTensor::Existing(p.scale_rows(&name_of(&w_in.scale), "fc1_scales", &rows, rank));
                bb1 = bb1.map(|b| p.scale_rows(&b, "fc1_bias", &rows, 2));
            }
            if out_scale != 1.0 {
                w_out.scale = QTensor::Existing(p.scale(&name_of(&w_out.scale), "fc2_scales", out_scale));
            }
            (activation, alpha, limit, f)
        }
    };
    let (n_op, du, fu) = (if matches!(form, Form::IdentityPair) { 2 * n_rows } else { n_rows } as usize, d as usize, f_op as usize);
    let experts = (0..e)
        .map(|j| {
            let r = Some(ERef::Const(j));
            ExpertMlp {
                w_in: vec![WSrc { init: inp(2).to_string(), index: r, transposed: false, out: n_op, inp: du }],
                b_in: vec![bb1.as_ref().map(|b| BSrc { init: b.clone(), index: r, len: n_op })],
                w_out: WSrc { init: inp(5).to_string(), index: r, transposed: false, out: du, inp: fu },
                b_out: b2.as_ref().map(|b| BSrc { init: b.clone(), index: r, len: du }),
                activation,
                gated,
                glu_layout: GluLayout::Interleaved,
                alpha,
                limit,
                f: fu,
                d: du,
            }
        })
        .collect();
    let (weights, idx) = route(&mut p, g, router, inp(14), a.k, e, a.normalize);
    let quant = LayerQuant { w_in: Some(w_in), w_out: Some(w_out), weight_bits: if q.bits == 8 { 8 } else { 4 }, block_size };
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
        quant: Some(Box::new(quant)),
    })
}

/// The name of a tensor of the graph or of the rule's own initializers (scales, 8-bit codes and
/// zero points are always such).
fn name_of(t: &QTensor) -> String {
    match t {
        QTensor::Existing(n) => n.clone(),
        QTensor::New { .. } => unreachable!("scales and zero points are named tensors"),
    }
}

/// identity as `relu(a) - relu(-a)` (as for MoE): fc1 `[W1; -W1]` (codes twice, scales `[s; -s]`,
/// zero points twice), fc2 `[W2, -W2]` along its input (codes twice along each row, scales
/// `[s, -s]` as blocks of the row's half or of the node's block). Nodes in front of the op;
/// ONNX Runtime folds them.
fn identity_pair(
    p: &mut Prep,
    w_in: &mut QWeight,
    w_out: &mut QWeight,
    block_size: &mut Option<[i64; 2]>,
    f: i64,
    bits: i64,
    opset: i64,
) -> Result<(), String> {
    if bits == 2 {
        return Err("identity activation on 2-bit experts: the repacked codes would have to be doubled as well, which the rule does not write".into());
    }
    if block_size.is_some() && !(w_in.blocked && w_out.blocked) {
        return Err("identity activation with block_size and a per-channel scale: the negated half needs one block size for both".into());
    }
    let concat = |p: &mut Prep, a: &str, b: &str, axis: i64, what: &str| -> String {
        let out = format!("{}/{what}", p.tag);
        let mut c = make_node("Concat", "", &out, &[a, b], &[&out]);
        c.attribute.push(attr_int("axis", axis));
        p.nodes.push(c);
        out
    };
    let unsqueezed = |p: &mut Prep, v: &str, what: &str| -> String {
        let out = format!("{}/{what}_column", p.tag);
        if opset >= 13 {
            let axes = format!("{}/{what}_axes", p.tag);
            p.inits.push(crate::onnx::tensor::make_i64(&axes, &[1], &[2]));
            p.nodes.push(make_node("Unsqueeze", "", &out, &[v, &axes], &[&out]));
        } else {
            let mut u = make_node("Unsqueeze", "", &out, &[v], &[&out]);
            u.attribute.push(crate::onnx::graph::attr_ints_new("axes", &[2]));
            p.nodes.push(u);
        }
        out
    };
    let c1 = name_of(&w_in.codes);
    w_in.codes = QTensor::Existing(concat(p, &c1, &c1, 1, "fc1_codes_pair"));
    w_in.scale = QTensor::Existing(p.with_negation(&name_of(&w_in.scale), "fc1_scales", 1));
    if let Some(z) = &w_in.zero_point {
        let z = name_of(z);
        w_in.zero_point = Some(QTensor::Existing(concat(p, &z, &z, 1, "fc1_zero_points_pair")));
    }
    let c2 = name_of(&w_out.codes);
    w_out.codes = QTensor::Existing(concat(p, &c2, &c2, 2, "fc2_codes_pair"));
    let mut s2 = name_of(&w_out.scale);
    let mut z2 = w_out.zero_point.as_ref().map(name_of);
    if !w_out.blocked {
        // one scale per row -> one per half row: blocks of f along the input
        s2 = unsqueezed(p, &s2, "fc2_scales");
        z2 = z2.map(|z| unsqueezed(p, &z, "fc2_zero_points"));
        *block_size = Some([1, f]);
        w_out.blocked = true;
    }
    w_out.scale = QTensor::Existing(p.with_negation(&s2, "fc2_scales", 2));
    w_out.zero_point = z2.map(|z| QTensor::Existing(concat(p, &z, &z, 2, "fc2_zero_points_pair")));
    Ok(())
}

/// The routing as the CPU kernel computes it, in float32: the top k logits (ties to the higher
/// expert), weighted by their softmax, or by `router_weights` at the chosen experts (divided by
/// their sum with `normalize`); weights not above 1e-8 zeroed. Returns (weights, indices).
fn route(p: &mut Prep, g: &GraphIndex, router: &str, router_weights: &str, k: i64, e: i64, normalize: bool) -> (String, String) {
    let tag = p.tag.to_string();
    let to_f32 = |p: &mut Prep, v: &str, what: &str| -> String {
        if g.infer_type(v) == Some(FLOAT) {
            return v.to_string();
        }
        let out = format!("{tag}/{what}_f32");
        let mut c = make_node("Cast", "", &format!("{tag}/Cast_{what}"), &[v], &[&out]);
        c.attribute.push(attr_int("to", FLOAT as i64));
        p.nodes.push(c);
        out
    };
    let logits = to_f32(p, router, "router");
    let (vals, idx) = top_k_last_wins(p, &logits, k, e);
    let node = |p: &mut Prep, op: &str, what: &str, ins: &[&str]| -> String {
        let out = format!("{tag}/{what}");
        p.nodes.push(make_node(op, "", &format!("{tag}/{op}_{what}"), ins, &[&out]));
        out
    };
    let w = if router_weights.is_empty() {
        let out = format!("{tag}/topk_softmax");
        let mut sm = make_node("Softmax", "", &format!("{tag}/Softmax"), &[&vals], &[&out]);
        sm.attribute.push(attr_int("axis", -1));
        p.nodes.push(sm);
        out
    } else {
        let rw = to_f32(p, router_weights, "router_weights");
        let out = format!("{tag}/gathered_weights");
        let mut ge = make_node("GatherElements", "", &format!("{tag}/GatherElements"), &[&rw, &idx], &[&out]);
        ge.attribute.push(attr_int("axis", 1));
        p.nodes.push(ge);
        if normalize {
            let sum = format!("{tag}/weight_sum");
            let mut rs = if g.default_opset() >= 13 {
                let axes = format!("{tag}/sum_axes");
                p.inits.push(crate::onnx::tensor::make_i64(&axes, &[1], &[-1]));
                make_node("ReduceSum", "", &format!("{tag}/ReduceSum"), &[&out, &axes], &[&sum])
            } else {
                let mut r = make_node("ReduceSum", "", &format!("{tag}/ReduceSum"), &[&out], &[&sum]);
                r.attribute.push(crate::onnx::graph::attr_ints_new("axes", &[-1]));
                r
            };
            rs.attribute.push(attr_int("keepdims", 1));
            p.nodes.push(rs);
            // the kernel multiplies by 1 / sum, and by 0 where the sum is 0
            let zero = format!("{tag}/zero");
            p.inits.push(make_tensor(&zero, FLOAT, &[], 0f32.to_le_bytes().to_vec()));
            let inv = node(p, "Reciprocal", "inverse_sum", &[&sum]);
            let is_zero = node(p, "Equal", "sum_is_zero", &[&sum, &zero]);
            let inv = node(p, "Where", "inverse_sum_or_zero", &[&is_zero, &zero, &inv]);
            node(p, "Mul", "normalised_weights", &[&out, &inv])
        } else {
            out
        }
    };
    // assignments with a weight not above 1e-8 are not computed
    let eps = format!("{tag}/threshold");
    p.inits.push(make_tensor(&eps, FLOAT, &[], 1e-8f32.to_le_bytes().to_vec()));
    let zero = format!("{tag}/no_weight");
    p.inits.push(make_tensor(&zero, FLOAT, &[], 0f32.to_le_bytes().to_vec()));
    let kept = node(p, "Greater", "kept", &[&w, &eps]);
    let w = node(p, "Where", "weights", &[&kept, &w, &zero]);
    (w, idx)
}
