#pragma once
#include <torch/extension.h>

#include <optional>

namespace nested_learning {
// Applies every complete chunk (period tokens) of x [B, N, Din] / delta [B, N, Dout] to weight
// [B, Dout, Din] (and momentum) in place, in order; returns the update norms [B, N / period].
// optimizer: 0 gd, 1 momentum, 2 dgd. All tensors contiguous CPU, one floating dtype.
at::Tensor cms_apply_cpu(at::Tensor& weight, const std::optional<at::Tensor>& momentum, const at::Tensor& x,
                         const at::Tensor& delta, int64_t period, double lr, int64_t optimizer, double beta,
                         double alpha);
}  // namespace nested_learning
