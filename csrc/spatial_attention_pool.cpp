// spatial_attention_pool: the score MLP w2 . relu(x w1^T + b1) per block of tokens (GEMM on ATen's
// BLAS into a per-thread block, ReLU and the dot with w2 on it: [T, Hid] is never written), then
// softmax and weighted sum per window in one pass. The backward recomputes the block GEMM for the
// ReLU mask and writes dH once for the two weight/input GEMMs.
#include "native.h"

namespace fastvl {

namespace {
constexpr int64_t kBlockT = 64;

inline Tensor f32(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

struct Window {
  int64_t base, width, r0, r1, c0, c1;  // image's first token and width; rows [r0, r1), cols [c0, c1)
  template <typename F>
  void each(const F& fn) const {  // fn(token, slot) over the window's tokens
    int64_t slot = 0;
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = c0; c < c1; ++c) fn(base + r * width + c, slot++);
  }
};

std::vector<Window> windows(const Tensor& grid_hw, int64_t window) {
  const Tensor g = grid_hw.to(at::kLong).contiguous();
  const int64_t* gp = g.data_ptr<int64_t>();
  std::vector<Window> found;
  int64_t base = 0;
  for (int64_t i = 0; i < g.size(0); ++i) {
    const int64_t h = gp[2 * i], w = gp[2 * i + 1];
    for (int64_t r = 0; r < h; r += window)
      for (int64_t c = 0; c < w; c += window)
        found.push_back({base, w, r, std::min(r + window, h), c, std::min(c + window, w)});
    base += h * w;
  }
  return found;
}

// h = x[t0:t0+n] w1^T + b1 into block [n, hid] (fp32); x fp32 [T, C]
void hidden_block(const Tensor& xf, const Tensor& w1, const float* b1, int64_t t0, int64_t n, float* block) {
  const int64_t hid = w1.size(0), channels = xf.size(1);
  for (int64_t r = 0; r < n; ++r) std::copy(b1, b1 + hid, block + r * hid);
  gemm(false, true, n, hid, channels, 1.f, xf.data_ptr<float>() + t0 * channels, channels, w1.data_ptr<float>(),
       channels, 1.f, block, hid);
}
}  // namespace

std::tuple<Tensor, Tensor> sap_fwd(const Tensor& x, const Tensor& grid_hw, const Tensor& w1_, const Tensor& b1_,
                                   const Tensor& w2_, const Tensor& b2_, int64_t window, int64_t num_windows) {
  const int64_t tokens = x.size(0), channels = x.size(1);
  const Tensor xf = f32(x), w1 = f32(w1_), b1 = f32(b1_), w2 = f32(w2_);
  const int64_t hid = w1.size(0);
  const float b2 = tokens ? f32(b2_).item<float>() : 0.f;
  Tensor scores = at::empty({tokens}, xf.options());
  float* sp = scores.data_ptr<float>();
  parallel_items((tokens + kBlockT - 1) / kBlockT, kBlockT * hid, [&](int64_t i, float* block) {
    const int64_t t0 = i * kBlockT, n = std::min(kBlockT, tokens - t0);
    hidden_block(xf, w1, b1.data_ptr<float>(), t0, n, block);
    for (int64_t r = 0; r < n; ++r)
      sp[t0 + r] = b2 + at::vec::map2_reduce_all<float>(
                            [](Vec h, Vec w) { return at::vec::maximum(h, Vec(0.f)) * w; },
                            [](Vec& a, Vec& b) { return a + b; }, block + r * hid, w2.data_ptr<float>(), hid);
  });
  const auto wins = windows(grid_hw, window);
  Tensor out = at::empty({num_windows, channels}, xf.options());
  float* op = out.data_ptr<float>();
  const float* xp = xf.data_ptr<float>();
  at::parallel_for(0, int64_t(wins.size()), 8, [&](int64_t begin, int64_t end) {
    std::vector<float> e(window * window);
    for (int64_t i = begin; i < end; ++i) {
      float peak = -std::numeric_limits<float>::infinity(), total = 0.f;
      wins[i].each([&](int64_t t, int64_t) { peak = std::max(peak, sp[t]); });
      wins[i].each([&](int64_t t, int64_t s) { total += (e[s] = std::exp(sp[t] - peak)); });
      float* o = op + i * channels;
      std::fill(o, o + channels, 0.f);
      wins[i].each([&](int64_t t, int64_t s) {
        const Vec weight(e[s] / total);
        at::vec::map2([weight](Vec acc, Vec v) { return acc + weight * v; }, o, o, xp + t * channels, channels);
      });
    }
  });
  return {out.to(x.scalar_type()), scores};
}

std::vector<Tensor> sap_bwd(const Tensor& grad_, const Tensor& x, const Tensor& grid_hw, const Tensor& w1_,
                            const Tensor& b1_, const Tensor& w2_, int64_t window, int64_t num_windows,
                            const Tensor& scores_, bool need_dx) {
  const int64_t tokens = x.size(0), channels = x.size(1);
  const Tensor xf = f32(x), w1 = f32(w1_), b1 = f32(b1_), w2 = f32(w2_), grad = f32(grad_), scores = f32(scores_);
  const int64_t hid = w1.size(0);
  const float *xp = xf.data_ptr<float>(), *gp = grad.data_ptr<float>(), *sp = scores.data_ptr<float>();
  // pooling: dx_t = w_t dout, dscore_t = w_t (dout . x_t - sum_s w_s dout . x_s)
  Tensor dx = need_dx ? at::empty({tokens, channels}, xf.options()) : Tensor();
  Tensor dscore = at::empty({tokens}, xf.options());
  float* dsp = dscore.data_ptr<float>();
  const auto wins = windows(grid_hw, window);
  at::parallel_for(0, int64_t(wins.size()), 8, [&](int64_t begin, int64_t end) {
    std::vector<float> e(window * window), dot(window * window);
    for (int64_t i = begin; i < end; ++i) {
      const float* g = gp + i * channels;
      float peak = -std::numeric_limits<float>::infinity(), total = 0.f, mean = 0.f;
      wins[i].each([&](int64_t t, int64_t) { peak = std::max(peak, sp[t]); });
      wins[i].each([&](int64_t t, int64_t s) { total += (e[s] = std::exp(sp[t] - peak)); });
      wins[i].each([&](int64_t t, int64_t s) {
        e[s] /= total;
        dot[s] = at::vec::map2_reduce_all<float>([](Vec a, Vec b) { return a * b; },
                                                 [](Vec& a, Vec& b) { return a + b; }, g, xp + t * channels, channels);
        mean += e[s] * dot[s];
        if (need_dx) {
          const Vec weight(e[s]);
          at::vec::map([weight](Vec v) { return v * weight; }, dx.data_ptr<float>() + t * channels, g, channels);
        }
      });
      wins[i].each([&](int64_t t, int64_t s) { dsp[t] = e[s] * (dot[s] - mean); });
    }
  });
  // score MLP: dH = dscore w2 (H > 0), recomputing H per block; dw2 and db1 from per-thread partials
  Tensor dh = at::empty({tokens, hid}, xf.options());
  const int64_t blocks = (tokens + kBlockT - 1) / kBlockT;
  Tensor partial = at::zeros({blocks, 2, hid}, xf.options());  // dw2 | db1 per block
  float* dhp = dh.data_ptr<float>();
  const float* w2p = w2.data_ptr<float>();
  parallel_items(blocks, 0, [&](int64_t i, float*) {
    const int64_t t0 = i * kBlockT, n = std::min(kBlockT, tokens - t0);
    float* block = dhp + t0 * hid;
    hidden_block(xf, w1, b1.data_ptr<float>(), t0, n, block);
    float *dw2 = partial.data_ptr<float>() + i * 2 * hid, *db1 = dw2 + hid;
    for (int64_t r = 0; r < n; ++r) {
      float* h = block + r * hid;
      const float ds = dsp[t0 + r];
      for (int64_t j = 0; j < hid; ++j) {
        const bool on = h[j] > 0.f;
        dw2[j] += on ? ds * h[j] : 0.f;
        h[j] = on ? ds * w2p[j] : 0.f;
        db1[j] += h[j];
      }
    }
  });
  Tensor sums = partial.sum(0);
  Tensor dw1 = at::mm(dh.t(), xf);
  if (need_dx) dx.addmm_(dh, w1);
  const auto dtype = x.scalar_type();
  // outputs must not alias: the rows of sums are copied
  return {need_dx ? dx.to(dtype) : x.new_empty({0}), dw1.to(dtype), sums[1].to(dtype, false, true),
          sums[0].view_as(w2_).to(dtype, false, true), at::zeros({1}, x.options())};
}

}  // namespace fastvl
