"""deepstack_groups / deepstack_index: the 4 DeepStack-Efficient groups on hand-built grids."""
import pytest
import torch

import fastvl
from fastvl.testing import randn

# one image, t=1, 4x8 ViT patches -> merged 2x4 grid, numbered in raster order:
#   0 1 2 3
#   4 5 6 7
# LLM tokens: 1x2 (token 0 = merged cells 0 1 4 5, token 1 = 2 3 6 7)
WIDE = torch.tensor([[1, 4, 8]])
WIDE_SPATIAL = [[0, 2], [1, 3], [4, 6], [5, 7]]  # TL, TR, BL, BR of each LLM token
WIDE_SLIMM = [[0, 4], [1, 5], [2, 6], [3, 7]]  # token l = cells 4l..4l+3 (a 1x4 strip)

# two images: WIDE, then t=2 4x4 patches (merged 2x2 per frame: cells 8 9 / 10 11, then 12 13 / 14 15)
PACK = torch.tensor([[1, 4, 8], [2, 4, 4]])
PACK_SPATIAL = [[0, 2, 8, 12], [1, 3, 9, 13], [4, 6, 10, 14], [5, 7, 11, 15]]
PACK_SLIMM = [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]

# t=1, 8x8 patches: merged 4x4 grid (0..15 raster), LLM grid 2x2
SQUARE = torch.tensor([[1, 8, 8]])
SQUARE_SPATIAL = [[0, 2, 8, 10], [1, 3, 9, 11], [4, 6, 12, 14], [5, 7, 13, 15]]
SQUARE_SLIMM = [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]


@pytest.mark.parametrize("grid, order, expected", [
    (WIDE, "spatial", WIDE_SPATIAL), (WIDE, "slimm", WIDE_SLIMM),
    (PACK, "spatial", PACK_SPATIAL), (PACK, "slimm", PACK_SLIMM),
    (SQUARE, "spatial", SQUARE_SPATIAL), (SQUARE, "slimm", SQUARE_SLIMM),
], ids=["wide-spatial", "wide-slimm", "pack-spatial", "pack-slimm", "square-spatial", "square-slimm"])
def test_groups_written_out(grid, order, expected):
    n = int((grid.prod(1) // 4).sum())
    x = torch.arange(n, dtype=torch.float32)[:, None] * torch.tensor([1.0, -1.0, 0.5])  # row i holds i, -i, i/2
    groups = fastvl.deepstack_groups(x, grid, order=order)
    assert groups.shape == (4, n // 4, 3)
    assert groups[..., 0].tolist() == expected
    assert torch.equal(groups[..., 1], -groups[..., 0]) and torch.equal(groups[..., 2], groups[..., 0] / 2)
    assert fastvl.deepstack_index(grid, order).tolist() == expected


def test_main_branch_windows():
    """index.t() gathers each LLM token's 2x2 neighbourhood (TL, TR, BL, BR) in raster order of the LLM grid."""
    windows = fastvl.deepstack_index(SQUARE).t().tolist()
    assert windows == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_gradient_is_the_inverse_gather():
    grid = torch.tensor([[1, 4, 12], [3, 8, 4]])
    n = int((grid.prod(1) // 4).sum())
    x = randn(n, 5, gen=torch.Generator().manual_seed(0), requires_grad=True)
    groups = fastvl.deepstack_groups(x, grid)
    grad = randn(*groups.shape, gen=torch.Generator().manual_seed(1))
    groups.backward(grad)
    index = fastvl.deepstack_index(grid).reshape(-1)
    expected = torch.zeros_like(x).index_copy(0, index, grad.reshape(-1, 5))
    assert torch.equal(x.grad, expected)
    assert sorted(index.tolist()) == list(range(n))  # every merged token lands in exactly one group


@pytest.mark.parametrize("grid", [[[1, 6, 8]], [[1, 8, 2]], [[1, 4, 4], [2, 4, 10]]])
def test_odd_merged_grid_rejected(grid):
    grid = torch.tensor(grid)
    x = torch.zeros(int((grid.prod(1) // 4).sum()), 3)
    with pytest.raises(ValueError, match="grid_thw h and w must be multiples of 4"):
        fastvl.deepstack_groups(x, grid)


def test_bad_arguments():
    x = torch.zeros(8, 3)
    with pytest.raises(ValueError, match="order must be one of"):
        fastvl.deepstack_groups(x, WIDE, order="raster")
    with pytest.raises(ValueError, match="x has 7"):
        fastvl.deepstack_groups(x[:7], WIDE)
    with pytest.raises(ValueError, match="grid_thw must have shape"):
        fastvl.deepstack_groups(x, torch.tensor([[4, 8]]))
    with pytest.raises(TypeError, match="grid_thw must have dtype"):
        fastvl.deepstack_groups(x, WIDE.float())
    with pytest.raises(ValueError, match="x must be 2-D"):
        fastvl.deepstack_groups(x[None], WIDE)
