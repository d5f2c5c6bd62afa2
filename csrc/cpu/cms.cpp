// CMS chunk updates of one linear layer y = W x (docs/MATH.md section 4) on the CPU: every
// complete chunk of C buffered tokens is applied in place, in order, without leaving C++.
// Each row of W is independent of the others (all three inner optimizers act row by row), so
// the work is parallel over (batch, row blocks) and each row stays in L1 across its chunks:
//
//   g    = sum_t delta_t[i] x_t                                 (row i of G = Delta^T X)
//   gd:       W[i] -= lr g
//   momentum: m[i] = beta m[i] - lr g;  W[i] += m[i]
//   dgd:      W[i] = alpha W[i] - lr sum_t ((W[i] . x_t) + delta_t[i]) x_t
//
// The squared Frobenius norm of each update is accumulated per (row block, chunk) and summed.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cms.h"

namespace nested_learning {
namespace {

constexpr int64_t kRowBlock = 16;

template <typename T>
void apply_rows(T* W, T* mom, const T* X, const T* Dl, int64_t i0, int64_t i1, int64_t n, int64_t C, int64_t Din,
                int64_t Dout, T lr, int opt, T beta, T alpha, double* sq /* [n] */) {
  std::vector<T> g(Din), u(C);
  for (int64_t c = 0; c < n; ++c) {
    const T* Xc = X + c * C * Din;
    const T* Dc = Dl + c * C * Dout;
    double acc = 0;
    for (int64_t i = i0; i < i1; ++i) {
      T* Wi = W + i * Din;
      std::fill(g.begin(), g.end(), T(0));
      if (opt == 2) {  // dgd: coefficients (W[i] . x_t) + delta_t[i], at the chunk-start row
        for (int64_t t = 0; t < C; ++t) {
          const T* xt = Xc + t * Din;
          T s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t j = 0; j < Din; ++j) s += Wi[j] * xt[j];
          u[t] = s + Dc[t * Dout + i];
        }
      } else {
        for (int64_t t = 0; t < C; ++t) u[t] = Dc[t * Dout + i];
      }
      for (int64_t t = 0; t < C; ++t) {
        const T* xt = Xc + t * Din;
        const T ut = u[t];
        T* gp = g.data();
#pragma omp simd
        for (int64_t j = 0; j < Din; ++j) gp[j] += ut * xt[j];
      }
      T sq_row = 0;
      const T* gp = g.data();
      if (opt == 0) {
#pragma omp simd reduction(+ : sq_row)
        for (int64_t j = 0; j < Din; ++j) {
          const T d = -lr * gp[j];
          Wi[j] += d;
          sq_row += d * d;
        }
      } else if (opt == 1) {
        T* mi = mom + i * Din;
#pragma omp simd reduction(+ : sq_row)
        for (int64_t j = 0; j < Din; ++j) {
          mi[j] = beta * mi[j] - lr * gp[j];
          Wi[j] += mi[j];
          sq_row += mi[j] * mi[j];
        }
      } else {
#pragma omp simd reduction(+ : sq_row)
        for (int64_t j = 0; j < Din; ++j) {
          const T d = (alpha - T(1)) * Wi[j] - lr * gp[j];
          Wi[j] += d;
          sq_row += d * d;
        }
      }
      acc += sq_row;
    }
    sq[c] += acc;
  }
}

}  // namespace

at::Tensor cms_apply_cpu(at::Tensor& weight, const std::optional<at::Tensor>& momentum, const at::Tensor& x,
                         const at::Tensor& delta, int64_t period, double lr, int64_t optimizer, double beta,
                         double alpha) {
  TORCH_CHECK(weight.device().is_cpu() && weight.is_contiguous() && weight.dim() == 3,
              "cms_apply: weight must be a contiguous CPU tensor [B, Dout, Din]");
  TORCH_CHECK(x.is_contiguous() && delta.is_contiguous(), "cms_apply: x and delta must be contiguous");
  TORCH_CHECK(optimizer >= 0 && optimizer <= 2, "cms_apply: optimizer must be 0 (gd), 1 (momentum) or 2 (dgd)");
  TORCH_CHECK(period > 0, "cms_apply: period must be positive");
  const int64_t B = weight.size(0), Dout = weight.size(1), Din = weight.size(2), N = x.size(1);
  TORCH_CHECK(x.size(0) == B && x.size(2) == Din && delta.size(0) == B && delta.size(1) == N && delta.size(2) == Dout,
              "cms_apply: x [B, N, Din] and delta [B, N, Dout] must match weight [B, Dout, Din]");
  TORCH_CHECK(N % period == 0, "cms_apply: the token count must be a whole number of chunks");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && delta.scalar_type() == weight.scalar_type(),
              "cms_apply: weight, x and delta must share one dtype");
  const bool has_m = momentum.has_value() && momentum->defined();
  TORCH_CHECK(optimizer != 1 || has_m, "cms_apply: the momentum optimizer needs a momentum tensor");
  if (has_m)
    TORCH_CHECK(momentum->is_contiguous() && momentum->sizes() == weight.sizes() &&
                    momentum->scalar_type() == weight.scalar_type(),
                "cms_apply: momentum must be contiguous and shaped and typed like weight");
  const int64_t n = N / period;
  const int64_t R = (Dout + kRowBlock - 1) / kRowBlock;
  auto partial = at::zeros({B, R, n}, weight.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "cms_apply_cpu", [&] {
    scalar_t* Wp = weight.data_ptr<scalar_t>();
    scalar_t* Mp = has_m ? momentum->data_ptr<scalar_t>() : nullptr;
    const scalar_t* Xp = x.data_ptr<scalar_t>();
    const scalar_t* Dp = delta.data_ptr<scalar_t>();
    double* Pp = partial.data_ptr<double>();
    at::parallel_for(0, B * R, 1, [&](int64_t begin, int64_t end) {
      for (int64_t br = begin; br < end; ++br) {
        const int64_t b = br / R, r = br % R;
        const int64_t i0 = r * kRowBlock, i1 = std::min(Dout, i0 + kRowBlock);
        apply_rows<scalar_t>(Wp + b * Dout * Din, Mp ? Mp + b * Dout * Din : nullptr, Xp + b * N * Din,
                             Dp + b * N * Dout, i0, i1, n, period, Din, Dout, static_cast<scalar_t>(lr),
                             static_cast<int>(optimizer), static_cast<scalar_t>(beta), static_cast<scalar_t>(alpha),
                             Pp + (b * R + r) * n);
      }
    });
  });
  return partial.sum(1).sqrt().to(weight.scalar_type());
}

}  // namespace nested_learning
