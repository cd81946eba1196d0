#include "native.h"

#include <limits>

#ifdef FASTVL_BLAS_SGEMM
// The Fortran sgemm of the BLAS linked into libtorch_cpu (MKL on x86 wheels): column-major.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);
#endif

namespace fastvl {

namespace {
#ifndef FASTVL_BLAS_SGEMM
// A row-major [rows, cols] block with leading dimension ld, or its transpose, as a tensor view.
Tensor view(const float* p, bool transposed, int64_t rows, int64_t cols, int64_t ld) {
  auto options = at::TensorOptions().dtype(at::kFloat);
  if (transposed) return at::from_blob(const_cast<float*>(p), {rows, cols}, {1, ld}, options);
  return at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, options);
}
#endif
}  // namespace

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
#ifdef FASTVL_BLAS_SGEMM
  // straight to the BLAS: the kernels' blocks are small, and a call through at::addmm costs several
  // microseconds of tensor views and dispatch. Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(m <= kMax && n <= kMax && k <= kMax && lda <= kMax && ldb <= kMax && ldc <= kMax,
              "fastvl gemm: sizes beyond the BLAS's int range");
  const char trans_b = tb ? 'T' : 'N', trans_a = ta ? 'T' : 'N';
  const int M = int(n), N = int(m), K = int(k), LDB = int(ldb), LDA = int(lda), LDC = int(ldc);
  sgemm_(&trans_b, &trans_a, &M, &N, &K, &alpha, b, &LDB, a, &LDA, &beta, c, &LDC);
#else
  Tensor out = view(c, false, m, n, ldc);
  if (k == 0) {
    beta == 0.f ? out.zero_() : out.mul_(beta);
    return;
  }
  at::addmm_out(out, out, view(a, ta, m, k, lda), view(b, tb, k, n, ldb), beta, alpha);
#endif
}

std::vector<int64_t> offsets(const Tensor& cu) {
  Tensor c = cu.to(at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

}  // namespace fastvl
