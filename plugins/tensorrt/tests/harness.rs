//! Runs the harness (cpp/tensorrt/harness/, built by build.rs with TensorRT's headers) on cases
//! written here: inputs and fields for each plugin, and the CPU reference's output
//! (`scattermoe::reference`). The harness drives libscattermoe_trt.so through TensorRT's call
//! sequence and enqueues on a real GPU stream where there is one; elsewhere it runs every step but
//! enqueue.
//!
//! `SCATTERMOE_TRT_CASES_OUT=DIR` keeps the cases in DIR (to run the harness on another machine,
//! as plugins/tensorrt/tests/device/run_device.sh does). `SCATTERMOE_TRT_LIB` names the library to
//! load (default: the one beside this test's target directory).

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use scattermoe::reference::{self, Element, Indices, LinearInputs, LinearSizes, MoeInputs, MoeSizes};
use scattermoe::spec::{capacity_mask, parallel_linear, scatter_moe, Activation, CapacityOrder, GluLayout};
use scattermoe_trt::data_type;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One tensor of a case: TensorRT type, dims, which dims are symbolic at build time, bytes.
struct T {
    ty: i32,
    dims: Vec<usize>,
    dyn_: String,
    bytes: Vec<u8>,
}

struct Case {
    name: String,
    op: &'static str,
    expect: &'static str,
    sync_checks: bool,
    tol: f64,
    fields: Vec<String>,
    inputs: Vec<T>,
    output: T,
    reference: Vec<f32>,
}

impl Case {
    fn write(&self, dir: &Path) -> PathBuf {
        let mut s = format!("scattermoe-trt-case 1\nname {}\nop {}\nexpect {}\nsync_checks {}\ntol {}\n", self.name, self.op, self.expect, self.sync_checks as i32, self.tol);
        for f in &self.fields {
            s += &format!("field {f}\n");
        }
        let line = |kind: &str, t: &T| {
            let dims: Vec<String> = t.dims.iter().map(|d| d.to_string()).collect();
            format!("{kind} {} {} {} dyn {}\n", t.ty, t.dims.len(), dims.join(" "), if t.dyn_.is_empty() { "-" } else { &t.dyn_ })
        };
        for t in &self.inputs {
            s += &line("input", t);
        }
        s += &line("output", &self.output);
        s += "end\n";
        let mut b = s.into_bytes();
        for t in &self.inputs {
            b.extend_from_slice(&t.bytes);
        }
        for v in &self.reference {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let p = dir.join(format!("{}.case", self.name));
        std::fs::write(&p, b).unwrap();
        p
    }
}

fn bytes_of<E: Copy>(v: &[E]) -> Vec<u8> {
    // SAFETY: plain data (f32, f16, bf16, i32, i64, u8).
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }.to_vec()
}

/// A float element type with its TensorRT code and test tolerance.
trait Float: Element {
    const TY: i32;
    const TOL: f64;
}
impl Float for f32 {
    const TY: i32 = data_type::FLOAT;
    const TOL: f64 = 1e-4;
}
impl Float for f16 {
    const TY: i32 = data_type::HALF;
    const TOL: f64 = 1e-2;
}
impl Float for bf16 {
    const TY: i32 = data_type::BF16;
    const TOL: f64 = 3e-2;
}

fn dyn_lead(rank: usize, symbolic: usize) -> String {
    (0..rank).map(|i| if i < symbolic { '1' } else { '0' }).collect()
}

fn floats<E: Float>(rng: &mut StdRng, n: usize, scale: f32) -> Vec<E> {
    (0..n).map(|_| E::from_f32(rng.random_range(-1.0f32..1.0) * scale)).collect()
}

fn ft<E: Float>(v: &[E], dims: &[usize], dyn_: String) -> T {
    T { ty: E::TY, dims: dims.to_vec(), dyn_, bytes: bytes_of(v) }
}

/// Routing indices: `k` distinct experts per token (or any values from `draw`).
fn routing(rng: &mut StdRng, tokens: usize, k: usize, experts: usize) -> Vec<i64> {
    let mut v = Vec::with_capacity(tokens * k);
    for _ in 0..tokens {
        let mut chosen: Vec<i64> = Vec::new();
        while chosen.len() < k {
            let e = rng.random_range(0..experts as i64);
            if !chosen.contains(&e) || k > experts {
                chosen.push(e);
            }
        }
        v.extend(chosen);
    }
    v
}

fn idx_tensor(v: &[i64], dims: &[usize], i32_: bool, dyn_: String) -> T {
    if i32_ {
        let w: Vec<i32> = v.iter().map(|&x| x as i32).collect();
        T { ty: data_type::INT32, dims: dims.to_vec(), dyn_, bytes: bytes_of(&w) }
    } else {
        T { ty: data_type::INT64, dims: dims.to_vec(), dyn_, bytes: bytes_of(v) }
    }
}

fn moe_fields(a: &scatter_moe::Attrs) -> Vec<String> {
    vec![
        format!("activation s {}", a.activation.name()),
        format!("gated i {}", a.gated as i32),
        format!("glu_layout s {}", a.glu_layout.name()),
        format!("alpha f {}", a.alpha),
        format!("limit f {}", a.limit),
        format!("capacity_order s {}", a.capacity_order.name()),
    ]
}

struct MoeCase<'a> {
    name: &'a str,
    attrs: scatter_moe::Attrs,
    x_dims: Vec<usize>,
    k: usize,
    experts: usize,
    f: usize,
    bias: bool,
    capacity: Option<(i64, Vec<usize>)>,
    i32_: bool,
    seed: u64,
}

fn moe_case<E: Float>(c: MoeCase) -> Case {
    let mut rng = StdRng::seed_from_u64(c.seed);
    let d = *c.x_dims.last().unwrap();
    let tokens: usize = c.x_dims[..c.x_dims.len() - 1].iter().product();
    let (k, e, f) = (c.k, c.experts, c.f);
    let n = if c.attrs.gated { 2 * f } else { f };
    let x: Vec<E> = floats(&mut rng, tokens * d, 1.0);
    let rw: Vec<E> = (0..tokens * k).map(|_| E::from_f32(rng.random_range(0.0f32..1.0))).collect();
    let ri = routing(&mut rng, tokens, k, e);
    let w_in: Vec<E> = floats(&mut rng, e * n * d, 1.0 / (d as f32).sqrt());
    let w_out: Vec<E> = floats(&mut rng, e * d * f, 1.0 / (f as f32).sqrt());
    let with_bias = c.bias || c.capacity.is_some();
    let scale = if c.bias { 0.1 } else { 0.0 }; // zero biases where only the capacity needs them
    let b_in: Vec<E> = floats(&mut rng, e * n, scale);
    let b_out: Vec<E> = floats(&mut rng, e * d, scale);
    let s = MoeSizes { tokens, k, experts: e, d, f };
    let mut y = vec![E::from_f32(0.0); tokens * d];
    let inp = MoeInputs {
        x: &x,
        routing_weights: &rw,
        routing_indices: Indices::I64(&ri),
        w_in: (&w_in).into(),
        w_out: (&w_out).into(),
        b_in: with_bias.then_some(&b_in[..]),
        b_out: with_bias.then_some(&b_out[..]),
        capacity: c.capacity.as_ref().map(|x| x.0 as usize),
    };
    reference::scatter_moe(&reference::Rayon, &c.attrs, s, &inp, &mut y).unwrap();
    let lead = c.x_dims.len() - 1;
    let mut inputs = vec![
        ft(&x, &c.x_dims, dyn_lead(c.x_dims.len(), lead)),
        ft(&rw, &[tokens, k], "10".into()),
        idx_tensor(&ri, &[tokens, k], c.i32_, "10".into()),
        ft(&w_in, &[e, n, d], "000".into()),
        ft(&w_out, &[e, d, f], "000".into()),
    ];
    if with_bias {
        inputs.push(ft(&b_in, &[e, n], "00".into()));
        inputs.push(ft(&b_out, &[e, d], "00".into()));
    }
    if let Some((cap, dims)) = &c.capacity {
        inputs.push(T { ty: data_type::INT64, dims: dims.clone(), dyn_: "0".repeat(dims.len()), bytes: cap.to_le_bytes().to_vec() });
    }
    Case {
        name: c.name.into(),
        op: scatter_moe::NAME,
        expect: "ok",
        sync_checks: false,
        tol: E::TOL,
        fields: moe_fields(&c.attrs),
        output: T { ty: E::TY, dims: c.x_dims.clone(), dyn_: dyn_lead(c.x_dims.len(), lead), bytes: vec![] },
        reference: y.iter().map(|v| v.to_f32()).collect(),
        inputs,
    }
}

#[allow(clippy::too_many_arguments)]
fn linear_case<E: Float>(name: &str, attrs: parallel_linear::Attrs, ri_dims: &[usize], experts: usize, d_in: usize, d_out: usize, bias: bool, gates: bool, seed: u64) -> Case {
    let mut rng = StdRng::seed_from_u64(seed);
    let k = *ri_dims.last().unwrap();
    let tokens: usize = ri_dims[..ri_dims.len() - 1].iter().product();
    let rows = if attrs.grouped_in { tokens * k } else { tokens };
    let x: Vec<E> = floats(&mut rng, rows * d_in, 1.0);
    let ri = routing(&mut rng, tokens, k, experts);
    let w: Vec<E> = floats(&mut rng, experts * d_out * d_in, 1.0 / (d_in as f32).sqrt());
    let b: Vec<E> = floats(&mut rng, experts * d_out, 0.1);
    let g: Vec<E> = (0..tokens * k).map(|_| E::from_f32(rng.random_range(0.0f32..1.0))).collect();
    let out_dims = parallel_linear::output_shape(&attrs, ri_dims, d_out, gates, |r| r.iter().product());
    let mut y = vec![E::from_f32(0.0); out_dims.iter().product()];
    let inp = LinearInputs { x: &x, routing_indices: Indices::I64(&ri), w: (&w).into(), b: (bias || gates).then_some(&b[..]), gates: gates.then_some(&g[..]) };
    reference::parallel_linear(&reference::Rayon, &attrs, LinearSizes { tokens, k, experts, d_in, d_out }, &inp, &mut y).unwrap();
    let x_dims = if attrs.grouped_in { vec![tokens * k, d_in] } else { let mut v = ri_dims[..ri_dims.len() - 1].to_vec(); v.push(d_in); v };
    let ri_dyn = dyn_lead(ri_dims.len(), ri_dims.len() - 1);
    let mut inputs = vec![
        ft(&x, &x_dims, dyn_lead(x_dims.len(), x_dims.len() - 1)),
        idx_tensor(&ri, ri_dims, false, ri_dyn.clone()),
        ft(&w, &[experts, d_out, d_in], "000".into()),
    ];
    if bias || gates {
        inputs.push(ft(&b, &[experts, d_out], "00".into()));
    }
    if gates {
        inputs.push(ft(&g, ri_dims, ri_dyn));
    }
    let out_dyn = if attrs.grouped_out && !gates { "10".into() } else { dyn_lead(out_dims.len(), out_dims.len() - if gates { 1 } else { 2 }) };
    Case {
        name: name.into(),
        op: parallel_linear::NAME,
        expect: "ok",
        sync_checks: false,
        tol: E::TOL,
        fields: vec![format!("grouped_in i {}", attrs.grouped_in as i32), format!("grouped_out i {}", attrs.grouped_out as i32)],
        output: T { ty: E::TY, dims: out_dims, dyn_: out_dyn, bytes: vec![] },
        reference: y.iter().map(|v| v.to_f32()).collect(),
        inputs,
    }
}

fn mask_case(name: &str, attrs: capacity_mask::Attrs, ri_dims: &[usize], capacity: i64, cap_dims: &[usize], i32_: bool, seed: u64) -> Case {
    let mut rng = StdRng::seed_from_u64(seed);
    let k = *ri_dims.last().unwrap();
    let tokens: usize = ri_dims[..ri_dims.len() - 1].iter().product();
    let ri = routing(&mut rng, tokens, k, attrs.num_experts);
    let mut kept = vec![false; tokens * k];
    reference::capacity_mask(&attrs, k, Indices::I64(&ri), capacity as usize, &mut kept).unwrap();
    let ri_dyn = dyn_lead(ri_dims.len(), ri_dims.len() - 1);
    Case {
        name: name.into(),
        op: capacity_mask::NAME,
        expect: "ok",
        sync_checks: false,
        tol: 0.0,
        fields: vec![format!("num_experts i {}", attrs.num_experts), format!("capacity_order s {}", attrs.capacity_order.name())],
        inputs: vec![
            idx_tensor(&ri, ri_dims, i32_, ri_dyn.clone()),
            T { ty: data_type::INT64, dims: cap_dims.to_vec(), dyn_: "0".repeat(cap_dims.len()), bytes: capacity.to_le_bytes().to_vec() },
        ],
        output: T { ty: data_type::BOOL, dims: ri_dims.to_vec(), dyn_: ri_dyn, bytes: vec![] },
        reference: kept.iter().map(|&b| b as u8 as f32).collect(),
    }
}

fn cases() -> Vec<Case> {
    let a = |activation, gated, glu_layout, capacity_order| scatter_moe::Attrs { activation, gated, glu_layout, capacity_order, ..Default::default() };
    let mut v = vec![
        moe_case::<f32>(MoeCase { name: "moe_f32_silu_glu_bias_3d", attrs: a(Activation::Silu, true, GluLayout::GateUp, CapacityOrder::SlotMajor), x_dims: vec![2, 5, 32], k: 2, experts: 4, f: 48, bias: true, capacity: None, i32_: false, seed: 1 }),
        moe_case::<f16>(MoeCase { name: "moe_f16_gelu_plain_i32", attrs: a(Activation::Gelu, false, GluLayout::GateUp, CapacityOrder::SlotMajor), x_dims: vec![37, 64], k: 2, experts: 8, f: 80, bias: false, capacity: None, i32_: true, seed: 2 }),
        moe_case::<bf16>(MoeCase { name: "moe_bf16_swiglu_oai_interleaved", attrs: a(Activation::SwigluOai, true, GluLayout::Interleaved, CapacityOrder::SlotMajor), x_dims: vec![19, 32], k: 4, experts: 8, f: 40, bias: true, capacity: None, i32_: false, seed: 3 }),
        moe_case::<f32>(MoeCase { name: "moe_f32_relu_capacity_slot_major", attrs: a(Activation::Relu, false, GluLayout::GateUp, CapacityOrder::SlotMajor), x_dims: vec![24, 16], k: 2, experts: 4, f: 24, bias: false, capacity: Some((3, vec![])), i32_: false, seed: 4 }),
        moe_case::<f16>(MoeCase { name: "moe_f16_gelu_tanh_up_gate_capacity_token_major", attrs: a(Activation::GeluTanh, true, GluLayout::UpGate, CapacityOrder::TokenMajor), x_dims: vec![3, 10, 32], k: 2, experts: 4, f: 32, bias: true, capacity: Some((9, vec![1])), i32_: true, seed: 5 }),
        moe_case::<f32>(MoeCase { name: "moe_f32_no_tokens", attrs: a(Activation::Silu, true, GluLayout::GateUp, CapacityOrder::SlotMajor), x_dims: vec![0, 16], k: 2, experts: 4, f: 8, bias: false, capacity: None, i32_: false, seed: 6 }),
        linear_case::<f16>("linear_f16_grouped_out_bias", parallel_linear::Attrs { grouped_in: false, grouped_out: true, ..Default::default() }, &[30, 2], 6, 24, 40, true, false, 7),
        linear_case::<f32>("linear_f32_gates_3d", parallel_linear::Attrs { grouped_in: false, grouped_out: false, ..Default::default() }, &[3, 7, 2], 5, 16, 24, true, true, 8),
        linear_case::<bf16>("linear_bf16_grouped_in", parallel_linear::Attrs { grouped_in: true, grouped_out: false, ..Default::default() }, &[12, 3], 4, 32, 16, false, false, 9),
        mask_case("mask_i64_token_major", capacity_mask::Attrs { num_experts: 5, capacity_order: CapacityOrder::TokenMajor }, &[40, 2], 6, &[], false, 10),
        mask_case("mask_i32_slot_major_3d", capacity_mask::Attrs { num_experts: 3, capacity_order: CapacityOrder::SlotMajor }, &[2, 9, 2], 4, &[1], true, 11),
    ];
    // Refusals: a bad attribute at creation, a bad routing index at enqueue (synchronous checks).
    let mut bad_attr = moe_case::<f32>(MoeCase { name: "refuse_bad_activation", attrs: a(Activation::Silu, true, GluLayout::GateUp, CapacityOrder::SlotMajor), x_dims: vec![4, 16], k: 1, experts: 2, f: 8, bias: false, capacity: None, i32_: false, seed: 12 });
    bad_attr.fields[0] = "activation s swish".into();
    bad_attr.expect = "create_error";
    v.push(bad_attr);
    let mut bad_index = moe_case::<f32>(MoeCase { name: "refuse_bad_routing_index", attrs: a(Activation::Silu, true, GluLayout::GateUp, CapacityOrder::SlotMajor), x_dims: vec![6, 16], k: 2, experts: 4, f: 8, bias: false, capacity: None, i32_: false, seed: 13 });
    bad_index.inputs[2].bytes[8 * 5..8 * 6].copy_from_slice(&9i64.to_le_bytes()); // token 2, slot 1
    bad_index.expect = "enqueue_error";
    bad_index.sync_checks = true;
    v.push(bad_index);
    v
}

/// The target directory this test runs from (target/<profile>).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

fn library() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SCATTERMOE_TRT_LIB") {
        return Some(PathBuf::from(p));
    }
    let dir = profile_dir();
    [dir.join("libscattermoe_trt.so"), dir.join("deps/libscattermoe_trt.so")].into_iter().find(|p| p.exists())
}

#[test]
fn harness_drives_every_plugin_through_tensorrts_call_sequence() {
    let Some(harness) = option_env!("SCATTERMOE_TRT_HARNESS") else {
        eprintln!("skipped: built without TensorRT headers (set TENSORRT_INCLUDE_DIR; see docs/tensorrt.md)");
        return;
    };
    let Some(lib) = library() else {
        panic!("libscattermoe_trt.so not found beside {} (cargo build --release --workspace first, or set SCATTERMOE_TRT_LIB)", profile_dir().display());
    };
    let keep = std::env::var_os("SCATTERMOE_TRT_CASES_OUT").map(PathBuf::from);
    let dir = keep.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("scattermoe-trt-cases-{}", std::process::id())));
    std::fs::create_dir_all(&dir).unwrap();
    let files: Vec<PathBuf> = cases().iter().map(|c| c.write(&dir)).collect();
    let out = Command::new(harness).arg(&lib).args(&files).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    if keep.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert!(out.status.success(), "the harness failed");
    assert!(text.contains(&format!("{} passed, 0 failed", files.len())), "not every case passed");
}
