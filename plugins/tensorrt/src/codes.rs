//! TensorRT's numeric codes as they cross the bridge (`DataType`, `PluginFieldType`), and their
//! translation to the contract's types: the C++ side passes the enums' values unchanged.

use scattermoe::spec::ElemType;

/// TensorRT `DataType` codes (NvInferRuntimeBase.h).
pub mod data_type {
    pub const FLOAT: i32 = 0;
    pub const HALF: i32 = 1;
    pub const INT8: i32 = 2;
    pub const INT32: i32 = 3;
    pub const BOOL: i32 = 4;
    pub const UINT8: i32 = 5;
    pub const FP8: i32 = 6;
    pub const BF16: i32 = 7;
    pub const INT64: i32 = 8;
}

/// TensorRT `PluginFieldType` codes (NvInferPluginBase.h).
pub mod field_type {
    pub const FLOAT16: i32 = 0;
    pub const FLOAT32: i32 = 1;
    pub const FLOAT64: i32 = 2;
    pub const INT8: i32 = 3;
    pub const INT16: i32 = 4;
    pub const INT32: i32 = 5;
    pub const CHAR: i32 = 6;
    pub const BF16: i32 = 9;
    pub const INT64: i32 = 10;
}

/// The ONNX element type code of a TensorRT data type (for the contract's checks and messages).
pub fn onnx_code(trt: i32) -> i32 {
    match trt {
        data_type::FLOAT => 1,
        data_type::HALF => 10,
        data_type::INT8 => 3,
        data_type::INT32 => 6,
        data_type::BOOL => 9,
        data_type::UINT8 => 2,
        data_type::BF16 => 16,
        data_type::INT64 => 7,
        data_type::FP8 => 17, // FLOAT8E4M3FN: TensorRT's kFP8 is e4m3
        _ => 0,               // INT4 and newer: ONNX's UNDEFINED, "an unsupported type"
    }
}

/// The TensorRT data type of `T`.
pub fn trt_elem(t: ElemType) -> i32 {
    match t {
        ElemType::F32 => data_type::FLOAT,
        ElemType::F16 => data_type::HALF,
        ElemType::BF16 => data_type::BF16,
    }
}

/// Bytes of one element of a `PluginFieldType` (0 for types the plugins never read).
pub fn field_type_size(t: i32) -> usize {
    match t {
        field_type::CHAR | field_type::INT8 => 1,
        field_type::FLOAT16 | field_type::BF16 | field_type::INT16 => 2,
        field_type::FLOAT32 | field_type::INT32 => 4,
        field_type::FLOAT64 | field_type::INT64 => 8,
        _ => 0,
    }
}

/// The name of a `PluginFieldType` (for messages).
pub(crate) fn field_type_name(t: i32) -> &'static str {
    match t {
        field_type::FLOAT16 => "kFLOAT16",
        field_type::FLOAT32 => "kFLOAT32",
        field_type::FLOAT64 => "kFLOAT64",
        field_type::INT8 => "kINT8",
        field_type::INT16 => "kINT16",
        field_type::INT32 => "kINT32",
        field_type::CHAR => "kCHAR",
        7 => "kDIMS",
        field_type::BF16 => "kBF16",
        field_type::INT64 => "kINT64",
        _ => "an unsupported field type",
    }
}
