// The CUDA driver, loaded with dlopen at run time (no toolkit at build time, no driver needed to
// run every step but enqueue), and device buffers over it.

#pragma once

#include <dlfcn.h>

#include <cstddef>
#include <cstdio>
#include <string>

typedef int CUresult;
typedef int CUdevice;
typedef struct CUctx_st* CUcontext;
typedef unsigned long long CUdeviceptr;
typedef struct CUstream_st* CUstream;

struct Cuda {
  bool ok = false;
  std::string why;
  CUresult (*cuInit)(unsigned);
  CUresult (*cuDeviceGet)(CUdevice*, int);
  CUresult (*cuDeviceGetName)(char*, int, CUdevice);
  CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice);
  CUresult (*cuCtxSetCurrent)(CUcontext);
  CUresult (*cuStreamCreate)(CUstream*, unsigned);
  CUresult (*cuStreamSynchronize)(CUstream);
  CUresult (*cuMemAlloc)(CUdeviceptr*, size_t);
  CUresult (*cuMemFree)(CUdeviceptr);
  CUresult (*cuMemcpyHtoD)(CUdeviceptr, void const*, size_t);
  CUresult (*cuMemcpyDtoH)(void*, CUdeviceptr, size_t);
  CUresult (*cuMemsetD8)(CUdeviceptr, unsigned char, size_t);
  CUstream stream = nullptr;

  template <typename F>
  bool sym(void* lib, F& f, char const* name) {
    f = reinterpret_cast<F>(dlsym(lib, name));
    if (f == nullptr) why = std::string("libcuda lacks ") + name;
    return f != nullptr;
  }

  void init() {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (lib == nullptr) {
      why = "no CUDA driver (libcuda.so.1 could not be loaded)";
      return;
    }
    if (!(sym(lib, cuInit, "cuInit") && sym(lib, cuDeviceGet, "cuDeviceGet") && sym(lib, cuDeviceGetName, "cuDeviceGetName") &&
          sym(lib, cuDeviceGetAttribute, "cuDeviceGetAttribute") &&
          sym(lib, cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain") && sym(lib, cuCtxSetCurrent, "cuCtxSetCurrent") &&
          sym(lib, cuStreamCreate, "cuStreamCreate") && sym(lib, cuStreamSynchronize, "cuStreamSynchronize") &&
          sym(lib, cuMemAlloc, "cuMemAlloc_v2") && sym(lib, cuMemFree, "cuMemFree_v2") &&
          sym(lib, cuMemcpyHtoD, "cuMemcpyHtoD_v2") && sym(lib, cuMemcpyDtoH, "cuMemcpyDtoH_v2") &&
          sym(lib, cuMemsetD8, "cuMemsetD8_v2")))
      return;
    CUdevice dev;
    CUcontext ctx;
    if (cuInit(0) != 0 || cuDeviceGet(&dev, 0) != 0) {
      why = "no CUDA device (cuInit/cuDeviceGet failed)";
      return;
    }
    if (cuDevicePrimaryCtxRetain(&ctx, dev) != 0 || cuCtxSetCurrent(ctx) != 0 || cuStreamCreate(&stream, 1) != 0) {
      why = "could not make a context and stream";
      return;
    }
    char name[256] = {0};
    int major = 0, minor = 0;
    cuDeviceGetName(name, sizeof(name), dev);
    cuDeviceGetAttribute(&major, 75, dev);
    cuDeviceGetAttribute(&minor, 76, dev);
    std::printf("device: %s (compute capability %d.%d); enqueue on a stream of its primary context\n", name, major, minor);
    ok = true;
  }
};

struct DeviceBuffer {
  Cuda* cuda = nullptr;
  CUdeviceptr p = 0;
  DeviceBuffer(Cuda* c, size_t bytes) : cuda(c) {
    if (cuda->cuMemAlloc(&p, bytes > 0 ? bytes : 1) != 0) p = 0;
  }
  ~DeviceBuffer() {
    if (p != 0) cuda->cuMemFree(p);
  }
  DeviceBuffer(DeviceBuffer const&) = delete;
  DeviceBuffer& operator=(DeviceBuffer const&) = delete;
};
