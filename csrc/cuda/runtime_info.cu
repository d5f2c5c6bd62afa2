// CUDA runtime facts reported by nested_learning.build_info(). No torch headers: this file
// is syntax-checked with `nvcc -c -arch=sm_90` on machines without a CUDA build of torch.
#include <cuda_runtime.h>

#include "runtime_info.h"

extern "C" int nl_cuda_runtime_version(void) {
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : -1;
}

extern "C" int nl_cuda_device_count(void) {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : -1;
}
