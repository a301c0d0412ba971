//! ONNX model IO and graph queries, on the `onnx-protobuf` types.

pub mod graph;
pub mod io;
pub mod output;
pub mod tensor;

pub use graph::GraphIndex;
pub use io::{load, load_bytes, save, save_checked, Model, PendingTensor, SaveOptions};
pub use onnx_protobuf as proto;
