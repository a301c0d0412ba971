//! Quantized expert weights (models/quantized, made by its generate.py): every fixture whose
//! experts come through DequantizeLinear is rewritten with the proof on into a ScatterMoE (or
//! ParallelLinear) node that reads the quantized codes, scales and zero points, and the rewritten
//! model, run in ONNX Runtime (CPU) with the plugin, reproduces the quantized graph's own outputs
//! at its token counts; the spoiled fixtures are left with their reason. Also: com.microsoft.QMoE
//! nodes built here are rewritten and match ONNX Runtime's own QMoE kernel.

mod common;

use std::path::Path;

use common::build::{int_attr, plugin_builder, string_attr, value_info};
use onnx_protobuf::{tensor_proto::DataType, GraphProto, Message, ModelProto, NodeProto, OperatorSetIdProto, TensorProto};
use ort::session::Session;
use ort::value::Tensor;
use scattermoe::onnx::{self, SaveOptions};
use scattermoe::rewrite::{rewrite_with, RewriteOptions};
use scattermoe::spec;

/// A session with the plugin, DequantizeLinear-fed MatMuls run as written (ONNX Runtime would fuse
/// them into MatMulNBits with int8 activations; the fixtures' outputs are the graph's as written).
fn session_from_file(path: &Path) -> Session {
    let (b, _one_at_a_time) = plugin_builder();
    b.with_config_entry("session.disable_quant_qdq", "1").unwrap().commit_from_file(path).unwrap()
}

fn quantized_dir() -> std::path::PathBuf {
    common::models_dir().join("quantized")
}

struct Entry {
    name: String,
    layers: usize,
    reason: Option<String>,
    f16: bool,
}

/// index.json's entries (a small reader: the file is ours and flat).
fn entries() -> Vec<Entry> {
    let text = std::fs::read_to_string(quantized_dir().join("index.json")).unwrap();
    let field = |obj: &str, key: &str| -> Option<String> {
        let at = obj.find(&format!("\"{key}\": "))? + key.len() + 4;
        let rest = &obj[at..];
        let end = rest.find([',', '\n', '}']).unwrap_or(rest.len());
        let v = rest[..end].trim();
        (v != "null").then(|| v.trim_matches('"').to_string())
    };
    text.split("\n  {")
        .skip(1)
        .map(|obj| Entry {
            name: field(obj, "name").unwrap(),
            layers: field(obj, "layers").unwrap().parse().unwrap(),
            reason: field(obj, "reason"),
            f16: field(obj, "dtype").as_deref() == Some("float16"),
        })
        .collect()
}

fn run(s: &mut Session, x: &common::Array) -> Vec<f64> {
    let name = s.inputs()[0].name().to_string();
    let out = match x.dtype.as_str() {
        "f4" => s.run(ort::inputs![name => Tensor::from_array((x.shape.clone(), x.data.iter().map(|&v| v as f32).collect::<Vec<_>>())).unwrap()]),
        "f2" => s.run(ort::inputs![name => Tensor::from_array((x.shape.clone(), x.data.iter().map(|&v| half::f16::from_f64(v)).collect::<Vec<_>>())).unwrap()]),
        d => panic!("input dtype {d}"),
    }
    .unwrap();
    let v = &out[0];
    if let Ok((_, d)) = v.try_extract_tensor::<f32>() {
        d.iter().map(|&v| v as f64).collect()
    } else {
        let (_, d) = v.try_extract_tensor::<half::f16>().unwrap();
        d.iter().map(|v| v.to_f64()).collect()
    }
}

fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-9);
    got.iter().zip(want).fold(0f64, |m, (a, b)| m.max((a - b).abs())) / scale
}

fn check(e: &Entry, dir: &Path) -> Result<String, String> {
    let mut model = onnx::load(&quantized_dir().join(format!("{}.onnx", e.name))).map_err(|e| e.to_string())?;
    let report = rewrite_with(&mut model, &RewriteOptions::default()).map_err(|e| e.to_string())?;
    if let Some(reason) = &e.reason {
        if !report.layers.is_empty() || !report.rejected.iter().any(|r| r.reason.contains(reason.as_str())) {
            return Err(format!("must be left with '{reason}': {} replaced, rejected {:?}", report.layers.len(), report.rejected));
        }
        return Ok("left: ".to_string() + reason);
    }
    if report.layers.len() != e.layers {
        return Err(format!("{} layers replaced, {} expected; rejected: {:?}", report.layers.len(), e.layers, report.rejected));
    }
    for l in &report.layers {
        if l.quantized.is_none() || l.proof.is_none() {
            return Err(format!("layer {} is not quantized and proven: {:?} / {:?}", l.output, l.quantized, l.proof.is_some()));
        }
    }
    // the node reads quantized codes: no float copy of the experts' weights was made
    let g = model.graph();
    let quantized_nodes = g
        .node
        .iter()
        .filter(|n| n.domain == spec::DOMAIN && (n.op_type == spec::scatter_moe::NAME || n.op_type == spec::parallel_linear::NAME))
        .filter(|n| {
            let w = if n.op_type == spec::scatter_moe::NAME { spec::scatter_moe::W_IN } else { spec::parallel_linear::W };
            let ty = g
                .initializer
                .iter()
                .find(|t| t.name == n.input[w])
                .map(|t| t.data_type)
                .or_else(|| model.pending.iter().find(|t| t.name == n.input[w]).map(|t| t.data_type));
            matches!(ty, Some(2 | 17))
        })
        .count();
    if quantized_nodes == 0 {
        return Err("no node reads uint8 or float8 codes".into());
    }
    let out = dir.join(format!("{}.onnx", e.name));
    onnx::save(model, &out, &SaveOptions::default()).map_err(|e| e.to_string())?;
    let mut s = session_from_file(&out);
    let refs = common::read_npz(&quantized_dir().join(format!("{}.npz", e.name)));
    let tol = if e.f16 { 1e-2 } else { 1e-4 };
    let mut errs = Vec::new();
    for (k, x) in refs.iter().filter(|(k, _)| k.starts_with("x_")) {
        let t = &k[2..];
        let y = &refs.iter().find(|(n, _)| n == &format!("y_{t}")).unwrap().1;
        let got = run(&mut s, x);
        if got.len() != y.data.len() {
            return Err(format!("{t} tokens: {} outputs, the graph has {}", got.len(), y.data.len()));
        }
        let err = rel_err(&got, &y.data);
        if err.is_nan() || err > tol {
            return Err(format!("{t} tokens: relative error {err:.3e} > {tol:.0e}"));
        }
        errs.push(format!("{t} tok {err:.1e}"));
    }
    if errs.is_empty() {
        return Err("no token count to compare".into());
    }
    Ok(errs.join(", "))
}

#[test]
fn every_quantized_fixture_is_rewritten_proven_and_matches_its_graph() {
    let dir = common::scratch("quantized");
    let list = entries();
    assert!(list.len() >= 20, "quantized fixtures missing: {}", list.len());
    let mut failures = Vec::new();
    for e in &list {
        match check(e, &dir) {
            Ok(s) => println!("{:<46} {s}", e.name),
            Err(err) => failures.push(format!("{}: {err}", e.name)),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{} of {} failed:\n{}", failures.len(), list.len(), failures.join("\n"));
}

fn u8_init(name: &str, dims: &[i64], seed: &mut u64) -> TensorProto {
    let n: i64 = dims.iter().product();
    let mut t = TensorProto::new();
    t.name = name.into();
    t.dims = dims.to_vec();
    t.data_type = DataType::UINT8 as i32;
    t.raw_data = (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed >> 40) as u8
        })
        .collect();
    t
}

fn f32_init(name: &str, dims: &[i64], lo: f32, hi: f32, seed: &mut u64) -> TensorProto {
    let n: i64 = dims.iter().product();
    let vals: Vec<f32> = (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            lo + (hi - lo) * ((*seed >> 11) as f64 / (1u64 << 53) as f64) as f32
        })
        .collect();
    common::build::f32_initializer(name, dims, &vals)
}

/// x [T, 32], router logits [T, 4] -> y through one QMoE node of `bits`-bit experts.
fn qmoe_model(bits: i64, block: i64, zero: bool, act: &str) -> Vec<u8> {
    let (e, d, f) = (4i64, 32i64, 32i64);
    let n = if act == "swiglu" { 2 * f } else { f };
    let per = 8 / bits;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ ((bits as u64) << 8) ^ (block as u64);
    let mut node = NodeProto::new();
    node.op_type = "QMoE".into();
    node.domain = "com.microsoft".into();
    let mut ins = vec!["x", "r", "fc1", "s1", "", "fc2", "s2"];
    if zero {
        ins.extend(["", "", "", "", "z1", "z2"]);
    }
    node.input = ins.into_iter().map(String::from).collect();
    node.output = vec!["y".into()];
    node.attribute.push(int_attr("k", 2));
    node.attribute.push(string_attr("activation_type", act));
    node.attribute.push(int_attr("expert_weight_bits", bits));
    if block > 0 {
        node.attribute.push(int_attr("block_size", block));
    }
    if act == "swiglu" {
        node.attribute.push(int_attr("swiglu_fusion", 1));
    }
    let mut g = GraphProto::new();
    g.name = "qmoe".into();
    g.node.push(node);
    g.input.push(value_info("x", DataType::FLOAT, &[None, Some(d)]));
    g.input.push(value_info("r", DataType::FLOAT, &[None, Some(e)]));
    g.output.push(value_info("y", DataType::FLOAT, &[None, Some(d)]));
    let scale_dims = |rows: i64, inp: i64| if block > 0 { vec![e, rows, inp / block] } else { vec![e, rows] };
    let s = 1.0 / (1i64 << bits) as f32 / 4.0;
    g.initializer.push(u8_init("fc1", &[e, n, d / per], &mut seed));
    g.initializer.push(f32_init("s1", &scale_dims(n, d), 0.5 * s, 1.5 * s, &mut seed));
    g.initializer.push(u8_init("fc2", &[e, d, f / per], &mut seed));
    g.initializer.push(f32_init("s2", &scale_dims(d, f), 0.5 * s, 1.5 * s, &mut seed));
    if zero {
        let packed = |mut dims: Vec<i64>| {
            let last = dims.len() - 1;
            dims[last] = (dims[last] + per - 1) / per;
            dims
        };
        g.initializer.push(u8_init("z1", &packed(scale_dims(n, d)), &mut seed));
        g.initializer.push(u8_init("z2", &packed(scale_dims(d, f)), &mut seed));
    }
    let mut m = ModelProto::new();
    m.ir_version = 9;
    m.graph = Some(g).into();
    for (dom, v) in [("", 17), ("com.microsoft", 1)] {
        let mut o = OperatorSetIdProto::new();
        o.domain = dom.into();
        o.version = v;
        m.opset_import.push(o);
    }
    m.write_to_bytes().unwrap()
}

fn run_qmoe(s: &mut Session, t: usize, seed: u64) -> Vec<f64> {
    let mut st = seed | 1;
    let mut next = || {
        st ^= st << 13;
        st ^= st >> 7;
        st ^= st << 17;
        ((st >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0) as f32
    };
    let x: Vec<f32> = (0..t * 32).map(|_| next()).collect();
    let r: Vec<f32> = (0..t * 4).map(|_| next()).collect();
    let out = s.run(ort::inputs!["x" => Tensor::from_array(([t, 32usize], x)).unwrap(), "r" => Tensor::from_array(([t, 4usize], r)).unwrap()]).unwrap();
    out[0].try_extract_tensor::<f32>().unwrap().1.iter().map(|&v| v as f64).collect()
}

#[test]
fn qmoe_nodes_become_quantized_scattermoe_and_match_the_qmoe_kernel() {
    let dir = common::scratch("qmoe");
    for (bits, block, zero, act) in
        [(8, 0, false, "relu"), (8, 0, true, "silu"), (4, 0, true, "gelu"), (4, 16, false, "swiglu"), (4, 32, true, "relu"), (2, 0, true, "relu")]
    {
        let what = format!("{bits}-bit, block {block}, zero points {zero}, {act}");
        let bytes = qmoe_model(bits, block, zero, act);
        let src = dir.join("qmoe.onnx");
        std::fs::write(&src, &bytes).unwrap();
        let mut model = onnx::load(&src).unwrap();
        let report = rewrite_with(&mut model, &RewriteOptions::default()).unwrap();
        assert_eq!(report.layers.len(), 1, "{what}: {:?}", report.rejected);
        assert!(report.layers[0].proof.is_some() && report.layers[0].quantized.is_some(), "{what}");
        assert!(!model.graph().node.iter().any(|n| n.op_type == "QMoE"), "{what}");
        let out = dir.join(format!("qmoe_{bits}_{block}_{zero}_{act}.rw.onnx"));
        onnx::save(model, &out, &SaveOptions::default()).unwrap();
        let mut kernel = session_from_file(&src);
        let mut rewritten = session_from_file(&out);
        for t in [1usize, 7, 16] {
            let want = run_qmoe(&mut kernel, t, 77 + t as u64);
            let got = run_qmoe(&mut rewritten, t, 77 + t as u64);
            let err = rel_err(&got, &want);
            assert!(err <= 1e-4, "{what}, {t} tokens: relative error {err:.3e}");
        }
    }
    // the forms ONNX Runtime's CPU kernel computes with int8 activations are left with the reason
    for (bits, block) in [(8, 16), (2, 16)] {
        let src = dir.join("qmoe_left.onnx");
        std::fs::write(&src, qmoe_model(bits, block, false, "relu")).unwrap();
        let mut model = onnx::load(&src).unwrap();
        let report = rewrite_with(&mut model, &RewriteOptions::default()).unwrap();
        assert!(report.layers.is_empty(), "{bits}-bit blocks must be left");
        assert!(report.rejected.iter().any(|r| r.reason.contains("activations")), "{:?}", report.rejected);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
