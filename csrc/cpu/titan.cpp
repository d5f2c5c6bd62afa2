// Titans linear memory with momentum and forgetting (docs/MATH.md section 3) on the CPU:
// the chunk loop of kernels/titan.py, batched over (batch, head) with ATen matrix products,
// so that no Python runs per chunk and every product is one batched GEMM over all B*H
// sequence-heads (the GEMMs are multi-threaded). Per chunk, all gradients at the chunk-start M:
//
//   o = Q M^T;  E = 2 (K M^T - V);  LT = theta o E
//   [G_par | G_mom] = [c_par o LT | c_mom o LT]^T K        (one product)
//   M' = abar M + rho S - G_par;  S' = ebar S - G_mom
//
// The scan coefficients (abar, rho, ebar per chunk; c_par, c_mom per token) are inputs
// (nested_learning/ops/_titan_scan.py); the backward returns their gradients.
#include <torch/extension.h>

#include <tuple>
#include <vector>

#include "titan.h"

namespace nested_learning {
namespace {

// [B, T, H, *] -> [N, B*H, C, *] contiguous (chunk-major: every chunk's slice is contiguous), T
// padded to N*C with zeros; padded tokens have zero coefficients, so they change nothing.
at::Tensor chunk_major(const at::Tensor& x, int64_t C, int64_t N) {
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2);
  auto y = x.dim() == 4 ? x.permute({0, 2, 1, 3}).reshape({B * H, T, x.size(3)}) : x.permute({0, 2, 1}).reshape({B * H, T});
  if (N * C != T) {
    std::vector<int64_t> pad(2 * (y.dim() - 1), 0);
    pad[y.dim() == 3 ? 3 : 1] = N * C - T;  // the T dimension's right side
    y = at::constant_pad_nd(y, pad, 0);
  }
  y = y.dim() == 3 ? y.reshape({B * H, N, C, y.size(2)}).permute({1, 0, 2, 3}) : y.reshape({B * H, N, C}).permute({1, 0, 2});
  return y.contiguous();
}

// [B, H, T] coefficients -> [N, B*H, C] (same as chunk_major for a [B, T, H] tensor)
at::Tensor chunk_major_bht(const at::Tensor& x, int64_t C, int64_t N) {
  return chunk_major(x.permute({0, 2, 1}), C, N);
}

// [N, B*H, C, *] -> [B, T, H, *]
at::Tensor token_major(const at::Tensor& x, int64_t B, int64_t H, int64_t T) {
  const int64_t N = x.size(0), C = x.size(2);
  if (x.dim() == 4)
    return x.permute({1, 0, 2, 3}).reshape({B, H, N * C, x.size(3)}).narrow(2, 0, T).permute({0, 2, 1, 3}).contiguous();
  return x.permute({1, 0, 2}).reshape({B, H, N * C}).narrow(2, 0, T).permute({0, 2, 1}).contiguous();
}

// [B, H, N] per-chunk scalars -> [N, B*H]
at::Tensor per_chunk(const at::Tensor& x) { return x.reshape({-1, x.size(2)}).t().contiguous(); }

// [N, B*H] -> N views [B*H, 1, 1]
std::vector<at::Tensor> cols(const at::Tensor& x) { return x.view({x.size(0), -1, 1, 1}).unbind(0); }

// c_par and c_mom side by side: [N, B*H, C, 2, 1] (one product scales LT by both)
at::Tensor both_coefficients(const at::Tensor& c_par, const at::Tensor& c_mom, int64_t C, int64_t N) {
  return at::stack({chunk_major_bht(c_par, C, N), chunk_major_bht(c_mom, C, N)}, -1).unsqueeze(-1);
}

}  // namespace

std::vector<at::Tensor> titan_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& theta, const at::Tensor& abar, const at::Tensor& rho,
                                      const at::Tensor& ebar, const at::Tensor& c_par, const at::Tensor& c_mom,
                                      const std::optional<at::Tensor>& M0, const std::optional<at::Tensor>& S0,
                                      int64_t chunk, bool keep_checkpoints) {
  TORCH_CHECK(chunk > 0, "titan (cpu backend): chunk must be positive");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), dk = q.size(3), dv = v.size(3), BH = B * H;
  const int64_t N = (T + chunk - 1) / chunk, C = chunk;
  // per-chunk views made once (indexing inside the loop costs a dispatch each)
  auto Q = chunk_major(q, C, N).unbind(0), K = chunk_major(k, C, N).unbind(0), V = chunk_major(v, C, N).unbind(0);
  auto TH2 = (chunk_major(theta, C, N) * 2).unsqueeze(-1).unbind(0);  // 2 theta (never in place: may alias theta)
  auto CC = both_coefficients(c_par, c_mom, C, N).unbind(0);
  auto ab = cols(per_chunk(abar)), rh = cols(per_chunk(rho)), eb = cols(per_chunk(ebar));
  const bool init = M0.has_value() && M0->defined();
  // states: chunk starts 0..N-1 and the final state at N (checkpoints), or two alternating slots
  const int64_t slots = keep_checkpoints ? N + 1 : 2;
  auto Ms = at::empty({slots, BH, dv, dk}, q.options()), Ss = at::empty_like(Ms);
  if (init) {
    Ms[0].copy_(M0->reshape({BH, dv, dk}));
    Ss[0].copy_(S0->reshape({BH, dv, dk}));
  } else {
    Ms[0].zero_();
    Ss[0].zero_();
  }
  auto O = at::empty({N, BH, C, dv}, q.options());
  auto Os = O.unbind(0), Mv = Ms.unbind(0), Sv = Ss.unbind(0);
  auto LT = at::empty({BH, C, dv}, q.options()), Wt = at::empty({BH, C, 2 * dv}, q.options());
  auto Wt4 = Wt.view({BH, C, 2, dv});
  auto G = at::empty({BH, 2 * dv, dk}, q.options());
  auto Gp = G.narrow(1, 0, dv), Gm = G.narrow(1, dv, dv);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t i = keep_checkpoints ? n : n % 2, j = keep_checkpoints ? n + 1 : (n + 1) % 2;
    auto &M = Mv[i], &S = Sv[i], &Mn = Mv[j], &Sn = Sv[j];
    auto Mt = M.transpose(1, 2);
    at::bmm_out(Os[n], Q[n], Mt);
    at::bmm_out(LT, K[n], Mt);
    LT.sub_(V[n]).mul_(TH2[n]);                       // theta * 2 (M k - v)
    at::mul_out(Wt4, LT.unsqueeze(2), CC[n]);          // [c_par LT | c_mom LT]
    at::bmm_out(G, Wt.transpose(1, 2), K[n]);          // [G_par ; G_mom]
    at::mul_out(Mn, M, ab[n]).addcmul_(S, rh[n]).sub_(Gp);
    at::mul_out(Sn, S, eb[n]).sub_(Gm);
  }
  const int64_t last = keep_checkpoints ? N : N % 2;
  std::vector<at::Tensor> out{token_major(O, B, H, T), Ms[last].reshape({B, H, dv, dk}).clone(),
                              Ss[last].reshape({B, H, dv, dk}).clone()};
  if (keep_checkpoints) {
    out.push_back(Ms);
    out.push_back(Ss);
  }
  return out;
}

std::vector<at::Tensor> titan_bwd_cpu(const at::Tensor& dout, const std::optional<at::Tensor>& dMt,
                                      const std::optional<at::Tensor>& dSt, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& theta, const at::Tensor& abar,
                                      const at::Tensor& rho, const at::Tensor& ebar, const at::Tensor& c_par,
                                      const at::Tensor& c_mom, const at::Tensor& Mck, const at::Tensor& Sck,
                                      int64_t chunk) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), dk = q.size(3), dv = v.size(3), BH = B * H;
  const int64_t N = (T + chunk - 1) / chunk, C = chunk;
  TORCH_CHECK(Mck.size(0) == N + 1 && Sck.size(0) == N + 1, "titan_bwd: checkpoints of another shape");
  auto Q = chunk_major(q, C, N).unbind(0), K = chunk_major(k, C, N).unbind(0), V = chunk_major(v, C, N).unbind(0);
  auto DO = chunk_major(dout, C, N).unbind(0);
  auto TH = chunk_major(theta, C, N).unsqueeze(-1).unbind(0);
  auto CC = both_coefficients(c_par, c_mom, C, N).unbind(0);
  auto ab = cols(per_chunk(abar)), rh = cols(per_chunk(rho)), eb = cols(per_chunk(ebar));
  auto Mv = Mck.unbind(0), Sv = Sck.unbind(0);
  const bool has_d = dMt.has_value() && dMt->defined();
  // dM and dS side by side: [BH, 2 dv, dk]
  auto dMS = at::zeros({BH, 2 * dv, dk}, q.options()), dMSn = at::empty_like(dMS);
  if (has_d) {
    dMS.narrow(1, 0, dv).copy_(dMt->reshape({BH, dv, dk}));
    dMS.narrow(1, dv, dv).copy_(dSt->reshape({BH, dv, dk}));
  }
  auto dQ = at::empty({N, BH, C, dk}, q.options()), dK = at::empty_like(dQ);
  auto dV = at::empty({N, BH, C, dv}, q.options());
  auto dTH = at::empty({N, BH, C}, q.options()), dCC = at::empty({N, BH, C, 2}, q.options());
  auto dab = at::empty({N, BH}, q.options()), drh = at::empty_like(dab), deb = at::empty_like(dab);
  auto dQs = dQ.unbind(0), dKs = dK.unbind(0), dVs = dV.unbind(0), dTHs = dTH.unbind(0), dCCs = dCC.unbind(0);
  auto dabs = dab.unbind(0), drhs = drh.unbind(0), debs = deb.unbind(0);
  auto E = at::empty({BH, C, dv}, q.options()), KdMS = at::empty({BH, C, 2 * dv}, q.options());
  auto KdMS4 = KdMS.view({BH, C, 2, dv});
  auto Wt = at::empty({BH, C, 2 * dv}, q.options()), dE = at::empty({BH, C, dv}, q.options());
  auto Wt4 = Wt.view({BH, C, 2, dv});
  const auto minus_two = at::scalar_tensor(-2.0, q.options());
  for (int64_t n = N - 1; n >= 0; --n) {
    auto &M = Mv[n], &S = Sv[n];
    auto dM = dMS.narrow(1, 0, dv), dS = dMS.narrow(1, dv, dv);
    at::bmm_out(E, K[n], M.transpose(1, 2));
    E.sub_(V[n]).mul_(2);                                        // E = 2 (M k - v)
    at::bmm_out(KdMS, K[n], dMS.transpose(1, 2));               // [K dM^T | K dS^T]
    auto U = (KdMS4 * CC[n]).sum(2).neg_();                      // U = -(c_par K dM^T + c_mom K dS^T)
    at::sum_out(dTHs[n], E * U, {-1});
    at::mul_out(dE, U, TH[n]);
    at::mul_out(dVs[n], dE, minus_two);
    auto LT = E.mul_(TH[n]);                                     // E is not needed after this
    at::mul_out(Wt4, LT.unsqueeze(2), CC[n]);                    // [c_par LT | c_mom LT]
    at::bmm_out(dKs[n], Wt, dMS).neg_().add_(at::bmm(dE, M), 2);  // 2 dE M - [cp LT | cm LT] [dM ; dS]
    at::bmm_out(dQs[n], DO[n], M);
    at::sum_out(dCCs[n], LT.unsqueeze(2) * KdMS4, {-1}).neg_();  // [dc_par, dc_mom]
    at::sum_out(dabs[n], dM * M, {1, 2});
    at::sum_out(drhs[n], dM * S, {1, 2});
    at::sum_out(debs[n], dS * S, {1, 2});
    auto dMp = dMSn.narrow(1, 0, dv), dSp = dMSn.narrow(1, dv, dv);
    at::mul_out(dMp, dM, ab[n]).add_(at::bmm(DO[n].transpose(1, 2), Q[n])).add_(at::bmm(dE.transpose(1, 2), K[n]), 2);
    at::mul_out(dSp, dM, rh[n]).addcmul_(dS, eb[n]);
    std::swap(dMS, dMSn);
  }
  auto dcp = dCC.select(-1, 0), dcm = dCC.select(-1, 1);
  auto bht = [&](const at::Tensor& x) { return x.t().reshape({B, H, N}).contiguous(); };
  return {token_major(dQ, B, H, T),
          token_major(dK, B, H, T),
          token_major(dV, B, H, T),
          token_major(dTH, B, H, T),
          bht(dab),
          bht(drh),
          bht(deb),
          token_major(dcp, B, H, T).permute({0, 2, 1}).contiguous(),
          token_major(dcm, B, H, T).permute({0, 2, 1}).contiguous(),
          dMS.narrow(1, 0, dv).reshape({B, H, dv, dk}).clone(),
          dMS.narrow(1, dv, dv).reshape({B, H, dv, dk}).clone()};
}

}  // namespace nested_learning
