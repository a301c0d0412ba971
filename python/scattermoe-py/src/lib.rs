//! `scattermoe._native`: the rewriter and the CLI of the `scattermoe` crate for Python. The
//! Python side (python/scattermoe-py/python/scattermoe/__init__.py) wraps these in its public functions.

use std::path::PathBuf;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use scattermoe::cli::file::{self, Request};
use scattermoe::ort_ops::runtime;
use scattermoe::rewrite::Target;

/// Tells the library where the interpreter's onnxruntime and the shipped op library are (used
/// unless ORT_DYLIB_PATH / SCATTERMOE_ORT_LIB say otherwise).
#[pyfunction]
#[pyo3(signature = (onnxruntime, plugin))]
fn configure(onnxruntime: Option<PathBuf>, plugin: Option<PathBuf>) {
    if let Some(p) = onnxruntime {
        runtime::set_python_onnxruntime(p);
    }
    if let Some(p) = plugin {
        runtime::set_plugin(p);
    }
}

/// Runs the `scattermoe` command line on `argv` (the program name first); returns its exit status.
#[pyfunction]
fn cli(py: Python<'_>, argv: Vec<String>) -> u8 {
    py.detach(|| scattermoe::cli::main(argv))
}

/// Rewrites `in_path` into `out_path`; returns JSON: {"report": ..., "verify": ... or null,
/// "written": bool}. Errors (a bad input, a failed verification) raise RuntimeError.
#[pyfunction]
#[pyo3(signature = (in_path, out_path, verify, target, prove, force, allow_none, lengths, inputs, keep_router = false))]
#[allow(clippy::too_many_arguments)]
fn rewrite(
    py: Python<'_>,
    in_path: PathBuf,
    out_path: PathBuf,
    verify: bool,
    target: &str,
    prove: bool,
    force: bool,
    allow_none: bool,
    lengths: Vec<usize>,
    inputs: Option<PathBuf>,
    keep_router: bool,
) -> PyResult<String> {
    let target = match target {
        "onnxruntime" => Target::OnnxRuntime,
        "tensorrt" => Target::TensorRt,
        other => return Err(PyRuntimeError::new_err(format!("target must be 'onnxruntime' or 'tensorrt', not '{other}'"))),
    };
    let req = Request {
        input: &in_path,
        output: &out_path,
        force,
        verify,
        prove,
        target,
        lengths: &lengths,
        inputs: inputs.as_deref(),
        allow_none,
        fuse_router: !keep_router,
    };
    let out = py
        .detach(|| file::rewrite_file(&req, &scattermoe::progress::Silent, &file::Quiet))
        .map_err(|e| PyRuntimeError::new_err(format!("{e:#}")))?;
    let v = serde_json::json!({
        "report": out.report,
        "verify": out.verify.as_ref().map(|v| serde_json::json!({ "passed": v.passed(), "text": v.text(), "lengths": v.lengths, "inputs": v.given })),
        "written": out.written,
    });
    Ok(v.to_string())
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(configure, m)?)?;
    m.add_function(wrap_pyfunction!(cli, m)?)?;
    m.add_function(wrap_pyfunction!(rewrite, m)?)?;
    Ok(())
}
