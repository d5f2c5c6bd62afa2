// DGD rank-1 update (MATH section 2) on the CPU: a sequential O(dv*dk)-per-token recurrence,
// parallel over (batch, head), never forming a [d, d] matrix per token.
//
//   W_t = alpha_t W_{t-1} + (w_t - eta_t W_{t-1} a_t) k_t^T
//   o_t = W_t q_t (read after) or W_{t-1} q_t (read before)
//
// Forward saves W at every chunk start; backward recomputes the states of one chunk from its
// checkpoint and walks the chunk's tokens in reverse.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "dgd.h"

namespace nested_learning {
namespace {

struct Strides {  // [B, T, H, d] contiguous
  int64_t T, H;
  int64_t vec(int64_t b, int64_t t, int64_t h, int64_t d) const { return ((b * T + t) * H + h) * d; }
  int64_t gate(int64_t b, int64_t t, int64_t h) const { return (b * T + t) * H + h; }
};

// One token: u = W a (and o = W q when reading before), then W <- alpha W + (w - eta u) k^T
// (and o = W q when reading after). u is dv scratch.
template <typename T>
inline void step(T* W, const T* q, const T* k, const T* w, const T* a, T alpha, T eta, T* o, T* u,
                 int64_t dv, int64_t dk, bool after) {
  for (int64_t i = 0; i < dv; ++i) {
    const T* Wi = W + i * dk;
    T ua = 0, oq = 0;
#pragma omp simd reduction(+ : ua, oq)
    for (int64_t j = 0; j < dk; ++j) {
      ua += Wi[j] * a[j];
      oq += Wi[j] * q[j];
    }
    u[i] = ua;
    if (!after && o) o[i] = oq;
  }
  for (int64_t i = 0; i < dv; ++i) {
    T* Wi = W + i * dk;
    const T r = w[i] - eta * u[i];
    T oq = 0;
#pragma omp simd reduction(+ : oq)
    for (int64_t j = 0; j < dk; ++j) {
      Wi[j] = alpha * Wi[j] + r * k[j];
      oq += Wi[j] * q[j];
    }
    if (after && o) o[i] = oq;
  }
}

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, const at::Tensor& alpha,
                  const at::Tensor& eta, const at::Tensor& a, const at::Tensor& h0, bool has_h0, bool after,
                  int64_t chunk, at::Tensor& o, at::Tensor& state, at::Tensor& ckpt) {
  const int64_t B = q.size(0), Tn = q.size(1), H = q.size(2), dk = q.size(3), dv = w.size(3);
  const int64_t NC = ckpt.size(2);
  const Strides s{Tn, H};
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *wp = w.data_ptr<T>(), *ap = a.data_ptr<T>();
  const T *al = alpha.data_ptr<T>(), *et = eta.data_ptr<T>();
  T *op = o.data_ptr<T>(), *sp = state.data_ptr<T>(), *cp = ckpt.data_ptr<T>();
  const T* hp = has_h0 ? h0.data_ptr<T>() : nullptr;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> u(dv);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      T* W = sp + bh * dv * dk;
      if (hp) std::copy(hp + bh * dv * dk, hp + (bh + 1) * dv * dk, W);
      else std::fill(W, W + dv * dk, T(0));
      for (int64_t t = 0; t < Tn; ++t) {
        if (t % chunk == 0) std::copy(W, W + dv * dk, cp + (bh * NC + t / chunk) * dv * dk);
        step(W, qp + s.vec(b, t, h, dk), kp + s.vec(b, t, h, dk), wp + s.vec(b, t, h, dv), ap + s.vec(b, t, h, dk),
             al[s.gate(b, t, h)], et[s.gate(b, t, h)], op + s.vec(b, t, h, dv), u.data(), dv, dk, after);
      }
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& dout, const at::Tensor& dstate, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& w, const at::Tensor& alpha, const at::Tensor& eta, const at::Tensor& a,
                   const at::Tensor& ckpt, bool after, int64_t chunk, at::Tensor& dq, at::Tensor& dk_,
                   at::Tensor& dw, at::Tensor& dalpha, at::Tensor& deta, at::Tensor& da, at::Tensor& dh0) {
  const int64_t B = q.size(0), Tn = q.size(1), H = q.size(2), dk = q.size(3), dv = w.size(3);
  const int64_t NC = ckpt.size(2), D = dv * dk;
  const Strides s{Tn, H};
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *wp = w.data_ptr<T>(), *ap = a.data_ptr<T>();
  const T *al = alpha.data_ptr<T>(), *et = eta.data_ptr<T>(), *dop = dout.data_ptr<T>();
  const T *dsp = dstate.data_ptr<T>(), *cp = ckpt.data_ptr<T>();
  T *dqp = dq.data_ptr<T>(), *dkp = dk_.data_ptr<T>(), *dwp = dw.data_ptr<T>(), *dap = da.data_ptr<T>();
  T *dalp = dalpha.data_ptr<T>(), *detp = deta.data_ptr<T>(), *dhp = dh0.data_ptr<T>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> Ws((chunk + 1) * D), u(dv), g(dv), r(dv), du(dv);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      T* dW = dhp + bh * D;  // the running gradient w.r.t. the current state; ends as dh0
      std::copy(dsp + bh * D, dsp + (bh + 1) * D, dW);
      for (int64_t c = NC - 1; c >= 0; --c) {
        const int64_t t0 = c * chunk, t1 = std::min(Tn, t0 + chunk);
        std::copy(cp + (bh * NC + c) * D, cp + (bh * NC + c + 1) * D, Ws.data());
        for (int64_t t = t0; t < t1; ++t) {  // recompute the chunk's states
          T* Wn = Ws.data() + (t - t0 + 1) * D;
          std::copy(Ws.data() + (t - t0) * D, Ws.data() + (t - t0 + 1) * D, Wn);
          step(Wn, qp + s.vec(b, t, h, dk), kp + s.vec(b, t, h, dk), wp + s.vec(b, t, h, dv),
               ap + s.vec(b, t, h, dk), al[s.gate(b, t, h)], et[s.gate(b, t, h)], (T*)nullptr, u.data(), dv,
               dk, after);
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const T* Wp = Ws.data() + (t - t0) * D;      // W_{t-1}
          const T* Wc = Ws.data() + (t - t0 + 1) * D;  // W_t
          const T *qt = qp + s.vec(b, t, h, dk), *kt = kp + s.vec(b, t, h, dk), *at_ = ap + s.vec(b, t, h, dk);
          const T *wt = wp + s.vec(b, t, h, dv), *dot = dop + s.vec(b, t, h, dv);
          const T alpha_t = al[s.gate(b, t, h)], eta_t = et[s.gate(b, t, h)];
          T *dqt = dqp + s.vec(b, t, h, dk), *dkt = dkp + s.vec(b, t, h, dk), *dat = dap + s.vec(b, t, h, dk);
          T* dwt = dwp + s.vec(b, t, h, dv);
          const T* Wread = after ? Wc : Wp;
          if (after) {  // o_t = W_t q_t
            for (int64_t i = 0; i < dv; ++i)
#pragma omp simd
              for (int64_t j = 0; j < dk; ++j) dW[i * dk + j] += dot[i] * qt[j];
          }
          for (int64_t j = 0; j < dk; ++j) dqt[j] = 0;
          for (int64_t i = 0; i < dv; ++i)
#pragma omp simd
            for (int64_t j = 0; j < dk; ++j) dqt[j] += Wread[i * dk + j] * dot[i];
          // transition W_t = alpha W_{t-1} + r k^T, r = w - eta u, u = W_{t-1} a
          T dalpha_t = 0;
          for (int64_t i = 0; i < dv; ++i) {
            T gi = 0, ui = 0;
#pragma omp simd reduction(+ : gi, ui, dalpha_t)
            for (int64_t j = 0; j < dk; ++j) {
              gi += dW[i * dk + j] * kt[j];
              ui += Wp[i * dk + j] * at_[j];
              dalpha_t += dW[i * dk + j] * Wp[i * dk + j];
            }
            g[i] = gi;
            u[i] = ui;
            r[i] = wt[i] - eta_t * ui;
            du[i] = -eta_t * gi;
          }
          T deta_t = 0;
          for (int64_t i = 0; i < dv; ++i) {
            dwt[i] = g[i];
            deta_t -= u[i] * g[i];
          }
          for (int64_t j = 0; j < dk; ++j) dkt[j] = 0, dat[j] = 0;
          for (int64_t i = 0; i < dv; ++i)
#pragma omp simd
            for (int64_t j = 0; j < dk; ++j) {
              dkt[j] += dW[i * dk + j] * r[i];
              dat[j] += Wp[i * dk + j] * du[i];
            }
          dalp[s.gate(b, t, h)] = dalpha_t;
          detp[s.gate(b, t, h)] = deta_t;
          for (int64_t i = 0; i < dv; ++i)  // dW_{t-1} = alpha dW_t + du a^T
#pragma omp simd
            for (int64_t j = 0; j < dk; ++j) dW[i * dk + j] = alpha_t * dW[i * dk + j] + du[i] * at_[j];
          if (!after) {  // o_t = W_{t-1} q_t
            for (int64_t i = 0; i < dv; ++i)
#pragma omp simd
              for (int64_t j = 0; j < dk; ++j) dW[i * dk + j] += dot[i] * qt[j];
          }
        }
      }
    }
  });
}

void check(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "dgd (cpu backend): ", name, " must be a CPU tensor");
  TORCH_CHECK(x.is_contiguous(), "dgd (cpu backend): ", name, " must be contiguous");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> dgd_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& w, const at::Tensor& alpha,
                                                          const at::Tensor& eta, const at::Tensor& a,
                                                          const std::optional<at::Tensor>& h0, bool read_after,
                                                          int64_t chunk) {
  for (auto& [x, n] : {std::pair{q, "q"}, {k, "k"}, {w, "w"}, {alpha, "alpha"}, {eta, "eta"}, {a, "a"}}) check(x, n);
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), dk = q.size(3), dv = w.size(3);
  const int64_t NC = (T + chunk - 1) / chunk;
  auto o = at::empty({B, T, H, dv}, q.options());
  auto state = at::empty({B, H, dv, dk}, q.options());
  auto ckpt = at::empty({B, H, NC, dv, dk}, q.options());
  const bool has_h0 = h0.has_value() && h0->defined();
  at::Tensor h0c = has_h0 ? h0->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "dgd_fwd_cpu", [&] {
    forward_impl<scalar_t>(q, k, w, alpha, eta, a, h0c, has_h0, read_after, chunk, o, state, ckpt);
  });
  return {o, state, ckpt};
}

std::vector<at::Tensor> dgd_bwd_cpu(const at::Tensor& dout, const at::Tensor& dstate, const at::Tensor& q,
                                    const at::Tensor& k, const at::Tensor& w, const at::Tensor& alpha,
                                    const at::Tensor& eta, const at::Tensor& a, const at::Tensor& ckpt,
                                    bool read_after, int64_t chunk) {
  for (auto& [x, n] : {std::pair{dout, "dout"}, {dstate, "dstate"}, {ckpt, "checkpoints"}}) check(x, n);
  auto dq = at::empty_like(q), dk = at::empty_like(k), dw = at::empty_like(w), da = at::empty_like(a);
  auto dalpha = at::empty_like(alpha), deta = at::empty_like(eta), dh0 = at::empty_like(dstate);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "dgd_bwd_cpu", [&] {
    backward_impl<scalar_t>(dout, dstate, q, k, w, alpha, eta, a, ckpt, read_after, chunk, dq, dk, dw, dalpha, deta,
                            da, dh0);
  });
  return {dq, dk, dw, dalpha, deta, da, dh0};
}

}  // namespace nested_learning
