"""VLD's spatial-temporal aggregation (STA, paper Eq. 10): each frame's CLS token queries the hub.

The official code has no residual and no MLP around the attention, and normalises its output with
CLIP's own final LayerNorm (``ln_post``, shared weights); the caller passes that norm in so that
it is not registered twice.
"""

from __future__ import annotations

import torch
from torch import nn

# CLIP ViT head width: 768 -> 12 heads, as in the official nn.MultiheadAttention(768, 12).
HEAD_WIDTH = 64


class SpatialTemporalAggregation(nn.Module):
    """Multi-head cross-attention from per-frame CLS tokens to a tracklet's memory tokens.

    Default PyTorch init and settings (dropout 0, biases on), batch-first layout; the maths equals
    the official sequence-first module.

    Shape: ``queries`` [B, T, D], ``memory`` [B, M, D] -> [B, T, D] (after ``norm``).
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        heads = max(1, width // HEAD_WIDTH)
        if width % heads:
            raise ValueError(f"STA width {width} is not divisible into {heads} heads")
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        attended, _ = self.attn(queries, memory, memory, need_weights=False)
        return norm(attended)
