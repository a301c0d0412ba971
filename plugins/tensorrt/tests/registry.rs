//! TensorRT's own code loads and looks up the plugins: TensorRT-RTX's plugin registry (from PyPI,
//! installed by scripts/setup-tensorrt.sh) loads libscattermoe_trt.so, finds each creator by name,
//! version and namespace, and creates a plugin from the fields its ONNX parser passes for each
//! ScatterMoE node that `scattermoe rewrite --target tensorrt` writes for the fixtures under
//! models/ (plus ParallelLinear and CapacityMask nodes written here, which the rewriter does not
//! emit, and one refused field). registry.py (beside this file) does the TensorRT side.
//!
//! Skipped, with a message, without TensorRT's headers or without the TensorRT-RTX environment
//! (`SCATTERMOE_TRT_PYTHON`, default .venv-trtrtx/bin/python).

use scattermoe::onnx::{self, graph};
use scattermoe::spec::{self, capacity_mask, parallel_linear, scatter_moe};
use scattermoe::trt::{PARSER_ATTR_NAMESPACE, PARSER_ATTR_VERSION};
use scattermoe_trt::{self as trt, Field, Op};
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

fn json_entry(source: &str, node: &str, op: Op, fields: &[Field], expect_error: bool) -> String {
    let mut s = format!(
        "{{\"source\": \"{source}\", \"node\": \"{node}\", \"op\": \"{}\", \"version\": \"{}\", \"namespace\": \"{}\", \"expect_error\": {expect_error}, \"fields\": [",
        op.name(),
        trt::plugin_version(),
        trt::plugin_namespace()
    );
    for (i, f) in fields.iter().enumerate() {
        let data: Vec<String> = f.data.iter().map(|b| b.to_string()).collect();
        let _ = write!(s, "{}{{\"name\": \"{}\", \"type\": {}, \"data\": [{}]}}", if i > 0 { ", " } else { "" }, f.name, f.field_type, data.join(", "));
    }
    s + "]}"
}

/// The site-packages folder of the TensorRT-RTX environment `python` runs in.
fn site_packages(python: &Path) -> Option<PathBuf> {
    let lib = python.parent()?.parent()?.join("lib");
    std::fs::read_dir(lib).ok()?.flatten().map(|e| e.path().join("site-packages")).find(|p| p.join("tensorrt_rtx_libs").exists())
}

#[test]
fn tensorrt_rtx_registry_loads_finds_and_creates_every_plugin() {
    if option_env!("SCATTERMOE_TRT_HARNESS").is_none() {
        eprintln!("skipped: built without TensorRT headers (set TENSORRT_INCLUDE_DIR; see docs/tensorrt.md)");
        return;
    }
    let python = std::env::var_os("SCATTERMOE_TRT_PYTHON").map(PathBuf::from).unwrap_or_else(|| root().join(".venv-trtrtx/bin/python"));
    let Some(site) = site_packages(&python) else {
        eprintln!("skipped: no TensorRT-RTX environment at {} (run scripts/setup-tensorrt.sh or set SCATTERMOE_TRT_PYTHON)", python.display());
        return;
    };
    let lib = std::env::var_os("SCATTERMOE_TRT_LIB").map(PathBuf::from).unwrap_or_else(|| profile_dir().join("libscattermoe_trt.so"));
    let cli = profile_dir().join("scattermoe");
    assert!(lib.exists() && cli.exists(), "{} or {} missing: cargo build --release --workspace first", lib.display(), cli.display());

    // The nodes the rewriter writes for TensorRT, and the fields TensorRT's ONNX parser makes of them.
    let dir = std::env::temp_dir().join(format!("scattermoe-trt-registry-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut entries = Vec::new();
    let mut fixtures: Vec<String> = std::fs::read_dir(root().join("models"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".onnx")).map(String::from))
        .collect();
    fixtures.sort();
    for name in &fixtures {
        let out = dir.join(format!("{name}.onnx"));
        let o = Command::new(&cli)
            .args(["rewrite", root().join(format!("models/{name}.onnx")).to_str().unwrap(), out.to_str().unwrap(), "--target", "tensorrt", "--force"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        let m = onnx::load(&out).unwrap();
        for n in m.graph().node.iter().filter(|n| n.op_type == scatter_moe::NAME) {
            let attr = |k: &str| n.attribute.iter().find(|a| a.name == k).map(|a| String::from_utf8_lossy(&a.s).into_owned());
            assert_eq!(attr(PARSER_ATTR_VERSION), Some(trt::plugin_version()), "{name}");
            assert_eq!(attr(PARSER_ATTR_NAMESPACE), Some(trt::plugin_namespace()), "{name}");
            entries.push(json_entry(&format!("models/{name}.onnx"), &n.name, Op::ScatterMoE, &trt::parser_fields(Op::ScatterMoE, n), false));
        }
    }
    assert!(entries.len() >= fixtures.len(), "{} ScatterMoE nodes in {} fixtures", entries.len(), fixtures.len());
    // ParallelLinear and CapacityMask nodes as a model would hold them.
    let mut pl = graph::make_node(parallel_linear::NAME, spec::DOMAIN, "pl", &["x", "idx", "w"], &["y"]);
    pl.attribute.push(graph::attr_int(parallel_linear::ATTR_GROUPED_OUT, 1));
    entries.push(json_entry("ParallelLinear node (grouped_out = 1)", "pl", Op::ParallelLinear, &trt::parser_fields(Op::ParallelLinear, &pl), false));
    let mut cm = graph::make_node(capacity_mask::NAME, spec::DOMAIN, "cm", &["idx", "c"], &["kept"]);
    cm.attribute.push(graph::attr_int(capacity_mask::ATTR_NUM_EXPERTS, 8));
    cm.attribute.push(graph::attr_string(capacity_mask::ATTR_CAPACITY_ORDER, "token_major"));
    entries.push(json_entry("CapacityMask node (num_experts = 8, token_major)", "cm", Op::CapacityMask, &trt::parser_fields(Op::CapacityMask, &cm), false));
    let mut bad = graph::make_node(scatter_moe::NAME, spec::DOMAIN, "bad", &[], &[]);
    bad.attribute.push(graph::attr_string(scatter_moe::ATTR_ACTIVATION, "swish"));
    entries.push(json_entry("ScatterMoE node with activation 'swish'", "bad", Op::ScatterMoE, &trt::parser_fields(Op::ScatterMoE, &bad), true));
    let spec_file = dir.join("plugins.json");
    std::fs::write(&spec_file, format!("[\n{}\n]\n", entries.join(",\n"))).unwrap();

    let ld = format!("{}:{}", site.join("tensorrt_rtx_libs").display(), site.join("nvidia/cu13/lib").display());
    let ld = match std::env::var("LD_LIBRARY_PATH") {
        Ok(old) if !old.is_empty() => format!("{ld}:{old}"),
        _ => ld,
    };
    let o = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/registry.py"))
        .arg(&lib)
        .arg(&spec_file)
        .env("LD_LIBRARY_PATH", ld)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&o.stderr));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(o.status.success(), "the TensorRT-RTX registry test failed");
    assert!(text.contains(" passed, 0 failed"), "not every check passed");
}
