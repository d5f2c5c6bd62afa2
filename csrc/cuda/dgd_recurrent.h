// Plain C interface of the fused per-token DGD kernel (dgd_recurrent.cu), no torch headers.
#pragma once
#ifdef __cplusplus
extern "C" {
#endif

enum NlDtype { NL_F32 = 0, NL_BF16 = 1, NL_F16 = 2 };

// q, k, a [B, T, H, dk] and w [B, T, H, dv] contiguous in `dtype`; alpha, eta [B, T, H] float32;
// h0 (may be null) and state [B, H, dv, dk] float32; o [B, T, H, dv] in `dtype`.
typedef struct {
  int dtype;
  const void *q, *k, *w, *a;
  const float *alpha, *eta, *h0;
  void* o;
  float* state;
  int B, T, H, dk, dv, read_after;
  void* stream;  // cudaStream_t
} NlDgdRecurrentArgs;

// Launches the kernel on p->stream; returns the cudaError_t code (0 = success).
int nl_dgd_recurrent_fwd(const NlDgdRecurrentArgs* p);

#ifdef __cplusplus
}
#endif
