// apply_rope_2d, and the rotated head-major packing the attention kernels share.
#include "native.h"

#include <cmath>

namespace fastvl {

std::vector<double> rope_freqs(int64_t dim, double theta) {
  std::vector<double> freqs(dim / 4);
  for (int64_t j = 0; j < dim / 4; ++j) freqs[j] = std::pow(theta, -4.0 * j / dim);
  return freqs;
}

void rope_cos_sin(int64_t row, int64_t col, const std::vector<double>& freqs, float* cos, float* sin) {
  const int64_t quarter = freqs.size();
  for (int64_t j = 0; j < quarter; ++j) {
    const double a = row * freqs[j], b = col * freqs[j];
    cos[j] = std::cos(a), sin[j] = std::sin(a);
    cos[j + quarter] = std::cos(b), sin[j + quarter] = std::sin(b);
  }
}

namespace {
// out[t * out_token + h * out_head + d] = rotate(x[t, h]) * mult, O fp32 or x's dtype.
template <typename T, typename O>
void rotate_tokens(const Tensor& x, const Tensor& pos, double theta, float sign, float mult, O* out,
                   int64_t out_token, int64_t out_head) {
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2);
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
  const T* xp = x.data_ptr<T>();
  const int32_t* pp = pos.defined() ? pos.data_ptr<int32_t>() : nullptr;
  const int64_t sp0 = pos.defined() ? pos.stride(0) : 0, sp1 = pos.defined() ? pos.stride(1) : 0;
  const auto freqs = rope_freqs(dim, theta);
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(dim), rotated(dim), cs(dim);  // cs: cos | sin
    for (int64_t t = begin; t < end; ++t) {
      if (pp) rope_cos_sin(pp[t * sp0], pp[t * sp0 + sp1], freqs, cs.data(), cs.data() + dim / 2);
      for (int64_t h = 0; h < heads; ++h) {
        to_float(xp + t * sx0 + h * sx1, row.data(), dim);
        if (pp) {
          rope_rotate(row.data(), rotated.data(), cs.data(), cs.data() + dim / 2, dim, sign, mult);
        } else {
          for (int64_t d = 0; d < dim; ++d) rotated[d] = row[d] * mult;
        }
        from_float(rotated.data(), out + t * out_token + h * out_head, dim);
      }
    }
  });
}

Tensor unit_last_stride(const Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }
}  // namespace

Tensor pack_heads(const Tensor& x_, const std::optional<Tensor>& rope_pos, double theta, float mult) {
  Tensor x = unit_last_stride(x_);
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2);
  Tensor out = at::empty({heads, tokens, dim}, x.options().dtype(at::kFloat));
  Tensor pos = rope_pos ? *rope_pos : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "pack_heads", [&] {
    rotate_tokens<scalar_t, float>(x, pos, theta, 1.f, mult, out.data_ptr<float>(), dim, tokens * dim);
  });
  return out;
}

Tensor unpack_heads(const Tensor& src, int64_t group, at::ScalarType dtype, const std::optional<Tensor>& rope_pos,
                    double theta, float mult) {
  const int64_t heads = src.size(0) / group, tokens = src.size(1), dim = src.size(2);
  Tensor out = at::empty({tokens, heads, dim}, src.options().dtype(dtype));
  const float* sp = src.data_ptr<float>();
  const int32_t* pp = rope_pos ? rope_pos->data_ptr<int32_t>() : nullptr;
  const int64_t sp0 = rope_pos ? rope_pos->stride(0) : 0, sp1 = rope_pos ? rope_pos->stride(1) : 0;
  const auto freqs = rope_freqs(dim, theta);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "unpack_heads", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> row(dim), rotated(dim), cs(dim);
      for (int64_t t = begin; t < end; ++t) {
        if (pp) rope_cos_sin(pp[t * sp0], pp[t * sp0 + sp1], freqs, cs.data(), cs.data() + dim / 2);
        for (int64_t h = 0; h < heads; ++h) {
          const float* first = sp + (h * group * tokens + t) * dim;
          for (int64_t d = 0; d < dim; ++d) row[d] = first[d];
          for (int64_t g = 1; g < group; ++g) {
            const float* other = first + g * tokens * dim;
            for (int64_t d = 0; d < dim; ++d) row[d] += other[d];
          }
          if (pp) {
            rope_rotate(row.data(), rotated.data(), cs.data(), cs.data() + dim / 2, dim, -1.f, mult);
          } else {
            for (int64_t d = 0; d < dim; ++d) rotated[d] = row[d] * mult;
          }
          from_float(rotated.data(), op + (t * heads + h) * dim, dim);
        }
      }
    });
  });
  return out;
}

Tensor apply_rope_2d(const Tensor& x_, const Tensor& pos, double theta, bool inverse) {
  Tensor x = unit_last_stride(x_);
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2);
  Tensor y = at::empty({tokens, heads, dim}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "apply_rope_2d", [&] {
    rotate_tokens<scalar_t, scalar_t>(x, pos, theta, inverse ? -1.f : 1.f, 1.f, y.data_ptr<scalar_t>(), heads * dim, dim);
  });
  return y;
}

}  // namespace fastvl
