//! `ScatterMoE` on the CPU: the oracle for every other implementation, and the CPU EP kernel.

use super::activation::activate_row;
use super::element::{Element, Indices};
use super::experts::{for_each_expert, gather_rows, linear};
use super::routing::{capacity_keep, experts_of, group, DROPPED};
use crate::spec::{scatter_moe::{Attrs, NAME}, SpecError};
use rayon::prelude::*;

/// The sizes of one call, all known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeSizes {
    pub tokens: usize,
    pub k: usize,
    pub experts: usize,
    pub d: usize,
    pub f: usize,
}

/// The inputs of one call, as the contract lays them out.
pub struct MoeInputs<'a, E> {
    pub x: &'a [E],
    pub routing_weights: &'a [E],
    pub routing_indices: Indices<'a>,
    pub w_in: &'a [E],
    pub w_out: &'a [E],
    pub b_in: Option<&'a [E]>,
    pub b_out: Option<&'a [E]>,
    pub capacity: Option<usize>,
}

/// Computes `Y` exactly as docs/op-spec.md defines it.
pub fn scatter_moe<E: Element>(attrs: &Attrs, s: MoeSizes, inp: &MoeInputs<E>, y: &mut [E]) -> Result<(), SpecError> {
    let MoeSizes { tokens, k, experts, d, f } = s;
    let n = if attrs.gated { 2 * f } else { f };
    assert_eq!(inp.x.len(), tokens * d);
    assert_eq!(inp.routing_weights.len(), tokens * k);
    assert_eq!(inp.routing_indices.len(), tokens * k);
    assert_eq!(inp.w_in.len(), experts * n * d);
    assert_eq!(inp.w_out.len(), experts * d * f);
    assert_eq!(y.len(), tokens * d);

    let expert = experts_of(NAME, inp.routing_indices, k, experts)?;
    let keep = inp.capacity.map(|c| capacity_keep(&expert, k, experts, c, attrs.capacity_order));
    let routing = group(&expert, experts, keep.as_deref());

    // Every kept assignment's expert output o[t, j], in grouped order.
    let mut grouped = vec![0f32; routing.order.len() * d];
    for_each_expert(&routing, d, &mut grouped, |e, rows, out| {
        let m = rows.len();
        let a = gather_rows(inp.x, d, m, |i| routing.order[rows.start + i] as usize / k);
        let mut h_pre = vec![0f32; m * n];
        linear(m, n, d, &a, &inp.w_in[e * n * d..(e + 1) * n * d], inp.b_in.map(|b| &b[e * n..(e + 1) * n]), &mut h_pre);
        let mut h = vec![0f32; m * f];
        for (a_row, h_row) in h_pre.chunks_exact(n).zip(h.chunks_exact_mut(f)) {
            activate_row(attrs, a_row, h_row);
        }
        linear(m, d, f, &h, &inp.w_out[e * d * f..(e + 1) * d * f], inp.b_out.map(|b| &b[e * d..(e + 1) * d]), out);
    });

    // Y[t] = sum_j w[t, j] * o[t, j], one task per token: deterministic, no atomics.
    y.par_chunks_mut(d.max(1)).enumerate().for_each(|(t, y_row)| {
        let mut acc = vec![0f32; d];
        for j in 0..k {
            let p = routing.pos[t * k + j];
            if p == DROPPED {
                continue;
            }
            let w = inp.routing_weights[t * k + j].to_f32();
            let o = &grouped[p as usize * d..(p as usize + 1) * d];
            for (a, &v) in acc.iter_mut().zip(o) {
                *a += w * v;
            }
        }
        for (yv, a) in y_row.iter_mut().zip(acc) {
            *yv = E::from_f32(a);
        }
    });
    Ok(())
}

/// `CapacityMask`: which assignments a capacity keeps (`kept[i]` for flat assignment i).
pub fn capacity_mask(
    attrs: &crate::spec::capacity_mask::Attrs,
    k: usize,
    routing_indices: Indices,
    capacity: usize,
    kept: &mut [bool],
) -> Result<(), SpecError> {
    let expert = experts_of(crate::spec::capacity_mask::NAME, routing_indices, k, attrs.num_experts)?;
    let keep = capacity_keep(&expert, k, attrs.num_experts, capacity, attrs.capacity_order);
    kept.copy_from_slice(&keep);
    Ok(())
}
