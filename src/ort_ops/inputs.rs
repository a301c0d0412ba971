//! A node's inputs as ONNX Runtime hands them to every kernel (CPU and CUDA alike), turned into
//! the runtime-neutral [`Signature`] the contract's checks and the device ops read.

use super::api::{KernelContext, KernelInfo, ShapeContext, SymDim, Tensor, TypeShape};
use crate::signature::Signature;
use crate::spec::{Dim, Port, PortType, SpecError};

/// ONNX's element type code of bool (`TensorProto.DataType.BOOL`): CapacityMask's output.
pub(super) const BOOL: i32 = 9;

/// The element type an op writes into an output of type `ty`, given the type `t` of the float
/// input it computes in (checked against what ONNX Runtime allocated: `KernelContext::output`).
pub(super) fn output_elem(ty: PortType, t: Option<i32>) -> i32 {
    match ty {
        PortType::Bool => BOOL,
        PortType::Int64 => 7,
        // outputs are T (or bool): the input ports' types never describe one
        PortType::Float | PortType::Index | PortType::Weight | PortType::Scale | PortType::ZeroPoint => t.unwrap_or(0),
    }
}

pub(super) fn to_string(e: SpecError) -> String {
    e.to_string()
}

/// Before run time (kernel creation, shape inference): types and shapes as far as known.
pub(super) fn signature_before_run(ports: &[Port], inputs: &[Option<TypeShape>]) -> Signature {
    let types = inputs.iter().map(|i| i.as_ref().map(|t| t.elem)).collect();
    let shapes = inputs.iter().map(|i| i.as_ref().map(|t| t.dims.clone())).collect();
    Signature::before_run(ports, types, shapes)
}

/// At run time: every present input's type and shape.
pub(super) fn signature(inputs: &[Option<Tensor>]) -> Signature {
    Signature {
        types: inputs.iter().map(|i| i.as_ref().map(|t| t.elem)).collect(),
        shapes: inputs.iter().map(|i| i.as_ref().map(Tensor::shape)).collect(),
    }
}

pub(super) fn kernel_inputs(info: &KernelInfo) -> Result<Vec<Option<TypeShape>>, String> {
    (0..info.input_count()?).map(|i| info.input(i)).collect()
}

/// Inputs as shape inference sees them: the contract's view (`TypeShape`) and the named dims.
pub(super) fn shape_inputs(ctx: &ShapeContext) -> Result<(Vec<Option<TypeShape>>, Vec<Option<Vec<SymDim>>>), String> {
    let raw: Vec<_> = (0..ctx.input_count()?).map(|i| ctx.input(i)).collect::<Result<_, _>>()?;
    let plain = raw
        .iter()
        .map(|r| r.as_ref().map(|(elem, dims)| TypeShape { elem: *elem, dims: dims.iter().map(SymDim::dim).collect() }))
        .collect();
    Ok((plain, raw.into_iter().map(|r| r.map(|(_, d)| d)).collect()))
}

pub(super) fn compute_inputs(ctx: &KernelContext) -> Result<Vec<Option<Tensor>>, String> {
    (0..ctx.input_count()?).map(|i| ctx.input(i)).collect()
}

pub(super) fn known(d: Dim) -> usize {
    d.expect("all dimensions are known at run time") as usize
}
