// patch_merge: one pass normalises x into the merged fp32 GEMM operand [T / mm, mm * C] (the merge
// is a view of consecutive tokens), fc1 and fc2 run on ATen's BLAS with their biases in the GEMM
// (addmm), GELU in place. The backward fuses GELU' into dz and recomputes the operand (and its stats).
#include "native.h"

#include <cmath>

namespace fastvl {

namespace {
inline Tensor f32(const Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

// y[t] = norm(x[t]) (fp32, [T, C] contiguous), stats [2, T] = (mean or 0, rstd)
template <typename T>
void normalise(const Tensor& x, const Tensor& ln_w, const std::optional<Tensor>& ln_b, double eps, bool rms,
               float* y, float* stats, bool have_stats) {
  const int64_t tokens = x.size(0), channels = x.size(1), stride = x.stride(0);
  const T* xp = x.data_ptr<T>();
  const Tensor w = f32(ln_w).contiguous(), b = ln_b ? f32(*ln_b).contiguous() : Tensor();
  const float *wp = w.data_ptr<float>(), *bp = b.defined() ? b.data_ptr<float>() : nullptr;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* row = y + t * channels;
      to_float(xp + t * stride, row, channels);
      float mean = 0.f, rstd;
      if (have_stats) {
        mean = stats[t], rstd = stats[tokens + t];
      } else {
        if (!rms) mean = at::vec::reduce_all<float>([](Vec& a, Vec& c) { return a + c; }, row, channels) / channels;
        const float var = at::vec::map_reduce_all<float>(
            [mean](Vec v) { return (v - Vec(mean)) * (v - Vec(mean)); }, [](Vec& a, Vec& c) { return a + c; }, row,
            channels) / channels;
        rstd = 1.f / std::sqrt(var + float(eps));
        stats[t] = mean, stats[tokens + t] = rstd;
      }
      for (int64_t c = 0; c < channels; ++c) row[c] = (row[c] - mean) * rstd * wp[c] + (bp ? bp[c] : 0.f);
    }
  });
}

Tensor normalised(const Tensor& x, const Tensor& ln_w, const std::optional<Tensor>& ln_b, double eps, bool rms,
                  Tensor& stats, bool have_stats) {
  Tensor y = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "patch_merge_norm", [&] {
    normalise<scalar_t>(x, ln_w, ln_b, eps, rms, y.data_ptr<float>(), stats.data_ptr<float>(), have_stats);
  });
  return y;
}

constexpr float kSqrt1_2 = 0.70710678118654752f, kInvSqrt2Pi = 0.39894228040143268f;

Vec gelu(Vec z) { return Vec(0.5f) * z * (Vec(1.f) + (z * Vec(kSqrt1_2)).erf()); }
Vec gelu_grad(Vec z) {
  return Vec(0.5f) * (Vec(1.f) + (z * Vec(kSqrt1_2)).erf()) + z * Vec(kInvSqrt2Pi) * (Vec(-0.5f) * z * z).exp();
}

template <typename F>
void elementwise(Tensor& out, const Tensor& in, const F& fn) {  // fp32, contiguous, parallel
  float* o = out.data_ptr<float>();
  const float* i = in.data_ptr<float>();
  at::parallel_for(0, in.numel(), 4096, [&](int64_t begin, int64_t end) {
    at::vec::map(fn, o + begin, i + begin, end - begin);
  });
}
}  // namespace

std::tuple<Tensor, Tensor, Tensor> patch_merge_fwd(const Tensor& x, const Tensor& ln_w,
                                                   const std::optional<Tensor>& ln_b, const Tensor& w1,
                                                   const Tensor& b1, const Tensor& w2, const Tensor& b2,
                                                   int64_t merge_size, double eps, bool rms, bool save) {
  const int64_t tokens = x.size(0), channels = x.size(1), rows = tokens / (merge_size * merge_size);
  Tensor stats = at::empty({2, tokens}, x.options().dtype(at::kFloat));
  Tensor y = normalised(x, ln_w, ln_b, eps, rms, stats, false).view({rows, -1});
  Tensor z = at::addmm(f32(b1), y, f32(w1).t());
  Tensor act = save ? at::empty_like(z) : z;
  elementwise(act, z, gelu);
  Tensor out = at::addmm(f32(b2), act, f32(w2).t()).to(x.scalar_type());
  if (!save) {
    return {out, x.new_empty({0}), x.new_empty({0})};
  }
  return {out, z.to(x.scalar_type()), act.to(x.scalar_type())};
}

std::vector<Tensor> patch_merge_bwd(const Tensor& grad_, const Tensor& x, const Tensor& ln_w,
                                    const std::optional<Tensor>& ln_b, const Tensor& w1, const Tensor& w2,
                                    const Tensor& pre, const Tensor& act, int64_t merge_size, double eps, bool rms) {
  const int64_t tokens = x.size(0), channels = x.size(1), rows = tokens / (merge_size * merge_size);
  const Tensor grad = f32(grad_), a = f32(act);
  Tensor stats = at::empty({2, tokens}, x.options().dtype(at::kFloat));
  Tensor dw2 = at::mm(grad.t(), a), db2 = grad.sum(0);
  Tensor dz = at::mm(grad, f32(w2));
  const Tensor z = f32(pre).contiguous();
  at::parallel_for(0, dz.numel(), 4096, [&](int64_t begin, int64_t end) {
    at::vec::map2([](Vec g, Vec zz) { return g * gelu_grad(zz); }, dz.data_ptr<float>() + begin,
                  dz.data_ptr<float>() + begin, z.data_ptr<float>() + begin, end - begin);
  });
  Tensor y = normalised(x, ln_w, ln_b, eps, rms, stats, false).view({rows, -1});
  Tensor dw1 = at::mm(dz.t(), y), db1 = dz.sum(0);
  Tensor dn = at::mm(dz, f32(w1)).view({tokens, channels});  // gradient of the normalised tokens
  // norm backward per token from xhat = (y - b) / w and the stats; dln_w, dln_b by per-thread partials
  const Tensor w = f32(ln_w).contiguous(), b = ln_b ? f32(*ln_b).contiguous() : Tensor();
  const int64_t threads = at::get_num_threads();
  Tensor partial = at::zeros({threads, 2, channels}, dn.options());
  Tensor dx = at::empty({tokens, channels}, dn.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "patch_merge_norm_bwd", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t stride = x.stride(0);
    const float *wp = w.data_ptr<float>(), *sp = stats.data_ptr<float>(), *dnp = dn.data_ptr<float>();
    float* dxp = dx.data_ptr<float>();
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      float* acc = partial.data_ptr<float>() + at::get_thread_num() * 2 * channels;  // dln_w | dln_b
      std::vector<float> xhat(channels), g(channels);
      for (int64_t t = begin; t < end; ++t) {
        const float mean = sp[t], rstd = sp[tokens + t];
        const float* d = dnp + t * channels;
        to_float(xp + t * stride, xhat.data(), channels);
        float sum_g = 0.f, sum_gx = 0.f;
        for (int64_t c = 0; c < channels; ++c) {
          xhat[c] = (xhat[c] - mean) * rstd;
          g[c] = d[c] * wp[c];
          sum_g += g[c], sum_gx += g[c] * xhat[c];
          acc[c] += d[c] * xhat[c];
          acc[channels + c] += d[c];
        }
        const float mg = rms ? 0.f : sum_g / channels, mgx = sum_gx / channels;
        for (int64_t c = 0; c < channels; ++c) dxp[t * channels + c] = rstd * (g[c] - mg - xhat[c] * mgx);
      }
    });
  });
  Tensor sums = partial.sum(0);
  const auto dtype = x.scalar_type();
  // outputs must not alias: the rows of sums are copied
  return {dx.to(dtype), sums[0].to(dtype, false, true), ln_b ? sums[1].to(dtype, false, true) : x.new_empty({0}),
          dw1.to(dtype), db1.to(dtype), dw2.to(dtype), db2.to(dtype)};
}

}  // namespace fastvl
