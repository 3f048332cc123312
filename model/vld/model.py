"""VLD (Li et al., TIFS 2025): CLIP ViT + spatial-temporal prompting (STH + STA) + identity text
prompts (IMLP), following the official code (differences: docs/fidelity.md V1-V19).

Training and test features are temporal means over the T frames of a tracklet. The retrieval
feature is ``cat(mean ln_post CLS, mean STA output)`` (1536-d for ViT-B/16), not normalised and
ranked by raw inner product, as the official evaluation does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from vvireid.model.base import ReIDModel
from vvireid.model.config import ModelConfig
from vvireid.model.heads import BNClassifier
from vvireid.model.vld.aggregation import SpatialTemporalAggregation
from vvireid.model.vld.hub import SpatialTemporalHub
from vvireid.model.vld.prompts import IdentityPrompts

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "A X X X X person observed in both day and night conditions."
_SWITCHES = ("use_sth", "use_sta", "use_imlp")


@dataclass(frozen=True)
class VLDOutput:
    """Training outputs of VLD, every feature a temporal mean over the tracklet's frames.

    Shape: features [B, D] (``proj`` [B, E]), logits [B, num_classes], ``text_feats`` [C, E].

    Attributes:
        cls_last: CLS token at the input of the last block (no ``ln_post``).
        cls: CLS token after ``ln_post``.
        proj: ``cls`` projected by CLIP's visual projection.
        sta: STA output f_H (None without STA).
        logits_cls, logits_proj, logits_sta: the BN + linear identity heads on cls, proj and sta.
        text_feats: IMLP text feature of every identity, not normalised (None without IMLP).
        text_logits: ``proj @ text_feats.T``, raw inner products (None without IMLP).
    """

    cls_last: torch.Tensor
    cls: torch.Tensor
    proj: torch.Tensor
    sta: torch.Tensor | None
    logits_cls: torch.Tensor
    logits_proj: torch.Tensor
    logits_sta: torch.Tensor | None
    text_feats: torch.Tensor | None
    text_logits: torch.Tensor | None


@dataclass(frozen=True)
class _VisualFeats:
    """Per-tracklet visual features, shared by ``forward`` and ``encode``."""

    cls_last: torch.Tensor
    cls: torch.Tensor
    proj: torch.Tensor
    sta: torch.Tensor | None


class VLD(ReIDModel):
    """Video-level language-driven VVI-ReID model.

    Options (``config.options``):
        use_sth: add the spatial-temporal hub from block ``sth_start_layer`` on.
        use_sta: add the spatial-temporal aggregation branch, its head and its test feature.
            Without STH there are no hub tokens; STA then attends over the tracklet's T per-frame
            CLS tokens (of the raw last-block output) instead. The paper never runs this
            combination; this is our choice so that every switch combination is a working model.
        use_imlp: learn one text prompt per identity and train against the frozen text tower.
        sth_start_layer: 0-based block where the hub tokens are inserted, in
            [0, num_blocks - 2]; None means num_blocks - 3 (9 for ViT-B/16: the last 3 blocks).
        num_prompt_tokens: learnable context tokens per identity (the template's placeholders).
        prompt_template: text with ``num_prompt_tokens`` consecutive ``X`` placeholders.

    Raises:
        ValueError: on an option of the wrong type or out of range, naming it.
    """

    method: ClassVar[str] = "vld"
    similarity: ClassVar[str] = "inner_product"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "use_sth": True,
        "use_sta": True,
        "use_imlp": True,
        "sth_start_layer": None,
        "num_prompt_tokens": 4,
        "prompt_template": DEFAULT_TEMPLATE,
    }
    # Options a subclass pins (the baseline turns every module off).
    FORCED: ClassVar[dict[str, Any]] = {}
    # Official AdamW grouping: biases, identity heads and prompts train at 25x the base lr.
    FAST_LR_MULT: ClassVar[float] = 25.0

    def __init__(self, config: ModelConfig) -> None:
        switches = {**VLD.OPTIONS, **config.options, **self.FORCED}
        _check_types(switches)
        super().__init__(config, with_text=switches["use_imlp"])
        self.switches = switches
        width, proj_dim = self.backbone.width, self.backbone.proj_dim
        classes = config.num_classes
        self.sth_start = _resolve_start(switches["sth_start_layer"], self.backbone.num_blocks)
        self.hub = SpatialTemporalHub(config.seq_len, width) if switches["use_sth"] else None
        self.sta = SpatialTemporalAggregation(width) if switches["use_sta"] else None
        self.prompts = None
        if switches["use_imlp"]:
            self.prompts = IdentityPrompts(
                self.backbone.text,
                classes,
                switches["prompt_template"],
                switches["num_prompt_tokens"],
            )
        self.classifier = BNClassifier(width, classes)
        self.classifier_proj = BNClassifier(proj_dim, classes)
        self.classifier_sta = BNClassifier(width, classes) if self.sta is not None else None

    @property
    def embed_dim(self) -> int:
        return self.backbone.width * (2 if self.sta is not None else 1)

    def option(self, name: str) -> Any:
        """The effective value of an option, pinned ones (``FORCED``) included."""
        return self.switches[name]

    def forward(self, clips: torch.Tensor, camids: torch.Tensor | None = None) -> VLDOutput:
        """Training outputs; ``camids`` is accepted for the common interface and unused.

        Shape: clips [B, T, 3, H, W] -> see ``VLDOutput``.
        """
        self.check_clips(clips)
        feats = self._visual(clips)
        _, logits_cls = self.classifier(feats.cls)
        _, logits_proj = self.classifier_proj(feats.proj)
        logits_sta = None
        if self.classifier_sta is not None and feats.sta is not None:
            _, logits_sta = self.classifier_sta(feats.sta)
        text_feats = text_logits = None
        if self.prompts is not None:
            text_feats = self.prompts(self.backbone.text)
            text_logits = feats.proj @ text_feats.to(feats.proj.dtype).t()
        return VLDOutput(
            cls_last=feats.cls_last,
            cls=feats.cls,
            proj=feats.proj,
            sta=feats.sta,
            logits_cls=logits_cls,
            logits_proj=logits_proj,
            logits_sta=logits_sta,
            text_feats=text_feats,
            text_logits=text_logits,
        )

    def _encode(self, clips: torch.Tensor, camids: torch.Tensor | None) -> torch.Tensor:
        """``cat(mean ln_post CLS, mean STA output)``; the text branch never runs here."""
        feats = self._visual(clips)
        if feats.sta is None:
            return feats.cls
        return torch.cat([feats.cls, feats.sta], dim=1)

    def _visual(self, clips: torch.Tensor) -> _VisualFeats:
        """Run the ViT with the hub, then STA; return temporal means. Frames are tracklet-major."""
        batch, seq_len = clips.shape[:2]
        backbone = self.backbone
        last_block = backbone.num_blocks - 1
        seen: dict[str, torch.Tensor] = {}

        def hook(index: int, tokens: torch.Tensor) -> torch.Tensor:
            if self.hub is not None and index == self.sth_start:
                tokens = self.hub.insert(tokens)
            elif self.hub is not None and index > self.sth_start:
                tokens = self.hub.exchange(tokens)
            if index == last_block:
                seen["cls_last"] = tokens[:, 0]
            return tokens

        out = backbone.run_blocks(backbone.embed(clips.flatten(0, 1)), hook)
        cls_raw = out[:, 0]
        cls = backbone.ln_post(cls_raw)
        proj = cls @ backbone.proj.to(cls.dtype)
        sta = None
        if self.sta is not None:
            queries = cls_raw.reshape(batch, seq_len, -1)
            memory = self.hub.hub_tokens(out) if self.hub is not None else queries
            sta = self.sta(queries, memory, backbone.ln_post).mean(dim=1)

        def mean(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch, seq_len, -1).mean(dim=1)

        return _VisualFeats(
            cls_last=mean(seen["cls_last"]), cls=mean(cls), proj=mean(proj), sta=sta
        )

    def param_groups(
        self, base_lr: float, weight_decay: float, fast_lr_mult: float | None = None
    ) -> list[dict[str, Any]]:
        """AdamW groups as the official code builds them.

        ``fast_lr_mult`` (default 25) x ``base_lr`` for every bias (CLIP's included), every
        identity head (BN weights included) and the identity prompts; ``base_lr`` for everything
        else trainable, the STH tokens included. Weight decay applies to all; the frozen text
        tower is left out. Each group carries ``name`` and ``lr_mult`` for the scheduler.
        """
        mult = self.FAST_LR_MULT if fast_lr_mult is None else float(fast_lr_mult)
        fast_ids = {id(p) for module in self._fast_modules() for p in module.parameters()}
        base, fast = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            is_bias = name.rsplit(".", 1)[-1].endswith("bias")
            (fast if is_bias or id(param) in fast_ids else base).append(param)
        groups = [
            {"name": "base", "params": base, "lr": base_lr, "lr_mult": 1.0},
            {"name": "fast", "params": fast, "lr": base_lr * mult, "lr_mult": mult},
        ]
        return [{**g, "weight_decay": weight_decay} for g in groups if g["params"]]

    def _fast_modules(self) -> list[nn.Module]:
        modules = [self.classifier, self.classifier_proj, self.classifier_sta, self.prompts]
        return [m for m in modules if m is not None]


def _check_types(switches: dict[str, Any]) -> None:
    for name in _SWITCHES:
        if not isinstance(switches[name], bool):
            raise ValueError(f"option {name} must be true or false, got {switches[name]!r}")
    tokens = switches["num_prompt_tokens"]
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"option num_prompt_tokens must be an integer >= 1, got {tokens!r}")
    if not isinstance(switches["prompt_template"], str):
        raise ValueError(
            f"option prompt_template must be a string, got {switches['prompt_template']!r}"
        )


def _resolve_start(start: Any, num_blocks: int) -> int:
    """The STH insertion block; None = the third-last block, as the official default 9 of 12."""
    if start is None:
        return max(0, num_blocks - 3)
    highest = num_blocks - 2
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= highest:
        raise ValueError(
            f"option sth_start_layer={start!r} is out of range: it must be an integer block index "
            f"in [0, {highest}] for this {num_blocks}-block backbone "
            f"(None = {max(0, num_blocks - 3)})"
        )
    return start
