"""Helpers for comparing kernels with references: relative errors, seeded packs of odd sizes."""
import math

import torch

from .layout import cu_seqlens  # noqa: F401  (tests build their offsets with it)

# ||out - ref|| / ||ref|| bounds against a float64 reference (fp32 dots may run as tf32 on a GPU)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
TF32_TOLERANCE = 2e-3


def tolerance(dtype, device="cpu") -> float:
    """The rel_err bound of a kernel computing in ``dtype`` on ``device``: fp32 dots run as tf32 on CUDA."""
    return TF32_TOLERANCE if dtype == torch.float32 and torch.device(device).type == "cuda" else TOLERANCE[dtype]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf when out has NaN/inf, 0 for two empty tensors)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom else diff


def assert_close(out, ref, dtype=None, tol=None, name="output"):
    """Assert shape equality and rel_err(out, ref) <= tol (by default TOLERANCE[dtype or out.dtype])."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    tol = TOLERANCE[dtype or out.dtype] if tol is None else tol
    err = rel_err(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g}"
    return err


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, device="cpu", gen=None, scale=1.0, requires_grad=False):
    """Seeded normal tensor created on CPU (same values on every device) then moved."""
    t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def sap_window_loop(x, grids, w1, b1, w2, b2, window):
    """FlashSloth's SAP by its definition, one window at a time (an oracle independent of the reference):
    slice each window x window block of each (h, w) image, softmax its MLP scores, weight its raw rows."""
    outs, start = [], 0
    for h, w in grids:
        image = x[start:start + h * w].reshape(h, w, -1)
        start += h * w
        for r in range(0, h, window):
            for c in range(0, w, window):
                tokens = image[r:r + window, c:c + window].reshape(-1, x.shape[1])
                scores = (torch.relu(tokens @ w1.T + b1) @ w2.T + b2).squeeze(-1)
                outs.append(torch.softmax(scores, dim=0) @ tokens)
    return torch.stack(outs)
