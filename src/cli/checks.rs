//! The CLI's checks of its arguments and input, all run before any work (docs/hardening.md,
//! "Order of checks").

use anyhow::{bail, Result};

use crate::onnx;

/// The most tokens one `--verify` length may ask for: its random inputs are allocated per token,
/// and a model's largest test batches stay far below this.
pub const MAX_VERIFY_TOKENS: usize = 1 << 16;
/// The most lengths one `--verify` may run.
pub const MAX_VERIFY_LENGTHS: usize = 64;

pub fn check_lengths(lengths: &[usize]) -> Result<()> {
    if lengths.is_empty() {
        bail!("--lengths is empty: give at least one token count");
    }
    if lengths.len() > MAX_VERIFY_LENGTHS {
        bail!("--lengths gives {} token counts; at most {MAX_VERIFY_LENGTHS} are run", lengths.len());
    }
    if let Some(&n) = lengths.iter().find(|&&n| n > MAX_VERIFY_TOKENS) {
        bail!("--lengths {n} is more tokens than --verify runs (at most {MAX_VERIFY_TOKENS}); choose a smaller count");
    }
    Ok(())
}

/// Nodes of the contract already in the input (a model rewritten before): every attribute must be
/// one the op defines, of its type, as ONNX's checker treats a registered schema. ONNX Runtime's
/// custom-op API gives a kernel no list of a node's attributes, so the plugin itself can only
/// check the types of the attributes it knows (docs/hardening.md).
pub fn check_contract_attributes(graph: &onnx::proto::GraphProto) -> Result<()> {
    use crate::spec::{self, AttrDefault, AttrDesc};
    use onnx::proto::attribute_proto::AttributeType;
    for n in graph.node.iter().filter(|n| n.domain == spec::DOMAIN) {
        let attrs: &[AttrDesc] = match n.op_type.as_str() {
            spec::scatter_moe::NAME => &spec::scatter_moe::ATTRS,
            spec::parallel_linear::NAME => &spec::parallel_linear::ATTRS,
            spec::capacity_mask::NAME => &spec::capacity_mask::ATTRS,
            spec::topk_router::NAME => &spec::topk_router::ATTRS,
            other => bail!("node '{}' is {}::{other}, which is not an op of the contract", n.name, spec::DOMAIN),
        };
        for a in &n.attribute {
            // What the TensorRT target adds for TensorRT's ONNX parser; ONNX Runtime ignores it.
            if a.name == crate::trt::PARSER_ATTR_VERSION || a.name == crate::trt::PARSER_ATTR_NAMESPACE {
                continue;
            }
            let Some(d) = attrs.iter().find(|d| d.name == a.name) else {
                let known: Vec<&str> = attrs.iter().map(|d| d.name).collect();
                bail!("node '{}' ({}): unknown attribute '{}' (the op defines: {})", n.name, n.op_type, a.name, known.join(", "));
            };
            let want = match d.default {
                AttrDefault::Int(_) => AttributeType::INT,
                AttrDefault::Float(_) => AttributeType::FLOAT,
                AttrDefault::Str(_) => AttributeType::STRING,
                AttrDefault::Ints(_) => AttributeType::INTS,
            };
            let got = a.type_.enum_value_or_default();
            if got != want {
                bail!("node '{}' ({}): attribute '{}' must be {want:?}, got {got:?}", n.name, n.op_type, a.name);
            }
        }
    }
    Ok(())
}

/// Where ONNX Runtime is looked for, for the messages that say it was not found.
pub const ORT_SEARCH: &str = "ONNX Runtime is taken from ORT_DYLIB_PATH, else from the onnxruntime package of the active python3, \
else from the project's .venv";

/// The proof and `--verify` need ONNX Runtime and the plugin: both are found and loaded before
/// the rewrite, not after the weights were written. Returns ONNX Runtime's path when it was needed.
pub fn check_runtime(verify: bool, prove: bool) -> Result<Option<std::path::PathBuf>> {
    if !verify && !prove {
        return Ok(None);
    }
    let needs = match (verify, prove) {
        (true, _) => "--verify needs".to_string(),
        _ => "every rewrite is proven in ONNX Runtime before it is written (pass --no-prove to skip the proof), and that needs".to_string(),
    };
    let plugin = crate::ort_ops::runtime::plugin_path().map_err(|e| anyhow::anyhow!("{needs} the plugin library: {e:#}"))?;
    if !plugin.is_file() {
        bail!("{needs} the plugin library, but {} is not a file", plugin.display());
    }
    crate::ort_ops::runtime::environment().map_err(|e| anyhow::anyhow!("{needs} ONNX Runtime: {e:#}"))?;
    Ok(crate::ort_ops::runtime::load().ok())
}
