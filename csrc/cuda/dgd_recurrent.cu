// DGD rank-1 update (docs/MATH.md section 2), fused per-token CUDA kernel for streaming and
// generation (T small): the state stays in registers for the whole call, one warp owns
// ROWS rows of W (value index i), each lane COLS columns of each (key index j).
//
//   u_t = W_{t-1} a_t,  r_t = w_t - eta_t u_t,  W_t = alpha_t W_{t-1} + r_t k_t^T
//   o_t = W_t q_t = alpha_t (W_{t-1} q_t) + r_t (k_t . q_t)   (read after)
//   o_t = W_{t-1} q_t                                          (read before)
//
// No torch headers: this file is syntax-checked with `nvcc -c -arch=sm_90` on machines
// without a CUDA build of torch. The torch binding is in csrc/ops.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dgd_recurrent.h"

namespace {

constexpr int kWarps = 4;  // warps per block
constexpr int kRows = 4;   // rows of W per warp: a block covers kWarps * kRows value rows

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// grid: (ceil(dv / (kWarps * kRows)), B * H); block: 32 * kWarps threads.
template <typename T, int COLS>
__global__ void dgd_recurrent_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ w,
                                         const T* __restrict__ a, const float* __restrict__ alpha,
                                         const float* __restrict__ eta, const float* __restrict__ h0,
                                         T* __restrict__ o, float* __restrict__ state, int T_, int H, int dk, int dv,
                                         bool after) {
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row0 = (blockIdx.x * kWarps + warp) * kRows;
  float W[kRows][COLS];
  const float* s0 = h0 ? h0 + (size_t)bh * dv * dk : nullptr;
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int c = 0; c < COLS; ++c) {
      const int i = row0 + r, j = lane + 32 * c;
      W[r][c] = (s0 && i < dv && j < dk) ? s0[(size_t)i * dk + j] : 0.f;
    }
  for (int t = 0; t < T_; ++t) {
    const size_t tok = ((size_t)b * T_ + t) * H + h;
    const T *qt = q + tok * dk, *kt = k + tok * dk, *at = a + tok * dk, *wt = w + tok * dv;
    float kc[COLS], qc[COLS], ac[COLS];
    float kq = 0.f;
#pragma unroll
    for (int c = 0; c < COLS; ++c) {
      const int j = lane + 32 * c;
      const bool in = j < dk;
      kc[c] = in ? to_f(kt[j]) : 0.f;
      qc[c] = in ? to_f(qt[j]) : 0.f;
      ac[c] = in ? to_f(at[j]) : 0.f;
      kq += kc[c] * qc[c];
    }
    kq = warp_sum(kq);
    const float al = alpha[tok], et = eta[tok];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int i = row0 + r;
      float u = 0.f, wq = 0.f;
#pragma unroll
      for (int c = 0; c < COLS; ++c) {
        u += W[r][c] * ac[c];
        wq += W[r][c] * qc[c];
      }
      u = warp_sum(u);
      wq = warp_sum(wq);
      const float ri = (i < dv ? to_f(wt[i]) : 0.f) - et * u;
#pragma unroll
      for (int c = 0; c < COLS; ++c) W[r][c] = al * W[r][c] + ri * kc[c];
      if (lane == 0 && i < dv) o[tok * dv + i] = from_f<T>(after ? al * wq + ri * kq : wq);
    }
  }
  float* sf = state + (size_t)bh * dv * dk;
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int c = 0; c < COLS; ++c) {
      const int i = row0 + r, j = lane + 32 * c;
      if (i < dv && j < dk) sf[(size_t)i * dk + j] = W[r][c];
    }
}

template <typename T, int COLS>
int launch_cols(const NlDgdRecurrentArgs& p) {
  const int rows_per_block = kWarps * kRows;
  dim3 grid((p.dv + rows_per_block - 1) / rows_per_block, p.B * p.H);
  dgd_recurrent_fwd_kernel<T, COLS><<<grid, 32 * kWarps, 0, static_cast<cudaStream_t>(p.stream)>>>(
      static_cast<const T*>(p.q), static_cast<const T*>(p.k), static_cast<const T*>(p.w), static_cast<const T*>(p.a),
      p.alpha, p.eta, p.h0, static_cast<T*>(p.o), p.state, p.T, p.H, p.dk, p.dv, p.read_after != 0);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch(const NlDgdRecurrentArgs& p) {
  if (p.dk <= 32) return launch_cols<T, 1>(p);
  if (p.dk <= 64) return launch_cols<T, 2>(p);
  if (p.dk <= 128) return launch_cols<T, 4>(p);
  return launch_cols<T, 8>(p);
}

}  // namespace

extern "C" int nl_dgd_recurrent_fwd(const NlDgdRecurrentArgs* p) {
  if (p->dk <= 0 || p->dk > 256 || p->dv <= 0) return static_cast<int>(cudaErrorInvalidValue);
  if (p->B * p->H == 0 || p->T == 0) {
    // nothing to stream: the final state is the initial one
    const size_t n = (size_t)p->B * p->H * p->dv * p->dk * sizeof(float);
    cudaStream_t s = static_cast<cudaStream_t>(p->stream);
    return static_cast<int>(p->h0 ? cudaMemcpyAsync(p->state, p->h0, n, cudaMemcpyDeviceToDevice, s)
                                  : cudaMemsetAsync(p->state, 0, n, s));
  }
  switch (p->dtype) {
    case NL_F32: return launch<float>(*p);
    case NL_BF16: return launch<__nv_bfloat16>(*p);
    case NL_F16: return launch<__half>(*p);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}
