//! One expert MLP in the op's terms (`ExpertMlp`), read from a parsed expression.

use super::*;

/// One expert MLP in the op's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertMlp {
    /// first projection rows, in order: for gated, gate and up blocks per `glu_layout`
    pub w_in: Vec<WSrc>,
    pub b_in: Vec<Option<BSrc>>,
    pub w_out: WSrc,
    pub b_out: Option<BSrc>,
    pub activation: Activation,
    pub gated: bool,
    pub glu_layout: GluLayout,
    pub alpha: f32,
    pub limit: f32,
    pub f: usize,
    pub d: usize,
}

impl ExpertMlp {
    /// This MLP for expert `e`: stacked weights used by every expert ([`ERef::Each`]) become slice e.
    pub fn for_expert(&self, e: usize) -> ExpertMlp {
        let fix = |r: &mut Option<ERef>| {
            if *r == Some(ERef::Each) {
                *r = Some(ERef::Const(e as i64));
            }
        };
        let mut m = self.clone();
        m.w_in.iter_mut().for_each(|w| fix(&mut w.index));
        fix(&mut m.w_out.index);
        m.b_in.iter_mut().flatten().for_each(|b| fix(&mut b.index));
        m.b_out.iter_mut().for_each(|b| fix(&mut b.index));
        m
    }

    /// The number of experts of the stacked weights used by every expert, if any.
    pub fn each_count(&self, g: &GraphIndex) -> Option<usize> {
        let w = self.w_in.iter().chain([&self.w_out]).find(|w| w.index == Some(ERef::Each))?;
        crate::rewrite::dequant::weight_dims(g, &w.init).map(|d| d[0] as usize)
    }
}

/// Reads `out = Lin(act(...Lin(rows)...))` into an [`ExpertMlp`].
pub fn to_mlp(e: &Expr, d: usize) -> Result<ExpertMlp, String> {
    let Expr::Lin { x: h, w: w_out, b: b_out } = e else {
        return Err("the expert output is not a linear layer".into());
    };
    let mut ins = Vec::new();
    inputs(h, &mut ins);
    let lin_of = |x: &Expr| -> Option<(WSrc, Option<BSrc>)> {
        match x {
            Expr::Lin { x, w, b } if **x == Expr::Leaf => Some((w.clone(), b.clone())),
            _ => None,
        }
    };
    let base = |w: &WSrc, b: &Option<BSrc>, gated: bool, act: Activation, layout: GluLayout, alpha: f32, limit: f32, f: usize| ExpertMlp {
        w_in: vec![w.clone()],
        b_in: vec![b.clone()],
        w_out: w_out.clone(),
        b_out: b_out.clone(),
        activation: act,
        gated,
        glu_layout: layout,
        alpha,
        limit,
        f,
        d,
    };
    let mlp = match ins.as_slice() {
        [a] => {
            let (w, b) = lin_of(a).ok_or("the activation's input is not a linear layer of the token rows")?;
            let act = identify_unary(h, a).ok_or("the activation is not one of silu, gelu, gelu_tanh, relu, relu2")?;
            base(&w, &b, false, act, GluLayout::GateUp, 1.702, 7.0, w.out)
        }
        [p, q] => {
            let (act, p_gate, alpha, limit) =
                identify_gated(h, p, q).ok_or("the gated activation is not act(gate) * up nor a clamped SwiGLU (swiglu_oai, swiglu_limit)")?;
            let (gate, up) = if p_gate { (p, q) } else { (q, p) };
            match (gate, up) {
                (Expr::Slice { x: gx, start: gs, end: ge, step: gst }, Expr::Slice { x: ux, start: us, end: ue, step: ust }) if gx == ux => {
                    let (w, b) = lin_of(gx).ok_or("gate and up are not slices of a linear layer of the token rows")?;
                    let n = w.out;
                    let layout = if *gst == 1 && *ust == 1 && *gs == 0 && *ge == n / 2 && *us == n / 2 && *ue == n && n % 2 == 0 {
                        GluLayout::GateUp
                    } else if *gst == 1 && *ust == 1 && *us == 0 && *ue == n / 2 && *gs == n / 2 && *ge == n && n % 2 == 0 {
                        GluLayout::UpGate
                    } else if *gst == 2 && *ust == 2 && *gs == 0 && *us == 1 && *ge >= n - 1 && *ue >= n && n % 2 == 0 {
                        GluLayout::Interleaved
                    } else {
                        return Err(format!("gate [{gs}..{ge} step {gst}] and up [{us}..{ue} step {ust}] do not split {n} rows in halves or interleaved"));
                    };
                    base(&w, &b, true, act, layout, alpha, limit, n / 2)
                }
                (g, u) => {
                    let (wg, bg) = lin_of(g).ok_or("the gate is not a linear layer of the token rows")?;
                    let (wu, bu) = lin_of(u).ok_or("the up projection is not a linear layer of the token rows")?;
                    if wg.out != wu.out {
                        return Err("gate and up projections differ in width".into());
                    }
                    if bg.is_some() != bu.is_some() {
                        return Err("only one of gate and up has a bias".into());
                    }
                    let f = wg.out;
                    ExpertMlp { w_in: vec![wg, wu], b_in: vec![bg, bu], ..base(&w_out.clone(), &None, true, act, GluLayout::GateUp, alpha, limit, f) }
                }
            }
        }
        _ => return Err(format!("the activation reads {} different inputs", ins.len())),
    };
    if mlp.w_out.inp != mlp.f || mlp.w_out.out != d {
        return Err(format!("second projection is [{}, {}], expected [{d}, {}]", mlp.w_out.out, mlp.w_out.inp, mlp.f));
    }
    Ok(mlp)
}
