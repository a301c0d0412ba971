//! Canonicalisation must never change what a graph computes: every fixture (models/*.onnx and
//! the spellings corpus) canonicalised and run in ONNX Runtime gives the original's outputs at
//! 1, 7 and 16 tokens (wherever the original runs).

mod common;

use std::path::{Path, PathBuf};

use ort::session::Session;
use ort::value::Tensor;
use scattermoe::onnx::{self, SaveOptions};

fn session(path: &Path) -> Session {
    let env = scattermoe::ort_ops::runtime::environment().expect("ONNX Runtime");
    let _one_at_a_time = scattermoe::ort_ops::runtime::session_creation_lock();
    Session::builder(env).unwrap().commit_from_file(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn run(s: &mut Session, x: &common::Array) -> Option<Vec<f64>> {
    let out = match x.dtype.as_str() {
        "f4" => s.run(ort::inputs!["hidden_states" => Tensor::from_array((x.shape.clone(), x.data.iter().map(|&v| v as f32).collect::<Vec<_>>())).unwrap()]),
        "f2" => s.run(ort::inputs!["hidden_states" => Tensor::from_array((x.shape.clone(), x.data.iter().map(|&v| half::f16::from_f64(v)).collect::<Vec<_>>())).unwrap()]),
        d => panic!("input dtype {d}"),
    }
    .ok()?;
    let v = &out[0];
    Some(if let Ok((_, d)) = v.try_extract_tensor::<f32>() {
        d.iter().map(|&v| v as f64).collect()
    } else {
        let (_, d) = v.try_extract_tensor::<half::f16>().unwrap();
        d.iter().map(|v| v.to_f64()).collect()
    })
}

fn all_models() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for dir in [common::models_dir(), common::models_dir().join("spellings")] {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            v.extend(rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "onnx")));
        }
    }
    v.sort();
    v
}

#[test]
fn canonicalised_fixtures_compute_what_the_originals_compute() {
    let dir = common::scratch("canon");
    let models = all_models();
    assert!(models.len() >= 17, "fixtures missing");
    let mut failures = Vec::new();
    let mut changed = 0;
    let mut compared = 0;
    for p in &models {
        let name = p.file_stem().unwrap().to_str().unwrap();
        let mut m = onnx::load(p).unwrap();
        let before = m.graph().node.len();
        let st = scattermoe::rewrite::canon::canonicalise(&mut m);
        if st != Default::default() {
            changed += 1;
        }
        let after = m.graph().node.len();
        let out = dir.join(format!("{name}.onnx"));
        onnx::save(m, &out, &SaveOptions::default()).unwrap();
        let (mut so, mut sc) = (session(p), session(&out));
        let refs = common::read_npz(&p.with_extension("npz"));
        for tokens in [1usize, 7, 16] {
            let Some((_, x)) = refs.iter().find(|(n, _)| *n == format!("x_{tokens}")) else { continue };
            let Some(a) = run(&mut so, x) else { continue };
            compared += 1;
            match run(&mut sc, x) {
                None => failures.push(format!("{name}: the canonicalised model fails at {tokens} tokens")),
                Some(b) => {
                    let scale = a.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
                    let err = a.iter().zip(&b).fold(0f64, |m, (p, q)| m.max((p - q).abs())) / scale;
                    if a.len() != b.len() || !(err <= 1e-6) {
                        failures.push(format!("{name}: {tokens} tokens differ (rel. {err:.2e})"));
                    }
                }
            }
        }
        println!("{name:<24} nodes {before:>4} -> {after:>4}  {st:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(changed > 0, "canonicalisation changed nothing");
    assert!(compared >= models.len(), "too few comparisons: {compared}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
