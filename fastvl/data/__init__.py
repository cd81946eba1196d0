"""Data: image processing (native and fixed resolution), conversation templates, LLaVA datasets, collator."""
from .conversation import (
    IGNORE_INDEX, QUERY_TOKEN, TEMPLATES, add_template_tokens, format_conversation, image_token_counts,
    tokenize_conversation,
)
from .dataset import CAUSES, Collator, LlavaDataset, MissingImageError, SampleError
from .image import CLIP_MEAN, CLIP_STD, FixedResolutionProcessor, NativeResolutionProcessor, smart_resize

__all__ = [
    "CAUSES", "CLIP_MEAN", "CLIP_STD", "Collator", "FixedResolutionProcessor", "IGNORE_INDEX", "LlavaDataset",
    "MissingImageError", "NativeResolutionProcessor", "QUERY_TOKEN", "SampleError", "TEMPLATES",
    "add_template_tokens", "format_conversation", "image_token_counts", "smart_resize", "tokenize_conversation",
]
