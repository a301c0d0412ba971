//! The contract's checks of quantized weights: what they find, and every error of
//! docs/op-spec.md's list with its wording.

use super::tests::{s, AttrValue, Attrs as Node};
use super::*;

const F32: Option<i32> = Some(1);
const F16: Option<i32> = Some(10);
const BF16: Option<i32> = Some(16);
const I64: Option<i32> = Some(7);
const FP8: Option<i32> = Some(17);
const U8: Option<i32> = Some(2);
const I8: Option<i32> = Some(3);

/// A ScatterMoE node: 5 tokens of d = 20, k = 2, E = 4 experts of f = 12 (gated: n = 24).
/// Inputs by contract index; `set` replaces one, `attr` adds an attribute.
struct Moe {
    types: Vec<Option<i32>>,
    shapes: Vec<Option<Vec<Dim>>>,
    node: Node,
}

impl Moe {
    fn new(t: Option<i32>) -> Self {
        let mut m = Moe { types: vec![None; 12], shapes: vec![None; 12], node: Node::default() };
        use scatter_moe::*;
        for (i, ty, shape) in
            [(X, t, s(&[5, 20])), (ROUTING_WEIGHTS, t, s(&[5, 2])), (ROUTING_INDICES, I64, s(&[5, 2])), (W_IN, t, s(&[4, 24, 20])), (W_OUT, t, s(&[4, 20, 12]))]
        {
            m.types[i] = ty;
            m.shapes[i] = Some(shape);
        }
        m
    }

    fn set(mut self, i: usize, ty: Option<i32>, shape: &[u64]) -> Self {
        self.types[i] = ty;
        self.shapes[i] = Some(s(shape));
        self
    }

    fn attr(mut self, name: &'static str, v: AttrValue) -> Self {
        self.node.0.insert(name, v);
        self
    }

    fn check(&self) -> Result<scatter_moe::Dims, SpecError> {
        let attrs = scatter_moe::Attrs::parse(&self.node)?;
        let refs: Vec<Option<&Shape>> = self.shapes.iter().map(|s| s.as_deref()).collect();
        scatter_moe::check(&attrs, &self.types, &refs).map(|r| r.2)
    }

    fn error(&self) -> String {
        self.check().unwrap_err().to_string()
    }
}

/// A ParallelLinear node: 6 tokens of d_in = 9, k = 2, E = 3 experts, d_out = 10.
fn linear(w_ty: Option<i32>, w: &[u64], extra: &[(usize, Option<i32>, &[u64])], node: &Node) -> Result<parallel_linear::Dims, SpecError> {
    use parallel_linear::*;
    let mut types = vec![F32, I64, w_ty];
    let mut shapes = vec![Some(s(&[6, 9])), Some(s(&[6, 2])), Some(s(w))];
    for &(i, ty, shape) in extra {
        if types.len() <= i {
            types.resize(i + 1, None);
            shapes.resize(i + 1, None);
        }
        types[i] = ty;
        shapes[i] = Some(s(shape));
    }
    let refs: Vec<Option<&Shape>> = shapes.iter().map(|s| s.as_deref()).collect();
    check(&Attrs::parse(node)?, &types, &refs).map(|r| r.2)
}

fn blocks(o: i64, i: i64) -> AttrValue {
    AttrValue::L(vec![o, i])
}

use scatter_moe::{W_IN, W_IN_SCALE, W_IN_ZERO_POINT, W_OUT, W_OUT_SCALE, W_OUT_ZERO_POINT};

#[test]
fn each_weight_is_described_by_its_format() {
    // fp8 w_in with per-channel float32 scales, w_out in T
    let d = Moe::new(BF16).set(W_IN, FP8, &[4, 24, 20]).set(W_IN_SCALE, F32, &[4, 24]).check().unwrap();
    assert_eq!(d.w_in, Some(Quant { format: QuantFormat::Fp8E4M3Fn, layout: ScaleLayout::PerChannel, scale: ElemType::F32, zero_point: false }));
    assert_eq!((d.w_out, d.d, d.f), (None, Some(20), Some(12)));

    // both 4-bit, group-wise [1, 8] scales in T with zero points: d from X, f from w_in's n
    let d = Moe::new(F16)
        .attr("weight_bits", AttrValue::I(4))
        .attr("block_size", blocks(1, 8))
        .set(W_IN, U8, &[4, 24, 10])
        .set(W_OUT, U8, &[4, 20, 6])
        .set(W_IN_SCALE, F16, &[4, 24, 3])
        .set(W_OUT_SCALE, F16, &[4, 20, 2])
        .set(W_IN_ZERO_POINT, U8, &[4, 24, 3])
        .set(W_OUT_ZERO_POINT, U8, &[4, 20, 2])
        .check()
        .unwrap();
    let q = Quant { format: QuantFormat::Int4, layout: ScaleLayout::Blocks { block_out: 1, block_in: 8 }, scale: ElemType::F16, zero_point: true };
    assert_eq!((d.w_in, d.w_out, d.d, d.f), (Some(q), Some(q), Some(20), Some(12)));
    assert_eq!(q.format.stored_in(13), 7);
    assert_eq!(q.scale_shape(4, 24, 20), [4, 24, 3]);

    // 8-bit with 2-D blocks [16, 16]: partial blocks on both sides; no zero point (128 then)
    let d = Moe::new(F32).attr("block_size", blocks(16, 16)).set(W_OUT, U8, &[4, 20, 12]).set(W_OUT_SCALE, F32, &[4, 2, 1]).check().unwrap();
    let q = d.w_out.unwrap();
    assert_eq!((q.format, q.layout, q.zero_point), (QuantFormat::Int8, ScaleLayout::Blocks { block_out: 16, block_in: 16 }, false));
    assert_eq!((q.format.default_zero_point(), q.block(12)), (Some(128), (16, 16)));
    assert_eq!(QuantFormat::Int4.default_zero_point(), Some(8));
    // per channel: the block is one row
    assert_eq!(Quant { layout: ScaleLayout::PerChannel, ..q }.block(12), (1, 12));

    // odd in for 4-bit: ceil(in / 2) bytes a row
    let odd = Moe::new(F32).attr("weight_bits", AttrValue::I(4)).set(scatter_moe::X, F32, &[5, 21]).set(W_IN, U8, &[4, 24, 11]).set(W_OUT, F32, &[4, 21, 12]);
    assert_eq!(odd.set(W_IN_SCALE, F32, &[4, 24]).check().unwrap().d, Some(21));
}

#[test]
fn parallel_linear_quantized_w() {
    use parallel_linear::{W_SCALE, W_ZERO_POINT};
    let mut node = Node::default();
    node.0.insert("weight_bits", AttrValue::I(4));
    node.0.insert("block_size", blocks(1, 4));
    let d = linear(U8, &[3, 10, 5], &[(W_SCALE, F32, &[3, 10, 3]), (W_ZERO_POINT, U8, &[3, 10, 3])], &node).unwrap();
    assert_eq!((d.d_in, d.d_out, d.w.unwrap().format), (Some(9), Some(10), QuantFormat::Int4));
    let e = linear(U8, &[3, 10, 9], &[(W_SCALE, F32, &[3, 10, 3])], &node).unwrap_err().to_string();
    assert_eq!(e, "ParallelLinear: input 'W' [3, 10, 9] is 4-bit (weight_bits = 4): its last dimension must be ceil(d_in / 2) = 5 for d_in = 9, got 9");
    let e = linear(FP8, &[3, 10, 9], &[], &node).unwrap_err().to_string();
    assert_eq!(e, "ParallelLinear: input 'W' is float8e4m3fn and needs input 'W_scale'");
    let e = linear(FP8, &[3, 10, 9], &[(W_SCALE, F32, &[3, 9])], &Node::default()).unwrap_err().to_string();
    assert_eq!(e, "ParallelLinear: input 'W_scale' [3, 9] must be [E, d_out] = [3, 10] (one scale per output channel)");
    assert!(linear(FP8, &[3, 10, 9], &[(W_SCALE, F32, &[3, 10])], &Node::default()).unwrap().w.is_some());
}

#[test]
fn a_quantized_weight_needs_its_scale() {
    let e = Moe::new(F32).set(W_IN, FP8, &[4, 24, 20]).error();
    assert_eq!(e, "ScatterMoE: input 'w_in' is float8e4m3fn and needs input 'w_in_scale'");
    let e = Moe::new(F32).set(W_OUT, U8, &[4, 20, 12]).set(W_OUT_ZERO_POINT, U8, &[4, 20]).error();
    assert_eq!(e, "ScatterMoE: input 'w_out' is uint8 and needs input 'w_out_scale'");
}

#[test]
fn a_scale_or_zero_point_for_a_weight_in_t_is_refused() {
    let e = Moe::new(F32).set(W_IN_SCALE, F32, &[4, 24]).error();
    assert_eq!(
        e,
        "ScatterMoE: input 'w_in_scale' is given but input 'w_in' is float32, not quantized (a scale or zero point goes with a float8e4m3fn or uint8 weight)"
    );
    let e = Moe::new(F16).set(W_OUT_ZERO_POINT, U8, &[4, 20]).error();
    assert!(e.starts_with("ScatterMoE: input 'w_out_zero_point' is given but input 'w_out' is float16, not quantized"), "{e}");
}

#[test]
fn an_fp8_weight_takes_no_zero_point() {
    let e = Moe::new(F32).set(W_IN, FP8, &[4, 24, 20]).set(W_IN_SCALE, F32, &[4, 24]).set(W_IN_ZERO_POINT, U8, &[4, 24]).error();
    assert_eq!(e, "ScatterMoE: input 'w_in_zero_point' is given but input 'w_in' is float8e4m3fn, which has no zero point");
}

#[test]
fn weights_of_other_element_types_are_refused() {
    let e = Moe::new(F32).set(W_IN, I8, &[4, 24, 20]).set(W_IN_SCALE, F32, &[4, 24]).error();
    assert_eq!(e, "ScatterMoE: input 'w_in' has element type int8; supported: float32, float16, bfloat16 (T), float8e4m3fn, uint8 (quantized)");
    let e = Moe::new(F32).set(W_OUT, Some(21), &[4, 20, 12]).error();
    assert!(e.contains("input 'w_out' has element type uint4;"), "{e}");
    // a weight in a float type other than T is the common rule's error
    let e = Moe::new(F32).set(W_OUT, F16, &[4, 20, 12]).error();
    assert_eq!(e, "ScatterMoE: input 'w_out' is float16 but input 'X' is float32; all float inputs must share one element type");
}

#[test]
fn scale_and_zero_point_types() {
    let fp8 = || Moe::new(BF16).set(W_IN, FP8, &[4, 24, 20]);
    // T or float32
    assert_eq!(fp8().set(W_IN_SCALE, BF16, &[4, 24]).check().unwrap().w_in.unwrap().scale, ElemType::BF16);
    assert_eq!(fp8().set(W_IN_SCALE, F32, &[4, 24]).check().unwrap().w_in.unwrap().scale, ElemType::F32);
    let e = fp8().set(W_IN_SCALE, F16, &[4, 24]).error();
    assert_eq!(e, "ScatterMoE: input 'w_in_scale' has element type float16; a scale must be float32 or T (bfloat16, the type of 'X')");
    let e = fp8().set(W_IN_SCALE, Some(11), &[4, 24]).error();
    assert!(e.contains("input 'w_in_scale' has element type float64; a scale must be float32 or T"), "{e}");
    let int8 = Moe::new(F32).set(W_OUT, U8, &[4, 20, 12]).set(W_OUT_SCALE, F32, &[4, 20]);
    let e = int8.set(W_OUT_ZERO_POINT, I8, &[4, 20]).error();
    assert_eq!(e, "ScatterMoE: input 'w_out_zero_point' has element type int8; it must be uint8");
}

#[test]
fn stored_shapes_must_match_the_logical_ones() {
    let int4 = || Moe::new(F32).attr("weight_bits", AttrValue::I(4));
    let e = int4().set(W_IN, U8, &[4, 24, 20]).set(W_IN_SCALE, F32, &[4, 24]).error();
    assert_eq!(e, "ScatterMoE: input 'w_in' [4, 24, 20] is 4-bit (weight_bits = 4): its last dimension must be ceil(d / 2) = 10 for d = 20, got 20");
    let e = int4().set(W_OUT, U8, &[4, 20, 12]).set(W_OUT_SCALE, F32, &[4, 20]).error();
    assert_eq!(e, "ScatterMoE: input 'w_out' [4, 20, 12] is 4-bit (weight_bits = 4): its last dimension must be ceil(f / 2) = 6 for f = 12, got 12");
    // a packed w_out takes f from w_in's n: a gated n must be even
    let e = int4().set(W_IN, F32, &[4, 23, 20]).set(W_OUT, U8, &[4, 20, 6]).set(W_OUT_SCALE, F32, &[4, 20]).error();
    assert!(e.contains("input 'w_in' [4, 23, 20] must be [E, 2f, d] (gated: gate and up rows), got an odd n = 23"), "{e}");
    // 8-bit and fp8 weights keep the logical shape
    let e = Moe::new(F32).set(W_IN, U8, &[4, 24, 10]).set(W_IN_SCALE, F32, &[4, 24]).error();
    assert!(e.contains("input 'w_in' [4, 24, 10] must be [E, n, d] with d = 20"), "{e}");
    // the other rules still apply to quantized weights
    let e = Moe::new(F32).set(W_OUT, FP8, &[3, 20, 12]).set(W_OUT_SCALE, F32, &[3, 20]).error();
    assert!(e.contains("disagree on the number of experts"), "{e}");
}

#[test]
fn scale_ranks_and_shapes() {
    let fp8 = || Moe::new(F32).set(W_IN, FP8, &[4, 24, 20]);
    for bad in [&[4u64][..], &[4, 24, 1, 1]] {
        let e = fp8().set(W_IN_SCALE, F32, bad).error();
        assert!(
            e.starts_with("ScatterMoE: input 'w_in_scale' must have rank 2 ([E, n]: one scale per output channel) or 3 ([E, ceil(n / block_out), ceil(d / block_in)]: block scales), got shape"),
            "{e}"
        );
    }
    let e = fp8().set(W_IN_SCALE, F32, &[4, 20]).error();
    assert_eq!(e, "ScatterMoE: input 'w_in_scale' [4, 20] must be [E, n] = [4, 24] (one scale per output channel)");
    let e = fp8().set(W_IN_SCALE, F32, &[5, 24]).error();
    assert!(e.contains("must be [E, n] = [4, 24]"), "{e}");
    // blocks [16, 8] over [24, 20]: [2, 3] per expert
    let e = fp8().attr("block_size", blocks(16, 8)).set(W_IN_SCALE, F32, &[4, 2, 2]).error();
    assert_eq!(e, "ScatterMoE: input 'w_in_scale' [4, 2, 2] must be [E, ceil(n / 16), ceil(d / 8)] = [4, 2, 3] (block_size [16, 8])");
    assert!(fp8().attr("block_size", blocks(16, 8)).set(W_IN_SCALE, F32, &[4, 2, 3]).check().is_ok());
    // rank 2 ignores block_size
    assert_eq!(fp8().attr("block_size", blocks(16, 8)).set(W_IN_SCALE, F32, &[4, 24]).check().unwrap().w_in.unwrap().layout, ScaleLayout::PerChannel);
    let e = fp8().set(W_IN_SCALE, F32, &[4, 2, 3]).error();
    assert_eq!(e, "ScatterMoE: input 'w_in_scale' has rank 3 (block scales) and needs attribute 'block_size' = [block_out, block_in]");
}

#[test]
fn zero_points_have_their_scales_shape() {
    let e = Moe::new(F32).set(W_OUT, U8, &[4, 20, 12]).set(W_OUT_SCALE, F32, &[4, 20]).set(W_OUT_ZERO_POINT, U8, &[4, 20, 1]).error();
    assert_eq!(e, "ScatterMoE: input 'w_out_zero_point' [4, 20, 1] must have the shape of 'w_out_scale' [4, 20]");
}

#[test]
fn weight_bits_and_block_size_are_validated() {
    let e = Moe::new(F32).attr("weight_bits", AttrValue::I(3)).error();
    assert_eq!(e, "ScatterMoE: attribute 'weight_bits' must be 4 or 8, got 3");
    for bad in [vec![128], vec![0, 32], vec![1, -4], vec![1, 2, 3]] {
        let e = Moe::new(F32).attr("block_size", AttrValue::L(bad.clone())).error();
        assert_eq!(e, format!("ScatterMoE: attribute 'block_size' must be two positive integers [block_out, block_in], got {bad:?}"));
    }
    let mut node = Node::default();
    node.0.insert("weight_bits", AttrValue::I(16));
    assert!(parallel_linear::Attrs::parse(&node).unwrap_err().to_string().starts_with("ParallelLinear: attribute 'weight_bits'"));
    // the defaults: 8 bits, no block_size
    assert_eq!(scatter_moe::Attrs::parse(&Node::default()).unwrap().quant, QuantAttrs { weight_bits: 8, block_size: None });
}

#[test]
fn before_run_time_only_what_is_known_is_checked() {
    // symbolic tokens and d in X: d is told by w_out, and a packed w_in is checked against it
    let int4 = || Moe::new(F32).attr("weight_bits", AttrValue::I(4)).set(W_IN_SCALE, F32, &[4, 24]);
    let mut m = int4().set(W_IN, U8, &[4, 24, 10]);
    m.shapes[scatter_moe::X] = Some(vec![None, None]);
    assert_eq!(m.check().unwrap().d, Some(20));
    let mut m = int4().set(W_IN, U8, &[4, 24, 11]);
    m.shapes[scatter_moe::X] = Some(vec![None, None]);
    assert!(m.error().contains("must be ceil(d / 2) = 10 for d = 20, got 11"));
    // d not known anywhere: nothing to check the packed dimension against yet
    let mut m = int4().set(W_IN, U8, &[4, 24, 10]);
    m.shapes[scatter_moe::X] = Some(vec![None, None]);
    m.shapes[W_OUT] = Some(vec![Some(4), None, Some(12)]);
    assert_eq!(m.check().unwrap().d, None);
    // element types not known yet (TensorRT's shape pass): a weight with a scale may be packed
    let mut m = Moe::new(F32).set(W_IN, U8, &[4, 24, 10]).set(W_IN_SCALE, F32, &[4, 24]);
    m.types = vec![None; 12];
    assert_eq!(m.check().unwrap().w_in, None);
    // too many inputs
    let mut m = Moe::new(F32);
    m.types.push(None);
    m.shapes.push(Some(s(&[1])));
    assert_eq!(m.error(), "ScatterMoE: expects 5 to 12 inputs, got 13");
}
