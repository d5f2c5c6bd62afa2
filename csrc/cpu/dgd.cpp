// DGD rank-1 update (MATH section 2) on the CPU: a sequential O(dv*dk)-per-token recurrence,
// parallel over (batch, head), never forming a [d, d] matrix per token.
//
//   W_t = alpha_t W_{t-1} + (w_t - eta_t W_{t-1} a_t) k_t^T
//   o_t = W_t q_t (read after) or W_{t-1} q_t (read before)
//
// Forward saves W at every chunk start; backward recomputes the states of one chunk from its
// checkpoint and walks the chunk's tokens in reverse.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "isa.h"
#include "dgd.h"

namespace nested_learning {
namespace {

namespace generic {
#include "dgd_kernels.inc"
}  // namespace generic

#ifdef NL_HAVE_AVX2_TARGET
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "dgd_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

void check(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "dgd (cpu backend): ", name, " must be a CPU tensor");
  TORCH_CHECK(x.is_contiguous(), "dgd (cpu backend): ", name, " must be contiguous");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> dgd_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& w, const at::Tensor& alpha,
                                                          const at::Tensor& eta, const at::Tensor& a,
                                                          const std::optional<at::Tensor>& h0, bool read_after,
                                                          int64_t chunk) {
  for (auto& [x, n] : {std::pair{q, "q"}, {k, "k"}, {w, "w"}, {alpha, "alpha"}, {eta, "eta"}, {a, "a"}}) check(x, n);
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), dk = q.size(3), dv = w.size(3);
  const int64_t NC = (T + chunk - 1) / chunk;
  auto o = at::empty({B, T, H, dv}, q.options());
  auto state = at::empty({B, H, dv, dk}, q.options());
  auto ckpt = at::empty({B, H, NC, dv, dk}, q.options());
  const bool has_h0 = h0.has_value() && h0->defined();
  at::Tensor h0c = has_h0 ? h0->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "dgd_fwd_cpu", [&] {
#ifdef NL_HAVE_AVX2_TARGET
    if (cpu_has_avx2_fma())
      return avx2::forward_impl<scalar_t>(q, k, w, alpha, eta, a, h0c, has_h0, read_after, chunk, o, state, ckpt);
#endif
    generic::forward_impl<scalar_t>(q, k, w, alpha, eta, a, h0c, has_h0, read_after, chunk, o, state, ckpt);
  });
  return {o, state, ckpt};
}

std::vector<at::Tensor> dgd_bwd_cpu(const at::Tensor& dout, const at::Tensor& dstate, const at::Tensor& q,
                                    const at::Tensor& k, const at::Tensor& w, const at::Tensor& alpha,
                                    const at::Tensor& eta, const at::Tensor& a, const at::Tensor& ckpt,
                                    bool read_after, int64_t chunk) {
  for (auto& [x, n] : {std::pair{dout, "dout"}, {dstate, "dstate"}, {ckpt, "checkpoints"}}) check(x, n);
  auto dq = at::empty_like(q), dk = at::empty_like(k), dw = at::empty_like(w), da = at::empty_like(a);
  auto dalpha = at::empty_like(alpha), deta = at::empty_like(eta), dh0 = at::empty_like(dstate);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "dgd_bwd_cpu", [&] {
#ifdef NL_HAVE_AVX2_TARGET
    if (cpu_has_avx2_fma())
      return avx2::backward_impl<scalar_t>(dout, dstate, q, k, w, alpha, eta, a, ckpt, read_after, chunk, dq, dk, dw,
                                           dalpha, deta, da, dh0);
#endif
    generic::backward_impl<scalar_t>(dout, dstate, q, k, w, alpha, eta, a, ckpt, read_after, chunk, dq, dk, dw,
                                     dalpha, deta, da, dh0);
  });
  return {dq, dk, dw, dalpha, deta, da, dh0};
}

}  // namespace nested_learning
