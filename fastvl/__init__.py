"""fastvl: fused Triton kernels and model code for fast small vision-language models."""
from ._backend import FallbackWarning, get_backend, set_backend, use_backend
from .integrations import patch, unpatch  # transformers is imported on first use
from .ops import (
    apply_rope_2d, deepstack_add, deepstack_add_, deepstack_groups, deepstack_index, patch_merge, spatial_attention_pool,
    varlen_attention, vision_positions,
)

__version__ = "0.1.0"
__all__ = [
    "FallbackWarning", "apply_rope_2d", "deepstack_add", "deepstack_add_", "deepstack_groups", "deepstack_index", "get_backend",
    "patch", "patch_merge", "set_backend", "spatial_attention_pool", "unpatch", "use_backend", "varlen_attention",
    "vision_positions",
]
