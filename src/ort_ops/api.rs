//! Thin safe wrappers over the parts of ONNX Runtime's C API that custom ops use.
//!
//! The API table comes from `ort::api()`: the plugin installs the host's table in
//! `RegisterCustomOps`; the CLI and tests install the one of the library they open. Everything
//! here asks for API version 20 at most, so the same binary serves ORT 1.20 through 1.31.

use ort_sys::{
    ONNXTensorElementDataType, OrtErrorCode, OrtKernelContext, OrtKernelInfo, OrtShapeInferContext,
    OrtStatus, OrtStatusPtr, OrtTensorTypeAndShapeInfo, OrtValue,
};
use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr;

/// The API version this crate asks for; ORT 1.20 is the oldest that serves it.
pub const API_VERSION: u32 = 20;

pub(super) fn api() -> &'static ort_sys::OrtApi {
    ort::api()
}

/// Turns an ORT status into a Result, releasing the status.
pub(crate) fn check(status: OrtStatusPtr) -> Result<(), String> {
    if status.0.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null status from ORT; its message lives until ReleaseStatus.
    let msg = unsafe { CStr::from_ptr((api().GetErrorMessage)(status.0)).to_string_lossy().into_owned() };
    unsafe { (api().ReleaseStatus)(status.0) };
    Err(msg)
}

/// A status carrying `msg`, for returning an error to ORT.
pub fn error_status(msg: &str) -> OrtStatusPtr {
    let c = CString::new(msg.replace('\0', " ")).expect("no interior NUL");
    // SAFETY: ORT copies the message.
    unsafe { (api().CreateStatus)(OrtErrorCode::ORT_FAIL, c.as_ptr()) }
}

pub fn ok_status() -> OrtStatusPtr {
    OrtStatusPtr(ptr::null_mut::<OrtStatus>())
}

/// Element type code and dimensions (-1 where symbolic) of a tensor type/shape info.
fn read_type_shape(info: *const OrtTensorTypeAndShapeInfo) -> Result<(i32, Vec<i64>), String> {
    let (code, dims, _) = read_type_shape_named(info, false)?;
    Ok((code, dims))
}

/// As [`read_type_shape`], with the symbolic names of unknown dimensions when `names` is set.
fn read_type_shape_named(info: *const OrtTensorTypeAndShapeInfo, names: bool) -> Result<(i32, Vec<i64>, Vec<String>), String> {
    let mut code: i32 = 0;
    // SAFETY: ORT writes one enum value (an i32-sized C enum) into `code`; reading it as an
    // i32 avoids materialising a Rust enum from a value a newer ORT might add.
    check(unsafe { (api().GetTensorElementType)(info, (&mut code as *mut i32).cast::<ONNXTensorElementDataType>()) })?;
    let mut n = 0usize;
    check(unsafe { (api().GetDimensionsCount)(info, &mut n) })?;
    let mut dims = vec![0i64; n];
    check(unsafe { (api().GetDimensions)(info, dims.as_mut_ptr(), n) })?;
    let mut params = vec![String::new(); n];
    if names && n > 0 {
        let mut raw: Vec<*const c_char> = vec![ptr::null(); n];
        check(unsafe { (api().GetSymbolicDimensions)(info, raw.as_mut_ptr(), n) })?;
        for (p, r) in params.iter_mut().zip(raw) {
            if !r.is_null() {
                *p = unsafe { CStr::from_ptr(r) }.to_string_lossy().into_owned();
            }
        }
    }
    Ok((code, dims, params))
}

/// A dimension as shape inference reports it: a value, or a symbolic name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SymDim {
    Value(u64),
    Param(String),
}

impl SymDim {
    pub fn dim(&self) -> Option<u64> {
        match self {
            SymDim::Value(v) => Some(*v),
            SymDim::Param(_) => None,
        }
    }

    /// A fresh name for a dimension nobody named: ORT writes an unnamed unknown as the value -1,
    /// which later passes would take literally.
    pub fn fresh() -> SymDim {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        SymDim::Param(format!("scattermoe_dim_{}", NEXT.fetch_add(1, Ordering::Relaxed)))
    }
}

/// A tensor's type and shape as the contract checks them: `None` dims are symbolic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeShape {
    pub elem: i32,
    pub dims: Vec<Option<u64>>,
}

impl TypeShape {
    fn from_raw(code: i32, dims: &[i64]) -> Self {
        TypeShape { elem: code, dims: dims.iter().map(|&d| u64::try_from(d).ok()).collect() }
    }
}

// ---------------------------------------------------------------------------------------------
// Kernel creation
// ---------------------------------------------------------------------------------------------

/// ORT's kernel info: the node's attributes and its inputs' types and (possibly symbolic) shapes.
pub struct KernelInfo(pub *const OrtKernelInfo);

impl KernelInfo {
    pub fn input_count(&self) -> Result<usize, String> {
        let mut n = 0;
        check(unsafe { (api().KernelInfo_GetInputCount)(self.0, &mut n) })?;
        Ok(n)
    }

    fn input_name(&self, i: usize) -> Result<String, String> {
        let mut len = 0usize;
        check(unsafe { (api().KernelInfo_GetInputName)(self.0, i, ptr::null_mut(), &mut len) })?;
        let mut buf = vec![0u8; len.max(1)];
        check(unsafe { (api().KernelInfo_GetInputName)(self.0, i, buf.as_mut_ptr().cast::<c_char>(), &mut len) })?;
        Ok(CStr::from_bytes_until_nul(&buf).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default())
    }

    /// The input's type and shape, or None when the node leaves this optional input out.
    pub fn input(&self, i: usize) -> Result<Option<TypeShape>, String> {
        if i >= self.input_count()? || self.input_name(i)?.is_empty() {
            return Ok(None);
        }
        let mut ti = ptr::null_mut();
        check(unsafe { (api().KernelInfo_GetInputTypeInfo)(self.0, i, &mut ti) })?;
        let mut tensor_info = ptr::null();
        let r = check(unsafe { (api().CastTypeInfoToTensorInfo)(ti, &mut tensor_info) })
            .and_then(|_| if tensor_info.is_null() { Err(format!("input {i} is not a tensor")) } else { read_type_shape(tensor_info) });
        unsafe { (api().ReleaseTypeInfo)(ti) };
        let (code, dims) = r?;
        Ok(Some(TypeShape::from_raw(code, &dims)))
    }
}

impl KernelInfo {
    /// Input `i` when it is a constant initializer (its value fixed for the session's lifetime,
    /// owned by ORT), else None: absent, a graph input, or computed by another node.
    pub fn constant_input(&self, i: usize) -> Result<Option<Tensor>, String> {
        if i >= self.input_count()? {
            return Ok(None);
        }
        let mut is_constant = 0;
        let mut v: *const OrtValue = ptr::null();
        check(unsafe { (api().KernelInfoGetConstantInput_tensor)(self.0, i, &mut is_constant, &mut v) })?;
        if is_constant == 0 || v.is_null() {
            return Ok(None);
        }
        tensor(v).map(Some)
    }
}

// ---------------------------------------------------------------------------------------------
// Shape inference
// ---------------------------------------------------------------------------------------------

pub struct ShapeContext(pub *mut OrtShapeInferContext);

impl ShapeContext {
    pub fn input_count(&self) -> Result<usize, String> {
        let mut n = 0;
        check(unsafe { (api().ShapeInferContext_GetInputCount)(self.0, &mut n) })?;
        Ok(n)
    }

    /// The input's type and shape (unknown dimensions named); None when absent.
    pub fn input(&self, i: usize) -> Result<Option<(i32, Vec<SymDim>)>, String> {
        if i >= self.input_count()? {
            return Ok(None);
        }
        let mut info = ptr::null_mut();
        if check(unsafe { (api().ShapeInferContext_GetInputTypeShape)(self.0, i, &mut info) }).is_err() || info.is_null() {
            return Ok(None);
        }
        // The context owns `info` (ORT's C++ wrapper treats it as a const view): no release.
        let (code, dims, names) = read_type_shape_named(info, true)?;
        if code == 0 {
            return Ok(None);
        }
        let sym = dims
            .iter()
            .zip(names)
            .map(|(&d, name)| match u64::try_from(d) {
                Ok(v) => SymDim::Value(v),
                Err(_) if !name.is_empty() => SymDim::Param(name),
                Err(_) => SymDim::fresh(),
            })
            .collect();
        Ok(Some((code, sym)))
    }

    pub fn set_output(&mut self, i: usize, elem: i32, dims: &[SymDim]) -> Result<(), String> {
        let mut info = ptr::null_mut();
        check(unsafe { (api().CreateTensorTypeAndShapeInfo)(&mut info) })?;
        let raw: Vec<i64> = dims.iter().map(|d| d.dim().map_or(-1, |v| v as i64)).collect();
        let names: Vec<CString> = dims
            .iter()
            .map(|d| CString::new(if let SymDim::Param(p) = d { p.as_str() } else { "" }).unwrap_or_default())
            .collect();
        let mut name_ptrs: Vec<*const c_char> = names.iter().map(|c| c.as_ptr()).collect();
        // SAFETY: `elem` is one of the float codes the contract accepts (1, 10, 16).
        let ty: ONNXTensorElementDataType = unsafe { std::mem::transmute::<i32, ONNXTensorElementDataType>(elem) };
        let r = check(unsafe { (api().SetTensorElementType)(info, ty) })
            .and_then(|_| check(unsafe { (api().SetDimensions)(info, raw.as_ptr(), raw.len()) }))
            .and_then(|_| check(unsafe { (api().SetSymbolicDimensions)(info, name_ptrs.as_mut_ptr(), name_ptrs.len()) }))
            .and_then(|_| check(unsafe { (api().ShapeInferContext_SetOutputTypeShape)(self.0, i, info) }));
        unsafe { (api().ReleaseTensorTypeAndShapeInfo)(info) };
        r
    }
}

// ---------------------------------------------------------------------------------------------
// Compute
// ---------------------------------------------------------------------------------------------

/// An input tensor at compute time.
pub struct Tensor {
    pub elem: i32,
    pub dims: Vec<usize>,
    pub data: *const c_void,
}

impl Tensor {
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The data as a slice of `E`.
    ///
    /// # Safety
    /// `E` must match `elem`, and the data must be host memory.
    pub unsafe fn slice<E>(&self) -> &[E] {
        if self.is_empty() {
            return &[];
        }
        std::slice::from_raw_parts(self.data.cast::<E>(), self.len())
    }

    pub fn shape(&self) -> Vec<Option<u64>> {
        self.dims.iter().map(|&d| Some(d as u64)).collect()
    }
}

/// The tensor an ORT value holds: type, dimensions, data pointer.
fn tensor(v: *const OrtValue) -> Result<Tensor, String> {
    let mut info = ptr::null_mut();
    check(unsafe { (api().GetTensorTypeAndShape)(v, &mut info) })?;
    let r = read_type_shape(info);
    unsafe { (api().ReleaseTensorTypeAndShapeInfo)(info) };
    let (elem, dims) = r?;
    let mut data = ptr::null_mut();
    check(unsafe { (api().GetTensorMutableData)(v.cast_mut(), &mut data) })?;
    Ok(Tensor { elem, dims: dims.iter().map(|&d| d.max(0) as usize).collect(), data })
}

pub struct KernelContext(pub *mut OrtKernelContext);

/// What ORT's ParallelFor calls: the user data is the caller's closure.
unsafe extern "C" fn parallel_for_entry(data: *mut c_void, i: usize) {
    let (f, panicked) = &*(data as *const (&(dyn Fn(usize) + Sync), std::sync::atomic::AtomicBool));
    // A panic must not unwind into ORT's thread pool: note it, and re-raise it on our side.
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i))).is_err() {
        panicked.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl KernelContext {
    /// Runs `f(i)` for every i in 0..n on ORT's intra-op thread pool (the session's threads,
    /// so the op does not compete with a pool of its own), returning when all are done.
    pub fn parallel_for(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n <= 1 {
            (0..n).for_each(f);
            return;
        }
        let data = (f, std::sync::atomic::AtomicBool::new(false));
        let status = unsafe {
            (api().KernelContext_ParallelFor)(self.0, parallel_for_entry, n, 0, &data as *const _ as *mut c_void)
        };
        if check(status).is_err() {
            // No pool available (ORT says so): run here.
            (0..n).for_each(f);
        }
        if data.1.load(std::sync::atomic::Ordering::Relaxed) {
            panic!("a parallel task panicked");
        }
    }

    pub fn input_count(&self) -> Result<usize, String> {
        let mut n = 0;
        check(unsafe { (api().KernelContext_GetInputCount)(self.0, &mut n) })?;
        Ok(n)
    }

    pub fn output_count(&self) -> Result<usize, String> {
        let mut n = 0;
        check(unsafe { (api().KernelContext_GetOutputCount)(self.0, &mut n) })?;
        Ok(n)
    }

    /// Input `i`'s value, or None when the node leaves it out.
    fn input_value(&self, i: usize) -> Result<Option<*const OrtValue>, String> {
        if i >= self.input_count()? {
            return Ok(None);
        }
        let mut v: *const OrtValue = ptr::null();
        check(unsafe { (api().KernelContext_GetInput)(self.0, i, &mut v) })?;
        Ok((!v.is_null()).then_some(v))
    }

    /// Input `i`, or None when the node leaves it out.
    pub fn input(&self, i: usize) -> Result<Option<Tensor>, String> {
        let Some(v) = self.input_value(i)? else { return Ok(None) };
        tensor(v).map(Some)
    }

    /// Allocates output `i` with `dims`; None when the node does not ask for this optional output.
    /// `elem` is the element type the kernel writes: where the graph defeats type inference, ORT
    /// allocates the declared type instead, and writing would be silently wrong (an error here).
    pub fn output(&self, i: usize, dims: &[usize], elem: i32) -> Result<Option<*mut c_void>, String> {
        if i >= self.output_count()? {
            return Ok(None);
        }
        let raw: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        let mut v = ptr::null_mut();
        check(unsafe { (api().KernelContext_GetOutput)(self.0, i, raw.as_ptr(), raw.len(), &mut v) })?;
        if v.is_null() {
            return Ok(None);
        }
        let out = tensor(v)?;
        if out.elem != elem {
            return Err(format!(
                "output {i} was allocated as {} but the op computes {} from its inputs: the model gives this value another type (an attribute without a value, or a declared type, can make ONNX Runtime's type inference fall back)",
                crate::spec::onnx_type_name(out.elem),
                crate::spec::onnx_type_name(elem)
            ));
        }
        Ok(Some(out.data.cast_mut()))
    }
}

// ---------------------------------------------------------------------------------------------
// Execution providers with device memory (CUDA)
// ---------------------------------------------------------------------------------------------

impl KernelContext {
    /// The execution provider's compute stream (a `cudaStream_t` / `CUstream` on the CUDA EP).
    pub fn gpu_stream(&self) -> Result<*mut c_void, String> {
        let mut s = ptr::null_mut();
        check(unsafe { (api().KernelContext_GetGPUComputeStream)(self.0, &mut s) })?;
        Ok(s)
    }

    /// The device id of input `i`'s memory (ORT's OrtMemoryInfo id), or None when absent.
    pub fn input_device_id(&self, i: usize) -> Result<Option<i32>, String> {
        let Some(v) = self.input_value(i)? else { return Ok(None) };
        let mut info = ptr::null();
        check(unsafe { (api().GetTensorMemoryInfo)(v, &mut info) })?;
        let mut id = 0;
        check(unsafe { (api().MemoryInfoGetId)(info, &mut id) })?;
        Ok(Some(id))
    }

    /// ORT's allocator for the memory named `name` ("Cuda") on device `id`: the session's arena
    /// for that device, so scratch comes from ORT and not from a cudaMalloc per call.
    pub fn allocator(&self, name: &CStr, id: i32) -> Result<Allocator, String> {
        let mut info = ptr::null_mut();
        check(unsafe {
            (api().CreateMemoryInfo)(name.as_ptr(), ort_sys::OrtAllocatorType::OrtArenaAllocator, id, ort_sys::OrtMemType::OrtMemTypeDefault, &mut info)
        })?;
        let mut alloc = ptr::null_mut();
        let r = check(unsafe { (api().KernelContext_GetAllocator)(self.0, info, &mut alloc) });
        unsafe { (api().ReleaseMemoryInfo)(info) };
        r?;
        if alloc.is_null() {
            return Err(format!("ONNX Runtime has no allocator for {} device {id}", name.to_string_lossy()));
        }
        Ok(Allocator(alloc))
    }
}

/// An allocator handed out by ORT for one compute call; released on drop.
pub struct Allocator(*mut ort_sys::OrtAllocator);

impl Allocator {
    /// `bytes` of the allocator's memory, freed when the returned block (which keeps the
    /// allocator) drops.
    pub fn alloc(self, bytes: usize) -> Result<Block, String> {
        // SAFETY: a live allocator from KernelContext_GetAllocator; Alloc is a required entry.
        let f = unsafe { (*self.0).Alloc }.ok_or("ONNX Runtime's allocator has no Alloc")?;
        let p = unsafe { f(self.0, bytes.max(1)) };
        if p.is_null() {
            return Err(format!("ONNX Runtime's allocator could not provide {bytes} bytes of scratch"));
        }
        Ok(Block { alloc: self, ptr: p })
    }
}

impl Drop for Allocator {
    fn drop(&mut self) {
        // SAFETY: made by KernelContext_GetAllocator, released once.
        unsafe { (api().ReleaseAllocator)(self.0) };
    }
}

/// A block of an [`Allocator`], freed on drop (before the allocator is released).
pub struct Block {
    alloc: Allocator,
    pub ptr: *mut c_void,
}

impl Drop for Block {
    fn drop(&mut self) {
        // SAFETY: allocated by this allocator, freed once.
        if let Some(f) = unsafe { (*self.alloc.0).Free } {
            unsafe { f(self.alloc.0, self.ptr) };
        }
    }
}
