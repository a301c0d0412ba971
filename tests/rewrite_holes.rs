//! Regression tests for mutants of the fixtures that were once rewritten silently wrong: each
//! mutant is now left, with a reason that names what the rule could not explain.
//! - GPT-OSS with one expert's swiglu alpha (or limit) changed: one node has one alpha and limit;
//! - a per-expert loop whose scattered value is expanded to another shape, or whose scatter index
//!   is not a token column;
//! - a router TopK along another axis than the experts'.

mod common;

use onnx_protobuf::NodeProto;
use scattermoe::onnx::{self, Model};

fn load(name: &str) -> Model {
    onnx::load(&common::models_dir().join(format!("{name}.onnx"))).unwrap()
}

fn node_mut<'a>(m: &'a mut Model, pred: impl Fn(&NodeProto) -> bool) -> &'a mut NodeProto {
    m.proto.graph.mut_or_insert_default().node.iter_mut().find(|n| pred(n)).expect("the fixture has the node")
}

/// Sets the value of a Constant node producing `output` (a float or int tensor) to `vals`.
fn set_constant(m: &mut Model, output: &str, f: Option<&[f32]>, i: Option<&[i64]>) {
    let n = node_mut(m, |n| n.op_type == "Constant" && n.output.first().map(String::as_str) == Some(output));
    let t = n.attribute[0].t.as_mut().unwrap();
    t.float_data.clear();
    t.int64_data.clear();
    t.raw_data = match (f, i) {
        (Some(f), _) => f.iter().flat_map(|v| v.to_le_bytes()).collect(),
        (_, Some(i)) => i.iter().flat_map(|v| v.to_le_bytes()).collect(),
        _ => unreachable!(),
    };
}

/// Rewrites `m` and expects no layer replaced, with a rejection containing `why`.
fn expect_left(mut m: Model, what: &str, why: &str) {
    let rep = scattermoe::rewrite::rewrite(&mut m).unwrap();
    assert!(rep.layers.is_empty(), "{what}: rewritten ({:?})", rep.layers);
    assert!(rep.rejected.iter().any(|r| r.reason.contains(why)), "{what}: no rejection says '{why}': {:?}", rep.rejected);
}

#[test]
fn unmutated_fixtures_are_rewritten() {
    // the mutants below are rejections of these, not of every form
    for name in ["gpt_oss", "mixtral"] {
        let mut m = load(name);
        let rep = scattermoe::rewrite::rewrite(&mut m).unwrap();
        assert_eq!(rep.layers.len(), 1, "{name}: {:?}", rep.rejected);
    }
}

#[test]
fn gpt_oss_alpha_or_limit_of_one_expert_differs() {
    // expert 1's alpha (Mul_5's constant) and, separately, its limit (all three clip bounds)
    let mut m = load("gpt_oss");
    set_constant(&mut m, "/m/experts/Constant_42_output_0", Some(&[1.5]), None);
    expect_left(m, "alpha 1.5 in expert 1", "differ in the swiglu_oai alpha or limit");
    let mut m = load("gpt_oss");
    set_constant(&mut m, "/m/experts/Constant_39_output_0", Some(&[5.0]), None);
    set_constant(&mut m, "/m/experts/Constant_40_output_0", Some(&[-5.0]), None);
    set_constant(&mut m, "/m/experts/Constant_41_output_0", Some(&[5.0]), None);
    expect_left(m, "limit 5 in expert 1", "differ in the swiglu_oai alpha or limit");
}

#[test]
fn loop_scatter_expanded_to_another_shape() {
    // the scattered value broadcast to [2, d] (rows repeated where an expert has one token)
    let mut m = load("mixtral");
    set_constant(&mut m, "/m/experts/Constant_40_output_0", None, Some(&[2, i64::MAX]));
    expect_left(m, "update Expand to [2, d]", "expanded to a shape that is not proven to keep it");
    // the scatter indices: a row of tokens instead of a column (`tok.unsqueeze(0)`), expanded to
    // the update's shape: each index row is no longer one token
    let mut m = load("mixtral");
    set_constant(&mut m, "/m/experts/Constant_41_output_0", None, Some(&[0]));
    expect_left(m, "index row instead of column", "not one token per row");
    // The token column expanded to the shape of another tensor ([1, d] here) is rewritten: a
    // ScatterElements' indices have its updates' shape (ONNX requires it; ONNX Runtime refuses
    // anything else), so wherever the graph runs the expanded column sends each row to its token
    // (the proof agrees at every token count it runs).
    let mut m = load("mixtral");
    let idx_expand = node_mut(&mut m, |n| n.op_type == "Expand" && n.output[0] == "/m/experts/Expand_1_output_0");
    idx_expand.input[1] = "/m/experts/Shape_7_output_0".into();
    let r = scattermoe::rewrite::rewrite(&mut m).unwrap();
    assert_eq!(r.layers.len(), 1, "{}", r.text());
}

#[test]
fn router_topk_along_another_axis() {
    let mut m = load("mixtral");
    let topk = node_mut(&mut m, |n| n.op_type == "TopK");
    for a in topk.attribute.iter_mut().filter(|a| a.name == "axis") {
        a.i = 0;
    }
    expect_left(m, "TopK along axis 0", "not the last (expert) axis");
}

#[test]
fn capacity_router_wider_than_the_experts() {
    // The router's softmax reads the token rows (d = 32 columns) instead of the 4-column router
    // projection: ArgMax may choose 4..31, which OneHot(., 4) drops and the op would refuse.
    let mut m = load("capacity_einsum");
    let x = m.graph().input[0].name.clone();
    let sm = node_mut(&mut m, |n| n.op_type == "Softmax");
    sm.input[0] = x;
    expect_left(m, "a router of d columns", "the router chooses among");
}
