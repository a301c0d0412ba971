//! What the device ops decide before touching a device: the contract's check of a run-time
//! signature, output shapes, workspace sizes (the plans of `forward`), and the order of a run's
//! early exits (a bad host capacity fails, an empty call launches nothing), all without a GPU.

use super::*;
use crate::cuda::forward::Plan;
use crate::reference::{LinearSizes, MoeSizes};
use crate::spec::{capacity_mask, parallel_linear, scatter_moe, CapacityOrder, ElemType, IndexType, Quant, QuantAttrs, QuantFormat, ScaleLayout};

const F16: i32 = 10;
const I64: i32 = 7;
const I32: i32 = 6;

fn moe_sig(tokens: u64, capacity: bool) -> Signature {
    // X [2, T/2, d=8], weights/indices [T, k=2], W_in [E=4, 2f=12, 8], W_out [4, 8, f=6]
    let mut inputs = vec![
        Some((F16, vec![2, tokens / 2, 8])),
        Some((F16, vec![tokens, 2])),
        Some((I64, vec![tokens, 2])),
        Some((F16, vec![4, 12, 8])),
        Some((F16, vec![4, 8, 6])),
        None,
        None,
    ];
    if capacity {
        inputs.push(Some((I64, vec![])));
    }
    Signature::at_run(inputs)
}

#[test]
fn scatter_moe_call_sizes_its_workspace_and_output() {
    let op = ScatterMoeOp(scatter_moe::Attrs { gated: true, ..Default::default() });
    for capacity in [false, true] {
        let sig = moe_sig(10, capacity);
        let call = op.check(&sig).unwrap();
        let sizes = MoeSizes { tokens: 10, k: 2, experts: 4, d: 8, f: 6 };
        assert_eq!(call, MoeCall { elem: ElemType::F16, it: IndexType::I64, sizes, capacity, w_in: None, w_out: None });
        assert_eq!(op.workspace_bytes(&call), Plan::scatter_moe(sizes, ElemType::F16, capacity).bytes);
        assert_eq!(op.output_shape(&call, &sig), [2, 5, 8]);
        assert!(!op.is_empty(&call));
    }
    assert!(op.is_empty(&op.check(&moe_sig(0, false)).unwrap()));
}

#[test]
fn a_dimension_left_open_at_run_time_is_an_error() {
    let op = ScatterMoeOp(scatter_moe::Attrs { gated: true, ..Default::default() });
    let mut sig = moe_sig(10, false);
    sig.shapes[3].as_mut().unwrap()[1] = None;
    let e = op.check(&sig).unwrap_err().to_string();
    assert!(e.contains("ScatterMoE") && e.contains("input 3") && e.contains("not known"), "{e}");
}

#[test]
fn the_contract_check_runs_first() {
    let op = ScatterMoeOp(scatter_moe::Attrs { gated: true, ..Default::default() });
    let mut sig = moe_sig(10, false);
    sig.shapes[4] = Some(vec![Some(4), Some(8), Some(7)]); // f disagrees with W_in
    let direct = scatter_moe::check(&op.0, &sig.types, &sig.shape_refs()).unwrap_err();
    assert_eq!(op.check(&sig).unwrap_err(), direct);
}

#[test]
fn parallel_linear_output_follows_the_contract() {
    // X [T=6, d_in=8], routing [6, 2], W [E=3, d_out=5, 8]
    let base = vec![Some((F16, vec![6, 8])), Some((I32, vec![6, 2])), Some((F16, vec![3, 5, 8])), None, None];
    let sizes = LinearSizes { tokens: 6, k: 2, experts: 3, d_in: 8, d_out: 5 };
    for grouped_out in [false, true] {
        let op = ParallelLinearOp(parallel_linear::Attrs { grouped_in: false, grouped_out, ..Default::default() });
        let sig = Signature::at_run(base.clone());
        let call = op.check(&sig).unwrap();
        assert_eq!(call, LinearCall { elem: ElemType::F16, it: IndexType::I32, sizes, gates: false, w: None });
        // grouped rows [T*k, d_out], or one row per assignment in place [T, k, d_out]
        let expected: &[usize] = if grouped_out { &[12, 5] } else { &[6, 2, 5] };
        assert_eq!(op.output_shape(&call, &sig), expected);
        assert_eq!(op.workspace_bytes(&call), Plan::parallel_linear(sizes, ElemType::F16, false).bytes);
    }
    let mut gated = base;
    gated[4] = Some((F16, vec![6, 2]));
    let op = ParallelLinearOp(parallel_linear::Attrs { grouped_in: false, grouped_out: false, ..Default::default() });
    let sig = Signature::at_run(gated);
    let call = op.check(&sig).unwrap();
    assert!(call.gates);
    assert_eq!(op.output_shape(&call, &sig), [6, 5]);
    assert_eq!(op.workspace_bytes(&call), Plan::parallel_linear(sizes, ElemType::F16, true).bytes);
}

#[test]
fn capacity_mask_call_reads_tokens_and_k_from_the_indices() {
    let op = CapacityMaskOp(capacity_mask::Attrs { num_experts: 5, capacity_order: CapacityOrder::TokenMajor });
    let sig = Signature::at_run([Some((I64, vec![3, 4, 2])), Some((I64, vec![]))]);
    let call = op.check(&sig).unwrap();
    assert_eq!(call, MaskCall { it: IndexType::I64, tokens: 12, k: 2, experts: 5 });
    assert_eq!(op.output_shape(&call, &sig), [3, 4, 2]);
    assert_eq!(op.workspace_bytes(&call), Plan::capacity_mask(12, 2, 5).bytes);
}

/// A run that must not reach the device: the workspace is never asked for.
fn run_without_device<O: DeviceOp>(op: &O, call: &O::Call, io: &DeviceIo) -> Result<(), String> {
    let runner = Runner::default();
    // SAFETY: these runs end before any driver call (asserted by the workspace closure).
    unsafe { runner.run(op, call, io, std::ptr::null_mut(), |_| -> Result<(CUdeviceptr, ()), String> { panic!("reached the device") }) }
}

#[test]
fn a_negative_host_capacity_fails_before_any_launch_even_when_empty() {
    let op = ScatterMoeOp(scatter_moe::Attrs { gated: true, ..Default::default() });
    for tokens in [0, 10] {
        let call = op.check(&moe_sig(tokens, true)).unwrap();
        let io = DeviceIo { host_capacity: Some(-1), ..Default::default() };
        let e = run_without_device(&op, &call, &io).unwrap_err();
        assert_eq!(e, scatter_moe::check_capacity(-1).unwrap_err().to_string());
    }
    let mask = CapacityMaskOp(capacity_mask::Attrs { num_experts: 5, capacity_order: CapacityOrder::SlotMajor });
    let call = mask.check(&Signature::at_run([Some((I64, vec![0, 2])), Some((I64, vec![]))])).unwrap();
    let e = run_without_device(&mask, &call, &DeviceIo { host_capacity: Some(-3), ..Default::default() }).unwrap_err();
    assert!(e.contains("CapacityMask") && e.contains("-3"), "{e}");
}

#[test]
fn an_empty_call_launches_nothing() {
    let op = ScatterMoeOp(scatter_moe::Attrs { gated: true, ..Default::default() });
    let call = op.check(&moe_sig(0, true)).unwrap();
    // a device capacity is not read either (no tokens: nothing to cap)
    let io = DeviceIo { inputs: vec![Some(1); 8], outputs: vec![1], host_capacity: None };
    run_without_device(&op, &call, &io).unwrap();
    let lin = ParallelLinearOp(parallel_linear::Attrs::default());
    let call = lin.check(&Signature::at_run([Some((F16, vec![0, 8])), Some((I32, vec![0, 2])), Some((F16, vec![3, 5, 8]))])).unwrap();
    run_without_device(&lin, &call, &DeviceIo::default()).unwrap();
}

#[test]
fn a_missing_pointer_is_an_error_naming_the_input() {
    let op = ScatterMoeOp(scatter_moe::Attrs { gated: true, ..Default::default() });
    let call = op.check(&moe_sig(10, false)).unwrap();
    let e = op.check_info(&call, &DeviceIo::default()).map(|_| ()).unwrap_err();
    assert!(e.contains("ScatterMoE") && e.contains(&format!("input {}", scatter_moe::ROUTING_INDICES)), "{e}");
}

const F32: i32 = 1;
const U8: i32 = 2;
const FP8: i32 = 17;

/// ScatterMoE with w_in 4-bit (group 4 along d, float32 scales, zero points) and w_out fp8 (per
/// output channel, scales in T), elements of type `t`: X [10, d=8], W_in [4, 12, 4 bytes],
/// W_out [4, 8, f=6].
fn quant_moe_sig(t: i32) -> Signature {
    Signature::at_run([
        Some((t, vec![10, 8])),
        Some((t, vec![10, 2])),
        Some((I64, vec![10, 2])),
        Some((U8, vec![4, 12, 4])),
        Some((FP8, vec![4, 8, 6])),
        None,
        None,
        None,
        Some((F32, vec![4, 12, 2])),
        Some((t, vec![4, 8])),
        Some((U8, vec![4, 12, 2])),
        None,
    ])
}

#[test]
fn quantized_weights_reach_the_call_and_float32_is_refused_by_name() {
    let quant = QuantAttrs { weight_bits: 4, block_size: Some([1, 4]) };
    let op = ScatterMoeOp(scatter_moe::Attrs { gated: true, quant, ..Default::default() });
    let call = op.check(&quant_moe_sig(F16)).unwrap();
    let int4 = Quant { format: QuantFormat::Int4, layout: ScaleLayout::Blocks { block_out: 1, block_in: 4 }, scale: ElemType::F32, zero_point: true };
    let fp8 = Quant { format: QuantFormat::Fp8E4M3Fn, layout: ScaleLayout::PerChannel, scale: ElemType::F16, zero_point: false };
    assert_eq!((call.w_in, call.w_out), (Some(int4), Some(fp8)));
    assert_eq!(call.sizes, MoeSizes { tokens: 10, k: 2, experts: 4, d: 8, f: 6 });
    // the hidden and output buffers are in T whatever the weights: the same workspace
    assert_eq!(op.workspace_bytes(&call), Plan::scatter_moe(call.sizes, ElemType::F16, false).bytes);
    let e = op.check(&quant_moe_sig(F32)).unwrap_err().to_string();
    assert_eq!(
        e,
        "ScatterMoE: input 'w_in' is uint8 (weight_bits = 4): the CUDA kernels take quantized weights with T = float16 or bfloat16, not float32 (the CPU execution provider runs float32)"
    );

    let lin = ParallelLinearOp(parallel_linear::Attrs { quant: QuantAttrs { weight_bits: 8, block_size: Some([128, 128]) }, ..Default::default() });
    let sig = |t: i32| {
        Signature::at_run([Some((t, vec![6, 200])), Some((I32, vec![6, 2])), Some((FP8, vec![3, 130, 200])), None, None, Some((F32, vec![3, 2, 2])), None])
    };
    let call = lin.check(&sig(F16)).unwrap();
    assert_eq!(call.w.map(|q| (q.format, q.layout)), Some((QuantFormat::Fp8E4M3Fn, ScaleLayout::Blocks { block_out: 128, block_in: 128 })));
    let e = lin.check(&sig(F32)).unwrap_err().to_string();
    assert!(e.starts_with("ParallelLinear: input 'W' is float8e4m3fn: the CUDA kernels take quantized weights with T = float16"), "{e}");
}
