#pragma once
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

namespace nested_learning {
// All tensors contiguous, on the CPU, in one floating dtype (float or double).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dgd_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& w, const at::Tensor& alpha,
                                                          const at::Tensor& eta, const at::Tensor& a,
                                                          const std::optional<at::Tensor>& h0, bool read_after,
                                                          int64_t chunk);
std::vector<at::Tensor> dgd_bwd_cpu(const at::Tensor& dout, const at::Tensor& dstate, const at::Tensor& q,
                                    const at::Tensor& k, const at::Tensor& w, const at::Tensor& alpha,
                                    const at::Tensor& eta, const at::Tensor& a, const at::Tensor& ckpt,
                                    bool read_after, int64_t chunk);
}  // namespace nested_learning
