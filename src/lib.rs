pub mod onnx;
pub mod spec;
