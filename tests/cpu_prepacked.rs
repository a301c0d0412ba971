//! The CPU kernels' packed path as ONNX Runtime reaches it: weights (and biases) that are
//! constant initializers are packed when the session creates the kernel; the same weights fed as
//! graph inputs take the unpacked path. Both are checked against a float64 evaluation, at sizes
//! that leave partial panels and row tiles, and with an expert that gets no rows.

mod common;

use common::build::{session_from_bytes as session, string_attr, value_info};
use onnx_protobuf::{
    tensor_proto::DataType, AttributeProto, GraphProto, Message, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
};
use ort::session::Session;
use ort::value::Tensor;
use rand::{rngs::StdRng, Rng, SeedableRng};
use scattermoe::spec::{self, GluLayout};

/// A float tensor the node reads: its values, its dims, and whether the graph holds it as an
/// initializer (constant) or takes it as an input.
struct Weight<'a> {
    name: &'a str,
    dims: Vec<i64>,
    data: &'a [f32],
    constant: bool,
}

/// A one-node model: inputs `x`, `rw` (unless absent from `inputs`), `ri`, then `weights`.
fn model(op: &str, inputs: &[&str], attrs: Vec<AttributeProto>, x_width: usize, k: usize, weights: &[Weight], y_width: usize) -> Vec<u8> {
    let mut node = NodeProto::new();
    node.op_type = op.into();
    node.domain = spec::DOMAIN.into();
    node.input = inputs.iter().map(|s| s.to_string()).collect();
    node.output = vec!["y".into()];
    node.attribute = attrs;
    let mut g = GraphProto::new();
    g.name = "op".into();
    g.node.push(node);
    g.input.push(value_info("x", DataType::FLOAT, &[None, Some(x_width as i64)]));
    for r in ["rw", "gates"] {
        if inputs.contains(&r) {
            g.input.push(value_info(r, DataType::FLOAT, &[None, Some(k as i64)]));
        }
    }
    g.input.push(value_info("ri", DataType::INT64, &[None, Some(k as i64)]));
    for w in weights {
        if w.constant {
            let mut t = TensorProto::new();
            t.name = w.name.into();
            t.dims = w.dims.clone();
            t.data_type = DataType::FLOAT as i32;
            t.float_data = w.data.to_vec();
            g.initializer.push(t);
        } else {
            g.input.push(value_info(w.name, DataType::FLOAT, &w.dims.iter().map(|&d| Some(d)).collect::<Vec<_>>()));
        }
    }
    g.output.push(value_info("y", DataType::FLOAT, &[None, Some(y_width as i64)]));
    let mut m = ModelProto::new();
    m.ir_version = 9;
    m.graph = Some(g).into();
    for (domain, version) in [("", 17), (spec::DOMAIN, spec::OPSET_VERSION)] {
        let mut o = OperatorSetIdProto::new();
        o.domain = domain.into();
        o.version = version;
        m.opset_import.push(o);
    }
    m.write_to_bytes().unwrap()
}

/// Runs `s` on `x`, `ri` and the named `[tokens, k]` floats, feeding the non-constant weights.
fn run(s: &mut Session, x: &[f32], x_width: usize, ri: &[i64], k: usize, per_slot: &[(&str, &[f32])], weights: &[Weight]) -> Vec<f32> {
    let tokens = ri.len() / k;
    let mut feeds: Vec<(String, ort::value::DynValue)> = vec![
        ("x".into(), Tensor::from_array(([tokens, x_width], x.to_vec())).unwrap().into_dyn()),
        ("ri".into(), Tensor::from_array(([tokens, k], ri.to_vec())).unwrap().into_dyn()),
    ];
    for (name, v) in per_slot {
        feeds.push((name.to_string(), Tensor::from_array(([tokens, k], v.to_vec())).unwrap().into_dyn()));
    }
    for w in weights.iter().filter(|w| !w.constant) {
        let dims: Vec<usize> = w.dims.iter().map(|&d| d as usize).collect();
        feeds.push((w.name.into(), Tensor::from_array((dims, w.data.to_vec())).unwrap().into_dyn()));
    }
    let out = s.run(feeds).unwrap();
    out["y"].try_extract_tensor::<f32>().unwrap().1.to_vec()
}

fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    let diff = got.iter().zip(want).fold(0f64, |m, (g, w)| if g.is_finite() { m.max((*g as f64 - w).abs()) } else { f64::INFINITY });
    diff / scale
}

/// `w[e] · x + b[e]` in f64, `w` holding `rows` x `cols` per expert.
fn linear(w: &[f32], b: &[f32], e: usize, rows: usize, cols: usize, x: &[f64]) -> Vec<f64> {
    (0..rows)
        .map(|r| w[(e * rows + r) * cols..(e * rows + r + 1) * cols].iter().zip(x).map(|(w, x)| *w as f64 * x).sum::<f64>() + b[e * rows + r] as f64)
        .collect()
}

/// Routing for `tokens` tokens over 5 experts, k = 2: expert 3 never chosen, expert 4 by every
/// token, the others in turn.
fn routing(tokens: usize) -> Vec<i64> {
    (0..tokens).flat_map(|t| [[0, 1, 2][t % 3], 4]).collect()
}

#[test]
fn scatter_moe_with_constant_weights_matches_f64_and_the_input_weights_path() {
    let seed: u64 = rand::rng().random();
    let mut rng = StdRng::seed_from_u64(seed);
    // d 37, f 45: partial panels in both projections (45 hidden units = 5 panels of 8 and 5)
    let (d, f, experts, k) = (37usize, 45usize, 5usize, 2usize);
    let mut vals = |n: usize, scale: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(-scale..scale)).collect() };
    let (w_in, w_out) = (vals(experts * 2 * f * d, 0.3), vals(experts * d * f, 0.3));
    let (b_in, b_out) = (vals(experts * 2 * f, 0.5), vals(experts * d, 0.5));
    for layout in [GluLayout::GateUp, GluLayout::Interleaved] {
        // all constant (packed); all fed (unpacked); weights constant but one bias fed (unpacked)
        for constant in [[true; 4], [false; 4], [true, true, false, true]] {
            let weights = [
                Weight { name: "w_in", dims: vec![experts as i64, 2 * f as i64, d as i64], data: &w_in, constant: constant[0] },
                Weight { name: "w_out", dims: vec![experts as i64, d as i64, f as i64], data: &w_out, constant: constant[1] },
                Weight { name: "b_in", dims: vec![experts as i64, 2 * f as i64], data: &b_in, constant: constant[2] },
                Weight { name: "b_out", dims: vec![experts as i64, d as i64], data: &b_out, constant: constant[3] },
            ];
            let attrs = vec![string_attr(spec::scatter_moe::ATTR_GLU_LAYOUT, layout.name())];
            let bytes = model(spec::scatter_moe::NAME, &["x", "rw", "ri", "w_in", "w_out", "b_in", "b_out"], attrs, d, k, &weights, d);
            let mut s = session(&bytes);
            for tokens in [1usize, 13, 100] {
                let (x, rw, ri) = (vals(tokens * d, 1.0), vals(tokens * k, 1.0), routing(tokens));
                let got = run(&mut s, &x, d, &ri, k, &[("rw", &rw)], &weights);
                let mut want = vec![0f64; tokens * d];
                for (i, &e) in ri.iter().enumerate() {
                    let t = i / k;
                    let xt: Vec<f64> = x[t * d..(t + 1) * d].iter().map(|&v| v as f64).collect();
                    let a = linear(&w_in, &b_in, e as usize, 2 * f, d, &xt);
                    let h: Vec<f64> = (0..f)
                        .map(|u| {
                            let (g, up) = layout.rows(u, f);
                            a[g] / (1.0 + (-a[g]).exp()) * a[up]
                        })
                        .collect();
                    let o = linear(&w_out, &b_out, e as usize, d, f, &h);
                    for (y, o) in want[t * d..(t + 1) * d].iter_mut().zip(o) {
                        *y += rw[i] as f64 * o;
                    }
                }
                let err = rel_err(&got, &want);
                assert!(err < 1e-5, "{layout:?} constant {constant:?} tokens {tokens}: relative error {err} (seed {seed})");
            }
        }
    }
}

#[test]
fn parallel_linear_with_constant_weights_matches_f64() {
    let seed: u64 = rand::rng().random();
    let mut rng = StdRng::seed_from_u64(seed);
    // d_in 300: more than one block of the inner dimension; d_out 37: a partial panel
    let (d_in, d_out, experts, k) = (300usize, 37usize, 5usize, 2usize);
    let mut vals = |n: usize, scale: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(-scale..scale)).collect() };
    let (w, b) = (vals(experts * d_out * d_in, 0.1), vals(experts * d_out, 0.5));
    for constant in [true, false] {
        let weights = [
            Weight { name: "w", dims: vec![experts as i64, d_out as i64, d_in as i64], data: &w, constant },
            Weight { name: "b", dims: vec![experts as i64, d_out as i64], data: &b, constant },
        ];
        let bytes = model(spec::parallel_linear::NAME, &["x", "ri", "w", "b", "gates"], vec![], d_in, k, &weights, d_out);
        let mut s = session(&bytes);
        for tokens in [1usize, 13, 100] {
            let (x, gates, ri) = (vals(tokens * d_in, 1.0), vals(tokens * k, 1.0), routing(tokens));
            let got = run(&mut s, &x, d_in, &ri, k, &[("gates", &gates)], &weights);
            let mut want = vec![0f64; tokens * d_out];
            for (i, &e) in ri.iter().enumerate() {
                let t = i / k;
                let xt: Vec<f64> = x[t * d_in..(t + 1) * d_in].iter().map(|&v| v as f64).collect();
                for (y, z) in want[t * d_out..(t + 1) * d_out].iter_mut().zip(linear(&w, &b, e as usize, d_out, d_in, &xt)) {
                    *y += gates[i] as f64 * z;
                }
            }
            let err = rel_err(&got, &want);
            assert!(err < 1e-5, "constant {constant} tokens {tokens}: relative error {err} (seed {seed})");
        }
    }
}
