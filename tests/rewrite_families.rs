//! The fixtures of models/families/ (JetMoE's MoE block and a whole JetMoE LM with its
//! Mixture-of-Attention, whole tiny Mixtral and Qwen3-MoE LMs, Llama-4, Nemotron-H, GLM-5-Next and
//! HY-V4 blocks): each is rewritten into the
//! expected number of ScatterMoE / ParallelLinear nodes (one ScatterMoE per MoE layer), or left with
//! the expected reason; the rewritten model, run in ONNX Runtime (CPU) with the plugin, reproduces
//! torch's outputs at 1, 7 and the traced 16 tokens (float32 1e-4, float16 1e-2).

mod common;

/// The rules are checked here against torch's outputs with the numeric proof off: the proof has
/// its own tests (tests/rewrite_prove.rs), and the forms it cannot prove yet are listed in
/// docs/rewriter.md.
const UNPROVEN: scattermoe::rewrite::RewriteOptions = scattermoe::rewrite::RewriteOptions { target: scattermoe::rewrite::Target::OnnxRuntime, prove: false, fuse_router: true };

use ort::session::Session;
use ort::value::Tensor;
use scattermoe::onnx::{self, SaveOptions};
use scattermoe::spec;

/// name, input name, ScatterMoE nodes, ParallelLinear nodes (the same as models/families/index.json)
const REWRITTEN: &[(&str, &str, usize, usize)] = &[
    ("jetmoe_moe", "hidden_states", 1, 0),
    ("jetmoe_moe_f16", "hidden_states", 1, 0),
    // two decoder layers: MoE (ScatterMoE) and MoA (query and output projections: ParallelLinear)
    ("jetmoe_lm", "input_ids", 2, 4),
    ("mixtral_lm", "input_ids", 2, 0),
    ("qwen3_moe_lm", "input_ids", 2, 0),
    // with past keys and values as inputs (5 cached positions)
    ("mixtral_lm_past", "input_ids", 2, 0),
    ("qwen3_moe_lm_past", "input_ids", 2, 0),
    // Llama-4: top-1 sigmoid scores scale the experts' inputs; the shared expert stays
    ("llama4_moe", "hidden_states", 1, 0),
    ("llama4_moe_f16", "hidden_states", 1, 0),
    ("llama4_moe_ts", "hidden_states", 1, 0),
    // Llama-4 with top-2 routing: one row per assignment, summed over k after the op
    ("llama4_moe_k2", "hidden_states", 1, 0),
    ("llama4_moe_k2_ts", "hidden_states", 1, 0),
    // Nemotron-H: non-gated squared-ReLU experts (relu2); eager TorchScript, batched_mm dynamo, and
    // float16 experts summed in float32
    ("nemotron_h_moe", "hidden_states", 1, 0),
    ("nemotron_h_moe_bmm_dynamo", "hidden_states", 1, 0),
    ("nemotron_h_moe_f16", "hidden_states", 1, 0),
    // GLM-5-Next and HY-V4: silu(min(gate, l)) * clamp(up, -l, l) experts (swiglu_limit)
    ("glm5_next_moe", "hidden_states", 1, 0),
    ("hy_v4_moe_bmm_dynamo", "hidden_states", 1, 0),
    // blocks of the matrix (models/matrix.py cases): float16 rows with non-gated experts; float16
    // rows whose experts compute in float32; a loop unrolled over 2 of 4 experts; routers other
    // than TopK (PhiMoE's sparsemixer, Zaya's masked skip class) in the batched_mm form
    ("switch_f16", "hidden_states", 1, 0),
    ("openai_privacy_filter_f16", "hidden_states", 1, 0),
    ("ernie45_moe", "hidden_states", 1, 0),
    ("phimoe_bmm", "hidden_states", 1, 0),
    ("zaya_bmm_dynamo", "hidden_states", 1, 0),
    // transformers 4.57's Mixtral block: its loop over the hit experts, accumulating into zeros
    // shaped by (batch * sequence, hidden) arithmetic instead of zeros_like
    ("mixtral_tf4_57", "hidden_states", 1, 0),
    // transformers 4.46's Mixtral block through the dynamo exporter (ScatterND add, GatherND rows)
    ("mixtral_tf4_46_dynamo", "hidden_states", 1, 0),
    // transformers 4.57's Qwen3-VL-MoE: dense experts over repeated rows, reshaped by batch
    ("qwen3_vl_moe_tf4_57", "hidden_states", 1, 0),
    ("qwen3_vl_moe_tf4_57_dynamo_f16", "hidden_states", 1, 0),
    // transformers 4.57's GPT-OSS loop: one-hot of E + 1 classes, the dense gate's column as weight
    ("gpt_oss_tf4_57", "hidden_states", 1, 0),
    // transformers 4.57's DeepSeek-V2: per-expert blocks of the sorted rows (Slice at count sums)
    ("deepseek_v2_tf4_57", "hidden_states", 1, 0),
    // Gemma 4's whole LM: the experts beside a dense MLP in each decoder layer, the router on the
    // residual and the experts on its second pre-norm; eager (TorchScript: the loop unrolled over
    // the hit experts, which ONNX Runtime runs only when all 4 are hit) and batched_mm (TorchScript,
    // dynamo: the rows an RMSNorm of reshaped rows, rank 2 through the norm)
    ("gemma4_lm", "input_ids", 2, 0),
    ("gemma4_lm_bmm", "input_ids", 2, 0),
    ("gemma4_lm_bmm_dynamo", "input_ids", 2, 0),
    // DiffusionGemma's text encoder: the same layers in another model (batched_mm, TorchScript and
    // dynamo)
    ("diffusion_gemma_enc_bmm", "input_ids", 2, 0),
    ("diffusion_gemma_enc_bmm_dynamo", "input_ids", 2, 0),
];

/// Fixtures the rewriter must replace with the numeric proof on (the default), each layer proven
/// (JetMoE's LM: its 2 MoE layers as ScatterMoE and its 4 Mixture-of-Attention projections as
/// ParallelLinear; Gemma 4's LMs: the proof draws the value the router and the experts' rows are
/// both computed from, prove/region.rs `common_source`).
/// JetMoE's float16 block is proven against its float32 twin (ONNX Runtime's CPU provider has no
/// float16 ScatterND with a reduction, so the region itself runs at no token count).
const PROVEN: &[&str] =
    &["switch_f16", "openai_privacy_filter_f16", "ernie45_moe", "phimoe_bmm", "zaya_bmm_dynamo", "llama4_moe", "jetmoe_moe", "jetmoe_lm", "jetmoe_moe_f16", "mixtral_tf4_57", "mixtral_tf4_46_dynamo", "qwen3_vl_moe_tf4_57", "qwen3_vl_moe_tf4_57_dynamo_f16", "gpt_oss_tf4_57", "deepseek_v2_tf4_57", "gemma4_lm", "gemma4_lm_bmm", "gemma4_lm_bmm_dynamo", "diffusion_gemma_enc_bmm", "diffusion_gemma_enc_bmm_dynamo"];

fn dir() -> std::path::PathBuf {
    common::models_dir().join("families")
}

fn session(path: &std::path::Path) -> Session {
    let env = scattermoe::ort_ops::runtime::environment().expect("ONNX Runtime");
    let plugin = scattermoe::ort_ops::runtime::plugin_path().expect("libscattermoe_ort.so");
    let _one_at_a_time = scattermoe::ort_ops::runtime::session_creation_lock();
    Session::builder(env).unwrap().with_operator_library(&plugin).unwrap().commit_from_file(path).unwrap()
}

fn value(x: &common::Array) -> ort::value::DynValue {
    match x.dtype.as_str() {
        "f4" => Tensor::from_array((x.shape.clone(), x.data.iter().map(|&v| v as f32).collect::<Vec<_>>())).unwrap().into_dyn(),
        "f2" => Tensor::from_array((x.shape.clone(), x.data.iter().map(|&v| half::f16::from_f64(v)).collect::<Vec<_>>())).unwrap().into_dyn(),
        "i8" => Tensor::from_array((x.shape.clone(), x.data.iter().map(|&v| v as i64).collect::<Vec<_>>())).unwrap().into_dyn(),
        d => panic!("input dtype {d}"),
    }
}

/// Runs `s` on the named inputs and returns the first output as f64.
fn run(s: &mut Session, inputs: &[(String, common::Array)]) -> Result<Vec<f64>, String> {
    let feed: Vec<(String, ort::session::SessionInputValue)> = inputs.iter().map(|(n, a)| (n.clone(), value(a).into())).collect();
    let out = s.run(feed).map_err(|e| e.to_string())?;
    let v = &out[0];
    Ok(if let Ok((_, d)) = v.try_extract_tensor::<f32>() {
        d.iter().map(|&v| v as f64).collect()
    } else {
        let (_, d) = v.try_extract_tensor::<half::f16>().unwrap();
        d.iter().map(|v| v.to_f64()).collect()
    })
}

fn count(model: &onnx::Model, op: &str) -> usize {
    model.graph().node.iter().filter(|n| n.domain == spec::DOMAIN && n.op_type == op).count()
}

/// Rewrites `name`, checks the node counts, and compares with torch: the errors per token count.
fn check(name: &str, input: &str, smoe: usize, pl: usize, scratch: &std::path::Path) -> Result<Vec<(usize, f64)>, String> {
    check_with(name, input, smoe, pl, scratch, &UNPROVEN, None)
}

fn check_with(
    name: &str,
    input: &str,
    smoe: usize,
    pl: usize,
    scratch: &std::path::Path,
    opts: &scattermoe::rewrite::RewriteOptions,
    router: Option<&str>,
) -> Result<Vec<(usize, f64)>, String> {
    let mut model = onnx::load(&dir().join(format!("{name}.onnx"))).map_err(|e| e.to_string())?;
    let report = scattermoe::rewrite::rewrite_with(&mut model, opts).map_err(|e| e.to_string())?;
    // every layer's router fused into one TopKRouter node with these attributes
    if let Some(want) = router {
        for l in &report.layers {
            match &l.router {
                Some(r) if r.fused && r.detail.starts_with(want) => {}
                other => return Err(format!("router {other:?}, expected fused as '{want}'")),
            }
        }
        if count(&model, spec::topk_router::NAME) != report.layers.len() {
            return Err(format!("{} TopKRouter nodes for {} layers", count(&model, spec::topk_router::NAME), report.layers.len()));
        }
    }
    if opts.prove && report.layers.iter().any(|l| l.proof.is_none()) {
        return Err(format!("a layer was written unproven:\n{}", report.text()));
    }
    let (got_smoe, got_pl) = (count(&model, spec::scatter_moe::NAME), count(&model, spec::parallel_linear::NAME));
    if (got_smoe, got_pl) != (smoe, pl) || report.layers.len() != smoe + pl {
        return Err(format!(
            "{got_smoe} ScatterMoE, {got_pl} ParallelLinear, {} reported layers; expected {smoe} and {pl}:\n{}",
            report.layers.len(),
            report.text()
        ));
    }
    // the report names each replaced layer once
    let mut outs: Vec<&str> = report.layers.iter().map(|l| l.output.as_str()).collect();
    outs.sort();
    outs.dedup();
    if outs.len() != smoe + pl {
        return Err(format!("the report lists a layer twice:\n{}", report.text()));
    }
    let out = scratch.join(format!("{name}.onnx"));
    onnx::save(model, &out, &SaveOptions::default()).map_err(|e| e.to_string())?;
    let mut s = session(&out);
    let refs = common::read_npz(&dir().join(format!("{name}.npz")));
    let get = |k: &str| refs.iter().find(|(n, _)| n == k).map(|(_, a)| a.clone()).unwrap();
    // float16 inputs: float16's tolerance, also where the block returns float32 (Nemotron-H sums
    // its float16 experts in float32)
    let tol = if get("y_1").dtype == "f2" || get("x_1").dtype == "f2" { 1e-2 } else { 1e-4 };
    let mut errors = Vec::new();
    for tokens in [1usize, 7, 16] {
        let y = get(&format!("y_{tokens}"));
        // the first input, and any others saved as in_<name>_<tokens> (past keys and values)
        let mut inputs = vec![(input.to_string(), get(&format!("x_{tokens}")))];
        let suffix = format!("_{tokens}");
        for (k, a) in &refs {
            if let Some(n) = k.strip_prefix("in_").and_then(|n| n.strip_suffix(&suffix)) {
                inputs.push((n.to_string(), a.clone()));
            }
        }
        let got = run(&mut s, &inputs).map_err(|e| format!("{tokens} tokens: {e}"))?;
        if got.len() != y.data.len() {
            return Err(format!("{tokens} tokens: {} outputs, torch has {}", got.len(), y.data.len()));
        }
        let scale = y.data.iter().fold(0f64, |m, v| m.max(v.abs()));
        let err = got.iter().zip(&y.data).fold(0f64, |m, (a, b)| m.max((a - b).abs())) / scale;
        if !(err <= tol) {
            return Err(format!("{tokens} tokens: relative error {err:.3e} > {tol:.0e}"));
        }
        errors.push((tokens, err));
    }
    Ok(errors)
}

#[test]
fn family_fixtures_are_rewritten_one_node_per_layer_and_match_torch() {
    let scratch = common::scratch("families");
    let mut failures = Vec::new();
    for &(name, input, smoe, pl) in REWRITTEN {
        match check(name, input, smoe, pl, &scratch) {
            Ok(errs) => println!(
                "{name:<16} {smoe} ScatterMoE + {pl} ParallelLinear, rel. error vs torch: {}",
                errs.iter().map(|(t, e)| format!("{t} tok {e:.1e}")).collect::<Vec<_>>().join(", ")
            ),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(failures.is_empty(), "{} of {} failed:\n{}", failures.len(), REWRITTEN.len(), failures.join("\n"));
}

/// With the proof on, the blocks of the matrix that ONNX Runtime runs as exported, and JetMoE's
/// block and whole LM, are replaced, every layer proven, and still match torch.
#[test]
fn matrix_blocks_are_rewritten_with_the_proof_on() {
    let scratch = common::scratch("families_proven");
    let mut failures = Vec::new();
    for name in PROVEN {
        let &(_, input, smoe, pl) = REWRITTEN.iter().find(|r| r.0 == *name).unwrap();
        if let Err(e) = check_with(name, input, smoe, pl, &scratch, &scattermoe::rewrite::RewriteOptions::default(), None) {
            failures.push(format!("{name}: {e}"));
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(failures.is_empty(), "{} of {} failed:\n{}", failures.len(), PROVEN.len(), failures.join("\n"));
}

/// Routers with a selection bias and a group-limited choice (DeepSeek-V3 in both exporters and in
/// float16, DeepSeek-V2's group_limited_greedy, Mistral 4) and MiniMax-M2's biased sigmoid: each
/// fused into one TopKRouter node with the attributes the model's code says (8 experts in 4 groups
/// of 2, the best 2 compete), proven, and the whole block still matching torch; Ernie-4.5's
/// biased softmax whose sum is clamped from below; the OpenAI privacy filter's top-k softmax
/// divided by k.
const GROUP_ROUTERS: &[(&str, &str)] = &[
    ("deepseek_v3_groups", "sigmoid, k=2, normalize, lower_index, bias, groups 2/4 top2_sum, eps 1e-20, scale 2.5"),
    // the dynamo exporter drops torch's `+ 1e-20` (a no-op on float32 sums of sigmoids)
    ("deepseek_v3_groups_bmm_dynamo", "sigmoid, k=2, normalize, lower_index, bias, groups 2/4 top2_sum, scale 2.5"),
    ("deepseek_v3_groups_f16", "sigmoid, k=2, normalize, lower_index, bias, groups 2/4 top2_sum, eps 1e-20, scale 2.5"),
    ("deepseek_v2_groups", "softmax, k=2, lower_index, groups 2/4 max fill 0, weights from choice"),
    ("mistral4_groups_dynamo", "softmax, k=2, normalize, lower_index, groups 2/4 top2_sum fill 0"),
    ("minimax_m2_moe", "sigmoid, k=2, normalize, lower_index, bias"),
    // Ernie-4.5: softmax, its moe_statics as the bias, the sum clamped from below by norm_min
    ("ernie45_moe", "softmax, k=2, normalize, lower_index, bias, min 1e-12"),
    // the OpenAI privacy filter: the top-k softmax divided by k (a Div by a constant: scale 1 / k)
    ("openai_privacy_filter_f16", "topk_softmax, k=2, lower_index, scale 0.5"),
];

#[test]
fn biased_and_group_limited_routers_are_fused_proven_and_match_torch() {
    let scratch = common::scratch("families_groups");
    let mut failures = Vec::new();
    for &(name, router) in GROUP_ROUTERS {
        match check_with(name, "hidden_states", 1, 0, &scratch, &scattermoe::rewrite::RewriteOptions::default(), Some(router)) {
            Ok(errs) => println!("{name:<30} {router}: rel. error vs torch {errs:?}"),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(failures.is_empty(), "{} of {} failed:\n{}", failures.len(), GROUP_ROUTERS.len(), failures.join("\n"));
}

/// Gemma 4's router weights each chosen expert by a learned per-expert scale
/// (`per_expert_scale[top_k_index]`): in every Gemma 4 and DiffusionGemma fixture (TorchScript's
/// `Gather`, dynamo's `GatherND`) each layer's router is one TopKRouter node with that table as
/// its `expert_scale`, proven, and the whole model still matches torch (the fixtures' tables are
/// random, so a router that dropped them would not).
#[test]
fn per_expert_scaled_routers_are_fused_proven_and_match_torch() {
    let scratch = common::scratch("families_expert_scale");
    let names = ["gemma4_lm", "gemma4_lm_bmm", "gemma4_lm_bmm_dynamo", "diffusion_gemma_enc_bmm", "diffusion_gemma_enc_bmm_dynamo"];
    let mut failures = Vec::new();
    for name in names {
        let router = "softmax, k=2, normalize, lower_index, expert scale";
        match check_with(name, "input_ids", 2, 0, &scratch, &scattermoe::rewrite::RewriteOptions::default(), Some(router)) {
            Ok(errs) => println!("{name:<32} {router}: rel. error vs torch {errs:?}"),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(failures.is_empty(), "{} of {} failed:\n{}", failures.len(), names.len(), failures.join("\n"));
}

/// The types the op computes in follow the original's: float16 rows whose experts compute in
/// float32 are cast up before the node (the node is float32, as the value it replaces), float16
/// experts stay float16.
#[test]
fn the_op_computes_in_the_type_the_experts_computed_in() {
    for (name, elem, casts_rows) in [("openai_privacy_filter_f16", "float32", true), ("switch_f16", "float16", false)] {
        let mut model = onnx::load(&dir().join(format!("{name}.onnx"))).unwrap();
        let report = scattermoe::rewrite::rewrite_with(&mut model, &UNPROVEN).unwrap();
        assert_eq!(report.layers.len(), 1, "{name}: {}", report.text());
        assert_eq!(report.layers[0].elem_type, elem, "{name}");
        let node = model.graph().node.iter().find(|n| n.op_type == spec::scatter_moe::NAME).unwrap();
        let x = &node.input[0];
        let cast = model.graph().node.iter().find(|n| n.output.iter().any(|o| o == x) && n.op_type == "Cast");
        assert_eq!(cast.is_some(), casts_rows, "{name}: X = {x}");
    }
}

/// Zaya's eager loop is left, with why: its router gives a token expert 0 twice when it picks the
/// skip class, and the exported loop keeps only one of the two rows.
#[test]
fn zaya_eager_loop_is_left_with_the_reason() {
    let mut model = onnx::load(&dir().join("zaya_moe.onnx")).unwrap();
    let report = scattermoe::rewrite::rewrite_with(&mut model, &UNPROVEN).unwrap();
    assert!(report.layers.is_empty(), "{}", report.text());
    assert!(report.rejected.iter().any(|r| r.family == "hf_loop" && r.reason.contains("without a reduction")), "{}", report.text());
}

/// torch's TorchScript exporter writes JetMoE's `index_add` as ScatterElements without a
/// reduction (a token's two rows overwrite each other: ONNX Runtime's result is 96% off torch's at
/// the traced length, see index.json) and the expert counts as the traced constants. The rewriter
/// must not turn that graph into something else silently: it leaves it and says why.
#[test]
fn jetmoe_torchscript_export_is_left_with_the_reason() {
    let mut model = onnx::load(&dir().join("jetmoe_moe_ts.onnx")).unwrap();
    let report = scattermoe::rewrite::rewrite_with(&mut model, &UNPROVEN).unwrap();
    assert!(report.layers.is_empty(), "{}", report.text());
    assert!(report.rejected.iter().any(|r| r.family == "jetmoe" && r.reason.contains("ScatterElements without a reduction")), "{}", report.text());
}

/// Mixtral exported whole by the dynamo exporter with transformers' "batched_mm" experts: the
/// per-assignment Gather of stacked weights and batched MatMul is the batched_mm family's form
/// (src/rewrite/batched.rs), not JetMoE's.
#[test]
#[ignore = "needs the batched_mm rule (src/rewrite/batched.rs)"]
fn mixtral_lm_batched_mm_dynamo_is_rewritten() {
    let scratch = common::scratch("families_bmm");
    let r = check("mixtral_lm_bmm_dynamo", "input_ids", 2, 0, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    r.unwrap();
}

/// The fixtures of the activations added for Nemotron-H (relu2), GLM-5-Next and HY-V4
/// (swiglu_limit) and of Llama-4 with k = 2, rewritten with the numeric proof on: each layer is
/// proven, with the activation and its constants the models use.
#[test]
fn relu2_swiglu_limit_and_llama4_top2_are_proven() {
    // name, activation, gated, alpha and limit (swiglu_limit), k
    type Case = (&'static str, &'static str, bool, Option<(f32, f32)>, usize);
    let cases: [Case; 7] = [
        ("nemotron_h_moe", "relu2", false, None, 2),
        ("nemotron_h_moe_bmm_dynamo", "relu2", false, None, 2),
        ("nemotron_h_moe_f16", "relu2", false, None, 2),
        ("glm5_next_moe", "swiglu_limit", true, Some((1.0, 0.5)), 2),
        ("hy_v4_moe_bmm_dynamo", "swiglu_limit", true, Some((1.0, 1.0)), 2),
        ("llama4_moe_k2", "silu", true, None, 2),
        ("llama4_moe_k2_ts", "silu", true, None, 2),
    ];
    for (name, act, gated, clamp, k) in cases {
        let mut model = onnx::load(&dir().join(format!("{name}.onnx"))).unwrap();
        let report = scattermoe::rewrite::rewrite(&mut model).unwrap();
        assert_eq!(report.layers.len(), 1, "{name}: {}", report.text());
        let l = &report.layers[0];
        assert!(l.proof.is_some(), "{name}: {}", report.text());
        assert_eq!((l.activation, l.gated, l.k), (act, gated, Some(k)), "{name}: {}", report.text());
        let node = model.graph().node.iter().find(|n| n.op_type == spec::scatter_moe::NAME).unwrap();
        let f = |a: &str| node.attribute.iter().find(|x| x.name == a).map(|x| x.f);
        if let Some((alpha, limit)) = clamp {
            assert_eq!((f("alpha"), f("limit")), (Some(alpha), Some(limit)), "{name}");
        }
    }
}

/// A wrong candidate of the new forms is stopped by the proof: swiglu_limit with its limit 1% off
/// (GLM-5-Next), Llama-4 top-2, and JetMoE's and Gemma 4's MoE layers inside their LMs with two
/// experts swapped.
#[test]
fn wrong_swiglu_limit_and_llama4_top2_candidates_are_not_proven() {
    use scattermoe::onnx::graph::GraphIndex;
    use scattermoe::rewrite::emit::MoeLayer;
    use scattermoe::rewrite::rule::Rule;
    use scattermoe::rewrite::{batched, hf_loop, jetmoe, llama4, moa, Rejection, RewriteOptions};
    struct Spoiled(fn(&GraphIndex) -> (Vec<MoeLayer>, Vec<Rejection>), fn(&mut MoeLayer));
    impl Rule for Spoiled {
        fn name(&self) -> &'static str {
            "spoiled"
        }
        fn find(&self, g: &GraphIndex) -> (Vec<MoeLayer>, Vec<Rejection>) {
            let (mut found, rejected) = (self.0)(g);
            found.iter_mut().for_each(self.1);
            (found, rejected)
        }
    }
    let limit_off: fn(&mut MoeLayer) = |l| l.experts.iter_mut().for_each(|m| m.limit *= 1.01);
    let swap: fn(&mut MoeLayer) = |l| l.experts.swap(0, 1);
    // (the Mixture-of-Attention projections the driver adds beside the rules are not counted)
    for (name, rule, layers) in [
        ("glm5_next_moe", Spoiled(hf_loop::find, limit_off), 1),
        ("llama4_moe_k2", Spoiled(llama4::find, swap), 1),
        ("jetmoe_lm", Spoiled(jetmoe::find, swap), 2),
        // Gemma 4: proven from the value its router and its experts' rows share (common_source)
        ("gemma4_lm", Spoiled(hf_loop::find, swap), 2),
        ("gemma4_lm_bmm_dynamo", Spoiled(batched::find, swap), 2),
    ] {
        for prove in [true, false] {
            let mut model = onnx::load(&dir().join(format!("{name}.onnx"))).unwrap();
            let opts = RewriteOptions { prove, ..Default::default() };
            let report = scattermoe::rewrite::rewrite_with_rules(&mut model, &opts, &[&rule as &dyn Rule]).unwrap();
            let written = report.layers.iter().filter(|l| l.family != moa::FAMILY).count();
            if prove {
                assert_eq!(written, 0, "{name}: written although wrong\n{}", report.text());
                let stopped = report.rejected.iter().filter(|r| r.reason.starts_with("not proven") && r.reason.contains("relative error")).count();
                assert_eq!(stopped, layers, "{name}: {}", report.text());
            } else {
                // without the proof the same candidates are written: the proof is what stops them
                assert_eq!(written, layers, "{name}: {}", report.text());
            }
        }
    }
}

/// JetMoE's `index_add` must add into zeros: onto any other value (here the token rows
/// themselves, a shape ONNX Runtime accepts) the graph keeps that value in the sum, which the
/// replacement would drop. The rule refuses it, with the proof off and on.
#[test]
fn jetmoe_index_add_onto_the_rows_is_left() {
    use scattermoe::onnx::graph::GraphIndex;
    use scattermoe::rewrite::jetmoe;
    for prove in [false, true] {
        let mut model = onnx::load(&dir().join("jetmoe_moe.onnx")).unwrap();
        let (at, x) = {
            let g = GraphIndex::new(model.graph(), Some(&model.ext)).unwrap();
            let regions = jetmoe::regions(&g);
            assert_eq!(regions.len(), 1);
            let r = regions[0].1.as_ref().unwrap();
            (r.output.clone(), r.x.clone())
        };
        let gm = model.proto.graph.mut_or_insert_default();
        let n = gm.node.iter_mut().find(|n| n.output[0] == at && n.op_type == "ScatterND").unwrap();
        n.input[0] = x;
        let opts = scattermoe::rewrite::RewriteOptions { prove, ..Default::default() };
        let report = scattermoe::rewrite::rewrite_with(&mut model, &opts).unwrap();
        assert!(report.layers.is_empty(), "{}", report.text());
        assert!(report.rejected.iter().any(|r| r.family == "jetmoe" && r.reason.contains("not zeros")), "{}", report.text());
    }
}

/// ParallelLinear candidates (JetMoE's Mixture-of-Attention projections, from the LM) are proven
/// like ScatterMoE ones: each right candidate is proven, and the same candidate with two experts'
/// weights swapped is stopped by the proof (without it the driver would write it: the emitted
/// node loads and runs).
#[test]
fn spoiled_parallel_linear_candidates_are_not_proven() {
    use scattermoe::onnx::graph::GraphIndex;
    use scattermoe::rewrite::{jetmoe, moa, prove};
    let model = onnx::load(&dir().join("jetmoe_lm.onnx")).unwrap();
    let mut g = GraphIndex::new(model.graph(), Some(&model.ext)).unwrap();
    g.opset = model.opset("").unwrap_or(17);
    let mut taken = Vec::new();
    let mut checked = 0;
    for (at, r) in jetmoe::regions(&g) {
        let Ok(mut r) = r else { continue };
        if !matches!(r.form, jetmoe::Form::Linear(_)) {
            continue;
        }
        let right = moa::emit(&g, &r, &format!("right_{checked}"), &mut taken, Default::default()).unwrap();
        let proof = prove::prove_subject(&model, &g, &right.subject, &right.emitted);
        let proof = proof.unwrap_or_else(|e| panic!("{at}: the right candidate is not proven: {e:#}"));
        assert!(proof.tokens.contains(&1) && proof.cases >= 4 * proof.tokens.len(), "{at}: {}", proof.text());
        if let jetmoe::Form::Linear(gl) = &mut r.form {
            gl.w.swap(0, 1);
        }
        let spoiled = moa::emit(&g, &r, &format!("spoiled_{checked}"), &mut taken, Default::default()).unwrap();
        let err = prove::prove_subject(&model, &g, &spoiled.subject, &spoiled.emitted).expect_err(&format!("{at}: proven although two experts are swapped"));
        assert!(err.to_string().contains("relative error"), "{at}: {err:#}");
        checked += 1;
    }
    // map and reduce of each of the two decoder layers
    assert_eq!(checked, 4);
}

/// JetMoE's float16 block: ONNX Runtime's CPU provider runs its region at no token count (no
/// float16 ScatterND with a reduction), so the proof compares the replacement with the region's
/// float32 twin at float16's tolerance plus the rounding gap (`prove/twin.rs`). The right candidate
/// is proven so; the same candidate with two experts swapped, or gelu for silu, is still refused
/// at that tolerance, and without the proof both would be written.
#[test]
fn jetmoe_float16_is_proven_against_its_float32_twin_and_spoiled_candidates_are_not() {
    use scattermoe::onnx::graph::GraphIndex;
    use scattermoe::rewrite::emit::MoeLayer;
    use scattermoe::rewrite::prove::{Reference, ROUNDING_GAP};
    use scattermoe::rewrite::rule::Rule;
    use scattermoe::rewrite::{jetmoe, Rejection, RewriteOptions};
    struct Spoiled(fn(&mut MoeLayer));
    impl Rule for Spoiled {
        fn name(&self) -> &'static str {
            "jetmoe"
        }
        fn find(&self, g: &GraphIndex) -> (Vec<MoeLayer>, Vec<Rejection>) {
            let (mut found, rejected) = jetmoe::find(g);
            found.iter_mut().for_each(self.0);
            (found, rejected)
        }
    }
    let tolerance = 1e-2 + ROUNDING_GAP[0];
    let right: fn(&mut MoeLayer) = |_| {};
    let swap: fn(&mut MoeLayer) = |l| l.experts.swap(0, 1);
    let gelu: fn(&mut MoeLayer) = |l| l.experts.iter_mut().for_each(|m| m.activation = spec::Activation::Gelu);
    for (what, spoil) in [("right", right), ("experts 0 and 1 swapped", swap), ("gelu for silu", gelu)] {
        for prove in [true, false] {
            let mut model = onnx::load(&dir().join("jetmoe_moe_f16.onnx")).unwrap();
            let opts = RewriteOptions { prove, ..Default::default() };
            let report = scattermoe::rewrite::rewrite_with_rules(&mut model, &opts, &[&Spoiled(spoil) as &dyn Rule]).unwrap();
            if !prove || what == "right" {
                assert_eq!(report.layers.len(), 1, "{what}: {}", report.text());
                if let Some(p) = &report.layers[0].proof {
                    assert_eq!(p.reference, Reference::RegionFloat32, "{what}: {}", p.text());
                    assert!((p.tolerance - tolerance).abs() < 1e-12 && p.max_rel_err <= 1e-2 && p.tokens.len() == 4, "{what}: {}", p.text());
                    println!("{what}: {}", p.text());
                }
                continue;
            }
            assert!(report.layers.is_empty(), "{what}: written although wrong\n{}", report.text());
            let r = report.rejected.iter().find(|r| r.reason.starts_with("not proven")).unwrap_or_else(|| panic!("{what}: {}", report.text()));
            assert!(r.reason.contains("relative error") && r.reason.contains(&format!("> {tolerance:.1e}")), "{what}: {}", r.reason);
            println!("{what}: {}", r.reason);
        }
    }
}

/// Ernie-4.5's block, exported by TorchScript as a loop unrolled over the 2 of its 4 experts the
/// traced input hit, runs only where exactly 2 experts get tokens: the proof's routing with exactly
/// k experts hit runs it at every token count, not at 1 token alone.
#[test]
fn ernie45_is_proven_at_every_token_count() {
    let mut model = onnx::load(&dir().join("ernie45_moe.onnx")).unwrap();
    let report = scattermoe::rewrite::rewrite(&mut model).unwrap();
    assert_eq!(report.layers.len(), 1, "{}", report.text());
    let p = report.layers[0].proof.as_ref().unwrap();
    assert_eq!(p.tokens, scattermoe::rewrite::prove::TOKENS, "{}", p.text());
    assert!(p.max_rel_err <= 1e-4, "{}", p.text());
}
