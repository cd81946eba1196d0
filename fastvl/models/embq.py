"""FlashSloth's Embedded Query module (EmbQ; "LQFormer" in its code), parameter names as there.

Learned query tokens, placed after a question, are rewritten once at the input of one LLM layer:
they read the question (text -> query attention), then the un-compressed image tokens (image ->
query attention) through a narrow bottleneck, and the result is added to their hidden states.
Attention here runs on torch SDPA, not fastvl.varlen_attention: its head sizes (576/32 = 18 for
queries/keys, 1152/32 = 36 for values in FlashSloth) are not sizes the kernels are built for, and
with 9 queries once per prefill its cost is negligible.
"""
import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention of queries [Lq, dim] on keys [Lk, dim] and values [Lk, value_dim]; logits
    and softmax in fp32; no output projection (as FlashSloth)."""

    def __init__(self, dim, value_dim, heads):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(value_dim, value_dim)

    def forward(self, query, key, value):
        compute = torch.promote_types(value.dtype, torch.float32)
        q, k, v = (
            proj(x).view(x.shape[0], self.heads, -1).transpose(0, 1).to(compute)
            for proj, x in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value))
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(0, 1).reshape(query.shape[0], -1).to(value.dtype)


class EmbQ(nn.Module):
    """``forward(queries [Q, D], question [Lt, D], image [Nv, Cv]) -> update [Q, D]`` (to be added)."""

    def __init__(self, hidden_size, vision_dim, dim=576, heads=32, num_queries=9):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(num_queries, hidden_size))
        self.down_projector_learnable_text = nn.Linear(hidden_size, dim)
        self.down_projector_image = nn.Linear(vision_dim, dim)
        self.up_projector = nn.Linear(vision_dim, hidden_size)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_text = nn.LayerNorm(dim)
        self.ln_kv = nn.LayerNorm(dim)
        self.t2q_attn = CrossAttention(dim, dim, heads)
        self.i2q_attn = CrossAttention(dim, vision_dim, heads)

    def forward(self, queries, question, image):
        q = self.ln_q(self.down_projector_learnable_text(queries))
        if question.shape[0]:
            text = self.ln_text(self.down_projector_learnable_text(question))
            q = self.t2q_attn(q, text, text)
        else:  # no question tokens: nothing to read in the first step
            q = torch.zeros_like(q)
        out = self.i2q_attn(q, self.ln_kv(self.down_projector_image(image)), image)
        return self.up_projector(out)
