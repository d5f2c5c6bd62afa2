// DGD rank-1 update (MATH section 2) on the CPU, in chunk-parallel (WY) form, parallel over
// (batch, group of heads), never forming a [d, d] matrix per token:
//
//   W_t = alpha_t W_{t-1} + (w_t - eta_t W_{t-1} a_t) k_t^T
//   o_t = W_t q_t (read after) or W_{t-1} q_t (read before)
//
// The loops are in dgd_kernels.inc. The forward can keep the state at every chunk start and each
// chunk's R; the backward walks the chunks in reverse from those (or from dgd_checkpoints, which
// recomputes them).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "dgd.h"

namespace nested_learning {
namespace {

#define NL_VEC_LANES 4  // one SSE2 / NEON register of floats
namespace generic {
#include "dgd_kernels.inc"
}  // namespace generic
#undef NL_VEC_LANES

#ifdef NL_HAVE_AVX2_TARGET
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define NL_VEC_LANES 8  // one ymm register of floats
namespace avx2 {
#include "dgd_kernels.inc"
}  // namespace avx2
#undef NL_VEC_LANES
#pragma GCC pop_options
#endif

// The large buffers of these ops (outputs, input gradients, and the residuals: the states at
// chunk starts and each chunk's R) are recycled instead of going back to the system. Fresh pages
// cost a page fault each on first touch: without the pool, bench/probe_dgd_cpu.py counts about
// 3,900 per forward that keeps residuals at B=2 T=2048 H=4 d=64, and on the 2-vCPU machine of
// bench/RESULTS.md they cost about as long as that forward itself. A buffer returns here when its tensor dies and the next request of the same size takes
// it. Up to NESTED_LEARNING_CPU_POOL_MB (default 1024; 0: no pool) of free buffers are held, the
// rest is freed; requests under 128 KiB (which malloc serves without fresh pages) bypass the pool.
// The tensors' storage is not resizable (resize_ beyond their size raises).
class BufferPool {
 public:
  static BufferPool& get() {
    static auto* pool = new BufferPool();  // never destroyed: tensors may outlive static destructors
    return *pool;
  }

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    int64_t numel = 1;
    for (auto n : sizes) numel *= n;
    const size_t bytes = (size_t(numel) * options.dtype().itemsize() + 63) / 64 * 64;
    if (bytes < (size_t(128) << 10) || limit_ == 0) return at::empty(sizes, options);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end()) p = it->second, held_ -= bytes, free_.erase(it);
    }
    if (!p) p = std::aligned_alloc(64, bytes);
    TORCH_CHECK(p, "dgd (cpu backend): out of memory allocating ", bytes, " bytes");
    return at::from_blob(p, sizes, [this, bytes](void* q) { give(q, bytes); }, options);
  }

  at::Tensor empty_like(const at::Tensor& x) { return empty(x.sizes(), x.options()); }

 private:
  BufferPool() {
    const char* env = std::getenv("NESTED_LEARNING_CPU_POOL_MB");
    limit_ = size_t(env ? std::max(0L, std::atol(env)) : 1024) << 20;
  }
  void give(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (held_ + bytes > limit_) return std::free(p);
    free_.emplace(bytes, p);
    held_ += bytes;
  }
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t held_ = 0, limit_ = 0;
};

void check(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "dgd (cpu backend): ", name, " must be a CPU tensor");
  TORCH_CHECK(x.is_contiguous(), "dgd (cpu backend): ", name, " must be contiguous");
}

template <typename I>
I inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, const at::Tensor& alpha,
         const at::Tensor& eta, const at::Tensor& a) {
  using F = std::remove_const_t<std::remove_pointer_t<decltype(I::q)>>;
  return I{q.data_ptr<F>(), k.data_ptr<F>(), w.data_ptr<F>(), a.data_ptr<F>(), alpha.data_ptr<F>(),
           eta.data_ptr<F>(), {q.size(1), q.size(2)}, q.size(3), w.size(3)};
}

}  // namespace

namespace {
template <typename F>
void run_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, const at::Tensor& alpha,
                 const at::Tensor& eta, const at::Tensor& a, const std::optional<at::Tensor>& h0, bool read_after,
                 int64_t chunk, F* o, F* state, F* ckpt, F* rbuf) {
  for (auto& [x, n] : {std::pair{q, "q"}, {k, "k"}, {w, "w"}, {alpha, "alpha"}, {eta, "eta"}, {a, "a"}}) check(x, n);
  const bool has_h0 = h0.has_value() && h0->defined();
  if (has_h0) check(*h0, "initial_state");
  const F* hp = has_h0 ? h0->data_ptr<F>() : nullptr;
#ifdef NL_HAVE_AVX2_TARGET
  if (cpu_has_avx2_fma())
    return avx2::forward_impl<F>(inputs<avx2::Inputs<F>>(q, k, w, alpha, eta, a), hp, q.size(0), q.size(1),
                                 q.size(2), read_after, chunk, o, state, ckpt, rbuf);
#endif
  generic::forward_impl<F>(inputs<generic::Inputs<F>>(q, k, w, alpha, eta, a), hp, q.size(0), q.size(1), q.size(2),
                           read_after, chunk, o, state, ckpt, rbuf);
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dgd_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, const at::Tensor& alpha, const at::Tensor& eta,
    const at::Tensor& a, const std::optional<at::Tensor>& h0, bool read_after, int64_t chunk, bool keep_residuals) {
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), dk = q.size(3), dv = w.size(3);
  const int64_t NC = (T + chunk - 1) / chunk;
  auto& pool = BufferPool::get();
  auto o = pool.empty({B, T, H, dv}, q.options());
  auto state = pool.empty({B, H, dv, dk}, q.options());
  const int64_t keep = keep_residuals ? B * H * NC : 0;
  auto ckpt = pool.empty({keep * generic::padded(dk) * generic::padded(dv)}, q.options());
  auto rbuf = pool.empty({keep * generic::padded(chunk) * generic::padded(dv)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "dgd_fwd_cpu", [&] {
    run_forward<scalar_t>(q, k, w, alpha, eta, a, h0, read_after, chunk, o.data_ptr<scalar_t>(),
                          state.data_ptr<scalar_t>(), keep_residuals ? ckpt.data_ptr<scalar_t>() : nullptr,
                          keep_residuals ? rbuf.data_ptr<scalar_t>() : nullptr);
  });
  return {o, state, ckpt, rbuf};
}

std::tuple<at::Tensor, at::Tensor> dgd_checkpoints_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
                                                       const at::Tensor& alpha, const at::Tensor& eta,
                                                       const at::Tensor& a, const std::optional<at::Tensor>& h0,
                                                       int64_t chunk) {
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), dk = q.size(3), dv = w.size(3);
  const int64_t NC = (T + chunk - 1) / chunk;
  auto& pool = BufferPool::get();
  auto ckpt = pool.empty({B, H, NC, generic::padded(dk), generic::padded(dv)}, q.options());
  auto rbuf = pool.empty({B, H, NC, generic::padded(chunk), generic::padded(dv)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "dgd_checkpoints_cpu", [&] {
    run_forward<scalar_t>(q, k, w, alpha, eta, a, h0, true, chunk, nullptr, nullptr, ckpt.data_ptr<scalar_t>(),
                          rbuf.data_ptr<scalar_t>());
  });
  return {ckpt, rbuf};
}

std::vector<at::Tensor> dgd_bwd_cpu(const at::Tensor& dout, const at::Tensor& dstate, const at::Tensor& q,
                                    const at::Tensor& k, const at::Tensor& w, const at::Tensor& alpha,
                                    const at::Tensor& eta, const at::Tensor& a, const at::Tensor& ckpt,
                                    const at::Tensor& rbuf, bool read_after, int64_t chunk, bool a_is_k) {
  for (auto& [x, n] : {std::pair{dout, "dout"}, {dstate, "dstate"}, {ckpt, "checkpoints"}, {rbuf, "rbuf"}, {q, "q"},
                       {k, "k"}, {w, "w"}, {alpha, "alpha"}, {eta, "eta"}, {a, "a"}})
    check(x, n);
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), dk = q.size(3), dv = w.size(3);
  const int64_t NC = (T + chunk - 1) / chunk;
  TORCH_CHECK(ckpt.numel() == B * H * NC * generic::padded(dk) * generic::padded(dv) &&
                  rbuf.numel() == B * H * NC * generic::padded(chunk) * generic::padded(dv),
              "dgd (cpu backend): checkpoints do not match the inputs (run dgd_checkpoints with the same chunk)");
  auto& pool = BufferPool::get();
  auto dq = pool.empty_like(q), dk_ = pool.empty_like(k), dw = pool.empty_like(w);
  auto da = a_is_k ? at::empty({0}, a.options()) : pool.empty_like(a);
  auto dalpha = at::empty_like(alpha), deta = at::empty_like(eta), dh0 = at::empty_like(dstate);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "dgd_bwd_cpu", [&] {
    auto run = [&](auto impl, auto in) {
      impl(in, dout.data_ptr<scalar_t>(), dstate.data_ptr<scalar_t>(), ckpt.data_ptr<scalar_t>(),
           rbuf.data_ptr<scalar_t>(), B, T, H, read_after, chunk, a_is_k, dq.data_ptr<scalar_t>(),
           dk_.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(), dalpha.data_ptr<scalar_t>(), deta.data_ptr<scalar_t>(),
           a_is_k ? nullptr : da.data_ptr<scalar_t>(), dh0.data_ptr<scalar_t>());
    };
#ifdef NL_HAVE_AVX2_TARGET
    if (cpu_has_avx2_fma())
      return run(avx2::backward_impl<scalar_t>, inputs<avx2::Inputs<scalar_t>>(q, k, w, alpha, eta, a));
#endif
    run(generic::backward_impl<scalar_t>, inputs<generic::Inputs<scalar_t>>(q, k, w, alpha, eta, a));
  });
  return {dq, dk_, dw, dalpha, deta, da, dh0};
}

}  // namespace nested_learning
