//! The CLI's contract around files: corrupt, truncated or non-ONNX input gives a clear error and
//! no output; an existing output is kept without --force; external data round-trips.

mod common;

use std::path::Path;
use std::process::Command;

fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_scattermoe")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Nothing but `keep` in `dir`: no output, no temporaries.
fn only(dir: &Path, keep: &[&str]) {
    let names: Vec<String> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
    let extra: Vec<&String> = names.iter().filter(|n| !keep.contains(&n.as_str())).collect();
    assert!(extra.is_empty(), "left behind: {extra:?}");
}

#[test]
fn corrupt_truncated_and_non_onnx_inputs_error_and_leave_no_output() {
    let dir = common::scratch("corrupt");
    let good = std::fs::read(common::models_dir().join("mixtral.onnx")).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty.onnx", vec![], "is empty"),
        ("truncated.onnx", good[..good.len() / 2].to_vec(), "not a valid ONNX model"),
        ("truncated_head.onnx", good[..100].to_vec(), "not a valid ONNX model"),
        ("text.onnx", b"this is not a model, just some text\n".repeat(10), "not"),
        ("zeros.onnx", vec![0u8; 4096], "not"),
    ];
    for (name, bytes, want) in cases {
        let input = dir.join(name);
        std::fs::write(&input, &bytes).unwrap();
        let out = dir.join(format!("out_{name}"));
        let (code, _, err) = cli(&["rewrite", input.to_str().unwrap(), out.to_str().unwrap()]);
        assert_ne!(code, 0, "{name}: exit 0");
        assert!(err.contains(want) && err.contains(name), "{name}: stderr {err:?}");
        assert!(!out.exists(), "{name}: output written");
    }
    let (code, _, err) = cli(&["rewrite", dir.join("missing.onnx").to_str().unwrap(), dir.join("o.onnx").to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("missing.onnx"), "{err}");
    only(&dir, &["empty.onnx", "truncated.onnx", "truncated_head.onnx", "text.onnx", "zeros.onnx"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn existing_output_needs_force() {
    let dir = common::scratch("force");
    let input = common::models_dir().join("loop_where.onnx");
    let out = dir.join("out.onnx");
    std::fs::write(&out, b"keep me").unwrap();
    let (code, _, err) = cli(&["rewrite", input.to_str().unwrap(), out.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    let (code, _, err) = cli(&["rewrite", input.to_str().unwrap(), out.to_str().unwrap(), "--force"]);
    assert_eq!(code, 0, "{err}");
    assert!(scattermoe::onnx::load(&out).is_ok());
    only(&dir, &["out.onnx"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn report_and_json_name_the_layer() {
    let dir = common::scratch("report");
    let input = common::models_dir().join("gpt_oss.onnx");
    let out = dir.join("o.onnx");
    let (code, stdout, err) = cli(&["rewrite", input.to_str().unwrap(), out.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    for want in ["\"family\":\"hf_loop\"", "\"experts\":4", "\"k\":2", "\"d\":32", "\"f\":32", "\"activation\":\"swiglu_oai\"", "\"glu_layout\":\"interleaved\"", "\"elem_type\":\"float32\""] {
        assert!(stdout.contains(want), "{want} not in {stdout}");
    }
    let (code, stdout, _) = cli(&["rewrite", input.to_str().unwrap(), out.to_str().unwrap(), "--report", "--force"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("replaced hf_loop layer") && stdout.contains("E=4 k=2 d=32 f=32 activation=swiglu_oai"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn external_data_is_read_and_written_and_a_truncated_data_file_is_an_error() {
    use scattermoe::onnx::{self, SaveOptions};
    let dir = common::scratch("external");
    // write a fixture with every initializer in external data
    let m = onnx::load(&common::models_dir().join("qwen3_moe.onnx")).unwrap();
    let ext_in = dir.join("in.onnx");
    onnx::save(m, &ext_in, &SaveOptions { external_threshold: Some(0), ..Default::default() }).unwrap();
    assert!(dir.join("in.onnx.data").exists());
    let m = onnx::load(&ext_in).unwrap();
    assert!(m.has_external_data());
    drop(m);
    // rewrite it: the output has external data too
    let out = dir.join("out.onnx");
    let (code, _, err) = cli(&["rewrite", ext_in.to_str().unwrap(), out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(dir.join("out.onnx.data").exists());
    let back = onnx::load(&out).unwrap();
    assert!(back.has_external_data());
    // truncated external data: clear error, nothing written
    let data = std::fs::read(dir.join("in.onnx.data")).unwrap();
    std::fs::write(dir.join("in.onnx.data"), &data[..data.len() / 2]).unwrap();
    let out2 = dir.join("out2.onnx");
    let (code, _, err) = cli(&["rewrite", ext_in.to_str().unwrap(), out2.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("truncated") || err.contains("external"), "{err}");
    assert!(!out2.exists() && !dir.join("out2.onnx.data").exists());
    only(&dir, &["in.onnx", "in.onnx.data", "out.onnx", "out.onnx.data"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn verify_runs_both_models_and_says_where_the_original_fails() {
    let dir = common::scratch("verify");
    let out = dir.join("mixtral.onnx");
    let input = common::models_dir().join("mixtral.onnx");
    let (code, _, err) = cli(&["rewrite", input.to_str().unwrap(), out.to_str().unwrap(), "--verify"]);
    assert_eq!(code, 0, "{err}");
    // the traced export fails at 1 token (a Split sized at trace time); the rewritten model runs
    assert!(err.contains("tokens 1: the original fails"), "{err}");
    assert!(err.contains("tokens 16: max relative error"), "{err}");
    assert!(err.contains("verified"), "{err}");
    assert!(out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn verify_detects_a_different_model() {
    // mixtral_op18 has the same shapes as mixtral but other weights: a mismatch
    let dir = common::scratch("verify_mismatch");
    let other = dir.join("other.onnx");
    let (code, _, err) = cli(&["rewrite", common::models_dir().join("mixtral_op18.onnx").to_str().unwrap(), other.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let orig = common::models_dir().join("mixtral.onnx");
    let proto = scattermoe::onnx::load(&orig).unwrap().proto;
    let v = scattermoe::rewrite::verify::verify(&orig, &proto, &other, &[1, 13, 16]).unwrap();
    assert!(!v.passed(), "{}", v.text());
    assert!(v.text().contains("MISMATCH"), "{}", v.text());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_candidate_that_is_not_proven_is_left_and_reported() {
    use scattermoe::onnx;
    // one expert of the Mixtral loop computes tanh(gate) * up instead of silu(gate) * up
    let mut m = onnx::load(&common::models_dir().join("mixtral.onnx")).unwrap();
    let g = m.proto.graph.mut_or_insert_default();
    let i = g.node.iter().position(|n| n.op_type == "Sigmoid").unwrap();
    g.node[i].op_type = "Tanh".into();
    let before = g.node.len();
    let rep = scattermoe::rewrite::rewrite(&mut m).unwrap();
    assert!(rep.layers.is_empty(), "{}", rep.text());
    assert_eq!(m.graph().node.len(), before);
    assert!(rep.rejected.iter().any(|r| r.family == "hf_loop" && r.reason.contains("activation")), "{}", rep.text());
    assert!(rep.text().contains("no MoE layer was replaced"));
}

#[test]
fn a_model_without_moe_is_written_unchanged_with_allow_none() {
    let dir = common::scratch("nomoe");
    // the router alone: cut the capacity fixture after its softmax
    let mut m = scattermoe::onnx::load(&common::models_dir().join("capacity_einsum.onnx")).unwrap();
    let g = m.proto.graph.mut_or_insert_default();
    let sm = g.node.iter().position(|n| n.op_type == "Softmax").unwrap();
    let out_name = g.node[sm].output[0].clone();
    g.node.truncate(sm + 1);
    g.output[0].name = out_name;
    if let Some(onnx_protobuf::type_proto::Value::TensorType(tt)) = g.output[0].type_.mut_or_insert_default().value.as_mut() {
        if let Some(last) = tt.shape.mut_or_insert_default().dim.last_mut() {
            last.set_dim_value(4);
        }
    }
    let input = dir.join("router.onnx");
    scattermoe::onnx::save(m, &input, &Default::default()).unwrap();
    let out = dir.join("out.onnx");
    // without --allow-none: exit 3 and nothing written (tests/cli_experience.rs)
    let (code, stdout, err) = cli(&["rewrite", input.to_str().unwrap(), out.to_str().unwrap(), "--report", "--allow-none"]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("no MoE layer was replaced"), "{stdout}");
    assert!(out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
