//! The ops on ONNX Runtime's CPU execution provider: contract checks from `spec`, arithmetic from
//! `reference`.
//!
//! Weights that are constant initializers are packed once, when the session creates the kernel
//! (as ORT's own MatMul prepacks its constant B): see `reference::panels`. The packed copy is f32
//! and lives as long as the kernel, beside ORT's initializer; `SCATTERMOE_CPU_PREPACK=0` turns
//! packing off (the products then read the initializers as they are, every call). Quantized
//! weights are never packed (the packed copy would be a whole dequantized f32 copy): the products
//! dequantize the rows they multiply, a block at a time (`crate::cpu::quant`).

use super::api::{KernelContext, KernelInfo, Tensor};
use super::attrs::AttrProbe;
use super::inputs::{compute_inputs, kernel_inputs, known, signature, signature_before_run, to_string, BOOL};
use super::op::{Kernel, OpDef};
use super::registry::{op_table, Kernels};
use crate::reference::panels::{Columns, PackedWeights};
use crate::cpu::router::PerExpert;
use crate::cpu::{QuantWeight, Scales, Weight};
use crate::reference::{self, Element, Indices, LinearInputs, LinearSizes, MoeInputs, MoeSizes, PackedMoe, ScratchUser, SharedScratch};
use crate::spec::{capacity_mask, parallel_linear, scatter_moe, topk_router, ElemType, IndexType, Quant};
use half::{bf16, f16};

/// The output buffer as `&mut [E]` (empty tensors may come with a null pointer).
///
/// # Safety
/// `ptr` must point to `len` host elements of type `E`, or `len` must be 0.
unsafe fn out_slice<'a, E>(ptr: *mut std::ffi::c_void, len: usize) -> &'a mut [E] {
    if len == 0 {
        &mut []
    } else {
        std::slice::from_raw_parts_mut(ptr.cast::<E>(), len)
    }
}

/// # Safety
/// The tensor must hold `it` elements in host memory.
unsafe fn indices(t: &Tensor, it: IndexType) -> Indices<'_> {
    match it {
        IndexType::I32 => Indices::I32(t.slice::<i32>()),
        IndexType::I64 => Indices::I64(t.slice::<i64>()),
    }
}

/// The weight input `w`, in `T` (`E`) or quantized as `q` describes, with its scale and zero
/// point inputs `scale` and `zero`.
///
/// # Safety
/// The contract check established the inputs' types and shapes (`q` is its finding); they are
/// host memory.
unsafe fn weight<E: Element>(ins: &[Option<Tensor>], [w, scale, zero]: [usize; 3], q: Option<Quant>) -> Weight<'_, E> {
    let get = |i: usize| ins.get(i).and_then(Option::as_ref).expect("checked present");
    let Some(quant) = q else { return Weight::Plain(get(w).slice::<E>()) };
    Weight::Quant(QuantWeight {
        quant,
        codes: get(w).slice::<u8>(),
        scales: if quant.scale == ElemType::F32 { Scales::F32(get(scale).slice::<f32>()) } else { Scales::T(get(scale).slice::<E>()) },
        zero_points: quant.zero_point.then(|| get(zero).slice::<u8>()),
    })
}

/// ORT's intra-op thread pool as the CPU code's [`reference::Pool`].
struct OrtPool<'a>(&'a KernelContext);

// SAFETY: ORT's ParallelFor may be called from the compute thread while tasks run on pool threads;
// the context pointer is only used to dispatch, never mutated.
unsafe impl Sync for OrtPool<'_> {}

impl reference::Pool for OrtPool<'_> {
    fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        self.0.parallel_for(n, f);
    }
}

/// Intermediate buffers of the CPU kernels, shared by all of them (one node runs at a time in
/// ORT's sequential executor) and freed with the last kernel.
static SCRATCH: SharedScratch = SharedScratch::new();

/// Scratch kept between calls, at most (the buffers of a bigger call are freed after it).
const KEEP_SCRATCH_BYTES: usize = 256 << 20;

/// Whether kernels pack constant weights (`SCATTERMOE_CPU_PREPACK=0` says no).
fn prepack_enabled() -> bool {
    std::env::var_os("SCATTERMOE_CPU_PREPACK").is_none_or(|v| v != "0")
}

/// The node's constant inputs `ids`, all of element type `t` (None for an input the node leaves
/// out), or None when one of the present ones is not a constant initializer.
fn constant_inputs<const N: usize>(info: &KernelInfo, t: ElemType, ids: [usize; N]) -> Option<[Option<Tensor>; N]> {
    let mut out: [Option<Tensor>; N] = std::array::from_fn(|_| None);
    for (slot, i) in out.iter_mut().zip(ids) {
        if info.input(i).ok()?.is_none() {
            continue;
        }
        let c = info.constant_input(i).ok()??;
        if c.elem != t.onnx_code() {
            return None;
        }
        *slot = Some(c);
    }
    Some(out)
}


// ---------------------------------------------------------------------------------------------
// ScatterMoE
// ---------------------------------------------------------------------------------------------

struct MoeCpu {
    attrs: scatter_moe::Attrs,
    /// The weights and biases, packed at creation when they are all constant.
    packed: Option<PackedMoe>,
    _scratch: ScratchUser,
}

fn create_moe(info: &KernelInfo) -> Result<Box<dyn Kernel>, String> {
    info.check_attr_types(scatter_moe::NAME, &scatter_moe::ATTRS)?;
    let attrs = scatter_moe::Attrs::parse(info).map_err(to_string)?;
    let sig = signature_before_run(&scatter_moe::INPUTS, &kernel_inputs(info)?);
    let (t, _, _) = scatter_moe::check(&attrs, &sig.types, &sig.shape_refs()).map_err(to_string)?;
    let packed = if prepack_enabled() { pack_moe(info, &attrs, t) } else { None };
    Ok(Box::new(MoeCpu { attrs, packed, _scratch: SCRATCH.user() }))
}

/// Packs `w_in`, `w_out` and the biases the node has, when all are constant initializers.
fn pack_moe(info: &KernelInfo, attrs: &scatter_moe::Attrs, t: ElemType) -> Option<PackedMoe> {
    use scatter_moe::*;
    let [Some(w_in), Some(w_out), b_in, b_out] = constant_inputs(info, t, [W_IN, W_OUT, B_IN, B_OUT])? else { return None };
    // Constant shapes are static: the contract check at creation has seen these very dims.
    let &[experts, d, f] = w_out.dims.as_slice() else { return None };
    /// # Safety
    /// The tensors hold `E` in host memory.
    unsafe fn pack<E: Element>(a: &scatter_moe::Attrs, s: [usize; 3], w: [&Tensor; 2], b: [Option<&Tensor>; 2]) -> Option<PackedMoe> {
        let [experts, d, f] = s;
        PackedMoe::new::<E>(a, experts, d, f, w[0].slice(), w[1].slice(), b[0].map(|t| t.slice()), b[1].map(|t| t.slice()))
    }
    let (s, w, b) = ([experts, d, f], [&w_in, &w_out], [b_in.as_ref(), b_out.as_ref()]);
    // SAFETY: `constant_inputs` checked the element types against `t`; CPU initializers are host memory.
    unsafe {
        match t {
            ElemType::F32 => pack::<f32>(attrs, s, w, b),
            ElemType::F16 => pack::<f16>(attrs, s, w, b),
            ElemType::BF16 => pack::<bf16>(attrs, s, w, b),
        }
    }
}

impl Kernel for MoeCpu {
    fn compute(&self, ctx: &KernelContext) -> Result<(), String> {
        let ins = compute_inputs(ctx)?;
        let sig = signature(&ins);
        let (t, it, dims) = scatter_moe::check(&self.attrs, &sig.types, &sig.shape_refs()).map_err(to_string)?;
        let sizes = MoeSizes {
            tokens: known(dims.tokens),
            k: known(dims.k),
            experts: known(dims.experts),
            d: known(dims.d),
            f: known(dims.f),
        };
        let get = |i: usize| ins.get(i).and_then(Option::as_ref);
        let capacity = match get(scatter_moe::CAPACITY) {
            // SAFETY: the contract checked it is int64 with one element; it is host memory (CPU EP).
            Some(c) => Some(scatter_moe::check_capacity(unsafe { c.slice::<i64>() }[0]).map_err(to_string)?),
            None => None,
        };
        let x = get(scatter_moe::X).unwrap();
        let y = ctx.output(scatter_moe::Y, &x.dims, t.onnx_code())?.ok_or("output 'Y' is required")?;
        let q = [dims.w_in, dims.w_out];
        match t {
            ElemType::F32 => self.run::<f32>(ctx, sizes, &ins, it, q, capacity, y),
            ElemType::F16 => self.run::<f16>(ctx, sizes, &ins, it, q, capacity, y),
            ElemType::BF16 => self.run::<bf16>(ctx, sizes, &ins, it, q, capacity, y),
        }
    }
}

impl MoeCpu {
    #[allow(clippy::too_many_arguments)]
    fn run<E: Element>(
        &self,
        ctx: &KernelContext,
        s: MoeSizes,
        ins: &[Option<Tensor>],
        it: IndexType,
        [q_in, q_out]: [Option<Quant>; 2],
        capacity: Option<usize>,
        y: *mut std::ffi::c_void,
    ) -> Result<(), String> {
        use scatter_moe::*;
        let get = |i: usize| ins.get(i).and_then(Option::as_ref);
        // SAFETY: the contract check established every present input's element type (E, or `it`
        // for the indices) and shape; on the CPU EP all buffers are host memory.
        unsafe {
            let inputs = MoeInputs {
                x: get(X).unwrap().slice::<E>(),
                routing_weights: get(ROUTING_WEIGHTS).unwrap().slice::<E>(),
                routing_indices: indices(get(ROUTING_INDICES).unwrap(), it),
                w_in: weight(ins, [W_IN, W_IN_SCALE, W_IN_ZERO_POINT], q_in),
                w_out: weight(ins, [W_OUT, W_OUT_SCALE, W_OUT_ZERO_POINT], q_out),
                b_in: get(B_IN).map(|t| t.slice::<E>()),
                b_out: get(B_OUT).map(|t| t.slice::<E>()),
                capacity,
            };
            let y = out_slice::<E>(y, s.tokens * s.d);
            SCRATCH.with(KEEP_SCRATCH_BYTES, |scratch| {
                reference::scatter_moe_with(&OrtPool(ctx), &self.attrs, s, &inputs, self.packed.as_ref(), scratch, y)
            })
            .map_err(to_string)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ParallelLinear
// ---------------------------------------------------------------------------------------------

struct LinearCpu {
    attrs: parallel_linear::Attrs,
    /// `W` and `b`, packed at creation when they are constant.
    packed: Option<PackedWeights>,
    _scratch: ScratchUser,
}

fn create_linear(info: &KernelInfo) -> Result<Box<dyn Kernel>, String> {
    info.check_attr_types(parallel_linear::NAME, &parallel_linear::ATTRS)?;
    let attrs = parallel_linear::Attrs::parse(info).map_err(to_string)?;
    let sig = signature_before_run(&parallel_linear::INPUTS, &kernel_inputs(info)?);
    let (t, _, _) = parallel_linear::check(&attrs, &sig.types, &sig.shape_refs()).map_err(to_string)?;
    let packed = if prepack_enabled() { pack_linear(info, t) } else { None };
    Ok(Box::new(LinearCpu { attrs, packed, _scratch: SCRATCH.user() }))
}

/// Packs `W` and `b` (when the node has it), when both are constant initializers.
fn pack_linear(info: &KernelInfo, t: ElemType) -> Option<PackedWeights> {
    use parallel_linear::*;
    let [Some(w), b] = constant_inputs(info, t, [W, B])? else { return None };
    let &[experts, d_out, d_in] = w.dims.as_slice() else { return None };
    /// # Safety
    /// The tensors hold `E` in host memory.
    unsafe fn pack<E: Element>(w: &Tensor, b: Option<&Tensor>, [experts, d_out, d_in]: [usize; 3]) -> Option<PackedWeights> {
        PackedWeights::new::<E>(w.slice(), b.map(|t| t.slice()), experts, d_out, d_in, Columns::Plain)
    }
    let s = [experts, d_out, d_in];
    // SAFETY: as in pack_moe.
    unsafe {
        match t {
            ElemType::F32 => pack::<f32>(&w, b.as_ref(), s),
            ElemType::F16 => pack::<f16>(&w, b.as_ref(), s),
            ElemType::BF16 => pack::<bf16>(&w, b.as_ref(), s),
        }
    }
}

impl Kernel for LinearCpu {
    fn compute(&self, ctx: &KernelContext) -> Result<(), String> {
        let ins = compute_inputs(ctx)?;
        let sig = signature(&ins);
        let refs = sig.shape_refs();
        let (t, it, dims) = parallel_linear::check(&self.attrs, &sig.types, &refs).map_err(to_string)?;
        let sizes = LinearSizes {
            tokens: known(dims.tokens),
            k: known(dims.k),
            experts: known(dims.experts),
            d_in: known(dims.d_in),
            d_out: known(dims.d_out),
        };
        let routing = refs[parallel_linear::ROUTING_INDICES].unwrap();
        let out: Vec<usize> = parallel_linear::output_shape(&self.attrs, routing, dims.d_out, dims.has_gates, parallel_linear::grouped_rows)
            .into_iter()
            .map(known)
            .collect();
        let y = ctx.output(0, &out, t.onnx_code())?.ok_or("output 'Y' is required")?;
        let len = out.iter().product();
        match t {
            ElemType::F32 => self.run::<f32>(ctx, sizes, &ins, it, dims.w, y, len),
            ElemType::F16 => self.run::<f16>(ctx, sizes, &ins, it, dims.w, y, len),
            ElemType::BF16 => self.run::<bf16>(ctx, sizes, &ins, it, dims.w, y, len),
        }
    }
}

impl LinearCpu {
    #[allow(clippy::too_many_arguments)]
    fn run<E: Element>(&self, ctx: &KernelContext, s: LinearSizes, ins: &[Option<Tensor>], it: IndexType, q: Option<Quant>, y: *mut std::ffi::c_void, len: usize) -> Result<(), String> {
        use parallel_linear::*;
        let get = |i: usize| ins.get(i).and_then(Option::as_ref);
        // SAFETY: as in MoeCpu::run.
        unsafe {
            let inputs = LinearInputs {
                x: get(X).unwrap().slice::<E>(),
                routing_indices: indices(get(ROUTING_INDICES).unwrap(), it),
                w: weight(ins, [W, W_SCALE, W_ZERO_POINT], q),
                b: get(B).map(|t| t.slice::<E>()),
                gates: get(GATES).map(|t| t.slice::<E>()),
            };
            let y = out_slice::<E>(y, len);
            SCRATCH.with(KEEP_SCRATCH_BYTES, |scratch| {
                reference::parallel_linear_with(&OrtPool(ctx), &self.attrs, s, &inputs, self.packed.as_ref(), scratch, y)
            })
            .map_err(to_string)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CapacityMask
// ---------------------------------------------------------------------------------------------

struct MaskCpu {
    attrs: capacity_mask::Attrs,
}

fn create_mask(info: &KernelInfo) -> Result<Box<dyn Kernel>, String> {
    info.check_attr_types(capacity_mask::NAME, &capacity_mask::ATTRS)?;
    let attrs = capacity_mask::Attrs::parse(info).map_err(to_string)?;
    let sig = signature_before_run(&capacity_mask::INPUTS, &kernel_inputs(info)?);
    capacity_mask::check(&sig.types, &sig.shape_refs()).map_err(to_string)?;
    Ok(Box::new(MaskCpu { attrs }))
}

impl Kernel for MaskCpu {
    fn compute(&self, ctx: &KernelContext) -> Result<(), String> {
        let ins = compute_inputs(ctx)?;
        let sig = signature(&ins);
        let it = capacity_mask::check(&sig.types, &sig.shape_refs()).map_err(to_string)?;
        let routing = ins[capacity_mask::ROUTING_INDICES].as_ref().unwrap();
        // SAFETY: checked int64 with one element, host memory.
        let capacity = capacity_mask::check_capacity(unsafe { ins[capacity_mask::CAPACITY].as_ref().unwrap().slice::<i64>() }[0])
            .map_err(to_string)?;
        let k = *routing.dims.last().unwrap();
        let out = ctx.output(0, &routing.dims, BOOL)?.ok_or("output 'kept' is required")?;
        // SAFETY: index type checked; the output holds one bool per assignment.
        unsafe {
            let kept = out_slice::<bool>(out, routing.len());
            reference::capacity_mask(&self.attrs, k, indices(routing, it), capacity, kept).map_err(to_string)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TopKRouter
// ---------------------------------------------------------------------------------------------

struct RouterCpu {
    attrs: topk_router::Attrs,
}

fn create_router(info: &KernelInfo) -> Result<Box<dyn Kernel>, String> {
    info.check_attr_types(topk_router::NAME, &topk_router::ATTRS)?;
    let attrs = topk_router::Attrs::parse(info).map_err(to_string)?;
    let sig = signature_before_run(&topk_router::INPUTS, &kernel_inputs(info)?);
    topk_router::check(&attrs, &sig.types, &sig.shape_refs()).map_err(to_string)?;
    Ok(Box::new(RouterCpu { attrs }))
}

impl Kernel for RouterCpu {
    fn compute(&self, ctx: &KernelContext) -> Result<(), String> {
        let ins = compute_inputs(ctx)?;
        let sig = signature(&ins);
        let (t, dims) = topk_router::check(&self.attrs, &sig.types, &sig.shape_refs()).map_err(to_string)?;
        let logits = ins[topk_router::LOGITS].as_ref().unwrap();
        let out = topk_router::output_shape(&self.attrs, &logits.dims, |k| k);
        let w = ctx.output(topk_router::ROUTING_WEIGHTS, &out, t.onnx_code())?.ok_or("output 'routing_weights' is required")?;
        let i = ctx.output(topk_router::ROUTING_INDICES, &out, 7)?.ok_or("output 'routing_indices' is required")?;
        let (tokens, experts) = (known(dims.tokens), known(dims.experts));
        let n = tokens * self.attrs.k;
        // the selection bias and the expert scale in float32 (the contract: float32 or T, converted exactly)
        // SAFETY: the contract check established their types (float32 or `t`) and their E values.
        let per_expert = |i: usize| -> Option<Vec<f32>> {
            ins.get(i).and_then(Option::as_ref).map(|b| unsafe {
                match (b.elem, t) {
                    (1, _) | (_, ElemType::F32) => b.slice::<f32>().to_vec(),
                    (_, ElemType::F16) => b.slice::<f16>().iter().map(|v| v.to_f32()).collect(),
                    (_, ElemType::BF16) => b.slice::<bf16>().iter().map(|v| v.to_f32()).collect(),
                }
            })
        };
        let (bias, scale) = (per_expert(topk_router::BIAS), per_expert(topk_router::EXPERT_SCALE));
        /// # Safety
        /// `logits` holds `E` in host memory; `w` and `i` hold `n` elements of `E` and int64.
        #[allow(clippy::too_many_arguments)]
        unsafe fn run<E: Element>(ctx: &KernelContext, a: &topk_router::Attrs, experts: usize, logits: &Tensor, per: PerExpert, w: *mut std::ffi::c_void, i: *mut std::ffi::c_void, n: usize) {
            crate::cpu::router::topk_router(&OrtPool(ctx), a, experts, logits.slice::<E>(), per, out_slice::<E>(w, n), out_slice::<i64>(i, n));
        }
        let per = PerExpert { bias: bias.as_deref(), scale: scale.as_deref() };
        // SAFETY: the contract check established the logits' type `t` and shape; CPU EP buffers are
        // host memory, the outputs allocated above with `n` elements each.
        unsafe {
            match t {
                ElemType::F32 => run::<f32>(ctx, &self.attrs, experts, logits, per, w, i, n),
                ElemType::F16 => run::<f16>(ctx, &self.attrs, experts, logits, per, w, i, n),
                ElemType::BF16 => run::<bf16>(ctx, &self.attrs, experts, logits, per, w, i, n),
            }
        }
        Ok(())
    }
}

/// The CPU execution provider's ops.
pub(super) fn ops() -> Vec<OpDef> {
    op_table(Kernels { execution_provider: None, moe: create_moe, linear: create_linear, mask: create_mask, router: create_router, capacity_on_host: false })
}

#[cfg(test)]
mod tests {
    #[test]
    fn op_names_match_the_contract() {
        let ops = super::ops();
        assert_eq!(ops[0].name.to_str().unwrap(), crate::spec::scatter_moe::NAME);
        assert_eq!(ops[1].name.to_str().unwrap(), crate::spec::parallel_linear::NAME);
        assert_eq!(ops.last().unwrap().name.to_str().unwrap(), crate::spec::capacity_mask::NAME);
    }
}
