//! Unit tests of the expression parser, the identification and the MLP reader.

use super::*;

fn lin(n: &str) -> Expr {
    Expr::Lin { x: Box::new(Expr::Leaf), w: WSrc { init: n.into(), index: None, transposed: false, out: 4, inp: 4 }, b: None }
}
fn op(o: &'static str, a: Vec<Expr>) -> Expr {
    Expr::Op(o, a)
}
fn c(v: f64) -> Expr {
    Expr::Const(v)
}

#[test]
fn unary_activations_are_identified_in_any_spelling() {
    let x = lin("a");
    let silu = op("Mul", vec![x.clone(), op("Sigmoid", vec![x.clone()])]);
    assert_eq!(identify_unary(&silu, &x), Some(Activation::Silu));
    // torch's erf GELU: x * (erf(x / sqrt2) + 1) * 0.5
    let gelu = op("Mul", vec![op("Mul", vec![x.clone(), op("Add", vec![op("Erf", vec![op("Div", vec![x.clone(), c(1.4142135381698608)])]), c(1.0)])]), c(0.5)]);
    assert_eq!(identify_unary(&gelu, &x), Some(Activation::Gelu));
    // tanh GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    let inner = op("Mul", vec![c(0.7978845608028654), op("Add", vec![x.clone(), op("Mul", vec![c(0.044715), op("Mul", vec![x.clone(), op("Mul", vec![x.clone(), x.clone()])])])])]);
    let gt = op("Mul", vec![c(0.5), op("Mul", vec![x.clone(), op("Add", vec![c(1.0), op("Tanh", vec![inner])])])]);
    assert_eq!(identify_unary(&gt, &x), Some(Activation::GeluTanh));
    assert_eq!(identify_unary(&op("Relu", vec![x.clone()]), &x), Some(Activation::Relu));
    assert_eq!(identify_unary(&op("Tanh", vec![x.clone()]), &x), None);
    assert_eq!(identify_unary(&op("Sigmoid", vec![x.clone()]), &x), None);
}

#[test]
fn gated_activations_name_the_gate_and_clamped_swiglu_constants() {
    let (p, q) = (lin("p"), lin("q"));
    let h = op("Mul", vec![op("Mul", vec![q.clone(), op("Sigmoid", vec![q.clone()])]), p.clone()]);
    assert_eq!(identify_gated(&h, &p, &q), Some((Activation::Silu, false, 1.702, 7.0)));
    // GPT-OSS: (clip(u, -l, l) + 1) * g' * sigmoid(alpha g'), g' = min(g, l), with l = 5, alpha = 1.5
    let gc = Expr::Clip { x: Box::new(p.clone()), lo: None, hi: Some(5.0) };
    let uc = Expr::Clip { x: Box::new(q.clone()), lo: Some(-5.0), hi: Some(5.0) };
    let glu = op("Mul", vec![gc.clone(), op("Sigmoid", vec![op("Mul", vec![gc, c(1.5)])])]);
    let h = op("Mul", vec![op("Add", vec![uc, c(1.0)]), glu]);
    assert_eq!(identify_gated(&h, &p, &q), Some((Activation::SwigluOai, true, 1.5, 5.0)));
    // not a GLU: gate * up without an activation
    assert_eq!(identify_gated(&op("Mul", vec![p.clone(), q.clone()]), &p, &q), None);
}

#[test]
fn squared_relu_is_identified_in_either_spelling() {
    let x = lin("a");
    let r = op("Relu", vec![x.clone()]);
    // transformers' ReLUSquaredActivation: square(relu(x)), as Mul or Pow
    assert_eq!(identify_unary(&op("Mul", vec![r.clone(), r.clone()]), &x), Some(Activation::Relu2));
    assert_eq!(identify_unary(&op("Pow", vec![r.clone(), c(2.0)]), &x), Some(Activation::Relu2));
    // relu(x)^3 and x^2 are not
    assert_eq!(identify_unary(&op("Pow", vec![r.clone(), c(3.0)]), &x), None);
    assert_eq!(identify_unary(&op("Mul", vec![x.clone(), x.clone()]), &x), None);
    // gated: relu2(gate) * up
    let (p, q) = (lin("p"), lin("q"));
    let rp = op("Relu", vec![p.clone()]);
    assert_eq!(identify_gated(&op("Mul", vec![op("Mul", vec![rp.clone(), rp]), q.clone()]), &p, &q), Some((Activation::Relu2, true, 1.702, 7.0)));
}

#[test]
fn swiglu_limit_is_told_from_silu_and_from_swiglu_oai() {
    let (p, q) = (lin("p"), lin("q"));
    // GLM-5-Next / HY-V4: silu(min(gate, l)) * clamp(up, -l, l), l = 10
    let glm = |l: f64| {
        let gc = Expr::Clip { x: Box::new(p.clone()), lo: None, hi: Some(l) };
        let uc = Expr::Clip { x: Box::new(q.clone()), lo: Some(-l), hi: Some(l) };
        op("Mul", vec![op("Mul", vec![gc.clone(), op("Sigmoid", vec![gc])]), uc])
    };
    assert_eq!(identify_gated(&glm(10.0), &p, &q), Some((Activation::SwigluLimit, true, 1.0, 10.0)));
    // a limit beyond every fixed sample point is still a clamp, not silu * up
    assert_eq!(identify_gated(&glm(50.0), &p, &q), Some((Activation::SwigluLimit, true, 1.0, 50.0)));
    // the same clamps with GPT-OSS's "+ 1" on up are swiglu_oai
    let gc = Expr::Clip { x: Box::new(q.clone()), lo: None, hi: Some(10.0) };
    let uc = Expr::Clip { x: Box::new(p.clone()), lo: Some(-10.0), hi: Some(10.0) };
    let oai = op("Mul", vec![op("Add", vec![uc, c(1.0)]), op("Mul", vec![gc.clone(), op("Sigmoid", vec![gc])])]);
    assert_eq!(identify_gated(&oai, &p, &q), Some((Activation::SwigluOai, false, 1.0, 10.0)));
    // only one side clamped: neither
    let half = op("Mul", vec![op("Mul", vec![p.clone(), op("Sigmoid", vec![p.clone()])]), Expr::Clip { x: Box::new(q.clone()), lo: Some(-10.0), hi: Some(10.0) }]);
    assert_eq!(identify_gated(&half, &p, &q), None);
}

#[test]
fn a_clamp_beyond_the_samples_is_not_taken_for_a_plain_activation() {
    // relu(min(x, 100)) is relu only below 100
    let x = lin("a");
    let h = op("Relu", vec![Expr::Clip { x: Box::new(x.clone()), lo: None, hi: Some(100.0) }]);
    assert_eq!(identify_unary(&h, &x), None);
}

/// A 16-bit export's constants are rounded to its type: erf- and tanh-GELU spelled with float16 or
/// bfloat16 constants are still identified, each as itself, and a constant off by more than its
/// rounding, a float32 one off at all, or a 16-bit number that rounds no defining constant, is not.
#[test]
fn activations_with_16_bit_constants_are_identified_as_themselves() {
    let x = lin("a");
    let r16 = |v: f64| half::f16::from_f64(v).to_f64();
    let rb16 = |v: f64| half::bf16::from_f64(v).to_f64();
    let gelu = |s2: f64| op("Mul", vec![op("Mul", vec![x.clone(), op("Add", vec![op("Erf", vec![op("Div", vec![x.clone(), c(s2)])]), c(1.0)])]), c(0.5)]);
    let tanh = |a: f64, b: f64| {
        let cube = op("Mul", vec![x.clone(), op("Mul", vec![x.clone(), x.clone()])]);
        let inner = op("Mul", vec![c(a), op("Add", vec![x.clone(), op("Mul", vec![c(b), cube])])]);
        op("Mul", vec![c(0.5), op("Mul", vec![x.clone(), op("Add", vec![c(1.0), op("Tanh", vec![inner])])])])
    };
    let (s2, a, b) = (std::f64::consts::SQRT_2, (2.0 / std::f64::consts::PI).sqrt(), 0.044715);
    for r in [r16, rb16] {
        assert_eq!(identify_unary(&gelu(r(s2)), &x), Some(Activation::Gelu));
        assert_eq!(identify_unary(&tanh(r(a), r(b)), &x), Some(Activation::GeluTanh));
    }
    // off by far more than float16's rounding, though a float16 number
    assert_eq!(identify_unary(&gelu(r16(s2 * 1.05)), &x), None);
    // a float32 constant off by 1e-3: held to the exact comparison
    assert_eq!(identify_unary(&gelu((s2 * 1.001) as f32 as f64), &x), None);
    // x * sigmoid(1.0078125 x) is no silu, though 1.0078125 is a bfloat16 number one ulp from 1
    assert_eq!(identify_unary(&op("Mul", vec![x.clone(), op("Sigmoid", vec![op("Mul", vec![x.clone(), c(1.0078125)])])]), &x), None);
    // gated: gelu(gate) * up with float16 constants
    let (p, q) = (lin("p"), lin("q"));
    let g16 = op(
        "Mul",
        vec![op("Mul", vec![op("Mul", vec![p.clone(), op("Add", vec![op("Erf", vec![op("Div", vec![p.clone(), c(r16(s2))])]), c(1.0)])]), c(0.5)]), q.clone()],
    );
    assert_eq!(identify_gated(&g16, &p, &q), Some((Activation::Gelu, true, 1.702, 7.0)));
}

/// The dynamo exporter's float16 tanh-GELU: `0.5 x (1 + tanh(0.79785 (x + 0.044708 Pow(x, 3))))`.
#[test]
fn a_16_bit_tanh_gelu_with_pow_is_identified() {
    let x = lin("a");
    let cube = op("Pow", vec![x.clone(), c(3.0)]);
    let inner = op("Mul", vec![c(0.7978515625), op("Add", vec![x.clone(), op("Mul", vec![c(0.044708251953125), cube])])]);
    let h = op("Mul", vec![x.clone(), op("Mul", vec![c(0.5), op("Add", vec![op("Tanh", vec![inner]), c(1.0)])])]);
    assert_eq!(identify_unary(&h, &x), Some(Activation::GeluTanh));
}
