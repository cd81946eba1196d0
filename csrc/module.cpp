// fastvl._C: the native CPU kernels, called by fastvl/_native.py behind the torch.library ops.
#include <torch/extension.h>

#include "native.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastvl native CPU kernels (ATen BLAS, at::vec, at::parallel_for)";
  m.def("apply_rope_2d", &fastvl::apply_rope_2d);
  m.def("varlen_attention_fwd", &fastvl::varlen_attention_fwd);
  m.def("varlen_attention_bwd", &fastvl::varlen_attention_bwd);
  m.def("patch_merge_fwd", &fastvl::patch_merge_fwd);
  m.def("patch_merge_bwd", &fastvl::patch_merge_bwd);
  m.def("sap_fwd", &fastvl::sap_fwd);
  m.def("sap_bwd", &fastvl::sap_bwd);
  m.def("deepstack_add_", [](at::Tensor hidden, const at::Tensor& index, const at::Tensor& stacked) {
    fastvl::deepstack_add_(hidden, index, stacked);
  });
  m.def("isa", [] { return std::string(C10_STRINGIZE(CPU_CAPABILITY)); });
}
