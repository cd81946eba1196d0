"""Compressors: what turns the ViT tokens of a pack into LLM tokens (and DeepStack groups).

Each compressor owns its projector to the LLM width and exposes
``forward(tokens, taps, rows) -> (main [L, D], stacked [S, L, D] or None)`` and
``llm_grid(t, h, w)``, the (frames, rows, columns) of the LLM tokens of one grid row (M-RoPE reads it), whose
product ``tokens_per_grid`` is their number.
"""
import math

import torch
from torch import nn

from .. import ops
from ..data.conversation import llm_grid
from ..nn import PatchMerger, SpatialAttentionPool


def mlp2x_gelu(dim, out_dim):
    """LLaVA/FlashSloth projector: Linear -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


def raster_order(rows, merge_size):
    """Permutation taking merge-window-ordered patches to row-major order, frame by frame."""
    m, order, offset = merge_size, [], 0
    for t, h, w in rows:
        ids = torch.arange(t * h * w).view(t, h // m, w // m, m, m).permute(0, 1, 3, 2, 4)
        order.append(ids.reshape(-1) + offset)
        offset += t * h * w
    return torch.cat(order)


def cell_order(rows, merge_size):
    """Permutation grouping the patches of each 2m x 2m cell: its four m x m windows (row-major), each
    window's m*m patches consecutive (SliMM's DeepStack-Efficient main branch)."""
    m, order, offset = merge_size, [], 0
    for t, h, w in rows:
        ids = torch.arange(t * h * w).view(t, h // (2 * m), 2, w // (2 * m), 2, m * m).permute(0, 1, 3, 2, 4, 5)
        order.append(ids.reshape(-1) + offset)
        offset += t * h * w
    return torch.cat(order)


class Compressor(nn.Module):
    def tokens_per_grid(self, t, h, w):
        return math.prod(self.llm_grid(t, h, w))


class Project(Compressor):
    """'none': every ViT token through the projector."""

    def __init__(self, config):
        super().__init__()
        self.projector = mlp2x_gelu(config.vision_config.embed_dim, config.text_config.hidden_size)

    def llm_grid(self, t, h, w):
        return llm_grid(t, h, w, "none")

    def forward(self, x, taps, rows):
        return self.projector(x), None


class SpatialPool(Compressor):
    """'sap': FlashSloth's spatial attention pooling of each frame, then the projector."""

    def __init__(self, config):
        super().__init__()
        vision = config.vision_config
        self.window = config.sap_window
        # native towers emit patches in merge-window order, SAP reads rows row-major
        self.merge_size = vision.spatial_merge_size if vision.tower == "native" else None
        self.pooling = SpatialAttentionPool(vision.embed_dim, window=self.window, dropout=config.sap_dropout)
        self.projector = mlp2x_gelu(vision.embed_dim, config.text_config.hidden_size)

    def llm_grid(self, t, h, w):
        return llm_grid(t, h, w, "sap", window=self.window)

    def forward(self, x, taps, rows):
        if self.merge_size is not None:
            x = x[raster_order(rows, self.merge_size).to(x.device)]
        grid_hw = torch.tensor([[h, w] for t, h, w in rows for _ in range(t)], dtype=torch.int64)
        return self.projector(self.pooling(x, grid_hw)), None


class Merge(Compressor):
    """'patch_merge': Qwen2-VL's PatchMerger, which is also the projector."""

    def __init__(self, config):
        super().__init__()
        vision = config.vision_config
        self.merge_size = vision.spatial_merge_size
        self.merger = PatchMerger(
            vision.embed_dim, config.text_config.hidden_size, vision.spatial_merge_size, norm=vision.norm
        )

    def llm_grid(self, t, h, w):
        return llm_grid(t, h, w, "patch_merge", merge_size=self.merge_size)

    def forward(self, x, taps, rows):
        return self.merger(x), None


class DeepStackMidLayers(Merge):
    """SliMM DeepStack-MidLayers: the final tokens through ``merger``; the input of each tapped ViT
    block through its own merger (``deepstack_mergers.k``) gives stacked group k."""

    def __init__(self, config):
        super().__init__(config)
        vision = config.vision_config
        self.deepstack_mergers = nn.ModuleList(
            PatchMerger(vision.embed_dim, config.text_config.hidden_size, vision.spatial_merge_size, norm=vision.norm)
            for _ in config.vit_taps
        )

    def forward(self, x, taps, rows):
        stacked = torch.stack([merger(tap) for merger, tap in zip(self.deepstack_mergers, taps)])
        return self.merger(x), stacked


class DeepStackEfficient(Compressor):
    """SliMM DeepStack-Efficient: one LLM token per 2m x 2m cell of patches from ``merger_deepstack``
    (per-patch norm, the cell's (2m)^2 patches concatenated, MLP with SliMM's m*m*C hidden width); the
    cell's four m x m windows, merged by the Qwen2-VL ``merger``, become the stacked groups
    (``ops.deepstack_groups``, order ``deepstack_order``)."""

    def __init__(self, config):
        super().__init__()
        vision = config.vision_config
        m, dim, out = vision.spatial_merge_size, vision.embed_dim, config.text_config.hidden_size
        self.merge_size = m
        self.order = config.deepstack_order
        self.merger = PatchMerger(dim, out, m, norm=vision.norm)
        self.merger_deepstack = PatchMerger(dim, out, 2 * m, hidden_dim=m * m * dim, norm=vision.norm)

    def llm_grid(self, t, h, w):
        return llm_grid(t, h, w, "deepstack_efficient", merge_size=self.merge_size)

    def forward(self, x, taps, rows):
        m = 2 * self.merge_size
        bad = [[t, h, w] for t, h, w in rows if h % m or w % m]
        if bad:
            raise ValueError(f"image_grid_thw: DeepStack-Efficient needs h and w divisible by {m}, got {bad}")
        main = self.merger_deepstack(x[cell_order(rows, self.merge_size).to(x.device)])
        grid_thw = torch.tensor(rows, dtype=torch.int64)
        return main, ops.deepstack_groups(self.merger(x), grid_thw, order=self.order)


def build_compressor(config):
    if config.compressor == "deepstack":
        return DeepStackEfficient(config) if config.deepstack_type == "efficient" else DeepStackMidLayers(config)
    return {"none": Project, "sap": SpatialPool, "patch_merge": Merge}[config.compressor](config)
