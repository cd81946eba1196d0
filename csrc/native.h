// Shared helpers of the native CPU kernels (fastvl._C): fp32 GEMM on ATen's BLAS, dynamic
// scheduling over threads, dtype conversion, the 2D RoPE rotation, and the op entry points.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <atomic>
#include <optional>
#include <tuple>
#include <vector>

namespace fastvl {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;

// c[m, n] = alpha * op(a) @ op(b) + beta * c on row-major fp32 blocks with leading dimensions
// (op transposes when ta / tb). One call of ATen's CPU matmul (MKL/OpenBLAS sgemm): it runs on the
// calling thread inside at::parallel_for and on all threads outside.
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// Runs body(item, thread_scratch) for item in [0, items) on ATen's threads, handing out items one
// at a time (items of unequal cost: segments of different lengths). ``scratch`` floats per thread.
template <typename F>
void parallel_items(int64_t items, int64_t scratch, const F& body) {
  std::atomic<int64_t> next{0};
  int64_t threads = std::min<int64_t>(at::get_num_threads(), items);
  at::parallel_for(0, std::max<int64_t>(threads, 1), 1, [&](int64_t, int64_t) {
    std::vector<float> buffer(scratch);
    for (int64_t item = next++; item < items; item = next++) body(item, buffer.data());
  });
}

// The offsets of a cu_seqlens tensor (int32 on the CPU) as int64.
std::vector<int64_t> offsets(const Tensor& cu);

// at::vec::convert between a tensor dtype and fp32 rows.
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) { at::vec::convert(src, dst, n); }
template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) { at::vec::convert(src, dst, n); }

// The D/4 inverse frequencies f_j = theta^(-4j/D) of the 2D RoPE, in double precision.
std::vector<double> rope_freqs(int64_t dim, double theta);

// cos and sin of the D/2 rotation angles of a token at (row, col): pair i turns by row * f_i for
// i < D/4 and by col * f_(i - D/4) after (``freqs`` from rope_freqs). Double precision angles.
void rope_cos_sin(int64_t row, int64_t col, const std::vector<double>& freqs, float* cos, float* sin);

// y = rotate(x) * mult on one head row (rotate-half pairs (i, i + D/2)); sign -1 rotates back.
inline void rope_rotate(const float* x, float* y, const float* cos, const float* sin, int64_t dim, float sign,
                        float mult) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float c = cos[i] * mult, s = sin[i] * sign * mult, x1 = x[i], x2 = x[i + half];
    y[i] = x1 * c - x2 * s;
    y[i + half] = x2 * c + x1 * s;
  }
}

// x [T, H, D] (any dtype, unit last stride) -> fp32 [H, T, D], rotated by rope_pos when given and
// multiplied by mult: the head-major GEMM operand of the attention kernels.
Tensor pack_heads(const Tensor& x, const std::optional<Tensor>& rope_pos, double theta, float mult);

// src fp32 [G * H, T, D] -> [T, H, D] of dtype: the sum over each run of ``group`` heads, rotated back
// by rope_pos when given, times mult (the attention backward's dq, dk and dv).
Tensor unpack_heads(const Tensor& src, int64_t group, at::ScalarType dtype, const std::optional<Tensor>& rope_pos,
                    double theta, float mult);

// ----- op entry points (argument order and results as the Triton kernels of fastvl.kernels)
Tensor apply_rope_2d(const Tensor& x, const Tensor& pos, double theta, bool inverse);

std::tuple<Tensor, Tensor> varlen_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q,
                                                const Tensor& cu_k, bool causal, double scale,
                                                const std::optional<Tensor>& rope_pos, double theta);
std::tuple<Tensor, Tensor, Tensor> varlen_attention_bwd(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                                        const Tensor& v, const Tensor& out, const Tensor& lse,
                                                        const Tensor& cu_q, const Tensor& cu_k, bool causal,
                                                        double scale, const std::optional<Tensor>& rope_pos,
                                                        double theta);

std::tuple<Tensor, Tensor, Tensor> patch_merge_fwd(const Tensor& x, const Tensor& ln_w,
                                                   const std::optional<Tensor>& ln_b, const Tensor& w1,
                                                   const Tensor& b1, const Tensor& w2, const Tensor& b2,
                                                   int64_t merge_size, double eps, bool rms, bool save);
std::vector<Tensor> patch_merge_bwd(const Tensor& grad, const Tensor& x, const Tensor& ln_w,
                                    const std::optional<Tensor>& ln_b, const Tensor& w1, const Tensor& w2,
                                    const Tensor& pre, const Tensor& act, int64_t merge_size, double eps, bool rms);

std::tuple<Tensor, Tensor> sap_fwd(const Tensor& x, const Tensor& grid_hw, const Tensor& w1, const Tensor& b1,
                                   const Tensor& w2, const Tensor& b2, int64_t window, int64_t num_windows);
std::vector<Tensor> sap_bwd(const Tensor& grad, const Tensor& x, const Tensor& grid_hw, const Tensor& w1,
                            const Tensor& b1, const Tensor& w2, int64_t window, int64_t num_windows,
                            const Tensor& scores, bool need_dx);

void deepstack_add_(Tensor& hidden, const Tensor& index, const Tensor& stacked);

}  // namespace fastvl
