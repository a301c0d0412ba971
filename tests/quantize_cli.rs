//! `scattermoe quantize` on a rewritten fixture: every format writes a model whose ScatterMoE node
//! holds quantized initializers of the contract's shapes, that ONNX Runtime runs with the plugin,
//! within the error bounds docs/quantize.md documents of the unquantized model's outputs; external
//! data in, external data out; a failure leaves no output.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use ort::session::Session;
use ort::value::Tensor;
use scattermoe::onnx::{self, SaveOptions};
use scattermoe::spec::{self, scatter_moe};

fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_scattermoe")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Nothing but `keep` in `dir`: no output, no temporaries.
fn only(dir: &Path, keep: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
    names.sort();
    let extra: Vec<&String> = names.iter().filter(|n| !keep.contains(&n.as_str())).collect();
    assert!(extra.is_empty(), "left behind: {extra:?}");
}

/// The mixtral fixture rewritten (8 experts, d 32, f 64, float32), saved in `dir`; with
/// `external`, the weights in external data.
fn rewritten(dir: &Path, name: &str, external: bool) -> PathBuf {
    rewritten_fixture(&common::models_dir().join("mixtral.onnx"), dir, name, external)
}

fn rewritten_fixture(fixture: &Path, dir: &Path, name: &str, external: bool) -> PathBuf {
    let mut model = onnx::load(fixture).unwrap();
    let opts = scattermoe::rewrite::RewriteOptions { prove: false, ..Default::default() };
    assert!(!scattermoe::rewrite::rewrite_with(&mut model, &opts).unwrap().layers.is_empty());
    let out = dir.join(name);
    onnx::save(model, &out, &SaveOptions { external_threshold: external.then_some(4096), ..Default::default() }).unwrap();
    out
}

fn session(path: &Path) -> Session {
    let (mut b, _one_at_a_time) = common::build::plugin_builder();
    b.commit_from_file(path).unwrap()
}

/// The model's output on the mixtral fixture's input at 1, 7 and 16 tokens.
fn outputs(path: &Path) -> Vec<Vec<f32>> {
    outputs_on(path, &common::models_dir().join("mixtral.npz"))
}

/// The model's first output, as f32, on the inputs `x_1`, `x_7`, `x_16` of `npz` (float32,
/// float16 or int64), fed to its only graph input.
fn outputs_on(path: &Path, npz: &Path) -> Vec<Vec<f32>> {
    let input = onnx::load(path).unwrap().graph().input[0].name.clone();
    let mut s = session(path);
    let refs = common::read_npz(npz);
    [1usize, 7, 16]
        .iter()
        .map(|&t| {
            let x = &refs.iter().find(|(n, _)| *n == format!("x_{t}")).unwrap().1;
            let out = match x.dtype.as_str() {
                "f4" => s.run(ort::inputs![input.as_str() => Tensor::from_array((x.shape.clone(), x.data.iter().map(|&v| v as f32).collect::<Vec<_>>())).unwrap()]),
                "f2" => s.run(ort::inputs![input.as_str() => Tensor::from_array((x.shape.clone(), x.data.iter().map(|&v| half::f16::from_f64(v)).collect::<Vec<_>>())).unwrap()]),
                _ => s.run(ort::inputs![input.as_str() => Tensor::from_array((x.shape.clone(), x.data.iter().map(|&v| v as i64).collect::<Vec<_>>())).unwrap()]),
            }
            .unwrap();
            match out[0].try_extract_tensor::<f32>() {
                Ok((_, d)) => d.to_vec(),
                Err(_) => out[0].try_extract_tensor::<half::f16>().unwrap().1.iter().map(|v| v.to_f32()).collect(),
            }
        })
        .collect()
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
    diff / want.iter().map(|b| b.abs() as f64).fold(0.0, f64::max)
}

/// The ScatterMoE node of a model, and the element type and shape of the initializer an input reads.
fn moe_node(m: &onnx::Model) -> onnx::proto::NodeProto {
    m.graph().node.iter().find(|n| n.op_type == scatter_moe::NAME).unwrap().clone()
}

fn init(m: &onnx::Model, name: &str) -> (i32, Vec<i64>) {
    let t = m.graph().initializer.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no initializer '{name}'"));
    (t.data_type, t.dims.clone())
}

#[test]
fn every_format_runs_in_onnx_runtime_within_its_bound() {
    let dir = common::scratch("quantize");
    let rw = rewritten(&dir, "rw.onnx", false);
    let want = outputs(&rw);
    // (arguments, w_in's code type and stored shape, scale shape, zero point, weight_bits, block_size, bound)
    type Case<'a> = (&'a [&'a str], i32, [i64; 3], Vec<i64>, bool, Option<i64>, Option<[i64; 2]>, f64);
    let cases: Vec<Case> = vec![
        (&["--fp8"], 17, [8, 128, 32], vec![8, 128], false, None, None, 0.15),
        (&["--fp8", "--block", "16x16"], 17, [8, 128, 32], vec![8, 8, 2], false, None, Some([16, 16]), 0.15),
        (&["--int8"], 2, [8, 128, 32], vec![8, 128], true, Some(8), None, 0.03),
        (&["--int8", "--group", "8", "--symmetric"], 2, [8, 128, 32], vec![8, 128, 4], false, Some(8), Some([1, 8]), 0.03),
        // groups of 128 over in = 32: one partial group a row
        (&["--int4"], 2, [8, 128, 16], vec![8, 128, 1], true, Some(4), Some([1, 128]), 0.35),
        (&["--int4", "--group", "16", "--symmetric"], 2, [8, 128, 16], vec![8, 128, 2], false, Some(4), Some([1, 16]), 0.35),
        (&["--int4", "--per-channel"], 2, [8, 128, 16], vec![8, 128], true, Some(4), None, 0.35),
    ];
    for (args, code, stored, scale, zp, bits, block, bound) in cases {
        let what = args.join(" ");
        let out = dir.join("q.onnx");
        let mut argv = vec!["quantize", rw.to_str().unwrap(), out.to_str().unwrap(), "--force", "--json", "--lengths", "1,5,32"];
        argv.extend_from_slice(args);
        let (status, stdout, stderr) = cli(&argv);
        assert_eq!(status, 0, "{what}: {stderr}");
        // the report: one node, three token counts, each error within the bound
        let rep: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let errs = rep["nodes"][0]["errors"].as_array().unwrap();
        assert_eq!(errs.len(), 3, "{what}: {stdout}");
        for e in errs {
            let v = e[1].as_f64().unwrap();
            assert!(v > 0.0 && v < bound, "{what}: reported error {v} (bound {bound})");
        }
        // the node and its initializers
        let m = onnx::load(&out).unwrap();
        let n = moe_node(&m);
        let input = |i: usize| n.input.get(i).cloned().unwrap_or_default();
        assert_eq!(init(&m, &input(scatter_moe::W_IN)), (code, stored.to_vec()), "{what}");
        assert_eq!(init(&m, &input(scatter_moe::W_IN_SCALE)), (1, scale.clone()), "{what}");
        assert_eq!(init(&m, &input(scatter_moe::W_OUT)).0, code, "{what}");
        assert_eq!(input(scatter_moe::W_IN_ZERO_POINT).is_empty(), !zp, "{what}");
        if zp {
            assert_eq!(init(&m, &input(scatter_moe::W_IN_ZERO_POINT)), (2, scale.clone()), "{what}");
        }
        let attr = |name: &str| n.attribute.iter().find(|a| a.name == name).cloned();
        assert_eq!(attr(spec::quant::ATTR_WEIGHT_BITS).map(|a| a.i), bits, "{what}");
        assert_eq!(attr(spec::quant::ATTR_BLOCK_SIZE).map(|a| [a.ints[0], a.ints[1]]), block, "{what}");
        // the original weights are gone
        let before = moe_node(&onnx::load(&rw).unwrap());
        for w in [scatter_moe::W_IN, scatter_moe::W_OUT] {
            assert!(m.graph().initializer.iter().all(|t| t.name != before.input[w]), "{what}: '{}' kept", before.input[w]);
        }
        // ONNX Runtime runs it, close to the unquantized model
        for (t, (got, want)) in [1, 7, 16].iter().zip(outputs(&out).iter().zip(&want)) {
            let e = rel_err(got, want);
            assert!(e < bound, "{what}: {e} at {t} tokens (bound {bound})");
        }
    }
    only(&dir, &["rw.onnx", "q.onnx"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn external_data_in_and_out() {
    let dir = common::scratch("quantize-ext");
    let rw = rewritten(&dir, "rw.onnx", true);
    assert!(dir.join("rw.onnx.data").exists());
    let out = dir.join("q.onnx");
    let (status, stdout, stderr) = cli(&["quantize", rw.to_str().unwrap(), out.to_str().unwrap(), "--int4", "--group", "16", "-q"]);
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.contains("ScatterMoE 'scattermoe_0' (w_in [8, 128, 32], w_out [8, 32, 64]): relative error"), "{stdout}");
    assert!(stderr.contains("1 node quantized (int4, groups of 16 along in, zero points, float32 scales)"), "{stderr}");
    assert!(dir.join("q.onnx.data").exists(), "external data in, external data out");
    let (want, got) = (outputs(&rw), outputs(&out));
    for (g, w) in got.iter().zip(&want) {
        assert!(rel_err(g, w) < 0.35);
    }
    // the quantized codes are a quarter of the float32 weights' bytes (plus scales and zero points)
    let size = |p: &str| std::fs::metadata(dir.join(p)).unwrap().len();
    assert!(size("q.onnx.data") * 3 < size("rw.onnx.data"), "{} vs {}", size("q.onnx.data"), size("rw.onnx.data"));
    only(&dir, &["rw.onnx", "rw.onnx.data", "q.onnx", "q.onnx.data"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn failures_leave_no_output() {
    let dir = common::scratch("quantize-fail");
    let rw = rewritten(&dir, "rw.onnx", false);
    let out = dir.join("q.onnx");
    let o = out.to_str().unwrap();
    // a model without ScatterMoE or ParallelLinear nodes
    let plain = common::models_dir().join("mixtral.onnx");
    let (status, _, stderr) = cli(&["quantize", plain.to_str().unwrap(), o, "--fp8"]);
    assert_eq!(status, 1);
    assert!(stderr.contains("has no ScatterMoE or ParallelLinear node with expert weights in T: nothing to quantize"), "{stderr}");
    // a weight that is not an initializer
    let mut m = onnx::load(&rw).unwrap();
    let g = m.proto.graph.mut_or_insert_default();
    let w_in = g.node.iter().find(|n| n.op_type == scatter_moe::NAME).unwrap().input[scatter_moe::W_IN].clone();
    let t = g.initializer.iter().position(|t| t.name == w_in).unwrap();
    let t = g.initializer.remove(t);
    g.input.push(common::build::value_info(&w_in, onnx_protobuf::tensor_proto::DataType::FLOAT, &t.dims.iter().map(|&d| Some(d)).collect::<Vec<_>>()));
    let bad = dir.join("input_weight.onnx");
    onnx::save(m, &bad, &SaveOptions::default()).unwrap();
    let (status, _, stderr) = cli(&["quantize", bad.to_str().unwrap(), o, "--int4"]);
    assert_eq!(status, 1);
    assert!(stderr.contains("input 'w_in'") && stderr.contains("is not an initializer: only constant expert weights can be quantized"), "{stderr}");
    // bad arguments
    for (args, want) in [
        (vec!["--fp8", "--symmetric"], "--symmetric is for the integer formats"),
        (vec!["--fp8", "--int4"], "cannot be used with"),
        (vec!["--int4", "--group", "0"], "--group"),
        (vec!["--fp8", "--block", "128"], "is not ROWSxCOLS"),
        (vec![], "required"),
    ] {
        let mut argv = vec!["quantize", rw.to_str().unwrap(), o];
        argv.extend(args.iter().copied());
        let (status, _, stderr) = cli(&argv);
        assert_eq!(status, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    // an existing output is kept without --force
    std::fs::write(&out, b"keep me").unwrap();
    let (status, _, stderr) = cli(&["quantize", rw.to_str().unwrap(), o, "--fp8"]);
    assert_eq!(status, 1);
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    only(&dir, &["rw.onnx", "input_weight.onnx", "q.onnx"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn parallel_linear_nodes_and_float16_models() {
    let dir = common::scratch("quantize-families");
    let families = common::models_dir().join("families");
    // JetMoE's language model: 4 ParallelLinear nodes (its attention experts) and 2 ScatterMoE, float32,
    // the logits after both layers (so a looser bound than one node's);
    // JetMoE's block in float16
    for (fixture, args, bound) in [("jetmoe_lm", ["--int4", "--group", "16"], 0.5), ("jetmoe_moe_f16", ["--fp8", "--block", "32x16"], 0.15)] {
        let rw = rewritten_fixture(&families.join(format!("{fixture}.onnx")), &dir, &format!("{fixture}.onnx"), false);
        let out = dir.join(format!("{fixture}.q.onnx"));
        let mut argv = vec!["quantize", rw.to_str().unwrap(), out.to_str().unwrap(), "--json"];
        argv.extend_from_slice(&args);
        let (status, stdout, stderr) = cli(&argv);
        assert_eq!(status, 0, "{fixture}: {stderr}");
        let rep: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let ops: Vec<&str> = rep["nodes"].as_array().unwrap().iter().map(|n| n["op"].as_str().unwrap()).collect();
        let m = onnx::load(&out).unwrap();
        // the nodes with expert weights (a fused router's TopKRouter has none)
        let weighted = |n: &&onnx_protobuf::NodeProto| n.op_type == spec::scatter_moe::NAME || n.op_type == spec::parallel_linear::NAME;
        let on_graph: Vec<&str> = m.graph().node.iter().filter(|n| n.domain == spec::DOMAIN).filter(weighted).map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, on_graph, "{fixture}: every node of the contract quantized");
        let npz = families.join(format!("{fixture}.npz"));
        for (got, want) in outputs_on(&out, &npz).iter().zip(&outputs_on(&rw, &npz)) {
            let e = rel_err(got, want);
            eprintln!("{fixture}: model relative error {e:.3e}");
            assert!(e < bound, "{fixture}: {e} (bound {bound})");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
