"""fastvl: fused Triton kernels and model code for fast small vision-language models."""
from . import layout, ops
from ._backend import FallbackWarning, get_backend, set_backend, use_backend
from .integrations import patch, unpatch  # transformers is imported on first use
from .ops import *  # noqa: F403  (the public ops, listed once in ops.__all__)

__version__ = "0.1.0"
__all__ = ["FallbackWarning", "get_backend", "patch", "set_backend", "unpatch", "use_backend", *ops.__all__]
