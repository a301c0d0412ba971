//! The rewriter on arbitrary bytes (seeded with the fixtures of models/): load, find and replace
//! every MoE layer, then serialize the result. A panic, abort, hang or allocation past
//! -rss_limit_mb is a finding.
//!
//! Without the proof: the proof runs the model's own subgraph in ONNX Runtime, whose memory is
//! the model's (a mutant's OneHot over 10^7 classes takes gigabytes there, as it would when
//! served), so it would report ONNX Runtime's allocations as the rewriter's. The proof's own code
//! runs on mutants in fuzz/mutate_cli.py, with ONNX Runtime and every rewrite checked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scattermoe::onnx::{load_bytes, proto::Message};
use scattermoe::rewrite::{rewrite_with, RewriteOptions, Target};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(mut model) = load_bytes(data, Path::new("/nonexistent-fuzz-dir/model.onnx")) else { return };
    let target = if data.len() % 2 == 0 { Target::OnnxRuntime } else { Target::TensorRt };
    if rewrite_with(&mut model, &RewriteOptions { target, prove: false, fuse_router: true }).is_ok() {
        let _ = model.proto.write_to_bytes();
    }
});
