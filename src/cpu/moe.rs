//! `ScatterMoE` on the CPU: the CPU EP kernel, and the f32 reference the GPU paths are compared with.

use super::activation::activate_row;
use super::element::{Element, Indices};
use super::experts::{blocks, gather_rows, gather_tiles, linear_rows, packed_product, tile_offsets, Block, Dest, Shared, SharedOut};
use super::gemm::MatRef;
use super::panels::{Columns, PackedWeights};
use super::tile::Epilogue;
use super::pool::Pool;
use super::quant::Weight;
use super::scratch::Scratch;
use super::routing::{capacity_keep, experts_of, group, Routing, DROPPED};
use crate::spec::{scatter_moe::{Attrs, NAME}, GluLayout, SpecError};

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
    pub w_in: Weight<'a, E>,
    pub w_out: Weight<'a, E>,
    pub b_in: Option<&'a [E]>,
    pub b_out: Option<&'a [E]>,
    pub capacity: Option<usize>,
}

/// Both projections of a node, packed once (see [`PackedWeights`]) when its weights are constant
/// and in `T` (quantized weights are not packed: the packed copy is f32, a whole dequantized copy).
pub struct PackedMoe {
    w_in: PackedWeights,
    w_out: PackedWeights,
}

impl PackedMoe {
    /// Packs `w_in`, `w_out` and the biases of a node with these attributes; None where the
    /// machine has no packed path.
    #[allow(clippy::too_many_arguments)]
    pub fn new<E: Element>(
        attrs: &Attrs,
        experts: usize,
        d: usize,
        f: usize,
        w_in: &[E],
        w_out: &[E],
        b_in: Option<&[E]>,
        b_out: Option<&[E]>,
    ) -> Option<Self> {
        let (n, columns) = in_layout(attrs, f);
        Some(PackedMoe {
            w_in: PackedWeights::new(w_in, b_in, experts, n, d, columns)?,
            w_out: PackedWeights::new(w_out, b_out, experts, d, f, Columns::Plain)?,
        })
    }
}

/// Rows of `w_in` per expert, and how its panels pair them.
fn in_layout(attrs: &Attrs, f: usize) -> (usize, Columns) {
    if attrs.gated {
        (2 * f, Columns::Glu(attrs.glu_layout))
    } else {
        (f, Columns::Plain)
    }
}

/// Computes `Y` exactly as docs/op-spec.md defines it, running its loops on `pool`.
pub fn scatter_moe<E: Element>(pool: &dyn Pool, attrs: &Attrs, s: MoeSizes, inp: &MoeInputs<E>, y: &mut [E]) -> Result<(), SpecError> {
    scatter_moe_with(pool, attrs, s, inp, None, &mut Scratch::default(), y)
}

/// [`scatter_moe`], taking the weights and biases from `packed` when given (it must have been
/// packed from `inp`'s `w_in`, `w_out`, `b_in` and `b_out`: the CPU kernel packs constant ones
/// once, at session creation), and its intermediate buffers from `scratch`.
pub fn scatter_moe_with<E: Element>(
    pool: &dyn Pool,
    attrs: &Attrs,
    s: MoeSizes,
    inp: &MoeInputs<E>,
    packed: Option<&PackedMoe>,
    scratch: &mut Scratch,
    y: &mut [E],
) -> Result<(), SpecError> {
    let MoeSizes { tokens, k, experts, d, f } = s;
    let n = if attrs.gated { 2 * f } else { f };
    assert_eq!(inp.x.len(), tokens * d);
    assert_eq!(inp.routing_weights.len(), tokens * k);
    assert_eq!(inp.routing_indices.len(), tokens * k);
    inp.w_in.assert_shape("ScatterMoE w_in", experts, n, d);
    inp.w_out.assert_shape("ScatterMoE w_out", experts, d, f);
    assert_eq!(y.len(), tokens * d);
    if let Some(p) = packed {
        let (n, columns) = in_layout(attrs, f);
        assert!(
            p.w_in.fits(experts, n, d, columns)
                && p.w_out.fits(experts, d, f, Columns::Plain)
                && p.w_in.has_bias() == inp.b_in.is_some()
                && p.w_out.has_bias() == inp.b_out.is_some()
                && inp.w_in.plain().is_some()
                && inp.w_out.plain().is_some(),
            "ScatterMoE: packed weights of another shape"
        );
    }

    let expert = experts_of(NAME, inp.routing_indices, k, experts)?;
    let keep = inp.capacity.map(|c| capacity_keep(&expert, k, experts, c, attrs.capacity_order));
    let routing = group(&expert, experts, keep.as_deref());
    let rows = routing.order.len();

    // The kept assignments' token rows a [rows, d] in grouped order, hidden activations
    // h [rows, f], expert outputs o [rows, d]: each written in full before it is read.
    let row_of = |i: usize| routing.order[i] as usize / k;
    let o: &[f32] = match packed {
        Some(p) => {
            // a and h as the register tiles read them (rows padded to whole tiles), o by rows
            let tiled = tile_offsets(&routing);
            let padded = *tiled.last().unwrap();
            let [a, h, o] = scratch.buffers([padded * d, padded * f, rows * d]);
            gather_tiles(pool, inp.x, d, &routing, &tiled, a, &row_of);
            let epi = if attrs.gated { Epilogue::Glu(attrs) } else { Epilogue::Act(attrs) };
            packed_product(pool, &routing, &tiled, a, &p.w_in, epi, Dest::Tiles(h));
            packed_product(pool, &routing, &tiled, h, &p.w_out, Epilogue::Linear, Dest::Rows(o));
            o
        }
        None => {
            let [a, h, o] = scratch.buffers([rows * d, rows * f, rows * d]);
            gather_rows(pool, inp.x, d, a, &row_of);
            hidden(pool, attrs, s, inp, &routing, a, h);
            outputs(pool, s, inp, &routing, h, o);
            o
        }
    };

    // Y[t] = sum_j w[t, j] * o[t, j], one task per token chunk: deterministic, no atomics.
    let y_out = SharedOut::new(y);
    const CHUNK: usize = 16;
    pool.for_each(tokens.div_ceil(CHUNK), &|c| {
        let mut acc = vec![0f32; d];
        for t in c * CHUNK..((c + 1) * CHUNK).min(tokens) {
            acc.fill(0.0);
            for j in 0..k {
                let p = routing.pos[t * k + j];
                if p == DROPPED {
                    continue;
                }
                let w = inp.routing_weights[t * k + j].to_f32();
                for (a, &v) in acc.iter_mut().zip(&o[p as usize * d..(p as usize + 1) * d]) {
                    *a += w * v;
                }
            }
            // SAFETY: token t belongs to chunk c only.
            let y_row = unsafe { y_out.row(t, d) };
            for (yv, a) in y_row.iter_mut().zip(&acc) {
                *yv = E::from_f32(*a);
            }
        }
    });
    Ok(())
}

/// h = act(a · w_inᵀ + b_in) from the weights as given, in blocks (expert, hidden units).
fn hidden<E: Element>(pool: &dyn Pool, attrs: &Attrs, s: MoeSizes, inp: &MoeInputs<E>, routing: &Routing, a: &[f32], h: &mut [f32]) {
    let MoeSizes { d, f, .. } = s;
    let n = if attrs.gated { 2 * f } else { f };
    let h_out = Shared::new(h, f);
    let work = blocks(routing, f);
    pool.for_each(work.len(), &|i| {
        let Block { e, rows: r, cols } = &work[i];
        let (m, u) = (r.len(), cols.len());
        let a_e = MatRef::new(&a[r.start * d..r.end * d], m, d, d);
        let w = &inp.w_in;
        let b = inp.b_in.map(|b| &b[e * n..(e + 1) * n]);
        // First-projection values of these units, laid out as `glu_layout` lays out w_in's rows
        // (with u units instead of f), so `activate_row` reads gate and up where it expects them.
        let width = if attrs.gated { 2 * u } else { u };
        let mut pre = vec![0f32; m * width];
        let pre_out = Shared::new(&mut pre, width);
        // SAFETY: `pre` is this task's own; `h_out` blocks of different tasks do not overlap.
        unsafe {
            if attrs.gated && attrs.glu_layout == GluLayout::Interleaved {
                linear_rows(a_e, w, *e, n, b, 2 * cols.start..2 * cols.end, &pre_out.block(&(0..m), &(0..2 * u)));
            } else if attrs.gated {
                linear_rows(a_e, w, *e, n, b, cols.clone(), &pre_out.block(&(0..m), &(0..u)));
                linear_rows(a_e, w, *e, n, b, f + cols.start..f + cols.end, &pre_out.block(&(0..m), &(u..2 * u)));
            } else {
                linear_rows(a_e, w, *e, n, b, cols.clone(), &pre_out.block(&(0..m), &(0..u)));
            }
            let dst = h_out.block(r, cols);
            let mut row = vec![0f32; u];
            for (ri, p) in pre.chunks_exact(width).enumerate() {
                activate_row(attrs, p, &mut row);
                std::ptr::copy_nonoverlapping(row.as_ptr(), dst.ptr.add(ri * dst.stride), u);
            }
        }
    });
}

/// o = h · w_outᵀ + b_out from the weights as given, in blocks (expert, output columns).
fn outputs<E: Element>(pool: &dyn Pool, s: MoeSizes, inp: &MoeInputs<E>, routing: &Routing, h: &[f32], o: &mut [f32]) {
    let MoeSizes { d, f, .. } = s;
    let o_out = Shared::new(o, d);
    let work = blocks(routing, d);
    pool.for_each(work.len(), &|i| {
        let Block { e, rows: r, cols } = &work[i];
        let h_e = MatRef::new(&h[r.start * f..r.end * f], r.len(), f, f);
        let b = inp.b_out.map(|b| &b[e * d..(e + 1) * d]);
        // SAFETY: blocks of different tasks do not overlap.
        unsafe { linear_rows(h_e, &inp.w_out, *e, d, b, cols.clone(), &o_out.block(r, cols)) };
    });
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
