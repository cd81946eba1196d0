"""Public ops: input checks, backend dispatch (triton / reference), autograd, torch.library registration.

``kernel_module(name, *tensors)`` tells which Triton kernel module (or None: the reference) an op runs for
these tensors under the current backend.
"""
from ._dispatch import kernel_module
from .apply_rope_2d import apply_rope_2d
from .deepstack_add import deepstack_add, deepstack_add_
from .deepstack_groups import deepstack_groups, deepstack_index
from .patch_merge import patch_merge
from .spatial_attention_pool import spatial_attention_pool
from .varlen_attention import varlen_attention
from .vision_positions import vision_positions

__all__ = [
    "apply_rope_2d", "deepstack_add", "deepstack_add_", "deepstack_groups", "deepstack_index", "patch_merge",
    "spatial_attention_pool", "varlen_attention", "vision_positions",
]
