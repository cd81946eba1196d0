// Varlen attention forward: per (head, segment, query block) item, S = Q K^T and O += P V on ATen's
// BLAS over blocks of keys, online softmax in between (fp32), q and k rotated once per call.
#include "attention.h"

namespace fastvl {

using namespace attention;

namespace {
constexpr int64_t kBlockQ = 64, kBlockK = 1024;
}

std::tuple<Tensor, Tensor> varlen_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q,
                                                const Tensor& cu_k, bool causal, double scale,
                                                const std::optional<Tensor>& rope_pos, double theta) {
  const int64_t tq = q.size(0), heads = q.size(1), dim = q.size(2), tk = k.size(0), group = heads / k.size(1);
  // the scale folds into the rotated q: S = (scale q) k^T
  const Tensor qs = pack_heads(q, rope_pos, theta, float(scale)), ks = pack_heads(k, rope_pos, theta, 1.f),
               vs = pack_heads(v, std::nullopt, theta, 1.f);
  Tensor out = at::empty({tq, heads, dim}, q.options());
  Tensor lse = at::empty({heads, tq}, q.options().dtype(at::kFloat));
  const auto cq = offsets(cu_q), ck = offsets(cu_k);
  const auto work = items(heads, cq, kBlockQ);
  const float *Qp = qs.data_ptr<float>(), *Kp = ks.data_ptr<float>(), *Vp = vs.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  const int64_t scratch = kBlockQ * kBlockK + kBlockQ * dim + 2 * kBlockQ;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "varlen_attention_fwd", [&] {
    scalar_t* out_p = out.data_ptr<scalar_t>();
    parallel_items(work.size(), scratch, [&](int64_t i, float* buffer) {
      const Item& it = work[i];
      const int64_t qs0 = cq[it.segment], ks0 = ck[it.segment], rows = it.q1 - it.q0;
      const int64_t lq = cq[it.segment + 1] - qs0, lk = ck[it.segment + 1] - ks0, shift = lk - lq;
      const int64_t kv = it.head / group;
      const float* Q = Qp + (it.head * tq + qs0 + it.q0) * dim;
      const float* K = Kp + (kv * tk + ks0) * dim;
      const float* V = Vp + (kv * tk + ks0) * dim;
      float *S = buffer, *O = S + kBlockQ * kBlockK, *m = O + kBlockQ * dim, *l = m + kBlockQ;
      std::fill(O, O + rows * dim, 0.f);
      std::fill(m, m + rows, kNegInf);
      std::fill(l, l + rows, 0.f);
      const int64_t key_end = visible(causal, it.q1 - 1, shift, lk);
      for (int64_t k0 = 0; k0 < key_end; k0 += kBlockK) {
        const int64_t kn = std::min(kBlockK, key_end - k0);
        gemm(false, true, rows, kn, dim, 1.f, Q, dim, K + k0 * dim, dim, 0.f, S, kn);
        for (int64_t r = 0; r < rows; ++r) {
          float* s = S + r * kn;
          const int64_t n = visible(causal, it.q0 + r, shift - k0, kn);
          if (n == 0) {
            std::fill(s, s + kn, 0.f);
            continue;
          }
          const float m_new = std::max(m[r], row_max(s, n));
          const float alpha = std::exp(m[r] - m_new);  // 0 on the first visible block
          l[r] = l[r] * alpha + exp_row(s, n, kn, m_new);
          if (alpha != 1.f) at::vec::map([alpha](Vec x) { return x * Vec(alpha); }, O + r * dim, O + r * dim, dim);
          m[r] = m_new;
        }
        gemm(false, false, rows, dim, kn, 1.f, S, kn, V + k0 * dim, dim, 1.f, O, dim);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t t = qs0 + it.q0 + r;
        // a query without a visible key outputs 0, its log-sum-exp is -inf
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        at::vec::map([inv](Vec x) { return x * Vec(inv); }, O + r * dim, O + r * dim, dim);
        from_float(O + r * dim, out_p + (t * heads + it.head) * dim, dim);
        lse_p[it.head * tq + t] = l[r] > 0.f ? m[r] + std::log(l[r]) : kNegInf;
      }
    });
  });
  return {out, lse};
}

}  // namespace fastvl
