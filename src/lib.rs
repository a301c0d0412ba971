pub mod cpu;
pub mod cuda;
pub mod onnx;
pub mod ort;
pub mod reference;
pub mod rewrite;
pub mod spec;
pub mod trt;
