//! The op table ONNX Runtime registers, once per execution provider: names, ports, output types,
//! which inputs stay in host memory, the kernel constructors, and shape inference (the contract's
//! output shapes, the same on every provider).

use super::api::{ShapeContext, SymDim};
use super::attrs::AttrProbe;
use super::inputs::{shape_inputs, signature_before_run, to_string};
use super::op::{ort_type, Kernel, OpDef};
use super::api::KernelInfo;
use crate::spec::{capacity_mask, parallel_linear, scatter_moe, topk_router, ElemType};
use ort_sys::ONNXTensorElementDataType;
use std::ffi::CStr;

/// How one execution provider builds the kernels of the three ops.
pub(super) struct Kernels {
    /// None: the CPU execution provider.
    pub execution_provider: Option<&'static CStr>,
    pub moe: fn(&KernelInfo) -> Result<Box<dyn Kernel>, String>,
    pub linear: fn(&KernelInfo) -> Result<Box<dyn Kernel>, String>,
    pub mask: fn(&KernelInfo) -> Result<Box<dyn Kernel>, String>,
    pub router: fn(&KernelInfo) -> Result<Box<dyn Kernel>, String>,
    /// Whether the scalar capacity input is read in host memory (a device EP).
    pub capacity_on_host: bool,
}

/// One execution provider's registrations: ScatterMoE, ParallelLinear and TopKRouter once per float
/// type `T` (see `op.rs`), CapacityMask once. Shape inference is the same on every provider.
pub(super) fn op_table(k: Kernels) -> Vec<OpDef> {
    let ep = k.execution_provider;
    let (moe_host, mask_host): (&'static [usize], &'static [usize]) =
        if k.capacity_on_host { (&[scatter_moe::CAPACITY], &[capacity_mask::CAPACITY]) } else { (&[], &[]) };
    let mut ops = Vec::new();
    for t in ElemType::ALL {
        ops.push(OpDef {
            name: c"ScatterMoE",
            execution_provider: ep,
            inputs: &scatter_moe::INPUTS,
            outputs: &scatter_moe::OUTPUTS,
            output_type: ort_type(t),
            type_carrier: Some(scatter_moe::X),
            host_inputs: moe_host,
            create: k.moe,
            infer: infer_moe,
        });
        ops.push(OpDef {
            name: c"ParallelLinear",
            execution_provider: ep,
            inputs: &parallel_linear::INPUTS,
            outputs: &parallel_linear::OUTPUTS,
            output_type: ort_type(t),
            type_carrier: Some(parallel_linear::X),
            host_inputs: &[],
            create: k.linear,
            infer: infer_linear,
        });
        ops.push(OpDef {
            name: c"TopKRouter",
            execution_provider: ep,
            inputs: &topk_router::INPUTS,
            outputs: &topk_router::OUTPUTS,
            output_type: ort_type(t),
            type_carrier: Some(topk_router::LOGITS),
            host_inputs: &[],
            create: k.router,
            infer: infer_router,
        });
    }
    ops.push(OpDef {
        name: c"CapacityMask",
        execution_provider: ep,
        inputs: &capacity_mask::INPUTS,
        outputs: &capacity_mask::OUTPUTS,
        output_type: ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL,
        type_carrier: None,
        host_inputs: mask_host,
        create: k.mask,
        infer: infer_mask,
    });
    ops
}


fn infer_moe(ctx: &mut ShapeContext) -> Result<(), String> {
    ctx.check_attr_types(scatter_moe::NAME, &scatter_moe::ATTRS)?;
    let attrs = scatter_moe::Attrs::parse(ctx).map_err(to_string)?;
    let (plain, named) = shape_inputs(ctx)?;
    let sig = signature_before_run(&scatter_moe::INPUTS, &plain);
    let (t, _, _) = scatter_moe::check(&attrs, &sig.types, &sig.shape_refs()).map_err(to_string)?;
    let x = named[scatter_moe::X].as_deref().unwrap();
    if x.is_empty() {
        return Ok(()); // rank unknown: the output's type is declared, its shape comes at run time
    }
    ctx.set_output(scatter_moe::Y, t.onnx_code(), &scatter_moe::output_shape(x))
}

fn infer_linear(ctx: &mut ShapeContext) -> Result<(), String> {
    ctx.check_attr_types(parallel_linear::NAME, &parallel_linear::ATTRS)?;
    let attrs = parallel_linear::Attrs::parse(ctx).map_err(to_string)?;
    let (plain, named) = shape_inputs(ctx)?;
    let sig = signature_before_run(&parallel_linear::INPUTS, &plain);
    let (t, _, dims) = parallel_linear::check(&attrs, &sig.types, &sig.shape_refs()).map_err(to_string)?;
    let routing = named[parallel_linear::ROUTING_INDICES].as_deref().unwrap();
    let w = named[parallel_linear::W].as_deref().unwrap();
    if routing.is_empty() || w.is_empty() {
        return Ok(()); // rank unknown: the output's type is declared, its shape comes at run time
    }
    let d_out = w[1].clone();
    let rows = |r: &[SymDim]| {
        let dims: Vec<_> = r.iter().map(SymDim::dim).collect();
        parallel_linear::grouped_rows(&dims).map_or_else(SymDim::fresh, SymDim::Value)
    };
    let y = parallel_linear::output_shape(&attrs, routing, d_out, dims.has_gates, rows);
    ctx.set_output(0, t.onnx_code(), &y)
}

fn infer_mask(ctx: &mut ShapeContext) -> Result<(), String> {
    ctx.check_attr_types(capacity_mask::NAME, &capacity_mask::ATTRS)?;
    capacity_mask::Attrs::parse(ctx).map_err(to_string)?;
    let (plain, named) = shape_inputs(ctx)?;
    let sig = signature_before_run(&capacity_mask::INPUTS, &plain);
    capacity_mask::check(&sig.types, &sig.shape_refs()).map_err(to_string)?;
    let routing = named[capacity_mask::ROUTING_INDICES].as_deref().unwrap();
    if routing.is_empty() {
        return Ok(()); // rank unknown: the output's type is declared, its shape comes at run time
    }
    ctx.set_output(0, 9, routing)
}


fn infer_router(ctx: &mut ShapeContext) -> Result<(), String> {
    ctx.check_attr_types(topk_router::NAME, &topk_router::ATTRS)?;
    let attrs = topk_router::Attrs::parse(ctx).map_err(to_string)?;
    let (plain, named) = shape_inputs(ctx)?;
    let sig = signature_before_run(&topk_router::INPUTS, &plain);
    let (t, _) = topk_router::check(&attrs, &sig.types, &sig.shape_refs()).map_err(to_string)?;
    let logits = named[topk_router::LOGITS].as_deref().unwrap();
    if logits.is_empty() {
        return Ok(()); // rank unknown: the outputs' types are declared, their shapes come at run time
    }
    let out = topk_router::output_shape(&attrs, logits, |k| SymDim::Value(k as u64));
    ctx.set_output(topk_router::ROUTING_WEIGHTS, t.onnx_code(), &out)?;
    ctx.set_output(topk_router::ROUTING_INDICES, 7, &out)
}
