"""Qwen2-VL and Qwen2.5-VL vision towers (transformers 5.x) on the fastvl ops.

The patched tower computes the packing of a forward on the host from ``grid_thw`` once: per-frame
``cu_seqlens``, Qwen2.5-VL's window segments and token order, and the (row, col) of every token
(the parts a caller precomputed, as transformers allows, replace the derived ones).
Every block reuses them: its attention runs ``varlen_attention`` with the 2D RoPE fused
(``rope_pos``; no cos/sin tables, no rotated copies of q and k), and the merger runs ``patch_merge``.
The patch embedding (a Conv3d with stride = kernel over each pixel row) runs as the equal Linear.
Weights stay in the original modules; only ``forward`` of the tower and of each block's attention
is replaced, on the instances.
"""
import types

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .._backend import report_reference
from ..layout import host_side, vision_layout
from ..ops import patch_merge, varlen_attention

TOWERS = (Qwen2VisionTransformerPretrainedModel, Qwen2_5_VisionTransformerPretrainedModel)
# layout inputs transformers lets callers precompute (torch.compile / export); otherwise derived from grid_thw
_PRECOMPUTED = ("cu_seqlens", "max_seqlen", "position_ids", "window_index", "cu_window_seqlens", "max_window_seqlen")


@merge_with_config_defaults
@capture_outputs
def _vision_forward(self, hidden_states, grid_thw, **kwargs):
    given = {name: kwargs.pop(name) for name in _PRECOMPUTED if kwargs.get(name) is not None}
    windowed = isinstance(self, Qwen2_5_VisionTransformerPretrainedModel)
    m = self.spatial_merge_size
    window = self.window_size // m // self.patch_size if windowed else None
    if not torch.compiler.is_compiling():
        report_reference(hidden_states.device, "fastvl.patch (vision tower)")
    layout = vision_layout(grid_thw, m, window, device=hidden_states.device)
    if given:
        layout = _precomputed(layout, given, m)
    hidden_states = _patch_embed(self.patch_embed, hidden_states)
    if windowed:
        hidden_states = hidden_states.view(-1, m * m, hidden_states.shape[-1])
        hidden_states = hidden_states.index_select(0, layout.window_index).flatten(0, 1)
    for i, block in enumerate(self.blocks):
        if windowed and i not in self.fullatt_block_indexes:
            cu_seqlens, max_seqlen = layout.cu_window_seqlens, layout.max_window_seqlen
        else:
            cu_seqlens, max_seqlen = layout.cu_seqlens, layout.max_seqlen
        hidden_states = block(
            hidden_states, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, rope_pos=layout.positions, **kwargs
        )
    merged = _merge(self.merger, hidden_states, m)
    if windowed:
        merged = merged.index_select(0, layout.reverse_index)
    return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=merged)


@host_side  # host reads of caller-given offsets
def _precomputed(layout, given, merge_size):
    """``layout`` with the parts a caller precomputed, as transformers' towers take them: position_ids [T, 2]
    (row, col) in image order, cu_seqlens and max_seqlen per frame, window_index with cu_window_seqlens and
    max_window_seqlen (Qwen2.5-VL)."""
    device, unit = layout.positions.device, merge_size * merge_size

    def offsets(cu_name, max_name, cu, longest):
        cu = given[cu_name].to(device, torch.int32) if cu_name in given else cu
        if max_name in given:
            return cu, int(given[max_name])
        return cu, longest if cu_name not in given else int(cu.diff().max()) if cu.numel() > 1 else 0

    fields = dict(zip(("cu_seqlens", "max_seqlen"), offsets("cu_seqlens", "max_seqlen", layout.cu_seqlens,
                                                           layout.max_seqlen)))
    order = layout.window_index
    if order is not None:
        if "window_index" in given and "cu_window_seqlens" in given:  # transformers uses them as a pair
            order = given["window_index"].to(device)
            fields.update(window_index=order, reverse_index=torch.argsort(order))
        fields["cu_window_seqlens"], fields["max_window_seqlen"] = offsets(
            "cu_window_seqlens", "max_window_seqlen", layout.cu_window_seqlens, layout.max_window_seqlen)
    if "position_ids" in given or "window_index" in fields:
        positions = given.get("position_ids")
        if positions is None:  # the derived ones, back to image order
            positions = layout.positions.view(-1, unit, 2)[layout.reverse_index].view(-1, 2)
        positions = positions.to(device, torch.int32)
        fields["positions"] = positions if order is None else positions.view(-1, unit, 2)[order].view(-1, 2)
    return layout._replace(**fields)


def _patch_embed(embed, x):
    """transformers' PatchEmbed as one GEMM: its Conv3d has stride = kernel and each row of ``x`` is one kernel-sized
    patch, so it is a Linear with the kernel flattened; the same product, which oneDNN's Conv3d runs about 2x slower
    on a CPU (README, "Native CPU backend")."""
    weight = embed.proj.weight
    return nn.functional.linear(x.reshape(-1, weight[0].numel()).to(weight.dtype), weight.flatten(1))


def _attention_forward(self, hidden_states, cu_seqlens, position_embeddings=None, *, rope_pos, max_seqlen, **kwargs):
    """Self-attention of a block: qkv projection, fused 2D RoPE + varlen attention, output projection."""
    if position_embeddings is not None:
        raise TypeError("position_embeddings: the fastvl attention rotates q and k from rope_pos itself")
    tokens = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).view(tokens, 3, self.num_heads, self.head_dim).unbind(1)
    out = varlen_attention(
        q, k, v, cu_seqlens, max_seqlen_q=max_seqlen, softmax_scale=self.scaling,
        rope_pos=rope_pos, rope_theta=self.config.rope_parameters["rope_theta"],
    )
    return self.proj(out.reshape(tokens, -1))


def _merge(merger, x, merge_size):
    """The tower's PatchMerger (LayerNorm for Qwen2-VL, RMSNorm for Qwen2.5-VL) as one patch_merge."""
    ln, fc1, fc2 = merger.ln_q, merger.mlp[0], merger.mlp[2]
    layernorm = isinstance(ln, nn.LayerNorm)
    params = [ln.weight, ln.bias if layernorm else None, fc1.weight, fc1.bias, fc2.weight, fc2.bias]
    if torch.is_autocast_enabled(x.device.type):
        # autocast leaves fp32 weights beside low-precision activations; the op wants one dtype
        dtype = torch.get_autocast_dtype(x.device.type)
        x, params = x.to(dtype), [None if p is None else p.to(dtype) for p in params]
    eps = ln.eps if layernorm else ln.variance_epsilon
    return patch_merge(x, *params, merge_size, eps, norm="layernorm" if layernorm else "rmsnorm")


def is_patched(tower) -> bool:
    return getattr(tower.__dict__.get("forward"), "__func__", None) is _vision_forward


def patch_tower(tower):
    """Bind the fastvl forwards to ``tower`` and to its blocks' attention modules (idempotent)."""
    if is_patched(tower):
        return
    tower.forward = types.MethodType(_vision_forward, tower)
    for block in tower.blocks:
        block.attn.forward = types.MethodType(_attention_forward, block.attn)


def unpatch_tower(tower):
    """Restore the transformers forwards (the class methods)."""
    for module in [tower, *(block.attn for block in tower.blocks)]:
        if getattr(module.__dict__.get("forward"), "__func__", None) in (_vision_forward, _attention_forward):
            del module.forward
