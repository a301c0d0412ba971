//! Opening ONNX Runtime from a Rust program (the CLI, the tests): the plugin receives ORT's API
//! from its host, but a program that runs sessions itself must load the shared library.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static LOADED: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Loads `libonnxruntime` once per process and installs its API for `ort`; returns its path.
/// The library is found at `ORT_DYLIB_PATH`, else in the project's `.venv` (from the
/// `onnxruntime` wheel) above the running executable or the current directory, else in the
/// `onnxruntime` package of the `python3` on PATH.
pub fn load() -> Result<PathBuf> {
    LOADED
        .get_or_init(|| open(&find_onnxruntime()?).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn open(path: &Path) -> Result<PathBuf, String> {
    // SAFETY: loading ONNX Runtime runs its initialisers, which have no preconditions.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", path.display()))?;
    let base = unsafe {
        let get: libloading::Symbol<unsafe extern "C" fn() -> *const ort_sys::OrtApiBase> =
            lib.get(b"OrtGetApiBase\0").map_err(|e| format!("{} is not ONNX Runtime: {e}", path.display()))?;
        get()
    };
    // SAFETY: `base` comes from the library just loaded, which stays loaded for the process.
    unsafe { super::install_api(base) }?;
    std::mem::forget(lib);
    Ok(path.to_path_buf())
}

fn find_onnxruntime() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return Ok(PathBuf::from(p));
    }
    let starts = [std::env::current_exe().ok(), std::env::current_dir().ok()];
    for start in starts.iter().flatten() {
        for dir in start.ancestors() {
            if let Some(p) = venv_library(&dir.join(".venv")) {
                return Ok(p);
            }
        }
    }
    if let Some(p) = python_library() {
        return Ok(p);
    }
    Err("ONNX Runtime not found: set ORT_DYLIB_PATH to libonnxruntime.so, install the onnxruntime Python package for python3, or run scripts/setup-python.sh to create .venv".into())
}

/// `capi/libonnxruntime.so.*` of the onnxruntime package the active `python3` imports.
fn python_library() -> Option<PathBuf> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import onnxruntime,os;print(os.path.dirname(onnxruntime.__file__))"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("capi");
    let mut libs: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|f| f.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so")))
        .collect();
    libs.sort();
    libs.pop()
}

fn venv_library(venv: &Path) -> Option<PathBuf> {
    let lib = venv.join("lib");
    for py in std::fs::read_dir(lib).ok()?.flatten() {
        let capi = py.path().join("site-packages/onnxruntime/capi");
        for f in std::fs::read_dir(&capi).into_iter().flatten().flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.starts_with("libonnxruntime.so.") {
                return Some(f.path());
            }
        }
    }
    None
}

/// The custom-op library to register: `SCATTERMOE_ORT_LIB`, else `libscattermoe_ort.so` beside
/// the running executable (or one folder up, for test binaries in target/*/deps).
pub fn plugin_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SCATTERMOE_ORT_LIB") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("cannot locate the running executable")?;
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join("libscattermoe_ort.so");
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("libscattermoe_ort.so not found beside {}: build it with `cargo build --release --workspace` or set SCATTERMOE_ORT_LIB", exe.display())
}

/// The process's one ONNX Runtime environment (ORT allows one per process), after [`load`].
pub fn environment() -> Result<&'static ort::environment::Environment> {
    static ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();
    load()?;
    ENV.get_or_init(|| ort::init().with_name("scattermoe").build().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("cannot create an ONNX Runtime environment: {e}"))
}

/// Hold this while creating a session that registers the plugin. ONNX Runtime adds a custom-op
/// domain to its process-wide schema table without a lock when a session is created, so two
/// sessions created at once on different threads can fail with "Trying to add a domain to
/// DomainToVersion map, but the domain is already exist" (seen with concurrent test threads).
pub fn session_creation_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
