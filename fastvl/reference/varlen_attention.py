"""Reference: attention over packed variable-length segments."""
import torch

from .apply_rope_2d import apply_rope_2d


def varlen_attention(
    q, k, v, cu_seqlens_q, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, *,
    causal=False, softmax_scale=None, rope_pos=None, rope_theta=10000.0, return_lse=False,
):
    """Per segment i: softmax(q_i k_i^T * scale) v_i, q [Tq, H, D], k/v [Tk, Hk, D] (H % Hk == 0).

    Causal masking is bottom-right aligned (query r sees keys c <= r + Lk - Lq); a query with no
    visible key outputs zeros (its log-sum-exp is -inf). ``rope_pos`` [T, 2] rotates q and k first.
    With ``return_lse`` also returns the natural-log log-sum-exp of the scaled scores, [H, Tq] fp32.
    ``max_seqlen_*`` are accepted for signature parity and not needed here.
    """
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if rope_pos is not None:
        q, k = apply_rope_2d(q, rope_pos, rope_theta), apply_rope_2d(k, rope_pos, rope_theta)
    compute = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for (qs, qe), (ks, ke) in zip(_bounds(cu_seqlens_q), _bounds(cu_k)):
        qi = q[qs:qe].to(compute).transpose(0, 1)  # [H, Lq, D]
        ki = k[ks:ke].to(compute).repeat_interleave(group, dim=1).transpose(0, 1)
        vi = v[ks:ke].to(compute).repeat_interleave(group, dim=1).transpose(0, 1)
        scores = qi @ ki.transpose(1, 2) * scale  # [H, Lq, Lk]
        has_key = torch.full((qe - qs,), ke > ks, device=q.device)
        if causal:
            lq, lk = qe - qs, ke - ks
            visible = torch.arange(lk, device=q.device)[None, :] <= torch.arange(lq, device=q.device)[:, None] + lk - lq
            has_key = visible.any(dim=-1)
            # rows without a visible key get finite scores here and are zeroed below: no NaN gradients
            scores = scores.masked_fill(~visible & has_key[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1) * has_key[:, None]
        outs.append((probs @ vi).transpose(0, 1))
        lses.append(torch.logsumexp(scores, dim=-1).masked_fill(~has_key, float("-inf")))
    out = torch.cat(outs).to(q.dtype) if outs else q.new_zeros(0, q.shape[1], v.shape[-1])
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=1) if lses else q.new_zeros(q.shape[1], 0, dtype=compute)
    return out, lse.to(torch.float32)


def _bounds(cu_seqlens):
    cu = cu_seqlens.tolist()
    return list(zip(cu[:-1], cu[1:]))
