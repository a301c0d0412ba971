//! What crosses between the C++ plugin classes (cpp/tensorrt/scattermoe_trt.cpp) and Rust: the
//! structures TensorRT's are copied into, and the functions the C++ side calls. Only Rust
//! functions cross (nothing in C++ is called from Rust), so the Rust side builds and is tested
//! without TensorRT's headers; build.rs generates the C++ side from this file when they are found.
//! The functions are defined in the sibling modules, brought into scope here for the bridge.

use crate::codes::field_type_size;
use crate::fields::{field_names, plugin_name, plugin_namespace, plugin_version};
use crate::plugin::{create_plugin, Plugin};

#[cxx::bridge(namespace = "scattermoe::trt")]
pub mod ffi {
    /// The ops, one plugin each.
    #[derive(Debug)]
    enum Op {
        ScatterMoE,
        ParallelLinear,
        CapacityMask,
    }

    /// A plugin field (TensorRT's `PluginField`, its data copied): `field_type` is a
    /// `PluginFieldType` code, `length` the number of elements, `data` their bytes.
    #[derive(Debug, Clone, PartialEq)]
    struct Field {
        name: String,
        field_type: i32,
        length: i32,
        data: Vec<u8>,
    }

    /// A tensor as a plugin sees it (`PluginTensorDesc`): `data_type` is a TensorRT `DataType`
    /// code, `linear` whether its format is `kLINEAR`, `dims` its dimensions (-1: not known yet).
    #[derive(Debug, Clone, PartialEq)]
    struct TensorDesc {
        data_type: i32,
        linear: bool,
        dims: Vec<i64>,
    }

    /// A tensor with the bounds of its dimensions (`DynamicPluginTensorDesc`).
    #[derive(Debug, Clone, PartialEq)]
    struct Range {
        desc: TensorDesc,
        min: Vec<i64>,
        max: Vec<i64>,
    }

    /// One output dimension: dimension `axis` of input `input`, or with `axis` = -1 the product
    /// of all of that input's dimensions.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct DimRef {
        input: i32,
        axis: i32,
    }

    /// The shape of one output.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct OutputShape {
        dims: Vec<DimRef>,
    }

    extern "Rust" {
        /// One plugin's state: the op and its validated attributes.
        type Plugin;

        /// The plugin (and ONNX op) name of `op`.
        fn plugin_name(op: Op) -> String;
        /// The plugin version: the op set version, "1".
        fn plugin_version() -> String;
        /// The plugin namespace: the ONNX domain, "ai.scattermoe".
        fn plugin_namespace() -> String;
        /// The fields a creator lists: one per attribute, with its type and length, no data.
        fn field_names(op: Op) -> Vec<Field>;
        /// Bytes of one element of a `PluginFieldType` (0 for types the plugins never read).
        fn field_type_size(field_type: i32) -> usize;
        /// A plugin from fields; an error names the op and the offending field.
        fn create_plugin(op: Op, fields: &[Field]) -> Result<Box<Plugin>>;

        fn clone_plugin(self: &Plugin) -> Box<Plugin>;
        fn op(self: &Plugin) -> Op;
        fn nb_outputs(self: &Plugin) -> i32;
        /// Output data types from input data types (TensorRT codes).
        fn output_types(self: &Plugin, input_types: &[i32]) -> Result<Vec<i32>>;
        /// Output shapes as references to input dimensions; `inputs` holds the dimensions known at
        /// build time (-1 for the others), which are checked against the contract.
        fn output_shapes(self: &Plugin, inputs: &[TensorDesc]) -> Result<Vec<OutputShape>>;
        /// Whether `in_out[pos]` (type and format) is supported, given `in_out[..pos]`.
        fn supports_format(self: &Plugin, pos: i32, in_out: &[TensorDesc], nb_inputs: i32) -> bool;
        /// Checks types and the known dimensions of a build configuration.
        fn configure(self: &mut Plugin, inputs: &[Range], outputs: &[Range]) -> Result<()>;
        /// Checks types and dimensions before runs at new shapes.
        fn on_shape_change(self: &mut Plugin, inputs: &[TensorDesc], outputs: &[TensorDesc]) -> Result<()>;
        /// Workspace bytes for the largest shapes of `inputs`.
        fn workspace_size(self: &Plugin, inputs: &[Range], outputs: &[Range]) -> Result<usize>;
        /// Runs the op on `stream` (a `cudaStream_t`) with device pointers.
        unsafe fn enqueue(
            self: &mut Plugin,
            inputs: &[TensorDesc],
            outputs: &[TensorDesc],
            input_ptrs: &[u64],
            output_ptrs: &[u64],
            workspace: u64,
            stream: u64,
        ) -> Result<()>;
        /// Every attribute, as the fields that re-create this plugin.
        fn fields_to_serialize(self: &Plugin) -> Vec<Field>;
    }
}
pub use ffi::{DimRef, Field, Op, OutputShape, Range, TensorDesc};
