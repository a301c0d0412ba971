//! Quantized expert weights on the GPU (kernels/quant_gemm.cu, through `forward::scatter_moe` and
//! `forward::parallel_linear` with `QuantW`) against the float64 oracle: the weights dequantized
//! in float64 by docs/op-spec.md's formula (`oracle64::dequantize`), then the layer in float64
//! (`oracle64::scatter_moe`, `oracle64::parallel_linear`). Every format (fp8 e4m3fn, 8-bit,
//! packed 4-bit) x block form (per output channel, groups along the input, 2-D blocks, blocks that
//! are not whole 8-element chunks) x T (float16, bfloat16), scales in T and float32, zero points
//! given and default; one token, experts with no token, all tokens on one expert, `in` not a
//! multiple of the group, partial 2-D blocks, 4-bit rows of odd length; every mma.sync tile; one
//! weight quantized and the other in T; float32 refused. Codes are drawn at random (both nibbles
//! of every byte, the pad nibble of odd rows too), not quantized from floats: every code is used.

use super::*;
use scattermoe::cuda::forward::QuantW;
use scattermoe::reference::oracle64;
use scattermoe::spec::{Quant, QuantFormat, ScaleLayout};

/// How one weight is quantized in a case: format, scale layout, float32 scales (else T), zero
/// points given (else the format's default).
#[derive(Clone, Copy, Debug)]
struct Form {
    format: QuantFormat,
    layout: ScaleLayout,
    scale_f32: bool,
    zero_point: bool,
}

fn form(format: QuantFormat, block: Option<[u64; 2]>, scale_f32: bool, zero_point: bool) -> Form {
    let layout = block.map_or(ScaleLayout::PerChannel, |[block_out, block_in]| ScaleLayout::Blocks { block_out, block_in });
    Form { format, layout, scale_f32, zero_point: zero_point && format != QuantFormat::Fp8E4M3Fn }
}

fn form_name(f: &Option<Form>) -> String {
    match f {
        None => "T".into(),
        Some(f) => {
            let fmt = forward::format_name(f.format);
            let blocks = match f.layout {
                ScaleLayout::PerChannel => "channel".to_string(),
                ScaleLayout::Blocks { block_out, block_in } => format!("{block_out}x{block_in}"),
            };
            format!("{fmt} {blocks}{}{}", if f.scale_f32 { " f32-scale" } else { "" }, if f.zero_point { " zp" } else { "" })
        }
    }
}

/// A weight on the device, in T or quantized, with its float64 value.
struct DevWeight {
    data: CudaSlice<u8>,
    scale: Option<CudaSlice<u8>>,
    zero: Option<CudaSlice<u8>>,
    quant: Option<Quant>,
    w64: Vec<f64>,
}

impl DevWeight {
    fn quant_w(&self, g: &Gpu) -> Option<QuantW> {
        self.quant.map(|quant| QuantW { quant, scale: g.ptr(self.scale.as_ref().unwrap()), zero: self.zero.as_ref().map(|z| g.ptr(z)) })
    }
}

/// A random weight `[experts, out, in_]`: in T (`form` None), or codes, scales and zero points as
/// the contract stores them.
fn draw_weight<E: Elem>(g: &Gpu, rng: &mut StdRng, experts: usize, out: usize, in_: usize, form: Option<Form>) -> DevWeight {
    let spread = 1.0 / (in_ as f32).sqrt();
    let Some(f) = form else {
        let w: Vec<E> = conv(&(0..experts * out * in_).map(|_| rng.random_range(-2.0..2.0) * spread).collect::<Vec<f32>>());
        let w64 = w.iter().map(|v| v.to_f32() as f64).collect();
        return DevWeight { data: g.upload(&bytes_of(&w)), scale: None, zero: None, quant: None, w64 };
    };
    let quant = Quant { format: f.format, layout: f.layout, scale: if f.scale_f32 { ElemType::F32 } else { E::T }, zero_point: f.zero_point };
    let stored = f.format.stored_in(in_ as u64) as usize;
    let mut codes: Vec<u8> = (0..experts * out * stored).map(|_| rng.random::<u8>()).collect();
    let unit = match f.format {
        // exponent bits 6..3 below 8: |value| <= 1.875, subnormals included; no NaN code
        QuantFormat::Fp8E4M3Fn => {
            codes.iter_mut().for_each(|c| *c &= 0xBF);
            1.0
        }
        QuantFormat::Int8 => 1.0 / 128.0,
        QuantFormat::Int4 => 1.0 / 8.0,
    };
    let n_scales: u64 = quant.scale_shape(experts as u64, out as u64, in_ as u64).iter().product();
    let raw: Vec<f32> = (0..n_scales).map(|i| unit * spread * rng.random_range(0.5..1.5) * if i % 7 == 3 { -1.0 } else { 1.0 }).collect();
    let (scale_bytes, scales64): (Vec<u8>, Vec<f64>) = if f.scale_f32 {
        (bytes_of(&raw), raw.iter().map(|&v| v as f64).collect())
    } else {
        let t: Vec<E> = conv(&raw);
        (bytes_of(&t), t.iter().map(|v| v.to_f32() as f64).collect())
    };
    let zero: Option<Vec<u8>> = f.zero_point.then(|| {
        (0..n_scales)
            .map(|_| match f.format {
                QuantFormat::Int4 => rng.random_range(0..16u8),
                _ => rng.random_range(100..156u8),
            })
            .collect()
    });
    let w64 = oracle64::dequantize(&quant, &codes, &scales64, zero.as_deref(), experts, out, in_);
    DevWeight { data: g.upload(&codes), scale: Some(g.upload(&scale_bytes)), zero: zero.as_ref().map(|z| g.upload(z)), quant: Some(quant), w64 }
}

#[derive(Clone, Debug)]
struct QCase {
    tokens: usize,
    k: usize,
    experts: usize,
    d: usize,
    f: usize,
    routing: Routing,
    w_in: Option<Form>,
    w_out: Option<Form>,
    /// every quantized tile forced on both GEMMs too
    all_cfgs: bool,
}

fn qcases() -> Vec<QCase> {
    use QuantFormat::*;
    let c = |tokens, k, experts, d, f, routing, w_in, w_out| QCase { tokens, k, experts, d, f, routing, w_in, w_out, all_cfgs: false };
    let mut v = Vec::new();
    // every format x block form, at one token and at 16 (decode), every tile forced on some
    let blocks: [Option<[u64; 2]>; 6] = [None, Some([1, 32]), Some([1, 64]), Some([1, 128]), Some([128, 128]), Some([1, 20])];
    for (fi, format) in [Fp8E4M3Fn, Int8, Int4].into_iter().enumerate() {
        for (bi, block) in blocks.into_iter().enumerate() {
            let (f32s, zp) = ((fi + bi) % 2 == 1, bi % 3 != 0);
            let q = Some(form(format, block, f32s, zp));
            v.push(QCase { all_cfgs: bi % 2 == 0, ..c(1, 2, 8, 256, 128, Routing::Random, q, q) });
            if !small() {
                v.push(c(16, 2, 8, 256, 192, Routing::Random, q, q));
            }
        }
    }
    // awkward shapes: d not a multiple of the group (element-wise loads: d % 16 != 0), odd rows
    // (4-bit pad nibble), partial 2-D blocks both ways, a 3x7 block (the per-element path)
    v.push(QCase {
        all_cfgs: true,
        ..c(37, 2, 4, 200, 72, Routing::Random, Some(form(Int4, Some([1, 64]), false, true)), Some(form(Int4, Some([1, 64]), true, false)))
    });
    v.push(c(9, 2, 4, 201, 37, Routing::Random, Some(form(Int4, Some([1, 32]), true, true)), Some(form(Int8, Some([1, 32]), false, false))));
    v.push(QCase {
        all_cfgs: true,
        ..c(20, 1, 3, 200, 144, Routing::Random, Some(form(Fp8E4M3Fn, Some([128, 128]), true, false)), Some(form(Fp8E4M3Fn, Some([128, 128]), true, false)))
    });
    v.push(c(20, 2, 3, 96, 40, Routing::Random, Some(form(Int8, Some([3, 7]), false, true)), Some(form(Int4, Some([3, 7]), true, true))));
    // routing: all tokens on one expert, most experts without a token
    v.push(c(300, 1, 16, 256, 128, Routing::All(5), Some(form(Fp8E4M3Fn, None, false, false)), Some(form(Fp8E4M3Fn, None, false, false))));
    v.push(c(64, 2, 64, 256, 128, Routing::Few(3), Some(form(Int4, Some([1, 128]), false, true)), Some(form(Int4, Some([1, 128]), false, true))));
    // one weight quantized, the other in T
    v.push(c(16, 2, 8, 256, 128, Routing::Random, Some(form(Int4, Some([1, 128]), false, false)), None));
    v.push(c(16, 2, 8, 256, 128, Routing::Random, None, Some(form(Fp8E4M3Fn, Some([1, 128]), true, false))));
    if !small() {
        // rows per expert past the small tiles: 128x128 and 32x64 by the choice
        v.push(c(1000, 2, 8, 1024, 384, Routing::Random, Some(form(Fp8E4M3Fn, Some([128, 128]), true, false)), Some(form(Int4, Some([1, 128]), false, true))));
        v.push(c(1024, 2, 4, 1024, 256, Routing::Random, Some(form(Int8, None, false, true)), Some(form(Int8, Some([1, 64]), true, false))));
    }
    v
}

fn run_qmoe<E: Elem>(g: &Gpu, c: &QCase, rng: &mut StdRng, rep: &mut Report) {
    let s = MoeSizes { tokens: c.tokens, k: c.k, experts: c.experts, d: c.d, f: c.f };
    let attrs = scatter_moe::Attrs { gated: true, activation: Activation::Silu, ..Default::default() };
    let x: Vec<E> = conv(&(0..c.tokens * c.d).map(|_| rng.random_range(-1.0..1.0)).collect::<Vec<f32>>());
    let rw: Vec<E> = conv(&(0..c.tokens * c.k).map(|_| rng.random_range(0.05..1.0)).collect::<Vec<f32>>());
    let idx = draw_routing(rng, c.tokens, c.k, c.experts, c.routing);
    let w_in = draw_weight::<E>(g, rng, c.experts, 2 * c.f, c.d, c.w_in);
    let w_out = draw_weight::<E>(g, rng, c.experts, c.d, c.f, c.w_out);
    let f64s = |v: &[E]| v.iter().map(|x| x.to_f32() as f64).collect::<Vec<f64>>();
    let (x64, rw64) = (f64s(&x), f64s(&rw));
    let m = oracle64::Moe { x: &x64, rw: &rw64, ri: &idx, w_in: &w_in.w64, w_out: &w_out.w64, b_in: None, b_out: None, capacity: None };
    let want = oracle64::scatter_moe(&attrs, c.tokens, c.k, c.experts, c.d, c.f, &m);

    let (dx, drw, didx) = (g.upload(&bytes_of(&x)), g.upload(&bytes_of(&rw)), g.upload(&index_bytes(&idx, IndexType::I64)));
    let ptrs = MoePtrs {
        x: g.ptr(&dx),
        routing_weights: g.ptr(&drw),
        routing_indices: g.ptr(&didx),
        w_in: g.ptr(&w_in.data),
        w_out: g.ptr(&w_out.data),
        w_in_quant: w_in.quant_w(g),
        w_out_quant: w_out.quant_w(g),
        ..Default::default()
    };
    let ws = g.poisoned(Plan::scatter_moe(s, E::T, false).bytes);
    let ybytes = c.tokens * c.d * E::T.size_bytes();
    let y = g.poisoned(ybytes);
    let st = g.stream.cu_stream();
    let name = format!(
        "quantized ScatterMoE {} T={} k={} E={} d={} f={} {:?} w_in {} w_out {}",
        E::T.name(),
        c.tokens,
        c.k,
        c.experts,
        c.d,
        c.f,
        c.routing,
        form_name(&c.w_in),
        form_name(&c.w_out)
    );
    let mut cfgs: Vec<Option<GemmCfg>> = vec![None];
    if c.all_cfgs {
        cfgs.extend(GemmCfg::TENSOR_CORE.into_iter().filter(|q| q.has_quant()).map(Some));
    }
    for cfg in cfgs {
        let label = match cfg {
            None => {
                // the scale block along K of each quantized W (the choice reads it); a 16-bit W's
                // GEMM takes pick_cfg's choice, not shown
                let block_in = |f: &Option<Form>, kd: usize| match f.as_ref().map(|f| f.layout) {
                    Some(ScaleLayout::Blocks { block_in, .. }) => (block_in as usize).min(kd),
                    _ => kd,
                };
                let pick = |f: &Option<Form>, kd| forward::pick_quant_cfg(c.tokens * c.k, c.experts, kd, g.dev.arch, block_in(f, kd)).suffix();
                format!("{name} [auto {}/{}]", pick(&c.w_in, c.d), pick(&c.w_out, c.f))
            }
            Some(q) => format!("{name} [cfg {}]", q.suffix()),
        };
        let r = unsafe { forward::scatter_moe(g.dev, st, &attrs, E::T, IndexType::I64, s, None, &ptrs, g.ptr(&ws), g.ptr(&y), (cfg, cfg), None) };
        let launched = match r {
            Ok(l) => l,
            Err(e) => {
                rep.exact(&label, false, &e);
                continue;
            }
        };
        let msg = unsafe { forward::check_sync(st, launched.error.unwrap(), scatter_moe::NAME, IndexType::I64, ptrs.routing_indices, c.k, c.experts) };
        if let Ok(Some(m)) | Err(m) = &msg {
            rep.exact(&label, false, &format!("unexpected error report: {m}"));
            continue;
        }
        let got: Vec<f32> = from_bytes::<E>(&g.download(&y, ybytes)).iter().map(|v| v.to_f32()).collect();
        rep.add(&label, oracle64::rel_err(&got, &want), E::TOL);
        unsafe { driver::check(sys::cuMemsetD8Async(g.ptr(&y), 0xff, ybytes, st), "memset").unwrap() };
    }
}

/// ParallelLinear with a quantized W: scattered rows in, one output row per assignment, and the
/// gates' combination over k.
fn run_qlinear<E: Elem>(g: &Gpu, rng: &mut StdRng, rep: &mut Report, s: LinearSizes, wf: Form, gates: bool) {
    let LinearSizes { tokens, k, experts, d_in, d_out } = s;
    let attrs = parallel_linear::Attrs::default();
    let x: Vec<E> = conv(&(0..tokens * d_in).map(|_| rng.random_range(-1.0..1.0)).collect::<Vec<f32>>());
    let idx = draw_routing(rng, tokens, k, experts, Routing::Random);
    let w = draw_weight::<E>(g, rng, experts, d_out, d_in, Some(wf));
    let gv: Option<Vec<E>> = gates.then(|| conv(&(0..tokens * k).map(|_| rng.random_range(0.05..1.0)).collect::<Vec<f32>>()));
    let x64: Vec<f64> = x.iter().map(|v| v.to_f32() as f64).collect();
    let z = oracle64::parallel_linear(&x64, &idx, &w.w64, None, k, d_in, d_out);
    let want: Vec<f64> = match &gv {
        // Y[t] = sum_j gates[t, j] z(t, j)
        Some(gv) => (0..tokens * d_out).map(|i| (0..k).map(|j| gv[(i / d_out) * k + j].to_f32() as f64 * z[(i / d_out) * k + j][i % d_out]).sum()).collect(),
        None => z.concat(),
    };
    let (dx, didx) = (g.upload(&bytes_of(&x)), g.upload(&index_bytes(&idx, IndexType::I64)));
    let dg = gv.as_ref().map(|v| g.upload(&bytes_of(v)));
    let ptrs =
        LinearPtrs { x: g.ptr(&dx), routing_indices: g.ptr(&didx), w: g.ptr(&w.data), b: None, gates: dg.as_ref().map(|v| g.ptr(v)), w_quant: w.quant_w(g) };
    let ws = g.poisoned(Plan::parallel_linear(s, E::T, gates).bytes);
    let ybytes = want.len() * E::T.size_bytes();
    let y = g.poisoned(ybytes);
    let st = g.stream.cu_stream();
    let name = format!(
        "quantized ParallelLinear {} T={tokens} k={k} E={experts} d_in={d_in} d_out={d_out} W {}{}",
        E::T.name(),
        form_name(&Some(wf)),
        if gates { " gates" } else { "" }
    );
    match unsafe { forward::parallel_linear(g.dev, st, &attrs, E::T, IndexType::I64, s, &ptrs, g.ptr(&ws), g.ptr(&y), None, None) } {
        Err(e) => rep.exact(&name, false, &e),
        Ok(l) => {
            let msg = unsafe { forward::check_sync(st, l.error.unwrap(), parallel_linear::NAME, IndexType::I64, ptrs.routing_indices, k, experts) };
            if let Ok(Some(m)) | Err(m) = &msg {
                rep.exact(&name, false, &format!("unexpected error report: {m}"));
                return;
            }
            let got: Vec<f32> = from_bytes::<E>(&g.download(&y, ybytes)).iter().map(|v| v.to_f32()).collect();
            rep.add(&name, oracle64::rel_err(&got, &want), E::TOL);
        }
    }
}

#[test]
fn quantized_weights_match_the_float64_oracle() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(23);
    let mut rep = Report::new();
    for c in qcases() {
        run_qmoe::<f16>(g, &c, &mut rng, &mut rep);
        run_qmoe::<bf16>(g, &c, &mut rng, &mut rep);
    }
    use QuantFormat::*;
    for (wf, gates) in
        [(form(Fp8E4M3Fn, Some([1, 64]), false, false), false), (form(Int4, Some([1, 32]), true, true), true), (form(Int8, None, false, true), true)]
    {
        run_qlinear::<f16>(g, &mut rng, &mut rep, LinearSizes { tokens: 100, k: 2, experts: 8, d_in: 200, d_out: 72 }, wf, gates);
        run_qlinear::<bf16>(g, &mut rng, &mut rep, LinearSizes { tokens: 7, k: 4, experts: 16, d_in: 256, d_out: 130 }, wf, gates);
    }
    // float32 with a quantized weight: refused (the device ops refuse it first, by name)
    let s = MoeSizes { tokens: 4, k: 1, experts: 2, d: 16, f: 8 };
    let attrs = scatter_moe::Attrs { gated: true, ..Default::default() };
    let w = draw_weight::<bf16>(g, &mut rng, 2, 16, 16, Some(form(Fp8E4M3Fn, None, true, false)));
    let ws = g.poisoned(Plan::scatter_moe(s, ElemType::F32, false).bytes);
    let (dx, didx) = (g.poisoned(4 * 16 * 4), g.upload(&bytes_of(&[0i64, 1, 0, 1])));
    let ptrs = MoePtrs {
        x: g.ptr(&dx),
        routing_weights: g.ptr(&dx),
        routing_indices: g.ptr(&didx),
        w_in: g.ptr(&w.data),
        w_out: g.ptr(&dx),
        w_in_quant: w.quant_w(g),
        ..Default::default()
    };
    let y = g.poisoned(4 * 16 * 4);
    let r = unsafe {
        forward::scatter_moe(g.dev, g.stream.cu_stream(), &attrs, ElemType::F32, IndexType::I64, s, None, &ptrs, g.ptr(&ws), g.ptr(&y), (None, None), None)
    };
    rep.exact("quantized weight with float32 refused", r.as_ref().is_err_and(|e| e.contains("float16 or bfloat16")), &format!("{r:?}"));
    g.stream.synchronize().unwrap();
    rep.finish("quantized weights");
}
