//! One ONNX Runtime custom op built from a description: the `OrtCustomOp` table ORT calls,
//! filled with callbacks that forward to the op's Rust functions.
//!
//! Inputs are declared with an undefined element type, so ORT hands any type to the op and the
//! contract (`spec.rs`) names the offending input when one is wrong, instead of ORT's generic
//! "could not find an implementation". Outputs are typed: ORT before 1.21 cannot infer the type
//! of an untyped output from more than one untyped input, so each op is registered once per
//! float type `T`, and the shape-inference function picks the registration by setting it.
//! On ORT before 1.24, which gets no shape-inference function (see `shape_inference_supported`),
//! the first float input is typed instead, and ORT picks the registration by it.

use super::api::{error_status, ok_status, KernelContext, KernelInfo, ShapeContext};
use crate::spec::{ElemType, Port, PortType};
use ort_sys::{
    ONNXTensorElementDataType, OrtApi, OrtCustomOp, OrtCustomOpInputOutputCharacteristic, OrtKernelContext, OrtKernelInfo,
    OrtMemType, OrtShapeInferContext, OrtStatusPtr,
};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A kernel instance: one per node per session. ORT may run one session from several threads at
/// once, so `compute` can be entered concurrently on the same instance: it takes `&self`, and
/// state kept between runs sits behind a lock.
pub trait Kernel: Send + Sync {
    fn compute(&self, ctx: &KernelContext) -> Result<(), String>;
}

/// Everything ORT needs to know about one op on one execution provider.
pub struct OpDef {
    pub name: &'static CStr,
    /// None: the CPU execution provider.
    pub execution_provider: Option<&'static CStr>,
    pub inputs: &'static [Port],
    pub outputs: &'static [Port],
    /// The element type `T` of this registration's float outputs (an output the contract types as
    /// int64 or bool has that type).
    pub output_type: ONNXTensorElementDataType,
    /// The input declared with `output_type` on hosts without safe shape inference (ORT < 1.24),
    /// so that ORT picks this registration by that input's type (see [`input_type`]).
    pub type_carrier: Option<usize>,
    /// Inputs read on the host even when the op runs on a device (e.g. a scalar capacity).
    pub host_inputs: &'static [usize],
    /// Validates attributes and the shapes known at session creation; builds the kernel.
    pub create: fn(&KernelInfo) -> Result<Box<dyn Kernel>, String>,
    /// Output types and shapes from input types and shapes; fails on a contract violation.
    pub infer: fn(&mut ShapeContext) -> Result<(), String>,
}

/// `OrtCustomOp` must come first: ORT passes a pointer to it back to every callback, and the
/// callbacks recover the [`OpDef`] that follows it.
#[repr(C)]
pub struct CustomOp {
    raw: OrtCustomOp,
    def: OpDef,
}

fn def<'a>(op: *const OrtCustomOp) -> &'a OpDef {
    // SAFETY: every OrtCustomOp handed to ORT is the first field of a live, leaked CustomOp.
    unsafe { &(*op.cast::<CustomOp>()).def }
}

/// Runs `f`, turning an error or a panic into an ORT status (a panic must not cross into C++).
fn guarded(what: &str, f: impl FnOnce() -> Result<(), String>) -> OrtStatusPtr {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => ok_status(),
        Ok(Err(msg)) => error_status(&msg),
        Err(p) => {
            let detail = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            error_status(&format!("internal error in {what}: {detail}"))
        }
    }
}

unsafe extern "system" fn create_kernel(
    op: *const OrtCustomOp,
    _api: *const OrtApi,
    info: *const OrtKernelInfo,
    out: *mut *mut c_void,
) -> OrtStatusPtr {
    let d = def(op);
    guarded(d.name.to_str().unwrap_or("op"), || {
        let kernel = (d.create)(&KernelInfo(info))?;
        // SAFETY: ORT gives a valid out-pointer; the box is reclaimed in destroy_kernel.
        unsafe { *out = Box::into_raw(Box::new(kernel)).cast::<c_void>() };
        Ok(())
    })
}

unsafe extern "system" fn compute(kernel: *mut c_void, ctx: *mut OrtKernelContext) -> OrtStatusPtr {
    // SAFETY: `kernel` is the Box<Box<dyn Kernel>> made in create_kernel, alive until destroy_kernel;
    // concurrent runs share it through `&` only.
    let k = unsafe { &*kernel.cast::<Box<dyn Kernel>>() };
    guarded("compute", || k.compute(&KernelContext(ctx)))
}

unsafe extern "system" fn destroy_kernel(kernel: *mut c_void) {
    // SAFETY: made by create_kernel, destroyed once by ORT.
    drop(unsafe { Box::from_raw(kernel.cast::<Box<dyn Kernel>>()) });
}

unsafe extern "system" fn infer_shape(op: *const OrtCustomOp, ctx: *mut OrtShapeInferContext) -> OrtStatusPtr {
    let d = def(op);
    guarded("shape inference", || (d.infer)(&mut ShapeContext(ctx)))
}

unsafe extern "system" fn name(op: *const OrtCustomOp) -> *const c_char {
    def(op).name.as_ptr()
}

unsafe extern "system" fn execution_provider(op: *const OrtCustomOp) -> *const c_char {
    def(op).execution_provider.map_or(std::ptr::null(), CStr::as_ptr)
}

/// Untyped, except the type carrier on hosts where we declare no shape inference: there ORT
/// cannot learn the output type from us, and picks the first registration whose declared types
/// fit; typing one input with `T` makes that the registration for `T`.
unsafe extern "system" fn input_type(op: *const OrtCustomOp, i: usize) -> ONNXTensorElementDataType {
    let d = def(op);
    if d.type_carrier == Some(i) && !super::shape_inference_supported() {
        d.output_type
    } else {
        ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED
    }
}

/// `T` (the registration's), except the outputs the contract types itself (int64 indices, a bool mask).
unsafe extern "system" fn output_type(op: *const OrtCustomOp, i: usize) -> ONNXTensorElementDataType {
    let d = def(op);
    match d.outputs.get(i).map(|p| p.ty) {
        Some(PortType::Int64) => ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64,
        Some(PortType::Bool) => ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL,
        _ => d.output_type,
    }
}

/// ORT's name for a float type `T`.
pub fn ort_type(t: ElemType) -> ONNXTensorElementDataType {
    match t {
        ElemType::F32 => ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
        ElemType::F16 => ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
        ElemType::BF16 => ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16,
    }
}

unsafe extern "system" fn input_count(op: *const OrtCustomOp) -> usize {
    def(op).inputs.len()
}

unsafe extern "system" fn output_count(op: *const OrtCustomOp) -> usize {
    def(op).outputs.len()
}

fn characteristic(p: &Port) -> OrtCustomOpInputOutputCharacteristic {
    if p.optional {
        OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
    } else {
        OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED
    }
}

unsafe extern "system" fn input_characteristic(op: *const OrtCustomOp, i: usize) -> OrtCustomOpInputOutputCharacteristic {
    characteristic(&def(op).inputs[i])
}

unsafe extern "system" fn output_characteristic(op: *const OrtCustomOp, i: usize) -> OrtCustomOpInputOutputCharacteristic {
    characteristic(&def(op).outputs[i])
}

unsafe extern "system" fn input_memory_type(op: *const OrtCustomOp, i: usize) -> OrtMemType {
    if def(op).host_inputs.contains(&i) {
        OrtMemType::OrtMemTypeCPUInput
    } else {
        OrtMemType::OrtMemTypeDefault
    }
}

unsafe extern "system" fn one(_op: *const OrtCustomOp) -> c_int {
    1
}

unsafe extern "system" fn zero(_op: *const OrtCustomOp) -> c_int {
    0
}

unsafe extern "system" fn start_version(_op: *const OrtCustomOp) -> c_int {
    crate::spec::OPSET_VERSION as c_int
}

unsafe extern "system" fn end_version(_op: *const OrtCustomOp) -> c_int {
    crate::spec::OPSET_VERSION as c_int
}

impl CustomOp {
    /// Builds the op; it must live as long as any session that uses it (callers leak it).
    pub fn new(def: OpDef) -> Box<CustomOp> {
        Box::new(CustomOp {
            raw: OrtCustomOp {
                version: super::api::API_VERSION,
                CreateKernel: None,
                GetName: Some(name),
                GetExecutionProviderType: Some(execution_provider),
                GetInputType: Some(input_type),
                GetInputTypeCount: Some(input_count),
                GetOutputType: Some(output_type),
                GetOutputTypeCount: Some(output_count),
                KernelCompute: None,
                KernelDestroy: Some(destroy_kernel),
                GetInputCharacteristic: Some(input_characteristic),
                GetOutputCharacteristic: Some(output_characteristic),
                GetInputMemoryType: Some(input_memory_type),
                GetVariadicInputMinArity: Some(one),
                GetVariadicInputHomogeneity: Some(zero),
                GetVariadicOutputMinArity: Some(one),
                GetVariadicOutputHomogeneity: Some(zero),
                CreateKernelV2: Some(create_kernel),
                KernelComputeV2: Some(compute),
                InferOutputShapeFn: if super::shape_inference_supported() { Some(infer_shape) } else { None },
                GetStartVersion: Some(start_version),
                GetEndVersion: Some(end_version),
                GetMayInplace: None,
                ReleaseMayInplace: None,
                GetAliasMap: None,
                ReleaseAliasMap: None,
            },
            def,
        })
    }

    pub fn raw(&self) -> *const OrtCustomOp {
        &self.raw
    }
}
