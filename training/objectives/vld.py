"""VLD's training loss (official ``core/video_train.py``), also used by the plain CLIP baseline.

``total = ce_cls + ce_proj + wrt_last + wrt_cls + wrt_proj + 0.08 v2t + 0.4 ce_sta + 1.0 wrt_sta``

The paper's Eq. 14 names one CE and one WRT on the CLS feature; the official code has two CE
(768-d and projected 512-d heads) and three WRT (block-input CLS, ln_post CLS, projected CLS), all
at weight 1, which is what we follow. Terms whose model outputs are absent (no STA, no IMLP) are
left out, so the baseline trains with the five CLS-branch terms only.
"""

from __future__ import annotations

import torch
from vvireid.model.vld import VLDOutput
from vvireid.training.losses import cross_entropy, visual_to_text_loss, wrt_loss
from vvireid.training.objectives.base import Objective, TrainBatch


class VLDObjective(Objective):
    """Named, weighted VLD loss terms over the joint visible + infrared batch.

    Weights (``lambda1..3`` of the paper are ``v2t``, ``ce_sta`` and ``wrt_sta``).
    """

    WEIGHTS = {
        "ce_cls": 1.0,
        "ce_proj": 1.0,
        "wrt_last": 1.0,
        "wrt_cls": 1.0,
        "wrt_proj": 1.0,
        "v2t": 0.08,
        "ce_sta": 0.4,
        "wrt_sta": 1.0,
    }

    def __call__(self, out: VLDOutput, batch: TrainBatch) -> dict[str, torch.Tensor]:
        pids = batch.pids
        terms = {
            "ce_cls": cross_entropy(out.logits_cls, pids),
            "ce_proj": cross_entropy(out.logits_proj, pids),
            "wrt_last": wrt_loss(out.cls_last, pids),
            "wrt_cls": wrt_loss(out.cls, pids),
            "wrt_proj": wrt_loss(out.proj, pids),
        }
        if out.text_feats is not None:
            terms["v2t"] = visual_to_text_loss(out.proj, out.text_feats, pids)
        if out.logits_sta is not None:
            terms["ce_sta"] = cross_entropy(out.logits_sta, pids)
        if out.sta is not None:
            terms["wrt_sta"] = wrt_loss(out.sta, pids)
        return {name: self.weights[name] * value for name, value in terms.items()}
