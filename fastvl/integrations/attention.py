"""The ``fastvl`` attention implementation for transformers language models.

Registered as ``attn_implementation="fastvl"``: causal (or not, per module) attention over packed
variable-length sequences through ``fastvl.varlen_attention``, GQA included. Segments come from,
in order of precedence:

- ``cu_seq_lens_q``/``cu_seq_lens_k`` (+ ``max_length_q``/``max_length_k``) passed through the
  model's kwargs, as transformers' flattening data collator produces them (batch size 1);
- the 2-D padding mask (``attention_mask`` [batch, keys]): padded tokens are dropped, each row is
  one sequence, its queries being its last keys (left or right padding, prefill or decoding with a
  KV cache); padded query rows output zeros;
- ``position_ids`` without a padding mask: a position 0 starts a new sequence (packed rows);
- otherwise each row is one sequence (queries aligned to the end of the keys when a KV cache
  makes the keys longer).

Host work (reading the mask or the positions) happens once per forward: every layer receives the
same tensors and reuses the segments. Not supported (ValueError): attention dropout, sliding
windows, logit soft-capping, attention sinks, ready-made 4-D masks, static caches (the mask then
does not cover all the keys). Sequence packing inside a padded row is not detected.
"""
import weakref
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._backend import report_reference
from ..layout import cu_seqlens, host_side, to_device
from ..ops import varlen_attention

NAME = "fastvl"


class Packing(NamedTuple):
    """The sequences of a batch: the kept token rows and their segment offsets."""

    q_index: Optional[Tensor]  # kept query rows of the flattened [batch * Tq] (None: all)
    k_index: Optional[Tensor]
    cu_q: Tensor
    cu_k: Optional[Tensor]  # None: self-attention over the q segments
    max_q: Optional[int]
    max_k: Optional[int]


def fastvl_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: q [B, H, Tq, D], k/v [B, Hk, Tk, D] -> ([B, Tq, H, D], None)."""
    if dropout:
        raise ValueError(f"dropout: the fastvl attention has no attention dropout, got {dropout}")
    for name in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: not supported by the fastvl attention")
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    batch, heads, tq, dim = query.shape
    tk = key.shape[2]
    if not torch.compiler.is_compiling():
        report_reference(query.device, f'attn_implementation="{NAME}"')
    q = query.transpose(1, 2).reshape(batch * tq, heads, dim)
    k = key.transpose(1, 2).reshape(batch * tk, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * tk, value.shape[1], dim)
    seg = _segments(attention_mask, kwargs, batch, tq, tk, q.device)
    if seg.q_index is not None:
        q = q.index_select(0, seg.q_index)
    if seg.k_index is not None:
        k, v = k.index_select(0, seg.k_index), v.index_select(0, seg.k_index)
    out = varlen_attention(q, k, v, seg.cu_q, seg.cu_k, seg.max_q, seg.max_k, causal=causal, softmax_scale=scaling)
    if seg.q_index is not None:
        out = out.new_zeros(batch * tq, heads, dim).index_copy(0, seg.q_index, out)
    return out.view(batch, tq, heads, dim), None


def _segments(attention_mask, kwargs, batch, tq, tk, device) -> Packing:
    """The sequences of the batch, by the precedence the module docstring lists."""
    cu_q, position_ids = kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids")
    if cu_q is not None:
        if batch != 1:
            raise ValueError(f"cu_seq_lens_q: packed sequences need batch size 1, got {batch}")
        cu_k = kwargs.get("cu_seq_lens_k")
        cu_k = None if cu_k is None or cu_k is cu_q else cu_k.to(torch.int32)
        return Packing(None, None, cu_q.to(torch.int32), cu_k, kwargs.get("max_length_q"), kwargs.get("max_length_k"))
    if attention_mask is not None:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, tk):
            raise ValueError(
                f"attention_mask: the fastvl attention needs the 2-D padding mask [batch, keys] = [{batch}, {tk}], "
                f"got shape {list(attention_mask.shape)} (a ready-made 4-D mask or a static cache is not supported)"
            )
        return _memoised(_from_mask, attention_mask, batch, tq, tk, device)
    if position_ids is not None and tq == tk:
        if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != tq:
            raise ValueError(f"position_ids: expected [{batch} or 1, {tq}], got shape {list(position_ids.shape)}")
        return _memoised(_from_positions, position_ids, batch, tq, tk, device)
    # one sequence per row: nothing to read on the host
    cu_q = torch.arange(0, (batch + 1) * tq, tq, dtype=torch.int32, device=device)
    cu_k = None if tq == tk else torch.arange(0, (batch + 1) * tk, tk, dtype=torch.int32, device=device)
    return Packing(None, None, cu_q, cu_k, tq, tk)


_last = (None, None, None)  # (weak reference to the source tensor, key, Packing)


@host_side
def _memoised(build, source, batch, tq, tk, device):
    """``build(source on the host, ...)``, computed once for all the layers of a forward."""
    global _last
    ref, key, value = _last
    # inference tensors have no version counter (and cannot change in place outside inference mode)
    version = None if source.is_inference() else source._version
    now = (build, version, tuple(source.shape), batch, tq, tk, device)
    if ref is not None and ref() is source and key == now:
        return value
    value = build(source.to("cpu"), batch, tq, tk, device)
    _last = (weakref.ref(source), now, value)
    return value


def _from_mask(mask, batch, tq, tk, device):
    keep_k = mask.bool()
    keep_q = keep_k[:, tk - tq:]
    q_index, cu_q, max_q = _compact(keep_q)
    if tq == tk:
        q_index, cu_q = to_device(device, q_index, cu_q)
        return Packing(q_index, q_index, cu_q, None, max_q, max_q)
    k_index, cu_k, max_k = _compact(keep_k)
    q_index, k_index, cu_q, cu_k = to_device(device, q_index, k_index, cu_q, cu_k)
    return Packing(q_index, k_index, cu_q, cu_k, max_q, max_k)


def _compact(keep):
    """Flat indices of the kept tokens of [batch, T] and the offsets of the rows after compaction."""
    lengths = keep.sum(1)
    return keep.flatten().nonzero().squeeze(1), cu_seqlens(lengths), int(lengths.max()) if lengths.numel() else 0


def _from_positions(position_ids, batch, tq, tk, device):
    starts = (position_ids == 0).expand(batch, tq).clone()
    starts[:, 0] = True  # every row starts a sequence
    bounds = F.pad(starts.flatten().nonzero().squeeze(1), (0, 1), value=batch * tq)
    (cu_q,) = to_device(device, bounds.to(torch.int32))
    longest = int(bounds.diff().max()) if bounds.numel() > 1 else 0
    return Packing(None, None, cu_q, None, longest, longest)


def register():
    """Make ``attn_implementation="fastvl"`` available to transformers models (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, fastvl_attention)
    # like flash attention: a 2-D padding mask when there is padding, else None
    AttentionMaskInterface.register(NAME, flash_attention_mask)
