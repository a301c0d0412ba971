//! The fields TensorRT's ONNX parser would pass for each ScatterMoE node that
//! `scattermoe rewrite --target tensorrt` writes for the fixtures under models/ create the plugin
//! with the attributes of the node the ONNX Runtime rewrite writes: the two targets describe the
//! same layer. (tests/rewrite_tensorrt.rs checks the nodes themselves.) Needs no TensorRT.

use scattermoe::onnx::{self, proto::NodeProto};
use scattermoe::rewrite::{self, Target};
use scattermoe::spec::{scatter_moe, AttrSource};
use scattermoe_trt::{create_plugin, parser_fields, Attrs, Op};
use std::path::{Path, PathBuf};

/// A node's attributes as the contract's attribute source (as ONNX Runtime's kernels read them).
struct NodeAttrs<'a>(&'a NodeProto);

impl AttrSource for NodeAttrs<'_> {
    fn int(&self, name: &str) -> Option<i64> {
        self.0.attribute.iter().find(|a| a.name == name).map(|a| a.i)
    }
    fn float(&self, name: &str) -> Option<f32> {
        self.0.attribute.iter().find(|a| a.name == name).map(|a| a.f)
    }
    fn string(&self, name: &str) -> Option<String> {
        self.0.attribute.iter().find(|a| a.name == name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }
    fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.0.attribute.iter().find(|a| a.name == name).map(|a| a.ints.clone())
    }
}

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

fn moe_nodes(m: &onnx::Model) -> Vec<NodeProto> {
    m.graph().node.iter().filter(|n| n.op_type == scatter_moe::NAME).cloned().collect()
}

#[test]
fn parser_fields_create_the_plugin_of_the_onnx_runtime_node() {
    let mut fixtures: Vec<PathBuf> = std::fs::read_dir(models_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "onnx"))
        .collect();
    fixtures.sort();
    let mut checked = 0;
    for path in &fixtures {
        let name = path.file_stem().unwrap().to_string_lossy();
        let mut ort_model = onnx::load(path).unwrap();
        rewrite::rewrite(&mut ort_model).unwrap();
        let mut trt_model = onnx::load(path).unwrap();
        rewrite::rewrite_for(&mut trt_model, Target::TensorRt).unwrap();
        let (a, b) = (moe_nodes(&ort_model), moe_nodes(&trt_model));
        assert_eq!(a.len(), b.len(), "{name}");
        for (o, t) in a.iter().zip(&b) {
            let fields = parser_fields(Op::ScatterMoE, t);
            // every attribute with a default is written (block_size has none), so every such field is passed
            let with_default = scatter_moe::ATTRS.iter().filter(|a| a.default != scattermoe::spec::AttrDefault::Ints(&[])).count();
            assert_eq!(fields.len(), with_default, "{name}: every attribute is written, so every field is passed");
            let p = create_plugin(Op::ScatterMoE, &fields).unwrap_or_else(|e| panic!("{name}: {e}"));
            let want = scatter_moe::Attrs::parse(&NodeAttrs(o)).unwrap();
            assert_eq!(p.attrs(), &Attrs::Moe(want), "{name}");
            checked += 1;
        }
    }
    // The rewrite proves each candidate in ONNX Runtime (ORT_DYLIB_PATH) with libscattermoe_ort.so
    // (SCATTERMOE_ORT_LIB or beside the test): without them it writes nothing.
    assert!(checked >= 17, "{checked} nodes checked in {} fixtures (cargo build --release --workspace first)", fixtures.len());
}
