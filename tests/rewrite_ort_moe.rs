//! com.microsoft.MoE nodes become Softmax/TopK routing plus one ScatterMoE node; ONNX Runtime's own
//! CPU MoE kernel and the rewritten model (with the plugin) agree at several token counts.

mod common;

use common::build::{int_attr as attr_i, session_from_file as session, string_attr as attr_s, value_info};
use onnx_protobuf::{
    tensor_proto::DataType, AttributeProto, GraphProto, Message, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
};
use ort::session::Session;
use ort::value::Tensor;
use scattermoe::onnx::{self, SaveOptions};

fn init(name: &str, dims: &[i64], seed: &mut u64) -> TensorProto {
    let n: i64 = dims.iter().product();
    let mut t = TensorProto::new();
    t.name = name.into();
    t.dims = dims.to_vec();
    t.data_type = DataType::FLOAT as i32;
    t.float_data = (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            ((*seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32 * 0.6
        })
        .collect();
    t
}

/// x [T, d], router logits [T, E] -> y [T, d] through one com.microsoft.MoE node.
fn moe_model(act: &str, k: i64, normalize: i64, biases: bool, extra: Option<AttributeProto>) -> Vec<u8> {
    let (e, d, f) = (6i64, 16i64, 24i64);
    let n = if act == "swiglu" { 2 * f } else { f };
    let mut seed = 0x1234_5678_9abc_def1u64 ^ (n as u64) ^ ((k as u64) << 20);
    let mut node = NodeProto::new();
    node.op_type = "MoE".into();
    node.domain = "com.microsoft".into();
    node.input = if biases { vec!["x", "r", "fc1", "b1", "fc2", "b2"] } else { vec!["x", "r", "fc1", "", "fc2"] }.into_iter().map(String::from).collect();
    node.output = vec!["y".into()];
    node.attribute.push(attr_i("k", k));
    node.attribute.push(attr_s("activation_type", act));
    node.attribute.push(attr_i("normalize_routing_weights", normalize));
    if act == "swiglu" {
        node.attribute.push(attr_i("swiglu_fusion", 1));
    }
    node.attribute.extend(extra);
    let mut g = GraphProto::new();
    g.name = "moe".into();
    g.node.push(node);
    g.input.push(value_info("x", DataType::FLOAT, &[None, Some(d)]));
    g.input.push(value_info("r", DataType::FLOAT, &[None, Some(e)]));
    g.output.push(value_info("y", DataType::FLOAT, &[None, Some(d)]));
    g.initializer.push(init("fc1", &[e, n, d], &mut seed));
    g.initializer.push(init("fc2", &[e, d, f], &mut seed));
    if biases {
        g.initializer.push(init("b1", &[e, n], &mut seed));
        g.initializer.push(init("b2", &[e, d], &mut seed));
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

fn run(s: &mut Session, t: usize, seed: u64) -> Vec<f32> {
    let mut st = seed | 1;
    let mut next = || {
        st ^= st << 13;
        st ^= st >> 7;
        st ^= st << 17;
        ((st >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0) as f32
    };
    let x: Vec<f32> = (0..t * 16).map(|_| next()).collect();
    let r: Vec<f32> = (0..t * 6).map(|_| next()).collect();
    let out = s
        .run(ort::inputs!["x" => Tensor::from_array(([t, 16], x)).unwrap(), "r" => Tensor::from_array(([t, 6], r)).unwrap()])
        .unwrap();
    out["y"].try_extract_tensor::<f32>().unwrap().1.to_vec()
}

#[test]
fn com_microsoft_moe_becomes_scatter_moe_and_matches_ort() {
    let dir = common::scratch("ort_moe");
    let cases = [("relu", 2, 0, false), ("silu", 2, 1, true), ("gelu", 1, 0, true), ("swiglu", 2, 1, false), ("swiglu", 3, 0, true)];
    for (i, (act, k, norm, biases)) in cases.into_iter().enumerate() {
        let orig = dir.join(format!("moe{i}.onnx"));
        std::fs::write(&orig, moe_model(act, k, norm, biases, None)).unwrap();
        let mut m = onnx::load(&orig).unwrap();
        let rep = scattermoe::rewrite::rewrite(&mut m).unwrap();
        assert_eq!(rep.layers.len(), 1, "{act}: {:?}", rep.rejected);
        assert!(m.graph().node.iter().all(|n| n.op_type != "MoE"));
        let out = dir.join(format!("moe{i}_rw.onnx"));
        onnx::save(m, &out, &SaveOptions::default()).unwrap();
        let (mut a, mut b) = (session(&orig), session(&out));
        for t in [1usize, 7, 33] {
            let (ya, yb) = (run(&mut a, t, 99 + t as u64), run(&mut b, t, 99 + t as u64));
            let scale = ya.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = ya.iter().zip(&yb).fold(0f32, |m, (p, q)| m.max((p - q).abs())) / scale;
            assert!(err < 1e-4, "{act} k={k} normalize={norm} biases={biases}, {t} tokens: relative error {err}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unrecognised_moe_forms_are_left_and_reported() {
    let dir = common::scratch("ort_moe_rej");
    let p = dir.join("m.onnx");
    std::fs::write(&p, moe_model("relu", 2, 0, false, Some(attr_i("use_sparse_mixer", 1)))).unwrap();
    let mut m = onnx::load(&p).unwrap();
    let before = m.graph().node.len();
    let rep = scattermoe::rewrite::rewrite(&mut m).unwrap();
    assert!(rep.layers.is_empty());
    assert_eq!(m.graph().node.len(), before);
    assert!(rep.rejected.iter().any(|r| r.family == "ort_moe" && r.reason.contains("sparse mixer")), "{:?}", rep.rejected);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A QMoE node whose weights are not its uint8 codes (here MoE's float weights under QMoE's name)
/// is left with the reason; QMoE nodes proper are rewritten (tests/rewrite_quantized.rs).
#[test]
fn a_qmoe_node_without_quantized_weights_is_left_with_the_reason() {
    let dir = common::scratch("ort_qmoe");
    let p = dir.join("q.onnx");
    let mut m = ModelProto::parse_from_bytes(&moe_model("relu", 2, 0, false, None)).unwrap();
    m.graph.as_mut().unwrap().node[0].op_type = "QMoE".into();
    std::fs::write(&p, m.write_to_bytes().unwrap()).unwrap();
    let mut m = onnx::load(&p).unwrap();
    let rep = scattermoe::rewrite::rewrite(&mut m).unwrap();
    assert!(rep.layers.is_empty());
    assert!(m.graph().node.iter().any(|n| n.op_type == "QMoE"));
    assert!(rep.rejected.iter().any(|r| r.reason.starts_with("com.microsoft.QMoE: fc")), "{:?}", rep.rejected);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Router logits with many exact ties (each from {-1, 0, 0.5, 1}; every other row all equal).
fn run_ties(s: &mut Session, t: usize, seed: u64) -> Vec<f32> {
    let mut st = seed | 1;
    let mut next = || {
        st ^= st << 13;
        st ^= st >> 7;
        st ^= st << 17;
        st >> 11
    };
    let x: Vec<f32> = (0..t * 16).map(|_| (next() % 1000) as f32 / 250.0 - 2.0).collect();
    let r: Vec<f32> = (0..t * 6).map(|i| if (i / 6) % 2 == 0 { 0.5 } else { [-1.0, 0.0, 0.5, 1.0][(next() % 4) as usize] }).collect();
    let out = s
        .run(ort::inputs!["x" => Tensor::from_array(([t, 16], x)).unwrap(), "r" => Tensor::from_array(([t, 6], r)).unwrap()])
        .unwrap();
    out["y"].try_extract_tensor::<f32>().unwrap().1.to_vec()
}

/// The Softmax/reversed-TopK router the rewrite writes for com.microsoft.MoE becomes one
/// TopKRouter with ONNX Runtime's tie rule (the higher expert number): on tied logits the fused
/// model still matches the MoE kernel, and without fusion (`fuse_router = false`) so does the
/// ONNX router.
#[test]
fn com_microsoft_moe_router_is_fused_with_the_kernels_tie_rule() {
    let dir = common::scratch("ort_moe_router");
    for (i, (k, norm)) in [(2, 1), (1, 0), (3, 0)].into_iter().enumerate() {
        let orig = dir.join(format!("moe{i}.onnx"));
        std::fs::write(&orig, moe_model("silu", k, norm, false, None)).unwrap();
        for fuse in [true, false] {
            let mut m = onnx::load(&orig).unwrap();
            let opts = scattermoe::rewrite::RewriteOptions { fuse_router: fuse, ..Default::default() };
            let rep = scattermoe::rewrite::rewrite_with(&mut m, &opts).unwrap();
            assert_eq!(rep.layers.len(), 1);
            let fused = m.graph().node.iter().filter(|n| n.op_type == "TopKRouter").count();
            if fuse {
                let r = rep.layers[0].router.as_ref().unwrap();
                let want = format!("softmax, k={k}{}, higher_index", if norm == 1 { ", normalize" } else { "" });
                assert!(r.fused && r.detail == want, "k={k}: {} ({})", r.detail, r.fused);
                assert_eq!(fused, 1);
                assert!(m.graph().node.iter().all(|n| !matches!(n.op_type.as_str(), "TopK" | "Slice" | "Softmax")), "the old router stayed");
            } else {
                assert_eq!(fused, 0);
            }
            let out = dir.join(format!("moe{i}_{fuse}.onnx"));
            onnx::save(m, &out, &SaveOptions::default()).unwrap();
            let (mut a, mut b) = (session(&orig), session(&out));
            for t in [1usize, 7, 33] {
                let (ya, yb) = (run_ties(&mut a, t, 5 + t as u64), run_ties(&mut b, t, 5 + t as u64));
                let scale = ya.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = ya.iter().zip(&yb).fold(0f32, |m, (p, q)| m.max((p - q).abs())) / scale;
                assert!(err < 1e-4, "k={k} fused={fuse}, {t} tokens with ties: relative error {err}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
