// Registration of the extension's ops (TORCH_LIBRARY namespace `nested_learning_C`) and the
// pybind11 module `nested_learning._C`. Kernels live in csrc/cpu/ and csrc/cuda/, one file per op.
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <sstream>
#include <string>


#include "cpu/cms.h"
#include "cpu/dgd.h"
#include "cpu/isa.h"
#include "cpu/selfmod.h"
#include "cpu/titan.h"

#ifdef NL_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime_api.h>  // CUDART_VERSION (compile time only)

#include "cuda/dgd_recurrent.h"
#endif

namespace nested_learning {

// How this binary was built, as "key=value" pairs separated by ';'. Compile-time facts (no CUDA
// or OpenMP runtime calls: the CUDA runtime's version is torch.version.cuda's business), and
// which build of the CPU kernels runs here (cpu_kernels=avx2 or generic, see cpu/isa.h).
// Python parses it into nested_learning.build_info(); bench/run.py records it beside every measurement.
std::string build_info() {
  std::ostringstream s;
  s << "torch=" << TORCH_VERSION_MAJOR << "." << TORCH_VERSION_MINOR << "." << TORCH_VERSION_PATCH;
#ifdef _OPENMP
  s << ";openmp=" << _OPENMP;
#else
  s << ";openmp=none";
#endif
#ifdef NL_WITH_CUDA
  s << ";cuda=1;cuda_compiled=" << CUDART_VERSION;
#else
  s << ";cuda=0";
#endif
#if defined(__clang__)
  s << ";compiler=clang-" << __clang_major__ << "." << __clang_minor__;
#elif defined(__GNUC__)
  s << ";compiler=gcc-" << __GNUC__ << "." << __GNUC_MINOR__;
#endif
  s << ";cpu_kernels=" << (cpu_has_avx2_fma() ? "avx2" : "generic");
  return s.str();
}

#ifdef NL_WITH_CUDA
// Fused per-token DGD forward (csrc/cuda/dgd_recurrent.cu) for streaming and generation.
std::tuple<at::Tensor, at::Tensor> dgd_recurrent_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& w, const at::Tensor& a,
                                                          const at::Tensor& alpha, const at::Tensor& eta,
                                                          const std::optional<at::Tensor>& h0, bool read_after) {
  for (const auto& x : {q, k, w, a, alpha, eta}) {
    TORCH_CHECK(x.is_cuda() && x.is_contiguous(), "dgd_recurrent_fwd: inputs must be contiguous CUDA tensors");
    TORCH_CHECK(x.device() == q.device(), "dgd_recurrent_fwd: inputs must be on one device");
  }
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && w.scalar_type() == q.scalar_type() &&
                  a.scalar_type() == q.scalar_type(),
              "dgd_recurrent_fwd: q, k, w, a must share one dtype");
  TORCH_CHECK(alpha.scalar_type() == at::kFloat && eta.scalar_type() == at::kFloat,
              "dgd_recurrent_fwd: alpha and eta must be float32");
  int dtype = -1;
  if (q.scalar_type() == at::kFloat) dtype = NL_F32;
  else if (q.scalar_type() == at::kBFloat16) dtype = NL_BF16;
  else if (q.scalar_type() == at::kHalf) dtype = NL_F16;
  TORCH_CHECK(dtype >= 0, "dgd_recurrent_fwd: dtype must be float32, bfloat16 or float16, got ", q.scalar_type());
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), dk = q.size(3), dv = w.size(3);
  TORCH_CHECK(dk <= 256, "dgd_recurrent_fwd: dk up to 256 is supported, got ", dk);
  const bool has_h0 = h0.has_value() && h0->defined();
  at::Tensor h0c;
  if (has_h0) {
    h0c = h0->contiguous();
    TORCH_CHECK(h0c.scalar_type() == at::kFloat && h0c.is_cuda(), "dgd_recurrent_fwd: h0 must be float32 CUDA");
  }
  c10::cuda::CUDAGuard guard(q.device());
  auto o = at::empty({B, T, H, dv}, q.options());
  auto state = at::empty({B, H, dv, dk}, q.options().dtype(at::kFloat));
  NlDgdRecurrentArgs p{dtype,
                       q.data_ptr(),
                       k.data_ptr(),
                       w.data_ptr(),
                       a.data_ptr(),
                       alpha.data_ptr<float>(),
                       eta.data_ptr<float>(),
                       has_h0 ? h0c.data_ptr<float>() : nullptr,
                       o.data_ptr(),
                       state.data_ptr<float>(),
                       static_cast<int>(B),
                       static_cast<int>(T),
                       static_cast<int>(H),
                       static_cast<int>(dk),
                       static_cast<int>(dv),
                       read_after ? 1 : 0,
                       c10::cuda::getCurrentCUDAStream().stream()};
  const int err = nl_dgd_recurrent_fwd(&p);
  TORCH_CHECK(err == 0, "dgd_recurrent_fwd: CUDA error ", err, " (", cudaGetErrorString(static_cast<cudaError_t>(err)),
              ")");
  return {o, state};
}
#endif

}  // namespace nested_learning

TORCH_LIBRARY(nested_learning_C, m) {
  m.def("build_info() -> str", &nested_learning::build_info);
  m.def("dgd_fwd(Tensor q, Tensor k, Tensor w, Tensor alpha, Tensor eta, Tensor a, Tensor? h0, bool read_after, "
        "int chunk, bool keep_residuals) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dgd_checkpoints(Tensor q, Tensor k, Tensor w, Tensor alpha, Tensor eta, Tensor a, Tensor? h0, int chunk) "
        "-> (Tensor, Tensor)");
  m.def("dgd_bwd(Tensor dout, Tensor dstate, Tensor q, Tensor k, Tensor w, Tensor alpha, Tensor eta, Tensor a, "
        "Tensor checkpoints, Tensor rbuf, bool read_after, int chunk, bool a_is_k) -> Tensor[]");
  m.def("cms_apply(Tensor(a!) weight, Tensor(b!)? momentum, Tensor x, Tensor delta, int period, float lr, "
        "int optimizer, float beta, float alpha) -> Tensor");
  m.def("titan_fwd(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor abar, Tensor rho, Tensor ebar, "
        "Tensor c_par, Tensor c_mom, Tensor? M0, Tensor? S0, int chunk, bool keep_checkpoints) -> Tensor[]");
  m.def("titan_bwd(Tensor dout, Tensor? dMt, Tensor? dSt, Tensor q, Tensor k, Tensor v, Tensor theta, "
        "Tensor abar, Tensor rho, Tensor ebar, Tensor c_par, Tensor c_mom, Tensor Mck, Tensor Sck, int chunk) "
        "-> Tensor[]");
  m.def("selfmod_fwd(Tensor x, Tensor P, Tensor gate_bias, Tensor valid, int chunk, float eta_max, bool residual, "
        "bool keep_checkpoints) -> (Tensor, Tensor, Tensor)");
  m.def("selfmod_bwd(Tensor dy, Tensor x, Tensor checkpoints, int chunk) -> (Tensor, Tensor)");
  m.def("dgd_recurrent_fwd(Tensor q, Tensor k, Tensor w, Tensor a, Tensor alpha, Tensor eta, Tensor? h0, "
        "bool read_after) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nested_learning_C, CPU, m) {
  m.impl("dgd_fwd", &nested_learning::dgd_fwd_cpu);
  m.impl("dgd_checkpoints", &nested_learning::dgd_checkpoints_cpu);
  m.impl("dgd_bwd", &nested_learning::dgd_bwd_cpu);
  m.impl("cms_apply", &nested_learning::cms_apply_cpu);
  m.impl("titan_fwd", &nested_learning::titan_fwd_cpu);
  m.impl("titan_bwd", &nested_learning::titan_bwd_cpu);
  m.impl("selfmod_fwd", &nested_learning::selfmod_fwd_cpu);
  m.impl("selfmod_bwd", &nested_learning::selfmod_bwd_cpu);
}

#ifdef NL_WITH_CUDA
TORCH_LIBRARY_IMPL(nested_learning_C, CUDA, m) { m.impl("dgd_recurrent_fwd", &nested_learning::dgd_recurrent_fwd_cuda); }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nested_learning C++/CUDA extension; ops are under torch.ops.nested_learning_C";
  // no pybind11 functions: everything goes through the dispatcher (see _extension.build_info)
}
