#pragma once
#include <torch/extension.h>

#include <optional>
#include <vector>

namespace nested_learning {
// Titans linear memory, chunk loop in C++ (csrc/cpu/titan.cpp). q, k [B, T, H, dk], v [B, T, H, dv],
// theta [B, T, H]; abar, rho, ebar [B, H, N]; c_par, c_mom [B, H, T]; states [B, H, dv, dk].
// Forward returns {o, M, S[, M checkpoints, S checkpoints [N + 1, B*H, dv, dk]]}.
std::vector<at::Tensor> titan_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& theta, const at::Tensor& abar, const at::Tensor& rho,
                                      const at::Tensor& ebar, const at::Tensor& c_par, const at::Tensor& c_mom,
                                      const std::optional<at::Tensor>& M0, const std::optional<at::Tensor>& S0,
                                      int64_t chunk, bool keep_checkpoints);
// Checkpoints [N + 1, B*H, dv, dk] (chunk starts and the final state, from the forward).
// Returns {dq, dk, dv, dtheta, dabar, drho, debar, dc_par, dc_mom, dM0, dS0}.
std::vector<at::Tensor> titan_bwd_cpu(const at::Tensor& dout, const std::optional<at::Tensor>& dMt,
                                      const std::optional<at::Tensor>& dSt, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& theta, const at::Tensor& abar,
                                      const at::Tensor& rho, const at::Tensor& ebar, const at::Tensor& c_par,
                                      const at::Tensor& c_mom, const at::Tensor& Mck, const at::Tensor& Sck,
                                      int64_t chunk);
}  // namespace nested_learning
