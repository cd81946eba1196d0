#include "native.h"

namespace fastvl {

namespace {
// A row-major [rows, cols] block with leading dimension ld, or its transpose, as a tensor view.
Tensor view(const float* p, bool transposed, int64_t rows, int64_t cols, int64_t ld) {
  auto options = at::TensorOptions().dtype(at::kFloat);
  if (transposed) return at::from_blob(const_cast<float*>(p), {rows, cols}, {1, ld}, options);
  return at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, options);
}
}  // namespace

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  Tensor out = view(c, false, m, n, ldc);
  if (k == 0) {
    beta == 0.f ? out.zero_() : out.mul_(beta);
    return;
  }
  at::addmm_out(out, out, view(a, ta, m, k, lda), view(b, tb, k, n, ldb), beta, alpha);
}

std::vector<int64_t> offsets(const Tensor& cu) {
  Tensor c = cu.to(at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

}  // namespace fastvl
