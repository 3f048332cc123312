"""Attention blocks of X-ReID's Multi-granularity Information Interaction (MII).

Two block shapes, both with multi-head attention without Q/K/V biases, an output projection with
bias, a 4x feed-forward network with exact GELU, residual connections and no final LayerNorm:

- :class:`CrossAttentionBlock` (SII and LII, paper Eqs. 6-7): one query token per frame (a [CLS])
  attends over a frame's patch tokens. LayerNorm on the query, a *separate* LayerNorm on the key
  path only, raw (un-normalised) values: what the official ``TPM_space_shift`` block does.
- :class:`FirstTokenSelfAttentionBlock` (CII, paper Fig. 3d): a pre-LN self-attention block over
  ``[query ; context]`` of which only the first output token is kept.

Shape letters: N sequences (frames), L context tokens, D width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEAD_DIM = 64  # CLIP's head width; ViT-B/16 (D=768) gets the official 12 heads


def num_heads_for(dim: int) -> int:
    """Heads for an MII block of width ``dim``: 64-wide heads as CLIP, at least one."""
    return max(1, dim // HEAD_DIM)


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with bias-free Q/K/V projections and a biased output projection.

    Shape: query [N, Q, D], key [N, L, D], value [N, L, D] -> [N, Q, D].
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        return x.view(n, length, self.heads, dim // self.heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(query)), self._split(self.k(key)), self._split(self.v(value))
        attended = F.scaled_dot_product_attention(q, k, v)  # softmax(QK^T / sqrt(d_head)) V
        n, _, length, _ = attended.shape
        return self.out(attended.transpose(1, 2).reshape(n, length, -1))


class FeedForward(nn.Module):
    """Pre-LN MLP ``fc2(GELU(fc1(LN(x))))`` with a 4x hidden width; exact (erf) GELU."""

    def __init__(self, dim: int, ratio: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class CrossAttentionBlock(nn.Module):
    """MHCA + FFN with one query token per sequence (SII and LII; X-ReID Eqs. 6-7).

    ``q = q + MHA(LN_q(q), LN_k(tokens), tokens)`` then ``q = q + FFN(q)``. The key path has its
    own LayerNorm and the values are the raw tokens, as in the official block. Parameters at
    D=768: 7,087,104. PyTorch default initialisation (the official ``_init_weights`` is unused).

    Shape: query [N, D], tokens [N, L, D] -> [N, D].
    """

    def __init__(self, dim: int, heads: int | None = None) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_k = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads or num_heads_for(dim))
        self.ffn = FeedForward(dim)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        q = self.norm_q(query).unsqueeze(1)
        query = query + self.attn(q, self.norm_k(tokens), tokens).squeeze(1)
        return query + self.ffn(query)


class FirstTokenSelfAttentionBlock(nn.Module):
    """Pre-LN MHSA + FFN over ``[query ; context]``, returning only the first token (CII).

    With a single layer, the first output token depends on the other tokens only through the
    keys and values, so only its row of the attention is computed: the result equals running
    the full self-attention block and keeping token 0, at 1/(L+1) of the attention cost.
    Parameters at D=768: 7,085,568.

    Shape: query [N, D], context [N, L, D] -> [N, D].
    """

    def __init__(self, dim: int, heads: int | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads or num_heads_for(dim))
        self.ffn = FeedForward(dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(torch.cat([query.unsqueeze(1), context], dim=1))
        query = query + self.attn(tokens[:, :1], tokens, tokens).squeeze(1)
        return query + self.ffn(query)
