//! Quantized weights through the CPU kernels against the float64 oracle (docs/op-spec.md,
//! "Quantized expert weights"): every format, scale layout and `T`, with fresh random inputs and
//! the awkward cases (one token, an expert with no token, all tokens on one expert, `in` not a
//! multiple of the group, odd `in` for 4-bit, 2-D blocks with partial blocks, zero points present
//! and absent, scales in `T` and in float32, one projection quantized and the other not).

use super::oracle64::{self, rel_err};
use crate::cpu::{
    parallel_linear, scatter_moe_with, Element, Indices, LinearInputs, LinearSizes, MoeInputs, MoeSizes, Pool, QuantWeight, Rayon, Scales, Scratch, Serial,
    Weight,
};
use crate::spec::{parallel_linear::Attrs as LinearAttrs, scatter_moe::Attrs, Activation, ElemType, GluLayout, Quant, QuantFormat, ScaleLayout};
use half::{bf16, f16};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// How one weight is stored in a case: None for `T`.
#[derive(Clone, Copy, Debug)]
struct Form {
    format: QuantFormat,
    layout: ScaleLayout,
    scale_f32: bool,
    zero_point: bool,
}

fn form(format: QuantFormat, layout: ScaleLayout, scale_f32: bool, zero_point: bool) -> Option<Form> {
    Some(Form { format, layout, scale_f32, zero_point })
}

const CHANNEL: ScaleLayout = ScaleLayout::PerChannel;

const fn blocks(block_out: u64, block_in: u64) -> ScaleLayout {
    ScaleLayout::Blocks { block_out, block_in }
}

/// A quantized weight's buffers: codes, scales as float32 and as `T` (the form's choice is
/// read from `quant.scale`), zero points.
type Stored<E> = (Quant, Vec<u8>, Vec<f32>, Vec<E>, Option<Vec<u8>>);

/// One weight's random data, stored as the op takes it, and its f64 values.
struct Data<E> {
    plain: Vec<E>,
    quant: Option<Stored<E>>,
    want: Vec<f64>,
}

impl<E: Element> Data<E> {
    /// `[experts, out, in_]` with values of magnitude about `mag`.
    fn random(rng: &mut StdRng, form: Option<Form>, experts: usize, out: usize, in_: usize, mag: f32) -> Self {
        let Some(fm) = form else {
            let plain: Vec<E> = (0..experts * out * in_).map(|_| E::from_f32(rng.random_range(-mag..mag))).collect();
            let want = plain.iter().map(|v| v.to_f32() as f64).collect();
            return Data { plain, quant: None, want };
        };
        let scale = if fm.scale_f32 { ElemType::F32 } else { elem::<E>() };
        let quant = Quant { format: fm.format, layout: fm.layout, scale, zero_point: fm.zero_point };
        let stored = fm.format.stored_in(in_ as u64) as usize;
        let codes: Vec<u8> = (0..experts * out * stored)
            .map(|_| match fm.format {
                // every finite code but the NaNs 0x7f and 0xff
                QuantFormat::Fp8E4M3Fn => loop {
                    let c: u8 = rng.random();
                    if c & 0x7f != 0x7f {
                        break c;
                    }
                },
                // both nibbles random: the padding nibble of an odd row must not matter
                _ => rng.random(),
            })
            .collect();
        let n_scales = quant.scale_shape(experts as u64, out as u64, in_ as u64).iter().product::<u64>() as usize;
        // codes reach 448 (fp8), 255 - z (8-bit), 15 - z (4-bit)
        let range = match fm.format {
            QuantFormat::Fp8E4M3Fn => 100.0,
            QuantFormat::Int8 => 128.0,
            QuantFormat::Int4 => 8.0,
        };
        let s32: Vec<f32> = (0..n_scales).map(|_| rng.random_range(0.5..1.5) * mag / range).collect();
        let st: Vec<E> = s32.iter().map(|&s| E::from_f32(s)).collect();
        let zp = fm.zero_point.then(|| {
            (0..n_scales).map(|_| if fm.format == QuantFormat::Int4 { rng.random_range(0..16) } else { rng.random_range(96..160) }).collect::<Vec<u8>>()
        });
        // the oracle reads the scales as stored
        let s64: Vec<f64> = if fm.scale_f32 { s32.iter().map(|&s| s as f64).collect() } else { st.iter().map(|s| s.to_f32() as f64).collect() };
        let want = oracle64::dequantize(&quant, &codes, &s64, zp.as_deref(), experts, out, in_);
        Data { plain: Vec::new(), quant: Some((quant, codes, s32, st, zp)), want }
    }

    fn weight(&self) -> Weight<'_, E> {
        match &self.quant {
            None => Weight::Plain(&self.plain),
            Some((quant, codes, s32, st, zp)) => Weight::Quant(QuantWeight {
                quant: *quant,
                codes,
                scales: if quant.scale == ElemType::F32 { Scales::F32(s32) } else { Scales::T(st) },
                zero_points: zp.as_deref(),
            }),
        }
    }
}

fn elem<E: Element>() -> ElemType {
    match std::mem::size_of::<E>() {
        4 => ElemType::F32,
        _ if E::from_f32(1.0 + 1.0 / 512.0).to_f32() != 1.0 => ElemType::F16,
        _ => ElemType::BF16,
    }
}

/// The contract's tolerance for `T`.
fn tolerance<E: Element>() -> f64 {
    match elem::<E>() {
        ElemType::F32 => 1e-4,
        ElemType::F16 => 1e-2,
        ElemType::BF16 => 3e-2,
    }
}

struct MoeCase {
    attrs: Attrs,
    d: usize,
    f: usize,
    experts: usize,
    k: usize,
    ri: Vec<i64>,
    w_in: Option<Form>,
    w_out: Option<Form>,
    bias: bool,
}

/// 13 tokens over 5 experts, k = 2: expert 4 takes every token, expert 3 none.
fn routing_13() -> Vec<i64> {
    [0, 1, 1, 2, 0, 1, 2, 1, 1, 0, 2, 1, 0].iter().flat_map(|&e| [e, 4]).collect()
}

fn moe(d: usize, f: usize, w_in: Option<Form>, w_out: Option<Form>) -> MoeCase {
    MoeCase { attrs: Attrs::default(), d, f, experts: 5, k: 2, ri: routing_13(), w_in, w_out, bias: true }
}

/// ScatterMoE's relative error against the oracle with storage `E`.
fn moe_error<E: Element>(c: &MoeCase, pool: &dyn Pool, seed: u64) -> f64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let (tokens, n) = (c.ri.len() / c.k, if c.attrs.gated { 2 * c.f } else { c.f });
    let mut vals = |len: usize, mag: f32| -> Vec<E> { (0..len).map(|_| E::from_f32(rng.random_range(-mag..mag))).collect() };
    let (x, rw) = (vals(tokens * c.d, 2.0), vals(tokens * c.k, 1.0));
    let b_in = c.bias.then(|| vals(c.experts * n, 0.5));
    let b_out = c.bias.then(|| vals(c.experts * c.d, 0.5));
    let w_in = Data::<E>::random(&mut rng, c.w_in, c.experts, n, c.d, 1.0 / (c.d as f32).sqrt());
    let w_out = Data::<E>::random(&mut rng, c.w_out, c.experts, c.d, c.f, 1.0 / (c.f as f32).sqrt());
    let wide = |v: &[E]| -> Vec<f64> { v.iter().map(|v| v.to_f32() as f64).collect() };
    let (b_in64, b_out64) = (b_in.as_deref().map(wide), b_out.as_deref().map(wide));
    let want = oracle64::scatter_moe(
        &c.attrs,
        tokens,
        c.k,
        c.experts,
        c.d,
        c.f,
        &oracle64::Moe {
            x: &wide(&x),
            rw: &wide(&rw),
            ri: &c.ri,
            w_in: &w_in.want,
            w_out: &w_out.want,
            b_in: b_in64.as_deref(),
            b_out: b_out64.as_deref(),
            capacity: None,
        },
    );
    let inp = MoeInputs {
        x: &x,
        routing_weights: &rw,
        routing_indices: Indices::I64(&c.ri),
        w_in: w_in.weight(),
        w_out: w_out.weight(),
        b_in: b_in.as_deref(),
        b_out: b_out.as_deref(),
        capacity: None,
    };
    let s = MoeSizes { tokens, k: c.k, experts: c.experts, d: c.d, f: c.f };
    let mut scratch = Scratch::default();
    // poisoned: a value the call does not write shows as NaN
    scratch.buffers([c.ri.len() * (c.d + c.f); 3]).iter_mut().for_each(|b| b.fill(f32::NAN));
    let mut y = vec![E::from_f32(f32::NAN); tokens * c.d];
    scatter_moe_with(pool, &c.attrs, s, &inp, None, &mut scratch, &mut y).unwrap();
    rel_err(&y.iter().map(|v| v.to_f32()).collect::<Vec<f32>>(), &want)
}

/// Runs the case with f32, f16 and bf16 storage against the contract's tolerances.
fn check_moe(c: &MoeCase, what: &str) {
    for (name, err, tol) in [
        ("f32", moe_error::<f32>(c, &Rayon, 1), tolerance::<f32>()),
        ("f16", moe_error::<f16>(c, &Rayon, 2), tolerance::<f16>()),
        ("bf16", moe_error::<bf16>(c, &Rayon, 3), tolerance::<bf16>()),
    ] {
        assert!(err < tol, "{what} ({name}): rel err {err:e} over {tol:e}");
    }
}

use QuantFormat::{Fp8E4M3Fn as FP8, Int4 as INT4, Int8 as INT8};

#[test]
fn fp8_table_matches_the_oracles_definition() {
    for c in 0..=255u8 {
        let (got, want) = (crate::cpu::quant::FP8_E4M3FN[c as usize] as f64, oracle64::fp8_e4m3fn(c));
        assert!(got == want || (got.is_nan() && want.is_nan()), "code {c:#04x}: {got} vs {want}");
    }
}

#[test]
fn fp8_per_channel_and_blocks() {
    // d 37 and f 45: no size a multiple of a block
    check_moe(&moe(37, 45, form(FP8, CHANNEL, true, false), form(FP8, CHANNEL, false, false)), "fp8 per channel");
    check_moe(&moe(37, 45, form(FP8, blocks(16, 16), false, false), form(FP8, blocks(8, 32), true, false)), "fp8 blocks");
}

#[test]
fn int4_group_wise_with_partial_groups_and_odd_in() {
    // w_in: in = d = 75 (odd: a padding nibble a row; groups of 32: 11 values in the last);
    // w_out: in = f = 40 (one full group of 32, one of 8)
    for zp in [true, false] {
        for scale_f32 in [true, false] {
            let g = form(INT4, blocks(1, 32), scale_f32, zp);
            check_moe(&moe(75, 40, g, g), &format!("int4 [1, 32] zp={zp} f32 scales={scale_f32}"));
        }
    }
    // groups of 64 and 128 (QMoE's and AWQ's), one partial group each
    check_moe(&moe(75, 40, form(INT4, blocks(1, 64), true, true), form(INT4, blocks(1, 128), false, false)), "int4 [1, 64] / [1, 128]");
    // groups of an odd width: every other group starts on a high nibble
    check_moe(&moe(75, 40, form(INT4, blocks(3, 5), true, true), form(INT4, blocks(3, 5), false, false)), "int4 [3, 5]");
    // per channel, d odd
    check_moe(&moe(21, 7, form(INT4, CHANNEL, false, true), form(INT4, CHANNEL, true, false)), "int4 per channel odd d and f");
}

#[test]
fn int8_two_d_blocks_with_partial_blocks() {
    // w_in [E, 272, 200]: 3 x 2 blocks of 128 x 128, the last of each partial; w_out [E, 200, 136]: 2 x 2
    let c = MoeCase {
        experts: 3,
        ri: vec![0, 2, 2, 1, 0, 2, 1, 1, 2, 0],
        ..moe(200, 136, form(INT8, blocks(128, 128), true, false), form(INT8, blocks(128, 128), false, true))
    };
    check_moe(&c, "int8 [128, 128]");
    let c = MoeCase { experts: 3, ri: vec![2, 1, 0, 2, 1, 1], ..moe(130, 136, form(FP8, blocks(128, 128), true, false), form(INT8, CHANNEL, true, true)) };
    check_moe(&c, "fp8 [128, 128] then int8 per channel");
}

#[test]
fn one_projection_quantized_the_other_in_t() {
    check_moe(&moe(37, 45, form(INT4, blocks(1, 16), true, true), None), "w_in int4, w_out in T");
    check_moe(&moe(37, 45, None, form(FP8, blocks(1, 16), false, false)), "w_in in T, w_out fp8");
    check_moe(&moe(37, 45, None, form(INT8, CHANNEL, true, false)), "w_in in T, w_out int8");
}

#[test]
fn awkward_routings() {
    let q = form(INT4, blocks(1, 16), true, true);
    let f8 = form(FP8, CHANNEL, true, false);
    // one token
    check_moe(&MoeCase { ri: vec![3, 1], ..moe(40, 24, q, f8) }, "one token");
    check_moe(&MoeCase { ri: vec![2], k: 1, ..moe(33, 17, f8, q) }, "one token, k = 1");
    // all tokens on one expert (the others have none)
    check_moe(&MoeCase { ri: vec![4; 26], ..moe(40, 24, q, f8) }, "all on expert 4");
    // the serial pool gives the same as the parallel one
    let c = moe(37, 45, q, f8);
    assert_eq!(moe_error::<f32>(&c, &Serial, 9), moe_error::<f32>(&c, &Rayon, 9));
}

#[test]
fn every_activation_and_layout_with_row_blocks() {
    // blocks of 2 rows x 8 inputs: a gated w_in's gate and up rows share blocks in every layout
    let q = form(INT4, blocks(2, 8), true, true);
    let q8 = form(INT8, blocks(3, 8), false, false);
    for activation in Activation::ALL {
        for gated in [false, true] {
            if activation.gated_only() && !gated {
                continue;
            }
            let layouts: &[GluLayout] = if gated { &GluLayout::ALL } else { &[GluLayout::GateUp] };
            for &glu_layout in layouts {
                let attrs = Attrs { activation, gated, glu_layout, limit: 1.5, ..Attrs::default() };
                let c = MoeCase { attrs, bias: false, ..moe(19, 13, q, q8) };
                check_moe(&c, &format!("{activation:?} gated={gated} {glu_layout:?}"));
            }
        }
    }
}

/// ParallelLinear with a quantized W, every output form, against the oracle's z(t, j).
fn linear_error<E: Element>(attrs: LinearAttrs, gates: bool, w_form: Option<Form>, seed: u64) -> f64 {
    let (tokens, k, experts, d_in, d_out) = (13, 2, 5, 37, 29);
    let ri = routing_13();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut vals = |len: usize, lo: f32, hi: f32| -> Vec<E> { (0..len).map(|_| E::from_f32(rng.random_range(lo..hi))).collect() };
    let rows = if attrs.grouped_in { tokens * k } else { tokens };
    let (x, b, g) = (vals(rows * d_in, -1.0, 1.0), vals(experts * d_out, -0.5, 0.5), vals(tokens * k, 0.0, 1.0));
    let w = Data::<E>::random(&mut rng, w_form, experts, d_out, d_in, 1.0 / (d_in as f32).sqrt());
    let wide = |v: &[E]| -> Vec<f64> { v.iter().map(|v| v.to_f32() as f64).collect() };
    // grouped order: the stable sort of the assignments by expert
    let mut order: Vec<usize> = (0..tokens * k).collect();
    order.sort_by_key(|&i| ri[i]);
    let mut pos = vec![0; tokens * k];
    order.iter().enumerate().for_each(|(r, &i)| pos[i] = r);
    // one input row per assignment, in flat order, for the oracle
    let x64 = wide(&x);
    let x_flat: Vec<f64> = (0..tokens * k)
        .flat_map(|i| {
            let r = if attrs.grouped_in { pos[i] } else { i / k };
            x64[r * d_in..(r + 1) * d_in].to_vec()
        })
        .collect();
    let z = oracle64::parallel_linear(&x_flat, &ri, &w.want, Some(&wide(&b)), 1, d_in, d_out);
    let want: Vec<f64> = if gates {
        (0..tokens).flat_map(|t| (0..d_out).map(|c| (0..k).map(|j| g[t * k + j].to_f32() as f64 * z[t * k + j][c]).sum::<f64>()).collect::<Vec<_>>()).collect()
    } else if attrs.grouped_out {
        order.iter().flat_map(|&i| z[i].clone()).collect()
    } else {
        z.concat()
    };
    let inp = LinearInputs { x: &x, routing_indices: Indices::I64(&ri), w: w.weight(), b: Some(&b), gates: gates.then_some(&g[..]) };
    let mut y = vec![E::from_f32(f32::NAN); want.len()];
    parallel_linear(&Rayon, &attrs, LinearSizes { tokens, k, experts, d_in, d_out }, &inp, &mut y).unwrap();
    rel_err(&y.iter().map(|v| v.to_f32()).collect::<Vec<f32>>(), &want)
}

#[test]
fn parallel_linear_quantized_in_every_output_form() {
    let forms = [
        form(INT4, blocks(1, 16), true, true),
        form(INT4, CHANNEL, false, false),
        form(INT8, blocks(8, 8), false, true),
        form(FP8, blocks(16, 32), true, false),
        form(FP8, CHANNEL, false, false),
    ];
    for (i, w_form) in forms.into_iter().enumerate() {
        for (grouped_in, grouped_out, gates) in [(false, false, false), (false, true, false), (true, false, false), (true, false, true), (false, false, true)] {
            let attrs = LinearAttrs { grouped_in, grouped_out, ..Default::default() };
            let what = format!("{w_form:?} grouped_in={grouped_in} grouped_out={grouped_out} gates={gates}");
            let seed = 100 + i as u64;
            for (name, err, tol) in [
                ("f32", linear_error::<f32>(attrs, gates, w_form, seed), tolerance::<f32>()),
                ("f16", linear_error::<f16>(attrs, gates, w_form, seed), tolerance::<f16>()),
                ("bf16", linear_error::<bf16>(attrs, gates, w_form, seed), tolerance::<bf16>()),
            ] {
                assert!(err < tol, "{what} ({name}): rel err {err:e} over {tol:e}");
            }
        }
    }
    // the harness itself: W in T through the same comparison
    assert!(linear_error::<f32>(LinearAttrs::default(), true, None, 7) < 1e-5);
}
