//! The ops as an ONNX Runtime custom-op library: `register_custom_ops` is what the plugin's
//! exported `RegisterCustomOps` calls.

pub mod api;
mod attrs;
mod cpu;
mod cuda;
mod inputs;
pub mod op;
mod registry;
pub mod runtime;

use api::check;
use op::CustomOp;
use ort_sys::{OrtApiBase, OrtCustomOpDomain, OrtSessionOptions, OrtStatus};
use std::ffi::CString;
use std::sync::OnceLock;

/// The domain with every op, made once per process and kept for its lifetime: ORT requires
/// a domain to outlive the sessions that use it, and one domain may serve many sessions.
struct Domain(*mut OrtCustomOpDomain);
// SAFETY: ORT only reads the domain after creation; it is never mutated once built.
unsafe impl Send for Domain {}
unsafe impl Sync for Domain {}

static DOMAIN: OnceLock<Result<Domain, String>> = OnceLock::new();

fn build_domain() -> Result<Domain, String> {
    let api = ort::api();
    let name = CString::new(crate::spec::DOMAIN).expect("no NUL");
    let mut domain = std::ptr::null_mut();
    check(unsafe { (api.CreateCustomOpDomain)(name.as_ptr(), &mut domain) })?;
    // CPU and CUDA registrations side by side: ORT gives a node to the CUDA kernel when the
    // session has the CUDA execution provider (the CUDA ones need a driver only when they run).
    for def in cpu::ops().into_iter().chain(cuda::ops()) {
        let op: &'static CustomOp = Box::leak(CustomOp::new(def));
        check(unsafe { (api.CustomOpDomain_Add)(domain, op.raw()) })?;
    }
    Ok(Domain(domain))
}

/// Installs the host's API table (version [`api::API_VERSION`]) for this library's use.
///
/// # Safety
/// `api_base` must be the `OrtApiBase` of the ONNX Runtime that loads this library.
pub unsafe fn install_api(api_base: *const OrtApiBase) -> Result<(), String> {
    if api_base.is_null() {
        return Err("scattermoe: RegisterCustomOps was given no OrtApiBase".into());
    }
    let api = ((*api_base).GetApi)(api::API_VERSION);
    if api.is_null() {
        let version = std::ffi::CStr::from_ptr(((*api_base).GetVersionString)()).to_string_lossy();
        return Err(format!(
            "scattermoe: ONNX Runtime {version} does not serve C API version {} (ONNX Runtime 1.20 or newer is required)",
            api::API_VERSION
        ));
    }
    // A second call (another session) finds the table already installed; same runtime, same table.
    ort::set_api(std::ptr::read(api));
    let version = std::ffi::CStr::from_ptr(((*api_base).GetVersionString)()).to_string_lossy().into_owned();
    let _ = HOST_VERSION.set(parse_version(&version));
    Ok(())
}

/// (major, minor) of the ONNX Runtime that loaded us.
static HOST_VERSION: OnceLock<(u32, u32)> = OnceLock::new();

fn parse_version(v: &str) -> (u32, u32) {
    let mut it = v.split('.').map(|p| p.trim().parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// Whether the host runs custom-op shape inference safely. ONNX Runtime before 1.24 dereferences
/// a null type for a node whose optional input is left out in the middle (e.g. `b_out` given
/// without `b_in`) and crashes the process; there we declare no shape-inference function, so
/// output shapes stay unknown until run time (types are still known: outputs are typed).
pub(crate) fn shape_inference_supported() -> bool {
    HOST_VERSION.get().is_some_and(|&v| v >= (1, 24))
}

/// Adds the `ai.scattermoe` domain to `options`. Errors carry the message ORT reports.
///
/// # Safety
/// `options` and `api_base` must come from the ONNX Runtime that loads this library.
pub unsafe fn register_custom_ops(options: *mut OrtSessionOptions, api_base: *const OrtApiBase) -> *mut OrtStatus {
    if let Err(msg) = install_api(api_base) {
        // Without an API table we cannot build a status; say it on stderr and fail quietly.
        eprintln!("{msg}");
        return std::ptr::null_mut();
    }
    let result = DOMAIN.get_or_init(build_domain).as_ref().map_err(Clone::clone).and_then(|d| {
        check(unsafe { (ort::api().AddCustomOpDomain)(options, d.0) })
    });
    match result {
        Ok(()) => std::ptr::null_mut(),
        Err(msg) => api::error_status(&format!("scattermoe: registering the custom ops failed: {msg}")).0,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cuda_ops_mirror_the_cpu_ops() {
        let (cpu, cuda) = (super::cpu::ops(), super::cuda::ops());
        assert_eq!(cpu.len(), cuda.len());
        for (a, b) in cpu.iter().zip(&cuda) {
            assert_eq!(a.name, b.name);
            assert_eq!(a.output_type, b.output_type);
            assert_eq!(b.execution_provider, Some(super::cuda::CUDA_EP));
        }
        // the capacity travels in host memory
        assert_eq!(cuda[0].host_inputs, &[crate::spec::scatter_moe::CAPACITY]);
        assert_eq!(cuda.last().unwrap().host_inputs, &[crate::spec::capacity_mask::CAPACITY]);
    }
}
