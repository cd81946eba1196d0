"""Vision towers: Qwen2-VL's native dynamic-resolution ViT and a fixed-resolution SigLIP-style ViT.

Both run their images as one packed token sequence through ``fastvl.nn.VisionAttention``; the
layout (segment offsets, positions, the window plan) is computed once per forward on the host from the
grids (``fastvl.layout``) and reaches the device in one copy.
"""
import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from ..layout import cu_seqlens, vision_layout
from ..nn import VisionAttention


def _norm(config, dim):
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps)


class VisionMlp(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.act = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.embed_dim, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.embed_dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionGatedMlp(nn.Module):
    """Qwen2.5-VL's SwiGLU MLP (biases on)."""

    def __init__(self, config):
        super().__init__()
        self.act = ACT2FN[config.hidden_act]
        self.gate_proj = nn.Linear(config.embed_dim, config.intermediate_size)
        self.up_proj = nn.Linear(config.embed_dim, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.embed_dim)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(GradientCheckpointingLayer):
    """Pre-norm ViT block (Qwen2-VL parameter names); checkpointed by ``activation_checkpointing_enable()``."""

    def __init__(self, config):
        super().__init__()
        self.norm1 = _norm(config, config.embed_dim)
        self.norm2 = _norm(config, config.embed_dim)
        self.attn = VisionAttention(config.embed_dim, config.num_heads, config.rope_theta)
        self.mlp = VisionGatedMlp(config) if config.mlp_type == "swiglu" else VisionMlp(config)

    def forward(self, x, cu_seqlens, max_seqlen, rope_pos=None):
        x = x + self.attn(self.norm1(x), cu_seqlens, max_seqlen, rope_pos)
        return x + self.mlp(self.norm2(x))


class VisionTower(nn.Module):
    """Blocks shared by both towers; ``forward`` returns (tokens [T, C], taps, grid rows (t, h, w))."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))

    def run_blocks(self, x, segments, taps=(), rope_pos=None, windows=None, full_blocks=()):
        """Runs the blocks; returns the output and the inputs of blocks ``taps``.

        ``segments``: (cu_seqlens, max_seqlen); ``windows`` (the same for the window-permuted sequence)
        replaces them in every block not listed in ``full_blocks``.
        """
        inputs = {}
        for i, block in enumerate(self.blocks):
            inputs[i] = x
            x = block(x, *(segments if windows is None or i in full_blocks else windows), rope_pos)
        return x, [inputs[i] for i in taps]


class NativeVisionTower(VisionTower):
    """Qwen2-VL ViT: pixel rows [T, C*t*p*p] in merge-window order, grids [N, 3] (t, h, w) in patches.

    The patch embedding is a Linear over each row (equal to Qwen2-VL's Conv3d with stride = kernel).
    Each frame is one attention segment; with ``window_size`` the blocks outside
    ``fullatt_block_indexes`` attend within windows of window_size pixels (Qwen2.5-VL). With
    ``input_patch_size`` each row is one merge window and the grid counts windows (SliMM
    DeepStack-Efficient's processor): the rows are split into patch rows first.
    """

    def __init__(self, config):
        super().__init__(config)
        patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
        self.patch_embed = nn.Linear(patch_dim, config.embed_dim, bias=False)

    def forward(self, pixel_values, grid_thw, taps=()):
        config, m = self.config, self.config.spatial_merge_size
        row_size = self.patch_embed.in_features * config.input_unit ** 2
        if pixel_values.dim() != 2 or pixel_values.shape[1] != row_size:
            raise ValueError(f"pixel_values must have shape [tokens, {row_size}], got {list(pixel_values.shape)}")
        grid_thw = grid_thw.cpu()
        if config.input_unit > 1:
            pixel_values, grid_thw = split_windows(pixel_values, grid_thw, config)
        window = config.window_size // (config.patch_size * m) if config.window_size else None
        layout = vision_layout(grid_thw, m, window, pixel_values.device)  # checks grid_thw
        if layout.positions.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"image_grid_thw covers {layout.positions.shape[0]} patches but pixel_values has {pixel_values.shape[0]} rows"
            )
        rows = grid_thw.tolist()
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        segments = (layout.cu_seqlens, layout.max_seqlen)
        if window is None:
            x, tapped = self.run_blocks(x, segments, taps, layout.positions)
            return x, tapped, rows

        def regroup(t, index):  # reorders the merge groups (m*m consecutive tokens)
            return t.view(-1, m * m, t.shape[-1]).index_select(0, index).flatten(0, 1)

        x, tapped = self.run_blocks(
            regroup(x, layout.window_index), segments, taps, layout.positions,
            (layout.cu_window_seqlens, layout.max_window_seqlen), set(config.fullatt_block_indexes or ()),
        )
        return regroup(x, layout.reverse_index), [regroup(t, layout.reverse_index) for t in tapped], rows


def split_windows(pixel_values, grid_thw, config):
    """Rows of one merge window each, channel-major ``(C, T, m*p, m*p)`` in merge-window order over their grid
    (SliMM DeepStack-Efficient's processor) -> rows of one patch in merge-window order over the m-times finer grid,
    and that grid: the windows are put back in raster order, then each is cut into its m x m patches, which is the
    merge-window order of the finer grid."""
    m, p = config.spatial_merge_size, config.patch_size
    c, t_patch = config.in_channels, config.temporal_patch_size
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"image_grid_thw must have shape [images, 3], got {list(grid_thw.shape)}")
    rows = grid_thw.tolist()
    if any(h % m or w % m or min(t, h, w) < 1 for t, h, w in rows) or grid_thw.prod(-1).sum() != pixel_values.shape[0]:
        raise ValueError(f"image_grid_thw {rows} does not cover the {pixel_values.shape[0]} pixel rows in windows "
                         f"of {m}x{m}")
    images = pixel_values.split(grid_thw.prod(-1).tolist())
    out = [x.reshape(t, h // m, w // m, m, m, c, t_patch, m, p, m, p).permute(0, 1, 3, 2, 4, 7, 9, 5, 6, 8, 10)
           .reshape(-1, c * t_patch * p * p) for x, (t, h, w) in zip(images, rows)]
    return torch.cat(out), grid_thw * torch.tensor([1, m, m])


class FixedVisionTower(VisionTower):
    """SigLIP-style ViT on square images [N, C, S, S]: Conv2d patch embedding (as a Linear over
    unfolded patches, the trailing S % patch pixels unused) plus learned position embeddings."""

    def __init__(self, config):
        super().__init__(config)
        self.patch_embed = nn.Linear(config.in_channels * config.patch_size ** 2, config.embed_dim)
        self.position_embedding = nn.Embedding(config.grid_size ** 2, config.embed_dim)

    def forward(self, pixel_values, grid_thw=None, taps=()):
        config = self.config
        n, c, p, g = pixel_values.shape[0], config.in_channels, config.patch_size, config.grid_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (c, config.image_size, config.image_size):
            raise ValueError(
                f"pixel_values must have shape [images, {c}, {config.image_size}, {config.image_size}], "
                f"got {list(pixel_values.shape)}"
            )
        patches = pixel_values[:, :, : g * p, : g * p].reshape(n, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        x = self.patch_embed(patches.reshape(n * g * g, c * p * p).to(self.patch_embed.weight.dtype))
        x = x + self.position_embedding.weight.repeat(n, 1)
        x, tapped = self.run_blocks(x, (cu_seqlens([g * g] * n, x.device), g * g if n else 0), taps)
        return x, tapped, [[1, g, g]] * n


def build_vision_tower(config):
    return NativeVisionTower(config) if config.tower == "native" else FixedVisionTower(config)
