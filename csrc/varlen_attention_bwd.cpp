// Varlen attention backward: per (head, segment) item, over blocks of queries and keys, P is
// recomputed from the saved log-sum-exp; dV += P^T dO, dP = dO V^T, dS = P (dP - delta),
// dQ += dS K, dK += dS^T Q, every product one call of ATen's BLAS. An item owns its head's rows of
// dq, dk and dv (fp32), so no two threads write the same row; GQA groups are summed at the end.
#include "attention.h"

namespace fastvl {

using namespace attention;

namespace {
constexpr int64_t kBlockQ = 64, kBlockK = 256;

// delta[h, t] = sum_d dO[t, h, d] out[t, h, d], with dO packed head-major fp32
template <typename T>
Tensor row_dots(const Tensor& dos, const Tensor& out_) {
  const Tensor out = out_.contiguous();
  const int64_t heads = dos.size(0), tokens = dos.size(1), dim = dos.size(2);
  Tensor delta = at::empty({heads, tokens}, dos.options());
  const float* dp = dos.data_ptr<float>();
  const T* op = out.data_ptr<T>();
  float* result = delta.data_ptr<float>();
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> row(dim);
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < heads; ++h) {
        to_float(op + (t * heads + h) * dim, row.data(), dim);
        const float* g = dp + (h * tokens + t) * dim;
        float sum = 0.f;
        for (int64_t d = 0; d < dim; ++d) sum += g[d] * row[d];
        result[h * tokens + t] = sum;
      }
  });
  return delta;
}
}  // namespace

std::tuple<Tensor, Tensor, Tensor> varlen_attention_bwd(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                                        const Tensor& v, const Tensor& out, const Tensor& lse_,
                                                        const Tensor& cu_q, const Tensor& cu_k, bool causal,
                                                        double scale, const std::optional<Tensor>& rope_pos,
                                                        double theta) {
  const int64_t tq = q.size(0), heads = q.size(1), dim = q.size(2), tk = k.size(0), group = heads / k.size(1);
  const Tensor qs = pack_heads(q, rope_pos, theta, float(scale)), ks = pack_heads(k, rope_pos, theta, 1.f),
               vs = pack_heads(v, std::nullopt, theta, 1.f), dos = pack_heads(grad_out, std::nullopt, theta, 1.f);
  const Tensor lse = lse_.contiguous();
  Tensor delta;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "row_dots",
                                  [&] { delta = row_dots<scalar_t>(dos, out); });
  // per query head: dk and dv of its kv head, summed over the group by unpack_heads
  Tensor dq = at::zeros({heads, tq, dim}, qs.options()), dk = at::zeros({heads, tk, dim}, qs.options()),
         dv = at::zeros({heads, tk, dim}, qs.options());
  const auto cq = offsets(cu_q), ck = offsets(cu_k);
  const auto work = items(heads, cq, tq + 1);  // whole segments
  const float *Qp = qs.data_ptr<float>(), *Kp = ks.data_ptr<float>(), *Vp = vs.data_ptr<float>(),
              *dOp = dos.data_ptr<float>(), *lse_p = lse.data_ptr<float>(), *delta_p = delta.data_ptr<float>();
  float *dQp = dq.data_ptr<float>(), *dKp = dk.data_ptr<float>(), *dVp = dv.data_ptr<float>();

  parallel_items(work.size(), 2 * kBlockQ * kBlockK, [&](int64_t i, float* buffer) {
    const Item& it = work[i];
    const int64_t h = it.head, qs0 = cq[it.segment], ks0 = ck[it.segment];
    const int64_t lq = it.q1, lk = ck[it.segment + 1] - ks0, shift = lk - lq, kv = h / group;
    const float* K = Kp + (kv * tk + ks0) * dim;
    const float* V = Vp + (kv * tk + ks0) * dim;
    float* dK = dKp + (h * tk + ks0) * dim;
    float* dV = dVp + (h * tk + ks0) * dim;
    float *P = buffer, *dS = buffer + kBlockQ * kBlockK;
    for (int64_t q0 = 0; q0 < lq; q0 += kBlockQ) {
      const int64_t rows = std::min(kBlockQ, lq - q0), row0 = h * tq + qs0 + q0;
      const float* Q = Qp + row0 * dim;
      const float* dO = dOp + row0 * dim;
      float* dQ = dQp + row0 * dim;
      const int64_t key_end = visible(causal, q0 + rows - 1, shift, lk);
      for (int64_t k0 = 0; k0 < key_end; k0 += kBlockK) {
        const int64_t kn = std::min(kBlockK, key_end - k0);
        gemm(false, true, rows, kn, dim, 1.f, Q, dim, K + k0 * dim, dim, 0.f, P, kn);
        for (int64_t r = 0; r < rows; ++r) {
          const float row_lse = lse_p[row0 + r];
          const int64_t n = std::isinf(row_lse) ? 0 : visible(causal, q0 + r, shift - k0, kn);
          exp_row(P + r * kn, n, kn, row_lse);
        }
        gemm(true, false, kn, dim, rows, 1.f, P, kn, dO, dim, 1.f, dV + k0 * dim, dim);
        gemm(false, true, rows, kn, dim, 1.f, dO, dim, V + k0 * dim, dim, 0.f, dS, kn);
        for (int64_t r = 0; r < rows; ++r) {
          const Vec d(delta_p[row0 + r]);
          at::vec::map2([d](Vec p, Vec dp) { return p * (dp - d); }, dS + r * kn, P + r * kn, dS + r * kn, kn);
        }
        gemm(false, false, rows, dim, kn, 1.f, dS, kn, K + k0 * dim, dim, 1.f, dQ, dim);
        gemm(true, false, kn, dim, rows, 1.f, dS, kn, Q, dim, 1.f, dK + k0 * dim, dim);
      }
    }
  });
  // S = (scale q_rot) k_rot^T: dq_rot = scale dS k_rot, dk_rot = dS^T (scale q_rot)
  return {unpack_heads(dq, 1, q.scalar_type(), rope_pos, theta, float(scale)),
          unpack_heads(dk, group, k.scalar_type(), rope_pos, theta, 1.f),
          unpack_heads(dv, group, v.scalar_type(), std::nullopt, theta, 1.f)};
}

}  // namespace fastvl
