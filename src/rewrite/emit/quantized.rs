//! The node's quantized-weight inputs and attributes: the layer's own [`LayerQuant`]
//! (`com.microsoft.QMoE`), or the one `quant.rs` lays out from weights matched through
//! `DequantizeLinear`; new tensors become pending tensors, written while the model is saved.

use anyhow::{anyhow, bail, Result};
use onnx_protobuf::AttributeProto;

use super::{unique_name, Emitted, MoeLayer, Target};
use crate::onnx::graph::{attr_int, attr_ints_new, GraphIndex};
use crate::onnx::tensor::make_tensor;
use crate::onnx::PendingTensor;
use crate::rewrite::expr::WSrc;
use crate::rewrite::quant::{self, LayerQuant, OpFormat, QTensor};

/// What the node reads for its quantized weights.
#[derive(Default)]
pub(super) struct QInputs {
    /// the codes in place of `w_in` / `w_out`
    pub w_in: Option<String>,
    pub w_out: Option<String>,
    /// `w_in_scale`, `w_out_scale`, `w_in_zero_point`, `w_out_zero_point`
    pub params: [Option<String>; 4],
    pub attrs: Vec<AttributeProto>,
    /// what the report says of them
    pub describe: Option<String>,
}

fn tensor(g: &GraphIndex, t: &QTensor, base: &str, taken: &mut Vec<String>, model: &mut Emitted) -> String {
    match t {
        QTensor::Existing(name) => name.clone(),
        QTensor::New { what, data_type, dims, produce } => {
            let name = unique_name(g, taken, &format!("{base}_{what}"));
            let p = produce.clone();
            model.pending.push(PendingTensor {
                name: name.clone(),
                data_type: *data_type,
                dims: dims.clone(),
                produce: Box::new(move |ext, sink| p(ext, sink)),
            });
            name
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn inputs(
    g: &GraphIndex,
    layer: &MoeLayer,
    w_in: &[Vec<WSrc>],
    w_out: &[Vec<WSrc>],
    elem: i32,
    tag: &str,
    taken: &mut Vec<String>,
    model: &mut Emitted,
    target: Target,
) -> Result<QInputs> {
    let lq: LayerQuant = match &layer.quant {
        Some(q) => (**q).clone(),
        None => {
            let outs: Vec<WSrc> = w_out.iter().map(|p| p[0].clone()).collect();
            match quant::plan(g, w_in, &outs, elem).map_err(|e| anyhow!("{e}"))? {
                Some(q) => q,
                None => return Ok(QInputs::default()),
            }
        }
    };
    let mut q = QInputs { describe: Some(lq.describe()), ..Default::default() };
    let mut uint8 = false;
    for (j, (w, what)) in [(&lq.w_in, "w_in"), (&lq.w_out, "w_out")].into_iter().enumerate() {
        let Some(w) = w else { continue };
        uint8 |= w.format != OpFormat::Fp8;
        let base = format!("{tag}.{what}");
        let codes = tensor(g, &w.codes, &base, taken, model);
        if j == 0 {
            q.w_in = Some(codes);
        } else {
            q.w_out = Some(codes);
        }
        q.params[j] = Some(tensor(g, &w.scale, &base, taken, model));
        q.params[2 + j] = w.zero_point.as_ref().map(|z| tensor(g, z, &base, taken, model));
    }
    if uint8 {
        q.attrs.push(attr_int("weight_bits", lq.weight_bits as i64));
    }
    if target == Target::TensorRt {
        trt_fill(g, &lq, tag, taken, model, &mut q)?;
    }
    let blocked = [&lq.w_in, &lq.w_out].into_iter().flatten().any(|w| w.blocked);
    if let (true, Some(b)) = (blocked, lq.block_size) {
        q.attrs.push(attr_ints_new("block_size", &b));
    }
    Ok(q)
}

/// TensorRT's ONNX parser cannot pass an absent input before a present one (docs/tensorrt.md),
/// so a hole among the quantization inputs is filled where a value means the same as absence: an
/// integer weight's zero point left out is its default, 2^(bits - 1), written out. A hole nothing
/// can fill (a weight in T before a quantized one has no scale; an fp8 weight takes no zero point)
/// makes the layer a rejection with the reason, never a node TensorRT would misread.
fn trt_fill(g: &GraphIndex, lq: &LayerQuant, tag: &str, taken: &mut Vec<String>, model: &mut Emitted, q: &mut QInputs) -> Result<()> {
    if q.params[0].is_none() && q.params[1].is_some() {
        bail!(
            "quantized expert weights ({}): w_in is not quantized and w_out is, and the TensorRT target cannot leave w_in_scale out before w_out_scale",
            lq.describe()
        );
    }
    if q.params[2].is_none() && q.params[3].is_some() {
        let w = lq.w_in.as_ref().ok_or_else(|| anyhow!("a w_out zero point without a quantized w_in"))?;
        if w.format == OpFormat::Fp8 {
            bail!(
                "quantized expert weights ({}): w_in is fp8, which takes no zero point, and the TensorRT target cannot leave w_in_zero_point out before w_out_zero_point",
                lq.describe()
            );
        }
        let dims = match &w.scale {
            QTensor::Existing(name) => g.const_dims(name).ok_or_else(|| anyhow!("cannot tell the shape of w_in's scale '{name}'"))?,
            QTensor::New { dims, .. } => dims.clone(),
        };
        let count: i64 = dims.iter().product();
        let name = unique_name(g, taken, &format!("{tag}.w_in_default_zero_point"));
        let z = 1u8 << (lq.weight_bits - 1);
        model.initializers.push(make_tensor(&name, onnx_protobuf::tensor_proto::DataType::UINT8 as i32, &dims, vec![z; count as usize]));
        q.params[2] = Some(name);
    }
    Ok(())
}

/// A `ParallelLinear`'s quantized weight: its codes (in place of `W`), `W_scale` and
/// `W_zero_point` (`""` where absent), the node's attributes, and what the report says of them.
pub(in crate::rewrite) type LinearInputs = (String, [String; 2], Vec<AttributeProto>, String);

/// A `ParallelLinear` weight `ws` (one matrix per expert) matched through `DequantizeLinear`:
/// the codes in place of `W`, then `W_scale` and `W_zero_point` (`""` where absent), and the
/// node's attributes. None where the weight is not dequantized.
pub(in crate::rewrite) fn linear_inputs(
    g: &GraphIndex,
    ws: &[WSrc],
    elem: i32,
    base: &str,
    taken: &mut Vec<String>,
    model: &mut Emitted,
) -> Result<Option<LinearInputs>> {
    let parts: Vec<Vec<WSrc>> = ws.iter().map(|w| vec![w.clone()]).collect();
    let Some(lq) = quant::plan(g, &parts, &[], elem).map_err(|e| anyhow!("{e}"))? else { return Ok(None) };
    let Some(w) = &lq.w_in else { return Ok(None) };
    let codes = tensor(g, &w.codes, base, taken, model);
    let scale = tensor(g, &w.scale, base, taken, model);
    let zero = w.zero_point.as_ref().map(|z| tensor(g, z, base, taken, model)).unwrap_or_default();
    let mut attrs = Vec::new();
    if w.format != OpFormat::Fp8 {
        attrs.push(attr_int("weight_bits", lq.weight_bits as i64));
    }
    if let (true, Some(b)) = (w.blocked, lq.block_size) {
        attrs.push(attr_ints_new("block_size", &b));
    }
    let what = LayerQuant { w_in: Some(w.clone()), ..lq.clone() }.describe().replace("w_in", "W").replace(", w_out float", "");
    Ok(Some((codes, [scale, zero], attrs, what)))
}
