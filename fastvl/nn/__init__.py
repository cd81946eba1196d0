"""nn.Module wrappers over the public ops, with parameter names that load the original checkpoints."""
from .modules import DeepStack, PatchMerger, SpatialAttentionPool, VisionAttention

__all__ = ["DeepStack", "PatchMerger", "SpatialAttentionPool", "VisionAttention"]
