"""X-ReID's Multi-granularity Information Interaction: SII, LII and CII (paper section "MII").

All three run on *detached* backbone tokens (post-``ln_post``), so their losses train only the
MII modules and heads, never CLIP (official code: ``image_features.clone().detach()``).

Shape letters: B clips, T frames, N patch tokens, D width.
"""

from __future__ import annotations

import torch
from torch import nn
from vvireid.model.xreid.blocks import CrossAttentionBlock, FirstTokenSelfAttentionBlock

SHIFT_DIV = 4  # a quarter of the channels from each neighbour (official n_div = 4)


def temporal_channel_shift(patches: torch.Tensor) -> torch.Tensor:
    """Exchange patch-token channels with the adjacent frames (paper Eq. 5), out of place.

    With ``fold = D // 4``: channels ``[0:fold]`` come from frame t-1, ``[fold:2*fold]`` from
    frame t+1, the rest are frame t's own. A frame without that neighbour (the first for t-1,
    the last for t+1) keeps its own channels. Clips never mix.

    Why out of place: the official shift writes into a view of its input with overlapping
    slices, which cascades frame 0's channels to every frame on CPU and races on GPU, and it
    also overwrites the input. This builds the result from the unmodified input.

    Shape: [B, T, N, D] -> [B, T, N, D] (a new tensor; the input is not modified).
    """
    if patches.dim() != 4:
        raise ValueError(f"patches must be [B, T, N, D], got {tuple(patches.shape)}")
    fold = patches.shape[-1] // SHIFT_DIV
    previous = torch.cat([patches[:, :1], patches[:, :-1]], dim=1)
    following = torch.cat([patches[:, 1:], patches[:, -1:]], dim=1)
    return torch.cat(
        [previous[..., :fold], following[..., fold : 2 * fold], patches[..., 2 * fold :]], dim=-1
    )


class ShortTermInteraction(nn.Module):
    """SII: each frame's [CLS] queries its channel-shifted patch tokens (Eqs. 5-6).

    ``depth`` stacked cross-attention blocks read the same shifted patches; the query of block
    k+1 is the output of block k (official code: 2 blocks, the paper describes one).

    Shape: cls [B, T, D], patches [B, T, N, D] -> [B, T, D].
    """

    def __init__(self, dim: int, depth: int = 2) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"sii_depth must be >= 1, got {depth}")
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim) for _ in range(depth))

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        batch, frames, dim = cls.shape
        shifted = temporal_channel_shift(patches).flatten(0, 1)
        query = cls.reshape(batch * frames, dim)
        for block in self.blocks:
            query = block(query, shifted)
        return query.view(batch, frames, dim)


class LongTermInteraction(nn.Module):
    """LII: frame t's patches are queried by the [CLS] of frame (t + stride) mod T (Eq. 7).

    Cyclic within each clip; ``stride=0`` means no exchange. Keys and values are the original,
    unshifted patches. The official (unused) module rotates by 1; the paper's best stride is 2.

    Shape: cls [B, T, D], patches [B, T, N, D] -> [B, T, D] (row t belongs to frame t's patches).
    """

    def __init__(self, dim: int, stride: int = 2) -> None:
        super().__init__()
        if stride < 0:
            raise ValueError(f"lii_stride must be >= 0, got {stride}")
        self.stride = stride
        self.block = CrossAttentionBlock(dim)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        batch, frames, dim = cls.shape
        exchanged = torch.roll(cls, shifts=-(self.stride % frames), dims=1)  # row t = CLS_{t+S}
        out = self.block(exchanged.reshape(batch * frames, dim), patches.flatten(0, 1))
        return out.view(batch, frames, dim)


class CrossModalityInteraction(nn.Module):
    """CII: a branch's clip feature interacts with the paired other-modality clip's patches.

    For clip i and each frame t of its partner clip j = ``partner[i]`` the block runs over
    ``[Ō_i ; P_{j,t}]`` (1 + N tokens) and keeps the first output token; the T outputs are
    averaged (TAP) to ``O_CII,i``. Used only in training; one block shared by SII/LII and both
    modalities (the paper's figure shows a single CII layer).

    Shape: branch_mean [B, D], patches [B, T, N, D], partner [B] (indices) -> [B, D].
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = FirstTokenSelfAttentionBlock(dim)

    def forward(
        self, branch_mean: torch.Tensor, patches: torch.Tensor, partner: torch.Tensor
    ) -> torch.Tensor:
        batch, frames = patches.shape[:2]
        query = branch_mean.repeat_interleave(frames, dim=0)
        context = patches[partner].flatten(0, 1)
        return self.block(query, context).view(batch, frames, -1).mean(dim=1)
