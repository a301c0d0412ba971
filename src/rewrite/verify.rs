//! `--verify`: runs the original and the rewritten model in ONNX Runtime (CPU, with the plugin)
//! on the same random inputs at several token counts and compares every output.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use onnx_protobuf::{type_proto, ModelProto};
use ort::session::Session;
use ort::value::{DynValue, Tensor};

use crate::spec::ElemType;

/// What happened at one token count.
#[derive(Debug, Clone)]
pub struct LengthResult {
    pub tokens: usize,
    /// the original's error at every seed tried, when it never ran
    pub original_error: Option<String>,
    /// the rewritten model's error
    pub rewritten_error: Option<String>,
    /// max |rewritten - original| / max |original| over all outputs
    pub rel_err: Option<f64>,
    pub tolerance: f64,
}

impl LengthResult {
    pub fn ok(&self) -> bool {
        self.rewritten_error.is_none() && self.rel_err.is_none_or(|e| e <= self.tolerance)
    }
}

#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub lengths: Vec<LengthResult>,
}

impl VerifyReport {
    /// Passes when the rewritten model runs at every length and matches the original wherever
    /// the original runs, and they were compared at least once.
    pub fn passed(&self) -> bool {
        self.lengths.iter().all(LengthResult::ok) && self.lengths.iter().any(|l| l.rel_err.is_some())
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        for l in &self.lengths {
            let line = match (&l.rewritten_error, &l.original_error, l.rel_err) {
                (Some(e), _, _) => format!("tokens {}: the rewritten model FAILS: {e}", l.tokens),
                (None, Some(e), _) => format!("tokens {}: the original fails ({e}); the rewritten model runs", l.tokens),
                (None, None, Some(r)) => format!(
                    "tokens {}: max relative error {r:.3e} (tolerance {:.0e}){}",
                    l.tokens,
                    l.tolerance,
                    if r <= l.tolerance { "" } else { "  MISMATCH" }
                ),
                _ => format!("tokens {}: nothing compared", l.tokens),
            };
            s.push_str(&line);
            s.push('\n');
        }
        if !self.lengths.iter().any(|l| l.rel_err.is_some()) {
            s.push_str("the original model ran at none of these token counts, so nothing could be compared\n");
        }
        s
    }
}

struct Input {
    name: String,
    elem: i32,
    dims: Vec<Option<i64>>,
}

fn graph_inputs(m: &ModelProto) -> Result<Vec<Input>> {
    let g = m.graph.as_ref().ok_or_else(|| anyhow!("no graph"))?;
    let inits: std::collections::HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    let mut out = Vec::new();
    for vi in &g.input {
        if inits.contains(vi.name.as_str()) {
            continue;
        }
        let Some(type_proto::Value::TensorType(tt)) = vi.type_.as_ref().and_then(|t| t.value.clone()) else {
            bail!("input '{}' is not a tensor", vi.name);
        };
        let dims = tt
            .shape
            .as_ref()
            .map(|s| s.dim.iter().map(|d| if d.has_dim_value() { Some(d.dim_value()) } else { None }).collect())
            .unwrap_or_default();
        out.push(Input { name: vi.name.clone(), elem: tt.elem_type, dims });
    }
    Ok(out)
}

/// xorshift + Box-Muller: reproducible normal samples without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.next().max(1e-12), self.next());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}

fn make_inputs(inputs: &[Input], tokens: usize, seed: u64) -> Result<Vec<(String, DynValue)>> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(tokens as u64));
    let mut out = Vec::new();
    for i in inputs {
        let shape: Vec<usize> = i.dims.iter().map(|d| d.map_or(tokens, |v| v.max(0) as usize)).collect();
        let n: usize = shape.iter().product();
        let v: DynValue = match i.elem {
            1 => Tensor::from_array((shape, (0..n).map(|_| rng.normal()).collect::<Vec<f32>>()))?.into_dyn(),
            10 => Tensor::from_array((shape, (0..n).map(|_| half::f16::from_f32(rng.normal())).collect::<Vec<_>>()))?.into_dyn(),
            16 => Tensor::from_array((shape, (0..n).map(|_| half::bf16::from_f32(rng.normal())).collect::<Vec<_>>()))?.into_dyn(),
            7 => Tensor::from_array((shape, vec![0i64; n]))?.into_dyn(),
            6 => Tensor::from_array((shape, vec![0i32; n]))?.into_dyn(),
            other => bail!("input '{}' has element type {}, which --verify cannot fill", i.name, crate::spec::onnx_type_name(other)),
        };
        out.push((i.name.clone(), v));
    }
    Ok(out)
}

fn to_f64(v: &DynValue) -> Result<Vec<f64>> {
    if let Ok((_, d)) = v.try_extract_tensor::<f32>() {
        return Ok(d.iter().map(|&x| x as f64).collect());
    }
    if let Ok((_, d)) = v.try_extract_tensor::<half::f16>() {
        return Ok(d.iter().map(|x| x.to_f64()).collect());
    }
    if let Ok((_, d)) = v.try_extract_tensor::<half::bf16>() {
        return Ok(d.iter().map(|x| x.to_f64()).collect());
    }
    if let Ok((_, d)) = v.try_extract_tensor::<i64>() {
        return Ok(d.iter().map(|&x| x as f64).collect());
    }
    bail!("an output of an unsupported element type")
}

fn run(s: &mut Session, inputs: Vec<(String, DynValue)>) -> Result<Vec<Vec<f64>>> {
    let outs = s.run(inputs)?;
    let mut res = Vec::new();
    for (_, v) in outs.iter() {
        res.push(to_f64(&v.into_dyn())?);
    }
    Ok(res)
}

fn first_line(e: &dyn std::fmt::Display) -> String {
    let s = e.to_string();
    let s = s.lines().next().unwrap_or("").to_string();
    if s.len() > 300 {
        format!("{}...", &s[..300])
    } else {
        s
    }
}

pub fn session(path: &Path) -> Result<Session> {
    let env = crate::ort_ops::runtime::environment()?;
    let plugin = crate::ort_ops::runtime::plugin_path()?;
    // Errors of the original at token counts it cannot run are reported by --verify itself.
    let mut b = Session::builder(env)?
        .with_log_level(ort::logging::LogLevel::Fatal)
        .map_err(|e| anyhow!("{e}"))?
        .with_operator_library(&plugin)
        .map_err(|e| anyhow!("cannot register {}: {e}", plugin.display()))?;
    let _one_at_a_time = crate::ort_ops::runtime::session_creation_lock();
    b.commit_from_file(path).map_err(|e| anyhow!("ONNX Runtime cannot load {}: {e}", path.display()))
}

/// Compares `original` and `rewritten` (paths, so external data resolves) at each token count.
/// Where the original fails, other random inputs are tried (a traced per-expert loop runs only
/// when its inputs route tokens to every expert).
pub fn verify(original: &Path, original_proto: &ModelProto, rewritten: &Path, lengths: &[usize]) -> Result<VerifyReport> {
    let inputs = graph_inputs(original_proto)?;
    let elem = original_proto
        .graph
        .output
        .iter()
        .find_map(|o| match o.type_.as_ref().and_then(|t| t.value.clone()) {
            Some(type_proto::Value::TensorType(tt)) => ElemType::from_onnx_code(tt.elem_type),
            _ => None,
        })
        .unwrap_or(ElemType::F32);
    let tolerance = match elem {
        ElemType::F32 => 1e-4,
        ElemType::F16 => 1e-2,
        ElemType::BF16 => 3e-2,
    };
    let mut so = session(original).context("original model")?;
    let mut sr = session(rewritten).context("rewritten model")?;
    let mut out = Vec::new();
    for &tokens in lengths {
        let mut res = LengthResult { tokens, original_error: None, rewritten_error: None, rel_err: None, tolerance };
        let mut last_orig_err = None;
        for seed in 0..12u64 {
            let a = match run(&mut so, make_inputs(&inputs, tokens, seed)?) {
                Ok(a) => a,
                Err(e) => {
                    last_orig_err = Some(first_line(&e));
                    if seed == 0 {
                        // the rewritten model must run at every length
                        if let Err(e) = run(&mut sr, make_inputs(&inputs, tokens, seed)?) {
                            res.rewritten_error = Some(first_line(&e));
                            break;
                        }
                    }
                    continue;
                }
            };
            match run(&mut sr, make_inputs(&inputs, tokens, seed)?) {
                Err(e) => res.rewritten_error = Some(first_line(&e)),
                Ok(b) => {
                    let mut num = 0f64;
                    let mut den = 0f64;
                    for (x, y) in b.iter().zip(&a) {
                        if x.len() != y.len() {
                            res.rewritten_error = Some(format!("output sizes differ ({} vs {})", x.len(), y.len()));
                        }
                        for (p, q) in x.iter().zip(y) {
                            num = num.max((p - q).abs());
                            den = den.max(q.abs());
                        }
                    }
                    res.rel_err = Some(if den > 0.0 { num / den } else { num });
                }
            }
            last_orig_err = None;
            break;
        }
        res.original_error = last_orig_err;
        out.push(res);
    }
    Ok(VerifyReport { lengths: out })
}
