//! `TopKRouter` on the GPU (kernels/router.cu through `forward::topk_router`) against the CPU
//! router (`scattermoe::cpu::router`, itself checked against the float64 reference in
//! python/tests/test_topk_router.py): every scoring, normalize and tie rule, float32 / float16 /
//! bfloat16, E from 1 to 1024 (the kernel's limit: 32 logits a lane) and not a multiple of 32, k
//! from 1 to E, T from 0 to 65536, exact ties in every row, NaN and -inf logits. Then the selection
//! bias (float32 and T), the group-limited choice (n_group 1 to 16 dividing E, DeepSeek-V3's
//! 256 / 8 / 4 / k 8 and DeepSeek-V2's 160 / 8 groups, both group scores, fill -inf and 0,
//! topk_group 1 and n_group - 1, k above the experts of the kept groups, whole groups copied for
//! exact group ties), weights_from, normalize_eps, normalize_min, scale and the expert scale
//! (float32 and T). The indices must be identical; the
//! weights within the dtype's tolerance (both compute in float32 and round once), non-finite
//! weights identical.

use super::*;
use scattermoe::cpu::router::{topk_router as cpu_router, PerExpert};
use scattermoe::reference::Serial;
use scattermoe::spec::topk_router::{Attrs, Groups};
use scattermoe::spec::{GroupScore, Scoring, TieBreak, WeightsFrom};

/// Logits on a 1/64 grid in [-4, 4] with a quarter of each row copied from elsewhere in the row
/// (exact ties); `specials` puts NaN and -inf in some rows; `group` (the group size, with at least
/// two groups) copies one whole group over another in some rows (exact group ties where the bias
/// repeats from group to group).
fn draw_logits(rng: &mut StdRng, tokens: usize, experts: usize, specials: bool, group: Option<usize>) -> Vec<f32> {
    let mut x: Vec<f32> = (0..tokens * experts).map(|_| rng.random_range(-256i32..=256) as f32 / 64.0).collect();
    for row in x.chunks_mut(experts) {
        for _ in 0..experts / 4 {
            let (a, b) = (rng.random_range(0..experts), rng.random_range(0..experts));
            row[b] = row[a];
        }
        if let Some(size) = group.filter(|&s| s < experts) {
            if rng.random_range(0..4) == 0 {
                let n = experts / size;
                let (a, b) = (rng.random_range(0..n), rng.random_range(0..n));
                row.copy_within(a * size..(a + 1) * size, b * size);
            }
        }
        if specials && rng.random_range(0..4) == 0 {
            row[rng.random_range(0..experts)] = f32::NAN;
            row[rng.random_range(0..experts)] = f32::NEG_INFINITY;
        }
    }
    x
}

/// How a case passes the selection bias or the expert scale.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Bias {
    None,
    F32,
    /// in the logits' type
    T,
}

/// A bias of `experts` values: three quarters on a 1/8 grid (exact ties), the rest anywhere in the
/// range; in [0, 0.5] where `nonneg` (normalized choice scores: no cancelling sum), else
/// [-0.5, 0.5]; repeating from group to group where `period` is given.
fn draw_bias(rng: &mut StdRng, experts: usize, nonneg: bool, period: Option<usize>) -> Vec<f32> {
    let lo = if nonneg { 0 } else { -4 };
    let mut b: Vec<f32> = (0..experts)
        .map(|_| if rng.random_range(0..4) > 0 { rng.random_range(lo..=4) as f32 / 8.0 } else { rng.random_range(lo as f32 / 8.0..0.5) })
        .collect();
    if let Some(p) = period {
        for i in p..experts {
            b[i] = b[i % p];
        }
    }
    b
}

/// Per-expert values as the GPU reads them (float32 or `E`) and the same values in float32 for the
/// CPU; none for `Bias::None`.
fn per_expert<E: Elem>(kind: Bias, v32: Vec<f32>) -> (Vec<u8>, Option<Vec<f32>>) {
    match kind {
        Bias::None => (Vec::new(), None),
        Bias::F32 => (bytes_of(&v32), Some(v32)),
        Bias::T => {
            let vt: Vec<E> = conv(&v32);
            (bytes_of(&vt), Some(vt.iter().map(|v| v.to_f32()).collect()))
        }
    }
}

/// `bias` and `escale`: how the selection bias and the expert scale come, if at all.
#[allow(clippy::too_many_arguments)]
fn run_router<E: Elem>(g: &Gpu, attrs: &Attrs, tokens: usize, experts: usize, bias: Bias, escale: Bias, rng: &mut StdRng, rep: &mut Report) {
    let group = attrs.groups.map(|gr| experts / gr.n_group);
    let mut raw = draw_logits(rng, tokens, experts, true, group);
    if attrs.scoring == Scoring::Identity {
        // identity reads scores a graph computed (a Softmax's): never negative, so a normalising
        // sum does not cancel (near 0 any two summation orders disagree)
        raw.iter_mut().for_each(|v| *v = v.abs() + 1.0 / 64.0);
    }
    let logits: Vec<E> = conv(&raw);
    // the bias as the GPU reads it, and the same values in float32 for the CPU
    let nonneg = attrs.weights_from == WeightsFrom::Choice && attrs.normalize;
    let period = if rng.random_range(0..2) == 0 { group } else { None };
    let b32 = draw_bias(rng, experts, nonneg, period);
    let (b_bytes, b_cpu) = per_expert::<E>(bias, b32);
    // expert scales as Gemma 4 learns them: around 1, some negative and some 0
    let e32: Vec<f32> = (0..experts).map(|_| [0.0, -0.75, 1.0, 1.5, 0.8125][rng.random_range(0..5)] + rng.random_range(0..8) as f32 / 64.0).collect();
    let (e_bytes, e_cpu) = per_expert::<E>(escale, e32);
    let n = tokens * attrs.k;
    let (mut want_w, mut want_i) = (vec![E::default(); n], vec![0i64; n]);
    let per = PerExpert { bias: b_cpu.as_deref(), scale: e_cpu.as_deref() };
    cpu_router(&Serial, attrs, experts, &logits, per, &mut want_w, &mut want_i);
    let x = g.upload(&bytes_of(&logits));
    let bd = g.upload(&b_bytes);
    let ed = g.upload(&e_bytes);
    let w = g.poisoned(n * std::mem::size_of::<E>());
    let i = g.poisoned(n * 8);
    let s = g.stream.cu_stream();
    let dev_per = forward::PerExpert {
        bias: (bias != Bias::None).then(|| (g.ptr(&bd), bias == Bias::F32)),
        scale: (escale != Bias::None).then(|| (g.ptr(&ed), escale == Bias::F32)),
    };
    unsafe { forward::topk_router(g.dev, s, attrs, E::T, tokens, experts, g.ptr(&x), dev_per, g.ptr(&w), g.ptr(&i)) }.unwrap();
    g.stream.synchronize().unwrap();
    let got_w: Vec<E> = from_bytes(&g.download(&w, n * std::mem::size_of::<E>()));
    let got_i: Vec<i64> = from_bytes(&g.download(&i, n * 8));
    let mut name = format!("router {:?} {:?} norm {} {:?} T {tokens} E {experts} k {}", E::T, attrs.scoring, attrs.normalize as u8, attrs.tie_break, attrs.k);
    if let Some(gr) = attrs.groups {
        name += &format!(" groups {}/{} {:?} fill {}", gr.topk_group, gr.n_group, gr.score, gr.fill);
    }
    if bias != Bias::None || attrs.weights_from != WeightsFrom::Scores || attrs.normalize_eps != 0.0 || attrs.normalize_min != 0.0 || attrs.scale != 1.0 {
        name += &format!(" bias {bias:?}{} {:?} eps {:e} min {:e} scale {}", if period.is_some() { " (periodic)" } else { "" }, attrs.weights_from, attrs.normalize_eps, attrs.normalize_min, attrs.scale);
    }
    if escale != Bias::None {
        name += &format!(" expert_scale {escale:?}");
    }
    let first_diff = got_i.iter().zip(&want_i).position(|(a, b)| a != b);
    rep.exact(&format!("{name} indices"), first_diff.is_none(), &first_diff.map_or(String::new(), |p| {
        let t = p / attrs.k;
        format!("token {t}: gpu {:?} cpu {:?}", &got_i[t * attrs.k..(t + 1) * attrs.k], &want_i[t * attrs.k..(t + 1) * attrs.k])
    }));
    // non-finite weights (a NaN among the chosen, an all -inf row, a chosen -inf fill) must be the
    // same on both sides; they compare as 0 in the relative error
    let keep = |v: &[E]| -> Vec<E> { v.iter().map(|x| if x.to_f32().is_finite() { *x } else { E::from_f32(0.0) }).collect() };
    let same_class = |a: f32, b: f32| if a.is_finite() || b.is_finite() { a.is_finite() && b.is_finite() } else { a.is_nan() == b.is_nan() && (a.is_nan() || a == b) };
    let nonfinite_same = got_w.iter().zip(&want_w).all(|(a, b)| same_class(a.to_f32(), b.to_f32()));
    rep.exact(&format!("{name} non-finite weights"), nonfinite_same, "");
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
                    let attrs = Attrs::plain(k, scoring, normalize, tie_break);
                    run_router::<f32>(g, &attrs, tokens, experts, Bias::None, Bias::None, &mut rng, &mut rep);
                    run_router::<f16>(g, &attrs, tokens, experts, Bias::None, Bias::None, &mut rng, &mut rep);
                    run_router::<bf16>(g, &attrs, tokens, experts, Bias::None, Bias::None, &mut rng, &mut rep);
                }
            }
        }
    }
    rep.finish("topk_router");
}

/// One shape of the bias / group test: T, E, n_group (1: no groups), the shape's own topk_group, k.
struct GroupShape(usize, usize, usize, usize, usize);

/// One case of the bias / group test: the router's attributes beyond the plain ones.
struct Extra {
    bias: Bias,
    weights_from: WeightsFrom,
    normalize: bool,
    tie_break: TieBreak,
    fill: f32,
    normalize_eps: f32,
    /// the divisor's floor (Ernie-4.5's clamp)
    normalize_min: f32,
    scale: f32,
    expert_scale: Bias,
    /// 0: the shape's topk_group, 1: one group, 2: all groups but one
    topk_group: usize,
    /// 0 float32, 1 float16, 2 bfloat16
    dtype: usize,
}

fn run_extra(g: &Gpu, shape: &GroupShape, scoring: Scoring, score: GroupScore, x: &Extra, rng: &mut StdRng, rep: &mut Report) {
    let &GroupShape(tokens, experts, n_group, own_topk, k) = shape;
    let topk_group = match x.topk_group {
        0 => own_topk,
        1 => 1,
        _ => n_group.saturating_sub(1).max(1),
    };
    // topk_softmax takes no bias, groups or weights_from; top2_sum needs two experts a group
    let topk_softmax = scoring == Scoring::TopkSoftmax;
    let score = if experts / n_group < 2 { GroupScore::Max } else { score };
    let groups = (!topk_softmax && topk_group < n_group).then_some(Groups { n_group, topk_group, score, fill: x.fill });
    let attrs = Attrs {
        k,
        scoring,
        normalize: x.normalize,
        tie_break: x.tie_break,
        groups,
        weights_from: if topk_softmax { WeightsFrom::Scores } else { x.weights_from },
        normalize_eps: x.normalize_eps,
        normalize_min: x.normalize_min,
        scale: x.scale,
    };
    let bias = if topk_softmax { Bias::None } else { x.bias };
    match x.dtype {
        0 => run_router::<f32>(g, &attrs, tokens, experts, bias, x.expert_scale, rng, rep),
        1 => run_router::<f16>(g, &attrs, tokens, experts, bias, x.expert_scale, rng, rep),
        _ => run_router::<bf16>(g, &attrs, tokens, experts, bias, x.expert_scale, rng, rep),
    }
}

#[test]
fn topk_router_bias_and_groups_match_the_cpu_router() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(0x67_72_70);
    let mut rep = Report::new();
    // DeepSeek-V3 as it ships: sigmoid, bias, 8 groups of 32, 4 kept by top2_sum, k 8, normalized
    // (its 1e-20), scale 2.5
    let v3 = GroupShape(if small() { 64 } else { 4096 }, 256, 8, 4, 8);
    for dtype in 0..3 {
        for bias in [Bias::F32, Bias::T] {
            let x = Extra { bias, weights_from: WeightsFrom::Scores, normalize: true, tie_break: TieBreak::LowerIndex, fill: f32::NEG_INFINITY, normalize_eps: 1e-20, normalize_min: 0.0, scale: 2.5, expert_scale: Bias::None, topk_group: 0, dtype };
            run_extra(g, &v3, Scoring::Sigmoid, GroupScore::Top2Sum, &x, &mut rng, &mut rep);
        }
    }
    // Gemma 4 (26B-A4B): softmax, k 8 of 128, normalized, then its learned per-expert scale
    let gemma = GroupShape(if small() { 64 } else { 4096 }, 128, 1, 1, 8);
    for dtype in 0..3 {
        for expert_scale in [Bias::F32, Bias::T] {
            let x = Extra { bias: Bias::None, weights_from: WeightsFrom::Scores, normalize: true, tie_break: TieBreak::LowerIndex, fill: f32::NEG_INFINITY, normalize_eps: 0.0, normalize_min: 0.0, scale: 1.0, expert_scale, topk_group: 0, dtype };
            run_extra(g, &gemma, Scoring::Softmax, GroupScore::Top2Sum, &x, &mut rng, &mut rep);
        }
    }
    let mut shapes = vec![
        GroupShape(64, 256, 8, 4, 8),
        GroupShape(37, 160, 8, 3, 6),   // DeepSeek-V2's groups (of 20)
        GroupShape(16, 64, 16, 1, 8),   // k above the 4 experts of one kept group
        GroupShape(9, 1024, 2, 1, 600), // groups of 512, k above them
        GroupShape(8, 64, 1, 1, 8),     // no groups: bias, weights_from, eps, scale alone
    ];
    if !small() {
        shapes.extend([
            GroupShape(1000, 160, 8, 3, 6),
            GroupShape(300, 100, 5, 1, 30), // E not a multiple of 32, k above the kept group's 20
            GroupShape(300, 39, 13, 12, 5), // groups of 3
            GroupShape(200, 16, 16, 2, 4),  // groups of 1 (max)
            GroupShape(64, 1024, 16, 15, 32),
            GroupShape(500, 512, 16, 8, 16),
            GroupShape(100, 96, 4, 2, 24),
            GroupShape(7, 8, 2, 1, 8), // k = E
            GroupShape(300, 257, 1, 1, 4),
            GroupShape(2048, 128, 1, 1, 8),
            GroupShape(0, 256, 8, 4, 8),
        ]);
    }
    // the options beyond the loops, drawn per case: over the ~150 cases each value comes often
    let mut case = 0usize;
    for shape in &shapes {
        let scorings: &[Scoring] = if shape.2 == 1 { &Scoring::ALL } else { &[Scoring::Softmax, Scoring::Sigmoid] };
        for &scoring in scorings {
            for score in GroupScore::ALL {
                for dtype in 0..3 {
                    let x = Extra {
                        bias: [Bias::None, Bias::F32, Bias::T][case % 3],
                        weights_from: if rng.random_range(0..2) == 0 { WeightsFrom::Scores } else { WeightsFrom::Choice },
                        normalize: rng.random_range(0..2) == 0,
                        tie_break: if rng.random_range(0..2) == 0 { TieBreak::LowerIndex } else { TieBreak::HigherIndex },
                        fill: if rng.random_range(0..2) == 0 { f32::NEG_INFINITY } else { 0.0 },
                        normalize_eps: if rng.random_range(0..2) == 0 { 0.0 } else { 1e-20 },
                        // a floor that never, sometimes (sigmoid sums of k) or always (softmax) holds
                        normalize_min: [0.0, 1e-12, 1.5][rng.random_range(0..3)],
                        scale: if rng.random_range(0..2) == 0 { 1.0 } else { 2.5 },
                        expert_scale: [Bias::None, Bias::F32, Bias::T][(case / 3 + rng.random_range(0..2)) % 3],
                        topk_group: (case / 3 + rng.random_range(0..3)) % 3,
                        dtype,
                    };
                    case += 1;
                    run_extra(g, shape, scoring, score, &x, &mut rng, &mut rep);
                }
            }
        }
    }
    rep.finish("topk_router bias and groups");
}
