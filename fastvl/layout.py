"""Packed layouts built on the host: segment offsets, and the per-forward layout of a vision pack.

A Qwen2-VL-style vision tower runs all its images as one packed sequence. Its layout (every token's
(row, col), one attention segment per frame, and for Qwen2.5-VL the window segments and window order) is
computed once per forward from ``grid_thw`` on the host and shipped to the device in one copy, so the
blocks reuse device tensors and host ints: no per-layer host syncs.
"""
import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import vision_positions


def host_side(fn):
    """``torch.compiler.disable`` for host-side work (torch.compile runs it as is), without importing
    torch._dynamo when the module is imported or in eager calls: that import takes seconds, and a
    compiled caller has it loaded already."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)
    return run


def cu_seqlens(lengths, device=None) -> Tensor:
    """int32 offsets [B+1] (0 first) of segment ``lengths`` (a sequence or a 1-D integer tensor), summed in int64."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64).reshape(-1)
    return F.pad(lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)


def to_device(device, *tensors):
    """The CPU integer ``tensors`` on ``device``, same shapes and dtypes.

    On CUDA they travel as one pinned, asynchronous copy: no stream synchronisation.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return tensors
    flat = torch.cat([t.reshape(-1).to(torch.int64) for t in tensors])
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return tuple(out)


class VisionLayout(NamedTuple):
    """How a packed batch of images runs through a vision tower; built once per forward."""

    positions: Tensor  # [T, 2] int32 (row, col) of each token, in the tower's token order
    cu_seqlens: Tensor  # int32 [frames + 1]: one attention segment per image frame
    max_seqlen: int
    cu_window_seqlens: Optional[Tensor] = None  # int32: Qwen2.5-VL's window segments
    max_window_seqlen: Optional[int] = None
    window_index: Optional[Tensor] = None  # window order of the merge groups (m*m consecutive tokens)
    reverse_index: Optional[Tensor] = None  # its inverse: merge groups back to image order


@host_side
def vision_layout(grid_thw, merge_size, window=None, device=None) -> VisionLayout:
    """The layout of ``grid_thw`` [N, 3] (t, h, w patches per image; checked like ``vision_positions``).

    ``window``: merged tokens per window side for Qwen2.5-VL window attention (the token order then
    follows the windows), None for Qwen2-VL. Reads ``grid_thw`` once (the only host sync of a forward)
    and ships the result to ``device`` (default: grid_thw's) in one copy.
    """
    device = grid_thw.device if device is None else device
    grid = grid_thw.to("cpu", torch.int64)
    positions = vision_positions(grid, merge_size)
    frames = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0])
    max_seqlen = int(frames.max()) if frames.numel() else 0
    if window is None:
        return VisionLayout(*to_device(device, positions, cu_seqlens(frames)), max_seqlen)
    unit = merge_size * merge_size
    order, lengths = window_order(grid, merge_size, window)
    positions = positions.view(-1, unit, 2)[order].view(-1, 2)
    max_window = int(lengths.max()) * unit if lengths.numel() else 0
    positions, cu, cu_windows, order, reverse = to_device(
        device, positions, cu_seqlens(frames), cu_seqlens(lengths * unit), order, torch.argsort(order)
    )
    return VisionLayout(positions, cu, max_seqlen, cu_windows, max_window, order, reverse)


def window_order(grid, merge_size, window):
    """Merge groups in Qwen2.5-VL window order: per frame, windows of window x window merged tokens tile the
    merged grid row-major (edge windows are partial), tokens row-major inside a window.

    Returns (order [groups], groups per window [windows]).
    """
    orders, lengths, offset = [], [], 0
    for t, h, w in grid.tolist():
        h, w = h // merge_size, w // merge_size
        rows, cols = -(-h // window), -(-w // window)
        index = torch.arange(t * h * w).view(t, h, w)
        index = F.pad(index, (0, cols * window - w, 0, rows * window - h), value=-1)
        index = index.view(t, rows, window, cols, window).transpose(2, 3).reshape(-1, window * window)
        valid = index >= 0
        orders.append(index[valid] + offset)
        lengths.append(valid.sum(1))
        offset += t * h * w
    if not orders:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return torch.cat(orders), torch.cat(lengths)
