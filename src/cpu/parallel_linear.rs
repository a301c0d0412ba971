//! `ParallelLinear` on the CPU.

use super::element::{Element, Indices};
use super::experts::{blocks, gather_rows, gather_tiles, linear_rows, packed_product, tile_offsets, Block, Dest, Shared, SharedOut};
use super::gemm::MatRef;
use super::panels::{Columns, PackedWeights};
use super::tile::Epilogue;
use super::pool::Pool;
use super::quant::Weight;
use super::scratch::Scratch;
use super::routing::{experts_of, group};
use crate::spec::{parallel_linear::{Attrs, NAME}, SpecError};

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
    pub w: Weight<'a, E>,
    pub b: Option<&'a [E]>,
    pub gates: Option<&'a [E]>,
}

/// Computes `Y` as docs/op-spec.md defines it; `y` is sized for the case (gated, grouped or not).
pub fn parallel_linear<E: Element>(pool: &dyn Pool, attrs: &Attrs, s: LinearSizes, inp: &LinearInputs<E>, y: &mut [E]) -> Result<(), SpecError> {
    parallel_linear_with(pool, attrs, s, inp, None, &mut Scratch::default(), y)
}

/// [`parallel_linear`], taking `W` and `b` from `packed` when given (it must have been packed,
/// with [`Columns::Plain`], from `inp`'s `w` and `b`), and its intermediate buffers from `scratch`.
pub fn parallel_linear_with<E: Element>(
    pool: &dyn Pool,
    attrs: &Attrs,
    s: LinearSizes,
    inp: &LinearInputs<E>,
    packed: Option<&PackedWeights>,
    scratch: &mut Scratch,
    y: &mut [E],
) -> Result<(), SpecError> {
    let LinearSizes { tokens, k, experts, d_in, d_out } = s;
    let assignments = tokens * k;
    assert_eq!(inp.x.len(), if attrs.grouped_in { assignments } else { tokens } * d_in);
    inp.w.assert_shape("ParallelLinear W", experts, d_out, d_in);
    if let Some(p) = packed {
        assert!(
            p.fits(experts, d_out, d_in, Columns::Plain) && p.has_bias() == inp.b.is_some() && inp.w.plain().is_some(),
            "ParallelLinear: packed weights of another shape"
        );
    }

    let expert = experts_of(NAME, inp.routing_indices, k, experts)?;
    let routing = group(&expert, experts, None);

    // Input rows in grouped order, then z for every assignment, in grouped order.
    // Input rows a [assignments, d_in] and products z [assignments, d_out], both in grouped order
    // and each written in full before it is read.
    let row_of = |i: usize| if attrs.grouped_in { i } else { routing.order[i] as usize / k };
    let z: &[f32] = match packed {
        Some(p) => {
            // a as the register tiles read it (rows padded to whole tiles)
            let tiled = tile_offsets(&routing);
            let [a, z] = scratch.buffers([*tiled.last().unwrap() * d_in, assignments * d_out]);
            gather_tiles(pool, inp.x, d_in, &routing, &tiled, a, &row_of);
            packed_product(pool, &routing, &tiled, a, p, Epilogue::Linear, Dest::Rows(z));
            z
        }
        None => {
            let [a, z] = scratch.buffers([assignments * d_in, assignments * d_out]);
            gather_rows(pool, inp.x, d_in, a, &row_of);
            let a = &*a;
            let z_out = Shared::new(z, d_out);
            let work = blocks(&routing, d_out);
            pool.for_each(work.len(), &|i| {
                let Block { e, rows: r, cols } = &work[i];
                let a_e = MatRef::new(&a[r.start * d_in..r.end * d_in], r.len(), d_in, d_in);
                let b = inp.b.map(|b| &b[e * d_out..(e + 1) * d_out]);
                // SAFETY: blocks of different tasks do not overlap.
                unsafe { linear_rows(a_e, &inp.w, *e, d_out, b, cols.clone(), &z_out.block(r, cols)) };
            });
            z
        }
    };

    let row = |p: u32| &z[p as usize * d_out..(p as usize + 1) * d_out];
    let y_out = SharedOut::new(y);
    match inp.gates {
        Some(g) => {
            assert_eq!(y_out.len(), tokens * d_out);
            pool.for_each(tokens, &|t| {
                let mut acc = vec![0f32; d_out];
                for j in 0..k {
                    let w = g[t * k + j].to_f32();
                    for (a, &v) in acc.iter_mut().zip(row(routing.pos[t * k + j])) {
                        *a += w * v;
                    }
                }
                // SAFETY: row t belongs to task t only.
                for (yv, a) in unsafe { y_out.row(t, d_out) }.iter_mut().zip(acc) {
                    *yv = E::from_f32(a);
                }
            });
        }
        None => {
            assert_eq!(y_out.len(), assignments * d_out);
            // grouped_out: row p is z[p]; scattered: row t*k+j is z[pos(t, j)].
            pool.for_each(assignments, &|r| {
                let p = if attrs.grouped_out { r as u32 } else { routing.pos[r] };
                // SAFETY: row r belongs to task r only.
                for (yv, &v) in unsafe { y_out.row(r, d_out) }.iter_mut().zip(row(p)) {
                    *yv = E::from_f32(v);
                }
            });
        }
    }
    Ok(())
}
