//! `ParallelLinear` on the CPU.

use super::element::{Element, Indices};
use super::experts::{for_each_expert, gather_rows, linear};
use super::routing::{experts_of, group};
use crate::spec::{parallel_linear::{Attrs, NAME}, SpecError};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearSizes {
    pub tokens: usize,
    pub k: usize,
    pub experts: usize,
    pub d_in: usize,
    pub d_out: usize,
}

pub struct LinearInputs<'a, E> {
    pub x: &'a [E],
    pub routing_indices: Indices<'a>,
    pub w: &'a [E],
    pub b: Option<&'a [E]>,
    pub gates: Option<&'a [E]>,
}

/// Computes `Y` as docs/op-spec.md defines it; `y` is sized for the case (gated, grouped or not).
pub fn parallel_linear<E: Element>(attrs: &Attrs, s: LinearSizes, inp: &LinearInputs<E>, y: &mut [E]) -> Result<(), SpecError> {
    let LinearSizes { tokens, k, experts, d_in, d_out } = s;
    let assignments = tokens * k;
    assert_eq!(inp.x.len(), if attrs.grouped_in { assignments } else { tokens } * d_in);
    assert_eq!(inp.w.len(), experts * d_out * d_in);

    let expert = experts_of(NAME, inp.routing_indices, k, experts)?;
    let routing = group(&expert, experts, None);

    // z for every assignment, in grouped order.
    let mut z = vec![0f32; assignments * d_out];
    for_each_expert(&routing, d_out, &mut z, |e, rows, out| {
        let m = rows.len();
        let a = if attrs.grouped_in {
            gather_rows(inp.x, d_in, m, |i| rows.start + i)
        } else {
            gather_rows(inp.x, d_in, m, |i| routing.order[rows.start + i] as usize / k)
        };
        let w = &inp.w[e * d_out * d_in..(e + 1) * d_out * d_in];
        linear(m, d_out, d_in, &a, w, inp.b.map(|b| &b[e * d_out..(e + 1) * d_out]), out);
    });

    let row = |p: u32| &z[p as usize * d_out..(p as usize + 1) * d_out];
    match inp.gates {
        Some(g) => {
            assert_eq!(y.len(), tokens * d_out);
            y.par_chunks_mut(d_out).enumerate().for_each(|(t, y_row)| {
                let mut acc = vec![0f32; d_out];
                for j in 0..k {
                    let w = g[t * k + j].to_f32();
                    for (a, &v) in acc.iter_mut().zip(row(routing.pos[t * k + j])) {
                        *a += w * v;
                    }
                }
                for (yv, a) in y_row.iter_mut().zip(acc) {
                    *yv = E::from_f32(a);
                }
            });
        }
        None => {
            assert_eq!(y.len(), assignments * d_out);
            // grouped_out: row p is z[p]; scattered: row t*k+j is z[pos(t, j)].
            y.par_chunks_mut(d_out).enumerate().for_each(|(r, y_row)| {
                let p = if attrs.grouped_out { r as u32 } else { routing.pos[r] };
                for (yv, &v) in y_row.iter_mut().zip(row(p)) {
                    *yv = E::from_f32(v);
                }
            });
        }
    }
    Ok(())
}
