//! The CUDA forward passes (`scattermoe::cuda::forward`, launched from Rust through cudarc on a
//! stream made here) against the CPU reference (`scattermoe::reference`): ScatterMoE,
//! ParallelLinear, CapacityMask (and TopKRouter: gpu_forward/router.rs) over float32/float16/bfloat16, k in {1, 2, 8}, E in {1, 8, 64,
//! 256}, T in {0, 1, 3, 64, 1000, 4096, 65536}, gated and plain, biases, capacity, skewed routing,
//! widths that are not multiples of 8, every GEMM kernel configuration, and bad indices; quantized
//! expert weights against the float64 oracle (gpu_forward/quant.rs).
//!
//! Without a CUDA driver or GPU every test prints "skipped: ..." and passes.
//! `SCATTERMOE_GPU_SMALL=1` runs a reduced case set (for compute-sanitizer).
//! Relative error = max|gpu - cpu| / max|cpu|; tolerances 1e-4 (f32), 1e-2 (f16), 3e-2 (bf16).

use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use scattermoe::cuda::driver::{self, Device};
use scattermoe::cuda::forward::{self, GemmCfg, LinearPtrs, MoePtrs, Plan};
use scattermoe::reference::{self, Element, Indices, LinearInputs, LinearSizes, MoeInputs, MoeSizes};
use scattermoe::spec::{capacity_mask, parallel_linear, scatter_moe, Activation, CapacityOrder, ElemType, GluLayout, IndexType};
use std::sync::{Arc, OnceLock};

fn small() -> bool {
    std::env::var("SCATTERMOE_GPU_SMALL").is_ok_and(|v| v == "1")
}

struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    dev: &'static Device,
}

/// The GPU, or None (with the reason printed) when there is none. One context and stream for
/// the whole process: dropping cudarc's last handle would release the primary context.
fn gpu() -> Option<&'static Gpu> {
    static GPU: OnceLock<Option<Gpu>> = OnceLock::new();
    let g = GPU.get_or_init(|| {
        if driver::device_count() == 0 {
            let why = driver::driver().err().unwrap_or_else(|| "no CUDA device".into());
            eprintln!("skipped: no CUDA driver/GPU ({why})");
            return None;
        }
        if let Err(e) = scattermoe::cuda::image("grouped_gemm") {
            eprintln!("skipped: {e}");
            return None;
        }
        let ctx = CudaContext::new(0).expect("CUDA context");
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().expect("stream");
        let (dev, guard) = unsafe { driver::for_stream(stream.cu_stream()) }.expect("load the kernels");
        drop(guard);
        eprintln!("device: {} SMs, compute capability {}.{}", dev.sms, dev.cc.0, dev.cc.1);
        Some(Gpu { ctx, stream, dev })
    });
    match g {
        Some(g) => {
            g.ctx.bind_to_thread().expect("bind the context");
            Some(g)
        }
        None => {
            eprintln!("skipped: no CUDA driver/GPU");
            None
        }
    }
}

fn bytes_of<E: Copy>(v: &[E]) -> Vec<u8> {
    // SAFETY: f32/f16/bf16/i32/i64/u8 are plain data.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }.to_vec()
}

fn from_bytes<E: Copy + Default>(b: &[u8]) -> Vec<E> {
    let n = b.len() / std::mem::size_of::<E>();
    let mut v = vec![E::default(); n];
    // SAFETY: as above; lengths match.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), v.as_mut_ptr().cast::<u8>(), n * std::mem::size_of::<E>()) };
    v
}

impl Gpu {
    fn upload(&self, b: &[u8]) -> CudaSlice<u8> {
        if b.is_empty() {
            return self.stream.alloc_zeros::<u8>(16).unwrap();
        }
        self.stream.clone_htod(b).unwrap()
    }

    /// `bytes` of device memory poisoned with 0xFF (NaN in every float type).
    fn poisoned(&self, bytes: usize) -> CudaSlice<u8> {
        let s = self.stream.alloc_zeros::<u8>(bytes.max(16)).unwrap();
        let p = self.ptr(&s);
        unsafe { driver::check(sys::cuMemsetD8Async(p, 0xff, bytes.max(16), self.stream.cu_stream()), "memset").unwrap() };
        s
    }

    fn ptr(&self, s: &CudaSlice<u8>) -> sys::CUdeviceptr {
        s.device_ptr(&self.stream).0
    }

    fn download(&self, s: &CudaSlice<u8>, bytes: usize) -> Vec<u8> {
        let mut v = self.stream.clone_dtoh(s).unwrap();
        v.truncate(bytes);
        v
    }
}

/// Element types under test, with their tolerance.
trait Elem: Element + Default + std::fmt::Debug {
    const T: ElemType;
    const TOL: f64;
}
impl Elem for f32 {
    const T: ElemType = ElemType::F32;
    const TOL: f64 = 1e-4;
}
impl Elem for f16 {
    const T: ElemType = ElemType::F16;
    const TOL: f64 = 1e-2;
}
impl Elem for bf16 {
    const T: ElemType = ElemType::BF16;
    const TOL: f64 = 3e-2;
}

fn rel_err<E: Element>(gpu: &[E], cpu: &[E]) -> f64 {
    assert_eq!(gpu.len(), cpu.len());
    let mut diff = 0f64;
    let mut max = 0f64;
    for (a, b) in gpu.iter().zip(cpu) {
        let (a, b) = (a.to_f32() as f64, b.to_f32() as f64);
        let d = (a - b).abs();
        if d.is_nan() {
            return f64::INFINITY;
        }
        diff = diff.max(d);
        max = max.max(b.abs());
    }
    if max == 0.0 {
        diff
    } else {
        diff / max
    }
}

fn conv<E: Element>(v: &[f32]) -> Vec<E> {
    v.iter().map(|&x| E::from_f32(x)).collect()
}

/// How the routing of a case is drawn.
#[derive(Clone, Copy, Debug)]
enum Routing {
    /// k distinct-ish random experts per token
    Random,
    /// every assignment to expert e
    All(usize),
    /// only experts [0, n) are used
    Few(usize),
}

fn draw_routing(rng: &mut StdRng, tokens: usize, k: usize, experts: usize, r: Routing) -> Vec<i64> {
    (0..tokens * k)
        .map(|_| match r {
            Routing::Random => rng.random_range(0..experts as i64),
            Routing::All(e) => e as i64,
            Routing::Few(n) => rng.random_range(0..n.min(experts) as i64),
        })
        .collect()
}

fn index_bytes(idx: &[i64], it: IndexType) -> Vec<u8> {
    match it {
        IndexType::I64 => bytes_of(idx),
        IndexType::I32 => bytes_of(&idx.iter().map(|&v| v as i32).collect::<Vec<_>>()),
    }
}

fn indices<'a>(idx: &'a [i64], i32s: &'a mut Vec<i32>, it: IndexType) -> Indices<'a> {
    match it {
        IndexType::I64 => Indices::I64(idx),
        IndexType::I32 => {
            *i32s = idx.iter().map(|&v| v as i32).collect();
            Indices::I32(i32s)
        }
    }
}

struct Report {
    failures: Vec<String>,
    count: usize,
}

impl Report {
    fn new() -> Self {
        Report { failures: Vec::new(), count: 0 }
    }

    fn add(&mut self, name: &str, err: f64, tol: f64) {
        self.count += 1;
        let ok = err <= tol;
        println!("{} {name}: rel err {err:.3e} (tol {tol:.0e})", if ok { "ok  " } else { "FAIL" });
        if !ok {
            self.failures.push(format!("{name}: {err:.3e} > {tol:.0e}"));
        }
    }

    fn exact(&mut self, name: &str, ok: bool, detail: &str) {
        self.count += 1;
        println!("{} {name}{}", if ok { "ok  " } else { "FAIL" }, if detail.is_empty() { String::new() } else { format!(": {detail}") });
        if !ok {
            self.failures.push(format!("{name}: {detail}"));
        }
    }

    fn finish(self, what: &str) {
        println!("{what}: {} checks, {} failed", self.count, self.failures.len());
        assert!(self.failures.is_empty(), "{what}: failures:\n{}", self.failures.join("\n"));
    }
}

// ---------------------------------------------------------------------------------------------
// ScatterMoE
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct MoeCase {
    tokens: usize,
    k: usize,
    experts: usize,
    d: usize,
    f: usize,
    activation: Activation,
    gated: bool,
    glu: GluLayout,
    b_in: bool,
    b_out: bool,
    routing: Routing,
    capacity: Option<(usize, CapacityOrder)>,
    it: IndexType,
    /// run every tensor-core configuration for both GEMMs too
    all_cfgs: bool,
}

fn moe(tokens: usize, k: usize, experts: usize, d: usize, f: usize) -> MoeCase {
    MoeCase {
        tokens,
        k,
        experts,
        d,
        f,
        activation: Activation::Silu,
        gated: true,
        glu: GluLayout::GateUp,
        b_in: false,
        b_out: false,
        routing: Routing::Random,
        capacity: None,
        it: IndexType::I64,
        all_cfgs: false,
    }
}

fn moe_cases() -> Vec<MoeCase> {
    use Activation::*;
    let mut v = vec![
        moe(1, 2, 8, 64, 32),
        MoeCase { activation: Gelu, gated: false, b_in: true, b_out: true, it: IndexType::I32, ..moe(3, 1, 8, 40, 24) },
        MoeCase { activation: SwigluOai, glu: GluLayout::Interleaved, b_in: true, all_cfgs: true, ..moe(64, 8, 64, 100, 36) },
        MoeCase { activation: Relu, gated: false, b_in: true, b_out: true, ..moe(1000, 1, 1, 30, 5) },
        MoeCase { activation: Relu2, gated: false, b_in: true, b_out: true, all_cfgs: true, ..moe(64, 2, 8, 100, 36) },
        MoeCase { activation: SwigluLimit, glu: GluLayout::UpGate, b_in: true, all_cfgs: true, ..moe(64, 8, 64, 100, 36) },
        MoeCase { routing: Routing::All(3), b_out: true, all_cfgs: true, ..moe(1000, 2, 64, 128, 64) },
        MoeCase { capacity: Some((200, CapacityOrder::SlotMajor)), ..moe(1000, 2, 8, 64, 40) },
        MoeCase { capacity: Some((0, CapacityOrder::SlotMajor)), ..moe(64, 2, 8, 24, 16) },
    ];
    if !small() {
        v.extend([
            MoeCase { activation: GeluTanh, glu: GluLayout::UpGate, b_out: true, it: IndexType::I32, ..moe(1000, 8, 256, 64, 48) },
            MoeCase { routing: Routing::Few(3), ..moe(1000, 2, 256, 64, 32) },
            MoeCase { capacity: Some((100, CapacityOrder::TokenMajor)), activation: Gelu, gated: false, ..moe(1000, 2, 8, 72, 40) },
            MoeCase { b_in: true, b_out: true, ..moe(4096, 2, 8, 1024, 256) },
            MoeCase { activation: Gelu, glu: GluLayout::Interleaved, ..moe(64, 8, 64, 2048, 100) },
            moe(65536, 8, 256, 64, 32),
            // reductions of 4096 and 8192: on sm_90a the TMA kernels with a full grid (FULL_GRID_K),
            // GEMM1 wgmma_tma at K = d = 4096, GEMM2 wgmma_mc at K = f = 8192 (128 rows per expert)
            MoeCase { b_in: true, ..moe(200, 2, 8, 4096, 96) },
            moe(512, 2, 8, 192, 8192),
            // the new activations through the sm_90a epilogues (specialised per activation)
            MoeCase { activation: Relu2, gated: false, b_out: true, ..moe(4096, 2, 8, 1024, 256) },
            MoeCase { activation: SwigluLimit, glu: GluLayout::Interleaved, b_in: true, ..moe(4096, 2, 8, 1024, 256) },
        ]);
    }
    v
}

fn moe_attrs(c: &MoeCase) -> scatter_moe::Attrs {
    scatter_moe::Attrs {
        activation: c.activation,
        gated: c.gated,
        glu_layout: c.glu,
        capacity_order: c.capacity.map_or(CapacityOrder::SlotMajor, |x| x.1),
        // swiglu_limit as GLM-5-Next writes it (alpha 1), with a limit the values cross
        alpha: if c.activation == Activation::SwigluLimit { 1.0 } else { 1.702 },
        limit: if c.activation == Activation::SwigluLimit { 0.5 } else { 7.0 },
        ..Default::default()
    }
}

fn run_moe<E: Elem>(g: &Gpu, c: &MoeCase, rng: &mut StdRng, rep: &mut Report) {
    let s = MoeSizes { tokens: c.tokens, k: c.k, experts: c.experts, d: c.d, f: c.f };
    let n = if c.gated { 2 * c.f } else { c.f };
    let attrs = moe_attrs(c);
    let scale_in = 1.0 / (c.d as f32).sqrt();
    let scale_out = 1.0 / (c.f as f32).sqrt();
    let x: Vec<E> = conv(&(0..c.tokens * c.d).map(|_| rng.random_range(-1.0..1.0)).collect::<Vec<f32>>());
    let rw: Vec<E> = conv(&(0..c.tokens * c.k).map(|_| rng.random_range(0.05..1.0)).collect::<Vec<f32>>());
    let idx = draw_routing(rng, c.tokens, c.k, c.experts, c.routing);
    let w_in: Vec<E> = conv(&(0..c.experts * n * c.d).map(|_| rng.random_range(-2.0..2.0) * scale_in).collect::<Vec<f32>>());
    let w_out: Vec<E> = conv(&(0..c.experts * c.d * c.f).map(|_| rng.random_range(-2.0..2.0) * scale_out).collect::<Vec<f32>>());
    let b_in: Option<Vec<E>> = c.b_in.then(|| conv(&(0..c.experts * n).map(|_| rng.random_range(-0.5..0.5)).collect::<Vec<f32>>()));
    let b_out: Option<Vec<E>> = c.b_out.then(|| conv(&(0..c.experts * c.d).map(|_| rng.random_range(-0.5..0.5)).collect::<Vec<f32>>()));

    let mut i32s = Vec::new();
    let mut want = vec![E::from_f32(0.0); c.tokens * c.d];
    let inputs = MoeInputs {
        x: &x,
        routing_weights: &rw,
        routing_indices: indices(&idx, &mut i32s, c.it),
        w_in: (&w_in).into(),
        w_out: (&w_out).into(),
        b_in: b_in.as_deref(),
        b_out: b_out.as_deref(),
        capacity: c.capacity.map(|x| x.0),
    };
    reference::scatter_moe(&reference::Rayon, &attrs, s, &inputs, &mut want).expect("reference");

    let dx = g.upload(&bytes_of(&x));
    let drw = g.upload(&bytes_of(&rw));
    let didx = g.upload(&index_bytes(&idx, c.it));
    let dwi = g.upload(&bytes_of(&w_in));
    let dwo = g.upload(&bytes_of(&w_out));
    let dbi = b_in.as_ref().map(|b| g.upload(&bytes_of(b)));
    let dbo = b_out.as_ref().map(|b| g.upload(&bytes_of(b)));
    let ptrs = MoePtrs {
        x: g.ptr(&dx),
        routing_weights: g.ptr(&drw),
        routing_indices: g.ptr(&didx),
        w_in: g.ptr(&dwi),
        w_out: g.ptr(&dwo),
        b_in: dbi.as_ref().map(|b| g.ptr(b)),
        b_out: dbo.as_ref().map(|b| g.ptr(b)),
        ..Default::default()
    };
    let plan = Plan::scatter_moe(s, E::T, c.capacity.is_some());
    let ws = g.poisoned(plan.bytes);
    let ybytes = c.tokens * c.d * E::T.size_bytes();
    let y = g.poisoned(ybytes);
    let st = g.stream.cu_stream();
    let name = format!(
        "ScatterMoE {} T={} k={} E={} d={} f={} {}{}{} {:?}{}{} {}",
        E::T.name(),
        c.tokens,
        c.k,
        c.experts,
        c.d,
        c.f,
        c.activation.name(),
        if c.gated { format!(" gated {}", c.glu.name()) } else { String::new() },
        match (c.b_in, c.b_out) {
            (true, true) => " b_in b_out",
            (true, false) => " b_in",
            (false, true) => " b_out",
            _ => "",
        },
        c.routing,
        c.capacity.map_or(String::new(), |(cap, o)| format!(" capacity {cap} {}", o.name())),
        if c.it == IndexType::I32 { " int32" } else { "" },
        ""
    );
    let mut cfgs: Vec<(Option<GemmCfg>, Option<GemmCfg>)> = vec![(None, None)];
    if c.all_cfgs && E::T != ElemType::F32 {
        for cfg in GemmCfg::TENSOR_CORE {
            if cfg.sm90a_only() && !g.dev.has_wgmma() {
                continue;
            }
            cfgs.push((Some(cfg), Some(cfg)));
        }
    }
    for cfg in cfgs {
        let label = match cfg.0 {
            None => format!(
                "{name}[auto {}/{}]",
                forward::pick_cfg(E::T, c.tokens * c.k, c.experts, if c.gated { 2 * c.f } else { c.f }, c.d, g.dev.arch, g.dev.table).suffix(),
                forward::pick_cfg(E::T, c.tokens * c.k, c.experts, c.d, c.f, g.dev.arch, g.dev.table).suffix()
            ),
            Some(x) => format!("{name}[cfg {}]", x.suffix()),
        };
        let r = unsafe { forward::scatter_moe(g.dev, st, &attrs, E::T, c.it, s, c.capacity.map(|x| x.0), &ptrs, g.ptr(&ws), g.ptr(&y), cfg, None) };
        let launched = match r {
            Ok(l) => l,
            Err(e) => {
                rep.exact(&label, false, &e);
                continue;
            }
        };
        let msg = unsafe { forward::check_sync(st, launched.error.unwrap(), scatter_moe::NAME, c.it, ptrs.routing_indices, c.k, c.experts) };
        if let Ok(Some(m)) | Err(m) = &msg {
            rep.exact(&label, false, &format!("unexpected error report: {m}"));
            continue;
        }
        let got: Vec<E> = from_bytes(&g.download(&y, ybytes));
        rep.add(&label, rel_err(&got, &want), E::TOL);
        // poison again for the next configuration
        unsafe { driver::check(sys::cuMemsetD8Async(g.ptr(&y), 0xff, ybytes, st), "memset").unwrap() };
        // The decode kernel (the whole op in one launch) runs the skinny kernel's units and
        // combine.cu's combine: the same bits as the four kernels with the skinny kernel forced.
        if cfg.0.is_none() && c.capacity.is_none() && forward::decode_kernel_runs(g.dev, E::T, s, c.gated, false) {
            let skinny = (Some(GemmCfg::Skinny), Some(GemmCfg::Skinny));
            let r = unsafe { forward::scatter_moe(g.dev, st, &attrs, E::T, c.it, s, None, &ptrs, g.ptr(&ws), g.ptr(&y), skinny, None) };
            let four: Vec<E> = match r {
                Ok(_) => from_bytes(&g.download(&y, ybytes)),
                Err(e) => {
                    rep.exact(&format!("{name}[decode kernel]"), false, &e);
                    continue;
                }
            };
            let same = got.iter().zip(&four).all(|(a, b)| a.to_f32().to_bits() == b.to_f32().to_bits());
            rep.exact(&format!("{name}[decode kernel: same bits as the four kernels, skinny]"), same, if same { "" } else { "the outputs differ" });
            unsafe { driver::check(sys::cuMemsetD8Async(g.ptr(&y), 0xff, ybytes, st), "memset").unwrap() };
        }
    }
}

#[test]
fn scatter_moe_matches_the_cpu_reference() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(7);
    let mut rep = Report::new();
    for c in moe_cases() {
        run_moe::<f32>(g, &c, &mut rng, &mut rep);
        run_moe::<f16>(g, &c, &mut rng, &mut rep);
        run_moe::<bf16>(g, &c, &mut rng, &mut rep);
    }
    rep.finish("ScatterMoE");
}

// ---------------------------------------------------------------------------------------------
// ParallelLinear
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct LinearCase {
    tokens: usize,
    k: usize,
    experts: usize,
    d_in: usize,
    d_out: usize,
    grouped_in: bool,
    grouped_out: bool,
    bias: bool,
    gates: bool,
    routing: Routing,
    it: IndexType,
}

fn lin(tokens: usize, k: usize, experts: usize, d_in: usize, d_out: usize) -> LinearCase {
    LinearCase {
        tokens,
        k,
        experts,
        d_in,
        d_out,
        grouped_in: false,
        grouped_out: false,
        bias: false,
        gates: false,
        routing: Routing::Random,
        it: IndexType::I64,
    }
}

fn linear_cases() -> Vec<LinearCase> {
    let mut v = vec![
        LinearCase { bias: true, ..lin(64, 2, 8, 40, 72) },
        LinearCase { gates: true, bias: true, it: IndexType::I32, ..lin(1000, 2, 8, 100, 36) },
        LinearCase { grouped_in: true, grouped_out: true, ..lin(3, 1, 1, 24, 16) },
    ];
    if !small() {
        v.extend([
            LinearCase { grouped_out: true, ..lin(1000, 8, 64, 64, 100) },
            LinearCase { grouped_in: true, gates: true, routing: Routing::Few(2), ..lin(64, 8, 256, 32, 48) },
            LinearCase { grouped_in: true, bias: true, routing: Routing::All(0), ..lin(1000, 2, 8, 256, 128) },
            LinearCase { gates: true, ..lin(1, 8, 256, 2048, 512) },
            LinearCase { gates: true, bias: true, ..lin(65536, 8, 256, 64, 48) },
        ]);
    }
    v
}

fn run_linear<E: Elem>(g: &Gpu, c: &LinearCase, rng: &mut StdRng, rep: &mut Report) {
    let s = LinearSizes { tokens: c.tokens, k: c.k, experts: c.experts, d_in: c.d_in, d_out: c.d_out };
    let attrs = parallel_linear::Attrs { grouped_in: c.grouped_in, grouped_out: c.grouped_out, ..Default::default() };
    let rows = if c.grouped_in { c.tokens * c.k } else { c.tokens };
    let scale = 1.0 / (c.d_in as f32).sqrt();
    let x: Vec<E> = conv(&(0..rows * c.d_in).map(|_| rng.random_range(-1.0..1.0)).collect::<Vec<f32>>());
    let idx = draw_routing(rng, c.tokens, c.k, c.experts, c.routing);
    let w: Vec<E> = conv(&(0..c.experts * c.d_out * c.d_in).map(|_| rng.random_range(-2.0..2.0) * scale).collect::<Vec<f32>>());
    let b: Option<Vec<E>> = c.bias.then(|| conv(&(0..c.experts * c.d_out).map(|_| rng.random_range(-0.5..0.5)).collect::<Vec<f32>>()));
    let gates: Option<Vec<E>> = c.gates.then(|| conv(&(0..c.tokens * c.k).map(|_| rng.random_range(0.05..1.0)).collect::<Vec<f32>>()));
    let out_len = if c.gates { c.tokens * c.d_out } else { c.tokens * c.k * c.d_out };
    let mut want = vec![E::from_f32(0.0); out_len];
    let mut i32s = Vec::new();
    let inputs = LinearInputs { x: &x, routing_indices: indices(&idx, &mut i32s, c.it), w: (&w).into(), b: b.as_deref(), gates: gates.as_deref() };
    reference::parallel_linear(&reference::Rayon, &attrs, s, &inputs, &mut want).expect("reference");

    let dx = g.upload(&bytes_of(&x));
    let didx = g.upload(&index_bytes(&idx, c.it));
    let dw = g.upload(&bytes_of(&w));
    let db = b.as_ref().map(|v| g.upload(&bytes_of(v)));
    let dg = gates.as_ref().map(|v| g.upload(&bytes_of(v)));
    let ptrs = LinearPtrs {
        x: g.ptr(&dx),
        routing_indices: g.ptr(&didx),
        w: g.ptr(&dw),
        b: db.as_ref().map(|v| g.ptr(v)),
        gates: dg.as_ref().map(|v| g.ptr(v)),
        w_quant: None,
    };
    let plan = Plan::parallel_linear(s, E::T, c.gates);
    let ws = g.poisoned(plan.bytes);
    let ybytes = out_len * E::T.size_bytes();
    let y = g.poisoned(ybytes);
    let st = g.stream.cu_stream();
    let name = format!(
        "ParallelLinear {} T={} k={} E={} d_in={} d_out={} grouped_in={} grouped_out={}{}{} {:?}{}",
        E::T.name(),
        c.tokens,
        c.k,
        c.experts,
        c.d_in,
        c.d_out,
        c.grouped_in as u8,
        c.grouped_out as u8,
        if c.bias { " bias" } else { "" },
        if c.gates { " gates" } else { "" },
        c.routing,
        if c.it == IndexType::I32 { " int32" } else { "" },
    );
    let r = unsafe { forward::parallel_linear(g.dev, st, &attrs, E::T, c.it, s, &ptrs, g.ptr(&ws), g.ptr(&y), None, None) };
    match r {
        Err(e) => rep.exact(&name, false, &e),
        Ok(l) => {
            let msg = unsafe { forward::check_sync(st, l.error.unwrap(), parallel_linear::NAME, c.it, ptrs.routing_indices, c.k, c.experts) };
            if let Ok(Some(m)) | Err(m) = &msg {
                rep.exact(&name, false, &format!("unexpected error report: {m}"));
                return;
            }
            let got: Vec<E> = from_bytes(&g.download(&y, ybytes));
            rep.add(&name, rel_err(&got, &want), E::TOL);
        }
    }
}

#[test]
fn parallel_linear_matches_the_cpu_reference() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(11);
    let mut rep = Report::new();
    for c in linear_cases() {
        run_linear::<f32>(g, &c, &mut rng, &mut rep);
        run_linear::<f16>(g, &c, &mut rng, &mut rep);
        run_linear::<bf16>(g, &c, &mut rng, &mut rep);
    }
    rep.finish("ParallelLinear");
}

// ---------------------------------------------------------------------------------------------
// CapacityMask
// ---------------------------------------------------------------------------------------------

#[test]
fn capacity_mask_matches_the_cpu_reference() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(13);
    let mut rep = Report::new();
    let mut cases: Vec<(usize, usize, usize, usize, Routing)> =
        vec![(1, 2, 8, 1, Routing::Random), (1000, 2, 8, 0, Routing::Random), (1000, 2, 8, 100, Routing::Random), (64, 8, 64, 3, Routing::Few(4))];
    if !small() {
        cases.extend([(1000, 1, 1, 1usize << 40, Routing::Random), (65536, 8, 256, 2048, Routing::Random), (5000, 2, 64, 500, Routing::All(5))]);
    }
    for (tokens, k, experts, cap, routing) in cases {
        for order in CapacityOrder::ALL {
            for it in IndexType::ALL {
                let attrs = capacity_mask::Attrs { num_experts: experts, capacity_order: order };
                let idx = draw_routing(&mut rng, tokens, k, experts, routing);
                let mut want = vec![false; tokens * k];
                let mut i32s = Vec::new();
                reference::capacity_mask(&attrs, k, indices(&idx, &mut i32s, it), cap, &mut want).unwrap();
                let didx = g.upload(&index_bytes(&idx, it));
                let ws = g.poisoned(Plan::capacity_mask(tokens, k, experts).bytes);
                let out = g.poisoned(tokens * k);
                let st = g.stream.cu_stream();
                let name = format!("CapacityMask T={tokens} k={k} E={experts} C={cap} {} {} {routing:?}", order.name(), it.name());
                let r = unsafe { forward::capacity_mask(g.dev, st, &attrs, it, tokens, k, cap, g.ptr(&didx), g.ptr(&ws), g.ptr(&out), None) };
                match r {
                    Err(e) => rep.exact(&name, false, &e),
                    Ok(l) => {
                        let msg = unsafe { forward::check_sync(st, l.error.unwrap(), capacity_mask::NAME, it, g.ptr(&didx), k, experts) };
                        let got = g.download(&out, tokens * k);
                        let same = got.iter().zip(&want).all(|(&a, &b)| a == b as u8);
                        let kept = got.iter().filter(|&&v| v == 1).count();
                        rep.exact(&name, same && matches!(msg, Ok(None)), &format!("{kept} of {} kept, report {msg:?}", tokens * k));
                    }
                }
            }
        }
    }
    rep.finish("CapacityMask");
}

// ---------------------------------------------------------------------------------------------
// Errors and edge cases
// ---------------------------------------------------------------------------------------------

/// A bad index is clamped on the device (no out-of-bounds access) and reported with the
/// contract's message, the same the CPU reference gives; T = 0 launches nothing.
#[test]
fn bad_indices_are_reported_and_empty_inputs_launch_nothing() {
    let Some(g) = gpu() else { return };
    let mut rep = Report::new();
    let st = g.stream.cu_stream();
    let (tokens, k, experts, d, f) = (64usize, 2usize, 8usize, 24usize, 16usize);
    let s = MoeSizes { tokens, k, experts, d, f };
    let attrs = scatter_moe::Attrs::default();
    for (bad, it) in [(vec![(5usize, 1usize, 8i64), (7, 0, -1)], IndexType::I64), (vec![(9, 0, -3), (30, 1, 1 << 20)], IndexType::I32)] {
        let mut idx: Vec<i64> = (0..tokens * k).map(|i| (i % experts) as i64).collect();
        for &(t, j, v) in &bad {
            idx[t * k + j] = v;
        }
        let x = vec![f16::from_f32(0.5); tokens * d];
        let rw = vec![f16::from_f32(0.5); tokens * k];
        let w_in = vec![f16::from_f32(0.01); experts * 2 * f * d];
        let w_out = vec![f16::from_f32(0.01); experts * d * f];
        let mut i32s = Vec::new();
        let mut want = vec![f16::from_f32(0.0); tokens * d];
        let inputs = MoeInputs {
            x: &x,
            routing_weights: &rw,
            routing_indices: indices(&idx, &mut i32s, it),
            w_in: (&w_in).into(),
            w_out: (&w_out).into(),
            b_in: None,
            b_out: None,
            capacity: None,
        };
        let cpu_msg = reference::scatter_moe(&reference::Rayon, &attrs, s, &inputs, &mut want).unwrap_err().to_string();
        let (dx, drw, didx, dwi, dwo) = (
            g.upload(&bytes_of(&x)),
            g.upload(&bytes_of(&rw)),
            g.upload(&index_bytes(&idx, it)),
            g.upload(&bytes_of(&w_in)),
            g.upload(&bytes_of(&w_out)),
        );
        let ptrs = MoePtrs {
            x: g.ptr(&dx),
            routing_weights: g.ptr(&drw),
            routing_indices: g.ptr(&didx),
            w_in: g.ptr(&dwi),
            w_out: g.ptr(&dwo),
            b_in: None,
            b_out: None,
            ..Default::default()
        };
        let ws = g.poisoned(Plan::scatter_moe(s, ElemType::F16, false).bytes);
        let y = g.poisoned(tokens * d * 2);
        let l = unsafe { forward::scatter_moe(g.dev, st, &attrs, ElemType::F16, it, s, None, &ptrs, g.ptr(&ws), g.ptr(&y), (None, None), None) }.unwrap();
        let msg = unsafe { forward::check_sync(st, l.error.unwrap(), scatter_moe::NAME, it, ptrs.routing_indices, k, experts) }.unwrap();
        rep.exact(&format!("bad index {bad:?} {}", it.name()), msg.as_deref() == Some(cpu_msg.as_str()), &format!("gpu {msg:?}, cpu {cpu_msg:?}"));
    }
    // T = 0: nothing launched, no error words.
    let s0 = MoeSizes { tokens: 0, k: 2, experts: 8, d: 16, f: 8 };
    let ptrs = MoePtrs::default();
    let l = unsafe { forward::scatter_moe(g.dev, st, &attrs, ElemType::F32, IndexType::I64, s0, None, &ptrs, 0, 0, (None, None), None) };
    rep.exact("ScatterMoE T=0 launches nothing", matches!(l, Ok(forward::Launched { error: None })), &format!("{l:?}"));
    // E above the kernels' limit: a clear error, nothing launched.
    let big = MoeSizes { tokens: 4, k: 1, experts: 2000, d: 16, f: 8 };
    let l = unsafe { forward::scatter_moe(g.dev, st, &attrs, ElemType::F32, IndexType::I64, big, None, &ptrs, 0, 0, (None, None), None) };
    rep.exact("ScatterMoE E=2000 refused", l.as_ref().is_err_and(|e| e.contains("at most 1024 experts")), &format!("{l:?}"));
    g.stream.synchronize().unwrap();
    rep.finish("errors");
}

/// Without a GPU the library must still answer, not panic.
#[test]
fn driver_probe_never_panics() {
    let n = driver::device_count();
    println!("CUDA devices: {n} ({:?})", driver::driver());
}

// ---------------------------------------------------------------------------------------------
// CUDA graphs and the asynchronous error report
// ---------------------------------------------------------------------------------------------

/// A small gated f16 layer with capacity: inputs on the device, the reference for them.
struct Layer {
    s: MoeSizes,
    attrs: scatter_moe::Attrs,
    x: Vec<f16>,
    rw: Vec<f16>,
    idx: Vec<i64>,
    w_in: Vec<f16>,
    w_out: Vec<f16>,
    capacity: Option<usize>,
}

impl Layer {
    fn new(rng: &mut StdRng, capacity: Option<usize>) -> Layer {
        let s = MoeSizes { tokens: 64, k: 2, experts: 8, d: 64, f: 32 };
        let r = |rng: &mut StdRng, n: usize, a: f32| conv::<f16>(&(0..n).map(|_| rng.random_range(-a..a)).collect::<Vec<f32>>());
        Layer {
            s,
            attrs: scatter_moe::Attrs::default(),
            x: r(rng, s.tokens * s.d, 1.0),
            rw: r(rng, s.tokens * s.k, 1.0),
            idx: draw_routing(rng, s.tokens, s.k, s.experts, Routing::Random),
            w_in: r(rng, s.experts * 2 * s.f * s.d, 0.25),
            w_out: r(rng, s.experts * s.d * s.f, 0.35),
            capacity,
        }
    }

    fn reference(&self) -> Vec<f16> {
        let mut y = vec![f16::from_f32(0.0); self.s.tokens * self.s.d];
        let inputs = MoeInputs {
            x: &self.x,
            routing_weights: &self.rw,
            routing_indices: Indices::I64(&self.idx),
            w_in: (&self.w_in).into(),
            w_out: (&self.w_out).into(),
            b_in: None,
            b_out: None,
            capacity: self.capacity,
        };
        reference::scatter_moe(&reference::Rayon, &self.attrs, self.s, &inputs, &mut y).unwrap();
        y
    }
}

/// The whole forward (capacity memsets, routing, both GEMMs, combine) captured into a CUDA graph
/// in global capture mode (which refuses synchronising calls) and replayed, twice, over new X.
#[test]
fn forward_is_cuda_graph_capture_safe() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(17);
    let mut rep = Report::new();
    let mut l = Layer::new(&mut rng, Some(12));
    let st = g.stream.cu_stream();
    let mut dx = g.upload(&bytes_of(&l.x));
    let (drw, didx, dwi, dwo) = (g.upload(&bytes_of(&l.rw)), g.upload(&bytes_of(&l.idx)), g.upload(&bytes_of(&l.w_in)), g.upload(&bytes_of(&l.w_out)));
    let ptrs = MoePtrs {
        x: g.ptr(&dx),
        routing_weights: g.ptr(&drw),
        routing_indices: g.ptr(&didx),
        w_in: g.ptr(&dwi),
        w_out: g.ptr(&dwo),
        b_in: None,
        b_out: None,
        ..Default::default()
    };
    let ws = g.poisoned(Plan::scatter_moe(l.s, ElemType::F16, true).bytes);
    let ybytes = l.s.tokens * l.s.d * 2;
    let y = g.poisoned(ybytes);
    let (wsp, yp) = (g.ptr(&ws), g.ptr(&y));
    g.stream.synchronize().unwrap();
    unsafe {
        driver::check(sys::cuStreamBeginCapture_v2(st, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL), "begin capture").unwrap();
        let capturing = driver::is_capturing(st).unwrap();
        let (dev, guard) = driver::for_stream(st).unwrap();
        let r = forward::scatter_moe(dev, st, &l.attrs, ElemType::F16, IndexType::I64, l.s, l.capacity, &ptrs, wsp, yp, (None, None), None);
        drop(guard);
        let mut graph = std::ptr::null_mut();
        let end = driver::check(sys::cuStreamEndCapture(st, &mut graph), "end capture");
        rep.exact("capture: stream reports capturing", capturing, "");
        rep.exact("capture: forward enqueued", r.is_ok() && end.is_ok(), &format!("{r:?} {end:?}"));
        if r.is_err() || end.is_err() {
            rep.finish("graph");
            return;
        }
        let mut exec = std::ptr::null_mut();
        driver::check(sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0), "instantiate").unwrap();
        for replay in 0..2 {
            driver::check(sys::cuGraphLaunch(exec, st), "graph launch").unwrap();
            let got: Vec<f16> = from_bytes(&g.download(&y, ybytes));
            rep.add(&format!("graph replay {replay} (capacity 12)"), rel_err(&got, &l.reference()), f16::TOL);
            // new activations at the same address for the next replay
            l.x = conv(&(0..l.s.tokens * l.s.d).map(|_| rng.random_range(-1.0..1.0)).collect::<Vec<f32>>());
            g.stream.memcpy_htod(&bytes_of(&l.x), &mut dx).unwrap();
        }
        sys::cuGraphExecDestroy(exec);
        sys::cuGraphDestroy(graph);
    }
    rep.finish("graph");
}

/// The ORT kernels' policy for bad indices without synchronisation: the error words of a run are
/// copied to pinned memory behind it, and a later poll (which never waits) reports them.
#[test]
fn async_checks_report_a_bad_index_of_an_earlier_run() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(19);
    let mut rep = Report::new();
    let st = g.stream.cu_stream();
    let mut checks = scattermoe::cuda::checks::AsyncChecks::new(g.dev.ctx).unwrap();
    for bad in [true, false, true] {
        let mut l = Layer::new(&mut rng, None);
        if bad {
            l.idx[5 * 2 + 1] = 9;
        }
        let (dx, drw, didx, dwi, dwo) =
            (g.upload(&bytes_of(&l.x)), g.upload(&bytes_of(&l.rw)), g.upload(&bytes_of(&l.idx)), g.upload(&bytes_of(&l.w_in)), g.upload(&bytes_of(&l.w_out)));
        let ptrs = MoePtrs {
            x: g.ptr(&dx),
            routing_weights: g.ptr(&drw),
            routing_indices: g.ptr(&didx),
            w_in: g.ptr(&dwi),
            w_out: g.ptr(&dwo),
            b_in: None,
            b_out: None,
            ..Default::default()
        };
        let ws = g.poisoned(Plan::scatter_moe(l.s, ElemType::F16, false).bytes);
        let y = g.poisoned(l.s.tokens * l.s.d * 2);
        let before = checks.poll(scatter_moe::NAME).unwrap();
        // The kernels write the error words straight into the claimed slot (mapped host memory).
        let slot = checks.claim();
        let launched = unsafe {
            forward::scatter_moe(g.dev, st, &l.attrs, ElemType::F16, IndexType::I64, l.s, None, &ptrs, g.ptr(&ws), g.ptr(&y), (None, None), slot.map(|s| s.1))
        }
        .unwrap();
        let queued = slot.is_some() && launched.error == slot.map(|s| s.1);
        if let Some((i, _)) = slot {
            unsafe { checks.record(st, i, l.s.k, l.s.experts) }.unwrap();
        }
        g.stream.synchronize().unwrap();
        let after = checks.poll(scatter_moe::NAME).unwrap();
        let again = checks.poll(scatter_moe::NAME).unwrap();
        let ok = before.is_none()
            && queued
            && again.is_none()
            && match &after {
                Some(m) => bad && m.contains("ScatterMoE: input 'routing_indices' holds a value outside [0, 8) (the number of experts) at [5, 1]") && m.contains("earlier run"),
                None => !bad,
            };
        rep.exact(&format!("async check, bad index {bad}"), ok, &format!("{after:?}"));
    }
    drop(checks);
    rep.finish("async checks");
}

// ---------------------------------------------------------------------------------------------
// Quantized expert weights (kernels/quant_gemm.cu) against the float64 oracle
#[path = "gpu_forward/quant.rs"]
mod quant;

// TopKRouter (kernels/router.cu) against the CPU router
#[path = "gpu_forward/router.rs"]
mod router;
