// Registration of the extension's ops (TORCH_LIBRARY namespace `nested_learning_C`) and the
// pybind11 module `nested_learning._C`. Kernels live in csrc/cpu/ and csrc/cuda/, one file per op.
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <sstream>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/dgd.h"

#ifdef NL_WITH_CUDA
#include "cuda/runtime_info.h"
#endif

namespace nested_learning {

// How this binary was built, as "key=value" pairs separated by ';'. Python parses it into
// nested_learning.build_info(); bench/run.py records it beside every measurement.
std::string build_info() {
  std::ostringstream s;
  s << "torch=" << TORCH_VERSION_MAJOR << "." << TORCH_VERSION_MINOR << "." << TORCH_VERSION_PATCH;
#ifdef _OPENMP
  s << ";openmp=" << _OPENMP << ";omp_max_threads=" << omp_get_max_threads();
#else
  s << ";openmp=none";
#endif
#ifdef NL_WITH_CUDA
  s << ";cuda=1;cuda_runtime=" << nl_cuda_runtime_version() << ";cuda_devices=" << nl_cuda_device_count();
#else
  s << ";cuda=0";
#endif
#if defined(__clang__)
  s << ";compiler=clang-" << __clang_major__ << "." << __clang_minor__;
#elif defined(__GNUC__)
  s << ";compiler=gcc-" << __GNUC__ << "." << __GNUC_MINOR__;
#endif
  return s.str();
}

}  // namespace nested_learning

TORCH_LIBRARY(nested_learning_C, m) {
  m.def("build_info() -> str", &nested_learning::build_info);
  m.def("dgd_fwd(Tensor q, Tensor k, Tensor w, Tensor alpha, Tensor eta, Tensor a, Tensor? h0, bool read_after, "
        "int chunk) -> (Tensor, Tensor, Tensor)");
  m.def("dgd_bwd(Tensor dout, Tensor dstate, Tensor q, Tensor k, Tensor w, Tensor alpha, Tensor eta, Tensor a, "
        "Tensor checkpoints, bool read_after, int chunk) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(nested_learning_C, CPU, m) {
  m.impl("dgd_fwd", &nested_learning::dgd_fwd_cpu);
  m.impl("dgd_bwd", &nested_learning::dgd_bwd_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nested_learning C++/CUDA extension; ops are under torch.ops.nested_learning_C";
  m.def("build_info", &nested_learning::build_info, "How this extension was built");
}
