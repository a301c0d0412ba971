//! `scattermoe quantize IN OUT`: the expert weights of every `ScatterMoE` and `ParallelLinear`
//! node of a model (a rewritten one), quantized into a form of docs/op-spec.md's "Quantized expert
//! weights", written as a new model, with each node's error on random inputs.
//!
//! Everything is checked before anything is written: every node's weights are constant
//! initializers in `T`, and the quantized node passes the contract's check. Each node is then
//! quantized in memory (its weights alone) and run through the CPU kernels against the original
//! for the report. The save quantizes each weight again, one expert at a time, straight into the
//! output (external data for large weights, as `rewrite` writes it); the output appears only when
//! complete.

mod codec;
mod measure;
mod plan;

use std::path::Path;

use anyhow::{bail, Result};
use half::{bf16, f16};

use crate::cpu::Element;
use crate::onnx::{self, SaveOptions};
use crate::progress::{Progress, Unit};
use crate::spec::{ElemType, QuantFormat, ScaleLayout};
use plan::{Plan, WeightPlan};

pub use codec::{fp8_e4m3fn, quantize_matrix, Quantized};

/// What to make of the weights.
#[derive(Debug, Clone)]
pub struct Options {
    pub format: QuantFormat,
    pub layout: ScaleLayout,
    /// zero points given (integer formats; asymmetric ranges)
    pub zero_point: bool,
    /// token counts of the error report
    pub lengths: Vec<usize>,
    /// replace OUTPUT when it exists
    pub force: bool,
}

impl Options {
    /// How the scale layout and format read in the report: `int4, groups of 128 along in, zero points`.
    pub fn describe(&self) -> String {
        let form = match self.format {
            QuantFormat::Fp8E4M3Fn => "fp8 e4m3fn",
            QuantFormat::Int8 => "int8",
            QuantFormat::Int4 => "int4",
        };
        let layout = match self.layout {
            ScaleLayout::PerChannel => "one scale per output channel".to_string(),
            ScaleLayout::Blocks { block_out: 1, block_in } => format!("groups of {block_in} along in"),
            ScaleLayout::Blocks { block_out, block_in } => format!("{block_out}x{block_in} blocks"),
        };
        let zp = match (self.format, self.zero_point) {
            (QuantFormat::Fp8E4M3Fn, _) => "",
            (_, true) => ", zero points",
            (_, false) => ", symmetric",
        };
        format!("{form}, {layout}{zp}, float32 scales")
    }
}

/// One node's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeReport {
    pub node: String,
    pub op: &'static str,
    /// `(input, shape)` of every weight quantized
    pub weights: Vec<(String, Vec<i64>)>,
    /// `(tokens, relative error)` at each token count of the report
    pub errors: Vec<(usize, f64)>,
}

impl NodeReport {
    pub fn text(&self) -> String {
        let w: Vec<String> = self.weights.iter().map(|(n, s)| format!("{n} {s:?}")).collect();
        let e: Vec<String> = self.errors.iter().map(|(t, e)| format!("{e:.2e} at {t} token{}", if *t == 1 { "" } else { "s" })).collect();
        format!("{} '{}' ({}): relative error {}", self.op, self.node, w.join(", "), e.join(", "))
    }

    /// The largest error over the token counts.
    pub fn worst(&self) -> f64 {
        self.errors.iter().map(|e| e.1).fold(0.0, f64::max)
    }
}

/// Quantizes `input` into `output` (see the module comment); returns each node's report.
pub fn quantize_file(input: &Path, output: &Path, opts: &Options, progress: &dyn Progress) -> Result<Vec<NodeReport>> {
    if opts.lengths.is_empty() || opts.lengths.contains(&0) {
        bail!("--lengths takes token counts of at least 1");
    }
    let mut model = onnx::load_with_progress(input, progress)?;
    onnx::output::check_output(output, opts.force, &model.input_files())?;
    super::file::check_graph(&model, input)?;
    let plans = plan::plan(&model, opts)?;
    if plans.is_empty() {
        bail!("{} has no ScatterMoE or ParallelLinear node with expert weights in T: nothing to quantize", input.display());
    }
    progress.begin("measure", Some(plans.len() as u64), Unit::Items("nodes"));
    let mut reports = Vec::with_capacity(plans.len());
    for (i, p) in plans.iter().enumerate() {
        reports.push(measure_node(&model, p, opts, i as u64)?);
        progress.advance(1);
    }
    progress.end();
    // external data out when it came in (the weights that held it are replaced by new tensors,
    // which the save would otherwise write inline), as `rewrite` does
    let external_threshold = model.has_external_data().then_some(1024);
    plan::apply(&mut model, plans, opts)?;
    onnx::save_with_progress(model, output, &SaveOptions { force: opts.force, external_threshold }, None, progress)?;
    Ok(reports)
}

/// The node's weights quantized in memory, and its error against the original.
fn measure_node(model: &onnx::Model, p: &Plan, opts: &Options, seed: u64) -> Result<NodeReport> {
    let weights: Vec<(Vec<f32>, Quantized)> = p
        .weights
        .iter()
        .map(|w| {
            let values = w.values(model)?;
            let per = w.out * w.in_;
            let mut q = Quantized { codes: Vec::new(), scales: Vec::new(), zero_points: Vec::new() };
            for e in 0..w.experts {
                let one = quantize_matrix(&w.quant, &values[e * per..(e + 1) * per], w.out, w.in_);
                q.codes.extend(one.codes);
                q.scales.extend(one.scales);
                q.zero_points.extend(one.zero_points);
            }
            Ok((values, q))
        })
        .collect::<Result<_>>()?;
    let biases: Vec<Option<Vec<f32>>> =
        p.biases.iter().map(|b| b.as_ref().map(|t| onnx::tensor::tensor_f32(t, Some(&model.ext))).transpose()).collect::<Result<_>>()?;
    let errors = match p.elem {
        ElemType::F32 => errors::<f32>(p, &weights, &biases, opts, seed)?,
        ElemType::F16 => errors::<f16>(p, &weights, &biases, opts, seed)?,
        ElemType::BF16 => errors::<bf16>(p, &weights, &biases, opts, seed)?,
    };
    let weights = p.weights.iter().map(|w| (w.port.to_string(), vec![w.experts as i64, w.out as i64, w.in_ as i64])).collect();
    Ok(NodeReport { node: p.node_name.clone(), op: p.op_name(), weights, errors })
}

fn errors<E: Element>(p: &Plan, weights: &[(Vec<f32>, Quantized)], biases: &[Option<Vec<f32>>], opts: &Options, seed: u64) -> Result<Vec<(usize, f64)>> {
    let to_e = |v: &[f32]| -> Vec<E> { v.iter().map(|&x| E::from_f32(x)).collect() };
    let plain: Vec<Vec<E>> = weights.iter().map(|(v, _)| to_e(v)).collect();
    let biases: Vec<Option<Vec<E>>> = biases.iter().map(|b| b.as_deref().map(to_e)).collect();
    let both = |i: usize| measure::Both { plain: &plain[i], quant: p.weights[i].quant, q: &weights[i].1 };
    let node = match &p.attrs {
        plan::Attrs::Moe(attrs) => {
            let (w_in, w_out): (&WeightPlan, &WeightPlan) = (&p.weights[0], &p.weights[1]);
            measure::Node::Moe {
                attrs: *attrs,
                experts: w_in.experts,
                d: w_in.in_,
                f: w_out.in_,
                w_in: both(0),
                w_out: both(1),
                b_in: biases[0].as_deref(),
                b_out: biases[1].as_deref(),
            }
        }
        plan::Attrs::Linear(attrs) => {
            let w = &p.weights[0];
            measure::Node::Linear { attrs: *attrs, experts: w.experts, d_in: w.in_, d_out: w.out, w: both(0), b: biases[0].as_deref() }
        }
    };
    let k = p.k.max(1);
    opts.lengths.iter().map(|&t| Ok((t, node.error(t, k, seed * 1000 + t as u64)?))).collect()
}
