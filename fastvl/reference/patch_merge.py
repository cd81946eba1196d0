"""Reference: Qwen2-VL PatchMerger (per-token norm, m*m neighbours concatenated, Linear-GELU-Linear)."""
import torch
import torch.nn.functional as F


def merge_norm(x, ln_w, ln_b, eps, norm="layernorm"):
    """Per-token LayerNorm (Qwen2-VL) or RMSNorm (Qwen2.5-VL, ln_b None), computed in fp32 or wider."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    if norm == "rmsnorm":
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * ln_w.to(compute)
    else:
        y = F.layer_norm(xf, (x.shape[-1],), ln_w.to(compute), None if ln_b is None else ln_b.to(compute), eps)
    return y.to(x.dtype)


def patch_merge(x, ln_w, ln_b, w1, b1, w2, b2, merge_size=2, eps=1e-6, *, norm="layernorm"):
    """x [T, C] in window order -> [T / m^2, w2.shape[0]]: mlp(norm(x).view(-1, m*m*C)).

    Weights follow nn.Linear ([out, in]): w1 [Hid, m*m*C], w2 [Out, Hid]; GELU is the exact (erf) one.
    """
    y = merge_norm(x, ln_w, ln_b, eps, norm).reshape(-1, merge_size * merge_size * x.shape[-1])
    return F.linear(F.gelu(F.linear(y, w1, b1)), w2, b2)
