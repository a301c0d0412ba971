//! `libscattermoe_ort.so`: the ScatterMoE ops as an ONNX Runtime custom-op library.
//!
//! Load it with `SessionOptions.register_custom_ops_library(path)` (Python),
//! `RegisterCustomOpsLibrary` / `RegisterCustomOpsLibrary_V2` (C), or
//! `SessionBuilder::with_operator_library(path)` (Rust, `ort`). It links no ONNX Runtime and no
//! CUDA library: everything comes from the runtime that loads it.

use ort_sys::{OrtApiBase, OrtSessionOptions, OrtStatus};

/// The entry point ONNX Runtime looks up in a custom-op library.
///
/// # Safety
/// Called by ONNX Runtime with its own session options and API base.
#[no_mangle]
pub unsafe extern "C" fn RegisterCustomOps(options: *mut OrtSessionOptions, api_base: *const OrtApiBase) -> *mut OrtStatus {
    scattermoe::ort_ops::register_custom_ops(options, api_base)
}
