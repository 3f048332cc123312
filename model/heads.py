"""Classification heads shared by the methods: one BN + bias-free Linear block instead of copies."""

from __future__ import annotations

import torch
from torch import nn


class BNClassifier(nn.Module):
    """BatchNorm1d neck followed by a bias-free linear identity classifier.

    Both papers' heads have this shape. ``freeze_bn_bias`` keeps the BN shift at 0 (the "BNNeck" of
    X-ReID); VLD trains it. The classifier weight starts at N(0, 0.001) as in both codebases.

    Shape: ``feats`` [B, D] -> (``bn_feats`` [B, D], ``logits`` [B, num_classes]).
    """

    def __init__(self, dim: int, num_classes: int, *, freeze_bn_bias: bool = False) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        self.bn.bias.requires_grad_(not freeze_bn_bias)
        self.fc = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.fc.weight, std=0.001)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn_feats = self.bn(feats)
        return bn_feats, self.fc(bn_feats)
