//! The plugin loaded the way a Rust program loads it: the `ort` crate opens ONNX Runtime,
//! registers libscattermoe_ort.so with `with_operator_library`, and runs a model with a ScatterMoE
//! node; the result is checked against a float64 evaluation written out here.

mod common;

use common::build::{f32_initializer, session_from_bytes as session, string_attr, value_info};
use onnx_protobuf::{tensor_proto::DataType, GraphProto, Message, ModelProto, NodeProto, OperatorSetIdProto};
use ort::session::Session;
use ort::value::Tensor;
use rand::{Rng, SeedableRng};

struct Layer {
    d: usize,
    f: usize,
    e: usize,
    k: usize,
    w_in: Vec<f32>,
    w_out: Vec<f32>,
}

fn model(l: &Layer, activation: &str) -> Vec<u8> {
    let mut node = NodeProto::new();
    node.op_type = scattermoe::spec::scatter_moe::NAME.into();
    node.domain = scattermoe::spec::DOMAIN.into();
    node.input = ["x", "rw", "ri", "w_in", "w_out"].map(String::from).to_vec();
    node.output = vec!["y".into()];
    node.attribute.push(string_attr(scattermoe::spec::scatter_moe::ATTR_ACTIVATION, activation));
    let mut g = GraphProto::new();
    g.name = "moe".into();
    g.node.push(node);
    g.input.push(value_info("x", DataType::FLOAT, &[None, Some(l.d as i64)]));
    g.input.push(value_info("rw", DataType::FLOAT, &[None, Some(l.k as i64)]));
    g.input.push(value_info("ri", DataType::INT64, &[None, Some(l.k as i64)]));
    g.output.push(value_info("y", DataType::FLOAT, &[None, Some(l.d as i64)]));
    g.initializer.push(f32_initializer("w_in", &[l.e as i64, 2 * l.f as i64, l.d as i64], &l.w_in));
    g.initializer.push(f32_initializer("w_out", &[l.e as i64, l.d as i64, l.f as i64], &l.w_out));
    let mut m = ModelProto::new();
    m.ir_version = 9;
    m.graph = Some(g).into();
    for (domain, version) in [("", 17), (scattermoe::spec::DOMAIN, scattermoe::spec::OPSET_VERSION)] {
        let mut o = OperatorSetIdProto::new();
        o.domain = domain.into();
        o.version = version;
        m.opset_import.push(o);
    }
    m.write_to_bytes().unwrap()
}

/// Y[t] = sum_j w[t,j] * W_out[e] (silu(gate) * up), in f64.
fn expected(l: &Layer, x: &[f32], rw: &[f32], ri: &[i64]) -> Vec<f64> {
    let (d, f, k) = (l.d, l.f, l.k);
    let tokens = x.len() / d;
    let mut y = vec![0f64; tokens * d];
    for t in 0..tokens {
        for j in 0..k {
            let e = ri[t * k + j] as usize;
            let a: Vec<f64> = (0..2 * f)
                .map(|r| (0..d).map(|c| l.w_in[(e * 2 * f + r) * d + c] as f64 * x[t * d + c] as f64).sum())
                .collect();
            let h: Vec<f64> = (0..f).map(|i| a[i] / (1.0 + (-a[i]).exp()) * a[f + i]).collect();
            for r in 0..d {
                let o: f64 = (0..f).map(|i| l.w_out[(e * d + r) * f + i] as f64 * h[i]).sum();
                y[t * d + r] += rw[t * k + j] as f64 * o;
            }
        }
    }
    y
}

#[test]
fn scatter_moe_through_the_ort_crate_matches_f64() {
    let seed: u64 = rand::rng().random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let l = Layer {
        d: 24,
        f: 40,
        e: 8,
        k: 2,
        w_in: (0..8 * 80 * 24).map(|_| rng.random_range(-0.3..0.3)).collect(),
        w_out: (0..8 * 24 * 40).map(|_| rng.random_range(-0.3..0.3)).collect(),
    };
    let mut s = session(&model(&l, "silu"));
    for tokens in [1usize, 7, 100] {
        let x: Vec<f32> = (0..tokens * l.d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let rw: Vec<f32> = (0..tokens * l.k).map(|_| rng.random_range(0.0..1.0)).collect();
        // distinct experts per token, like a top-k router; token 0 always on expert 7
        let ri: Vec<i64> = (0..tokens)
            .flat_map(|t| {
                let a = if t == 0 { 7 } else { rng.random_range(0..l.e as i64) };
                [a, (a + 1 + rng.random_range(0..l.e as i64 - 1)) % l.e as i64]
            })
            .collect();
        let want = expected(&l, &x, &rw, &ri);
        let out = s
            .run(ort::inputs![
                "x" => Tensor::from_array(([tokens, l.d], x.clone())).unwrap(),
                "rw" => Tensor::from_array(([tokens, l.k], rw.clone())).unwrap(),
                "ri" => Tensor::from_array(([tokens, l.k], ri.clone())).unwrap(),
            ])
            .unwrap();
        let (shape, got) = out["y"].try_extract_tensor::<f32>().unwrap();
        assert_eq!(shape.to_vec(), vec![tokens as i64, l.d as i64]);
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let err = got.iter().zip(&want).fold(0f64, |m, (g, w)| m.max((*g as f64 - w).abs())) / scale;
        assert!(err < 1e-4, "tokens {tokens}: relative error {err} (seed {seed})");
    }
}

#[test]
fn bad_expert_index_fails_the_run_with_its_value() {
    let l = Layer { d: 4, f: 4, e: 2, k: 1, w_in: vec![0.1; 2 * 8 * 4], w_out: vec![0.1; 2 * 4 * 4] };
    let mut s = session(&model(&l, "silu"));
    let err = s
        .run(ort::inputs![
            "x" => Tensor::from_array(([2usize, 4], vec![1f32; 8])).unwrap(),
            "rw" => Tensor::from_array(([2usize, 1], vec![1f32; 2])).unwrap(),
            "ri" => Tensor::from_array(([2usize, 1], vec![1i64, 2])).unwrap(),
        ])
        .unwrap_err()
        .to_string();
    assert!(err.contains("ScatterMoE: input 'routing_indices' holds 2 at [1, 0], outside [0, 2)"), "{err}");
}

#[test]
fn unsupported_activation_fails_session_creation() {
    let l = Layer { d: 4, f: 4, e: 2, k: 1, w_in: vec![0.1; 2 * 8 * 4], w_out: vec![0.1; 2 * 4 * 4] };
    let env = scattermoe::ort_ops::runtime::environment().expect("ONNX Runtime");
    let plugin = scattermoe::ort_ops::runtime::plugin_path().unwrap();
    let _one_at_a_time = scattermoe::ort_ops::runtime::session_creation_lock();
    let err = Session::builder(env)
        .unwrap()
        .with_operator_library(&plugin)
        .unwrap()
        .commit_from_memory(&model(&l, "swish"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("attribute 'activation' has unsupported value 'swish'"), "{err}");
}
