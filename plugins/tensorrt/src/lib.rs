//! `libscattermoe_trt.so`: the ScatterMoE ops as TensorRT plugins (IPluginV3).
//!
//! TensorRT loads a plugin library (`IPluginRegistry::loadLibrary`, `trtexec --dynamicPlugins`,
//! the Python package's `get_plugin_registry().load_library`) and calls its two exports:
//! `setLoggerFinder` (TensorRT-RTX refuses a library without it) and `getCreators`, which lists
//! the creators of `ScatterMoE`, `ParallelLinear` and `CapacityMask` (version "1", namespace
//! "ai.scattermoe"). The creators and plugins are C++ classes (cpp/tensorrt/scattermoe_trt.cpp)
//! that implement TensorRT's interfaces and only translate: every decision is a Rust function
//! behind the `#[cxx::bridge]` in [`bridge`], over the `scattermoe` crate's contract
//! (`scattermoe::spec`) and device ops (`scattermoe::cuda::ops`).
//!
//! - [`fields`]: the creator lists one plugin field per attribute of the contract (`ATTRS`), and a
//!   plugin is created from fields as TensorRT's ONNX parser passes them (ints as `kINT32`, floats
//!   as `kFLOAT32`, strings as `kCHAR` with their terminating NUL; wider and narrower integer and
//!   float types are accepted too), parsed and validated by the contract's `Attrs::parse`.
//!   [`Plugin::fields_to_serialize`] writes every attribute back in the parser's types, so an
//!   engine re-creates the same plugin.
//! - [`plugin`]: types and formats (`T` f32, f16, bf16 and `I` int32, int64 as the contract
//!   allows, linear format only; outputs take `T`, `CapacityMask`'s bool), output shapes as the
//!   contract's rules over references to input dimensions ([`DimRef`], turned into IExprBuilder
//!   expressions by the C++ side), the contract's checks at build time (known dimensions) and
//!   before each run (all), and the device ops' workspace at the profile's largest shapes.
//! - `plugin::enqueue`: the device ops on TensorRT's stream, with its workspace.
//! - [`codes`]: TensorRT's `DataType` and `PluginFieldType` codes.
//!
//! The exports are defined here because a cdylib exports only its Rust symbols. Built without
//! TensorRT's headers (see build.rs) the library exports nothing; the Rust side is built and
//! tested all the same. The crate is also an rlib, for its tests.

#![allow(non_snake_case)]

pub mod bridge;
pub mod codes;
pub mod fields;
pub mod plugin;

pub use bridge::{DimRef, Field, Op, OutputShape, Range, TensorDesc};
pub use codes::{data_type, field_type, field_type_size, onnx_code, trt_elem};
pub use fields::{field_names, parser_fields, plugin_name, plugin_namespace, plugin_version, Value};
pub use plugin::{create_plugin, Attrs, Plugin};

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

#[cfg(test)]
mod tests;
