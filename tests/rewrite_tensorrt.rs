//! `scattermoe rewrite --target tensorrt`: every fixture's ScatterMoE node carries what TensorRT's
//! ONNX parser needs to map it to the plugin (op type = plugin name, `plugin_version`,
//! `plugin_namespace`, every attribute, no absent input in the middle), and the model still
//! verifies in ONNX Runtime. That the fields the parser would pass create the plugin with the
//! attributes of the ONNX Runtime node is checked beside the plugin
//! (plugins/tensorrt/tests/parser_fields.rs).

mod common;

use scattermoe::onnx;
use scattermoe::rewrite::{self, Target};
use scattermoe::spec::{self, scatter_moe};
use scattermoe::trt;
use std::process::Command;

fn moe_nodes(m: &onnx::Model) -> Vec<onnx_protobuf::NodeProto> {
    m.graph().node.iter().filter(|n| n.op_type == scatter_moe::NAME).cloned().collect()
}

fn attr_s(n: &onnx_protobuf::NodeProto, name: &str) -> Option<String> {
    n.attribute.iter().find(|a| a.name == name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
}

#[test]
fn every_fixture_maps_to_the_plugin() {
    let mut checked = 0;
    for name in common::fixtures() {
        let path = common::models_dir().join(format!("{name}.onnx"));
        let mut ort_model = onnx::load(&path).unwrap();
        // the TensorRT target keeps the ONNX router (no TopKRouter plugin): compared with ONNX
        // Runtime's nodes without router fusion
        rewrite::rewrite_with(&mut ort_model, &rewrite::RewriteOptions { fuse_router: false, ..Default::default() }).unwrap();
        let mut trt_model = onnx::load(&path).unwrap();
        let rep = rewrite::rewrite_for(&mut trt_model, Target::TensorRt).unwrap();
        let (a, b) = (moe_nodes(&ort_model), moe_nodes(&trt_model));
        assert_eq!(a.len(), rep.layers.len(), "{name}");
        assert_eq!(a.len(), b.len(), "{name}");
        for (o, t) in a.iter().zip(&b) {
            assert_eq!(t.domain, spec::DOMAIN, "{name}");
            assert_eq!(attr_s(t, trt::PARSER_ATTR_VERSION).as_deref(), Some("1"), "{name}");
            assert_eq!(attr_s(t, trt::PARSER_ATTR_NAMESPACE).as_deref(), Some("ai.scattermoe"), "{name}");
            // every attribute with a default (block_size has none: absent unless a weight needs it)
            for d in scatter_moe::ATTRS.iter().filter(|d| d.default != spec::AttrDefault::Ints(&[])) {
                assert!(t.attribute.iter().any(|x| x.name == d.name), "{name}: attribute {} not written", d.name);
            }
            assert!(t.input.iter().all(|i| !i.is_empty()), "{name}: an absent input in the middle: {:?}", t.input);
            // the ONNX Runtime node's inputs, with zeros for biases it leaves out
            assert_eq!(&t.input[..5], &o.input[..5], "{name}");
            for (i, (ti, oi)) in t.input.iter().zip(o.input.iter().chain(std::iter::repeat(&String::new()))).enumerate().skip(5) {
                if oi.is_empty() {
                    assert!(ti.contains("zeros"), "{name}: input {i} is {ti}");
                    let z = trt_model.graph().initializer.iter().find(|x| &x.name == ti).expect("zero initializer");
                    assert!(z.raw_data.iter().all(|&v| v == 0), "{name}: {ti} is not zeros");
                } else {
                    assert_eq!(ti, oi, "{name}");
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 17, "{checked} nodes checked");
}

/// The capacity fixture (zero biases before the capacity input) still matches the original model
/// in ONNX Runtime with the plugin.
#[test]
fn the_tensorrt_form_still_verifies_in_onnx_runtime() {
    let dir = common::scratch("trt_verify");
    for name in ["capacity_einsum", "gpt_oss"] {
        let out = dir.join(format!("{name}.onnx"));
        let o = Command::new(env!("CARGO_BIN_EXE_scattermoe"))
            .args(["rewrite", common::models_dir().join(format!("{name}.onnx")).to_str().unwrap(), out.to_str().unwrap()])
            .args(["--target", "tensorrt", "--verify", "--force"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{name}: {err}");
        assert!(err.contains("verified"), "{name}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every quantized fixture (models/quantized) rewritten for TensorRT still matches its quantized
/// graph in ONNX Runtime with the plugin (`--verify`), with no absent input in the middle; the two
/// spoiled ones (per-input-channel scales, computed codes) are left, as for ONNX Runtime.
#[test]
fn quantized_fixtures_verify_for_tensorrt() {
    let dir = common::scratch("trt_quantized");
    let qdir = common::models_dir().join("quantized");
    let mut names: Vec<_> =
        std::fs::read_dir(&qdir).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "onnx")).collect();
    names.sort();
    let (mut verified, mut left) = (0, 0);
    for src in &names {
        let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
        let out = dir.join(format!("{stem}.onnx"));
        let o = Command::new(env!("CARGO_BIN_EXE_scattermoe"))
            .args(["rewrite", src.to_str().unwrap(), out.to_str().unwrap(), "--target", "tensorrt", "--verify", "--force"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        if stem.ends_with("in_channel-zp") || stem.ends_with("codes-computed") {
            assert_eq!(o.status.code(), Some(3), "{stem}: {err}");
            left += 1;
            continue;
        }
        assert!(o.status.success() && err.contains("verified"), "{stem}: {err}");
        let m = onnx::load(&out).unwrap();
        for n in moe_nodes(&m) {
            assert!(n.input.iter().all(|i| !i.is_empty()), "{stem}: an absent input in the middle: {:?}", n.input);
            assert!(n.input.len() > 8, "{stem}: no quantized inputs: {:?}", n.input);
        }
        verified += 1;
    }
    assert!(verified >= 19 && left == 2, "{verified} verified, {left} left");
    let _ = std::fs::remove_dir_all(&dir);
}

/// JetMoE's Mixture-of-Attention projections become ParallelLinear nodes that TensorRT's parser
/// can map too: the plugin's version and namespace, every attribute, and a zero bias where the
/// node's gates follow it; the whole tiny LM still verifies in ONNX Runtime.
#[test]
fn parallel_linear_nodes_map_to_the_plugin() {
    let dir = common::scratch("trt_moa");
    let src = common::models_dir().join("families").join("jetmoe_lm.onnx");
    let out = dir.join("jetmoe_lm.onnx");
    let o = Command::new(env!("CARGO_BIN_EXE_scattermoe"))
        .args(["rewrite", src.to_str().unwrap(), out.to_str().unwrap(), "--target", "tensorrt", "--verify", "--force"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("verified"), "{err}");
    let m = onnx::load(&out).unwrap();
    let pl: Vec<_> = m.graph().node.iter().filter(|n| n.op_type == spec::parallel_linear::NAME).collect();
    assert_eq!(pl.len(), 4, "two MoA layers, map and reduce each");
    for n in pl {
        assert_eq!(attr_s(n, trt::PARSER_ATTR_VERSION).as_deref(), Some("1"));
        assert_eq!(attr_s(n, trt::PARSER_ATTR_NAMESPACE).as_deref(), Some("ai.scattermoe"));
        for d in spec::parallel_linear::ATTRS.iter().filter(|d| d.default != spec::AttrDefault::Ints(&[])) {
            assert!(n.attribute.iter().any(|x| x.name == d.name), "attribute {} not written", d.name);
        }
        assert!(n.input.iter().all(|i| !i.is_empty()), "an absent input in the middle: {:?}", n.input);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
