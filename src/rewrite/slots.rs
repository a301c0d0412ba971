//! What the bookkeeping tensors of a routed layer hold, token by token, whatever ops spell them.
//!
//! Capacity layers (Switch, GShard) and Megablocks-style bins address a token by its *rank*: how
//! many earlier tokens chose the same expert. People compute it many ways (`cumsum(mask) * mask -
//! 1` summed over experts plus E - 1, an exclusive count `(cumsum - mask) * mask`, a gather of
//! `cumsum - 1` at the chosen expert, ...) and build the dispatch from it many ways (a clipped
//! one-hot over slots times a kept mask, an unclipped one-hot that drops by itself, comparisons
//! with an arange). Instead of one pattern per spelling, this module evaluates the graph
//! symbolically: every value over the token (T), expert (E) and slot (C) axes becomes a function
//! `F(r, c)` of the token's rank r and the slot c, at the expert the token chose ("chosen") and
//! at the experts it did not ("other", a function too, or unknown). The one-hot mask of the
//! routing index is (1, 0); `CumSum` of it along tokens is (r + 1, unknown); the chosen
//! expert's probability is the symbol `Gate`. Elementwise ops, reductions over experts, gathers at
//! the chosen expert, one-hots and comparisons combine these functions exactly.
//!
//! The functions are piecewise affine in r with integer slopes (anything else is refused), so
//! two of them agree for every rank once they agree on every rank up to beyond their last
//! breakpoint, which [`bound`] computes from the constants: [`assignment`] checks a dispatch
//! tensor that way, for every rank and slot.

use crate::onnx::graph::GraphIndex;

/// An axis of a bookkeeping tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ax {
    /// tokens (the rows the rank counts over)
    T,
    /// experts
    E,
    /// buffer slots
    C,
    /// a broadcast axis of size 1
    One,
}

/// A value as a function of the rank r and the slot c.
#[derive(Debug, Clone, PartialEq)]
pub enum F {
    Const(f64),
    Rank,
    /// a second choice's offset: how many first choices its expert has (see [`offset`]); it
    /// evaluates to 0, which is exact once [`offset::through_sum`] has shown that the value
    /// reads the rank and the offset only through their sum (the rank is then that sum)
    Offset,
    Coord,
    Gate,
    Add(Box<F>, Box<F>),
    Mul(Box<F>, Box<F>),
    Max(Box<F>, Box<F>),
    Min(Box<F>, Box<F>),
    /// 1 when the comparison holds, else 0
    Cmp(Cmp, Box<F>, Box<F>),
    /// ONNX OneHot at slot c: 1 when c equals the index (a negative index counts from the back),
    /// 0 for an index outside [-depth, depth)
    OneHot(Box<F>, i64),
    Where(Box<F>, Box<F>, Box<F>),
    /// the sum over the slots 0..C
    SumC(Box<F>, i64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Lt,
    Le,
    Eq,
    Ne,
}

/// A value `coef * gate^pow`: the products and sums the bookkeeping makes of the gate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mono {
    pub coef: f64,
    pub pow: u32,
}

impl F {
    fn b(self) -> Box<F> {
        Box::new(self)
    }

    /// The value at rank r and slot c.
    pub fn eval(&self, r: i64, c: i64) -> Option<Mono> {
        let num = |f: &F| f.eval(r, c).filter(|m| m.pow == 0 || m.coef == 0.0).map(|m| m.coef);
        let mono = |coef| Some(Mono { coef, pow: 0 });
        match self {
            F::Const(k) => mono(*k),
            F::Rank => mono(r as f64),
            F::Offset => mono(0.0),
            F::Coord => mono(c as f64),
            F::Gate => Some(Mono { coef: 1.0, pow: 1 }),
            F::Add(a, b) => {
                let (x, y) = (a.eval(r, c)?, b.eval(r, c)?);
                if x.coef == 0.0 {
                    Some(y)
                } else if y.coef == 0.0 || x.pow == y.pow {
                    Some(Mono { coef: x.coef + y.coef, pow: x.pow })
                } else {
                    None
                }
            }
            F::Mul(a, b) => {
                let (x, y) = (a.eval(r, c)?, b.eval(r, c)?);
                let coef = x.coef * y.coef;
                Some(Mono { coef, pow: if coef == 0.0 { 0 } else { x.pow + y.pow } })
            }
            F::Max(a, b) => mono(num(a)?.max(num(b)?)),
            F::Min(a, b) => mono(num(a)?.min(num(b)?)),
            F::Cmp(op, a, b) => {
                let (x, y) = (num(a)?, num(b)?);
                mono(match op {
                    Cmp::Lt => x < y,
                    Cmp::Le => x <= y,
                    Cmp::Eq => x == y,
                    Cmp::Ne => x != y,
                } as i64 as f64)
            }
            F::OneHot(a, depth) => {
                let x = num(a)?;
                if x.fract() != 0.0 {
                    return None;
                }
                let i = x as i64;
                let i = if i < 0 { i + depth } else { i };
                mono(((0..*depth).contains(&i) && i == c) as i64 as f64)
            }
            F::Where(k, a, b) => {
                if num(k)? != 0.0 {
                    a.eval(r, c)
                } else {
                    b.eval(r, c)
                }
            }
            F::SumC(a, n) => {
                let mut acc = Mono { coef: 0.0, pow: 0 };
                for cc in 0..*n {
                    let m = a.eval(r, cc)?;
                    if m.coef != 0.0 {
                        if acc.coef != 0.0 && acc.pow != m.pow {
                            return None;
                        }
                        acc = Mono { coef: acc.coef + m.coef, pow: m.pow };
                    }
                }
                Some(acc)
            }
        }
    }

    /// Whether this is the gate itself at every rank (say `gate * 1 + (E - 1) * 0`, a masked sum).
    pub fn is_gate(&self) -> bool {
        let Some(upto) = bound(self, 1) else { return false };
        (0..=upto).all(|r| self.eval(r, 0) == Some(Mono { coef: 1.0, pow: 1 }))
    }

    /// The constant this is when it reads neither the rank, the slot nor the gate.
    pub fn constant(&self) -> Option<f64> {
        if self.reads_any() {
            return None;
        }
        self.eval(0, 0).filter(|m| m.pow == 0).map(|m| m.coef)
    }

    fn reads_any(&self) -> bool {
        match self {
            F::Const(_) => false,
            F::Rank | F::Offset | F::Coord | F::Gate => true,
            F::Add(a, b) | F::Mul(a, b) | F::Max(a, b) | F::Min(a, b) | F::Cmp(_, a, b) => a.reads_any() || b.reads_any(),
            F::OneHot(a, _) | F::SumC(a, _) => a.reads_any(),
            F::Where(k, a, b) => k.reads_any() || a.reads_any() || b.reads_any(),
        }
    }

    fn reads_gate(&self) -> bool {
        match self {
            F::Gate => true,
            F::Const(_) | F::Rank | F::Offset | F::Coord => false,
            F::Add(a, b) | F::Mul(a, b) | F::Max(a, b) | F::Min(a, b) | F::Cmp(_, a, b) => a.reads_gate() || b.reads_gate(),
            F::OneHot(a, _) | F::SumC(a, _) => a.reads_gate(),
            F::Where(k, a, b) => k.reads_gate() || a.reads_gate() || b.reads_gate(),
        }
    }

    /// Whether this only takes the values 0 and 1 (a comparison or one-hot, or products of them).
    fn indicator(&self) -> bool {
        match self {
            F::Cmp(..) | F::OneHot(..) => true,
            F::Const(k) => *k == 0.0 || *k == 1.0,
            F::Mul(a, b) | F::Min(a, b) | F::Max(a, b) => a.indicator() && b.indicator(),
            F::Where(_, a, b) => a.indicator() && b.indicator(),
            _ => false,
        }
    }
}

/// (degree, magnitude, breakpoint bound) of a function; see [`shape_of`].
type Shape = (u32, f64, f64);

/// (degree in r, magnitude bound, breakpoint bound) of `f`, or None when f is not piecewise
/// affine in r with integer slopes. Every breakpoint (where a comparison, one-hot or clip of an
/// affine piece changes) lies at a rank below the breakpoint bound: an affine `a r + b` with an
/// integer a != 0 and |b| <= m meets a constant of magnitude <= m' at |r| <= m + m'.
fn shape_of(f: &F, slots: i64) -> Option<Shape> {
    let bin = |a: &F, b: &F| -> Option<(Shape, Shape)> { Some((shape_of(a, slots)?, shape_of(b, slots)?)) };
    Some(match f {
        F::Const(k) => (0, k.abs().max(1.0), 0.0),
        F::Rank => (1, 1.0, 0.0),
        // evaluated as the constant 0
        F::Offset => (0, 1.0, 0.0),
        F::Coord => (0, slots as f64, 0.0),
        F::Gate => (0, 1.0, 0.0),
        F::Add(a, b) | F::Max(a, b) | F::Min(a, b) => {
            let ((da, ma, pa), (db, mb, pb)) = bin(a, b)?;
            let bp = if matches!(f, F::Add(..)) { 0.0 } else { ma + mb };
            (da.max(db), ma + mb, pa.max(pb).max(bp))
        }
        F::Mul(a, b) => {
            let ((da, ma, pa), (db, mb, pb)) = bin(a, b)?;
            let deg = if a.indicator() {
                db
            } else if b.indicator() {
                da
            } else {
                da + db
            };
            // a slope times a non-integer constant could break between integers
            let int_scale = |x: &F, d: u32| d == 0 || x.constant().is_none_or(|k| k.fract() == 0.0);
            if deg > 1 || !int_scale(a, db) || !int_scale(b, da) {
                return None;
            }
            (deg, ma * mb, pa.max(pb))
        }
        F::Cmp(_, a, b) => {
            let ((da, ma, pa), (db, mb, pb)) = bin(a, b)?;
            if da > 1 || db > 1 {
                return None;
            }
            (0, 1.0, pa.max(pb).max(ma + mb))
        }
        F::OneHot(a, depth) => {
            let (da, ma, pa) = shape_of(a, slots)?;
            if da > 1 {
                return None;
            }
            (0, 1.0, pa.max(ma + 2.0 * *depth as f64))
        }
        F::Where(k, a, b) => {
            let (_, _, pk) = shape_of(k, slots)?;
            let ((da, ma, pa), (db, mb, pb)) = bin(a, b)?;
            if !k.indicator() {
                return None;
            }
            (da.max(db), ma.max(mb), pk.max(pa).max(pb))
        }
        F::SumC(a, n) => {
            let (da, ma, pa) = shape_of(a, slots)?;
            (da, ma * *n as f64, pa)
        }
    })
}

/// The rank up to which two piecewise-affine functions over `slots` slots must be compared so
/// that they agree everywhere (two ranks beyond the last breakpoint), or None past 2^16.
pub fn bound(f: &F, slots: i64) -> Option<i64> {
    let (_, _, bp) = shape_of(f, slots)?;
    let b = bp.ceil() as i64 + slots + 2;
    (b <= 1 << 16).then_some(b)
}

/// A bookkeeping tensor: its axes, its value at the chosen expert, and at the others (None:
/// unknown, but finite).
#[derive(Debug, Clone)]
pub struct Sem {
    pub axes: Vec<Ax>,
    pub chosen: F,
    pub other: Option<F>,
    /// the length of the slot axis, once one is seen
    pub slots: Option<i64>,
}

impl Sem {
    fn new(axes: Vec<Ax>, chosen: F, other: Option<F>, slots: Option<i64>) -> Sem {
        // a value without an expert axis is the same at every expert
        let other = if axes.contains(&Ax::E) { other } else { Some(chosen.clone()) };
        Sem { axes, chosen, other, slots }
    }
}

/// What the analysis starts from: the routing index (one expert per token, [T]), the
/// probabilities it was chosen from (for the gate), and the number of experts.
pub struct Ctx<'a> {
    pub idx: &'a str,
    pub probs: Option<&'a str>,
    pub experts: i64,
}

/// What a top-2 layer adds to the analysis of one of its choices.
#[derive(Default, Clone, Copy)]
pub struct Extra<'a> {
    /// for the second choice: the first choice's index, whose one-hot summed over the tokens
    /// is the offset [`F::Offset`] (each expert's count of first choices)
    pub first: Option<&'a str>,
    /// per-token values [T] (or [T, 1]) read as the symbol [`F::Gate`] whatever computes them:
    /// the routing weights the graph computes, which the op then reads as they are
    pub gates: &'a [String],
}

type R<T> = Result<T, String>;

pub mod offset;
mod read;
pub use read::{sem, sem_in};

fn zero(f: &Option<F>) -> bool {
    f.as_ref().and_then(F::constant) == Some(0.0)
}

/// How a dispatch (or combine) tensor [T, E, C] places tokens: the token of rank r goes to slot
/// `slot[r]` for r < kept and nowhere after.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub slots: i64,
    pub slot: Vec<i64>,
    /// whether each placed entry is the gate (a combine tensor) rather than 1 (a dispatch)
    pub gated: bool,
}

impl Assignment {
    /// The number of tokens of one expert kept.
    pub fn kept(&self) -> i64 {
        self.slot.len() as i64
    }
}

/// Reads `v` as a dispatch (`gated` false: entries 0 or 1) or combine (`gated`: entries 0 or
/// the gate) tensor [T, E, C] and says where it places each rank.
pub fn assignment(g: &GraphIndex, ctx: &Ctx, v: &str, gated: bool) -> R<Assignment> {
    assignment_in(g, ctx, &Extra::default(), v, gated)
}

/// [`assignment`] of one choice of a top-2 layer. For the second choice (`x.first`) the rank
/// is its rank in slot-major order, the first choices' count at its expert plus its rank among
/// the second choices: the value must read the two only through their sum.
pub fn assignment_in(g: &GraphIndex, ctx: &Ctx, x: &Extra, v: &str, gated: bool) -> R<Assignment> {
    let s = sem_in(g, ctx, x, v)?;
    if x.first.is_some() && !offset::through_sum(&s.chosen) {
        return Err("the second choice's slot does not read its rank among the second choices plus its expert's count of first choices \
                    (without that offset a first and a second choice of one expert share slots)"
            .into());
    }
    if s.axes != [Ax::T, Ax::E, Ax::C] {
        return Err(format!("the tensor's axes are {:?}, not tokens x experts x slots", s.axes));
    }
    let slots = s.slots.ok_or("no slot axis")?;
    if !zero(&s.other) {
        return Err("the tensor is not zero at the experts a token did not choose".into());
    }
    let upto = bound(&s.chosen, slots).ok_or("the slot arithmetic is not piecewise affine in the rank")?;
    let mut placed: Vec<Option<i64>> = Vec::new();
    for r in 0..=upto {
        let mut at = None;
        for c in 0..slots {
            let m = s.chosen.eval(r, c).ok_or("the slot arithmetic cannot be evaluated")?;
            if m.coef == 0.0 {
                continue;
            }
            if m.coef != 1.0 || m.pow != gated as u32 {
                let what = if gated { "the gate" } else { "1" };
                return Err(format!("the token of rank {r} is placed with weight {}*gate^{} instead of {what}", m.coef, m.pow));
            }
            if at.is_some() {
                return Err(format!("the token of rank {r} is placed in two slots"));
            }
            at = Some(c);
        }
        placed.push(at);
    }
    let kept = placed.iter().position(Option::is_none).unwrap_or(placed.len());
    if let Some(r) = placed[kept..].iter().position(Option::is_some) {
        return Err(format!("tokens of rank {} are kept after those of rank {kept} are dropped (ScatterMoE keeps the first tokens of an expert)", kept + r));
    }
    let slot: Vec<i64> = placed[..kept].iter().map(|x| x.unwrap()).collect();
    for (i, a) in slot.iter().enumerate() {
        if let Some(j) = slot[..i].iter().position(|b| b == a) {
            return Err(format!("the tokens of rank {j} and {i} of one expert share slot {a} (the buffer keeps one of them)"));
        }
    }
    Ok(Assignment { slots, slot, gated })
}

/// Whether `v` holds, per row, its rank: the number of earlier rows whose index `ctx.idx` is the
/// same (the position of a row in its expert's bin).
pub fn is_rank(g: &GraphIndex, ctx: &Ctx, v: &str) -> R<()> {
    let s = sem(g, ctx, v)?;
    if !(s.axes == [Ax::T] || s.axes == [Ax::T, Ax::One]) {
        return Err(format!("positions with axes {:?}", s.axes));
    }
    let upto = bound(&s.chosen, 1).ok_or("the position arithmetic is not piecewise affine in the rank")?;
    for r in 0..=upto {
        if s.chosen.eval(r, 0) != Some(Mono { coef: r as f64, pow: 0 }) {
            return Err(format!("the position of the row of rank {r} is not {r}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piecewise_affine_bounds_cover_the_breakpoints() {
        // [clip(r, 0, 2) == c] * [r < 3]
        let slot = F::OneHot(F::Min(F::Max(F::Rank.b(), F::Const(0.0).b()).b(), F::Const(2.0).b()).b(), 3);
        let kept = F::Cmp(Cmp::Lt, F::Rank.b(), F::Const(3.0).b());
        let d = F::Mul(slot.b(), kept.b());
        let b = bound(&d, 3).unwrap();
        assert!(b >= 5, "{b}");
        assert_eq!(d.eval(1, 1).unwrap().coef, 1.0);
        assert_eq!(d.eval(4, 2).unwrap().coef, 0.0);
        // r * r is not piecewise affine
        assert!(bound(&F::Mul(F::Rank.b(), F::Rank.b()), 1).is_none());
        // r / 2 (a non-integer slope) is refused too
        assert!(bound(&F::Mul(F::Const(0.5).b(), F::Rank.b()), 1).is_none());
    }

    #[test]
    fn gate_powers() {
        let f = F::Mul(F::Gate.b(), F::Cmp(Cmp::Lt, F::Rank.b(), F::Const(2.0).b()).b());
        assert_eq!(f.eval(1, 0), Some(Mono { coef: 1.0, pow: 1 }));
        assert_eq!(f.eval(2, 0), Some(Mono { coef: 0.0, pow: 0 }));
        // a gate added to a constant is not one monomial
        assert_eq!(F::Add(F::Gate.b(), F::Const(1.0).b()).eval(0, 0), None);
    }
}
