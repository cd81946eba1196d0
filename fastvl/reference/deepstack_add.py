"""Reference: DeepStack injection of a stacked token group at the image-token positions."""
import torch


def deepstack_add(hidden: torch.Tensor, index: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """hidden [..., C] with rows ``index`` [K] of its flattened leading dims increased by stacked [K, C]."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    return flat.index_add(0, index, stacked.to(hidden.dtype)).view(hidden.shape)
