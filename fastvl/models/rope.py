"""Qwen2-VL's multimodal RoPE (M-RoPE) on the 1D rotary embedding of any decoder."""
import torch
from torch import nn


class MultimodalRotary(nn.Module):
    """Wraps a decoder's ``rotary_emb``. While ``positions`` [3, B, L] (frame, row, column) are set, cos and sin
    take frequency section k of ``section`` (the rotate-half layout repeats the sections) from axis k % 3, as
    Qwen2-VL does; otherwise (or with equal axes) it is the wrapped rotary embedding."""

    def __init__(self, rotary, section):
        super().__init__()
        inv_freq = getattr(rotary, "inv_freq", None)
        if inv_freq is None or inv_freq.numel() != sum(section):
            have = "none" if inv_freq is None else inv_freq.numel()
            raise ValueError(f"mrope_section {list(section)} must sum to the language model's number of rotary "
                             f"frequencies (rotary dim / 2), which is {have}")
        self.rotary = rotary
        self.section = list(section) * 2
        self.positions = None

    def forward(self, x, position_ids):
        if self.positions is None:
            return self.rotary(x, position_ids)
        per_axis = [self.rotary(x, axis) for axis in self.positions]  # 3 x (cos, sin) [B, L, D]
        return tuple(
            torch.cat([part[i % 3] for i, part in enumerate(torch.stack(values).split(self.section, -1))], -1)
            for values in zip(*per_axis)
        )


def mrope_positions(input_ids, attention_mask, grids):
    """Qwen2-VL's ``get_rope_index`` rule: (positions [3, B, L] int64, deltas [B, 1]).

    ``grids`` maps a visual token id to the (t, h, w, frame step) of its items in order, (t, h, w) being the grid of
    their LLM tokens. Text tokens take one running index on all three axes; an item's t*h*w tokens take
    (frame * step, row, column) plus that index, and the next token continues after the item's largest position.
    Padding (``attention_mask`` 0) is skipped; ``deltas`` = next position - unpadded length, the offset of decoding
    positions. Consecutive tokens of one id hold as many items as they cover.
    """
    batch, length = input_ids.shape
    positions = torch.zeros(3, batch, length, dtype=torch.int64)
    deltas = torch.zeros(batch, 1, dtype=torch.int64)
    items = {token: iter(rows) for token, rows in grids.items()}
    ids_all = input_ids.cpu()
    real_all = None if attention_mask is None else attention_mask.cpu().bool()
    for b in range(batch):
        where = torch.arange(length) if real_all is None else real_all[b].nonzero().squeeze(1)
        ids = ids_all[b, where]
        kind = torch.zeros_like(ids)
        for code, token in enumerate(grids, 1):
            kind[ids == token] = code
        cuts = [0, *((kind[1:] != kind[:-1]).nonzero().squeeze(1) + 1).tolist(), ids.numel()]
        parts, next_pos = [], 0
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            if lo == hi:
                continue
            token = ids[lo].item() if kind[lo] else None
            if token is None:
                parts.append(torch.arange(next_pos, next_pos + hi - lo).expand(3, -1))
                next_pos += hi - lo
                continue
            left = hi - lo
            while left:
                t, h, w, step = next(items[token], (0, 0, 0, 0))
                if not t * h * w or t * h * w > left:
                    raise ValueError(f"input_ids: a run of {hi - lo} tokens {token} in sample {b} does not split "
                                     "into the LLM tokens of the grids given for them")
                grid = torch.stack(torch.meshgrid(
                    (torch.arange(t) * step).long(), torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1)
                parts.append(grid + next_pos)
                next_pos += int(grid.max()) + 1
                left -= t * h * w
        if parts:
            positions[:, b, where] = torch.cat(parts, 1)
        deltas[b] = next_pos - ids.numel()
    if any(next(it, None) is not None for it in items.values()):
        raise ValueError("input_ids: fewer visual tokens than the grids given for them")
    return positions.to(input_ids.device), deltas.to(input_ids.device)
