// Shared by the attention forward and backward: the work items and the softmax row helpers.
#pragma once

#include "native.h"

#include <cmath>
#include <limits>

namespace fastvl::attention {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One query block of one segment for one query head.
struct Item {
  int64_t head, segment, q0, q1;
};

// Items head-major (a thread's run of items spans every segment), blocks of ``block`` queries.
inline std::vector<Item> items(int64_t heads, const std::vector<int64_t>& cu_q, int64_t block) {
  std::vector<Item> found;
  for (int64_t h = 0; h < heads; ++h)
    for (size_t b = 0; b + 1 < cu_q.size(); ++b)
      for (int64_t q0 = 0; q0 < cu_q[b + 1] - cu_q[b]; q0 += block)
        found.push_back({h, int64_t(b), q0, std::min(q0 + block, cu_q[b + 1] - cu_q[b])});
  return found;
}

// Keys [0, n) a query row sees: all, or with bottom-right causal masking those c <= r + shift.
inline int64_t visible(bool causal, int64_t row, int64_t shift, int64_t keys) {
  return causal ? std::max<int64_t>(0, std::min(keys, row + shift + 1)) : keys;
}

inline float row_max(const float* s, int64_t n) {
  return at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, s, n);
}

// s[i] <- exp(s[i] - shift) for i < n, 0 for n <= i < width; returns the sum.
inline float exp_row(float* s, int64_t n, int64_t width, float shift) {
  const Vec vshift(shift);
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec e = (Vec::loadu(s + i) - vshift).exp_u20();
    e.store(s + i);
    acc = acc + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; i < n; ++i) sum += (s[i] = std::exp(s[i] - shift));
  for (; i < width; ++i) s[i] = 0.f;
  return sum;
}

}  // namespace fastvl::attention
