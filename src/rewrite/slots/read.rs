//! The slot algebra's reading of the graph: each op over a bookkeeping value, from the one-hot
//! mask, the running count and the probabilities to the dispatch tensor, as the functions of
//! the rank and slot its parent module defines.

use super::super::matcher::{axes_of, prod};
use super::super::routing::{arange_len, one_hot, uncast};
use super::{zero, Ax, Cmp, Ctx, Extra, Sem, F, R};
use crate::onnx::graph::{attr_i, GraphIndex};

fn broadcast(a: &Sem, b: &Sem) -> R<(Vec<Ax>, Option<i64>)> {
    let n = a.axes.len().max(b.axes.len());
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let x = if i + a.axes.len() >= n { a.axes[i + a.axes.len() - n] } else { Ax::One };
        let y = if i + b.axes.len() >= n { b.axes[i + b.axes.len() - n] } else { Ax::One };
        out.push(match (x, y) {
            (x, y) if x == y => x,
            (Ax::One, y) => y,
            (x, Ax::One) => x,
            (x, y) => return Err(format!("a {x:?} axis meets a {y:?} axis in a broadcast")),
        });
    }
    let slots = match (a.slots, b.slots) {
        (Some(x), Some(y)) if x != y => return Err(format!("slot axes of {x} and {y}")),
        (x, y) => x.or(y),
    };
    Ok((out, slots))
}

fn norm(axis: i64, rank: usize) -> R<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize).ok_or_else(|| format!("axis {axis} of a rank-{rank} value"))
}

/// The meaning of `v` (see the module comment), or why it cannot be told.
pub fn sem(g: &GraphIndex, ctx: &Ctx, v: &str) -> R<Sem> {
    sem_depth(g, ctx, &Extra::default(), v, 0)
}

/// [`sem`] for one choice of a top-2 layer (see [`Extra`]).
pub fn sem_in(g: &GraphIndex, ctx: &Ctx, x: &Extra, v: &str) -> R<Sem> {
    sem_depth(g, ctx, x, v, 0)
}

/// `Some(keepdims)` when `n` is a sum over the tokens of the first choice's one-hot [T, E]:
/// each expert's count of first choices.
fn first_counts(g: &GraphIndex, ctx: &Ctx, x: &Extra, n: &onnx_protobuf::NodeProto) -> Option<bool> {
    let first = x.first.filter(|_| n.op_type == "ReduceSum")?;
    let (i, e) = one_hot(g, n.input.first()?)?;
    let ax = axes_of(g, n)?;
    (uncast(g, &i) == uncast(g, first) && e == ctx.experts && ax.len() == 1 && (ax[0] == 0 || ax[0] == -2)).then(|| attr_i(n, "keepdims").unwrap_or(1) != 0)
}

fn sem_depth(g: &GraphIndex, ctx: &Ctx, x: &Extra, v: &str, depth: usize) -> R<Sem> {
    if depth > 64 {
        return Err("the bookkeeping chain is too deep".into());
    }
    let uc = uncast(g, v);
    // a routing weight the graph computes per token, read as it is
    if x.gates.iter().any(|w| w == v) {
        let axes = match super::super::matcher::rank_of(g, v) {
            Some(1) => vec![Ax::T],
            Some(2) => vec![Ax::T, Ax::One],
            r => return Err(format!("a per-token routing weight of rank {r:?}")),
        };
        return Ok(Sem::new(axes, F::Gate, None, None));
    }
    if let Some((i, e)) = one_hot(g, v) {
        if uncast(g, &i) == uncast(g, ctx.idx) && e == ctx.experts {
            return Ok(Sem::new(vec![Ax::T, Ax::E], F::Const(1.0), Some(F::Const(0.0)), None));
        }
    }
    if ctx.probs.is_some_and(|p| uncast(g, p) == uc) {
        return Ok(Sem::new(vec![Ax::T, Ax::E], F::Gate, None, None));
    }
    if let Some(t) = g.const_tensor(v) {
        let dims = &t.dims;
        if let Some(k) = g.const_scalar(v).filter(|_| dims.iter().all(|&d| d == 1)) {
            return Ok(Sem::new(vec![Ax::One; dims.len()], F::Const(k), None, None));
        }
        if let Some(len) = arange_len(g, v) {
            return Ok(Sem::new(vec![Ax::C], F::Coord, None, Some(len)));
        }
        return Err(format!("'{v}' is a constant tensor of shape {dims:?}"));
    }
    let Some((_, n)) = g.prod(v) else {
        return Err(format!("'{v}' is not computed from the routing"));
    };
    if !n.domain.is_empty() {
        return Err(format!("'{v}' comes from {}::{}", n.domain, n.op_type));
    }
    if let Some(keep) = first_counts(g, ctx, x, n) {
        let axes = if keep { vec![Ax::One, Ax::E] } else { vec![Ax::E] };
        return Ok(Sem::new(axes, F::Offset, None, None));
    }
    let arg = |i: usize| -> R<Sem> { sem_depth(g, ctx, x, n.input.get(i).ok_or("a missing input")?, depth + 1) };
    let binary = |mk: &dyn Fn(F, F) -> F, zero_absorbs: bool| -> R<Sem> {
        let (a, b) = (arg(0)?, arg(1)?);
        let (axes, slots) = broadcast(&a, &b)?;
        // zero times a finite value is zero, known or not
        let other = match (&a.other, &b.other) {
            _ if zero_absorbs && (zero(&a.other) || zero(&b.other)) => Some(F::Const(0.0)),
            (Some(x), Some(y)) => Some(mk(x.clone(), y.clone())),
            _ => None,
        };
        Ok(Sem::new(axes, mk(a.chosen, b.chosen), other, slots))
    };
    let cmp = |op: Cmp, swap: bool| {
        binary(
            &move |x, y| {
                if swap {
                    F::Cmp(op, y.b(), x.b())
                } else {
                    F::Cmp(op, x.b(), y.b())
                }
            },
            false,
        )
    };
    match n.op_type.as_str() {
        "Identity" => arg(0),
        "Cast" => {
            let s = arg(0)?;
            match attr_i(n, "to") {
                Some(9) => {
                    let ne = |f: F| F::Cmp(Cmp::Ne, f.b(), F::Const(0.0).b());
                    Ok(Sem { chosen: ne(s.chosen), other: s.other.map(ne), ..s })
                }
                Some(1 | 10 | 11 | 16) => Ok(s),
                // an integer cast truncates: exact for the integers bookkeeping holds, not for the gate
                Some(6 | 7) if !s.chosen.reads_gate() => Ok(s),
                t => Err(format!("'{v}' is a cast to type {t:?}")),
            }
        }
        "Unsqueeze" => {
            let s = arg(0)?;
            let mut ax = axes_of(g, n).ok_or("an Unsqueeze along computed axes")?;
            let r = s.axes.len() + ax.len();
            for a in ax.iter_mut() {
                *a = norm(*a, r)? as i64;
            }
            ax.sort_unstable();
            let mut axes = s.axes.clone();
            for a in ax {
                axes.insert(a as usize, Ax::One);
            }
            Ok(Sem { axes, ..s })
        }
        "Squeeze" => {
            let s = arg(0)?;
            let ax: Vec<usize> = match axes_of(g, n) {
                Some(a) => a.iter().map(|&a| norm(a, s.axes.len())).collect::<R<_>>()?,
                None => return Err("a Squeeze without axes".into()),
            };
            if ax.iter().any(|&a| s.axes[a] != Ax::One) {
                return Err("a Squeeze of an axis that is not of size 1".into());
            }
            let axes = s.axes.iter().enumerate().filter(|(i, _)| !ax.contains(i)).map(|(_, a)| *a).collect();
            Ok(Sem { axes, ..s })
        }
        "Add" => binary(&|x, y| F::Add(x.b(), y.b()), false),
        "Sub" => binary(&|x, y| F::Add(x.b(), F::Mul(F::Const(-1.0).b(), y.b()).b()), false),
        "Mul" => binary(&|x, y| F::Mul(x.b(), y.b()), true),
        "And" => binary(&|x, y| F::Mul(x.b(), y.b()), true),
        "Or" => binary(&|x, y| F::Max(x.b(), y.b()), false),
        "Max" if n.input.len() == 2 => binary(&|x, y| F::Max(x.b(), y.b()), false),
        "Min" if n.input.len() == 2 => binary(&|x, y| F::Min(x.b(), y.b()), false),
        "Neg" => {
            let s = arg(0)?;
            let neg = |f: F| F::Mul(F::Const(-1.0).b(), f.b());
            Ok(Sem { chosen: neg(s.chosen), other: s.other.map(neg), ..s })
        }
        "Not" => {
            let s = arg(0)?;
            let not = |f: F| F::Cmp(Cmp::Eq, f.b(), F::Const(0.0).b());
            Ok(Sem { chosen: not(s.chosen), other: s.other.map(not), ..s })
        }
        "Less" => cmp(Cmp::Lt, false),
        "Greater" => cmp(Cmp::Lt, true),
        "LessOrEqual" => cmp(Cmp::Le, false),
        "GreaterOrEqual" => cmp(Cmp::Le, true),
        "Equal" => cmp(Cmp::Eq, false),
        "Where" => {
            let (k, a, b) = (arg(0)?, arg(1)?, arg(2)?);
            let (ax1, s1) = broadcast(&k, &a)?;
            let (axes, slots) = broadcast(&Sem::new(ax1, F::Const(0.0), None, s1), &b)?;
            let other = match (k.other, a.other, b.other) {
                (Some(x), Some(y), Some(z)) => Some(F::Where(x.b(), y.b(), z.b())),
                _ => None,
            };
            Ok(Sem::new(axes, F::Where(k.chosen.b(), a.chosen.b(), b.chosen.b()), other, slots))
        }
        "Clip" => {
            let s = arg(0)?;
            let bound = |i: usize| -> R<Option<f64>> {
                match n.input.get(i).filter(|x| !x.is_empty()) {
                    None => Ok(None),
                    Some(x) => g.const_scalar(x).map(Some).ok_or_else(|| "a Clip with a computed bound".to_string()),
                }
            };
            let (lo, hi) = (bound(1)?, bound(2)?);
            let clip = |mut f: F| {
                if let Some(l) = lo {
                    f = F::Max(f.b(), F::Const(l).b());
                }
                if let Some(h) = hi {
                    f = F::Min(f.b(), F::Const(h).b());
                }
                f
            };
            Ok(Sem { chosen: clip(s.chosen), other: s.other.map(clip), ..s })
        }
        "CumSum" => {
            let s = arg(0)?;
            let ax = norm(g.const_scalar(&n.input[1]).ok_or("a CumSum along a computed axis")? as i64, s.axes.len())?;
            let is_mask = s.axes == [Ax::T, Ax::E] && s.chosen.constant() == Some(1.0) && zero(&s.other);
            if !is_mask || s.axes[ax] != Ax::T {
                return Err("a running sum of something else than the expert mask along the tokens".into());
            }
            if attr_i(n, "reverse").unwrap_or(0) != 0 {
                return Err("the running count starts from the last token (ScatterMoE keeps the first tokens of an expert)".into());
            }
            let r = if attr_i(n, "exclusive").unwrap_or(0) != 0 { F::Rank } else { F::Add(F::Rank.b(), F::Const(1.0).b()) };
            Ok(Sem::new(s.axes, r, None, s.slots))
        }
        "ReduceSum" | "ReduceMax" => {
            let s = arg(0)?;
            let ax: Vec<usize> = axes_of(g, n).ok_or("a reduction along computed axes")?.iter().map(|&a| norm(a, s.axes.len())).collect::<R<_>>()?;
            if ax.len() != 1 {
                return Err("a reduction over several axes".into());
            }
            let keep = attr_i(n, "keepdims").unwrap_or(1) != 0;
            let mut axes = s.axes.clone();
            if keep {
                axes[ax[0]] = Ax::One;
            } else {
                axes.remove(ax[0]);
            }
            let (chosen, other) = match (n.op_type.as_str(), s.axes[ax[0]]) {
                ("ReduceSum", Ax::E) => {
                    let o = s.other.ok_or("a sum over the experts of values not known at the experts a token did not choose")?;
                    let f = F::Add(s.chosen.b(), F::Mul(F::Const((ctx.experts - 1) as f64).b(), o.b()).b());
                    (f, None)
                }
                ("ReduceSum", Ax::C) => {
                    let n_slots = s.slots.ok_or("a sum over slots of unknown number")?;
                    (F::SumC(s.chosen.b(), n_slots), s.other.map(|o| F::SumC(o.b(), n_slots)))
                }
                // the largest probability is the one ArgMax chose
                ("ReduceMax", Ax::E) if s.chosen == F::Gate && ctx.probs.is_some_and(|p| uncast(g, p) == uncast(g, &n.input[0])) => (F::Gate, None),
                (op, a) => return Err(format!("a {op} over the {a:?} axis")),
            };
            Ok(Sem::new(axes, chosen, other, s.slots))
        }
        "GatherElements" => {
            // x[t, idx[t]]: the value at the chosen expert
            let s = arg(0)?;
            let ax = norm(attr_i(n, "axis").unwrap_or(0), s.axes.len())?;
            let u = prod(g, &n.input[1], "Unsqueeze").ok_or("a gather at indices other than the routing index")?;
            let at_idx =
                uncast(g, &u.input[0]) == uncast(g, ctx.idx) && axes_of(g, u).is_some_and(|a| a.len() == 1 && norm(a[0], s.axes.len()).ok() == Some(ax));
            if !at_idx || s.axes[ax] != Ax::E || s.axes.len() != 2 {
                return Err("a gather at indices other than the routing index".into());
            }
            let mut axes = s.axes.clone();
            axes[ax] = Ax::One;
            Ok(Sem::new(axes, s.chosen, None, s.slots))
        }
        "OneHot" => {
            let s = arg(0)?;
            let depth = g.const_scalar(&n.input[1]).filter(|d| *d >= 1.0 && d.fract() == 0.0).ok_or("a one-hot of computed depth")? as i64;
            let vals = g.const_f32(&n.input[2]).or_else(|| g.const_i64(&n.input[2]).map(|x| x.iter().map(|&y| y as f32).collect()));
            if vals.as_deref() != Some(&[0.0, 1.0]) || !super::super::matcher::is_last_axis(attr_i(n, "axis").unwrap_or(-1), Some(s.axes.len() + 1)) {
                return Err("a one-hot with other values than [0, 1], or not along a new last axis".into());
            }
            if s.slots.is_some_and(|c| c != depth) {
                return Err("two slot axes".into());
            }
            let mut axes = s.axes.clone();
            axes.push(Ax::C);
            let oh = |f: F| F::OneHot(f.b(), depth);
            Ok(Sem::new(axes, oh(s.chosen), s.other.map(oh), Some(depth)))
        }
        op => Err(format!("'{v}' comes from {op}, which the bookkeeping analysis does not read")),
    }
}
