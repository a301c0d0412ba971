//! ONNX model IO and graph queries, on the `onnx-protobuf` types.

pub mod arity;
pub mod graph;
pub mod io;
pub mod output;
pub mod tensor;

pub use graph::GraphIndex;
pub use io::{load, load_bytes, load_with_progress, save, save_checked, save_with_progress, Model, PendingTensor, SaveOptions};
pub use onnx_protobuf as proto;
