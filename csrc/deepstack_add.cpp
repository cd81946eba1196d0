// deepstack_add: hidden[index] += stacked in place over the rows of hidden's flattened leading dims.
#include "native.h"

namespace fastvl {

namespace {
template <typename T>
void add_rows(T* rows, int64_t row_stride, const int64_t* index, const T* stacked, int64_t stacked_stride,
              int64_t count, int64_t channels) {
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* h = rows + index[i] * row_stride;
      const T* s = stacked + i * stacked_stride;
      for (int64_t c = 0; c < channels; ++c) h[c] = T(float(h[c]) + float(s[c]));  // fp32 sum, as the reference
    }
  });
}
}  // namespace

void deepstack_add_(Tensor& hidden, const Tensor& index_, const Tensor& stacked_) {
  const int64_t channels = hidden.size(-1);
  if (!hidden.is_contiguous()) {  // a copy whose rows one stride spans, written back
    Tensor copy = hidden.contiguous();
    deepstack_add_(copy, index_, stacked_);
    hidden.copy_(copy);
    return;
  }
  const Tensor index = index_.to(at::kLong).contiguous(), stacked = stacked_.stride(-1) == 1 ? stacked_ : stacked_.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "deepstack_add", [&] {
    add_rows<scalar_t>(hidden.data_ptr<scalar_t>(), channels, index.data_ptr<int64_t>(), stacked.data_ptr<scalar_t>(),
                       stacked.stride(0), index.numel(), channels);
  });
}

}  // namespace fastvl
