//! The packed path against f64 (scattered output) and against the unpacked path (the other
//! output forms share everything after the products).

use super::oracle64::{self, rel_err};
use crate::cpu::panels::{Columns, PackedWeights};
use crate::cpu::{parallel_linear_with, Indices, LinearInputs, LinearSizes, Rayon, Scratch};
use crate::spec::parallel_linear::Attrs;
use rand::{rngs::StdRng, Rng, SeedableRng};

#[test]
fn packed_matches_f64_and_the_unpacked_path() {
    // 13 tokens, k = 2, 5 experts (expert 3 without rows, expert 4 with 13); d_out 37 leaves a
    // partial panel, d_in 300 two inner blocks
    let (tokens, k, experts, d_in, d_out) = (13, 2, 5, 300, 37);
    let ri: Vec<i64> = [0, 1, 1, 2, 0, 1, 2, 1, 1, 0, 2, 1, 0].iter().flat_map(|&e| [e, 4]).collect();
    let mut rng = StdRng::seed_from_u64(11);
    let mut vals = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
    let (x, xg, w, b, gates) = (vals(tokens * d_in), vals(tokens * k * d_in), vals(experts * d_out * d_in), vals(experts * d_out), vals(tokens * k));
    let Some(packed) = PackedWeights::new(&w, Some(&b), experts, d_out, d_in, Columns::Plain) else {
        eprintln!("skipped: no packed path on this machine");
        return;
    };
    let s = LinearSizes { tokens, k, experts, d_in, d_out };
    let mut scratch = Scratch::default();
    let mut run = |attrs: &Attrs, x: &[f32], gates: Option<&[f32]>, p: Option<&PackedWeights>| {
        let rows = if gates.is_some() { tokens } else { tokens * k };
        // a value the call does not write shows as NaN
        scratch.buffers([tokens * k * (d_in + d_out); 2]).iter_mut().for_each(|b| b.fill(f32::NAN));
        let mut y = vec![f32::NAN; rows * d_out];
        let inp = LinearInputs { x, routing_indices: Indices::I64(&ri), w: (&w).into(), b: Some(&b), gates };
        parallel_linear_with(&Rayon, attrs, s, &inp, p, &mut scratch, &mut y).unwrap();
        y
    };

    let wide = |v: &[f32]| -> Vec<f64> { v.iter().map(|&v| v as f64).collect() };
    let want: Vec<f64> = oracle64::parallel_linear(&wide(&x), &ri, &wide(&w), Some(&wide(&b)), k, d_in, d_out).concat();
    let scattered = Attrs { grouped_in: false, grouped_out: false, ..Default::default() };
    let got = run(&scattered, &x, None, Some(&packed));
    assert!(rel_err(&got, &want) < 2e-5, "packed rel err {:e}", rel_err(&got, &want));

    for (grouped_in, grouped_out, with_gates) in [(false, true, false), (true, false, false), (true, false, true), (false, false, true)] {
        let attrs = Attrs { grouped_in, grouped_out, ..Default::default() };
        let x = if grouped_in { &xg } else { &x };
        let g = with_gates.then_some(gates.as_slice());
        let (got, plain) = (run(&attrs, x, g, Some(&packed)), run(&attrs, x, g, None));
        let err = rel_err(&got, &wide(&plain));
        assert!(err < 2e-5, "grouped_in={grouped_in} grouped_out={grouped_out} gates={with_gates}: {err:e}");
    }
}
