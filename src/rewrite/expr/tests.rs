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
