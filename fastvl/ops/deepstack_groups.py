"""DeepStack-Efficient grouping: 2x2-merged tokens -> the 4 stacked groups for LLM layers 1..4."""
import torch

from . import _checks as check

ORDERS = ("spatial", "slimm")


def deepstack_index(grid_thw, order="spatial", device=None):
    """Rows of the merged tokens that form each group: int64 [4, L], L = one LLM token per 4x4 patches.

    ``grid_thw`` [N, 3] (t, h, w) per image in ViT patches; h and w must be multiples of 4. The merged
    tokens (2x2 patches each, as patch_merge outputs them) run image by image, frame by frame, in
    raster order over the (h/2, w/2) merged grid; the LLM tokens likewise over the (h/4, w/4) grid.

    - ``"spatial"``: group g = 2*i + j holds, for LLM token (a, b), the merged token (2a+i, 2b+j): its
      true 2x2 neighbourhood, split as in the DeepStack paper (TL, TR, BL, BR).
    - ``"slimm"``: the order SliMM-DeepStackE checkpoints were trained with, ``stack.view(L, 4, C)
      .transpose(0, 1)``: LLM token l gets merged tokens 4l..4l+3, a 1x4 strip of the merged raster.

    The main (LLM-input) branch of DeepStack-Efficient concatenates each LLM token's 2x2 neighbourhood
    in raster order of the LLM grid: ``deepstack_index(grid_thw, "spatial").t()`` ([L, 4]) gathers it,
    whatever order the stack uses.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    rows = check.grid("grid_thw", grid_thw, 3)
    odd = [(h, w) for _, h, w in rows if h % 4 or w % 4]
    if odd:
        raise ValueError(f"grid_thw h and w must be multiples of 4 ViT patches (an even 2x2-merged grid, "
                         f"4x4 patches per LLM token), got (h, w) {odd}")
    device = grid_thw.device if device is None else device
    total = sum(t * h * w // 4 for t, h, w in rows)
    if order == "slimm":
        return torch.arange(total, device=device).view(-1, 4).t()
    groups, offset = [], 0
    for t, h, w in rows:
        mh, mw = h // 2, w // 2  # merged grid
        frame = torch.arange(t, device=device).view(t, 1, 1) * (mh * mw)
        even_rows = torch.arange(0, mh, 2, device=device).view(1, -1, 1)
        top_left = frame + even_rows * mw + torch.arange(0, mw, 2, device=device)
        groups.append(torch.stack([top_left + i * mw + j for i in (0, 1) for j in (0, 1)]).view(4, -1) + offset)
        offset += t * mh * mw
    if not groups:
        return torch.zeros(4, 0, dtype=torch.long, device=device)
    return torch.cat(groups, dim=1)


def deepstack_groups(x, grid_thw, order="spatial"):
    """x [N, C] merged tokens (N = sum t*h*w/4) -> [4, N/4, C]: group g feeds LLM layer g+1.

    Differentiable (a gather). See ``deepstack_index`` for the grid layout and the two orders.
    """
    check.tensor("x", x, ndim=2)
    index = deepstack_index(grid_thw, order, x.device)
    if index.numel() != x.shape[0]:
        raise ValueError(f"grid_thw covers {index.numel()} merged tokens (t*h*w/4 per image) but x has {x.shape[0]}")
    return x.index_select(0, index.reshape(-1)).view(*index.shape, x.shape[1])
