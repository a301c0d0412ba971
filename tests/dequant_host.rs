//! The quantized GEMM's dequantization (kernels/dequant.cuh, host and device code) checked on the
//! CPU: tests/dequant_host.cu compiled as C++ against CUDA's fp16/bf16 headers and run. It checks
//! every code of every format, for f16 and bf16 and both scale types, against the contract's
//! formula bit for bit (what the GPU tests can only check within tolerances), and its `FastDiv` (the
//! skinny kernel's scale-block division) against the division. Needs a C++ compiler
//! and CUDA's headers (the nvcc of scripts/setup-nvcc.sh brings them); skipped, saying so, without.

use std::path::{Path, PathBuf};
use std::process::Command;

/// CUDA's include folder: CUDA_HOME, or the project's .venv-nvcc (scripts/setup-nvcc.sh).
fn cuda_include(root: &Path) -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let p = Path::new(&home).join("include");
        if p.join("cuda_fp16.h").exists() {
            return Some(p);
        }
    }
    let lib = root.join(".venv-nvcc/lib");
    std::fs::read_dir(lib).ok()?.flatten().map(|d| d.path().join("site-packages/nvidia/cu13/include")).find(|p| p.join("cuda_fp16.h").exists())
}

#[test]
fn dequantization_matches_the_contracts_formula_bit_for_bit() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let Some(include) = cuda_include(root) else {
        eprintln!("skipped: CUDA's headers not found (CUDA_HOME, or scripts/setup-nvcc.sh)");
        return;
    };
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dequant_host");
    let compiled = Command::new(&cxx)
        .args(["-O1", "-std=c++17", "-x", "c++"])
        .arg(format!("-I{}", include.display()))
        .arg(format!("-I{}", root.join("kernels").display()))
        .arg(root.join("tests/dequant_host.cu"))
        .arg("-o")
        .arg(&exe)
        .output();
    let compiled = match compiled {
        Ok(o) => o,
        Err(e) => {
            eprintln!("skipped: no C++ compiler ({cxx}: {e})");
            return;
        }
    };
    assert!(compiled.status.success(), "tests/dequant_host.cu did not compile:\n{}", String::from_utf8_lossy(&compiled.stderr));
    let run = Command::new(&exe).output().expect("run dequant_host");
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success() && out.contains(" 0 failures"), "{out}");
    // every code of every format was reached: 256 fp8 decodings, then chunks for 2 types x 3 formats
    let checks: u64 = out.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(checks > 500_000, "{out}");
}
