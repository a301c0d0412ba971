//! The Rust side of the TensorRT plugins (`cpp/`, built into `libscattermoe_trt.so` by
//! `plugins/tensorrt`). The C++ classes implement TensorRT's IPluginV3 interfaces and only
//! translate: every decision is one of the functions behind this `#[cxx::bridge]`.
//!
//! - Fields: the creator lists one plugin field per attribute of [`spec`] (`ATTRS`), and a plugin
//!   is created from fields as TensorRT's ONNX parser passes them (ints as `kINT32`, floats as
//!   `kFLOAT32`, strings as `kCHAR` with their terminating NUL; wider and narrower integer and float
//!   types are accepted too), parsed and validated by the contract's `Attrs::parse`.
//!   [`Plugin::fields_to_serialize`] writes every attribute back in the parser's types, so an engine
//!   re-creates the same plugin.
//! - Types and formats: `T` (f32, f16, bf16) and `I` (int32, int64) as the contract allows, linear
//!   format only ([`Plugin::supports_format`]); outputs take `T` (`CapacityMask`: bool).
//! - Shapes: output shapes are the contract's own rules (`output_shape`), returned as references
//!   to input dimensions ([`ffi::DimRef`]) that the C++ side turns into IExprBuilder expressions.
//!   Inputs are checked by the contract's `check` at build time (known dimensions) and before each
//!   run (all dimensions).
//! - Workspace: the device ops' workspace (`crate::cuda::ops`) at the largest shapes of the
//!   optimisation profile.
//! - Enqueue: the device ops (`crate::cuda::ops`) on TensorRT's stream, with the workspace TensorRT
//!   hands in; the `capacity` input stays on the device, where the op reads it (one wait).
//!   Bad routing indices are reported as on ONNX Runtime's CUDA EP (`crate::cuda::checks`): by the
//!   next run, or by the run itself with `SCATTERMOE_CUDA_SYNC_CHECKS=1`.
//!
//! Optional inputs: TensorRT passes a plugin its inputs by position, and its ONNX parser cannot
//! pass an absent input in the middle; `scattermoe rewrite --target tensorrt` writes zero biases
//! where a later optional input (`capacity`) is present, so inputs keep the contract's positions.

use crate::cuda::ops::{CapacityMaskOp, DeviceIo, DeviceOp, LinearCall, MaskCall, MoeCall, ParallelLinearOp, Runner, ScatterMoeOp};
use crate::reference::{LinearSizes, MoeSizes};
use crate::signature::Signature;
use crate::spec::{
    self, capacity_mask, parallel_linear, scatter_moe, AttrSource, Dim, ElemType, IndexType,
    PortType, SpecError,
};
use cudarc::driver::sys::{CUdeviceptr, CUstream};

pub use ffi::{DimRef, Field, Op, OutputShape, Range, TensorDesc};

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

// ---------------------------------------------------------------------------------------------
// TensorRT's codes
// ---------------------------------------------------------------------------------------------

/// TensorRT `DataType` codes (NvInferRuntimeBase.h).
pub mod data_type {
    pub const FLOAT: i32 = 0;
    pub const HALF: i32 = 1;
    pub const INT8: i32 = 2;
    pub const INT32: i32 = 3;
    pub const BOOL: i32 = 4;
    pub const UINT8: i32 = 5;
    pub const FP8: i32 = 6;
    pub const BF16: i32 = 7;
    pub const INT64: i32 = 8;
}

/// TensorRT `PluginFieldType` codes (NvInferPluginBase.h).
pub mod field_type {
    pub const FLOAT16: i32 = 0;
    pub const FLOAT32: i32 = 1;
    pub const FLOAT64: i32 = 2;
    pub const INT8: i32 = 3;
    pub const INT16: i32 = 4;
    pub const INT32: i32 = 5;
    pub const CHAR: i32 = 6;
    pub const BF16: i32 = 9;
    pub const INT64: i32 = 10;
}

/// The ONNX element type code of a TensorRT data type (for the contract's checks and messages).
pub fn onnx_code(trt: i32) -> i32 {
    match trt {
        data_type::FLOAT => 1,
        data_type::HALF => 10,
        data_type::INT8 => 3,
        data_type::INT32 => 6,
        data_type::BOOL => 9,
        data_type::UINT8 => 2,
        data_type::BF16 => 16,
        data_type::INT64 => 7,
        _ => 17, // FP8 and newer: "an unsupported type"
    }
}

/// The TensorRT data type of `T`.
pub fn trt_elem(t: ElemType) -> i32 {
    match t {
        ElemType::F32 => data_type::FLOAT,
        ElemType::F16 => data_type::HALF,
        ElemType::BF16 => data_type::BF16,
    }
}

pub fn field_type_size(t: i32) -> usize {
    match t {
        field_type::CHAR | field_type::INT8 => 1,
        field_type::FLOAT16 | field_type::BF16 | field_type::INT16 => 2,
        field_type::FLOAT32 | field_type::INT32 => 4,
        field_type::FLOAT64 | field_type::INT64 => 8,
        _ => 0,
    }
}

pub(crate) fn field_type_name(t: i32) -> &'static str {
    match t {
        field_type::FLOAT16 => "kFLOAT16",
        field_type::FLOAT32 => "kFLOAT32",
        field_type::FLOAT64 => "kFLOAT64",
        field_type::INT8 => "kINT8",
        field_type::INT16 => "kINT16",
        field_type::INT32 => "kINT32",
        field_type::CHAR => "kCHAR",
        7 => "kDIMS",
        field_type::BF16 => "kBF16",
        field_type::INT64 => "kINT64",
        _ => "an unsupported field type",
    }
}

mod fields;
pub use fields::*;

// ---------------------------------------------------------------------------------------------
// The plugin
// ---------------------------------------------------------------------------------------------

/// An op's validated attributes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Attrs {
    Moe(scatter_moe::Attrs),
    Linear(parallel_linear::Attrs),
    Mask(capacity_mask::Attrs),
}

impl Attrs {
    pub fn parse(op: Op, src: &dyn AttrSource) -> Result<Attrs, SpecError> {
        Ok(match op {
            Op::ScatterMoE => Attrs::Moe(scatter_moe::Attrs::parse(src)?),
            Op::ParallelLinear => Attrs::Linear(parallel_linear::Attrs::parse(src)?),
            _ => Attrs::Mask(capacity_mask::Attrs::parse(src)?),
        })
    }

    pub fn op(&self) -> Op {
        match self {
            Attrs::Moe(_) => Op::ScatterMoE,
            Attrs::Linear(_) => Op::ParallelLinear,
            Attrs::Mask(_) => Op::CapacityMask,
        }
    }

    /// The value of attribute `name` (one of the op's `ATTRS`).
    pub fn value(&self, name: &str) -> Option<Value> {
        use Value::*;
        Some(match self {
            Attrs::Moe(a) => match name {
                scatter_moe::ATTR_ACTIVATION => Str(a.activation.name().into()),
                scatter_moe::ATTR_GATED => Int(a.gated as i64),
                scatter_moe::ATTR_GLU_LAYOUT => Str(a.glu_layout.name().into()),
                scatter_moe::ATTR_ALPHA => Float(a.alpha),
                scatter_moe::ATTR_LIMIT => Float(a.limit),
                scatter_moe::ATTR_CAPACITY_ORDER => Str(a.capacity_order.name().into()),
                _ => return None,
            },
            Attrs::Linear(a) => match name {
                parallel_linear::ATTR_GROUPED_IN => Int(a.grouped_in as i64),
                parallel_linear::ATTR_GROUPED_OUT => Int(a.grouped_out as i64),
                _ => return None,
            },
            Attrs::Mask(a) => match name {
                capacity_mask::ATTR_NUM_EXPERTS => Int(a.num_experts as i64),
                capacity_mask::ATTR_CAPACITY_ORDER => Str(a.capacity_order.name().into()),
                _ => return None,
            },
        })
    }

    /// Every attribute of the op with its value, in `ATTRS` order.
    pub fn values(&self) -> Vec<(&'static str, Value)> {
        self.op().attrs().iter().map(|a| (a.name, self.value(a.name).expect("every attribute has a value"))).collect()
    }
}

pub struct Plugin {
    attrs: Attrs,
    /// the device op's runner: the checks of bad routing indices (per plugin object: TensorRT
    /// clones one per execution context); their pinned memory is made on the first run
    runner: Runner,
    /// inputs of the last configuration (for messages)
    nb_inputs: usize,
}

pub fn create_plugin(op: Op, fields: &[Field]) -> Result<Box<Plugin>, SpecError> {
    let src = Fields::new(op, fields)?;
    let attrs = Attrs::parse(op, &src)?;
    Ok(Box::new(Plugin::new(attrs)))
}

fn known(d: &[i64]) -> Vec<Dim> {
    d.iter().map(|&v| (v >= 0).then_some(v as u64)).collect()
}

fn err(op: &'static str, message: impl Into<String>) -> SpecError {
    SpecError { op, message: message.into() }
}

impl Plugin {
    pub fn new(attrs: Attrs) -> Plugin {
        Plugin { attrs, runner: Runner::default(), nb_inputs: 0 }
    }

    pub fn attrs(&self) -> &Attrs {
        &self.attrs
    }

    pub fn clone_plugin(&self) -> Box<Plugin> {
        Box::new(Plugin { nb_inputs: self.nb_inputs, ..Plugin::new(self.attrs) })
    }

    pub fn op(&self) -> Op {
        self.attrs.op()
    }

    fn name(&self) -> &'static str {
        self.op().name()
    }

    pub fn nb_outputs(&self) -> i32 {
        self.op().outputs().len() as i32
    }

    /// The contract's check of one call: `types` TensorRT codes (None: not known), `shapes` with
    /// None for dimensions not known yet.
    fn check(&self, types: &[Option<i32>], shapes: &[Vec<Dim>]) -> Result<(), SpecError> {
        let types: Vec<Option<i32>> = types.iter().map(|t| t.map(onnx_code)).collect();
        let refs: Vec<Option<&[Dim]>> = shapes.iter().map(|s| Some(s.as_slice())).collect();
        match &self.attrs {
            Attrs::Moe(a) => scatter_moe::check(a, &types, &refs).map(drop),
            Attrs::Linear(a) => parallel_linear::check(a, &types, &refs).map(drop),
            Attrs::Mask(_) => capacity_mask::check(&types, &refs).map(drop),
        }
    }

    fn check_descs(&self, inputs: &[TensorDesc]) -> Result<(), SpecError> {
        let types: Vec<Option<i32>> = inputs.iter().map(|d| Some(d.data_type)).collect();
        let shapes: Vec<Vec<Dim>> = inputs.iter().map(|d| known(&d.dims)).collect();
        self.check(&types, &shapes)
    }

    fn check_outputs(&self, outputs: usize) -> Result<(), SpecError> {
        if outputs != self.op().outputs().len() {
            return Err(err(self.name(), format!("has {} output(s), got {outputs}", self.op().outputs().len())));
        }
        Ok(())
    }

    pub fn output_types(&self, input_types: &[i32]) -> Result<Vec<i32>, SpecError> {
        let op = self.name();
        let types: Vec<Option<i32>> = input_types.iter().map(|&t| Some(onnx_code(t))).collect();
        let ports = self.op().inputs();
        if input_types.len() > ports.len() {
            return Err(err(op, format!("expects at most {} inputs, got {}", ports.len(), input_types.len())));
        }
        let (t, _) = spec::check_types(op, ports, &types)?;
        Ok(self
            .op()
            .outputs()
            .iter()
            .map(|p| match p.ty {
                PortType::Bool => data_type::BOOL,
                PortType::Int64 => data_type::INT64,
                _ => trt_elem(t),
            })
            .collect())
    }

    pub fn output_shapes(&self, inputs: &[TensorDesc]) -> Result<Vec<OutputShape>, SpecError> {
        let shapes: Vec<Vec<Dim>> = inputs.iter().map(|d| known(&d.dims)).collect();
        self.check(&vec![None; inputs.len()], &shapes)?;
        let refs = |input: usize| -> Vec<DimRef> {
            (0..inputs[input].dims.len()).map(|a| DimRef { input: input as i32, axis: a as i32 }).collect()
        };
        let dims = match &self.attrs {
            Attrs::Moe(_) => scatter_moe::output_shape(&refs(scatter_moe::X)),
            Attrs::Linear(a) => {
                use parallel_linear::*;
                let has_gates = inputs.len() > GATES;
                let d_out = DimRef { input: W as i32, axis: 1 };
                output_shape(a, &refs(ROUTING_INDICES), d_out, has_gates, |_| DimRef { input: ROUTING_INDICES as i32, axis: -1 })
            }
            Attrs::Mask(_) => refs(capacity_mask::ROUTING_INDICES),
        };
        Ok(vec![OutputShape { dims }])
    }

    pub fn supports_format(&self, pos: i32, in_out: &[TensorDesc], nb_inputs: i32) -> bool {
        let (ins, outs) = (self.op().inputs(), self.op().outputs());
        let (pos, nb_inputs) = (pos as usize, nb_inputs as usize);
        if pos >= in_out.len() || nb_inputs > ins.len() {
            return false;
        }
        let port = |i: usize| if i < nb_inputs { ins.get(i) } else { outs.get(i - nb_inputs) };
        let Some(p) = port(pos) else { return false };
        let d = &in_out[pos];
        if !d.linear {
            return false;
        }
        let t = d.data_type;
        match p.ty {
            PortType::Float => {
                let is_float = matches!(t, data_type::FLOAT | data_type::HALF | data_type::BF16);
                // every float input and output shares the type of the first one
                let first = (0..pos).find(|&i| port(i).is_some_and(|q| q.ty == PortType::Float));
                is_float && first.is_none_or(|i| in_out[i].data_type == t)
            }
            PortType::Index => matches!(t, data_type::INT32 | data_type::INT64),
            PortType::Int64 => t == data_type::INT64,
            PortType::Bool => t == data_type::BOOL,
        }
    }

    pub fn configure(&mut self, inputs: &[Range], outputs: &[Range]) -> Result<(), SpecError> {
        let descs: Vec<TensorDesc> = inputs.iter().map(|r| r.desc.clone()).collect();
        self.check_descs(&descs)?;
        self.check_outputs(outputs.len())?;
        self.nb_inputs = inputs.len();
        Ok(())
    }

    pub fn on_shape_change(&mut self, inputs: &[TensorDesc], outputs: &[TensorDesc]) -> Result<(), SpecError> {
        self.check_descs(inputs)?;
        self.check_outputs(outputs.len())?;
        self.nb_inputs = inputs.len();
        Ok(())
    }

    pub fn workspace_size(&self, inputs: &[Range], _outputs: &[Range]) -> Result<usize, SpecError> {
        let op = self.name();
        let dim = |i: usize, axis: isize| -> usize {
            let Some(r) = inputs.get(i) else { return 0 };
            let n = r.max.len() as isize;
            let a = if axis < 0 { n + axis } else { axis };
            if a < 0 || a >= n {
                return 0;
            }
            r.max[a as usize].max(0) as usize
        };
        let leading = |i: usize| -> usize {
            inputs.get(i).map_or(0, |r| r.max.iter().take(r.max.len().saturating_sub(1)).map(|&v| v.max(0) as usize).product())
        };
        let elem = |i: usize| -> Result<ElemType, SpecError> {
            let t = inputs.get(i).map_or(-1, |r| r.desc.data_type);
            ElemType::from_onnx_code(onnx_code(t))
                .ok_or_else(|| err(op, format!("input {i} has element type {}", spec::onnx_type_name(onnx_code(t)))))
        };
        // The plan grows with every size: the largest shapes bound every run of the profile.
        Ok(match &self.attrs {
            Attrs::Moe(_) => {
                use scatter_moe::*;
                let s = MoeSizes {
                    tokens: leading(X).max(leading(ROUTING_INDICES)),
                    k: dim(ROUTING_INDICES, -1),
                    experts: dim(W_IN, 0),
                    d: dim(X, -1),
                    f: dim(W_OUT, 2),
                };
                MoeCall { elem: elem(X)?, it: IndexType::I64, sizes: s, capacity: inputs.len() > CAPACITY }.workspace_bytes()
            }
            Attrs::Linear(_) => {
                use parallel_linear::*;
                let s = LinearSizes {
                    tokens: leading(ROUTING_INDICES),
                    k: dim(ROUTING_INDICES, -1),
                    experts: dim(W, 0),
                    d_in: dim(X, -1),
                    d_out: dim(W, 1),
                };
                LinearCall { elem: elem(X)?, it: IndexType::I64, sizes: s, gates: inputs.len() > GATES }.workspace_bytes()
            }
            Attrs::Mask(a) => {
                let ri = capacity_mask::ROUTING_INDICES;
                MaskCall { it: IndexType::I64, tokens: leading(ri), k: dim(ri, -1), experts: a.num_experts }.workspace_bytes()
            }
        })
    }

    pub fn fields_to_serialize(&self) -> Vec<Field> {
        self.attrs.values().iter().map(|(n, v)| v.field(n)).collect()
    }

    /// # Safety
    /// The pointers must be TensorRT's device buffers for `inputs` / `outputs` (as described) and a
    /// workspace of at least [`Plugin::workspace_size`] bytes for these shapes, usable on `stream`.
    pub unsafe fn enqueue(
        &mut self,
        inputs: &[TensorDesc],
        outputs: &[TensorDesc],
        input_ptrs: &[u64],
        output_ptrs: &[u64],
        workspace: u64,
        stream: u64,
    ) -> Result<(), String> {
        let op = self.name();
        self.check_descs(inputs).map_err(|e| e.to_string())?;
        self.check_outputs(outputs.len()).map_err(|e| e.to_string())?;
        if input_ptrs.len() != inputs.len() || output_ptrs.len() != outputs.len() {
            return Err(format!("{op}: {} input and {} output pointers for {} inputs and {} outputs", input_ptrs.len(), output_ptrs.len(), inputs.len(), outputs.len()));
        }
        let sig = Signature {
            types: inputs.iter().map(|d| Some(onnx_code(d.data_type))).collect(),
            shapes: inputs.iter().map(|d| Some(known(&d.dims))).collect(),
        };
        // TensorRT keeps every input on the device, the capacity too (read there by the op).
        let io = DeviceIo {
            inputs: input_ptrs.iter().map(|&p| Some(p as CUdeviceptr)).collect(),
            outputs: output_ptrs.iter().map(|&p| p as CUdeviceptr).collect(),
            host_capacity: None,
        };
        let stream = stream as CUstream;
        let runner = &self.runner;
        // SAFETY: TensorRT's buffers and workspace, as the caller promises, on its live stream.
        unsafe fn run<O: DeviceOp>(runner: &Runner, op: O, sig: &Signature, io: &DeviceIo, stream: CUstream, ws: u64) -> Result<(), String> {
            let call = op.check(sig).map_err(|e| e.to_string())?;
            unsafe { runner.run(&op, &call, io, stream, |_| Ok((ws as CUdeviceptr, ()))) }
        }
        match self.attrs {
            Attrs::Moe(a) => run(runner, ScatterMoeOp(a), &sig, &io, stream, workspace),
            Attrs::Linear(a) => run(runner, ParallelLinearOp(a), &sig, &io, stream, workspace),
            Attrs::Mask(a) => run(runner, CapacityMaskOp(a), &sig, &io, stream, workspace),
        }
    }
}

#[cfg(test)]
mod tests;
