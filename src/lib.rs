pub mod cuda;
pub mod onnx;
pub mod ort_ops;
pub mod reference;
pub mod rewrite;
pub mod signature;
pub mod spec;
pub mod trt;
