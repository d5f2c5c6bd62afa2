#pragma once
#include <torch/extension.h>

#include <tuple>

namespace nested_learning {
// The self-modifying projection recurrence (nested_learning/ops/selfmod.py, MATH 6): x [B, L, H, d],
// P [B, H, R, d] (R = 3d + 2), gate_bias [H, 2] in one floating dtype (float or double), valid
// [B, L] bool; chunk: tokens per projection chunk. Returns the reads y [B, L, H, R], the final P
// and, when keep_checkpoints, every chunk's start P [B, N, H, R, d] (else an empty tensor).
std::tuple<at::Tensor, at::Tensor, at::Tensor> selfmod_fwd_cpu(const at::Tensor& x, const at::Tensor& P,
                                                               const at::Tensor& gate_bias, const at::Tensor& valid,
                                                               int64_t chunk, double eta_max, bool residual,
                                                               bool keep_checkpoints);
// The backward with stop-gradient writes, from the checkpoints: dy [B, L, H, R] -> (dx [B, L, H, d],
// dP_in [B, H, R, d] without the final state's gradient, which the caller adds).
std::tuple<at::Tensor, at::Tensor> selfmod_bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& ckpt,
                                                   int64_t chunk);
}  // namespace nested_learning
