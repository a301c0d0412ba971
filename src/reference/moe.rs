//! `ScatterMoE` on the CPU: the oracle for every other implementation, and the CPU EP kernel.

use super::activation::activate_row;
use super::element::{Element, Indices};
use super::experts::{blocks, gather_rows, gather_tiles, linear_rows, packed_product, tile_offsets, Block, Dest, Shared, SharedOut};
use super::gemm::MatRef;
use super::panels::{Columns, Epilogue, PackedWeights};
use super::pool::Pool;
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
    pub w_in: &'a [E],
    pub w_out: &'a [E],
    pub b_in: Option<&'a [E]>,
    pub b_out: Option<&'a [E]>,
    pub capacity: Option<usize>,
}

/// Both projections of a node, packed once (see [`PackedWeights`]) when its weights are constant.
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
    assert_eq!(inp.w_in.len(), experts * n * d);
    assert_eq!(inp.w_out.len(), experts * d * f);
    assert_eq!(y.len(), tokens * d);
    if let Some(p) = packed {
        let (n, columns) = in_layout(attrs, f);
        assert!(
            p.w_in.fits(experts, n, d, columns)
                && p.w_out.fits(experts, d, f, Columns::Plain)
                && p.w_in.has_bias() == inp.b_in.is_some()
                && p.w_out.has_bias() == inp.b_out.is_some(),
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
        let w = &inp.w_in[e * n * d..(e + 1) * n * d];
        let b = inp.b_in.map(|b| &b[e * n..(e + 1) * n]);
        // First-projection values of these units, laid out as `glu_layout` lays out w_in's rows
        // (with u units instead of f), so `activate_row` reads gate and up where it expects them.
        let width = if attrs.gated { 2 * u } else { u };
        let mut pre = vec![0f32; m * width];
        let pre_out = Shared::new(&mut pre, width);
        // SAFETY: `pre` is this task's own; `h_out` blocks of different tasks do not overlap.
        unsafe {
            if attrs.gated && attrs.glu_layout == GluLayout::Interleaved {
                linear_rows(a_e, w, b, 2 * cols.start..2 * cols.end, &pre_out.block(&(0..m), &(0..2 * u)));
            } else if attrs.gated {
                linear_rows(a_e, w, b, cols.clone(), &pre_out.block(&(0..m), &(0..u)));
                linear_rows(a_e, w, b, f + cols.start..f + cols.end, &pre_out.block(&(0..m), &(u..2 * u)));
            } else {
                linear_rows(a_e, w, b, cols.clone(), &pre_out.block(&(0..m), &(0..u)));
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
        let w = &inp.w_out[e * d * f..(e + 1) * d * f];
        let b = inp.b_out.map(|b| &b[e * d..(e + 1) * d]);
        // SAFETY: blocks of different tasks do not overlap.
        unsafe { linear_rows(h_e, w, b, cols.clone(), &o_out.block(r, cols)) };
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

#[cfg(test)]
mod tests {
    //! The packed path against an f64 evaluation of the contract, at sizes that leave partial
    //! panels, partial row tiles, several blocks of the inner dimension and experts without rows.

    use super::*;
    use crate::reference::oracle64::{self, rel_err};
    use crate::reference::{Rayon, Serial};
    use crate::spec::{Activation, CapacityOrder};
    use half::{bf16, f16};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// 13 tokens over 5 experts, k = 2: expert 4 takes every token (two full row tiles and one
    /// row), the others 4, 6 and 3 rows, expert 3 none.
    fn routing_13() -> Vec<i64> {
        [0, 1, 1, 2, 0, 1, 2, 1, 1, 0, 2, 1, 0].iter().flat_map(|&e| [e, 4]).collect()
    }

    struct Case {
        attrs: Attrs,
        d: usize,
        f: usize,
        experts: usize,
        k: usize,
        ri: Vec<i64>,
        bias: bool,
        capacity: Option<usize>,
    }

    /// Runs the case packed (and, as a control, unpacked) with storage type `E`, and returns the
    /// relative errors against f64 of the stored values; None where there is no packed path.
    fn errors<E: Element>(c: &Case, seed: u64) -> Option<(f64, f64)> {
        let mut rng = StdRng::seed_from_u64(seed);
        let (tokens, n) = (c.ri.len() / c.k, if c.attrs.gated { 2 * c.f } else { c.f });
        let mut vals = |len: usize, scale: f32| -> Vec<E> { (0..len).map(|_| E::from_f32(rng.random_range(-scale..scale))).collect() };
        let x = vals(tokens * c.d, 2.0);
        let rw = vals(tokens * c.k, 1.0);
        let w_in = vals(c.experts * n * c.d, 1.0 / (c.d as f32).sqrt());
        let w_out = vals(c.experts * c.d * c.f, 1.0 / (c.f as f32).sqrt());
        let b_in = c.bias.then(|| vals(c.experts * n, 0.5));
        let b_out = c.bias.then(|| vals(c.experts * c.d, 0.5));
        let packed = PackedMoe::new(&c.attrs, c.experts, c.d, c.f, &w_in, &w_out, b_in.as_deref(), b_out.as_deref())?;

        let wide = |v: &[E]| -> Vec<f64> { v.iter().map(|v| v.to_f32() as f64).collect() };
        let (b_in64, b_out64) = (b_in.as_deref().map(wide), b_out.as_deref().map(wide));
        let want = oracle64::scatter_moe(&c.attrs, tokens, c.k, c.experts, c.d, c.f, &oracle64::Moe {
            x: &wide(&x),
            rw: &wide(&rw),
            ri: &c.ri,
            w_in: &wide(&w_in),
            w_out: &wide(&w_out),
            b_in: b_in64.as_deref(),
            b_out: b_out64.as_deref(),
            capacity: c.capacity,
        });
        let inp = MoeInputs {
            x: &x,
            routing_weights: &rw,
            routing_indices: Indices::I64(&c.ri),
            w_in: &w_in,
            w_out: &w_out,
            b_in: b_in.as_deref(),
            b_out: b_out.as_deref(),
            capacity: c.capacity,
        };
        let s = MoeSizes { tokens, k: c.k, experts: c.experts, d: c.d, f: c.f };
        let run = |p: Option<&PackedMoe>, scratch: &mut Scratch| {
            // Scratch kept across calls, as the kernel keeps it, and poisoned: a value the call
            // does not write shows as NaN.
            let most = c.ri.len() * (c.d + c.f);
            scratch.buffers([most; 3]).iter_mut().for_each(|b| b.fill(f32::NAN));
            let mut y = vec![E::from_f32(f32::NAN); tokens * c.d];
            scatter_moe_with(&Rayon, &c.attrs, s, &inp, p, scratch, &mut y).unwrap();
            y.iter().map(|v| v.to_f32()).collect::<Vec<f32>>()
        };
        let mut scratch = Scratch::default();
        let plain = run(None, &mut scratch);
        let got = run(Some(&packed), &mut scratch);
        Some((rel_err(&got, &want), rel_err(&plain, &want)))
    }

    fn check(c: &Case, what: &str) {
        match errors::<f32>(c, 7) {
            None => eprintln!("skipped ({what}): no packed path on this machine"),
            Some((packed, plain)) => {
                assert!(packed < 2e-5, "{what}: packed rel err {packed:e} (unpacked {plain:e})");
                assert!(plain < 2e-5, "{what}: unpacked rel err {plain:e}");
            }
        }
    }

    fn case(attrs: Attrs, d: usize, f: usize, bias: bool) -> Case {
        Case { attrs, d, f, experts: 5, k: 2, ri: routing_13(), bias, capacity: None }
    }

    #[test]
    fn packed_matches_f64_for_every_activation_and_layout() {
        // d 37, f 45: no panel of either projection is full at the end, 45 % 8 units remain
        let mut i = 0;
        for activation in Activation::ALL {
            for gated in [false, true] {
                if activation == Activation::SwigluOai && !gated {
                    continue;
                }
                let layouts: &[GluLayout] = if gated { &GluLayout::ALL } else { &[GluLayout::GateUp] };
                for &glu_layout in layouts {
                    let attrs = Attrs { activation, gated, glu_layout, limit: 1.5, ..Attrs::default() };
                    i += 1;
                    check(&case(attrs, 37, 45, i % 2 == 0), &format!("{activation:?} gated={gated} {glu_layout:?}"));
                }
            }
        }
    }

    #[test]
    fn packed_matches_f64_over_several_inner_blocks() {
        use crate::reference::panels::KC;
        // both inner dimensions span more than one block, with a remainder
        let (d, f) = (KC + 44, KC + 4);
        check(&case(Attrs::default(), d, f, true), "d, f > KC");
        let gelu = Attrs { activation: Activation::Gelu, gated: false, ..Attrs::default() };
        check(&case(gelu, 2 * KC + 1, 17, false), "d > 2 KC");
        check(&case(Attrs::default(), 2 * KC, KC, false), "d, f multiples of KC");
    }

    #[test]
    fn packed_matches_f64_with_one_token_and_with_capacity() {
        let one = Case { ri: vec![3, 1], ..case(Attrs::default(), 40, 24, true) };
        check(&one, "one token");
        for capacity_order in CapacityOrder::ALL {
            let attrs = Attrs { capacity_order, ..Attrs::default() };
            // expert 4 keeps 5 of its 13 rows, expert 1 5 of 6
            check(&Case { capacity: Some(5), ..case(attrs, 24, 40, false) }, &format!("capacity 5 {capacity_order:?}"));
            check(&Case { capacity: Some(0), ..case(attrs, 24, 40, false) }, "capacity 0");
        }
    }

    #[test]
    fn packed_converts_half_precision_weights() {
        let c = case(Attrs::default(), 33, 20, true);
        // outputs are rounded to the storage type: the contract's tolerances
        for (name, got, tol) in [("f16", errors::<f16>(&c, 3), 1e-2), ("bf16", errors::<bf16>(&c, 3), 3e-2)] {
            match got {
                None => eprintln!("skipped ({name}): no packed path on this machine"),
                Some((packed, plain)) => assert!(packed < tol && plain < tol, "{name}: packed {packed:e}, unpacked {plain:e}"),
            }
        }
    }

    #[test]
    fn packed_weights_of_another_shape_are_refused() {
        let c = case(Attrs::default(), 16, 8, false);
        let w_in = vec![0f32; 5 * 16 * 16];
        let w_out = vec![0f32; 5 * 16 * 8];
        let Some(packed) = PackedMoe::new(&c.attrs, 5, 16, 8, &w_in, &w_out, None, None) else { return };
        // same sizes, but the node has biases the packed weights do not
        let (x, rw, b) = (vec![0f32; 13 * 16], vec![0f32; 26], vec![0f32; 5 * 16]);
        let inp = MoeInputs { x: &x, routing_weights: &rw, routing_indices: Indices::I64(&c.ri), w_in: &w_in, w_out: &w_out, b_in: Some(&b), b_out: None, capacity: None };
        let s = MoeSizes { tokens: 13, k: 2, experts: 5, d: 16, f: 8 };
        let r = std::panic::catch_unwind(|| scatter_moe_with(&Serial, &c.attrs, s, &inp, Some(&packed), &mut Scratch::default(), &mut vec![0f32; 13 * 16]));
        assert!(r.is_err());
    }
}
