"""Where the samples of a language-model batch lie: one per row (padded batches) or several packed into one row.

A packed batch is what ``transformers.DataCollatorWithFlattening`` gives: ``input_ids``/``labels`` [1, ΣL] and
``position_ids`` restarting at 0 for each sample, optionally with its ``cu_seq_lens_q``/``cu_seq_lens_k``
offsets. Read once per forward on the host.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..layout import cu_seqlens


class Samples(NamedTuple):
    """``spans``: (row, start, end) of each non-empty sample's tokens in [B, L]; ``cu``: a packed batch's int32
    offsets [S+1] on the host (None: one sample per row); ``longest``: the longest sample's length."""

    spans: list
    cu: Optional[Tensor]
    longest: int

    @property
    def packed(self):
        return self.cu is not None


def _starts(position_ids, batch, length):
    """[B, L] bool on the host: where every axis of ``position_ids`` ([B or 1, L], or [3 or 4, B or 1, L]) is 0."""
    shape = list(position_ids.shape)
    ok = (position_ids.dim() == 2 and shape[0] in (1, batch) and shape[1] == length) or (
        position_ids.dim() == 3 and shape[0] in (3, 4) and shape[1] in (1, batch) and shape[2] == length)
    if not ok:
        raise ValueError(f"position_ids: expected [{batch}, {length}] or [3 or 4, {batch}, {length}], got {shape}")
    zero = position_ids.to("cpu") == 0
    return (zero if zero.dim() == 2 else zero.all(0)).expand(batch, length)


def find_samples(batch, length, attention_mask=None, position_ids=None, cu_seq_lens_q=None, cu_seq_lens_k=None,
                 past=0):
    """The samples of a batch of ``batch`` rows of ``length`` tokens.

    Packed (batch size 1) when ``cu_seq_lens_q`` is given, or when ``position_ids`` restart at 0 inside the row
    at prefill without an ``attention_mask``; for M-RoPE ids ([3, 1, L], or [4, 1, L] with the text row first) a
    sample starts where all of its axes are 0. Otherwise one sample per row. Inconsistent inputs raise ValueError:
    packed rows beside others, a padding mask with packed positions, offsets that do not cover the row, offsets
    and positions that disagree.
    """
    rows = Samples([(b, 0, length) for b in range(batch)], None, length)
    if cu_seq_lens_q is None:
        if cu_seq_lens_k is not None:
            raise ValueError("cu_seq_lens_k: given without cu_seq_lens_q")
        if position_ids is None or past:
            return rows
        starts = _starts(position_ids, batch, length)
        if attention_mask is not None:
            real = attention_mask.to("cpu").bool()
            first = real.int().argmax(1, keepdim=True)
            restart = starts & real & (torch.arange(length) > first)
            if restart.any():
                raise ValueError("attention_mask: position_ids restart at 0 inside a row (packed samples), which a "
                                 "padding mask would let attend to each other; pass packed samples without it")
            return rows
        starts = starts.clone()
        starts[:, 0] = True
        if int(starts.sum()) == batch:
            return rows
        if batch != 1:
            raise ValueError(f"position_ids: packed samples (positions restarting at 0 inside a row) need batch "
                             f"size 1, as DataCollatorWithFlattening gives them; got {batch} rows")
        bounds = starts[0].nonzero().squeeze(1).tolist() + [length]
        cu = cu_seqlens([hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])])
    else:
        cu = _offsets(cu_seq_lens_q, "cu_seq_lens_q", batch, length)
        if cu_seq_lens_k is not None and not torch.equal(_offsets(cu_seq_lens_k, "cu_seq_lens_k", batch, length), cu):
            raise ValueError("cu_seq_lens_k: a packed batch attends within each sample, so it must equal "
                             "cu_seq_lens_q")
        if attention_mask is not None:
            raise ValueError("attention_mask: a packed batch (cu_seq_lens_q) takes no padding mask")
        if past:
            raise ValueError("cu_seq_lens_q: a packed batch cannot continue a KV cache")
        if position_ids is not None:
            starts = _starts(position_ids, batch, length)[0]
            nonempty = cu[:-1][cu.diff() > 0].long()
            expected = torch.zeros(length, dtype=torch.bool)
            expected[nonempty] = True
            if not torch.equal(starts, expected):
                raise ValueError("position_ids: they must restart at 0 where cu_seq_lens_q starts a sample, and only "
                                 "there")
    bounds = cu.tolist()
    spans = [(0, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
    return Samples(spans, cu, max((hi - lo for _, lo, hi in spans), default=0))


def _offsets(cu, name, batch, length):
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.numel() < 2 or cu.dtype.is_floating_point \
            or cu.dtype == torch.bool:
        raise TypeError(f"{name}: expected a 1-D integer tensor of sample offsets, got "
                        f"{type(cu).__name__ if not isinstance(cu, Tensor) else f'{cu.dtype} {list(cu.shape)}'}")
    if batch != 1:
        raise ValueError(f"{name}: packed samples need batch size 1, got {batch} rows")
    cu = cu.to("cpu", torch.int64)
    if cu[0] != 0 or cu[-1] != length or (cu.diff() < 0).any():
        raise ValueError(f"{name}: offsets must start at 0, never decrease and end at the {length} tokens, got "
                         f"{cu.tolist()[:8]}{'...' if cu.numel() > 8 else ''}")
    return cu.to(torch.int32)


def sample_positions(samples, device):
    """Per-sample text positions [1, L] of a packed batch: 0, 1, ... restarting at each sample."""
    cu = samples.cu.long()
    lengths = cu.diff()
    total = int(cu[-1])
    positions = torch.arange(total) - torch.repeat_interleave(cu[:-1], lengths)
    return positions.view(1, total).to(device)
