//! The README's Rust example (between the README markers, verbatim: python/tests/test_readme.py
//! checks it), compiled with the tests (`cargo test` builds examples). Run it on a model:
//! `cargo run --release --example load_plugin -- models/mixtral.onnx` (after the workspace build).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let model = std::fs::canonicalize(std::env::args().nth(1).unwrap_or_else(|| "model.onnx".into()))?;
    // The example's paths, "model.onnx" and "target/release/libscattermoe_ort.so", in a scratch folder.
    let lib = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/libscattermoe_ort.so");
    let dir = std::env::temp_dir().join(format!("scattermoe-example-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("target/release"))?;
    std::os::unix::fs::symlink(&model, dir.join("model.onnx"))?;
    std::os::unix::fs::symlink(&lib, dir.join("target/release/libscattermoe_ort.so"))?;
    std::env::set_current_dir(&dir)?;
    let session = load();
    std::fs::remove_dir_all(&dir)?;
    let session = session?;
    println!("{}: {} inputs, {} outputs", model.display(), session.inputs().len(), session.outputs().len());
    Ok(())
}

fn load() -> Result<ort::session::Session, Box<dyn std::error::Error>> {
    // README begin
    // ONNX Runtime found as the CLI finds it: ORT_DYLIB_PATH, the active Python's onnxruntime, .venv
    let env = scattermoe::ort_ops::runtime::environment()?;
    let session = ort::session::Session::builder(env)?
        .with_operator_library("target/release/libscattermoe_ort.so")?
        .commit_from_file("model.onnx")?;
    // README end
    Ok(session)
}
