// The self-modifying projection recurrence (MATH section 6; nested_learning/ops/selfmod.py) on
// the CPU: per (batch, head) sequence, chunk by chunk, every token read by the chunk-start
// projection memory P and, for a complete chunk, P advanced by the chunk's DGD writes with the
// self-generated targets, token by token. Parallel over (batch, head). The loops are in
// selfmod_kernels.inc. The backward here is the stop-gradient writes' one: from every chunk's
// start P (the forward's checkpoints), dx_c = dy_c P_c and dP_in = sum_c dy_c^T x_c.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "isa.h"
#include "selfmod.h"

namespace nested_learning {
namespace {

struct SelfmodLayout {
  int64_t B, T, H, d, R, C, N;
};

#define NL_VEC_LANES 4  // one SSE2 / NEON register of floats
namespace generic {
#include "selfmod_kernels.inc"
}  // namespace generic
#undef NL_VEC_LANES

#ifdef NL_HAVE_AVX2_TARGET
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define NL_VEC_LANES 8  // one ymm register of floats
namespace avx2 {
#include "selfmod_kernels.inc"
}  // namespace avx2
#undef NL_VEC_LANES
#pragma GCC pop_options
#endif

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> selfmod_fwd_cpu(const at::Tensor& x_, const at::Tensor& P_,
                                                               const at::Tensor& gate_bias_, const at::Tensor& valid_,
                                                               int64_t chunk, double eta_max, bool residual,
                                                               bool keep_checkpoints) {
  TORCH_CHECK(chunk > 0, "selfmod_projection (cpu backend): chunk must be positive");
  for (const auto* t : {&x_, &P_, &gate_bias_, &valid_})
    TORCH_CHECK(t->device().is_cpu(), "selfmod_projection (cpu backend): inputs must be CPU tensors");
  auto x = x_.contiguous(), P = P_.contiguous(), gb = gate_bias_.contiguous(), valid = valid_.contiguous();
  TORCH_CHECK(P.scalar_type() == x.scalar_type() && gb.scalar_type() == x.scalar_type(),
              "selfmod_projection (cpu backend): x, P and gate_bias must share one dtype");
  TORCH_CHECK(valid.scalar_type() == at::kBool, "selfmod_projection (cpu backend): valid must be bool");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), d = x.size(3), R = P.size(2);
  TORCH_CHECK(d <= 256, "selfmod_projection (cpu backend): head width up to 256, got ", d);
  TORCH_CHECK(R == 3 * d + 2 && P.size(3) == d, "selfmod_projection (cpu backend): P must be [B, H, 3d+2, d]");
  const int64_t N = (T + chunk - 1) / chunk;
  const SelfmodLayout L{B, T, H, d, R, chunk, N};
  auto y = at::empty({B, T, H, R}, x.options());
  auto Pout = at::empty({B, H, R, d}, x.options());
  at::Tensor ckpt = keep_checkpoints ? at::empty({B, N, H, R, d}, x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "selfmod_fwd_cpu", [&] {
    using F = scalar_t;
    auto run = [&](auto impl) {
      impl(x.data_ptr<F>(), P.data_ptr<F>(), gb.data_ptr<F>(), valid.data_ptr<bool>(), L, static_cast<F>(eta_max),
           residual, y.data_ptr<F>(), Pout.data_ptr<F>(), keep_checkpoints ? ckpt.data_ptr<F>() : nullptr);
    };
#ifdef NL_HAVE_AVX2_TARGET
    if (cpu_has_avx2_fma()) return run(avx2::selfmod_forward_impl<F>);
#endif
    run(generic::selfmod_forward_impl<F>);
  });
  return {y, Pout, ckpt};
}

std::tuple<at::Tensor, at::Tensor> selfmod_bwd_cpu(const at::Tensor& dy_, const at::Tensor& x_,
                                                   const at::Tensor& ckpt_, int64_t chunk) {
  TORCH_CHECK(chunk > 0, "selfmod_projection (cpu backend): chunk must be positive");
  auto dy = dy_.contiguous(), x = x_.contiguous(), ckpt = ckpt_.contiguous();
  TORCH_CHECK(dy.scalar_type() == x.scalar_type() && ckpt.scalar_type() == x.scalar_type(),
              "selfmod_projection (cpu backend): dy, x and the checkpoints must share one dtype");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), d = x.size(3), R = 3 * d + 2;
  const int64_t N = (T + chunk - 1) / chunk;
  TORCH_CHECK(ckpt.dim() == 5 && ckpt.size(1) == N && ckpt.size(3) == R,
              "selfmod_projection (cpu backend): checkpoints of another shape");
  const SelfmodLayout L{B, T, H, d, R, chunk, N};
  auto dx = at::empty_like(x);
  auto dP = at::empty({B, H, R, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "selfmod_bwd_cpu", [&] {
    using F = scalar_t;
    auto run = [&](auto impl) {
      impl(dy.data_ptr<F>(), x.data_ptr<F>(), ckpt.data_ptr<F>(), L, dx.data_ptr<F>(), dP.data_ptr<F>());
    };
#ifdef NL_HAVE_AVX2_TARGET
    if (cpu_has_avx2_fma()) return run(avx2::selfmod_backward_impl<F>);
#endif
    run(generic::selfmod_backward_impl<F>);
  });
  return {dx, dP};
}

}  // namespace nested_learning
