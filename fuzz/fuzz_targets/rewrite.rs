//! The rewriter on arbitrary bytes (seeded with the fixtures of models/): load, find and replace
//! every MoE layer, then serialize the result. A panic, abort or hang is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scattermoe::onnx::{load_bytes, proto::Message};
use scattermoe::rewrite::{rewrite_for, Target};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(mut model) = load_bytes(data, Path::new("/nonexistent-fuzz-dir/model.onnx")) else { return };
    let target = if data.len() % 2 == 0 { Target::OnnxRuntime } else { Target::TensorRt };
    if rewrite_for(&mut model, target).is_ok() {
        let _ = model.proto.write_to_bytes();
    }
});
