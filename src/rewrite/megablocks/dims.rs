//! Dimensions in the Megablocks rule: widths, row-keeping Reshapes, flat-address strides and
//! zeros shaped like a value, told in terms of the token count where the shapes are known and
//! as "dimension i of value v" where they are not (the two sides of a comparison then name the
//! same value).


use super::super::matcher::{prod, rank_of, shape_entries};
use super::super::prove::shape::{shape_of, Dim};
use super::super::routing::{row_gather, shape_vector, sym, zeros_shape};
use crate::onnx::graph::{attr_i, GraphIndex};

/// The last entry of a shape vector: a constant, or the last part of a Concat.
pub(super) fn last_entry<'g>(g: &GraphIndex<'g>, v: &'g str) -> Option<Stride<'g>> {
    if let Some(c) = g.const_i64(v) {
        return c.last().map(|&x| Stride::Known(Dim::fixed(x)));
    }
    let cat = prod(g, v, "Concat")?;
    let last = cat.input.last()?;
    match g.const_i64(last) {
        Some(c) => c.last().map(|&x| Stride::Known(Dim::fixed(x))),
        None => stride_of(g, last),
    }
}

/// The width (last dimension) of a value: from its shape, or through row gathers, casts,
/// Flatten and Reshapes to a known last dimension.
pub(super) fn width<'g>(g: &GraphIndex<'g>, v: &'g str) -> Option<Stride<'g>> {
    if let Some(s) = shape_of(g, v) {
        return s.last().map(|&d| Stride::Known(d));
    }
    if let Some((d, _)) = row_gather(g, v) {
        return width(g, d);
    }
    let (_, n) = g.prod(v)?;
    match n.op_type.as_str() {
        "Cast" | "Identity" => width(g, &n.input[0]),
        "Reshape" => last_entry(g, &n.input[1]),
        "Flatten" => {
            let r = rank_of(g, &n.input[0])? as i64;
            (attr_i(n, "axis").unwrap_or(1) == r - 1).then_some(Stride::DimOf(n.input[0].as_str(), r - 1))
        }
        _ => None,
    }
}

/// `v` with Casts and row-keeping Reshapes removed: a Reshape to the input's own shape, or of
/// rows [n, w] to a rank-2 shape of the same width w (the number of rows follows).
pub(super) fn same_shape<'g>(g: &GraphIndex<'g>, v: &'g str) -> &'g str {
    let mut cur = v;
    for _ in 0..8 {
        let Some((_, n)) = g.prod(cur) else { break };
        let keeps = match n.op_type.as_str() {
            "Cast" | "Identity" => true,
            "Reshape" => {
                let (si, so) = (shape_of(g, &n.input[0]), shape_of(g, cur));
                (si.is_some() && si == so)
                    || (rank_of(g, &n.input[0]) == Some(2)
                        && shape_entries(g, &n.input[1]).is_some_and(|e| e.len() == 2)
                        && last_entry(g, &n.input[1]).is_some_and(|w| w != Stride::Known(Dim::fixed(-1)) && Some(w) == width(g, &n.input[0])))
            }
            _ => false,
        };
        if !keeps {
            break;
        }
        cur = &n.input[0];
    }
    cur
}

/// The row stride of a flat address: a dimension told in terms of T, or dimension `axis` of a
/// value read from its shape (`Gather(Shape(v), axis)`) when that value's shape is not known.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Stride<'g> {
    Known(Dim),
    DimOf(&'g str, i64),
}

pub(super) fn stride_of<'g>(g: &GraphIndex<'g>, n: &'g str) -> Option<Stride<'g>> {
    if let Some(d) = sym(g, n) {
        return Some(Stride::Known(d));
    }
    let n = crate::onnx::graph::strip(g, n, &["Cast", "Squeeze", "Unsqueeze", "Reshape", "Identity"]);
    let (_, op) = g.prod(n)?;
    // Gather(Shape(v), i), or the one-entry Slice(Shape(v), i, i + 1 or past the end)
    let (sh, i) = match op.op_type.as_str() {
        "Gather" => (prod(g, &op.input[0], "Shape")?, g.const_i64(&op.input[1]).filter(|i| i.len() == 1)?[0]),
        "Slice" => {
            let sh = prod(g, &op.input[0], "Shape")?;
            let r = rank_of(g, &sh.input[0])? as i64;
            let (a, b) = (g.const_i64(&op.input[1]).filter(|x| x.len() == 1)?[0], g.const_i64(&op.input[2]).filter(|x| x.len() == 1)?[0]);
            let axes_ok = op.input.get(3).is_none_or(|x| x.is_empty() || g.const_i64(x).is_some_and(|v| v == [0]));
            let steps_ok = op.input.get(4).is_none_or(|x| x.is_empty() || g.const_i64(x).is_some_and(|v| v == [1]));
            let a = if a < 0 { a + r } else { a };
            let b = if b < 0 { b + r } else { b.min(r) };
            (axes_ok && steps_ok && b == a + 1).then_some((sh, a))?
        }
        _ => return None,
    };
    if !whole_shape(sh) {
        return None;
    }
    let v = sh.input[0].as_str();
    // a dimension of zeros shaped like y is y's
    let v = zeros_like_of(g, v).unwrap_or(v);
    let r = rank_of(g, v);
    let i = if i < 0 { i + r? as i64 } else { i };
    match shape_of(g, v).and_then(|s| s.get(usize::try_from(i).ok()?).copied()) {
        Some(d) => Some(Stride::Known(d)),
        // the last dimension is the width, however it is told
        None if r.is_some_and(|r| i == r as i64 - 1) => width(g, v).or(Some(Stride::DimOf(v, i))),
        None => Some(Stride::DimOf(v, i)),
    }
}

/// Whether the Reshape target `v` makes a value of `numel` elements into `want` (one entry may be
/// -1, inferred from the others).
pub(super) fn reshapes_to(g: &GraphIndex, v: &str, want: &[Dim]) -> bool {
    let Some(e) = shape_vector(g, v) else { return false };
    e.len() == want.len()
        && e.iter().zip(want).filter(|(a, b)| a != b).all(|(a, _)| *a == Dim::fixed(-1))
        && e.iter().filter(|a| **a == Dim::fixed(-1)).count() <= 1
}

use super::super::routing::whole_shape;

/// The value zeros `v` are shaped like: `ConstantOfShape(Shape(y))` or `Expand(0, Shape(y))`,
/// through zeros shaped like zeros.
pub(super) fn zeros_like_of<'g>(g: &GraphIndex<'g>, v: &'g str) -> Option<&'g str> {
    let sh = prod(g, zeros_shape(g, v)?, "Shape").filter(|s| whole_shape(s))?;
    let y = sh.input[0].as_str();
    Some(zeros_like_of(g, y).unwrap_or(y))
}

/// `v` without an Expand that keeps it: `Expand(y, Shape(z))` with z y itself, zeros like y, or a
/// Slice of those (every dimension of a slice is at most y's, so the broadcast is y's shape or an
/// error at run time, never a larger tensor).
pub(super) fn noop_expand<'g>(g: &GraphIndex<'g>, v: &'g str) -> &'g str {
    let Some(ex) = prod(g, v, "Expand") else { return v };
    let y = ex.input[0].as_str();
    let Some(sh) = prod(g, &ex.input[1], "Shape").filter(|s| whole_shape(s)) else { return v };
    let mut z = sh.input[0].as_str();
    if let Some(sl) = prod(g, z, "Slice") {
        z = sl.input[0].as_str();
    }
    if z == y || zeros_like_of(g, z).is_some_and(|w| same_shape(g, w) == same_shape(g, y)) {
        y
    } else {
        v
    }
}
