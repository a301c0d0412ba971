//! Opening ONNX Runtime from a Rust program (the CLI, the tests): the plugin receives ORT's API
//! from its host, but a program that runs sessions itself must load the shared library.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

static LOADED: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// What a program that embeds this library knows better than the search below: the Python
/// package sets the onnxruntime of the interpreter it runs in and the op library it ships.
#[derive(Default)]
struct Hints {
    python_onnxruntime: Option<PathBuf>,
    plugin: Option<PathBuf>,
}

static HINTS: Mutex<Hints> = Mutex::new(Hints { python_onnxruntime: None, plugin: None });

fn hints() -> std::sync::MutexGuard<'static, Hints> {
    HINTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `libonnxruntime.so` of the Python that embeds this library (used in place of asking the
/// `python3` on PATH). Effective before the first [`load`].
pub fn set_python_onnxruntime(lib: PathBuf) {
    hints().python_onnxruntime = Some(lib);
}

/// The op library shipped beside an embedding program (used when `SCATTERMOE_ORT_LIB` is unset).
pub fn set_plugin(lib: PathBuf) {
    hints().plugin = Some(lib);
}

/// Loads `libonnxruntime` once per process and installs its API for `ort`; returns its path.
/// Searched in this order (the first that exists is used; none is tried after a failure):
/// 1. `ORT_DYLIB_PATH`, when set and not empty: the user's explicit choice;
/// 2. the `onnxruntime` package of the active Python (the interpreter embedding this library,
///    else the `python3` on PATH), found without importing it;
/// 3. the project's `.venv` (from `scripts/setup-python.sh`) above the running executable or the
///    current directory.
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

/// Where [`load`] finds ONNX Runtime, without loading it (the search order is [`load`]'s).
pub fn find_onnxruntime() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            return Err(format!("ORT_DYLIB_PATH is {}, which is not a file: point it at libonnxruntime.so, or unset it", p.display()));
        }
        return Ok(p);
    }
    let embedded = hints().python_onnxruntime.clone();
    let python = match embedded {
        Some(p) => Some(p).filter(|p| p.is_file()),
        None => python_library(),
    };
    if let Some(p) = python {
        return Ok(p);
    }
    let starts = [std::env::current_exe().ok(), std::env::current_dir().ok()];
    for start in starts.iter().flatten() {
        for dir in start.ancestors() {
            if let Some(p) = venv_library(&dir.join(".venv")) {
                return Ok(p);
            }
        }
    }
    Err("ONNX Runtime not found: ORT_DYLIB_PATH is not set, the active Python has no onnxruntime package, and no project .venv \
         holds one; install it (`python3 -m pip install onnxruntime`), set ORT_DYLIB_PATH to libonnxruntime.so, or run \
         scripts/setup-python.sh in the project"
        .into())
}

/// `capi/libonnxruntime.so.*` of the onnxruntime package the `python3` on PATH would import
/// (located with importlib, not imported: no start-up cost, no warnings).
fn python_library() -> Option<PathBuf> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import importlib.util,os;s=importlib.util.find_spec('onnxruntime');print(os.path.dirname(s.origin) if s and s.origin else '')"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if dir.is_empty() {
        return None;
    }
    capi_library(&PathBuf::from(dir).join("capi"))
}

/// The newest `libonnxruntime.so.*` in an onnxruntime package's `capi` folder.
pub fn capi_library(capi: &Path) -> Option<PathBuf> {
    let mut libs: Vec<PathBuf> = std::fs::read_dir(capi)
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
    std::fs::read_dir(lib).ok()?.flatten().find_map(|py| capi_library(&py.path().join("site-packages/onnxruntime/capi")))
}

/// The custom-op library to register: `SCATTERMOE_ORT_LIB`, else the one an embedding program
/// ships ([`set_plugin`]), else `libscattermoe_ort.so` beside the running executable (or one
/// folder up, for test binaries in target/*/deps).
pub fn plugin_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SCATTERMOE_ORT_LIB").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = hints().plugin.clone() {
        return Ok(p);
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

/// Most bytes the proof's sessions may take for the values they compute (their initializers are
/// allocated outside it): a cut-out region runs on at most 61 tokens, so this is far more than a
/// real region needs, and a buffer sized by data values (a hand-edited graph that feeds a
/// `ConstantOfShape` from data) fails the case cleanly instead of exhausting the machine.
pub const PROOF_ARENA_BYTES: usize = 4 << 30;

/// Registers, once, a CPU arena capped at [`PROOF_ARENA_BYTES`] with the environment. Sessions
/// use it only where they ask (`session.use_env_allocators`): the proof's do, `--verify`'s (whole
/// models) do not.
pub fn capped_arena() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let env = environment()?;
    DONE.get_or_init(|| unsafe { register_capped_arena(env) })
        .clone()
        .map_err(|e| anyhow::anyhow!("cannot register a capped allocator with ONNX Runtime: {e}"))
}

unsafe fn register_capped_arena(env: &ort::environment::Environment) -> Result<(), String> {
    use ort::AsPointer;
    let api = ort::api();
    let check = |st: ort_sys::OrtStatusPtr| -> Result<(), String> {
        if st.0.is_null() {
            return Ok(());
        }
        let msg = std::ffi::CStr::from_ptr((api.GetErrorMessage)(st.0)).to_string_lossy().into_owned();
        (api.ReleaseStatus)(st.0);
        Err(msg)
    };
    // arena_extend_strategy 1 (kSameAsRequested): grow by what is asked, so the cap is reached
    // only by what the region really allocates
    let keys = [c"max_mem".as_ptr(), c"arena_extend_strategy".as_ptr()];
    let values = [PROOF_ARENA_BYTES, 1usize];
    let mut cfg = std::ptr::null_mut();
    check((api.CreateArenaCfgV2)(keys.as_ptr(), values.as_ptr(), keys.len(), &mut cfg))?;
    let mut info = std::ptr::null_mut();
    if let Err(e) = check((api.CreateCpuMemoryInfo)(ort_sys::OrtAllocatorType::OrtArenaAllocator, ort_sys::OrtMemType::OrtMemTypeDefault, &mut info)) {
        (api.ReleaseArenaCfg)(cfg);
        return Err(e);
    }
    let st = (api.CreateAndRegisterAllocator)(env.ptr() as *mut _, info, cfg);
    (api.ReleaseMemoryInfo)(info);
    (api.ReleaseArenaCfg)(cfg);
    check(st)
}

/// Hold this while creating a session that registers the plugin. ONNX Runtime adds a custom-op
/// domain to its process-wide schema table without a lock when a session is created, so two
/// sessions created at once on different threads can fail with "Trying to add a domain to
/// DomainToVersion map, but the domain is already exist" (seen with concurrent test threads).
pub fn session_creation_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
