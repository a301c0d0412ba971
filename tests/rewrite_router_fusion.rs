//! Router fusion (src/rewrite/router_fusion.rs): which fixtures' routers become one TopKRouter node,
//! that the fused model computes what the original and the unfused rewrite compute in ONNX Runtime,
//! and the routers that must stay ONNX nodes (an ArgMax, a Concat), with their
//! values still correct where something else reads them.

mod common;

use onnx_protobuf::NodeProto;
use ort::session::Session;
use ort::value::Tensor;
use scattermoe::onnx::{self, Model, SaveOptions};
use scattermoe::rewrite::{Report, RewriteOptions, Target};

/// The fixtures whose router is fused, with the TopKRouter's attributes; every other fixture's
/// router is left (each with its reason in the report).
const FUSED: &[(&str, &str)] = &[
    ("dense_bmm", "softmax, k=2, normalize, lower_index"),
    ("dense_einsum", "softmax, k=2, normalize, lower_index"),
    ("gpt_oss", "topk_softmax, k=2, lower_index"),
    ("gpt_oss_bmm", "topk_softmax, k=2, lower_index"),
    ("gpt_oss_bmm_dynamo", "topk_softmax, k=2, lower_index"),
    ("granitemoe", "topk_softmax, k=2, lower_index"),
    ("loop_where", "softmax, k=2, normalize, lower_index"),
    ("megablocks", "softmax, k=2, normalize, lower_index"),
    ("mixtral", "softmax, k=2, normalize, lower_index"),
    ("mixtral_bmm", "softmax, k=2, normalize, lower_index"),
    ("mixtral_bmm_dynamo", "softmax, k=2, normalize, lower_index"),
    ("mixtral_f16", "softmax, k=2, normalize, lower_index"),
    ("mixtral_op18", "softmax, k=2, normalize, lower_index"),
    ("olmoe", "softmax, k=2, lower_index"),
    ("qwen2_moe", "softmax, k=2, lower_index"),
    ("qwen3_moe", "softmax, k=2, normalize, lower_index"),
    ("dbrx", "softmax, k=2, normalize, lower_index"),
    // Switch: top-1 as ArgMax (its first maximum: lower_index), the weight the ReduceMax beside it
    ("switch", "softmax, k=1, lower_index"),
    // DeepSeek-V3: sigmoid + e_score_correction_bias, 2 groups of which 1 competes, an unsorted TopK,
    // the scores gathered, `+ 1e-20` (which the dynamo exporter drops), the routed scaling factor
    ("deepseek_v3", "sigmoid, k=2, normalize, lower_index, bias, groups 1/2 top2_sum, eps 1e-20, scale 2.5"),
    ("deepseek_v3_bmm_dynamo", "sigmoid, k=2, normalize, lower_index, bias, scale 2.5"),
    // TorchScript exports softmax(x, dtype=float32) of float16 logits as a float16 Softmax and a
    // Cast: the Softmax stays (ONNX Runtime's providers round its result differently) and the node
    // reads the Cast's scores
    ("qwen3_moe_bmm_f16", "identity (the graph's softmax in 16 bits kept), k=2, lower_index"),
    ("qwen3_moe_op18_f16", "identity (the graph's softmax in 16 bits kept), k=2, normalize, lower_index"),
];

/// Fixtures left, and a word of the reason.
const LEFT: &[(&str, &str)] = &[
    ("phimoe", "Concat"),
    ("capacity_einsum", "Unsqueeze"),
];

fn rewrite(m: &mut Model, fuse_router: bool, target: Target) -> Report {
    scattermoe::rewrite::rewrite_with(m, &RewriteOptions { prove: false, fuse_router, target }).unwrap()
}

fn count(m: &Model, op: &str) -> usize {
    m.graph().node.iter().filter(|n| n.op_type == op).count()
}

fn session(path: &std::path::Path) -> Session {
    let env = scattermoe::ort_ops::runtime::environment().expect("ONNX Runtime");
    let plugin = scattermoe::ort_ops::runtime::plugin_path().expect("libscattermoe_ort.so");
    let _one_at_a_time = scattermoe::ort_ops::runtime::session_creation_lock();
    Session::builder(env).unwrap().with_operator_library(&plugin).unwrap().commit_from_file(path).unwrap()
}

/// Every output of `s` on the fixture's x_{tokens}, as f64, or None where the model fails there
/// (a traced loop at 1 token).
fn run(s: &mut Session, x: &common::Array) -> Option<Vec<Vec<f64>>> {
    let out = match x.dtype.as_str() {
        "f4" => s.run(ort::inputs!["hidden_states" => Tensor::from_array((x.shape.clone(), x.data.iter().map(|&v| v as f32).collect::<Vec<_>>())).unwrap()]),
        "f2" => s.run(ort::inputs!["hidden_states" => Tensor::from_array((x.shape.clone(), x.data.iter().map(|&v| half::f16::from_f64(v)).collect::<Vec<_>>())).unwrap()]),
        d => panic!("input dtype {d}"),
    }
    .ok()?;
    let mut all = Vec::new();
    for (_, v) in out.iter() {
        all.push(if let Ok((_, d)) = v.try_extract_tensor::<f32>() {
            d.iter().map(|&v| v as f64).collect()
        } else if let Ok((_, d)) = v.try_extract_tensor::<half::f16>() {
            d.iter().map(|v| v.to_f64()).collect()
        } else {
            v.try_extract_tensor::<i64>().unwrap().1.iter().map(|&v| v as f64).collect()
        });
    }
    Some(all)
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).fold(0f64, |m, (p, q)| m.max((p - q).abs())) / scale
}

/// Saves `m` and compares it with the original fixture `name` (and `reference` outputs where the
/// original fails) at 1, 7 and 16 tokens: every output within the dtype's tolerance.
fn matches_original(name: &str, m: Model, dir: &std::path::Path, tag: &str) -> Result<(), String> {
    let models = common::models_dir();
    let out = dir.join(format!("{name}_{tag}.onnx"));
    onnx::save(m, &out, &SaveOptions::default()).map_err(|e| e.to_string())?;
    let (mut a, mut b) = (session(&models.join(format!("{name}.onnx"))), session(&out));
    let refs = common::read_npz(&models.join(format!("{name}.npz")));
    let get = |k: &str| refs.iter().find(|(n, _)| n == k).map(|(_, a)| a.clone()).unwrap();
    let tol = if get("x_1").dtype == "f2" { 1e-2 } else { 1e-4 };
    let mut compared = 0;
    for tokens in [1usize, 7, 16] {
        let x = get(&format!("x_{tokens}"));
        let got = run(&mut b, &x).ok_or(format!("{tag}: fails at {tokens} tokens"))?;
        // where the traced original fails, torch's output is the reference
        let want = run(&mut a, &x).unwrap_or_else(|| vec![get(&format!("y_{tokens}")).data]);
        for (w, g) in want.iter().zip(&got) {
            let e = rel_err(w, g);
            if !(e <= tol) {
                return Err(format!("{tag}: {tokens} tokens: relative error {e:.3e} > {tol:.0e}"));
            }
        }
        compared += 1;
    }
    (compared == 3).then_some(()).ok_or("compared nowhere".into())
}

#[test]
fn fixtures_fuse_their_router_where_expected_and_match_the_original() {
    let dir = common::scratch("router_fusion");
    let mut failures = Vec::new();
    for (name, attrs) in FUSED.iter().map(|(n, a)| (*n, Some(*a))).chain(LEFT.iter().map(|(n, _)| (*n, None))) {
        let path = common::models_dir().join(format!("{name}.onnx"));
        let mut m = onnx::load(&path).unwrap();
        let rep = rewrite(&mut m, true, Target::OnnxRuntime);
        let r = rep.layers[0].router.as_ref().expect("fusion ran");
        match (attrs, r.fused) {
            (Some(a), true) if r.detail == a => {}
            (None, false) => {
                let why = LEFT.iter().find(|(n, _)| *n == name).unwrap().1;
                if !r.detail.contains(why) {
                    failures.push(format!("{name}: left for '{}', expected a reason with '{why}'", r.detail));
                }
            }
            _ => failures.push(format!("{name}: router {} ({}), expected {attrs:?}", if r.fused { "fused" } else { "left" }, r.detail)),
        }
        let routers = count(&m, "TopKRouter");
        if routers != r.fused as usize {
            failures.push(format!("{name}: {routers} TopKRouter nodes"));
        }
        if r.fused && count(&m, "TopK") != 0 {
            failures.push(format!("{name}: the old TopK was not removed"));
        }
        if let Err(e) = matches_original(name, m, &dir, "fused") {
            failures.push(format!("{name}: {e}"));
        }
        // --keep-router: the same rewrite without TopKRouter
        let mut kept = onnx::load(&path).unwrap();
        let rep = rewrite(&mut kept, false, Target::OnnxRuntime);
        if rep.layers[0].router.is_some() || count(&kept, "TopKRouter") != 0 {
            failures.push(format!("{name}: fused with fuse_router off"));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn tensorrt_keeps_the_onnx_router() {
    let mut m = onnx::load(&common::models_dir().join("mixtral.onnx")).unwrap();
    let rep = rewrite(&mut m, true, Target::TensorRt);
    assert_eq!(rep.layers.len(), 1);
    assert!(rep.layers[0].router.is_none());
    assert_eq!(count(&m, "TopKRouter"), 0);
}

/// The node of `op` in `m` whose name contains `tag`.
fn node<'m>(m: &'m mut Model, op: &str) -> &'m mut NodeProto {
    m.proto.graph.as_mut().unwrap().node.iter_mut().find(|n| n.op_type == op).unwrap_or_else(|| panic!("no {op}"))
}

/// Mixtral's router with `Add(ReduceSum, 1e-6)` as the divisor: fused with `normalize_eps`, and
/// the fused model computes what the edited original does.
#[test]
fn an_epsilon_in_the_normalisation_is_fused_and_stays_correct() {
    let dir = common::scratch("router_eps");
    let mut m = onnx::load(&common::models_dir().join("mixtral.onnx")).unwrap();
    let sum = node(&mut m, "ReduceSum").output[0].clone();
    let g = m.proto.graph.as_mut().unwrap();
    let mut eps = onnx_protobuf::TensorProto::new();
    eps.name = "router_eps".into();
    eps.data_type = 1;
    eps.float_data = vec![1e-6];
    g.initializer.push(eps);
    let mut add = NodeProto::new();
    add.op_type = "Add".into();
    add.name = "router_eps_add".into();
    add.input = vec![sum.clone(), "router_eps".into()];
    add.output = vec!["router_sum_eps".into()];
    let div = g.node.iter().position(|n| n.op_type == "Div" && n.input.get(1) == Some(&sum)).expect("Div by the sum");
    g.node[div].input[1] = "router_sum_eps".into();
    g.node.insert(div, add);
    let path = dir.join("mixtral_eps.onnx");
    onnx::save(m, &path, &SaveOptions::default()).unwrap();
    let mut m = onnx::load(&path).unwrap();
    let rep = rewrite(&mut m, true, Target::OnnxRuntime);
    let r = rep.layers[0].router.as_ref().unwrap();
    assert!(r.fused, "left: {}", r.detail);
    assert_eq!(r.detail, "softmax, k=2, normalize, lower_index, eps 1e-6");
    assert_eq!(count(&m, "TopKRouter"), 1);
    // compared with the edited original
    let out = dir.join("rw.onnx");
    onnx::save(m, &out, &SaveOptions::default()).unwrap();
    let refs = common::read_npz(&common::models_dir().join("mixtral.npz"));
    let x = refs.iter().find(|(n, _)| n == "x_7").unwrap().1.clone();
    let (a, b) = (run(&mut session(&path), &x).unwrap(), run(&mut session(&out), &x).unwrap());
    assert!(rel_err(&a[0], &b[0]) <= 1e-4);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Mixtral with its TopK values and indices also a graph output: the router is fused for the
/// layer, the old TopK stays for the output, and both the output and the layer are correct.
#[test]
fn a_router_value_read_elsewhere_keeps_its_node() {
    let dir = common::scratch("router_shared");
    let mut m = onnx::load(&common::models_dir().join("mixtral.onnx")).unwrap();
    let topk = node(&mut m, "TopK").clone();
    let g = m.proto.graph.as_mut().unwrap();
    for (v, elem) in [(&topk.output[0], 1), (&topk.output[1], 7)] {
        let mut vi = onnx_protobuf::ValueInfoProto::new();
        vi.name = v.clone();
        let mut tt = onnx_protobuf::type_proto::Tensor::new();
        tt.elem_type = elem;
        let mut t = onnx_protobuf::TypeProto::new();
        t.value = Some(onnx_protobuf::type_proto::Value::TensorType(tt));
        vi.type_ = Some(t).into();
        g.output.push(vi);
    }
    let path = dir.join("mixtral_shared.onnx");
    onnx::save(m, &path, &SaveOptions::default()).unwrap();
    let mut m = onnx::load(&path).unwrap();
    let rep = rewrite(&mut m, true, Target::OnnxRuntime);
    assert!(rep.layers[0].router.as_ref().unwrap().fused);
    assert_eq!((count(&m, "TopKRouter"), count(&m, "TopK")), (1, 1), "the old TopK must stay for the graph outputs");
    let out = dir.join("rw.onnx");
    onnx::save(m, &out, &SaveOptions::default()).unwrap();
    let refs = common::read_npz(&common::models_dir().join("mixtral.npz"));
    for t in [7, 16] {
        let x = refs.iter().find(|(n, _)| *n == format!("x_{t}")).unwrap().1.clone();
        let (a, b) = (run(&mut session(&path), &x).unwrap(), run(&mut session(&out), &x).unwrap());
        assert_eq!(a.len(), 3);
        assert!(rel_err(&a[0], &b[0]) <= 1e-4, "{t} tokens: the layer differs");
        assert_eq!(a[1], b[1], "{t} tokens: the TopK values differ");
        assert_eq!(a[2], b[2], "{t} tokens: the TopK indices differ");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// With the proof on, a fused router is proven (a failed proof would leave it, with the reason).
#[test]
fn the_fused_router_is_proven() {
    for name in ["mixtral", "gpt_oss_bmm_dynamo", "mixtral_f16", "dbrx"] {
        let mut m = onnx::load(&common::models_dir().join(format!("{name}.onnx"))).unwrap();
        let rep = scattermoe::rewrite::rewrite(&mut m).unwrap();
        let r = rep.layers[0].router.as_ref().unwrap();
        assert!(r.fused, "{name}: {}", r.detail);
        assert_eq!(count(&m, "TopKRouter"), 1);
    }
}

/// How [`expert_scaled_mixtral`] reads its table.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Table {
    /// `Gather(table, TopK.indices)`: Gemma 4's router
    AtChosen,
    /// a table of E + 1 values
    TooLong,
    /// `Gather(table, E - 1 - TopK.indices)`: not the chosen experts' values
    AtOthers,
}

/// Mixtral with its normalised weights multiplied by a table read at its chosen experts, as Gemma
/// 4's router does (`per_expert_scale[top_k_index]`), in the ways of [`Table`]; saved under `dir`.
fn expert_scaled_mixtral(dir: &std::path::Path, how: Table) -> std::path::PathBuf {
    let mut m = onnx::load(&common::models_dir().join("mixtral.onnx")).unwrap();
    let topk = node(&mut m, "TopK").clone();
    let g = m.proto.graph.as_mut().unwrap();
    let sum = g.node.iter().find(|n| n.op_type == "ReduceSum" && n.input[0] == topk.output[0]).expect("the sum of the top-k").output[0].clone();
    let div = g.node.iter().position(|n| n.op_type == "Div" && n.input.get(1) == Some(&sum)).expect("Div by the sum");
    let w = g.node[div].output[0].clone();
    let e = 8usize;
    let n = if how == Table::TooLong { e + 1 } else { e };
    let mut table = onnx_protobuf::TensorProto::new();
    table.name = "per_expert_scale".into();
    table.data_type = 1;
    table.dims = vec![n as i64];
    table.float_data = (0..n).map(|i| [0.5, -1.25, 2.0, 0.0][i % 4] + i as f32 / 16.0).collect();
    g.initializer.push(table);
    let mk = |op: &str, name: &str, inputs: Vec<String>, out: &str| {
        let mut x = NodeProto::new();
        x.op_type = op.into();
        x.name = name.into();
        x.input = inputs;
        x.output = vec![out.into()];
        x
    };
    let mut at = topk.output[1].clone();
    let mut new = Vec::new();
    if how == Table::AtOthers {
        let mut last = onnx_protobuf::TensorProto::new();
        last.name = "last_expert".into();
        last.data_type = 7;
        last.int64_data = vec![e as i64 - 1];
        g.initializer.push(last);
        new.push(mk("Sub", "others", vec!["last_expert".into(), at.clone()], "other_experts"));
        at = "other_experts".into();
    }
    new.push(mk("Gather", "pes_gather", vec!["per_expert_scale".into(), at], "pes"));
    new.push(mk("Mul", "pes_mul", vec![w.clone(), "pes".into()], "w_scaled"));
    for x in g.node.iter_mut().skip(div + 1) {
        x.input.iter_mut().filter(|i| **i == w).for_each(|i| *i = "w_scaled".into());
    }
    for (j, x) in new.into_iter().enumerate() {
        g.node.insert(div + 1 + j, x);
    }
    let path = dir.join(format!("mixtral_{how:?}.onnx"));
    onnx::save(m, &path, &SaveOptions::default()).unwrap();
    path
}

/// A per-expert scale read at the chosen experts is fused (`expert_scale`) and proven, and the
/// fused model computes what the edited original does; a table of another length, or one read at
/// other experts, is no per-expert scale: the router stays ONNX nodes and the rewritten model
/// still matches.
#[test]
fn a_per_expert_scale_is_fused_only_where_it_is_one() {
    let dir = common::scratch("router_expert_scale");
    let refs = common::read_npz(&common::models_dir().join("mixtral.npz"));
    for how in [Table::AtChosen, Table::TooLong, Table::AtOthers] {
        let path = expert_scaled_mixtral(&dir, how);
        let mut m = onnx::load(&path).unwrap();
        let rep = scattermoe::rewrite::rewrite(&mut m).unwrap();
        assert_eq!(rep.layers.len(), 1, "{how:?}: {}", rep.text());
        let r = rep.layers[0].router.as_ref().unwrap();
        if how == Table::AtChosen {
            assert!(r.fused, "{how:?} left: {}", r.detail);
            assert_eq!(r.detail, "softmax, k=2, normalize, lower_index, expert scale");
            let node = m.graph().node.iter().find(|n| n.op_type == "TopKRouter").unwrap();
            assert_eq!((node.input.len(), node.input[1].as_str(), node.input[2].as_str()), (3, "", "per_expert_scale"));
        } else {
            assert!(!r.fused, "{how:?} fused: {}", r.detail);
        }
        assert_eq!(count(&m, "TopKRouter"), (how == Table::AtChosen) as usize);
        let out = dir.join(format!("rw_{how:?}.onnx"));
        onnx::save(m, &out, &SaveOptions::default()).unwrap();
        for t in [7, 16] {
            let x = refs.iter().find(|(n, _)| *n == format!("x_{t}")).unwrap().1.clone();
            let (a, b) = (run(&mut session(&path), &x).unwrap(), run(&mut session(&out), &x).unwrap());
            assert!(rel_err(&a[0], &b[0]) <= 1e-4, "{how:?}, {t} tokens: the layer differs");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Switch's top-1 ArgMax with `select_last_index = 1` (the last of equal maxima): fused with the
/// higher_index tie rule, proven, and the rewritten model computes what the fixture does.
#[test]
fn an_argmax_router_takes_its_tie_rule_from_select_last_index() {
    let dir = common::scratch("router_argmax");
    let mut m = onnx::load(&common::models_dir().join("switch.onnx")).unwrap();
    let argmax = node(&mut m, "ArgMax");
    argmax.attribute.retain(|a| a.name != "select_last_index");
    argmax.attribute.push(scattermoe::onnx::graph::attr_int("select_last_index", 1));
    let path = dir.join("edited.onnx");
    onnx::save(m, &path, &SaveOptions::default()).unwrap();
    let mut m = onnx::load(&path).unwrap();
    let rep = scattermoe::rewrite::rewrite(&mut m).unwrap();
    assert_eq!(rep.layers.len(), 1, "{}", rep.text());
    let r = rep.layers[0].router.as_ref().unwrap();
    assert!(r.fused && r.detail == "softmax, k=1, higher_index", "{r:?}");
    // random float32 logits have no equal maxima: the edited original computes what the fixture
    // does, and so must the rewrite (torch's output where the traced original fails)
    matches_original("switch", m, &dir, "last_index").unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
