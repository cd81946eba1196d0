"""VisionAttention, PatchMerger, SpatialAttentionPool and DeepStack: thin modules over fastvl's ops."""
import torch
from torch import nn

from .. import ops
from ..reference.spatial_attention_pool import sap_pool


class VisionAttention(nn.Module):
    """Fused qkv Linear -> packed varlen attention (optional in-kernel 2D RoPE) -> proj (Qwen2-VL names)."""

    def __init__(self, dim: int, num_heads: int, rope_theta: float = 10000.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.rope_theta = rope_theta
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cu_seqlens, max_seqlen=None, rope_pos=None):
        """x [T, C]; cu_seqlens int32 [B+1] on x's device; rope_pos [T, 2] int32 (row, col) or None."""
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, -1).unbind(1)
        out = ops.varlen_attention(
            q, k, v, cu_seqlens, max_seqlen_q=max_seqlen, rope_pos=rope_pos, rope_theta=self.rope_theta
        )
        return self.proj(out.reshape(x.shape[0], -1))


class PatchMerger(nn.Module):
    """Qwen2-VL's merger: per-token norm, concat of merge_size**2 consecutive rows, Linear-GELU-Linear.

    Parameter names ``ln_q``, ``mlp.0``, ``mlp.2`` as in Qwen2-VL, so its ``merger`` state dict loads.
    ``norm='rmsnorm'`` is Qwen2.5-VL's variant; ``hidden_dim`` defaults to merge_size**2 * dim.
    """

    def __init__(self, dim, out_dim, merge_size=2, hidden_dim=None, norm="layernorm", eps=1e-6):
        super().__init__()
        if norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {norm!r}")
        self.merge_size = merge_size
        self.norm = norm
        self.eps = eps
        in_dim = merge_size * merge_size * dim
        hidden_dim = hidden_dim or in_dim
        self.ln_q = nn.LayerNorm(dim, eps=eps) if norm == "layernorm" else nn.RMSNorm(dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, x):
        """x [T, C] with the merge_size**2 neighbours of each window on consecutive rows -> [T / m^2, out_dim]."""
        fc1, fc2 = self.mlp[0], self.mlp[2]
        return ops.patch_merge(
            x, self.ln_q.weight, getattr(self.ln_q, "bias", None), fc1.weight, fc1.bias, fc2.weight, fc2.bias,
            self.merge_size, self.eps, norm=self.norm,
        )


class SpatialAttentionPool(nn.Module):
    """FlashSloth's SAP: score MLP (``mlp.0`` -> ReLU -> Dropout -> ``mlp.3``), softmax-pooled windows.

    The fused op has no dropout inside its score MLP, so while training with ``dropout > 0`` the
    scores are computed unfused; evaluation (and ``dropout=0``) runs the fused op.
    """

    def __init__(self, dim, hidden_dim=None, window=3, dropout=0.1):
        super().__init__()
        self.window = window
        hidden_dim = hidden_dim or dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, 1))

    def forward(self, x, grid_hw):
        """x [T, C] (row-major tokens of images with grids grid_hw [N, 2]) -> [num_windows, C]."""
        fc1, fc2 = self.mlp[0], self.mlp[3]
        if not (self.training and self.mlp[2].p > 0):
            return ops.spatial_attention_pool(x, grid_hw, fc1.weight, fc1.bias, fc2.weight, fc2.bias, self.window)
        grid = torch.as_tensor(grid_hw, dtype=torch.int64).reshape(-1, 2)
        # b2 shifts every score of a window alike: like the fused op, give it an exact zero gradient (autograd
        # through the softmax leaves rounding noise, which Adam would turn into steps of the learning rate)
        scores = nn.functional.linear(self.mlp[:3](x), fc2.weight).squeeze(-1) + fc2.bias * 0
        return sap_pool(x, scores, grid, self.window)


class DeepStack:
    """Adds stacked token groups to the hidden states entering decoder layers start, start+1, ...

    Forward pre-hooks on ``layers`` read the groups set by ``arm(index, stacked)``: ``index`` [K]
    are the image-token rows of the flattened [B*L] hidden states, ``stacked`` [S, K, C] the groups
    (group s enters layer start+s). ``disarm()`` makes the hooks no-ops (decode steps). The groups
    stay armed after a forward so that activation checkpointing recomputes the same sums.
    """

    def __init__(self, layers, start=1):
        self.start = start
        self.num_layers = len(layers)
        self._state = None
        self.handles = [
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, layer in enumerate(layers)
        ]

    def arm(self, index, stacked, check_index=True):
        """``check_index=False`` for an index valid by construction (no host sync in each injecting layer)."""
        if self.start + stacked.shape[0] > self.num_layers:
            raise ValueError(
                f"{stacked.shape[0]} stacked groups from layer {self.start} need {self.start + stacked.shape[0]} "
                f"decoder layers, the model has {self.num_layers}"
            )
        self._state = (index, stacked, check_index)

    def disarm(self):
        self._state = None

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def _hook(self, layer_idx):
        def hook(module, args, kwargs):
            if self._state is None:
                return None
            index, stacked, check = self._state
            group = layer_idx - self.start
            if not 0 <= group < stacked.shape[0]:
                return None
            return replace_hidden(
                args, kwargs, lambda h: ops.deepstack_add(h, index, stacked[group].to(h.dtype), check_index=check))

        return hook


def replace_hidden(args, kwargs, fn):
    """(args, kwargs) of a decoder-layer call with its hidden states (first argument) replaced by fn(them)."""
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
