//! The model loader on arbitrary bytes: parse, structural checks, every initializer's size
//! (checked arithmetic) and value read, and the graph index. Any panic, abort, hang or
//! oversized allocation is a finding; errors are the expected outcome for most inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scattermoe::onnx::{load_bytes, tensor, GraphIndex};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    // External data resolves against a folder with no data files in it: every location is refused
    // or missing, never read from elsewhere.
    let Ok(model) = load_bytes(data, Path::new("/nonexistent-fuzz-dir/model.onnx")) else { return };
    for t in &model.proto.graph.initializer {
        let _ = tensor::tensor_f32(t, Some(&model.ext));
        let _ = tensor::tensor_i64(t, Some(&model.ext));
    }
    let _ = GraphIndex::new(model.graph(), Some(&model.ext));
});
