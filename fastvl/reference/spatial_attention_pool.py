"""Reference: FlashSloth's spatial attention pooling (SAP) over packed images of any grid."""
import torch
import torch.nn.functional as F


def sap_window_index(grid_hw: torch.Tensor, window: int = 3, device=None) -> tuple[torch.Tensor, int]:
    """Output window of every token (images in order, row-major tokens and windows) and the window count."""
    ids, offset = [], 0
    for h, w in grid_hw.tolist():
        nw = -(-w // window)
        rows = torch.arange(h, device=device) // window
        cols = torch.arange(w, device=device) // window
        ids.append((rows[:, None] * nw + cols[None, :]).reshape(-1) + offset)
        offset += -(-h // window) * nw
    if not ids:
        return torch.zeros(0, dtype=torch.long, device=device), 0
    return torch.cat(ids), offset


def sap_scores(x, w1, b1, w2, b2):
    """Per-token score s = W2 relu(W1 x + b1) + b2, shape [T]."""
    return F.linear(F.relu(F.linear(x, w1, b1)), w2, b2).squeeze(-1)


def spatial_attention_pool(x, grid_hw, w1, b1, w2, b2, window=3):
    """x [T, C] (row-major tokens of images with grids grid_hw [N, 2]) -> [num_windows, C].

    Each output token is the softmax(score)-weighted sum of the raw features of one window x window
    block; edge blocks of grids not divisible by the window pool over the tokens they have.
    """
    return sap_pool(x, sap_scores(x, w1, b1, w2, b2), grid_hw, window)


def sap_pool(x, scores, grid_hw, window=3):
    """The pooling half of SAP: softmax of ``scores`` [T] within each window, weighted sum of x's rows."""
    idx, n = sap_window_index(grid_hw, window, x.device)
    compute = torch.promote_types(x.dtype, torch.float32)
    s = scores.to(compute)
    # the shift only stabilises exp; softmax does not depend on it
    peak = torch.full((n,), float("-inf"), dtype=compute, device=x.device).scatter_reduce(0, idx, s.detach(), "amax")
    e = torch.exp(s - peak[idx])
    denom = torch.zeros(n, dtype=compute, device=x.device).index_add(0, idx, e)
    weights = e / denom[idx]
    out = torch.zeros(n, x.shape[-1], dtype=compute, device=x.device).index_add(0, idx, weights[:, None] * x.to(compute))
    return out.to(x.dtype)
