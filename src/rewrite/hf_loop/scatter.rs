//! The scatter steps of a per-expert loop: `acc + scatter(token, contribution)` in the forms the
//! exporters write `index_add_`, `index_put_(accumulate=True)` and `scatter_add_`, and what their
//! indices and updates must be for each updated row to go, whole, to its token.

use super::super::matcher::{axes_of, prod, rank_of};
pub(super) use super::super::routing::is_zeros;
use crate::onnx::graph::{attr_i, strip, GraphIndex};

/// One `acc + scatter(token, contribution)` step.
pub(super) struct Step {
    pub(super) acc_in: String,
    pub(super) acc_out: String,
    pub(super) index: String,
    pub(super) update: String,
    /// the scatter has no reduction (TorchScript's `index_add_`): of rows scattered to one token
    /// in one step, only one is kept
    pub(super) overwrites: bool,
    /// ScatterElements (indices and updates of one shape, by the ONNX spec), not ScatterND
    pub(super) elements: bool,
}

/// The scatter's index under its Expand and Cast: the Expand must broadcast the token column to
/// exactly the scattered update's shape (`Shape(update)`), so that each updated row goes to its
/// token. For ScatterElements (`elements`) the ONNX spec requires indices of the updates' own
/// shape, so a token column [n, 1] expanded to any shape (`tok.unsqueeze(1).expand(-1, d)`, the
/// index of `scatter_add_`) is, wherever the graph runs, that column broadcast along the row: each
/// updated row goes to its token. Any other shape is not explained.
pub(super) fn index_rows<'a>(g: &GraphIndex<'a>, index: &'a str, update: &str, elements: bool) -> Result<&'a str, String> {
    let mut cur = index;
    for _ in 0..16 {
        match g.prod(cur) {
            Some((_, n)) if n.op_type == "Cast" && n.domain.is_empty() => cur = &n.input[0],
            Some((_, n)) if n.op_type == "Expand" && n.domain.is_empty() && n.input.len() == 2 => {
                let sh = prod(g, &n.input[1], "Shape").filter(|sh| sh.attribute.is_empty() && sh.input.first().map(String::as_str) == Some(update));
                let column = elements && column_of_rank1(g, strip(g, &n.input[0], &["Cast"]));
                if sh.is_none() && !column {
                    return Err("the scatter indices are expanded to a shape other than the scattered value's".into());
                }
                cur = &n.input[0];
            }
            _ => break,
        }
    }
    Ok(cur)
}

/// `v = Unsqueeze(x, 1 or -1)` of a rank-1 x: a column [n, 1].
fn column_of_rank1(g: &GraphIndex, v: &str) -> bool {
    prod(g, v, "Unsqueeze").is_some_and(|u| {
        let ax = axes_of(g, u);
        matches!(ax.as_deref(), Some([1]) | Some([-1])) && rank_of(g, &u.input[0]) == Some(1)
    })
}

/// The scattered value under Expand / Cast / Identity. An Expand must provably keep its input's
/// shape: to all ones, or to `Shape(zeros[..1, ..])` (TorchScript's index_add_ writes
/// `Expand(v, Shape(Slice(zeros or the accumulator, 0, 1 on axis 0, everything on axis 1)))`,
/// i.e. `[1, d]`), which
/// broadcasting a `[n, d]` value leaves as it is. A shape that could repeat rows is not explained.
pub(super) fn update_value<'a>(g: &GraphIndex<'a>, update: &'a str, acc: &str, step_index: &str, elements: bool) -> Result<(&'a str, Option<i64>), String> {
    // TorchScript's scatter_add_: the rows sliced to the index's shape, `Slice(y, [0, 0],
    // Shape(index), [0, 1])`. ScatterElements needs updates of the index's shape, so wherever the
    // graph runs the slice is y itself exactly when the index is as wide as y: the caller checks
    // that width (returned) against the experts' output width
    if let Some(sl) = prod(g, update, "Slice").filter(|_| elements) {
        let zero_starts = g.const_i64(&sl.input[1]).is_some_and(|v| v.len() == 2 && v.iter().all(|&x| x == 0));
        let to_index = prod(g, &sl.input[2], "Shape").is_some_and(|sh| sh.attribute.is_empty() && sh.input[0] == step_index);
        // axes [0, 1], or absent (every axis in order: [0, 1] for the two starts)
        let axes = sl.input.get(3).filter(|a| !a.is_empty()).is_none_or(|a| g.const_i64(a).is_some_and(|a| a == [0, 1]));
        let steps = sl.input.get(4).is_none_or(|x| x.is_empty() || g.const_i64(x).is_some_and(|x| x.iter().all(|&v| v == 1)));
        if !(zero_starts && to_index && axes && steps) {
            return Err("the scattered value is sliced to a shape that is not the scatter index's".into());
        }
        let width = expanded_width(g, step_index).ok_or("the scatter index is expanded to a width that cannot be told")?;
        let (v, _) = update_value(g, &sl.input[0], acc, step_index, elements)?;
        return Ok((v, Some(width)));
    }
    // ScatterND's updates must be indices.shape[:-1] + data.shape[1:]: TorchScript's index_put_
    // reshapes the rows to `Concat(Shape(token), Shape(data)[1:])`, which for rows [n, d] into
    // [T, d] is the rows' own shape wherever the graph runs
    let update = match prod(g, update, "Reshape") {
        Some(r) if !elements && rows_to_scatter_shape(g, &r.input[1], acc) => r.input[0].as_str(),
        _ => update,
    };
    let keeps = |shape: &str| -> bool {
        if let Some(c) = g.const_i64(shape) {
            return c.iter().all(|&v| v == 1);
        }
        let Some(sh) = prod(g, shape, "Shape").filter(|sh| sh.attribute.is_empty()) else { return false };
        let Some(sl) = prod(g, &sh.input[0], "Slice") else { return false };
        // sliced from zeros, or from the accumulator (shaped like them) in later iterations
        if (prod(g, &sl.input[0], "ConstantOfShape").is_none() && sl.input[0] != acc) || sl.input.len() < 4 {
            return false;
        }
        let (Some(starts), Some(ends), Some(axes)) = (g.const_i64(&sl.input[1]), g.const_i64(&sl.input[2]), g.const_i64(&sl.input[3])) else {
            return false;
        };
        let steps_ok = sl.input.get(4).is_none_or(|st| g.const_i64(st).is_some_and(|v| v.iter().all(|&x| x == 1)));
        steps_ok && starts.len() == ends.len() && axes == [0, 1] && starts.iter().all(|&v| v == 0) && ends[0] == 1 && ends[1] >= i64::MAX / 2
    };
    let mut cur = update;
    for _ in 0..16 {
        match g.prod(cur) {
            Some((_, n)) if (n.op_type == "Cast" || n.op_type == "Identity") && n.domain.is_empty() => cur = &n.input[0],
            Some((_, n)) if n.op_type == "Expand" && n.domain.is_empty() && n.input.len() == 2 => {
                if !keeps(&n.input[1]) {
                    return Err("the scattered value is expanded to a shape that is not proven to keep it".into());
                }
                cur = &n.input[0];
            }
            _ => break,
        }
    }
    Ok((cur, None))
}

/// The width (last dimension) a token column is expanded to: `Expand(Unsqueeze(tok, 1), S)` with S
/// a constant, a shape vector [`super::super::routing::shape_vector`] reads, or TorchScript's
/// `expand(-1, d)`: `Where(Equal(R, -1), ones, R)` (a -1 kept as 1) over such an R.
fn expanded_width(g: &GraphIndex, index: &str) -> Option<i64> {
    let ex = prod(g, strip(g, index, &["Cast"]), "Expand")?;
    // the shape [a, w]: a must broadcast the column's n rows to themselves (1, or -1 where the
    // Where below makes it 1), so only w is read
    let last = |v: &str, minus_one_ok: bool| -> Option<i64> {
        let r = strip(g, v, &["Cast"]);
        let r = match prod(g, r, "Reshape") {
            Some(rs) if g.const_i64(&rs.input[1]).is_some_and(|t| t == [-1]) => rs.input[0].as_str(),
            _ => r,
        };
        let sv = super::super::routing::shape_vector(g, r)?;
        let rows_kept = sv.len() == 2 && sv[0].t == 0 && (sv[0].c == 1 || (minus_one_ok && sv[0].c == -1));
        rows_kept.then_some(())?;
        sv.last().filter(|d| d.t == 0).map(|d| d.c)
    };
    let s = ex.input[1].as_str();
    let w = match prod(g, s, "Where") {
        Some(wh) => {
            // Where(Equal(R, -1 * ones), ones, R): the -1 entries become 1, the others stay
            let eq = prod(g, &wh.input[0], "Equal")?;
            let minus_one = |v: &str| g.const_scalar(v) == Some(-1.0) || prod(g, v, "Mul").is_some_and(|m| {
                [(0, 1), (1, 0)].iter().any(|&(a, b)| super::super::routing::is_ones(g, &m.input[a]) && g.const_scalar(&m.input[b]) == Some(-1.0))
            });
            let same_r = |v: &str| strip(g, v, &["Cast"]) == strip(g, &wh.input[2], &["Cast"]);
            let ok = [(0, 1), (1, 0)].iter().any(|&(a, b)| same_r(&eq.input[a]) && minus_one(&eq.input[b])) && super::super::routing::is_ones(g, &wh.input[1]);
            if !ok {
                return None;
            }
            let w = last(&wh.input[2], true)?;
            if w == -1 { 1 } else { w }
        }
        None => last(s, false)?,
    };
    (w >= 1).then_some(w)
}

/// `Concat(Shape(x), Slice(Shape(z), [1], [end]))` with x rank 1 and z zeros or the accumulator
/// (shaped like them): [len(x)] + the accumulator's trailing dimensions.
fn rows_to_scatter_shape(g: &GraphIndex, v: &str, acc: &str) -> bool {
    super::super::routing::rows_with_tail_of(g, v).is_some_and(|(rows, data)| rank_of(g, rows) == Some(1) && (is_zeros(g, data) || data == acc))
}


pub(super) fn scatter_steps(g: &GraphIndex) -> Vec<Step> {
    let mut steps = Vec::new();
    for n in &g.graph.node {
        if n.op_type == "Add" && n.domain.is_empty() && n.input.len() == 2 {
            // acc + a scatter without a reduction into zeros: TorchScript's `index_add_`
            // (ScatterElements along axis 0) and `index_put_(.., accumulate=True)` (ScatterND)
            let into_zeros = |v: &str| -> Option<(&onnx_protobuf::NodeProto, bool)> {
                let (_, sc) = g.prod(v)?;
                let elements = match sc.op_type.as_str() {
                    "ScatterElements" if attr_i(sc, "axis").unwrap_or(0) == 0 => true,
                    "ScatterND" => false,
                    _ => return None,
                };
                let red = crate::onnx::graph::attr_s(sc, "reduction").unwrap_or_else(|| "none".into());
                (red == "none" && is_zeros(g, &sc.input[0])).then_some((sc, elements))
            };
            for (a, s) in [(0, 1), (1, 0)] {
                if let Some((sc, elements)) = into_zeros(&n.input[s]) {
                    steps.push(Step {
                        acc_in: n.input[a].clone(),
                        acc_out: n.output[0].clone(),
                        index: sc.input[1].clone(),
                        update: sc.input[2].clone(),
                        overwrites: true,
                        elements,
                    });
                    break;
                }
            }
        } else if n.domain.is_empty() && (n.op_type == "ScatterND" || (n.op_type == "ScatterElements" && attr_i(n, "axis").unwrap_or(0) == 0)) {
            // a scatter that adds into the accumulator itself: ScatterElements along axis 0, or the
            // dynamo exporter's index_add_ as ScatterND (`data[i[j, 0], :] += u[j, :]`, indices [n, 1])
            if crate::onnx::graph::attr_s(n, "reduction").unwrap_or_default() == "add" {
                steps.push(Step {
                    acc_in: n.input[0].clone(),
                    acc_out: n.output[0].clone(),
                    index: n.input[1].clone(),
                    update: n.input[2].clone(),
                    overwrites: false,
                    elements: n.op_type == "ScatterElements",
                });
            }
        }
    }
    steps
}
