"""VLD's spatial-temporal hub (STH, paper section III-D): learnable tokens that carry information
between the frames of a tracklet inside the ViT.

From block ``start`` on, frame t of every tracklet gets T extra tokens ``H[t]``; before each later
block the hub tokens are transposed inside the tracklet (hub token j of frame f becomes the old hub
token f of frame j). Attention inside a frame gathers spatial information into its hub tokens and
the transpose hands each frame the tokens the other frames wrote, so frames exchange information
without any cross-frame attention. Hub tokens always sit at the end of the token sequence.
"""

from __future__ import annotations

import torch
from torch import nn


class SpatialTemporalHub(nn.Module):
    """The STH tensor ``H`` [T, T, D] (std-1 normal init, shared by all tracklets) and its moves.

    Frames are tracklet-major: rows ``b*T .. b*T + T-1`` of a token batch are tracklet b's frames.
    """

    def __init__(self, seq_len: int, width: int) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.tokens = nn.Parameter(torch.randn(seq_len, seq_len, width))

    def insert(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``H[t]`` to frame t of every tracklet. Shape: [B*T, L, D] -> [B*T, L + T, D]."""
        num_tracklets = self._num_tracklets(tokens)
        hub = self.tokens.to(tokens.dtype).repeat(num_tracklets, 1, 1)
        return torch.cat([tokens, hub], dim=1)

    def exchange(self, tokens: torch.Tensor) -> torch.Tensor:
        """Swap the frame and slot axes of each tracklet's hub tokens; other tokens are untouched.

        Shape: [B*T, L + T, D] -> [B*T, L + T, D]; new hub[b, f, j] = old hub[b, j, f].
        """
        t = self.seq_len
        num_tracklets = self._num_tracklets(tokens)
        width = tokens.shape[-1]
        hub = tokens[:, -t:].reshape(num_tracklets, t, t, width).transpose(1, 2)
        return torch.cat([tokens[:, :-t], hub.reshape(num_tracklets * t, t, width)], dim=1)

    def hub_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """All hub tokens of each tracklet, frame-major. Shape: [B*T, L + T, D] -> [B, T*T, D]."""
        t = self.seq_len
        return tokens[:, -t:].reshape(self._num_tracklets(tokens), t * t, tokens.shape[-1])

    def _num_tracklets(self, tokens: torch.Tensor) -> int:
        if tokens.shape[0] % self.seq_len:
            raise ValueError(
                f"{tokens.shape[0]} frames are not a whole number of {self.seq_len}-frame tracklets"
            )
        return tokens.shape[0] // self.seq_len
