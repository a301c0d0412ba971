//! `libscattermoe_trt.so`: the ScatterMoE ops as TensorRT plugins (IPluginV3).
//!
//! TensorRT loads a plugin library (`IPluginRegistry::loadLibrary`, `trtexec --dynamicPlugins`,
//! the Python package's `get_plugin_registry().load_library`) and calls its two exports:
//! `setLoggerFinder` (TensorRT-RTX refuses a library without it) and `getCreators`, which lists
//! the creators of `ScatterMoE`, `ParallelLinear` and `CapacityMask` (version "1", namespace
//! "ai.scattermoe"). The creators and plugins are C++ classes (cpp/scattermoe_trt.cpp) over the
//! bridge in `scattermoe::trt`; the exports are defined here because a cdylib exports only its
//! Rust symbols.
//!
//! Built without TensorRT's headers (see build.rs) the library is empty.

#![allow(non_snake_case)]

#[cfg(scattermoe_trt_cpp)]
mod exports {
    use std::ffi::c_void;

    extern "C" {
        fn scattermoe_trt_get_creators(nb_creators: *mut i32) -> *const *mut c_void;
        fn scattermoe_trt_set_logger_finder(finder: *mut c_void);
    }

    /// `extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)`.
    ///
    /// # Safety
    /// `nb_creators` must point to an int32 (TensorRT passes a reference).
    #[no_mangle]
    pub unsafe extern "C" fn getCreators(nb_creators: *mut i32) -> *const *mut c_void {
        scattermoe_trt_get_creators(nb_creators)
    }

    /// `extern "C" void setLoggerFinder(ILoggerFinder* finder)`: errors of the plugins go to the
    /// logger it finds.
    ///
    /// # Safety
    /// `finder` must be null or a TensorRT `ILoggerFinder` that outlives the library's use.
    #[no_mangle]
    pub unsafe extern "C" fn setLoggerFinder(finder: *mut c_void) {
        scattermoe_trt_set_logger_finder(finder)
    }
}

// The bridge's Rust functions live in the scattermoe crate; the C++ side calls them.
pub use scattermoe::trt as bridge;
