//! `--verify`: runs the original and the rewritten model in ONNX Runtime (CPU, with the plugin)
//! on the same random inputs at several token counts and compares every output.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use onnx_protobuf::{type_proto, ModelProto};
use ort::session::Session;
use ort::value::{DynValue, Tensor};

use crate::progress::{Progress, Silent, Unit};
use crate::spec::ElemType;

/// What happened at one token count.
#[derive(Debug, Clone, serde::Serialize)]
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

#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub lengths: Vec<LengthResult>,
    /// the file the inputs came from (`--inputs`), when they were not random
    pub given: Option<String>,
}

/// What the two models are fed.
pub enum Feed<'a> {
    /// random inputs at each of these token counts (dynamic dims set to the count)
    Random(&'a [usize]),
    /// these arrays, by graph input name (`--inputs FILE.npz`); `source` names the file
    Given { source: String, arrays: Vec<crate::npz::Array> },
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
            let at = match &self.given {
                Some(f) => format!("inputs from {f}"),
                None => format!("tokens {}", l.tokens),
            };
            let line = match (&l.rewritten_error, &l.original_error, l.rel_err) {
                (Some(e), _, _) => format!("{at}: the rewritten model FAILS: {e}"),
                (None, Some(e), _) => {
                    format!("{at}: the original fails ({e}); the rewritten model runs")
                }
                (None, None, Some(r)) => {
                    format!("{at}: max relative error {r:.3e} (tolerance {:.0e}){}", l.tolerance, if r <= l.tolerance { "" } else { "  MISMATCH" })
                }
                _ => format!("{at}: nothing compared"),
            };
            s.push_str(&line);
            s.push('\n');
        }
        if !self.lengths.iter().any(|l| l.rel_err.is_some()) {
            s.push_str(if self.given.is_some() {
                "the original model did not run on these inputs, so nothing could be compared\n"
            } else {
                "the original model ran at none of these token counts, so nothing could be compared\n"
            });
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

/// An error unless `arrays` give every graph input of `model`, by name, of its element type and
/// rank (run before the rewrite, so that a wrong file costs nothing).
pub fn check_given(model: &ModelProto, arrays: &[crate::npz::Array], source: &str) -> Result<()> {
    check_arrays(&graph_inputs(model)?, arrays, source)
}

fn check_arrays(inputs: &[Input], arrays: &[crate::npz::Array], source: &str) -> Result<()> {
    let names: Vec<&str> = arrays.iter().map(|a| a.name.as_str()).collect();
    if let Some(extra) = arrays.iter().find(|a| !inputs.iter().any(|i| i.name == a.name)) {
        let want: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
        bail!("{source} holds '{}', which is not an input of the model (its inputs: {})", extra.name, want.join(", "));
    }
    for i in inputs {
        let Some(a) = arrays.iter().find(|a| a.name == i.name) else {
            bail!("the model's input '{}' is not in {source} (it holds: {})", i.name, names.join(", "));
        };
        if a.dtype.onnx() != i.elem {
            bail!(
                "input '{}' is {} in the model, but {source} holds it as {}",
                i.name,
                crate::spec::onnx_type_name(i.elem),
                crate::spec::onnx_type_name(a.dtype.onnx())
            );
        }
        let fits = a.shape.len() == i.dims.len() && a.shape.iter().zip(&i.dims).all(|(&n, d)| d.is_none_or(|d| d == n as i64));
        if !i.dims.is_empty() && !fits {
            let want: Vec<String> = i.dims.iter().map(|d| d.map_or("?".to_string(), |d| d.to_string())).collect();
            bail!("input '{}' has shape [{}] in the model, but {source} holds shape {:?}", i.name, want.join(", "), a.shape);
        }
    }
    Ok(())
}

/// The arrays of `--inputs`, one per graph input, each of the input's element type and rank.
fn given_inputs(inputs: &[Input], arrays: &[crate::npz::Array], source: &str) -> Result<Vec<(String, DynValue)>> {
    use crate::npz::Dtype;
    check_arrays(inputs, arrays, source)?;
    let mut out = Vec::new();
    for i in inputs {
        let a = arrays.iter().find(|a| a.name == i.name).expect("checked");
        let shape = a.shape.clone();
        let b = &a.data;
        let v: DynValue = match a.dtype {
            Dtype::F32 => Tensor::from_array((shape, b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>()))?.into_dyn(),
            Dtype::F64 => Tensor::from_array((shape, b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>()))?.into_dyn(),
            Dtype::F16 => Tensor::from_array((shape, b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]])).collect::<Vec<_>>()))?.into_dyn(),
            Dtype::I64 => Tensor::from_array((shape, b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>()))?.into_dyn(),
            Dtype::I32 => Tensor::from_array((shape, b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>()))?.into_dyn(),
            Dtype::Bool => Tensor::from_array((shape, b.iter().map(|&x| x != 0).collect::<Vec<bool>>()))?.into_dyn(),
        };
        out.push((i.name.clone(), v));
    }
    Ok(out)
}

/// A float (or int64) output as float64 values (the router proof reads its weights with it too).
pub(crate) fn to_f64(v: &DynValue) -> Result<Vec<f64>> {
    if let Ok((_, d)) = v.try_extract_tensor::<f32>() {
        return Ok(d.iter().map(|&x| x as f64).collect());
    }
    if let Ok((_, d)) = v.try_extract_tensor::<half::f16>() {
        return Ok(d.iter().map(|x| x.to_f64()).collect());
    }
    if let Ok((_, d)) = v.try_extract_tensor::<half::bf16>() {
        return Ok(d.iter().map(|x| x.to_f64()).collect());
    }
    if let Ok((_, d)) = v.try_extract_tensor::<f64>() {
        return Ok(d.to_vec());
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
    session_with(path, false)
}

/// A session of one of the proof's cut-out models: the values it computes come from an arena
/// capped at [`crate::ort_ops::runtime::PROOF_ARENA_BYTES`], its initializers from outside it.
pub fn capped_session(path: &Path) -> Result<Session> {
    session_with(path, true)
}

fn session_with(path: &Path, capped: bool) -> Result<Session> {
    let env = crate::ort_ops::runtime::environment()?;
    let plugin = crate::ort_ops::runtime::plugin_path()?;
    // Errors of the original at token counts it cannot run are reported by --verify itself.
    // `session.disable_quant_qdq`: ONNX Runtime's optimizer would otherwise fuse a
    // DequantizeLinear-fed MatMul into MatMulNBits, which (at its default accuracy level)
    // quantizes the activations to int8: relative differences of 1e-2 from the graph as written,
    // which is what both models are compared against
    let mut b = Session::builder(env)?
        .with_log_level(ort::logging::LogLevel::Fatal)
        .map_err(|e| anyhow!("{e}"))?
        .with_config_entry("session.disable_quant_qdq", "1")
        .map_err(|e| anyhow!("{e}"))?
        .with_operator_library(&plugin)
        .map_err(|e| anyhow!("cannot register {}: {e}", plugin.display()))?;
    if capped {
        crate::ort_ops::runtime::capped_arena()?;
        b = b
            .with_env_allocators()
            .and_then(|b| b.with_config_entry("session.use_device_allocator_for_initializers", "1"))
            .map_err(|e| anyhow!("{e}"))?;
    }
    let _one_at_a_time = crate::ort_ops::runtime::session_creation_lock();
    b.commit_from_file(path).map_err(|e| anyhow!("ONNX Runtime cannot load {}: {e}", path.display()))
}

/// Compares `original` and `rewritten` (paths, so external data resolves) at each token count.
/// Where the original fails, other random inputs are tried (a traced per-expert loop runs only
/// when its inputs route tokens to every expert).
pub fn verify(original: &Path, original_proto: &ModelProto, rewritten: &Path, lengths: &[usize]) -> Result<VerifyReport> {
    verify_with(original, original_proto, rewritten, &Feed::Random(lengths), &Silent)
}

/// [`verify`] on what `feed` gives, reporting each session created and each comparison (step
/// "verify").
pub fn verify_with(original: &Path, original_proto: &ModelProto, rewritten: &Path, feed: &Feed, progress: &dyn Progress) -> Result<VerifyReport> {
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
    let runs = match feed {
        Feed::Random(l) => l.len(),
        Feed::Given { .. } => 1,
    };
    progress.begin("verify", Some(2 + runs as u64), Unit::Items("steps"));
    progress.note("loading the original");
    let mut so = session(original).context("original model")?;
    progress.advance(1);
    progress.note("loading the rewritten model");
    let mut sr = session(rewritten).context("rewritten model")?;
    progress.advance(1);
    let lengths = match feed {
        Feed::Random(lengths) => *lengths,
        Feed::Given { source, arrays } => {
            progress.note("running both");
            let given = given_inputs(&inputs, arrays, source)?;
            let mut res = LengthResult { tokens: 0, original_error: None, rewritten_error: None, rel_err: None, tolerance };
            let again = given_inputs(&inputs, arrays, source)?;
            match (run(&mut so, given), run(&mut sr, again)) {
                (_, Err(e)) => res.rewritten_error = Some(first_line(&e)),
                (Err(e), Ok(_)) => res.original_error = Some(first_line(&e)),
                (Ok(a), Ok(b)) => match compare(&a, &b) {
                    Ok(r) => res.rel_err = Some(r),
                    Err(e) => res.rewritten_error = Some(e),
                },
            }
            progress.advance(1);
            progress.end();
            return Ok(VerifyReport { lengths: vec![res], given: Some(source.clone()) });
        }
    };
    let mut out = Vec::new();
    for &tokens in lengths {
        progress.note(&format!("{tokens} tokens"));
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
                Ok(b) => match compare(&a, &b) {
                    Ok(r) => res.rel_err = Some(r),
                    Err(e) => res.rewritten_error = Some(e),
                },
            }
            last_orig_err = None;
            break;
        }
        res.original_error = last_orig_err;
        out.push(res);
        progress.advance(1);
    }
    progress.end();
    Ok(VerifyReport { lengths: out, given: None })
}

/// max |b - a| / max |a| over every output (a: the original's outputs, b: the rewritten's), or
/// why they cannot be compared.
fn compare(a: &[Vec<f64>], b: &[Vec<f64>]) -> Result<f64, String> {
    if a.len() != b.len() {
        return Err(format!("{} outputs instead of {}", b.len(), a.len()));
    }
    let mut num = 0f64;
    let mut den = 0f64;
    for (x, y) in b.iter().zip(a) {
        if x.len() != y.len() {
            return Err(format!("output sizes differ ({} vs {})", x.len(), y.len()));
        }
        for (p, q) in x.iter().zip(y) {
            num = num.max((p - q).abs());
            den = den.max(q.abs());
        }
    }
    Ok(if den > 0.0 { num / den } else { num })
}
