// The two CUDA runtime types TensorRT's public headers name. The plugin calls no CUDA runtime
// function (launches go through the crate's driver-API code in Rust), so it builds without a
// CUDA toolkit; the types match the runtime's own declarations (opaque struct pointers).
#pragma once
typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;
