pub mod onnx;
pub mod rewrite;
pub mod spec;
