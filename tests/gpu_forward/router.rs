//! `TopKRouter` on the GPU (kernels/router.cu through `forward::topk_router`) against the CPU
//! router (`scattermoe::cpu::router`, itself checked against the float64 reference in
//! python/tests/test_topk_router.py): every scoring, normalize and tie rule, float32 / float16 /
//! bfloat16, E from 1 to 1024 (the kernel's limit: 32 logits a lane) and not a multiple of 32, k
//! from 1 to E, T from 0 to 65536, exact ties in every row, NaN and -inf logits. The indices must
//! be identical; the weights within the dtype's tolerance (both compute in float32 and round once).

use super::*;
use scattermoe::cpu::router::topk_router as cpu_router;
use scattermoe::reference::Serial;
use scattermoe::spec::topk_router::Attrs;
use scattermoe::spec::{Scoring, TieBreak};

/// Logits on a 1/64 grid in [-4, 4] with a quarter of each row copied from elsewhere in the row
/// (exact ties); `specials` puts NaN and -inf in some rows.
fn draw_logits(rng: &mut StdRng, tokens: usize, experts: usize, specials: bool) -> Vec<f32> {
    let mut x: Vec<f32> = (0..tokens * experts).map(|_| rng.random_range(-256i32..=256) as f32 / 64.0).collect();
    for row in x.chunks_mut(experts) {
        for _ in 0..experts / 4 {
            let (a, b) = (rng.random_range(0..experts), rng.random_range(0..experts));
            row[b] = row[a];
        }
        if specials && rng.random_range(0..4) == 0 {
            row[rng.random_range(0..experts)] = f32::NAN;
            row[rng.random_range(0..experts)] = f32::NEG_INFINITY;
        }
    }
    x
}

fn run_router<E: Elem>(g: &Gpu, attrs: &Attrs, tokens: usize, experts: usize, rng: &mut StdRng, rep: &mut Report) {
    let logits: Vec<E> = conv(&draw_logits(rng, tokens, experts, true));
    let n = tokens * attrs.k;
    let (mut want_w, mut want_i) = (vec![E::default(); n], vec![0i64; n]);
    cpu_router(&Serial, attrs, experts, &logits, &mut want_w, &mut want_i);
    let x = g.upload(&bytes_of(&logits));
    let w = g.poisoned(n * std::mem::size_of::<E>());
    let i = g.poisoned(n * 8);
    let s = g.stream.cu_stream();
    unsafe { forward::topk_router(g.dev, s, attrs, E::T, tokens, experts, g.ptr(&x), g.ptr(&w), g.ptr(&i)) }.unwrap();
    g.stream.synchronize().unwrap();
    let got_w: Vec<E> = from_bytes(&g.download(&w, n * std::mem::size_of::<E>()));
    let got_i: Vec<i64> = from_bytes(&g.download(&i, n * 8));
    let name = format!("router {:?} {:?} norm {} {:?} T {tokens} E {experts} k {}", E::T, attrs.scoring, attrs.normalize as u8, attrs.tie_break, attrs.k);
    let first_diff = got_i.iter().zip(&want_i).position(|(a, b)| a != b);
    rep.exact(&format!("{name} indices"), first_diff.is_none(), &first_diff.map_or(String::new(), |p| {
        let t = p / attrs.k;
        format!("token {t}: gpu {:?} cpu {:?}", &got_i[t * attrs.k..(t + 1) * attrs.k], &want_i[t * attrs.k..(t + 1) * attrs.k])
    }));
    // rows with NaN weights (a NaN among the chosen, or an all -inf row) compare as NaN on both sides
    let keep = |v: &[E]| -> Vec<E> { v.iter().map(|x| if x.to_f32().is_nan() { E::from_f32(0.0) } else { *x }).collect() };
    let nan_same = got_w.iter().zip(&want_w).all(|(a, b)| a.to_f32().is_nan() == b.to_f32().is_nan());
    rep.exact(&format!("{name} NaN weights"), nan_same, "");
    rep.add(&format!("{name} weights"), rel_err(&keep(&got_w), &keep(&want_w)), E::TOL);
}

#[test]
fn topk_router_matches_the_cpu_router() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(0x70_6b_72);
    let mut rep = Report::new();
    let mut shapes = vec![(1usize, 8usize, 2usize), (3, 1, 1), (64, 128, 8), (37, 257, 4), (5, 1024, 8), (4, 64, 64), (2, 1024, 1024), (0, 16, 2), (1000, 256, 8)];
    if !small() {
        shapes.extend([(65536, 128, 8), (4096, 32, 4), (16384, 1024, 2)]);
    }
    for scoring in Scoring::ALL {
        for normalize in [false, true] {
            for tie_break in TieBreak::ALL {
                for &(tokens, experts, k) in &shapes {
                    let attrs = Attrs { k, scoring, normalize, tie_break };
                    run_router::<f32>(g, &attrs, tokens, experts, &mut rng, &mut rep);
                    run_router::<f16>(g, &attrs, tokens, experts, &mut rng, &mut rep);
                    run_router::<bf16>(g, &attrs, tokens, experts, &mut rng, &mut rep);
                }
            }
        }
    }
    rep.finish("topk_router");
}
