//! Dimensions in terms of the token count T: integer scalars and shape vectors the exporters
//! compute from `Shape()`, read with the shapes `prove/shape.rs` tells.

use super::super::matcher::prod;
use super::super::prove::shape::{shape_of, Dim};
use crate::onnx::graph::{attr_i, GraphIndex};

/// The value of an integer scalar (or [1]) in terms of the token count: constants and the
/// dimensions of values whose shapes are known, through the arithmetic exporters write.
pub fn sym(g: &GraphIndex, v: &str) -> Option<Dim> {
    sym_depth(g, v, 0)
}

fn sym_depth(g: &GraphIndex, v: &str, depth: usize) -> Option<Dim> {
    if let Some(c) = g.const_i64(v) {
        return (c.len() == 1).then(|| Dim::fixed(c[0]));
    }
    if depth > 24 {
        return None;
    }
    let (_, n) = g.prod(v)?;
    let arg = |i: usize| sym_depth(g, n.input.get(i)?, depth + 1);
    match n.op_type.as_str() {
        "Cast" | "Identity" | "Squeeze" | "Unsqueeze" | "Reshape" => arg(0),
        "Shape" => {
            let s = shape_of(g, &n.input[0])?;
            let r = s.len() as i64;
            let cl = |x: i64| (if x < 0 { x + r } else { x }).clamp(0, r) as usize;
            let (a, b) = (cl(attr_i(n, "start").unwrap_or(0)), cl(attr_i(n, "end").unwrap_or(r)));
            (b == a + 1).then(|| s[a])
        }
        "Gather" => {
            let sh = prod(g, &n.input[0], "Shape")?;
            let s = shape_of(g, &sh.input[0])?;
            let i = g.const_i64(&n.input[1]).filter(|i| i.len() == 1)?[0];
            let r = s.len() as i64;
            let start = attr_i(sh, "start").map_or(0, |x| if x < 0 { x + r } else { x });
            let j = if i < 0 { r + i } else { start + i };
            s.get(usize::try_from(j).ok()?).copied()
        }
        "Mul" => {
            let (a, b) = (arg(0)?, arg(1)?);
            (a.t + b.t <= 1).then(|| Dim { t: a.t + b.t, c: a.c * b.c })
        }
        "Add" | "Sub" => {
            // fixed dimensions, or multiples of T alike
            let (a, b) = (arg(0)?, arg(1)?);
            let c = if n.op_type == "Add" { a.c.checked_add(b.c)? } else { a.c.checked_sub(b.c)? };
            (a.t == b.t).then_some(Dim { t: a.t, c })
        }
        "Div" => {
            let (a, b) = (arg(0)?, arg(1)?);
            (b.t == 0 && b.c > 0 && a.c % b.c == 0).then(|| Dim { t: a.t, c: a.c / b.c })
        }
        _ => None,
    }
}

/// A shape vector's entries in terms of the token count: constants, and a Concat of constants,
/// `Shape(x)` slices of values whose shapes are known, and one-entry parts [`sym`] can tell.
pub fn shape_vector(g: &GraphIndex, v: &str) -> Option<Vec<Dim>> {
    if let Some(c) = g.const_i64(v) {
        return Some(c.into_iter().map(Dim::fixed).collect());
    }
    let part = |p: &str| -> Option<Vec<Dim>> {
        if let Some(c) = g.const_i64(p) {
            return Some(c.into_iter().map(Dim::fixed).collect());
        }
        if let Some(sh) = prod(g, p, "Shape") {
            let s = shape_of(g, &sh.input[0])?;
            let r = s.len() as i64;
            let cl = |x: i64| (if x < 0 { x + r } else { x }).clamp(0, r) as usize;
            let (a, b) = (cl(attr_i(sh, "start").unwrap_or(0)), cl(attr_i(sh, "end").unwrap_or(r)));
            return Some(s[a..b.max(a)].to_vec());
        }
        sym(g, p).map(|d| vec![d])
    };
    match prod(g, v, "Concat") {
        Some(cat) => {
            let mut out = Vec::new();
            for p in &cat.input {
                out.extend(part(p)?);
            }
            Some(out)
        }
        None => part(v),
    }
}
