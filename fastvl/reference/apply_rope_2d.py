"""Reference: 2D rotary embedding of vision tokens (Qwen2-VL convention)."""
import torch


def rope_2d_angles(pos: torch.Tensor, head_dim: int, theta: float, dtype=torch.float32) -> torch.Tensor:
    """[T, D/2] rotation angle of each pair (i, i + D/2): row*f_i for i < D/4, col*f_(i-D/4) after."""
    inv_freq = theta ** (-torch.arange(0, head_dim // 4, dtype=dtype, device=pos.device) * 4 / head_dim)
    return (pos.to(dtype)[:, :, None] * inv_freq).reshape(pos.shape[0], head_dim // 2)


def apply_rope_2d(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0, inverse: bool = False) -> torch.Tensor:
    """Rotate x [T, H, D] by the 2D positions pos [T, 2] (rotate-half pairs, fp32 or wider math).

    Angles, cos and sin are float64 whatever x's dtype: a position near 2^31 times a frequency has no
    fraction of a turn left in float32. ``inverse`` rotates by the opposite angles (the transpose: the
    backward of the rotation).
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    angles = rope_2d_angles(pos, x.shape[-1], theta, torch.float64)[:, None, :]
    cos, sin = angles.cos().to(compute), angles.sin().to(compute)
    if inverse:
        sin = -sin
    x1, x2 = x.to(compute).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
