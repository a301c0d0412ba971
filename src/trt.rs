//! What TensorRT's ONNX parser reads from a node to find the plugin that serves it, for
//! `scattermoe rewrite --target tensorrt` (docs/tensorrt.md): the node's op type is the plugin
//! name, and two attributes name the plugin's version and namespace. The plugins themselves
//! (`libscattermoe_trt.so`: the Rust side of the bridge in plugins/tensorrt, the C++ classes in
//! cpp/tensorrt) take their version and namespace from here, so the rewriter and the plugins
//! cannot disagree.

use crate::spec;

/// The node attribute TensorRT's ONNX parser reads the plugin version from (default "1").
pub const PARSER_ATTR_VERSION: &str = "plugin_version";
/// The node attribute TensorRT's ONNX parser reads the plugin namespace from (default "").
pub const PARSER_ATTR_NAMESPACE: &str = "plugin_namespace";

/// The plugin version: the op set version, "1".
pub fn plugin_version() -> String {
    spec::OPSET_VERSION.to_string()
}

/// The plugin namespace: the ONNX domain, "ai.scattermoe".
pub fn plugin_namespace() -> String {
    spec::DOMAIN.to_string()
}
