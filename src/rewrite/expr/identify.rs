//! Numeric identification of the activation: the elementwise part of an expert, evaluated at
//! sample points (both sides of every constant it holds), is compared with each activation the op
//! has, so any spelling of SiLU, GELU, squared ReLU or the clamped SwiGLUs is recognised.
//!
//! A 16-bit export holds the activation's constants rounded to its type (GELU's sqrt(2) as float16
//! 1.4140625, tanh-GELU's sqrt(2/pi) and 0.044715 likewise), so its expression is the activation
//! only up to that rounding (2.8e-5 for erf-GELU in float16, 3.0e-4 for tanh-GELU in bfloat16,
//! relative to 1 + |value|), beyond the exact comparison's 1e-5. Where nothing matches exactly,
//! each constant that is the float16 or bfloat16 rounding of a constant of the activations'
//! definitions ([`defining`]) is put back to that constant and the comparison is made again,
//! exactly. Only those constants are put back: an expression whose constants are not such
//! roundings (x * sigmoid(1.0078125 x), say, in any type) is held to the exact comparison.

use super::*;

/// Evaluates an elementwise expression whose inputs (`Lin` / `Slice` nodes) are given by `input`.
pub fn eval(e: &Expr, input: &dyn Fn(&Expr) -> Option<f64>) -> Option<f64> {
    if let Some(v) = input(e) {
        return Some(v);
    }
    Some(match e {
        Expr::Const(c) => *c,
        Expr::Clip { x, lo, hi } => {
            let mut v = eval(x, input)?;
            if let Some(l) = lo {
                v = v.max(*l);
            }
            if let Some(h) = hi {
                v = v.min(*h);
            }
            v
        }
        Expr::Op(op, a) => {
            let x = eval(&a[0], input)?;
            match *op {
                "Sigmoid" => 1.0 / (1.0 + (-x).exp()),
                "Erf" => libm::erf(x),
                "Tanh" => x.tanh(),
                "Relu" => x.max(0.0),
                "Neg" => -x,
                "Exp" => x.exp(),
                "Log" => x.ln(),
                "Softplus" => (1.0 + x.exp()).ln(),
                "Abs" => x.abs(),
                "Sqrt" => x.sqrt(),
                "Reciprocal" => 1.0 / x,
                "Gelu" => act(Activation::Gelu, x),
                "GeluTanh" => act(Activation::GeluTanh, x),
                _ => {
                    let y = eval(&a[1], input)?;
                    match *op {
                        "Add" => x + y,
                        "Sub" => x - y,
                        "Mul" => x * y,
                        "Div" => x / y,
                        "Pow" => x.powf(y),
                        "Min" => x.min(y),
                        "Max" => x.max(y),
                        _ => return None,
                    }
                }
            }
        }
        _ => return None,
    })
}

pub fn act(a: Activation, x: f64) -> f64 {
    match a {
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
        Activation::GeluTanh => 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh()),
        Activation::Relu => x.max(0.0),
        Activation::Relu2 => x.max(0.0).powi(2),
        Activation::SwigluOai | Activation::SwigluLimit => f64::NAN,
    }
}

/// The activations defined on one value, the candidates of [`identify_unary`] and of the
/// `act(gate) * up` forms of [`identify_gated`].
const UNARY: [Activation; 5] = [Activation::Silu, Activation::Gelu, Activation::GeluTanh, Activation::Relu, Activation::Relu2];

/// The clamped SwiGLU forms over (gate, up), with their alpha and limit.
fn clamped_glu(a: Activation, g: f64, u: f64, alpha: f64, limit: f64) -> f64 {
    let g = g.min(limit);
    let u = u.clamp(-limit, limit);
    let offset = if a == Activation::SwigluOai { 1.0 } else { 0.0 };
    (u + offset) * g / (1.0 + (-alpha * g).exp())
}

fn close(a: f64, b: f64) -> bool {
    a.is_finite() && (a - b).abs() <= 1e-5 * (1.0 + b.abs())
}

fn samples() -> Vec<f64> {
    let mut s: Vec<f64> = (0..=120).map(|i| -12.0 + 0.2 * i as f64).collect();
    s.extend([0.0, 1e-3, -1e-3, 0.37, -0.37, 7.0, -7.0, 6.99, 7.01, 30.0, -30.0]);
    s
}

/// Points on both sides of every constant of `h` (and of its negation): a clamp or a threshold
/// sits at one of them, so a clamp beyond the fixed samples (a limit of 50, say) is still seen.
fn breakpoints(h: &Expr) -> Vec<f64> {
    let mut consts = Vec::new();
    collect_consts(h, &mut consts);
    let mut out = Vec::new();
    for c in consts.into_iter().filter(|c| c.is_finite() && *c != 0.0 && c.abs() <= 1e6) {
        for v in [c, -c] {
            out.extend([v - 0.5, v + 0.5, 2.0 * v]);
        }
    }
    out
}

/// The constants of the activations' definitions and of the spellings exporters fold them into:
/// sqrt(2) and 1/sqrt(2) (erf-GELU), sqrt(2/pi), 2 sqrt(2/pi) (the sigmoid spelling), 0.044715 and
/// its products with those two (tanh-GELU), 1.702 (GPT-OSS's alpha).
fn defining() -> [f64; 8] {
    let (s2, c) = (std::f64::consts::SQRT_2, (2.0 / std::f64::consts::PI).sqrt());
    [s2, 1.0 / s2, c, 2.0 * c, 0.044715, 0.044715 * c, 0.044715 * 2.0 * c, 1.702]
}

/// `h` with every constant that is the float16 or bfloat16 rounding of a [`defining`] constant
/// (or of its negation), rounded from float64 or from float32 as exporters do, put back to that
/// constant; None where there is none.
fn unrounded(h: &Expr) -> Option<Expr> {
    let back = |c: f64| -> Option<f64> {
        defining().into_iter().flat_map(|k| [k, -k]).find(|&k| {
            let r = [
                half::f16::from_f64(k).to_f64(),
                half::f16::from_f32(k as f32).to_f64(),
                half::bf16::from_f64(k).to_f64(),
                half::bf16::from_f32(k as f32).to_f64(),
            ];
            c != k && r.contains(&c)
        })
    };
    fn walk(e: &Expr, back: &dyn Fn(f64) -> Option<f64>, changed: &mut bool) -> Expr {
        let mut one = |c: f64| match back(c) {
            Some(k) => {
                *changed = true;
                k
            }
            None => c,
        };
        match e {
            Expr::Const(c) => Expr::Const(one(*c)),
            Expr::Clip { x, lo, hi } => {
                let (lo, hi) = (lo.map(&mut one), hi.map(&mut one));
                Expr::Clip { x: Box::new(walk(x, back, changed)), lo, hi }
            }
            Expr::Op(o, a) => Expr::Op(o, a.iter().map(|x| walk(x, back, changed)).collect()),
            other => other.clone(),
        }
    }
    let mut changed = false;
    let out = walk(h, &back, &mut changed);
    changed.then_some(out)
}

/// A unary activation h(x) among the supported ones.
pub fn identify_unary(h: &Expr, leaf: &Expr) -> Option<Activation> {
    let mut pts = samples();
    pts.extend(breakpoints(h));
    let exact = UNARY.into_iter().find(|&a| {
        pts.iter().all(|&x| {
            let v = eval(h, &|e| (e == leaf).then_some(x));
            v.is_some_and(|v| close(v, act(a, x)))
        })
    });
    // a 16-bit export's rounded constants put back (see the module's comment)
    exact.or_else(|| identify_unary(&unrounded(h)?, leaf))
}

/// A gated activation h(p, q): returns (activation, p is the gate, alpha, limit).
pub fn identify_gated(h: &Expr, p: &Expr, q: &Expr) -> Option<(Activation, bool, f32, f32)> {
    let mut pts: Vec<f64> = samples().into_iter().step_by(3).collect();
    pts.extend(breakpoints(h));
    let f = |x: f64, y: f64| eval(h, &|e| if e == p { Some(x) } else if e == q { Some(y) } else { None });
    let check = |target: &dyn Fn(f64, f64) -> f64| pts.iter().all(|&x| pts.iter().all(|&y| f(x, y).is_some_and(|v| close(v, target(x, y)))));
    for a in UNARY {
        if check(&|x, y| act(a, x) * y) {
            return Some((a, true, 1.702, 7.0));
        }
        if check(&|x, y| act(a, y) * x) {
            return Some((a, false, 1.702, 7.0));
        }
    }
    // clamped SwiGLU: alpha and limit among the expression's constants (alpha 1 is silu's,
    // which has no constant of its own)
    let mut consts = Vec::new();
    collect_consts(h, &mut consts);
    let mut cands: Vec<f64> = consts.iter().map(|c| c.abs()).filter(|c| *c > 0.0 && c.is_finite()).collect();
    cands.extend([1.0, 1.702, 7.0]);
    cands.sort_by(|a, b| a.partial_cmp(b).unwrap());
    cands.dedup();
    for a in [Activation::SwigluOai, Activation::SwigluLimit] {
        for &alpha in &cands {
            for &limit in &cands {
                let (al, li) = (alpha as f32 as f64, limit as f32 as f64);
                if check(&|x, y| clamped_glu(a, x, y, al, li)) {
                    return Some((a, true, alpha as f32, limit as f32));
                }
                if check(&|x, y| clamped_glu(a, y, x, al, li)) {
                    return Some((a, false, alpha as f32, limit as f32));
                }
            }
        }
    }
    // a 16-bit export's rounded constants put back (see the module's comment)
    identify_gated(&unrounded(h)?, p, q)
}

fn collect_consts(e: &Expr, out: &mut Vec<f64>) {
    match e {
        Expr::Const(c) => out.push(*c),
        Expr::Clip { x, lo, hi } => {
            out.extend(lo.iter().chain(hi.iter()).copied());
            collect_consts(x, out);
        }
        Expr::Op(_, a) => a.iter().for_each(|x| collect_consts(x, out)),
        _ => {}
    }
}

/// The inputs of an elementwise expression: maximal `Lin` / `Slice` / `Leaf` subtrees.
pub fn inputs(e: &Expr, out: &mut Vec<Expr>) {
    match e {
        Expr::Lin { .. } | Expr::Slice { .. } | Expr::Leaf => {
            if !out.contains(e) {
                out.push(e.clone())
            }
        }
        Expr::Op(_, a) => a.iter().for_each(|x| inputs(x, out)),
        Expr::Clip { x, .. } => inputs(x, out),
        Expr::Const(_) => {}
    }
}
