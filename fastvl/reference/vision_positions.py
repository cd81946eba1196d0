"""Reference: (row, col) of every patch of a packed batch, in Qwen2-VL window order."""
import torch


def vision_positions(grid_thw: torch.Tensor, merge_size: int = 2) -> torch.Tensor:
    """[T, 2] int32 (row, col) for images/videos of ``grid_thw`` ([N, 3] = t, h, w).

    Tokens of a frame run over (h/m, w/m, m, m): the m*m patches of a merge window are
    consecutive rows. Frames repeat the positions of the first (the ViT RoPE has no time axis).
    """
    m = merge_size
    out = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
        cols = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
        pos = torch.stack([rows, cols], dim=-1).permute(0, 2, 1, 3, 4).reshape(-1, 2)
        out.append(pos.repeat(t, 1))
    if not out:
        return torch.zeros(0, 2, dtype=torch.int32, device=grid_thw.device)
    return torch.cat(out).to(device=grid_thw.device, dtype=torch.int32)
