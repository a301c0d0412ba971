//! The packed path against an f64 evaluation of the contract, at sizes that leave partial
//! panels, partial row tiles, several blocks of the inner dimension and experts without rows.

use super::oracle64::{self, rel_err};
use crate::cpu::{scatter_moe_with, Element, Indices, MoeInputs, MoeSizes, PackedMoe, Rayon, Scratch, Serial};
use crate::spec::{scatter_moe::Attrs, Activation, CapacityOrder, GluLayout};
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
        w_in: (&w_in).into(),
        w_out: (&w_out).into(),
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
            if activation.gated_only() && !gated {
                continue;
            }
            let layouts: &[GluLayout] = if gated { &GluLayout::ALL } else { &[GluLayout::GateUp] };
            for &glu_layout in layouts {
                // swiglu_limit as GLM-5-Next writes it (alpha 1)
                let alpha = if activation == Activation::SwigluLimit { 1.0 } else { 1.702 };
                let attrs = Attrs { activation, gated, glu_layout, limit: 1.5, alpha, ..Attrs::default() };
                i += 1;
                check(&case(attrs, 37, 45, i % 2 == 0), &format!("{activation:?} gated={gated} {glu_layout:?}"));
            }
        }
    }
}

#[test]
fn relu2_and_swiglu_limit_match_f64_at_awkward_sizes() {
    use crate::cpu::panels::KC;
    let relu2 = |gated| Attrs { activation: Activation::Relu2, gated, ..Attrs::default() };
    let clamp = |glu_layout, limit| Attrs { activation: Activation::SwigluLimit, glu_layout, alpha: 1.0, limit, ..Attrs::default() };
    // d = f = 1: one column, one hidden unit
    check(&case(relu2(false), 1, 1, true), "relu2 d = f = 1");
    check(&case(clamp(GluLayout::Interleaved, 0.25), 1, 1, false), "swiglu_limit d = f = 1, limit 0.25");
    // odd widths, one partial panel of 8 units on each side
    check(&case(relu2(true), 17, 9, false), "relu2 gated d 17 f 9");
    check(&case(clamp(GluLayout::UpGate, 0.5), 9, 17, true), "swiglu_limit up_gate d 9 f 17, limit 0.5");
    // several inner blocks, a limit no value reaches (silu(gate) * up there)
    check(&case(relu2(false), KC + 3, 33, true), "relu2 d > KC");
    check(&case(clamp(GluLayout::GateUp, 100.0), KC + 3, 33, true), "swiglu_limit d > KC, limit 100");
    // alpha other than 1, capacity dropping rows
    let a = Attrs { alpha: -0.75, ..clamp(GluLayout::GateUp, 1.0) };
    check(&Case { capacity: Some(3), ..case(a, 24, 40, true) }, "swiglu_limit alpha -0.75 capacity 3");
    check(&Case { capacity: Some(2), ..case(relu2(false), 24, 40, true) }, "relu2 capacity 2");
    // half-precision storage, outputs rounded: the contract's tolerances
    for (what, attrs) in [("relu2", relu2(false)), ("swiglu_limit", clamp(GluLayout::Interleaved, 1.0))] {
        let c = case(attrs, 33, 20, true);
        for (name, got, tol) in [("f16", errors::<f16>(&c, 5), 1e-2), ("bf16", errors::<bf16>(&c, 5), 3e-2)] {
            match got {
                None => eprintln!("skipped ({what} {name}): no packed path on this machine"),
                Some((packed, plain)) => assert!(packed < tol && plain < tol, "{what} {name}: packed {packed:e}, unpacked {plain:e}"),
            }
        }
    }
}

#[test]
fn packed_matches_f64_over_several_inner_blocks() {
    use crate::cpu::panels::KC;
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
    let inp = MoeInputs { x: &x, routing_weights: &rw, routing_indices: Indices::I64(&c.ri), w_in: (&w_in).into(), w_out: (&w_out).into(), b_in: Some(&b), b_out: None, capacity: None };
    let s = MoeSizes { tokens: 13, k: 2, experts: 5, d: 16, f: 8 };
    let r = std::panic::catch_unwind(|| scatter_moe_with(&Serial, &c.attrs, s, &inp, Some(&packed), &mut Scratch::default(), &mut vec![0f32; 13 * 16]));
    assert!(r.is_err());
}
