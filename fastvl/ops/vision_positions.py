"""Public op: (row, col) of every patch of a packed batch of images/videos, in window order."""
from .. import reference
from . import _checks as check


def vision_positions(grid_thw, merge_size=2):
    """[T, 2] int32 positions for ``grid_thw`` [N, 3] (t, h, w; h and w divisible by merge_size)."""
    m = check.positive_int("merge_size", merge_size)
    for t, h, w in check.grid("grid_thw", grid_thw, 3):
        if h % m or w % m:
            raise ValueError(f"grid_thw: h={h}, w={w} must be divisible by merge_size={m}")
    return reference.vision_positions(grid_thw, m)
