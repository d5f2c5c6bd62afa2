#pragma once
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

namespace nested_learning {
// All tensors contiguous, on the CPU, in one floating dtype (float or double); chunk: tokens per
// chunk of the chunk-parallel form.
// Forward: (o, final state, checkpoints, R); the last two (see dgd_checkpoints_cpu) only when
// keep_residuals, else empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dgd_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, const at::Tensor& alpha, const at::Tensor& eta,
    const at::Tensor& a, const std::optional<at::Tensor>& h0, bool read_after, int64_t chunk, bool keep_residuals);
// What the backward needs of the forward, in the kernels' padded layouts: the state at every
// chunk start and every chunk's R (the rows w_t - eta_t W_{t-1} a_t).
std::tuple<at::Tensor, at::Tensor> dgd_checkpoints_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
                                                       const at::Tensor& alpha, const at::Tensor& eta,
                                                       const at::Tensor& a, const std::optional<at::Tensor>& h0,
                                                       int64_t chunk);
// (dq, dk, dw, dalpha, deta, da, dh0); a_is_k: a is k itself, da is added to dk and returned empty.
std::vector<at::Tensor> dgd_bwd_cpu(const at::Tensor& dout, const at::Tensor& dstate, const at::Tensor& q,
                                    const at::Tensor& k, const at::Tensor& w, const at::Tensor& alpha,
                                    const at::Tensor& eta, const at::Tensor& a, const at::Tensor& ckpt,
                                    const at::Tensor& rbuf, bool read_after, int64_t chunk, bool a_is_k);
}  // namespace nested_learning
