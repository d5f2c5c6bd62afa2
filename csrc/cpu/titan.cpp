// Titans linear memory with momentum and forgetting (docs/MATH.md section 3) on the CPU, chunk
// by chunk with all of a chunk's gradients at its chunk-start M, parallel over (batch, head):
//
//   o = Q M^T;  E = 2 (K M^T - V);  LT = theta o E
//   M' = abar M + rho S - (c_par o LT)^T K;  S' = ebar S - (c_mom o LT)^T K
//
// The loops are in titan_kernels.inc (one sequence-head per task, its state in cache, every
// loop vectorised); the scan coefficients (abar, rho, ebar per chunk; c_par, c_mom per token)
// are inputs (nested_learning/ops/_titan_scan.py) and the backward returns their gradients.
// Forward saves the state at every chunk start; backward walks the chunks in reverse from them.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "titan.h"

namespace nested_learning {
namespace {

struct Layout {  // see titan_kernels.inc
  int64_t T, H, dk, dv, C, N;
  int64_t tok(int64_t b, int64_t t, int64_t h) const { return (b * T + t) * H + h; }
};

#define NL_VEC_LANES 4  // one SSE2 / NEON register of floats
namespace generic {
#include "titan_kernels.inc"
}  // namespace generic
#undef NL_VEC_LANES

#ifdef NL_HAVE_AVX2_TARGET
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define NL_VEC_LANES 8  // one ymm register of floats
namespace avx2 {
#include "titan_kernels.inc"
}  // namespace avx2
#undef NL_VEC_LANES
#pragma GCC pop_options
#endif

at::Tensor contig(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "titan (cpu backend): ", name, " must be a CPU tensor");
  return x.contiguous();
}

template <typename F>
const F* ptr_or_null(const std::optional<at::Tensor>& x) {
  return x.has_value() && x->defined() ? x->data_ptr<F>() : nullptr;
}

}  // namespace

std::vector<at::Tensor> titan_fwd_cpu(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                      const at::Tensor& theta_, const at::Tensor& abar_, const at::Tensor& rho_,
                                      const at::Tensor& ebar_, const at::Tensor& c_par_, const at::Tensor& c_mom_,
                                      const std::optional<at::Tensor>& M0_, const std::optional<at::Tensor>& S0_,
                                      int64_t chunk, bool keep_checkpoints) {
  TORCH_CHECK(chunk > 0, "titan (cpu backend): chunk must be positive");
  auto q = contig(q_, "q"), k = contig(k_, "k"), v = contig(v_, "v"), theta = contig(theta_, "theta");
  auto abar = contig(abar_, "abar"), rho = contig(rho_, "rho"), ebar = contig(ebar_, "ebar");
  auto c_par = contig(c_par_, "c_par"), c_mom = contig(c_mom_, "c_mom");
  std::optional<at::Tensor> M0, S0;
  if (M0_.has_value() && M0_->defined()) {
    M0 = contig(*M0_, "M0");
    S0 = contig(*S0_, "S0");
  }
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), dk = q.size(3), dv = v.size(3), BH = B * H;
  const int64_t N = (T + chunk - 1) / chunk;
  const Layout L{T, H, dk, dv, chunk, N};
  auto o = at::empty({B, T, H, dv}, q.options());
  auto M = at::empty({B, H, dv, dk}, q.options()), S = at::empty_like(M);
  at::Tensor Mck, Sck;
  if (keep_checkpoints) {
    Mck = at::empty({N + 1, BH, dv, dk}, q.options());
    Sck = at::empty_like(Mck);
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "titan_fwd_cpu", [&] {
    using F = scalar_t;
    F* mck = keep_checkpoints ? Mck.data_ptr<F>() : nullptr;
    F* sck = keep_checkpoints ? Sck.data_ptr<F>() : nullptr;
    auto run = [&](auto impl) {
      impl(q.data_ptr<F>(), k.data_ptr<F>(), v.data_ptr<F>(), theta.data_ptr<F>(), abar.data_ptr<F>(),
           rho.data_ptr<F>(), ebar.data_ptr<F>(), c_par.data_ptr<F>(), c_mom.data_ptr<F>(), ptr_or_null<F>(M0),
           ptr_or_null<F>(S0), L, B, o.data_ptr<F>(), M.data_ptr<F>(), S.data_ptr<F>(), mck, sck);
    };
#ifdef NL_HAVE_AVX2_TARGET
    if (cpu_has_avx2_fma()) return run(avx2::forward_impl<F>);
#endif
    run(generic::forward_impl<F>);
  });
  std::vector<at::Tensor> out{o, M, S};
  if (keep_checkpoints) {
    out.push_back(Mck);
    out.push_back(Sck);
  }
  return out;
}

std::vector<at::Tensor> titan_bwd_cpu(const at::Tensor& dout_, const std::optional<at::Tensor>& dMt_,
                                      const std::optional<at::Tensor>& dSt_, const at::Tensor& q_, const at::Tensor& k_,
                                      const at::Tensor& v_, const at::Tensor& theta_, const at::Tensor& abar_,
                                      const at::Tensor& rho_, const at::Tensor& ebar_, const at::Tensor& c_par_,
                                      const at::Tensor& c_mom_, const at::Tensor& Mck_, const at::Tensor& Sck_,
                                      int64_t chunk) {
  auto q = contig(q_, "q"), k = contig(k_, "k"), v = contig(v_, "v"), theta = contig(theta_, "theta");
  auto abar = contig(abar_, "abar"), rho = contig(rho_, "rho"), ebar = contig(ebar_, "ebar");
  auto c_par = contig(c_par_, "c_par"), c_mom = contig(c_mom_, "c_mom"), dout = contig(dout_, "dout");
  auto Mck = contig(Mck_, "checkpoints"), Sck = contig(Sck_, "checkpoints");
  std::optional<at::Tensor> dMt, dSt;
  if (dMt_.has_value() && dMt_->defined()) {
    dMt = contig(*dMt_, "dM");
    dSt = contig(*dSt_, "dS");
  }
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), dk = q.size(3), dv = v.size(3);
  const int64_t N = (T + chunk - 1) / chunk;
  TORCH_CHECK(Mck.size(0) == N + 1 && Sck.size(0) == N + 1, "titan_bwd: checkpoints of another shape");
  const Layout L{T, H, dk, dv, chunk, N};
  auto dq = at::empty_like(q), dkk = at::empty_like(k), dvv = at::empty_like(v), dth = at::empty_like(theta);
  auto dab = at::empty({B, H, N}, q.options()), drh = at::empty_like(dab), deb = at::empty_like(dab);
  auto dcp = at::empty({B, H, T}, q.options()), dcm = at::empty_like(dcp);
  auto dM0 = at::empty({B, H, dv, dk}, q.options()), dS0 = at::empty_like(dM0);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "titan_bwd_cpu", [&] {
    using F = scalar_t;
    auto run = [&](auto impl) {
      impl(dout.data_ptr<F>(), ptr_or_null<F>(dMt), ptr_or_null<F>(dSt), q.data_ptr<F>(), k.data_ptr<F>(),
           v.data_ptr<F>(), theta.data_ptr<F>(), abar.data_ptr<F>(), rho.data_ptr<F>(), ebar.data_ptr<F>(),
           c_par.data_ptr<F>(), c_mom.data_ptr<F>(), Mck.data_ptr<F>(), Sck.data_ptr<F>(), L, B, dq.data_ptr<F>(),
           dkk.data_ptr<F>(), dvv.data_ptr<F>(), dth.data_ptr<F>(), dab.data_ptr<F>(), drh.data_ptr<F>(),
           deb.data_ptr<F>(), dcp.data_ptr<F>(), dcm.data_ptr<F>(), dM0.data_ptr<F>(), dS0.data_ptr<F>());
    };
#ifdef NL_HAVE_AVX2_TARGET
    if (cpu_has_avx2_fma()) return run(avx2::backward_impl<F>);
#endif
    run(generic::backward_impl<F>);
  });
  return {dq, dkk, dvv, dth, dab, drh, deb, dcp, dcm, dM0, dS0};
}

}  // namespace nested_learning
