use super::*;
use std::collections::HashMap;

/// Attributes by name, as a node holds them (shared with `quant_tests`).
#[derive(Default)]
pub(super) struct Attrs(pub HashMap<&'static str, AttrValue>);
pub(super) enum AttrValue {
    I(i64),
    F(f32),
    S(&'static str),
    L(Vec<i64>),
}
impl AttrSource for Attrs {
    fn int(&self, n: &str) -> Option<i64> {
        match self.0.get(n) {
            Some(AttrValue::I(v)) => Some(*v),
            _ => None,
        }
    }
    fn float(&self, n: &str) -> Option<f32> {
        match self.0.get(n) {
            Some(AttrValue::F(v)) => Some(*v),
            _ => None,
        }
    }
    fn string(&self, n: &str) -> Option<String> {
        match self.0.get(n) {
            Some(AttrValue::S(v)) => Some(v.to_string()),
            _ => None,
        }
    }
    fn ints(&self, n: &str) -> Option<Vec<i64>> {
        match self.0.get(n) {
            Some(AttrValue::L(v)) => Some(v.clone()),
            _ => None,
        }
    }
}

pub(super) fn s(v: &[u64]) -> Vec<Dim> {
    v.iter().map(|&x| Some(x)).collect()
}

const F32: Option<i32> = Some(1);
const I64: Option<i32> = Some(7);

fn moe_check(shapes: &[Option<Vec<Dim>>], types: &[Option<i32>]) -> Result<scatter_moe::Dims, SpecError> {
    let refs: Vec<Option<&Shape>> = shapes.iter().map(|s| s.as_deref()).collect();
    scatter_moe::check(&scatter_moe::Attrs::default(), types, &refs).map(|r| r.2)
}

#[test]
fn scatter_moe_dims_from_static_shapes() {
    let d = moe_check(
        &[Some(s(&[2, 5, 16])), Some(s(&[10, 2])), Some(s(&[10, 2])), Some(s(&[8, 64, 16])), Some(s(&[8, 16, 32]))],
        &[F32, F32, I64, F32, F32],
    )
    .unwrap();
    assert_eq!((d.tokens, d.k, d.experts, d.d, d.f), (Some(10), Some(2), Some(8), Some(16), Some(32)));
}

#[test]
fn scatter_moe_symbolic_tokens_pass_and_known_mismatch_fails() {
    let ok = moe_check(
        &[Some(vec![None, Some(16)]), Some(vec![None, Some(2)]), Some(vec![None, Some(2)]), Some(s(&[8, 64, 16])), Some(s(&[8, 16, 32]))],
        &[F32, F32, I64, F32, F32],
    )
    .unwrap();
    assert_eq!(ok.tokens, None);
    let e = moe_check(
        &[Some(s(&[4, 16])), Some(s(&[4, 2])), Some(s(&[4, 2])), Some(s(&[8, 60, 16])), Some(s(&[8, 16, 32]))],
        &[F32, F32, I64, F32, F32],
    )
    .unwrap_err();
    assert!(e.to_string().contains("'w_in'") && e.to_string().contains("n = 60"), "{e}");
}

#[test]
fn scatter_moe_type_errors_name_the_input() {
    let shapes = [Some(s(&[4, 16])), Some(s(&[4, 2])), Some(s(&[4, 2])), Some(s(&[8, 64, 16])), Some(s(&[8, 16, 32]))];
    let e = moe_check(&shapes, &[F32, F32, I64, Some(10), F32]).unwrap_err();
    assert_eq!(e.to_string(), "ScatterMoE: input 'w_in' is float16 but input 'X' is float32; all float inputs must share one element type");
    let e = moe_check(&shapes, &[Some(11), F32, I64, F32, F32]).unwrap_err();
    assert!(e.to_string().contains("input 'X' has element type float64"), "{e}");
    let e = moe_check(&shapes, &[F32, F32, Some(1), F32, F32]).unwrap_err();
    assert!(e.to_string().contains("'routing_indices' has element type float32"), "{e}");
}

#[test]
fn scatter_moe_token_mismatch() {
    let e = moe_check(
        &[Some(s(&[5, 16])), Some(s(&[4, 2])), Some(s(&[4, 2])), Some(s(&[8, 64, 16])), Some(s(&[8, 16, 32]))],
        &[F32, F32, I64, F32, F32],
    )
    .unwrap_err();
    assert!(e.to_string().contains("5 tokens"), "{e}");
}

#[test]
fn attributes_are_validated() {
    let mut a = Attrs::default();
    a.0.insert("activation", AttrValue::S("swish"));
    let e = scatter_moe::Attrs::parse(&a).unwrap_err();
    assert!(e.to_string().contains("'activation' has unsupported value 'swish'"), "{e}");
    let mut a = Attrs::default();
    a.0.insert("activation", AttrValue::S("swiglu_oai"));
    a.0.insert("gated", AttrValue::I(0));
    assert!(scatter_moe::Attrs::parse(&a).unwrap_err().to_string().contains("needs 'gated' = 1"));
    let mut a = Attrs::default();
    a.0.insert("activation", AttrValue::S("swiglu_limit"));
    a.0.insert("gated", AttrValue::I(0));
    assert!(scatter_moe::Attrs::parse(&a).unwrap_err().to_string().contains("'swiglu_limit' needs 'gated' = 1"));
    // relu2 is defined on one value: plain and gated
    for gated in [0, 1] {
        let mut a = Attrs::default();
        a.0.insert("activation", AttrValue::S("relu2"));
        a.0.insert("gated", AttrValue::I(gated));
        assert_eq!(scatter_moe::Attrs::parse(&a).unwrap().activation, crate::spec::Activation::Relu2);
    }
    let mut a = Attrs::default();
    a.0.insert("gated", AttrValue::I(2));
    assert!(scatter_moe::Attrs::parse(&a).is_err());
    let mut a = Attrs::default();
    a.0.insert("limit", AttrValue::F(0.0));
    assert!(scatter_moe::Attrs::parse(&a).is_err());
}

#[test]
fn parallel_linear_shapes() {
    let attrs = parallel_linear::Attrs { grouped_in: true, grouped_out: false, ..Default::default() };
    let x = s(&[6, 8]);
    let ri = s(&[3, 2]);
    let w = s(&[4, 5, 8]);
    let g = s(&[3, 2]);
    let (_, _, d) =
        parallel_linear::check(&attrs, &[F32, I64, F32, None, F32], &[Some(&x), Some(&ri), Some(&w), None, Some(&g)]).unwrap();
    assert_eq!(parallel_linear::output_shape(&attrs, &ri, d.d_out, true, |r| parallel_linear::grouped_rows(r)), s(&[3, 5]));
    let bad = s(&[5, 8]);
    let e = parallel_linear::check(&attrs, &[F32, I64, F32], &[Some(&bad), Some(&ri), Some(&w)]).unwrap_err();
    assert!(e.to_string().contains("T*k = 6 rows"), "{e}");
    let attrs = parallel_linear::Attrs { grouped_in: false, grouped_out: true, ..Default::default() };
    let e = parallel_linear::check(&attrs, &[F32, I64, F32, None, F32], &[Some(&s(&[3, 8])), Some(&ri), Some(&w), None, Some(&g)])
        .unwrap_err();
    assert!(e.to_string().contains("grouped_out"), "{e}");
}

#[test]
fn glu_rows() {
    assert_eq!(GluLayout::GateUp.rows(1, 4), (1, 5));
    assert_eq!(GluLayout::UpGate.rows(1, 4), (5, 1));
    assert_eq!(GluLayout::Interleaved.rows(1, 4), (2, 3));
}

#[test]
fn topk_router_attributes_and_shapes() {
    use topk_router::*;
    let attrs = |pairs: Vec<(&'static str, AttrValue)>| Attrs(pairs.into_iter().collect());
    let a = topk_router::Attrs::parse(&attrs(vec![("k", AttrValue::I(2))])).unwrap();
    assert_eq!((a.k, a.scoring, a.normalize, a.tie_break), (2, Scoring::Softmax, false, TieBreak::LowerIndex));
    let a = topk_router::Attrs::parse(&attrs(vec![
        ("k", AttrValue::I(4)),
        ("scoring", AttrValue::S("topk_softmax")),
        ("normalize", AttrValue::I(1)),
        ("tie_break", AttrValue::S("higher_index")),
    ]))
    .unwrap();
    assert_eq!((a.scoring, a.normalize, a.tie_break), (Scoring::TopkSoftmax, true, TieBreak::HigherIndex));
    let e = |pairs| topk_router::Attrs::parse(&attrs(pairs)).unwrap_err().to_string();
    assert_eq!(e(vec![]), "TopKRouter: attribute 'k' is required");
    assert_eq!(e(vec![("k", AttrValue::I(-1))]), "TopKRouter: attribute 'k' must be in [1, 2147483647], got -1");
    assert!(e(vec![("k", AttrValue::I(1)), ("scoring", AttrValue::S("relu"))]).contains("supported: softmax, topk_softmax, sigmoid"));

    let a = topk_router::Attrs::plain(3, Scoring::Softmax, false, TieBreak::LowerIndex);
    let (t, d) = check(&a, &[Some(10)], &[Some(&s(&[2, 5, 8]))]).unwrap();
    assert_eq!((t, d.tokens, d.experts), (ElemType::F16, Some(10), Some(8)));
    assert_eq!(output_shape(&a, &[2u64, 5, 8], |k| k as u64), [2, 5, 3]);
    // symbolic leading dims stay symbolic; E must hold k where known
    let (_, d) = check(&a, &[Some(1)], &[Some(&[None, Some(4)])]).unwrap();
    assert_eq!((d.tokens, d.experts), (None, Some(4)));
    let err = |shape: &[Dim], ty: i32| check(&a, &[Some(ty)], &[Some(shape)]).unwrap_err().to_string();
    assert_eq!(err(&s(&[4, 2]), 1), "TopKRouter: attribute 'k' = 3 is more than the 2 experts of input 'logits' (shape [4, 2])");
    assert_eq!(err(&s(&[4]), 1), "TopKRouter: input 'logits' must have rank >= 2, got shape [4]");
    assert_eq!(err(&s(&[4, 0]), 1), "TopKRouter: input 'logits' has E (last dimension) = 0 (shape [4, 0]); it must be at least 1");
    assert!(err(&s(&[4, 8]), 7).starts_with("TopKRouter: input 'logits' has element type int64"));
}

#[test]
fn topk_router_groups_bias_and_scale() {
    use topk_router::*;
    let attrs = |pairs: Vec<(&'static str, AttrValue)>| Attrs(pairs.into_iter().collect());
    let parse = |pairs| topk_router::Attrs::parse(&attrs(pairs));
    // DeepSeek-V3's router
    let a = parse(vec![
        ("k", AttrValue::I(8)),
        ("scoring", AttrValue::S("sigmoid")),
        ("normalize", AttrValue::I(1)),
        ("n_group", AttrValue::I(8)),
        ("topk_group", AttrValue::I(4)),
        ("normalize_eps", AttrValue::F(1e-20)),
        ("scale", AttrValue::F(2.5)),
    ])
    .unwrap();
    assert_eq!(a.groups, Some(Groups { n_group: 8, topk_group: 4, score: GroupScore::Top2Sum, fill: f32::NEG_INFINITY }));
    assert_eq!((a.weights_from, a.normalize_eps, a.scale), (WeightsFrom::Scores, 1e-20, 2.5));
    // every group competing limits nothing: no groups, whatever E is
    let all = parse(vec![("k", AttrValue::I(2)), ("n_group", AttrValue::I(3)), ("topk_group", AttrValue::I(3))]).unwrap();
    assert_eq!(all.groups, None);
    assert!(check(&all, &[Some(1)], &[Some(&s(&[4, 8]))]).is_ok());
    let e = |pairs| parse(pairs).unwrap_err().to_string();
    assert!(e(vec![("k", AttrValue::I(2)), ("n_group", AttrValue::I(0))]).contains("'n_group' must be at least 1"));
    assert!(e(vec![("k", AttrValue::I(2)), ("n_group", AttrValue::I(2)), ("topk_group", AttrValue::I(3))]).contains("'topk_group' must be in [1, n_group = 2]"));
    assert!(e(vec![("k", AttrValue::I(2)), ("group_fill", AttrValue::F(f32::NAN))]).contains("'group_fill' is NaN"));
    assert!(e(vec![("k", AttrValue::I(2)), ("normalize_eps", AttrValue::F(-1.0))]).contains("'normalize_eps' must be finite and >= 0"));
    assert!(e(vec![("k", AttrValue::I(2)), ("scale", AttrValue::F(f32::INFINITY))]).contains("'scale' must be finite"));
    assert!(e(vec![("k", AttrValue::I(2)), ("normalize_min", AttrValue::F(-1e-12))]).contains("'normalize_min' must be finite and >= 0"));
    assert_eq!(parse(vec![("k", AttrValue::I(2)), ("normalize_min", AttrValue::F(1e-12))]).unwrap().normalize_min, 1e-12);
    assert!(e(vec![("k", AttrValue::I(2)), ("scoring", AttrValue::S("topk_softmax")), ("n_group", AttrValue::I(2)), ("topk_group", AttrValue::I(1))]).contains("topk_softmax"));
    // shapes: E must split into the groups, top2_sum needs two a group, the bias one value an expert
    let err = |a: &topk_router::Attrs, shapes: &[Option<&Shape>], types: &[Option<i32>]| check(a, types, shapes).unwrap_err().to_string();
    assert!(err(&a, &[Some(&s(&[4, 12]))], &[Some(1)]).contains("do not split into n_group = 8 groups"));
    let eight_of_eight = parse(vec![("k", AttrValue::I(2)), ("n_group", AttrValue::I(8)), ("topk_group", AttrValue::I(2))]).unwrap();
    assert!(err(&eight_of_eight, &[Some(&s(&[4, 8]))], &[Some(1)]).contains("needs two experts a group"));
    assert!(check(&a, &[Some(10), Some(1)], &[Some(&s(&[4, 256])), Some(&s(&[256]))]).is_ok());
    assert!(check(&a, &[Some(10), Some(10)], &[Some(&s(&[4, 256])), Some(&s(&[1, 256]))]).is_ok());
    assert!(err(&a, &[Some(&s(&[4, 256])), Some(&s(&[255]))], &[Some(1), Some(1)]).contains("input 'bias' has [255] values"));
    assert!(err(&a, &[Some(&s(&[4, 256])), Some(&s(&[2, 256]))], &[Some(1), Some(1)]).contains("must have shape [E] or [1, E]"));
    assert!(err(&a, &[Some(&s(&[4, 256])), Some(&s(&[256]))], &[Some(10), Some(16)]).contains("input 'bias' has element type bfloat16; it must be float32 or T"));
}
