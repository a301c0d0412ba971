//! The CUDA driver, loaded at run time through cudarc (`dynamic-loading`): the library loads and
//! runs its CPU ops on machines without a GPU or driver, and only the GPU path reports that no
//! driver was found. Nothing here panics on a missing driver.
//!
//! One [`Device`] per CUDA context: the kernel modules loaded from the embedded fatbins, their
//! functions (with the dynamic shared-memory opt-in and the occupancy that sizes the persistent
//! grids), the SM count and the compute capability. Made once per context, kept for the process
//! (contexts are few; the primary context of each device in practice), behind a Mutex.

use super::arch::{Arch, Table};
use super::catalogue::{entry_points, Entry, TARGETS};
use cudarc::driver::sys::{self, CUcontext, CUdevice, CUdeviceptr, CUfunction, CUmodule, CUresult, CUstream};
use std::collections::HashMap;
use std::ffi::{c_void, CStr, CString};
use std::sync::{Mutex, OnceLock};

/// A failed driver call, as text (the GPU path reports errors as ORT statuses / test failures).
pub type CuResult<T> = Result<T, String>;

/// Turns a driver status into a Result naming the call.
pub fn check(r: CUresult, what: &str) -> CuResult<()> {
    if r == CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    // SAFETY: only reached after the driver loaded (every caller went through `driver()`).
    let (mut name, mut text) = (std::ptr::null(), std::ptr::null());
    unsafe {
        sys::cuGetErrorName(r, &mut name);
        sys::cuGetErrorString(r, &mut text);
    }
    let s = |p: *const std::ffi::c_char| if p.is_null() { "?".into() } else { unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned() };
    Err(format!("{what} failed: {} ({})", s(name), s(text)))
}

/// Whether the CUDA driver library can be loaded, and cuInit succeeded. Cached.
pub fn driver() -> CuResult<()> {
    static INIT: OnceLock<CuResult<()>> = OnceLock::new();
    INIT.get_or_init(|| {
        // SAFETY: only tries to dlopen libcuda; never panics.
        if !unsafe { sys::is_culib_present() } {
            return Err("no CUDA driver found (libcuda.so could not be loaded)".into());
        }
        // Every entry point used here must exist (cudarc panics on a missing symbol): a driver
        // older than these is reported, not called.
        const NEEDED: [&str; 8] = [
            "cuInit", "cuStreamGetCtx", "cuModuleLoadData", "cuFuncSetAttribute", "cuLaunchKernel",
            "cuStreamIsCapturing", "cuMemcpyDtoHAsync_v2", "cuOccupancyMaxActiveBlocksPerMultiprocessor",
        ];
        if let Some(missing) = NEEDED.iter().find(|n| !has_symbol(n)) {
            return Err(format!("the CUDA driver is too old (it lacks {missing})"));
        }
        // cuInit may still fail (no device, driver/library mismatch): report, do not panic.
        check(unsafe { sys::cuInit(0) }, "cuInit")
    })
    .clone()
}

/// Whether a CUDA device can be used (a driver and at least one device).
pub fn device_count() -> usize {
    if driver().is_err() {
        return 0;
    }
    let mut n = 0;
    // SAFETY: the driver is initialised.
    if unsafe { sys::cuDeviceGetCount(&mut n) } != CUresult::CUDA_SUCCESS {
        return 0;
    }
    n.max(0) as usize
}

/// Kernel modules (kernels/*.cu), in the order of [`Device::modules`].
pub use super::catalogue::MODULES;

/// One kernel: the function, its block size, its dynamic shared memory, and how many of its
/// blocks the whole device holds at once (the size of a persistent grid).
#[derive(Debug, Clone, Copy)]
pub struct Func {
    pub f: CUfunction,
    pub threads: u32,
    pub smem: u32,
    pub resident: u32,
    /// CTAs per cluster (declared in the kernel with `__cluster_dims__`); grids are a multiple.
    pub cluster: u32,
    /// Launched with programmatic dependent launch (see [`pdl_supported`]).
    pub pdl: bool,
}

/// What the forward needs of one CUDA context.
pub struct Device {
    pub ctx: CUcontext,
    pub device: CUdevice,
    pub sms: u32,
    /// compute capability (major, minor)
    pub cc: (i32, i32),
    /// the arch whose native code runs here (selects the kernels)
    pub arch: Arch,
    /// the kernel choice's per-card thresholds, from the device's name
    pub table: Table,
    modules: Vec<CUmodule>,
    funcs: HashMap<String, Func>,
}

// SAFETY: the handles are process-wide driver objects, usable from any thread once their context
// is current; a Device is immutable after creation.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

impl Device {
    /// The kernel `name`, or why it is missing (e.g. a wgmma kernel below sm_90).
    pub fn func(&self, name: &str) -> CuResult<Func> {
        self.funcs.get(name).copied().ok_or_else(|| {
            format!("CUDA kernel '{name}' is not available on this device (compute capability {}.{})", self.cc.0, self.cc.1)
        })
    }

    /// Whether the Hopper (wgmma) kernels run here.
    pub fn has_wgmma(&self) -> bool {
        self.arch.has_wgmma()
    }

    pub fn modules(&self) -> &[CUmodule] {
        &self.modules
    }
}

fn load(ctx: CUcontext) -> CuResult<Device> {
    unsafe {
        let mut device: CUdevice = 0;
        check(sys::cuCtxGetDevice(&mut device), "cuCtxGetDevice")?;
        let attr = |a: sys::CUdevice_attribute| -> CuResult<i32> {
            let mut v = 0;
            check(sys::cuDeviceGetAttribute(&mut v, a, device), "cuDeviceGetAttribute")?;
            Ok(v)
        };
        use sys::CUdevice_attribute::*;
        let sms = attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let cc = (attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?, attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?);
        let built: Vec<&str> = TARGETS.iter().map(|a| a.name()).collect();
        let arch = Arch::from_cc(cc).filter(|a| TARGETS.contains(a)).ok_or_else(|| {
            format!("no CUDA kernels for this device (compute capability {}.{}): they hold native code for {}", cc.0, cc.1, built.join(", "))
        })?;
        let mut modules = Vec::new();
        for name in MODULES {
            let image = super::image(name)?;
            // cuModuleLoadData wants an 8-byte aligned fatbin; include_bytes! promises no alignment.
            let mut aligned = vec![0u64; image.len().div_ceil(8)];
            std::ptr::copy_nonoverlapping(image.as_ptr(), aligned.as_mut_ptr().cast::<u8>(), image.len());
            let mut m: CUmodule = std::ptr::null_mut();
            check(sys::cuModuleLoadData(&mut m, aligned.as_ptr().cast::<c_void>()), &format!("cuModuleLoadData({name}.fatbin)"))
                .map_err(|e| format!("{e}; the kernels hold native code for {} (this device is {}.{})", built.join(", "), cc.0, cc.1))?;
            modules.push(m);
        }
        let pdl = pdl_supported(cc);
        let table = Table::for_device(&device_name(device));
        let mut funcs = HashMap::new();
        for &Entry { module: m, name, threads, smem, cluster, tma, archs } in entry_points() {
            if !archs.contains(&arch) {
                continue; // no native code here (its body traps); never launched here
            }
            if tma && !has_symbol("cuTensorMapEncodeTiled") {
                continue; // a driver that cannot encode the map: the cp.async form is used
            }
            let c = CString::new(name).expect("no NUL");
            let mut f: CUfunction = std::ptr::null_mut();
            check(sys::cuModuleGetFunction(&mut f, modules[m], c.as_ptr()), &format!("cuModuleGetFunction({name})"))?;
            if smem > 0 {
                // static + dynamic smem exceeds 48 KB for the tensor-core kernels: opt in once.
                check(
                    sys::cuFuncSetAttribute(f, sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32),
                    &format!("cuFuncSetAttribute({name}, MAX_DYNAMIC_SHARED_SIZE_BYTES = {smem})"),
                )?;
            }
            let resident = if cluster > 1 {
                // Clusters must fit inside one GPC, so the device may hold fewer CTAs than
                // SMs x blocks per SM; a persistent grid larger than this would run a second wave.
                match max_active_clusters(f, threads, smem, cluster, sms) {
                    Some(c) if c > 0 => c * cluster,
                    _ => continue, // driver without cluster occupancy: the kernel is not offered
                }
            } else {
                let mut blocks = 0;
                check(
                    sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut blocks, f, threads as i32, smem as usize),
                    &format!("cuOccupancyMaxActiveBlocksPerMultiprocessor({name})"),
                )?;
                sms * blocks.max(1) as u32
            };
            funcs.insert(name.to_string(), Func { f, threads, smem, resident, cluster, pdl });
        }
        Ok(Device { ctx, device, sms, cc, arch, table, modules, funcs })
    }
}

/// The device's name (cuDeviceGetName), empty if the driver does not give it.
unsafe fn device_name(device: CUdevice) -> String {
    let mut buf = [0 as std::ffi::c_char; 256];
    if sys::cuDeviceGetName(buf.as_mut_ptr(), buf.len() as i32, device) != CUresult::CUDA_SUCCESS {
        return String::new();
    }
    std::ffi::CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
}

/// The environment variable that turns programmatic dependent launch off (`=0`), for A/B runs.
pub const PDL_ENV: &str = "SCATTERMOE_CUDA_PDL";

/// Whether kernels are launched with programmatic dependent launch (each kernel's CTAs may be
/// scheduled while the previous kernel in the stream drains; every kernel waits for its
/// predecessor in `pdl_begin`, kernels/common.cuh). Needs compute capability 9.0 or newer, and a
/// driver of CUDA 12.3 or newer (cuLaunchKernelEx, and programmatic edges under graph capture).
fn pdl_supported(cc: (i32, i32)) -> bool {
    if cc.0 < 9 || std::env::var(PDL_ENV).is_ok_and(|v| v.trim() == "0") || !has_symbol("cuLaunchKernelEx") {
        return false;
    }
    let mut version = 0;
    // SAFETY: the driver is initialised.
    let r = unsafe { sys::cuDriverGetVersion(&mut version) };
    r == CUresult::CUDA_SUCCESS && version >= 12030
}

/// How many clusters of `cluster` CTAs of `f` the device runs at once (None: the driver cannot say).
unsafe fn max_active_clusters(f: CUfunction, threads: u32, smem: u32, cluster: u32, sms: u32) -> Option<u32> {
    // Arrived with CUDA 12.0 drivers; an older driver (which may still run cc 9.0) gets the
    // single-CTA kernel instead (cudarc panics on a missing symbol, so ask first).
    if !has_symbol("cuOccupancyMaxActiveClusters") {
        return None;
    }
    let config = sys::CUlaunchConfig {
        gridDimX: sms.div_ceil(cluster) * cluster,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: threads,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem,
        hStream: std::ptr::null_mut(),
        attrs: std::ptr::null_mut(), // the cluster shape is compiled into the kernel
        numAttrs: 0,
    };
    let mut n = 0;
    // SAFETY: `f` is a loaded function; the config outlives the call.
    let r = unsafe { sys::cuOccupancyMaxActiveClusters(&mut n, f, &config) };
    (r == sys::CUresult::CUDA_SUCCESS).then_some(n.max(0) as u32)
}

/// Makes `ctx` current on this thread for the guard's lifetime, restoring the previous one after.
pub struct CurrentGuard {
    previous: Option<CUcontext>,
}

impl Drop for CurrentGuard {
    fn drop(&mut self) {
        if let Some(p) = self.previous {
            // SAFETY: restoring the context that was current before (possibly null).
            unsafe { sys::cuCtxSetCurrent(p) };
        }
    }
}

/// The context that owns `stream` (the current one for the legacy/null stream), made current.
///
/// # Safety
/// `stream` must be null or a live stream.
pub unsafe fn stream_context(stream: CUstream) -> CuResult<(CUcontext, CurrentGuard)> {
    driver()?;
    unsafe {
        let mut cur: CUcontext = std::ptr::null_mut();
        check(sys::cuCtxGetCurrent(&mut cur), "cuCtxGetCurrent")?;
        let mut ctx: CUcontext = std::ptr::null_mut();
        if stream.is_null() {
            ctx = cur;
        } else {
            check(sys::cuStreamGetCtx(stream, &mut ctx), "cuStreamGetCtx")?;
        }
        if ctx.is_null() {
            return Err("no CUDA context is current and the stream names none".into());
        }
        let mut guard = CurrentGuard { previous: None };
        if ctx != cur {
            check(sys::cuCtxSetCurrent(ctx), "cuCtxSetCurrent")?;
            guard.previous = Some(cur);
        }
        Ok((ctx, guard))
    }
}

/// The [`Device`] of `stream`'s context (loaded on first use), with that context current until
/// the guard drops.
///
/// # Safety
/// `stream` must be null or a live stream.
pub unsafe fn for_stream(stream: CUstream) -> CuResult<(&'static Device, CurrentGuard)> {
    static CACHE: Mutex<Vec<(u64, &'static Device)>> = Mutex::new(Vec::new());
    let (ctx, guard) = stream_context(stream)?;
    let key = context_key(ctx)?;
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, d)) = cache.iter().find(|(c, _)| *c == key) {
        return Ok((d, guard));
    }
    let dev: &'static Device = Box::leak(Box::new(load(ctx)?));
    cache.push((key, dev));
    Ok((dev, guard))
}

/// Whether the loaded driver exports `name` (cudarc panics on a call to a missing symbol).
fn has_symbol(name: &str) -> bool {
    // SAFETY: only looks the symbol up in the already loaded driver library.
    unsafe { sys::culib().get::<*const c_void>(name.as_bytes()).is_ok() }
}

/// A key that tells contexts apart for the process lifetime: the context's unique id (CUDA 12+;
/// a destroyed context's address can be reused by a new one), else its address.
fn context_key(ctx: CUcontext) -> CuResult<u64> {
    static HAS_ID: OnceLock<bool> = OnceLock::new();
    if *HAS_ID.get_or_init(|| has_symbol("cuCtxGetId")) {
        let mut id = 0;
        check(unsafe { sys::cuCtxGetId(ctx, &mut id) }, "cuCtxGetId")?;
        Ok(id)
    } else {
        Ok(ctx as u64)
    }
}

/// Whether `stream` is being captured into a CUDA graph (no synchronisation or event query then).
///
/// # Safety
/// `stream` must be null or a live stream.
pub unsafe fn is_capturing(stream: CUstream) -> CuResult<bool> {
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    check(unsafe { sys::cuStreamIsCapturing(stream, &mut status) }, "cuStreamIsCapturing")?;
    Ok(status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
}

/// A tensor map's 128 opaque bytes, as the kernel receives them (`__grid_constant__`): a launch
/// argument type, so it lives here; `tensor_map` encodes them.
pub type MapBytes = [u64; 16];

/// A kernel argument, passed by address to cuLaunchKernel.
#[derive(Clone, Copy)]
pub enum Arg {
    Ptr(CUdeviceptr),
    I32(i32),
    F32(f32),
    /// A 128-byte TMA tensor map, passed by value (`__grid_constant__`).
    Map(MapBytes),
}

impl Arg {
    pub fn opt(p: Option<CUdeviceptr>) -> Arg {
        Arg::Ptr(p.unwrap_or(0))
    }
}

/// Storage for each argument's value (room for the largest, a tensor map); the kernel reads each
/// through its own pointer. Little-endian: the low bytes hold an i32 / f32 value.
#[repr(C, align(64))]
struct Slot([u64; 16]);

fn slots(args: &[Arg]) -> Vec<Slot> {
    let word = |v: u64| {
        let mut s = [0u64; 16];
        s[0] = v;
        Slot(s)
    };
    args.iter()
        .map(|a| match *a {
            Arg::Ptr(p) => word(p),
            Arg::I32(v) => word(v as u32 as u64),
            Arg::F32(v) => word(v.to_bits() as u64),
            Arg::Map(m) => Slot(m),
        })
        .collect()
}

/// cuLaunchKernelEx's configuration of `f` on `grid`, with `attrs`.
fn launch_config(f: &Func, grid: (u32, u32), stream: CUstream, attrs: &mut [sys::CUlaunchAttribute]) -> sys::CUlaunchConfig {
    sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: 1,
        blockDimX: f.threads,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: f.smem,
        hStream: stream,
        attrs: attrs.as_mut_ptr(),
        numAttrs: attrs.len() as u32,
    }
}

/// Launches `f` on `stream`.
///
/// # Safety
/// The arguments must match the kernel's parameter list, and every pointer must be valid for
/// what the kernel reads and writes (see the contracts in kernels/*.cu).
pub unsafe fn launch(f: &Func, grid: (u32, u32), stream: CUstream, args: &[Arg], name: &str) -> CuResult<()> {
    let mut vals = slots(args);
    let mut ptrs: Vec<*mut c_void> = vals.iter_mut().map(|v| (v as *mut Slot).cast::<c_void>()).collect();
    let r = if f.pdl {
        // SAFETY: all-zero bytes are a valid attribute value (a union of plain integers).
        let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = launch_config(f, grid, stream, std::slice::from_mut(&mut attr));
        sys::cuLaunchKernelEx(&config, f.f, ptrs.as_mut_ptr(), std::ptr::null_mut())
    } else {
        sys::cuLaunchKernel(f.f, grid.0, grid.1, 1, f.threads, 1, 1, f.smem, stream, ptrs.as_mut_ptr(), std::ptr::null_mut())
    };
    if r == sys::CUresult::CUDA_SUCCESS {
        return Ok(()); // (the message below is built only on failure: this runs six times a forward)
    }
    let call = if f.pdl { "cuLaunchKernelEx (programmatic dependent launch)" } else { "cuLaunchKernel" };
    check(r, &format!("{call}({name}, grid ({}, {}), block {}, smem {})", grid.0, grid.1, f.threads, f.smem))
}

/// Whether the driver took the cooperative and programmatic-dependent-launch attributes together on a
/// launch of this process: 0 not yet tried, 1 yes, 2 no (cooperative alone from then on).
static COOP_WITH_PDL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether this driver can launch cooperatively through cuLaunchKernelEx (the decode kernel's way):
/// looked up once per process (the op asks on every call).
pub fn cooperative_supported() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| has_symbol("cuLaunchKernelEx"))
}

/// Launches `f` on `stream` cooperatively: every CTA of `grid` (at most `f.resident`) resident at
/// once, as grid barriers need (kernels/moe_decode.cu); with programmatic dependent
/// launch too where `f.pdl` and the driver takes both (else, once refused, cooperative alone).
///
/// Returns false, having launched nothing, where the driver refuses the grid as too large to be
/// resident at once (fewer SMs than the occupancy said, e.g. a share of the GPU under MPS): the
/// caller then runs the op another way.
///
/// # Safety
/// As [`launch`]; `grid` must not exceed `f.resident`.
pub unsafe fn launch_cooperative(f: &Func, grid: u32, stream: CUstream, args: &[Arg], name: &str) -> CuResult<bool> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut vals = slots(args);
    let mut ptrs: Vec<*mut c_void> = vals.iter_mut().map(|v| (v as *mut Slot).cast::<c_void>()).collect();
    let with_pdl = f.pdl && COOP_WITH_PDL.load(Relaxed) != 2;
    // SAFETY: all-zero bytes are a valid attribute value (a union of plain integers).
    let mut attrs: [sys::CUlaunchAttribute; 2] = std::mem::zeroed();
    attrs[0].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
    attrs[0].value.cooperative = 1;
    attrs[1].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attrs[1].value.programmaticStreamSerializationAllowed = 1;
    let config = launch_config(f, (grid, 1), stream, &mut attrs[..if with_pdl { 2 } else { 1 }]);
    let r = sys::cuLaunchKernelEx(&config, f.f, ptrs.as_mut_ptr(), std::ptr::null_mut());
    if r == sys::CUresult::CUDA_SUCCESS {
        if with_pdl {
            COOP_WITH_PDL.store(1, Relaxed);
        }
        return Ok(true);
    }
    if r == sys::CUresult::CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE {
        return Ok(false);
    }
    if with_pdl && COOP_WITH_PDL.load(Relaxed) == 0 {
        COOP_WITH_PDL.store(2, Relaxed);
        return launch_cooperative(f, grid, stream, args, name);
    }
    check(r, &format!("cuLaunchKernelEx (cooperative{}) ({name}, grid {grid}, block {}, smem {})", if with_pdl { ", programmatic dependent launch" } else { "" }, f.threads, f.smem))
        .map(|()| true)
}
