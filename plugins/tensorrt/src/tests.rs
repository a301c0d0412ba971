//! The bridge's Rust side without TensorRT: fields, types, formats, shapes, workspace, round trips.

use super::*;
use scattermoe::cuda::driver;
use scattermoe::cuda::forward::Plan;
use scattermoe::reference::{LinearSizes, MoeSizes};
use scattermoe::spec::{capacity_mask, parallel_linear, scatter_moe, Activation, AttrDefault, CapacityOrder, ElemType, GluLayout};

fn int(name: &str, v: i32) -> Field {
    Field { name: name.into(), field_type: field_type::INT32, length: 1, data: v.to_le_bytes().to_vec() }
}

/// A list of ints as the parser passes `block_size`: kINT32, one value after the other.
fn ints(name: &str, v: &[i32]) -> Field {
    Field { name: name.into(), field_type: field_type::INT32, length: v.len() as i32, data: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
}

fn float(name: &str, v: f32) -> Field {
    Field { name: name.into(), field_type: field_type::FLOAT32, length: 1, data: v.to_le_bytes().to_vec() }
}

/// A string as TensorRT's ONNX parser passes it: kCHAR, NUL included in data and length.
fn string(name: &str, v: &str) -> Field {
    let mut data = v.as_bytes().to_vec();
    data.push(0);
    Field { name: name.into(), field_type: field_type::CHAR, length: data.len() as i32, data }
}

fn desc(t: i32, dims: &[i64]) -> TensorDesc {
    TensorDesc { data_type: t, linear: true, dims: dims.to_vec() }
}

fn range(t: i32, min: &[i64], max: &[i64]) -> Range {
    let dims: Vec<i64> = min.iter().zip(max).map(|(a, b)| if a == b { *a } else { -1 }).collect();
    Range { desc: desc(t, &dims), min: min.to_vec(), max: max.to_vec() }
}

fn moe(fields: &[Field]) -> Box<Plugin> {
    create_plugin(Op::ScatterMoE, fields).unwrap()
}

fn create_err(op: Op, fields: &[Field]) -> String {
    match create_plugin(op, fields) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

const F: i32 = data_type::FLOAT;
const H: i32 = data_type::HALF;
const B: i32 = data_type::BF16;
const I32: i32 = data_type::INT32;
const I64: i32 = data_type::INT64;

#[test]
fn names_come_from_the_contract() {
    assert_eq!(plugin_name(Op::ScatterMoE), "ScatterMoE");
    assert_eq!(plugin_name(Op::ParallelLinear), "ParallelLinear");
    assert_eq!(plugin_name(Op::CapacityMask), "CapacityMask");
    assert_eq!(plugin_version(), "1");
    assert_eq!(plugin_namespace(), "ai.scattermoe");
}

#[test]
fn a_field_for_every_attribute() {
    for op in Op::ALL {
        let names = field_names(op);
        assert_eq!(names.len(), op.attrs().len(), "{}", op.name());
        for (f, a) in names.iter().zip(op.attrs()) {
            assert_eq!(f.name, a.name);
            assert!(f.data.is_empty());
            match a.default {
                AttrDefault::Int(_) => assert_eq!((f.field_type, f.length), (field_type::INT32, 1)),
                AttrDefault::Float(_) => assert_eq!((f.field_type, f.length), (field_type::FLOAT32, 1)),
                AttrDefault::Str(s) => assert_eq!((f.field_type, f.length), (field_type::CHAR, s.len() as i32 + 1)),
                AttrDefault::Ints(v) => assert_eq!((f.field_type, f.length), (field_type::INT32, v.len() as i32)),
            }
        }
    }
}

#[test]
fn field_sizes() {
    assert_eq!(field_type_size(field_type::CHAR), 1);
    assert_eq!(field_type_size(field_type::INT32), 4);
    assert_eq!(field_type_size(field_type::FLOAT32), 4);
    assert_eq!(field_type_size(field_type::INT64), 8);
    assert_eq!(field_type_size(field_type::FLOAT64), 8);
    assert_eq!(field_type_size(field_type::FLOAT16), 2);
    assert_eq!(field_type_size(7), 0); // kDIMS: never read
}

#[test]
fn defaults_apply_to_absent_fields() {
    let p = moe(&[]);
    assert_eq!(p.attrs(), &Attrs::Moe(scatter_moe::Attrs::default()));
    let p = create_plugin(Op::ParallelLinear, &[]).unwrap();
    assert_eq!(p.attrs(), &Attrs::Linear(parallel_linear::Attrs::default()));
}

#[test]
fn fields_as_the_onnx_parser_passes_them() {
    let p = moe(&[
        string("activation", "swiglu_oai"),
        int("gated", 1),
        string("glu_layout", "interleaved"),
        float("alpha", 1.5),
        float("limit", 6.0),
        string("capacity_order", "token_major"),
    ]);
    let Attrs::Moe(a) = *p.attrs() else { panic!() };
    assert_eq!(a.activation, Activation::SwigluOai);
    assert!(a.gated);
    assert_eq!(a.glu_layout, GluLayout::Interleaved);
    assert_eq!((a.alpha, a.limit), (1.5, 6.0));
    assert_eq!(a.capacity_order, CapacityOrder::TokenMajor);

    let p = create_plugin(Op::CapacityMask, &[int("num_experts", 8), string("capacity_order", "slot_major")]).unwrap();
    assert_eq!(p.attrs(), &Attrs::Mask(capacity_mask::Attrs { num_experts: 8, capacity_order: CapacityOrder::SlotMajor }));
    let p = create_plugin(Op::ParallelLinear, &[int("grouped_in", 1), int("grouped_out", 0)]).unwrap();
    assert_eq!(p.attrs(), &Attrs::Linear(parallel_linear::Attrs { grouped_in: true, grouped_out: false, ..Default::default() }));
}

#[test]
fn other_integer_float_and_string_encodings() {
    let p = moe(&[
        Field { name: "gated".into(), field_type: field_type::INT64, length: 1, data: 0i64.to_le_bytes().to_vec() },
        Field { name: "activation".into(), field_type: field_type::CHAR, length: 4, data: b"relu".to_vec() }, // no NUL
        Field { name: "alpha".into(), field_type: field_type::FLOAT64, length: 1, data: 2.0f64.to_le_bytes().to_vec() },
    ]);
    let Attrs::Moe(a) = *p.attrs() else { panic!() };
    assert!(!a.gated);
    assert_eq!(a.activation, Activation::Relu);
    assert_eq!(a.alpha, 2.0);
    let p = create_plugin(Op::CapacityMask, &[Field { name: "num_experts".into(), field_type: field_type::INT8, length: 1, data: vec![5] }]).unwrap();
    assert_eq!(p.attrs(), &Attrs::Mask(capacity_mask::Attrs { num_experts: 5, capacity_order: CapacityOrder::SlotMajor }));
}

#[test]
fn bad_fields_name_the_op_and_the_field() {
    assert_eq!(
        create_err(Op::ScatterMoE, &[string("activation", "swish")]),
        format!(
            "ScatterMoE: attribute 'activation' has unsupported value 'swish' (supported: {})",
            Activation::ALL.iter().map(|a| a.name()).collect::<Vec<_>>().join(", ")
        )
    );
    assert_eq!(
        create_err(Op::ScatterMoE, &[string("activaton", "silu")]),
        "ScatterMoE: unknown plugin field 'activaton' (fields: activation, gated, glu_layout, alpha, limit, capacity_order, weight_bits, block_size)"
    );
    assert_eq!(
        create_err(Op::ScatterMoE, &[float("gated", 1.0)]),
        "ScatterMoE: plugin field 'gated' must hold one integer (kINT32 or kINT64), got kFLOAT32 of length 1"
    );
    assert_eq!(
        create_err(Op::ScatterMoE, &[int("activation", 1)]),
        "ScatterMoE: plugin field 'activation' must hold a string (kCHAR), got kINT32 of length 1"
    );
    assert_eq!(
        create_err(Op::ScatterMoE, &[Field { name: "gated".into(), field_type: field_type::INT32, length: 1, data: vec![] }]),
        "ScatterMoE: plugin field 'gated' holds no value (length 1, 0 bytes)"
    );
    assert_eq!(create_err(Op::ScatterMoE, &[int("gated", 2)]), "ScatterMoE: attribute 'gated' must be 0 or 1, got 2");
    assert_eq!(
        create_err(Op::ScatterMoE, &[string("activation", "swiglu_oai"), int("gated", 0)]),
        "ScatterMoE: attribute 'activation' = 'swiglu_oai' needs 'gated' = 1"
    );
    assert_eq!(create_err(Op::CapacityMask, &[]), "CapacityMask: attribute 'num_experts' is required");
    assert_eq!(create_err(Op::ParallelLinear, &[int("grouped_in", -1)]), "ParallelLinear: attribute 'grouped_in' must be 0 or 1, got -1");
}

/// Every attribute combination: serialised fields re-create the same plugin, and serialise to
/// the same bytes again.
#[test]
fn fields_round_trip() {
    let mut all = Vec::new();
    for act in Activation::ALL {
        for gated in [0, 1] {
            for layout in GluLayout::ALL {
                for order in CapacityOrder::ALL {
                    let mut fields = vec![
                        string("activation", act.name()),
                        int("gated", gated),
                        string("glu_layout", layout.name()),
                        float("alpha", 1.25),
                        float("limit", 3.5),
                        string("capacity_order", order.name()),
                        int("weight_bits", if gated == 1 { 4 } else { 8 }),
                    ];
                    // block_size has no default: serialised only where given
                    if order == CapacityOrder::SlotMajor {
                        fields.push(ints("block_size", &[1, 32]));
                    }
                    all.push((Op::ScatterMoE, fields));
                }
            }
        }
    }
    for (gi, go) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
        all.push((Op::ParallelLinear, vec![int("grouped_in", gi), int("grouped_out", go), int("weight_bits", 8)]));
    }
    // block_size, a list, written only when given
    let block = crate::fields::Value::Ints(vec![1, 32]).field("block_size");
    all.push((Op::ParallelLinear, vec![int("grouped_in", 0), int("grouped_out", 0), int("weight_bits", 4), block]));
    for order in CapacityOrder::ALL {
        all.push((Op::CapacityMask, vec![int("num_experts", 64), string("capacity_order", order.name())]));
    }
    let mut made = 0;
    for (op, fields) in all {
        let Ok(p) = create_plugin(op, &fields) else { continue }; // a gated-only activation without gating
        made += 1;
        let ser = p.fields_to_serialize();
        // the parser's types, every attribute, in ATTRS order (block_size, which has no default, when given)
        let given = op.attrs().iter().map(|a| a.name).filter(|n| *n != "block_size" || fields.iter().any(|f| f.name == *n));
        assert_eq!(ser.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), given.collect::<Vec<_>>());
        assert_eq!(ser, fields, "{}: serialised fields differ from the ones it was made from", op.name());
        let q = create_plugin(op, &ser).unwrap();
        assert_eq!(q.attrs(), p.attrs());
        assert_eq!(q.fields_to_serialize(), ser);
        assert_eq!(p.clone_plugin().attrs(), p.attrs());
    }
    // every ScatterMoE combination but the gated-only activations without gating, every
    // ParallelLinear one, every CapacityMask one
    let (acts, gated_only) = (Activation::ALL.len(), Activation::ALL.iter().filter(|a| a.gated_only()).count());
    let per_act = GluLayout::ALL.len() * CapacityOrder::ALL.len();
    assert_eq!(made, acts * 2 * per_act - gated_only * per_act + 5 + CapacityOrder::ALL.len());
}

#[test]
fn output_types() {
    let p = moe(&[]);
    assert_eq!(p.nb_outputs(), 1);
    for t in [F, H, B] {
        assert_eq!(p.output_types(&[t, t, I64, t, t]).unwrap(), vec![t]);
        assert_eq!(p.output_types(&[t, t, I32, t, t, t, t, I64]).unwrap(), vec![t]);
    }
    assert_eq!(
        p.output_types(&[F, H, I64, F, F]).unwrap_err().to_string(),
        "ScatterMoE: input 'routing_weights' is float16 but input 'X' is float32; all float inputs must share one element type"
    );
    assert_eq!(
        p.output_types(&[data_type::INT8, F, I64, F, F]).unwrap_err().to_string(),
        "ScatterMoE: input 'X' has element type int8; supported: float32, float16, bfloat16"
    );
    assert_eq!(
        p.output_types(&[F, F, F, F, F]).unwrap_err().to_string(),
        "ScatterMoE: input 'routing_indices' has element type float32; supported: int32, int64"
    );
    assert_eq!(
        p.output_types(&[F, F, I64, F, F, F, F, I32]).unwrap_err().to_string(),
        "ScatterMoE: input 'capacity' has element type int32; it must be int64"
    );
    let l = create_plugin(Op::ParallelLinear, &[]).unwrap();
    assert_eq!(l.output_types(&[B, I32, B, B, B]).unwrap(), vec![B]);
    let m = create_plugin(Op::CapacityMask, &[int("num_experts", 4)]).unwrap();
    assert_eq!(m.output_types(&[I32, I64]).unwrap(), vec![data_type::BOOL]);
    assert_eq!(m.output_types(&[data_type::FP8, I64]).unwrap_err().to_string(), "CapacityMask: input 'routing_indices' has element type float8e4m3fn; supported: int32, int64");
    assert_eq!(m.output_types(&[9, I64]).unwrap_err().to_string(), "CapacityMask: input 'routing_indices' has element type undefined; supported: int32, int64");
    // quantized weights (fp8, uint8) leave the output in T
    assert_eq!(p.output_types(&[H, H, I64, data_type::FP8, data_type::UINT8, H, H, I64, F, H, data_type::UINT8]).unwrap(), vec![H]);
}

fn d(input: i32, axis: i32) -> DimRef {
    DimRef { input, axis }
}

#[test]
fn output_shapes_are_the_contracts_rules() {
    // Y has X's shape; symbolic dims (-1) are references all the same.
    let p = moe(&[]);
    let ins = [desc(F, &[-1, -1, 16]), desc(F, &[-1, 2]), desc(I64, &[-1, 2]), desc(F, &[4, 64, 16]), desc(F, &[4, 16, 32])];
    assert_eq!(p.output_shapes(&ins).unwrap(), vec![OutputShape { dims: vec![d(0, 0), d(0, 1), d(0, 2)] }]);

    let mut gates = create_plugin(Op::ParallelLinear, &[]).unwrap();
    let ins = [desc(F, &[-1, 16]), desc(I32, &[-1, 2]), desc(F, &[4, 24, 16]), desc(F, &[4, 24]), desc(F, &[-1, 2])];
    assert_eq!(gates.output_shapes(&ins).unwrap(), vec![OutputShape { dims: vec![d(1, 0), d(2, 1)] }]);
    // no gates: routing's shape + [d_out]
    assert_eq!(gates.output_shapes(&ins[..3]).unwrap(), vec![OutputShape { dims: vec![d(1, 0), d(1, 1), d(2, 1)] }]);
    // grouped out: [T*k, d_out], T*k the product of routing's dims
    gates = create_plugin(Op::ParallelLinear, &[int("grouped_out", 1)]).unwrap();
    assert_eq!(gates.output_shapes(&ins[..3]).unwrap(), vec![OutputShape { dims: vec![d(1, -1), d(2, 1)] }]);

    let m = create_plugin(Op::CapacityMask, &[int("num_experts", 4)]).unwrap();
    assert_eq!(m.output_shapes(&[desc(I64, &[2, -1, 3]), desc(I64, &[])]).unwrap(), vec![OutputShape { dims: vec![d(0, 0), d(0, 1), d(0, 2)] }]);
}

#[test]
fn known_dimensions_are_checked_at_build_time() {
    let p = moe(&[]);
    let e = |ins: &[TensorDesc]| p.output_shapes(ins).unwrap_err().to_string();
    assert_eq!(
        e(&[desc(F, &[-1, 16]), desc(F, &[-1, 2]), desc(I64, &[-1, 2]), desc(F, &[4, 64, 8]), desc(F, &[4, 16, 32])]),
        "ScatterMoE: input 'w_in' [4, 64, 8] must be [E, n, d] with d = 16 (the last dimension of X)"
    );
    assert_eq!(
        e(&[desc(F, &[-1, 16]), desc(F, &[-1, 2]), desc(I64, &[-1, 2]), desc(F, &[4, 48, 16]), desc(F, &[4, 16, 32])]),
        "ScatterMoE: input 'w_in' [4, 48, 16] must be [E, 64, d] for f = 32 (gated: gate and up rows), got n = 48"
    );
    assert_eq!(e(&[desc(F, &[-1, 16]), desc(F, &[-1, 2])]), "ScatterMoE: expects 5 to 12 inputs, got 2");
    assert_eq!(
        e(&[desc(F, &[16]), desc(F, &[-1, 2]), desc(I64, &[-1, 2]), desc(F, &[4, 64, 16]), desc(F, &[4, 16, 32])]),
        "ScatterMoE: input 'X' must have rank >= 2, got shape [16]"
    );
}

#[test]
fn formats_and_types() {
    let p = moe(&[]);
    let io = |x: i32, idx: i32, y: i32| vec![desc(x, &[]), desc(x, &[]), desc(idx, &[]), desc(x, &[]), desc(x, &[]), desc(y, &[])];
    for t in [F, H, B] {
        for i in [I32, I64] {
            let v = io(t, i, t);
            assert!((0..6).all(|pos| p.supports_format(pos, &v, 5)), "{t} {i}");
        }
    }
    // Y must follow X, every float the first float's type
    assert!(!p.supports_format(5, &io(F, I64, H), 5));
    let mut v = io(H, I64, H);
    v[3].data_type = F;
    assert!(!p.supports_format(3, &v, 5));
    // indices: int32/int64 only; floats: no int8, no fp8
    assert!(!p.supports_format(2, &io(F, data_type::INT8, F), 5));
    assert!(!p.supports_format(0, &io(data_type::INT8, I64, F), 5));
    assert!(!p.supports_format(0, &io(data_type::FP8, I64, F), 5));
    // linear format only
    let mut v = io(H, I64, H);
    v[0].linear = false;
    assert!(!p.supports_format(0, &v, 5));
    // capacity: int64 only
    let mut v = vec![desc(F, &[]); 9];
    v[2].data_type = I64;
    v[7].data_type = I64;
    assert!((0..9).all(|pos| p.supports_format(pos, &v, 8)));
    v[7].data_type = I32;
    assert!(!p.supports_format(7, &v, 8));
    // positions past the ports
    assert!(!p.supports_format(6, &io(F, I64, F), 5));
    assert!(!p.supports_format(0, &vec![desc(F, &[]); 14], 13));

    // quantized weights: a weight in T, fp8 or uint8; its scale in T or float32; zero points uint8
    let q = |w_in: i32, w_out: i32, s_in: i32, s_out: i32, z: i32| {
        let mut v = vec![desc(H, &[]); 13];
        v[2].data_type = I64;
        v[7].data_type = I64;
        (v[3].data_type, v[4].data_type, v[8].data_type, v[9].data_type, v[10].data_type, v[11].data_type) = (w_in, w_out, s_in, s_out, z, z);
        v
    };
    let v = q(data_type::FP8, data_type::UINT8, F, H, data_type::UINT8);
    assert!((0..13).all(|pos| p.supports_format(pos, &v, 12)));
    assert!(p.supports_format(3, &q(H, H, H, H, data_type::UINT8), 12));
    assert!(!p.supports_format(3, &q(data_type::INT8, H, F, F, data_type::UINT8), 12));
    assert!(!p.supports_format(3, &q(B, H, F, F, data_type::UINT8), 12));
    assert!(!p.supports_format(8, &q(data_type::FP8, H, B, F, data_type::UINT8), 12));
    assert!(!p.supports_format(8, &q(data_type::FP8, H, data_type::FP8, F, data_type::UINT8), 12));
    assert!(!p.supports_format(10, &q(data_type::UINT8, H, F, F, data_type::INT8), 12));
    // the output stays in T
    let mut v = q(data_type::FP8, data_type::FP8, F, F, data_type::UINT8);
    v[12].data_type = data_type::FP8;
    assert!(!p.supports_format(12, &v, 12));

    let m = create_plugin(Op::CapacityMask, &[int("num_experts", 4)]).unwrap();
    let v = vec![desc(I32, &[]), desc(I64, &[]), desc(data_type::BOOL, &[])];
    assert!((0..3).all(|pos| m.supports_format(pos, &v, 2)));
    let v = vec![desc(I32, &[]), desc(I64, &[]), desc(data_type::UINT8, &[])];
    assert!(!m.supports_format(2, &v, 2));
}

fn moe_ranges(t: i32, tokens: (i64, i64), cap: bool) -> Vec<Range> {
    let (lo, hi) = tokens;
    let mut v = vec![
        range(t, &[lo, 16], &[hi, 16]),
        range(t, &[lo, 2], &[hi, 2]),
        range(I64, &[lo, 2], &[hi, 2]),
        range(t, &[4, 64, 16], &[4, 64, 16]),
        range(t, &[4, 16, 32], &[4, 16, 32]),
    ];
    if cap {
        v.push(range(t, &[4, 64], &[4, 64]));
        v.push(range(t, &[4, 16], &[4, 16]));
        v.push(range(I64, &[1], &[1]));
    }
    v
}

#[test]
fn configure_and_shape_changes_check_the_contract() {
    let mut p = moe(&[]);
    let out = [range(F, &[1, 16], &[64, 16])];
    p.configure(&moe_ranges(F, (1, 64), false), &out).unwrap();
    p.configure(&moe_ranges(B, (1, 64), true), &out).unwrap();
    let mut bad = moe_ranges(H, (1, 64), false);
    bad[1].desc.data_type = F;
    assert_eq!(
        p.configure(&bad, &out).unwrap_err().to_string(),
        "ScatterMoE: input 'routing_weights' is float32 but input 'X' is float16; all float inputs must share one element type"
    );
    assert_eq!(p.configure(&moe_ranges(F, (1, 64), false), &[]).unwrap_err().to_string(), "ScatterMoE: has 1 output(s), got 0");
    let ins: Vec<TensorDesc> = [&[5i64, 16][..], &[5, 2], &[5, 2], &[4, 64, 16], &[4, 16, 32]]
        .iter()
        .enumerate()
        .map(|(i, s)| desc(if i == 2 { I32 } else { F }, s))
        .collect();
    p.on_shape_change(&ins, &[desc(F, &[5, 16])]).unwrap();
    let mut bad = ins.clone();
    bad[2].dims = vec![6, 2];
    assert_eq!(
        p.on_shape_change(&bad, &[desc(F, &[5, 16])]).unwrap_err().to_string(),
        "ScatterMoE: inputs 'routing_weights' [5, 2] and 'routing_indices' [6, 2] must have the same shape"
    );
}

#[test]
fn workspace_is_the_plan_at_the_largest_shapes() {
    let p = moe(&[]);
    let out = [range(F, &[1, 16], &[4096, 16])];
    for (t, e) in [(F, ElemType::F32), (H, ElemType::F16), (B, ElemType::BF16)] {
        for cap in [false, true] {
            let ws = p.workspace_size(&moe_ranges(t, (1, 4096), cap), &out).unwrap();
            let s = MoeSizes { tokens: 4096, k: 2, experts: 4, d: 16, f: 32 };
            assert_eq!(ws, Plan::scatter_moe(s, e, cap).bytes);
            let small = p.workspace_size(&moe_ranges(t, (1, 8), cap), &out).unwrap();
            assert!(small < ws);
        }
    }
    // [B, S, d] tokens: the product of the largest leading dims
    let mut r = moe_ranges(H, (1, 1), false);
    r[0] = range(H, &[1, 1, 16], &[8, 512, 16]);
    r[1] = range(H, &[1, 2], &[4096, 2]);
    r[2] = range(I64, &[1, 2], &[4096, 2]);
    let s = MoeSizes { tokens: 4096, k: 2, experts: 4, d: 16, f: 32 };
    assert_eq!(p.workspace_size(&r, &out).unwrap(), Plan::scatter_moe(s, ElemType::F16, false).bytes);

    let l = create_plugin(Op::ParallelLinear, &[int("grouped_out", 1)]).unwrap();
    let r = [range(H, &[1, 16], &[100, 16]), range(I32, &[1, 8], &[100, 8]), range(H, &[64, 24, 16], &[64, 24, 16])];
    let s = LinearSizes { tokens: 100, k: 8, experts: 64, d_in: 16, d_out: 24 };
    assert_eq!(l.workspace_size(&r, &[]).unwrap(), Plan::parallel_linear(s, ElemType::F16, false).bytes);
    let r5 = [r[0].clone(), r[1].clone(), r[2].clone(), range(H, &[64, 24], &[64, 24]), range(H, &[1, 8], &[100, 8])];
    assert_eq!(l.workspace_size(&r5, &[]).unwrap(), Plan::parallel_linear(s, ElemType::F16, true).bytes);

    // a 4-bit w_out stores ceil(f / 2) bytes a row: f comes from w_in (gated: n = 2f)
    let q = moe(&[int("weight_bits", 4)]);
    let mut r = moe_ranges(H, (1, 4096), false);
    r[3].desc.data_type = data_type::UINT8;
    r[4] = range(data_type::UINT8, &[4, 16, 16], &[4, 16, 16]);
    let s = MoeSizes { tokens: 4096, k: 2, experts: 4, d: 16, f: 32 };
    assert_eq!(q.workspace_size(&r, &out).unwrap(), Plan::scatter_moe(s, ElemType::F16, false).bytes);
    let plain = moe(&[int("gated", 0)]);
    let mut r = moe_ranges(H, (1, 4096), false);
    r[3] = range(H, &[4, 32, 16], &[4, 32, 16]);
    assert_eq!(plain.workspace_size(&r, &out).unwrap(), Plan::scatter_moe(s, ElemType::F16, false).bytes);

    // float32 with a quantized weight: refused at configure, naming the weight
    let mut p32 = moe(&[]);
    let mut r = moe_ranges(F, (1, 64), false);
    r[3].desc.data_type = data_type::FP8;
    r.extend([range(I64, &[1], &[1]), range(I64, &[1], &[1]), range(I64, &[1], &[1])]); // b_in, b_out, capacity slots
    r[5] = range(F, &[4, 64], &[4, 64]);
    r[6] = range(F, &[4, 16], &[4, 16]);
    r.push(range(F, &[4, 64], &[4, 64])); // w_in_scale, per output channel
    let e = p32.configure(&r, &out).unwrap_err().to_string();
    assert!(e.starts_with("ScatterMoE: input 'w_in' is float8e4m3fn: the CUDA kernels take quantized weights with T = float16 or bfloat16"), "{e}");

    let m = create_plugin(Op::CapacityMask, &[int("num_experts", 32)]).unwrap();
    let r = [range(I64, &[1, 2], &[300, 2]), range(I64, &[], &[])];
    assert_eq!(m.workspace_size(&r, &[]).unwrap(), Plan::capacity_mask(300, 2, 32).bytes);
    // a float type it cannot run is an error, not a size
    let mut r = moe_ranges(F, (1, 8), false);
    r[0].desc.data_type = data_type::INT8;
    assert_eq!(p.workspace_size(&r, &out).unwrap_err().to_string(), "ScatterMoE: input 0 has element type int8");
}

/// Without a CUDA driver an enqueue is an error naming the op, not a crash.
#[test]
fn enqueue_without_a_driver_is_an_error() {
    if driver::device_count() > 0 {
        eprintln!("skipped: a CUDA device is present (the harness, cpp/tensorrt/harness, runs enqueue there)");
        return;
    }
    let mut p = moe(&[]);
    let ins: Vec<TensorDesc> = [&[5i64, 16][..], &[5, 2], &[5, 2], &[4, 64, 16], &[4, 16, 32]]
        .iter()
        .enumerate()
        .map(|(i, s)| desc(if i == 2 { I32 } else { F }, s))
        .collect();
    let e = unsafe { p.enqueue(&ins, &[desc(F, &[5, 16])], &[1, 2, 3, 4, 5], &[6], 7, 0) }.unwrap_err();
    assert!(e.starts_with("ScatterMoE: "), "{e}");
    // an empty batch launches nothing and needs no device
    let mut empty = ins.clone();
    for t in empty.iter_mut().take(3) {
        t.dims[0] = 0;
    }
    unsafe { p.enqueue(&empty, &[desc(F, &[0, 16])], &[0; 5], &[0], 0, 0) }.unwrap();
}
