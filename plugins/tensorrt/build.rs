//! Compiles the TensorRT plugin classes (cpp/tensorrt/) and the C++ side of the bridge
//! (src/bridge.rs) with cxx-build, when TensorRT's public headers are found: `TENSORRT_INCLUDE_DIR`,
//! else `third_party/tensorrt/include` at the workspace root (git-ignored; docs/tensorrt.md says
//! where the headers come from). Without them the crate builds a library that exports nothing and
//! says so, so the workspace builds anywhere. With them it also builds the C++ test harness
//! (cpp/tensorrt/harness/) that drives the plugins through TensorRT's call sequence, and sets
//! `cfg(scattermoe_trt_cpp)`. Besides the headers it reads this crate and cpp/tensorrt/ only.
//!
//! Nothing links libnvinfer: the plugins only implement TensorRT's interfaces (virtual calls into
//! TensorRT go through the objects it passes), and the CUDA runtime types the headers name come
//! from cpp/tensorrt/shim/cuda_runtime_api.h.

use std::path::{Path, PathBuf};
use std::process::Command;

fn headers(root: &Path) -> Option<PathBuf> {
    let dir = match std::env::var_os("TENSORRT_INCLUDE_DIR") {
        Some(d) => PathBuf::from(d),
        None => root.join("third_party/tensorrt/include"),
    };
    let runtime = std::fs::read_to_string(dir.join("NvInferRuntime.h")).ok()?;
    // IPluginV3 came with TensorRT 10; older headers cannot build these plugins.
    (runtime.contains("IPluginV3OneCore") && dir.join("NvInferPluginBase.h").exists()).then_some(dir)
}

fn main() {
    // Stay mapped once loaded: see plugins/ort/build.rs (thread-local destructors outlive an unload).
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.join("../..").canonicalize().unwrap();
    let cpp = root.join("cpp/tensorrt");
    let bridge = manifest.join("src/bridge.rs");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-env-changed=TENSORRT_INCLUDE_DIR");
    println!("cargo:rerun-if-changed={}", root.join("third_party/tensorrt/include").display());
    println!("cargo:rerun-if-changed={}", cpp.display());
    println!("cargo:rerun-if-changed={}", bridge.display());
    println!("cargo:rustc-check-cfg=cfg(scattermoe_trt_cpp)");

    let Some(include) = headers(&root) else {
        println!(
            "cargo:warning=scattermoe-trt: TensorRT headers not found (set TENSORRT_INCLUDE_DIR); building without the TensorRT plugin"
        );
        return;
    };

    // The bridge's generated header, under a stable name for cpp/tensorrt.
    let shim = cpp.join("shim");
    let mut build = cxx_build::bridge(&bridge);
    build
        .file(cpp.join("scattermoe_trt.cpp"))
        .include(&shim)
        .include(&include)
        .include(&out)
        .std("c++17")
        .flag_if_supported("-Wno-deprecated-declarations")
        .flag_if_supported("-Wno-unused-parameter");
    std::fs::write(out.join("scattermoe_trt_bridge.h"), bridge_include(&out)).unwrap();
    build.compile("scattermoe_trt_cpp");
    println!("cargo:rustc-cfg=scattermoe_trt_cpp");

    // The harness: a plain executable, no Rust and no TensorRT library (it loads
    // libscattermoe_trt.so and the CUDA driver with dlopen).
    let compiler = cc::Build::new().cpp(true).get_compiler();
    let harness = out.join("scattermoe_trt_harness");
    let status = Command::new(compiler.path())
        .args(["-std=c++17", "-O2", "-g", "-Wall", "-Wno-deprecated-declarations"])
        .arg(format!("-I{}", shim.display()))
        .arg(format!("-I{}", include.display()))
        .arg(cpp.join("harness/harness.cpp"))
        .arg("-o")
        .arg(&harness)
        .arg("-ldl")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", compiler.path().display()));
    if !status.success() {
        panic!("building cpp/tensorrt/harness/harness.cpp failed ({status})");
    }
    println!("cargo:rustc-env=SCATTERMOE_TRT_HARNESS={}", harness.display());
}

/// An include of the header cxx-build generated for src/bridge.rs, wherever it put it.
fn bridge_include(out: &Path) -> String {
    let base = out.join("cxxbridge/include");
    let mut found = None;
    let mut stack = vec![base.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == "bridge.rs.h") {
                found = Some(p);
            }
        }
    }
    let p = found.expect("cxx-build generated no header for src/bridge.rs");
    format!("#pragma once\n#include \"{}\"\n", p.display())
}
